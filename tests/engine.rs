//! The engine driven in-process: a real configuration, a real redb state file in a
//! temporary directory, and memory connectors standing in for the systems. System `a`
//! is a read-only source that owns `title`; system `b` is captured from and written to,
//! with its own field names, and can be scripted to fail. Each test runs the engine
//! until it is idle (every source drained, every outbox empty) and checks the end
//! state: what `b` holds, the identity map, shadows, decisions, the write log and the
//! dead-letter queue.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use concord::connector::memory::{MemorySink, MemorySource, MemoryTarget};
use concord::connector::{AnySink, AnySource, ConnectorError};
use concord::engine::runtime::Runtime;
use concord::engine::{Connectors, Engine, RunMode};
use concord::http::{ReplayError, ReplayOutcome};
use concord::merge::{Decision, Outcome, Rule, WriteAction, WriteMode};
use concord::model::{ChangeKind, GlobalId, RecordState, SourceRecord, WriteOp};
use concord::state::{DeadItem, DeadLetter, DeadLetterClass, DecisionFilter, ReadView, StateStore, WriteLogEntry};
use serde_json::{Map, Value, json};

const ENTITY: &str = "contact";
/// Far more than any test needs; a hang fails the test instead of blocking the suite.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

type Queue = Arc<Mutex<VecDeque<SourceRecord>>>;

/// The parts of the configuration a test varies; the rest is fixed below.
struct Setup {
    /// Extra lines under `[engine]`.
    engine: Vec<String>,
    /// Policy for `b`'s changes to `title`, which `a` owns.
    title_policy: &'static str,
    /// Extra lines on `b`'s link.
    b_link: Vec<String>,
    /// Extra lines under `[systems.b]`.
    b_system: Vec<String>,
}

impl Setup {
    fn new() -> Self {
        Self {
            engine: Vec::new(),
            title_policy: "revert",
            b_link: Vec::new(),
            b_system: Vec::new(),
        }
    }
    fn engine(mut self, line: &str) -> Self {
        self.engine.push(line.to_string());
        self
    }
    fn title_policy(mut self, policy: &'static str) -> Self {
        self.title_policy = policy;
        self
    }
    fn b_link(mut self, line: &str) -> Self {
        self.b_link.push(line.to_string());
        self
    }
    fn b_system(mut self, line: &str) -> Self {
        self.b_system.push(line.to_string());
        self
    }

    fn toml(&self) -> String {
        format!(
            r#"
[state]
dir = "state"

[engine]
backoff_min_ms = 5
backoff_max_ms = 50
{engine}

[systems.a]
type = "file"
direction = "read"
inbox = "in/a"

[systems.b]
type = "file"
inbox = "in/b"
export_dir = "out/b"
{b_system}

[entities.contact]
schema = "contact.schema.json"
match_keys = ["email"]

[entities.contact.fields.title]
owners = ["a"]
non_owner = "{policy}"

[entities.contact.delete]
max_share = 0.1
guard_min_records = 20

[[links]]
system = "a"
entity = "contact"
object = "contacts"
id_field = "id"
capture = {{ interval_secs = 1 }}
map = [
  {{ canonical = "email", system = "email", transforms = ["trim", "lower"] }},
  {{ canonical = "first_name", system = "first" }},
  {{ canonical = "last_name", system = "last" }},
  {{ canonical = "title", system = "job_title" }},
  {{ canonical = "phone", system = "phone", transforms = ["empty_as_null", "e164"] }},
  {{ canonical = "company", system = "company" }},
]

[[links]]
system = "b"
entity = "contact"
object = "people"
id_field = "id"
capture = {{ interval_secs = 1 }}
map = [
  {{ canonical = "email", system = "mail" }},
  {{ canonical = "first_name", system = "given" }},
  {{ canonical = "last_name", system = "family" }},
  {{ canonical = "title", system = "role" }},
  {{ canonical = "phone", system = "tel" }},
  {{ canonical = "company", system = "org" }},
]
{b_link}
"#,
            engine = self.engine.join("\n"),
            policy = self.title_policy,
            b_link = self.b_link.join("\n"),
            b_system = self.b_system.join("\n"),
        )
    }

    /// Compiles the configuration over a fresh state file.
    fn build(self) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(
            root.join("schemas/contact.schema.json"),
            dir.path().join("contact.schema.json"),
        )
        .unwrap();
        let mut config = concord::config::parse(&self.toml()).unwrap();
        config.base_dir = dir.path().to_path_buf();
        let problems = concord::config::validate(&config);
        assert!(problems.is_empty(), "test configuration is invalid: {problems:?}");
        let store = StateStore::open(&config.base_dir.join(&config.state.dir), config.state.cache_mb).unwrap();
        let rt = Arc::new(Runtime::compile(config).unwrap());
        let queues = ["a", "b"].map(|s| (s.to_string(), Queue::default())).into();
        let targets = rt
            .writing_systems()
            .into_iter()
            .map(|s| {
                let target = MemoryTarget {
                    record_attempts: true,
                    ..MemoryTarget::default()
                };
                (s, Arc::new(Mutex::new(target)))
            })
            .collect();
        Harness {
            _dir: dir,
            rt,
            store,
            queues,
            targets,
        }
    }
}

/// A compiled configuration, its state store, and the memory systems the engine talks
/// to. Each `run` starts a fresh engine over the same store, as a restart would.
struct Harness {
    _dir: tempfile::TempDir,
    rt: Arc<Runtime>,
    store: StateStore,
    /// Changes waiting to be captured, by system.
    queues: BTreeMap<String, Queue>,
    /// What each written system holds, by system.
    targets: BTreeMap<String, Arc<Mutex<MemoryTarget>>>,
}

impl Harness {
    fn engine(&self) -> Engine {
        Engine::new(self.rt.clone(), self.store.clone())
    }

    fn connectors(&self) -> Connectors {
        let mut connectors = Connectors::default();
        for link in self.rt.links.iter().filter(|l| l.captures) {
            let queue = self.queues[&link.config.system].clone();
            connectors
                .sources
                .push((link.index, AnySource::Memory(MemorySource::new(queue, None))));
        }
        for (system, target) in &self.targets {
            connectors
                .sinks
                .insert(system.clone(), AnySink::Memory(MemorySink::new(target.clone())));
        }
        connectors
    }

    /// Runs a fresh engine until every source is drained and every outbox is empty.
    async fn run(&self) -> Engine {
        let engine = self.engine();
        tokio::time::timeout(RUN_TIMEOUT, engine.run(self.connectors(), RunMode::UntilIdle))
            .await
            .expect("the engine becomes idle");
        engine
    }

    fn push(&self, system: &str, records: impl IntoIterator<Item = SourceRecord>) {
        self.queues[system].lock().unwrap().extend(records);
    }

    fn target(&self, system: &str) -> MutexGuard<'_, MemoryTarget> {
        self.targets[system].lock().unwrap()
    }

    fn view(&self) -> ReadView {
        self.store.read().unwrap()
    }

    /// The global id concord gave the record `system` knows as `local_id`.
    fn gid(&self, system: &str, local_id: &str) -> GlobalId {
        self.view()
            .identity(ENTITY, system, local_id)
            .unwrap()
            .unwrap_or_else(|| panic!("{system}:{local_id} is in the identity map"))
    }

    fn record(&self, gid: GlobalId) -> RecordState {
        self.view().record(ENTITY, gid).unwrap().expect("record exists")
    }

    /// `b`'s record for the record `a` knows as `a_id`.
    fn b_record(&self, a_id: &str) -> Map<String, Value> {
        let local = self.b_id(a_id);
        self.target("b").records[&local].clone()
    }

    /// `b`'s id for the record `a` knows as `a_id`, from the shadow.
    fn b_id(&self, a_id: &str) -> String {
        let state = self.record(self.gid("a", a_id));
        state.shadows["b"].local_id.clone().expect("b's id is known")
    }

    /// Every decision, oldest first.
    fn decisions(&self) -> Vec<Decision> {
        self.decisions_where(&DecisionFilter::default())
    }

    fn decisions_where(&self, filter: &DecisionFilter) -> Vec<Decision> {
        let mut d = self.view().decisions(filter, usize::MAX).unwrap();
        d.reverse();
        d
    }

    /// Write-log entries for `system`, oldest first.
    fn write_log(&self, system: &str) -> Vec<WriteLogEntry> {
        let mut log = self.view().write_log(Some(system), usize::MAX).unwrap();
        log.reverse();
        log
    }

    /// Every dead letter, oldest first.
    fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut letters = self.view().dead_letters(None, usize::MAX).unwrap();
        letters.reverse();
        letters
    }

    fn outbox_depth(&self, system: &str) -> u64 {
        self.view().outbox_depth(system).unwrap()
    }

    /// Makes `b` fail its next writes with these errors, one per write.
    fn fail_b(&self, errors: impl IntoIterator<Item = ConnectorError>) {
        self.target("b").fail_next.extend(errors);
    }

    /// Changes a field of `b`'s copy of a record, as a user of `b` would, and returns the
    /// change `b`'s capture would report.
    fn edit_b(&self, local_id: &str, field: &str, value: Value) -> SourceRecord {
        let mut t = self.target("b");
        let record = t.records.get_mut(local_id).expect("b holds the record");
        record.insert(field.to_string(), value);
        upsert(local_id, record.clone())
    }

    /// What `b` would report for every record it holds.
    fn b_export(&self) -> Vec<SourceRecord> {
        let t = self.target("b");
        t.records
            .iter()
            .map(|(id, fields)| upsert(id, fields.clone()))
            .collect()
    }
}

fn upsert(local_id: &str, fields: Map<String, Value>) -> SourceRecord {
    SourceRecord {
        local_id: local_id.to_string(),
        kind: ChangeKind::Upsert,
        fields,
        version: None,
        source_time_ms: None,
    }
}

fn delete(local_id: &str) -> SourceRecord {
    SourceRecord {
        local_id: local_id.to_string(),
        kind: ChangeKind::Delete,
        fields: Map::new(),
        version: None,
        source_time_ms: None,
    }
}

/// Contact number `n` as system `a` exports it, with id `a-<n>`.
fn contact(n: u32) -> SourceRecord {
    let fields = json!({
        "email": format!("p{n}@example.com"),
        "first": format!("First{n}"),
        "last": format!("Last{n}"),
        "job_title": "Engineer",
        "phone": format!("+4420794{n:05}"),
        "company": "Acme",
    });
    upsert(&format!("a-{n}"), fields.as_object().unwrap().clone())
}

/// `record` with one system field set.
fn with(mut record: SourceRecord, field: &str, value: Value) -> SourceRecord {
    record.fields.insert(field.to_string(), value);
    record
}

/// Contact number `n` as `b` should hold it once concord wrote it.
fn in_b(n: u32) -> Map<String, Value> {
    json!({
        "mail": format!("p{n}@example.com"),
        "given": format!("First{n}"),
        "family": format!("Last{n}"),
        "role": "Engineer",
        "tel": format!("+4420794{n:05}"),
        "org": "Acme",
    })
    .as_object()
    .unwrap()
    .clone()
}

fn outcomes(log: &[WriteLogEntry]) -> Vec<(&str, u32)> {
    log.iter().map(|e| (e.outcome.as_str(), e.attempt)).collect()
}

/// Syncs contacts `1..=n` from `a` to `b`.
async fn synced(setup: Setup, n: u32) -> Harness {
    let h = setup.build();
    h.push("a", (1..=n).map(contact));
    h.run().await;
    assert_eq!(h.target("b").records.len(), n as usize, "initial sync");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_reaches_the_target_and_records_its_ids() {
    let h = Setup::new().build();
    h.push("a", (1..=5).map(contact));
    let engine = h.run().await;

    {
        let t = h.target("b");
        assert_eq!((t.creates, t.updates, t.deletes), (5, 0, 0));
        assert_eq!(t.attempts.len(), 5);
    }
    let mut b_ids = Vec::new();
    for n in 1..=5 {
        let gid = h.gid("a", &format!("a-{n}"));
        let state = h.record(gid);
        let local = state.shadows["b"].local_id.clone().expect("b's id is in the shadow");
        assert!(local.starts_with("m-"), "{local}");
        assert_eq!(h.gid("b", &local), gid, "b's id maps to the record");
        assert_eq!(h.target("b").records[&local], in_b(n));
        // What b holds is confirmed: nothing pending, the shadow equals the base.
        let shadow = &state.shadows["b"];
        assert!(shadow.pending.is_empty(), "{shadow:?}");
        assert_eq!(shadow.fields, state.base.values());
        b_ids.push(local);
    }
    b_ids.sort();
    b_ids.dedup();
    assert_eq!(b_ids.len(), 5, "every record has its own id in b");

    let log = h.write_log("b");
    assert_eq!(log.len(), 5);
    assert!(
        log.iter()
            .all(|e| e.outcome == "ok" && e.op == "upsert" && e.source_system == "a")
    );
    let decisions = h.decisions();
    assert_eq!(decisions.len(), 5);
    for d in &decisions {
        assert_eq!((d.system.as_str(), d.outcome), ("a", Outcome::Created));
        assert_eq!(d.writes.len(), 1);
        assert_eq!((d.writes[0].system.as_str(), d.writes[0].mode), ("b", WriteMode::Send));
        assert!(d.writes[0].seq.is_some());
    }
    assert_eq!(h.outbox_depth("b"), 0);
    let status = engine.status().snapshot();
    assert_eq!(status.systems["b"].writes_ok, 5);
    assert_eq!(status.links["a.contact"].captured, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applier_round_takes_at_most_the_systems_write_batch_size() {
    // Each capture batch commits 4 outbox entries at once; b's rounds take at most
    // engine.batch_size of them by default (b is a file system) and at most its own
    // write_batch_size when set.
    for (setup, limit) in [
        (Setup::new().engine("batch_size = 4"), 4),
        (
            Setup::new().engine("batch_size = 4").b_system("write_batch_size = 2"),
            2,
        ),
    ] {
        let h = setup.build();
        h.push("a", (1..=12).map(contact));
        h.run().await;
        let t = h.target("b");
        assert_eq!(t.records.len(), 12);
        assert_eq!(t.rounds.iter().sum::<usize>(), 12, "{:?}", t.rounds);
        assert!(t.rounds.iter().all(|&n| n <= limit), "limit {limit}: {:?}", t.rounds);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_our_own_writes_is_a_noop() {
    let h = synced(Setup::new(), 3).await;
    let attempts = h.target("b").attempts.len();

    h.push("b", h.b_export());
    h.run().await;

    let t = h.target("b");
    assert_eq!(
        (t.creates, t.updates, t.attempts.len()),
        (3, 0, attempts),
        "no new writes"
    );
    drop(t);
    let from_b: Vec<Decision> = h.decisions().into_iter().filter(|d| d.system == "b").collect();
    assert_eq!(from_b.len(), 3);
    for d in &from_b {
        assert_eq!(d.outcome, Outcome::Noop, "{d:?}");
        assert!(d.writes.is_empty(), "{d:?}");
    }
    assert_eq!(h.outbox_depth("b"), 0);
}

/// `b` changes `title`, which `a` owns.
async fn non_owner_changes_title(policy: &'static str) -> (Harness, String) {
    let h = synced(Setup::new().title_policy(policy), 1).await;
    let local = h.b_id("a-1");
    h.push("b", [h.edit_b(&local, "role", json!("Boss"))]);
    h.run().await;

    let d = h.decisions().pop().unwrap();
    assert_eq!((d.system.as_str(), d.outcome), ("b", Outcome::Noop));
    let title = d
        .fields
        .iter()
        .find(|f| f.field == "title")
        .expect("title was proposed");
    assert_eq!(title.rule, Rule::NonOwner);
    assert_eq!(serde_json::to_value(title.policy).unwrap(), json!(policy));
    let state = h.record(h.gid("a", "a-1"));
    assert_eq!(
        state.base.value("title"),
        Some(&json!("Engineer")),
        "the owner's value stays agreed"
    );
    (h, local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_owner_revert_writes_the_owners_value_back() {
    let (h, local) = non_owner_changes_title("revert").await;
    let t = h.target("b");
    assert_eq!(t.records[&local]["role"], "Engineer");
    assert_eq!(t.updates, 1);
    let last = t.attempts.last().unwrap();
    assert_eq!(
        (last.op, last.local_id.as_deref()),
        (WriteOp::Update, Some(local.as_str()))
    );
    drop(t);
    assert!(h.decisions_where(&flagged()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_owner_ignore_leaves_the_system_alone_until_the_owner_changes_the_field() {
    let (h, local) = non_owner_changes_title("ignore").await;
    assert_eq!(h.target("b").records[&local]["role"], "Boss");
    assert_eq!(h.target("b").updates, 0);
    assert!(h.decisions_where(&flagged()).is_empty());
    let state = h.record(h.gid("a", "a-1"));
    assert!(state.shadows["b"].diverged.contains("title"));

    // Once the owner changes the field, the new agreed value reaches b.
    h.push("a", [with(contact(1), "job_title", json!("Director"))]);
    h.run().await;
    assert_eq!(h.target("b").records[&local]["role"], "Director");
    assert_eq!(h.target("b").updates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_owner_flag_parks_the_decision_for_review() {
    let (h, local) = non_owner_changes_title("flag").await;
    assert_eq!(h.target("b").records[&local]["role"], "Boss");
    assert_eq!(h.target("b").updates, 0);
    let flagged = h.decisions_where(&flagged());
    assert_eq!(flagged.len(), 1);
    assert_eq!(
        (flagged[0].system.as_str(), flagged[0].local_id.as_str()),
        ("b", local.as_str())
    );
    assert!(flagged[0].writes.is_empty());
}

fn flagged() -> DecisionFilter {
    DecisionFilter {
        flagged_only: true,
        ..DecisionFilter::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_the_write_lands() {
    let h = Setup::new().engine("max_attempts = 5").build();
    h.fail_b((0..3).map(|_| ConnectorError::transient("unavailable", "service unavailable")));
    h.push("a", [contact(1)]);
    let engine = h.run().await;

    {
        let t = h.target("b");
        assert_eq!(
            t.attempts.iter().map(|a| a.failed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert!(t.attempts.iter().all(|a| a.op == WriteOp::Create));
        assert_eq!((t.creates, t.records.len()), (1, 1));
    }
    assert_eq!(h.b_record("a-1"), in_b(1));
    let log = h.write_log("b");
    assert_eq!(outcomes(&log), [("retry", 1), ("retry", 2), ("retry", 3), ("ok", 4)]);
    assert!(log.iter().all(|e| e.seq == log[0].seq), "one outbox entry: {log:?}");
    assert_eq!(log[0].error.as_deref(), Some("service unavailable"));
    let b = &engine.status().snapshot().systems["b"];
    assert_eq!(b.last_error.as_deref(), Some("service unavailable"));
    assert_eq!((b.writes_ok, b.writes_failed), (1, 3));
    assert!(h.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let wait = Duration::from_millis(300);
    let h = Setup::new().build();
    h.fail_b([ConnectorError::transient("rate_limited", "too many requests").with_retry_after(wait)]);
    h.push("a", [contact(1)]);
    h.run().await;

    let t = h.target("b");
    assert_eq!(t.attempts.len(), 2);
    let gap = t.attempts[1].at - t.attempts[0].at;
    assert!(gap >= wait, "second attempt after {gap:?}, asked to wait {wait:?}");
    assert_eq!(t.records.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_write_is_dead_lettered_and_can_be_replayed_once() {
    let h = Setup::new().build();
    h.fail_b([ConnectorError::permanent("rejected", "field rejected by the system")]);
    h.push("a", [contact(1)]);
    let engine = h.run().await;

    let gid = h.gid("a", "a-1");
    let letters = h.dead_letters();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.system.as_str(), letter.class),
        ("b", DeadLetterClass::WriteRejected)
    );
    assert_eq!(letter.reason, "field rejected by the system");
    let DeadItem::Write { entry } = &letter.item else {
        panic!("a write is dead-lettered: {letter:?}");
    };
    assert_eq!(entry.global_id, gid);
    let WriteAction::Upsert { fields } = &entry.action else {
        panic!("an upsert: {entry:?}");
    };
    assert_eq!(fields.get("email"), Some(&json!("p1@example.com")));
    assert_eq!(h.outbox_depth("b"), 0);
    assert!(h.target("b").records.is_empty());
    assert_eq!(outcomes(&h.write_log("b")), [("dead_letter", 1)]);

    let outcome = engine.replay(letter.id).unwrap();
    assert!(matches!(outcome, ReplayOutcome::Requeued { .. }), "{outcome:?}");
    h.run().await;
    assert_eq!(h.b_record("a-1"), in_b(1));
    assert_eq!(h.gid("b", &h.b_id("a-1")), gid);
    assert!(h.dead_letters().is_empty());
    assert!(matches!(engine.replay(letter.id), Err(ReplayError::NotFound(id)) if id == letter.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_an_old_write_does_not_undo_a_newer_agreed_value() {
    let h = synced(Setup::new(), 1).await;
    let local = h.b_id("a-1");
    // The Director title is refused by b; then the Owner title is agreed and written.
    h.fail_b([ConnectorError::permanent("rejected", "field rejected by the system")]);
    h.push("a", [with(contact(1), "job_title", json!("Director"))]);
    h.run().await;
    let letter = h.dead_letters().pop().expect("the refused write is dead-lettered");
    h.push("a", [with(contact(1), "job_title", json!("Owner"))]);
    h.run().await;
    assert_eq!(h.target("b").records[&local]["role"], "Owner");

    let engine = h.engine();
    assert!(matches!(engine.replay(letter.id), Ok(ReplayOutcome::Requeued { .. })));
    h.run().await;

    // b ends with what is agreed, and concord's view of b is what b holds.
    let state = h.record(h.gid("a", "a-1"));
    assert_eq!(state.base.value("title"), Some(&json!("Owner")));
    assert_eq!(h.target("b").records[&local]["role"], "Owner");
    assert_eq!(state.shadows["b"].fields.get("title"), Some(&json!("Owner")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_after_max_attempts() {
    let h = Setup::new().engine("max_attempts = 3").build();
    h.fail_b((0..10).map(|_| ConnectorError::transient("timeout", "request timed out")));
    h.push("a", [contact(1)]);
    h.run().await;

    {
        let t = h.target("b");
        assert_eq!(t.attempts.len(), 3, "exactly max_attempts attempts");
        assert_eq!(t.fail_next.len(), 7);
        assert!(t.records.is_empty());
    }
    let letters = h.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].system.as_str(), letters[0].class),
        ("b", DeadLetterClass::RetriesExhausted)
    );
    assert!(matches!(&letters[0].item, DeadItem::Write { entry } if entry.attempts == 3));
    assert_eq!(
        outcomes(&h.write_log("b")),
        [("retry", 1), ("retry", 2), ("dead_letter", 3)]
    );
    assert_eq!(h.outbox_depth("b"), 0);
    // The abandoned write is not pending any more: the next change plans it again.
    let state = h.record(h.gid("a", "a-1"));
    assert!(state.shadows.get("b").is_none_or(|s| s.pending.is_empty()), "{state:?}");
}

/// The process-wide metrics recorder, installed once for the tests that read counters.
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("no other recorder is installed in this test binary")
    })
}

/// The value of a counter with all of `labels`, 0 when absent.
fn counter(name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_changes_are_dead_lettered_and_the_rest_of_the_batch_syncs() {
    // Only this test makes changes of system `a` fail validation, so the counter is its own.
    let failures = || {
        counter(
            "concord_validation_failures_total",
            &[("system", "a"), ("entity", ENTITY)],
        )
    };
    let before = failures();
    let h = Setup::new().build();
    h.push(
        "a",
        [
            contact(1),
            with(contact(2), "email", json!("not an email")),
            with(contact(3), "phone", json!("call me")),
            contact(4),
        ],
    );
    let engine = h.run().await;

    let letters = h.dead_letters();
    let classes: Vec<(&str, DeadLetterClass)> = letters.iter().map(|l| (l.system.as_str(), l.class)).collect();
    assert_eq!(
        classes,
        [("a", DeadLetterClass::Validation), ("a", DeadLetterClass::Mapping)]
    );
    assert!(letters[0].reason.contains("email"), "{}", letters[0].reason);
    assert!(letters[1].reason.contains("phone"), "{}", letters[1].reason);
    for letter in &letters {
        assert!(!letter.reason.contains("not an email") && !letter.reason.contains("call me"));
        assert!(matches!(&letter.item, DeadItem::Change { record } if record.kind == ChangeKind::Upsert));
    }
    {
        let t = h.target("b");
        let mails: Vec<&Value> = t.records.values().map(|r| &r["mail"]).collect();
        assert_eq!(mails, [&json!("p1@example.com"), &json!("p4@example.com")]);
    }
    assert_eq!(
        h.view().records(ENTITY).unwrap().len(),
        2,
        "invalid changes make no record"
    );
    assert!(h.view().identity(ENTITY, "a", "a-2").unwrap().is_none());
    assert_eq!(engine.status().snapshot().links["a.contact"].dead_lettered, 2);
    assert_eq!(failures() - before, 2.0);

    // Replaying runs mapping and validation again: still invalid, so a new dead letter.
    let old = letters[0].id;
    let outcome = engine.replay(old).unwrap();
    let ReplayOutcome::DeadLetteredAgain { id } = outcome else {
        panic!("replay fails again: {outcome:?}");
    };
    assert_ne!(id, old);
    assert!(h.view().dead_letter(old).unwrap().is_none());
    let again = h.view().dead_letter(id).unwrap().expect("new dead letter");
    assert_eq!(again.class, DeadLetterClass::Validation);
    assert_eq!(again.item, letters[0].item);
    assert_eq!(failures() - before, 3.0);
    assert_eq!(h.target("b").records.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_record_with_the_same_match_key_is_not_merged() {
    let h = Setup::new().build();
    let twin = with(contact(2), "email", json!(" P1@Example.com "));
    h.push("a", [contact(1), twin]);
    h.run().await;

    let letters = h.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].class, DeadLetterClass::DuplicateMatchKey);
    assert!(matches!(&letters[0].item, DeadItem::Change { record } if record.local_id == "a-2"));
    assert!(h.view().identity(ENTITY, "a", "a-2").unwrap().is_none());
    let records = h.view().records(ENTITY).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].1.shadows["a"].local_id.as_deref(), Some("a-1"));
    assert_eq!(
        records[0].1.base.value("first_name"),
        Some(&json!("First1")),
        "the twin's values are not merged"
    );
    assert_eq!(h.target("b").records.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_records_writes_and_sends_none() {
    let h = Setup::new().b_link("dry_run = true").build();
    h.push("a", (1..=3).map(contact));
    h.run().await;

    assert!(h.target("b").attempts.is_empty());
    assert!(h.write_log("b").is_empty());
    let decisions = h.decisions();
    assert_eq!(decisions.len(), 3);
    for d in &decisions {
        assert_eq!(d.outcome, Outcome::Created);
        assert_eq!(d.writes.len(), 1, "{d:?}");
        assert_eq!((d.writes[0].mode, d.writes[0].seq), (WriteMode::DryRun, None));
        assert!(d.writes[0].fields.contains(&"email".to_string()));
    }
    let state = h.record(h.gid("a", "a-1"));
    assert!(!state.shadows.contains_key("b"), "nothing pending in b: {state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_writes_only_the_selected_records() {
    let h = Setup::new()
        .b_link(r#"rollout = { allow = ["P2@example.com"] }"#)
        .build();
    h.push("a", (1..=3).map(contact));
    h.run().await;

    {
        let t = h.target("b");
        assert_eq!(t.records.values().collect::<Vec<_>>(), [&in_b(2)]);
    }
    // Only a-2's decisions send to b; the others' writes are outside the rollout.
    let only_a2_sent = |decisions: Vec<Decision>| {
        assert_eq!(decisions.len(), 3, "{decisions:?}");
        for d in decisions {
            let mode = if d.local_id == "a-2" {
                WriteMode::Send
            } else {
                WriteMode::OutsideRollout
            };
            assert_eq!(d.writes.len(), 1, "{d:?}");
            assert_eq!(d.writes[0].mode, mode, "{d:?}");
            assert_eq!(d.writes[0].seq.is_some(), mode == WriteMode::Send);
        }
    };
    only_a2_sent(h.decisions());

    // Changes to records concord knows, from a link without a rollout of its own: b's
    // rollout still decides which reach b.
    h.push("a", (1..=3).map(|n| with(contact(n), "company", json!("Globex"))));
    h.run().await;
    let mut expected = in_b(2);
    expected.insert("org".into(), json!("Globex"));
    {
        let t = h.target("b");
        assert_eq!(t.records.values().collect::<Vec<_>>(), [&expected]);
    }
    only_a2_sent(h.decisions().split_off(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mass_delete_guard_holds_a_large_batch_and_passes_a_small_one() {
    let h = synced(Setup::new(), 30).await;

    h.push("a", (1..=10).map(|n| delete(&format!("a-{n}"))));
    h.run().await;
    let letters = h.dead_letters();
    assert_eq!(letters.len(), 10);
    assert!(
        letters
            .iter()
            .all(|l| l.class == DeadLetterClass::DeleteGuard && l.system == "a")
    );
    {
        let t = h.target("b");
        assert_eq!((t.records.len(), t.deletes), (30, 0));
    }
    assert!(!h.record(h.gid("a", "a-1")).base.deleted);

    h.push("a", [delete("a-11"), delete("a-12")]);
    h.run().await;
    let gone = h.view().records(ENTITY).unwrap();
    let deleted: Vec<&RecordState> = gone.iter().map(|(_, s)| s).filter(|s| s.base.deleted).collect();
    assert_eq!(deleted.len(), 2);
    let b_ids: Vec<String> = deleted
        .iter()
        .map(|s| s.shadows["b"].local_id.clone().unwrap())
        .collect();
    let t = h.target("b");
    assert_eq!((t.records.len(), t.deletes), (28, 2));
    for id in &b_ids {
        assert!(!t.records.contains_key(id));
    }
    drop(t);
    for id in &b_ids {
        assert!(
            h.view().identity(ENTITY, "b", id).unwrap().is_none(),
            "b's identity of {id} is dropped"
        );
    }
    assert_eq!(h.dead_letters().len(), 10, "no new dead letters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_delete_ignore_leaves_the_targets_record() {
    let h = synced(Setup::new().b_link(r#"on_delete = "ignore""#), 1).await;
    let local = h.b_id("a-1");
    h.push("a", [delete("a-1")]);
    h.run().await;

    let t = h.target("b");
    assert_eq!(t.records.get(&local), Some(&in_b(1)));
    assert_eq!((t.deletes, t.updates), (0, 0));
    drop(t);
    let state = h.record(h.gid("b", &local));
    assert!(state.base.deleted, "the record is ended");
    let d = h.decisions().pop().unwrap();
    assert_eq!((d.outcome, d.writes.len()), (Outcome::Deleted, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_delete_soft_delete_sets_the_field() {
    let h = synced(
        Setup::new().b_link(r#"on_delete = { soft_delete = { field = "archived", value = true } }"#),
        1,
    )
    .await;
    let local = h.b_id("a-1");
    h.push("a", [delete("a-1")]);
    h.run().await;

    let t = h.target("b");
    let mut expected = in_b(1);
    expected.insert("archived".into(), json!(true));
    assert_eq!(t.records.get(&local), Some(&expected));
    assert_eq!((t.deletes, t.updates), (0, 1));
    drop(t);
    let log = h.write_log("b");
    assert_eq!(
        log.last().map(|e| (e.op.as_str(), e.outcome.as_str())),
        Some(("soft_delete", "ok"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing_and_repeats_nothing() {
    const N: u32 = 60;
    let h = Setup::new().engine("batch_size = 10").build();
    // The first write is told to come back in an hour: the applier is backing off with
    // writes pending when shutdown comes.
    h.fail_b([
        ConnectorError::transient("rate_limited", "too many requests").with_retry_after(Duration::from_secs(3600))
    ]);
    let applied = h.target("b").applied.clone();
    h.push("a", (1..=N).map(contact));

    let engine = h.engine();
    let running = {
        let engine = engine.clone();
        let connectors = h.connectors();
        tokio::spawn(async move { engine.run(connectors, RunMode::Forever).await })
    };
    applied.notified().await;
    engine.shutdown_token().cancel();
    tokio::time::timeout(RUN_TIMEOUT, running)
        .await
        .expect("run returns after shutdown, without waiting out the retry")
        .unwrap();
    assert!(h.outbox_depth("b") > 0, "writes were pending at shutdown");

    h.run().await;
    let t = h.target("b");
    assert_eq!((t.creates, t.records.len()), (N as u64, N as usize));
    let mut applied_creates: BTreeMap<GlobalId, u32> = BTreeMap::new();
    for a in t.attempts.iter().filter(|a| !a.failed) {
        assert_eq!(a.op, WriteOp::Create, "{a:?}");
        *applied_creates.entry(a.global_id).or_default() += 1;
    }
    drop(t);
    assert_eq!(applied_creates.len(), N as usize);
    assert!(
        applied_creates.values().all(|&n| n == 1),
        "each record is created once: {applied_creates:?}"
    );
    for n in 1..=N {
        assert_eq!(h.b_record(&format!("a-{n}")), in_b(n));
    }
    assert!(h.queues["a"].lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_queued_together_are_coalesced_into_the_agreed_state() {
    // A new record changed twice before the applier sees it: one create, final values.
    let h = Setup::new().build();
    h.push("a", [contact(1), with(contact(1), "job_title", json!("Director"))]);
    h.run().await;
    {
        let t = h.target("b");
        assert_eq!(t.attempts.len(), 1, "one write for both changes");
        assert_eq!((t.creates, t.updates), (1, 0));
    }
    assert_eq!(h.b_record("a-1")["role"], "Director");
    let log = h.write_log("b");
    assert_eq!(log.len(), 2, "both outbox entries are settled: {log:?}");
    assert!(log.iter().all(|e| e.outcome == "ok"));

    // A held record changed in two fields by two changes: one update with both.
    let c = with(contact(1), "job_title", json!("Owner"));
    h.push("a", [c.clone(), with(c, "company", json!("Initech"))]);
    h.run().await;
    let t = h.target("b");
    assert_eq!(t.attempts.len(), 2);
    assert_eq!((t.creates, t.updates), (1, 1));
    drop(t);
    let state = h.record(h.gid("a", "a-1"));
    let b = h.b_record("a-1");
    assert_eq!((&b["role"], &b["org"]), (&json!("Owner"), &json!("Initech")));
    let shadow = &state.shadows["b"];
    assert!(shadow.pending.is_empty(), "{shadow:?}");
    assert_eq!(shadow.fields, state.base.values(), "b holds the agreed record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_queued_behind_its_records_create_waits_for_the_id_the_create_learns() {
    // One outbox entry per applier batch: the batch after a record's create is planned
    // while the create is with the system, before its id is known. The record's next
    // write must wait for the create to settle and go out as an update of that id, not
    // as a second create; the other record's create is not held up by it.
    let h = Setup::new().engine("batch_size = 1").build();
    let link = h.rt.links.iter().find(|l| l.config.system == "a").expect("a's link");
    let queued = [contact(1), with(contact(1), "job_title", json!("Director")), contact(2)];
    for record in queued {
        concord::engine::batch::commit(&h.store, &h.rt, link, &[record], &[], None, false).unwrap();
    }
    assert_eq!(h.outbox_depth("b"), 3, "create, update, create");
    h.run().await;

    let t = h.target("b");
    let sent: Vec<(WriteOp, Option<&str>)> = t.attempts.iter().map(|a| (a.op, a.local_id.as_deref())).collect();
    assert_eq!(
        sent,
        [
            (WriteOp::Create, None),
            (WriteOp::Update, Some("m-1")),
            (WriteOp::Create, None)
        ]
    );
    assert_eq!((t.creates, t.updates), (2, 1));
    drop(t);
    assert_eq!(h.b_record("a-1")["role"], "Director");
    assert_eq!(h.b_id("a-2"), "m-2");
    assert_eq!(h.outbox_depth("b"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_more_is_sent_to_a_system_between_its_refusal_and_the_back_off() {
    // One write per batch, so the next batch is already planned while the first one is
    // with the system. The system asks to wait after the first write: the planned batch
    // must wait too, not reach it in the meantime.
    let wait = Duration::from_millis(300);
    let h = Setup::new().engine("batch_size = 1").build();
    h.fail_b([ConnectorError::transient("rate_limited", "too many requests").with_retry_after(wait)]);
    let link = h.rt.links.iter().find(|l| l.config.system == "a").expect("a's link");
    for record in [contact(1), contact(2)] {
        concord::engine::batch::commit(&h.store, &h.rt, link, &[record], &[], None, false).unwrap();
    }
    h.run().await;

    let t = h.target("b");
    assert_eq!(
        t.attempts.iter().map(|a| a.failed).collect::<Vec<_>>(),
        [true, false, false]
    );
    let gap = t.attempts[1].at - t.attempts[0].at;
    assert!(gap >= wait, "next write after {gap:?}, asked to wait {wait:?}");
    assert_eq!((t.creates, t.records.len()), (2, 2));
}
