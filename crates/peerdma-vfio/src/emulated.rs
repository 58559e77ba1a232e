//! The emulated machine as a [`ScenarioBackend`]: the same userspace boundary the real
//! kernel offers (`peerdma_linux::vfio::LinuxBackend`), so one scenario runs on both.
//!
//! A [`Machine`] is the hardware and its drivers: a fabric, the DMA system with an IOMMU, and
//! vfio-pci bound to every endpoint (as the harness's guest binds ivshmem and edu). It lives
//! for a whole run, like the QEMU guest. An [`Emulated`] backend is one process on it: its
//! file table, open devices and iommufd; dropping it closes everything, as a process exit
//! does.

use peerdma_pci::sync::Arc;
use std::collections::{BTreeMap, HashMap};

use peerdma_dma::{DmaConfig, DmaSystem};
use peerdma_dmabuf::buf::FileKind;
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{File, Process};
use peerdma_p2pdma::P2pDma;
use peerdma_pci::{Bdf, DeviceKind, DmaAddr, Errno, Fabric, regs, sync};
use peerdma_uapi::backend::{
    CpuFault, Dependent, HOT_RESET_FLAG_DEV_ID, HOT_RESET_FLAG_DEV_ID_OWNED, HotResetInfo,
    IovaRanges, Landed, MapHandle, RegionInfo, ScenarioBackend, region_pos,
};
use peerdma_uapi::feature::O_CLOEXEC;
use peerdma_uapi::{DevHandle, DmabufInfo, IoasId, OpenPath, UapiBackend};

use crate::iommufd::Iommufd;
use crate::pci::KernelConfig;
use crate::pci::{DeviceFd, VfioPci, iommu_group};

/// The emulated hardware with vfio-pci bound to every endpoint.
pub struct Machine {
    fabric: Arc<Fabric>,
    env: DmaEnv,
    vfio: BTreeMap<Bdf, VfioPci>,
    /// The VFIO groups (by [`iommu_group`]): one group-file opener at a time, never while a
    /// device of the group is open through its cdev, and no cdev open while the group file
    /// is (vfio's `group.c`).
    groups: Arc<peerdma_pci::sync::Mutex<HashMap<Bdf, GroupUse>>>,
    /// The RAM memfds take their bytes from: the next free address and the end (the upper
    /// half of the first RAM range; pages are never given back within a machine's life).
    memfd_ram: peerdma_pci::sync::Mutex<(u64, u64)>,
    /// The kernel has transparent huge pages ([`KernelConfig::thp`]): its iommufds align
    /// the IOVAs they choose up to 2 MiB.
    thp: bool,
    /// vfio's `dev_set->lock`, one for all sets: a first open (with its reset and the state
    /// it saves), a last close with its device set's try-reset and a hot reset never
    /// overlap, whichever processes do them.
    dev_set_lock: peerdma_pci::sync::Mutex<()>,
}

/// The largest memfd the emulated machine backs (what a scenario may ask for).
pub const MEMFD_MAX: u64 = 64 << 20;

/// Who uses a VFIO group now.
#[derive(Debug, Default)]
struct GroupUse {
    /// The group's char device is open (by the process that opened it).
    file_open: bool,
    /// Devices of the group open through their cdev.
    cdevs: usize,
    /// Group fds handed out by name (`group` steps), in any process: each holds the group
    /// file open until its last reference goes.
    named: usize,
    /// The iommufd (its [`Iommufd::uid`]) the bound cdevs claimed the group's DMA for
    /// (`iommu_device_claim_dma_owner`): while `cdevs` > 0 no other may bind one.
    owner: u64,
}

impl GroupUse {
    /// The group's char device is open, by a device's container or a named fd.
    fn file_busy(&self) -> bool {
        self.file_open || self.named > 0
    }
}

/// The number user space knows a group by (its `/dev/vfio/N`): here, the requester ID of
/// the group's first function.
fn group_number(group: Bdf) -> u64 {
    u64::from(group.requester_id())
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vfio", &self.vfio.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Builds the machine on `fabric`: an IOMMU translating every endpoint's DMA, vfio-pci
    /// bound to every endpoint.
    pub fn new(fabric: Arc<Fabric>) -> Result<Machine, Errno> {
        Machine::with_config(fabric, KernelConfig::default())
    }

    /// [`Machine::new`] with a kernel built as `config` says.
    pub fn with_config(fabric: Arc<Fabric>, config: KernelConfig) -> Result<Machine, Errno> {
        let dma = Arc::new(DmaSystem::new(fabric.clone(), true));
        let endpoints: Vec<Bdf> = fabric
            .functions()
            .filter(|f| matches!(f.kind(), DeviceKind::Endpoint | DeviceKind::Vf))
            .map(peerdma_pci::Function::bdf)
            .collect();
        for &b in &endpoints {
            dma.configure(
                b,
                DmaConfig {
                    iommu: true,
                    ..DmaConfig::default()
                },
            )?;
        }
        let env = DmaEnv {
            dma,
            p2p: P2pDma::new(fabric.clone()),
        };
        let mut vfio = BTreeMap::new();
        for b in endpoints {
            vfio.insert(b, VfioPci::bind_with(&env, b, config)?);
        }
        let ram = fabric
            .platform()
            .ram
            .first()
            .map_or((0, 0), |r| (r.cpu + r.size / 2, r.cpu + r.size));
        Ok(Machine {
            fabric,
            env,
            vfio,
            groups: Arc::new(peerdma_pci::sync::Mutex::new(HashMap::new())),
            memfd_ram: peerdma_pci::sync::Mutex::new(((ram.0 + 4095) & !4095, ram.1)),
            thp: config.thp,
            dev_set_lock: peerdma_pci::sync::Mutex::new(()),
        })
    }

    /// vfio's device set of `bdf` (`vfio_pci_core_register_device`): the function alone on
    /// a root bus or as a VF, else every vfio-pci function on its bus (the model's slots
    /// have no slot reset, so the set is never a slot's).
    pub fn dev_set(&self, bdf: Bdf) -> Vec<&VfioPci> {
        let f = &self.fabric;
        let alone = |b: Bdf| {
            f.function(b).map_or(true, peerdma_pci::Function::is_vf)
                || f.upstream_bridge(b).ok().flatten().is_none()
        };
        if alone(bdf) {
            return self.vfio.get(&bdf).into_iter().collect();
        }
        let bus = f.upstream_bridge(bdf).ok().flatten();
        self.vfio
            .values()
            .filter(|v| !alone(v.bdf()) && f.upstream_bridge(v.bdf()).ok().flatten() == bus)
            .collect()
    }

    /// The fabric.
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    /// The vfio-pci device of `bdf`.
    pub fn vfio(&self, bdf: Bdf) -> Option<&VfioPci> {
        self.vfio.get(&bdf)
    }

    /// DMAs that landed through a mapping that had been taken away (revoked, released or
    /// unmapped), over every device (0 unless revocation is broken; see [`crate::watch`]).
    pub fn violation_count(&self) -> usize {
        self.vfio.values().map(VfioPci::violation_count).sum()
    }

    /// Those violations, each naming its buffer, mapping and DMA.
    pub fn violations(&self) -> Vec<crate::watch::Violation> {
        self.vfio.values().flat_map(VfioPci::violations).collect()
    }

    /// A process on the machine.
    pub fn process(&self) -> Emulated<'_> {
        Emulated {
            m: self,
            iommufd: None,
            more_iommufds: Vec::new(),
            devs: HashMap::new(),
            next: 0,
            maps: HashMap::new(),
            next_map: 0,
            proc: Process::new(),
            group_files: HashMap::new(),
            attached: HashMap::new(),
            edu_ram: Vec::new(),
            vmas: Vec::new(),
            next_va: USER_VA_BASE,
        }
    }
}

struct Open {
    bdf: Bdf,
    /// Opened through the group file (else through the device's cdev).
    via_group: bool,
    fd: DeviceFd,
    /// The user closed the fd, but CPU mappings of it hold the file open: the device is
    /// closed when the last of them goes.
    closed: bool,
    /// CPU mappings of the fd.
    maps: usize,
    /// The iommufd device object's id, while the cdev is bound.
    devid: Option<u32>,
    /// Which of the process's iommufds it is bound to.
    ictx: u32,
}

/// A CPU mapping of a BAR (`mmap` of a device fd).
struct CpuMap {
    dev: u32,
    bar: u8,
    /// Where in the BAR it starts, and how long it is.
    offset: u64,
    length: u64,
}

/// One process on an emulated [`Machine`].
pub struct Emulated<'m> {
    m: &'m Machine,
    iommufd: Option<Iommufd>,
    /// The iommufds opened after the first (numbers 1, 2, …).
    more_iommufds: Vec<Iommufd>,
    proc: Process,
    devs: HashMap<u32, Open>,
    next: u32,
    maps: HashMap<u32, CpuMap>,
    next_map: u32,
    /// Group files this process holds open, with how many devices use each.
    group_files: HashMap<Bdf, usize>,
    /// The IOAS each device handle was last attached to (detach forgets it), as the real
    /// backend keeps it for its `dma` step.
    attached: HashMap<u32, IoasId>,
    /// The RAM pages the `dma` step mapped at [`EDU_RAM_IOVA`], one per IOAS (until the IOAS
    /// is destroyed; unmapping the area does not forget it, on either backend).
    edu_ram: Vec<(IoasId, Arc<File>, u64)>,
    /// The process's user memory for `IOMMU_IOAS_MAP` (`ioas_map_user`), and the next free
    /// address: 2 MiB aligned, each mapping followed by its unmapped guard.
    vmas: Vec<Vma>,
    next_va: u64,
}

/// A memfd mapped into an [`Emulated`] process's address space.
struct Vma {
    start: u64,
    len: u64,
    file: Arc<File>,
    writable: bool,
}

/// Where user memory for `IOMMU_IOAS_MAP` starts in an [`Emulated`] process.
const USER_VA_BASE: u64 = 0x7f00_0000_0000;
/// The page size of the emulated process's mappings.
const PAGE: u64 = 4096;

/// Where the `dma` step maps the page of RAM that edu copies the pattern from (the real
/// backend's `EDU_RAM_IOVA`).
pub const EDU_RAM_IOVA: u64 = 0x80_0000;
/// edu's DMA buffer, as a device address.
const EDU_BUF: u64 = 0x4_0000;

impl Emulated<'_> {
    /// How many references the open file behind `fd` has (the fd table's among them): how a
    /// test sees that nothing the kernel held on to outlives its release. `EBADF` for a
    /// closed fd.
    pub fn fd_refs(&self, fd: i32) -> Result<usize, Errno> {
        let f = self.proc.fget(fd)?;
        let n = f.refs() - 1;
        f.put();
        Ok(n)
    }

    /// A reference to the open file behind `fd` (`EBADF` for a closed one), for a test that
    /// plays a kernel importer of a buffer the process holds; give it back with
    /// [`File::put`].
    pub fn fget(&self, fd: i32) -> Result<Arc<File>, Errno> {
        self.proc.fget(fd)
    }

    /// One run of edu's DMA engine through its registers in BAR 0 (source, destination,
    /// count, then the command: run, and bit 1 for "to memory"), as the real backend drives
    /// it; a command that still reads running afterwards is `ETIMEDOUT` (the real backend
    /// gives up after two seconds). Short register writes and reads are `EIO`.
    fn edu_run(
        &mut self,
        dev: DevHandle,
        src: u64,
        dst: u64,
        len: usize,
        to_memory: bool,
    ) -> Result<(), Errno> {
        let cmd: u64 = if to_memory { 3 } else { 1 };
        for (at, v) in [(0x80u64, src), (0x88, dst), (0x90, len as u64), (0x98, cmd)] {
            let n = self.region_write(dev, 0, at, &v.to_le_bytes())?;
            if n < 8 {
                return Err(Errno::EIO);
            }
        }
        let mut c = [0u8; 8];
        if self.region_read(dev, 0, 0x98, &mut c)? < 8 {
            return Err(Errno::EIO);
        }
        if u64::from_le_bytes(c) & 1 != 0 {
            return Err(Errno::ETIMEDOUT);
        }
        Ok(())
    }
}

impl Drop for Emulated<'_> {
    /// A process exit: iommufd's mappings go first (they hold dma-buf references), then the
    /// file table, then the devices (each giving back its hold on its group).
    fn drop(&mut self) {
        let maps: Vec<u32> = self.maps.keys().copied().collect();
        for m in maps {
            let _ = self.cpu_unmap(peerdma_uapi::backend::MapHandle(m));
        }
        self.iommufd.take();
        self.more_iommufds.clear();
        for (_, f, _) in self.edu_ram.drain(..) {
            f.put();
        }
        for v in self.vmas.drain(..) {
            v.file.put();
        }
        for fd in self.proc.fds() {
            let _ = self.proc.close(fd);
        }
        let handles: Vec<u32> = self.devs.keys().copied().collect();
        for h in handles {
            let _ = self.close_device(DevHandle(h));
        }
    }
}

impl std::fmt::Debug for Emulated<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulated")
            .field("devices", &self.devs.len())
            .field("fds", &self.proc.fds())
            .finish_non_exhaustive()
    }
}

impl Emulated<'_> {
    /// A memfd backed by RAM of the machine, so that a device can DMA into it through an
    /// IOAS; `ENOMEM` past [`MEMFD_MAX`] or when the machine's memfd RAM is used up. With
    /// `seals` it is made sealable and then given them (`F_ADD_SEALS`: on failure it is
    /// closed and the errno returned).
    fn memfd_of(&mut self, size: u64, seals: Option<u32>) -> Result<i32, Errno> {
        if size > MEMFD_MAX {
            return Err(Errno::ENOMEM);
        }
        let base = {
            let mut r = sync::lock(&self.m.memfd_ram);
            let pages = size.div_ceil(4096) * 4096;
            if r.0 + pages > r.1 {
                return Err(Errno::ENOMEM);
            }
            let b = r.0;
            r.0 += pages;
            b
        };
        let f = match seals {
            None => File::memfd(base, size),
            Some(add) => {
                let f = File::memfd_with_seals(base, size, 0);
                if let Err(e) = f.add_seals(add) {
                    f.put();
                    return Err(e);
                }
                f
            }
        };
        self.proc.install(f, true).map_err(|(e, f)| {
            f.put();
            e
        })
    }

    /// Gives back what a device open took of `group` (the group file goes with the last
    /// group-opened device of the process, as the container lets it go; a cdev's block goes
    /// if it was bound).
    fn release_group(&mut self, group: Bdf, via_group: bool, bound: bool) {
        let mut g = sync::lock(&self.m.groups);
        let u = g.entry(group).or_default();
        if via_group {
            let n = self.group_files.entry(group).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.group_files.remove(&group);
                u.file_open = false;
            }
        } else if bound {
            u.cdevs = u.cdevs.saturating_sub(1);
            if u.cdevs == 0 {
                u.owner = 0;
            }
        }
    }

    /// A device fd the user still has open.
    fn dev(&self, d: DevHandle) -> Result<&Open, Errno> {
        self.devs
            .get(&d.0)
            .filter(|o| !o.closed)
            .ok_or(Errno::EBADF)
    }

    /// The file's release (`vfio_device_fops_release`), once neither the fd nor a mapping
    /// holds it.
    fn release_device(&mut self, dev: u32) {
        let Some(o) = self.devs.remove(&dev) else {
            return;
        };
        let group = iommu_group(&self.m.fabric, o.bdf);
        let bound = o.fd.is_bound();
        // The last close of a bound cdev unbinds it from iommufd, detaching it from its IOAS
        // first (`vfio_iommufd_physical_unbind`): nothing of the device stays in the IOAS.
        if bound && !o.via_group {
            if let Some(i) = self.opened_iommufd(o.ictx) {
                let _ = i.detach(o.bdf);
                if let Some(id) = o.devid {
                    i.unbind_device(id);
                }
            }
        }
        let bdf = o.bdf;
        {
            let _set = sync::lock(&self.m.dev_set_lock);
            o.fd.close();
            // `vfio_pci_core_disable` ends with the device set's try-reset.
            VfioPci::dev_set_try_reset(&self.m.dev_set(bdf));
        }
        self.release_group(group, o.via_group, bound);
    }

    /// The prologue of `VFIO_DEVICE_ATTACH_IOMMUFD_PT` / `_DETACH_`
    /// (`vfio_device_fops_unl_ioctl`): a fd without access granted (an unbound cdev) is
    /// `EINVAL`; a group-opened fd does not know these ioctls — vfio-pci answers `ENOTTY`.
    fn cdev_only_ioctl(&self, dev: DevHandle) -> Result<Bdf, Errno> {
        let o = self.dev(dev)?;
        o.fd.ioctl_prologue()?;
        if o.via_group {
            return Err(Errno::ENOTTY);
        }
        Ok(o.bdf)
    }

    fn iommufd(&mut self) -> Result<&Iommufd, Errno> {
        self.iommufd_at(0)
    }

    /// Iommufd number `i` of this process (the first opened on first use); `EBADF` for one
    /// never opened.
    fn iommufd_at(&mut self, i: u32) -> Result<&Iommufd, Errno> {
        if i == 0 && self.iommufd.is_none() {
            self.iommufd = Some(Iommufd::open_with(&self.m.env, self.m.thp)?);
        }
        self.opened_iommufd(i).ok_or(Errno::EBADF)
    }

    /// Iommufd number `i`, if it is open.
    fn opened_iommufd(&self, i: u32) -> Option<&Iommufd> {
        match i {
            0 => self.iommufd.as_ref(),
            n => self.more_iommufds.get(n as usize - 1),
        }
    }
}

impl UapiBackend for Emulated<'_> {
    /// A cdev open with binding is the cdev open, then [`UapiBackend::bind_device`] (which
    /// is where the group gets blocked); the group path opens the group file first.
    fn open_device(&mut self, bdf: Bdf, path: OpenPath) -> Result<DevHandle, Errno> {
        let v = self.m.vfio.get(&bdf).ok_or(Errno::ENODEV)?;
        let fd = if path == OpenPath::GroupContainer {
            let group = iommu_group(&self.m.fabric, bdf);
            // The group file, unless this process holds it already: not while another
            // holds it, nor while a cdev of the group is bound.
            if !self.group_files.contains_key(&group) {
                let mut g = sync::lock(&self.m.groups);
                let u = g.entry(group).or_default();
                if u.file_busy() || u.cdevs > 0 {
                    return Err(Errno::EBUSY);
                }
                u.file_open = true;
            }
            *self.group_files.entry(group).or_default() += 1;
            let opened = {
                let _set = sync::lock(&self.m.dev_set_lock);
                v.open()
            };
            match opened {
                Ok(fd) => fd,
                Err(e) => {
                    self.release_group(group, true, false);
                    return Err(e);
                }
            }
        } else {
            v.open_cdev()?
        };
        let h = DevHandle(self.next);
        self.next += 1;
        let via_group = path == OpenPath::GroupContainer;
        self.devs.insert(
            h.0,
            Open {
                bdf,
                via_group,
                fd,
                closed: false,
                maps: 0,
                devid: None,
                ictx: 0,
            },
        );
        if path == OpenPath::CdevIommufd {
            if let Err(e) = self.bind_device(h) {
                let _ = self.close_device(h);
                return Err(e);
            }
        }
        Ok(h)
    }

    /// Closing the fd releases the file unless a CPU mapping still holds it. A bound cdev is
    /// first detached from its IOAS by `VFIO_DEVICE_DETACH_IOMMUFD_PT`, as the real backend's
    /// device type (rust-vmm's `VfioDevice`) does when it is dropped: an ioctl like any
    /// other, so it wakes a device asleep in wakeup-armed low power, and the device's DMA
    /// stops at once even while a CPU mapping keeps the file open.
    fn close_device(&mut self, dev: DevHandle) -> Result<(), Errno> {
        if self.dev(dev).is_ok_and(|o| !o.via_group && o.fd.is_bound()) {
            let _ = self.detach_ioas(dev);
        }
        let o = self
            .devs
            .get_mut(&dev.0)
            .filter(|o| !o.closed)
            .ok_or(Errno::EBADF)?;
        o.closed = true;
        if o.maps == 0 {
            self.release_device(dev.0);
        }
        Ok(())
    }

    /// Binding claims the group's DMA for the iommufd (`iommufd_device_bind`,
    /// `iommu_device_claim_dma_owner`): `EPERM` while another iommufd — of this process or
    /// another — has a device of the group bound; `EBUSY` while the group file is open.
    fn bind_device_to(&mut self, dev: DevHandle, ictx: u32) -> Result<(), Errno> {
        let uid = self.iommufd_at(ictx)?.uid();
        let o = self.dev(dev)?;
        // Only a cdev binds, once; a group-opened fd is bound already, as the kernel says.
        if o.fd.is_bound() {
            return Err(Errno::EINVAL);
        }
        let group = iommu_group(&self.m.fabric, o.bdf);
        let mut g = sync::lock(&self.m.groups);
        let u = g.entry(group).or_default();
        // Binding blocks the group: refused while its group file is open.
        if u.file_busy() {
            return Err(Errno::EBUSY);
        }
        // Only the group path opens a device twice (`vfio_df_open`).
        if self.m.vfio(o.bdf).is_some_and(|v| v.open_count() > 0) {
            return Err(Errno::EINVAL);
        }
        // `iommu_device_claim_dma_owner`: another owner is EPERM.
        if u.cdevs > 0 && u.owner != uid {
            return Err(Errno::EPERM);
        }
        {
            let _set = sync::lock(&self.m.dev_set_lock);
            o.fd.bind()?;
        }
        u.cdevs += 1;
        u.owner = uid;
        drop(g);
        let id = self.iommufd_at(ictx)?.bind_device();
        if let Some(o) = self.devs.get_mut(&dev.0) {
            o.devid = Some(id);
            o.ictx = ictx;
        }
        Ok(())
    }

    fn iommufd_open(&mut self) -> Result<u32, Errno> {
        self.iommufd()?;
        self.more_iommufds
            .push(Iommufd::open_with(&self.m.env, self.m.thp)?);
        Ok(u32::try_from(self.more_iommufds.len()).unwrap_or(u32::MAX))
    }

    fn device_feature(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<i32, Errno> {
        let o = self.devs.get(&dev.0).ok_or(Errno::EBADF)?;
        o.fd.feature(&self.proc, buf)
    }

    fn config_read(&mut self, dev: DevHandle, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let o = self.dev(dev)?;
        // Past the config space (which ends below 2^16) is EFAULT, as the kernel answers.
        let off = u16::try_from(offset).map_err(|_| Errno::EFAULT)?;
        o.fd.read_config(off, buf)
    }

    fn config_write(&mut self, dev: DevHandle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let o = self.dev(dev)?;
        let off = u16::try_from(offset).map_err(|_| Errno::EFAULT)?;
        o.fd.config_write(off, data)
    }

    fn reset(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.dev(dev)?.fd.reset()
    }

    fn close_fd(&mut self, fd: i32) -> Result<(), Errno> {
        self.proc.close(fd)
    }

    fn dmabuf_info(&mut self, fd: i32) -> Result<DmabufInfo, Errno> {
        let f = self.proc.fget(fd)?;
        let cloexec = self.proc.cloexec(fd).unwrap_or(false);
        let info = f.dmabuf().map(|b| DmabufInfo {
            size: b.size(),
            // Less the reference this look took.
            count: f.refs().saturating_sub(1) as u64,
            exp_name: b.exp_name().to_string(),
            flags: f.flags() | if cloexec { O_CLOEXEC } else { 0 },
        });
        f.put();
        info.ok_or(Errno::EINVAL)
    }

    fn dmabuf_seek(&mut self, fd: i32, offset: i64, whence: i32) -> Result<u64, Errno> {
        let f = self.proc.fget(fd)?;
        // `ksys_lseek`: a whence past SEEK_HOLE is refused before the file's llseek.
        let r = if (0..=4).contains(&whence) {
            match f.dmabuf() {
                Some(b) => b.llseek(offset, whence),
                None => f.llseek_other(offset, whence),
            }
        } else {
            Err(Errno::EINVAL)
        };
        f.put();
        r
    }

    /// The `mmap` syscall's own checks (mm/mmap.c `do_mmap`, after x86's `sys_mmap`), then
    /// the dma-buf's: an offset that is not page aligned or does not fit `off_t`, a zero
    /// length → EINVAL; a length that page-aligns to 0 → ENOMEM; an end page past 2^64 →
    /// EOVERFLOW; a file not open for reading → EACCES (the mapping is `PROT_READ`,
    /// `MAP_SHARED`); then `dma_buf_mmap_internal`.
    fn dmabuf_mmap(&mut self, fd: i32, offset: u64, len: u64) -> Result<(), Errno> {
        // x86-64's user address space: 47 bits less a page.
        const TASK_SIZE: u64 = (1 << 47) - PAGE;
        const MAX_LFS_FILESIZE: u64 = i64::MAX as u64;
        if offset % PAGE != 0 || i64::try_from(offset).is_err() {
            return Err(Errno::EINVAL);
        }
        let f = self.proc.fget(fd)?;
        let aligned = len.checked_add(PAGE - 1).map(|l| l & !(PAGE - 1));
        let r = if len == 0 {
            Err(Errno::EINVAL)
        } else if aligned.is_none_or(|l| l == 0) {
            Err(Errno::ENOMEM)
        } else if (offset / PAGE)
            .checked_add(aligned.unwrap_or(0) / PAGE)
            .is_none()
        {
            Err(Errno::EOVERFLOW)
        } else if aligned.is_some_and(|l| l > TASK_SIZE) {
            // `__get_unmapped_area`: longer than the address space.
            Err(Errno::ENOMEM)
        } else if matches!(f.kind(), FileKind::Memfd { .. })
            && (offset / PAGE) > (MAX_LFS_FILESIZE - aligned.unwrap_or(0)) >> 12
        {
            // `file_mmap_ok`: a shmem file ends at MAX_LFS_FILESIZE.
            Err(Errno::EOVERFLOW)
        } else if !f.can_read() {
            // Not open for reading (O_WRONLY, or access mode 3): no mapping at all.
            Err(Errno::EACCES)
        } else {
            match f.kind() {
                FileKind::DmaBuf(b) => b.mmap(offset, len),
                // shmem_mmap: any page of the file, even past its end (touching one there
                // would be SIGBUS).
                FileKind::Memfd { .. } => Ok(()),
                // An eventfd has no mmap method (`can_mmap_file`).
                FileKind::Eventfd(_) | FileKind::Other(_) | FileKind::VfioGroup { .. } => {
                    Err(Errno::ENODEV)
                }
            }
        };
        f.put();
        r
    }

    /// The group file, named: held by this process already (a device of the group is open
    /// the group way, or a named fd of it is open) it is a second descriptor of it;
    /// otherwise the group's char device is opened (`vfio_group_fops_open`: `EBUSY` while
    /// a cdev of the group is bound or another holds the file).
    fn group_fd(&mut self, bdf: Bdf) -> Result<i32, Errno> {
        if !self.m.vfio.contains_key(&bdf) {
            return Err(Errno::ENODEV);
        }
        let group = iommu_group(&self.m.fabric, bdf);
        let held_here = self.group_files.contains_key(&group)
            || self
                .proc
                .fds()
                .into_iter()
                .filter_map(|fd| self.proc.fget(fd).ok())
                .any(|f| {
                    let mine = f.vfio_group_id() == Some(group_number(group));
                    f.put();
                    mine
                });
        {
            let mut g = sync::lock(&self.m.groups);
            let u = g.entry(group).or_default();
            if !held_here && (u.file_busy() || u.cdevs > 0) {
                return Err(Errno::EBUSY);
            }
            u.named += 1;
        }
        let groups = self.m.groups.clone();
        let release = peerdma_dmabuf::buf::OnRelease::new(move || {
            let mut g = sync::lock(&groups);
            if let Some(u) = g.get_mut(&group) {
                u.named = u.named.saturating_sub(1);
            }
        });
        self.proc
            .install(File::vfio_group(group_number(group), release), true)
            .map_err(|(e, f)| {
                f.put();
                e
            })
    }

    fn dup_fd(&mut self, fd: i32) -> Result<i32, Errno> {
        self.proc.dup(fd)
    }

    /// Backed by RAM of the machine, so that a device can DMA into it through an IOAS;
    /// `ENOMEM` past [`MEMFD_MAX`] or when the machine's memfd RAM is used up.
    fn memfd(&mut self, size: u64) -> Result<i32, Errno> {
        self.memfd_of(size, None)
    }

    fn memfd_sealed(&mut self, size: u64, seals: u32) -> Result<i32, Errno> {
        self.memfd_of(size, Some(seals))
    }

    /// `UDMABUF_CREATE` (see [`crate::udmabuf`]): the memfd looked up without a reference
    /// error of its own (a descriptor naming nothing is the driver's `EBADFD`).
    fn udmabuf(&mut self, memfd: i32, flags: u32, offset: u64, size: u64) -> Result<i32, Errno> {
        let file = self.proc.fget(memfd).ok();
        let r = crate::udmabuf::create(&self.m.env.dma, file.as_deref(), flags, offset, size);
        if let Some(f) = file {
            f.put();
        }
        let (f, cloexec) = r?;
        self.proc.install(f, cloexec).map_err(|(e, f)| {
            f.put();
            e
        })
    }

    fn eventfd(&mut self) -> Result<i32, Errno> {
        self.proc.install(File::eventfd(), true).map_err(|(e, f)| {
            f.put();
            e
        })
    }

    fn read_fd(&mut self, fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
        let f = self.proc.fget(fd)?;
        let fabric = &self.m.fabric;
        let r = f.read(buf, |at, b| {
            let _ = fabric.ram_peek(peerdma_pci::PhysAddr(at), b);
        });
        f.put();
        r
    }

    /// A file without positional reads (an eventfd, a dma-buf) is `ESPIPE`.
    fn memfd_peek(&mut self, fd: i32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let f = self.proc.fget(fd)?;
        let r = match f.kind() {
            FileKind::Memfd { base, size, .. } => {
                let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                if n > 0 {
                    let _ = self
                        .m
                        .fabric
                        .ram_peek(peerdma_pci::PhysAddr(base + offset), &mut buf[..n]);
                }
                Ok(n)
            }
            _ => Err(Errno::ESPIPE),
        };
        f.put();
        r
    }

    fn ioas_alloc_in(&mut self, ictx: u32) -> Result<IoasId, Errno> {
        self.iommufd_at(ictx)?
            .ioas_alloc()
            .map(|id| IoasId(id, ictx))
    }

    /// The id is looked up in the iommufd the device is bound to, whichever iommufd the
    /// IOAS came from.
    fn attach_ioas(&mut self, dev: DevHandle, ioas: IoasId) -> Result<(), Errno> {
        let bdf = self.cdev_only_ioctl(dev)?;
        let ictx = self.dev(dev)?.ictx;
        self.iommufd_at(ictx)?.attach(bdf, ioas.0)?;
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
        self.iommufd_at(ioas.1)?;
        let i = self.opened_iommufd(ioas.1).ok_or(Errno::EBADF)?;
        i.map_file_ioctl(&self.proc, ioas.0, fd, start, length, iova, flags)
    }

    fn detach_ioas(&mut self, dev: DevHandle) -> Result<(), Errno> {
        let bdf = self.cdev_only_ioctl(dev)?;
        let ictx = self.dev(dev)?.ictx;
        self.iommufd_at(ictx)?.detach(bdf)?;
        self.attached.remove(&dev.0);
        Ok(())
    }

    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<(), Errno> {
        self.iommufd_at(ioas.1)?.ioas_destroy(ioas.0)?;
        // Its RAM page went with it (and the id may come back for a new IOAS).
        let (gone, kept) = std::mem::take(&mut self.edu_ram)
            .into_iter()
            .partition(|p| p.0 == ioas);
        self.edu_ram = kept;
        for (_, f, _) in gone {
            f.put();
        }
        Ok(())
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
        const HUGE: u64 = 2 << 20;
        self.iommufd_at(ioas.1)?;
        // The mmap (mm/mmap.c `do_mmap`, mm/memfd.c `memfd_check_seals_mmap`): a fd not
        // open → EBADF; not a memfd → ENODEV (no mmap of this kind); an empty memfd → EINVAL
        // (a length of 0); a writable shared mapping of a memfd sealed against writes →
        // EPERM. The mapping covers the memfd's pages, the last one whole.
        let start = self.next_va;
        let mut len = 0;
        if let Some(fd) = memory.memfd {
            let file = self.proc.fget(fd)?;
            let refused = match *file.kind() {
                peerdma_dmabuf::buf::FileKind::Memfd { size: 0, .. } => Some(Errno::EINVAL),
                peerdma_dmabuf::buf::FileKind::Memfd { size, .. } => {
                    len = size.div_ceil(PAGE) * PAGE;
                    let sealed = file.seals().unwrap_or(0)
                        & (peerdma_dmabuf::buf::seal::WRITE
                            | peerdma_dmabuf::buf::seal::FUTURE_WRITE);
                    (sealed != 0 && !memory.read_only).then_some(Errno::EPERM)
                }
                _ => Some(Errno::ENODEV),
            };
            if let Some(e) = refused {
                file.put();
                return Err(e);
            }
            self.vmas.push(Vma {
                start,
                len,
                file,
                writable: !memory.read_only,
            });
        }
        let span = len.div_ceil(HUGE) * HUGE + peerdma_uapi::backend::USER_GUARD;
        self.next_va = start + span + HUGE;
        let uptr = start.checked_add(offset).ok_or(Errno::EINVAL)?;
        let want_write = flags & peerdma_uapi::backend::MAP_WRITEABLE != 0;
        let i = self.opened_iommufd(ioas.1).ok_or(Errno::EBADF)?;
        // What pinning `[uptr, uptr + length)` finds, page by page from the first
        // (`pin_user_pages_fast`, FOLL_WRITE for a writeable map): the pages of the mapping
        // it starts in, up to its end; a page outside it (the unmapped guard), or any page of
        // a read-only mapping asked to be written, is EFAULT.
        let first = uptr & !(PAGE - 1);
        let vma = self
            .vmas
            .iter()
            .find(|v| first >= v.start && first - v.start < v.len);
        let pages = match vma {
            Some(v) if v.writable || !want_write => {
                let room = v.start + v.len - uptr;
                crate::iommufd::UserPages {
                    memfd: Some((&v.file, uptr - v.start)),
                    pinnable: length.min(room),
                }
            }
            _ => crate::iommufd::UserPages {
                memfd: None,
                pinnable: 0,
            },
        };
        i.map_user(ioas.0, &pages, uptr, length, iova, flags, reserved)
    }

    fn ioas_allow_iovas(
        &mut self,
        ioas: IoasId,
        ranges: &[(u64, u64)],
        reserved: u32,
    ) -> Result<(), Errno> {
        self.iommufd_at(ioas.1)?
            .allow_iovas(ioas.0, ranges, reserved)
    }

    fn ioas_iova_ranges(&mut self, ioas: IoasId, room: u32) -> Result<IovaRanges, Errno> {
        self.iommufd_at(ioas.1)?
            .iova_ranges(ioas.0, room, 0)
            .map_err(|(e, _)| e)
    }

    fn ioas_unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64, Errno> {
        self.iommufd_at(ioas.1)?.unmap(ioas.0, iova, length)
    }

    fn ioeventfd(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno> {
        self.dev(dev)?.fd.ioeventfd(&self.proc, buf)
    }

    fn write_fd(&mut self, fd: i32, data: &[u8]) -> Result<usize, Errno> {
        let f = self.proc.fget(fd)?;
        let r = f.write(data);
        f.put();
        r
    }

    fn device_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno> {
        self.dev(dev)?.fd.device_info(buf)
    }

    fn irq_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno> {
        self.dev(dev)?.fd.irq_info(buf)
    }

    fn set_irqs(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno> {
        let o = self.devs.get(&dev.0).ok_or(Errno::EBADF)?;
        o.fd.set_irqs(&self.proc, buf)
    }

    fn region_info(&mut self, dev: DevHandle, index: u32) -> Result<RegionInfo, Errno> {
        self.dev(dev)?.fd.region_info(index)
    }

    fn region_read(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let pos = region_pos(index, offset)?;
        self.dev(dev)?.fd.region_rw(pos, buf, false)
    }

    fn region_write(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, Errno> {
        let pos = region_pos(index, offset)?;
        let mut b = data.to_vec();
        self.dev(dev)?.fd.region_rw(pos, &mut b, true)
    }

    fn region_mmap(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        length: u64,
        shared: bool,
    ) -> Result<MapHandle, Errno> {
        // The VFS's own checks first (`sys_mmap`, `do_mmap`, `__get_unmapped_area`): an
        // offset that is not page aligned or a zero length → EINVAL; a length that
        // page-aligns to 0 → ENOMEM; an end page past 2^64 → EOVERFLOW; longer than the
        // address space → ENOMEM. Only then does vfio-pci see the mapping.
        const TASK_SIZE: u64 = (1 << 47) - PAGE;
        if length == 0 || offset % PAGE != 0 {
            return Err(Errno::EINVAL);
        }
        let pos = region_pos(index, offset)?;
        let aligned = length.checked_add(PAGE - 1).map_or(0, |l| l & !(PAGE - 1));
        if aligned == 0 {
            return Err(Errno::ENOMEM);
        }
        if (pos / PAGE).checked_add(aligned / PAGE).is_none() {
            return Err(Errno::EOVERFLOW);
        }
        if aligned > TASK_SIZE {
            return Err(Errno::ENOMEM);
        }
        self.dev(dev)?.fd.mmap_check(pos, length, shared)?;
        if let Some(o) = self.devs.get_mut(&dev.0) {
            o.maps += 1;
        }
        let h = self.next_map;
        self.next_map += 1;
        self.maps.insert(
            h,
            // vfio-pci names the region by the offset's top bits (`vfio_pci_core_mmap`), not
            // by what the caller meant.
            CpuMap {
                dev: dev.0,
                bar: (pos >> peerdma_uapi::backend::REGION_OFFSET_SHIFT) as u8,
                offset: pos & ((1 << peerdma_uapi::backend::REGION_OFFSET_SHIFT) - 1),
                length,
            },
        );
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
        peerdma_uapi::backend::check_cpu_access(offset, buf.len(), m.length)?;
        let o = self.devs.get(&m.dev).ok_or(CpuFault::Errno(Errno::EBADF))?;
        o.fd.cpu_access(m.bar, m.offset + offset, buf, write)
    }

    /// Devices of the reset named as vfio-pci names them to this process: by iommufd
    /// device id when this process has it bound, as owned when its IOMMU group is bound in
    /// this process's iommufd, else not owned; by IOMMU group when the asking fd was opened
    /// the group way.
    fn hot_reset_info(&mut self, dev: DevHandle, room: u32) -> Result<HotResetInfo, Errno> {
        let o = self.dev(dev)?;
        let scope = o.fd.hot_reset_scope()?;
        if scope.len() > room as usize {
            return Err(Errno::ENOSPC);
        }
        let f = &self.m.fabric;
        if o.via_group {
            let devices = scope
                .iter()
                .map(|&b| {
                    let id = u32::from(iommu_group(f, b).requester_id());
                    (b, Dependent::Group(id))
                })
                .collect();
            return Ok(HotResetInfo { flags: 0, devices });
        }
        // Named by the iommufd the asking device is bound to.
        let ictx = o.ictx;
        let bound: Vec<(u32, Bdf)> = self
            .devs
            .values()
            .filter(|d| !d.via_group && d.fd.is_bound() && d.ictx == ictx)
            .map(|d| (d.devid.unwrap_or(0), d.bdf))
            .collect();
        let mut flags = HOT_RESET_FLAG_DEV_ID | HOT_RESET_FLAG_DEV_ID_OWNED;
        let mut devices = Vec::new();
        for b in scope {
            let id = if let Some((h, _)) = bound.iter().find(|(_, x)| *x == b) {
                // The id the bind got from the iommufd's one table of objects.
                Dependent::DevId(*h)
            } else if bound
                .iter()
                .any(|&(_, x)| iommu_group(f, x) == iommu_group(f, b))
            {
                Dependent::Owned
            } else {
                flags &= !HOT_RESET_FLAG_DEV_ID_OWNED;
                Dependent::NotOwned
            };
            devices.push((b, id));
        }
        Ok(HotResetInfo { flags, devices })
    }

    fn cpu_unmap(&mut self, map: MapHandle) -> Result<(), Errno> {
        let m = self.maps.remove(&map.0).ok_or(Errno::EINVAL)?;
        let release = self.devs.get_mut(&m.dev).is_some_and(|o| {
            o.maps -= 1;
            o.closed && o.maps == 0
        });
        if release {
            self.release_device(m.dev);
        }
        Ok(())
    }
}

impl ScenarioBackend for Emulated<'_> {
    fn role(&self, role: &str) -> Result<Bdf, Errno> {
        self.m.fabric.lookup(role).map_err(|_| Errno::ENODEV)
    }

    /// `vfio_pci_ioctl_pci_hot_reset`'s order: the ioctl prologue (which wakes a device in
    /// wakeup-armed low power); group fds from a cdev-opened device, or none from a
    /// group-opened one → `EINVAL`; no bus to reset → `ENODEV`; more group fds than
    /// devices the reset reaches → `EINVAL`; then each fd in turn: not open → `EBADF`, not
    /// a group file → `EINVAL`. Every affected device must then be owned: in one of the
    /// groups given, or (with none) in a group with a device bound to the iommufd the
    /// asking device is bound to.
    fn hot_reset(&mut self, dev: DevHandle, groups: Option<&[i32]>) -> Result<(), Errno> {
        let o = self.dev(dev)?;
        o.fd.ioctl_prologue()?;
        let fds = groups.unwrap_or(&[]);
        if fds.is_empty() == o.via_group {
            return Err(Errno::EINVAL);
        }
        let f = &self.m.fabric;
        // The groups that prove ownership, by number.
        let groups: Vec<u64> = if fds.is_empty() {
            // Ownership is per IOMMU group: a group with one device open in this process's
            // iommufd is owned whole.
            self.devs
                .values()
                .filter(|d| !d.via_group && d.fd.is_bound() && d.ictx == o.ictx)
                .map(|d| group_number(iommu_group(f, d.bdf)))
                .collect()
        } else {
            if fds.len() > o.fd.hot_reset_scope()?.len() {
                return Err(Errno::EINVAL);
            }
            let mut ids = Vec::new();
            for &fd in fds {
                let file = self.proc.fget(fd)?;
                let id = file.vfio_group_id();
                file.put();
                ids.push(id.ok_or(Errno::EINVAL)?);
            }
            ids
        };
        let owned: Vec<&VfioPci> = self
            .m
            .vfio
            .values()
            .filter(|v| groups.contains(&group_number(iommu_group(f, v.bdf()))))
            .collect();
        let set: Vec<&VfioPci> = self.m.vfio.values().collect();
        let _set = sync::lock(&self.m.dev_set_lock);
        o.fd.hot_reset_in(&set, &owned)
    }

    fn low_power_wakeup(
        &mut self,
        dev: DevHandle,
        reserved: u32,
        eventfd: Option<i32>,
    ) -> Result<(), Errno> {
        let efd = match eventfd {
            Some(fd) => fd,
            None => self.eventfd()?,
        };
        let mut b = peerdma_uapi::feature::header_bytes(16, crate::feature::SET | 4);
        b.extend_from_slice(&efd.to_le_bytes());
        b.extend_from_slice(&reserved.to_le_bytes());
        self.device_feature(dev, &mut b).map(drop)
    }

    /// The real backend's way, step by step, for QEMU's edu: a page of RAM mapped at
    /// [`EDU_RAM_IOVA`] of the IOAS the device is attached to (once per IOAS), memory decode
    /// and bus mastering switched on, the pattern written into the page (every such page),
    /// then edu's own DMA engine driven through its registers: the page into its buffer,
    /// the buffer out to `iova`. Each transfer is the device's DMA through the IOMMU, so a
    /// dead mapping faults and nothing lands. Any other initiator (fabrics without edu)
    /// writes the pattern directly as its DMA, after the same COMMAND bits.
    fn dma(&mut self, dev: DevHandle, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let bdf = self.dev(dev)?.bdf;
        let edu = self
            .m
            .fabric
            .function(bdf)
            .is_ok_and(|x| x.model() == Some(peerdma_pci::model::DeviceModel::QemuEdu));
        if edu && data.len() > 4096 {
            return Err(Errno::EINVAL);
        }
        if edu {
            if let Some(io) = self
                .attached
                .get(&dev.0)
                .copied()
                .filter(|io| !self.edu_ram.iter().any(|p| p.0 == *io))
            {
                let base = {
                    let mut r = sync::lock(&self.m.memfd_ram);
                    if r.0 + 4096 > r.1 {
                        return Err(Errno::ENOMEM);
                    }
                    r.0 += 4096;
                    r.0 - 4096
                };
                let page = File::memfd(base, 4096);
                if let Err(e) = self
                    .iommufd_at(io.1)?
                    .map_file(io.0, &page, 0, 4096, EDU_RAM_IOVA)
                {
                    page.put();
                    return Err(e);
                }
                self.edu_ram.push((io, page, base));
            }
        }
        let o = self.dev(dev)?;
        let cmd = o.fd.config_read(regs::COMMAND, 2)? as u16;
        let want = cmd | regs::COMMAND_MEMORY | regs::COMMAND_MASTER;
        if want != cmd {
            o.fd.config_write(regs::COMMAND, &want.to_le_bytes())?;
        }
        if !edu {
            // A fault is what a revoked mapping must produce; the caller checks the bytes.
            let _ = self.m.fabric.dma_write(bdf, DmaAddr(iova), data);
            return Ok(());
        }
        for (_, _, base) in &self.edu_ram {
            let _ = self.m.fabric.ram_poke(peerdma_pci::PhysAddr(*base), data);
        }
        self.edu_run(dev, EDU_RAM_IOVA, EDU_BUF, data.len(), false)?;
        self.edu_run(dev, EDU_BUF, iova, data.len(), true)
    }

    fn landed(&mut self, bdf: Bdf, region: u32, offset: u64, data: &[u8]) -> Result<Landed, Errno> {
        let bar = u8::try_from(region).map_err(|_| Errno::EINVAL)?;
        let mut got = vec![0u8; data.len()];
        self.m
            .fabric
            .bar_peek(bdf, bar, offset, &mut got)
            .map_err(|_| Errno::EINVAL)?;
        Ok(if got == data { Landed::Yes } else { Landed::No })
    }
}
