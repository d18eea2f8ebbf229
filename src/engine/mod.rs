//! The engine runs the flows: one capture task per capturing link, one applier per
//! writing system, a maintenance task (retention, gauges) and the group-commit task.
//!
//! A capture task takes a batch from its source, merges it in one redb write
//! transaction (see [`batch`]), and only once that commit is durable tells the source it
//! may acknowledge upstream. Commits are grouped (`StateStore::write_batch`): within the
//! durable interval a batch commits without an fsync, and the acknowledgement waits for
//! the durable commit that covers it. redb has one writer at a time, so batches from
//! different links are serialised at the state store, and merges of one record never
//! interleave.
//!
//! Shutdown (SIGTERM, SIGINT) cancels a token: capture tasks finish the batch in hand
//! (merge, commit, make durable, acknowledge) and stop; appliers finish the sink call in
//! hand and record its results; the group-commit task makes what is left durable; then
//! `run` returns.
//!
//! `status.ready` turns true only once every capture task, applier and the maintenance
//! task has begun running. The heartbeat ([`status::Heartbeat`]) is bumped by the
//! maintenance task every [`HEARTBEAT_INTERVAL`] and by capture tasks on every
//! iteration; the daemon pings systemd's watchdog only while it is fresh.

mod apply;
mod backoff;
pub mod batch;
pub mod runtime;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::connector::{AnySink, AnySource, Checkpoint, ErrorClass};
use crate::merge::WriteAction;
use crate::metrics as m;
use crate::model::now_ms;
use crate::state::{CommitToken, DeadItem, StateStore};

pub use backoff::Backoff;
use runtime::Runtime;
use status::{Heartbeat, SharedStatus};

/// How long `run` goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Until shutdown is requested.
    Forever,
    /// Until every source is drained and every outbox is empty (or shutdown).
    UntilIdle,
}

/// The connectors the engine drives: sources by link index, sinks by system.
#[derive(Default)]
pub struct Connectors {
    pub sources: Vec<(usize, AnySource)>,
    pub sinks: BTreeMap<String, AnySink>,
}

/// State shared by the engine's tasks.
pub(crate) struct Shared {
    pub rt: Arc<Runtime>,
    pub store: StateStore,
    pub status: SharedStatus,
    pub heartbeat: Heartbeat,
    pub shutdown: CancellationToken,
    wakers: BTreeMap<String, Arc<Notify>>,
}

impl Shared {
    fn waker(&self, system: &str) -> Arc<Notify> {
        self.wakers.get(system).cloned().unwrap_or_default()
    }
    fn wake(&self, system: &str) {
        if let Some(w) = self.wakers.get(system) {
            w.notify_one();
        }
    }
}

/// What replaying a dead letter did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum ReplayOutcome {
    /// A change was merged again.
    Merged,
    /// A change failed again; it is a new dead letter.
    DeadLetteredAgain { id: u64 },
    /// A write was queued again.
    Requeued { seq: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("dead letter {0} not found")]
    NotFound(u64),
    #[error("dead letter {0} is an unreadable source item; fix the source and resend it")]
    NotReplayable(u64),
    #[error("no link for system {system} and entity {entity}")]
    NoLink { system: String, entity: String },
    #[error("state store failure")]
    State(#[from] crate::state::StateError),
}

/// A running engine's handle.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    pub fn new(rt: Arc<Runtime>, store: StateStore) -> Engine {
        Engine::with_handles(rt, store, SharedStatus::default(), Heartbeat::default())
    }

    /// An engine for a reloaded configuration that reports through the previous
    /// engine's status and heartbeat, so the admin API and the watchdog keep watching
    /// the running engine across a reload. The status starts afresh.
    pub fn succeeding(rt: Arc<Runtime>, store: StateStore, previous: &Engine) -> Engine {
        let status = previous.status();
        status.update(|s| *s = status::Status::default());
        Engine::with_handles(rt, store, status, previous.heartbeat())
    }

    fn with_handles(rt: Arc<Runtime>, store: StateStore, status: SharedStatus, heartbeat: Heartbeat) -> Engine {
        let wakers = rt
            .writing_systems()
            .into_iter()
            .map(|s| (s, Arc::new(Notify::new())))
            .collect();
        status.update(|s| {
            s.version = env!("CARGO_PKG_VERSION");
            s.started_ms = now_ms();
        });
        store.set_durable_interval(Duration::from_millis(rt.config.state.durable_interval_ms));
        Engine {
            shared: Arc::new(Shared {
                rt,
                store,
                status,
                heartbeat,
                shutdown: CancellationToken::new(),
                wakers,
            }),
        }
    }

    pub fn status(&self) -> SharedStatus {
        self.shared.status.clone()
    }

    /// When the engine last made progress.
    pub fn heartbeat(&self) -> Heartbeat {
        self.shared.heartbeat.clone()
    }

    pub fn store(&self) -> &StateStore {
        &self.shared.store
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.rt
    }

    /// Cancelling this token stops the engine gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Runs every flow until shutdown (or, in [`RunMode::UntilIdle`], until idle).
    pub async fn run(&self, connectors: Connectors, mode: RunMode) {
        let shared = self.shared.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let mut idle_flags = Vec::new();
        // Each task adds a permit as its first step; readiness waits for all of them.
        let started = Arc::new(Semaphore::new(0));
        let expected = connectors.sources.len() + connectors.sinks.len() + 1;
        for (index, source) in connectors.sources {
            let idle = Arc::new(AtomicBool::new(false));
            idle_flags.push(idle.clone());
            let (shared, started) = (shared.clone(), started.clone());
            tasks.spawn(async move {
                started.add_permits(1);
                capture(shared, index, source, idle).await
            });
        }
        for (system, sink) in connectors.sinks {
            let (shared, started) = (shared.clone(), started.clone());
            tasks.spawn(async move {
                started.add_permits(1);
                apply::run(shared, system, sink).await
            });
        }
        {
            let (shared, started) = (shared.clone(), started.clone());
            tasks.spawn(async move {
                started.add_permits(1);
                maintenance(shared).await
            });
        }
        tasks.spawn(group_commit(shared.clone()));
        let all = u32::try_from(expected).expect("fewer than 2^32 engine tasks");
        tokio::select! {
            _ = started.acquire_many(all) => shared.status.update(|s| s.ready = true),
            _ = shared.shutdown.cancelled() => {}
        }
        tracing::info!(links = shared.rt.links.len(), "engine started");

        if mode == RunMode::UntilIdle {
            let watcher = shared.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = watcher.shutdown.cancelled() => return,
                    }
                    if idle_flags.iter().all(|f| f.load(Ordering::SeqCst)) && outboxes_empty(&watcher).await {
                        tracing::info!("every source drained and every outbox empty; stopping");
                        watcher.shutdown.cancel();
                        return;
                    }
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(error = %error, "engine task failed");
            }
        }
        shared.status.update(|s| s.ready = false);
        tracing::info!("engine stopped");
    }

    /// Replays one dead letter: a change goes through mapping and merge again, a write
    /// is queued again. Blocking; call from a blocking thread.
    pub fn replay(&self, id: u64) -> Result<ReplayOutcome, ReplayError> {
        let shared = &self.shared;
        let now = now_ms();
        let outcome = shared.store.write(|t| {
            let letter = t.take_dead_letter(id)?.ok_or(ReplayError::NotFound(id))?;
            match letter.item {
                DeadItem::Reject { .. } => Err(ReplayError::NotReplayable(id)),
                DeadItem::Write { mut entry } => {
                    // The write carries the values agreed when it was planned. Send what
                    // is agreed now: a replay must not undo a change made since.
                    if let WriteAction::Upsert { fields } = &mut entry.action {
                        if let Some(state) = t.record(&entry.entity, entry.global_id)? {
                            for (name, value) in fields.iter_mut() {
                                if let Some(agreed) = state.base.value(name) {
                                    value.clone_from(agreed);
                                }
                            }
                        }
                    }
                    entry.attempts = 0;
                    entry.last_error = None;
                    entry.enqueued_ms = now;
                    let seq = t.enqueue(entry)?;
                    Ok((ReplayOutcome::Requeued { seq }, Some(letter.system)))
                }
                DeadItem::Change { record } => {
                    let link = shared
                        .rt
                        .link(&letter.system, &letter.entity)
                        .ok_or_else(|| ReplayError::NoLink {
                            system: letter.system.clone(),
                            entity: letter.entity.clone(),
                        })?;
                    let report = batch::process(&shared.rt, t, link, std::slice::from_ref(&record), &[], None, now)?;
                    if let Some(&id) = report.dead_letter_ids.first() {
                        Ok((ReplayOutcome::DeadLetteredAgain { id }, None))
                    } else {
                        for system in &report.wake {
                            shared.wake(system);
                        }
                        Ok((ReplayOutcome::Merged, None))
                    }
                }
            }
        });
        let (outcome, wake) = outcome?;
        if let Some(system) = wake {
            shared.wake(&system);
        }
        Ok(outcome)
    }
}

async fn outboxes_empty(shared: &Arc<Shared>) -> bool {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let Ok(view) = shared.store.read() else { return false };
        shared
            .wakers
            .keys()
            .all(|s| view.outbox_depth(s).map(|d| d == 0).unwrap_or(false))
    })
    .await
    .unwrap_or(false)
}

/// A batch's commit as its blocking task returns it: the result and how long it took.
type Committed = (
    Result<(batch::BatchReport, CommitToken), crate::state::StateError>,
    Duration,
);

/// A batch being committed on a blocking thread while its source reads on.
struct InFlight {
    commit: tokio::task::JoinHandle<Committed>,
    checkpoint: Checkpoint,
}

/// Captures from one link until shutdown or a fatal error.
///
/// A source that waits for data on a stream (PostgreSQL) reads the next batch while the
/// previous one is committed ([`AnySource::gather_during`]): the read gathers what
/// arrives until that commit has finished, so the batch sizes itself to the commit and
/// the server never waits on a full socket. Commits stay in order, one at a time, and
/// a batch's result is handled before the next batch is committed.
async fn capture(shared: Arc<Shared>, index: usize, mut source: AnySource, idle: Arc<AtomicBool>) {
    let link = &shared.rt.links[index];
    let name = link.name.clone();
    let system = link.config.system.clone();
    let interval = Duration::from_secs(link.config.capture.as_ref().map(|c| c.interval_secs).unwrap_or(10));
    let cfg = &shared.rt.config.engine;
    let mut backoff = Backoff::new(cfg.backoff_min_ms, cfg.backoff_max_ms);
    shared.status.link(&name, |s| {
        s.link = name.clone();
        s.system = system.clone();
        s.entity = link.config.entity.clone();
        s.state = "running".into();
    });
    metrics::gauge!(m::LINK_UP, m::LABEL_LINK => name.clone()).set(1.0);
    // A source that can go on before it is acknowledged has its batches committed
    // lazily (group commit) and is acknowledged once they are durable.
    let lazy = source.acknowledgement_may_wait();
    let mut unacked: Option<(CommitToken, Checkpoint)> = None;
    let mut in_flight: Option<InFlight> = None;
    // The stream caught up with the last commit: a read beside it found nothing (see
    // `EARLY_DURABLE_SHARE`).
    let mut caught_up = false;

    while !shared.shutdown.is_cancelled() {
        shared.heartbeat.bump();
        if let Some((token, _)) = &unacked
            && shared.store.is_durable(*token)
        {
            let (_, checkpoint) = unacked.take().expect("checked above");
            acknowledge(&shared, &mut source, &name, &system, &checkpoint).await;
        }
        // A checkpoint waiting for the group commit is acknowledged when that commit is
        // due, or sooner once the stream has caught up: a source that waits for data
        // answers by then, and an empty answer makes the batches durable and
        // acknowledges them (below).
        source.limit_wait(unacked.as_ref().map(|_| {
            let due = shared.store.durable_due_in();
            if caught_up {
                due.min(early_due_in(&shared.store))
            } else {
                due
            }
        }));
        let fetch_started = Instant::now();
        let batch = source.next_batch(cfg.batch_size).await;
        let fetched = fetch_started.elapsed();
        let lag = source.lag_seconds();
        metrics::gauge!(m::SOURCE_LAG, m::LABEL_SYSTEM => system.clone(), m::LABEL_ENTITY => link.config.entity.clone()).set(lag);
        shared.status.link(&name, |s| s.lag_seconds = lag);
        let committed_before = in_flight.is_some();
        if let Some(flight) = in_flight.take()
            && !settle(&shared, &mut source, &name, &system, flight, &mut unacked).await
        {
            return;
        }
        match batch {
            Ok(Some(batch)) => {
                caught_up = false;
                idle.store(false, Ordering::SeqCst);
                tracing::debug!(link = %name, records = batch.records.len(), fetch_us = fetched.as_micros() as u64, "batch read");
                let checkpoint = batch.checkpoint.clone();
                let (done, commit_done) = tokio::sync::oneshot::channel();
                let commit = {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || {
                        let link = &shared.rt.links[index];
                        let started = Instant::now();
                        let result = batch::commit(
                            &shared.store,
                            &shared.rt,
                            link,
                            &batch.records,
                            &batch.rejects,
                            Some(&batch.checkpoint),
                            lazy,
                        );
                        let took = started.elapsed();
                        let _ = done.send(());
                        (result, took)
                    })
                };
                let flight = InFlight { commit, checkpoint };
                if lazy && source.waits_for_data() {
                    source.gather_during(commit_done);
                    in_flight = Some(flight);
                } else if !settle(&shared, &mut source, &name, &system, flight, &mut unacked).await {
                    return;
                }
                backoff.reset();
            }
            Ok(None) if committed_before => {
                // The read ran beside the commit, all of it, and nothing came: between
                // transactions, the source has caught up. The next read then waits only
                // until a quarter interval after the last durable commit (not at all,
                // when that has passed), and its empty answer makes the batches durable
                // and acknowledges them (below), not when the group commit is next due.
                caught_up = unacked.is_some() && source.between_transactions();
            }
            Ok(None) => {
                caught_up = false;
                // Caught up: make the last batches durable and acknowledge them now
                // rather than leave the source waiting for the next batch.
                if let Some((token, checkpoint)) = unacked.take()
                    && !flush_and_acknowledge(&shared, &mut source, &name, &system, &checkpoint).await
                {
                    unacked = Some((token, checkpoint));
                }
                // A poll that found nothing new is a success too: the source answers.
                metrics::gauge!(m::LAST_SUCCESS, m::LABEL_SYSTEM => system.clone()).set(now_ms() as f64 / 1000.0);
                idle.store(true, Ordering::SeqCst);
                shared.status.link(&name, |s| s.state = "idle".into());
                if source.waits_for_data() {
                    // The source has just waited on its stream; calling again is the wait.
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
            Err(error) => {
                note_link_error(&shared, &name, &system, error.class, &error.reason);
                if error.class == ErrorClass::Fatal {
                    stop_link(&shared, &name, &error.reason);
                    return;
                }
                let delay = backoff.next_delay().max(error.retry_after.unwrap_or_default());
                shared.status.link(&name, |s| s.state = "backing_off".into());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
        }
    }
    if let Some(flight) = in_flight.take()
        && !settle(&shared, &mut source, &name, &system, flight, &mut unacked).await
    {
        return;
    }
    if let Some((_, checkpoint)) = unacked.take() {
        // Stopping: a failed flush leaves the batches to be delivered again.
        flush_and_acknowledge(&shared, &mut source, &name, &system, &checkpoint).await;
    }
    shared.status.link(&name, |s| s.state = "stopped".into());
}

/// Waits for a batch's commit and handles its result: wakes the appliers it gave work,
/// updates status, and acknowledges its checkpoint once durable (or keeps it in
/// `unacked` until then; a later checkpoint covers the earlier ones). A failed commit
/// stops the link: false.
async fn settle(
    shared: &Shared,
    source: &mut AnySource,
    name: &str,
    system: &str,
    flight: InFlight,
    unacked: &mut Option<(CommitToken, Checkpoint)>,
) -> bool {
    match flight.commit.await {
        Ok((Ok((report, token)), took)) => {
            tracing::debug!(
                link = %name,
                records = report.captured,
                commit_us = took.as_micros() as u64,
                "batch committed"
            );
            for target in &report.wake {
                shared.wake(target);
            }
            let now = now_ms();
            shared.status.link(name, |s| {
                s.captured += report.captured;
                s.dead_lettered += report.dead_lettered;
                s.last_success_ms = Some(now);
                s.state = "running".into();
            });
            metrics::gauge!(m::LAST_SUCCESS, m::LABEL_SYSTEM => system.to_string()).set(now as f64 / 1000.0);
            if shared.store.is_durable(token) {
                *unacked = None;
                acknowledge(shared, source, name, system, &flight.checkpoint).await;
            } else {
                *unacked = Some((token, flight.checkpoint));
            }
            true
        }
        Ok((Err(error), _)) => {
            tracing::error!(link = %name, error = %error, "cannot commit a batch; the link stops");
            stop_link(shared, name, "state store commit failed");
            false
        }
        Err(join) => {
            tracing::error!(link = %name, error = %join, "batch task failed; the link stops");
            stop_link(shared, name, "batch processing failed");
            false
        }
    }
}

/// Tells the source that `checkpoint` is durably committed, so it may acknowledge
/// upstream.
async fn acknowledge(shared: &Shared, source: &mut AnySource, name: &str, system: &str, checkpoint: &Checkpoint) {
    if let Err(error) = source.committed(checkpoint).await {
        // The checkpoint is committed; the source acknowledges it again on its next
        // call, so only the acknowledgement is late.
        note_link_error(shared, name, system, error.class, &error.reason);
    }
}

/// Makes the lazy commits durable, then acknowledges `checkpoint`. When the state store
/// cannot commit, the acknowledgement is left out (false): the caller keeps the
/// checkpoint for a later try, and a crash makes the source deliver the batches again.
async fn flush_and_acknowledge(
    shared: &Arc<Shared>,
    source: &mut AnySource,
    name: &str,
    system: &str,
    checkpoint: &Checkpoint,
) -> bool {
    let store = shared.store.clone();
    match tokio::task::spawn_blocking(move || store.make_durable()).await {
        Ok(Ok(())) => {
            acknowledge(shared, source, name, system, checkpoint).await;
            true
        }
        Ok(Err(error)) => {
            tracing::error!(link = %name, error = %error, "cannot make batches durable");
            false
        }
        Err(join) => {
            tracing::error!(link = %name, error = %join, "durable commit task failed");
            false
        }
    }
}

/// Group commit: lazy batch commits become durable at the latest one durable interval
/// after the last durable commit, even when no further batch comes to carry them.
async fn group_commit(shared: Arc<Shared>) {
    loop {
        let interval = shared.store.durable_interval();
        let wait = if interval.is_zero() {
            Duration::from_secs(1)
        } else {
            shared.store.durable_due_in()
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
            _ = shared.shutdown.cancelled() => break,
        }
        if shared.store.durable_pending() && shared.store.last_durable().elapsed() >= interval {
            let store = shared.store.clone();
            if let Ok(Err(error)) = tokio::task::spawn_blocking(move || store.make_durable()).await {
                tracing::error!(error = %error, "cannot make batches durable");
            }
        }
    }
    // Whatever is still lazy becomes durable before the engine stops.
    let store = shared.store.clone();
    if let Ok(Err(error)) = tokio::task::spawn_blocking(move || store.make_durable()).await {
        tracing::error!(error = %error, "cannot make batches durable at shutdown");
    }
}

fn note_link_error(shared: &Shared, name: &str, system: &str, class: ErrorClass, reason: &str) {
    tracing::warn!(link = %name, class = class.as_str(), reason = %reason, "capture error");
    metrics::counter!(m::SYSTEM_ERRORS, m::LABEL_SYSTEM => system.to_string(), m::LABEL_CLASS => class.as_str())
        .increment(1);
    shared.status.link(name, |s| {
        s.last_error = Some(reason.to_string());
        s.last_error_ms = Some(now_ms());
    });
}

fn stop_link(shared: &Shared, name: &str, reason: &str) {
    metrics::gauge!(m::LINK_UP, m::LABEL_LINK => name.to_string()).set(0.0);
    shared.status.link(name, |s| {
        s.state = "stopped".into();
        s.last_error = Some(reason.to_string());
        s.last_error_ms = Some(now_ms());
    });
}

/// A stream that has caught up has its batches made durable a quarter durable interval
/// after the last durable commit, not a whole one: a trickle of small transactions then
/// costs at most four syncs per interval, not one per batch, and the end of a burst is
/// acknowledged within a quarter interval of its commit.
const EARLY_DURABLE_SHARE: u32 = 4;

/// Time left until a caught-up stream's batches are due to be made durable.
fn early_due_in(store: &crate::state::StateStore) -> Duration {
    (store.durable_interval() / EARLY_DURABLE_SHARE).saturating_sub(store.last_durable().elapsed())
}
/// Interval of the maintenance task's refresh: gauges stay fresh enough for a 15 s scrape.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);
/// Interval of the maintenance task's heartbeat: well under any sensible watchdog
/// interval (systemd's WatchdogSec is whole seconds; the watchdog pings at half of it).
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// Retention pruning runs on every twelfth refresh (once a minute).
const PRUNE_EVERY: u32 = 12;

/// Refreshes gauges and status, prunes, and bumps the heartbeat. A refresh that hangs
/// (a stuck state store) stops the heartbeat, which is the point.
async fn maintenance(shared: Arc<Shared>) {
    let mut pass: u32 = 0;
    let mut next_refresh = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_refresh {
            let s = shared.clone();
            let prune = pass.is_multiple_of(PRUNE_EVERY);
            let result = tokio::task::spawn_blocking(move || refresh(&s, prune)).await;
            if let Ok(Err(error)) = result {
                tracing::warn!(error = %error, "maintenance pass failed");
            }
            pass = pass.wrapping_add(1);
            next_refresh = tokio::time::Instant::now() + MAINTENANCE_INTERVAL;
        }
        shared.heartbeat.bump();
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

fn refresh(shared: &Shared, prune: bool) -> Result<(), crate::state::StateError> {
    let state = &shared.rt.config.state;
    if prune {
        let min_time = now_ms() - (state.retention_days as i64) * 86_400_000;
        let removed = shared
            .store
            .write(|t| t.prune(state.max_decisions, state.max_write_log, min_time))?;
        if removed > 0 {
            tracing::debug!(removed, "pruned decisions and write log");
        }
    }
    let view = shared.store.read()?;
    let dlq = view.dead_letter_depths()?;
    let records = view.record_count()?;
    metrics::gauge!(m::RECORDS).set(records as f64);
    let mut systems: Vec<String> = shared.rt.config.systems.keys().cloned().collect();
    systems.sort();
    for system in systems {
        let outbox = view.outbox_depth(&system)?;
        let dead = dlq.get(&system).copied().unwrap_or(0);
        metrics::gauge!(m::OUTBOX_DEPTH, m::LABEL_SYSTEM => system.clone()).set(outbox as f64);
        metrics::gauge!(m::DLQ_DEPTH, m::LABEL_SYSTEM => system.clone()).set(dead as f64);
        let writes = shared.wakers.contains_key(&system);
        shared.status.system(&system, |s| {
            s.outbox_depth = outbox;
            s.dlq_depth = dead;
            if !writes {
                s.state = "source_only".into();
            }
        });
    }
    shared.status.update(|s| s.records = records);
    Ok(())
}
