//! The load generator's parts (`warden-load`, issue #9): a pool of swtpm
//! processes that stand in for thousands of distinct TPMs, and the latency
//! statistics the generator reports.
//!
//! One swtpm per simulated node would be thousands of processes; instead each
//! swtpm of the pool hosts many nodes in turn. A node is its Endorsement Key:
//! node `i` gets the ECC P-256 EK of the TCG default template (L-2) with the
//! template's `unique` field set from `i`, so the TPM derives a different key
//! for every node from the same endorsement seed. Before any work for node
//! `i`, that EK is created and persisted at the ECC EK's provisioning handle
//! (0x81010002), exactly where a manufacturer or a provisioning tool leaves
//! an EK. From there on everything goes through the agent's own TPM facade
//! ([`warden_agent::tpm::Tpm`], which takes a persisted EK of the default
//! template): reading the EK, creating the AK under it, ActivateCredential
//! and the quotes. A node's AK is wrapped by its EK, so node `i` always lives
//! on swtpm `i % pool size`, and its EK is re-installed whenever the swtpm
//! served another node in between.
//!
//! Each swtpm's PCRs hold the captured OVMF boot (its event log replayed once
//! at start), so every quote is genuine and matches the log the node sends.
//!
//! This module owns those swtpm processes and the TPM traffic of the
//! simulated nodes. It must never decide a verdict, never make TPM answers
//! up (every key, credential and quote comes from a real swtpm), and never
//! touch a TPM other than its own swtpms (on unix sockets in a temp dir).

use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tss_esapi::{
    abstraction::{ek as tss_ek, AsymmetricAlgorithmSelection, DefaultKey},
    constants::CapabilityType,
    handles::{ObjectHandle, PersistentTpmHandle, TpmHandle},
    interface_types::{
        dynamic_handles::Persistent, ecc::EccCurve, resource_handles::Hierarchy,
        resource_handles::Provision,
    },
    structures::{CapabilityData, EccParameter, EccPoint, Public},
    Context, TctiNameConf,
};
use warden_agent::tpm::{AkAlgorithm, AttestationKey, EkAlgorithm, Tpm};
use warden_protocol::hello::EkPublic;

use crate::evidence::replay_event_log_into_pcrs;
use crate::process::{ChildGuard, POLL};

/// The EK every simulated node uses: ECC P-256, the fast one on swtpm.
pub const NODE_EK: EkAlgorithm = EkAlgorithm::EccNistP256;
/// The AK every simulated node uses (ECDSA P-256, SHA-256).
pub const NODE_AK: AkAlgorithm = AkAlgorithm::EccP256EcdsaSha256;

/// The `unique` field (x, y) of node `node`'s EK template: two SHA-256
/// digests of the node number, so each node derives its own key.
fn ek_unique(node: u64) -> (Vec<u8>, Vec<u8>) {
    use sha2::{Digest, Sha256};
    let part = |label: &[u8]| {
        let mut h = Sha256::new();
        h.update(b"warden-load node EK ");
        h.update(label);
        h.update(node.to_be_bytes());
        h.finalize().to_vec()
    };
    (part(b"x"), part(b"y"))
}

/// Creates node `node`'s EK (ECC P-256 default template, `unique` from
/// [`ek_unique`]) on the TPM at `tcti` and persists it at the ECC EK handle,
/// replacing whatever key was persisted there. Opens and closes its own
/// connection: swtpm serves one client at a time, so the caller must not
/// hold one.
pub fn install_node_ek(tcti: &str, node: u64) -> Result<()> {
    let fail = |op: &str, e: tss_esapi::Error| anyhow!("{op} on {tcti} for load node {node}: {e}");
    let conf = TctiNameConf::from_str(tcti).map_err(|e| fail("parse TCTI", e))?;
    let mut ctx = Context::new(conf).map_err(|e| fail("open TPM", e))?;
    let template = tss_ek::create_ek_public_from_default_template_2(
        AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        DefaultKey,
    )
    .map_err(|e| fail("build EK template", e))?;
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
        EccParameter::try_from(x).map_err(|e| fail("EK unique x", e))?,
        EccParameter::try_from(y).map_err(|e| fail("EK unique y", e))?,
    );
    let template = Public::Ecc {
        object_attributes,
        name_hashing_algorithm,
        auth_policy,
        parameters,
        unique,
    };

    let handle = PersistentTpmHandle::new(NODE_EK.persistent_handle())
        .map_err(|e| fail("persistent handle", e))?;
    // Evict the previous node's EK, if any (a fresh swtpm has none). Ask
    // first: TR_FromTPMPublic on an empty handle logs an ERROR line.
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, NODE_EK.persistent_handle(), 1)
        .map_err(|e| fail("GetCapability(HANDLES)", e))?;
    let occupied = match data {
        CapabilityData::Handles(list) => list
            .into_inner()
            .into_iter()
            .any(|h| u32::from(h) == NODE_EK.persistent_handle()),
        _ => false,
    };
    if occupied {
        let old = ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(handle)))
            .map_err(|e| fail("TR_FromTPMPublic(old EK)", e))?;
        ctx.execute_with_nullauth_session(|c| {
            c.evict_control(Provision::Owner, old, Persistent::Persistent(handle))
        })
        .map_err(|e| fail("EvictControl(remove old EK)", e))?;
    }
    let created = ctx
        .execute_with_nullauth_session(|c| {
            c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
        })
        .map_err(|e| fail("CreatePrimary(EK)", e))?;
    let object: ObjectHandle = created.key_handle.into();
    let persisted = ctx.execute_with_nullauth_session(|c| {
        c.evict_control(Provision::Owner, object, Persistent::Persistent(handle))
    });
    // Flush the transient copy whether or not persisting worked: swtpm has
    // only a few object slots.
    let flushed = ctx.flush_context(object);
    let mut persisted = persisted.map_err(|e| fail("EvictControl(persist EK)", e))?;
    flushed.map_err(|e| fail("FlushContext(EK)", e))?;
    ctx.tr_close(&mut persisted)
        .map_err(|e| fail("close the persisted EK handle", e))?;
    Ok(())
}

/// A swtpm on fresh, unprovisioned state serving its data and control
/// channels on unix sockets (tpm2-tss TCTI `swtpm:path=SOCK`, control at
/// `SOCK.ctrl`). Not the harness's TCP [`crate::Swtpm`]: a load run opens
/// tens of thousands of TPM connections, and over TCP each would leave a
/// TIME_WAIT socket holding a loopback port for a minute — enough to starve
/// every other test's port picking on the machine.
struct UnixSwtpm {
    // Declared before `dir` so the process stops before its state is removed.
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl UnixSwtpm {
    fn start() -> Result<UnixSwtpm> {
        crate::require_program("swtpm")?;
        let dir = tempfile::Builder::new()
            .prefix("warden-load-swtpm-")
            .tempdir()
            .context("temp dir for swtpm")?;
        let state = dir.path().join("tpm");
        std::fs::create_dir(&state).with_context(|| format!("create {}", state.display()))?;
        let sock = dir.path().join("sock");
        let out = std::fs::File::create(dir.path().join("swtpm.out"))
            .with_context(|| format!("create {}/swtpm.out", dir.path().display()))?;
        let err = out.try_clone().context("dup swtpm.out")?;
        // All paths absolute (swtpm chdirs); no --log: at this rate a
        // per-command log costs more than the commands.
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", sock.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}.ctrl", sock.display()))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut child = ChildGuard::spawn("swtpm", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "swtpm exited ({status}) before it was ready:\n{}",
                    output(dir.path())
                );
            }
            if Instant::now() >= deadline {
                child.stop();
                bail!("swtpm not ready after 30 s:\n{}", output(dir.path()));
            }
            std::thread::sleep(POLL);
        }
        Ok(UnixSwtpm { child, dir })
    }

    fn tcti(&self) -> String {
        format!("swtpm:path={}", self.dir.path().join("sock").display())
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

fn output(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("swtpm.out")).unwrap_or_default()
}

/// Work for one node on its swtpm, run with that node's EK installed.
type Work = Box<dyn FnOnce(Result<&mut Tpm>) + Send>;

struct Job {
    node: u64,
    work: Work,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

/// A few swtpm processes hosting many simulated nodes (see the module doc).
/// Each swtpm has one thread that runs its nodes' TPM work one job at a time.
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
    /// random endorsement seed and no EK certificate; unix sockets, see
    /// [`UnixSwtpm`]) and replays
    /// `event_log` into each one's PCRs.
    pub fn start(size: usize, event_log: &[u8]) -> Result<TpmPool> {
        if size == 0 {
            bail!("a TPM pool needs at least one swtpm");
        }
        let mut workers = Vec::with_capacity(size);
        for _ in 0..size {
            let swtpm = UnixSwtpm::start()?;
            let tcti = swtpm.tcti();
            {
                let mut tpm = Tpm::open(&tcti).with_context(|| format!("open {tcti}"))?;
                replay_event_log_into_pcrs(&mut tpm, event_log)
                    .with_context(|| format!("replay the event log into {tcti}"))?;
            }
            let (jobs, rx) = mpsc::channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("swtpm-{}", swtpm.pid()))
                .spawn(move || serve(swtpm, &tcti, &rx))
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

    /// Runs `f` on node `node`'s TPM (its swtpm, with its EK installed) and
    /// returns the result.
    pub async fn run<T: Send + 'static>(
        &self,
        node: u64,
        f: impl FnOnce(&mut Tpm) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let len = self.workers.len() as u64;
        let index = usize::try_from(node % len).context("worker index")?;
        let worker = self.workers.get(index).context("no TPM worker")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work: Work = Box::new(move |tpm: Result<&mut Tpm>| {
            // The receiver may have gone (a cancelled request); nothing to do then.
            let _ = tx.send(tpm.and_then(f));
        });
        worker
            .jobs
            .send(Job { node, work })
            .map_err(|_| anyhow!("the TPM worker of load node {node} has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the TPM worker of load node {node} dropped the job"))?
    }

    /// Node `node`'s EK (as the agent reports it) and a new AK under it.
    pub async fn keys(&self, node: u64) -> Result<(EkPublic, AttestationKey)> {
        self.run(node, move |tpm| {
            let ek = tpm.endorsement_key_for(NODE_EK)?;
            let ak = tpm.create_ak_under(NODE_EK, NODE_AK)?;
            Ok((
                EkPublic {
                    algorithm: ek.algorithm.to_owned(),
                    public_key_der: ek.public_key_der,
                    tpm_public: ek.tpm_public,
                    certificate_der: ek.certificate_der,
                },
                ak,
            ))
        })
        .await
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

/// A worker thread: installs each job's node EK when it differs from the
/// last one, keeps one agent-facade connection open otherwise.
fn serve(mut swtpm: UnixSwtpm, tcti: &str, jobs: &mpsc::Receiver<Job>) {
    let mut installed: Option<u64> = None;
    let mut tpm: Option<Tpm> = None;
    for job in jobs {
        let ready = node_tpm(tcti, job.node, &mut installed, &mut tpm);
        let failed = ready.is_err();
        (job.work)(ready);
        if failed {
            // Start from a clean connection and a fresh install next time.
            tpm = None;
            installed = None;
        }
    }
    drop(tpm);
    swtpm.child.stop();
}

/// The agent-facade connection with `node`'s EK installed.
fn node_tpm<'a>(
    tcti: &str,
    node: u64,
    installed: &mut Option<u64>,
    tpm: &'a mut Option<Tpm>,
) -> Result<&'a mut Tpm> {
    if *installed != Some(node) {
        // swtpm serves one connection at a time: close the agent's first.
        *tpm = None;
        *installed = None;
        install_node_ek(tcti, node)?;
        *installed = Some(node);
    }
    match tpm {
        Some(t) => Ok(t),
        None => Ok(tpm.insert(Tpm::open(tcti).with_context(|| format!("open {tcti}"))?)),
    }
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
