//! `concord bench-rest`: measures the REST connector against the in-process simulators
//! over loopback, with the connector's own code (`RestSource`, `RestSink`,
//! `RestClient`): records captured per second from a CRM backlog, writes applied per
//! second to an LMS with bounded concurrency, concord's CPU per record, and, with a
//! request budget configured, the share of the budget a backlog uses and the 429s
//! concord causes.
//!
//! The simulators run on a runtime of their own threads (`bench-sim`), concord's side on
//! another (`bench-concord`), so the CPU of each is read apart from
//! `/proc/self/task/*/stat`. The merge path is measured by `concord bench`; this bench
//! stops at the connector's seam.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::config::{self, Config, ConnectorConfig, LinkConfig};
use crate::connector::ErrorClass;
use crate::connector::rest::{RestClient, RestSink, RestSource};
use crate::model::{GlobalId, Write, WriteOp};
use crate::sim::crm::{CrmOptions, CrmSim, NewContact};
use crate::sim::lms::{LmsOptions, LmsSim, NewLearner};

const CONTACT_SCHEMA: &str = include_str!("../schemas/contact.schema.json");

/// Thread name prefixes: `/proc/<pid>/task/<tid>/comm` keeps 15 bytes.
const SIM_THREADS: &str = "bench-sim";
const CONCORD_THREADS: &str = "bench-concord";
/// Records the source is asked for at once, as the engine asks.
const BATCH: usize = 1000;
/// The CRM's page size (its maximum).
const CRM_PAGE: usize = 2000;
/// The LMS's page size in the budget run: small pages make many requests.
const BUDGET_PAGE: usize = 10;

/// What to measure; also the arguments of `concord bench-rest`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestBenchOptions {
    /// Contacts in the CRM backlog the source captures.
    #[arg(long, default_value_t = 50_000)]
    pub records: usize,
    /// Creates applied to the LMS.
    #[arg(long, default_value_t = 20_000)]
    pub writes: usize,
    /// Writes in flight at once (`max_concurrency`).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Requests per second of the budget run (the LMS's limit and concord's
    /// `rate_limit.per_second`).
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Seconds of backlog the budget run is sized for.
    #[arg(long, default_value_t = 10)]
    pub rate_seconds: u32,
    /// Times each measurement is repeated; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// One run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    capture_per_s: f64,
    capture_cpu_us: f64,
    capture_sim_cpu_us: f64,
    writes_per_s: f64,
    write_cpu_us: f64,
    write_sim_cpu_us: f64,
    budget_used: f64,
    budget_requests: u64,
    budget_429: u64,
}

/// Medians over the runs, and every run.
#[derive(Debug, Clone)]
pub struct RestBenchReport {
    options: RestBenchOptions,
    runs: Vec<Run>,
}

impl RestBenchReport {
    fn median(&self, f: impl Fn(&Run) -> f64) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

impl fmt::Display for RestBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "rest bench: {} records captured, {} writes at concurrency {}, budget {} req/s; {} runs (medians)",
            o.records, o.writes, o.concurrency, o.rate, o.runs
        )?;
        for (i, r) in self.runs.iter().enumerate() {
            writeln!(
                f,
                "  run {}: capture {:.0} rec/s ({:.1} us cpu/rec, sim {:.1}); writes {:.0}/s ({:.1} us cpu/write, sim {:.1}); budget {:.1}% of {} req/s, {} requests, {} x 429",
                i + 1,
                r.capture_per_s,
                r.capture_cpu_us,
                r.capture_sim_cpu_us,
                r.writes_per_s,
                r.write_cpu_us,
                r.write_sim_cpu_us,
                r.budget_used * 100.0,
                o.rate,
                r.budget_requests,
                r.budget_429
            )?;
        }
        let capture = self.median(|r| r.capture_per_s);
        let writes = self.median(|r| r.writes_per_s);
        let budget = self.median(|r| r.budget_used);
        let throttled = self.runs.iter().map(|r| r.budget_429).max().unwrap_or(0);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        writeln!(
            f,
            "capture:  {capture:.0} records/s (target >= 10000: {}); concord cpu {:.1} us/record, simulator {:.1} us/record",
            verdict(capture >= 10_000.0),
            self.median(|r| r.capture_cpu_us),
            self.median(|r| r.capture_sim_cpu_us)
        )?;
        writeln!(
            f,
            "writes:   {writes:.0} writes/s at concurrency {} (target >= 5000: {}); concord cpu {:.1} us/write, simulator {:.1} us/write",
            o.concurrency,
            verdict(writes >= 5_000.0),
            self.median(|r| r.write_cpu_us),
            self.median(|r| r.write_sim_cpu_us)
        )?;
        write!(
            f,
            "budget:   {:.1}% of {} req/s used during a backlog (target >= 90%: {}); 429s from the limit: {} at most in a run (target 0: {})",
            budget * 100.0,
            o.rate,
            verdict(budget >= 0.9),
            throttled,
            verdict(throttled == 0)
        )
    }
}

/// Runs the bench; see the module doc.
pub fn run(options: RestBenchOptions) -> anyhow::Result<RestBenchReport> {
    if options.records == 0 || options.writes == 0 || options.rate == 0 || options.runs == 0 {
        bail!("records, writes, rate and runs must be > 0");
    }
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(SIM_THREADS)
        .enable_all()
        .build()
        .context("starting the simulators' runtime")?;
    let concord_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(CONCORD_THREADS)
        .enable_all()
        .build()
        .context("starting concord's runtime")?;
    let mut runs = Vec::with_capacity(options.runs);
    for _ in 0..options.runs {
        let mut run = Run::default();
        capture(&options, &sim_rt, &concord_rt, &mut run)?;
        writes(&options, &sim_rt, &concord_rt, &mut run)?;
        budget(&options, &sim_rt, &concord_rt, &mut run)?;
        runs.push(run);
    }
    Ok(RestBenchReport { options, runs })
}

/// Runs `work` as a task of `rt` (so it runs on the runtime's named threads, not on
/// the calling one).
fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    work: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    rt.block_on(rt.spawn(work)).context("a bench task panicked")?
}

fn capture(
    o: &RestBenchOptions,
    sim_rt: &tokio::runtime::Runtime,
    concord_rt: &tokio::runtime::Runtime,
    run: &mut Run,
) -> anyhow::Result<()> {
    let crm = sim_rt
        .block_on(CrmSim::start(CrmOptions::default()))
        .context("starting the CRM simulator")?;
    for n in 0..o.records {
        crm.create(NewContact {
            first_name: Some(format!("First{n}")),
            last_name: Some(format!("Last{n}")),
            email: Some(format!("p{n}@example.com")),
            phone: Some(format!("+1555{n:07}")),
            title: Some("Engineer".into()),
            certified: n % 2 == 0,
        });
    }
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let cfg = bench_config(dir.path(), &crm.base_url(), "http://127.0.0.1:9", None)?;
    let (client, objects, link) = rest_parts(&cfg, "crm")?;
    let expected = o.records;
    let cpu0 = thread_cpu()?;
    let start = Instant::now();
    let captured = on(concord_rt, async move {
        let mut source = RestSource::open(client, &objects, &link, None, Default::default)?;
        let mut n = 0usize;
        while let Some(batch) = source.next_batch(BATCH).await? {
            n += batch.records.len();
            if !batch.rejects.is_empty() {
                bail!("{} records were rejected", batch.rejects.len());
            }
        }
        Ok(n)
    })?;
    let elapsed = start.elapsed();
    let cpu = thread_cpu()?.since(&cpu0);
    if captured != expected {
        bail!("captured {captured} records of {expected}");
    }
    run.capture_per_s = captured as f64 / elapsed.as_secs_f64();
    run.capture_cpu_us = cpu.concord.as_secs_f64() * 1e6 / captured as f64;
    run.capture_sim_cpu_us = cpu.sim.as_secs_f64() * 1e6 / captured as f64;
    crm.stop();
    Ok(())
}

fn writes(
    o: &RestBenchOptions,
    sim_rt: &tokio::runtime::Runtime,
    concord_rt: &tokio::runtime::Runtime,
    run: &mut Run,
) -> anyhow::Result<()> {
    let lms = sim_rt
        .block_on(LmsSim::start(LmsOptions::default()))
        .context("starting the LMS simulator")?;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let cfg = bench_config(dir.path(), "http://127.0.0.1:9", &lms.base_url(), None)?;
    let (client, objects, link) = rest_parts(&cfg, "lms")?;
    let concurrency = o.concurrency;
    let writes: Vec<Write> = (0..o.writes)
        .map(|n| Write {
            seq: n as u64 + 1,
            entity: "contact".into(),
            global_id: GlobalId::new_v7(),
            op: WriteOp::Create,
            local_id: None,
            object: "learners".into(),
            fields: json!({"full_name": format!("First{n} Last{n}"), "email": format!("w{n}@example.com"), "certified": n % 3 == 0})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            expected_version: None,
        })
        .collect();
    let total = writes.len();
    let cpu0 = thread_cpu()?;
    let start = Instant::now();
    let acked = on(concord_rt, async move {
        let mut sink = RestSink::open(client, &objects, [&link], concurrency)?;
        let mut acked = 0usize;
        let mut writes = writes;
        while !writes.is_empty() {
            let rest = writes.split_off(writes.len().min(BATCH));
            let chunk = std::mem::replace(&mut writes, rest);
            for result in sink.apply(chunk).await {
                result?;
                acked += 1;
            }
        }
        Ok(acked)
    })?;
    let elapsed = start.elapsed();
    let cpu = thread_cpu()?.since(&cpu0);
    let held = lms.live().len();
    if acked != total || held != total {
        bail!("{acked} writes acknowledged and {held} learners held, of {total}");
    }
    run.writes_per_s = acked as f64 / elapsed.as_secs_f64();
    run.write_cpu_us = cpu.concord.as_secs_f64() * 1e6 / acked as f64;
    run.write_sim_cpu_us = cpu.sim.as_secs_f64() * 1e6 / acked as f64;
    lms.stop();
    Ok(())
}

fn budget(
    o: &RestBenchOptions,
    sim_rt: &tokio::runtime::Runtime,
    concord_rt: &tokio::runtime::Runtime,
    run: &mut Run,
) -> anyhow::Result<()> {
    let lms = sim_rt
        .block_on(LmsSim::start(LmsOptions {
            rate_limit: Some(o.rate),
            ..LmsOptions::default()
        }))
        .context("starting the LMS simulator")?;
    let records = o.rate as usize * o.rate_seconds as usize * BUDGET_PAGE;
    for n in 0..records {
        lms.create(NewLearner {
            full_name: format!("First{n} Last{n}"),
            email: format!("b{n}@example.com"),
            certified: false,
            completed_at: None,
        });
    }
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let cfg = bench_config(dir.path(), "http://127.0.0.1:9", &lms.base_url(), Some(o.rate))?;
    let (client, objects, link) = rest_parts(&cfg, "lms")?;
    let before = lms.stats();
    let start = Instant::now();
    let captured = on(concord_rt, async move {
        let mut source = RestSource::open(client, &objects, &link, None, Default::default)?;
        let mut n = 0usize;
        loop {
            match source.next_batch(BATCH).await {
                Ok(Some(batch)) => n += batch.records.len(),
                Ok(None) => break,
                // A 429 is transient: the engine would retry; so does the bench.
                Err(e) if e.class == ErrorClass::Transient => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    })?;
    let elapsed = start.elapsed();
    let after = lms.stats();
    if captured != records {
        bail!("captured {captured} learners of {records}");
    }
    let requests = after.requests - before.requests;
    run.budget_requests = requests;
    run.budget_429 = after.rate_limited - before.rate_limited;
    // The first request may go at once; each later one takes a slot of the budget.
    run.budget_used = (requests.saturating_sub(1)) as f64 / (o.rate as f64 * elapsed.as_secs_f64());
    lms.stop();
    Ok(())
}

/// A configuration with the CRM's contacts and the LMS's learners, as the demo has
/// them; `rate` sets the LMS's request budget.
fn bench_config(dir: &Path, crm_url: &str, lms_url: &str, rate: Option<u32>) -> anyhow::Result<Config> {
    std::fs::create_dir_all(dir.join("secrets")).context("creating the secrets directory")?;
    std::fs::write(dir.join("secrets/crm-token"), CrmOptions::default().token).context("writing a secret")?;
    std::fs::write(dir.join("secrets/lms-api-key"), LmsOptions::default().api_key).context("writing a secret")?;
    std::fs::write(dir.join("contact.schema.json"), CONTACT_SCHEMA).context("writing the schema")?;
    let lms_rate = rate.map_or(String::new(), |r| {
        format!("rate_limit = {{ per_second = {r}, burst = 1 }}")
    });
    let per_page = if rate.is_some() { BUDGET_PAGE } else { 100 };
    let text = format!(
        r#"
[state]
dir = "state"

[systems.crm]
type = "rest"
base_url = "{crm_url}"
auth = {{ method = "bearer", token = {{ file = "secrets/crm-token" }} }}
headers = {{ "Sforce-Query-Options" = "batchSize={CRM_PAGE}" }}

[systems.crm.objects.Contact]
list = {{ path = "/services/data/v60.0/query" }}
records = "/records"
ignore_fields = ["attributes"]
pagination = {{ style = "next_url", pointer = "/nextRecordsUrl" }}
cursor = {{ field = "LastModifiedDate", param = "q", format = "rfc3339", lookback_secs = 2, template = "SELECT Id, FirstName, LastName, Email, Phone, Title, Certified__c, LastModifiedDate FROM Contact WHERE LastModifiedDate >= {{cursor}} ORDER BY LastModifiedDate, Id" }}

[systems.lms]
type = "rest"
base_url = "{lms_url}"
auth = {{ method = "api_key", header = "X-Api-Key", key = {{ file = "secrets/lms-api-key" }} }}
{lms_rate}

[systems.lms.objects.learners]
list = {{ path = "/api/v1/learners", query = {{ per_page = "{per_page}" }} }}
records = ""
pagination = {{ style = "link_header" }}
cursor = {{ field = "updated_at", param = "updated_since", format = "rfc3339_millis", lookback_secs = 2 }}
write = {{ create_path = "/api/v1/learners", item_path = "/api/v1/learners/{{id}}", update_method = "patch", created_id = "/id" }}

[entities.contact]
schema = "contact.schema.json"
match_keys = ["email"]

[[links]]
system = "crm"
entity = "contact"
object = "Contact"
id_field = "Id"
version_field = "LastModifiedDate"
map = [
  {{ canonical = "email", system = "Email" }},
  {{ canonical = "first_name", system = "FirstName" }},
]

[[links]]
system = "lms"
entity = "contact"
object = "learners"
id_field = "id"
version_field = "updated_at"
map = [
  {{ canonical = "email", system = "email" }},
]
"#
    );
    let mut cfg = config::parse(&text).context("the bench configuration")?;
    cfg.base_dir = dir.to_path_buf();
    Ok(cfg)
}

/// The client, objects and link of `system` in `cfg`.
fn rest_parts(
    cfg: &Config,
    system: &str,
) -> anyhow::Result<(
    RestClient,
    BTreeMap<String, crate::connector::rest::RestObjectConfig>,
    LinkConfig,
)> {
    let sys = cfg.systems.get(system).context("a system of the bench configuration")?;
    let ConnectorConfig::Rest(rest) = &sys.connector else {
        bail!("system {system} is not a rest system");
    };
    let client = RestClient::new(system, sys, rest, &cfg.base_dir)?;
    let link = cfg
        .links
        .iter()
        .find(|l| l.system == system)
        .context("a link of the bench system")?
        .clone();
    Ok((client, rest.objects.clone(), link))
}

/// CPU time of the simulators' and concord's threads.
struct ThreadCpu {
    sim: Duration,
    concord: Duration,
}

impl ThreadCpu {
    fn since(&self, before: &ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            sim: self.sim.saturating_sub(before.sim),
            concord: self.concord.saturating_sub(before.concord),
        }
    }
}

/// Sums user and system time of this process's threads by name, from
/// `/proc/self/task/<tid>/stat` (fields 14 and 15, in clock ticks).
fn thread_cpu() -> anyhow::Result<ThreadCpu> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let mut cpu = ThreadCpu {
        sim: Duration::ZERO,
        concord: Duration::ZERO,
    };
    for entry in std::fs::read_dir("/proc/self/task").context("reading /proc/self/task")? {
        let Ok(entry) = entry else { continue };
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state is field 3, so utime (14) and stime (15) are at 11, 12.
        let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
            continue;
        };
        let t = (utime.parse::<u64>().unwrap_or(0) + stime.parse::<u64>().unwrap_or(0)) as f64 / ticks;
        let t = Duration::from_secs_f64(t);
        if name.starts_with(SIM_THREADS) {
            cpu.sim += t;
        } else if name.starts_with(CONCORD_THREADS) {
            cpu.concord += t;
        }
    }
    Ok(cpu)
}
