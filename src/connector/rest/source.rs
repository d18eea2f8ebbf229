//! The REST source: polls an object's list endpoint with an updated-since cursor.
//!
//! A poll is a walk over the list, asked from `cursor - lookback_secs`. The list must
//! be ordered by the cursor field, ascending (every incremental API offers this: SOQL
//! `ORDER BY LastModifiedDate`, `?sort=updated_at`). Records are yielded in batches;
//! each batch's checkpoint holds the cursor (the largest modification time yielded)
//! and the `(id, modification time, content hash)` of every record yielded within the
//! look-back window of the cursor, so a record read again by the overlapping next poll
//! is dropped instead of yielded twice, while a record committed late, with a time
//! inside the window, is still yielded. The hash matters when the system's times have
//! coarse precision (whole seconds): a second edit within the second of the first one
//! keeps the modification time but changes the content, and is yielded; a true repeat
//! (the overlap, or the echo of concord's own write) has the same hash and is dropped,
//! and one that slips through merges to a no-op against the shadow. Many records sharing one timestamp, across any
//! number of pages, are all yielded and the cursor still advances: the cursor is only
//! a lower bound of the next request, never a filter on what is yielded.
//!
//! Page boundaries that move during a walk (an API that evaluates its offset
//! pagination lazily, so a record modified mid-walk shifts the rest one place back)
//! cannot skip a record: after each page whose last record is newer than the request's
//! cursor, the walk asks again from that record's time (keyset pagination over the
//! cursor field), and follows the API's own next-page link only inside a run of records
//! that share one timestamp. A restart asks from 1 ms before the last time seen, which
//! is right whether the API filters with `>=` or `>`; the dedupe set drops the overlap.
//!
//! Deletes: a flag field on listed records; a tombstone endpoint polled every
//! `interval_secs` over the window since its last poll (minus the look-back); or a
//! full id scan every `interval_secs` that reports ids concord knows in the system and
//! the list no longer has. Repeated deletes are harmless: a delete of a record concord
//! no longer maps changes nothing.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::RestClient;
use super::config::{CursorFormat, DeleteDetection, Pagination, RestObjectConfig};
use super::error::RestError;
use super::record::{RecordReader, effective, format_time, parse_time};
use crate::config::LinkConfig;
use crate::connector::{Checkpoint, ConnectorError, SourceBatch};
use crate::model::{ChangeKind, SourceRecord, SourceReject, TimeMs, now_ms};

/// Layout version of [`RestCheckpoint`]. Version 1 held `[id, time]` boundary entries
/// without a content hash; they are still read (a hashless entry never matches, so
/// the record is yielded once more and merges to a no-op).
pub const CHECKPOINT_VERSION: u32 = 2;
/// Most boundary entries kept in a checkpoint. Past it the oldest are dropped: a record
/// yielded again merges to a no-op, so the cap trades a little repeated work for a
/// bounded checkpoint when a bulk update touched more records than this within the
/// look-back window.
const MAX_SEEN: usize = 50_000;
/// Pages one walk may take, so an API that hands out next links forever (a loop) ends
/// the poll instead of the daemon.
const MAX_PAGES_PER_WALK: u32 = 100_000;

/// The source's position, as the engine stores it (JSON):
///
/// ```json
/// {"v": 1, "cursor_ms": 1795889385000,
///  "seen": [["003000000000001AAA", 1795889385000, "9f2c4e1b07a3d5e8"]],
///  "tombstones_ms": 1795889380000}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestCheckpoint {
    pub v: u32,
    /// Largest modification time yielded; the next poll asks from it minus the
    /// look-back window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_ms: Option<TimeMs>,
    /// Records yielded with a modification time within the look-back window of the
    /// cursor, that time, and the hash of the content yielded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<SeenEntry>,
    /// End of the window of the last tombstone poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstones_ms: Option<TimeMs>,
}

/// One boundary entry of a [`RestCheckpoint`]: a record yielded near the cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SeenEntry {
    /// Id, modification time, and [`content_hash`] as 16 hex digits (a string, so no
    /// JSON reader rounds it).
    Hashed(String, TimeMs, String),
    /// A version 1 entry: id and modification time.
    Bare(String, TimeMs),
}

/// What the source remembers of a record it yielded near the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    mtime_ms: TimeMs,
    /// `None` for an entry read from a version 1 checkpoint.
    hash: Option<u64>,
}

impl Seen {
    /// Whether a record read with `mtime_ms` and `hash` was already yielded: it is
    /// older than what was yielded, or it is the same time and the same content.
    fn covers(&self, mtime_ms: TimeMs, hash: u64) -> bool {
        self.mtime_ms > mtime_ms || (self.mtime_ms == mtime_ms && self.hash == Some(hash))
    }
}

/// A stable 64-bit digest of what a record says: its kind, version and fields
/// (serde_json maps are ordered, so equal records serialise equally). Stable across
/// builds, since it is kept in checkpoints.
fn content_hash(record: &SourceRecord) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(match record.kind {
        ChangeKind::Upsert => b"u",
        ChangeKind::Delete => b"d",
    });
    if let Some(v) = &record.version {
        h.update(v.as_bytes());
    }
    h.update([0u8]);
    h.update(serde_json::to_vec(&record.fields).expect("a json map serialises"));
    let digest = h.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a sha-256 digest has 8 bytes"))
}

/// The walk in progress.
struct Walk {
    /// Cursor of the current request (`None` when the object has no cursor).
    request_ms: Option<TimeMs>,
    /// The next page to GET, if any.
    next: Option<Url>,
    pages: u32,
    /// Ids listed (full id scans only).
    ids: Option<HashSet<String>>,
}

/// Polls one object of a REST system; see the module doc.
pub struct RestSource {
    client: RestClient,
    object: RestObjectConfig,
    reader: RecordReader,
    entity: String,
    cursor_ms: Option<TimeMs>,
    seen: BTreeMap<String, Seen>,
    tombstones_ms: Option<TimeMs>,
    lookback_ms: TimeMs,
    walk: Option<Walk>,
    /// Read, not yet yielded.
    buffer: VecDeque<SourceRecord>,
    rejects: Vec<SourceReject>,
    /// A change walk already ran since the source last answered "nothing new".
    polled: bool,
    next_tombstones: Instant,
    next_scan: Instant,
    /// Ids concord holds for this system (full id scans only).
    known: Option<HashSet<String>>,
    /// Known ids when the running scan started.
    scan_known: Option<HashSet<String>>,
    /// Modification time of the oldest record read and not yet yielded.
    oldest_pending_ms: Option<TimeMs>,
}

impl RestSource {
    /// Opens the source of `link` (whose `object` names an entry of the system's
    /// `objects`), resumed from `checkpoint`. `known_ids` are the ids concord holds for
    /// the system; a full id scan compares the list with them.
    pub fn open(
        client: RestClient,
        objects: &BTreeMap<String, RestObjectConfig>,
        link: &LinkConfig,
        checkpoint: Option<&Checkpoint>,
        known_ids: impl FnOnce() -> HashSet<String>,
    ) -> Result<RestSource, ConnectorError> {
        let object = objects
            .get(&link.object)
            .ok_or_else(|| RestError::Config(format!("object {:?} is not configured", link.object)))?
            .clone();
        let checkpoint: RestCheckpoint = match checkpoint {
            None => RestCheckpoint::default(),
            Some(c) => serde_json::from_value(c.clone()).map_err(RestError::Checkpoint)?,
        };
        let lookback_ms = object.cursor.as_ref().map_or(0, |c| c.lookback_secs as TimeMs * 1000);
        let start_ms = object
            .cursor
            .as_ref()
            .and_then(|c| c.start.as_ref())
            .map(|s| {
                super::record::parse_time_text(s, object.cursor.as_ref().map(|c| c.format).unwrap_or_default())
                    .ok_or_else(|| RestError::Config("cursor.start is not a time".into()))
            })
            .transpose()?;
        let known = matches!(object.deletes, DeleteDetection::FullScan { .. }).then(known_ids);
        let now = Instant::now();
        Ok(RestSource {
            reader: RecordReader::new(&object, &link.id_field, link.version_field.as_deref()),
            client,
            entity: link.entity.clone(),
            cursor_ms: checkpoint.cursor_ms.or(start_ms.map(|s| s + lookback_ms)),
            seen: checkpoint
                .seen
                .into_iter()
                .map(|e| match e {
                    SeenEntry::Hashed(id, mtime_ms, hash) => (
                        id,
                        Seen {
                            mtime_ms,
                            hash: u64::from_str_radix(&hash, 16).ok(),
                        },
                    ),
                    SeenEntry::Bare(id, mtime_ms) => (id, Seen { mtime_ms, hash: None }),
                })
                .collect(),
            tombstones_ms: checkpoint.tombstones_ms,
            lookback_ms,
            walk: None,
            buffer: VecDeque::new(),
            rejects: Vec::new(),
            polled: false,
            next_tombstones: now,
            next_scan: now,
            known,
            scan_known: None,
            oldest_pending_ms: None,
            object,
        })
    }

    /// Up to `max` records (and the rejects read with them). `Ok(None)` once a walk,
    /// and any due tombstone poll or id scan, found nothing more.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<SourceBatch>, ConnectorError> {
        let max = max.max(1);
        loop {
            if !self.buffer.is_empty() || !self.rejects.is_empty() {
                return Ok(Some(self.take_batch(max)));
            }
            if self.walk.is_some() {
                self.step().await?;
                continue;
            }
            if !self.polled {
                self.polled = true;
                self.start_walk(false)?;
                continue;
            }
            if let Some(interval) = self.tombstone_interval() {
                if Instant::now() >= self.next_tombstones {
                    self.poll_tombstones().await?;
                    self.next_tombstones = Instant::now() + interval;
                    continue;
                }
            }
            if let DeleteDetection::FullScan { interval_secs } = self.object.deletes {
                if Instant::now() >= self.next_scan {
                    self.next_scan = Instant::now() + Duration::from_secs(interval_secs);
                    self.scan_known = self.known.clone();
                    self.start_walk(true)?;
                    continue;
                }
            }
            self.polled = false;
            self.oldest_pending_ms = None;
            return Ok(None);
        }
    }

    /// Nothing to acknowledge upstream: the position lives in the checkpoint.
    pub async fn committed(&mut self, _checkpoint: &Checkpoint) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Age of the oldest record read and not yet yielded; 0 when caught up.
    pub fn lag_seconds(&self) -> f64 {
        match self.oldest_pending_ms {
            Some(t) => (now_ms() - t).max(0) as f64 / 1000.0,
            None => 0.0,
        }
    }

    fn take_batch(&mut self, max: usize) -> SourceBatch {
        let n = max.min(self.buffer.len());
        let records: Vec<SourceRecord> = self.buffer.drain(..n).collect();
        for record in &records {
            if let Some(known) = &mut self.known {
                match record.kind {
                    ChangeKind::Upsert => known.insert(record.local_id.clone()),
                    ChangeKind::Delete => known.remove(&record.local_id),
                };
            }
            if let (Some(t), true) = (record.source_time_ms, self.object.cursor.is_some()) {
                if record.kind == ChangeKind::Upsert || self.is_flag_delete() {
                    let seen = Seen {
                        mtime_ms: t,
                        hash: Some(content_hash(record)),
                    };
                    self.seen.insert(record.local_id.clone(), seen);
                    self.cursor_ms = Some(self.cursor_ms.map_or(t, |c| c.max(t)));
                }
            }
        }
        self.prune_seen();
        self.oldest_pending_ms = self.buffer.front().and_then(|r| r.source_time_ms);
        SourceBatch {
            records,
            rejects: std::mem::take(&mut self.rejects),
            checkpoint: self.checkpoint(),
        }
    }

    fn is_flag_delete(&self) -> bool {
        matches!(self.object.deletes, DeleteDetection::Flag { .. })
    }

    fn prune_seen(&mut self) {
        if let Some(cursor) = self.cursor_ms {
            let floor = cursor - self.lookback_ms - 1000;
            self.seen.retain(|_, s| s.mtime_ms >= floor);
        }
        if self.seen.len() > MAX_SEEN {
            let mut times: Vec<TimeMs> = self.seen.values().map(|s| s.mtime_ms).collect();
            times.sort_unstable();
            let cut = times[self.seen.len() - MAX_SEEN];
            self.seen.retain(|_, s| s.mtime_ms >= cut);
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        let mut seen: Vec<(&String, &Seen)> = self.seen.iter().collect();
        seen.sort_by(|a, b| a.1.mtime_ms.cmp(&b.1.mtime_ms).then_with(|| a.0.cmp(b.0)));
        let seen = seen
            .into_iter()
            .map(|(id, s)| match s.hash {
                Some(h) => SeenEntry::Hashed(id.clone(), s.mtime_ms, format!("{h:016x}")),
                None => SeenEntry::Bare(id.clone(), s.mtime_ms),
            })
            .collect();
        serde_json::to_value(RestCheckpoint {
            v: CHECKPOINT_VERSION,
            cursor_ms: self.cursor_ms,
            seen,
            tombstones_ms: self.tombstones_ms,
        })
        .expect("a rest checkpoint serialises")
    }

    fn format(&self) -> CursorFormat {
        self.object.cursor.as_ref().map(|c| c.format).unwrap_or_default()
    }

    fn start_walk(&mut self, scan: bool) -> Result<(), RestError> {
        // A scan asks from the epoch rather than leaving the cursor out, so an API whose
        // cursor lives in a filter expression (SOQL) still gets a complete query.
        let request_ms = match (&self.object.cursor, scan) {
            (Some(_), false) => Some((self.cursor_ms.unwrap_or(0) - self.lookback_ms).max(0)),
            (Some(_), true) => Some(0),
            (None, _) => None,
        };
        let next = Some(self.first_page(request_ms, 0)?);
        self.walk = Some(Walk {
            request_ms,
            next,
            pages: 0,
            ids: scan.then(HashSet::new),
        });
        Ok(())
    }

    /// The first page of a request from `cursor_ms`; `skip` records already listed
    /// (page and offset pagination continue from there).
    fn first_page(&self, cursor_ms: Option<TimeMs>, skip: u64) -> Result<Url, RestError> {
        let mut url = self.client.url(&self.object.list.path)?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &self.object.list.query {
                q.append_pair(k, v);
            }
            if let (Some(cursor), Some(ms)) = (&self.object.cursor, cursor_ms) {
                let value = cursor.template.replace("{cursor}", &format_time(ms, cursor.format));
                q.append_pair(&cursor.param, &value);
            }
            match &self.object.pagination {
                Pagination::Page {
                    param,
                    size_param,
                    size,
                    first,
                } => {
                    q.append_pair(param, &(first + skip / size).to_string());
                    q.append_pair(size_param, &size.to_string());
                }
                Pagination::Offset {
                    param,
                    limit_param,
                    limit,
                } => {
                    q.append_pair(param, &skip.to_string());
                    q.append_pair(limit_param, &limit.to_string());
                }
                _ => {}
            }
        }
        Ok(url)
    }

    /// GETs the walk's next page, buffers its new records, and decides what follows.
    async fn step(&mut self) -> Result<(), RestError> {
        let Some(walk) = self.walk.as_mut() else {
            return Ok(());
        };
        let Some(url) = walk.next.take() else {
            self.finish_walk();
            return Ok(());
        };
        walk.pages += 1;
        let page_no = walk.pages;
        let response = self.client.send("list", Method::GET, url.clone(), None, &[]).await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                // The page is asked again on the next call.
                if let Some(walk) = self.walk.as_mut() {
                    walk.next = Some(url);
                    walk.pages -= 1;
                }
                return Err(e);
            }
        };
        if !response.status.is_success() {
            if let Some(walk) = self.walk.as_mut() {
                walk.next = Some(url);
                walk.pages -= 1;
            }
            return Err(RestError::Status {
                what: "list",
                status: response.status.as_u16(),
            });
        }
        let parsed = response.json("list").and_then(|mut body| {
            RecordReader::list(&body, &self.object.records, "list")?;
            // Taken out, not cloned; the pagination pointers look elsewhere in the body.
            let items = match body.pointer_mut(&self.object.records).map(Value::take) {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            };
            Ok((body, items))
        });
        let (body, items) = match parsed {
            Ok(v) => v,
            Err(e) => {
                if let Some(walk) = self.walk.as_mut() {
                    walk.next = Some(url);
                    walk.pages -= 1;
                }
                return Err(e);
            }
        };

        let scanning = self.walk.as_ref().is_some_and(|w| w.ids.is_some());
        let mut last_ms = None;
        let count = items.len() as u64;
        for (i, item) in items.into_iter().enumerate() {
            match self
                .reader
                .read(item, || format!("{} list page {page_no}, item {}", self.entity, i + 1))
            {
                Ok(read) => {
                    if read.mtime_ms.is_some() {
                        last_ms = read.mtime_ms;
                    }
                    if scanning {
                        if read.record.kind == ChangeKind::Upsert {
                            if let Some(ids) = self.walk.as_mut().and_then(|w| w.ids.as_mut()) {
                                ids.insert(read.record.local_id);
                            }
                        }
                        continue;
                    }
                    let already = match read.mtime_ms {
                        Some(t) => self
                            .seen
                            .get(&read.record.local_id)
                            .is_some_and(|s| s.covers(t, content_hash(&read.record))),
                        None => false,
                    };
                    // The buffer is empty here (it is drained before the next page is
                    // asked), so `seen` holds every record this walk yielded.
                    if !already {
                        if self.oldest_pending_ms.is_none() {
                            self.oldest_pending_ms = read.mtime_ms;
                        }
                        self.buffer.push_back(read.record);
                    }
                }
                Err(reject) if !scanning => self.rejects.push(reject),
                Err(_) => {}
            }
        }

        let next = self.next_page(&url, &response, &body, count)?;
        let format = self.format();
        let walk = self.walk.as_mut().expect("the walk is in progress");
        walk.next = None;
        if walk.pages >= MAX_PAGES_PER_WALK {
            tracing::warn!(system = %self.client.system(), entity = %self.entity, "list walk ended at the page limit");
        } else if next.is_some() {
            let restart = match (walk.request_ms, last_ms) {
                (Some(request), Some(last)) if walk.ids.is_none() => {
                    let from = (last - 1).max(0);
                    (effective(from, format) > effective(request, format)).then_some(from)
                }
                _ => None,
            };
            match restart {
                Some(from) => {
                    walk.request_ms = Some(from);
                    let first = self.first_page(Some(from), 0)?;
                    if let Some(walk) = self.walk.as_mut() {
                        walk.next = Some(first);
                    }
                }
                None => walk.next = next,
            }
        }
        if self.walk.as_ref().is_some_and(|w| w.next.is_none()) {
            self.finish_walk();
        }
        Ok(())
    }

    /// The page after `url` by the object's pagination style, if the response says
    /// there is one.
    fn next_page(
        &self,
        url: &Url,
        response: &super::client::Response,
        body: &Value,
        count: u64,
    ) -> Result<Option<Url>, RestError> {
        Ok(match &self.object.pagination {
            Pagination::None => None,
            Pagination::Page { param, size, .. } => {
                if count < *size || count == 0 {
                    return Ok(None);
                }
                Some(replace_param(url, param, |v| {
                    v.parse::<u64>().unwrap_or(0).saturating_add(1).to_string()
                }))
            }
            Pagination::Offset { param, limit, .. } => {
                if count < *limit || count == 0 {
                    return Ok(None);
                }
                Some(replace_param(url, param, |v| {
                    v.parse::<u64>().unwrap_or(0).saturating_add(count).to_string()
                }))
            }
            Pagination::Token { pointer, param } => match body.pointer(pointer) {
                Some(Value::String(t)) if !t.is_empty() => Some(replace_param(url, param, |_| t.clone())),
                Some(Value::Number(n)) => Some(replace_param(url, param, |_| n.to_string())),
                _ => None,
            },
            Pagination::NextUrl { pointer } => match body.pointer(pointer) {
                Some(Value::String(link)) if !link.is_empty() => Some(self.client.follow(link, "list")?),
                _ => None,
            },
            Pagination::LinkHeader => {
                let links: Vec<&str> = response
                    .headers
                    .get_all(reqwest::header::LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                match links.iter().find_map(|h| next_link(h)) {
                    Some(link) => Some(self.client.follow(&link, "list")?),
                    None => None,
                }
            }
        })
    }

    fn finish_walk(&mut self) {
        let Some(walk) = self.walk.take() else {
            return;
        };
        if let Some(listed) = walk.ids {
            let known = self.scan_known.take().unwrap_or_default();
            let now = now_ms();
            let mut gone: Vec<&String> = known.difference(&listed).collect();
            gone.sort();
            for id in gone {
                self.buffer.push_back(SourceRecord {
                    local_id: id.clone(),
                    kind: ChangeKind::Delete,
                    fields: Default::default(),
                    version: None,
                    source_time_ms: Some(now),
                });
            }
        }
    }

    fn tombstone_interval(&self) -> Option<Duration> {
        match &self.object.deletes {
            DeleteDetection::Tombstone { interval_secs, .. } => Some(Duration::from_secs(*interval_secs)),
            _ => None,
        }
    }

    async fn poll_tombstones(&mut self) -> Result<(), RestError> {
        let DeleteDetection::Tombstone {
            path,
            query,
            records,
            id,
            time,
            start_param,
            end_param,
            ..
        } = self.object.deletes.clone()
        else {
            return Ok(());
        };
        let format = self.format();
        let now = now_ms();
        // The first poll looks back one window from now: deletes before concord
        // started are of records it never captured.
        let start = (self.tombstones_ms.unwrap_or(now) - self.lookback_ms.max(1000)).max(0);
        let mut url = self.client.url(&path)?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &query {
                q.append_pair(k, v);
            }
            q.append_pair(&start_param, &format_time(start, format));
            if let Some(end) = &end_param {
                q.append_pair(end, &format_time(now, format));
            }
        }
        let response = self.client.send("tombstones", Method::GET, url, None, &[]).await?;
        if !response.status.is_success() {
            return Err(RestError::Status {
                what: "tombstones",
                status: response.status.as_u16(),
            });
        }
        let body = response.json("tombstones")?;
        let items = RecordReader::list(&body, &records, "tombstones")?;
        for (i, item) in items.iter().enumerate() {
            let local_id = match item.pointer(&id) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    self.rejects.push(SourceReject {
                        location: format!("{} tombstones, item {}", self.entity, i + 1),
                        reason: format!("tombstone has no id at {id:?}"),
                        raw: String::new(),
                    });
                    continue;
                }
            };
            let at = time
                .as_ref()
                .and_then(|p| item.pointer(p))
                .and_then(|v| parse_time(v, format));
            self.buffer.push_back(SourceRecord {
                local_id,
                kind: ChangeKind::Delete,
                fields: Default::default(),
                version: None,
                source_time_ms: at.or(Some(now)),
            });
        }
        self.tombstones_ms = Some(now);
        Ok(())
    }
}

/// `url` with query parameter `name` set to `f(old value)` (added when missing).
fn replace_param(url: &Url, name: &str, f: impl FnOnce(&str) -> String) -> Url {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    match pairs.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = f(v),
        None => pairs.push((name.to_string(), f(""))),
    }
    let mut next = url.clone();
    next.query_pairs_mut().clear().extend_pairs(pairs);
    next
}

/// The `rel="next"` target of a `Link` header value (RFC 8288), if any.
pub fn next_link(header: &str) -> Option<String> {
    for part in header.split(',') {
        let mut pieces = part.split(';');
        let target = pieces.next()?.trim();
        let target = target.strip_prefix('<').and_then(|t| t.strip_suffix('>'));
        let is_next = pieces.any(|p| {
            let p = p.trim();
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
        });
        if is_next {
            if let Some(t) = target {
                return Some(t.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next() {
        assert_eq!(
            next_link(r#"<http://h/a?page=2>; rel="next", <http://h/a?page=9>; rel="last""#).as_deref(),
            Some("http://h/a?page=2")
        );
        assert_eq!(next_link(r#"<http://h/a?page=1>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn boundary_entries_keep_their_hash_and_old_entries_still_read() {
        let v1 = r#"{"v": 1, "cursor_ms": 5000, "seen": [["a", 5000]]}"#;
        let old: RestCheckpoint = serde_json::from_str(v1).expect("a version 1 checkpoint reads");
        assert_eq!(old.seen, vec![SeenEntry::Bare("a".into(), 5000)]);
        let v2 = r#"{"v": 2, "cursor_ms": 5000, "seen": [["a", 5000, "00000000000000ff"]]}"#;
        let new: RestCheckpoint = serde_json::from_str(v2).expect("a version 2 checkpoint reads");
        assert_eq!(
            new.seen,
            vec![SeenEntry::Hashed("a".into(), 5000, "00000000000000ff".into())]
        );
    }

    #[test]
    fn a_same_time_record_is_new_only_when_its_content_differs() {
        let record = |name: &str| SourceRecord {
            local_id: "a".into(),
            kind: ChangeKind::Upsert,
            fields: serde_json::json!({"FirstName": name, "LastModifiedDate": "2026-01-01T00:00:00Z"})
                .as_object()
                .expect("an object")
                .clone(),
            version: None,
            source_time_ms: Some(5000),
        };
        let ours = content_hash(&record("Ada"));
        assert_eq!(
            ours,
            content_hash(&record("Ada")),
            "the hash is a function of the content"
        );
        let seen = Seen {
            mtime_ms: 5000,
            hash: Some(ours),
        };
        assert!(seen.covers(5000, ours), "the echo of what was yielded is dropped");
        assert!(
            !seen.covers(5000, content_hash(&record("Grace"))),
            "an edit within the same second is new"
        );
        assert!(
            seen.covers(4000, content_hash(&record("Grace"))),
            "an older version is dropped"
        );
        assert!(!seen.covers(6000, ours), "a later time is new");
        let hashless = Seen {
            mtime_ms: 5000,
            hash: None,
        };
        assert!(
            !hashless.covers(5000, ours),
            "an entry without a hash is yielded once more"
        );
    }

    #[test]
    fn params_are_replaced() {
        let url = Url::parse("http://h/a?page=2&per_page=10").expect("url");
        let next = replace_param(&url, "page", |v| (v.parse::<u64>().unwrap_or(0) + 1).to_string());
        assert_eq!(next.as_str(), "http://h/a?page=3&per_page=10");
        let next = replace_param(&url, "token", |_| "x y".into());
        assert_eq!(next.as_str(), "http://h/a?page=2&per_page=10&token=x+y");
    }
}
