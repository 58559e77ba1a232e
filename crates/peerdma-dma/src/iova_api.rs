//! The IOVA-based DMA API (`dma_iova_try_alloc`, `dma_iova_link`, `dma_iova_sync`,
//! `dma_iova_unlink`, `dma_iova_destroy`, `dma_iova_free`): allocate one IOVA range up front,
//! then link physical ranges into it at chosen offsets, then sync once.
//!
//! Rules (Linux 7.2, rulebook §2.7), with `g` the IOMMU granule and `off(x) = x & (g − 1)`:
//! - `try_alloc` is false for a device not using iommu-dma, size 0, a size with bit 63 set,
//!   or no IOVA space; otherwise `addr = iova + off(phys)`, size recorded.
//! - `link`: an unaligned physical start is allowed only at offset 0 (else −EIO); a link that
//!   would need swiotlb (untrusted device, unaligned) is −EPERM for MMIO and bounced otherwise
//!   (marking the state `DMA_IOVA_USE_SWIOTLB`); the IOMMU map's own errors pass through
//!   (−EINVAL misaligned, −EEXIST over an existing entry). No IOTLB sync.
//! - `sync` syncs the IOTLB over the range; `unlink` unmaps (walking granules for bounced or
//!   non-coherent links) and syncs, keeping the IOVA; `destroy` unlinks `[0, mapped_len)` and
//!   frees the range (`mapped_len` 0: just free); `free` gives the range back.

use peerdma_pci::{Bdf, Errno};

use crate::iommu::GRANULE;
use crate::mapping::{Direction, DmaSystem, attrs, dma_info_to_prot};

/// `DMA_IOVA_USE_SWIOTLB`: a flag bit kept in the state's size word.
pub const DMA_IOVA_USE_SWIOTLB: u64 = 1 << 63;

/// `struct dma_iova_state`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IovaState {
    /// IOVA of byte 0 (includes the first range's offset inside its granule).
    pub addr: u64,
    /// Size, with `DMA_IOVA_USE_SWIOTLB` possibly set.
    pub size_word: u64,
}

impl IovaState {
    /// `dma_iova_size`.
    pub fn size(&self) -> u64 {
        self.size_word & !DMA_IOVA_USE_SWIOTLB
    }
    /// `dma_use_iova`: whether an IOVA range was allocated.
    pub fn use_iova(&self) -> bool {
        self.size_word != 0
    }
    /// Whether a link was bounced through swiotlb.
    pub fn uses_swiotlb(&self) -> bool {
        self.size_word & DMA_IOVA_USE_SWIOTLB != 0
    }
}

fn off(x: u64) -> u64 {
    x & (GRANULE - 1)
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(GRANULE) * GRANULE
}

impl DmaSystem {
    /// `dma_iova_try_alloc(dev, state, phys, size)`.
    #[track_caller]
    pub fn iova_try_alloc(&self, bdf: Bdf, state: &mut IovaState, phys: u64, size: u64) -> bool {
        let at = std::panic::Location::caller();
        *state = IovaState::default();
        let Ok(dev) = self.dev(bdf) else { return false };
        if dev.domain.is_none() || size == 0 || size & DMA_IOVA_USE_SWIOTLB != 0 {
            return false;
        }
        let Some(len) = size.checked_add(off(phys)).map(align_up) else {
            return false;
        };
        let Some(iova) = self.alloc_iova(bdf, &dev, len) else {
            return false;
        };
        state.addr = iova + off(phys);
        state.size_word = size;
        self.debug_track(bdf, state.addr, size, at);
        true
    }

    /// `dma_iova_link(dev, state, phys, offset, size, dir, attrs)`.
    #[allow(clippy::too_many_arguments)]
    pub fn iova_link(
        &self,
        bdf: Bdf,
        state: &mut IovaState,
        phys: u64,
        offset: u64,
        size: u64,
        dir: Direction,
        a: u32,
    ) -> Result<(), Errno> {
        let dev = self.dev(bdf).map_err(|_| Errno::ENODEV)?;
        let (Some(d), Some(iommu)) = (dev.domain, self.iommu()) else {
            return Err(Errno::EINVAL);
        };
        let pad = off(phys);
        if pad != 0 && offset > 0 {
            tracing::warn!(target: "peerdma::dma", "dma_iova_link: unaligned link at offset {offset:#x}");
            return Err(Errno::EIO);
        }
        let mmio = a & attrs::MMIO != 0;
        let mut phys = phys;
        let mut bounced = false;
        if dev.cfg.untrusted && off(phys | size) != 0 {
            if mmio {
                return Err(Errno::EPERM);
            }
            phys = self
                .swiotlb_map(&dev.cfg, phys, size, dir)
                .map_err(|_| Errno::ENOMEM)?;
            state.size_word |= DMA_IOVA_USE_SWIOTLB;
            bounced = true;
        }
        let pad = off(phys);
        if !dev.cfg.coherent && a & (attrs::SKIP_CPU_SYNC | attrs::MMIO) == 0 {
            self.counters
                .sync_for_device
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let iova = state.addr + offset - pad;
        let r = iommu.map(
            d,
            iova,
            phys - pad,
            align_up(size + pad),
            dma_info_to_prot(dir, dev.cfg.coherent, a),
        );
        if r.is_err() && bounced {
            self.swiotlb_unmap(phys);
        }
        r
    }

    /// `dma_iova_sync(dev, state, offset, size)`.
    pub fn iova_sync(
        &self,
        bdf: Bdf,
        state: &IovaState,
        offset: u64,
        size: u64,
    ) -> Result<(), Errno> {
        let dev = self.dev(bdf).map_err(|_| Errno::ENODEV)?;
        let (Some(d), Some(iommu)) = (dev.domain, self.iommu()) else {
            return Err(Errno::EINVAL);
        };
        let a = state.addr + offset;
        iommu.sync_range(d, a - off(a), align_up(size + off(a)));
        Ok(())
    }

    /// `dma_iova_unlink(dev, state, offset, size, dir, attrs)`: the IOVA range stays
    /// allocated.
    pub fn iova_unlink(
        &self,
        bdf: Bdf,
        state: &IovaState,
        offset: u64,
        size: u64,
        dir: Direction,
        a: u32,
    ) {
        let Ok(dev) = self.dev(bdf) else { return };
        let (Some(d), Some(iommu)) = (dev.domain, self.iommu()) else {
            return;
        };
        let addr = state.addr + offset;
        let base = addr - off(addr);
        let len = align_up(size + off(addr));
        let slow = state.uses_swiotlb()
            || (!dev.cfg.coherent && a & (attrs::SKIP_CPU_SYNC | attrs::MMIO) == 0);
        if slow {
            let mut g = base;
            while g < base + len {
                let phys = iommu.iova_to_phys(d, g);
                if phys == 0 {
                    tracing::warn!(target: "peerdma::dma", "dma_iova_unlink: {g:#x} not mapped");
                    return;
                }
                if !dev.cfg.coherent && a & attrs::SKIP_CPU_SYNC == 0 {
                    self.counters
                        .sync_for_cpu
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if self.is_bounce(phys) {
                    if matches!(dir, Direction::FromDevice | Direction::Bidirectional) {
                        self.bounce_copy(phys, size, false);
                    }
                    self.swiotlb_unmap(phys);
                }
                g += GRANULE;
            }
        }
        let done = iommu.unmap(d, base, len);
        if done != len {
            tracing::warn!(target: "peerdma::dma", "dma_iova_unlink: unmapped {done:#x} of {len:#x}");
        }
        iommu.sync_range(d, base, len);
    }

    /// `dma_iova_destroy(dev, state, mapped_len, dir, attrs)`: unlinks `[0, mapped_len)` (the
    /// only linked part, by contract) and frees the whole range.
    pub fn iova_destroy(
        &self,
        bdf: Bdf,
        state: &mut IovaState,
        mapped_len: u64,
        dir: Direction,
        a: u32,
    ) {
        if mapped_len > 0 {
            self.iova_unlink(bdf, state, 0, mapped_len, dir, a);
        }
        self.iova_free(bdf, state);
    }

    /// `dma_iova_free(dev, state)`: every link must be undone already.
    pub fn iova_free(&self, bdf: Bdf, state: &mut IovaState) {
        let Ok(dev) = self.dev(bdf) else { return };
        if !state.use_iova() {
            return;
        }
        let base = state.addr - off(state.addr);
        let len = align_up(state.size() + off(state.addr));
        peerdma_pci::sync::lock(&dev.iovad).free_fast(base >> 12, len >> 12);
        self.debug_untrack(bdf, state.addr);
        *state = IovaState::default();
    }

    /// Pages of IOVA space a device holds (cached ranges included).
    pub fn iova_allocated_pages(&self, bdf: Bdf) -> u64 {
        self.dev(bdf)
            .map_or(0, |d| peerdma_pci::sync::lock(&d.iovad).allocated_pages())
    }
}
