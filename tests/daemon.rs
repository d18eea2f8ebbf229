//! The daemon as an operator meets it: the bundled example run as a real process,
//! inspected over its admin listener, metrics checked by promtool, stopped by signals.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use support::*;

/// Folds the JSONL export files of a directory into id → fields.
fn exported(dir: &Path) -> BTreeMap<String, serde_json::Map<String, Value>> {
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for file in files.iter().filter(|f| f.extension().is_some_and(|x| x == "jsonl")) {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            let w: Value = serde_json::from_str(line).unwrap();
            let rec = out.entry(w["id"].as_str().unwrap().to_string()).or_default();
            for (k, v) in w["fields"].as_object().unwrap() {
                rec.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

#[test]
fn example_syncs_explains_and_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let mut child = start(&config, false);

    wait_for("readiness", 60, || {
        request(port, "GET", "/readyz").filter(|r| r.status == 200)
    });
    let status = wait_for("the sync to finish", 60, || example_synced(port));
    assert_eq!(status["systems"]["directory"]["dlq_depth"], 0);

    // What the directory received: every contact once, authority applied.
    let out = wait_for("the export files", 30, || {
        let out = exported(&dir.path().join("out"));
        (out.len() == 6).then_some(out)
    });
    let by_mail: BTreeMap<&str, &serde_json::Map<String, Value>> =
        out.values().map(|r| (r["mail"].as_str().unwrap(), r)).collect();
    let ada = by_mail["ada.lovelace@example.com"];
    assert_eq!(ada["display_name"], "Ada Lovelace");
    assert_eq!(ada["job_title"], "Head of Engineering");
    assert_eq!(ada["telephone"], "+12125550101");
    assert_eq!(ada["certified"], true);
    assert_eq!(ada["source"], "concord");
    // HR owns names: the LMS's "Alan M. Turing" does not win.
    assert_eq!(by_mail["alan.turing@example.com"]["display_name"], "Alan Turing");
    // A learner HR does not know still becomes a contact, with the LMS's name.
    assert_eq!(
        by_mail["margaret.hamilton@example.com"]["display_name"],
        "Margaret Hamilton"
    );
    assert_eq!(by_mail["barbara.liskov@example.com"]["telephone"], "+442079460958");
    // Edsger's phone number is invalid: nothing of his row is written anywhere.
    assert!(!by_mail.contains_key("edsger.dijkstra@example.com"));

    // The dead letter says why, without the value.
    let dlq = get(port, "/api/v1/dlq").json();
    let letters = dlq["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dlq}");
    assert_eq!(letters[0]["system"], "hr");
    assert_eq!(letters[0]["class"], "mapping");
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("phone"), "{reason}");
    assert!(!reason.contains("555-12"), "the reason carries the value: {reason}");

    // The conflict over Alan's name is recorded.
    let conflicts = get(port, "/api/v1/decisions?conflicts=true").json();
    let names: Vec<&str> = conflicts["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["fields"].as_array().unwrap().iter().filter(|f| f["conflict"] == true))
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"last_name"), "{conflicts}");

    // One record explained: each agreed value with the system and rule that set it.
    let ada = get(port, "/api/v1/entities/contact/records/hr:1001");
    assert_eq!(ada.status, 200, "{}", ada.body);
    let ada = ada.json();
    assert_eq!(ada["fields"]["title"]["system"], "hr");
    assert_eq!(ada["fields"]["certified"]["system"], "lms");
    assert_eq!(ada["fields"]["certified"]["rule"], "owner");
    assert!(
        ada["systems"]["directory"]["local_id"].is_string(),
        "the directory's id is known: {ada}"
    );
    let audit = get(port, "/api/v1/audit").json();
    assert!(audit.to_string().contains("read_record"), "{audit}");

    // SIGTERM: graceful stop, exit 0.
    signal(&child, libc::SIGTERM);
    let code = wait_for("exit after SIGTERM", 30, || child.try_wait().unwrap());
    assert!(code.success(), "exit status {code}");

    // A second run has nothing new to do: the files were processed exactly once.
    let files_before = std::fs::read_dir(dir.path().join("out")).unwrap().count();
    let status = concord(&["run", "--once", "--config"]).arg(&config).status().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_dir(dir.path().join("out")).unwrap().count(), files_before);
}

#[test]
fn metrics_pass_promtool_and_are_all_declared() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let mut child = start(&config, false);
    wait_for("the sync to finish", 60, || example_synced(port));
    // Gauges are refreshed by the maintenance pass; wait for one after the sync.
    let text = wait_for("gauges refreshed after the sync", 30, || {
        let m = get(port, "/metrics");
        let fresh = m.body.contains("concord_outbox_entries{system=\"directory\"} 0")
            && m.body.contains("concord_dlq_entries{system=\"hr\"} 1")
            && m.body.contains("concord_records 6");
        (m.status == 200 && fresh).then_some(m.body)
    });
    let ty = get(port, "/metrics").headers;
    assert!(ty.to_ascii_lowercase().contains("content-type: text/plain"), "{ty}");

    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; .ci/run installs it)");
    use std::io::Write;
    promtool.stdin.as_ref().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );

    // Every exported family is declared in metrics.rs.
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            concord::metrics::ALL.contains(&family) || concord::metrics::ALL.contains(&name),
            "{name} is exported but not declared in metrics.rs"
        );
    }
    // What the file connector and the engine must emit for this flow.
    for expected in [
        "concord_build_info{version=",
        "concord_changes_captured_total{system=\"hr\",entity=\"contact\"}",
        "concord_changes_captured_total{system=\"lms\",entity=\"contact\"}",
        "concord_changes_merged_total{entity=\"contact\",outcome=\"created\"}",
        "concord_writes_total{system=\"directory\",entity=\"contact\",op=\"upsert\",outcome=\"ok\"}",
        "concord_validation_failures_total{system=\"hr\",entity=\"contact\"} 1",
        "concord_dead_letters_total{system=\"hr\",entity=\"contact\",class=\"mapping\"} 1",
        "concord_conflicts_total{entity=\"contact\",field=\"last_name\"}",
        "concord_end_to_end_latency_seconds_bucket{system=\"directory\",le=",
        "concord_state_commit_duration_seconds_bucket{durability=\"durable\",le=",
        "concord_state_sync_duration_seconds_bucket{le=",
        "concord_source_lag_seconds{system=\"hr\",entity=\"contact\"}",
        "concord_dlq_entries{system=\"hr\"} 1",
        "concord_link_up{link=\"hr.contact\"} 1",
        "concord_records 6",
    ] {
        assert!(text.contains(expected), "/metrics lacks {expected}\n{text}");
    }
    signal(&child, libc::SIGINT);
    let code = wait_for("exit after SIGINT", 30, || child.try_wait().unwrap());
    assert!(code.success(), "exit status {code}");
}

#[test]
fn check_reports_every_problem_with_its_path_and_exit_2() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = concord(&["check", "--config"])
        .arg(root.join("examples/hr-sync/concord.toml"))
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let broken = std::fs::read_to_string(&config)
        .unwrap()
        .replace("owners = [\"lms\"]", "owners = [\"lsm\"]")
        .replace(
            "system = \"directory\"\nentity = \"contact\"",
            "system = \"directory\"\nentity = \"contcat\"",
        );
    std::fs::write(&config, broken).unwrap();
    let out = concord(&["check", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("entities.contact.fields.certified.owners[0]: unknown system \"lsm\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("links[2].entity: unknown entity \"contcat\""),
        "{stderr}"
    );

    std::fs::write(&config, "[state]\ndir = \"s\"\nunknown_key = 1\n").unwrap();
    let out = concord(&["check", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown_key"), "{stderr}");

    // A malformed configuration never starts the daemon either.
    let out = concord(&["run", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn plan_prints_inventory_and_mermaid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("examples/hr-sync/concord.toml");
    let table = concord(&["plan", "--config"]).arg(&config).output().unwrap();
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    for needle in ["hr", "lms", "directory", "certified", "e164"] {
        assert!(table.contains(needle), "plan lacks {needle}:\n{table}");
    }
    let mermaid = concord(&["plan", "--format", "mermaid", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(mermaid.status.success());
    let mermaid = String::from_utf8_lossy(&mermaid.stdout);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert!(mermaid.contains("contact"), "{mermaid}");
}
