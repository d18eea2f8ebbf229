//! Capture of one table through a logical replication slot.
//!
//! Lifecycle of a link:
//! 1. **Setup** (first start, no checkpoint): the publication is created for the table
//!    when missing (`create_publication`), or the table added to it; the link's slot
//!    `<slot>_<entity>` is created on the replication connection with an exported
//!    snapshot (a slot left by a run that never committed its first batch is dropped and
//!    created again, since its snapshot is gone).
//! 2. **Initial snapshot**: a second connection reads the table inside the exported
//!    snapshot (`SET TRANSACTION SNAPSHOT`), in chunks ordered by the id column
//!    (`WHERE id > last ORDER BY id LIMIT n`). Every chunk is a batch whose checkpoint
//!    holds the slot's consistent point and the last id read, so a crash resumes after
//!    that id instead of starting over. The exported snapshot does not survive the
//!    crash: the rest of the table is then read as it is now, and the stream replays
//!    every change since the consistent point over it, so the records converge to the
//!    table's state (a row may briefly show a newer value before an older change is
//!    replayed and then the newer one again).
//! 3. **Streaming** from the checkpoint's LSN with `pgoutput`.
//!
//! Positions and feedback (the architecture invariant "acknowledged only after the redb
//! commit"): a batch's checkpoint holds `lsn`, the end of the last transaction all of
//! whose changes of the table are in this or an earlier batch. A large transaction is
//! cut into several batches (memory stays bounded by the batch size); a batch that ends
//! inside a transaction keeps the previous `lsn` and records the transaction's commit
//! LSN and how many of its changes were yielded (`tx`), so a restart skips exactly those
//! and neither loses nor repeats any. [`PostgresSource::committed`], called by the
//! engine after the commit, sends the checkpoint's `lsn` as the flush position: never a
//! position whose effects are not in redb. When the stream is idle and no transaction is
//! open, the server's sent position (from keepalives) is taken as the position, and an
//! empty batch moves the checkpoint there at most once per `heartbeat_interval_secs`, so
//! the slot advances over WAL written by other tables and databases.
//!
//! Safety checks before streaming, each a fatal error of the link with the fix in its
//! message: the slot exists; it was not invalidated (`wal_status = 'lost'`, e.g. by
//! `max_slot_wal_keep_size`); its `confirmed_flush_lsn` is not ahead of the checkpoint
//! (the changes between were never committed to redb: a silent gap). The fix offered
//! is a re-snapshot: with `resnapshot_on_slot_loss = true` the link replaces the slot
//! and reads the table again inside the new slot's snapshot (step 1 and 2 above).
//! Every column the link maps must exist; a Relation message in which a mapped column
//! is missing or has another type stops the link.
//!
//! A re-snapshot of one table can be requested while the link streams (PostgreSQL 14
//! and later, whose pgoutput passes logical messages on) with `concord resnapshot`, or
//! from any session on the database: `SELECT pg_logical_emit_message(true,
//! 'concord.resnapshot', 'schema.table')` (transactional: a non-transactional message is
//! dropped by the server when it arrives while decoding is not yet consistent after a
//! restart). The message travels in the WAL, so the stream sees it in order; the
//! link pauses the stream (answering the server meanwhile), reads the table again in
//! chunks as it is now, and goes on streaming from where it paused: changes made during
//! the read are replayed over it and converge. Rows deleted before the request are not
//! in the table and stay in concord.
//!
//! TRUNCATE does not name the rows it removes: it becomes a dead letter (visible,
//! counted) and the stream goes on; request a re-snapshot to reconcile.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{TableName, quote_ident};
use super::pgoutput::{Lsn, Message, OldKind, PG_EPOCH_OFFSET_MICROS, Relation, StreamMessage, TupleValue};
use super::pgoutput::{format_lsn, parse_lsn};
use super::replication::{ReplicationConnection, ReplicationError};
use super::values::{Kind, kind_of, to_json};
use super::{PostgresSystemConfig, connect};
use crate::config::LinkConfig;
use crate::connector::{Checkpoint, CommitDone, ConnectorError, ErrorClass, SourceBatch};
use crate::metrics as m;
use crate::model::{ChangeKind, SourceRecord, SourceReject};

/// Longest a call waits for the first message of the stream before it reports that
/// nothing is available (the engine may ask for less: [`PostgresSource::limit_wait`]).
const POLL_WAIT: Duration = Duration::from_secs(1);
/// Prefix of the logical message that asks a link to read its table again while it
/// streams: `SELECT pg_logical_emit_message(true, 'concord.resnapshot', 'schema.table')`.
pub const RESNAPSHOT_PREFIX: &str = "concord.resnapshot";
/// Layout version of [`PgCheckpoint`].
const CHECKPOINT_VERSION: u32 = 1;

/// The position a batch leaves the link at; stored by the engine in redb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgCheckpoint {
    pub v: u32,
    /// End of the last transaction whose changes of the table are all yielded (or the
    /// slot's consistent point); streaming resumes here and it is the flush position.
    pub lsn: String,
    /// Progress of the initial snapshot while it is not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// A transaction after `lsn` whose first `done` changes of the table are yielded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<TxProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// Text of the last id read; `None` before the first chunk.
    pub after: Option<String>,
    /// The source time of the snapshot's rows (server clock, ms since the epoch): read
    /// before the slot was created (initial snapshot) or before the table was read again
    /// (re-snapshot), so it is no later than the commit time of any change the stream
    /// delivers after the snapshot, and such a change is never merged as older than the
    /// row it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxProgress {
    /// The transaction's commit LSN (its Begin message's `final_lsn`).
    pub commit_lsn: String,
    pub done: u64,
}

/// One column as the catalog describes it.
#[derive(Debug, Clone)]
struct CatalogColumn {
    name: String,
    type_oid: u32,
    kind: Kind,
}

/// Where the link is.
enum Phase {
    /// Nothing open; the next call connects.
    Closed,
    /// Reading the table: the initial snapshot, a resumed one, or a re-snapshot.
    Snapshot(Box<SnapshotReader>),
    Streaming(Box<Stream>),
}

/// The connections of the snapshot phase.
struct SnapshotReader {
    then: AfterSnapshot,
    client: tokio_postgres::Client,
    /// Reading inside the slot's exported snapshot (a transaction is open).
    in_snapshot: bool,
}

/// Where the link goes once the table is read.
enum AfterSnapshot {
    /// Start streaming on this connection (which holds the exported snapshot open on a
    /// first run, and is a fresh connection when resuming).
    Start(ReplicationConnection),
    /// Go on with this stream, paused for a re-snapshot requested in the stream; it is
    /// kept alive with status updates meanwhile.
    Resume(Box<Stream>),
}

/// State of the replication stream.
struct Stream {
    repl: ReplicationConnection,
    /// For slot metrics.
    client: tokio_postgres::Client,
    relations: HashMap<u32, Relation>,
    /// Relation id of the captured table, once its Relation message came.
    table_relid: Option<u32>,
    /// Column kinds of the table's current Relation, by position.
    kinds: Vec<Kind>,
    /// Kinds of the table's column types as the catalog resolved them when the stream
    /// started (arrays of enums and other non-built-in types).
    catalog_kinds: HashMap<u32, Kind>,
    /// Type OIDs of the mapped columns as last seen, to detect a retype.
    mapped_types: HashMap<String, u32>,
    tx: Option<OpenTx>,
    /// After a restart inside a transaction: its commit LSN and the changes already
    /// yielded, matched against the first Begin.
    skip_next: Option<(Lsn, u64)>,
    /// End of the last transaction fully processed.
    position: Lsn,
    /// The last position sent as flush.
    confirmed: Lsn,
    /// Server's sent position from the last keepalive while no transaction was open.
    idle_position: Lsn,
    last_status: Instant,
    last_yield: Instant,
    last_metrics: Option<Instant>,
    /// Commit time of the newest transaction seen, microseconds since the Unix epoch.
    newest_commit_us: i64,
    /// A re-snapshot of the table was requested in the stream; it starts once no
    /// transaction is open.
    resnapshot: bool,
}

struct OpenTx {
    commit_lsn: Lsn,
    commit_time_us: i64,
    /// Changes of the table seen in this transaction.
    seen: u64,
    /// Changes to skip: yielded before a restart.
    skip: u64,
}

/// A `postgres` link's source. See the module doc.
pub struct PostgresSource {
    system: String,
    link: String,
    entity: String,
    cfg: PostgresSystemConfig,
    base_dir: PathBuf,
    table: TableName,
    slot: String,
    id_field: String,
    version_field: Option<String>,
    /// Columns the link reads: the id, the version and every mapped system field.
    mapped: BTreeSet<String>,
    /// The position of everything yielded so far.
    checkpoint: PgCheckpoint,
    /// The checkpoint the engine last committed.
    committed: Option<PgCheckpoint>,
    phase: Phase,
    lag_seconds: f64,
    /// Set by the engine: answer an empty stream within this, not `POLL_WAIT`.
    wait_limit: Option<Duration>,
    /// Set by the engine for the next call: the commit of the previous batch, which
    /// the call keeps gathering changes during (see [`Self::gather_during`]).
    gather_during: Option<CommitDone>,
}

impl PostgresSource {
    /// Prepares the source; connects on the first [`Self::next_batch`], so a database
    /// that is down at start is a transient error of the link, not of the daemon.
    pub fn open(
        system: &str,
        cfg: &PostgresSystemConfig,
        link: &LinkConfig,
        base_dir: &Path,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<PostgresSource, ConnectorError> {
        let table = TableName::parse(&link.object).ok_or_else(|| {
            ConnectorError::fatal(
                "config",
                format!("object {:?} is not \"schema.table\" or \"table\"", link.object),
            )
        })?;
        let (checkpoint, committed) = match checkpoint {
            None => (
                PgCheckpoint {
                    v: CHECKPOINT_VERSION,
                    lsn: String::new(),
                    snapshot: Some(SnapshotProgress {
                        after: None,
                        as_of_ms: None,
                    }),
                    tx: None,
                },
                None,
            ),
            Some(value) => {
                let parsed: PgCheckpoint = serde_json::from_value(value.clone()).map_err(|_| {
                    ConnectorError::fatal("checkpoint", "checkpoint is not a postgres source checkpoint")
                })?;
                if parsed.v != CHECKPOINT_VERSION || parse_lsn(&parsed.lsn).is_none() {
                    return Err(ConnectorError::fatal(
                        "checkpoint",
                        "checkpoint layout is not supported",
                    ));
                }
                (parsed.clone(), Some(parsed))
            }
        };
        let mut mapped: BTreeSet<String> = BTreeSet::new();
        mapped.insert(link.id_field.clone());
        if let Some(v) = &link.version_field {
            mapped.insert(v.clone());
        }
        for rule in &link.map {
            if rule.direction != crate::config::MapDirection::Out {
                mapped.extend(rule.system.as_slice().iter().cloned());
            }
        }
        Ok(PostgresSource {
            system: system.to_string(),
            link: link.name(),
            entity: link.entity.clone(),
            cfg: cfg.clone(),
            base_dir: base_dir.to_path_buf(),
            slot: cfg.slot_name(&link.entity),
            table,
            id_field: link.id_field.clone(),
            version_field: link.version_field.clone(),
            mapped,
            checkpoint,
            committed,
            phase: Phase::Closed,
            lag_seconds: 0.0,
            wait_limit: None,
            gather_during: None,
        })
    }

    /// True while the link streams: [`PostgresSource::next_batch`] then waits up to
    /// `POLL_WAIT` on the replication stream and returns as soon as changes arrive, so
    /// the caller need not sleep between calls. Status updates and heartbeats are sent
    /// from inside the call, so they keep their pace either way.
    pub fn waits_for_data(&self) -> bool {
        matches!(self.phase, Phase::Streaming(_))
    }

    /// True while streaming between transactions: every change read so far belongs to a
    /// committed transaction, so the next checkpoint can move the slot.
    pub fn between_transactions(&self) -> bool {
        matches!(&self.phase, Phase::Streaming(stream) if stream.tx.is_none())
    }

    /// Bounds how long the following calls wait on a quiet stream (`None`: up to
    /// `POLL_WAIT`). The engine shortens it while a batch waits for its durable commit,
    /// so the checkpoint is acknowledged when that commit is due, not a whole poll
    /// wait after the stream went quiet.
    pub fn limit_wait(&mut self, limit: Option<Duration>) {
        self.wait_limit = limit;
    }

    /// Lets the next call read the stream while the engine commits the previous batch:
    /// the call goes on gathering changes until `commit` resolves (or the batch is
    /// full), then takes what is buffered and returns, so the batch holds what arrived
    /// during the commit and the server is not held up by a full socket meanwhile. With
    /// nothing gathered, the call returns when `commit` resolves, so the engine handles
    /// its result at once.
    pub fn gather_during(&mut self, commit: CommitDone) {
        self.gather_during = Some(commit);
    }

    /// The slot this link reads.
    pub fn slot_name(&self) -> &str {
        &self.slot
    }

    pub async fn next_batch(&mut self, max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        let max = max.max(1);
        let result = self.next_batch_inner(max).await;
        if let Err(error) = &result {
            // Whatever was open is in an unknown state; the next call starts from the
            // last yielded position (transient) or the link stops (fatal).
            self.phase = Phase::Closed;
            if error.class == ErrorClass::Fatal {
                tracing::error!(system = %self.system, link = %self.link, reason = %error.reason, "postgres capture stopped");
            }
        }
        result
    }

    async fn next_batch_inner(&mut self, max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        let commit = self.gather_during.take();
        if matches!(self.phase, Phase::Closed) {
            self.open_phase().await?;
        }
        match &mut self.phase {
            Phase::Snapshot(_) => self.snapshot_chunk(max).await.map(Some),
            Phase::Streaming(_) => self.stream_batch(max, commit).await,
            Phase::Closed => Ok(None),
        }
    }

    /// Connects and decides where to go on: setup and snapshot, resumed snapshot, or
    /// streaming.
    async fn open_phase(&mut self) -> Result<(), ConnectorError> {
        let client = connect(&self.cfg, &self.base_dir)
            .await
            .map_err(|e| connect_error(&e))?;
        self.check_columns(&client).await?;
        let repl = ReplicationConnection::connect(&self.cfg, &self.base_dir).await?;
        let Some(committed) = self.committed.clone() else {
            return self.setup_fresh(client, repl).await;
        };
        // Resuming: the yielded position falls back to the committed one.
        self.checkpoint = committed.clone();
        let lsn = parse_lsn(&committed.lsn).expect("checkpoint lsn was parsed when stored");
        let problem = match self.slot_state(&client).await? {
            None => Some(self.slot_lost("it does not exist (dropped)")),
            Some(slot) if slot.lost => {
                Some(self.slot_lost("the server invalidated it: WAL it needed was removed, see max_slot_wal_keep_size"))
            }
            Some(SlotState {
                confirmed_flush: Some(confirmed),
                ..
            }) if confirmed > lsn => Some(self.slot_lost(&format!(
                "its confirmed position {} is ahead of concord's checkpoint {}, so the changes between were never \
                 recorded",
                format_lsn(confirmed),
                committed.lsn
            ))),
            Some(_) => None,
        };
        if let Some(error) = problem {
            if !self.cfg.resnapshot_on_slot_loss {
                return Err(error);
            }
            tracing::warn!(system = %self.system, link = %self.link, slot = %self.slot, reason = %error.reason,
                "slot unusable; re-snapshot from a new slot (resnapshot_on_slot_loss)");
            return self.setup_fresh(client, repl).await;
        }
        if committed.snapshot.is_some() {
            self.phase = Phase::Snapshot(Box::new(SnapshotReader {
                then: AfterSnapshot::Start(repl),
                client,
                in_snapshot: false,
            }));
            return Ok(());
        }
        self.start_stream(repl, client, lsn).await
    }

    /// Publication, a new slot with an exported snapshot, and the snapshot transaction.
    /// A slot of the same name left by a run that never committed a checkpoint (or an
    /// unusable one, on a re-snapshot) is dropped first.
    async fn setup_fresh(
        &mut self,
        client: tokio_postgres::Client,
        mut repl: ReplicationConnection,
    ) -> Result<(), ConnectorError> {
        self.ensure_publication(&client).await?;
        if let Some(slot) = self.slot_state(&client).await? {
            if !self.cfg.create_slot {
                return Err(ConnectorError::fatal(
                    "slot",
                    format!(
                        "slot {} exists but concord has no usable checkpoint for link {}: the initial snapshot needs \
                         a new slot; drop it (SELECT pg_drop_replication_slot('{}')) or set create_slot = true",
                        self.slot, self.link, self.slot
                    ),
                ));
            }
            if slot.active {
                return Err(ConnectorError::transient(
                    "slot",
                    format!("slot {} is in use", self.slot),
                ));
            }
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                .await
                .map_err(|e| pg_error("dropping the unused slot", &e))?;
        } else if !self.cfg.create_slot {
            return Err(ConnectorError::fatal(
                "slot_missing",
                format!(
                    "slot {} does not exist and create_slot is false: SELECT pg_create_logical_replication_slot('{}', \
                     'pgoutput') is not enough (the initial snapshot needs the slot's exported snapshot); set \
                     create_slot = true",
                    self.slot, self.slot
                ),
            ));
        }
        let as_of_ms = server_time_ms(&client).await?;
        let created = repl.create_slot(&self.slot).await?;
        let Some(snapshot_name) = created.snapshot_name else {
            return Err(ConnectorError::transient("slot", "the server exported no snapshot"));
        };
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                super::config::quote_literal(&snapshot_name)
            ))
            .await
            .map_err(|e| pg_error("starting the snapshot transaction", &e))?;
        self.checkpoint = PgCheckpoint {
            v: CHECKPOINT_VERSION,
            lsn: format_lsn(created.consistent_point),
            snapshot: Some(SnapshotProgress {
                after: None,
                as_of_ms: Some(as_of_ms),
            }),
            tx: None,
        };
        tracing::info!(system = %self.system, link = %self.link, slot = %self.slot, "slot created; initial snapshot starts");
        self.phase = Phase::Snapshot(Box::new(SnapshotReader {
            then: AfterSnapshot::Start(repl),
            client,
            in_snapshot: true,
        }));
        Ok(())
    }

    /// The fatal error of a slot that cannot give the changes since the checkpoint.
    fn slot_lost(&self, why: &str) -> ConnectorError {
        ConnectorError::fatal(
            "slot_lost",
            format!(
                "replication slot {} of link {} cannot resume: {why}; changes since the checkpoint may be lost. \
                 To re-read the table from a new slot, set resnapshot_on_slot_loss = true on system {} and restart",
                self.slot, self.link, self.system
            ),
        )
    }

    async fn start_stream(
        &mut self,
        mut repl: ReplicationConnection,
        client: tokio_postgres::Client,
        lsn: Lsn,
    ) -> Result<(), ConnectorError> {
        let catalog_kinds = self
            .catalog_columns(&client)
            .await?
            .into_iter()
            .map(|c| (c.type_oid, c.kind))
            .collect();
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| pg_error("reading the server version", &e))?
            .get(0);
        // Logical messages (re-snapshot requests) reach pgoutput clients from 14 on.
        let messages = version >= 140_000;
        if let Err(error) = repl
            .start_replication(&self.slot, lsn, &self.cfg.publication, messages)
            .await
        {
            return Err(self.start_error(error));
        }
        tracing::info!(system = %self.system, link = %self.link, slot = %self.slot, lsn = %format_lsn(lsn), "streaming");
        let skip = self
            .checkpoint
            .tx
            .as_ref()
            .and_then(|tx| parse_lsn(&tx.commit_lsn).map(|l| (l, tx.done)));
        self.phase = Phase::Streaming(Box::new(Stream {
            repl,
            client,
            relations: HashMap::new(),
            table_relid: None,
            kinds: Vec::new(),
            catalog_kinds,
            mapped_types: HashMap::new(),
            tx: None,
            skip_next: skip,
            position: lsn,
            confirmed: lsn,
            idle_position: lsn,
            last_status: Instant::now(),
            last_yield: Instant::now(),
            last_metrics: None,
            newest_commit_us: 0,
            resnapshot: false,
        }));
        Ok(())
    }

    fn start_error(&self, error: ReplicationError) -> ConnectorError {
        let text = error.to_string();
        if text.contains("can no longer get changes") || text.contains("has been invalidated") {
            return self.slot_lost("the server invalidated it");
        }
        if error.code() == Some("42704") {
            return self.slot_lost("it does not exist (dropped)");
        }
        error.into()
    }
}

/// What `pg_replication_slots` says about a slot.
struct SlotState {
    active: bool,
    lost: bool,
    confirmed_flush: Option<Lsn>,
}

impl PostgresSource {
    async fn slot_state(&self, client: &tokio_postgres::Client) -> Result<Option<SlotState>, ConnectorError> {
        let row = client
            .query_opt(
                "SELECT active, coalesce(wal_status, '') = 'lost', confirmed_flush_lsn::text, plugin::text \
                 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                &[&self.slot],
            )
            .await
            .map_err(|e| pg_error("reading the slot", &e))?;
        let Some(row) = row else { return Ok(None) };
        let plugin: Option<String> = row.get(3);
        if plugin.as_deref() != Some("pgoutput") {
            return Err(ConnectorError::fatal(
                "slot",
                format!("slot {} is not a logical slot of the pgoutput plugin", self.slot),
            ));
        }
        let confirmed: Option<String> = row.get(2);
        Ok(Some(SlotState {
            active: row.get(0),
            lost: row.get(1),
            confirmed_flush: confirmed.as_deref().and_then(parse_lsn),
        }))
    }

    /// The table's columns from the catalog; every mapped column must be among them.
    async fn catalog_columns(&self, client: &tokio_postgres::Client) -> Result<Vec<CatalogColumn>, ConnectorError> {
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, t.typcategory::text, t.typelem \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                                     WHERE n.nspname = $1 AND c.relname = $2) \
                   AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&self.table.schema, &self.table.table],
            )
            .await
            .map_err(|e| pg_error("reading the table's columns", &e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let oid: u32 = row.get(1);
                let category: String = row.get(2);
                let element: u32 = row.get(3);
                CatalogColumn {
                    name: row.get(0),
                    type_oid: oid,
                    kind: column_kind(oid, &category, element),
                }
            })
            .collect())
    }

    async fn check_columns(&self, client: &tokio_postgres::Client) -> Result<Vec<CatalogColumn>, ConnectorError> {
        let columns = self.catalog_columns(client).await?;
        if columns.is_empty() {
            return Err(ConnectorError::fatal(
                "schema",
                format!("table {} does not exist or has no columns", self.table),
            ));
        }
        for name in &self.mapped {
            if !columns.iter().any(|c| &c.name == name) {
                return Err(ConnectorError::fatal(
                    "schema",
                    format!(
                        "column {name:?} that link {} maps does not exist in table {}: add it back or change the \
                         link's mapping",
                        self.link, self.table
                    ),
                ));
            }
        }
        Ok(columns)
    }

    /// Creates the publication for the table, or adds the table to it, as allowed.
    async fn ensure_publication(&self, client: &tokio_postgres::Client) -> Result<(), ConnectorError> {
        let publication = &self.cfg.publication;
        let exists = client
            .query_opt(
                "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
                &[publication],
            )
            .await
            .map_err(|e| pg_error("reading the publication", &e))?;
        // Changes of a partitioned table are published under the root's name only with
        // publish_via_partition_root; otherwise they carry each partition's name and
        // would not be recognised as the link's table.
        let fix = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(publication),
            self.table.quoted()
        );
        let Some(row) = exists else {
            if !self.cfg.create_publication {
                return Err(ConnectorError::fatal(
                    "publication",
                    format!("publication {publication} does not exist and create_publication is false: {fix}"),
                ));
            }
            client
                .batch_execute(&fix)
                .await
                .map_err(|e| pg_error("creating the publication", &e))?;
            return Ok(());
        };
        let all_tables: bool = row.get(0);
        let via_root: bool = row.get(1);
        let partitioned: bool = client
            .query_one(
                "SELECT coalesce((SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2), false)",
                &[&self.table.schema, &self.table.table],
            )
            .await
            .map_err(|e| pg_error("reading the table's kind", &e))?
            .get(0);
        if partitioned && !via_root {
            return Err(ConnectorError::fatal(
                "publication",
                format!(
                    "table {} is partitioned and publication {publication} publishes its changes under the \
                     partitions' names: ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    self.table,
                    quote_ident(publication)
                ),
            ));
        }
        if all_tables {
            return Ok(());
        }
        let member = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[publication, &self.table.schema, &self.table.table],
            )
            .await
            .map_err(|e| pg_error("reading the publication's tables", &e))?;
        if member.is_some() {
            return Ok(());
        }
        let add = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            self.table.quoted()
        );
        if !self.cfg.create_publication {
            return Err(ConnectorError::fatal(
                "publication",
                format!("table {} is not in publication {publication}: {add}", self.table),
            ));
        }
        client
            .batch_execute(&add)
            .await
            .map_err(|e| pg_error("adding the table to the publication", &e))
    }

    /// Reads the next chunk of the initial snapshot.
    async fn snapshot_chunk(&mut self, max: usize) -> Result<SourceBatch, ConnectorError> {
        if let Phase::Snapshot(reader) = &mut self.phase
            && let AfterSnapshot::Resume(stream) = &mut reader.then
            && stream.last_status.elapsed() >= Duration::from_secs(self.cfg.status_interval_secs.max(1))
        {
            stream.repl.send_status(stream.confirmed, false).await?;
            stream.last_status = Instant::now();
        }
        let Phase::Snapshot(reader) = &self.phase else {
            unreachable!("snapshot_chunk runs in the snapshot phase");
        };
        let client = &reader.client;
        let columns = self.check_columns(client).await?;
        let id_type: String = client
            .query_one(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attname = $2",
                &[&self.table.quoted(), &self.id_field],
            )
            .await
            .map_err(|e| pg_error("reading the id column's type", &e))?
            .get(0);
        let limit = max.min(self.cfg.snapshot_chunk_rows as usize) as i64;
        let select: Vec<String> = columns.iter().map(|c| snapshot_text(&c.name, c.type_oid)).collect();
        let id = quote_ident(&self.id_field);
        let after = self.checkpoint.snapshot.as_ref().and_then(|s| s.after.clone());
        let as_of_ms = self.checkpoint.snapshot.as_ref().and_then(|s| s.as_of_ms);
        let rows = match &after {
            None => {
                let sql = format!(
                    "SELECT {} FROM {} AS t ORDER BY t.{id} LIMIT $1",
                    select.join(", "),
                    self.table.quoted()
                );
                client.query(&sql, &[&limit]).await
            }
            Some(after) => {
                let sql = format!(
                    "SELECT {} FROM {} AS t WHERE t.{id} > $1::text::{id_type} ORDER BY t.{id} LIMIT $2",
                    select.join(", "),
                    self.table.quoted()
                );
                client.query(&sql, &[after, &limit]).await
            }
        }
        .map_err(|e| pg_error("reading a snapshot chunk", &e))?;
        let id_index = columns
            .iter()
            .position(|c| c.name == self.id_field)
            .expect("check_columns found the id column");
        let mut records = Vec::with_capacity(rows.len());
        let mut last_id = after;
        for row in &rows {
            let mut fields = serde_json::Map::new();
            for (i, column) in columns.iter().enumerate() {
                let text: Option<&str> = row.get(i);
                let value = text.map_or(Value::Null, |t| to_json(&column.kind, t));
                fields.insert(column.name.clone(), value);
            }
            let Some(id_text) = row.get::<_, Option<String>>(id_index) else {
                continue;
            };
            let local_id = id_string(fields.get(&self.id_field).unwrap_or(&Value::Null));
            let version = self.version_field.as_ref().and_then(|f| fields.get(f)).map(id_string);
            records.push(SourceRecord {
                local_id,
                kind: ChangeKind::Upsert,
                fields,
                version,
                source_time_ms: as_of_ms,
            });
            last_id = Some(id_text);
        }
        let finished = (rows.len() as i64) < limit;
        self.checkpoint.snapshot = if finished {
            None
        } else {
            Some(SnapshotProgress {
                after: last_id,
                as_of_ms,
            })
        };
        let batch = SourceBatch {
            records,
            rejects: Vec::new(),
            checkpoint: serde_json::to_value(&self.checkpoint).expect("a checkpoint serialises"),
        };
        if finished {
            let Phase::Snapshot(reader) = std::mem::replace(&mut self.phase, Phase::Closed) else {
                unreachable!("still in the snapshot phase");
            };
            let SnapshotReader {
                then,
                client,
                in_snapshot,
            } = *reader;
            if in_snapshot {
                client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| pg_error("ending the snapshot transaction", &e))?;
            }
            tracing::info!(system = %self.system, link = %self.link, "snapshot read");
            match then {
                AfterSnapshot::Start(repl) => {
                    let lsn = parse_lsn(&self.checkpoint.lsn).expect("the snapshot's lsn came from the server");
                    self.start_stream(repl, client, lsn).await?;
                }
                AfterSnapshot::Resume(stream) => self.phase = Phase::Streaming(stream),
            }
        }
        Ok(batch)
    }

    /// Reads the stream until `max` records, a pause in the stream (beside a `commit`:
    /// the end of that commit), or the poll wait.
    async fn stream_batch(
        &mut self,
        max: usize,
        mut commit: Option<CommitDone>,
    ) -> Result<Option<SourceBatch>, ConnectorError> {
        let status_every = Duration::from_secs(self.cfg.status_interval_secs.max(1));
        let heartbeat = self.cfg.heartbeat_interval_secs;
        let deadline = Instant::now() + self.wait_limit.map_or(POLL_WAIT, |limit| limit.min(POLL_WAIT));
        let mut records: Vec<SourceRecord> = Vec::new();
        let mut rejects: Vec<SourceReject> = Vec::new();
        let mut asked_reply = false;
        // The stream is read at least once per call, however short the wait: what is
        // already buffered is taken even when the deadline has passed.
        let mut read_once = false;
        loop {
            let Phase::Streaming(stream) = &mut self.phase else {
                unreachable!("stream_batch runs in the streaming phase");
            };
            if stream.last_status.elapsed() >= status_every {
                stream.repl.send_status(stream.confirmed, false).await?;
                stream.last_status = Instant::now();
            }
            if records.len() >= max || (stream.resnapshot && stream.tx.is_none()) {
                break;
            }
            let now = Instant::now();
            let gathered = !records.is_empty() || !rejects.is_empty();
            let wait = if gathered && (commit.is_none() || now >= deadline) {
                // Gather what is already buffered; do not wait for more.
                Duration::ZERO
            } else if now >= deadline && read_once {
                break;
            } else {
                deadline.saturating_duration_since(now)
            };
            read_once = true;
            let wait = wait.max(Duration::from_millis(1));
            let message = match commit.as_mut() {
                // `recv` keeps a partly read message buffered when it is cancelled.
                Some(done) => tokio::select! {
                    biased;
                    _ = done => {
                        commit = None;
                        if gathered {
                            // Take what is buffered and return.
                            continue;
                        }
                        break;
                    }
                    message = stream.repl.recv(wait) => message?,
                },
                None => stream.repl.recv(wait).await?,
            };
            let Some(message) = message else {
                if records.is_empty() && rejects.is_empty() && heartbeat > 0 && !asked_reply && stream.tx.is_none() {
                    // Ask the server for its position so an idle stream can advance.
                    stream.repl.send_status(stream.confirmed, true).await?;
                    stream.last_status = Instant::now();
                    asked_reply = true;
                    continue;
                }
                break;
            };
            match message {
                StreamMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    if stream.tx.is_none() && wal_end > stream.idle_position {
                        stream.idle_position = wal_end;
                    }
                    if reply_requested {
                        stream.repl.send_status(stream.confirmed, false).await?;
                        stream.last_status = Instant::now();
                    }
                }
                StreamMessage::XLogData { data, .. } => {
                    let message = Message::decode(data).map_err(|e| {
                        ConnectorError::transient("protocol", format!("undecodable pgoutput message: {e}"))
                    })?;
                    self.apply_message(message, &mut records, &mut rejects)?;
                }
            }
        }
        let Phase::Streaming(stream) = &mut self.phase else {
            unreachable!("still streaming");
        };
        self.lag_seconds = if stream.newest_commit_us > 0 && !records.is_empty() {
            let now_us = chrono::Utc::now().timestamp_micros();
            ((now_us - stream.newest_commit_us).max(0) as f64) / 1e6
        } else {
            0.0
        };
        if stream.tx.is_none() && stream.idle_position > stream.position {
            stream.position = stream.idle_position;
        }
        let previous = parse_lsn(&self.checkpoint.lsn).unwrap_or(0);
        let was_inside = self.checkpoint.tx.is_some();
        self.checkpoint.lsn = format_lsn(stream.position);
        self.checkpoint.tx = match (&stream.tx, stream.skip_next) {
            (Some(tx), _) => Some(TxProgress {
                commit_lsn: format_lsn(tx.commit_lsn),
                done: tx.seen,
            }),
            // Restarted inside a transaction that has not come again yet: keep what is
            // known to be yielded of it.
            (None, Some((commit_lsn, done))) => Some(TxProgress {
                commit_lsn: format_lsn(commit_lsn),
                done,
            }),
            (None, None) => None,
        };
        let due = stream
            .last_metrics
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(self.cfg.status_interval_secs.max(1)));
        if due {
            stream.last_metrics = Some(Instant::now());
            slot_metrics(&stream.client, &self.slot, &self.system, &self.link).await;
        }
        let advanced = stream.position > previous;
        let heartbeat_due = heartbeat > 0 && stream.last_yield.elapsed() >= Duration::from_secs(heartbeat);
        if stream.resnapshot && stream.tx.is_none() {
            // Pause the stream and read the table again; the checkpoint says so, so a
            // crash resumes the re-snapshot and then the stream from this position.
            stream.resnapshot = false;
            let client = connect(&self.cfg, &self.base_dir)
                .await
                .map_err(|e| connect_error(&e))?;
            self.checkpoint.snapshot = Some(SnapshotProgress {
                after: None,
                as_of_ms: Some(server_time_ms(&client).await?),
            });
            let Phase::Streaming(stream) = std::mem::replace(&mut self.phase, Phase::Closed) else {
                unreachable!("still streaming");
            };
            self.phase = Phase::Snapshot(Box::new(SnapshotReader {
                then: AfterSnapshot::Resume(stream),
                client,
                in_snapshot: false,
            }));
            return Ok(Some(SourceBatch {
                records,
                rejects,
                checkpoint: serde_json::to_value(&self.checkpoint).expect("a checkpoint serialises"),
            }));
        }
        // A transaction whose changes were yielded in earlier batches ended: move the
        // checkpoint past its commit now rather than at the next heartbeat.
        let finished_tx = was_inside && self.checkpoint.tx.is_none();
        if records.is_empty() && rejects.is_empty() && !(advanced && (heartbeat_due || finished_tx)) {
            return Ok(None);
        }
        stream.last_yield = Instant::now();
        Ok(Some(SourceBatch {
            records,
            rejects,
            checkpoint: serde_json::to_value(&self.checkpoint).expect("a checkpoint serialises"),
        }))
    }

    fn apply_message(
        &mut self,
        message: Message,
        records: &mut Vec<SourceRecord>,
        rejects: &mut Vec<SourceReject>,
    ) -> Result<(), ConnectorError> {
        let Phase::Streaming(stream) = &mut self.phase else {
            unreachable!("messages arrive while streaming");
        };
        match message {
            Message::Begin {
                final_lsn, commit_time, ..
            } => {
                let skip = match stream.skip_next.take() {
                    Some((lsn, done)) if lsn == final_lsn => done,
                    _ => 0,
                };
                stream.tx = Some(OpenTx {
                    commit_lsn: final_lsn,
                    commit_time_us: commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS),
                    seen: 0,
                    skip,
                });
            }
            Message::Commit {
                end_lsn, commit_time, ..
            } => {
                stream.tx = None;
                stream.position = stream.position.max(end_lsn);
                stream.idle_position = stream.idle_position.max(end_lsn);
                stream.newest_commit_us = commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS);
            }
            Message::Relation(relation) => {
                if stream.table_relid == Some(relation.id)
                    || (relation.namespace == self.table.schema && relation.name == self.table.table)
                {
                    for name in &self.mapped {
                        let Some(column) = relation.columns.iter().find(|c| &c.name == name) else {
                            return Err(ConnectorError::fatal(
                                "schema",
                                format!(
                                    "column {name:?} that link {} maps was dropped from table {}: add it back or \
                                     change the link's mapping, then restart",
                                    self.link, self.table
                                ),
                            ));
                        };
                        if let Some(&before) = stream.mapped_types.get(name)
                            && before != column.type_oid
                        {
                            return Err(ConnectorError::fatal(
                                "schema",
                                format!(
                                    "column {name:?} that link {} maps changed type in table {} (oid {before} to {}): \
                                     check the mapping, then re-snapshot the link",
                                    self.link, self.table, column.type_oid
                                ),
                            ));
                        }
                        stream.mapped_types.insert(name.clone(), column.type_oid);
                    }
                    stream.table_relid = Some(relation.id);
                    stream.kinds = relation
                        .columns
                        .iter()
                        .map(|c| {
                            stream
                                .catalog_kinds
                                .get(&c.type_oid)
                                .cloned()
                                .unwrap_or_else(|| kind_of(c.type_oid))
                        })
                        .collect();
                }
                stream.relations.insert(relation.id, relation);
            }
            Message::Insert { relation, new } => {
                if stream.table_relid == Some(relation) && count_change(stream) {
                    match self.upsert(relation, &new) {
                        Ok(record) => records.push(record),
                        Err(reject) => rejects.push(reject),
                    }
                }
            }
            Message::Update { relation, old, new } => {
                if stream.table_relid == Some(relation) && count_change(stream) {
                    match self.upsert(relation, &new) {
                        Ok(record) => {
                            // A changed id: the old row is gone under its old id.
                            if let Some((_, old)) = &old
                                && let Some(old_id) = self.id_of(relation, old)
                                && old_id != record.local_id
                            {
                                records.push(delete(old_id, self.commit_ms()));
                            }
                            records.push(record);
                        }
                        Err(reject) => rejects.push(reject),
                    }
                }
            }
            Message::Delete { relation, old } => {
                if stream.table_relid == Some(relation) && count_change(stream) {
                    let (kind, values) = old;
                    match self.id_of(relation, &values) {
                        Some(id) => records.push(delete(id, self.commit_ms())),
                        None => rejects.push(
                            self.reject(
                                match kind {
                                    OldKind::Key => {
                                        "delete without the id column: the replica identity index does not \
                                                 hold it; use REPLICA IDENTITY FULL or the primary key"
                                    }
                                    OldKind::Full => "delete without the id column",
                                }
                                .to_string(),
                            ),
                        ),
                    }
                }
            }
            Message::Truncate { relations, .. } => {
                if let Some(relid) = stream.table_relid
                    && relations.contains(&relid)
                    && count_change(stream)
                {
                    tracing::warn!(system = %self.system, link = %self.link, "table truncated; re-snapshot the link to reconcile");
                    rejects.push(self.reject(format!(
                        "table {} was truncated: the rows it removed are not named by the stream; re-snapshot the link",
                        self.table
                    )));
                }
            }
            Message::Message {
                prefix,
                content,
                transactional,
                lsn,
            } if prefix == RESNAPSHOT_PREFIX => {
                if content.as_ref() == self.table.to_string().as_bytes() {
                    tracing::info!(system = %self.system, link = %self.link, "re-snapshot requested");
                    stream.resnapshot = true;
                }
                // A request outside a transaction moves no commit position: step past it
                // so a restart does not stream it (and read the table) once more. The
                // server sends a transaction whose commit is after the position whole,
                // so no change written before the request is skipped.
                if !transactional && stream.tx.is_none() {
                    stream.position = stream.position.max(lsn.saturating_add(1));
                }
            }
            Message::Origin { .. } | Message::Type { .. } | Message::Message { .. } => {}
        }
        Ok(())
    }

    fn commit_ms(&self) -> Option<i64> {
        match &self.phase {
            Phase::Streaming(stream) => stream.tx.as_ref().map(|tx| tx.commit_time_us / 1000),
            _ => None,
        }
    }

    fn reject(&self, reason: String) -> SourceReject {
        let location = match &self.phase {
            Phase::Streaming(stream) => match &stream.tx {
                Some(tx) => format!("slot {} transaction {}", self.slot, format_lsn(tx.commit_lsn)),
                None => format!("slot {}", self.slot),
            },
            _ => format!("slot {}", self.slot),
        };
        SourceReject {
            location,
            reason,
            raw: String::new(),
        }
    }

    /// A new tuple as an upsert: unchanged TOAST values are left out of the fields so
    /// the shadow keeps them.
    fn upsert(&self, relation: u32, values: &[TupleValue]) -> Result<SourceRecord, SourceReject> {
        let Phase::Streaming(stream) = &self.phase else {
            unreachable!("tuples arrive while streaming");
        };
        let Some(rel) = stream.relations.get(&relation) else {
            return Err(self.reject("change before its relation message".into()));
        };
        let mut fields = serde_json::Map::new();
        for (i, value) in values.iter().enumerate() {
            let Some(column) = rel.columns.get(i) else {
                return Err(self.reject("tuple has more columns than its relation".into()));
            };
            let json = match value {
                TupleValue::Null => Value::Null,
                TupleValue::Unchanged => continue,
                TupleValue::Text(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => to_json(stream.kinds.get(i).unwrap_or(&Kind::Text), text),
                    Err(_) => return Err(self.reject(format!("column {:?} is not utf-8", column.name))),
                },
                TupleValue::Binary(_) => {
                    return Err(self.reject(format!("column {:?} came in binary format", column.name)));
                }
            };
            fields.insert(column.name.clone(), json);
        }
        let Some(id) = fields.get(&self.id_field).filter(|v| !v.is_null()) else {
            return Err(self.reject(format!("row without a value in id column {:?}", self.id_field)));
        };
        let local_id = id_string(id);
        let version = self.version_field.as_ref().and_then(|f| fields.get(f)).map(id_string);
        Ok(SourceRecord {
            local_id,
            kind: ChangeKind::Upsert,
            fields,
            version,
            source_time_ms: self.commit_ms(),
        })
    }

    /// The id from an old tuple (key or full), if it holds the id column.
    fn id_of(&self, relation: u32, values: &[TupleValue]) -> Option<String> {
        let Phase::Streaming(stream) = &self.phase else {
            return None;
        };
        let rel = stream.relations.get(&relation)?;
        let index = rel.columns.iter().position(|c| c.name == self.id_field)?;
        match values.get(index)? {
            TupleValue::Text(bytes) => {
                let text = std::str::from_utf8(bytes).ok()?;
                Some(id_string(&to_json(
                    stream.kinds.get(index).unwrap_or(&Kind::Text),
                    text,
                )))
            }
            _ => None,
        }
    }

    pub async fn committed(&mut self, checkpoint: &Checkpoint) -> Result<(), ConnectorError> {
        let parsed: PgCheckpoint = serde_json::from_value(checkpoint.clone())
            .map_err(|_| ConnectorError::fatal("checkpoint", "checkpoint is not a postgres source checkpoint"))?;
        let flush = parse_lsn(&parsed.lsn)
            .ok_or_else(|| ConnectorError::fatal("checkpoint", "checkpoint holds no valid lsn"))?;
        self.committed = Some(parsed);
        if let Phase::Streaming(stream) = &mut self.phase
            && flush > stream.confirmed
        {
            stream.confirmed = flush;
            stream.repl.send_status(flush, false).await?;
            stream.last_status = Instant::now();
        }
        Ok(())
    }

    pub fn lag_seconds(&self) -> f64 {
        self.lag_seconds
    }

    /// The flush position last sent to the server.
    pub fn confirmed_lsn(&self) -> Option<Lsn> {
        match &self.phase {
            Phase::Streaming(stream) => Some(stream.confirmed),
            _ => None,
        }
    }

    /// The entity this source captures.
    pub fn entity(&self) -> &str {
        &self.entity
    }
}

/// Counts a change of the table in the open transaction; false when it was already
/// yielded before a restart and must be skipped.
fn count_change(stream: &mut Stream) -> bool {
    match &mut stream.tx {
        Some(tx) => {
            tx.seen += 1;
            tx.seen > tx.skip
        }
        None => true,
    }
}

fn delete(local_id: String, source_time_ms: Option<i64>) -> SourceRecord {
    SourceRecord {
        local_id,
        kind: ChangeKind::Delete,
        fields: serde_json::Map::new(),
        version: None,
        source_time_ms,
    }
}

/// The text of an id or version value: a string as it is, anything else as JSON.
/// The snapshot's select expression for a column: the text the type's output
/// function makes, which is what pgoutput sends, so snapshot and stream give the same
/// canonical value. A cast to `text` is that text for most built-in types, and the
/// cheapest; not for `char(n)` (the cast strips the padding) nor `inet` (the cast adds
/// the `/32` the output leaves out), nor for a domain over either, so those (and every
/// type created in the database) go through `format('%s', …)`, which calls the output
/// function, with NULL kept as NULL.
fn snapshot_text(column: &str, type_oid: u32) -> String {
    /// `bpchar` and `inet`.
    const OUTPUT_DIFFERS: [u32; 2] = [1042, 869];
    /// Object ids below this are the system's own (`FirstNormalObjectId`).
    const FIRST_USER_OID: u32 = 16384;
    let column = quote_ident(column);
    if OUTPUT_DIFFERS.contains(&type_oid) || type_oid >= FIRST_USER_OID {
        format!("CASE WHEN t.{column} IS NULL THEN NULL ELSE format('%s', t.{column}) END")
    } else {
        format!("t.{column}::text")
    }
}

fn id_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The kind of a column from the catalog: arrays of non-built-in element types
/// (category `A`) are arrays of their element's kind.
fn column_kind(oid: u32, category: &str, element: u32) -> Kind {
    match kind_of(oid) {
        Kind::Text if category == "A" && element != 0 => Kind::Array(Box::new(kind_of(element))),
        kind => kind,
    }
}

/// A tokio-postgres error, classified by SQLSTATE ([`super::error`]); a server error's
/// reason names objects, never the server's message (which can quote a value).
fn pg_error(what: &str, error: &tokio_postgres::Error) -> ConnectorError {
    match error.as_db_error() {
        Some(db) => super::error::classify_db(what, db),
        None => {
            let mut reason = format!("{what}: {error}");
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                reason.push_str(": ");
                reason.push_str(&cause.to_string());
                source = cause.source();
            }
            ConnectorError::transient("connection", reason)
        }
    }
}

fn connect_error(error: &super::ConnectError) -> ConnectorError {
    match error {
        super::ConnectError::Postgres(e) => pg_error("connecting", e),
        other => ConnectorError::fatal("config", other.to_string()),
    }
}

/// Sets the slot gauges: WAL the server retains for the slot and how far its confirmed
/// position trails the server's WAL. A failed query leaves them as they were.
async fn slot_metrics(client: &tokio_postgres::Client, slot: &str, system: &str, link: &str) {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::float8, (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    if let Ok(Some(row)) = row {
        let retained: Option<f64> = row.get(0);
        let lag: Option<f64> = row.get(1);
        metrics::gauge!(m::PG_SLOT_RETAINED_WAL, m::LABEL_SYSTEM => system.to_string(), m::LABEL_LINK => link.to_string())
            .set(retained.unwrap_or(0.0));
        metrics::gauge!(m::PG_SLOT_CONFIRMED_LAG, m::LABEL_SYSTEM => system.to_string(), m::LABEL_LINK => link.to_string())
            .set(lag.unwrap_or(0.0));
    }
}

/// The server's clock in ms since the epoch: the clock the commit times of streamed
/// changes come from.
async fn server_time_ms(client: &tokio_postgres::Client) -> Result<i64, ConnectorError> {
    let row = client
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])
        .await
        .map_err(|e| pg_error("reading the server clock", &e))?;
    Ok(row.get(0))
}
