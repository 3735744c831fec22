//! The examples a downstream team starts from (`examples/`, README "Consume
//! facility-status"), each run against the local stack: the Python producer publishes
//! heartbeats straight to Kafka, the processor turns them into transitions, and the Java,
//! Python and Go consumers each print exactly those transitions. Maven artifacts and Go
//! modules are cached outside the repository (`~/.m2`, the Go module cache); builds go to
//! cargo's temporary directory.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use presence_core::config::Config;
use presence_core::Shutdown;
use presence_testkit::{python, read_to_end_until, repo_root};
use support::*;

type Transition = (String, String, i64);

/// Runs an example's command, which must exit 0; its stdout's JSON lines as transitions.
fn transitions_printed_by(what: &str, mut cmd: Command) -> BTreeSet<Transition> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run the {what} example: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the {what} example failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("the {what} example printed {l:?}: {e}"));
            (
                v["facility_id"].as_str().unwrap_or_default().to_string(),
                v["status"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

/// The Python producer example, fed JSON lines on stdin.
fn produce_with_example(c: &Config, lines: &[serde_json::Value]) {
    let mut child = Command::new(python())
        .arg(repo_root().join("examples/python/produce_heartbeats.py"))
        .args(["--bootstrap-servers", &c.kafka.brokers])
        .args(["--topic", &c.topics.heartbeats])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Python producer example (make stack installs its packages)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        for l in lines {
            writeln!(stdin, "{l}").expect("write to the producer");
        }
    }
    let out = child.wait_with_output().expect("producer exit");
    assert!(
        out.status.success(),
        "the producer example failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn beats(kind: &str) -> Vec<serde_json::Value> {
    ["E1", "E2"]
        .iter()
        .map(|f| {
            serde_json::json!({"session_id": format!("s-{f}"), "user_id": "u", "facility_id": f,
                "region_id": "r", "kind": kind})
        })
        .collect()
}

fn common_args(c: &Config) -> Vec<String> {
    [
        "--bootstrap-servers",
        &c.kafka.brokers,
        "--topic",
        &c.topics.facility_status,
        "--from-beginning",
        "--max-records",
        "4",
        "--timeout",
        "120",
    ]
    .map(String::from)
    .to_vec()
}

fn examples_dir(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_example_prints_the_transitions_the_producer_example_caused() {
    let c = setup(90_000).await;
    let shutdown = Shutdown::new();
    let processor = processor_in_process(&c, &shutdown).await;
    // Two runs, so that every END is stamped after its BEAT.
    produce_with_example(&c, &beats("BEAT"));
    read_to_end_until(
        &c,
        &c.topics.facility_status,
        Duration::from_secs(60),
        |r| r.len() >= 2,
    );
    produce_with_example(&c, &beats("END"));
    let records = read_to_end_until(
        &c,
        &c.topics.facility_status,
        Duration::from_secs(60),
        |r| r.len() >= 4,
    );
    processor.stop(Duration::from_secs(30)).await;
    assert_eq!(records.len(), 4);
    let expected: BTreeSet<Transition> = [
        ("E1", "ONLINE", 1),
        ("E1", "OFFLINE", 2),
        ("E2", "ONLINE", 1),
        ("E2", "OFFLINE", 2),
    ]
    .into_iter()
    .map(|(f, s, n)| (f.to_string(), s.to_string(), n))
    .collect();

    let mut py = Command::new(python());
    py.arg(examples_dir("python").join("consume_facility_status.py"))
        .args(common_args(&c));
    assert_eq!(transitions_printed_by("Python", py), expected);

    // Go's flag package takes -name and --name alike; pass them as they are.
    let mut go = Command::new("go");
    go.current_dir(examples_dir("go")).args(["run", "."]).args(
        common_args(&c)
            .into_iter()
            .map(|a| if a == "120" { "120s".to_string() } else { a }),
    );
    assert_eq!(transitions_printed_by("Go", go), expected);

    // Java: built with Maven into cargo's temporary directory, run from its classes.
    let build = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("examples-java");
    let status = Command::new("mvn")
        .current_dir(examples_dir("java"))
        .args(["-q", "-B", "package"])
        .arg(format!("-Dexample.build.dir={}", build.display()))
        .status()
        .expect("run mvn (make stack installs Maven)");
    assert!(status.success(), "building the Java example failed");
    let mut java = Command::new("java");
    java.current_dir(examples_dir("java"))
        .arg("-cp")
        .arg(format!(
            "{}:{}/*",
            build.join("classes").display(),
            build.join("dependency").display()
        ))
        .arg("dev.presence.examples.ConsumeFacilityStatus")
        .args(common_args(&c));
    assert_eq!(transitions_printed_by("Java", java), expected);
}
