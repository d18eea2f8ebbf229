//! The file connector against real files in a temporary directory: the source reads an
//! inbox the way the engine drives it (next batch, commit, committed), the sink writes
//! export files that are read back.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use concord::config::LinkConfig;
use concord::connector::file::{AfterProcessing, FileFormat, FileSink, FileSource, FileSystemConfig};
use concord::connector::{Checkpoint, ErrorClass, SourceBatch};
use concord::model::{ChangeKind, GlobalId, Write, WriteOp};
use serde_json::{Value, json};

const HEADER: &str = "employee_id,name,updated_at\n";

/// A temporary directory holding `inbox/` (and whatever the connector creates beside it).
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir(dir.path().join("inbox")).expect("create inbox");
        Env { dir }
    }

    fn base(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Writes `inbox/<name>` and sets its modification time `age_secs` in the past, so
    /// tests control the order files are taken in.
    fn put(&self, name: &str, content: impl AsRef<[u8]>, age_secs: u64) -> i64 {
        let path = self.path("inbox").join(name);
        fs::write(&path, content).expect("write inbox file");
        let mtime = SystemTime::now() - Duration::from_secs(age_secs);
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .expect("set mtime");
        mtime.duration_since(UNIX_EPOCH).expect("after epoch").as_millis() as i64
    }

    /// Sorted file names in a directory under the base; empty if it does not exist.
    fn names(&self, sub: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.path(sub)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    fn open(&self, config: &FileSystemConfig, object: &str, cp: Option<&Checkpoint>) -> FileSource {
        FileSource::open("hr", config, &link(object), self.base(), cp).expect("open file source")
    }
}

fn config(format: FileFormat, after: AfterProcessing) -> FileSystemConfig {
    FileSystemConfig {
        inbox: Some("inbox".into()),
        format,
        after,
        settle_ms: 0,
        ..FileSystemConfig::default()
    }
}

fn csv_config() -> FileSystemConfig {
    config(FileFormat::Csv, AfterProcessing::Move)
}

fn link(object: &str) -> LinkConfig {
    serde_json::from_value(json!({
        "system": "hr",
        "entity": "employee",
        "object": object,
        "id_field": "employee_id",
        "version_field": "updated_at",
    }))
    .expect("link config")
}

/// CSV with the standard header and rows `ids`.
fn csv(ids: std::ops::RangeInclusive<u32>) -> String {
    let mut out = HEADER.to_string();
    for i in ids {
        out.push_str(&format!("{i},Name {i},2024-01-{i:02}\n"));
    }
    out
}

async fn next(source: &mut FileSource, max: usize) -> SourceBatch {
    source.next_batch(max).await.expect("next_batch").expect("a batch")
}

fn ids(batch: &SourceBatch) -> Vec<&str> {
    batch.records.iter().map(|r| r.local_id.as_str()).collect()
}

fn locations(batch: &SourceBatch) -> Vec<&str> {
    batch.rejects.iter().map(|r| r.location.as_str()).collect()
}

fn complete(checkpoint: &Checkpoint) -> bool {
    checkpoint["file"]["complete"] == json!(true)
}

/// Reads batches the way the engine does, committing each, until no file is ready.
async fn drain(source: &mut FileSource, max: usize) -> Vec<SourceBatch> {
    let mut batches = Vec::new();
    for _ in 0..1000 {
        match source.next_batch(max).await.expect("next_batch") {
            Some(batch) => {
                source.committed(&batch.checkpoint).await.expect("committed");
                batches.push(batch);
            }
            None => return batches,
        }
    }
    panic!("source never ran dry");
}

fn all_ids(batches: &[SourceBatch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.local_id.clone()))
        .collect()
}

#[tokio::test]
async fn csv_is_read_in_batches_and_moved_only_after_commit() {
    let env = Env::new();
    let mtime = env.put("employees-1.csv", csv(1..=5), 60);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);

    let b1 = next(&mut source, 2).await;
    assert_eq!(ids(&b1), ["1", "2"]);
    let first = &b1.records[0];
    assert_eq!(first.kind, ChangeKind::Upsert);
    assert_eq!(first.fields["name"], "Name 1");
    assert_eq!(first.fields["employee_id"], "1");
    assert_eq!(first.version.as_deref(), Some("2024-01-01"));
    assert_eq!(first.source_time_ms, Some(mtime));
    assert!(!complete(&b1.checkpoint));
    source.committed(&b1.checkpoint).await.unwrap();

    let b2 = next(&mut source, 2).await;
    assert_eq!(ids(&b2), ["3", "4"]);
    assert!(!complete(&b2.checkpoint));
    source.committed(&b2.checkpoint).await.unwrap();

    let b3 = next(&mut source, 2).await;
    assert_eq!(ids(&b3), ["5"]);
    assert!(complete(&b3.checkpoint));
    // Read to the end but not committed: still in the inbox, and not read again.
    assert_eq!(env.names("inbox"), ["employees-1.csv"]);
    assert!(env.names("processed").is_empty());
    assert!(source.next_batch(2).await.unwrap().is_none());
    assert_eq!(env.names("inbox"), ["employees-1.csv"]);

    source.committed(&b3.checkpoint).await.unwrap();
    assert!(env.names("inbox").is_empty());
    assert_eq!(env.names("processed"), ["employees-1.csv"]);
    assert!(source.next_batch(2).await.unwrap().is_none());

    let stats = source.stats();
    assert_eq!((stats.files_completed, stats.records, stats.rejects), (1, 5, 0));
}

#[tokio::test]
async fn last_batch_of_a_file_completes_it_even_when_empty() {
    let env = Env::new();
    env.put("employees-a.csv", csv(1..=4), 60);
    // Trailing blank lines: the reader cannot know the file ends after row 6.
    env.put("employees-b.csv", csv(5..=6) + "\n\n", 30);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);

    let b = next(&mut source, 2).await;
    assert_eq!((ids(&b), complete(&b.checkpoint)), (vec!["1", "2"], false));
    source.committed(&b.checkpoint).await.unwrap();
    let b = next(&mut source, 2).await;
    assert_eq!((ids(&b), complete(&b.checkpoint)), (vec!["3", "4"], true));
    source.committed(&b.checkpoint).await.unwrap();
    assert_eq!(env.names("processed"), ["employees-a.csv"]);

    let b = next(&mut source, 2).await;
    assert_eq!((ids(&b), complete(&b.checkpoint)), (vec!["5", "6"], false));
    source.committed(&b.checkpoint).await.unwrap();
    let b = next(&mut source, 2).await;
    assert!(b.records.is_empty() && b.rejects.is_empty());
    assert!(complete(&b.checkpoint));
    assert_eq!(b.checkpoint["file"]["name"], "employees-b.csv");
    assert_eq!(env.names("inbox"), ["employees-b.csv"]);
    source.committed(&b.checkpoint).await.unwrap();
    assert_eq!(env.names("processed"), ["employees-a.csv", "employees-b.csv"]);
    assert!(source.next_batch(2).await.unwrap().is_none());
}

#[tokio::test]
async fn jsonl_is_read_with_numbers_as_ids_and_blank_lines_skipped() {
    let env = Env::new();
    let content = concat!(
        "{\"employee_id\": 17, \"name\": \"Ann\", \"updated_at\": 3, \"tags\": [\"a\"]}\n",
        "\n",
        "   \n",
        "{\"employee_id\": \"E-2\", \"name\": null}\r\n",
        "{\"employee_id\": \"E-3\", \"__deleted\": true, \"updated_at\": \"v9\"}",
    );
    env.put("people.jsonl", content, 10);
    let cfg = config(FileFormat::Jsonl, AfterProcessing::Move);
    let mut source = env.open(&cfg, "*.jsonl", None);
    let batches = drain(&mut source, 10).await;
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert!(complete(&b.checkpoint));
    assert!(b.rejects.is_empty());
    assert_eq!(ids(b), ["17", "E-2", "E-3"]);
    assert_eq!(b.records[0].version.as_deref(), Some("3"));
    assert_eq!(b.records[0].fields["tags"], json!(["a"]));
    assert_eq!(b.records[1].fields["name"], Value::Null);
    assert_eq!(b.records[1].version, None);
    assert_eq!(b.records[2].kind, ChangeKind::Delete);
    assert_eq!(b.records[2].version.as_deref(), Some("v9"));
    assert_eq!(env.names("processed"), ["people.jsonl"]);
}

#[tokio::test]
async fn resume_from_a_checkpoint_yields_exactly_the_remaining_rows() {
    let env = Env::new();
    // CRLF line ends, a quoted line break, and a broken row (line 6) after the resume point.
    let content = "employee_id,name,updated_at\r\n1,A,x\r\n2,B,x\r\n3,\"C\r\nc\",x\r\nbroken\r\n4,D,x\r\n5,E,x\r\n";
    env.put("employees-1.csv", content, 60);
    let cfg = csv_config();

    let mut source = env.open(&cfg, "employees-*.csv", None);
    let b1 = next(&mut source, 2).await;
    assert_eq!(ids(&b1), ["1", "2"]);
    let cp = b1.checkpoint.clone();
    drop(source); // crash: b1 committed, nothing after it

    let mut source = env.open(&cfg, "employees-*.csv", Some(&cp));
    let b2 = next(&mut source, 100).await;
    assert_eq!(ids(&b2), ["3", "4", "5"]);
    assert_eq!(b2.records[0].fields["name"], "C\r\nc");
    assert_eq!(locations(&b2), ["employees-1.csv:line 6"]);
    assert_eq!(b2.rejects[0].raw, "broken");
    assert!(complete(&b2.checkpoint));
    assert_eq!(b2.checkpoint["file"]["offset"], json!(content.len()));

    // The same for JSONL.
    let env = Env::new();
    let lines: String = (1..=5)
        .map(|i| format!("{{\"employee_id\": \"j{i}\"}}\n"))
        .collect::<String>()
        + "[]\n";
    env.put("e.jsonl", &lines, 5);
    let cfg = config(FileFormat::Jsonl, AfterProcessing::Move);
    let mut source = env.open(&cfg, "*.jsonl", None);
    let b1 = next(&mut source, 3).await;
    assert_eq!(ids(&b1), ["j1", "j2", "j3"]);
    drop(source);
    let mut source = env.open(&cfg, "*.jsonl", Some(&b1.checkpoint));
    let rest = drain(&mut source, 100).await;
    assert_eq!(all_ids(&rest), ["j4", "j5"]);
    assert_eq!(locations(&rest[0]), ["e.jsonl:line 6"]);
    assert_eq!(env.names("processed"), ["e.jsonl"]);
}

#[tokio::test]
async fn crash_after_commit_before_move_moves_without_rereading() {
    let env = Env::new();
    env.put("employees-1.csv", csv(1..=3), 60);
    let cfg = csv_config();
    let mut source = env.open(&cfg, "employees-*.csv", None);
    let b = next(&mut source, 10).await;
    assert_eq!(ids(&b), ["1", "2", "3"]);
    assert!(complete(&b.checkpoint));
    drop(source); // committed by the engine, then the process died before `committed`
    assert_eq!(env.names("inbox"), ["employees-1.csv"]);

    let mut source = env.open(&cfg, "employees-*.csv", Some(&b.checkpoint));
    assert!(env.names("inbox").is_empty());
    assert_eq!(env.names("processed"), ["employees-1.csv"]);
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert_eq!(source.stats().records, 0);
}

#[tokio::test]
async fn keep_mode_remembers_files_instead_of_moving_them() {
    let env = Env::new();
    env.put("employees-a.csv", csv(1..=2), 300);
    env.put("employees-bad.csv", "name\nx\n", 200);
    let cfg = config(FileFormat::Csv, AfterProcessing::Keep);

    let mut source = env.open(&cfg, "employees-*.csv", None);
    let batches = drain(&mut source, 10).await;
    assert_eq!(all_ids(&batches), ["1", "2"]);
    // The unreadable file: a batch of its own carrying the done list.
    let last = batches.last().unwrap();
    assert!(last.records.is_empty());
    assert_eq!(
        last.checkpoint["done"],
        json!([
            {"name": "employees-a.csv", "size": csv(1..=2).len(),
             "mtime_ms": batches[0].checkpoint["file"]["mtime_ms"]},
            {"name": "employees-bad.csv", "size": 7,
             "mtime_ms": last.checkpoint["done"][1]["mtime_ms"]},
        ])
    );
    assert_eq!(env.names("inbox"), ["employees-a.csv", "employees-bad.csv"]);
    assert!(!env.path("processed").exists());
    assert_eq!(env.names("failed"), ["employees-bad.csv.reason"]);
    assert_eq!(source.files_failed(), 1);
    assert!(source.next_batch(10).await.unwrap().is_none());

    // Restarted with the last checkpoint, a newer file waiting.
    env.put("employees-b.csv", csv(3..=3), 100);
    let mut source = env.open(&cfg, "employees-*.csv", Some(&last.checkpoint));
    let batches = drain(&mut source, 10).await;
    assert_eq!(all_ids(&batches), ["3"]);
    assert_eq!(source.files_failed(), 0);

    // A remembered file that leaves the inbox is forgotten.
    fs::remove_file(env.path("inbox/employees-a.csv")).unwrap();
    env.put("employees-c.csv", csv(4..=4), 50);
    let mut source = env.open(&cfg, "employees-*.csv", Some(&batches.last().unwrap().checkpoint));
    let batches = drain(&mut source, 10).await;
    assert_eq!(all_ids(&batches), ["4"]);
    let done: Vec<&str> = batches.last().unwrap().checkpoint["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(done, ["employees-bad.csv", "employees-b.csv", "employees-c.csv"]);
}

#[tokio::test]
async fn invalid_utf8_sets_the_file_aside_and_others_go_on() {
    let env = Env::new();
    let mut bad = csv(1..=2).into_bytes();
    let bad_at = bad.len() + 4;
    bad.extend_from_slice(b"3,Ze\xFFro,x\n");
    env.put("employees-1.csv", &bad, 120);
    env.put("employees-2.csv", csv(7..=8), 60);

    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    let batches = drain(&mut source, 10).await;
    assert_eq!(all_ids(&batches), ["7", "8"]);
    assert!(
        batches
            .iter()
            .all(|b| b.checkpoint["file"]["name"] == "employees-2.csv")
    );
    assert_eq!(env.names("failed"), ["employees-1.csv", "employees-1.csv.reason"]);
    assert_eq!(
        fs::read_to_string(env.path("failed/employees-1.csv.reason")).unwrap(),
        format!("invalid utf-8 at byte {bad_at}\n")
    );
    assert_eq!(fs::read(env.path("failed/employees-1.csv")).unwrap(), bad);
    assert_eq!(env.names("processed"), ["employees-2.csv"]);
    assert!(env.names("inbox").is_empty());
    assert_eq!(source.files_failed(), 1);
    assert_eq!(source.files_completed(), 1);
}

#[tokio::test]
async fn missing_id_column_sets_the_file_aside() {
    let env = Env::new();
    env.put("employees-1.csv", "id,name\n1,Ann\n", 60);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert_eq!(
        fs::read_to_string(env.path("failed/employees-1.csv.reason")).unwrap(),
        "missing column \"employee_id\"\n"
    );
    assert!(env.names("inbox").is_empty());
    assert_eq!(source.files_failed(), 1);
}

#[tokio::test]
async fn oversized_file_sets_the_file_aside() {
    let env = Env::new();
    let content = csv(1..=3);
    env.put("employees-1.csv", &content, 60);
    let cfg = FileSystemConfig {
        max_file_bytes: 20,
        ..csv_config()
    };
    let mut source = env.open(&cfg, "employees-*.csv", None);
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert_eq!(
        fs::read_to_string(env.path("failed/employees-1.csv.reason")).unwrap(),
        format!("file is {} bytes, over max_file_bytes 20\n", content.len())
    );
    assert_eq!(source.files_failed(), 1);
}

#[tokio::test]
async fn a_second_failed_file_of_the_same_name_does_not_overwrite_the_first() {
    let env = Env::new();
    env.put("employees.csv", "id\n1\n", 60);
    let mut source = env.open(&csv_config(), "employees*.csv", None);
    assert!(source.next_batch(10).await.unwrap().is_none());
    env.put("employees.csv", "x\n1\n", 30);
    let mut source = env.open(&csv_config(), "employees*.csv", None);
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert_eq!(
        env.names("failed"),
        [
            "employees.1.csv",
            "employees.1.csv.reason",
            "employees.csv",
            "employees.csv.reason"
        ]
    );
    assert_eq!(
        fs::read_to_string(env.path("failed/employees.1.csv")).unwrap(),
        "x\n1\n"
    );
}

#[tokio::test]
async fn broken_rows_become_rejects_with_lines_and_good_rows_go_on() {
    let env = Env::new();
    let long = "y".repeat(10_000);
    let content = format!(
        "{HEADER}1,\"Ann\nSmith\",x\n2,Bob\n,Carl,x\n3,{},x\n4,Dan,x\n5,{long}\n6,Eve,x\n",
        "z".repeat(200)
    );
    env.put("employees-1.csv", &content, 60);
    let cfg = FileSystemConfig {
        max_record_bytes: 128,
        ..csv_config()
    };
    let mut source = env.open(&cfg, "employees-*.csv", None);
    let batches = drain(&mut source, 100).await;
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(ids(b), ["1", "4", "6"]);
    assert_eq!(b.records[0].fields["name"], "Ann\nSmith");
    let got: Vec<(&str, &str)> = b
        .rejects
        .iter()
        .map(|r| (r.location.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("employees-1.csv:line 4", "row has 2 fields, header has 3"),
            ("employees-1.csv:line 5", "empty id in column \"employee_id\""),
            ("employees-1.csv:line 6", "record is over max_record_bytes 128"),
            ("employees-1.csv:line 8", "record is over max_record_bytes 128"),
        ]
    );
    assert_eq!(b.rejects[0].raw, "2,Bob");
    assert_eq!(b.rejects[2].raw.len(), 128);
    assert_eq!(source.stats().rejects, 4);

    // With a large record limit the long row is read, and its raw text is cut to 4 KiB.
    let env = Env::new();
    env.put("employees-1.csv", &content, 60);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    let b = &drain(&mut source, 100).await[0];
    assert_eq!(ids(b), ["1", "3", "4", "6"]);
    let long_reject = b.rejects.iter().find(|r| r.location.ends_with("line 8")).unwrap();
    assert_eq!(long_reject.reason, "row has 2 fields, header has 3");
    assert_eq!(long_reject.raw.len(), 4096);

    // JSONL.
    let env = Env::new();
    let content = concat!(
        "{\"employee_id\": \"a\"}\n",
        "not json\n",
        "[1, 2]\n",
        "{\"name\": \"no id\"}\n",
        "{\"employee_id\": \"\"}\n",
        "{\"employee_id\": \"b\"}\n",
    );
    env.put("e.jsonl", content, 60);
    let cfg = config(FileFormat::Jsonl, AfterProcessing::Move);
    let mut source = env.open(&cfg, "*.jsonl", None);
    let b = &drain(&mut source, 100).await[0];
    assert_eq!(ids(b), ["a", "b"]);
    assert_eq!(
        locations(b),
        ["e.jsonl:line 2", "e.jsonl:line 3", "e.jsonl:line 4", "e.jsonl:line 5"]
    );
    assert!(b.rejects[0].reason.starts_with("line is not json"));
    assert_eq!(b.rejects[1].reason, "line is not a json object");
    assert_eq!(b.rejects[2].reason, "missing id field \"employee_id\"");
    assert_eq!(b.rejects[2].raw, "{\"name\": \"no id\"}");
}

#[tokio::test]
async fn deleted_marker_makes_a_delete() {
    let env = Env::new();
    let content = "employee_id,name,updated_at,_deleted\n1,A,v1,false\n2,B,v2,true\n3,C,v3,TRUE\n4,D,v4,\n";
    env.put("employees-1.csv", content, 60);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    let b = &drain(&mut source, 100).await[0];
    let kinds: Vec<(&str, ChangeKind)> = b.records.iter().map(|r| (r.local_id.as_str(), r.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("1", ChangeKind::Upsert),
            ("2", ChangeKind::Delete),
            ("3", ChangeKind::Delete),
            ("4", ChangeKind::Upsert),
        ]
    );
    assert!(b.records[1].fields.is_empty());
    assert_eq!(b.records[1].version.as_deref(), Some("v2"));

    let env = Env::new();
    let content = concat!(
        "{\"employee_id\": 1, \"_deleted\": \"true\"}\n",
        "{\"employee_id\": 2, \"__deleted\": true}\n",
        "{\"employee_id\": 3, \"_deleted\": false}\n",
    );
    env.put("e.jsonl", content, 60);
    let mut source = env.open(&config(FileFormat::Jsonl, AfterProcessing::Move), "*.jsonl", None);
    let b = &drain(&mut source, 100).await[0];
    let kinds: Vec<ChangeKind> = b.records.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [ChangeKind::Delete, ChangeKind::Delete, ChangeKind::Upsert]);
}

#[tokio::test]
async fn files_are_taken_oldest_first_and_temporary_files_are_ignored() {
    let env = Env::new();
    env.put("employees-z.csv", csv(1..=1), 300);
    env.put("employees-a.csv", csv(2..=2), 200);
    env.put(".employees-hidden.csv", csv(3..=3), 400);
    env.put("employees-x.csv.tmp", csv(4..=4), 400);
    env.put("contractors-1.csv", csv(5..=5), 400);
    fs::create_dir(env.path("inbox/employees-dir.csv")).unwrap();
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    let batches = drain(&mut source, 10).await;
    assert_eq!(all_ids(&batches), ["1", "2"]);
    assert_eq!(
        env.names("inbox"),
        [
            ".employees-hidden.csv",
            "contractors-1.csv",
            "employees-dir.csv",
            "employees-x.csv.tmp"
        ]
    );
}

#[tokio::test]
async fn a_file_still_growing_is_not_taken_until_it_settles() {
    let env = Env::new();
    env.put("employees-1.csv", csv(1..=1), 60);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    // The writer appends between the opening listing and the next one.
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(env.path("inbox/employees-1.csv"))
        .unwrap();
    std::io::Write::write_all(&mut file, b"2,Name 2,x\n").unwrap();
    drop(file);
    assert!(source.next_batch(10).await.unwrap().is_none());
    // Unchanged since the last listing: taken, with the appended row.
    let batches = drain(&mut source, 10).await;
    assert_eq!(all_ids(&batches), ["1", "2"]);

    // With a long settle time, an unchanged file still waits.
    let env = Env::new();
    env.put("employees-1.csv", csv(1..=1), 60);
    let cfg = FileSystemConfig {
        settle_ms: 3_600_000,
        ..csv_config()
    };
    let mut source = env.open(&cfg, "employees-*.csv", None);
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert_eq!(env.names("inbox"), ["employees-1.csv"]);

    // A file that appears after the opening listing is taken at the second listing.
    let env = Env::new();
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    env.put("employees-1.csv", csv(1..=1), 60);
    assert!(source.next_batch(10).await.unwrap().is_none());
    assert_eq!(ids(&next(&mut source, 10).await), ["1"]);
}

#[tokio::test]
async fn lag_is_the_age_of_the_oldest_file_waiting() {
    let env = Env::new();
    let source = env.open(&csv_config(), "employees-*.csv", None);
    assert_eq!(source.lag_seconds(), 0.0);

    env.put("employees-1.csv", csv(1..=1), 3600);
    env.put("employees-2.csv", csv(2..=2), 60);
    let mut source = env.open(&csv_config(), "employees-*.csv", None);
    let lag = source.lag_seconds();
    assert!((3599.0..3700.0).contains(&lag), "lag {lag}");
    let b = next(&mut source, 10).await;
    source.committed(&b.checkpoint).await.unwrap();
    assert!(source.next_batch(10).await.unwrap().is_some());
    let lag = source.lag_seconds();
    assert!((59.0..160.0).contains(&lag), "lag {lag}");
}

#[tokio::test]
async fn open_refuses_bad_settings_and_checkpoints() {
    let env = Env::new();
    let no_inbox = FileSystemConfig::default();
    let e = FileSource::open("hr", &no_inbox, &link("*.csv"), env.base(), None)
        .err()
        .unwrap();
    assert_eq!((e.class, e.reason.as_str()), (ErrorClass::Fatal, "inbox is not set"));

    let e = FileSource::open("hr", &csv_config(), &link("a/*.csv"), env.base(), None)
        .err()
        .unwrap();
    assert_eq!(e.class, ErrorClass::Fatal);

    let cp = json!({"v": 1, "file": {"name": "x"}});
    let e = FileSource::open("hr", &csv_config(), &link("*.csv"), env.base(), Some(&cp))
        .err()
        .unwrap();
    assert_eq!((e.class, e.kind), (ErrorClass::Fatal, "checkpoint"));

    let missing = FileSystemConfig {
        inbox: Some("nowhere".into()),
        ..csv_config()
    };
    let e = FileSource::open("hr", &missing, &link("*.csv"), env.base(), None)
        .err()
        .unwrap();
    assert_eq!((e.class, e.kind), (ErrorClass::Transient, "not_found"));
}

// ---- sink ----

fn write(seq: u64, op: WriteOp, local_id: Option<&str>, fields: Value) -> Write {
    Write {
        seq,
        entity: "employee".into(),
        global_id: GlobalId::from_u128(0x1000 + u128::from(seq)),
        op,
        local_id: local_id.map(str::to_string),
        object: "employees-*.csv".into(),
        fields: fields.as_object().expect("fields are an object").clone(),
        expected_version: None,
    }
}

fn sink_config(format: FileFormat) -> FileSystemConfig {
    FileSystemConfig {
        export_dir: Some("out".into()),
        format,
        ..FileSystemConfig::default()
    }
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("export line is json"))
        .collect()
}

#[tokio::test]
async fn sink_writes_one_jsonl_file_per_batch_named_by_first_seq() {
    let env = Env::new();
    let mut sink = FileSink::open("payroll", &sink_config(FileFormat::Jsonl), env.base()).unwrap();
    let create = write(42, WriteOp::Create, None, json!({"name": "Ann", "age": 41}));
    let gid = create.global_id.to_string();
    let results = sink
        .apply(vec![
            create,
            write(43, WriteOp::Update, Some("E7"), json!({"name": "Bob"})),
            write(44, WriteOp::Delete, Some("E8"), json!({})),
            write(45, WriteOp::Update, None, json!({"name": "lost"})),
        ])
        .await;
    assert_eq!(results.len(), 4);
    assert_eq!(results[0].as_ref().unwrap().local_id, gid);
    assert_eq!(results[1].as_ref().unwrap().local_id, "E7");
    assert_eq!(results[2].as_ref().unwrap().local_id, "E8");
    let e = results[3].as_ref().unwrap_err();
    assert_eq!((e.class, e.kind), (ErrorClass::Permanent, "missing_id"));

    let name = "employees-00000000000000000042.jsonl";
    assert_eq!(env.names("out"), [name]);
    let lines = read_jsonl(&env.path("out").join(name));
    assert_eq!(
        lines,
        [
            json!({"op": "create", "id": gid, "global_id": gid, "seq": 42, "entity": "employee",
                   "object": "employees-*.csv", "fields": {"name": "Ann", "age": 41}}),
            json!({"op": "update", "id": "E7", "global_id": GlobalId::from_u128(0x1000 + 43),
                   "seq": 43, "entity": "employee", "object": "employees-*.csv",
                   "fields": {"name": "Bob"}}),
            json!({"op": "delete", "id": "E8", "global_id": GlobalId::from_u128(0x1000 + 44),
                   "seq": 44, "entity": "employee", "object": "employees-*.csv", "fields": {}}),
        ]
    );

    // The engine repeats the batch from the same first seq: the file is replaced.
    let results = sink
        .apply(vec![write(42, WriteOp::Create, None, json!({"name": "Ann B"}))])
        .await;
    assert!(results[0].is_ok());
    assert_eq!(env.names("out"), [name]);
    let lines = read_jsonl(&env.path("out").join(name));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["fields"], json!({"name": "Ann B"}));

    let results = sink
        .apply(vec![write(50, WriteOp::Update, Some("E7"), json!({}))])
        .await;
    assert!(results[0].is_ok());
    assert_eq!(env.names("out"), [name, "employees-00000000000000000050.jsonl"]);
    assert_eq!(sink.files_written(), 3);
    assert!(sink.apply(Vec::new()).await.is_empty());
    assert_eq!(sink.files_written(), 3);
}

#[tokio::test]
async fn sink_writes_csv_with_the_union_of_fields() {
    let env = Env::new();
    let mut sink = FileSink::open("payroll", &sink_config(FileFormat::Csv), env.base()).unwrap();
    let create = write(7, WriteOp::Create, None, json!({"name": "Doe, Jane", "age": 41}));
    let gid = create.global_id.to_string();
    let results = sink
        .apply(vec![
            create,
            write(
                8,
                WriteOp::Update,
                Some("E2"),
                json!({"name": "X", "active": true, "note": null}),
            ),
            write(9, WriteOp::Update, Some("E3"), json!({"id": "clash"})),
        ])
        .await;
    assert!(results[0].is_ok() && results[1].is_ok());
    assert_eq!(results[2].as_ref().unwrap_err().class, ErrorClass::Permanent);
    let name = "employees-00000000000000000007.csv";
    assert_eq!(env.names("out"), [name]);
    assert_eq!(
        fs::read_to_string(env.path("out").join(name)).unwrap(),
        format!("op,id,active,age,name,note\ncreate,{gid},,41,\"Doe, Jane\",\nupdate,E2,true,,X,\n")
    );
}

#[tokio::test]
async fn sink_failure_fails_every_write_of_the_batch() {
    let env = Env::new();
    let mut sink = FileSink::open("payroll", &sink_config(FileFormat::Jsonl), env.base()).unwrap();
    // Something that is not a directory where the export directory should be.
    fs::remove_dir(env.path("out")).unwrap();
    fs::write(env.path("out"), "").unwrap();
    let results = sink
        .apply(vec![
            write(1, WriteOp::Create, None, json!({})),
            write(2, WriteOp::Update, Some("E1"), json!({})),
        ])
        .await;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.is_err()));
    assert_eq!(sink.files_written(), 0);
}

#[tokio::test]
async fn sink_requires_an_export_dir() {
    let env = Env::new();
    let e = FileSink::open("payroll", &FileSystemConfig::default(), env.base())
        .err()
        .unwrap();
    assert_eq!(
        (e.class, e.reason.as_str()),
        (ErrorClass::Fatal, "export_dir is not set")
    );
}
