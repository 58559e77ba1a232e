//! `phys_vec_to_sgt` / `free_sgt`: each path moves real bytes, every failure unwinds.

#![allow(clippy::many_single_char_names)]

mod common;

use std::sync::Arc;

use common::{Rig, pattern, rig};
use peerdma_dma::iova_api::IovaState;
use peerdma_dma::{Direction, attrs};
use peerdma_dmabuf::buf::{ExportInfo, export};
use peerdma_dmabuf::sgt::{
    Inject, MAX_SG_ENT_SZ, PhysVec, SgKind, SgTable, Step, free_sgt, phys_vec_to_sgt,
    phys_vec_to_sgt_inject,
};
use peerdma_dmabuf::{Attachment, DmaBuf, File, ImporterOps};
use peerdma_pci::{Bdf, Errno, PhysAddr};

const DIR: Direction = Direction::Bidirectional;

/// A buffer with a dynamic peer-to-peer importer attached for `dev`.
fn buffer(r: &Rig, dev: Bdf) -> (Arc<File>, Arc<Attachment>) {
    let e = common::BarExporter::new(r, vec![], common::ALL);
    let f = export(ExportInfo {
        exp_name: "t".into(),
        size: 0,
        flags: 0,
        ops: Some(e),
        has_priv: true,
    })
    .unwrap();
    let ops = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(Arc::new(|_, _| {})),
        stub: false,
    };
    let a = f
        .dmabuf()
        .unwrap()
        .dynamic_attach(Some(dev), Some(ops))
        .unwrap();
    (f, a)
}

fn buf(f: &Arc<File>) -> &DmaBuf {
    f.dmabuf().unwrap()
}

/// `phys_vec_to_sgt` of the rig's provider for `ranges` (size: their sum) with a fault plan.
fn build(
    r: &Rig,
    a: &Attachment,
    ranges: &[PhysVec],
    g: &peerdma_dmabuf::ResvGuard<'_>,
    inj: &mut Inject,
) -> Result<SgTable, Errno> {
    let size = ranges.iter().map(|x| x.len).sum();
    phys_vec_to_sgt_inject(&r.env, a, Some(&r.provider), ranges, size, DIR, g, inj)
}

/// Three scattered ranges of the BAR, 28 KiB in all.
fn scattered(r: &Rig) -> Vec<PhysVec> {
    vec![
        r.range(0x10_000, 0x3000),
        r.range(0x2000, 0x1000),
        r.range(0x40_0000, 0x3000),
    ]
}

/// Writes a pattern through the table and checks each range of the BAR got its part.
fn bytes_land(r: &Rig, dev: Bdf, sgt: &SgTable, ranges: &[PhysVec], seed: u8) {
    let total: u64 = ranges.iter().map(|x| x.len).sum();
    let data = pattern(usize::try_from(total).unwrap(), seed);
    r.dma_write(dev, sgt, 0, &data).unwrap();
    let mut at = 0usize;
    for x in ranges {
        let n = usize::try_from(x.len).unwrap();
        assert_eq!(
            r.bar_bytes(x.paddr.get() - r.bar, n),
            data[at..at + n],
            "range at {:#x}",
            x.paddr.get()
        );
        at += n;
    }
}

#[test]
fn bus_addr_path_gives_bus_addresses_and_bytes_land() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic0);
    let ranges = scattered(&r);
    let g = buf(&f).lock();
    let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
    assert_eq!(t.kind(), SgKind::BusAddr);
    assert_eq!((t.nents(), t.orig_nents(), t.size()), (3, 0, 0x7000));
    for (e, x) in t.entries().iter().zip(&ranges) {
        assert_eq!(e.addr.get(), r.provider.bus_addr_map(x.paddr).get());
    }
    bytes_land(&r, r.nic0, &t, &ranges, 1);
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
}

#[test]
fn bus_addr_path_applies_a_nonzero_bus_offset() {
    use peerdma_dma::{DmaConfig, DmaSystem};
    use peerdma_dmabuf::sgt::DmaEnv;
    use peerdma_p2pdma::P2pDma;
    let fabric =
        Arc::new(peerdma_pci::file::load_str(peerdma_pci::examples::ARM_OFFSET, "arm").unwrap());
    let (acc, nic) = (
        fabric.lookup("acc0").unwrap(),
        fabric.lookup("nic0").unwrap(),
    );
    let env = DmaEnv {
        dma: Arc::new(DmaSystem::new(fabric.clone(), true)),
        p2p: P2pDma::new(fabric.clone()),
    };
    env.dma
        .configure(
            nic,
            DmaConfig {
                iommu: true,
                ..DmaConfig::default()
            },
        )
        .unwrap();
    let b = env.p2p.bind(acc).unwrap();
    b.init().unwrap();
    let p = b.provider(2).unwrap().unwrap();
    let bar = fabric.bar(acc, 2).unwrap();
    let cpu = bar.cpu.unwrap();
    assert_ne!(cpu.get(), bar.bus.get());
    let e = common::BarExporter::with(env.clone(), p.clone(), vec![], common::ALL);
    let f = export(ExportInfo {
        exp_name: "t".into(),
        size: 0,
        flags: 0,
        ops: Some(e),
        has_priv: true,
    })
    .unwrap();
    let a = buf(&f)
        .dynamic_attach(
            Some(nic),
            Some(ImporterOps {
                allow_peer2peer: true,
                invalidate: Some(Arc::new(|_, _| {})),
                stub: false,
            }),
        )
        .unwrap();
    let g = buf(&f).lock();
    let ranges = [PhysVec {
        paddr: PhysAddr(cpu.get() + 0x1000),
        len: 0x2000,
    }];
    let t = phys_vec_to_sgt(&env, &a, Some(&p), &ranges, 0x2000, DIR, &g).unwrap();
    assert_eq!(t.entries()[0].addr.get(), bar.bus.get() + 0x1000);
    fabric
        .dma_write(nic, t.entries()[0].addr, b"offset!")
        .unwrap();
    let mut back = [0u8; 7];
    fabric.bar_peek(acc, 2, 0x1000, &mut back).unwrap();
    assert_eq!(&back, b"offset!");
    free_sgt(&env, &a, t, DIR, &g).unwrap();
}

#[test]
fn iova_path_is_one_contiguous_range_each_range_at_its_own_offset() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let ranges = scattered(&r);
    let g = buf(&f).lock();
    let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
    assert_eq!(t.kind(), SgKind::Iova);
    assert_eq!(t.nents(), 1);
    assert_eq!(u64::from(t.entries()[0].len), 0x7000);
    bytes_land(&r, r.nic1, &t, &ranges, 2);
    let addr = t.entries()[0].addr;
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
    // The mapping is gone: the same DMA now faults instead of landing.
    assert!(r.fabric.dma_write(r.nic1, addr, &[0xee; 16]).is_err());
    assert_eq!(r.bar_bytes(0x10_000, 1), pattern(1, 2));
}

#[test]
fn per_range_path_on_dma_direct_gives_cpu_addresses() {
    let r = rig(false);
    let (f, a) = buffer(&r, r.nic1);
    let ranges = scattered(&r);
    let g = buf(&f).lock();
    let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
    assert_eq!(t.kind(), SgKind::PerRange);
    let addrs: Vec<u64> = t.entries().iter().map(|e| e.addr.get()).collect();
    assert_eq!(
        addrs,
        ranges.iter().map(|x| x.paddr.get()).collect::<Vec<_>>()
    );
    bytes_land(&r, r.nic1, &t, &ranges, 3);
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
}

#[test]
fn per_range_path_when_the_iova_allocation_fails() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let ranges = scattered(&r);
    let g = buf(&f).lock();
    // Step 0 is the wrapper, 1 the state, 2 the IOVA allocation.
    let mut inj = Inject::at(2);
    let t = build(&r, &a, &ranges, &g, &mut inj).unwrap();
    assert_eq!(inj.fired(), Some(Step::IovaAlloc));
    assert_eq!(t.kind(), SgKind::PerRange);
    assert_eq!(t.nents(), 3);
    bytes_land(&r, r.nic1, &t, &ranges, 4);
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
}

#[test]
fn not_supported_is_einval_and_maps_nothing() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic2);
    let g = buf(&f).lock();
    let e = build(&r, &a, &scattered(&r), &g, &mut Inject::none()).unwrap_err();
    assert_eq!(e, Errno::EINVAL);
    r.assert_clean();
    assert_eq!(r.env.dma.iova_allocated_pages(r.nic2), 0);
}

#[test]
fn bad_input_is_einval_before_anything_is_mapped() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let (f2, _) = buffer(&r, r.nic1);
    let ok = scattered(&r);
    let g = buf(&f).lock();
    let cases: Vec<(Option<&peerdma_p2pdma::Provider>, Vec<PhysVec>, u64)> = vec![
        (None, ok.clone(), 0x7000),
        (Some(&r.provider), vec![], 0),
        (Some(&r.provider), ok.clone(), 0x6000),
        (Some(&r.provider), ok.clone(), 0x8000),
        (Some(&r.provider), vec![r.range(0, 0)], 0),
        (
            Some(&r.provider),
            vec![PhysVec {
                paddr: PhysAddr(u64::MAX - 0xfff),
                len: 0x2000,
            }],
            0x2000,
        ),
        (
            Some(&r.provider),
            vec![r.range(0, u64::MAX), r.range(0, 2)],
            1,
        ),
    ];
    for (p, ranges, size) in cases {
        let e = phys_vec_to_sgt(&r.env, &a, p, &ranges, size, DIR, &g).unwrap_err();
        assert_eq!(e, Errno::EINVAL, "{ranges:?} size {size:#x}");
    }
    // Another buffer's lock is not this one's (one reservation lock at a time: the lock
    // order allows no two, as the kernel allows none without a ww acquire context).
    drop(g);
    let g2 = buf(&f2).lock();
    assert_eq!(
        phys_vec_to_sgt(&r.env, &a, Some(&r.provider), &ok, 0x7000, DIR, &g2).unwrap_err(),
        Errno::EINVAL
    );
    r.assert_clean();
    assert_eq!(r.env.iommu_entries(r.nic1), 0);
}

trait Entries {
    fn iommu_entries(&self, dev: Bdf) -> usize;
}
impl Entries for peerdma_dmabuf::sgt::DmaEnv {
    fn iommu_entries(&self, dev: Bdf) -> usize {
        match (self.dma.iommu(), self.dma.domain_of(dev)) {
            (Some(m), Some(d)) => m.entries(d),
            _ => 0,
        }
    }
}

/// Fails every failable step in turn; after each failure nothing is left mapped and the
/// same call then succeeds with bytes landing.
fn inject_everywhere(iommu: bool, dev_of: fn(&Rig) -> Bdf, expect: &[Step]) {
    let r = rig(iommu);
    let dev = dev_of(&r);
    let (f, a) = buffer(&r, dev);
    let ranges = scattered(&r);
    let g = buf(&f).lock();
    let mut seen = Vec::new();
    for n in 0.. {
        let mut inj = Inject::at(n);
        let res = build(&r, &a, &ranges, &g, &mut inj);
        let Some(step) = inj.fired() else {
            free_sgt(&r.env, &a, res.unwrap(), DIR, &g).unwrap();
            break;
        };
        seen.push(step);
        match res {
            // A failed IOVA allocation is not an error: the per-range fallback maps instead.
            Ok(t) => {
                assert_eq!(step, Step::IovaAlloc);
                free_sgt(&r.env, &a, t, DIR, &g).unwrap();
            }
            Err(e) => assert_eq!(e, Errno::ENOMEM, "{step:?}"),
        }
        r.assert_clean();
        assert_eq!(r.env.iommu_entries(dev), 0, "after {step:?}");
        let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
        bytes_land(&r, dev, &t, &ranges, u8::try_from(n).unwrap());
        free_sgt(&r.env, &a, t, DIR, &g).unwrap();
        r.assert_clean();
    }
    assert_eq!(seen, expect);
}

#[test]
fn fault_injection_bus_addr() {
    inject_everywhere(true, |r| r.nic0, &[Step::AllocWrapper, Step::AllocTable]);
}

#[test]
fn fault_injection_iova() {
    use Step::*;
    inject_everywhere(
        true,
        |r| r.nic1,
        &[
            AllocWrapper,
            AllocState,
            IovaAlloc,
            AllocTable,
            Link(0),
            Link(1),
            Link(2),
            Sync,
        ],
    );
}

#[test]
fn fault_injection_per_range() {
    use Step::*;
    inject_everywhere(
        false,
        |r| r.nic1,
        &[
            AllocWrapper,
            AllocState,
            IovaAlloc,
            AllocTable,
            MapPhys(0),
            MapPhys(1),
            MapPhys(2),
        ],
    );
}

#[test]
fn fault_injection_per_range_after_iova_failure() {
    // IOVA allocation failed (step 2), then each map_phys in turn fails.
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let ranges = scattered(&r);
    let g = buf(&f).lock();
    // Steps: 0 wrapper, 1 state, 2 IOVA allocation, 3 table, 4.. map of range k.
    for k in 0..3 {
        let mut inj = Inject::at_all(&[2, 4 + k]);
        let e = build(&r, &a, &ranges, &g, &mut inj).unwrap_err();
        assert_eq!(e, Errno::ENOMEM);
        assert_eq!(inj.hits(), [Step::IovaAlloc, Step::MapPhys(k)]);
        r.assert_clean();
        assert_eq!(r.env.iommu_entries(r.nic1), 0);
    }
    let mut inj = Inject::at(2);
    let t = build(&r, &a, &ranges, &g, &mut inj).unwrap();
    bytes_land(&r, r.nic1, &t, &ranges, 7);
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
}

#[test]
fn a_range_over_4_gib_splits_at_page_aligned_chunks() {
    let r = rig(true);
    let len = (9u64 << 30) + 0x3000;
    for (dev, kind) in [(r.nic0, SgKind::BusAddr), (r.nic1, SgKind::Iova)] {
        let (f, a) = buffer(&r, dev);
        let g = buf(&f).lock();
        let ranges = [r.range(1 << 30, len)];
        let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
        assert_eq!(t.kind(), kind);
        let lens: Vec<u64> = t.entries().iter().map(|e| u64::from(e.len)).collect();
        assert_eq!(
            lens,
            vec![MAX_SG_ENT_SZ, MAX_SG_ENT_SZ, len - 2 * MAX_SG_ENT_SZ]
        );
        for w in t.entries().windows(2) {
            assert_eq!(w[0].addr.get() + u64::from(w[0].len), w[1].addr.get());
            assert_eq!(w[1].addr.get() % 4096, 0);
        }
        // The last page of the range is reached through the last entry.
        r.dma_write(dev, &t, len - 8, b"the end!").unwrap();
        assert_eq!(r.bar_bytes((1 << 30) + len - 8, 8), b"the end!");
        free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    }
    r.assert_clean();
}

#[test]
fn an_unaligned_link_after_the_first_fails_and_unwinds() {
    // dma_iova_link: only the link at offset 0 may start inside a page.
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let g = buf(&f).lock();
    let ranges = [r.range(0, 0x1000), r.range(0x5800, 0x800)];
    let e = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap_err();
    assert_eq!(e, Errno::EIO);
    r.assert_clean();
    assert_eq!(r.env.iommu_entries(r.nic1), 0);
}

/// Divergence 1 (docs/divergences.md): the kernel links every range at IOVA offset 0, so the
/// second range of a multi-range buffer collides with the first.
#[test]
fn divergence_links_at_offset_zero_collide() {
    let r = rig(true);
    let dma = &r.env.dma;
    let mut s = IovaState::default();
    assert!(dma.iova_try_alloc(r.nic1, &mut s, 0, 0x2000));
    let (p0, p1) = (r.bar, r.bar + 0x10_000);
    dma.iova_link(r.nic1, &mut s, p0, 0, 0x1000, DIR, attrs::MMIO)
        .unwrap();
    // What the kernel does for range 1: offset 0 again.
    assert_eq!(
        dma.iova_link(r.nic1, &mut s, p1, 0, 0x1000, DIR, attrs::MMIO)
            .unwrap_err(),
        Errno::EEXIST
    );
    dma.iova_destroy(r.nic1, &mut s, 0x1000, DIR, attrs::MMIO);
    r.assert_clean();
    // Ours: each range at its own offset, and a DMA across the seam lands in both ranges.
    let (f, a) = buffer(&r, r.nic1);
    let g = buf(&f).lock();
    let ranges = [r.range(0, 0x1000), r.range(0x10_000, 0x1000)];
    let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
    r.dma_write(r.nic1, &t, 0xffc, b"seam!!!!").unwrap();
    assert_eq!(r.bar_bytes(0xffc, 4), b"seam");
    assert_eq!(r.bar_bytes(0x10_000, 4), b"!!!!");
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
}

/// Divergence 2: when the first link fails the kernel returns without freeing the IOVA
/// range it allocated; here it is freed (DMA debug tracks IOVA allocations).
#[test]
fn divergence_first_link_failure_frees_the_iova() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let g = buf(&f).lock();
    // Step 4 is the link of range 0.
    let mut inj = Inject::at(4);
    let e = build(&r, &a, &scattered(&r), &g, &mut inj).unwrap_err();
    assert_eq!((e, inj.fired()), (Errno::ENOMEM, Some(Step::Link(0))));
    r.assert_clean();
}

/// Divergence 3: per-range mappings are undone one per range with the size they were mapped
/// with (the kernel unmaps each ≤ 4 GiB entry separately, and on a failed map also the
/// never-filled zero entries), so DMA debug stays clean for a range over 4 GiB.
#[test]
fn divergence_per_range_unmap_matches_the_map() {
    let r = rig(true);
    let (f, a) = buffer(&r, r.nic1);
    let g = buf(&f).lock();
    let len = 5u64 << 30;
    let ranges = [r.range(0, 0x1000), r.range(4 << 30, len)];
    let mut inj = Inject::at(2);
    let t = build(&r, &a, &ranges, &g, &mut inj).unwrap();
    assert_eq!((t.kind(), t.nents()), (SgKind::PerRange, 3));
    r.dma_write(r.nic1, &t, len + 0x1000 - 4, b"tail").unwrap();
    free_sgt(&r.env, &a, t, DIR, &g).unwrap();
    r.assert_clean();
    assert_eq!(r.env.iommu_entries(r.nic1), 0);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Disjoint ranges of the BAR's first GiBs, as (offset, length), in address order or
    /// reversed.
    fn ranges_strategy(aligned: bool) -> impl Strategy<Value = Vec<(u64, u64)>> {
        let len = if aligned {
            (1u64..64).prop_map(|p| p * 4096).boxed()
        } else {
            (1u64..300_000).boxed()
        };
        (
            prop::collection::vec((0u64..4096, len), 1..8),
            any::<bool>(),
        )
            .prop_map(|(v, rev)| {
                let mut at = 0u64;
                let mut out: Vec<(u64, u64)> = v
                    .into_iter()
                    .map(|(gap, l)| {
                        let start = at + gap * 4096;
                        at = (start + l).div_ceil(4096) * 4096;
                        (start, l)
                    })
                    .collect();
                if rev {
                    out.reverse();
                }
                out
            })
    }

    fn check(t: &SgTable, ranges: &[PhysVec], kind: SgKind) {
        let size: u64 = ranges.iter().map(|x| x.len).sum();
        assert_eq!(t.kind(), kind);
        assert_eq!(
            t.entries().iter().map(|e| u64::from(e.len)).sum::<u64>(),
            size
        );
        assert!(
            t.entries()
                .iter()
                .all(|e| u64::from(e.len) <= MAX_SG_ENT_SZ && e.len > 0)
        );
        if kind == SgKind::Iova {
            for w in t.entries().windows(2) {
                assert_eq!(w[0].addr.get() + u64::from(w[0].len), w[1].addr.get());
                assert_eq!(u64::from(w[0].len), MAX_SG_ENT_SZ);
            }
        } else {
            // Entries follow the ranges; inside a range every chunk but the last is full.
            let mut it = t.entries().iter();
            for x in ranges {
                let mut left = x.len;
                while left > 0 {
                    let e = it.next().unwrap();
                    // Every chunk but the last of a range is full, so boundaries sit at
                    // page-aligned offsets of the range.
                    assert_eq!(u64::from(e.len), left.min(MAX_SG_ENT_SZ));
                    left -= u64::from(e.len);
                }
            }
            assert!(it.next().is_none());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn bus_addr_entries_cover_the_buffer(raw in ranges_strategy(false), big in prop::option::of(1u64..(12u64 << 30))) {
            let r = rig(true);
            let (f, a) = buffer(&r, r.nic0);
            let g = buf(&f).lock();
            let mut ranges: Vec<PhysVec> = raw.iter().map(|&(p, l)| r.range(p, l)).collect();
            if let Some(b) = big {
                ranges.push(r.range(20 << 30, b));
            }
            let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
            check(&t, &ranges, SgKind::BusAddr);
            free_sgt(&r.env, &a, t, DIR, &g).unwrap();
        }

        #[test]
        fn iova_entries_are_contiguous(raw in ranges_strategy(true), last_tail in 0u64..4096) {
            let r = rig(true);
            let (f, a) = buffer(&r, r.nic1);
            let g = buf(&f).lock();
            let mut ranges: Vec<PhysVec> = raw.iter().map(|&(p, l)| r.range(p, l)).collect();
            // Only the last range may end inside a page.
            if last_tail > 0 {
                let l = ranges.last_mut().unwrap();
                l.len = l.len - 4096 + last_tail;
            }
            let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
            check(&t, &ranges, SgKind::Iova);
            bytes_land(&r, r.nic1, &t, &ranges, 9);
            free_sgt(&r.env, &a, t, DIR, &g).unwrap();
            r.assert_clean();
        }

        #[test]
        fn per_range_entries_follow_the_ranges(raw in ranges_strategy(false)) {
            let r = rig(false);
            let (f, a) = buffer(&r, r.nic1);
            let g = buf(&f).lock();
            let ranges: Vec<PhysVec> = raw.iter().map(|&(p, l)| r.range(p, l)).collect();
            let t = build(&r, &a, &ranges, &g, &mut Inject::none()).unwrap();
            check(&t, &ranges, SgKind::PerRange);
            free_sgt(&r.env, &a, t, DIR, &g).unwrap();
            r.assert_clean();
        }
    }
}
