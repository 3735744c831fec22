//! Producers in any codec: heartbeats compressed with gzip, snappy, lz4 or zstd (what
//! Kafka's clients offer) are all read by the processor. librdkafka builds gzip (zlib),
//! snappy and lz4 in; zstd comes with rdkafka's `zstd` feature. A producer asked for a codec
//! its librdkafka lacks fails at creation, so producing each one here proves both sides.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use presence_core::codec::{decode, encode};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind};
use presence_core::Shutdown;
use presence_testkit::read_to_end_until;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::*;

const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];

fn beat(session: &str, facility: &str, kind: HeartbeatKind) -> Heartbeat {
    heartbeat(session, facility, kind)
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_in_every_codec_are_read() {
    let c = setup(90_000).await;
    let shutdown = Shutdown::new();
    let processor = processor_in_process(&c, &shutdown).await;
    for codec in CODECS {
        let producer: FutureProducer =
            presence_core::kafka::idempotent_producer_config(&c.kafka, "test-producer")
                .set("compression.type", codec)
                // A batch of several records, so that the codec really compresses one.
                .set("linger.ms", "50")
                .create()
                .unwrap_or_else(|e| panic!("a {codec} producer: {e}"));
        let session = format!("s-{codec}");
        let facility = format!("F-{codec}");
        let now = now_ms();
        let sends = [
            (beat(&session, &facility, HeartbeatKind::Beat), now),
            (beat(&session, &facility, HeartbeatKind::Beat), now + 1),
            (beat(&session, &facility, HeartbeatKind::End), now + 2),
        ]
        .map(|(h, ts)| {
            let value = encode(&h);
            let producer = producer.clone();
            let (topic, key) = (c.topics.heartbeats.clone(), session.clone());
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&value)
                            .timestamp(ts),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap_or_else(|e| panic!("producing {codec}: {e}"));
        }
    }
    let records = read_to_end_until(
        &c,
        &c.topics.facility_status,
        Duration::from_secs(90),
        |r| r.len() >= 2 * CODECS.len(),
    );
    processor.stop(Duration::from_secs(30)).await;
    let seen: BTreeSet<(String, String, i64)> = records
        .iter()
        .map(|m| {
            let s: FacilityStatus = decode(m.payload().unwrap_or_default()).expect("decodes");
            (s.facility_id, s.status.as_str().to_string(), s.seq)
        })
        .collect();
    let expected: BTreeSet<(String, String, i64)> = CODECS
        .iter()
        .flat_map(|codec| {
            [("ONLINE", 1), ("OFFLINE", 2)].map(|(s, n)| (format!("F-{codec}"), s.to_string(), n))
        })
        .collect();
    assert_eq!(seen, expected, "an ONLINE and an OFFLINE per codec");
    assert_eq!(records.len(), 2 * CODECS.len(), "nothing else");
}
