//! One applier per target system: drains that system's outbox in sequence order,
//! hands the writes to the sink, and records each result in the same transaction that
//! removes the entry (or keeps it for a retry, or dead-letters it).
//!
//! The sink writes one batch while the previous one is settled and the next one is
//! planned (see [`run`]). Writes of one record in one batch are coalesced into one
//! write. An entry is removed only after the system confirmed it; a crash in between
//! repeats the write, which the sink contract makes harmless.
//!
//! Nothing is sent to a system before every link that captures from it has finished
//! its first capture since the engine started. Until then a record that exists in the
//! system may not be in the identity map yet, and a create planned for it would make a
//! duplicate there; once the system's records have been read (and matched by the
//! entity's match keys), a held create finds the record's id in the system's shadow and
//! is planned as an update instead. The hold ends once and does not come back.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::connector::rest::Reread;
use crate::connector::{AnySink, ConnectorError, ErrorClass};
use crate::merge::{self, WriteAction};
use crate::metrics as m;
use crate::model::{Fields, GlobalId, TimeMs, Write, WriteAck, WriteOp, now_ms};
use crate::state::{CommitToken, DeadItem, DeadLetter, DeadLetterClass, OutboxEntry, StateError, WriteLogEntry};

use super::Shared;
use super::backoff::Backoff;

/// Writes of one record, coalesced from one or more outbox entries.
struct Group {
    entries: Vec<OutboxEntry>,
    entity: String,
    global_id: GlobalId,
    action: WriteAction,
}

/// A group resolved into a sink write, or settled without one.
enum Planned {
    Send {
        group: Group,
        write: Write,
        written: Fields,
    },
    Unsent(Unsent),
}

/// A group settled without a sink call.
enum Unsent {
    /// Nothing to send (the system never held the record, the link no longer writes).
    Done { group: Group, note: &'static str },
    /// Cannot be sent: dead-letter it.
    Fail { group: Group, reason: String },
}

/// A planned batch, its outbox made durable: what goes to the sink, and what settles
/// without a sink call.
#[derive(Default)]
struct Batch {
    /// Each sent group with the canonical values it writes and whether a create learns
    /// the record's id from the system.
    sends: Vec<(Group, Fields, bool)>,
    writes: Vec<Write>,
    others: Vec<Unsent>,
}

/// A batch the sink has answered, to be settled.
struct Answered {
    sends: Vec<(Group, Fields, bool)>,
    results: Vec<Result<WriteAck, ConnectorError>>,
    rereads: Vec<Reread>,
    others: Vec<Unsent>,
}

impl Answered {
    /// Whether a write failed in a way that is retried (anything not permanent), which
    /// the settlement answers with a back-off.
    fn asks_to_wait(&self) -> bool {
        self.results
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| e.class != ErrorClass::Permanent))
    }
}

/// The outbox entries of the batch the sink is writing, and the records they write: the
/// plan made meanwhile leaves them alone.
#[derive(Default)]
struct InFlight {
    seqs: HashSet<u64>,
    records: HashSet<(String, GlobalId)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.others.is_empty()
    }

    fn in_flight(&self) -> InFlight {
        let mut busy = InFlight::default();
        let groups = self
            .sends
            .iter()
            .map(|(g, _, _)| g)
            .chain(self.others.iter().map(|o| match o {
                Unsent::Done { group, .. } | Unsent::Fail { group, .. } => group,
            }));
        for group in groups {
            busy.seqs.extend(group.entries.iter().map(|e| e.seq));
            busy.records.insert((group.entity.clone(), group.global_id));
        }
        busy
    }
}

/// How a settlement went, for the applier's pacing.
type Settled = Result<Option<Option<Duration>>, StateError>;

/// The applier of one system, a pipeline of three stages: while the sink writes one
/// batch, a blocking thread settles the batch before it and plans the batch after it.
/// The plan leaves out the entries in flight and stops at the first entry of a record
/// in flight (its write must wait for that record's settlement, which may carry the id
/// a create learned), so each record's writes still go out in order, one batch after
/// the other. An answer with a write refused for now, or a settlement that asks for a
/// back-off or fails, drains the pipeline: the batch planned meanwhile is not sent, the
/// batch already sent is settled, the applier waits, and plans afresh.
pub(super) async fn run(shared: Arc<Shared>, system: String, mut sink: AnySink) {
    let cfg = &shared.rt.config.engine;
    let mut backoff = Backoff::new(cfg.backoff_min_ms, cfg.backoff_max_ms);
    let wake = shared.waker(&system);
    shared.status.system(&system, |s| s.state = "idle".into());
    let capturing: Vec<String> = shared
        .rt
        .links
        .iter()
        .filter(|l| l.captures && l.config.system == system)
        .map(|l| l.name.clone())
        .collect();
    let mut first_captures_done = capturing.is_empty();
    // The batch planned and durable, next to be sent; the batch sent and answered, next
    // to be settled.
    let mut next: Option<Batch> = None;
    let mut answered: Option<Answered> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            if let Some(answered) = answered.take() {
                settle_blocking(&shared, &system, answered).await;
            }
            break;
        }
        if next.is_none() && answered.is_none() {
            if !first_captures_done {
                first_captures_done = shared.status.first_captures_done(capturing.iter().map(String::as_str));
                if !first_captures_done {
                    shared
                        .status
                        .system(&system, |s| s.state = "awaiting_first_capture".into());
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shared.shutdown.cancelled() => break,
                    }
                    continue;
                }
            }
            let planned = {
                let shared = shared.clone();
                let system = system.clone();
                tokio::task::spawn_blocking(move || prepare(&shared, &system, &InFlight::default())).await
            };
            match planned {
                Ok(Ok(batch)) if batch.is_empty() => {
                    shared.status.system(&system, |s| s.state = "idle".into());
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shared.shutdown.cancelled() => {}
                    }
                    continue;
                }
                Ok(Ok(batch)) => next = Some(batch),
                Ok(Err(failure)) => {
                    plan_failed(&shared, &system, failure);
                    sleep_or_shutdown(&shared, backoff.next_delay()).await;
                    continue;
                }
                Err(join) => {
                    tracing::error!(system = %system, error = %join, "outbox planning task failed");
                    break;
                }
            }
        }
        shared.status.system(&system, |s| s.state = "running".into());

        // One round: the sink writes `next` while the batch it answered last is settled
        // and the batch after `next` is planned.
        let sending = next.take();
        let in_flight = sending.as_ref().map(Batch::in_flight);
        let send = async {
            let batch = sending?;
            let results = if batch.writes.is_empty() {
                Vec::new()
            } else {
                sink.apply(batch.writes).await
            };
            Some(Answered {
                sends: batch.sends,
                results,
                rereads: sink.take_rereads(),
                others: batch.others,
            })
        };
        let side = {
            let shared = shared.clone();
            let system = system.clone();
            let answered = answered.take();
            tokio::task::spawn_blocking(move || {
                let settled = answered.map(|a| settle_answered(&shared, &system, a));
                let go_on = matches!(settled, None | Some(Ok(None)));
                let planned = go_on.then(|| prepare(&shared, &system, &in_flight.unwrap_or_default()));
                (settled, planned)
            })
        };
        let (just_answered, side) = tokio::join!(send, side);
        answered = just_answered;
        let (settled, planned) = match side {
            Ok(side) => side,
            Err(join) => {
                tracing::error!(system = %system, error = %join, "write settlement task failed");
                break;
            }
        };
        let mut pause = settled.and_then(|settled| settled_pause(&shared, &system, settled, &mut backoff));
        // A system that refused a write for now (or asked to wait) gets nothing more,
        // planned batch included, until the back-off is over.
        if answered.as_ref().is_some_and(Answered::asks_to_wait) {
            pause = pause.max(Some(backoff.next_delay()));
        }
        match planned {
            Some(Ok(batch)) if !batch.is_empty() => next = Some(batch),
            Some(Ok(_)) | None => {}
            Some(Err(failure)) => {
                plan_failed(&shared, &system, failure);
                pause = pause.max(Some(backoff.next_delay()));
            }
        }
        if let Some(mut delay) = pause {
            // Drain: settle what the sink answered, then wait before planning again.
            next = None;
            if let Some(answered) = answered.take() {
                delay = delay.max(settle_blocking(&shared, &system, answered).await);
            }
            shared.status.system(&system, |s| {
                s.state = "backing_off".into();
                s.retry_at_ms = Some(now_ms() + delay.as_millis() as TimeMs);
            });
            sleep_or_shutdown(&shared, delay).await;
        }
    }
    tracing::debug!(system = %system, "applier stopped");
}

/// Settles `answered` on a blocking thread while the pipeline drains for a pause;
/// returns the retry delay it asks for beyond that pause (zero when none).
async fn settle_blocking(shared: &Arc<Shared>, system: &str, answered: Answered) -> Duration {
    let settled = {
        let shared = shared.clone();
        let system = system.to_string();
        tokio::task::spawn_blocking(move || settle_answered(&shared, &system, answered)).await
    };
    match settled {
        Ok(Ok(retry)) => retry.flatten().unwrap_or_default(),
        Ok(Err(error)) => {
            tracing::error!(system = %system, error = %error, "cannot record write results; they will be repeated");
            shared
                .status
                .system(system, |s| note_error(s, "state store write failed"));
            Duration::ZERO
        }
        Err(join) => {
            tracing::error!(system = %system, error = %join, "write settlement task failed");
            Duration::ZERO
        }
    }
}

/// Turns a settlement's outcome into the pause before the next plan, if any.
fn settled_pause(shared: &Shared, system: &str, settled: Settled, backoff: &mut Backoff) -> Option<Duration> {
    match settled {
        Ok(Some(retry)) => Some(backoff.next_delay().max(retry.unwrap_or_default())),
        Ok(None) => {
            backoff.reset();
            shared.status.system(system, |s| s.retry_at_ms = None);
            None
        }
        Err(error) => {
            tracing::error!(system = %system, error = %error, "cannot record write results; they will be repeated");
            shared
                .status
                .system(system, |s| note_error(s, "state store write failed"));
            Some(backoff.next_delay())
        }
    }
}

/// Why a batch could not be planned.
struct PlanFailure {
    what: &'static str,
    error: StateError,
}

fn plan_failed(shared: &Shared, system: &str, failure: PlanFailure) {
    tracing::error!(system = %system, error = %failure.error, "{}", failure.what);
    let note = if failure.what == READ_FAILED {
        "state store read failed"
    } else {
        "state store write failed"
    };
    shared.status.system(system, |s| note_error(s, note));
}

const READ_FAILED: &str = "cannot read the outbox";

/// Plans the next batch, leaving `in_flight` alone, and makes the commits it was read
/// from durable. Writes planned from a lazy batch commit leave only once it is durable:
/// a crash before would forget the write but not undo it in the system. The applier
/// makes it durable now rather than wait for the group's fsync, so no write waits
/// longer than a commit for it.
fn prepare(shared: &Shared, system: &str, in_flight: &InFlight) -> Result<Batch, PlanFailure> {
    let (planned, token) = plan_batch(shared, system, in_flight).map_err(|error| PlanFailure {
        what: READ_FAILED,
        error,
    })?;
    if !planned.is_empty() && !shared.store.is_durable(token) {
        shared.store.make_durable().map_err(|error| PlanFailure {
            what: "cannot make the outbox durable",
            error,
        })?;
    }
    let mut batch = Batch::default();
    for p in planned {
        match p {
            Planned::Send { group, write, written } => {
                // A create that does not carry the record's key gets one from the
                // system, which the settlement must not lose.
                let learns_id = write.op == WriteOp::Create
                    && shared
                        .rt
                        .link(system, &group.entity)
                        .is_none_or(|l| !write.fields.contains_key(&l.config.id_field));
                batch.sends.push((group, written, learns_id));
                batch.writes.push(write);
            }
            Planned::Unsent(unsent) => batch.others.push(unsent),
        }
    }
    Ok(batch)
}

/// Settles an answered batch and wakes the systems its re-merges gave new writes.
fn settle_answered(shared: &Shared, system: &str, answered: Answered) -> Settled {
    let mut wake = BTreeSet::new();
    let outcome = settle(
        shared,
        system,
        answered.sends,
        answered.results,
        answered.rereads,
        answered.others,
        &mut wake,
    );
    for target in &wake {
        shared.wake(target);
    }
    outcome
}

async fn sleep_or_shutdown(shared: &Shared, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shared.shutdown.cancelled() => {}
    }
}

fn note_error(s: &mut super::status::SystemStatus, error: &str) {
    s.last_error = Some(error.to_string());
    s.last_error_ms = Some(now_ms());
}

/// Reads the next entries, leaving out those in flight and stopping at the first entry
/// of a record in flight, and resolves each record's writes; the token covers the
/// commits the plan was read from.
fn plan_batch(shared: &Shared, system: &str, in_flight: &InFlight) -> Result<(Vec<Planned>, CommitToken), StateError> {
    let view = shared.store.read()?;
    let token = shared.store.latest_token();
    let engine = &shared.rt.config.engine;
    let round = shared
        .rt
        .config
        .systems
        .get(system)
        .map_or(engine.batch_size, |s| s.write_batch_size(engine));
    let entries = view.outbox_skipping(system, round, |seq| in_flight.seqs.contains(&seq))?;
    let mut groups: Vec<Group> = Vec::new();
    let mut by_record: HashMap<(String, GlobalId), usize> = HashMap::new();
    for entry in entries {
        let record = (entry.entity.clone(), entry.global_id);
        if in_flight.records.contains(&record) {
            break;
        }
        match (by_record.get(&record), &entry.action) {
            (None, _) => {
                by_record.insert(record, groups.len());
                groups.push(Group {
                    entity: entry.entity.clone(),
                    global_id: entry.global_id,
                    action: entry.action.clone(),
                    entries: vec![entry],
                });
            }
            (Some(&i), WriteAction::Upsert { fields }) if matches!(groups[i].action, WriteAction::Upsert { .. }) => {
                if let WriteAction::Upsert { fields: merged } = &mut groups[i].action {
                    merged.extend(fields.clone());
                }
                groups[i].entries.push(entry);
            }
            // A delete after an upsert of the same record (or the reverse) keeps its
            // order by waiting for the next batch.
            (Some(_), _) => break,
        }
    }
    let mut planned = Vec::new();
    for group in groups {
        planned.push(plan_group(shared, &view, system, group)?);
    }
    Ok((planned, token))
}

fn plan_group(
    shared: &Shared,
    view: &crate::state::ReadView,
    system: &str,
    group: Group,
) -> Result<Planned, StateError> {
    let Some(link) = shared.rt.link(system, &group.entity).filter(|l| l.writes) else {
        return Ok(Planned::Unsent(Unsent::Done {
            group,
            note: "link no longer writes",
        }));
    };
    let Some(state) = view.record(&group.entity, group.global_id)? else {
        return Ok(Planned::Unsent(Unsent::Done {
            group,
            note: "record forgotten",
        }));
    };
    let shadow = state.shadows.get(system);
    let local_id = shadow.and_then(|s| s.local_id.clone());
    let expected_version = shadow.and_then(|s| s.version.clone());
    let seq = group.entries.last().map(|e| e.seq).unwrap_or_default();
    let make = |op: WriteOp, fields: serde_json::Map<String, serde_json::Value>| Write {
        seq,
        entity: group.entity.clone(),
        global_id: group.global_id,
        op,
        local_id: local_id.clone(),
        object: link.config.object.clone(),
        fields,
        expected_version: expected_version.clone(),
    };
    let (write, written) = match &group.action {
        WriteAction::Upsert { fields } => {
            let mut values = state.base.values();
            values.extend(fields.clone());
            if local_id.is_none() {
                if !link.config.write_mode().may_create() {
                    return Ok(Planned::Unsent(Unsent::Done {
                        group,
                        note: "link does not create",
                    }));
                }
                let written: Fields = values
                    .iter()
                    .filter(|(k, v)| link.outbound.contains(*k) && !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                match link.mapping.outbound(&written, None) {
                    Ok(out) => (make(WriteOp::Create, out), written),
                    Err(e) => {
                        return Ok(Planned::Unsent(Unsent::Fail {
                            reason: e.to_string(),
                            group,
                        }));
                    }
                }
            } else {
                let only: BTreeSet<String> = fields.keys().cloned().collect();
                match link.mapping.outbound(&values, Some(&only)) {
                    Ok(out) => (make(WriteOp::Update, out), fields.clone()),
                    Err(e) => {
                        return Ok(Planned::Unsent(Unsent::Fail {
                            reason: e.to_string(),
                            group,
                        }));
                    }
                }
            }
        }
        WriteAction::Delete => {
            if local_id.is_none() {
                return Ok(Planned::Unsent(Unsent::Done {
                    group,
                    note: "system never held the record",
                }));
            }
            (make(WriteOp::Delete, Default::default()), Fields::new())
        }
        WriteAction::SoftDelete { field, value } => {
            if local_id.is_none() {
                return Ok(Planned::Unsent(Unsent::Done {
                    group,
                    note: "system never held the record",
                }));
            }
            let mut out = serde_json::Map::new();
            out.insert(field.clone(), value.clone());
            (make(WriteOp::Update, out), Fields::new())
        }
    };
    Ok(Planned::Send { group, write, written })
}

/// Records every result. Returns `Some(retry_after)` when a transient failure asks the
/// applier to back off. Systems that got new outbox entries (from re-merged records)
/// are added to `wake`, to be woken once the transaction committed.
///
/// The commit is lazy (group commit) unless a sent create learns the id the system
/// gave the record. A crash that loses a lazy settlement puts its writes back in the
/// outbox and they are sent again, which writes by key bear (they set the same values
/// again, and their echoes merge to nothing); a generated id must not be forgotten, or
/// the record would be created twice.
fn settle(
    shared: &Shared,
    system: &str,
    sends: Vec<(Group, Fields, bool)>,
    results: Vec<Result<WriteAck, ConnectorError>>,
    mut rereads: Vec<Reread>,
    others: Vec<Unsent>,
    wake: &mut BTreeSet<String>,
) -> Result<Option<Option<Duration>>, StateError> {
    let max_attempts = shared.rt.config.engine.max_attempts;
    let now = now_ms();
    let mut retry: Option<Option<Duration>> = None;
    let mut ok = 0u64;
    let mut failed = 0u64;
    let mut last_error: Option<String> = None;
    let lazy = !sends.iter().any(|(_, _, learns_id)| *learns_id);
    let end_to_end = metrics::histogram!(m::END_TO_END_LATENCY, m::LABEL_SYSTEM => system.to_string());
    shared.store.write_batch(lazy, |t| {
        let mut results = results.into_iter();
        for (group, written, _) in sends {
            let result = results
                .next()
                .unwrap_or_else(|| Err(ConnectorError::transient("no_result", "sink returned fewer results than writes")));
            let op = op_name(&group.action);
            match result {
                Ok(ack) => {
                    ok += 1;
                    let deleted = matches!(group.action, WriteAction::Delete);
                    let confirm = |shadow: &mut crate::model::Shadow| {
                        // The identity row exists already when the shadow holds this id.
                        let known = !shadow.deleted && shadow.local_id.as_deref() == Some(ack.local_id.as_str());
                        merge::confirm_shadow(shadow, &written, &ack.local_id, ack.version.clone(), deleted);
                        known
                    };
                    if let Some(known) = t.update_shadow(&group.entity, group.global_id, system, confirm)? {
                        if deleted {
                            t.remove_identity(&group.entity, system, &ack.local_id)?;
                        } else if !known {
                            t.put_identity(&group.entity, system, &ack.local_id, group.global_id)?;
                        }
                    }
                    let settled = group.entries.len();
                    for mut entry in group.entries {
                        t.delete_outbox(system, entry.seq)?;
                        // `attempts` counts the failed attempts; this one is the next.
                        entry.attempts += 1;
                        log(t, &entry, system, op, "ok", None, now)?;
                        let latency = (now - entry.source_time_ms).max(0) as f64 / 1000.0;
                        end_to_end.record(latency);
                    }
                    count_write(system, &group.entity, op, "ok", settled);
                }
                Err(error) => {
                    let seq = group.entries.last().map(|e| e.seq);
                    let reread = rereads
                        .iter()
                        .position(|r| Some(r.seq) == seq && r.entity == group.entity)
                        .map(|i| rereads.swap_remove(i));
                    if let Some(reread) = reread {
                        remerge(shared, t, system, group, &written, reread, &error.reason, now, wake)?;
                        // Back off before the re-planned write, so a system that keeps
                        // refusing is not asked again in a tight loop.
                        retry = Some(retry.flatten());
                        continue;
                    }
                    failed += 1;
                    last_error = Some(error.reason.clone());
                    metrics::counter!(m::SYSTEM_ERRORS, m::LABEL_SYSTEM => system.to_string(), m::LABEL_CLASS => error.class.as_str())
                        .increment(1);
                    let permanent = error.class == ErrorClass::Permanent;
                    for mut entry in group.entries.clone() {
                        entry.attempts += 1;
                        entry.last_error = Some(error.reason.clone());
                        if permanent || entry.attempts >= max_attempts {
                            let class = if permanent { DeadLetterClass::WriteRejected } else { DeadLetterClass::RetriesExhausted };
                            dead_letter_write(t, system, entry, class, &error.reason, now)?;
                            count_write(system, &group.entity, op, "dead_letter", 1);
                        } else {
                            t.update_outbox(&entry)?;
                            log(t, &entry, system, op, "retry", Some(&error.reason), now)?;
                            count_write(system, &group.entity, op, "retry", 1);
                            let after = retry.flatten().max(error.retry_after);
                            retry = Some(after);
                        }
                    }
                }
            }
        }
        for other in others {
            match other {
                Unsent::Done { group, note } => {
                    tracing::debug!(system = %system, entity = %group.entity, note, "write settled without sending");
                    for entry in &group.entries {
                        t.delete_outbox(system, entry.seq)?;
                        log(t, entry, system, op_name(&group.action), "skipped", Some(note), now)?;
                    }
                }
                Unsent::Fail { group, reason } => {
                    for entry in group.entries {
                        failed += 1;
                        dead_letter_write(t, system, entry, DeadLetterClass::WriteRejected, &reason, now)?;
                    }
                    last_error = Some(reason);
                }
            }
        }
        Ok::<_, StateError>(())
    })?;
    shared.status.system(system, |s| {
        s.writes_ok += ok;
        s.writes_failed += failed;
        if ok > 0 {
            s.last_success_ms = Some(now);
        }
        if let Some(e) = last_error {
            note_error(s, &e);
        }
    });
    if ok > 0 {
        metrics::gauge!(m::LAST_SUCCESS, m::LABEL_SYSTEM => system.to_string()).set(now as f64 / 1000.0);
    }
    Ok(retry)
}

/// The system refused a write because the record changed there since concord read it
/// (a failed precondition), and the sink read it again. The refused write is not
/// forced: its entries leave the outbox and their pending values are forgotten, and the
/// fresh copy is merged as a change from the system, under field authority, through the
/// normal batch path. That merge plans whatever write the system still needs, against
/// its current values and version.
#[allow(clippy::too_many_arguments)]
fn remerge(
    shared: &Shared,
    t: &mut crate::state::WriteTables<'_>,
    system: &str,
    group: Group,
    written: &Fields,
    reread: Reread,
    reason: &str,
    now: TimeMs,
    wake: &mut BTreeSet<String>,
) -> Result<(), StateError> {
    let op = op_name(&group.action);
    let mut record = reread.record;
    // The oldest time the refused write answers: every value it carried was agreed at
    // or after it.
    let mut answered = group.entries.iter().map(|e| e.source_time_ms).min();
    if let Some(mut state) = t.record(&group.entity, group.global_id)? {
        merge::abandon_write(&mut state, system, written);
        t.put_record(&group.entity, group.global_id, &state)?;
        let agreed = state.base.fields.values().map(|f| f.from.source_time_ms).min();
        answered = answered.into_iter().chain(agreed).min();
    }
    // A row a create ran into was there before the create: left by an earlier attempt
    // whose answer a crash lost, or written in the system before concord knew of it.
    // The system cannot say when it was set; it is merged as older than every value
    // concord agreed, so under last-writer-wins it does not undo them (a newer edit in
    // the system arrives through capture with its own time).
    if reread.refused == WriteOp::Create && record.source_time_ms.is_none() {
        record.source_time_ms = answered.map(|t| t.saturating_sub(1).max(0));
    }
    for mut entry in group.entries {
        t.delete_outbox(system, entry.seq)?;
        entry.attempts += 1;
        log(t, &entry, system, op, "conflict", Some(reason), now)?;
        count_write(system, &group.entity, op, "conflict", 1);
    }
    let Some(link) = shared.rt.link(system, &group.entity) else {
        return Ok(());
    };
    let report = super::batch::process(&shared.rt, t, link, &[record], &[], None, now)?;
    wake.extend(report.wake);
    Ok(())
}

fn op_name(action: &WriteAction) -> &'static str {
    match action {
        WriteAction::Upsert { .. } => "upsert",
        WriteAction::Delete => "delete",
        WriteAction::SoftDelete { .. } => "soft_delete",
    }
}

fn count_write(system: &str, entity: &str, op: &'static str, outcome: &'static str, n: usize) {
    metrics::counter!(m::WRITES, m::LABEL_SYSTEM => system.to_string(), m::LABEL_ENTITY => entity.to_string(),
        m::LABEL_OP => op, m::LABEL_OUTCOME => outcome)
    .increment(n as u64);
}

fn dead_letter_write(
    t: &mut crate::state::WriteTables<'_>,
    system: &str,
    entry: OutboxEntry,
    class: DeadLetterClass,
    reason: &str,
    now: TimeMs,
) -> Result<(), StateError> {
    t.delete_outbox(system, entry.seq)?;
    if let (Some(mut state), WriteAction::Upsert { fields }) =
        (t.record(&entry.entity, entry.global_id)?, &entry.action)
    {
        merge::abandon_write(&mut state, system, fields);
        t.put_record(&entry.entity, entry.global_id, &state)?;
    }
    log(
        t,
        &entry,
        system,
        op_name(&entry.action),
        "dead_letter",
        Some(reason),
        now,
    )?;
    t.dead_letter(DeadLetter {
        id: 0,
        time_ms: now,
        system: system.to_string(),
        entity: entry.entity.clone(),
        class,
        reason: reason.to_string(),
        item: DeadItem::Write { entry },
    })?;
    Ok(())
}

fn log(
    t: &mut crate::state::WriteTables<'_>,
    entry: &OutboxEntry,
    system: &str,
    op: &str,
    outcome: &str,
    error: Option<&str>,
    now: TimeMs,
) -> Result<(), StateError> {
    t.log_write(WriteLogEntry {
        id: 0,
        time_ms: now,
        source_system: entry.source_system.clone(),
        target_system: system.to_string(),
        entity: entry.entity.clone(),
        global_id: entry.global_id,
        op: op.to_string(),
        outcome: outcome.to_string(),
        attempt: entry.attempts.max(1),
        seq: entry.seq,
        error: error.map(str::to_string),
    })
}
