//! Sparse backing memory for RAM and BAR contents.
//!
//! A page exists once something is written into it; untouched memory reads as zero and costs
//! nothing, so a 64 GiB BAR or a terabyte of RAM can be modelled on a small machine.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Granule of the backing store.
pub const PAGE_SIZE: u64 = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// A multiplicative hash for page numbers: page indices are already well spread, so the
/// default SipHash would only cost time on the DMA path.
#[derive(Default, Clone, Copy)]
pub struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Page = Box<[u8; PAGE]>;

/// Memory that allocates 4 KiB pages on first write.
#[derive(Default)]
pub struct SparseMemory {
    pages: HashMap<u64, Page, BuildHasherDefault<PageHasher>>,
}

impl std::fmt::Debug for SparseMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseMemory")
            .field("pages", &self.pages.len())
            .finish()
    }
}

fn new_page() -> Page {
    Box::new([0u8; PAGE])
}

impl SparseMemory {
    /// Empty memory (everything reads as zero).
    pub fn new() -> SparseMemory {
        SparseMemory::default()
    }

    /// Copies `buf.len()` bytes starting at `offset` into `buf`. Unwritten bytes read as 0.
    /// The caller keeps `offset + buf.len()` within 64 bits (the region's bounds).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let page = at / PAGE_SIZE;
            let in_page = (at % PAGE_SIZE) as usize;
            let n = (PAGE - in_page).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.pages.get(&page) {
                Some(p) => dst.copy_from_slice(&p[in_page..in_page + n]),
                None => dst.fill(0),
            }
            done += n;
        }
    }

    /// Copies `data` into memory at `offset`, creating pages as needed.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let page = at / PAGE_SIZE;
            let in_page = (at % PAGE_SIZE) as usize;
            let n = (PAGE - in_page).min(data.len() - done);
            let p = self.pages.entry(page).or_insert_with(new_page);
            p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let page = at / PAGE_SIZE;
            let in_page = (at % PAGE_SIZE) as usize;
            let n = (PAGE - in_page).min((len - done).min(PAGE_SIZE) as usize);
            if byte == 0 && !self.pages.contains_key(&page) {
                done += n as u64;
                continue;
            }
            let p = self.pages.entry(page).or_insert_with(new_page);
            p[in_page..in_page + n].fill(byte);
            done += n as u64;
        }
    }

    /// How many 4 KiB pages exist.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Bytes of backing actually allocated.
    pub fn resident_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }

    /// Forgets every page (everything reads as zero again).
    pub fn clear(&mut self) {
        self.pages.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_reads_zero_and_costs_nothing() {
        let m = SparseMemory::new();
        let mut buf = [0xaau8; 100];
        m.read(1 << 40, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(m.pages(), 0);
    }

    #[test]
    fn write_across_pages_reads_back() {
        let mut m = SparseMemory::new();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        m.write(4090, &data);
        assert_eq!(m.pages(), 4); // 4090..14090 touches pages 0..=3
        let mut back = vec![0u8; data.len()];
        m.read(4090, &mut back);
        assert_eq!(back, data);
        let mut edge = [0u8; 8];
        m.read(4086, &mut edge);
        assert_eq!(&edge[..4], &[0, 0, 0, 0]);
        assert_eq!(&edge[4..], &data[..4]);
    }

    #[test]
    fn both_ends_of_a_huge_region_cost_two_pages() {
        let mut m = SparseMemory::new();
        let size = 64u64 << 30;
        m.write(0, b"head");
        m.write(size - 4, b"tail");
        assert_eq!(m.pages(), 2);
        assert_eq!(m.resident_bytes(), 8192);
        let mut b = [0u8; 4];
        m.read(size - 4, &mut b);
        assert_eq!(&b, b"tail");
    }

    #[test]
    fn fill_zero_does_not_allocate() {
        let mut m = SparseMemory::new();
        m.fill(0, 1 << 20, 0);
        assert_eq!(m.pages(), 0);
        m.fill(10, 4096, 0x5a);
        assert_eq!(m.pages(), 2);
        let mut b = [0u8; 3];
        m.read(4104, &mut b);
        assert_eq!(b, [0x5a, 0x5a, 0]);
        m.clear();
        assert_eq!(m.pages(), 0);
    }
}
