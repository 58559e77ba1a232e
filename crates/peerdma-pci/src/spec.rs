//! The description of a platform, before it is built: what a fabric file says, as Rust data.
//!
//! [`FabricSpec`] is what [`crate::file`] produces from TOML and what tests and generators
//! build directly. [`crate::Fabric::build`] validates it, enumerates it (bus numbers, BAR
//! addresses, bridge windows) and turns it into live hardware.

use crate::bdf::Bdf;
use crate::regs;

/// CPU vendor, as the fabric file's `platform.cpu.vendor` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuVendor {
    /// AMD x86.
    Amd,
    /// Intel x86.
    Intel,
    /// Any Arm CPU.
    Arm,
    /// Anything else.
    Other,
}

impl CpuVendor {
    /// The file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuVendor::Amd => "amd",
            CpuVendor::Intel => "intel",
            CpuVendor::Arm => "arm",
            CpuVendor::Other => "other",
        }
    }

    /// Parses the file spelling.
    pub fn parse(s: &str) -> Option<CpuVendor> {
        Some(match s {
            "amd" => CpuVendor::Amd,
            "intel" => CpuVendor::Intel,
            "arm" => CpuVendor::Arm,
            "other" => CpuVendor::Other,
            _ => return None,
        })
    }
}

/// The boot CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// Vendor.
    pub vendor: CpuVendor,
    /// Family number (x86 `cpu_data(0).x86`; 0 elsewhere).
    pub family: u32,
}

/// A RAM range at CPU physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamSpec {
    /// First CPU physical address.
    pub cpu: u64,
    /// Bytes.
    pub size: u64,
}

/// Platform-wide facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    /// The boot CPU.
    pub cpu: Cpu,
    /// RAM ranges.
    pub ram: Vec<RamSpec>,
}

/// How a root complex treats peer-to-peer requests between its root ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum P2pForwarding {
    /// Peer-to-peer requests that reach the root complex are refused (Unsupported Request).
    None,
    /// Forwarded between root ports of this host bridge only.
    SameHostBridge,
    /// Forwarded, also to and from other host bridges that forward.
    Any,
}

impl P2pForwarding {
    /// The file/JSON spelling: `none`, `same_host_bridge`, `any`.
    pub fn as_str(self) -> &'static str {
        match self {
            P2pForwarding::None => "none",
            P2pForwarding::SameHostBridge => "same_host_bridge",
            P2pForwarding::Any => "any",
        }
    }
}

/// One MMIO window of a host bridge: CPU physical `[cpu, cpu + size)` appears on the PCI bus
/// at `[bus, bus + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// CPU physical base.
    pub cpu: u64,
    /// PCI bus base.
    pub bus: u64,
    /// Bytes.
    pub size: u64,
}

impl WindowSpec {
    /// `bus − cpu`, wrapping (as the kernel computes `bus_offset`).
    pub fn offset(&self) -> u64 {
        self.bus.wrapping_sub(self.cpu)
    }
}

/// A host bridge (one root complex, one PCI domain/root bus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBridgeSpec {
    /// Unique name (`hb0`).
    pub name: String,
    /// PCI domain (segment).
    pub domain: u16,
    /// Root bus number.
    pub bus: u8,
    /// Peer-to-peer forwarding; `None` = decide from the CPU and the root-bus function's IDs
    /// (see [`crate::hostbridge`]).
    pub p2p: Option<P2pForwarding>,
    /// MMIO windows.
    pub mmio: Vec<WindowSpec>,
}

/// What kind of PCI function a device entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    /// A function on the root bus representing the host bridge itself (class 06/00).
    HostBridgeFunction,
    /// A PCIe root port (type 1 header, port type 4).
    RootPort,
    /// A switch upstream port (type 1, port type 5).
    SwitchUpstream,
    /// A switch downstream port (type 1, port type 6).
    SwitchDownstream,
    /// A PCIe-to-PCI bridge (type 1, port type 7).
    PciBridge,
    /// A PCIe endpoint (type 0, port type 0).
    Endpoint,
    /// A root-complex integrated endpoint (type 0, port type 9), on a root bus.
    Rciep,
    /// An SR-IOV virtual function; created by its PF's `sriov`, and only named or given
    /// properties by an entry of this kind.
    Vf,
}

impl DeviceKind {
    /// All kinds, in file spelling order.
    pub const ALL: [DeviceKind; 8] = [
        DeviceKind::HostBridgeFunction,
        DeviceKind::RootPort,
        DeviceKind::SwitchUpstream,
        DeviceKind::SwitchDownstream,
        DeviceKind::PciBridge,
        DeviceKind::Endpoint,
        DeviceKind::Rciep,
        DeviceKind::Vf,
    ];

    /// The file/JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::HostBridgeFunction => "host_bridge_function",
            DeviceKind::RootPort => "root_port",
            DeviceKind::SwitchUpstream => "switch_upstream",
            DeviceKind::SwitchDownstream => "switch_downstream",
            DeviceKind::PciBridge => "pci_bridge",
            DeviceKind::Endpoint => "endpoint",
            DeviceKind::Rciep => "rciep",
            DeviceKind::Vf => "vf",
        }
    }

    /// Parses the file spelling.
    pub fn parse(s: &str) -> Option<DeviceKind> {
        DeviceKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether it has a type 1 (bridge) header and a secondary bus.
    pub fn is_bridge(self) -> bool {
        matches!(
            self,
            DeviceKind::RootPort
                | DeviceKind::SwitchUpstream
                | DeviceKind::SwitchDownstream
                | DeviceKind::PciBridge
        )
    }

    /// Whether it sits directly on a root bus.
    pub fn on_root_bus(self) -> bool {
        matches!(
            self,
            DeviceKind::HostBridgeFunction | DeviceKind::RootPort | DeviceKind::Rciep
        )
    }

    /// The PCIe capability's device/port type, if the kind has a PCIe capability.
    pub fn pcie_type(self) -> Option<u8> {
        Some(match self {
            DeviceKind::HostBridgeFunction => return None,
            DeviceKind::RootPort => regs::EXP_TYPE_ROOT_PORT,
            DeviceKind::SwitchUpstream => regs::EXP_TYPE_UPSTREAM,
            DeviceKind::SwitchDownstream => regs::EXP_TYPE_DOWNSTREAM,
            DeviceKind::PciBridge => regs::EXP_TYPE_PCI_BRIDGE,
            DeviceKind::Endpoint | DeviceKind::Vf => regs::EXP_TYPE_ENDPOINT,
            DeviceKind::Rciep => regs::EXP_TYPE_RC_END,
        })
    }

    /// The default 24-bit class code.
    pub fn default_class(self) -> u32 {
        match self {
            DeviceKind::HostBridgeFunction => 0x06_00_00,
            k if k.is_bridge() => 0x06_04_00,
            _ => 0x00_00_00,
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarType {
    /// 32-bit memory BAR (one register).
    Mem32,
    /// 64-bit memory BAR (two registers: this index and the next).
    Mem64,
    /// I/O port BAR.
    Io,
}

impl BarType {
    /// The file/JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BarType::Mem32 => "mem32",
            BarType::Mem64 => "mem64",
            BarType::Io => "io",
        }
    }
    /// Parses the file spelling.
    pub fn parse(s: &str) -> Option<BarType> {
        Some(match s {
            "mem32" => BarType::Mem32,
            "mem64" => BarType::Mem64,
            "io" => BarType::Io,
            _ => return None,
        })
    }
    /// Whether it decodes memory space.
    pub fn is_mem(self) -> bool {
        !matches!(self, BarType::Io)
    }
}

/// One BAR as the file describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR index 0..=5.
    pub index: u8,
    /// Bytes; a power of two (≥ 16 for memory, ≥ 4 for I/O).
    pub size: u64,
    /// Register type.
    pub kind: BarType,
    /// Prefetchable (memory only).
    pub prefetch: bool,
    /// Fixed bus address; `None` = the enumerator assigns one.
    pub addr: Option<u64>,
}

/// SR-IOV capability of a PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovSpec {
    /// TotalVFs = InitialVFs = NumVFs at start; all enabled.
    pub vfs: u16,
    /// First VF Offset (routing-ID distance from the PF to VF 0).
    pub offset: u16,
    /// VF Stride.
    pub stride: u16,
    /// VF Device ID (default: the PF's device ID).
    pub vf_device: Option<u16>,
    /// Per-VF BARs (`size` is each VF's share).
    pub bars: Vec<BarSpec>,
}

/// One PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its address.
    pub bdf: Bdf,
    /// Its kind.
    pub kind: DeviceKind,
    /// A host bridge name, or the BDF or name of the bridge whose secondary bus it sits on;
    /// for `vf` entries, the PF.
    pub parent: String,
    /// Optional unique name (`gpu0`).
    pub name: Option<String>,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// 24-bit class code (`None` = the kind's default).
    pub class: Option<u32>,
    /// PCIe Function Level Reset advertised in DevCap.
    pub flr: bool,
    /// Advanced Features capability with FLR + TP.
    pub af_flr: bool,
    /// ACS capability with these control bits on (`None` = no ACS capability).
    pub acs: Option<u16>,
    /// PM capability's No_Soft_Reset: when false, D3hot→D0 resets the function.
    pub no_soft_reset: bool,
    /// Has a Power Management capability (D-states through PMCSR).
    pub pm: bool,
    /// Has a PCI Express capability (false: a conventional PCI endpoint, e.g. QEMU's
    /// ivshmem, even below a PCIe port); FLR needs it.
    pub express: bool,
    /// BARs.
    pub bars: Vec<BarSpec>,
    /// SR-IOV capability (PFs only).
    pub sriov: Option<SriovSpec>,
    /// Config-space bytes as read from the real function (offset, bytes): laid over the
    /// built registers before BARs are programmed, so the function shows the captured
    /// capability chain and register values; the capability flags above must then agree
    /// with it (the file loader derives them from it).
    pub config: Vec<(u16, Vec<u8>)>,
    /// Writable-bit masks measured on the real function (offset, mask bytes), laid over
    /// the masks the model would give its registers, last: a bit set here can be changed
    /// by a config write, a clear bit keeps its value. Only with `config`.
    pub wmask: Vec<(u16, Vec<u8>)>,
    /// The register file behind a BAR that is not plain memory ([`crate::model`]).
    pub model: Option<crate::model::DeviceModel>,
}

impl DeviceSpec {
    /// A function with defaults: PM and PCIe capabilities, FLR on, no AF, no ACS,
    /// No_Soft_Reset set, no BARs.
    pub fn new(bdf: Bdf, kind: DeviceKind, parent: impl Into<String>) -> DeviceSpec {
        DeviceSpec {
            bdf,
            kind,
            parent: parent.into(),
            name: None,
            vendor: 0x1b36,
            device: 0x0001,
            class: None,
            flr: true,
            af_flr: false,
            acs: None,
            no_soft_reset: true,
            pm: true,
            express: true,
            bars: Vec::new(),
            sriov: None,
            config: Vec::new(),
            wmask: Vec::new(),
            model: None,
        }
    }
}

/// A whole platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricSpec {
    /// CPU and RAM.
    pub platform: PlatformSpec,
    /// Root complexes.
    pub host_bridges: Vec<HostBridgeSpec>,
    /// PCI functions (VFs are added by their PF's `sriov`).
    pub devices: Vec<DeviceSpec>,
}

/// ACS control bit names, in register order.
pub const ACS_BIT_NAMES: [(&str, u16); 7] = [
    ("SV", regs::ACS_SV),
    ("TB", regs::ACS_TB),
    ("RR", regs::ACS_RR),
    ("CR", regs::ACS_CR),
    ("UF", regs::ACS_UF),
    ("EC", regs::ACS_EC),
    ("DT", regs::ACS_DT),
];

/// The names of the ACS bits set in `bits`.
pub fn acs_names(bits: u16) -> Vec<&'static str> {
    ACS_BIT_NAMES
        .iter()
        .filter(|(_, b)| bits & b != 0)
        .map(|(n, _)| *n)
        .collect()
}

/// The bit of one ACS name (`"RR"`).
pub fn acs_bit(name: &str) -> Option<u16> {
    ACS_BIT_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in DeviceKind::ALL {
            assert_eq!(DeviceKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(DeviceKind::parse("switch"), None);
        assert!(DeviceKind::SwitchDownstream.is_bridge());
        assert!(!DeviceKind::Rciep.is_bridge());
    }

    #[test]
    fn acs_names_follow_register_order() {
        assert_eq!(
            acs_names(regs::ACS_RR | regs::ACS_SV | regs::ACS_DT),
            vec!["SV", "RR", "DT"]
        );
        assert_eq!(acs_bit("EC"), Some(0x20));
        assert_eq!(acs_bit("XX"), None);
    }

    #[test]
    fn window_offset_wraps_like_the_kernel() {
        let w = WindowSpec {
            cpu: 0x4000_0000_0000,
            bus: 0,
            size: 1 << 30,
        };
        assert_eq!(w.offset(), 0u64.wrapping_sub(0x4000_0000_0000));
        assert_eq!(0x4000_0000_1000u64.wrapping_add(w.offset()), 0x1000);
    }
}
