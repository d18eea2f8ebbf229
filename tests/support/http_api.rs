//! A small JSON REST API on loopback for the REST connector's tests: one collection of
//! records under `/items` with every pagination style the connector speaks, an
//! updated-since filter (`since`, inclusive), ETags with `If-Match`, creates, upserts
//! by email, deletes, a tombstone endpoint, API-key / bearer / basic auth, and a queue
//! of scripted faults (statuses, delays, broken bodies). Every request is logged.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

/// How the list endpoint pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// Everything on one page.
    None,
    /// `page` (from 1) and `per_page`.
    Page,
    /// `offset` and `limit`.
    Offset,
    /// `{"next_token": "<offset>"}` in the body, sent back as `token`.
    Token,
    /// `{"next": "/items?...&offset=N"}` in the body, evaluated lazily.
    NextUrl,
    /// `Link: <...>; rel="next"`.
    LinkHeader,
}

#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Header(&'static str, String),
    Query(&'static str, String),
    Bearer(String),
    Basic(String, String),
}

/// A scripted answer to the next request (of any kind).
#[derive(Debug, Clone)]
pub enum Fault {
    Status {
        status: u16,
        body: &'static str,
        content_type: &'static str,
        retry_after: Option<&'static str>,
    },
    /// Answer normally after this long.
    Delay(Duration),
    /// Promise more bytes than are sent.
    Truncated,
    /// A body of this many bytes (valid JSON).
    Huge(usize),
}

/// A hook run after each list page is served, with the items and the request count.
pub type AfterPage = Box<dyn FnMut(&mut Vec<Item>, usize) + Send>;

#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub mtime_ms: i64,
    pub fields: Map<String, Value>,
    pub deleted_ms: Option<i64>,
    pub etag: u64,
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub at: Instant,
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: HeaderMap,
    pub body: Option<Value>,
}

pub struct ApiState {
    pub items: Vec<Item>,
    pub paging: Paging,
    pub page_size: usize,
    /// List records under `{"data": [...]}` instead of a top-level array.
    pub envelope: bool,
    pub auth: Auth,
    pub faults: VecDeque<Fault>,
    pub log: Vec<Logged>,
    pub next_id: u64,
    /// Integer ids in JSON (`4711`) instead of strings.
    pub integer_ids: bool,
    /// Soft-deleted items stay listed with `deleted_at`.
    pub list_deleted: bool,
    /// Run after each list page is served (to move records during a walk).
    pub after_page: Option<AfterPage>,
    pub now_ms: i64,
    /// Records carry `version`; `If-Match` is compared with it and a mismatch is 409.
    pub version_field: bool,
}

#[derive(Clone)]
pub struct Api {
    pub state: Arc<Mutex<ApiState>>,
    pub base: String,
}

impl Api {
    pub async fn start(paging: Paging, page_size: usize) -> Api {
        let state = Arc::new(Mutex::new(ApiState {
            items: Vec::new(),
            paging,
            page_size,
            envelope: false,
            auth: Auth::None,
            faults: VecDeque::new(),
            log: Vec::new(),
            next_id: 1000,
            integer_ids: false,
            list_deleted: false,
            after_page: None,
            now_ms: 1_800_000_000_000,
            version_field: false,
        }));
        let router = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Api {
            state,
            base: format!("http://{addr}"),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ApiState> {
        self.state.lock().unwrap()
    }

    /// Adds a record with this modification time.
    pub fn put(&self, id: &str, mtime_ms: i64, fields: Value) {
        let mut s = self.lock();
        let fields = fields.as_object().cloned().unwrap_or_default();
        match s.items.iter_mut().find(|i| i.id == id) {
            Some(item) => {
                item.fields.extend(fields);
                item.mtime_ms = mtime_ms;
                item.etag += 1;
            }
            None => s.items.push(Item {
                id: id.to_string(),
                mtime_ms,
                fields,
                deleted_ms: None,
                etag: 1,
            }),
        }
    }

    pub fn delete(&self, id: &str, at_ms: i64) {
        let mut s = self.lock();
        if let Some(item) = s.items.iter_mut().find(|i| i.id == id) {
            item.deleted_ms = Some(at_ms);
            item.mtime_ms = at_ms;
        }
    }

    pub fn fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    pub fn get(&self, id: &str) -> Option<Item> {
        self.lock()
            .items
            .iter()
            .find(|i| i.id == id && i.deleted_ms.is_none())
            .cloned()
    }

    pub fn requests(&self, method: Method) -> Vec<Logged> {
        self.lock().log.iter().filter(|l| l.method == method).cloned().collect()
    }
}

pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn parse_time(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
        .or_else(|| s.parse().ok())
}

fn render(item: &Item, integer_ids: bool, version_field: bool) -> Value {
    let mut v = item.fields.clone();
    if version_field {
        v.insert("version".into(), json!(item.etag));
    }
    v.insert(
        "id".into(),
        if integer_ids {
            json!(item.id.parse::<i64>().unwrap_or(0))
        } else {
            json!(item.id)
        },
    );
    v.insert("updated_at".into(), json!(rfc3339_ms(item.mtime_ms)));
    v.insert(
        "deleted_at".into(),
        item.deleted_ms.map_or(Value::Null, |t| json!(rfc3339_ms(t))),
    );
    Value::Object(v)
}

fn json_response(status: StatusCode, body: Value, headers: &[(&str, String)]) -> Response {
    let mut r = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

fn authorised(auth: &Auth, headers: &HeaderMap, query: &BTreeMap<String, String>) -> bool {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    match auth {
        Auth::None => true,
        Auth::Header(name, value) => header(name).as_deref() == Some(value),
        Auth::Query(name, value) => query.get(*name) == Some(value),
        Auth::Bearer(token) => header("authorization") == Some(format!("Bearer {token}")),
        Auth::Basic(user, pass) => {
            use base64_like::encode;
            header("authorization") == Some(format!("Basic {}", encode(format!("{user}:{pass}").as_bytes())))
        }
    }
}

/// Standard base64 (RFC 4648) for the basic-auth check.
mod base64_like {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(input: &[u8]) -> String {
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

async fn handle(State(state): State<Arc<Mutex<ApiState>>>, request: Request<Body>) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query: BTreeMap<String, String> = request.uri().query().map(url_pairs).unwrap_or_default();
    let headers = request.headers().clone();
    let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let fault = {
        let mut s = state.lock().unwrap();
        s.log.push(Logged {
            at: Instant::now(),
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        s.faults.pop_front()
    };
    match fault {
        Some(Fault::Status {
            status,
            body,
            content_type,
            retry_after,
        }) => {
            let mut r = Response::builder().status(status).header("content-type", content_type);
            if let Some(after) = retry_after {
                r = r.header("retry-after", after);
            }
            return r.body(Body::from(body)).unwrap();
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Truncated) => {
            // The first bytes, then the connection breaks.
            let stream = futures_util::stream::unfold(0u8, |step| async move {
                match step {
                    0 => Some((Ok(bytes::Bytes::from_static(b"[{\"id\": \"1\"")), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((Err(std::io::Error::other("connection lost")), 2))
                    }
                    _ => None,
                }
            });
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("content-length", "5000")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        Some(Fault::Huge(n)) => {
            let mut text = String::with_capacity(n + 2);
            text.push('"');
            text.push_str(&"x".repeat(n));
            text.push('"');
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from(text))
                .unwrap();
        }
        None => {}
    }
    let mut s = state.lock().unwrap();
    if !authorised(&s.auth, &headers, &query) {
        return json_response(StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}), &[]);
    }
    let limits = [
        ("x-ratelimit-limit", "100".to_string()),
        ("x-ratelimit-remaining", "75".to_string()),
    ];
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["items"]) => list(&mut s, &query, &limits),
        (Method::GET, ["deleted"]) => {
            let start = query.get("start").and_then(|t| parse_time(t)).unwrap_or(0);
            let end = query.get("end").and_then(|t| parse_time(t)).unwrap_or(i64::MAX);
            let gone: Vec<Value> = s
                .items
                .iter()
                .filter(|i| i.deleted_ms.is_some_and(|d| d >= start && d <= end))
                .map(|i| json!({"id": i.id, "deletedDate": rfc3339_ms(i.deleted_ms.unwrap())}))
                .collect();
            json_response(StatusCode::OK, json!({"deletedRecords": gone}), &limits)
        }
        (Method::POST, ["items"]) => {
            s.next_id += 1;
            let id = s.next_id.to_string();
            let now = s.now_ms;
            s.items.push(Item {
                id: id.clone(),
                mtime_ms: now,
                fields: body.and_then(|b| b.as_object().cloned()).unwrap_or_default(),
                deleted_ms: None,
                etag: 1,
            });
            json_response(
                StatusCode::CREATED,
                json!({"id": id, "success": true}),
                &[("location", format!("/items/{id}")), ("etag", "W/\"1\"".into())],
            )
        }
        (Method::PATCH, ["items", "by-email", key]) => {
            let key = percent_decode(key);
            let now = s.now_ms;
            let fields = body.and_then(|b| b.as_object().cloned()).unwrap_or_default();
            if let Some(item) = s
                .items
                .iter_mut()
                .find(|i| i.deleted_ms.is_none() && i.fields.get("email") == Some(&json!(key)))
            {
                item.fields.extend(fields);
                item.mtime_ms = now;
                item.etag += 1;
                let id = item.id.clone();
                let etag = format!("W/\"{}\"", item.etag);
                return json_response(StatusCode::OK, json!({"id": id, "created": false}), &[("etag", etag)]);
            }
            s.next_id += 1;
            let id = s.next_id.to_string();
            let mut fields = fields;
            fields.insert("email".into(), json!(key));
            s.items.push(Item {
                id: id.clone(),
                mtime_ms: now,
                fields,
                deleted_ms: None,
                etag: 1,
            });
            json_response(
                StatusCode::CREATED,
                json!({"id": id, "created": true}),
                &[("etag", "W/\"1\"".into())],
            )
        }
        (m, ["items", id]) => {
            let id = percent_decode(id);
            let now = s.now_ms;
            let integer_ids = s.integer_ids;
            let version_field = s.version_field;
            let Some(item) = s.items.iter_mut().find(|i| i.id == id && i.deleted_ms.is_none()) else {
                return json_response(StatusCode::NOT_FOUND, json!({"error": "not found"}), &[]);
            };
            let etag = format!("W/\"{}\"", item.etag);
            if m == Method::GET {
                return json_response(
                    StatusCode::OK,
                    render(item, integer_ids, version_field),
                    &[("etag", etag)],
                );
            }
            if let Some(want) = headers.get("if-match").and_then(|v| v.to_str().ok()) {
                if version_field && want != item.etag.to_string() {
                    return json_response(StatusCode::CONFLICT, json!({"error": "version conflict"}), &[]);
                }
                if !version_field && want != etag {
                    return json_response(
                        StatusCode::PRECONDITION_FAILED,
                        json!({"error": "precondition failed"}),
                        &[],
                    );
                }
            }
            match m {
                Method::DELETE => {
                    item.deleted_ms = Some(now);
                    item.mtime_ms = now;
                    Response::builder().status(204).body(Body::empty()).unwrap()
                }
                Method::PATCH | Method::PUT => {
                    let fields = body.and_then(|b| b.as_object().cloned()).unwrap_or_default();
                    if m == Method::PUT {
                        item.fields = fields;
                    } else {
                        item.fields.extend(fields);
                    }
                    item.mtime_ms = now;
                    item.etag += 1;
                    let etag = format!("W/\"{}\"", item.etag);
                    json_response(
                        StatusCode::OK,
                        render(item, integer_ids, version_field),
                        &[("etag", etag)],
                    )
                }
                _ => json_response(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "method"}), &[]),
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({"error": "no route"}), &[]),
    }
}

fn list(s: &mut ApiState, query: &BTreeMap<String, String>, limits: &[(&str, String)]) -> Response {
    let since = query.get("since").and_then(|t| parse_time(t)).unwrap_or(0);
    let mut matching: Vec<Item> = s
        .items
        .iter()
        .filter(|i| i.mtime_ms >= since && (s.list_deleted || i.deleted_ms.is_none()))
        .cloned()
        .collect();
    matching.sort_by(|a, b| a.mtime_ms.cmp(&b.mtime_ms).then_with(|| a.id.cmp(&b.id)));
    let size = s.page_size;
    let num = |k: &str| query.get(k).and_then(|v| v.parse::<usize>().ok());
    let offset = match s.paging {
        Paging::None => 0,
        Paging::Page => (num("page").unwrap_or(1).max(1) - 1) * num("per_page").unwrap_or(size),
        Paging::Offset => num("offset").unwrap_or(0),
        Paging::Token => num("token").unwrap_or(0),
        Paging::NextUrl | Paging::LinkHeader => num("offset").unwrap_or(0),
    };
    let take = match s.paging {
        Paging::None => usize::MAX,
        Paging::Page => num("per_page").unwrap_or(size),
        Paging::Offset => num("limit").unwrap_or(size),
        _ => size,
    };
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(take)
        .map(|i| render(i, s.integer_ids, s.version_field))
        .collect();
    let more = offset.saturating_add(take) < matching.len();
    let mut rest: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| k.as_str() != "offset")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    rest.push(("offset".into(), (offset + take).to_string()));
    let next_path = format!("/items?{}", encode_pairs(&rest));
    let mut headers: Vec<(&str, String)> = limits.to_vec();
    let mut body = if s.envelope {
        json!({"data": page})
    } else {
        Value::Array(page)
    };
    if more {
        match s.paging {
            Paging::Token => body["next_token"] = json!((offset + take).to_string()),
            Paging::NextUrl => body["next"] = json!(next_path),
            Paging::LinkHeader => headers.push(("link", format!("<{next_path}>; rel=\"next\""))),
            _ => {}
        }
    }
    let served = s.log.len();
    if let Some(mut f) = s.after_page.take() {
        f(&mut s.items, served);
        s.after_page = Some(f);
    }
    json_response(StatusCode::OK, body, &headers)
}

fn url_pairs(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_pairs(pairs: &[(String, String)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}
