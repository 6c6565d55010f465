//! `bench-attest`: attestation verifications per second — the server's whole
//! chain (`warden_attest_server::verify::verify`: nonce, AK, quote signature,
//! nonce in the quote, PCR digest, clock, event-log parse and replay to the
//! quoted PCRs, policy) on one core and on all cores, against
//! `tpm2_checkquote` on the very same quotes, and against Keylime's published
//! rate.
//!
//! The evidence is real: a captured OVMF + swtpm boot log is replayed into a
//! fresh swtpm's PCRs, and tpm2-tools make the AK and a batch of quotes with
//! distinct nonces, so both contenders read the files tpm2-tools wrote. Every
//! nonce is registered in the server's `NonceStore` just before its quote is
//! verified, so the single-use check runs as in production. A verification
//! that does not pass aborts the benchmark: the rate of failures means nothing.
//!
//! Prints diagnostics (and where the time goes) on stderr and exactly three
//! `BENCH` lines on stdout. It measures; it never builds (scripts/bench does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use warden_agent::tpm::Tpm;
use warden_attest_server::nonces::NonceStore;
use warden_attest_server::verify::{self, BoundAk, NodeFacts};
use warden_protocol::attest::{AttestRequest, Policy};
use warden_protocol::eventlog::{self, HashAlg};
use warden_protocol::hello::PcrBank;
use warden_protocol::policy::{self, DEFAULT_LEARN_PCRS};
use warden_protocol::tpm::{self, quote};
use warden_protocol::PROTOCOL_VERSION;
use warden_qemu_tests::evidence::{fixture_event_log, replay_event_log_into_pcrs};
use warden_qemu_tests::process::run_with_timeout;
use warden_qemu_tests::{require_program, Swtpm, SwtpmTransport};

/// The PCRs quoted: what the server asks a node for (0–9, SHA-256 bank).
const QUOTED_PCRS: [u32; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
/// The goal of issue #3, in verifications per second on 2 cores; the 1-core
/// line is held to half of it.
const GOAL_PER_SEC: f64 = 20_000.0;
/// Keylime's published verifier throughput on a bare-metal server, quotes/s.
/// Published, not measured here.
const KEYLIME_PUBLISHED_PER_SEC: f64 = 2_500.0;
const NODE_ID: &str = "bench-node";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    seconds: f64,
    quotes: usize,
    anchor_calls: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 3.0,
        quotes: 64,
        anchor_calls: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a number"));
        match a.as_str() {
            "--seconds" => args.seconds = value("--seconds")?.parse().context("--seconds")?,
            "--quotes" => args.quotes = value("--quotes")?.parse().context("--quotes")?,
            "--anchor-calls" => {
                args.anchor_calls = value("--anchor-calls")?.parse().context("--anchor-calls")?
            }
            other => bail!(
                "unknown argument {other:?} (usage: bench-attest [--seconds S] [--quotes N] [--anchor-calls N])"
            ),
        }
    }
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    ensure!(
        args.quotes >= 2,
        "--quotes must be at least 2 (one share per core)"
    );
    ensure!(args.anchor_calls >= 2, "--anchor-calls must be at least 2");
    Ok(args)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one tpm2-tools command against the bench TPM; fails with its stderr.
fn tpm2(dir: &Path, tcti: &str, tool: &str, args: &[&str]) -> Result<()> {
    let out = run_with_timeout(
        tool,
        Command::new(tool)
            .current_dir(dir)
            .env("TPM2TOOLS_TCTI", tcti)
            .args(args),
        TOOL_TIMEOUT,
    )?;
    if !out.status.success() {
        bail!(
            "`{tool} {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Files of one quote made by tpm2_quote, and the request warden gets.
struct Quote {
    nonce: Vec<u8>,
    msg: PathBuf,
    sig: PathBuf,
    pcrs: PathBuf,
    request: AttestRequest,
}

/// The evidence both contenders check.
struct Evidence {
    ak_pub: PathBuf,
    /// The quoted PCRs' values as bytes (the requests carry them as hex).
    quoted: BTreeMap<u32, Vec<u8>>,
    facts: NodeFacts,
    policy: Policy,
    quotes: Vec<Quote>,
}

/// One swtpm holding the fixture boot's PCRs; an AK and `n` quotes from
/// tpm2-tools, in `dir`.
fn make_evidence(dir: &Path, n: usize) -> Result<Evidence> {
    for tool in [
        "tpm2_createek",
        "tpm2_createak",
        "tpm2_quote",
        "tpm2_checkquote",
        "tpm2_flushcontext",
    ] {
        require_program(tool)?;
    }
    let log_path = fixture_event_log();
    let log = std::fs::read(&log_path).with_context(|| format!("read {}", log_path.display()))?;
    let mut swtpm = Swtpm::start(SwtpmTransport::Tcp)?;
    let tcti = swtpm.tcti().context("TCP swtpm has a TCTI")?;

    // The agent's facade replays the log; it must let go of the TPM before
    // tpm2-tools connect (swtpm's data port serves one client at a time).
    let quoted: BTreeMap<u32, Vec<u8>> = {
        let mut t = Tpm::open(&tcti).context("open the bench swtpm")?;
        let extended = replay_event_log_into_pcrs(&mut t, &log)?;
        eprintln!(
            "bench: replayed {extended} events of {} into swtpm",
            log_path.display()
        );
        let bank = t.pcr_bank_sha256().context("read the SHA-256 PCRs")?;
        QUOTED_PCRS
            .iter()
            .map(|i| {
                Ok((
                    *i,
                    bank.get(i)
                        .with_context(|| format!("PCR {i} not read"))?
                        .to_vec(),
                ))
            })
            .collect::<Result<_>>()?
    };

    // swtpm without a resource manager keeps every transient object a tool
    // loaded: flush after each command or the TPM runs out of object slots.
    let flush = || tpm2(dir, &tcti, "tpm2_flushcontext", &["-t"]);
    tpm2(
        dir,
        &tcti,
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    )?;
    flush()?;
    tpm2(
        dir,
        &tcti,
        "tpm2_createak",
        &[
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u",
            "ak.pub", "-n", "ak.name", "-r", "ak.priv",
        ],
    )?;
    flush()?;
    tpm2(dir, &tcti, "tpm2_flushcontext", &["-s"])?;

    let ak_pub = dir.join("ak.pub");
    let public = tpm::parse_tpm2b_public(&std::fs::read(&ak_pub).context("read ak.pub")?)
        .context("ak.pub (TPM2B_PUBLIC from tpm2_createak) does not parse")?;
    let name = public.name().context("AK name")?;
    let tool_name = std::fs::read(dir.join("ak.name")).context("read ak.name")?;
    ensure!(
        name == tool_name,
        "the AK name warden computes ({}) is not tpm2_createak's ({})",
        hex(&name),
        hex(&tool_name)
    );

    let selection = format!(
        "sha256:{}",
        QUOTED_PCRS
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let started = Instant::now();
    let mut quotes = Vec::with_capacity(n);
    for i in 0..n {
        // Distinct 32-byte nonces, as the server's would be.
        let nonce =
            tpm::HashAlg::Sha256.digest(format!("warden bench-attest nonce {i}").as_bytes());
        let (msg, sig, pcrs) = (format!("msg-{i}"), format!("sig-{i}"), format!("pcrs-{i}"));
        tpm2(
            dir,
            &tcti,
            "tpm2_quote",
            &[
                "-c",
                "ak.ctx",
                "-l",
                &selection,
                "-q",
                &hex(&nonce),
                "-m",
                &msg,
                "-s",
                &sig,
                "-o",
                &pcrs,
                "-g",
                "sha256",
            ],
        )?;
        flush()?;
        let read = |f: &str| std::fs::read(dir.join(f)).with_context(|| format!("read {f}"));
        let request = AttestRequest {
            protocol: PROTOCOL_VERSION,
            node_id: NODE_ID.into(),
            ak_name: hex(&name),
            nonce: nonce.clone(),
            quote: read(&msg)?,
            signature: read(&sig)?,
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values: quoted.iter().map(|(i, v)| (*i, hex(v))).collect(),
            },
            event_log: Some(log.clone()),
            phase: Default::default(),
            agent_log: Vec::new(),
        };
        quotes.push(Quote {
            nonce,
            msg: dir.join(msg),
            sig: dir.join(sig),
            pcrs: dir.join(pcrs),
            request,
        });
    }
    eprintln!(
        "bench: {n} quotes by tpm2_quote in {:.1} s (AK RSA-2048 RSASSA-SHA256, PCRs {selection})",
        started.elapsed().as_secs_f64()
    );
    // Both contenders verify offline: no TPM from here on.
    swtpm.stop();

    // The node as the server knows it after enrollment and an earlier good
    // quote: the bound AK and the clock of that quote (so the
    // resetCount/restartCount check runs too), and a policy learned from the
    // same boot, as `wardenctl policy learn` would.
    let first = quote::parse_attest(&quotes[0].request.quote)
        .context("tpm2_quote's message does not parse")?;
    let facts = NodeFacts {
        ak: Some(BoundAk { name, public }),
        last_clock: Some((first.clock_info.reset_count, first.clock_info.restart_count)),
        last_clock_unsafe: false,
    };
    let parsed = eventlog::parse(&log).context("fixture log")?;
    let replayed = eventlog::replay(&parsed, HashAlg::Sha256).context("replay fixture log")?;
    let policy = policy::learn(
        "bench-ovmf-fixture",
        &parsed,
        &replayed,
        &DEFAULT_LEARN_PCRS,
    );
    Ok(Evidence {
        ak_pub,
        quoted,
        facts,
        policy,
        quotes,
    })
}

/// Seconds of CPU this thread has used. The machine is shared (other
/// builds, QEMU runs), so wall-clock rates understate what a core does;
/// CPU time says what one verification costs whatever else runs.
fn thread_cpu_secs() -> Result<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes one timespec into `ts`, a valid,
    // exclusively borrowed local that outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ensure!(
        rc == 0,
        "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}",
        std::io::Error::last_os_error()
    );
    // Both fields are small and non-negative for a thread's CPU time.
    #[allow(clippy::cast_precision_loss)]
    Ok(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Verifies `quotes` round-robin until `stop` is set, registering each nonce
/// just before its verification. Returns how many passed and the CPU
/// seconds the thread used; fails on the first that does not pass.
fn verify_loop(
    quotes: &[&Quote],
    nonces: &NonceStore,
    e: &Evidence,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(u64, f64)> {
    let cpu_start = thread_cpu_secs()?;
    let mut done = 0u64;
    loop {
        for q in quotes {
            nonces.register(q.nonce.clone(), NODE_ID);
            let outcome = verify::verify(&q.request, nonces, Some(&e.facts), Some(&e.policy), None);
            if !outcome.reasons.is_empty() || !outcome.evidence_ok {
                stop.store(true, Ordering::Relaxed);
                bail!(
                    "verification {done} FAILED — a benchmark of failing verifications is worthless: {:#?}",
                    outcome.reasons
                );
            }
            done += 1;
        }
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return Ok((done, thread_cpu_secs()? - cpu_start));
        }
    }
}

/// Verifications per second over `threads` threads for `seconds`, each
/// thread with its own share of the quotes and one shared `NonceStore`.
fn warden_rate(e: &Evidence, threads: usize, seconds: f64) -> Result<f64> {
    let nonces = NonceStore::new(Duration::from_secs(300));
    let stop = AtomicBool::new(false);
    let shares: Vec<Vec<&Quote>> = (0..threads)
        .map(|t| e.quotes.iter().skip(t).step_by(threads).collect())
        .collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let counts: Vec<Result<(u64, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .map(|share| s.spawn(|| verify_loop(share, &nonces, e, deadline, &stop)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a verifier thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut total, mut cpu) = (0u64, 0.0);
    for c in counts {
        let (n, secs) = c?;
        total += n;
        cpu += secs;
    }
    // Counts stay far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let (rate, per_cpu_sec) = (total as f64 / elapsed, total as f64 / cpu);
    eprintln!(
        "bench: warden: {total} verifications on {threads} thread(s) in {elapsed:.2} s = {rate:.0}/s; \
         they had {cpu:.2} s of CPU ({:.0}% of {threads} core(s)): {per_cpu_sec:.0}/s per busy core",
        100.0 * cpu / (elapsed * threads as f64)
    );
    Ok(rate)
}

/// Mean CPU microseconds per call of `f` over `n` calls.
fn micros(n: u32, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t = thread_cpu_secs()?;
    for _ in 0..n {
        f()?;
    }
    Ok((thread_cpu_secs()? - t) * 1e6 / f64::from(n))
}

/// Times each phase of `verify` on its own, on one thread, so a miss of the
/// goal says where the time goes. Diagnostics only (stderr).
fn profile(e: &Evidence) -> Result<()> {
    const N: u32 = 2_000;
    let q = &e.quotes[0];
    let req = &q.request;
    let ak = e.facts.ak.as_ref().context("bound AK")?;
    let log = req.event_log.as_deref().context("event log")?;
    let quoted = &e.quoted;
    let nonces = NonceStore::new(Duration::from_secs(300));
    let parsed = eventlog::parse(log)?;
    let replayed = eventlog::replay(&parsed, HashAlg::Sha256)?;
    let verified = quote::verify_quote(&ak.public, &req.quote, &req.signature, &req.nonce, quoted)?;

    let whole = micros(N, || {
        nonces.register(q.nonce.clone(), NODE_ID);
        let o = verify::verify(req, &nonces, Some(&e.facts), Some(&e.policy), None);
        ensure!(o.reasons.is_empty(), "verify failed: {:?}", o.reasons);
        Ok(())
    })?;
    let nonce = micros(N, || {
        nonces.register(q.nonce.clone(), NODE_ID);
        nonces.take(&q.nonce, NODE_ID).map_err(anyhow::Error::from)
    })?;
    let quote_all = micros(N, || {
        quote::verify_quote(&ak.public, &req.quote, &req.signature, &req.nonce, quoted)
            .map(drop)
            .map_err(Into::into)
    })?;
    let rsa_key = micros(N, || {
        ak.public
            .rsa_public_key()
            .context("RSA AK")?
            .map(drop)
            .map_err(Into::into)
    })?;
    // Everything verify_quote does besides the RSA maths.
    let quote_parsing = micros(N, || {
        quote::parse_signature(&req.signature)?;
        quote::parse_attest(&req.quote)?;
        tpm::HashAlg::Sha256.digest(&req.quote);
        let concat: Vec<u8> = quoted.values().flatten().copied().collect();
        tpm::HashAlg::Sha256.digest(&concat);
        Ok(())
    })?;
    let parse = micros(N, || eventlog::parse(log).map(drop).map_err(Into::into))?;
    let replay = micros(N, || {
        eventlog::replay(&parsed, HashAlg::Sha256)
            .map(drop)
            .map_err(Into::into)
    })?;
    let compare = micros(N, || {
        let m = eventlog::compare(&parsed, HashAlg::Sha256, &replayed, quoted, &verified.pcrs);
        ensure!(m.is_empty(), "log does not match the quote");
        Ok(())
    })?;
    let evaluate = micros(N, || {
        let r = policy::evaluate(&e.policy, &parsed, &replayed);
        ensure!(r.is_empty(), "policy refused: {r:?}");
        Ok(())
    })?;
    let events = parsed.events.len();
    eprintln!("bench: where one verification's time goes (1 thread, mean CPU time of {N}):");
    eprintln!("bench:   whole verify()                  {whole:8.1} µs");
    eprintln!("bench:   nonce register + take           {nonce:8.1} µs");
    eprintln!("bench:   verify_quote (sig+digest+nonce) {quote_all:8.1} µs: RSA-2048 verify (rsa crate) ~{:.1} µs, building the key {rsa_key:.1} µs, parsing and hashing {quote_parsing:.1} µs", quote_all - quote_parsing - rsa_key);
    eprintln!(
        "bench:   event log parse ({events} events, {} B) {parse:8.1} µs",
        log.len()
    );
    eprintln!("bench:   replay (SHA-256 bank)           {replay:8.1} µs");
    eprintln!("bench:   compare with the quoted PCRs    {compare:8.1} µs");
    eprintln!(
        "bench:   policy evaluate ({} PCRs)        {evaluate:8.1} µs",
        e.policy.pcrs.len()
    );
    Ok(())
}

/// tpm2_checkquote on every quote in turn, `calls` times in all, spread
/// over `threads` threads (each running its calls one after another).
/// Each call is a process start, as an operator runs it. Returns calls/s.
fn anchor_rate(e: &Evidence, calls: usize, threads: usize) -> Result<f64> {
    let one = |i: usize| -> Result<()> {
        let q = &e.quotes[i % e.quotes.len()];
        let status = Command::new("tpm2_checkquote")
            .arg("-u")
            .arg(&e.ak_pub)
            .arg("-m")
            .arg(&q.msg)
            .arg("-s")
            .arg(&q.sig)
            .arg("-f")
            .arg(&q.pcrs)
            .args(["-g", "sha256", "-q", &hex(&q.nonce)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .context("run tpm2_checkquote")?;
        ensure!(
            status.success(),
            "tpm2_checkquote FAILED on quote {i} ({status}): the anchor must pass"
        );
        Ok(())
    };
    let started = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || (t..calls).step_by(threads).try_for_each(one)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an anchor thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    // calls is small.
    #[allow(clippy::cast_precision_loss)]
    let rate = calls as f64 / elapsed;
    eprintln!(
        "bench: anchor: {calls} tpm2_checkquote calls on {threads} thread(s) in {elapsed:.2} s = {rate:.1}/s ({:.1} ms per call)",
        1000.0 * elapsed * threads as f64 / calls as f64
    );
    Ok(rate)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let dir = tempfile::Builder::new()
        .prefix("warden-bench-attest-")
        .tempdir()
        .context("temp dir")?;
    let e = make_evidence(dir.path(), args.quotes)?;
    eprintln!(
        "bench: evidence: tpm2-tools files (TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC) read by both contenders; event log {} B; policy learned over PCRs {:?}",
        e.quotes[0].request.event_log.as_ref().map_or(0, Vec::len),
        e.policy.pcrs.keys().collect::<Vec<_>>()
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        eprintln!("bench: load average before timing: {}", load.trim());
    }

    // Warm-up (caches, allocator) and a check that every quote passes.
    warden_rate(&e, 1, 0.3)?;
    let one = warden_rate(&e, 1, args.seconds)?;
    let all = warden_rate(&e, cores, args.seconds)?;
    profile(&e)?;

    anchor_rate(&e, 3, 1)?; // warm-up: page cache for the tool and its libraries
    let anchor_one = anchor_rate(&e, args.anchor_calls, 1)?;
    let anchor_all = anchor_rate(&e, args.anchor_calls, cores)?;

    let plural = if cores == 1 { "" } else { "s" };
    println!(
        "BENCH attest-verify-rate: warden {all:.0}/s on {cores} core{plural}, anchor tpm2_checkquote {anchor_all:.1}/s on {cores} core{plural}, ratio {:.0} (goal >= {GOAL_PER_SEC:.0}/s)",
        all / anchor_all
    );
    println!(
        "BENCH attest-verify-rate-1core: warden {one:.0}/s on 1 core, anchor tpm2_checkquote {anchor_one:.1}/s on 1 core, ratio {:.0} (goal >= {:.0}/s)",
        one / anchor_one,
        GOAL_PER_SEC / 2.0
    );
    println!(
        "BENCH attest-verify-rate-vs-keylime: warden {all:.0}/s on {cores} core{plural}, anchor keylime-published {KEYLIME_PUBLISHED_PER_SEC:.0}/s (published for a bare-metal server, not measured here), ratio {:.1} (goal >= {:.0})",
        all / KEYLIME_PUBLISHED_PER_SEC,
        GOAL_PER_SEC / KEYLIME_PUBLISHED_PER_SEC
    );
    Ok(())
}
