//! What the downstream loop reports, each event logged and counted in one place (Vector's
//! `src/internal_events/*` is the model): a log line and its metric can never drift apart,
//! and the loop reads as what it does.

use std::time::Duration;

use super::{Metrics, POISON_ATTEMPTS};
use crate::telemetry::Health;

/// A batch the store took.
pub(super) struct BatchWritten<'a> {
    pub records: usize,
    pub elapsed: Duration,
    /// When the processor emitted each transition, ms since the epoch.
    pub emitted_at: &'a [i64],
    pub now_ms: i64,
}

impl BatchWritten<'_> {
    pub fn emit(self, m: &Metrics) {
        m.batch_seconds.observe(self.elapsed.as_secs_f64());
        m.applied.inc_by(self.records as u64);
        for at in self.emitted_at {
            m.delivery_seconds
                .observe((self.now_ms - at).max(0) as f64 / 1000.0);
        }
        tracing::trace!(records = self.records, elapsed = ?self.elapsed, "batch written");
    }
}

/// The store could not take a batch (unreachable, busy, timed out): it is retried.
pub(super) struct StoreUnavailable<'a> {
    pub store: &'static str,
    pub error: &'a str,
    pub failures: u32,
    pub retry_in: Duration,
}

impl StoreUnavailable<'_> {
    pub fn emit(self, m: &Metrics, health: &Health) {
        m.errors.inc();
        health.set_unready(
            self.store,
            format!("{} write failing: {}", self.store, self.error),
        );
        // Logged on the 1st, 2nd, 4th, 8th... failure: an outage is one line per doubling.
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::warn!(store = self.store, error = %self.error, failures = self.failures, retry_in = ?self.retry_in, "cannot write transitions; retrying the same batch (offsets are not committed)");
        }
    }
}

/// The store takes writes again after `failures` failed attempts.
pub(super) struct StoreRecovered {
    pub store: &'static str,
    pub failures: u32,
}

impl StoreRecovered {
    pub fn emit(self, health: &Health) {
        health.set_ready(self.store);
        tracing::info!(
            store = self.store,
            failures = self.failures,
            "the store takes writes again; resuming"
        );
    }
}

/// The store refused a batch for what it holds; retried until [`POISON_ATTEMPTS`].
pub(super) struct StoreRefused<'a> {
    pub store: &'static str,
    pub code: &'static str,
    pub message: &'a str,
    pub refusals: u32,
    pub records: usize,
    /// `None`: the last refusal; the batch's records go on one at a time.
    pub retry_in: Option<Duration>,
}

impl StoreRefused<'_> {
    pub fn emit(self, m: &Metrics) {
        m.errors.inc();
        let (store, code, refusals, records) = (self.store, self.code, self.refusals, self.records);
        match self.retry_in {
            Some(retry_in) => {
                tracing::warn!(store, code, error = %self.message, refusals, records, ?retry_in, "the store refused transitions; retrying")
            }
            // The caller says what happens next (split the batch, or dead-letter the record).
            None => {
                tracing::debug!(store, code, error = %self.message, refusals, records, "the store refused transitions {POISON_ATTEMPTS} times in a row")
            }
        }
    }
}

/// Why a record went to the dead-letter topic.
pub(super) enum DeadLetterCause<'a> {
    /// It does not decode as a `FacilityStatus`.
    Undecodable,
    /// The store refused it [`POISON_ATTEMPTS`] times.
    Refused {
        store: &'static str,
        facility: &'a str,
        seq: i64,
    },
}

/// A record sent to the dead-letter topic.
pub(super) struct DeadLettered<'a> {
    pub cause: DeadLetterCause<'a>,
    pub code: &'static str,
    pub message: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub dead_letter_topic: &'a str,
}

impl DeadLettered<'_> {
    pub fn emit(self, m: &Metrics) {
        m.dead_letters.with_label_values(&[self.code]).inc();
        let (partition, offset, code, topic) = (
            self.partition,
            self.offset,
            self.code,
            self.dead_letter_topic,
        );
        match self.cause {
            DeadLetterCause::Undecodable => {
                tracing::warn!(partition, offset, code, error = %self.message, topic, "undecodable transition sent to the dead-letter topic");
            }
            DeadLetterCause::Refused {
                store,
                facility,
                seq,
            } => {
                tracing::error!(store, facility, seq, partition, offset, code, error = %self.message, topic, "the store refused a transition {POISON_ATTEMPTS} times; sent it to the dead-letter topic and moving on");
            }
        }
    }
}

/// The store lost its data: the loop reads `facility-status` again from the beginning.
pub(super) struct StoreEmptied<'a> {
    pub store: &'static str,
    pub why: &'a str,
    pub partitions: usize,
}

impl StoreEmptied<'_> {
    pub fn emit(self, m: &Metrics) {
        m.rewinds.inc();
        tracing::warn!(
            store = self.store,
            why = self.why,
            partitions = self.partitions,
            "the store lost its data; reading facility-status again from the beginning"
        );
    }
}
