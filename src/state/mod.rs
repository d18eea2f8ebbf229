//! The state store: everything concord remembers, in one redb file. Tables are defined
//! in [`tables`]; this module gives them typed access.
//!
//! Writes go through [`StateStore::write`], which opens every table once, hands a
//! [`WriteTables`] to the caller, and commits once: one durable commit per batch, not
//! per change. A crash before the commit leaves the previous state untouched (redb is
//! copy-on-write), which is what makes "acknowledge upstream only after commit" safe.
//!
//! Calls block on disk I/O; async callers run them in `spawn_blocking`.

pub mod crypto;
pub mod encoding;
mod maintenance;
mod sync_behind;
pub mod tables;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableHandle, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::merge::{Decision, WriteAction};
use crate::model::{GlobalId, RecordState, Shadow, SourceRecord, SourceReject, TimeMs};
use sync_behind::{SyncBehind, SyncBehindFile};
use tables::*;

pub use crypto::{Codec, Kek, KekError};
pub use maintenance::{ForgetReport, RotateOptions, RotateReport};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "concord.redb";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("the state file {path} is in use; stop concord first")]
    InUse { path: PathBuf },
    #[error("the state store is encrypted; configure [state] encryption with the key that encrypted it")]
    KeyMissing,
    #[error("state key does not match the key that encrypted this store")]
    WrongKey,
    #[error("the state store holds unencrypted values; encryption can only be turned on for a new state store")]
    NotEncrypted,
    #[error("this operation needs an encrypted state store")]
    NeedsEncryption,
    #[error("stored data key {key_id} is damaged")]
    KeyRecord { key_id: u32 },
    #[error("state store value in table {table} failed authentication: it was altered or moved from another row")]
    Tampered { table: &'static str },
    #[error("state store value in table {table} is sealed with data key {key_id}, which this store does not hold")]
    UnknownKeyId { table: &'static str, key_id: u32 },
    #[error("state store compaction failed")]
    Compaction(#[from] redb::CompactionError),
    #[error("state file has schema version {found}, this build reads version {expected}")]
    SchemaVersion { found: u64, expected: u64 },
    #[error("state store transaction failed")]
    Transaction(#[from] redb::TransactionError),
    #[error("state store table cannot be opened")]
    Table(#[from] redb::TableError),
    #[error("state store read or write failed")]
    Storage(#[from] redb::StorageError),
    #[error("state store commit failed")]
    Commit(#[from] redb::CommitError),
    #[error("state file sync failed")]
    Sync(#[source] std::io::Error),
    #[error("state store value in table {table} cannot be decoded")]
    Decode {
        table: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("state store value in table {table} cannot be decoded")]
    Format {
        table: &'static str,
        #[source]
        source: encoding::FormatError,
    },
    #[error("state store key in table {table} cannot be decoded")]
    KeyFormat { table: &'static str },
}

/// A write waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub seq: u64,
    pub system: String,
    pub entity: String,
    pub global_id: GlobalId,
    /// Canonical values to set (as agreed when the merge planned the write).
    pub action: WriteAction,
    /// The system whose change caused the write.
    pub source_system: String,
    pub source_time_ms: TimeMs,
    pub decision: u64,
    pub enqueued_ms: TimeMs,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Why something was dead-lettered; bounded, usable as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterClass {
    /// A source item that could not be read as a record.
    Unreadable,
    /// Mapping to canonical fields failed.
    Mapping,
    /// The mapped record does not satisfy the entity's schema.
    Validation,
    /// Two records in one system share a match key.
    DuplicateMatchKey,
    /// The batch would delete more than the guard allows.
    DeleteGuard,
    /// The system refused the write.
    WriteRejected,
    /// The write kept failing until the attempts ran out.
    RetriesExhausted,
}

impl DeadLetterClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterClass::Unreadable => "unreadable",
            DeadLetterClass::Mapping => "mapping",
            DeadLetterClass::Validation => "validation",
            DeadLetterClass::DuplicateMatchKey => "duplicate_match_key",
            DeadLetterClass::DeleteGuard => "delete_guard",
            DeadLetterClass::WriteRejected => "write_rejected",
            DeadLetterClass::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// What was dead-lettered, kept whole so it can be replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DeadItem {
    /// A captured record; replay runs it through mapping and merge again.
    Change { record: SourceRecord },
    /// A source item that was not a record; replay is not possible, fix the source.
    Reject { reject: SourceReject },
    /// A write; replay queues it again.
    Write { entry: OutboxEntry },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub time_ms: TimeMs,
    /// The system the item came from (changes) or was going to (writes).
    pub system: String,
    pub entity: String,
    pub class: DeadLetterClass,
    /// Why, without record values.
    pub reason: String,
    pub item: DeadItem,
}

/// One write attempt, without values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteLogEntry {
    pub id: u64,
    pub time_ms: TimeMs,
    pub source_system: String,
    pub target_system: String,
    pub entity: String,
    pub global_id: GlobalId,
    pub op: String,
    /// ok, retry, dead_letter.
    pub outcome: String,
    pub attempt: u32,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One audited access through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: u64,
    pub time_ms: TimeMs,
    pub who: String,
    pub action: String,
    pub target: String,
    pub from: String,
}

/// Handle to the state file. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Seals and opens record-bearing values; plain for an unencrypted store.
    codec: Arc<Codec>,
    group: Arc<GroupCommit>,
    read_ahead: Arc<ReadAhead>,
}

/// What the read-ahead thread reads for one batch (see
/// [`StateStore::write_batch_read_ahead`]).
struct ReadAheadJob {
    entity: String,
    system: String,
    local_ids: Vec<String>,
    stop: Arc<AtomicBool>,
    /// Signalled when the job's read transaction has ended.
    done: std::sync::mpsc::SyncSender<()>,
}

/// The read-ahead thread, started on first use and ended when the last handle to the
/// store is dropped. It holds the database weakly, and only while a job runs, so
/// dropping the store still closes the file.
struct ReadAhead {
    enabled: AtomicBool,
    counts: Arc<ReadAheadCounts>,
    jobs: std::sync::OnceLock<std::sync::mpsc::Sender<ReadAheadJob>>,
}

/// What the read-ahead thread has done since the store was opened.
#[derive(Default)]
struct ReadAheadCounts {
    /// Local ids looked up, found or not.
    looked_up: AtomicU64,
    /// Record rows read.
    rows: AtomicU64,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            enabled: AtomicBool::new(true),
            counts: Arc::default(),
            jobs: std::sync::OnceLock::new(),
        }
    }
}

impl ReadAhead {
    /// Hands `job` to the thread; false when there is no thread to take it.
    fn send(&self, db: &Arc<Database>, job: ReadAheadJob) -> bool {
        let jobs = self.jobs.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<ReadAheadJob>();
            let db = Arc::downgrade(db);
            let counts = self.counts.clone();
            let spawned = std::thread::Builder::new()
                .name("concord-read-ahead".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if let Some(db) = db.upgrade()
                            && let Err(error) = touch_records(&db, &job, &counts)
                        {
                            tracing::debug!(error = %error, "read-ahead stopped");
                        }
                        let _ = job.done.send(());
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(error = %error, "cannot start the read-ahead thread; batches run without it");
            }
            tx
        });
        jobs.send(job).is_ok()
    }
}

/// Moves the identity map and the match index of a file older than schema version 6
/// from their tuple-keyed tables to the [`path_key`] tables, inside the transaction that
/// marks the file with the new version, and deletes the old tables.
fn upgrade_path_keys(txn: &redb::WriteTransaction) -> Result<(), StateError> {
    let names: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
    for (old, new) in [(IDENTITY_V5, IDENTITY), (MATCH_INDEX_V5, MATCH_INDEX)] {
        if !names.iter().any(|n| n == old.name()) {
            continue;
        }
        let mut moved = 0u64;
        {
            let from = txn.open_table(old)?;
            let mut to = txn.open_table(new)?;
            for row in from.iter()? {
                let (k, v) = row?;
                let (a, b, c) = k.value();
                to.insert(path_key(a, b, c).as_slice(), v.value())?;
                moved += 1;
            }
        }
        txn.delete_table(old)?;
        tracing::info!(table = new.name(), rows = moved, "state upgraded to schema version 6");
    }
    Ok(())
}

/// Moves the records of a file older than schema version 7 from [`RECORDS_V6`] to each
/// entity's table, inside the transaction that marks the file with the new version, and
/// deletes the old table. Values move as they are.
fn upgrade_records(txn: &redb::WriteTransaction) -> Result<(), StateError> {
    if !txn.list_tables()?.any(|t| t.name() == RECORDS_V6.name()) {
        return Ok(());
    }
    let mut moved = 0u64;
    {
        let from = txn.open_table(RECORDS_V6)?;
        let mut to: Option<(String, Table<'_, u128, &'static [u8]>)> = None;
        for row in from.iter()? {
            let (k, v) = row?;
            let (entity, id) = k.value();
            if to.as_ref().is_none_or(|(e, _)| e != entity) {
                let table = txn.open_table(records_table(&records_table_name(entity)))?;
                to = Some((entity.to_string(), table));
            }
            let (_, table) = to.as_mut().expect("opened above");
            table.insert(id, v.value())?;
            moved += 1;
        }
    }
    txn.delete_table(RECORDS_V6)?;
    tracing::info!(
        rows = moved,
        "state upgraded to schema version 7: records moved to a table per entity"
    );
    Ok(())
}

/// The names of the records tables among `tables` (a transaction's `list_tables`).
fn records_table_names(tables: impl Iterator<Item = redb::UntypedTableHandle>) -> Vec<String> {
    tables
        .map(|t| t.name().to_string())
        .filter(|name| name.starts_with(RECORDS_PREFIX))
        .collect()
}

/// One entity's records table, or `None` before its first record.
fn open_records(
    txn: &redb::ReadTransaction,
    entity: &str,
) -> Result<Option<redb::ReadOnlyTable<u128, &'static [u8]>>, StateError> {
    match txn.open_table(records_table(&records_table_name(entity))) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// A read-ahead job ends after this many local ids in a row that the identity map does
/// not know: the batch is one of new records (a bulk insert, an initial snapshot), and
/// looking up the rest would only cost the other core the same again.
const READ_AHEAD_MISSES: u32 = 64;

/// Reads, without decoding, the identity row of each local id of `job` and the record
/// row it points to, until the job is stopped or [`READ_AHEAD_MISSES`] ids in a row are
/// unknown.
fn touch_records(db: &Database, job: &ReadAheadJob, counts: &ReadAheadCounts) -> Result<(), StateError> {
    let txn = db.begin_read()?;
    let identity = txn.open_table(IDENTITY)?;
    let Some(records) = open_records(&txn, &job.entity)? else {
        return Ok(());
    };
    let (entity, system) = (job.entity.as_str(), job.system.as_str());
    let mut misses = 0;
    for local_id in &job.local_ids {
        if job.stop.load(Ordering::Relaxed) || misses == READ_AHEAD_MISSES {
            break;
        }
        counts.looked_up.fetch_add(1, Ordering::Relaxed);
        let Some(id) = identity.get(path_key(entity, system, local_id).as_slice())? else {
            misses += 1;
            continue;
        };
        misses = 0;
        if let Some(row) = records.get(id.value())? {
            std::hint::black_box(row.value().len());
            counts.rows.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Marks a commit made by [`StateStore::write_batch`]: durable once
/// [`StateStore::is_durable`] says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CommitToken(u64);

/// Group commit: batch commits within `interval` of the last durable commit are made
/// without an fsync (redb's `Durability::None`). A crash loses them whole, with the
/// checkpoints committed in them, so their sources deliver them again; nothing may act
/// on them outside the state store until a durable commit covers them.
///
/// Lazy commits are counted; the count is taken inside the write transaction, so a
/// durable commit, which cannot begin before an earlier writer has committed, covers
/// every lazy commit counted before it began.
///
/// A durable commit's sync runs behind it ([`sync_behind`]): the commit covers its lazy
/// commits at once, and they are durable when its sync generation has finished.
struct GroupCommit {
    /// Lazy commits begun so far.
    lazy: AtomicU64,
    /// The `lazy` count covered by the last durable commit, synced or not.
    covered: AtomicU64,
    /// The `lazy` count covered by a durable commit whose sync has finished.
    durable: AtomicU64,
    /// Durable commits whose sync may still run: (sync generation, `lazy` count covered).
    syncing: Mutex<std::collections::VecDeque<(u64, u64)>>,
    sync: SyncBehind,
    last_durable: Mutex<Instant>,
    interval_ms: AtomicU64,
}

impl GroupCommit {
    fn new(sync: SyncBehind) -> GroupCommit {
        GroupCommit {
            lazy: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            syncing: Mutex::default(),
            sync,
            last_durable: Mutex::new(Instant::now()),
            interval_ms: AtomicU64::new(0),
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    fn last_durable(&self) -> Instant {
        *self.last_durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a durable commit that covers `covered` lazy commits, durable once the
    /// sync asked for so far has finished.
    fn durable_committed(&self, covered: u64) {
        *self.last_durable.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.covered.fetch_max(covered, Ordering::SeqCst);
        let generation = self.sync.requested();
        self.syncing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((generation, covered));
    }

    /// The `lazy` count covered by finished syncs.
    fn durable(&self) -> u64 {
        let completed = self.sync.completed();
        let mut syncing = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(generation, covered)) = syncing.front() {
            if generation > completed {
                break;
            }
            self.durable.fetch_max(covered, Ordering::SeqCst);
            syncing.pop_front();
        }
        self.durable.load(Ordering::SeqCst)
    }

    /// Waits until every sync asked for so far has finished.
    fn wait_synced(&self) -> Result<(), StateError> {
        self.sync.wait_for(self.sync.requested()).map_err(StateError::Sync)?;
        self.durable();
        Ok(())
    }
}

impl StateStore {
    /// Opens (or creates) an unencrypted `dir/concord.redb` with a page cache of
    /// `cache_mb` MiB. Refuses an encrypted store.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<StateStore, StateError> {
        Self::open_with(dir, cache_mb, None)
    }

    /// Opens (or creates) `dir/concord.redb`. With a KEK, a new store is created
    /// encrypted and an encrypted store is unlocked (a KEK that did not wrap its data
    /// keys is refused); without one, only an unencrypted store opens.
    pub fn open_with(dir: &Path, cache_mb: u64, kek: Option<&Kek>) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(STATE_FILE);
        let open_error = |source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError::InUse { path: path.clone() },
            source => StateError::Open {
                path: path.clone(),
                source,
            },
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| open_error(e.into()))?;
        let (backend, sync) = SyncBehindFile::new(file).map_err(open_error)?;
        let db = Database::builder()
            .set_cache_size((cache_mb as usize).saturating_mul(1024 * 1024))
            .create_with_backend(backend)
            .map_err(open_error)?;
        let mut store = StateStore {
            db: Arc::new(db),
            path,
            codec: Arc::new(Codec::plain()),
            group: Arc::new(GroupCommit::new(sync)),
            read_ahead: Arc::default(),
        };
        store.init()?;
        store.codec = Arc::new(store.unlock(kek)?);
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether values are sealed, and with which data key.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Rewrites the file without free pages, so removed values stop occupying (and
    /// lingering in) the file. Needs the only handle to the store.
    pub fn compact(self) -> Result<bool, StateError> {
        let mut db = Arc::try_unwrap(self.db).map_err(|_| StateError::InUse {
            path: self.path.clone(),
        })?;
        Ok(db.compact()?)
    }

    fn init(&self) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(SCHEMA_VERSION) => {}
                Some(v) if UPGRADABLE_SCHEMA_VERSIONS.contains(&v) => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    upgrade_path_keys(&txn)?;
                    upgrade_records(&txn)?;
                }
                Some(v) => {
                    return Err(StateError::SchemaVersion {
                        found: v,
                        expected: SCHEMA_VERSION,
                    });
                }
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            // Create every table so readers never meet a missing one.
            txn.open_table(SEQUENCES)?;
            txn.open_table(IDENTITY)?;
            txn.open_table(MATCH_INDEX)?;
            txn.open_table(CHECKPOINTS)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(DEAD_LETTERS)?;
            txn.open_table(DECISIONS)?;
            txn.open_table(WRITE_LOG)?;
            txn.open_table(AUDIT)?;
            txn.open_table(COUNTS)?;
            txn.open_table(KEYS)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Runs `f` in one write transaction and commits it once, durably, if `f` succeeds:
    /// returns once the commit is synced.
    pub fn write<T, E: From<StateError>>(&self, f: impl FnOnce(&mut WriteTables<'_>) -> Result<T, E>) -> Result<T, E> {
        let (result, _) = self.commit_with(false, f)?;
        self.group.wait_synced()?;
        Ok(result)
    }

    /// Like [`write`](Self::write) for a captured batch: with `lazy` and a durable
    /// interval set, the commit skips the fsync unless the last durable commit is older
    /// than the interval, and when it does sync, returns without waiting for the sync.
    /// The token tells when the batch is durable; acknowledge its source only then.
    /// Without `lazy`, or without an interval, it returns once the batch is durable.
    pub fn write_batch<T, E: From<StateError>>(
        &self,
        lazy: bool,
        f: impl FnOnce(&mut WriteTables<'_>) -> Result<T, E>,
    ) -> Result<(T, CommitToken), E> {
        let interval = self.group.interval();
        if !lazy || interval.is_zero() {
            let committed = self.commit_with(false, f)?;
            self.group.wait_synced()?;
            return Ok(committed);
        }
        // A lazy batch due for durability commits durably and goes on while its sync
        // runs; the token tells when it is done.
        let lazy = self.group.last_durable().elapsed() < interval;
        self.commit_with(lazy, f)
    }

    /// Like [`write_batch`](Self::write_batch), while a second thread reads, over the
    /// last commit, the identity rows of `local_ids` (of `system`, for `entity`) and the
    /// record rows they point to: the rows a batch of changes to these records is about
    /// to read. Their pages are then in the page cache (shared by every transaction) when
    /// `f` gets to them, so a batch of changes spread over a large state waits on page
    /// reads on the other core. The reader only reads and `f` reads everything again in
    /// its own transaction, so what `f` sees never depends on it. The reader stops, and
    /// its read transaction ends, before the commit.
    pub fn write_batch_read_ahead<T, E: From<StateError>>(
        &self,
        lazy: bool,
        entity: &str,
        system: &str,
        local_ids: Vec<String>,
        f: impl FnOnce(&mut WriteTables<'_>) -> Result<T, E>,
    ) -> Result<(T, CommitToken), E> {
        let stop = Arc::new(AtomicBool::new(false));
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        let job = ReadAheadJob {
            entity: entity.to_string(),
            system: system.to_string(),
            local_ids,
            stop: stop.clone(),
            done,
        };
        // Best effort: without the reader the batch only runs without its read-ahead.
        let started = self.read_ahead.enabled.load(Ordering::Relaxed) && self.read_ahead.send(&self.db, job);
        self.write_batch(lazy, |tables| {
            let result = f(tables);
            stop.store(true, Ordering::Relaxed);
            if started {
                let _ = finished.recv();
            }
            result
        })
    }

    fn commit_with<T, E: From<StateError>>(
        &self,
        lazy: bool,
        f: impl FnOnce(&mut WriteTables<'_>) -> Result<T, E>,
    ) -> Result<(T, CommitToken), E> {
        let mut txn = self.db.begin_write().map_err(StateError::from)?;
        // Counted inside the transaction: no other writer is between its begin and commit.
        let token = if lazy {
            txn.set_durability(redb::Durability::None)
                .expect("a fresh write transaction takes any durability");
            self.group.lazy.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.group.lazy.load(Ordering::SeqCst)
        };
        let result = {
            let mut tables = WriteTables::open(&txn, &self.codec)?;
            let result = f(&mut tables)?;
            tables.flush()?;
            result
        };
        let started = Instant::now();
        let asked_before = self.group.sync.requested();
        txn.commit().map_err(StateError::from)?;
        metrics::histogram!(crate::metrics::STATE_COMMIT_DURATION,
            crate::metrics::LABEL_DURABILITY => if lazy { "lazy" } else { "durable" })
        .record(started.elapsed().as_secs_f64());
        if !lazy {
            // A durable commit asks for its sync; should one ever not, ask here, so its
            // tokens never count as durable on an earlier sync.
            if self.group.sync.requested() == asked_before {
                self.group.sync.request().map_err(StateError::Sync)?;
            }
            self.group.durable_committed(token);
        }
        Ok((result, CommitToken(token)))
    }

    /// Sets how long a batch commit may stay without an fsync (see
    /// [`write_batch`](Self::write_batch)); zero makes every commit durable.
    pub fn set_durable_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.group.interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Turns the read-ahead of [`write_batch_read_ahead`](Self::write_batch_read_ahead)
    /// on (the default) or off, for every handle to this store.
    pub fn set_read_ahead(&self, on: bool) {
        self.read_ahead.enabled.store(on, Ordering::Relaxed);
    }

    /// Record rows read ahead since the store was opened.
    pub fn rows_read_ahead(&self) -> u64 {
        self.read_ahead.counts.rows.load(Ordering::Relaxed)
    }

    /// Local ids the read-ahead looked up since the store was opened, found or not.
    pub fn ids_read_ahead(&self) -> u64 {
        self.read_ahead.counts.looked_up.load(Ordering::Relaxed)
    }

    pub fn durable_interval(&self) -> Duration {
        self.group.interval()
    }

    /// Whether the commit that returned `token` is durable.
    pub fn is_durable(&self, token: CommitToken) -> bool {
        self.group.durable() >= token.0
    }

    /// A token covering every commit visible to a read view taken before this call.
    pub fn latest_token(&self) -> CommitToken {
        CommitToken(self.group.lazy.load(Ordering::SeqCst))
    }

    /// Whether lazy commits wait for a durable commit to cover them (one that is
    /// syncing covers them already).
    pub fn durable_pending(&self) -> bool {
        self.group.covered.load(Ordering::SeqCst) < self.group.lazy.load(Ordering::SeqCst)
    }

    /// When the last durable commit happened.
    pub fn last_durable(&self) -> Instant {
        self.group.last_durable()
    }

    /// Time left until lazy commits are due to be made durable: one durable interval
    /// after the last durable commit (zero once that has passed).
    pub fn durable_due_in(&self) -> Duration {
        self.durable_interval().saturating_sub(self.last_durable().elapsed())
    }

    /// Makes every commit so far durable: an empty durable commit when lazy ones wait
    /// for one, then a wait for the syncs under way. Blocking.
    pub fn make_durable(&self) -> Result<(), StateError> {
        if self.durable_pending() {
            self.commit_with(false, |_| Ok::<_, StateError>(()))?;
        }
        self.group.wait_synced()
    }

    /// A consistent read-only view.
    pub fn read(&self) -> Result<ReadView, StateError> {
        Ok(ReadView {
            txn: self.db.begin_read()?,
            codec: self.codec.clone(),
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state values are plain data and always serialise")
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Decode { table, source })
}

/// Encodes a record-bearing value of row `key` (redb key bytes) of `table`.
fn seal<T: Serialize>(codec: &Codec, table: &'static str, key: &[u8], value: &T) -> Vec<u8> {
    codec.seal(table, key, encode(value))
}

/// Decodes a record-bearing value of row `key` (redb key bytes) of `table`.
fn unseal<T: DeserializeOwned>(codec: &Codec, table: &'static str, key: &[u8], bytes: &[u8]) -> Result<T, StateError> {
    let plain = codec.open(table, key, bytes)?;
    decode(table, &plain)
}

/// Encodes and seals a pending write of row `key`.
fn seal_outbox(codec: &Codec, key: &[u8], entry: &OutboxEntry) -> Vec<u8> {
    codec.seal("outbox", key, encoding::encode_outbox(entry))
}

/// Decodes a stored pending write: the binary layout, or the JSON of schema version 1.
fn unseal_outbox(codec: &Codec, key: &[u8], bytes: &[u8]) -> Result<OutboxEntry, StateError> {
    unseal_either(
        codec,
        "outbox",
        key,
        bytes,
        |b| decode("outbox", b),
        encoding::decode_outbox,
    )
}

/// Decodes a stored decision row, oldest first: a group (schema version 7), one decision
/// in the binary layout (versions 4 to 6), or one as the JSON of versions 1 to 3.
pub(crate) fn unseal_decisions(codec: &Codec, key: &[u8], bytes: &[u8]) -> Result<Vec<Decision>, StateError> {
    unseal_either(
        codec,
        "decisions",
        key,
        bytes,
        |b| decode("decisions", b).map(|d| vec![d]),
        encoding::decode_decisions,
    )
}

/// Decodes a stored write attempt: the binary layout, or the JSON of schema versions 1
/// to 4. The write log holds no values, so it is not sealed.
pub(crate) fn decode_write_log(bytes: &[u8]) -> Result<WriteLogEntry, StateError> {
    either_layout(
        "write_log",
        bytes,
        |b| decode("write_log", b),
        encoding::decode_write_log,
    )
}

/// The time of a stored write attempt, for retention.
fn write_log_time(bytes: &[u8]) -> Result<TimeMs, StateError> {
    let json = |b: &[u8]| decode::<TimeOnly>("write_log", b).map(|t| t.time_ms);
    either_layout("write_log", bytes, json, encoding::write_log_time)
}

/// An opened decision row's time and decision count (see
/// [`encoding::decision_row_head`]); a JSON row holds one decision.
fn decision_row_head(plain: &[u8]) -> Result<(TimeMs, u64), StateError> {
    let json = |b: &[u8]| decode::<TimeOnly>("decisions", b).map(|t| (t.time_ms, 1));
    either_layout("decisions", plain, json, encoding::decision_row_head)
}

/// Decodes a stored record state: the binary layout, or the JSON of schema version 1.
fn unseal_record(codec: &Codec, key: &[u8], bytes: &[u8]) -> Result<RecordState, StateError> {
    unseal_either(
        codec,
        "records",
        key,
        bytes,
        |b| decode("records", b),
        encoding::decode_record,
    )
}

/// Opens a sealed value of `table` and decodes it as [`either_layout`] does.
fn unseal_either<T>(
    codec: &Codec,
    table: &'static str,
    key: &[u8],
    bytes: &[u8],
    json: impl FnOnce(&[u8]) -> Result<T, StateError>,
    binary: impl FnOnce(&[u8]) -> Result<T, encoding::FormatError>,
) -> Result<T, StateError> {
    either_layout(table, &codec.open(table, key, bytes)?, json, binary)
}

/// Decodes a plain value of `table` with `json` when it is the JSON of an older schema
/// version (it starts with `{`), with `binary` when it is a layout of `encoding` (it
/// starts with that layout's format byte).
fn either_layout<T>(
    table: &'static str,
    plain: &[u8],
    json: impl FnOnce(&[u8]) -> Result<T, StateError>,
    binary: impl FnOnce(&[u8]) -> Result<T, encoding::FormatError>,
) -> Result<T, StateError> {
    if plain.first() == Some(&b'{') {
        return json(plain);
    }
    binary(plain).map_err(|source| StateError::Format { table, source })
}

/// The redb encoding of a row key: the associated data that binds a sealed value to
/// its row.
fn key_bytes<K: Value>(key: &K::SelfType<'_>) -> Vec<u8> {
    K::as_bytes(key).as_ref().to_vec()
}

fn record_key(entity: &str, id: u128) -> Vec<u8> {
    key_bytes::<(&str, u128)>(&(entity, id))
}

/// The associated data a record is sealed with ([`record_key`]); empty, and not built,
/// for a plain store, whose codec ignores it.
fn record_aad(codec: &Codec, entity: &str, id: u128) -> Vec<u8> {
    if codec.is_encrypted() {
        record_key(entity, id)
    } else {
        Vec::new()
    }
}

fn outbox_key(system: &str, seq: u64) -> Vec<u8> {
    key_bytes::<(&str, u64)>(&(system, seq))
}

fn id_key(id: u64) -> Vec<u8> {
    key_bytes::<u64>(&id)
}

/// Every table, open for writing inside one transaction.
pub struct WriteTables<'txn> {
    txn: &'txn redb::WriteTransaction,
    sequences: Table<'txn, &'static str, u64>,
    /// The records tables opened so far, by entity.
    records: Vec<(String, Table<'txn, u128, &'static [u8]>)>,
    identity: Table<'txn, &'static [u8], u128>,
    match_index: Table<'txn, &'static [u8], u128>,
    checkpoints: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    outbox: Table<'txn, (&'static str, u64), &'static [u8]>,
    dead_letters: Table<'txn, u64, &'static [u8]>,
    decisions: Table<'txn, u64, &'static [u8]>,
    write_log: Table<'txn, u64, &'static [u8]>,
    audit: Table<'txn, u64, &'static [u8]>,
    counts: Table<'txn, (&'static str, &'static str), u64>,
    codec: &'txn Codec,
    /// Sequences advanced in this transaction, written back once by `flush`.
    sequence_cache: Vec<(&'static str, u64)>,
    /// Record counts changed in this transaction, by (entity, system); written back once
    /// by `flush`.
    count_cache: Vec<((String, String), u64)>,
    /// Decisions of this transaction not yet written, and the id of the first: one row
    /// per group (see `encoding`).
    decision_group: encoding::DecisionGroup,
    decision_group_first: u64,
}

/// At most this many decisions share a row, and a row is closed once it holds this many
/// bytes, so reading one decision decodes a bounded amount and a batch of large records
/// does not hold megabytes of decisions; a batch of the default size and small records
/// fits in one row.
const DECISION_GROUP_MAX: u64 = 1024;
const DECISION_GROUP_MAX_BYTES: usize = 256 * 1024;

impl<'txn> WriteTables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction, codec: &'txn Codec) -> Result<Self, StateError> {
        let mut records = Vec::new();
        for name in records_table_names(txn.list_tables()?) {
            let table = txn.open_table(records_table(&name))?;
            records.push((name[RECORDS_PREFIX.len()..].to_string(), table));
        }
        Ok(Self {
            txn,
            sequences: txn.open_table(SEQUENCES)?,
            records,
            identity: txn.open_table(IDENTITY)?,
            match_index: txn.open_table(MATCH_INDEX)?,
            checkpoints: txn.open_table(CHECKPOINTS)?,
            outbox: txn.open_table(OUTBOX)?,
            dead_letters: txn.open_table(DEAD_LETTERS)?,
            decisions: txn.open_table(DECISIONS)?,
            write_log: txn.open_table(WRITE_LOG)?,
            audit: txn.open_table(AUDIT)?,
            counts: txn.open_table(COUNTS)?,
            codec,
            sequence_cache: Vec::new(),
            count_cache: Vec::new(),
            decision_group: Default::default(),
            decision_group_first: 0,
        })
    }

    /// Next id of a sequence; ids start at 1.
    pub fn next_id(&mut self, sequence: &'static str) -> Result<u64, StateError> {
        let next = match self.sequence_cache.iter_mut().find(|(name, _)| *name == sequence) {
            Some((_, next)) => next,
            None => {
                let stored = self.sequences.get(sequence)?.map(|v| v.value()).unwrap_or(1);
                self.sequence_cache.push((sequence, stored));
                &mut self.sequence_cache.last_mut().expect("just pushed").1
            }
        };
        let id = *next;
        *next += 1;
        Ok(id)
    }

    /// Writes the sequences and counts changed in this transaction; called once before
    /// commit.
    fn flush(&mut self) -> Result<(), StateError> {
        self.write_decision_group()?;
        for (name, next) in std::mem::take(&mut self.sequence_cache) {
            self.sequences.insert(name, next)?;
        }
        for ((entity, system), count) in std::mem::take(&mut self.count_cache) {
            self.counts.insert((entity.as_str(), system.as_str()), count)?;
        }
        Ok(())
    }

    /// The records table of `entity`, when it has one.
    fn records_of(&self, entity: &str) -> Option<&Table<'txn, u128, &'static [u8]>> {
        self.records.iter().find(|(e, _)| e == entity).map(|(_, t)| t)
    }

    /// The records table of `entity`, created when it has none.
    fn records_mut(&mut self, entity: &str) -> Result<&mut Table<'txn, u128, &'static [u8]>, StateError> {
        let at = match self.records.iter().position(|(e, _)| e == entity) {
            Some(at) => at,
            None => {
                let table = self.txn.open_table(records_table(&records_table_name(entity)))?;
                self.records.push((entity.to_string(), table));
                self.records.len() - 1
            }
        };
        Ok(&mut self.records[at].1)
    }

    pub fn record(&self, entity: &str, id: GlobalId) -> Result<Option<RecordState>, StateError> {
        let Some(records) = self.records_of(entity) else {
            return Ok(None);
        };
        match records.get(id.as_u128())? {
            Some(v) => Ok(Some(unseal_record(
                self.codec,
                &record_aad(self.codec, entity, id.as_u128()),
                v.value(),
            )?)),
            None => Ok(None),
        }
    }

    pub fn put_record(&mut self, entity: &str, id: GlobalId, state: &RecordState) -> Result<(), StateError> {
        let key = record_aad(self.codec, entity, id.as_u128());
        let sealed = self.codec.seal("records", &key, encoding::encode_record(state));
        self.records_mut(entity)?.insert(id.as_u128(), sealed.as_slice())?;
        Ok(())
    }

    /// Changes one system's shadow of a stored record (see
    /// [`encoding::update_shadow`]: the rest of the record is copied, not decoded).
    /// `None` when the record does not exist; else what `change` returned.
    pub fn update_shadow<T>(
        &mut self,
        entity: &str,
        id: GlobalId,
        system: &str,
        change: impl FnOnce(&mut Shadow) -> T,
    ) -> Result<Option<T>, StateError> {
        let key = record_aad(self.codec, entity, id.as_u128());
        let (changed, answer) = {
            let Some(stored) = self
                .records_of(entity)
                .map(|t| t.get(id.as_u128()))
                .transpose()?
                .flatten()
            else {
                return Ok(None);
            };
            let plain = self.codec.open("records", &key, stored.value())?;
            if plain.first() == Some(&b'{') {
                // The JSON of schema version 1: the long way, once; the row is binary after.
                let mut state: RecordState = decode("records", &plain)?;
                let answer = change(state.shadows.entry(system.to_string()).or_default());
                (encoding::encode_record(&state), answer)
            } else {
                encoding::update_shadow(&plain, system, change).map_err(|source| StateError::Format {
                    table: "records",
                    source,
                })?
            }
        };
        let sealed = self.codec.seal("records", &key, changed);
        self.records_mut(entity)?.insert(id.as_u128(), sealed.as_slice())?;
        Ok(Some(answer))
    }

    pub fn remove_record(&mut self, entity: &str, id: GlobalId) -> Result<(), StateError> {
        if self.records_of(entity).is_some() {
            self.records_mut(entity)?.remove(id.as_u128())?;
        }
        Ok(())
    }

    pub fn identity(&self, entity: &str, system: &str, local_id: &str) -> Result<Option<GlobalId>, StateError> {
        Ok(self
            .identity
            .get(path_key(entity, system, local_id).as_slice())?
            .map(|v| GlobalId::from_u128(v.value())))
    }

    /// Maps a local id to a global id. Returns true when the mapping is new, so the
    /// caller can count the record as one more that the system holds.
    pub fn put_identity(
        &mut self,
        entity: &str,
        system: &str,
        local_id: &str,
        id: GlobalId,
    ) -> Result<bool, StateError> {
        let previous = self
            .identity
            .insert(path_key(entity, system, local_id).as_slice(), id.as_u128())?;
        let new = previous.is_none();
        drop(previous);
        if new {
            self.add_count(entity, system, 1)?;
        }
        Ok(new)
    }

    pub fn remove_identity(&mut self, entity: &str, system: &str, local_id: &str) -> Result<(), StateError> {
        let removed = self
            .identity
            .remove(path_key(entity, system, local_id).as_slice())?
            .is_some();
        if removed {
            self.add_count(entity, system, -1)?;
        }
        Ok(())
    }

    pub fn match_key(&self, entity: &str, key: &str, value: &str) -> Result<Option<GlobalId>, StateError> {
        let value = self.codec.blind(value);
        Ok(self
            .match_index
            .get(path_key(entity, key, value.as_ref()).as_slice())?
            .map(|v| GlobalId::from_u128(v.value())))
    }

    pub fn put_match_key(&mut self, entity: &str, key: &str, value: &str, id: GlobalId) -> Result<(), StateError> {
        let value = self.codec.blind(value);
        self.match_index
            .insert(path_key(entity, key, value.as_ref()).as_slice(), id.as_u128())?;
        Ok(())
    }

    /// Removes a match-key entry if it still points at `id`.
    pub fn remove_match_key(&mut self, entity: &str, key: &str, value: &str, id: GlobalId) -> Result<(), StateError> {
        let value = self.codec.blind(value);
        let key = path_key(entity, key, value.as_ref());
        let current = self.match_index.get(key.as_slice())?.map(|v| v.value());
        if current == Some(id.as_u128()) {
            self.match_index.remove(key.as_slice())?;
        }
        Ok(())
    }

    /// How many records `system` holds of `entity`, with this transaction's changes.
    pub fn count(&self, entity: &str, system: &str) -> Result<u64, StateError> {
        if let Some((_, count)) = self.count_cache.iter().find(|((e, s), _)| e == entity && s == system) {
            return Ok(*count);
        }
        Ok(self.counts.get((entity, system))?.map(|v| v.value()).unwrap_or(0))
    }

    fn add_count(&mut self, entity: &str, system: &str, delta: i64) -> Result<(), StateError> {
        let count = self.count(entity, system)?.saturating_add_signed(delta);
        match self
            .count_cache
            .iter_mut()
            .find(|((e, s), _)| e == entity && s == system)
        {
            Some((_, kept)) => *kept = count,
            None => self.count_cache.push(((entity.to_string(), system.to_string()), count)),
        }
        Ok(())
    }

    pub fn checkpoint(&self, system: &str, stream: &str) -> Result<Option<serde_json::Value>, StateError> {
        match self.checkpoints.get((system, stream))? {
            Some(v) => Ok(Some(decode("checkpoints", v.value())?)),
            None => Ok(None),
        }
    }

    pub fn put_checkpoint(
        &mut self,
        system: &str,
        stream: &str,
        checkpoint: &serde_json::Value,
    ) -> Result<(), StateError> {
        self.checkpoints
            .insert((system, stream), encode(checkpoint).as_slice())?;
        Ok(())
    }

    /// Queues a write; `entry.seq` is assigned here and returned.
    pub fn enqueue(&mut self, mut entry: OutboxEntry) -> Result<u64, StateError> {
        let seq = self.next_id("outbox")?;
        entry.seq = seq;
        let sealed = seal_outbox(self.codec, &outbox_key(&entry.system, seq), &entry);
        self.outbox.insert((entry.system.as_str(), seq), sealed.as_slice())?;
        Ok(seq)
    }

    /// Replaces an entry kept for another attempt.
    pub fn update_outbox(&mut self, entry: &OutboxEntry) -> Result<(), StateError> {
        let sealed = seal_outbox(self.codec, &outbox_key(&entry.system, entry.seq), entry);
        self.outbox
            .insert((entry.system.as_str(), entry.seq), sealed.as_slice())?;
        Ok(())
    }

    /// Removes an entry without reading it back; true when it was there.
    pub fn delete_outbox(&mut self, system: &str, seq: u64) -> Result<bool, StateError> {
        Ok(self.outbox.remove((system, seq))?.is_some())
    }

    pub fn remove_outbox(&mut self, system: &str, seq: u64) -> Result<Option<OutboxEntry>, StateError> {
        match self.outbox.remove((system, seq))? {
            Some(v) => Ok(Some(unseal_outbox(self.codec, &outbox_key(system, seq), v.value())?)),
            None => Ok(None),
        }
    }

    /// Stores a decision. Decisions wait in this transaction's group, written as one row
    /// when the group is full or the transaction ends; ids must grow.
    pub fn put_decision(&mut self, decision: &Decision) -> Result<(), StateError> {
        if self.decision_group.is_empty() {
            self.decision_group_first = decision.id;
        }
        self.decision_group.push(decision);
        if self.decision_group.len() >= DECISION_GROUP_MAX || self.decision_group.bytes() >= DECISION_GROUP_MAX_BYTES {
            self.write_decision_group()?;
        }
        Ok(())
    }

    fn write_decision_group(&mut self) -> Result<(), StateError> {
        if self.decision_group.is_empty() {
            return Ok(());
        }
        let first = self.decision_group_first;
        let sealed = self.codec.seal("decisions", &id_key(first), self.decision_group.take());
        self.decisions.insert(first, sealed.as_slice())?;
        Ok(())
    }

    /// Stores a dead letter; `letter.id` is assigned here and returned.
    pub fn dead_letter(&mut self, mut letter: DeadLetter) -> Result<u64, StateError> {
        letter.id = self.next_id("dead_letter")?;
        let sealed = seal(self.codec, "dead_letters", &id_key(letter.id), &letter);
        self.dead_letters.insert(letter.id, sealed.as_slice())?;
        metrics::counter!(crate::metrics::DEAD_LETTERS,
            crate::metrics::LABEL_SYSTEM => letter.system.clone(),
            crate::metrics::LABEL_ENTITY => letter.entity.clone(),
            crate::metrics::LABEL_CLASS => letter.class.as_str())
        .increment(1);
        Ok(letter.id)
    }

    pub fn take_dead_letter(&mut self, id: u64) -> Result<Option<DeadLetter>, StateError> {
        match self.dead_letters.remove(id)? {
            Some(v) => Ok(Some(unseal(self.codec, "dead_letters", &id_key(id), v.value())?)),
            None => Ok(None),
        }
    }

    pub fn log_write(&mut self, mut entry: WriteLogEntry) -> Result<(), StateError> {
        entry.id = self.next_id("write_log")?;
        self.write_log
            .insert(entry.id, encoding::encode_write_log(&entry).as_slice())?;
        Ok(())
    }

    pub fn audit(&mut self, mut entry: AuditEntry) -> Result<u64, StateError> {
        entry.id = self.next_id("audit")?;
        self.audit.insert(entry.id, encode(&entry).as_slice())?;
        Ok(entry.id)
    }

    /// Drops decisions and write-log entries beyond their `max` or older than
    /// `min_time_ms`, oldest first. Returns how many decisions and entries were removed.
    ///
    /// Decisions go a row (one transaction's group) at a time: a row goes when the rows
    /// after it still hold `max_decisions`, counted as the span of ids from the next
    /// row's first to the newest (the decision sequence has no gaps; a forgotten
    /// decision counts until its row goes), or when its newest decision is older than
    /// `min_time_ms`. So at least `max_decisions` are kept, and at most one row more.
    pub fn prune(&mut self, max_decisions: u64, max_write_log: u64, min_time_ms: TimeMs) -> Result<u64, StateError> {
        self.write_decision_group()?;
        let mut removed = self.prune_decisions(max_decisions, min_time_ms)?;
        removed += prune_table(&mut self.write_log, max_write_log, min_time_ms, |_, b| {
            write_log_time(b)
        })?;
        Ok(removed)
    }

    fn prune_decisions(&mut self, max: u64, min_time_ms: TimeMs) -> Result<u64, StateError> {
        // One past the newest decision's id.
        let end = match self.decisions.last()? {
            Some((k, v)) => k.value() + self.decision_row(k.value(), v.value())?.1,
            None => return Ok(0),
        };
        let mut removed = 0;
        // Bounded per call, like `prune_table`.
        while removed < 100_000 {
            let (first, (time_ms, count)) = match self.decisions.first()? {
                Some((k, v)) => (k.value(), self.decision_row(k.value(), v.value())?),
                None => break,
            };
            let rest = match self.decisions.range(first + 1..)?.next() {
                Some(row) => end.saturating_sub(row?.0.value()),
                None => 0,
            };
            if rest < max && time_ms >= min_time_ms {
                break;
            }
            self.decisions.remove(first)?;
            removed += count;
        }
        Ok(removed)
    }

    /// A decision row's time (its newest decision's) and how many decisions it holds.
    fn decision_row(&self, id: u64, bytes: &[u8]) -> Result<(TimeMs, u64), StateError> {
        decision_row_head(&self.codec.open("decisions", &id_key(id), bytes)?)
    }
}

#[derive(Deserialize)]
struct TimeOnly {
    time_ms: TimeMs,
}

/// Removes the oldest rows of an id-keyed log table while it holds more than `max` rows
/// or its oldest row is older than `min_time_ms`. Ids grow with time, so the oldest
/// rows are the first.
fn prune_table(
    table: &mut Table<'_, u64, &'static [u8]>,
    max: u64,
    min_time_ms: TimeMs,
    time_of: impl Fn(u64, &[u8]) -> Result<TimeMs, StateError>,
) -> Result<u64, StateError> {
    let mut len = table.len()?;
    let mut removed = 0;
    // Bounded per call so a large backlog is pruned over several maintenance runs
    // instead of one long transaction.
    while removed < 100_000 {
        let Some((id, too_old)) = ({
            let first = table.first()?;
            match first {
                Some((k, v)) => Some((k.value(), time_of(k.value(), v.value())? < min_time_ms)),
                None => None,
            }
        }) else {
            break;
        };
        if len <= max && !too_old {
            break;
        }
        table.remove(id)?;
        len -= 1;
        removed += 1;
    }
    Ok(removed)
}

/// A consistent snapshot for reading (admin API, appliers).
pub struct ReadView {
    txn: redb::ReadTransaction,
    codec: Arc<Codec>,
}

impl ReadView {
    pub fn record(&self, entity: &str, id: GlobalId) -> Result<Option<RecordState>, StateError> {
        let Some(table) = open_records(&self.txn, entity)? else {
            return Ok(None);
        };
        match table.get(id.as_u128())? {
            Some(v) => Ok(Some(unseal_record(
                &self.codec,
                &record_aad(&self.codec, entity, id.as_u128()),
                v.value(),
            )?)),
            None => Ok(None),
        }
    }

    pub fn identity(&self, entity: &str, system: &str, local_id: &str) -> Result<Option<GlobalId>, StateError> {
        let table = self.txn.open_table(IDENTITY)?;
        Ok(table
            .get(path_key(entity, system, local_id).as_slice())?
            .map(|v| GlobalId::from_u128(v.value())))
    }

    pub fn checkpoint(&self, system: &str, stream: &str) -> Result<Option<serde_json::Value>, StateError> {
        let table = self.txn.open_table(CHECKPOINTS)?;
        match table.get((system, stream))? {
            Some(v) => Ok(Some(decode("checkpoints", v.value())?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` pending writes for `system`, oldest first.
    pub fn outbox(&self, system: &str, limit: usize) -> Result<Vec<OutboxEntry>, StateError> {
        self.outbox_skipping(system, limit, |_| false)
    }

    /// Up to `limit` pending writes for `system`, oldest first, leaving out those whose
    /// sequence number `skip` picks (they are not decoded).
    pub fn outbox_skipping(
        &self,
        system: &str,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        let table = self.txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in table.range((system, 0u64)..=(system, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let seq = k.value().1;
            if skip(seq) {
                continue;
            }
            out.push(unseal_outbox(&self.codec, &outbox_key(system, seq), v.value())?);
        }
        Ok(out)
    }

    pub fn outbox_depth(&self, system: &str) -> Result<u64, StateError> {
        let table = self.txn.open_table(OUTBOX)?;
        let mut n = 0;
        for row in table.range((system, 0u64)..=(system, u64::MAX))? {
            row?;
            n += 1;
        }
        Ok(n)
    }

    /// Dead letters, newest first, optionally of one system.
    pub fn dead_letters(&self, system: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, StateError> {
        let table = self.txn.open_table(DEAD_LETTERS)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev() {
            let (k, v) = row?;
            let letter: DeadLetter = unseal(&self.codec, "dead_letters", &id_key(k.value()), v.value())?;
            if system.is_none_or(|s| s == letter.system) {
                out.push(letter);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StateError> {
        let table = self.txn.open_table(DEAD_LETTERS)?;
        match table.get(id)? {
            Some(v) => Ok(Some(unseal(&self.codec, "dead_letters", &id_key(id), v.value())?)),
            None => Ok(None),
        }
    }

    /// Dead-letter count per system.
    pub fn dead_letter_depths(&self) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        let table = self.txn.open_table(DEAD_LETTERS)?;
        let mut out = std::collections::BTreeMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let letter: DeadLetter = unseal(&self.codec, "dead_letters", &id_key(k.value()), v.value())?;
            *out.entry(letter.system).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Decisions, newest first, filtered by entity, global id and flagged/conflict.
    pub fn decisions(&self, filter: &DecisionFilter, limit: usize) -> Result<Vec<Decision>, StateError> {
        let table = self.txn.open_table(DECISIONS)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev() {
            let (k, v) = row?;
            let group = unseal_decisions(&self.codec, &id_key(k.value()), v.value())?;
            for d in group.into_iter().rev() {
                if out.len() >= limit {
                    return Ok(out);
                }
                if filter.matches(&d) {
                    out.push(d);
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Write-log entries, newest first.
    pub fn write_log(&self, system: Option<&str>, limit: usize) -> Result<Vec<WriteLogEntry>, StateError> {
        let table = self.txn.open_table(WRITE_LOG)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev() {
            let (_, v) = row?;
            let e = decode_write_log(v.value())?;
            if system.is_none_or(|s| s == e.target_system || s == e.source_system) {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StateError> {
        let table = self.txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev().take(limit) {
            let (_, v) = row?;
            out.push(decode("audit", v.value())?);
        }
        Ok(out)
    }

    /// Every record of an entity (for tests and small exports; streams from disk).
    pub fn records(&self, entity: &str) -> Result<Vec<(GlobalId, RecordState)>, StateError> {
        self.first_records(entity, usize::MAX)
    }

    /// The first `limit` records of `entity` in global id order.
    pub fn first_records(&self, entity: &str, limit: usize) -> Result<Vec<(GlobalId, RecordState)>, StateError> {
        let Some(table) = open_records(&self.txn, entity)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in table.iter()?.take(limit) {
            let (k, v) = row?;
            let id = k.value();
            out.push((
                GlobalId::from_u128(id),
                unseal_record(&self.codec, &record_key(entity, id), v.value())?,
            ));
        }
        Ok(out)
    }

    pub fn record_count(&self) -> Result<u64, StateError> {
        let mut count = 0;
        for name in records_table_names(self.txn.list_tables()?) {
            count += self.txn.open_table(records_table(&name))?.len()?;
        }
        Ok(count)
    }
}

/// Which decisions to list.
#[derive(Debug, Clone, Default)]
pub struct DecisionFilter {
    pub entity: Option<String>,
    pub global_id: Option<GlobalId>,
    pub system: Option<String>,
    pub flagged_only: bool,
    pub conflicts_only: bool,
}

impl DecisionFilter {
    fn matches(&self, d: &Decision) -> bool {
        self.entity.as_ref().is_none_or(|e| *e == d.entity)
            && self.global_id.is_none_or(|g| g == d.global_id)
            && self.system.as_ref().is_none_or(|s| *s == d.system)
            && (!self.flagged_only || d.flagged)
            && (!self.conflicts_only || d.conflicts().next().is_some())
    }
}
