//! What can go wrong in the file connector, and how the engine should treat it.
//!
//! Two different things live here. [`FileError`] is an operation that failed (the inbox
//! cannot be listed, an export cannot be written): it becomes a classified
//! [`ConnectorError`]. [`Unreadable`] is a verdict on one input file (too large, not
//! UTF-8, no id column): it is not an error of the link; the file is set aside in the
//! failed directory with the verdict as its reason and the link goes on.
//!
//! Classification of I/O errors ([`io_class`]):
//! - permission denied, read-only filesystem, not a directory / is a directory: fatal.
//!   The configured directory is unusable for every file and every write until an
//!   operator fixes it; stopping the link and reporting beats dead-lettering each write.
//! - everything else (disk full, quota, interrupted, a vanished network mount, unknown
//!   errors): transient, retried with backoff.

use std::io;
use std::path::PathBuf;

use crate::connector::{ConnectorError, ErrorClass};

/// A failed operation of the file connector.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{setting} is not set")]
    NotConfigured { setting: &'static str },
    #[error("object {pattern:?} is not a file name pattern (no `/`, not empty)")]
    BadPattern { pattern: String },
    #[error("checkpoint is not a file source checkpoint")]
    Checkpoint(#[source] serde_json::Error),
    #[error("checkpoint layout version {0} is not supported")]
    CheckpointVersion(u32),
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A previous call was cancelled while its blocking work ran, taking the source's
    /// position with it; the link must be reopened from its last committed checkpoint.
    #[error("file source state was lost by a cancelled call")]
    StateLost,
    #[error("blocking file task did not finish")]
    Task(#[source] tokio::task::JoinError),
}

impl FileError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        FileError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            FileError::NotConfigured { .. }
            | FileError::BadPattern { .. }
            | FileError::Checkpoint(_)
            | FileError::CheckpointVersion(_)
            | FileError::StateLost
            | FileError::Task(_) => ErrorClass::Fatal,
            FileError::Io { source, .. } => io_class(source.kind()),
        }
    }

    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FileError::NotConfigured { .. } | FileError::BadPattern { .. } => "config",
            FileError::Checkpoint(_) | FileError::CheckpointVersion(_) => "checkpoint",
            FileError::Io { source, .. } => match source.kind() {
                io::ErrorKind::PermissionDenied => "permission_denied",
                io::ErrorKind::ReadOnlyFilesystem => "read_only_filesystem",
                io::ErrorKind::StorageFull => "storage_full",
                io::ErrorKind::NotFound => "not_found",
                _ => "io",
            },
            FileError::StateLost => "state_lost",
            FileError::Task(_) => "task",
        }
    }
}

/// How an I/O error of the file connector is treated; see the module doc.
pub fn io_class(kind: io::ErrorKind) -> ErrorClass {
    match kind {
        io::ErrorKind::PermissionDenied
        | io::ErrorKind::ReadOnlyFilesystem
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

impl From<FileError> for ConnectorError {
    fn from(error: FileError) -> Self {
        let reason = crate::connector::reason_chain(&error);
        ConnectorError {
            class: error.class(),
            kind: error.kind(),
            reason,
            retry_after: None,
        }
    }
}

/// Why an input file is set aside unread. The text is written to the `.reason` file and
/// logged; it names columns and byte offsets, never a value from the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("file is {size} bytes, over max_file_bytes {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("invalid utf-8 at byte {offset}")]
    InvalidUtf8 { offset: u64 },
    #[error("no header row")]
    NoHeader,
    #[error("header row is over max_record_bytes {max}")]
    HeaderTooLong { max: u64 },
    #[error("header row is not valid csv")]
    BadHeader,
    #[error("missing column {0:?}")]
    MissingColumn(String),
    #[error("duplicate column {0:?}")]
    DuplicateColumn(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_error_carries_the_chain_and_class() {
        let e = FileError::io(
            "list",
            "/srv/inbox",
            io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        );
        let c = ConnectorError::from(e);
        assert_eq!(c.class, ErrorClass::Fatal);
        assert_eq!(c.kind, "permission_denied");
        assert_eq!(c.reason, "cannot list /srv/inbox: denied");

        let e = FileError::io("write", "/x", io::Error::new(io::ErrorKind::StorageFull, "full"));
        assert_eq!(ConnectorError::from(e).class, ErrorClass::Transient);
        let e = FileError::io("write", "/x", io::Error::other("strange"));
        assert_eq!(ConnectorError::from(e).class, ErrorClass::Transient);
    }

    #[test]
    fn missing_column_reason_quotes_the_name() {
        assert_eq!(
            Unreadable::MissingColumn("employee_id".into()).to_string(),
            "missing column \"employee_id\""
        );
    }
}
