//! A minimal `newc` cpio writer, only for the harness's own self-test: it
//! lets the harness boot a tiny busybox initramfs before the real ramdisk
//! builder exists. It is not the ramdisk builder and must never grow into
//! one (no modules, no reproducibility promises).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// One archive member.
#[derive(Clone, Debug)]
pub enum Entry {
    Dir {
        path: String,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
}

/// Writes `entries` as an uncompressed `newc` archive (the kernel accepts
/// uncompressed initramfs images).
pub fn write_newc(out: &Path, entries: &[Entry]) -> Result<()> {
    let mut buf = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match e {
            Entry::Dir { path } => header(&mut buf, ino, 0o040_755, path, &[]),
            Entry::File { path, mode, data } => header(&mut buf, ino, 0o100_000 | mode, path, data),
        }
    }
    header(&mut buf, 0, 0, "TRAILER!!!", &[]);
    std::fs::File::create(out)
        .and_then(|mut f| f.write_all(&buf))
        .with_context(|| format!("write {}", out.display()))
}

fn header(buf: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime: fixed
        u32::try_from(data.len()).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        u32::try_from(name_size).unwrap_or(u32::MAX),
        0, // check
    ];
    buf.extend_from_slice(b"070701");
    for f in fields {
        buf.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    pad4(buf);
    buf.extend_from_slice(data);
    pad4(buf);
}

fn pad4(buf: &mut Vec<u8>) {
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

/// A busybox initramfs whose `/init` is `script` (run by `busybox sh`), with
/// `/bin/busybox` from the host's busybox-static.
pub fn busybox_initramfs(out: &Path, script: &str) -> Result<()> {
    let busybox = crate::require_program("busybox")?;
    let data = std::fs::read(&busybox).with_context(|| format!("read {}", busybox.display()))?;
    let init = format!("#!/bin/busybox sh\n{script}\n");
    let mut entries = vec![];
    for d in ["bin", "dev", "proc", "sys"] {
        entries.push(Entry::Dir { path: d.into() });
    }
    entries.push(Entry::File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data,
    });
    entries.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: init.into_bytes(),
    });
    write_newc(out, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cpio_lists_what_we_wrote() {
        if crate::require_program("cpio").is_err() {
            eprintln!("SKIPPED: cpio not installed; cannot cross-check the writer");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.cpio");
        write_newc(
            &out,
            &[
                Entry::Dir { path: "bin".into() },
                Entry::File {
                    path: "bin/hello".into(),
                    mode: 0o644,
                    data: b"hi\n".to_vec(),
                },
            ],
        )
        .unwrap();
        let listed = std::process::Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(listed.status.success());
        assert_eq!(String::from_utf8_lossy(&listed.stdout), "bin\nbin/hello\n");
        let extracted = std::process::Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", "-F"])
            .arg(&out)
            .arg("bin/hello")
            .output()
            .unwrap();
        assert_eq!(extracted.stdout, b"hi\n");
    }
}
