//! The state file's storage backend: redb's own file backend, with each `fdatasync` run
//! on a thread of its own so that a durable commit does not hold the write lock while
//! the disk catches up.
//!
//! A durable redb commit writes its dirty pages and the header, then syncs. On a virtual
//! disk, syncing a few thousand scattered 4 KiB pages takes as long as merging them did
//! (90 ms per durable commit in `concord bench`), and redb holds its single write lock
//! all that time. Here `sync_data` only asks for a sync and returns; the syncer thread
//! runs it while the next transaction merges in memory.
//!
//! What keeps this as safe as a synchronous sync is the order of writes: **no write
//! reaches the file while a requested sync is unfinished**. `write` and `set_len` wait
//! for the syncer first, and a sync is requested only once the writes already running
//! have returned. So everything written before a commit's sync is on disk before
//! anything written after it, which is the one property redb's crash recovery relies on
//! (the pages a later commit reuses belong to trees that only an earlier, synced commit
//! could fall back to). What changes is only *when* a commit is durable: later than
//! `commit` returns. [`SyncBehind`] tells when; the state store's group commit counts a
//! commit as durable only then, and `StateStore::write` and `make_durable` wait for it.
//!
//! A failed sync is latched: every later write, sync and wait fails with it, and redb
//! treats the file as failed, as it would a failed synchronous sync.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use redb::backends::FileBackend;
use redb::{DatabaseError, StorageBackend};

/// Where the syncs stand; shared by the backend, its syncer thread and the store.
#[derive(Default)]
struct SyncState {
    /// Syncs asked for so far; a sync's generation is the count after asking.
    requested: u64,
    /// The highest generation whose sync has finished.
    completed: u64,
    /// Writes (or length changes) running now.
    writing: u32,
    /// The first failed sync, after which nothing more is written.
    failed: Option<(io::ErrorKind, String)>,
    /// The backend is closing: the syncer finishes what was asked and stops.
    closing: bool,
    /// Writeback should be started (see [`start_writeback`]).
    writeback: bool,
}

impl SyncState {
    fn error(&self) -> Option<io::Error> {
        self.failed.as_ref().map(|(kind, message)| {
            io::Error::new(*kind, format!("an earlier sync of the state file failed: {message}"))
        })
    }
}

struct Shared {
    /// A second handle to the state file, for `fdatasync`.
    file: File,
    state: Mutex<SyncState>,
    changed: Condvar,
    /// Bytes written since writeback was last started.
    unstarted: std::sync::atomic::AtomicU64,
}

/// How much is written before the disk is asked to start writing it back.
const WRITEBACK_BYTES: u64 = 1 << 20;

/// Asks the kernel to start writing the file's dirty pages to disk, without waiting:
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file. Only a hint; what
/// makes data durable is still the sync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the life of `file`; the call only reads it.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, SyncState>) -> MutexGuard<'a, SyncState> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no requested sync is unfinished, then counts a write as running.
    fn begin_write(&self) -> io::Result<()> {
        let mut state = self.lock();
        loop {
            if let Some(error) = state.error() {
                return Err(error);
            }
            if state.completed >= state.requested {
                state.writing += 1;
                return Ok(());
            }
            state = self.wait(state);
        }
    }

    fn end_write(&self) {
        let mut state = self.lock();
        state.writing -= 1;
        drop(state);
        self.changed.notify_all();
    }

    /// Asks for a sync of everything written so far and returns its generation.
    fn request(&self) -> io::Result<u64> {
        let mut state = self.lock();
        loop {
            if let Some(error) = state.error() {
                return Err(error);
            }
            if state.writing == 0 {
                break;
            }
            state = self.wait(state);
        }
        state.requested += 1;
        let generation = state.requested;
        drop(state);
        self.changed.notify_all();
        Ok(generation)
    }

    /// Starts the disk writing what was written since the last start, every
    /// [`WRITEBACK_BYTES`], so a sync finds most of it written already.
    fn written(&self, bytes: usize) {
        let before = self
            .unstarted
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        if before + bytes as u64 >= WRITEBACK_BYTES {
            self.unstarted.store(0, std::sync::atomic::Ordering::Relaxed);
            self.lock().writeback = true;
            self.changed.notify_all();
        }
    }

    fn run_syncer(&self) {
        let mut state = self.lock();
        loop {
            if state.requested > state.completed && state.failed.is_none() {
                let target = state.requested;
                drop(state);
                let started = std::time::Instant::now();
                let result = self.file.sync_data();
                metrics::histogram!(crate::metrics::STATE_SYNC_DURATION).record(started.elapsed().as_secs_f64());
                state = self.lock();
                match result {
                    Ok(()) => state.completed = target,
                    Err(error) => state.failed = Some((error.kind(), error.to_string())),
                }
                self.changed.notify_all();
                continue;
            }
            if state.writeback {
                state.writeback = false;
                drop(state);
                start_writeback(&self.file);
                state = self.lock();
                continue;
            }
            if state.closing {
                return;
            }
            state = self.wait(state);
        }
    }
}

/// What the state store sees of the syncs: which generation is asked for and which is
/// done, and a way to wait.
#[derive(Clone)]
pub struct SyncBehind(Arc<Shared>);

impl SyncBehind {
    /// The generation of the latest sync asked for.
    pub fn requested(&self) -> u64 {
        self.0.lock().requested
    }

    /// The latest generation whose sync has finished.
    pub fn completed(&self) -> u64 {
        self.0.lock().completed
    }

    /// Asks for a sync of everything written so far; returns its generation.
    pub fn request(&self) -> io::Result<u64> {
        self.0.request()
    }

    /// Waits until the sync of `generation` has finished.
    pub fn wait_for(&self, generation: u64) -> io::Result<()> {
        let mut state = self.0.lock();
        loop {
            if state.completed >= generation {
                return Ok(());
            }
            if let Some(error) = state.error() {
                return Err(error);
            }
            state = self.0.wait(state);
        }
    }
}

/// redb's file backend with syncs run behind the writer (see the module documentation).
pub struct SyncBehindFile {
    inner: FileBackend,
    shared: Arc<Shared>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for SyncBehindFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncBehindFile").field("inner", &self.inner).finish()
    }
}

impl SyncBehindFile {
    /// Wraps `file` (opened for reading and writing) and starts its syncer thread.
    pub fn new(file: File) -> Result<(SyncBehindFile, SyncBehind), DatabaseError> {
        let shared = Arc::new(Shared {
            file: file.try_clone()?,
            state: Mutex::new(SyncState::default()),
            changed: Condvar::new(),
            unstarted: Default::default(),
        });
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("concord-sync".into())
                .spawn(move || shared.run_syncer())?
        };
        let backend = SyncBehindFile {
            inner: FileBackend::new(file)?,
            shared: shared.clone(),
            syncer: Mutex::new(Some(syncer)),
        };
        Ok((backend, SyncBehind(shared)))
    }

    /// Finishes every sync asked for and stops the syncer thread.
    fn finish(&self) -> io::Result<()> {
        let Some(syncer) = self.syncer.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        let _ = syncer.join();
        match self.shared.lock().error() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn guarded<T>(&self, op: impl FnOnce() -> Result<T, io::Error>) -> Result<T, io::Error> {
        self.shared.begin_write()?;
        let result = op();
        self.shared.end_write();
        result
    }
}

impl Drop for SyncBehindFile {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl StorageBackend for SyncBehindFile {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.guarded(|| self.inner.set_len(len))
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.shared.request().map(|_| ())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.guarded(|| self.inner.write(offset, data))?;
        self.shared.written(data.len());
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        let finished = self.finish();
        let closed = self.inner.close();
        finished.and(closed)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (tempfile::TempDir, SyncBehindFile, SyncBehind) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("file"))
            .unwrap();
        let (backend, sync) = SyncBehindFile::new(file).unwrap();
        (dir, backend, sync)
    }

    #[test]
    fn a_write_after_a_sync_request_waits_for_that_sync() {
        let (_dir, backend, sync) = backend();
        let page = [7u8; 4096];
        for round in 0..20u64 {
            backend.write(round * 4096, &page).unwrap();
            backend.sync_data().unwrap();
            let asked = sync.requested();
            assert_eq!(asked, round + 1);
            // The next write may not reach the file before the sync asked for has run.
            backend.write((round + 100) * 4096, &page).unwrap();
            assert!(
                sync.completed() >= asked,
                "round {round}: wrote while a sync was unfinished"
            );
        }
        let mut back = [0u8; 4096];
        backend.read(4096 * 119, &mut back).unwrap();
        assert_eq!(back, page);
    }

    #[test]
    fn closing_finishes_every_requested_sync() {
        let (_dir, backend, sync) = backend();
        backend.write(0, &[1u8; 4096]).unwrap();
        backend.sync_data().unwrap();
        backend.sync_data().unwrap();
        backend.close().unwrap();
        assert_eq!(sync.completed(), 2);
        sync.wait_for(2).unwrap();
    }
}
