//! `concord demo`: a CRM, an LMS and an HR export folder, simulated in this process on
//! loopback, kept in agreement by the daemon running the bundled configuration
//! (`examples/demo/concord.toml`) exactly as `concord run` would run it.
//!
//! The demo seeds a few dozen people, some known to several systems by the same email,
//! then keeps making the changes users make: a CRM user edits a job title (which HR
//! owns, so concord reverts it), types a phone number that is no phone number (the
//! change is dead-lettered), changes a phone number (CRM owns it); the LMS certifies
//! learners and a trainer retypes a name; HR changes titles and hires people in its
//! next export. Every few seconds it prints one line from the daemon's own status and
//! metrics endpoints.
//!
//! Everything it creates lives in one directory it names: the redb state, the HR inbox,
//! the simulators' credentials (referenced from the configuration by file, never
//! literal), and at the end `summary.json` with what each system holds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use crate::config::{self, Config};
use crate::daemon::{Hooks, Started};
use crate::engine::RunMode;
use crate::engine::status::Status;
use crate::sim::crm::{self, CrmOptions, CrmSim, NewContact};
use crate::sim::hr::{Employee, HrExport};
use crate::sim::lms::{self, LmsOptions, LmsSim, NewLearner};

/// The bundled configuration, relative to the repository root.
pub const DEFAULT_CONFIG: &str = "examples/demo/concord.toml";
/// Requests per second the simulated CRM admits before answering 429.
pub const DEFAULT_CRM_RATE: u32 = 20;
/// Time between two simulated user changes.
const TRICKLE_INTERVAL: Duration = Duration::from_millis(1500);
/// Time between two summary lines.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(3);
/// With `--seconds`, how long the systems must show no movement, after the changes
/// stop, before the demo calls them converged: longer than two poll intervals of the
/// bundled configuration.
const QUIET_FOR: Duration = Duration::from_secs(4);
/// With `--seconds`, how long the demo waits for the systems to converge.
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);
/// Where the simulated CRM and LMS listen when these ports are free; any free port
/// otherwise (the configuration's base URLs are pointed at whatever was bound).
const CRM_PORT: u16 = 18081;
const LMS_PORT: u16 = 18082;
/// Files in the demo directory.
const CRM_TOKEN_FILE: &str = "secrets/crm-token";
const LMS_KEY_FILE: &str = "secrets/lms-api-key";
const HR_INBOX: &str = "hr-inbox";
pub const SUMMARY_FILE: &str = "summary.json";

/// What `concord demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The demo configuration.
    pub config: PathBuf,
    /// The demo directory: must not exist or be empty. A new temporary directory (kept
    /// afterwards) when absent.
    pub dir: Option<PathBuf>,
    /// Requests per second the simulated CRM admits.
    pub crm_rate: u32,
    /// Stop after this long, wait for the systems to agree, write the summary.
    pub seconds: Option<u64>,
    /// Admin API address instead of the configuration's.
    pub listen: Option<String>,
}

/// Runs the demo on a fresh multi-threaded runtime until Ctrl-C or `--seconds`.
pub fn run(options: DemoOptions) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(options))
}

/// One seeded person: given name, family name, HR job title.
const PEOPLE: [(&str, &str, &str); 32] = [
    ("Ada", "Lovelace", "Analyst"),
    ("Alan", "Turing", "Head of Research"),
    ("Grace", "Hopper", "Engineering Manager"),
    ("Katherine", "Johnson", "Senior Analyst"),
    ("Edsger", "Dijkstra", "Principal Engineer"),
    ("Barbara", "Liskov", "Architect"),
    ("Donald", "Knuth", "Technical Writer"),
    ("Margaret", "Hamilton", "Director of Software"),
    ("John", "Backus", "Compiler Engineer"),
    ("Frances", "Allen", "Performance Engineer"),
    ("Dennis", "Ritchie", "Systems Engineer"),
    ("Radia", "Perlman", "Network Engineer"),
    ("Ken", "Thompson", "Systems Engineer"),
    ("Hedy", "Lamarr", "Product Manager"),
    ("Tim", "Berners-Lee", "Web Lead"),
    ("Annie", "Easley", "Data Engineer"),
    ("Niklaus", "Wirth", "Language Designer"),
    ("Shafi", "Goldwasser", "Security Lead"),
    ("Leslie", "Lamport", "Distributed Systems Lead"),
    ("Adele", "Goldberg", "UX Lead"),
    ("Claude", "Shannon", "Chief Scientist"),
    ("Evelyn", "Boyd", "Statistician"),
    ("Vint", "Cerf", "Partnerships"),
    ("Sophie", "Wilson", "Hardware Engineer"),
    ("Linus", "Torvalds", "Prospect"),
    ("Guido", "van Rossum", "Prospect"),
    ("Bjarne", "Stroustrup", "Prospect"),
    ("Anders", "Hejlsberg", "Prospect"),
    ("Jean", "Sammet", "Trainee"),
    ("Mary", "Keller", "Trainee"),
    ("Carol", "Shaw", "New Hire"),
    ("Joan", "Clarke", "New Hire"),
];
/// People whose title the CRM held differently from HR at the start (`i % 5 == 2`):
/// HR's title replaced the CRM's, so HR has set it, and a CRM user's later edit of it is
/// a non-owner change.
const TITLE_EDITED: [usize; 4] = [2, 7, 12, 17];
/// Learners whose given name the LMS held abbreviated at the start (`i % 4 == 1`),
/// replaced by HR's spelling, so HR has set it; a trainer's later retyping of the given
/// name is a non-owner change.
const NAME_RETYPED: [usize; 3] = [9, 13, 17];
/// People 0..HR_COUNT are employees; CRM holds 0..20 and the prospects 24..28; the LMS
/// holds 6..18 and the trainees 28..30; 30.. are hired by HR during the demo.
const HR_COUNT: usize = 24;

fn email(i: usize) -> String {
    let (first, last, _) = PEOPLE[i % PEOPLE.len()];
    format!(
        "{}.{}@example.com",
        first.to_lowercase(),
        last.to_lowercase().replace(' ', "-")
    )
}

fn employee_id(i: usize) -> String {
    format!("E{}", 1001 + i)
}

/// A user change the demo made, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub system: &'static str,
    /// `title_edit`, `invalid_phone`, `phone_change`, `certified`, `name_retyped`,
    /// `title_change`, `hire`.
    pub kind: &'static str,
    pub email: String,
}

/// The simulated systems of one demo run.
struct Systems {
    crm: CrmSim,
    lms: LmsSim,
    hr: HrExport,
    events: Vec<Event>,
    /// Next step of the change script.
    step: usize,
}

async fn start_simulators(dir: &Path, crm_rate: u32) -> anyhow::Result<Systems> {
    let crm_options = |port| CrmOptions {
        port,
        rate_limit: Some(crm_rate),
        ..CrmOptions::default()
    };
    let crm = match CrmSim::start(crm_options(CRM_PORT)).await {
        Ok(crm) => crm,
        Err(_) => CrmSim::start(crm_options(0))
            .await
            .context("starting the simulated CRM")?,
    };
    let lms = match LmsSim::start(LmsOptions {
        port: LMS_PORT,
        ..LmsOptions::default()
    })
    .await
    {
        Ok(lms) => lms,
        Err(_) => LmsSim::start(LmsOptions::default())
            .await
            .context("starting the simulated LMS")?,
    };
    let hr = HrExport::new(dir.join(HR_INBOX)).context("creating the HR inbox")?;
    Ok(Systems {
        crm,
        lms,
        hr,
        events: Vec::new(),
        step: 0,
    })
}

/// HR's first export: the employees as HR holds them.
fn seed_hr(systems: &mut Systems) -> anyhow::Result<()> {
    for (i, (first, last, title)) in PEOPLE.iter().enumerate().take(HR_COUNT) {
        systems.hr.upsert(Employee {
            employee_id: employee_id(i),
            first: (*first).into(),
            last: (*last).into(),
            email: email(i),
            job_title: (*title).into(),
        });
    }
    systems.hr.export().context("writing the first HR export")?;
    Ok(())
}

/// The CRM's and the LMS's first view of the people: many known to HR too, some only
/// to one of them, some spelled or titled differently.
fn seed_apps(systems: &mut Systems) {
    for i in (0..20).chain(24..28) {
        let (first, last, title) = PEOPLE[i];
        systems.crm.create(NewContact {
            // The CRM's own spelling differs for some; HR owns names and wins.
            first_name: Some(if i % 7 == 3 {
                first[..1].to_string()
            } else {
                first.to_string()
            }),
            last_name: Some(last.into()),
            email: Some(email(i)),
            phone: Some(format!("+1 415-555-{:04}", 100 + i)),
            title: Some(if i % 5 == 2 {
                "Sales contact".into()
            } else {
                title.into()
            }),
            certified: false,
        });
    }
    for i in (6..18).chain(28..30) {
        let (first, last, _) = PEOPLE[i];
        systems.lms.create(NewLearner {
            full_name: if i % 4 == 1 {
                format!("{}. {last}", &first[..1])
            } else {
                format!("{first} {last}")
            },
            email: email(i),
            certified: i % 3 == 0,
            completed_at: (i % 3 == 0).then(chrono::Utc::now),
        });
    }
}

/// Makes the next change of the script, as a user of that system would.
fn trickle(systems: &mut Systems) -> anyhow::Result<()> {
    let step = systems.step;
    systems.step += 1;
    let round = step / 7;
    let mut event = |system, kind, email| systems.events.push(Event { system, kind, email });
    match step % 7 {
        // A CRM user edits a job title; HR owns titles, so concord reverts it.
        0 => {
            let i = TITLE_EDITED[round % TITLE_EDITED.len()];
            if let Some(c) = systems.crm.find_by_email(&email(i))
                && systems.crm.edit(&c.id, "Title", Some("Chief Everything Officer"))
            {
                event("crm", "title_edit", email(i));
            }
        }
        // The LMS certifies a learner.
        1 => {
            let learners = systems.lms.live();
            if let Some(l) = learners.iter().filter(|l| !l.certified).nth(round % 3) {
                let at = lms::render_time(chrono::Utc::now());
                if systems.lms.edit(l.id, json!({"certified": true, "completed_at": at})) {
                    event("lms", "certified", l.email.clone());
                }
            }
        }
        // HR changes a job title in its next export.
        2 => {
            let i = (round * 5 + 1) % HR_COUNT;
            let title = format!("{} (level {})", PEOPLE[i].2, round + 2);
            if systems.hr.set_title(&employee_id(i), &title) {
                systems.hr.export().context("writing an HR export")?;
                event("hr", "title_change", email(i));
            }
        }
        // A CRM user types something that is no phone number: the change cannot be
        // mapped and goes to the dead-letter queue.
        3 => {
            let i = (round * 7 + 4) % 20;
            if let Some(c) = systems.crm.find_by_email(&email(i))
                && systems.crm.edit(&c.id, "Phone", Some("call reception"))
            {
                event("crm", "invalid_phone", email(i));
            }
        }
        // A CRM user fixes a phone number; CRM owns phones.
        4 => {
            let i = (round * 7 + 4) % 20;
            if let Some(c) = systems.crm.find_by_email(&email(i))
                && systems
                    .crm
                    .edit(&c.id, "Phone", Some(&format!("+44 20 7946 {:04}", 100 + round)))
            {
                event("crm", "phone_change", email(i));
            }
        }
        // A trainer retypes a learner's name; HR owns names, so concord reverts it.
        5 => {
            let i = NAME_RETYPED[round % NAME_RETYPED.len()];
            if let Some(l) = systems.lms.find_by_email(&email(i))
                && systems
                    .lms
                    .edit(l.id, json!({"full_name": shouted_first_name(&l.full_name)}))
            {
                event("lms", "name_retyped", email(i));
            }
        }
        // HR hires someone; they appear in the next export.
        _ => {
            let i = HR_COUNT + 6 + round;
            if i < PEOPLE.len() {
                let (first, last, title) = PEOPLE[i];
                systems.hr.upsert(Employee {
                    employee_id: employee_id(i),
                    first: first.into(),
                    last: last.into(),
                    email: email(i),
                    job_title: title.into(),
                });
                systems.hr.export().context("writing an HR export")?;
                event("hr", "hire", email(i));
            }
        }
    }
    Ok(())
}

/// "Frances Allen" → "FRANCES Allen": a trainer's retyping of the given name.
fn shouted_first_name(full_name: &str) -> String {
    match full_name.split_once(' ') {
        Some((first, rest)) => format!("{} {rest}", first.to_uppercase()),
        None => full_name.to_uppercase(),
    }
}

/// Creates the demo directory, or checks that a given one is empty.
fn prepare_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
                bail!(
                    "{} is not empty; the demo starts from nothing: name a new or empty directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir
        }
        None => tempfile::Builder::new()
            .prefix("concord-demo-")
            .tempdir()
            .context("creating the demo directory")?
            .keep(),
    };
    std::fs::create_dir_all(dir.join("secrets")).context("creating the secrets directory")?;
    Ok(std::fs::canonicalize(&dir).unwrap_or(dir))
}

/// Writes a credential file readable by its owner only.
fn write_secret(path: &Path, value: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(value.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Points the configuration at the demo directory and the simulators: relative paths
/// (state, inbox, credential files) resolve in `dir`, entity schemas stay where the
/// configuration names them, and the CRM and LMS base URLs are the bound addresses.
fn adapt(cfg: &mut Config, dir: &Path, systems: &Systems, listen: Option<String>) -> anyhow::Result<()> {
    let config_dir = std::path::absolute(&cfg.base_dir).context("resolving the configuration's directory")?;
    for entity in cfg.entities.values_mut() {
        entity.schema = config_dir.join(&entity.schema);
    }
    cfg.base_dir = dir.to_path_buf();
    if let Some(listen) = listen {
        cfg.admin.listen = listen;
    }
    set_base_url(cfg, "crm", &systems.crm.base_url())?;
    set_base_url(cfg, "lms", &systems.lms.base_url())?;
    Ok(())
}

fn set_base_url(cfg: &mut Config, system: &str, url: &str) -> anyhow::Result<()> {
    let Some(system_cfg) = cfg.systems.get_mut(system) else {
        bail!("the demo configuration has no system `{system}`");
    };
    match &mut system_cfg.connector {
        config::ConnectorConfig::Rest(rest) => rest.base_url = url.to_string(),
        other => bail!(
            "system `{system}` of the demo configuration is of type `{}`, not `rest`",
            other.type_name()
        ),
    }
    Ok(())
}

/// Counters read from the daemon's `/metrics`, summed over their labels.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counters {
    pub captured: f64,
    pub written: f64,
    pub conflicts: f64,
    pub reverts: f64,
    pub dead_letters: f64,
}

/// Sums the samples of the counters the summary line shows from a Prometheus text
/// exposition.
fn counters(exposition: &str) -> Counters {
    let mut c = Counters::default();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let slot = match name {
            crate::metrics::CHANGES_CAPTURED => &mut c.captured,
            crate::metrics::WRITES if labels.contains("outcome=\"ok\"") => &mut c.written,
            crate::metrics::CONFLICTS => &mut c.conflicts,
            crate::metrics::FIELD_REJECTIONS if labels.contains("policy=\"revert\"") => &mut c.reverts,
            crate::metrics::DEAD_LETTERS => &mut c.dead_letters,
            _ => continue,
        };
        *slot += value;
    }
    c
}

async fn read_counters(client: &reqwest::Client, admin: &str) -> Option<Counters> {
    let text = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(counters(&text))
}

fn summary_line(status: &Status, c: Counters, crm: &CrmSim) -> String {
    let dead: u64 = status.systems.values().map(|s| s.dlq_depth).sum();
    let pending: u64 = status.systems.values().map(|s| s.outbox_depth).sum();
    let mut line = format!(
        "{} records | captured {} | written {} | pending {pending} | conflicts {} | reverts {} | dead letters {dead}",
        status.records, c.captured, c.written, c.conflicts, c.reverts,
    );
    let throttled = crm.stats().throttled;
    if throttled > 0 {
        let _ = write!(line, " | crm 429s {throttled}");
    }
    line
}

/// What the systems show, compared over time to tell when they have settled.
fn movement(status: &Status, crm: &CrmSim, lms: &LmsSim) -> (u64, u64, u64, u64, u64) {
    let captured: u64 = status.links.values().map(|l| l.captured).sum();
    let written: u64 = status.systems.values().map(|s| s.writes_ok + s.writes_failed).sum();
    let pending: u64 = status.systems.values().map(|s| s.outbox_depth).sum();
    (
        status.records,
        captured,
        written,
        pending,
        crm.stats().writes_applied + lms.stats().writes_applied,
    )
}

/// Waits until nothing is pending and nothing has moved for [`QUIET_FOR`]; false when
/// [`SETTLE_DEADLINE`] passes first.
async fn settle(started: &Started, systems: &Systems) -> bool {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let mut last = None;
    let mut since = Instant::now();
    while Instant::now() < deadline {
        let status = started.status.snapshot();
        let now = movement(&status, &systems.crm, &systems.lms);
        if last != Some(now) || now.3 > 0 {
            last = Some(now);
            since = Instant::now();
        } else if since.elapsed() >= QUIET_FOR {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// `summary.json`: what every system holds, the daemon's status and counters, and the
/// changes the demo made.
fn write_summary(
    dir: &Path,
    systems: &Systems,
    status: &Status,
    counters: Option<Counters>,
    converged: Option<bool>,
) -> anyhow::Result<PathBuf> {
    let crm: Vec<_> = systems
        .crm
        .live()
        .into_iter()
        .map(|c| {
            json!({"Id": c.id, "FirstName": c.first_name, "LastName": c.last_name, "Email": c.email,
                   "Phone": c.phone, "Title": c.title, "Certified__c": c.certified})
        })
        .collect();
    let lms: Vec<_> = systems.lms.live().iter().map(lms::Learner::json).collect();
    let hr: Vec<_> = systems
        .hr
        .employees()
        .map(|e| json!({"employee_id": e.employee_id, "first": e.first, "last": e.last, "email": e.email, "job_title": e.job_title}))
        .collect();
    let stats = |s: crate::sim::RequestStats| {
        json!({"requests": s.requests, "writes_applied": s.writes_applied, "throttled": s.throttled,
               "server_errors": s.server_errors, "precondition_failed": s.precondition_failed})
    };
    let summary = json!({
        "converged": converged,
        "crm": {"url": systems.crm.base_url(), "contacts": crm, "requests": stats(systems.crm.stats())},
        "lms": {"url": systems.lms.base_url(), "learners": lms, "requests": stats(systems.lms.stats())},
        "hr": {"inbox": systems.hr.inbox(), "employees": hr},
        "events": systems.events,
        "status": status,
        "counters": counters,
    });
    let path = dir.join(SUMMARY_FILE);
    let text = serde_json::to_string_pretty(&summary).context("rendering the summary")?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

async fn run_async(options: DemoOptions) -> anyhow::Result<()> {
    let mut cfg = config::load(&options.config).with_context(|| {
        format!(
            "loading the demo configuration (run from the repository root, or pass --config {DEFAULT_CONFIG} with its path)"
        )
    })?;
    let dir = prepare_dir(options.dir)?;
    let mut systems = start_simulators(&dir, options.crm_rate).await?;
    write_secret(&dir.join(CRM_TOKEN_FILE), systems.crm.token())?;
    write_secret(&dir.join(LMS_KEY_FILE), systems.lms.api_key())?;
    seed_hr(&mut systems)?;
    seed_apps(&mut systems);
    adapt(&mut cfg, &dir, &systems, options.listen)?;
    let problems = config::validate(&cfg);
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bail!("the demo configuration is invalid:\n{}", list.join("\n"));
    }
    let state_dir = cfg.base_dir.join(&cfg.state.dir);

    let stop = tokio_util::sync::CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let hooks = Hooks {
        stop: Some(stop.clone()),
        started: Some(started_tx),
    };
    let daemon = tokio::spawn(crate::daemon::run(cfg, RunMode::Forever, options.config.clone(), hooks));
    let Ok(started) = started_rx.await else {
        return match daemon.await {
            Ok(Err(error)) => Err(error.context("starting the daemon")),
            _ => bail!("the daemon stopped before it started"),
        };
    };
    let admin = format!("http://{}", started.admin_addr);
    println!("concord demo: a simulated CRM, LMS and HR export kept in agreement");
    println!("  status        {admin}/api/v1/status");
    println!("  metrics       {admin}/metrics");
    println!("  dead letters  {admin}/api/v1/dlq");
    println!("  decisions     {admin}/api/v1/decisions");
    println!(
        "  CRM           {}{} (Salesforce-style; bearer token in {})",
        systems.crm.base_url(),
        crm::API_PATH,
        dir.join(CRM_TOKEN_FILE).display()
    );
    println!(
        "  LMS           {}{} (X-Api-Key in {})",
        systems.lms.base_url(),
        lms::API_PATH,
        dir.join(LMS_KEY_FILE).display()
    );
    println!("  HR inbox      {}", systems.hr.inbox().display());
    println!("  state (redb)  {}", state_dir.display());
    println!("Field authority: HR owns names and job titles, CRM owns phone, LMS owns certification.");
    match options.seconds {
        Some(s) => println!("Running for {s} seconds."),
        None => println!("Press Ctrl-C to stop."),
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the metrics client")?;
    let run_until = options
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut trickle_tick = tokio::time::interval(TRICKLE_INTERVAL);
    let mut summary_tick = tokio::time::interval(SUMMARY_INTERVAL);
    trickle_tick.tick().await;
    summary_tick.tick().await;
    tokio::pin!(daemon);
    let daemon_result = loop {
        let timer = async {
            match run_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut daemon => break Some(result),
            _ = timer => break None,
            _ = trickle_tick.tick() => {
                if started.status.snapshot().ready {
                    trickle(&mut systems)?;
                }
            }
            _ = summary_tick.tick() => {
                let status = started.status.snapshot();
                if status.ready {
                    let c = read_counters(&client, &admin).await.unwrap_or_default();
                    println!("{}", summary_line(&status, c, &systems.crm));
                }
            }
        }
    };
    let result = match daemon_result {
        // Ctrl-C: the daemon stopped on the signal.
        Some(result) => {
            let status = started.status.snapshot();
            let path = write_summary(&dir, &systems, &status, None, None)?;
            println!("stopped; what each system holds: {}", path.display());
            result.context("the daemon task failed")?
        }
        None => {
            println!("time is up: no more changes; waiting for the systems to agree");
            let converged = settle(&started, &systems).await;
            let status = started.status.snapshot();
            let c = read_counters(&client, &admin).await;
            println!("{}", summary_line(&status, c.unwrap_or_default(), &systems.crm));
            let path = write_summary(&dir, &systems, &status, c, Some(converged))?;
            println!(
                "{}; what each system holds: {}",
                if converged { "converged" } else { "not settled in time" },
                path.display()
            );
            stop.cancel();
            daemon.await.context("the daemon task failed")?
        }
    };
    systems.crm.stop();
    systems.lms.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_the_series_the_summary_shows() {
        let text = "# HELP concord_writes_total x\n\
            concord_writes_total{system=\"crm\",outcome=\"ok\"} 3\n\
            concord_writes_total{system=\"lms\",outcome=\"ok\"} 2\n\
            concord_writes_total{system=\"lms\",outcome=\"retry\"} 9\n\
            concord_field_rejections_total{field=\"title\",policy=\"revert\"} 1\n\
            concord_field_rejections_total{field=\"title\",policy=\"ignore\"} 4\n\
            concord_changes_captured_total{system=\"crm\"} 40\n\
            concord_dead_letters_total{system=\"crm\"} 1\n\
            concord_conflicts_total 2\n";
        let c = counters(text);
        assert_eq!(
            (c.captured, c.written, c.conflicts, c.reverts, c.dead_letters),
            (40.0, 5.0, 2.0, 1.0, 1.0)
        );
    }

    #[test]
    fn seeded_emails_are_distinct() {
        let mut emails: Vec<String> = (0..PEOPLE.len()).map(email).collect();
        emails.sort();
        emails.dedup();
        assert_eq!(emails.len(), PEOPLE.len());
    }
}
