//! Admin API access control over real HTTP and HTTPS on loopback: bearer tokens, the
//! audit trail they leave, rotation, the public-listener rule and TLS; and a property
//! test that drives the router in-process with random requests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use concord::config::{AdminConfig, AdminTls, AdminToken, SecretRef};
use concord::engine::status::SharedStatus;
use concord::http::{ANONYMOUS, AdminAuth, AdminContext, AuthError, ReplayError, router, serve};
use concord::model::{ChangeKind, SourceRecord};
use concord::state::{DeadItem, DeadLetter, DeadLetterClass, StateStore};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Secrets and a record value that must never appear in an error body.
const OPS_SECRET: &str = "ops-canary-secret-7f3a";
const CI_SECRET: &str = "ci-canary-secret-91bd";
const RECORD_CANARY: &str = "record-canary@example.com";

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {} body is not JSON ({e}): {:?}", self.status, self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a 401 that asks for a bearer token in JSON.
    fn assert_unauthorized(&self) {
        assert_eq!(self.status, 401, "{}", self.text());
        assert_eq!(self.header("www-authenticate"), Some("Bearer"));
        assert_eq!(self.json(), json!({"error": "a valid bearer token is required"}));
    }
}

/// One request with `Connection: close` over any byte stream; reads until the server
/// closes. Responses here all carry a Content-Length, so the body is the rest.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    target: &str,
    token: Option<&str>,
) -> Response {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(raw.as_bytes()).await.expect("write request");
    let mut bytes = Vec::new();
    // A TLS peer may close without close_notify after the response; what was read counts.
    let _ = stream.read_to_end(&mut bytes).await;
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers: {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: bytes[end + 4..].to_vec(),
    }
}

async fn get(addr: SocketAddr, target: &str, token: Option<&str>) -> Response {
    exchange(TcpStream::connect(addr).await.expect("connect"), "GET", target, token).await
}

fn token(dir: &Path, name: &str, secret: &str) -> AdminToken {
    let file = format!("{name}.token");
    std::fs::write(dir.join(&file), format!("{secret}\n")).expect("write token file");
    AdminToken {
        name: name.to_string(),
        secret: SecretRef::File(file.into()),
    }
}

fn two_tokens(dir: &Path) -> AdminConfig {
    AdminConfig {
        tokens: vec![token(dir, "ops", OPS_SECRET), token(dir, "ci", CI_SECRET)],
        ..AdminConfig::default()
    }
}

fn context(dir: &Path, auth: AdminAuth) -> AdminContext {
    let store = StateStore::open(&dir.join("state"), 8).expect("open state store");
    store
        .write(|t| {
            t.dead_letter(DeadLetter {
                id: 0,
                time_ms: 1_700_000_000_000,
                system: "crm".to_string(),
                entity: "person".to_string(),
                class: DeadLetterClass::Validation,
                reason: "email is not valid".to_string(),
                item: DeadItem::Change {
                    record: SourceRecord {
                        local_id: "c-1".to_string(),
                        kind: ChangeKind::Upsert,
                        fields: json!({"Email": RECORD_CANARY}).as_object().cloned().unwrap_or_default(),
                        version: None,
                        source_time_ms: None,
                    },
                },
            })
        })
        .expect("seed a dead letter");
    AdminContext {
        store,
        status: SharedStatus::default(),
        metrics: Some(
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
        ),
        replay: Arc::new(|id| Err(ReplayError::NotFound(id))),
        entities: vec!["person".to_string()].into(),
        auth,
    }
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(ctx: AdminContext) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(ctx, listener, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let result = (&mut self.task).await.expect("server task");
        assert!(result.is_ok(), "server stopped with {result:?}");
    }
}

#[tokio::test]
async fn without_tokens_the_api_is_open_and_audited_as_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(context(dir.path(), AdminAuth::open())).await;
    assert_eq!(get(server.addr, "/api/v1/dlq", None).await.status, 200);
    let audit = get(server.addr, "/api/v1/audit", None).await;
    assert_eq!(audit.status, 200);
    let entry = &audit.json()["audit"][0];
    assert_eq!(entry["who"], json!(ANONYMOUS));
    assert_eq!(entry["action"], json!("read_dlq"));
    server.stop().await;
}

#[tokio::test]
async fn tokens_guard_everything_but_the_probes_and_name_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let auth = AdminAuth::from_config(&two_tokens(dir.path()), dir.path()).expect("tokens load");
    let server = Server::start(context(dir.path(), auth)).await;
    let addr = server.addr;

    assert_eq!(get(addr, "/healthz", None).await.status, 200);
    assert_eq!(get(addr, "/readyz", None).await.status, 503);
    for target in [
        "/metrics",
        "/api/v1/status",
        "/api/v1/dlq",
        "/api/v1/audit",
        "/no/such/route",
    ] {
        get(addr, target, None).await.assert_unauthorized();
        get(addr, target, Some("wrong")).await.assert_unauthorized();
        let wrong = get(addr, target, Some(&format!("{OPS_SECRET}x"))).await;
        wrong.assert_unauthorized();
        assert!(!wrong.text().contains(OPS_SECRET));
    }
    let metrics = get(addr, "/metrics", Some(OPS_SECRET)).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );

    assert_eq!(get(addr, "/api/v1/dlq", Some(OPS_SECRET)).await.status, 200);
    assert_eq!(get(addr, "/api/v1/decisions", Some(CI_SECRET)).await.status, 200);
    let audit = get(addr, "/api/v1/audit", Some(CI_SECRET)).await;
    assert_eq!(audit.status, 200);
    let entries: Vec<(String, String, String)> = audit.json()["audit"]
        .as_array()
        .expect("audit list")
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("who"), field("action"), field("from"))
        })
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!((entries[0].0.as_str(), entries[0].1.as_str()), ("ci", "read_decisions"));
    assert_eq!((entries[1].0.as_str(), entries[1].1.as_str()), ("ops", "read_dlq"));
    for (_, _, from) in &entries {
        let peer: SocketAddr = from
            .parse()
            .unwrap_or_else(|_| panic!("from is a peer address: {from}"));
        assert!(peer.ip().is_loopback(), "{from}");
    }
    server.stop().await;
}

#[tokio::test]
async fn reload_rotates_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let auth = AdminAuth::from_config(&two_tokens(dir.path()), dir.path()).expect("tokens load");
    let server = Server::start(context(dir.path(), auth.clone())).await;
    assert_eq!(get(server.addr, "/api/v1/status", Some(OPS_SECRET)).await.status, 200);

    std::fs::write(dir.path().join("ops.token"), "ops-rotated-secret\n").unwrap();
    // Until the reload the old secret stays in force.
    assert_eq!(get(server.addr, "/api/v1/status", Some(OPS_SECRET)).await.status, 200);
    auth.reload().expect("reload");
    get(server.addr, "/api/v1/status", Some(OPS_SECRET))
        .await
        .assert_unauthorized();
    assert_eq!(
        get(server.addr, "/api/v1/status", Some("ops-rotated-secret"))
            .await
            .status,
        200
    );
    assert_eq!(get(server.addr, "/api/v1/status", Some(CI_SECRET)).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_public_listener_without_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = AdminConfig {
        listen: "0.0.0.0:0".to_string(),
        ..AdminConfig::default()
    };
    assert!(matches!(
        AdminAuth::from_config(&config, dir.path()),
        Err(AuthError::PublicWithoutTokens)
    ));
    // `serve` refuses too, whatever the context was built from.
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind any address");
    let result = serve(context(dir.path(), AdminAuth::open()), listener, std::future::pending()).await;
    let error = result.expect_err("refused");
    assert_eq!(
        error.to_string(),
        "admin.listen: a non-loopback listener needs admin.tokens"
    );
}

#[tokio::test]
async fn tls_serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("self-signed certificate");
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    let config = AdminConfig {
        tls: Some(AdminTls {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
        }),
        ..two_tokens(dir.path())
    };
    let auth = AdminAuth::from_config(&config, dir.path()).expect("tls loads");
    let server = Server::start(context(dir.path(), auth)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certified.cert.der().clone())
        .expect("trust the test certificate");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let https = async |target: &str, token: Option<&str>| {
        let tcp = TcpStream::connect(server.addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let tls = connector.connect(name, tcp).await.expect("tls handshake");
        exchange(tls, "GET", target, token).await
    };

    assert_eq!(https("/healthz", None).await.status, 200);
    https("/api/v1/dlq", Some("wrong")).await.assert_unauthorized();
    assert_eq!(https("/api/v1/dlq", Some(OPS_SECRET)).await.status, 200);
    let audit = https("/api/v1/audit", Some(OPS_SECRET)).await.json();
    assert_eq!(audit["audit"][0]["who"], json!("ops"));
    assert!(
        audit["audit"][0]["from"]
            .as_str()
            .is_some_and(|f| f.starts_with("127.0.0.1:"))
    );

    // Plain HTTP on the TLS listener gets no answer.
    let mut plain = TcpStream::connect(server.addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut bytes = Vec::new();
    let _ = plain.read_to_end(&mut bytes).await;
    assert!(
        !bytes.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Random requests, in-process.

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
const PATHS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/status",
    "/api/v1/entities/person/records/crm:c-1",
    "/api/v1/entities/person/records/0190a3c2-0000-7000-8000-000000000001",
    "/api/v1/entities/nope/records/x",
    "/api/v1/decisions",
    "/api/v1/dlq",
    "/api/v1/dlq/1/replay",
    "/api/v1/dlq/99999999999999999999999/replay",
    "/api/v1/writes",
    "/api/v1/audit",
    "/",
];

fn request_strategy() -> impl Strategy<Value = (String, String, Option<String>, Vec<u8>, Option<String>)> {
    let method = prop::sample::select(METHODS).prop_map(str::to_string);
    let path = (prop::sample::select(PATHS), prop::option::of("[a-z0-9%/?=&:._-]{0,24}"))
        .prop_map(|(p, tail)| format!("{p}{}", tail.unwrap_or_default()));
    let authorization = prop_oneof![
        Just(None),
        Just(Some(format!("Bearer {OPS_SECRET}"))),
        Just(Some(format!("bearer {CI_SECRET}"))),
        "[ -~]{0,40}".prop_map(Some),
        "Bearer [ -~]{0,40}".prop_map(Some),
    ];
    let body = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..256),
        Just(b"{\"not\": json".to_vec()),
        Just(vec![b'x'; 70 * 1024]),
    ];
    let content_type = prop::option::of(prop_oneof![
        Just("application/json".to_string()),
        "[ -~]{0,20}".prop_map(|s| s),
    ]);
    (method, path, authorization, body, content_type)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_requests_get_json_errors_without_secrets(
        requests in prop::collection::vec(request_strategy(), 1..8)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let auth = AdminAuth::from_config(&two_tokens(dir.path()), dir.path()).expect("tokens load");
            let app = router(context(dir.path(), auth));
            for (method, path, authorization, body, content_type) in requests {
                let Ok(uri) = path.parse::<axum::http::Uri>() else { continue };
                let probe = uri.path() == "/healthz" || uri.path() == "/readyz";
                let valid = authorization.as_deref().is_some_and(|a| {
                    a == format!("Bearer {OPS_SECRET}") || a == format!("bearer {CI_SECRET}")
                });
                let mut request = Request::builder().method(method.as_str()).uri(uri);
                if let Some(value) = &authorization {
                    request = request.header("authorization", value.as_bytes());
                }
                if let Some(value) = &content_type {
                    request = request.header("content-type", value.as_bytes());
                }
                let Ok(request) = request.body(Body::from(body)) else { continue };
                let response = app.clone().oneshot(request).await.expect("the router is infallible");
                let status = response.status();
                let is_metrics = path.starts_with("/metrics") && status.is_success();
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
                let text = String::from_utf8_lossy(&bytes);
                prop_assert!(!status.is_server_error() || status.as_u16() == 503 && probe,
                    "{method} {path}: {status} {text}");
                if method != "HEAD" && !is_metrics {
                    prop_assert!(serde_json::from_slice::<Value>(&bytes).is_ok(), "{method} {path}: {status} {text}");
                }
                if status.is_client_error() {
                    for secret in [OPS_SECRET, CI_SECRET, RECORD_CANARY] {
                        prop_assert!(!text.contains(secret), "{method} {path}: {status} {text}");
                    }
                }
                // Without a valid token only the probes answer, whatever the route.
                prop_assert_eq!(status.as_u16() == 401, !valid && !probe, "{} {}: {} {}", method, path, status, text);
            }
            Ok(())
        })?;
    }
}
