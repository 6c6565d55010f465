//! The drive's own erase commands as the wipe plan sees them: the
//! interface `crate::disk` exposes (NVMe Sanitize/Format, ATA Security
//! Erase), and the mapping to the protocol's [`Method`] names.
//!
//! This module only translates; it never sends a command to a drive itself.

pub use crate::disk::{open_secure_erase, HwCaps, HwError, HwMethod, SecureErase};
use warden_protocol::wipe::Method;

/// The protocol's method for a hardware method.
pub(crate) fn to_method(m: HwMethod) -> Method {
    match m {
        HwMethod::NvmeSanitizeCrypto => Method::NvmeSanitizeCrypto,
        HwMethod::NvmeSanitizeBlock => Method::NvmeSanitizeBlock,
        HwMethod::NvmeSanitizeOverwrite => Method::NvmeSanitizeOverwrite,
        HwMethod::NvmeFormatCrypto => Method::NvmeFormatCrypto,
        HwMethod::NvmeFormatUserData => Method::NvmeFormatUserData,
        HwMethod::AtaSecurityEraseEnhanced => Method::AtaSecurityEraseEnhanced,
        HwMethod::AtaSecurityErase => Method::AtaSecurityErase,
    }
}

/// The hardware method a protocol method names, if it is one.
pub(crate) fn from_method(m: Method) -> Option<HwMethod> {
    Some(match m {
        Method::NvmeSanitizeCrypto => HwMethod::NvmeSanitizeCrypto,
        Method::NvmeSanitizeBlock => HwMethod::NvmeSanitizeBlock,
        Method::NvmeSanitizeOverwrite => HwMethod::NvmeSanitizeOverwrite,
        Method::NvmeFormatCrypto => HwMethod::NvmeFormatCrypto,
        Method::NvmeFormatUserData => HwMethod::NvmeFormatUserData,
        Method::AtaSecurityEraseEnhanced => HwMethod::AtaSecurityEraseEnhanced,
        Method::AtaSecurityErase => HwMethod::AtaSecurityErase,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hardware_method_maps_both_ways() {
        for m in Method::HARDWARE {
            let h = from_method(m).unwrap();
            assert_eq!(to_method(h), m);
            // One name per method, on the console and in records alike.
            assert_eq!(h.name(), m.name());
        }
        assert_eq!(from_method(Method::Zeroout), None);
    }
}
