//! NIC inventory from sysfs (`/sys/class/net/NAME/...`), for the hello report.
//!
//! Owns reading, never writing: it must not change a link's state, and a
//! file it cannot read becomes "unknown" (`None`/`false`), never an error —
//! an inventory with a gap is better than no inventory.
//!
//! Which entries count: loopback is always left out; entries without a
//! `device` link (virtual: bridges, veth, tun, bonds…) are left out too,
//! because the report is about the machine's hardware — unless there are no
//! physical NICs at all, in which case the virtual ones are listed rather
//! than nothing (a container or a test namespace still says what it has).

use std::fs;
use std::path::Path;

use warden_protocol::hello::Nic;

/// Lists network interfaces under `sys_class_net` (normally `/sys/class/net`),
/// sorted by name.
pub fn list_nics(sys_class_net: &Path) -> Vec<Nic> {
    let Ok(entries) = fs::read_dir(sys_class_net) else {
        tracing::warn!(dir = %sys_class_net.display(), "cannot list network interfaces");
        return Vec::new();
    };
    let mut physical = Vec::new();
    let mut virtual_ = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = sys_class_net.join(&name);
        if name == "lo" || is_loopback(&dir) {
            continue;
        }
        let nic = read_nic(&dir, name);
        // `device` is the link to the bus device; virtual interfaces have none.
        if dir.join("device").exists() {
            physical.push(nic);
        } else {
            virtual_.push(nic);
        }
    }
    let mut nics = if physical.is_empty() {
        virtual_
    } else {
        physical
    };
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// ARPHRD_LOOPBACK is 772 (`type`), for a loopback not named `lo`.
fn is_loopback(dir: &Path) -> bool {
    read_trimmed(&dir.join("type")).as_deref() == Some("772")
}

fn read_nic(dir: &Path, name: String) -> Nic {
    let mac = read_trimmed(&dir.join("address")).unwrap_or_default();
    let driver = fs::read_link(dir.join("device/driver"))
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()));
    // Reading `carrier` on a link that is down fails with EINVAL: no carrier.
    let link = read_trimmed(&dir.join("carrier")).as_deref() == Some("1");
    // `speed` is -1 (or unreadable) when unknown or down.
    let speed_mbps = read_trimmed(&dir.join("speed"))
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(|s| u32::try_from(s).ok())
        .filter(|s| *s > 0);
    Nic {
        name,
        mac,
        driver,
        link,
        speed_mbps,
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}
