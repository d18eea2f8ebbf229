//! The admin API over real HTTP on loopback, against a real state store in a temporary
//! directory. The client is a minimal HTTP/1.1 client over a TCP stream so that the
//! tests see exactly the bytes the server sends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use concord::engine::status::SharedStatus;
use concord::http::{ANONYMOUS, AdminAuth, AdminContext, MAX_BODY_BYTES, ReplayError, ReplayFn, ReplayOutcome, serve};
use concord::merge::{Decision, FieldDecision, Outcome, Rule, WriteAction, WriteMode, WriteSummary};
use concord::model::{
    AgreedField, Base, ChangeKind, Fields, GlobalId, Provenance, RecordState, Shadow, SourceRecord, SourceReject,
};
use concord::state::{DeadItem, DeadLetter, DeadLetterClass, OutboxEntry, StateError, StateStore, WriteLogEntry};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ENTITY: &str = "person";
/// A fixed time (2023-11-14T22:13:20Z) so rendered times can be asserted exactly.
const T0: i64 = 1_700_000_000_000;

/// The process-wide Prometheus recorder of this test binary; installed once.
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("this test binary installs no other recorder");
            handle
        })
        .clone()
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client.

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` message of a JSON error response.
    fn error(&self) -> String {
        let body = self.json();
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "error body has one key: {body}"
        );
        body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("error body has an error string: {body}"))
            .to_string()
    }
}

/// Sends raw request bytes and reads the response until the server closes.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Result<HttpResponse, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    stream.write_all(raw).await.map_err(|e| format!("write: {e}"))?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.map_err(|e| format!("read: {e}"))?;
    parse_response(&bytes)
}

async fn send(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> HttpResponse {
    let mut raw = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    match exchange(addr, &raw).await {
        Ok(response) => response,
        Err(e) => panic!("{method} {target}: {e}"),
    }
}

async fn get(addr: SocketAddr, target: &str) -> HttpResponse {
    send(addr, "GET", target, b"").await
}

async fn post(addr: SocketAddr, target: &str) -> HttpResponse {
    send(addr, "POST", target, b"").await
}

fn parse_response(bytes: &[u8]) -> Result<HttpResponse, String> {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&bytes[..head_end]).map_err(|_| "headers are not utf-8")?;
    let rest = &bytes[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let mut parts = status_line.splitn(3, ' ');
    if parts.next() != Some("HTTP/1.1") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad status in {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else if let Some(length) = find("content-length") {
        let length: usize = length.parse().map_err(|_| format!("bad content-length {length:?}"))?;
        if rest.len() != length {
            return Err(format!("content-length {length} but {} body bytes", rest.len()));
        }
        rest.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, headers, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line not ended")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "chunk size is not utf-8")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            return Err("chunk shorter than its size".to_string());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------
// The fixture: a populated store and a running server.

struct Seeded {
    person: GlobalId,
    decision: u64,
    change_letter: u64,
    reject_letter: u64,
    write_letter: u64,
}

struct Server {
    addr: SocketAddr,
    status: SharedStatus,
    seeded: Seeded,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

fn person_id() -> GlobalId {
    "0190a3c2-0000-7000-8000-000000000001".parse().expect("literal uuid")
}

fn outbox_entry(system: &str, id: GlobalId) -> OutboxEntry {
    OutboxEntry {
        seq: 0,
        system: system.to_string(),
        entity: ENTITY.to_string(),
        global_id: id,
        action: WriteAction::Upsert {
            fields: Fields::from_iter([("email".to_string(), json!("ada@example.com"))]),
        },
        source_system: "crm".to_string(),
        source_time_ms: T0,
        decision: 1,
        enqueued_ms: T0,
        attempts: 3,
        last_error: Some("status 400".to_string()),
    }
}

fn seed(store: &StateStore) -> Seeded {
    let person = person_id();
    store
        .write(|t| {
            let decision = t.next_id("decision")?;
            let provenance = |system: &str, rule: Rule, version: Option<&str>| Provenance {
                system: system.to_string(),
                version: version.map(str::to_string),
                source_time_ms: T0,
                rule,
                decision,
            };
            let state = RecordState {
                base: Base {
                    fields: BTreeMap::from([
                        (
                            "email".to_string(),
                            AgreedField {
                                value: json!("ada@example.com"),
                                from: provenance("crm", Rule::Owner, Some("v3")),
                            },
                        ),
                        (
                            "name".to_string(),
                            AgreedField {
                                value: json!("Ada Lovelace"),
                                from: provenance("hr", Rule::LastWriterWins, None),
                            },
                        ),
                    ]),
                    deleted: false,
                },
                shadows: BTreeMap::from([
                    (
                        "crm".to_string(),
                        Shadow {
                            local_id: Some("c-1".to_string()),
                            fields: Fields::from_iter([
                                ("email".to_string(), json!("ada@example.com")),
                                ("name".to_string(), json!("Ada Lovelace")),
                            ]),
                            version: Some("v3".to_string()),
                            ..Shadow::default()
                        },
                    ),
                    (
                        "hr".to_string(),
                        Shadow {
                            local_id: Some("h-1".to_string()),
                            fields: Fields::from_iter([("name".to_string(), json!("A. Lovelace"))]),
                            pending: Fields::from_iter([("email".to_string(), json!("ada@example.com"))]),
                            diverged: ["name".to_string()].into(),
                            ..Shadow::default()
                        },
                    ),
                ]),
                match_keys: BTreeMap::from([("email".to_string(), "ada@example.com".to_string())]),
                created_ms: T0,
                updated_ms: T0 + 1_000,
            };
            t.put_record(ENTITY, person, &state)?;
            t.put_identity(ENTITY, "crm", "c-1", person)?;
            t.put_identity(ENTITY, "hr", "h-1", person)?;
            t.put_decision(&Decision {
                id: decision,
                time_ms: T0,
                entity: ENTITY.to_string(),
                global_id: person,
                system: "crm".to_string(),
                local_id: "c-1".to_string(),
                kind: ChangeKind::Upsert,
                source_time_ms: T0,
                version: Some("v3".to_string()),
                fields: vec![FieldDecision {
                    field: "email".to_string(),
                    rule: Rule::Owner,
                    incoming: json!("ada@example.com"),
                    previous: Some(json!("ada@old.example.com")),
                    conflict: true,
                    policy: None,
                }],
                outcome: Outcome::Updated,
                flagged: false,
                writes: vec![WriteSummary {
                    system: "hr".to_string(),
                    mode: WriteMode::Send,
                    action: "upsert".to_string(),
                    fields: vec!["email".to_string()],
                    seq: Some(1),
                }],
            })?;
            t.enqueue(outbox_entry("hr", person))?;
            let letter = |system: &str, class, item| DeadLetter {
                id: 0,
                time_ms: T0,
                system: system.to_string(),
                entity: ENTITY.to_string(),
                class,
                reason: "see item".to_string(),
                item,
            };
            let change_letter = t.dead_letter(letter(
                "crm",
                DeadLetterClass::Validation,
                DeadItem::Change {
                    record: SourceRecord {
                        local_id: "c-2".to_string(),
                        kind: ChangeKind::Upsert,
                        fields: json!({"Email": "not-an-email"})
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                        version: None,
                        source_time_ms: Some(T0),
                    },
                },
            ))?;
            let reject_letter = t.dead_letter(letter(
                "crm",
                DeadLetterClass::Unreadable,
                DeadItem::Reject {
                    reject: SourceReject {
                        location: "people.csv:7".to_string(),
                        reason: "unterminated quote".to_string(),
                        raw: "\"Ada,ada@example.com".to_string(),
                    },
                },
            ))?;
            let write_letter = t.dead_letter(letter(
                "hr",
                DeadLetterClass::WriteRejected,
                DeadItem::Write {
                    entry: outbox_entry("hr", person),
                },
            ))?;
            t.log_write(WriteLogEntry {
                id: 0,
                time_ms: T0,
                source_system: "crm".to_string(),
                target_system: "hr".to_string(),
                entity: ENTITY.to_string(),
                global_id: person,
                op: "update".to_string(),
                outcome: "ok".to_string(),
                attempt: 1,
                seq: 1,
                error: None,
            })?;
            Ok::<_, StateError>(Seeded {
                person,
                decision,
                change_letter,
                reject_letter,
                write_letter,
            })
        })
        .expect("seeding a fresh store succeeds")
}

/// The stand-in for the engine's replay: takes the dead letter out and requeues writes.
/// A failed replay returns an error, which aborts the transaction and leaves the letter.
fn store_replay(store: StateStore) -> ReplayFn {
    Arc::new(move |id| {
        store.write(|t| {
            let Some(letter) = t.take_dead_letter(id)? else {
                return Err(ReplayError::NotFound(id));
            };
            match letter.item {
                DeadItem::Reject { .. } => Err(ReplayError::NotReplayable(id)),
                DeadItem::Write { entry } => Ok(ReplayOutcome::Requeued { seq: t.enqueue(entry)? }),
                DeadItem::Change { .. } => Ok(ReplayOutcome::Merged),
            }
        })
    })
}

struct Options {
    metrics: bool,
    replay: Option<ReplayFn>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            metrics: true,
            replay: None,
        }
    }
}

impl Server {
    async fn start() -> Server {
        Server::start_with(Options::default()).await
    }

    async fn start_with(options: Options) -> Server {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = StateStore::open(dir.path(), 16).expect("open state store");
        let seeded = seed(&store);
        let status = SharedStatus::default();
        // Stale depths, so the test sees the API refresh them from the store.
        status.system("crm", |s| s.outbox_depth = 99);
        status.system("hr", |s| s.dlq_depth = 99);
        let ctx = AdminContext {
            store: store.clone(),
            status: status.clone(),
            metrics: options.metrics.then(recorder),
            replay: options.replay.unwrap_or_else(|| store_replay(store.clone())),
            entities: vec![ENTITY.to_string()].into(),
            auth: AdminAuth::open(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(ctx, listener, async move {
            let _ = stop.await;
        }));
        Server {
            addr,
            status,
            seeded,
            shutdown: Some(shutdown),
            task,
            _dir: dir,
        }
    }
}

fn record_path(entity: &str, id: &str) -> String {
    format!("/api/v1/entities/{entity}/records/{id}")
}

async fn audit_actions(addr: SocketAddr) -> Vec<(String, String)> {
    let response = get(addr, "/api/v1/audit").await;
    assert_eq!(response.status, 200);
    let body = response.json();
    body["audit"]
        .as_array()
        .expect("audit list")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_string(),
                e["target"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Probes and metrics.

#[tokio::test]
async fn healthz_always_and_readyz_once_ready() {
    let server = Server::start().await;
    let health = get(server.addr, "/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    assert!(
        health
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );

    let starting = get(server.addr, "/readyz").await;
    assert_eq!(starting.status, 503);
    assert_eq!(starting.json(), json!({"status": "starting"}));

    server.status.update(|s| s.ready = true);
    let ready = get(server.addr, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), json!({"status": "ready"}));
}

#[tokio::test]
async fn metrics_count_requests_by_status_class() {
    let server = Server::start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    assert_eq!(get(server.addr, "/no/such/route").await.status, 404);
    let response = get(server.addr, "/metrics").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/plain; version=0.0.4"));
    let text = String::from_utf8(response.body).expect("exposition is utf-8");
    let count = |outcome: &str| {
        let prefix = format!("concord_admin_requests_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {outcome} sample in:\n{text}"))
    };
    // Other tests share the recorder, so the counts are at least this test's requests.
    assert!(count("2xx") >= 1.0);
    assert!(count("4xx") >= 1.0);
}

#[tokio::test]
async fn metrics_without_recorder_is_a_json_404() {
    let server = Server::start_with(Options {
        metrics: false,
        replay: None,
    })
    .await;
    let response = get(server.addr, "/metrics").await;
    assert_eq!(response.status, 404);
    assert_eq!(response.error(), "metrics are not enabled");
}

// ---------------------------------------------------------------------------------------
// Status.

#[tokio::test]
async fn status_refreshes_counts_from_the_store() {
    let server = Server::start().await;
    let response = get(server.addr, "/api/v1/status").await;
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["records"], json!(1));
    assert_eq!(body["ready"], json!(false));
    assert_eq!(body["systems"]["crm"]["outbox_depth"], json!(0));
    assert_eq!(body["systems"]["crm"]["dlq_depth"], json!(2));
    assert_eq!(body["systems"]["hr"]["outbox_depth"], json!(1));
    assert_eq!(body["systems"]["hr"]["dlq_depth"], json!(1));
}

// ---------------------------------------------------------------------------------------
// Records.

#[tokio::test]
async fn record_by_global_id_explains_every_field() {
    let server = Server::start().await;
    let id = server.seeded.person.to_string();
    let response = get(server.addr, &record_path(ENTITY, &id)).await;
    assert_eq!(response.status, 200, "{:?}", String::from_utf8_lossy(&response.body));
    let body = response.json();
    assert_eq!(body["entity"], json!(ENTITY));
    assert_eq!(body["global_id"], json!(id));
    assert_eq!(body["deleted"], json!(false));
    assert_eq!(
        body["fields"]["email"],
        json!({
            "value": "ada@example.com",
            "system": "crm",
            "rule": "owner",
            "source_time": "2023-11-14T22:13:20.000Z",
            "version": "v3",
            "decision": server.seeded.decision,
        })
    );
    assert_eq!(body["fields"]["name"]["rule"], json!("last_writer_wins"));
    assert_eq!(body["fields"]["name"]["version"], Value::Null);
    assert_eq!(
        body["systems"]["hr"],
        json!({
            "local_id": "h-1",
            "fields": {"name": "A. Lovelace"},
            "version": null,
            "pending": {"email": "ada@example.com"},
            "diverged": ["name"],
            "deleted": false,
        })
    );
    assert_eq!(body["systems"]["crm"]["local_id"], json!("c-1"));
    assert_eq!(body["systems"]["crm"]["pending"], json!({}));
    assert_eq!(body["match_keys"], json!({"email": "ada@example.com"}));
    assert_eq!(body["created"], json!("2023-11-14T22:13:20.000Z"));
    assert_eq!(body["updated"], json!("2023-11-14T22:13:21.000Z"));
    let decisions = body["recent_decisions"].as_array().expect("recent decisions list");
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0]["id"], json!(server.seeded.decision));
}

#[tokio::test]
async fn record_by_system_local_id_resolves_through_identity() {
    let server = Server::start().await;
    for local in ["crm:c-1", "hr:h-1", "crm%3Ac-1"] {
        let response = get(server.addr, &record_path(ENTITY, local)).await;
        assert_eq!(response.status, 200, "{local}");
        assert_eq!(
            response.json()["global_id"],
            json!(server.seeded.person.to_string()),
            "{local}"
        );
    }
}

#[tokio::test]
async fn reading_a_record_is_audited_with_the_peer_address() {
    let server = Server::start().await;
    let id = server.seeded.person;
    assert!(audit_actions(server.addr).await.is_empty());
    assert_eq!(get(server.addr, &record_path(ENTITY, "crm:c-1")).await.status, 200);
    let response = get(server.addr, "/api/v1/audit").await;
    let body = response.json();
    let entry = &body["audit"][0];
    assert_eq!(entry["action"], json!("read_record"));
    assert_eq!(entry["target"], json!(format!("{ENTITY}/{id}")));
    assert_eq!(entry["who"], json!(ANONYMOUS));
    let from: SocketAddr = entry["from"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("from is a socket address");
    assert!(from.ip().is_loopback());
    assert_ne!(
        from.port(),
        server.addr.port(),
        "from is the client's address, not the server's"
    );
}

#[tokio::test]
async fn record_lookup_errors_are_json() {
    let server = Server::start().await;
    let cases = [
        (
            record_path(ENTITY, "not-a-uuid"),
            400,
            "record id must be a uuid or system:local_id",
        ),
        (
            record_path(ENTITY, "crm:"),
            400,
            "record id must be a uuid or system:local_id",
        ),
        (
            record_path("invoice", &server.seeded.person.to_string()),
            404,
            "unknown entity",
        ),
        (record_path(ENTITY, "crm:nobody"), 404, "record not found"),
        (record_path(ENTITY, "lms:c-1"), 404, "record not found"),
        (
            record_path(ENTITY, "0190a3c2-0000-7000-8000-0000000000ff"),
            404,
            "record not found",
        ),
        (
            record_path(ENTITY, "%FF%FE"),
            400,
            "invalid path: a segment is not valid percent-encoded utf-8",
        ),
    ];
    for (path, status, message) in cases {
        let response = get(server.addr, &path).await;
        assert_eq!(response.status, status, "{path}");
        assert_eq!(response.error(), message, "{path}");
    }
    // Failed lookups read no record data, so nothing is audited.
    assert!(audit_actions(server.addr).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Decisions, write log, audit.

#[tokio::test]
async fn decisions_filter_and_validate_parameters() {
    let server = Server::start().await;
    let count = |response: HttpResponse| {
        assert_eq!(response.status, 200, "{:?}", String::from_utf8_lossy(&response.body));
        response.json()["decisions"].as_array().expect("decision list").len()
    };
    let id = server.seeded.person;
    assert_eq!(count(get(server.addr, "/api/v1/decisions").await), 1);
    assert_eq!(
        count(
            get(
                server.addr,
                &format!("/api/v1/decisions?entity={ENTITY}&global_id={id}")
            )
            .await
        ),
        1
    );
    assert_eq!(
        count(get(server.addr, "/api/v1/decisions?conflicts=true&system=crm").await),
        1
    );
    assert_eq!(count(get(server.addr, "/api/v1/decisions?flagged=true").await), 0);
    assert_eq!(count(get(server.addr, "/api/v1/decisions?system=hr").await), 0);
    assert_eq!(count(get(server.addr, "/api/v1/decisions?limit=1000").await), 1);
    let first = get(server.addr, "/api/v1/decisions").await.json();
    assert_eq!(
        first["decisions"][0]["fields"][0]["previous"],
        json!("ada@old.example.com")
    );

    for query in [
        "global_id=nope",
        "limit=0",
        "limit=1001",
        "limit=ten",
        "flagged=yes",
        "sytem=crm",
        "limit=1&limit=2",
    ] {
        let response = get(server.addr, &format!("/api/v1/decisions?{query}")).await;
        assert_eq!(response.status, 400, "{query}");
        assert!(response.error().starts_with("invalid query string"), "{query}");
    }
    let unknown = get(server.addr, "/api/v1/decisions?entity=invoice").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error(), "unknown entity");
    assert!(
        audit_actions(server.addr)
            .await
            .iter()
            .any(|(action, _)| action == "read_decisions")
    );
}

#[tokio::test]
async fn write_log_lists_attempts_by_system() {
    let server = Server::start().await;
    let list = |response: HttpResponse| {
        assert_eq!(response.status, 200);
        response.json()["writes"].as_array().expect("write list").clone()
    };
    let all = list(get(server.addr, "/api/v1/writes").await);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["target_system"], json!("hr"));
    assert_eq!(all[0]["outcome"], json!("ok"));
    assert_eq!(
        list(get(server.addr, "/api/v1/writes?system=crm&limit=5").await).len(),
        1
    );
    assert_eq!(list(get(server.addr, "/api/v1/writes?system=lms").await).len(), 0);
    assert_eq!(get(server.addr, "/api/v1/writes?limit=-1").await.status, 400);
}

#[tokio::test]
async fn audit_lists_newest_first_with_a_limit() {
    let server = Server::start().await;
    assert_eq!(get(server.addr, &record_path(ENTITY, "crm:c-1")).await.status, 200);
    assert_eq!(get(server.addr, "/api/v1/dlq").await.status, 200);
    let actions = audit_actions(server.addr).await;
    assert_eq!(
        actions.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["read_dlq", "read_record"]
    );
    let limited = get(server.addr, "/api/v1/audit?limit=1").await.json();
    assert_eq!(limited["audit"].as_array().map(Vec::len), Some(1));
    assert_eq!(get(server.addr, "/api/v1/audit?limit=0").await.status, 400);
}

// ---------------------------------------------------------------------------------------
// Dead letters.

#[tokio::test]
async fn dead_letters_carry_their_items_and_are_audited() {
    let server = Server::start().await;
    let response = get(server.addr, "/api/v1/dlq").await;
    assert_eq!(response.status, 200);
    let body = response.json();
    let letters = body["dead_letters"].as_array().expect("dead letter list");
    let ids: Vec<u64> = letters.iter().filter_map(|l| l["id"].as_u64()).collect();
    let s = &server.seeded;
    assert_eq!(ids, [s.write_letter, s.reject_letter, s.change_letter], "newest first");
    let change = &letters[2];
    assert_eq!(change["time"], json!("2023-11-14T22:13:20.000Z"));
    assert_eq!(change["system"], json!("crm"));
    assert_eq!(change["entity"], json!(ENTITY));
    assert_eq!(change["class"], json!("validation"));
    assert_eq!(change["reason"], json!("see item"));
    assert_eq!(change["replayable"], json!(true));
    assert_eq!(change["item"]["type"], json!("change"));
    assert_eq!(change["item"]["record"]["fields"], json!({"Email": "not-an-email"}));
    assert_eq!(letters[1]["item"]["type"], json!("reject"));
    assert_eq!(letters[1]["replayable"], json!(false));
    assert_eq!(letters[0]["item"]["type"], json!("write"));

    let hr = get(server.addr, "/api/v1/dlq?system=hr&limit=10").await.json();
    assert_eq!(hr["dead_letters"].as_array().map(Vec::len), Some(1));
    assert_eq!(get(server.addr, "/api/v1/dlq?limit=5000").await.status, 400);

    let actions = audit_actions(server.addr).await;
    assert_eq!(
        actions,
        [
            ("read_dlq".to_string(), "dlq?system=hr".to_string()),
            ("read_dlq".to_string(), "dlq".to_string())
        ]
    );
}

#[tokio::test]
async fn replay_requeues_and_reports_each_failure() {
    let server = Server::start().await;
    let s = &server.seeded;
    let replay = |id: u64| format!("/api/v1/dlq/{id}/replay");

    let requeued = post(server.addr, &replay(s.write_letter)).await;
    assert_eq!(requeued.status, 200, "{:?}", String::from_utf8_lossy(&requeued.body));
    let outcome = requeued.json();
    assert_eq!(outcome["result"], json!("requeued"));
    assert!(outcome["seq"].as_u64().is_some());

    // Gone from the queue, and the requeued write shows in the outbox depth.
    let left: Vec<u64> = get(server.addr, "/api/v1/dlq").await.json()["dead_letters"]
        .as_array()
        .expect("dead letter list")
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect();
    assert_eq!(left, [s.reject_letter, s.change_letter]);
    assert_eq!(
        get(server.addr, "/api/v1/status").await.json()["systems"]["hr"]["outbox_depth"],
        json!(2)
    );

    let again = post(server.addr, &replay(s.write_letter)).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.error(), format!("dead letter {} not found", s.write_letter));

    let reject = post(server.addr, &replay(s.reject_letter)).await;
    assert_eq!(reject.status, 409);
    assert!(reject.error().contains("unreadable source item"));
    let still = get(server.addr, "/api/v1/dlq?system=crm").await.json();
    assert_eq!(
        still["dead_letters"].as_array().map(Vec::len),
        Some(2),
        "a refused replay keeps the letter"
    );

    let merged = send(server.addr, "POST", &replay(s.change_letter), b"ignored").await;
    assert_eq!(merged.status, 200);
    assert_eq!(merged.json(), json!({"result": "merged"}));

    for bad in ["abc", "-1", "1.5", "99999999999999999999999"] {
        let response = post(server.addr, &format!("/api/v1/dlq/{bad}/replay")).await;
        assert_eq!(response.status, 400, "{bad}");
        assert_eq!(response.error(), "dead letter id must be a positive integer");
    }

    let replays = audit_actions(server.addr)
        .await
        .into_iter()
        .filter(|(a, _)| a == "replay_dlq")
        .count();
    assert_eq!(replays, 4, "every attempt with a valid id is audited");
}

#[tokio::test]
async fn replay_maps_engine_errors_without_internals() {
    let replay: ReplayFn = Arc::new(|id| match id {
        1 => Err(ReplayError::NoLink {
            system: "lms".to_string(),
            entity: ENTITY.to_string(),
        }),
        _ => Err(ReplayError::State(StateError::SchemaVersion { found: 7, expected: 1 })),
    });
    let server = Server::start_with(Options {
        metrics: true,
        replay: Some(replay),
    })
    .await;
    let no_link = post(server.addr, "/api/v1/dlq/1/replay").await;
    assert_eq!(no_link.status, 422);
    assert_eq!(no_link.error(), "no link for system lms and entity person");
    let failed = post(server.addr, "/api/v1/dlq/2/replay").await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.error(), "internal error");
}

#[tokio::test]
async fn oversized_body_is_refused_with_413() {
    let server = Server::start().await;
    // Declares a body over the limit and sends none: the server must answer from the
    // declared length alone.
    let raw = format!(
        "POST /api/v1/dlq/1/replay HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    let response = exchange(server.addr, raw.as_bytes()).await.expect("a response");
    assert_eq!(response.status, 413);
    assert_eq!(
        response.error(),
        format!("request body is larger than {MAX_BODY_BYTES} bytes")
    );
    // Nothing was replayed.
    let letters = get(server.addr, "/api/v1/dlq").await.json();
    assert_eq!(letters["dead_letters"].as_array().map(Vec::len), Some(3));
}

// ---------------------------------------------------------------------------------------
// Routing errors, robustness, shutdown.

#[tokio::test]
async fn unknown_routes_and_wrong_methods_are_json() {
    let server = Server::start().await;
    for path in [
        "/",
        "/nope",
        "/api/v1",
        "/api/v2/status",
        "/api/v1/entities/person/records",
    ] {
        let response = get(server.addr, path).await;
        assert_eq!(response.status, 404, "{path}");
        assert_eq!(response.error(), "no such route", "{path}");
    }
    for (method, path, allow) in [
        ("POST", "/healthz", "GET"),
        ("DELETE", "/api/v1/status", "GET"),
        ("GET", "/api/v1/dlq/1/replay", "POST"),
        ("PUT", &record_path(ENTITY, "crm:c-1"), "GET"),
    ] {
        let response = send(server.addr, method, path, b"").await;
        assert_eq!(response.status, 405, "{method} {path}");
        assert_eq!(response.error(), "method not allowed", "{method} {path}");
        let allowed = response.header("allow").unwrap_or_default();
        assert!(
            allowed.split(',').any(|m| m.trim() == allow),
            "{method} {path}: allow {allowed:?}"
        );
    }
}

/// Percent-encodes every byte outside the unreserved set.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn random_segment(rng: &mut StdRng) -> String {
    let len = rng.random_range(0..24);
    let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    percent_encode(&bytes)
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn random_target(rng: &mut StdRng, person: &str) -> String {
    let segment = |rng: &mut StdRng, known: &[&str]| {
        if rng.random_bool(0.5) {
            pick(rng, known).to_string()
        } else {
            random_segment(rng)
        }
    };
    let path = match rng.random_range(0..7) {
        0 => pick(
            rng,
            &[
                "/healthz",
                "/readyz",
                "/metrics",
                "/api/v1/status",
                "/api/v1/decisions",
                "/api/v1/dlq",
                "/api/v1/writes",
                "/api/v1/audit",
            ],
        )
        .to_string(),
        1 | 2 => {
            let entity = segment(rng, &[ENTITY, "invoice"]);
            let id = segment(
                rng,
                &[
                    person,
                    "crm:c-1",
                    "hr:h-1",
                    "crm:",
                    ":",
                    "0190a3c2-0000-7000-8000-0000000000ff",
                ],
            );
            record_path(&entity, &id)
        }
        3 => format!(
            "/api/v1/dlq/{}/replay",
            segment(rng, &["1", "2", "3", "4", "0", "18446744073709551615"])
        ),
        4 => format!("/{}", random_segment(rng)),
        5 => format!("/api/v1/{}", random_segment(rng)),
        _ => format!("/api/v1/entities/{}/{}", random_segment(rng), random_segment(rng)),
    };
    if !rng.random_bool(0.5) {
        return path;
    }
    let pairs: Vec<String> = (0..rng.random_range(1..4))
        .map(|_| {
            let key = segment(rng, &["limit", "system", "entity", "global_id", "flagged", "conflicts"]);
            let value = segment(rng, &["1", "1000", "0", "true", "false", "crm", ENTITY, person]);
            format!("{key}={value}")
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

#[tokio::test]
async fn random_requests_get_json_answers_and_never_break_the_server() {
    let server = Server::start().await;
    server.status.update(|s| s.ready = true);
    let seed: u64 = std::env::var("CONCORD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let person = server.seeded.person.to_string();
    for _ in 0..200 {
        let method = pick(
            &mut rng,
            &["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
        );
        let target = random_target(&mut rng, &person);
        let body: &[u8] = if rng.random_bool(0.2) { b"{\"x\":1}" } else { b"" };
        let mut raw = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        let context = format!("seed {seed}: {method} {target}");
        let response = exchange(server.addr, &raw)
            .await
            .unwrap_or_else(|e| panic!("{context}: {e}"));
        assert!(response.status < 500, "{context}: status {}", response.status);
        if method == "GET" && target.split('?').next() == Some("/metrics") {
            assert_eq!(response.status, 200, "{context}");
            continue;
        }
        let json: Value = serde_json::from_slice(&response.body).unwrap_or_else(|e| {
            panic!(
                "{context}: body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&response.body)
            )
        });
        assert!(json.is_object(), "{context}: {json}");
        if response.status >= 400 {
            assert!(json["error"].is_string(), "{context}: {json}");
        }
    }
    let health = get(server.addr, "/healthz").await;
    assert_eq!(health.status, 200, "seed {seed}");
}

#[tokio::test]
async fn serve_stops_on_shutdown() {
    let mut server = Server::start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    if let Some(shutdown) = server.shutdown.take() {
        shutdown.send(()).expect("server is still running");
    }
    let result = (&mut server.task).await.expect("server task does not panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener is closed after shutdown"
    );
}
