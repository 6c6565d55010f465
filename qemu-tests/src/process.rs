//! Child processes the harness owns: started with a parent-death signal,
//! stopped by PID (SIGTERM, then SIGKILL after a grace period) on drop.
//!
//! It only ever signals the PIDs it spawned itself, never processes found by
//! name.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a child gets to exit after SIGTERM before it is killed.
pub const GRACE: Duration = Duration::from_secs(3);

/// How often waits poll.
pub const POLL: Duration = Duration::from_millis(25);

/// A child process that is stopped when this guard drops.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

/// Makes the kernel kill the child if the thread that spawned it dies
/// (e.g. the test binary is killed), so no QEMU or swtpm outlives its test.
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // one prctl(2) syscall, which is async-signal-safe; it touches no memory
    // shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

impl ChildGuard {
    /// Spawns `cmd`; `name` is used in errors and logs.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<ChildGuard> {
        set_parent_death_signal(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child,
            status: None,
        })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "{} (pid {}) still running after {:?}",
                    self.name,
                    self.pid(),
                    timeout
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, wait up to [`GRACE`], then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(raw) = i32::try_from(self.child.id()) {
            // The child is not reaped yet (try_wait said so), so the PID is
            // still ours and cannot have been reused.
            let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
        if self.wait_timeout(GRACE).is_ok() {
            return;
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.status = Some(status);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `cmd` to completion with stdout/stderr captured, killing it after
/// `timeout`. Output is collected through files so a chatty child never
/// blocks on a full pipe.
pub fn run_with_timeout(name: &str, cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = tempfile::tempfile().context("temp file for stdout")?;
    let err = tempfile::tempfile().context("temp file for stderr")?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().context("dup stdout file")?)
        .stderr(err.try_clone().context("dup stderr file")?);
    let mut guard = ChildGuard::spawn(name, cmd)?;
    let waited = guard.wait_timeout(timeout);
    let status = match waited {
        Ok(s) => s,
        Err(e) => {
            guard.stop();
            let stderr = read_all(&err);
            return Err(e.context(format!("{name} timed out; its stderr:\n{stderr}")));
        }
    };
    Ok(Output {
        status,
        stdout: read_all(&out).into_bytes(),
        stderr: read_all(&err).into_bytes(),
    })
}

fn read_all(mut f: &std::fs::File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `text`, for error messages.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_stops_a_child_that_ignores_nothing() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let guard = ChildGuard::spawn("sleep", &mut cmd).unwrap();
        let pid = guard.pid();
        drop(guard);
        // Reaped by stop(): signal 0 to the PID finds no process.
        let raw = i32::try_from(pid).unwrap();
        assert_eq!(
            kill(Pid::from_raw(raw), None),
            Err(nix::errno::Errno::ESRCH)
        );
    }

    #[test]
    fn sigterm_ignored_means_sigkill() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; exec sleep 600"]);
        let mut guard = ChildGuard::spawn("stubborn", &mut cmd).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        guard.stop();
        let status = guard.try_wait().unwrap().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn run_with_timeout_captures_and_times_out() {
        let out = run_with_timeout(
            "echo",
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

        let err = run_with_timeout(
            "sleeper",
            Command::new("sh").args(["-c", "echo started >&2; sleep 600"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sleeper timed out"), "{msg}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
