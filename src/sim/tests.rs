//! The simulators against their own conventions, over real HTTP.

use std::time::Duration;

use chrono::TimeZone;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::crm::{self, Comparison, CrmOptions, CrmSim, Field, NewContact, parse_soql};
use super::lms::{LmsOptions, LmsSim, NewLearner};
use super::{Fault, FaultScope};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------------------------
// SOQL subset

#[test]
fn soql_subset_parses_the_supported_forms() {
    let t = chrono::Utc
        .with_ymd_and_hms(2026, 11, 27, 18, 9, 45)
        .single()
        .expect("time");
    // (query, filter, ORDER BY keys, LIMIT)
    type Case = (
        &'static str,
        Option<(Comparison, chrono::DateTime<chrono::Utc>)>,
        usize,
        Option<usize>,
    );
    let cases: &[Case] = &[
        ("SELECT Id FROM Contact", None, 0, None),
        (
            "SELECT Id, Email FROM Contact WHERE LastModifiedDate >= 2026-11-27T18:09:45Z ORDER BY LastModifiedDate, Id",
            Some((Comparison::Ge, t)),
            2,
            None,
        ),
        (
            "select id,email from contact where lastmodifieddate > 2026-11-27T18:09:45.000+0000 order by LastModifiedDate ASC, Id ASC limit 10",
            Some((Comparison::Gt, t)),
            2,
            Some(10),
        ),
        (
            "SELECT Id FROM Contact WHERE LastModifiedDate>=2026-11-27T18:09:45Z ORDER BY LastModifiedDate LIMIT 5",
            Some((Comparison::Ge, t)),
            1,
            Some(5),
        ),
    ];
    for (q, filter, order, limit) in cases {
        let soql = parse_soql(q).unwrap_or_else(|e| panic!("{q}: {e:?}"));
        assert_eq!(soql.filter, *filter, "{q}");
        assert_eq!(soql.order.len(), *order, "{q}");
        assert_eq!(soql.limit, *limit, "{q}");
    }
    let soql = parse_soql("SELECT Id, FirstName, LastModifiedDate FROM Contact").expect("parses");
    assert_eq!(soql.fields, vec![Field::Id, Field::FirstName, Field::LastModifiedDate]);
}

#[test]
fn soql_subset_refuses_everything_else_with_the_salesforce_code() {
    let cases = [
        ("", "MALFORMED_QUERY"),
        ("SELECT", "MALFORMED_QUERY"),
        ("SELECT FROM Contact", "MALFORMED_QUERY"),
        ("SELECT Id Contact", "MALFORMED_QUERY"),
        ("SELECT Id FROM", "MALFORMED_QUERY"),
        ("SELECT Id FROM Account", "INVALID_TYPE"),
        ("SELECT Nope FROM Contact", "INVALID_FIELD"),
        ("SELECT Id FROM Contact WHERE Email = 'a@b.c'", "MALFORMED_QUERY"),
        (
            "SELECT Id FROM Contact WHERE LastModifiedDate >= yesterday",
            "INVALID_QUERY_FILTER_OPERATOR",
        ),
        ("SELECT Id FROM Contact WHERE LastModifiedDate", "MALFORMED_QUERY"),
        (
            "SELECT Id FROM Contact WHERE LastModifiedDate != 2026-11-27T18:09:45Z",
            "MALFORMED_QUERY",
        ),
        ("SELECT Id FROM Contact ORDER LastModifiedDate", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact ORDER BY Email", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact LIMIT -1", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact LIMIT", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact LIMIT 5 OFFSET 5", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact; DROP", "MALFORMED_QUERY"),
        ("SELECT Id,, FROM Contact", "MALFORMED_QUERY"),
        (
            "SELECT Id FROM Contact WHERE LastModifiedDate >= 2026-11-27T18:09:45Z AND Id > 1",
            "MALFORMED_QUERY",
        ),
    ];
    for (q, code) in cases {
        let error = parse_soql(q).expect_err(q);
        assert_eq!(error.code, code, "{q}: {}", error.message);
    }
}

proptest::proptest! {
    #[test]
    fn soql_parser_never_panics(q in "\\PC{0,80}") {
        let _ = parse_soql(&q);
    }

    #[test]
    fn soql_parser_never_panics_on_near_misses(
        words in proptest::collection::vec(
            proptest::sample::select(vec!["SELECT", "Id", ",", "FROM", "Contact", "WHERE",
                "LastModifiedDate", ">=", ">", "2026-11-27T18:09:45Z", "ORDER", "BY", "LIMIT",
                "7", "DESC", "Email"]),
            0..14,
        )
    ) {
        let _ = parse_soql(&words.join(" "));
    }
}

// ---------------------------------------------------------------------------------
// CRM over HTTP

async fn crm() -> CrmSim {
    CrmSim::start(CrmOptions::default()).await.expect("crm starts")
}

fn crm_get(sim: &CrmSim, path: &str) -> reqwest::RequestBuilder {
    client()
        .get(format!("{}{}{path}", sim.base_url(), crm::API_PATH))
        .bearer_auth(sim.token())
}

fn person(n: usize) -> NewContact {
    NewContact {
        first_name: Some(format!("First{n}")),
        last_name: Some(format!("Last{n}")),
        email: Some(format!("p{n}@example.com")),
        ..NewContact::default()
    }
}

/// Walks every page of a query; returns the Ids in order and the number of pages.
async fn walk(sim: &CrmSim, soql: &str, batch: usize) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut response = crm_get(sim, "/query")
        .query(&[("q", soql)])
        .header("Sforce-Query-Options", format!("batchSize={batch}"))
        .send()
        .await
        .expect("query");
    loop {
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        pages += 1;
        for record in body["records"].as_array().expect("records") {
            assert_eq!(record["attributes"]["type"], "Contact");
            ids.push(record["Id"].as_str().expect("Id").to_string());
        }
        match body["nextRecordsUrl"].as_str() {
            Some(next) => {
                assert_eq!(body["done"], false);
                response = client()
                    .get(format!("{}{next}", sim.base_url()))
                    .bearer_auth(sim.token())
                    .send()
                    .await
                    .expect("next page");
            }
            None => {
                assert_eq!(body["done"], true);
                return (ids, pages);
            }
        }
    }
}

#[tokio::test]
async fn crm_refuses_a_missing_or_wrong_token() {
    let sim = crm().await;
    let url = format!("{}{}/query?q=SELECT+Id+FROM+Contact", sim.base_url(), crm::API_PATH);
    for request in [client().get(&url), client().get(&url).bearer_auth("wrong")] {
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body[0]["errorCode"], "INVALID_SESSION_ID");
    }
    assert_eq!(sim.stats().unauthorized, 2);
}

#[tokio::test]
async fn crm_query_pages_by_batch_size_in_cursor_order() {
    let sim = crm().await;
    let t = chrono::Utc
        .with_ymd_and_hms(2026, 11, 27, 18, 9, 45)
        .single()
        .expect("time");
    sim.freeze_clock(Some(t));
    for n in 0..450 {
        sim.create(person(n));
    }
    sim.freeze_clock(None);
    let soql = "SELECT Id, LastModifiedDate FROM Contact WHERE LastModifiedDate >= 2026-11-27T18:09:45Z ORDER BY LastModifiedDate, Id";
    let (ids, pages) = walk(&sim, soql, 200).await;
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 450);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "ties on LastModifiedDate are ordered by Id");
    // A batch size below Salesforce's minimum is raised to it.
    let (_, pages) = walk(&sim, soql, 10).await;
    assert_eq!(pages, 3);
    let body: Value = crm_get(&sim, "/query")
        .query(&[(
            "q",
            "SELECT Id FROM Contact WHERE LastModifiedDate > 2026-11-27T18:09:45.000+0000",
        )])
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    assert_eq!(body["totalSize"], 0);
    assert_eq!(body["done"], true);
}

#[tokio::test]
async fn crm_page_boundary_moves_when_a_record_changes_during_a_walk() {
    let sim = crm().await;
    let t = chrono::Utc
        .with_ymd_and_hms(2026, 11, 27, 18, 0, 0)
        .single()
        .expect("time");
    sim.freeze_clock(Some(t));
    let created: Vec<String> = (0..400).map(|n| sim.create(person(n))).collect();
    sim.freeze_clock(Some(t + chrono::Duration::seconds(5)));
    let soql = "SELECT Id FROM Contact ORDER BY LastModifiedDate, Id";
    let first = created[0].clone();
    assert!(sim.edit_between_pages(&first, "Title", Some("moved")));
    let (ids, _) = walk(&sim, soql, 200).await;
    // The edited record moved behind the boundary and is seen twice; the record that
    // slid onto page one is never seen: the trap a cursor with look-back must survive.
    assert_eq!(ids.len(), 400);
    assert_eq!(ids.iter().filter(|id| **id == first).count(), 2);
    assert!(!ids.contains(&created[200]));
}

#[tokio::test]
async fn crm_read_update_and_if_match() {
    let sim = crm().await;
    let id = sim.create(person(1));
    let response = crm_get(&sim, &format!("/sobjects/Contact/{id}"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()["etag"].to_str().expect("etag").to_string();
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["Email"], "p1@example.com");
    assert!(body["LastModifiedDate"].as_str().expect("date").ends_with(".000+0000"));
    let patch = |tag: Option<&str>, body: Value| {
        let mut request = client()
            .patch(format!("{}{}/sobjects/Contact/{id}", sim.base_url(), crm::API_PATH))
            .bearer_auth(sim.token())
            .json(&body);
        if let Some(tag) = tag {
            request = request.header("If-Match", tag);
        }
        request.send()
    };
    let response = patch(Some(&etag), json!({"Title": "CTO"})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(sim.contact(&id).expect("contact").title.as_deref(), Some("CTO"));
    let response = patch(Some(&etag), json!({"Title": "CEO"})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body[0]["errorCode"], "PRECONDITION_FAILED");
    assert_eq!(sim.contact(&id).expect("contact").title.as_deref(), Some("CTO"));
    let response = patch(None, json!({"Nope": 1})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body[0]["errorCode"], "INVALID_FIELD");
    assert_eq!(body[0]["message"], "No such column 'Nope' on sobject of type Contact");
    let response = patch(None, json!({"LastName": null})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A user edits the record between a read and a write: the write meets a 412.
    let current = sim.contact(&id).expect("contact").etag();
    assert!(sim.interfere_on_next_write(&id, "Phone", Some("555-0100")));
    let response = patch(Some(&current), json!({"Title": "CEO"})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let contact = sim.contact(&id).expect("contact");
    assert_eq!(
        (contact.title.as_deref(), contact.phone.as_deref()),
        (Some("CTO"), Some("555-0100"))
    );
    assert_eq!(sim.stats().precondition_failed, 2);
    assert_eq!(sim.stats().writes_applied, 1);
}

#[tokio::test]
async fn crm_create_upsert_and_delete() {
    let sim = crm().await;
    let url = |path: &str| format!("{}{}{path}", sim.base_url(), crm::API_PATH);
    let response = client()
        .post(url("/sobjects/Contact"))
        .bearer_auth(sim.token())
        .json(&json!({"FirstName": "Grace", "LastName": "Hopper", "Email": "grace@example.com", "Certified__c": true}))
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    let id = body["id"].as_str().expect("id").to_string();
    assert_eq!((id.len(), &id[..3]), (18, "003"));
    assert_eq!(body["success"], true);
    assert!(
        sim.contact(&id).expect("created").certified,
        "the custom checkbox is set"
    );
    let response = client()
        .post(url("/sobjects/Contact"))
        .bearer_auth(sim.token())
        .json(&json!({"LastName": "Checkbox", "Certified__c": "yes"}))
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = client()
        .post(url("/sobjects/Contact"))
        .bearer_auth(sim.token())
        .json(&json!({"FirstName": "No Last Name"}))
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body[0]["errorCode"], "REQUIRED_FIELD_MISSING");

    let upsert = |email: &str, body: Value| {
        client()
            .patch(url(&format!("/sobjects/Contact/Email/{email}")))
            .bearer_auth(sim.token())
            .json(&body)
            .send()
    };
    let response = upsert("GRACE@example.com", json!({"Title": "Rear Admiral"}))
        .await
        .expect("upsert");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!((body["created"].clone(), body["id"].clone()), (json!(false), json!(id)));
    let response = upsert("alan@example.com", json!({"LastName": "Turing"}))
        .await
        .expect("upsert");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["created"], true);
    assert_eq!(sim.live().len(), 2);

    let delete = || {
        client()
            .delete(url(&format!("/sobjects/Contact/{id}")))
            .bearer_auth(sim.token())
            .send()
    };
    assert_eq!(delete().await.expect("delete").status(), StatusCode::NO_CONTENT);
    let response = delete().await.expect("delete");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body[0]["errorCode"], "ENTITY_IS_DELETED");

    let start = crm::render_time(chrono::Utc::now() - chrono::Duration::hours(1));
    let end = crm::render_time(chrono::Utc::now() + chrono::Duration::hours(1));
    let body: Value = crm_get(&sim, "/sobjects/Contact/deleted/")
        .query(&[("start", start.as_str()), ("end", end.as_str())])
        .send()
        .await
        .expect("deleted")
        .json()
        .await
        .expect("json");
    assert_eq!(body["deletedRecords"][0]["id"], json!(id));
    assert_eq!(body["deletedRecords"].as_array().map(Vec::len), Some(1));
    // queryAll shows the deleted record, query does not.
    let count = |path: &'static str| {
        let request = crm_get(&sim, path).query(&[("q", "SELECT Id, IsDeleted FROM Contact")]);
        async move {
            let body: Value = request.send().await.expect("query").json().await.expect("json");
            body["totalSize"].as_u64().expect("totalSize")
        }
    };
    assert_eq!((count("/query").await, count("/queryAll").await), (1, 2));
    let response = crm_get(&sim, "/query")
        .query(&[("q", "SELECT Id FROM Contact WHERE")])
        .send()
        .await
        .expect("q");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body[0]["errorCode"], "MALFORMED_QUERY");
}

#[tokio::test]
async fn crm_rate_limit_answers_429_with_retry_after_and_usage_headers() {
    let sim = CrmSim::start(CrmOptions {
        rate_limit: Some(3),
        ..CrmOptions::default()
    })
    .await
    .expect("crm starts");
    // One second of the system's clock: three requests are admitted, the rest refused.
    sim.freeze_clock(Some(chrono::Utc::now()));
    for n in 0..10 {
        let response = crm_get(&sim, "/query")
            .query(&[("q", "SELECT Id FROM Contact")])
            .send()
            .await
            .expect("query");
        assert!(response.headers().contains_key("sforce-limit-info"));
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            (3usize.saturating_sub(n + 1)).to_string().as_str()
        );
        if n < 3 {
            assert_eq!(response.status(), StatusCode::OK);
        } else {
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()["retry-after"], "1");
            let body: Value = response.json().await.expect("json");
            assert_eq!(body[0]["errorCode"], "REQUEST_LIMIT_EXCEEDED");
        }
    }
    let stats = sim.stats();
    assert_eq!(stats.requests, 10);
    assert_eq!(stats.rate_limited, 7, "{stats:?}");
    assert_eq!(stats.throttled, stats.rate_limited);
    sim.freeze_clock(Some(chrono::Utc::now() + chrono::Duration::seconds(5)));
    let response = crm_get(&sim, "/query")
        .query(&[("q", "SELECT Id FROM Contact")])
        .send()
        .await
        .expect("q");
    assert_eq!(response.status(), StatusCode::OK, "a new second, a new window");
    sim.set_rate_limit(None);
    let response = crm_get(&sim, "/query")
        .query(&[("q", "SELECT Id FROM Contact")])
        .send()
        .await
        .expect("q");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn injected_faults_answer_the_next_requests_in_scope() {
    let sim = crm().await;
    let id = sim.create(person(1));
    sim.fail_next(2, Fault::ServerError, FaultScope::Writes);
    sim.fail_next(1, Fault::TooManyRequests { retry_after_secs: 7 }, FaultScope::Reads);
    let read = || crm_get(&sim, &format!("/sobjects/Contact/{id}")).send();
    let write = || {
        client()
            .patch(format!("{}{}/sobjects/Contact/{id}", sim.base_url(), crm::API_PATH))
            .bearer_auth(sim.token())
            .json(&json!({"Title": "x"}))
            .send()
    };
    let response = read().await.expect("read");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(read().await.expect("read").status(), StatusCode::OK);
    assert_eq!(
        write().await.expect("write").status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        write().await.expect("write").status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(sim.contact(&id).expect("contact").title, None);
    assert_eq!(write().await.expect("write").status(), StatusCode::NO_CONTENT);
    let stats = sim.stats();
    assert_eq!((stats.server_errors, stats.throttled, stats.rate_limited), (2, 1, 0));

    // A stall past the client's timeout: the request times out and, stalled before
    // it was served, changes nothing.
    sim.fail_next(1, Fault::StallBefore(Duration::from_secs(5)), FaultScope::Writes);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let error = impatient
        .patch(format!("{}{}/sobjects/Contact/{id}", sim.base_url(), crm::API_PATH))
        .bearer_auth(sim.token())
        .json(&json!({"Title": "stalled"}))
        .send()
        .await
        .expect_err("times out");
    assert!(error.is_timeout());
    assert_eq!(sim.contact(&id).expect("contact").title.as_deref(), Some("x"));
    // Stalled after being served: the client times out, yet the write took effect.
    sim.fail_next(1, Fault::StallAfter(Duration::from_secs(5)), FaultScope::Writes);
    let error = impatient
        .patch(format!("{}{}/sobjects/Contact/{id}", sim.base_url(), crm::API_PATH))
        .bearer_auth(sim.token())
        .json(&json!({"Title": "applied"}))
        .send()
        .await
        .expect_err("times out");
    assert!(error.is_timeout());
    assert_eq!(sim.contact(&id).expect("contact").title.as_deref(), Some("applied"));
}

// ---------------------------------------------------------------------------------
// LMS over HTTP

async fn lms() -> LmsSim {
    LmsSim::start(LmsOptions::default()).await.expect("lms starts")
}

fn learner(n: usize) -> NewLearner {
    NewLearner {
        full_name: format!("Learner {n}"),
        email: format!("l{n}@example.com"),
        ..NewLearner::default()
    }
}

/// The `rel="next"` target of a Link header.
fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .contains("rel=\"next\"")
            .then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

#[tokio::test]
async fn lms_list_walks_link_pages_in_updated_order() {
    let sim = lms().await;
    let t = chrono::Utc
        .with_ymd_and_hms(2026, 11, 27, 18, 0, 0)
        .single()
        .expect("time");
    sim.freeze_clock(Some(t));
    for n in 0..230 {
        sim.create(learner(n));
    }
    sim.freeze_clock(Some(t + chrono::Duration::seconds(1)));
    let deleted = sim.live()[5].id;
    assert!(sim.delete(deleted));
    let since = "2000-01-01T00:00:00.000Z";
    let mut url = format!("{}/api/v1/learners?updated_since={since}&per_page=100", sim.base_url());
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let response = client()
            .get(&url)
            .header("X-Api-Key", sim.api_key())
            .send()
            .await
            .expect("list");
        assert_eq!(response.status(), StatusCode::OK);
        let next = next_link(response.headers());
        let body: Vec<Value> = response.json().await.expect("json array");
        pages += 1;
        seen.extend(body.iter().map(|l| {
            (
                l["updated_at"].as_str().expect("updated_at").to_string(),
                l["id"].as_u64().expect("id"),
            )
        }));
        match next {
            Some(next) => url = next,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 229, "the deleted learner is left out");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "ordered by (updated_at, id)");
    assert!(!seen.iter().any(|(_, id)| *id == deleted));
    let body: Vec<Value> = client()
        .get(format!(
            "{}/api/v1/learners?include_deleted=true&per_page=100&page=3",
            sim.base_url()
        ))
        .header("X-Api-Key", sim.api_key())
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let last = body.last().expect("a learner");
    assert_eq!(last["id"], json!(deleted), "the deletion bumped updated_at");
    assert!(last["deleted_at"].is_string());
    let response = client()
        .get(format!("{}/api/v1/learners?per_page=1000", sim.base_url()))
        .header("X-Api-Key", sim.api_key())
        .send()
        .await
        .expect("list");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = client()
        .get(format!("{}/api/v1/learners", sim.base_url()))
        .send()
        .await
        .expect("list");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.json::<Value>().await.expect("json"),
        json!({"error": "unauthorized"})
    );
}

#[tokio::test]
async fn lms_writes_with_etags_and_validation() {
    let sim = lms().await;
    let url = |path: &str| format!("{}/api/v1{path}", sim.base_url());
    let response = client()
        .post(url("/learners"))
        .header("X-Api-Key", sim.api_key())
        .json(&json!({"full_name": "Ada Lovelace", "email": "ada@example.com", "certified": false}))
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), StatusCode::CREATED);
    let etag = response.headers()["etag"].to_str().expect("etag").to_string();
    assert!(etag.starts_with("W/\""));
    let location = response.headers()["location"].to_str().expect("location").to_string();
    let body: Value = response.json().await.expect("json");
    let id = body["id"].as_u64().expect("integer id");
    assert_eq!(location, format!("/api/v1/learners/{id}"));
    assert!(body["updated_at"].as_str().expect("updated_at").ends_with('Z'));
    for (body, field) in [
        (json!({"full_name": "Ada", "email": "ada@example.com"}), "email"),
        (json!({"full_name": "Ada", "email": "not-an-email"}), "email"),
        (json!({"email": "b@example.com"}), "full_name"),
        (
            json!({"full_name": "B", "email": "b@example.com", "colour": "red"}),
            "colour",
        ),
    ] {
        let response = client()
            .post(url("/learners"))
            .header("X-Api-Key", sim.api_key())
            .json(&body)
            .send()
            .await
            .expect("create");
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.json::<Value>().await.expect("json")["field"], field);
    }
    let patch = |tag: &str, body: Value| {
        client()
            .patch(url(&format!("/learners/{id}")))
            .header("X-Api-Key", sim.api_key())
            .header("If-Match", tag)
            .json(&body)
            .send()
    };
    let response = patch(
        &etag,
        json!({"certified": true, "completed_at": "2026-11-27T18:09:45Z"}),
    )
    .await
    .expect("patch");
    assert_eq!(response.status(), StatusCode::OK);
    let next = response.headers()["etag"].to_str().expect("etag").to_string();
    assert_ne!(next, etag);
    let response = patch(&etag, json!({"certified": false})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    assert!(sim.learner(id).expect("learner").certified);
    // A patch that changes nothing leaves updated_at and the ETag alone.
    let before = sim.learner(id).expect("learner");
    let response = patch(&next, json!({"certified": true})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"].to_str().expect("etag"), next);
    assert_eq!(sim.learner(id).expect("learner"), before);
    // A concurrent edit by a user between read and write.
    assert!(sim.interfere_on_next_write(id, json!({"full_name": "Augusta Ada King"})));
    let response = patch(&next, json!({"certified": false})).await.expect("patch");
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(sim.learner(id).expect("learner").full_name, "Augusta Ada King");

    // Upsert by email: the existing learner is updated, an unknown email created.
    let upsert = |email: &str, body: Value| {
        client()
            .patch(url(&format!("/learners/by_email/{email}")))
            .header("X-Api-Key", sim.api_key())
            .json(&body)
            .send()
    };
    let response = upsert("ADA@example.com", json!({"certified": false}))
        .await
        .expect("upsert");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.expect("json")["id"], json!(id));
    assert!(!sim.learner(id).expect("learner").certified);
    let response = upsert("grace@example.com", json!({"certified": true}))
        .await
        .expect("upsert");
    assert_eq!(
        response.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "a new learner needs a name"
    );
    let response = upsert("grace@example.com", json!({"full_name": "Grace Hopper"}))
        .await
        .expect("upsert");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(sim.live().len(), 2);
    let delete = || {
        client()
            .delete(url(&format!("/learners/{id}")))
            .header("X-Api-Key", sim.api_key())
            .send()
    };
    assert_eq!(delete().await.expect("delete").status(), StatusCode::NO_CONTENT);
    assert_eq!(delete().await.expect("delete").status(), StatusCode::NOT_FOUND);
    assert!(sim.learner(id).expect("kept").deleted_at.is_some());
    let response = client()
        .get(url(&format!("/learners/{id}")))
        .header("X-Api-Key", sim.api_key())
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn lms_rate_limit_answers_429() {
    let sim = LmsSim::start(LmsOptions {
        rate_limit: Some(2),
        ..LmsOptions::default()
    })
    .await
    .expect("lms starts");
    sim.freeze_clock(Some(chrono::Utc::now()));
    for _ in 0..8 {
        let response = client()
            .get(format!("{}/api/v1/learners", sim.base_url()))
            .header("X-Api-Key", sim.api_key())
            .send()
            .await
            .expect("list");
        assert!(response.headers().contains_key("x-ratelimit-reset"));
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(response.headers()["retry-after"], "1");
        }
    }
    assert_eq!(sim.stats().rate_limited, 6, "{:?}", sim.stats());
}
