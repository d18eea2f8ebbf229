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
    /// The link has been idle (caught up) or stopped at least once since the engine
    /// started: its first capture is over. Writes toward its system wait for it.
    pub first_capture_done: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemStatus {
    pub system: String,
    /// `running`, `idle`, `backing_off`; `awaiting_first_capture` until every link capturing
    /// from the system has finished its first capture; `source_only` for systems concord
    /// never writes.
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

/// The outcome of the last configuration reload (SIGHUP).
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    pub time_ms: TimeMs,
    /// The new configuration is running.
    pub ok: bool,
    /// Why it was refused (a count of problems, never their text: the log has those).
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub started_ms: TimeMs,
    /// Every link and applier has started.
    pub ready: bool,
    pub records: u64,
    /// The last reload; `None` until the first SIGHUP.
    pub last_reload: Option<ReloadOutcome>,
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
        self.update(|s| {
            let entry = s.links.entry(link.to_string()).or_default();
            let out = f(entry);
            if entry.state == "idle" || entry.state == "stopped" {
                entry.first_capture_done = true;
            }
            out
        })
    }

    /// Whether every link named in `links` has finished its first capture.
    pub fn first_captures_done<'a>(&self, mut links: impl Iterator<Item = &'a str>) -> bool {
        self.update(|s| links.all(|l| s.links.get(l).is_some_and(|l| l.first_capture_done)))
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

/// When the engine last made progress, for the service manager's watchdog: the
/// maintenance loop bumps it several times a second and capture loops on every
/// iteration, so a stale heartbeat means the engine's loops are stuck.
#[derive(Debug, Clone)]
pub struct Heartbeat(Arc<HeartbeatInner>);

#[derive(Debug)]
struct HeartbeatInner {
    origin: std::time::Instant,
    /// Milliseconds since `origin` at the last bump.
    last_ms: std::sync::atomic::AtomicU64,
    /// Milliseconds since `origin` after which bumps are ignored; `u64::MAX` for never.
    frozen_after_ms: std::sync::atomic::AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat(Arc::new(HeartbeatInner {
            origin: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
            frozen_after_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
        }))
    }
}

impl Heartbeat {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.0.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records progress now.
    pub fn bump(&self) {
        let now = self.elapsed_ms();
        if now <= self.0.frozen_after_ms.load(std::sync::atomic::Ordering::Relaxed) {
            self.0.last_ms.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Time since the last bump.
    pub fn age(&self) -> std::time::Duration {
        let last = self.0.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        std::time::Duration::from_millis(self.elapsed_ms().saturating_sub(last))
    }

    /// Test hook: ignore every bump from `after` from now on, as if the engine had
    /// stalled, so the watchdog can be seen to stop. The daemon calls it only when
    /// `CONCORD_TEST_STALL_AFTER_MS` is set.
    pub fn freeze_after(&self, after: std::time::Duration) {
        let at = self
            .elapsed_ms()
            .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        self.0.frozen_after_ms.store(at, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_ages_and_freezes() {
        let gap = std::time::Duration::from_millis(300);
        let beat = Heartbeat::default();
        std::thread::sleep(gap);
        let stale = beat.age();
        assert!(stale >= gap);
        beat.bump();
        assert!(beat.age() < stale, "a bump makes the heartbeat fresh");
        beat.freeze_after(std::time::Duration::ZERO);
        std::thread::sleep(gap);
        beat.bump();
        assert!(beat.age() >= gap, "a frozen heartbeat ignores bumps");
    }
}
