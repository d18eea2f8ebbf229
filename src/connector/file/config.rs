//! Settings of a `file` system.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest export file read, by default: a nightly HR export is a few MB; anything this
/// big is more likely a mistake than data.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;
/// Largest single row or line, by default.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 1 << 20;
/// How long a file's size and modification time must stay unchanged before it is read,
/// by default: a writer still appending changes one of them well within a second.
pub const DEFAULT_SETTLE_MS: u64 = 1000;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSystemConfig {
    /// Directory export files are dropped into (read side); relative to the
    /// configuration file. Writers should write to a temporary name (ending in `.tmp` or
    /// starting with `.`, both ignored) and rename into place.
    #[serde(default)]
    pub inbox: Option<PathBuf>,
    /// Where finished files are moved; default `<inbox>/../processed`. Must be on the
    /// same filesystem as the inbox (a move is a rename).
    #[serde(default)]
    pub processed_dir: Option<PathBuf>,
    /// Where files that cannot be read are moved, with a `.reason` file beside them;
    /// default `<inbox>/../failed`. With `after = "keep"` only the `.reason` file is
    /// written here and the file stays in the inbox.
    #[serde(default)]
    pub failed_dir: Option<PathBuf>,
    /// Directory export files are written to (write side).
    #[serde(default)]
    pub export_dir: Option<PathBuf>,
    /// File format.
    #[serde(default)]
    pub format: FileFormat,
    /// What happens to a file once processed.
    #[serde(default)]
    pub after: AfterProcessing,
    /// Files larger than this are moved to the failed directory unread.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Rows or lines longer than this (terminator excluded) are rejected, not read.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
    /// A file is read only once two listings of the inbox at least this many
    /// milliseconds apart saw the same size and modification time, so a file still
    /// being written in place is not read half-written. Writers that rename into place
    /// may set 0 (two consecutive listings suffice).
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
}

impl Default for FileSystemConfig {
    /// The same values an empty `[systems.<name>]` table of type `file` gets.
    fn default() -> Self {
        Self {
            inbox: None,
            processed_dir: None,
            failed_dir: None,
            export_dir: None,
            format: FileFormat::default(),
            after: AfterProcessing::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            settle_ms: DEFAULT_SETTLE_MS,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// Comma-separated values with a header row; every value is read as a string.
    #[default]
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl FileFormat {
    /// File name extension of the format, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Csv => "csv",
            FileFormat::Jsonl => "jsonl",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AfterProcessing {
    /// Move the file to the processed directory.
    #[default]
    Move,
    /// Leave it in place (read-only inbox) and remember it in the state store.
    Keep,
}

fn default_max_file_bytes() -> u64 {
    DEFAULT_MAX_FILE_BYTES
}
fn default_max_record_bytes() -> u64 {
    DEFAULT_MAX_RECORD_BYTES
}
fn default_settle_ms() -> u64 {
    DEFAULT_SETTLE_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_an_empty_table() {
        let parsed: FileSystemConfig = toml::from_str("").expect("empty table parses");
        let default = FileSystemConfig::default();
        assert_eq!(
            serde_json::to_value(&parsed).expect("config serialises"),
            serde_json::to_value(&default).expect("config serialises"),
        );
        assert_eq!(default.settle_ms, DEFAULT_SETTLE_MS);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<FileSystemConfig>("settle_secs = 1").is_err());
    }
}
