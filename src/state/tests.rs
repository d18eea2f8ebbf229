//! The state store against a model: random operations applied both to redb (through the
//! typed API, in transactions that sometimes abort, with the file sometimes reopened)
//! and to plain `BTreeMap`s must leave the same observable state.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::merge::WriteAction;
use crate::model::{Fields, RecordState};

const ENTITIES: &[&str] = &["contact", "employee"];
const SYSTEMS: &[&str] = &["crm", "hr", "lms"];

#[derive(Debug, Clone)]
enum Op {
    PutRecord {
        entity: usize,
        id: u8,
        value: u8,
    },
    RemoveRecord {
        entity: usize,
        id: u8,
    },
    PutIdentity {
        entity: usize,
        system: usize,
        local: u8,
        id: u8,
    },
    RemoveIdentity {
        entity: usize,
        system: usize,
        local: u8,
    },
    Enqueue {
        system: usize,
        id: u8,
    },
    RemoveOutboxAt {
        system: usize,
        index: usize,
    },
    PutCheckpoint {
        system: usize,
        value: u16,
    },
    /// A transaction that does work and then fails: nothing of it may remain.
    Aborted {
        entity: usize,
        id: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let e = 0..ENTITIES.len();
    let s = 0..SYSTEMS.len();
    prop_oneof![
        (e.clone(), 0u8..16, any::<u8>()).prop_map(|(entity, id, value)| Op::PutRecord { entity, id, value }),
        (e.clone(), 0u8..16).prop_map(|(entity, id)| Op::RemoveRecord { entity, id }),
        (e.clone(), s.clone(), 0u8..8, 0u8..16).prop_map(|(entity, system, local, id)| Op::PutIdentity {
            entity,
            system,
            local,
            id
        }),
        (e.clone(), s.clone(), 0u8..8).prop_map(|(entity, system, local)| Op::RemoveIdentity { entity, system, local }),
        (s.clone(), 0u8..16).prop_map(|(system, id)| Op::Enqueue { system, id }),
        (s.clone(), 0usize..4).prop_map(|(system, index)| Op::RemoveOutboxAt { system, index }),
        (s.clone(), any::<u16>()).prop_map(|(system, value)| Op::PutCheckpoint { system, value }),
        (e, 0u8..16).prop_map(|(entity, id)| Op::Aborted { entity, id }),
        Just(Op::Reopen),
    ]
}

fn gid(id: u8) -> GlobalId {
    GlobalId::from_u128(id as u128 + 1)
}

fn record(value: u8) -> RecordState {
    let mut state = RecordState {
        created_ms: value as i64,
        ..RecordState::default()
    };
    state.match_keys.insert("email".into(), format!("v{value}"));
    state
}

#[derive(Default)]
struct Model {
    records: BTreeMap<(usize, u8), u8>,
    identity: BTreeMap<(usize, usize, u8), u8>,
    outbox: BTreeMap<usize, Vec<(u64, u8)>>,
    checkpoints: BTreeMap<usize, u16>,
    next_seq: u64,
}

impl Model {
    fn count(&self, entity: usize, system: usize) -> u64 {
        self.identity
            .keys()
            .filter(|(e, s, _)| *e == entity && *s == system)
            .count() as u64
    }
}

#[derive(Debug)]
struct Abort;
impl From<StateError> for Abort {
    fn from(e: StateError) -> Self {
        panic!("state error in model test: {e}")
    }
}

fn apply(store: &StateStore, model: &mut Model, op: &Op) {
    match *op {
        Op::PutRecord { entity, id, value } => {
            // A batch commit: lazy under the model test's long durable interval.
            store
                .write_batch(true, |t| t.put_record(ENTITIES[entity], gid(id), &record(value)))
                .unwrap();
            model.records.insert((entity, id), value);
        }
        Op::RemoveRecord { entity, id } => {
            store.write(|t| t.remove_record(ENTITIES[entity], gid(id))).unwrap();
            model.records.remove(&(entity, id));
        }
        Op::PutIdentity {
            entity,
            system,
            local,
            id,
        } => {
            let new = store
                .write(|t| t.put_identity(ENTITIES[entity], SYSTEMS[system], &local.to_string(), gid(id)))
                .unwrap();
            let model_new = model.identity.insert((entity, system, local), id).is_none();
            assert_eq!(new, model_new, "put_identity reports whether the mapping is new");
        }
        Op::RemoveIdentity { entity, system, local } => {
            store
                .write(|t| t.remove_identity(ENTITIES[entity], SYSTEMS[system], &local.to_string()))
                .unwrap();
            model.identity.remove(&(entity, system, local));
        }
        Op::Enqueue { system, id } => {
            let seq = store
                .write(|t| {
                    t.enqueue(OutboxEntry {
                        seq: 0,
                        system: SYSTEMS[system].into(),
                        entity: "contact".into(),
                        global_id: gid(id),
                        action: WriteAction::Upsert { fields: Fields::new() },
                        source_system: "hr".into(),
                        source_time_ms: 0,
                        decision: 0,
                        enqueued_ms: 0,
                        attempts: 0,
                        last_error: None,
                    })
                })
                .unwrap();
            model.next_seq += 1;
            assert_eq!(seq, model.next_seq, "outbox sequence is dense and increasing");
            model.outbox.entry(system).or_default().push((seq, id));
        }
        Op::RemoveOutboxAt { system, index } => {
            let queue = model.outbox.entry(system).or_default();
            if index < queue.len() {
                let (seq, _) = queue.remove(index);
                let removed = store.write(|t| t.remove_outbox(SYSTEMS[system], seq)).unwrap();
                assert_eq!(removed.map(|e| e.seq), Some(seq));
            }
        }
        Op::PutCheckpoint { system, value } => {
            store
                .write(|t| t.put_checkpoint(SYSTEMS[system], "stream", &serde_json::json!(value)))
                .unwrap();
            model.checkpoints.insert(system, value);
        }
        Op::Aborted { entity, id } => {
            let result: Result<(), Abort> = store.write(|t| {
                t.put_record(ENTITIES[entity], gid(id), &record(255))?;
                t.put_identity(ENTITIES[entity], "crm", "aborted", gid(id))?;
                t.next_id("outbox")?;
                Err(Abort)
            });
            assert!(result.is_err());
        }
        Op::Reopen => {}
    }
}

fn check(store: &StateStore, model: &Model) {
    let view = store.read().unwrap();
    for (e, entity) in ENTITIES.iter().enumerate() {
        for id in 0u8..16 {
            let got = view.record(entity, gid(id)).unwrap().map(|r| r.created_ms as u8);
            assert_eq!(got, model.records.get(&(e, id)).copied(), "record {entity}/{id}");
        }
        for (s, system) in SYSTEMS.iter().enumerate() {
            for local in 0u8..8 {
                let got = view.identity(entity, system, &local.to_string()).unwrap();
                assert_eq!(
                    got,
                    model.identity.get(&(e, s, local)).map(|&id| gid(id)),
                    "identity {entity}/{system}/{local}"
                );
            }
            assert_eq!(
                view.identity(entity, system, "aborted").unwrap(),
                None,
                "aborted transaction left nothing"
            );
        }
    }
    for (s, system) in SYSTEMS.iter().enumerate() {
        let got: Vec<(u64, GlobalId)> = view
            .outbox(system, 100)
            .unwrap()
            .iter()
            .map(|e| (e.seq, e.global_id))
            .collect();
        let want: Vec<(u64, GlobalId)> = model
            .outbox
            .get(&s)
            .map(|q| q.iter().map(|&(seq, id)| (seq, gid(id))).collect())
            .unwrap_or_default();
        assert_eq!(got, want, "outbox of {system} in sequence order");
        assert_eq!(view.outbox_depth(system).unwrap(), want.len() as u64);
        let checkpoint = view
            .checkpoint(system, "stream")
            .unwrap()
            .and_then(|v| v.as_u64())
            .map(|v| v as u16);
        assert_eq!(checkpoint, model.checkpoints.get(&s).copied(), "checkpoint of {system}");
    }
    drop(view);
    store
        .write(|t| {
            for (e, entity) in ENTITIES.iter().enumerate() {
                for (s, system) in SYSTEMS.iter().enumerate() {
                    assert_eq!(
                        t.count(entity, system)?,
                        model.count(e, s),
                        "live count {entity}/{system}"
                    );
                }
            }
            Ok::<_, StateError>(())
        })
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn state_store_matches_a_btreemap_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::open(dir.path(), 4).unwrap();
        store.set_durable_interval(Duration::from_secs(3600));
        let mut model = Model::default();
        for op in &ops {
            if matches!(op, Op::Reopen) {
                drop(store);
                store = StateStore::open(dir.path(), 4).unwrap();
                store.set_durable_interval(Duration::from_secs(3600));
            }
            apply(&store, &mut model, op);
            check(&store, &model);
        }
    }
}

#[test]
fn a_file_from_another_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    match StateStore::open(dir.path(), 4) {
        Err(StateError::SchemaVersion { found, expected }) => {
            assert_eq!((found, expected), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a newer state file was opened"),
    }
}

#[test]
fn pruning_removes_the_oldest_beyond_count_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    store
        .write(|t| {
            for i in 0..10 {
                t.log_write(WriteLogEntry {
                    id: 0,
                    time_ms: i * 1000,
                    source_system: "hr".into(),
                    target_system: "crm".into(),
                    entity: "contact".into(),
                    global_id: gid(1),
                    op: "upsert".into(),
                    outcome: "ok".into(),
                    attempt: 1,
                    seq: i as u64,
                    error: None,
                })?;
            }
            Ok::<_, StateError>(())
        })
        .unwrap();
    // Keep at most 6, and nothing older than t = 5 s: entries at 5..=9 s remain.
    let removed = store.write(|t| t.prune(100, 6, 5_000)).unwrap();
    assert_eq!(removed, 5);
    let left: Vec<i64> = store
        .read()
        .unwrap()
        .write_log(None, 100)
        .unwrap()
        .iter()
        .map(|e| e.time_ms)
        .collect();
    assert_eq!(left, vec![9000, 8000, 7000, 6000, 5000]);
}

#[test]
fn a_version_1_file_with_json_records_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let id = GlobalId::new_v7();
    let mut state = RecordState::default();
    state.shadows.entry("hr".into()).or_default().local_id = Some("e1".into());
    state
        .shadows
        .entry("hr".into())
        .or_default()
        .fields
        .insert("title".into(), serde_json::json!("Engineer"));
    state.created_ms = 7;
    {
        // What a version-1 build left: JSON record rows and schema version 1.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 1).unwrap();
        let mut records = txn.open_table(RECORDS_V6).unwrap();
        let json = serde_json::to_vec(&state).unwrap();
        records.insert(("contact", id.as_u128()), json.as_slice()).unwrap();
        // A second entity, and one whose name extends the first's.
        records.insert(("account", id.as_u128()), json.as_slice()).unwrap();
        records.insert(("contacts", 1), json.as_slice()).unwrap();
        drop(records);
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    assert_eq!(
        store.read().unwrap().record("contact", id).unwrap(),
        Some(state.clone())
    );
    // Each entity's records moved to a table of its own; the old table is gone.
    let view = store.read().unwrap();
    assert_eq!(view.record("account", id).unwrap(), Some(state.clone()));
    assert_eq!(
        view.record("contacts", GlobalId::from_u128(1)).unwrap(),
        Some(state.clone())
    );
    assert_eq!(view.record("contacts", id).unwrap(), None);
    assert_eq!(view.record("employee", id).unwrap(), None);
    assert_eq!(view.records("contact").unwrap().len(), 1);
    assert_eq!(view.record_count().unwrap(), 3);
    drop(view);
    let names = {
        let txn = store.db.begin_read().unwrap();
        let mut names: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
        names.retain(|n| n.starts_with("records"));
        names.sort();
        names
    };
    assert_eq!(names, ["records.account", "records.contact", "records.contacts"]);
    let version = |store: &StateStore| {
        let txn = store.db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get("schema_version").unwrap().map(|v| v.value())
    };
    assert_eq!(version(&store), Some(SCHEMA_VERSION));

    state.updated_ms = 9;
    store.write(|t| t.put_record("contact", id, &state)).unwrap();
    let txn = store.db.begin_read().unwrap();
    let raw = txn
        .open_table(records_table("records.contact"))
        .unwrap()
        .get(id.as_u128())
        .unwrap()
        .unwrap();
    assert_eq!(raw.value()[0], encoding::RECORD_COMPACT);
    drop((raw, txn));
    assert_eq!(store.read().unwrap().record("contact", id).unwrap(), Some(state));
}

#[test]
fn a_shadow_changes_in_place_in_compact_binary_json_and_sealed_rows() {
    let mut state = RecordState::default();
    state.shadows.entry("hr".into()).or_default().local_id = Some("e1".into());
    state.match_keys.insert("email".into(), "a@example.com".into());
    state.created_ms = 7;
    let confirm = |s: &mut crate::model::Shadow| {
        let before = s.local_id.clone();
        s.local_id = Some("c9".into());
        s.fields.insert("Title".into(), serde_json::json!("Engineer"));
        before
    };
    let mut expected = state.clone();
    confirm(expected.shadows.entry("crm".into()).or_default());
    let raw_first_byte = |store: &StateStore, id: GlobalId| {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(records_table("records.contact")).unwrap();
        table.get(id.as_u128()).unwrap().unwrap().value()[0]
    };

    for kek in [None, Some(Kek::random())] {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open_with(dir.path(), 4, kek.as_ref()).unwrap();
        let [compact, binary, json, missing] = [(); 4].map(|_| GlobalId::new_v7());
        store.write(|t| t.put_record("contact", compact, &state)).unwrap();
        if kek.is_none() {
            // Rows as schema versions 2 to 7 and schema version 1 wrote them.
            let txn = store.db.begin_write().unwrap();
            let mut table = txn.open_table(records_table("records.contact")).unwrap();
            let older = encoding::encode_record_binary(&state);
            table.insert(binary.as_u128(), older.as_slice()).unwrap();
            table
                .insert(json.as_u128(), serde_json::to_vec(&state).unwrap().as_slice())
                .unwrap();
            drop(table);
            txn.commit().unwrap();
            assert_eq!(raw_first_byte(&store, binary), encoding::RECORD_BINARY);
        } else {
            store.write(|t| t.put_record("contact", binary, &state)).unwrap();
            store.write(|t| t.put_record("contact", json, &state)).unwrap();
        }
        let answers = store
            .write(|t| {
                Ok::<_, StateError>([
                    t.update_shadow("contact", compact, "crm", confirm)?,
                    t.update_shadow("contact", binary, "crm", confirm)?,
                    t.update_shadow("contact", json, "crm", confirm)?,
                    t.update_shadow("contact", missing, "crm", confirm)?,
                ])
            })
            .unwrap();
        assert_eq!(answers, [Some(None), Some(None), Some(None), None]);
        let view = store.read().unwrap();
        for id in [compact, binary, json] {
            assert_eq!(view.record("contact", id).unwrap(), Some(expected.clone()));
            if kek.is_none() {
                assert_eq!(raw_first_byte(&store, id), encoding::RECORD_COMPACT);
            }
        }
        assert_eq!(view.record("contact", missing).unwrap(), None);
    }
}

#[test]
fn a_version_2_file_with_json_outbox_entries_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let entry = OutboxEntry {
        seq: 3,
        system: "crm".into(),
        entity: "contact".into(),
        global_id: GlobalId::new_v7(),
        action: WriteAction::Upsert {
            fields: Fields::from_iter([("title".to_string(), serde_json::json!("Engineer"))]),
        },
        source_system: "hr".into(),
        source_time_ms: 11,
        decision: 4,
        enqueued_ms: 12,
        attempts: 1,
        last_error: Some("HTTP 503".into()),
    };
    {
        // What a version-2 build left: JSON outbox rows and schema version 2.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 2).unwrap();
        txn.open_table(OUTBOX)
            .unwrap()
            .insert(("crm", 3), serde_json::to_vec(&entry).unwrap().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    assert_eq!(store.read().unwrap().outbox("crm", 10).unwrap(), vec![entry.clone()]);
    let version = {
        let txn = store.db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get("schema_version").unwrap().map(|v| v.value())
    };
    assert_eq!(version, Some(SCHEMA_VERSION));

    let mut retried = entry.clone();
    retried.attempts = 2;
    store.write(|t| t.update_outbox(&retried)).unwrap();
    let txn = store.db.begin_read().unwrap();
    let raw = txn.open_table(OUTBOX).unwrap().get(("crm", 3)).unwrap().unwrap();
    assert_eq!(raw.value()[0], encoding::OUTBOX_BINARY);
    drop((raw, txn));
    assert_eq!(store.read().unwrap().outbox("crm", 10).unwrap(), vec![retried.clone()]);
    assert_eq!(store.write(|t| t.remove_outbox("crm", 3)).unwrap(), Some(retried));
    assert!(!store.write(|t| t.delete_outbox("crm", 3)).unwrap());
}

/// After an older file was opened and rows 4 on were written to `table`: the file is
/// marked with the current schema version, row 1 is still in the old layout (format
/// byte `old`, `{` for JSON) and row 4 is in the layout `new`.
fn assert_upgraded(store: &StateStore, table: redb::TableDefinition<u64, &[u8]>, old: u8, new: u8) {
    let txn = store.db.begin_read().unwrap();
    let version = txn.open_table(META).unwrap().get("schema_version").unwrap();
    assert_eq!(version.map(|v| v.value()), Some(SCHEMA_VERSION));
    let table = txn.open_table(table).unwrap();
    assert_eq!(table.get(1).unwrap().unwrap().value()[0], old);
    assert_eq!(table.get(4).unwrap().unwrap().value()[0], new);
}

#[test]
fn a_version_3_file_with_json_decisions_is_read_pruned_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let decision = |id: u64| crate::merge::Decision {
        id,
        time_ms: id as i64 * 1000,
        entity: "contact".into(),
        global_id: gid(id as u8),
        system: "hr".into(),
        local_id: format!("E{id}"),
        kind: crate::model::ChangeKind::Upsert,
        source_time_ms: 7,
        version: None,
        fields: vec![crate::merge::FieldDecision {
            field: "title".into(),
            rule: crate::merge::Rule::Owner,
            incoming: serde_json::json!("Engineer"),
            previous: Some(serde_json::json!("Intern")),
            conflict: false,
            policy: None,
        }],
        outcome: crate::merge::Outcome::Updated,
        flagged: false,
        writes: vec![],
    };
    {
        // What a version-3 build left: JSON decisions and schema version 3.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 3).unwrap();
        let mut table = txn.open_table(DECISIONS).unwrap();
        for id in 1..=3 {
            table
                .insert(id, serde_json::to_vec(&decision(id)).unwrap().as_slice())
                .unwrap();
        }
        drop(table);
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    store
        .write(|t| (4..=6).try_for_each(|id| t.put_decision(&decision(id))))
        .unwrap();
    // The three new decisions share one row, keyed by the first.
    assert_upgraded(&store, DECISIONS, b'{', encoding::DECISION_GROUP);
    let listed = store.read().unwrap().decisions(&DecisionFilter::default(), 10).unwrap();
    assert_eq!(listed, (1..=6).rev().map(decision).collect::<Vec<_>>());
    // Retention reads the time of both forms: nothing older than 2.5 s stays.
    assert_eq!(store.write(|t| t.prune(100, 100, 2_500)).unwrap(), 2);
    let listed = store.read().unwrap().decisions(&DecisionFilter::default(), 10).unwrap();
    assert_eq!(listed, (3..=6).rev().map(decision).collect::<Vec<_>>());
}

#[test]
fn a_version_4_file_with_a_json_write_log_is_read_pruned_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let attempt = |id: u64| WriteLogEntry {
        id,
        time_ms: id as i64 * 1000,
        source_system: "hr".into(),
        target_system: "crm".into(),
        entity: "contact".into(),
        global_id: gid(id as u8),
        op: "create".into(),
        outcome: "ok".into(),
        attempt: 1,
        seq: id,
        error: None,
    };
    {
        // What a version-4 build left: a JSON write log and schema version 4.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 4).unwrap();
        let mut table = txn.open_table(WRITE_LOG).unwrap();
        for id in 1..=3 {
            table
                .insert(id, serde_json::to_vec(&attempt(id)).unwrap().as_slice())
                .unwrap();
        }
        drop(table);
        txn.open_table(SEQUENCES).unwrap().insert("write_log", 4).unwrap();
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    store
        .write(|t| (4..=6).try_for_each(|id| t.log_write(attempt(id))))
        .unwrap();
    assert_upgraded(&store, WRITE_LOG, b'{', encoding::WRITE_LOG_BINARY);
    let listed = store.read().unwrap().write_log(None, 10).unwrap();
    assert_eq!(listed, (1..=6).rev().map(attempt).collect::<Vec<_>>());
    // Retention reads the time of both forms: nothing older than 2.5 s stays.
    assert_eq!(store.write(|t| t.prune(100, 100, 2_500)).unwrap(), 2);
    let listed = store.read().unwrap().write_log(None, 10).unwrap();
    assert_eq!(listed, (3..=6).rev().map(attempt).collect::<Vec<_>>());
}

#[test]
fn a_damaged_record_row_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    let id = GlobalId::new_v7();
    let txn = store.db.begin_write().unwrap();
    txn.open_table(records_table("records.contact"))
        .unwrap()
        .insert(id.as_u128(), [encoding::RECORD_BINARY, 0, 5].as_slice())
        .unwrap();
    txn.commit().unwrap();
    match store.read().unwrap().record("contact", id) {
        Err(StateError::Format { table: "records", .. }) => {}
        other => panic!("unexpected: {other:?}"),
    }
}

#[test]
fn group_commit_tokens_tell_when_a_batch_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    let put = |value: u8| move |t: &mut WriteTables<'_>| t.put_record("contact", gid(value), &record(value));

    // Without an interval every batch commit is durable.
    let ((), first) = store.write_batch(true, put(1)).unwrap();
    assert!(store.is_durable(first));
    assert!(!store.durable_pending());

    store.set_durable_interval(Duration::from_secs(3600));
    let ((), lazy) = store.write_batch(true, put(2)).unwrap();
    let ((), later) = store.write_batch(true, put(3)).unwrap();
    assert!(lazy < later);
    assert!(!store.is_durable(lazy) && !store.is_durable(later));
    assert!(store.durable_pending());
    // Lazy commits are visible at once.
    assert!(store.read().unwrap().record("contact", gid(3)).unwrap().is_some());
    // A batch that may not wait is durable at once, and so is everything before it.
    let ((), now) = store.write_batch(false, put(4)).unwrap();
    assert!(store.is_durable(now) && store.is_durable(lazy) && store.is_durable(later));
    assert!(!store.durable_pending());

    // A read view's token covers what it saw; make_durable makes it durable.
    let ((), again) = store.write_batch(true, put(5)).unwrap();
    let view = store.read().unwrap();
    let seen = store.latest_token();
    assert!(view.record("contact", gid(5)).unwrap().is_some());
    assert!(seen >= again && !store.is_durable(seen));
    store.make_durable().unwrap();
    assert!(store.is_durable(seen));
    // Nothing pending: no commit at all.
    let before = store.last_durable();
    store.make_durable().unwrap();
    assert_eq!(store.last_durable(), before);

    // Once the interval has passed since the last durable commit, the next batch commit
    // is durable itself.
    store.set_durable_interval(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(5));
    let ((), due) = store.write_batch(true, put(6)).unwrap();
    assert!(!store.durable_pending(), "the due commit covers every lazy one");
    // Its sync may still run behind it; waiting for it needs no further commit.
    let before = store.last_durable();
    store.make_durable().unwrap();
    assert_eq!(store.last_durable(), before);
    assert!(store.is_durable(due));
}

#[test]
fn a_batch_reads_its_rows_ahead_and_commits_as_any_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    store
        .write(|t| {
            for n in 0..50u8 {
                t.put_identity("contact", "hr", &format!("e{n}"), gid(n))?;
                t.put_record("contact", gid(n), &record(n))?;
            }
            Ok::<_, StateError>(())
        })
        .unwrap();
    // Ids the identity map knows, one it does not, and one whose record row is missing.
    store
        .write(|t| t.put_identity("contact", "hr", "orphan", gid(200)))
        .unwrap();
    let mut ids: Vec<String> = (0..50).map(|n| format!("e{n}")).collect();
    ids.extend(["unknown".to_string(), "orphan".to_string()]);
    let (written, token) = store
        .write_batch_read_ahead(true, "contact", "hr", ids, |t| {
            // Wait for the reader, so the count below is exact.
            let deadline = Instant::now() + Duration::from_secs(10);
            while store.rows_read_ahead() < 50 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            t.put_record("contact", gid(60), &record(60))?;
            Ok::<_, StateError>(60u8)
        })
        .unwrap();
    assert_eq!(written, 60);
    assert_eq!(
        store.rows_read_ahead(),
        50,
        "every record row the identity map points to, once"
    );
    assert!(store.is_durable(token), "no interval: durable");
    assert!(store.read().unwrap().record("contact", gid(60)).unwrap().is_some());

    // A run of ids the identity map does not know (a batch of new records) ends the
    // job: the known ids after it are not looked up.
    let (rows, looked_up) = (store.rows_read_ahead(), store.ids_read_ahead());
    let mut ids: Vec<String> = (0..100).map(|n| format!("new{n}")).collect();
    ids.extend((0..50).map(|n| format!("e{n}")));
    store
        .write_batch_read_ahead(true, "contact", "hr", ids, |_| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while store.ids_read_ahead() < looked_up + u64::from(super::READ_AHEAD_MISSES) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Room for a reader that would go on to the known ids.
            std::thread::sleep(Duration::from_millis(200));
            Ok::<_, StateError>(())
        })
        .unwrap();
    assert_eq!(
        store.ids_read_ahead() - looked_up,
        u64::from(super::READ_AHEAD_MISSES),
        "the job ends after a run of unknown ids"
    );
    assert_eq!(store.rows_read_ahead(), rows, "no record row read");

    // A failing batch commits nothing.
    let failed = store.write_batch_read_ahead(true, "contact", "hr", vec!["e1".into()], |t| {
        t.put_record("contact", gid(61), &record(61))?;
        Err::<(), _>(Abort)
    });
    assert!(failed.is_err());
    assert!(store.read().unwrap().record("contact", gid(61)).unwrap().is_none());

    // Turned off, nothing is read ahead.
    store.set_read_ahead(false);
    let before = store.rows_read_ahead();
    store
        .write_batch_read_ahead(true, "contact", "hr", vec!["e1".into(), "e2".into()], |_| {
            Ok::<_, StateError>(())
        })
        .unwrap();
    assert_eq!(store.rows_read_ahead(), before);

    // The reader does not keep the file open: the store reopens at once.
    store.set_read_ahead(true);
    drop(store);
    let store = StateStore::open(dir.path(), 4).unwrap();
    assert!(store.read().unwrap().record("contact", gid(60)).unwrap().is_some());
}

#[test]
fn a_second_handle_on_an_open_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    match StateStore::open(dir.path(), 4) {
        Err(StateError::InUse { .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a second handle opened the state file"),
    }
    drop(store);
    StateStore::open(dir.path(), 4).expect("reopens once the first handle is closed");
}

#[test]
fn a_version_5_file_with_tuple_keyed_identities_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What a version-5 build left: the identity map and the match index keyed by
        // redb tuples, under their old names.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 5).unwrap();
        let mut identity = txn.open_table(IDENTITY_V5).unwrap();
        identity.insert(("contact", "hr", "E1"), gid(1).as_u128()).unwrap();
        identity.insert(("contact", "crm", "003A"), gid(1).as_u128()).unwrap();
        identity.insert(("employee", "hr", "E1"), gid(2).as_u128()).unwrap();
        drop(identity);
        let mut index = txn.open_table(MATCH_INDEX_V5).unwrap();
        index
            .insert(("contact", "email", "ada@example.com"), gid(1).as_u128())
            .unwrap();
        drop(index);
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    let view = store.read().unwrap();
    assert_eq!(view.identity("contact", "hr", "E1").unwrap(), Some(gid(1)));
    assert_eq!(view.identity("contact", "crm", "003A").unwrap(), Some(gid(1)));
    assert_eq!(view.identity("employee", "hr", "E1").unwrap(), Some(gid(2)));
    assert_eq!(view.identity("employee", "crm", "003A").unwrap(), None);
    drop(view);
    store
        .write(|t| {
            assert_eq!(t.match_key("contact", "email", "ada@example.com")?, Some(gid(1)));
            assert_eq!(t.match_key("employee", "email", "ada@example.com")?, None);
            Ok::<_, StateError>(())
        })
        .unwrap();
    let txn = store.db.begin_read().unwrap();
    let version = txn.open_table(META).unwrap().get("schema_version").unwrap();
    assert_eq!(version.map(|v| v.value()), Some(SCHEMA_VERSION));
    let names: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
    assert!(
        !names.iter().any(|n| n == "identity" || n == "match_index"),
        "old tables are gone: {names:?}"
    );
    assert_eq!(txn.open_table(IDENTITY).unwrap().len().unwrap(), 3);
}

#[test]
fn forgetting_a_record_leaves_an_entity_whose_name_extends_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    let id = gid(7);
    store
        .write(|t| {
            for entity in ["contact", "contacts"] {
                t.put_identity(entity, "hr", "E7", id)?;
                t.put_match_key(entity, "email", "ada@example.com", id)?;
            }
            t.put_identity("contact", "crm", "003", id)?;
            t.put_identity("contact", "hr", "E8", gid(8))?;
            Ok::<_, StateError>(())
        })
        .unwrap();
    let report = store.forget("contact", id, "test").unwrap();
    assert_eq!((report.identities, report.match_keys), (2, 1));
    let view = store.read().unwrap();
    assert_eq!(view.identity("contact", "hr", "E7").unwrap(), None);
    assert_eq!(view.identity("contact", "crm", "003").unwrap(), None);
    assert_eq!(view.identity("contact", "hr", "E8").unwrap(), Some(gid(8)));
    assert_eq!(view.identity("contacts", "hr", "E7").unwrap(), Some(id));
    drop(view);
    store
        .write(|t| {
            assert_eq!(t.match_key("contact", "email", "ada@example.com")?, None);
            assert_eq!(t.match_key("contacts", "email", "ada@example.com")?, Some(id));
            Ok::<_, StateError>(())
        })
        .unwrap();
}

fn decision_of(id: u64, subject: GlobalId, time_ms: i64) -> crate::merge::Decision {
    crate::merge::Decision {
        id,
        time_ms,
        entity: "contact".into(),
        global_id: subject,
        system: "hr".into(),
        local_id: format!("E{id}"),
        kind: crate::model::ChangeKind::Upsert,
        source_time_ms: time_ms,
        version: None,
        fields: vec![],
        outcome: crate::merge::Outcome::Updated,
        flagged: false,
        writes: vec![],
    }
}

/// Stores decisions `ids` about `subject` at `time_ms`, all in one write transaction.
fn put_decisions(store: &StateStore, ids: std::ops::RangeInclusive<u64>, subject: GlobalId, time_ms: i64) {
    store
        .write(|t| {
            ids.clone()
                .try_for_each(|id| t.put_decision(&decision_of(id, subject, time_ms)))
        })
        .unwrap();
}

fn decision_rows(store: &StateStore) -> Vec<u64> {
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(DECISIONS).unwrap();
    table.iter().unwrap().map(|row| row.unwrap().0.value()).collect()
}

fn listed_ids(store: &StateStore, filter: &DecisionFilter, limit: usize) -> Vec<u64> {
    let view = store.read().unwrap();
    view.decisions(filter, limit).unwrap().iter().map(|d| d.id).collect()
}

#[test]
fn a_transaction_stores_its_decisions_in_one_row_and_they_list_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    put_decisions(&store, 1..=5, gid(1), 1_000);
    put_decisions(&store, 6..=7, gid(2), 2_000);
    store
        .write(|t| {
            t.put_decision(&decision_of(8, gid(1), 3_000))?;
            t.put_decision(&decision_of(9, gid(2), 3_000))
        })
        .unwrap();
    assert_eq!(decision_rows(&store), vec![1, 6, 8]);
    let all = DecisionFilter::default();
    assert_eq!(listed_ids(&store, &all, 100), (1..=9).rev().collect::<Vec<_>>());
    // A limit inside a row, and one at a row's end.
    assert_eq!(listed_ids(&store, &all, 3), vec![9, 8, 7]);
    assert_eq!(listed_ids(&store, &all, 4), vec![9, 8, 7, 6]);
    let about_one = DecisionFilter {
        global_id: Some(gid(1)),
        ..DecisionFilter::default()
    };
    assert_eq!(listed_ids(&store, &about_one, 100), vec![8, 5, 4, 3, 2, 1]);
    assert_eq!(listed_ids(&store, &about_one, 2), vec![8, 5]);
}

#[test]
fn a_full_group_starts_a_new_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    let n = DECISION_GROUP_MAX + 10;
    put_decisions(&store, 1..=n, gid(1), 1_000);
    assert_eq!(decision_rows(&store), vec![1, DECISION_GROUP_MAX + 1]);
    let listed = listed_ids(&store, &DecisionFilter::default(), usize::MAX);
    assert_eq!(listed, (1..=n).rev().collect::<Vec<_>>());
}

#[test]
fn a_group_of_large_decisions_is_closed_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    let large = |id: u64| {
        let mut d = decision_of(id, gid(1), 1_000);
        d.fields.push(crate::merge::FieldDecision {
            field: "note".into(),
            rule: crate::merge::Rule::Owner,
            incoming: serde_json::json!("x".repeat(10_000)),
            previous: None,
            conflict: false,
            policy: None,
        });
        d
    };
    store
        .write(|t| (1..=60).try_for_each(|id| t.put_decision(&large(id))))
        .unwrap();
    // About 10 KB each: a row closes with the decision that takes it to 256 KiB, the
    // 27th.
    let rows = decision_rows(&store);
    assert_eq!(rows, vec![1, 28, 55]);
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(DECISIONS).unwrap();
    for key in rows {
        let row = table.get(key).unwrap().unwrap();
        assert!(
            row.value().len() < DECISION_GROUP_MAX_BYTES + 11_000,
            "{}",
            row.value().len()
        );
    }
    drop((table, txn));
    let listed = listed_ids(&store, &DecisionFilter::default(), usize::MAX);
    assert_eq!(listed, (1..=60).rev().collect::<Vec<_>>());
}

#[test]
fn pruning_removes_whole_rows_beyond_count_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    put_decisions(&store, 1..=5, gid(1), 1_000);
    put_decisions(&store, 6..=7, gid(1), 2_000);
    put_decisions(&store, 8..=10, gid(1), 3_000);
    // Keep at least 5: the first row goes (5 remain), the second stays (3 would).
    assert_eq!(store.write(|t| t.prune(5, 100, 0)).unwrap(), 5);
    assert_eq!(decision_rows(&store), vec![6, 8]);
    assert_eq!(store.write(|t| t.prune(5, 100, 0)).unwrap(), 0);
    // Nothing older than 2.5 s: the row of 2 s goes, whatever the count.
    assert_eq!(store.write(|t| t.prune(100, 100, 2_500)).unwrap(), 2);
    let listed = listed_ids(&store, &DecisionFilter::default(), 100);
    assert_eq!(listed, vec![10, 9, 8]);
    // The newest row goes too once it is old enough.
    assert_eq!(store.write(|t| t.prune(100, 100, 3_001)).unwrap(), 3);
    assert!(decision_rows(&store).is_empty());
    assert_eq!(store.write(|t| t.prune(0, 0, 0)).unwrap(), 0);
}

#[test]
fn forgetting_a_record_rewrites_the_rows_that_mention_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 4).unwrap();
    let (gone, kept) = (gid(1), gid(2));
    store
        .write(|t| {
            t.put_decision(&decision_of(1, gone, 1_000))?;
            t.put_decision(&decision_of(2, kept, 1_000))?;
            t.put_decision(&decision_of(3, gone, 1_000))
        })
        .unwrap();
    put_decisions(&store, 4..=5, gone, 2_000);
    put_decisions(&store, 6..=6, kept, 3_000);
    let report = store.forget("contact", gone, "test").unwrap();
    assert_eq!(report.decisions, 4);
    // The mixed row keeps its key and the other record's decision; the row about the
    // forgotten record alone is gone.
    assert_eq!(decision_rows(&store), vec![1, 6]);
    assert_eq!(listed_ids(&store, &DecisionFilter::default(), 100), vec![6, 2]);
    let about_gone = DecisionFilter {
        global_id: Some(gone),
        ..DecisionFilter::default()
    };
    assert!(listed_ids(&store, &about_gone, 100).is_empty());
}

#[test]
fn a_version_6_file_with_a_decision_per_row_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What a version-6 build left: one binary decision per row.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 6).unwrap();
        let mut table = txn.open_table(DECISIONS).unwrap();
        for id in 1..=3 {
            let row = encoding::encode_decision(&decision_of(id, gid(1), id as i64 * 1000));
            table.insert(id, row.as_slice()).unwrap();
        }
        drop(table);
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    put_decisions(&store, 4..=5, gid(1), 5_000);
    assert_upgraded(&store, DECISIONS, encoding::DECISION_BINARY, encoding::DECISION_GROUP);
    assert_eq!(decision_rows(&store), vec![1, 2, 3, 4]);
    let listed = listed_ids(&store, &DecisionFilter::default(), 100);
    assert_eq!(listed, vec![5, 4, 3, 2, 1]);
    // Count: single rows count one each.
    assert_eq!(store.write(|t| t.prune(3, 100, 0)).unwrap(), 2);
    assert_eq!(decision_rows(&store), vec![3, 4]);
}

#[test]
fn a_version_7_file_with_records_without_references_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = record(3);
    state.base.fields.insert(
        "email".into(),
        crate::model::AgreedField {
            value: serde_json::json!("v3"),
            from: crate::model::Provenance {
                system: "hr".into(),
                version: None,
                source_time_ms: 5,
                rule: crate::merge::Rule::Owner,
                decision: 1,
            },
        },
    );
    let hr = state.shadows.entry("hr".into()).or_default();
    hr.fields.insert("email".into(), serde_json::json!("v3"));
    let (old, new) = (GlobalId::new_v7(), GlobalId::new_v7());
    {
        // What a version-7 build left: a record row without references.
        let store = StateStore::open(dir.path(), 4).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 7).unwrap();
        let row = encoding::encode_record_binary(&state);
        txn.open_table(records_table("records.contact"))
            .unwrap()
            .insert(old.as_u128(), row.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 4).unwrap();
    store.write(|t| t.put_record("contact", new, &state)).unwrap();
    let txn = store.db.begin_read().unwrap();
    let version = txn.open_table(META).unwrap().get("schema_version").unwrap();
    assert_eq!(version.map(|v| v.value()), Some(SCHEMA_VERSION));
    let table = txn.open_table(records_table("records.contact")).unwrap();
    let (old_row, new_row) = (
        table.get(old.as_u128()).unwrap().unwrap().value().to_vec(),
        table.get(new.as_u128()).unwrap().unwrap().value().to_vec(),
    );
    assert_eq!(old_row[0], encoding::RECORD_BINARY);
    assert_eq!(new_row[0], encoding::RECORD_COMPACT);
    // The shadow's and the match key's copies of the agreed value are references.
    assert!(
        new_row.len() < old_row.len(),
        "{} vs {} bytes",
        new_row.len(),
        old_row.len()
    );
    drop((table, txn));
    let view = store.read().unwrap();
    assert_eq!(view.record("contact", old).unwrap(), Some(state.clone()));
    assert_eq!(view.record("contact", new).unwrap(), Some(state));
}

#[test]
fn a_version_6_encrypted_file_keeps_its_sealed_records_when_they_move() {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::random();
    let (a, b) = (GlobalId::new_v7(), GlobalId::new_v7());
    {
        // Seal two records, then put their rows where a version-6 build kept them.
        let store = StateStore::open_with(dir.path(), 4, Some(&kek)).unwrap();
        store.write(|t| t.put_record("contact", a, &record(1))).unwrap();
        store.write(|t| t.put_record("employee", b, &record(2))).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("schema_version", 6).unwrap();
        for (entity, id) in [("contact", a), ("employee", b)] {
            let name = records_table_name(entity);
            let sealed = {
                let table = txn.open_table(records_table(&name)).unwrap();
                table.get(id.as_u128()).unwrap().unwrap().value().to_vec()
            };
            txn.delete_table(records_table(&name)).unwrap();
            txn.open_table(RECORDS_V6)
                .unwrap()
                .insert((entity, id.as_u128()), sealed.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = StateStore::open_with(dir.path(), 4, Some(&kek)).unwrap();
    let view = store.read().unwrap();
    assert_eq!(view.record("contact", a).unwrap(), Some(record(1)));
    assert_eq!(view.record("employee", b).unwrap(), Some(record(2)));
    // Still bound to its entity: the same id under another entity is not found.
    assert_eq!(view.record("employee", a).unwrap(), None);
}

#[test]
fn a_sealed_record_copied_to_another_entity_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open_with(dir.path(), 4, Some(&Kek::random())).unwrap();
    let id = GlobalId::new_v7();
    store.write(|t| t.put_record("contact", id, &record(1))).unwrap();
    store
        .write(|t| t.put_record("employee", GlobalId::new_v7(), &record(2)))
        .unwrap();
    let txn = store.db.begin_write().unwrap();
    let sealed = {
        let table = txn.open_table(records_table("records.contact")).unwrap();
        table.get(id.as_u128()).unwrap().unwrap().value().to_vec()
    };
    txn.open_table(records_table("records.employee"))
        .unwrap()
        .insert(id.as_u128(), sealed.as_slice())
        .unwrap();
    txn.commit().unwrap();
    match store.read().unwrap().record("employee", id) {
        Err(StateError::Tampered { table: "records" }) => {}
        other => panic!("unexpected: {other:?}"),
    }
    assert_eq!(store.read().unwrap().record("contact", id).unwrap(), Some(record(1)));
}
