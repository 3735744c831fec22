//! Benchmarks of the delivery side, each on topics, keys and a schema of its own:
//!
//! - `sink`: transitions/s from `facility-status` into PostgreSQL, against a plain
//!   read_committed consumer of the same records (the Kafka ceiling), measured in the same run.
//! - `fanout`: N SSE clients on one region; from the notifier's PUBLISH to receipt by every
//!   client (p50/p99 over all client × event pairs).

use std::time::{Duration, Instant};

use futures::StreamExt;
use presence_core::codec::encode;
use presence_core::config::Config;
use presence_core::records::{FacilityStatus, Status};
use presence_core::Shutdown;
use presence_processor::bench::median;
use presence_processor::measured::{mib, Processor as Measured, Role};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio_postgres::NoTls;

fn isolate(config: &Config, what: &str) -> Config {
    config.isolated(&format!("bench-{what}-{}", presence_core::now_ms()))
}

fn transition(i: usize, seq: i64) -> FacilityStatus {
    FacilityStatus {
        facility_id: format!("facility-{i:07}"),
        region_id: format!("region-{}", i % 20),
        status: if seq % 2 == 1 {
            Status::Online
        } else {
            Status::Offline
        },
        open_sessions: (seq % 2) as i32,
        since: 1_764_201_600_000 + seq * 1000,
        seq,
        emitted_at: presence_core::now_ms(),
        previous_since: None,
    }
}

/// Sink throughput: `transitions` records (10 per facility) into PostgreSQL, `runs` times.
pub async fn sink(config: &Config, transitions: usize, runs: usize) -> anyhow::Result<String> {
    let mut report = String::new();
    let mut sink_rates = Vec::new();
    let mut ceiling_rates = Vec::new();
    let mut sustained_rates = Vec::new();
    for run in 0..runs.max(1) {
        let c = isolate(config, "sink");
        let _topics = presence_core::topics::Throwaway::of(&c);
        presence_core::topics::ensure(&c).await?;
        let producer: ThreadedProducer<_> =
            presence_core::kafka::idempotent_producer_config(&c.kafka, "bench")
                .set("linger.ms", "20")
                .create()?;
        let facilities = (transitions / 10).max(1);
        for seq in 1..=10i64 {
            for i in 0..facilities {
                let t = transition(i, seq);
                let bytes = encode(&t);
                let record = BaseRecord::<str, [u8]>::to(&c.topics.facility_status)
                    .key(&t.facility_id)
                    .payload(&bytes);
                presence_core::kafka::send_when_room(&producer, record, None)
                    .map_err(|e| anyhow::anyhow!("producing the benchmark's transitions: {e}"))?;
            }
        }
        producer.flush(Duration::from_secs(60))?;
        let total = facilities * 10;

        // The ceiling: a plain read_committed consumer of the same records.
        let started = Instant::now();
        let consumer: BaseConsumer = presence_core::kafka::consumer_config(
            &c.kafka,
            "bench",
            &format!("{}-plain", c.sink.group_id),
        )
        .set("fetch.wait.max.ms", "10")
        .create()?;
        consumer.subscribe(&[&c.topics.facility_status])?;
        let mut read = 0;
        while read < total {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                m?;
                read += 1;
            }
        }
        let ceiling = total as f64 / started.elapsed().as_secs_f64();

        let (client, connection) = tokio_postgres::connect(c.database.url.expose(), NoTls).await?;
        tokio::spawn(connection);
        // The sink as operators run it: its own process, whose memory is read from /proc.
        let started = Instant::now();
        let sink = {
            let c = c.clone();
            tokio::task::spawn_blocking(move || {
                Measured::start_as(
                    Role::Sink,
                    &presence_processor::measured::this_binary()?,
                    &c,
                    Duration::from_secs(60),
                )
            })
            .await??
        };
        // Progress from the sink group's committed offsets: the sink commits a batch's
        // offsets only after PostgreSQL took the whole batch, so they count transitions
        // durably written, and asking the group coordinator costs PostgreSQL nothing. (Until
        // issue 13 this polled `count(*)` of the history every 20 ms: a scan of up to all
        // the rows on the server the sink was writing to, competing with it.)
        let offsets: BaseConsumer =
            presence_core::kafka::consumer_config(&c.kafka, "bench-offsets", &c.sink.group_id)
                .create()?;
        let mut ends = rdkafka::TopicPartitionList::new();
        let mut end_of = std::collections::BTreeMap::new();
        for p in 0..c.topics.facility_partitions {
            let (_, high) =
                offsets.fetch_watermarks(&c.topics.facility_status, p, Duration::from_secs(10))?;
            ends.add_partition(&c.topics.facility_status, p);
            end_of.insert(p, high);
        }
        let mut tenth: Option<(Instant, usize)> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let committed = tokio::task::block_in_place(|| {
                offsets.committed_offsets(ends.clone(), Duration::from_secs(10))
            });
            if let Ok(committed) = committed {
                let at: std::collections::BTreeMap<i32, i64> = committed
                    .elements()
                    .iter()
                    .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(0).max(0)))
                    .collect();
                let n = at.values().sum::<i64>() as usize;
                if tenth.is_none() && n >= total / 10 {
                    tenth = Some((Instant::now(), n));
                }
                if end_of
                    .iter()
                    .all(|(p, high)| at.get(p).is_some_and(|o| o >= high))
                {
                    break;
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the sink did not write {total} transitions within 600 s"
            );
        }
        let elapsed = started.elapsed().as_secs_f64();
        let sustained = tenth.map_or(f64::NAN, |(at, n)| {
            (total - n) as f64 / at.elapsed().as_secs_f64()
        });
        let history = format!(
            "SELECT count(*) FROM \"{}\".facility_transitions",
            c.database.schema
        );
        let written = client.query_one(&history, &[]).await?.get::<_, i64>(0) as usize;
        anyhow::ensure!(
            written == total,
            "the sink committed every offset, but the history holds {written} of {total} transitions"
        );
        let (memory, sampled_peak) = sink.memory();
        tokio::task::spawn_blocking(move || sink.stop()).await??;
        client
            .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", c.database.schema))
            .await?;
        let rate = total as f64 / elapsed;
        report.push_str(&format!(
            "run {}: {total} transitions ({facilities} facilities x 10) into PostgreSQL in {elapsed:.2} s = {rate:.0}/s (process start, migrations and consumer join included), \
             {sustained:.0}/s sustained (10% to 100%); plain consumer {ceiling:.0}/s; sink peak RSS {:.0} MiB\n",
            run + 1,
            mib(memory.hwm_kib.max(sampled_peak)),
        ));
        sustained_rates.push(sustained);
        sink_rates.push(rate);
        ceiling_rates.push(ceiling);
    }
    let (s, k) = (median(sink_rates), median(ceiling_rates));
    let sustained = median(sustained_rates);
    report.push_str(&format!(
        "median: sink {s:.0} transitions/s start-up included, {sustained:.0}/s sustained; plain consumer {k:.0}/s; ratio (start-up included) {:.2}\n",
        s / k
    ));
    Ok(report)
}

/// Fan-out latency: `clients` SSE streams on one region, `events` transitions published by
/// the notifier's own Redis writer, `interval` apart.
pub async fn fanout(config: &Config, clients: usize, events: usize) -> anyhow::Result<String> {
    let c = isolate(config, "fanout");
    let _topics = presence_core::topics::Throwaway::of(&c);
    presence_core::topics::ensure(&c).await?;
    let shutdown = Shutdown::new();
    let gateway = presence_gateway::start(c.clone(), shutdown.clone()).await?;
    // The gateway serves streams only for regions with a transition: region sequence 1 goes
    // out before the clients connect (they get it in their snapshot), the measured ones after.
    let mut writer = presence_notifier::redis_writer::RedisWriter::new(&c)?;
    let first = FacilityStatus {
        region_id: "bench".into(),
        ..transition(1, 1)
    };
    // -1: a Redis without notifier state; the first call only marks it.
    if writer.apply(&[&first]).await? == -1 {
        writer.apply(&[&first]).await?;
    }
    let url = format!("http://{}/v1/regions/bench/stream", gateway.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for _ in 0..clients {
        let (http, url, tx, ready) = (http.clone(), url.clone(), tx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let Ok(r) = http.get(&url).send().await else {
                return;
            };
            let mut body = r.bytes_stream();
            let mut buffer = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                let at = Instant::now();
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    if block.contains("event: snapshot") {
                        let _ = ready.send(());
                    } else if block.contains("event: transition") {
                        if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: ")) {
                            let _ = tx.send((id.trim().parse().unwrap_or(0), at));
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    for _ in 0..clients {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("not every client got its snapshot within 60 s"))?;
    }
    let mut published = std::collections::HashMap::new();
    for seq in 2..=events as i64 + 1 {
        let t = FacilityStatus {
            region_id: "bench".into(),
            ..transition(seq as usize % 50, seq)
        };
        let at = Instant::now();
        writer.apply(&[&t]).await?;
        published.insert(seq as u64, at);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = Vec::with_capacity(clients * events);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while latencies.len() < clients * events {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, at))) => {
                if let Some(p) = published.get(&id) {
                    latencies.push(at.duration_since(*p).as_secs_f64() * 1000.0);
                }
            }
            _ => break,
        }
    }
    shutdown.trigger();
    let received = latencies.len();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((received as f64 * p) as usize).min(received.saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(format!(
        "{clients} SSE clients on one region, {events} transitions 50 ms apart: {received} of {} deliveries; publish to receipt p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
        clients * events,
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    ))
}
