//! The IOVA allocator of one DMA domain (`drivers/iommu/iova.c`).
//!
//! - Allocation is **top-down** from a limit pfn, and size-aligned: a range of `n` pages
//!   starts on a multiple of `n` rounded up to a power of two.
//! - `alloc_fast` rounds requests below 32 pages up to a power of two, serves sizes of up to
//!   32 pages (orders 0–5) from range caches first, and on failure flushes the caches and
//!   retries once.
//! - Cached ranges stay allocated in the tree until the caches are flushed, as in the kernel
//!   (whose per-CPU magazines and depot are modelled as one cache per order).
//! - pfn 0 is never handed out (the domain starts at pfn ≥ 1); reserved ranges (host-bridge
//!   windows, IOMMU reserved regions) are never handed out.

use std::collections::BTreeMap;

/// Sizes of `1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1)` pages and below are cached: 32 pages.
pub const IOVA_RANGE_CACHE_MAX_SIZE: u32 = 6;

/// `order_base_2`: the smallest `k` with `2^k >= n`.
pub fn order_base_2(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// The allocator state of one domain.
#[derive(Debug, Clone)]
pub struct IovaDomain {
    shift: u32,
    start_pfn: u64,
    /// Allocated and reserved ranges: first pfn → last pfn (inclusive).
    ranges: BTreeMap<u64, u64>,
    reserved: BTreeMap<u64, u64>,
    /// Cached ranges per order: first pfns.
    cache: [Vec<u64>; IOVA_RANGE_CACHE_MAX_SIZE as usize],
}

impl IovaDomain {
    /// A domain with `granule = 1 << shift` bytes per page, handing out pfns from
    /// `start_pfn` (at least 1) up.
    pub fn new(shift: u32, start_pfn: u64) -> IovaDomain {
        IovaDomain {
            shift,
            start_pfn: start_pfn.max(1),
            ranges: BTreeMap::new(),
            reserved: BTreeMap::new(),
            cache: Default::default(),
        }
    }

    /// The granule shift.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Reserves `[lo, hi]` (pfns, inclusive) for good: never allocated.
    pub fn reserve(&mut self, lo: u64, hi: u64) {
        if hi >= lo {
            self.ranges.insert(lo, hi);
            self.reserved.insert(lo, hi);
        }
    }

    /// `alloc_iova`: `size` pages at or below `limit_pfn` (inclusive), top-down; size-aligned
    /// when asked. `None` when no gap fits.
    pub fn alloc(&mut self, size: u64, limit_pfn: u64, size_aligned: bool) -> Option<u64> {
        if size == 0 {
            return None;
        }
        let align = if size_aligned {
            size.checked_next_power_of_two()?
        } else {
            1
        };
        let fit = |lo: u64, hi: u64| -> Option<u64> {
            if hi < lo || hi - lo + 1 < size {
                return None;
            }
            let start = (hi - size + 1) / align * align;
            (start >= lo).then_some(start)
        };
        let mut hi = limit_pfn;
        let mut found = None;
        for (&a_lo, &a_hi) in self.ranges.range(..=limit_pfn).rev() {
            if a_hi < hi {
                if let Some(s) = fit(a_hi + 1, hi) {
                    found = Some(s);
                    break;
                }
            }
            if a_lo == 0 {
                hi = 0;
                break;
            }
            hi = hi.min(a_lo - 1);
        }
        let start = found.or_else(|| {
            if hi == 0 && self.ranges.contains_key(&0) {
                None
            } else {
                fit(self.start_pfn, hi)
            }
        })?;
        self.ranges.insert(start, start + size - 1);
        Some(start)
    }

    /// `alloc_iova_fast`: caches first for small sizes; on failure, with `flush_rcache`, the
    /// caches are emptied and the allocation retried once.
    pub fn alloc_fast(&mut self, size: u64, limit_pfn: u64, flush_rcache: bool) -> Option<u64> {
        let size = if size < 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1) {
            size.max(1).next_power_of_two()
        } else {
            size
        };
        let order = order_base_2(size);
        if order < IOVA_RANGE_CACHE_MAX_SIZE {
            let c = &mut self.cache[order as usize];
            if let Some(i) = c.iter().rposition(|&pfn| pfn + size - 1 <= limit_pfn) {
                return Some(c.swap_remove(i));
            }
        }
        if let Some(p) = self.alloc(size, limit_pfn, true) {
            return Some(p);
        }
        if !flush_rcache {
            return None;
        }
        self.flush_caches();
        self.alloc(size, limit_pfn, true)
    }

    /// `free_iova_fast`: cacheable sizes go back to their cache (staying allocated); others
    /// are freed.
    pub fn free_fast(&mut self, pfn: u64, size: u64) {
        // The cache is keyed by order: a 3-page free goes back with the 4-page range it came
        // from (alloc_fast rounded it up).
        let order = order_base_2(size);
        let same_order = self
            .ranges
            .get(&pfn)
            .is_some_and(|&hi| order_base_2(hi - pfn + 1) == order);
        if order < IOVA_RANGE_CACHE_MAX_SIZE && same_order && !self.reserved.contains_key(&pfn) {
            self.cache[order as usize].push(pfn);
            return;
        }
        self.free(pfn);
    }

    /// `free_iova`: frees the range starting at `pfn` (not a reserved one). Returns whether
    /// there was one.
    pub fn free(&mut self, pfn: u64) -> bool {
        if self.reserved.contains_key(&pfn) {
            return false;
        }
        self.ranges.remove(&pfn).is_some()
    }

    /// Frees every cached range.
    pub fn flush_caches(&mut self) {
        for c in &mut self.cache {
            for pfn in c.drain(..) {
                self.ranges.remove(&pfn);
            }
        }
    }

    /// The allocated (or reserved) range containing `pfn`.
    pub fn find(&self, pfn: u64) -> Option<(u64, u64)> {
        self.ranges
            .range(..=pfn)
            .next_back()
            .filter(|(_, hi)| **hi >= pfn)
            .map(|(l, h)| (*l, *h))
    }

    /// Pages allocated now (cached ones included, reserved ones not).
    pub fn allocated_pages(&self) -> u64 {
        let all: u64 = self.ranges.iter().map(|(l, h)| h - l + 1).sum();
        let res: u64 = self.reserved.iter().map(|(l, h)| h - l + 1).sum();
        all - res
    }

    /// Ranges in the caches now.
    pub fn cached(&self) -> usize {
        self.cache.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        assert_eq!(
            (
                order_base_2(1),
                order_base_2(2),
                order_base_2(3),
                order_base_2(32),
                order_base_2(33)
            ),
            (0, 1, 2, 5, 6)
        );
    }

    #[test]
    fn top_down_and_size_aligned() {
        let mut d = IovaDomain::new(12, 1);
        let limit = (1 << 20) - 1; // 4 GiB of 4 KiB pages
        assert_eq!(d.alloc(1, limit, true), Some(limit));
        // 4 pages aligned to 4 below it leave a 3-page gap [limit-3, limit-1] above them...
        assert_eq!(d.alloc(4, limit, true), Some(limit + 1 - 8));
        // ...which a 3-page request (aligned to 4) fills, top-down.
        assert_eq!(d.alloc(3, limit, true), Some(limit + 1 - 4));
        // Unaligned requests take the highest gap exactly.
        assert_eq!(d.alloc(3, limit, false), Some(limit + 1 - 8 - 3));
        // A lower limit is respected.
        assert_eq!(d.alloc(2, 0x1000, true), Some(0xfff - 1));
    }

    #[test]
    fn never_pfn_zero_and_never_reserved() {
        let mut d = IovaDomain::new(12, 0);
        d.reserve(2, 7);
        assert_eq!(d.alloc(1, 9, true), Some(9));
        assert_eq!(d.alloc(1, 9, true), Some(8));
        assert_eq!(d.alloc(1, 9, true), Some(1));
        assert_eq!(
            d.alloc(1, 9, true),
            None,
            "pfn 0 and the reserved 2-7 are never handed out"
        );
        assert!(!d.free(2));
        assert!(d.free(8));
        assert_eq!(d.alloc(1, 9, true), Some(8));
    }

    #[test]
    fn caches_serve_small_sizes_and_flush_on_failure() {
        let mut d = IovaDomain::new(12, 1);
        let limit = 63;
        let a = d.alloc_fast(3, limit, true).unwrap(); // rounded to 4
        assert_eq!(a % 4, 0);
        d.free_fast(a, 4);
        assert_eq!(d.cached(), 1);
        assert_eq!(
            d.alloc_fast(4, limit, true),
            Some(a),
            "served from the cache"
        );
        d.free_fast(a, 4);
        // Fill everything else; a 32-page request must flush the cache to succeed.
        let mut got = Vec::new();
        while let Some(p) = d.alloc(4, limit, true) {
            got.push(p);
        }
        for p in got.into_iter().filter(|p| p + 4 <= 32 || *p >= 32) {
            d.free_fast(p, 4);
        }
        let before = d.cached();
        assert!(
            d.alloc_fast(32, limit, false).is_none(),
            "without flushing, no room"
        );
        assert!(
            d.alloc_fast(32, limit, true).is_some(),
            "flushing the caches makes room"
        );
        assert!(d.cached() < before);
        // Large sizes are not cached.
        let big = d.alloc_fast(64, 1 << 20, true).unwrap();
        d.free_fast(big, 64);
        assert!(d.find(big).is_none());
    }
}
