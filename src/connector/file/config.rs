//! Settings of a `file` system.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest export file read, by default: a nightly HR export is a few MB; anything this
/// big is more likely a mistake than data.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;
/// Largest single row or line, by default.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSystemConfig {
    /// Directory export files are dropped into (read side); relative to the
    /// configuration file.
    #[serde(default)]
    pub inbox: Option<PathBuf>,
    /// Where finished files are moved; default `<inbox>/../processed`.
    #[serde(default)]
    pub processed_dir: Option<PathBuf>,
    /// Where files that cannot be read are moved, with a `.reason` file beside them;
    /// default `<inbox>/../failed`.
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
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    #[default]
    Csv,
    Jsonl,
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
