//! `warden-load`: plays N simulated agents against one real
//! `warden-attest-server` on 127.0.0.1 and reports the server's throughput
//! and request latencies (issue #9). A test and bench tool; never in the ramdisk.
//!
//! 1. Enrollment, beforehand and not timed into the latencies: every agent is
//!    a distinct node with its own ECC P-256 EK and ECC AK on a real swtpm
//!    (a pool of a few swtpms hosts them all; see `warden_qemu_tests::load`).
//!    The owner registers each EK on the allow-list in group `load`
//!    (`POST /v1/ek-allowlist`, what `wardenctl node add --ek-sha256` does);
//!    the agent enrolls and proves its AK with the server's real
//!    MakeCredential and the TPM's ActivateCredential.
//! 2. Policy: agent 0 attests once (refused: no policy yet); the policy is
//!    learned from that evidence, stored and assigned to group `load`.
//! 3. Anchor: the same swtpms make quotes for the same nodes with no server
//!    involved — the rate a load of real quotes can reach at all here.
//! 4. Attestations (timed): up to `--attestations M` rounds over the agents
//!    (round k is agent k mod N), at most `--concurrency C` in flight and no
//!    new one after `--max-seconds S`. Each: POST /v1/attest/nonce → a real
//!    quote over that fresh nonce → POST /v1/attest with the replayed OVMF
//!    event log; the verdict must be OK. A latency is one request's round
//!    trip on a pooled keep-alive HTTPS client whose C connections are
//!    opened before timing starts (TLS handshakes happen once per
//!    connection, as with an agent that keeps its connection), measured
//!    separately for the nonce and the attest request; TPM time is not in it.
//!
//! `--tpm-nice N` runs the swtpms (and the threads that drive them) at
//! niceness N: on a real site the TPMs are in the nodes, not on the
//! server's cores, so at N > 0 the server is measured as it would run
//! there, while every attestation still waits for its real quote (see
//! `warden_qemu_tests::load`). The BENCH lines say which it was.
//!
//! Human summary on stderr; on stdout a JSON report (`--format json`, the
//! default) or `BENCH` lines (`--format bench`). Exits non-zero if any
//! attestation failed, after reporting.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use warden_protocol::attest::{
    codes, ActivateRequest, AkPublic, AttestRequest, EkRegistration, EnrollChallenge,
    EnrollRequest, Enrolled, NonceRequest, NonceResponse, Policy, PolicyAssignment, PolicyRef,
    Status, Verdict, AK_ECC,
};
use warden_protocol::hello::PcrBank;
use warden_protocol::PROTOCOL_VERSION;
use warden_qemu_tests::evidence::fixture_event_log;
use warden_qemu_tests::load::{NodeAk, Percentiles, TpmPool};
use warden_qemu_tests::Server;

/// The group every simulated node is registered in, and its policy's name.
const GROUP: &str = "load";
const POLICY: &str = "load-ovmf-fixture";
/// The goal of issue #9 for the p99 request latency.
const GOAL_P99_MS: f64 = 200.0;
/// Quotes per swtpm for the TPM-only anchor: enough for a few seconds of
/// quoting, so a moment of contention on the machine does not decide it.
const ANCHOR_QUOTES_PER_TPM: u64 = 250;

const USAGE: &str = "usage: warden-load [--agents N] [--attestations M] [--concurrency C] \
                     [--max-seconds S] [--tpms K] [--format json|bench] [--tpm-nice N] [--server-log PATH]";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Bench,
}

struct Args {
    agents: u64,
    attestations: u64,
    concurrency: usize,
    max_seconds: f64,
    tpms: usize,
    format: Format,
    /// Niceness of the swtpms and their worker threads (0: unchanged).
    tpm_nice: i32,
    /// Where to copy the server's log (stderr) at the end, for profiling.
    server_log: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        agents: 100,
        attestations: 100,
        concurrency: 64,
        max_seconds: 3600.0,
        tpms: 4,
        format: Format::Json,
        tpm_nice: 0,
        server_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--agents" => args.agents = value("--agents")?.parse().context("--agents")?,
            "--attestations" => {
                args.attestations = value("--attestations")?.parse().context("--attestations")?
            }
            "--concurrency" => {
                args.concurrency = value("--concurrency")?.parse().context("--concurrency")?
            }
            "--max-seconds" => {
                args.max_seconds = value("--max-seconds")?.parse().context("--max-seconds")?
            }
            "--tpms" => args.tpms = value("--tpms")?.parse().context("--tpms")?,
            "--format" => {
                args.format = match value("--format")?.as_str() {
                    "json" => Format::Json,
                    "bench" => Format::Bench,
                    other => bail!("--format {other:?}: json or bench"),
                }
            }
            "--tpm-nice" => args.tpm_nice = value("--tpm-nice")?.parse().context("--tpm-nice")?,
            "--server-log" => args.server_log = Some(value("--server-log")?.into()),
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} ({USAGE})"),
        }
    }
    ensure!(args.agents >= 1, "--agents must be at least 1");
    ensure!(args.attestations >= 1, "--attestations must be at least 1");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(args.max_seconds > 0.0, "--max-seconds must be positive");
    ensure!(args.tpms >= 1, "--tpms must be at least 1");
    Ok(args)
}

/// The server's API on a pooled keep-alive HTTPS client.
struct Api {
    base: String,
    http: reqwest::Client,
    token: String,
}

/// One request's answer and its round trip.
struct Answer<T> {
    elapsed: Duration,
    result: Result<T>,
}

impl Api {
    /// POSTs or PUTs `body` to `path` and reads the whole answer; the time
    /// is from sending until the last byte of the body arrived.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
        admin: bool,
    ) -> Answer<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).json(body);
        if admin {
            request = request.bearer_auth(&self.token);
        }
        let started = Instant::now();
        let sent = async {
            let response = request.send().await?;
            let status = response.status();
            let text = response.text().await?;
            Ok::<_, reqwest::Error>((status, text))
        }
        .await;
        let elapsed = started.elapsed();
        let result = match sent {
            Err(e) => Err(anyhow::Error::new(e).context(format!("{url}: transport"))),
            Ok((status, text)) if !status.is_success() => {
                Err(anyhow::anyhow!("{url}: HTTP {status}: {text}"))
            }
            Ok((_, text)) if text.is_empty() => serde_json::from_str("null")
                .with_context(|| format!("{url}: empty answer where a JSON body was expected")),
            Ok((_, text)) => {
                serde_json::from_str(&text).with_context(|| format!("{url}: answer {text}"))
            }
        };
        Answer { elapsed, result }
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(reqwest::Method::POST, path, body, false)
            .await
            .result
    }

    async fn admin<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.call(method, path, body, true).await.result
    }

    async fn admin_get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        ensure!(status.is_success(), "GET {url}: HTTP {status}: {text}");
        serde_json::from_str(&text).with_context(|| format!("GET {url}: answer {text}"))
    }
}

/// An enrolled simulated agent.
struct Agent {
    node_id: String,
    ak: NodeAk,
}

/// Registers, enrolls and activates agent `index`; the AK is bound when it returns.
async fn enroll(api: &Api, pool: &TpmPool, index: u64) -> Result<Agent> {
    let (ek, ak) = pool.run(index, move |tpm| tpm.keys(index)).await?;
    let node_id = warden_protocol::hello::node_id_for_ek(&ek.public_key_der);
    let _: Option<serde_json::Value> = api
        .admin(
            reqwest::Method::POST,
            "/v1/ek-allowlist",
            &EkRegistration {
                ek_sha256: node_id.clone(),
                group: Some(GROUP.into()),
                note: Some(format!("warden-load agent {index}")),
            },
        )
        .await?;
    let challenge: EnrollChallenge = api
        .post(
            "/v1/enroll",
            &EnrollRequest {
                protocol: PROTOCOL_VERSION,
                ek,
                ak: AkPublic {
                    algorithm: AK_ECC.to_owned(),
                    tpm_public: ak.tpm_public.clone(),
                },
            },
        )
        .await?;
    ensure!(
        challenge.node_id == node_id,
        "the server calls agent {index} {} but its EK hashes to {node_id}",
        challenge.node_id
    );
    let secret = {
        let ak = ak.clone();
        pool.run(index, move |tpm| {
            tpm.activate(
                index,
                &ak,
                &challenge.id_object,
                &challenge.encrypted_secret,
            )
        })
        .await?
    };
    let enrolled: Enrolled = api
        .post(
            "/v1/enroll/activate",
            &ActivateRequest {
                enrollment_id: challenge.enrollment_id,
                secret,
            },
        )
        .await?;
    ensure!(
        enrolled.ak_name == hex::encode(&ak.name),
        "agent {index}: the server bound AK {} instead of {}",
        enrolled.ak_name,
        hex::encode(&ak.name)
    );
    Ok(Agent { node_id, ak })
}

/// What one attestation round came to.
#[derive(Default)]
struct Round {
    nonce_latency: Option<Duration>,
    attest_latency: Option<Duration>,
    tpm_time: Option<Duration>,
    /// `Some(verdict)` when the server answered the attest request.
    verdict: Option<Verdict>,
    /// Why the round did not get a verdict (transport, HTTP, TPM error).
    error: Option<String>,
}

/// Nonce → quote → attest for agent `index`.
async fn attest(api: &Api, pool: &TpmPool, log: &Arc<Vec<u8>>, index: u64, agent: &Agent) -> Round {
    let mut round = Round::default();
    let answer: Answer<NonceResponse> = api
        .call(
            reqwest::Method::POST,
            "/v1/attest/nonce",
            &NonceRequest {
                node_id: agent.node_id.clone(),
            },
            false,
        )
        .await;
    round.nonce_latency = Some(answer.elapsed);
    let nonce = match answer.result {
        Ok(n) => n,
        Err(e) => {
            round.error = Some(format!("nonce: {e:#}"));
            return round;
        }
    };
    let tpm_started = Instant::now();
    let quote = {
        let ak = agent.ak.clone();
        let (value, pcrs) = (nonce.nonce.clone(), nonce.pcrs.clone());
        pool.run(index, move |tpm| tpm.quote(index, &ak, &value, &pcrs))
            .await
    };
    round.tpm_time = Some(tpm_started.elapsed());
    let quote = match quote {
        Ok(q) => q,
        Err(e) => {
            round.error = Some(format!("quote: {e:#}"));
            return round;
        }
    };
    let request = AttestRequest {
        protocol: PROTOCOL_VERSION,
        node_id: agent.node_id.clone(),
        ak_name: hex::encode(&agent.ak.name),
        nonce: nonce.nonce,
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
        event_log: Some(log.as_ref().clone()),
        phase: Default::default(),
        agent_log: Vec::new(),
    };
    let answer: Answer<Verdict> = api
        .call(reqwest::Method::POST, "/v1/attest", &request, false)
        .await;
    round.attest_latency = Some(answer.elapsed);
    match answer.result {
        Ok(v) => round.verdict = Some(v),
        Err(e) => round.error = Some(format!("attest: {e:#}")),
    }
    round
}

/// Learns the group policy from agent 0's first (refused) attestation.
async fn set_up_policy(api: &Api, pool: &TpmPool, log: &Arc<Vec<u8>>, agent: &Agent) -> Result<()> {
    let first = attest(api, pool, log, 0, agent).await;
    if let Some(e) = first.error {
        bail!("agent 0's first attestation: {e}");
    }
    let verdict = first
        .verdict
        .context("agent 0's first attestation: no verdict")?;
    ensure!(
        verdict.reasons.iter().any(|r| r.code == codes::NO_POLICY),
        "agent 0's first attestation should be refused for want of a policy, got {verdict:#?}"
    );
    let policy: Policy = api
        .admin_get(&format!(
            "/v1/nodes/{}/policy/learn?name={POLICY}",
            agent.node_id
        ))
        .await?;
    let stored: PolicyRef = api
        .admin(
            reqwest::Method::PUT,
            &format!("/v1/policies/{POLICY}"),
            &policy,
        )
        .await?;
    let _: Option<serde_json::Value> = api
        .admin(
            reqwest::Method::PUT,
            &format!("/v1/groups/{GROUP}/policy"),
            &PolicyAssignment {
                policy: POLICY.into(),
            },
        )
        .await?;
    eprintln!(
        "load: policy {} v{} (PCRs {:?}) learned from agent 0 and assigned to group {GROUP}",
        stored.name,
        stored.version,
        policy.pcrs.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// Quotes per second of the pool alone: `per_tpm` quotes on each swtpm,
/// round-robin over the enrolled agents (so EKs switch as in the real run).
async fn tpm_only_rate(pool: &TpmPool, agents: &[Agent], per_tpm: u64) -> Result<f64> {
    let total = per_tpm * pool.len() as u64;
    let n = agents.len() as u64;
    let started = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..total)
        .map(|k| async move {
            let index = k % n;
            let agent = agents.get(usize::try_from(index)?).context("agent index")?;
            let ak = agent.ak.clone();
            let nonce = warden_protocol::tpm::HashAlg::Sha256
                .digest(format!("warden-load anchor nonce {k}").as_bytes());
            pool.run(index, move |tpm| {
                tpm.quote(
                    index,
                    &ak,
                    &nonce,
                    &warden_protocol::attest::DEFAULT_QUOTE_PCRS,
                )
                .map(drop)
            })
            .await
        })
        .buffer_unordered(pool.len() * 2)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    #[allow(clippy::cast_precision_loss)]
    Ok(total as f64 / elapsed)
}

async fn run(args: &Args) -> Result<bool> {
    let log = Arc::new(
        std::fs::read(fixture_event_log())
            .with_context(|| format!("read {}", fixture_event_log().display()))?,
    );
    let server = Server::start_with_args(&[] as &[OsString])?;
    let pem = std::fs::read(server.ca_pem())
        .with_context(|| format!("read {}", server.ca_pem().display()))?;
    let token = std::fs::read_to_string(server.admin_token_file())
        .with_context(|| format!("read {}", server.admin_token_file().display()))?
        .trim()
        .to_owned();
    let http = warden_attest_server::client::https_client(&pem)?;
    let api = Arc::new(Api {
        base: server.url(),
        http,
        token,
    });
    eprintln!("load: server at {} (pid {})", api.base, server.pid());

    let started = Instant::now();
    let pool = Arc::new(TpmPool::start_with_nice(args.tpms, &log, args.tpm_nice)?);
    eprintln!(
        "load: {} swtpms ready in {:.1} s (fresh seeds, OVMF fixture log replayed into each; nice {})",
        pool.len(),
        started.elapsed().as_secs_f64(),
        args.tpm_nice
    );

    // 1. Enrollment.
    let started = Instant::now();
    // One lane per swtpm, enrolling that swtpm's agents one after another:
    // an agent's two TPM steps (keys, then ActivateCredential) then run
    // back to back on its swtpm, with no other agent's EK installed between.
    let lanes = pool.len() as u64;
    let lane_results: Vec<Result<Vec<(u64, Agent)>>> = futures::stream::iter(0..lanes)
        .map(|lane| {
            let (api, pool) = (api.clone(), pool.clone());
            let agents = args.agents;
            async move {
                let mut enrolled = Vec::new();
                for i in (lane..agents).step_by(usize::try_from(lanes)?) {
                    let agent = enroll(&api, &pool, i)
                        .await
                        .with_context(|| format!("enrolling agent {i}"))?;
                    enrolled.push((i, agent));
                }
                Ok(enrolled)
            }
        })
        .buffer_unordered(pool.len())
        .collect()
        .await;
    let mut agents: Vec<(u64, Agent)> = Vec::new();
    for lane in lane_results {
        agents.extend(lane?);
    }
    agents.sort_by_key(|(i, _)| *i);
    let agents: Vec<Agent> = agents.into_iter().map(|(_, a)| a).collect();
    let enroll_secs = started.elapsed().as_secs_f64();
    let mut distinct: Vec<&str> = agents.iter().map(|a| a.node_id.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    ensure!(
        distinct.len() == agents.len(),
        "{} agents enrolled but only {} distinct node ids: EKs are not distinct",
        agents.len(),
        distinct.len()
    );
    #[allow(clippy::cast_precision_loss)]
    let enroll_rate = agents.len() as f64 / enroll_secs;
    eprintln!(
        "load: {} distinct agents enrolled (EK allow-list + MakeCredential/ActivateCredential) in {enroll_secs:.1} s = {enroll_rate:.0}/s (not timed into the latencies)",
        agents.len()
    );
    let agents = Arc::new(agents);

    // 2. The group policy.
    let first = agents.first().context("no agent enrolled")?;
    set_up_policy(&api, &pool, &log, first).await?;

    // 3. The TPM-only anchor.
    let anchor_rate = tpm_only_rate(&pool, &agents, ANCHOR_QUOTES_PER_TPM).await?;
    eprintln!(
        "load: anchor: the {} swtpms alone make {anchor_rate:.0} quotes/s (ContextLoad(AK) + Quote + FlushContext, no server)",
        pool.len()
    );

    // 4. Attestations. First open the pool's connections (C at once, so C
    // of them): an agent handshakes once per connection, and C handshakes
    // landing in the first C timed requests would measure TLS set-up, not
    // attestation.
    let warm: Vec<Result<()>> = futures::future::join_all((0..args.concurrency).map(|_| {
        let api = api.clone();
        async move {
            let url = format!("{}/v1/health", api.base);
            let r = api
                .http
                .get(&url)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            ensure!(r.status().is_success(), "GET {url}: HTTP {}", r.status());
            r.bytes().await.with_context(|| format!("GET {url}"))?;
            Ok(())
        }
    }))
    .await;
    warm.into_iter().collect::<Result<Vec<()>>>()?;
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        eprintln!("load: load average before timing: {}", load.trim());
    }
    let n = agents.len() as u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.max_seconds);
    let rounds: Vec<Round> = futures::stream::iter(0..args.attestations)
        .take_while(|_| futures::future::ready(Instant::now() < deadline))
        .map(|k| {
            let (api, pool, log, agents) = (api.clone(), pool.clone(), log.clone(), agents.clone());
            async move {
                let index = k % n;
                match usize::try_from(index).ok().and_then(|i| agents.get(i)) {
                    Some(agent) => attest(&api, &pool, &log, index, agent).await,
                    None => Round {
                        error: Some(format!("no agent {index}")),
                        ..Round::default()
                    },
                }
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    drop(pool);

    let started_rounds = rounds.len() as u64;
    let nonce_samples: Vec<Duration> = rounds.iter().filter_map(|r| r.nonce_latency).collect();
    let attest_samples: Vec<Duration> = rounds.iter().filter_map(|r| r.attest_latency).collect();
    let tpm_samples: Vec<Duration> = rounds.iter().filter_map(|r| r.tpm_time).collect();
    let ok = rounds
        .iter()
        .filter(|r| r.verdict.as_ref().is_some_and(|v| v.status == Status::Ok))
        .count() as u64;
    let refused = rounds
        .iter()
        .filter(|r| r.verdict.as_ref().is_some_and(|v| v.status != Status::Ok))
        .count() as u64;
    let errors = rounds.iter().filter(|r| r.error.is_some()).count() as u64;
    let failed = refused + errors;
    let mut examples: Vec<String> = rounds
        .iter()
        .filter_map(|r| {
            r.error.clone().or_else(|| {
                r.verdict
                    .as_ref()
                    .filter(|v| v.status != Status::Ok)
                    .map(|v| format!("{} refused: {:?}", v.node_id, v.reasons))
            })
        })
        .take(5)
        .collect();
    examples.dedup();
    let stopped_by = if started_rounds < args.attestations {
        "time"
    } else {
        "count"
    };
    #[allow(clippy::cast_precision_loss)]
    let throughput = ok as f64 / elapsed.as_secs_f64();
    let nonce = Percentiles::of(&nonce_samples);
    let attest_p = Percentiles::of(&attest_samples);
    let tpm = Percentiles::of(&tpm_samples);

    eprintln!(
        "load: {started_rounds} attestations by {} agents in {:.1} s (stopped by {stopped_by}), concurrency {}: {ok} OK, {refused} refused, {errors} errors; {throughput:.0} OK attestations/s",
        agents.len(),
        elapsed.as_secs_f64(),
        args.concurrency
    );
    for (name, p) in [
        ("POST /v1/attest/nonce", &nonce),
        ("POST /v1/attest", &attest_p),
        ("TPM (queue + quote)", &tpm),
    ] {
        if let Some(p) = p {
            eprintln!(
                "load:   {name:22} n={:6} p50 {:7.2} ms  p90 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms  mean {:7.2} ms",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms, p.mean_ms
            );
        }
    }
    for e in &examples {
        eprintln!("load:   failure: {e}");
    }

    let worst_p99 = [&nonce, &attest_p]
        .iter()
        .filter_map(|p| p.as_ref().map(|p| p.p99_ms))
        .fold(0.0_f64, f64::max);
    match args.format {
        Format::Json => {
            let report = serde_json::json!({
                "agents": agents.len(),
                "enrollment_seconds": enroll_secs,
                "tpms": args.tpms,
                "tpm_nice": args.tpm_nice,
                "concurrency": args.concurrency,
                "attestations_requested": args.attestations,
                "attestations_started": started_rounds,
                "stopped_by": stopped_by,
                "ok": ok,
                "refused": refused,
                "errors": errors,
                "failed": failed,
                "seconds": elapsed.as_secs_f64(),
                "ok_per_second": throughput,
                "anchor_tpm_only_quotes_per_second": anchor_rate,
                "nonce_latency": nonce.as_ref().map(Percentiles::to_json),
                "attest_latency": attest_p.as_ref().map(Percentiles::to_json),
                "tpm_time": tpm.as_ref().map(Percentiles::to_json),
                "p99_ms": worst_p99,
                "failures": examples,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Format::Bench => {
            let tpms_note = if args.tpm_nice == 0 {
                "; the swtpms at nice 0, on the server's cores".to_owned()
            } else {
                format!(
                    "; the swtpms at nice {}: on a site the TPMs are in the nodes, not on the server's cores",
                    args.tpm_nice
                )
            };
            let (nonce_p99, attest_p99) = (
                nonce.as_ref().map_or(f64::NAN, |p| p.p99_ms),
                attest_p.as_ref().map_or(f64::NAN, |p| p.p99_ms),
            );
            println!(
                "BENCH load-p99: warden {worst_p99:.1} ms, anchor goal {GOAL_P99_MS:.0} ms, ratio {:.2} (goal <= 1; the slower of POST /v1/attest p99 {attest_p99:.1} ms and POST /v1/attest/nonce p99 {nonce_p99:.1} ms; {} agents, {started_rounds} attestations, {} in flight{tpms_note})",
                worst_p99 / GOAL_P99_MS,
                agents.len(),
                args.concurrency
            );
            println!(
                "BENCH load-throughput: warden {throughput:.0} OK attestations/s, anchor swtpm-only {anchor_rate:.0} quotes/s (the same {} swtpms quoting with no server), ratio {:.2} (goal: none set; each attestation needs one real quote{tpms_note})",
                args.tpms,
                throughput / anchor_rate
            );
            println!(
                "BENCH load-errors: warden {failed} of {started_rounds} attestations not OK ({refused} refused, {errors} errors), anchor goal 0, (goal 0)"
            );
        }
    }
    if let Some(path) = &args.server_log {
        std::fs::write(path, server.stderr_text())
            .with_context(|| format!("write the server log to {}", path.display()))?;
    }
    drop(server);
    Ok(failed == 0 && started_rounds > 0)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let clean = runtime.block_on(run(&args))?;
    if !clean {
        bail!("not every attestation was OK (see the report above)");
    }
    Ok(())
}
