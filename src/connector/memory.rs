//! In-memory source and sink. They are not selectable from configuration: the
//! benchmark and tests build them directly to drive the engine without I/O, and they
//! obey the same contracts as real connectors (checkpointed resume, idempotent writes,
//! ids assigned on create). The sink can be scripted to fail, so tests can drive the
//! applier's retry, backoff and dead-letter paths against a system that misbehaves on
//! cue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use super::{Checkpoint, ConnectorError, SourceBatch};
use crate::model::{GlobalId, SourceRecord, Write, WriteAck, WriteOp};

/// Yields queued records in order; the checkpoint is the count yielded so far.
pub struct MemorySource {
    queue: Arc<Mutex<VecDeque<SourceRecord>>>,
    yielded: u64,
}

impl MemorySource {
    /// A source over a shared queue; push to the queue to feed it.
    pub fn new(queue: Arc<Mutex<VecDeque<SourceRecord>>>, checkpoint: Option<&Checkpoint>) -> Self {
        let yielded = checkpoint.and_then(|c| c.as_u64()).unwrap_or(0);
        Self { queue, yielded }
    }

    pub async fn next_batch(&mut self, max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        let mut queue = self.queue.lock().expect("memory source queue lock is never poisoned");
        if queue.is_empty() {
            return Ok(None);
        }
        let n = max.min(queue.len());
        let records: Vec<SourceRecord> = queue.drain(..n).collect();
        self.yielded += records.len() as u64;
        Ok(Some(SourceBatch {
            records,
            rejects: Vec::new(),
            checkpoint: serde_json::json!(self.yielded),
        }))
    }

    pub async fn committed(&mut self, _checkpoint: &Checkpoint) -> Result<(), ConnectorError> {
        Ok(())
    }

    pub fn lag_seconds(&self) -> f64 {
        0.0
    }
}

/// What a [`MemorySink`] holds: records by the id it assigned, and every write seen.
#[derive(Debug, Default)]
pub struct MemoryTarget {
    pub records: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    /// Records created (a repeated create of one record is not counted again).
    pub creates: u64,
    /// Updates applied.
    pub updates: u64,
    /// Deletes applied.
    pub deletes: u64,
    /// External id (global id) to assigned id, which makes a repeated create an update.
    pub by_external: BTreeMap<String, String>,
    /// Scripted failures: each write takes the front error, if any, and fails with it
    /// instead of being applied. Empty means every write succeeds.
    pub fail_next: VecDeque<ConnectorError>,
    /// Keep every write in `attempts`. Off by default, so a long benchmark run does not
    /// grow memory with every write.
    pub record_attempts: bool,
    /// Every write handed to the sink, in order, failed ones included (when
    /// `record_attempts` is set).
    pub attempts: Vec<Attempt>,
    /// The number of writes in each `apply` call (each applier round), in order (when
    /// `record_attempts` is set).
    pub rounds: Vec<usize>,
    /// Notified (one stored permit) after each `apply` call, so a test can wait for
    /// the applier to reach the system instead of polling.
    pub applied: Arc<Notify>,
}

/// One write as a [`MemorySink`] received it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    pub op: WriteOp,
    pub global_id: GlobalId,
    /// The id the write carried (`None` for a create).
    pub local_id: Option<String>,
    /// Answered by a scripted failure and not applied.
    pub failed: bool,
}

/// Applies writes to a shared [`MemoryTarget`], assigning ids `m-1`, `m-2`, … on create.
pub struct MemorySink {
    target: Arc<Mutex<MemoryTarget>>,
}

impl MemorySink {
    pub fn new(target: Arc<Mutex<MemoryTarget>>) -> Self {
        Self { target }
    }

    pub async fn apply(&mut self, writes: Vec<Write>) -> Vec<Result<WriteAck, ConnectorError>> {
        let mut t = self.target.lock().expect("memory sink lock is never poisoned");
        if t.record_attempts {
            t.rounds.push(writes.len());
        }
        let results = writes
            .into_iter()
            .map(|w| {
                let failure = t.fail_next.pop_front();
                if t.record_attempts {
                    t.attempts.push(Attempt {
                        at: Instant::now(),
                        op: w.op,
                        global_id: w.global_id,
                        local_id: w.local_id.clone(),
                        failed: failure.is_some(),
                    });
                }
                if let Some(error) = failure {
                    return Err(error);
                }
                let external = w.global_id.to_string();
                let id = match (w.op, w.local_id.clone()) {
                    (WriteOp::Create, _) => match t.by_external.get(&external) {
                        Some(id) => id.clone(),
                        None => {
                            t.creates += 1;
                            let id = format!("m-{}", t.creates);
                            t.by_external.insert(external, id.clone());
                            id
                        }
                    },
                    (_, Some(id)) => id,
                    (_, None) => {
                        return Err(ConnectorError::permanent("missing_id", "update without an id"));
                    }
                };
                match w.op {
                    WriteOp::Delete => {
                        t.deletes += 1;
                        t.records.remove(&id);
                    }
                    WriteOp::Create | WriteOp::Update => {
                        if w.op == WriteOp::Update {
                            t.updates += 1;
                        }
                        let rec = t.records.entry(id.clone()).or_default();
                        for (k, v) in w.fields {
                            rec.insert(k, v);
                        }
                    }
                }
                Ok(WriteAck {
                    local_id: id,
                    version: None,
                })
            })
            .collect();
        t.applied.notify_one();
        results
    }
}
