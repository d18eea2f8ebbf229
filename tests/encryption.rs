//! Encryption at rest, end to end: canary values planted through the real daemon and
//! the state API are searched for in the raw bytes of `concord.redb`; tampering, wrong
//! and missing keys, key rotation (complete and interrupted) and erasure are checked
//! through the API and the `concord state` commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use concord::merge::WriteAction;
use concord::model::{GlobalId, RecordState, SourceRecord};
use concord::state::{
    DeadItem, DeadLetter, DeadLetterClass, Kek, OutboxEntry, RotateOptions, STATE_FILE, StateError, StateStore,
};
use redb::ReadableTable;
use secrecy::SecretString;

const KEK_HEX: &str = "5eb63bbbe01eeed093cb22bb8f5acdc35eb63bbbe01eeed093cb22bb8f5acdc3";
const OTHER_KEK_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const CANARY_NAME: &str = "Zyxcanaryname";
const CANARY_EMAIL: &str = "canary.zyx@example.com";
const CANARY_PHONE: &str = "2125550199";
const DEAD_CANARY: &str = "deadlettercanaryqq";

fn kek(hex: &str) -> Kek {
    Kek::from_secret(&SecretString::from(hex.to_string())).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A copy of examples/hr-sync with one canary employee, an ephemeral admin port and,
/// when `encrypt`, `[state] encryption` pointing at a key file. Returns the config path.
fn example_copy(root: &Path, encrypt: bool) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("examples/hr-sync");
    std::fs::create_dir_all(root.join("schemas")).unwrap();
    std::fs::copy(
        repo.join("schemas/contact.schema.json"),
        root.join("schemas/contact.schema.json"),
    )
    .unwrap();
    for sub in ["inbox/hr", "inbox/lms"] {
        std::fs::create_dir_all(example.join(sub)).unwrap();
        for file in std::fs::read_dir(repo.join("examples/hr-sync").join(sub)).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), example.join(sub).join(file.file_name())).unwrap();
        }
    }
    let csv = std::fs::read_dir(example.join("inbox/hr"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut text = std::fs::read_to_string(&csv).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "1999,{CANARY_NAME},Canaryson,{CANARY_EMAIL},Canary Keeper,(212) 555-0199\n"
    ));
    std::fs::write(&csv, text).unwrap();
    let mut config = std::fs::read_to_string(repo.join("examples/hr-sync/concord.toml"))
        .unwrap()
        .replace("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:0\"");
    if encrypt {
        std::fs::write(example.join("state.key"), format!("{KEK_HEX}\n")).unwrap();
        config = config.replace(
            "[state]\ndir = \"state\"\n",
            "[state]\ndir = \"state\"\nencryption = { key = { file = \"state.key\" } }\n",
        );
        assert!(config.contains("encryption"), "example layout changed");
    }
    let path = example.join("concord.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn concord(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .env("CONCORD_LOG", "debug")
        .output()
        .unwrap()
}

fn run_once(config: &Path) -> String {
    let out = concord(&["run", "--once", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "concord run failed: {stderr}");
    stderr
}

fn state_dir(config: &Path) -> PathBuf {
    config.parent().unwrap().join("state")
}

fn raw_state(config: &Path) -> Vec<u8> {
    std::fs::read(state_dir(config).join(STATE_FILE)).unwrap()
}

/// Adds a dead letter and a queued write carrying the dead-letter canary.
fn plant_dead_letter(store: &StateStore, id: GlobalId) {
    let mut fields = serde_json::Map::new();
    fields.insert("first".into(), serde_json::json!(DEAD_CANARY));
    store
        .write(|t| {
            t.dead_letter(DeadLetter {
                id: 0,
                time_ms: 1,
                system: "hr".into(),
                entity: "contact".into(),
                class: DeadLetterClass::Validation,
                reason: "test".into(),
                item: DeadItem::Change {
                    record: SourceRecord {
                        local_id: "1999".into(),
                        kind: concord::model::ChangeKind::Upsert,
                        fields,
                        version: None,
                        source_time_ms: None,
                    },
                },
            })?;
            let mut set = concord::model::Fields::new();
            set.insert("first_name".into(), serde_json::json!(DEAD_CANARY));
            t.enqueue(OutboxEntry {
                seq: 0,
                system: "directory".into(),
                entity: "contact".into(),
                global_id: id,
                action: WriteAction::Upsert { fields: set },
                source_system: "hr".into(),
                source_time_ms: 1,
                decision: 0,
                enqueued_ms: 1,
                attempts: 0,
                last_error: None,
            })?;
            Ok::<_, StateError>(())
        })
        .unwrap();
}

fn canary_id(store: &StateStore) -> GlobalId {
    store
        .read()
        .unwrap()
        .identity("contact", "hr", "1999")
        .unwrap()
        .expect("the canary employee was captured")
}

#[test]
fn canaries_are_absent_from_an_encrypted_file_and_present_in_a_plain_one() {
    for encrypt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let config = example_copy(dir.path(), encrypt);
        let stderr = run_once(&config);
        assert!(!stderr.contains(KEK_HEX), "the state key appears in the log");
        for canary in [CANARY_NAME, CANARY_EMAIL, CANARY_PHONE] {
            assert!(
                !stderr.contains(canary),
                "record value {canary} appears in the debug log"
            );
        }
        assert!(
            stderr.contains("DEBUG") || stderr.contains("debug"),
            "the debug log was captured"
        );
        {
            let key = encrypt.then(|| kek(KEK_HEX));
            let store = StateStore::open_with(&state_dir(&config), 4, key.as_ref()).unwrap();
            let id = canary_id(&store);
            plant_dead_letter(&store, id);
            let record = store.read().unwrap().record("contact", id).unwrap().unwrap();
            assert_eq!(record.base.value("first_name"), Some(&serde_json::json!(CANARY_NAME)));
            let decisions = store
                .read()
                .unwrap()
                .decisions(
                    &concord::state::DecisionFilter {
                        global_id: Some(id),
                        ..Default::default()
                    },
                    10,
                )
                .unwrap();
            assert!(!decisions.is_empty(), "the canary has a decision");
        }
        let raw = raw_state(&config);
        for canary in [CANARY_NAME, CANARY_EMAIL, CANARY_PHONE, DEAD_CANARY] {
            assert_eq!(
                contains(&raw, canary),
                !encrypt,
                "canary {canary} with encryption {}",
                if encrypt { "on" } else { "off" }
            );
        }
        assert!(!contains(&raw, KEK_HEX), "the state key is in the state file");
    }
}

/// A store with a few sealed records, decisions, dead letters and queued writes.
fn seeded(dir: &Path, key: &Kek, n: u128) -> Vec<GlobalId> {
    let store = StateStore::open_with(dir, 4, Some(key)).unwrap();
    let ids: Vec<GlobalId> = (1..=n).map(GlobalId::from_u128).collect();
    store
        .write(|t| {
            for id in &ids {
                let state: RecordState = serde_json::from_value(serde_json::json!({
                    "base": {"fields": {}},
                    "shadows": {},
                    "match_keys": {"email": format!("{id}@example.com")},
                    "created_ms": 1,
                    "updated_ms": 1
                }))
                .unwrap();
                t.put_record("contact", *id, &state)?;
            }
            Ok::<_, StateError>(())
        })
        .unwrap();
    plant_dead_letter(&store, ids[0]);
    ids
}

fn read_all(dir: &Path, key: &Kek, ids: &[GlobalId]) -> Result<(), StateError> {
    let store = StateStore::open_with(dir, 4, Some(key))?;
    let view = store.read()?;
    for id in ids {
        assert!(view.record("contact", *id)?.is_some());
    }
    assert_eq!(view.dead_letters(None, 100)?.len(), 1);
    assert_eq!(view.outbox("directory", 100)?.len(), 1);
    Ok(())
}

#[test]
fn wrong_missing_and_late_keys_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ids = seeded(dir.path(), &kek(KEK_HEX), 3);
    read_all(dir.path(), &kek(KEK_HEX), &ids).unwrap();
    let error = StateStore::open_with(dir.path(), 4, Some(&kek(OTHER_KEK_HEX)))
        .err()
        .unwrap();
    assert!(matches!(error, StateError::WrongKey));
    assert_eq!(
        error.to_string(),
        "state key does not match the key that encrypted this store"
    );
    let error = StateStore::open(dir.path(), 4).err().unwrap();
    assert!(matches!(error, StateError::KeyMissing), "{error}");

    let plain = tempfile::tempdir().unwrap();
    let store = StateStore::open(plain.path(), 4).unwrap();
    plant_dead_letter(&store, ids[0]);
    drop(store);
    let error = StateStore::open_with(plain.path(), 4, Some(&kek(KEK_HEX)))
        .err()
        .unwrap();
    assert!(matches!(error, StateError::NotEncrypted), "{error}");
}

#[test]
fn a_changed_or_moved_value_is_reported_as_tampered() {
    let dir = tempfile::tempdir().unwrap();
    let key = kek(KEK_HEX);
    let ids = seeded(dir.path(), &key, 2);
    let path = dir.path().join(STATE_FILE);
    // The contact records' table: one per entity, keyed by global id.
    let records: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("records.contact");

    // Row 1's sealed value copied over row 2.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(records).unwrap();
            let one = table.get(1u128).unwrap().unwrap().value().to_vec();
            table.insert(2u128, one.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = StateStore::open_with(dir.path(), 4, Some(&key)).unwrap();
    assert!(store.read().unwrap().record("contact", ids[0]).unwrap().is_some());
    let error = store.read().unwrap().record("contact", ids[1]).err().unwrap();
    assert!(matches!(error, StateError::Tampered { table: "records" }), "{error}");
    assert!(error.to_string().contains("failed authentication"), "{error}");
    drop(store);

    // One flipped ciphertext byte.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(records).unwrap();
            let mut one = table.get(1u128).unwrap().unwrap().value().to_vec();
            let middle = one.len() / 2;
            one[middle] ^= 0x40;
            table.insert(1u128, one.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = StateStore::open_with(dir.path(), 4, Some(&key)).unwrap();
    let error = store.read().unwrap().record("contact", ids[0]).err().unwrap();
    assert!(matches!(error, StateError::Tampered { table: "records" }), "{error}");
}

#[test]
fn rotation_interrupted_midway_reads_and_finishes_with_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = kek(KEK_HEX);
    let ids = seeded(dir.path(), &key, 20);
    let mut store = StateStore::open_with(dir.path(), 4, Some(&key)).unwrap();
    assert_eq!(store.key_ids().unwrap(), vec![1]);

    let report = store
        .rotate_key(
            &key,
            RotateOptions {
                chunk: 4,
                limit: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(!report.complete);
    assert_eq!((report.key_id, report.resealed), (2, 7));
    let in_use = store.key_ids_in_use().unwrap();
    assert_eq!(in_use.get(&2), Some(&7));
    assert_eq!(
        in_use.get(&1),
        Some(&15),
        "20 records + a dead letter + a write, 7 re-sealed"
    );
    assert_eq!(store.key_ids().unwrap(), vec![1, 2]);
    drop(store);
    read_all(dir.path(), &key, &ids).unwrap();

    // Resumes with key 2 rather than starting key 3.
    let mut store = StateStore::open_with(dir.path(), 4, Some(&key)).unwrap();
    let report = store
        .rotate_key(
            &key,
            RotateOptions {
                chunk: 4,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(report.complete);
    assert_eq!(
        (report.key_id, report.resealed, report.retired.clone()),
        (2, 15, vec![1])
    );
    assert_eq!(store.key_ids().unwrap(), vec![2]);
    assert_eq!(
        store.key_ids_in_use().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(2, 22)]
    );
    let audit = store.read().unwrap().audit(10).unwrap();
    assert!(audit.iter().any(|a| a.action == "rotate_key" && a.who == "cli"));
    drop(store);
    read_all(dir.path(), &key, &ids).unwrap();

    // A new key-encryption key: the old one stops working, the new one reads all.
    let mut store = StateStore::open_with(dir.path(), 4, Some(&key)).unwrap();
    let report = store
        .rotate_key(
            &key,
            RotateOptions {
                new_kek: Some(kek(OTHER_KEK_HEX)),
                chunk: 100,
                limit: None,
            },
        )
        .unwrap();
    assert!(report.complete);
    assert_eq!(report.key_id, 3);
    drop(store);
    assert!(matches!(
        StateStore::open_with(dir.path(), 4, Some(&key)).err().unwrap(),
        StateError::WrongKey
    ));
    read_all(dir.path(), &kek(OTHER_KEK_HEX), &ids).unwrap();
}

#[test]
fn rotate_key_command_uses_the_configured_key_and_a_new_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = example_copy(dir.path(), true);
    run_once(&config);
    let new_key = dir.path().join("new.key");
    std::fs::write(&new_key, OTHER_KEK_HEX).unwrap();
    let out = concord(&[
        "state",
        "rotate-key",
        "--config",
        config.to_str().unwrap(),
        "--new-key-file",
        new_key.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rotation complete"), "{stdout}");
    assert!(!stdout.contains(OTHER_KEK_HEX) && !stdout.contains(KEK_HEX));
    let store = StateStore::open_with(&state_dir(&config), 4, Some(&kek(OTHER_KEK_HEX))).unwrap();
    assert_eq!(store.key_ids().unwrap(), vec![2]);
    let record = store
        .read()
        .unwrap()
        .record("contact", canary_id(&store))
        .unwrap()
        .unwrap();
    assert_eq!(record.base.value("first_name"), Some(&serde_json::json!(CANARY_NAME)));
    assert!(!contains(&raw_state(&config), OTHER_KEK_HEX));
}

#[test]
fn forget_removes_the_subject_everywhere_and_is_audited() {
    for encrypt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let config = example_copy(dir.path(), encrypt);
        run_once(&config);
        let key = encrypt.then(|| kek(KEK_HEX));
        let (id, shadows) = {
            let store = StateStore::open_with(&state_dir(&config), 4, key.as_ref()).unwrap();
            let id = canary_id(&store);
            plant_dead_letter(&store, id);
            let record = store.read().unwrap().record("contact", id).unwrap().unwrap();
            (id, record.shadows)
        };
        assert!(shadows.len() >= 2, "captured from hr and written to the directory");

        let out = concord(&[
            "state",
            "forget",
            "--config",
            config.to_str().unwrap(),
            "--entity",
            "contact",
            "--id",
            "hr:1999",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&format!("forgot contact/{id}")), "{stdout}");
        assert!(!stdout.contains(CANARY_NAME) && !stdout.contains(CANARY_EMAIL));

        let store = StateStore::open_with(&state_dir(&config), 4, key.as_ref()).unwrap();
        let view = store.read().unwrap();
        assert!(view.record("contact", id).unwrap().is_none());
        for (system, shadow) in &shadows {
            if let Some(local) = &shadow.local_id {
                assert_eq!(view.identity("contact", system, local).unwrap(), None, "{system}");
            }
        }
        let about = concord::state::DecisionFilter {
            global_id: Some(id),
            ..Default::default()
        };
        assert!(view.decisions(&about, 100).unwrap().is_empty());
        let letters = view.dead_letters(None, 1000).unwrap();
        assert!(!serde_json::to_string(&letters).unwrap().contains(DEAD_CANARY));
        assert!(letters.iter().all(|l| match &l.item {
            DeadItem::Write { entry } => entry.global_id != id,
            DeadItem::Change { record } => !(l.system == "hr" && record.local_id == "1999"),
            DeadItem::Reject { .. } => true,
        }));
        assert!(
            view.outbox("directory", 1000)
                .unwrap()
                .iter()
                .all(|e| e.global_id != id)
        );
        assert!(view.write_log(None, 10_000).unwrap().iter().all(|e| e.global_id != id));
        assert!(view.records("contact").unwrap().len() >= 2, "other records stay");
        let audit = view.audit(10).unwrap();
        let entry = audit.iter().find(|a| a.action == "forget").expect("forget is audited");
        assert_eq!(entry.target, format!("contact/{id}"));
        drop(view);
        drop(store);

        // After compaction the plain file no longer holds the erased values either.
        let raw = raw_state(&config);
        for canary in [CANARY_NAME, CANARY_EMAIL, DEAD_CANARY] {
            assert!(!contains(&raw, canary), "canary {canary} remains (encrypt {encrypt})");
        }
    }
}

#[test]
fn state_commands_refuse_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let config = example_copy(dir.path(), false);
    run_once(&config);
    let _held = StateStore::open(&state_dir(&config), 4).unwrap();
    let out = concord(&[
        "state",
        "forget",
        "--config",
        config.to_str().unwrap(),
        "--entity",
        "contact",
        "--id",
        "hr:1999",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is in use; stop concord first"), "{stderr}");
}
