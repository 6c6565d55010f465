//! The load generator (`warden-load`, issue #9) against the real server
//! binary with real swtpm evidence, at a small scale: every attestation must
//! come back OK and the report's counts must add up. Never a timing
//! assertion: latencies are reported, not judged, here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;
use warden_qemu_tests::{prereq, require_program, target_bin};

fn prerequisites(test: &str) -> Option<()> {
    prereq(
        test,
        (|| {
            require_program("swtpm")?;
            target_bin("warden-attest-server").map(drop)
        })(),
    )
}

/// Runs warden-load with `args` and returns its JSON report; fails with its
/// stderr when it exits non-zero.
fn run_load(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_warden-load"))
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "warden-load {args:?} failed ({}):\n{stderr}",
        out.status
    );
    eprintln!("{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "warden-load printed no JSON report ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn u(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report has no count {key}: {report:#}"))
}

/// The counts every report must satisfy, whatever stopped the run.
fn assert_counts_add_up(report: &Value) {
    let started = u(report, "attestations_started");
    assert_eq!(
        u(report, "ok") + u(report, "refused") + u(report, "errors"),
        started,
        "{report:#}"
    );
    assert_eq!(
        u(report, "failed"),
        u(report, "refused") + u(report, "errors"),
        "{report:#}"
    );
    // One nonce request per attestation; an attest request for each that got a quote.
    assert_eq!(u(&report["nonce_latency"], "count"), started, "{report:#}");
    assert_eq!(u(&report["attest_latency"], "count"), started, "{report:#}");
    assert_eq!(u(&report["tpm_time"], "count"), started, "{report:#}");
    for kind in ["nonce_latency", "attest_latency"] {
        let p = &report[kind];
        let (p50, p99, max) = (
            p["p50_ms"].as_f64().unwrap(),
            p["p99_ms"].as_f64().unwrap(),
            p["max_ms"].as_f64().unwrap(),
        );
        assert!(p50 <= p99 && p99 <= max, "{kind}: {p:#}");
    }
}

#[test]
fn fifty_agents_attest_without_a_single_failure() {
    if prerequisites("fifty_agents_attest_without_a_single_failure").is_none() {
        return;
    }
    let report = run_load(&[
        "--agents",
        "50",
        "--attestations",
        "300",
        "--concurrency",
        "16",
        "--tpms",
        "4",
    ]);
    assert_eq!(u(&report, "agents"), 50, "{report:#}");
    assert_eq!(report["stopped_by"], "count", "{report:#}");
    assert_eq!(u(&report, "attestations_started"), 300, "{report:#}");
    assert_eq!(u(&report, "ok"), 300, "every verdict OK: {report:#}");
    assert_eq!(u(&report, "errors"), 0, "{report:#}");
    assert_eq!(u(&report, "refused"), 0, "{report:#}");
    assert_eq!(report["failures"], Value::Array(vec![]), "{report:#}");
    assert_counts_add_up(&report);
}

#[test]
fn the_time_bound_stops_new_attestations() {
    if prerequisites("the_time_bound_stops_new_attestations").is_none() {
        return;
    }
    // Far more attestations than 2 s allow: the clock, not the count, ends it.
    let report = run_load(&[
        "--agents",
        "8",
        "--attestations",
        "1000000",
        "--concurrency",
        "4",
        "--tpms",
        "2",
        "--max-seconds",
        "2",
    ]);
    assert_eq!(report["stopped_by"], "time", "{report:#}");
    let started = u(&report, "attestations_started");
    assert!(started > 0 && started < 1_000_000, "{report:#}");
    assert_eq!(u(&report, "ok"), started, "{report:#}");
    assert_counts_add_up(&report);
}
