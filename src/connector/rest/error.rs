//! What can go wrong talking to a REST API, and how the engine should treat it.
//!
//! Classification:
//! - 429 and 503 (with `Retry-After` honoured), other 5xx, timeouts, connection errors,
//!   a body broken off before its end: transient, retried with backoff.
//! - 401 and 403: fatal. The credentials are wrong or revoked; every request would
//!   fail the same way until an operator fixes them.
//! - Other 4xx, a body that is not JSON (an HTML error page from a proxy), JSON of the
//!   wrong shape, a record without an id, a body over `max_body_bytes`: permanent.
//!
//! Messages name statuses, content types, JSON pointers and field names, never a URL
//! (it may carry an API key in its query), a header value, a body or a record value.

use std::time::Duration;

use crate::config::secret::SecretError;
use crate::connector::{ConnectorError, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("{what}: http status {status}")]
    Status { what: &'static str, status: u16 },
    #[error("{what}: rate limited (http status {status})")]
    RateLimited {
        what: &'static str,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("{what}: credentials refused (http status {status})")]
    Unauthorized { what: &'static str, status: u16 },
    #[error("{what}: request timed out")]
    Timeout { what: &'static str },
    #[error("{what}: cannot connect")]
    Connect { what: &'static str },
    #[error("{what}: request failed")]
    Request { what: &'static str },
    #[error("{what}: response body broken off")]
    Truncated { what: &'static str },
    #[error("{what}: response body is over max_body_bytes {max}")]
    BodyTooLarge { what: &'static str, max: u64 },
    #[error("{what}: response is not json ({detail})")]
    NotJson { what: &'static str, detail: String },
    #[error("{what}: {detail}")]
    Shape { what: &'static str, detail: String },
    #[error("{what}: url is not usable ({detail})")]
    Url { what: &'static str, detail: String },
    #[error("cannot read the {what} secret")]
    Secret {
        what: &'static str,
        #[source]
        source: SecretError,
    },
    #[error("cannot build the http client")]
    Client,
    #[error("checkpoint is not a rest source checkpoint")]
    Checkpoint(#[source] serde_json::Error),
    #[error("{0}")]
    Config(String),
}

impl RestError {
    pub fn class(&self) -> ErrorClass {
        match self {
            RestError::Status { status, .. } if *status >= 500 || *status == 408 => ErrorClass::Transient,
            RestError::Status { .. } => ErrorClass::Permanent,
            RestError::RateLimited { .. }
            | RestError::Timeout { .. }
            | RestError::Connect { .. }
            | RestError::Request { .. }
            | RestError::Truncated { .. } => ErrorClass::Transient,
            RestError::Unauthorized { .. } => ErrorClass::Fatal,
            RestError::BodyTooLarge { .. } | RestError::NotJson { .. } | RestError::Shape { .. } => {
                ErrorClass::Permanent
            }
            RestError::Url { .. } => ErrorClass::Permanent,
            RestError::Secret { .. } | RestError::Client | RestError::Checkpoint(_) | RestError::Config(_) => {
                ErrorClass::Fatal
            }
        }
    }

    /// Bounded label for metrics and dead letters.
    pub fn kind(&self) -> &'static str {
        match self {
            RestError::Status { status, .. } if *status >= 500 => "http_5xx",
            RestError::Status { .. } => "http_4xx",
            RestError::RateLimited { .. } => "rate_limited",
            RestError::Unauthorized { .. } => "unauthorized",
            RestError::Timeout { .. } => "timeout",
            RestError::Connect { .. } => "connect",
            RestError::Request { .. } => "request",
            RestError::Truncated { .. } => "truncated",
            RestError::BodyTooLarge { .. } => "body_too_large",
            RestError::NotJson { .. } => "not_json",
            RestError::Shape { .. } => "bad_shape",
            RestError::Url { .. } => "url",
            RestError::Secret { .. } => "secret",
            RestError::Client => "client",
            RestError::Checkpoint(_) => "checkpoint",
            RestError::Config(_) => "config",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RestError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            RestError::Status { status, .. }
            | RestError::RateLimited { status, .. }
            | RestError::Unauthorized { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<RestError> for ConnectorError {
    fn from(error: RestError) -> Self {
        let reason = crate::connector::reason_chain(&error);
        ConnectorError {
            class: error.class(),
            kind: error.kind(),
            reason,
            retry_after: error.retry_after(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify() {
        let s = |status| RestError::Status { what: "list", status }.class();
        assert_eq!(s(500), ErrorClass::Transient);
        assert_eq!(s(502), ErrorClass::Transient);
        assert_eq!(s(400), ErrorClass::Permanent);
        assert_eq!(s(404), ErrorClass::Permanent);
        assert_eq!(
            RestError::Unauthorized {
                what: "list",
                status: 401
            }
            .class(),
            ErrorClass::Fatal
        );
        let limited = ConnectorError::from(RestError::RateLimited {
            what: "list",
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
        });
        assert_eq!(limited.class, ErrorClass::Transient);
        assert_eq!(limited.retry_after, Some(Duration::from_secs(3)));
    }
}
