//! The file source: reads export files (the HR platform's nightly export) dropped into
//! an inbox directory, each exactly once.
//!
//! Life of a file:
//! 1. Listed: its name matches the link's `object` pattern and it is not a temporary
//!    file (a name starting with `.` or ending in `.tmp`). Files are taken oldest first
//!    by (modification time, name), one at a time, and only the oldest pending file:
//!    if it has not settled yet, newer files wait, so exports are merged in the order
//!    they were written.
//! 2. Settled: two listings at least `settle_ms` apart saw the same size and
//!    modification time. The source lists once when opened and again whenever it needs
//!    a new file. A writer should write to a temporary name and rename into place;
//!    settling guards writers that write in place.
//! 3. Checked, before anything of it is yielded, in one streaming pass: size within
//!    `max_file_bytes`, valid UTF-8 throughout, and for CSV a header row with the id
//!    column. A file that fails is set aside: moved to the failed directory with a
//!    `<name>.reason` file beside it (with `after = "keep"` the file stays and only the
//!    reason is written). Nothing of it is in state, so this needs no commit.
//! 4. Read in batches. A broken row becomes a reject with its line; the rest goes on.
//!    Each batch's checkpoint holds the byte offset after its last record; the file's
//!    last batch says `complete`, even when it has no records.
//! 5. Finished in [`FileSource::committed`], after the engine committed the completing
//!    batch: moved to the processed directory (`after = "move"`), never earlier. With
//!    `after = "keep"` the completing checkpoint itself lists the file as done.
//!
//! Restart: the engine reopens the source with its last committed checkpoint. A file in
//! progress is read on from the checkpoint's offset (for CSV the header is read first,
//! then the reader seeks). A file the checkpoint says is complete but that is still in
//! the inbox (a crash between commit and move) is moved at open, without being read.
//! A checkpointed file whose size or modification time differs is another file under
//! the same name and is read from the start.
//!
//! File I/O is blocking; each call runs on tokio's blocking pool with the source's state
//! moved into the task and back, so the runtime's workers never wait on a disk.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::config::{AfterProcessing, FileFormat, FileSystemConfig};
use super::error::{FileError, Unreadable};
use super::format::{self, Parsed, RecordContext};
use super::pattern::NamePattern;
use super::split::{self, Framing, RecordReader};
use crate::config::LinkConfig;
use crate::connector::{Checkpoint, ConnectorError, SourceBatch};
use crate::model::{SourceRecord, SourceReject, TimeMs, now_ms};

/// Layout version of [`FileCheckpoint`].
pub const CHECKPOINT_VERSION: u32 = 1;

/// The file source's checkpoint, as the engine stores it (JSON):
///
/// ```json
/// {"v": 1,
///  "file": {"name": "employees-2024-05-01.csv", "size": 48211,
///           "mtime_ms": 1714540000000, "offset": 20480, "line": 311,
///           "complete": false},
///  "done": [{"name": "employees-2024-04-30.csv", "size": 47990,
///            "mtime_ms": 1714453600000}]}
/// ```
///
/// `file` is the file of the batch (absent before the first file). `done` is used with
/// `after = "keep"` only: the files read or set aside, which stay in the inbox; an
/// entry is dropped once its file is no longer in the inbox, so the list stays as
/// short as the inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCheckpoint {
    pub v: u32,
    #[serde(default)]
    pub file: Option<FilePosition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<FileIdent>,
}

/// A file, told apart from a later file of the same name by size and modification
/// time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdent {
    pub name: String,
    pub size: u64,
    pub mtime_ms: TimeMs,
}

/// How far a file has been read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePosition {
    pub name: String,
    pub size: u64,
    pub mtime_ms: TimeMs,
    /// Byte offset after the last record yielded (after the header row at least, for
    /// CSV, once anything was yielded).
    pub offset: u64,
    /// Line terminators before `offset`, so reject locations stay right after a resume.
    pub line: u64,
    /// Every record of the file has been yielded; the file is finished once this
    /// checkpoint is committed.
    pub complete: bool,
}

impl FilePosition {
    pub fn ident(&self) -> FileIdent {
        FileIdent {
            name: self.name.clone(),
            size: self.size,
            mtime_ms: self.mtime_ms,
        }
    }
}

/// Counts since the source was opened, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileSourceStats {
    /// Files read to the end.
    pub files_completed: u64,
    /// Files set aside unread.
    pub files_failed: u64,
    /// Records yielded.
    pub records: u64,
    /// Rows yielded as rejects.
    pub rejects: u64,
}

/// Reads export files from an inbox; see the module doc.
pub struct FileSource {
    /// `None` only while a call runs on the blocking pool, or after a cancelled call
    /// lost it.
    core: Option<Box<SourceCore>>,
    /// Copies of the core's counters and lag anchor as of the last call, so the `&self`
    /// accessors never touch the core.
    stats: FileSourceStats,
    oldest_pending_mtime_ms: Option<TimeMs>,
}

impl FileSource {
    /// Opens the source over `config.inbox` (relative paths resolve against
    /// `base_dir`), creating the processed and failed directories if missing, and
    /// finishing a file the checkpoint says is complete. The inbox must exist.
    pub fn open(
        system: &str,
        config: &FileSystemConfig,
        link: &LinkConfig,
        base_dir: &Path,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<FileSource, ConnectorError> {
        let core = SourceCore::open(system, config, link, base_dir, checkpoint)?;
        Ok(FileSource {
            stats: core.stats,
            oldest_pending_mtime_ms: core.oldest_pending_mtime_ms,
            core: Some(Box::new(core)),
        })
    }

    /// Up to `max` records and rejects of the current file. `Ok(None)` when no file is
    /// ready; a file's last batch carries a completing checkpoint even when empty.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        self.run(move |core| core.next_batch(max)).await
    }

    /// The engine committed the batch that carried `checkpoint`: a completed file is
    /// moved to the processed directory now.
    pub async fn committed(&mut self, checkpoint: &Checkpoint) -> Result<(), ConnectorError> {
        let checkpoint = checkpoint.clone();
        self.run(move |core| core.committed(&checkpoint)).await
    }

    /// Age in seconds of the oldest matching file in the inbox not yet finished, as of
    /// the last listing; 0 when there is none.
    pub fn lag_seconds(&self) -> f64 {
        match self.oldest_pending_mtime_ms {
            Some(mtime) => (now_ms() - mtime).max(0) as f64 / 1000.0,
            None => 0.0,
        }
    }

    pub fn stats(&self) -> FileSourceStats {
        self.stats
    }

    /// Files set aside unread since the source was opened.
    pub fn files_failed(&self) -> u64 {
        self.stats.files_failed
    }

    /// Files read to the end since the source was opened.
    pub fn files_completed(&self) -> u64 {
        self.stats.files_completed
    }

    async fn run<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut SourceCore) -> Result<T, FileError> + Send + 'static,
    ) -> Result<T, ConnectorError> {
        let mut core = self.core.take().ok_or(FileError::StateLost)?;
        let (core, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut core);
            (core, result)
        })
        .await
        .map_err(FileError::Task)?;
        self.stats = core.stats;
        self.oldest_pending_mtime_ms = core.oldest_pending_mtime_ms;
        self.core = Some(core);
        Ok(result?)
    }
}

/// What a listing saw of one file, to tell when it has settled.
#[derive(Debug, Clone, Copy)]
struct Observation {
    size: u64,
    mtime_ms: TimeMs,
    /// First listing that saw this size and modification time.
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    offset: u64,
    line: u64,
}

/// The file being read.
struct Reading {
    ident: FileIdent,
    /// Position after the last record yielded.
    cursor: Cursor,
    /// The pre-read checks passed (they run again after a restart).
    checked: bool,
    /// Open reader at `cursor`; dropped after an I/O error and reopened at `cursor`.
    open: Option<OpenFile>,
}

struct OpenFile {
    /// Limited to the size the file had when listed, so bytes appended later are not
    /// read under the old identity.
    reader: RecordReader<BufReader<io::Take<File>>>,
    /// CSV column names; `None` for JSONL.
    header: Option<Vec<String>>,
}

enum Prepared {
    Ready,
    /// The file is no longer in the inbox.
    Gone,
    /// Its size or modification time differs from when it was listed or checkpointed.
    Changed,
    Unreadable(Unreadable),
}

/// The source's state and blocking logic.
struct SourceCore {
    system: String,
    inbox: PathBuf,
    processed: PathBuf,
    failed: PathBuf,
    format: FileFormat,
    after: AfterProcessing,
    max_file_bytes: u64,
    max_record_bytes: u64,
    settle: Duration,
    pattern: NamePattern,
    id_field: String,
    version_field: Option<String>,
    /// Matching files of the last listing, by name.
    observed: HashMap<String, Observation>,
    /// Modification time of the oldest unfinished matching file of the last listing.
    oldest_pending_mtime_ms: Option<TimeMs>,
    /// With `after = "keep"`: files finished (read or set aside) still in the inbox.
    done: Vec<FileIdent>,
    current: Option<Reading>,
    /// Read to the end, completing checkpoint handed out, not yet committed: it stays
    /// in the inbox but is never read again (`after = "move"`).
    awaiting_commit: Option<FileIdent>,
    /// Committed, but moving it failed; retried before anything else.
    move_due: Option<FileIdent>,
    stats: FileSourceStats,
}

impl SourceCore {
    fn open(
        system: &str,
        config: &FileSystemConfig,
        link: &LinkConfig,
        base_dir: &Path,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Self, FileError> {
        let inbox = base_dir.join(
            config
                .inbox
                .as_ref()
                .ok_or(FileError::NotConfigured { setting: "inbox" })?,
        );
        let beside_inbox = |dir: &str| match inbox.parent() {
            Some(parent) => parent.join(dir),
            None => inbox.join(dir),
        };
        let processed = match &config.processed_dir {
            Some(d) => base_dir.join(d),
            None => beside_inbox("processed"),
        };
        let failed = match &config.failed_dir {
            Some(d) => base_dir.join(d),
            None => beside_inbox("failed"),
        };
        let pattern = NamePattern::parse(&link.object)?;
        fs::create_dir_all(&failed).map_err(|e| FileError::io("create", &failed, e))?;
        if config.after == AfterProcessing::Move {
            fs::create_dir_all(&processed).map_err(|e| FileError::io("create", &processed, e))?;
        }
        let checkpoint = parse_checkpoint(checkpoint)?;

        let mut core = SourceCore {
            system: system.to_string(),
            inbox,
            processed,
            failed,
            format: config.format,
            after: config.after,
            max_file_bytes: config.max_file_bytes,
            max_record_bytes: config.max_record_bytes,
            settle: Duration::from_millis(config.settle_ms),
            pattern,
            id_field: link.id_field.clone(),
            version_field: link.version_field.clone(),
            observed: HashMap::new(),
            oldest_pending_mtime_ms: None,
            done: Vec::new(),
            current: None,
            awaiting_commit: None,
            move_due: None,
            stats: FileSourceStats::default(),
        };
        if let Some(checkpoint) = checkpoint {
            if core.after == AfterProcessing::Keep {
                core.done = checkpoint.done;
            }
            if let Some(position) = checkpoint.file {
                let ident = position.ident();
                match (position.complete, core.after) {
                    (true, AfterProcessing::Move) => {
                        // Committed before the crash; only the move is missing.
                        if let Err(error) = core.move_processed(&ident) {
                            tracing::warn!(
                                system = %core.system,
                                file = %ident.name,
                                error = %ConnectorError::from(error),
                                "cannot move finished export file; will retry"
                            );
                            core.move_due = Some(ident);
                        }
                    }
                    (true, AfterProcessing::Keep) => {
                        if !core.done.contains(&ident) {
                            core.done.push(ident);
                        }
                    }
                    (false, _) => {
                        core.current = Some(Reading {
                            ident,
                            cursor: Cursor {
                                offset: position.offset,
                                line: position.line,
                            },
                            checked: false,
                            open: None,
                        });
                    }
                }
            }
        }
        // The first listing starts the settle clock of every file already there.
        core.scan()?;
        Ok(core)
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<SourceBatch>, FileError> {
        let max = max.max(1);
        if let Some(ident) = self.move_due.clone() {
            self.move_processed(&ident)?;
            self.move_due = None;
        }
        loop {
            let mut reading = match self.current.take() {
                Some(reading) => reading,
                None => match self.scan()? {
                    Some(ident) => Reading {
                        ident,
                        cursor: Cursor { offset: 0, line: 0 },
                        checked: false,
                        open: None,
                    },
                    None => return Ok(None),
                },
            };
            let prepared = match self.prepare(&mut reading) {
                Ok(prepared) => prepared,
                Err(error) => {
                    self.current = Some(reading);
                    return Err(error);
                }
            };
            match prepared {
                Prepared::Ready => return self.read_batch(reading, max).map(Some),
                Prepared::Gone => {
                    if reading.cursor.offset > 0 {
                        tracing::warn!(
                            system = %self.system,
                            file = %reading.ident.name,
                            "export file disappeared before it was read to the end"
                        );
                    }
                }
                Prepared::Changed => {
                    if reading.cursor.offset > 0 {
                        tracing::warn!(
                            system = %self.system,
                            file = %reading.ident.name,
                            "export file changed while being read; it is read again from the start"
                        );
                    }
                }
                Prepared::Unreadable(reason) => {
                    self.set_aside(&reading.ident, &reason)?;
                    if self.after == AfterProcessing::Keep {
                        // The done list changed; hand it to the engine to store.
                        return Ok(Some(SourceBatch {
                            records: Vec::new(),
                            rejects: Vec::new(),
                            checkpoint: self.checkpoint(None),
                        }));
                    }
                }
            }
        }
    }

    fn committed(&mut self, checkpoint: &Checkpoint) -> Result<(), FileError> {
        let Some(FileCheckpoint {
            file: Some(position), ..
        }) = parse_checkpoint(Some(checkpoint))?
        else {
            return Ok(());
        };
        if !position.complete || self.after == AfterProcessing::Keep {
            return Ok(());
        }
        let ident = position.ident();
        if self.awaiting_commit.as_ref() == Some(&ident) {
            self.awaiting_commit = None;
        }
        if let Err(error) = self.move_processed(&ident) {
            self.move_due = Some(ident);
            return Err(error);
        }
        Ok(())
    }

    /// Lists the inbox, updates settle observations, the lag anchor and the done list,
    /// and returns the oldest pending file if it has settled.
    fn scan(&mut self) -> Result<Option<FileIdent>, FileError> {
        let listing = self.list_inbox()?;
        let now = Instant::now();
        if self.after == AfterProcessing::Keep {
            let present: HashSet<&FileIdent> = listing.iter().collect();
            self.done.retain(|d| present.contains(d));
        }
        let mut observed = HashMap::with_capacity(listing.len());
        let mut oldest = None;
        let mut next = None;
        let mut waiting = false;
        for file in &listing {
            let settled = match self.observed.get(&file.name) {
                Some(o) if o.size == file.size && o.mtime_ms == file.mtime_ms => {
                    observed.insert(file.name.clone(), *o);
                    now.duration_since(o.since) >= self.settle
                }
                _ => {
                    let o = Observation {
                        size: file.size,
                        mtime_ms: file.mtime_ms,
                        since: now,
                    };
                    observed.insert(file.name.clone(), o);
                    false
                }
            };
            if self.done.contains(file)
                || self.awaiting_commit.as_ref() == Some(file)
                || self.move_due.as_ref() == Some(file)
            {
                continue;
            }
            oldest = oldest.or(Some(file.mtime_ms));
            if next.is_none() && !waiting {
                if settled {
                    next = Some(file.clone());
                } else {
                    waiting = true;
                }
            }
        }
        self.observed = observed;
        self.oldest_pending_mtime_ms = oldest;
        Ok(next)
    }

    /// Matching files in the inbox, oldest first by (modification time, name).
    fn list_inbox(&self) -> Result<Vec<FileIdent>, FileError> {
        let list_error = |e| FileError::io("list", &self.inbox, e);
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.inbox).map_err(list_error)? {
            let entry = entry.map_err(list_error)?;
            // A name that is not UTF-8 cannot match a pattern from the configuration.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || name.ends_with(".tmp") || !self.pattern.matches(&name) {
                continue;
            }
            let meta = match fs::metadata(entry.path()) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(FileError::io("stat", entry.path(), e)),
            };
            if meta.is_file() {
                files.push(FileIdent {
                    name,
                    size: meta.len(),
                    mtime_ms: mtime_ms(&meta),
                });
            }
        }
        files.sort_by(|a, b| (a.mtime_ms, &a.name).cmp(&(b.mtime_ms, &b.name)));
        Ok(files)
    }

    /// Makes `reading` ready to read at its cursor: checks that it is still the same
    /// file, runs the pre-read checks once, reads the CSV header and seeks.
    fn prepare(&self, reading: &mut Reading) -> Result<Prepared, FileError> {
        if reading.open.is_some() {
            return Ok(Prepared::Ready);
        }
        let path = self.inbox.join(&reading.ident.name);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Prepared::Gone),
            Err(e) => return Err(FileError::io("stat", &path, e)),
        };
        let size = reading.ident.size;
        if meta.len() != size || mtime_ms(&meta) != reading.ident.mtime_ms {
            return Ok(Prepared::Changed);
        }
        let open_file = || match File::open(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileError::io("open", &path, e)),
        };
        let read_error = |e| FileError::io("read", &path, e);

        if !reading.checked {
            if size > self.max_file_bytes {
                return Ok(Prepared::Unreadable(Unreadable::TooLarge {
                    size,
                    max: self.max_file_bytes,
                }));
            }
            let Some(file) = open_file()? else {
                return Ok(Prepared::Gone);
            };
            if let Some(offset) = split::find_invalid_utf8(file.take(size)).map_err(read_error)? {
                return Ok(Prepared::Unreadable(Unreadable::InvalidUtf8 { offset }));
            }
        }

        let Some(file) = open_file()? else {
            return Ok(Prepared::Gone);
        };
        let mut cursor = reading.cursor;
        let header = match self.format {
            FileFormat::Jsonl => None,
            FileFormat::Csv => {
                let mut header_reader = RecordReader::new(
                    BufReader::new((&file).take(size)),
                    Framing::Csv,
                    self.record_limit(),
                    0,
                    0,
                );
                let ctx = self.context(&reading.ident);
                let checked = loop {
                    match header_reader.next_record().map_err(read_error)? {
                        None => break Err(Unreadable::NoHeader),
                        Some(raw) if raw.bytes.is_empty() && !raw.oversized => continue,
                        Some(raw) => break format::csv_header(&raw, &ctx),
                    }
                };
                match checked {
                    Ok(names) => {
                        if cursor.offset == 0 {
                            let (offset, line) = header_reader.position();
                            cursor = Cursor { offset, line };
                        }
                        Some(names)
                    }
                    Err(reason) => return Ok(Prepared::Unreadable(reason)),
                }
            }
        };
        reading.checked = true;
        (&file).seek(SeekFrom::Start(cursor.offset)).map_err(read_error)?;
        let reader = RecordReader::new(
            BufReader::new(file.take(size.saturating_sub(cursor.offset))),
            match self.format {
                FileFormat::Csv => Framing::Csv,
                FileFormat::Jsonl => Framing::Lines,
            },
            self.record_limit(),
            cursor.offset,
            cursor.line,
        );
        reading.cursor = cursor;
        reading.open = Some(OpenFile { reader, header });
        Ok(Prepared::Ready)
    }

    /// Reads one batch from a prepared file and hands out its checkpoint.
    fn read_batch(&mut self, mut reading: Reading, max: usize) -> Result<SourceBatch, FileError> {
        let start = reading.cursor;
        let mut records = Vec::new();
        let mut rejects = Vec::new();
        let ctx = self.context(&reading.ident);
        let open = reading.open.as_mut().expect("prepare leaves a ready file open");
        let filled = fill(open, &ctx, max, &mut records, &mut rejects);
        let (offset, line) = open.reader.position();
        let eof = match filled {
            Ok(eof) => eof,
            Err(e) => {
                // Reopen at the start of this batch next time; nothing of it was yielded.
                let error = FileError::io("read", self.inbox.join(&reading.ident.name), e);
                reading.open = None;
                reading.cursor = start;
                self.current = Some(reading);
                return Err(error);
            }
        };
        reading.cursor = Cursor { offset, line };
        self.stats.records += records.len() as u64;
        self.stats.rejects += rejects.len() as u64;
        if !rejects.is_empty() {
            tracing::warn!(
                system = %self.system,
                file = %reading.ident.name,
                rejects = rejects.len(),
                "rows of export file rejected"
            );
        }
        let position = FilePosition {
            name: reading.ident.name.clone(),
            size: reading.ident.size,
            mtime_ms: reading.ident.mtime_ms,
            offset,
            line,
            complete: eof,
        };
        if eof {
            self.stats.files_completed += 1;
            tracing::info!(
                system = %self.system,
                file = %reading.ident.name,
                "export file read to the end"
            );
            match self.after {
                AfterProcessing::Move => self.awaiting_commit = Some(reading.ident),
                AfterProcessing::Keep => self.done.push(reading.ident),
            }
        } else {
            self.current = Some(reading);
        }
        Ok(SourceBatch {
            records,
            rejects,
            checkpoint: self.checkpoint(Some(position)),
        })
    }

    /// Moves an unreadable file to the failed directory with its reason beside it (or,
    /// with `after = "keep"`, writes the reason and remembers the file as done).
    fn set_aside(&mut self, ident: &FileIdent, reason: &Unreadable) -> Result<(), FileError> {
        tracing::warn!(
            system = %self.system,
            file = %ident.name,
            reason = %reason,
            "export file set aside unread"
        );
        self.stats.files_failed += 1;
        match self.after {
            AfterProcessing::Move => {
                let dest = free_name(&self.failed, &ident.name)?;
                write_reason(&self.failed, &dest, reason)?;
                let from = self.inbox.join(&ident.name);
                fs::rename(&from, self.failed.join(&dest)).map_err(|e| FileError::io("move", from, e))?;
            }
            AfterProcessing::Keep => {
                write_reason(&self.failed, &ident.name, reason)?;
                self.done.push(ident.clone());
            }
        }
        Ok(())
    }

    /// Moves a finished file to the processed directory, if it is still the file that
    /// was read. Already gone means already moved.
    fn move_processed(&self, ident: &FileIdent) -> Result<(), FileError> {
        let from = self.inbox.join(&ident.name);
        match fs::metadata(&from) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(FileError::io("stat", from, e)),
            Ok(meta) if meta.len() != ident.size || mtime_ms(&meta) != ident.mtime_ms => {
                tracing::warn!(
                    system = %self.system,
                    file = %ident.name,
                    "export file changed after it was read; it stays and is read again"
                );
                return Ok(());
            }
            Ok(_) => {}
        }
        let dest = free_name(&self.processed, &ident.name)?;
        fs::rename(&from, self.processed.join(&dest)).map_err(|e| FileError::io("move", from, e))?;
        tracing::info!(
            system = %self.system,
            file = %ident.name,
            "export file moved to the processed directory"
        );
        Ok(())
    }

    fn checkpoint(&self, file: Option<FilePosition>) -> Checkpoint {
        let checkpoint = FileCheckpoint {
            v: CHECKPOINT_VERSION,
            file,
            done: self.done.clone(),
        };
        serde_json::to_value(checkpoint).expect("a file checkpoint has only json-safe fields")
    }

    fn context<'a>(&'a self, ident: &'a FileIdent) -> RecordContext<'a> {
        RecordContext {
            file_name: &ident.name,
            id_field: &self.id_field,
            version_field: self.version_field.as_deref(),
            source_time_ms: ident.mtime_ms,
            max_record_bytes: self.max_record_bytes,
        }
    }

    fn record_limit(&self) -> usize {
        usize::try_from(self.max_record_bytes).unwrap_or(usize::MAX)
    }
}

/// Reads records until `max` items are collected or the file ends; returns whether it
/// ended.
fn fill(
    open: &mut OpenFile,
    ctx: &RecordContext<'_>,
    max: usize,
    records: &mut Vec<SourceRecord>,
    rejects: &mut Vec<SourceReject>,
) -> io::Result<bool> {
    while records.len() + rejects.len() < max {
        let Some(raw) = open.reader.next_record()? else {
            return Ok(true);
        };
        let parsed = match &open.header {
            Some(header) => format::csv_row(header, &raw, ctx),
            None => format::jsonl_line(&raw, ctx),
        };
        match parsed {
            Parsed::Record(record) => records.push(record),
            Parsed::Reject(reject) => rejects.push(reject),
            Parsed::Blank => {}
        }
    }
    open.reader.at_eof()
}

fn parse_checkpoint(checkpoint: Option<&Checkpoint>) -> Result<Option<FileCheckpoint>, FileError> {
    let Some(value) = checkpoint.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let parsed = FileCheckpoint::deserialize(value).map_err(FileError::Checkpoint)?;
    if parsed.v != CHECKPOINT_VERSION {
        return Err(FileError::CheckpointVersion(parsed.v));
    }
    Ok(Some(parsed))
}

fn mtime_ms(meta: &fs::Metadata) -> TimeMs {
    match meta.modified().map(|t| t.duration_since(UNIX_EPOCH)) {
        Ok(Ok(since)) => since.as_millis() as TimeMs,
        Ok(Err(before)) => -(before.duration().as_millis() as TimeMs),
        Err(_) => 0,
    }
}

/// `name` if nothing of that name is in `dir`, else `<stem>.<n>.<ext>` for the first
/// free `n`, so an older file of the same name is never overwritten.
fn free_name(dir: &Path, name: &str) -> Result<String, FileError> {
    let taken = |candidate: &str| {
        dir.join(candidate)
            .try_exists()
            .map_err(|e| FileError::io("stat", dir.join(candidate), e))
    };
    if !taken(name)? {
        return Ok(name.to_string());
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    };
    let mut n = 1u64;
    loop {
        let candidate = match ext {
            Some(ext) => format!("{stem}.{n}.{ext}"),
            None => format!("{stem}.{n}"),
        };
        if !taken(&candidate)? {
            return Ok(candidate);
        }
        n += 1;
    }
}

/// Writes `<name>.reason` in `dir` through a temporary file, so it is whole or absent.
fn write_reason(dir: &Path, name: &str, reason: &Unreadable) -> Result<(), FileError> {
    let tmp = dir.join(format!(".{name}.reason.tmp"));
    let path = dir.join(format!("{name}.reason"));
    fs::write(&tmp, format!("{reason}\n")).map_err(|e| FileError::io("write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| FileError::io("write", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine drives sources from spawned tasks; this fails to compile otherwise.
    #[allow(dead_code)]
    fn futures_are_send(source: &mut FileSource, checkpoint: &Checkpoint) {
        fn send<T: Send>(_: T) {}
        send(source.next_batch(1));
        send(source.committed(checkpoint));
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_other_layouts() {
        let value = serde_json::json!({
            "v": 1,
            "file": {"name": "a.csv", "size": 10, "mtime_ms": 5, "offset": 4, "line": 1,
                     "complete": false},
        });
        let parsed = parse_checkpoint(Some(&value)).unwrap().unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), value);
        assert!(parse_checkpoint(Some(&serde_json::Value::Null)).unwrap().is_none());
        assert!(matches!(
            parse_checkpoint(Some(&serde_json::json!({"v": 2}))),
            Err(FileError::CheckpointVersion(2))
        ));
        assert!(matches!(
            parse_checkpoint(Some(&serde_json::json!(17))),
            Err(FileError::Checkpoint(_))
        ));
    }

    #[test]
    fn free_name_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(free_name(dir.path(), "e.csv").unwrap(), "e.csv");
        fs::write(dir.path().join("e.csv"), "").unwrap();
        assert_eq!(free_name(dir.path(), "e.csv").unwrap(), "e.1.csv");
        fs::write(dir.path().join("e.1.csv"), "").unwrap();
        assert_eq!(free_name(dir.path(), "e.csv").unwrap(), "e.2.csv");
        fs::write(dir.path().join("noext"), "").unwrap();
        assert_eq!(free_name(dir.path(), "noext").unwrap(), "noext.1");
    }
}
