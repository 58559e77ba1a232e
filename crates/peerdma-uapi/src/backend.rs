//! The userspace boundary both backends implement: the emulated VFIO stack and the real Linux
//! host. Scenarios and the CLI speak only to [`UapiBackend`], which is what lets one scenario
//! run on both and compare.

use peerdma_pci::{Bdf, Errno};
use serde::Serialize;

pub use iommufd_bindings::iommufd::{
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as MAP_WRITEABLE,
};

/// How a VFIO device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenPath {
    /// `/dev/vfio/vfio` container + `/dev/vfio/GROUP` + `VFIO_GROUP_GET_DEVICE_FD`.
    GroupContainer,
    /// `/dev/vfio/devices/vfioN` + `VFIO_DEVICE_BIND_IOMMUFD`.
    CdevIommufd,
    /// `/dev/vfio/devices/vfioN` alone: bound later with [`UapiBackend::bind_device`]; until
    /// then the fd answers every other ioctl with `EINVAL`.
    CdevUnbound,
}

/// An open VFIO device of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DevHandle(pub u32);

/// An iommufd IOAS of a backend: the id the kernel gave it, and which of the process's
/// iommufds holds it (0: the first, opened by the first step that needs one; others from
/// [`UapiBackend::iommufd_open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IoasId(pub u32, pub u32);

/// What `/proc/self/fdinfo/N` says about a dma-buf.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DmabufInfo {
    /// `size:` in bytes.
    pub size: u64,
    /// `count:` (file references).
    pub count: u64,
    /// `exp_name:` (the exporter, `vfio_pci_core` for VFIO).
    pub exp_name: String,
    /// `flags:` (octal in the file), the file's open flags.
    pub flags: u32,
}

impl DmabufInfo {
    /// Parses fdinfo text.
    pub fn parse(text: &str) -> DmabufInfo {
        let mut i = DmabufInfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "size" => i.size = v.parse().unwrap_or(0),
                "count" => i.count = v.parse().unwrap_or(0),
                "exp_name" => i.exp_name = v.to_string(),
                "flags" => i.flags = u32::from_str_radix(v, 8).unwrap_or(0),
                _ => {}
            }
        }
        i
    }
}

/// The user memory behind an [`UapiBackend::ioas_map_user`] step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMemory {
    /// The memfd mapped there, or none: nothing is mapped at all.
    pub memfd: Option<i32>,
    /// Mapped `PROT_READ` only (else `PROT_READ | PROT_WRITE`).
    pub read_only: bool,
}

/// Bytes reserved after the memory of an [`UapiBackend::ioas_map_user`], where nothing is
/// mapped (a pin reaching into them fails with `EFAULT`); a map reaching past them could
/// find other memory of the process, so the scenario runner refuses one.
pub const USER_GUARD: u64 = 64 << 20;

/// The answer of `IOMMU_IOAS_IOVA_RANGES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaRanges {
    /// The IOVA ranges a map may use (inclusive), as many as the caller had room for.
    pub ranges: Vec<(u64, u64)>,
    /// How many there are (`num_iovas` on return).
    pub total: u32,
    /// `out_iova_alignment`.
    pub alignment: u64,
}

/// vfio-pci's fixed region layout: region `index` starts at `index << 40` of the device fd
/// (`VFIO_PCI_OFFSET_SHIFT`).
pub const REGION_OFFSET_SHIFT: u32 = 40;

/// Where `offset` of region `index` is in a vfio-pci device fd; `EINVAL` past what a file
/// offset (`off_t`) can hold.
pub fn region_pos(index: u32, offset: u64) -> Result<u64, Errno> {
    (u64::from(index) << REGION_OFFSET_SHIFT)
        .checked_add(offset)
        .filter(|&p| i64::try_from(p).is_ok())
        .ok_or(Errno::EINVAL)
}

/// Region indexes of vfio-pci (`VFIO_PCI_*_REGION_INDEX`): BARs 0-5, then these.
pub mod region {
    /// The expansion ROM.
    pub const ROM: u32 = 6;
    /// Config space.
    pub const CONFIG: u32 = 7;
    /// Legacy VGA ranges.
    pub const VGA: u32 = 8;
}

/// `VFIO_REGION_INFO_FLAG_*`.
pub mod region_flags {
    /// Readable with `pread`.
    pub const READ: u32 = 1;
    /// Writable with `pwrite`.
    pub const WRITE: u32 = 2;
    /// Can be mapped with `mmap`.
    pub const MMAP: u32 = 4;
    /// Capabilities follow the struct.
    pub const CAPS: u32 = 8;
}

/// What `VFIO_DEVICE_GET_REGION_INFO` says of one region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// [`region_flags`] bits.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Where it starts in the device fd.
    pub offset: u64,
    /// The capability IDs in its chain, in order (`VFIO_REGION_INFO_CAP_*`: 1 sparse mmap,
    /// 2 type, 3 MSI-X mappable).
    pub caps: Vec<u16>,
}

/// How `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` names one device a hot reset would reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependent {
    /// Its iommufd device id in the caller's iommufd (the device is bound there).
    DevId(u32),
    /// Not bound in the caller's iommufd, but its IOMMU group is (`VFIO_PCI_DEVID_OWNED`).
    Owned,
    /// Neither (`VFIO_PCI_DEVID_NOT_OWNED`): the caller cannot reset it.
    NotOwned,
    /// Its IOMMU group's id (the asking device was opened the group way).
    Group(u32),
}

/// `VFIO_PCI_HOT_RESET_FLAG_DEV_ID`: the devices are named by iommufd device ids.
pub const HOT_RESET_FLAG_DEV_ID: u32 = 1;
/// `VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`: the caller owns every device named.
pub const HOT_RESET_FLAG_DEV_ID_OWNED: u32 = 2;

/// The answer of `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotResetInfo {
    /// `HOT_RESET_FLAG_*` bits.
    pub flags: u32,
    /// Every device the reset reaches, in bus order.
    pub devices: Vec<(Bdf, Dependent)>,
}

/// A CPU mapping of a device region a backend made (`mmap` of the device fd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MapHandle(pub u32);

/// What a CPU load or store through a [`MapHandle`] ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuFault {
    /// The kernel refused the page fault: the access killed the thread with `SIGBUS`.
    Sigbus,
    /// The backend could not make the access (no such mapping, outside it): this errno.
    Errno(Errno),
}

/// What every backend checks of a CPU access before making it: one naturally aligned load or
/// store of 1, 2, 4 or 8 bytes inside a mapping of `map_len` bytes (`EFAULT` otherwise: the
/// caller's mistake, not the kernel's answer).
pub fn check_cpu_access(offset: u64, len: usize, map_len: u64) -> Result<(), CpuFault> {
    let n = len as u64;
    let inside = offset.checked_add(n).is_some_and(|end| end <= map_len);
    if !inside || !matches!(n, 1 | 2 | 4 | 8) || offset % n != 0 {
        return Err(CpuFault::Errno(Errno::EFAULT));
    }
    Ok(())
}

/// The operations peerdma performs across the userspace boundary. Every failure is the errno
/// the kernel would return.
pub trait UapiBackend {
    /// Opens a VFIO device.
    fn open_device(&mut self, bdf: Bdf, path: OpenPath) -> Result<DevHandle, Errno>;
    /// Closes it (the device fd).
    fn close_device(&mut self, dev: DevHandle) -> Result<(), Errno>;
    /// `VFIO_DEVICE_BIND_IOMMUFD` of a device opened [`OpenPath::CdevUnbound`], to the
    /// process's first iommufd.
    fn bind_device(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.bind_device_to(dev, 0)
    }
    /// `VFIO_DEVICE_BIND_IOMMUFD` to iommufd number `iommufd` (see [`IoasId`]).
    fn bind_device_to(&mut self, dev: DevHandle, iommufd: u32) -> Result<(), Errno>;
    /// Opens one more `/dev/iommu` in this process; its number for [`IoasId`] and
    /// [`UapiBackend::bind_device_to`].
    fn iommufd_open(&mut self) -> Result<u32, Errno>;
    /// `ioctl(VFIO_DEVICE_FEATURE)` with exactly these bytes; returns the ioctl's non-negative
    /// result (0, or a new fd for DMA_BUF GET).
    fn device_feature(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<i32, Errno>;
    /// Reads the device's config space through the VFIO config region.
    fn config_read(&mut self, dev: DevHandle, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Writes the device's config space through the VFIO config region.
    fn config_write(&mut self, dev: DevHandle, offset: u64, data: &[u8]) -> Result<(), Errno>;
    /// `ioctl(VFIO_DEVICE_RESET)`.
    fn reset(&mut self, dev: DevHandle) -> Result<(), Errno>;
    /// Closes a file descriptor the backend handed out (a dma-buf).
    fn close_fd(&mut self, fd: i32) -> Result<(), Errno>;
    /// The fdinfo of a dma-buf fd.
    fn dmabuf_info(&mut self, fd: i32) -> Result<DmabufInfo, Errno>;
    /// `lseek(fd, offset, whence)` on a fd the backend handed out (a dma-buf, a memfd, an
    /// eventfd); the new position.
    fn dmabuf_seek(&mut self, fd: i32, offset: i64, whence: i32) -> Result<u64, Errno>;
    /// `mmap` of `len` bytes at `offset` of a fd the backend handed out, `PROT_READ` and
    /// `MAP_SHARED` (unmapped again at once if it works).
    fn dmabuf_mmap(&mut self, fd: i32, offset: u64, len: u64) -> Result<(), Errno>;
    /// `fcntl(fd, F_DUPFD_CLOEXEC, 0)`: a second fd for the same open file.
    fn dup_fd(&mut self, fd: i32) -> Result<i32, Errno>;
    /// `memfd_create(MFD_CLOEXEC)`, then `ftruncate` to `size` bytes: a shmem file.
    fn memfd(&mut self, size: u64) -> Result<i32, Errno>;
    /// `memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING)`, `ftruncate` to `size` bytes, then
    /// `fcntl(F_ADD_SEALS, seals)` (`F_SEAL_*` bits; the memfd is closed again if that
    /// fails).
    fn memfd_sealed(&mut self, size: u64, seals: u32) -> Result<i32, Errno>;
    /// `UDMABUF_CREATE` on `/dev/udmabuf`: a dma-buf of `size` bytes at `offset` of the
    /// memfd `memfd`, with `flags` (`UDMABUF_FLAGS_CLOEXEC` = 1); the new fd.
    fn udmabuf(&mut self, memfd: i32, flags: u32, offset: u64, size: u64) -> Result<i32, Errno>;
    /// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
    fn eventfd(&mut self) -> Result<i32, Errno>;
    /// `read(fd, buf)` at the file position; the bytes read.
    fn read_fd(&mut self, fd: i32, buf: &mut [u8]) -> Result<usize, Errno>;
    /// `pread(fd, buf, offset)` of a memfd (how a DMA into one is checked); the bytes read.
    fn memfd_peek(&mut self, fd: i32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno>;
    /// A descriptor of `bdf`'s VFIO group file: a second descriptor (`F_DUPFD_CLOEXEC`) of
    /// the group file this process holds open, else the group's char device opened now
    /// (`EBUSY` while another holds it or a cdev of the group is bound).
    fn group_fd(&mut self, bdf: Bdf) -> Result<i32, Errno>;
    /// `IOMMU_IOAS_ALLOC` in the process's first iommufd.
    fn ioas_alloc(&mut self) -> Result<IoasId, Errno> {
        self.ioas_alloc_in(0)
    }
    /// `IOMMU_IOAS_ALLOC` in iommufd number `iommufd`.
    fn ioas_alloc_in(&mut self, iommufd: u32) -> Result<IoasId, Errno>;
    /// Attaches an open (cdev) device to an IOAS (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`).
    fn attach_ioas(&mut self, dev: DevHandle, ioas: IoasId) -> Result<(), Errno>;
    /// `IOMMU_IOAS_MAP_FILE` of `[start, start + length)` of a dma-buf at `iova` (or, without
    /// [`MAP_FIXED_IOVA`], where the kernel chooses); returns the IOVA.
    fn ioas_map_file(
        &mut self,
        ioas: IoasId,
        fd: i32,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno>;
    /// `IOMMU_IOAS_MAP` of user memory. First the memory: `memory`'s memfd (all of it) is
    /// mapped into the process (`mmap`, `MAP_SHARED`, read-only if asked) at an address
    /// aligned to 2 MiB, and the [`USER_GUARD`] bytes after it are reserved with nothing
    /// mapped; without a memfd there are only the reserved bytes. Then the map of
    /// `[address + offset, address + offset + length)` at `iova` (or where the kernel
    /// chooses, without [`MAP_FIXED_IOVA`]), with `reserved` as the `__reserved` word. The
    /// memory stays mapped until the backend goes. Returns the IOVA.
    #[allow(clippy::too_many_arguments)]
    fn ioas_map_user(
        &mut self,
        ioas: IoasId,
        memory: UserMemory,
        offset: u64,
        length: u64,
        iova: u64,
        flags: u32,
        reserved: u32,
    ) -> Result<u64, Errno>;
    /// `IOMMU_IOAS_ALLOW_IOVAS` with these inclusive ranges and `__reserved` word.
    fn ioas_allow_iovas(
        &mut self,
        ioas: IoasId,
        ranges: &[(u64, u64)],
        reserved: u32,
    ) -> Result<(), Errno>;
    /// `IOMMU_IOAS_IOVA_RANGES` with room for `room` ranges.
    fn ioas_iova_ranges(&mut self, ioas: IoasId, room: u32) -> Result<IovaRanges, Errno>;
    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    fn detach_ioas(&mut self, dev: DevHandle) -> Result<(), Errno>;
    /// `IOMMU_DESTROY` of an IOAS.
    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<(), Errno>;
    /// `IOMMU_IOAS_UNMAP`; returns the length unmapped.
    fn ioas_unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64, Errno>;
    /// `VFIO_DEVICE_IOEVENTFD` with `buf`: `struct vfio_device_ioeventfd` (argsz, flags,
    /// offset, data, fd: 32 bytes).
    fn ioeventfd(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno>;
    /// `write(2)` of `data` to `fd`; the bytes written.
    fn write_fd(&mut self, fd: i32, data: &[u8]) -> Result<usize, Errno>;
    /// `VFIO_DEVICE_GET_INFO` on `buf`, `struct vfio_device_info` (argsz, flags,
    /// num_regions, num_irqs, cap_offset, pad: 24 bytes): the kernel fills in the fields
    /// its argsz covers.
    fn device_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno>;
    /// `VFIO_DEVICE_GET_IRQ_INFO` on `buf`, `struct vfio_irq_info` (argsz, flags, index,
    /// count, 16 bytes): the kernel fills in flags and count.
    fn irq_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno>;
    /// `VFIO_DEVICE_SET_IRQS` with `buf`: `struct vfio_irq_set` (argsz, flags, index, start,
    /// count) and its data, as many bytes as the data the header asks for.
    fn set_irqs(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno>;
    /// `VFIO_DEVICE_GET_REGION_INFO` of region `index`.
    fn region_info(&mut self, dev: DevHandle, index: u32) -> Result<RegionInfo, Errno>;
    /// `pread` of the device fd at `offset` of region `index` (vfio-pci's fixed layout,
    /// [`REGION_OFFSET_SHIFT`]); the bytes read.
    fn region_read(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno>;
    /// `pwrite` of the device fd at `offset` of region `index`; the bytes written.
    fn region_write(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, Errno>;
    /// `mmap` (read and write, `MAP_SHARED` unless `shared` is false) of `length` bytes at
    /// `offset` of region `index` of the device fd. The mapping holds the device file: a
    /// device closed while it is mapped stays open until [`UapiBackend::cpu_unmap`].
    fn region_mmap(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        length: u64,
        shared: bool,
    ) -> Result<MapHandle, Errno>;
    /// A CPU load (`write` false, into `buf`) or store (from `buf`) at `offset` of a mapping,
    /// in accesses of `buf.len()` bytes (1, 2, 4 or 8).
    fn cpu_access(
        &mut self,
        map: MapHandle,
        offset: u64,
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), CpuFault>;
    /// `munmap` of a mapping.
    fn cpu_unmap(&mut self, map: MapHandle) -> Result<(), Errno>;
    /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` with room for `room` devices (`ENOSPC` if the
    /// reset reaches more).
    fn hot_reset_info(&mut self, dev: DevHandle, room: u32) -> Result<HotResetInfo, Errno>;
}

/// Whether a pattern a device wrote is in the provider's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Landed {
    /// The bytes are there.
    Yes,
    /// They are not.
    No,
    /// Only someone outside this backend can tell (the real kernel in a QEMU guest: the host
    /// reads the ivshmem backing file after the guest powers off).
    Later,
}

/// What the conformance suite needs beyond the raw uAPI: devices by role, a hot reset, and a
/// DMA engine whose writes can be checked.
pub trait ScenarioBackend: UapiBackend {
    /// The function playing `role` on this backend (`provider`: memory to export, no
    /// capabilities; `initiator`: a DMA engine; `pm_provider`: memory to export on a device
    /// with PM and FLR; `sibling`: another function of the pm_provider's device, in its
    /// hot-reset set); `ENODEV` if none.
    fn role(&self, role: &str) -> Result<Bdf, Errno>;
    /// `VFIO_DEVICE_PCI_HOT_RESET` of the bus above `dev`. With `groups` `None` (`count` 0)
    /// ownership is proven the cdev way (every affected device open in this process's
    /// iommufd); otherwise the descriptors are the group fds the ioctl is handed, in order,
    /// and every affected device must be in one of their groups.
    fn hot_reset(&mut self, dev: DevHandle, groups: Option<&[i32]>) -> Result<(), Errno>;
    /// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP` with `eventfd` (or, with `None`, a
    /// fresh eventfd the backend keeps) and `reserved` as the payload's second word: with
    /// CONFIG_PM the next ioctl on the device wakes it out of low power for good and signals
    /// the eventfd.
    fn low_power_wakeup(
        &mut self,
        dev: DevHandle,
        reserved: u32,
        eventfd: Option<i32>,
    ) -> Result<(), Errno>;
    /// Makes the initiator `dev` (attached to an IOAS) write `data` at `iova`. A DMA that
    /// faults is not an error of the call: the check is whether the bytes landed.
    fn dma(&mut self, dev: DevHandle, iova: u64, data: &[u8]) -> Result<(), Errno>;
    /// Whether `data` is at `offset` of region `region` of the provider `bdf`; an errno if
    /// the backend cannot look.
    fn landed(&mut self, bdf: Bdf, region: u32, offset: u64, data: &[u8]) -> Result<Landed, Errno>;
    /// Gives the machine's devices `ms` milliseconds to finish work an access started and
    /// they carry out on their own time (QEMU's NVMe fetches a command in its main loop after
    /// the doorbell write returned). The emulated machine does such work within the access:
    /// nothing to wait for.
    fn settle(&mut self, ms: u32) {
        let _ = ms;
    }
    /// What the kernel printed since the last call that a reader of the conformance suite
    /// must see: warnings and worse, and IOMMU (DMAR) faults, one line each. The emulated
    /// machine has no kernel log: nothing.
    fn kernel_messages(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Whether [`ScenarioBackend::kernel_messages`] reads a real kernel log (so that a step
    /// can expect a message).
    fn has_kernel_log(&self) -> bool {
        false
    }
}

/// Whether a kernel message is a warning, a bug or an oops: what fails a step unless the
/// step expects it.
pub fn is_kernel_warning(line: &str) -> bool {
    [
        "WARNING:",
        "BUG:",
        "Oops",
        "general protection fault",
        "kernel BUG",
        "Call Trace",
    ]
    .iter()
    .any(|w| line.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_parses() {
        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nsize:\t1048576\ncount:\t1\nexp_name:\tvfio_pci_core\nname:\t\n";
        let i = DmabufInfo::parse(t);
        assert_eq!(
            i,
            DmabufInfo {
                size: 1 << 20,
                count: 1,
                exp_name: "vfio_pci_core".into(),
                flags: 0o2000002
            }
        );
        assert_eq!(MAP_FIXED_IOVA | MAP_WRITEABLE | MAP_READABLE, 7);
    }
}
