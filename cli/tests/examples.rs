//! The examples a downstream team starts from (`examples/`, README "Consume
//! facility-status"), each run against the local stack: the Python producer publishes
//! heartbeats straight to Kafka, the processor turns them into transitions, and the Java,
//! Python and Go consumers each print exactly those transitions, once from a topic in the
//! single-object framing and once from a topic that switched to the Schema Registry framing
//! half-way (both framings in one run); there the Java consumer built on Apicurio's own Avro
//! deserializer prints the transitions in the registry framing. Maven artifacts and Go
//! modules are cached outside the repository (`~/.m2`, the Go module cache); builds go to
//! cargo's temporary directory.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard keeps the two end-to-end tests (and their one Maven build directory) apart.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use presence_core::codec::confluent_id;
use presence_core::config::Config;
use presence_core::{topics, Shutdown};
use presence_testkit::{python, read_to_end_until, repo_root};
use rdkafka::message::Message;
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

/// What the producer example's beats cause: each facility online, then offline.
fn expected() -> BTreeSet<Transition> {
    [
        ("E1", "ONLINE", 1),
        ("E1", "OFFLINE", 2),
        ("E2", "ONLINE", 1),
        ("E2", "OFFLINE", 2),
    ]
    .into_iter()
    .map(|(f, s, n)| (f.to_string(), s.to_string(), n))
    .collect()
}

/// Runs the processor while the producer example sends a BEAT and then an END per facility
/// (two runs, so that every END is stamped after its BEAT): on `first` for the BEATs, then,
/// if `then` frames differently, restarted on `then` for the ENDs (a framing switched
/// under a running topic). Returns the four records written to `facility-status`, as bytes,
/// in offset order per partition.
async fn transitions_through_the_processor(first: &Config, then: &Config) -> Vec<Vec<u8>> {
    let status = &first.topics.facility_status;
    let shutdown = Shutdown::new();
    let mut processor = processor_in_process(first, &shutdown).await;
    produce_with_example(first, &beats("BEAT"));
    read_to_end_until(first, status, Duration::from_secs(60), |r| r.len() >= 2);
    if then.schema_registry.framing != first.schema_registry.framing {
        processor.stop(Duration::from_secs(30)).await;
        processor = processor_in_process(then, &Shutdown::new()).await;
    }
    produce_with_example(then, &beats("END"));
    let records = read_to_end_until(then, status, Duration::from_secs(60), |r| r.len() >= 4);
    processor.stop(Duration::from_secs(30)).await;
    assert_eq!(records.len(), 4);
    records
        .iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect()
}

/// The options every consumer example takes, with a consumer group of this test's (deleted
/// by `Cleanup`) where the example uses one.
fn common_args(c: &Config, group: Option<&str>, max_records: usize) -> Vec<String> {
    let max_records = max_records.to_string();
    let mut args: Vec<String> = [
        "--bootstrap-servers",
        &c.kafka.brokers,
        "--topic",
        &c.topics.facility_status,
        "--from-beginning",
        "--max-records",
        &max_records,
        "--timeout",
        "120",
    ]
    .map(String::from)
    .to_vec();
    if let Some(g) = group {
        args.extend(["--group-id".to_string(), g.to_string()]);
    }
    args
}

fn example_group(c: &Config, language: &str) -> String {
    format!("{}-example-{language}", c.processor.group_id)
}

fn examples_dir(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

/// The Java examples, built once per test run with Maven into cargo's temporary directory;
/// the runtime classpath. The settings file mirrors the repositories that Apicurio's POMs
/// declare to Maven Central (the only one these machines reach), as the stack's registry
/// build does.
fn java_classpath() -> &'static str {
    static BUILT: OnceLock<String> = OnceLock::new();
    BUILT.get_or_init(|| {
        let build = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("examples-java");
        let status = Command::new("mvn")
            .current_dir(examples_dir("java"))
            .args(["-q", "-B", "package", "-s"])
            .arg(repo_root().join("deploy/registry/settings.xml"))
            .arg(format!("-Dexample.build.dir={}", build.display()))
            .status()
            .expect("run mvn (make stack installs Maven)");
        assert!(status.success(), "building the Java examples failed");
        format!(
            "{}:{}/*",
            build.join("classes").display(),
            build.join("dependency").display()
        )
    })
}

fn java_example(main_class: &str) -> Command {
    let mut java = Command::new("java");
    java.current_dir(examples_dir("java"))
        .arg("-cp")
        .arg(java_classpath())
        .arg(format!("dev.presence.examples.{main_class}"));
    java
}

/// Go's flag package takes -name and --name alike; its timeout is a duration.
fn go(c: &Config) -> Command {
    let mut go = Command::new("go");
    go.current_dir(examples_dir("go")).args(["run", "."]).args(
        common_args(c, None, 4)
            .into_iter()
            .map(|a| if a == "120" { "120s".to_string() } else { a }),
    );
    go
}

#[tokio::test(flavor = "multi_thread")]
async fn every_example_prints_the_transitions_the_producer_example_caused() {
    let _one = serial();
    let c = setup(90_000).await;
    let groups = [example_group(&c, "python"), example_group(&c, "java")];
    let _cleanup = Cleanup::new(&c).with_groups(&groups);
    let values = transitions_through_the_processor(&c, &c).await;
    for v in &values {
        assert_eq!(&v[..2], [0xC3, 0x01], "single-object framing: {v:02x?}");
    }

    let mut py = Command::new(python());
    py.arg(examples_dir("python").join("consume_facility_status.py"))
        .args(common_args(&c, Some(&groups[0]), 4));
    assert_eq!(transitions_printed_by("Python", py), expected());

    assert_eq!(transitions_printed_by("Go", go(&c)), expected());

    let mut java = java_example("ConsumeFacilityStatus");
    java.args(common_args(&c, Some(&groups[1]), 4));
    assert_eq!(transitions_printed_by("Java", java), expected());
}

/// The processor writes the ONLINE transitions single-object, then is restarted with the
/// Schema Registry framing (`schema_registry.framing = "confluent"`) for the OFFLINE ones: a
/// topic holding both, as after a framing switch. Every example reads both in one run, the
/// Go and Java ones fetching each writer schema by id from the stack's registry's Confluent
/// API themselves, the Python one with Confluent's `AvroDeserializer`. The second Java one,
/// Apicurio's `AvroKafkaDeserializer` in its Confluent-compatible mode (4-byte content ids),
/// reads the registry framing only: it prints the two OFFLINE transitions and skips the rest.
#[tokio::test(flavor = "multi_thread")]
async fn every_example_reads_a_topic_that_switched_to_the_registry_framing() {
    let _one = serial();
    let confluent = setup_confluent(90_000).await;
    let mut single = confluent.clone();
    single.schema_registry.framing = presence_core::registry::Framing::SingleObject;
    let c = &confluent;
    let groups = [
        example_group(c, "python"),
        example_group(c, "java"),
        example_group(c, "apicurio"),
    ];
    let _cleanup = Cleanup::new(c).with_groups(&groups);
    let _subjects = Subjects::new(c);
    topics::register_subjects(c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let values = transitions_through_the_processor(&single, c).await;
    let framed = values.iter().filter(|v| confluent_id(v).is_some()).count();
    let single_object = values.iter().filter(|v| v[..2] == [0xC3, 0x01]).count();
    assert_eq!((single_object, framed), (2, 2), "{values:02x?}");
    let registry = registry_url();

    let mut py = Command::new(python());
    py.arg(examples_dir("python").join("consume_facility_status.py"))
        .args(common_args(c, Some(&groups[0]), 4))
        .args(["--registry-url", &registry]);
    assert_eq!(transitions_printed_by("Python", py), expected());

    let mut go = go(c);
    go.args(["-registry-url", &registry]);
    assert_eq!(transitions_printed_by("Go", go), expected());

    let mut java = java_example("ConsumeFacilityStatus");
    java.args(common_args(c, Some(&groups[1]), 4))
        .args(["--registry-url", &registry]);
    assert_eq!(transitions_printed_by("Java", java), expected());

    // Apicurio's serde speaks Apicurio's own API, beside the Confluent one.
    let apicurio = registry.replace("/apis/ccompat/v7", "/apis/registry/v2");
    assert_ne!(apicurio, registry, "an Apicurio registry URL: {registry}");
    let mut serde = java_example("ConsumeWithApicurioSerde");
    serde
        .args(common_args(c, Some(&groups[2]), 2))
        .args(["--registry-url", &apicurio]);
    let offline: BTreeSet<Transition> = expected()
        .into_iter()
        .filter(|(_, status, _)| status == "OFFLINE")
        .collect();
    assert_eq!(
        transitions_printed_by("Java (Apicurio serde)", serde),
        offline
    );
}
