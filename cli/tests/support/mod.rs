//! End-to-end helpers: isolated topics on the real broker, heartbeats produced with chosen
//! timestamps, the real `presence` binary as a child process, and `facility-status` read
//! back with read_committed.

#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use presence_core::codec::{decode, encode};
use presence_core::config::Config;
use presence_core::kafka::{base_config, consumer_config, idempotent_producer_config};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind};
use presence_testkit::oracle::Expected;
use presence_testkit::sim::SimRecord;
use presence_testkit::{check_processes, isolated_config, read_to_end, spawn_child, ChildProcess};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Heavy end-to-end tests share two cores: one at a time.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh set of topics with a short session timeout (≡ 5 mod 10 ms, see sim::generate).
pub async fn setup(timeout_ms: u64) -> Config {
    let mut c = isolated_config();
    c.processor.session_timeout = Duration::from_millis(timeout_ms);
    presence_testkit::ensure_topics(&c).await;
    c
}

/// The environment that points the `presence` binary at `c`'s topics and groups.
pub fn env_of(c: &Config, instance: &str) -> Vec<(String, String)> {
    let t = &c.topics;
    vec![
        ("KAFKA_BROKERS".into(), c.kafka.brokers.clone()),
        ("PRESENCE_TOPICS__HEARTBEATS".into(), t.heartbeats.clone()),
        (
            "PRESENCE_TOPICS__FACILITY_STATUS".into(),
            t.facility_status.clone(),
        ),
        (
            "PRESENCE_TOPICS__DEAD_LETTERS".into(),
            t.dead_letters.clone(),
        ),
        (
            "PRESENCE_TOPICS__INTERNAL_PREFIX".into(),
            t.internal_prefix.clone(),
        ),
        (
            "PRESENCE_TOPICS__HEARTBEATS_PARTITIONS".into(),
            t.heartbeats_partitions.to_string(),
        ),
        (
            "PRESENCE_TOPICS__FACILITY_PARTITIONS".into(),
            t.facility_partitions.to_string(),
        ),
        (
            "PRESENCE_PROCESSOR__SESSION_TIMEOUT".into(),
            format!("{}ms", c.processor.session_timeout.as_millis()),
        ),
        (
            "PRESENCE_PROCESSOR__FLAP_HOLD".into(),
            format!("{}ms", c.processor.flap_hold.as_millis()),
        ),
        (
            "PRESENCE_PROCESSOR__ALLOWED_LATENESS".into(),
            format!("{}ms", c.processor.allowed_lateness.as_millis()),
        ),
        (
            "PRESENCE_PROCESSOR__GROUP_ID".into(),
            c.processor.group_id.clone(),
        ),
        ("PRESENCE_PROCESSOR__INSTANCE_ID".into(), instance.into()),
        (
            "PRESENCE_PROCESSOR__OPS_LISTEN".into(),
            "127.0.0.1:0".into(),
        ),
        (
            "PRESENCE_NOTIFIER__GROUP_ID".into(),
            c.notifier.group_id.clone(),
        ),
        ("PRESENCE_SINK__GROUP_ID".into(), c.sink.group_id.clone()),
        ("PRESENCE_TELEMETRY__LOG_FILTER".into(), "warn".into()),
    ]
}

fn processor_command(c: &Config, instance: &str, extra: &[(&str, &str)]) -> Command {
    presence_command("processor", c, instance, extra)
}

/// `presence <role>` with only `c`'s settings (`env_of`), `PATH` and `extra` in its
/// environment.
pub fn presence_command(role: &str, c: &Config, instance: &str, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence"));
    cmd.arg(role)
        .env_clear()
        .envs(env_of(c, instance))
        .stdin(Stdio::null());
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// The real `presence processor`, a plain child process (its output on the test's).
/// Prefer `watched_processor`, whose unexpected exit fails the test at once.
pub fn spawn_processor(c: &Config, instance: &str, extra: &[(&str, &str)]) -> Child {
    processor_command(c, instance, extra)
        .spawn()
        .expect("spawn presence processor")
}

/// The real `presence processor` as a watched child process (see `testkit::spawn_child`):
/// exiting unless killed or stopped fails the test's next wait, with its log's end.
pub fn watched_processor(c: &Config, instance: &str, extra: &[(&str, &str)]) -> ChildProcess {
    spawn_child(
        &format!("processor-{instance}"),
        processor_command(c, instance, extra),
    )
}

/// A processor child that tests can kill or stop: a plain `Child` or a watched one.
pub trait Stoppable {
    /// kill -9, and wait for it to be gone.
    fn kill9(&mut self);
    /// SIGTERM, and its exit status within 30 s (a watched child must also exit 0).
    fn terminate(&mut self) -> std::process::ExitStatus;
}

impl Stoppable for Child {
    fn kill9(&mut self) {
        let _ = self.kill();
        let _ = self.wait();
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => {
                    let _ = self.kill();
                    let _ = self.wait();
                    panic!("the processor did not exit within 30 s of SIGTERM ({other:?})");
                }
            }
        }
    }
}

impl Stoppable for ChildProcess {
    fn kill9(&mut self) {
        ChildProcess::kill9(self);
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        ChildProcess::terminate(self, Duration::from_secs(30))
    }
}

/// kill -9 (a watched child that had died on its own fails the test).
pub fn kill9(child: &mut impl Stoppable) {
    child.kill9();
}

/// SIGTERM, then its exit within 30 s (a watched child must exit 0).
pub fn terminate(child: &mut impl Stoppable) -> std::process::ExitStatus {
    child.terminate()
}

pub async fn produce(c: &Config, records: &[SimRecord]) {
    let encoded: Vec<Encoded> = records
        .iter()
        .map(|r| Encoded {
            key: r.heartbeat.session_id.clone(),
            value: encode(&r.heartbeat),
            ts: r.ts,
            partition: None,
        })
        .collect();
    produce_encoded(c, &encoded).await;
}

/// A heartbeat already encoded (any schema version, or garbage), with its timestamp and,
/// if set, the partition it must land on (else the key's).
pub struct Encoded {
    pub key: String,
    pub value: Vec<u8>,
    pub ts: i64,
    pub partition: Option<i32>,
}

/// Produces `records` to `heartbeats` in order (idempotent producer: no duplicates, no
/// reordering within a partition).
pub async fn produce_encoded(c: &Config, records: &[Encoded]) {
    let mut pc = idempotent_producer_config(&c.kafka, "test-producer");
    pc.set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000");
    let producer: FutureProducer = pc.create().expect("producer");
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut rec = FutureRecord::to(&c.topics.heartbeats)
            .key(r.key.as_bytes())
            .payload(&r.value)
            .timestamp(r.ts);
        if let Some(p) = r.partition {
            rec = rec.partition(p);
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    rec = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    for f in pending {
        f.await.expect("delivery future").expect("delivered");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// A read_committed reader of `facility-status` from the beginning.
pub struct StatusReader {
    consumer: BaseConsumer,
    pub seen: Vec<FacilityStatus>,
}

impl StatusReader {
    pub fn new(c: &Config) -> StatusReader {
        let consumer: BaseConsumer = consumer_config(
            &c.kafka,
            "test-reader",
            &format!("{}-reader", c.processor.group_id),
        )
        .create()
        .expect("consumer");
        let md = consumer
            .fetch_metadata(Some(&c.topics.facility_status), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(&c.topics.facility_status, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        StatusReader {
            consumer,
            seen: Vec::new(),
        }
    }

    /// Reads until `done(seen)` or `limit` passes; returns whether `done` held.
    pub fn read_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[FacilityStatus]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            check_processes();
            if done(&self.seen) {
                return true;
            }
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                let s = decode::<FacilityStatus>(m.payload().expect("value")).expect("decodes");
                assert_eq!(m.key(), Some(s.facility_id.as_bytes()), "keyed by facility");
                self.seen.push(s);
            }
        }
        done(&self.seen)
    }
}

impl StatusReader {
    /// Everything committed so far (reads until 1 s without a record). Prefer
    /// `statuses_to_end`, which reads to the end offsets.
    pub fn drain(&mut self) {
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_secs(1) {
            check_processes();
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                self.seen
                    .push(decode::<FacilityStatus>(m.payload().expect("value")).expect("decodes"));
                quiet = Instant::now();
            }
        }
    }
}

/// Every `facility-status` record committed now, from the beginning of each partition to
/// its end offset (duplicates and extras included), each checked to be keyed by facility.
pub fn statuses_to_end(c: &Config) -> Vec<FacilityStatus> {
    read_to_end(c, &c.topics.facility_status, Duration::from_secs(60))
        .iter()
        .map(|m| {
            let s = decode::<FacilityStatus>(m.payload().unwrap_or_default()).unwrap_or_else(|e| {
                panic!(
                    "facility-status record at {}/{}: {e}",
                    m.partition(),
                    m.offset()
                )
            });
            assert_eq!(m.key(), Some(s.facility_id.as_bytes()), "keyed by facility");
            s
        })
        .collect()
}

/// The quiet sessions' marks the sessions changelog holds now (records under a mark key,
/// tombstones not counted), read from the beginning of each partition to its end offset.
pub fn changelog_marks(c: &Config) -> usize {
    read_to_end(c, &c.topics.sessions_changelog(), Duration::from_secs(60))
        .iter()
        .filter(|m| {
            m.payload().is_some()
                && m.key()
                    .is_some_and(presence_core::records::is_session_mark_key)
        })
        .count()
}

/// Waits (at most `within`) until both stages' groups have committed the end offset of
/// every partition of their input: the processor has consumed everything there is, so
/// whatever it would emit for it is emitted. (Stage 1 is idle once its input is consumed,
/// so stage 2's input stops growing.)
pub fn wait_consumed_to_end(c: &Config, within: Duration) {
    let stages = [
        (
            format!("{}.sessions", c.processor.group_id),
            c.topics.heartbeats.clone(),
        ),
        (
            format!("{}.facilities", c.processor.group_id),
            c.topics.session_transitions(),
        ),
    ];
    let deadline = Instant::now() + within;
    loop {
        check_processes();
        if stages
            .iter()
            .all(|(group, topic)| presence_testkit::consumed_to_end(c, group, topic))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the processor did not consume its inputs to the end within {within:?}: {:?}",
            stages
                .iter()
                .map(|(g, t)| (
                    t,
                    presence_testkit::committed_offsets(c, g, t),
                    presence_testkit::end_offsets(c, t)
                ))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn as_expected(seen: &[FacilityStatus]) -> Vec<Expected> {
    let mut v: Vec<Expected> = seen
        .iter()
        .map(|s| Expected {
            facility_id: s.facility_id.clone(),
            seq: s.seq,
            status: s.status,
            since: s.since,
            open_sessions: s.open_sessions,
            region_id: s.region_id.clone(),
        })
        .collect();
    v.sort();
    v
}

/// A readable account of how two transition lists differ (first few differences).
pub fn diff(expected: &[Expected], got: &[Expected]) -> String {
    let by = |v: &[Expected]| {
        let mut m: HashMap<(String, i64), Expected> = HashMap::new();
        for e in v {
            m.insert((e.facility_id.clone(), e.seq), e.clone());
        }
        m
    };
    let (e, g) = (by(expected), by(got));
    let mut lines = vec![format!(
        "expected {} transitions, got {}",
        expected.len(),
        got.len()
    )];
    let mut keys: Vec<_> = e.keys().chain(g.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if e.get(&k) != g.get(&k) {
            lines.push(format!(
                "{k:?}: expected {:?}, got {:?}",
                e.get(&k),
                g.get(&k)
            ));
        }
        if lines.len() > 12 {
            break;
        }
    }
    lines.join("\n")
}

#[allow(unused_imports)]
pub use presence_core::now_ms;

pub fn admin_config(c: &Config) -> rdkafka::config::ClientConfig {
    base_config(&c.kafka, "test-admin")
}

/// Starts the gateway in this process and returns its base URL once `/readyz` says so.
pub async fn start_gateway(config: &Config, shutdown: &presence_core::Shutdown) -> String {
    let running = presence_gateway::start(config.clone(), shutdown.clone())
        .await
        .expect("gateway starts");
    let base = format!("http://{}", running.addr);
    // Readiness is on the ops port, apart from the public one.
    ready(
        "gateway",
        &running.ops_addr.to_string(),
        Duration::from_secs(30),
    )
    .await;
    base
}

/// Waits until `what`'s `/readyz` on its ops listener `ops` (`127.0.0.1:9090`) answers 2xx;
/// fails the test after `within`.
pub async fn ready(what: &str, ops: &str, within: Duration) {
    presence_testkit::eventually(&format!("{what} ready on {ops}"), within, || async {
        reqwest::get(format!("http://{ops}/readyz"))
            .await
            .ok()?
            .status()
            .is_success()
            .then_some(())
    })
    .await;
}

/// The seed of this run: `PRESENCE_TEST_SEED` if set (to repeat a run), else random. Printed
/// (libtest shows it with a failure); name it in every assertion.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("PRESENCE_TEST_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("PRESENCE_TEST_SEED={v:?} is not a u64: {e}")),
        Err(_) => rand::random::<u64>() % 1_000_000_000,
    };
    eprintln!("PRESENCE_TEST_SEED={seed} (set it to repeat this run)");
    seed
}

/// What was committed when an instance was killed: fewer transitions than the oracle's (the
/// kill landed mid-work), and, facility by facility, exactly the oracle's first ones (nothing
/// doubled, nothing skipped, nothing the oracle does not have). Returns how many.
pub fn check_committed_at_kill(c: &Config, expected: &[Expected], what: &str) -> usize {
    let committed = committed_at_kill(c, expected, what);
    assert!(
        committed < expected.len(),
        "{what}: the output was already complete ({committed} transitions) when the kill landed, so it proved nothing; make the backlog larger"
    );
    committed
}

/// [`check_committed_at_kill`] without the demand that the output be incomplete: how many
/// transitions were committed, each facility's exactly the oracle's first ones.
pub fn committed_at_kill(c: &Config, expected: &[Expected], what: &str) -> usize {
    use std::collections::BTreeMap;
    let committed = as_expected(&statuses_to_end(c));
    let mut by_facility: BTreeMap<&str, Vec<&Expected>> = BTreeMap::new();
    for e in &committed {
        by_facility.entry(&e.facility_id).or_default().push(e);
    }
    let mut oracle_of: BTreeMap<&str, Vec<&Expected>> = BTreeMap::new();
    for e in expected {
        oracle_of.entry(&e.facility_id).or_default().push(e);
    }
    for (facility, got) in by_facility {
        let want = oracle_of.get(facility).map(Vec::as_slice).unwrap_or(&[]);
        assert!(
            got.len() <= want.len() && got[..] == want[..got.len()],
            "{what}: committed transitions of {facility} are not the oracle's first {}:\ncommitted {got:?}\noracle {want:?}",
            got.len()
        );
    }
    committed.len()
}

/// Waits until every expected transition arrived, then until both stages consumed their
/// inputs to the end offsets (so anything a restored instance would still emit, such as a
/// duplicate, has been emitted), stops every instance with SIGTERM (each must exit 0), reads
/// `facility-status` to its end offsets and compares the whole multiset with the oracle.
pub fn finish(
    c: &Config,
    expected: &[Expected],
    mut reader: StatusReader,
    instances: Vec<ChildProcess>,
    what: &str,
) {
    let done = reader.read_until(Duration::from_secs(120), |s| s.len() >= expected.len());
    assert!(
        done,
        "{what}: output incomplete after 120 s\n{}",
        diff(expected, &as_expected(&reader.seen))
    );
    wait_consumed_to_end(c, Duration::from_secs(60));
    for mut p in instances {
        terminate(&mut p);
    }
    let got = as_expected(&statuses_to_end(c));
    presence_core::topics::remove_local_state(c);
    assert!(got == expected, "{what}: {}", diff(expected, &got));
}

/// Deletes every topic and consumer group of `c` (all named under one unique id), and the
/// local state its processors left under `processor.state_dir`, when dropped, so a test
/// leaves nothing behind, also when it fails.
pub struct Cleanup(Config, Vec<String>);

impl Cleanup {
    pub fn new(c: &Config) -> Cleanup {
        Cleanup(c.clone(), Vec::new())
    }

    /// Deletes these consumer groups too (an outside consumer's, say).
    pub fn with_groups(mut self, groups: &[String]) -> Cleanup {
        self.1.extend_from_slice(groups);
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let c = &self.0;
        presence_core::topics::remove_local_state(c);
        let Some(id) = c.topics.heartbeats.strip_suffix("-heartbeats") else {
            return;
        };
        let Ok(admin) = admin_config(c).create::<AdminClient<DefaultClientContext>>() else {
            eprintln!("cleanup: no admin client; topics under {id} stay");
            return;
        };
        let topics: Vec<String> = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|md| {
                md.topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .filter(|n| n.starts_with(id))
                    .collect()
            })
            .unwrap_or_default();
        let mut groups = vec![
            format!("{}.sessions", c.processor.group_id),
            format!("{}.facilities", c.processor.group_id),
            format!("{}-reader", c.processor.group_id),
        ];
        groups.extend(self.1.iter().cloned());
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
        let deleted = futures::executor::block_on(async {
            let t = admin.delete_topics(&topic_refs, &opts).await;
            let g = admin.delete_groups(&group_refs, &opts).await;
            (t, g)
        });
        if let (Err(e), _) | (_, Err(e)) = deleted {
            eprintln!("cleanup of {id}: {e}");
        }
    }
}

/// The processor as a task of this test (`testkit::spawn_process`), started once every topic
/// of `c` is in the broker's metadata: a topic just created may take a moment to show, and
/// the processor refuses to start without its topics.
pub async fn processor_in_process(
    c: &Config,
    shutdown: &presence_core::Shutdown,
) -> presence_testkit::Process {
    let admin = admin_config(c);
    let consumer: BaseConsumer = admin.create().expect("metadata client");
    let names = [
        c.topics.heartbeats.clone(),
        c.topics.facility_status.clone(),
        c.topics.session_transitions(),
        c.topics.sessions_changelog(),
        c.topics.facilities_changelog(),
    ];
    presence_testkit::eventually(
        "the topics in the broker's metadata",
        Duration::from_secs(30),
        || {
            let ok = names.iter().all(|t| {
                consumer
                    .fetch_metadata(Some(t), Duration::from_secs(5))
                    .ok()
                    .and_then(|md| {
                        md.topics()
                            .first()
                            .map(|t| t.error().is_none() && !t.partitions().is_empty())
                    })
                    .unwrap_or(false)
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
    let pc = c.clone();
    presence_testkit::spawn_process("processor", shutdown, move |s| {
        presence_processor::run(pc, s)
    })
}

/// A heartbeat of user `u` in region `r`: what most tests send.
pub fn heartbeat(session: &str, facility: &str, kind: HeartbeatKind) -> Heartbeat {
    Heartbeat {
        session_id: session.into(),
        user_id: "u".into(),
        facility_id: facility.into(),
        region_id: "r".into(),
        kind,
        client_sent_at: None,
        client_version: None,
    }
}

/// The sum of the samples of `metric` whose line contains `having` (`""`: every label set)
/// on the process whose ops port is `ops`; 0 when the page cannot be read (not up yet).
pub async fn metric_sum(ops: u16, metric: &str, having: &str) -> f64 {
    let Ok(page) = reqwest::get(format!("http://127.0.0.1:{ops}/metrics")).await else {
        return 0.0;
    };
    let text = page.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter(|l| l.contains(having))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `metric_sum(ops, metric, having)` until it is above 0 (returned), at most `within`;
/// a watched child that died fails the test at once.
pub async fn wait_metric(
    ops: u16,
    metric: &str,
    having: &str,
    within: Duration,
    what: &str,
) -> f64 {
    wait_metric_above(ops, metric, having, 0.0, within, what).await
}

/// [`wait_metric`] until the sum is above `floor`.
pub async fn wait_metric_above(
    ops: u16,
    metric: &str,
    having: &str,
    floor: f64,
    within: Duration,
    what: &str,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        presence_testkit::check_processes();
        let n = metric_sum(ops, metric, having).await;
        if n > floor {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no {metric}{{{having}}} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON body `request` answers with; `None` if it cannot be sent or the body is not
/// JSON (for polling with `eventually`).
pub async fn json_of(request: reqwest::RequestBuilder) -> Option<serde_json::Value> {
    request.send().await.ok()?.json().await.ok()
}

/// The oracle over records read back from `heartbeats` as `(partition, offset, record)`,
/// taken in that order, as the processor met them (a beat written after its session's END,
/// or stamped before the record ahead of it, counts as the processor counts it; sorting by
/// timestamp would hide exactly those). No flap hold, nothing refused.
pub fn oracle_as_read(
    records: &[(i32, i64, SimRecord)],
    timeout_ms: i64,
) -> Vec<presence_testkit::oracle::Expected> {
    let mut placed: Vec<(i32, i64, presence_testkit::oracle::Placed)> = records
        .iter()
        .map(|(p, o, r)| {
            (
                *p,
                *o,
                presence_testkit::oracle::Placed {
                    partition: *p,
                    record: r.clone(),
                    wall: None,
                },
            )
        })
        .collect();
    placed.sort_by_key(|(p, o, _)| (*p, *o));
    let placed: Vec<presence_testkit::oracle::Placed> =
        placed.into_iter().map(|(_, _, x)| x).collect();
    presence_testkit::oracle::oracle_placed(
        &placed,
        &presence_testkit::oracle::OracleConfig {
            timeout_ms,
            flap_hold_ms: 0,
            reject_after: i64::MAX,
            max_future_ms: i64::MAX,
        },
    )
}

/// Runs `deploy/stack.sh args` for a private three-node cluster whose state lives in `dir`
/// and whose first client port is `base` (`cluster-up`, `cluster-node-kill 2`, ...); a
/// failure fails the test with the script's output.
pub fn cluster_stack(dir: &std::path::Path, base: u16, args: &[&str]) {
    let script = presence_testkit::repo_root().join("deploy/stack.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("PRESENCE_STACK_DIR", dir)
        .env("CLUSTER_PORT", base.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "stack.sh {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A three-node cluster of a test's own (`deploy/stack.sh cluster-up` with a directory and
/// six ports of its own), stopped and removed on drop.
pub struct Cluster {
    dir: std::path::PathBuf,
    base: u16,
}

impl Cluster {
    pub fn start() -> Cluster {
        let cluster = Cluster {
            dir: std::env::temp_dir().join(presence_testkit::unique("cluster")),
            base: six_free_ports(),
        };
        cluster.stack(&["cluster-up"]);
        cluster
    }

    /// `KAFKA_BROKERS` for it: the three nodes' client ports.
    pub fn brokers(&self) -> String {
        (1..=3)
            .map(|i| format!("127.0.0.1:{}", self.port(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `node`'s (1..3) client port.
    pub fn port(&self, node: u8) -> u16 {
        self.base + 2 * (node as u16 - 1)
    }

    pub fn stack(&self, args: &[&str]) {
        cluster_stack(&self.dir, self.base, args);
    }

    /// kill -9 of node `node` (1..3).
    pub fn kill(&self, node: u8) {
        self.stack(&["cluster-node-kill", &node.to_string()]);
    }

    /// Starts node `node` again (returns once its process runs; it rejoins on its own).
    pub fn restart(&self, node: u8) {
        self.stack(&["cluster-node-up", &node.to_string()]);
    }

    /// SIGTERM to node `node` (a clean stop), without waiting for it to exit.
    pub fn terminate(&self, node: u8) {
        let pid = self.dir.join(format!("cluster/node-{node}/kafka.pid"));
        if let Ok(pid) = std::fs::read_to_string(&pid) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.trim()).status();
        }
    }

    /// The active controller, from the nodes' `quorum-state` files (the newest epoch).
    pub fn controller(&self) -> Option<u8> {
        (1..=3u8)
            .filter_map(|i| {
                let f = self.dir.join(format!(
                    "cluster/node-{i}/data/__cluster_metadata-0/quorum-state"
                ));
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok()?;
                Some((v["leaderEpoch"].as_i64()?, v["leaderId"].as_i64()?))
            })
            // -1: no leader known to that node (an election under way).
            .filter(|(_, id)| *id >= 1)
            .max()
            .and_then(|(_, id)| u8::try_from(id).ok())
            .filter(|id| (1..=3).contains(id))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stack(&["cluster-down"]);
        if std::thread::panicking() {
            self.keep_logs();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    /// A failed test's evidence: the nodes' logs (KRaft elections, ISR changes, request
    /// timeouts) copied next to the removed directory, whose data is not worth keeping.
    fn keep_logs(&self) {
        let mut kept = self.dir.clone().into_os_string();
        kept.push("-logs");
        let kept = std::path::PathBuf::from(kept);
        let _ = std::fs::create_dir_all(&kept);
        for node in 1..=3 {
            for name in ["server.log", "stdout.log"] {
                let from = self.dir.join(format!("cluster/node-{node}/{name}"));
                let _ = std::fs::copy(&from, kept.join(format!("node-{node}-{name}")));
            }
        }
        eprintln!("cluster: the nodes' logs are kept in {}", kept.display());
    }
}

/// A base port whose next five are free too (each node takes a client and a controller port).
fn six_free_ports() -> u16 {
    for _ in 0..100 {
        let base = presence_testkit::free_port();
        if base > 65_000 {
            continue;
        }
        if (1..6).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no six consecutive free ports on 127.0.0.1");
}

/// Deletes every Redis key under the test's own prefix (what a notifier wrote for it); a
/// Redis that does not answer leaves them, which only costs space.
pub async fn delete_redis_keys(c: &Config) {
    use redis::AsyncCommands;
    let Ok(client) = presence_core::delivery::redis_client(&c.redis) else {
        return;
    };
    let Ok(mut r) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = r
        .keys(format!("{}:*", c.redis.key_prefix))
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = r.del(keys).await;
    }
}

/// The schema registry `make stack` runs (Apicurio's Confluent-compatible API), or the one
/// `PRESENCE_TEST_REGISTRY_URL` names.
pub fn registry_url() -> String {
    std::env::var("PRESENCE_TEST_REGISTRY_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:8081/apis/ccompat/v7".into())
}

/// Isolated topics with the `confluent` framing on the test registry.
pub async fn setup_confluent(timeout_ms: u64) -> Config {
    let mut c = setup(timeout_ms).await;
    c.schema_registry.framing = presence_core::registry::Framing::Confluent;
    c.schema_registry.url = registry_url();
    assert!(
        c.schema_registry.problems().is_empty(),
        "{:?}",
        c.schema_registry.problems()
    );
    c
}

/// A client of `c`'s registry.
pub fn registry_client(c: &Config) -> presence_core::registry::RegistryClient {
    presence_core::registry::RegistryClient::new(&c.schema_registry)
        .expect("registry client")
        .expect("a registry is configured")
}

/// Deletes the value subjects of `c`'s public topics from the test registry when dropped
/// (also when the test fails), on a runtime of its own. Always through the stack's registry
/// directly, whatever route (a proxy) the test itself took.
pub struct Subjects(Config);

impl Subjects {
    pub fn new(c: &Config) -> Subjects {
        let mut c = c.clone();
        c.schema_registry = presence_core::registry::SchemaRegistryConfig {
            url: registry_url(),
            ..Default::default()
        };
        Subjects(c)
    }
}

impl Drop for Subjects {
    fn drop(&mut self) {
        use presence_core::registry::value_subject;
        let c = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = registry_client(&c);
                for topic in [&c.topics.heartbeats, &c.topics.facility_status] {
                    if let Err(e) = client.delete_subject(&value_subject(topic)).await {
                        eprintln!("cleaning up subject {}: {e}", value_subject(topic));
                    }
                }
            })
        })
        .join();
    }
}
