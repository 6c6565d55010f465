//! ATA firmware erase through SCSI/ATA Translation: IDENTIFY DEVICE and the
//! Security feature set (SET PASSWORD, ERASE PREPARE, ERASE UNIT, DISABLE
//! PASSWORD) sent as ATA PASS-THROUGH(16) CDBs over SG_IO.
//!
//! CDBs and the 512-byte data blocks are built by pure functions, tested
//! byte for byte against SAT-3 (T10/BSR INCITS 517, §12.2.2 "ATA
//! PASS-THROUGH (16) command") and ACS-3 (T13/2161-D, §7.45 "Security
//! feature set" commands and §7.12.7 "IDENTIFY DEVICE data").
//!
//! What this module must never do: send an erase command to a drive whose
//! pass-through has not just been proven (an ATA status returned for an
//! IDENTIFY whose data passes the word-255 integrity check), or return from
//! a failed erase with the user password still set without saying so.

use super::hw::{HwCaps, HwError, HwMethod, SecureErase};
use super::ioctl::{AdminIo, Dir, SgStatus, SCSI_CHECK_CONDITION};

/// The user password Warden sets for the duration of an erase. It is not a
/// secret: it protects nothing, and a person who finds a drive left locked
/// (the error says so) needs it to unlock the drive.
pub const ATA_PASSWORD: &str = "warden";

/// ATA command codes (ACS-3, Table 206 "Command codes").
pub const ATA_IDENTIFY_DEVICE: u8 = 0xec;
pub const ATA_SECURITY_SET_PASSWORD: u8 = 0xf1;
pub const ATA_SECURITY_ERASE_PREPARE: u8 = 0xf3;
pub const ATA_SECURITY_ERASE_UNIT: u8 = 0xf4;
pub const ATA_SECURITY_DISABLE_PASSWORD: u8 = 0xf6;

/// ATA PASS-THROUGH(16) operation code (SAT-3 §12.2.2.1).
pub const ATA_PASS_THROUGH_16: u8 = 0x85;

/// SAT-3 PROTOCOL field values (Table 137).
const PROTO_NON_DATA: u8 = 3;
const PROTO_PIO_DATA_IN: u8 = 4;
const PROTO_PIO_DATA_OUT: u8 = 5;

/// Byte 2 flags (SAT-3 §12.2.2.1): CK_COND asks the SATL to return the ATA
/// registers in sense data even on success — that returned status is our
/// proof that the drive itself answered. T_DIR 1 = from device.
/// BYTE_BLOCK 1 with T_LENGTH 10b = transfer length in the COUNT field,
/// in 512-byte blocks.
const CK_COND: u8 = 0x20;
const T_DIR_IN: u8 = 0x08;
const BYTE_BLOCK: u8 = 0x04;
const T_LENGTH_COUNT: u8 = 0x02;

/// ATA status register bits (ACS-3 §6.2).
const ST_ERR: u8 = 0x01;
const ST_DF: u8 = 0x20;
const ST_BSY: u8 = 0x80;
/// Error register ABRT.
const ERR_ABRT: u8 = 0x04;

/// An ATA PASS-THROUGH(16) CDB (SAT-3 Table 135), 28-bit command (EXTEND 0):
/// byte 1 PROTOCOL in bits 4:1; byte 2 flags; bytes 3/4 FEATURES 15:8/7:0;
/// bytes 5/6 COUNT 15:8/7:0; bytes 8,10,12 LBA 7:0, 15:8, 23:16; byte 13
/// DEVICE; byte 14 COMMAND; byte 15 CONTROL.
pub fn ata_pt16(protocol: u8, flags: u8, count: u8, command: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = ATA_PASS_THROUGH_16;
    c[1] = (protocol & 0xf) << 1;
    c[2] = flags;
    c[6] = count;
    c[14] = command;
    c
}

/// IDENTIFY DEVICE: PIO data-in, one 512-byte block.
pub fn identify_cdb() -> [u8; 16] {
    ata_pt16(
        PROTO_PIO_DATA_IN,
        CK_COND | T_DIR_IN | BYTE_BLOCK | T_LENGTH_COUNT,
        1,
        ATA_IDENTIFY_DEVICE,
    )
}

/// A Security command with one 512-byte block of data out
/// (SET PASSWORD, ERASE UNIT, DISABLE PASSWORD).
pub fn pio_out_cdb(command: u8) -> [u8; 16] {
    ata_pt16(
        PROTO_PIO_DATA_OUT,
        CK_COND | BYTE_BLOCK | T_LENGTH_COUNT,
        1,
        command,
    )
}

/// A non-data command (SECURITY ERASE PREPARE).
pub fn non_data_cdb(command: u8) -> [u8; 16] {
    ata_pt16(PROTO_NON_DATA, CK_COND, 0, command)
}

/// Puts `password` into words 1–16 (bytes 2..34) of a Security data block,
/// zero-padded, in the byte order hdparm uses, so a drive left locked can
/// be unlocked with `hdparm --security-unlock warden`.
fn put_password(block: &mut [u8; 512], password: &[u8]) {
    let n = password.len().min(32);
    block[2..2 + n].copy_from_slice(&password[..n]);
}

/// SECURITY SET PASSWORD data (ACS-3 §7.45.2, Table 165): word 0 bit 0
/// Identifier (0 = user password), bit 8 Master Password Capability
/// (0 = High; ignored for a user password); words 1–16 password.
pub fn set_password_block(password: &[u8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    put_password(&mut b, password);
    b
}

/// SECURITY ERASE UNIT data (ACS-3 §7.45.4, Table 167): word 0 bit 0
/// Identifier (0 = compare the user password), bit 1 Enhanced erase;
/// words 1–16 password.
pub fn erase_unit_block(enhanced: bool, password: &[u8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    if enhanced {
        b[0] = 0x02;
    }
    put_password(&mut b, password);
    b
}

/// SECURITY DISABLE PASSWORD data (ACS-3 §7.45.3): word 0 bit 0 Identifier
/// (0 = user password); words 1–16 password.
pub fn disable_password_block(password: &[u8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    put_password(&mut b, password);
    b
}

/// ATA registers returned by the SATL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtaReturn {
    pub error: u8,
    pub status: u8,
    pub device: u8,
    pub count: u8,
}

/// Finds the ATA registers in sense data: the ATA Status Return descriptor
/// (code 09h, SAT-3 §12.2.2.7) in descriptor-format sense (response code
/// 72h/73h), or the fixed-format variant (70h/71h with ASC/ASCQ 00h/1Dh
/// "ATA pass through information available", SAT-3 §12.2.2.6) where
/// INFORMATION bytes 3–6 carry ERROR, STATUS, DEVICE and COUNT.
pub fn parse_ata_return(sense: &[u8]) -> Option<AtaReturn> {
    let code = sense.first()? & 0x7f;
    match code {
        0x72 | 0x73 => {
            let add_len = usize::from(*sense.get(7)?);
            let end = (8 + add_len).min(sense.len());
            let mut at = 8;
            while at + 2 <= end {
                let d_code = sense[at];
                let d_len = usize::from(sense[at + 1]);
                if d_code == 0x09 && at + 14 <= sense.len() && d_len >= 0x0c {
                    let d = &sense[at..at + 14];
                    return Some(AtaReturn {
                        error: d[3],
                        count: d[5],
                        device: d[12],
                        status: d[13],
                    });
                }
                at += 2 + d_len;
            }
            None
        }
        0x70 | 0x71 => {
            if sense.len() >= 14 && sense[12] == 0x00 && sense[13] == 0x1d {
                Some(AtaReturn {
                    error: sense[3],
                    status: sense[4],
                    device: sense[5],
                    count: sense[6],
                })
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Sense key, ASC, ASCQ of descriptor or fixed sense data, for messages.
pub fn sense_key(sense: &[u8]) -> Option<(u8, u8, u8)> {
    match sense.first()? & 0x7f {
        0x72 | 0x73 => Some((sense.get(1)? & 0xf, *sense.get(2)?, *sense.get(3)?)),
        0x70 | 0x71 => Some((sense.get(2)? & 0xf, *sense.get(12)?, *sense.get(13)?)),
        _ => None,
    }
}

/// Why a pass-through command did not reach the drive, or how the drive
/// answered it.
#[derive(Debug, PartialEq, Eq)]
pub enum PtOutcome {
    Ok(AtaReturn),
    /// No ATA registers came back: whatever answered was not the drive.
    NotPassedThrough(String),
    /// The drive answered with ERR or DF set.
    Failed(AtaReturn),
    /// The host adapter or driver reported an error (timeout, reset).
    Transport(String),
}

/// Classifies one SG_IO answer to an ATA PASS-THROUGH command sent with
/// CK_COND set.
pub fn classify(sg: &SgStatus, sense: &[u8]) -> PtOutcome {
    let sense = &sense[..usize::from(sg.sense_len).min(sense.len())];
    if sg.host_status != 0 || sg.driver_status & !0x08 != 0 {
        // DRIVER_SENSE (08h) only says sense data is present. Anything
        // else is the transport failing (timeout, reset, device gone): the
        // command's fate on the drive is unknown, which is not the same as
        // a controller that never passes commands through.
        return PtOutcome::Transport(format!(
            "SG_IO host status {:#x}, driver status {:#x}",
            sg.host_status, sg.driver_status
        ));
    }
    match parse_ata_return(sense) {
        Some(r) if r.status & (ST_ERR | ST_DF) != 0 => PtOutcome::Failed(r),
        Some(r) if r.status & ST_BSY != 0 => PtOutcome::NotPassedThrough(format!(
            "ATA status {:#04x} has BSY set: the registers are not the drive's",
            r.status
        )),
        Some(r) => PtOutcome::Ok(r),
        None => {
            let what = match sense_key(sense) {
                Some((k, asc, ascq)) => format!(
                    "sense key {k:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x}{}",
                    if k == 0x5 && asc == 0x20 {
                        " (invalid command operation code: ATA PASS-THROUGH not supported)"
                    } else if k == 0x5 && asc == 0x24 {
                        " (invalid field in CDB)"
                    } else {
                        ""
                    }
                ),
                None => "no sense data".to_string(),
            };
            if sg.scsi_status == SCSI_CHECK_CONDITION {
                PtOutcome::NotPassedThrough(format!(
                    "CHECK CONDITION without an ATA status return: {what}"
                ))
            } else {
                PtOutcome::NotPassedThrough(format!(
                    "SCSI status {:#04x} but no ATA registers returned although CK_COND was set ({what})",
                    sg.scsi_status
                ))
            }
        }
    }
}

fn describe_ata(r: &AtaReturn) -> String {
    let abrt = if r.error & ERR_ABRT != 0 {
        " (ABRT: command aborted)"
    } else {
        ""
    };
    format!("ATA status {:#04x}, error {:#04x}{abrt}", r.status, r.error)
}

/// IDENTIFY DEVICE word 128, the security status (ACS-3 §7.12.7.60).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Security {
    pub supported: bool,
    pub enabled: bool,
    pub locked: bool,
    pub frozen: bool,
    pub count_expired: bool,
    pub enhanced_erase_supported: bool,
    /// Bit 8: master password capability is Maximum.
    pub master_maximum: bool,
}

/// Security erase time estimate (words 89 and 90, ACS-3 §7.12.7.35/36).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EraseTime {
    NotReported,
    /// About this many minutes.
    Minutes(u32),
    /// More than this many minutes (the field's maximum).
    MoreThan(u32),
}

impl EraseTime {
    /// Bit 15 set: bits 14:0 give the time in 2-minute units (7FFFh: more
    /// than 65532 min); clear: bits 7:0 do (FFh: more than 508 min).
    pub fn from_word(w: u16) -> EraseTime {
        let (v, max) = if w & 0x8000 != 0 {
            (u32::from(w & 0x7fff), 0x7fff)
        } else {
            (u32::from(w & 0xff), 0xff)
        };
        match v {
            0 => EraseTime::NotReported,
            v if v == max => EraseTime::MoreThan((v - 1) * 2),
            v => EraseTime::Minutes(v * 2),
        }
    }

    /// An SG_IO timeout for the erase: twice the estimate plus ten
    /// minutes; a day when the drive gives no usable estimate.
    pub fn timeout_ms(self) -> u32 {
        let day = 24 * 60 * 60 * 1000u32;
        match self {
            EraseTime::Minutes(m) => m
                .saturating_mul(2)
                .saturating_add(10)
                .saturating_mul(60_000)
                .max(10 * 60_000),
            EraseTime::NotReported | EraseTime::MoreThan(_) => day,
        }
    }
}

/// The IDENTIFY DEVICE fields this module uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtaIdentify {
    pub serial: String,
    pub firmware: String,
    pub model: String,
    pub security: Security,
    pub erase_time: EraseTime,
    pub enhanced_erase_time: EraseTime,
}

fn word(b: &[u8], n: usize) -> u16 {
    u16::from_le_bytes([b[2 * n], b[2 * n + 1]])
}

/// ATA strings store two characters per word, first character in the high
/// byte (ACS-3 §3.4.9).
fn ata_string(b: &[u8], first_word: usize, words: usize) -> String {
    let mut s = Vec::with_capacity(words * 2);
    for n in first_word..first_word + words {
        let w = word(b, n);
        s.push((w >> 8) as u8);
        s.push((w & 0xff) as u8);
    }
    String::from_utf8_lossy(&s).trim().to_string()
}

/// Checks IDENTIFY DEVICE data the way a controller that only pretends to
/// pass commands through gives itself away: word 255 must carry the
/// integrity signature A5h in bits 7:0 and a checksum in bits 15:8 that
/// makes all 512 bytes sum to zero (ACS-3 §7.12.7.91), and word 0 bit 15
/// must be 0 (an ATA device).
pub fn parse_identify(b: &[u8]) -> Result<AtaIdentify, String> {
    if b.len() < 512 {
        return Err(format!(
            "IDENTIFY DEVICE data is {} bytes, not 512",
            b.len()
        ));
    }
    let b = &b[..512];
    if b.iter().all(|&x| x == 0) || b.iter().all(|&x| x == 0xff) {
        return Err("IDENTIFY DEVICE data is empty (all 00h or FFh)".into());
    }
    let w255 = word(b, 255);
    if w255 & 0xff != 0xa5 {
        return Err(format!(
            "IDENTIFY DEVICE word 255 is {w255:#06x}: no integrity signature A5h"
        ));
    }
    let sum = b.iter().fold(0u8, |s, &x| s.wrapping_add(x));
    if sum != 0 {
        return Err(format!(
            "IDENTIFY DEVICE checksum fails (bytes sum to {sum:#04x}, not 0)"
        ));
    }
    if word(b, 0) & 0x8000 != 0 {
        return Err("IDENTIFY DEVICE word 0 bit 15 set: not an ATA device".into());
    }
    let w128 = word(b, 128);
    // Word 82 bit 1 also says the Security feature set is supported.
    let supported = w128 & 0x1 != 0 || word(b, 82) & 0x2 != 0;
    Ok(AtaIdentify {
        serial: ata_string(b, 10, 10),
        firmware: ata_string(b, 23, 4),
        model: ata_string(b, 27, 20),
        security: Security {
            supported,
            enabled: w128 & 0x2 != 0,
            locked: w128 & 0x4 != 0,
            frozen: w128 & 0x8 != 0,
            count_expired: w128 & 0x10 != 0,
            enhanced_erase_supported: w128 & 0x20 != 0,
            master_maximum: w128 & 0x100 != 0,
        },
        erase_time: EraseTime::from_word(word(b, 89)),
        enhanced_erase_time: EraseTime::from_word(word(b, 90)),
    })
}

/// Why neither ATA erase can run, if the security state forbids it.
fn security_refusal(s: &Security) -> Option<String> {
    if !s.supported {
        Some("IDENTIFY DEVICE word 128: the Security feature set is not supported".into())
    } else if s.frozen {
        Some("drive is frozen (IDENTIFY word 128 bit 3): the firmware froze security at boot; a power cycle or hot-plug unfreezes it".into())
    } else if s.locked {
        Some("drive is locked (a password is set and the drive was not unlocked)".into())
    } else if s.enabled {
        Some("security is already enabled: a user password Warden does not know is set".into())
    } else if s.count_expired {
        Some("the password attempt counter has expired; a power cycle resets it".into())
    } else {
        None
    }
}

/// The methods an IDENTIFY DEVICE result allows.
pub fn caps_from_identify(id: &AtaIdentify) -> HwCaps {
    let mut caps = HwCaps::default();
    let refusal = security_refusal(&id.security);
    let normal = refusal.clone().map_or(Ok(()), Err);
    let enhanced = match refusal {
        Some(why) => Err(why),
        None if !id.security.enhanced_erase_supported => {
            Err("IDENTIFY DEVICE word 128 bit 5: enhanced security erase is not supported".into())
        }
        None => Ok(()),
    };
    caps.set(HwMethod::AtaSecurityEraseEnhanced, enhanced);
    caps.set(HwMethod::AtaSecurityErase, normal);
    not_nvme(&mut caps);
    caps.sort();
    caps
}

fn not_nvme(caps: &mut HwCaps) {
    for m in [
        HwMethod::NvmeSanitizeCrypto,
        HwMethod::NvmeSanitizeBlock,
        HwMethod::NvmeSanitizeOverwrite,
        HwMethod::NvmeFormatCrypto,
        HwMethod::NvmeFormatUserData,
    ] {
        caps.unavailable.push((m, "not an NVMe device".into()));
    }
}

const IDENTIFY_TIMEOUT_MS: u32 = 15_000;
const SECURITY_TIMEOUT_MS: u32 = 30_000;

/// An ATA (or SATA-behind-SCSI) drive, probed.
pub struct AtaDrive {
    io: Box<dyn AdminIo>,
    device: String,
    /// The IDENTIFY data, or why the pass-through does not reach the drive.
    pub identify: Result<AtaIdentify, String>,
    caps: HwCaps,
}

impl std::fmt::Debug for AtaDrive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtaDrive")
            .field("device", &self.device)
            .field("identify", &self.identify)
            .field("caps", &self.caps)
            .finish()
    }
}

impl AtaDrive {
    /// Sends IDENTIFY DEVICE. A pass-through that does not reach the drive
    /// is not an error here: the drive simply offers no ATA methods, and
    /// `caps().unavailable` says why.
    pub fn probe(mut io: Box<dyn AdminIo>) -> Result<AtaDrive, HwError> {
        let device = io.device().to_string();
        let identify = match identify(io.as_mut(), &device) {
            Ok(id) => Ok(id),
            Err(HwError::NotPassedThrough { why, .. }) => Err(format!(
                "ATA commands are not passed through to the drive: {why}"
            )),
            Err(e) => Err(e.to_string()),
        };
        let caps = match &identify {
            Ok(id) => caps_from_identify(id),
            Err(why) => {
                let mut caps = HwCaps::default();
                caps.set(HwMethod::AtaSecurityEraseEnhanced, Err(why.clone()));
                caps.set(HwMethod::AtaSecurityErase, Err(why.clone()));
                not_nvme(&mut caps);
                caps.sort();
                caps
            }
        };
        match &identify {
            Ok(id) => tracing::info!(
                disk = %device, model = %id.model, security = ?id.security,
                methods = ?caps.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
                "ata: identified"
            ),
            Err(why) => tracing::info!(disk = %device, why = %why, "ata: no ATA pass-through"),
        }
        Ok(AtaDrive {
            io,
            device,
            identify,
            caps,
        })
    }

    fn send_out(
        &mut self,
        command: &'static str,
        code: u8,
        block: &[u8; 512],
        timeout_ms: u32,
    ) -> Result<(), HwError> {
        let mut data = *block;
        send(
            self.io.as_mut(),
            &self.device,
            command,
            &pio_out_cdb(code),
            Dir::ToDevice,
            &mut data,
            timeout_ms,
        )
    }

    /// Removes the user password if the drive says one is set. Returns why
    /// it could not, if it could not.
    fn ensure_password_cleared(&mut self) -> Result<(), String> {
        let enabled = match identify(self.io.as_mut(), &self.device) {
            Ok(id) => id.security.enabled,
            // State unknown: try to disable anyway.
            Err(_) => true,
        };
        if !enabled {
            return Ok(());
        }
        let block = disable_password_block(ATA_PASSWORD.as_bytes());
        self.send_out(
            "SECURITY DISABLE PASSWORD",
            ATA_SECURITY_DISABLE_PASSWORD,
            &block,
            SECURITY_TIMEOUT_MS,
        )
        .map_err(|e| e.to_string())?;
        match identify(self.io.as_mut(), &self.device) {
            Ok(id) if id.security.enabled => {
                Err("IDENTIFY still reports security enabled after DISABLE PASSWORD".into())
            }
            _ => Ok(()),
        }
    }

    fn secure_erase(&mut self, method: HwMethod, enhanced: bool) -> Result<(), HwError> {
        // Fresh state: the drive may have been frozen or locked since probe.
        let id = identify(self.io.as_mut(), &self.device)?;
        let s = id.security;
        if s.frozen {
            return Err(HwError::Frozen {
                device: self.device.clone(),
                method,
            });
        }
        if let Some(reason) = security_refusal(&s) {
            return Err(HwError::SecurityState {
                device: self.device.clone(),
                method,
                reason,
            });
        }
        if enhanced && !s.enhanced_erase_supported {
            return Err(HwError::Unsupported {
                device: self.device.clone(),
                method,
                reason: "enhanced security erase is not supported".into(),
            });
        }
        let timeout = if enhanced {
            id.enhanced_erase_time
        } else {
            id.erase_time
        }
        .timeout_ms();
        tracing::info!(disk = %self.device, method = method.name(), timeout_ms = timeout, "ata: security erase");
        let pw = ATA_PASSWORD.as_bytes();
        let result = self
            .send_out(
                "SECURITY SET PASSWORD",
                ATA_SECURITY_SET_PASSWORD,
                &set_password_block(pw),
                SECURITY_TIMEOUT_MS,
            )
            .and_then(|()| {
                // ERASE PREPARE must immediately precede ERASE UNIT.
                send(
                    self.io.as_mut(),
                    &self.device,
                    "SECURITY ERASE PREPARE",
                    &non_data_cdb(ATA_SECURITY_ERASE_PREPARE),
                    Dir::None,
                    &mut [],
                    SECURITY_TIMEOUT_MS,
                )
            })
            .and_then(|()| {
                self.send_out(
                    "SECURITY ERASE UNIT",
                    ATA_SECURITY_ERASE_UNIT,
                    &erase_unit_block(enhanced, pw),
                    timeout,
                )
            });
        // A successful erase disables security by itself; check, and remove
        // the password whatever happened.
        let cleared = self.ensure_password_cleared();
        match (result, cleared) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) => Err(e),
            (Ok(()), Err(disable)) => Err(HwError::PasswordLeftSet {
                device: self.device.clone(),
                failure: "the erase completed but the password remained set".into(),
                disable,
                password: ATA_PASSWORD,
            }),
            (Err(e), Err(disable)) => Err(HwError::PasswordLeftSet {
                device: self.device.clone(),
                failure: e.to_string(),
                disable,
                password: ATA_PASSWORD,
            }),
        }
    }
}

/// IDENTIFY DEVICE, with the pass-through proven: an ATA status must come
/// back and the data must pass the integrity check.
fn identify(io: &mut dyn AdminIo, device: &str) -> Result<AtaIdentify, HwError> {
    let mut data = [0u8; 512];
    send(
        io,
        device,
        "IDENTIFY DEVICE",
        &identify_cdb(),
        Dir::FromDevice,
        &mut data,
        IDENTIFY_TIMEOUT_MS,
    )
    .map_err(|e| match e {
        // An ATA device that aborts IDENTIFY DEVICE is not one we can
        // trust with an erase either.
        HwError::CommandFailed { status, .. } => HwError::NotPassedThrough {
            device: device.to_string(),
            why: format!("IDENTIFY DEVICE failed: {status}"),
        },
        e => e,
    })?;
    parse_identify(&data).map_err(|why| HwError::NotPassedThrough {
        device: device.to_string(),
        why,
    })
}

fn send(
    io: &mut dyn AdminIo,
    device: &str,
    command: &'static str,
    cdb: &[u8; 16],
    dir: Dir,
    data: &mut [u8],
    timeout_ms: u32,
) -> Result<(), HwError> {
    let mut sense = [0u8; 64];
    let sg = io
        .sg_io(cdb, dir, data, &mut sense, timeout_ms)
        .map_err(|source| HwError::Io {
            device: device.to_string(),
            command,
            source,
        })?;
    match classify(&sg, &sense) {
        PtOutcome::Ok(_) => Ok(()),
        PtOutcome::Failed(r) => Err(HwError::CommandFailed {
            device: device.to_string(),
            command,
            status: describe_ata(&r),
        }),
        PtOutcome::NotPassedThrough(why) => Err(HwError::NotPassedThrough {
            device: device.to_string(),
            why: format!("{command}: {why}"),
        }),
        PtOutcome::Transport(status) => Err(HwError::CommandFailed {
            device: device.to_string(),
            command,
            status,
        }),
    }
}

impl SecureErase for AtaDrive {
    fn caps(&self) -> &HwCaps {
        &self.caps
    }

    fn erase(&mut self, method: HwMethod, progress: &mut dyn FnMut(f64)) -> Result<(), HwError> {
        let enhanced = match method {
            HwMethod::AtaSecurityEraseEnhanced => true,
            HwMethod::AtaSecurityErase => false,
            _ => {
                return Err(HwError::Unsupported {
                    device: self.device.clone(),
                    method,
                    reason: "not an NVMe device".into(),
                })
            }
        };
        if let Err(why) = &self.identify {
            // Never send an erase through a path that did not prove itself.
            return Err(HwError::NotPassedThrough {
                device: self.device.clone(),
                why: why.clone(),
            });
        }
        // The drive's state is re-read inside; the probe-time caps only
        // decide whether the method exists at all.
        if let Some(why) = self.caps.why_unavailable(method) {
            if !why.contains("frozen") {
                return Err(HwError::Unsupported {
                    device: self.device.clone(),
                    method,
                    reason: why.to_string(),
                });
            }
        }
        progress(0.0);
        self.secure_erase(method, enhanced)?;
        progress(1.0);
        Ok(())
    }
}

/// Spec-shaped IDENTIFY DEVICE data for tests.
#[cfg(test)]
pub(crate) mod testdata {
    /// IDENTIFY DEVICE data with security word 128 = `w128`, erase times
    /// in words 89/90, a model string, and a valid word-255 checksum.
    pub fn identify_data(w128: u16, w89: u16, w90: u16) -> [u8; 512] {
        let mut b = [0u8; 512];
        let mut set = |n: usize, v: u16| b[2 * n..2 * n + 2].copy_from_slice(&v.to_le_bytes());
        set(0, 0x0040); // fixed device, ATA
        set(82, 0x0002 | 0x4000); // Security feature set supported
        set(89, w89);
        set(90, w90);
        set(128, w128);
        // Model "WARDEN SSD" in words 27..46, high byte first, space padded.
        let model = b"WARDEN SSD                              ";
        for i in 0..20 {
            let w = u16::from(model[2 * i]) << 8 | u16::from(model[2 * i + 1]);
            b[2 * (27 + i)..2 * (27 + i) + 2].copy_from_slice(&w.to_le_bytes());
        }
        b[510] = 0xa5;
        let sum = b[..511].iter().fold(0u8, |s, &x| s.wrapping_add(x));
        b[511] = 0u8.wrapping_sub(sum);
        b
    }

    /// Descriptor-format sense with an ATA Status Return descriptor, as
    /// libata returns it for a CK_COND command.
    pub fn ata_sense(status: u8, error: u8) -> Vec<u8> {
        let mut s = vec![0u8; 22];
        s[0] = 0x72;
        s[1] = 0x01; // RECOVERED ERROR
        s[2] = 0x00;
        s[3] = 0x1d; // ATA PASS-THROUGH INFORMATION AVAILABLE
        s[7] = 14;
        s[8] = 0x09;
        s[9] = 0x0c;
        s[8 + 3] = error;
        s[8 + 12] = 0x40;
        s[8 + 13] = status;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::*;
    use super::*;
    use crate::disk::ioctl::{Recorded, RecordingIo, Reply};

    #[test]
    fn identify_cdb_bytes() {
        // SAT-3 Table 135: 85h; PROTOCOL 4 (PIO data-in) << 1 = 08h;
        // CK_COND|T_DIR|BYTE_BLOCK|T_LENGTH=10b = 2Eh; COUNT 1; ECh.
        assert_eq!(
            identify_cdb(),
            [0x85, 0x08, 0x2e, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0xec, 0]
        );
    }

    #[test]
    fn security_cdb_bytes() {
        // PIO data-out (5 << 1 = 0Ah), CK_COND|BYTE_BLOCK|T_LENGTH = 26h.
        assert_eq!(
            pio_out_cdb(ATA_SECURITY_SET_PASSWORD),
            [0x85, 0x0a, 0x26, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0xf1, 0]
        );
        assert_eq!(pio_out_cdb(ATA_SECURITY_ERASE_UNIT)[14], 0xf4);
        assert_eq!(pio_out_cdb(ATA_SECURITY_DISABLE_PASSWORD)[14], 0xf6);
        // Non-data (3 << 1 = 06h), CK_COND only, COUNT 0.
        assert_eq!(
            non_data_cdb(ATA_SECURITY_ERASE_PREPARE),
            [0x85, 0x06, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf3, 0]
        );
    }

    #[test]
    fn security_data_blocks() {
        let mut want = [0u8; 512];
        want[2..8].copy_from_slice(b"warden");
        assert_eq!(set_password_block(b"warden"), want);
        assert_eq!(disable_password_block(b"warden"), want);
        assert_eq!(erase_unit_block(false, b"warden"), want);
        want[0] = 0x02; // word 0 bit 1: enhanced
        assert_eq!(erase_unit_block(true, b"warden"), want);
        // Passwords longer than 32 bytes are cut at word 16.
        let long = set_password_block(&[b'x'; 40]);
        assert!(long[2..34].iter().all(|&x| x == b'x'));
        assert!(long[34..].iter().all(|&x| x == 0));
    }

    #[test]
    fn parses_identify_security_and_times() {
        // Supported, enhanced supported, not enabled/locked/frozen.
        let id = parse_identify(&identify_data(0x0021, 0x0010, 0x8020)).unwrap();
        assert_eq!(id.model, "WARDEN SSD");
        assert!(id.security.supported && id.security.enhanced_erase_supported);
        assert!(!id.security.frozen && !id.security.enabled && !id.security.locked);
        assert_eq!(id.erase_time, EraseTime::Minutes(32));
        assert_eq!(id.enhanced_erase_time, EraseTime::Minutes(64));
        let caps = caps_from_identify(&id);
        assert_eq!(
            caps.methods,
            vec![
                HwMethod::AtaSecurityEraseEnhanced,
                HwMethod::AtaSecurityErase
            ]
        );

        let id = parse_identify(&identify_data(0x0009, 0, 0x00ff)).unwrap();
        assert!(id.security.frozen);
        assert_eq!(id.erase_time, EraseTime::NotReported);
        assert_eq!(id.enhanced_erase_time, EraseTime::MoreThan(508));
        let caps = caps_from_identify(&id);
        assert!(caps.methods.is_empty());
        assert!(caps
            .why_unavailable(HwMethod::AtaSecurityErase)
            .unwrap()
            .contains("frozen"));

        let id = parse_identify(&identify_data(0x0001, 0, 0)).unwrap();
        let caps = caps_from_identify(&id);
        assert_eq!(caps.methods, vec![HwMethod::AtaSecurityErase]);
        assert!(caps
            .why_unavailable(HwMethod::AtaSecurityEraseEnhanced)
            .unwrap()
            .contains("bit 5"));
        for (w128, what) in [
            (0x0003, "already enabled"),
            (0x0007, "locked"),
            (0x0011, "expired"),
        ] {
            let caps = caps_from_identify(&parse_identify(&identify_data(w128, 0, 0)).unwrap());
            assert!(caps.methods.is_empty(), "{w128:#x}");
            assert!(
                caps.why_unavailable(HwMethod::AtaSecurityErase)
                    .unwrap()
                    .contains(what),
                "{w128:#x}"
            );
        }
        assert_eq!(EraseTime::from_word(0xffff), EraseTime::MoreThan(65532));
    }

    #[test]
    fn identify_integrity_is_checked() {
        let mut b = identify_data(0x0021, 0, 0);
        b[100] ^= 1;
        assert!(parse_identify(&b).unwrap_err().contains("checksum"));
        let mut b = identify_data(0x0021, 0, 0);
        b[510] = 0;
        assert!(parse_identify(&b).unwrap_err().contains("A5h"));
        assert!(parse_identify(&[0u8; 512]).unwrap_err().contains("empty"));
        assert!(parse_identify(&[0u8; 10]).is_err());
    }

    #[test]
    fn sense_parsing() {
        let r = parse_ata_return(&ata_sense(0x50, 0)).unwrap();
        assert_eq!(r.status, 0x50);
        assert_eq!(r.device, 0x40);
        // Fixed format with ASC/ASCQ 00/1D.
        let mut f = vec![0u8; 18];
        f[0] = 0x70;
        f[2] = 0x01;
        f[3] = 0x04; // error
        f[4] = 0x51; // status
        f[12] = 0x00;
        f[13] = 0x1d;
        assert_eq!(
            parse_ata_return(&f),
            Some(AtaReturn {
                error: 0x04,
                status: 0x51,
                device: 0,
                count: 0
            })
        );
        // ILLEGAL REQUEST, invalid opcode: no ATA registers.
        let mut ill = vec![0u8; 18];
        ill[0] = 0x70;
        ill[2] = 0x05;
        ill[12] = 0x20;
        assert_eq!(parse_ata_return(&ill), None);
        let sg = SgStatus {
            scsi_status: SCSI_CHECK_CONDITION,
            sense_len: 18,
            ..Default::default()
        };
        match classify(&sg, &ill) {
            PtOutcome::NotPassedThrough(why) => assert!(why.contains("not supported"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A host adapter timeout is a transport failure, not a verdict on
        // pass-through.
        let t = SgStatus {
            host_status: 0x03,
            ..Default::default()
        };
        assert!(matches!(classify(&t, &[]), PtOutcome::Transport(_)));
        // GOOD with no sense at all although CK_COND was set.
        match classify(&SgStatus::default(), &[]) {
            PtOutcome::NotPassedThrough(why) => assert!(why.contains("CK_COND"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    fn sg_ok(data: Vec<u8>) -> Reply {
        Reply::Sg {
            status: SgStatus {
                scsi_status: SCSI_CHECK_CONDITION,
                driver_status: 0x08,
                ..Default::default()
            },
            data,
            sense: ata_sense(0x50, 0),
        }
    }
    fn sg_abort() -> Reply {
        Reply::Sg {
            status: SgStatus {
                scsi_status: SCSI_CHECK_CONDITION,
                driver_status: 0x08,
                ..Default::default()
            },
            data: vec![],
            sense: ata_sense(0x51, 0x04),
        }
    }

    fn cdbs(log: &[Recorded]) -> Vec<(u8, Vec<u8>)> {
        log.iter()
            .filter_map(|r| match r {
                Recorded::Sg { cdb, data_out, .. } => Some((cdb[14], data_out.clone())),
                _ => None,
            })
            .collect()
    }

    fn drive(script: Vec<Reply>) -> (AtaDrive, std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>) {
        let io = RecordingIo::new("/dev/sda", script);
        let log = io.log_handle();
        (AtaDrive::probe(Box::new(io)).unwrap(), log)
    }

    #[test]
    fn enhanced_erase_sequence_through_the_fake() {
        let ready = identify_data(0x0021, 0x0010, 0x0020).to_vec();
        let (mut d, log) = drive(vec![
            sg_ok(ready.clone()), // probe IDENTIFY
            sg_ok(ready.clone()), // IDENTIFY before erase
            sg_ok(vec![]),        // SET PASSWORD
            sg_ok(vec![]),        // ERASE PREPARE
            sg_ok(vec![]),        // ERASE UNIT
            sg_ok(ready.clone()), // IDENTIFY: security disabled by the erase
        ]);
        let mut seen = vec![];
        d.erase(HwMethod::AtaSecurityEraseEnhanced, &mut |p| seen.push(p))
            .unwrap();
        assert_eq!(seen, vec![0.0, 1.0]);
        let log = log.lock().unwrap();
        let sent = cdbs(&log);
        let codes: Vec<u8> = sent.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, vec![0xec, 0xec, 0xf1, 0xf3, 0xf4, 0xec]);
        assert_eq!(sent[2].1, set_password_block(b"warden").to_vec());
        assert_eq!(sent[4].1, erase_unit_block(true, b"warden").to_vec());
        // The ERASE UNIT timeout follows word 90: 64 min * 2 + 10 min.
        match &log[4] {
            Recorded::Sg {
                cdb,
                timeout_ms,
                dir,
                ..
            } => {
                assert_eq!(cdb.as_slice(), pio_out_cdb(0xf4).as_slice());
                assert_eq!(*dir, Dir::ToDevice);
                assert_eq!(*timeout_ms, (64 * 2 + 10) * 60_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_erase_disables_the_password() {
        let ready = identify_data(0x0021, 0, 0).to_vec();
        let enabled = identify_data(0x0023, 0, 0).to_vec();
        let (mut d, log) = drive(vec![
            sg_ok(ready.clone()),
            sg_ok(ready.clone()),
            sg_ok(vec![]),  // SET PASSWORD
            sg_ok(vec![]),  // ERASE PREPARE
            sg_abort(),     // ERASE UNIT aborted
            sg_ok(enabled), // IDENTIFY: password set
            sg_ok(vec![]),  // DISABLE PASSWORD
            sg_ok(ready),   // IDENTIFY: cleared
        ]);
        let err = d
            .erase(HwMethod::AtaSecurityErase, &mut |_| {})
            .unwrap_err();
        let s = err.to_string();
        assert!(s.contains("SECURITY ERASE UNIT failed"), "{s}");
        assert!(s.contains("ABRT"), "{s}");
        let sent = cdbs(&log.lock().unwrap());
        let codes: Vec<u8> = sent.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, vec![0xec, 0xec, 0xf1, 0xf3, 0xf4, 0xec, 0xf6, 0xec]);
        assert_eq!(sent[6].1, disable_password_block(b"warden").to_vec());
    }

    #[test]
    fn password_left_set_is_said() {
        let ready = identify_data(0x0021, 0, 0).to_vec();
        let enabled = identify_data(0x0023, 0, 0).to_vec();
        let (mut d, _) = drive(vec![
            sg_ok(ready.clone()),
            sg_ok(ready),
            sg_ok(vec![]),
            sg_ok(vec![]),
            sg_abort(),
            sg_ok(enabled),
            sg_abort(), // DISABLE PASSWORD fails too
        ]);
        let err = d
            .erase(HwMethod::AtaSecurityErase, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, HwError::PasswordLeftSet { .. }), "{err:?}");
        let s = err.to_string();
        assert!(s.contains("SECURITY ERASE UNIT failed"), "{s}");
        assert!(s.contains("SECURITY DISABLE PASSWORD failed"), "{s}");
        assert!(s.contains("\"warden\""), "{s}");
    }

    #[test]
    fn frozen_drive_is_refused_before_any_security_command() {
        let frozen = identify_data(0x0029, 0, 0).to_vec();
        let (mut d, log) = drive(vec![sg_ok(frozen.clone()), sg_ok(frozen)]);
        assert!(d.caps().methods.is_empty());
        let err = d
            .erase(HwMethod::AtaSecurityErase, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, HwError::Frozen { .. }), "{err:?}");
        assert!(err.to_string().contains("frozen"), "{err}");
        let codes: Vec<u8> = cdbs(&log.lock().unwrap()).iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, vec![0xec, 0xec], "only IDENTIFY was sent");
    }

    #[test]
    fn bridge_without_pass_through_is_detected_before_erase() {
        // A RAID controller answers ATA PASS-THROUGH with ILLEGAL REQUEST.
        let mut ill = vec![0u8; 18];
        ill[0] = 0x70;
        ill[2] = 0x05;
        ill[12] = 0x20;
        let (mut d, log) = drive(vec![Reply::Sg {
            status: SgStatus {
                scsi_status: SCSI_CHECK_CONDITION,
                ..Default::default()
            },
            data: vec![],
            sense: ill,
        }]);
        let why = d
            .caps()
            .why_unavailable(HwMethod::AtaSecurityErase)
            .unwrap()
            .to_string();
        assert!(why.contains("not passed through"), "{why}");
        let err = d
            .erase(HwMethod::AtaSecurityErase, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, HwError::NotPassedThrough { .. }), "{err:?}");
        assert_eq!(log.lock().unwrap().len(), 1, "nothing sent after the probe");

        // A bridge that returns GOOD and made-up IDENTIFY data.
        let mut fake = identify_data(0x0021, 0, 0);
        fake[511] ^= 0xff;
        let (d, _) = drive(vec![Reply::Sg {
            status: SgStatus::default(),
            data: fake.to_vec(),
            sense: vec![],
        }]);
        assert!(d.caps().methods.is_empty());
        // An ATA status descriptor but data failing the integrity check.
        let (d, _) = drive(vec![sg_ok(fake.to_vec())]);
        assert!(d
            .caps()
            .why_unavailable(HwMethod::AtaSecurityErase)
            .unwrap()
            .contains("checksum"));
    }
}
