//! Admin HTTP: health, readiness, Prometheus metrics, and the JSON status API.

use std::sync::Arc;

use serde::Serialize;

use crate::engine::status::SharedStatus;
use crate::state::StateStore;

/// What replaying a dead letter did.
#[derive(Debug, Clone, Serialize)]
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

/// Replays one dead letter by id.
pub type ReplayFn = Arc<dyn Fn(u64) -> Result<ReplayOutcome, ReplayError> + Send + Sync>;

/// Everything the admin API reads or acts on.
#[derive(Clone)]
pub struct AdminContext {
    pub store: StateStore,
    pub status: SharedStatus,
    /// Renders the Prometheus exposition; `None` when no recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub replay: ReplayFn,
    /// Entity names, to tell an unknown entity from an unknown record.
    pub entities: Vec<String>,
}
