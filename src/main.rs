//! The `concord` command: parse the command line, set up logging and metrics, load the
//! configuration, run, and turn the outcome into an exit code (0 ok, 1 failure,
//! 2 invalid configuration).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use concord::config::{self, Config};
use concord::engine::runtime::Runtime;
use concord::engine::{Engine, RunMode};
use concord::state::StateStore;

/// The merge path allocates and frees many small values per change; mimalloc serves
/// that pattern faster than glibc's allocator (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "concord", version, about = "Keeps business systems in agreement")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Stop once every source is drained and every outbox is empty.
        #[arg(long)]
        once: bool,
    },
    /// Check a configuration: syntax, references, schemas, and the setup of every
    /// PostgreSQL system it connects to. Exit 0 when valid, 2 when not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Check the configuration only; connect to no system.
        #[arg(long)]
        offline: bool,
    },
    /// Print the system inventory and the data-flow map.
    Plan {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Print the JSON Schema of the configuration file.
    ConfigSchema,
    /// Measure the merge path with generated records and an in-memory source.
    Bench {
        /// Records loaded into state first.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Updates merged against the loaded state, measured.
        #[arg(long, default_value_t = 200_000)]
        changes: u64,
        /// Changes per transaction (default: the engine's default batch size).
        #[arg(long)]
        batch_size: Option<usize>,
        /// State directory (default: a new temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Encrypt the state under a random in-memory key.
        #[arg(long)]
        encrypt: bool,
    },
    /// Offline operations on the state file (run while the daemon is stopped).
    State {
        #[command(subcommand)]
        command: concord::state_cli::StateCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Mermaid,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Check { config, offline } => match load_valid(&config) {
            Ok(cfg) => {
                if !offline && let Err(code) = preflight(cfg) {
                    return code;
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Plan { config, format } => match load_valid(&config) {
            Ok(cfg) => {
                let format = match format {
                    Format::Table => concord::plan::PlanFormat::Table,
                    Format::Mermaid => concord::plan::PlanFormat::Mermaid,
                };
                print!("{}", concord::plan::render(&cfg, format));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::ConfigSchema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&config::json_schema()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Run { config, once } => {
            let cfg = match load_valid(&config) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            let mode = if once { RunMode::UntilIdle } else { RunMode::Forever };
            report(run(cfg, mode, config))
        }
        Command::Bench {
            records,
            changes,
            batch_size,
            dir,
            encrypt,
        } => report(
            concord::bench::run(records, changes, batch_size, dir, encrypt).map(|r| {
                println!("{r}");
            }),
        ),
        Command::State { command } => report(concord::state_cli::run(command)),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONCORD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Loads and validates; on failure prints every problem and returns exit code 2.
fn load_valid(path: &std::path::Path) -> Result<Config, ExitCode> {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(error) => {
            eprintln!("{error}");
            return Err(ExitCode::from(2));
        }
    };
    let problems = config::validate(&cfg);
    if problems.is_empty() {
        return Ok(cfg);
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    eprintln!("{} problem(s) in {}", problems.len(), path.display());
    Err(ExitCode::from(2))
}

/// Connects to every PostgreSQL system and checks its setup; prints every finding, and
/// returns exit code 2 when any is an error.
fn preflight(cfg: Config) -> Result<(), ExitCode> {
    use concord::connector::postgres::preflight::{Severity, check_all};
    let any_postgres = cfg
        .systems
        .values()
        .any(|s| matches!(s.connector, config::ConnectorConfig::Postgres(_)));
    if !any_postgres {
        return Ok(());
    }
    let rt = match Runtime::compile(cfg) {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("{error}");
            return Err(ExitCode::from(2));
        }
    };
    let findings = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(tokio) => tokio.block_on(check_all(&rt)),
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return Err(ExitCode::FAILURE);
        }
    };
    for finding in &findings {
        eprintln!("{finding}");
    }
    let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
    if errors > 0 {
        eprintln!("{errors} problem(s) found by connecting to the systems");
        return Err(ExitCode::from(2));
    }
    Ok(())
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let mut builder = PrometheusBuilder::new();
    for name in concord::metrics::HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_string()), concord::metrics::LATENCY_BUCKETS)
            .context("histogram buckets")?;
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    concord::metrics::describe();
    Ok(handle)
}

/// How often the STATUS= line is refreshed.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How often `run` checks whether a freshly started engine is ready.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// What the signal task asks of the main loop.
enum Request {
    /// SIGTERM, SIGINT: stop gracefully.
    Stop,
    /// SIGHUP: reload configuration and secrets.
    Reload,
}

#[tokio::main]
async fn run(cfg: Config, mode: RunMode, config_path: PathBuf) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let notifier = concord::notify::Notifier::from_env().map(Arc::new);
    let notify = |f: &dyn Fn(&concord::notify::Notifier)| {
        if let Some(n) = &notifier {
            f(n);
        }
    };
    notify(&|n| n.status("starting"));
    let state_dir = cfg.base_dir.join(&cfg.state.dir);
    let cache_mb = cfg.state.cache_mb;
    let state_key = concord::state_cli::state_key(&cfg)?;
    let listen = cfg.admin.listen.clone();
    let admin_auth =
        concord::http::AdminAuth::from_config(&cfg.admin, &cfg.base_dir).context("preparing admin api access")?;
    let rt = Arc::new(Runtime::compile(cfg).context("preparing the configuration")?);
    let store = StateStore::open_with(&state_dir, cache_mb, state_key.as_ref()).context("opening the state store")?;
    let mut engine = Engine::new(rt.clone(), store.clone());
    if let Some(ms) = std::env::var("CONCORD_TEST_STALL_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tracing::warn!(after_ms = ms, "test hook: the heartbeat stops after the given time");
        engine.heartbeat().freeze_after(std::time::Duration::from_millis(ms));
    }
    let mut connectors = concord::connector::open_all(&rt, &store).context("opening connectors")?;

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the admin listener to {listen}"))?;
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(listen.clone()), "admin api listening");
    // Replays go to whichever engine runs now; the status handle is shared by every
    // engine of this process (see `Engine::succeeding`).
    let current = Arc::new(std::sync::Mutex::new(engine.clone()));
    let replay_engine = current.clone();
    let entity_names = concord::http::EntityNames::from(rt.entities.keys().cloned().collect::<Vec<_>>());
    let ctx = concord::http::AdminContext {
        store: store.clone(),
        status: engine.status(),
        metrics: Some(metrics.clone()),
        replay: Arc::new(move |id| {
            let engine = replay_engine.lock().unwrap_or_else(|p| p.into_inner()).clone();
            engine.replay(id)
        }),
        entities: entity_names.clone(),
        auth: admin_auth.clone(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let http_shutdown = stop.clone();
    let server = tokio::spawn(concord::http::serve(ctx, listener, async move {
        http_shutdown.cancelled().await
    }));

    let (requests_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(forward_signals(requests_tx));
    let upkeep = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => metrics.run_upkeep(),
                _ = upkeep.cancelled() => return,
            }
        }
    });
    // A note appended to the STATUS= line, e.g. after a failed reload.
    let note: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    if let Some(n) = &notifier {
        tokio::spawn(report_status(n.clone(), engine.status(), note.clone(), stop.clone()));
        if let Some(interval) = concord::notify::watchdog_interval() {
            tokio::spawn(feed_watchdog(n.clone(), engine.heartbeat(), interval, stop.clone()));
        }
    }

    'engines: loop {
        let run = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.run(connectors, mode).await })
        };
        tokio::pin!(run);
        let status = engine.status();
        let mut announced = false;
        loop {
            tokio::select! {
                _ = &mut run => break 'engines,
                _ = tokio::time::sleep(READY_POLL), if !announced => {
                    if status.snapshot().ready {
                        announced = true;
                        tracing::info!("ready");
                        notify(&|n| n.ready());
                    }
                }
                request = requests.recv() => match request {
                    None | Some(Request::Stop) => {
                        tracing::info!("shutdown requested; finishing the batch in hand");
                        notify(&|n| n.stopping());
                        engine.shutdown_token().cancel();
                        let _ = (&mut run).await;
                        break 'engines;
                    }
                    Some(Request::Reload) => {
                        // Admin tokens and the TLS certificate are re-read whatever the
                        // configuration reload decides; a failure keeps the previous ones.
                        if let Err(error) = admin_auth.reload() {
                            tracing::warn!(error = %error, "admin api secrets not reloaded; the previous ones stay in force");
                        }
                        let Some(new_rt) = reload_runtime(&config_path, &listen, &note, &status) else {
                            continue;
                        };
                        tracing::info!("reloading: finishing the batch in hand");
                        notify(&|n| n.reloading());
                        engine.shutdown_token().cancel();
                        let _ = (&mut run).await;
                        let next = Engine::succeeding(new_rt.clone(), store.clone(), &engine);
                        connectors = match concord::connector::open_all(&new_rt, &store) {
                            Ok(c) => c,
                            Err(error) => {
                                stop.cancel();
                                let _ = server.await;
                                return Err(anyhow::Error::new(error).context("reopening connectors after a reload"));
                            }
                        };
                        entity_names.set(new_rt.entities.keys().cloned().collect());
                        engine = next;
                        *current.lock().unwrap_or_else(|p| p.into_inner()) = engine.clone();
                        *note.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        engine.status().update(|s| {
                            s.last_reload = Some(concord::engine::status::ReloadOutcome {
                                time_ms: concord::model::now_ms(),
                                ok: true,
                                detail: "running the new configuration".into(),
                            })
                        });
                        tracing::info!("configuration reloaded");
                        continue 'engines;
                    }
                },
            }
        }
    }
    stop.cancel();
    if let Ok(Err(error)) = server.await {
        tracing::warn!(error = %error, "admin api stopped with an error");
    }
    Ok(())
}

/// Loads, validates and compiles the configuration again. On failure logs every
/// problem, records a note for STATUS= and returns `None`: the running engine goes on.
fn reload_runtime(
    path: &std::path::Path,
    listen: &str,
    note: &std::sync::Mutex<Option<String>>,
    status: &concord::engine::status::SharedStatus,
) -> Option<Arc<Runtime>> {
    tracing::info!(config = %path.display(), "reload requested");
    let failed = |why: String| {
        tracing::error!("reload failed: {why}; the previous configuration keeps running");
        status.update(|s| {
            s.last_reload = Some(concord::engine::status::ReloadOutcome {
                time_ms: concord::model::now_ms(),
                ok: false,
                detail: why.clone(),
            })
        });
        *note.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("reload failed ({why}); running the previous configuration"));
        None
    };
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(error) => {
            tracing::error!(error = %error, "cannot load the configuration");
            return failed("configuration unreadable".into());
        }
    };
    let problems = config::validate(&cfg);
    if !problems.is_empty() {
        for problem in &problems {
            tracing::error!(problem = %problem, "invalid configuration");
        }
        return failed(format!("{} problem(s) in the configuration", problems.len()));
    }
    if cfg.admin.listen != listen {
        tracing::warn!(
            running = %listen,
            configured = %cfg.admin.listen,
            "a reload does not move the admin listener; restart to change it"
        );
    }
    match Runtime::compile(cfg) {
        Ok(rt) => Some(Arc::new(rt)),
        Err(error) => {
            tracing::error!(error = %error, "cannot prepare the configuration");
            failed("configuration cannot be prepared".into())
        }
    }
}

/// Sends STATUS= with a one-line summary every [`STATUS_INTERVAL`].
async fn report_status(
    notifier: Arc<concord::notify::Notifier>,
    status: concord::engine::status::SharedStatus,
    note: Arc<std::sync::Mutex<Option<String>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let mut line = summary(&status.snapshot());
        if let Some(note) = note.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
            line = format!("{line}; {note}");
        }
        notifier.status(&line);
        tokio::select! {
            _ = tokio::time::sleep(STATUS_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// "6 records; 0 pending writes; 1 dead letter; links: hr idle, lms idle".
fn summary(status: &concord::engine::status::Status) -> String {
    if !status.ready {
        return "starting".into();
    }
    let pending: u64 = status.systems.values().map(|s| s.outbox_depth).sum();
    let dead: u64 = status.systems.values().map(|s| s.dlq_depth).sum();
    let links: Vec<String> = status
        .links
        .values()
        .map(|l| format!("{} {}", l.system, l.state))
        .collect();
    format!(
        "{} records; {pending} pending write{}; {dead} dead letter{}; links: {}",
        status.records,
        if pending == 1 { "" } else { "s" },
        if dead == 1 { "" } else { "s" },
        if links.is_empty() {
            "none".into()
        } else {
            links.join(", ")
        },
    )
}

/// Pings the watchdog at half its interval while the engine's heartbeat is younger
/// than the interval; a stalled engine stops the pings and systemd restarts it.
async fn feed_watchdog(
    notifier: Arc<concord::notify::Notifier>,
    heartbeat: concord::engine::status::Heartbeat,
    interval: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut warned = false;
    loop {
        if heartbeat.age() < interval {
            notifier.watchdog();
            warned = false;
        } else if !warned {
            tracing::error!(
                age_ms = heartbeat.age().as_millis() as u64,
                "the engine has made no progress within the watchdog interval; no longer pinging the watchdog"
            );
            warned = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval / 2) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Turns signals into requests for the main loop, for the life of the process.
async fn forward_signals(requests: tokio::sync::mpsc::UnboundedSender<Request>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        let request = tokio::select! {
            _ = term.recv() => Request::Stop,
            _ = int.recv() => Request::Stop,
            _ = hup.recv() => Request::Reload,
        };
        if requests.send(request).is_err() {
            return;
        }
    }
}
