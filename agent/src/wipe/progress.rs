//! Progress of one method on one disk: percent, MB/s and ETA, sent as
//! `wipe_progress` events (which `console::emit` also logs through tracing)
//! at most once a second, plus once at the end.
//!
//! It only reports; it never decides anything about the erase.

use std::sync::Arc;
use std::time::{Duration, Instant};

use warden_protocol::console::Event;

/// Where wipe events go: `crate::console::emit` on a node; tests and
/// benchmarks may collect or drop them.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

const INTERVAL: Duration = Duration::from_secs(1);

/// f64 → u64 for display figures: Rust's `as` saturates (NaN → 0), which is
/// exactly what a rate or an ETA wants.
#[allow(clippy::cast_possible_truncation)]
fn to_u64(x: f64) -> u64 {
    x as u64
}

/// Reports `done` out of `total` bytes for one method on one disk.
pub struct Meter {
    sink: Option<EventSink>,
    disk: String,
    method: String,
    total: u64,
    start: Instant,
    last: Option<Instant>,
    finished: bool,
}

impl Meter {
    pub fn new(sink: Option<EventSink>, disk: &str, method: &str, total: u64) -> Self {
        Meter {
            sink,
            disk: disk.to_string(),
            method: method.to_string(),
            total,
            start: Instant::now(),
            last: None,
            finished: false,
        }
    }

    /// Records progress; emits when a second has passed or the work is done.
    pub fn update(&mut self, done: u64) {
        let now = Instant::now();
        let complete = done >= self.total;
        if self.finished || (!complete && self.last.is_some_and(|t| now - t < INTERVAL)) {
            return;
        }
        if self.last.is_none() && !complete && now - self.start < INTERVAL {
            return;
        }
        self.last = Some(now);
        self.finished = complete;
        crate::telemetry::progress(
            "wipe",
            &format!("{} {}", self.disk, self.method),
            done.min(self.total),
            Some(self.total),
        );
        let Some(sink) = &self.sink else { return };
        let secs = (now - self.start).as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let percent = if self.total == 0 {
            100
        } else {
            u32::try_from(u128::from(done.min(self.total)) * 100 / u128::from(self.total))
                .unwrap_or(100)
        };
        let eta_s =
            (rate > 0.0).then(|| to_u64((self.total.saturating_sub(done) as f64 / rate).ceil()));
        sink(&Event::WipeProgress {
            disk: self.disk.clone(),
            method: self.method.clone(),
            percent,
            mb_per_s: to_u64(rate / 1e6),
            eta_s,
        });
    }

    /// A fraction in 0..=1 (hardware erases report that way).
    pub fn update_fraction(&mut self, f: f64) {
        let done = to_u64(f.clamp(0.0, 1.0) * self.total as f64);
        self.update(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn emits_the_end_once_and_not_every_update() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: EventSink = Arc::new(move |e: &Event| s.lock().unwrap().push(e.clone()));
        let mut m = Meter::new(Some(sink), "loop0", "zeroout", 100);
        for i in 0..100 {
            m.update(i);
        }
        m.update(100);
        m.update(100);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        match &seen[0] {
            Event::WipeProgress { percent, disk, .. } => {
                assert_eq!(*percent, 100);
                assert_eq!(disk, "loop0");
            }
            other => panic!("{other:?}"),
        }
    }
}
