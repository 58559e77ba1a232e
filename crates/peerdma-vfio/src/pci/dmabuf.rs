//! The dma-buf side of a vfio-pci device (drivers/vfio/pci/vfio_pci_dmabuf.c): the exporter
//! and its per-buffer state, the `VFIO_DEVICE_FEATURE_DMA_BUF` export, the revoke and
//! unrevoke walk over the device's buffers (`vfio_pci_dma_buf_move`), the cleanup at close,
//! and the private interconnect iommufd maps through. Locking: see [`super`].

/// `KMALLOC_MAX_SIZE` on x86-64 (4 MiB: 262,144 ranges of 16 bytes).
const KMALLOC_MAX_SIZE: usize = 4 << 20;

use super::{
    Arc, AtomicBool, AtomicUsize, Attachment, BufWatch, Condvar, DMA_BUF_LEN, Dev, DeviceFd,
    Direction, DmaBuf, DmaBufOps, DmaEnv, Duration, Errno, ExportInfo, Fabric, File, GET, Ledger,
    Mem, Mutex, O_CLOEXEC, Ordering, PAGE, PhysAddr, PhysVec, Piece, Process, Provider,
    ROM_REGION_INDEX, RegRef, ResvGuard, SgTable, Usage, Weak, feature, free_sgt, ops,
    parse_dma_buf, parse_range, phys_vec_to_sgt, sync,
};

/// How far ahead of itself the revoke walk reads (see [`Mem::move_bufs`]).
const WALK_AHEAD: usize = 8;

/// Asks the CPU to bring the first cache lines of `v` closer (x86-64; nothing elsewhere).
#[inline]
fn prefetch<T>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = std::ptr::from_ref(v).cast::<i8>();
        for line in 0..std::mem::size_of::<T>().div_ceil(64).min(3) {
            // SAFETY: PREFETCHT0 is a hint that neither reads nor writes program-visible
            // memory and never faults, whatever the address; SSE, which it needs, is part
            // of the x86-64 baseline. `wrapping_add` keeps the address computation defined.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// A buffer on the device's list.
pub(super) struct Linked {
    state: Arc<BufState>,
    buf: Arc<DmaBuf>,
}

impl std::fmt::Debug for Linked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dma-buf #{}", self.state.watch.serial)
    }
}

/// A vfio dma-buf's exporter state (`struct vfio_pci_dma_buf`). Laid out in declaration
/// order so that what the revoke walk reads of every buffer (`revoked`, `maps`, the
/// ledger's address) shares the first cache line.
#[repr(C)]
pub(super) struct BufState {
    revoked: AtomicBool,
    /// Importer mappings not yet given back; changed under the reservation lock (and, for
    /// the revoke's wait, announced under `unmapped_lock`).
    maps: AtomicUsize,
    /// The ledger this buffer's mappings go in (the device's, which outlives the device's
    /// link to the buffer).
    ledger: Arc<Ledger>,
    file: Mutex<Option<Arc<File>>>,
    ranges: Vec<PhysVec>,
    provider: Provider,
    env: DmaEnv,
    /// The device, until close cleanup or release unlinks the buffer.
    dev: Mutex<Option<Weak<Dev>>>,
    reg: Mutex<Option<RegRef>>,
    unmapped_lock: Mutex<()>,
    unmapped: Condvar,
    /// The watch's view of the buffer.
    watch: Arc<BufWatch>,
}

pub(super) struct Exporter(pub(super) Arc<BufState>);

impl DmaBufOps for Exporter {
    fn provides(&self) -> u32 {
        // No pin or unpin (`vfio_pci_dmabuf_ops` has neither): `dma_buf_pin` of a vfio
        // buffer is 0, and what keeps an importer's mapping safe is revocation, not a pin.
        ops::MAP | ops::UNMAP | ops::RELEASE
    }
    fn attach(&self, _buf: &DmaBuf, a: &Attachment) -> Result<(), Errno> {
        // `vfio_pci_dma_buf_attach`'s order: peer-to-peer, then revoked, then revocable.
        if !a.peer2peer {
            return Err(Errno::EOPNOTSUPP);
        }
        if self.0.revoked.load(Ordering::Acquire) {
            return Err(Errno::ENODEV);
        }
        if !a.is_revocable() {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(())
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

impl Mem {
    /// `vfio_pci_dma_buf_move`: every linked buffer not already in the state `revoked` is
    /// moved to it under its reservation lock, its importers told; a revoke then waits for
    /// every importer mapping to be given back.
    pub(super) fn move_bufs(&self, revoked: bool) {
        for (i, l) in self.bufs.iter().enumerate() {
            // The walk is a chain of lock round trips, each waiting for the memory it needs;
            // asking for a buffer a few places ahead before this one's lock lets those
            // fetches overlap (a hint only: nothing is read or written).
            if let Some(ahead) = self.bufs.get(i + WALK_AHEAD) {
                prefetch(&*ahead.state);
                prefetch(&*ahead.buf);
            }
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
                // Both ways the kernel then waits for every fence, bookkeeping ones included,
                // before the buffer changes state for the importers.
                g.wait_all(Usage::Bookkeep);
                if !revoked {
                    b.revoked.store(false, Ordering::Release);
                }
            }
            if revoked {
                b.wait_unmapped();
                b.revoke_finished();
            }
        }
    }

    /// `vfio_pci_dma_buf_cleanup`: every buffer revoked through the revoke walk (which
    /// leaves already revoked ones alone, as the kernel's does), then unlinked for good with
    /// its device link and registration reference dropped.
    pub(super) fn cleanup_bufs(&mut self) {
        self.move_bufs(true);
        for l in std::mem::take(&mut self.bufs) {
            sync::lock(&l.state.dev).take();
            sync::lock(&l.state.reg).take();
        }
    }
}

impl DeviceFd {
    /// `VFIO_DEVICE_FEATURE_DMA_BUF` (GET): validation in the kernel's order, then export.
    pub(super) fn dma_buf(&self, proc: &Process, req: &feature::Request<'_>) -> Result<i32, Errno> {
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
        // `memdup_array_user` copies the ranges into one kmalloc allocation, which is
        // refused above KMALLOC_MAX_SIZE before a byte of the caller's buffer is read.
        if n.checked_mul(16).is_none_or(|b| b > KMALLOC_MAX_SIZE) {
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
            // Born revoked while memory is off, and while low power is engaged whether or not
            // the kernel could suspend the device (without CONFIG_PM it stays in D0):
            // divergence 6.
            let born_revoked = !d.memory_enabled(&m) || m.engaged;
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
