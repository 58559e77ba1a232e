//! The `VFIO_DEVICE_FEATURE` ioctl on raw bytes: the header checks of vfio core and
//! `vfio_check_feature`, with the kernel's errnos and order.
//!
//! The buffer is the caller's memory: a read past its end is `EFAULT` (a failed copy from
//! user), never a panic.

use peerdma_pci::Errno;
use peerdma_uapi::feature::{
    HEADER_LEN, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET, parse_header,
};

/// `GET`.
pub const GET: u32 = VFIO_DEVICE_FEATURE_GET;
/// `SET`.
pub const SET: u32 = VFIO_DEVICE_FEATURE_SET;
/// `PROBE`.
pub const PROBE: u32 = VFIO_DEVICE_FEATURE_PROBE;
/// The feature-number bits.
pub const MASK: u32 = VFIO_DEVICE_FEATURE_MASK;

/// Feature numbers.
pub mod id {
    /// `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN`.
    pub const PCI_VF_TOKEN: u32 = 0;
    /// `VFIO_DEVICE_FEATURE_MIGRATION`.
    pub const MIGRATION: u32 = 1;
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
    pub const MIG_DEVICE_STATE: u32 = 2;
    /// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY`.
    pub const LOW_POWER_ENTRY: u32 = 3;
    /// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP`.
    pub const LOW_POWER_ENTRY_WITH_WAKEUP: u32 = 4;
    /// `VFIO_DEVICE_FEATURE_LOW_POWER_EXIT`.
    pub const LOW_POWER_EXIT: u32 = 5;
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`.
    pub const DMA_LOGGING_START: u32 = 6;
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    pub const DMA_LOGGING_STOP: u32 = 7;
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`.
    pub const DMA_LOGGING_REPORT: u32 = 8;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`.
    pub const MIG_DATA_SIZE: u32 = 9;
    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`.
    pub const MIG_PRECOPY_INFO_V2: u32 = 12;
    /// `VFIO_DEVICE_FEATURE_BUS_MASTER`.
    pub const BUS_MASTER: u32 = 10;
    /// `VFIO_DEVICE_FEATURE_DMA_BUF`.
    pub const DMA_BUF: u32 = 11;
}

/// A parsed feature request: header fields and the caller's whole buffer after the header.
#[derive(Debug)]
pub struct Request<'a> {
    /// `argsz`.
    pub argsz: u32,
    /// `flags`.
    pub flags: u32,
    /// Everything after the header (not cut at `argsz`: the kernel reads ranges past it).
    pub data: &'a [u8],
}

impl Request<'_> {
    /// The feature number.
    pub fn feature(&self) -> u32 {
        self.flags & MASK
    }
    /// `argsz` minus the header, as the driver sees it.
    pub fn data_argsz(&self) -> u32 {
        self.argsz.saturating_sub(HEADER_LEN as u32)
    }
}

/// The vfio core prologue: copy the header (`EFAULT` if the buffer is shorter), `argsz < 8`
/// → `EINVAL`, unknown flag bits → `EINVAL`, GET and SET together without PROBE → `EINVAL`.
pub fn parse(buf: &[u8]) -> Result<Request<'_>, Errno> {
    let (argsz, flags) = parse_header(buf).ok_or(Errno::EFAULT)?;
    if (argsz as usize) < HEADER_LEN {
        return Err(Errno::EINVAL);
    }
    if flags & !(MASK | GET | SET | PROBE) != 0 {
        return Err(Errno::EINVAL);
    }
    if flags & (GET | SET) == (GET | SET) && flags & PROBE == 0 {
        return Err(Errno::EINVAL);
    }
    Ok(Request {
        argsz,
        flags,
        data: buf.get(HEADER_LEN..).unwrap_or_default(),
    })
}

/// `vfio_check_feature(flags, argsz, supported_ops, minsz)`: `Ok(false)` for a PROBE (the
/// caller returns 0), `Ok(true)` to proceed. `argsz` here is the driver's (header excluded).
pub fn check_feature(flags: u32, argsz: u32, supported: u32, minsz: u32) -> Result<bool, Errno> {
    if flags & (GET | SET) & !supported != 0 {
        return Err(Errno::EINVAL);
    }
    if flags & PROBE != 0 {
        return Ok(false);
    }
    if flags & (GET | SET) == 0 {
        return Err(Errno::EINVAL);
    }
    if argsz < minsz {
        return Err(Errno::EINVAL);
    }
    Ok(true)
}

/// Whether vfio core handles the feature itself (migration and DMA logging), rather than the
/// driver. The emulated devices have no migration support, so these answer `ENOTTY`.
pub fn is_core_feature(f: u32) -> bool {
    matches!(
        f,
        id::MIGRATION
            | id::MIG_DEVICE_STATE
            | id::DMA_LOGGING_START
            | id::DMA_LOGGING_STOP
            | id::DMA_LOGGING_REPORT
            | id::MIG_DATA_SIZE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerdma_uapi::feature::header_bytes;

    #[test]
    fn header_rules_in_order() {
        assert_eq!(parse(&[0; 7]).unwrap_err(), Errno::EFAULT);
        assert_eq!(
            parse(&header_bytes(7, GET | id::DMA_BUF)).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(parse(&header_bytes(8, 1 << 19)).unwrap_err(), Errno::EINVAL);
        assert_eq!(
            parse(&header_bytes(8, GET | SET | id::DMA_BUF)).unwrap_err(),
            Errno::EINVAL
        );
        let bytes = header_bytes(8, GET | SET | PROBE | id::DMA_BUF);
        let r = parse(&bytes).unwrap();
        assert_eq!((r.feature(), r.data.len(), r.data_argsz()), (11, 0, 0));
    }

    #[test]
    fn check_feature_rules_in_order() {
        assert_eq!(check_feature(SET, 0, GET, 16), Err(Errno::EINVAL));
        assert_eq!(check_feature(GET | PROBE, 0, GET, 16), Ok(false));
        assert_eq!(check_feature(PROBE, 0, GET, 16), Ok(false));
        assert_eq!(check_feature(0, 100, GET, 16), Err(Errno::EINVAL));
        assert_eq!(check_feature(GET, 15, GET, 16), Err(Errno::EINVAL));
        assert_eq!(check_feature(GET, 16, GET, 16), Ok(true));
        // Unsupported op wins over PROBE.
        assert_eq!(check_feature(SET | PROBE, 0, GET, 16), Err(Errno::EINVAL));
    }
}
