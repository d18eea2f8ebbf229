//! The REST connector against small purpose-built APIs on loopback
//! (`support/http_api.rs`): every pagination style, cursor ties and look-back, restart
//! from a checkpoint, a page boundary moving during a walk, each delete detection
//! mode, writes with optimistic concurrency, bad responses of every kind, rate limits,
//! timeouts, auth variants with secrets from files; and the connector driven by the
//! engine with a file system on the other side (a 412 re-merged, an echo that writes
//! nothing).

#[path = "support/http_api.rs"]
mod http_api;
mod support;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::Method;
use concord::config::{LinkConfig, SystemConfig};
use concord::connector::rest::{RestClient, RestSink, RestSource, RestSystemConfig};
use concord::connector::{ConnectorError, ErrorClass, SourceBatch};
use concord::model::{ChangeKind, GlobalId, SourceRecord, Write, WriteOp};
use http_api::{Api, Auth, Fault, Paging, rfc3339_ms};
use serde_json::{Value, json};

const T0: i64 = 1_800_000_000_000;

/// A REST system of type `rest` over `api`, with one object `items`.
fn system(api: &Api, extra: &str, object: &str) -> (SystemConfig, RestSystemConfig) {
    let text = format!(
        "type = \"rest\"\nbase_url = \"{}\"\n{extra}\n[objects.items]\nlist = {{ path = \"/items\" }}\n{object}\n",
        api.base
    );
    let system: SystemConfig = toml::from_str(&text).expect("system parses");
    let concord::config::ConnectorConfig::Rest(rest) = system.connector.clone() else {
        panic!("a rest system");
    };
    (system, rest)
}

fn link() -> LinkConfig {
    toml::from_str("system = \"api\"\nentity = \"contact\"\nobject = \"items\"\nid_field = \"id\"").unwrap()
}

fn client(system: &SystemConfig, rest: &RestSystemConfig, dir: &Path) -> RestClient {
    RestClient::new("api", system, rest, dir).expect("client builds")
}

fn source(api: &Api, extra: &str, object: &str, checkpoint: Option<&Value>) -> RestSource {
    source_known(api, extra, object, checkpoint, HashSet::new())
}

fn source_known(
    api: &Api,
    extra: &str,
    object: &str,
    checkpoint: Option<&Value>,
    known: HashSet<String>,
) -> RestSource {
    let (sys, rest) = system(api, extra, object);
    RestSource::open(
        client(&sys, &rest, Path::new(".")),
        &rest.objects,
        &link(),
        checkpoint,
        || known,
    )
    .expect("source opens")
}

/// Batches until the source says nothing more; panics past 1000 batches (a loop).
async fn drain(source: &mut RestSource, max: usize) -> Vec<SourceBatch> {
    let mut batches = Vec::new();
    while let Some(batch) = source.next_batch(max).await.expect("batch") {
        batches.push(batch);
        assert!(batches.len() < 1000, "the source never ends its walk");
    }
    batches
}

fn ids(batches: &[SourceBatch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.local_id.clone()))
        .collect()
}

fn assert_once(got: &[String], want: impl IntoIterator<Item = String>) {
    let want: BTreeSet<String> = want.into_iter().collect();
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(unique, want, "every record is yielded");
    assert_eq!(got.len(), unique.len(), "no record is yielded twice: {got:?}");
}

const CURSOR: &str =
    "cursor = { field = \"updated_at\", param = \"since\", format = \"rfc3339_millis\", lookback_secs = 5 }";

fn seed(api: &Api, n: usize, spacing_ms: i64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let id = format!("r{i:03}");
            api.put(
                &id,
                T0 + i as i64 * spacing_ms,
                json!({"email": format!("p{i}@example.com")}),
            );
            id
        })
        .collect()
}

#[tokio::test]
async fn every_pagination_style_yields_every_record_once() {
    let styles = [
        (Paging::None, "pagination = { style = \"none\" }"),
        (Paging::Page, "pagination = { style = \"page\", size = 10 }"),
        (Paging::Offset, "pagination = { style = \"offset\", limit = 10 }"),
        (
            Paging::Token,
            "pagination = { style = \"token\", pointer = \"/next_token\", param = \"token\" }\nrecords = \"/data\"",
        ),
        (
            Paging::NextUrl,
            "pagination = { style = \"next_url\", pointer = \"/next\" }\nrecords = \"/data\"",
        ),
        (Paging::LinkHeader, "pagination = { style = \"link_header\" }"),
    ];
    for (paging, settings) in styles {
        for cursor in [true, false] {
            let api = Api::start(paging, 10).await;
            api.lock().envelope = settings.contains("/data");
            let want = seed(&api, 25, 1000);
            let object = format!("{settings}\n{}", if cursor { CURSOR } else { "" });
            let mut s = source(&api, "", &object, None);
            let batches = drain(&mut s, 7).await;
            assert_once(&ids(&batches), want);
            assert!(batches.iter().all(|b| b.records.len() <= 7));
            if paging != Paging::None {
                assert!(
                    api.requests(Method::GET).len() >= 3,
                    "{paging:?} took more than one page"
                );
            }
        }
    }
}

#[tokio::test]
async fn many_records_sharing_one_timestamp_across_pages_are_all_yielded_and_the_cursor_moves_on() {
    let api = Api::start(Paging::LinkHeader, 10).await;
    let want = seed(&api, 35, 0);
    let object = format!("pagination = {{ style = \"link_header\" }}\n{CURSOR}");
    let mut s = source(&api, "", &object, None);
    let batches = drain(&mut s, 500).await;
    assert_once(&ids(&batches), want);
    let checkpoint = batches.last().unwrap().checkpoint.clone();
    assert_eq!(checkpoint["cursor_ms"], json!(T0));

    // The next poll reads the same second again (look-back) and yields nothing.
    assert!(drain(&mut s, 500).await.is_empty());

    // A record committed late with the same timestamp, and one inside the look-back
    // window but older than the cursor, are still yielded, once.
    api.put("late-same", T0, json!({}));
    api.put("late-older", T0 - 3000, json!({}));
    api.put("newer", T0 + 10, json!({}));
    let asked = api.requests(Method::GET).len();
    let batches = drain(&mut s, 500).await;
    // The poll asked from the cursor minus the look-back window.
    assert_eq!(api.requests(Method::GET)[asked].query["since"], rfc3339_ms(T0 - 5000));
    assert_once(&ids(&batches), ["late-same", "late-older", "newer"].map(String::from));
    assert_eq!(batches.last().unwrap().checkpoint["cursor_ms"], json!(T0 + 10));
    assert!(drain(&mut s, 500).await.is_empty());
}

#[tokio::test]
async fn a_restart_from_the_checkpoint_yields_nothing_twice() {
    let api = Api::start(Paging::Page, 10).await;
    let mut want = seed(&api, 20, 0);
    for i in 0..5 {
        let id = format!("s{i}");
        api.put(&id, T0 + 1 + i, json!({}));
        want.push(id);
    }
    let object = format!("pagination = {{ style = \"page\", size = 10 }}\n{CURSOR}");
    let mut first = source(&api, "", &object, None);
    let one = first.next_batch(7).await.unwrap().unwrap();
    let two = first.next_batch(7).await.unwrap().unwrap();
    drop(first);
    let mut second = source(&api, "", &object, Some(&two.checkpoint));
    let rest = drain(&mut second, 7).await;
    let mut got = ids(&[one, two]);
    got.extend(ids(&rest));
    assert_once(&got, want);
}

#[tokio::test]
async fn a_page_boundary_moving_during_a_walk_skips_no_record() {
    let api = Api::start(Paging::NextUrl, 10).await;
    api.lock().envelope = true;
    let want = seed(&api, 30, 1000);
    // After the first page, the first record is modified: with a lazily evaluated
    // offset, every later record moves one place toward the start.
    let mut moved = false;
    api.lock().after_page = Some(Box::new(move |items, _| {
        if !moved {
            moved = true;
            let first = items.iter_mut().find(|i| i.id == "r000").unwrap();
            first.mtime_ms = T0 + 1_000_000;
        }
    }));
    let object = format!("pagination = {{ style = \"next_url\", pointer = \"/next\" }}\nrecords = \"/data\"\n{CURSOR}");
    let mut s = source(&api, "", &object, None);
    let batches = drain(&mut s, 500).await;
    let got: BTreeSet<String> = ids(&batches).into_iter().collect();
    assert_eq!(got, want.iter().cloned().collect::<BTreeSet<_>>(), "no record skipped");
    let r0: Vec<&SourceRecord> = batches
        .iter()
        .flat_map(|b| &b.records)
        .filter(|r| r.local_id == "r000")
        .collect();
    assert_eq!(
        r0.last().unwrap().source_time_ms,
        Some(T0 + 1_000_000),
        "the moved record's new version"
    );
}

#[tokio::test]
async fn integer_ids_become_strings_and_times_become_source_times() {
    let api = Api::start(Paging::None, 10).await;
    api.lock().integer_ids = true;
    api.put("4711", T0, json!({"email": "a@example.com"}));
    let mut s = source(&api, "", CURSOR, None);
    let batches = drain(&mut s, 10).await;
    let r = &batches[0].records[0];
    assert_eq!(r.local_id, "4711");
    assert_eq!(r.source_time_ms, Some(T0));
    assert_eq!(r.fields["email"], json!("a@example.com"));
}

#[tokio::test]
async fn deletes_by_flag_field() {
    let api = Api::start(Paging::None, 10).await;
    api.lock().list_deleted = true;
    seed(&api, 3, 1000);
    let object = format!("{CURSOR}\ndeletes = {{ mode = \"flag\", field = \"deleted_at\" }}");
    let mut s = source(&api, "", &object, None);
    let first = drain(&mut s, 10).await;
    assert!(
        first
            .iter()
            .flat_map(|b| &b.records)
            .all(|r| r.kind == ChangeKind::Upsert)
    );
    api.delete("r001", T0 + 10_000);
    let second = drain(&mut s, 10).await;
    let records: Vec<&SourceRecord> = second.iter().flat_map(|b| &b.records).collect();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].local_id.as_str(), records[0].kind),
        ("r001", ChangeKind::Delete)
    );
    assert!(drain(&mut s, 10).await.is_empty());
}

#[tokio::test]
async fn deletes_by_tombstone_endpoint() {
    let api = Api::start(Paging::None, 10).await;
    let now = concord::model::now_ms();
    api.put("a", now - 60_000, json!({}));
    api.put("b", now - 60_000, json!({}));
    let object = format!(
        "{CURSOR}\ndeletes = {{ mode = \"tombstone\", path = \"/deleted\", records = \"/deletedRecords\", id = \"/id\", time = \"/deletedDate\", start_param = \"start\", end_param = \"end\", interval_secs = 3600 }}"
    );
    let mut s = source(&api, "", &object, None);
    api.delete("b", now - 500);
    let batches = drain(&mut s, 10).await;
    let deletes: Vec<&SourceRecord> = batches
        .iter()
        .flat_map(|b| &b.records)
        .filter(|r| r.kind == ChangeKind::Delete)
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].local_id, "b");
    assert_eq!(deletes[0].source_time_ms, Some(now - 500));
    let tomb = api
        .requests(Method::GET)
        .into_iter()
        .find(|r| r.path == "/deleted")
        .unwrap();
    assert!(tomb.query.contains_key("start") && tomb.query.contains_key("end"));
    // The checkpoint remembers the tombstone window; the interval is not due again.
    assert!(batches.last().unwrap().checkpoint["tombstones_ms"].is_i64());
    assert!(drain(&mut s, 10).await.is_empty());
}

#[tokio::test]
async fn deletes_by_full_id_scan() {
    let api = Api::start(Paging::Page, 2).await;
    seed(&api, 3, 1000);
    let known: HashSet<String> = ["r000", "r001", "r002", "gone"].map(String::from).into();
    let object = format!(
        "pagination = {{ style = \"page\", size = 2 }}\n{CURSOR}\ndeletes = {{ mode = \"full_scan\", interval_secs = 3600 }}"
    );
    let mut s = source_known(&api, "", &object, None, known);
    let batches = drain(&mut s, 10).await;
    let deletes: Vec<&str> = batches
        .iter()
        .flat_map(|b| &b.records)
        .filter(|r| r.kind == ChangeKind::Delete)
        .map(|r| r.local_id.as_str())
        .collect();
    assert_eq!(deletes, ["gone"]);
    // The scan keeps the cursor parameter, from the epoch (a filter expression stays whole).
    let scans = api
        .requests(Method::GET)
        .into_iter()
        .filter(|r| r.query.get("since").map(String::as_str) == Some("1970-01-01T00:00:00.000Z"));
    // One from the first poll (which then moves on by keyset), two pages of the scan.
    assert_eq!(scans.count(), 3, "the scan walked every page from the epoch");
}

#[tokio::test]
async fn an_item_without_an_id_is_a_reject_and_the_rest_goes_on() {
    let api = Api::start(Paging::None, 10).await;
    api.put("ok", T0, json!({}));
    // A record whose id is empty.
    api.put("", T0, json!({}));
    let mut s = source(&api, "", "", None);
    let batches = drain(&mut s, 10).await;
    assert_eq!(ids(&batches), ["ok"]);
    let rejects: Vec<_> = batches.iter().flat_map(|b| &b.rejects).collect();
    assert_eq!(rejects.len(), 1);
    assert!(rejects[0].reason.contains("no id"), "{}", rejects[0].reason);
}

/// Each bad answer is an error with a reason and class; the next poll reads everything.
#[tokio::test]
async fn bad_responses_are_classified_errors_and_nothing_is_lost() {
    let html = Fault::Status {
        status: 200,
        body: "<html><body>Service maintenance</body></html>",
        content_type: "text/html",
        retry_after: None,
    };
    let text = Fault::Status {
        status: 200,
        body: "ok then",
        content_type: "text/plain",
        retry_after: None,
    };
    let shape = Fault::Status {
        status: 200,
        body: "{\"items\": 3}",
        content_type: "application/json",
        retry_after: None,
    };
    let server = Fault::Status {
        status: 500,
        body: "{\"error\": \"internal\"}",
        content_type: "application/json",
        retry_after: None,
    };
    let bad_request = Fault::Status {
        status: 400,
        body: "{\"error\": \"bad\"}",
        content_type: "application/json",
        retry_after: None,
    };
    let unauthorized = Fault::Status {
        status: 401,
        body: "{\"error\": \"unauthorized\"}",
        content_type: "application/json",
        retry_after: None,
    };
    let cases: Vec<(Fault, ErrorClass, &str)> = vec![
        (html, ErrorClass::Permanent, "not_json"),
        (text, ErrorClass::Permanent, "not_json"),
        (shape, ErrorClass::Permanent, "bad_shape"),
        (Fault::Truncated, ErrorClass::Transient, "truncated"),
        (Fault::Huge(2 << 20), ErrorClass::Permanent, "body_too_large"),
        (server, ErrorClass::Transient, "http_5xx"),
        (bad_request, ErrorClass::Permanent, "http_4xx"),
        (unauthorized, ErrorClass::Fatal, "unauthorized"),
        (
            Fault::Delay(Duration::from_millis(1500)),
            ErrorClass::Transient,
            "timeout",
        ),
    ];
    for (fault, class, kind) in cases {
        let api = Api::start(Paging::LinkHeader, 5).await;
        let want = seed(&api, 12, 1000);
        let object = format!("pagination = {{ style = \"link_header\" }}\n{CURSOR}");
        let mut s = source(&api, "timeout_ms = 400\nmax_body_bytes = 1048576", &object, None);
        let mut got = ids(&[s.next_batch(100).await.unwrap().unwrap()]);
        api.fault(fault.clone());
        let error = s.next_batch(100).await.expect_err("the fault is an error");
        assert_eq!((error.class, error.kind), (class, kind), "{fault:?}: {}", error.reason);
        assert!(!error.reason.contains("maintenance") && !error.reason.contains("example.com"));
        assert!(!error.reason.contains("127.0.0.1"), "no url in {:?}", error.reason);
        got.extend(ids(&drain(&mut s, 100).await));
        assert_once(&got, want);
    }
}

#[tokio::test]
async fn rate_limited_answers_carry_retry_after_and_pause_the_budget() {
    let api = Api::start(Paging::None, 10).await;
    seed(&api, 2, 1000);
    api.fault(Fault::Status {
        status: 429,
        body: "[{\"errorCode\":\"REQUEST_LIMIT_EXCEEDED\"}]",
        content_type: "application/json",
        retry_after: Some("1"),
    });
    let mut s = source(&api, "rate_limit = { per_second = 100, burst = 10 }", CURSOR, None);
    let error = s.next_batch(10).await.expect_err("429");
    assert_eq!(error.class, ErrorClass::Transient);
    assert_eq!(error.retry_after, Some(Duration::from_secs(1)));
    let limited_at = api.requests(Method::GET)[0].at;
    // The budget itself waits: the very next request is not sent before Retry-After.
    let batches = drain(&mut s, 10).await;
    assert_eq!(ids(&batches).len(), 2);
    let next = api.requests(Method::GET)[1].at;
    assert!(next.duration_since(limited_at) >= Duration::from_millis(990));

    let error = ConnectorError::from(concord::connector::rest::RestError::RateLimited {
        what: "list",
        status: 503,
        retry_after: None,
    });
    assert_eq!(error.class, ErrorClass::Transient);
}

#[tokio::test]
async fn the_token_bucket_never_exceeds_the_configured_rate() {
    let api = Api::start(Paging::None, 10).await;
    let (sys, rest) = system(&api, "rate_limit = { per_second = 20, burst = 5 }", "");
    let client = client(&sys, &rest, Path::new("."));
    let url = client.url("/items").unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = url.clone();
        tasks.spawn(async move {
            for _ in 0..15 {
                client.send("list", Method::GET, url.clone(), None, &[]).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let times: Vec<Instant> = api.requests(Method::GET).iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 60);
    for window in [
        Duration::from_millis(250),
        Duration::from_secs(1),
        Duration::from_secs(2),
    ] {
        let allowed = 5 + (20.0 * window.as_secs_f64()).floor() as usize;
        for (i, start) in times.iter().enumerate() {
            let count = times[i..]
                .iter()
                .take_while(|t| t.duration_since(*start) < window)
                .count();
            assert!(
                count <= allowed,
                "{count} requests within {window:?}, at most {allowed} allowed"
            );
        }
    }
}

#[tokio::test]
async fn auth_variants_send_secrets_from_files_and_never_show_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "k-SECRET-1\n").unwrap();
    std::fs::write(dir.path().join("pass"), "p-SECRET-2\n").unwrap();
    let variants = [
        (
            Auth::Header("x-api-key", "k-SECRET-1".into()),
            "auth = { method = \"api_key\", header = \"X-Api-Key\", key = { file = \"key\" } }",
        ),
        (
            Auth::Query("api_key", "k-SECRET-1".into()),
            "auth = { method = \"api_key\", query = \"api_key\", key = { file = \"key\" } }",
        ),
        (
            Auth::Bearer("k-SECRET-1".into()),
            "auth = { method = \"bearer\", token = { file = \"key\" } }",
        ),
        (
            Auth::Basic("svc".into(), "p-SECRET-2".into()),
            "auth = { method = \"basic\", username = \"svc\", password = { file = \"pass\" } }",
        ),
    ];
    for (auth, setting) in variants {
        let api = Api::start(Paging::None, 10).await;
        seed(&api, 2, 1000);
        api.lock().auth = auth.clone();
        let (sys, rest) = system(&api, setting, CURSOR);
        let c = RestClient::new("api", &sys, &rest, dir.path()).unwrap();
        let mut s = RestSource::open(c, &rest.objects, &link(), None, HashSet::new).unwrap();
        assert_eq!(ids(&drain(&mut s, 10).await).len(), 2, "{auth:?} accepted");

        // A wrong secret is fatal, and the error holds no secret.
        api.lock().auth = match auth {
            Auth::Basic(u, _) => Auth::Basic(u, "other".into()),
            Auth::Header(n, _) => Auth::Header(n, "other".into()),
            Auth::Query(n, _) => Auth::Query(n, "other".into()),
            Auth::Bearer(_) => Auth::Bearer("other".into()),
            Auth::None => Auth::None,
        };
        let c = RestClient::new("api", &sys, &rest, dir.path()).unwrap();
        let mut s = RestSource::open(c, &rest.objects, &link(), None, HashSet::new).unwrap();
        let error = s.next_batch(10).await.expect_err("refused");
        assert_eq!(error.class, ErrorClass::Fatal);
        assert!(!error.reason.contains("SECRET"), "{}", error.reason);
    }

    // A connection error with the key in the query: the url is not in the reason.
    let port = support::free_port();
    let text = format!(
        "type = \"rest\"\nbase_url = \"http://127.0.0.1:{port}\"\nauth = {{ method = \"api_key\", query = \"api_key\", key = {{ file = \"key\" }} }}\n[objects.items]\nlist = {{ path = \"/items\" }}\n"
    );
    let sys: SystemConfig = toml::from_str(&text).unwrap();
    let concord::config::ConnectorConfig::Rest(rest) = sys.connector.clone() else {
        unreachable!()
    };
    let c = RestClient::new("api", &sys, &rest, dir.path()).unwrap();
    let mut s = RestSource::open(c, &rest.objects, &link(), None, HashSet::new).unwrap();
    let error = s.next_batch(10).await.expect_err("nothing listens");
    assert_eq!((error.class, error.kind), (ErrorClass::Transient, "connect"));
    assert!(
        !error.reason.contains("SECRET") && !error.reason.contains("api_key"),
        "{}",
        error.reason
    );

    // A missing secret file fails when the client is built, naming the file only.
    std::fs::remove_file(dir.path().join("key")).unwrap();
    let error = RestClient::new("api", &sys, &rest, dir.path())
        .err()
        .expect("no secret");
    assert_eq!(ConnectorError::from(error).class, ErrorClass::Fatal);
}

const WRITE: &str = "write = { create_path = \"/items\", item_path = \"/items/{id}\", created_id = \"/id\", upsert = { path = \"/items/by-email/{key}\", field = \"email\" } }\nconcurrency = { mode = \"etag\", fetch_when_unknown = true }";

fn sink(api: &Api, object: &str) -> RestSink {
    let (sys, rest) = system(api, "max_concurrency = 3", object);
    RestSink::open(
        client(&sys, &rest, Path::new(".")),
        &rest.objects,
        [&link()],
        rest.max_concurrency,
    )
    .unwrap()
}

fn write(op: WriteOp, id: Option<&str>, fields: Value, version: Option<&str>) -> Write {
    Write {
        seq: 7,
        entity: "contact".into(),
        global_id: GlobalId::new_v7(),
        op,
        local_id: id.map(String::from),
        object: "items".into(),
        fields: fields.as_object().cloned().unwrap_or_default(),
        expected_version: version.map(String::from),
    }
}

#[tokio::test]
async fn creates_updates_upserts_and_deletes() {
    let api = Api::start(Paging::None, 10).await;
    let plain = "write = { create_path = \"/items\", item_path = \"/items/{id}\", created_id = \"location\" }";
    let mut s = sink(&api, plain);
    // Create, id from Location.
    let acks = s
        .apply(vec![write(WriteOp::Create, None, json!({"name": "Ada"}), None)])
        .await;
    let created = acks[0].as_ref().unwrap().local_id.clone();
    assert_eq!(api.get(&created).unwrap().fields["name"], json!("Ada"));

    let mut s = sink(&api, WRITE);
    // Create by upsert (email is the key): a repeat is an update of the same record.
    let w = write(
        WriteOp::Create,
        None,
        json!({"email": "b@example.com", "name": "Bo"}),
        None,
    );
    let first = s.apply(vec![w.clone()]).await.remove(0).unwrap();
    let again = s.apply(vec![w]).await.remove(0).unwrap();
    assert_eq!(first.local_id, again.local_id);
    assert_eq!(api.lock().items.len(), 2);
    let patch = api.requests(Method::PATCH).pop().unwrap();
    assert_eq!(patch.path, "/items/by-email/b%40example.com");
    assert!(
        patch.body.unwrap().get("email").is_none(),
        "the key is in the path, not the body"
    );

    // Update with the ETag fetched first (none known), then with the one returned.
    let ack = s
        .apply(vec![write(
            WriteOp::Update,
            Some(&created),
            json!({"name": "Ada L"}),
            None,
        )])
        .await
        .remove(0)
        .unwrap();
    assert_eq!(ack.version.as_deref(), Some("W/\"2\""));
    let sent = api.requests(Method::PATCH).pop().unwrap();
    assert_eq!(sent.headers["if-match"], "W/\"1\"");
    let ack = s
        .apply(vec![write(
            WriteOp::Update,
            Some(&created),
            json!({"name": "Ada K"}),
            ack.version.as_deref(),
        )])
        .await
        .remove(0)
        .unwrap();
    assert_eq!(ack.version.as_deref(), Some("W/\"3\""));
    assert_eq!(api.get(&created).unwrap().fields["name"], json!("Ada K"));

    // Delete, and a delete of what is already gone.
    let del = write(WriteOp::Delete, Some(&created), json!({}), None);
    assert!(s.apply(vec![del.clone()]).await[0].is_ok());
    assert!(api.get(&created).is_none());
    assert!(s.apply(vec![del]).await[0].is_ok(), "404 on delete is success");

    // Many writes at once: one result each, in order.
    let many: Vec<Write> = (0..9)
        .map(|i| {
            write(
                WriteOp::Create,
                None,
                json!({"email": format!("m{i}@example.com")}),
                None,
            )
        })
        .collect();
    let acks = s.apply(many).await;
    assert_eq!(acks.len(), 9);
    for (i, ack) in acks.iter().enumerate() {
        let id = &ack.as_ref().unwrap().local_id;
        assert_eq!(api.get(id).unwrap().fields["email"], json!(format!("m{i}@example.com")));
    }
}

#[tokio::test]
async fn a_412_reads_the_record_again_instead_of_overwriting() {
    let api = Api::start(Paging::None, 10).await;
    api.put("c1", T0, json!({"email": "c@example.com", "title": "Engineer"}));
    let mut s = sink(&api, WRITE);
    // Someone else edits the record: its ETag moves on from W/"1".
    api.put("c1", T0 + 1000, json!({"title": "Director"}));
    let result = s
        .apply(vec![write(
            WriteOp::Update,
            Some("c1"),
            json!({"title": "Manager"}),
            Some("W/\"1\""),
        )])
        .await
        .remove(0);
    let error = result.expect_err("refused");
    assert_eq!((error.class, error.kind), (ErrorClass::Transient, "conflict"));
    assert_eq!(
        api.get("c1").unwrap().fields["title"],
        json!("Director"),
        "not overwritten"
    );
    let rereads = s.take_rereads();
    assert_eq!(rereads.len(), 1);
    assert_eq!(rereads[0].seq, 7);
    assert_eq!(rereads[0].record.fields["title"], json!("Director"));
    assert_eq!(rereads[0].record.version.as_deref(), Some("W/\"2\""));
    assert!(s.take_rereads().is_empty());
}

#[tokio::test]
async fn bad_write_answers_are_errors() {
    let api = Api::start(Paging::None, 10).await;
    let mut s = sink(
        &api,
        "write = { create_path = \"/items\", item_path = \"/items/{id}\", created_id = \"/nope\" }",
    );
    api.fault(Fault::Status {
        status: 201,
        body: "{\"ok\": true}",
        content_type: "application/json",
        retry_after: None,
    });
    let error = s
        .apply(vec![write(WriteOp::Create, None, json!({}), None)])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!((error.class, error.kind), (ErrorClass::Permanent, "bad_shape"));
    api.fault(Fault::Status {
        status: 422,
        body: "{\"error\": \"invalid\", \"field\": \"email\"}",
        content_type: "application/json",
        retry_after: None,
    });
    let error = s
        .apply(vec![write(WriteOp::Create, None, json!({}), None)])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::Permanent);
    api.fault(Fault::Status {
        status: 503,
        body: "busy",
        content_type: "text/plain",
        retry_after: Some("2"),
    });
    let error = s
        .apply(vec![write(WriteOp::Update, Some("x"), json!({}), None)])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(
        (error.class, error.retry_after),
        (ErrorClass::Transient, Some(Duration::from_secs(2)))
    );
}

// The engine with a file system (`hr`) on one side and the REST API on the other.

fn engine_config(api: &Api, api_capture: bool) -> String {
    let capture = if api_capture {
        "capture = { interval_secs = 1 }"
    } else {
        ""
    };
    format!(
        r#"
[state]
dir = "state"

[engine]
backoff_min_ms = 5
backoff_max_ms = 50

[systems.hr]
type = "file"
direction = "read"
inbox = "inbox"
settle_ms = 0

[systems.api]
type = "rest"
base_url = "{base}"

[systems.api.objects.items]
list = {{ path = "/items" }}
{CURSOR}
{WRITE}

[entities.contact]
schema = "contact.schema.json"
match_keys = ["email"]

[entities.contact.fields.title]
owners = ["hr"]

[entities.contact.fields.phone]
owners = ["api"]

[[links]]
system = "hr"
entity = "contact"
object = "employees-*.csv"
id_field = "employee_id"
capture = {{ interval_secs = 1 }}
map = [
  {{ canonical = "email", system = "email" }},
  {{ canonical = "title", system = "job_title" }},
]

[[links]]
system = "api"
entity = "contact"
object = "items"
id_field = "id"
{capture}
map = [
  {{ canonical = "email", system = "email" }},
  {{ canonical = "title", system = "title" }},
  {{ canonical = "phone", system = "phone" }},
]
"#,
        base = api.base
    )
}

struct Daemon {
    dir: tempfile::TempDir,
    rt: Arc<concord::engine::runtime::Runtime>,
    store: concord::state::StateStore,
}

impl Daemon {
    fn new(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(
            root.join("schemas/contact.schema.json"),
            dir.path().join("contact.schema.json"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("inbox")).unwrap();
        let mut config = concord::config::parse(config).unwrap();
        config.base_dir = dir.path().to_path_buf();
        let problems = concord::config::validate(&config);
        assert!(problems.is_empty(), "{problems:?}");
        let store =
            concord::state::StateStore::open(&config.base_dir.join(&config.state.dir), config.state.cache_mb).unwrap();
        let rt = Arc::new(concord::engine::runtime::Runtime::compile(config).unwrap());
        Daemon { dir, rt, store }
    }

    fn export(&self, name: &str, rows: &str) {
        let tmp = self.dir.path().join("inbox").join(format!(".{name}"));
        std::fs::write(&tmp, format!("employee_id,email,job_title\n{rows}")).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("inbox").join(name)).unwrap();
    }

    async fn run(&self) {
        let connectors = concord::connector::open_all(&self.rt, &self.store).unwrap();
        let engine = concord::engine::Engine::new(self.rt.clone(), self.store.clone());
        tokio::time::timeout(
            Duration::from_secs(60),
            engine.run(connectors, concord::engine::RunMode::UntilIdle),
        )
        .await
        .expect("the engine goes idle");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_a_412_is_re_read_and_re_merged_under_authority() {
    let api = Api::start(Paging::None, 10).await;
    let d = Daemon::new(&engine_config(&api, false));
    d.export("employees-1.csv", "e1,ada@example.com,Engineer\n");
    d.run().await;
    let id = api.lock().items[0].id.clone();
    assert_eq!(api.get(&id).unwrap().fields["title"], json!("Engineer"));

    // The API edits the record (its phone, which it owns, and the title, which it does
    // not) while HR changes the title; concord's update carries the stale ETag.
    api.put(&id, T0 + 5000, json!({"phone": "+4915112345678", "title": "Boss"}));
    d.export("employees-2.csv", "e1,ada@example.com,Manager\n");
    d.run().await;

    let item = api.get(&id).unwrap();
    assert_eq!(item.fields["title"], json!("Manager"), "hr owns the title");
    assert_eq!(
        item.fields["phone"],
        json!("+4915112345678"),
        "the api's own edit is kept"
    );
    let view = d.store.read().unwrap();
    let log = view.write_log(Some("api"), 100).unwrap();
    assert!(log.iter().any(|e| e.outcome == "conflict"), "{log:?}");
    let gid = view.identity("contact", "api", &id).unwrap().unwrap();
    let state = view.record("contact", gid).unwrap().unwrap();
    assert_eq!(
        state.base.value("phone"),
        Some(&json!("+4915112345678")),
        "merged from the re-read"
    );
    assert_eq!(state.base.value("title"), Some(&json!("Manager")));
    // Every PATCH carried If-Match.
    let updates: Vec<_> = api
        .requests(Method::PATCH)
        .into_iter()
        .filter(|r| !r.path.contains("by-email"))
        .collect();
    assert!(!updates.is_empty() && updates.iter().all(|r| r.headers.contains_key("if-match")));
    assert!(view.dead_letters(None, 10).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_an_echo_of_our_own_write_writes_nothing_more() {
    let api = Api::start(Paging::None, 10).await;
    api.lock().now_ms = concord::model::now_ms();
    let d = Daemon::new(&engine_config(&api, true));
    d.export(
        "employees-1.csv",
        "e1,ada@example.com,Engineer\ne2,bo@example.com,Chef\n",
    );
    d.run().await;
    d.run().await;
    let writes = |m: Method| {
        let post = m == Method::POST;
        api.requests(m)
            .iter()
            .filter(|r| post || r.path.starts_with("/items/"))
            .count()
    };
    let (posts, patches) = (writes(Method::POST), writes(Method::PATCH));
    assert_eq!(api.lock().items.len(), 2);
    assert_eq!(posts + patches, 2, "two creates (posts {posts}, patches {patches})");
    // The echo was captured (identity known), and a later run writes nothing.
    d.run().await;
    assert_eq!(writes(Method::POST) + writes(Method::PATCH), 2);
    let view = d.store.read().unwrap();
    let checkpoint = view
        .checkpoint("api", "api.contact")
        .unwrap()
        .expect("the api link checkpointed");
    assert!(checkpoint["cursor_ms"].is_i64());
}

/// The metrics the REST connector must emit, read from a running daemon's `/metrics`:
/// requests by system, method and status class, their duration, and the rate-limit
/// headroom from the API's headers; never a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_exports_the_rest_metrics() {
    let api = Api::start(Paging::None, 10).await;
    seed(&api, 3, 1000);
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let port = support::free_port();
    let config = format!(
        r#"
[state]
dir = "state"

[admin]
listen = "127.0.0.1:{port}"

[systems.api]
type = "rest"
direction = "read"
base_url = "{base}"

[systems.api.objects.items]
list = {{ path = "/items" }}
{CURSOR}

[systems.out]
type = "file"
direction = "write"
export_dir = "out"

[entities.contact]
schema = "{root}/schemas/contact.schema.json"
match_keys = ["email"]

[[links]]
system = "api"
entity = "contact"
object = "items"
id_field = "id"
capture = {{ interval_secs = 1 }}
map = [{{ canonical = "email", system = "email" }}]

[[links]]
system = "out"
entity = "contact"
object = "contacts.jsonl"
id_field = "id"
map = [{{ canonical = "email", system = "email" }}]
"#,
        base = api.base,
        root = root.display(),
    );
    let path = dir.path().join("concord.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = support::start(&path, false);
    let api_addr = api.base.trim_start_matches("http://").to_string();
    let metrics = tokio::task::spawn_blocking(move || {
        support::wait_for("rest metrics", 30, || {
            let body = support::request(port, "GET", "/metrics")?.body;
            let ready = body.lines().any(|l| {
                l.starts_with("concord_http_requests_total{")
                    && l.contains("system=\"api\"")
                    && l.contains("method=\"GET\"")
                    && l.contains("class=\"2xx\"")
            });
            ready.then_some(body)
        })
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        metrics
            .lines()
            .any(|l| l == "concord_rate_limit_headroom_ratio{system=\"api\"} 0.75"),
        "headroom from X-RateLimit-Remaining / X-RateLimit-Limit"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("concord_http_request_duration_seconds_bucket{") && l.contains("system=\"api\""))
    );
    assert!(
        !metrics.contains(&api_addr) && !metrics.contains("/items"),
        "no url in the metrics"
    );
}

#[tokio::test]
async fn a_version_field_guards_updates_too() {
    let api = Api::start(Paging::None, 10).await;
    api.lock().version_field = true;
    api.put("v1", T0, json!({"title": "Engineer"}));
    let object = "write = { item_path = \"/items/{id}\", create_path = \"/items\" }\nconcurrency = { mode = \"version_field\", field = \"version\" }";
    // The source reads the version from the record.
    let mut src = source(&api, "", &format!("{object}\n{CURSOR}"), None);
    let read = drain(&mut src, 10).await;
    assert_eq!(read[0].records[0].version.as_deref(), Some("1"));

    api.put("v1", T0 + 1000, json!({"title": "Director"}));
    let mut s = sink(&api, object);
    let error = s
        .apply(vec![write(
            WriteOp::Update,
            Some("v1"),
            json!({"title": "Manager"}),
            Some("1"),
        )])
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(error.kind, "conflict");
    assert_eq!(api.get("v1").unwrap().fields["title"], json!("Director"));
    let reread = s.take_rereads().remove(0);
    assert_eq!(reread.record.version.as_deref(), Some("2"));
    let ack = s
        .apply(vec![write(
            WriteOp::Update,
            Some("v1"),
            json!({"title": "Manager"}),
            Some("2"),
        )])
        .await
        .remove(0)
        .unwrap();
    assert_eq!(ack.version.as_deref(), Some("3"));
    assert_eq!(api.requests(Method::PATCH).last().unwrap().headers["if-match"], "2");
}
