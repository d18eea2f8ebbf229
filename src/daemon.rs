//! The daemon's main loop, shared by `concord run` and `concord demo`: open the state
//! store and the connectors, serve the admin API, run the engine, turn signals into a
//! graceful stop (SIGTERM, SIGINT) or a configuration reload (SIGHUP), and keep the
//! service manager informed (READY=, STATUS=, the watchdog).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{self, Config};
use crate::engine::runtime::Runtime;
use crate::engine::status::SharedStatus;
use crate::engine::{Engine, RunMode};
use crate::state::StateStore;

/// What a caller that embeds the daemon may ask of it.
#[derive(Default)]
pub struct Hooks {
    /// Cancelled to stop the daemon as SIGTERM would.
    pub stop: Option<tokio_util::sync::CancellationToken>,
    /// Told once the admin API listens and the engine is starting.
    pub started: Option<tokio::sync::oneshot::Sender<Started>>,
}

/// The running daemon, as [`Hooks::started`] reports it.
#[derive(Debug, Clone)]
pub struct Started {
    /// Where the admin API (status, metrics) answers.
    pub admin_addr: SocketAddr,
    /// The engine's live status.
    pub status: SharedStatus,
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let mut builder = PrometheusBuilder::new();
    for name in crate::metrics::HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_string()), crate::metrics::LATENCY_BUCKETS)
            .context("histogram buckets")?;
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    crate::metrics::describe();
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

/// Runs the daemon until SIGTERM or SIGINT (or [`Hooks::stop`]), reloading on SIGHUP.
/// This is `concord run`; `concord demo` runs it too, with hooks.
pub async fn run(cfg: Config, mode: RunMode, config_path: PathBuf, hooks: Hooks) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
    let notify = |f: &dyn Fn(&crate::notify::Notifier)| {
        if let Some(n) = &notifier {
            f(n);
        }
    };
    notify(&|n| n.status("starting"));
    let state_dir = cfg.base_dir.join(&cfg.state.dir);
    let cache_mb = cfg.state.cache_mb;
    let state_key = crate::state_cli::state_key(&cfg)?;
    let listen = cfg.admin.listen.clone();
    let admin_auth =
        crate::http::AdminAuth::from_config(&cfg.admin, &cfg.base_dir).context("preparing admin api access")?;
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
    let mut connectors = crate::connector::open_all(&rt, &store).context("opening connectors")?;

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the admin listener to {listen}"))?;
    let admin_addr = listener.local_addr().context("reading the admin listener's address")?;
    tracing::info!(listen = %admin_addr, "admin api listening");
    // Replays go to whichever engine runs now; the status handle is shared by every
    // engine of this process (see `Engine::succeeding`).
    let current = Arc::new(std::sync::Mutex::new(engine.clone()));
    let replay_engine = current.clone();
    let entity_names = crate::http::EntityNames::from(rt.entities.keys().cloned().collect::<Vec<_>>());
    let ctx = crate::http::AdminContext {
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
    let server = tokio::spawn(crate::http::serve(ctx, listener, async move {
        http_shutdown.cancelled().await
    }));

    let (requests_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    if let Some(stop) = hooks.stop {
        let requests = requests_tx.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            let _ = requests.send(Request::Stop);
        });
    }
    tokio::spawn(forward_signals(requests_tx));
    if let Some(started) = hooks.started {
        let _ = started.send(Started {
            admin_addr,
            status: engine.status(),
        });
    }
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
        if let Some(interval) = crate::notify::watchdog_interval() {
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
                        connectors = match crate::connector::open_all(&new_rt, &store) {
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
                            s.last_reload = Some(crate::engine::status::ReloadOutcome {
                                time_ms: crate::model::now_ms(),
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
    status: &crate::engine::status::SharedStatus,
) -> Option<Arc<Runtime>> {
    tracing::info!(config = %path.display(), "reload requested");
    let failed = |why: String| {
        tracing::error!("reload failed: {why}; the previous configuration keeps running");
        status.update(|s| {
            s.last_reload = Some(crate::engine::status::ReloadOutcome {
                time_ms: crate::model::now_ms(),
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
    notifier: Arc<crate::notify::Notifier>,
    status: crate::engine::status::SharedStatus,
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
fn summary(status: &crate::engine::status::Status) -> String {
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
    notifier: Arc<crate::notify::Notifier>,
    heartbeat: crate::engine::status::Heartbeat,
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
