//! The export as the snapshot and restore see it: connecting (with the
//! request's CA written to a private temporary file for the NBD client),
//! reconnecting with bounded backoff, the map of ranges known to read as
//! zero (BLOCK_STATUS `base:allocation`), and reading and writing the
//! manifest region and the locator. It must never write below the region
//! (that is the image, the pipelines' business) and never retry forever.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use warden_nbd::{Client, Options, Uri};
use warden_protocol::snapshot::{
    region_offset, Manifest, RegionHeader, RegionState, HEADER_BYTES, HEADER_LEN,
};

use super::{SnapshotError, Tuning};

/// The request's CA bundle as a file, removed on drop.
struct CaFile(PathBuf);

impl Drop for CaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_ca(pem: &str) -> std::io::Result<CaFile> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "warden-nbd-ca-{}-{}.pem",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let ca = CaFile(path);
    f.write_all(pem.as_bytes())?;
    Ok(ca)
}

/// How to reach the export.
pub(crate) struct Remote {
    uri: Uri,
    pub(crate) name: String,
    opts: Options,
    tuning: Tuning,
    _ca: Option<CaFile>,
}

impl Remote {
    pub(crate) fn new(
        uri: &str,
        ca_pem: Option<&str>,
        tuning: &Tuning,
    ) -> Result<Remote, SnapshotError> {
        let parsed = Uri::parse(uri).map_err(|source| SnapshotError::Connect {
            uri: uri.to_string(),
            source: Box::new(source),
        })?;
        let ca = match ca_pem {
            Some(pem) => Some(write_ca(pem).map_err(|e| {
                SnapshotError::Request(format!("writing the CA bundle for {uri}: {e}"))
            })?),
            None => None,
        };
        let opts = Options {
            ca_file: ca.as_ref().map(|c| c.0.clone()),
            timeout: tuning.timeout,
            structured_replies: true,
        };
        Ok(Remote {
            uri: parsed,
            name: uri.to_string(),
            opts,
            tuning: *tuning,
            _ca: ca,
        })
    }

    /// One connection attempt (several NBD connections if the server
    /// allows multi-conn).
    pub(crate) fn connect(&self) -> Result<Client, SnapshotError> {
        Client::connect_many(&self.uri, &self.opts, self.tuning.connections.max(1)).map_err(
            |source| SnapshotError::Connect {
                uri: self.name.clone(),
                source: Box::new(source),
            },
        )
    }

    /// After a lost connection: up to `reconnect_tries` attempts with
    /// doubling backoff; the export must still have `size` bytes.
    pub(crate) fn reconnect(
        &self,
        cause: &warden_nbd::Error,
        size: u64,
    ) -> Result<Client, SnapshotError> {
        let mut delay = self.tuning.reconnect_backoff;
        let mut last = None;
        for attempt in 1..=self.tuning.reconnect_tries {
            std::thread::sleep(delay);
            delay = (delay * 2).min(self.tuning.reconnect_backoff_max);
            match Client::connect_many(&self.uri, &self.opts, self.tuning.connections.max(1)) {
                Ok(client) if client.size() == size => {
                    tracing::info!(uri = %self.name, attempt, "NBD reconnected");
                    return Ok(client);
                }
                Ok(client) => {
                    let got = client.size();
                    client.close();
                    return Err(SnapshotError::Export {
                        uri: self.name.clone(),
                        reason: format!(
                            "after reconnecting the export is {got} bytes, it was {size}"
                        ),
                    });
                }
                Err(e) => {
                    tracing::warn!(uri = %self.name, attempt, error = %e, "NBD reconnect failed");
                    last = Some(e);
                }
            }
        }
        Err(SnapshotError::Reconnect {
            uri: self.name.clone(),
            cause: cause.to_string(),
            tries: self.tuning.reconnect_tries,
            source: last.map(Box::new),
        })
    }
}

/// Ranges of the export known to read as zero, sorted and disjoint.
#[derive(Debug, Default)]
pub(crate) struct ZeroMap(Vec<(u64, u64)>);

impl ZeroMap {
    /// BLOCK_STATUS over `[0, len)`; empty when the server has no
    /// `base:allocation` (then nothing is known to be zero).
    pub(crate) fn query(client: &Client, len: u64) -> Result<ZeroMap, warden_nbd::Error> {
        if !client.info().base_allocation || len == 0 {
            return Ok(ZeroMap::default());
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in client.block_status(0, len)? {
            if !e.is_zero() {
                continue;
            }
            let (start, end) = (e.offset, e.offset.saturating_add(e.length));
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => out.push((start, end)),
            }
        }
        Ok(ZeroMap(out))
    }

    /// `[offset, offset + len)` lies inside one zero range.
    pub(crate) fn covers(&self, offset: u64, len: u64) -> bool {
        let i = self.0.partition_point(|&(_, end)| end <= offset);
        self.0
            .get(i)
            .is_some_and(|&(start, end)| start <= offset && offset.saturating_add(len) <= end)
    }

    /// Bytes known to be zero.
    pub(crate) fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Offset of the locator (a copy of the region header in the export's last 4 KiB).
pub(crate) fn locator_offset(export_bytes: u64) -> u64 {
    export_bytes.saturating_sub(HEADER_BYTES)
}

/// Writes `header` at the region and as the locator.
pub(crate) fn write_header(
    client: &Client,
    header: &RegionHeader,
) -> Result<(), warden_nbd::Error> {
    let block = header.encode();
    client.write_at(region_offset(header.disk_bytes), &block, false)?;
    client.write_at(locator_offset(client.size()), &block, false)
}

/// The backup an export holds: its header (from the locator, checked
/// against the region's copy) and its manifest (digest checked against the
/// header, then decoded).
pub(crate) struct Stored {
    pub manifest: Manifest,
    pub digest: String,
}

/// Reads the locator and the region header. `Ok(None)`: the export holds
/// no Warden backup at all.
pub(crate) fn read_header(
    remote: &Remote,
    client: &Client,
) -> Result<Option<RegionHeader>, SnapshotError> {
    let size = client.size();
    if size < HEADER_BYTES {
        return Ok(None);
    }
    let nbd = |what: &str, source| SnapshotError::Remote {
        uri: remote.name.clone(),
        what: what.to_string(),
        source: Box::new(source),
    };
    let loc = client
        .read(locator_offset(size), HEADER_LEN)
        .map_err(|e| nbd("reading the locator", e))?;
    if !loc.starts_with(warden_protocol::snapshot::HEADER_MAGIC) {
        return Ok(None);
    }
    let manifest_err = |reason: String| SnapshotError::Manifest {
        uri: remote.name.clone(),
        reason,
    };
    let header = RegionHeader::decode(&loc).map_err(|e| manifest_err(format!("locator: {e}")))?;
    let region = region_offset(header.disk_bytes);
    if region
        .saturating_add(2 * HEADER_BYTES)
        .saturating_add(header.manifest_len)
        > size
    {
        return Err(manifest_err(format!(
            "the locator places a {}-byte manifest at {} past the export's {size} bytes",
            header.manifest_len, header.manifest_offset
        )));
    }
    let copy = client
        .read(region, HEADER_LEN)
        .map_err(|e| nbd("reading the region header", e))?;
    if copy != loc {
        return Err(manifest_err(format!(
            "the region header at offset {region} differs from the locator at offset {}",
            locator_offset(size)
        )));
    }
    Ok(Some(header))
}

/// Reads and checks the complete backup whose manifest digest must be `want`.
pub(crate) fn read_stored(
    remote: &Remote,
    client: &Client,
    want: &[u8; 32],
    incremental: bool,
) -> Result<Stored, SnapshotError> {
    let refuse = |reason: String| {
        if incremental {
            SnapshotError::NotIncremental {
                uri: remote.name.clone(),
                reason,
            }
        } else {
            SnapshotError::Manifest {
                uri: remote.name.clone(),
                reason,
            }
        }
    };
    let Some(header) = read_header(remote, client)? else {
        return Err(refuse("the export holds no Warden backup".into()));
    };
    if header.state != RegionState::Complete {
        return Err(refuse(
            "the last snapshot into this export did not finish (its region is marked in progress)"
                .into(),
        ));
    }
    if &header.manifest_sha256 != want {
        return Err(refuse(format!(
            "the export holds manifest sha256 {}, the request names {}",
            hex::encode(header.manifest_sha256),
            hex::encode(want)
        )));
    }
    let len = usize::try_from(header.manifest_len).unwrap_or(usize::MAX);
    let bytes =
        client
            .read(header.manifest_offset, len)
            .map_err(|source| SnapshotError::Remote {
                uri: remote.name.clone(),
                what: "reading the manifest".into(),
                source: Box::new(source),
            })?;
    let digest = warden_protocol::sha256_hex(&bytes);
    if digest != hex::encode(want) {
        return Err(SnapshotError::Manifest {
            uri: remote.name.clone(),
            reason: format!(
                "the manifest read from offset {} has sha256 {digest}, expected {}",
                header.manifest_offset,
                hex::encode(want)
            ),
        });
    }
    let manifest = Manifest::decode(&bytes).map_err(|e| SnapshotError::Manifest {
        uri: remote.name.clone(),
        reason: e.to_string(),
    })?;
    if manifest.disk_bytes != header.disk_bytes {
        return Err(SnapshotError::Manifest {
            uri: remote.name.clone(),
            reason: format!(
                "the manifest describes {} bytes, the header {}",
                manifest.disk_bytes, header.disk_bytes
            ),
        });
    }
    Ok(Stored { manifest, digest })
}

/// Sleeps before retry `attempt` (1-based) of a failed request.
pub(crate) fn retry_delay(tuning: &Tuning, attempt: u32) {
    let d = tuning
        .retry_backoff
        .saturating_mul(1u32 << attempt.min(6))
        .min(Duration::from_secs(5));
    std::thread::sleep(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_map_covers() {
        let m = ZeroMap(vec![(0, 10), (20, 40)]);
        assert!(m.covers(0, 10));
        assert!(m.covers(2, 3));
        assert!(!m.covers(5, 10));
        assert!(m.covers(20, 20));
        assert!(!m.covers(15, 2));
        assert!(!m.covers(39, 2));
        assert!(!m.covers(40, 1));
        assert_eq!(m.bytes(), 30);
        assert!(!ZeroMap::default().covers(0, 1));
    }

    #[test]
    fn ca_file_is_removed() {
        let ca = write_ca("-----BEGIN CERTIFICATE-----\n").unwrap();
        let p = ca.0.clone();
        assert!(p.exists());
        drop(ca);
        assert!(!p.exists());
    }
}
