//! `/dev/udmabuf`: a dma-buf made of a memfd's pages (drivers/dma-buf/udmabuf.c).
//!
//! The machine's only dma-buf exporter besides vfio-pci, so that what an importer does with
//! a buffer that is *not* a device's BAR can be held to the kernel: iommufd's `MAP_FILE`
//! refuses one (`EOPNOTSUPP`, iommufd/pages.c `sym_vfio_pci_dma_buf_iommufd_map`), a CPU
//! mapping of one is allowed, and a device that attaches and maps one gets DMA addresses of
//! the memfd's RAM through the DMA API, so its writes land in the memfd.
//!
//! `UDMABUF_CREATE` ([`create`]) checks, in the order of Linux 7.2's `udmabuf_create`:
//! 1. the offset, then the size, not page aligned → `EINVAL`;
//! 2. more pages than `size_limit_mb` (64 MiB) allows, or none → `EINVAL`;
//! 3. the memfd descriptor names no open file → `EBADFD` (not `EBADF`: the driver's `fget`);
//! 4. the file is not shmem (an eventfd, a dma-buf, a group file) → `EBADFD`
//!    (`check_memfd_seals`), and a memfd whose seals lack `F_SEAL_SHRINK` or hold a write
//!    seal (`F_SEAL_WRITE`, `F_SEAL_FUTURE_WRITE`) → `EINVAL` — a memfd made without
//!    `MFD_ALLOW_SEALING` has only `F_SEAL_SEAL`, so it is refused;
//! 5. pinning the pages (mm/gup.c `memfd_pin_folios`): the range's last byte at or past the
//!    memfd's size → `EINVAL`; the pages are then in the memfd's page cache;
//! 6. the dma-buf is exported (`exp_name` "udmabuf", `O_RDWR`, the pages' count as its size)
//!    and installed, `O_CLOEXEC` when the flags have `UDMABUF_FLAGS_CLOEXEC` (other flag
//!    bits are ignored).
//!
//! The buffer does not hold the memfd: closing the memfd leaves the pinned pages to it.

use peerdma_dma::{Direction, DmaSystem, attrs};
use peerdma_dmabuf::buf::{Attachment, DmaBufOps, ExportInfo, FileKind, ops, seal};
use peerdma_dmabuf::resv::ResvGuard;
use peerdma_dmabuf::sgt::SgTable;
use peerdma_dmabuf::{DmaBuf, File};
use peerdma_pci::sync::Arc;
use peerdma_pci::{AsErrno, Errno, PhysAddr};

const PAGE: u64 = 4096;

/// `UDMABUF_FLAGS_CLOEXEC` (include/uapi/linux/udmabuf.h).
pub const FLAGS_CLOEXEC: u32 = 0x01;

/// The module's `size_limit_mb` default: the most a buffer may hold.
pub const SIZE_LIMIT: u64 = 64 << 20;

/// The exporter of one udmabuf: where its pages are in RAM (a memfd here is contiguous).
struct Udmabuf {
    dma: Arc<DmaSystem>,
    phys: u64,
    size: u64,
}

impl DmaBufOps for Udmabuf {
    fn provides(&self) -> u32 {
        ops::MAP | ops::UNMAP | ops::RELEASE | ops::MMAP
    }

    /// `map_udmabuf`: the pages through the importer's DMA API (`dma_map_sgtable`, CPU sync
    /// skipped); a mapping failure is its errno.
    fn map(&self, a: &Attachment, dir: Direction, _g: &ResvGuard<'_>) -> Result<SgTable, Errno> {
        let addr = self
            .dma
            .map_phys(
                a.dev,
                PhysAddr(self.phys),
                self.size,
                dir,
                attrs::SKIP_CPU_SYNC,
            )
            .map_err(|e| e.errno())?;
        SgTable::from_ranges(&[(addr, self.size)]).inspect_err(|_| {
            self.dma
                .unmap_phys(a.dev, addr, self.size, dir, attrs::SKIP_CPU_SYNC);
        })
    }

    fn unmap(&self, a: &Attachment, sgt: SgTable, dir: Direction, _g: &ResvGuard<'_>) {
        for e in sgt.entries() {
            self.dma
                .unmap_phys(a.dev, e.addr, u64::from(e.len), dir, attrs::SKIP_CPU_SYNC);
        }
    }

    /// The pages are unpinned; they stay the memfd's.
    fn release(&self, _buf: &DmaBuf) {}

    /// `mmap_udmabuf`: a shared mapping is all it asks for.
    fn mmap(&self, _buf: &DmaBuf, _offset: u64, _len: u64) -> Result<(), Errno> {
        Ok(())
    }
}

/// `UDMABUF_CREATE` of `size` bytes at `offset` of `memfd` (the file its descriptor names,
/// `None` when it names none), in the order the module docs give. Returns the new dma-buf
/// file (one reference) and whether its descriptor is close-on-exec.
pub fn create(
    dma: &Arc<DmaSystem>,
    memfd: Option<&File>,
    flags: u32,
    offset: u64,
    size: u64,
) -> Result<(Arc<File>, bool), Errno> {
    if offset % PAGE != 0 || size % PAGE != 0 {
        return Err(Errno::EINVAL);
    }
    if size > SIZE_LIMIT || size == 0 {
        return Err(Errno::EINVAL);
    }
    let file = memfd.ok_or(Errno::EBADFD)?;
    let FileKind::Memfd {
        base,
        size: file_size,
        ..
    } = file.kind()
    else {
        return Err(Errno::EBADFD);
    };
    let seals = file.seals()?;
    if seals & seal::SHRINK == 0 || seals & (seal::WRITE | seal::FUTURE_WRITE) != 0 {
        return Err(Errno::EINVAL);
    }
    // `memfd_pin_folios`: the range [offset, offset + size - 1] inside the file.
    let last = offset.checked_add(size - 1).ok_or(Errno::EINVAL)?;
    if i64::try_from(offset).is_err() || last >= *file_size {
        return Err(Errno::EINVAL);
    }
    file.memfd_populate(offset, size);
    let f = peerdma_dmabuf::export(ExportInfo {
        exp_name: "udmabuf".into(),
        size,
        flags: 0o2,
        ops: Some(Arc::new(Udmabuf {
            dma: dma.clone(),
            phys: base + offset,
            size,
        })),
        has_priv: true,
    })?;
    Ok((f, flags & FLAGS_CLOEXEC != 0))
}
