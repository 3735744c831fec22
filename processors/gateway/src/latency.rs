//! The request-latency histogram, `presence_gateway_request_duration_seconds{route, method,
//! status}`, as one middleware layer around every route: handlers know nothing of it.
//!
//! Labels stay bounded: `route` is the matched route template (`/v1/facilities/{id}`, never
//! the id) or `unmatched`, `method` one of the few the API answers (others are `other`),
//! `status` the class (`2xx`, `4xx`, `5xx`...). The time is up to the response's head: a
//! stream counts until it opens, not while it runs.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use prometheus::HistogramVec;

/// `router` with every request timed into `histogram`.
pub fn layer(router: Router, histogram: HistogramVec) -> Router {
    router.layer(middleware::from_fn_with_state(histogram, time_request))
}

async fn time_request(
    State(histogram): State<HistogramVec>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = status_class(response.status().as_u16());
    histogram
        .with_label_values(&[&route, method, status])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use prometheus::{Encoder, Registry, TextEncoder};
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_request_is_timed_by_route_template_never_by_id() {
        let registry = Registry::new();
        let histogram = presence_core::metrics::histogram_vec(
            &registry,
            "presence_gateway_request_duration_seconds",
            "test",
            &["route", "method", "status"],
            &[0.1],
        );
        let app = layer(
            Router::new().route("/v1/facilities/{id}", get(|| async { "ok" })),
            histogram,
        );
        for uri in ["/v1/facilities/a", "/v1/facilities/b", "/nope"] {
            let r = app
                .clone()
                .oneshot(Request::get(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert!(r.status().is_success() || r.status() == 404);
        }
        let r = app
            .clone()
            .oneshot(
                Request::builder()
                    .method("PATCH")
                    .uri("/v1/facilities/a")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        let count = |labels: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "presence_gateway_request_duration_seconds_count{{{labels}}} "
                    ))
                })
                .unwrap_or("0")
                .to_string()
        };
        assert_eq!(
            count("method=\"GET\",route=\"/v1/facilities/{id}\",status=\"2xx\""),
            "2",
            "{text}"
        );
        assert_eq!(
            count("method=\"other\",route=\"/v1/facilities/{id}\",status=\"4xx\""),
            "1",
            "{text}"
        );
        assert!(!text.contains("facilities/a"), "no ids in labels: {text}");
    }
}
