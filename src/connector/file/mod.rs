//! The `file` connector: batch export files (CSV, JSONL) dropped into a directory.

mod config;
pub use config::FileSystemConfig;

use super::{Checkpoint, ConnectorError, SourceBatch};
use crate::model::{Write, WriteAck};

pub struct FileSource {}

impl FileSource {
    pub fn open(
        _system: &str,
        _config: &FileSystemConfig,
        _link: &crate::config::LinkConfig,
        _base_dir: &std::path::Path,
        _checkpoint: Option<&Checkpoint>,
    ) -> Result<FileSource, ConnectorError> {
        todo!()
    }
}

impl FileSource {
    pub async fn next_batch(&mut self, _max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        todo!()
    }
    pub async fn committed(&mut self, _checkpoint: &Checkpoint) -> Result<(), ConnectorError> {
        todo!()
    }
    pub fn lag_seconds(&self) -> f64 {
        0.0
    }
}

pub struct FileSink {}

impl FileSink {
    pub fn open(
        _system: &str,
        _config: &FileSystemConfig,
        _base_dir: &std::path::Path,
    ) -> Result<FileSink, ConnectorError> {
        todo!()
    }
}

impl FileSink {
    pub async fn apply(&mut self, _writes: Vec<Write>) -> Vec<Result<WriteAck, ConnectorError>> {
        todo!()
    }
}
