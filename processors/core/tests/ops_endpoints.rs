//! `/metrics`, `/healthz`, `/readyz` as every long-running process serves them, on a real
//! socket bound to 127.0.0.1:0, and a clean stop on shutdown.

use presence_core::telemetry::{serve_ops, Health};
use presence_core::Shutdown;
use prometheus::{IntCounter, Registry};

#[tokio::test]
async fn serves_metrics_health_and_readiness_then_stops() {
    let registry = Registry::new();
    let counter = IntCounter::new("presence_test_events_total", "test").unwrap();
    registry.register(Box::new(counter.clone())).unwrap();
    counter.inc_by(3);
    let health = Health::new(&registry);
    health.register("kafka");
    let shutdown = Shutdown::new();
    let (addr, task) = serve_ops(
        ([127, 0, 0, 1], 0).into(),
        registry,
        health.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("presence_test_events_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("presence_dependency_up{dependency=\"kafka\"} 0"),
        "{metrics}"
    );
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let not_ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503);
    assert!(not_ready.text().await.unwrap().contains("kafka: starting"));
    health.set_ready("kafka");
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A loop that stops beating its pulse fails liveness (a zero limit: at once), with its
    // name; while it holds the pulse (a restore with its own progress check) it does not.
    let pulse = health.pulse("sessions", std::time::Duration::ZERO);
    let stuck = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(stuck.status(), 503);
    assert!(stuck
        .text()
        .await
        .unwrap()
        .contains("sessions: no progress"));
    let hold = pulse.hold();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    drop(hold);

    shutdown.trigger();
    task.await.unwrap();
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "server must be gone after shutdown"
    );
}
