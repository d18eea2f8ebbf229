//! Secrets and record values stay where they belong. A real daemon runs with an admin
//! token and a state key given by reference, on data that carries canary values; every
//! output (debug logs, status, metrics, error bodies) and the raw state file are searched
//! for the canaries. SIGHUP rotates the admin token with no restart.

mod support;

use std::path::Path;

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
    let log = std::fs::File::create(dir.path().join("debug.log")).unwrap();
    let mut child = concord(&["run", "--config"])
        .arg(&config)
        .env("CONCORD_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

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
