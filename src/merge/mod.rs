//! The three-way merge with field authority: given what concord last agreed for a
//! record (the base), what the changing system was last seen to hold (its shadow) and
//! what it holds now (the change), decide each field, produce the new agreed record,
//! and plan the writes that bring every other system in line.
//!
//! This module is pure: no I/O, no clock, no randomness. The decision id, the current
//! time and every policy come in as arguments, so the same inputs always give the same
//! decision, and the property tests below can state the laws the merge keeps.
//!
//! For a field `f` of a change `C` from system `S`, with base `B` and shadow `H`:
//! 1. `C.f == H.f`: S did not change it; not a proposal (rule `unchanged`). A field S
//!    never reported counts as null, as a field with no agreed value does.
//! 2. `C.f == B.f`: S now holds the agreed value (typically the echo of our own
//!    write); not a proposal (rule `already_agreed`). When S owns `f` and the agreed
//!    value was set by a non-owner (or an owner of lower precedence), S takes the
//!    value's provenance: the owner now vouches for it, so a later change by a
//!    non-owner is decided against the owner instead of by the default policy.
//! 3. Otherwise a proposal, decided by authority:
//!    - S owns `f`: accepted, unless the agreed value was set by an owner of higher
//!      precedence (or, with `owners_equal`, by an owner at a later source time).
//!    - S does not own `f` and an owner has set it: rejected; by the field's policy the
//!      agreed value is written back to S (`revert`), or S keeps its value and nothing
//!      spreads (`ignore`), or the same and the decision is flagged for review (`flag`).
//!    - No owner has set it: the entity's default policy decides (last writer by
//!      source time, or first writer).
//!
//! A proposal where the agreed value was set by another system that S had not seen
//! yet (`B.f != H.f`) is a conflict: decided by the same rules, and always recorded.
//! Finally every target system gets one planned write with the fields where the new
//! base differs from what that system holds or is about to hold. A rejected change of
//! a field concord has a write pending for in the changing system is written back
//! again: the system's change may have landed after that write.
//!
//! A delete from a system allowed to delete ends an agreed record (a tombstone) and is
//! carried, by each link's `on_delete`, to every other system that holds the record and
//! whose link may update it; a delete from any other system only marks its own copy
//! gone. A system whose copy is gone is not written to until it shows the record again,
//! and only such a showing, or a first one by a system new to the record, revives a
//! tombstone.

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{DefaultPolicy, EntityConfig, NonOwnerPolicy, OnDelete};
use crate::model::{AgreedField, Change, ChangeKind, Fields, GlobalId, Provenance, RecordState, Shadow, TimeMs, Value};

/// The rule that decided one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The system did not change the field.
    Unchanged,
    /// The system holds the agreed value already.
    AlreadyAgreed,
    /// Accepted from an owner of the field.
    Owner,
    /// Accepted from an owner over a value set by a lower-precedence owner.
    OwnerPrecedence,
    /// Accepted from an equal owner with a later source time.
    OwnerLatest,
    /// Accepted under the entity's last-writer-wins policy.
    LastWriterWins,
    /// Accepted under the entity's first-writer-wins policy.
    FirstWriterWins,
    /// Rejected: the system does not own the field and an owner has set it.
    NonOwner,
    /// Rejected: an owner of higher precedence set the agreed value.
    LowerPrecedence,
    /// Rejected: the agreed value has a later source time.
    Stale,
    /// Rejected: the field was set first by another system.
    FirstWriterKept,
    /// The record was deleted by a system allowed to delete it.
    Deleted,
    /// A delete from a system that may not delete this entity.
    DeleteNotAllowed,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Unchanged => "unchanged",
            Rule::AlreadyAgreed => "already_agreed",
            Rule::Owner => "owner",
            Rule::OwnerPrecedence => "owner_precedence",
            Rule::OwnerLatest => "owner_latest",
            Rule::LastWriterWins => "last_writer_wins",
            Rule::FirstWriterWins => "first_writer_wins",
            Rule::NonOwner => "non_owner",
            Rule::LowerPrecedence => "lower_precedence",
            Rule::Stale => "stale",
            Rule::FirstWriterKept => "first_writer_kept",
            Rule::Deleted => "deleted",
            Rule::DeleteNotAllowed => "delete_not_allowed",
        }
    }
    pub fn accepts(self) -> bool {
        matches!(
            self,
            Rule::Owner | Rule::OwnerPrecedence | Rule::OwnerLatest | Rule::LastWriterWins | Rule::FirstWriterWins
        )
    }
}

/// Field authority of one entity, compiled from configuration.
#[derive(Debug, Clone, Default)]
pub struct EntityPolicy {
    pub fields: BTreeMap<String, FieldPolicy>,
    pub default: DefaultPolicy,
    /// Systems whose deletes end a record; empty means any.
    pub delete_allowed_from: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FieldPolicy {
    /// Owners, highest precedence first.
    pub owners: Vec<String>,
    pub owners_equal: bool,
    pub non_owner: NonOwnerPolicy,
}

impl FieldPolicy {
    /// The system's place among the owners (0 is the highest), or `None` for a non-owner.
    pub fn rank(&self, system: &str) -> Option<usize> {
        self.owners.iter().position(|o| o == system)
    }
}

impl EntityPolicy {
    pub fn from_config(entity: &EntityConfig) -> Self {
        Self {
            fields: entity
                .fields
                .iter()
                .map(|(name, f)| {
                    (
                        name.clone(),
                        FieldPolicy {
                            owners: f.owners.clone(),
                            owners_equal: f.owners_equal,
                            non_owner: f.non_owner,
                        },
                    )
                })
                .collect(),
            default: entity.default_policy,
            delete_allowed_from: entity.delete.allowed_from.clone(),
        }
    }

    fn may_delete(&self, system: &str) -> bool {
        self.delete_allowed_from.is_empty() || self.delete_allowed_from.iter().any(|s| s == system)
    }
}

/// Whether planned writes to a target are sent, or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Goes to the outbox.
    Send,
    /// The link is in dry-run (shadow) mode: recorded as "would write".
    DryRun,
    /// The record is outside the link's rollout: recorded, not sent.
    OutsideRollout,
}

/// One system that may receive writes for this entity, as the merge needs to see it.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub system: &'a str,
    /// Canonical fields this system's link writes.
    pub fields: &'a BTreeSet<String>,
    pub may_create: bool,
    pub may_update: bool,
    pub on_delete: &'a OnDelete,
    pub mode: WriteMode,
}

/// The merge's inputs.
#[derive(Debug, Clone)]
pub struct MergeInput<'a> {
    pub decision_id: u64,
    pub global_id: GlobalId,
    /// What concord holds for the record; `None` when the change is the first sighting.
    /// A caller done with the stored state hands it over (`Cow::Owned`) and saves the
    /// merge a copy of it.
    pub state: Option<Cow<'a, RecordState>>,
    /// The change to merge. A caller done with it hands it over (`Cow::Owned`): its
    /// values then move into the record instead of being copied.
    pub change: Cow<'a, Change>,
    pub policy: &'a EntityPolicy,
    pub targets: &'a [Target<'a>],
    pub now_ms: TimeMs,
}

/// How one field was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldDecision {
    pub field: String,
    pub rule: Rule,
    /// The value the change proposed.
    pub incoming: Value,
    /// The agreed value before the merge.
    pub previous: Option<Value>,
    /// Another system set the agreed value since this system last saw it.
    pub conflict: bool,
    /// For rejected proposals, what happens in the proposing system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<NonOwnerPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    Updated,
    Deleted,
    /// Nothing agreed changed (an echo, a replay, or only rejected proposals).
    Noop,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Deleted => "deleted",
            Outcome::Noop => "noop",
        }
    }
}

/// A write the merge planned for one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedWrite {
    pub system: String,
    pub action: WriteAction,
    pub mode: WriteMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteAction {
    /// Set these canonical fields (create the record if the system lacks it).
    Upsert { fields: Fields },
    /// Delete the record in the system.
    Delete,
    /// Set one system field instead of deleting.
    SoftDelete { field: String, value: Value },
}

impl WriteAction {
    pub fn field_names(&self) -> Vec<String> {
        match self {
            WriteAction::Upsert { fields } => fields.keys().cloned().collect(),
            WriteAction::Delete => Vec::new(),
            WriteAction::SoftDelete { field, .. } => vec![field.clone()],
        }
    }
}

/// The record of one merge: inputs, the rule per field, the outcome, the writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub id: u64,
    pub time_ms: TimeMs,
    pub entity: String,
    pub global_id: GlobalId,
    pub system: String,
    pub local_id: String,
    pub kind: ChangeKind,
    pub source_time_ms: TimeMs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Every field the change proposed (unchanged fields are left out).
    pub fields: Vec<FieldDecision>,
    pub outcome: Outcome,
    /// A rejected proposal was parked for review.
    pub flagged: bool,
    pub writes: Vec<WriteSummary>,
}

impl Decision {
    pub fn conflicts(&self) -> impl Iterator<Item = &FieldDecision> {
        self.fields.iter().filter(|f| f.conflict)
    }
}

/// A planned write as the decision remembers it: no values, only which fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteSummary {
    pub system: String,
    pub mode: WriteMode,
    pub action: String,
    pub fields: Vec<String>,
    /// Outbox sequence, filled in by the engine when the write is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The merge's result: the record to store, the decision, the planned writes.
#[derive(Debug, Clone)]
pub struct MergeOutput {
    pub state: RecordState,
    pub decision: Decision,
    pub writes: Vec<PlannedWrite>,
}

/// Merges one change. See the module documentation for the rules.
pub fn merge(mut input: MergeInput<'_>) -> MergeOutput {
    let stored = input.state.take();
    let is_new = stored
        .as_ref()
        .is_none_or(|s| s.base.fields.is_empty() && !s.base.deleted);
    let mut state = stored.map(Cow::into_owned).unwrap_or_else(|| RecordState {
        created_ms: input.now_ms,
        updated_ms: input.now_ms,
        ..RecordState::default()
    });
    // The base's fields change below only where a change is accepted, so the one thing
    // of the base before the merge that is still needed is whether it was deleted.
    let was_deleted = state.base.deleted;
    // The incoming values end up in the system's shadow: they are taken out of the
    // change and moved there (a borrowed change is copied once, here).
    let incoming_fields = std::mem::take(&mut input.change.to_mut().fields);
    let change: &Change = &input.change;
    let mut decisions: Vec<FieldDecision> = Vec::new();
    let mut flagged = false;
    // Fields the changing system changed away from the agreed value while a write of
    // that value to it was pending: see `plan_writes`.
    let mut contested: BTreeSet<String> = BTreeSet::new();

    let (shadow_key, seen_before) = match state.shadows.remove_entry(&change.system) {
        Some((key, shadow)) => (key, Some(shadow)),
        None => (change.system.clone(), None),
    };
    // The system shows a record it did not hold (it is new to it, or it deleted it):
    // only that re-creates a deleted record. A system that kept its copy (its link
    // ignores deletes, or soft-deletes) reports it again on every export.
    let reappears = seen_before.as_ref().is_none_or(|s| s.deleted);
    let mut shadow = seen_before.unwrap_or_default();
    if shadow.local_id.as_deref() != Some(change.local_id.as_str()) {
        shadow.local_id = Some(change.local_id.clone());
    }
    if change.version.is_some() {
        shadow.version = change.version.clone();
    }

    let mut outcome = Outcome::Noop;
    match change.kind {
        ChangeKind::Upsert => {
            shadow.deleted = false;
            if state.base.deleted && reappears {
                // A system re-created the record: it lives again.
                state.base.deleted = false;
            }
            let mut accepted_any = false;
            for (field, incoming) in incoming_fields {
                let decision = decide_field(&input, &state, &shadow, &field, &incoming);
                if let Some(decision) = decision {
                    let provenance = |rule| Provenance {
                        system: change.system.clone(),
                        version: change.version.clone(),
                        source_time_ms: change.source_time_ms,
                        rule,
                        decision: input.decision_id,
                    };
                    if decision.rule.accepts() {
                        let from = provenance(decision.rule);
                        match state.base.fields.get_mut(&field) {
                            Some(agreed) => {
                                agreed.value.clone_from(&incoming);
                                agreed.from = from;
                            }
                            None => {
                                let value = incoming.clone();
                                state.base.fields.insert(field.clone(), AgreedField { value, from });
                            }
                        }
                        accepted_any = true;
                        shadow.diverged.remove(&field);
                    } else if decision.rule == Rule::AlreadyAgreed {
                        shadow.diverged.remove(&field);
                        if owner_takes_provenance(&input, &state, &field) {
                            if let Some(agreed) = state.base.fields.get_mut(&field) {
                                agreed.from = provenance(Rule::AlreadyAgreed);
                            }
                        }
                    } else if matches!(decision.policy, Some(NonOwnerPolicy::Ignore | NonOwnerPolicy::Flag)) {
                        shadow.diverged.insert(field.clone());
                        flagged |= decision.policy == Some(NonOwnerPolicy::Flag);
                    } else if shadow.pending.contains_key(&field) {
                        contested.insert(field.clone());
                    }
                    decisions.push(decision);
                }
                // The system holds `incoming` now, whatever was decided.
                if shadow.pending.get(&field) == Some(&incoming) {
                    shadow.pending.remove(&field);
                }
                shadow.fields.insert(field, incoming);
            }
            if accepted_any {
                outcome = if is_new { Outcome::Created } else { Outcome::Updated };
            } else if was_deleted && !state.base.deleted {
                outcome = Outcome::Updated;
            }
        }
        ChangeKind::Delete => {
            shadow.deleted = true;
            shadow.pending.clear();
            let rule = if input.policy.may_delete(&change.system) {
                Rule::Deleted
            } else {
                Rule::DeleteNotAllowed
            };
            // A record nothing was ever agreed for has nothing to end; a tombstone on it
            // would only make a replay of this delete decide differently.
            if rule == Rule::Deleted && !state.base.deleted && !is_new {
                state.base.deleted = true;
                outcome = Outcome::Deleted;
            }
            decisions.push(FieldDecision {
                field: String::new(),
                rule,
                incoming: Value::Null,
                previous: None,
                conflict: false,
                policy: None,
            });
        }
    }
    state.shadows.insert(shadow_key, shadow);

    let writes = plan_writes(&input, &mut state, &decisions, &contested, outcome);
    if outcome != Outcome::Noop {
        state.updated_ms = input.now_ms;
    }
    let Change {
        system,
        entity,
        local_id,
        kind,
        version,
        source_time_ms,
        ..
    } = input.change.into_owned();
    let decision = Decision {
        id: input.decision_id,
        time_ms: input.now_ms,
        entity,
        global_id: input.global_id,
        system,
        local_id,
        kind,
        source_time_ms,
        version,
        fields: decisions,
        outcome,
        flagged,
        writes: writes
            .iter()
            .map(|w| WriteSummary {
                system: w.system.clone(),
                mode: w.mode,
                action: match &w.action {
                    WriteAction::Upsert { .. } => "upsert".into(),
                    WriteAction::Delete => "delete".into(),
                    WriteAction::SoftDelete { .. } => "soft_delete".into(),
                },
                fields: w.action.field_names(),
                seq: None,
            })
            .collect(),
    };
    MergeOutput {
        state,
        decision,
        writes,
    }
}

/// Whether the changing system, reporting the agreed value of `field`, should take its
/// provenance: it owns the field and ranks above whoever set the value (a non-owner,
/// or, unless owners are equal, an owner of lower precedence).
fn owner_takes_provenance(input: &MergeInput<'_>, state: &RecordState, field: &str) -> bool {
    let Some(agreed) = state.base.fields.get(field) else {
        return false;
    };
    let Some(policy) = input.policy.fields.get(field) else {
        return false;
    };
    match (policy.rank(&input.change.system), policy.rank(&agreed.from.system)) {
        (Some(_), None) => true,
        (Some(mine), Some(theirs)) => !policy.owners_equal && mine < theirs,
        (None, _) => false,
    }
}

/// Decides one field of an upsert; `None` when the system did not change it.
fn decide_field(
    input: &MergeInput<'_>,
    state: &RecordState,
    shadow: &crate::model::Shadow,
    field: &str,
    incoming: &Value,
) -> Option<FieldDecision> {
    let change: &Change = &input.change;
    let agreed = state.base.fields.get(field);
    let agreed_value = agreed.map(|a| &a.value).unwrap_or(&Value::Null);
    // A field the system never reported counts as null, as an absent agreed value does:
    // a system that first shows a record with a field empty has not emptied it.
    let seen = shadow.fields.get(field).unwrap_or(&Value::Null);
    let make = |rule: Rule, conflict: bool, policy: Option<NonOwnerPolicy>| FieldDecision {
        field: field.to_string(),
        rule,
        incoming: incoming.clone(),
        previous: agreed.map(|a| a.value.clone()),
        conflict,
        policy,
    };

    if seen == incoming {
        return None;
    }
    if incoming == agreed_value {
        return Some(make(Rule::AlreadyAgreed, false, None));
    }
    // Another system set the agreed value and this one had not seen it.
    let conflict = agreed.is_some_and(|a| a.from.system != change.system && seen != &a.value);
    let field_policy = input.policy.fields.get(field);
    let rank = |system: &str| field_policy.and_then(|p| p.rank(system));
    let agreed_by_owner = agreed.and_then(|a| rank(&a.from.system).map(|r| (r, a)));

    let (rule, policy) = match (rank(&change.system), agreed_by_owner) {
        (Some(mine), Some((theirs, a))) if a.from.system != change.system => {
            let equal = field_policy.is_some_and(|p| p.owners_equal);
            if equal {
                if change.source_time_ms >= a.from.source_time_ms {
                    (Rule::OwnerLatest, None)
                } else {
                    (Rule::Stale, Some(NonOwnerPolicy::Revert))
                }
            } else if mine <= theirs {
                (
                    if mine < theirs {
                        Rule::OwnerPrecedence
                    } else {
                        Rule::Owner
                    },
                    None,
                )
            } else {
                (
                    Rule::LowerPrecedence,
                    Some(field_policy.map(|p| p.non_owner).unwrap_or_default()),
                )
            }
        }
        (Some(_), _) => (Rule::Owner, None),
        (None, Some(_)) => (
            Rule::NonOwner,
            Some(field_policy.map(|p| p.non_owner).unwrap_or_default()),
        ),
        (None, None) => match input.policy.default {
            DefaultPolicy::LastWriterWins => match agreed {
                Some(a) if change.source_time_ms < a.from.source_time_ms => (Rule::Stale, Some(NonOwnerPolicy::Revert)),
                _ => (Rule::LastWriterWins, None),
            },
            DefaultPolicy::FirstWriterWins => {
                if agreed_value.is_null() {
                    (Rule::FirstWriterWins, None)
                } else {
                    (Rule::FirstWriterKept, Some(NonOwnerPolicy::Revert))
                }
            }
        },
    };
    Some(make(rule, conflict, policy))
}

/// Plans one write per target whose expected state differs from the new base, and
/// marks the values of sent writes as pending in that target's shadow.
fn plan_writes(
    input: &MergeInput<'_>,
    state: &mut RecordState,
    decisions: &[FieldDecision],
    contested: &BTreeSet<String>,
    outcome: Outcome,
) -> Vec<PlannedWrite> {
    let mut writes = Vec::new();
    for target in input.targets {
        let shadow = state.shadows.get(target.system);
        let holds_record = shadow.is_some_and(|s| !s.deleted && (s.local_id.is_some() || !s.pending.is_empty()));
        if state.base.deleted {
            // A delete changes a record the system holds: links that only create, or
            // never write, are left alone.
            if outcome != Outcome::Deleted
                || !holds_record
                || !target.may_update
                || target.system == input.change.system
            {
                continue;
            }
            let action = match target.on_delete {
                OnDelete::Propagate => WriteAction::Delete,
                OnDelete::Ignore => continue,
                OnDelete::SoftDelete { field, value } => WriteAction::SoftDelete {
                    field: field.clone(),
                    value: value.clone(),
                },
            };
            if target.mode == WriteMode::Send && matches!(action, WriteAction::Delete) {
                if let Some(s) = state.shadows.get_mut(target.system) {
                    s.deleted = true;
                    s.pending.clear();
                }
            }
            writes.push(PlannedWrite {
                system: target.system.to_string(),
                action,
                mode: target.mode,
            });
            continue;
        }
        if shadow.is_some_and(|s| s.deleted) {
            // The system deleted its copy (or concord deleted it there); concord does
            // not write to it until it shows the record again. That holds for a system
            // whose delete was not allowed, too: the record lives on elsewhere.
            continue;
        }
        if holds_record && !target.may_update || !holds_record && !target.may_create {
            continue;
        }
        let mut fields = Fields::new();
        for name in target.fields {
            let Some(agreed) = state.base.fields.get(name) else {
                continue;
            };
            // Agreed values change only by being accepted from this change.
            let changed_now = decisions.iter().any(|d| d.rule.accepts() && &d.field == name);
            let expected = shadow.and_then(|s| s.expected(name));
            let diverged = shadow.is_some_and(|s| s.diverged.contains(name));
            if diverged && !changed_now {
                continue;
            }
            // A field the system was never seen or written to hold counts as null, as
            // in `decide_field`: a create leaves empty fields out, and a later merge
            // must not then write them as if they had changed.
            // The changing system reports a value of its own over a pending write of the
            // agreed one. Whether that write landed before or after the system's change
            // is unknown (the write may be in flight, its acknowledgement not yet
            // recorded), and the acknowledgement will record the written value as held:
            // without another write the system could keep its value while concord
            // believes it reverted. The value is written again; when the pending write
            // landed last, the repeat sets the same value and is harmless.
            let contested_here = target.system == input.change.system && contested.contains(name);
            let differs = contested_here || expected.unwrap_or(&Value::Null) != &agreed.value;
            if differs {
                fields.insert(name.clone(), agreed.value.clone());
            }
        }
        if fields.is_empty() {
            continue;
        }
        if target.mode == WriteMode::Send {
            let s = state.shadows.entry(target.system.to_string()).or_default();
            for (name, value) in &fields {
                s.diverged.remove(name);
                s.pending.insert(name.clone(), value.clone());
            }
        }
        writes.push(PlannedWrite {
            system: target.system.to_string(),
            action: WriteAction::Upsert { fields },
            mode: target.mode,
        });
    }
    writes
}

/// Records a write a system confirmed: it now holds `written`, under `local_id`.
pub fn confirm_write(
    state: &mut RecordState,
    system: &str,
    written: &Fields,
    local_id: &str,
    version: Option<String>,
    deleted: bool,
) {
    let shadow = state.shadows.entry(system.to_string()).or_default();
    confirm_shadow(shadow, written, local_id, version, deleted);
}

/// [`confirm_write`] on the system's shadow alone, for a caller that changes the
/// shadow in place (`WriteTables::update_shadow`).
pub fn confirm_shadow(shadow: &mut Shadow, written: &Fields, local_id: &str, version: Option<String>, deleted: bool) {
    if shadow.local_id.as_deref() != Some(local_id) {
        shadow.local_id = Some(local_id.to_string());
    }
    if version.is_some() {
        shadow.version = version;
    }
    for (name, value) in written {
        if shadow.pending.get(name) == Some(value) {
            shadow.pending.remove(name);
        }
        match shadow.fields.get_mut(name) {
            Some(held) => held.clone_from(value),
            None => {
                shadow.fields.insert(name.clone(), value.clone());
            }
        }
    }
    shadow.deleted = deleted;
}

/// Forgets pending values of a write that will not be made (dead-lettered), so the
/// next merge plans it again against what the system really holds.
pub fn abandon_write(state: &mut RecordState, system: &str, fields: &Fields) {
    if let Some(shadow) = state.shadows.get_mut(system) {
        for (name, value) in fields {
            if shadow.pending.get(name) == Some(value) {
                shadow.pending.remove(name);
            }
        }
    }
}
