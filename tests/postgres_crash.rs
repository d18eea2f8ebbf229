//! Group commit against a real PostgreSQL and a real process: `concord run` captures a
//! table through a logical replication slot into another database while a writer keeps
//! inserting and updating rows, and the process is SIGKILLed at random points and
//! restarted. Captured batches commit to redb without an fsync within the durable
//! interval, so a kill loses the lazy commits made since the last durable one. The
//! sink's applier makes lazy commits durable before it sends; a trigger on the sink table
//! slows each of its rounds, so captures go on committing lazily in between.
//!
//! After every kill the slot's `confirmed_flush_lsn` must not be ahead of the
//! checkpoint concord holds durably: the slot then delivers the lost batches again. At
//! the end every source row is in the sink once, with its final values, and no link
//! stopped because the slot was ahead of its checkpoint.
//!
//! The sink table is keyed by the email it receives, so a create repeated after a kill
//! that lost its confirmation is an upsert of the same row (see the sink's module doc).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::pg::{PgCluster, TestDb, contact_link_toml};
use tokio_postgres::Client;

/// Rows in the source table before concord first starts: the initial snapshot.
const INITIAL_ROWS: i64 = 400;
/// Inserts and updates the writer makes while concord is killed and restarted.
const CHANGES: usize = 6_000;
/// SIGKILLs of `concord run`.
const KILLS: usize = 7;
/// Long, so most kills land while lazy commits are pending: a batch becomes durable at
/// most this long after the last durable commit.
const DURABLE_INTERVAL_MS: u64 = 1_000;
/// Small, so the workload is many batches and many lazy commits.
const BATCH_SIZE: usize = 50;
/// Far longer than any convergence takes; a hang fails the test instead of the suite.
const DEADLINE: Duration = Duration::from_secs(90);
/// The message of the fatal error a slot confirmed past concord's checkpoint raises.
const SLOT_AHEAD: &str = "ahead of concord's checkpoint";

/// email → first_name.
type Rows = BTreeMap<String, Option<String>>;

fn config(src: &TestDb<'_>, dst: &TestDb<'_>, dir: &Path, port: u16) -> String {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/contact.schema.json");
    format!(
        r#"[state]
dir = "state"
durable_interval_ms = {DURABLE_INTERVAL_MS}

[admin]
listen = "127.0.0.1:{port}"

[engine]
batch_size = {BATCH_SIZE}
backoff_min_ms = 10
backoff_max_ms = 200

[systems.app]
type = "postgres"
direction = "read"
{app}slot = "{slot}"
publication = "pub_{slot}"
status_interval_secs = 1
heartbeat_interval_secs = 1
snapshot_chunk_rows = {BATCH_SIZE}

[systems.copy]
type = "postgres"
direction = "write"
{copy}
[entities.contact]
schema = "{schema}"
match_keys = ["email"]

{app_link}
[[links]]
system = "copy"
entity = "contact"
object = "copies"
id_field = "email"
{MAP}
"#,
        app = src.superuser_system_toml(dir),
        slot = src.name,
        copy = dst.superuser_system_toml(dir),
        schema = schema.display(),
        app_link = contact_link_toml("app", "contacts", Some(1), MAP),
    )
}

const MAP: &str =
    r#"map = [{ canonical = "email", system = "email" }, { canonical = "first_name", system = "first_name" }]"#;

/// Lazy commits the process made so far, from its /metrics.
fn lazy_commits(port: u16) -> u64 {
    let Some(response) = support::request(port, "GET", "/metrics") else {
        return 0;
    };
    response
        .body
        .lines()
        .find(|l| l.starts_with("concord_state_commit_duration_seconds_count{durability=\"lazy\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A `concord run` process, SIGKILLed when dropped so a failing test leaves none behind.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `concord run` on a fresh admin port; its stderr is appended to `concord.log`
/// so the logs of every run are kept.
fn spawn(dir: &Path, config_text: impl Fn(u16) -> String) -> (Daemon, u16) {
    let port = support::free_port();
    let config = dir.join("concord.toml");
    std::fs::write(&config, config_text(port)).expect("write the configuration");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("concord.log"))
        .expect("open the log");
    let child = support::concord(&["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the concord binary starts");
    (Daemon(child), port)
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("concord.log")).unwrap_or_default()
}

/// Polls `/readyz` tightly until concord is ready; fails with the log if it exits.
async fn wait_ready(child: &mut Child, port: u16, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if support::request(port, "GET", "/readyz").is_some_and(|r| r.status == 200) {
            return;
        }
        if let Some(status) = child.try_wait().expect("poll concord") {
            panic!(
                "concord exited with {status} before it was ready; log:\n{}",
                log_of(dir)
            );
        }
        assert!(
            Instant::now() < deadline,
            "concord was not ready in time; log:\n{}",
            log_of(dir)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Inserts and updates rows of `contacts` in transactions of 1 to 400 changes, some
/// larger than a batch, until `CHANGES` are made. Every update gives the row a new
/// first name, so a lost or replayed-out-of-order change shows as a stale value.
async fn write_changes(client: Client, seed: u64, done: Arc<AtomicUsize>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next_id = INITIAL_ROWS + 1;
    let mut versions: BTreeMap<i64, u32> = (1..=INITIAL_ROWS).map(|id| (id, 0)).collect();
    let mut made = 0;
    while made < CHANGES {
        let size = match rng.random_range(0..10) {
            0..=3 => 1,
            4..=6 => rng.random_range(2..20),
            7..=8 => rng.random_range(20..100),
            _ => rng.random_range(100..400),
        }
        .min(CHANGES - made);
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..size {
            if rng.random_bool(0.5) {
                let id = next_id;
                next_id += 1;
                versions.insert(id, 0);
                sql.push_str(&format!(
                    "INSERT INTO contacts VALUES ({id}, 'p{id}@example.com', 'n{id}v0');\n"
                ));
            } else {
                let id = rng.random_range(1..next_id);
                let version = versions.get_mut(&id).expect("every id below next_id exists");
                *version += 1;
                sql.push_str(&format!(
                    "UPDATE contacts SET first_name = 'n{id}v{version}' WHERE id = {id};\n"
                ));
            }
        }
        sql.push_str("COMMIT;");
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("the writer's transaction failed: {}", support::pg::describe(&e)));
        made += size;
        done.store(made, Ordering::SeqCst);
        // Spreads the changes over the kills instead of writing them all up front.
        tokio::time::sleep(Duration::from_millis(rng.random_range(40..120))).await;
    }
}

async fn rows(client: &Client, table: &str) -> Rows {
    client
        .query(&format!("SELECT email, first_name FROM {table}"), &[])
        .await
        .unwrap_or_else(|e| panic!("read {table}: {}", support::pg::describe(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap_or_else(|e| panic!("count {table}: {}", support::pg::describe(&e)))
        .get(0)
}

/// Waits until no walsender holds `slot`: after a kill its last feedback is then
/// applied, and the next run can take the slot.
async fn slot_released(admin: &Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: Option<bool> = admin
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("query slots")
            .map(|row| row.get(0));
        if active != Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "slot {slot} still active after the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What concord holds durably after a kill.
struct Durable {
    /// The link's checkpoint LSN; `None` before its first durable commit.
    lsn: Option<String>,
    records: u64,
}

/// Opens the state left by a killed process (recovering to its last durable commit)
/// and reads the link's checkpoint and the record count. The store is closed on return:
/// it holds a file lock the next run needs.
fn durable_state(dir: &Path) -> Durable {
    let store = concord::state::StateStore::open(&dir.join("state"), 16).expect("the state store opens after a kill");
    let view = store.read().expect("read view");
    let lsn = view
        .checkpoint("app", "app.contact")
        .expect("read the checkpoint")
        .map(|checkpoint| {
            checkpoint["lsn"]
                .as_str()
                .unwrap_or_else(|| panic!("checkpoint without an lsn: {checkpoint}"))
                .to_string()
        });
    Durable {
        lsn,
        records: view.record_count().expect("record count"),
    }
}

/// The slot's confirmed position, and whether it is ahead of `lsn`.
async fn slot_vs(admin: &Client, slot: &str, lsn: &str) -> (String, bool) {
    let row = admin
        .query_one(
            "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn > $2::text::pg_lsn
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await
        .unwrap_or_else(|e| panic!("slot {slot}: {}", support::pg::describe(&e)));
    (row.get(0), row.get(1))
}

/// What one kill left.
#[derive(Debug)]
struct Kill {
    /// Changes the writer had made.
    written: usize,
    /// Lazy commits the killed run had made.
    lazy_commits: u64,
    /// Records in the durable state after the kill.
    durable_records: u64,
    /// The durable checkpoint LSN.
    checkpoint: Option<String>,
    /// Rows in the sink table after the kill.
    sink_rows: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_never_lets_the_slot_pass_the_durable_checkpoint() {
    let cluster = PgCluster::shared();
    let (src, dst) = (cluster.fresh_db().await, cluster.fresh_db().await);
    src.execute(&format!(
        "CREATE TABLE contacts (id bigint PRIMARY KEY, email text NOT NULL, first_name text);
         INSERT INTO contacts SELECT g, 'p' || g || '@example.com', 'n' || g || 'v0'
           FROM generate_series(1, {INITIAL_ROWS}) g;"
    ))
    .await;
    dst.execute(
        "CREATE TABLE copies (email text PRIMARY KEY, first_name text);
         CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.005); RETURN NULL; END $$;
         CREATE TRIGGER slow_down AFTER INSERT OR UPDATE ON copies
           FOR EACH STATEMENT EXECUTE FUNCTION slow_down();",
    )
    .await;
    let (src_admin, dst_admin) = (src.admin().await, dst.admin().await);
    let slot = format!("{}_contact", src.name);
    // Kept when the test fails, for inspection; removed at the end otherwise.
    let dir = tempfile::tempdir().expect("temp dir").keep();
    eprintln!("concord's directory: {}", dir.display());
    let config_text = |port| config(&src, &dst, &dir, port);

    let seed: u64 = std::env::var("CONCORD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash seed {seed} (set CONCORD_CRASH_SEED to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let written = Arc::new(AtomicUsize::new(0));
    let mut writer = None;
    let mut kills: Vec<Kill> = Vec::new();
    for _ in 0..KILLS {
        let (mut daemon, port) = spawn(&dir, config_text);
        let child = &mut daemon.0;
        wait_ready(child, port, &dir).await;
        if writer.is_none() {
            // The writer starts once the initial snapshot is in the sink, so every change
            // it makes reaches concord through the stream.
            let deadline = Instant::now() + DEADLINE;
            while count(&dst_admin, "copies").await < INITIAL_ROWS {
                if let Some(status) = child.try_wait().expect("poll concord") {
                    panic!(
                        "concord exited with {status} during the snapshot; log:\n{}",
                        log_of(&dir)
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "the initial snapshot did not reach the sink in time"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            writer = Some(tokio::spawn(write_changes(src.admin().await, seed, written.clone())));
        }
        let wait = Duration::from_millis(rng.random_range(600..3_000));
        tokio::time::sleep(wait).await;
        let lazy_commits = lazy_commits(port);
        if let Some(status) = child.try_wait().expect("poll concord") {
            panic!(
                "concord exited with {status} while it should run; log:\n{}",
                log_of(&dir)
            );
        }
        child.kill().expect("SIGKILL concord");
        child.wait().expect("reap concord");

        slot_released(&src_admin, &slot).await;
        let durable = durable_state(&dir);
        if let Some(lsn) = &durable.lsn {
            let (confirmed, ahead) = slot_vs(&src_admin, &slot, lsn).await;
            assert!(
                !ahead,
                "kill {}: the slot confirmed {confirmed}, ahead of the durable checkpoint {lsn}; \
                 the changes between are lost (seed {seed})",
                kills.len() + 1
            );
        }
        eprintln!("kill {} after {} ms of running", kills.len() + 1, wait.as_millis());
        kills.push(Kill {
            written: written.load(Ordering::SeqCst),
            lazy_commits,
            durable_records: durable.records,
            checkpoint: durable.lsn,
            sink_rows: count(&dst_admin, "copies").await,
        });
    }
    eprintln!("after each kill: {kills:#?}");

    // One last run, not killed, converges once the writer is done.
    let (mut daemon, port) = spawn(&dir, config_text);
    let child = &mut daemon.0;
    wait_ready(child, port, &dir).await;
    tokio::time::timeout(DEADLINE, writer.expect("the writer started in the first run"))
        .await
        .expect("the writer finishes in time")
        .expect("the writer does not panic");
    let started = Instant::now();
    let expected = rows(&src_admin, "contacts").await;
    assert_eq!(
        expected.len() as i64,
        count(&src_admin, "contacts").await,
        "every email is unique in the source"
    );
    loop {
        let copied = rows(&dst_admin, "copies").await;
        if copied == expected {
            break;
        }
        if Instant::now() > started + DEADLINE {
            let missing = expected
                .iter()
                .filter(|(e, v)| copied.get(*e) != Some(v))
                .map(|(e, v)| (e, v, copied.get(e)))
                .take(10);
            let extra = copied.keys().filter(|e| !expected.contains_key(*e)).take(10);
            panic!(
                "the sink did not converge within {DEADLINE:?}: {} rows, {} expected; differing (email, \
                 source, sink) {:?}; \
                 extra {:?}; log:\n{}",
                copied.len(),
                expected.len(),
                missing.collect::<Vec<_>>(),
                extra.collect::<Vec<_>>(),
                log_of(&dir)
            );
        }
        if let Some(status) = child.try_wait().expect("poll concord") {
            panic!("concord exited with {status} before converging; log:\n{}", log_of(&dir));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "converged {} ms after the writer finished",
        started.elapsed().as_millis()
    );

    // The sink holds every value; writes queued again by batches replayed after a kill
    // (their effects already in the sink) may still be draining. Once they have, the
    // sink must still hold exactly the source's values.
    let status = loop {
        let status = support::get(port, "/api/v1/status").json();
        if status["systems"]["copy"]["outbox_depth"] == 0 || Instant::now() > started + DEADLINE {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        rows(&dst_admin, "copies").await,
        expected,
        "the sink after the outbox drained"
    );
    let link = &status["links"]["app.contact"];
    assert!(
        link["state"] != "stopped" && link["last_error"].as_str().is_none_or(|e| !e.contains(SLOT_AHEAD)),
        "the capture link failed: {link}"
    );
    assert_eq!(status["systems"]["copy"]["outbox_depth"], 0, "{status}");
    assert_eq!(status["systems"]["copy"]["dlq_depth"], 0, "{status}");
    support::signal(child, libc::SIGTERM);
    let exit = support::wait_for("concord to stop after SIGTERM", 30, || {
        child.try_wait().expect("poll concord")
    });
    assert!(exit.success(), "concord exited with {exit}; log:\n{}", log_of(&dir));
    let log = log_of(&dir);
    assert!(
        !log.contains(SLOT_AHEAD),
        "a link found its slot ahead of its checkpoint:\n{log}"
    );

    // Exactly once: the sink holds as many rows as the source, every source row is one
    // record, and both identity maps hold exactly their tables' rows.
    let source_rows = count(&src_admin, "contacts").await;
    assert_eq!(count(&dst_admin, "copies").await, source_rows, "sink rows");
    let sink_ids: Vec<String> = dst_admin
        .query("SELECT email FROM copies", &[])
        .await
        .expect("sink ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let source_ids: Vec<String> = src_admin
        .query("SELECT id::text FROM contacts", &[])
        .await
        .expect("source ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let store = concord::state::StateStore::open(&dir.join("state"), 16).expect("the state store opens");
    let view = store.read().expect("read view");
    assert_eq!(
        view.record_count().expect("record count"),
        source_rows as u64,
        "records"
    );
    let globals = |system: &str, ids: &[String]| -> std::collections::BTreeSet<u128> {
        ids.iter()
            .map(|id| {
                view.identity("contact", system, id)
                    .expect("identity")
                    .unwrap_or_else(|| panic!("{system} row {id} has no identity"))
                    .as_u128()
            })
            .collect()
    };
    let (app_globals, copy_globals) = (globals("app", &source_ids), globals("copy", &sink_ids));
    assert_eq!(
        app_globals.len(),
        source_ids.len(),
        "every source row is its own record"
    );
    assert!(
        app_globals == copy_globals,
        "source and sink rows map to the same records"
    );
    let identities = store
        .write(|t| Ok::<_, concord::state::StateError>((t.count("contact", "app")?, t.count("contact", "copy")?)))
        .expect("identity counts");
    assert_eq!(
        identities,
        (source_rows as u64, source_rows as u64),
        "identity map sizes of app and copy"
    );
    let checkpoint = view
        .checkpoint("app", "app.contact")
        .expect("checkpoint")
        .expect("a checkpoint after the sync");
    let lsn = checkpoint["lsn"].as_str().expect("checkpoint lsn");
    drop(view);
    drop(store);
    let (confirmed, ahead) = slot_vs(&src_admin, &slot, lsn).await;
    assert!(!ahead, "after the sync the slot confirmed {confirmed}, ahead of {lsn}");

    // The kills must have landed at many stages, and runs that committed lazily must
    // have been killed, so the acknowledgement's wait for a durable commit was exercised.
    // A run killed before its first durable commit leaves the same durable state as the
    // one before, so stages are counted, not kills.
    let stages: std::collections::BTreeSet<(u64, i64)> =
        kills.iter().map(|k| (k.durable_records, k.sink_rows)).collect();
    assert!(
        stages.len() > KILLS / 2,
        "the kills landed at too few stages of the sync: {kills:#?}"
    );
    let lazy = kills.iter().filter(|k| k.lazy_commits > 0).count();
    assert!(lazy > KILLS / 2, "too few killed runs committed lazily: {kills:#?}");
    let while_writing = kills.iter().filter(|k| k.written < CHANGES).count();
    assert!(
        while_writing >= KILLS / 2,
        "too few kills landed while the writer was writing: {kills:#?}"
    );
    assert!(
        kills.iter().all(|k| k.checkpoint.is_some()),
        "the durable checkpoint was compared with the slot after too few kills: {kills:#?}"
    );
    std::fs::remove_dir_all(&dir).expect("remove concord's directory");
}
