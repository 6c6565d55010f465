//! One attested handoff of the tenant test image (`scripts/build-images`)
//! on a network-booted QEMU node, for the handoff QEMU tests and
//! `bench-handoff`: the node's first boot is refused and the policy is
//! learned from it (same kernel command line, so PCR 9 matches), the second
//! boot streams the image to the NVMe disk, writes the lease and hands off
//! (kexec or reboot-to-disk); the harness notes when it saw the agent's
//! `handoff` event and the tenant's `TENANT-BOOTED` line. Also a reader of
//! OVMF's variable store file, so a test can see the `BootOrder`,
//! `Boot####` and `BootNext` the firmware kept after the run.
//!
//! It boots and reads; it never judges a result (the tests and the bench
//! do), and it never changes a variable store.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use warden_protocol::efi::{Guid, EFI_GLOBAL_VARIABLE};

use crate::console::events_named;
use crate::node::BOOT_TIMEOUT;
use crate::{DiskBus, Node, NodeBuilder, Ramdisk, Server};

/// `build/images/` with its manifest and the compressed qcow2 the agent streams.
#[derive(Clone, Debug)]
pub struct TenantImages {
    pub dir: PathBuf,
    pub manifest: Value,
    /// `tenant-compressed.qcow2`.
    pub image: PathBuf,
    /// Its SHA-256 (hex), from the manifest.
    pub image_sha256: String,
}

impl TenantImages {
    /// Reads `build/images/manifest.json`; the error says to run
    /// `scripts/build-images` when the images are missing.
    pub fn find() -> Result<TenantImages> {
        let dir = crate::workspace_root().join("build/images");
        let manifest_path = dir.join("manifest.json");
        let image = dir.join("tenant-compressed.qcow2");
        if !manifest_path.is_file() || !image.is_file() {
            bail!(
                "{} has no tenant images (run scripts/build-images)",
                dir.display()
            );
        }
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(&manifest_path)
                .with_context(|| format!("read {}", manifest_path.display()))?,
        )
        .with_context(|| format!("parse {}", manifest_path.display()))?;
        let image_sha256 = manifest["files"]["tenant-compressed.qcow2"]["sha256"]
            .as_str()
            .context("manifest.json names no sha256 for tenant-compressed.qcow2")?
            .to_owned();
        Ok(TenantImages {
            dir,
            manifest,
            image,
            image_sha256,
        })
    }
}

/// The two handoff paths that start the tenant from the imaged disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffKind {
    Kexec,
    RebootToDisk,
}

impl HandoffKind {
    /// The `warden.handoff=` value (and the `handoff` event's `mode`).
    pub fn mode(self) -> &'static str {
        match self {
            HandoffKind::Kexec => "kexec",
            HandoffKind::RebootToDisk => "reboot-to-disk",
        }
    }
}

/// The extra kernel arguments (`?extra=` of the boot script) of a node that
/// images its disk from `image_url` and hands off with `kind`.
pub fn handoff_extra_args(
    kind: HandoffKind,
    image_url: &str,
    image_sha256: &str,
    lease: &str,
) -> String {
    format!(
        "warden.on_error=poweroff warden.done=poweroff warden.image={image_url} \
         warden.image_checksum=sha256:{image_sha256} warden.handoff={} warden.lease={lease}",
        kind.mode()
    )
}

/// A network-boot server whose boot script carries `extra` on the kernel
/// command line (`--boot-cmdline`, as a site configures it), and the short
/// script URL a node boots: QEMU's DHCP boot-file field holds only 127
/// bytes, too few for a `?extra=` with an image URL and a checksum.
pub fn netboot_server_with(extra: &str) -> Result<(Server, String)> {
    let server = Server::start_netboot(&[
        "--boot-cmdline".into(),
        format!("console=ttyS0 {extra}").into(),
    ])?;
    let url = server.guest_boot_url("warden.ipxe", "")?;
    Ok((server, url))
}

/// The node every handoff run uses: network boot of `boot_url` (NIC
/// `bootindex=1`), guest reboots restart the machine, one NVMe disk.
pub fn handoff_node(name: &str, boot_url: &str, disk: &Path) -> NodeBuilder {
    NodeBuilder::new(name)
        .netboot(boot_url)
        .allow_reboot()
        .disk_file(DiskBus::Nvme, disk, true)
}

/// Boots a new node (fresh TPM) from `boot_url` with no policy: the server
/// refuses it. Then learns a policy from that boot (pinned to the ramdisk's
/// reference values), names it `policy`, assigns it to the node, and
/// returns the exited node: keep it alive while its
/// [`Node::swtpm_state_dir`] boots the same TPM again (the state goes with it).
pub fn refused_boot_then_learn(
    server: &Server,
    ramdisk: &Ramdisk,
    name: &str,
    boot_url: &str,
    disk: &Path,
    policy: &str,
) -> Result<Node> {
    let before = server.nodes_json()?.nodes.len();
    let mut node = handoff_node(name, boot_url, disk).start()?;
    let status = node.wait_power_off(BOOT_TIMEOUT)?;
    let events = node.events();
    let refused = events_named(&events, "verdict")
        .first()
        .is_some_and(|v| v["status"] == "failed");
    if !status.success() || !refused || !events_named(&events, "handoff").is_empty() {
        let logs = node.keep_logs()?;
        bail!(
            "{name}: expected a refused boot without handoff (QEMU {status}); logs in {}",
            logs.display()
        );
    }
    let nodes = server.nodes_json()?.nodes;
    if nodes.len() != before + 1 {
        bail!(
            "{name}: the server knows {} nodes after the boot, expected {}",
            nodes.len(),
            before + 1
        );
    }
    let node_id = nodes
        .last()
        .context("the server lists no node")?
        .node_id
        .clone();
    let reference = ramdisk.dir.join("reference-values.json");
    let reference = reference
        .to_str()
        .context("reference-values.json path is not UTF-8")?;
    server.wardenctl_ok(&[
        "policy",
        "learn",
        &node_id,
        "--name",
        policy,
        "--ramdisk",
        reference,
        "--store",
    ])?;
    server.wardenctl_ok(&["policy", "assign", policy, "--node", &node_id])?;
    Ok(node)
}

/// What one handoff boot did.
#[derive(Debug)]
pub struct HandoffRun {
    /// The node, QEMU exited (its dir still holds `OVMF_VARS.fd`).
    pub node: Node,
    pub status: ExitStatus,
    /// The agent's `handoff` event.
    pub handoff: Value,
    /// QEMU start → the harness saw the `handoff` event.
    pub start_to_handoff: Duration,
    /// The `handoff` event → the harness saw `TENANT-BOOTED`.
    pub handoff_to_booted: Duration,
}

impl HandoffRun {
    /// The node's OVMF variable store file (final once QEMU exited).
    pub fn vars_path(&self) -> PathBuf {
        self.node.dir().join("OVMF_VARS.fd")
    }
}

/// Boots the (now policy-bound) node again with `tpm_state` and waits for
/// the `handoff` event, the tenant's `TENANT-BOOTED` and QEMU's exit (the
/// tenant powers off). A second `agent_start` (the ramdisk booted again
/// instead of the tenant) ends the wait with an error. On an error the
/// node's logs are kept.
pub fn handoff_boot(
    name: &str,
    boot_url: &str,
    disk: &Path,
    tpm_state: &Path,
) -> Result<HandoffRun> {
    let mut node = handoff_node(name, boot_url, disk)
        .tpm_state(tpm_state)
        .start()?;
    let result: Result<_> = (|| {
        let handoff = node.wait_for_event("handoff", BOOT_TIMEOUT)?;
        let handoff_at = Instant::now();
        let start_to_handoff = handoff_at - node.started_at();
        node.wait_for_line("TENANT-BOOTED", BOOT_TIMEOUT, |events| {
            (events_named(events, "agent_start").len() > 1)
                .then(|| "the Warden ramdisk started again after the handoff".to_owned())
        })?;
        let handoff_to_booted = handoff_at.elapsed();
        let status = node.wait_power_off(BOOT_TIMEOUT)?;
        Ok((handoff, start_to_handoff, handoff_to_booted, status))
    })();
    match result {
        Ok((handoff, start_to_handoff, handoff_to_booted, status)) => Ok(HandoffRun {
            node,
            status,
            handoff,
            start_to_handoff,
            handoff_to_booted,
        }),
        Err(e) => {
            node.kill();
            let logs = node.keep_logs()?;
            Err(e.context(format!("{name}: logs in {}", logs.display())))
        }
    }
}

/// One variable of a firmware variable store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVariable {
    pub guid: Guid,
    pub name: String,
    pub attributes: u32,
    pub data: Vec<u8>,
}

/// `gEfiAuthenticatedVariableGuid`: the store format of OVMF's `_4M` builds.
const AUTH_VARIABLE_STORE: [u8; 16] = [
    0x78, 0x2c, 0xf3, 0xaa, 0x7b, 0x94, 0x9a, 0x43, 0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92,
];
/// `VARIABLE_DATA`: a variable header's `StartId`.
const START_ID: u16 = 0x55aa;
/// `VAR_ADDED`: the state of a live variable.
const VAR_ADDED: u8 = 0x3f;
/// `VAR_ADDED & VAR_IN_DELETED_TRANSITION`: live until its replacement is
/// complete (edk2 takes it when no `VAR_ADDED` copy exists).
const VAR_ADDED_IN_TRANSITION: u8 = 0x3e;
/// `AUTHENTICATED_VARIABLE_HEADER`: StartId, State, Reserved, Attributes,
/// MonotonicCount, TimeStamp, PubKeyIndex, NameSize, DataSize, VendorGuid.
const AUTH_HEADER_LEN: usize = 2 + 1 + 1 + 4 + 8 + 16 + 4 + 4 + 4 + 16;

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The live variables of an OVMF variable store file (`OVMF_VARS_4M.fd`
/// format: a firmware volume whose data is an authenticated variable
/// store). edk2 appends a new copy on every change and marks the old one;
/// only live copies are returned, the newest last.
pub fn read_ovmf_vars(path: &Path) -> Result<Vec<StoredVariable>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    parse_ovmf_vars(&bytes)
        .with_context(|| format!("{} is not an OVMF variable store", path.display()))
}

/// [`read_ovmf_vars`] on bytes.
pub fn parse_ovmf_vars(bytes: &[u8]) -> Result<Vec<StoredVariable>> {
    if bytes.get(40..44) != Some(b"_FVH") {
        bail!("no firmware volume signature _FVH at offset 40");
    }
    let fv_header = usize::from(le_u16(bytes, 48).context("short FV header")?);
    let store = bytes
        .get(fv_header..)
        .context("FV header length beyond the file")?;
    if store.get(..16) != Some(&AUTH_VARIABLE_STORE[..]) {
        bail!("the variable store at offset {fv_header} is not an authenticated variable store");
    }
    let store_size = usize::try_from(le_u32(store, 16).context("short store header")?)?;
    let store = store.get(..store_size).unwrap_or(store);
    // VARIABLE_STORE_HEADER: Signature, Size, Format, State, 2 + 4 reserved.
    let mut at = 16 + 4 + 1 + 1 + 2 + 4;
    let mut live = Vec::new();
    while le_u16(store, at) == Some(START_ID) {
        let header = store
            .get(at..at + AUTH_HEADER_LEN)
            .with_context(|| format!("variable header at {at} runs past the store"))?;
        let state = header[2];
        let attributes = le_u32(header, 4).context("attributes")?;
        let name_size = usize::try_from(le_u32(header, 36).context("NameSize")?)?;
        let data_size = usize::try_from(le_u32(header, 40).context("DataSize")?)?;
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&header[44..60]);
        let name_at = at + AUTH_HEADER_LEN;
        let data_at = name_at + name_size;
        let end = data_at + data_size;
        let name = store
            .get(name_at..data_at)
            .with_context(|| format!("variable name at {name_at} runs past the store"))?;
        let data = store
            .get(data_at..end)
            .with_context(|| format!("variable data at {data_at} runs past the store"))?;
        if state == VAR_ADDED || state == VAR_ADDED_IN_TRANSITION {
            let name = warden_protocol::efi::utf16_lossy(name)
                .trim_end_matches('\0')
                .to_owned();
            live.push((
                state,
                StoredVariable {
                    guid: Guid::from_bytes(guid),
                    name,
                    attributes,
                    data: data.to_vec(),
                },
            ));
        }
        // Headers are 4-byte aligned (HEADER_ALIGNMENT).
        at = (end + 3) & !3;
    }
    // A copy in transition counts only if no completed copy exists.
    let mut out: Vec<StoredVariable> = Vec::new();
    for (state, var) in &live {
        let completed_exists = live
            .iter()
            .any(|(s, v)| *s == VAR_ADDED && v.guid == var.guid && v.name == var.name);
        if *state == VAR_ADDED || !completed_exists {
            out.retain(|v| !(v.guid == var.guid && v.name == var.name));
            out.push(var.clone());
        }
    }
    Ok(out)
}

/// The value of the `EFI_GLOBAL_VARIABLE` variable `name` in `vars`.
pub fn global_var<'a>(vars: &'a [StoredVariable], name: &str) -> Option<&'a [u8]> {
    vars.iter()
        .find(|v| v.guid == EFI_GLOBAL_VARIABLE && v.name == name)
        .map(|v| v.data.as_slice())
}

/// `BootOrder` as option numbers.
pub fn boot_order(vars: &[StoredVariable]) -> Vec<u16> {
    global_var(vars, "BootOrder")
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// A `Boot####` option's description and device path as text.
pub fn boot_option_text(vars: &[StoredVariable], number: u16) -> Option<(String, String)> {
    let data = global_var(vars, &format!("Boot{number:04X}"))?;
    let option = warden_protocol::efi::parse_load_option(data).ok()?;
    let path = warden_protocol::efi::device_path_to_text(&option.file_path_list).ok()?;
    Some((option.description, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OVMF's own template: a real store, read as the firmware wrote it.
    #[test]
    fn the_ovmf_template_has_a_readable_store() {
        let path = Path::new(crate::node::OVMF_VARS);
        if !path.is_file() {
            crate::skip_or_fail("handoff::tests", "OVMF is not installed (scripts/setup)");
            return;
        }
        let vars = read_ovmf_vars(path).unwrap();
        // The shipped template is empty or nearly so; it must parse, and
        // every name must be printable.
        for v in &vars {
            assert!(
                !v.name.is_empty() && v.name.chars().all(|c| !c.is_control()),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_store_built_by_hand_keeps_the_newest_live_copy() {
        fn var(state: u8, name: &str, data: &[u8]) -> Vec<u8> {
            let name: Vec<u8> = name
                .encode_utf16()
                .chain([0])
                .flat_map(u16::to_le_bytes)
                .collect();
            let mut h = Vec::new();
            h.extend(START_ID.to_le_bytes());
            h.extend([state, 0]);
            h.extend(7u32.to_le_bytes());
            h.extend([0u8; 8 + 16 + 4]);
            h.extend(u32::try_from(name.len()).unwrap().to_le_bytes());
            h.extend(u32::try_from(data.len()).unwrap().to_le_bytes());
            h.extend(EFI_GLOBAL_VARIABLE.to_bytes());
            h.extend(name);
            h.extend(data);
            while h.len() % 4 != 0 {
                h.push(0xff);
            }
            h
        }
        let mut file = vec![0u8; 72];
        file[40..44].copy_from_slice(b"_FVH");
        file[48..50].copy_from_slice(&72u16.to_le_bytes());
        let mut store = AUTH_VARIABLE_STORE.to_vec();
        store.extend(4096u32.to_le_bytes());
        store.extend([0x5a, 0xfe, 0, 0, 0, 0, 0, 0]);
        store.extend(var(0x3c, "BootOrder", &[1, 0])); // deleted
        store.extend(var(VAR_ADDED, "BootOrder", &[2, 0, 1, 0]));
        store.extend(var(VAR_ADDED_IN_TRANSITION, "BootNext", &[5, 0]));
        store.resize(4096, 0xff);
        file.extend(store);
        let vars = parse_ovmf_vars(&file).unwrap();
        assert_eq!(boot_order(&vars), vec![2, 1]);
        assert_eq!(global_var(&vars, "BootNext"), Some(&[5u8, 0][..]));
        assert_eq!(vars.len(), 2);
    }
}
