//! Offline upkeep of the state store: unlocking an encrypted store, rotating its keys,
//! and erasing one subject. Rotation and erasure run from the `concord state` commands
//! while the daemon is stopped (redb's file lock keeps them apart).

use std::collections::{BTreeMap, BTreeSet};

use redb::{Key, ReadableDatabase, ReadableTable, TableDefinition};
use secrecy::SecretBox;

use super::crypto::{self, Codec, INDEX_KEY_ID, Kek};
use super::tables::*;
use super::*;

/// How to rotate.
#[derive(Debug, Default)]
pub struct RotateOptions {
    /// A new key-encryption key: every data key is wrapped again under it. The
    /// configuration must name it before the daemon starts again.
    pub new_kek: Option<Kek>,
    /// Values re-sealed per transaction.
    pub chunk: usize,
    /// Stop after re-sealing this many values (the rotation stays pending and resumes
    /// on the next run). `None` finishes it.
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateReport {
    /// The data key new values are sealed with.
    pub key_id: u32,
    pub resealed: u64,
    /// Data keys deleted because no value uses them any more.
    pub retired: Vec<u32>,
    /// False when `limit` stopped the rotation before every value was re-sealed.
    pub complete: bool,
}

/// What `forget` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForgetReport {
    pub records: u64,
    pub identities: u64,
    pub match_keys: u64,
    pub outbox: u64,
    pub dead_letters: u64,
    pub decisions: u64,
    pub write_log: u64,
}

impl ForgetReport {
    pub fn total(&self) -> u64 {
        self.records
            + self.identities
            + self.match_keys
            + self.outbox
            + self.dead_letters
            + self.decisions
            + self.write_log
    }
}

fn meta_flag(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<Option<u64>, StateError> {
    Ok(meta.get(name)?.map(|v| v.value()))
}

type Deks = BTreeMap<u32, SecretBox<[u8; 32]>>;

impl StateStore {
    /// Builds the codec for this store, creating the first data key when a KEK is
    /// given for a store that has no values yet.
    pub(super) fn unlock(&self, kek: Option<&Kek>) -> Result<Codec, StateError> {
        let txn = self.db.begin_write()?;
        let encrypted = meta_flag(&txn.open_table(META)?, "encrypted")?.is_some();
        let codec = match (encrypted, kek) {
            (false, None) => {
                drop(txn);
                return Ok(Codec::plain());
            }
            (true, None) => return Err(StateError::KeyMissing),
            (true, Some(kek)) => {
                let (current, deks, index_key) = load_deks(&txn, kek)?;
                Codec::encrypted(current, &deks, &index_key)
            }
            (false, Some(kek)) => {
                if holds_sealable_values(&txn)? {
                    return Err(StateError::NotEncrypted);
                }
                let dek = crypto::new_dek();
                let index_key = crypto::new_dek();
                let mut keys = txn.open_table(KEYS)?;
                keys.insert(1, crypto::wrap_dek(kek, 1, &dek).as_slice())?;
                keys.insert(INDEX_KEY_ID, crypto::wrap_dek(kek, INDEX_KEY_ID, &index_key).as_slice())?;
                drop(keys);
                let mut meta = txn.open_table(META)?;
                meta.insert("encrypted", 1)?;
                meta.insert("current_key_id", 1)?;
                let deks = BTreeMap::from([(1, dek)]);
                Codec::encrypted(1, &deks, &index_key)
            }
        };
        txn.commit()?;
        Ok(codec)
    }

    /// Starts (or resumes) a key rotation: a new data key seals new values, every
    /// sealed value is re-sealed with it in chunks of `options.chunk`, and once none
    /// uses an older data key those keys are deleted. Each value carries its key id,
    /// so a rotation stopped midway leaves a readable store; running it again resumes
    /// with the same new key. With `options.new_kek`, every data key is re-wrapped.
    pub fn rotate_key(&mut self, kek: &Kek, options: RotateOptions) -> Result<RotateReport, StateError> {
        if !self.codec.is_encrypted() {
            return Err(StateError::NeedsEncryption);
        }
        let chunk = options.chunk.max(1);
        let txn = self.db.begin_write()?;
        let (mut current, mut deks, index_key) = load_deks(&txn, kek)?;
        {
            let mut meta = txn.open_table(META)?;
            let mut keys = txn.open_table(KEYS)?;
            if meta_flag(&meta, "rotating")?.is_none() {
                current = deks.keys().next_back().copied().unwrap_or(0) + 1;
                let wrap_with = options.new_kek.as_ref().unwrap_or(kek);
                let dek = crypto::new_dek();
                keys.insert(current, crypto::wrap_dek(wrap_with, current, &dek).as_slice())?;
                deks.insert(current, dek);
                meta.insert("current_key_id", u64::from(current))?;
                meta.insert("rotating", 1)?;
            }
            if let Some(new_kek) = &options.new_kek {
                for (id, dek) in &deks {
                    keys.insert(*id, crypto::wrap_dek(new_kek, *id, dek).as_slice())?;
                }
                keys.insert(
                    INDEX_KEY_ID,
                    crypto::wrap_dek(new_kek, INDEX_KEY_ID, &index_key).as_slice(),
                )?;
            }
        }
        {
            let codec = Codec::encrypted(current, &deks, &index_key);
            let mut tables = WriteTables::open(&txn, &codec)?;
            tables.audit(AuditEntry {
                id: 0,
                time_ms: crate::model::now_ms(),
                who: "cli".into(),
                action: "rotate_key".into(),
                target: format!("state key {current}"),
                from: "local".into(),
            })?;
            tables.flush()?;
        }
        txn.commit()?;
        self.codec = Arc::new(Codec::encrypted(current, &deks, &index_key));

        let mut budget = options.limit.unwrap_or(u64::MAX);
        let mut resealed = 0;
        for name in self.records_tables()? {
            let entity = &name[RECORDS_PREFIX.len()..];
            let aad = |raw: &[u8]| record_key(entity, u128::from_bytes(raw));
            resealed += self.reseal(records_table(&name), "records", &aad, current, chunk, &mut budget)?;
        }
        resealed += self.reseal(DECISIONS, "decisions", &<[u8]>::to_vec, current, chunk, &mut budget)?;
        resealed += self.reseal(
            DEAD_LETTERS,
            "dead_letters",
            &<[u8]>::to_vec,
            current,
            chunk,
            &mut budget,
        )?;
        resealed += self.reseal(OUTBOX, "outbox", &<[u8]>::to_vec, current, chunk, &mut budget)?;
        if budget == 0 && self.count_stale(current)? > 0 {
            return Ok(RotateReport {
                key_id: current,
                resealed,
                retired: Vec::new(),
                complete: false,
            });
        }

        let txn = self.db.begin_write()?;
        let retired: Vec<u32> = deks.keys().copied().filter(|id| *id != current).collect();
        {
            let mut keys = txn.open_table(KEYS)?;
            for id in &retired {
                keys.remove(*id)?;
            }
            txn.open_table(META)?.remove("rotating")?;
        }
        txn.commit()?;
        deks.retain(|id, _| *id == current);
        self.codec = Arc::new(Codec::encrypted(current, &deks, &index_key));
        Ok(RotateReport {
            key_id: current,
            resealed,
            retired,
            complete: true,
        })
    }

    /// Seals again with `current` every row of `def` sealed with another key; `aad` gives
    /// the associated data a row's value is bound to from its raw key.
    fn reseal<K: Key + 'static>(
        &self,
        def: TableDefinition<'_, K, &'static [u8]>,
        name: &'static str,
        aad: &dyn Fn(&[u8]) -> Vec<u8>,
        current: u32,
        chunk: usize,
        budget: &mut u64,
    ) -> Result<u64, StateError> {
        let stale = self.stale_keys(def, current)?;
        let mut done = 0;
        for keys in stale.chunks(chunk) {
            if *budget == 0 {
                break;
            }
            let txn = self.db.begin_write()?;
            {
                let mut table = txn.open_table(def)?;
                for raw in keys {
                    if *budget == 0 {
                        break;
                    }
                    let key = K::from_bytes(raw);
                    let bound = aad(raw);
                    let plain = match table.get(&key)? {
                        Some(v) => self.codec.open(name, &bound, v.value())?.into_owned(),
                        None => continue,
                    };
                    let sealed = self.codec.seal(name, &bound, plain);
                    table.insert(&key, sealed.as_slice())?;
                    *budget -= 1;
                    done += 1;
                }
            }
            txn.commit()?;
        }
        Ok(done)
    }

    /// Raw keys of the rows of one table not sealed with `current`.
    fn stale_keys<K: Key + 'static>(
        &self,
        def: TableDefinition<'_, K, &'static [u8]>,
        current: u32,
    ) -> Result<Vec<Vec<u8>>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(def)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            if crypto::sealed_key_id(v.value()) != Some(current) {
                out.push(key_bytes::<K>(&k.value()));
            }
        }
        Ok(out)
    }

    /// The names of every entity's records table.
    fn records_tables(&self) -> Result<Vec<String>, StateError> {
        Ok(records_table_names(self.db.begin_read()?.list_tables()?))
    }

    fn count_stale(&self, current: u32) -> Result<usize, StateError> {
        let mut records = 0;
        for name in self.records_tables()? {
            records += self.stale_keys(records_table(&name), current)?.len();
        }
        Ok(records
            + self.stale_keys(DECISIONS, current)?.len()
            + self.stale_keys(DEAD_LETTERS, current)?.len()
            + self.stale_keys(OUTBOX, current)?.len())
    }

    /// Key ids of the data keys the store holds (empty when unencrypted).
    pub fn key_ids(&self) -> Result<Vec<u32>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let id = row?.0.value();
            if id != INDEX_KEY_ID {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Key ids in use by the sealed values of every sealed table, with counts.
    pub fn key_ids_in_use(&self) -> Result<BTreeMap<u32, u64>, StateError> {
        let txn = self.db.begin_read()?;
        let mut out = BTreeMap::new();
        let mut count = |v: &[u8]| {
            if let Some(id) = crypto::sealed_key_id(v) {
                *out.entry(id).or_insert(0) += 1;
            }
        };
        for name in records_table_names(txn.list_tables()?) {
            for row in txn.open_table(records_table(&name))?.iter()? {
                count(row?.1.value());
            }
        }
        for row in txn.open_table(OUTBOX)?.iter()? {
            count(row?.1.value());
        }
        for row in txn.open_table(DECISIONS)?.iter()? {
            count(row?.1.value());
        }
        for row in txn.open_table(DEAD_LETTERS)?.iter()? {
            count(row?.1.value());
        }
        Ok(out)
    }

    /// Removes one subject from every table: the record, its identity and match-key
    /// entries (with the per-system counts), queued writes, dead letters, decisions and
    /// write-log entries about it. Writes an audit entry naming the subject but no value.
    /// Removed rows can linger in free pages of the file until they are reused or the
    /// file is compacted (see ARCHITECTURE.md, "Encryption at rest").
    pub fn forget(&self, entity: &str, id: GlobalId, who: &str) -> Result<ForgetReport, StateError> {
        self.write(|t| t.forget(entity, id, who))
    }
}

impl WriteTables<'_> {
    fn forget(&mut self, entity: &str, id: GlobalId, who: &str) -> Result<ForgetReport, StateError> {
        let gid = id.as_u128();
        let mut report = ForgetReport::default();
        // Every (system, local id) the record was known by, for dead-lettered changes.
        let mut local_ids: BTreeSet<(String, String)> = BTreeSet::new();

        if let Some(record) = self.record(entity, id)? {
            for (system, shadow) in &record.shadows {
                if let Some(local) = &shadow.local_id {
                    local_ids.insert((system.clone(), local.clone()));
                }
            }
            self.remove_record(entity, id)?;
            report.records = 1;
        }

        let mut identities = Vec::new();
        for key in keys_pointing_at(&self.identity, entity, gid)? {
            let (_, system, local) = split_path_key(&key).ok_or(StateError::KeyFormat { table: "identity_map" })?;
            identities.push((system.to_string(), local.to_string()));
        }
        for (system, local) in identities {
            self.remove_identity(entity, &system, &local)?;
            local_ids.insert((system, local));
            report.identities += 1;
        }

        for key in keys_pointing_at(&self.match_index, entity, gid)? {
            self.match_index.remove(key.as_slice())?;
            report.match_keys += 1;
        }

        let mut outbox = Vec::new();
        for row in self.outbox.iter()? {
            let (k, v) = row?;
            let (system, seq) = k.value();
            let entry: OutboxEntry = unseal_outbox(self.codec, &outbox_key(system, seq), v.value())?;
            if entry.entity == entity && entry.global_id == id {
                outbox.push((system.to_string(), seq));
            }
        }
        for (system, seq) in outbox {
            self.outbox.remove((system.as_str(), seq))?;
            report.outbox += 1;
        }

        let mut letters = Vec::new();
        for row in self.dead_letters.iter()? {
            let (k, v) = row?;
            let letter: DeadLetter = unseal(self.codec, "dead_letters", &id_key(k.value()), v.value())?;
            let about = letter.entity == entity
                && match &letter.item {
                    DeadItem::Write { entry } => entry.global_id == id,
                    DeadItem::Change { record } => {
                        local_ids.contains(&(letter.system.clone(), record.local_id.clone()))
                    }
                    DeadItem::Reject { .. } => false,
                };
            if about {
                letters.push(k.value());
            }
        }
        for key in letters {
            self.dead_letters.remove(key)?;
            report.dead_letters += 1;
        }

        // A row holds a group of decisions: a row with any about the subject is written
        // again without them, or removed when none are left.
        self.write_decision_group()?;
        let mut rewrites = Vec::new();
        for row in self.decisions.iter()? {
            let (k, v) = row?;
            let group = super::unseal_decisions(self.codec, &id_key(k.value()), v.value())?;
            if group.iter().any(|d| d.entity == entity && d.global_id == id) {
                rewrites.push((k.value(), group));
            }
        }
        for (key, group) in rewrites {
            let before = group.len();
            let mut kept = encoding::DecisionGroup::default();
            for d in group.iter().filter(|d| !(d.entity == entity && d.global_id == id)) {
                kept.push(d);
            }
            report.decisions += (before as u64) - kept.len();
            if kept.is_empty() {
                self.decisions.remove(key)?;
            } else {
                let sealed = self.codec.seal("decisions", &id_key(key), kept.take());
                self.decisions.insert(key, sealed.as_slice())?;
            }
        }

        let mut writes = Vec::new();
        for row in self.write_log.iter()? {
            let (k, v) = row?;
            let entry = super::decode_write_log(v.value())?;
            if entry.entity == entity && entry.global_id == id {
                writes.push(k.value());
            }
        }
        for key in writes {
            self.write_log.remove(key)?;
            report.write_log += 1;
        }

        self.audit(AuditEntry {
            id: 0,
            time_ms: crate::model::now_ms(),
            who: who.to_string(),
            action: "forget".into(),
            target: format!("{entity}/{id}"),
            from: "local".into(),
        })?;
        Ok(report)
    }
}

/// Unwraps every data key and the index key of an encrypted store; the current key id
/// comes from META.
/// The keys of one entity's rows, in a table keyed by `path_key`, whose global id is `gid`.
fn keys_pointing_at(
    table: &impl ReadableTable<&'static [u8], u128>,
    entity: &str,
    gid: u128,
) -> Result<Vec<Vec<u8>>, StateError> {
    let prefix = path_prefix(entity);
    let mut keys = Vec::new();
    for row in table.range(prefix.as_slice()..)? {
        let (k, v) = row?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        if v.value() == gid {
            keys.push(k.value().to_vec());
        }
    }
    Ok(keys)
}

fn load_deks(txn: &redb::WriteTransaction, kek: &Kek) -> Result<(u32, Deks, SecretBox<[u8; 32]>), StateError> {
    let meta = txn.open_table(META)?;
    let current = meta_flag(&meta, "current_key_id")?.unwrap_or(0) as u32;
    let keys = txn.open_table(KEYS)?;
    let mut deks = BTreeMap::new();
    for row in keys.iter()? {
        let (k, v) = row?;
        deks.insert(k.value(), crypto::unwrap_dek(kek, k.value(), v.value())?);
    }
    let index_key = deks
        .remove(&INDEX_KEY_ID)
        .ok_or(StateError::KeyRecord { key_id: INDEX_KEY_ID })?;
    if !deks.contains_key(&current) {
        return Err(StateError::KeyRecord { key_id: current });
    }
    Ok((current, deks, index_key))
}

fn holds_sealable_values(txn: &redb::WriteTransaction) -> Result<bool, StateError> {
    for name in records_table_names(txn.list_tables()?) {
        if !txn.open_table(records_table(&name))?.is_empty()? {
            return Ok(true);
        }
    }
    Ok(!txn.open_table(DECISIONS)?.is_empty()?
        || !txn.open_table(DEAD_LETTERS)?.is_empty()?
        || !txn.open_table(OUTBOX)?.is_empty()?)
}
