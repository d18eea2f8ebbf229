//! The `file` connector: batch export files (CSV, JSONL) dropped into a directory, the
//! way an HR platform hands over its nightly export, and export files written out for
//! a system that takes files.
//!
//! - [`source`]: reads each file of the inbox exactly once, in batches, moving it to
//!   the processed directory only after the engine committed its last batch; files
//!   that cannot be read are set aside in the failed directory with a reason.
//! - [`sink`]: writes one export file per batch of writes, atomically, under a name
//!   fixed by the batch's first outbox sequence, so a repeated batch replaces its file.
//! - `split` and `format`: the streaming record splitter and the per-format
//!   conversion of a record; `pattern`: the file name pattern of a link's `object`.

mod config;
pub mod error;
mod format;
mod pattern;
pub mod sink;
pub mod source;
mod split;

pub use config::{
    AfterProcessing, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_RECORD_BYTES, DEFAULT_SETTLE_MS, FileFormat, FileSystemConfig,
};
pub use error::FileError;
pub use sink::{FileSink, export_file_name};
pub use source::{FileCheckpoint, FileIdent, FilePosition, FileSource, FileSourceStats};
