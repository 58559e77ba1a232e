//! VFIO and iommufd on the real kernel, through the rust-vmm crates.
//!
//! Opening devices, the container and iommufd, IOAS allocation and `IOMMU_IOAS_MAP_FILE` come
//! from `vfio-ioctls` and `iommufd-ioctls`. Three small wrappers are written here because the
//! crates do not offer them in the needed form:
//! - `VFIO_DEVICE_FEATURE` with caller-supplied bytes (the crates build their own, valid,
//!   buffers; conformance tests must send malformed ones too);
//! - `VFIO_DEVICE_RESET` returning its errno (`VfioDevice::reset` discards it);
//! - config-space access as `pread`/`pwrite` at the config region's offset returning errors
//!   (`VfioDevice::region_read` panics-free but silent);
//! - `VFIO_DEVICE_GET_REGION_INFO` returning its errno and capability chain
//!   (`VfioDevice` reads every region's info once at open and keeps no errno);
//! - CPU loads and stores through an `mmap` of a BAR, each made in a child process so that
//!   a `SIGBUS` (the kernel refusing the page fault) is an answer rather than the end;
//! - `IOMMU_IOAS_MAP_FILE` with the argument writable (`IommuFd::map_iommu_ioas_file` takes
//!   it by shared reference, but without FIXED_IOVA the kernel writes the IOVA it chose
//!   back into it), `IOMMU_IOAS_MAP` likewise for user memory (`map_iommu_ioas` takes it by
//!   shared reference too), and `IOMMU_IOAS_IOVA_RANGES` (not offered).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_ioas_allow_iovas, iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_map_file,
    iommu_ioas_unmap, iommu_iova_range,
};
use iommufd_ioctls::{IommuFd, IommufdIoas};
use peerdma_pci::{Bdf, Errno, regs};
use peerdma_uapi::backend::{
    CpuFault, Dependent, HOT_RESET_FLAG_DEV_ID, HotResetInfo, IovaRanges, Landed, MAP_FIXED_IOVA,
    MAP_READABLE, MAP_WRITEABLE, MapHandle, RegionInfo, ScenarioBackend,
};
use peerdma_uapi::{DevHandle, DmabufInfo, IoasId, OpenPath, UapiBackend};
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_TYPE};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr};

use nr::{
    IOMMU_IOAS_ALLOW_IOVAS, IOMMU_IOAS_IOVA_RANGES, IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FILE,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_FEATURE, VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_IOEVENTFD,
    VFIO_DEVICE_PCI_HOT_RESET, VFIO_DEVICE_RESET, VFIO_DEVICE_SET_IRQS,
};

/// The ioctl numbers the crates keep private.
mod nr {
    #![allow(missing_docs)]
    use super::{VFIO_BASE, VFIO_TYPE};
    use vmm_sys_util::ioctl_io_nr;
    ioctl_io_nr!(VFIO_DEVICE_GET_INFO, u32::from(VFIO_TYPE), VFIO_BASE + 7);
    ioctl_io_nr!(VFIO_DEVICE_IOEVENTFD, u32::from(VFIO_TYPE), VFIO_BASE + 16);
    ioctl_io_nr!(
        VFIO_DEVICE_GET_IRQ_INFO,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 9
    );
    ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, u32::from(VFIO_TYPE), VFIO_BASE + 10);
    ioctl_io_nr!(VFIO_DEVICE_RESET, u32::from(VFIO_TYPE), VFIO_BASE + 11);
    ioctl_io_nr!(
        VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 12
    );
    ioctl_io_nr!(
        VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 19
    );
    ioctl_io_nr!(
        VFIO_DEVICE_DETACH_IOMMUFD_PT,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 20
    );
    ioctl_io_nr!(
        VFIO_DEVICE_GET_REGION_INFO,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 8
    );
    ioctl_io_nr!(VFIO_DEVICE_FEATURE, u32::from(VFIO_TYPE), VFIO_BASE + 17);
    ioctl_io_nr!(
        VFIO_DEVICE_PCI_HOT_RESET,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 13
    );
    ioctl_io_nr!(
        VFIO_DEVICE_BIND_IOMMUFD,
        u32::from(VFIO_TYPE),
        VFIO_BASE + 18
    );
    use iommufd_bindings::iommufd::{
        IOMMUFD_CMD_IOAS_ALLOW_IOVAS, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_CMD_IOAS_MAP,
        IOMMUFD_CMD_IOAS_MAP_FILE, IOMMUFD_TYPE,
    };
    ioctl_io_nr!(
        IOMMU_IOAS_ALLOW_IOVAS,
        u32::from(IOMMUFD_TYPE),
        IOMMUFD_CMD_IOAS_ALLOW_IOVAS
    );
    ioctl_io_nr!(
        IOMMU_IOAS_IOVA_RANGES,
        u32::from(IOMMUFD_TYPE),
        IOMMUFD_CMD_IOAS_IOVA_RANGES
    );
    ioctl_io_nr!(
        IOMMU_IOAS_MAP,
        u32::from(IOMMUFD_TYPE),
        IOMMUFD_CMD_IOAS_MAP
    );
    ioctl_io_nr!(
        IOMMU_IOAS_MAP_FILE,
        u32::from(IOMMUFD_TYPE),
        IOMMUFD_CMD_IOAS_MAP_FILE
    );
}

/// The errno at the bottom of an error chain (an `io::Error` or a `vmm_sys_util` errno),
/// `EIO` if there is none.
pub fn errno_of(e: &(dyn std::error::Error + 'static)) -> Errno {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(n) = io.raw_os_error() {
                return Errno(n);
            }
        }
        if let Some(sys) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Errno(sys.errno());
        }
        cur = err.source();
    }
    Errno::EIO
}

/// Where [`LinuxBackend::edu_dma`] maps the RAM page edu reads its patterns from (below the
/// IOVAs scenarios use, inside edu's 28-bit DMA mask).
pub const EDU_RAM_IOVA: u64 = 0x80_0000;

fn last_errno() -> Errno {
    Errno(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// Bytes at the very end of an anonymous mapping whose next page is inaccessible.
struct GuardedBuf {
    base: *mut u8,
    map_len: usize,
    len: usize,
}

impl GuardedBuf {
    fn new(bytes: &[u8]) -> Result<GuardedBuf, Errno> {
        let page = 4096;
        let data_pages = bytes.len().div_ceil(page).max(1);
        let map_len = (data_pages + 1) * page;
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address, owned by
        // the returned value and unmapped by its drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_errno());
        }
        let g = GuardedBuf {
            base: base.cast(),
            map_len,
            len: bytes.len(),
        };
        // SAFETY: the last page of the mapping made above.
        if unsafe {
            libc::mprotect(
                base.cast::<u8>().add(data_pages * page).cast(),
                page,
                libc::PROT_NONE,
            )
        } != 0
        {
            return Err(last_errno());
        }
        // SAFETY: `ptr()` .. `ptr() + len` lies inside the writable pages.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), g.ptr(), bytes.len()) };
        Ok(g)
    }

    /// Where the bytes start: `len` bytes before the guard page.
    fn ptr(&self) -> *mut u8 {
        // SAFETY: `map_len - 4096 - len` is inside the mapping (`len` fits the data pages).
        unsafe { self.base.add(self.map_len - 4096 - self.len) }
    }

    fn copy_out(&self, out: &mut [u8]) {
        let n = out.len().min(self.len);
        // SAFETY: reads `n <= len` bytes from the data pages.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(), out.as_mut_ptr(), n) };
    }
}

impl Drop for GuardedBuf {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `new` made.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// A CPU mapping of a device region (`mmap` of a device fd), unmapped on drop.
struct RegionMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by the backend and only touched through `&mut self` methods.
unsafe impl Send for RegionMap {}

impl Drop for RegionMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned in `region_mmap`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// [`peerdma_uapi::backend::region_pos`] as an `off_t`.
fn region_pos(index: u32, offset: u64) -> Result<i64, Errno> {
    peerdma_uapi::backend::region_pos(index, offset)
        .and_then(|p| i64::try_from(p).map_err(|_| Errno::EINVAL))
}

/// One load or store of 1, 2, 4 or 8 bytes at `p`, in a child process: `Ok` with the bytes
/// (a load) or `Err(CpuFault::Sigbus)` when the kernel refused the page fault and the child
/// died of it. The child shares the mapping, so a store it makes lands where the parent's
/// would.
// `p` is aligned to the access size: `cpu_access` checks it before calling.
#[allow(clippy::cast_ptr_alignment)]
fn access_in_child(p: *mut u8, buf: &mut [u8], write: bool) -> Result<(), CpuFault> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(CpuFault::Errno(last_errno()));
    }
    let (rd, wr) = (fds[0], fds[1]);
    let mut word = [0u8; 8];
    word[..buf.len()].copy_from_slice(buf);
    let n = buf.len();
    // SAFETY: the child only makes one volatile access, a write(2) and _exit(2), all
    // async-signal-safe; the parent waits for it below.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        // SAFETY: closing the pipe just made.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        return Err(CpuFault::Errno(last_errno()));
    }
    if pid == 0 {
        // SAFETY: `p` points into a live shared mapping at least `n` bytes long, aligned to
        // `n` by the caller; the access is volatile, as device memory needs.
        unsafe {
            let v: u64 = match (n, write) {
                (1, false) => u64::from(std::ptr::read_volatile(p)),
                (2, false) => u64::from(std::ptr::read_volatile(p.cast::<u16>())),
                (4, false) => u64::from(std::ptr::read_volatile(p.cast::<u32>())),
                (8, false) => std::ptr::read_volatile(p.cast::<u64>()),
                (1, true) => {
                    std::ptr::write_volatile(p, word[0]);
                    0
                }
                (2, true) => {
                    std::ptr::write_volatile(
                        p.cast::<u16>(),
                        u16::from_le_bytes([word[0], word[1]]),
                    );
                    0
                }
                (4, true) => {
                    let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                    std::ptr::write_volatile(p.cast::<u32>(), w);
                    0
                }
                _ => {
                    std::ptr::write_volatile(p.cast::<u64>(), u64::from_le_bytes(word));
                    0
                }
            };
            let b = v.to_le_bytes();
            libc::write(wr, b.as_ptr().cast(), 8);
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's copy of the write end is not needed.
    unsafe { libc::close(wr) };
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    let mut got = [0u8; 8];
    // SAFETY: reads at most 8 bytes into `got`.
    let r = unsafe { libc::read(rd, got.as_mut_ptr().cast(), 8) };
    // SAFETY: closing the read end.
    unsafe { libc::close(rd) };
    if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS {
        return Err(CpuFault::Sigbus);
    }
    if !libc::WIFEXITED(status) || r != 8 {
        return Err(CpuFault::Errno(Errno::EIO));
    }
    if !write {
        buf.copy_from_slice(&got[..n]);
    }
    Ok(())
}

/// Anonymous memory the backend mapped into an IOAS (so a device can DMA from RAM).
struct AnonPage {
    ptr: *mut u8,
    len: usize,
    iova: u64,
    /// The IOAS it is mapped in.
    ioas: IoasId,
}

// SAFETY: the page is owned by the backend and only touched through `&mut self` methods.
unsafe impl Send for AnonPage {}

impl Drop for AnonPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned in `ioas_map_anon`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Address space reserved for an `ioas_map_user` step: a memfd mapped at its start, the
/// rest (the guard) mapped with no access.
struct UserMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the reservation is owned by the backend; only the kernel (pinning it for iommufd)
// and `Drop` touch it.
unsafe impl Send for UserMapping {}

impl Drop for UserMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the reservation `ioas_map_user` made; pages the
        // IOMMU still maps stay pinned by iommufd, not by this mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Open {
    device: VfioDevice,
    config_offset: u64,
}

/// The real kernel as a [`UapiBackend`].
#[derive(Default)]
pub struct LinuxBackend {
    container: Option<Arc<VfioContainer>>,
    iommufd: Option<Arc<IommuFd>>,
    /// The iommufds opened after the first (numbers 1, 2, …).
    more_iommufds: Vec<Arc<IommuFd>>,
    vfio_iommufd: Option<Arc<VfioIommufd>>,
    devices: HashMap<u32, Open>,
    next: u32,
    ioas: HashMap<IoasId, IommufdIoas>,
    files: HashMap<RawFd, File>,
    anon: Vec<AnonPage>,
    /// The user memory `ioas_map_user` steps mapped.
    user_maps: Vec<UserMapping>,
    /// The IOAS each device was attached to.
    attached: HashMap<u32, IoasId>,
    /// The iommufd each bound cdev is bound to.
    bound_to: HashMap<u32, u32>,
    /// Device cdevs opened but not bound to the iommufd.
    unbound: HashMap<u32, File>,
    /// Eventfds given to wakeup-armed low-power entries.
    eventfds: Vec<File>,
    /// CPU mappings of device regions.
    maps: HashMap<u32, RegionMap>,
    next_map: u32,
    /// `/dev/kmsg`, read from where it stood when the backend was made.
    kmsg: Option<File>,
    /// Each open device's sysfs directory.
    dev_dirs: HashMap<u32, PathBuf>,
    /// The group file (`/dev/vfio/N`) of each device opened the group way.
    group_devs: HashMap<u32, PathBuf>,
    /// Where sysfs is (for tests on captured trees; `/sys` normally).
    pub sysfs: PathBuf,
}

impl std::fmt::Debug for LinuxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxBackend")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl LinuxBackend {
    /// A backend on this machine's `/sys` and `/dev`.
    pub fn new() -> LinuxBackend {
        LinuxBackend {
            sysfs: PathBuf::from("/sys"),
            kmsg: open_kmsg(),
            ..LinuxBackend::default()
        }
    }

    fn iommufd(&mut self) -> Result<Arc<IommuFd>, Errno> {
        if let Some(i) = &self.iommufd {
            return Ok(i.clone());
        }
        let i = Arc::new(IommuFd::new().map_err(|e| errno_of(&e))?);
        self.iommufd = Some(i.clone());
        Ok(i)
    }

    /// Iommufd number `i` (see [`IoasId`]); `EBADF` for one never opened.
    fn iommufd_at(&mut self, i: u32) -> Result<Arc<IommuFd>, Errno> {
        if i == 0 {
            return self.iommufd();
        }
        self.more_iommufds
            .get(i as usize - 1)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn dev(&self, d: DevHandle) -> Result<&Open, Errno> {
        self.devices.get(&d.0).ok_or(Errno::EBADF)
    }

    /// Keeps an open, bound device under handle `h`.
    fn keep(&mut self, h: DevHandle, device: VfioDevice) {
        let config_offset = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        self.devices.insert(
            h.0,
            Open {
                device,
                config_offset,
            },
        );
    }

    /// The descriptor of an open device, bound or not.
    fn raw(&self, d: DevHandle) -> Result<RawFd, Errno> {
        if let Some(f) = self.unbound.get(&d.0) {
            return Ok(f.as_raw_fd());
        }
        Ok(self.dev(d)?.device.as_raw_fd())
    }

    /// Where config space is in the device fd: the region's offset once bound; before that
    /// vfio-pci's fixed layout (region index << 40), which the kernel refuses anyway.
    fn config_at(&self, d: DevHandle, offset: u64) -> Result<i64, Errno> {
        let base = match self.devices.get(&d.0) {
            Some(o) => o.config_offset,
            None if self.unbound.contains_key(&d.0) => {
                u64::from(VFIO_PCI_CONFIG_REGION_INDEX) << 40
            }
            None => return Err(Errno::EBADF),
        };
        i64::try_from(base + offset).map_err(|_| Errno::EINVAL)
    }

    fn vfio_iommufd(&mut self) -> Result<Arc<VfioIommufd>, Errno> {
        if let Some(v) = &self.vfio_iommufd {
            return Ok(v.clone());
        }
        let fd = self.iommufd()?;
        // `VfioIommufd` wants an IOAS of its own, which nothing here uses (devices are
        // attached by the scenario's own ioctls). Made in the process's iommufd it would be
        // an object there and shift every id the kernel hands out after it (device ids in
        // hot reset info, the ids a stale IOAS name reaches), so it lives in a second,
        // private iommufd.
        let scratch = Arc::new(IommuFd::new().map_err(|e| errno_of(&e))?);
        let hidden = Arc::new(IommufdIoas::new(scratch).map_err(|e| errno_of(&e))?);
        let v = Arc::new(VfioIommufd::new(fd, Some(hidden), None).map_err(|e| errno_of(&e))?);
        self.vfio_iommufd = Some(v.clone());
        Ok(v)
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD` on a device fd, with this backend's iommufd.
    fn bind_raw(&mut self, fd: RawFd, ictx: u32) -> Result<(), Errno> {
        // The 7.2 layout up to `out_devid` (no token): argsz 16.
        #[repr(C)]
        struct Bind {
            argsz: u32,
            flags: u32,
            iommufd: i32,
            out_devid: u32,
        }
        let iommufd = self.iommufd_at(ictx)?.as_raw_fd();
        let mut b = Bind {
            argsz: 16,
            flags: 0,
            iommufd,
            out_devid: 0,
        };
        let file = std::mem::ManuallyDrop::new(
            // SAFETY: a borrowed view of a descriptor this backend owns, never closed here.
            unsafe { File::from_raw_fd(fd) },
        );
        // SAFETY: the kernel reads and writes at most `argsz` (16) bytes of `b`.
        let ret = unsafe { ioctl_with_mut_ptr(&*file, VFIO_DEVICE_BIND_IOMMUFD(), &raw mut b) };
        if ret < 0 { Err(last_errno()) } else { Ok(()) }
    }

    /// An ioctl with an argument struct on an open device's fd, bound or not.
    fn raw_ioctl(&self, dev: DevHandle, nr: libc::c_ulong, arg: *mut u8) -> Result<(), Errno> {
        let fd = self.raw(dev)?;
        let file = std::mem::ManuallyDrop::new(
            // SAFETY: a borrowed view of a descriptor this backend owns, never closed here.
            unsafe { File::from_raw_fd(fd) },
        );
        // SAFETY: `arg` points to the ioctl's struct, which the caller owns and sized as the
        // struct's `argsz` says; the kernel touches no more than that.
        let ret = unsafe { ioctl_with_mut_ptr(&*file, nr, arg) };
        if ret < 0 { Err(last_errno()) } else { Ok(()) }
    }

    /// The raw fd of an open device (for callers that need more than the trait).
    pub fn device_fd(&self, d: DevHandle) -> Result<RawFd, Errno> {
        Ok(self.dev(d)?.device.as_raw_fd())
    }

    /// Reads a VFIO region of an open device (a BAR: index 0-5) at `offset`, all of `buf`
    /// (`EIO` if the kernel reads less).
    pub fn bar_read(
        &self,
        d: DevHandle,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        let o = self.dev(d)?;
        let at =
            i64::try_from(o.device.get_region_offset(index) + offset).map_err(|_| Errno::EINVAL)?;
        // SAFETY: pread writes at most `buf.len()` bytes into `buf`.
        let n =
            unsafe { libc::pread(o.device.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), at) };
        if n < 0 {
            return Err(last_errno());
        }
        if usize::try_from(n).unwrap_or(0) < buf.len() {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    /// Writes all of `data` to a VFIO region of an open device at `offset`.
    pub fn bar_write(
        &self,
        d: DevHandle,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno> {
        let o = self.dev(d)?;
        let at =
            i64::try_from(o.device.get_region_offset(index) + offset).map_err(|_| Errno::EINVAL)?;
        // SAFETY: pwrite reads at most `data.len()` bytes from `data`.
        let n = unsafe { libc::pwrite(o.device.as_raw_fd(), data.as_ptr().cast(), data.len(), at) };
        if n < 0 {
            return Err(last_errno());
        }
        if usize::try_from(n).unwrap_or(0) < data.len() {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    /// Maps `len` bytes of fresh anonymous memory (page-aligned, zeroed) into an IOAS at
    /// `iova` (`IOMMU_IOAS_MAP`), so devices can DMA to and from RAM. The backend owns the
    /// memory; fill it with [`LinuxBackend::anon_write`].
    pub fn ioas_map_anon(
        &mut self,
        ioas: peerdma_uapi::IoasId,
        len: usize,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno());
        }
        let page = AnonPage {
            ptr: p.cast(),
            len,
            iova,
            ioas,
        };
        let i = self.iommufd_at(ioas.1)?;
        let map = iommu_ioas_map {
            size: u32::try_from(std::mem::size_of::<iommu_ioas_map>()).unwrap_or(u32::MAX),
            flags,
            ioas_id: ioas.0,
            __reserved: 0,
            user_va: page.ptr as u64,
            length: len as u64,
            iova,
        };
        i.map_iommu_ioas(&map).map_err(|e| errno_of(&e))?;
        self.anon.push(page);
        Ok(())
    }

    /// Writes into anonymous memory mapped at `iova` by [`LinuxBackend::ioas_map_anon`].
    /// Every page mapped at `iova` (in whichever IOAS) gets the bytes.
    pub fn anon_write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let mut found = false;
        for page in self
            .anon
            .iter()
            .filter(|p| iova >= p.iova && iova - p.iova < p.len as u64)
        {
            let off = (iova - page.iova) as usize;
            if off + data.len() > page.len {
                return Err(Errno::EINVAL);
            }
            // SAFETY: `off + data.len()` lies inside the owned mapping; devices may DMA into
            // it concurrently, which is why it is written through a raw pointer and never
            // borrowed.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), page.ptr.add(off), data.len()) };
            found = true;
        }
        if found { Ok(()) } else { Err(Errno::ENOENT) }
    }

    /// One run of edu's DMA engine: `cmd` bit 0 starts it, bit 1 set = from its buffer (device
    /// address 0x40000) to memory, clear = from memory into its buffer.
    fn edu_run(
        &self,
        edu: DevHandle,
        src: u64,
        dst: u64,
        len: usize,
        to_memory: bool,
    ) -> Result<(), Errno> {
        self.bar_write(edu, 0, 0x80, &src.to_le_bytes())?;
        self.bar_write(edu, 0, 0x88, &dst.to_le_bytes())?;
        self.bar_write(edu, 0, 0x90, &(len as u64).to_le_bytes())?;
        let cmd: u64 = if to_memory { 3 } else { 1 };
        self.bar_write(edu, 0, 0x98, &cmd.to_le_bytes())?;
        for _ in 0..2000 {
            let mut c = [0u8; 8];
            self.bar_read(edu, 0, 0x98, &mut c)?;
            if u64::from_le_bytes(c) & 1 == 0 {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(Errno::ETIMEDOUT)
    }

    /// QEMU's edu device `edu` copies `data` to device address `dst`: the pattern goes into
    /// RAM mapped at [`EDU_RAM_IOVA`] of the edu's IOAS (mapped on first use), edu reads it
    /// into its buffer, then writes its buffer to `dst`. Bus mastering is switched on first.
    /// A write that faults in the IOMMU completes all the same (edu does not report it).
    pub fn edu_dma(&mut self, edu: DevHandle, dst: u64, data: &[u8]) -> Result<(), Errno> {
        const BUF: u64 = 0x40000;
        if data.len() > 4096 {
            return Err(Errno::EINVAL);
        }
        // The RAM page, in the IOAS the edu is attached to now (once per IOAS). A detached
        // edu uses whatever page there was: its DMA faults, as on any machine.
        let now = self.attached.get(&edu.0).copied();
        let have = |io: IoasId| {
            self.anon
                .iter()
                .any(|p| p.iova == EDU_RAM_IOVA && p.ioas == io)
        };
        if let Some(ioas) = now.filter(|&io| !have(io)) {
            self.ioas_map_anon(
                ioas,
                4096,
                EDU_RAM_IOVA,
                MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE,
            )?;
        }
        let mut c = [0u8; 2];
        self.config_read(edu, u64::from(regs::COMMAND), &mut c)?;
        let cmd = u16::from_le_bytes(c);
        let want = cmd | regs::COMMAND_MEMORY | regs::COMMAND_MASTER;
        if want != cmd {
            self.config_write(edu, u64::from(regs::COMMAND), &want.to_le_bytes())?;
        }
        match self.anon_write(EDU_RAM_IOVA, data) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        self.edu_run(edu, EDU_RAM_IOVA, BUF, data.len(), false)?;
        self.edu_run(edu, BUF, dst, data.len(), true)
    }

    /// After a low-power entry the kernel suspends the device asynchronously (the
    /// `pm_runtime_put` that ends the ioctl queues the idle work): waits, up to a second,
    /// until its runtime-PM status says `suspended`, so that the next step meets the state
    /// the entry leads to rather than whatever the work queue got to. A kernel without
    /// CONFIG_PM has no such file, and nothing to wait for.
    fn settle_runtime_pm(&self, dev: DevHandle) {
        let Some(dir) = self.dev_dirs.get(&dev.0) else {
            return;
        };
        let status = dir.join("power/runtime_status");
        for _ in 0..1000 {
            match std::fs::read_to_string(&status) {
                Ok(s) if s.trim() == "suspended" => return,
                Ok(s) if s.trim() == "unsupported" => return,
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                Err(_) => return,
            }
        }
    }

    /// Takes ownership of a dma-buf fd the backend handed out (the caller closes it).
    pub fn take_file(&mut self, fd: RawFd) -> Option<File> {
        self.files.remove(&fd)
    }
}

impl UapiBackend for LinuxBackend {
    fn open_device(&mut self, bdf: Bdf, path: OpenPath) -> Result<DevHandle, Errno> {
        let sysfs = self.sysfs.join("bus/pci/devices").join(bdf.to_string());
        if !sysfs.exists() {
            return Err(Errno::ENODEV);
        }
        let h = DevHandle(self.next);
        let device = match path {
            OpenPath::GroupContainer => {
                let c = if let Some(c) = &self.container {
                    c.clone()
                } else {
                    let c = Arc::new(VfioContainer::new(None).map_err(|e| errno_of(&e))?);
                    self.container = Some(c.clone());
                    c
                };
                VfioDevice::new(&sysfs, c as Arc<dyn VfioOps>, false).map_err(|e| errno_of(&e))?
            }
            // The cdev, then (unless asked not to) `VFIO_DEVICE_BIND_IOMMUFD`.
            OpenPath::CdevIommufd | OpenPath::CdevUnbound => {
                let cdev = VfioDevice::open_cdev(&sysfs).map_err(|e| errno_of(&e))?;
                self.next += 1;
                self.unbound.insert(h.0, cdev);
                self.dev_dirs.insert(h.0, sysfs);
                if path == OpenPath::CdevIommufd {
                    if let Err(e) = self.bind_device(h) {
                        self.unbound.remove(&h.0);
                        return Err(e);
                    }
                }
                return Ok(h);
            }
        };
        self.next += 1;
        self.keep(h, device);
        if let Some(n) = std::fs::read_link(sysfs.join("iommu_group"))
            .ok()
            .and_then(|g| g.file_name().and_then(|n| n.to_str()).map(str::to_string))
        {
            self.group_devs
                .insert(h.0, PathBuf::from(format!("/dev/vfio/{n}")));
        }
        self.dev_dirs.insert(h.0, sysfs);
        Ok(h)
    }

    fn close_device(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.dev_dirs.remove(&dev.0);
        self.group_devs.remove(&dev.0);
        if self.unbound.remove(&dev.0).is_some() {
            return Ok(());
        }
        self.devices.remove(&dev.0).map(drop).ok_or(Errno::EBADF)
    }

    fn iommufd_open(&mut self) -> Result<u32, Errno> {
        self.iommufd()?;
        let i = Arc::new(IommuFd::new().map_err(|e| errno_of(&e))?);
        self.more_iommufds.push(i);
        Ok(u32::try_from(self.more_iommufds.len()).unwrap_or(u32::MAX))
    }

    fn bind_device_to(&mut self, dev: DevHandle, ictx: u32) -> Result<(), Errno> {
        let fd = self.raw(dev)?;
        self.bind_raw(fd, ictx)?;
        self.bound_to.insert(dev.0, ictx);
        if let Some(cdev) = self.unbound.remove(&dev.0) {
            let vi = self.vfio_iommufd()?;
            let device =
                VfioDevice::new_from_bound_fd(cdev, vi, false).map_err(|e| errno_of(&e))?;
            self.keep(dev, device);
        }
        Ok(())
    }

    fn device_feature(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<i32, Errno> {
        let fd = self.raw(dev)?;
        // The kernel reads `argsz` bytes: give it at least that many (zero-filled past what
        // the caller wrote) so it never reads past our buffer, up to 1 MiB.
        let argsz = peerdma_uapi::feature::parse_header(buf).map_or(0, |(a, _)| a as usize);
        let mut owned = buf.to_vec();
        if argsz > owned.len() && argsz <= 1 << 20 {
            owned.resize(argsz, 0);
        }
        if owned.len() < 8 {
            owned.resize(8, 0);
        }
        let file = std::mem::ManuallyDrop::new(
            // SAFETY: `fd` is the open device's descriptor, owned by `self.devices` for the
            // duration of this call; ManuallyDrop keeps this temporary File from closing it.
            unsafe { File::from_raw_fd(fd) },
        );
        // The bytes end where a page nobody may touch begins, so that a kernel read past them
        // (more ranges than the caller wrote) is EFAULT, as it is for a buffer of exactly
        // these bytes, rather than whatever the heap holds next.
        let guarded = GuardedBuf::new(&owned)?;
        // SAFETY: VFIO_DEVICE_FEATURE reads at most `argsz` bytes (and, for DMA_BUF,
        // `nr_ranges` ranges) from the buffer and writes back at most as many; past the
        // buffer's end is the guard page, where the kernel's copy fails with EFAULT.
        let ret = unsafe { ioctl_with_mut_ptr(&*file, VFIO_DEVICE_FEATURE(), guarded.ptr()) };
        guarded.copy_out(&mut owned);
        let n = buf.len().min(owned.len());
        buf[..n].copy_from_slice(&owned[..n]);
        if ret < 0 {
            return Err(last_errno());
        }
        if let Some((_, flags)) = peerdma_uapi::feature::parse_header(buf) {
            let f = flags & peerdma_uapi::feature::VFIO_DEVICE_FEATURE_MASK;
            let set = flags & peerdma_uapi::feature::VFIO_DEVICE_FEATURE_SET != 0;
            let probe = flags & peerdma_uapi::feature::VFIO_DEVICE_FEATURE_PROBE != 0;
            // LOW_POWER_ENTRY (3) and LOW_POWER_ENTRY_WITH_WAKEUP (4).
            if set && !probe && (f == 3 || f == 4) {
                self.settle_runtime_pm(dev);
            }
        }
        if ret > 0 {
            // SAFETY: a positive result of a GET is a new file descriptor the kernel handed
            // to this process; we take ownership of it exactly once.
            let f = unsafe { File::from_raw_fd(ret) };
            self.files.insert(ret, f);
        }
        Ok(ret)
    }

    fn config_read(&mut self, dev: DevHandle, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let (fd, at) = (self.raw(dev)?, self.config_at(dev, offset)?);
        // SAFETY: pread writes at most `buf.len()` bytes into `buf`, which we own mutably.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), at) };
        if n < 0 {
            return Err(last_errno());
        }
        if usize::try_from(n).unwrap_or(0) < buf.len() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn config_write(&mut self, dev: DevHandle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let (fd, at) = (self.raw(dev)?, self.config_at(dev, offset)?);
        // SAFETY: pwrite reads at most `data.len()` bytes from `data`.
        let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), at) };
        if n < 0 {
            return Err(last_errno());
        }
        if usize::try_from(n).unwrap_or(0) < data.len() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn reset(&mut self, dev: DevHandle) -> Result<(), Errno> {
        let fd = self.raw(dev)?;
        let file = std::mem::ManuallyDrop::new(
            // SAFETY: as in `device_feature`: a borrowed view of the open device's fd.
            unsafe { File::from_raw_fd(fd) },
        );
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { ioctl(&*file, VFIO_DEVICE_RESET()) };
        if ret < 0 { Err(last_errno()) } else { Ok(()) }
    }

    fn close_fd(&mut self, fd: i32) -> Result<(), Errno> {
        self.files.remove(&fd).map(drop).ok_or(Errno::EBADF)
    }

    /// `EINVAL` for a fd that is not a dma-buf (its fdinfo has no `exp_name`).
    fn dmabuf_info(&mut self, fd: i32) -> Result<DmabufInfo, Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        let t = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        if !t.lines().any(|l| l.starts_with("exp_name:")) {
            return Err(Errno::EINVAL);
        }
        Ok(DmabufInfo::parse(&t))
    }

    fn dmabuf_seek(&mut self, fd: i32, offset: i64, whence: i32) -> Result<u64, Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        // SAFETY: lseek on a descriptor this backend owns; no memory is involved.
        let r = unsafe { libc::lseek(fd, offset, whence) };
        u64::try_from(r).map_err(|_| last_errno())
    }

    fn dup_fd(&mut self, fd: i32) -> Result<i32, Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        // SAFETY: fcntl on a descriptor this backend owns; the new one is owned from here.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if n < 0 {
            return Err(last_errno());
        }
        // SAFETY: `n` is the new descriptor, owned by nothing else.
        self.files.insert(n, unsafe { File::from_raw_fd(n) });
        Ok(n)
    }

    /// The group file this process holds (the group container keeps one per group it has
    /// a device of) is found among `/proc/self/fd` and duplicated; without one the group's
    /// char device is opened.
    fn group_fd(&mut self, bdf: Bdf) -> Result<i32, Errno> {
        let link = self
            .sysfs
            .join("bus/pci/devices")
            .join(bdf.to_string())
            .join("iommu_group");
        let group = std::fs::read_link(&link).map_err(|_| Errno::ENODEV)?;
        let n = group
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or(Errno::ENODEV)?
            .to_string();
        let dev = PathBuf::from(format!("/dev/vfio/{n}"));
        // Only a group file this backend holds — its container's, for a device it opened
        // the group way, or one an earlier `group` step handed out — is dup'd: another
        // backend in this program stands for another process.
        let ours = self.group_devs.values().any(|g| *g == dev)
            || self.files.values().any(|f| {
                std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                    .is_ok_and(|t| t == dev)
            });
        let held = std::fs::read_dir("/proc/self/fd")
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?
            .filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == dev))
            .find_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok());
        let f = if let Some(fd) = held.filter(|_| ours) {
            // SAFETY: fcntl on a descriptor this process holds open (the container's group
            // file); the new descriptor is owned from here.
            let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if n < 0 {
                return Err(last_errno());
            }
            // SAFETY: `n` is the new descriptor, owned by nothing else.
            unsafe { File::from_raw_fd(n) }
        } else {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?
        };
        let n = f.as_raw_fd();
        self.files.insert(n, f);
        Ok(n)
    }

    fn memfd(&mut self, size: u64) -> Result<i32, Errno> {
        // SAFETY: a NUL-terminated name; the call creates a descriptor and touches no memory
        // of ours beyond the name.
        let n = unsafe { libc::memfd_create(c"peerdma".as_ptr(), libc::MFD_CLOEXEC) };
        if n < 0 {
            return Err(last_errno());
        }
        // SAFETY: `n` is the new descriptor, owned by nothing else.
        let f = unsafe { File::from_raw_fd(n) };
        f.set_len(size)
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        self.files.insert(n, f);
        Ok(n)
    }

    fn memfd_sealed(&mut self, size: u64, seals: u32) -> Result<i32, Errno> {
        // SAFETY: as in `memfd`.
        let n = unsafe {
            libc::memfd_create(
                c"peerdma".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if n < 0 {
            return Err(last_errno());
        }
        // SAFETY: `n` is the new descriptor, owned by nothing else.
        let f = unsafe { File::from_raw_fd(n) };
        f.set_len(size)
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let arg = libc::c_int::from_ne_bytes(seals.to_ne_bytes());
        // SAFETY: F_ADD_SEALS takes an int and touches no memory; `n` is open (owned by `f`).
        if unsafe { libc::fcntl(n, libc::F_ADD_SEALS, arg) } < 0 {
            return Err(last_errno());
        }
        self.files.insert(n, f);
        Ok(n)
    }

    fn udmabuf(&mut self, memfd: i32, flags: u32, offset: u64, size: u64) -> Result<i32, Errno> {
        /// `struct udmabuf_create` (include/uapi/linux/udmabuf.h).
        #[repr(C)]
        struct Create {
            memfd: u32,
            flags: u32,
            offset: u64,
            size: u64,
        }
        /// `UDMABUF_CREATE`: `_IOW('u', 0x42, struct udmabuf_create)`.
        const UDMABUF_CREATE: libc::c_ulong =
            (1 << 30) | (24 << 16) | ((b'u' as libc::c_ulong) << 8) | 0x42;
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/udmabuf")
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let arg = Create {
            // The field is unsigned: a negative descriptor reaches the driver as it is.
            memfd: u32::from_ne_bytes(memfd.to_ne_bytes()),
            flags,
            offset,
            size,
        };
        // SAFETY: `arg` is a live `struct udmabuf_create` the kernel only reads; `dev` is open.
        let n = unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE, &arg) };
        if n < 0 {
            return Err(last_errno());
        }
        // SAFETY: `n` is the new dma-buf descriptor, owned by nothing else.
        self.files.insert(n, unsafe { File::from_raw_fd(n) });
        Ok(n)
    }

    fn eventfd(&mut self) -> Result<i32, Errno> {
        // SAFETY: eventfd creates a new descriptor; no memory is involved.
        let n = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if n < 0 {
            return Err(last_errno());
        }
        // SAFETY: `n` is the new descriptor, owned by nothing else.
        self.files.insert(n, unsafe { File::from_raw_fd(n) });
        Ok(n)
    }

    fn read_fd(&mut self, fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes; `fd` is ours.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(r).map_err(|_| last_errno()) {
            // A device's interrupt reaches its eventfd from another CPU's interrupt handler,
            // a moment after the access that raised it: an empty nonblocking file is given
            // 100 ms to become readable before EAGAIN stands (the emulated machine delivers
            // at once).
            Err(Errno::EAGAIN) => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call.
                if unsafe { libc::poll(&raw mut p, 1, 100) } <= 0 {
                    return Err(Errno::EAGAIN);
                }
                // SAFETY: as above.
                let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                usize::try_from(r).map_err(|_| last_errno())
            }
            other => other,
        }
    }

    fn memfd_peek(&mut self, fd: i32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        let off = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes; `fd` is ours.
        let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
        usize::try_from(r).map_err(|_| last_errno())
    }

    fn dmabuf_mmap(&mut self, fd: i32, offset: u64, len: u64) -> Result<(), Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
        let off = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        // SAFETY: a fresh shared read-only mapping at a kernel-chosen address; if it is made,
        // it is unmapped at once and never touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno());
        }
        // SAFETY: `p`/`len` are exactly what mmap returned.
        unsafe { libc::munmap(p, len) };
        Ok(())
    }

    fn ioas_alloc_in(&mut self, ictx: u32) -> Result<IoasId, Errno> {
        let fd = self.iommufd_at(ictx)?;
        let ioas = IommufdIoas::new(fd).map_err(|e| errno_of(&e))?;
        let id = IoasId(ioas.id(), ictx);
        self.ioas.insert(id, ioas);
        Ok(id)
    }

    fn attach_ioas(&mut self, dev: DevHandle, ioas: IoasId) -> Result<(), Errno> {
        // Raw, on any open fd (bound, unbound or group-opened) and any id: the kernel's
        // answer is what a scenario checks. struct vfio_device_attach_iommufd_pt up to pt_id.
        #[repr(C)]
        struct Attach {
            argsz: u32,
            flags: u32,
            pt_id: u32,
        }
        let mut a = Attach {
            argsz: 12,
            flags: 0,
            pt_id: ioas.0,
        };
        self.raw_ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), (&raw mut a).cast())?;
        // The kernel found the id in the iommufd the device is bound to.
        let ictx = self.bound_to.get(&dev.0).copied().unwrap_or(0);
        self.attached.insert(dev.0, IoasId(ioas.0, ictx));
        Ok(())
    }

    fn ioas_map_file(
        &mut self,
        ioas: IoasId,
        fd: i32,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let i = self.iommufd_at(ioas.1)?;
        let mut map = iommu_ioas_map_file {
            size: u32::try_from(std::mem::size_of::<iommu_ioas_map_file>()).unwrap_or(u32::MAX),
            flags,
            ioas_id: ioas.0,
            fd,
            start,
            length,
            iova,
        };
        // SAFETY: the ioctl reads and writes `size` bytes of `map`, which is that long and
        // lives across the call; no memory is kept.
        let ret = unsafe { ioctl_with_mut_ptr(&*i, IOMMU_IOAS_MAP_FILE(), &raw mut map) };
        if ret < 0 {
            return Err(last_errno());
        }
        Ok(map.iova)
    }

    fn ioas_map_user(
        &mut self,
        ioas: IoasId,
        memory: peerdma_uapi::backend::UserMemory,
        offset: u64,
        length: u64,
        iova: u64,
        flags: u32,
        reserved: u32,
    ) -> Result<u64, Errno> {
        const HUGE: usize = 2 << 20;
        let size = match memory.memfd {
            Some(fd) => {
                let f = self.files.get(&fd).ok_or(Errno::EBADF)?;
                let len = f
                    .metadata()
                    .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?
                    .len();
                usize::try_from(len).map_err(|_| Errno::ENOMEM)?
            }
            None => 0,
        };
        let guard = usize::try_from(peerdma_uapi::backend::USER_GUARD).unwrap_or(usize::MAX);
        let span = size.div_ceil(HUGE) * HUGE + guard;
        // SAFETY: a fresh reservation with no access; nothing refers to it yet. One huge
        // page more than the span, so that a 2 MiB aligned start fits inside it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span + HUGE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno());
        }
        self.user_maps.push(UserMapping {
            ptr: p.cast(),
            len: span + HUGE,
        });
        let start = (p as usize).div_ceil(HUGE) * HUGE;
        if let Some(fd) = memory.memfd {
            let prot = if memory.read_only {
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            // SAFETY: `[start, start + size)` lies inside the reservation just made (start is
            // at most one huge page in), which this backend owns; MAP_FIXED replaces part of
            // it with the memfd.
            let q = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    size,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    0,
                )
            };
            if q == libc::MAP_FAILED {
                return Err(last_errno());
            }
        }
        let user_va = (start as u64).checked_add(offset).ok_or(Errno::EINVAL)?;
        let i = self.iommufd_at(ioas.1)?;
        let mut map = iommu_ioas_map {
            size: u32::try_from(std::mem::size_of::<iommu_ioas_map>()).unwrap_or(u32::MAX),
            flags,
            ioas_id: ioas.0,
            __reserved: reserved,
            user_va,
            length,
            iova,
        };
        // SAFETY: the ioctl reads and writes `size` bytes of `map`, which is that long and
        // lives across the call; the memory it pins is the reservation above, kept until the
        // backend goes.
        let ret = unsafe { ioctl_with_mut_ptr(&*i, IOMMU_IOAS_MAP(), &raw mut map) };
        if ret < 0 {
            return Err(last_errno());
        }
        Ok(map.iova)
    }

    fn detach_ioas(&mut self, dev: DevHandle) -> Result<(), Errno> {
        // struct vfio_device_detach_iommufd_pt up to flags.
        let mut d = [8u32, 0];
        self.raw_ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT(), d.as_mut_ptr().cast())?;
        self.attached.remove(&dev.0);
        Ok(())
    }

    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<(), Errno> {
        let fd = self.iommufd_at(ioas.1)?;
        fd.destroy_iommu_object(ioas.0).map_err(|e| errno_of(&e))?;
        // Gone in the kernel: its handle must not destroy the id again when dropped (the
        // kernel may hand the same id to a later object).
        if let Some(h) = self.ioas.remove(&ioas) {
            std::mem::forget(h);
        }
        // Its RAM pages went with it (and the id may come back for a new IOAS).
        self.anon.retain(|p| p.ioas != ioas);
        Ok(())
    }

    fn ioas_allow_iovas(
        &mut self,
        ioas: IoasId,
        ranges: &[(u64, u64)],
        reserved: u32,
    ) -> Result<(), Errno> {
        let i = self.iommufd_at(ioas.1)?;
        let list: Vec<iommu_iova_range> = ranges
            .iter()
            .map(|&(start, last)| iommu_iova_range { start, last })
            .collect();
        let mut cmd = iommu_ioas_allow_iovas {
            size: u32::try_from(std::mem::size_of::<iommu_ioas_allow_iovas>()).unwrap_or(u32::MAX),
            ioas_id: ioas.0,
            num_iovas: u32::try_from(list.len()).map_err(|_| Errno::EINVAL)?,
            __reserved: reserved,
            allowed_iovas: list.as_ptr() as u64,
        };
        // SAFETY: the kernel reads `size` bytes of `cmd` and `num_iovas` ranges at
        // `allowed_iovas`, which points at that many; both live across the call.
        let ret = unsafe { ioctl_with_mut_ptr(&*i, IOMMU_IOAS_ALLOW_IOVAS(), &raw mut cmd) };
        if ret < 0 {
            return Err(last_errno());
        }
        Ok(())
    }

    fn ioas_iova_ranges(&mut self, ioas: IoasId, room: u32) -> Result<IovaRanges, Errno> {
        let i = self.iommufd_at(ioas.1)?;
        let mut out = vec![iommu_iova_range { start: 0, last: 0 }; room as usize];
        let mut cmd = iommu_ioas_iova_ranges {
            size: u32::try_from(std::mem::size_of::<iommu_ioas_iova_ranges>()).unwrap_or(u32::MAX),
            ioas_id: ioas.0,
            num_iovas: room,
            __reserved: 0,
            allowed_iovas: out.as_mut_ptr() as u64,
            out_iova_alignment: 0,
        };
        // SAFETY: the kernel reads and writes `size` bytes of `cmd` and writes at most
        // `num_iovas` (`room`) ranges at `allowed_iovas`, which points at that many; both
        // live across the call.
        let ret = unsafe { ioctl_with_mut_ptr(&*i, IOMMU_IOAS_IOVA_RANGES(), &raw mut cmd) };
        if ret < 0 {
            return Err(last_errno());
        }
        out.truncate(cmd.num_iovas.min(room) as usize);
        Ok(IovaRanges {
            ranges: out.iter().map(|r| (r.start, r.last)).collect(),
            total: cmd.num_iovas,
            alignment: cmd.out_iova_alignment,
        })
    }

    fn region_info(&mut self, dev: DevHandle, index: u32) -> Result<RegionInfo, Errno> {
        // struct vfio_region_info (32 bytes), then room for a capability chain.
        // The kernel copies the struct byte-wise: a byte buffer needs no alignment.
        let mut bytes = [0u8; 256];
        bytes[0..4].copy_from_slice(&256u32.to_le_bytes());
        bytes[8..12].copy_from_slice(&index.to_le_bytes());
        self.raw_ioctl(dev, VFIO_DEVICE_GET_REGION_INFO(), bytes.as_mut_ptr())?;
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        let mut info = RegionInfo {
            flags: u32_at(4),
            size: u64_at(16),
            offset: u64_at(24),
            caps: Vec::new(),
        };
        // The chain: {id u16, version u16, next u32} headers, offsets from the struct's start.
        let mut at = u32_at(12) as usize;
        while at != 0 && at + 8 <= bytes.len() && info.caps.len() < 16 {
            info.caps
                .push(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
            at = u32_at(at + 4) as usize;
        }
        Ok(info)
    }

    fn region_read(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let (fd, at) = (self.raw(dev)?, region_pos(index, offset)?);
        // SAFETY: pread writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), at) };
        usize::try_from(n).map_err(|_| last_errno())
    }

    fn region_write(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, Errno> {
        let (fd, at) = (self.raw(dev)?, region_pos(index, offset)?);
        // SAFETY: pwrite reads at most `data.len()` bytes from `data`.
        let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), at) };
        usize::try_from(n).map_err(|_| last_errno())
    }

    fn region_mmap(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        length: u64,
        shared: bool,
    ) -> Result<MapHandle, Errno> {
        let (fd, at) = (self.raw(dev)?, region_pos(index, offset)?);
        let len = usize::try_from(length).map_err(|_| Errno::EINVAL)?;
        let kind = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: a fresh mapping at a kernel-chosen address; it is only touched through
        // `access_in_child` within `len`, and unmapped by `RegionMap`'s drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                kind,
                fd,
                at,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno());
        }
        let h = self.next_map;
        self.next_map += 1;
        self.maps.insert(h, RegionMap { ptr: p.cast(), len });
        Ok(MapHandle(h))
    }

    fn cpu_access(
        &mut self,
        map: MapHandle,
        offset: u64,
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), CpuFault> {
        let m = self.maps.get(&map.0).ok_or(CpuFault::Errno(Errno::EBADF))?;
        peerdma_uapi::backend::check_cpu_access(offset, buf.len(), m.len as u64)?;
        // SAFETY: `check_cpu_access` kept `offset + buf.len()` inside the mapping.
        let p = unsafe { m.ptr.add(offset as usize) };
        access_in_child(p, buf, write)
    }

    fn ioeventfd(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno> {
        // vfio-ioctls has no ioeventfd call; the raw struct.
        let mut b = [0u8; 32];
        let n = buf.len().min(32);
        b[..n].copy_from_slice(&buf[..n]);
        self.raw_ioctl(dev, VFIO_DEVICE_IOEVENTFD(), b.as_mut_ptr())
    }

    fn write_fd(&mut self, fd: i32, data: &[u8]) -> Result<usize, Errno> {
        if !self.files.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        // SAFETY: `data` is valid for `data.len()` bytes of reads; `fd` is ours.
        let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        usize::try_from(r).map_err(|_| last_errno())
    }

    fn device_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno> {
        // vfio-ioctls reads the device info once at open; the raw struct passes any argsz.
        let mut b = [0u8; 24];
        let n = buf.len().min(24);
        b[..n].copy_from_slice(&buf[..n]);
        self.raw_ioctl(dev, VFIO_DEVICE_GET_INFO(), b.as_mut_ptr())?;
        buf[..n].copy_from_slice(&b[..n]);
        Ok(())
    }

    fn irq_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno> {
        // vfio-ioctls reads IRQ info only for its own setup; the raw struct is needed to pass
        // any argsz and index.
        let mut b = [0u8; 16];
        let n = buf.len().min(16);
        b[..n].copy_from_slice(&buf[..n]);
        self.raw_ioctl(dev, VFIO_DEVICE_GET_IRQ_INFO(), b.as_mut_ptr())?;
        buf[..n].copy_from_slice(&b[..n]);
        Ok(())
    }

    fn set_irqs(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno> {
        // vfio-ioctls' enable_irq/trigger_irq build well-formed requests only; the suite
        // needs every flag, count and fd the kernel checks.
        let mut b = buf.to_vec();
        if b.len() < 20 {
            b.resize(20, 0);
        }
        self.raw_ioctl(dev, VFIO_DEVICE_SET_IRQS(), b.as_mut_ptr())
    }

    fn hot_reset_info(&mut self, dev: DevHandle, room: u32) -> Result<HotResetInfo, Errno> {
        // struct vfio_pci_hot_reset_info (argsz, flags, count), then `room` 8-byte
        // struct vfio_pci_dependent_device (group_id or devid, segment, bus, devfn).
        let room = room.min(256) as usize;
        let mut b = vec![0u32; 3 + 2 * room];
        b[0] = u32::try_from(b.len() * 4).unwrap_or(u32::MAX);
        self.raw_ioctl(
            dev,
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(),
            b.as_mut_ptr().cast(),
        )?;
        let (flags, count) = (b[1], (b[2] as usize).min(room));
        let devices = (0..count)
            .map(|i| {
                let (id, loc) = (b[3 + 2 * i], b[4 + 2 * i]);
                let [seg_lo, seg_hi, bus, devfn] = loc.to_le_bytes();
                let bdf = Bdf::from_devfn(u16::from_le_bytes([seg_lo, seg_hi]), bus, devfn);
                let dep = if flags & HOT_RESET_FLAG_DEV_ID == 0 {
                    Dependent::Group(id)
                } else {
                    // VFIO_PCI_DEVID_OWNED is 0, VFIO_PCI_DEVID_NOT_OWNED is -1.
                    match id {
                        0 => Dependent::Owned,
                        u32::MAX => Dependent::NotOwned,
                        _ => Dependent::DevId(id),
                    }
                };
                (bdf, dep)
            })
            .collect();
        Ok(HotResetInfo { flags, devices })
    }

    fn cpu_unmap(&mut self, map: MapHandle) -> Result<(), Errno> {
        self.maps.remove(&map.0).map(drop).ok_or(Errno::EINVAL)
    }

    fn ioas_unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64, Errno> {
        let i = self.iommufd_at(ioas.1)?;
        let mut u = iommu_ioas_unmap {
            size: u32::try_from(std::mem::size_of::<iommu_ioas_unmap>()).unwrap_or(u32::MAX),
            ioas_id: ioas.0,
            iova,
            length,
        };
        i.unmap_iommu_ioas(&mut u).map_err(|e| errno_of(&e))?;
        Ok(u.length)
    }
}

impl ScenarioBackend for LinuxBackend {
    /// `provider` is the first ivshmem (1af4:1110), `initiator` the first edu (1234:11e8),
    /// `pm_provider` the first QEMU NVMe controller (1b36:0010, its CMB is BAR2), `sibling`
    /// function 1 of the same device.
    fn role(&self, role: &str) -> Result<Bdf, Errno> {
        let want = match role {
            "provider" => ("0x1af4", "0x1110"),
            "initiator" => ("0x1234", "0x11e8"),
            "pm_provider" => ("0x1b36", "0x0010"),
            "sibling" => {
                // Function 1 of the pm_provider's device.
                let pm = self.role("pm_provider")?;
                let b = pm.with_function(1).ok_or(Errno::ENODEV)?;
                return if self
                    .sysfs
                    .join("bus/pci/devices")
                    .join(b.to_string())
                    .exists()
                {
                    Ok(b)
                } else {
                    Err(Errno::ENODEV)
                };
            }
            _ => return Err(Errno::ENODEV),
        };
        let dir = self.sysfs.join("bus/pci/devices");
        let mut found: Vec<Bdf> = std::fs::read_dir(&dir)
            .map_err(|_| Errno::ENODEV)?
            .filter_map(Result::ok)
            .filter(|e| {
                let id = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
                (id("vendor").trim(), id("device").trim()) == want
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        found.sort();
        found.first().copied().ok_or(Errno::ENODEV)
    }

    fn hot_reset(&mut self, dev: DevHandle, groups: Option<&[i32]>) -> Result<(), Errno> {
        let fd = self.raw(dev)?;
        let groups = groups.unwrap_or(&[]);
        // `struct vfio_pci_hot_reset`: argsz, flags, count, then `count` group fds.
        let count = u32::try_from(groups.len()).map_err(|_| Errno::EINVAL)?;
        let argsz = count
            .checked_mul(4)
            .and_then(|n| n.checked_add(12))
            .ok_or(Errno::EINVAL)?;
        let mut arg: Vec<u32> = vec![argsz, 0, count];
        arg.extend(groups.iter().map(|&g| u32::from_ne_bytes(g.to_ne_bytes())));
        let file = std::mem::ManuallyDrop::new(
            // SAFETY: as in `device_feature`: a borrowed view of the open device's fd.
            unsafe { File::from_raw_fd(fd) },
        );
        // SAFETY: the ioctl reads the 12-byte header and `count` group fds after it: exactly
        // the words of `arg`, which lives across the call.
        let ret =
            unsafe { ioctl_with_mut_ptr(&*file, VFIO_DEVICE_PCI_HOT_RESET(), arg.as_mut_ptr()) };
        if ret < 0 { Err(last_errno()) } else { Ok(()) }
    }

    fn low_power_wakeup(
        &mut self,
        dev: DevHandle,
        reserved: u32,
        eventfd: Option<i32>,
    ) -> Result<(), Errno> {
        let efd = if let Some(fd) = eventfd {
            fd
        } else {
            // SAFETY: eventfd creates a new descriptor; no memory is involved.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(last_errno());
            }
            // SAFETY: `efd` is the new descriptor, owned from here on by the backend.
            self.eventfds.push(unsafe { File::from_raw_fd(efd) });
            efd
        };
        let mut b = peerdma_uapi::feature::header_bytes(
            16,
            peerdma_uapi::feature::VFIO_DEVICE_FEATURE_SET | 4,
        );
        b.extend_from_slice(&efd.to_le_bytes());
        b.extend_from_slice(&reserved.to_le_bytes());
        self.device_feature(dev, &mut b).map(drop)
    }

    fn dma(&mut self, dev: DevHandle, iova: u64, data: &[u8]) -> Result<(), Errno> {
        self.edu_dma(dev, iova, data)
    }

    fn kernel_messages(&mut self) -> Vec<String> {
        self.kmsg.as_ref().map(read_kmsg).unwrap_or_default()
    }

    fn has_kernel_log(&self) -> bool {
        self.kmsg.is_some()
    }

    fn settle(&mut self, ms: u32) {
        std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
    }

    /// ivshmem: only the host can tell, from the backing file. Any other device: its BAR
    /// as the CPU sees it now, through a mapping of the sysfs resource file (a device that
    /// does not decode memory, or sleeps in D3hot, shows nothing: nothing can have landed).
    fn landed(&mut self, bdf: Bdf, region: u32, offset: u64, data: &[u8]) -> Result<Landed, Errno> {
        let dir = self.sysfs.join("bus/pci/devices").join(bdf.to_string());
        let id = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        if (id("vendor").trim(), id("device").trim()) == ("0x1af4", "0x1110") {
            return Ok(Landed::Later);
        }
        let got = read_bar(&dir.join(format!("resource{region}")), offset, data.len())?;
        Ok(if got == data { Landed::Yes } else { Landed::No })
    }
}

/// `/dev/kmsg` opened without blocking and moved to its end; `None` where it cannot be read
/// (no permission, no such device).
fn open_kmsg() -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    // SAFETY: lseek on a descriptor `f` owns.
    unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    Some(f)
}

/// One `/dev/kmsg` record — `"prefix,seq,usec,flags;message\n"` then dictionary lines —
/// as its level (the prefix's low 3 bits) and message; `None` if it is not one.
fn kmsg_record(rec: &str) -> Option<(u32, String)> {
    let (head, rest) = rec.split_once(';')?;
    let prefix: u32 = head.split(',').next()?.parse().ok()?;
    let msg = rest.lines().next().unwrap_or("").trim_end().to_string();
    Some((prefix & 7, msg))
}

/// How many kernel lines one step reports at most.
const KMSG_LINES: usize = 8;

/// The records `/dev/kmsg` has for us now that the suite must show: warnings and worse
/// (levels 0-4), and IOMMU faults.
fn read_kmsg(f: &File) -> Vec<String> {
    let mut out = Vec::new();
    let mut more = 0usize;
    let mut buf = vec![0u8; 8192];
    loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf`; one record per read.
        let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            // EPIPE: records were overwritten before we read them; the next read goes on.
            if last_errno() == Errno::EPIPE {
                continue;
            }
            break;
        }
        if n == 0 {
            break;
        }
        let rec = String::from_utf8_lossy(&buf[..n.unsigned_abs()]);
        let Some((level, msg)) = kmsg_record(&rec) else {
            continue;
        };
        if level <= 4 || msg.contains("DMAR") {
            if out.len() < KMSG_LINES {
                out.push(msg);
            } else {
                more += 1;
            }
        }
    }
    if more > 0 {
        out.push(format!("({more} more lines)"));
    }
    out
}

/// Reads `len` bytes at `offset` of a BAR through its sysfs resource file (mapped, read with
/// volatile loads, unmapped).
fn read_bar(path: &std::path::Path, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_SYNC)
        .open(path)
        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let page = offset & !0xfff;
    let within = (offset - page) as usize;
    let span = (within + len).next_multiple_of(4096);
    let at = libc::off_t::try_from(page).map_err(|_| Errno::EINVAL)?;
    // SAFETY: a fresh shared read-only mapping of the BAR at a kernel-chosen address; it is
    // only read below, within `span`, and unmapped before returning.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            at,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_errno());
    }
    // 32-bit loads, as device memory wants: from the aligned word at or below `within`.
    let first = within & !3;
    let words = (within + len - first).div_ceil(4);
    let base = p.cast::<u32>();
    let mut bytes = Vec::with_capacity(words * 4);
    for w in 0..words {
        // SAFETY: `first + 4 * w + 4 <= span`, inside the mapping, 4-byte aligned (the
        // mapping is page aligned); volatile, as device memory.
        let v = unsafe { std::ptr::read_volatile(base.add(first / 4 + w)) };
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let out = bytes[within - first..within - first + len].to_vec();
    // SAFETY: `p`/`span` are exactly what mmap returned.
    unsafe { libc::munmap(p, span) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::kmsg_record;

    #[test]
    fn kmsg_records_give_their_level_and_message() {
        assert_eq!(
            kmsg_record(
                "4,1234,5678,-;WARNING: CPU: 0 PID: 1 at x.c:10 f+0x1/0x2\n SUBSYSTEM=pci\n"
            ),
            Some((4, "WARNING: CPU: 0 PID: 1 at x.c:10 f+0x1/0x2".to_string()))
        );
        // The facility is in the high bits of the prefix.
        assert_eq!(kmsg_record("27,9,1,-;DMAR: fault").map(|r| r.0), Some(3));
        assert_eq!(kmsg_record("no semicolon"), None);
        assert_eq!(kmsg_record("x,1;text"), None);
    }
}
