//! A takeover aborts the departed owner's open transaction itself, instead of waiting for
//! the coordinator to time it out.
//!
//! An instance killed (or frozen) mid-transaction leaves that transaction open: its records
//! in the output topics and changelogs hold every read_committed reader at their first offset
//! (the partition's last stable offset) until the coordinator aborts it,
//! `transaction.timeout.ms` after it began, found by a scan that runs every
//! `transaction.abort.timed.out.transaction.cleanup.interval.ms` (10 s on a broker left at
//! its default). So the partitions' new owner, having waited out the group session to get
//! them, would wait that long again before stage 2 or any reader saw what it emits.
//!
//! Each committed offset carries the id of the instance that committed it (`i` in the
//! checkpoint). Before a restore reads the committed offsets, it looks up who committed the
//! partitions last, and when that is another instance that has no member in the group any
//! more, it fences that instance's transactional id. The lookup reads the offsets without
//! waiting for them to be stable: the stage's own read (read_committed, so it asks for
//! stable offsets) waits while the departed owner's offset commit is pending in its open
//! transaction, which is the transaction to be fenced (seen in `presence bench failover`:
//! the stage's read of the committed offsets blocked until that transaction ended). A producer
//! initialised with it makes the coordinator abort the open transaction and bump the epoch,
//! at once, so that the departed producer (a zombie that wakes up) can no longer write.
//! A previous owner still in the group (a scale-out or a rebalance between live instances)
//! finished its transaction before giving the partition up and is left alone. A fence
//! that fails costs nothing but time: the coordinator's timeout still aborts the transaction.
//!
//! What it cannot see: an instance that dies in its first transaction of a stage, before it
//! ever committed there, is named in no committed offset of that stage (its pending offsets
//! are invisible until committed), so its transaction ends at the coordinator's timeout
//! (`transaction.timeout.ms`, 10 s by default, `presence_core::kafka`), and the restore of a
//! partition it wrote waits for that ([`crate::restore::read_partition`] reads a changelog to
//! where no transaction is open). Kafka's ListTransactions (KIP-664) would name it; librdkafka
//! does not offer it yet.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::TopicPartitionList;
use serde::{Deserialize, Serialize};

/// How long the lookup of the last committers and the group's description may each take.
/// For the description librdkafka asks every broker for its groups and waits for all of
/// them: with one broker down it waits the whole timeout, then answers with what the others
/// said. Short, so that a takeover during a broker fault loses little.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a fence may take. It waits for the coordinator to write the abort's markers:
/// milliseconds on a healthy cluster; while the coordinator moves, the departed owner's
/// transaction holds the readers anyway until a new one aborts it.
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stage's checkpoint as stored in the offset metadata, with the committing instance.
/// The instance is one more key beside the stage's own (`{"t":…,"s":…,"i":"host-a"}`):
/// checkpoints written before it existed read as committed by no one known, and older
/// readers skip the key.
#[derive(Serialize, Deserialize)]
pub struct Stamped<C> {
    #[serde(flatten)]
    pub checkpoint: C,
    #[serde(default, rename = "i", skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Who this stage member is, and how to fence another instance of the same stage.
pub struct Successor {
    /// This instance's id (`processor.instance_id`).
    pub instance: String,
    /// The stage's consumer group, `<group_id>.<stage>`; transactional ids are
    /// `<group>.<instance>`.
    pub group: String,
    /// The stage's name; group instance ids are `<stage>.<instance>`.
    pub stage: &'static str,
    /// The stage's transactional producer settings; a fence replaces the id.
    pub producer: ClientConfig,
    /// A consumer of the stage's group that never joins it (read_uncommitted: the offsets as
    /// last committed, pending ones aside), for the lookup and the group's description.
    pub lookup: ClientConfig,
    /// Built from `lookup` when first needed, kept for the next takeover.
    pub looker: Option<BaseConsumer>,
}

/// The committing instance of a stored checkpoint, whatever the stage's own keys.
#[derive(Deserialize)]
struct Owner {
    #[serde(default)]
    i: Option<String>,
}

/// What [`Successor::take_over`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Fenced {
    /// Departed instances whose transactional id was fenced.
    pub fenced: Vec<String>,
    /// Departed instances whose fence failed.
    pub failed: Vec<String>,
    /// Previous owners still in the group, left alone.
    pub live: Vec<String>,
}

/// The transactional id of `instance`'s producer in the stage whose group is `group`
/// (`<group_id>.<stage>`): what the stage runs with and what a fence takes over.
pub fn transactional_id(group: &str, instance: &str) -> String {
    format!("{group}.{instance}")
}

/// The `group.instance.id` of `instance`'s consumer in `stage`: what the stage joins with
/// and what the broker's member ids begin with ([`departed`]).
pub fn group_instance_id(stage: &str, instance: &str) -> String {
    format!("{stage}.{instance}")
}

impl Successor {
    /// Fences each instance that last committed one of `partitions` of `topic`, is not this
    /// instance and has no member in the group now. Errors are reported, not returned:
    /// without the fence the coordinator's timeout does the same, later.
    pub fn take_over(&mut self, topic: &str, partitions: &[i32]) -> Fenced {
        if partitions.is_empty() {
            return Fenced::default();
        }
        if self.looker.is_none() {
            match self.lookup.create::<BaseConsumer>() {
                Ok(c) => self.looker = Some(c),
                Err(e) => {
                    tracing::warn!(stage = self.stage, error = %e, "cannot create the consumer that looks up the partitions' previous owners; their open transactions, if any, end at their timeout");
                    return Fenced::default();
                }
            }
        }
        let Some(looker) = self.looker.as_ref() else {
            return Fenced::default();
        };
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(topic, p);
        }
        let owners: BTreeSet<String> = match looker.committed_offsets(tpl, LOOKUP_TIMEOUT) {
            Ok(committed) => committed
                .elements()
                .iter()
                .filter_map(|e| serde_json::from_str::<Owner>(e.metadata()).ok()?.i)
                .collect(),
            Err(e) => {
                tracing::warn!(stage = self.stage, error = %e, "cannot look up who committed the partitions taken over; their open transactions, if any, end at their timeout");
                return Fenced::default();
            }
        };
        let others: BTreeSet<&String> = owners.iter().filter(|o| **o != self.instance).collect();
        if others.is_empty() {
            return Fenced::default();
        }
        let members = match looker.fetch_group_list(Some(&self.group), LOOKUP_TIMEOUT) {
            Ok(list) => list
                .groups()
                .iter()
                .flat_map(|g| g.members().iter().map(|m| m.id().to_string()))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(stage = self.stage, group = %self.group, error = %e, "cannot describe the group to see whether the partitions' previous owners are still in it; their open transactions, if any, end at their timeout");
                return Fenced::default();
            }
        };
        let Some((departed, live)) = departed(self.stage, &self.instance, &others, &members) else {
            tracing::warn!(stage = self.stage, group = %self.group, ?members, "this instance is not among the group's members as described (member ids are expected to begin with the group instance id); no previous owner is fenced");
            return Fenced::default();
        };
        if !live.is_empty() {
            tracing::debug!(stage = self.stage, previous_owners = ?live, "the partitions' previous owners are still in the group; nothing to fence");
        }
        let (mut fenced, mut failed) = (Vec::new(), Vec::new());
        for instance in departed {
            let id = transactional_id(&self.group, &instance);
            let started = Instant::now();
            match self.fence(&id) {
                Ok(()) => {
                    tracing::info!(stage = self.stage, previous_owner = %instance, transactional_id = %id, ms = started.elapsed().as_millis() as u64, "fenced the departed owner of partitions taken over: its open transaction is aborted");
                    fenced.push(instance);
                }
                Err(e) => {
                    tracing::warn!(stage = self.stage, previous_owner = %instance, transactional_id = %id, error = %e, "cannot fence the departed owner of partitions taken over; its open transaction, if any, ends at its timeout");
                    failed.push(instance);
                }
            }
        }
        Fenced {
            fenced,
            failed,
            live,
        }
    }

    /// Initialises a producer with `transactional_id`: the coordinator aborts that id's
    /// open transaction and bumps its epoch before it answers.
    fn fence(&self, transactional_id: &str) -> anyhow::Result<()> {
        let producer: BaseProducer = self
            .producer
            .clone()
            .set("transactional.id", transactional_id)
            // Statistics only feed the stage's own producer's broker watch.
            .set("statistics.interval.ms", "0")
            .create()?;
        producer.init_transactions(FENCE_TIMEOUT)?;
        Ok(())
    }
}

/// Of `owners` (other instances), those with no member in the group (`members`: member ids;
/// the broker names a static member by its group instance id, `<stage>.<instance>`, a dash
/// and a random id: Kafka's own 22-character form, or a 36-character UUID on older
/// brokers), then those with one. `None` when this instance itself is not recognised among
/// the members: the ids are not in that form, and nothing can be told.
pub fn departed(
    stage: &str,
    me: &str,
    owners: &BTreeSet<&String>,
    members: &[String],
) -> Option<(Vec<String>, Vec<String>)> {
    let is_member = |instance: &str| {
        let prefix = format!("{}-", group_instance_id(stage, instance));
        members.iter().any(|m| {
            m.strip_prefix(&prefix)
                .is_some_and(|random| random.len() == 22 || random.len() == 36)
        })
    };
    if !is_member(me) {
        return None;
    }
    let (live, gone): (Vec<String>, Vec<String>) = owners
        .iter()
        .map(|o| o.to_string())
        .partition(|o| is_member(o));
    Some((gone, live))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_owner_without_a_member_is_departed_and_one_with_a_member_is_live() {
        let members = owners(&[
            "sessions.host-a-0f8e6c1a-5b7d-4c1e-9a0b-2d3c4e5f6a7b",
            "sessions.host-b-Zk_3x-Qp2R6mWv0nYb1LcA",
        ]);
        let names = owners(&["host-b", "host-c", "host"]);
        let others: BTreeSet<&String> = names.iter().collect();
        let (gone, live) = departed("sessions", "host-a", &others, &members).unwrap();
        // "host" is a prefix of live members' instance ids, not a member itself.
        assert_eq!(gone, owners(&["host", "host-c"]));
        assert_eq!(live, owners(&["host-b"]));
    }

    #[test]
    fn member_ids_of_another_form_fence_no_one() {
        let members = owners(&["rdkafka-0f8e6c1a-5b7d-4c1e-9a0b-2d3c4e5f6a7b"]);
        let names = owners(&["host-b"]);
        let others: BTreeSet<&String> = names.iter().collect();
        assert_eq!(departed("sessions", "host-a", &others, &members), None);
    }

    #[test]
    fn a_stamped_checkpoint_keeps_the_stages_keys_and_reads_older_ones() {
        let stamped = Stamped {
            checkpoint: crate::stage1::Checkpoint { t: 5, s: 7 },
            instance: Some("host-a".into()),
        };
        let json = serde_json::to_string(&stamped).unwrap();
        assert_eq!(json, r#"{"t":5,"s":7,"i":"host-a"}"#);
        // What an older instance reads from it, and what this one reads from an older one.
        let old: crate::stage1::Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!((old.t, old.s), (5, 7));
        let read: Stamped<crate::stage2::Checkpoint> =
            serde_json::from_str(r#"{"a":[3,4],"w":9}"#).unwrap();
        assert_eq!(
            (read.checkpoint.a, read.checkpoint.w),
            (vec![3, 4], Some(9))
        );
        assert_eq!(read.instance, None);
    }
}
