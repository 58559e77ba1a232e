//! Scenario files: TOML in, [`Scenario`] out. Every error names the file, the step and the
//! key; unknown keys are refused, so a typo never silently changes a scenario.
//!
//! ```toml
//! about = "A whole-BAR export gives a 1 MiB dma-buf"
//!
//! [[step]]
//! do = "open"
//! dev = "provider"        # a role, resolved by the backend
//! as = "p"
//!
//! [[step]]
//! do = "export"
//! dev = "p"
//! region = 2
//! ranges = [[0, "1M"]]
//! as = "buf"
//! expect = { fd = true, size = "1M", exp_name = "vfio_pci_core" }
//! ```

use std::path::Path;

use peerdma_pci::Errno;
use peerdma_uapi::OpenPath;
use peerdma_uapi::feature::{
    DmaBufRequest, O_CLOEXEC, O_RDWR, VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};
use toml::{Table, Value};

/// A scenario: a name, what it shows, its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The file's stem.
    pub name: String,
    /// One line saying what it shows.
    pub about: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Runs only on kernels whose `CONFIG_PM` is this (`pm = true|false` in the file); every
    /// kernel when absent.
    pub pm: Option<bool>,
    /// Runs only on kernels whose `CONFIG_TRANSPARENT_HUGEPAGE` is this (`thp = true|false`
    /// in the file: for kernel-chosen IOVAs, which it aligns differently); every kernel
    /// when absent.
    pub thp: Option<bool>,
    /// `group_path = false`: not run the group/container way on a kernel without iommufd
    /// (for behaviour only the cdev path has been held to the kernel).
    pub group_path: bool,
}

impl Scenario {
    /// Whether it runs on a kernel whose `CONFIG_PM` is `pm`.
    pub fn runs_with_pm(&self, pm: bool) -> bool {
        self.pm.is_none_or(|p| p == pm)
    }

    /// Whether it runs on a kernel whose `CONFIG_PM` is `pm` and whose
    /// `CONFIG_TRANSPARENT_HUGEPAGE` is `thp`.
    pub fn runs_on(&self, pm: bool, thp: bool) -> bool {
        self.runs_with_pm(pm) && self.thp.is_none_or(|t| t == thp)
    }

    /// Whether a step uses iommufd (an IOAS, a mapping, a DMA through one).
    pub fn needs_iommufd(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s.action,
                Action::IoasAlloc { .. }
                    | Action::Bind { .. }
                    | Action::Iommufd { .. }
                    | Action::Open {
                        iommufd: Some(_),
                        ..
                    }
                    | Action::Open {
                        path: OpenPath::CdevUnbound,
                        ..
                    }
                    | Action::Attach { .. }
                    | Action::Map { .. }
                    | Action::MapUser { .. }
                    | Action::Unmap { .. }
                    | Action::IovaRanges { .. }
                    | Action::AllowIovas { .. }
                    | Action::Detach { .. }
                    | Action::IoasDestroy { .. }
                    | Action::Dma { .. }
            )
        })
    }

    /// Whether a step makes a udmabuf (`/dev/udmabuf`, which Debian's cloud kernel lacks).
    pub fn needs_udmabuf(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.action, Action::Udmabuf { .. }))
    }

    /// The scenario for a kernel without iommufd or udmabuf (Debian's cloud kernel): every
    /// device opened the group/container way; `None` if it needs either.
    pub fn on_group_path(&self) -> Option<Scenario> {
        if self.needs_iommufd() || self.needs_udmabuf() || !self.group_path {
            return None;
        }
        let mut s = self.clone();
        for st in &mut s.steps {
            if let Action::Open { path, .. } = &mut st.action {
                *path = OpenPath::GroupContainer;
            }
        }
        Some(s)
    }
}

/// One step: what to do and what must come of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The action.
    pub action: Action,
    /// The expected result.
    pub expect: Expect,
    /// Text the real kernel must print while the step runs (`dmesg = "…"`); such a
    /// message, even a warning, is then not held against the step.
    pub dmesg: Option<String>,
    /// The process the step runs in (`process = "b"`): a second user of the machine, with
    /// its own fds, group files, container and iommufds; none: the scenario's first.
    pub process: Option<String>,
}

/// What a step does. Device, fd and IOAS fields are names given earlier with `as`, except
/// `open`'s `dev`, which is a role.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open the device playing `role` as `name`.
    Open {
        /// Role (`provider`, `initiator`).
        role: String,
        /// Name for later steps.
        name: String,
        /// Group/container or cdev/iommufd.
        path: OpenPath,
        /// The iommufd a cdev binds to (default: the process's first).
        iommufd: Option<String>,
    },
    /// `VFIO_DEVICE_BIND_IOMMUFD` of a device opened with `bind = false`.
    Bind {
        /// Device name.
        dev: String,
        /// The iommufd (default: the process's first).
        iommufd: Option<String>,
    },
    /// Opens one more `/dev/iommu`.
    Iommufd {
        /// Name for later steps.
        name: String,
    },
    /// Close a device fd.
    Close {
        /// Device name.
        dev: String,
    },
    /// `VFIO_DEVICE_FEATURE` with a header built from `flags` and `argsz`, then `data`.
    Feature {
        /// Device name.
        dev: String,
        /// The header's flags word (feature number and GET/SET/PROBE bits).
        flags: u32,
        /// `argsz` (default: header + data).
        argsz: Option<u32>,
        /// Bytes after the header.
        data: Vec<u8>,
        /// Name for an fd that comes back.
        name: Option<String>,
    },
    /// `VFIO_DEVICE_FEATURE_DMA_BUF` from structured fields.
    Export {
        /// Device name.
        dev: String,
        /// The request (every field may be set independently of the others).
        req: DmaBufRequest,
        /// Name for the fd.
        name: Option<String>,
    },
    /// Close a dma-buf fd.
    CloseFd {
        /// Fd name.
        fd: String,
    },
    /// Look at a dma-buf fd's fdinfo.
    Fdinfo {
        /// Fd name.
        fd: String,
    },
    /// `lseek` on a dma-buf fd.
    Seek {
        /// Fd name.
        fd: String,
        /// Offset (may be negative).
        offset: i64,
        /// `SEEK_SET` (0), `SEEK_CUR` (1) or `SEEK_END` (2).
        whence: i32,
    },
    /// `mmap` of a dma-buf fd.
    Mmap {
        /// Fd name.
        fd: String,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// Read config space through the VFIO config region.
    ConfigRead {
        /// Device name.
        dev: String,
        /// Where.
        at: ConfigAt,
        /// 1 to 8 bytes.
        size: usize,
        /// Bits compared.
        mask: u64,
    },
    /// Write config space through the VFIO config region.
    ConfigWrite {
        /// Device name.
        dev: String,
        /// Where.
        at: ConfigAt,
        /// 1 to 8 bytes.
        size: usize,
        /// Value (little-endian, its low `size` bytes).
        value: u64,
    },
    /// Read COMMAND, set or clear Memory Space Enable, write it back.
    Memory {
        /// Device name.
        dev: String,
        /// On or off.
        on: bool,
    },
    /// Write PMCSR's power state (found through the capability list).
    Power {
        /// Device name.
        dev: String,
        /// 0 = D0 … 3 = D3hot.
        state: u16,
        /// The write's size: 1 (PMCSR's low byte), 2 (PMCSR) or 4 (the dword at PMCSR).
        size: usize,
    },
    /// PCIe Function Level Reset through DevCtl.
    Flr {
        /// Device name.
        dev: String,
        /// The write's size: 1 (DevCtl's high byte, which holds the FLR bit), 2 (DevCtl) or
        /// 4 (DevCtl with DevSta, whose write-one-to-clear bits get zeros).
        size: usize,
    },
    /// Advanced Features FLR.
    AfFlr {
        /// Device name.
        dev: String,
    },
    /// `VFIO_DEVICE_RESET`.
    Reset {
        /// Device name.
        dev: String,
    },
    /// `VFIO_DEVICE_PCI_HOT_RESET` (cdev ownership, no group fds).
    HotReset {
        /// Device name.
        dev: String,
        /// Group fds (their names) handed to the ioctl, in order; `None` for none at all
        /// (`count` 0, the cdev way).
        groups: Option<Vec<String>>,
    },
    /// A descriptor of a device's VFIO group file (`/dev/vfio/N`): a second one of the
    /// group file this process holds open, else the group's char device opened now.
    Group {
        /// The device (a role).
        dev: String,
        /// Its name.
        name: String,
    },
    /// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY` / `_EXIT`, or `_ENTRY_WITH_WAKEUP` with a named
    /// fd or a fresh eventfd.
    LowPower {
        /// Device name.
        dev: String,
        /// Entry (true) or exit.
        enter: bool,
        /// Entry armed with a wakeup eventfd.
        wakeup: bool,
        /// The payload's reserved word, with `wakeup` (0 unless given).
        reserved: u32,
        /// The fd (by name) given as the wakeup eventfd; `None`: a fresh eventfd.
        eventfd: Option<String>,
    },
    /// `fcntl(F_DUPFD_CLOEXEC)`: a second fd for the same file.
    Dup {
        /// The fd's name.
        fd: String,
        /// The new fd's name.
        name: String,
    },
    /// `memfd_create` and `ftruncate`: a shmem file of `size` bytes.
    Memfd {
        /// Bytes.
        size: u64,
        /// With `Some`, made with `MFD_ALLOW_SEALING` and then given these `F_SEAL_*` bits
        /// (`F_ADD_SEALS`); with `None`, not sealable.
        seals: Option<u32>,
        /// Name.
        name: String,
    },
    /// `UDMABUF_CREATE`: a dma-buf of a memfd's pages.
    Udmabuf {
        /// The memfd (any fd, or a number).
        memfd: FdArg,
        /// `flags` (`UDMABUF_FLAGS_CLOEXEC` = 1).
        flags: u32,
        /// Offset into the memfd.
        offset: u64,
        /// Bytes.
        size: u64,
        /// Name of the new fd.
        name: String,
    },
    /// Waits `ms` milliseconds on a machine whose devices finish some work after the access
    /// that started it (QEMU runs NVMe's command fetch in its main loop a moment after the
    /// doorbell write); the emulated machine has done such work already and waits for nothing.
    Settle {
        /// Milliseconds, 1 to 1000.
        ms: u32,
    },
    /// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
    Eventfd {
        /// Name.
        name: String,
    },
    /// `read(2)` of `size` bytes at the fd's position.
    Read {
        /// The fd's name.
        fd: String,
        /// Bytes asked for.
        size: usize,
        /// Whether the outcome shows the bytes (the step expects them) or their count.
        show: bool,
    },
    /// `IOMMU_IOAS_ALLOC`.
    IoasAlloc {
        /// Name.
        name: String,
        /// The iommufd (default: the process's first).
        iommufd: Option<String>,
    },
    /// Attach a device to an IOAS.
    Attach {
        /// Device name.
        dev: String,
        /// IOAS name.
        ioas: String,
    },
    /// `IOMMU_IOAS_MAP_FILE`.
    Map {
        /// IOAS name.
        ioas: String,
        /// Fd name.
        fd: String,
        /// Offset in the buffer.
        start: u64,
        /// Length.
        length: u64,
        /// IOVA (ignored by the kernel without FIXED_IOVA).
        iova: Iova,
        /// `IOMMU_IOAS_MAP_*` flags: fixed IOVA (1), writeable (2), readable (4); 7 unless
        /// given.
        flags: u32,
        /// The name later steps give the IOVA the map got.
        name: Option<String>,
    },
    /// `IOMMU_IOAS_MAP` of user memory: a memfd mapped into the process (or nothing
    /// mapped at all), `length` bytes from `offset` into that mapping.
    MapUser {
        /// IOAS name.
        ioas: String,
        /// The memfd mapped (its fd name); none: the address has nothing mapped.
        memfd: Option<String>,
        /// The memfd is mapped read-only.
        read_only: bool,
        /// Where the map starts, from the start of the mapping (past the memfd's end is the
        /// unmapped guard).
        offset: u64,
        /// Length.
        length: u64,
        /// IOVA (ignored by the kernel without FIXED_IOVA).
        iova: Iova,
        /// `IOMMU_IOAS_MAP_*` flags, as for [`Action::Map`].
        flags: u32,
        /// The `__reserved` word.
        reserved: u32,
        /// The name later steps give the IOVA the map got.
        name: Option<String>,
    },
    /// `IOMMU_IOAS_UNMAP`.
    Unmap {
        /// IOAS name.
        ioas: String,
        /// IOVA.
        iova: Iova,
        /// Length.
        length: u64,
    },
    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    Detach {
        /// Device name.
        dev: String,
    },
    /// `IOMMU_DESTROY` of an IOAS.
    IoasDestroy {
        /// IOAS name.
        ioas: String,
    },
    /// `IOMMU_IOAS_ALLOW_IOVAS`.
    AllowIovas {
        /// IOAS name.
        ioas: String,
        /// `[start, last]` pairs, inclusive, in the order given.
        ranges: Vec<(u64, u64)>,
        /// The `__reserved` word.
        reserved: u32,
    },
    /// `IOMMU_IOAS_IOVA_RANGES` with room for `room` ranges.
    IovaRanges {
        /// IOAS name.
        ioas: String,
        /// `num_iovas` on the way in.
        room: u32,
    },
    /// `VFIO_DEVICE_GET_REGION_INFO`.
    RegionInfo {
        /// Device name.
        dev: String,
        /// Region index (BARs 0-5, ROM 6, config 7, VGA 8).
        region: u32,
    },
    /// `pread` of a region of the device fd.
    RegionRead {
        /// Device name.
        dev: String,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes asked for.
        size: usize,
        /// Whether the outcome shows the bytes read (else only how many).
        show: bool,
    },
    /// `pwrite` of a region of the device fd.
    RegionWrite {
        /// Device name.
        dev: String,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `mmap` of a region of the device fd, read and write.
    CpuMap {
        /// Device name.
        dev: String,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Length.
        length: u64,
        /// `MAP_SHARED` (else `MAP_PRIVATE`).
        shared: bool,
        /// Name for later steps.
        name: String,
    },
    /// A CPU load through a mapping.
    CpuRead {
        /// Mapping name.
        map: String,
        /// Offset in the mapping.
        offset: u64,
        /// 1, 2, 4 or 8 bytes.
        size: usize,
        /// Whether the outcome shows the bytes read.
        show: bool,
    },
    /// A CPU store through a mapping.
    CpuWrite {
        /// Mapping name.
        map: String,
        /// Offset in the mapping.
        offset: u64,
        /// 1, 2, 4 or 8 bytes.
        data: Vec<u8>,
    },
    /// `munmap` of a mapping.
    CpuUnmap {
        /// Mapping name.
        map: String,
    },
    /// `VFIO_DEVICE_IOEVENTFD`.
    Ioeventfd {
        /// Device name.
        dev: String,
        /// Region index (a BAR for anything but `EINVAL`).
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// `flags` (the size bit of 1, 2, 4 or 8 bytes, or a raw word).
        flags: u32,
        /// The value written when the eventfd is signalled.
        data: u64,
        /// The eventfd (−1 takes a registration off).
        fd: FdArg,
        /// `argsz` (default 32).
        argsz: u32,
    },
    /// `write(2)` to an fd.
    Write {
        /// Fd name.
        fd: String,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `VFIO_DEVICE_GET_INFO`.
    DeviceInfo {
        /// Device name.
        dev: String,
        /// `argsz` (default 24).
        argsz: u32,
    },
    /// `VFIO_DEVICE_GET_IRQ_INFO`.
    IrqInfo {
        /// Device name.
        dev: String,
        /// IRQ index (INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4).
        index: u32,
        /// `argsz` (default 16).
        argsz: u32,
    },
    /// `VFIO_DEVICE_SET_IRQS`.
    SetIrqs {
        /// Device name.
        dev: String,
        /// `flags`: data type and action bits.
        flags: u32,
        /// IRQ index.
        index: u32,
        /// First vector.
        start: u32,
        /// Vectors (default: as many as the data has).
        count: u32,
        /// The data: one byte per vector for `bool`, one fd per vector for `eventfd`.
        data: IrqData,
        /// `argsz` (default 20 + the data).
        argsz: Option<u32>,
    },
    /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`.
    HotResetInfo {
        /// Device name.
        dev: String,
        /// Room for this many devices in the answer.
        room: u32,
    },
    /// The initiator writes a fresh 16-byte pattern at (or just past) `iova`, inside a
    /// window mapped by an earlier `map` step; the provider's memory is then checked.
    Dma {
        /// Initiator device name.
        dev: String,
        /// IOVA.
        iova: Iova,
    },
}

/// An IOVA in a step: a number, or the IOVA an earlier `map` step named got, plus an offset
/// (`"w"`, `"w+0x1000"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Iova {
    /// This address.
    At(u64),
    /// A named map's IOVA plus `plus`.
    Named {
        /// The name the map step gave (`as`).
        name: String,
        /// Added to it.
        plus: u64,
    },
}

impl From<u64> for Iova {
    fn from(v: u64) -> Iova {
        Iova::At(v)
    }
}

impl Iova {
    /// The address, if it is a number.
    pub fn fixed(&self) -> Option<u64> {
        match self {
            Iova::At(v) => Some(*v),
            Iova::Named { .. } => None,
        }
    }
}

impl Action {
    /// The `do` word.
    pub fn word(&self) -> &'static str {
        match self {
            Action::Open { .. } => "open",
            Action::Close { .. } => "close",
            Action::Bind { .. } => "bind",
            Action::Iommufd { .. } => "iommufd",
            Action::Feature { .. } => "feature",
            Action::Export { .. } => "export",
            Action::CloseFd { .. } => "close_fd",
            Action::Fdinfo { .. } => "fdinfo",
            Action::Seek { .. } => "seek",
            Action::Mmap { .. } => "mmap",
            Action::ConfigRead { .. } => "config_read",
            Action::ConfigWrite { .. } => "config_write",
            Action::Memory { .. } => "memory",
            Action::Power { .. } => "power",
            Action::Flr { .. } => "flr",
            Action::AfFlr { .. } => "af_flr",
            Action::Reset { .. } => "reset",
            Action::HotReset { .. } => "hot_reset",
            Action::Group { .. } => "group",
            Action::LowPower { .. } => "low_power",
            Action::IoasAlloc { .. } => "ioas",
            Action::Attach { .. } => "attach",
            Action::Map { .. } => "map",
            Action::MapUser { .. } => "map_user",
            Action::Unmap { .. } => "unmap",
            Action::IovaRanges { .. } => "iova_ranges",
            Action::Detach { .. } => "detach",
            Action::IoasDestroy { .. } => "ioas_destroy",
            Action::Dma { .. } => "dma",
            Action::RegionInfo { .. } => "region_info",
            Action::RegionRead { .. } => "region_read",
            Action::RegionWrite { .. } => "region_write",
            Action::CpuMap { .. } => "cpu_map",
            Action::CpuRead { .. } => "cpu_read",
            Action::CpuWrite { .. } => "cpu_write",
            Action::CpuUnmap { .. } => "cpu_unmap",
            Action::HotResetInfo { .. } => "hot_reset_info",
            Action::DeviceInfo { .. } => "device_info",
            Action::AllowIovas { .. } => "allow_iovas",
            Action::Ioeventfd { .. } => "ioeventfd",
            Action::Write { .. } => "write",
            Action::IrqInfo { .. } => "irq_info",
            Action::SetIrqs { .. } => "set_irqs",
            Action::Dup { .. } => "dup",
            Action::Settle { .. } => "settle",
            Action::Memfd { .. } => "memfd",
            Action::Udmabuf { .. } => "udmabuf",
            Action::Eventfd { .. } => "eventfd",
            Action::Read { .. } => "read",
        }
    }
}

/// The largest memfd a scenario may make (what the emulated machine backs with RAM).
pub const MEMFD_MAX: u64 = 64 << 20;

/// A capability, by ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// A standard capability (`PCI_CAP_ID_*`), found through the list at 0x34.
    Std(u8),
    /// An extended capability (`PCI_EXT_CAP_ID_*`), found through the list at 0x100.
    Ext(u16),
}

impl Cap {
    /// Its name in the scenario language (`pm`, `exp`, `aer`, …) or its ID.
    pub fn name(self) -> String {
        match self {
            Cap::Std(id) => CAP_NAMES
                .iter()
                .find(|(_, i)| *i == id)
                .map_or_else(|| format!("{id:#04x}"), |(n, _)| (*n).to_string()),
            Cap::Ext(id) => ECAP_NAMES.iter().find(|(_, i)| *i == id).map_or_else(
                || format!("extended {id:#06x}"),
                |(n, _)| format!("extended {n}"),
            ),
        }
    }
}

/// Where a config access goes: an offset, from the start of config space or of a capability
/// (found by walking its list through config reads, as a user would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigAt {
    /// The capability the offset is relative to.
    pub cap: Option<Cap>,
    /// The offset.
    pub offset: u16,
}

/// What a step must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Success without an fd.
    Ok,
    /// An fd; the fields given must match its fdinfo.
    Fd {
        /// `size`.
        size: Option<u64>,
        /// `count`.
        count: Option<u64>,
        /// `exp_name`.
        exp_name: Option<String>,
        /// `flags` (the file's open flags, with `O_CLOEXEC` when the fd has it).
        flags: Option<u32>,
    },
    /// This errno.
    Errno(Errno),
    /// The DMA's bytes are in the provider's memory (true) or not.
    Landed(bool),
    /// A config read gives this value (after the mask).
    Value(u64),
    /// The device lacks the capability a `power`, `flr` or `af_flr` step needs.
    NoCapability,
    /// A `seek` lands at this position.
    Position(u64),
    /// An `unmap` succeeds having unmapped this many bytes — other than the length it asked
    /// for (unmapping everything, `iova = 0` with `length = "0xffffffffffffffff"`).
    Unmapped(u64),
    /// A map without FIXED_IOVA succeeds at the IOVA the kernel chose (this one, if given).
    Iova(Option<u64>),
    /// `VFIO_DEVICE_GET_REGION_INFO` answers; the fields given must match.
    Region {
        /// `size`.
        size: Option<u64>,
        /// `flags`, as words (`read`, `write`, `mmap`, `caps`; `none` for 0).
        flags: Option<String>,
        /// `offset` in the device fd.
        offset: Option<u64>,
        /// The capability chain, as words (`sparse_mmap`, `type`, `msix_mappable`; `none`).
        caps: Option<String>,
    },
    /// A read gives these bytes.
    Read(Vec<u8>),
    /// A read gives this many bytes (whatever they are).
    ReadCount(u64),
    /// A `region_write` writes only this many bytes.
    Wrote(u64),
    /// A CPU access through a mapping dies of `SIGBUS`.
    Sigbus,
    /// Exactly this outcome (for the steps whose outcome is a list, such as
    /// `hot_reset_info`).
    Exactly(String),
    /// `IOMMU_IOAS_IOVA_RANGES` answers these ranges (inclusive) and this alignment.
    Ranges {
        /// The allowed ranges.
        ranges: Vec<(u64, u64)>,
        /// `out_iova_alignment`.
        alignment: u64,
    },
}

/// The outcome word of an `iova_ranges` step.
pub fn ranges_outcome(ranges: &[(u64, u64)], alignment: u64) -> String {
    let list: Vec<String> = ranges
        .iter()
        .map(|(a, b)| format!("{a:#x}-{b:#x}"))
        .collect();
    format!("ranges {} alignment {alignment:#x}", list.join(" "))
}

/// The words of `VFIO_REGION_INFO_FLAG_*` bits, as outcomes show them.
pub fn region_flag_words(flags: u32) -> String {
    flag_words(
        flags,
        &[(1, "read"), (2, "write"), (4, "mmap"), (8, "caps")],
    )
}

/// Flag bits as words (`names` covers the low four bits), any other bits as a number,
/// `none` for none.
pub fn flag_words(flags: u32, names: &[(u32, &str)]) -> String {
    let mut w: Vec<String> = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    let rest = flags & !0xf;
    if rest != 0 {
        w.push(format!("{rest:#x}"));
    }
    if w.is_empty() {
        "none".into()
    } else {
        w.join(",")
    }
}

/// The words of a region's capability IDs, as outcomes show them.
pub fn region_cap_words(caps: &[u16]) -> String {
    if caps.is_empty() {
        return "none".into();
    }
    caps.iter()
        .map(|c| match c {
            1 => "sparse_mmap".to_string(),
            2 => "type".to_string(),
            3 => "msix_mappable".to_string(),
            4 => "nvlink2_ssatgt".to_string(),
            5 => "nvlink2_lnkspd".to_string(),
            n => format!("{n}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The `key=value` fields of an outcome an expectation names (`None`: not named).
type KeyValues = Vec<(&'static str, Option<String>)>;

impl Expect {
    /// An expectation of an outcome made of a word and `key=value` fields (a new fd, a
    /// region's info): the word and the fields the expectation names, as outcomes show them.
    fn fields(&self) -> Option<(&'static str, KeyValues)> {
        match self {
            Expect::Fd {
                size,
                count,
                exp_name,
                flags,
            } => Some((
                "fd",
                vec![
                    ("size", size.map(|s| s.to_string())),
                    ("count", count.map(|c| c.to_string())),
                    ("exp_name", exp_name.clone()),
                    ("flags", flags.map(|x| format!("{x:#o}"))),
                ],
            )),
            Expect::Region {
                size,
                flags,
                offset,
                caps,
            } => Some((
                "region",
                vec![
                    ("size", size.map(|s| format!("{s:#x}"))),
                    ("flags", flags.clone()),
                    ("offset", offset.map(|o| format!("{o:#x}"))),
                    ("caps", caps.clone()),
                ],
            )),
            _ => None,
        }
    }

    /// Whether a step's outcome (see [`crate::run`](mod@crate::run)) is what this expects.
    pub fn matches(&self, outcome: &str) -> bool {
        match self {
            Expect::Ok => outcome == "ok",
            Expect::Errno(e) => e.name() == Some(outcome),
            Expect::Landed(true) => outcome == "landed",
            Expect::Landed(false) => outcome == "not landed",
            Expect::Value(v) => outcome == format!("{v:#06x}"),
            Expect::NoCapability => outcome.starts_with("no "),
            Expect::Position(p) => outcome == format!("position {p}"),
            Expect::Unmapped(n) => outcome == format!("unmapped {n:#x}"),
            Expect::Iova(None) => outcome.starts_with("iova 0x"),
            Expect::Iova(Some(v)) => outcome == format!("iova {v:#x}"),
            Expect::Ranges { ranges, alignment } => outcome == ranges_outcome(ranges, *alignment),
            Expect::Read(b) => outcome == format!("read {}", crate::run::hex(b)),
            Expect::ReadCount(n) => outcome == format!("read {n} bytes"),
            Expect::Wrote(n) => outcome == format!("wrote {n}"),
            Expect::Sigbus => outcome == "SIGBUS",
            Expect::Exactly(o) => outcome == o,
            Expect::Region { .. } | Expect::Fd { .. } => {
                let Some((word, pairs)) = self.fields() else {
                    return false;
                };
                let mut words = outcome.split(' ');
                if words.next() != Some(word) {
                    return false;
                }
                let kv: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
                pairs.iter().all(|(k, v)| {
                    v.as_deref()
                        .is_none_or(|v| kv.iter().any(|&(a, b)| a == *k && b == v))
                })
            }
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Ok => f.write_str("ok"),
            Expect::Errno(e) => f.write_str(e.name().unwrap_or("errno?")),
            Expect::Landed(true) => f.write_str("landed"),
            Expect::Landed(false) => f.write_str("not landed"),
            Expect::Value(v) => write!(f, "{v:#06x}"),
            Expect::NoCapability => f.write_str("no capability"),
            Expect::Position(p) => write!(f, "position {p}"),
            Expect::Unmapped(n) => write!(f, "unmapped {n:#x}"),
            Expect::Iova(None) => f.write_str("iova"),
            Expect::Iova(Some(v)) => write!(f, "iova {v:#x}"),
            Expect::Ranges { ranges, alignment } => {
                f.write_str(&ranges_outcome(ranges, *alignment))
            }
            Expect::Read(b) => write!(f, "read {}", crate::run::hex(b)),
            Expect::ReadCount(n) => write!(f, "read {n} bytes"),
            Expect::Wrote(n) => write!(f, "wrote {n}"),
            Expect::Sigbus => f.write_str("SIGBUS"),
            Expect::Exactly(o) => f.write_str(o),
            Expect::Region { .. } | Expect::Fd { .. } => {
                let Some((word, pairs)) = self.fields() else {
                    return Ok(());
                };
                f.write_str(word)?;
                for (k, v) in pairs {
                    if let Some(v) = v {
                        write!(f, " {k}={v}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// A scenario file that cannot be read: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// `file: step[N].key` or `file`.
    pub at: String,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.why)
    }
}

impl std::error::Error for FormatError {}

/// Reads a scenario file; its name is the file stem.
pub fn load_path(path: &Path) -> Result<Scenario, FormatError> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError {
        at: path.display().to_string(),
        why: e.to_string(),
    })?;
    let name = path
        .file_stem()
        .map_or_else(|| "scenario".into(), |s| s.to_string_lossy().into_owned());
    load_str(&text, &name)
}

/// Parses scenario text named `name`.
pub fn load_str(text: &str, name: &str) -> Result<Scenario, FormatError> {
    let top: Table = text.parse().map_err(|e: toml::de::Error| FormatError {
        at: name.into(),
        why: e.message().to_string(),
    })?;
    let mut f = Fields::new(top, name.to_string());
    let about = f.string("about")?;
    let pm = f.opt_bool("pm")?;
    let thp = f.opt_bool("thp")?;
    let group_path = f.opt_bool("group_path")?.unwrap_or(true);
    let steps_v = f.take("step").ok_or_else(|| f.err("step", "no [[step]]"))?;
    let bad_steps = f.err("step", "must be [[step]] tables");
    f.done()?;
    let Value::Array(items) = steps_v else {
        return Err(bad_steps);
    };
    let mut steps = Vec::new();
    for (i, v) in items.into_iter().enumerate() {
        let at = format!("{name}: step[{}]", i + 1);
        let Value::Table(t) = v else {
            return Err(FormatError {
                at,
                why: "must be a table".into(),
            });
        };
        steps.push(step(Fields::new(t, at))?);
    }
    if steps.is_empty() {
        return Err(FormatError {
            at: name.into(),
            why: "no steps".into(),
        });
    }
    Ok(Scenario {
        name: name.to_string(),
        about,
        steps,
        pm,
        thp,
        group_path,
    })
}

/// A table whose keys are taken one by one; [`Fields::done`] refuses whatever is left.
struct Fields {
    t: Table,
    at: String,
}

impl Fields {
    fn new(t: Table, at: String) -> Fields {
        Fields { t, at }
    }
    fn err(&self, key: &str, why: impl Into<String>) -> FormatError {
        FormatError {
            at: format!("{}.{key}", self.at),
            why: why.into(),
        }
    }
    fn take(&mut self, key: &str) -> Option<Value> {
        self.t.remove(key)
    }
    fn has(&self, key: &str) -> bool {
        self.t.contains_key(key)
    }
    fn opt_string(&mut self, key: &str) -> Result<Option<String>, FormatError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }
    fn string(&mut self, key: &str) -> Result<String, FormatError> {
        self.opt_string(key)?
            .ok_or_else(|| self.err(key, "missing"))
    }
    /// A list of strings (`groups = ["g1", "g2"]`), if given.
    fn opt_strings(&mut self, key: &str) -> Result<Option<Vec<String>>, FormatError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(self.err(key, "must be a list of names")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.err(key, "must be a list of names")),
        }
    }
    fn opt_num(&mut self, key: &str) -> Result<Option<u64>, FormatError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => num(&v).map(Some).map_err(|w| self.err(key, w)),
        }
    }
    fn num(&mut self, key: &str) -> Result<u64, FormatError> {
        self.opt_num(key)?.ok_or_else(|| self.err(key, "missing"))
    }
    fn opt_u32(&mut self, key: &str) -> Result<Option<u32>, FormatError> {
        match self.opt_num(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| self.err(key, "does not fit 32 bits")),
        }
    }
    /// A map step's `iova`, and whether its flags ask for a fixed IOVA: a fixed-IOVA map
    /// needs one, a kernel-chosen one may leave it out.
    fn map_iova(&mut self, flags: u32) -> Result<(Iova, bool), FormatError> {
        let fixed = flags & peerdma_uapi::backend::MAP_FIXED_IOVA != 0;
        match self.opt_iova()? {
            Some(v) => Ok((v, fixed)),
            None if !fixed => Ok((Iova::At(0), fixed)),
            None => Err(self.err("iova", "missing (a fixed-IOVA map needs one)")),
        }
    }
    /// The `iova` field, if given (see [`Iova`]).
    fn opt_iova(&mut self) -> Result<Option<Iova>, FormatError> {
        match self.take("iova") {
            None => Ok(None),
            Some(v) => iova(&v).map(Some).map_err(|w| self.err("iova", w)),
        }
    }

    fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, FormatError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(_) => Err(self.err(key, "must be true or false")),
        }
    }
    fn done(self) -> Result<(), FormatError> {
        match self.t.keys().next() {
            None => Ok(()),
            Some(k) => Err(self.err(k, "unknown key")),
        }
    }
}

/// A number: a non-negative integer, or a string — decimal, `0x` hex, or a size with a `K`,
/// `M`, `G` or `T` suffix; `_` separators allowed.
pub fn num(v: &Value) -> Result<u64, String> {
    match v {
        Value::Integer(i) => u64::try_from(*i).map_err(|_| format!("{i} is negative")),
        Value::String(s) => parse_num(s).ok_or_else(|| format!("{s:?} is not a number or size")),
        _ => Err("must be a number or a string like \"0x1000\" or \"4K\"".into()),
    }
}

fn parse_num(s: &str) -> Option<u64> {
    let t: String = s.trim().chars().filter(|&c| c != '_').collect();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    let (digits, shift) = match t.chars().last()? {
        'K' | 'k' => (&t[..t.len() - 1], 10),
        'M' => (&t[..t.len() - 1], 20),
        'G' => (&t[..t.len() - 1], 30),
        'T' => (&t[..t.len() - 1], 40),
        _ => (&t[..], 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let t: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '_')
        .collect();
    if t.len() % 2 != 0 {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Feature flags: a number, or a list of words (`get`, `set`, `probe`, `dma_buf`,
/// `low_power_entry`, `low_power_exit`, …) and numbers, OR-ed.
fn feature_flags(f: &Fields, key: &str, v: &Value) -> Result<u32, FormatError> {
    flag_bits(f, key, v, "feature flag", |w| {
        Some(match w {
            "get" => VFIO_DEVICE_FEATURE_GET,
            "set" => VFIO_DEVICE_FEATURE_SET,
            "probe" => VFIO_DEVICE_FEATURE_PROBE,
            "pci_vf_token" => 0,
            "migration" => 1,
            "mig_device_state" => 2,
            "low_power_entry" => 3,
            "low_power_entry_with_wakeup" => 4,
            "low_power_exit" => 5,
            "dma_logging_start" => 6,
            "bus_master" => 10,
            "dma_buf" => VFIO_DEVICE_FEATURE_DMA_BUF,
            _ => return None,
        })
    })
}

/// Flag bits under `key`: a number, a word `word` knows, or a list of them, ORed; anything
/// else is an unknown `what`.
fn flag_bits(
    f: &Fields,
    key: &str,
    v: &Value,
    what: &str,
    word: impl Fn(&str) -> Option<u32>,
) -> Result<u32, FormatError> {
    let one = |v: &Value| -> Result<u32, FormatError> {
        let w = match v {
            Value::String(s) => word(s),
            _ => None,
        };
        w.or_else(|| num(v).ok().and_then(|n| u32::try_from(n).ok()))
            .ok_or_else(|| f.err(key, format!("unknown {what} {v}")))
    };
    match v {
        Value::Array(a) => a.iter().try_fold(0, |acc, x| Ok(acc | one(x)?)),
        other => one(other),
    }
}

/// A memfd's `seals`: a list of words (`seal`, `shrink`, `grow`, `write`, `future_write`,
/// `exec`) and numbers, OR-ed; an empty list makes it sealable with no seal.
fn memfd_seals(f: &Fields, v: &Value) -> Result<u32, FormatError> {
    if !matches!(v, Value::Array(_)) {
        return Err(f.err("seals", "a list of seal words"));
    }
    flag_bits(f, "seals", v, "seal", |w| {
        Some(match w {
            "seal" => 0x1,
            "shrink" => 0x2,
            "grow" => 0x4,
            "write" => 0x8,
            "future_write" => 0x10,
            "exec" => 0x20,
            _ => return None,
        })
    })
}

/// The data a `set_irqs` step passes after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IrqData {
    /// None.
    None,
    /// One byte per vector.
    Bools(Vec<u8>),
    /// One fd per vector: a name of an earlier step's fd, or a number as it is (−1).
    Fds(Vec<FdArg>),
}

/// An fd a step passes: by name, or a raw number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdArg {
    /// The fd an earlier step named.
    Named(String),
    /// This number.
    Raw(i32),
}

/// An fd a step passes: a name, or a number that fits an `int`.
fn fd_arg(v: &Value) -> Option<FdArg> {
    match v {
        Value::String(n) => Some(FdArg::Named(n.clone())),
        Value::Integer(n) => i32::try_from(*n).ok().map(FdArg::Raw),
        _ => None,
    }
}

/// `index` of an IRQ step: a word or a number.
fn irq_index(f: &mut Fields) -> Result<u32, FormatError> {
    match f.take("index") {
        None => Err(f.err("index", "missing")),
        Some(Value::String(s)) => match s.as_str() {
            "intx" => Ok(0),
            "msi" => Ok(1),
            "msix" => Ok(2),
            "err" => Ok(3),
            "req" => Ok(4),
            _ => Err(f.err("index", "intx, msi, msix, err, req or a number")),
        },
        Some(v) => num(&v)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| f.err("index", "intx, msi, msix, err, req or a number")),
    }
}

/// `flags` of a `set_irqs` step: words (`none`, `bool`, `eventfd`, `mask`, `unmask`,
/// `trigger`) or numbers, ORed.
fn irq_flags(f: &Fields, v: &Value) -> Result<u32, FormatError> {
    flag_bits(f, "flags", v, "IRQ flag", |w| {
        Some(match w {
            "none" => 1,
            "bool" => 2,
            "eventfd" => 4,
            "mask" => 8,
            "unmask" => 16,
            "trigger" => 32,
            _ => return None,
        })
    })
}

/// Builds an action from its one name.
type OneName = fn(String) -> Action;

#[allow(clippy::many_single_char_names)]
fn expect(f: &mut Fields, default: Option<Expect>) -> Result<Expect, FormatError> {
    let Some(v) = f.take("expect") else {
        return default.ok_or_else(|| f.err("expect", "missing (this step has no default)"));
    };
    match v {
        Value::String(s) => match s.as_str() {
            "ok" => Ok(Expect::Ok),
            "fd" => Ok(Expect::Fd {
                size: None,
                count: None,
                exp_name: None,
                flags: None,
            }),
            "landed" => Ok(Expect::Landed(true)),
            "not_landed" | "not landed" => Ok(Expect::Landed(false)),
            "no_capability" => Ok(Expect::NoCapability),
            "iova" => Ok(Expect::Iova(None)),
            "SIGBUS" | "sigbus" => Ok(Expect::Sigbus),
            other => Errno::from_name(other).map(Expect::Errno).ok_or_else(|| {
                f.err(
                    "expect",
                    format!("{other:?}: not ok, fd, landed, not_landed or an errno name"),
                )
            }),
        },
        Value::Table(t) => {
            let mut e = Fields::new(t, format!("{}.expect", f.at));
            if let Some(p) = e.opt_num("position")? {
                e.done()?;
                return Ok(Expect::Position(p));
            }
            if let Some(n) = e.opt_num("unmapped")? {
                e.done()?;
                return Ok(Expect::Unmapped(n));
            }
            if let Some(n) = e.opt_num("iova")? {
                e.done()?;
                return Ok(Expect::Iova(Some(n)));
            }
            if let Some(v) = e.take("ranges") {
                let bad = || e.err("ranges", "a list of [first, last] pairs");
                let Value::Array(list) = v else {
                    return Err(bad());
                };
                let mut ranges = Vec::new();
                for p in list {
                    let Value::Array(p) = p else {
                        return Err(bad());
                    };
                    let [a, b] = p.as_slice() else {
                        return Err(bad());
                    };
                    ranges.push((num(a).map_err(|_| bad())?, num(b).map_err(|_| bad())?));
                }
                let alignment = e
                    .opt_num("alignment")?
                    .ok_or_else(|| e.err("alignment", "missing"))?;
                e.done()?;
                return Ok(Expect::Ranges { ranges, alignment });
            }
            if let Some(v) = e.opt_num("value")? {
                e.done()?;
                return Ok(Expect::Value(v));
            }
            if let Some(h) = e.opt_string("read")? {
                let b = hex_bytes(&h).ok_or_else(|| e.err("read", "not hex bytes"))?;
                e.done()?;
                return Ok(Expect::Read(b));
            }
            if let Some(n) = e.opt_num("read_count")? {
                e.done()?;
                return Ok(Expect::ReadCount(n));
            }
            if let Some(o) = e.opt_string("outcome")? {
                e.done()?;
                return Ok(Expect::Exactly(o));
            }
            if let Some(n) = e.opt_num("wrote")? {
                e.done()?;
                return Ok(Expect::Wrote(n));
            }
            if e.opt_bool("region")? == Some(true) {
                let words = |e: &mut Fields, k: &str| -> Result<Option<String>, FormatError> {
                    match e.take(k) {
                        None => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s)),
                        Some(Value::Array(a)) => {
                            let w: Option<Vec<String>> =
                                a.iter().map(|v| v.as_str().map(str::to_string)).collect();
                            let w = w.ok_or_else(|| e.err(k, "a list of words"))?;
                            Ok(Some(if w.is_empty() {
                                "none".into()
                            } else {
                                w.join(",")
                            }))
                        }
                        Some(_) => Err(e.err(k, "a word or a list of words")),
                    }
                };
                let r = Expect::Region {
                    size: e.opt_num("size")?,
                    flags: words(&mut e, "flags")?,
                    offset: e.opt_num("offset")?,
                    caps: words(&mut e, "caps")?,
                };
                e.done()?;
                return Ok(r);
            }
            let fd = e.opt_bool("fd")?;
            if fd == Some(false) {
                return Err(e.err("fd", "say the errno instead of fd = false"));
            }
            let r = Expect::Fd {
                size: e.opt_num("size")?,
                count: e.opt_num("count")?,
                exp_name: e.opt_string("exp_name")?,
                flags: e.opt_u32("flags")?,
            };
            e.done()?;
            Ok(r)
        }
        _ => Err(f.err("expect", "must be a string or a table")),
    }
}

/// An IOVA field: a number, or `name` / `name+N` for the IOVA a named map got.
fn iova(v: &Value) -> Result<Iova, String> {
    if let Ok(n) = num(v) {
        return Ok(Iova::At(n));
    }
    let Value::String(s) = v else {
        return Err("a number or the name of an earlier map".into());
    };
    let (name, plus) = match s.split_once('+') {
        Some((n, p)) => (n, num(&Value::String(p.trim().to_string()))?),
        None => (s.as_str(), 0),
    };
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{s:?}: a number, or a map's name with an optional +offset"
        ));
    }
    Ok(Iova::Named {
        name: name.to_string(),
        plus,
    })
}

/// A `region`: `bar0`…`bar5`, `rom`, `config`, `vga`, or an index.
fn region_index(f: &mut Fields) -> Result<u32, FormatError> {
    let v = f.take("region").ok_or_else(|| f.err("region", "missing"))?;
    if let Value::String(s) = &v {
        let named = match s.as_str() {
            "bar0" => Some(0),
            "bar1" => Some(1),
            "bar2" => Some(2),
            "bar3" => Some(3),
            "bar4" => Some(4),
            "bar5" => Some(5),
            "rom" => Some(6),
            "config" => Some(7),
            "vga" => Some(8),
            _ => None,
        };
        if let Some(n) = named {
            return Ok(n);
        }
    }
    num(&v)
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n < 1 << 23)
        .ok_or_else(|| {
            f.err(
                "region",
                "bar0 to bar5, rom, config, vga, or an index below 2^23",
            )
        })
}

/// The bytes a write step writes: `data` (hex), or `value` in `size` bytes (little-endian,
/// default 4).
fn write_data(f: &mut Fields, most: usize) -> Result<Vec<u8>, FormatError> {
    let data = match (f.opt_string("data")?, f.opt_num("value")?) {
        (Some(_), Some(_)) => return Err(f.err("value", "give data or value, not both")),
        (Some(h), None) => hex_bytes(&h).ok_or_else(|| f.err("data", "not hex bytes"))?,
        (None, Some(v)) => {
            let size = match f.opt_num("size")?.unwrap_or(4) {
                n @ 1..=8 => n as usize,
                _ => return Err(f.err("size", "1 to 8 bytes")),
            };
            if size < 8 && v >> (8 * size) != 0 {
                return Err(f.err("value", format!("does not fit {size} byte(s)")));
            }
            v.to_le_bytes()[..size].to_vec()
        }
        (None, None) => return Err(f.err("data", "missing (data = \"hex\" or value)")),
    };
    if data.is_empty() || data.len() > most {
        return Err(f.err("data", format!("1 to {most} bytes")));
    }
    Ok(data)
}

/// A `size` of 1, 2 or 4 bytes (default 2) for `power` and `flr`.
fn access_size(f: &mut Fields) -> Result<usize, FormatError> {
    match f.opt_num("size")?.unwrap_or(2) {
        n @ (1 | 2 | 4) => Ok(n as usize),
        _ => Err(f.err("size", "1, 2 or 4")),
    }
}

/// `offset` (a number, or `"command"`), relative to `cap` or `ecap` when one is given.
fn config_at(f: &mut Fields) -> Result<ConfigAt, FormatError> {
    let cap = match (f.take("cap"), f.take("ecap")) {
        (Some(_), Some(_)) => return Err(f.err("ecap", "give cap or ecap, not both")),
        (Some(v), None) => Some(cap_id(&v, false).map_err(|w| f.err("cap", w))?),
        (None, Some(v)) => Some(cap_id(&v, true).map_err(|w| f.err("ecap", w))?),
        (None, None) => None,
    };
    let offset = match f.take("offset") {
        Some(Value::String(s)) if s == "command" && cap.is_none() => {
            u64::from(peerdma_pci::regs::COMMAND)
        }
        Some(v) => num(&v).map_err(|w| f.err("offset", w))?,
        None if cap.is_some() => 0,
        None => return Err(f.err("offset", "missing")),
    };
    let limit = if matches!(cap, Some(Cap::Ext(_))) {
        0x1000
    } else {
        0x100
    };
    if cap.is_some() && offset >= limit {
        return Err(f.err(
            "offset",
            format!("past the capability's space ({limit:#x})"),
        ));
    }
    let offset = u16::try_from(offset).map_err(|_| f.err("offset", "past 64 KiB"))?;
    Ok(ConfigAt { cap, offset })
}

/// Standard capability names (`PCI_CAP_ID_*`).
pub const CAP_NAMES: &[(&str, u8)] = &[
    ("pm", 0x01),
    ("agp", 0x02),
    ("vpd", 0x03),
    ("slotid", 0x04),
    ("msi", 0x05),
    ("chswp", 0x06),
    ("pcix", 0x07),
    ("ht", 0x08),
    ("vndr", 0x09),
    ("dbg", 0x0a),
    ("ccrc", 0x0b),
    ("shpc", 0x0c),
    ("ssvid", 0x0d),
    ("agp3", 0x0e),
    ("secdev", 0x0f),
    ("exp", 0x10),
    ("msix", 0x11),
    ("sata", 0x12),
    ("af", 0x13),
    ("ea", 0x14),
];

/// Extended capability names (`PCI_EXT_CAP_ID_*`).
pub const ECAP_NAMES: &[(&str, u16)] = &[
    ("aer", 0x01),
    ("vc", 0x02),
    ("dsn", 0x03),
    ("pwr", 0x04),
    ("rclink", 0x05),
    ("rcilink", 0x06),
    ("rcec", 0x07),
    ("mfvc", 0x08),
    ("vc9", 0x09),
    ("rcrb", 0x0a),
    ("vndr", 0x0b),
    ("cac", 0x0c),
    ("acs", 0x0d),
    ("ari", 0x0e),
    ("ats", 0x0f),
    ("sriov", 0x10),
    ("mriov", 0x11),
    ("mcast", 0x12),
    ("pri", 0x13),
    ("amd_xxx", 0x14),
    ("rebar", 0x15),
    ("dpa", 0x16),
    ("tph", 0x17),
    ("ltr", 0x18),
    ("secpci", 0x19),
    ("pmux", 0x1a),
    ("pasid", 0x1b),
    ("dpc", 0x1d),
    ("l1ss", 0x1e),
    ("ptm", 0x1f),
    ("dvsec", 0x23),
    ("dlf", 0x25),
    ("pl_16gt", 0x26),
    ("doe", 0x2e),
];

fn cap_id(v: &Value, ext: bool) -> Result<Cap, String> {
    if let Value::String(s) = v {
        let hit = if ext {
            ECAP_NAMES
                .iter()
                .find(|(n, _)| n == s)
                .map(|&(_, id)| Cap::Ext(id))
        } else {
            CAP_NAMES
                .iter()
                .find(|(n, _)| n == s)
                .map(|&(_, id)| Cap::Std(id))
        };
        if let Some(c) = hit {
            return Ok(c);
        }
    }
    let n = num(v).map_err(|_| {
        let names: Vec<&str> = if ext {
            ECAP_NAMES.iter().map(|(n, _)| *n).collect()
        } else {
            CAP_NAMES.iter().map(|(n, _)| *n).collect()
        };
        format!("a capability ID or one of {}", names.join(", "))
    })?;
    if ext {
        u16::try_from(n)
            .map(Cap::Ext)
            .map_err(|_| "past 16 bits".into())
    } else {
        u8::try_from(n)
            .map(Cap::Std)
            .map_err(|_| "past 8 bits".into())
    }
}

fn step(mut f: Fields) -> Result<Step, FormatError> {
    let dmesg = f.opt_string("dmesg")?;
    if dmesg.as_deref() == Some("") {
        return Err(f.err("dmesg", "say what text the kernel must print"));
    }
    let process = f.opt_string("process")?;
    if process.as_deref() == Some("") {
        return Err(f.err("process", "name the process"));
    }
    let mut s = step_fields(f)?;
    s.dmesg = dmesg;
    s.process = process;
    Ok(s)
}

fn step_fields(mut f: Fields) -> Result<Step, FormatError> {
    let word = f.string("do")?;
    let ok = Some(Expect::Ok);
    let fd = Some(Expect::Fd {
        size: None,
        count: None,
        exp_name: None,
        flags: None,
    });
    // The actions that take one name and nothing else.
    let single: Option<(&str, OneName, Option<Expect>)> = match word.as_str() {
        "close" => Some(("dev", |dev| Action::Close { dev }, ok.clone())),
        "af_flr" => Some(("dev", |dev| Action::AfFlr { dev }, ok.clone())),
        "reset" => Some(("dev", |dev| Action::Reset { dev }, ok.clone())),
        "close_fd" => Some(("fd", |fd| Action::CloseFd { fd }, ok.clone())),
        "detach" => Some(("dev", |dev| Action::Detach { dev }, ok.clone())),
        "ioas_destroy" => Some(("ioas", |ioas| Action::IoasDestroy { ioas }, ok.clone())),
        "fdinfo" => Some(("fd", |fd| Action::Fdinfo { fd }, fd.clone())),
        _ => None,
    };
    if let Some((key, make, default)) = single {
        let action = make(f.string(key)?);
        let expect = expect(&mut f, default)?;
        f.done()?;
        return Ok(Step {
            action,
            expect,
            dmesg: None,
            process: None,
        });
    }
    let (action, default) = match word.as_str() {
        "open" => {
            let path = match f.opt_string("path")?.as_deref() {
                None | Some("cdev") => OpenPath::CdevIommufd,
                Some("group") => OpenPath::GroupContainer,
                Some(p) => return Err(f.err("path", format!("{p:?}: cdev or group"))),
            };
            let path = match (f.opt_bool("bind")?, path) {
                (None | Some(true), p) => p,
                (Some(false), OpenPath::CdevIommufd) => OpenPath::CdevUnbound,
                (Some(false), _) => {
                    return Err(f.err("bind", "only a cdev opens unbound (path = \"cdev\")"));
                }
            };
            let iommufd = f.opt_string("iommufd")?;
            if iommufd.is_some() && path != OpenPath::CdevIommufd {
                return Err(f.err("iommufd", "only a cdev opened bound binds to an iommufd"));
            }
            (
                Action::Open {
                    role: f.string("dev")?,
                    name: f.string("as")?,
                    path,
                    iommufd,
                },
                ok,
            )
        }
        "bind" => (
            Action::Bind {
                dev: f.string("dev")?,
                iommufd: f.opt_string("iommufd")?,
            },
            ok,
        ),
        "iommufd" => (
            Action::Iommufd {
                name: f.string("as")?,
            },
            ok,
        ),
        "feature" => {
            let dev = f.string("dev")?;
            let fv = f.take("flags").ok_or_else(|| f.err("flags", "missing"))?;
            let flags = feature_flags(&f, "flags", &fv)?;
            let argsz = f.opt_u32("argsz")?;
            let data = match f.opt_string("data")? {
                None => Vec::new(),
                Some(h) => hex_bytes(&h).ok_or_else(|| f.err("data", "not hex bytes"))?,
            };
            let name = f.opt_string("as")?;
            (
                Action::Feature {
                    dev,
                    flags,
                    argsz,
                    data,
                    name,
                },
                ok,
            )
        }
        "export" => {
            let dev = f.string("dev")?;
            let region = f.opt_u32("region")?.unwrap_or(2);
            let ranges = match f.take("ranges") {
                None => Vec::new(),
                Some(Value::Array(a)) => {
                    let mut out = Vec::new();
                    for r in &a {
                        let pair = match r {
                            Value::Array(p) if p.len() == 2 => p,
                            _ => return Err(f.err("ranges", "each range is [offset, length]")),
                        };
                        let o = num(&pair[0]).map_err(|w| f.err("ranges", w))?;
                        let l = num(&pair[1]).map_err(|w| f.err("ranges", w))?;
                        out.push((o, l));
                    }
                    out
                }
                Some(_) => return Err(f.err("ranges", "must be a list of [offset, length]")),
            };
            let mut req = DmaBufRequest::new(region, ranges);
            if let Some(v) = f.take("feature") {
                req.feature_flags = feature_flags(&f, "feature", &v)?;
            }
            if let Some(n) = f.opt_u32("nr_ranges")? {
                req.nr_ranges = Some(n);
            }
            if let Some(n) = f.opt_u32("flags")? {
                req.flags = n;
            }
            if let Some(n) = f.opt_u32("argsz")? {
                req.argsz = Some(n);
            }
            if let Some(c) = f.opt_bool("cloexec")? {
                req.open_flags = O_RDWR | if c { O_CLOEXEC } else { 0 };
            }
            if let Some(n) = f.opt_u32("open_flags")? {
                req.open_flags = n;
            }
            (
                Action::Export {
                    dev,
                    req,
                    name: f.opt_string("as")?,
                },
                fd,
            )
        }
        "seek" => {
            let fd = f.string("fd")?;
            let offset = match f.take("offset") {
                None => 0,
                Some(Value::Integer(i)) => i,
                Some(_) => return Err(f.err("offset", "must be an integer")),
            };
            let whence = match f.opt_string("whence")?.as_deref() {
                None | Some("set") => 0,
                Some("cur") => 1,
                Some("end") => 2,
                Some("data") => 3,
                Some("hole") => 4,
                Some(w) => {
                    return Err(f.err("whence", format!("{w:?}: set, cur, end, data or hole")));
                }
            };
            (Action::Seek { fd, offset, whence }, None)
        }
        "mmap" => (
            Action::Mmap {
                fd: f.string("fd")?,
                offset: f.opt_num("offset")?.unwrap_or(0),
                length: f.opt_num("length")?.unwrap_or(4096),
            },
            ok,
        ),
        "config_read" | "config_write" => {
            let dev = f.string("dev")?;
            let at = config_at(&mut f)?;
            let size = f.opt_num("size")?.unwrap_or(2);
            let size = match size {
                1..=8 => size as usize,
                _ => return Err(f.err("size", "1 to 8 bytes")),
            };
            if word == "config_read" {
                let mask = f.opt_num("mask")?.unwrap_or(u64::MAX);
                (
                    Action::ConfigRead {
                        dev,
                        at,
                        size,
                        mask,
                    },
                    None,
                )
            } else {
                let value = f
                    .opt_num("value")?
                    .ok_or_else(|| f.err("value", "missing"))?;
                if size < 8 && value >> (8 * size) != 0 {
                    return Err(f.err("value", format!("does not fit {size} byte(s)")));
                }
                (
                    Action::ConfigWrite {
                        dev,
                        at,
                        size,
                        value,
                    },
                    ok,
                )
            }
        }
        "flr" => {
            let dev = f.string("dev")?;
            let size = access_size(&mut f)?;
            (Action::Flr { dev, size }, ok)
        }
        "memory" => (
            Action::Memory {
                dev: f.string("dev")?,
                on: f.opt_bool("on")?.ok_or_else(|| f.err("on", "missing"))?,
            },
            ok,
        ),
        "power" => {
            let dev = f.string("dev")?;
            let state = match f.string("state")?.as_str() {
                "D0" => 0,
                "D1" => 1,
                "D2" => 2,
                "D3hot" => 3,
                s => return Err(f.err("state", format!("{s:?}: D0, D1, D2 or D3hot"))),
            };
            let size = access_size(&mut f)?;
            (Action::Power { dev, state, size }, ok)
        }
        "low_power" => {
            let dev = f.string("dev")?;
            let enter = f
                .opt_bool("enter")?
                .ok_or_else(|| f.err("enter", "missing"))?;
            let wakeup = f.opt_bool("wakeup")?.unwrap_or(false);
            if wakeup && !enter {
                return Err(f.err("wakeup", "only an entry takes a wakeup eventfd"));
            }
            let reserved = f.opt_u32("reserved")?.unwrap_or(0);
            if reserved != 0 && !wakeup {
                return Err(f.err("reserved", "only a wakeup entry has a reserved word"));
            }
            let eventfd = f.opt_string("eventfd")?;
            if eventfd.is_some() && !wakeup {
                return Err(f.err("eventfd", "only a wakeup entry takes an eventfd"));
            }
            (
                Action::LowPower {
                    dev,
                    enter,
                    wakeup,
                    reserved,
                    eventfd,
                },
                ok,
            )
        }
        "dup" => (
            Action::Dup {
                fd: f.string("fd")?,
                name: f.string("as")?,
            },
            fd.clone(),
        ),
        "memfd" => {
            let size = f.num("size")?;
            if size > MEMFD_MAX {
                return Err(f.err("size", "at most 64 MiB"));
            }
            let seals = match f.take("seals") {
                None => None,
                Some(v) => Some(memfd_seals(&f, &v)?),
            };
            (
                Action::Memfd {
                    size,
                    seals,
                    name: f.string("as")?,
                },
                ok,
            )
        }
        "udmabuf" => {
            let memfd = f
                .take("memfd")
                .as_ref()
                .and_then(fd_arg)
                .ok_or_else(|| f.err("memfd", "an fd name or a number"))?;
            (
                Action::Udmabuf {
                    memfd,
                    flags: f.opt_u32("flags")?.unwrap_or(1),
                    offset: f.opt_num("offset")?.unwrap_or(0),
                    size: f.num("size")?,
                    name: f.string("as")?,
                },
                fd.clone(),
            )
        }
        "settle" => {
            let ms = f.opt_num("ms")?.unwrap_or(100);
            if !(1..=1000).contains(&ms) {
                return Err(f.err("ms", "1 to 1000 milliseconds"));
            }
            (Action::Settle { ms: ms as u32 }, ok)
        }
        "eventfd" => (
            Action::Eventfd {
                name: f.string("as")?,
            },
            ok,
        ),
        "read" => {
            let fd = f.string("fd")?;
            let size = f.opt_num("size")?.unwrap_or(8);
            let size = usize::try_from(size)
                .ok()
                .filter(|&n| n <= 4096)
                .ok_or_else(|| f.err("size", "at most 4096 bytes"))?;
            let expect = expect(&mut f, None)?;
            f.done()?;
            let show = matches!(expect, Expect::Read(_));
            return Ok(Step {
                action: Action::Read { fd, size, show },
                expect,
                dmesg: None,
                process: None,
            });
        }
        "ioas" => (
            Action::IoasAlloc {
                name: f.string("as")?,
                iommufd: f.opt_string("iommufd")?,
            },
            ok,
        ),
        "attach" => (
            Action::Attach {
                dev: f.string("dev")?,
                ioas: f.string("ioas")?,
            },
            ok,
        ),
        "map" => {
            let ioas = f.string("ioas")?;
            let fd = f.string("fd")?;
            let start = f.opt_num("start")?.unwrap_or(0);
            let length = f.num("length")?;
            let flags = f.opt_u32("flags")?.unwrap_or(7);
            let (iova, fixed) = f.map_iova(flags)?;
            let name = f.opt_string("as")?;
            let default = if fixed { ok } else { Some(Expect::Iova(None)) };
            (
                Action::Map {
                    ioas,
                    fd,
                    start,
                    length,
                    iova,
                    flags,
                    name,
                },
                default,
            )
        }
        "map_user" => {
            let ioas = f.string("ioas")?;
            let memfd = f.opt_string("memfd")?;
            let read_only = f.opt_bool("read_only")?.unwrap_or(false);
            let offset = f.opt_num("offset")?.unwrap_or(0);
            let length = f.num("length")?;
            let flags = f.opt_u32("flags")?.unwrap_or(7);
            let reserved = f.opt_u32("reserved")?.unwrap_or(0);
            let (iova, fixed) = f.map_iova(flags)?;
            // The address must lie in the reservation (memfd and guard), or the kernel could
            // find other memory of the process there; a pin from it stops in the guard at
            // the latest, whatever the length. A length whose end may or may not wrap
            // depending on where the real mmap put the memory is refused too: below
            // 2^64 - 2^47 it never wraps (user addresses are below 2^47), above
            // 2^64 - 2^16 it always does.
            if offset > peerdma_uapi::backend::USER_GUARD {
                return Err(f.err(
                    "offset",
                    "must lie within the 64 MiB the mapping reserves after the memfd",
                ));
            }
            if length > u64::MAX - (1 << 47) && length <= u64::MAX - (1 << 16) {
                return Err(f.err(
                    "length",
                    "between 2^64 - 2^47 and 2^64 - 2^16 whether the end wraps depends on the address",
                ));
            }
            let name = f.opt_string("as")?;
            let default = if fixed { ok } else { Some(Expect::Iova(None)) };
            (
                Action::MapUser {
                    ioas,
                    memfd,
                    read_only,
                    offset,
                    length,
                    iova,
                    flags,
                    reserved,
                    name,
                },
                default,
            )
        }
        "unmap" => {
            let ioas = f.string("ioas")?;
            let iova = f.opt_iova()?.ok_or_else(|| f.err("iova", "missing"))?;
            (
                Action::Unmap {
                    ioas,
                    iova,
                    length: f.num("length")?,
                },
                ok,
            )
        }
        "allow_iovas" => {
            let ioas = f.string("ioas")?;
            let bad = || "a list of [start, last] pairs";
            let ranges = match f.take("ranges") {
                None => Vec::new(),
                Some(Value::Array(a)) => {
                    let mut out = Vec::new();
                    for p in &a {
                        let Value::Array(pair) = p else {
                            return Err(f.err("ranges", bad()));
                        };
                        if pair.len() != 2 {
                            return Err(f.err("ranges", bad()));
                        }
                        let s = num(&pair[0]).map_err(|w| f.err("ranges", w))?;
                        let l = num(&pair[1]).map_err(|w| f.err("ranges", w))?;
                        out.push((s, l));
                    }
                    out
                }
                Some(_) => return Err(f.err("ranges", bad())),
            };
            let reserved = f.opt_u32("reserved")?.unwrap_or(0);
            (
                Action::AllowIovas {
                    ioas,
                    ranges,
                    reserved,
                },
                ok,
            )
        }
        "iova_ranges" => {
            let ioas = f.string("ioas")?;
            let room = f.opt_u32("room")?.unwrap_or(8);
            (Action::IovaRanges { ioas, room }, None)
        }
        "dma" => {
            let dev = f.string("dev")?;
            let iova = f.opt_iova()?.ok_or_else(|| f.err("iova", "missing"))?;
            let off = match &iova {
                Iova::At(v) | Iova::Named { plus: v, .. } => *v,
            };
            if off % crate::run::PATTERN_LEN != 0 {
                return Err(f.err("iova", "must be 16-byte aligned"));
            }
            (Action::Dma { dev, iova }, None)
        }
        "region_info" => (
            Action::RegionInfo {
                dev: f.string("dev")?,
                region: region_index(&mut f)?,
            },
            None,
        ),
        "region_read" => {
            let dev = f.string("dev")?;
            let region = region_index(&mut f)?;
            let offset = f.opt_num("offset")?.unwrap_or(0);
            let size = f.num("size")?;
            let size = usize::try_from(size)
                .ok()
                .filter(|&n| n <= 1 << 20)
                .ok_or_else(|| f.err("size", "at most 1 MiB"))?;
            let expect = expect(&mut f, None)?;
            f.done()?;
            let show = matches!(expect, Expect::Read(_));
            return Ok(Step {
                action: Action::RegionRead {
                    dev,
                    region,
                    offset,
                    size,
                    show,
                },
                expect,
                dmesg: None,
                process: None,
            });
        }
        "region_write" => {
            let dev = f.string("dev")?;
            let region = region_index(&mut f)?;
            let offset = f.opt_num("offset")?.unwrap_or(0);
            let data = write_data(&mut f, 1 << 20)?;
            (
                Action::RegionWrite {
                    dev,
                    region,
                    offset,
                    data,
                },
                ok,
            )
        }
        "cpu_map" => (
            Action::CpuMap {
                dev: f.string("dev")?,
                region: region_index(&mut f)?,
                offset: f.opt_num("offset")?.unwrap_or(0),
                length: f.opt_num("length")?.unwrap_or(4096),
                shared: f.opt_bool("shared")?.unwrap_or(true),
                name: f.string("as")?,
            },
            ok,
        ),
        "cpu_read" => {
            let map = f.string("map")?;
            let offset = f.opt_num("offset")?.unwrap_or(0);
            let size = match f.opt_num("size")?.unwrap_or(4) {
                n @ (1 | 2 | 4 | 8) => n as usize,
                _ => return Err(f.err("size", "1, 2, 4 or 8")),
            };
            let expect = expect(&mut f, None)?;
            f.done()?;
            let show = matches!(expect, Expect::Read(_));
            return Ok(Step {
                action: Action::CpuRead {
                    map,
                    offset,
                    size,
                    show,
                },
                expect,
                dmesg: None,
                process: None,
            });
        }
        "cpu_write" => {
            let map = f.string("map")?;
            let offset = f.opt_num("offset")?.unwrap_or(0);
            let data = write_data(&mut f, 8)?;
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                return Err(f.err("data", "1, 2, 4 or 8 bytes"));
            }
            (Action::CpuWrite { map, offset, data }, ok)
        }
        "cpu_unmap" => (
            Action::CpuUnmap {
                map: f.string("map")?,
            },
            ok,
        ),
        "hot_reset" => (
            Action::HotReset {
                dev: f.string("dev")?,
                groups: f.opt_strings("groups")?,
            },
            ok,
        ),
        "group" => (
            Action::Group {
                dev: f.string("dev")?,
                name: f.string("as")?,
            },
            ok,
        ),
        "ioeventfd" => {
            let dev = f.string("dev")?;
            let region = if f.has("region") {
                region_index(&mut f)?
            } else {
                0
            };
            let offset = f.opt_num("offset")?.unwrap_or(0);
            let flags = match (f.opt_num("size")?, f.opt_u32("flags")?) {
                (Some(_), Some(_)) => return Err(f.err("flags", "give size or flags, not both")),
                (Some(n @ (1 | 2 | 4 | 8)), None) => n as u32,
                (Some(_), None) => return Err(f.err("size", "1, 2, 4 or 8")),
                (None, Some(fl)) => fl,
                (None, None) => 4,
            };
            let data = f.opt_num("data")?.unwrap_or(0);
            let fd = match f.take("fd") {
                None => FdArg::Raw(-1),
                Some(v) => fd_arg(&v).ok_or_else(|| f.err("fd", "an fd name or a number"))?,
            };
            let argsz = f.opt_u32("argsz")?.unwrap_or(32);
            (
                Action::Ioeventfd {
                    dev,
                    region,
                    offset,
                    flags,
                    data,
                    fd,
                    argsz,
                },
                ok,
            )
        }
        "write" => {
            let fd = f.string("fd")?;
            let data = match f.opt_num("value")? {
                Some(v) if !f.has("data") => v.to_le_bytes().to_vec(),
                Some(_) => return Err(f.err("value", "give data or value, not both")),
                None => {
                    let h = f.string("data")?;
                    hex_bytes(&h).ok_or_else(|| f.err("data", "not hex bytes"))?
                }
            };
            (Action::Write { fd, data }, ok)
        }
        "device_info" => (
            Action::DeviceInfo {
                dev: f.string("dev")?,
                argsz: f.opt_u32("argsz")?.unwrap_or(24),
            },
            None,
        ),
        "irq_info" => (
            Action::IrqInfo {
                dev: f.string("dev")?,
                index: irq_index(&mut f)?,
                argsz: f.opt_u32("argsz")?.unwrap_or(16),
            },
            None,
        ),
        "set_irqs" => {
            let dev = f.string("dev")?;
            let index = irq_index(&mut f)?;
            let fv = f.take("flags").ok_or_else(|| f.err("flags", "missing"))?;
            let flags = irq_flags(&f, &fv)?;
            let start = f.opt_u32("start")?.unwrap_or(0);
            let data = match (f.take("bools"), f.take("fds")) {
                (Some(_), Some(_)) => return Err(f.err("fds", "give bools or fds, not both")),
                (Some(Value::Array(a)), None) => IrqData::Bools(
                    a.iter()
                        .map(|v| num(v).ok().and_then(|n| u8::try_from(n).ok()))
                        .collect::<Option<Vec<u8>>>()
                        .ok_or_else(|| f.err("bools", "a list of bytes"))?,
                ),
                (None, Some(Value::Array(a))) => IrqData::Fds(
                    a.iter()
                        .map(fd_arg)
                        .collect::<Option<Vec<FdArg>>>()
                        .ok_or_else(|| f.err("fds", "a list of fd names or numbers"))?,
                ),
                (Some(_), None) => return Err(f.err("bools", "a list of bytes")),
                (None, Some(_)) => return Err(f.err("fds", "a list of fd names or numbers")),
                (None, None) => IrqData::None,
            };
            let given = match &data {
                IrqData::None => 1,
                IrqData::Bools(b) => b.len(),
                IrqData::Fds(v) => v.len(),
            };
            let count = f
                .opt_u32("count")?
                .unwrap_or(u32::try_from(given).unwrap_or(u32::MAX));
            if given > 4096 {
                return Err(f.err("fds", "at most 4096 entries"));
            }
            let argsz = f.opt_u32("argsz")?;
            (
                Action::SetIrqs {
                    dev,
                    flags,
                    index,
                    start,
                    count,
                    data,
                    argsz,
                },
                ok,
            )
        }
        "hot_reset_info" => (
            Action::HotResetInfo {
                dev: f.string("dev")?,
                room: f.opt_u32("room")?.unwrap_or(8),
            },
            None,
        ),
        other => {
            return Err(f.err(
                "do",
                format!(
                    "unknown action {other:?} (open, bind, close, feature, export, close_fd, fdinfo, \
                     seek, mmap, config_read, config_write, memory, power, flr, af_flr, reset, hot_reset, \
                     low_power, ioas, attach, detach, ioas_destroy, map, unmap, iova_ranges, dma, \
                     region_info, device_info, ioeventfd, write, allow_iovas, region_read, region_write, cpu_map, cpu_read, cpu_write, cpu_unmap, \
                     hot_reset_info, irq_info, set_irqs, group, iommufd, dup, memfd, udmabuf, eventfd, read)"
                ),
            ));
        }
    };
    let expect = expect(&mut f, default)?;
    f.done()?;
    Ok(Step {
        action,
        expect,
        dmesg: None,
        process: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes() {
        assert_eq!(parse_num("4K"), Some(4096));
        assert_eq!(parse_num("1M"), Some(1 << 20));
        assert_eq!(
            parse_num("0xffff_ffff_ffff_f001"),
            Some(0xffff_ffff_ffff_f001)
        );
        assert_eq!(parse_num("12"), Some(12));
        assert_eq!(parse_num("99999999999T"), None);
        assert_eq!(parse_num("x"), None);
        assert_eq!(hex_bytes("00 01ff"), Some(vec![0, 1, 0xff]));
        assert_eq!(hex_bytes("0"), None);
    }
}
