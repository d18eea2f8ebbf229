//! The `rest` connector: a JSON REST API polled for changes with an updated-since
//! cursor, and written to with create, update, upsert and delete requests.
//!
//! - [`config`]: the settings, with the CRM and LMS examples.
//! - [`client`]: one HTTP client per system (rustls), auth, the shared rate budget,
//!   timeouts, bounded body reads, rate-limit headers, request metrics.
//! - [`source`]: cursor polling with look-back and boundary dedupe, pagination, deletes.
//! - [`sink`]: writes with bounded concurrency and optimistic concurrency (412 → re-read).
//! - `record`: reading records out of JSON bodies; [`error`]: classification.

pub mod client;
mod config;
pub mod error;
mod record;
pub mod sink;
pub mod source;

pub use client::RestClient;
pub use config::{
    Concurrency, CursorConfig, CursorFormat, DEFAULT_CREATED_ID, DEFAULT_DELETE_INTERVAL_SECS, DEFAULT_ETAG_HEADER,
    DEFAULT_LOOKBACK_SECS, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY, DEFAULT_PAGE_SIZE, DEFAULT_TIMEOUT_MS,
    DeleteDetection, ListEndpoint, Pagination, RateLimitHeaders, RestObjectConfig, RestSystemConfig, UpdateMethod,
    UpsertEndpoint, WriteEndpoints,
};
pub use error::RestError;
pub use record::{format_time, parse_time_text};
pub use sink::{KIND_CONFLICT, Reread, RestSink};
pub use source::{RestCheckpoint, RestSource, SeenEntry};
