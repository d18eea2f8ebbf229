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
    /// Check a configuration: syntax, references, schemas. Exit 0 when valid, 2 when not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
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
        Command::Check { config } => match load_valid(&config) {
            Ok(_) => {
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
            report(run(cfg, if once { RunMode::UntilIdle } else { RunMode::Forever }))
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

#[tokio::main]
async fn run(cfg: Config, mode: RunMode) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let state_dir = cfg.base_dir.join(&cfg.state.dir);
    let cache_mb = cfg.state.cache_mb;
    let state_key = concord::state_cli::state_key(&cfg)?;
    let listen = cfg.admin.listen.clone();
    let rt = Arc::new(Runtime::compile(cfg).context("preparing the configuration")?);
    let store = StateStore::open_with(&state_dir, cache_mb, state_key.as_ref()).context("opening the state store")?;
    let engine = Engine::new(rt.clone(), store.clone());
    let connectors = concord::connector::open_all(&rt, &store).context("opening connectors")?;

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the admin listener to {listen}"))?;
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(listen), "admin api listening");
    let replay_engine = engine.clone();
    let ctx = concord::http::AdminContext {
        store: store.clone(),
        status: engine.status(),
        metrics: Some(metrics.clone()),
        replay: Arc::new(move |id| replay_engine.replay(id)),
        entities: rt.entities.keys().cloned().collect(),
    };
    let shutdown = engine.shutdown_token();
    let http_shutdown = shutdown.clone();
    let server = tokio::spawn(concord::http::serve(ctx, listener, async move {
        http_shutdown.cancelled().await
    }));

    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing the batch in hand");
        signals.cancel();
    });
    let upkeep = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => metrics.run_upkeep(),
                _ = upkeep.cancelled() => return,
            }
        }
    });

    engine.run(connectors, mode).await;
    shutdown.cancel();
    if let Ok(Err(error)) = server.await {
        tracing::warn!(error = %error, "admin api stopped with an error");
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
