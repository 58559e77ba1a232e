//! Address newtypes.
//!
//! Four address spaces meet in a PCIe system, and mixing them up is the classic P2P bug, so
//! each has its own type:
//!
//! | type | what it is |
//! |---|---|
//! | [`PhysAddr`] | a CPU physical address (what `/proc/iomem` shows, what RAM and host-bridge windows are placed at) |
//! | [`BusAddr`] | a PCI bus address (what BAR registers and bridge windows hold) |
//! | [`DmaAddr`] | what a device is programmed with (a bus address, a CPU address under dma-direct, or an IOVA) |
//! | [`Iova`] | an I/O virtual address inside an IOMMU domain |
//!
//! Arithmetic is checked: overflow is an [`AddrOverflow`] error, never a wrap or a panic.

use std::fmt;

/// An address computation left the 64-bit address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address arithmetic overflows 64 bits: {base:#x} + {delta:#x}")]
pub struct AddrOverflow {
    /// The address the computation started from.
    pub base: u64,
    /// What was added to it.
    pub delta: u64,
}

macro_rules! addr_type {
    ($(#[$doc:meta])* $name:ident, $short:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw 64-bit value.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + delta`, or an error if that leaves the 64-bit space.
            pub fn checked_add(self, delta: u64) -> Result<Self, AddrOverflow> {
                self.0
                    .checked_add(delta)
                    .map($name)
                    .ok_or(AddrOverflow { base: self.0, delta })
            }

            /// `self - delta`, or `None` below zero.
            pub fn checked_sub(self, delta: u64) -> Option<Self> {
                self.0.checked_sub(delta).map($name)
            }

            /// How far `self` lies above `base`, or `None` if it lies below.
            pub fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Whether `self` is a multiple of `align` (a power of two; 0 and 1 accept all).
            pub fn is_aligned(self, align: u64) -> bool {
                align <= 1 || self.0 & (align - 1) == 0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

addr_type!(
    /// A CPU physical address.
    PhysAddr, "Phys"
);
addr_type!(
    /// A PCI bus address: what BAR registers and bridge windows hold.
    BusAddr, "Bus"
);
addr_type!(
    /// The address a device is programmed with for DMA.
    DmaAddr, "Dma"
);
addr_type!(
    /// An I/O virtual address inside an IOMMU domain.
    Iova, "Iova"
);

/// A half-open range `[start, start + len)` of 64-bit addresses, with the end computed
/// without overflow (a range may reach the top of the address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    /// First address.
    pub start: u64,
    /// Length in bytes; zero is an empty range.
    pub len: u64,
}

impl Span {
    /// A range of `len` bytes from `start`. Fails if the last byte would lie past `u64::MAX`.
    pub fn new(start: u64, len: u64) -> Result<Span, AddrOverflow> {
        if len > 0 && start.checked_add(len - 1).is_none() {
            return Err(AddrOverflow {
                base: start,
                delta: len,
            });
        }
        Ok(Span { start, len })
    }

    /// The last address in the range (`None` if empty).
    pub fn last(&self) -> Option<u64> {
        (self.len > 0).then(|| self.start + (self.len - 1))
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr - self.start < self.len
    }

    /// Whether the whole of `[addr, addr + len)` lies inside (`len` > 0).
    pub fn contains_span(&self, other: &Span) -> bool {
        match (other.last(), self.last()) {
            (Some(ol), Some(_)) => self.contains(other.start) && self.contains(ol),
            _ => false,
        }
    }

    /// Whether two ranges share at least one address.
    pub fn overlaps(&self, other: &Span) -> bool {
        match (self.last(), other.last()) {
            (Some(a_last), Some(b_last)) => self.start <= b_last && other.start <= a_last,
            _ => false,
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.last() {
            Some(last) => write!(f, "[{:#x}-{:#x}]", self.start, last),
            None => write!(f, "[{:#x}, empty]", self.start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_add_refuses_overflow() {
        assert_eq!(PhysAddr(u64::MAX).checked_add(0), Ok(PhysAddr(u64::MAX)));
        assert_eq!(
            PhysAddr(u64::MAX).checked_add(1),
            Err(AddrOverflow {
                base: u64::MAX,
                delta: 1
            })
        );
        assert_eq!(BusAddr(0x1000).checked_add(0x10), Ok(BusAddr(0x1010)));
        assert_eq!(BusAddr(0x10).checked_sub(0x20), None);
        assert_eq!(DmaAddr(0x3000).offset_from(DmaAddr(0x1000)), Some(0x2000));
        assert_eq!(DmaAddr(0x1000).offset_from(DmaAddr(0x3000)), None);
    }

    #[test]
    fn alignment() {
        assert!(Iova(0x20_0000).is_aligned(0x20_0000));
        assert!(!Iova(0x20_1000).is_aligned(0x20_0000));
        assert!(Iova(7).is_aligned(1));
        assert!(Iova(7).is_aligned(0));
    }

    #[test]
    fn span_at_top_of_space() {
        let s = Span::new(u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(s.last(), Some(u64::MAX));
        assert!(s.contains(u64::MAX));
        assert!(Span::new(u64::MAX - 0xfff, 0x1001).is_err());
        let empty = Span::new(5, 0).unwrap();
        assert!(!empty.contains(5));
        assert!(!empty.overlaps(&s));
    }

    #[test]
    fn span_overlap_and_containment() {
        let a = Span::new(0x1000, 0x1000).unwrap();
        let b = Span::new(0x1fff, 1).unwrap();
        let c = Span::new(0x2000, 0x10).unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(a.contains_span(&b));
        assert!(!a.contains_span(&c));
        assert_eq!(a.to_string(), "[0x1000-0x1fff]");
    }
}
