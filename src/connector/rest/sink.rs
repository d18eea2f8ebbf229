//! The REST sink: creates (POST, or upsert by external id), updates (PATCH or PUT) and
//! deletes records, up to `max_concurrency` requests at once, writes of one record in
//! order.
//!
//! Idempotence: an update sets the same values again; a delete of a record that is
//! already gone (404, 410) succeeds; a create repeated after a crash is an update when
//! the object has an upsert endpoint (by external id), and a duplicate otherwise, which
//! is why an upsert endpoint is preferred where the system has one.
//!
//! Optimistic concurrency: updates carry `If-Match` with the version concord last saw
//! (an ETag, or the record's version field). A 412 (or a 409 under a version field)
//! means the record changed in the system since: the write is not forced. The sink
//! reads the record again and hands the fresh copy back (see
//! [`RestSink::take_rereads`]); the applier merges it as a change from this system,
//! under field authority, and plans the write again from the merge's result.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use reqwest::header::HeaderName;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value};

use super::client::{Response, RestClient, encode_segment};
use super::config::{Concurrency, RestObjectConfig, UpdateMethod, WriteEndpoints};
use super::error::RestError;
use super::record::RecordReader;
use crate::config::LinkConfig;
use crate::connector::ConnectorError;
use crate::model::{ChangeKind, SourceRecord, Write, WriteAck, WriteOp};

/// Error kind of a write refused because the record changed in the system; the
/// record read again is in [`RestSink::take_rereads`].
pub const KIND_CONFLICT: &str = "conflict";

/// A record read again after a refused write, to be merged before the write is
/// planned again.
#[derive(Debug, Clone)]
pub struct Reread {
    /// Outbox sequence of the write that was refused.
    pub seq: u64,
    pub entity: String,
    /// What the refused write was: a create that ran into a row already there, or an
    /// update whose precondition failed.
    pub refused: WriteOp,
    pub record: SourceRecord,
}

/// One object as the sink writes it.
struct ObjectWriter {
    write: WriteEndpoints,
    concurrency: Concurrency,
    reader: RecordReader,
}

/// Writes to one REST system; see the module doc.
pub struct RestSink {
    client: RestClient,
    /// By object name (a link's `object`).
    objects: BTreeMap<String, ObjectWriter>,
    max_concurrency: usize,
    rereads: Vec<Reread>,
}

impl RestSink {
    /// A sink for the objects the system's writing links use.
    pub fn open<'a>(
        client: RestClient,
        objects: &BTreeMap<String, RestObjectConfig>,
        links: impl IntoIterator<Item = &'a LinkConfig>,
        max_concurrency: usize,
    ) -> Result<RestSink, ConnectorError> {
        let mut writers = BTreeMap::new();
        for link in links {
            let object = objects
                .get(&link.object)
                .ok_or_else(|| RestError::Config(format!("object {:?} is not configured", link.object)))?;
            let write = object
                .write
                .clone()
                .ok_or_else(|| RestError::Config(format!("object {:?} has no write endpoints", link.object)))?;
            writers.insert(
                link.object.clone(),
                ObjectWriter {
                    write,
                    concurrency: object.concurrency.clone(),
                    reader: RecordReader::new(object, &link.id_field, link.version_field.as_deref()),
                },
            );
        }
        Ok(RestSink {
            client,
            objects: writers,
            max_concurrency: max_concurrency.max(1),
            rereads: Vec::new(),
        })
    }

    /// Applies the writes, one result per write in order.
    pub async fn apply(&mut self, writes: Vec<Write>) -> Vec<Result<WriteAck, ConnectorError>> {
        let n = writes.len();
        // Writes of one record run one after the other, in order; records run side by
        // side.
        let mut chains: BTreeMap<(String, crate::model::GlobalId), Vec<(usize, Write)>> = BTreeMap::new();
        for (i, w) in writes.into_iter().enumerate() {
            chains.entry((w.entity.clone(), w.global_id)).or_default().push((i, w));
        }
        let this = &*self;
        let done: Vec<Vec<Outcome>> = futures_util::stream::iter(chains.into_values().map(|chain| async move {
            let mut out = Vec::with_capacity(chain.len());
            for (i, w) in chain {
                let (result, reread) = this.apply_one(&w).await;
                out.push((i, result, reread));
            }
            out
        }))
        .buffer_unordered(self.max_concurrency)
        .collect()
        .await;
        let mut results: Vec<Option<Result<WriteAck, ConnectorError>>> = (0..n).map(|_| None).collect();
        for (i, result, reread) in done.into_iter().flatten() {
            results[i] = Some(result);
            if let Some(reread) = reread {
                self.rereads.push(reread);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every write has a result"))
            .collect()
    }

    /// Records read again after refused writes since the last call.
    pub fn take_rereads(&mut self) -> Vec<Reread> {
        std::mem::take(&mut self.rereads)
    }

    async fn apply_one(&self, w: &Write) -> (Result<WriteAck, ConnectorError>, Option<Reread>) {
        let Some(object) = self.objects.get(&w.object) else {
            return (
                Err(ConnectorError::permanent(
                    "config",
                    format!("object {:?} has no write endpoints", w.object),
                )),
                None,
            );
        };
        let result = match w.op {
            WriteOp::Create => self.create(object, w).await,
            WriteOp::Update => return self.update(object, w).await,
            WriteOp::Delete => self.delete(object, w).await,
        };
        (result.map_err(ConnectorError::from), None)
    }

    async fn create(&self, object: &ObjectWriter, w: &Write) -> Result<WriteAck, RestError> {
        let key = object
            .write
            .upsert
            .as_ref()
            .and_then(|u| w.fields.get(&u.field).and_then(key_text).map(|k| (u, k)));
        let (response, what) = match (key, &object.write.create_path) {
            (Some((upsert, key)), _) => {
                let mut body = w.fields.clone();
                body.remove(&upsert.field);
                let url = self.client.url(&upsert.path.replace("{key}", &encode_segment(&key)))?;
                let r = self
                    .client
                    .send("upsert", Method::PATCH, url, Some(&Value::Object(body)), &[])
                    .await?;
                (r, "upsert")
            }
            (None, Some(path)) => {
                let url = self.client.url(path)?;
                let r = self
                    .client
                    .send("create", Method::POST, url, Some(&Value::Object(w.fields.clone())), &[])
                    .await?;
                (r, "create")
            }
            (None, None) => {
                return Err(RestError::Config(
                    "a create needs write.create_path, or the upsert field in the write".into(),
                ));
            }
        };
        expect_success(&response, what)?;
        let local_id = created_id(&response, &object.write.created_id, what)?;
        Ok(WriteAck {
            local_id,
            version: self.version_of(object, &response),
        })
    }

    async fn update(&self, object: &ObjectWriter, w: &Write) -> (Result<WriteAck, ConnectorError>, Option<Reread>) {
        let Some(id) = w.local_id.as_deref() else {
            return (
                Err(ConnectorError::permanent(
                    "missing_id",
                    "update without the system's id",
                )),
                None,
            );
        };
        let item = match self
            .client
            .url(&object.write.item_path.replace("{id}", &encode_segment(id)))
        {
            Ok(u) => u,
            Err(e) => return (Err(e.into()), None),
        };
        // An empty version is one concord knows to be stale (see `version_of`).
        let mut expected = w.expected_version.clone().filter(|v| !v.is_empty());
        if expected.is_none()
            && matches!(
                object.concurrency,
                Concurrency::Etag {
                    fetch_when_unknown: true
                }
            )
        {
            match self.read_item(object, item.clone(), w).await {
                Ok(Fetched::Found(_, etag)) => expected = etag,
                Ok(Fetched::Gone(record)) => {
                    return (Err(conflict()), Some(self.reread(w, record)));
                }
                Err(e) => return (Err(e.into()), None),
            }
        }
        let headers: Vec<(HeaderName, String)> = match (&object.concurrency, expected) {
            (Concurrency::None, _) | (_, None) => Vec::new(),
            (_, Some(v)) => vec![(reqwest::header::IF_MATCH, v)],
        };
        let method = match object.write.update_method {
            UpdateMethod::Patch => Method::PATCH,
            UpdateMethod::Put => Method::PUT,
        };
        let response = match self
            .client
            .send(
                "update",
                method,
                item.clone(),
                Some(&Value::Object(w.fields.clone())),
                &headers,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => return (Err(e.into()), None),
        };
        let refused = response.status == StatusCode::PRECONDITION_FAILED
            || (response.status == StatusCode::CONFLICT
                && matches!(object.concurrency, Concurrency::VersionField { .. }));
        if refused && !matches!(object.concurrency, Concurrency::None) {
            return match self.read_item(object, item, w).await {
                Ok(Fetched::Found(record, _)) | Ok(Fetched::Gone(record)) => {
                    (Err(conflict()), Some(self.reread(w, record)))
                }
                Err(e) => (Err(e.into()), None),
            };
        }
        if let Err(e) = expect_success(&response, "update") {
            return (Err(e.into()), None);
        }
        (
            Ok(WriteAck {
                local_id: id.to_string(),
                version: self.version_of(object, &response),
            }),
            None,
        )
    }

    async fn delete(&self, object: &ObjectWriter, w: &Write) -> Result<WriteAck, RestError> {
        let id = w
            .local_id
            .as_deref()
            .ok_or_else(|| RestError::Config("delete without the system's id".into()))?;
        let url = self
            .client
            .url(&object.write.item_path.replace("{id}", &encode_segment(id)))?;
        let response = self.client.send("delete", Method::DELETE, url, None, &[]).await?;
        // Already gone is what a delete wants.
        if !matches!(response.status, StatusCode::NOT_FOUND | StatusCode::GONE) {
            expect_success(&response, "delete")?;
        }
        Ok(WriteAck {
            local_id: id.to_string(),
            version: None,
        })
    }

    /// GETs one record: found (with its ETag), or gone (a delete record).
    async fn read_item(&self, object: &ObjectWriter, url: reqwest::Url, w: &Write) -> Result<Fetched, RestError> {
        let response = self.client.send("read", Method::GET, url, None, &[]).await?;
        let id = w.local_id.clone().unwrap_or_default();
        if matches!(response.status, StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Ok(Fetched::Gone(SourceRecord {
                local_id: id,
                kind: ChangeKind::Delete,
                fields: Map::new(),
                version: None,
                source_time_ms: None,
            }));
        }
        expect_success(&response, "read")?;
        let body = response.json("read")?;
        let read = object
            .reader
            .read(body, String::new)
            .map_err(|reject| RestError::Shape {
                what: "read",
                detail: reject.reason,
            })?;
        let mut record = read.record;
        let etag = response.header(&object.write.etag_header).map(str::to_string);
        if matches!(object.concurrency, Concurrency::Etag { .. }) {
            record.version = etag.clone();
        }
        Ok(Fetched::Found(record, etag))
    }

    fn reread(&self, w: &Write, record: SourceRecord) -> Reread {
        Reread {
            seq: w.seq,
            entity: w.entity.clone(),
            refused: w.op,
            record,
        }
    }

    /// The record's version after a write: the ETag, or the version field of the
    /// returned record.
    fn version_of(&self, object: &ObjectWriter, response: &Response) -> Option<String> {
        match &object.concurrency {
            // A successful write changed the record's ETag; without the new one in the
            // answer (Salesforce answers 204 bare), the one concord had is stale. An
            // empty version says so, and the next update reads the current one first.
            Concurrency::Etag { .. } => Some(
                response
                    .header(&object.write.etag_header)
                    .map(str::to_string)
                    .unwrap_or_default(),
            ),
            Concurrency::VersionField { field } => {
                let body: Value = serde_json::from_slice(&response.body).ok()?;
                match body.get(field)? {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }
            }
            Concurrency::None => None,
        }
    }
}

/// A write's index in the call, its result, and the record read again after a 412.
type Outcome = (usize, Result<WriteAck, ConnectorError>, Option<Reread>);

enum Fetched {
    Found(SourceRecord, Option<String>),
    Gone(SourceRecord),
}

fn conflict() -> ConnectorError {
    ConnectorError::transient(
        KIND_CONFLICT,
        "record changed in the system since it was read (precondition failed); read again to merge",
    )
}

fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn expect_success(response: &Response, what: &'static str) -> Result<(), RestError> {
    if response.status.is_success() {
        Ok(())
    } else {
        Err(RestError::Status {
            what,
            status: response.status.as_u16(),
        })
    }
}

/// The id of a created record: at a JSON pointer in the body, or the last path segment
/// of `Location`.
fn created_id(response: &Response, from: &str, what: &'static str) -> Result<String, RestError> {
    let from_location = || {
        response
            .header("location")
            .and_then(|l| l.split(['?', '#']).next())
            .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    if from == "location" {
        return from_location().ok_or_else(|| RestError::Shape {
            what,
            detail: "no id in the location header".into(),
        });
    }
    let body = response.json(what);
    let id = body.as_ref().ok().and_then(|b| b.pointer(from)).and_then(key_text);
    match (id, body) {
        (Some(id), _) => Ok(id),
        (None, Ok(_)) => from_location().ok_or_else(|| RestError::Shape {
            what,
            detail: format!("no id at {from:?} in the response"),
        }),
        (None, Err(e)) => from_location().ok_or(e),
    }
}
