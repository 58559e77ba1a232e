//! Which root complexes forward peer-to-peer requests.
//!
//! Real root complexes differ: some route a memory request from one root port to another,
//! some refuse it. Linux keeps a list of host bridges known to forward
//! (`pci_p2pdma_whitelist` in drivers/pci/p2pdma.c), keyed by the vendor and device ID of the
//! host bridge's function on the root bus, and trusts every AMD CPU from family 0x17 (Zen) on.
//! When a fabric file does not say `p2p` for a host bridge, the emulated root complex behaves
//! as that list predicts, so the hardware model and the kernel's analysis describe the same
//! machine. A file that says `p2p = true/false` overrides it (a machine the list is wrong about).

use crate::spec::{Cpu, CpuVendor, P2pForwarding};

/// A known host bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowlistEntry {
    /// Vendor ID of the root-bus function.
    pub vendor: u16,
    /// Device ID, or `None` for every device of the vendor.
    pub device: Option<u16>,
    /// Forwards only between root ports of the same host bridge (`REQ_SAME_HOST_BRIDGE`).
    pub same_host_bridge_only: bool,
}

const fn entry(vendor: u16, device: u16, same: bool) -> AllowlistEntry {
    AllowlistEntry {
        vendor,
        device: Some(device),
        same_host_bridge_only: same,
    }
}

const INTEL: u16 = 0x8086;
const GOOGLE: u16 = 0x1ae0;
const NVIDIA: u16 = 0x10de;

/// The Linux 7.2 host-bridge allowlist, in the kernel's order (first match wins).
pub const ALLOWLIST: &[AllowlistEntry] = &[
    // Xeon E5 / Core i7 (Sandy Bridge-EP).
    entry(INTEL, 0x3c00, true),
    entry(INTEL, 0x3c01, true),
    // Xeon E7 v3 / E5 v3 (Haswell-EP).
    entry(INTEL, 0x2f00, true),
    entry(INTEL, 0x2f01, true),
    // Skylake-E.
    entry(INTEL, 0x2030, false),
    entry(INTEL, 0x2031, false),
    entry(INTEL, 0x2032, false),
    entry(INTEL, 0x2033, false),
    entry(INTEL, 0x2020, false),
    entry(INTEL, 0x09a2, false),
    // Integrated accelerators that sit first on their root bus: DSA and IAX (Sapphire
    // Rapids), DSA (Granite Rapids-D), DSA and IAA (Diamond Rapids), QAT 4xxx/401xx/402xx/
    // 420xx/6xxx.
    entry(INTEL, 0x0b25, false),
    entry(INTEL, 0x0cfe, false),
    entry(INTEL, 0x11fb, false),
    entry(INTEL, 0x1212, false),
    entry(INTEL, 0x1216, false),
    entry(INTEL, 0x4940, false),
    entry(INTEL, 0x4942, false),
    entry(INTEL, 0x4944, false),
    entry(INTEL, 0x4946, false),
    entry(INTEL, 0x4948, false),
    // Google SoCs: every device ID.
    AllowlistEntry {
        vendor: GOOGLE,
        device: None,
        same_host_bridge_only: false,
    },
    // NVIDIA CPUs.
    entry(NVIDIA, 0x2f95, false),
    entry(NVIDIA, 0x2f96, false),
    entry(NVIDIA, 0x2f97, false),
    entry(NVIDIA, 0x2f98, false),
];

/// The allowlist entry for a root-bus function, if any (first match wins, as in Linux).
pub fn allowlist_lookup(vendor: u16, device: u16) -> Option<&'static AllowlistEntry> {
    ALLOWLIST
        .iter()
        .find(|e| e.vendor == vendor && e.device.is_none_or(|d| d == device))
}

/// Whether the CPU is trusted to forward P2P between any root ports (`cpu_supports_p2pdma`):
/// AMD, family 0x17 or later.
pub fn cpu_forwards_p2p(cpu: Cpu) -> bool {
    cpu.vendor == CpuVendor::Amd && cpu.family >= 0x17
}

/// The forwarding a host bridge gets when its fabric file does not say: `root_function` is the
/// (vendor, device) of its root-bus function (devfn 00.0 or a root port), if it has one.
pub fn default_forwarding(cpu: Cpu, root_function: Option<(u16, u16)>) -> P2pForwarding {
    if cpu_forwards_p2p(cpu) {
        return P2pForwarding::Any;
    }
    match root_function.and_then(|(v, d)| allowlist_lookup(v, d)) {
        Some(e) if e.same_host_bridge_only => P2pForwarding::SameHostBridge,
        Some(_) => P2pForwarding::Any,
        None => P2pForwarding::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL6: Cpu = Cpu {
        vendor: CpuVendor::Intel,
        family: 6,
    };

    #[test]
    fn amd_zen_forwards_everything() {
        let zen = Cpu {
            vendor: CpuVendor::Amd,
            family: 0x17,
        };
        let old = Cpu {
            vendor: CpuVendor::Amd,
            family: 0x16,
        };
        assert_eq!(default_forwarding(zen, None), P2pForwarding::Any);
        assert_eq!(default_forwarding(old, None), P2pForwarding::None);
    }

    #[test]
    fn allowlist_decides_for_other_cpus() {
        assert_eq!(
            default_forwarding(INTEL6, Some((0x8086, 0x2020))),
            P2pForwarding::Any
        );
        assert_eq!(
            default_forwarding(INTEL6, Some((0x8086, 0x3c00))),
            P2pForwarding::SameHostBridge
        );
        assert_eq!(
            default_forwarding(INTEL6, Some((0x8086, 0x1234))),
            P2pForwarding::None
        );
        assert_eq!(default_forwarding(INTEL6, None), P2pForwarding::None);
        let arm = Cpu {
            vendor: CpuVendor::Arm,
            family: 0,
        };
        assert_eq!(
            default_forwarding(arm, Some((0x8086, 0x09a2))),
            P2pForwarding::Any
        );
    }

    #[test]
    fn wildcard_and_later_entries() {
        assert!(
            allowlist_lookup(0x1ae0, 0x1234).is_some(),
            "Google: any device"
        );
        assert!(allowlist_lookup(0x1ae0, 0xffff).is_some());
        assert!(allowlist_lookup(0x10de, 0x2f97).is_some());
        assert!(allowlist_lookup(0x10de, 0x2f99).is_none());
        assert!(allowlist_lookup(0x8086, 0x4948).is_some(), "QAT 6xxx");
        assert!(allowlist_lookup(0x8086, 0x0b25).is_some(), "DSA SPR");
        assert_eq!(ALLOWLIST.len(), 25);
    }
}
