//! The one error type every admin handler returns, so that every failure reaches the
//! client as JSON `{"error": "<message>"}` with a fitting status, and no internal detail
//! (paths, storage errors, record values) ever leaves the process: server-side failures
//! are logged with their whole chain and answered with a generic message.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ReplayError;
use crate::state::StateError;

/// The message sent for every server-side failure.
const INTERNAL_MESSAGE: &str = "internal error";

/// An error answered to an admin API client.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Lowercase, no final period, safe to send: no record value, no internals.
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// A server-side failure: logs `error` with its source chain and returns the
    /// generic 500 that is safe to send.
    pub fn internal(what: &'static str, error: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %ErrorChain(error), "admin api: {what}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_MESSAGE)
    }
}

impl From<StateError> for ApiError {
    fn from(error: StateError) -> Self {
        ApiError::internal("state store failure", &error)
    }
}

impl From<ReplayError> for ApiError {
    fn from(error: ReplayError) -> Self {
        match &error {
            ReplayError::NotFound(_) => ApiError::not_found(error.to_string()),
            ReplayError::NotReplayable(_) => ApiError::new(StatusCode::CONFLICT, error.to_string()),
            ReplayError::NoLink { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, error.to_string()),
            ReplayError::State(_) => ApiError::internal("dead letter replay failed", &error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: &self.message })).into_response()
    }
}

/// Displays an error followed by each of its sources, separated by `: `.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_lists_every_source() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(ErrorChain(&error).to_string(), "outer: inner");
    }

    #[test]
    fn replay_errors_map_to_statuses_without_internals() {
        let cases = [
            (ReplayError::NotFound(7), StatusCode::NOT_FOUND),
            (ReplayError::NotReplayable(7), StatusCode::CONFLICT),
            (
                ReplayError::NoLink {
                    system: "crm".into(),
                    entity: "person".into(),
                },
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                ReplayError::State(StateError::SchemaVersion { found: 9, expected: 1 }),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, status) in cases {
            let api = ApiError::from(error);
            assert_eq!(api.status, status);
        }
        let api = ApiError::from(ReplayError::State(StateError::SchemaVersion { found: 9, expected: 1 }));
        assert_eq!(api.message, INTERNAL_MESSAGE);
    }
}
