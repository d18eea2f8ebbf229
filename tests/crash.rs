//! Crash safety of the whole daemon: a sync of more than 10,000 changes is run once
//! without interruption, and once while the `concord` process is SIGKILLed at random
//! points and restarted. The end states must be equal: every change merged, every
//! write made, no create duplicated in any target, every input file processed once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use rand::{Rng, SeedableRng};
use serde_json::Value;

const EMPLOYEES: usize = 4_000;
const HR_FILES: usize = 6;
const CRM_FILES: usize = 4;

fn config(port: u16) -> String {
    format!(
        r#"
[state]
dir = "state"

[admin]
listen = "127.0.0.1:{port}"

[engine]
batch_size = 200
backoff_min_ms = 10
backoff_max_ms = 200

[systems.hr]
type = "file"
direction = "read"
inbox = "hr"
settle_ms = 0

[systems.crm]
type = "file"
direction = "both"
inbox = "crm"
format = "jsonl"
export_dir = "crm-out"
settle_ms = 0

[systems.directory]
type = "file"
direction = "write"
export_dir = "directory-out"
format = "jsonl"

[entities.contact]
schema = "{schema}"
match_keys = ["email"]

[entities.contact.fields.first_name]
owners = ["hr"]

[entities.contact.fields.last_name]
owners = ["hr"]

[entities.contact.fields.title]
owners = ["hr"]
non_owner = "revert"

[entities.contact.fields.phone]
owners = ["crm"]

[[links]]
system = "hr"
entity = "contact"
object = "hr-*.csv"
id_field = "employee_id"
capture = {{ interval_secs = 1 }}
map = [
  {{ canonical = "email", system = "email", transforms = ["trim", "lower"] }},
  {{ canonical = "first_name", system = "first" }},
  {{ canonical = "last_name", system = "last" }},
  {{ canonical = "title", system = "job_title" }},
]

[[links]]
system = "crm"
entity = "contact"
object = "crm-*.jsonl"
id_field = "Id"
capture = {{ interval_secs = 1 }}
write = "update"
map = [
  {{ canonical = "email", system = "Email", transforms = ["lower"] }},
  {{ canonical = "phone", system = "Phone", transforms = ["e164"] }},
  {{ canonical = "title", system = "Title" }},
]

[[links]]
system = "directory"
entity = "contact"
object = "contacts"
id_field = "id"
map = [
  {{ canonical = "email", system = "email" }},
  {{ canonical = "first_name", system = "first_name" }},
  {{ canonical = "last_name", system = "last_name" }},
  {{ canonical = "title", system = "title" }},
  {{ canonical = "phone", system = "phone" }},
]
"#,
        schema = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/contact.schema.json")
            .display()
    )
}

/// Writes the inputs: HR exports where every employee appears in several files with a
/// changing title, and CRM exports with phones and some non-owner title edits.
fn write_inputs(dir: &Path) -> usize {
    let mut changes = 0;
    std::fs::create_dir_all(dir.join("hr")).unwrap();
    std::fs::create_dir_all(dir.join("crm")).unwrap();
    let per_file = EMPLOYEES * 2 / HR_FILES;
    for f in 0..HR_FILES {
        let mut csv = String::from("employee_id,first,last,email,job_title\n");
        for i in 0..per_file {
            let n = (f * per_file + i) % EMPLOYEES;
            csv.push_str(&format!("{n},First{n},Last{n},Person{n}@Example.com,Title {n} v{f}\n"));
            changes += 1;
        }
        std::fs::write(dir.join(format!("hr/hr-{f:02}.csv")), csv).unwrap();
    }
    let per_file = EMPLOYEES / CRM_FILES;
    for f in 0..CRM_FILES {
        let mut jsonl = String::new();
        for i in 0..per_file {
            let n = f * per_file + i;
            let mut rec = serde_json::json!({
                "Id": format!("c{n}"),
                "Email": format!("person{n}@example.com"),
                "Phone": format!("+1 415 555 {:04}", n % 10_000),
            });
            if n.is_multiple_of(7) {
                rec["Title"] = Value::from(format!("Self-declared {n}"));
            }
            jsonl.push_str(&rec.to_string());
            jsonl.push('\n');
            changes += 1;
        }
        std::fs::write(dir.join(format!("crm/crm-{f:02}.jsonl")), jsonl).unwrap();
    }
    std::fs::write(dir.join("concord.toml"), config(0)).unwrap();
    changes
}

/// Starts concord with its admin listener on a fresh port, returned with the child.
fn spawn_listening(dir: &Path) -> (Child, u16) {
    let port = support::free_port();
    std::fs::write(dir.join("concord.toml"), config(port)).unwrap();
    (spawn(dir), port)
}

fn spawn(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["run", "--once", "--config"])
        .arg(dir.join("concord.toml"))
        .env("CONCORD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the concord binary starts")
}

fn run_to_completion(dir: &Path) {
    let mut child = spawn(dir);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "concord exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "concord did not finish the sync in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Target state folded from every export file in name order: email → fields, plus the
/// number of create operations seen per email.
fn fold_exports(dir: &Path) -> (BTreeMap<String, BTreeMap<String, Value>>, BTreeMap<String, u32>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut by_id: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut creates: BTreeMap<String, u32> = BTreeMap::new();
    let mut email_of: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let w: Value = serde_json::from_str(line).unwrap();
            let id = w["id"].as_str().unwrap().to_string();
            let rec = by_id.entry(id.clone()).or_default();
            if let Some(fields) = w["fields"].as_object() {
                for (k, v) in fields {
                    rec.insert(k.clone(), v.clone());
                }
            }
            let email = rec
                .get("email")
                .or_else(|| rec.get("Email"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| email_of.get(&id).cloned())
                .unwrap_or_else(|| id.clone());
            email_of.insert(id.clone(), email.clone());
            if w["op"] == "create" {
                *creates.entry(email).or_default() += 1;
            }
        }
    }
    let by_email = by_id
        .into_iter()
        .map(|(id, fields)| (email_of.get(&id).cloned().unwrap_or(id), fields))
        .collect();
    (by_email, creates)
}

/// Agreed values of every record, keyed by email, read from the state file.
fn agreed(dir: &Path) -> BTreeMap<String, BTreeMap<String, Value>> {
    let store = concord::state::StateStore::open(&dir.join("state"), 16).unwrap();
    let view = store.read().unwrap();
    let mut out = BTreeMap::new();
    for (_, record) in view.records("contact").unwrap() {
        let values = record.base.values();
        let email = values["email"].as_str().unwrap().to_string();
        out.insert(email, values.into_iter().collect());
    }
    assert_eq!(view.outbox_depth("directory").unwrap(), 0, "directory outbox drained");
    assert_eq!(view.outbox_depth("crm").unwrap(), 0, "crm outbox drained");
    out
}

/// A coarse measure of how far a sync got: input files finished plus export files written.
fn progress_of(dir: &Path) -> usize {
    let count = |sub: &str| std::fs::read_dir(dir.join(sub)).map(|rd| rd.count()).unwrap_or(0);
    count("processed") + count("directory-out") + count("crm-out")
}

fn inputs_all_processed(dir: &Path) {
    for sub in ["hr", "crm"] {
        let left: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .filter(|n| {
                let n = n.to_string_lossy();
                n.ends_with(".csv") || n.ends_with(".jsonl")
            })
            .collect();
        assert!(left.is_empty(), "{sub} inbox still holds {left:?}");
        let failed = dir.join("failed");
        if failed.exists() {
            assert_eq!(std::fs::read_dir(&failed).unwrap().count(), 0, "no input failed");
        }
    }
}

#[test]
fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let reference = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let changes = write_inputs(reference.path());
    assert!(changes >= 10_000, "the workload has {changes} changes");
    write_inputs(crashed.path());

    // The reference run: uninterrupted. Its duration from readiness to exit sizes the
    // window the kill points are drawn from.
    let (mut child, port) = spawn_listening(reference.path());
    support::wait_for("reference readiness", 60, || {
        support::request(port, "GET", "/readyz").filter(|r| r.status == 200)
    });
    let ready = Instant::now();
    let status = support::wait_for("the reference sync", 600, || child.try_wait().unwrap());
    assert!(status.success(), "concord exited with {status}");
    let work_ms = ready.elapsed().as_millis().max(20) as u64;
    let total = progress_of(reference.path()).max(1);

    let seed: u64 = std::env::var("CONCORD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash seed {seed} (set CONCORD_CRASH_SEED to repeat); sync takes {work_ms} ms");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    let mut progress = vec![progress_of(crashed.path())];
    while kills < 12 {
        let (mut child, port) = spawn_listening(crashed.path());
        // Each kill lands at a random point after the engine is up, so twelve kills
        // interrupt the sync at many different stages.
        // Readiness is polled tightly: a coarse poll would let each restart run on
        // unobserved and the sync could finish before the kills are spent.
        let deadline = Instant::now() + Duration::from_secs(60);
        while support::request(port, "GET", "/readyz")
            .filter(|r| r.status == 200)
            .is_none()
            && child.try_wait().unwrap().is_none()
        {
            assert!(Instant::now() < deadline, "timed out waiting for readiness");
            std::thread::sleep(Duration::from_millis(2));
        }
        // The window shrinks with the work left, so the kills spread over the whole sync.
        let left = total.saturating_sub(progress_of(crashed.path())).max(1) as u64;
        let window = work_ms * left / total as u64 / (12 - kills as u64 + 1);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..window + 1)));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "concord exited with {status}");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                progress.push(progress_of(crashed.path()));
            }
        }
    }
    eprintln!("progress (files processed + export files) after each kill: {progress:?}");
    assert!(kills >= 10, "only {kills} kills landed before the sync finished");
    let advances = progress.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        advances >= 5,
        "kills must land at many stages of the sync: {progress:?}"
    );
    run_to_completion(crashed.path());

    inputs_all_processed(reference.path());
    inputs_all_processed(crashed.path());

    let expected = agreed(reference.path());
    let actual = agreed(crashed.path());
    assert_eq!(expected.len(), EMPLOYEES, "every employee is one record");
    assert!(expected == actual, "agreed state differs after crashes");

    for target in ["directory-out", "crm-out"] {
        let (want, want_creates) = fold_exports(&reference.path().join(target));
        let (got, got_creates) = fold_exports(&crashed.path().join(target));
        assert!(!want.is_empty(), "{target} received writes");
        assert!(want == got, "{target} content differs after crashes");
        let duplicated: Vec<_> = got_creates.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            duplicated.is_empty(),
            "{target} has duplicated creates: {:?}",
            &duplicated[..duplicated.len().min(5)]
        );
        assert_eq!(want_creates, got_creates, "{target} creates differ");
    }
}
