//! The JSON API under `/api/v1`: status, one record across every system, decisions,
//! dead letters with replay, the write log and the audit log.
//!
//! Every handler runs its state store work in `spawn_blocking` (redb calls block on
//! disk). Responses that carry record values (a record, decisions, dead letters) are
//! sent only after the audit entry for the read is committed: a read that cannot be
//! audited fails instead of going unrecorded.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::AdminContext;
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery, Caller, NoBody};
use crate::engine::status::Status;
use crate::merge::{Decision, Rule};
use crate::model::{Fields, GlobalId, TimeMs, Value, now_ms};
use crate::state::{
    AuditEntry, DeadItem, DeadLetter, DeadLetterClass, DecisionFilter, StateError, StateStore, WriteLogEntry,
};

/// Rows a list returns when the request does not say.
const DEFAULT_LIMIT: usize = 100;
/// Most rows one list request returns; bounds the work and the response size.
const MAX_LIMIT: usize = 1000;
/// Decisions shown with a record: enough to explain its recent history.
const RECORD_DECISIONS: usize = 20;

/// Runs blocking state store work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(error) => Err(ApiError::internal("blocking admin task failed", &error)),
    }
}

/// Records one access in the audit log, in its own commit.
fn audit(store: &StateStore, caller: &Caller, action: &str, target: String) -> Result<(), StateError> {
    store.write(|tables| {
        tables.audit(AuditEntry {
            id: 0,
            time_ms: now_ms(),
            who: caller.who.clone(),
            action: action.to_string(),
            target,
            from: caller.from.clone(),
        })
    })?;
    Ok(())
}

fn rfc3339(ms: TimeMs) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn limit(requested: Option<usize>) -> Result<usize, ApiError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request(format!(
            "invalid query string: limit must be from 1 to {MAX_LIMIT}"
        ))),
    }
}

fn known_entity(ctx: &AdminContext, entity: &str) -> Result<(), ApiError> {
    if ctx.entities.contains(entity) {
        Ok(())
    } else {
        Err(ApiError::not_found("unknown entity"))
    }
}

/// `GET /api/v1/status`: the engine's status with store-backed counts refreshed.
pub async fn status(State(ctx): State<AdminContext>) -> Result<Json<Status>, ApiError> {
    let mut status = ctx.status.snapshot();
    let store = ctx.store.clone();
    let systems: Vec<String> = status.systems.keys().cloned().collect();
    let (records, outbox, dlq) = blocking(move || {
        let view = store.read()?;
        let outbox = systems
            .into_iter()
            .map(|s| view.outbox_depth(&s).map(|n| (s, n)))
            .collect::<Result<BTreeMap<String, u64>, StateError>>()?;
        Ok((view.record_count()?, outbox, view.dead_letter_depths()?))
    })
    .await?;
    status.records = records;
    // Only systems the engine registered are listed; their depths come from the store,
    // which is the truth, rather than from counters the engine keeps as it goes.
    for (name, system) in &mut status.systems {
        system.outbox_depth = outbox.get(name).copied().unwrap_or(0);
        system.dlq_depth = dlq.get(name).copied().unwrap_or(0);
    }
    Ok(Json(status))
}

#[derive(Serialize)]
pub struct RecordView {
    entity: String,
    global_id: GlobalId,
    deleted: bool,
    /// Agreed values with where each came from.
    fields: BTreeMap<String, FieldView>,
    /// What each system holds, as concord last saw it.
    systems: BTreeMap<String, SystemView>,
    match_keys: BTreeMap<String, String>,
    created: Option<String>,
    updated: Option<String>,
    recent_decisions: Vec<Decision>,
}

#[derive(Serialize)]
struct FieldView {
    value: Value,
    system: String,
    rule: Rule,
    source_time: Option<String>,
    version: Option<String>,
    decision: u64,
}

#[derive(Serialize)]
struct SystemView {
    local_id: Option<String>,
    fields: Fields,
    version: Option<String>,
    pending: Fields,
    diverged: BTreeSet<String>,
    deleted: bool,
}

/// Reads a record id: a global id (UUID) or `system:local_id`.
enum RecordRef {
    Global(GlobalId),
    Local { system: String, local_id: String },
}

impl RecordRef {
    fn parse(id: &str) -> Result<RecordRef, ApiError> {
        let invalid = || ApiError::bad_request("record id must be a uuid or system:local_id");
        // A UUID has no colon; a local id may, so only the first colon splits.
        match id.split_once(':') {
            Some((system, local_id)) if !system.is_empty() && !local_id.is_empty() => Ok(RecordRef::Local {
                system: system.to_string(),
                local_id: local_id.to_string(),
            }),
            Some(_) => Err(invalid()),
            None => id.parse::<GlobalId>().map(RecordRef::Global).map_err(|_| invalid()),
        }
    }
}

/// `GET /api/v1/entities/{entity}/records/{id}`: one record across every system.
pub async fn record(
    State(ctx): State<AdminContext>,
    caller: Caller,
    ApiPath((entity, id)): ApiPath<(String, String)>,
) -> Result<Json<RecordView>, ApiError> {
    known_entity(&ctx, &entity)?;
    let reference = RecordRef::parse(&id)?;
    let store = ctx.store.clone();
    let view = blocking(move || {
        let view = store.read()?;
        let global_id = match reference {
            RecordRef::Global(id) => id,
            RecordRef::Local { system, local_id } => match view.identity(&entity, &system, &local_id)? {
                Some(id) => id,
                None => return Err(ApiError::not_found("record not found")),
            },
        };
        let Some(state) = view.record(&entity, global_id)? else {
            return Err(ApiError::not_found("record not found"));
        };
        let filter = DecisionFilter {
            entity: Some(entity.clone()),
            global_id: Some(global_id),
            ..Default::default()
        };
        let recent_decisions = view.decisions(&filter, RECORD_DECISIONS)?;
        drop(view);
        audit(&store, &caller, "read_record", format!("{entity}/{global_id}"))?;
        Ok(RecordView {
            global_id,
            deleted: state.base.deleted,
            fields: state
                .base
                .fields
                .into_iter()
                .map(|(name, f)| {
                    let view = FieldView {
                        value: f.value,
                        system: f.from.system,
                        rule: f.from.rule,
                        source_time: rfc3339(f.from.source_time_ms),
                        version: f.from.version,
                        decision: f.from.decision,
                    };
                    (name, view)
                })
                .collect(),
            systems: state
                .shadows
                .into_iter()
                .map(|(name, s)| {
                    let view = SystemView {
                        local_id: s.local_id,
                        fields: s.fields,
                        version: s.version,
                        pending: s.pending,
                        diverged: s.diverged,
                        deleted: s.deleted,
                    };
                    (name, view)
                })
                .collect(),
            match_keys: state.match_keys,
            created: rfc3339(state.created_ms),
            updated: rfc3339(state.updated_ms),
            recent_decisions,
            entity,
        })
    })
    .await?;
    Ok(Json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionsQuery {
    entity: Option<String>,
    system: Option<String>,
    global_id: Option<GlobalId>,
    #[serde(default)]
    flagged: bool,
    #[serde(default)]
    conflicts: bool,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct DecisionsView {
    decisions: Vec<Decision>,
}

/// `GET /api/v1/decisions`: merge decisions, newest first. Decisions hold the proposed
/// and previous values of each field, so listing them is audited like a record read.
pub async fn decisions(
    State(ctx): State<AdminContext>,
    caller: Caller,
    ApiQuery(query): ApiQuery<DecisionsQuery>,
) -> Result<Json<DecisionsView>, ApiError> {
    let limit = limit(query.limit)?;
    if let Some(entity) = &query.entity {
        known_entity(&ctx, entity)?;
    }
    let filter = DecisionFilter {
        entity: query.entity,
        global_id: query.global_id,
        system: query.system,
        flagged_only: query.flagged,
        conflicts_only: query.conflicts,
    };
    let store = ctx.store.clone();
    let decisions = blocking(move || {
        let decisions = store.read()?.decisions(&filter, limit)?;
        audit(&store, &caller, "read_decisions", "decisions".to_string())?;
        Ok(decisions)
    })
    .await?;
    Ok(Json(DecisionsView { decisions }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemQuery {
    system: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct DeadLettersView {
    dead_letters: Vec<DeadLetterView>,
}

#[derive(Serialize)]
struct DeadLetterView {
    id: u64,
    time: Option<String>,
    system: String,
    entity: String,
    class: DeadLetterClass,
    reason: String,
    /// Whether `POST /api/v1/dlq/{id}/replay` can act on it.
    replayable: bool,
    /// The item whole, values included: an operator needs them to fix the data.
    item: DeadItem,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(letter: DeadLetter) -> Self {
        DeadLetterView {
            id: letter.id,
            time: rfc3339(letter.time_ms),
            system: letter.system,
            entity: letter.entity,
            class: letter.class,
            reason: letter.reason,
            replayable: !matches!(letter.item, DeadItem::Reject { .. }),
            item: letter.item,
        }
    }
}

/// `GET /api/v1/dlq`: dead letters, newest first, with their values; audited.
pub async fn dead_letters(
    State(ctx): State<AdminContext>,
    caller: Caller,
    ApiQuery(query): ApiQuery<SystemQuery>,
) -> Result<Json<DeadLettersView>, ApiError> {
    let limit = limit(query.limit)?;
    let store = ctx.store.clone();
    let letters = blocking(move || {
        let letters = store.read()?.dead_letters(query.system.as_deref(), limit)?;
        let target = match &query.system {
            Some(system) => format!("dlq?system={system}"),
            None => "dlq".to_string(),
        };
        audit(&store, &caller, "read_dlq", target)?;
        Ok(letters)
    })
    .await?;
    Ok(Json(DeadLettersView {
        dead_letters: letters.into_iter().map(DeadLetterView::from).collect(),
    }))
}

/// `POST /api/v1/dlq/{id}/replay`: hands one dead letter back to the engine.
pub async fn replay(
    State(ctx): State<AdminContext>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    _body: NoBody,
) -> Result<Json<super::ReplayOutcome>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("dead letter id must be a positive integer"))?;
    let store = ctx.store.clone();
    let replay = ctx.replay.clone();
    let outcome = blocking(move || {
        // The attempt is audited before it runs, so no replay goes unrecorded even if
        // the process stops halfway.
        audit(&store, &caller, "replay_dlq", format!("dlq/{id}"))?;
        Ok(replay(id)?)
    })
    .await?;
    Ok(Json(outcome))
}

#[derive(Serialize)]
pub struct WritesView {
    writes: Vec<WriteLogEntry>,
}

/// `GET /api/v1/writes`: write attempts (without values), newest first.
pub async fn writes(
    State(ctx): State<AdminContext>,
    ApiQuery(query): ApiQuery<SystemQuery>,
) -> Result<Json<WritesView>, ApiError> {
    let limit = limit(query.limit)?;
    let store = ctx.store.clone();
    let writes = blocking(move || Ok(store.read()?.write_log(query.system.as_deref(), limit)?)).await?;
    Ok(Json(WritesView { writes }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct AuditView {
    audit: Vec<AuditEntry>,
}

/// `GET /api/v1/audit`: audit entries, newest first.
pub async fn audit_log(
    State(ctx): State<AdminContext>,
    ApiQuery(query): ApiQuery<LimitQuery>,
) -> Result<Json<AuditView>, ApiError> {
    let limit = limit(query.limit)?;
    let store = ctx.store.clone();
    let audit = blocking(move || Ok(store.read()?.audit(limit)?)).await?;
    Ok(Json(AuditView { audit }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_refs_parse_or_refuse() {
        let id = "0190a3c2-0000-7000-8000-000000000001";
        assert!(matches!(RecordRef::parse(id), Ok(RecordRef::Global(g)) if g.to_string() == id));
        match RecordRef::parse("crm:acct:42") {
            Ok(RecordRef::Local { system, local_id }) => {
                assert_eq!(system, "crm");
                assert_eq!(local_id, "acct:42");
            }
            _ => panic!("system:local id with a colon in the local part must parse"),
        }
        for bad in ["", "not-a-uuid", ":42", "crm:", ":"] {
            let error = RecordRef::parse(bad).err().map(|e| e.status);
            assert_eq!(error, Some(axum::http::StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }

    #[test]
    fn limits_default_and_bound() {
        assert_eq!(limit(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(limit(Some(1)).ok(), Some(1));
        assert_eq!(limit(Some(MAX_LIMIT)).ok(), Some(MAX_LIMIT));
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
    }

    #[test]
    fn times_render_as_rfc3339_utc() {
        assert_eq!(rfc3339(1_700_000_000_123).as_deref(), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(rfc3339(i64::MAX), None);
    }
}
