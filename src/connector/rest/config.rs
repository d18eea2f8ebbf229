//! Settings of a `rest` system: where the API is, how each object is listed, paged,
//! filtered by an updated-since cursor, written, versioned and checked for deletes.
//!
//! Authentication and the request budget are not here: they are the system's
//! `auth` and `rate_limit` settings, shared with every connector type.
//!
//! A Salesforce-style CRM (SOQL query with the cursor inside, `nextRecordsUrl`
//! pagination, a tombstone endpoint for deletes, ETag concurrency):
//!
//! ```toml
//! [systems.crm]
//! type = "rest"
//! base_url = "http://127.0.0.1:8081"
//! auth = { method = "bearer", token = { file = "secrets/crm-token" } }
//! rate_limit = { per_second = 20, burst = 20 }
//! timeout_ms = 10000
//! max_concurrency = 4
//! headers = { "Sforce-Query-Options" = "batchSize=2000" }
//! rate_limit_headers = { remaining = "X-RateLimit-Remaining", limit = "X-RateLimit-Limit", reset = "X-RateLimit-Reset", usage = "Sforce-Limit-Info" }
//!
//! [systems.crm.objects.Contact]
//! list = { path = "/services/data/v60.0/query" }
//! records = "/records"
//! ignore_fields = ["attributes"]
//! pagination = { style = "next_url", pointer = "/nextRecordsUrl" }
//! cursor = { field = "LastModifiedDate", param = "q", format = "rfc3339", lookback_secs = 5, template = "SELECT Id, FirstName, LastName, Email, Phone, Title, LastModifiedDate FROM Contact WHERE LastModifiedDate >= {cursor} ORDER BY LastModifiedDate, Id" }
//! write = { create_path = "/services/data/v60.0/sobjects/Contact", item_path = "/services/data/v60.0/sobjects/Contact/{id}", update_method = "patch", created_id = "/id", upsert = { path = "/services/data/v60.0/sobjects/Contact/Email/{key}", field = "Email" } }
//! concurrency = { mode = "etag", fetch_when_unknown = true }
//! deletes = { mode = "tombstone", path = "/services/data/v60.0/sobjects/Contact/deleted/", records = "/deletedRecords", id = "/id", time = "/deletedDate", start_param = "start", end_param = "end", interval_secs = 60 }
//! ```
//!
//! An LMS with a plain list endpoint (top-level array, `Link` header pagination,
//! integer ids, soft deletes shown by `deleted_at`):
//!
//! ```toml
//! [systems.lms]
//! type = "rest"
//! base_url = "http://127.0.0.1:8082"
//! auth = { method = "api_key", header = "X-Api-Key", key = { file = "secrets/lms-key" } }
//! rate_limit = { per_second = 20, burst = 20 }
//!
//! [systems.lms.objects.learners]
//! list = { path = "/api/v1/learners", query = { per_page = "100", include_deleted = "true" } }
//! records = ""
//! pagination = { style = "link_header" }
//! cursor = { field = "updated_at", param = "updated_since", format = "rfc3339_millis", lookback_secs = 5 }
//! write = { create_path = "/api/v1/learners", item_path = "/api/v1/learners/{id}", update_method = "patch", created_id = "/id", upsert = { path = "/api/v1/learners/by_email/{key}", field = "email" } }
//! concurrency = { mode = "etag", fetch_when_unknown = true }
//! deletes = { mode = "flag", field = "deleted_at" }
//! ```
//!
//! The link's `object` names the entry of `objects` it uses, and its `id_field` the
//! record field that holds the id (`Id`, `id`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Timeout of one request, by default: long enough for a large page of a slow SaaS
/// API, short enough that a hung connection is noticed within a poll or two.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Largest response body read, by default. A page of 2000 CRM records is a few MB;
/// a body larger than this is an error rather than a risk to the daemon's memory.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 << 20;
/// Writes in flight at once toward one system, by default: enough to hide latency,
/// few enough to stay polite to an API that counts concurrent requests.
pub const DEFAULT_MAX_CONCURRENCY: usize = 4;
/// Look-back window, by default: records committed a little after their modification
/// time (late commits, clock skew between API nodes) are still read.
pub const DEFAULT_LOOKBACK_SECS: u64 = 5;
/// Interval of tombstone polls and full id scans, by default.
pub const DEFAULT_DELETE_INTERVAL_SECS: u64 = 300;
/// Where the id of a created record is found, by default: `{"id": ...}`.
pub const DEFAULT_CREATED_ID: &str = "/id";
/// Header that carries a record's version, by default.
pub const DEFAULT_ETAG_HEADER: &str = "ETag";
/// Page size parameter value, by default, for page and offset pagination.
pub const DEFAULT_PAGE_SIZE: u64 = 100;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestSystemConfig {
    /// Scheme, host and optional path prefix (`https://example.my.salesforce.com`).
    /// Paths of the objects are appended to it.
    pub base_url: String,
    /// Timeout of every request, connect to last body byte, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest response body read; a larger one is an error, never read whole.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Writes in flight at once. Writes of one record always keep their order.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Fixed headers sent with every request (not secrets: use `auth` for those).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Names of the headers that report the rate budget; read into the headroom gauge.
    #[serde(default)]
    pub rate_limit_headers: RateLimitHeaders,
    /// Objects by the name the links use as `object`.
    #[serde(default)]
    pub objects: BTreeMap<String, RestObjectConfig>,
}

/// Headers a system reports its request budget in. Either `remaining` with `limit`, or
/// `usage` (`api-usage=<used>/<limit>`, Salesforce's `Sforce-Limit-Info`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitHeaders {
    /// Requests left in the window.
    #[serde(default = "default_remaining_header")]
    pub remaining: Option<String>,
    /// Requests allowed in the window.
    #[serde(default = "default_limit_header")]
    pub limit: Option<String>,
    /// When the window resets (epoch seconds).
    #[serde(default = "default_reset_header")]
    pub reset: Option<String>,
    /// A header with `api-usage=<used>/<limit>`.
    #[serde(default)]
    pub usage: Option<String>,
}

impl Default for RateLimitHeaders {
    fn default() -> Self {
        Self {
            remaining: default_remaining_header(),
            limit: default_limit_header(),
            reset: default_reset_header(),
            usage: None,
        }
    }
}

/// How one object (a link's `object`) is read and written.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestObjectConfig {
    /// The list endpoint polled for changes.
    pub list: ListEndpoint,
    /// JSON pointer (RFC 6901) to the record array in a list response; `""` when the
    /// body itself is the array.
    #[serde(default)]
    pub records: String,
    /// JSON pointer, inside one record, to the object holding its fields
    /// (HubSpot's `/properties`); the id and cursor fields are looked up at the record's
    /// top level first, then there. Absent: the record is its fields.
    #[serde(default)]
    pub fields: Option<String>,
    /// Record fields dropped on the way in (`attributes` of Salesforce records).
    #[serde(default)]
    pub ignore_fields: Vec<String>,
    /// How the list continues past its first page.
    #[serde(default)]
    pub pagination: Pagination,
    /// The updated-since cursor. Absent: every poll reads the whole list.
    #[serde(default)]
    pub cursor: Option<CursorConfig>,
    /// Write endpoints; absent means the object is read-only.
    #[serde(default)]
    pub write: Option<WriteEndpoints>,
    /// Optimistic concurrency on updates.
    #[serde(default)]
    pub concurrency: Concurrency,
    /// How deletes in the system are noticed.
    #[serde(default)]
    pub deletes: DeleteDetection,
}

/// A GET endpoint with fixed query parameters.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListEndpoint {
    /// Path appended to `base_url`.
    pub path: String,
    /// Query parameters sent on the first page (and every page, for page and offset
    /// pagination).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
}

/// How a list continues past its first page.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "style", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pagination {
    /// One page holds everything.
    #[default]
    None,
    /// `?page=N&per_page=S`, numbered from `first`; ends at a short page.
    Page {
        #[serde(default = "default_page_param")]
        param: String,
        #[serde(default = "default_per_page_param")]
        size_param: String,
        #[serde(default = "default_page_size")]
        size: u64,
        #[serde(default = "default_first_page")]
        first: u64,
    },
    /// `?offset=N&limit=S`; ends at a short page.
    Offset {
        #[serde(default = "default_offset_param")]
        param: String,
        #[serde(default = "default_limit_param")]
        limit_param: String,
        #[serde(default = "default_page_size")]
        limit: u64,
    },
    /// A token in the body (JSON pointer) sent back as a query parameter; ends when
    /// the token is absent, null or empty.
    Token { pointer: String, param: String },
    /// A URL (absolute, or a path on `base_url`) in the body to GET next, as is;
    /// ends when absent or null (Salesforce `nextRecordsUrl`).
    NextUrl { pointer: String },
    /// The `Link: <url>; rel="next"` header (RFC 8288).
    LinkHeader,
}

/// The updated-since cursor.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CursorConfig {
    /// Record field holding the modification time; also the record's source time.
    pub field: String,
    /// Query parameter the cursor is sent in.
    pub param: String,
    /// The parameter's value, with `{cursor}` replaced by the formatted cursor (a
    /// filter expression such as SOQL). Default: the cursor alone.
    #[serde(default = "default_template")]
    pub template: String,
    /// How the cursor is written in the request; record values are read in any of the
    /// formats.
    #[serde(default)]
    pub format: CursorFormat,
    /// The request asks from this many seconds before the cursor, so records committed
    /// late are read; records already yielded are not yielded again.
    #[serde(default = "default_lookback_secs")]
    pub lookback_secs: u64,
    /// Cursor of the first poll, in `format` (default: the Unix epoch, i.e. everything).
    #[serde(default)]
    pub start: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CursorFormat {
    /// `2026-11-27T18:09:45Z`, whole seconds (rounded down).
    #[default]
    Rfc3339,
    /// `2026-11-27T18:09:45.123Z`.
    Rfc3339Millis,
    /// Milliseconds since the Unix epoch.
    EpochMs,
    /// Seconds since the Unix epoch.
    EpochS,
}

/// Write endpoints of an object. Paths are appended to `base_url`; `{id}` is the
/// record's id in the system, `{key}` the upsert key's value, both percent-encoded.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteEndpoints {
    /// `POST` here creates a record. Absent: creates go through `upsert` only.
    #[serde(default)]
    pub create_path: Option<String>,
    /// One record: `GET` reads it, `PATCH`/`PUT` updates it, `DELETE` deletes it.
    pub item_path: String,
    /// Update verb.
    #[serde(default)]
    pub update_method: UpdateMethod,
    /// Where the id of a created record is: a JSON pointer into the response body
    /// (`/id`), or `location` for the last path segment of the `Location` header.
    #[serde(default = "default_created_id")]
    pub created_id: String,
    /// Create by external id instead of POST, so a repeated create is an update.
    #[serde(default)]
    pub upsert: Option<UpsertEndpoint>,
    /// Header carrying the record's version in responses.
    #[serde(default = "default_etag_header")]
    pub etag_header: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateMethod {
    /// Partial update (merge patch): only the written fields are sent.
    #[default]
    Patch,
    /// Full replacement.
    Put,
}

/// `PATCH <path>` with `{key}` = the value of `field` in the write; 201 created, 200
/// updated.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpsertEndpoint {
    pub path: String,
    /// System field whose value is the key; it is left out of the body.
    pub field: String,
}

/// Optimistic concurrency on updates. A write that finds the record changed since it
/// was last read (412) is never forced: the record is read again and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Concurrency {
    /// Last write wins in the system.
    #[default]
    None,
    /// `If-Match: <etag>` with the ETag last seen; without one, the record is read
    /// first when `fetch_when_unknown` is set.
    Etag {
        #[serde(default)]
        fetch_when_unknown: bool,
    },
    /// The record carries a version in `field`; updates send `If-Match` with it, and the
    /// version read with the record is what later writes expect.
    VersionField { field: String },
}

/// How deletes in the system are noticed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeleteDetection {
    /// Deletes are not captured.
    #[default]
    None,
    /// A listed record whose `field` equals `value` (or, without `value`, is anything
    /// but null or false) is deleted.
    Flag {
        field: String,
        #[serde(default)]
        value: Option<serde_json::Value>,
    },
    /// An endpoint listing deleted ids over a time window (Salesforce `deleted/`).
    Tombstone {
        path: String,
        #[serde(default)]
        query: BTreeMap<String, String>,
        /// Pointer to the array of deleted records.
        records: String,
        /// Pointer, inside one entry, to the deleted id.
        id: String,
        /// Pointer, inside one entry, to the deletion time.
        #[serde(default)]
        time: Option<String>,
        /// Query parameter of the window start.
        start_param: String,
        /// Query parameter of the window end; absent means up to now.
        #[serde(default)]
        end_param: Option<String>,
        #[serde(default = "default_delete_interval_secs")]
        interval_secs: u64,
    },
    /// Every `interval_secs`, the whole list (without the cursor) is read; ids seen
    /// before and missing now are deleted.
    FullScan {
        #[serde(default = "default_delete_interval_secs")]
        interval_secs: u64,
    },
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
fn default_max_concurrency() -> usize {
    DEFAULT_MAX_CONCURRENCY
}
fn default_remaining_header() -> Option<String> {
    Some("X-RateLimit-Remaining".into())
}
fn default_limit_header() -> Option<String> {
    Some("X-RateLimit-Limit".into())
}
fn default_reset_header() -> Option<String> {
    Some("X-RateLimit-Reset".into())
}
fn default_page_param() -> String {
    "page".into()
}
fn default_per_page_param() -> String {
    "per_page".into()
}
fn default_offset_param() -> String {
    "offset".into()
}
fn default_limit_param() -> String {
    "limit".into()
}
fn default_page_size() -> u64 {
    DEFAULT_PAGE_SIZE
}
fn default_first_page() -> u64 {
    1
}
fn default_template() -> String {
    "{cursor}".into()
}
fn default_lookback_secs() -> u64 {
    DEFAULT_LOOKBACK_SECS
}
fn default_delete_interval_secs() -> u64 {
    DEFAULT_DELETE_INTERVAL_SECS
}
fn default_created_id() -> String {
    DEFAULT_CREATED_ID.into()
}
fn default_etag_header() -> String {
    DEFAULT_ETAG_HEADER.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two examples of the module doc, parsed as whole systems.
    #[test]
    fn module_doc_examples_parse() {
        let doc = include_str!("config.rs");
        let mut examples = Vec::new();
        let mut current: Option<String> = None;
        for line in doc.lines() {
            let line = line.trim_start();
            match (line, &mut current) {
                ("//! ```toml", None) => current = Some(String::new()),
                ("//! ```", Some(text)) => {
                    examples.push(std::mem::take(text));
                    current = None;
                }
                (l, Some(text)) => {
                    text.push_str(l.strip_prefix("//!").unwrap_or(l).strip_prefix(' ').unwrap_or(""));
                    text.push('\n');
                }
                _ => {}
            }
        }
        assert_eq!(examples.len(), 2);
        for example in examples {
            let doc: toml::Table = toml::from_str(&example).expect("example is toml");
            let systems = doc["systems"].as_table().expect("systems table");
            for (_, system) in systems {
                let system: crate::config::SystemConfig = system.clone().try_into().expect("example is a valid system");
                let crate::config::ConnectorConfig::Rest(rest) = system.connector else {
                    panic!("example is a rest system");
                };
                assert_eq!(rest.objects.len(), 1);
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<RestSystemConfig>("base_url = \"http://x\"\ntimeout_secs = 1").is_err());
        assert!(
            toml::from_str::<RestSystemConfig>(
                "base_url = \"http://x\"\n[objects.a]\nlist = { path = \"/a\" }\npagination = { style = \"page\", pages = 1 }"
            )
            .is_err()
        );
    }

    #[test]
    fn defaults() {
        let c: RestSystemConfig =
            toml::from_str("base_url = \"http://x\"\n[objects.a]\nlist = { path = \"/a\" }").expect("parses");
        assert_eq!(c.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(c.max_concurrency, DEFAULT_MAX_CONCURRENCY);
        let o = &c.objects["a"];
        assert_eq!(o.pagination, Pagination::None);
        assert_eq!(o.concurrency, Concurrency::None);
        assert_eq!(o.deletes, DeleteDetection::None);
        assert_eq!(o.records, "");
    }
}
