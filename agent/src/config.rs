//! The agent's settings: from the kernel command line (`warden.*=` keys) when
//! it is PID 1, from clap flags on a host.
//!
//! Parsing is pure (a `&str` in, a [`Config`] or an error naming the key out)
//! so it is unit-tested without a kernel. This module must never touch the
//! file system, mount anything or decide what happens on error — it only says
//! what was asked for.

use std::path::PathBuf;
use std::time::Duration;

use warden_protocol::agentlog::EventKind;
use warden_protocol::image::{Checksum, HttpsTrust};
use warden_protocol::wipe::{Method, VerifyMode};

use crate::tpm::{AkAlgorithm, EkAlgorithm, EkChoice};

/// Where the firmware's TCG event log lives once securityfs is mounted.
pub const DEFAULT_EVENT_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// The kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// Host-mode default for `--max-attempts` (init mode retries forever).
pub const DEFAULT_HOST_ATTEMPTS: u32 = 5;

/// How the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the ramdisk: mounts, reaps, halts.
    Init,
    /// An ordinary process on a host: never mounts, halts, powers off or reboots.
    Host,
}

impl Mode {
    /// `init` or `host`, as in the `agent_start` event.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Init => "init",
            Mode::Host => "host",
        }
    }
}

/// What PID 1 does with the machine when it gives up or finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    /// Idle forever, reaping children (only for `warden.done`).
    Wait,
    /// `reboot(RB_HALT_SYSTEM)`: stop the CPUs, leave the console readable.
    Halt,
    /// `reboot(RB_POWER_OFF)`.
    Poweroff,
}

impl PowerAction {
    /// `wait`, `halt` or `poweroff`.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Wait => "wait",
            PowerAction::Halt => "halt",
            PowerAction::Poweroff => "poweroff",
        }
    }
}

/// A pinned CA certificate: the SHA-256 of its DER encoding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CaPin(pub [u8; 32]);

impl std::fmt::Display for CaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for CaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The server to say hello to, and how to recognise it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// `https://HOST:PORT` (no trailing slash).
    pub url: String,
    /// The pin of the server's CA certificate.
    pub ca: CaPin,
}

/// The image to write after the wipe (interim: from `warden.image*` keys
/// until issue #8's turnover plans carry it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageConfig {
    /// `http://` or `https://` URL of the image as served (raw, gzip, xz or
    /// zstd, detected by magic bytes).
    pub url: String,
    /// The digest of the served bytes: `warden.image_checksum=sha256:HEX|sha512:HEX`.
    pub checksum: Checksum,
    /// The kernel name of the disk to write (`nvme0n1`); `None`: the first
    /// disk of the inventory in name order.
    pub target: Option<String>,
    /// Read back what was written and compare its hash (`warden.image_verify=1`).
    pub verify_after_write: bool,
    /// How to trust an `https://` image server: `warden.image_ca=sha256:HEX`
    /// pins one CA. `http://` needs none: the checksum, not the transport,
    /// carries the integrity.
    pub https_trust: Option<HttpsTrust>,
}

/// How the node goes to the tenant after Ready: `warden.handoff=`
/// (`docs/handoff.md`). Interim, like the image keys, until plans (#8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffMode {
    /// Measure the tenant's kernel, initrd and command line into PCR 13,
    /// then kexec it.
    Kexec,
    /// `reboot-to-disk` (BootNext → the tenant ESP), `reboot` or `poweroff`.
    Reboot(crate::handoff::RebootMode),
}

impl HandoffMode {
    pub fn name(self) -> &'static str {
        match self {
            HandoffMode::Kexec => "kexec",
            HandoffMode::Reboot(m) => m.name(),
        }
    }

    /// Kexec and reboot-to-disk start what is on the imaged disk.
    pub fn needs_disk(self) -> bool {
        matches!(
            self,
            HandoffMode::Kexec | HandoffMode::Reboot(crate::handoff::RebootMode::RebootToDisk)
        )
    }
}

/// Checks a lease id: it is printed by the tenant on its console, so only
/// a conservative alphabet (`[A-Za-z0-9._:-]{1,128}`).
pub fn parse_lease(key: &str, value: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(value.to_string())
    } else {
        Err(bad(
            key,
            format!("expected 1–128 characters of A-Z a-z 0-9 . _ : -, got {value:?}"),
        ))
    }
}

/// Everything the agent was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// `None`: no server configured; the hello step reports an error and is skipped.
    pub server: Option<ServerConfig>,
    /// A `tracing` filter, e.g. `info` or `warden_agent=debug`.
    pub log: String,
    /// `halt` or `poweroff` (init mode).
    pub on_error: PowerAction,
    /// `wait`, `halt` or `poweroff` (init mode).
    pub done: PowerAction,
    /// TSS TCTI string.
    pub tcti: String,
    /// The firmware event log file.
    pub event_log: PathBuf,
    /// The sysfs root (`/sys`).
    pub sys: PathBuf,
    /// Run DHCP (all interfaces when `dhcp_interfaces` is `None`).
    pub dhcp: bool,
    /// Restrict DHCP to these interfaces.
    pub dhcp_interfaces: Option<Vec<String>>,
    /// How often to try a retried step before giving up (`None`: forever).
    pub max_attempts: Option<u32>,
    /// The Attestation Key made (anew) on this boot: `warden.ak=rsa|ecc`.
    pub ak: AkAlgorithm,
    /// The Endorsement Key to enroll with, and so the node id:
    /// `warden.ek=auto|rsa|ecc` (see [`EkChoice`] and `docs/attestation.md`).
    pub ek: EkChoice,
    /// What the Wipe state erases every disk with after an OK verdict:
    /// `warden.wipe=none|auto|METHOD` (`None`: no wipe, Attest → Ready).
    /// Interim: issue #8's turnover plans will carry the method instead.
    pub wipe: Option<Method>,
    /// How each wiped disk is read back: `warden.wipe_verify=sampled|sampled:N|full`.
    pub wipe_verify: VerifyMode,
    /// What the Image state writes after an OK verdict (and after the wipe,
    /// when one was asked for); `None`: no image step.
    pub image: Option<ImageConfig>,
    /// How to hand the node over after Ready (init mode only); `None`:
    /// `warden.done` decides.
    pub handoff: Option<HandoffMode>,
    /// The lease id written to the imaged disk's `warden-config` partition
    /// before the handoff (`warden.lease=`).
    pub lease: Option<String>,
    /// Count attached loop devices as disks (host tests only; no kernel
    /// command line key). In host mode Wipe erases loop devices only.
    pub include_loop: bool,
    /// TEST HOOK, never set in a real turnover:
    /// `warden.test_alter_record=KIND` (`snapshot`, `wipe`, `image`,
    /// `handoff-kernel`, …) makes the measured log change one byte of the
    /// first event of that kind after extending it into PCR 13, so the
    /// final verdict must fail (see [`crate::measured::MeasuredLog::new`]).
    pub test_alter_record: Option<EventKind>,
    /// Unknown `warden.*` keys seen on the command line (ignored, logged).
    pub unknown_keys: Vec<String>,
}

/// A setting with a bad value; the message names the key and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    /// Init-mode defaults, before the command line is applied.
    pub fn init_defaults() -> Config {
        Config {
            mode: Mode::Init,
            server: None,
            log: "info".into(),
            on_error: PowerAction::Halt,
            done: PowerAction::Wait,
            tcti: DEFAULT_TCTI.into(),
            event_log: PathBuf::from(DEFAULT_EVENT_LOG),
            sys: PathBuf::from("/sys"),
            dhcp: true,
            dhcp_interfaces: None,
            max_attempts: None,
            ak: AkAlgorithm::Rsa2048RsassaSha256,
            ek: EkChoice::Auto,
            wipe: None,
            wipe_verify: default_wipe_verify(),
            image: None,
            handoff: None,
            lease: None,
            include_loop: false,
            test_alter_record: None,
            unknown_keys: Vec::new(),
        }
    }

    /// The backoff schedule for retried steps: 1 s doubling to 30 s.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            self.max_attempts,
        )
    }
}

/// Capped exponential backoff with an optional attempt limit.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
    max_attempts: Option<u32>,
    attempt: u32,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration, max_attempts: Option<u32>) -> Backoff {
        Backoff {
            next: first,
            cap,
            max_attempts,
            attempt: 0,
        }
    }

    /// Records a failed attempt. Returns its number (1-based) and the delay
    /// before the next one, or `None` when the attempt limit is reached.
    pub fn failed(&mut self) -> (u32, Option<Duration>) {
        self.attempt = self.attempt.saturating_add(1);
        if self.max_attempts.is_some_and(|max| self.attempt >= max) {
            return (self.attempt, None);
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        (self.attempt, Some(delay))
    }
}

/// Splits a kernel command line into `key[=value]` words the way the kernel
/// does: whitespace separates words, double quotes group (and are dropped).
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut have = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                have = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        out.push(cur);
    }
    out
}

/// Parses the kernel command line (the contents of `/proc/cmdline`) into an
/// init-mode [`Config`]. Keys other than `warden.*` are ignored; unknown
/// `warden.*` keys are collected in `unknown_keys`; the last of repeated keys wins.
pub fn parse_cmdline(cmdline: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::init_defaults();
    let mut server: Option<String> = None;
    let mut ca: Option<CaPin> = None;
    let mut image = ImageKeys::default();
    for word in words(cmdline) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        let Some(name) = key.strip_prefix("warden.") else {
            continue;
        };
        let known = matches!(
            name,
            "server"
                | "ca"
                | "log"
                | "on_error"
                | "done"
                | "tcti"
                | "ak"
                | "ek"
                | "wipe"
                | "wipe_verify"
                | "image"
                | "image_checksum"
                | "image_target"
                | "image_verify"
                | "image_ca"
                | "handoff"
                | "lease"
                | "test_alter_record"
        );
        if !known {
            cfg.unknown_keys.push(key.to_string());
            continue;
        }
        let Some(value) = value else {
            return Err(bad(key, "expected a value (key=value)"));
        };
        match name {
            "server" => server = Some(parse_server_url(key, value)?),
            "ca" => ca = Some(parse_ca_pin(key, value)?),
            "log" => cfg.log = parse_log(key, value)?,
            "on_error" => {
                cfg.on_error = match value {
                    "halt" => PowerAction::Halt,
                    "poweroff" => PowerAction::Poweroff,
                    other => {
                        return Err(bad(
                            key,
                            format!("expected halt or poweroff, got {other:?}"),
                        ))
                    }
                }
            }
            "done" => {
                cfg.done = match value {
                    "wait" => PowerAction::Wait,
                    "halt" => PowerAction::Halt,
                    "poweroff" => PowerAction::Poweroff,
                    other => {
                        return Err(bad(
                            key,
                            format!("expected wait, poweroff or halt, got {other:?}"),
                        ))
                    }
                }
            }
            "tcti" => {
                if value.is_empty() {
                    return Err(bad(key, "expected a TCTI, e.g. device:/dev/tpmrm0"));
                }
                cfg.tcti = value.to_string();
            }
            "ak" => cfg.ak = parse_ak(key, value)?,
            "ek" => cfg.ek = parse_ek(key, value)?,
            "wipe" => cfg.wipe = parse_wipe(key, value)?,
            "wipe_verify" => cfg.wipe_verify = parse_wipe_verify(key, value)?,
            "image" => image.url = Some(parse_image_url(key, value)?),
            "image_checksum" => image.checksum = Some(parse_image_checksum(key, value)?),
            "image_target" => image.target = Some(parse_image_target(key, value)?),
            "image_verify" => image.verify = parse_flag(key, value)?,
            "image_ca" => image.ca = Some(parse_ca_pin(key, value)?),
            "handoff" => {
                cfg.handoff = match value {
                    "none" => None,
                    "kexec" => Some(HandoffMode::Kexec),
                    other => {
                        Some(HandoffMode::Reboot(other.parse().map_err(
                            |e: String| bad(key, format!("{e}, kexec or none")),
                        )?))
                    }
                }
            }
            "lease" => cfg.lease = Some(parse_lease(key, value)?),
            "test_alter_record" => {
                cfg.test_alter_record = Some(
                    value
                        .parse::<EventKind>()
                        .map_err(|e| bad(key, e.to_string()))?,
                )
            }
            _ => {}
        }
    }
    cfg.server = pair_server(server, ca, "warden.server", "warden.ca")?;
    cfg.image = image.into_config(&IMAGE_KEYS)?;
    if cfg.image.is_none() {
        if let Some(mode) = cfg.handoff.filter(|m| m.needs_disk()) {
            return Err(bad(
                "warden.handoff",
                format!(
                    "{} starts the imaged disk, but warden.image is not set",
                    mode.name()
                ),
            ));
        }
        if cfg.lease.is_some() {
            return Err(bad(
                "warden.lease",
                "set, but warden.image (the disk it is written to) is missing",
            ));
        }
    }
    Ok(cfg)
}

/// The image settings as given, before they are checked together.
#[derive(Clone, Debug, Default)]
pub struct ImageKeys {
    pub url: Option<String>,
    pub checksum: Option<Checksum>,
    pub target: Option<String>,
    pub verify: bool,
    pub ca: Option<CaPin>,
}

/// The names of the image settings, for error messages: kernel command
/// line keys or host flags.
pub struct ImageKeyNames {
    pub url: &'static str,
    pub checksum: &'static str,
    pub target: &'static str,
    pub verify: &'static str,
    pub ca: &'static str,
}

/// The kernel command line's names.
pub const IMAGE_KEYS: ImageKeyNames = ImageKeyNames {
    url: "warden.image",
    checksum: "warden.image_checksum",
    target: "warden.image_target",
    verify: "warden.image_verify",
    ca: "warden.image_ca",
};

/// The host flags' names.
pub const IMAGE_FLAGS: ImageKeyNames = ImageKeyNames {
    url: "--image",
    checksum: "--image-checksum",
    target: "--image-target",
    verify: "--image-verify",
    ca: "--image-ca",
};

impl ImageKeys {
    /// An image step needs a URL and its checksum (an image that is not
    /// checked is never written); the other settings only make sense with
    /// a URL, so alone they are an error rather than silently ignored.
    pub fn into_config(self, names: &ImageKeyNames) -> Result<Option<ImageConfig>, ConfigError> {
        let Some(url) = self.url else {
            let stray = [
                (self.checksum.is_some(), names.checksum),
                (self.target.is_some(), names.target),
                (self.verify, names.verify),
                (self.ca.is_some(), names.ca),
            ]
            .into_iter()
            .find(|(set, _)| *set);
            return match stray {
                Some((_, key)) => Err(bad(
                    key,
                    format!("set, but {} (the image) is missing", names.url),
                )),
                None => Ok(None),
            };
        };
        let Some(checksum) = self.checksum else {
            return Err(bad(
                names.checksum,
                format!(
                    "missing: {} is set, and the image's checksum is required \
                     (sha256:<64 hex> or sha512:<128 hex> of the image as served)",
                    names.url
                ),
            ));
        };
        if self.ca.is_some() && !url.starts_with("https://") {
            return Err(bad(
                names.ca,
                format!("a CA pin needs an https:// image, got {url}"),
            ));
        }
        Ok(Some(ImageConfig {
            url,
            checksum,
            target: self.target,
            verify_after_write: self.verify,
            https_trust: self.ca.map(|pin| HttpsTrust::PinnedCa(pin.to_string())),
        }))
    }
}

/// Checks an `http://` or `https://` image URL with a host.
pub fn parse_image_url(key: &str, value: &str) -> Result<String, ConfigError> {
    let expected = || {
        bad(
            key,
            format!("expected an http:// or https:// URL of the image, got {value:?}"),
        )
    };
    let url = reqwest::Url::parse(value).map_err(|_| expected())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(expected());
    }
    Ok(value.to_string())
}

/// Parses `sha256:HEX` or `sha512:HEX`.
pub fn parse_image_checksum(key: &str, value: &str) -> Result<Checksum, ConfigError> {
    value
        .parse::<Checksum>()
        .map_err(|e| bad(key, e.to_string()))
}

/// Checks a kernel disk name (`nvme0n1`, `vda`, `sdb`, `loop3`): not a
/// path, so the image can only go to a disk the inventory lists.
pub fn parse_image_target(key: &str, value: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':'));
    if !ok {
        return Err(bad(
            key,
            format!("expected a kernel disk name such as nvme0n1 or vda, got {value:?}"),
        ));
    }
    Ok(value.to_string())
}

/// Parses `1`/`0` (also `yes`/`no`, `true`/`false`).
pub fn parse_flag(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "yes" | "true" => Ok(true),
        "0" | "no" | "false" => Ok(false),
        other => Err(bad(key, format!("expected 1 or 0, got {other:?}"))),
    }
}

/// Combines a server URL and a CA pin: both or neither (talking to a server
/// without a pin is never allowed).
pub fn pair_server(
    url: Option<String>,
    ca: Option<CaPin>,
    url_key: &str,
    ca_key: &str,
) -> Result<Option<ServerConfig>, ConfigError> {
    match (url, ca) {
        (Some(url), Some(ca)) => Ok(Some(ServerConfig { url, ca })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(bad(
            ca_key,
            format!(
                "missing: {url_key} is set, and the server's CA must be pinned (sha256:<64 hex>)"
            ),
        )),
        (None, Some(_)) => Err(bad(
            url_key,
            format!("missing: {ca_key} is set but no server"),
        )),
    }
}

/// Checks `https://HOST[:PORT][/]` and returns it without a trailing slash.
pub fn parse_server_url(key: &str, value: &str) -> Result<String, ConfigError> {
    let expected = || bad(key, format!("expected https://HOST:PORT, got {value:?}"));
    let url = reqwest::Url::parse(value).map_err(|_| expected())?;
    if url.scheme() != "https" || url.host_str().is_none_or(str::is_empty) {
        return Err(expected());
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(expected());
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// Parses `sha256:<64 hex>` (either case).
pub fn parse_ca_pin(key: &str, value: &str) -> Result<CaPin, ConfigError> {
    let expected = || bad(key, "expected sha256:<64 hex>");
    let hex_part = value.strip_prefix("sha256:").ok_or_else(expected)?;
    if hex_part.len() != 64 {
        return Err(expected());
    }
    let mut pin = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut pin).map_err(|_| expected())?;
    Ok(CaPin(pin))
}

/// Parses `rsa` (RSA-2048, RSASSA-SHA256) or `ecc` (NIST P-256, ECDSA-SHA256).
pub fn parse_ak(key: &str, value: &str) -> Result<AkAlgorithm, ConfigError> {
    match value {
        "rsa" => Ok(AkAlgorithm::Rsa2048RsassaSha256),
        "ecc" => Ok(AkAlgorithm::EccP256EcdsaSha256),
        other => Err(bad(key, format!("expected rsa or ecc, got {other:?}"))),
    }
}

/// Parses `auto` (the rule in [`crate::tpm::EkFacts::choose`]), `rsa`
/// (RSA-2048, TCG template L-1) or `ecc` (NIST P-256, template L-2).
pub fn parse_ek(key: &str, value: &str) -> Result<EkChoice, ConfigError> {
    match value {
        "auto" => Ok(EkChoice::Auto),
        "rsa" => Ok(EkChoice::Fixed(EkAlgorithm::Rsa2048)),
        "ecc" => Ok(EkChoice::Fixed(EkAlgorithm::EccNistP256)),
        other => Err(bad(
            key,
            format!("expected auto, rsa or ecc, got {other:?}"),
        )),
    }
}

/// The default read-back: sampled, at the wipe library's default density.
pub fn default_wipe_verify() -> VerifyMode {
    VerifyMode::Sampled {
        blocks_per_gib: crate::wipe::DEFAULT_BLOCKS_PER_GIB,
    }
}

/// Parses `none` (no wipe) or a method as [`Method`] parses it (`auto`,
/// `zeroout`, `overwrite:2:random`, `nvme-format-user-data`, `metadata`, …).
pub fn parse_wipe(key: &str, value: &str) -> Result<Option<Method>, ConfigError> {
    if value == "none" {
        return Ok(None);
    }
    value
        .parse::<Method>()
        .map(Some)
        .map_err(|e| bad(key, format!("expected none or a method: {e}")))
}

/// Parses `sampled` (first and last MiB plus the library's default number
/// of random blocks per GiB), `sampled:N` (N ≥ 1 blocks per GiB) or `full`.
pub fn parse_wipe_verify(key: &str, value: &str) -> Result<VerifyMode, ConfigError> {
    let expected = || {
        bad(
            key,
            format!("expected sampled, sampled:N (N >= 1 blocks per GiB) or full, got {value:?}"),
        )
    };
    match value {
        "full" => Ok(VerifyMode::Full),
        "sampled" => Ok(default_wipe_verify()),
        other => {
            let n = other.strip_prefix("sampled:").ok_or_else(expected)?;
            let blocks_per_gib = n
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(expected)?;
            Ok(VerifyMode::Sampled { blocks_per_gib })
        }
    }
}

/// Checks a `tracing` filter (`info`, `debug`, `warden_agent=trace,info`).
pub fn parse_log(key: &str, value: &str) -> Result<String, ConfigError> {
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| value.to_string())
        .map_err(|e| {
            bad(
                key,
                format!("expected a log level such as info or debug ({e})"),
            )
        })
}

/// Host-mode flags: the same settings as the kernel command line.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "warden-agent",
    version,
    about = "The Warden agent (host mode; as PID 1 it reads warden.* from the kernel command line)"
)]
pub struct HostArgs {
    /// The attestation server, https://HOST:PORT.
    #[arg(long, value_parser = |v: &str| parse_server_url("--server", v))]
    pub server: Option<String>,
    /// Pin of the server's CA certificate: sha256:<64 hex> of its DER.
    #[arg(long, value_parser = |v: &str| parse_ca_pin("--ca", v))]
    pub ca: Option<CaPin>,
    /// Log filter (error, warn, info, debug, trace, or tracing directives).
    #[arg(long, default_value = "info", value_parser = |v: &str| parse_log("--log", v))]
    pub log: String,
    /// TSS TCTI of the TPM.
    #[arg(long, env = "TCTI", default_value = DEFAULT_TCTI)]
    pub tcti: String,
    /// The firmware's TCG event log.
    #[arg(long, default_value = DEFAULT_EVENT_LOG)]
    pub event_log: PathBuf,
    /// The sysfs root to take the inventory from.
    #[arg(long, default_value = "/sys")]
    pub sys: PathBuf,
    /// Run DHCP on this interface (host mode skips DHCP otherwise).
    #[arg(long)]
    pub dhcp_interface: Option<String>,
    /// How often to try each server exchange (hello, enroll, attest) and
    /// DHCP before giving up.
    #[arg(long, default_value_t = DEFAULT_HOST_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// The Attestation Key to create for this run: rsa or ecc.
    #[arg(long, default_value = "rsa", value_parser = |v: &str| parse_ak("--ak", v))]
    pub ak: AkAlgorithm,
    /// The Endorsement Key to enroll with (it names the node): auto, rsa or
    /// ecc. auto: RSA-2048 unless the TPM has only an ECC P-256 EK
    /// certificate or cannot make RSA-2048 keys.
    #[arg(long, default_value = "auto", value_parser = |v: &str| parse_ek("--ek", v))]
    pub ek: EkChoice,
    /// Erase every disk of the inventory after an OK verdict: none, auto or
    /// a method (zeroout, secdiscard, discard, overwrite[:PASSES[:zeros|random]],
    /// metadata, nvme-…/ata-… hardware methods). Erases for real, but in
    /// host mode only loop devices (see --include-loop), never a real disk.
    #[arg(long, default_value = "none", value_parser = |v: &str| parse_wipe("--wipe", v))]
    // Fully qualified so clap takes the parser's `Option` as the value
    // (`none` parses to `None`) instead of making the flag optional.
    pub wipe: ::std::option::Option<Method>,
    /// How wiped disks are read back: sampled, sampled:N (blocks per GiB) or full.
    #[arg(long, default_value = "sampled", value_parser = |v: &str| parse_wipe_verify("--wipe-verify", v))]
    pub wipe_verify: VerifyMode,
    /// Count attached loop devices as disks (for host tests: they are then
    /// in the inventory, and wiped with --wipe).
    #[arg(long)]
    pub include_loop: bool,
    /// After an OK verdict (and the wipe), write this image (http:// or
    /// https://; raw, gzip, xz or zstd) to --image-target. Host mode writes
    /// loop devices only.
    #[arg(long, value_parser = |v: &str| parse_image_url("--image", v))]
    pub image: Option<String>,
    /// The image's checksum as served: sha256:HEX or sha512:HEX (required with --image).
    #[arg(long, value_parser = |v: &str| parse_image_checksum("--image-checksum", v))]
    pub image_checksum: Option<Checksum>,
    /// The disk to write, by kernel name (default: the first disk of the
    /// inventory in name order).
    #[arg(long, value_parser = |v: &str| parse_image_target("--image-target", v))]
    pub image_target: Option<String>,
    /// Read the written image back and compare its hash.
    #[arg(long)]
    pub image_verify: bool,
    /// Pin of the https:// image server's CA: sha256:<64 hex> of its DER.
    #[arg(long, value_parser = |v: &str| parse_ca_pin("--image-ca", v))]
    pub image_ca: Option<CaPin>,
    /// TEST HOOK: alter the first measured event of this kind after
    /// extending it, so the final verdict fails (as
    /// `warden.test_alter_record`).
    #[arg(long, hide = true, value_parser = |v: &str| v.parse::<EventKind>().map_err(|e| e.to_string()))]
    pub test_alter_record: Option<EventKind>,
}

impl HostArgs {
    /// The host-mode [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        Ok(Config {
            mode: Mode::Host,
            server: pair_server(self.server, self.ca, "--server", "--ca")?,
            log: self.log,
            on_error: PowerAction::Halt,
            done: PowerAction::Wait,
            tcti: self.tcti,
            event_log: self.event_log,
            sys: self.sys,
            dhcp: self.dhcp_interface.is_some(),
            dhcp_interfaces: self.dhcp_interface.map(|i| vec![i]),
            max_attempts: Some(self.max_attempts),
            ak: self.ak,
            ek: self.ek,
            wipe: self.wipe,
            wipe_verify: self.wipe_verify,
            image: ImageKeys {
                url: self.image,
                checksum: self.image_checksum,
                target: self.image_target,
                verify: self.image_verify,
                ca: self.image_ca,
            }
            .into_config(&IMAGE_FLAGS)?,
            // A host has no tenant to hand over to.
            handoff: None,
            lease: None,
            include_loop: self.include_loop,
            test_alter_record: self.test_alter_record,
            unknown_keys: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const PIN: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";

    #[test]
    fn the_alter_record_test_hook_parses_a_kind() {
        assert_eq!(parse_cmdline("").unwrap().test_alter_record, None);
        let cfg = parse_cmdline("warden.test_alter_record=wipe").unwrap();
        assert_eq!(cfg.test_alter_record, Some(EventKind::Wipe));
        let cfg = parse_cmdline("warden.test_alter_record=handoff-cmdline").unwrap();
        assert_eq!(cfg.test_alter_record, Some(EventKind::HandoffCmdline));
        let err = parse_cmdline("warden.test_alter_record=disk").unwrap_err();
        assert_eq!(err.key, "warden.test_alter_record");
        assert!(err.message.contains("snapshot, wipe, image"), "{err}");
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let cfg = parse_cmdline("BOOT_IMAGE=/vmlinuz console=ttyS0 quiet\n").unwrap();
        assert_eq!(cfg.mode, Mode::Init);
        assert_eq!(cfg.server, None);
        assert_eq!(cfg.on_error, PowerAction::Halt);
        assert_eq!(cfg.done, PowerAction::Wait);
        assert_eq!(cfg.tcti, DEFAULT_TCTI);
        assert_eq!(cfg.log, "info");
        assert_eq!(cfg.max_attempts, None);
        assert_eq!(cfg.ak, AkAlgorithm::Rsa2048RsassaSha256);
        assert_eq!(cfg.ek, EkChoice::Auto);
        assert!(cfg.dhcp);
    }

    #[test]
    fn reads_every_key_with_quotes() {
        let line = format!(
            "console=ttyS0 warden.server=https://10.0.2.2:8443/ warden.ca={PIN} \
             \"warden.log=warden_agent=debug,info\" warden.on_error=poweroff \
             warden.done=\"poweroff\" warden.tcti=\"swtpm:host=127.0.0.1, port=2321\" warden.ak=ecc warden.ek=ecc warden.future=1"
        );
        let cfg = parse_cmdline(&line).unwrap();
        let server = cfg.server.unwrap();
        assert_eq!(server.url, "https://10.0.2.2:8443");
        assert_eq!(
            server.ca.to_string(),
            "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
        );
        assert_eq!(cfg.log, "warden_agent=debug,info");
        assert_eq!(cfg.on_error, PowerAction::Poweroff);
        assert_eq!(cfg.done, PowerAction::Poweroff);
        assert_eq!(cfg.tcti, "swtpm:host=127.0.0.1, port=2321");
        assert_eq!(cfg.ak, AkAlgorithm::EccP256EcdsaSha256);
        assert_eq!(cfg.ek, EkChoice::Fixed(EkAlgorithm::EccNistP256));
        assert_eq!(cfg.unknown_keys, vec!["warden.future".to_string()]);
    }

    #[test]
    fn last_repeated_key_wins() {
        let cfg = parse_cmdline("warden.done=halt warden.done=wait").unwrap();
        assert_eq!(cfg.done, PowerAction::Wait);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse_cmdline("warden.server=https://x:1 warden.ca=sha256:abcd").unwrap_err();
        assert_eq!(err.to_string(), "warden.ca: expected sha256:<64 hex>");
        let err = parse_cmdline("warden.ca=md5:00").unwrap_err();
        assert_eq!(err.to_string(), "warden.ca: expected sha256:<64 hex>");
        let err = parse_cmdline(&format!("warden.ca=sha256:{}", "zz".repeat(32))).unwrap_err();
        assert_eq!(err.key, "warden.ca");
        let err = parse_cmdline(&format!("warden.server=http://x:80 warden.ca={PIN}")).unwrap_err();
        assert_eq!(err.key, "warden.server");
        assert!(err.message.contains("https://HOST:PORT"), "{err}");
        let err = parse_cmdline("warden.on_error=reboot").unwrap_err();
        assert_eq!(
            err.to_string(),
            "warden.on_error: expected halt or poweroff, got \"reboot\""
        );
        let err = parse_cmdline("warden.done=sleep").unwrap_err();
        assert_eq!(err.key, "warden.done");
        let err = parse_cmdline("warden.log=[[[").unwrap_err();
        assert_eq!(err.key, "warden.log");
        let err = parse_cmdline("warden.tcti").unwrap_err();
        assert_eq!(err.key, "warden.tcti");
        let err = parse_cmdline("warden.ak=dsa").unwrap_err();
        assert_eq!(
            err.to_string(),
            "warden.ak: expected rsa or ecc, got \"dsa\""
        );
        let err = parse_cmdline("warden.ek=p384").unwrap_err();
        assert_eq!(
            err.to_string(),
            "warden.ek: expected auto, rsa or ecc, got \"p384\""
        );
        let cfg = parse_cmdline("warden.ek=ecc warden.ek=rsa").unwrap();
        assert_eq!(cfg.ek, EkChoice::Fixed(EkAlgorithm::Rsa2048));
    }

    #[test]
    fn server_and_pin_come_together() {
        let err = parse_cmdline("warden.server=https://h:1").unwrap_err();
        assert_eq!(err.key, "warden.ca");
        let err = parse_cmdline(&format!("warden.ca={PIN}")).unwrap_err();
        assert_eq!(err.key, "warden.server");
    }

    #[test]
    fn words_follow_kernel_quoting() {
        assert_eq!(
            words("  a=\"b c\"  \"d=e f\" g "),
            vec!["a=b c", "d=e f", "g"]
        );
        assert_eq!(words("x=\"\""), vec!["x="]);
        assert!(words(" \n").is_empty());
    }

    #[test]
    fn host_flags_map_to_the_same_config() {
        let args = HostArgs::try_parse_from([
            "warden-agent",
            "--server",
            "https://127.0.0.1:8443",
            "--ca",
            PIN,
            "--tcti",
            "swtpm:host=127.0.0.1,port=2321",
            "--max-attempts",
            "2",
            "--ak",
            "ecc",
            "--ek",
            "ecc",
        ])
        .unwrap();
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.ak, AkAlgorithm::EccP256EcdsaSha256);
        assert_eq!(cfg.ek, EkChoice::Fixed(EkAlgorithm::EccNistP256));
        let defaults = HostArgs::try_parse_from(["warden-agent"]).unwrap();
        assert_eq!(defaults.ek, EkChoice::Auto);
        assert_eq!(cfg.mode, Mode::Host);
        assert_eq!(cfg.server.unwrap().url, "https://127.0.0.1:8443");
        assert_eq!(cfg.max_attempts, Some(2));
        assert!(!cfg.dhcp);
        let err = HostArgs::try_parse_from(["warden-agent", "--ca", "sha256:12"]).unwrap_err();
        assert!(
            err.to_string().contains("--ca: expected sha256:<64 hex>"),
            "{err}"
        );
    }

    #[test]
    fn wipe_keys_parse_methods_and_verification() {
        let cfg = parse_cmdline("console=ttyS0").unwrap();
        assert_eq!(cfg.wipe, None);
        assert_eq!(
            cfg.wipe_verify,
            VerifyMode::Sampled {
                blocks_per_gib: crate::wipe::DEFAULT_BLOCKS_PER_GIB
            }
        );
        assert!(!cfg.include_loop);
        let cfg = parse_cmdline("warden.wipe=auto warden.wipe_verify=full").unwrap();
        assert_eq!(cfg.wipe, Some(Method::Auto));
        assert_eq!(cfg.wipe_verify, VerifyMode::Full);
        let cfg =
            parse_cmdline("warden.wipe=overwrite:2:random warden.wipe_verify=sampled:8").unwrap();
        assert_eq!(
            cfg.wipe,
            Some(Method::Overwrite {
                passes: 2,
                pattern: warden_protocol::wipe::Pattern::Random
            })
        );
        assert_eq!(cfg.wipe_verify, VerifyMode::Sampled { blocks_per_gib: 8 });
        for (value, method) in [
            ("zeroout", Method::Zeroout),
            ("nvme-format-user-data", Method::NvmeFormatUserData),
            ("metadata", Method::Metadata),
        ] {
            let cfg = parse_cmdline(&format!("warden.wipe={value}")).unwrap();
            assert_eq!(cfg.wipe, Some(method));
        }
        let cfg = parse_cmdline("warden.wipe=auto warden.wipe=none").unwrap();
        assert_eq!(cfg.wipe, None);
        assert!(cfg.unknown_keys.is_empty());

        let err = parse_cmdline("warden.wipe=shred").unwrap_err();
        assert_eq!(err.key, "warden.wipe");
        assert!(err.message.contains("expected none or a method"), "{err}");
        assert!(err.message.contains("shred"), "{err}");
        let err = parse_cmdline("warden.wipe").unwrap_err();
        assert_eq!(err.key, "warden.wipe");
        for bad_verify in ["sampled:0", "sampled:", "sampled:x", "metadata", "Full"] {
            let err = parse_cmdline(&format!("warden.wipe_verify={bad_verify}")).unwrap_err();
            assert_eq!(err.key, "warden.wipe_verify", "{bad_verify}");
            assert!(err.message.contains("sampled:N"), "{err}");
        }
    }

    #[test]
    fn wipe_flags_map_to_the_same_config() {
        let defaults = HostArgs::try_parse_from(["warden-agent"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(defaults.wipe, None);
        assert_eq!(defaults.wipe_verify, default_wipe_verify());
        assert!(!defaults.include_loop);
        let cfg = HostArgs::try_parse_from([
            "warden-agent",
            "--wipe",
            "zeroout",
            "--wipe-verify",
            "sampled:16",
            "--include-loop",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(cfg.wipe, Some(Method::Zeroout));
        assert_eq!(cfg.wipe_verify, VerifyMode::Sampled { blocks_per_gib: 16 });
        assert!(cfg.include_loop);
        let err = HostArgs::try_parse_from(["warden-agent", "--wipe", "fast"]).unwrap_err();
        assert!(err.to_string().contains("--wipe: expected none"), "{err}");
    }

    #[test]
    fn image_keys_need_a_url_and_its_checksum() {
        let sum = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(parse_cmdline("console=ttyS0").unwrap().image, None);
        let cfg = parse_cmdline(&format!(
            "warden.image=http://10.0.2.2:8080/img.raw.zst warden.image_checksum={sum}"
        ))
        .unwrap();
        let image = cfg.image.unwrap();
        assert_eq!(image.url, "http://10.0.2.2:8080/img.raw.zst");
        assert_eq!(image.checksum.to_string(), sum);
        assert_eq!(image.target, None);
        assert!(!image.verify_after_write);
        assert_eq!(image.https_trust, None);
        assert!(cfg.unknown_keys.is_empty());

        let sum512 = format!("sha512:{}", "CD".repeat(64));
        let cfg = parse_cmdline(&format!(
            "warden.image=https://img.example:8443/x.qcow2 warden.image_checksum={sum512} \
             warden.image_target=vdb warden.image_verify=1 warden.image_ca={PIN}"
        ))
        .unwrap();
        let image = cfg.image.unwrap();
        assert_eq!(image.checksum.to_string(), sum512.to_lowercase());
        assert_eq!(image.target.as_deref(), Some("vdb"));
        assert!(image.verify_after_write);
        assert_eq!(
            image.https_trust,
            Some(HttpsTrust::PinnedCa(
                "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into()
            ))
        );

        // No checksum: refused at config time, naming the key.
        let err = parse_cmdline("warden.image=http://h/x.raw").unwrap_err();
        assert_eq!(err.key, "warden.image_checksum");
        assert!(err.message.contains("warden.image is set"), "{err}");
        // The other keys without an image.
        for stray in [
            format!("warden.image_checksum={sum}"),
            "warden.image_target=vda".to_string(),
            "warden.image_verify=1".to_string(),
        ] {
            let err = parse_cmdline(&stray).unwrap_err();
            assert!(stray.starts_with(&err.key), "{stray}: {err}");
            assert!(err.message.contains("warden.image"), "{err}");
        }
        // A CA pin for plain HTTP makes no sense.
        let err = parse_cmdline(&format!(
            "warden.image=http://h/x warden.image_checksum={sum} warden.image_ca={PIN}"
        ))
        .unwrap_err();
        assert_eq!(err.key, "warden.image_ca");
        for (line, key) in [
            ("warden.image=ftp://h/x".to_string(), "warden.image"),
            ("warden.image=/x.raw".to_string(), "warden.image"),
            (
                "warden.image_checksum=md5:00".to_string(),
                "warden.image_checksum",
            ),
            (
                format!("warden.image_checksum=sha256:{}", "ab".repeat(31)),
                "warden.image_checksum",
            ),
            (
                "warden.image_target=/dev/sda".to_string(),
                "warden.image_target",
            ),
            ("warden.image_target=".to_string(), "warden.image_target"),
            (
                "warden.image_verify=maybe".to_string(),
                "warden.image_verify",
            ),
        ] {
            let err = parse_cmdline(&line).unwrap_err();
            assert_eq!(err.key, key, "{line}: {err}");
        }
    }

    #[test]
    fn image_flags_map_to_the_same_config() {
        let sum = format!("sha256:{}", "ab".repeat(32));
        let cfg = HostArgs::try_parse_from([
            "warden-agent",
            "--image",
            "http://127.0.0.1:8080/img.raw.zst",
            "--image-checksum",
            &sum,
            "--image-target",
            "loop3",
            "--image-verify",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let image = cfg.image.unwrap();
        assert_eq!(image.url, "http://127.0.0.1:8080/img.raw.zst");
        assert_eq!(image.target.as_deref(), Some("loop3"));
        assert!(image.verify_after_write);
        let err = HostArgs::try_parse_from(["warden-agent", "--image", "http://h/x"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert_eq!(err.key, "--image-checksum");
        let err =
            HostArgs::try_parse_from(["warden-agent", "--image-checksum", "sha1:00"]).unwrap_err();
        assert!(err.to_string().contains("--image-checksum"), "{err}");
    }

    #[test]
    fn handoff_and_lease_keys() {
        let sum = format!("sha256:{}", "ab".repeat(32));
        let img = format!("warden.image=http://h/x.raw.zst warden.image_checksum={sum}");
        let cfg = parse_cmdline(&format!(
            "{img} warden.handoff=kexec warden.lease=L-42.a:b_c"
        ))
        .unwrap();
        assert_eq!(cfg.handoff, Some(HandoffMode::Kexec));
        assert_eq!(cfg.lease.as_deref(), Some("L-42.a:b_c"));
        let cfg = parse_cmdline(&format!("{img} warden.handoff=reboot-to-disk")).unwrap();
        assert_eq!(
            cfg.handoff,
            Some(HandoffMode::Reboot(
                crate::handoff::RebootMode::RebootToDisk
            ))
        );
        // Plain reboot and poweroff need no image; kexec does.
        let cfg = parse_cmdline("warden.handoff=poweroff").unwrap();
        assert_eq!(cfg.handoff.map(HandoffMode::name), Some("poweroff"));
        assert_eq!(parse_cmdline("warden.handoff=none").unwrap().handoff, None);
        let err = parse_cmdline("warden.handoff=kexec").unwrap_err();
        assert_eq!(err.key, "warden.handoff");
        assert!(err.message.contains("warden.image"), "{err}");
        let err = parse_cmdline(&format!("{img} warden.handoff=pxe")).unwrap_err();
        assert!(err.message.contains("kexec"), "{err}");
        let err = parse_cmdline("warden.lease=abc").unwrap_err();
        assert_eq!(err.key, "warden.lease");
        for bad in ["", "a b", "x\nTENANT-BOOTED", &"z".repeat(129)] {
            assert!(parse_lease("warden.lease", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_stops_at_the_limit() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), None);
        let delays: Vec<u64> = (0..7).map(|_| b.failed().1.unwrap().as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), Some(2));
        assert_eq!(b.failed(), (1, Some(Duration::from_secs(1))));
        assert_eq!(b.failed(), (2, None));
    }
}
