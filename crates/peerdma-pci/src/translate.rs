//! The root complex's address-translation hook.
//!
//! A memory request that reaches a root complex carries a DMA address. Before the root
//! complex decodes it against RAM and the host bridges' windows, it asks the translator for a
//! CPU physical address. With no IOMMU that is the identity; an IOMMU model implements this
//! trait with page tables, an IOTLB and faults.

use crate::addr::{DmaAddr, PhysAddr};
use crate::bdf::Bdf;

/// Read or write, from the requester's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads (memory read request).
    Read,
    /// The device writes (posted memory write).
    Write,
}

impl Access {
    /// `read` / `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The CPU physical address.
    pub phys: PhysAddr,
    /// How many bytes from the requested address translate contiguously with the same
    /// permissions (at least 1). Lets a long DMA be translated once per page run.
    pub contiguous: u64,
}

/// Why a translation failed (what an IOMMU writes in its fault record).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (requester {requester}, {access} at {addr})", access = access.as_str())]
pub struct TranslationFault {
    /// The requesting function.
    pub requester: Bdf,
    /// The address asked for.
    pub addr: DmaAddr,
    /// Read or write.
    pub access: Access,
    /// What the translator says (e.g. "no mapping", "write to read-only page").
    pub reason: String,
}

/// Turns DMA addresses arriving at a root complex into CPU physical addresses.
pub trait AddressTranslator: Send + Sync {
    /// Translates the first byte of a request; `contiguous` says how far it holds.
    fn translate(
        &self,
        requester: Bdf,
        addr: DmaAddr,
        access: Access,
    ) -> Result<Translation, TranslationFault>;
}

/// No IOMMU: the DMA address is the CPU physical address.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl AddressTranslator for Identity {
    fn translate(&self, _: Bdf, addr: DmaAddr, _: Access) -> Result<Translation, TranslationFault> {
        Ok(Translation {
            phys: PhysAddr(addr.get()),
            contiguous: (u64::MAX - addr.get()).saturating_add(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_covers_the_rest_of_the_space() {
        let b: Bdf = "0000:01:00.0".parse().unwrap();
        let t = Identity
            .translate(b, DmaAddr(0x1000), Access::Write)
            .unwrap();
        assert_eq!(t.phys, PhysAddr(0x1000));
        assert_eq!(t.contiguous, u64::MAX - 0x1000 + 1);
        let t = Identity
            .translate(b, DmaAddr(u64::MAX), Access::Read)
            .unwrap();
        assert_eq!(t.contiguous, 1);
    }
}
