//! Extractors for the admin API that answer bad input with our JSON errors instead of
//! axum's plain-text rejections, and the caller identity every audited action records.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body any admin endpoint accepts. No endpoint takes a body today;
/// the limit keeps a client from making the server buffer an arbitrary upload.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Who is calling, as recorded in the audit log.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The name of the token the request presented, or [`super::ANONYMOUS`] when no
    /// tokens are configured.
    pub who: String,
    /// The peer address, or `unknown` when the server was not started with connect info.
    pub from: String,
}

/// The authenticated principal, put in the request's extensions by the token check.
#[derive(Debug, Clone)]
pub struct Principal(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let from = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.to_string())
            .unwrap_or_else(|| "unknown".to_string());
        // Every audited route is behind the token check, which always sets a principal;
        // without one the request did not pass it and must not be served.
        let Some(Principal(who)) = parts.extensions.get::<Principal>().cloned() else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required",
            ));
        };
        Ok(Caller { who, from })
    }
}

/// `Query<T>` whose rejection is a 400 JSON error naming the offending parameter.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_error(&rejection)),
        }
    }
}

fn query_error(rejection: &QueryRejection) -> ApiError {
    // The source is serde's message with the parameter's name in front
    // (`limit: invalid digit found in string`); it describes the request, not data.
    match std::error::Error::source(rejection) {
        Some(detail) => ApiError::bad_request(format!("invalid query string: {detail}")),
        None => ApiError::bad_request("invalid query string"),
    }
}

/// `Path<T>` whose rejection is a 400 JSON error. Handlers take path parameters as
/// strings and parse them themselves, so the only rejection left is a segment that
/// does not decode to UTF-8.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_error(&rejection)),
        }
    }
}

fn path_error(rejection: &PathRejection) -> ApiError {
    if rejection.status().is_server_error() {
        // A handler asked for parameters its route does not have: a bug, not bad input.
        return ApiError::internal("path parameters do not fit the route", rejection);
    }
    ApiError::bad_request("invalid path: a segment is not valid percent-encoded utf-8")
}

/// The body of an endpoint that takes none: read (so the connection stays clean) and
/// discarded, refused with 413 when it is larger than [`MAX_BODY_BYTES`].
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A declared length over the limit is refused before reading anything.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        match Bytes::from_request(req, state).await {
            Ok(_) => Ok(NoBody),
            Err(rejection) => Err(body_error(&rejection)),
        }
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

fn body_error(rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        ApiError::bad_request("request body cannot be read")
    }
}
