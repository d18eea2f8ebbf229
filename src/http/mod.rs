//! Admin HTTP: health, readiness, Prometheus metrics, and the JSON API operators use to
//! see what concord is doing and why (status, records, decisions, dead letters, writes,
//! audit), all on one listener.
//!
//! Every response is JSON except `/metrics`; every error is `{"error": "<message>"}`
//! with a fitting status, including unknown routes (404), wrong methods (405) and
//! oversized bodies (413). Server-side failures are logged and answered with a generic
//! message: no internals and no record values leave the process in an error.
//!
//! When tokens are configured every endpoint except `/healthz` and `/readyz` (and
//! unknown routes, so they cannot be probed) requires `Authorization: Bearer <token>`;
//! a refusal is a 401 with `WWW-Authenticate: Bearer`. With TLS configured the listener
//! serves HTTPS only.

mod api;
mod auth;
mod error;
mod extract;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Serialize;

use crate::engine::status::SharedStatus;
use crate::metrics::{ADMIN_REQUESTS, LABEL_OUTCOME};
use crate::state::StateStore;
pub use auth::{ANONYMOUS, AdminAuth, AuthError};
use error::ApiError;
pub use extract::MAX_BODY_BYTES;
use extract::Principal;

pub use crate::engine::{ReplayError, ReplayOutcome};

/// Replays one dead letter by id.
pub type ReplayFn = Arc<dyn Fn(u64) -> Result<ReplayOutcome, ReplayError> + Send + Sync>;

/// The configured entity names, shared with the daemon so a reload can replace them.
#[derive(Debug, Clone, Default)]
pub struct EntityNames(std::sync::Arc<std::sync::RwLock<Vec<String>>>);

impl EntityNames {
    pub fn contains(&self, entity: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|e| e == entity)
    }
    pub fn set(&self, names: Vec<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = names;
    }
}

impl From<Vec<String>> for EntityNames {
    fn from(names: Vec<String>) -> Self {
        EntityNames(std::sync::Arc::new(std::sync::RwLock::new(names)))
    }
}

/// Everything the admin API reads or acts on.
#[derive(Clone)]
pub struct AdminContext {
    pub store: StateStore,
    pub status: SharedStatus,
    /// Renders the Prometheus exposition; `None` when no recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub replay: ReplayFn,
    /// Entity names, to tell an unknown entity from an unknown record; replaced when a
    /// reload changes the configuration.
    pub entities: EntityNames,
    /// Tokens, the public-listener rule and TLS.
    pub auth: AdminAuth,
}

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The admin API's routes, fallbacks and middleware, ready to serve.
pub fn router(ctx: AdminContext) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus_metrics))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/entities/{entity}/records/{id}", get(api::record))
        .route("/api/v1/decisions", get(api::decisions))
        .route("/api/v1/dlq", get(api::dead_letters))
        .route("/api/v1/dlq/{id}/replay", post(api::replay))
        .route("/api/v1/writes", get(api::writes))
        .route("/api/v1/audit", get(api::audit_log))
        // Applies to the routes above, so it comes after them.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(ctx.auth.clone(), require_token))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(ctx)
}

/// Most time a client gets to finish the TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin API on `listener` until `shutdown` completes, then stops accepting
/// and waits for requests in flight to finish. Refuses a non-loopback listener the
/// access rules do not allow; serves HTTPS when TLS is configured.
pub async fn serve(
    ctx: AdminContext,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let auth = ctx.auth.clone();
    let local = listener.local_addr()?;
    auth.check_listener(local)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
    if !local.ip().is_loopback() && !auth.tls_enabled() {
        tracing::warn!(listen = %local, "admin api listens beyond loopback without tls: tokens cross the network in clear text");
    }
    if auth.tls_enabled() {
        return serve_tls(router(ctx), auth, listener, shutdown).await;
    }
    let app = router(ctx).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Accepts connections, completes the TLS handshake with the configuration in force at
/// accept time (so a reload applies to new connections), and serves HTTP/1.1 on each.
async fn serve_tls(
    app: Router,
    auth: AdminAuth,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection failures (e.g. too many open files) must not stop
                    // the listener; back off briefly and accept again.
                    tracing::warn!(error = %error, "admin api: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(config) = auth.tls_config() else {
            return Err(std::io::Error::other("admin tls configuration is missing"));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let service = hyper_util::service::TowerToHyperService::new(app.clone().layer(Extension(ConnectInfo(peer))));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(error = %error, peer = %peer, "admin api: tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "admin api: tls handshake timed out");
                    return;
                }
            };
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(error = %error, peer = %peer, "admin api: connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Refuses requests without a valid bearer token when tokens are configured, and
/// records who the caller is for the audit log.
async fn require_token(State(auth): State<AdminAuth>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    let presented = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match auth.authenticate(presented) {
        Some(who) => {
            request.extensions_mut().insert(Principal(who));
            next.run(request).await
        }
        None => {
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[derive(Serialize)]
struct Probe {
    status: &'static str,
}

/// Liveness: the process serves requests.
async fn healthz() -> Json<Probe> {
    Json(Probe { status: "ok" })
}

/// Readiness: every link and applier has started.
async fn readyz(State(ctx): State<AdminContext>) -> (StatusCode, Json<Probe>) {
    if ctx.status.snapshot().ready {
        (StatusCode::OK, Json(Probe { status: "ready" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Probe { status: "starting" }))
    }
}

async fn prometheus_metrics(State(ctx): State<AdminContext>) -> Result<Response, ApiError> {
    match &ctx.metrics {
        Some(handle) => Ok(([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], handle.render()).into_response()),
        None => Err(ApiError::not_found("metrics are not enabled")),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// Counts every request by status class. Nothing answers 1xx or 3xx, so those would be
/// counted with 2xx. `/readyz` answers 503 until the engine is ready, which counts as
/// 5xx: alerts on this counter should leave out the first minutes after a start.
async fn count_requests(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let outcome = if status.is_server_error() {
        "5xx"
    } else if status.is_client_error() {
        "4xx"
    } else {
        "2xx"
    };
    metrics::counter!(ADMIN_REQUESTS, LABEL_OUTCOME => outcome).increment(1);
    response
}
