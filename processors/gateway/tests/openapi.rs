//! `GET /openapi.json`: the document a running gateway serves is valid OpenAPI 3.1 (checked
//! by Python's `openapi-spec-validator`), names exactly the endpoints of the contract
//! (`docs/DESIGN.md`, "HTTP endpoints"), and describes what the gateway really answers:
//! every operation is called, and its status, content type and body are checked against
//! the document with a JSON Schema validator.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use presence_core::config::AuthMode;
use presence_core::{Secret, Shutdown};
use presence_testkit::{isolated_config, python, repo_root};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-test-secret-test-secret-123";

fn token(sub: &str, region: &str) -> String {
    let exp = (presence_core::now_ms() / 1000 + 600) as u64;
    support::hs256_token(SECRET, sub, "f", region, exp)
}

/// `(METHOD, path)` of every row of the endpoints table in `docs/DESIGN.md`.
fn contract_endpoints() -> BTreeSet<(String, String)> {
    let design = std::fs::read_to_string(repo_root().join("docs/DESIGN.md")).expect("DESIGN.md");
    let section = design
        .split("## HTTP endpoints")
        .nth(1)
        .expect("docs/DESIGN.md has a section '## HTTP endpoints'");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|line| {
            let cell = line.strip_prefix("| `")?;
            let (method, rest) = cell.split_once(' ')?;
            let path = rest.split('`').next()?;
            Some((method.to_string(), path.split('?').next()?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_valid_openapi_3_1_and_describes_every_answer() {
    let mut config = isolated_config();
    config.gateway.auth = AuthMode::Jwt;
    config.gateway.jwt_secret = Secret::new(SECRET);
    let shutdown = Shutdown::new();
    let running = presence_gateway::start(config, shutdown.clone())
        .await
        .expect("gateway starts");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");

    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("JSON");

    // The document names exactly the contract's endpoints.
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    assert_eq!(
        documented,
        contract_endpoints(),
        "the document and docs/DESIGN.md differ"
    );

    // Every operation is called: without a token, with one, and with what it refuses.
    let good = token("u1", "north");
    let mut samples = Vec::new();
    for (method, template) in &documented {
        let path = template
            .replace("{region}", "north")
            .replace("{id}", "f-unknown");
        let mut calls =
            vec![http.request(method.parse().expect("method"), format!("{base}{path}"))];
        let authed = |r: reqwest::RequestBuilder| r.bearer_auth(&good);
        calls.push(authed(
            http.request(method.parse().expect("method"), format!("{base}{path}")),
        ));
        match (method.as_str(), template.as_str()) {
            ("POST", "/v1/heartbeats") => {
                for body in [
                    json!({}),
                    json!({"session_id": "s", "facility_id": "other"}),
                ] {
                    calls.push(authed(http.post(format!("{base}{path}"))).json(&body));
                }
                calls.push(
                    authed(http.post(format!("{base}{path}")))
                        .header("content-type", "application/xml")
                        .body("<beat/>"),
                );
            }
            ("POST", "/v1/stream-tickets") => {
                calls.push(
                    authed(http.post(format!("{base}{path}"))).json(&json!({"regions": ["south"]})),
                );
                calls.push(
                    authed(http.post(format!("{base}{path}"))).json(&json!({"regions": "north"})),
                );
            }
            ("GET", "/v1/facilities/{id}/history") => {
                calls.push(authed(http.get(format!("{base}{path}?from=yesterday"))));
            }
            ("GET", "/v1/regions/{region}/facilities") => {
                calls.push(authed(
                    http.get(format!("{base}/v1/regions/south/facilities")),
                ));
            }
            _ => {}
        }
        for call in calls {
            let r = call
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            // A stream stays open: its status and headers are enough.
            let body = if content_type.starts_with("application/json") {
                Some(r.json::<Value>().await.expect("JSON body"))
            } else {
                None
            };
            samples.push(json!({
                "method": method.to_lowercase(), "path": template, "status": status,
                "content_type": content_type, "body": body,
            }));
        }
    }
    let statuses: BTreeSet<u64> = samples
        .iter()
        .filter_map(|s| s["status"].as_u64())
        .collect();
    for expected in [200, 400, 401, 403, 404, 415] {
        assert!(
            statuses.contains(&expected),
            "no answer was {expected}: {statuses:?}"
        );
    }

    let dir = std::env::temp_dir().join(presence_testkit::unique("openapi"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("doc.json"), doc.to_string()).expect("write doc");
    std::fs::write(
        dir.join("samples.json"),
        Value::from(samples.clone()).to_string(),
    )
    .expect("write samples");
    let out = std::process::Command::new(python())
        .arg(repo_root().join("processors/gateway/tests/openapi_check.py"))
        .arg(dir.join("doc.json"))
        .arg(dir.join("samples.json"))
        .output()
        .expect("python runs (PRESENCE_TEST_PYTHON, deploy/stack.sh venv-python)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "openapi_check.py failed (is openapi-spec-validator installed? deploy/python-requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the checker's report");
    assert_eq!(report["version"], "3.1.0");
    assert_eq!(
        report["errors"],
        json!([]),
        "{} answers checked",
        samples.len()
    );

    shutdown.trigger();
    running.wait().await;
}
