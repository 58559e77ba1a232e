//! The live platform: host bridges, functions, RAM, and the operations software and devices
//! perform on them (config reads and writes, resets, DMA, CPU access).
//!
//! A [`Fabric`] is `Send + Sync`: every function's registers sit behind their own lock, every
//! memory behind its own, so devices on several threads can DMA while another thread resets a
//! function.

use crate::sync::atomic::{AtomicU64, Ordering};
use std::collections::HashMap;

use crate::addr::{BusAddr, PhysAddr, Span};
use crate::bdf::Bdf;
use crate::config::{self, ConfigSpace};
use crate::error::PciError;
use crate::function::{Bar, FnId, Function, Parent, PowerState, ResetCause, decode};
use crate::memory::SparseMemory;
use crate::regs;
use crate::route::DmaFault;
use crate::spec::{Cpu, P2pForwarding, RamSpec, WindowSpec};
use crate::sync::{self, Arc, Mutex, RwLock};
use crate::translate::{AddressTranslator, Identity};

/// A root complex: a PCI domain's root bus and the CPU↔bus windows it decodes.
#[derive(Debug, Clone)]
pub struct HostBridge {
    pub(crate) name: String,
    pub(crate) domain: u16,
    pub(crate) bus: u8,
    pub(crate) p2p: P2pForwarding,
    pub(crate) p2p_explicit: bool,
    pub(crate) mmio: Vec<WindowSpec>,
    pub(crate) root_children: Vec<FnId>,
    pub(crate) root_function: Option<FnId>,
}

impl HostBridge {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// PCI domain.
    pub fn domain(&self) -> u16 {
        self.domain
    }
    /// Root bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }
    /// How it treats peer-to-peer requests between root ports.
    pub fn p2p(&self) -> P2pForwarding {
        self.p2p
    }
    /// Whether the fabric file set `p2p` (rather than it following the CPU/allowlist rule).
    pub fn p2p_explicit(&self) -> bool {
        self.p2p_explicit
    }
    /// MMIO windows.
    pub fn mmio(&self) -> &[WindowSpec] {
        &self.mmio
    }

    /// The CPU physical address at which a bus address of this root bus appears, if a window
    /// covers it.
    pub fn bus_to_cpu(&self, bus: BusAddr) -> Option<PhysAddr> {
        self.mmio.iter().find_map(|w| {
            let off = bus.get().checked_sub(w.bus)?;
            (off < w.size).then(|| PhysAddr(w.cpu + off))
        })
    }

    /// The bus address at which a CPU physical address appears on this root bus.
    pub fn cpu_to_bus(&self, cpu: PhysAddr) -> Option<BusAddr> {
        self.mmio.iter().find_map(|w| {
            let off = cpu.get().checked_sub(w.cpu)?;
            (off < w.size).then(|| BusAddr(w.bus + off))
        })
    }
}

/// Platform-wide facts.
#[derive(Debug, Clone)]
pub struct Platform {
    /// The boot CPU.
    pub cpu: Cpu,
    /// RAM ranges at CPU physical addresses.
    pub ram: Vec<RamSpec>,
}

/// Something that happened to the hardware, for observers in higher layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricEvent {
    /// A config write reached a function (after it took effect).
    ConfigWrite {
        /// The function.
        bdf: Bdf,
        /// Offset.
        offset: u16,
        /// 1, 2 or 4.
        size: usize,
        /// The value written.
        value: u32,
    },
    /// A function's registers went back to power-on values.
    Reset {
        /// The function.
        bdf: Bdf,
        /// Why.
        cause: ResetCause,
    },
    /// A function changed power state.
    PowerState {
        /// The function.
        bdf: Bdf,
        /// Before.
        from: PowerState,
        /// After.
        to: PowerState,
    },
    /// A device's DMA reached its target (one event per contiguous segment).
    DmaLanded {
        /// The device that issued it.
        requester: Bdf,
        /// The address the segment was issued at (before any IOMMU translation).
        addr: u64,
        /// When the DMA started, on the fabric's clock ([`Fabric::tick`]): a mapping taken
        /// away at an earlier tick cannot have carried it legitimately.
        started: u64,
        /// Where the segment landed.
        target: crate::route::Target,
        /// Bytes.
        len: u64,
        /// A write (else a read).
        write: bool,
    },
    /// A device's INTx line changed as the interrupt controller sees it: its interrupt
    /// asserted (PCI Status' Interrupt bit) and not disabled by COMMAND's INTx-disable.
    Intx {
        /// The function.
        bdf: Bdf,
        /// The line is now asserted.
        asserted: bool,
    },
    /// A device sent an MSI (enabled in its MSI capability, bus mastering on).
    Msi {
        /// The function.
        bdf: Bdf,
        /// The vector.
        vector: u16,
    },
}

/// Receives [`FabricEvent`]s. Called after the event took effect, with no fabric lock held,
/// so an observer may read or write config space.
pub trait FabricObserver: Send + Sync {
    /// One event.
    fn event(&self, event: &FabricEvent);
}

/// A BAR as it is right now: its static facts and where its registers place it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarState {
    /// Type, size, index.
    pub bar: Bar,
    /// Bus address the registers hold.
    pub bus: BusAddr,
    /// CPU physical address, if a window of the host bridge covers the BAR.
    pub cpu: Option<PhysAddr>,
}

/// The registers of one function, kept to be written back later (`pci_save_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedConfig {
    bdf: Bdf,
    cfg: ConfigSpace,
}

/// How many faults the log keeps (older ones are dropped and counted).
pub const FAULT_LOG_CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct FaultLog {
    pub(crate) entries: std::collections::VecDeque<DmaFault>,
    pub(crate) dropped: u64,
}

/// The emulated platform.
pub struct Fabric {
    pub(crate) platform: Platform,
    pub(crate) host_bridges: Vec<HostBridge>,
    pub(crate) funcs: Vec<Function>,
    pub(crate) by_bdf: HashMap<Bdf, FnId>,
    pub(crate) by_name: HashMap<String, FnId>,
    pub(crate) ram: Mutex<SparseMemory>,
    pub(crate) translator: RwLock<Arc<dyn AddressTranslator>>,
    pub(crate) observers: RwLock<Vec<Arc<dyn FabricObserver>>>,
    clock: crate::sync::atomic::AtomicU64,
    pub(crate) observed: crate::sync::atomic::AtomicBool,
    pub(crate) faults: Mutex<FaultLog>,
    pub(crate) transactions: AtomicU64,
}

/// The INTx line as the interrupt controller sees it: Status' Interrupt bit, unless
/// COMMAND's INTx-disable is set.
fn intx_line(cfg: &crate::config::ConfigSpace) -> bool {
    cfg.read16(regs::STATUS) & STATUS_INTERRUPT != 0
        && cfg.read16(regs::COMMAND) & regs::COMMAND_INTX_DISABLE == 0
}

/// Sets the device's INTx level (`pci_set_irq`, which Status' Interrupt bit shows).
fn set_intx_level(cfg: &mut crate::config::ConfigSpace, high: bool) {
    let st = cfg.read16(regs::STATUS);
    let st = if high {
        st | STATUS_INTERRUPT
    } else {
        st & !STATUS_INTERRUPT
    };
    cfg.set16(regs::STATUS, st);
}

/// MSI Enable in the function's MSI capability.
fn msi_enabled(cfg: &crate::config::ConfigSpace) -> bool {
    cfg.find_cap(CAP_ID_MSI)
        .is_some_and(|at| cfg.read16(at + 2) & 1 != 0)
}

/// PCI Status' Interrupt bit.
const STATUS_INTERRUPT: u16 = 0x0008;
/// The MSI capability's ID.
const CAP_ID_MSI: u8 = 0x05;

impl Fabric {
    /// What a device model does after a store to its registers: an edu DMA transfer (the
    /// device's own DMA, routed like any other), an interrupt.
    pub(crate) fn run_model_effects(&self, work: Vec<(FnId, crate::model::Effect)>) {
        use crate::model::{DeviceModel, Effect};
        for (id, effect) in work {
            let f = &self.funcs[id];
            match effect {
                Effect::EduDma => {
                    let mem = &f.mem[0];
                    let t = DeviceModel::edu_transfer(&sync::lock(mem));
                    if let Some(t) = t {
                        let mut buf = vec![0u8; t.len];
                        if t.to_bus {
                            sync::lock(mem).read(t.buf_offset, &mut buf);
                            // A fault leaves nothing behind; edu does not report it.
                            let _ = self.dma_write(f.bdf, crate::DmaAddr(t.bus), &buf);
                        } else if self
                            .dma_read(f.bdf, crate::DmaAddr(t.bus), &mut buf)
                            .is_ok()
                        {
                            sync::lock(mem).write(t.buf_offset, &buf);
                        }
                    }
                    if DeviceModel::edu_dma_done(&mut sync::lock(mem)) {
                        self.device_interrupt(f, true);
                    }
                }
                Effect::NvmeFetch => self.nvme_fetch(f),
                Effect::Interrupt { raised } => self.device_interrupt(f, raised),
            }
        }
    }

    /// `nvme_process_sq`: the controller fetches each command between its admin submission
    /// queue's head and tail, from its memory buffer (BAR 2) when the queue lies in it, else by
    /// its own DMA read, routed like any other (Bus Master Enable, the IOMMU); the first fetch
    /// that fails makes it fatal and stops the queue.
    fn nvme_fetch(&self, f: &Function) {
        use crate::model::{DeviceModel, NvmeFetch};
        let mut cmd = [0u8; 64];
        // Each successful fetch moves the head one entry on, so this ends within the
        // queue's size.
        loop {
            // The lock is let go at the end of this statement: the DMA below may land in
            // this function's own BARs.
            let next = DeviceModel::nvme_next_fetch(&sync::lock(&f.mem[0]));
            let Some(at) = next else { break };
            let ok = match at {
                NvmeFetch::Cmb(offset) => {
                    sync::lock(&f.mem[2]).read(offset, &mut cmd);
                    true
                }
                NvmeFetch::Dma(addr) => {
                    self.dma_read(f.bdf, crate::DmaAddr(addr), &mut cmd).is_ok()
                }
            };
            DeviceModel::nvme_fetched(&mut sync::lock(&f.mem[0]), ok);
            if !ok {
                break;
            }
        }
    }

    /// `edu_raise_irq` / `edu_lower_irq`: on a raise with the status not 0, an MSI when MSI
    /// is enabled (sent only with bus mastering on), else the INTx level up; on a lower
    /// that leaves the status 0 and MSI disabled, the level down.
    fn device_interrupt(&self, f: &Function, raised: bool) {
        let Some(model) = f.model else { return };
        let pending = model.irq_pending(&sync::lock(&f.mem[0]));
        let mut events = Vec::new();
        {
            let mut cfg = sync::write(&f.cfg);
            let msi = msi_enabled(&cfg);
            let before = intx_line(&cfg);
            if raised && pending {
                if msi {
                    if cfg.read16(regs::COMMAND) & regs::COMMAND_MASTER != 0 {
                        events.push(FabricEvent::Msi {
                            bdf: f.bdf,
                            vector: 0,
                        });
                    }
                } else {
                    set_intx_level(&mut cfg, true);
                }
            } else if !raised && !pending && !msi {
                set_intx_level(&mut cfg, false);
            }
            let after = intx_line(&cfg);
            if after != before {
                events.push(FabricEvent::Intx {
                    bdf: f.bdf,
                    asserted: after,
                });
            }
        }
        self.notify(&events);
    }
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric")
            .field("host_bridges", &self.host_bridges.len())
            .field("functions", &self.funcs.len())
            .finish_non_exhaustive()
    }
}

impl Fabric {
    pub(crate) fn assemble(
        platform: Platform,
        host_bridges: Vec<HostBridge>,
        funcs: Vec<Function>,
    ) -> Fabric {
        let by_bdf = funcs.iter().map(|f| (f.bdf, f.id)).collect();
        let by_name = funcs
            .iter()
            .filter_map(|f| Some((f.name.clone()?, f.id)))
            .collect();
        Fabric {
            platform,
            host_bridges,
            funcs,
            by_bdf,
            by_name,
            ram: Mutex::new(SparseMemory::new()),
            translator: RwLock::new(Arc::new(Identity)),
            observers: RwLock::new(Vec::new()),
            clock: crate::sync::atomic::AtomicU64::new(1),
            observed: crate::sync::atomic::AtomicBool::new(false),
            faults: Mutex::new(FaultLog::default()),
            transactions: AtomicU64::new(0),
        }
    }

    /// CPU and RAM.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The root complexes, in file order.
    pub fn host_bridges(&self) -> &[HostBridge] {
        &self.host_bridges
    }

    /// Every function (VFs included), in build order.
    pub fn functions(&self) -> impl Iterator<Item = &Function> {
        self.funcs.iter()
    }

    /// The function at `bdf`.
    pub fn function(&self, bdf: Bdf) -> Result<&Function, PciError> {
        self.by_bdf
            .get(&bdf)
            .map(|&i| &self.funcs[i])
            .ok_or(PciError::NoDevice(bdf))
    }

    /// Finds a function by its name from the fabric file or by its address (`gpu0`,
    /// `0000:03:00.0`, `03:00.0`).
    pub fn lookup(&self, name_or_bdf: &str) -> Result<Bdf, PciError> {
        if let Some(&i) = self.by_name.get(name_or_bdf) {
            return Ok(self.funcs[i].bdf);
        }
        match name_or_bdf.parse::<Bdf>() {
            Ok(b) if self.by_bdf.contains_key(&b) => Ok(b),
            _ => Err(PciError::UnknownName(name_or_bdf.to_string())),
        }
    }

    pub(crate) fn id(&self, bdf: Bdf) -> Result<FnId, PciError> {
        self.by_bdf
            .get(&bdf)
            .copied()
            .ok_or(PciError::NoDevice(bdf))
    }

    /// The bridge above a function (for a VF: the bridge above its PF), or `None` on a root
    /// bus. This is the kernel's `pci_upstream_bridge`.
    pub fn upstream_bridge(&self, bdf: Bdf) -> Result<Option<Bdf>, PciError> {
        let f = self.function(bdf)?;
        Ok(match f.parent {
            Parent::Bridge(b) => Some(self.funcs[b].bdf),
            Parent::HostBridge(_) => None,
        })
    }

    /// The host bridge a function sits under.
    pub fn host_bridge_of(&self, bdf: Bdf) -> Result<&HostBridge, PciError> {
        Ok(&self.host_bridges[self.function(bdf)?.host_bridge])
    }

    /// The index (into [`Fabric::host_bridges`]) of the host bridge a function sits under.
    pub fn host_bridge_index(&self, bdf: Bdf) -> Result<usize, PciError> {
        Ok(self.function(bdf)?.host_bridge)
    }

    /// The functions on a bridge's secondary bus (VFs of those functions included), by
    /// address.
    pub fn children(&self, bridge: Bdf) -> Result<Vec<Bdf>, PciError> {
        let f = self.function(bridge)?;
        Ok(f.children.iter().map(|&c| self.funcs[c].bdf).collect())
    }

    /// The functions on a host bridge's root bus.
    pub fn root_bus_functions(&self, host_bridge: usize) -> Vec<Bdf> {
        self.host_bridges
            .get(host_bridge)
            .map(|h| h.root_children.iter().map(|&c| self.funcs[c].bdf).collect())
            .unwrap_or_default()
    }

    /// The PF of a VF.
    pub fn physfn(&self, bdf: Bdf) -> Result<Option<Bdf>, PciError> {
        Ok(self.function(bdf)?.pf.map(|p| self.funcs[p].bdf))
    }

    /// The VFs of a PF, in VF-index order.
    pub fn virtfns(&self, bdf: Bdf) -> Result<Vec<Bdf>, PciError> {
        Ok(self
            .function(bdf)?
            .vfs
            .iter()
            .map(|&v| self.funcs[v].bdf)
            .collect())
    }

    /// The host bridge's root-bus function that Linux consults for the P2P allowlist: the
    /// first function on the root bus, accepted if it is devfn 00.0 or a root port.
    pub fn root_bus_function(&self, host_bridge: usize) -> Option<Bdf> {
        self.host_bridges
            .get(host_bridge)?
            .root_function
            .map(|i| self.funcs[i].bdf)
    }

    // ----- config space -----------------------------------------------------------------

    /// Whether a function answers right now (VFs only while their PF enables them).
    pub fn is_present(&self, bdf: Bdf) -> Result<bool, PciError> {
        let f = self.function(bdf)?;
        Ok(self.present(f))
    }

    pub(crate) fn present(&self, f: &Function) -> bool {
        let Some(pf) = f.pf else { return true };
        let pf = &self.funcs[pf];
        let cfg = sync::read(&pf.cfg);
        decode::sriov(&cfg, &pf.caps).is_some_and(|s| s.enabled && f.vf_index < s.num_vfs)
    }

    /// A config read of 1, 2 or 4 bytes.
    pub fn config_read(&self, bdf: Bdf, offset: u16, size: usize) -> Result<u32, PciError> {
        let f = self.function(bdf)?;
        config::check_access(offset, size).map_err(|err| PciError::Config { bdf, err })?;
        if !self.present(f) {
            return Err(PciError::NotPresent(bdf));
        }
        Ok(sync::read(&f.cfg).read(offset, size))
    }

    /// `buf.len()` bytes of config space from `offset`, read under one lock: what a
    /// 1-byte [`Fabric::config_read`] of each would give.
    pub fn config_read_into(&self, bdf: Bdf, offset: u16, buf: &mut [u8]) -> Result<(), PciError> {
        let f = self.function(bdf)?;
        for at in [
            usize::from(offset),
            usize::from(offset) + buf.len().saturating_sub(1),
        ] {
            let at = u16::try_from(at).unwrap_or(u16::MAX);
            config::check_access(at, 1).map_err(|err| PciError::Config { bdf, err })?;
        }
        if !self.present(f) {
            return Err(PciError::NotPresent(bdf));
        }
        let cfg = sync::read(&f.cfg);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = cfg.read(offset + i as u16, 1) as u8;
        }
        Ok(())
    }

    /// A config write of 1, 2 or 4 bytes: read-only bits stay, and the write's side effects
    /// happen (FLR, power-state change, secondary bus reset, SR-IOV enable). Observers hear
    /// of it afterwards.
    pub fn config_write(
        &self,
        bdf: Bdf,
        offset: u16,
        size: usize,
        value: u32,
    ) -> Result<(), PciError> {
        let f = self.function(bdf)?;
        config::check_access(offset, size).map_err(|err| PciError::Config { bdf, err })?;
        if !self.present(f) {
            return Err(PciError::NotPresent(bdf));
        }
        let (fx, line) = {
            let mut cfg = sync::write(&f.cfg);
            let before = intx_line(&cfg);
            let msi_before = msi_enabled(&cfg);
            let fx = f.apply_write(&mut cfg, offset, size, value);
            // Enabling MSI takes the INTx line down (QEMU's `msi_write_config`).
            if msi_enabled(&cfg) && !msi_before {
                set_intx_level(&mut cfg, false);
            }
            let after = intx_line(&cfg);
            (fx, (before != after).then_some(after))
        };
        let mut events = vec![FabricEvent::ConfigWrite {
            bdf,
            offset,
            size,
            value,
        }];
        if let Some(asserted) = line {
            events.push(FabricEvent::Intx { bdf, asserted });
        }
        if let Some((from, to)) = fx.power {
            events.push(FabricEvent::PowerState { bdf, from, to });
        }
        if let Some(cause) = fx.reset {
            f.reset_registers();
            events.push(FabricEvent::Reset { bdf, cause });
            for &vf in &f.vfs {
                self.reset_one(vf, ResetCause::PfReset { pf: bdf }, &mut events);
            }
        }
        if fx.secondary_bus_reset {
            let mut below = Vec::new();
            self.collect_below(f.id, &mut below);
            for id in below {
                self.reset_one(id, ResetCause::SecondaryBus { bridge: bdf }, &mut events);
            }
        }
        self.notify(&events);
        Ok(())
    }

    fn reset_one(&self, id: FnId, cause: ResetCause, events: &mut Vec<FabricEvent>) {
        let f = &self.funcs[id];
        {
            let mut cfg = sync::write(&f.cfg);
            f.reset_config(&mut cfg);
        }
        f.reset_registers();
        events.push(FabricEvent::Reset { bdf: f.bdf, cause });
    }

    /// Every function below a bridge (its subtree, VFs included), depth first.
    fn collect_below(&self, id: FnId, out: &mut Vec<FnId>) {
        for &c in &self.funcs[id].children {
            out.push(c);
            self.collect_below(c, out);
        }
    }

    /// Resets a function as `pci_reset_function` does: save its registers, FLR (PCIe, else
    /// AF), restore them. `Ok(false)` when the function has no FLR (nothing happens).
    pub fn reset_function(&self, bdf: Bdf) -> Result<bool, PciError> {
        if self.function(bdf)?.has_flr() || self.function(bdf)?.has_af_flr() {
            let saved = self.save_config(bdf)?;
            self.flr(bdf)?;
            self.restore_config(&saved)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// An FLR (PCIe, else AF) and nothing else: the registers are left as the reset made
    /// them (`pcie_flr` / `pci_af_flr` without the caller's save and restore). `Ok(false)`
    /// when the function has no FLR.
    pub fn flr(&self, bdf: Bdf) -> Result<bool, PciError> {
        let f = self.function(bdf)?;
        let trigger = if let (true, Some(exp)) = (f.has_flr(), f.caps.exp) {
            (
                exp + regs::EXP_DEVCTL,
                2,
                u32::from(regs::EXP_DEVCTL_BCR_FLR),
            )
        } else if let (true, Some(af)) = (f.has_af_flr(), f.caps.af) {
            (af + regs::AF_CTRL, 1, u32::from(regs::AF_CTRL_FLR))
        } else {
            return Ok(false);
        };
        let current = self.config_read(bdf, trigger.0 & !1, 2)?;
        let value = if trigger.1 == 2 {
            current | trigger.2
        } else {
            trigger.2
        };
        self.config_write(bdf, trigger.0, trigger.1, value)?;
        Ok(true)
    }

    /// Copies a function's registers (`pci_save_state`).
    pub fn save_config(&self, bdf: Bdf) -> Result<SavedConfig, PciError> {
        let f = self.function(bdf)?;
        if !self.present(f) {
            return Err(PciError::NotPresent(bdf));
        }
        Ok(SavedConfig {
            bdf,
            cfg: sync::read(&f.cfg).clone(),
        })
    }

    /// Writes saved registers back (`pci_restore_state`): every writable bit except the
    /// power state and the reset triggers, in one step, without side effects.
    pub fn restore_config(&self, saved: &SavedConfig) -> Result<(), PciError> {
        let f = self.function(saved.bdf)?;
        let mut cfg = sync::write(&f.cfg);
        let keep_power = f.caps.pm.map(|pm| cfg.read16(pm + regs::PM_CTRL));
        let keep_bctl = cfg.read16(regs::BRIDGE_CONTROL) & regs::BRIDGE_CTL_BUS_RESET;
        for off in 0..regs::CFG_SIZE as u16 {
            let w = cfg.wmask(off, 1);
            if w != 0 {
                let cur = cfg.read8(off);
                let want = saved.cfg.read8(off);
                cfg.set8(off, (cur & !(w as u8)) | (want & w as u8));
            }
        }
        if let (Some(pm), Some(p)) = (f.caps.pm, keep_power) {
            cfg.set16(pm + regs::PM_CTRL, p);
        }
        if f.kind.is_bridge() {
            let b = cfg.read16(regs::BRIDGE_CONTROL) & !regs::BRIDGE_CTL_BUS_RESET;
            cfg.set16(regs::BRIDGE_CONTROL, b | keep_bctl);
        }
        Ok(())
    }

    /// The COMMAND register.
    pub fn command(&self, bdf: Bdf) -> Result<u16, PciError> {
        let f = self.function(bdf)?;
        Ok(decode::command(&sync::read(&f.cfg)))
    }

    /// Sets or clears bits of COMMAND through a config write.
    pub fn set_command_bits(&self, bdf: Bdf, bits: u16, on: bool) -> Result<(), PciError> {
        let cur = self.config_read(bdf, regs::COMMAND, 2)? as u16;
        let new = if on { cur | bits } else { cur & !bits };
        self.config_write(bdf, regs::COMMAND, 2, new.into())
    }

    /// The power state (a VF follows its PF).
    pub fn power_state(&self, bdf: Bdf) -> Result<PowerState, PciError> {
        let f = self.function(bdf)?;
        let owner = f.pf.map_or(f, |p| &self.funcs[p]);
        Ok(decode::power_state(&sync::read(&owner.cfg), &owner.caps))
    }

    /// Moves a function to a power state through a PMCSR write (no-op without PM).
    pub fn set_power_state(&self, bdf: Bdf, state: PowerState) -> Result<(), PciError> {
        let f = self.function(bdf)?;
        let Some(pm) = f.caps.pm else { return Ok(()) };
        let cur = self.config_read(bdf, pm + regs::PM_CTRL, 2)? as u16;
        let new = (cur & !regs::PM_CTRL_STATE_MASK) | state.bits();
        self.config_write(bdf, pm + regs::PM_CTRL, 2, new.into())
    }

    /// The ACS control bits, if the function has ACS.
    pub fn acs_ctrl(&self, bdf: Bdf) -> Result<Option<u16>, PciError> {
        let f = self.function(bdf)?;
        Ok(decode::acs_ctrl(&sync::read(&f.cfg), &f.caps))
    }

    /// Sets the ACS control bits through a config write. `Ok(false)` when the function has no
    /// ACS capability (nothing happens).
    pub fn set_acs_ctrl(&self, bdf: Bdf, bits: u16) -> Result<bool, PciError> {
        let f = self.function(bdf)?;
        let Some(acs) = f.caps.acs else {
            return Ok(false);
        };
        self.config_write(bdf, acs + regs::ACS_CTRL, 2, bits.into())?;
        Ok(true)
    }

    /// A bridge's windows as its registers hold them.
    pub fn bridge_windows(&self, bdf: Bdf) -> Result<Option<decode::Windows>, PciError> {
        let f = self.function(bdf)?;
        Ok(f.kind
            .is_bridge()
            .then(|| decode::windows(&sync::read(&f.cfg))))
    }

    /// A bridge's (primary, secondary, subordinate) bus numbers.
    pub fn bridge_buses(&self, bdf: Bdf) -> Result<Option<(u8, u8, u8)>, PciError> {
        let f = self.function(bdf)?;
        Ok(f.kind.is_bridge().then(|| {
            let c = sync::read(&f.cfg);
            (
                c.read8(regs::PRIMARY_BUS),
                c.read8(regs::SECONDARY_BUS),
                c.read8(regs::SUBORDINATE_BUS),
            )
        }))
    }

    /// Where a BAR is now (bus address from its registers; for a VF, from its PF's SR-IOV
    /// capability).
    pub fn bar(&self, bdf: Bdf, index: u8) -> Result<BarState, PciError> {
        let f = self.function(bdf)?;
        let bar = *f.bar(index).ok_or(PciError::NoBar { bdf, bar: index })?;
        let bus = self.bar_bus_addr(f, &bar);
        let cpu = self.host_bridges[f.host_bridge]
            .bus_to_cpu(BusAddr(bus))
            .filter(|_| bar.kind.is_mem());
        let cpu = if bar.kind.is_mem() {
            cpu
        } else {
            Some(PhysAddr(bus))
        };
        Ok(BarState {
            bar,
            bus: BusAddr(bus),
            cpu,
        })
    }

    /// Every implemented BAR of a function, now.
    pub fn bar_states(&self, bdf: Bdf) -> Result<Vec<BarState>, PciError> {
        let f = self.function(bdf)?;
        f.bars().map(|b| self.bar(bdf, b.index)).collect()
    }

    pub(crate) fn bar_bus_addr(&self, f: &Function, bar: &Bar) -> u64 {
        match f.pf {
            None => decode::bar_addr(&sync::read(&f.cfg), regs::BASE_ADDRESS_0, bar),
            Some(pf) => {
                let pf = &self.funcs[pf];
                let base = pf.caps.sriov.map_or(0, |s| {
                    decode::bar_addr(&sync::read(&pf.cfg), s + regs::SRIOV_BAR, bar)
                });
                base.wrapping_add(u64::from(f.vf_index).wrapping_mul(bar.size))
            }
        }
    }

    pub(crate) fn bar_span(&self, f: &Function, bar: &Bar) -> Option<Span> {
        Span::new(self.bar_bus_addr(f, bar), bar.size).ok()
    }

    // ----- memory behind BARs and RAM (device-side view, no routing) ----------------------

    fn bar_mem(
        &self,
        bdf: Bdf,
        index: u8,
        offset: u64,
        len: u64,
    ) -> Result<&Mutex<SparseMemory>, PciError> {
        let f = self.function(bdf)?;
        let bar = f.bar(index).ok_or(PciError::NoBar { bdf, bar: index })?;
        let end = offset.checked_add(len).ok_or(PciError::OutsideBar {
            bdf,
            bar: index,
            offset,
            len,
            size: bar.size,
        })?;
        if end > bar.size {
            return Err(PciError::OutsideBar {
                bdf,
                bar: index,
                offset,
                len,
                size: bar.size,
            });
        }
        Ok(&f.mem[usize::from(index)])
    }

    /// Reads what a BAR holds, as the device sees its own memory (no routing, no checks of
    /// COMMAND or power: this is how tests look at what landed).
    pub fn bar_peek(
        &self,
        bdf: Bdf,
        index: u8,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), PciError> {
        let m = self.bar_mem(bdf, index, offset, buf.len() as u64)?;
        sync::lock(m).read(offset, buf);
        Ok(())
    }

    /// Writes into a BAR's memory from the device side.
    pub fn bar_poke(&self, bdf: Bdf, index: u8, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let m = self.bar_mem(bdf, index, offset, data.len() as u64)?;
        sync::lock(m).write(offset, data);
        Ok(())
    }

    /// How many 4 KiB pages of a BAR's memory exist.
    pub fn bar_resident_pages(&self, bdf: Bdf, index: u8) -> Result<usize, PciError> {
        let m = self.bar_mem(bdf, index, 0, 0)?;
        Ok(sync::lock(m).pages())
    }

    /// Reads RAM directly (no routing).
    pub fn ram_peek(&self, addr: PhysAddr, buf: &mut [u8]) -> Result<(), PciError> {
        self.check_ram(addr, buf.len() as u64)?;
        sync::lock(&self.ram).read(addr.get(), buf);
        Ok(())
    }

    /// Writes RAM directly (no routing).
    pub fn ram_poke(&self, addr: PhysAddr, data: &[u8]) -> Result<(), PciError> {
        self.check_ram(addr, data.len() as u64)?;
        sync::lock(&self.ram).write(addr.get(), data);
        Ok(())
    }

    fn check_ram(&self, addr: PhysAddr, len: u64) -> Result<(), PciError> {
        let span = Span::new(addr.get(), len.max(1))?;
        let inside = self.platform.ram.iter().any(|r| {
            Span {
                start: r.cpu,
                len: r.size,
            }
            .contains_span(&span)
        });
        if inside {
            Ok(())
        } else {
            Err(PciError::UnknownName(format!("RAM at {addr} (+{len:#x})")))
        }
    }

    /// How many 4 KiB pages of RAM exist.
    pub fn ram_resident_pages(&self) -> usize {
        sync::lock(&self.ram).pages()
    }

    // ----- hooks --------------------------------------------------------------------------

    /// Replaces the root complex's address translation (identity by default; an IOMMU
    /// model plugs in here).
    pub fn set_translator(&self, t: Arc<dyn AddressTranslator>) {
        *sync::write(&self.translator) = t;
    }

    /// The fabric's clock: a strictly increasing number, taken when each device DMA starts
    /// and by anyone who needs to order an event against DMAs (the revocation watch stamps a
    /// finished revoke with it).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// The tick a device DMA starts at: taken only when observers listen (0 otherwise, and
    /// nobody reads it), so an unobserved DMA pays one atomic load.
    pub(crate) fn dma_start_tick(&self) -> u64 {
        if self.observed.load(Ordering::Acquire) {
            self.tick()
        } else {
            0
        }
    }

    /// Registers an observer of config writes, resets and power changes.
    pub fn subscribe(&self, o: Arc<dyn FabricObserver>) {
        sync::write(&self.observers).push(o);
        self.observed
            .store(true, crate::sync::atomic::Ordering::Release);
    }

    /// Tells observers where a completed DMA landed (nothing to do without observers).
    pub(crate) fn notify_dma(
        &self,
        requester: Bdf,
        t: &crate::route::Transfer,
        write: bool,
        started: u64,
    ) {
        if !self.observed.load(crate::sync::atomic::Ordering::Acquire) {
            return;
        }
        let events: Vec<FabricEvent> = t
            .segments
            .iter()
            .map(|s| FabricEvent::DmaLanded {
                requester,
                addr: s.addr,
                started,
                target: s.target,
                len: s.len,
                write,
            })
            .collect();
        self.notify(&events);
    }

    fn notify(&self, events: &[FabricEvent]) {
        let observers = sync::read(&self.observers).clone();
        for ev in events {
            tracing::trace!(target: "peerdma::pci", ?ev, "fabric event");
            for o in &observers {
                o.event(ev);
            }
        }
    }

    /// A copy of the fault log (oldest first).
    pub fn faults(&self) -> Vec<DmaFault> {
        sync::lock(&self.faults).entries.iter().cloned().collect()
    }

    /// Empties the fault log and returns what it held.
    pub fn take_faults(&self) -> Vec<DmaFault> {
        let mut log = sync::lock(&self.faults);
        log.dropped = 0;
        log.entries.drain(..).collect()
    }

    /// Faults dropped because the log was full.
    pub fn faults_dropped(&self) -> u64 {
        sync::lock(&self.faults).dropped
    }

    pub(crate) fn log_fault(&self, fault: &DmaFault) {
        tracing::debug!(target: "peerdma::dma", %fault, "DMA fault");
        let mut log = sync::lock(&self.faults);
        if log.entries.len() == FAULT_LOG_CAPACITY {
            log.entries.pop_front();
            log.dropped += 1;
        }
        log.entries.push_back(fault.clone());
    }

    /// Memory transactions routed so far (each contiguous segment of a DMA counts once).
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }
}
