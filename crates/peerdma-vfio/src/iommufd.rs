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
//! those before it unmapped. Not modelled yet: kernel-chosen IOVAs (no FIXED_IOVA), reserved
//! regions and `IOMMU_IOAS_IOVA_RANGES`, detach, IOAS destroy.

use peerdma_pci::sync::{Arc, Mutex};
use std::collections::BTreeMap;

use peerdma_dma::iommu::{Attach, DomainId, prot};
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Process, ResvGuard};
use peerdma_pci::{Bdf, Errno, sync};
use peerdma_uapi::backend::{MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE};

use crate::pci::iommufd_map;

const PAGE: u64 = 4096;

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

struct Area {
    len: u64,
    /// Its IOVA, length or offset in the buffer is not page aligned.
    unaligned: bool,
    file: Arc<File>,
    att: Arc<Attachment>,
    state: Arc<Mutex<AreaState>>,
    /// The watch's record of the mapping, ended when the entries go.
    grant: Option<crate::watch::GrantId>,
}

struct Ioas {
    domain: DomainId,
    areas: BTreeMap<u64, Area>,
    /// Devices attached now (each brings a domain whose page size is 4 KiB).
    devices: std::collections::BTreeSet<Bdf>,
}

impl Ioas {
    /// `iopt->iova_alignment`: 1 with no domain, the page size once a device is attached.
    fn alignment(&self) -> u64 {
        if self.devices.is_empty() { 1 } else { PAGE }
    }
}

/// An open `/dev/iommu`.
pub struct Iommufd {
    env: DmaEnv,
    ioas: Mutex<BTreeMap<u32, Ioas>>,
    next: Mutex<u32>,
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
    /// iommufd on a machine with an IOMMU (`ENODEV` without one).
    pub fn open(env: &DmaEnv) -> Result<Iommufd, Errno> {
        env.dma.iommu().ok_or(Errno::ENODEV)?;
        Ok(Iommufd {
            env: env.clone(),
            ioas: Mutex::new(BTreeMap::new()),
            next: Mutex::new(1),
        })
    }

    /// `IOMMU_IOAS_ALLOC`: a new, empty I/O address space.
    pub fn ioas_alloc(&self) -> Result<u32, Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?;
        let domain = iommu.new_domain();
        let mut n = sync::lock(&self.next);
        let id = *n;
        *n += 1;
        sync::lock(&self.ioas).insert(
            id,
            Ioas {
                domain,
                areas: BTreeMap::new(),
                devices: std::collections::BTreeSet::new(),
            },
        );
        Ok(id)
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: the device's DMA is translated by the IOAS from now on
    /// (a device attached elsewhere moves: the kernel's replace). The first device raises the
    /// IOAS's alignment to the page size: an area not aligned to it is `EADDRINUSE`
    /// (`iopt_check_iova_alignment` in io_pagetable.c); the IOAS a device leaves goes back to
    /// a byte once it has none.
    pub fn attach(&self, dev: Bdf, ioas: u32) -> Result<(), Errno> {
        let mut m = sync::lock(&self.ioas);
        let io = m.get_mut(&ioas).ok_or(Errno::ENOENT)?;
        if io.devices.is_empty() && io.areas.values().any(|a| a.unaligned) {
            return Err(Errno::EADDRINUSE);
        }
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?;
        iommu.attach(dev, Attach::Paging(io.domain))?;
        for (&id, other) in m.iter_mut() {
            if id == ioas {
                other.devices.insert(dev);
            } else {
                other.devices.remove(&dev);
            }
        }
        Ok(())
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
    /// 9. `length` or `iova` not page aligned → `EINVAL`; `iova + length - 1` wraps →
    ///    `EOVERFLOW`; the range overlaps an area → `EEXIST`;
    /// 10. `start` not page aligned → `EINVAL`.
    ///
    /// Without FIXED_IOVA the kernel picks the IOVA; that is not modelled (`EOPNOTSUPP`, at
    /// the point where the kernel would pick).
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
        r.map(|()| iova)
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
        if flags & !(MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE) != 0 {
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
    ) -> Result<(), Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        let domain = sync::lock(&self.ioas)
            .get(&ioas)
            .ok_or(Errno::ENOENT)?
            .domain;
        let buf = file.dmabuf().ok_or(Errno::EINVAL)?;
        // `arg_checks` made sure this does not wrap.
        let last = start + (length - 1);
        if last >= buf.size() {
            return Err(Errno::EINVAL);
        }
        let state = Arc::new(Mutex::new(AreaState::Pending));
        let (s2, m2) = (state.clone(), iommu.clone());
        let ops = ImporterOps {
            allow_peer2peer: true,
            invalidate: Some(Arc::new(move |_: &Attachment, _: &ResvGuard<'_>| {
                // Revoked: the area's entries go and the IOTLB is synced; it stays dead.
                let mut st = sync::lock(&s2);
                if *st == AreaState::Live {
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
                let align = io.alignment();
                if length % align != 0 {
                    return Err(Errno::EINVAL);
                }
                if flags & MAP_FIXED_IOVA == 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                if iova % align != 0 {
                    return Err(Errno::EINVAL);
                }
                let end = iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
                if io
                    .areas
                    .range(..=end)
                    .next_back()
                    .is_some_and(|(&a, area)| a + (area.len - 1) >= iova)
                {
                    return Err(Errno::EEXIST);
                }
                if (start % PAGE) % align != 0 {
                    return Err(Errno::EINVAL);
                }
                let unaligned = (iova | length | start) % PAGE != 0;
                let mut p = prot::MMIO;
                if flags & MAP_READABLE != 0 {
                    p |= prot::READ;
                }
                if flags & MAP_WRITEABLE != 0 {
                    p |= prot::WRITE;
                }
                let phys = pv.paddr.get() + start;
                let grant = if unaligned {
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
                        file: file.get(),
                        att: att.clone(),
                        state: state.clone(),
                        grant,
                    },
                );
                Ok(())
            })
        };
        if r.is_err() {
            buf.detach(&att);
        }
        r
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
        let mut total = 0;
        for (at, area) in gone {
            if let Some(buf) = area.file.dmabuf() {
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
                buf.detach(&area.att);
            }
            total += area.len;
            area.file.put();
        }
        if partial || (total == 0 && !all) {
            return Err(Errno::ENOENT);
        }
        Ok(total)
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
