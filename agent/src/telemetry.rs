//! What the server's operators watch while a turnover runs: the console
//! lines and each step's progress, buffered here for the session forwarder
//! in [`crate::workflow`] to post (`/v1/session/console`,
//! `/v1/session/progress`).
//!
//! It is off until a turnover session starts, bounded (the oldest lines go
//! first: the ramdisk lives in RAM), and never blocks or fails the caller —
//! the console stays the record of last resort.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use warden_protocol::turnover::ProgressUpdate;

/// Lines held for the server at most; older ones are dropped (and counted).
pub const MAX_LINES: usize = 5_000;

#[derive(Default)]
struct Buffer {
    on: bool,
    lines: VecDeque<String>,
    dropped: u64,
    /// step → part → (done, total): a step's progress is the sum of its
    /// parts (wipe: one part per disk and method).
    progress: BTreeMap<String, BTreeMap<String, (u64, Option<u64>)>>,
    dirty: Vec<String>,
}

static BUFFER: Mutex<Option<Buffer>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Buffer) -> T) -> T {
    let mut guard = BUFFER.lock().unwrap_or_else(PoisonError::into_inner);
    f(guard.get_or_insert_with(Buffer::default))
}

/// Starts collecting (a turnover session began).
pub fn enable() {
    with(|b| b.on = true);
}

/// Stops collecting and forgets what was not sent.
pub fn disable() {
    with(|b| *b = Buffer::default());
}

/// One console line (without its newline); a no-op while off.
pub fn line(text: &str) {
    with(|b| {
        if !b.on {
            return;
        }
        if b.lines.len() >= MAX_LINES {
            b.lines.pop_front();
            b.dropped += 1;
        }
        b.lines.push_back(text.trim_end().to_owned());
    });
}

/// Progress of one part of a step (e.g. `wipe`, part `nvme0n1 zeroout`).
pub fn progress(step: &str, part: &str, done: u64, total: Option<u64>) {
    with(|b| {
        if !b.on {
            return;
        }
        b.progress
            .entry(step.to_owned())
            .or_default()
            .insert(part.to_owned(), (done, total));
        if !b.dirty.iter().any(|s| s == step) {
            b.dirty.push(step.to_owned());
        }
    });
}

/// What is waiting to be sent: console lines (a note first if some were
/// dropped) and one update per step that moved.
pub fn drain() -> (Vec<String>, Vec<ProgressUpdate>) {
    with(|b| {
        let mut lines = Vec::with_capacity(b.lines.len() + 1);
        if b.dropped > 0 {
            lines.push(format!(
                "[warden: {} console lines dropped: the server was unreachable]",
                b.dropped
            ));
            b.dropped = 0;
        }
        lines.extend(b.lines.drain(..));
        let updates = b
            .dirty
            .drain(..)
            .filter_map(|step| {
                let parts = b.progress.get(&step)?;
                let done = parts.values().map(|p| p.0).sum();
                let total = parts.values().map(|p| p.1).sum::<Option<u64>>();
                Some(ProgressUpdate { step, done, total })
            })
            .collect();
        (lines, updates)
    })
}

/// Puts lines back at the front after a failed send (bounded as usual).
pub fn requeue(lines: Vec<String>) {
    with(|b| {
        if !b.on {
            return;
        }
        for l in lines.into_iter().rev() {
            if b.lines.len() >= MAX_LINES {
                b.dropped += 1;
                continue;
            }
            b.lines.push_front(l);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the buffer is process-wide.
    #[test]
    fn collects_only_when_on_sums_parts_and_bounds_lines() {
        disable();
        line("before");
        progress("image", "all", 1, Some(2));
        assert_eq!(drain(), (vec![], vec![]));
        enable();
        line("a\n");
        progress("wipe", "loop0 zeroout", 10, Some(100));
        progress("wipe", "loop1 zeroout", 30, Some(100));
        progress("image", "all", 5, None);
        let (lines, updates) = drain();
        assert_eq!(lines, vec!["a".to_string()]);
        assert_eq!(
            updates,
            vec![
                ProgressUpdate {
                    step: "wipe".into(),
                    done: 40,
                    total: Some(200)
                },
                ProgressUpdate {
                    step: "image".into(),
                    done: 5,
                    total: None
                },
            ]
        );
        // Nothing moved: nothing to send.
        assert_eq!(drain(), (vec![], vec![]));
        for i in 0..MAX_LINES + 3 {
            line(&i.to_string());
        }
        let (lines, _) = drain();
        assert_eq!(lines.len(), MAX_LINES + 1);
        assert!(lines[0].contains("3 console lines dropped"), "{}", lines[0]);
        assert_eq!(lines[1], "3");
        requeue(vec!["x".into()]);
        assert_eq!(drain().0, vec!["x".to_string()]);
        disable();
    }
}
