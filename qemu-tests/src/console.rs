//! Reads a growing console file (QEMU's serial output, or an agent's stdout
//! on a host) and picks out the agent's `WARDEN {json}` lines.
//!
//! It only reads; it never interprets an event beyond its name and the
//! `fatal` check, so the assertions stay in the tests.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::process::POLL;

/// How many console lines an error message quotes.
pub const TAIL_LINES: usize = 40;

/// Incremental reader of one console file.
#[derive(Debug)]
pub struct ConsoleWatcher {
    path: PathBuf,
    /// Bytes consumed so far (complete lines only).
    offset: u64,
    /// Everything read so far, including a trailing partial line.
    text: Vec<u8>,
    events: Vec<Value>,
}

impl ConsoleWatcher {
    /// Watches `path`; the file need not exist yet.
    pub fn new(path: &Path) -> ConsoleWatcher {
        ConsoleWatcher {
            path: path.to_path_buf(),
            offset: 0,
            text: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended since the last call and parses complete
    /// lines; with `final_read`, a trailing partial line is parsed too (the
    /// writer has exited). Returns how many new events were found.
    pub fn poll(&mut self, final_read: bool) -> Result<usize> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("open {}", self.path.display())),
        };
        let already = u64::try_from(self.text.len()).unwrap_or(u64::MAX);
        f.seek(SeekFrom::Start(already))
            .with_context(|| format!("seek {}", self.path.display()))?;
        f.read_to_end(&mut self.text)
            .with_context(|| format!("read {}", self.path.display()))?;

        let before = self.events.len();
        let start = usize::try_from(self.offset).unwrap_or(usize::MAX);
        let pending = &self.text[start.min(self.text.len())..];
        let complete = if final_read {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
        };
        for line in String::from_utf8_lossy(&pending[..complete]).lines() {
            if let Some(v) = warden_protocol::console::parse_line(line) {
                self.events.push(v);
            }
        }
        self.offset += u64::try_from(complete).unwrap_or(0);
        Ok(self.events.len() - before)
    }

    /// All events parsed so far, in order.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// The first event named `name` seen so far.
    pub fn find(&self, name: &str) -> Option<&Value> {
        self.events.iter().find(|e| event_name(e) == Some(name))
    }

    /// The first `fatal` event seen so far.
    pub fn fatal(&self) -> Option<&Value> {
        self.find("fatal")
    }

    /// The whole console so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }

    /// The last [`TAIL_LINES`] lines, for error messages.
    pub fn tail(&self) -> String {
        crate::process::tail_lines(&self.text(), TAIL_LINES)
    }

    /// Polls until an event named `name` appears and returns it.
    ///
    /// `exited` is asked after each poll whether the writer is gone (e.g.
    /// QEMU exited); it returns a description of how it ended. The wait
    /// ends early with an error when the writer exits without the event, or
    /// when a `fatal` event appears (unless `fatal` is what was asked for).
    /// Every error quotes the last console lines.
    pub fn wait_for(
        &mut self,
        name: &str,
        timeout: Duration,
        mut exited: impl FnMut() -> Result<Option<String>>,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let gone = exited()?;
            // After the writer is gone one last read sees everything it wrote.
            self.poll(gone.is_some())?;
            if let Some(v) = self.find(name) {
                return Ok(v.clone());
            }
            if name != "fatal" {
                if let Some(f) = self.fatal() {
                    return Err(anyhow!(
                        "fatal event while waiting for `{name}` in {}: {f}\n--- last console lines ---\n{}",
                        self.path.display(),
                        self.tail()
                    ));
                }
            }
            if let Some(how) = gone {
                return Err(anyhow!(
                    "{how} before event `{name}` appeared in {}\n--- last console lines ---\n{}",
                    self.path.display(),
                    self.tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "timed out after {timeout:?} waiting for event `{name}` in {}\n--- last console lines ---\n{}",
                    self.path.display(),
                    self.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether a complete console line (trailing CR/whitespace trimmed)
    /// ends with `suffix`. Kernel timestamps or a half-flushed agent line
    /// may precede the text on the same line, hence "ends with".
    pub fn has_line_ending_with(&self, suffix: &str) -> bool {
        let start = usize::try_from(self.offset).unwrap_or(usize::MAX);
        String::from_utf8_lossy(&self.text[..start.min(self.text.len())])
            .lines()
            .any(|l| l.trim_end().ends_with(suffix))
    }

    /// Polls until a console line ends with `suffix` (not an agent event:
    /// e.g. the tenant's `TENANT-BOOTED`). `exited` as in
    /// [`ConsoleWatcher::wait_for`]; `give_up` is asked after each poll with
    /// the events so far and ends the wait with its reason (e.g. the
    /// ramdisk started a second time). Every error quotes the last lines.
    pub fn wait_for_line(
        &mut self,
        suffix: &str,
        timeout: Duration,
        mut exited: impl FnMut() -> Result<Option<String>>,
        mut give_up: impl FnMut(&[Value]) -> Option<String>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let gone = exited()?;
            self.poll(gone.is_some())?;
            if self.has_line_ending_with(suffix) {
                return Ok(());
            }
            let why = match (give_up(&self.events), gone) {
                (Some(why), _) => Some(why),
                (None, Some(how)) => Some(how),
                (None, None) if Instant::now() >= deadline => {
                    Some(format!("timed out after {timeout:?}"))
                }
                (None, None) => None,
            };
            if let Some(why) = why {
                return Err(anyhow!(
                    "{why} before a line ending with `{suffix}` appeared in {}\n--- last console lines ---\n{}",
                    self.path.display(),
                    self.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The `event` tag of a parsed console event.
pub fn event_name(v: &Value) -> Option<&str> {
    v.get("event").and_then(Value::as_str)
}

/// The events of `events` named `name`, in order.
pub fn events_named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| event_name(e) == Some(name))
        .collect()
}

/// Parses every `WARDEN {json}` line in `text` (e.g. a host agent's stdout).
pub fn parse_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(warden_protocol::console::parse_line)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut w = ConsoleWatcher::new(&path);
        assert_eq!(w.poll(false).unwrap(), 0, "missing file is just empty");

        let mut f = File::create(&path).unwrap();
        f.write_all(b"[    0.1] Linux\r\nWARDEN {\"event\":\"ready\",\"bo")
            .unwrap();
        assert_eq!(w.poll(false).unwrap(), 0);
        f.write_all(b"ot_ms\":5}\r\n").unwrap();
        assert_eq!(w.poll(false).unwrap(), 1);
        assert_eq!(w.find("ready").unwrap()["boot_ms"], 5);

        // A last line without newline counts once the writer is gone.
        f.write_all(b"WARDEN {\"event\":\"fatal\",\"error\":\"x\",\"action\":\"halt\"}")
            .unwrap();
        assert_eq!(w.poll(false).unwrap(), 0);
        assert_eq!(w.poll(true).unwrap(), 1);
        assert!(w.fatal().is_some());
        assert!(w.text().starts_with("[    0.1] Linux"));
    }
}
