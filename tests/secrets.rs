//! Secrets and record values stay where they belong. A real daemon runs with an admin
//! token, a state key and connector credentials (a PostgreSQL password, a REST bearer
//! token; right ones and wrong ones) given by reference, on data that carries canary
//! values; every output (debug logs, status, metrics, error bodies) and the raw state
//! file are searched for the canaries. SIGHUP rotates the admin token with no restart.

mod support;

use std::path::Path;

use concord::sim::crm::{CrmOptions, CrmSim};
use support::pg::PgCluster;
use support::*;

const ADMIN_TOKEN: &str = "canary-admin-token-5b1e77d2";
const NEXT_TOKEN: &str = "canary-next-token-09c4aa31";
const WRONG_TOKEN: &str = "canary-wrong-token-6f0e12";
/// 64 hex characters, the state key format.
const STATE_KEY: &str = "c0ffee00d15ea5e0c0ffee00d15ea5e0c0ffee00d15ea5e0c0ffee00d15ea5e1";
const RECORD_CANARIES: &[&str] = &["Zanzibarqux", "zanzibarqux@example.com", "Quuxplorer", "CANARYPHONE"];

fn secured_copy(dir: &Path, port: u16) -> std::path::PathBuf {
    let config = example_copy(dir, port);
    std::fs::write(dir.join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::write(dir.join("state-key"), format!("{STATE_KEY}\n")).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen(
            "dir = \"state\"",
            "dir = \"state\"\nencryption = { key = { file = \"state-key\" } }",
            1,
        )
        .replacen(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!(
                "listen = \"127.0.0.1:{port}\"\ntokens = [{{ name = \"ops\", secret = {{ file = \"admin-token\" }} }}]"
            ),
            1,
        );
    std::fs::write(&config, text).unwrap();
    // One good row and one whose phone is not a phone, both full of canaries.
    let mut hr = std::fs::read_to_string(dir.join("inbox/hr/employees-2026-11-26.csv")).unwrap();
    hr.push_str("1101,Zanzibarqux,Quuxplorer,zanzibarqux@example.com,Canary Keeper,+1 212 555 0199\n");
    hr.push_str("1102,Zanzibarqux,Quuxplorer,other.zanzibarqux@example.com,Canary Keeper,CANARYPHONE\n");
    std::fs::write(dir.join("inbox/hr/employees-2026-11-26.csv"), hr).unwrap();
    config
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn assert_clean(what: &str, text: &str, canaries: &[&str]) {
    for canary in canaries {
        assert!(!text.contains(canary), "{what} contains the canary {canary:?}");
    }
}

#[test]
fn secrets_and_values_never_leak_and_sighup_rotates_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = secured_copy(dir.path(), port);
    let mut child = start_debug_logged(&config, &dir.path().join("debug.log"));

    let auth = bearer(ADMIN_TOKEN);
    let ok = [("Authorization", auth.as_str())];
    let status = wait_for("the sync", 60, || {
        let r = request_with(port, "GET", "/api/v1/status", &ok)?;
        (r.status == 200 && r.json()["records"] == 7).then_some(r.body)
    });
    let metrics = wait_for("metrics", 30, || {
        let r = request_with(port, "GET", "/metrics", &ok)?;
        (r.status == 200 && r.body.contains("concord_dlq_entries{system=\"hr\"} 2")).then_some(r.body)
    });
    let dlq = request_with(port, "GET", "/api/v1/dlq", &ok).unwrap();
    assert_eq!(dlq.status, 200);
    let reasons: Vec<String> = dlq.json()["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");

    // Refusals: no token, a wrong token; neither echoes anything.
    let wrong = bearer(WRONG_TOKEN);
    let refused = request_with(port, "GET", "/api/v1/status", &[("Authorization", wrong.as_str())]).unwrap();
    assert_eq!(refused.status, 401);
    let anonymous = request(port, "GET", "/metrics").unwrap();
    assert_eq!(anonymous.status, 401);

    // Rotation: the secret file changes, SIGHUP, the old token stops working.
    std::fs::write(dir.path().join("admin-token"), format!("{NEXT_TOKEN}\n")).unwrap();
    signal(&child, libc::SIGHUP);
    let next = bearer(NEXT_TOKEN);
    wait_for("the new token to be accepted", 30, || {
        request_with(port, "GET", "/api/v1/status", &[("Authorization", next.as_str())]).filter(|r| r.status == 200)
    });
    let old = request_with(port, "GET", "/api/v1/status", &ok).unwrap();
    assert_eq!(old.status, 401, "the rotated-out token still works");

    signal(&child, libc::SIGTERM);
    let code = wait_for("exit", 30, || child.try_wait().unwrap());
    assert!(code.success(), "exit status {code}");

    let secrets = [ADMIN_TOKEN, NEXT_TOKEN, WRONG_TOKEN, STATE_KEY];
    let log = std::fs::read_to_string(dir.path().join("debug.log")).unwrap();
    assert!(log.contains("DEBUG"), "the daemon logged at debug level");
    let mut all: Vec<&str> = secrets.to_vec();
    all.extend_from_slice(RECORD_CANARIES);
    assert_clean("the debug log", &log, &all);
    assert_clean("/api/v1/status", &status, &all);
    assert_clean("/metrics", &metrics, &all);
    assert_clean("dead-letter reasons", &reasons.join("\n"), &all);
    assert_clean("a 401 body", &format!("{}{}", refused.headers, refused.body), &all);
    assert_clean("a 401 body", &format!("{}{}", anonymous.headers, anonymous.body), &all);

    // The state file holds the canaries only as ciphertext.
    let raw = std::fs::read(dir.path().join("state/concord.redb")).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert_clean("the raw state file", &raw, &all);
    // The same search finds values that are stored in clear: the search works.
    assert!(raw.contains("hr.contact"), "checkpoint stream names are in clear");
}

const PG_PASSWORD: &str = "canary-pg-password-3d5a9c1e";
const WRONG_PG_PASSWORD: &str = "canary-wrong-pg-password-77b2";
const CRM_TOKEN: &str = "canary-crm-token-e4f80a6b";
const WRONG_CRM_TOKEN: &str = "canary-wrong-crm-token-1c9d";

/// A daemon that reads a PostgreSQL table through a least-privilege replication role and
/// writes a REST CRM, next to a PostgreSQL system and a CRM system whose credentials are
/// wrong. The right credentials work (the canary row reaches the CRM), the wrong ones
/// fail with a reason in status; none of the four secrets, nor the admin token or the
/// state key, nor the row's values, shows in the debug log, status, metrics or the
/// state file.
#[test]
fn connector_credentials_never_leak_from_a_running_daemon() {
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let crm = io
        .block_on(CrmSim::start(CrmOptions {
            token: CRM_TOKEN.into(),
            ..CrmOptions::default()
        }))
        .unwrap();
    let cluster = PgCluster::shared();
    let db = io.block_on(cluster.fresh_db());
    let role = io.block_on(async {
        db.execute(
            "CREATE TABLE contacts (id bigint PRIMARY KEY, email text NOT NULL, first_name text, last_name text);
             CREATE PUBLICATION pub_contacts FOR TABLE contacts;",
        )
        .await;
        let role = db.create_role("cdc", "REPLICATION").await;
        db.execute(&format!(
            "ALTER ROLE {name} PASSWORD '{PG_PASSWORD}'; GRANT SELECT ON contacts TO {name};",
            name = role.name
        ))
        .await;
        role
    });

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    for (file, secret) in [
        ("admin-token", ADMIN_TOKEN),
        ("state-key", STATE_KEY),
        ("pg-password", PG_PASSWORD),
        ("pg-wrong-password", WRONG_PG_PASSWORD),
        ("crm-token", CRM_TOKEN),
        ("crm-wrong-token", WRONG_CRM_TOKEN),
    ] {
        std::fs::write(dir.path().join(file), format!("{secret}\n")).unwrap();
    }
    let config = dir.path().join("concord.toml");
    std::fs::write(&config, credentials_config(&db, &role.name, &crm.base_url(), port)).unwrap();

    let mut child = start_debug_logged(&config, &dir.path().join("debug.log"));

    io.block_on(db.execute("INSERT INTO contacts VALUES (1, 'zanzibarqux@example.com', 'Zanzibarqux', 'Quuxplorer')"));
    let auth = bearer(ADMIN_TOKEN);
    let ok = [("Authorization", auth.as_str())];
    wait_for("the row to reach the CRM", 60, || {
        crm.find_by_email("zanzibarqux@example.com")
            .filter(|c| c.first_name.as_deref() == Some("Zanzibarqux"))
    });
    // Both wrong systems are refused, and status says why.
    let status = wait_for("both refusals in status", 60, || {
        let r = request_with(port, "GET", "/api/v1/status", &ok)?;
        let json = r.json();
        let error = |link: &str| json["links"][link]["last_error"].as_str().map(str::to_string);
        let pg = error("app_wrong.contact")?;
        let rest = error("crm_wrong.contact")?;
        (pg.contains("password") && rest.contains("401")).then_some(r.body)
    });
    let metrics = wait_for("metrics", 30, || {
        let r = request_with(port, "GET", "/metrics", &ok)?;
        (r.status == 200 && r.body.contains("concord_http_requests_total")).then_some(r.body)
    });

    signal(&child, libc::SIGTERM);
    let code = wait_for("exit", 30, || child.try_wait().unwrap());
    assert!(code.success(), "exit status {code}");

    let secrets = [
        PG_PASSWORD,
        WRONG_PG_PASSWORD,
        CRM_TOKEN,
        WRONG_CRM_TOKEN,
        ADMIN_TOKEN,
        STATE_KEY,
    ];
    let values = ["Zanzibarqux", "zanzibarqux@example.com", "Quuxplorer"];
    let mut all: Vec<&str> = secrets.to_vec();
    all.extend_from_slice(&values);
    let log = std::fs::read_to_string(dir.path().join("debug.log")).unwrap();
    assert!(log.contains("DEBUG"), "the daemon logged at debug level");
    // The log names the failures, so it was searched where they are told.
    assert!(
        log.contains("app_wrong"),
        "the log tells of the refused PostgreSQL system"
    );
    assert_clean("the debug log", &log, &all);
    assert_clean("/api/v1/status", &status, &all);
    assert_clean("/metrics", &metrics, &all);
    let raw = std::fs::read(dir.path().join("state/concord.redb")).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert_clean("the raw state file", &raw, &all);
    assert!(raw.contains("app.contact"), "checkpoint stream names are in clear");
}

fn credentials_config(db: &support::pg::TestDb<'_>, user: &str, crm_url: &str, port: u16) -> String {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/contact.schema.json");
    let pg = |password_file: &str, slot: &str| {
        format!(
            "type = \"postgres\"\ndirection = \"read\"\nhost = \"{host}\"\nport = {pg_port}\ndatabase = \"{database}\"\n\
             user = \"{user}\"\npassword = {{ file = \"{password_file}\" }}\ntls = \"disable\"\n\
             slot = \"{slot}\"\npublication = \"pub_contacts\"\n",
            host = db.cluster.host(),
            pg_port = db.cluster.port(),
            database = db.name,
        )
    };
    let crm = |token_file: &str| {
        format!(
            r#"type = "rest"
base_url = "{crm_url}"
auth = {{ method = "bearer", token = {{ file = "{token_file}" }} }}
timeout_ms = 2000

[systems.{{name}}.objects.Contact]
list = {{ path = "/services/data/v60.0/query" }}
records = "/records"
ignore_fields = ["attributes"]
pagination = {{ style = "next_url", pointer = "/nextRecordsUrl" }}
cursor = {{ field = "LastModifiedDate", param = "q", format = "rfc3339", lookback_secs = 2, template = "SELECT Id, FirstName, LastName, Email, LastModifiedDate FROM Contact WHERE LastModifiedDate >= {{cursor}} ORDER BY LastModifiedDate, Id" }}
write = {{ create_path = "/services/data/v60.0/sobjects/Contact", item_path = "/services/data/v60.0/sobjects/Contact/{{id}}", update_method = "patch", created_id = "/id" }}
"#
        )
    };
    let link = |system: &str, object: &str, id: &str, map: &str, extra: &str| {
        format!(
            "[[links]]\nsystem = \"{system}\"\nentity = \"contact\"\nobject = \"{object}\"\nid_field = \"{id}\"\n{extra}map = [{map}]\n\n"
        )
    };
    let pg_map = r#"{ canonical = "email", system = "email" }, { canonical = "first_name", system = "first_name" }, { canonical = "last_name", system = "last_name" }"#;
    let crm_map = r#"{ canonical = "email", system = "Email" }, { canonical = "first_name", system = "FirstName" }, { canonical = "last_name", system = "LastName" }"#;
    let capture = "capture = { interval_secs = 1 }\n";
    format!(
        r#"[state]
dir = "state"
encryption = {{ key = {{ file = "state-key" }} }}

[admin]
listen = "127.0.0.1:{port}"
tokens = [{{ name = "ops", secret = {{ file = "admin-token" }} }}]

[engine]
backoff_min_ms = 50
backoff_max_ms = 500

[systems.app]
{app}
[systems.app_wrong]
{app_wrong}
[systems.crm]
direction = "write"
{crm_right}
[systems.crm_wrong]
direction = "read"
{crm_wrong}
[entities.contact]
schema = "{schema}"
match_keys = ["email"]

{links}"#,
        app = pg("pg-password", "concord_app"),
        app_wrong = pg("pg-wrong-password", "concord_app_wrong"),
        crm_right = crm("crm-token").replace("{name}", "crm"),
        crm_wrong = crm("crm-wrong-token").replace("{name}", "crm_wrong"),
        schema = schema.display(),
        links = [
            link("app", "contacts", "id", pg_map, capture),
            link("app_wrong", "contacts", "id", pg_map, capture),
            link("crm", "Contact", "Id", crm_map, ""),
            link("crm_wrong", "Contact", "Id", crm_map, capture),
        ]
        .concat(),
    )
}
