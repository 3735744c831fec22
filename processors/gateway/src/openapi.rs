//! The OpenAPI 3.1 description of the HTTP API, served at `GET /openapi.json`.
//!
//! The paths come from the handlers themselves (`#[utoipa::path]` on each, collected by the
//! router in [`crate::http::router`]), so a route cannot be served without being described.
//! This module holds what the handlers cannot say on their own: the document's header, the
//! security schemes, and the JSON shapes of bodies that are not Rust types of ours
//! (heartbeats are checked field by field from raw JSON; transitions are
//! `presence_core::records::FacilityStatus`).

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The document's header and shared components; the router adds the paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "presence gateway",
        description = "Heartbeats in (to Kafka); facility ONLINE/OFFLINE state, history and live region streams out. The contract is docs/DESIGN.md; every error is a problem body (Problem) with a stable `error` code.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(Problem, FacilityStatus, Status)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "ingest", description = "Heartbeats from browsers and services"),
        (name = "read", description = "Current state and history"),
        (name = "stream", description = "Live region streams (Server-Sent Events) and their tickets"),
        (name = "ops", description = "The page and the liveness probe of the public port"),
    )
)]
pub struct ApiDoc;

/// `bearer`: `Authorization: Bearer <JWT>`; `access_token`: the same token in the URL, for
/// `POST /v1/heartbeats` only (`navigator.sendBeacon`); `ticket`: a stream ticket from
/// `POST /v1/stream-tickets`. With `gateway.auth = "none"` no credential is needed, which
/// each operation states with an empty requirement.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("HS256 with gateway.jwt_secret, or RS256/ES256/EdDSA from the identity provider's JWKS; claims sub, facility, region, exp (regions optional)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The bearer token in the URL: POST /v1/heartbeats only, for navigator.sendBeacon",
            ))),
        );
        components.add_security_scheme(
            "ticket",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "ticket",
                "A short-lived, region-scoped ticket from POST /v1/stream-tickets",
            ))),
        );
    }
}

/// Every refusal: a stable code, a message that says what to change, and for
/// `invalid_field` the field and the rule it breaks. Rendered by `crate::error::ApiError`.
#[derive(Serialize, ToSchema)]
pub struct Problem {
    /// A stable code, e.g. `invalid_field`, `token_expired`, `rate_limited`, `broker_down`.
    pub error: String,
    pub message: String,
    /// With `invalid_field`: the field, e.g. `session_id` or `[3].facility_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// With `invalid_field`: the rule the field breaks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// One heartbeat. With tokens on, `user_id`, `facility_id` and `region_id` come from the
/// token and may be left out (a body that names others is refused with 403).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// 1 to 128 bytes, no control characters (as are the other ids).
    pub session_id: String,
    pub user_id: Option<String>,
    pub facility_id: Option<String>,
    pub region_id: Option<String>,
    /// Default `BEAT`; `END` closes the session (logout, page unload).
    pub kind: Option<HeartbeatKind>,
    /// The client's clock when it sent the beat, ms since the epoch.
    #[schema(minimum = 0)]
    pub client_sent_at: Option<i64>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HeartbeatKind {
    Beat,
    End,
}

/// One heartbeat, or a batch of at most `gateway.max_batch`.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum Heartbeats {
    One(Heartbeat),
    Batch(Vec<Heartbeat>),
}

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// Heartbeats the broker acknowledged.
    pub accepted: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Regions {
    /// Every region the notifier has seen a transition of.
    pub regions: Vec<String>,
}

/// One ONLINE/OFFLINE transition, as on the `facility-status` topic.
#[derive(Serialize, ToSchema)]
pub struct FacilityStatus {
    pub facility_id: String,
    pub region_id: String,
    pub status: Status,
    pub open_sessions: i32,
    /// Event time of the transition, ms since the epoch.
    pub since: i64,
    /// 1 for a facility's first transition, then +1 per transition.
    pub seq: i64,
    /// Wall-clock ms when the processor emitted it.
    pub emitted_at: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Online,
    Offline,
}

/// The regions a ticket should open; an empty body asks for every region the token grants.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    #[schema(min_items = 1, max_items = 100)]
    pub regions: Vec<String>,
}

/// A stream ticket. With `gateway.auth = "none"` the ticket is empty and `regions` is
/// `["*"]`, and the expiry fields are absent.
#[derive(Serialize, ToSchema)]
pub struct Ticket {
    pub ticket: String,
    pub regions: Vec<String>,
    /// Seconds within which the ticket must open a stream.
    pub expires_in: Option<u64>,
    /// When streams opened with it end: the token's `exp`, seconds since the epoch.
    pub grant_expires_at: Option<u64>,
}
