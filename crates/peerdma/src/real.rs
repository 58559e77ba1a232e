//! `export` and `import` on the real machine: VFIO dma-buf export of BAR ranges, and mapping
//! such a buffer into an iommufd IOAS another device is attached to.

use peerdma_linux::vfio::LinuxBackend;
use peerdma_pci::{Bdf, Errno};
use peerdma_uapi::backend::{MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE};
use peerdma_uapi::{DmaBufRequest, OpenPath, UapiBackend};

/// A user-facing failure: the errno and what it means for this operation.
pub fn failure(op: &str, what: &str, e: Errno) -> String {
    let why = match (op, e) {
        ("open", e) if e == Errno::ENODEV => "no such PCI device".to_string(),
        ("open", e) if e == Errno::ENOENT => "no VFIO node for it: is it bound to vfio-pci (driver_override + drivers_probe)?".to_string(),
        ("open", e) if e == Errno::EBUSY => "someone else has the device (or its group) open".to_string(),
        ("open", e) if e == Errno::EPERM || e == Errno::EACCES => "not allowed: run as root; the IOMMU may also lack interrupt remapping".to_string(),
        ("open", e) if e == Errno::EINVAL => "the device is not viable for VFIO here (its IOMMU group has other devices in use?)".to_string(),
        ("export", e) if e == Errno::EINVAL => "the request is malformed, or a range is unaligned, empty or outside the BAR".to_string(),
        ("export", e) if e == Errno::ENODEV => "that region is not a BAR this device implements".to_string(),
        ("export", e) if e == Errno::EOVERFLOW => "offset + length overflows".to_string(),
        ("export", e) if e == Errno::ENOMEM => "too many ranges".to_string(),
        ("export", e) if e == Errno::ENOTTY => "this kernel's vfio-pci cannot export dma-bufs (needs CONFIG_VFIO_PCI_DMABUF, Linux 6.19 or later)".to_string(),
        ("map", e) if e == Errno::EOPNOTSUPP => "iommufd maps only VFIO dma-bufs of exactly one range".to_string(),
        ("map", e) if e == Errno::ENODEV => "the buffer is revoked (memory decoding off, reset, or its device closed)".to_string(),
        ("map", e) if e == Errno::EEXIST => "that IOVA range is already mapped".to_string(),
        ("iommufd", e) if e == Errno::ENOENT => "no /dev/iommu: this kernel has no IOMMUFD".to_string(),
        _ => e.description().to_string(),
    };
    format!("{what}: {e}: {why}")
}

/// Parses `OFF:LEN` with sizes like `0x1000:64K`.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not OFF:LEN"))?;
    let p = |t: &str| peerdma_pci::size::parse_size(t).map_err(|e| e.to_string());
    Ok((p(a)?, p(b)?))
}

/// `peerdma export`: prints the fd and the kernel's fdinfo of the new dma-buf.
pub fn export(
    device: Bdf,
    bar: u32,
    ranges: &[(u64, u64)],
    path: OpenPath,
) -> Result<String, String> {
    let mut be = LinuxBackend::new();
    let dev = be
        .open_device(device, path)
        .map_err(|e| failure("open", &format!("opening {device}"), e))?;
    let mut bytes = DmaBufRequest::new(bar, ranges.to_vec()).to_bytes();
    let fd = be
        .device_feature(dev, &mut bytes)
        .map_err(|e| failure("export", "VFIO_DEVICE_FEATURE_DMA_BUF", e))?;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    Ok(format!("dma-buf fd {fd} from {device} BAR{bar}\n{info}"))
}

/// `peerdma import`: exports a range of a provider's BAR, attaches the importer to a new
/// IOAS and maps the buffer there at `iova`.
pub fn import(
    provider: Bdf,
    bar: u32,
    range: (u64, u64),
    importer: Bdf,
    iova: u64,
) -> Result<String, String> {
    let mut be = LinuxBackend::new();
    let p = be
        .open_device(provider, OpenPath::CdevIommufd)
        .map_err(|e| failure("open", &format!("opening {provider}"), e))?;
    let i = be
        .open_device(importer, OpenPath::CdevIommufd)
        .map_err(|e| failure("open", &format!("opening {importer}"), e))?;
    let ioas = be
        .ioas_alloc()
        .map_err(|e| failure("iommufd", "IOMMU_IOAS_ALLOC", e))?;
    be.attach_ioas(i, ioas)
        .map_err(|e| failure("attach", &format!("attaching {importer} to the IOAS"), e))?;
    let mut bytes = DmaBufRequest::new(bar, vec![range]).to_bytes();
    let fd = be
        .device_feature(p, &mut bytes)
        .map_err(|e| failure("export", "VFIO_DEVICE_FEATURE_DMA_BUF", e))?;
    be.ioas_map_file(
        ioas,
        fd,
        0,
        range.1,
        iova,
        MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE,
    )
    .map_err(|e| failure("map", "IOMMU_IOAS_MAP_FILE", e))?;
    Ok(format!(
        "{provider} BAR{bar} [{:#x}, +{:#x}) is mapped for {importer} at IOVA {iova:#x} (IOAS {})",
        range.0, range.1, ioas.0
    ))
}
