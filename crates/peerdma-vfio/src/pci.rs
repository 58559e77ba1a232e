//! A vfio-pci device on the emulated machine: open/close, the user's config writes that
//! reach the device, `VFIO_DEVICE_RESET`, runtime-PM low-power entry/exit, `memory_lock`, and
//! the `VFIO_DEVICE_FEATURE_DMA_BUF` export whose buffers are revoked whenever the device
//! stops decoding memory (Linux 7.2 semantics; rulebook §4.3–§4.8).
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

use peerdma_pci::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use peerdma_pci::sync::{Arc, Condvar, Mutex, RwLock, RwLockWriteGuard, Weak};
use std::time::Duration;

use peerdma_dma::Direction;
use peerdma_dmabuf::buf::{ExportInfo, FileKind, ops};
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

/// What `memory_lock` protects.
#[derive(Debug, Default)]
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
    /// A wakeup-armed low power is engaged (so an ioctl must look under `memory_lock`).
    wake_armed: AtomicBool,
}

/// A buffer on the device's list.
struct Linked {
    state: Arc<BufState>,
    buf: Arc<DmaBuf>,
}

impl std::fmt::Debug for Linked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dma-buf #{}", self.state.watch.serial)
    }
}

/// Watches every DMA on the fabric for the device's ledger (see [`crate::watch`]).
struct Watch(Weak<Dev>);

impl FabricObserver for Watch {
    fn event(&self, ev: &FabricEvent) {
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

/// A vfio dma-buf's exporter state (`struct vfio_pci_dma_buf`).
struct BufState {
    file: Mutex<Option<Arc<File>>>,
    revoked: AtomicBool,
    ranges: Vec<PhysVec>,
    provider: Provider,
    env: DmaEnv,
    /// The device, until close cleanup or release unlinks the buffer.
    dev: Mutex<Option<Weak<Dev>>>,
    reg: Mutex<Option<RegRef>>,
    /// Importer mappings not yet given back; changed under the reservation lock (and, for
    /// the revoke's wait, announced under `unmapped_lock`).
    maps: AtomicUsize,
    unmapped_lock: Mutex<()>,
    unmapped: Condvar,
    /// The watch's view of the buffer, and the ledger its mappings go in (which outlives
    /// the device's link to the buffer).
    watch: Arc<BufWatch>,
    ledger: Arc<Ledger>,
}

struct Exporter(Arc<BufState>);

impl DmaBufOps for Exporter {
    fn provides(&self) -> u32 {
        ops::MAP | ops::UNMAP | ops::RELEASE | ops::PIN | ops::UNPIN
    }
    fn attach(&self, _buf: &DmaBuf, a: &Attachment) -> Result<(), Errno> {
        if !a.peer2peer || !a.is_revocable() {
            return Err(Errno::EOPNOTSUPP);
        }
        if self.0.revoked.load(Ordering::Acquire) {
            return Err(Errno::ENODEV);
        }
        Ok(())
    }
    fn pin(&self, _a: &Attachment, _g: &ResvGuard<'_>) -> Result<(), Errno> {
        Err(Errno::EOPNOTSUPP)
    }
    fn map(&self, a: &Attachment, dir: Direction, g: &ResvGuard<'_>) -> Result<SgTable, Errno> {
        if self.0.revoked.load(Ordering::Acquire) {
            return Err(Errno::ENODEV);
        }
        let size = self.0.ranges.iter().map(|r| r.len).sum();
        // Born before any IOMMU entry of the mapping exists (see `watch::birth`).
        let born = self.0.tick();
        let t = phys_vec_to_sgt(
            &self.0.env,
            a,
            Some(&self.0.provider),
            &self.0.ranges,
            size,
            dir,
            g,
        )?;
        self.0.maps.fetch_add(1, Ordering::AcqRel);
        self.0.ledger.add(
            &self.0.watch,
            Some(a.dev),
            Some(grant_key(a, &t)),
            format!("dma-buf map for {}", a.dev),
            pieces(&t, &self.0.ranges),
            born,
        );
        Ok(t)
    }
    fn unmap(&self, a: &Attachment, sgt: SgTable, dir: Direction, g: &ResvGuard<'_>) {
        let key = grant_key(a, &sgt);
        if free_sgt(&self.0.env, a, sgt, dir, g).is_ok() {
            self.0.ledger.end_key(key, self.0.tick());
            let _ = self
                .0
                .maps
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            let _l = sync::lock(&self.0.unmapped_lock);
            self.0.unmapped.notify_all();
        }
    }
    fn interconnect(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn release(&self, _buf: &DmaBuf) {
        sync::points::point("vfio.release.unlinking");
        let dev = sync::lock(&self.0.dev).take().and_then(|w| w.upgrade());
        if let Some(dev) = dev {
            let mut m = dev.lock_mem();
            m.bufs.retain(|l| !Arc::ptr_eq(&l.state, &self.0));
        }
        sync::lock(&self.0.reg).take();
        sync::lock(&self.0.file).take();
        self.0
            .watch
            .released_at
            .store(self.0.tick(), Ordering::SeqCst);
    }
}

/// How the ledger finds a scatter table again at unmap: its attachment and first address.
fn grant_key(a: &Attachment, t: &SgTable) -> (usize, u64) {
    (
        std::ptr::from_ref(a) as usize,
        t.entries().first().map_or(0, |e| e.addr.get()),
    )
}

/// The pieces of a scatter table: its DMA entries laid over the buffer's physical ranges
/// (both cover the buffer's bytes in order).
fn pieces(t: &SgTable, ranges: &[PhysVec]) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut r = ranges.iter().map(|v| (v.paddr.get(), v.len));
    let mut cur = r.next();
    for e in t.entries() {
        let (mut dma, mut left) = (e.addr.get(), u64::from(e.len));
        while left > 0 {
            let Some((phys, rlen)) = cur else { return out };
            let n = left.min(rlen);
            out.push(Piece { dma, phys, len: n });
            dma += n;
            left -= n;
            cur = if n == rlen {
                r.next()
            } else {
                Some((phys + n, rlen - n))
            };
        }
    }
    out
}

impl BufState {
    fn tick(&self) -> u64 {
        self.env.dma.fabric().tick()
    }

    /// For the watch: the buffer's revocation is complete from now on (flag set, importers
    /// told, every mapping given back — or born revoked). Skipped while the device has never
    /// handed out a mapping: no landing can be laid at this buffer's door then, and none can
    /// be later while it stays revoked (a revoked buffer gets no new mapping), and the
    /// unrevoke clears the stamp.
    fn revoke_finished(&self) {
        if self.ledger.has_grants() {
            self.watch.revoked_at.store(self.tick(), Ordering::SeqCst);
        }
    }

    /// Waits until every importer mapping is gone (after an invalidation).
    fn wait_unmapped(&self) {
        if self.maps.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut l = sync::lock(&self.unmapped_lock);
        loop {
            let n = self.maps.load(Ordering::Acquire);
            if n == 0 {
                return;
            }
            let (g, t) = self
                .unmapped
                .wait_timeout(l, Duration::from_secs(10))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            l = g;
            if t.timed_out() {
                let n = self.maps.load(Ordering::Acquire);
                if n > 0 {
                    tracing::warn!(target: "peerdma::vfio", "revoke waits for {n} importer mapping(s): {}", self.ledger.live_names().join(", "));
                }
            }
        }
    }
}

/// The vfio/iommufd private interconnect (`vfio_pci_dma_buf_iommufd_map`): the one physical
/// range of a vfio dma-buf, for an importer that maps it into an IOMMU itself. Needs the
/// buffer's lock; a buffer from another exporter or with more than one range is
/// `EOPNOTSUPP`, a revoked one `ENODEV`.
pub fn iommufd_map(buf: &DmaBuf, a: &Attachment, g: &ResvGuard<'_>) -> Result<PhysVec, Errno> {
    a.check_locked(g)?;
    let Some(e) = exporter_of(buf) else {
        return Err(Errno::EOPNOTSUPP);
    };
    if e.0.revoked.load(Ordering::Acquire) {
        return Err(Errno::ENODEV);
    }
    match e.0.ranges.as_slice() {
        [one] => Ok(*one),
        _ => Err(Errno::EOPNOTSUPP),
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

impl Mem {
    /// `vfio_pci_dma_buf_move`: every linked buffer not already in the state `revoked` is
    /// moved to it under its reservation lock, its importers told; a revoke then waits for
    /// every importer mapping to be given back.
    fn move_bufs(&self, revoked: bool) {
        for l in &self.bufs {
            let b = &l.state;
            if b.revoked.load(Ordering::Acquire) == revoked {
                continue;
            }
            {
                let g = l.buf.lock();
                // Revoke: flag, then tell importers. Unrevoke (7.2): tell importers, then
                // clear the flag, so nothing maps before they have heard.
                if revoked {
                    b.revoked.store(true, Ordering::Release);
                } else {
                    b.watch.revoked_at.store(0, Ordering::SeqCst);
                }
                let _ = l.buf.invalidate_mappings(&g);
                if !revoked {
                    b.revoked.store(false, Ordering::Release);
                }
                if revoked {
                    g.wait_all(Usage::Bookkeep);
                }
            }
            if revoked {
                b.wait_unmapped();
                b.revoke_finished();
            }
        }
    }

    /// `vfio_pci_dma_buf_cleanup`: every live buffer revoked for good and unlinked.
    fn cleanup_bufs(&mut self) {
        for l in std::mem::take(&mut self.bufs) {
            let b = &l.state;
            {
                let g = l.buf.lock();
                sync::lock(&b.dev).take();
                b.revoked.store(true, Ordering::Release);
                let _ = l.buf.invalidate_mappings(&g);
                g.wait_all(Usage::Bookkeep);
            }
            b.wait_unmapped();
            b.revoke_finished();
            sync::lock(&b.reg).take();
        }
    }
}

/// The per-open config copy (there while the device is open).
fn vc<'a>(m: &'a mut MemGuard<'_>) -> Result<&'a mut VConfig, Errno> {
    m.vconfig.as_mut().ok_or(Errno::EINVAL)
}

impl Dev {
    fn command_hw(&self) -> u16 {
        self.fabric
            .config_read(self.bdf, regs::COMMAND, 2)
            .map_or(0, |v| v as u16)
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

    /// The bridge above the device and every endpoint function below that bridge (what a
    /// secondary bus reset of it resets).
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
            .filter(|x| matches!(x.kind(), DeviceKind::Endpoint | DeviceKind::Vf))
            .map(peerdma_pci::Function::bdf)
            .filter(|&b| below(b))
            .collect();
        Some((bridge, affected))
    }

    /// Pulses the bridge's secondary bus reset, saving and restoring the state of every
    /// function below it (`pci_reset_bus`).
    fn secondary_bus_reset(&self, bridge: Bdf, affected: &[Bdf]) -> Result<(), Errno> {
        let f = &self.fabric;
        let saved: Vec<_> = affected
            .iter()
            .filter_map(|&b| f.save_config(b).ok())
            .collect();
        let bctl = f.config_read(bridge, regs::BRIDGE_CONTROL, 2).unwrap_or(0);
        let on = bctl | u32::from(regs::BRIDGE_CTL_BUS_RESET);
        let off = bctl & !u32::from(regs::BRIDGE_CTL_BUS_RESET);
        let res = f
            .config_write(bridge, regs::BRIDGE_CONTROL, 2, on)
            .and_then(|()| f.config_write(bridge, regs::BRIDGE_CONTROL, 2, off))
            .map_err(|_| Errno::EIO);
        for s in &saved {
            let _ = f.restore_config(s);
        }
        res
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

    /// Low power is no longer engaged: the wake eventfd (if any) is let go with the lock.
    fn disengage(&self, m: &mut MemGuard<'_>) {
        m.engaged = false;
        if let Some(w) = m.wake.take() {
            m.puts.push(w);
        }
        self.wake_armed.store(false, Ordering::Release);
    }

    fn unrevoke_if_enabled(&self, m: &mut MemGuard<'_>) {
        if self.memory_enabled(m) {
            m.move_bufs(false);
        }
    }

    /// Unrevokes after a user's config write if memory is enabled — never while runtime low
    /// power is engaged (divergence 6).
    fn unrevoke_after_write(&self, m: &mut MemGuard<'_>) {
        if !m.engaged {
            self.unrevoke_if_enabled(m);
        }
    }

    /// One chunk of a user's config write (`vfio_pci_config_rw_single`).
    #[allow(clippy::many_single_char_names)]
    fn write_chunk(&self, m: &mut MemGuard<'_>, pos: u16, n: usize, val: u32) -> Result<(), Errno> {
        let (f, b) = (&*self.fabric, self.bdf);
        let owner = vc(m)?.layout.owner(pos);
        match owner {
            Owner::Header if pos == regs::COMMAND => {
                // `vfio_basic_config_write`: the memory rules for a chunk that starts at
                // COMMAND (1, 2 or 4 bytes); the new command is the written value.
                let new_cmd = val as u16;
                let new_mem = new_cmd & regs::COMMAND_MEMORY != 0;
                if !new_mem {
                    m.move_bufs(true);
                }
                let virt_mem = vc(m)?.command() & regs::COMMAND_MEMORY != 0;
                let phys_mem = self.command_hw() & regs::COMMAND_MEMORY != 0;
                if new_mem && virt_mem && !phys_mem && !self.is_vf {
                    // A backdoor reset lost the BARs: put them back before decoding.
                    self.restore_bars(m);
                }
                vc(m)?.default_write(f, b, pos, n, val)?;
                let mask = regs::COMMAND_MEMORY | regs::COMMAND_IO;
                let v = vc(m)?;
                let cmd = (v.command() & !mask) | (new_cmd & mask);
                v.set(regs::COMMAND, 2, u32::from(cmd));
                self.unrevoke_after_write(m);
            }
            Owner::Header => {
                let v = vc(m)?;
                v.default_write(f, b, pos, n, val)?;
                if (regs::BASE_ADDRESS_0..0x34).contains(&pos) {
                    v.bar_dirty = true;
                }
            }
            Owner::Pm(cap) => {
                vc(m)?.default_write(f, b, pos, n, val)?;
                if pos == cap + regs::PM_CTRL {
                    // `vfio_lock_and_set_power_state`.
                    let state = val as u16 & regs::PM_CTRL_STATE_MASK;
                    if state >= 3 {
                        m.move_bufs(true);
                    }
                    if !m.engaged {
                        let at = cap + regs::PM_CTRL;
                        let hw = f.config_read(b, at, 2).map_err(|_| Errno::EIO)? as u16;
                        let new = (hw & !regs::PM_CTRL_STATE_MASK) | state;
                        let _ = f.config_write(b, at, 2, u32::from(new));
                    }
                    self.unrevoke_after_write(m);
                }
            }
            Owner::Exp(cap) | Owner::Af(cap) => {
                // `vfio_exp_config_write` / `vfio_af_config_write`: after the write, a set
                // (virtualised) FLR bit is cleared, and the function reset if its capability
                // register advertises FLR (for AF, FLR and TP).
                let v = vc(m)?;
                v.default_write(f, b, pos, n, val)?;
                let (ctl, width, bit, cap_at, cap_width, need) = if matches!(owner, Owner::Exp(_)) {
                    (
                        regs::EXP_DEVCTL,
                        2,
                        u32::from(regs::EXP_DEVCTL_BCR_FLR),
                        regs::EXP_DEVCAP,
                        4,
                        regs::EXP_DEVCAP_FLR,
                    )
                } else {
                    (
                        regs::AF_CTRL,
                        1,
                        u32::from(regs::AF_CTRL_FLR),
                        regs::AF_CAP,
                        1,
                        u32::from(regs::AF_CAP_FLR | regs::AF_CAP_TP),
                    )
                };
                let c = v.get(cap + ctl, width);
                if c & bit != 0 {
                    v.set(cap + ctl, width, c & !bit);
                    let has = f.config_read(b, cap + cap_at, cap_width).unwrap_or(0);
                    if has & need == need {
                        self.config_flr(m);
                    }
                }
            }
            Owner::Other => {
                f.config_write(b, pos, n, val).map_err(|_| Errno::EIO)?;
            }
        }
        Ok(())
    }

    /// The FLR a user's config write asked for: revoke, `pci_try_reset_function` (its result
    /// ignored, as the kernel does), unrevoke if memory is enabled. During low power the
    /// device is put back to D3hot after the reset and the buffers stay revoked.
    fn config_flr(&self, m: &mut MemGuard<'_>) {
        m.move_bufs(true);
        let _ = self.fabric.reset_function(self.bdf);
        if m.engaged {
            let _ = self.fabric.set_power_state(self.bdf, PowerState::D3Hot);
        }
        self.unrevoke_after_write(m);
    }

    /// `vfio_bar_restore`: the BAR registers written back as they were at the first open.
    fn restore_bars(&self, m: &MemGuard<'_>) {
        let Some(v) = m.vconfig.as_ref() else { return };
        for (at, orig) in vcfg::BAR_REGS.into_iter().zip(v.bars_at_open) {
            let _ = self.fabric.config_write(self.bdf, at, 4, orig);
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
        let dev = Arc::new(Dev {
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
            wake_armed: AtomicBool::new(false),
        });
        dev.fabric.subscribe(Arc::new(Watch(Arc::downgrade(&dev))));
        Ok(VfioPci { dev })
    }

    /// The function.
    pub fn bdf(&self) -> Bdf {
        self.dev.bdf
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
            let _ = d.fabric.set_power_state(d.bdf, PowerState::D0);
            let cmd = (d.command_hw() | regs::COMMAND_MEMORY) & !regs::COMMAND_MASTER;
            let _ = d
                .fabric
                .config_write(d.bdf, regs::COMMAND, 2, u32::from(cmd));
            m.vconfig = VConfig::init(&d.fabric, d.bdf).ok();
            m.engaged = false;
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
        match f {
            id::DMA_BUF => self.dma_buf(proc, &req),
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
                let (fd, reserved) = (i32::from_le_bytes(word(0)?), u32::from_le_bytes(word(4)?));
                // A negative fd is refused before it is looked up (7.2, as observed).
                if reserved != 0 || fd < 0 {
                    return Err(Errno::EINVAL);
                }
                let file = proc.fget(fd)?;
                if !matches!(file.kind(), FileKind::Other(k) if k == "eventfd") {
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

    fn low_power_entry(&self, wake: Option<Arc<File>>) -> Result<(), Errno> {
        let d = &self.dev;
        let mut m = d.lock_mem();
        // Linux revokes before checking whether low power is already engaged, and a second
        // entry then fails without unrevoking; here the check comes first
        // (docs/divergences.md).
        if m.engaged {
            m.puts.extend(wake);
            return Err(Errno::EINVAL);
        }
        m.move_bufs(true);
        m.engaged = true;
        d.wake_armed.store(wake.is_some(), Ordering::Release);
        m.wake = wake;
        let _ = d.fabric.set_power_state(d.bdf, PowerState::D3Hot);
        Ok(())
    }

    /// Leaves low power (explicitly, or woken): D0, the wake eventfd let go, and — once
    /// memory is enabled — the buffers back. Linux skips that last part on a wakeup
    /// (divergence 7).
    fn leave_low_power(d: &Dev, m: &mut MemGuard<'_>) {
        if m.engaged {
            let _ = d.fabric.set_power_state(d.bdf, PowerState::D0);
        }
        d.disengage(m);
        d.unrevoke_if_enabled(m);
    }

    fn low_power_exit(&self) {
        let d = &self.dev;
        let mut m = d.lock_mem();
        Self::leave_low_power(d, &mut m);
    }

    /// Every device-fd ioctl runtime-resumes the device first; a device asleep in a
    /// wakeup-armed low power wakes for good: the eventfd is signalled and low power left.
    fn ioctl_resume(&self) {
        let d = &self.dev;
        // Only a device asleep with a wakeup armed has anything to do (and only then is
        // `memory_lock` taken, as the runtime-resume callback takes it).
        if !d.wake_armed.load(Ordering::Acquire) {
            return;
        }
        let mut m = d.lock_mem();
        // An armed wake implies low power is engaged.
        if m.wake.is_some() {
            m.wakeups += 1;
            Self::leave_low_power(d, &mut m);
        }
    }

    /// How many times an access woke the device out of a wakeup-armed low power (each one
    /// signals the eventfd given at entry).
    pub fn wakeups(&self) -> u32 {
        self.dev.read_mem(|m| m.wakeups)
    }

    /// A user config read of 1, 2 or 4 bytes at `offset`, as a little-endian value (see
    /// [`Self::read_config`]; other sizes `EINVAL`).
    pub fn config_read(&self, offset: u16, size: usize) -> Result<u32, Errno> {
        if !matches!(size, 1 | 2 | 4) {
            self.granted()?;
            return Err(Errno::EINVAL);
        }
        let mut b = [0u8; 4];
        self.read_config(offset, &mut b[..size])?;
        Ok(u32::from_le_bytes(b))
    }

    /// A user read of config space (a `pread` of the config region): any length, in the
    /// kernel's chunks, virtualised registers from the per-open copy (see [`crate::config`]).
    /// `EFAULT` past the config size.
    pub fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), Errno> {
        self.granted()?;
        let d = &self.dev;
        let mut m = d.lock_mem();
        let v = m.vconfig.as_mut().ok_or(Errno::EINVAL)?;
        let mut at = 0;
        for (pos, n) in vcfg::chunks(&v.layout, offset, buf.len())? {
            let val = v.read(&d.fabric, d.bdf, pos, n)?;
            for (i, b) in buf[at..at + n].iter_mut().enumerate() {
                *b = (val >> (8 * i)) as u8;
            }
            at += n;
        }
        Ok(())
    }

    /// A user write to config space (a `pwrite` of the config region): any length, cut into
    /// the kernel's chunks, each through its register's rules (see [`crate::config`]).
    /// COMMAND with memory off revokes, and every COMMAND write then unrevokes if memory is
    /// enabled; a PMCSR write of D3hot revokes and the power change unrevokes if memory is
    /// enabled; a PCIe or AF FLR revokes, resets and unrevokes. During runtime low power
    /// nothing a user writes brings buffers back or changes the power state (divergence 6).
    /// `EFAULT` past the config size; a chunk that fails stops the write there.
    pub fn config_write(&self, offset: u16, data: &[u8]) -> Result<(), Errno> {
        self.granted()?;
        let d = &self.dev;
        let mut m = d.lock_mem();
        let layout = m.vconfig.as_ref().ok_or(Errno::EINVAL)?.layout;
        let mut at = 0;
        for (pos, n) in vcfg::chunks(&layout, offset, data.len())? {
            let val = data[at..at + n]
                .iter()
                .enumerate()
                .fold(0u32, |v, (i, b)| v | u32::from(*b) << (8 * i));
            d.write_chunk(&mut m, pos, n, val)?;
            at += n;
        }
        Ok(())
    }

    /// `VFIO_DEVICE_RESET`: `EINVAL` if the function cannot be reset; else revoke, force D0,
    /// reset, unrevoke if memory is enabled.
    pub fn reset(&self) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        let d = &self.dev;
        let func = d.fabric.function(d.bdf).map_err(|_| Errno::ENODEV)?;
        // Reset methods in the kernel's order: FLR, AF FLR, then a bus reset when the device
        // is alone below its bridge (how a device without FLR behind a switch port resets).
        let bus = if func.has_flr() || func.has_af_flr() {
            None
        } else {
            match d.bus_scope() {
                Some((bridge, affected)) if affected == [d.bdf] => Some((bridge, affected)),
                _ => return Err(Errno::EINVAL),
            }
        };
        let mut m = d.lock_mem();
        m.move_bufs(true);
        let _ = d.fabric.set_power_state(d.bdf, PowerState::D0);
        let r = match &bus {
            None => d
                .fabric
                .reset_function(d.bdf)
                .map(|_| ())
                .map_err(|_| Errno::EIO),
            Some((bridge, affected)) => d.secondary_bus_reset(*bridge, affected),
        };
        d.unrevoke_if_enabled(&mut m);
        r
    }

    /// `VFIO_DEVICE_PCI_HOT_RESET`: a secondary bus reset of the bridge above this device.
    /// Every function below that bridge must be one of `owned` (`EINVAL` otherwise, as for a
    /// device the caller does not own); each device's `memory_lock` is only tried (`EBUSY` if
    /// contended). Each device is revoked before the reset; afterwards, in reverse order, a
    /// device that is open and has memory enabled is unrevoked.
    pub fn hot_reset(&self, owned: &[&VfioPci]) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        let d = &self.dev;
        let (bridge, affected) = d.bus_scope().ok_or(Errno::EINVAL)?;
        let mut set: Vec<&Arc<Dev>> = Vec::new();
        for b in &affected {
            let v = owned
                .iter()
                .find(|v| v.dev.bdf == *b)
                .ok_or(Errno::EINVAL)?;
            set.push(&v.dev);
        }
        let mut locked: Vec<(&Arc<Dev>, MemGuard<'_>)> = Vec::new();
        let mut res = Ok(());
        for dev in &set {
            if let Some(m) = dev.try_lock_mem() {
                m.move_bufs(true);
                locked.push((dev, m));
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
        }
        res
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
                m.cleanup_bufs();
                d.disengage(&mut m);
                let _ = d.fabric.set_power_state(d.bdf, PowerState::D0);
                let cmd = d.command_hw() & !(regs::COMMAND_MEMORY | regs::COMMAND_MASTER);
                let _ = d
                    .fabric
                    .config_write(d.bdf, regs::COMMAND, 2, u32::from(cmd));
                m.vconfig = None;
            }
            m.open_count = m.open_count.saturating_sub(1);
        }
        drop(reg);
    }

    /// `VFIO_DEVICE_FEATURE_DMA_BUF` (GET): validation in the kernel's order, then export.
    fn dma_buf(&self, proc: &Process, req: &feature::Request<'_>) -> Result<i32, Errno> {
        let d = &self.dev;
        if !feature::check_feature(req.flags, req.data_argsz(), GET, DMA_BUF_LEN as u32)? {
            return Ok(0);
        }
        let hdr = parse_dma_buf(req.data).ok_or(Errno::EFAULT)?;
        if hdr.nr_ranges == 0 || hdr.flags != 0 {
            return Err(Errno::EINVAL);
        }
        if hdr.region_index >= ROM_REGION_INDEX {
            return Err(Errno::ENODEV);
        }
        let idx = hdr.region_index as u8;
        let mem = d.variant.mem_region(idx);
        // A real BAR is claimed (requested and mapped) before the ranges are looked at.
        let (start, region_len) = if let Some(m) = mem {
            (Some(m.phys), m.len)
        } else {
            let bar = d.fabric.bar(d.bdf, idx).map_err(|_| Errno::ENODEV)?;
            if bar.bar.size == 0 {
                return Err(Errno::ENODEV);
            }
            (bar.cpu.map(PhysAddr::get), bar.bar.size)
        };
        let n = hdr.nr_ranges as usize;
        // kvmalloc refuses more than INT_MAX bytes.
        if n.checked_mul(16).is_none_or(|b| b > i32::MAX as usize) {
            return Err(Errno::ENOMEM);
        }
        let mut raw = Vec::new();
        raw.try_reserve_exact(n).map_err(|_| Errno::ENOMEM)?;
        for i in 0..n {
            raw.push(parse_range(req.data, i).ok_or(Errno::EFAULT)?);
        }
        let mut total = 0u64;
        for &(off, len) in &raw {
            if len == 0 || off % PAGE != 0 || len % PAGE != 0 {
                return Err(Errno::EINVAL);
            }
            total = total.checked_add(len).ok_or(Errno::EINVAL)?;
        }
        if total & (1 << 63) != 0 {
            return Err(Errno::EINVAL);
        }
        let pbar = mem.map_or(idx, |m| m.provider_bar);
        let (true, Ok(Some(provider))) = (d.p2p, d.binding.provider(pbar)) else {
            return Err(Errno::EINVAL);
        };
        let start = start.ok_or(Errno::EINVAL)?;
        let mut ranges = Vec::with_capacity(n);
        for &(off, len) in &raw {
            let paddr = start.checked_add(off).ok_or(Errno::EOVERFLOW)?;
            let end = paddr.checked_add(len).ok_or(Errno::EOVERFLOW)?;
            if end > start.saturating_add(region_len) {
                return Err(Errno::EINVAL);
            }
            ranges.push(PhysVec {
                paddr: PhysAddr(paddr),
                len,
            });
        }
        let reg = d.reg.try_get("dma-buf").ok_or(Errno::ENODEV)?;
        let state = Arc::new(BufState {
            file: Mutex::new(None),
            revoked: AtomicBool::new(false),
            ranges,
            provider,
            env: d.env.clone(),
            dev: Mutex::new(Some(Arc::downgrade(d))),
            reg: Mutex::new(Some(reg)),
            maps: AtomicUsize::new(0),
            unmapped_lock: Mutex::new(()),
            unmapped: Condvar::new(),
            watch: Arc::new(BufWatch::new(d.exported.fetch_add(1, Ordering::AcqRel) + 1)),
            ledger: d.ledger.clone(),
        });
        let file = peerdma_dmabuf::export(ExportInfo {
            exp_name: "vfio_pci_core".into(),
            size: total,
            flags: hdr.open_flags,
            ops: Some(Arc::new(Exporter(state.clone()))),
            has_priv: true,
        })?;
        sync::points::point("vfio.export.unlinked");
        {
            let mut m = d.lock_mem();
            let buf = file.dmabuf().ok_or(Errno::EINVAL)?;
            let _g = buf.lock();
            let born_revoked = !d.memory_enabled(&m);
            state.revoked.store(born_revoked, Ordering::Release);
            if born_revoked {
                state.revoke_finished();
            }
            *sync::lock(&state.file) = Some(file.clone());
            m.bufs.push(Linked {
                state,
                buf: buf.clone(),
            });
        }
        match proc.install(file, hdr.open_flags & O_CLOEXEC != 0) {
            Ok(fd) => Ok(fd),
            Err((e, file)) => {
                // Only the buffer is dropped: its release unlinks it and puts the registration.
                file.put();
                Err(e)
            }
        }
    }
}

impl Drop for DeviceFd {
    fn drop(&mut self) {
        self.close_inner();
    }
}

/// Runs `f` on the ledger of the vfio buffer `buf` (`None` for another exporter's buffer).
pub(crate) fn with_ledger<R>(
    buf: &DmaBuf,
    f: impl FnOnce(&Ledger, &Arc<BufWatch>, &Fabric) -> R,
) -> Option<R> {
    let e = exporter_of(buf)?;
    Some(f(&e.0.ledger, &e.0.watch, e.0.env.dma.fabric()))
}

/// The vfio exporter behind `buf`, through the private interconnect (`None` for a buffer of
/// another exporter).
fn exporter_of(buf: &DmaBuf) -> Option<&Exporter> {
    buf.ops()
        .interconnect()
        .and_then(|x| x.downcast_ref::<Exporter>())
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
