//! Every refusal the HTTP API gives, in one type: [`ApiError`] knows its status, its code,
//! its body (the problem response) and what it counts.
//!
//! The body is always JSON (`application/json`):
//!
//! ```json
//! {"error": "invalid_field", "message": "session_id is missing", "field": "session_id", "rule": "is missing"}
//! ```
//!
//! `error` is a stable code from a small set (also the metric's `outcome` label, or the
//! group it belongs to); `message` says what to change; `field` and `rule` come only with
//! `invalid_field`. A 401 carries `WWW-Authenticate: Bearer`; a refusal by a bound carries
//! `Retry-After`: 429 for one caller over its share (ingest rate, streams per identity),
//! 503 for the gateway as a whole (total streams, a dependency).
//!
//! Rendering puts an [`Outcome`] into the response's extensions; the router's outcome layer
//! ([`Outcome::record`]) counts every response once, by route and outcome, so that handlers
//! neither count nor build bodies themselves.

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::AuthError;
use crate::history::HistoryError;
use crate::ingest::Rejection;
use crate::limits::{Limited, NoSlot};
use crate::metrics::Metrics;
use crate::publish::PublishError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: u64 = 1;
/// Seconds a client over its stream cap should wait: until one of its streams has closed.
const STREAM_RETRY_AFTER_SECONDS: u64 = 10;
/// Seconds a client whose batch is larger than its burst should wait (a full bucket).
const BATCH_RETRY_AFTER_SECONDS: u64 = 60;

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401, 403 or 503 (the identity provider's keys cannot be read).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 400 naming the field and the rule it breaks.
    #[error("{field} {rule}")]
    InvalidField { field: String, rule: String },
    #[error("{0}")]
    MalformedJson(String),
    /// The body could not be read (a broken connection, a bad chunk).
    #[error("{0}")]
    UnreadableBody(String),
    #[error("send Content-Type: application/json (or text/plain, as navigator.sendBeacon does)")]
    UnsupportedMediaType,
    #[error("the body did not arrive within gateway.body_read_timeout: send it whole")]
    BodyTimeout,
    #[error("the body is larger than gateway.max_body_bytes: send smaller batches")]
    BodyTooLarge,
    #[error("a batch holds {count} heartbeats; at most {max} are allowed: split it")]
    BatchTooLarge { count: usize, max: usize },
    /// 429 (this identity's rate or burst) or 503 (the rate table is full).
    #[error("{}", rate_message(.0))]
    RateLimited(Limited),
    /// 429 (this identity's streams) or 503 (every stream slot).
    #[error("{}", stream_message(.0))]
    NoStreamSlot(NoSlot),
    #[error("no transition of region '{0}' has been seen: GET /v1/regions lists the regions")]
    UnknownRegion(String),
    #[error("no transition of facility '{0}' has been seen")]
    UnknownFacility(String),
    #[error("{method} is not allowed on {path}: use {allow}")]
    MethodNotAllowed {
        method: Method,
        path: &'static str,
        allow: &'static str,
    },
    /// A Redis read failed (the cause is logged, not shown).
    #[error("Redis is unreachable: the current state cannot be read now; retry later")]
    RedisDown(#[source] redis::RedisError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    History(#[from] HistoryError),
}

fn rate_message(e: &Limited) -> String {
    match e {
        Limited::Rate { .. } => format!("this identity sends heartbeats faster than gateway.ingest_per_minute allows; retry in {} s", rate_retry_after(e)),
        Limited::TooBig { cost, burst } => format!("this request holds {cost} heartbeats of one identity; at most {burst} (gateway.ingest_burst) pass at once: split it"),
        Limited::Full => "the gateway tracks as many identities as gateway.ingest_identities allows; retry later".into(),
    }
}

fn rate_retry_after(e: &Limited) -> u64 {
    match e {
        Limited::Rate { retry_after } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
        Limited::TooBig { .. } => BATCH_RETRY_AFTER_SECONDS,
        Limited::Full => RETRY_AFTER_SECONDS,
    }
}

fn stream_message(e: &NoSlot) -> String {
    match e {
        NoSlot::Identity { max } => format!(
            "this identity has {max} streams open (gateway.max_streams_per_identity): close one"
        ),
        NoSlot::Total { max } => {
            format!("the gateway has {max} streams open (gateway.max_streams); retry later")
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        match r {
            Rejection::Forbidden(e) => ApiError::Auth(e),
            Rejection::Invalid { field, rule } => ApiError::InvalidField { field, rule },
            Rejection::TooMany { count, max } => ApiError::BatchTooLarge { count, max },
            e @ Rejection::Malformed(_) => ApiError::MalformedJson(e.to_string()),
        }
    }
}

impl ApiError {
    pub fn invalid_field(field: &str, rule: impl Into<String>) -> ApiError {
        ApiError::InvalidField {
            field: field.to_string(),
            rule: rule.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(e) => e.status(),
            ApiError::InvalidField { .. }
            | ApiError::MalformedJson(_)
            | ApiError::UnreadableBody(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodyTooLarge | ApiError::BatchTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::RateLimited(Limited::Full) | ApiError::NoStreamSlot(NoSlot::Total { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RateLimited(_) | ApiError::NoStreamSlot(NoSlot::Identity { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::UnknownRegion(_) | ApiError::UnknownFacility(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::History(HistoryError::UnknownTimeZone(_)) => StatusCode::BAD_REQUEST,
            ApiError::RedisDown(_) | ApiError::Publish(_) | ApiError::History(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The `error` code of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Auth(e) => e.code(),
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::UnreadableBody(_) => "unreadable_body",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::BodyTooLarge => "too_large",
            ApiError::BatchTooLarge { .. } => "batch_too_large",
            ApiError::RateLimited(Limited::Full) => "rate_table_full",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::NoStreamSlot(NoSlot::Identity { .. }) => "too_many_streams",
            ApiError::NoStreamSlot(NoSlot::Total { .. }) => "streams_full",
            ApiError::UnknownRegion(_) => "unknown_region",
            ApiError::UnknownFacility(_) => "unknown_facility",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RedisDown(_) => "redis_unavailable",
            ApiError::Publish(e) => e.code(),
            ApiError::History(HistoryError::NoTables) => "no_history_tables",
            ApiError::History(HistoryError::Unavailable(_)) => "postgres_unavailable",
            ApiError::History(HistoryError::TooSlow(_)) => "history_too_slow",
            ApiError::History(HistoryError::UnknownTimeZone(_)) => "invalid_field",
        }
    }

    /// What the refusal counts: its outcome label (body errors as `invalid` and `too_large`,
    /// every rate refusal as `rate_limited`, so that the label set stays small) and the
    /// counter of its own kind, if any.
    fn outcome(&self) -> Outcome {
        let (outcome, detail) = match self {
            ApiError::InvalidField { .. }
            | ApiError::MalformedJson(_)
            | ApiError::UnreadableBody(_) => ("invalid", None),
            ApiError::BatchTooLarge { .. } => ("too_large", None),
            ApiError::RateLimited(e) => (
                "rate_limited",
                Some(Detail::RateLimited(match e {
                    Limited::Rate { .. } => "rate",
                    Limited::TooBig { .. } => "batch",
                    Limited::Full => "full",
                })),
            ),
            ApiError::NoStreamSlot(e) => (
                self.code(),
                Some(Detail::StreamRefused(match e {
                    NoSlot::Identity { .. } => "identity",
                    NoSlot::Total { .. } => "total",
                })),
            ),
            ApiError::RedisDown(_) => (self.code(), Some(Detail::RedisError)),
            _ => (self.code(), None),
        };
        Outcome { outcome, detail }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(e) => Some(rate_retry_after(e)),
            ApiError::NoStreamSlot(_) => Some(STREAM_RETRY_AFTER_SECONDS),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECONDS),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::RedisDown(e) = &self {
            tracing::warn!(error = %e, "Redis read failed");
        }
        let status = self.status();
        let message = self.to_string();
        let body = match &self {
            ApiError::InvalidField { field, rule } => {
                json!({"error": self.code(), "message": message, "field": field, "rule": rule})
            }
            _ => json!({"error": self.code(), "message": message}),
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let ApiError::MethodNotAllowed { allow, .. } = &self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response.extensions_mut().insert(self.outcome());
        response
    }
}

/// How a response is counted: `presence_gateway_requests_total{route, outcome}`, plus the
/// counter of its kind. Put into a response's extensions by [`ApiError`] and by the
/// handlers whose success has a name of its own (`accepted`, `opened`, `issued`); a
/// response without one counts as `ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    outcome: &'static str,
    detail: Option<Detail>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// `presence_gateway_rate_limited_total{reason}`.
    RateLimited(&'static str),
    /// `presence_gateway_streams_refused_total{cap}`.
    StreamRefused(&'static str),
    /// `presence_gateway_redis_errors_total`.
    RedisError,
}

impl Outcome {
    pub const OK: Outcome = Outcome::success("ok");

    /// A success with a name of its own.
    pub const fn success(outcome: &'static str) -> Outcome {
        Outcome {
            outcome,
            detail: None,
        }
    }

    pub fn label(&self) -> &'static str {
        self.outcome
    }

    /// Counts one response of `route`.
    pub fn record(&self, metrics: &Metrics, route: &str) {
        metrics
            .requests
            .with_label_values(&[route, self.outcome])
            .inc();
        match self.detail {
            Some(Detail::RateLimited(reason)) => {
                metrics.rate_limited.with_label_values(&[reason]).inc()
            }
            Some(Detail::StreamRefused(cap)) => {
                metrics.streams_refused.with_label_values(&[cap]).inc()
            }
            Some(Detail::RedisError) => metrics.redis_errors.inc(),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn body(r: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_invalid_field_names_the_field_and_the_rule() {
        let r = ApiError::invalid_field("to", "must be after from").into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            r.extensions().get::<Outcome>().map(Outcome::label),
            Some("invalid")
        );
        assert_eq!(
            body(r).await,
            json!({"error": "invalid_field", "message": "to must be after from", "field": "to", "rule": "must be after from"})
        );
    }

    #[tokio::test]
    async fn refusals_by_a_bound_say_when_to_retry() {
        let cases = [
            (
                ApiError::RateLimited(Limited::Rate {
                    retry_after: Duration::from_millis(2500),
                }),
                429,
                "3",
            ),
            (
                ApiError::RateLimited(Limited::TooBig { cost: 9, burst: 5 }),
                429,
                "60",
            ),
            (ApiError::RateLimited(Limited::Full), 503, "1"),
            (
                ApiError::NoStreamSlot(NoSlot::Identity { max: 2 }),
                429,
                "10",
            ),
            (ApiError::NoStreamSlot(NoSlot::Total { max: 9 }), 503, "10"),
            (ApiError::Publish(PublishError::QueueFull), 503, "1"),
            (ApiError::History(HistoryError::NoTables), 503, "1"),
        ];
        for (e, status, retry) in cases {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[header::RETRY_AFTER], retry);
        }
    }

    #[tokio::test]
    async fn a_401_asks_for_a_bearer_token_and_a_403_does_not() {
        let r = ApiError::from(AuthError::Expired).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(body(r).await["error"], "token_expired");
        let r = ApiError::from(AuthError::RegionNotGranted("x".into())).into_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    }

    #[test]
    fn refusals_count_their_own_kind() {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry);
        ApiError::RateLimited(Limited::Full)
            .outcome()
            .record(&metrics, "heartbeats");
        ApiError::NoStreamSlot(NoSlot::Total { max: 1 })
            .outcome()
            .record(&metrics, "stream");
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["heartbeats", "rate_limited"])
                .get(),
            1
        );
        assert_eq!(metrics.rate_limited.with_label_values(&["full"]).get(), 1);
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["stream", "streams_full"])
                .get(),
            1
        );
        assert_eq!(
            metrics.streams_refused.with_label_values(&["total"]).get(),
            1
        );
    }
}
