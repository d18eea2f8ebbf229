//! Turning one raw record of an export file into a [`SourceRecord`] or a
//! [`SourceReject`], for both formats.
//!
//! CSV: the header row names the fields; every value is a JSON string (an empty cell is
//! an empty string). JSONL: each line is one JSON object, values as they are. In both,
//! the `id_field` value is the record's local id (a JSON number is written as text),
//! `version_field` (when configured) its version, and a `_deleted` or `__deleted` field
//! that is `true` (or the text "true", any case) makes the record a delete.
//!
//! Reject reasons name fields, lines and sizes, never values: they are logged and
//! shown in status. The raw text goes into the reject only, cut to [`MAX_RAW_BYTES`].

use serde_json::{Map, Value};

use super::error::Unreadable;
use super::split::RawRecord;
use crate::model::{ChangeKind, SourceRecord, SourceReject, TimeMs};

/// Largest raw text kept in a reject: enough to see and fix a row, small enough that a
/// batch of rejects stays small.
pub(crate) const MAX_RAW_BYTES: usize = 4096;

/// Fields that mark a record as deleted.
const DELETED_FIELDS: [&str; 2] = ["_deleted", "__deleted"];

/// What one raw record became.
#[derive(Debug)]
pub(crate) enum Parsed {
    Record(SourceRecord),
    Reject(SourceReject),
    /// A blank line: nothing.
    Blank,
}

/// Everything about the file and link that record conversion needs.
pub(crate) struct RecordContext<'a> {
    pub file_name: &'a str,
    pub id_field: &'a str,
    pub version_field: Option<&'a str>,
    pub source_time_ms: TimeMs,
    pub max_record_bytes: u64,
}

impl RecordContext<'_> {
    fn reject(&self, raw: &RawRecord, reason: impl Into<String>) -> Parsed {
        Parsed::Reject(SourceReject {
            location: format!("{}:line {}", self.file_name, raw.start_line),
            reason: reason.into(),
            raw: raw_text(&raw.bytes),
        })
    }

    fn record(&self, local_id: String, deleted: bool, fields: Map<String, Value>) -> Parsed {
        let version = self.version_field.and_then(|f| version_text(fields.get(f)));
        let (kind, fields) = if deleted {
            (ChangeKind::Delete, Map::new())
        } else {
            (ChangeKind::Upsert, fields)
        };
        Parsed::Record(SourceRecord {
            local_id,
            kind,
            fields,
            version,
            source_time_ms: Some(self.source_time_ms),
        })
    }
}

/// The header row of a CSV file, checked: parseable, no duplicate names, has the id
/// column.
pub(crate) fn csv_header(raw: &RawRecord, ctx: &RecordContext<'_>) -> Result<Vec<String>, Unreadable> {
    if raw.oversized {
        return Err(Unreadable::HeaderTooLong {
            max: ctx.max_record_bytes,
        });
    }
    if raw.unterminated_quote {
        return Err(Unreadable::BadHeader);
    }
    let names = csv_fields(&raw.bytes).map_err(|_| Unreadable::BadHeader)?;
    let mut seen = std::collections::BTreeSet::new();
    for name in &names {
        if !seen.insert(name.as_str()) {
            return Err(Unreadable::DuplicateColumn(name.clone()));
        }
    }
    if !seen.contains(ctx.id_field) {
        return Err(Unreadable::MissingColumn(ctx.id_field.to_string()));
    }
    Ok(names)
}

/// One CSV data row.
pub(crate) fn csv_row(header: &[String], raw: &RawRecord, ctx: &RecordContext<'_>) -> Parsed {
    if let Some(reason) = frame_problem(raw, ctx) {
        return ctx.reject(raw, reason);
    }
    if raw.bytes.is_empty() {
        return Parsed::Blank;
    }
    let values = match csv_fields(&raw.bytes) {
        Ok(v) => v,
        Err(reason) => return ctx.reject(raw, reason),
    };
    if values.len() != header.len() {
        return ctx.reject(
            raw,
            format!("row has {} fields, header has {}", values.len(), header.len()),
        );
    }
    let fields: Map<String, Value> = header
        .iter()
        .cloned()
        .zip(values.into_iter().map(Value::String))
        .collect();
    let local_id = match fields.get(ctx.id_field) {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => return ctx.reject(raw, format!("empty id in column {:?}", ctx.id_field)),
    };
    let deleted = is_deleted(&fields);
    ctx.record(local_id, deleted, fields)
}

/// One JSONL line.
pub(crate) fn jsonl_line(raw: &RawRecord, ctx: &RecordContext<'_>) -> Parsed {
    if let Some(reason) = frame_problem(raw, ctx) {
        return ctx.reject(raw, reason);
    }
    if raw.bytes.iter().all(u8::is_ascii_whitespace) {
        return Parsed::Blank;
    }
    let fields = match serde_json::from_slice::<Value>(&raw.bytes) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return ctx.reject(raw, "line is not a json object"),
        Err(e) => return ctx.reject(raw, format!("line is not json: {e}")),
    };
    let local_id = match fields.get(ctx.id_field) {
        None | Some(Value::Null) => {
            return ctx.reject(raw, format!("missing id field {:?}", ctx.id_field));
        }
        Some(Value::String(id)) if id.is_empty() => {
            return ctx.reject(raw, format!("empty id in field {:?}", ctx.id_field));
        }
        Some(Value::String(id)) => id.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return ctx.reject(raw, format!("id field {:?} is not a string or number", ctx.id_field));
        }
    };
    let deleted = is_deleted(&fields);
    ctx.record(local_id, deleted, fields)
}

fn frame_problem(raw: &RawRecord, ctx: &RecordContext<'_>) -> Option<String> {
    if raw.oversized {
        Some(format!("record is over max_record_bytes {}", ctx.max_record_bytes))
    } else if raw.unterminated_quote {
        Some("unterminated quoted field".to_string())
    } else {
        None
    }
}

/// Fields of one CSV record. The splitter already cut exactly one record, so the csv
/// crate finding none or two means the framing disagreed: the row is rejected.
fn csv_fields(bytes: &[u8]) -> Result<Vec<String>, &'static str> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut record = csv::StringRecord::new();
    match reader.read_record(&mut record) {
        Ok(true) => {}
        Ok(false) | Err(_) => return Err("row is not valid csv"),
    }
    match reader.read_record(&mut csv::StringRecord::new()) {
        Ok(false) => Ok(record.iter().map(str::to_string).collect()),
        Ok(true) | Err(_) => Err("row is not valid csv"),
    }
}

fn is_deleted(fields: &Map<String, Value>) -> bool {
    DELETED_FIELDS.iter().any(|f| match fields.get(*f) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.trim().eq_ignore_ascii_case("true"),
        _ => false,
    })
}

fn version_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The raw text of a record for a reject, cut to [`MAX_RAW_BYTES`] on a character
/// boundary.
fn raw_text(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_RAW_BYTES)];
    match std::str::from_utf8(cut) {
        Ok(s) => s.to_string(),
        Err(e) => String::from_utf8_lossy(&cut[..e.valid_up_to()]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawRecord {
        RawRecord {
            bytes: text.as_bytes().to_vec(),
            oversized: false,
            unterminated_quote: false,
            start_line: 7,
        }
    }

    fn ctx() -> RecordContext<'static> {
        RecordContext {
            file_name: "e.csv",
            id_field: "id",
            version_field: Some("rev"),
            source_time_ms: 1000,
            max_record_bytes: 100,
        }
    }

    fn record(p: Parsed) -> SourceRecord {
        match p {
            Parsed::Record(r) => r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn reject(p: Parsed) -> SourceReject {
        match p {
            Parsed::Reject(r) => r,
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[test]
    fn csv_header_checks() {
        assert_eq!(
            csv_header(&raw("id,name,rev"), &ctx()).unwrap(),
            vec!["id", "name", "rev"]
        );
        assert_eq!(
            csv_header(&raw("name,rev"), &ctx()),
            Err(Unreadable::MissingColumn("id".into()))
        );
        assert_eq!(
            csv_header(&raw("id,name,name"), &ctx()),
            Err(Unreadable::DuplicateColumn("name".into()))
        );
        let mut long = raw("id");
        long.oversized = true;
        assert_eq!(csv_header(&long, &ctx()), Err(Unreadable::HeaderTooLong { max: 100 }));
    }

    #[test]
    fn csv_rows() {
        let header: Vec<String> = ["id", "name", "rev", "_deleted"].map(String::from).into();
        let r = record(csv_row(&header, &raw("7,\"Doe, J\",3,"), &ctx()));
        assert_eq!(r.local_id, "7");
        assert_eq!(r.kind, ChangeKind::Upsert);
        assert_eq!(r.version.as_deref(), Some("3"));
        assert_eq!(r.fields["name"], "Doe, J");
        assert_eq!(r.fields["_deleted"], "");
        assert_eq!(r.source_time_ms, Some(1000));

        let r = record(csv_row(&header, &raw("7,,3,TRUE"), &ctx()));
        assert_eq!(r.kind, ChangeKind::Delete);
        assert!(r.fields.is_empty());
        assert_eq!(r.version.as_deref(), Some("3"));

        let j = reject(csv_row(&header, &raw("7,x"), &ctx()));
        assert_eq!(j.location, "e.csv:line 7");
        assert_eq!(j.reason, "row has 2 fields, header has 4");
        assert_eq!(j.raw, "7,x");
        let j = reject(csv_row(&header, &raw(",x,1,"), &ctx()));
        assert_eq!(j.reason, "empty id in column \"id\"");
        assert!(matches!(csv_row(&header, &raw(""), &ctx()), Parsed::Blank));
    }

    #[test]
    fn jsonl_lines() {
        let r = record(jsonl_line(&raw(r#"{"id": 12, "rev": 4, "n": null}"#), &ctx()));
        assert_eq!((r.local_id.as_str(), r.version.as_deref()), ("12", Some("4")));
        assert_eq!(r.fields["n"], Value::Null);
        let r = record(jsonl_line(&raw(r#"{"id": "a", "__deleted": true}"#), &ctx()));
        assert_eq!(r.kind, ChangeKind::Delete);
        assert!(matches!(jsonl_line(&raw("  \t"), &ctx()), Parsed::Blank));
        assert_eq!(
            reject(jsonl_line(&raw("[1]"), &ctx())).reason,
            "line is not a json object"
        );
        assert!(
            reject(jsonl_line(&raw("{nope"), &ctx()))
                .reason
                .starts_with("line is not json")
        );
        assert_eq!(
            reject(jsonl_line(&raw(r#"{"name": "x"}"#), &ctx())).reason,
            "missing id field \"id\""
        );
        assert_eq!(
            reject(jsonl_line(&raw(r#"{"id": true}"#), &ctx())).reason,
            "id field \"id\" is not a string or number"
        );
    }

    #[test]
    fn raw_text_is_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_RAW_BYTES);
        let cut = raw_text(text.as_bytes());
        assert_eq!(cut.len(), MAX_RAW_BYTES);
        let odd = format!("a{text}");
        assert_eq!(raw_text(odd.as_bytes()).len(), MAX_RAW_BYTES - 1);
    }
}
