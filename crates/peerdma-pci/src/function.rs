//! One PCI function: its identity, its place in the tree, its BARs, its register file and
//! what writes to that register file do (FLR, power-state changes, secondary bus reset).
//!
//! Routing never trusts a cached copy of a BAR address or a bridge window: it decodes the
//! registers ([`decode`]) so that whatever software writes is what the hardware does.

use crate::bdf::Bdf;
use crate::config::ConfigSpace;
use crate::memory::SparseMemory;
use crate::regs;
use crate::spec::{BarType, DeviceKind};
use crate::sync::{Mutex, RwLock};

/// Index of a function inside its fabric.
pub(crate) type FnId = usize;

/// What a function hangs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parent {
    /// Directly on the root bus of this host bridge (index into the fabric's list).
    HostBridge(usize),
    /// On the secondary bus of this bridge.
    Bridge(FnId),
}

/// One implemented BAR (static facts: the address lives in the registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Index 0..=5 (a 64-bit BAR also uses `index + 1`).
    pub index: u8,
    /// Register type.
    pub kind: BarType,
    /// Prefetchable.
    pub prefetch: bool,
    /// Bytes (for a VF BAR in a PF's SR-IOV capability: one VF's share).
    pub size: u64,
}

impl Bar {
    /// The bits software may write in the low (or only) register: the address bits above
    /// the size. Writing all ones and reading back gives the size, as BAR sizing expects.
    pub(crate) fn wmask_lo(&self) -> u32 {
        let addr_bits = !(self.size - 1);
        match self.kind {
            BarType::Io => (addr_bits as u32) & !regs::BAR_IO_FLAGS_MASK,
            _ => (addr_bits as u32) & !regs::BAR_MEM_FLAGS_MASK,
        }
    }

    /// The writable bits of the upper register of a 64-bit BAR.
    pub(crate) fn wmask_hi(&self) -> u32 {
        (!(self.size - 1) >> 32) as u32
    }

    /// The read-only type bits of the low register.
    pub(crate) fn flag_bits(&self) -> u32 {
        match self.kind {
            BarType::Io => regs::BAR_SPACE_IO,
            BarType::Mem32 => {
                if self.prefetch {
                    regs::BAR_MEM_PREFETCH
                } else {
                    0
                }
            }
            BarType::Mem64 => {
                regs::BAR_MEM_TYPE_64
                    | if self.prefetch {
                        regs::BAR_MEM_PREFETCH
                    } else {
                        0
                    }
            }
        }
    }
}

/// PCI power states (the PMCSR field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PowerState {
    /// Fully on.
    D0,
    /// Light sleep (not implemented by the modelled devices).
    D1,
    /// Deeper sleep (not implemented by the modelled devices).
    D2,
    /// Software-visible off: config space answers, memory and I/O do not, no bus mastering.
    D3Hot,
}

impl PowerState {
    /// From the PMCSR state field.
    pub fn from_bits(bits: u16) -> PowerState {
        match bits & regs::PM_CTRL_STATE_MASK {
            0 => PowerState::D0,
            1 => PowerState::D1,
            2 => PowerState::D2,
            _ => PowerState::D3Hot,
        }
    }
    /// The PMCSR state field.
    pub fn bits(self) -> u16 {
        match self {
            PowerState::D0 => 0,
            PowerState::D1 => 1,
            PowerState::D2 => 2,
            PowerState::D3Hot => 3,
        }
    }
    /// `D0`, `D3hot`, as Linux prints them.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::D0 => "D0",
            PowerState::D1 => "D1",
            PowerState::D2 => "D2",
            PowerState::D3Hot => "D3hot",
        }
    }
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Offsets of the capabilities a function has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// Power Management.
    pub pm: Option<u16>,
    /// PCI Express.
    pub exp: Option<u16>,
    /// Advanced Features.
    pub af: Option<u16>,
    /// Access Control Services (extended).
    pub acs: Option<u16>,
    /// SR-IOV (extended).
    pub sriov: Option<u16>,
}

/// Why a function's registers went back to their power-on values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    /// PCIe Function Level Reset (DevCtl Initiate FLR).
    Flr,
    /// Advanced Features FLR.
    AfFlr,
    /// The bridge above (this one, or an ancestor) pulsed Secondary Bus Reset.
    SecondaryBus {
        /// The bridge that did it.
        bridge: Bdf,
    },
    /// D3hot → D0 with No_Soft_Reset clear.
    PowerOn,
    /// Its PF was reset (a VF's state goes with its PF's).
    PfReset {
        /// The PF.
        pf: Bdf,
    },
}

/// What a config write did besides changing bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WriteEffects {
    pub power: Option<(PowerState, PowerState)>,
    pub reset: Option<ResetCause>,
    pub secondary_bus_reset: bool,
}

/// A PCI function of the fabric.
pub struct Function {
    pub(crate) id: FnId,
    pub(crate) bdf: Bdf,
    pub(crate) kind: DeviceKind,
    pub(crate) name: Option<String>,
    pub(crate) vendor: u16,
    pub(crate) device: u16,
    pub(crate) class: u32,
    pub(crate) parent: Parent,
    pub(crate) children: Vec<FnId>,
    pub(crate) host_bridge: usize,
    pub(crate) pf: Option<FnId>,
    pub(crate) vf_index: u16,
    pub(crate) vfs: Vec<FnId>,
    pub(crate) bars: [Option<Bar>; 6],
    pub(crate) vf_bars: [Option<Bar>; 6],
    pub(crate) caps: Caps,
    pub(crate) no_soft_reset: bool,
    /// Power-on register values (what a reset restores).
    pub(crate) reset_image: ConfigSpace,
    /// The bytes a reset leaves alone ([`ConfigSpace::storage_ranges`] of the image).
    pub(crate) storage: Vec<(u16, u16)>,
    /// The live registers.
    pub(crate) cfg: RwLock<ConfigSpace>,
    /// Backing memory per BAR index (empty for unimplemented BARs).
    pub(crate) mem: [Mutex<SparseMemory>; 6],
    /// The register file behind a BAR that is not plain memory.
    pub(crate) model: Option<crate::model::DeviceModel>,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("bdf", &self.bdf)
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Function {
    /// Its address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    /// Its kind.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }
    /// Its name from the fabric file, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// Vendor ID (for a VF: its PF's vendor, though a VF's own register reads 0xffff).
    pub fn vendor(&self) -> u16 {
        self.vendor
    }
    /// Device ID (for a VF: the PF's VF Device ID).
    pub fn device(&self) -> u16 {
        self.device
    }
    /// 24-bit class code.
    pub fn class(&self) -> u32 {
        self.class
    }
    /// PMCSR's No_Soft_Reset: the function keeps its state through D3hot → D0 (without a PM
    /// capability there is no such transition, and this is true).
    pub fn no_soft_reset(&self) -> bool {
        self.no_soft_reset || self.caps.pm.is_none()
    }
    /// The register file behind a BAR that is not plain memory, if any.
    pub fn model(&self) -> Option<crate::model::DeviceModel> {
        self.model
    }
    /// Whether it is an SR-IOV virtual function.
    pub fn is_vf(&self) -> bool {
        self.pf.is_some()
    }
    /// The VF's index under its PF (0 for non-VFs).
    pub fn vf_index(&self) -> u16 {
        self.vf_index
    }
    /// Its implemented BARs (for a VF: its share of the PF's VF BARs).
    pub fn bars(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter().flatten()
    }
    /// One BAR by index.
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.get(usize::from(index)).and_then(Option::as_ref)
    }
    /// The per-VF BARs declared in a PF's SR-IOV capability.
    pub fn vf_bars(&self) -> impl Iterator<Item = &Bar> {
        self.vf_bars.iter().flatten()
    }
    /// Capability offsets.
    pub fn caps(&self) -> Caps {
        self.caps
    }
    /// PCIe FLR advertised in DevCap.
    pub fn has_flr(&self) -> bool {
        self.caps.exp.is_some_and(|e| {
            self.reset_image.read32(e + regs::EXP_DEVCAP) & regs::EXP_DEVCAP_FLR != 0
        })
    }
    /// Advanced Features FLR (needs both the FLR and TP capability bits).
    pub fn has_af_flr(&self) -> bool {
        self.caps.af.is_some_and(|a| {
            let cap = self.reset_image.read8(a + regs::AF_CAP);
            cap & (regs::AF_CAP_FLR | regs::AF_CAP_TP) == (regs::AF_CAP_FLR | regs::AF_CAP_TP)
        })
    }

    /// Applies a config write (already access-checked) and works out its side effects; the
    /// caller carries out resets of other functions.
    pub(crate) fn apply_write(
        &self,
        cfg: &mut ConfigSpace,
        off: u16,
        size: usize,
        value: u32,
    ) -> WriteEffects {
        let mut fx = WriteEffects::default();
        let power_before = decode::power_state(cfg, &self.caps);
        let bctl_before = cfg.read16(regs::BRIDGE_CONTROL);
        let sriov_ctrl_before = self.caps.sriov.map(|s| cfg.read16(s + regs::SRIOV_CTRL));
        let num_vfs_before = self.caps.sriov.map(|s| cfg.read16(s + regs::SRIOV_NUM_VF));

        cfg.write(off, size, value);

        if let Some(pm) = self.caps.pm {
            if written(off, size, value, pm + regs::PM_CTRL, 2).is_some() {
                let ctrl = cfg.read16(pm + regs::PM_CTRL);
                let wanted = PowerState::from_bits(ctrl);
                // D1/D2 are not supported (PMC says so): such a write leaves the state alone.
                if matches!(wanted, PowerState::D1 | PowerState::D2) {
                    cfg.set16(
                        pm + regs::PM_CTRL,
                        (ctrl & !regs::PM_CTRL_STATE_MASK) | power_before.bits(),
                    );
                }
                let after = decode::power_state(cfg, &self.caps);
                if after != power_before {
                    fx.power = Some((power_before, after));
                    if power_before == PowerState::D3Hot
                        && after == PowerState::D0
                        && !self.no_soft_reset
                    {
                        fx.reset = Some(ResetCause::PowerOn);
                    }
                }
            }
        }
        if let Some(exp) = self.caps.exp {
            if let Some(v) = written(off, size, value, exp + regs::EXP_DEVCTL, 2) {
                if v & u32::from(regs::EXP_DEVCTL_BCR_FLR) != 0 && self.has_flr() {
                    fx.reset = Some(ResetCause::Flr);
                }
            }
        }
        if let Some(af) = self.caps.af {
            if let Some(v) = written(off, size, value, af + regs::AF_CTRL, 1) {
                if v & u32::from(regs::AF_CTRL_FLR) != 0 && self.has_af_flr() {
                    fx.reset = Some(ResetCause::AfFlr);
                }
            }
        }
        if self.kind.is_bridge() {
            let after = cfg.read16(regs::BRIDGE_CONTROL);
            if after & regs::BRIDGE_CTL_BUS_RESET != 0
                && bctl_before & regs::BRIDGE_CTL_BUS_RESET == 0
            {
                fx.secondary_bus_reset = true;
            }
        }
        if let (Some(s), Some(ctrl_before), Some(num_before)) =
            (self.caps.sriov, sriov_ctrl_before, num_vfs_before)
        {
            // NumVFs is only writable while VF Enable is off, and never above TotalVFs.
            let total = cfg.read16(s + regs::SRIOV_TOTAL_VF);
            let num = cfg.read16(s + regs::SRIOV_NUM_VF);
            if num != num_before && (ctrl_before & regs::SRIOV_CTRL_VFE != 0 || num > total) {
                cfg.set16(s + regs::SRIOV_NUM_VF, num_before);
            }
        }
        if fx.reset.is_some() {
            self.reset_config(cfg);
        }
        fx
    }

    /// What a reset does to the device behind the config space: a device model's register
    /// file goes back to its reset values ([`crate::model::DeviceModel`]); plain BAR memory
    /// keeps its bytes.
    pub(crate) fn reset_registers(&self) {
        let Some(model) = self.model else { return };
        for (i, mem) in self.mem.iter().enumerate() {
            if model.owns(i as u8) {
                model.reset(&mut crate::sync::lock(mem));
            }
        }
    }

    /// Puts the registers back to their power-on values: the header and every capability;
    /// the device's own storage past them keeps what it holds.
    pub(crate) fn reset_config(&self, cfg: &mut ConfigSpace) {
        let mut fresh = self.reset_image.clone();
        for &(start, end) in &self.storage {
            for off in start..end {
                fresh.set8(off, cfg.read8(off));
            }
        }
        *cfg = fresh;
    }
}

/// If the access `[off, off+size)` touches the register `[reg, reg+len)`, the written bytes
/// shifted into register position (bytes not written read as zero).
pub(crate) fn written(off: u16, size: usize, value: u32, reg: u16, len: usize) -> Option<u32> {
    let (a0, a1) = (usize::from(off), usize::from(off) + size);
    let (r0, r1) = (usize::from(reg), usize::from(reg) + len);
    if a1 <= r0 || r1 <= a0 {
        return None;
    }
    let mut v = 0u32;
    for byte in a0.max(r0)..a1.min(r1) {
        let b = (value >> (8 * (byte - a0))) & 0xff;
        v |= b << (8 * (byte - r0));
    }
    Some(v)
}

/// Reading hardware state out of a register file.
pub mod decode {
    use super::{Bar, Caps, PowerState};
    use crate::addr::Span;
    use crate::config::ConfigSpace;
    use crate::regs;

    /// The COMMAND register.
    pub fn command(cfg: &ConfigSpace) -> u16 {
        cfg.read16(regs::COMMAND)
    }

    /// The power state (D0 when there is no PM capability).
    pub fn power_state(cfg: &ConfigSpace, caps: &Caps) -> PowerState {
        caps.pm.map_or(PowerState::D0, |pm| {
            PowerState::from_bits(cfg.read16(pm + regs::PM_CTRL))
        })
    }

    /// The ACS control register, if the function has ACS.
    pub fn acs_ctrl(cfg: &ConfigSpace, caps: &Caps) -> Option<u16> {
        caps.acs.map(|a| cfg.read16(a + regs::ACS_CTRL))
    }

    /// The bus address a BAR's register(s) hold (`reg_base` = 0x10 for a normal BAR, or the
    /// SR-IOV capability's VF BAR area).
    pub fn bar_addr(cfg: &ConfigSpace, reg_base: u16, bar: &Bar) -> u64 {
        let off = reg_base + 4 * u16::from(bar.index);
        let lo = cfg.read32(off);
        match bar.kind {
            super::BarType::Io => u64::from(lo & !regs::BAR_IO_FLAGS_MASK),
            super::BarType::Mem32 => u64::from(lo & !regs::BAR_MEM_FLAGS_MASK),
            super::BarType::Mem64 => {
                u64::from(lo & !regs::BAR_MEM_FLAGS_MASK) | (u64::from(cfg.read32(off + 4)) << 32)
            }
        }
    }

    /// The bus-address range a BAR decodes (`None` if it would wrap past 2^64).
    pub fn bar_span(cfg: &ConfigSpace, reg_base: u16, bar: &Bar) -> Option<Span> {
        Span::new(bar_addr(cfg, reg_base, bar), bar.size).ok()
    }

    /// A bridge's forwarding windows (type 1 header).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Windows {
        /// Non-prefetchable memory window (32-bit).
        pub mem: Option<Span>,
        /// Prefetchable memory window (64-bit capable).
        pub pref: Option<Span>,
        /// I/O window.
        pub io: Option<Span>,
    }

    fn window(base: u64, limit_inclusive: u64) -> Option<Span> {
        if base > limit_inclusive {
            None
        } else {
            Span::new(base, limit_inclusive - base + 1)
                .ok()
                .or(Some(Span {
                    start: base,
                    len: u64::MAX - base,
                }))
        }
    }

    /// Decodes the base/limit registers of a type 1 header.
    pub fn windows(cfg: &ConfigSpace) -> Windows {
        let mem_base = u64::from(cfg.read16(regs::MEMORY_BASE) & 0xfff0) << 16;
        let mem_limit = (u64::from(cfg.read16(regs::MEMORY_LIMIT) & 0xfff0) << 16) | 0xf_ffff;
        let pb = cfg.read16(regs::PREF_MEMORY_BASE);
        let pl = cfg.read16(regs::PREF_MEMORY_LIMIT);
        let mut pref_base = u64::from(pb & 0xfff0) << 16;
        let mut pref_limit = (u64::from(pl & 0xfff0) << 16) | 0xf_ffff;
        if pb & regs::PREF_RANGE_TYPE_64 != 0 {
            pref_base |= u64::from(cfg.read32(regs::PREF_BASE_UPPER32)) << 32;
            pref_limit |= u64::from(cfg.read32(regs::PREF_LIMIT_UPPER32)) << 32;
        }
        let io_base = (u64::from(cfg.read8(regs::IO_BASE) & 0xf0) << 8)
            | (u64::from(cfg.read16(regs::IO_BASE_UPPER16)) << 16);
        let io_limit = (u64::from(cfg.read8(regs::IO_LIMIT) & 0xf0) << 8)
            | (u64::from(cfg.read16(regs::IO_LIMIT_UPPER16)) << 16)
            | 0xfff;
        Windows {
            mem: window(mem_base, mem_limit),
            pref: window(pref_base, pref_limit),
            io: window(io_base, io_limit),
        }
    }

    /// The SR-IOV control state of a PF.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Sriov {
        /// VF Enable.
        pub enabled: bool,
        /// VF Memory Space Enable.
        pub mse: bool,
        /// NumVFs.
        pub num_vfs: u16,
    }

    /// Reads the SR-IOV control registers.
    pub fn sriov(cfg: &ConfigSpace, caps: &Caps) -> Option<Sriov> {
        caps.sriov.map(|s| {
            let ctrl = cfg.read16(s + regs::SRIOV_CTRL);
            Sriov {
                enabled: ctrl & regs::SRIOV_CTRL_VFE != 0,
                mse: ctrl & regs::SRIOV_CTRL_MSE != 0,
                num_vfs: cfg.read16(s + regs::SRIOV_NUM_VF),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Span;

    #[test]
    fn written_extracts_the_overlap() {
        assert_eq!(written(0x04, 2, 0x0006, 0x04, 2), Some(0x0006));
        assert_eq!(written(0x04, 4, 0xabcd_0006, 0x06, 2), Some(0xabcd));
        assert_eq!(written(0x06, 1, 0x80, 0x04, 4), Some(0x0080_0000));
        assert_eq!(written(0x08, 4, 0xffff_ffff, 0x04, 2), None);
    }

    #[test]
    fn bar_masks_give_the_size_back() {
        let b = Bar {
            index: 0,
            kind: BarType::Mem32,
            prefetch: false,
            size: 16 << 20,
        };
        assert_eq!(!(b.wmask_lo() & !0xf) + 1, 16 << 20);
        let b = Bar {
            index: 2,
            kind: BarType::Mem64,
            prefetch: true,
            size: 64 << 30,
        };
        let full = (u64::from(b.wmask_hi()) << 32) | u64::from(b.wmask_lo());
        assert_eq!(!(full & !0xf) + 1, 64 << 30);
        assert_eq!(b.flag_bits(), 0xc);
        let io = Bar {
            index: 4,
            kind: BarType::Io,
            prefetch: false,
            size: 256,
        };
        assert_eq!(io.wmask_lo(), 0xffff_ff00);
        assert_eq!(io.flag_bits(), 1);
    }

    #[test]
    fn closed_bridge_window_decodes_as_none() {
        let mut c = ConfigSpace::new();
        c.set16(regs::MEMORY_BASE, 0xfff0);
        c.set16(regs::MEMORY_LIMIT, 0x0000);
        c.set16(regs::PREF_MEMORY_BASE, 0x0001);
        c.set16(regs::PREF_MEMORY_LIMIT, 0x0001);
        c.set32(regs::PREF_BASE_UPPER32, 0x80);
        c.set32(regs::PREF_LIMIT_UPPER32, 0x80);
        let w = decode::windows(&c);
        assert_eq!(w.mem, None);
        assert_eq!(
            w.pref,
            Some(Span {
                start: 0x80_0000_0000,
                len: 1 << 20
            })
        );
    }

    #[test]
    fn functions_are_shareable_between_threads() {
        fn is<T: Send + Sync>() {}
        is::<Function>();
    }

    #[test]
    fn power_states() {
        assert_eq!(PowerState::from_bits(3), PowerState::D3Hot);
        assert_eq!(PowerState::D3Hot.to_string(), "D3hot");
        assert!(PowerState::D3Hot > PowerState::D0);
    }
}
