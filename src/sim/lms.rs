//! A simulated LMS: a generic JSON REST API for learners, paginated with the Link
//! header (RFC 8288) and guarded by weak ETags.
//!
//! Protocol facts it keeps:
//! - Base path `/api/v1`; `X-Api-Key: <key>`, else 401 `{"error":"unauthorized"}`.
//! - Learners have integer ids; `updated_at` has millisecond precision, rendered
//!   `2026-11-27T18:09:45.123Z`, and moves only when a value changes (a merge-patch that
//!   changes nothing leaves it as it was).
//! - `GET /learners?updated_since=&page=&per_page=[&include_deleted=true]` answers a
//!   top-level JSON array ordered by `(updated_at, id)`, `updated_since` inclusive,
//!   `per_page` 1 to 100 (default 25), and `Link: <...&page=N+1>; rel="next"` while more
//!   pages remain. Pages are offsets into the result evaluated at each request, so a
//!   learner updated during a walk moves to the end. Soft-deleted learners appear only
//!   with `include_deleted=true`.
//! - `GET /learners/{id}` answers with `ETag: W/"<n>"`; `PATCH` (merge-patch, optional
//!   `If-Match`) answers 200 with the learner and its new ETag, 412 on a mismatch;
//!   `POST` answers 201 with `Location` and `ETag`, 422 `{"error","field"}` on a
//!   validation failure (unknown field, missing or malformed email, duplicate email);
//!   `DELETE` soft-deletes (204) and a deleted learner is 404 from then on.
//! - Upsert by email: `PATCH /learners/by_email/{email}` (merge-patch) updates the live
//!   learner with that email (200) or creates one (201, `full_name` required), so a
//!   client that does not know whether a person is already enrolled never makes a
//!   duplicate.

// Validation helpers return the refusal as the finished HTTP answer; one per request,
// so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value, json};

use super::{Common, Dialect, Server, common_handle, json, lock, parse_time};

pub const API_PATH: &str = "/api/v1";
/// Page size when the client asks for none.
pub const DEFAULT_PER_PAGE: usize = 25;
/// The largest page the API serves.
pub const MAX_PER_PAGE: usize = 100;
/// The first learner id; ids count up from here.
const FIRST_ID: u64 = 4711;

/// How the LMS simulator starts.
#[derive(Debug, Clone)]
pub struct LmsOptions {
    /// 0 for any free port.
    pub port: u16,
    /// The API key requests must carry in `X-Api-Key`.
    pub api_key: String,
    /// Requests admitted per second; `None` for unlimited.
    pub rate_limit: Option<u32>,
}

impl Default for LmsOptions {
    fn default() -> LmsOptions {
        LmsOptions {
            port: 0,
            api_key: "lms-demo-key".into(),
            rate_limit: None,
        }
    }
}

/// One learner as the LMS holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learner {
    pub id: u64,
    pub full_name: String,
    pub email: String,
    pub certified: bool,
    pub completed_at: Option<DateTime<Utc>>,
    /// Millisecond precision.
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Bumped by every change; the ETag is `W/"<version>"`.
    pub version: u64,
}

impl Learner {
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.version)
    }

    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "full_name": self.full_name,
            "email": self.email,
            "certified": self.certified,
            "completed_at": self.completed_at.map(render_time),
            "updated_at": render_time(self.updated_at),
            "deleted_at": self.deleted_at.map(render_time),
        })
    }
}

/// Field values for a learner a user creates.
#[derive(Debug, Clone, Default)]
pub struct NewLearner {
    pub full_name: String,
    pub email: String,
    pub certified: bool,
    pub completed_at: Option<DateTime<Utc>>,
}

/// `2026-11-27T18:09:45.123Z`.
pub fn render_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[derive(Debug, Default)]
struct Store {
    learners: BTreeMap<u64, Learner>,
    next_id: u64,
    /// Changes a user makes just before the next write to that learner is served.
    interference: Vec<(u64, Map<String, Value>)>,
}

pub(crate) struct LmsState {
    pub(crate) common: Common,
    api_key: String,
    /// `http://127.0.0.1:<port>`, for the Link header.
    origin: Mutex<String>,
    store: Mutex<Store>,
}

impl LmsState {
    fn now(&self) -> DateTime<Utc> {
        self.common.now().trunc_subsecs(3)
    }

    fn interfere(&self, store: &mut Store, id: u64) {
        let (mine, rest): (Vec<_>, Vec<_>) = store.interference.drain(..).partition(|(i, _)| *i == id);
        store.interference = rest;
        let now = self.now();
        for (_, patch) in mine {
            if let Some(l) = store.learners.get_mut(&id)
                && let Ok(next) = merge(l, &patch)
            {
                touch(l, next, now);
            }
        }
    }
}

impl Dialect for LmsState {
    fn common(&self) -> &Common {
        &self.common
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|k| k == self.api_key)
    }

    fn unauthorized(&self) -> Response {
        json(StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
    }

    fn error_body(&self, status: StatusCode) -> Response {
        let error = match status {
            StatusCode::TOO_MANY_REQUESTS => "rate limit exceeded",
            StatusCode::SERVICE_UNAVAILABLE => "service unavailable",
            _ => "internal server error",
        };
        json(status, json!({"error": error}))
    }
}

/// A validation failure: 422 `{"error", "field"}`.
fn invalid(field: &str, error: &str) -> Response {
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"error": error, "field": field}),
    )
}

fn not_found() -> Response {
    json(StatusCode::NOT_FOUND, json!({"error": "not found"}))
}

fn plausible_email(v: &str) -> bool {
    v.split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !v.contains(char::is_whitespace))
}

/// Applies a merge-patch to a copy of the learner, validating every member.
fn merge(learner: &Learner, patch: &Map<String, Value>) -> Result<Learner, Response> {
    let mut next = learner.clone();
    for (name, value) in patch {
        match (name.as_str(), value) {
            ("full_name", Value::String(s)) if !s.trim().is_empty() => next.full_name = s.clone(),
            ("full_name", _) => return Err(invalid("full_name", "can't be blank")),
            ("email", Value::String(s)) if plausible_email(s) => next.email = s.clone(),
            ("email", _) => return Err(invalid("email", "is invalid")),
            ("certified", Value::Bool(b)) => next.certified = *b,
            ("certified", Value::Null) => next.certified = false,
            ("certified", _) => return Err(invalid("certified", "must be true or false")),
            ("completed_at", Value::Null) => next.completed_at = None,
            ("completed_at", Value::String(s)) => match parse_time(s) {
                Some(t) => next.completed_at = Some(t.trunc_subsecs(3)),
                None => return Err(invalid("completed_at", "is not a valid RFC 3339 time")),
            },
            ("completed_at", _) => return Err(invalid("completed_at", "is not a valid RFC 3339 time")),
            ("id" | "updated_at" | "deleted_at", _) => return Err(invalid(name, "is read-only")),
            _ => return Err(invalid(name, "is not a known attribute")),
        }
    }
    Ok(next)
}

/// Stores `next` over `learner`, bumping `updated_at` and the version when a value
/// changed.
fn touch(learner: &mut Learner, mut next: Learner, now: DateTime<Utc>) -> bool {
    if next == *learner {
        return false;
    }
    next.updated_at = now.max(learner.updated_at);
    next.version = learner.version + 1;
    *learner = next;
    true
}

fn email_taken(store: &Store, email: &str, except: Option<u64>) -> bool {
    store
        .learners
        .values()
        .any(|l| l.deleted_at.is_none() && Some(l.id) != except && l.email.eq_ignore_ascii_case(email))
}

/// A running simulated LMS. Cloning shares it; the server stops when the last clone is
/// dropped or [`LmsSim::stop`] is called.
#[derive(Clone)]
pub struct LmsSim {
    pub(crate) state: Arc<LmsState>,
    server: Arc<Server>,
}

impl std::fmt::Debug for LmsSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmsSim")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

impl LmsSim {
    pub async fn start(options: LmsOptions) -> std::io::Result<LmsSim> {
        let state = Arc::new(LmsState {
            common: Common::new(options.rate_limit),
            api_key: options.api_key,
            origin: Mutex::default(),
            store: Mutex::new(Store {
                next_id: FIRST_ID,
                ..Store::default()
            }),
        });
        let pipeline_state = state.clone();
        let api = Router::new()
            .route("/learners", get(list).post(create))
            .route("/learners/{id}", get(read_one).patch(update).delete(delete))
            .route("/learners/by_email/{email}", axum::routing::patch(upsert));
        let router = Router::new()
            .nest(API_PATH, api)
            .fallback(|| async { not_found() })
            .layer(axum::middleware::from_fn(move |request, next| {
                super::pipeline(pipeline_state.clone(), request, next)
            }))
            .with_state(state.clone());
        let server = Server::start(options.port, router, state.common.shutdown.clone()).await?;
        *lock(&state.origin) = format!("http://{}", server.addr);
        Ok(LmsSim {
            state,
            server: Arc::new(server),
        })
    }

    common_handle!();

    pub fn api_key(&self) -> &str {
        &self.state.api_key
    }

    /// Creates a learner as a user would; returns its id.
    pub fn create(&self, new: NewLearner) -> u64 {
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        let id = store.next_id;
        store.next_id += 1;
        store.learners.insert(
            id,
            Learner {
                id,
                full_name: new.full_name,
                email: new.email,
                certified: new.certified,
                completed_at: new.completed_at,
                updated_at: now,
                deleted_at: None,
                version: 1,
            },
        );
        id
    }

    /// Applies a merge-patch as a user would through the LMS's own screens; false when
    /// the learner does not exist, is deleted, or the patch is invalid.
    pub fn edit(&self, id: u64, patch: Value) -> bool {
        let Value::Object(patch) = patch else {
            return false;
        };
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        let Some(learner) = store.learners.get_mut(&id).filter(|l| l.deleted_at.is_none()) else {
            return false;
        };
        match merge(learner, &patch) {
            Ok(next) => {
                touch(learner, next, now);
                true
            }
            Err(_) => false,
        }
    }

    /// Soft-deletes a learner as a user would.
    pub fn delete(&self, id: u64) -> bool {
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        match store.learners.get_mut(&id) {
            Some(l) if l.deleted_at.is_none() => {
                let mut next = l.clone();
                next.deleted_at = Some(now);
                touch(l, next, now)
            }
            _ => false,
        }
    }

    /// Every learner, deleted ones included, by id.
    pub fn learners(&self) -> Vec<Learner> {
        lock(&self.state.store).learners.values().cloned().collect()
    }

    /// Learners not deleted.
    pub fn live(&self) -> Vec<Learner> {
        lock(&self.state.store)
            .learners
            .values()
            .filter(|l| l.deleted_at.is_none())
            .cloned()
            .collect()
    }

    pub fn learner(&self, id: u64) -> Option<Learner> {
        lock(&self.state.store).learners.get(&id).cloned()
    }

    /// The live learner with this email (case-insensitive).
    pub fn find_by_email(&self, email: &str) -> Option<Learner> {
        lock(&self.state.store)
            .learners
            .values()
            .find(|l| l.deleted_at.is_none() && l.email.eq_ignore_ascii_case(email))
            .cloned()
    }

    /// Just before the next write to `id` is served, a user applies `patch`: a write
    /// carrying the ETag it read before then meets a 412.
    pub fn interfere_on_next_write(&self, id: u64, patch: Value) -> bool {
        let Value::Object(patch) = patch else {
            return false;
        };
        lock(&self.state.store).interference.push((id, patch));
        true
    }
}

// ---------------------------------------------------------------------------------
// Handlers

#[derive(serde::Deserialize)]
struct ListParams {
    updated_since: Option<String>,
    page: Option<String>,
    per_page: Option<String>,
    include_deleted: Option<String>,
}

fn bad_request(field: &str, error: &str) -> Response {
    json(StatusCode::BAD_REQUEST, json!({"error": error, "field": field}))
}

async fn list(State(state): State<Arc<LmsState>>, Query(p): Query<ListParams>) -> Response {
    state.common.count(|s| s.list_pages += 1);
    let since = match p.updated_since.as_deref() {
        None | Some("") => None,
        Some(s) => match parse_time(s) {
            Some(t) => Some(t),
            None => return bad_request("updated_since", "is not a valid RFC 3339 time"),
        },
    };
    let page: usize = match p.page.as_deref().map(str::parse) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => return bad_request("page", "must be a positive integer"),
    };
    let per_page: usize = match p.per_page.as_deref().map(str::parse) {
        None => DEFAULT_PER_PAGE,
        Some(Ok(n)) if (1..=MAX_PER_PAGE).contains(&n) => n,
        Some(_) => return bad_request("per_page", "must be between 1 and 100"),
    };
    let include_deleted = match p.include_deleted.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return bad_request("include_deleted", "must be true or false"),
    };
    let store = lock(&state.store);
    let mut rows: Vec<&Learner> = store
        .learners
        .values()
        .filter(|l| include_deleted || l.deleted_at.is_none())
        .filter(|l| since.is_none_or(|t| l.updated_at >= t))
        .collect();
    rows.sort_by_key(|l| (l.updated_at, l.id));
    let start = (page - 1).saturating_mul(per_page).min(rows.len());
    let end = start.saturating_add(per_page).min(rows.len());
    let body: Vec<Value> = rows[start..end].iter().map(|l| l.json()).collect();
    let mut response = json(StatusCode::OK, Value::Array(body));
    if end < rows.len() {
        let mut query = Vec::new();
        if let Some(s) = &p.updated_since {
            query.push(format!("updated_since={}", encode(s)));
        }
        query.push(format!("page={}", page + 1));
        query.push(format!("per_page={per_page}"));
        if include_deleted {
            query.push("include_deleted=true".into());
        }
        let link = format!(
            "<{}{API_PATH}/learners?{}>; rel=\"next\"",
            lock(&state.origin),
            query.join("&")
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            response.headers_mut().insert("link", v);
        }
    }
    response
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn with_etag(mut response: Response, learner: &Learner) -> Response {
    if let Ok(v) = HeaderValue::from_str(&learner.etag()) {
        response.headers_mut().insert("etag", v);
    }
    response
}

fn parse_id(id: &str) -> Option<u64> {
    id.parse().ok()
}

async fn read_one(State(state): State<Arc<LmsState>>, Path(id): Path<String>) -> Response {
    let store = lock(&state.store);
    match parse_id(&id).and_then(|id| store.learners.get(&id)) {
        Some(l) if l.deleted_at.is_none() => with_etag(json(StatusCode::OK, l.json()), l),
        _ => not_found(),
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(json(
            StatusCode::BAD_REQUEST,
            json!({"error": "expected a JSON object"}),
        )),
        Err(_) => Err(json(StatusCode::BAD_REQUEST, json!({"error": "malformed JSON"}))),
    }
}

async fn create(State(state): State<Arc<LmsState>>, body: Bytes) -> Response {
    let patch = match object(&body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if !patch.contains_key("email") {
        return invalid("email", "can't be blank");
    }
    if !patch.contains_key("full_name") {
        return invalid("full_name", "can't be blank");
    }
    let now = state.now();
    let blank = Learner {
        id: 0,
        full_name: String::new(),
        email: String::new(),
        certified: false,
        completed_at: None,
        updated_at: now,
        deleted_at: None,
        version: 1,
    };
    let mut learner = match merge(&blank, &patch) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut store = lock(&state.store);
    if email_taken(&store, &learner.email, None) {
        return invalid("email", "has already been taken");
    }
    learner.id = store.next_id;
    store.next_id += 1;
    let location = format!("{API_PATH}/learners/{}", learner.id);
    let mut response = with_etag(json(StatusCode::CREATED, learner.json()), &learner);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert("location", v);
    }
    store.learners.insert(learner.id, learner);
    response
}

/// Whether an `If-Match` header (absent, `*`, or a list of tags) admits `etag`. Weak
/// tags compare by their opaque part, as this API documents.
fn if_match(headers: &HeaderMap, etag: &str) -> bool {
    let Some(value) = headers.get("if-match") else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    value.trim() == "*" || value.split(',').any(|t| bare(t) == bare(etag))
}

async fn update(
    State(state): State<Arc<LmsState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let patch = match object(&body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let Some(id) = parse_id(&id) else {
        return not_found();
    };
    let now = state.now();
    let mut store = lock(&state.store);
    state.interfere(&mut store, id);
    let Some(current) = store.learners.get(&id).filter(|l| l.deleted_at.is_none()) else {
        return not_found();
    };
    if !if_match(&headers, &current.etag()) {
        return json(StatusCode::PRECONDITION_FAILED, json!({"error": "precondition failed"}));
    }
    let next = match merge(current, &patch) {
        Ok(next) => next,
        Err(r) => return r,
    };
    if email_taken(&store, &next.email, Some(id)) {
        return invalid("email", "has already been taken");
    }
    let Some(learner) = store.learners.get_mut(&id) else {
        return not_found();
    };
    touch(learner, next, now);
    with_etag(json(StatusCode::OK, learner.json()), learner)
}

async fn delete(State(state): State<Arc<LmsState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(id) = parse_id(&id) else {
        return not_found();
    };
    let now = state.now();
    let mut store = lock(&state.store);
    state.interfere(&mut store, id);
    match store.learners.get_mut(&id) {
        Some(l) if l.deleted_at.is_none() => {
            if !if_match(&headers, &l.etag()) {
                return json(StatusCode::PRECONDITION_FAILED, json!({"error": "precondition failed"}));
            }
            let mut next = l.clone();
            next.deleted_at = Some(now);
            touch(l, next, now);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => not_found(),
    }
}

async fn upsert(
    State(state): State<Arc<LmsState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut patch = match object(&body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if patch
        .get("email")
        .is_some_and(|e| !e.as_str().is_some_and(|e| e.eq_ignore_ascii_case(&email)))
    {
        return invalid("email", "does not match the email in the path");
    }
    patch.insert("email".into(), Value::String(email.clone()));
    let now = state.now();
    let mut store = lock(&state.store);
    let existing = store
        .learners
        .values()
        .find(|l| l.deleted_at.is_none() && l.email.eq_ignore_ascii_case(&email))
        .map(|l| l.id);
    match existing {
        Some(id) => {
            state.interfere(&mut store, id);
            let Some(current) = store.learners.get(&id) else {
                return not_found();
            };
            if !if_match(&headers, &current.etag()) {
                return json(StatusCode::PRECONDITION_FAILED, json!({"error": "precondition failed"}));
            }
            // The stored spelling of the email stays; only other members change.
            patch.remove("email");
            let next = match merge(current, &patch) {
                Ok(next) => next,
                Err(r) => return r,
            };
            let Some(learner) = store.learners.get_mut(&id) else {
                return not_found();
            };
            touch(learner, next, now);
            with_etag(json(StatusCode::OK, learner.json()), learner)
        }
        None => {
            if !patch.contains_key("full_name") {
                return invalid("full_name", "can't be blank");
            }
            let blank = Learner {
                id: 0,
                full_name: String::new(),
                email: String::new(),
                certified: false,
                completed_at: None,
                updated_at: now,
                deleted_at: None,
                version: 1,
            };
            let mut learner = match merge(&blank, &patch) {
                Ok(l) => l,
                Err(r) => return r,
            };
            learner.id = store.next_id;
            store.next_id += 1;
            let mut response = with_etag(json(StatusCode::CREATED, learner.json()), &learner);
            if let Ok(v) = HeaderValue::from_str(&format!("{API_PATH}/learners/{}", learner.id)) {
                response.headers_mut().insert("location", v);
            }
            store.learners.insert(learner.id, learner);
            response
        }
    }
}
