//! The stored form of a record's state (`records` table): a compact binary layout.
//!
//! Every update reads one record row at a random place in the key space and rewrites
//! it, so the row's size decides how many records share a page, how much of the table
//! the page cache holds, and how many bytes a commit writes. JSON repeats every struct
//! field name in every agreed value's provenance; this layout stores only the values.
//!
//! A value starts with a format byte. [`RECORD_COMPACT`] is the layout written now;
//! [`RECORD_BINARY`] rows (schema versions 2 to 7) and rows that start with `{` (the
//! JSON that schema version 1 wrote) are still read, so an existing state file needs
//! no conversion: its rows take the compact form when they are next written. Anything
//! else is refused as malformed.
//!
//! Layout after the format byte (`uN`: LEB128 varint; `iN`: zigzag varint; `str`: `uN`
//! length and UTF-8 bytes; `opt<T>`: byte 0 or 1 then `T`; `map<T>`: `uN` count then
//! `str` key and `T` per entry, keys ascending):
//!
//! ```text
//! base.deleted u8 | base.fields map<value, from>
//! from        = u8 0, provenance | u8 1: the provenance of the field before
//! provenance  = system str | version opt<str> | source_time_ms iN | rule u8 | decision uN
//! shadows     map<shadow>
//! shadow      = local_id opt<str> | fields map<svalue> | version opt<str> | pending map<svalue>
//!               | diverged uN count, str each | deleted u8
//! svalue      = value | u8 9: the agreed value of the field of the same name
//! match_keys  map<key> | created_ms iN | updated_ms iN
//! key         = u8 0, str | u8 1: the agreed value (a string) of the field of that name
//! value       = tag u8 (0 null, 1 false, 2 true, 3 i64 as iN, 4 u64 as uN, 5 f64 LE,
//!               6 str, 7 array: uN count then values, 8 object: map<value>)
//! ```
//!
//! Most fields hold the same value in the agreed version and in the shadow of the
//! system it came from (and, once written, in every other system's shadow), and the
//! fields of one change share one provenance: the references store each such value
//! once. A shadow value refers to the agreed value only when their encodings are the
//! same bytes. [`RECORD_BINARY`] is the same layout without references: `from` is the
//! provenance alone, `svalue` a value and `key` a `str`.
//!
//! Pending writes (`outbox` table) use the same building blocks, with their own format
//! byte [`OUTBOX_BINARY`]; a row that starts with `{` is JSON, as schema version 1 wrote:
//!
//! ```text
//! seq uN | system str | entity str | global_id 16 bytes LE | action | source_system str
//! | source_time_ms iN | decision uN | enqueued_ms iN | attempts uN | last_error opt<str>
//! action = u8 0 upsert, map<value> | 1 delete | 2 soft delete, field str, value
//! ```
//!
//! Merge decisions (`decisions` table) too, format byte [`DECISION_BINARY`], JSON before
//! schema version 4:
//!
//! ```text
//! id uN | time_ms iN | entity str | global_id 16 bytes LE | system str | local_id str
//! | kind u8 (0 upsert, 1 delete) | source_time_ms iN | version opt<str>
//! | fields uN count, field each | outcome u8 (0 created, 1 updated, 2 deleted, 3 noop)
//! | flagged u8 | writes uN count, write each
//! field = name str | rule u8 | incoming value | previous opt<value> | conflict u8
//!         | policy u8 (0 none, 1 revert, 2 ignore, 3 flag)
//! write = system str | mode u8 (0 send, 1 dry run, 2 outside rollout) | action str
//!         | fields uN count, str each | seq opt<uN>
//! ```
//!
//! The decisions of one write transaction are stored as one row, a group, keyed by
//! the first decision's id (format byte [`DECISION_GROUP`], from schema version 7):
//! one B-tree insert per batch instead of one per change. Rows of earlier versions hold
//! one decision each and are read as a group of one.
//!
//! ```text
//! time_ms iN (the newest decision's) | count uN | count times: length uN, decision
//! ```
//!
//! Write attempts (`write_log` table), format byte [`WRITE_LOG_BINARY`], JSON before
//! schema version 5:
//!
//! ```text
//! id uN | time_ms iN | source_system str | target_system str | entity str
//! | global_id 16 bytes LE | op str | outcome str | attempt uN | seq uN | error opt<str>
//! ```
//!
//! Decoding uses checked reads only: a damaged row is an error, never a panic.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::NonOwnerPolicy;
use crate::merge::{Decision, FieldDecision, Outcome, Rule, WriteAction, WriteMode, WriteSummary};
use crate::model::{AgreedField, Base, ChangeKind, Fields, GlobalId, Provenance, RecordState, Shadow, TimeMs, Value};
use crate::state::{OutboxEntry, WriteLogEntry};

/// Format byte of the binary record layout of schema versions 2 to 7, still read.
/// JSON rows start with `{` (0x7b).
pub const RECORD_BINARY: u8 = 0x01;
/// Format byte of the compact record layout: the binary layout, with a provenance
/// shared with the field before and shadow values and match keys that hold the agreed
/// value stored as references to it.
pub const RECORD_COMPACT: u8 = 0x02;
/// Before a provenance in the compact layout: the provenance follows.
const PROVENANCE_OWN: u8 = 0;
/// Before a provenance in the compact layout: the same as the field before.
const PROVENANCE_SAME: u8 = 1;
/// Before a match key's value in the compact layout: the value follows.
const KEY_OWN: u8 = 0;
/// Before a match key's value in the compact layout: the agreed value (a string) of
/// the field of that name.
const KEY_AGREED: u8 = 1;
/// Value tag, in a shadow of the compact layout only: the agreed value of the field of
/// the same name.
const VALUE_AGREED: u8 = 9;
/// Format byte of the binary outbox entry layout.
pub const OUTBOX_BINARY: u8 = 0x01;
/// Format byte of the binary decision layout.
pub const DECISION_BINARY: u8 = 0x01;
/// Format byte of a group of decisions stored in one row.
pub const DECISION_GROUP: u8 = 0x02;
/// Format byte of the binary write-attempt layout.
pub const WRITE_LOG_BINARY: u8 = 0x01;

/// Why a stored value could not be decoded; names no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("value ends early")]
    Truncated,
    #[error("unknown format byte {0:#04x}")]
    UnknownFormat(u8),
    #[error("unknown tag {0}")]
    UnknownTag(u8),
    #[error("varint is too long")]
    VarintOverflow,
    #[error("string is not UTF-8")]
    Utf8,
    #[error("bytes left after the value")]
    Trailing,
    #[error("nesting is too deep")]
    TooDeep,
    #[error("refers to an agreed value the record does not have")]
    NoAgreedValue,
}

/// Nesting limit for decoded values, so a damaged row cannot exhaust the stack.
const MAX_DEPTH: u32 = 128;

/// Encodes a record's state in the compact layout ([`RECORD_COMPACT`]).
pub fn encode_record(state: &RecordState) -> Vec<u8> {
    encode_record_as(state, RECORD_COMPACT)
}

/// The agreed values of an encoded record: each field's name and where its encoded
/// value lies in the row, names ascending. A shadow value is stored as a reference to
/// the agreed value when its encoding is the same bytes.
type AgreedBytes<'a> = Vec<(&'a [u8], std::ops::Range<usize>)>;

/// Encodes a record in `format`: [`RECORD_COMPACT`], or [`RECORD_BINARY`] (no
/// references), which only the tests of reading older rows still write.
fn encode_record_as(state: &RecordState, format: u8) -> Vec<u8> {
    let compact = format == RECORD_COMPACT;
    let mut out = Vec::with_capacity(256);
    out.push(format);
    out.push(state.base.deleted as u8);
    put_uint(&mut out, state.base.fields.len() as u64);
    let mut agreed: AgreedBytes<'_> = Vec::with_capacity(if compact { state.base.fields.len() } else { 0 });
    let mut previous: Option<&Provenance> = None;
    for (name, field) in &state.base.fields {
        put_str(&mut out, name);
        let at = out.len();
        put_value(&mut out, &field.value);
        if compact {
            agreed.push((name.as_bytes(), at..out.len()));
            if previous == Some(&field.from) {
                out.push(PROVENANCE_SAME);
                continue;
            }
            out.push(PROVENANCE_OWN);
        }
        put_provenance(&mut out, &field.from);
        previous = Some(&field.from);
    }
    put_uint(&mut out, state.shadows.len() as u64);
    for (system, shadow) in &state.shadows {
        put_shadow(&mut out, system, shadow, &agreed);
    }
    put_uint(&mut out, state.match_keys.len() as u64);
    for (key, value) in &state.match_keys {
        put_str(&mut out, key);
        if compact {
            if matches!(state.base.value(key), Some(Value::String(s)) if s == value) {
                out.push(KEY_AGREED);
                continue;
            }
            out.push(KEY_OWN);
        }
        put_str(&mut out, value);
    }
    put_int(&mut out, state.created_ms);
    put_int(&mut out, state.updated_ms);
    out
}

/// A record in the layout schema versions 2 to 7 wrote, for the tests that read one.
#[cfg(test)]
pub fn encode_record_binary(state: &RecordState) -> Vec<u8> {
    encode_record_as(state, RECORD_BINARY)
}

fn put_provenance(out: &mut Vec<u8>, from: &Provenance) {
    put_str(out, &from.system);
    put_opt_str(out, from.version.as_deref());
    put_int(out, from.source_time_ms);
    out.push(rule_code(from.rule));
    put_uint(out, from.decision);
}

/// Decodes a record row of either binary layout ([`RECORD_COMPACT`], or
/// [`RECORD_BINARY`] as schema versions 2 to 7 wrote it).
pub fn decode_record(bytes: &[u8]) -> Result<RecordState, FormatError> {
    let mut r = Reader { bytes, at: 0 };
    let compact = match r.byte()? {
        RECORD_COMPACT => true,
        RECORD_BINARY => false,
        other => return Err(FormatError::UnknownFormat(other)),
    };
    let deleted = r.bool()?;
    let mut fields: BTreeMap<String, AgreedField> = BTreeMap::new();
    for _ in 0..r.count()? {
        let name = r.string()?;
        let value = r.value(0)?;
        let from = match if compact { r.byte()? } else { PROVENANCE_OWN } {
            PROVENANCE_OWN => r.provenance()?,
            // The field before is the last in the map: names are written ascending.
            PROVENANCE_SAME => match fields.last_key_value() {
                Some((_, before)) => before.from.clone(),
                None => return Err(FormatError::NoAgreedValue),
            },
            other => return Err(FormatError::UnknownTag(other)),
        };
        fields.insert(name, AgreedField { value, from });
    }
    let agreed = |name: &str| {
        fields
            .get(name)
            .map(|f| f.value.clone())
            .ok_or(FormatError::NoAgreedValue)
    };
    let mut shadows = BTreeMap::new();
    for _ in 0..r.count()? {
        let system = r.string()?;
        let shadow = r.shadow_body(compact.then_some(&agreed as AgreedValue<'_>))?;
        shadows.insert(system, shadow);
    }
    let mut match_keys = BTreeMap::new();
    for _ in 0..r.count()? {
        let key = r.string()?;
        let value = match if compact { r.byte()? } else { KEY_OWN } {
            KEY_OWN => r.string()?,
            KEY_AGREED => match fields.get(&key).map(|f| &f.value) {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(FormatError::NoAgreedValue),
            },
            other => return Err(FormatError::UnknownTag(other)),
        };
        match_keys.insert(key, value);
    }
    let state = RecordState {
        base: Base { fields, deleted },
        shadows,
        match_keys,
        created_ms: r.int()?,
        updated_ms: r.int()?,
    };
    if r.at != bytes.len() {
        return Err(FormatError::Trailing);
    }
    Ok(state)
}

/// Changes one system's shadow in an encoded record without decoding the rest: the
/// base, the other shadows and the match keys are walked over and copied as they
/// are, and only `system`'s shadow is decoded, handed to `change` (a default shadow
/// when the record has none for the system yet) and encoded again. The result is
/// what [`encode_record`] gives for the whole record decoded, changed the same way
/// and encoded. Confirming a write touches one shadow of a record that may hold
/// many, and this keeps that from costing a decode of all of them.
///
/// The bytes walked over are checked for structure (lengths, tags, varints), not for
/// UTF-8 or rule codes: they are copied unchanged, and the next full decode checks
/// them as it always does. The agreed values stay where they are, so the references
/// to them in the other shadows stay true. A row in the older layout
/// ([`RECORD_BINARY`]) is decoded, changed and encoded whole, once.
pub fn update_shadow<T>(
    bytes: &[u8],
    system: &str,
    change: impl FnOnce(&mut Shadow) -> T,
) -> Result<(Vec<u8>, T), FormatError> {
    let mut r = Reader { bytes, at: 0 };
    match r.byte()? {
        RECORD_COMPACT => {}
        RECORD_BINARY => {
            let mut state = decode_record(bytes)?;
            let answer = change(state.shadows.entry(system.to_string()).or_default());
            return Ok((encode_record(&state), answer));
        }
        other => return Err(FormatError::UnknownFormat(other)),
    }
    r.bool()?;
    let fields = r.count()?;
    let mut agreed: AgreedBytes<'_> = Vec::with_capacity(fields as usize);
    for _ in 0..fields {
        let name = r.str_bytes()?;
        let at = r.at;
        r.skip_value(0)?;
        agreed.push((name, at..r.at));
        match r.byte()? {
            PROVENANCE_OWN => {
                r.skip_str()?;
                r.skip_opt_str()?;
                r.uint()?;
                r.byte()?;
                r.uint()?;
            }
            PROVENANCE_SAME if agreed.len() > 1 => {}
            PROVENANCE_SAME => return Err(FormatError::NoAgreedValue),
            other => return Err(FormatError::UnknownTag(other)),
        }
    }
    let count_at = r.at;
    let count = r.count()?;
    let shadows_at = r.at;
    let resolve = |name: &str| {
        let range = agreed_range(&agreed, name.as_bytes()).ok_or(FormatError::NoAgreedValue)?;
        Reader { bytes, at: range.start }.value(0)
    };
    // The system's shadow: its bytes and decoded value when it has one, else where a
    // new one goes to keep the systems in ascending order.
    let mut old: Option<(usize, usize, Shadow)> = None;
    let mut insert_at: Option<usize> = None;
    for _ in 0..count {
        let start = r.at;
        let name = r.str()?;
        match name.cmp(system) {
            std::cmp::Ordering::Equal => {
                let shadow = r.shadow_body(Some(&resolve))?;
                old = Some((start, r.at, shadow));
                continue;
            }
            std::cmp::Ordering::Greater if insert_at.is_none() => insert_at = Some(start),
            _ => {}
        }
        r.skip_shadow_body()?;
    }
    let shadows_end = r.at;
    for _ in 0..r.count()? {
        r.skip_str()?;
        match r.byte()? {
            KEY_OWN => r.skip_str()?,
            KEY_AGREED => {}
            other => return Err(FormatError::UnknownTag(other)),
        }
    }
    r.int()?;
    r.int()?;
    if r.at != bytes.len() {
        return Err(FormatError::Trailing);
    }
    let (start, end, mut shadow, new_count) = match old {
        Some((start, end, shadow)) => (start, end, shadow, count),
        None => {
            let at = insert_at.unwrap_or(shadows_end);
            (at, at, Shadow::default(), count + 1)
        }
    };
    let answer = change(&mut shadow);
    let mut out = Vec::with_capacity(bytes.len() + 64);
    // The agreed values lie before `count_at`, at the same places in `out` as in `bytes`.
    out.extend_from_slice(&bytes[..count_at]);
    put_uint(&mut out, new_count);
    out.extend_from_slice(&bytes[shadows_at..start]);
    put_shadow(&mut out, system, &shadow, &agreed);
    out.extend_from_slice(&bytes[end..]);
    Ok((out, answer))
}

/// The agreed value of a field, for a shadow value that refers to it.
type AgreedValue<'f> = &'f dyn Fn(&str) -> Result<Value, FormatError>;

/// Where the agreed value of `name` lies, if the record has one.
fn agreed_range(agreed: &AgreedBytes<'_>, name: &[u8]) -> Option<std::ops::Range<usize>> {
    agreed
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| agreed[i].1.clone())
}

/// Encodes a pending write in the binary layout.
pub fn encode_outbox(entry: &OutboxEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(OUTBOX_BINARY);
    put_uint(&mut out, entry.seq);
    put_str(&mut out, &entry.system);
    put_str(&mut out, &entry.entity);
    out.extend_from_slice(&entry.global_id.as_u128().to_le_bytes());
    match &entry.action {
        WriteAction::Upsert { fields } => {
            out.push(0);
            put_fields(&mut out, fields);
        }
        WriteAction::Delete => out.push(1),
        WriteAction::SoftDelete { field, value } => {
            out.push(2);
            put_str(&mut out, field);
            put_value(&mut out, value);
        }
    }
    put_str(&mut out, &entry.source_system);
    put_int(&mut out, entry.source_time_ms);
    put_uint(&mut out, entry.decision);
    put_int(&mut out, entry.enqueued_ms);
    put_uint(&mut out, u64::from(entry.attempts));
    put_opt_str(&mut out, entry.last_error.as_deref());
    out
}

/// Decodes the binary layout (starting with [`OUTBOX_BINARY`]).
pub fn decode_outbox(bytes: &[u8]) -> Result<OutboxEntry, FormatError> {
    let mut r = Reader { bytes, at: 0 };
    match r.byte()? {
        OUTBOX_BINARY => {}
        other => return Err(FormatError::UnknownFormat(other)),
    }
    let seq = r.uint()?;
    let system = r.string()?;
    let entity = r.string()?;
    let raw: [u8; 16] = r.take(16)?.try_into().expect("took sixteen bytes");
    let global_id = GlobalId::from_u128(u128::from_le_bytes(raw));
    let action = match r.byte()? {
        0 => WriteAction::Upsert { fields: r.fields()? },
        1 => WriteAction::Delete,
        2 => WriteAction::SoftDelete {
            field: r.string()?,
            value: r.value(0)?,
        },
        other => return Err(FormatError::UnknownTag(other)),
    };
    let entry = OutboxEntry {
        seq,
        system,
        entity,
        global_id,
        action,
        source_system: r.string()?,
        source_time_ms: r.int()?,
        decision: r.uint()?,
        enqueued_ms: r.int()?,
        attempts: u32::try_from(r.uint()?).map_err(|_| FormatError::VarintOverflow)?,
        last_error: r.opt_string()?,
    };
    if r.at != bytes.len() {
        return Err(FormatError::Trailing);
    }
    Ok(entry)
}

/// Encodes a merge decision in the binary layout.
pub fn encode_decision(d: &Decision) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_decision(&mut out, d);
    out
}

/// Appends a merge decision in the binary layout to `out`.
fn put_decision(out: &mut Vec<u8>, d: &Decision) {
    out.push(DECISION_BINARY);
    put_uint(out, d.id);
    put_int(out, d.time_ms);
    put_str(out, &d.entity);
    out.extend_from_slice(&d.global_id.as_u128().to_le_bytes());
    put_str(out, &d.system);
    put_str(out, &d.local_id);
    out.push(match d.kind {
        ChangeKind::Upsert => 0,
        ChangeKind::Delete => 1,
    });
    put_int(out, d.source_time_ms);
    put_opt_str(out, d.version.as_deref());
    put_uint(out, d.fields.len() as u64);
    for f in &d.fields {
        put_str(out, &f.field);
        out.push(rule_code(f.rule));
        put_value(out, &f.incoming);
        match &f.previous {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                put_value(out, value);
            }
        }
        out.push(f.conflict as u8);
        out.push(match f.policy {
            None => 0,
            Some(NonOwnerPolicy::Revert) => 1,
            Some(NonOwnerPolicy::Ignore) => 2,
            Some(NonOwnerPolicy::Flag) => 3,
        });
    }
    out.push(match d.outcome {
        Outcome::Created => 0,
        Outcome::Updated => 1,
        Outcome::Deleted => 2,
        Outcome::Noop => 3,
    });
    out.push(d.flagged as u8);
    put_uint(out, d.writes.len() as u64);
    for w in &d.writes {
        put_str(out, &w.system);
        out.push(match w.mode {
            WriteMode::Send => 0,
            WriteMode::DryRun => 1,
            WriteMode::OutsideRollout => 2,
        });
        put_str(out, &w.action);
        put_uint(out, w.fields.len() as u64);
        for field in &w.fields {
            put_str(out, field);
        }
        match w.seq {
            None => out.push(0),
            Some(seq) => {
                out.push(1);
                put_uint(out, seq);
            }
        }
    }
}

/// Decodes the binary layout (starting with [`DECISION_BINARY`]).
pub fn decode_decision(bytes: &[u8]) -> Result<Decision, FormatError> {
    let mut r = Reader { bytes, at: 0 };
    let (id, time_ms) = log_head(&mut r, DECISION_BINARY)?;
    let entity = r.string()?;
    let raw: [u8; 16] = r.take(16)?.try_into().expect("took sixteen bytes");
    let global_id = GlobalId::from_u128(u128::from_le_bytes(raw));
    let system = r.string()?;
    let local_id = r.string()?;
    let kind = match r.byte()? {
        0 => ChangeKind::Upsert,
        1 => ChangeKind::Delete,
        other => return Err(FormatError::UnknownTag(other)),
    };
    let source_time_ms = r.int()?;
    let version = r.opt_string()?;
    let count = r.count()?;
    let mut fields = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let field = r.string()?;
        let rule = rule_from_code(r.byte()?)?;
        let incoming = r.value(0)?;
        let previous = match r.byte()? {
            0 => None,
            1 => Some(r.value(0)?),
            other => return Err(FormatError::UnknownTag(other)),
        };
        let conflict = r.bool()?;
        let policy = match r.byte()? {
            0 => None,
            1 => Some(NonOwnerPolicy::Revert),
            2 => Some(NonOwnerPolicy::Ignore),
            3 => Some(NonOwnerPolicy::Flag),
            other => return Err(FormatError::UnknownTag(other)),
        };
        fields.push(FieldDecision {
            field,
            rule,
            incoming,
            previous,
            conflict,
            policy,
        });
    }
    let outcome = match r.byte()? {
        0 => Outcome::Created,
        1 => Outcome::Updated,
        2 => Outcome::Deleted,
        3 => Outcome::Noop,
        other => return Err(FormatError::UnknownTag(other)),
    };
    let flagged = r.bool()?;
    let count = r.count()?;
    let mut writes = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let system = r.string()?;
        let mode = match r.byte()? {
            0 => WriteMode::Send,
            1 => WriteMode::DryRun,
            2 => WriteMode::OutsideRollout,
            other => return Err(FormatError::UnknownTag(other)),
        };
        let action = r.string()?;
        let n = r.count()?;
        let mut names = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            names.push(r.string()?);
        }
        let seq = match r.byte()? {
            0 => None,
            1 => Some(r.uint()?),
            other => return Err(FormatError::UnknownTag(other)),
        };
        writes.push(WriteSummary {
            system,
            mode,
            action,
            fields: names,
            seq,
        });
    }
    if r.at != bytes.len() {
        return Err(FormatError::Trailing);
    }
    Ok(Decision {
        id,
        time_ms,
        entity,
        global_id,
        system,
        local_id,
        kind,
        source_time_ms,
        version,
        fields,
        outcome,
        flagged,
        writes,
    })
}

/// Encodes a write attempt in the binary layout.
pub fn encode_write_log(e: &WriteLogEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(WRITE_LOG_BINARY);
    put_uint(&mut out, e.id);
    put_int(&mut out, e.time_ms);
    put_str(&mut out, &e.source_system);
    put_str(&mut out, &e.target_system);
    put_str(&mut out, &e.entity);
    out.extend_from_slice(&e.global_id.as_u128().to_le_bytes());
    put_str(&mut out, &e.op);
    put_str(&mut out, &e.outcome);
    put_uint(&mut out, u64::from(e.attempt));
    put_uint(&mut out, e.seq);
    put_opt_str(&mut out, e.error.as_deref());
    out
}

/// Decodes the binary layout (starting with [`WRITE_LOG_BINARY`]).
pub fn decode_write_log(bytes: &[u8]) -> Result<WriteLogEntry, FormatError> {
    let mut r = Reader { bytes, at: 0 };
    let (id, time_ms) = log_head(&mut r, WRITE_LOG_BINARY)?;
    let source_system = r.string()?;
    let target_system = r.string()?;
    let entity = r.string()?;
    let raw: [u8; 16] = r.take(16)?.try_into().expect("took sixteen bytes");
    let entry = WriteLogEntry {
        id,
        time_ms,
        source_system,
        target_system,
        entity,
        global_id: GlobalId::from_u128(u128::from_le_bytes(raw)),
        op: r.string()?,
        outcome: r.string()?,
        attempt: u32::try_from(r.uint()?).map_err(|_| FormatError::VarintOverflow)?,
        seq: r.uint()?,
        error: r.opt_string()?,
    };
    if r.at != bytes.len() {
        return Err(FormatError::Trailing);
    }
    Ok(entry)
}

/// The time of a binary write attempt, read without decoding the rest (retention).
pub fn write_log_time(bytes: &[u8]) -> Result<TimeMs, FormatError> {
    log_head(&mut Reader { bytes, at: 0 }, WRITE_LOG_BINARY).map(|(_, time_ms)| time_ms)
}

/// A binary decision row's time (a single decision's, or a group's newest) and how many
/// decisions it holds, read without decoding the rest (retention).
pub fn decision_row_head(bytes: &[u8]) -> Result<(TimeMs, u64), FormatError> {
    let mut r = Reader { bytes, at: 0 };
    if bytes.first() != Some(&DECISION_GROUP) {
        return log_head(&mut r, DECISION_BINARY).map(|(_, time_ms)| (time_ms, 1));
    }
    r.byte()?;
    let time_ms = r.int()?;
    Ok((time_ms, r.count()?))
}

/// The room a group's body starts with: a batch of a thousand small decisions, without
/// growing through every smaller size first.
const GROUP_START_CAPACITY: usize = 64 * 1024;

/// Decisions being gathered into one group row (see the module doc).
#[derive(Debug, Default)]
pub struct DecisionGroup {
    body: Vec<u8>,
    count: u64,
    time_ms: TimeMs,
    /// The decision being added, encoded here first for its length; kept for the next.
    scratch: Vec<u8>,
}

impl DecisionGroup {
    pub fn push(&mut self, decision: &Decision) {
        self.scratch.clear();
        put_decision(&mut self.scratch, decision);
        if self.body.capacity() == 0 {
            self.body.reserve(GROUP_START_CAPACITY);
        }
        put_uint(&mut self.body, self.scratch.len() as u64);
        self.body.extend_from_slice(&self.scratch);
        self.time_ms = if self.count == 0 {
            decision.time_ms
        } else {
            self.time_ms.max(decision.time_ms)
        };
        self.count += 1;
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The size of the decisions gathered so far.
    pub fn bytes(&self) -> usize {
        self.body.len()
    }

    /// The row, leaving the group empty.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 16);
        out.push(DECISION_GROUP);
        put_int(&mut out, self.time_ms);
        put_uint(&mut out, self.count);
        out.extend_from_slice(&self.body);
        // The buffers are kept for the next group of the transaction.
        self.body.clear();
        self.count = 0;
        self.time_ms = 0;
        out
    }
}

/// The binary decisions of a row, without decoding them: a group's members, or the row
/// itself when it holds one decision.
fn decision_slices(bytes: &[u8]) -> Result<Vec<&[u8]>, FormatError> {
    if bytes.first() != Some(&DECISION_GROUP) {
        return Ok(vec![bytes]);
    }
    let mut r = Reader { bytes, at: 0 };
    r.byte()?;
    r.int()?;
    let count = r.count()?;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let decision = r.str_bytes()?;
        if decision.first() != Some(&DECISION_BINARY) {
            return Err(FormatError::UnknownFormat(decision.first().copied().unwrap_or(0)));
        }
        out.push(decision);
    }
    if r.at != bytes.len() {
        return Err(FormatError::Trailing);
    }
    Ok(out)
}

/// The decisions of a binary row, oldest first (see [`decision_slices`]).
pub fn decode_decisions(bytes: &[u8]) -> Result<Vec<Decision>, FormatError> {
    decision_slices(bytes)?.into_iter().map(decode_decision).collect()
}

/// The head every id-keyed log row (decisions, write attempts) starts with: its format
/// byte, which must be `format`, then its id and time.
fn log_head(r: &mut Reader<'_>, format: u8) -> Result<(u64, TimeMs), FormatError> {
    match r.byte()? {
        f if f == format => {}
        other => return Err(FormatError::UnknownFormat(other)),
    }
    Ok((r.uint()?, r.int()?))
}

/// Stable one-byte codes of the merge rules; a new rule takes the next free code.
fn rule_code(rule: Rule) -> u8 {
    match rule {
        Rule::Unchanged => 0,
        Rule::AlreadyAgreed => 1,
        Rule::Owner => 2,
        Rule::OwnerPrecedence => 3,
        Rule::OwnerLatest => 4,
        Rule::LastWriterWins => 5,
        Rule::FirstWriterWins => 6,
        Rule::NonOwner => 7,
        Rule::LowerPrecedence => 8,
        Rule::Stale => 9,
        Rule::FirstWriterKept => 10,
        Rule::Deleted => 11,
        Rule::DeleteNotAllowed => 12,
    }
}

fn rule_from_code(code: u8) -> Result<Rule, FormatError> {
    Ok(match code {
        0 => Rule::Unchanged,
        1 => Rule::AlreadyAgreed,
        2 => Rule::Owner,
        3 => Rule::OwnerPrecedence,
        4 => Rule::OwnerLatest,
        5 => Rule::LastWriterWins,
        6 => Rule::FirstWriterWins,
        7 => Rule::NonOwner,
        8 => Rule::LowerPrecedence,
        9 => Rule::Stale,
        10 => Rule::FirstWriterKept,
        11 => Rule::Deleted,
        12 => Rule::DeleteNotAllowed,
        other => return Err(FormatError::UnknownTag(other)),
    })
}

/// A key of three strings as one byte string, for the identity map and the match index
/// (`tables`): the first two as `str` values (a varint length, then the bytes), the last
/// as it is. Keys with the same first two parts share their first bytes and sort by the
/// last part, so one `memcmp` orders them.
pub fn path_key(first: &str, second: &str, last: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(first.len() + second.len() + last.len() + 2);
    put_str(&mut key, first);
    put_str(&mut key, second);
    key.extend_from_slice(last.as_bytes());
    key
}

/// The three parts of a [`path_key`]; `None` for bytes that `path_key` would not write
/// (a length written longer than it needs included).
pub fn split_path_key(key: &[u8]) -> Option<(&str, &str, &str)> {
    let mut reader = Reader { bytes: key, at: 0 };
    let first = reader.str().ok()?;
    let second = reader.str().ok()?;
    let last = std::str::from_utf8(&key[reader.at..]).ok()?;
    (path_key(first, second, last) == key).then_some((first, second, last))
}

/// The bytes every [`path_key`] with this first part starts with: a range from it, read
/// while the keys start with it, lists one entity's rows.
pub fn path_prefix(first: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(first.len() + 1);
    put_str(&mut key, first);
    key
}

fn put_uint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    put_uint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

/// A shadow, its values that encode as the agreed value of the same field stored as a
/// reference to it ([`VALUE_AGREED`]); `agreed` empty writes none.
fn put_shadow(out: &mut Vec<u8>, system: &str, shadow: &Shadow, agreed: &AgreedBytes<'_>) {
    put_str(out, system);
    put_opt_str(out, shadow.local_id.as_deref());
    put_shadow_fields(out, &shadow.fields, agreed);
    put_opt_str(out, shadow.version.as_deref());
    put_shadow_fields(out, &shadow.pending, agreed);
    put_uint(out, shadow.diverged.len() as u64);
    for field in &shadow.diverged {
        put_str(out, field);
    }
    out.push(shadow.deleted as u8);
}

fn put_shadow_fields(out: &mut Vec<u8>, fields: &Fields, agreed: &AgreedBytes<'_>) {
    put_uint(out, fields.len() as u64);
    // Both are in ascending name order: one pass over the agreed names.
    let mut next = 0;
    for (name, value) in fields {
        put_str(out, name);
        let at = out.len();
        put_value(out, value);
        while let Some((agreed_name, range)) = agreed.get(next) {
            match (*agreed_name).cmp(name.as_bytes()) {
                std::cmp::Ordering::Less => next += 1,
                std::cmp::Ordering::Equal => {
                    // Byte for byte, not `Value` equality: -0.0 equals 0.0 but is not
                    // the same value.
                    if out[range.clone()] == out[at..] {
                        out.truncate(at);
                        out.push(VALUE_AGREED);
                    }
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
    }
}

fn put_fields(out: &mut Vec<u8>, fields: &Fields) {
    put_uint(out, fields.len() as u64);
    for (name, value) in fields {
        put_str(out, name);
        put_value(out, value);
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(0),
        Value::Bool(false) => out.push(1),
        Value::Bool(true) => out.push(2),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push(3);
                put_int(out, i);
            } else if let Some(u) = n.as_u64() {
                out.push(4);
                put_uint(out, u);
            } else {
                out.push(5);
                let f = n.as_f64().expect("a JSON number is an i64, a u64 or an f64");
                out.extend_from_slice(&f.to_le_bytes());
            }
        }
        Value::String(s) => {
            out.push(6);
            put_str(out, s);
        }
        Value::Array(items) => {
            out.push(7);
            put_uint(out, items.len() as u64);
            for item in items {
                put_value(out, item);
            }
        }
        Value::Object(map) => {
            out.push(8);
            put_uint(out, map.len() as u64);
            for (k, v) in map {
                put_str(out, k);
                put_value(out, v);
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, FormatError> {
        let b = *self.bytes.get(self.at).ok_or(FormatError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        let end = self.at.checked_add(n).ok_or(FormatError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(FormatError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn bool(&mut self) -> Result<bool, FormatError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(FormatError::UnknownTag(other)),
        }
    }

    fn uint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError::VarintOverflow)
    }

    fn int(&mut self) -> Result<i64, FormatError> {
        let z = self.uint()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// A count of following items; each takes at least one byte, so a count larger
    /// than the bytes left is damage, refused before anything is allocated for it.
    fn count(&mut self) -> Result<u64, FormatError> {
        let n = self.uint()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(FormatError::Truncated);
        }
        Ok(n)
    }

    /// The bytes of a length-prefixed string, unchecked.
    fn str_bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let n = usize::try_from(self.uint()?).map_err(|_| FormatError::Truncated)?;
        let end = self.at.checked_add(n).ok_or(FormatError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(FormatError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn str(&mut self) -> Result<&'a str, FormatError> {
        std::str::from_utf8(self.str_bytes()?).map_err(|_| FormatError::Utf8)
    }

    fn string(&mut self) -> Result<String, FormatError> {
        self.str().map(str::to_owned)
    }

    fn skip_str(&mut self) -> Result<(), FormatError> {
        self.str_bytes().map(drop)
    }

    fn skip_opt_str(&mut self) -> Result<(), FormatError> {
        match self.byte()? {
            0 => Ok(()),
            1 => self.skip_str(),
            other => Err(FormatError::UnknownTag(other)),
        }
    }

    /// A provenance of an agreed value.
    fn provenance(&mut self) -> Result<Provenance, FormatError> {
        Ok(Provenance {
            system: self.string()?,
            version: self.opt_string()?,
            source_time_ms: self.int()?,
            rule: rule_from_code(self.byte()?)?,
            decision: self.uint()?,
        })
    }

    /// A shadow after its system's name. With `agreed` (the compact layout), a value
    /// may be a reference to the agreed value of its field, which `agreed` gives.
    fn shadow_body(&mut self, agreed: Option<AgreedValue<'_>>) -> Result<Shadow, FormatError> {
        let local_id = self.opt_string()?;
        let fields = self.shadow_fields(agreed)?;
        let version = self.opt_string()?;
        let pending = self.shadow_fields(agreed)?;
        let mut diverged = BTreeSet::new();
        for _ in 0..self.count()? {
            diverged.insert(self.string()?);
        }
        let deleted = self.bool()?;
        Ok(Shadow {
            local_id,
            fields,
            version,
            pending,
            diverged,
            deleted,
        })
    }

    /// Walks over a shadow of the compact layout after its system's name.
    fn skip_shadow_body(&mut self) -> Result<(), FormatError> {
        self.skip_opt_str()?;
        self.skip_shadow_fields()?;
        self.skip_opt_str()?;
        self.skip_shadow_fields()?;
        for _ in 0..self.count()? {
            self.skip_str()?;
        }
        self.bool().map(drop)
    }

    fn skip_shadow_fields(&mut self) -> Result<(), FormatError> {
        for _ in 0..self.count()? {
            self.skip_str()?;
            if self.bytes.get(self.at) == Some(&VALUE_AGREED) {
                self.at += 1;
            } else {
                self.skip_value(0)?;
            }
        }
        Ok(())
    }

    /// Walks over a value as [`Reader::value`] reads it, checking its structure.
    fn skip_value(&mut self, depth: u32) -> Result<(), FormatError> {
        if depth > MAX_DEPTH {
            return Err(FormatError::TooDeep);
        }
        match self.byte()? {
            0..=2 => {}
            3 | 4 => {
                self.uint()?;
            }
            5 => {
                self.take(8)?;
            }
            6 => self.skip_str()?,
            7 => {
                for _ in 0..self.count()? {
                    self.skip_value(depth + 1)?;
                }
            }
            8 => {
                for _ in 0..self.count()? {
                    self.skip_str()?;
                    self.skip_value(depth + 1)?;
                }
            }
            other => return Err(FormatError::UnknownTag(other)),
        }
        Ok(())
    }

    fn opt_string(&mut self) -> Result<Option<String>, FormatError> {
        match self.byte()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            other => Err(FormatError::UnknownTag(other)),
        }
    }

    fn shadow_fields(&mut self, agreed: Option<AgreedValue<'_>>) -> Result<Fields, FormatError> {
        let Some(agreed) = agreed else {
            return self.fields();
        };
        let mut fields = Fields::new();
        for _ in 0..self.count()? {
            let name = self.string()?;
            let value = if self.bytes.get(self.at) == Some(&VALUE_AGREED) {
                self.at += 1;
                agreed(&name)?
            } else {
                self.value(0)?
            };
            fields.insert(name, value);
        }
        Ok(fields)
    }

    fn fields(&mut self) -> Result<Fields, FormatError> {
        let mut fields = Fields::new();
        for _ in 0..self.count()? {
            let name = self.string()?;
            fields.insert(name, self.value(0)?);
        }
        Ok(fields)
    }

    fn value(&mut self, depth: u32) -> Result<Value, FormatError> {
        if depth > MAX_DEPTH {
            return Err(FormatError::TooDeep);
        }
        Ok(match self.byte()? {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => Value::from(self.int()?),
            4 => Value::from(self.uint()?),
            5 => {
                let raw: [u8; 8] = self.take(8)?.try_into().expect("took eight bytes");
                // JSON has no NaN or infinity; a stored one is damage.
                serde_json::Number::from_f64(f64::from_le_bytes(raw))
                    .map(Value::Number)
                    .ok_or(FormatError::UnknownTag(5))?
            }
            6 => Value::String(self.string()?),
            7 => {
                let n = self.count()?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            8 => {
                let mut map = serde_json::Map::new();
                for _ in 0..self.count()? {
                    let key = self.string()?;
                    map.insert(key, self.value(depth + 1)?);
                }
                Value::Object(map)
            }
            other => return Err(FormatError::UnknownTag(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> RecordState {
        let prov = |system: &str, version: Option<&str>, rule, decision| Provenance {
            system: system.into(),
            version: version.map(str::to_owned),
            source_time_ms: 1_700_000_000_123,
            rule,
            decision,
        };
        let mut base = BTreeMap::new();
        base.insert(
            "email".to_string(),
            AgreedField {
                value: json!("user1@example.com"),
                from: prov("hr", None, Rule::Owner, 1),
            },
        );
        base.insert(
            "tags".to_string(),
            AgreedField {
                value: json!([1, -2, 18446744073709551615u64, 2.5, null, true, false, {"a": "b"}]),
                from: prov("crm", Some("v9"), Rule::LastWriterWins, 300),
            },
        );
        let mut shadows = BTreeMap::new();
        shadows.insert(
            "hr".to_string(),
            Shadow {
                local_id: Some("e1".into()),
                fields: Fields::from_iter([("email".to_string(), json!("User1@Example.com"))]),
                version: Some("7".into()),
                pending: Fields::new(),
                diverged: BTreeSet::new(),
                deleted: false,
            },
        );
        shadows.insert(
            "crm".to_string(),
            Shadow {
                local_id: None,
                fields: Fields::new(),
                version: None,
                pending: Fields::from_iter([("Email".to_string(), json!("user1@example.com"))]),
                diverged: ["Title".to_string()].into(),
                deleted: true,
            },
        );
        RecordState {
            base: Base {
                fields: base,
                deleted: false,
            },
            shadows,
            match_keys: [("email".to_string(), "user1@example.com".to_string())].into(),
            created_ms: -5,
            updated_ms: 1_700_000_000_999,
        }
    }

    #[test]
    fn a_record_round_trips_and_is_smaller_than_json() {
        let state = sample();
        let bytes = encode_record(&state);
        assert_eq!(bytes[0], RECORD_COMPACT);
        assert_eq!(decode_record(&bytes).unwrap(), state);
        let json = serde_json::to_vec(&state).unwrap();
        assert!(bytes.len() * 2 < json.len(), "{} vs {} bytes", bytes.len(), json.len());
        let older = encode_record_binary(&state);
        assert_eq!(older[0], RECORD_BINARY);
        assert_eq!(decode_record(&older).unwrap(), state);
    }

    /// A record as one change from `hr` leaves it: three fields from one change, the
    /// shadow holding the same values, the match key the agreed email.
    fn single_source() -> RecordState {
        let from = Provenance {
            system: "hr".into(),
            version: Some("4".into()),
            source_time_ms: 1_700_000_000_123,
            rule: Rule::Owner,
            decision: 77,
        };
        let values = [
            ("email", json!("user1@example.com")),
            ("name", json!("Ada Lovelace")),
            ("score", json!(-0.0)),
        ];
        let mut state = RecordState::default();
        for (name, value) in &values {
            let field = AgreedField {
                value: value.clone(),
                from: from.clone(),
            };
            state.base.fields.insert(name.to_string(), field);
        }
        let shadow = state.shadows.entry("hr".into()).or_default();
        shadow.local_id = Some("e1".into());
        shadow.fields = values.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        // The same number, written the other way: equal as JSON, not the same bytes.
        shadow.fields.insert("score".into(), json!(0.0));
        shadow.pending.insert("name".into(), json!("Ada Lovelace"));
        state.match_keys.insert("email".into(), "user1@example.com".into());
        state
    }

    #[test]
    fn agreed_values_and_a_shared_provenance_are_stored_once() {
        let state = single_source();
        let bytes = encode_record(&state);
        let older = encode_record_binary(&state);
        assert_eq!(decode_record(&bytes).unwrap(), state);
        // Two provenances of 14 bytes become a marker byte each, and the first field's
        // provenance takes one more; the shadow's email (19 bytes) and name (14), the
        // pending name (14) and the match key (18) become one byte each.
        let saved = 2 * (14 - 1) - 1 + (19 - 1) + 2 * (14 - 1) + (18 - 1);
        assert_eq!(
            older.len() - bytes.len(),
            saved,
            "{} vs {} bytes",
            bytes.len(),
            older.len()
        );
        // -0.0 and 0.0 compare equal as JSON values; the shadow keeps its own.
        let decoded = decode_record(&bytes).unwrap();
        let score = &decoded.shadows["hr"].fields["score"];
        assert_eq!(score.as_f64().map(f64::is_sign_negative), Some(false));
        assert_eq!(
            decoded.base.fields["score"].value.as_f64().map(f64::is_sign_negative),
            Some(true)
        );
    }

    #[test]
    fn a_reference_to_a_missing_agreed_value_is_refused() {
        let mut state = single_source();
        let bytes = encode_record(&state);
        // The same row with the agreed `name` renamed: the shadow's references dangle.
        state.base.fields = std::mem::take(&mut state.base.fields)
            .into_iter()
            .map(|(k, v)| (if k == "name" { "nome".to_string() } else { k }, v))
            .collect();
        let renamed = encode_record(&state);
        let mut damaged = bytes.clone();
        let at = bytes.windows(4).position(|w| w == b"name").unwrap();
        damaged[at..at + 4].copy_from_slice(b"nome");
        assert_ne!(damaged, renamed);
        assert_eq!(decode_record(&damaged), Err(FormatError::NoAgreedValue));
        assert_eq!(
            update_shadow(&damaged, "hr", confirm).map(drop),
            Err(FormatError::NoAgreedValue)
        );
        // A shared provenance on the first field has nothing to share.
        let first = [RECORD_COMPACT, 0, 1, 1, b'a', 0, PROVENANCE_SAME, 0, 0, 0, 0];
        assert_eq!(decode_record(&first), Err(FormatError::NoAgreedValue));
        assert_eq!(
            update_shadow(&first, "hr", confirm).map(drop),
            Err(FormatError::NoAgreedValue)
        );
    }

    #[test]
    fn every_rule_code_round_trips() {
        for code in 0..=u8::MAX {
            if let Ok(rule) = rule_from_code(code) {
                assert_eq!(rule_code(rule), code);
            }
        }
        assert_eq!(rule_from_code(12), Ok(Rule::DeleteNotAllowed));
        assert_eq!(rule_from_code(13), Err(FormatError::UnknownTag(13)));
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_errors_not_panics() {
        let bytes = encode_record(&sample());
        for len in 0..bytes.len() {
            assert!(decode_record(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_record(&longer), Err(FormatError::Trailing));
    }

    fn sample_entries() -> Vec<OutboxEntry> {
        let entry = |seq, action| OutboxEntry {
            seq,
            system: "crm".into(),
            entity: "contact".into(),
            global_id: GlobalId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            action,
            source_system: "hr".into(),
            source_time_ms: 1_700_000_000_123,
            decision: 42,
            enqueued_ms: -3,
            attempts: 7,
            last_error: None,
        };
        let mut failed = entry(9, WriteAction::Delete);
        failed.last_error = Some("HTTP 503".into());
        vec![
            entry(
                u64::MAX,
                WriteAction::Upsert {
                    fields: Fields::from_iter([
                        ("email".to_string(), json!("a@example.com")),
                        ("tags".to_string(), json!([1, 2.5, null, {"k": false}])),
                    ]),
                },
            ),
            failed,
            entry(
                0,
                WriteAction::SoftDelete {
                    field: "active".into(),
                    value: json!(false),
                },
            ),
        ]
    }

    /// `value` round-trips through a binary layout that is smaller than its JSON; every
    /// prefix and a trailing byte are refused; flipped bytes are refused or decoded,
    /// never a panic; JSON is not taken for the layout.
    fn check_layout<T: serde::Serialize + PartialEq + std::fmt::Debug>(
        value: &T,
        format: u8,
        encode: fn(&T) -> Vec<u8>,
        decode: fn(&[u8]) -> Result<T, FormatError>,
    ) {
        let bytes = encode(value);
        assert_eq!(bytes[0], format);
        assert_eq!(&decode(&bytes).unwrap(), value);
        let json = serde_json::to_vec(value).unwrap();
        assert!(bytes.len() < json.len(), "{} vs {} bytes", bytes.len(), json.len());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(FormatError::Trailing));
        for i in 1..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                let _ = decode(&damaged);
            }
        }
        assert_eq!(decode(b"{}"), Err(FormatError::UnknownFormat(b'{')));
    }

    #[test]
    fn an_outbox_entry_round_trips_and_is_smaller_than_json() {
        for entry in sample_entries() {
            check_layout(&entry, OUTBOX_BINARY, encode_outbox, decode_outbox);
        }
    }

    fn sample_decisions() -> Vec<Decision> {
        let full = Decision {
            id: 300,
            time_ms: 1_764_000_000_123,
            entity: "contact".into(),
            global_id: GlobalId::new_v7(),
            system: "crm".into(),
            local_id: "003XX0001".into(),
            kind: ChangeKind::Upsert,
            source_time_ms: -5,
            version: Some("\"etag-1\"".into()),
            fields: vec![
                FieldDecision {
                    field: "phone".into(),
                    rule: Rule::Owner,
                    incoming: serde_json::json!("+4930123456"),
                    previous: Some(serde_json::json!(null)),
                    conflict: false,
                    policy: None,
                },
                FieldDecision {
                    field: "title".into(),
                    rule: Rule::NonOwner,
                    incoming: serde_json::json!({"a": [1, 2.5, true, "x"]}),
                    previous: None,
                    conflict: true,
                    policy: Some(NonOwnerPolicy::Flag),
                },
            ],
            outcome: Outcome::Updated,
            flagged: true,
            writes: vec![
                WriteSummary {
                    system: "lms".into(),
                    mode: WriteMode::Send,
                    action: "update".into(),
                    fields: vec!["phone".into()],
                    seq: Some(u64::MAX),
                },
                WriteSummary {
                    system: "hr".into(),
                    mode: WriteMode::OutsideRollout,
                    action: "revert".into(),
                    fields: vec![],
                    seq: None,
                },
            ],
        };
        let delete = Decision {
            id: 0,
            kind: ChangeKind::Delete,
            version: None,
            fields: vec![],
            outcome: Outcome::Deleted,
            flagged: false,
            writes: vec![],
            ..full.clone()
        };
        let mut policies = full.clone();
        for (field, policy) in policies
            .fields
            .iter_mut()
            .zip([NonOwnerPolicy::Revert, NonOwnerPolicy::Ignore])
        {
            field.policy = Some(policy);
        }
        policies.outcome = Outcome::Noop;
        policies.writes[0].mode = WriteMode::DryRun;
        let created = Decision {
            outcome: Outcome::Created,
            ..full.clone()
        };
        vec![full, delete, policies, created]
    }

    #[test]
    fn a_decision_round_trips_and_is_smaller_than_json() {
        for decision in sample_decisions() {
            check_layout(&decision, DECISION_BINARY, encode_decision, decode_decision);
            assert_eq!(
                decision_row_head(&encode_decision(&decision)).unwrap(),
                (decision.time_ms, 1)
            );
        }
    }

    #[test]
    fn a_write_attempt_round_trips_and_is_smaller_than_json() {
        let attempt = |error: Option<&str>| WriteLogEntry {
            id: 90_210,
            time_ms: 1_795_000_000_123,
            source_system: "hr".into(),
            target_system: "crm".into(),
            entity: "contact".into(),
            global_id: GlobalId::from_u128(0x0193_6a2f_0000_7000_8000_0000_0000_002a),
            op: "update".into(),
            outcome: if error.is_some() { "retry" } else { "ok" }.into(),
            attempt: 3,
            seq: 4_711,
            error: error.map(str::to_string),
        };
        for entry in [attempt(None), attempt(Some("crm answered 503: try again later"))] {
            check_layout(&entry, WRITE_LOG_BINARY, encode_write_log, decode_write_log);
            assert_eq!(write_log_time(&encode_write_log(&entry)).unwrap(), entry.time_ms);
        }
    }

    /// What `update_shadow` must equal: the record decoded, changed, encoded.
    fn changed_the_long_way(state: &RecordState, system: &str, change: impl FnOnce(&mut Shadow)) -> Vec<u8> {
        let mut state = state.clone();
        change(state.shadows.entry(system.to_string()).or_default());
        encode_record(&state)
    }

    fn confirm(shadow: &mut Shadow) -> Shadow {
        let before = shadow.clone();
        shadow.local_id = Some("id-9".into());
        shadow.pending.remove("Email");
        shadow.fields.insert("Email".into(), json!("user1@example.com"));
        shadow.version = Some("v10".into());
        shadow.deleted = false;
        before
    }

    #[test]
    fn one_shadow_changes_in_place_as_a_full_round_trip_would() {
        let state = sample();
        let bytes = encode_record(&state);
        // Before the first system, each existing one, between them, after the last.
        for system in ["a", "crm", "erp", "hr", "zz"] {
            let (out, before) = update_shadow(&bytes, system, confirm).unwrap();
            assert_eq!(
                out,
                changed_the_long_way(&state, system, |s| drop(confirm(s))),
                "{system}"
            );
            assert_eq!(
                before,
                state.shadows.get(system).cloned().unwrap_or_default(),
                "{system}"
            );
            let decoded = decode_record(&out).unwrap();
            assert_eq!(decoded.shadows[system].local_id.as_deref(), Some("id-9"));
            assert_eq!(decoded.base, state.base);
        }
        let empty = RecordState {
            created_ms: 3,
            ..RecordState::default()
        };
        let (out, _) = update_shadow(&encode_record(&empty), "hr", confirm).unwrap();
        assert_eq!(out, changed_the_long_way(&empty, "hr", |s| drop(confirm(s))));
    }

    #[test]
    fn update_shadow_refuses_damage_and_never_panics() {
        let bytes = encode_record(&sample());
        for end in 0..bytes.len() {
            assert!(
                update_shadow(&bytes[..end], "crm", confirm).is_err(),
                "truncated at {end}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            update_shadow(&longer, "crm", confirm).map(drop),
            Err(FormatError::Trailing)
        );
        assert_eq!(
            update_shadow(b"{}", "crm", confirm).map(drop),
            Err(FormatError::UnknownFormat(b'{'))
        );
        for i in 1..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                let _ = update_shadow(&damaged, "hr", confirm);
            }
        }
    }

    fn value_strategy() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-zé ]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c]{1,2}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn fields_strategy() -> impl proptest::strategy::Strategy<Value = Fields> {
        use proptest::prelude::*;
        proptest::collection::btree_map("[A-Za-z]{1,6}", value_strategy(), 0..4).prop_map(Fields::from_iter)
    }

    fn shadow_strategy() -> impl proptest::strategy::Strategy<Value = Shadow> {
        use proptest::prelude::*;
        (
            proptest::option::of("[a-z0-9-]{1,10}"),
            fields_strategy(),
            proptest::option::of("[0-9]{1,4}"),
            fields_strategy(),
            proptest::collection::btree_set("[A-Za-z]{1,6}", 0..3),
            any::<bool>(),
        )
            .prop_map(|(local_id, fields, version, pending, diverged, deleted)| Shadow {
                local_id,
                fields,
                version,
                pending,
                diverged,
                deleted,
            })
    }

    fn record_strategy() -> impl proptest::strategy::Strategy<Value = RecordState> {
        use proptest::prelude::*;
        let provenance = (
            "[a-z]{1,4}",
            proptest::option::of("[0-9]{1,3}"),
            any::<i64>(),
            0u8..13,
            any::<u64>(),
        )
            .prop_map(|(system, version, source_time_ms, rule, decision)| Provenance {
                system,
                version,
                source_time_ms,
                rule: rule_from_code(rule).expect("codes 0 to 12 are rules"),
                decision,
            });
        let agreed = (value_strategy(), provenance).prop_map(|(value, from)| AgreedField { value, from });
        (
            proptest::collection::btree_map("[a-z]{1,6}", agreed, 0..4),
            any::<bool>(),
            proptest::collection::btree_map("(crm|hr|lms|pg|zz)", shadow_strategy(), 0..4),
            proptest::collection::btree_map("[a-z]{1,5}", "[a-z@.]{0,10}", 0..3),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(fields, deleted, shadows, match_keys, created_ms, updated_ms)| RecordState {
                    base: Base { fields, deleted },
                    shadows,
                    match_keys,
                    created_ms,
                    updated_ms,
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn update_shadow_equals_decode_change_encode(
            state in record_strategy(),
            system in "(a|crm|erp|hr|lms|pg|zz)",
            new in shadow_strategy(),
        ) {
            let bytes = encode_record(&state);
            let replace = |s: &mut Shadow| std::mem::replace(s, new.clone());
            let (out, before) = update_shadow(&bytes, &system, replace).unwrap();
            let expected = changed_the_long_way(&state, &system, |s| *s = new.clone());
            proptest::prop_assert_eq!(out, expected);
            proptest::prop_assert_eq!(before, state.shadows.get(&system).cloned().unwrap_or_default());
        }
    }

    /// `shadow` with the agreed values of `base` in the fields of the same name, for
    /// names that start with a letter from a to m: references in the compact layout.
    fn sharing(mut shadow: Shadow, base: &Base) -> Shadow {
        for (name, field) in &base.fields {
            if name.as_str() < "n" {
                shadow.fields.insert(name.clone(), field.value.clone());
                shadow.pending.insert(name.clone(), field.value.clone());
            }
        }
        shadow
    }

    fn sharing_record_strategy() -> impl proptest::strategy::Strategy<Value = RecordState> {
        use proptest::prelude::*;
        (record_strategy(), any::<bool>()).prop_map(|(mut state, same_provenance)| {
            let shadows = std::mem::take(&mut state.shadows);
            state.shadows = shadows
                .into_iter()
                .map(|(system, shadow)| (system, sharing(shadow, &state.base)))
                .collect();
            if same_provenance {
                if let Some(first) = state.base.fields.values().next().map(|f| f.from.clone()) {
                    state.base.fields.values_mut().for_each(|f| f.from = first.clone());
                }
            }
            for (name, field) in &state.base.fields {
                if let Value::String(text) = &field.value {
                    state.match_keys.insert(name.clone(), text.clone());
                }
            }
            state
        })
    }

    proptest::proptest! {
        #[test]
        fn records_that_share_agreed_values_round_trip_and_change_in_place(
            state in sharing_record_strategy(),
            system in "(a|crm|erp|hr|lms|pg|zz)",
            new in shadow_strategy(),
        ) {
            let bytes = encode_record(&state);
            proptest::prop_assert_eq!(decode_record(&bytes).unwrap(), state.clone());
            // A marker byte before each provenance and match key is all it can add.
            let bound = encode_record_binary(&state).len() + state.base.fields.len() + state.match_keys.len();
            proptest::prop_assert!(bytes.len() <= bound);
            proptest::prop_assert_eq!(decode_record(&encode_record_binary(&state)).unwrap(), state.clone());
            let new = sharing(new, &state.base);
            let replace = |s: &mut Shadow| std::mem::replace(s, new.clone());
            let (out, before) = update_shadow(&bytes, &system, replace).unwrap();
            let expected = changed_the_long_way(&state, &system, |s| *s = new.clone());
            proptest::prop_assert_eq!(&out, &expected);
            proptest::prop_assert_eq!(before, state.shadows.get(&system).cloned().unwrap_or_default());
            // From a row without references, the same result.
            let (from_older, _) = update_shadow(&encode_record_binary(&state), &system, |s| *s = new.clone()).unwrap();
            proptest::prop_assert_eq!(from_older, expected);
        }
    }

    #[test]
    fn a_group_of_decisions_round_trips_and_reads_as_its_newest_time() {
        let mut decisions = sample_decisions();
        decisions[1].time_ms += 5;
        let mut group = DecisionGroup::default();
        for d in &decisions {
            group.push(d);
        }
        assert_eq!(group.len(), decisions.len() as u64);
        let row = group.take();
        assert!(group.is_empty());
        assert_eq!(row[0], DECISION_GROUP);
        assert_eq!(decode_decisions(&row).unwrap(), decisions);
        assert_eq!(
            decision_row_head(&row).unwrap(),
            (decisions[1].time_ms, decisions.len() as u64)
        );
        let members = decision_slices(&row).unwrap();
        assert_eq!(members.len(), decisions.len());
        assert_eq!(decode_decision(members[2]).unwrap(), decisions[2]);
        // A row of one decision, as earlier versions wrote it, is a group of one.
        let single = encode_decision(&decisions[0]);
        assert_eq!(decode_decisions(&single).unwrap(), vec![decisions[0].clone()]);
        // A cut or extended group is refused.
        assert_eq!(decode_decisions(&row[..row.len() - 1]), Err(FormatError::Truncated));
        let mut longer = row.clone();
        longer.push(0);
        assert_eq!(decode_decisions(&longer), Err(FormatError::Trailing));
    }

    #[test]
    fn a_damaged_group_never_panics() {
        let mut group = DecisionGroup::default();
        for d in sample_decisions() {
            group.push(&d);
        }
        let row = group.take();
        for i in 1..row.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = row.clone();
                damaged[i] ^= flip;
                let _ = decode_decisions(&damaged);
                let _ = decision_row_head(&damaged);
            }
        }
        // A member that is not a binary decision is refused, not decoded as one.
        let mut odd = vec![DECISION_GROUP, 0, 1, 2, b'{', b'}'];
        assert_eq!(decode_decisions(&odd), Err(FormatError::UnknownFormat(b'{')));
        odd.truncate(3);
        assert_eq!(decode_decisions(&odd), Err(FormatError::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_after_the_group_byte_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut row = vec![DECISION_GROUP];
            row.extend(tail);
            let _ = decode_decisions(&row);
            let _ = decision_row_head(&row);
        }
    }

    #[test]
    fn damaged_bytes_never_panic() {
        let bytes = encode_record(&sample());
        for i in 1..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                let _ = decode_record(&damaged);
            }
        }
        assert_eq!(decode_record(b"{}"), Err(FormatError::UnknownFormat(b'{')));
        let deep: Vec<u8> = [RECORD_BINARY, 0, 1, 1, b'x']
            .into_iter()
            .chain(std::iter::repeat_n(7u8, 1000).flat_map(|t| [t, 1]))
            .collect();
        assert_eq!(decode_record(&deep), Err(FormatError::TooDeep));
    }
}
