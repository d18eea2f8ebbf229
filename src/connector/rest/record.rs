//! Reading records out of JSON responses: the record list at a pointer, one record's
//! id, fields, version and modification time, delete flags. Shared by the source (list
//! pages) and the sink (a record read again after a 412).

use serde_json::{Map, Value};

use super::config::{Concurrency, CursorFormat, DeleteDetection, RestObjectConfig};
use super::error::RestError;
use crate::model::{ChangeKind, SourceRecord, SourceReject, TimeMs};

/// Largest raw item kept in a reject, so a dead letter stays small.
const MAX_REJECT_RAW: usize = 16 * 1024;

/// How records of one object are read.
#[derive(Debug, Clone)]
pub struct RecordReader {
    pub id_field: String,
    pub version_field: Option<String>,
    pub fields_pointer: Option<String>,
    pub ignore_fields: Vec<String>,
    pub cursor_field: Option<String>,
    pub cursor_format: CursorFormat,
    pub concurrency: Concurrency,
    pub deletes: DeleteDetection,
}

/// A record read from a response, with its modification time when it has one.
#[derive(Debug, Clone)]
pub struct Read {
    pub record: SourceRecord,
    pub mtime_ms: Option<TimeMs>,
}

impl RecordReader {
    pub fn new(object: &RestObjectConfig, id_field: &str, version_field: Option<&str>) -> Self {
        RecordReader {
            id_field: id_field.to_string(),
            version_field: version_field.map(str::to_string),
            fields_pointer: object.fields.clone(),
            ignore_fields: object.ignore_fields.clone(),
            cursor_field: object.cursor.as_ref().map(|c| c.field.clone()),
            cursor_format: object.cursor.as_ref().map(|c| c.format).unwrap_or_default(),
            concurrency: object.concurrency.clone(),
            deletes: object.deletes.clone(),
        }
    }

    /// The array at `pointer` in `body`.
    pub fn list<'a>(body: &'a Value, pointer: &str, what: &'static str) -> Result<&'a Vec<Value>, RestError> {
        match body.pointer(pointer) {
            Some(Value::Array(items)) => Ok(items),
            Some(Value::Null) | None if !pointer.is_empty() => Err(RestError::Shape {
                what,
                detail: format!("no record array at {pointer:?}"),
            }),
            _ => Err(RestError::Shape {
                what,
                detail: format!("value at {pointer:?} is not an array"),
            }),
        }
    }

    /// Reads one item; an item that is not a record with an id is a reject.
    pub fn read(&self, item: Value, location: impl Fn() -> String) -> Result<Read, SourceReject> {
        let reject = |reason: String, item: &Value| SourceReject {
            location: location(),
            reason,
            raw: raw(item),
        };
        let mut fields: Map<String, Value> = match (&self.fields_pointer, item) {
            (_, item @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Array(_))) => {
                return Err(reject("item is not a json object".into(), &item));
            }
            (None, Value::Object(top)) => top,
            (Some(pointer), mut item) => match item.pointer_mut(pointer).map(Value::take) {
                Some(Value::Object(mut fields)) => {
                    if let Value::Object(top) = item {
                        for (k, v) in top {
                            if !fields.contains_key(&k) && !matches!(v, Value::Object(_)) {
                                fields.insert(k, v);
                            }
                        }
                    }
                    fields
                }
                _ => return Err(reject(format!("record has no object at {pointer:?}"), &item)),
            },
        };
        let reject = |reason: String, fields: Map<String, Value>| SourceReject {
            location: location(),
            reason,
            raw: raw(&Value::Object(fields)),
        };
        for name in &self.ignore_fields {
            fields.remove(name);
        }
        let local_id = match fields.get(&self.id_field) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(reject(format!("record has no id in field {:?}", self.id_field), fields)),
        };
        let mtime_ms = self
            .cursor_field
            .as_ref()
            .and_then(|f| fields.get(f))
            .and_then(|v| parse_time(v, self.cursor_format));
        let version = match &self.concurrency {
            Concurrency::VersionField { field } => fields.get(field).and_then(scalar),
            Concurrency::Etag { .. } => None,
            Concurrency::None => self.version_field.as_ref().and_then(|f| fields.get(f)).and_then(scalar),
        };
        let deleted = match &self.deletes {
            DeleteDetection::Flag { field, value } => match (fields.get(field), value) {
                (Some(v), Some(want)) => v == want,
                (Some(v), None) => !matches!(v, Value::Null | Value::Bool(false)),
                (None, _) => false,
            },
            _ => false,
        };
        let record = if deleted {
            SourceRecord {
                local_id,
                kind: ChangeKind::Delete,
                fields: Map::new(),
                version,
                source_time_ms: mtime_ms,
            }
        } else {
            SourceRecord {
                local_id,
                kind: ChangeKind::Upsert,
                fields,
                version,
                source_time_ms: mtime_ms,
            }
        };
        Ok(Read { record, mtime_ms })
    }
}

/// A scalar as a version string; objects and arrays are not versions.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn raw(item: &Value) -> String {
    let mut text = item.to_string();
    if text.len() > MAX_REJECT_RAW {
        let mut end = MAX_REJECT_RAW;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A modification time as the system writes it: RFC 3339 (`Z`, `+00:00`, or
/// Salesforce's `+0000`), or a number of epoch seconds / milliseconds.
pub fn parse_time(value: &Value, format: CursorFormat) -> Option<TimeMs> {
    match value {
        Value::String(s) => parse_time_text(s, format),
        Value::Number(n) => {
            let n = n.as_f64()?;
            epoch(n, format)
        }
        _ => None,
    }
}

pub fn parse_time_text(s: &str, format: CursorFormat) -> Option<TimeMs> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    if let Ok(t) = chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Some(t.timestamp_millis());
    }
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc().timestamp_millis());
    }
    s.parse::<f64>().ok().and_then(|n| epoch(n, format))
}

fn epoch(n: f64, format: CursorFormat) -> Option<TimeMs> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let ms = match format {
        CursorFormat::EpochMs => n,
        CursorFormat::EpochS => n * 1000.0,
        // A bare number under an RFC 3339 cursor: milliseconds if it is that large.
        CursorFormat::Rfc3339 | CursorFormat::Rfc3339Millis if n >= 1e11 => n,
        CursorFormat::Rfc3339 | CursorFormat::Rfc3339Millis => n * 1000.0,
    };
    (ms < 1e15).then_some(ms as TimeMs)
}

/// The cursor as a request writes it.
pub fn format_time(ms: TimeMs, format: CursorFormat) -> String {
    let ms = ms.max(0);
    match format {
        CursorFormat::EpochMs => ms.to_string(),
        CursorFormat::EpochS => (ms / 1000).to_string(),
        CursorFormat::Rfc3339 | CursorFormat::Rfc3339Millis => {
            let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
            if format == CursorFormat::Rfc3339 {
                t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            } else {
                t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
            }
        }
    }
}

/// The cursor as the system sees it: what `format_time` keeps of `ms`.
pub fn effective(ms: TimeMs, format: CursorFormat) -> TimeMs {
    match format {
        CursorFormat::Rfc3339 | CursorFormat::EpochS => ms.max(0) / 1000 * 1000,
        CursorFormat::Rfc3339Millis | CursorFormat::EpochMs => ms.max(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_parse_in_every_form() {
        let f = CursorFormat::Rfc3339;
        let t = parse_time_text("2026-11-27T18:09:45.000+0000", f).expect("salesforce form");
        assert_eq!(Some(t), parse_time_text("2026-11-27T18:09:45Z", f));
        assert_eq!(Some(t + 120), parse_time_text("2026-11-27T18:09:45.120+00:00", f));
        assert_eq!(
            parse_time(&json!(1_700_000_000), CursorFormat::EpochS),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_time(&json!(1_700_000_000_123i64), CursorFormat::EpochMs),
            Some(1_700_000_000_123)
        );
        assert_eq!(parse_time(&json!("yesterday"), f), None);
        assert_eq!(format_time(t + 999, f), "2026-11-27T18:09:45Z");
        assert_eq!(
            format_time(t + 5, CursorFormat::Rfc3339Millis),
            "2026-11-27T18:09:45.005Z"
        );
        assert_eq!(effective(t + 999, f), t);
    }

    #[test]
    fn records_read_ids_fields_and_flags() {
        let object: RestObjectConfig = toml::from_str(
            "list = { path = \"/x\" }\nfields = \"/properties\"\nignore_fields = [\"attributes\"]\n\
             cursor = { field = \"updated\", param = \"since\" }\ndeletes = { mode = \"flag\", field = \"archived\" }",
        )
        .expect("object parses");
        let reader = RecordReader::new(&object, "id", None);
        let item = json!({"id": 4711, "attributes": {"t": 1}, "properties": {"email": "a@x", "updated": "2026-01-01T00:00:00Z", "archived": false}});
        let read = reader.read(item, || "page 1".into()).expect("a record");
        assert_eq!(read.record.local_id, "4711");
        assert_eq!(read.record.kind, ChangeKind::Upsert);
        assert_eq!(read.record.fields["email"], json!("a@x"));
        assert!(!read.record.fields.contains_key("attributes"));
        assert!(read.mtime_ms.is_some());

        let item = json!({"id": "7", "properties": {"archived": true}});
        assert_eq!(
            reader.read(item, String::new).expect("a record").record.kind,
            ChangeKind::Delete
        );

        let reject = reader
            .read(json!({"properties": {}}), || "page 2, item 3".into())
            .expect_err("no id");
        assert_eq!(reject.location, "page 2, item 3");
        assert!(reject.reason.contains("\"id\""));
        assert!(reader.read(json!([1]), String::new).is_err());
    }
}
