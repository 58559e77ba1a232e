//! One function's 4 KiB configuration space: the bytes, which bits software may write, which
//! are write-one-to-clear, and the capability chains.
//!
//! This is the raw register file. The side effects of writes (FLR, power-state changes,
//! secondary bus reset, SR-IOV enable) are the device's business and live in
//! [`crate::function`].

use crate::regs;

/// Why a config access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigAccessError {
    /// Size other than 1, 2 or 4 bytes.
    #[error("config access size {0} (must be 1, 2 or 4)")]
    BadSize(usize),
    /// Offset not a multiple of the size.
    #[error("config access at {offset:#x} of {size} bytes is not naturally aligned")]
    Unaligned {
        /// Offset asked for.
        offset: u16,
        /// Size asked for.
        size: usize,
    },
    /// Past the 4 KiB config space.
    #[error("config offset {0:#x} is beyond the 4 KiB config space")]
    OutOfRange(u16),
}

/// Checks that an access of `size` bytes at `offset` is a legal config access.
pub fn check_access(offset: u16, size: usize) -> Result<(), ConfigAccessError> {
    if !matches!(size, 1 | 2 | 4) {
        return Err(ConfigAccessError::BadSize(size));
    }
    if usize::from(offset) + size > regs::CFG_SIZE {
        return Err(ConfigAccessError::OutOfRange(offset));
    }
    if usize::from(offset) % size != 0 {
        return Err(ConfigAccessError::Unaligned { offset, size });
    }
    Ok(())
}

/// A capability found on a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapEntry {
    /// Capability ID (8-bit for standard, 16-bit for extended).
    pub id: u16,
    /// Offset of the capability header.
    pub offset: u16,
}

/// The register file of one function.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: Box<[u8; regs::CFG_SIZE]>,
    wmask: Box<[u8; regs::CFG_SIZE]>,
    w1c: Box<[u8; regs::CFG_SIZE]>,
    /// End of the last standard capability (next free offset), 0 if none yet.
    std_free: u16,
    /// Last standard capability header (to link the next one), 0 if none.
    std_last: u16,
    /// Next free extended-space offset.
    ext_free: u16,
    /// Last extended capability header, 0 if none.
    ext_last: u16,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read16(regs::VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read16(regs::DEVICE_ID)),
            )
            .field(
                "command",
                &format_args!("{:#06x}", self.read16(regs::COMMAND)),
            )
            .finish_non_exhaustive()
    }
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace::new()
    }
}

impl ConfigSpace {
    /// An all-zero, read-only config space.
    pub fn new() -> ConfigSpace {
        ConfigSpace {
            bytes: Box::new([0; regs::CFG_SIZE]),
            wmask: Box::new([0; regs::CFG_SIZE]),
            w1c: Box::new([0; regs::CFG_SIZE]),
            std_free: 0x40,
            std_last: 0,
            ext_free: 0x100,
            ext_last: 0,
        }
    }

    /// Reads `size` (1, 2 or 4) little-endian bytes at `offset`. The caller has checked the
    /// access with [`check_access`]; out-of-range bytes read as 0xff.
    pub fn read(&self, offset: u16, size: usize) -> u32 {
        let mut v = 0u32;
        for i in 0..size {
            let b = self
                .bytes
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0xff);
            v |= u32::from(b) << (8 * i);
        }
        v
    }

    /// One byte.
    pub fn read8(&self, offset: u16) -> u8 {
        self.read(offset, 1) as u8
    }
    /// Two bytes.
    pub fn read16(&self, offset: u16) -> u16 {
        self.read(offset, 2) as u16
    }
    /// Four bytes.
    pub fn read32(&self, offset: u16) -> u32 {
        self.read(offset, 4)
    }

    /// A write as software does it: only writable bits change; write-one-to-clear bits are
    /// cleared where `value` has a one. Returns the value the register held before.
    pub fn write(&mut self, offset: u16, size: usize, value: u32) -> u32 {
        let old = self.read(offset, size);
        for i in 0..size {
            let at = usize::from(offset) + i;
            if at >= regs::CFG_SIZE {
                break;
            }
            let byte = (value >> (8 * i)) as u8;
            let w = self.wmask[at];
            let c = self.w1c[at] & byte;
            self.bytes[at] = ((self.bytes[at] & !w) | (byte & w)) & !c;
        }
        old
    }

    /// Sets bytes directly, ignoring the masks (device-side initialisation).
    pub fn set(&mut self, offset: u16, size: usize, value: u32) {
        for i in 0..size {
            if let Some(b) = self.bytes.get_mut(usize::from(offset) + i) {
                *b = (value >> (8 * i)) as u8;
            }
        }
    }
    /// One byte, ignoring masks.
    pub fn set8(&mut self, offset: u16, value: u8) {
        self.set(offset, 1, value.into());
    }
    /// Two bytes, ignoring masks.
    pub fn set16(&mut self, offset: u16, value: u16) {
        self.set(offset, 2, value.into());
    }
    /// Four bytes, ignoring masks.
    pub fn set32(&mut self, offset: u16, value: u32) {
        self.set(offset, 4, value);
    }

    /// Declares which bits of a register software may write.
    pub fn set_wmask(&mut self, offset: u16, size: usize, mask: u32) {
        for i in 0..size {
            if let Some(b) = self.wmask.get_mut(usize::from(offset) + i) {
                *b = (mask >> (8 * i)) as u8;
            }
        }
    }

    /// The writable-bit mask of a register.
    pub fn wmask(&self, offset: u16, size: usize) -> u32 {
        let mut v = 0u32;
        for i in 0..size {
            let b = self
                .wmask
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0);
            v |= u32::from(b) << (8 * i);
        }
        v
    }

    /// Declares write-one-to-clear bits of a register.
    pub fn set_w1c(&mut self, offset: u16, size: usize, mask: u32) {
        for i in 0..size {
            if let Some(b) = self.w1c.get_mut(usize::from(offset) + i) {
                *b = (mask >> (8 * i)) as u8;
            }
        }
    }

    /// Adds a standard capability of `len` bytes (header included) to the chain at 0x34 and
    /// returns its offset. `None` when the 256-byte space is full.
    pub fn add_cap(&mut self, id: u8, len: u8) -> Option<u16> {
        let off = (self.std_free + 3) & !3;
        if usize::from(off) + usize::from(len) > regs::STD_SIZE {
            return None;
        }
        self.set8(off, id);
        self.set8(off + 1, 0);
        if self.std_last == 0 {
            self.set8(regs::CAPABILITY_LIST, off as u8);
        } else {
            self.set8(self.std_last + 1, off as u8);
        }
        let status = self.read16(regs::STATUS) | regs::STATUS_CAP_LIST;
        self.set16(regs::STATUS, status);
        self.std_last = off;
        self.std_free = off + u16::from(len);
        Some(off)
    }

    /// Adds an extended capability of `len` bytes at 0x100 or after the last one and returns
    /// its offset. `None` when the 4 KiB space is full.
    pub fn add_ext_cap(&mut self, id: u16, version: u8, len: u16) -> Option<u16> {
        let off = (self.ext_free + 3) & !3;
        if usize::from(off) + usize::from(len) > regs::CFG_SIZE {
            return None;
        }
        self.set32(off, u32::from(id) | (u32::from(version & 0xf) << 16));
        if self.ext_last != 0 {
            let prev = self.read32(self.ext_last);
            self.set32(self.ext_last, (prev & 0x000f_ffff) | (u32::from(off) << 20));
        }
        self.ext_last = off;
        self.ext_free = off + len;
        Some(off)
    }

    /// Walks the standard capability list from 0x34. Stops at a loop, a pointer into the
    /// header, or after 48 entries, as Linux does.
    pub fn caps(&self) -> Vec<CapEntry> {
        let mut out = Vec::new();
        if self.read16(regs::STATUS) & regs::STATUS_CAP_LIST == 0 {
            return out;
        }
        let mut pos = u16::from(self.read8(regs::CAPABILITY_LIST)) & !3;
        let mut ttl = 48;
        while pos >= 0x40 && ttl > 0 {
            let id = self.read8(pos);
            if id == 0xff {
                break;
            }
            out.push(CapEntry {
                id: id.into(),
                offset: pos,
            });
            pos = u16::from(self.read8(pos + 1)) & !3;
            ttl -= 1;
        }
        out
    }

    /// Walks the extended capability list from 0x100 (at most 480 entries, no loops).
    pub fn ext_caps(&self) -> Vec<CapEntry> {
        let mut out = Vec::new();
        let mut pos: u16 = 0x100;
        let mut ttl = (regs::CFG_SIZE - regs::STD_SIZE) / 8;
        while ttl > 0 {
            let header = self.read32(pos);
            if header == 0 || header == 0xffff_ffff {
                break;
            }
            out.push(CapEntry {
                id: (header & 0xffff) as u16,
                offset: pos,
            });
            let next = ((header >> 20) & 0xffc) as u16;
            if next < 0x100 {
                break;
            }
            pos = next;
            ttl -= 1;
        }
        out
    }

    /// The bytes past the header that no capability covers, as `[start, end)` ranges: a
    /// device's own storage (QEMU's devices have such bytes, writable, after their
    /// capabilities). A reset leaves them alone: what it puts back is the header and the
    /// capabilities. A capability's extent is its defined length (for MSI, VNDR and the
    /// vendor-specific extended capability read from its own registers), and for one this
    /// model does not know, everything up to the next capability.
    pub fn storage_ranges(&self) -> Vec<(u16, u16)> {
        let mut covered: Vec<(u16, u16)> = Vec::new();
        let extents = |list: Vec<CapEntry>, end: u16, ext: bool| {
            let mut starts: Vec<u16> = list.iter().map(|c| c.offset).collect();
            starts.sort_unstable();
            list.iter()
                .map(|c| {
                    let next = starts
                        .iter()
                        .copied()
                        .find(|&o| o > c.offset)
                        .unwrap_or(end);
                    let len = if ext {
                        self.ext_cap_len(c.id, c.offset)
                    } else {
                        self.cap_len(c.id as u8, c.offset)
                    };
                    let stop = len.map_or(next, |l| c.offset.saturating_add(l)).min(end);
                    (c.offset, stop.max(c.offset + 1))
                })
                .collect::<Vec<_>>()
        };
        covered.extend(extents(self.caps(), regs::STD_SIZE as u16, false));
        // The first extended header is the list's head even when it is empty.
        covered.push((0x100, 0x104));
        covered.extend(extents(self.ext_caps(), regs::CFG_SIZE as u16, true));
        covered.sort_unstable();
        let mut out = Vec::new();
        let mut at: u16 = 0x40;
        for (s, e) in covered {
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if usize::from(at) < regs::CFG_SIZE {
            out.push((at, regs::CFG_SIZE as u16));
        }
        out
    }

    /// The length of a standard capability (`pci_cap_length` and the variable ones in
    /// drivers/vfio/pci/vfio_pci_config.c `vfio_cap_len`), `None` for one not known here.
    fn cap_len(&self, id: u8, at: u16) -> Option<u16> {
        Some(match id {
            0x01 | 0x03 | 0x07 | 0x0d | 0x12 => 8,
            0x04 | 0x06 => 4,
            0x05 => {
                let flags = self.read16(at + 2);
                let mut len = 10;
                if flags & 0x80 != 0 {
                    len += 4;
                }
                if flags & 0x100 != 0 {
                    len += 10;
                }
                len
            }
            0x09 => u16::from(self.read8(at + 2)).max(3),
            0x10 => {
                if self.read16(at + 2) & 0xf >= 2 {
                    0x3c
                } else {
                    0x14
                }
            }
            0x11 => 12,
            0x13 => 6,
            _ => return None,
        })
    }

    /// The length of an extended capability (`pci_ext_cap_length` and vfio's `vfio_ext_cap_len`
    /// for the variable ones it knows), `None` for one not known here.
    fn ext_cap_len(&self, id: u16, at: u16) -> Option<u16> {
        Some(match id {
            0x0001 => 0x48,
            0x0003 | 0x001f => 0x0c,
            0x0004 | 0x0013 => 0x10,
            0x000e | 0x000f | 0x0018 | 0x001b => 8,
            0x000d => {
                let cap = self.read16(at + 4);
                if cap & 0x20 == 0 {
                    8
                } else {
                    let bits = match (cap >> 8) & 0xff {
                        0 => 256,
                        n => n,
                    };
                    8 + bits.div_ceil(32) * 4
                }
            }
            0x0010 => 0x40,
            0x000b => ((self.read32(at + 4) >> 20) as u16).max(8),
            _ => return None,
        })
    }

    /// Offset of the first standard capability with this ID.
    pub fn find_cap(&self, id: u8) -> Option<u16> {
        self.caps()
            .into_iter()
            .find(|c| c.id == u16::from(id))
            .map(|c| c.offset)
    }

    /// Offset of the first extended capability with this ID.
    pub fn find_ext_cap(&self, id: u16) -> Option<u16> {
        self.ext_caps()
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_checks() {
        assert_eq!(check_access(0x10, 4), Ok(()));
        assert_eq!(
            check_access(0x11, 4),
            Err(ConfigAccessError::Unaligned {
                offset: 0x11,
                size: 4
            })
        );
        assert_eq!(check_access(0x10, 3), Err(ConfigAccessError::BadSize(3)));
        assert_eq!(check_access(0xffc, 4), Ok(()));
        assert_eq!(
            check_access(0xffe, 4),
            Err(ConfigAccessError::OutOfRange(0xffe))
        );
        assert_eq!(
            check_access(0x1000, 1),
            Err(ConfigAccessError::OutOfRange(0x1000))
        );
    }

    #[test]
    fn read_only_bits_do_not_change() {
        let mut c = ConfigSpace::new();
        c.set16(regs::VENDOR_ID, 0x8086);
        c.set_wmask(regs::COMMAND, 2, 0x0007);
        c.write(regs::VENDOR_ID, 2, 0x1234);
        assert_eq!(c.read16(regs::VENDOR_ID), 0x8086);
        let old = c.write(regs::COMMAND, 2, 0xffff);
        assert_eq!(old, 0);
        assert_eq!(c.read16(regs::COMMAND), 0x0007);
    }

    #[test]
    fn write_one_to_clear() {
        let mut c = ConfigSpace::new();
        c.set16(
            regs::STATUS,
            regs::STATUS_REC_MASTER_ABORT | regs::STATUS_CAP_LIST,
        );
        c.set_w1c(regs::STATUS, 2, u32::from(regs::STATUS_W1C));
        c.write(regs::STATUS, 2, 0);
        assert_ne!(c.read16(regs::STATUS) & regs::STATUS_REC_MASTER_ABORT, 0);
        c.write(regs::STATUS, 2, u32::from(regs::STATUS_REC_MASTER_ABORT));
        assert_eq!(c.read16(regs::STATUS), regs::STATUS_CAP_LIST);
    }

    #[test]
    fn capability_chains_walk() {
        let mut c = ConfigSpace::new();
        let pm = c.add_cap(regs::CAP_ID_PM, regs::PM_SIZEOF).unwrap();
        let exp = c.add_cap(regs::CAP_ID_EXP, regs::EXP_SIZEOF_V2).unwrap();
        let af = c.add_cap(regs::CAP_ID_AF, regs::AF_SIZEOF).unwrap();
        assert_eq!(pm, 0x40);
        assert_eq!(c.find_cap(regs::CAP_ID_EXP), Some(exp));
        assert_eq!(c.find_cap(regs::CAP_ID_AF), Some(af));
        assert_eq!(c.find_cap(0x05), None);
        let ids: Vec<u16> = c.caps().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![1, 0x10, 0x13]);

        let acs = c.add_ext_cap(regs::EXT_CAP_ID_ACS, 1, 8).unwrap();
        let sriov = c
            .add_ext_cap(regs::EXT_CAP_ID_SRIOV, 1, regs::SRIOV_SIZEOF)
            .unwrap();
        assert_eq!(acs, 0x100);
        assert_eq!(c.find_ext_cap(regs::EXT_CAP_ID_SRIOV), Some(sriov));
        assert_eq!(c.ext_caps().len(), 2);
    }

    #[test]
    fn looping_chain_terminates() {
        let mut c = ConfigSpace::new();
        let a = c.add_cap(regs::CAP_ID_PM, 8).unwrap();
        c.set8(a + 1, a as u8); // points at itself
        assert_eq!(c.caps().len(), 48);
        c.set32(0x100, 0x1000_000d); // ext cap pointing at itself
        assert_eq!(c.ext_caps().len(), (4096 - 256) / 8);
    }

    #[test]
    fn standard_space_fills_up() {
        let mut c = ConfigSpace::new();
        let mut n = 0;
        while c.add_cap(0x09, 0x3c).is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
