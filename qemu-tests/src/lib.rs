//! The end-to-end harness: real swtpm, real `warden-attest-server`, real
//! `wardenctl`, and QEMU nodes (OVMF + swtpm + virtio/NVMe disks) booting the
//! real Warden ramdisk.
//!
//! It owns the processes it starts and stops each of them by PID on drop,
//! even when a test panics; it keeps the console and process logs of a
//! failed test under `target/qemu-tests-logs/`. It must never decide a
//! result for the parts under test (no canned answers, no timing
//! assertions), never touch networks other than loopback, QEMU's user
//! network and network namespaces it creates itself ([`netns`]), and never
//! pass silently when something it needs is missing: see [`skip_or_fail`].

pub mod console;
pub mod cpio;
pub mod evidence;
pub mod handoff;
pub mod http;
pub mod interrupt;
pub mod load;
pub mod lock;
pub mod netns;
pub mod node;
pub mod paths;
pub mod process;
pub mod secureboot;
pub mod server;
pub mod swtpm;
pub mod turnover;

pub use console::ConsoleWatcher;
pub use lock::QemuLock;
pub use node::{DiskBus, Node, NodeBuilder};
pub use paths::{ramdisk_dir, target_bin, target_dir, workspace_root, Ramdisk};
pub use server::Server;
pub use swtpm::{Swtpm, SwtpmTransport};

/// Environment variable that turns every skip into a failure (`scripts/test`
/// sets it to 1): on CI a missing prerequisite is a broken build, not a pass.
pub const REQUIRE_ENV: &str = "WARDEN_REQUIRE_QEMU";

/// Whether missing prerequisites must fail the test instead of skipping it.
pub fn skips_forbidden() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Reports a missing prerequisite: with `WARDEN_REQUIRE_QEMU=1` this panics
/// (the test fails, naming `reason`); otherwise it prints
/// `SKIPPED: <test>: <reason>` on stderr so the skip is visible, and the
/// caller returns.
#[allow(clippy::panic)] // Failing the calling test is the whole point.
pub fn skip_or_fail(test: &str, reason: &str) {
    if skips_forbidden() {
        panic!("{test}: prerequisite missing and {REQUIRE_ENV}=1: {reason}");
    }
    // Written to the stderr handle directly, not through eprintln!: libtest
    // captures the print macros of passing tests, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}

/// `Ok(value)` or, on a missing prerequisite, [`skip_or_fail`] and `None`.
/// Lets a test say `let Some(x) = prereq("t", thing()) else { return };`.
pub fn prereq<T>(test: &str, found: anyhow::Result<T>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(e) => {
            skip_or_fail(test, &format!("{e:#}"));
            None
        }
    }
}

/// What every QEMU-tier test needs — QEMU, swtpm_setup, the server and
/// wardenctl binaries, the built ramdisk — plus `programs`; `None` after
/// [`skip_or_fail`] said what is missing.
pub fn qemu_prerequisites(test: &str, programs: &[&str]) -> Option<Ramdisk> {
    let found = (|| {
        for program in ["qemu-system-x86_64", "swtpm_setup"].iter().chain(programs) {
            require_program(program)?;
        }
        target_bin("warden-attest-server")?;
        target_bin("wardenctl")?;
        ramdisk_dir()
    })();
    prereq(test, found)
}

/// Checks that an executable is on `PATH`; the error names it.
pub fn require_program(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("`{name}` is not on PATH (run scripts/setup)"))
}
