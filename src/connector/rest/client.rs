//! One HTTP client per REST system, shared by every link and the sink of the system:
//! the connection pool (rustls), authentication, the request budget (a token bucket),
//! timeouts, bounded body reads, rate-limit header reading and request metrics.
//!
//! Protocol facts relied on:
//! - `Retry-After` is delta-seconds or an HTTP date (RFC 9110 §10.2.3). It pauses the
//!   whole system's budget, not only the request that got it: the limit is per system.
//! - `X-RateLimit-Remaining` / `X-RateLimit-Limit` are de-facto headers (GitHub,
//!   Zendesk, many more); Salesforce reports `Sforce-Limit-Info: api-usage=<used>/<limit>`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};

use super::config::{RateLimitHeaders, RestSystemConfig};
use super::error::RestError;
use crate::config::{AuthConfig, RateLimit, SystemConfig};
use crate::metrics as m;

/// A system's HTTP client. Cheap to clone; clones share the pool and the budget.
#[derive(Clone)]
pub struct RestClient {
    inner: Arc<Inner>,
}

struct Inner {
    system: String,
    http: reqwest::Client,
    /// `base_url` without a trailing `/`; paths start with `/`.
    base: String,
    /// Scheme, host and port of `base`: the only origin credentials are sent to.
    origin: reqwest::Url,
    auth: Auth,
    bucket: Option<TokenBucket>,
    max_body_bytes: u64,
    rate_headers: RateLimitHeaders,
}

/// How requests are authenticated. Resolved once when the client is built.
///
/// The seam for OAuth 2.0: a variant holding the token endpoint and a cached access
/// token; [`Auth::apply`] is async and is the one place a request is authenticated,
/// so a token refresh (and a retry after a 401 with a fresh token) fits there.
enum Auth {
    None,
    Header { name: HeaderName, value: SecretString },
    Query { name: String, value: SecretString },
    Bearer(SecretString),
    Basic { username: String, password: SecretString },
}

impl Auth {
    fn resolve(auth: Option<&AuthConfig>, base_dir: &std::path::Path) -> Result<Auth, RestError> {
        let secret = |what: &'static str, s: &crate::config::SecretRef| {
            s.resolve(base_dir).map_err(|source| RestError::Secret { what, source })
        };
        Ok(match auth {
            None => Auth::None,
            Some(AuthConfig::ApiKey { key, header, query }) => {
                let value = secret("api key", key)?;
                match (header, query) {
                    (_, Some(query)) => Auth::Query {
                        name: query.clone(),
                        value,
                    },
                    (header, None) => Auth::Header {
                        name: HeaderName::from_bytes(header.as_deref().unwrap_or("X-Api-Key").as_bytes())
                            .map_err(|_| RestError::Config("auth.header is not a valid header name".into()))?,
                        value,
                    },
                }
            }
            Some(AuthConfig::Bearer { token }) => Auth::Bearer(secret("bearer token", token)?),
            Some(AuthConfig::Basic { username, password }) => Auth::Basic {
                username: username.clone(),
                password: secret("password", password)?,
            },
        })
    }

    async fn apply(&self, request: reqwest::RequestBuilder) -> Result<reqwest::RequestBuilder, RestError> {
        Ok(match self {
            Auth::None => request,
            Auth::Header { name, value } => {
                let mut value = HeaderValue::from_str(value.expose_secret())
                    .map_err(|_| RestError::Config("the api key is not a valid header value".into()))?;
                value.set_sensitive(true);
                request.header(name.clone(), value)
            }
            Auth::Query { name, value } => request.query(&[(name.as_str(), value.expose_secret())]),
            Auth::Bearer(token) => request.bearer_auth(token.expose_secret()),
            Auth::Basic { username, password } => request.basic_auth(username, Some(password.expose_secret())),
        })
    }
}

/// The request budget of one system: GCRA (virtual scheduling), which is a token
/// bucket of `burst` tokens refilled at `per_second`. A caller takes a slot under a
/// short lock only when the slot is due at the moment it asks; otherwise it sleeps until
/// the slot and asks again. Slots are never reserved ahead: a caller the timer wakes
/// late would then send right before the next one, and the two would land closer than
/// the budget allows (a system that counts per calendar second sees one request too
/// many). So in any window of `w` seconds at most `burst + per_second * w` requests
/// start, measured on the clock at which they really start.
struct TokenBucket {
    /// Seconds between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of the schedule a burst may run: `(burst - 1) * interval`.
    tolerance: Duration,
    /// Theoretical arrival time of the next request.
    tat: Mutex<Instant>,
}

impl TokenBucket {
    fn new(rate: &RateLimit) -> Option<TokenBucket> {
        if !(rate.per_second.is_finite() && rate.per_second > 0.0) {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / rate.per_second);
        Some(TokenBucket {
            interval,
            tolerance: interval * rate.burst.saturating_sub(1),
            tat: Mutex::new(Instant::now()),
        })
    }

    /// Waits for a slot and takes it.
    async fn acquire(&self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a slot if one is due at `now`; otherwise says how long until the next one.
    fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut tat = self.tat.lock().expect("token bucket lock is never poisoned");
        let at = (*tat).max(now);
        let due = at.checked_sub(self.tolerance).unwrap_or(now);
        if due > now {
            return Err(due - now);
        }
        *tat = at + self.interval;
        Ok(())
    }

    /// The system asked for a pause: nothing is sent before `until`, and the burst
    /// allowance is spent.
    fn pause_until(&self, until: Instant) {
        let mut tat = self.tat.lock().expect("token bucket lock is never poisoned");
        *tat = (*tat).max(until + self.tolerance);
    }
}

/// An answer with its body read (within the limit).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// The body as JSON; a body that is not JSON is a permanent error whose reason
    /// says what it was instead (an HTML page, empty, other), never its content.
    pub fn json(&self, what: &'static str) -> Result<serde_json::Value, RestError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let trimmed = self.body.iter().find(|b| !b.is_ascii_whitespace());
            let detail = match (trimmed, e.classify()) {
                (None, _) => "empty body".to_string(),
                (Some(b'<'), _) => "an html or xml page".to_string(),
                (_, serde_json::error::Category::Eof) => "json ends early".to_string(),
                _ => match self
                    .headers
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                {
                    Some(ct) => format!("content type {}", ct.split(';').next().unwrap_or("").trim()),
                    None => "no content type".to_string(),
                },
            };
            RestError::NotJson { what, detail }
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl RestClient {
    /// Builds the client of `system`: resolves its secrets now (a missing secret is
    /// fatal at open), sets the timeout on every request.
    pub fn new(
        name: &str,
        system: &SystemConfig,
        config: &RestSystemConfig,
        base_dir: &std::path::Path,
    ) -> Result<RestClient, RestError> {
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| RestError::Config(format!("header {k:?} is not a valid header name")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| RestError::Config(format!("header {k:?} has a value that is not valid")))?;
            headers.insert(name, value);
        }
        headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .connect_timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("concord/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| RestError::Client)?;
        let base = config.base_url.trim_end_matches('/').to_string();
        let origin = Url::parse(&base).map_err(|_| RestError::Config("base_url is not a valid url".into()))?;
        Ok(RestClient {
            inner: Arc::new(Inner {
                system: name.to_string(),
                http,
                base,
                origin,
                auth: Auth::resolve(system.auth.as_ref(), base_dir)?,
                bucket: system.rate_limit.as_ref().and_then(TokenBucket::new),
                max_body_bytes: config.max_body_bytes,
                rate_headers: config.rate_limit_headers.clone(),
            }),
        })
    }

    pub fn system(&self) -> &str {
        &self.inner.system
    }

    /// `base_url` + `path` (a path starting with `/`).
    pub fn url(&self, path: &str) -> Result<Url, RestError> {
        Url::parse(&format!("{}{}", self.inner.base, path)).map_err(|_| RestError::Url {
            what: "path",
            detail: "base_url and path do not form a url".into(),
        })
    }

    /// A URL the system handed out (a next-page link): absolute, or a path on the
    /// system's origin. Credentials are never sent to another origin.
    pub fn follow(&self, link: &str, what: &'static str) -> Result<Url, RestError> {
        let url = self.inner.origin.join(link).map_err(|_| RestError::Url {
            what,
            detail: "link is not a url".into(),
        })?;
        if url.origin() != self.inner.origin.origin() {
            return Err(RestError::Url {
                what,
                detail: "link points to another origin".into(),
            });
        }
        Ok(url)
    }

    /// Sends one request within the budget and reads the answer. 429 and 503 (which
    /// pause the budget for `Retry-After`), 401 and 403 are errors; every other status
    /// is returned for the caller to judge.
    pub async fn send(
        &self,
        what: &'static str,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
        headers: &[(HeaderName, String)],
    ) -> Result<Response, RestError> {
        let inner = &self.inner;
        if let Some(bucket) = &inner.bucket {
            bucket.acquire().await;
        }
        let mut request = inner.http.request(method.clone(), url);
        for (name, value) in headers {
            request = request.header(name.clone(), value.as_str());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let request = inner.auth.apply(request).await?;
        let started = Instant::now();
        let result = self.exchange(what, request).await;
        let class = match &result {
            Ok(r) => status_class(r.status),
            Err(RestError::Status { status, .. })
            | Err(RestError::RateLimited { status, .. })
            | Err(RestError::Unauthorized { status, .. }) => {
                status_class(StatusCode::from_u16(*status).unwrap_or(StatusCode::OK))
            }
            Err(_) => "error",
        };
        metrics::counter!(m::HTTP_REQUESTS, m::LABEL_SYSTEM => inner.system.clone(),
            m::LABEL_METHOD => method_label(&method), m::LABEL_CLASS => class)
        .increment(1);
        metrics::histogram!(m::HTTP_REQUEST_DURATION, m::LABEL_SYSTEM => inner.system.clone())
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn exchange(&self, what: &'static str, request: reqwest::RequestBuilder) -> Result<Response, RestError> {
        let inner = &self.inner;
        let mut response = request.send().await.map_err(|e| transport(what, &e))?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        self.note_rate_headers(&headers);
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            if let (Some(bucket), Some(after)) = (&inner.bucket, retry_after) {
                bucket.pause_until(Instant::now() + after);
            }
            return Err(RestError::RateLimited {
                what,
                status: status.as_u16(),
                retry_after,
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RestError::Unauthorized {
                what,
                status: status.as_u16(),
            });
        }
        let max = inner.max_body_bytes;
        if response.content_length().is_some_and(|n| n > max) {
            return Err(RestError::BodyTooLarge { what, max });
        }
        let mut body = BytesMut::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > max {
                        return Err(RestError::BodyTooLarge { what, max });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(RestError::Timeout { what }),
                Err(_) => return Err(RestError::Truncated { what }),
            }
        }
        Ok(Response {
            status,
            headers,
            body: body.freeze(),
        })
    }

    /// Turns the rate-limit headers into the headroom gauge (remaining / limit).
    fn note_rate_headers(&self, headers: &HeaderMap) {
        let h = &self.inner.rate_headers;
        let get = |name: &Option<String>| {
            name.as_deref()
                .and_then(|n| headers.get(n))
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let headroom = match (get(&h.remaining), get(&h.limit)) {
            (Some(remaining), Some(limit)) => match (remaining.parse::<f64>(), limit.parse::<f64>()) {
                (Ok(r), Ok(l)) if l > 0.0 => Some(r / l),
                _ => None,
            },
            _ => None,
        }
        .or_else(|| get(&h.usage).and_then(parse_usage));
        if let Some(headroom) = headroom {
            metrics::gauge!(m::RATE_LIMIT_HEADROOM, m::LABEL_SYSTEM => self.inner.system.clone())
                .set(headroom.clamp(0.0, 1.0));
        }
    }
}

fn transport(what: &'static str, e: &reqwest::Error) -> RestError {
    if e.is_timeout() {
        RestError::Timeout { what }
    } else if e.is_connect() {
        RestError::Connect { what }
    } else if e.is_body() || e.is_decode() {
        RestError::Truncated { what }
    } else {
        RestError::Request { what }
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// `Retry-After`: delta-seconds or an HTTP date; capped at an hour so a broken header
/// cannot park a system for days.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(CAP));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(CAP.as_secs_f64())));
        }
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at.timestamp_millis() - crate::model::now_ms();
    Some(Duration::from_millis(ms.max(0) as u64).min(CAP))
}

/// `api-usage=<used>/<limit>` (possibly among other comma-separated items) → headroom.
fn parse_usage(value: &str) -> Option<f64> {
    let usage = value
        .split(',')
        .map(str::trim)
        .find_map(|item| item.strip_prefix("api-usage="))?;
    let (used, limit) = usage.split_once('/')?;
    let used: f64 = used.trim().parse().ok()?;
    let limit: f64 = limit.trim().parse().ok()?;
    (limit > 0.0).then(|| (limit - used) / limit)
}

/// Percent-encodes a path segment (`{id}`, `{key}`): everything but RFC 3986
/// unreserved characters.
pub fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn usage_header() {
        assert_eq!(parse_usage("api-usage=25/100"), Some(0.75));
        assert_eq!(parse_usage("per-app-api-usage=1/2, api-usage=0/50"), Some(1.0));
        assert_eq!(parse_usage("api-usage=1/0"), None);
        assert_eq!(parse_usage("nonsense"), None);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("003ABC"), "003ABC");
        assert_eq!(encode_segment("a b/c@d.e"), "a%20b%2Fc%40d.e");
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let bucket = TokenBucket::new(&RateLimit {
            per_second: 10.0,
            burst: 3,
        })
        .expect("valid rate");
        let now = Instant::now();
        let ms = |r: Result<(), Duration>| r.err().map_or(0, |w| w.as_millis());
        let taken: Vec<u128> = (0..4).map(|_| ms(bucket.try_take(now))).collect();
        assert_eq!(taken, [0, 0, 0, 100], "a burst of three, then one slot per 100 ms");
        // A refused caller took nothing: asking again gives the same wait.
        assert_eq!(ms(bucket.try_take(now)), 100);
        // A caller that wakes late takes the slot then, and the next slot is counted
        // from when it really went, not from when it was due.
        let single = TokenBucket::new(&RateLimit {
            per_second: 10.0,
            burst: 1,
        })
        .expect("valid rate");
        let start = Instant::now();
        assert_eq!(ms(single.try_take(start)), 0);
        assert_eq!(ms(single.try_take(start)), 100);
        let late = start + Duration::from_millis(150);
        assert_eq!(ms(single.try_take(late)), 0);
        assert_eq!(ms(single.try_take(late)), 100);
        // After a pause, nothing is sent before it ends, and the burst is spent.
        bucket.pause_until(now + Duration::from_secs(5));
        let later = now + Duration::from_secs(1);
        assert_eq!(ms(bucket.try_take(later)), 4000);
        let at_end = now + Duration::from_secs(5);
        assert_eq!(ms(bucket.try_take(at_end)), 0);
        assert_eq!(ms(bucket.try_take(at_end)), 100);
    }
}
