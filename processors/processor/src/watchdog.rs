//! The stage watchdogs' rules, pure (time passed in): when a client that librdkafka keeps
//! alive but that makes no progress is to be replaced.
//!
//! - [`AssignmentWatch`]: the stage's consumer has held no partition for longer than a group
//!   session timeout. What the runner then checks with the broker (the group has fewer
//!   members than the input topic has partitions, so someone's share is unowned) is in
//!   [`assignment_verdict`].
//! - [`FailureWatch`]: transaction calls have kept failing, with no success in between,
//!   for longer than a bound.

use std::time::{Duration, Instant};

/// Measures how long a condition has held without a break.
#[derive(Debug, Clone)]
pub struct FailureWatch {
    limit: Duration,
    since: Option<Instant>,
}

impl FailureWatch {
    pub fn new(limit: Duration) -> FailureWatch {
        FailureWatch { limit, since: None }
    }

    /// A failure at `now`: how long failures have gone on, once that is past the limit
    /// (then the watch starts over).
    pub fn failed(&mut self, now: Instant) -> Option<Duration> {
        let since = *self.since.get_or_insert(now);
        let failing = now.saturating_duration_since(since);
        if failing >= self.limit {
            self.since = None;
            Some(failing)
        } else {
            None
        }
    }

    pub fn succeeded(&mut self) {
        self.since = None;
    }
}

/// Whether a consumer without partitions has been so for too long.
#[derive(Debug, Clone)]
pub struct AssignmentWatch {
    limit: Duration,
    /// Since when the consumer has held nothing.
    since: Option<Instant>,
    /// When to look again after a look found nothing wrong.
    next_look: Option<Instant>,
}

impl AssignmentWatch {
    pub fn new(limit: Duration) -> AssignmentWatch {
        AssignmentWatch {
            limit,
            since: None,
            next_look: None,
        }
    }

    /// Called every time round: how long the consumer has held nothing, once that is past
    /// the limit (and, after [`AssignmentWatch::restart`], once another limit has passed).
    /// The caller then checks with the broker.
    pub fn observe(&mut self, holds_partitions: bool, now: Instant) -> Option<Duration> {
        if holds_partitions {
            self.since = None;
            self.next_look = None;
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let look = *self.next_look.get_or_insert(since + self.limit);
        (now >= look).then(|| now.saturating_duration_since(since))
    }

    /// Looks again only after another full limit; the time without partitions keeps
    /// counting from when it began (so that a `give_up` bound can be reached).
    pub fn restart(&mut self, now: Instant) {
        self.next_look = Some(now + self.limit);
    }
}

/// What the broker says about the group of a consumer that has held nothing for `empty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupView {
    /// The group's member count and the input topic's partition count.
    Known { members: usize, partitions: usize },
    /// The broker did not answer.
    Unknown(String),
}

/// Replace the consumer (`Some(reason)`) or leave it (`None`). A member with nothing is
/// fine when the group has at least as many members as there are partitions (a spare);
/// with fewer, a partition is unowned or this member is stuck outside its group. When the
/// broker does not answer, the outage is on readiness already; the consumer is replaced
/// only after `give_up` without partitions (a client that lost its broker for good looks
/// the same as an outage from inside). A consumer whose own join is under way (`joining`:
/// librdkafka's join state is one of its `wait-*` states) is left alone until `give_up`: on
/// a slow cluster a first join was seen to take longer than the limit, and replacing the
/// consumer then only started the join over (chaos seed 4: five times in a row).
pub fn assignment_verdict(
    view: &GroupView,
    empty: Duration,
    give_up: Duration,
    joining: bool,
) -> Option<String> {
    if joining && empty < give_up {
        return None;
    }
    match view {
        GroupView::Known {
            members,
            partitions,
        } if members < partitions => Some(format!(
            "the consumer held no partition for {} s while its group has {members} member(s) for {partitions} partition(s)",
            empty.as_secs()
        )),
        GroupView::Known { .. } => None,
        GroupView::Unknown(e) if empty >= give_up => Some(format!(
            "the consumer held no partition for {} s and the broker does not describe its group ({e})",
            empty.as_secs()
        )),
        GroupView::Unknown(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn failures_trip_the_watch_only_when_they_last_past_the_limit_without_a_success() {
        let t0 = Instant::now();
        let mut w = FailureWatch::new(10 * S);
        assert_eq!(w.failed(t0), None);
        assert_eq!(w.failed(t0 + 9 * S), None);
        w.succeeded();
        assert_eq!(w.failed(t0 + 15 * S), None, "a success started it over");
        assert_eq!(w.failed(t0 + 25 * S), Some(10 * S));
        assert_eq!(w.failed(t0 + 26 * S), None, "tripping starts it over");
    }

    #[test]
    fn a_consumer_without_partitions_is_reported_after_the_limit_and_not_while_it_holds_some() {
        let t0 = Instant::now();
        let mut w = AssignmentWatch::new(10 * S);
        assert_eq!(w.observe(false, t0), None);
        assert_eq!(w.observe(true, t0 + 5 * S), None);
        assert_eq!(w.observe(false, t0 + 6 * S), None);
        assert_eq!(w.observe(false, t0 + 15 * S), None, "empty for 9 s only");
        assert_eq!(w.observe(false, t0 + 16 * S), Some(10 * S));
        w.restart(t0 + 16 * S);
        assert_eq!(w.observe(false, t0 + 20 * S), None, "restarted");
        assert_eq!(
            w.observe(false, t0 + 26 * S),
            Some(20 * S),
            "the next look, with the whole time without partitions"
        );
        w.restart(t0 + 26 * S);
        assert_eq!(w.observe(true, t0 + 27 * S), None);
        assert_eq!(
            w.observe(false, t0 + 28 * S),
            None,
            "empty again: counts anew"
        );
        assert_eq!(w.observe(false, t0 + 38 * S), Some(10 * S));
    }

    #[test]
    fn a_consumer_in_the_middle_of_a_join_is_spared_until_the_give_up_bound() {
        let view = GroupView::Known {
            members: 0,
            partitions: 6,
        };
        let give_up = 60 * S;
        assert_eq!(assignment_verdict(&view, 10 * S, give_up, true), None);
        assert_eq!(assignment_verdict(&view, 59 * S, give_up, true), None);
        assert!(
            assignment_verdict(&view, 60 * S, give_up, true).is_some(),
            "a join that never ends is replaced"
        );
        assert!(
            assignment_verdict(&view, 10 * S, give_up, false).is_some(),
            "a steady member with nothing is replaced after the limit"
        );
    }

    #[test]
    fn the_verdict_spares_a_spare_member_and_replaces_a_stuck_one() {
        let known = |members, partitions| GroupView::Known {
            members,
            partitions,
        };
        let (empty, give_up) = (12 * S, 60 * S);
        assert_eq!(
            assignment_verdict(&known(3, 2), empty, give_up, false),
            None
        );
        assert_eq!(
            assignment_verdict(&known(2, 2), empty, give_up, false),
            None
        );
        let r = assignment_verdict(&known(1, 2), empty, give_up, false).unwrap();
        assert!(r.contains("1 member(s) for 2 partition(s)"), "{r}");
        assert!(
            assignment_verdict(&known(0, 2), empty, give_up, false).is_some(),
            "not even in its group"
        );
        let down = GroupView::Unknown("timed out".into());
        assert_eq!(assignment_verdict(&down, empty, give_up, false), None);
        assert!(assignment_verdict(&down, 60 * S, give_up, false).is_some());
    }
}
