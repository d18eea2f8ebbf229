//! `concord bench`: drives the merge path (map → validate → identify → merge → redb
//! commit → outbox) with generated records, the same code the capture tasks run, and
//! reports throughput, CPU and memory. No network and no files other than the state.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::config;
use crate::engine::batch;
use crate::engine::runtime::Runtime;
use crate::model::{ChangeKind, SourceRecord};
use crate::state::StateStore;

const CONTACT_SCHEMA: &str = include_str!("../schemas/contact.schema.json");

const BENCH_CONFIG: &str = r#"
[state]
dir = "state"

[systems.hr]
type = "file"
inbox = "inbox"
direction = "read"

[systems.crm]
type = "file"
export_dir = "out"
direction = "write"

[entities.contact]
schema = "contact.schema.json"
match_keys = ["email"]

[entities.contact.fields.title]
owners = ["hr"]

[[links]]
system = "hr"
entity = "contact"
object = "contacts-*.csv"
id_field = "id"
map = [
  { canonical = "email", system = "email", transforms = ["trim", "lower"] },
  { canonical = "first_name", system = "first" },
  { canonical = "last_name", system = "last" },
  { canonical = "title", system = "job_title" },
  { canonical = "phone", system = "phone", transforms = ["e164"] },
]

[[links]]
system = "crm"
entity = "contact"
object = "contacts"
id_field = "Id"
map = [
  { canonical = "email", system = "Email" },
  { canonical = "first_name", system = "FirstName" },
  { canonical = "last_name", system = "LastName" },
  { canonical = "title", system = "Title" },
  { canonical = "phone", system = "Phone" },
]
"#;

/// Figures of one benchmark run.
pub struct BenchReport {
    pub records: u64,
    pub changes: u64,
    pub batch_size: usize,
    pub durable_interval_ms: u64,
    pub cache_mb: u64,
    pub read_ahead: bool,
    /// Whether record values were sealed (AES-256-GCM).
    pub encrypted: bool,
    pub load_secs: f64,
    /// Time of the last tenth of the load, when the state already holds 90 % of the records.
    pub load_tail_secs: f64,
    pub update_secs: f64,
    pub update_cpu_secs: f64,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
    pub state_file_mb: f64,
    pub record_bytes: f64,
    pub decision_bytes: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "batch size                 {}", self.batch_size)?;
        writeln!(f, "durable interval           {} ms", self.durable_interval_ms)?;
        writeln!(f, "page cache                 {} MiB", self.cache_mb)?;
        writeln!(
            f,
            "read-ahead                 {}",
            if self.read_ahead { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "encryption at rest         {}",
            if self.encrypted { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "load                       {} records in {:.1} s = {:.0} changes/s",
            self.records,
            self.load_secs,
            self.records as f64 / self.load_secs
        )?;
        let tail = self.records - self.records * 9 / 10;
        writeln!(
            f,
            "  of which the last tenth  {} records in {:.1} s = {:.0} changes/s (state already holds {})",
            tail,
            self.load_tail_secs,
            tail as f64 / self.load_tail_secs,
            self.records * 9 / 10
        )?;
        writeln!(
            f,
            "updates over loaded state  {} changes in {:.1} s = {:.0} changes/s",
            self.changes,
            self.update_secs,
            self.changes as f64 / self.update_secs
        )?;
        writeln!(
            f,
            "cpu per update             {:.1} µs",
            self.update_cpu_secs * 1e6 / self.changes.max(1) as f64
        )?;
        writeln!(f, "rss after updates          {:.1} MB", self.rss_mb)?;
        writeln!(f, "peak rss                   {:.1} MB", self.peak_rss_mb)?;
        writeln!(f, "state file                 {:.1} MB", self.state_file_mb)?;
        write!(
            f,
            "encoded record / decision  {:.0} / {:.0} bytes",
            self.record_bytes, self.decision_bytes
        )
    }
}

fn record(n: u64, title_round: u64) -> SourceRecord {
    let mut fields = serde_json::Map::new();
    fields.insert("id".into(), format!("e{n}").into());
    fields.insert("email".into(), format!("User{n}@Example.com ").into());
    fields.insert("first".into(), format!("First{n}").into());
    fields.insert("last".into(), format!("Last{n}").into());
    fields.insert(
        "job_title".into(),
        format!("Engineer grade {}", (n + title_round) % 50).into(),
    );
    fields.insert(
        "phone".into(),
        format!("+1 (555) {:03}-{:04}", (n / 10_000) % 1000, n % 10_000).into(),
    );
    SourceRecord {
        local_id: format!("e{n}"),
        kind: ChangeKind::Upsert,
        fields,
        version: None,
        source_time_ms: Some(1_700_000_000_000 + title_round as i64),
    }
}

/// What to measure; also the arguments of `concord bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Records loaded into state first.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Updates merged against the loaded state, measured.
    #[arg(long, default_value_t = 200_000)]
    pub changes: u64,
    /// Changes per transaction (default: the engine's default batch size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Group commit interval in ms (default: the configuration's default); 0 makes every
    /// batch durable on its own.
    #[arg(long)]
    pub durable_interval_ms: Option<u64>,
    /// redb page cache in MiB (default: the configuration's default, `[state] cache_mb`).
    #[arg(long)]
    pub cache_mb: Option<u64>,
    /// Merge without reading each batch's rows ahead on a second thread.
    #[arg(long)]
    pub no_read_ahead: bool,
    /// State directory (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Encrypt the state under a random in-memory key.
    #[arg(long)]
    pub encrypt: bool,
}

/// Runs the benchmark. Batches commit as a capture task commits them (group commit
/// with the configured interval), and each phase ends with a durable commit, inside the
/// measured time.
pub fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    let BenchOptions {
        records,
        changes,
        batch_size,
        durable_interval_ms,
        cache_mb,
        no_read_ahead,
        dir,
        encrypt,
    } = options;
    let temp;
    let dir = match dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new()
                .prefix("concord-bench")
                .tempdir()
                .context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("contact.schema.json"), CONTACT_SCHEMA)?;
    let mut cfg = config::parse(BENCH_CONFIG).context("bench configuration")?;
    cfg.base_dir = dir.clone();
    if let Some(size) = batch_size {
        cfg.engine.batch_size = size;
    }
    if let Some(ms) = durable_interval_ms {
        cfg.state.durable_interval_ms = ms;
    }
    if let Some(mb) = cache_mb {
        cfg.state.cache_mb = mb;
    }
    let durable_interval = std::time::Duration::from_millis(cfg.state.durable_interval_ms);
    let batch_size = cfg.engine.batch_size;
    let cache_mb = cfg.state.cache_mb;
    let rt = Runtime::compile(cfg).context("bench runtime")?;
    let kek = encrypt.then(crate::state::Kek::random);
    let store = StateStore::open_with(&dir.join("state"), cache_mb, kek.as_ref())?;
    store.set_durable_interval(durable_interval);
    store.set_read_ahead(!no_read_ahead);
    let link = rt.link("hr", "contact").context("bench link")?;

    let feed = |range: Vec<u64>, round: u64| -> anyhow::Result<f64> {
        let started = Instant::now();
        for chunk in range.chunks(batch_size) {
            let batch: Vec<SourceRecord> = chunk.iter().map(|&n| record(n, round)).collect();
            batch::commit(&store, &rt, link, &batch, &[], Some(&serde_json::json!(chunk[0])), true)?;
        }
        store.make_durable()?;
        Ok(started.elapsed().as_secs_f64())
    };

    let head = records * 9 / 10;
    let load_head_secs = feed((0..head).collect(), 0)?;
    let load_tail_secs = feed((head..records).collect(), 0)?;
    let load_secs = load_head_secs + load_tail_secs;
    // Updates touch records spread over the whole key space, in a fixed pseudo-random
    // order (a multiplicative hash), so the cache cannot hold the working set.
    let picks: Vec<u64> = (0..changes)
        .map(|i| (i.wrapping_mul(2_654_435_761)) % records.max(1))
        .collect();
    let cpu_before = cpu_seconds();
    let update_secs = feed(picks, 1)?;
    let update_cpu_secs = cpu_seconds() - cpu_before;
    let (rss_mb, peak_rss_mb) = rss_mb();
    let (record_bytes, decision_bytes) = sample_sizes(&store)?;
    let state_file_mb = std::fs::metadata(store.path())
        .map(|m| m.len() as f64 / 1_048_576.0)
        .unwrap_or(0.0);
    Ok(BenchReport {
        records,
        changes,
        batch_size,
        durable_interval_ms: durable_interval.as_millis() as u64,
        cache_mb,
        read_ahead: !no_read_ahead,
        encrypted: encrypt,
        load_secs,
        load_tail_secs,
        update_secs,
        update_cpu_secs,
        rss_mb,
        peak_rss_mb,
        state_file_mb,
        record_bytes,
        decision_bytes,
    })
}

/// Mean stored size (unsealed) of the records and of the latest decisions.
fn sample_sizes(store: &StateStore) -> anyhow::Result<(f64, f64)> {
    let view = store.read()?;
    let records = view.first_records("contact", 1000)?;
    let sample: Vec<usize> = records
        .iter()
        .map(|(_, r)| crate::state::encoding::encode_record(r).len())
        .collect();
    let decisions = view.decisions(&Default::default(), 1000)?;
    let dsample: Vec<usize> = decisions
        .iter()
        .map(|d| serde_json::to_vec(d).map(|v| v.len()).unwrap_or(0))
        .collect();
    let mean = |v: &[usize]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<usize>() as f64 / v.len() as f64
        }
    };
    Ok((mean(&sample), mean(&dsample)))
}

/// Current and peak resident set size in MB, from /proc/self/status.
fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User plus system CPU time of this process.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
