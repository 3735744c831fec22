//! Event-time alignment of stage 1's partitions, pure: which partitions to pause so that an
//! instance reads its `heartbeats` partitions in step while it replays a backlog.
//!
//! Why (issue 13): stage 2 applies a session event only once every source partition's
//! watermark has passed it, so a partition read ahead of the others parks its events in
//! stage 2's memory until the slowest partition catches up. librdkafka does not read a
//! backlog in step. Whenever its prefetch queue is full, every partition leaves the fetch
//! list; they come back in partition order and the next request starts at the first one, and
//! the broker fills a response in request order (only the first partition is given a batch
//! larger than its share). So a consumer with a bounded queue reads a backlog nearly one
//! partition after another: in `presence bench throughput` with 1 M sessions, source 11 sent
//! its first watermark after sources 0–10 had read all they had, and stage 2 held the whole
//! first round of session opens (~990 k events, most of the processor's 293 MiB peak).
//!
//! The rule: among the partitions that are replaying (not at their end, and their latest
//! record more than [`REPLAYING_MS`] old), the one with the lowest stream time is the
//! *floor*. A replaying partition whose stream time is more than `window` ahead of the
//! floor is paused; a paused one resumes once no replaying partition is behind it any more.
//! That hysteresis matters: a pause throws away what librdkafka prefetched for the
//! partition, to be fetched again, so each pause must buy a whole window of reading (resuming
//! at half the window, the processor ran at 0.71x the rate of the code without alignment; at
//! the floor, 0.97–1.05x), and a partition is not paused before it has read what librdkafka
//! prefetched for it since it started reading ([`Reading::read_a_fetch`]). The floor itself
//! is never paused, so something always reads.
//! Only replaying partitions are paused: one at its end runs its expiry on the wall clock,
//! which must not move while its records wait, and a live one (fresh records) keeps reading
//! even while another partition replays (stage 2 holds its few live events meanwhile, as
//! before alignment). So a live instance pauses nothing.

use std::collections::BTreeSet;

/// A record stamped further in the past than this, read from a partition not at its end,
/// means the partition is replaying a backlog (the same test as `Stage::backlogged`).
pub const REPLAYING_MS: i64 = 1_000;

/// How far ahead (event time) of the slowest replaying partition another may read: 10 s.
/// Stage 2 holds at most about this much of the other partitions' session events: a
/// million sessions beating every 30 s open ~330 k sessions in 10 s of event time, against
/// every open of the first round (~990 k) without alignment; measured, the processor's peak
/// went from 293–305 MiB to 202–208 MiB (`presence bench throughput --heartbeats 8000000
/// --sessions 1000000`). Not less: a partition's fetch share (1 MiB, ~20 k heartbeats, ~7 s
/// of one partition's event time in that run) then spans the window, and the pause that
/// ends each window throws most of a fetch away (at 5 s: 0.77x the rate).
pub const WINDOW_MS: i64 = 10_000;

/// What the rule needs to know of one assigned partition.
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    pub partition: i32,
    /// Its stream time (`i64::MIN` before its first record and checkpoint).
    pub stream_time: i64,
    /// The consumer reported its end and no record since.
    pub at_end: bool,
    /// Its latest record is older than [`REPLAYING_MS`], or none was read yet.
    pub replaying: bool,
    /// It has read what librdkafka prefetches for a partition (`queued.min.messages`) since
    /// it was assigned or last resumed. A pause throws that prefetch away, so a partition
    /// that has not is not paused: where beats are sparse in event time one fetch spans far
    /// more than the window (a backlog of 25 k sessions on 12 partitions puts ~70 s of event
    /// time in a 1 MiB share), and pausing at the window alone threw most of every fetch
    /// away (one instance on the three-node cluster: 116 k heartbeats/s against 529 k/s
    /// without pausing). Stage 2 then holds at most about that many events per partition
    /// ahead; where beats are dense, the window is the tighter bound.
    pub read_a_fetch: bool,
}

/// The partitions to hold paused, given those paused now.
pub fn to_pause(
    partitions: impl IntoIterator<Item = Reading> + Clone,
    paused: &BTreeSet<i32>,
    window: i64,
) -> BTreeSet<i32> {
    let Some(floor) = partitions
        .clone()
        .into_iter()
        .filter(|r| !r.at_end && r.replaying)
        .map(|r| r.stream_time)
        .min()
    else {
        return BTreeSet::new();
    };
    partitions
        .into_iter()
        .filter(|r| !r.at_end && r.replaying)
        .filter(|r| {
            let (allowed, may_pause) = if paused.contains(&r.partition) {
                (0, true)
            } else {
                (window, r.read_a_fetch)
            };
            may_pause && r.stream_time.saturating_sub(floor) > allowed
        })
        .map(|r| r.partition)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(partition: i32, stream_time: i64, at_end: bool, replaying: bool) -> Reading {
        Reading {
            partition,
            stream_time,
            at_end,
            replaying,
            read_a_fetch: true,
        }
    }

    fn set(v: &[i32]) -> BTreeSet<i32> {
        v.iter().copied().collect()
    }

    #[test]
    fn partitions_ahead_of_the_slowest_replaying_one_pause() {
        let parts = [
            r(0, 100_000, false, true),
            r(1, 104_000, false, true),
            r(2, 106_000, false, true),
        ];
        assert_eq!(to_pause(parts, &set(&[]), 5_000), set(&[2]));
    }

    #[test]
    fn a_partition_not_read_yet_holds_the_others() {
        // No record and no checkpoint yet: the others wait for its first records.
        let parts = [r(0, 100_000, false, true), r(1, i64::MIN, false, true)];
        assert_eq!(to_pause(parts, &set(&[]), 5_000), set(&[0]));
    }

    #[test]
    fn a_paused_partition_resumes_once_nothing_replaying_is_behind_it() {
        let parts = |t0| [r(0, t0, false, true), r(1, 106_000, false, true)];
        assert_eq!(to_pause(parts(105_999), &set(&[1]), 5_000), set(&[1]));
        assert_eq!(to_pause(parts(106_000), &set(&[1]), 5_000), set(&[]));
        // Not paused yet: the whole window applies.
        assert_eq!(to_pause(parts(101_000), &set(&[]), 5_000), set(&[]));
        assert_eq!(to_pause(parts(100_999), &set(&[]), 5_000), set(&[1]));
    }

    #[test]
    fn a_partition_reads_a_fetch_worth_before_it_pauses() {
        let parts = |read_a_fetch| {
            [
                r(0, 100_000, false, true),
                Reading {
                    read_a_fetch,
                    ..r(1, 190_000, false, true)
                },
            ]
        };
        assert_eq!(to_pause(parts(false), &set(&[]), 5_000), set(&[]));
        assert_eq!(to_pause(parts(true), &set(&[]), 5_000), set(&[1]));
        // Paused already: it stays so until the floor reaches it.
        assert_eq!(to_pause(parts(false), &set(&[1]), 5_000), set(&[1]));
    }

    #[test]
    fn the_floor_is_never_paused() {
        let parts = [r(0, 100_000, false, true), r(1, 100_000, false, true)];
        assert_eq!(to_pause(parts, &set(&[0, 1]), 0), set(&[]));
    }

    #[test]
    fn partitions_at_their_end_neither_pause_nor_hold_others() {
        // Partition 0 is at its end far behind: it is not the floor, and partition 2 (at its
        // end, ahead) keeps reading so that its wall-clock expiry sees every record.
        let parts = [
            r(0, 10_000, true, true),
            r(1, 100_000, false, true),
            r(2, 200_000, true, true),
        ];
        assert_eq!(to_pause(parts, &set(&[]), 5_000), set(&[]));
    }

    #[test]
    fn live_partitions_pause_nothing() {
        // Nothing replaying: records are fresh, whatever their spread.
        let parts = [r(0, 100_000, false, false), r(1, 160_000, false, false)];
        assert_eq!(to_pause(parts, &set(&[1]), 5_000), set(&[]));
    }

    #[test]
    fn a_live_partition_is_never_paused() {
        // One partition replays its backlog (say, its leader was away); the others, live,
        // keep reading.
        let parts = [r(0, 100_000, false, true), r(1, 160_000, false, false)];
        assert_eq!(to_pause(parts, &set(&[]), 5_000), set(&[]));
    }
}
