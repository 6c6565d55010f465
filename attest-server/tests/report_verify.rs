//! End to end: the real `warden-attest-server` serves its report-signing key
//! at `GET /v1/keys`, a report signed with the key in its data directory is
//! accepted by the real `wardenctl report verify` (keys fetched from the
//! server, or from a file), and refused once any byte changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use warden_attest_server::client::https_client;
use warden_attest_server::keys::{ReportKey, REPORT_KEY_FILE};
use warden_protocol::agentlog::{AgentEvent, EventKind, AGENT_PCR};
use warden_protocol::attest::{PolicyRef, Status};
use warden_protocol::report::{
    HandoffSummary, KeyList, Outcome, Report, StepTiming, VerdictSummary, REPORT_FORMAT,
};
use warden_protocol::turnover::Handoff;

mod common;

const SERVER: &str = common::SERVER;
const WARDENCTL: &str = env!("CARGO_BIN_EXE_wardenctl");

/// A running server process; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts the server as `tests/api.rs` does and waits for its banner.
    fn start(data_dir: &Path, log: &Path) -> Server {
        let (child, url) = common::spawn_server(data_dir, log);
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wardenctl(args: &[&str]) -> Output {
    Command::new(WARDENCTL)
        .args(args)
        .env_remove("WARDEN_TOKEN")
        .env_remove("WARDEN_SERVER")
        .env_remove("WARDEN_CA")
        .output()
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A report as the lead's assembly would fill it, small but complete.
fn report() -> Report {
    let kernel = warden_protocol::sha256_hex(b"tenant kernel");
    let log = vec![AgentEvent {
        pcr: AGENT_PCR,
        kind: EventKind::HandoffKernel,
        digest: kernel.clone(),
        record: None,
        description: "handoff-kernel /boot/vmlinuz".into(),
    }];
    let pcr13 = hex::encode(warden_protocol::agentlog::replay([&hex::decode(&kernel)
        .unwrap()
        .try_into()
        .unwrap()]));
    let verdict = |id: i64| VerdictSummary {
        attestation_id: id,
        status: Status::Ok,
        policy: Some(PolicyRef {
            name: "lab".into(),
            version: 2,
        }),
        time: "2026-03-01T10:00:00Z".into(),
        reasons: vec![],
    };
    Report {
        format: REPORT_FORMAT,
        node_id: "a1b2c3".into(),
        lease_id: "lease-42".into(),
        lessee: Some("tenant-b".into()),
        owner: Some("lab".into()),
        outcome: Outcome::Ok,
        failure: None,
        boot_verdict: verdict(1),
        final_verdict: Some(verdict(2)),
        disks: vec![],
        image: None,
        restore: None,
        snapshot: None,
        handoff: Some(HandoffSummary::from_agent_log(Handoff::Kexec, &log)),
        agent_log: log,
        pcrs: BTreeMap::from([(0, "00".repeat(32)), (AGENT_PCR, pcr13)]),
        steps: vec![StepTiming {
            step: "handoff".into(),
            ok: true,
            started_at: "2026-03-01T10:00:01Z".into(),
            finished_at: "2026-03-01T10:00:02Z".into(),
            duration_ms: 1000,
            bytes: 0,
        }],
        started_at: "2026-03-01T10:00:00Z".into(),
        finished_at: "2026-03-01T10:00:02Z".into(),
        signed_at: "2026-03-01T10:00:03Z".into(),
    }
}

#[tokio::test]
async fn wardenctl_verifies_a_report_signed_with_the_server_key() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &tmp.path().join("server.log"));
    let ca_file = data.join("ca.pem");
    let ca = ca_file.to_str().unwrap();

    // The key file: created 0600, 32 bytes.
    let key_file = data.join(REPORT_KEY_FILE);
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let key = ReportKey::load_or_create(&key_file).unwrap();

    // GET /v1/keys needs no token and serves exactly that key.
    let http = https_client(&std::fs::read(&ca_file).unwrap()).unwrap();
    let resp = http
        .get(format!("{}/v1/keys", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let keys_json = resp.bytes().await.unwrap().to_vec();
    let list: KeyList = serde_json::from_slice(&keys_json).unwrap();
    assert_eq!(list, key.key_list());
    assert_eq!(list.keys[0].algorithm, "ed25519");

    let signed = key.sign(report());
    let file = tmp.path().join("report.json");
    std::fs::write(&file, signed.to_file_bytes()).unwrap();
    let file_arg = file.to_str().unwrap();
    let want = format!(
        "report verified: node a1b2c3, lease lease-42, outcome ok, key {}",
        key.key_id()
    );

    // Keys from the server.
    let out = wardenctl(&[
        "report",
        "verify",
        file_arg,
        "--server",
        &server.url,
        "--ca",
        ca,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), want);

    // The global --server/--ca work too.
    let out = wardenctl(&[
        "--server",
        &server.url,
        "--ca",
        ca,
        "report",
        "verify",
        file_arg,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Offline: /v1/keys's JSON, and a raw base64 key.
    let keys_file = tmp.path().join("keys.json");
    std::fs::write(&keys_file, &keys_json).unwrap();
    let out = wardenctl(&[
        "report",
        "verify",
        file_arg,
        "--key",
        keys_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), want);
    let raw_file = tmp.path().join("key.b64");
    // The list's public_key is the raw key in base64.
    let listed = serde_json::to_value(&list.keys[0]).unwrap();
    let raw = listed["public_key"].as_str().unwrap();
    assert_eq!(raw.len(), 44);
    std::fs::write(&raw_file, format!("{raw}\n")).unwrap();
    let out = wardenctl(&[
        "report",
        "verify",
        file_arg,
        "--key",
        raw_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // One byte changed: in the lease id, and (separately) in the signature.
    let bytes = signed.to_file_bytes();
    let lease_at = text(&bytes).find("lease-42").unwrap() + "lease-".len();
    let sig_at = text(&bytes).find(r#""value":""#).unwrap() + r#""value":""#.len() + 5;
    for (what, at) in [("lease id", lease_at), ("signature", sig_at)] {
        let mut changed = bytes.clone();
        changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
        let bad = tmp.path().join("changed.json");
        std::fs::write(&bad, &changed).unwrap();
        for key_args in [
            vec!["--server", server.url.as_str(), "--ca", ca],
            vec!["--key", keys_file.to_str().unwrap()],
        ] {
            let mut args = vec!["report", "verify", bad.to_str().unwrap()];
            args.extend(key_args);
            let out = wardenctl(&args);
            assert!(!out.status.success(), "{what}: accepted");
            let err = text(&out.stderr);
            assert!(err.contains("refused"), "{what}: {err}");
            assert!(!text(&out.stdout).contains("verified"), "{what}");
        }
    }

    // Re-indented: refused as not the signed bytes.
    let pretty = tmp.path().join("pretty.json");
    std::fs::write(&pretty, serde_json::to_vec_pretty(&signed).unwrap()).unwrap();
    let out = wardenctl(&[
        "report",
        "verify",
        pretty.to_str().unwrap(),
        "--key",
        keys_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not the bytes the server signed"),
        "{}",
        text(&out.stderr)
    );

    // Another server's key: refused, naming both key ids.
    let other = ReportKey::generate().unwrap();
    let other_file = tmp.path().join("other.json");
    std::fs::write(&other_file, serde_json::to_vec(&other.key_list()).unwrap()).unwrap();
    let out = wardenctl(&[
        "report",
        "verify",
        file_arg,
        "--key",
        other_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(key.key_id()) && err.contains(other.key_id()),
        "{err}"
    );

    // No key source at all: says what to pass.
    let out = wardenctl(&["report", "verify", file_arg]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--key"), "{}", text(&out.stderr));
}

#[test]
fn server_keeps_its_report_key_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("data");
    let first = {
        let _server = Server::start(&data, &tmp.path().join("1.log"));
        ReportKey::load_or_create(&data.join(REPORT_KEY_FILE))
            .unwrap()
            .key_id()
            .to_owned()
    };
    let _server = Server::start(&data, &tmp.path().join("2.log"));
    let again = ReportKey::load_or_create(&data.join(REPORT_KEY_FILE)).unwrap();
    assert_eq!(again.key_id(), first);

    // A key file others can read stops the server, naming the file.
    drop(_server);
    let key_file = data.join(REPORT_KEY_FILE);
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(SERVER)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(key_file.to_str().unwrap()), "{err}");
}
