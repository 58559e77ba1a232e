//! iommufd as a dma-buf importer (Linux 7.2, as observed under QEMU): IOAS objects, devices
//! attached to them, and `IOMMU_IOAS_MAP_FILE` of a vfio dma-buf through the private vfio
//! interconnect — one range only, pinned as a revocable importer. An invalidation clears and
//! syncs the area's IOMMU entries, so the device's DMA faults, and **the area stays dead** when
//! the buffer comes back: the user unmaps it (whole) and maps the buffer again.
//!
//! `IOMMU_IOAS_MAP_FILE` and `IOMMU_IOAS_UNMAP` check their arguments in the order of the 7.2
//! source ([`Iommufd::map_file_ioctl`], [`Iommufd::unmap`] list it); an IOAS's alignment is a
//! byte until a device is attached and the page size after (`iopt->iova_alignment`), and an
//! unmap is not atomic: it stops at the first area only partly inside its range, leaving
//! those before it unmapped. Attaching a device reserves its IOMMU reserved regions (the MSI
//! window) and, with the first device's domain, everything past the aperture;
//! `IOMMU_IOAS_IOVA_RANGES` reports the rest, and a map without FIXED_IOVA gets an IOVA
//! the way the kernel picks one. A device detaches; an IOAS no device is attached to can be
//! destroyed.

use peerdma_pci::sync::atomic::{AtomicU64, Ordering};
use peerdma_pci::sync::{Arc, Mutex};
use std::collections::BTreeMap;

use peerdma_dma::iommu::{APERTURE_END, Attach, DomainId, prot};
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Process, ResvGuard};
use peerdma_pci::{Bdf, Errno, sync};
use peerdma_uapi::backend::{IovaRanges, MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE};

use crate::pci::iommufd_map;

const PAGE: u64 = 4096;

/// The last IOVA of an area (its length is at least 1 and it does not wrap).
fn last_iova(iova: u64, length: u64) -> u64 {
    iova + (length - 1)
}

/// Where an area's IOMMU entries stand. Changed only with the buffer's reservation lock
/// held — by `map_file`, by the invalidation callback and by `unmap` — so an invalidation can
/// never miss entries that exist, nor mark dead an area whose entries come later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AreaState {
    /// Attached, entries not written yet: an invalidation now has nothing to clear (the map
    /// itself then looks at the buffer's revocation under the lock).
    Pending,
    /// Entries written; DMA goes through.
    Live,
    /// Mapped in an IOAS that no device is attached to, at an IOVA, length or offset that is
    /// not page aligned (Linux's IOAS alignment is 1 byte until a device's domain comes):
    /// no entries can exist, and no device can be attached while the area is there.
    Unbacked,
    /// Invalidated or unmapped: entries cleared and the IOTLB synced. An invalidated area
    /// stays dead until the user unmaps it.
    Dead,
}

/// What pinning a range of an emulated process's memory finds, page by page from its
/// first (for [`Iommufd::map_user`]).
#[derive(Debug)]
pub struct UserPages<'a> {
    /// The memfd mapped where the range starts, and the offset in it of the range's first
    /// byte; none when nothing that pins is mapped there.
    pub memfd: Option<(&'a Arc<File>, u64)>,
    /// How many bytes from the start pin; a pin that stops short of the range's end faults
    /// (`EFAULT`).
    pub pinnable: u64,
}

struct Area {
    len: u64,
    /// Its IOVA, length or offset in the buffer is not page aligned.
    unaligned: bool,
    /// The errno pinning this area's pages gives, for a file or user-memory area (not a
    /// dma-buf) whose pages cannot be pinned: a file that is not shmem or a range past its
    /// end (`memfd_pin_folios`: `EINVAL`), user memory not mapped or not writable as asked
    /// (`pin_user_pages_fast`: `EFAULT`). Mapped while no device was attached (nothing is
    /// pinned then), it makes the first device's attach fail with it (`iopt_fill_domain`).
    unpinnable: Option<Errno>,
    /// For an unpinnable area, the bytes from its start that do pin (and so are faulted
    /// into the file) before the failure.
    pin_prefix: u64,
    /// Where in the file (or buffer) the area starts.
    start: u64,
    file: Arc<File>,
    /// The dma-buf attachment (none for a file area).
    att: Option<Arc<Attachment>>,
    state: Arc<Mutex<AreaState>>,
    /// The watch's record of the mapping, ended when the entries go.
    grant: Option<crate::watch::GrantId>,
}

/// Who put a reserved range in an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The domain: everything outside its aperture (`iopt_table_add_domain`).
    Domain,
    /// A device: a reserved region its IOMMU driver reports
    /// (`iopt_table_enforce_dev_resv_regions`).
    Dev(Bdf),
}

/// A range of IOVA nothing may be mapped at (`struct iopt_reserved`), inclusive.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    start: u64,
    last: u64,
    owner: Owner,
}

struct Ioas {
    domain: DomainId,
    areas: BTreeMap<u64, Area>,
    /// Devices attached now (each brings a domain whose page size is 4 KiB).
    devices: std::collections::BTreeSet<Bdf>,
    /// `iopt->reserved_itree`.
    reserved: Vec<Reserved>,
    /// The id of the page table its attached devices share (the automatic HWPT
    /// `iommufd_device_auto_get_domain` creates with the first device and destroys with the
    /// last): there while a device is attached.
    hwpt: Option<u32>,
    /// The most alignment a kernel-chosen IOVA gets (`iopt_alloc_iova`'s `max_alignment`):
    /// the huge page size (2 MiB) on a kernel with `CONFIG_TRANSPARENT_HUGEPAGE`, else the
    /// page size.
    max_align: u64,
    /// `iopt->allowed_itree`: the ranges `IOMMU_IOAS_ALLOW_IOVAS` set, inclusive, sorted;
    /// empty allows everything.
    allowed: Vec<(u64, u64)>,
}

/// `__alloc_iova_check_range`: the start of `[h0, h1]` rounded up to `align`, with
/// `page_offset` kept, if `length` bytes fit from there to `h1`.
fn fits(h0: u64, h1: u64, align: u64, page_offset: u64, length: u64) -> Option<u64> {
    let up = h0.checked_add(align - 1)?;
    let at = (up & !(align - 1)) | page_offset;
    (at < h1 && h1 - at >= length - 1).then_some(at)
}

impl Ioas {
    /// Where a new area of `length` bytes from `start` of its file goes
    /// (`iopt_alloc_area_pages`, `iopt_insert_area`): a length that is not a multiple of
    /// the IOAS's alignment → `EINVAL`; without FIXED_IOVA the kernel's choice
    /// ([`Ioas::alloc_iova`]); with it, `iopt_check_iova`: an IOVA off the alignment →
    /// `EINVAL`, one that wraps → `EOVERFLOW`, one meeting a reserved range → `EINVAL`, an
    /// area → `EEXIST`; then a start whose offset in its page is off the alignment →
    /// `EINVAL`.
    fn place(&self, start: u64, length: u64, iova: u64, flags: u32) -> Result<u64, Errno> {
        let align = self.alignment();
        if length % align != 0 {
            return Err(Errno::EINVAL);
        }
        let iova = if flags & MAP_FIXED_IOVA == 0 {
            self.alloc_iova(start, length)?
        } else {
            if iova % align != 0 {
                return Err(Errno::EINVAL);
            }
            let end = iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
            if self.reserved_meets(iova, end) {
                return Err(Errno::EINVAL);
            }
            if self.area_meets(iova, end) {
                return Err(Errno::EEXIST);
            }
            iova
        };
        if (start % PAGE) % align != 0 {
            return Err(Errno::EINVAL);
        }
        Ok(iova)
    }

    /// `iopt->iova_alignment`: 1 with no domain, the page size once a device is attached.
    fn alignment(&self) -> u64 {
        if self.devices.is_empty() { 1 } else { PAGE }
    }

    /// `dev` leaves (if it is here): its reserved regions go, and with the last device the
    /// domain's (`iopt_remove_reserved_iova`, `iopt_table_remove_domain`). Whether it was here.
    fn leave(&mut self, dev: Bdf) -> bool {
        if !self.devices.remove(&dev) {
            return false;
        }
        self.reserved.retain(|r| r.owner != Owner::Dev(dev));
        if self.devices.is_empty() {
            self.reserved.retain(|r| r.owner != Owner::Domain);
        }
        true
    }

    /// Whether an area meets `[start, last]` (`iopt_area_iter_first`).
    fn area_meets(&self, start: u64, last: u64) -> bool {
        self.areas
            .range(..=last)
            .next_back()
            .is_some_and(|(&a, area)| a + (area.len - 1) >= start)
    }

    /// Whether an allowed range meets `[start, last]` (`iopt_allowed_iter_first`).
    fn allowed_meets(&self, start: u64, last: u64) -> bool {
        self.allowed.iter().any(|&(a, b)| a <= last && b >= start)
    }

    /// The spans `iopt_alloc_iova` searches (`interval_tree_for_each_span` over the allowed
    /// ranges from the second page to the last but one): each run of allowed IOVAs, ranges
    /// that touch joined; with none set, that whole span.
    fn allowed_spans(&self) -> Vec<(u64, u64)> {
        let (lo, hi) = (PAGE, u64::MAX - PAGE);
        if self.allowed.is_empty() {
            return vec![(lo, hi)];
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(a, b) in &self.allowed {
            let (a, b) = (a.max(lo), b.min(hi));
            if a > b {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.1.checked_add(1) == Some(a) => l.1 = b,
                _ => out.push((a, b)),
            }
        }
        out
    }

    /// Whether a reserved range meets `[start, last]` (`iopt_reserved_iter_first`).
    fn reserved_meets(&self, start: u64, last: u64) -> bool {
        self.reserved
            .iter()
            .any(|r| r.start <= last && r.last >= start)
    }

    /// The used ranges (reserved and areas), sorted, inclusive.
    fn used(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.reserved.iter().map(|r| (r.start, r.last)).collect();
        v.extend(self.areas.iter().map(|(&a, area)| (a, a + (area.len - 1))));
        v.sort_unstable();
        v
    }

    /// `iopt_alloc_iova` (io_pagetable.c): the lowest IOVA from the second page up, aligned
    /// to the length rounded up to a power of two (and to the lowest set bit of `start`)
    /// but never more than [`Ioas::max_align`] (the page size without transparent huge
    /// pages, 2 MiB with them), with `start`'s offset in its page, where `length` bytes
    /// meet no reserved range and no area.
    fn alloc_iova(&self, start: u64, length: u64) -> Result<u64, Errno> {
        if length == 0 || length >= u64::MAX / 2 {
            return Err(Errno::EOVERFLOW);
        }
        let page_offset = start % PAGE;
        let mut align = length.next_power_of_two();
        if start != 0 {
            align = align.min(1 << start.trailing_zeros());
        }
        align = align.min(self.max_align);
        if align < self.alignment() {
            return Err(Errno::EINVAL);
        }
        // Each allowed span that could hold it at all (`__alloc_iova_check_used`), then the
        // holes between used ranges inside it, first fit.
        for (lo, hi) in self.allowed_spans() {
            if fits(lo, hi, align, page_offset, length).is_none() {
                continue;
            }
            if let Some(at) = self.first_hole(lo, hi, align, page_offset, length) {
                return Ok(at);
            }
        }
        Err(Errno::ENOSPC)
    }

    /// The lowest IOVA in a hole between used ranges inside `[lo, hi]` that
    /// `__alloc_iova_check_hole` accepts.
    fn first_hole(
        &self,
        lo: u64,
        hi: u64,
        align: u64,
        page_offset: u64,
        length: u64,
    ) -> Option<u64> {
        let mut holes = Vec::new();
        let mut next = lo;
        for (a, b) in self.used() {
            if b < next {
                continue;
            }
            if a > next {
                holes.push((next, (a - 1).min(hi)));
            }
            if b >= hi {
                next = u64::MAX;
                break;
            }
            next = b + 1;
        }
        if next <= hi {
            holes.push((next, hi));
        }
        holes
            .into_iter()
            .take_while(|&(h0, _)| h0 <= hi)
            .find_map(|(h0, h1)| fits(h0, h1, align, page_offset, length))
    }

    /// `iommufd_ioas_iova_ranges`: the holes between reserved ranges (areas do not count).
    fn allowed_ranges(&self) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self.reserved.iter().map(|r| (r.start, r.last)).collect();
        r.sort_unstable();
        let mut out = Vec::new();
        let mut next = Some(0u64);
        for (a, b) in r {
            let Some(n) = next else { break };
            if a > n {
                out.push((n, a - 1));
            }
            if b >= n {
                next = b.checked_add(1);
            }
        }
        if let Some(n) = next {
            out.push((n, u64::MAX));
        }
        out
    }
}

/// An open `/dev/iommu`.
pub struct Iommufd {
    env: DmaEnv,
    ioas: Mutex<BTreeMap<u32, Ioas>>,
    /// `ictx->objects`: every object's id, from one table (taken after `ioas`).
    objects: Mutex<BTreeMap<u32, Obj>>,
    /// Which iommufd this is, machine-wide: the owner a bound device's IOMMU group records.
    uid: u64,
    /// Each IOAS's [`Ioas::max_align`].
    max_align: u64,
}

/// The huge page size on x86-64 (`HPAGE_SIZE`).
const HPAGE: u64 = 2 << 20;

/// Numbers every iommufd opened.
static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What an iommufd object id names (main.c `iommufd_object_alloc`: one xarray per iommufd,
/// ids from 1, the lowest free one each time, so a freed id is given out again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obj {
    Ioas,
    Device,
    /// An automatic HWPT, of this IOAS.
    Hwpt(u32),
}

impl Drop for Iommufd {
    /// Closing `/dev/iommu` unmaps every area, giving back its dma-buf references.
    fn drop(&mut self) {
        self.release_all();
    }
}

impl std::fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommufd").finish_non_exhaustive()
    }
}

impl Iommufd {
    /// iommufd on a machine with an IOMMU (`ENODEV` without one), on a kernel without
    /// transparent huge pages.
    pub fn open(env: &DmaEnv) -> Result<Iommufd, Errno> {
        Iommufd::open_with(env, false)
    }

    /// [`Iommufd::open`] on a kernel whose `CONFIG_TRANSPARENT_HUGEPAGE` is `thp`: with it,
    /// a kernel-chosen IOVA is aligned up to 2 MiB instead of 4 KiB (see
    /// [`crate::KernelConfig::thp`]).
    pub fn open_with(env: &DmaEnv, thp: bool) -> Result<Iommufd, Errno> {
        env.dma.iommu().ok_or(Errno::ENODEV)?;
        Ok(Iommufd {
            env: env.clone(),
            ioas: Mutex::new(BTreeMap::new()),
            objects: Mutex::new(BTreeMap::new()),
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            max_align: if thp { HPAGE } else { PAGE },
        })
    }

    /// This iommufd's machine-wide number (the DMA owner of the groups bound to it).
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// `IOMMU_IOAS_ALLOC`: a new, empty I/O address space.
    pub fn ioas_alloc(&self) -> Result<u32, Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?;
        let domain = iommu.new_domain();
        let mut m = sync::lock(&self.ioas);
        let id = self.new_id(Obj::Ioas);
        m.insert(
            id,
            Ioas {
                domain,
                areas: BTreeMap::new(),
                devices: std::collections::BTreeSet::new(),
                reserved: Vec::new(),
                hwpt: None,
                max_align: self.max_align,
                allowed: Vec::new(),
            },
        );
        Ok(id)
    }

    /// The lowest free object id.
    fn new_id(&self, what: Obj) -> u32 {
        let mut o = sync::lock(&self.objects);
        // `xa_limit_31b`: ids up to INT_MAX.
        let id = (1..=0x7fff_ffff_u32)
            .find(|i| !o.contains_key(i))
            .unwrap_or(u32::MAX);
        o.insert(id, what);
        id
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD` (`iommufd_device_bind`): the device object's id, which the
    /// kernel hands back as `out_devid` and `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` shows.
    pub fn bind_device(&self) -> u32 {
        self.new_id(Obj::Device)
    }

    /// The IOAS whose automatic HWPT `id` names, if it names one (an attach may name either:
    /// see [`Iommufd::attach`]).
    pub fn hwpt_ioas(&self, id: u32) -> Option<u32> {
        match sync::lock(&self.objects).get(&id) {
            Some(Obj::Hwpt(of)) => Some(*of),
            _ => None,
        }
    }

    /// The device object goes at unbind (the last close of the cdev).
    pub fn unbind_device(&self, devid: u32) {
        let mut o = sync::lock(&self.objects);
        if o.get(&devid) == Some(&Obj::Device) {
            o.remove(&devid);
        }
    }

    /// Each IOAS with attached devices has its HWPT, one without none: new ones first, so a
    /// replace never hands the old table's id to the new one.
    fn sync_hwpts(&self, m: &mut BTreeMap<u32, Ioas>) {
        for (&id, io) in m.iter_mut() {
            if !io.devices.is_empty() && io.hwpt.is_none() {
                io.hwpt = Some(self.new_id(Obj::Hwpt(id)));
            }
        }
        for io in m.values_mut() {
            if io.devices.is_empty() {
                if let Some(h) = io.hwpt.take() {
                    sync::lock(&self.objects).remove(&h);
                }
            }
        }
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: the device's DMA is translated by the IOAS from now on
    /// (a device attached elsewhere moves: the kernel's replace). The first device raises the
    /// IOAS's alignment to the page size: an area not aligned to it is `EADDRINUSE`
    /// (`iopt_check_iova_alignment` in io_pagetable.c); the IOAS a device leaves goes back to
    /// a byte once it has none.
    ///
    /// The checks, in the order of `iommufd_hw_pagetable_attach` and
    /// `iommufd_hwpt_paging_alloc` (device.c, hw_pagetable.c): the device's reserved regions
    /// (`iopt_table_enforce_dev_resv_regions`; the MSI window on Intel) must meet no area;
    /// then, for the first device, which brings the domain (`iopt_table_add_domain`), every
    /// area must be page aligned and inside the domain's aperture. Each failure is
    /// `EADDRINUSE` and changes nothing. On success the device's regions and, with the
    /// domain, everything past the aperture become reserved: a map there is `EINVAL`. They
    /// go again when the device (or the domain's last device) leaves.
    ///
    /// The id may name the IOAS or its HWPT (the same page table); any other object is
    /// `EINVAL`, no object `ENOENT` (`iommufd_device_change_pt`).
    pub fn attach(&self, dev: Bdf, pt: u32) -> Result<(), Errno> {
        let mut m = sync::lock(&self.ioas);
        let ioas = match sync::lock(&self.objects).get(&pt) {
            None => return Err(Errno::ENOENT),
            Some(Obj::Ioas) => pt,
            Some(Obj::Hwpt(of)) => *of,
            Some(Obj::Device) => return Err(Errno::EINVAL),
        };
        let r = self.attach_locked(&mut m, dev, ioas);
        self.sync_hwpts(&mut m);
        r
    }

    fn attach_locked(&self, m: &mut BTreeMap<u32, Ioas>, dev: Bdf, ioas: u32) -> Result<(), Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?;
        let group = self.group(dev);
        let io = m.get(&ioas).ok_or(Errno::ENOENT)?;
        if io.devices.contains(&dev) {
            // Already here: the kernel's replace with the same page table changes nothing
            // (the attachment is written again, so it is what this IOAS says).
            return Self::attach_group(iommu, &group, Attach::Paging(io.domain));
        }
        // The IOMMU group is the unit (device.c `iommufd_hw_pagetable_attach`,
        // `iommufd_device_do_replace`): a group attached elsewhere takes a fresh device of
        // it nowhere else (EINVAL); a device that is attached elsewhere moves, and with it
        // every attached device of its group.
        let elsewhere: Vec<Bdf> = m
            .iter()
            .filter(|&(&id, _)| id != ioas)
            .flat_map(|(_, o)| o.devices.iter().copied())
            .filter(|d| group.contains(d))
            .collect();
        if !elsewhere.is_empty() && !elsewhere.contains(&dev) {
            return Err(Errno::EINVAL);
        }
        let moving: Vec<Bdf> = std::iter::once(dev)
            .chain(elsewhere.into_iter().filter(|&d| d != dev))
            .collect();
        let resv: Vec<(Bdf, Vec<_>)> = moving
            .iter()
            .map(|&d| (d, iommu.reserved_regions(d)))
            .collect();
        if resv
            .iter()
            .flat_map(|(_, r)| r)
            .any(|r| io.area_meets(r.start, r.last) || io.allowed_meets(r.start, r.last))
        {
            return Err(Errno::EADDRINUSE);
        }
        let first = io.devices.is_empty();
        if first
            && (io.areas.values().any(|a| a.unaligned)
                || io.area_meets(APERTURE_END + 1, u64::MAX)
                || io.allowed_meets(APERTURE_END + 1, u64::MAX))
        {
            return Err(Errno::EADDRINUSE);
        }
        // The new domain is filled last, area by area in IOVA order (`iopt_fill_domain`):
        // pinning (so allocating) every memfd area's pages. One that cannot be pinned fails
        // the attach after the areas before it, and its own pinnable start, were faulted in
        // (what a failed fill unpins stays in the page cache).
        if first {
            for a in io.areas.values().filter(|a| a.att.is_none()) {
                if let Some(e) = a.unpinnable {
                    if a.pin_prefix > 0 {
                        a.file.memfd_populate(a.start, a.pin_prefix);
                    }
                    return Err(e);
                }
                a.file.memfd_populate(a.start, a.len);
            }
        }
        let group_here = io.devices.iter().any(|d| group.contains(d));
        if !group_here {
            Self::attach_group(iommu, &group, Attach::Paging(io.domain))?;
        }
        for (&id, other) in m.iter_mut() {
            if id != ioas {
                for d in &moving {
                    other.leave(*d);
                }
            }
        }
        let io = m.get_mut(&ioas).ok_or(Errno::ENOENT)?;
        if first {
            io.reserved.push(Reserved {
                start: APERTURE_END + 1,
                last: u64::MAX,
                owner: Owner::Domain,
            });
        }
        for (d, r) in resv {
            io.reserved.extend(r.iter().map(|r| Reserved {
                start: r.start,
                last: r.last,
                owner: Owner::Dev(d),
            }));
            io.devices.insert(d);
        }
        Ok(())
    }

    /// The functions of `dev`'s IOMMU group ([`crate::pci::iommu_group`]).
    fn group(&self, dev: Bdf) -> Vec<Bdf> {
        let f = self.env.dma.fabric();
        let g = crate::pci::iommu_group(f, dev);
        let mut out: Vec<Bdf> = f
            .functions()
            .filter(|x| {
                matches!(
                    x.kind(),
                    peerdma_pci::DeviceKind::Endpoint | peerdma_pci::DeviceKind::Vf
                )
            })
            .map(peerdma_pci::Function::bdf)
            .filter(|&b| crate::pci::iommu_group(f, b) == g)
            .collect();
        if !out.contains(&dev) {
            out.push(dev);
        }
        out
    }

    /// Puts every function of a group behind `to` (`iommu_attach_group`).
    fn attach_group(
        iommu: &peerdma_dma::iommu::Iommu,
        group: &[Bdf],
        to: Attach,
    ) -> Result<(), Errno> {
        for &d in group {
            iommu.attach(d, to)?;
        }
        Ok(())
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT` (`vfio_iommufd_physical_detach_ioas`): the device
    /// leaves its IOAS — its DMA is blocked from now on, its reserved regions go, and with
    /// the IOAS's last device the domain's — or nothing happens if it is attached nowhere.
    pub fn detach(&self, dev: Bdf) -> Result<(), Errno> {
        let mut m = sync::lock(&self.ioas);
        if !m.values_mut().any(|io| io.leave(dev)) {
            return Ok(());
        }
        self.sync_hwpts(&mut m);
        // The group leaves the domain with its last attached device
        // (`iommufd_hw_pagetable_detach`); until then the device still translates through it.
        let group = self.group(dev);
        if m.values()
            .any(|io| io.devices.iter().any(|d| group.contains(d)))
        {
            return Ok(());
        }
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?;
        Self::attach_group(iommu, &group, Attach::Blocked)
    }

    /// `IOMMU_DESTROY` of an IOAS (`iommufd_object_remove`, main.c): no such IOAS →
    /// `ENOENT`; a device still attached (its domain holds the IOAS) → `EBUSY`; otherwise
    /// every area is unmapped (their dma-buf attachments go) and the IOAS is gone.
    pub fn ioas_destroy(&self, ioas: u32) -> Result<(), Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        // Out of the table first, in one hold of the lock (as the kernel removes the object
        // before destroying it): a map or attach racing this one finds no IOAS.
        let io = {
            let mut m = sync::lock(&self.ioas);
            // A bound device and an attached HWPT have users besides the table
            // (`iommufd_object_remove`): EBUSY.
            match sync::lock(&self.objects).get(&ioas) {
                None => return Err(Errno::ENOENT),
                Some(Obj::Device | Obj::Hwpt(_)) => return Err(Errno::EBUSY),
                Some(Obj::Ioas) => {}
            }
            let io = m.get(&ioas).ok_or(Errno::ENOENT)?;
            if !io.devices.is_empty() {
                return Err(Errno::EBUSY);
            }
            sync::lock(&self.objects).remove(&ioas);
            m.remove(&ioas).ok_or(Errno::ENOENT)?
        };
        Self::teardown(&iommu, io.domain, io.areas.into_iter().collect());
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS` (ioas.c `iommufd_ioas_allow_iovas`, `iommufd_ioas_load_iovas`;
    /// io_pagetable.c `iopt_set_allow_iova`), in the kernel's order: a nonzero reserved word
    /// → `EOPNOTSUPP`; no such IOAS → `ENOENT`; each range in turn: start not below last, or
    /// meeting an earlier one of the list → `EINVAL`; then an allowed range that meets a
    /// reserved one (a device's MSI window, the domain's aperture) → `EADDRINUSE`, the old list
    /// kept. Otherwise the list replaces the old one (an empty list allows everything again).
    /// From then on a kernel-chosen IOVA lies in an allowed range, and attaching a device whose
    /// reserved regions meet one is `EADDRINUSE`; fixed IOVAs are not limited.
    pub fn allow_iovas(
        &self,
        ioas: u32,
        ranges: &[(u64, u64)],
        reserved_word: u32,
    ) -> Result<(), Errno> {
        if reserved_word != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut m = sync::lock(&self.ioas);
        let io = m.get_mut(&ioas).ok_or(Errno::ENOENT)?;
        let mut list: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(a, b) in ranges {
            if a >= b || list.iter().any(|&(x, y)| x <= b && y >= a) {
                return Err(Errno::EINVAL);
            }
            list.push((a, b));
        }
        list.sort_unstable();
        if list.iter().any(|&(a, b)| io.reserved_meets(a, b)) {
            return Err(Errno::EADDRINUSE);
        }
        io.allowed = list;
        Ok(())
    }

    /// `IOMMU_IOAS_IOVA_RANGES` with room for `room` ranges, in the order of Linux 7.2's
    /// `iommufd_ioas_iova_ranges` (ioas.c): a nonzero reserved word → `EOPNOTSUPP`; no such
    /// IOAS → `ENOENT`; then the ranges no reserved region covers, the IOAS's alignment,
    /// and `EMSGSIZE` when there are more ranges than room (the count is still returned, in
    /// the error's [`IovaRanges`]).
    pub fn iova_ranges(
        &self,
        ioas: u32,
        room: u32,
        reserved_word: u32,
    ) -> Result<IovaRanges, (Errno, Option<IovaRanges>)> {
        if reserved_word != 0 {
            return Err((Errno::EOPNOTSUPP, None));
        }
        let m = sync::lock(&self.ioas);
        let io = m.get(&ioas).ok_or((Errno::ENOENT, None))?;
        let all = io.allowed_ranges();
        let total = u32::try_from(all.len()).unwrap_or(u32::MAX);
        let r = IovaRanges {
            ranges: all.into_iter().take(room as usize).collect(),
            total,
            alignment: io.alignment(),
        };
        if total > room {
            return Err((Errno::EMSGSIZE, Some(r)));
        }
        Ok(r)
    }

    /// `IOMMU_IOAS_MAP_FILE` as the ioctl receives it: `fd` in `proc`, `flags` of
    /// `IOMMU_IOAS_MAP_*`; returns the IOVA. The checks run in the order of Linux 7.2's
    /// `iommufd_ioas_map_file` (drivers/iommu/iommufd/ioas.c), `iopt_map_file_pages`
    /// (io_pagetable.c), `iopt_alloc_dmabuf_pages` (pages.c), `iopt_alloc_area_pages`,
    /// `iopt_check_iova` and `iopt_insert_area` (io_pagetable.c):
    ///
    /// 1. a flag other than FIXED_IOVA, READABLE, WRITEABLE → `EOPNOTSUPP`;
    /// 2. `iova` or `length` of `u64::MAX` → `EOVERFLOW`;
    /// 3. neither READABLE nor WRITEABLE → `EINVAL`;
    /// 4. no such IOAS → `ENOENT`;
    /// 5. `length` 0 → `EINVAL`; `start + length - 1` wraps → `EOVERFLOW`;
    /// 6. `fd` not open → `EBADF`; open but not a dma-buf → `EINVAL` (Linux would try it as a
    ///    memfd; no other file kind is modelled);
    /// 7. the window ends past the buffer → `EINVAL`;
    /// 8. the dma-buf attach and the vfio interconnect (`EOPNOTSUPP` for another exporter or
    ///    several ranges, `ENODEV` while revoked);
    /// 9. `length` not aligned to the IOAS → `EINVAL`; then with FIXED_IOVA
    ///    (`iopt_check_iova`): `iova` not aligned → `EINVAL`, `iova + length - 1` wraps →
    ///    `EOVERFLOW`, the range meets a reserved region (a device's MSI window, past the
    ///    domain's aperture) → `EINVAL`, or an area → `EEXIST`; without it the kernel picks
    ///    the IOVA (`iopt_alloc_iova`, see `Ioas::alloc_iova`): `length` of half the space
    ///    or more → `EOVERFLOW`, an alignment below the IOAS's → `EINVAL`, no room →
    ///    `ENOSPC`;
    /// 10. `start` not page aligned → `EINVAL`.
    ///
    /// Returns the IOVA (the kernel's choice without FIXED_IOVA).
    #[allow(clippy::too_many_arguments)]
    pub fn map_file_ioctl(
        &self,
        proc: &Process,
        ioas: u32,
        fd: i32,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        self.arg_checks(ioas, start, length, iova, flags)?;
        let file = proc.fget(fd)?;
        let r = self.map_checked(ioas, &file, start, length, iova, flags);
        file.put();
        r
    }

    /// `IOMMU_IOAS_MAP_FILE` of `length` bytes from `start` of a dma-buf at a fixed `iova`,
    /// readable and writeable: [`Iommufd::map_file_ioctl`] with those flags, for a caller
    /// that holds the file.
    pub fn map_file(
        &self,
        ioas: u32,
        file: &Arc<File>,
        start: u64,
        length: u64,
        iova: u64,
    ) -> Result<(), Errno> {
        let flags = MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE;
        self.arg_checks(ioas, start, length, iova, flags)?;
        self.map_checked(ioas, file, start, length, iova, flags)
            .map(|_| ())
    }

    /// What `iommufd_ioas_map` and `iommufd_ioas_map_file` check first, in this order: an
    /// unknown flag (or, for IOAS_MAP, a nonzero `__reserved`) → `EOPNOTSUPP`; `iova` or
    /// `length` of `u64::MAX` → `EOVERFLOW`; neither READABLE nor WRITEABLE → `EINVAL`; no
    /// such IOAS → `ENOENT`.
    fn map_prologue(
        &self,
        ioas: u32,
        iova: u64,
        length: u64,
        flags: u32,
        reserved: u32,
    ) -> Result<(), Errno> {
        if flags & !(MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE) != 0 || reserved != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if iova == u64::MAX || length == u64::MAX {
            return Err(Errno::EOVERFLOW);
        }
        if flags & (MAP_READABLE | MAP_WRITEABLE) == 0 {
            return Err(Errno::EINVAL);
        }
        if !sync::lock(&self.ioas).contains_key(&ioas) {
            return Err(Errno::ENOENT);
        }
        Ok(())
    }

    /// Steps 1 to 5 of [`Iommufd::map_file_ioctl`]: everything before the fd is looked at.
    fn arg_checks(
        &self,
        ioas: u32,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        self.map_prologue(ioas, iova, length, flags, 0)?;
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        start.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
        Ok(())
    }

    /// Steps 6 (the file's kind) to 10 of [`Iommufd::map_file_ioctl`], and the map.
    fn map_checked(
        &self,
        ioas: u32,
        file: &Arc<File>,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        let domain = sync::lock(&self.ioas)
            .get(&ioas)
            .ok_or(Errno::ENOENT)?
            .domain;
        let Some(buf) = file.dmabuf() else {
            return self.map_file_pages(ioas, file, start, length, iova, flags);
        };
        // `arg_checks` made sure this does not wrap.
        let last = start + (length - 1);
        if last >= buf.size() {
            return Err(Errno::EINVAL);
        }
        let state = Arc::new(Mutex::new(AreaState::Pending));
        // The area's IOVA, known once the map has the lock (the kernel may choose it); the
        // callback reads it under the same lock.
        let at = Arc::new(AtomicU64::new(iova));
        let (s2, m2, at2) = (state.clone(), iommu.clone(), at.clone());
        let ops = ImporterOps {
            allow_peer2peer: true,
            invalidate: Some(Arc::new(move |_: &Attachment, _: &ResvGuard<'_>| {
                // Revoked: the area's entries go and the IOTLB is synced; it stays dead.
                let mut st = sync::lock(&s2);
                if *st == AreaState::Live {
                    let iova = at2.load(Ordering::Relaxed);
                    m2.unmap(domain, iova, length);
                    m2.sync_range(domain, iova, length);
                }
                if *st != AreaState::Pending {
                    *st = AreaState::Dead;
                }
            })),
            stub: false,
        };
        // The attachment's device: iommufd itself (the kernel shows it as "iommu").
        let me = Bdf::new(0, 0, 0, 0).ok_or(Errno::EINVAL)?;
        let att = buf.dynamic_attach(Some(me), Some(ops))?;
        sync::points::point("iommufd.map_file.attached");
        let r = {
            let g = buf.lock();
            // The revocation state is read here, under the lock, by the interconnect call.
            iommufd_map(buf, &att, &g).and_then(|pv| {
                let mut ioas_map = sync::lock(&self.ioas);
                let io = ioas_map.get_mut(&ioas).ok_or(Errno::ENOENT)?;
                let iova = io.place(start, length, iova, flags)?;
                at.store(iova, Ordering::Relaxed);
                let unaligned = (iova | length | start) % PAGE != 0;
                // With no device there is no domain: nothing to write, and past the aperture
                // nothing could be (the first device's domain refuses the area instead).
                let unbacked =
                    unaligned || (io.devices.is_empty() && iova + (length - 1) > APERTURE_END);
                let mut p = prot::MMIO;
                if flags & MAP_READABLE != 0 {
                    p |= prot::READ;
                }
                if flags & MAP_WRITEABLE != 0 {
                    p |= prot::WRITE;
                }
                let phys = pv.paddr.get() + start;
                let grant = if unbacked {
                    // No device can reach it: nothing to write, nothing to watch.
                    *sync::lock(&state) = AreaState::Unbacked;
                    None
                } else {
                    let born = crate::watch::birth(buf);
                    iommu.map(domain, iova, phys, length, p)?;
                    iommu.sync_range(domain, iova, length);
                    *sync::lock(&state) = AreaState::Live;
                    crate::watch::grant(buf, None, (iova, phys, length), "iommufd area", born)
                };
                io.areas.insert(
                    iova,
                    Area {
                        len: length,
                        unaligned,
                        unpinnable: None,
                        pin_prefix: 0,
                        start,
                        file: file.get(),
                        att: Some(att.clone()),
                        state: state.clone(),
                        grant,
                    },
                );
                Ok(iova)
            })
        };
        if r.is_err() {
            buf.detach(&att);
        }
        r
    }

    /// `IOMMU_IOAS_MAP_FILE` of a file that is not a dma-buf (`iopt_map_file_pages`'s
    /// `fget` branch, `iopt_alloc_file_pages`, `iopt_map_pages`): a length past
    /// `SIZE_MAX - PAGE_SIZE` → `EINVAL` (`iopt_alloc_pages`); the area is placed
    /// ([`Ioas::place`]); then, if a device is attached, its pages are pinned at once
    /// (`iopt_fill_domains_pages` → `memfd_pin_folios`): a file that is not shmem (an
    /// eventfd), or a range whose last page reaches the file's size, is `EINVAL` and the
    /// area goes again. With no device nothing is pinned and any file maps; the first
    /// attach then pins (see [`Area::unpinnable`]). A memfd's pages are RAM: a device's
    /// DMA through the area lands in the file.
    fn map_file_pages(
        &self,
        ioas: u32,
        file: &Arc<File>,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        if length > u64::MAX - PAGE {
            return Err(Errno::EINVAL);
        }
        // The pinned span: whole pages from the one holding `start` to the one holding
        // the last byte (`arg_checks` made sure `start + length - 1` does not wrap).
        let last = start + (length - 1);
        let pin_end = last | (PAGE - 1);
        let phys = match file.kind() {
            peerdma_dmabuf::buf::FileKind::Memfd { base, size, .. } if pin_end < *size => {
                Ok(base + start)
            }
            _ => Err(Errno::EINVAL),
        };
        self.map_pages(ioas, file, start, start, length, iova, flags, (phys, 0))
    }

    /// `IOMMU_IOAS_MAP` of `length` bytes of user memory at `uptr`, in the order of Linux
    /// 7.2's `iommufd_ioas_map` (ioas.c), `iopt_map_user_pages` (io_pagetable.c),
    /// `iopt_alloc_user_pages` and `iopt_alloc_pages` (pages.c), then the placement and
    /// the pin of [`Iommufd::map_file_ioctl`]'s file branch:
    ///
    /// 1. a flag other than FIXED_IOVA, READABLE, WRITEABLE, or a nonzero `reserved` word
    ///    → `EOPNOTSUPP`;
    /// 2. `iova` or `length` of `u64::MAX` → `EOVERFLOW`;
    /// 3. neither READABLE nor WRITEABLE → `EINVAL`;
    /// 4. no such IOAS → `ENOENT`;
    /// 5. `uptr + length` wraps → `EOVERFLOW` (the end, not the last byte: unlike
    ///    MAP_FILE, a range ending exactly at 2^64 is refused);
    /// 6. `length` 0 or past `u64::MAX - PAGE` → `EINVAL`;
    /// 7. the placement (`Ioas::place`, with `uptr` giving the alignment and page offset);
    /// 8. with a device attached, the pages are pinned now (`memory` says what pinning
    ///    finds): a fault (`EFAULT`: nothing mapped there, or a read-only mapping asked to
    ///    be writeable) fails the map after the pages before it were faulted into the memfd.
    ///    Without one, nothing is pinned and the first attach pins (and fails with that
    ///    errno).
    ///
    /// Returns the IOVA.
    #[allow(clippy::too_many_arguments)]
    pub fn map_user(
        &self,
        ioas: u32,
        memory: &UserPages<'_>,
        uptr: u64,
        length: u64,
        iova: u64,
        flags: u32,
        reserved: u32,
    ) -> Result<u64, Errno> {
        self.map_prologue(ioas, iova, length, flags, reserved)?;
        uptr.checked_add(length).ok_or(Errno::EOVERFLOW)?;
        if length == 0 || length > u64::MAX - PAGE {
            return Err(Errno::EINVAL);
        }
        // The area holds a file: the memfd, or for memory that is not there an empty one.
        let (file, start) = match memory.memfd {
            Some((f, at)) => (f.get(), at),
            None => (File::memfd(0, 0), 0),
        };
        let phys = match file.kind() {
            peerdma_dmabuf::buf::FileKind::Memfd { base, .. } if memory.pinnable >= length => {
                Ok(base + start)
            }
            _ => Err(Errno::EFAULT),
        };
        let prefix = memory.pinnable.min(length);
        let r = self.map_pages(
            ioas,
            &file,
            uptr,
            start,
            length,
            iova,
            flags,
            (phys, prefix),
        );
        file.put();
        r
    }

    /// The file and user branches' common end (`iopt_map_common`): the area placed at
    /// `iova` (or where the kernel picks, aligned by `align_from`), then — with a device
    /// attached — its pages pinned (`pin`: where they are, or the errno pinning gives with
    /// how many bytes from the start pinned before it) and written into the domain.
    #[allow(clippy::too_many_arguments)]
    fn map_pages(
        &self,
        ioas: u32,
        file: &Arc<File>,
        align_from: u64,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
        pin: (Result<u64, Errno>, u64),
    ) -> Result<u64, Errno> {
        let (phys, prefix) = pin;
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        let mut ioas_map = sync::lock(&self.ioas);
        let io = ioas_map.get_mut(&ioas).ok_or(Errno::ENOENT)?;
        let iova = io.place(align_from, length, iova, flags)?;
        if !io.devices.is_empty() {
            if let Err(e) = phys {
                if prefix > 0 {
                    file.memfd_populate(start, prefix);
                }
                return Err(e);
            }
            // A domain is there to fill: the pages are pinned, so allocated, now.
            file.memfd_populate(start, length);
        }
        let unaligned = (iova | length | align_from) % PAGE != 0;
        let state = Arc::new(Mutex::new(AreaState::Unbacked));
        if let Ok(phys) = phys {
            let unbacked =
                unaligned || (io.devices.is_empty() && last_iova(iova, length) > APERTURE_END);
            if !unbacked {
                let mut p = 0;
                if flags & MAP_READABLE != 0 {
                    p |= prot::READ;
                }
                if flags & MAP_WRITEABLE != 0 {
                    p |= prot::WRITE;
                }
                iommu.map(io.domain, iova, phys, length, p)?;
                iommu.sync_range(io.domain, iova, length);
                *sync::lock(&state) = AreaState::Live;
            }
        }
        io.areas.insert(
            iova,
            Area {
                len: length,
                unaligned,
                unpinnable: phys.err(),
                pin_prefix: prefix,
                start,
                file: file.get(),
                att: None,
                state,
                grant: None,
            },
        );
        Ok(iova)
    }

    /// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`, in the order of Linux 7.2's
    /// `iommufd_ioas_unmap` (ioas.c), `iopt_unmap_iova` and `iopt_unmap_iova_range`
    /// (io_pagetable.c): no such IOAS → `ENOENT`; `iova` 0 with `length` `u64::MAX` unmaps
    /// everything (0 areas is success); otherwise `iova` or `length` of `u64::MAX` →
    /// `EOVERFLOW`, `length` 0 → `EINVAL`, a range that wraps → `EOVERFLOW`. Then the areas
    /// that meet the range go in IOVA order, each whole; the first that is only partly inside
    /// stops the walk with `ENOENT` — **the areas before it are already unmapped** (Linux does
    /// not undo them) — and a range that meets no area is `ENOENT`. Returns the bytes
    /// unmapped.
    pub fn unmap(&self, ioas: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        let (first, last) = {
            if !sync::lock(&self.ioas).contains_key(&ioas) {
                return Err(Errno::ENOENT);
            }
            if iova == 0 && length == u64::MAX {
                (0, u64::MAX)
            } else {
                if iova == u64::MAX || length == u64::MAX {
                    return Err(Errno::EOVERFLOW);
                }
                if length == 0 {
                    return Err(Errno::EINVAL);
                }
                (iova, iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?)
            }
        };
        let all = first == 0 && last == u64::MAX;
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        let (domain, gone, partial) = {
            let mut m = sync::lock(&self.ioas);
            let io = m.get_mut(&ioas).ok_or(Errno::ENOENT)?;
            // The areas meeting [first, last], in IOVA order: one starting before `first`
            // that reaches into it, then those starting inside.
            let before = io
                .areas
                .range(..first)
                .next_back()
                .filter(|(a, area)| **a + (area.len - 1) >= first)
                .map(|(a, _)| *a);
            let meeting: Vec<u64> = before
                .into_iter()
                .chain(io.areas.range(first..=last).map(|(a, _)| *a))
                .collect();
            let mut gone = Vec::new();
            let mut partial = false;
            for a in meeting {
                let len = io.areas[&a].len;
                if a < first || a + (len - 1) > last {
                    partial = true;
                    break;
                }
                if let Some(x) = io.areas.remove(&a) {
                    gone.push((a, x));
                }
            }
            (io.domain, gone, partial)
        };
        sync::points::point("iommufd.unmap.removed");
        let total = Self::teardown(&iommu, domain, gone);
        if partial || (total == 0 && !all) {
            return Err(Errno::ENOENT);
        }
        Ok(total)
    }

    /// Takes down areas already removed from their IOAS: entries cleared and synced (under
    /// the buffer's lock), grants ended, attachments detached, files given back. Returns the
    /// bytes they covered.
    fn teardown(
        iommu: &peerdma_dma::iommu::Iommu,
        domain: DomainId,
        gone: Vec<(u64, Area)>,
    ) -> u64 {
        let mut total = 0;
        for (at, area) in gone {
            if area.att.is_none() {
                // A file area: its entries go, its pages are unpinned.
                let mut st = sync::lock(&area.state);
                if *st == AreaState::Live {
                    iommu.unmap(domain, at, area.len);
                    iommu.sync_range(domain, at, area.len);
                }
                *st = AreaState::Dead;
            } else if let Some(buf) = area.file.dmabuf() {
                {
                    let _g = buf.lock();
                    let mut st = sync::lock(&area.state);
                    if *st == AreaState::Live {
                        iommu.unmap(domain, at, area.len);
                        iommu.sync_range(domain, at, area.len);
                    }
                    *st = AreaState::Dead;
                    if let Some(id) = area.grant {
                        crate::watch::end(buf, id);
                    }
                }
                if let Some(att) = &area.att {
                    buf.detach(att);
                }
            }
            total += area.len;
            area.file.put();
        }
        total
    }

    fn release_all(&self) {
        let all: Vec<(u32, u64, u64)> = sync::lock(&self.ioas)
            .iter()
            .flat_map(|(&id, io)| io.areas.iter().map(move |(&v, a)| (id, v, a.len)))
            .collect();
        for (id, iova, len) in all {
            let _ = self.unmap(id, iova, len);
        }
    }

    /// Whether the area at `iova` was invalidated (its DMA faults).
    pub fn is_dead(&self, ioas: u32, iova: u64) -> Option<bool> {
        sync::lock(&self.ioas)
            .get(&ioas)
            .and_then(|io| io.areas.get(&iova))
            .map(|a| *sync::lock(&a.state) == AreaState::Dead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IOAS with one device attached and these ranges reserved (no areas).
    fn ioas(reserved: &[(u64, u64)]) -> Ioas {
        Ioas {
            domain: DomainId(0),
            areas: BTreeMap::new(),
            devices: [Bdf::new(0, 1, 0, 0).unwrap()].into_iter().collect(),
            reserved: reserved
                .iter()
                .map(|&(start, last)| Reserved {
                    start,
                    last,
                    owner: Owner::Domain,
                })
                .collect(),
            hwpt: Some(1),
            max_align: PAGE,
            allowed: Vec::new(),
        }
    }

    const MSI: (u64, u64) = peerdma_dma::iommu::MSI_WINDOW;
    const TOP: (u64, u64) = (APERTURE_END + 1, u64::MAX);

    #[test]
    fn a_kernel_chosen_iova_comes_from_the_allowed_spans() {
        let mut io = ioas(&[MSI, TOP]);
        // Two touching ranges are one span: a 16 KiB window fits across their seam.
        io.allowed = vec![(0x10_0000, 0x10_1fff), (0x10_2000, 0x10_3fff)];
        assert_eq!(io.allowed_spans(), [(0x10_0000, 0x10_3fff)]);
        assert_eq!(io.alloc_iova(0, 0x4000), Ok(0x10_0000));
        assert_eq!(
            io.alloc_iova(0, 0x5000),
            Err(Errno::ENOSPC),
            "past the span"
        );
        // A range reaching below the second page or past the last but one is clipped.
        io.allowed = vec![(0, 0x1fff), (u64::MAX - 0x1fff, u64::MAX)];
        assert_eq!(
            io.allowed_spans(),
            [(0x1000, 0x1fff), (u64::MAX - 0x1fff, u64::MAX - 0x1000)]
        );
        assert_eq!(io.alloc_iova(0, 0x1000), Ok(0x1000));
        // An allowed span a reserved range covers gives nothing: the next one is used.
        io.allowed = vec![MSI, (0x20_0000, 0x20_ffff)];
        assert_eq!(io.alloc_iova(0, 0x1000), Ok(0x20_0000));
        assert!(io.allowed_meets(MSI.0, MSI.0));
        assert!(!io.allowed_meets(0x21_0000, MSI.0 - 1));
    }

    #[test]
    fn a_kernel_chosen_iova_skips_reserved_ranges() {
        // Everything below the MSI window used but its last page.
        let io = ioas(&[(0x1000, MSI.0 - 0x1001), MSI, TOP]);
        assert_eq!(io.alloc_iova(0, 0x1000), Ok(MSI.0 - 0x1000));
        assert_eq!(
            io.alloc_iova(0, 0x2000),
            Ok(MSI.1 + 1),
            "too big for the page"
        );
        // Nothing left at all.
        let full = ioas(&[(0x1000, u64::MAX)]);
        assert_eq!(full.alloc_iova(0, 0x1000), Err(Errno::ENOSPC));
        // Half the space or more.
        assert_eq!(io.alloc_iova(0, 1 << 63), Err(Errno::EOVERFLOW));
        // An offset whose lowest bit is below the IOAS's alignment.
        assert_eq!(io.alloc_iova(0x800, 0x1000), Err(Errno::EINVAL));
        // Page 0 is never chosen, and the start's offset in its page is kept.
        let empty = ioas(&[]);
        assert_eq!(empty.alloc_iova(0, 0x1000), Ok(0x1000));
        let mut byte = ioas(&[]);
        byte.devices.clear();
        assert_eq!(byte.alloc_iova(0x10_0123, 0x1000), Ok(0x1123));
    }

    #[test]
    fn with_huge_pages_a_kernel_chosen_iova_is_aligned_up_to_2_mib() {
        let mut thp = ioas(&[]);
        thp.max_align = HPAGE;
        // The length rounded up to a power of two, at most 2 MiB; page 0 is never chosen.
        assert_eq!(thp.alloc_iova(0, 0x1000), Ok(0x1000));
        assert_eq!(thp.alloc_iova(0, 0x3000), Ok(0x4000));
        assert_eq!(thp.alloc_iova(0, 0x10_0000), Ok(0x10_0000));
        assert_eq!(thp.alloc_iova(0, 0x40_0000), Ok(0x20_0000));
        // The start's lowest set bit lowers it.
        assert_eq!(thp.alloc_iova(0x8000, 0x10_0000), Ok(0x8000));
        // Without huge pages all of them go at the second page.
        let flat = ioas(&[]);
        for (start, len) in [
            (0, 0x3000),
            (0, 0x10_0000),
            (0, 0x40_0000),
            (0x8000, 0x10_0000),
        ] {
            assert_eq!(
                flat.alloc_iova(start, len),
                Ok(0x1000),
                "{start:#x}+{len:#x}"
            );
        }
    }

    #[test]
    fn iova_ranges_are_the_holes_between_reserved_ranges() {
        assert_eq!(ioas(&[]).allowed_ranges(), vec![(0, u64::MAX)]);
        assert_eq!(
            ioas(&[MSI, TOP]).allowed_ranges(),
            vec![(0, MSI.0 - 1), (MSI.1 + 1, APERTURE_END)]
        );
        // Overlapping and touching ranges merge; one at 0 leaves no hole there.
        assert_eq!(
            ioas(&[(0, 0xfff), (0x1000, 0x1fff), (0x1800, 0x2fff), TOP]).allowed_ranges(),
            vec![(0x3000, APERTURE_END)]
        );
    }
}
