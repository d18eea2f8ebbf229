//! What the engine knows about its own health, shared with the admin API. Updated by
//! capture tasks and appliers as they go; read as a snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::model::TimeMs;

#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    pub link: String,
    pub system: String,
    pub entity: String,
    /// `starting`, `running`, `idle` (caught up), `backing_off`, `stopped` (fatal error).
    pub state: String,
    pub lag_seconds: f64,
    pub last_success_ms: Option<TimeMs>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<TimeMs>,
    pub captured: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemStatus {
    pub system: String,
    /// `running`, `idle`, `backing_off`; `source_only` for systems concord never writes.
    pub state: String,
    pub outbox_depth: u64,
    pub dlq_depth: u64,
    pub last_success_ms: Option<TimeMs>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<TimeMs>,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub retry_at_ms: Option<TimeMs>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub started_ms: TimeMs,
    /// Every link and applier has started.
    pub ready: bool,
    pub records: u64,
    pub links: BTreeMap<String, LinkStatus>,
    pub systems: BTreeMap<String, SystemStatus>,
}

/// Status shared between the engine's tasks and the admin API.
#[derive(Debug, Clone, Default)]
pub struct SharedStatus(Arc<Mutex<Status>>);

impl SharedStatus {
    pub fn update<T>(&self, f: impl FnOnce(&mut Status) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    pub fn link<T>(&self, link: &str, f: impl FnOnce(&mut LinkStatus) -> T) -> T {
        self.update(|s| f(s.links.entry(link.to_string()).or_default()))
    }

    pub fn system<T>(&self, system: &str, f: impl FnOnce(&mut SystemStatus) -> T) -> T {
        self.update(|s| {
            let entry = s.systems.entry(system.to_string()).or_default();
            entry.system = system.to_string();
            f(entry)
        })
    }

    pub fn snapshot(&self) -> Status {
        self.update(|s| s.clone())
    }
}
