//! `concord demo --seconds N` as a user runs it: the real binary, the bundled
//! configuration, simulated systems on loopback. After the run the demo waits for the
//! systems to settle and writes `summary.json` with what each system holds; the test
//! holds that content to the authority rules of `examples/demo/concord.toml`: HR owns
//! names and job titles, the CRM owns phone numbers, the LMS owns certification.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The demo's own settle deadline is 90 s; this leaves room for a slow machine.
const RUN_DEADLINE: Duration = Duration::from_secs(240);

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

#[test]
fn the_demo_converges_to_the_authority_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("demo");
    let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["demo", "--seconds", "15", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&dir)
        .arg("--config")
        .arg(root.join("examples/demo/concord.toml"))
        .env("CONCORD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("concord demo starts");
    let deadline = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "the demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for shown in ["/api/v1/status", "/metrics", "state (redb)", "records |"] {
        assert!(stdout.contains(shown), "the demo prints {shown:?}:\n{stdout}");
    }
    assert!(dir.join("state").is_dir(), "the state lives in the demo directory");

    let summary: Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json")).expect("summary.json"))
        .expect("summary is JSON");
    assert_eq!(summary["converged"], true, "the systems settled\n{stdout}");
    let contacts = summary["crm"]["contacts"].as_array().expect("CRM contacts");
    let learners = summary["lms"]["learners"].as_array().expect("LMS learners");
    let employees = summary["hr"]["employees"].as_array().expect("HR employees");
    let events = summary["events"].as_array().expect("events");
    let find = |list: &[Value], key: &str, email: &str| -> Option<Value> {
        list.iter().find(|v| text(v, key).eq_ignore_ascii_case(email)).cloned()
    };

    // HR owns names and titles: every employee is in the CRM and the LMS with HR's
    // values, whatever the CRM's users typed and the trainers retyped.
    assert!(employees.len() >= 24);
    for e in employees {
        let email = text(e, "email");
        let c = find(contacts, "Email", email).unwrap_or_else(|| panic!("{email} is not in the CRM"));
        assert_eq!(text(&c, "FirstName"), text(e, "first"), "{email}");
        assert_eq!(text(&c, "LastName"), text(e, "last"), "{email}");
        assert_eq!(
            text(&c, "Title"),
            text(e, "job_title"),
            "{email}: HR's title, the CRM edit reverted"
        );
        let l = find(learners, "email", email).unwrap_or_else(|| panic!("{email} is not in the LMS"));
        assert_eq!(
            text(&l, "full_name"),
            format!("{} {}", text(e, "first"), text(e, "last")),
            "{email}"
        );
    }
    // The LMS owns certification: the CRM's checkbox follows it for everyone both hold.
    let mut compared = 0;
    for l in learners {
        if let Some(c) = find(contacts, "Email", text(l, "email")) {
            assert_eq!(c["Certified__c"], l["certified"], "{}", text(l, "email"));
            compared += 1;
        }
    }
    assert!(compared >= 24, "{compared} people held by both the CRM and the LMS");

    // The scripted changes happened, and their effects are visible.
    let happened = |kind: &str| events.iter().filter(|e| text(e, "kind") == kind).count();
    for kind in [
        "title_edit",
        "invalid_phone",
        "certified",
        "title_change",
        "name_retyped",
    ] {
        assert!(happened(kind) >= 1, "no {kind} event in {events:?}");
    }
    let counters = &summary["counters"];
    assert!(counters["reverts"].as_f64().unwrap_or(0.0) >= 1.0, "{counters}");
    let dead: u64 = summary["status"]["systems"]
        .as_object()
        .expect("systems")
        .values()
        .map(|s| s["dlq_depth"].as_u64().unwrap_or(0))
        .sum();
    assert!(dead >= 1, "the invalid phone number was dead-lettered");
    // Every learner the LMS certified during the run is certified in the CRM too.
    for e in events.iter().filter(|e| text(e, "kind") == "certified") {
        let email = text(e, "email");
        if let (Some(c), Some(l)) = (find(contacts, "Email", email), find(learners, "email", email)) {
            assert_eq!(l["certified"], true, "{email}");
            assert_eq!(
                c["Certified__c"], true,
                "{email}: the LMS certification reached the CRM"
            );
        }
    }
}
