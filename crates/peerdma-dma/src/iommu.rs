//! The IOMMU hardware: per-requester attachment (blocked, identity, or a paging domain),
//! multi-level page tables with 4 KiB, 2 MiB and 1 GiB pages and protection bits, an IOTLB
//! that keeps translations until software flushes them, and a fault log.
//!
//! It implements the fabric's [`AddressTranslator`], so a device's memory request that
//! reaches the root complex is translated (or faults) here.
//!
//! **The IOTLB.** A translation the hardware walks is cached. Unmapping a page table entry does
//! not remove the cached copy: until software invalidates (`flush`, `sync_range`), a device
//! still reaches the old page — exactly the window a missing IOTLB sync leaves open on real
//! hardware. New mappings need no invalidation (nothing negative is cached).

use peerdma_pci::sync::atomic::{AtomicU64, Ordering};
use std::collections::{BTreeMap, HashMap, VecDeque};

use peerdma_pci::sync::{self, Mutex, RwLock};
use peerdma_pci::translate::{Access, AddressTranslator, Translation, TranslationFault};
use peerdma_pci::{Bdf, DmaAddr, Errno, PhysAddr};

/// IOMMU protection bits (`IOMMU_READ` …, as the kernel numbers them).
pub mod prot {
    /// DMA may read.
    pub const READ: u32 = 1 << 0;
    /// DMA may write.
    pub const WRITE: u32 = 1 << 1;
    /// Cache-coherent memory.
    pub const CACHE: u32 = 1 << 2;
    /// Not executable.
    pub const NOEXEC: u32 = 1 << 3;
    /// MMIO: device memory, never cached.
    pub const MMIO: u32 = 1 << 4;
    /// Privileged accesses only.
    pub const PRIV: u32 = 1 << 5;
}

/// Page sizes the page table supports.
pub const PAGE_SIZES: [u64; 3] = [1 << 30, 2 << 20, 4 << 10];
/// The smallest page: the IOVA granule.
pub const GRANULE: u64 = 4096;
/// The last IOVA a domain translates: 48-bit input addresses (4-level tables), the aperture
/// the DMA layer allocates within (`force_aperture`).
pub const APERTURE_END: u64 = (1 << 48) - 1;

/// The interrupt window the Intel IOMMU driver reports as every device's MSI reserved region
/// (`IOAPIC_RANGE_START` to `IOAPIC_RANGE_END`, drivers/iommu/intel/iommu.c,
/// `intel_iommu_get_resv_regions`): DMA there is an interrupt, so no IOVA may be mapped
/// there. Inclusive bounds.
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

/// A reserved region the IOMMU driver reports for a device (`struct iommu_resv_region`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResvRegion {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

impl Iommu {
    /// `iommu_get_resv_regions` for a device behind this IOMMU: the MSI window (the model
    /// has no RMRRs; QEMU's q35 reports none).
    pub fn reserved_regions(&self, _dev: Bdf) -> Vec<ResvRegion> {
        vec![ResvRegion {
            start: MSI_WINDOW.0,
            last: MSI_WINDOW.1,
        }]
    }
}

/// A paging domain's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub u32);

/// What a requester's DMA goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// All DMA faults.
    Blocked,
    /// DMA addresses are CPU physical addresses (passthrough).
    Identity,
    /// Translated by a paging domain.
    Paging(DomainId),
}

/// One page table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte {
    /// Physical base.
    pub phys: u64,
    /// Page size (4 KiB, 2 MiB or 1 GiB).
    pub size: u64,
    /// Protection bits.
    pub prot: u32,
}

/// One slot of a page-table node.
#[derive(Debug, Default)]
enum Slot {
    #[default]
    Empty,
    /// The next level down.
    Table(Box<Node>),
    /// A leaf: a 1 GiB page at level 3, 2 MiB at level 2, 4 KiB at level 1.
    Leaf(Pte),
}

/// A 512-entry table.
#[derive(Debug)]
struct Node {
    slots: Vec<Slot>,
}

impl Node {
    fn new() -> Node {
        Node {
            slots: std::iter::repeat_with(Slot::default).take(512).collect(),
        }
    }
}

/// Bytes one slot covers at a level (1 = 4 KiB … 4 = 512 GiB).
fn level_size(level: u32) -> u64 {
    1u64 << (12 + 9 * (level - 1))
}

fn index(iova: u64, level: u32) -> usize {
    ((iova >> (12 + 9 * (level - 1))) & 511) as usize
}

/// A 4-level radix page table (48-bit IOVAs), x86-style: levels 4 to 1, 9 bits each, leaves
/// allowed at levels 3 (1 GiB), 2 (2 MiB) and 1 (4 KiB).
#[derive(Debug)]
struct PageTable {
    root: Node,
    leaves: usize,
}

impl Default for PageTable {
    fn default() -> Self {
        PageTable {
            root: Node::new(),
            leaves: 0,
        }
    }
}

impl PageTable {
    /// The leaf covering `iova` and the IOVA its page starts at.
    fn lookup(&self, iova: u64) -> Option<(u64, Pte)> {
        if iova > APERTURE_END {
            return None;
        }
        let mut node = &self.root;
        let mut level = 4;
        loop {
            match &node.slots[index(iova, level)] {
                Slot::Empty => return None,
                Slot::Leaf(p) => return Some((iova & !(level_size(level) - 1), *p)),
                Slot::Table(n) => {
                    node = n;
                    level -= 1;
                }
            }
        }
    }

    /// Whether any leaf intersects `[lo, hi]`.
    fn any_leaf(node: &Node, level: u32, base: u64, lo: u64, hi: u64) -> bool {
        let sz = level_size(level);
        let first = (lo.max(base) - base) / sz;
        let last = ((hi - base) / sz).min(511);
        (first..=last).any(|i| match &node.slots[i as usize] {
            Slot::Empty => false,
            Slot::Leaf(_) => true,
            Slot::Table(n) => PageTable::any_leaf(n, level - 1, base + i * sz, lo, hi),
        })
    }

    fn overlaps(&self, iova: u64, size: u64) -> bool {
        PageTable::any_leaf(&self.root, 4, 0, iova, iova + (size - 1))
    }

    /// Installs a leaf at the level its size calls for (the slot is free: checked before).
    fn insert(&mut self, iova: u64, pte: Pte) {
        let target = match pte.size {
            s if s == 1 << 30 => 3,
            s if s == 2 << 20 => 2,
            _ => 1,
        };
        let mut node = &mut self.root;
        let mut level = 4;
        while level > target {
            let slot = &mut node.slots[index(iova, level)];
            if !matches!(slot, Slot::Table(_)) {
                *slot = Slot::Table(Box::new(Node::new()));
            }
            let Slot::Table(next) = slot else {
                unreachable!("just made a table")
            };
            node = next;
            level -= 1;
        }
        node.slots[index(iova, level)] = Slot::Leaf(pte);
        self.leaves += 1;
    }

    /// Removes the leaf whose page starts exactly at `iova`.
    fn remove(&mut self, iova: u64) -> Option<Pte> {
        let (base, _) = self.lookup(iova)?;
        if base != iova {
            return None;
        }
        let mut node = &mut self.root;
        let mut level = 4;
        loop {
            let slot = &mut node.slots[index(iova, level)];
            match slot {
                Slot::Leaf(p) => {
                    let p = *p;
                    *slot = Slot::Empty;
                    self.leaves -= 1;
                    return Some(p);
                }
                Slot::Table(n) => {
                    node = n;
                    level -= 1;
                }
                Slot::Empty => return None,
            }
        }
    }
}

#[derive(Debug, Default)]
struct Domain {
    /// The page table.
    pt: PageTable,
    /// Cached translations: IOVA base → entry, possibly stale.
    iotlb: BTreeMap<u64, Pte>,
    /// Bumped by every IOTLB invalidation: a walk that began before one does not cache what
    /// it found (it could be an entry the invalidation was removing — hardware's fill/flush
    /// protocol keeps such a fill from outliving the flush).
    generation: u64,
}

fn covering(map: &BTreeMap<u64, Pte>, iova: u64) -> Option<(u64, Pte)> {
    map.range(..=iova)
        .next_back()
        .filter(|(b, p)| iova - **b < p.size)
        .map(|(b, p)| (*b, *p))
}

impl Domain {
    fn overlaps(&self, iova: u64, size: u64) -> bool {
        self.pt.overlaps(iova, size)
    }
}

/// Why a DMA was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The requester is attached to nothing or to a blocking domain.
    Blocked,
    /// No translation for the address.
    NotPresent,
    /// A translation without the needed read or write permission.
    Permission {
        /// The entry's protection bits.
        prot: u32,
    },
}

/// A fault record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuFault {
    /// The requester.
    pub requester: Bdf,
    /// The IOVA.
    pub iova: u64,
    /// Read or write.
    pub access: Access,
    /// Why.
    pub reason: FaultReason,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Translations served from the IOTLB.
    pub iotlb_hits: u64,
    /// Page-table walks.
    pub walks: u64,
    /// IOTLB invalidations (whole-domain flushes and range syncs).
    pub invalidations: u64,
}

#[derive(Debug, Default)]
struct State {
    attach: HashMap<Bdf, Attach>,
    domains: HashMap<DomainId, Domain>,
    next: u32,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    walks: AtomicU64,
    invalidations: AtomicU64,
}

/// An IOMMU for the whole machine.
#[derive(Debug)]
pub struct Iommu {
    state: RwLock<State>,
    counters: Counters,
    faults: Mutex<VecDeque<IommuFault>>,
    default_attach: Attach,
}

/// How many fault records are kept.
pub const FAULT_LOG: usize = 4096;

impl Iommu {
    /// An IOMMU; requesters not attached to anything get `default_attach` (Linux attaches
    /// every device to a default domain at boot; `Blocked` models a machine where only
    /// explicitly attached devices may DMA).
    pub fn new(default_attach: Attach) -> Iommu {
        Iommu {
            state: RwLock::new(State::default()),
            counters: Counters::default(),
            faults: Mutex::new(VecDeque::new()),
            default_attach,
        }
    }

    /// Creates an empty paging domain.
    pub fn new_domain(&self) -> DomainId {
        let mut s = sync::write(&self.state);
        s.next += 1;
        let id = DomainId(s.next);
        s.domains.insert(id, Domain::default());
        id
    }

    /// Attaches a requester (its DMA goes through `a` from now on).
    pub fn attach(&self, requester: Bdf, a: Attach) -> Result<(), Errno> {
        let mut s = sync::write(&self.state);
        if let Attach::Paging(d) = a {
            if !s.domains.contains_key(&d) {
                return Err(Errno::ENOENT);
            }
        }
        s.attach.insert(requester, a);
        Ok(())
    }

    /// What a requester is attached to.
    pub fn attachment(&self, requester: Bdf) -> Attach {
        sync::read(&self.state)
            .attach
            .get(&requester)
            .copied()
            .unwrap_or(self.default_attach)
    }

    /// `iommu_map`: maps `[iova, iova + size)` to `[phys, …)` with `prot`, using the largest
    /// page size each piece's alignment allows. `iova`, `phys` and `size` must be multiples of
    /// 4 KiB (`EINVAL`); any existing entry in the range fails the whole call with `EEXIST`
    /// and changes nothing.
    pub fn map(
        &self,
        d: DomainId,
        iova: u64,
        phys: u64,
        size: u64,
        prot: u32,
    ) -> Result<(), Errno> {
        if size == 0
            || (iova | phys | size) % GRANULE != 0
            || iova.checked_add(size).is_none_or(|e| e - 1 > APERTURE_END)
            || phys.checked_add(size).is_none()
        {
            return Err(Errno::EINVAL);
        }
        let mut s = sync::write(&self.state);
        let dom = s.domains.get_mut(&d).ok_or(Errno::ENOENT)?;
        if dom.overlaps(iova, size) {
            return Err(Errno::EEXIST);
        }
        let mut done = 0;
        while done < size {
            let (i, p) = (iova + done, phys + done);
            let pg = PAGE_SIZES
                .into_iter()
                .find(|&pg| (i | p) % pg == 0 && size - done >= pg)
                .unwrap_or(GRANULE);
            dom.pt.insert(
                i,
                Pte {
                    phys: p,
                    size: pg,
                    prot,
                },
            );
            done += pg;
        }
        Ok(())
    }

    /// `iommu_unmap`: removes the entries of `[iova, iova + size)`, stopping at an entry that
    /// reaches outside the range; returns the bytes unmapped. The IOTLB keeps its copies.
    pub fn unmap(&self, d: DomainId, iova: u64, size: u64) -> u64 {
        let mut state = sync::write(&self.state);
        let Some(dom) = state.domains.get_mut(&d) else {
            return 0;
        };
        let mut done = 0;
        while done < size {
            let i = iova + done;
            match dom.pt.lookup(i) {
                Some((b, p)) if b == i && p.size <= size - done => {
                    dom.pt.remove(i);
                    done += p.size;
                }
                _ => break,
            }
        }
        done
    }

    /// Invalidates the IOTLB for a range of one domain (`iotlb_sync`).
    pub fn sync_range(&self, d: DomainId, iova: u64, size: u64) {
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut s = sync::write(&self.state);
        if let Some(dom) = s.domains.get_mut(&d) {
            dom.generation += 1;
            let end = iova.saturating_add(size);
            let keys: Vec<u64> = dom
                .iotlb
                .range(..end)
                .filter(|(b, p)| **b + p.size > iova)
                .map(|(b, _)| *b)
                .collect();
            for k in keys {
                dom.iotlb.remove(&k);
            }
        }
    }

    /// Invalidates a whole domain's IOTLB (`flush_iotlb_all`).
    pub fn flush(&self, d: DomainId) {
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut s = sync::write(&self.state);
        if let Some(dom) = s.domains.get_mut(&d) {
            dom.generation += 1;
            dom.iotlb.clear();
        }
    }

    /// The page-table entry covering an IOVA (not the IOTLB's view).
    pub fn lookup(&self, d: DomainId, iova: u64) -> Option<(u64, Pte)> {
        sync::read(&self.state).domains.get(&d)?.pt.lookup(iova)
    }

    /// `iova_to_phys` from the page table (0 when unmapped, as the kernel's).
    pub fn iova_to_phys(&self, d: DomainId, iova: u64) -> u64 {
        self.lookup(d, iova).map_or(0, |(b, p)| p.phys + (iova - b))
    }

    /// How many page-table entries a domain has.
    pub fn entries(&self, d: DomainId) -> usize {
        sync::read(&self.state)
            .domains
            .get(&d)
            .map_or(0, |x| x.pt.leaves)
    }

    /// Counters so far.
    pub fn stats(&self) -> IommuStats {
        IommuStats {
            iotlb_hits: self.counters.hits.load(Ordering::Relaxed),
            walks: self.counters.walks.load(Ordering::Relaxed),
            invalidations: self.counters.invalidations.load(Ordering::Relaxed),
        }
    }

    /// The fault log (oldest first).
    pub fn faults(&self) -> Vec<IommuFault> {
        sync::lock(&self.faults).iter().cloned().collect()
    }

    /// Empties the fault log and returns it.
    pub fn take_faults(&self) -> Vec<IommuFault> {
        sync::lock(&self.faults).drain(..).collect()
    }

    fn fault(&self, f: IommuFault) -> TranslationFault {
        tracing::debug!(target: "peerdma::iommu", ?f, "IOMMU fault");
        let why = match f.reason {
            FaultReason::Blocked => "requester blocked".to_string(),
            FaultReason::NotPresent => "no mapping".to_string(),
            FaultReason::Permission { prot } => {
                format!("no {} permission (prot {prot:#x})", f.access.as_str())
            }
        };
        let out = TranslationFault {
            requester: f.requester,
            addr: DmaAddr(f.iova),
            access: f.access,
            reason: why,
        };
        let mut log = sync::lock(&self.faults);
        if log.len() == FAULT_LOG {
            log.pop_front();
        }
        log.push_back(f);
        out
    }

    /// Translates a run starting at `iova`: the first entry, then following entries that
    /// continue the same physical run with the needed permission (up to 64 MiB), IOTLB first,
    /// page table on a miss — all under one read lock. Misses are cached afterwards.
    fn run(&self, d: DomainId, iova: u64, access: Access) -> Option<((u64, Pte), u64)> {
        let mut misses = Vec::new();
        let (mut hits, mut walks) = (0u64, 0u64);
        let generation;
        let found = {
            let state = sync::read(&self.state);
            let dom = state.domains.get(&d)?;
            generation = dom.generation;
            let first = if let Some(hit) = covering(&dom.iotlb, iova) {
                hits += 1;
                hit
            } else {
                walks += 1;
                let entry = dom.pt.lookup(iova);
                if let Some(found) = entry {
                    misses.push(found);
                }
                entry?
            };
            let (base, pte) = first;
            let mut contiguous = pte.size - (iova - base);
            if allows(pte.prot, access) {
                let (mut ni, mut np) = (base + pte.size, pte.phys + pte.size);
                // The IOTLB is walked forward with one cursor; a gap in it is filled from the
                // page table.
                let mut tlb = dom.iotlb.range(ni..).peekable();
                while contiguous < (64 << 20) {
                    let e = match tlb.peek() {
                        Some((b, p)) if **b == ni => {
                            let e = (**b, **p);
                            tlb.next();
                            hits += 1;
                            Some(e)
                        }
                        _ => {
                            walks += 1;
                            let e = dom.pt.lookup(ni);
                            if let Some(e) = e {
                                misses.push(e);
                            }
                            e
                        }
                    };
                    match e {
                        Some((b, p)) if b == ni && p.phys == np && allows(p.prot, access) => {
                            contiguous += p.size;
                            ni += p.size;
                            np += p.size;
                        }
                        _ => break,
                    }
                }
            }
            (first, contiguous)
        };
        self.counters.hits.fetch_add(hits, Ordering::Relaxed);
        self.counters.walks.fetch_add(walks, Ordering::Relaxed);
        sync::points::point("iommu.walk.unlocked");
        if !misses.is_empty() {
            let mut s = sync::write(&self.state);
            if let Some(dom) = s.domains.get_mut(&d) {
                // An invalidation ran since the walk: what it found may be gone.
                if dom.generation == generation {
                    for (b, p) in misses {
                        dom.iotlb.insert(b, p);
                    }
                }
            }
        }
        Some(found)
    }
}

fn allows(prot: u32, access: Access) -> bool {
    match access {
        Access::Read => prot & prot::READ != 0,
        Access::Write => prot & prot::WRITE != 0,
    }
}

impl AddressTranslator for Iommu {
    fn translate(
        &self,
        requester: Bdf,
        addr: DmaAddr,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        let iova = addr.get();
        let d = match self.attachment(requester) {
            Attach::Identity => {
                return Ok(Translation {
                    phys: PhysAddr(iova),
                    contiguous: (u64::MAX - iova).saturating_add(1),
                });
            }
            Attach::Blocked => {
                return Err(self.fault(IommuFault {
                    requester,
                    iova,
                    access,
                    reason: FaultReason::Blocked,
                }));
            }
            Attach::Paging(d) => d,
        };
        let Some(((base, pte), contiguous)) = self.run(d, iova, access) else {
            return Err(self.fault(IommuFault {
                requester,
                iova,
                access,
                reason: FaultReason::NotPresent,
            }));
        };
        if !allows(pte.prot, access) {
            return Err(self.fault(IommuFault {
                requester,
                iova,
                access,
                reason: FaultReason::Permission { prot: pte.prot },
            }));
        }
        Ok(Translation {
            phys: PhysAddr(pte.phys + (iova - base)),
            contiguous,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Bdf {
        "0000:03:00.0".parse().unwrap()
    }

    #[test]
    fn largest_pages_that_fit() {
        let m = Iommu::new(Attach::Blocked);
        let d = m.new_domain();
        m.map(d, 0x20_0000, 0x4020_0000, 0x40_0000, prot::READ)
            .unwrap();
        assert_eq!(m.entries(d), 2, "two 2 MiB pages");
        m.map(d, 0x4000_0000, 0x8000_0000, 1 << 30, prot::READ)
            .unwrap();
        assert_eq!(m.entries(d), 3, "one 1 GiB page");
        m.map(d, 0x1000, 0x2001000, 0x3000, prot::READ).unwrap();
        assert_eq!(m.entries(d), 6, "three 4 KiB pages");
        assert_eq!(m.iova_to_phys(d, 0x20_0010), 0x4020_0010);
        assert_eq!(m.iova_to_phys(d, 0x8000_0000), 0);
    }

    #[test]
    fn map_refuses_overlap_and_misalignment_changing_nothing() {
        let m = Iommu::new(Attach::Blocked);
        let d = m.new_domain();
        m.map(d, 0x10000, 0x10000, 0x2000, prot::READ).unwrap();
        assert_eq!(
            m.map(d, 0x11000, 0x90000, 0x4000, prot::READ),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            m.map(d, 0xf000, 0x90000, 0x2000, prot::READ),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            m.map(d, 0x20001, 0x90000, 0x1000, prot::READ),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            m.map(d, 0x20000, 0x90000, 0, prot::READ),
            Err(Errno::EINVAL)
        );
        assert_eq!(m.entries(d), 2);
        assert_eq!(m.map(DomainId(99), 0, 0, 4096, 0), Err(Errno::ENOENT));
    }

    #[test]
    fn levels_refuse_each_other() {
        let m = Iommu::new(Attach::Blocked);
        let d = m.new_domain();
        m.map(d, 0x40_0000, 0x40_0000, 0x20_0000, prot::READ)
            .unwrap(); // one 2 MiB leaf
        assert_eq!(
            m.map(d, 0x41_0000, 0x1000, 0x1000, prot::READ),
            Err(Errno::EEXIST),
            "4 KiB inside a 2 MiB page"
        );
        m.map(d, 0x80_1000, 0x1000, 0x1000, prot::READ).unwrap(); // a 4 KiB leaf
        assert_eq!(
            m.map(d, 0x80_0000, 0x80_0000, 0x20_0000, prot::READ),
            Err(Errno::EEXIST),
            "2 MiB over a 4 KiB page"
        );
        assert_eq!(
            m.map(d, 1 << 48, 0, 0x1000, prot::READ),
            Err(Errno::EINVAL),
            "past the 48-bit aperture"
        );
        assert_eq!(
            m.lookup(d, 0x5f_ffff).map(|(b, p)| (b, p.size)),
            Some((0x40_0000, 2 << 20))
        );
        assert_eq!(m.unmap(d, 0x80_1000, 0x1000), 0x1000);
        m.map(d, 0x80_0000, 0x80_0000, 0x20_0000, prot::READ)
            .unwrap();
        assert_eq!(m.entries(d), 2);
    }

    #[test]
    fn unmap_returns_what_it_removed() {
        let m = Iommu::new(Attach::Blocked);
        let d = m.new_domain();
        m.map(d, 0x20_0000, 0x20_0000, 0x20_0000, prot::READ)
            .unwrap();
        assert_eq!(
            m.unmap(d, 0x20_0000, 0x1000),
            0,
            "a 2 MiB page is not split"
        );
        assert_eq!(m.unmap(d, 0x20_0000, 0x20_0000), 0x20_0000);
        assert_eq!(m.entries(d), 0);
    }

    #[test]
    fn translation_faults_and_stale_iotlb() {
        let m = Iommu::new(Attach::Blocked);
        let d = m.new_domain();
        let r = b();
        assert!(
            m.translate(r, DmaAddr(0x1000), Access::Read).is_err(),
            "blocked by default"
        );
        m.attach(r, Attach::Paging(d)).unwrap();
        assert!(
            m.translate(r, DmaAddr(0x1000), Access::Read).is_err(),
            "not present"
        );
        m.map(d, 0x1000, 0x9000, 0x1000, prot::READ).unwrap();
        let t = m.translate(r, DmaAddr(0x1010), Access::Read).unwrap();
        assert_eq!((t.phys, t.contiguous), (PhysAddr(0x9010), 0xff0));
        assert!(
            m.translate(r, DmaAddr(0x1010), Access::Write).is_err(),
            "read-only"
        );
        // Unmapped but not synced: the IOTLB still translates.
        m.unmap(d, 0x1000, 0x1000);
        assert!(m.translate(r, DmaAddr(0x1000), Access::Read).is_ok());
        m.sync_range(d, 0x1000, 0x1000);
        assert!(m.translate(r, DmaAddr(0x1000), Access::Read).is_err());
        let reasons: Vec<FaultReason> = m.faults().iter().map(|f| f.reason).collect();
        assert_eq!(
            reasons,
            vec![
                FaultReason::Blocked,
                FaultReason::NotPresent,
                FaultReason::Permission { prot: prot::READ },
                FaultReason::NotPresent
            ]
        );
        m.attach(r, Attach::Identity).unwrap();
        assert_eq!(
            m.translate(r, DmaAddr(0x1234), Access::Write).unwrap().phys,
            PhysAddr(0x1234)
        );
    }

    #[test]
    fn a_walk_that_races_an_invalidation_caches_nothing() {
        // The fill/flush race the soak found: a translation walks the page table (entry
        // present), then — before it caches what it found — the entry is unmapped and the
        // IOTLB synced. The late fill must not bring the dead entry back for later DMAs.
        let m = std::sync::Arc::new(Iommu::new(Attach::Blocked));
        let d = m.new_domain();
        let r = b();
        m.attach(r, Attach::Paging(d)).unwrap();
        m.map(d, 0x1000, 0x9000, 0x1000, prot::READ).unwrap();
        let m2 = m.clone();
        let fired = std::rc::Rc::new(std::cell::Cell::new(false));
        let f2 = fired.clone();
        let hook = sync::points::on("iommu.walk.unlocked", move || {
            if !f2.replace(true) {
                m2.unmap(d, 0x1000, 0x1000);
                m2.sync_range(d, 0x1000, 0x1000);
            }
        });
        // In flight: this one translated before the unmap, as hardware may.
        assert!(m.translate(r, DmaAddr(0x1000), Access::Read).is_ok());
        drop(hook);
        assert!(fired.get());
        assert!(
            m.translate(r, DmaAddr(0x1000), Access::Read).is_err(),
            "a DMA after the invalidation must fault"
        );
    }

    #[test]
    fn contiguous_runs_span_entries() {
        let m = Iommu::new(Attach::Blocked);
        let d = m.new_domain();
        m.attach(b(), Attach::Paging(d)).unwrap();
        m.map(d, 0x1000, 0x10_1000, 0x3000, prot::READ | prot::WRITE)
            .unwrap();
        m.map(d, 0x4000, 0x50_0000, 0x1000, prot::READ | prot::WRITE)
            .unwrap();
        let t = m.translate(b(), DmaAddr(0x1000), Access::Write).unwrap();
        assert_eq!(t.contiguous, 0x3000, "stops where the physical run breaks");
    }
}
