//! The shared vocabulary: what a source yields, what a change is once mapped to
//! canonical fields, what concord remembers about a record, and what it asks a sink to
//! write. Every other module speaks in these types.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A field value. Canonical values are JSON values so that JSON Schema validates them
/// directly and every connector can carry them without a lossy conversion.
pub type Value = serde_json::Value;

/// Canonical fields of one record, ordered by name so that encodings are stable.
///
/// A JSON object's own map (a `BTreeMap` inside, since no crate here turns on
/// serde_json's `preserve_order`; a test holds that), so a record's fields become the
/// JSON object the schema validator reads, and come back, without a copy.
pub type Fields = serde_json::Map<String, Value>;

/// Milliseconds since the Unix epoch. Source times and decision times use it.
pub type TimeMs = i64;

/// concord's own id for a record, the same across every system. A UUIDv7, so ids sort
/// by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GlobalId(pub uuid::Uuid);

impl GlobalId {
    /// A new time-ordered id. The random bits come from the thread's generator (the
    /// `fast-rng` feature of `uuid`), not one system call per id.
    pub fn new_v7() -> Self {
        GlobalId(uuid::Uuid::now_v7())
    }
    pub fn as_u128(self) -> u128 {
        self.0.as_u128()
    }
    pub fn from_u128(v: u128) -> Self {
        GlobalId(uuid::Uuid::from_u128(v))
    }
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for GlobalId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(GlobalId)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Upsert,
    Delete,
}

/// One record as a source yields it, in the system's own field names, before mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The system's id for the record.
    pub local_id: String,
    pub kind: ChangeKind,
    /// System fields as read. Empty for deletes.
    pub fields: serde_json::Map<String, Value>,
    /// The system's version or etag of the record, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// When the system committed the change; `None` when the source cannot tell, in
    /// which case the capture time is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_time_ms: Option<TimeMs>,
}

/// A source item that could not be read as a record (a broken CSV row, a JSONL line
/// that is not JSON). It becomes a dead letter; the rest of the batch goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceReject {
    /// Where in the source the item was (file and line, page, LSN).
    pub location: String,
    pub reason: String,
    /// The raw item, bounded in size, for replay after a fix.
    pub raw: String,
}

/// A change mapped to canonical fields: the merge's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub system: String,
    pub entity: String,
    pub local_id: String,
    pub kind: ChangeKind,
    /// Canonical fields the system holds for this entity (only those its link maps).
    pub fields: Fields,
    pub version: Option<String>,
    pub source_time_ms: TimeMs,
}

/// Where one canonical field's agreed value came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub system: String,
    /// The system's record version when it set the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub source_time_ms: TimeMs,
    /// The rule that accepted the value.
    pub rule: crate::merge::Rule,
    /// The decision that set it.
    pub decision: u64,
}

/// One agreed field value with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreedField {
    pub value: Value,
    pub from: Provenance,
}

/// The last agreed canonical version of a record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Base {
    pub fields: BTreeMap<String, AgreedField>,
    /// A tombstone: the record was deleted by a system allowed to delete it.
    #[serde(default)]
    pub deleted: bool,
}

impl Base {
    pub fn value(&self, field: &str) -> Option<&Value> {
        self.fields.get(field).map(|f| &f.value)
    }
    /// The agreed values without provenance.
    pub fn values(&self) -> Fields {
        self.fields.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect()
    }
}

/// concord's last-seen copy of a record as one system holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    /// The system's id for the record, once known (a create returns it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<String>,
    /// Values the system was last seen or confirmed to hold.
    pub fields: Fields,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Values sent in writes that are not confirmed yet. Writes are planned against the
    /// shadow overlaid with these, so a pending write is not planned twice.
    #[serde(default, skip_serializing_if = "Fields::is_empty")]
    pub pending: Fields,
    /// Fields where the system keeps its own value by policy (`ignore`, `flag`) and
    /// is therefore not written until the agreed value changes.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub diverged: BTreeSet<String>,
    /// The system deleted the record, or concord deleted it there.
    #[serde(default)]
    pub deleted: bool,
}

impl Shadow {
    /// What the system holds once every pending write lands.
    pub fn expected(&self, field: &str) -> Option<&Value> {
        self.pending.get(field).or_else(|| self.fields.get(field))
    }
}

/// Everything concord remembers about one record: one row in the state store, because
/// every merge reads and writes all of it together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordState {
    pub base: Base,
    /// By system name.
    pub shadows: BTreeMap<String, Shadow>,
    /// Normalised match-key values currently indexed for this record, by key field.
    #[serde(default)]
    pub match_keys: BTreeMap<String, String>,
    pub created_ms: TimeMs,
    pub updated_ms: TimeMs,
}

/// One write to one system, as the applier hands it to a sink: system field names,
/// resolved operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Write {
    /// Outbox sequence of the (last) entry this write carries; an idempotency key.
    pub seq: u64,
    pub entity: String,
    pub global_id: GlobalId,
    pub op: WriteOp,
    /// The system's id; `None` for a create.
    pub local_id: Option<String>,
    /// Object, table or file pattern of the link.
    pub object: String,
    /// System fields to set.
    pub fields: serde_json::Map<String, Value>,
    /// Version the system should still hold (optimistic concurrency), if known.
    pub expected_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOp {
    Create,
    Update,
    Delete,
}

impl WriteOp {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteOp::Create => "create",
            WriteOp::Update => "update",
            WriteOp::Delete => "delete",
        }
    }
}

/// What a system answered to a successful write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteAck {
    /// The system's id of the record (the one it assigned, for a create).
    pub local_id: String,
    /// The record's new version, when the system reports one.
    pub version: Option<String>,
}

/// Wall-clock now in milliseconds. Only the engine and connectors call it; the merge
/// takes time as an input.
pub fn now_ms() -> TimeMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as TimeMs)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodings, decisions and the merge walk fields in name order. serde_json keeps
    /// its maps in insertion order when any crate in the build turns on its
    /// `preserve_order` feature; this fails if one ever does.
    #[test]
    fn fields_iterate_in_name_order_whatever_the_insertion_order() {
        let mut fields = Fields::new();
        for name in ["phone", "email", "title", "certified"] {
            fields.insert(name.to_string(), Value::Null);
        }
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(names, ["certified", "email", "phone", "title"]);
    }
}
