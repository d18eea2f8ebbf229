//! Simulated business systems for `concord demo` and the integration tests: a CRM that
//! follows the Salesforce REST conventions ([`crm`]), an LMS with Link-header
//! pagination and ETags ([`lms`]), and an HR platform that drops nightly CSV exports
//! into a folder ([`hr`]).
//!
//! The HTTP simulators are real servers on loopback (axum, port 0 unless asked for
//! another) over in-memory stores. Each comes with a handle that
//! - changes data the way a user of that system would (edit a field, create, delete),
//!   bumping the system's own modification time as the real system does,
//! - reads the whole store back for assertions,
//! - counts requests, writes, 429s and 5xx answers,
//! - injects faults: the next N requests answer 429, 500 or stall past a client's
//!   timeout, a user edits a record between concord's read and its write (so an
//!   `If-Match` write meets a 412), and a requests-per-second limit answered with 429.
//!
//! The simulators follow the documented behaviour of the APIs they imitate, including
//! their traps (second-precision timestamps that many records share, lazily evaluated
//! pages that shift under a concurrent edit), so the code that talks to them is the code
//! that would talk to the real thing. They never panic on a request: a malformed one is
//! answered with the error the real API gives.

pub mod crm;
pub mod hr;
pub mod lms;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

pub use crm::{CrmOptions, CrmSim};
pub use hr::HrExport;
pub use lms::{LmsOptions, LmsSim};

/// A fault a simulator answers a request with instead of serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After: <retry_after_secs>`.
    TooManyRequests { retry_after_secs: u64 },
    /// 500 with the system's error body; nothing is applied.
    ServerError,
    /// 503 with `Retry-After: <retry_after_secs>`; nothing is applied.
    Unavailable { retry_after_secs: u64 },
    /// Waits this long before serving the request (a client with a shorter timeout
    /// gives up; the request is then never applied).
    StallBefore(Duration),
    /// Serves the request (a write is applied), then waits this long before answering:
    /// a client that times out does not know its write took effect.
    StallAfter(Duration),
}

/// Which requests a queued fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultScope {
    Any,
    /// GET requests.
    Reads,
    /// POST, PATCH, PUT and DELETE requests.
    Writes,
}

impl FaultScope {
    fn matches(self, method: &Method) -> bool {
        match self {
            FaultScope::Any => true,
            FaultScope::Reads => method == Method::GET,
            FaultScope::Writes => is_write(method),
        }
    }
}

fn is_write(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PATCH | Method::PUT | Method::DELETE)
}

/// Request counters of one simulator, as seen at the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestStats {
    /// Every request that reached the server.
    pub requests: u64,
    /// GET requests.
    pub reads: u64,
    /// Pages of a list answered (a CRM query page, an LMS learner list page): one poll
    /// reads at least one.
    pub list_pages: u64,
    /// POST, PATCH, PUT and DELETE requests, whatever their outcome.
    pub writes: u64,
    /// Writes that changed the store.
    pub writes_applied: u64,
    /// 429 answers, injected or from the rate limit.
    pub throttled: u64,
    /// 429 answers from the configured rate limit alone.
    pub rate_limited: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// 412 answers.
    pub precondition_failed: u64,
}

/// What the request middleware shares between the simulators: counters, queued faults,
/// the per-second rate limit, the clock.
#[derive(Debug)]
pub(crate) struct Common {
    pub(crate) stats: Mutex<RequestStats>,
    faults: Mutex<VecDeque<(Fault, FaultScope)>>,
    /// Admitted requests per second of the system's clock; `None` for unlimited.
    rate_limit: Mutex<Option<u32>>,
    /// (epoch second, requests admitted in it).
    window: Mutex<(i64, u32)>,
    /// Requests counted toward the daily allowance shown in `Sforce-Limit-Info`.
    pub(crate) api_usage: AtomicU64,
    /// A pinned time for the system's clock; `None` follows the wall clock.
    frozen: Mutex<Option<DateTime<Utc>>>,
    /// Cancelled when the server stops.
    pub(crate) shutdown: CancellationToken,
}

impl Common {
    pub(crate) fn new(rate_limit: Option<u32>) -> Common {
        Common {
            stats: Mutex::default(),
            faults: Mutex::default(),
            rate_limit: Mutex::new(rate_limit),
            window: Mutex::new((0, 0)),
            api_usage: AtomicU64::new(0),
            frozen: Mutex::default(),
            shutdown: CancellationToken::new(),
        }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        lock(&self.frozen).unwrap_or_else(Utc::now)
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut RequestStats)) {
        f(&mut lock(&self.stats));
    }

    fn take_fault(&self, method: &Method) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let index = faults.iter().position(|(_, scope)| scope.matches(method))?;
        faults.remove(index).map(|(fault, _)| fault)
    }

    /// Admits a request under the per-second limit; on refusal returns the seconds
    /// until the window resets.
    fn admit(&self) -> Result<(), u64> {
        let Some(limit) = *lock(&self.rate_limit) else {
            return Ok(());
        };
        let second = self.now().timestamp();
        let mut window = lock(&self.window);
        if window.0 != second {
            *window = (second, 0);
        }
        if window.1 >= limit {
            return Err(1);
        }
        window.1 += 1;
        Ok(())
    }

    /// `X-RateLimit-*` headers for the current window.
    fn rate_headers(&self, headers: &mut HeaderMap) {
        let limit = *lock(&self.rate_limit);
        let second = self.now().timestamp();
        let used = {
            let window = lock(&self.window);
            if window.0 == second { window.1 } else { 0 }
        };
        let (limit, remaining) = match limit {
            Some(limit) => (u64::from(limit), u64::from(limit.saturating_sub(used))),
            None => (UNLIMITED_SHOWN, UNLIMITED_SHOWN),
        };
        insert(headers, "x-ratelimit-limit", &limit.to_string());
        insert(headers, "x-ratelimit-remaining", &remaining.to_string());
        insert(headers, "x-ratelimit-reset", &(second + 1).to_string());
    }
}

/// What the rate-limit headers show when no limit is configured: a large budget, as an
/// API with a generous plan shows.
const UNLIMITED_SHOWN: u64 = 1_000_000;

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// The system-specific parts of the request pipeline.
pub(crate) trait Dialect: Send + Sync + 'static {
    fn common(&self) -> &Common;
    /// Whether the request carries valid credentials.
    fn authorized(&self, headers: &HeaderMap) -> bool;
    /// The 401 answer.
    fn unauthorized(&self) -> Response;
    /// The body of a 429 or 5xx answer.
    fn error_body(&self, status: StatusCode) -> Response;
    /// Headers every response carries (after the rate-limit ones).
    fn decorate(&self, _headers: &mut HeaderMap) {}
}

/// The request pipeline every simulator shares: count, rate-limit, inject faults,
/// authenticate, serve, count the outcome, add the rate-limit headers.
pub(crate) async fn pipeline<D: Dialect>(
    dialect: Arc<D>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let common = dialect.common();
    let method = request.method().clone();
    common.count(|s| {
        s.requests += 1;
        if is_write(&method) {
            s.writes += 1;
        } else {
            s.reads += 1;
        }
    });
    common.api_usage.fetch_add(1, Ordering::Relaxed);
    let mut stall_after = None;
    let mut response = if let Err(retry_after) = common.admit() {
        common.count(|s| s.rate_limited += 1);
        with_retry_after(dialect.error_body(StatusCode::TOO_MANY_REQUESTS), retry_after)
    } else {
        match common.take_fault(&method) {
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                with_retry_after(dialect.error_body(StatusCode::TOO_MANY_REQUESTS), retry_after_secs)
            }
            Some(Fault::ServerError) => dialect.error_body(StatusCode::INTERNAL_SERVER_ERROR),
            Some(Fault::Unavailable { retry_after_secs }) => {
                with_retry_after(dialect.error_body(StatusCode::SERVICE_UNAVAILABLE), retry_after_secs)
            }
            fault => {
                if let Some(Fault::StallBefore(wait)) = fault {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = common.shutdown.cancelled() => {}
                    }
                }
                if let Some(Fault::StallAfter(wait)) = fault {
                    stall_after = Some(wait);
                }
                if dialect.authorized(request.headers()) {
                    next.run(request).await
                } else {
                    dialect.unauthorized()
                }
            }
        }
    };
    let status = response.status();
    common.count(|s| {
        if status == StatusCode::TOO_MANY_REQUESTS {
            s.throttled += 1;
        }
        if status.is_server_error() {
            s.server_errors += 1;
        }
        if status == StatusCode::UNAUTHORIZED {
            s.unauthorized += 1;
        }
        if status == StatusCode::PRECONDITION_FAILED {
            s.precondition_failed += 1;
        }
        if is_write(&method) && status.is_success() {
            s.writes_applied += 1;
        }
    });
    common.rate_headers(response.headers_mut());
    dialect.decorate(response.headers_mut());
    if let Some(wait) = stall_after {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = common.shutdown.cancelled() => {}
        }
    }
    response
}

fn with_retry_after(mut response: Response, secs: u64) -> Response {
    insert(response.headers_mut(), "retry-after", &secs.to_string());
    response
}

/// A running simulator server; stops when [`Server::stop`] is called or the last
/// handle is dropped.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Server {
    /// Binds `127.0.0.1:<port>` (0 for any free port) and serves `router` until the
    /// shutdown token is cancelled.
    pub(crate) async fn start(port: u16, router: axum::Router, shutdown: CancellationToken) -> std::io::Result<Server> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await?;
        let addr = listener.local_addr()?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                stop.cancelled().await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(error = %error, "simulator server stopped with an error");
            }
        });
        Ok(Server { addr, shutdown })
    }
}

/// The handle methods shared by the HTTP simulators.
macro_rules! common_handle {
    () => {
        /// `http://127.0.0.1:<port>`.
        pub fn base_url(&self) -> String {
            format!("http://{}", self.server.addr)
        }

        pub fn addr(&self) -> std::net::SocketAddr {
            self.server.addr
        }

        /// Request counters so far.
        pub fn stats(&self) -> $crate::sim::RequestStats {
            *$crate::sim::lock(&self.state.common.stats)
        }

        /// The next `n` requests in `scope` are answered with `fault`.
        pub fn fail_next(&self, n: usize, fault: $crate::sim::Fault, scope: $crate::sim::FaultScope) {
            let mut faults = $crate::sim::lock(&self.state.common.faults);
            for _ in 0..n {
                faults.push_back((fault, scope));
            }
        }

        /// Drops the faults still queued.
        pub fn clear_faults(&self) {
            $crate::sim::lock(&self.state.common.faults).clear();
        }

        /// Admits at most `limit` requests per wall-clock second and answers the rest
        /// with 429 and `Retry-After`; `None` lifts the limit.
        pub fn set_rate_limit(&self, limit: Option<u32>) {
            *$crate::sim::lock(&self.state.common.rate_limit) = limit;
        }

        /// Pins the system's clock (modification times) to `at`; `None` follows the wall
        /// clock again. Lets a test put many records in one timestamp.
        pub fn freeze_clock(&self, at: Option<chrono::DateTime<chrono::Utc>>) {
            *$crate::sim::lock(&self.state.common.frozen) = at;
        }

        /// Stops the server; pending requests are answered or dropped.
        pub fn stop(&self) {
            self.state.common.shutdown.cancel();
        }
    };
}
pub(crate) use common_handle;

/// An `IntoResponse` JSON answer with a status.
pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Parses an RFC 3339 time, also accepting the Salesforce form with an offset without
/// a colon (`2026-11-27T18:09:45.000+0000`).
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests;
