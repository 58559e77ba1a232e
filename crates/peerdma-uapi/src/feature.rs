//! The bytes of `VFIO_DEVICE_FEATURE`, laid out with the `vfio-bindings` types so that the
//! emulated ioctl and the real kernel read exactly the same buffer.
//!
//! `struct vfio_device_feature { u32 argsz; u32 flags; u8 data[]; }` followed, for
//! `VFIO_DEVICE_FEATURE_DMA_BUF`, by `struct vfio_device_feature_dma_buf { u32 region_index;
//! u32 open_flags; u32 flags; u32 nr_ranges; struct vfio_region_dma_range dma_ranges[]; }`
//! with `struct vfio_region_dma_range { u64 offset; u64 length; }`. All little-endian on the
//! machines peerdma runs on.

use std::mem::{offset_of, size_of};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_dma_buf, vfio_region_dma_range,
};

pub use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};

/// `sizeof(struct vfio_device_feature)`: the header, 8 bytes.
pub const HEADER_LEN: usize = size_of::<vfio_device_feature>();
/// `sizeof(struct vfio_device_feature_dma_buf)`: 16 bytes.
pub const DMA_BUF_LEN: usize = size_of::<vfio_device_feature_dma_buf>();
/// `sizeof(struct vfio_region_dma_range)`: 16 bytes.
pub const RANGE_LEN: usize = size_of::<vfio_region_dma_range>();

/// `O_RDWR`, as `open_flags` carries it.
pub const O_RDWR: u32 = 0o2;
/// `O_CLOEXEC`.
pub const O_CLOEXEC: u32 = 0o2_000_000;

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(b) = buf.get_mut(at..at + 4) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    if let Some(b) = buf.get_mut(at..at + 8) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    buf.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// The header fields, if the buffer holds at least a header.
pub fn parse_header(buf: &[u8]) -> Option<(u32, u32)> {
    Some((
        get_u32(buf, offset_of!(vfio_device_feature, argsz))?,
        get_u32(buf, offset_of!(vfio_device_feature, flags))?,
    ))
}

/// A header-only feature buffer (e.g. a PROBE).
pub fn header_bytes(argsz: u32, flags: u32) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    put_u32(&mut b, offset_of!(vfio_device_feature, argsz), argsz);
    put_u32(&mut b, offset_of!(vfio_device_feature, flags), flags);
    b
}

/// A `VFIO_DEVICE_FEATURE_DMA_BUF` request, with every field a test may want to get wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaBufRequest {
    /// Header flags: the feature number ORed with GET/SET/PROBE.
    pub feature_flags: u32,
    /// `region_index`: the BAR.
    pub region_index: u32,
    /// `open_flags` for the new file.
    pub open_flags: u32,
    /// `flags` of the payload (must be 0).
    pub flags: u32,
    /// `nr_ranges`; `None` = the number of ranges given.
    pub nr_ranges: Option<u32>,
    /// The (offset, length) ranges written after the payload.
    pub ranges: Vec<(u64, u64)>,
    /// `argsz`; `None` = exactly the buffer's length.
    pub argsz: Option<u32>,
}

impl DmaBufRequest {
    /// A well-formed GET of `ranges` of BAR `region_index`, opened `O_RDWR | O_CLOEXEC`.
    pub fn new(region_index: u32, ranges: Vec<(u64, u64)>) -> DmaBufRequest {
        DmaBufRequest {
            feature_flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
            region_index,
            open_flags: O_RDWR | O_CLOEXEC,
            flags: 0,
            nr_ranges: None,
            ranges,
            argsz: None,
        }
    }

    /// The buffer the ioctl is given.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = HEADER_LEN + DMA_BUF_LEN + self.ranges.len() * RANGE_LEN;
        let mut b = vec![0u8; len];
        let argsz = self.argsz.unwrap_or(u32::try_from(len).unwrap_or(u32::MAX));
        b[..HEADER_LEN].copy_from_slice(&header_bytes(argsz, self.feature_flags));
        let p = HEADER_LEN;
        put_u32(
            &mut b,
            p + offset_of!(vfio_device_feature_dma_buf, region_index),
            self.region_index,
        );
        put_u32(
            &mut b,
            p + offset_of!(vfio_device_feature_dma_buf, open_flags),
            self.open_flags,
        );
        put_u32(
            &mut b,
            p + offset_of!(vfio_device_feature_dma_buf, flags),
            self.flags,
        );
        let nr = self
            .nr_ranges
            .unwrap_or(u32::try_from(self.ranges.len()).unwrap_or(u32::MAX));
        put_u32(
            &mut b,
            p + offset_of!(vfio_device_feature_dma_buf, nr_ranges),
            nr,
        );
        for (i, (off, length)) in self.ranges.iter().enumerate() {
            let at = p + DMA_BUF_LEN + i * RANGE_LEN;
            put_u64(&mut b, at + offset_of!(vfio_region_dma_range, offset), *off);
            put_u64(
                &mut b,
                at + offset_of!(vfio_region_dma_range, length),
                *length,
            );
        }
        b
    }
}

/// The fixed part of a DMA_BUF payload, read from the bytes after the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaBufPayload {
    /// `region_index`.
    pub region_index: u32,
    /// `open_flags`.
    pub open_flags: u32,
    /// `flags`.
    pub flags: u32,
    /// `nr_ranges`.
    pub nr_ranges: u32,
}

/// Reads the payload's fixed part from the data area (the bytes after the header).
pub fn parse_dma_buf(data: &[u8]) -> Option<DmaBufPayload> {
    Some(DmaBufPayload {
        region_index: get_u32(data, offset_of!(vfio_device_feature_dma_buf, region_index))?,
        open_flags: get_u32(data, offset_of!(vfio_device_feature_dma_buf, open_flags))?,
        flags: get_u32(data, offset_of!(vfio_device_feature_dma_buf, flags))?,
        nr_ranges: get_u32(data, offset_of!(vfio_device_feature_dma_buf, nr_ranges))?,
    })
}

/// Reads range `i` of a DMA_BUF payload's data area, if the bytes are there.
pub fn parse_range(data: &[u8], i: usize) -> Option<(u64, u64)> {
    let at = DMA_BUF_LEN.checked_add(i.checked_mul(RANGE_LEN)?)?;
    Some((
        get_u64(data, at + offset_of!(vfio_region_dma_range, offset))?,
        get_u64(data, at + offset_of!(vfio_region_dma_range, length))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_the_kernels() {
        assert_eq!((HEADER_LEN, DMA_BUF_LEN, RANGE_LEN), (8, 16, 16));
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_BUF, 11);
        assert_eq!(VFIO_DEVICE_FEATURE_GET, 1 << 16);
    }

    #[test]
    fn a_request_round_trips() {
        let r = DmaBufRequest::new(2, vec![(0, 4096), (8192, 4096)]);
        let b = r.to_bytes();
        assert_eq!(b.len(), 8 + 16 + 32);
        assert_eq!(parse_header(&b), Some((56, (1 << 16) | 0xb)));
        let p = parse_dma_buf(&b[8..]).unwrap();
        assert_eq!(
            p,
            DmaBufPayload {
                region_index: 2,
                open_flags: O_RDWR | O_CLOEXEC,
                flags: 0,
                nr_ranges: 2
            }
        );
        assert_eq!(parse_range(&b[8..], 1), Some((8192, 4096)));
        assert_eq!(parse_range(&b[8..], 2), None);
    }

    #[test]
    fn overrides_go_in_verbatim() {
        let mut r = DmaBufRequest::new(0, vec![(0, 4096)]);
        r.nr_ranges = Some(1 << 28);
        r.argsz = Some(4);
        r.flags = 1;
        let b = r.to_bytes();
        assert_eq!(parse_header(&b).unwrap().0, 4);
        let p = parse_dma_buf(&b[8..]).unwrap();
        assert_eq!((p.nr_ranges, p.flags), (1 << 28, 1));
        assert_eq!(parse_header(&[1, 2, 3]), None);
    }
}
