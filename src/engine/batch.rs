//! One captured batch through map → validate → identify → merge → state, inside one
//! write transaction. Runs on a blocking thread; the caller commits once.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::RolloutConfig;
use crate::connector::Checkpoint;
use crate::mapping::{in_rollout, normalise_key};
use crate::merge::{self, MergeInput, Target, WriteMode};
use crate::metrics as m;
use crate::model::{Change, ChangeKind, GlobalId, RecordState, SourceRecord, SourceReject, TimeMs, now_ms};
use crate::state::{
    CommitToken, DeadItem, DeadLetter, DeadLetterClass, OutboxEntry, StateError, StateStore, WriteTables,
};

use super::runtime::{EntityRuntime, LinkRuntime, Runtime};

/// What a batch did, for the caller's metrics and to wake appliers.
#[derive(Debug, Default)]
pub struct BatchReport {
    pub captured: u64,
    pub merged: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    /// Ids of the dead letters the batch wrote.
    pub dead_letter_ids: Vec<u64>,
    /// Systems that got new outbox entries.
    pub wake: BTreeSet<String>,
}

/// Batches smaller than this are committed without a read-ahead thread: starting one
/// costs more than the page reads it could save.
const READ_AHEAD_MIN: usize = 32;

/// Processes one captured batch in one commit (see [`process`]), lazy when `lazy` (see
/// [`StateStore::write_batch`]). A large batch has its records' identity and state rows
/// read ahead on a second thread, so the merge finds their pages cached.
pub fn commit(
    store: &StateStore,
    rt: &Runtime,
    link: &LinkRuntime,
    records: &[SourceRecord],
    rejects: &[SourceReject],
    checkpoint: Option<&Checkpoint>,
    lazy: bool,
) -> Result<(BatchReport, CommitToken), StateError> {
    let run = |t: &mut WriteTables<'_>| process(rt, t, link, records, rejects, checkpoint, now_ms());
    if records.len() < READ_AHEAD_MIN {
        return store.write_batch(lazy, run);
    }
    let ids = records.iter().map(|r| r.local_id.clone()).collect();
    store.write_batch_read_ahead(lazy, &link.config.entity, &link.config.system, ids, run)
}

/// Processes the records and rejects of one batch from `link`, and stores `checkpoint`
/// (when given) in the same transaction.
pub fn process(
    rt: &Runtime,
    tables: &mut WriteTables<'_>,
    link: &LinkRuntime,
    records: &[SourceRecord],
    rejects: &[SourceReject],
    checkpoint: Option<&Checkpoint>,
    now: TimeMs,
) -> Result<BatchReport, StateError> {
    let entity = rt
        .entities
        .get(&link.config.entity)
        .expect("every link's entity is compiled with the runtime");
    let system = link.config.system.as_str();
    let mut report = BatchReport {
        captured: records.len() as u64,
        ..BatchReport::default()
    };

    for reject in rejects {
        let id = tables.dead_letter(DeadLetter {
            id: 0,
            time_ms: now,
            system: system.to_string(),
            entity: entity.name.clone(),
            class: DeadLetterClass::Unreadable,
            reason: reject.reason.clone(),
            item: DeadItem::Reject { reject: reject.clone() },
        })?;
        report.dead_lettered += 1;
        report.dead_letter_ids.push(id);
    }

    let guarded = delete_guard_trips(tables, entity, system, records)?;
    let mut tally = Tally::default();
    for record in records {
        if guarded && record.kind == ChangeKind::Delete {
            let reason = format!(
                "batch deletes more than {:.0}% of the records {system} holds; held for review",
                entity.delete.max_share * 100.0
            );
            let id = dead_letter_change(
                tables,
                entity,
                system,
                record,
                DeadLetterClass::DeleteGuard,
                reason,
                now,
            )?;
            report.dead_lettered += 1;
            report.dead_letter_ids.push(id);
            continue;
        }
        match process_record(rt, tables, entity, link, record, now, &mut tally)? {
            RecordOutcome::Merged(wake) => {
                report.merged += 1;
                report.wake.extend(wake);
            }
            RecordOutcome::DeadLettered(id) => {
                report.dead_lettered += 1;
                report.dead_letter_ids.push(id);
            }
            RecordOutcome::Skipped => report.skipped += 1,
        }
    }
    if let Some(checkpoint) = checkpoint {
        tables.put_checkpoint(system, &link.name, checkpoint)?;
    }
    metrics::counter!(m::CHANGES_CAPTURED, m::LABEL_SYSTEM => system.to_string(), m::LABEL_ENTITY => entity.name.clone())
        .increment(report.captured);
    tally.emit(&entity.name);
    Ok(report)
}

enum RecordOutcome {
    Merged(Vec<String>),
    DeadLettered(u64),
    Skipped,
}

/// The mass-delete guard: true when the batch's deletes exceed the allowed share of
/// the records the system holds.
fn delete_guard_trips(
    tables: &WriteTables<'_>,
    entity: &EntityRuntime,
    system: &str,
    records: &[SourceRecord],
) -> Result<bool, StateError> {
    let deletes = records.iter().filter(|r| r.kind == ChangeKind::Delete).count() as u64;
    if deletes == 0 {
        return Ok(false);
    }
    let held = tables.count(&entity.name, system)?;
    Ok(held >= entity.delete.guard_min_records && deletes as f64 > entity.delete.max_share * held as f64)
}

fn dead_letter_change(
    tables: &mut WriteTables<'_>,
    entity: &EntityRuntime,
    system: &str,
    record: &SourceRecord,
    class: DeadLetterClass,
    reason: String,
    now: TimeMs,
) -> Result<u64, StateError> {
    if matches!(class, DeadLetterClass::Mapping | DeadLetterClass::Validation) {
        metrics::counter!(m::VALIDATION_FAILURES, m::LABEL_SYSTEM => system.to_string(), m::LABEL_ENTITY => entity.name.clone())
            .increment(1);
    }
    tables.dead_letter(DeadLetter {
        id: 0,
        time_ms: now,
        system: system.to_string(),
        entity: entity.name.clone(),
        class,
        reason,
        item: DeadItem::Change { record: record.clone() },
    })
}

/// The normalised values of the entity's match keys, in configured order, for the
/// fields `value_of` finds (a change's fields, or the agreed values of a record).
fn key_values<'a>(
    entity: &EntityRuntime,
    value_of: impl Fn(&str) -> Option<&'a crate::model::Value>,
) -> Vec<(String, String)> {
    entity
        .match_keys
        .iter()
        .filter_map(|(key, format)| {
            let value = value_of(key)?;
            normalise_key(value, format.as_deref()).map(|v| (key.clone(), v))
        })
        .collect()
}

/// Whether a record with these match-key values is in a link's rollout.
pub fn rollout_selects(rollout: Option<&RolloutConfig>, keys: &[(String, String)]) -> bool {
    match rollout {
        None => true,
        Some(r) => in_rollout(r, keys.first().map(|(_, v)| v.as_str())),
    }
}

/// Maps, validates, identifies and merges one record, storing every effect.
fn process_record(
    rt: &Runtime,
    tables: &mut WriteTables<'_>,
    entity: &EntityRuntime,
    link: &LinkRuntime,
    record: &SourceRecord,
    now: TimeMs,
    tally: &mut Tally,
) -> Result<RecordOutcome, StateError> {
    let system = link.config.system.as_str();
    let mut fields = match record.kind {
        ChangeKind::Upsert => match link.mapping.inbound(&record.fields) {
            Ok(fields) => fields,
            Err(error) => {
                let id = dead_letter_change(
                    tables,
                    entity,
                    system,
                    record,
                    DeadLetterClass::Mapping,
                    error.to_string(),
                    now,
                )?;
                return Ok(RecordOutcome::DeadLettered(id));
            }
        },
        ChangeKind::Delete => Default::default(),
    };
    if record.kind == ChangeKind::Upsert {
        if let Err(problems) = entity.schema.validate(&mut fields) {
            let id = dead_letter_change(
                tables,
                entity,
                system,
                record,
                DeadLetterClass::Validation,
                problems.join("; "),
                now,
            )?;
            return Ok(RecordOutcome::DeadLettered(id));
        }
    }

    // Identify: the identity map first, then the match keys. Match-key values serve
    // two things: finding a record the identity map does not know, and rollouts.
    // Without a rollout on the entity's links, a known record's change needs none of
    // them (the index is kept in step below either way).
    let known = tables.identity(&entity.name, system, &record.local_id)?;
    let keys = if known.is_none() || entity.rollouts {
        key_values(entity, |k| fields.get(k))
    } else {
        Vec::new()
    };
    let (global_id, mut state) = match known {
        Some(id) => (id, tables.record(&entity.name, id)?),
        None => {
            if record.kind == ChangeKind::Delete {
                // A delete of a record concord never saw changes nothing.
                return Ok(RecordOutcome::Skipped);
            }
            let mut found = None;
            for (key, value) in &keys {
                if let Some(id) = tables.match_key(&entity.name, key, value)? {
                    found = Some(id);
                    break;
                }
            }
            match found {
                Some(id) => {
                    let state = tables.record(&entity.name, id)?;
                    let other = state
                        .as_ref()
                        .and_then(|s| s.shadows.get(system))
                        .filter(|sh| !sh.deleted && sh.local_id.as_deref().is_some_and(|l| l != record.local_id));
                    if let Some(other) = other {
                        let reason = format!(
                            "another {system} record ({}) has the same match key; not merged",
                            other.local_id.as_deref().unwrap_or_default()
                        );

                        let id = dead_letter_change(
                            tables,
                            entity,
                            system,
                            record,
                            DeadLetterClass::DuplicateMatchKey,
                            reason,
                            now,
                        )?;
                        return Ok(RecordOutcome::DeadLettered(id));
                    }
                    (id, state)
                }
                None => (GlobalId::new_v7(), None),
            }
        }
    };

    // Rollout on capture: a record outside this link's rollout is not taken from it.
    // Its match keys are the agreed ones when concord knows the record.
    let agreed_keys = state
        .as_ref()
        .filter(|_| entity.rollouts)
        .map(|s| key_values(entity, |k| s.base.value(k)));
    let rollout_keys = match &agreed_keys {
        Some(agreed) if record.kind == ChangeKind::Delete || keys.is_empty() => agreed,
        _ => &keys,
    };
    if !rollout_selects(link.config.rollout.as_ref(), rollout_keys) {
        return Ok(RecordOutcome::Skipped);
    }

    let source_time_ms = record.source_time_ms.unwrap_or(now);
    let change = Change {
        system: system.to_string(),
        entity: entity.name.clone(),
        local_id: record.local_id.clone(),
        kind: record.kind,
        fields,
        version: record.version.clone(),
        source_time_ms,
    };
    let decision_id = tables.next_id("decision")?;
    // Rollout of writes is decided on the agreed match keys, or the change's when new.
    let write_keys = agreed_keys.as_deref().unwrap_or(&keys);
    // The merge takes the stored state over; the match keys indexed for it are kept
    // here to compare with the new ones.
    let old_keys = state.as_mut().map(|s| std::mem::take(&mut s.match_keys));
    let output = merge_change(rt, entity, change, global_id, state, write_keys, decision_id, now);
    let mut decision = output.decision;
    let mut new_state = output.state;

    // Keep the match index in step with the agreed values; most changes leave the
    // keys as they were and write nothing here.
    let new_keys: std::collections::BTreeMap<String, String> =
        key_values(entity, |k| new_state.base.value(k)).into_iter().collect();
    let old_keys = old_keys.as_ref();
    if old_keys != Some(&new_keys) {
        for (key, value) in old_keys.into_iter().flatten() {
            if new_keys.get(key) != Some(value) {
                tables.remove_match_key(&entity.name, key, value, global_id)?;
            }
        }
        for (key, value) in &new_keys {
            if old_keys.and_then(|k| k.get(key)) != Some(value) {
                tables.put_match_key(&entity.name, key, value, global_id)?;
            }
        }
    }
    new_state.match_keys = new_keys;

    match record.kind {
        ChangeKind::Upsert if known.is_none() => {
            tables.put_identity(&entity.name, system, &record.local_id, global_id)?;
        }
        ChangeKind::Upsert => {}
        ChangeKind::Delete => {
            tables.remove_identity(&entity.name, system, &record.local_id)?;
        }
    }

    let mut wake = Vec::new();
    for (write, summary) in output.writes.into_iter().zip(decision.writes.iter_mut()) {
        if write.mode != WriteMode::Send {
            tally.dry_run(&write.system, &summary.action);
            continue;
        }
        wake.push(write.system.clone());
        let seq = tables.enqueue(OutboxEntry {
            seq: 0,
            system: write.system,
            entity: entity.name.clone(),
            global_id,
            action: write.action,
            source_system: system.to_string(),
            source_time_ms,
            decision: decision_id,
            enqueued_ms: now,
            attempts: 0,
            last_error: None,
        })?;
        summary.seq = Some(seq);
    }
    tables.put_record(&entity.name, global_id, &new_state)?;
    tables.put_decision(&decision)?;
    tally.decision(&decision);
    Ok(RecordOutcome::Merged(wake))
}

/// Builds the merge's view of every target and merges; `keys` decide each target's
/// rollout.
#[allow(clippy::too_many_arguments)]
fn merge_change(
    rt: &Runtime,
    entity: &EntityRuntime,
    change: Change,
    global_id: GlobalId,
    state: Option<RecordState>,
    keys: &[(String, String)],
    decision_id: u64,
    now: TimeMs,
) -> merge::MergeOutput {
    let targets: Vec<Target<'_>> = entity
        .links
        .iter()
        .map(|&i| &rt.links[i])
        .filter(|l| l.writes)
        .map(|l| Target {
            system: &l.config.system,
            fields: &l.outbound,
            may_create: l.config.write_mode().may_create(),
            may_update: l.config.write_mode().may_update(),
            on_delete: &l.config.on_delete,
            mode: if l.config.dry_run {
                WriteMode::DryRun
            } else if !rollout_selects(l.config.rollout.as_ref(), keys) {
                WriteMode::OutsideRollout
            } else {
                WriteMode::Send
            },
        })
        .collect();
    merge::merge(MergeInput {
        decision_id,
        global_id,
        state: state.map(std::borrow::Cow::Owned),
        change: std::borrow::Cow::Owned(change),
        policy: &entity.policy,
        targets: &targets,
        now_ms: now,
    })
}

/// The metrics of one batch's merges, counted as they happen and added to the
/// registry once per batch rather than once per change.
#[derive(Default)]
struct Tally {
    /// By outcome.
    merged: BTreeMap<&'static str, u64>,
    /// By field.
    conflicts: BTreeMap<String, u64>,
    /// By field and non-owner policy.
    rejections: BTreeMap<(String, &'static str), u64>,
    /// Writes a dry-run link would have made, by system and action.
    dry_runs: BTreeMap<(String, String), u64>,
}

impl Tally {
    fn decision(&mut self, decision: &merge::Decision) {
        *self.merged.entry(decision.outcome.as_str()).or_default() += 1;
        for field in &decision.fields {
            if field.conflict {
                *self.conflicts.entry(field.field.clone()).or_default() += 1;
            }
            if let Some(policy) = field.policy {
                *self
                    .rejections
                    .entry((field.field.clone(), policy.as_str()))
                    .or_default() += 1;
            }
        }
    }

    fn dry_run(&mut self, system: &str, action: &str) {
        *self
            .dry_runs
            .entry((system.to_string(), action.to_string()))
            .or_default() += 1;
    }

    fn emit(self, entity: &str) {
        for (outcome, n) in self.merged {
            metrics::counter!(m::CHANGES_MERGED, m::LABEL_ENTITY => entity.to_string(), m::LABEL_OUTCOME => outcome)
                .increment(n);
        }
        for (field, n) in self.conflicts {
            metrics::counter!(m::CONFLICTS, m::LABEL_ENTITY => entity.to_string(), m::LABEL_FIELD => field)
                .increment(n);
        }
        for ((field, policy), n) in self.rejections {
            metrics::counter!(m::FIELD_REJECTIONS, m::LABEL_ENTITY => entity.to_string(),
                m::LABEL_FIELD => field, m::LABEL_POLICY => policy)
            .increment(n);
        }
        for ((system, action), n) in self.dry_runs {
            metrics::counter!(m::WRITES, m::LABEL_SYSTEM => system, m::LABEL_ENTITY => entity.to_string(),
                m::LABEL_OP => action, m::LABEL_OUTCOME => "dry_run")
            .increment(n);
        }
    }
}
