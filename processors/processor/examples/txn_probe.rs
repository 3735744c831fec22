//! How long one Kafka transaction commit takes on the configured broker, with and without a
//! record in it: `cargo run --release -p presence-processor --example txn_probe`.

use std::time::{Duration, Instant};

use presence_core::config::Config;
use presence_core::kafka::base_config;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

fn main() -> anyhow::Result<()> {
    let c = Config::load(None)?;
    presence_core::telemetry::init_logging(&c.telemetry);
    let mut pc = base_config(&c.kafka, "txn-probe");
    pc.set(
        "transactional.id",
        format!("txn-probe-{}", std::process::id()),
    )
    .set("linger.ms", "0");
    for (k, v) in std::env::args().skip(1).filter_map(|a| {
        a.split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
    }) {
        pc.set(k, v);
    }
    let p: ThreadedProducer<DefaultProducerContext> = pc.create()?;
    p.init_transactions(Duration::from_secs(30))?;
    let topic = c.topics.heartbeats.clone();
    for with_record in [false, true] {
        let mut times = Vec::new();
        for _ in 0..20 {
            p.begin_transaction()?;
            if with_record {
                p.send(
                    BaseRecord::<[u8], [u8]>::to(&topic)
                        .key(&b"probe"[..])
                        .payload(&b"x"[..]),
                )
                .map_err(|(e, _)| e)?;
            }
            let t = Instant::now();
            while p.in_flight_count() > 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            p.commit_transaction(Duration::from_secs(10))?;
            times.push(t.elapsed().as_millis());
        }
        times.sort();
        println!(
            "with_record={with_record}: commit ms median {} max {}",
            times[10], times[19]
        );
    }
    Ok(())
}
