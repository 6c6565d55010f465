//! The lease record on the tenant's disk: the one write the handoff makes.
//!
//! The tenant test images (docs/tenant-images.md) carry a 1 MiB raw GPT
//! partition named `warden-config`; the agent writes `lease=<id>\n` at its
//! start, padded with NULs to 4 KiB, so the tenant learns which lease it
//! runs under whether it starts by kexec or by a reboot. Nothing else on the
//! disk is touched, and a disk without the partition is left alone.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::gpt::{read_gpt, WARDEN_CONFIG_NAME};

/// Bytes of the record (the tenant reads this much).
pub const RECORD_BYTES: usize = 4096;

/// The record's bytes for `lease`.
pub fn record(lease: &str) -> Vec<u8> {
    let mut out = format!("lease={lease}\n").into_bytes();
    out.resize(RECORD_BYTES.max(out.len()), 0);
    out
}

/// Writes the lease record into `device`'s `warden-config` partition and
/// makes it durable. `Ok(None)`: the disk has no such partition (nothing
/// written); `Ok(Some(n))`: written into partition `n`.
pub fn write_lease(device: &Path, sector_size: u32, lease: &str) -> Result<Option<u32>, String> {
    let name = device.display();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| format!("lease: cannot open {name}: {e}"))?;
    let gpt =
        read_gpt(&mut f, &name.to_string(), sector_size).map_err(|e| format!("lease: {e}"))?;
    let Some(part) = gpt.named(WARDEN_CONFIG_NAME).next() else {
        return Ok(None);
    };
    let data = record(lease);
    if part.len < data.len() as u64 {
        return Err(format!(
            "lease: {name} partition {} ({WARDEN_CONFIG_NAME}) holds {} bytes, the record needs {}",
            part.number,
            part.len,
            data.len()
        ));
    }
    f.write_all_at(&data, part.offset)
        .and_then(|()| f.sync_data())
        .map_err(|e| {
            format!(
                "lease: writing {name} partition {} at offset {}: {e}",
                part.number, part.offset
            )
        })?;
    Ok(Some(part.number))
}
