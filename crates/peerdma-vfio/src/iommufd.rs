//! iommufd as a dma-buf importer (Linux 7.2, as observed under QEMU): IOAS objects, devices
//! attached to them, and `IOMMU_IOAS_MAP_FILE` of a vfio dma-buf through the private vfio
//! interconnect — one range only, pinned as a revocable importer. An invalidation clears and
//! syncs the area's IOMMU entries, so the device's DMA faults, and **the area stays dead** when
//! the buffer comes back: the user unmaps it (whole) and maps the buffer again.

use peerdma_pci::sync::{Arc, Mutex};
use std::collections::BTreeMap;

use peerdma_dma::iommu::{Attach, DomainId, prot};
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{Attachment, File, ImporterOps, ResvGuard};
use peerdma_pci::{Bdf, Errno, sync};

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
    /// Invalidated or unmapped: entries cleared and the IOTLB synced. An invalidated area
    /// stays dead until the user unmaps it.
    Dead,
}

struct Area {
    len: u64,
    file: Arc<File>,
    att: Arc<Attachment>,
    state: Arc<Mutex<AreaState>>,
    /// The watch's record of the mapping, ended when the entries go.
    grant: Option<crate::watch::GrantId>,
}

struct Ioas {
    domain: DomainId,
    areas: BTreeMap<u64, Area>,
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
            },
        );
        Ok(id)
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: the device's DMA is translated by the IOAS from now on.
    pub fn attach(&self, dev: Bdf, ioas: u32) -> Result<(), Errno> {
        let d = sync::lock(&self.ioas)
            .get(&ioas)
            .ok_or(Errno::ENOENT)?
            .domain;
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?;
        iommu.attach(dev, Attach::Paging(d))
    }

    /// `IOMMU_IOAS_MAP_FILE` of `length` bytes from `start` of a dma-buf at a fixed `iova`.
    /// Not a vfio buffer, or one with several ranges → `EOPNOTSUPP`; revoked → `ENODEV`;
    /// an occupied IOVA → `EEXIST`; a window outside the buffer or not page aligned →
    /// `EINVAL`.
    pub fn map_file(
        &self,
        ioas: u32,
        file: &Arc<File>,
        start: u64,
        length: u64,
        iova: u64,
    ) -> Result<(), Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        let domain = sync::lock(&self.ioas)
            .get(&ioas)
            .ok_or(Errno::ENOENT)?
            .domain;
        let buf = file.dmabuf().ok_or(Errno::EINVAL)?;
        if length == 0
            || (start | length | iova) % PAGE != 0
            || start.checked_add(length).is_none_or(|e| e > buf.size())
        {
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
                let end = iova.checked_add(length).ok_or(Errno::EINVAL)?;
                if io
                    .areas
                    .range(..end)
                    .next_back()
                    .is_some_and(|(&a, area)| a + area.len > iova)
                {
                    return Err(Errno::EEXIST);
                }
                let p = prot::READ | prot::WRITE | prot::MMIO;
                let phys = pv.paddr.get() + start;
                let born = crate::watch::birth(buf);
                iommu.map(domain, iova, phys, length, p)?;
                iommu.sync_range(domain, iova, length);
                *sync::lock(&state) = AreaState::Live;
                let grant =
                    crate::watch::grant(buf, None, (iova, phys, length), "iommufd area", born);
                io.areas.insert(
                    iova,
                    Area {
                        len: length,
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

    /// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`: every area inside it goes and the
    /// bytes unmapped are returned. An area only partly inside, or no area at all, is
    /// `ENOENT` (and nothing is unmapped), as on Linux 7.2.
    pub fn unmap(&self, ioas: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        let iommu = self.env.dma.iommu().ok_or(Errno::ENODEV)?.clone();
        let end = iova.checked_add(length).ok_or(Errno::EINVAL)?;
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let (domain, gone) = {
            let mut m = sync::lock(&self.ioas);
            let io = m.get_mut(&ioas).ok_or(Errno::ENOENT)?;
            // Areas overlapping the range: the last one starting before its end, walking back.
            let hit: Vec<u64> = io
                .areas
                .range(..end)
                .rev()
                .take_while(|(a, area)| **a + area.len > iova)
                .map(|(a, _)| *a)
                .collect();
            if hit.is_empty() || hit.iter().any(|a| *a < iova || *a + io.areas[a].len > end) {
                return Err(Errno::ENOENT);
            }
            let gone: Vec<(u64, Area)> = hit
                .into_iter()
                .filter_map(|a| io.areas.remove(&a).map(|x| (a, x)))
                .collect();
            (io.domain, gone)
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
