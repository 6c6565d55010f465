//! The load generator's parts (`warden-load`, issue #9): a pool of swtpm
//! processes that stand in for thousands of distinct TPMs, and the latency
//! statistics the generator reports.
//!
//! One swtpm per simulated node would be thousands of processes; instead each
//! swtpm of the pool hosts many nodes. A node is its Endorsement Key: node
//! `i` gets the ECC P-256 EK of the TCG default template (L-2, the agent's
//! `warden.ek=ecc`) with the template's `unique` field set from `i`, so
//! TPM2_CreatePrimary derives a different key for every node from the same
//! endorsement seed. Node `i`'s AK is an ECC P-256 AK created under that EK,
//! so ActivateCredential against the server's MakeCredential for EK `i`
//! succeeds only on that EK, and its private blob loads only under it: node
//! `i` always lives on swtpm `i % pool size`.
//!
//! Why not the agent's facade ([`warden_agent::tpm::Tpm`]) for this: it
//! derives only the default-template EK (or takes the one persisted at the
//! EK handle). Switching nodes through it meant re-persisting an EK (NV
//! writes) and re-opening the TPM twice per job: 4-5 times slower, and
//! 10,000 enrollments took far more than a few minutes. Here each swtpm has
//! one ESYS context for the whole run and every command is one a TPM-backed
//! agent sends (CreatePrimary, Create/Load of the AK under the EK's
//! PolicySecret, ActivateCredential, Quote); the facade still replays the
//! event log. After ActivateCredential the node's loaded AK is kept as a
//! saved context (TPM2_ContextSave), so a quote is ContextLoad + Quote +
//! FlushContext. Fewer commands matter twice: tpm2-tss's swtpm TCTI opens a
//! TCP connection per command, and each leaves a TIME_WAIT socket on
//! loopback for a minute (a 10,000-agent run leaves tens of thousands for
//! a while; other tests that pick TCP ports may find fewer free).
//!
//! Each swtpm's PCRs hold the captured OVMF boot (its event log replayed once
//! at start, never extended afterwards), so every quote is genuine and
//! matches the log the node sends.
//!
//! Niceness ([`TpmPool::start_with_nice`]): on a real site the 10,000 TPMs
//! are in 10,000 other machines and cost the server no CPU; here the swtpms
//! (and the threads that marshal their commands) share the machine's cores
//! with the server under test. Lowering their CPU priority lets the server
//! be measured as it would run, with the TPMs still in the loop (an
//! attestation still waits for its real quote). A run at nice 0 measures
//! the server competing with its own load generator.
//!
//! This module owns those swtpm processes and the TPM traffic of the
//! simulated nodes. It must never decide a verdict, never make TPM answers
//! up (every key, credential and quote comes from a real swtpm), never leave
//! a transient object or session loaded after a job, and never touch a TPM
//! other than its own swtpms on 127.0.0.1.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::{Digest as _, Sha256};
use tss_esapi::{
    abstraction::{ak as tss_ak, ek as tss_ek, AsymmetricAlgorithmSelection, DefaultKey},
    constants::SessionType,
    handles::{AuthHandle, KeyHandle, SessionHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm},
        ecc::EccCurve,
        resource_handles::Hierarchy,
        session_handles::{AuthSession, PolicySession},
    },
    structures::{
        Data, EccParameter, EccPoint, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot,
        Private, Public, SignatureScheme, SymmetricDefinition,
    },
    traits::{Marshall, UnMarshall},
    utils::TpmsContext,
    Context, TctiNameConf,
};
use warden_agent::tpm::{EkAlgorithm, Tpm};
use warden_protocol::hello::EkPublic;

use crate::evidence::replay_event_log_into_pcrs;
use crate::{Swtpm, SwtpmTransport};

/// The EK every simulated node uses: ECC P-256, the fast one on swtpm.
pub const NODE_EK: EkAlgorithm = EkAlgorithm::EccNistP256;

/// The `unique` field (x, y) of node `node`'s EK template: two SHA-256
/// digests of the node number, so each node derives its own key.
fn ek_unique(node: u64) -> (Vec<u8>, Vec<u8>) {
    let part = |label: &[u8]| {
        let mut h = Sha256::new();
        h.update(b"warden-load node EK ");
        h.update(label);
        h.update(node.to_be_bytes());
        h.finalize().to_vec()
    };
    (part(b"x"), part(b"y"))
}

/// A simulated node's AK: ECDSA P-256 over SHA-256, created under its EK.
#[derive(Clone, Debug)]
pub struct NodeAk {
    /// Marshalled TPMT_PUBLIC, as TPM2_Create returned it.
    pub tpm_public: Vec<u8>,
    /// 0x000B ‖ SHA-256(`tpm_public`): what MakeCredential binds to.
    pub name: Vec<u8>,
    private: Private,
}

/// One quote, in the wire form of `AttestRequest`.
#[derive(Clone, Debug)]
pub struct NodeQuote {
    /// Marshalled TPMS_ATTEST.
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE.
    pub signature: Vec<u8>,
    /// The quoted SHA-256 PCRs.
    pub pcr_values: BTreeMap<u32, [u8; 32]>,
}

/// One swtpm's connection, hosting many nodes.
pub struct NodeTpm {
    ctx: Context,
    tcti: String,
    /// The SHA-256 bank after the replay; nothing extends it afterwards.
    pcrs: BTreeMap<u32, [u8; 32]>,
    /// Each activated node's AK as TPM2_ContextSave left it: TPM2_ContextLoad
    /// brings it back without deriving the EK and loading the AK under it
    /// (8 commands → 1), valid while this swtpm runs.
    saved_aks: HashMap<u64, TpmsContext>,
}

impl std::fmt::Debug for NodeTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTpm")
            .field("tcti", &self.tcti)
            .finish_non_exhaustive()
    }
}

/// `result`, unless it is Ok and `cleanup` failed.
fn then_cleanup<T>(result: Result<T>, cleanup: Result<()>) -> Result<T> {
    let value = result?;
    cleanup?;
    Ok(value)
}

impl NodeTpm {
    fn err(&self, node: u64, op: &str, e: tss_esapi::Error) -> anyhow::Error {
        anyhow!("{op} on {} for load node {node}: {e}", self.tcti)
    }

    /// Node `node`'s EK template: the default ECC P-256 one with its `unique`.
    fn ek_template(&self, node: u64) -> Result<Public> {
        let template = tss_ek::create_ek_public_from_default_template_2(
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            DefaultKey,
        )
        .map_err(|e| self.err(node, "build EK template", e))?;
        let Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            ..
        } = template
        else {
            bail!("the ECC EK template of tss-esapi is not an ECC public area");
        };
        let (x, y) = ek_unique(node);
        let unique = EccPoint::new(
            EccParameter::try_from(x).map_err(|e| self.err(node, "EK unique x", e))?,
            EccParameter::try_from(y).map_err(|e| self.err(node, "EK unique y", e))?,
        );
        Ok(Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique,
        })
    }

    /// Derives node `node`'s EK, runs `f` with it loaded, and flushes it.
    fn with_ek<T>(
        &mut self,
        node: u64,
        f: impl FnOnce(&mut Self, KeyHandle, &Public) -> Result<T>,
    ) -> Result<T> {
        let template = self.ek_template(node)?;
        let created = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(|e| self.err(node, "CreatePrimary(EK)", e))?;
        let result = f(self, created.key_handle, &created.out_public);
        let flushed = self
            .ctx
            .flush_context(created.key_handle.into())
            .map_err(|e| self.err(node, "FlushContext(EK)", e));
        then_cleanup(result, flushed)
    }

    /// Loads `ak` under `ek`, runs `f` with it, and flushes it.
    fn with_ak<T>(
        &mut self,
        node: u64,
        ek: KeyHandle,
        ak: &NodeAk,
        f: impl FnOnce(&mut Self, KeyHandle) -> Result<T>,
    ) -> Result<T> {
        let public =
            Public::unmarshall(&ak.tpm_public).map_err(|e| self.err(node, "AK TPMT_PUBLIC", e))?;
        let handle = tss_ak::load_ak(&mut self.ctx, ek, None, ak.private.clone(), public)
            .map_err(|e| self.err(node, "Load(AK)", e))?;
        let result = f(self, handle);
        let flushed = self
            .ctx
            .flush_context(handle.into())
            .map_err(|e| self.err(node, "FlushContext(AK)", e));
        then_cleanup(result, flushed)
    }

    /// Node `node`'s EK, as an agent reports it (no certificate: the owner
    /// registers it on the allow-list), and a new AK under it.
    pub fn keys(&mut self, node: u64) -> Result<(EkPublic, NodeAk)> {
        self.with_ek(node, |t, ek, ek_public| {
            let tpm_public = ek_public
                .marshall()
                .map_err(|e| t.err(node, "marshal EK TPMT_PUBLIC", e))?;
            let public_key_der = warden_protocol::tpm::parse_tpmt_public(&tpm_public)
                .context("parse the EK public area")?
                .spki_der()
                .context("EK SubjectPublicKeyInfo")?;
            let created = tss_ak::create_ak_2(
                &mut t.ctx,
                ek,
                HashingAlgorithm::Sha256,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
                None,
                DefaultKey,
            )
            .map_err(|e| t.err(node, "Create(AK)", e))?;
            let ak_public = created
                .out_public
                .marshall()
                .map_err(|e| t.err(node, "marshal AK TPMT_PUBLIC", e))?;
            let mut name = vec![0x00, 0x0b];
            name.extend_from_slice(&Sha256::digest(&ak_public));
            Ok((
                EkPublic {
                    algorithm: NODE_EK.name().to_owned(),
                    public_key_der,
                    tpm_public,
                    certificate_der: None,
                },
                NodeAk {
                    tpm_public: ak_public,
                    name,
                    private: created.out_private,
                },
            ))
        })
    }

    /// TPM2_ActivateCredential of node `node`'s AK under its EK, the EK
    /// authorised by PolicySecret(TPM_RH_ENDORSEMENT) (its default policy).
    pub fn activate(
        &mut self,
        node: u64,
        ak: &NodeAk,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>> {
        let id_object = IdObject::try_from(id_object.to_vec())
            .map_err(|e| self.err(node, "credential blob", e))?;
        let encrypted_secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(|e| self.err(node, "encrypted secret", e))?;
        self.with_ek(node, |t, ek, _| {
            t.with_ak(node, ek, ak, |t, ak| {
                let session = t
                    .ctx
                    .start_auth_session(
                        None,
                        None,
                        None,
                        SessionType::Policy,
                        SymmetricDefinition::AES_128_CFB,
                        HashingAlgorithm::Sha256,
                    )
                    .map_err(|e| t.err(node, "StartAuthSession(policy)", e))?
                    .ok_or_else(|| anyhow!("{}: TPM returned no policy session", t.tcti))?;
                let result = (|| {
                    let policy = PolicySession::try_from(session)
                        .map_err(|e| t.err(node, "policy session", e))?;
                    t.ctx
                        .execute_with_nullauth_session(|c| {
                            c.policy_secret(
                                policy,
                                AuthHandle::Endorsement,
                                Default::default(),
                                Default::default(),
                                Default::default(),
                                None,
                            )
                        })
                        .map_err(|e| t.err(node, "PolicySecret(TPM_RH_ENDORSEMENT)", e))?;
                    let secret = t
                        .ctx
                        .execute_with_sessions(
                            (Some(AuthSession::Password), Some(session), None),
                            |c| c.activate_credential(ak, ek, id_object, encrypted_secret),
                        )
                        .map_err(|e| t.err(node, "ActivateCredential", e))?;
                    // Keep the AK's loaded context for this node's quotes.
                    let saved = t
                        .ctx
                        .context_save(ak.into())
                        .map_err(|e| t.err(node, "ContextSave(AK)", e))?;
                    t.saved_aks.insert(node, saved);
                    Ok(secret.value().to_vec())
                })();
                let flushed = t
                    .ctx
                    .flush_context(SessionHandle::from(session).into())
                    .map_err(|e| t.err(node, "FlushContext(policy session)", e));
                then_cleanup(result, flushed)
            })
        })
    }

    /// TPM2_Quote of `pcrs` (SHA-256 bank) with `nonce` by node `node`'s AK.
    pub fn quote(
        &mut self,
        node: u64,
        ak: &NodeAk,
        nonce: &[u8],
        pcrs: &[u32],
    ) -> Result<NodeQuote> {
        let nonce = Data::try_from(nonce.to_vec()).map_err(|e| self.err(node, "nonce", e))?;
        let mut wanted = pcrs.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let slots = wanted
            .iter()
            .map(|i| {
                1u32.checked_shl(*i)
                    .ok_or_else(|| anyhow!("PCR {i} does not exist"))
                    .and_then(|bit| {
                        PcrSlot::try_from(bit).map_err(|e| self.err(node, "PCR slot", e))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(|e| self.err(node, "PCR selection", e))?;
        let pcr_values = wanted
            .iter()
            .map(|i| {
                self.pcrs
                    .get(i)
                    .map(|v| (*i, *v))
                    .ok_or_else(|| anyhow!("PCR {i} was not read"))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.with_loaded_ak(node, ak, |t, ak| {
            let (attest, signature) = t
                .ctx
                .execute_with_nullauth_session(|c| {
                    c.quote(ak, nonce, SignatureScheme::Null, selection)
                })
                .map_err(|e| t.err(node, "Quote", e))?;
            Ok(NodeQuote {
                attest: attest
                    .marshall()
                    .map_err(|e| t.err(node, "marshal TPMS_ATTEST", e))?,
                signature: signature
                    .marshall()
                    .map_err(|e| t.err(node, "marshal TPMT_SIGNATURE", e))?,
                pcr_values,
            })
        })
    }

    /// Runs `f` with node `node`'s AK loaded: from its saved context when
    /// there is one (see [`NodeTpm::saved_aks`]), else under its EK.
    fn with_loaded_ak<T>(
        &mut self,
        node: u64,
        ak: &NodeAk,
        f: impl FnOnce(&mut Self, KeyHandle) -> Result<T>,
    ) -> Result<T> {
        let Some(saved) = self.saved_aks.get(&node).cloned() else {
            return self.with_ek(node, |t, ek, _| t.with_ak(node, ek, ak, f));
        };
        let handle = self
            .ctx
            .context_load(saved)
            .map_err(|e| self.err(node, "ContextLoad(AK)", e))?;
        let result = f(self, handle.into());
        let flushed = self
            .ctx
            .flush_context(handle)
            .map_err(|e| self.err(node, "FlushContext(AK)", e));
        then_cleanup(result, flushed)
    }
}

/// Work for one node on its swtpm's connection.
type Work = Box<dyn FnOnce(&mut NodeTpm) + Send>;

struct Worker {
    jobs: mpsc::Sender<Work>,
    thread: Option<JoinHandle<()>>,
}

/// A few swtpm processes hosting many simulated nodes (see the module doc).
/// Each swtpm has one thread and one connection that run its nodes' TPM
/// work one job at a time.
pub struct TpmPool {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for TpmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmPool")
            .field("swtpms", &self.workers.len())
            .finish()
    }
}

impl TpmPool {
    /// Starts `size` swtpms on fresh, unprovisioned state (each has its own
    /// random endorsement seed and no EK certificate), replays `event_log`
    /// into each one's PCRs with the agent's facade, and reads them back.
    pub fn start(size: usize, event_log: &[u8]) -> Result<TpmPool> {
        Self::start_with_nice(size, event_log, 0)
    }

    /// [`TpmPool::start`], with the swtpm processes and the pool's worker
    /// threads at niceness `nice` (0: unchanged; 1–19: lower CPU priority;
    /// see the module doc for why a load test may want that).
    pub fn start_with_nice(size: usize, event_log: &[u8], nice: i32) -> Result<TpmPool> {
        if !(0..=19).contains(&nice) {
            bail!("TPM pool niceness {nice}: must be 0 (unchanged) to 19");
        }
        if size == 0 {
            bail!("a TPM pool needs at least one swtpm");
        }
        let mut workers = Vec::with_capacity(size);
        for _ in 0..size {
            let empty = tempfile::tempdir().context("temp dir for an empty swtpm state")?;
            let swtpm = Swtpm::start_from_state(SwtpmTransport::Tcp, empty.path())?;
            if nice != 0 {
                set_nice(swtpm.pid(), nice)
                    .with_context(|| format!("swtpm pid {}", swtpm.pid()))?;
            }
            let tcti = swtpm.tcti().context("a TCP swtpm has a TCTI")?;
            let pcrs = {
                let mut tpm = Tpm::open(&tcti).with_context(|| format!("open {tcti}"))?;
                replay_event_log_into_pcrs(&mut tpm, event_log)
                    .with_context(|| format!("replay the event log into {tcti}"))?;
                tpm.pcr_bank_sha256()
                    .with_context(|| format!("read the PCRs of {tcti}"))?
            };
            // The facade's connection is closed: swtpm serves one client at a time.
            let conf = TctiNameConf::from_str(&tcti).map_err(|e| anyhow!("TCTI {tcti}: {e}"))?;
            let ctx = Context::new(conf).map_err(|e| anyhow!("open {tcti}: {e}"))?;
            let mut node_tpm = NodeTpm {
                ctx,
                tcti,
                pcrs,
                saved_aks: HashMap::new(),
            };
            let (jobs, rx) = mpsc::channel::<Work>();
            let thread = std::thread::Builder::new()
                .name(format!("swtpm-{}", swtpm.pid()))
                .spawn(move || {
                    if nice != 0 {
                        // This thread's own niceness (0: the calling thread).
                        if let Err(e) = set_nice(0, nice) {
                            eprintln!("load: TPM worker thread keeps its priority: {e:#}");
                        }
                    }
                    for work in rx {
                        work(&mut node_tpm);
                    }
                    // Close the connection before the swtpm goes.
                    drop(node_tpm);
                    drop(swtpm);
                })
                .context("spawn a TPM worker thread")?;
            workers.push(Worker {
                jobs,
                thread: Some(thread),
            });
        }
        Ok(TpmPool { workers })
    }

    /// How many swtpms the pool runs.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether the pool is empty (never, once started).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs `f` on node `node`'s swtpm and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        node: u64,
        f: impl FnOnce(&mut NodeTpm) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let len = self.workers.len() as u64;
        let index = usize::try_from(node % len).context("worker index")?;
        let worker = self.workers.get(index).context("no TPM worker")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work: Work = Box::new(move |tpm: &mut NodeTpm| {
            // The receiver may have gone (a cancelled request); nothing to do then.
            let _ = tx.send(f(tpm));
        });
        worker
            .jobs
            .send(work)
            .map_err(|_| anyhow!("the TPM worker of load node {node} has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the TPM worker of load node {node} dropped the job"))?
    }
}

impl Drop for TpmPool {
    fn drop(&mut self) {
        // Closing every queue ends the threads; each stops its swtpm on the way out.
        let threads: Vec<_> = self
            .workers
            .iter_mut()
            .filter_map(|w| w.thread.take())
            .collect();
        self.workers.clear();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Sets the niceness of process `pid` (on Linux 0 is the calling thread
/// alone: the nice value is per thread).
fn set_nice(pid: u32, nice: i32) -> Result<()> {
    let who = libc::id_t::from(pid);
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) };
    if rc != 0 {
        bail!(
            "setpriority(PRIO_PROCESS, {pid}, {nice}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Latency percentiles of one kind of request, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (any order); `None` if empty.
    pub fn of(samples: &[Duration]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let rank = |q: f64| {
            // Nearest rank: the smallest sample with at least q of all at or below it.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let r = (q * n as f64).ceil() as usize;
            sorted
                .get(r.clamp(1, n) - 1)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        #[allow(clippy::cast_precision_loss)]
        let mean_ms = sorted.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / n as f64;
        Some(Percentiles {
            count: n,
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
            mean_ms,
        })
    }

    /// As JSON, for the generator's report.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 1e-9);
        assert!((p.p90_ms - 90.0).abs() < 1e-9);
        assert!((p.p99_ms - 99.0).abs() < 1e-9);
        assert!((p.max_ms - 100.0).abs() < 1e-9);
        assert!((p.mean_ms - 50.5).abs() < 1e-9);
        let one = Percentiles::of(&[Duration::from_millis(7)]).unwrap();
        assert!((one.p50_ms - 7.0).abs() < 1e-9 && (one.p99_ms - 7.0).abs() < 1e-9);
        assert_eq!(Percentiles::of(&[]), None);
    }

    #[test]
    fn every_node_gets_its_own_ek_unique() {
        assert_ne!(ek_unique(0), ek_unique(1));
        assert_eq!(ek_unique(7), ek_unique(7));
        assert_eq!(ek_unique(7).0.len(), 32);
    }
}
