//! CPU access to a vfio-pci device's regions, as a user makes it through the device fd:
//! `VFIO_DEVICE_GET_REGION_INFO`, `pread`/`pwrite` of a region, and `mmap` of a BAR with
//! the page fault that decides whether a load or store goes through.
//!
//! The kernel files: drivers/vfio/vfio_main.c (`vfio_get_region_info`,
//! `vfio_device_fops_read`/`_write`/`_mmap`), drivers/vfio/pci/vfio_pci_core.c
//! (`vfio_pci_ioctl_get_region_info`, `vfio_pci_probe_mmaps`, `vfio_pci_rw`,
//! `vfio_pci_core_mmap`, `vfio_pci_vmf_insert_pfn`) and drivers/vfio/pci/vfio_pci_rdwr.c
//! (`vfio_pci_bar_rw`, `vfio_pci_core_do_io_rw`, `vfio_pci_core_ioread*`/`iowrite*`).
//!
//! The rules, in the kernel's order:
//! - *Region info*: config space is readable and writable with the function's config size;
//!   a BAR region has its resource's length (none: size 0, no flags), is readable and
//!   writable, mappable when the probe at open said so (a memory BAR of at least a page, or
//!   a smaller one that starts a page nobody else uses), and the MSI-X table's BAR carries
//!   the MSI-X-mappable capability; the ROM region is empty without a ROM; VGA is `EINVAL`
//!   without a VGA device, and so is every index past the device's regions.
//! - *Read and write*: a zero-length access returns 0 before anything is checked; an index
//!   past the regions is `EINVAL`; the device is runtime-resumed for the access; config
//!   space goes to the config handlers; a ROM write is `EINVAL`; a BAR without a resource is
//!   `EINVAL`, so is a position at or past its end, and the count is clipped to the end;
//!   the access is cut into naturally aligned 8, 4, 2 and 1 byte pieces; a piece inside the
//!   MSI-X table reads all ones and drops writes; every other piece of a memory BAR checks,
//!   under `memory_lock`, that memory is enabled (the virtual COMMAND register has Memory
//!   Space on and the device is not in D3hot) — if not the whole call is `EIO`.
//! - *mmap*: an index past the regions, a private mapping, the ROM or any region after it,
//!   a BAR the probe found unmappable, or a range past the page-rounded BAR are `EINVAL`.
//!   The mapping is made without touching the device; each page fault takes `memory_lock`
//!   for reading and gives `SIGBUS` while low power is engaged or memory is not enabled.
//!   Every revoke zaps the mappings, so after one the next access faults again and is
//!   decided anew: a BAR whose memory comes back is reachable again through the old mapping.

use peerdma_pci::{Bdf, Errno, Fabric, PhysAddr};
use peerdma_uapi::backend::{CpuFault, REGION_OFFSET_SHIFT, RegionInfo, region, region_flags};

use super::{Arc, Dev, DeviceFd, File, PAGE, Process, sync};

/// `VFIO_PCI_NUM_REGIONS`: BARs 0-5, ROM, config, VGA (vfio-pci adds no device regions
/// for the functions modelled here).
const NUM_REGIONS: u32 = 9;

/// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`.
const CAP_MSIX_MAPPABLE: u16 = 3;

/// A BAR as the PCI core assigned it at enumeration (`pdev->resource[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resource {
    /// CPU physical address.
    pub(super) start: u64,
    /// Length.
    pub(super) len: u64,
    /// A memory BAR (else I/O).
    pub(super) mem: bool,
    /// `vdev->bar_mmap_supported[i]`.
    pub(super) mmap: bool,
}

/// Where the MSI-X table is (`vdev->msix_bar`, `msix_offset`, `msix_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MsixTable {
    pub(super) bar: u8,
    pub(super) offset: u64,
    pub(super) size: u64,
}

/// The function's BAR resources, with the mmap probe's verdict for each
/// (`vfio_pci_probe_mmaps`): a memory BAR of at least a page is mappable; a smaller one only
/// if it starts a page and no other BAR of the machine lies in the rest of that page (the
/// kernel reserves the remainder with a dummy resource, which fails if anything is there).
pub(super) fn resources(
    fabric: &Fabric,
    bdf: Bdf,
    variant: &dyn super::Variant,
) -> [Option<Resource>; 6] {
    let mut out = [None; 6];
    let others: Vec<(u64, u64)> = fabric
        .functions()
        .filter(|f| f.bdf() != bdf)
        .filter_map(|f| fabric.bar_states(f.bdf()).ok())
        .flatten()
        .filter_map(|b| b.cpu.map(|c| (c.get(), b.bar.size)))
        .collect();
    for (i, slot) in out.iter_mut().enumerate() {
        let index = i as u8;
        if let Some(m) = variant.mem_region(index) {
            let len = variant.region_size(index).unwrap_or(m.len);
            *slot = Some(Resource {
                start: m.phys,
                len,
                mem: true,
                mmap: len >= PAGE,
            });
            continue;
        }
        let Ok(b) = fabric.bar(bdf, index) else {
            continue;
        };
        let Some(cpu) = b.cpu else { continue };
        let (start, len, mem) = (cpu.get(), b.bar.size, b.bar.kind.is_mem());
        if start == 0 || len == 0 {
            continue;
        }
        let mmap = mem
            && (len >= PAGE
                || (start % PAGE == 0 && {
                    let (lo, hi) = (start + len, start + PAGE);
                    !others
                        .iter()
                        .any(|&(s, l)| s < hi && s.saturating_add(l) > lo)
                }));
        *slot = Some(Resource {
            start,
            len,
            mem,
            mmap,
        });
    }
    out
}

/// The MSI-X table's place, read from the capability at open (`vfio_pci_core_enable`).
pub(super) fn msix_table(fabric: &Fabric, bdf: Bdf) -> Option<MsixTable> {
    let rd = |off: u16, n: usize| fabric.config_read(bdf, off, n).ok();
    let p = crate::config::find_cap(fabric, bdf, crate::config::cap::MSIX)?;
    let flags = rd(p + 2, 2)?;
    let table = rd(p + 4, 4)?;
    Some(MsixTable {
        bar: (table & 0x7) as u8,
        offset: u64::from(table & !0x7),
        size: (u64::from(flags & 0x7ff) + 1) * 16,
    })
}

impl Dev {
    /// One naturally aligned piece of a BAR access: the memory check under `memory_lock`
    /// for a memory BAR, then the load or store.
    fn io_piece(&self, r: &Resource, off: u64, piece: &mut [u8], write: bool) -> Result<(), Errno> {
        if !r.mem {
            self.cpu_io(r, off, piece, write);
            return Ok(());
        }
        self.read_mem(|m| {
            if !self.memory_enabled(m) {
                return Err(Errno::EIO);
            }
            self.cpu_io(r, off, piece, write);
            Ok(())
        })
    }

    /// The CPU's load or store at `off` of a BAR resource: a load the fabric cannot complete
    /// reads all ones, as a PCIe master abort does; a store that cannot complete is lost.
    fn cpu_io(&self, r: &Resource, off: u64, buf: &mut [u8], write: bool) {
        let at = PhysAddr(r.start + off);
        if write {
            let _ = self.fabric.cpu_write(at, buf);
        } else if self.fabric.cpu_read(at, buf).is_err() {
            buf.fill(0xff);
        }
    }
}

impl DeviceFd {
    /// `VFIO_DEVICE_GET_REGION_INFO` of region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Errno> {
        self.granted()?;
        self.ioctl_resume();
        let d = &self.dev;
        let offset = u64::from(index) << REGION_OFFSET_SHIFT;
        let info = match index {
            region::CONFIG => {
                let size = crate::config::Layout::of(&d.fabric, d.bdf)?.size as u64;
                RegionInfo {
                    flags: region_flags::READ | region_flags::WRITE,
                    size,
                    offset,
                    caps: Vec::new(),
                }
            }
            0..=5 => match d.resources[index as usize] {
                None => RegionInfo {
                    offset,
                    ..RegionInfo::default()
                },
                Some(r) => {
                    let mut i = RegionInfo {
                        flags: region_flags::READ | region_flags::WRITE,
                        size: r.len,
                        offset,
                        caps: Vec::new(),
                    };
                    if r.mmap {
                        i.flags |= region_flags::MMAP;
                        if d.msix.is_some_and(|t| u32::from(t.bar) == index) {
                            i.caps.push(CAP_MSIX_MAPPABLE);
                            i.flags |= region_flags::CAPS;
                        }
                    }
                    i
                }
            },
            // No function here has an expansion ROM or a shadow ROM.
            region::ROM => RegionInfo {
                offset,
                ..RegionInfo::default()
            },
            // Neither a VGA device nor any device-specific region.
            _ => return Err(Errno::EINVAL),
        };
        Ok(info)
    }

    /// A `pread` (`write` false, into `buf`) or `pwrite` (from `buf`) of the device fd at
    /// `pos` (region index in the bits above [`REGION_OFFSET_SHIFT`]); the bytes done.
    pub fn region_rw(&self, pos: u64, buf: &mut [u8], write: bool) -> Result<usize, Errno> {
        self.granted()?;
        if buf.is_empty() {
            return Ok(0);
        }
        let index = pos >> REGION_OFFSET_SHIFT;
        let off = pos & ((1 << REGION_OFFSET_SHIFT) - 1);
        if index >= u64::from(NUM_REGIONS) {
            return Err(Errno::EINVAL);
        }
        self.ioctl_resume();
        match index as u32 {
            region::CONFIG => {
                // Past the config space (which ends below 2^16) is EFAULT.
                let at = u16::try_from(off).map_err(|_| Errno::EFAULT)?;
                if write {
                    self.config_write(at, buf)?;
                } else {
                    self.read_config(at, buf)?;
                }
                Ok(buf.len())
            }
            // A ROM write is refused before anything else; a ROM read finds no ROM resource
            // and no shadow ROM (as an unassigned BAR); no function here is a VGA device.
            region::ROM | region::VGA => Err(Errno::EINVAL),
            bar => self.bar_rw(bar as usize, off, buf, write),
        }
    }

    /// `vfio_pci_bar_rw` with `vfio_pci_core_do_io_rw`.
    fn bar_rw(&self, bar: usize, pos: u64, buf: &mut [u8], write: bool) -> Result<usize, Errno> {
        let d = &self.dev;
        let r = d.resources[bar].ok_or(Errno::EINVAL)?;
        if pos >= r.len {
            return Err(Errno::EINVAL);
        }
        let count = buf
            .len()
            .min(usize::try_from(r.len - pos).unwrap_or(usize::MAX));
        let (x_start, x_end) = match d.msix {
            Some(t) if usize::from(t.bar) == bar => (t.offset, t.offset + t.size),
            _ => (0, 0),
        };
        self.resumed(|| {
            let mut done = 0usize;
            let mut off = pos;
            while done < count {
                let left = (count - done) as u64;
                let fillable = if off < x_start {
                    left.min(x_start - off)
                } else if off >= x_end {
                    left
                } else {
                    0
                };
                let n = if fillable >= 8 && off % 8 == 0 {
                    8
                } else if fillable >= 4 && off % 4 == 0 {
                    4
                } else if fillable >= 2 && off % 2 == 0 {
                    2
                } else if fillable > 0 {
                    1
                } else {
                    // Inside the MSI-X table: reads are all ones, writes are dropped.
                    let n = left.min(x_end - off) as usize;
                    if !write {
                        buf[done..done + n].fill(0xff);
                    }
                    done += n;
                    off += n as u64;
                    continue;
                };
                d.io_piece(&r, off, &mut buf[done..done + n], write)?;
                done += n;
                off += n as u64;
            }
            Ok(done)
        })
    }

    /// `mmap` of `length` bytes at `pos` of the device fd (`vfio_pci_core_mmap`): the
    /// checks only; pages are decided at each access ([`DeviceFd::cpu_access`]).
    pub fn mmap_check(&self, pos: u64, length: u64, shared: bool) -> Result<(), Errno> {
        self.granted()?;
        let index = pos >> REGION_OFFSET_SHIFT;
        let off = pos & ((1 << REGION_OFFSET_SHIFT) - 1);
        if index >= u64::from(NUM_REGIONS) {
            return Err(Errno::EINVAL);
        }
        if !shared {
            return Err(Errno::EINVAL);
        }
        if index >= u64::from(region::ROM) {
            return Err(Errno::EINVAL);
        }
        let r = self.dev.resources[index as usize]
            .filter(|r| r.mmap)
            .ok_or(Errno::EINVAL)?;
        let phys_len = r.len.next_multiple_of(PAGE);
        if off.checked_add(length).is_none_or(|end| end > phys_len) {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// A CPU load or store at `off` of BAR `bar` through a mapping `mmap_check` allowed: the
    /// page fault's verdict (`vfio_pci_vmf_insert_pfn`) under `memory_lock`, then the access.
    pub fn cpu_access(
        &self,
        bar: u8,
        off: u64,
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), CpuFault> {
        let d = &self.dev;
        let r = d.resources[usize::from(bar) % 6]
            .filter(|_| bar < 6)
            .ok_or(CpuFault::Errno(Errno::EINVAL))?;
        let end = off.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > r.len.next_multiple_of(PAGE)) {
            return Err(CpuFault::Errno(Errno::EFAULT));
        }
        d.read_mem(|m| {
            if m.engaged || !d.memory_enabled(m) {
                return Err(CpuFault::Sigbus);
            }
            d.cpu_io(&r, off, buf, write);
            Ok(())
        })
    }
}

/// `VFIO_PCI_IOEVENTFD_MAX`.
const IOEVENTFD_MAX: usize = 1000;
/// `offsetofend(struct vfio_device_ioeventfd, fd)`.
const IOEVENTFD_MINSZ: usize = 28;

/// One ioeventfd (`struct vfio_pci_ioeventfd`): when its eventfd is signalled, `data` is
/// written, `count` bytes, at `pos` of BAR `bar`.
pub(super) struct IoEventFd {
    bar: u8,
    pos: u64,
    data: u64,
    count: usize,
    file: Arc<File>,
    waiter: u64,
}

impl IoEventFd {
    /// `vfio_virqfd_disable`: the wake callback taken off, the eventfd let go.
    pub(super) fn release(self) {
        self.file.eventfd_remove_waiter(self.waiter);
        self.file.put();
    }
}

impl Dev {
    /// `vfio_pci_ioeventfd_handler`: for a memory BAR, `memory_lock` is only tried (held:
    /// `vfio_pci_ioeventfd_thread` does it later, here a thread that waits for the lock), and
    /// the write happens only while memory is enabled; an I/O BAR is written as it is.
    fn ioeventfd_fire(self: &Arc<Self>, r: Resource, pos: u64, data: u64, count: usize) {
        let mut bytes = data.to_le_bytes();
        let piece = &mut bytes[..count];
        if !r.mem {
            self.cpu_io(&r, pos, piece, true);
            return;
        }
        // A try cannot deadlock, so it is not recorded with the lock-order checker (it may
        // run under a lock of a lower level: an importer's reservation lock, when its DMA
        // raised the interrupt whose eventfd fired this).
        let held = {
            match self.mem.try_read() {
                Ok(m) => {
                    if self.memory_enabled(&m) {
                        self.cpu_io(&r, pos, piece, true);
                    }
                    false
                }
                Err(sync::TryLockError::Poisoned(p)) => {
                    if self.memory_enabled(&p.into_inner()) {
                        self.cpu_io(&r, pos, piece, true);
                    }
                    false
                }
                Err(sync::TryLockError::WouldBlock) => true,
            }
        };
        if held {
            let d = Arc::clone(self);
            std::thread::spawn(move || {
                let mut bytes = data.to_le_bytes();
                let _ = d.io_piece(&r, pos, &mut bytes[..count], true);
            });
        }
    }
}

impl DeviceFd {
    /// `VFIO_DEVICE_IOEVENTFD` on the ioctl's buffer (`struct vfio_device_ioeventfd`: argsz,
    /// flags, offset, data, fd), in the kernel's order: `vfio_pci_ioctl_ioeventfd` (argsz
    /// below 28, flags other than one size bit of 1/2/4/8, or fd below −1 → `EINVAL`), then
    /// `vfio_pci_ioeventfd`: a region past BAR 5, a range past the BAR, one that meets the
    /// MSI-X table, or 8 bytes → `EINVAL`; the same BAR, offset, data and size already
    /// registered: fd −1 takes it off, any other fd is `EEXIST`; otherwise fd −1 is `ENODEV`,
    /// a thousand registered `ENOSPC`, and the fd must be an eventfd (`EBADF`, `EINVAL`).
    /// An eventfd already signalled fires once at registration (`vfio_virqfd_enable`).
    pub fn ioeventfd(&self, proc: &Process, buf: &[u8]) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        let word = |at: usize| {
            buf.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(Errno::EFAULT)
        };
        let dword = |at: usize| -> Result<u64, Errno> {
            Ok(u64::from(word(at)?) | (u64::from(word(at + 4)?) << 32))
        };
        let (argsz, flags, offset, data) = (word(0)?, word(4)?, dword(8)?, dword(16)?);
        let fd = i32::from_le_bytes(word(24)?.to_le_bytes());
        if (argsz as usize) < IOEVENTFD_MINSZ || flags & !0xf != 0 {
            return Err(Errno::EINVAL);
        }
        let count = flags & 0xf;
        if count.count_ones() != 1 || fd < -1 {
            return Err(Errno::EINVAL);
        }
        let count = count as usize;
        let d = &self.dev;
        let bar = offset >> REGION_OFFSET_SHIFT;
        let pos = offset & ((1 << REGION_OFFSET_SHIFT) - 1);
        if bar > 5 {
            return Err(Errno::EINVAL);
        }
        let r = d.resources[bar as usize];
        let len = r.map_or(0, |r| r.len);
        if pos + count as u64 > len {
            return Err(Errno::EINVAL);
        }
        if let Some(t) = d.msix.filter(|t| u64::from(t.bar) == bar) {
            if !(pos + count as u64 <= t.offset || pos >= t.offset + t.size) {
                return Err(Errno::EINVAL);
            }
        }
        if count == 8 {
            return Err(Errno::EINVAL);
        }
        let Some(r) = r else {
            return Err(Errno::EINVAL);
        };
        let bar = bar as u8;
        let mut list = sync::lock(&d.ioeventfds);
        if let Some(i) = list
            .iter()
            .position(|e| e.pos == pos && e.bar == bar && e.data == data && e.count == count)
        {
            if fd != -1 {
                return Err(Errno::EEXIST);
            }
            list.remove(i).release();
            return Ok(());
        }
        if fd < 0 {
            return Err(Errno::ENODEV);
        }
        if list.len() >= IOEVENTFD_MAX {
            return Err(Errno::ENOSPC);
        }
        let file = proc.fget(fd)?;
        let weak = Arc::downgrade(d);
        let fire = move || {
            if let Some(d) = weak.upgrade() {
                d.ioeventfd_fire(r, pos, data, count);
            }
        };
        let Some(waiter) = file.eventfd_add_waiter(Arc::new(fire)) else {
            file.put();
            return Err(Errno::EINVAL);
        };
        let pending = file.eventfd_pending();
        list.push(IoEventFd {
            bar,
            pos,
            data,
            count,
            file,
            waiter,
        });
        drop(list);
        if pending {
            d.ioeventfd_fire(r, pos, data, count);
        }
        Ok(())
    }
}
