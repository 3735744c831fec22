//! Routes, status codes and error bodies.
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
//! | `GET /` | the dashboard |
//! | `GET /healthz` | the process is alive (`/metrics` and `/readyz` are on `gateway.ops_listen`) |
//!
//! Every error is JSON: `{"error": code, "message": ..., "field"?: ..., "rule"?: ...}`.
//! Refusals by a bound carry `Retry-After`: 429 for one caller over its share (ingest rate,
//! streams per identity), 503 for the gateway as a whole (total streams, a dependency).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use presence_core::config::GatewayConfig;
use presence_core::now_ms;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{bearer, now_secs, AuthError, Claims, Grant, Verifier};
use crate::history::{HistoryError, HistoryReader};
use crate::ingest::{parse, Rejection};
use crate::limits::{Limited, NoSlot, RateLimiter, StreamSlots};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::store::Store;
use crate::stream::Hub;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "1";
/// Seconds a client over its stream cap should wait: until one of its streams has closed.
const STREAM_RETRY_AFTER_SECONDS: &str = "10";

#[derive(Clone)]
pub struct App(Arc<Inner>);

struct Inner {
    verifier: Option<Verifier>,
    max_batch: usize,
    publisher: Arc<Publisher>,
    store: Store,
    hub: Hub,
    history: HistoryReader,
    metrics: Metrics,
    /// The hot path's counter, resolved once.
    accepted: prometheus::IntCounter,
    limiter: RateLimiter,
    slots: StreamSlots,
    body_read_timeout: Duration,
    history_max_range: Duration,
}

impl App {
    pub fn new(
        config: &presence_core::Config,
        publisher: Arc<Publisher>,
        store: Store,
        hub: Hub,
        history: HistoryReader,
        metrics: Metrics,
    ) -> anyhow::Result<App> {
        Ok(App(Arc::new(Inner {
            verifier: Verifier::from_config(&config.gateway)?,
            max_batch: config.gateway.max_batch,
            publisher,
            store,
            hub,
            history,
            accepted: metrics
                .requests
                .with_label_values(&["heartbeats", "accepted"]),
            metrics,
            limiter: RateLimiter::new(
                config.gateway.ingest_per_minute,
                config.gateway.ingest_burst,
                config.gateway.ingest_identities,
            ),
            slots: StreamSlots::new(
                config.gateway.max_streams,
                config.gateway.max_streams_per_identity,
            ),
            body_read_timeout: config.gateway.body_read_timeout,
            history_max_range: config.gateway.history_max_range,
        })))
    }

    fn count(&self, route: &str, outcome: &str) {
        self.0
            .metrics
            .requests
            .with_label_values(&[route, outcome])
            .inc();
    }

    /// The caller's verified claims; `Ok(None)` when tokens are off. The token comes from
    /// the `Authorization` header, or from `?access_token=` where `query_allowed`
    /// (heartbeats only: `sendBeacon`).
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        query_allowed: bool,
    ) -> Result<Option<Claims>, AuthError> {
        match &self.0.verifier {
            None => Ok(None),
            Some(v) => {
                let authorization = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|h| h.to_str().ok());
                let token = bearer(authorization, query, query_allowed)?;
                v.verify(token.as_deref()).await.map(Some)
            }
        }
    }

    /// The caller's claims if they grant `region`; `Ok(None)` when tokens are off.
    async fn authorize_region(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        region: &str,
    ) -> Result<Option<Claims>, AuthError> {
        match self.authenticate(headers, query, false).await? {
            Some(c) if !c.grants_region(region) => {
                Err(AuthError::RegionNotGranted(region.to_string()))
            }
            c => Ok(c),
        }
    }

    /// What a stream of `region` may show and until when: a `?ticket=`, else a token in
    /// the header; `None` when tokens are off.
    async fn stream_grant(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        region: &str,
    ) -> Result<Option<Grant>, AuthError> {
        let Some(v) = &self.0.verifier else {
            return Ok(None);
        };
        if let Some(ticket) = query_param(query, "ticket") {
            return v.tickets().redeem(&ticket, region, now_secs()).map(Some);
        }
        match self.authenticate(headers, query, false).await? {
            Some(c) if !c.grants_region(region) => {
                Err(AuthError::RegionNotGranted(region.to_string()))
            }
            Some(c) => Ok(Some(Grant {
                sub: c.sub,
                regions: vec![region.to_string()],
                open_by: now_secs(),
                expires: c.exp,
            })),
            None => Ok(None),
        }
    }

    /// Charges each identity its heartbeats: the token's subject, or, without tokens, each
    /// beat's user id.
    fn admit(
        &self,
        beats: &[presence_core::records::Heartbeat],
        claims: Option<&Claims>,
    ) -> Result<(), Limited> {
        let mut costs: BTreeMap<&str, u32> = BTreeMap::new();
        for b in beats {
            let who = claims.map_or(b.user_id.as_str(), |c| c.sub.as_str());
            *costs.entry(who).or_insert(0) += 1;
        }
        let costs: Vec<(&str, u32)> = costs.into_iter().collect();
        let result = self.0.limiter.admit(&costs, Instant::now());
        self.0
            .metrics
            .rate_identities
            .set(self.0.limiter.tracked() as i64);
        result
    }
}

pub fn router(app: App, config: &GatewayConfig) -> Router {
    let api = Router::new()
        .route(
            "/v1/heartbeats",
            post(post_heartbeats).fallback(|method: Method| async move {
                let mut r = problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    &format!("{method} is not allowed on /v1/heartbeats: use POST"),
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
                r
            }),
        )
        .route("/v1/regions", get(get_regions))
        .route("/v1/regions/{region}/facilities", get(get_region))
        .route("/v1/stream-tickets", post(post_stream_ticket))
        .route("/v1/regions/{region}/stream", get(get_stream))
        .route("/v1/facilities/{id}", get(get_facility))
        .route("/v1/facilities/{id}/history", get(get_history))
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(app);
    match cors(config) {
        Some(layer) => api.layer(layer),
        None => api,
    }
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
            .max_age(std::time::Duration::from_secs(600)),
    )
}

fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

/// 400 naming the field and the rule it breaks.
fn invalid_field(field: &str, rule: &str) -> Response {
    let message = format!("{field} {rule}");
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_field", "message": message, "field": field, "rule": rule})),
    )
        .into_response()
}

fn auth_problem(e: &AuthError) -> Response {
    let status = e.status();
    let mut r = problem(status, e.code(), &e.to_string());
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn unavailable(code: &str, message: &str) -> Response {
    with_retry_after(
        problem(StatusCode::SERVICE_UNAVAILABLE, code, message),
        RETRY_AFTER_SECONDS,
    )
}

fn with_retry_after(mut r: Response, seconds: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(seconds) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// 429 or 503 for a request the ingest rate limit refused.
fn rate_limited(e: &Limited) -> Response {
    match e {
        Limited::Rate { retry_after } => {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            with_retry_after(
                problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!("this identity sends heartbeats faster than gateway.ingest_per_minute allows; retry in {seconds} s"),
                ),
                &seconds.to_string(),
            )
        }
        Limited::TooBig { cost, burst } => with_retry_after(
            problem(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!("this request holds {cost} heartbeats of one identity; at most {burst} (gateway.ingest_burst) pass at once: split it"),
            ),
            "60",
        ),
        Limited::Full => unavailable(
            "rate_table_full",
            "the gateway tracks as many identities as gateway.ingest_identities allows; retry later",
        ),
    }
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

async fn post_heartbeats(State(app): State<App>, request: Request) -> Response {
    const ROUTE: &str = "heartbeats";
    let received = now_ms();
    let headers = request.headers().clone();
    let query = request.uri().query().map(str::to_string);
    if !acceptable_content_type(&headers) {
        app.count(ROUTE, "unsupported_media_type");
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json (or text/plain, as navigator.sendBeacon does)",
        );
    }
    // The body within gateway.body_read_timeout: a client that sends it byte by byte does
    // not hold the request open.
    let body = match tokio::time::timeout(
        app.0.body_read_timeout,
        Bytes::from_request(request, &()),
    )
    .await
    {
        Ok(b) => b,
        Err(_) => {
            app.count(ROUTE, "body_timeout");
            return problem(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive within gateway.body_read_timeout: send it whole",
            );
        }
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            app.count(ROUTE, "too_large");
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the body is larger than gateway.max_body_bytes: send smaller batches",
            );
        }
        Err(e) => {
            app.count(ROUTE, "invalid");
            return problem(StatusCode::BAD_REQUEST, "unreadable_body", &e.body_text());
        }
    };
    let claims = match app.authenticate(&headers, query.as_deref(), true).await {
        Ok(c) => c,
        Err(e) => {
            app.count(ROUTE, e.code());
            return auth_problem(&e);
        }
    };
    let beats = match parse(&body, claims.as_ref(), app.0.max_batch) {
        Ok(b) => b,
        Err(Rejection::Forbidden(e)) => {
            app.count(ROUTE, e.code());
            return auth_problem(&e);
        }
        Err(Rejection::Invalid { field, rule }) => {
            app.count(ROUTE, "invalid");
            return invalid_field(&field, &rule);
        }
        Err(e @ Rejection::TooMany { .. }) => {
            app.count(ROUTE, "too_large");
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                &e.to_string(),
            );
        }
        Err(e @ Rejection::Malformed(_)) => {
            app.count(ROUTE, "invalid");
            return problem(StatusCode::BAD_REQUEST, "malformed_json", &e.to_string());
        }
    };
    if let Err(e) = app.admit(&beats, claims.as_ref()) {
        let reason = match e {
            Limited::Rate { .. } => "rate",
            Limited::TooBig { .. } => "batch",
            Limited::Full => "full",
        };
        app.0
            .metrics
            .rate_limited
            .with_label_values(&[reason])
            .inc();
        app.count(ROUTE, "rate_limited");
        return rate_limited(&e);
    }
    match app.0.publisher.publish(&beats, received).await {
        Ok(()) => {
            app.0.accepted.inc();
            app.0.metrics.heartbeats_accepted.inc_by(beats.len() as u64);
            (
                StatusCode::ACCEPTED,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                format!("{{\"accepted\":{}}}", beats.len()),
            )
                .into_response()
        }
        Err(e) => {
            app.count(ROUTE, e.code());
            unavailable(e.code(), &e.to_string())
        }
    }
}

fn redis_down(app: &App, e: redis::RedisError) -> Response {
    app.0.metrics.redis_errors.inc();
    tracing::warn!(error = %e, "Redis read failed");
    unavailable(
        "redis_unavailable",
        "Redis is unreachable: the current state cannot be read now; retry later",
    )
}

async fn get_regions(
    State(app): State<App>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    if let Err(e) = app.authenticate(&headers, q.as_deref(), false).await {
        return auth_problem(&e);
    }
    match app.0.store.regions().await {
        Ok(r) => Json(json!({"regions": r})).into_response(),
        Err(e) => redis_down(&app, e),
    }
}

async fn get_region(
    State(app): State<App>,
    Path(region): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    if let Err(e) = app.authorize_region(&headers, q.as_deref(), &region).await {
        return auth_problem(&e);
    }
    match app.0.store.snapshot(&region).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => redis_down(&app, e),
    }
}

async fn get_stream(
    State(app): State<App>,
    Path(region): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let grant = match app.stream_grant(&headers, q.as_deref(), &region).await {
        Ok(g) => g,
        Err(e) => {
            app.count("stream", e.code());
            return auth_problem(&e);
        }
    };
    // Only regions the notifier has seen: a made-up name costs nothing.
    match app.0.store.region_exists(&region).await {
        Ok(true) => {}
        Ok(false) => {
            app.count("stream", "unknown_region");
            return problem(
                StatusCode::NOT_FOUND,
                "unknown_region",
                &format!("no transition of region '{region}' has been seen: GET /v1/regions lists the regions"),
            );
        }
        Err(e) => return redis_down(&app, e),
    }
    let slot = match app.0.slots.acquire(grant.as_ref().map(|g| g.sub.as_str())) {
        Ok(s) => s,
        Err(refused) => {
            let (status, cap, code, message) = match refused {
                NoSlot::Identity { max } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "identity",
                    "too_many_streams",
                    format!("this identity has {max} streams open (gateway.max_streams_per_identity): close one"),
                ),
                NoSlot::Total { max } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "total",
                    "streams_full",
                    format!("the gateway has {max} streams open (gateway.max_streams); retry later"),
                ),
            };
            app.0
                .metrics
                .streams_refused
                .with_label_values(&[cap])
                .inc();
            app.count("stream", code);
            return with_retry_after(problem(status, code, &message), STREAM_RETRY_AFTER_SECONDS);
        }
    };
    app.count("stream", "opened");
    let last_event_id = last_event_id(&headers);
    let mut response = app
        .0
        .hub
        .stream(region, last_event_id, slot)
        .into_response();
    // Proxies (nginx) must not buffer a live stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    match grant {
        Some(g) => crate::auth::end_stream_at(response, g.expires),
        None => response,
    }
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
async fn post_stream_ticket(
    State(app): State<App>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    const ROUTE: &str = "stream_tickets";
    let claims = match app.authenticate(&headers, q.as_deref(), false).await {
        Ok(c) => c,
        Err(e) => {
            app.count(ROUTE, e.code());
            return auth_problem(&e);
        }
    };
    let (Some(verifier), Some(claims)) = (&app.0.verifier, claims) else {
        return Json(json!({"ticket": "", "regions": ["*"]})).into_response();
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
                return invalid_field(
                    "regions",
                    "must be {\"regions\": [one to 100 region ids]} or an empty body",
                )
            }
        }
    };
    if let Some(r) = regions.iter().find(|r| !claims.grants_region(r)) {
        let e = AuthError::RegionNotGranted(r.clone());
        app.count(ROUTE, e.code());
        return auth_problem(&e);
    }
    let (ticket, grant) = verifier.tickets().issue(&claims, regions, now_secs());
    app.count(ROUTE, "issued");
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(json!({
            "ticket": ticket,
            "regions": grant.regions,
            "expires_in": verifier.tickets().ttl().as_secs(),
            "grant_expires_at": grant.expires,
        })),
    )
        .into_response()
}

async fn get_facility(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let claims = match app.authenticate(&headers, q.as_deref(), false).await {
        Ok(c) => c,
        Err(e) => return auth_problem(&e),
    };
    match app.0.store.facility(&id).await {
        Ok(Some(t)) => match claims {
            Some(c) if !c.grants_region(&t.region_id) => {
                auth_problem(&AuthError::RegionNotGranted(t.region_id))
            }
            _ => Json(t).into_response(),
        },
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "unknown_facility",
            &format!("no transition of facility '{id}' has been seen"),
        ),
        Err(e) => redis_down(&app, e),
    }
}

/// The first value of `name` in a query string, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
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

async fn get_history(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let claims = match app.authenticate(&headers, q.as_deref(), false).await {
        Ok(c) => c,
        Err(e) => return auth_problem(&e),
    };
    let now = now_ms();
    let mut range = [("from", now - 86_400_000), ("to", now)];
    for (name, value) in &mut range {
        if let Some(text) = query_param(q.as_deref(), name) {
            match parse_time(&text) {
                Some(ms) => *value = ms,
                None => return invalid_field(name, TIME_RULE),
            }
        }
    }
    let [(_, from), (_, to)] = range;
    if to <= from {
        return invalid_field("to", "must be after from");
    }
    let max = app.0.history_max_range;
    if i128::from(to) - i128::from(from) > max.as_millis() as i128 {
        return invalid_field(
            "to",
            &format!(
                "must be at most {} after from (gateway.history_max_range): ask for a shorter range",
                humantime::format_duration(max)
            ),
        );
    }
    // Authorised before PostgreSQL is asked: the facility's region comes from Redis, and
    // the query reads only that region's rows.
    let region = match &claims {
        None => None,
        Some(c) => match app.0.store.facility(&id).await {
            Ok(Some(t)) if c.grants_region(&t.region_id) => Some(t.region_id),
            Ok(Some(t)) => return auth_problem(&AuthError::RegionNotGranted(t.region_id)),
            Ok(None) => {
                return problem(
                    StatusCode::NOT_FOUND,
                    "unknown_facility",
                    &format!("no transition of facility '{id}' has been seen"),
                )
            }
            Err(e) => return redis_down(&app, e),
        },
    };
    match app.0.history.read(&id, region.as_deref(), from, to).await {
        Ok(h) => Json(h).into_response(),
        Err(e @ HistoryError::NoTables) => unavailable("no_history_tables", &e.to_string()),
        Err(e @ HistoryError::Unavailable(_)) => {
            unavailable("postgres_unavailable", &e.to_string())
        }
        Err(e @ HistoryError::TooSlow(_)) => unavailable("history_too_slow", &e.to_string()),
    }
}

const DASHBOARD: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;
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
