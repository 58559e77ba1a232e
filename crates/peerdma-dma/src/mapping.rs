//! The streaming DMA API on physical addresses: `dma_map_phys` / `dma_unmap_phys`, dma-direct
//! (with swiotlb bouncing and cache maintenance for non-coherent devices), iommu-dma (IOVA
//! allocation and IOMMU mapping), `dma_map_resource`, sync calls, and DMA-debug accounting.
//!
//! Rules (kernel/dma/mapping.c, direct.h, dma-iommu.c as of Linux 7.2):
//! - A device uses iommu-dma when it is attached to a paging domain, else dma-direct.
//! - **dma-direct**: forced swiotlb bounces every non-MMIO mapping and refuses MMIO; MMIO is
//!   returned untranslated (no range-map offset) after the capability check; RAM gets
//!   `phys + range offset` and bounces when not addressable (if swiotlb is active) or fails.
//!   Non-coherent devices get `arch_sync_dma_for_device` unless `SKIP_CPU_SYNC` or MMIO.
//! - **iommu-dma**: an untrusted device with a buffer not granule-aligned at start or size is
//!   bounced (MMIO: refused); otherwise the IOVA is allocated (below 4 GiB first for PCI
//!   devices, until that fails once), the granule-aligned range mapped with the protection the
//!   direction and attributes give, and `iova + (phys & (granule − 1))` returned. Unmap frees
//!   the IOVA after unmapping and syncing the IOTLB (strict mode).
//! - `dma_map_resource` = `dma_map_phys` with `DMA_ATTR_MMIO`.

use std::collections::{BTreeMap, HashMap};
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use peerdma_pci::sync::{self, Arc, Mutex, RwLock};
use peerdma_pci::{AsErrno, Bdf, DmaAddr, Errno, Fabric, PhysAddr};

use crate::iommu::{APERTURE_END, Attach, DomainId, GRANULE, Iommu, prot};
use crate::iova::IovaDomain;

/// `DMA_MAPPING_ERROR`: all ones.
pub const DMA_MAPPING_ERROR: u64 = u64::MAX;

/// `DMA_BIT_MASK(n)`.
pub const fn dma_bit_mask(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// DMA attributes (`DMA_ATTR_*`).
pub mod attrs {
    /// The caller syncs the CPU caches itself.
    pub const SKIP_CPU_SYNC: u32 = 1 << 5;
    /// Privileged (supervisor) access only.
    pub const PRIVILEGED: u32 = 1 << 9;
    /// The address is MMIO: never cached, never bounced, never synced.
    pub const MMIO: u32 = 1 << 10;
}

/// `enum dma_data_direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Both ways.
    Bidirectional = 0,
    /// CPU → device.
    ToDevice = 1,
    /// Device → CPU.
    FromDevice = 2,
    /// No access.
    None = 3,
}

/// swiotlb for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swiotlb {
    /// No bounce pool.
    Off,
    /// Bounce only what the device cannot address (or, under an IOMMU, unaligned buffers of
    /// untrusted devices).
    Active,
    /// Bounce every non-MMIO streaming mapping (`swiotlb=force`, confidential guests).
    Forced,
}

/// Per-device DMA configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaConfig {
    /// `*dev->dma_mask`; `None` models a device without a DMA mask (every map fails).
    pub mask: Option<u64>,
    /// `bus_dma_limit` (0 = none).
    pub bus_dma_limit: u64,
    /// Cache-coherent DMA.
    pub coherent: bool,
    /// The `dma_range_map` offset: RAM at CPU `phys` is at `phys + offset` on the bus.
    pub range_offset: u64,
    /// swiotlb.
    pub swiotlb: Swiotlb,
    /// External-facing (untrusted) device.
    pub untrusted: bool,
    /// Use iommu-dma (a paging domain of its own); else dma-direct (identity under an IOMMU).
    pub iommu: bool,
}

impl Default for DmaConfig {
    fn default() -> Self {
        DmaConfig {
            mask: Some(dma_bit_mask(64)),
            bus_dma_limit: 0,
            coherent: true,
            range_offset: 0,
            swiotlb: Swiotlb::Active,
            untrusted: false,
            iommu: false,
        }
    }
}

/// Why a mapping failed (`dma_mapping_error()` says `ENOMEM` for all of them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The device has no DMA mask.
    #[error("device has no DMA mask")]
    NoDmaMask,
    /// The device is not configured for DMA in this system.
    #[error("{0} is not a DMA device here")]
    UnknownDevice(Bdf),
    /// The address is beyond what the device can reach (the kernel's overflow warning).
    #[error("DMA addr {addr:#x}+{size} overflow (mask {mask:x}, bus limit {limit:x})")]
    Overflow {
        /// The address.
        addr: u64,
        /// The size.
        size: u64,
        /// The mask.
        mask: u64,
        /// The bus limit.
        limit: u64,
    },
    /// MMIO cannot be bounced.
    #[error("MMIO cannot go through swiotlb")]
    MmioNeedsBounce,
    /// swiotlb would be needed but is off.
    #[error("DMA bounce buffers are inactive, unable to map unaligned transaction")]
    SwiotlbInactive,
    /// No room in the bounce pool.
    #[error("swiotlb buffer is full")]
    SwiotlbFull,
    /// No IOVA space below the limit.
    #[error("no IOVA space for {0} bytes")]
    IovaExhausted(u64),
    /// The IOMMU refused the mapping.
    #[error("iommu_map failed: {0}")]
    IommuMap(Errno),
    /// Zero-length or wrapping request.
    #[error("bad size")]
    BadSize,
}

impl AsErrno for MapError {
    fn errno(&self) -> Errno {
        Errno::ENOMEM
    }
}

/// `dma_info_to_prot(dir, coherent, attrs)`.
pub fn dma_info_to_prot(dir: Direction, coherent: bool, attrs: u32) -> u32 {
    let mut p = if attrs & attrs::MMIO != 0 {
        prot::MMIO
    } else if coherent {
        prot::CACHE
    } else {
        0
    };
    if attrs & attrs::PRIVILEGED != 0 {
        p |= prot::PRIV;
    }
    match dir {
        Direction::Bidirectional => p | prot::READ | prot::WRITE,
        Direction::ToDevice => p | prot::READ,
        Direction::FromDevice => p | prot::WRITE,
        Direction::None => 0,
    }
}

/// Where in the source a DMA call was made (file:line:column).
pub type Site = &'static Location<'static>;

/// One mapping DMA debug knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugEntry {
    /// Device.
    pub dev: Bdf,
    /// DMA address handed out.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// Direction.
    pub dir: Direction,
    /// Where it was made (file:line).
    pub at: Site,
}

/// What DMA debug complains about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebugIssue {
    /// Still mapped.
    Leak(DebugEntry),
    /// Unmap of an address that is not mapped (a double unmap names the earlier unmap).
    NotMapped {
        /// Device.
        dev: Bdf,
        /// Address.
        addr: u64,
        /// Where the bad unmap was.
        at: Site,
        /// Where it was unmapped before, if it was.
        previously: Option<Site>,
    },
    /// Unmapped with another size than mapped.
    WrongSize {
        /// The mapping.
        entry: DebugEntry,
        /// Size given at unmap.
        size: u64,
        /// Where the unmap was.
        at: Site,
    },
    /// Unmapped with another direction than mapped.
    WrongDirection {
        /// The mapping.
        entry: DebugEntry,
        /// Direction given at unmap.
        dir: Direction,
        /// Where the unmap was.
        at: Site,
    },
}

#[derive(Debug, Default)]
struct Debug {
    live: HashMap<(Bdf, u64), DebugEntry>,
    gone: HashMap<(Bdf, u64), Site>,
    errors: Vec<DebugIssue>,
}

/// Cache-maintenance and bounce counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// `arch_sync_dma_for_device` calls.
    pub sync_for_device: AtomicU64,
    /// `arch_sync_dma_for_cpu` calls.
    pub sync_for_cpu: AtomicU64,
    /// Bytes copied by swiotlb, both ways.
    pub bounced_bytes: AtomicU64,
}

struct Bounce {
    orig: u64,
    size: u64,
    slots: (u64, u64),
}

/// The swiotlb pool: a region of RAM cut into 2 KiB slots.
struct Pool {
    base: u64,
    slots: Vec<bool>,
    live: BTreeMap<u64, Bounce>,
}

/// swiotlb slot size (`IO_TLB_SIZE`).
pub const IO_TLB_SIZE: u64 = 2048;

pub(crate) struct Dev {
    pub(crate) cfg: DmaConfig,
    pub(crate) domain: Option<DomainId>,
    pub(crate) iovad: Mutex<IovaDomain>,
    pci_32bit_workaround: AtomicBool,
}

/// The DMA layer of one emulated machine.
pub struct DmaSystem {
    fabric: Arc<Fabric>,
    iommu: Option<Arc<Iommu>>,
    devs: RwLock<HashMap<Bdf, Arc<Dev>>>,
    pool: Mutex<Option<Pool>>,
    debug: Mutex<Debug>,
    debug_on: std::sync::atomic::AtomicBool,

    notices: Mutex<Vec<String>>,
    /// Counters.
    pub counters: Counters,
}

impl std::fmt::Debug for DmaSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSystem")
            .field("iommu", &self.iommu.is_some())
            .finish_non_exhaustive()
    }
}

impl DmaSystem {
    /// The DMA layer of a fabric. With `iommu`, an IOMMU is installed as the root complex's
    /// translator (devices not configured for iommu-dma are in identity domains).
    pub fn new(fabric: Arc<Fabric>, iommu: bool) -> DmaSystem {
        let iommu = iommu.then(|| {
            let m = Arc::new(Iommu::new(Attach::Identity));
            fabric.set_translator(m.clone());
            m
        });
        DmaSystem {
            fabric,
            iommu,
            devs: RwLock::new(HashMap::new()),
            pool: Mutex::new(None),
            debug: Mutex::new(Debug::default()),
            debug_on: std::sync::atomic::AtomicBool::new(true),

            notices: Mutex::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    /// The fabric.
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    /// The IOMMU, if any.
    pub fn iommu(&self) -> Option<&Arc<Iommu>> {
        self.iommu.as_ref()
    }

    /// Sets up the swiotlb pool: `size` bytes of RAM at `base` (CPU physical).
    pub fn set_swiotlb_pool(&self, base: PhysAddr, size: u64) {
        *sync::lock(&self.pool) = Some(Pool {
            base: base.get(),
            slots: vec![false; (size / IO_TLB_SIZE) as usize],
            live: BTreeMap::new(),
        });
    }

    /// Configures a device. With `cfg.iommu` (and an IOMMU) it gets a paging domain of its own
    /// and an IOVA allocator whose host-bridge windows are reserved.
    pub fn configure(&self, bdf: Bdf, cfg: DmaConfig) -> Result<(), Errno> {
        let f = self.fabric.function(bdf).map_err(|_| Errno::ENODEV)?;
        let _ = f;
        let domain = match (&self.iommu, cfg.iommu) {
            (Some(m), true) => {
                let d = m.new_domain();
                m.attach(bdf, Attach::Paging(d))?;
                Some(d)
            }
            (Some(m), false) => {
                m.attach(bdf, Attach::Identity)?;
                None
            }
            (None, _) => None,
        };
        let mut iovad = IovaDomain::new(12, 1);
        if let Ok(hb) = self.fabric.host_bridge_of(bdf) {
            for w in hb.mmio() {
                iovad.reserve(w.bus >> 12, (w.bus + w.size - 1) >> 12);
            }
        }
        let dev = Dev {
            cfg,
            domain,
            iovad: Mutex::new(iovad),
            pci_32bit_workaround: AtomicBool::new(true),
        };
        sync::write(&self.devs).insert(bdf, Arc::new(dev));
        Ok(())
    }

    pub(crate) fn dev(&self, bdf: Bdf) -> Result<Arc<Dev>, MapError> {
        sync::read(&self.devs)
            .get(&bdf)
            .cloned()
            .ok_or(MapError::UnknownDevice(bdf))
    }

    /// The paging domain of a device using iommu-dma.
    pub fn domain_of(&self, bdf: Bdf) -> Option<DomainId> {
        sync::read(&self.devs).get(&bdf).and_then(|d| d.domain)
    }

    /// Whether the device uses iommu-dma.
    pub fn uses_iommu(&self, bdf: Bdf) -> bool {
        self.domain_of(bdf).is_some()
    }

    /// `dma_get_mask`: the mask, or 32 bits without one.
    pub fn dma_mask(&self, bdf: Bdf) -> u64 {
        self.dev(bdf)
            .ok()
            .and_then(|d| d.cfg.mask)
            .filter(|&m| m != 0)
            .unwrap_or(dma_bit_mask(32))
    }

    /// Notices the layer printed (`Using %d-bit DMA addresses`).
    pub fn notices(&self) -> Vec<String> {
        sync::lock(&self.notices).clone()
    }

    /// `dma_map_phys(dev, phys, size, dir, attrs)`.
    #[track_caller]
    pub fn map_phys(
        &self,
        bdf: Bdf,
        phys: PhysAddr,
        size: u64,
        dir: Direction,
        attrs: u32,
    ) -> Result<DmaAddr, MapError> {
        let at = Location::caller();
        let dev = self.dev(bdf)?;
        if dev.cfg.mask.is_none() {
            return Err(MapError::NoDmaMask);
        }
        if size == 0 || phys.get().checked_add(size - 1).is_none() {
            return Err(MapError::BadSize);
        }
        let r = match dev.domain {
            Some(d) => self.iommu_map(bdf, &dev, d, phys.get(), size, dir, attrs),
            None => self.direct_map(&dev, phys.get(), size, dir, attrs),
        };
        if let Some(a) = r.as_ref().ok().copied().filter(|_| self.debug_enabled()) {
            let mut d = sync::lock(&self.debug);
            // The address is live again: forget where it was last unmapped, so the record of
            // unmapped addresses stays as small as the set of addresses in use.
            d.gone.remove(&(bdf, a));
            d.live.insert(
                (bdf, a),
                DebugEntry {
                    dev: bdf,
                    addr: a,
                    size,
                    dir,
                    at,
                },
            );
        }
        r.map(DmaAddr)
    }

    /// `dma_map_resource`: `map_phys` with `DMA_ATTR_MMIO`.
    #[track_caller]
    pub fn map_resource(
        &self,
        bdf: Bdf,
        phys: PhysAddr,
        size: u64,
        dir: Direction,
        attrs: u32,
    ) -> Result<DmaAddr, MapError> {
        self.map_phys(bdf, phys, size, dir, attrs | attrs::MMIO)
    }

    /// `dma_unmap_phys(dev, addr, size, dir, attrs)`.
    #[track_caller]
    pub fn unmap_phys(&self, bdf: Bdf, addr: DmaAddr, size: u64, dir: Direction, attrs: u32) {
        let at = Location::caller();
        self.debug_unmap(bdf, addr.get(), size, dir, at);
        let Ok(dev) = self.dev(bdf) else { return };
        match dev.domain {
            Some(d) => self.iommu_unmap(&dev, d, addr.get(), size, dir, attrs),
            None => self.direct_unmap(&dev, addr.get(), size, dir, attrs),
        }
    }

    /// `dma_map_page_attrs(dev, page, offset, size, dir, attrs)`: the old page-based entry,
    /// now `map_phys` of `page + offset`. `DMA_ATTR_MMIO` is refused here (MMIO has no struct
    /// page; current kernels reject it), as is a page address that is not page aligned.
    #[track_caller]
    pub fn map_page(
        &self,
        bdf: Bdf,
        page: PhysAddr,
        offset: u64,
        size: u64,
        dir: Direction,
        attrs: u32,
    ) -> Result<DmaAddr, MapError> {
        if attrs & attrs::MMIO != 0 || page.get() % GRANULE != 0 {
            return Err(MapError::BadSize);
        }
        let phys = page.checked_add(offset).map_err(|_| MapError::BadSize)?;
        self.map_phys(bdf, phys, size, dir, attrs)
    }

    /// `dma_unmap_page_attrs`: with `DMA_ATTR_MMIO` it does nothing (as current kernels).
    #[track_caller]
    pub fn unmap_page(&self, bdf: Bdf, addr: DmaAddr, size: u64, dir: Direction, attrs: u32) {
        if attrs & attrs::MMIO != 0 {
            return;
        }
        self.unmap_phys(bdf, addr, size, dir, attrs);
    }

    /// `dma_unmap_resource`.
    #[track_caller]
    pub fn unmap_resource(&self, bdf: Bdf, addr: DmaAddr, size: u64, dir: Direction, attrs: u32) {
        self.unmap_phys(bdf, addr, size, dir, attrs | attrs::MMIO);
    }

    /// Turns DMA debug accounting on (the default) or off, as booting with or without
    /// `CONFIG_DMA_API_DEBUG`: choose before the first mapping, since mappings made while it
    /// is off are not known to it afterwards.
    pub fn set_debug(&self, on: bool) {
        self.debug_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn debug_enabled(&self) -> bool {
        self.debug_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn debug_unmap(&self, bdf: Bdf, addr: u64, size: u64, dir: Direction, at: Site) {
        if !self.debug_enabled() {
            return;
        }
        let mut d = sync::lock(&self.debug);
        match d.live.remove(&(bdf, addr)) {
            None => {
                let previously = d.gone.get(&(bdf, addr)).copied();
                d.errors.push(DebugIssue::NotMapped {
                    dev: bdf,
                    addr,
                    at,
                    previously,
                });
            }
            Some(e) => {
                if e.size != size {
                    d.errors.push(DebugIssue::WrongSize {
                        entry: e.clone(),
                        size,
                        at,
                    });
                }
                if e.dir != dir {
                    d.errors.push(DebugIssue::WrongDirection {
                        entry: e.clone(),
                        dir,
                        at,
                    });
                }
                d.gone.insert((bdf, addr), at);
            }
        }
    }

    /// Everything DMA debug has to say: errors so far, then every mapping still live (leaks).
    pub fn debug_report(&self) -> Vec<DebugIssue> {
        let d = sync::lock(&self.debug);
        let mut out = d.errors.clone();
        let mut leaks: Vec<&DebugEntry> = d.live.values().collect();
        leaks.sort_by_key(|e| (e.dev, e.addr));
        out.extend(leaks.into_iter().cloned().map(DebugIssue::Leak));
        out
    }

    /// IOVA pages of a device's DMA domain in use now (its range caches are flushed back to
    /// the tree first, so freed IOVAs do not count); 0 for a device without one.
    pub fn iova_pages_in_use(&self, bdf: Bdf) -> u64 {
        sync::read(&self.devs).get(&bdf).map_or(0, |d| {
            let mut iovad = sync::lock(&d.iovad);
            iovad.flush_caches();
            iovad.allocated_pages()
        })
    }

    /// DMA-debug entries still live for `bdf`.
    pub fn debug_outstanding(&self, bdf: Bdf) -> usize {
        sync::lock(&self.debug)
            .live
            .keys()
            .filter(|(b, _)| *b == bdf)
            .count()
    }

    // ----- dma-direct ---------------------------------------------------------------------

    fn capable(cfg: &DmaConfig, addr: u64, size: u64) -> bool {
        if addr == DMA_MAPPING_ERROR {
            return false;
        }
        let Some(end) = addr.checked_add(size - 1) else {
            return false;
        };
        let mask = cfg.mask.unwrap_or(0);
        let limit = match (mask, cfg.bus_dma_limit) {
            (0, l) | (l, 0) => l,
            (m, l) => m.min(l),
        };
        end <= limit
    }

    fn overflow(cfg: &DmaConfig, addr: u64, size: u64) -> MapError {
        MapError::Overflow {
            addr,
            size,
            mask: cfg.mask.unwrap_or(0),
            limit: cfg.bus_dma_limit,
        }
    }

    fn direct_map(
        &self,
        dev: &Dev,
        phys: u64,
        size: u64,
        dir: Direction,
        a: u32,
    ) -> Result<u64, MapError> {
        let cfg = &dev.cfg;
        let mmio = a & attrs::MMIO != 0;
        if cfg.swiotlb == Swiotlb::Forced {
            if mmio {
                return Err(MapError::MmioNeedsBounce);
            }
            return self
                .swiotlb_map(cfg, phys, size, dir)
                .map(|b| b.wrapping_add(cfg.range_offset));
        }
        let dma = if mmio {
            if !Self::capable(cfg, phys, size) {
                tracing::warn!(target: "peerdma::dma", "{}", Self::overflow(cfg, phys, size));
                return Err(Self::overflow(cfg, phys, size));
            }
            phys
        } else {
            let dma = phys.wrapping_add(cfg.range_offset);
            if !Self::capable(cfg, dma, size) {
                if cfg.swiotlb == Swiotlb::Active && sync::lock(&self.pool).is_some() {
                    return self
                        .swiotlb_map(cfg, phys, size, dir)
                        .map(|b| b.wrapping_add(cfg.range_offset));
                }
                return Err(Self::overflow(cfg, dma, size));
            }
            dma
        };
        if !cfg.coherent && a & (attrs::SKIP_CPU_SYNC | attrs::MMIO) == 0 {
            self.counters
                .sync_for_device
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(dma)
    }

    fn direct_unmap(&self, dev: &Dev, addr: u64, size: u64, dir: Direction, a: u32) {
        if a & attrs::MMIO != 0 {
            return;
        }
        let phys = addr.wrapping_sub(dev.cfg.range_offset);
        if a & attrs::SKIP_CPU_SYNC == 0 {
            self.sync_for_cpu_phys(&dev.cfg, phys, size, dir);
        }
        self.swiotlb_unmap(phys);
    }

    fn sync_for_cpu_phys(&self, cfg: &DmaConfig, phys: u64, size: u64, dir: Direction) {
        if !cfg.coherent {
            self.counters.sync_for_cpu.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(dir, Direction::FromDevice | Direction::Bidirectional) {
            self.bounce_copy(phys, size, false);
        }
    }

    /// `dma_sync_single_for_cpu`.
    pub fn sync_single_for_cpu(&self, bdf: Bdf, addr: DmaAddr, size: u64, dir: Direction) {
        let Ok(dev) = self.dev(bdf) else { return };
        if dev.domain.is_some() {
            if !dev.cfg.coherent {
                self.counters.sync_for_cpu.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.sync_for_cpu_phys(
            &dev.cfg,
            addr.get().wrapping_sub(dev.cfg.range_offset),
            size,
            dir,
        );
    }

    /// `dma_sync_single_for_device`.
    pub fn sync_single_for_device(&self, bdf: Bdf, addr: DmaAddr, size: u64, dir: Direction) {
        let Ok(dev) = self.dev(bdf) else { return };
        if !dev.cfg.coherent {
            self.counters
                .sync_for_device
                .fetch_add(1, Ordering::Relaxed);
        }
        if dev.domain.is_none() && matches!(dir, Direction::ToDevice | Direction::Bidirectional) {
            self.bounce_copy(addr.get().wrapping_sub(dev.cfg.range_offset), size, true);
        }
    }

    // ----- swiotlb ------------------------------------------------------------------------

    /// Bounces `[phys, +size)`: copies it into fresh slots (always, as current kernels do, so
    /// stale pool contents never reach the device) and returns the slot's CPU address.
    pub(crate) fn swiotlb_map(
        &self,
        cfg: &DmaConfig,
        phys: u64,
        size: u64,
        _dir: Direction,
    ) -> Result<u64, MapError> {
        let mut guard = sync::lock(&self.pool);
        let pool = guard.as_mut().ok_or(MapError::SwiotlbInactive)?;
        let n = size.div_ceil(IO_TLB_SIZE) as usize;
        let mut start = None;
        let mut run = 0;
        for (i, used) in pool.slots.iter().enumerate() {
            if *used {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    start = Some(i + 1 - n);
                    break;
                }
            }
        }
        let s = start.ok_or(MapError::SwiotlbFull)?;
        let tlb = pool.base + s as u64 * IO_TLB_SIZE;
        if !Self::capable(cfg, tlb.wrapping_add(cfg.range_offset), size) {
            return Err(Self::overflow(cfg, tlb, size));
        }
        pool.slots[s..s + n].fill(true);
        pool.live.insert(
            tlb,
            Bounce {
                orig: phys,
                size,
                slots: (s as u64, n as u64),
            },
        );
        drop(guard);
        self.copy_ram(phys, tlb, size);
        Ok(tlb)
    }

    fn copy_ram(&self, from: u64, to: u64, size: u64) {
        let mut buf = vec![0u8; size as usize];
        if self.fabric.ram_peek(PhysAddr(from), &mut buf).is_ok()
            && self.fabric.ram_poke(PhysAddr(to), &buf).is_ok()
        {
            self.counters
                .bounced_bytes
                .fetch_add(size, Ordering::Relaxed);
        }
    }

    /// Copies between a bounce slot at `tlb` and its original buffer: `to_device` = orig →
    /// slot. Nothing if `tlb` is not a bounce slot.
    pub(crate) fn bounce_copy(&self, tlb: u64, size: u64, to_device: bool) {
        let pair = sync::lock(&self.pool)
            .as_ref()
            .and_then(|p| p.live.get(&tlb).map(|b| (b.orig, b.size.min(size))));
        if let Some((orig, n)) = pair {
            if to_device {
                self.copy_ram(orig, tlb, n);
            } else {
                self.copy_ram(tlb, orig, n);
            }
        }
    }

    pub(crate) fn swiotlb_unmap(&self, tlb: u64) {
        if let Some(pool) = sync::lock(&self.pool).as_mut() {
            if let Some(b) = pool.live.remove(&tlb) {
                let (s, n) = (b.slots.0 as usize, b.slots.1 as usize);
                pool.slots[s..s + n].fill(false);
            }
        }
    }

    /// Whether `phys` is a live bounce slot.
    pub(crate) fn is_bounce(&self, phys: u64) -> bool {
        sync::lock(&self.pool)
            .as_ref()
            .is_some_and(|p| p.live.contains_key(&phys))
    }

    pub(crate) fn debug_track(&self, bdf: Bdf, addr: u64, size: u64, at: Site) {
        if !self.debug_enabled() {
            return;
        }
        sync::lock(&self.debug).live.insert(
            (bdf, addr),
            DebugEntry {
                dev: bdf,
                addr,
                size,
                dir: Direction::None,
                at,
            },
        );
    }

    pub(crate) fn debug_untrack(&self, bdf: Bdf, addr: u64) {
        if !self.debug_enabled() {
            return;
        }
        sync::lock(&self.debug).live.remove(&(bdf, addr));
    }

    /// Bounce slots in use.
    pub fn swiotlb_used_slots(&self) -> usize {
        sync::lock(&self.pool)
            .as_ref()
            .map_or(0, |p| p.slots.iter().filter(|s| **s).count())
    }

    // ----- iommu-dma ----------------------------------------------------------------------

    /// `iommu_dma_alloc_iova`: below 4 GiB first for PCI devices until that fails once.
    pub(crate) fn alloc_iova(&self, bdf: Bdf, dev: &Dev, size: u64) -> Option<u64> {
        let shift = 12;
        let len = size >> shift;
        let mask = dev.cfg.mask.unwrap_or(dma_bit_mask(32));
        let limit = match (mask, dev.cfg.bus_dma_limit) {
            (m, 0) => m,
            (m, l) => m.min(l),
        }
        .min(APERTURE_END);
        let mut iovad = sync::lock(&dev.iovad);
        if dev.pci_32bit_workaround.load(Ordering::Relaxed) && limit > u64::from(u32::MAX) {
            if let Some(p) = iovad.alloc_fast(len, u64::from(u32::MAX) >> shift, false) {
                return Some(p << shift);
            }
            dev.pci_32bit_workaround.store(false, Ordering::Relaxed);
            sync::lock(&self.notices).push(format!(
                "{bdf}: Using {}-bit DMA addresses",
                64 - limit.leading_zeros()
            ));
        }
        iovad
            .alloc_fast(len, limit >> shift, true)
            .map(|p| p << shift)
    }

    #[allow(clippy::too_many_arguments)]
    fn iommu_map(
        &self,
        bdf: Bdf,
        dev: &Dev,
        d: DomainId,
        phys: u64,
        size: u64,
        dir: Direction,
        a: u32,
    ) -> Result<u64, MapError> {
        let cfg = &dev.cfg;
        let iommu = self.iommu.as_ref().ok_or(MapError::UnknownDevice(bdf))?;
        let mmio = a & attrs::MMIO != 0;
        let mut phys = phys;
        let mut bounced = false;
        if cfg.untrusted && (phys | size) & (GRANULE - 1) != 0 {
            if mmio {
                return Err(MapError::MmioNeedsBounce);
            }
            if cfg.swiotlb == Swiotlb::Off {
                return Err(MapError::SwiotlbInactive);
            }
            phys = self.swiotlb_map(
                &DmaConfig {
                    mask: Some(u64::MAX),
                    ..cfg.clone()
                },
                phys,
                size,
                dir,
            )?;
            bounced = true;
        }
        if !cfg.coherent && a & (attrs::SKIP_CPU_SYNC | attrs::MMIO) == 0 {
            self.counters
                .sync_for_device
                .fetch_add(1, Ordering::Relaxed);
        }
        let p = dma_info_to_prot(dir, cfg.coherent, a);
        let off = phys & (GRANULE - 1);
        let len = (size + off).div_ceil(GRANULE) * GRANULE;
        let fail = |e: MapError| {
            if bounced {
                self.swiotlb_unmap(phys);
            }
            e
        };
        let iova = self
            .alloc_iova(bdf, dev, len)
            .ok_or_else(|| fail(MapError::IovaExhausted(len)))?;
        if let Err(e) = iommu.map(d, iova, phys - off, len, p) {
            sync::lock(&dev.iovad).free_fast(iova >> 12, len >> 12);
            return Err(fail(MapError::IommuMap(e)));
        }
        Ok(iova + off)
    }

    fn iommu_unmap(&self, dev: &Dev, d: DomainId, addr: u64, size: u64, dir: Direction, a: u32) {
        let Some(iommu) = &self.iommu else { return };
        let mut bounce = None;
        if a & attrs::MMIO == 0 {
            let phys = iommu.iova_to_phys(d, addr);
            if phys == 0 {
                tracing::warn!(target: "peerdma::dma", "unmap of unmapped IOVA {addr:#x}");
                return;
            }
            if a & attrs::SKIP_CPU_SYNC == 0 && !dev.cfg.coherent {
                self.counters.sync_for_cpu.fetch_add(1, Ordering::Relaxed);
            }
            if sync::lock(&self.pool)
                .as_ref()
                .is_some_and(|p| p.live.contains_key(&phys))
            {
                if a & attrs::SKIP_CPU_SYNC == 0
                    && matches!(dir, Direction::FromDevice | Direction::Bidirectional)
                {
                    self.bounce_copy(phys, size, false);
                }
                bounce = Some(phys);
            }
        }
        Self::iommu_unmap_range(dev, iommu, d, addr, size);
        if let Some(b) = bounce {
            self.swiotlb_unmap(b);
        }
    }

    /// `__iommu_dma_unmap`: unmap the granule-aligned range, sync the IOTLB, free the IOVA.
    fn iommu_unmap_range(dev: &Dev, iommu: &Iommu, d: DomainId, addr: u64, size: u64) {
        let off = addr & (GRANULE - 1);
        let base = addr - off;
        let len = (size + off).div_ceil(GRANULE) * GRANULE;
        let done = iommu.unmap(d, base, len);
        if done != len {
            tracing::warn!(target: "peerdma::dma", "unmapped {done:#x} of {len:#x} bytes at {base:#x}");
        }
        iommu.sync_range(d, base, len);
        sync::lock(&dev.iovad).free_fast(base >> 12, len >> 12);
    }
}
