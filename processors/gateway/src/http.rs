//! Routes and handlers. Each handler reads as the happy path: who is calling comes from an
//! extractor ([`crate::caller`]), every refusal is an [`ApiError`] that renders the problem
//! body and is counted by the router's outcome layer.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/heartbeats` | one heartbeat (object) or a batch (array); 202 after the broker's ack |
//! | `GET /v1/regions` | every region seen |
//! | `GET /v1/regions/{region}/facilities` | the region's facilities now (a snapshot) |
//! | `POST /v1/stream-tickets` | a short-lived, region-scoped ticket for a stream's URL |
//! | `GET /v1/regions/{region}/stream` | Server-Sent Events: snapshot, then transitions |
//! | `GET /v1/facilities/{id}` | one facility's newest transition |
//! | `GET /v1/facilities/{id}/history?from=&to=` | transitions in a range, and seconds online |
//! | `GET /v1/facilities/{id}/uptime?days=&tz=` | uptime per calendar day (outages included) and over 24 h / 7 d / 30 d |
//! | `GET /v1/facilities/{id}/sessions` | the sessions open now (who is online) |
//! | `GET /v1/overview` | every visible region's counts and 24 h uptime, worst first |
//! | `GET /v1/overview/stream` | the same, live (Server-Sent Events) |
//! | `GET /` | the dashboard |
//! | `GET /healthz` | the process is alive (`/metrics` and `/readyz` are on `gateway.ops_listen`) |
//!
//! Errors: [`crate::error`].

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json, Router};
use presence_core::config::GatewayConfig;
use presence_core::now_ms;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{now_secs, AuthError};
use crate::caller::{BeaconCaller, Caller, FacilityRead, OverviewAccess, StreamAccess};
use crate::error::{ApiError, Outcome};
use crate::ingest::parse;
use crate::openapi::{
    Accepted, ApiDoc, FacilityStatus, Heartbeats, Problem, Regions, Ticket, TicketRequest,
};
use crate::query::query_param;
pub use crate::state::App;

pub fn router(app: App, config: &GatewayConfig) -> Router {
    let (schemas, paths, heartbeats) = routes!(post_heartbeats);
    let heartbeats = heartbeats.fallback(|method: Method| async move {
        ApiError::MethodNotAllowed {
            method,
            path: "/v1/heartbeats",
            allow: "POST, OPTIONS",
        }
    });
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes((schemas, paths, heartbeats))
        .routes(routes!(get_regions))
        .routes(routes!(get_region))
        .routes(routes!(post_stream_ticket))
        .routes(routes!(get_stream))
        .routes(routes!(get_facility))
        .routes(routes!(get_history))
        .routes(routes!(get_uptime))
        .routes(routes!(get_sessions))
        .routes(routes!(get_overview))
        .routes(routes!(get_overview_stream))
        .routes(routes!(get_dashboard))
        .routes(routes!(get_healthz))
        .routes(routes!(get_openapi))
        .route_layer(middleware::from_fn_with_state(app.clone(), count_outcome))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(app)
        .split_for_parts();
    let doc = OpenApiJson(Arc::from(doc.to_pretty_json().unwrap_or_else(|e| {
        format!("{{\"error\": \"the OpenAPI document does not serialise: {e}\"}}")
    })));
    let api = api.layer(Extension(doc));
    match cors(config) {
        Some(layer) => api.layer(layer),
        None => api,
    }
}

/// The OpenAPI document, serialised once when the router is built.
#[derive(Clone)]
struct OpenApiJson(Arc<str>);

/// This document: the HTTP API in OpenAPI 3.1.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)))]
async fn get_openapi(Extension(OpenApiJson(json)): Extension<OpenApiJson>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json.to_string(),
    )
        .into_response()
}

/// The dashboard: a page that lists regions and follows one live.
#[utoipa::path(get, path = "/", tag = "ops",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)))]
async fn get_dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// The process is alive. Readiness and metrics are on `gateway.ops_listen`, not here.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn get_healthz() -> &'static str {
    "ok\n"
}

/// The metric's `route` label of a matched path.
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/heartbeats" => "heartbeats",
        "/v1/regions" => "regions",
        "/v1/regions/{region}/facilities" => "region_facilities",
        "/v1/stream-tickets" => "stream_tickets",
        "/v1/regions/{region}/stream" => "stream",
        "/v1/facilities/{id}" => "facility",
        "/v1/facilities/{id}/history" => "history",
        "/v1/facilities/{id}/uptime" => "uptime",
        "/v1/facilities/{id}/sessions" => "sessions",
        "/v1/overview" => "overview",
        "/v1/overview/stream" => "overview_stream",
        "/" => "dashboard",
        "/healthz" => "healthz",
        "/openapi.json" => "openapi",
        _ => "other",
    }
}

/// Counts every answer of a route once, by its [`Outcome`] (`ok` when it names none).
async fn count_outcome(
    State(app): State<App>,
    path: MatchedPath,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(path.as_str());
    let response = next.run(request).await;
    response
        .extensions()
        .get::<Outcome>()
        .copied()
        .unwrap_or(Outcome::OK)
        .record(&app.0.metrics, route);
    response
}

/// `response` counted as `outcome` rather than `ok`.
fn named(outcome: &'static str, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response.extensions_mut().insert(Outcome::success(outcome));
    response
}

fn cors(config: &GatewayConfig) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origins = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("last-event-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// JSON, or the `text/plain` that `navigator.sendBeacon` sends for a string body.
fn acceptable_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/plain"
}

/// When the request arrived (ms since the epoch): the heartbeats' event time. Taken before
/// anything else is read, so that verifying the token or reading the body does not move it.
struct ReceivedAt(i64);

impl<S: Send + Sync> FromRequestParts<S> for ReceivedAt {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ReceivedAt(now_ms()))
    }
}

/// A body `POST /v1/heartbeats` can read: [`acceptable_content_type`].
struct HeartbeatContentType;

impl<S: Send + Sync> FromRequestParts<S> for HeartbeatContentType {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if acceptable_content_type(&parts.headers) {
            Ok(HeartbeatContentType)
        } else {
            Err(ApiError::UnsupportedMediaType)
        }
    }
}

/// Heartbeats in: one (an object) or a batch (an array), answered 202 only after the
/// broker has acknowledged every one.
#[utoipa::path(post, path = "/v1/heartbeats", tag = "ingest",
    request_body(description = "One heartbeat or a batch; `text/plain` is what navigator.sendBeacon sends for the same JSON",
        content((Heartbeats = "application/json"), (Heartbeats = "text/plain"))),
    security((), ("bearer" = []), ("access_token" = [])),
    responses(
        (status = 202, description = "Every heartbeat is stored in Kafka", body = Accepted),
        (status = 400, description = "Not JSON, or a field breaks a rule (`invalid_field` names it)", body = Problem),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token does not grant this (`region_not_granted`, `claim_mismatch`)", body = Problem),
        (status = 405, description = "Only POST (and the CORS preflight)", body = Problem, headers(("Allow" = String))),
        (status = 408, description = "The body did not arrive within gateway.body_read_timeout", body = Problem),
        (status = 413, description = "The body or the batch is too large (`too_large`, `batch_too_large`)", body = Problem),
        (status = 415, description = "Not application/json or text/plain", body = Problem),
        (status = 429, description = "This identity is over its rate (gateway.ingest_per_minute, gateway.ingest_burst)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "A dependency cannot answer now (`broker_down, queue_full, not_acknowledged, rate_table_full`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn post_heartbeats(
    ReceivedAt(received): ReceivedAt,
    State(app): State<App>,
    _: HeartbeatContentType,
    BeaconCaller(claims): BeaconCaller,
    request: Request,
) -> Result<Response, ApiError> {
    // The body within gateway.body_read_timeout: a client that sends it byte by byte does
    // not hold the request open.
    let body = tokio::time::timeout(app.0.body_read_timeout, Bytes::from_request(request, &()))
        .await
        .map_err(|_| ApiError::BodyTimeout)?
        .map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge,
            _ => ApiError::UnreadableBody(e.body_text()),
        })?;
    let beats = parse(&body, claims.as_ref(), app.0.max_batch)?;
    app.admit(&beats, claims.as_ref())
        .map_err(ApiError::RateLimited)?;
    app.0.publisher.publish(&beats, received).await?;
    app.0.metrics.heartbeats_accepted.inc_by(beats.len() as u64);
    Ok(named(
        "accepted",
        (
            StatusCode::ACCEPTED,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            format!("{{\"accepted\":{}}}", beats.len()),
        ),
    ))
}

/// Every region the notifier has seen.
#[utoipa::path(get, path = "/v1/regions", tag = "read", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The regions", body = Regions),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 503, description = "A dependency cannot answer now (`redis_unavailable`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn get_regions(State(app): State<App>, _: Caller) -> Result<Response, ApiError> {
    let regions = app.0.store.regions().await.map_err(ApiError::RedisDown)?;
    Ok(Json(json!({"regions": regions})).into_response())
}

/// A region's facilities now: a snapshot as of one region sequence.
#[utoipa::path(get, path = "/v1/regions/{region}/facilities", tag = "read", security((), ("bearer" = [])),
    params(("region" = String, Path, description = "A region id")),
    responses(
        (status = 200, description = "The region's facilities (none for a region never seen)", body = crate::store::Snapshot),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token does not grant this (`region_not_granted`, `claim_mismatch`)", body = Problem),
        (status = 503, description = "A dependency cannot answer now (`redis_unavailable`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn get_region(
    State(app): State<App>,
    Path(region): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.authorize_region(&region)?;
    let snapshot = app
        .0
        .store
        .snapshot(&region)
        .await
        .map_err(ApiError::RedisDown)?;
    Ok(Json(snapshot).into_response())
}

/// A region, live: Server-Sent Events, first a `snapshot`, then each `transition` (its
/// `id` is the region sequence; `Last-Event-ID` resumes), and `expired` when the grant
/// behind the stream ends.
#[utoipa::path(get, path = "/v1/regions/{region}/stream", tag = "stream",
    security((), ("ticket" = []), ("bearer" = [])),
    params(
        ("region" = String, Path, description = "A region id the notifier has seen"),
        ("Last-Event-ID" = Option<u64>, Header, description = "The last region sequence received: the stream resumes after it, or starts with a snapshot"),
    ),
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token does not grant this (`region_not_granted`, `claim_mismatch`)", body = Problem),
        (status = 404, description = "No transition of this region has been seen (`unknown_region`)", body = Problem),
        (status = 429, description = "This identity has gateway.max_streams_per_identity streams open", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "A dependency cannot answer now (`streams_full, redis_unavailable`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn get_stream(
    State(app): State<App>,
    StreamAccess { region, grant }: StreamAccess,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Only regions the notifier has seen: a made-up name costs nothing.
    if !app
        .0
        .store
        .region_exists(&region)
        .await
        .map_err(ApiError::RedisDown)?
    {
        return Err(ApiError::UnknownRegion(region));
    }
    let slot = app
        .0
        .slots
        .acquire(grant.as_ref().map(|g| g.sub.as_str()))
        .map_err(ApiError::NoStreamSlot)?;
    let mut response = app
        .0
        .hub
        .stream(region, last_event_id(&headers), slot)
        .into_response();
    // Proxies (nginx) must not buffer a live stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    let response = match grant {
        Some(g) => crate::auth::end_stream_at(response, g.expires),
        None => response,
    };
    Ok(named("opened", response))
}

/// The `Last-Event-ID` an EventSource sends when it reconnects: the last region sequence
/// it saw. Anything that is not a number is ignored (the stream starts with a snapshot).
fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// `POST /v1/stream-tickets`, token in the `Authorization` header, optional body
/// `{"regions": [...]}` (default: every region the token grants): a ticket for
/// `GET /v1/regions/{region}/stream?ticket=`. With `auth = "none"` the ticket is empty.
#[utoipa::path(post, path = "/v1/stream-tickets", tag = "stream",
    request_body(description = "The regions to open; an empty body asks for every region the token grants", content = Option<TicketRequest>, content_type = "application/json"),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A ticket for `?ticket=` of the stream", body = Ticket, headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "The body is not `{\"regions\": [...]}` (`invalid_field`)", body = Problem),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token does not grant this (`region_not_granted`, `claim_mismatch`)", body = Problem),
        (status = 503, description = "A dependency cannot answer now (`keys_unavailable`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn post_stream_ticket(
    State(app): State<App>,
    Caller(claims): Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (Some(verifier), Some(claims)) = (&app.0.verifier, claims) else {
        return Ok(Json(json!({"ticket": "", "regions": ["*"]})).into_response());
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wanted {
        regions: Vec<String>,
    }
    let regions = if body.iter().all(u8::is_ascii_whitespace) {
        claims.granted_regions()
    } else {
        match serde_json::from_slice::<Wanted>(&body) {
            Ok(w) if !w.regions.is_empty() && w.regions.len() <= 100 => w.regions,
            _ => {
                return Err(ApiError::invalid_field(
                    "regions",
                    "must be {\"regions\": [one to 100 region ids]} or an empty body",
                ))
            }
        }
    };
    if let Some(r) = regions.iter().find(|r| !claims.grants_region(r)) {
        return Err(AuthError::RegionNotGranted(r.clone()).into());
    }
    let (ticket, grant) = verifier.tickets().issue(&claims, regions, now_secs());
    Ok(named(
        "issued",
        (
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            Json(json!({
                "ticket": ticket,
                "regions": grant.regions,
                "expires_in": verifier.tickets().ttl().as_secs(),
                "grant_expires_at": grant.expires,
            })),
        ),
    ))
}

/// A facility's newest transition.
#[utoipa::path(get, path = "/v1/facilities/{id}", tag = "read", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "A facility id")),
    responses(
        (status = 200, description = "The facility's newest transition", body = FacilityStatus),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token does not grant this (`region_not_granted`, `claim_mismatch`)", body = Problem),
        (status = 404, description = "No transition of this facility has been seen (`unknown_facility`)", body = Problem),
        (status = 503, description = "A dependency cannot answer now (`redis_unavailable`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn get_facility(
    State(app): State<App>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let transition = app
        .0
        .store
        .facility(&id)
        .await
        .map_err(ApiError::RedisDown)?
        .ok_or(ApiError::UnknownFacility(id))?;
    caller.authorize_region(&transition.region_id)?;
    Ok(Json(transition).into_response())
}

/// `from`/`to`: ms since the epoch or RFC 3339 (`2026-11-27T00:00:00Z`). Default: the last
/// 24 hours.
fn parse_time(value: &str) -> Option<i64> {
    if let Ok(ms) = value.parse::<i64>() {
        return Some(ms);
    }
    humantime::parse_rfc3339_weak(value)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

const TIME_RULE: &str = "must be ms since the epoch or RFC 3339 (2026-11-27T00:00:00Z)";

/// `[from, to)` of a history request: checked before anything is asked of Redis or
/// PostgreSQL.
fn history_range(query: Option<&str>, now: i64, max: Duration) -> Result<(i64, i64), ApiError> {
    let mut range = [("from", now - 86_400_000), ("to", now)];
    for (name, value) in &mut range {
        if let Some(text) = query_param(query, name) {
            *value = parse_time(&text).ok_or_else(|| ApiError::invalid_field(name, TIME_RULE))?;
        }
    }
    let [(_, from), (_, to)] = range;
    if to <= from {
        return Err(ApiError::invalid_field("to", "must be after from"));
    }
    if i128::from(to) - i128::from(from) > max.as_millis() as i128 {
        return Err(ApiError::invalid_field(
            "to",
            format!(
                "must be at most {} after from (gateway.history_max_range): ask for a shorter range",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok((from, to))
}

/// The refusals the console's reads of one facility's PostgreSQL rows share (history,
/// uptime, who is online), for the OpenAPI document; the answers themselves are
/// [`ApiError`]s.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum FacilityReadRefusals {
    #[response(status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
    Unauthorized(Problem),
    #[response(
        status = 403,
        description = "The token does not grant this (`region_not_granted`, `claim_mismatch`)"
    )]
    NotGranted(Problem),
    #[response(
        status = 404,
        description = "With tokens: no transition of this facility has been seen (`unknown_facility`)"
    )]
    UnknownFacility(Problem),
    #[response(status = 503, description = "A dependency cannot answer now (`postgres_unavailable, history_too_slow, no_history_tables, redis_unavailable`; also `keys_unavailable`: the identity provider's keys)", headers(("Retry-After" = u64, description = "Seconds to wait")))]
    Unavailable(Problem),
}

/// A facility's transitions in `[from, to)`, its state when the range starts, and the
/// seconds it was ONLINE within the range.
#[utoipa::path(get, path = "/v1/facilities/{id}/history", tag = "read", security((), ("bearer" = [])),
    params(
        ("id" = String, Path, description = "A facility id"),
        ("from" = Option<String>, Query, description = "ms since the epoch or RFC 3339; default 24 h before `to`"),
        ("to" = Option<String>, Query, description = "ms since the epoch or RFC 3339; default now; at most gateway.history_max_range after `from`"),
    ),
    responses(
        (status = 200, description = "The history", body = crate::history::History),
        (status = 400, description = "`from`/`to` unreadable, reversed or too far apart (`invalid_field`)", body = Problem),
        FacilityReadRefusals,
    ))]
async fn get_history(State(app): State<App>, read: FacilityRead) -> Result<Response, ApiError> {
    let (from, to) = history_range(read.query.as_deref(), now_ms(), app.0.history_max_range)?;
    let region = read.region(&app).await?;
    let history = app
        .0
        .history
        .read(&read.id, region.as_deref(), from, to)
        .await?;
    Ok(Json(history).into_response())
}

/// Most days `GET /v1/facilities/{id}/uptime` answers for (a year and a day).
const MAX_UPTIME_DAYS: i32 = 366;

/// `days` (1 to [`MAX_UPTIME_DAYS`], default 90) and `tz` (an IANA name, default `UTC`).
fn uptime_params(query: Option<&str>) -> Result<(i32, String), ApiError> {
    let days = match query_param(query, "days") {
        None => 90,
        Some(d) => d
            .parse::<i32>()
            .ok()
            .filter(|d| (1..=MAX_UPTIME_DAYS).contains(d))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "days",
                    format!("must be a whole number from 1 to {MAX_UPTIME_DAYS}"),
                )
            })?,
    };
    let tz = query_param(query, "tz").unwrap_or_else(|| "UTC".into());
    let well_formed = !tz.is_empty()
        && tz.len() <= 64
        && tz
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-/".contains(c));
    if !well_formed {
        return Err(ApiError::invalid_field(
            "tz",
            "must be an IANA time zone name such as Europe/Berlin or UTC",
        ));
    }
    Ok((days, tz))
}

/// A facility's uptime: one entry per calendar day of the last `days` in time zone `tz`
/// (seconds ONLINE, seconds known, the outages of the day), and the ONLINE share over the
/// last 24 h, 7 d and 30 d. Computed in PostgreSQL from the transition history.
#[utoipa::path(get, path = "/v1/facilities/{id}/uptime", tag = "read", security((), ("bearer" = [])),
    params(
        ("id" = String, Path, description = "A facility id"),
        ("days" = Option<i32>, Query, description = "Calendar days up to today, 1 to 366; default 90"),
        ("tz" = Option<String>, Query, description = "The IANA time zone the days are cut in (the viewer's); default UTC"),
    ),
    responses(
        (status = 200, description = "The uptime", body = crate::history::Uptime),
        (status = 400, description = "`days` or `tz` unreadable or unknown (`invalid_field`)", body = Problem),
        FacilityReadRefusals,
    ))]
async fn get_uptime(State(app): State<App>, read: FacilityRead) -> Result<Response, ApiError> {
    let (days, tz) = uptime_params(read.query.as_deref())?;
    let region = read.region(&app).await?;
    let uptime = app
        .0
        .history
        .uptime(&read.id, region.as_deref(), days, &tz)
        .await
        .map_err(|e| match e {
            crate::history::HistoryError::UnknownTimeZone(_) => ApiError::invalid_field(
                "tz",
                "must be an IANA time zone name PostgreSQL knows, such as Europe/Berlin or UTC",
            ),
            e => e.into(),
        })?;
    Ok(Json(uptime).into_response())
}

/// Who is online: the sessions open now at a facility (user id, since, last beat), as the
/// sink keeps them from the processor's sessions changelog.
#[utoipa::path(get, path = "/v1/facilities/{id}/sessions", tag = "read", security((), ("bearer" = [])),
    params(("id" = String, Path, description = "A facility id")),
    responses(
        (status = 200, description = "The open sessions, oldest first", body = crate::history::Sessions),
        FacilityReadRefusals,
    ))]
async fn get_sessions(State(app): State<App>, read: FacilityRead) -> Result<Response, ApiError> {
    let region = read.region(&app).await?;
    let sessions = app.0.history.sessions(&read.id, region.as_deref()).await?;
    Ok(Json(sessions).into_response())
}

/// Every region the caller may see, with its ONLINE/OFFLINE counts now and its uptime over
/// the last 24 h, worst first.
#[utoipa::path(get, path = "/v1/overview", tag = "read", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The regions", body = crate::overview::Overview),
        (status = 401, description = "No valid token (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 503, description = "A dependency cannot answer now (`redis_unavailable`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn get_overview(
    State(app): State<App>,
    OverviewAccess { grant }: OverviewAccess,
) -> Result<Response, ApiError> {
    let mut watcher = crate::overview::Watcher::new(grant);
    watcher.refresh(&app).await.map_err(ApiError::RedisDown)?;
    Ok(Json(watcher.overview()).into_response())
}

/// The overview, live over one connection: Server-Sent Events, an `overview` (the body of
/// `GET /v1/overview`) now and whenever a count or an uptime changes, `expired` when the
/// grant behind the stream ends.
#[utoipa::path(get, path = "/v1/overview/stream", tag = "stream",
    security((), ("ticket" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "No valid token or ticket (only with `gateway.auth = \"jwt\"`)", body = Problem, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 429, description = "This identity has gateway.max_streams_per_identity streams open", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "A dependency cannot answer now (`streams_full`; also `keys_unavailable`: the identity provider's keys)", body = Problem, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn get_overview_stream(
    State(app): State<App>,
    OverviewAccess { grant }: OverviewAccess,
) -> Result<Response, ApiError> {
    let slot = app
        .0
        .slots
        .acquire(grant.as_ref().map(|g| g.sub.as_str()))
        .map_err(ApiError::NoStreamSlot)?;
    let expires = grant.as_ref().map(|g| g.expires);
    let mut response = crate::overview::stream(app, grant, slot).into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    let response = match expires {
        Some(at) => crate::auth::end_stream_at(response, at),
        None => response,
    };
    Ok(named("opened", response))
}

const DASHBOARD: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::bearer;
    use proptest::prelude::*;

    /// Query strings as clients write them, good and bad: names, `=`, `&`, `+` and percent
    /// escapes that may be cut short or not UTF-8.
    const QUERYISH: &str = "([a-z_]{0,12}=?([%0-9A-Fa-f+&=:.TZ-]|%[0-9A-Fa-f]{0,2}){0,24}&?){0,8}";

    /// The `from`/`to` instants humantime writes: 1970 up to the end of year 9999.
    const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

    fn with_header(name: &'static str, value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
        headers
    }

    // 256 cases each (proptest's default, as the other property tests here).
    proptest! {
        /// Every query-string reader (`ticket`, `access_token`, `from`, `to`) and the time
        /// parser take any text without a panic.
        #[test]
        fn arbitrary_query_strings_never_panic(any_text in ".{0,300}", shaped in QUERYISH, allowed in any::<bool>()) {
            for q in [any_text.as_str(), shaped.as_str()] {
                for name in ["ticket", "access_token", "from", "to", ""] {
                    if let Some(v) = query_param(Some(q), name) {
                        let _ = parse_time(&v);
                    }
                }
                let _ = parse_time(q);
                let _ = bearer(None, Some(q), allowed);
                let _ = bearer(Some(q), Some(q), allowed);
            }
        }

        /// A value written with form encoding is read back as it was, as the first of its name.
        #[test]
        fn a_query_value_round_trips(name in "[a-z_]{1,12}", value in ".{0,60}", others in proptest::collection::vec(("[A-Z]{1,5}", ".{0,20}"), 0..4)) {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &others {
                q.append_pair(k, v);
            }
            q.append_pair(&name, &value);
            q.append_pair(&name, "second");
            prop_assert_eq!(query_param(Some(&q.finish()), &name), Some(value));
        }

        /// `from`/`to` in ms or RFC 3339 (whole seconds or ms, in a query string or not) give
        /// the instant they name.
        #[test]
        fn ms_and_rfc3339_parse_to_their_instant(ms in 0..=MAX_RFC3339_MS, any_ms in any::<i64>()) {
            prop_assert_eq!(parse_time(&any_ms.to_string()), Some(any_ms));
            let at = UNIX_EPOCH + Duration::from_millis(ms as u64);
            prop_assert_eq!(parse_time(&humantime::format_rfc3339_millis(at).to_string()), Some(ms));
            prop_assert_eq!(parse_time(&humantime::format_rfc3339_seconds(at).to_string()), Some(ms - ms % 1000));
            let q = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("from", &humantime::format_rfc3339_millis(at).to_string())
                .finish();
            prop_assert_eq!(query_param(Some(&q), "from").and_then(|v| parse_time(&v)), Some(ms));
        }

        /// Any `Last-Event-ID` header is taken without a panic; a sequence number (with the
        /// spaces a proxy may add) is read as itself, anything else as none.
        #[test]
        fn last_event_id_is_a_number_or_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..64), text in "[ \t!-~]{0,40}", n in any::<u64>(), pad in "[ \t]{0,3}") {
            let _ = last_event_id(&with_header("last-event-id", &bytes));
            let parsed = last_event_id(&with_header("last-event-id", text.as_bytes()));
            prop_assert_eq!(parsed, text.trim().parse::<u64>().ok());
            let padded = format!("{pad}{n}{pad}");
            prop_assert_eq!(last_event_id(&with_header("last-event-id", padded.as_bytes())), Some(n));
        }

        /// Any `Content-Type` is judged without a panic; JSON and text/plain pass with any
        /// parameters and in any case.
        #[test]
        fn content_type_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), params in "(;[ a-z=-]{0,20}){0,3}", upper in any::<bool>()) {
            let _ = acceptable_content_type(&with_header("content-type", &bytes));
            for essence in ["application/json", "text/plain"] {
                let ct = format!("{essence}{params}");
                let ct = if upper { ct.to_ascii_uppercase() } else { ct };
                prop_assert!(acceptable_content_type(&with_header("content-type", ct.as_bytes())));
            }
        }
    }
}
