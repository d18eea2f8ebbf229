//! The seam between concord and the systems it connects: the [`Source`] and [`Sink`]
//! contracts, the error classification every connector reports, and the closed set of
//! connector types. Only code under this module talks to external systems.

pub mod file;
pub mod memory;
pub mod postgres;
pub mod rest;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{SourceRecord, SourceReject, Write, WriteAck};

/// How the engine should treat a failed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// May succeed if tried again later (timeouts, 429, 5xx, connection refused).
    Transient,
    /// Will fail again the same way (validation refused, 4xx): dead-letter it.
    Permanent,
    /// The link cannot go on (slot lost, credentials revoked): stop the link, report.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// An error from a connector, classified. `reason` is a short lowercase text that never
/// holds a secret or a record value; `kind` is a bounded label for metrics.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct ConnectorError {
    pub class: ErrorClass,
    pub kind: &'static str,
    pub reason: String,
    /// The system asked to wait this long before trying again (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

impl ConnectorError {
    pub fn transient(kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            kind,
            reason: reason.into(),
            retry_after: None,
        }
    }
    pub fn permanent(kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            kind,
            reason: reason.into(),
            retry_after: None,
        }
    }
    pub fn fatal(kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Fatal,
            kind,
            reason: reason.into(),
            retry_after: None,
        }
    }
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

/// An error and its causes as one line, `outer: inner: …`, the form a
/// [`ConnectorError::reason`] takes.
pub(crate) fn reason_chain(error: &dyn std::error::Error) -> String {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    reason
}

/// An opaque source position (file and byte offset, cursor, LSN), stored in the state
/// store in the same transaction as the batch's effects.
pub type Checkpoint = serde_json::Value;

/// What one call to [`Source::next_batch`] yields.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub records: Vec<SourceRecord>,
    /// Items that could not be read as records; they become dead letters.
    pub rejects: Vec<SourceReject>,
    /// The position after this batch. The engine stores it with the batch's effects and
    /// then calls [`Source::committed`] with it.
    pub checkpoint: Checkpoint,
}

/// Resolves when the engine's commit of a batch has finished (or failed); see
/// [`AnySource::gather_during`].
pub type CommitDone = tokio::sync::oneshot::Receiver<()>;

/// A stream of changes from one link (one system, one entity).
///
/// Contract:
/// - At least once: after a crash the source resumes from the last checkpoint the
///   engine committed, so items after it may be yielded again. The merge makes a
///   repeated change a no-op.
/// - Order: items of one record are yielded in the order the system made them.
/// - The engine calls `next_batch` and `committed` from one task; a source acknowledges
///   upstream (moves a file, confirms an LSN) only in `committed`, which runs once a
///   durable redb commit covers the batch. A source whose
///   [`AnySource::acknowledgement_may_wait`] is true may be asked for further batches
///   first, and is then told only the latest durable checkpoint.
/// - `Ok(None)` means nothing is available now; the engine waits the capture interval.
/// - Errors are classified: transient ones are retried with backoff, fatal ones stop
///   the link and show in status.
pub trait Source: Send {
    fn next_batch(
        &mut self,
        max_records: usize,
    ) -> impl Future<Output = Result<Option<SourceBatch>, ConnectorError>> + Send;

    fn committed(&mut self, checkpoint: &Checkpoint) -> impl Future<Output = Result<(), ConnectorError>> + Send;

    /// Age in seconds of the oldest change the source knows of but has not yielded.
    fn lag_seconds(&self) -> f64;
}

/// Writes to one system.
///
/// Contract:
/// - Idempotent: the engine may repeat a write after a crash (it was sent but its
///   confirmation was not committed). Sinks use upserts by id or external id and
///   version checks where the system has them, so a repeat changes nothing.
/// - `apply` returns one result per write, in order. A sink may apply the writes in any
///   order except that writes to one record keep their order.
/// - Creates return the id the system assigned; the engine records it in the identity
///   map.
pub trait Sink: Send {
    fn apply(&mut self, writes: Vec<Write>) -> impl Future<Output = Vec<Result<WriteAck, ConnectorError>>> + Send;
}

/// A source of any connector type. A closed enum: `match` dispatches.
pub enum AnySource {
    File(file::FileSource),
    Memory(memory::MemorySource),
    /// Boxed: its state is far larger than the other variants'.
    Rest(Box<rest::RestSource>),
    Postgres(Box<postgres::PostgresSource>),
}

impl AnySource {
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        match self {
            AnySource::File(s) => s.next_batch(max).await,
            AnySource::Memory(s) => s.next_batch(max).await,
            AnySource::Rest(s) => s.next_batch(max).await,
            AnySource::Postgres(s) => s.next_batch(max).await,
        }
    }
    pub async fn committed(&mut self, checkpoint: &Checkpoint) -> Result<(), ConnectorError> {
        match self {
            AnySource::File(s) => s.committed(checkpoint).await,
            AnySource::Memory(s) => s.committed(checkpoint).await,
            AnySource::Rest(s) => s.committed(checkpoint).await,
            AnySource::Postgres(s) => s.committed(checkpoint).await,
        }
    }
    /// Whether the source may yield further batches before the earlier ones are
    /// acknowledged, so the engine may commit them lazily and acknowledge them once a
    /// durable commit covers them (group commit). A file source waits for its
    /// acknowledgement to move the file it read, so its batches are durable at once.
    pub fn acknowledgement_may_wait(&self) -> bool {
        match self {
            AnySource::Postgres(_) | AnySource::Rest(_) | AnySource::Memory(_) => true,
            AnySource::File(_) => false,
        }
    }
    /// Whether `next_batch` itself waits (boundedly) for new data, as a replication stream
    /// does: the engine then calls again at once after an empty batch instead of sleeping
    /// the link's capture interval, which would only add latency.
    pub fn waits_for_data(&self) -> bool {
        match self {
            AnySource::Postgres(s) => s.waits_for_data(),
            AnySource::File(_) | AnySource::Memory(_) | AnySource::Rest(_) => false,
        }
    }
    /// Whether the source stands between transactions of a stream (always, for sources
    /// that are not streams): what it returned so far can all be acknowledged.
    pub fn between_transactions(&self) -> bool {
        match self {
            AnySource::Postgres(s) => s.between_transactions(),
            AnySource::File(_) | AnySource::Memory(_) | AnySource::Rest(_) => true,
        }
    }
    /// Bounds how long `next_batch` may wait for new data before it answers `Ok(None)`,
    /// for sources that wait ([`AnySource::waits_for_data`]); `None` lifts the bound.
    pub fn limit_wait(&mut self, limit: Option<std::time::Duration>) {
        match self {
            AnySource::Postgres(s) => s.limit_wait(limit),
            AnySource::File(_) | AnySource::Memory(_) | AnySource::Rest(_) => {}
        }
    }
    /// Lets the next `next_batch` gather changes while the engine commits the previous
    /// batch, for sources that wait for data ([`AnySource::waits_for_data`]): the call
    /// returns once `commit` resolves (see [`postgres::PostgresSource::gather_during`]).
    /// Other sources answer as usual.
    pub fn gather_during(&mut self, commit: CommitDone) {
        match self {
            AnySource::Postgres(s) => s.gather_during(commit),
            AnySource::File(_) | AnySource::Memory(_) | AnySource::Rest(_) => {}
        }
    }
    pub fn lag_seconds(&self) -> f64 {
        match self {
            AnySource::File(s) => s.lag_seconds(),
            AnySource::Memory(s) => s.lag_seconds(),
            AnySource::Rest(s) => s.lag_seconds(),
            AnySource::Postgres(s) => s.lag_seconds(),
        }
    }
}

/// A sink of any connector type.
pub enum AnySink {
    File(file::FileSink),
    Memory(memory::MemorySink),
    Rest(rest::RestSink),
    /// Boxed: it holds a connection, statement cache and catalog, far larger than the others.
    Postgres(Box<postgres::sink::PostgresSink>),
}

impl AnySink {
    pub async fn apply(&mut self, writes: Vec<Write>) -> Vec<Result<WriteAck, ConnectorError>> {
        match self {
            AnySink::File(s) => s.apply(writes).await,
            AnySink::Memory(s) => s.apply(writes).await,
            AnySink::Rest(s) => s.apply(writes).await,
            AnySink::Postgres(s) => s.apply(writes).await,
        }
    }

    /// Records read again after writes the system refused because the record changed
    /// there (HTTP 412) or, for a create, already exists (a unique key taken), since the
    /// last call. The applier merges each as a change from
    /// the system and plans the refused write again from the result.
    pub fn take_rereads(&mut self) -> Vec<rest::Reread> {
        match self {
            AnySink::Rest(s) => s.take_rereads(),
            AnySink::Postgres(s) => s.take_rereads(),
            AnySink::File(_) | AnySink::Memory(_) => Vec::new(),
        }
    }
}

/// Opens every source (capturing links, resumed from their committed checkpoints) and
/// every sink (writing systems) the configuration asks for.
pub fn open_all(
    rt: &crate::engine::runtime::Runtime,
    store: &crate::state::StateStore,
) -> Result<crate::engine::Connectors, OpenError> {
    use crate::config::ConnectorConfig;
    let mut connectors = crate::engine::Connectors::default();
    let view = store.read()?;
    let base_dir = &rt.config.base_dir;
    // One client per REST system: its links and its sink share the pool and the budget.
    let mut rest_clients = RestClients::default();
    for link in rt.links.iter().filter(|l| l.captures) {
        let system = &rt.config.systems[&link.config.system];
        let checkpoint = view.checkpoint(&link.config.system, &link.name)?;
        let source = match &system.connector {
            ConnectorConfig::File(cfg) => AnySource::File(
                file::FileSource::open(&link.config.system, cfg, &link.config, base_dir, checkpoint.as_ref()).map_err(
                    |source| OpenError::Connector {
                        what: link.name.clone(),
                        source,
                    },
                )?,
            ),
            ConnectorConfig::Rest(cfg) => {
                let client = rest_clients.get(&link.config.system, system, cfg, base_dir)?;
                let system_name = link.config.system.as_str();
                let known = || {
                    view.records(&link.config.entity)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|(_, state)| {
                            let shadow = state.shadows.get(system_name)?;
                            if shadow.deleted { None } else { shadow.local_id.clone() }
                        })
                        .collect()
                };
                let source = rest::RestSource::open(client, &cfg.objects, &link.config, checkpoint.as_ref(), known)
                    .map_err(|source| OpenError::Connector {
                        what: link.name.clone(),
                        source,
                    })?;
                AnySource::Rest(Box::new(source))
            }
            ConnectorConfig::Postgres(cfg) => AnySource::Postgres(Box::new(
                postgres::PostgresSource::open(&link.config.system, cfg, &link.config, base_dir, checkpoint.as_ref())
                    .map_err(|source| OpenError::Connector {
                    what: link.name.clone(),
                    source,
                })?,
            )),
        };
        connectors.sources.push((link.index, source));
    }
    for system_name in rt.writing_systems() {
        let system = &rt.config.systems[&system_name];
        let sink = match &system.connector {
            ConnectorConfig::File(cfg) => {
                AnySink::File(file::FileSink::open(&system_name, cfg, base_dir).map_err(|source| {
                    OpenError::Connector {
                        what: system_name.clone(),
                        source,
                    }
                })?)
            }
            ConnectorConfig::Rest(cfg) => {
                let client = rest_clients.get(&system_name, system, cfg, base_dir)?;
                let links = rt
                    .links
                    .iter()
                    .filter(|l| l.writes && l.config.system == system_name)
                    .map(|l| &l.config);
                AnySink::Rest(
                    rest::RestSink::open(client, &cfg.objects, links, cfg.max_concurrency).map_err(|source| {
                        OpenError::Connector {
                            what: system_name.clone(),
                            source,
                        }
                    })?,
                )
            }
            ConnectorConfig::Postgres(cfg) => {
                let tables = rt
                    .links
                    .iter()
                    .filter(|l| l.writes && l.config.system == system_name)
                    .map(|l| postgres::sink::SinkTable {
                        object: l.config.object.clone(),
                        id_field: l.config.id_field.clone(),
                        version_field: l.config.version_field.clone(),
                    })
                    .collect();
                AnySink::Postgres(Box::new(
                    postgres::sink::PostgresSink::open(&system_name, cfg, base_dir, tables).map_err(|source| {
                        OpenError::Connector {
                            what: system_name.clone(),
                            source,
                        }
                    })?,
                ))
            }
        };
        connectors.sinks.insert(system_name, sink);
    }
    Ok(connectors)
}

#[derive(Default)]
struct RestClients(std::collections::BTreeMap<String, rest::RestClient>);

impl RestClients {
    fn get(
        &mut self,
        name: &str,
        system: &crate::config::SystemConfig,
        config: &rest::RestSystemConfig,
        base_dir: &std::path::Path,
    ) -> Result<rest::RestClient, OpenError> {
        if let Some(client) = self.0.get(name) {
            return Ok(client.clone());
        }
        let client = rest::RestClient::new(name, system, config, base_dir).map_err(|e| OpenError::Connector {
            what: name.to_string(),
            source: e.into(),
        })?;
        self.0.insert(name.to_string(), client.clone());
        Ok(client)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {what}")]
    Connector {
        what: String,
        #[source]
        source: ConnectorError,
    },
    #[error("cannot read checkpoints")]
    State(#[from] crate::state::StateError),
}
