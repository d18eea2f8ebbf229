//! The `concord` command: parse the command line, set up logging and metrics, load the
//! configuration, run, and turn the outcome into an exit code (0 ok, 1 failure,
//! 2 invalid configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use concord::config::{self, Config};
use concord::engine::RunMode;

/// mimalloc, with plain `malloc` calls for the alignments it always gives
/// (`concord::alloc`).
#[global_allocator]
static ALLOCATOR: concord::alloc::Allocator = concord::alloc::Allocator;

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
    Bench(concord::bench::BenchOptions),
    /// Measure the REST connector against the in-process simulators over loopback.
    BenchRest(concord::bench_rest::RestBenchOptions),
    /// Start a simulated CRM, LMS and HR export and keep them in agreement, live.
    Demo {
        /// Directory for the demo's state, HR inbox and credentials; new or empty
        /// (default: a new temporary directory, kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Requests per second the simulated CRM admits before answering 429.
        #[arg(long, default_value_t = concord::demo::DEFAULT_CRM_RATE)]
        crm_rate: u32,
        /// Stop after this many seconds, let the systems settle, write summary.json.
        #[arg(long)]
        seconds: Option<u64>,
        /// The demo configuration.
        #[arg(long, short, default_value = concord::demo::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Admin API address instead of the configuration's (`127.0.0.1:0` for any port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Ask a PostgreSQL link to read its table again: now if the daemon runs, at its next
    /// start otherwise. The request travels in the database's WAL.
    Resnapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// The link, as `<system>.<entity>` (e.g. `app.contact`).
        #[arg(long)]
        link: String,
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
    // The demo prints its own live summary; the daemon's info lines would bury it.
    init_tracing(if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    });
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
        Command::Bench(options) => report(concord::bench::run(options).map(|r| println!("{r}"))),
        Command::BenchRest(options) => report(concord::bench_rest::run(options).map(|r| println!("{r}"))),
        Command::Resnapshot { config, link } => match load_valid(&config) {
            Ok(cfg) => report(resnapshot(&cfg, &link)),
            Err(code) => code,
        },
        Command::State { command } => report(concord::state_cli::run(command)),
        Command::Demo {
            dir,
            crm_rate,
            seconds,
            config,
            listen,
        } => report(concord::demo::run(concord::demo::DemoOptions {
            config,
            dir,
            crm_rate,
            seconds,
            listen,
        })),
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

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONCORD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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

/// `concord run`: the daemon on a multi-threaded runtime.
fn run(cfg: Config, mode: RunMode, config_path: PathBuf) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(concord::daemon::run(
            cfg,
            mode,
            config_path,
            concord::daemon::Hooks::default(),
        ))
}

/// `concord resnapshot`: writes the request and says where it is.
fn resnapshot(cfg: &Config, link: &str) -> anyhow::Result<()> {
    let requested = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(concord::connector::postgres::resnapshot::request(cfg, link))?;
    println!(
        "re-snapshot of {} requested at {}: link {link} reads the table again when its stream reaches it",
        requested.table, requested.lsn
    );
    Ok(())
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
    let rt = match concord::engine::runtime::Runtime::compile(cfg) {
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
