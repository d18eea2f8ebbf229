//! Benchmark of the PostgreSQL connector against a throwaway cluster of its own.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_pg
//! ```
//!
//! It starts a cluster the way the integration tests do (`tests/support/pg.rs`: initdb
//! and pg_ctl from the installed PostgreSQL, `wal_level = logical`, a free loopback port,
//! as `nobody` when run as root; plus `track_commit_timestamp = on`), runs the release
//! `concord` binary next to this example as a separate process, and measures:
//!
//! 1. **Capture**: one workload (200,000 inserts, then 100,000 updates, in transactions
//!    of 1,000 rows, `REPLICA IDENTITY FULL`) is written while slots wait; then, side by
//!    side and alternating, `pg_recvlogical` streams one pgoutput slot to `/dev/null`
//!    (`proto_version '1'`, `publication_names`, `--endpos` at the last transaction) and
//!    concord (one read link, no sink: stream → merge → redb) drains another, timed until
//!    the slot's `confirmed_flush_lsn` passes the last transaction.
//! 2. **End to end**: concord drains a third slot of the same workload into a table of
//!    another database (PostgreSQL → concord → PostgreSQL), timed until every row and
//!    every update is in the target.
//! 3. **Latency**: a generator commits 50-row transactions every 10 ms (5,000 changes/s)
//!    for `BENCH_LATENCY_SECS` while concord streams them to the target; the latency of
//!    each row is the commit timestamp of the target row's transaction minus that of the
//!    source row's (`pg_xact_commit_timestamp(xmin)`, one server clock).
//! 4. **Memory**: one transaction inserts 1 GiB of rows (`BENCH_BIG_MB` to change it)
//!    and concord captures it; its peak RSS (`VmHWM`) is reported.
//!
//! `BENCH_RUNS` (default 3) runs of steps 1 and 2; medians are printed with every run.
//! `BENCH_BATCH` sets concord's `engine.batch_size` (default 1000).
//! `BENCH_WRITE_BATCH` sets the target system's `write_batch_size`, the outbox entries
//! per applier round (default: the configuration's default for PostgreSQL).
//! `BENCH_DURABLE_MS` sets concord's `state.durable_interval_ms` (group commit; default:
//! the configuration's default).

#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pg::{ClusterOptions, PgCluster, SUPERUSER, SUPERUSER_PASSWORD};
use tokio_postgres::Client;

const INSERTS: i64 = 200_000;
const UPDATES: i64 = 100_000;
const TX_ROWS: i64 = 1_000;
const TARGET_RATE: i64 = 5_000;
/// Rows per transaction of the steady generator, one every `TARGET_RATE / STEADY_TX_ROWS` s.
const STEADY_TX_ROWS: i64 = 50;

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "additionalProperties": false,
  "required": ["email"],
  "properties": {
    "email": { "type": "string" },
    "name": { "type": ["string", "null"] },
    "title": { "type": ["string", "null"] }
  }
}"#;

/// Used by the cluster harness to pick its port.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("local address")
        .port()
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

struct Bench {
    cluster: PgCluster,
    dir: PathBuf,
    concord: PathBuf,
    src: Client,
    dst: Client,
}

/// A concord configuration: one read link on `bench_src.<table>` with slot base `slot`,
/// and, when `sink` names a table, one write link to `bench_dst.<sink>`.
fn write_config(bench: &Bench, name: &str, table: &str, publication: &str, slot: &str, sink: Option<&str>) -> PathBuf {
    let dir = bench.dir.join(name);
    std::fs::create_dir_all(&dir).expect("config dir");
    std::fs::write(dir.join("pgpass"), SUPERUSER_PASSWORD).expect("password file");
    std::fs::write(dir.join("item.schema.json"), SCHEMA).expect("schema");
    let system = |db: &str| {
        format!(
            "host = \"127.0.0.1\"\nport = {}\ndatabase = \"{db}\"\nuser = \"{SUPERUSER}\"\npassword = {{ file = \"pgpass\" }}\ntls = \"disable\"",
            bench.cluster.port()
        )
    };
    let map = r#"map = [{ canonical = "email", system = "email" }, { canonical = "name", system = "name" }, { canonical = "title", system = "title" }]"#;
    let durable_ms = env_num("BENCH_DURABLE_MS", concord::config::DEFAULT_DURABLE_INTERVAL_MS);
    let batch_size = env_num("BENCH_BATCH", 1000);
    let mut toml = format!(
        r#"[state]
dir = "state"
durable_interval_ms = {durable_ms}

[admin]
listen = "127.0.0.1:{port}"

[engine]
batch_size = {batch_size}

[systems.src]
type = "postgres"
direction = "read"
{src}
slot = "{slot}"
publication = "{publication}"

[entities.item]
schema = "item.schema.json"
match_keys = ["email"]

[[links]]
system = "src"
entity = "item"
object = "{table}"
id_field = "id"
capture = {{ interval_secs = 10 }}
{map}
"#,
        port = free_port(),
        src = system("bench_src"),
    );
    if let Some(sink) = sink {
        let write_batch = match env_num("BENCH_WRITE_BATCH", 0) {
            0 => String::new(),
            n => format!("write_batch_size = {n}\n"),
        };
        toml.push_str(&format!(
            r#"
[systems.dst]
type = "postgres"
direction = "write"
{write_batch}{dst}

[[links]]
system = "dst"
entity = "item"
object = "{sink}"
id_field = "id"
{map}
"#,
            dst = system("bench_dst"),
        ));
    }
    let path = dir.join("concord.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

impl Bench {
    fn concord(&self, config: &Path, once: bool) -> Child {
        let mut cmd = Command::new(&self.concord);
        cmd.arg("run").arg("--config").arg(config);
        if once {
            cmd.arg("--once");
        }
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start concord")
    }

    /// Runs concord until idle: creates its slot and reads the (empty) table.
    async fn prepare(&self, config: &Path) {
        let status = self.concord(config, true).wait().expect("concord runs");
        assert!(status.success(), "concord run --once failed: {status}");
    }

    async fn confirmed_at_least(&self, slot: &str, lsn: &str) -> bool {
        let row = self
            .src
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .await
            .expect("read slot");
        row.get(0)
    }

    /// The source's insert position inside the current transaction: every record of a
    /// transaction that commits after this reads is before it, its commit after it.
    async fn insert_lsn(&self) -> String {
        self.src
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("wal position")
            .get(0)
    }
}

fn rss_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user and system, every thread) process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; count the fields after its ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, in clock ticks.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// Runs concord on `config` until `slot` confirms `lsn`; returns the seconds taken,
/// concord's peak RSS in MiB and the CPU seconds it used.
async fn drain_slot(bench: &Bench, config: &Path, slot: &str, lsn: &str) -> (f64, f64, f64) {
    let start = Instant::now();
    let child = bench.concord(config, false);
    let pid = child.id();
    while !bench.confirmed_at_least(slot, lsn).await {
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "concord never confirmed {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let peak = rss_kb(pid, "VmHWM:") as f64 / 1024.0;
    let cpu = cpu_secs(pid);
    stop(child);
    (secs, peak, cpu)
}

/// Commit time (µs since the epoch) of each row's transaction, by email.
async fn commit_times(client: &Client, table: &str) -> std::collections::HashMap<String, i64> {
    let sql = format!(
        "SELECT email, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::bigint FROM {table}
         WHERE email <> 'warmup@example.com'"
    );
    client
        .query(&sql, &[])
        .await
        .expect("commit timestamps")
        .into_iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

#[tokio::main]
async fn main() {
    let runs = env_num("BENCH_RUNS", 3).max(1) as usize;
    // End-to-end runs; 0 measures capture alone.
    let e2e_runs = (env_num("BENCH_E2E_RUNS", runs as u64) as usize).min(runs);
    let latency_secs = env_num("BENCH_LATENCY_SECS", 20);
    let big_mb = env_num("BENCH_BIG_MB", 1024) as i64;
    let concord = std::env::current_exe()
        .expect("own path")
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/examples")
        .join("concord");
    assert!(
        concord.exists(),
        "{} is missing: run cargo build --release first",
        concord.display()
    );
    let cluster = PgCluster::start(ClusterOptions {
        wal_level: "logical",
        extra_conf: vec![
            "track_commit_timestamp = on".into(),
            // PostgreSQL's default. The test harness turns it off for speed, and then a
            // walsender sees a commit only once the WAL writer flushes it (every
            // wal_writer_delay, 200 ms), which would measure the source's setting rather
            // than concord.
            "synchronous_commit = on".into(),
            "shared_buffers = '256MB'".into(),
            "max_wal_size = '8GB'".into(),
            "checkpoint_timeout = '30min'".into(),
        ],
    });
    let admin = cluster.superuser("postgres").await;
    for db in ["bench_src", "bench_dst"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
    }
    let src = cluster.superuser("bench_src").await;
    let dst = cluster.superuser("bench_dst").await;
    let dir = tempfile::tempdir().expect("work dir");
    let bench = Bench {
        dir: dir.path().to_path_buf(),
        cluster,
        concord,
        src,
        dst,
    };
    println!(
        "postgres connector benchmark: {INSERTS} inserts + {UPDATES} updates in transactions of {TX_ROWS}, {runs} runs"
    );

    // The workload and the slots that wait for it.
    bench
        .src
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, email text NOT NULL, name text, title text);
             ALTER TABLE items REPLICA IDENTITY FULL;
             CREATE PUBLICATION bench_pub FOR TABLE items;",
        )
        .await
        .expect("workload table");
    let mut capture_configs = Vec::new();
    let mut e2e_configs = Vec::new();
    for run in 1..=runs {
        bench
            .src
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&format!("recv{run}")],
            )
            .await
            .expect("pg_recvlogical slot");
        let config = write_config(
            &bench,
            &format!("capture{run}"),
            "items",
            "bench_pub",
            &format!("cap{run}"),
            None,
        );
        bench.prepare(&config).await;
        capture_configs.push(config);
        bench
            .dst
            .batch_execute(&format!(
                "CREATE TABLE copy{run} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text UNIQUE NOT NULL,
                                        name text, title text)"
            ))
            .await
            .expect("target table");
        let config = write_config(
            &bench,
            &format!("e2e{run}"),
            "items",
            "bench_pub",
            &format!("e2e{run}"),
            Some(&format!("copy{run}")),
        );
        bench.prepare(&config).await;
        e2e_configs.push(config);
    }
    let load = Instant::now();
    for tx in 0..INSERTS / TX_ROWS {
        let first = tx * TX_ROWS + 1;
        let last = first + TX_ROWS - 1;
        bench
            .src
            .batch_execute(&format!(
                "INSERT INTO items SELECT g, 'user' || g || '@example.com', 'Name ' || g, 'title ' || g
                 FROM generate_series({first}, {last}) g"
            ))
            .await
            .expect("insert");
    }
    let mut end_lsn = String::new();
    for tx in 0..UPDATES / TX_ROWS {
        let first = tx * TX_ROWS + 1;
        let last = first + TX_ROWS - 1;
        bench.src.batch_execute("BEGIN").await.expect("begin");
        bench
            .src
            .batch_execute(&format!(
                "UPDATE items SET title = 'updated ' || id WHERE id BETWEEN {first} AND {last}"
            ))
            .await
            .expect("update");
        end_lsn = bench.insert_lsn().await;
        bench.src.batch_execute("COMMIT").await.expect("commit");
    }
    let changes = (INSERTS + UPDATES) as f64;
    println!(
        "workload written in {:.1} s; last transaction after {end_lsn}",
        load.elapsed().as_secs_f64()
    );

    // 1. Capture, side by side.
    let bindir = pg::find_bindir();
    let mut recv_rates = Vec::new();
    let mut concord_rates = Vec::new();
    for run in 1..=runs {
        let start = Instant::now();
        let status = Command::new(bindir.join("pg_recvlogical"))
            .arg("-d")
            .arg(bench.cluster.conninfo("bench_src", SUPERUSER))
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .args(["-S", &format!("recv{run}"), "--start", "--no-loop", "-f", "/dev/null"])
            .arg(format!("--endpos={end_lsn}"))
            .args(["-o", "proto_version=1", "-o", "publication_names=bench_pub"])
            .status()
            .expect("run pg_recvlogical");
        assert!(status.success(), "pg_recvlogical failed: {status}");
        let recv = start.elapsed().as_secs_f64();
        let (secs, peak, cpu) =
            drain_slot(&bench, &capture_configs[run - 1], &format!("cap{run}_item"), &end_lsn).await;
        println!(
            "capture run {run}: pg_recvlogical {recv:.2} s ({:.0}/s), concord {secs:.2} s ({:.0}/s, {:.0}% of pg_recvlogical, peak RSS {peak:.0} MiB, CPU {:.1} µs/change)",
            changes / recv,
            changes / secs,
            100.0 * recv / secs,
            cpu * 1e6 / changes
        );
        recv_rates.push(changes / recv);
        concord_rates.push(changes / secs);
    }
    println!(
        "capture median: pg_recvlogical {:.0} changes/s, concord {:.0} changes/s ({:.0}%)",
        median(&recv_rates),
        median(&concord_rates),
        100.0 * median(&concord_rates) / median(&recv_rates)
    );

    // 2. End to end.
    let mut e2e_rates = Vec::new();
    for run in 1..=e2e_runs {
        let start = Instant::now();
        let child = bench.concord(&e2e_configs[run - 1], false);
        let query = format!("SELECT count(*), count(*) FILTER (WHERE title LIKE 'updated %') FROM copy{run}");
        loop {
            let row = bench.dst.query_one(&query, &[]).await.expect("count target");
            let (rows, updated): (i64, i64) = (row.get(0), row.get(1));
            if rows == INSERTS && updated == UPDATES {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(1800), "end to end never finished");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_secs(child.id());
        let peak = rss_kb(child.id(), "VmHWM:") as f64 / 1024.0;
        stop(child);
        println!(
            "end to end run {run}: {secs:.2} s, {:.0} changes/s, concord CPU {:.1} µs/change, peak RSS {peak:.0} MiB",
            changes / secs,
            cpu * 1e6 / changes
        );
        e2e_rates.push(changes / secs);
    }
    if !e2e_rates.is_empty() {
        println!("end to end median: {:.0} changes/s", median(&e2e_rates));
    }

    // 3. Latency under a steady rate.
    bench
        .src
        .batch_execute(
            "CREATE TABLE ticks (id bigint PRIMARY KEY, email text NOT NULL, name text, title text);
             ALTER TABLE ticks REPLICA IDENTITY FULL;
             CREATE PUBLICATION tick_pub FOR TABLE ticks;",
        )
        .await
        .expect("ticks table");
    bench
        .dst
        .batch_execute(
            "CREATE TABLE ticks_copy (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text UNIQUE NOT NULL,
                                     name text, title text)",
        )
        .await
        .expect("ticks target");
    let config = write_config(&bench, "latency", "ticks", "tick_pub", "lat", Some("ticks_copy"));
    let child = bench.concord(&config, false);
    bench
        .src
        .batch_execute("INSERT INTO ticks VALUES (0, 'warmup@example.com', 'w', 'w')")
        .await
        .expect("warm-up row");
    let start = Instant::now();
    loop {
        let n: i64 = bench
            .dst
            .query_one("SELECT count(*) FROM ticks_copy", &[])
            .await
            .expect("count")
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the warm-up row never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let period = Duration::from_secs_f64(STEADY_TX_ROWS as f64 / TARGET_RATE as f64);
    let total_tx = (latency_secs as f64 / period.as_secs_f64()) as i64;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    for tx in 0..total_tx {
        ticker.tick().await;
        let first = tx * STEADY_TX_ROWS + 1;
        let last = first + STEADY_TX_ROWS - 1;
        bench
            .src
            .batch_execute(&format!(
                "INSERT INTO ticks SELECT g, 't' || g || '@example.com', 'Name ' || g, 'title ' || g
                 FROM generate_series({first}, {last}) g"
            ))
            .await
            .expect("steady insert");
    }
    let generated = total_tx * STEADY_TX_ROWS;
    let rate = generated as f64 / start.elapsed().as_secs_f64();
    loop {
        let n: i64 = bench
            .dst
            .query_one("SELECT count(*) FROM ticks_copy", &[])
            .await
            .expect("count")
            .get(0);
        if n == generated + 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "the steady rows never all arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(child);
    let sources = commit_times(&bench.src, "ticks").await;
    let targets = commit_times(&bench.dst, "ticks_copy").await;
    let mut latencies: Vec<f64> = sources
        .iter()
        .filter_map(|(email, at)| targets.get(email).map(|t| (t - at) as f64 / 1000.0))
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "latency at {rate:.0} changes/s for {latency_secs} s ({} rows): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );

    // 4. Memory during one large transaction.
    bench
        .src
        .batch_execute(
            "CREATE TABLE blobs (id bigint PRIMARY KEY, email text NOT NULL, name text, title text);
             CREATE PUBLICATION blob_pub FOR TABLE blobs;",
        )
        .await
        .expect("blobs table");
    let config = write_config(&bench, "big", "blobs", "blob_pub", "big", None);
    bench.prepare(&config).await;
    // ~1,900-byte rows stay under the TOAST threshold, so the WAL carries them whole.
    let rows = big_mb * 1024 * 1024 / 1_900;
    let load = Instant::now();
    bench.src.batch_execute("BEGIN").await.expect("begin");
    let before = bench.insert_lsn().await;
    bench
        .src
        .batch_execute(&format!(
            "INSERT INTO blobs SELECT g, 'b' || g || '@example.com', 'Name ' || g, repeat(md5(g::text), 58)
             FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("large insert");
    let big_lsn = bench.insert_lsn().await;
    bench.src.batch_execute("COMMIT").await.expect("commit");
    let size: String = bench
        .src
        .query_one(
            "SELECT pg_size_pretty(pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn))",
            &[&big_lsn, &before],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    println!(
        "large transaction: {rows} rows of ~1,900 bytes written in {:.1} s ({size} of WAL)",
        load.elapsed().as_secs_f64()
    );
    let (secs, peak, _) = drain_slot(&bench, &config, "big_item", &big_lsn).await;
    println!(
        "large transaction captured in {secs:.1} s ({:.0} rows/s); concord peak RSS {peak:.0} MiB",
        rows as f64 / secs
    );
}
