//! Benchmarks that need the broker (`presence bench ...`): restore time, end-to-end
//! throughput against a plain consumer's ceiling, and heartbeat-to-transition latency.
//! Each one creates its own topics, so it never disturbs a running pipeline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use presence_core::codec::{decode, encode};
use presence_core::config::Config;
use presence_core::kafka::{consumer_config, idempotent_producer_config};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind, Status};
use presence_core::Shutdown;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::records::SessionState;
use crate::sessions::{key_bytes, session_key};
use crate::stage::{now_ms, Committed, RestoreIo, Stage};

/// The config with fresh topic and group names, provisioned.
pub async fn isolated(
    base: &Config,
    tag: &str,
    heartbeats_partitions: i32,
) -> anyhow::Result<Config> {
    let mut c = base.isolated(&format!("bench-{tag}-{}", now_ms()));
    c.topics.heartbeats_partitions = heartbeats_partitions;
    c.processor.instance_id = "bench".into();
    let report = presence_core::topics::ensure(&c).await?;
    anyhow::ensure!(report.is_ok(), "bench topics: {report}");
    Ok(c)
}

fn producer(c: &Config) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    let mut pc = idempotent_producer_config(&c.kafka, "bench");
    pc.set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "2000000");
    Ok(pc.create()?)
}

fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    r: BaseRecord<'_, [u8], [u8]>,
) -> anyhow::Result<()> {
    Ok(presence_core::kafka::send_when_room(p, r, None)?)
}

fn beat(session: usize, facility: usize, kind: HeartbeatKind) -> Heartbeat {
    Heartbeat {
        session_id: format!("6f1c2a0e-5b7d-4c8e-9a3f-{session:012}"),
        user_id: format!("user-{session:08}"),
        facility_id: format!("facility-{facility:05}"),
        region_id: format!("region-{}", facility % 16),
        kind,
        client_sent_at: None,
        client_version: None,
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Restore of one partition holding `sessions` open sessions that each beat three times
/// within the timeout: the changelog (one record per session) plus the re-read of the
/// beats since the checkpoint's timeout window.
pub async fn restore(base: &Config, sessions: usize, runs: usize) -> anyhow::Result<String> {
    let c = isolated(base, "restore", 1).await?;
    let timeout = c.processor.session_timeout.as_millis() as i64;
    let p = producer(&c)?;
    let t0 = now_ms() - timeout + 5_000;
    let facilities = (sessions / 100).max(1);
    let changelog = c.topics.sessions_changelog();
    let started = Instant::now();
    // Three beats per session inside the window; the first opens it (offset = its index).
    for round in 0..3 {
        for s in 0..sessions {
            let h = beat(s, s % facilities, HeartbeatKind::Beat);
            let bytes = encode(&h);
            let ts = t0 + round as i64 * (timeout / 3) + (s as i64 * 10 / sessions as i64);
            send(
                &p,
                BaseRecord::to(&c.topics.heartbeats)
                    .key(h.session_id.as_bytes())
                    .payload(&bytes[..])
                    .timestamp(ts)
                    .partition(0),
            )?;
        }
    }
    for s in 0..sessions {
        let h = beat(s, s % facilities, HeartbeatKind::Beat);
        let state = SessionState {
            session_id: h.session_id.clone(),
            user_id: h.user_id.clone(),
            facility_id: h.facility_id,
            region_id: h.region_id,
            last_seen: t0,
            open_offset: s as i64,
        };
        let key = key_bytes(&session_key(&h.user_id, &h.session_id));
        let bytes = encode(&state);
        send(
            &p,
            BaseRecord::to(&changelog)
                .key(&key[..])
                .payload(&bytes[..])
                .partition(0),
        )?;
    }
    p.flush(Duration::from_secs(120))?;
    let written = started.elapsed();
    let end = 3 * sessions as i64;
    let io_config = presence_core::kafka::restore_consumer_config(
        &c.kafka,
        "bench-restore",
        &format!("{}.restore", c.processor.group_id),
    );
    let topics = crate::stage1::Topics::of(&c.topics, c.topics.facility_partitions);
    let mut times = Vec::new();
    let mut open = 0;
    for _ in 0..runs {
        let mut stage = crate::stage1::SessionsStage::new(topics, timeout, 60_000);
        let started = Instant::now();
        let committed = Committed {
            offset: end,
            checkpoint: Some(crate::stage1::Checkpoint {
                t: t0 + 2 * (timeout / 3) + 10,
                s: sessions as i64 + 1,
            }),
        };
        let cfg = io_config.clone();
        stage = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            stage.restore(0, Some(committed), &RestoreIo { config: &cfg })?;
            Ok(stage)
        })
        .await??;
        times.push(started.elapsed().as_secs_f64());
        open = stage.open_sessions();
    }
    anyhow::ensure!(
        open == sessions,
        "restored {open} sessions, expected {sessions}"
    );
    Ok(format!(
        "restore of {sessions} open sessions (changelog {sessions} records + {} heartbeats re-read from the timeout window), one partition: \
         median {:.2} s over {runs} runs (min {:.2} s); writing the test data took {:.1} s",
        3 * sessions,
        median(times.clone()),
        times.iter().copied().fold(f64::INFINITY, f64::min),
        written.as_secs_f64()
    ))
}

/// Heartbeats per second through the whole processor (both stages, transactions) against
/// the rate at which a plain read_committed consumer reads the same topic: the ceiling.
pub async fn throughput(base: &Config, heartbeats: usize) -> anyhow::Result<String> {
    let c = isolated(base, "throughput", base.topics.heartbeats_partitions).await?;
    let p = producer(&c)?;
    let sessions = (heartbeats / 20).max(1);
    let facilities = (sessions / 50).max(1);
    let t0 = now_ms() - 3_600_000;
    // Every session beats every 30 s of event time, as browsers do.
    for i in 0..heartbeats {
        let s = i % sessions;
        let h = beat(s, s % facilities, HeartbeatKind::Beat);
        let bytes = encode(&h);
        let ts = t0 + i as i64 * 30_000 / sessions as i64;
        send(
            &p,
            BaseRecord::to(&c.topics.heartbeats)
                .key(h.session_id.as_bytes())
                .payload(&bytes[..])
                .timestamp(ts),
        )?;
    }
    p.flush(Duration::from_secs(300))?;
    let ends = end_offsets(&c, &c.topics.heartbeats)?;
    let total: i64 = ends.values().sum();

    // The ceiling: a plain consumer reading everything, touching each payload.
    let mut ceilings = Vec::new();
    for run in 0..3 {
        // The same fetch settings as the processor's consumers.
        let consumer: BaseConsumer = consumer_config(
            &c.kafka,
            "bench-ceiling",
            &format!("{}-ceiling-{run}", c.processor.group_id),
        )
        .set("fetch.wait.max.ms", "10")
        .set("max.partition.fetch.bytes", "4194304")
        .set("fetch.max.bytes", "67108864")
        .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(&c.topics.heartbeats, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let started = Instant::now();
        let (mut n, mut bytes) = (0i64, 0usize);
        while n < total {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                bytes += m.payload().map_or(0, <[u8]>::len);
                n += 1;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "ceiling consumer stalled"
            );
        }
        std::hint::black_box(bytes);
        ceilings.push(total as f64 / started.elapsed().as_secs_f64());
    }
    let ceiling = median(ceilings);

    // The processor, in this process: sustained rate from 10% committed (start-up, group
    // join and the burst of sessions opening for the first time are behind it) to 100%.
    let shutdown = Shutdown::new();
    let pc = c.clone();
    let s2 = shutdown.clone();
    let proc_task = tokio::spawn(async move { crate::run(pc, s2).await });
    let group = format!("{}.sessions", c.processor.group_id);
    let watcher: BaseConsumer = consumer_config(&c.kafka, "bench-watch", &group).create()?;
    let mut first: Option<(Instant, i64)> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let finished = loop {
        let done = committed_total(&watcher, &c.topics.heartbeats, &ends)?;
        if first.is_none() && done >= total / 10 {
            first = Some((Instant::now(), done));
        }
        if done >= total {
            break Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "processor did not finish in 600 s ({done}/{total})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shutdown.trigger();
    proc_task.await??;
    let (t_first, n_first) = first.context("no commit observed")?;
    let rate = (total - n_first) as f64 / finished.duration_since(t_first).as_secs_f64();
    Ok(format!(
        "end to end through the local broker, {total} heartbeats on {} partitions, exactly-once: processor sustained {:.0} heartbeats/s \
         (from 10% to 100% committed); plain read_committed consumer with the same fetch settings (ceiling, median of 3) {:.0}/s; ratio {:.0}%",
        ends.len(),
        rate,
        ceiling,
        100.0 * rate / ceiling
    ))
}

fn end_offsets(c: &Config, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let consumer: BaseConsumer = consumer_config(&c.kafka, "bench-meta", "bench-meta").create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut out = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        out.insert(p.id(), high);
    }
    Ok(out)
}

fn committed_total(
    watcher: &BaseConsumer,
    topic: &str,
    ends: &HashMap<i32, i64>,
) -> anyhow::Result<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = watcher.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum())
}

/// Heartbeat-to-`facility-status` latency at a steady `rate` heartbeats/s for `seconds`:
/// background sessions keep their facilities online while probe sessions open fresh
/// facilities; each probe's ONLINE record is timed from the beat's timestamp to its
/// arrival at a read_committed consumer.
pub async fn latency(base: &Config, rate: usize, seconds: u64) -> anyhow::Result<String> {
    let c = isolated(base, "latency", base.topics.heartbeats_partitions).await?;
    let shutdown = Shutdown::new();
    let (pc, s2) = (c.clone(), shutdown.clone());
    let proc_task = tokio::spawn(async move { crate::run(pc, s2).await });
    // A downstream consumer tuned for latency: with read_committed, a fetch that finds no
    // committed data waits fetch.wait.max.ms (default 500 ms) before it looks again.
    let reader: BaseConsumer = consumer_config(
        &c.kafka,
        "bench-latency",
        &format!("{}-reader", c.processor.group_id),
    )
    .set("fetch.wait.max.ms", "10")
    .create()?;
    reader.subscribe(&[&c.topics.facility_status])?;
    // Wait for the processor: one probe round trip.
    let p = producer(&c)?;
    let warm = beat(usize::MAX / 2, 999_999, HeartbeatKind::Beat);
    let bytes = encode(&warm);
    send(
        &p,
        BaseRecord::to(&c.topics.heartbeats)
            .key(warm.session_id.as_bytes())
            .payload(&bytes[..])
            .timestamp(now_ms()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(Ok(_)) = reader.poll(Duration::from_millis(100)) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "processor did not answer in 60 s"
        );
    }
    let load = {
        let c = c.clone();
        let stop = shutdown.clone();
        std::thread::spawn(move || -> anyhow::Result<(u64, HashMap<String, i64>)> {
            let p = producer(&c)?;
            let sessions = 20_000usize;
            let facilities = 500usize;
            let started = Instant::now();
            let mut sent = 0u64;
            let mut probes = HashMap::new();
            let mut probe = 0usize;
            while started.elapsed() < Duration::from_secs(seconds) && !stop.is_triggered() {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    let now = now_ms();
                    let h = if sent.is_multiple_of(100) {
                        probe += 1;
                        let h = beat(1_000_000_000 + probe, 100_000 + probe, HeartbeatKind::Beat);
                        probes.insert(h.facility_id.clone(), now);
                        h
                    } else {
                        let s = (sent as usize) % sessions;
                        beat(s, s % facilities, HeartbeatKind::Beat)
                    };
                    let bytes = encode(&h);
                    send(
                        &p,
                        BaseRecord::to(&c.topics.heartbeats)
                            .key(h.session_id.as_bytes())
                            .payload(&bytes[..])
                            .timestamp(now),
                    )?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            p.flush(Duration::from_secs(30))?;
            Ok((sent, probes))
        })
    };
    let mut arrivals: HashMap<String, (i64, FacilityStatus)> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(seconds + 10);
    while Instant::now() < until {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
            let at = now_ms();
            if let Some(Ok(s)) = m.payload().map(decode::<FacilityStatus>) {
                if s.status == Status::Online && s.facility_id.starts_with("facility-1") {
                    arrivals.entry(s.facility_id.clone()).or_insert((at, s));
                }
            }
        }
    }
    let (sent, probes) = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    shutdown.trigger();
    proc_task.await??;
    reader.commit_consumer_state(CommitMode::Async).ok();
    let mut lat: Vec<f64> = probes
        .iter()
        .filter_map(|(f, sent_at)| arrivals.get(f).map(|(at, _)| (at - sent_at) as f64))
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    // The part before stage 2's commit: emitted_at - since (since = the beat's timestamp).
    let mut emit: Vec<f64> = arrivals
        .values()
        .map(|(_, s)| (s.emitted_at - s.since) as f64)
        .collect();
    emit.sort_by(|a, b| a.total_cmp(b));
    let missing = probes.len() - lat.len();
    Ok(format!(
        "latency at {:.0} heartbeats/s for {seconds} s ({} probes, {missing} not seen): beat timestamp to read_committed arrival \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (commit interval {} ms); of which beat to stage-2 emission p50 {:.0} ms, p99 {:.0} ms",
        sent as f64 / seconds as f64,
        probes.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        c.processor.commit_interval.as_millis(),
        percentile(&emit, 0.5),
        percentile(&emit, 0.99)
    ))
}
