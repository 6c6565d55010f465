//! One QEMU node at a time on this 2-core machine, across threads of a test
//! binary and across test binaries and the bench.
//!
//! Tests that start nodes take a [`QemuLock`] first and keep it until their
//! nodes are dropped. The lock never starts or stops anything itself.

use std::fs::{File, OpenOptions};
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// Serializes threads inside this process (flock alone would not: the
/// test threads of one binary are one process).
static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Held while QEMU nodes run; released on drop.
#[derive(Debug)]
pub struct QemuLock {
    // Field order matters: the file lock is released before the mutex, so
    // the next thread in this process can take both.
    _file: Flock<File>,
    _thread: MutexGuard<'static, ()>,
}

impl QemuLock {
    /// Blocks until no other QEMU test (in this or another process) runs.
    pub fn acquire() -> Result<QemuLock> {
        // A test that panicked while holding the lock poisons it; the lock
        // protects no data, so carrying on is correct.
        let thread = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let dir = crate::paths::target_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("qemu-tests.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                // Say why the test seems to hang: another process runs QEMU.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "waiting for {} (another QEMU test or bench is running)",
                    path.display()
                );
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, errno)| anyhow!("flock {}: {errno}", path.display()))?
            }
            Err((_, errno)) => return Err(anyhow!("flock {}: {errno}", path.display())),
        };
        Ok(QemuLock {
            _file: file,
            _thread: thread,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn second_holder_waits_for_the_first() {
        let first = QemuLock::acquire().unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let got2 = Arc::clone(&got);
        let t = std::thread::spawn(move || {
            let _second = QemuLock::acquire().unwrap();
            got2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Whatever the scheduling, the second holder cannot be in yet.
        assert!(!got.load(Ordering::SeqCst));
        drop(first);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
