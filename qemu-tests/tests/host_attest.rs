//! Host tier of attestation: the real agent in host mode against a real
//! swtpm (TCP) whose PCRs hold a replayed real firmware event log (OVMF under
//! QEMU), the real attestation server on 127.0.0.1 trusting swtpm-localca as
//! the EK manufacturer, and the real wardenctl for the owner's side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use warden_agent::tpm::{EkAlgorithm, Tpm};
use warden_protocol::attest::{AK_ECC, AK_RSA};
use warden_protocol::hello::node_id_for_ek;
use warden_qemu_tests::console::{event_name, parse_events};
use warden_qemu_tests::evidence::{fixture_event_log, fixture_pcrs, replay_event_log_into_pcrs};
use warden_qemu_tests::process::run_with_timeout;
use warden_qemu_tests::swtpm::LOCALCA_DIR;
use warden_qemu_tests::{prereq, require_program, target_bin, Server, Swtpm, SwtpmTransport};

/// The agent binary, or None after reporting why the test cannot run.
fn prerequisites(test: &str) -> Option<PathBuf> {
    let found = (|| {
        require_program("swtpm_setup")?;
        target_bin("warden-attest-server")?;
        target_bin("wardenctl")?;
        let issuer = Path::new(LOCALCA_DIR).join("issuercert.pem");
        if !issuer.is_file() {
            anyhow::bail!(
                "{} is missing: swtpm-localca has not issued an EK certificate yet",
                issuer.display()
            );
        }
        target_bin("warden-agent")
    })();
    prereq(test, found)
}

/// A directory holding copies of the named swtpm-localca *certificates*
/// only: the localca directory itself also holds the CA's private keys.
fn ca_dir(files: &[&str]) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("warden-ek-ca-")
        .tempdir()
        .unwrap();
    for name in files {
        std::fs::copy(Path::new(LOCALCA_DIR).join(name), dir.path().join(name)).unwrap();
    }
    dir
}

fn server_trusting(dir: Option<&TempDir>) -> Server {
    let args: Vec<OsString> = match dir {
        Some(dir) => vec!["--manufacturer-ca-dir".into(), dir.path().into()],
        None => Vec::new(),
    };
    Server::start_with_args(&args).unwrap()
}

/// A swtpm whose SHA-256 PCRs hold what OVMF measured in the fixture boot.
fn swtpm_with_fixture_pcrs() -> Swtpm {
    let tpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();
    let mut handle = Tpm::open(&tpm.tcti().unwrap()).unwrap();
    replay_event_log_into_pcrs(&mut handle, &std::fs::read(fixture_event_log()).unwrap()).unwrap();
    // swtpm's TCP port serves one client at a time: let the agent in.
    drop(handle);
    tpm
}

struct Run {
    out: Output,
    events: Vec<Value>,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "agent exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.out.status,
            String::from_utf8_lossy(&self.out.stdout),
            String::from_utf8_lossy(&self.out.stderr)
        )
    }

    fn event(&self, name: &str) -> &Value {
        self.events
            .iter()
            .find(|e| event_name(e) == Some(name))
            .unwrap_or_else(|| panic!("no `{name}` event\n{}", self.describe()))
    }

    fn has(&self, name: &str) -> bool {
        self.events.iter().any(|e| event_name(e) == Some(name))
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

fn run_agent(agent: &Path, server: &Server, tpm: &Swtpm, extra: &[&str]) -> Run {
    let mut cmd = Command::new(agent);
    cmd.arg("--server")
        .arg(server.url())
        .arg("--ca")
        .arg(server.ca_pin())
        .arg("--tcti")
        .arg(tpm.tcti().unwrap())
        .arg("--event-log")
        .arg(fixture_event_log())
        .args(["--max-attempts", "3", "--log", "debug"])
        .args(extra);
    let out = run_with_timeout("warden-agent", &mut cmd, Duration::from_secs(180)).unwrap();
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    Run { out, events }
}

fn wardenctl(server: &Server, args: &[&str]) -> String {
    let out = server.wardenctl(args).unwrap();
    assert!(
        out.status.success(),
        "wardenctl {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn replayed_fixture_log_gives_the_fixture_pcrs() {
    let Some(_) = prereq("host_attest_replay", require_program("swtpm_setup")) else {
        return;
    };
    let tpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();
    let mut handle = Tpm::open(&tpm.tcti().unwrap()).unwrap();
    let log = std::fs::read(fixture_event_log()).unwrap();
    let extended = replay_event_log_into_pcrs(&mut handle, &log).unwrap();
    assert!(extended > 10, "only {extended} events extended");

    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_pcrs()).unwrap()).unwrap();
    let bank = handle.pcr_bank_sha256().unwrap();
    for pcr in 0..=9u32 {
        assert_eq!(
            hex(&bank[&pcr]),
            expected["values"][pcr.to_string()].as_str().unwrap(),
            "PCR {pcr} after replay differs from the fixture"
        );
    }
}

#[test]
fn node_without_policy_is_refused_then_passes_with_the_learned_policy() {
    let Some(agent) = prerequisites("host_attest_policy") else {
        return;
    };
    let cas = ca_dir(&["issuercert.pem"]);
    let server = server_trusting(Some(&cas));
    let tpm = swtpm_with_fixture_pcrs();

    // First boot: enrolled, but the node has no policy yet.
    let first = run_agent(&agent, &server, &tpm, &[]);
    assert!(!first.out.status.success(), "{}", first.describe());
    let node_id = first.event("tpm_ready")["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let enrolled = first.event("enrolled");
    assert_eq!(enrolled["node_id"], node_id.as_str(), "{enrolled}");
    assert_eq!(enrolled["ak_algorithm"], AK_RSA, "{enrolled}");
    // The server says which of its manufacturer CAs vouched for the EK.
    assert!(
        enrolled["ek_trust"]
            .as_str()
            .unwrap()
            .contains("issuercert.pem"),
        "{enrolled}"
    );
    let verdict = first.event("verdict");
    assert_eq!(verdict["status"], "failed", "{verdict}");
    assert!(verdict["policy"].is_null(), "{verdict}");
    assert_eq!(
        verdict["codes"],
        serde_json::json!(["no-policy"]),
        "{verdict}"
    );
    let reason = verdict["reasons"][0].as_str().unwrap().to_string();
    assert!(
        first
            .stderr()
            .contains(&format!("attestation FAILED: {reason}")),
        "the reason is not printed for a person\n{}",
        first.describe()
    );
    assert!(!first.has("ready"), "{}", first.describe());
    let fatal = first.event("fatal");
    assert!(
        fatal["error"].as_str().unwrap().contains(&reason),
        "{fatal}"
    );
    // The refusal is recorded: the server's own verdict for the node agrees.
    let latest: Value =
        serde_json::from_str(&wardenctl(&server, &["verdict", &node_id, "--json"])).unwrap();
    assert_eq!(latest["status"], "failed", "{latest}");
    assert_eq!(
        latest["attestation_id"], verdict["attestation_id"],
        "{latest}"
    );

    // The owner learns a policy from that (genuine) evidence and assigns it.
    wardenctl(
        &server,
        &["policy", "learn", &node_id, "--name", "fixture", "--store"],
    );
    wardenctl(
        &server,
        &["policy", "assign", "fixture", "--node", &node_id],
    );

    // Second boot on the same TPM (PCRs unchanged): a new AK, verdict OK.
    let second = run_agent(&agent, &server, &tpm, &[]);
    assert!(second.out.status.success(), "{}", second.describe());
    assert_ne!(
        second.event("enrolled")["ak_name"],
        enrolled["ak_name"],
        "the AK must be new on every boot"
    );
    let verdict = second.event("verdict");
    assert_eq!(verdict["status"], "ok", "{verdict}");
    assert_eq!(verdict["policy"]["name"], "fixture", "{verdict}");
    assert_eq!(verdict["reasons"], serde_json::json!([]), "{verdict}");
    second.event("ready");
    assert!(!second.has("fatal"), "{}", second.describe());
    // Order: enrolled, then verdict, then ready.
    let position = |name: &str| {
        second
            .events
            .iter()
            .position(|e| event_name(e) == Some(name))
            .unwrap()
    };
    assert!(position("hello_ok") < position("enrolled"));
    assert!(position("enrolled") < position("verdict"));
    assert!(position("verdict") < position("ready"));
}

#[test]
fn untrusted_ek_is_fatal_until_the_owner_registers_it() {
    let Some(agent) = prerequisites("host_attest_untrusted_ek") else {
        return;
    };
    let server = server_trusting(None);
    let tpm = swtpm_with_fixture_pcrs();

    let refused = run_agent(&agent, &server, &tpm, &[]);
    assert!(!refused.out.status.success(), "{}", refused.describe());
    assert!(!refused.has("enrolled"), "{}", refused.describe());
    assert!(!refused.has("verdict"), "{}", refused.describe());
    // Permanent: no retry of the enrollment.
    assert!(
        !refused
            .events
            .iter()
            .any(|e| event_name(e) == Some("retry") && e["step"] == "enroll"),
        "{}",
        refused.describe()
    );
    let error = refused.event("fatal")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("HTTP 403")
            && error.contains("EK not trusted")
            && error.contains("ek_untrusted"),
        "the fatal error does not carry the server's refusal: {error}"
    );

    // The owner registers the EK by its hash (= the node id).
    let node_id = refused.event("tpm_ready")["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    wardenctl(
        &server,
        &["node", "add", "--ek-sha256", &node_id, "--note", "rack 1"],
    );
    let registered = run_agent(&agent, &server, &tpm, &[]);
    let enrolled = registered.event("enrolled");
    assert_eq!(enrolled["node_id"], node_id.as_str(), "{enrolled}");
    assert!(
        enrolled["ek_trust"]
            .as_str()
            .unwrap()
            .contains("registered"),
        "{enrolled}"
    );
    // Enrolled, then refused for want of a policy: attestation still ran.
    assert_eq!(
        registered.event("verdict")["codes"],
        serde_json::json!(["no-policy"])
    );
}

#[test]
fn ek_certificate_from_an_untrusted_issuer_is_refused_naming_the_issuer() {
    let Some(agent) = prerequisites("host_attest_wrong_issuer") else {
        return;
    };
    // Only the root: the EK certificate's issuer (issuercert.pem) is not in
    // the directory, and the server trusts direct issuers only.
    let cas = ca_dir(&["swtpm-localca-rootca-cert.pem"]);
    let server = server_trusting(Some(&cas));
    let tpm = swtpm_with_fixture_pcrs();
    let run = run_agent(&agent, &server, &tpm, &[]);
    assert!(!run.out.status.success(), "{}", run.describe());
    assert!(!run.has("enrolled"), "{}", run.describe());
    let error = run.event("fatal")["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("EK not trusted") && error.contains("issued by"),
        "the fatal error does not name the EK certificate's issuer: {error}"
    );
}

#[test]
fn ecc_ak_enrolls_and_attests() {
    let Some(agent) = prerequisites("host_attest_ecc") else {
        return;
    };
    let cas = ca_dir(&["issuercert.pem"]);
    let server = server_trusting(Some(&cas));
    let tpm = swtpm_with_fixture_pcrs();
    let run = run_agent(&agent, &server, &tpm, &["--ak", "ecc"]);
    let enrolled = run.event("enrolled");
    assert_eq!(enrolled["ak_algorithm"], AK_ECC, "{enrolled}");
    // The quote verified (signature, nonce, PCR digest, log replay): the
    // only complaint is the missing policy.
    let verdict = run.event("verdict");
    assert_eq!(
        verdict["codes"],
        serde_json::json!(["no-policy"]),
        "{verdict}"
    );
    let node_id = enrolled["node_id"].as_str().unwrap();
    let ak: Value =
        serde_json::from_str(&admin_get(&server, &format!("/v1/nodes/{node_id}/ak"))).unwrap();
    assert_eq!(ak["algorithm"], AK_ECC, "{ak}");
    assert_eq!(ak["name"], enrolled["ak_name"], "{ak}");
}

#[test]
fn ecc_ek_enrolls_after_registration_and_attests() {
    let Some(agent) = prerequisites("host_attest_ecc_ek") else {
        return;
    };
    // The manufacturer CA is trusted, but swtpm_setup certifies only the
    // RSA-2048 and P-384 EKs: the P-256 EK has no certificate.
    let cas = ca_dir(&["issuercert.pem"]);
    let server = server_trusting(Some(&cas));
    let tpm = swtpm_with_fixture_pcrs();
    let expected_node = {
        let mut handle = Tpm::open(&tpm.tcti().unwrap()).unwrap();
        let ek = handle
            .endorsement_key_for(EkAlgorithm::EccNistP256)
            .unwrap();
        assert!(ek.certificate_der.is_none(), "swtpm certified a P-256 EK");
        node_id_for_ek(&ek.public_key_der)
    };

    let refused = run_agent(&agent, &server, &tpm, &["--ek", "ecc"]);
    assert!(!refused.out.status.success(), "{}", refused.describe());
    let ready = refused.event("tpm_ready");
    assert_eq!(ready["ek_algorithm"], "ecc-nist-p256", "{ready}");
    assert_eq!(ready["ek_certificate"], false, "{ready}");
    assert_eq!(ready["node_id"], expected_node.as_str(), "{ready}");
    assert!(!refused.has("enrolled"), "{}", refused.describe());
    let error = refused.event("fatal")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("ek_untrusted"),
        "an uncertified ECC EK must be refused until registered: {error}"
    );

    // The owner registers the ECC EK by its hash (= the node id).
    wardenctl(
        &server,
        &[
            "node",
            "add",
            "--ek-sha256",
            &expected_node,
            "--note",
            "ecc ek",
        ],
    );
    for ak in ["rsa", "ecc"] {
        let run = run_agent(&agent, &server, &tpm, &["--ek", "ecc", "--ak", ak]);
        assert_eq!(
            run.event("tpm_ready")["node_id"],
            expected_node.as_str(),
            "the same EK, the same node id, every boot"
        );
        let enrolled = run.event("enrolled");
        assert_eq!(enrolled["node_id"], expected_node.as_str(), "{enrolled}");
        assert_eq!(
            enrolled["ak_algorithm"],
            if ak == "rsa" { AK_RSA } else { AK_ECC },
            "{enrolled}"
        );
        assert!(
            enrolled["ek_trust"]
                .as_str()
                .unwrap()
                .contains("registered"),
            "{enrolled}"
        );
        // ActivateCredential under the ECC EK worked and the quote of the AK
        // under it verified: the only complaint is the missing policy.
        let verdict = run.event("verdict");
        assert_eq!(verdict["status"], "failed", "{verdict}");
        assert_eq!(
            verdict["codes"],
            serde_json::json!(["no-policy"]),
            "{verdict}"
        );
        let bound: Value = serde_json::from_str(&admin_get(
            &server,
            &format!("/v1/nodes/{expected_node}/ak"),
        ))
        .unwrap();
        assert_eq!(bound["name"], enrolled["ak_name"], "{bound}");
    }
}

/// `GET` an admin endpoint with curl (wardenctl has no command for it).
fn admin_get(server: &Server, path: &str) -> String {
    let token = std::fs::read_to_string(server.admin_token_file()).unwrap();
    let mut cmd = Command::new(require_program("curl").unwrap());
    cmd.args(["--silent", "--show-error", "--fail-with-body", "--cacert"])
        .arg(server.ca_pem())
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .arg(format!("{}{path}", server.url()));
    let out = run_with_timeout("curl", &mut cmd, Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "curl {path}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
