//! The `rest` connector: a JSON REST API polled for changes with an updated-since
//! cursor, and written to with create, update, upsert and delete requests.

mod config;

pub use config::{
    Concurrency, CursorConfig, CursorFormat, DEFAULT_CREATED_ID, DEFAULT_DELETE_INTERVAL_SECS, DEFAULT_ETAG_HEADER,
    DEFAULT_LOOKBACK_SECS, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY, DEFAULT_PAGE_SIZE, DEFAULT_TIMEOUT_MS,
    DeleteDetection, ListEndpoint, Pagination, RateLimitHeaders, RestObjectConfig, RestSystemConfig, UpdateMethod,
    UpsertEndpoint, WriteEndpoints,
};
