//! The file sink: each call to [`FileSink::apply`] writes one export file into
//! `export_dir` for the receiving system to pick up.
//!
//! Atomic and idempotent: the file is written as `<name>.tmp`, fsynced, renamed to
//! `<name>`, and the directory is fsynced, so a reader sees a whole file or none
//! (readers must ignore `*.tmp`). `<name>` is `<object-stem>-<first seq>.<ext>`, the
//! first write's outbox sequence zero-padded to 20 digits: the engine repeats a batch
//! after a crash from the same first pending seq, so a repeat replaces the file instead
//! of adding a second one, and names sort in write order. The object stem is the first
//! write's `object` without its extension and without `*`/`?` (`employees-*.csv` →
//! `employees`), other characters outside `[A-Za-z0-9._-]` replaced by `_`.
//!
//! JSONL: one object per write,
//! `{"op": "create|update|delete", "id": …, "global_id": …, "seq": …, "entity": …,
//! "object": …, "fields": {…}}`.
//! CSV: a header `op,id,<field names>` with the union of all writes' field names in
//! name order, one row per write; strings as they are, numbers and booleans as JSON
//! text, null and absent fields as empty cells, arrays and objects as JSON text. A
//! write with a field named `op` or `id` cannot be written as CSV and fails permanently.
//!
//! Ids: the target has no id scheme of its own, so a create's id is the record's
//! global id, returned as the acknowledged local id; updates and deletes carry the
//! local id they were given (a write without one fails permanently).
//!
//! Errors: see [`super::error`]; an I/O failure fails every write of the call.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use super::config::{FileFormat, FileSystemConfig};
use super::error::FileError;
use crate::connector::ConnectorError;
use crate::model::{GlobalId, Write, WriteAck, WriteOp};

/// Columns the CSV export sets itself, before the fields.
const CSV_OWN_COLUMNS: [&str; 2] = ["op", "id"];

/// Writes export files; see the module doc.
pub struct FileSink {
    system: String,
    export_dir: PathBuf,
    format: FileFormat,
    files_written: u64,
}

/// One write as it goes into the file.
struct Row {
    id: String,
    write: Write,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    op: &'static str,
    id: &'a str,
    global_id: GlobalId,
    seq: u64,
    entity: &'a str,
    object: &'a str,
    fields: &'a Map<String, Value>,
}

impl FileSink {
    /// Opens the sink over `config.export_dir` (relative paths resolve against
    /// `base_dir`), creating the directory if missing.
    pub fn open(system: &str, config: &FileSystemConfig, base_dir: &Path) -> Result<FileSink, ConnectorError> {
        let dir = config
            .export_dir
            .as_ref()
            .ok_or(FileError::NotConfigured { setting: "export_dir" })?;
        let export_dir = base_dir.join(dir);
        fs::create_dir_all(&export_dir).map_err(|e| FileError::io("create", &export_dir, e))?;
        Ok(FileSink {
            system: system.to_string(),
            export_dir,
            format: config.format,
            files_written: 0,
        })
    }

    /// Writes `writes` as one export file; one result per write, in order.
    pub async fn apply(&mut self, writes: Vec<Write>) -> Vec<Result<WriteAck, ConnectorError>> {
        let Some(first) = writes.first() else {
            return Vec::new();
        };
        let name = export_file_name(&first.object, first.seq, self.format);
        let mut results: Vec<Option<Result<WriteAck, ConnectorError>>> = Vec::with_capacity(writes.len());
        let mut rows = Vec::with_capacity(writes.len());
        for write in writes {
            let id = match (write.op, &write.local_id) {
                (WriteOp::Create, _) => write.global_id.to_string(),
                (_, Some(id)) => id.clone(),
                (_, None) => {
                    results.push(Some(Err(ConnectorError::permanent(
                        "missing_id",
                        format!("{} without a local id", write.op.as_str()),
                    ))));
                    continue;
                }
            };
            if self.format == FileFormat::Csv {
                if let Some(clash) = CSV_OWN_COLUMNS.iter().find(|c| write.fields.contains_key(**c)) {
                    results.push(Some(Err(ConnectorError::permanent(
                        "field_clash",
                        format!("field {clash:?} clashes with the csv export's own column"),
                    ))));
                    continue;
                }
            }
            results.push(None);
            rows.push(Row { id, write });
        }
        if rows.is_empty() {
            return results
                .into_iter()
                .map(|r| r.expect("a write without a row already has its failure"))
                .collect();
        }

        let dir = self.export_dir.clone();
        let format = self.format;
        let task = tokio::task::spawn_blocking(move || {
            let outcome = write_export(&dir, &name, format, &rows);
            (rows, outcome)
        });
        let (acks, failure) = match task.await {
            Ok((rows, Ok(()))) => {
                self.files_written += 1;
                let acks: Vec<WriteAck> = rows
                    .into_iter()
                    .map(|r| WriteAck {
                        local_id: r.id,
                        version: None,
                    })
                    .collect();
                (acks, None)
            }
            Ok((_, Err(error))) => (Vec::new(), Some(ConnectorError::from(error))),
            Err(join) => (Vec::new(), Some(ConnectorError::from(FileError::Task(join)))),
        };
        if let Some(error) = &failure {
            tracing::warn!(system = %self.system, error = %error, "cannot write export file");
        }
        let mut acks = acks.into_iter();
        results
            .into_iter()
            .map(|slot| match (slot, &failure) {
                (Some(failed), _) => failed,
                (None, Some(error)) => Err(error.clone()),
                (None, None) => Ok(acks.next().expect("one ack per written row")),
            })
            .collect()
    }

    /// Export files written since the sink was opened.
    pub fn files_written(&self) -> u64 {
        self.files_written
    }
}

/// `<object-stem>-<seq, 20 digits>.<ext>`; see the module doc.
pub fn export_file_name(object: &str, first_seq: u64, format: FileFormat) -> String {
    let without_ext = match object.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => object,
    };
    let stem: String = without_ext
        .chars()
        .filter(|c| !matches!(c, '*' | '?'))
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = stem.trim_matches(|c| matches!(c, '-' | '_' | '.'));
    let stem = if stem.is_empty() { "export" } else { stem };
    format!("{stem}-{first_seq:020}.{}", format.extension())
}

/// Writes the file through `<name>.tmp`, fsyncs it, renames it into place and fsyncs
/// the directory. The temporary file is removed on failure.
fn write_export(dir: &Path, name: &str, format: FileFormat, rows: &[Row]) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(|e| FileError::io("create", dir, e))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let result = (|| {
        let file = File::create(&tmp)?;
        let file = match format {
            FileFormat::Jsonl => write_jsonl(BufWriter::new(file), rows)?,
            FileFormat::Csv => write_csv(BufWriter::new(file), rows)?,
        };
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(FileError::io("write", tmp, e));
    }
    let path = dir.join(name);
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(FileError::io("rename", path, e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::io("sync", dir, e))
}

fn write_jsonl(mut out: BufWriter<File>, rows: &[Row]) -> std::io::Result<File> {
    for row in rows {
        let line = JsonLine {
            op: row.write.op.as_str(),
            id: &row.id,
            global_id: row.write.global_id,
            seq: row.write.seq,
            entity: &row.write.entity,
            object: &row.write.object,
            fields: &row.write.fields,
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())
}

fn write_csv(out: BufWriter<File>, rows: &[Row]) -> std::io::Result<File> {
    let names: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.write.fields.keys().map(String::as_str))
        .collect();
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(CSV_OWN_COLUMNS.iter().copied().chain(names.iter().copied()))?;
    for row in rows {
        let mut record = vec![row.write.op.as_str().to_string(), row.id.clone()];
        record.extend(names.iter().map(|n| cell(row.write.fields.get(*n))));
        csv.write_record(&record)?;
    }
    let out = csv.into_inner().map_err(|e| e.into_error())?;
    out.into_inner().map_err(|e| e.into_error())
}

fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine drives sinks from spawned tasks; this fails to compile otherwise.
    #[allow(dead_code)]
    fn apply_is_send(sink: &mut FileSink) {
        fn send<T: Send>(_: T) {}
        send(sink.apply(Vec::new()));
    }

    #[test]
    fn export_names_are_deterministic_and_sortable() {
        assert_eq!(
            export_file_name("employees-*.csv", 42, FileFormat::Jsonl),
            "employees-00000000000000000042.jsonl"
        );
        assert_eq!(
            export_file_name("people?.jsonl", u64::MAX, FileFormat::Csv),
            "people-18446744073709551615.csv"
        );
        assert_eq!(
            export_file_name("*", 1, FileFormat::Csv),
            "export-00000000000000000001.csv"
        );
        assert_eq!(
            export_file_name("hr staff/x", 1, FileFormat::Csv),
            "hr_staff_x-00000000000000000001.csv"
        );
    }

    #[test]
    fn cells_are_stringified() {
        assert_eq!(cell(None), "");
        assert_eq!(cell(Some(&Value::Null)), "");
        assert_eq!(cell(Some(&serde_json::json!("a,b"))), "a,b");
        assert_eq!(cell(Some(&serde_json::json!(1.5))), "1.5");
        assert_eq!(cell(Some(&serde_json::json!(true))), "true");
        assert_eq!(cell(Some(&serde_json::json!(["x"]))), "[\"x\"]");
    }
}
