//! The two kexec system calls — `kexec_file_load` of the tenant's kernel and
//! initrd from memfd files, and `reboot(LINUX_REBOOT_CMD_KEXEC)` — behind the
//! [`Kexec`] trait, so the order around them can be tested with a recorder.
//!
//! The `unsafe` of this module is the one `syscall` in [`LinuxKexec`]. It must
//! never exec an image that was not measured first: the caller
//! ([`super::kexec_handoff`]) loads, measures, syncs, and only then execs.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::HandoffError;

/// The privileged steps of a kexec handoff.
pub trait Kexec {
    /// Loads `kernel` (a bzImage), `initrd` (may be empty) and `cmdline` as
    /// the image the next [`Kexec::exec`] starts.
    fn load(&mut self, kernel: &[u8], initrd: &[u8], cmdline: &str) -> Result<(), HandoffError>;
    /// Drops a loaded image, so a failed handoff leaves nothing armed.
    fn unload(&mut self) -> Result<(), HandoffError>;
    /// Flushes filesystem buffers (the agent wrote nothing the tenant
    /// needs, but a kexec skips the kernel's own shutdown sync).
    fn sync(&mut self);
    /// Starts the loaded image. The real one does not return when it works.
    fn exec(&mut self) -> Result<(), HandoffError>;
}

/// The running Linux kernel.
#[derive(Debug, Default)]
pub struct LinuxKexec;

impl Kexec for LinuxKexec {
    fn load(&mut self, kernel: &[u8], initrd: &[u8], cmdline: &str) -> Result<(), HandoffError> {
        let step = "kexec_file_load";
        let cmdline = CString::new(cmdline).map_err(|_| HandoffError::Kexec {
            step,
            reason: "the command line contains a NUL byte".to_owned(),
        })?;
        let kernel_file = memfd(c"warden-kernel", kernel)?;
        let initrd_file = if initrd.is_empty() {
            None
        } else {
            Some(memfd(c"warden-initrd", initrd)?)
        };
        let initrd_fd = initrd_file.as_ref().map_or(-1, |f| f.as_raw_fd());
        let flags = if initrd_file.is_none() {
            libc::KEXEC_FILE_NO_INITRAMFS
        } else {
            0
        };
        let cmdline = cmdline.as_bytes_with_nul();
        let started = std::time::Instant::now();
        tracing::info!(
            kernel_bytes = kernel.len(),
            initrd_bytes = initrd.len(),
            cmdline_bytes = cmdline.len(),
            "kexec: loading the tenant kernel"
        );
        // SAFETY: kexec_file_load(kernel_fd, initrd_fd, cmdline_len,
        // cmdline, flags) reads the two files (both open until this call
        // returns, or -1 with KEXEC_FILE_NO_INITRAMFS) and `cmdline_len`
        // bytes from `cmdline`, a NUL-terminated buffer that outlives the
        // call and whose length including the NUL is what we pass; it
        // writes no memory of ours. Every argument is widened to c_long,
        // the width the variadic syscall(2) reads.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_kexec_file_load,
                libc::c_long::from(kernel_file.as_raw_fd()),
                libc::c_long::from(initrd_fd),
                cmdline.len() as libc::c_long,
                cmdline.as_ptr() as libc::c_long,
                libc::c_long::from(flags),
            )
        };
        if rc != 0 {
            return Err(HandoffError::Kexec {
                step,
                reason: meaning(Errno::last()),
            });
        }
        tracing::info!(
            ms = started.elapsed().as_millis(),
            "kexec: the tenant kernel is loaded"
        );
        Ok(())
    }

    fn unload(&mut self) -> Result<(), HandoffError> {
        // SAFETY: with KEXEC_FILE_UNLOAD the kernel reads no fd and no
        // buffer (length 0, null pointer); it only drops the loaded image.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_kexec_file_load,
                -1 as libc::c_long,
                -1 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                libc::c_long::from(libc::KEXEC_FILE_UNLOAD),
            )
        };
        if rc != 0 {
            return Err(HandoffError::Kexec {
                step: "kexec_file_load(KEXEC_FILE_UNLOAD)",
                reason: meaning(Errno::last()),
            });
        }
        Ok(())
    }

    fn sync(&mut self) {
        nix::unistd::sync();
    }

    fn exec(&mut self) -> Result<(), HandoffError> {
        tracing::info!("kexec: starting the tenant kernel");
        let err = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        Err(HandoffError::Kexec {
            step: "reboot(LINUX_REBOOT_CMD_KEXEC)",
            reason: meaning(err),
        })
    }
}

/// An anonymous in-memory file holding `bytes`: kexec_file_load wants file
/// descriptors, and the kernel and initrd exist only in our memory.
fn memfd(name: &CStr, bytes: &[u8]) -> Result<File, HandoffError> {
    let what = name.to_string_lossy();
    let fd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC).map_err(|e| HandoffError::Kexec {
        step: "memfd_create",
        reason: format!("{what}: {e}"),
    })?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(|e| HandoffError::Kexec {
        step: "memfd write",
        reason: format!("{what}: {e}"),
    })?;
    Ok(file)
}

/// What an errno from kexec means for a person at the console.
fn meaning(errno: Errno) -> String {
    let why = match errno {
        Errno::EPERM => "not permitted: needs CAP_SYS_BOOT, and kexec may be disabled (kernel.kexec_load_disabled) or locked down",
        Errno::ENOEXEC => "the kernel is not an image this kernel can kexec (a UKI or an unsupported format?)",
        Errno::EKEYREJECTED | Errno::EBADMSG | Errno::ENOKEY => {
            "the running kernel requires a signed kernel and this one's signature was rejected"
        }
        Errno::EBUSY => "another kexec image is being loaded",
        Errno::ENOSYS => "this kernel was built without kexec_file_load (CONFIG_KEXEC_FILE)",
        Errno::ENOMEM => "not enough memory to stage the kernel and initrd",
        Errno::EINVAL => "the kernel rejected the arguments (no image loaded, or a bad command line)",
        _ => "",
    };
    if why.is_empty() {
        errno.to_string()
    } else {
        format!("{why} ({errno})")
    }
}
