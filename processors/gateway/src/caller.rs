//! Who is calling, as extractors: a handler names what it needs ([`Caller`],
//! [`BeaconCaller`], [`StreamAccess`], [`FacilityRead`]) and gets it verified, or the request is refused with
//! the [`ApiError`] that says why (and is counted). With `gateway.auth = "none"` every
//! extractor succeeds with no claims.

use axum::extract::{FromRequestParts, Path, RawQuery};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::auth::{bearer, now_secs, AuthError, Claims, Grant};
use crate::error::ApiError;
use crate::query::query_param;
use crate::state::App;

/// The caller's verified claims from `Authorization: Bearer`; `None` when tokens are off.
/// A token in the URL (`?access_token=`) is refused, so that the client learns why.
pub struct Caller(pub Option<Claims>);

/// As [`Caller`], but `?access_token=` is taken too: `POST /v1/heartbeats` only, for
/// `navigator.sendBeacon`, which cannot set headers.
pub struct BeaconCaller(pub Option<Claims>);

impl Caller {
    /// Refuses a caller whose token does not grant `region` (403).
    pub fn authorize_region(&self, region: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(c) if !c.grants_region(region) => {
                Err(AuthError::RegionNotGranted(region.to_string()).into())
            }
            _ => Ok(()),
        }
    }
}

/// A read of one facility's PostgreSQL rows (history, uptime, who is online): the path's
/// `{id}`, the raw query, and the caller, whose grant [`FacilityRead::region`] checks once
/// the handler has checked its query (so a malformed query is refused before Redis or
/// PostgreSQL is asked anything).
pub struct FacilityRead {
    pub id: String,
    pub query: Option<String>,
    caller: Caller,
}

impl FromRequestParts<App> for FacilityRead {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(IntoResponse::into_response)?;
        let caller = Caller::from_request_parts(parts, app)
            .await
            .map_err(IntoResponse::into_response)?;
        let RawQuery(query) = RawQuery::from_request_parts(parts, app)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(FacilityRead { id, query, caller })
    }
}

impl FacilityRead {
    /// With tokens, the region the facility's rows are read from: its region in Redis, which
    /// the caller must be granted (the queries then read only that region's rows). `None`
    /// without tokens: every row.
    pub async fn region(&self, app: &App) -> Result<Option<String>, ApiError> {
        if self.caller.0.is_none() {
            return Ok(None);
        }
        let t = app
            .0
            .store
            .facility(&self.id)
            .await
            .map_err(ApiError::RedisDown)?
            .ok_or_else(|| ApiError::UnknownFacility(self.id.clone()))?;
        self.caller.authorize_region(&t.region_id)?;
        Ok(Some(t.region_id))
    }
}

/// The token of the request, verified; `None` when tokens are off.
async fn authenticate(
    app: &App,
    parts: &Parts,
    query_allowed: bool,
) -> Result<Option<Claims>, AuthError> {
    let Some(verifier) = &app.0.verifier else {
        return Ok(None);
    };
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let token = bearer(authorization, parts.uri.query(), query_allowed)?;
    verifier.verify(token.as_deref()).await.map(Some)
}

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        Ok(Caller(authenticate(app, parts, false).await?))
    }
}

impl FromRequestParts<App> for BeaconCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        Ok(BeaconCaller(authenticate(app, parts, true).await?))
    }
}

/// A stream of the path's `{region}` and what may open it: a `?ticket=` from
/// `POST /v1/stream-tickets`, else a token in the header that grants the region. `grant`
/// is `None` when tokens are off; otherwise the stream ends when the grant expires.
pub struct StreamAccess {
    pub region: String,
    pub grant: Option<Grant>,
}

impl FromRequestParts<App> for StreamAccess {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let Path(region) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(IntoResponse::into_response)?;
        let grant = stream_grant(app, parts, &region)
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        Ok(StreamAccess { region, grant })
    }
}

/// The overview stream's access: a `?ticket=` (any regions it opens), else a token in the
/// header (every region it grants). `grant` is `None` when tokens are off (every region).
pub struct OverviewAccess {
    pub grant: Option<Grant>,
}

impl FromRequestParts<App> for OverviewAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let Some(verifier) = &app.0.verifier else {
            return Ok(OverviewAccess { grant: None });
        };
        if let Some(ticket) = query_param(parts.uri.query(), "ticket") {
            let grant = verifier.tickets().redeem_any(&ticket, now_secs())?;
            return Ok(OverviewAccess { grant: Some(grant) });
        }
        let grant = authenticate(app, parts, false).await?.map(|c| Grant {
            regions: c.granted_regions(),
            sub: c.sub,
            open_by: now_secs(),
            expires: c.exp,
        });
        Ok(OverviewAccess { grant })
    }
}

/// Of `regions`, those `grant` opens (all without tokens).
pub fn visible(grant: Option<&Grant>, regions: Vec<String>) -> Vec<String> {
    match grant {
        None => regions,
        Some(g) => regions.into_iter().filter(|r| g.allows(r)).collect(),
    }
}

async fn stream_grant(app: &App, parts: &Parts, region: &str) -> Result<Option<Grant>, AuthError> {
    let Some(verifier) = &app.0.verifier else {
        return Ok(None);
    };
    if let Some(ticket) = query_param(parts.uri.query(), "ticket") {
        return verifier
            .tickets()
            .redeem(&ticket, region, now_secs())
            .map(Some);
    }
    match authenticate(app, parts, false).await? {
        Some(c) if !c.grants_region(region) => Err(AuthError::RegionNotGranted(region.to_string())),
        Some(c) => Ok(Some(Grant {
            sub: c.sub,
            regions: vec![region.to_string()],
            open_by: now_secs(),
            expires: c.exp,
        })),
        None => Ok(None),
    }
}
