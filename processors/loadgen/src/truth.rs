//! The ground truth of a run (`presence loadgen --truth FILE`): every heartbeat with its
//! event time, as JSON lines. [`Truth`] writes it; [`read_truth`] reads it back, for the
//! tests' oracle (`presence_testkit::oracle`). One line is the heartbeat's JSON with its
//! event time `ts` (ms): `{"ts":…,"session_id":…,…}`.

use std::io::Write;

use presence_core::records::{Heartbeat, HeartbeatKind};

/// One heartbeat with its event time (the Kafka record timestamp it has, or is to have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRecord {
    pub ts: i64,
    pub heartbeat: Heartbeat,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TruthLine<'a> {
    ts: i64,
    #[serde(flatten)]
    heartbeat: std::borrow::Cow<'a, Heartbeat>,
}

/// `h` with its event time as a ground-truth line (no newline).
pub fn truth_line(h: &Heartbeat, ts: i64) -> String {
    let line = TruthLine {
        ts,
        heartbeat: std::borrow::Cow::Borrowed(h),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// Reads a ground-truth file, sorted by `ts`.
pub fn read_truth(path: &std::path::Path) -> std::io::Result<Vec<SimRecord>> {
    use std::io::BufRead;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(std::fs::File::open(path)?)
        .lines()
        .enumerate()
    {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: TruthLine = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), n + 1),
            )
        })?;
        out.push(SimRecord {
            ts: parsed.ts,
            heartbeat: parsed.heartbeat.into_owned(),
        });
    }
    out.sort_by_key(|r| r.ts);
    Ok(out)
}

/// The ground-truth file being written. Exact in Kafka mode (the record timestamp is the
/// time stamped here); through the gateway, the gateway's receive time is a few ms later.
///
/// So that the truth orders every facility's events without ties, event times are even
/// milliseconds, strictly increasing per facility (a beat that moves a session counts for
/// both facilities): with an odd session timeout, no expiry falls on a beat's instant.
pub(crate) struct Truth {
    out: std::io::BufWriter<std::fs::File>,
    /// The first write error (through the gateway, lines are written by the workers).
    error: Option<std::io::Error>,
    last_at_facility: std::collections::HashMap<String, i64>,
    facility_of_session: std::collections::HashMap<String, String>,
}

impl Truth {
    pub(crate) fn create(path: &std::path::Path) -> anyhow::Result<Truth> {
        let file = std::fs::File::create(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the ground-truth file {}: {e}",
                path.display()
            )
        })?;
        Ok(Truth {
            out: std::io::BufWriter::new(file),
            error: None,
            last_at_facility: Default::default(),
            facility_of_session: Default::default(),
        })
    }

    /// The event time for `h` sent at `now`: even, and after every earlier event of the
    /// facilities it touches.
    pub(crate) fn stamp(&mut self, h: &Heartbeat, now: i64) -> i64 {
        let previous = match h.kind {
            HeartbeatKind::Beat => self
                .facility_of_session
                .insert(h.session_id.clone(), h.facility_id.clone()),
            HeartbeatKind::End => self.facility_of_session.remove(&h.session_id),
        };
        let touched = [
            Some(h.facility_id.clone()),
            previous.filter(|p| *p != h.facility_id),
        ];
        let mut ts = now - now.rem_euclid(2);
        for f in touched.iter().flatten() {
            if let Some(last) = self.last_at_facility.get(f) {
                ts = ts.max(last + 2);
            }
        }
        for f in touched.into_iter().flatten() {
            self.last_at_facility.insert(f, ts);
        }
        ts
    }

    /// Writes `h` at `ts`; the first error is kept for [`Truth::flush`] to report.
    pub(crate) fn write(&mut self, h: &Heartbeat, ts: i64) {
        if let Err(e) = writeln!(self.out, "{}", truth_line(h, ts)) {
            self.error.get_or_insert(e);
        }
    }

    pub(crate) fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(e) = self.error.take() {
            anyhow::bail!("cannot write the ground-truth file: {e}");
        }
        self.out.flush()?;
        Ok(())
    }

    /// The first write error so far, if any (taken: reported once).
    pub(crate) fn take_error(&mut self) -> Option<std::io::Error> {
        self.error.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truth_file_reads_back_sorted_with_its_times() {
        let path = std::env::temp_dir().join(format!("truth-{}", std::process::id()));
        let h = |session: &str, kind| Heartbeat {
            session_id: session.into(),
            user_id: "u".into(),
            facility_id: crate::facility_id(1),
            region_id: crate::region_of(1, 2),
            kind,
            client_sent_at: Some(5),
            client_version: None,
        };
        let mut truth = Truth::create(&path).expect("create");
        let (a, b) = (h("a", HeartbeatKind::Beat), h("a", HeartbeatKind::End));
        // The same facility twice in one millisecond: the second is stamped 2 ms later.
        let (ta, tb) = (truth.stamp(&a, 1_001), truth.stamp(&b, 1_001));
        assert_eq!((ta, tb), (1_000, 1_002));
        truth.write(&b, tb);
        truth.write(&a, ta);
        truth.flush().expect("flush");
        drop(truth);
        let read = read_truth(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            read,
            vec![
                SimRecord {
                    ts: ta,
                    heartbeat: a
                },
                SimRecord {
                    ts: tb,
                    heartbeat: b
                }
            ]
        );
    }
}
