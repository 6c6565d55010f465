//! The attestation attack scenarios of issue #3, each against the real
//! server binary and real TPM evidence from swtpm: a forging agent drives
//! the HTTP API directly and must be refused with its specific reason.
//!
//! Evidence is made consistent the way a real boot makes it: a captured
//! OVMF event log (protocol/tests/data) is replayed into a fresh swtpm's
//! PCRs, and the quote over them is genuine. Firmware changes (Secure Boot,
//! a different firmware build, a different ramdisk) are an edited copy of
//! that log replayed into another TPM — exactly what such a boot would
//! measure — checked against a policy learned from the unedited boot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tempfile::TempDir;
use warden_agent::tpm::{AkAlgorithm, AttestationKey, Tpm};
use warden_protocol::attest::{
    codes, ActivateRequest, AkPublic, AttestRequest, EnrollChallenge, EnrollRequest, Enrolled,
    NonceRequest, NonceResponse, Status, Verdict, AK_ECC, AK_RSA,
};
use warden_protocol::efi;
use warden_protocol::eventlog::{self, EventLog, HashAlg, TPM_ALG_SHA256};
use warden_protocol::hello::{EkPublic, PcrBank};
use warden_protocol::PROTOCOL_VERSION;
use warden_qemu_tests::evidence::{fixture_event_log, replay_event_log_into_pcrs};
use warden_qemu_tests::swtpm::manufacturer_ca_dir;
use warden_qemu_tests::{prereq, require_program, target_bin, Server, Swtpm, SwtpmTransport};

/// Everything the tests need before they can run, or None after saying why.
fn prerequisites(test: &str) -> Option<()> {
    prereq(
        test,
        (|| {
            require_program("swtpm_setup")?;
            target_bin("warden-attest-server")?;
            target_bin("wardenctl").map(drop)
        })(),
    )
}

fn localca_dir() -> TempDir {
    manufacturer_ca_dir().unwrap()
}

fn fixture_log() -> Vec<u8> {
    std::fs::read(fixture_event_log()).unwrap()
}

/// A server and a blocking HTTP client for its API.
struct Api {
    server: Server,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    token: String,
    _cas: Option<TempDir>,
}

impl Api {
    fn start(cas: Option<TempDir>, extra: &[&str]) -> Api {
        let mut args: Vec<OsString> = extra.iter().map(OsString::from).collect();
        if let Some(dir) = &cas {
            args.push("--manufacturer-ca-dir".into());
            args.push(dir.path().into());
        }
        let server = Server::start_with_args(&args).unwrap();
        let pem = std::fs::read(server.ca_pem()).unwrap();
        let http = warden_attest_server::client::https_client(&pem).unwrap();
        let token = std::fs::read_to_string(server.admin_token_file())
            .unwrap()
            .trim()
            .to_owned();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Api {
            server,
            http,
            rt,
            token,
            _cas: cas,
        }
    }

    /// POSTs `body`; Ok(reply) on 2xx, Err((status, message)) otherwise.
    fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, (u16, String)> {
        let url = format!("{}{path}", self.server.url());
        self.rt.block_on(async {
            let r = self
                .http
                .post(&url)
                .bearer_auth(&self.token)
                .json(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            if (200..300).contains(&status) {
                Ok(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}")))
            } else {
                Err((status, text))
            }
        })
    }

    fn wardenctl(&self, args: &[&str]) -> String {
        self.server.wardenctl_ok(args).unwrap()
    }

    /// Learns policy `name` from `node`'s latest attestation and assigns it.
    fn learn_and_assign(&self, node: &str, name: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.json");
        let file = file.to_str().unwrap();
        self.wardenctl(&["policy", "learn", node, "--name", name, "--out", file]);
        self.wardenctl(&["policy", "put", file]);
        self.wardenctl(&["policy", "assign", name, "--node", node]);
    }
}

/// One TPM (a swtpm process) with the agent's view of it.
struct Node {
    tpm: Tpm,
    swtpm: Swtpm,
    node_id: String,
    ek: EkPublic,
    ak: Option<AttestationKey>,
}

impl Node {
    /// A fresh swtpm whose PCRs hold what the firmware of `log` measured.
    fn boot(log: &[u8]) -> Node {
        let swtpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();
        Self::on(swtpm, log)
    }

    fn on(swtpm: Swtpm, log: &[u8]) -> Node {
        let mut tpm = Tpm::open(&swtpm.tcti().unwrap()).unwrap();
        replay_event_log_into_pcrs(&mut tpm, log).unwrap();
        let ek = tpm.endorsement_key().unwrap();
        let ek = EkPublic {
            algorithm: ek.algorithm.to_owned(),
            public_key_der: ek.public_key_der,
            tpm_public: ek.tpm_public,
            certificate_der: ek.certificate_der,
        };
        Node {
            tpm,
            swtpm,
            node_id: warden_protocol::hello::node_id_for_ek(&ek.public_key_der),
            ek,
            ak: None,
        }
    }

    fn new_ak(&mut self, algorithm: AkAlgorithm) -> AttestationKey {
        self.tpm.create_ak(algorithm).unwrap()
    }

    fn enroll_request(&self, ak: &AttestationKey) -> EnrollRequest {
        EnrollRequest {
            protocol: PROTOCOL_VERSION,
            ek: self.ek.clone(),
            ak: AkPublic {
                algorithm: match ak.algorithm {
                    AkAlgorithm::Rsa2048RsassaSha256 => AK_RSA.to_owned(),
                    AkAlgorithm::EccP256EcdsaSha256 => AK_ECC.to_owned(),
                },
                tpm_public: ak.tpm_public.clone(),
            },
        }
    }

    /// Enrolls a new AK honestly; it becomes this node's AK.
    fn enroll(&mut self, api: &Api, algorithm: AkAlgorithm) -> Enrolled {
        let ak = self.new_ak(algorithm);
        let challenge: EnrollChallenge = api.post("/v1/enroll", &self.enroll_request(&ak)).unwrap();
        assert_eq!(challenge.node_id, self.node_id);
        let secret = self
            .tpm
            .activate_credential(&ak, &challenge.id_object, &challenge.encrypted_secret)
            .unwrap();
        let enrolled: Enrolled = api
            .post(
                "/v1/enroll/activate",
                &ActivateRequest {
                    enrollment_id: challenge.enrollment_id,
                    secret,
                },
            )
            .unwrap();
        assert_eq!(enrolled.ak_name, hex::encode(&ak.name));
        self.ak = Some(ak);
        enrolled
    }

    fn nonce(&self, api: &Api) -> NonceResponse {
        api.post(
            "/v1/attest/nonce",
            &NonceRequest {
                node_id: self.node_id.clone(),
            },
        )
        .unwrap()
    }

    /// A genuine attestation request over `pcrs` with `nonce`, signed by `ak`.
    fn evidence(
        &mut self,
        ak: &AttestationKey,
        nonce: &[u8],
        pcrs: &[u32],
        log: &[u8],
    ) -> AttestRequest {
        let quote = self.tpm.quote(ak, nonce, pcrs).unwrap();
        AttestRequest {
            protocol: PROTOCOL_VERSION,
            node_id: self.node_id.clone(),
            ak_name: hex::encode(&ak.name),
            nonce: nonce.to_vec(),
            quote: quote.attest,
            signature: quote.signature,
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values: quote
                    .pcr_values
                    .iter()
                    .map(|(i, v)| (*i, hex::encode(v)))
                    .collect(),
            },
            event_log: Some(log.to_vec()),
            phase: Default::default(),
            agent_log: Vec::new(),
        }
    }

    /// Nonce → quote with this node's AK → request, then `tweak`, then POST.
    fn attest_with(
        &mut self,
        api: &Api,
        log: &[u8],
        tweak: impl FnOnce(&mut AttestRequest),
    ) -> Verdict {
        let nonce = self.nonce(api);
        let ak = self.ak.clone().expect("enrolled");
        let mut request = self.evidence(&ak, &nonce.nonce, &nonce.pcrs, log);
        tweak(&mut request);
        api.post("/v1/attest", &request).unwrap()
    }

    fn attest(&mut self, api: &Api, log: &[u8]) -> Verdict {
        self.attest_with(api, log, |_| {})
    }
}

/// A server trusting swtpm-localca, a node booted with the fixture log,
/// enrolled, with a policy learned from its first attestation: its second
/// attestation is OK.
fn good_node(test: &str) -> Option<(Api, Node)> {
    prerequisites(test)?;
    let mut node = Node::boot(&fixture_log());
    let api = Api::start(Some(localca_dir()), &[]);
    node.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    let first = node.attest(&api, &fixture_log());
    assert_reason(&first, codes::NO_POLICY);
    api.learn_and_assign(&node.node_id, "ovmf-fixture");
    let ok = node.attest(&api, &fixture_log());
    assert_eq!(ok.status, Status::Ok, "{ok:#?}");
    assert!(ok.reasons.is_empty());
    Some((api, node))
}

#[track_caller]
fn assert_reason(v: &Verdict, code: &str) -> String {
    assert_eq!(v.status, Status::Failed, "{v:#?}");
    assert!(
        v.reasons.iter().any(|r| r.code == code),
        "expected a `{code}` reason, got {:#?}",
        v.reasons
    );
    v.reasons
        .iter()
        .map(|r| r.message.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The fixture log with `edit` applied, re-encoded.
fn edited_log(edit: impl FnOnce(&mut EventLog)) -> Vec<u8> {
    let mut log = eventlog::parse(&fixture_log()).unwrap();
    edit(&mut log);
    eventlog::encode(&log)
}

fn sha256_digest_mut(event: &mut eventlog::Event) -> &mut Vec<u8> {
    &mut event
        .digests
        .iter_mut()
        .find(|(alg, _)| *alg == TPM_ALG_SHA256)
        .unwrap()
        .1
}

/// Boots a second node with `log` that uses node 1's policy (same firmware
/// family), and returns its verdict.
fn other_boot_verdict(api: &Api, first: &Node, log: &[u8]) -> Verdict {
    let mut node = Node::boot(log);
    node.enroll(api, AkAlgorithm::EccP256EcdsaSha256);
    api.wardenctl(&["policy", "assign", "ovmf-fixture", "--node", &node.node_id]);
    assert_ne!(node.node_id, first.node_id);
    node.attest(api, log)
}

// 1
#[test]
fn replayed_nonce_is_refused() {
    let Some((api, mut node)) = good_node("replayed_nonce_is_refused") else {
        return;
    };
    let nonce = node.nonce(&api);
    let ak = node.ak.clone().unwrap();
    let request = node.evidence(&ak, &nonce.nonce, &nonce.pcrs, &fixture_log());
    let first: Verdict = api.post("/v1/attest", &request).unwrap();
    assert_eq!(first.status, Status::Ok, "{first:#?}");
    let again: Verdict = api.post("/v1/attest", &request).unwrap();
    let why = assert_reason(&again, codes::NONCE_REPLAYED);
    assert!(why.contains("already used"), "{why}");
}

// 2
#[test]
fn expired_nonce_is_refused() {
    if prerequisites("expired_nonce_is_refused").is_none() {
        return;
    }
    let mut node = Node::boot(&fixture_log());
    let api = Api::start(Some(localca_dir()), &["--nonce-ttl", "1"]);
    node.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    let v = node.attest_with(&api, &fixture_log(), |_| {
        // Outlive the nonce's 1 s lifetime before sending.
        std::thread::sleep(Duration::from_millis(2500));
    });
    let why = assert_reason(&v, codes::NONCE_EXPIRED);
    assert!(why.contains("lifetime is 1 s"), "{why}");
}

// 3
#[test]
fn quote_signed_by_another_key_is_refused() {
    let Some((api, mut node)) = good_node("quote_signed_by_another_key_is_refused") else {
        return;
    };
    let other = node.new_ak(AkAlgorithm::Rsa2048RsassaSha256);
    let enrolled_name = hex::encode(&node.ak.as_ref().unwrap().name);
    let nonce = node.nonce(&api);
    let mut request = node.evidence(&other, &nonce.nonce, &nonce.pcrs, &fixture_log());
    // Claim the enrolled AK signed it.
    request.ak_name = enrolled_name;
    let v: Verdict = api.post("/v1/attest", &request).unwrap();
    let why = assert_reason(&v, codes::SIGNATURE);
    assert!(why.contains("enrolled AK did not sign this quote"), "{why}");
}

// 4
#[test]
fn unknown_ak_is_refused() {
    let Some((api, mut node)) = good_node("unknown_ak_is_refused") else {
        return;
    };
    let other = node.new_ak(AkAlgorithm::EccP256EcdsaSha256);
    let nonce = node.nonce(&api);
    let request = node.evidence(&other, &nonce.nonce, &nonce.pcrs, &fixture_log());
    let v: Verdict = api.post("/v1/attest", &request).unwrap();
    let why = assert_reason(&v, codes::AK_UNKNOWN);
    assert!(why.contains(&hex::encode(&other.name)), "{why}");
}

// 5
#[test]
fn ak_not_bound_to_the_ek_is_refused() {
    let Some((api, mut node)) = good_node("ak_not_bound_to_the_ek_is_refused") else {
        return;
    };
    // A credential answered wrongly (as by an agent whose AK is not in the
    // EK's TPM) binds nothing.
    let rogue = node.new_ak(AkAlgorithm::Rsa2048RsassaSha256);
    let challenge: EnrollChallenge = api
        .post("/v1/enroll", &node.enroll_request(&rogue))
        .unwrap();
    let (status, body) = api
        .post::<_, Enrolled>(
            "/v1/enroll/activate",
            &ActivateRequest {
                enrollment_id: challenge.enrollment_id.clone(),
                secret: vec![0x42; 32],
            },
        )
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("AK not bound to this EK"), "{body}");
    // One try only: the right answer afterwards is refused too.
    let secret = node
        .tpm
        .activate_credential(&rogue, &challenge.id_object, &challenge.encrypted_secret)
        .unwrap();
    let (status, _) = api
        .post::<_, Enrolled>(
            "/v1/enroll/activate",
            &ActivateRequest {
                enrollment_id: challenge.enrollment_id,
                secret,
            },
        )
        .unwrap_err();
    assert_eq!(status, 404);
    // The rogue AK's quotes are not accepted.
    let nonce = node.nonce(&api);
    let request = node.evidence(&rogue, &nonce.nonce, &nonce.pcrs, &fixture_log());
    let v: Verdict = api.post("/v1/attest", &request).unwrap();
    assert_reason(&v, codes::AK_UNKNOWN);

    // A node that skipped ActivateCredential altogether has no AK at all.
    let mut skipper = Node::boot(&fixture_log());
    let ak = skipper.new_ak(AkAlgorithm::Rsa2048RsassaSha256);
    let _: EnrollChallenge = api
        .post("/v1/enroll", &skipper.enroll_request(&ak))
        .unwrap();
    let nonce = skipper.nonce(&api);
    let request = skipper.evidence(&ak, &nonce.nonce, &nonce.pcrs, &fixture_log());
    let v: Verdict = api.post("/v1/attest", &request).unwrap();
    let why = assert_reason(&v, codes::NOT_ENROLLED);
    assert!(why.contains("no enrolled AK"), "{why}");
}

// 6
#[test]
fn ek_certificate_from_an_untrusted_ca_is_refused() {
    if prerequisites("ek_certificate_from_an_untrusted_ca_is_refused").is_none() {
        return;
    }
    let mut node = Node::boot(&fixture_log());
    // The "manufacturer" directory holds some other CA: a Warden server's own.
    let stranger = Api::start(None, &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        stranger.server.ca_pem(),
        dir.path().join("other-vendor.pem"),
    )
    .unwrap();
    let api = Api::start(Some(dir), &[]);
    let ak = node.new_ak(AkAlgorithm::Rsa2048RsassaSha256);
    let (status, body) = api
        .post::<_, EnrollChallenge>("/v1/enroll", &node.enroll_request(&ak))
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("EK not trusted"), "{body}");
    assert!(body.contains("swtpm-localca"), "names the issuer: {body}");
    assert!(
        body.contains("not a manufacturer CA this server trusts"),
        "{body}"
    );

    // An owner's registration of the EK hash is trusted instead.
    api.wardenctl(&[
        "node",
        "add",
        "--ek-sha256",
        &node.node_id,
        "--group",
        "rack-7",
    ]);
    let enrolled = node.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    assert_eq!(enrolled.node_id, node.node_id);
}

// 7
#[test]
fn an_edited_event_digest_in_the_log_is_refused() {
    let Some((api, mut node)) = good_node("an_edited_event_digest_in_the_log_is_refused") else {
        return;
    };
    // The TPM measured the real boot; the log sent claims a different kernel.
    let forged = edited_log(|log| {
        let e = log
            .events
            .iter_mut()
            .find(|e| e.pcr == 4 && e.event_type.to_string() == "EV_EFI_BOOT_SERVICES_APPLICATION")
            .unwrap();
        sha256_digest_mut(e)[0] ^= 0xff;
    });
    let v = node.attest(&api, &forged);
    let why = assert_reason(&v, codes::LOG_MISMATCH);
    assert_eq!(v.reasons[0].pcr, Some(4), "{why}");
    assert!(
        why.contains("PCR 4") && why.contains("EV_EFI_BOOT_SERVICES_APPLICATION"),
        "{why}"
    );
}

// 8
#[test]
fn pcr_values_not_matching_the_quote_are_refused() {
    let Some((api, mut node)) = good_node("pcr_values_not_matching_the_quote_are_refused") else {
        return;
    };
    let v = node.attest_with(&api, &fixture_log(), |r| {
        r.pcrs.values.insert(7, "00".repeat(32));
    });
    let why = assert_reason(&v, codes::PCR_DIGEST);
    assert!(why.contains("pcrDigest"), "{why}");
}

// 9
#[test]
fn a_quote_over_fewer_pcrs_than_the_policy_needs_is_refused() {
    let Some((api, mut node)) =
        good_node("a_quote_over_fewer_pcrs_than_the_policy_needs_is_refused")
    else {
        return;
    };
    let nonce = node.nonce(&api);
    assert!(
        nonce.pcrs.contains(&9),
        "the server asks for the policy's PCRs"
    );
    let ak = node.ak.clone().unwrap();
    let request = node.evidence(&ak, &nonce.nonce, &[0, 1, 2, 3, 4, 5, 6, 7], &fixture_log());
    let v: Verdict = api.post("/v1/attest", &request).unwrap();
    let why = assert_reason(&v, codes::PCR_SELECTION);
    assert!(why.contains("needs PCR [8, 9]"), "{why}");
}

// 10
#[test]
fn secure_boot_turned_on_fails_on_pcr7() {
    let Some((api, node)) = good_node("secure_boot_turned_on_fails_on_pcr7") else {
        return;
    };
    let log = edited_log(|log| {
        let e = log
            .events
            .iter_mut()
            .find(|e| {
                e.pcr == 7
                    && efi::parse_variable_data(&e.data).is_ok_and(|v| v.name == "SecureBoot")
            })
            .unwrap();
        *e.data.last_mut().unwrap() = 1;
        *sha256_digest_mut(e) = HashAlg::Sha256.digest(&e.data);
    });
    let v = other_boot_verdict(&api, &node, &log);
    let why = assert_reason(&v, codes::POLICY_EVENT);
    assert!(
        why.contains("PCR7: SecureBoot changed from 0 to 1"),
        "{why}"
    );
}

// 11
#[test]
fn a_different_firmware_build_fails_on_pcr0() {
    let Some((api, node)) = good_node("a_different_firmware_build_fails_on_pcr0") else {
        return;
    };
    let log = edited_log(|log| {
        let e = log
            .events
            .iter_mut()
            .find(|e| {
                e.pcr == 0
                    && e.event_type
                        .to_string()
                        .starts_with("EV_EFI_PLATFORM_FIRMWARE_BLOB")
            })
            .unwrap();
        sha256_digest_mut(e)[5] ^= 0x11;
    });
    let v = other_boot_verdict(&api, &node, &log);
    let why = assert_reason(&v, codes::POLICY_EVENT);
    assert_eq!(v.reasons[0].pcr, Some(0));
    assert!(why.contains("PCR0: firmware blob digest"), "{why}");
    assert!(why.contains("policy ovmf-fixture v1"), "{why}");
}

// 12
#[test]
fn a_different_ramdisk_kernel_or_initrd_fails_on_pcr4_and_pcr9() {
    let Some((api, node)) =
        good_node("a_different_ramdisk_kernel_or_initrd_fails_on_pcr4_and_pcr9")
    else {
        return;
    };
    let log = edited_log(|log| {
        for e in log.events.iter_mut() {
            let kernel =
                e.pcr == 4 && e.event_type.to_string() == "EV_EFI_BOOT_SERVICES_APPLICATION";
            let initrd = e.pcr == 9 && e.data.ends_with(b"Linux initrd\0");
            if kernel || initrd {
                sha256_digest_mut(e)[0] ^= 0x01;
            }
        }
    });
    let v = other_boot_verdict(&api, &node, &log);
    let why = assert_reason(&v, codes::POLICY_EVENT);
    let pcrs: Vec<Option<u32>> = v.reasons.iter().map(|r| r.pcr).collect();
    assert_eq!(pcrs, vec![Some(4), Some(9)], "{why}");
    assert!(why.contains("PCR4: boot application digest"), "{why}");
    assert!(why.contains("PCR9: Linux initrd digest"), "{why}");
}

// 13
#[test]
fn reset_count_going_backwards_is_refused() {
    if prerequisites("reset_count_going_backwards_is_refused").is_none() {
        return;
    }
    let api = Api::start(Some(localca_dir()), &[]);
    // Provision a TPM, power it off in order, and keep that state: the
    // "old" TPM. (An unorderly power-off would leave the clock unsafe.)
    let mut first = Swtpm::start(SwtpmTransport::Tcp).unwrap();
    Tpm::open(&first.tcti().unwrap())
        .unwrap()
        .shutdown_clear()
        .unwrap();
    first.stop();
    let old_state: PathBuf = first.state_dir();

    // Boot 1 and boot 2 of the same TPM: resetCount grows.
    let mut boot1 = Node::on(
        Swtpm::start_from_state(SwtpmTransport::Tcp, &old_state).unwrap(),
        &fixture_log(),
    );
    boot1.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    assert_reason(&boot1.attest(&api, &fixture_log()), codes::NO_POLICY);
    boot1.tpm.shutdown_clear().unwrap();
    boot1.swtpm.stop();
    let mut boot2 = Node::on(
        Swtpm::start_from_state(SwtpmTransport::Tcp, &boot1.swtpm.state_dir()).unwrap(),
        &fixture_log(),
    );
    assert_eq!(boot2.node_id, boot1.node_id, "same TPM, same EK");
    boot2.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    assert_reason(&boot2.attest(&api, &fixture_log()), codes::NO_POLICY);

    // The TPM's state rolled back to before boot 2.
    let mut rolled_back = Node::on(
        Swtpm::start_from_state(SwtpmTransport::Tcp, &old_state).unwrap(),
        &fixture_log(),
    );
    rolled_back.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    let v = rolled_back.attest(&api, &fixture_log());
    let why = assert_reason(&v, codes::RESET_BACKWARDS);
    assert!(why.contains("resetCount went backwards"), "{why}");

    let list = api.wardenctl(&["attestations", &boot1.node_id, "--json"]);
    let list: warden_protocol::attest::AttestationList = serde_json::from_str(&list).unwrap();
    let resets: Vec<Option<u32>> = list.attestations.iter().map(|a| a.reset_count).collect();
    assert!(resets[1] > resets[2], "newest first: {resets:?}");
}

// 14
#[test]
fn node_a_evidence_presented_as_node_b_is_refused() {
    let Some((api, mut a)) = good_node("node_a_evidence_presented_as_node_b_is_refused") else {
        return;
    };
    let mut b = Node::boot(&fixture_log());
    b.enroll(&api, AkAlgorithm::Rsa2048RsassaSha256);
    let b_ak_name = hex::encode(&b.ak.as_ref().unwrap().name);

    // A's nonce and A's quote, sent as B (claiming B's AK).
    let v = a.attest_with(&api, &fixture_log(), |r| {
        r.node_id.clone_from(&b.node_id);
        r.ak_name.clone_from(&b_ak_name);
    });
    let why = assert_reason(&v, codes::NONCE_OTHER_NODE);
    assert!(
        why.contains(&a.node_id) && why.contains(&b.node_id),
        "{why}"
    );

    // B's own nonce, but A's TPM signs: not B's AK.
    let nonce = b.nonce(&api);
    let a_ak = a.ak.clone().unwrap();
    let mut request = a.evidence(&a_ak, &nonce.nonce, &nonce.pcrs, &fixture_log());
    request.node_id.clone_from(&b.node_id);
    request.ak_name = b_ak_name;
    let v: Verdict = api.post("/v1/attest", &request).unwrap();
    assert_reason(&v, codes::SIGNATURE);

    // Every attempt is in the audit log with its reason.
    let log = api.wardenctl(&["attestations", &b.node_id]);
    assert!(log.contains("was issued to node"), "{log}");
    let verdict = api.wardenctl(&["verdict", &b.node_id]);
    assert!(verdict.contains("FAILED"), "{verdict}");
}
