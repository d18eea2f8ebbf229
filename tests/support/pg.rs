//! A throwaway PostgreSQL cluster for integration tests.
//!
//! The server binaries (`initdb`, `pg_ctl`) are found through `CONCORD_PG_BINDIR`,
//! `pg_config --bindir`, `PATH`, or the Debian layout `/usr/lib/postgresql/<ver>/bin`
//! (newest version first). The cluster lives in a temporary directory with
//! `wal_level = logical`, listens on 127.0.0.1 on a free port (and on a unix socket in
//! its own directory), and requires scram-sha-256 passwords over TCP.
//!
//! PostgreSQL refuses to run as root, and tests run as root in CI: then every server
//! command runs as `nobody` (or a `concord-test` user created with `useradd` when there
//! is no `nobody`), and the cluster directory is handed to that user.
//!
//! One cluster is shared per test binary ([`PgCluster::shared`]), with a fresh database
//! per test ([`PgCluster::fresh_db`]). Statics are never dropped, so the shared cluster
//! is stopped by an `atexit` hook; a cluster left behind by a killed test process is
//! found by its `owner.pid` file and stopped by the next run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::{Client, NoTls};

/// Name of the bootstrap superuser of every test cluster.
pub const SUPERUSER: &str = "concord_super";
/// Its password (TCP connections use scram-sha-256).
pub const SUPERUSER_PASSWORD: &str = "super-secret-test-password";
/// Prefix of the cluster directories under the temporary directory.
const DIR_PREFIX: &str = "concord-pg-";

/// How to set up a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `wal_level`: `logical` for capture, `replica` to test preflight refusing it.
    pub wal_level: &'static str,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            wal_level: "logical",
            extra_conf: Vec::new(),
        }
    }
}

/// A running cluster. Dropping it stops the server (`pg_ctl stop -m immediate`) and
/// removes its files.
pub struct PgCluster {
    /// Cluster root: `data/` (the data directory), `socket/`, `server.log`, `owner.pid`.
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// The unprivileged account the server runs as when the tests run as root.
    run_as: Option<(u32, u32)>,
    /// Databases created so far, for unique names.
    databases: AtomicU32,
    stopped: std::sync::atomic::AtomicBool,
}

static SHARED: OnceLock<PgCluster> = OnceLock::new();

extern "C" fn stop_shared_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(cluster) = SHARED.get() {
            cluster.stop();
        }
    });
}

impl PgCluster {
    /// The cluster shared by every test of this test binary (`wal_level = logical`).
    pub fn shared() -> &'static PgCluster {
        SHARED.get_or_init(|| {
            let cluster = PgCluster::start(ClusterOptions::default());
            // SAFETY: registers a plain `extern "C" fn` that touches only a static.
            unsafe { libc::atexit(stop_shared_at_exit) };
            cluster
        })
    }

    /// Creates and starts a new cluster. Panics with the server log when it cannot.
    pub fn start(options: ClusterOptions) -> PgCluster {
        let bindir = find_bindir();
        let run_as = unprivileged_account();
        let base = temp_base(run_as.is_some());
        reap_stale_clusters(&base, &bindir);
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(&base)
            .expect("create cluster directory")
            .keep();
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string()).expect("write owner.pid");
        std::fs::create_dir(dir.join("socket")).expect("create socket dir");
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write pwfile");
        if let Some((uid, gid)) = run_as {
            chown_tree(&dir, uid, gid);
        }
        let mut cluster = PgCluster {
            dir: dir.clone(),
            bindir,
            port: 0,
            run_as,
            databases: AtomicU32::new(0),
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        let data = dir.join("data");
        let out = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "--no-locale",
                "--encoding=UTF8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--username={SUPERUSER}"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert_success("initdb", &out);
        std::fs::remove_file(&pwfile).expect("remove pwfile");

        // A free port can be taken between the probe and the server's bind: try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let conf = cluster.conf(&options, port);
            std::fs::write(data.join("postgresql.auto.conf"), conf).expect("write postgresql.auto.conf");
            let out = cluster
                .server_command("pg_ctl")
                .arg("start")
                .arg("-w")
                .args(["-t", "60"])
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                cluster.port = port;
                return cluster;
            }
            last_log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            if !last_log.contains("could not bind") && !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!("the test PostgreSQL cluster did not start; server log:\n{last_log}");
    }

    /// `postgresql.auto.conf` for this cluster.
    fn conf(&self, options: &ClusterOptions, port: u16) -> String {
        let mut lines = vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("port = {port}"),
            format!("unix_socket_directories = '{}'", self.dir.join("socket").display()),
            format!("wal_level = {}", options.wal_level),
            "max_replication_slots = 32".to_owned(),
            "max_wal_senders = 32".to_owned(),
            "max_connections = 200".to_owned(),
            "password_encryption = 'scram-sha-256'".to_owned(),
            // Test data is disposable: skip the disk syncs.
            "fsync = off".to_owned(),
            "synchronous_commit = off".to_owned(),
            "full_page_writes = off".to_owned(),
        ];
        lines.extend(options.extra_conf.iter().cloned());
        lines.join("\n") + "\n"
    }

    /// A server binary, run as the unprivileged account when the tests run as root.
    fn server_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(name));
        cmd.current_dir(&self.dir).stdin(Stdio::null()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            // std clears the supplementary groups when a root parent sets the uid.
            cmd.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        cmd
    }

    /// Stops the server (idempotent).
    fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self
            .server_command("pg_ctl")
            .arg("stop")
            .args(["-m", "immediate", "-w"])
            .arg("-D")
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A key=value connection string (no password) for `user` on `dbname`.
    pub fn conninfo(&self, dbname: &str, user: &str) -> String {
        format!("host={} port={} dbname={dbname} user={user}", self.host(), self.port)
    }

    /// Connects over TCP with a password; the connection is driven on the current runtime.
    pub async fn connect(&self, dbname: &str, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .dbname(dbname)
            .user(user)
            .password(password)
            .application_name("concord-tests");
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A superuser client on `dbname`.
    pub async fn superuser(&self, dbname: &str) -> Client {
        self.connect(dbname, SUPERUSER, SUPERUSER_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("connect as superuser to {dbname}: {e}"))
    }

    /// A new, empty database with a unique name.
    pub async fn fresh_db(&self) -> TestDb<'_> {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("test_{}_{n}", std::process::id());
        let admin = self.superuser("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        TestDb { cluster: self, name }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A login role created by [`TestDb::create_role`].
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub password: String,
}

/// One database of a test cluster.
pub struct TestDb<'a> {
    pub cluster: &'a PgCluster,
    pub name: String,
}

impl TestDb<'_> {
    /// A superuser client on this database.
    pub async fn admin(&self) -> Client {
        self.cluster.superuser(&self.name).await
    }

    /// Runs SQL (one or more statements) as the superuser on this database.
    pub async fn execute(&self, sql: &str) {
        self.admin()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    /// Creates a login role named `<database>_<suffix>` with `attributes` (e.g.
    /// `"REPLICATION"`, or `""`), allowed to connect to this database and use `public`
    /// and nothing more: tests grant table rights as they need.
    pub async fn create_role(&self, suffix: &str, attributes: &str) -> Role {
        let name = format!("{}_{suffix}", self.name);
        let password = format!("pw-{name}");
        self.execute(&format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{password}' {attributes};
             GRANT CONNECT ON DATABASE {db} TO {name};
             GRANT USAGE ON SCHEMA public TO {name};",
            db = self.name
        ))
        .await;
        Role { name, password }
    }

    /// A client for `role` on this database.
    pub async fn connect_as(&self, role: &Role) -> Client {
        self.cluster
            .connect(&self.name, &role.name, &role.password)
            .await
            .unwrap_or_else(|e| panic!("connect as {}: {}", role.name, describe(&e)))
    }

    /// A key=value connection string (no password) for `user` on this database.
    pub fn conninfo(&self, user: &str) -> String {
        self.cluster.conninfo(&self.name, user)
    }

    /// The keys of a concord `type = "postgres"` system for `role` on this database,
    /// without TLS; the password is written to `dir/<role>.password` and referenced as a
    /// file secret (relative to `dir`, the configuration's directory).
    pub fn system_toml(&self, role: &Role, dir: &Path) -> String {
        let file = format!("{}.password", role.name);
        std::fs::write(dir.join(&file), &role.password).expect("write password file");
        format!(
            "host = \"{}\"\nport = {}\ndatabase = \"{}\"\nuser = \"{}\"\npassword = {{ file = \"{file}\" }}\ntls = \"disable\"\n",
            self.cluster.host(),
            self.cluster.port(),
            self.name,
            role.name
        )
    }

    /// The connection keys of a concord `type = "postgres"` system for the superuser on
    /// this database, without TLS; the password is written to `dir/pgpass` and referenced
    /// as a file secret (relative to `dir`, the configuration's directory).
    pub fn superuser_system_toml(&self, dir: &Path) -> String {
        std::fs::write(dir.join("pgpass"), SUPERUSER_PASSWORD).expect("write password file");
        format!(
            "host = \"{}\"\nport = {}\ndatabase = \"{}\"\nuser = \"{SUPERUSER}\"\npassword = {{ file = \"pgpass\" }}\ntls = \"disable\"\n",
            self.cluster.host(),
            self.cluster.port(),
            self.name,
        )
    }

    /// Writes WAL with the SQL `write_wal(round)` returns, round after round, until the
    /// server invalidates replication slot `slot` (its `wal_status` is `lost`); fails after
    /// a minute. The cluster needs a small `max_slot_wal_keep_size`.
    pub async fn write_wal_until_slot_lost(&self, slot: &str, write_wal: impl Fn(u64) -> String) {
        let admin = self.admin().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for round in 0.. {
            let lost: bool = admin
                .query_one(
                    "SELECT coalesce(wal_status, '') = 'lost' FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .expect("slot state")
                .get(0);
            if lost {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the slot was not invalidated");
            admin.batch_execute(&write_wal(round)).await.expect("generate wal");
        }
    }

    /// A concord system configuration for `role` on this database; see [`Self::system_toml`].
    pub fn system_config(&self, role: &Role, dir: &Path) -> concord::connector::postgres::PostgresSystemConfig {
        toml::from_str(&self.system_toml(role, dir)).expect("system settings parse")
    }
}

/// The server's message and SQLSTATE for a database error, the error itself otherwise.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The directory holding `initdb` and `pg_ctl`.
pub fn find_bindir() -> PathBuf {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("CONCORD_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_tools(&dir),
            "CONCORD_PG_BINDIR={} has no initdb and pg_ctl",
            dir.display()
        );
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return dir;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // Follow a symlinked pg_ctl to the directory of the real installation.
            if let Ok(real) = std::fs::canonicalize(dir.join("pg_ctl"))
                && let Some(real_dir) = real.parent()
                && has_tools(real_dir)
            {
                return real_dir.to_owned();
            }
            if has_tools(&dir) {
                return dir;
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, dir)) => dir,
        None => panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found through CONCORD_PG_BINDIR, \
             pg_config, PATH or /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql)"
        ),
    }
}

/// `None` when not root; otherwise the uid and gid to run the server as.
fn unprivileged_account() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    if let Some(ids) = lookup_user("nobody") {
        return Some(ids);
    }
    if lookup_user("concord-test").is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "concord-test",
            ])
            .output()
            .expect("run useradd");
        // Another test binary may have created it concurrently.
        if !out.status.success() && lookup_user("concord-test").is_none() {
            assert_success("useradd concord-test", &out);
        }
    }
    Some(lookup_user("concord-test").expect("concord-test user exists after useradd"))
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam with a valid C string; the result is read before any other
    // passwd call on this thread.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null pointer returned by getpwnam.
    let pw = unsafe { &*pw };
    (pw.pw_uid != 0).then_some((pw.pw_uid, pw.pw_gid))
}

/// Where cluster directories go: the temporary directory, or `/tmp` when the server
/// runs as another user that could not reach it.
fn temp_base(other_user: bool) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let base = std::env::temp_dir();
    if !other_user {
        return base;
    }
    let reachable = base
        .ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if reachable { base } else { PathBuf::from("/tmp") }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown cluster directory");
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read cluster directory") {
            chown_tree(&entry.expect("dir entry").path(), uid, gid);
        }
    }
}

/// Stops and removes clusters whose test process is gone (killed before its exit hook).
fn reap_stale_clusters(base: &Path, bindir: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_ours = entry.file_name().to_str().is_some_and(|n| n.starts_with(DIR_PREFIX));
        let Some(pid) = is_ours
            .then(|| std::fs::read_to_string(dir.join("owner.pid")).ok())
            .flatten()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        if dir.join("data/postmaster.pid").exists() {
            use std::os::unix::fs::MetadataExt;
            let mut cmd = Command::new(bindir.join("pg_ctl"));
            cmd.args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(dir.join("data"))
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Ok(meta) = std::fs::metadata(dir.join("data"))
                && meta.uid() != 0
            {
                use std::os::unix::process::CommandExt;
                cmd.uid(meta.uid()).gid(meta.gid());
            }
            let _ = cmd.status();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Whether `pid` runs: it exists and is not a zombie waiting for its parent to reap it.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Parses, validates (no problem allowed) and compiles the configuration `toml` whose
/// directory is `dir`, and opens its state store: what the daemon does before it runs.
pub fn compile_config(
    toml: &str,
    dir: &Path,
) -> (
    std::sync::Arc<concord::engine::runtime::Runtime>,
    concord::state::StateStore,
) {
    let mut config = concord::config::parse(toml).expect("configuration parses");
    config.base_dir = dir.to_path_buf();
    let problems = concord::config::validate(&config);
    assert!(problems.is_empty(), "configuration problems: {problems:?}");
    let store = concord::state::StateStore::open(&config.base_dir.join(&config.state.dir), config.state.cache_mb)
        .expect("state store");
    let rt = std::sync::Arc::new(concord::engine::runtime::Runtime::compile(config).expect("configuration compiles"));
    (rt, store)
}

/// Opens the connectors of `rt` and runs an engine on them until it is shut down, in a
/// task of its own.
pub fn spawn_engine(
    rt: &std::sync::Arc<concord::engine::runtime::Runtime>,
    store: &concord::state::StateStore,
) -> (concord::engine::Engine, tokio::task::JoinHandle<()>) {
    let connectors = concord::connector::open_all(rt, store).expect("connectors open");
    let engine = concord::engine::Engine::new(rt.clone(), store.clone());
    let run = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run(connectors, concord::engine::RunMode::Forever).await }
    });
    (engine, run)
}

/// A `[[links]]` table of entity `contact` on `object` (id field `id`) of `system`, with
/// its `map = [...]` line(s) `map`; a capturing link when `capture_interval_secs` is set.
pub fn contact_link_toml(system: &str, object: &str, capture_interval_secs: Option<u64>, map: &str) -> String {
    let capture = capture_interval_secs.map_or(String::new(), |secs| {
        format!("capture = {{ interval_secs = {secs} }}\n")
    });
    format!(
        "[[links]]\nsystem = \"{system}\"\nentity = \"contact\"\nobject = \"{object}\"\nid_field = \"id\"\n{capture}{map}\n"
    )
}
