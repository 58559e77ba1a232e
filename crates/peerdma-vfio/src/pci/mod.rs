//! A vfio-pci device on the emulated machine: open/close, the user's config writes that
//! reach the device, `VFIO_DEVICE_RESET`, runtime-PM low-power entry/exit, `memory_lock`, and
//! the `VFIO_DEVICE_FEATURE_DMA_BUF` export whose buffers are revoked whenever the device
//! stops decoding memory (Linux 7.2 semantics; rulebook §4.3–§4.8).
//!
//! Split as the kernel splits it: this file is the core (vfio_pci_core.c: the device,
//! open/close, `VFIO_DEVICE_RESET`, hot reset, `memory_lock`); `config_access` holds the
//! config-space handlers (vfio_pci_config.c), `dmabuf` the exporter, the export and the
//! revoke walk (vfio_pci_dmabuf.c), `power` runtime low power (vfio_pci_core.c's PM
//! features).
//!
//! # Locking
//!
//! In the order they may be taken (checked in debug builds by
//! [`peerdma_pci::sync::order`]):
//!
//! 1. `memory_lock` (`Dev::mem`, write side through `MemGuard`): config writes that touch
//!    COMMAND, PMCSR or the FLR bits, resets, hot reset (try-locked per device), low power,
//!    export (to link the buffer), close, and a buffer's release (to unlink it); it guards
//!    the device's list of buffers. While it is held, file references are only collected
//!    and put after it is dropped, since a last reference runs the release, which takes it
//!    again. A revoke walks the list without taking file references: unlike Linux's
//!    `get_file_active`, it also reaches a buffer whose release has begun and waits for this
//!    lock to unlink it (docs/divergences.md).
//! 2. A dma-buf's reservation lock, one at a time: revocation flips the flag and invalidates
//!    under it (the importers' callbacks run under it), `map`/`unmap` need it, and every
//!    importer decides under it whether its attachment is still registered and whether the
//!    buffer is revoked before it maps ([`crate::rdma`], [`crate::iommufd`]).
//! 3. Leaves, never held while blocking on 1 or 2: a buffer's file, device and registration
//!    slots, the lock of the condition variable the revoke waits on for the unmaps (waited on with `memory_lock` held and the reservation
//!    lock dropped), importer state, the watch's ledger.
//!
//! A revoke waits for every importer mapping to be given back while holding `memory_lock`,
//! as the kernel does: an importer that never unmaps hangs it (the soak's watchdog names such
//! a thread and the mappings it waits for; the wait logs the same every 10 s).

use peerdma_pci::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU16, AtomicU64, AtomicUsize, Ordering,
};
use peerdma_pci::sync::{Arc, Condvar, Mutex, RwLock, RwLockWriteGuard, Weak};
use std::time::Duration;

use peerdma_dma::Direction;
use peerdma_dmabuf::buf::{ExportInfo, ops};
use peerdma_dmabuf::sgt::{DmaEnv, PhysVec, SgTable, free_sgt, phys_vec_to_sgt};
use peerdma_dmabuf::{Attachment, DmaBuf, DmaBufOps, File, Process, ResvGuard, Usage};
use peerdma_p2pdma::{Binding, Provider};
use peerdma_pci::sync::order::{self, Level};
use peerdma_pci::{
    AsErrno, Bdf, DeviceKind, Errno, Fabric, FabricEvent, FabricObserver, PhysAddr, PowerState,
    regs, sync,
};
use peerdma_uapi::feature::{DMA_BUF_LEN, O_CLOEXEC, parse_dma_buf, parse_range};

use crate::config::{self as vcfg, Owner, VConfig};
use crate::feature::{self, GET, SET, id};
use crate::registration::{RegRef, Registration};
use crate::watch::{BufWatch, Ledger, Piece, Violation, target_phys};

mod config_access;
mod dmabuf;
mod irqs;
mod power;
mod rdwr;

use dmabuf::Linked;
pub use dmabuf::iommufd_map;
pub(crate) use dmabuf::with_ledger;

/// The name the lock-order checker gives `memory_lock`.
const MEMORY_LOCK: &str = "a vfio device's memory_lock";

/// `VFIO_PCI_ROM_REGION_INDEX`: BARs are regions 0–5.
pub const ROM_REGION_INDEX: u32 = 6;
const PAGE: u64 = 4096;

/// Device memory a variant driver exposes as a BAR-numbered region instead of a real BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// CPU physical address of the memory.
    pub phys: u64,
    /// Its real length; the region the user sees may be larger (padding).
    pub len: u64,
    /// The real BAR whose P2PDMA provider stands for this memory.
    pub provider_bar: u8,
}

/// What a variant driver changes of vfio-pci (`struct vfio_pci_device_ops`): here, which
/// regions are device memory rather than BARs (its `get_dmabuf_phys`).
pub trait Variant: Send + Sync {
    /// The driver's name.
    fn name(&self) -> &'static str;
    /// Device memory behind region `index`, if the variant owns that region.
    fn mem_region(&self, index: u8) -> Option<MemRegion>;
    /// The size of region `index` as the user sees it, for a region the variant owns.
    fn region_size(&self, index: u8) -> Option<u64> {
        self.mem_region(index).map(|m| m.len)
    }
}

/// Plain vfio-pci: every region is the BAR it names.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPci;

impl Variant for DefaultPci {
    fn name(&self) -> &'static str {
        "vfio-pci"
    }
    fn mem_region(&self, _index: u8) -> Option<MemRegion> {
        None
    }
}

/// nvgrace-gpu: the GPU's coherent device memory, split into a reserved part (resmem, shown
/// as BAR 2) and a usable part (usemem, BAR 4), each shown at a power-of-two size; the
/// padding past the real length cannot be exported. BAR 0's provider stands for both.
#[derive(Debug, Clone, Copy)]
pub struct NvgraceGpu {
    /// resmem: (physical address, length).
    pub resmem: (u64, u64),
    /// usemem: (physical address, length).
    pub usemem: (u64, u64),
}

impl Variant for NvgraceGpu {
    fn name(&self) -> &'static str {
        "nvgrace-gpu"
    }
    fn mem_region(&self, index: u8) -> Option<MemRegion> {
        let (phys, len) = match index {
            2 => self.resmem,
            4 => self.usemem,
            _ => return None,
        };
        Some(MemRegion {
            phys,
            len,
            provider_bar: 0,
        })
    }
    fn region_size(&self, index: u8) -> Option<u64> {
        self.mem_region(index)
            .map(|m| m.len.checked_next_power_of_two().unwrap_or(m.len))
    }
}

/// How the emulated kernel was built, where that changes what a user sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    /// `CONFIG_PM`: runtime power management. With it, low-power entry suspends the device
    /// (D3hot where it has PM) and an access to a wakeup-armed device resumes it for good,
    /// signalling the eventfd. Without it (the harness's reference kernel, harness/kernel.config), the runtime-PM
    /// calls do nothing: low-power entry only marks the device engaged (it stays in D0,
    /// buffers revoked) and nothing ever wakes it; only `LOW_POWER_EXIT` leaves.
    pub pm: bool,
    /// `CONFIG_TRANSPARENT_HUGEPAGE`: iommufd aligns an IOVA it chooses to the window's
    /// length rounded up to a power of two up to 2 MiB (a huge page) instead of 4 KiB
    /// (io_pagetable.c `iopt_alloc_iova`), so the same maps land at other IOVAs.
    pub thp: bool,
}

impl Default for KernelConfig {
    /// A distribution kernel: `CONFIG_PM` and transparent huge pages on.
    fn default() -> Self {
        KernelConfig {
            pm: true,
            thp: true,
        }
    }
}

#[derive(Debug, Default)]
/// What `memory_lock` protects.
struct Mem {
    /// The exported buffers not yet released or cleaned up (`vdev->dmabufs`), each with its
    /// file, so that a revoke walks one list without taking any lock but each buffer's.
    bufs: Vec<Linked>,
    open_count: u32,
    /// The user's view of config space (`vconfig`), made at the first open; its COMMAND
    /// register is what the user last wrote, and decides whether memory is enabled.
    vconfig: Option<VConfig>,
    /// Runtime-PM low-power engaged.
    engaged: bool,
    /// The eventfd a wakeup-armed low-power entry signals when an access wakes the device.
    wake: Option<Arc<File>>,
    /// Times the device was woken that way.
    wakeups: u32,
    /// COMMAND as the first open left it (`pci_save_state` in `vfio_pci_core_enable`), put
    /// back at the last close (`pci_restore_state` in `vfio_pci_core_disable`).
    saved_command: u16,
    /// The rest of what `pci_save_state` keeps at the first open and `pci_restore_state`
    /// writes back at the last close: the header past COMMAND/STATUS and the PCIe control
    /// registers, as (offset, width, value). Bytes outside them (QEMU's spare config bytes)
    /// are not part of the state and keep what was written.
    saved_state: Vec<(u16, usize, u32)>,
}

struct Dev {
    fabric: Arc<Fabric>,
    bdf: Bdf,
    env: DmaEnv,
    binding: Binding,
    p2p: bool,
    is_vf: bool,
    reg: Registration,
    mem: RwLock<Mem>,
    variant: Arc<dyn Variant>,
    /// The revocation watch's ledger of this device's mappings.
    ledger: Arc<Ledger>,
    /// Buffers exported so far (numbers them for the watch).
    exported: AtomicU64,
    /// The kernel has runtime power management (`CONFIG_PM`): see [`KernelConfig::pm`].
    pm: AtomicBool,
    /// A wakeup-armed low power is engaged (so an ioctl must look under `memory_lock`).
    wake_armed: AtomicBool,
    /// `igate`: the interrupts the user set up (see [`irqs`]).
    irqs: Mutex<irqs::Irqs>,
    /// Interrupts the device raised, until `igate` is free to deliver them.
    irq_queue: Mutex<Vec<irqs::DeviceIrq>>,
    /// `vdev->ioeventfds_list` (under `ioeventfds_lock`), emptied at the last close.
    ioeventfds: Mutex<Vec<rdwr::IoEventFd>>,
    /// The active interrupt type (`vdev->irq_type`), read by the MSI config handler.
    irq_type: AtomicU8,
    /// `vdev->msi_qmax`: the MSI queue size of the last MSI enable (kept across opens).
    msi_qmax: AtomicU16,
    /// The user's COMMAND disables INTx (`vdev->virq_disabled`, kept across opens).
    virq_disabled: AtomicBool,
    /// What the last entry into D3hot saved, for a function that loses its state there.
    pm_save: Mutex<Option<peerdma_pci::fabric::SavedConfig>>,
    /// The reset at the first open worked (`vdev->reset_works`): `VFIO_DEVICE_RESET` is
    /// refused without it, and the last close resets only with it.
    reset_works: AtomicBool,
    /// The runtime suspend masked INTx, so the resume unmasks it (`vdev->pm_intx_masked`).
    pm_intx_masked: AtomicBool,
    /// Low power is engaged (`Mem::engaged`, mirrored for the ioctl prologue, which must not
    /// wait for `memory_lock` to learn it).
    engaged_hint: AtomicBool,
    /// The last close could not reset the function (`vdev->needs_reset`): a bus reset of
    /// its device set is owed once none of the set is open ([`VfioPci::dev_set_try_reset`]).
    needs_reset: AtomicBool,
    /// SR-IOV is enabled on this PF (`vdev->sriov_active`): the model's VFs exist from the
    /// start, as if user space had enabled them through vfio-pci's `sriov_configure`
    /// (Linux refuses to bind vfio-pci to a PF whose VFs were enabled otherwise). Its power
    /// state cannot leave D0 through vfio (`vfio_pci_set_power_state`: `EBUSY`).
    sriov_active: bool,
    /// MSI-X vectors can be added while enabled (`vdev->has_dyn_msix`): an MSI-X
    /// capability on x86, whose interrupt domains allow it.
    dyn_msix: bool,
    /// The BARs as the PCI core assigned them (`pdev->resource`), with the mmap probe's
    /// verdict.
    resources: [Option<rdwr::Resource>; 6],
    /// Where the MSI-X table is, if the function has one.
    msix: Option<rdwr::MsixTable>,
    /// The VF token of an SR-IOV PF (`vdev->vf_token`), set with `PCI_VF_TOKEN`; `None` for
    /// every other function.
    vf_token: Option<Mutex<[u8; 16]>>,
}

/// Watches every DMA on the fabric for the device's ledger (see [`crate::watch`]).
struct Watch(Weak<Dev>);

impl FabricObserver for Watch {
    fn event(&self, ev: &FabricEvent) {
        match *ev {
            FabricEvent::Msi { bdf, vector } => {
                if let Some(d) = self.0.upgrade().filter(|d| d.bdf == bdf) {
                    d.device_irq(irqs::DeviceIrq::Msi(vector));
                }
                return;
            }
            FabricEvent::Intx {
                bdf,
                asserted: true,
            } => {
                if let Some(d) = self.0.upgrade().filter(|d| d.bdf == bdf) {
                    d.device_irq(irqs::DeviceIrq::IntxAsserted);
                }
                return;
            }
            _ => {}
        }
        let FabricEvent::DmaLanded {
            requester,
            addr,
            started,
            target,
            len,
            write,
        } = ev
        else {
            return;
        };
        let Some(d) = self.0.upgrade() else { return };
        if !d.ledger.has_grants() {
            return;
        }
        if let Some(phys) = target_phys(&d.fabric, target) {
            let landed = d.fabric.tick();
            d.ledger.check(
                *requester, *addr, *started, landed, phys, *target, *len, *write,
            );
        }
    }
}

/// A vfio-pci bound device.
pub struct VfioPci {
    dev: Arc<Dev>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("bdf", &self.dev.bdf)
            .finish_non_exhaustive()
    }
}

/// An open device file (`vfio_device_file`): holds a registration reference until closed.
pub struct DeviceFd {
    dev: Arc<Dev>,
    reg: Option<RegRef>,
    /// Access granted: opened the group way, or a cdev bound to an iommufd. Until then
    /// every ioctl, read and write of the fd is `EINVAL`, and the device is not open.
    granted: AtomicBool,
}

impl std::fmt::Debug for DeviceFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFd")
            .field("bdf", &self.dev.bdf)
            .finish_non_exhaustive()
    }
}

/// `memory_lock` held for write. File references taken while it is held are given back
/// only after it is dropped: a last reference runs the buffer's release, which takes
/// `memory_lock` itself (the kernel defers final `fput` for the same reason).
struct MemGuard<'a> {
    m: Option<RwLockWriteGuard<'a, Mem>>,
    puts: Vec<Arc<File>>,
    order: Option<order::Held>,
}

impl std::ops::Deref for MemGuard<'_> {
    type Target = Mem;
    fn deref(&self) -> &Mem {
        self.m.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for MemGuard<'_> {
    fn deref_mut(&mut self) -> &mut Mem {
        self.m.as_mut().expect("held until drop")
    }
}

impl Drop for MemGuard<'_> {
    fn drop(&mut self) {
        self.m.take();
        self.order.take();
        for f in self.puts.drain(..) {
            f.put();
        }
    }
}

impl Dev {
    /// The function reset Linux would use (`pci_reset_fn_methods`, in its order, as
    /// `pci_init_reset_methods` probes them): FLR, AF FLR, the PM reset (a D3hot → D0 cycle,
    /// for a function with PM whose PMCSR has No_Soft_Reset clear: `pci_pm_reset`), then a
    /// bus reset when the device is alone below its bridge (`pci_parent_bus_reset`: how a
    /// device without FLR behind a port resets). `None`: the function cannot be reset.
    fn reset_method(&self) -> Option<Method> {
        let func = self.fabric.function(self.bdf).ok()?;
        if func.has_flr() || func.has_af_flr() {
            Some(Method::Flr)
        } else if !func.no_soft_reset() {
            Some(Method::Pm)
        } else {
            match self.bus_scope() {
                Some((bridge, affected)) if affected == [self.bdf] => {
                    Some(Method::Bus(bridge, affected))
                }
                _ => None,
            }
        }
    }

    /// `pci_try_reset_function` (at the first open and for `VFIO_DEVICE_RESET`): the
    /// function's registers are saved, it is reset, they are written back.
    fn reset_saving_state(&self, method: &Method) -> Result<(), Errno> {
        match method {
            Method::Flr => self
                .fabric
                .reset_function(self.bdf)
                .map(|_| ())
                .map_err(|_| Errno::EIO),
            Method::Pm => self.pm_reset(),
            Method::Bus(bridge, affected) => self.secondary_bus_reset(*bridge, affected),
        }
    }

    /// `__pci_reset_function_locked` (at the last close): the reset alone, nothing saved
    /// or written back; the caller restores what it kept.
    fn reset_bare(&self, method: &Method) -> Result<(), Errno> {
        let (f, b) = (&*self.fabric, self.bdf);
        match method {
            Method::Flr => f.flr(b).map(|_| ()).map_err(|_| Errno::EIO),
            Method::Pm => f
                .set_power_state(b, PowerState::D3Hot)
                .and_then(|()| f.set_power_state(b, PowerState::D0))
                .map_err(|_| Errno::EIO),
            Method::Bus(bridge, _) => self.pulse_bus_reset(*bridge),
        }
    }

    fn command_hw(&self) -> u16 {
        self.fabric
            .config_read(self.bdf, regs::COMMAND, 2)
            .map_or(0, |v| v as u16)
    }

    /// The registers `pci_save_state` keeps, read now: header dwords 2–15 (dwords 10–15
    /// first, then the BARs, then 2–3, the order `pci_restore_config_space` writes them
    /// back in) and PCIe DevCtl, LnkCtl and DevCtl2.
    fn state_regs(&self) -> Vec<(u16, usize, u32)> {
        let (f, b) = (&*self.fabric, self.bdf);
        let mut at: Vec<(u16, usize)> = (10..16)
            .chain(4..10)
            .chain(2..4)
            .map(|i| (4 * i, 4))
            .collect();
        if let Some(e) = f.function(b).ok().and_then(|x| x.caps().exp) {
            at.extend([
                (e + regs::EXP_DEVCTL, 2),
                (e + regs::EXP_LNKCTL, 2),
                (e + regs::EXP_DEVCTL2, 2),
            ]);
        }
        at.into_iter()
            .filter_map(|(o, n)| f.config_read(b, o, n).ok().map(|v| (o, n, v)))
            .collect()
    }

    /// `__vfio_pci_memory_enabled`.
    fn memory_enabled(&self, m: &Mem) -> bool {
        let d0ish = self
            .fabric
            .power_state(self.bdf)
            .is_ok_and(|p| p < PowerState::D3Hot);
        let vcommand = m.vconfig.as_ref().map_or(0, VConfig::command);
        d0ish && (self.is_vf || vcommand & regs::COMMAND_MEMORY != 0)
    }

    /// `memory_lock` for reading, for the duration of `f` (order-checked like the writers).
    fn read_mem<R>(&self, f: impl FnOnce(&Mem) -> R) -> R {
        let _order = order::acquire(Level::Memory, MEMORY_LOCK, true);
        f(&sync::read(&self.mem))
    }

    /// `memory_lock` for writing.
    fn lock_mem(&self) -> MemGuard<'_> {
        let order = order::acquire(Level::Memory, MEMORY_LOCK, true);
        MemGuard {
            m: Some(sync::write(&self.mem)),
            puts: Vec::new(),
            order: Some(order),
        }
    }

    /// The bridge above the device and every function below that bridge, bridges included
    /// (what a secondary bus reset of it resets, and what `pci_walk_bus` visits).
    fn bus_scope(&self) -> Option<(Bdf, Vec<Bdf>)> {
        let f = &self.fabric;
        let bridge = f.upstream_bridge(self.bdf).ok().flatten()?;
        let below = |mut b: Bdf| loop {
            match f.upstream_bridge(b) {
                Ok(Some(u)) if u == bridge => return true,
                Ok(Some(u)) => b = u,
                _ => return false,
            }
        };
        let affected = f
            .functions()
            .map(peerdma_pci::Function::bdf)
            .filter(|&b| below(b))
            .collect();
        Some((bridge, affected))
    }

    /// What a hot reset of the device's bus reaches, in bus order: the bridge and the
    /// functions below it; no bridge above is no bus reset (`pci_probe_reset_bus`), ENODEV.
    fn reset_bus(&self) -> Result<(Bdf, Vec<Bdf>), Errno> {
        let (bridge, mut affected) = self.bus_scope().ok_or(Errno::ENODEV)?;
        affected.sort();
        Ok((bridge, affected))
    }

    /// Pulses the bridge's secondary bus reset, saving and restoring the state of every
    /// function below it (`pci_reset_bus`).
    fn secondary_bus_reset(&self, bridge: Bdf, affected: &[Bdf]) -> Result<(), Errno> {
        let f = &self.fabric;
        let saved: Vec<_> = affected
            .iter()
            .filter_map(|&b| f.save_config(b).ok())
            .collect();
        let res = self.pulse_bus_reset(bridge);
        for s in &saved {
            let _ = f.restore_config(s);
        }
        res
    }

    /// Secondary Bus Reset set and cleared in `bridge`'s Bridge Control: everything below
    /// it resets, nothing is saved or restored.
    fn pulse_bus_reset(&self, bridge: Bdf) -> Result<(), Errno> {
        let f = &self.fabric;
        let bctl = f.config_read(bridge, regs::BRIDGE_CONTROL, 2).unwrap_or(0);
        let on = bctl | u32::from(regs::BRIDGE_CTL_BUS_RESET);
        let off = bctl & !u32::from(regs::BRIDGE_CTL_BUS_RESET);
        f.config_write(bridge, regs::BRIDGE_CONTROL, 2, on)
            .and_then(|()| f.config_write(bridge, regs::BRIDGE_CONTROL, 2, off))
            .map_err(|_| Errno::EIO)
    }

    fn try_lock_mem(&self) -> Option<MemGuard<'_>> {
        let order = || Some(order::acquire(Level::Memory, MEMORY_LOCK, false));
        match self.mem.try_write() {
            Ok(g) => Some(MemGuard {
                m: Some(g),
                puts: Vec::new(),
                order: order(),
            }),
            Err(sync::TryLockError::Poisoned(p)) => Some(MemGuard {
                m: Some(p.into_inner()),
                puts: Vec::new(),
                order: order(),
            }),
            Err(sync::TryLockError::WouldBlock) => None,
        }
    }
}

impl Drop for VfioPci {
    /// The watch is on in every test: with debug assertions, a device that goes away with
    /// violations nobody acknowledged ([`VfioPci::acknowledge_violations`]) panics, naming
    /// the first one — a test cannot pass with a broken revocation it did not look for.
    fn drop(&mut self) {
        let n = self.dev.ledger.unacknowledged();
        if cfg!(debug_assertions) && n > 0 && !std::thread::panicking() {
            let first = self
                .dev
                .ledger
                .violations()
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            panic!(
                "{n} unacknowledged revocation violation(s) on {}: {first}",
                self.dev.bdf
            );
        }
    }
}

impl VfioPci {
    /// Marks the violations found so far as expected (a test that plants one).
    pub fn acknowledge_violations(&self) {
        self.dev.ledger.acknowledge();
    }

    /// Binds vfio-pci to a function: P2PDMA is initialised for it (`pcim_p2pdma_init`); a
    /// refusal with `EOPNOTSUPP` leaves a working device that cannot export, any other
    /// failure fails the bind.
    pub fn bind(env: &DmaEnv, bdf: Bdf) -> Result<VfioPci, Errno> {
        VfioPci::bind_variant(env, bdf, Arc::new(DefaultPci))
    }

    /// [`Self::bind`] on a kernel built with `config` (see [`KernelConfig`]).
    pub fn bind_with(env: &DmaEnv, bdf: Bdf, config: KernelConfig) -> Result<VfioPci, Errno> {
        let v = VfioPci::bind_variant(env, bdf, Arc::new(DefaultPci))?;
        v.dev.pm.store(config.pm, Ordering::Release);
        Ok(v)
    }

    /// Binds a variant driver (same P2PDMA rule as [`Self::bind`]).
    pub fn bind_variant(
        env: &DmaEnv,
        bdf: Bdf,
        variant: Arc<dyn Variant>,
    ) -> Result<VfioPci, Errno> {
        let fabric = env.dma.fabric().clone();
        let f = fabric.function(bdf).map_err(|_| Errno::ENODEV)?;
        let is_vf = f.is_vf();
        let binding = env.p2p.bind(bdf).map_err(|e| e.errno())?;
        let p2p = match binding.init() {
            Ok(()) => true,
            Err(e) if e.errno() == Errno::EOPNOTSUPP => false,
            Err(e) => return Err(e.errno()),
        };
        let resources = rdwr::resources(&fabric, bdf, &*variant);
        let vf_token = f.caps().sriov.map(|_| Mutex::new([0u8; 16]));
        let sriov_active = f.caps().sriov.is_some_and(|s| {
            fabric
                .config_read(bdf, s + regs::SRIOV_CTRL, 2)
                .is_ok_and(|c| c & u32::from(regs::SRIOV_CTRL_VFE) != 0)
        });
        let msix = rdwr::msix_table(&fabric, bdf);
        let dyn_msix = msix.is_some();
        let dev = Arc::new(Dev {
            resources,
            msix,
            vf_token,
            fabric,
            bdf,
            env: env.clone(),
            binding,
            p2p,
            is_vf,
            reg: Registration::new(),
            mem: RwLock::new(Mem::default()),
            variant,
            ledger: Arc::new(Ledger::new(bdf)),
            exported: AtomicU64::new(0),
            pm: AtomicBool::new(KernelConfig::default().pm),
            wake_armed: AtomicBool::new(false),
            irqs: Mutex::new(irqs::Irqs::default()),
            irq_queue: Mutex::new(Vec::new()),
            ioeventfds: Mutex::new(Vec::new()),
            irq_type: AtomicU8::new(irqs::NONE),
            msi_qmax: AtomicU16::new(0),
            virq_disabled: AtomicBool::new(false),
            dyn_msix,
            pm_save: Mutex::new(None),
            reset_works: AtomicBool::new(false),
            pm_intx_masked: AtomicBool::new(false),
            engaged_hint: AtomicBool::new(false),
            needs_reset: AtomicBool::new(false),
            sriov_active,
        });
        dev.fabric.subscribe(Arc::new(Watch(Arc::downgrade(&dev))));
        Ok(VfioPci { dev })
    }

    /// The function.
    pub fn bdf(&self) -> Bdf {
        self.dev.bdf
    }

    /// The VF token last set with `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN` (all zeros until then);
    /// `None` unless the function is an SR-IOV PF.
    pub fn vf_token(&self) -> Option<[u8; 16]> {
        self.dev.vf_token.as_ref().map(|t| *sync::lock(t))
    }
    /// How many DMAs landed through a mapping of this device's buffers that had been taken
    /// away (every DMA on the fabric is watched from bind on; see [`crate::watch`]); anything
    /// but 0 is a broken revocation.
    pub fn violation_count(&self) -> usize {
        self.dev.ledger.count()
    }

    /// The violations, each naming the buffer, the mapping and the DMA (the first
    /// [`crate::watch::KEPT`]).
    pub fn violations(&self) -> Vec<Violation> {
        self.dev.ledger.violations()
    }

    /// Mappings of this device's buffers that importers hold now.
    pub fn live_mappings(&self) -> usize {
        self.dev.ledger.live()
    }

    /// Those mappings, each naming its importer and buffer (what a stuck revoke waits for).
    pub fn live_mapping_names(&self) -> Vec<String> {
        self.dev.ledger.live_names()
    }

    /// The P2PDMA provider of BAR `bar`, if P2PDMA is ready and the BAR is memory.
    pub fn provider(&self, bar: u8) -> Option<Provider> {
        if !self.dev.p2p {
            return None;
        }
        self.dev.binding.provider(bar).ok().flatten()
    }

    /// The driver's name.
    pub fn driver(&self) -> &'static str {
        self.dev.variant.name()
    }
    /// Whether P2PDMA was initialised (else the device cannot export).
    pub fn p2p_ready(&self) -> bool {
        self.dev.p2p
    }
    /// The registration (for unregister and holder counts).
    pub fn registration(&self) -> &Registration {
        &self.dev.reg
    }
    /// How many dma-bufs are linked to the device.
    pub fn dmabuf_count(&self) -> usize {
        self.dev.read_mem(|m| m.bufs.len())
    }
    /// The last close could not reset the function and no bus reset has made up for it
    /// since (`vdev->needs_reset`).
    pub fn needs_reset(&self) -> bool {
        self.dev.needs_reset.load(Ordering::Acquire)
    }

    /// `vfio_pci_dev_set_try_reset`, run after a last close by whoever holds vfio-pci's
    /// devices (as vfio's device set does; here the emulated machine): `set` is the closed
    /// device's set — every vfio-pci function on its bus, or the function alone on a root
    /// bus or as a VF. When none of the set is open, one of them still needs a reset, and
    /// every function the bus reset reaches is in the set
    /// (`vfio_pci_dev_set_resettable`), the bridge above resets its bus with the state of
    /// each function saved and written back (`pci_reset_bus`), and on success nobody needs
    /// a reset any more. Whether it reset.
    pub fn dev_set_try_reset(set: &[&VfioPci]) -> bool {
        let Some(first) = set.first() else {
            return false;
        };
        if set.iter().any(|v| v.open_count() > 0) || !set.iter().any(|v| v.needs_reset()) {
            return false;
        }
        let Ok((bridge, affected)) = first.dev.reset_bus() else {
            return false;
        };
        if affected
            .iter()
            .any(|b| !set.iter().any(|v| v.dev.bdf == *b))
        {
            return false;
        }
        let done = first.dev.secondary_bus_reset(bridge, &affected).is_ok();
        if done {
            for v in set {
                v.dev.needs_reset.store(false, Ordering::Release);
            }
        }
        done
    }

    /// The open count.
    pub fn open_count(&self) -> u32 {
        self.dev.read_mem(|m| m.open_count)
    }

    /// Opens the device the group way (or a cdev and binds it at once): [`Self::open_cdev`]
    /// then [`DeviceFd::bind`].
    pub fn open(&self) -> Result<DeviceFd, Errno> {
        let fd = self.open_cdev()?;
        fd.bind()?;
        Ok(fd)
    }

    /// Opens the device's cdev without binding it to an iommufd: the file holds the
    /// registration (`ENODEV` once unregistering), but the device is not open and the fd
    /// answers nothing but [`DeviceFd::bind`] (everything else is `EINVAL`).
    pub fn open_cdev(&self) -> Result<DeviceFd, Errno> {
        if self.dev.reg.is_unregistering() {
            return Err(Errno::ENODEV);
        }
        let reg = self.dev.reg.try_get("device file").ok_or(Errno::ENODEV)?;
        Ok(DeviceFd {
            dev: self.dev.clone(),
            reg: Some(reg),
            granted: AtomicBool::new(false),
        })
    }

    /// `vfio_unregister_group_dev`: waits for every holder (open files, live dma-bufs),
    /// calling `request` every `slice` while it waits; returns the number of requests.
    pub fn unregister(&self, slice: Duration, request: impl FnMut(u32, &[String])) -> u32 {
        self.dev.reg.unregister(slice, request)
    }
}

impl DeviceFd {
    /// `VFIO_DEVICE_BIND_IOMMUFD` (`vfio_df_open`): access is granted and the device opened;
    /// the first open enables it and takes the virtual COMMAND register from it. `EINVAL` if
    /// already bound.
    pub fn bind(&self) -> Result<(), Errno> {
        if self.granted.load(Ordering::Acquire) {
            return Err(Errno::EINVAL);
        }
        let d = &self.dev;
        let mut m = d.lock_mem();
        if m.open_count == 0 {
            d.set_power(PowerState::D0);
            // Bus mastering off, then `pci_enable_device`: decode turned on for the kinds
            // of BAR the function has (`pci_enable_resources`: I/O for an I/O BAR, Memory
            // Space for a memory BAR), the rest of COMMAND as found.
            let mut cmd = d.command_hw() & !regs::COMMAND_MASTER;
            for r in d.resources.iter().flatten() {
                cmd |= if r.mem {
                    regs::COMMAND_MEMORY
                } else {
                    regs::COMMAND_IO
                };
            }
            let _ = d
                .fabric
                .config_write(d.bdf, regs::COMMAND, 2, u32::from(cmd));
            // `pci_try_reset_function`: whether it worked decides `VFIO_DEVICE_RESET` and
            // the reset at the last close.
            let works = d
                .reset_method()
                .is_some_and(|r| d.reset_saving_state(&r).is_ok());
            d.reset_works.store(works, Ordering::Release);
            m.saved_command = cmd;
            m.saved_state = d.state_regs();
            // After the state is saved: a function that can mask INTx (every one modelled
            // here) has INTx-disable cleared in hardware (`vfio_pci_core_enable`).
            if cmd & regs::COMMAND_INTX_DISABLE != 0 {
                let _ = d.fabric.config_write(
                    d.bdf,
                    regs::COMMAND,
                    2,
                    u32::from(cmd & !regs::COMMAND_INTX_DISABLE),
                );
            }
            m.vconfig = VConfig::init(&d.fabric, d.bdf).ok();
            m.engaged = false;
            d.engaged_hint.store(false, Ordering::Release);
        }
        m.open_count += 1;
        self.granted.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether access is granted (bound, or opened the group way).
    pub fn is_bound(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    /// The prologue of every ioctl, read and write on a device fd.
    fn granted(&self) -> Result<(), Errno> {
        if self.is_bound() {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }

    /// What `vfio_device_fops_unl_ioctl` does before any ioctl but BIND_IOMMUFD: `EINVAL`
    /// without access granted, then the runtime-PM get (which wakes a device asleep in
    /// wakeup-armed low power). For the ioctls vfio core handles itself (the cdev's
    /// ATTACH/DETACH_IOMMUFD_PT).
    pub fn ioctl_prologue(&self) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        Ok(())
    }

    /// The device's memory is enabled now (as `memory_lock` readers see it).
    pub fn memory_enabled(&self) -> bool {
        self.dev.read_mem(|m| self.dev.memory_enabled(m))
    }

    /// `VFIO_DEVICE_FEATURE` on the caller's bytes; returns the ioctl's value (an fd for
    /// DMA_BUF, else 0).
    pub fn feature(&self, proc: &Process, buf: &[u8]) -> Result<i32, Errno> {
        self.granted()?;
        self.ioctl_resume();
        let req = feature::parse(buf)?;
        let f = req.feature();
        if feature::is_core_feature(f) {
            return Err(Errno::ENOTTY);
        }
        // Pre-copy info v2 is vfio core's too, and a device without pre-copy migration
        // refuses it before anything else (`vfio_ioctl_device_feature_migration_precopy_info_v2`).
        if f == id::MIG_PRECOPY_INFO_V2 {
            return Err(Errno::EINVAL);
        }
        match f {
            id::DMA_BUF => self.dma_buf(proc, &req),
            // `vfio_pci_core_feature_token`: only an SR-IOV PF has a token; SET only (a GET
            // could show the previous user's token), 16 bytes.
            id::PCI_VF_TOKEN => {
                let token = self.dev.vf_token.as_ref().ok_or(Errno::ENOTTY)?;
                if !feature::check_feature(req.flags, req.data_argsz(), SET, 16)? {
                    return Ok(0);
                }
                let uuid: [u8; 16] = req
                    .data
                    .get(..16)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(Errno::EFAULT)?;
                *sync::lock(token) = uuid;
                Ok(0)
            }
            id::LOW_POWER_ENTRY => {
                if !feature::check_feature(req.flags, req.data_argsz(), SET, 0)? {
                    return Ok(0);
                }
                self.low_power_entry(None).map(|()| 0)
            }
            id::LOW_POWER_ENTRY_WITH_WAKEUP => {
                if !feature::check_feature(req.flags, req.data_argsz(), SET, 8)? {
                    return Ok(0);
                }
                // struct { s32 wakeup_eventfd; u32 reserved; }
                let word = |i: usize| {
                    req.data
                        .get(i..i + 4)
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .ok_or(Errno::EFAULT)
                };
                // The reserved word is read and never looked at
                // (`vfio_pci_core_pm_entry_with_wakeup`).
                let fd = i32::from_le_bytes(word(0)?);
                word(4)?;
                // A negative fd is refused before it is looked up (7.2, as observed).
                if fd < 0 {
                    return Err(Errno::EINVAL);
                }
                let file = proc.fget(fd)?;
                if !file.is_eventfd() {
                    file.put();
                    return Err(Errno::EINVAL);
                }
                self.low_power_entry(Some(file)).map(|()| 0)
            }
            id::LOW_POWER_EXIT => {
                if !feature::check_feature(req.flags, req.data_argsz(), SET, 0)? {
                    return Ok(0);
                }
                self.low_power_exit();
                Ok(0)
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    /// `VFIO_DEVICE_RESET`: `EINVAL` if the function cannot be reset; else revoke, force D0,
    /// reset, unrevoke if memory is enabled.
    pub fn reset(&self) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        let d = &self.dev;
        // `vfio_pci_ioctl_reset`: refused when the reset at the first open did not work.
        if !d.reset_works.load(Ordering::Acquire) {
            return Err(Errno::EINVAL);
        }
        let method = d.reset_method().ok_or(Errno::EINVAL)?;
        let mut m = d.lock_mem();
        m.move_bufs(true);
        d.set_power(PowerState::D0);
        let r = d.reset_saving_state(&method);
        d.unrevoke_if_enabled(&mut m);
        // The ioctl ran with the device resumed; in engaged low power the runtime-PM put at
        // its end suspends it again (D3hot, without revoking: `vfio_pci_core_runtime_suspend`
        // only sets D0 first), so the buffer just brought back reaches a device that does
        // not decode. Without CONFIG_PM nothing suspends it.
        if d.runtime_suspended(&m) {
            d.runtime_suspend();
        }
        r
    }

    /// `VFIO_DEVICE_PCI_HOT_RESET`: a secondary bus reset of the bridge above this device.
    /// Every function below that bridge must be one of `owned` (`EINVAL` otherwise, as for a
    /// device the caller does not own); each device's `memory_lock` is only tried (`EBUSY` if
    /// contended). Each device is revoked before the reset; afterwards, in reverse order, a
    /// device that is open and has memory enabled is unrevoked.
    pub fn hot_reset(&self, owned: &[&VfioPci]) -> Result<(), Errno> {
        self.hot_reset_in(owned, owned)
    }

    /// [`DeviceFd::hot_reset`] where `set` holds vfio-pci's devices (at least those below
    /// the bridge): every one of them the reset reaches is runtime-resumed before ownership
    /// is checked (`vfio_pci_dev_set_pm_runtime_get`), so a wakeup-armed device there wakes
    /// even when the reset is then refused.
    pub fn hot_reset_in(&self, set: &[&VfioPci], owned: &[&VfioPci]) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        let d = &self.dev;
        let (bridge, affected) = d.reset_bus()?;
        // `vfio_pci_dev_set_resettable`: every device the reset reaches must be vfio-pci's
        // (a bridge below the bus, bound to the PCIe port driver, never is).
        if affected
            .iter()
            .any(|b| !set.iter().any(|v| v.dev.bdf == *b))
        {
            return Err(Errno::EINVAL);
        }
        for v in set.iter().filter(|v| affected.contains(&v.dev.bdf)) {
            DeviceFd::resume_dev(&v.dev);
        }
        // `vfio_pci_dev_set_hot_reset`: per device in turn, ownership (EINVAL) then the
        // try-lock of its memory_lock (EBUSY) and the revoke; a failure unwinds those
        // before it.
        let mut locked: Vec<(&Arc<Dev>, MemGuard<'_>)> = Vec::new();
        let mut res = Ok(());
        for b in &affected {
            let Some(v) = owned.iter().find(|v| v.dev.bdf == *b) else {
                res = Err(Errno::EINVAL);
                break;
            };
            if let Some(m) = v.dev.try_lock_mem() {
                m.move_bufs(true);
                locked.push((&v.dev, m));
            } else {
                res = Err(Errno::EBUSY);
                break;
            }
        }
        if res.is_ok() {
            res = d.secondary_bus_reset(bridge, &affected);
        }
        while let Some((dev, m)) = locked.pop() {
            if m.open_count > 0 && dev.memory_enabled(&m) {
                m.move_bufs(false);
            }
            // The set's runtime-PM references go (`pm_runtime_put`): a device in engaged
            // low power suspends again, its buffers unrevoked but its BARs not decoding.
            if dev.runtime_suspended(&m) {
                dev.runtime_suspend();
            }
        }
        res
    }

    /// The functions a hot reset of the device's bus reaches, in bus order, bridges below it
    /// included (`vfio_pci_ioctl_get_pci_hot_reset_info`'s `pci_walk_bus`; the model's slots
    /// never reset): `ENODEV` when the device sits on a root bus, where no bridge can reset
    /// it.
    pub fn hot_reset_scope(&self) -> Result<Vec<Bdf>, Errno> {
        self.granted()?;
        self.ioctl_resume();
        Ok(self.dev.reset_bus()?.1)
    }

    /// Closes the file (`vfio_df_close`); the last close revokes every dma-buf for good
    /// **before** disabling the device (7.2 order), then disables it.
    pub fn close(mut self) {
        self.close_inner();
    }

    fn close_inner(&mut self) {
        let Some(reg) = self.reg.take() else { return };
        let d = &self.dev;
        if self.granted.swap(false, Ordering::AcqRel) {
            let mut m = d.lock_mem();
            if m.open_count == 1 {
                // Decided under `memory_lock`, so two closes at once cannot both miss it:
                // the interrupts and every ioeventfd go (`vfio_pci_core_disable`).
                // `vfio_pci_core_disable` resumes a runtime-suspended device first: INTx
                // unmasked, which signals an interrupt left pending before they all go.
                if d.runtime_suspended(&m) {
                    d.pm_intx_unmask();
                }
                self.irqs_release();
                let gone = std::mem::take(&mut *sync::lock(&d.ioeventfds));
                for e in gone {
                    e.release();
                }
                m.cleanup_bufs();
                d.disengage(&mut m);
                d.set_power(PowerState::D0);
                // `vfio_pci_core_disable`: COMMAND is INTx-disable alone, and a device whose
                // reset worked at the first open is reset (the device's own registers too:
                // an NVMe controller comes back disabled), without saving anything first.
                let _ = d.fabric.config_write(
                    d.bdf,
                    regs::COMMAND,
                    2,
                    u32::from(regs::COMMAND_INTX_DISABLE),
                );
                // `needs_reset` is set, and cleared again by a function reset that works; what
                // stays set is owed by a bus reset of the device set
                // (`vfio_pci_dev_set_try_reset`, [`VfioPci::dev_set_try_reset`]).
                let mut reset = false;
                if d.reset_works.load(Ordering::Acquire) {
                    if let Some(r) = d.reset_method() {
                        reset = d.reset_bare(&r).is_ok();
                    }
                }
                d.needs_reset.store(!reset, Ordering::Release);
                // The state saved at the first open comes back (whatever the user wrote since:
                // an I/O decode bit the user cleared is set again), bus mastering off. Unlike
                // Linux, which leaves memory decode as saved (on), the model turns it off, so
                // that nothing reaches a closed device's BARs without a mapping (divergence 8).
                // `pci_restore_config_space`: only what differs, BARs after the rest of the
                // header; then the PCIe control registers (restored first by the kernel; no
                // order between them is visible).
                for &(at, n, v) in &m.saved_state {
                    if d.fabric.config_read(d.bdf, at, n).ok() != Some(v) {
                        let _ = d.fabric.config_write(d.bdf, at, n, v);
                    }
                }
                let cmd = m.saved_command & !(regs::COMMAND_MEMORY | regs::COMMAND_MASTER);
                let _ = d
                    .fabric
                    .config_write(d.bdf, regs::COMMAND, 2, u32::from(cmd));
                m.vconfig = None;
            }
            m.open_count = m.open_count.saturating_sub(1);
        }
        drop(reg);
    }
}

impl Drop for DeviceFd {
    fn drop(&mut self) {
        self.close_inner();
    }
}

/// How `VFIO_DEVICE_RESET` resets a function.
enum Method {
    /// PCIe FLR or AF FLR (the fabric picks the first it has).
    Flr,
    /// D3hot and back to D0.
    Pm,
    /// A secondary bus reset of this bridge, which reaches these functions.
    Bus(Bdf, Vec<Bdf>),
}

/// The IOMMU group of `bdf`, named by one of its functions, by the two rules of Linux's
/// `pci_device_group` that PCIe topologies exercise (DMA aliases and quirks are not
/// modelled): a function below a bridge whose path to the root lacks ACS isolation (source
/// validation, request and completion redirect, upstream forwarding) is in that bridge's
/// group; a function of a multifunction device (header type bit 7) without ACS is in
/// function 0's.
/// Ownership for a hot reset is proven per group: one device of a group open in the caller's
/// iommufd owns the whole group.
pub fn iommu_group(fabric: &Fabric, bdf: Bdf) -> Bdf {
    const REQ: u16 = regs::ACS_SV | regs::ACS_RR | regs::ACS_CR | regs::ACS_UF;
    let multifunction = |b: Bdf| {
        fabric
            .config_read(b, regs::HEADER_TYPE, 1)
            .is_ok_and(|h| h & u32::from(regs::HEADER_TYPE_MFD) != 0)
    };
    let acs_ok = |b: Bdf| {
        let has = || {
            fabric
                .acs_ctrl(b)
                .ok()
                .flatten()
                .is_some_and(|c| c & REQ == REQ)
        };
        match fabric.function(b).map(peerdma_pci::Function::kind) {
            Ok(DeviceKind::RootPort | DeviceKind::SwitchDownstream) => has(),
            Ok(DeviceKind::Endpoint | DeviceKind::SwitchUpstream | DeviceKind::Rciep) => {
                !multifunction(b) || has()
            }
            _ => true,
        }
    };
    let path_ok = |mut b: Bdf| loop {
        if !acs_ok(b) {
            return false;
        }
        match fabric.upstream_bridge(b) {
            Ok(Some(up)) => b = up,
            _ => return true,
        }
    };
    if let Ok(Some(bridge)) = fabric.upstream_bridge(bdf) {
        if !path_ok(bridge) {
            return iommu_group(fabric, bridge);
        }
    }
    if bdf.function() != 0 && multifunction(bdf) && !acs_ok(bdf) {
        if let Some(f0) = bdf.with_function(0) {
            return iommu_group(fabric, f0);
        }
    }
    bdf
}
