//! A serialisable snapshot of a platform: what `peerdma topo --json` prints.
//!
//! The JSON shape is a stable contract (integers are JSON numbers):
//! `{"platform":{…},"host_bridges":[{"name","domain","bus","p2p","mmio":[{"cpu","bus","size"}]}],
//! "devices":[{"bdf","kind","name","parent","vendor","device","acs":[…],
//! "bars":[{"index","type","prefetch","size","cpu_addr","bus_addr"}]}]}`.
//! Keys may be added; these keep their meaning.

use serde::Serialize;

use crate::fabric::Fabric;
use crate::function::{Parent, decode};
use crate::regs;
use crate::spec::acs_names;
use crate::sync;

/// The whole snapshot.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Topology {
    /// CPU and RAM.
    pub platform: PlatformInfo,
    /// Root complexes.
    pub host_bridges: Vec<HostBridgeInfo>,
    /// Every function, in address order.
    pub devices: Vec<DeviceInfo>,
}

/// CPU and RAM.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlatformInfo {
    /// The boot CPU.
    pub cpu: CpuInfo,
    /// RAM ranges.
    pub ram: Vec<RamInfo>,
}

/// The boot CPU.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CpuInfo {
    /// `amd`, `intel`, `arm`, `other`.
    pub vendor: String,
    /// Family number.
    pub family: u32,
}

/// A RAM range.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RamInfo {
    /// CPU physical base.
    pub cpu: u64,
    /// Bytes.
    pub size: u64,
}

/// A host bridge window.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WindowInfo {
    /// CPU physical base.
    pub cpu: u64,
    /// Bus base.
    pub bus: u64,
    /// Bytes.
    pub size: u64,
}

/// A root complex.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostBridgeInfo {
    /// Name.
    pub name: String,
    /// PCI domain.
    pub domain: u16,
    /// Root bus.
    pub bus: u8,
    /// Whether it forwards peer-to-peer at all.
    pub p2p: bool,
    /// `any`, `same_host_bridge` or `none`.
    pub p2p_scope: String,
    /// `file` when the fabric file said so, else `platform` (CPU rule / allowlist).
    pub p2p_source: String,
    /// The root-bus function the allowlist looks at.
    pub root_function: Option<String>,
    /// MMIO windows.
    pub mmio: Vec<WindowInfo>,
}

/// A BAR now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BarInfo {
    /// Index.
    pub index: u8,
    /// `mem32`, `mem64`, `io`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Prefetchable.
    pub prefetch: bool,
    /// Bytes.
    pub size: u64,
    /// CPU physical address (`null` if no host bridge window covers it).
    pub cpu_addr: Option<u64>,
    /// Bus address from the registers.
    pub bus_addr: u64,
}

/// A bridge window.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SpanInfo {
    /// First bus address.
    pub start: u64,
    /// Bytes.
    pub size: u64,
}

/// A bridge's windows and buses.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BridgeInfo {
    /// Secondary bus.
    pub secondary_bus: u8,
    /// Subordinate bus.
    pub subordinate_bus: u8,
    /// Non-prefetchable memory window.
    pub mem: Option<SpanInfo>,
    /// Prefetchable memory window.
    pub pref: Option<SpanInfo>,
    /// I/O window.
    pub io: Option<SpanInfo>,
}

/// A PCI function now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Address.
    pub bdf: String,
    /// Kind (file spelling).
    pub kind: String,
    /// Name, if any.
    pub name: Option<String>,
    /// Host bridge name (root bus) or the address of the bridge above.
    pub parent: String,
    /// For a VF, its PF.
    pub physfn: Option<String>,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code.
    pub class: u32,
    /// Whether it has an ACS capability.
    pub acs_cap: bool,
    /// ACS control bits that are on.
    pub acs: Vec<String>,
    /// Whether the ACS bits are known (false when read from a machine without the rights to
    /// see extended config space).
    pub acs_known: bool,
    /// The bound driver (real machines only).
    pub driver: Option<String>,
    /// The IOMMU group (real machines only).
    pub iommu_group: Option<u32>,
    /// COMMAND bits that are on: `IO`, `MEM`, `BUS_MASTER`.
    pub command: Vec<String>,
    /// `D0`, `D3hot`, …
    pub power: String,
    /// Whether it answers now (a VF only while enabled).
    pub present: bool,
    /// PCIe FLR.
    pub flr: bool,
    /// AF FLR.
    pub af_flr: bool,
    /// BARs.
    pub bars: Vec<BarInfo>,
    /// For bridges.
    pub bridge: Option<BridgeInfo>,
    /// For PFs, their VFs.
    pub vfs: Vec<String>,
}

impl Topology {
    /// Takes a snapshot of a fabric.
    pub fn of(fabric: &Fabric) -> Topology {
        let p = fabric.platform();
        let platform = PlatformInfo {
            cpu: CpuInfo {
                vendor: p.cpu.vendor.as_str().to_string(),
                family: p.cpu.family,
            },
            ram: p
                .ram
                .iter()
                .map(|r| RamInfo {
                    cpu: r.cpu,
                    size: r.size,
                })
                .collect(),
        };
        let host_bridges = fabric
            .host_bridges()
            .iter()
            .enumerate()
            .map(|(i, h)| HostBridgeInfo {
                name: h.name().to_string(),
                domain: h.domain(),
                bus: h.bus(),
                p2p: h.p2p() != crate::spec::P2pForwarding::None,
                p2p_scope: h.p2p().as_str().to_string(),
                p2p_source: if h.p2p_explicit() { "file" } else { "platform" }.to_string(),
                root_function: fabric.root_bus_function(i).map(|b| b.to_string()),
                mmio: h
                    .mmio()
                    .iter()
                    .map(|w| WindowInfo {
                        cpu: w.cpu,
                        bus: w.bus,
                        size: w.size,
                    })
                    .collect(),
            })
            .collect();
        let mut funcs: Vec<_> = fabric.functions().collect();
        funcs.sort_by_key(|f| f.bdf());
        let devices = funcs
            .into_iter()
            .map(|f| {
                let (cmd, acs) = {
                    let c = sync::read(&f.cfg);
                    (decode::command(&c), decode::acs_ctrl(&c, &f.caps))
                };
                let mut command = Vec::new();
                for (bit, n) in [
                    (regs::COMMAND_IO, "IO"),
                    (regs::COMMAND_MEMORY, "MEM"),
                    (regs::COMMAND_MASTER, "BUS_MASTER"),
                ] {
                    if cmd & bit != 0 {
                        command.push(n.to_string());
                    }
                }
                let parent = match f.parent {
                    Parent::HostBridge(h) => fabric.host_bridges()[h].name().to_string(),
                    Parent::Bridge(b) => fabric.funcs[b].bdf.to_string(),
                };
                let bars = fabric
                    .bar_states(f.bdf())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|b| BarInfo {
                        index: b.bar.index,
                        kind: b.bar.kind.as_str().to_string(),
                        prefetch: b.bar.prefetch,
                        size: b.bar.size,
                        cpu_addr: b.cpu.map(crate::addr::PhysAddr::get),
                        bus_addr: b.bus.get(),
                    })
                    .collect();
                let bridge = fabric.bridge_windows(f.bdf()).ok().flatten().map(|w| {
                    let (_, sec, sub) = fabric
                        .bridge_buses(f.bdf())
                        .ok()
                        .flatten()
                        .unwrap_or((0, 0, 0));
                    let si = |s: Option<crate::addr::Span>| {
                        s.map(|s| SpanInfo {
                            start: s.start,
                            size: s.len,
                        })
                    };
                    BridgeInfo {
                        secondary_bus: sec,
                        subordinate_bus: sub,
                        mem: si(w.mem),
                        pref: si(w.pref),
                        io: si(w.io),
                    }
                });
                DeviceInfo {
                    bdf: f.bdf().to_string(),
                    kind: f.kind().as_str().to_string(),
                    name: f.name().map(str::to_string),
                    parent,
                    physfn: fabric.physfn(f.bdf()).ok().flatten().map(|b| b.to_string()),
                    vendor: f.vendor(),
                    device: f.device(),
                    class: f.class(),
                    acs_cap: f.caps().acs.is_some(),
                    acs: acs
                        .map(|a| acs_names(a).into_iter().map(str::to_string).collect())
                        .unwrap_or_default(),
                    acs_known: true,
                    driver: None,
                    iommu_group: None,
                    command,
                    power: fabric
                        .power_state(f.bdf())
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    present: fabric.is_present(f.bdf()).unwrap_or(false),
                    flr: f.has_flr(),
                    af_flr: f.has_af_flr(),
                    bars,
                    bridge,
                    vfs: fabric
                        .virtfns(f.bdf())
                        .unwrap_or_default()
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                }
            })
            .collect();
        Topology {
            platform,
            host_bridges,
            devices,
        }
    }
}
