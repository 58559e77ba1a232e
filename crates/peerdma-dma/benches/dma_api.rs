//! DMA-layer hot paths, each next to a floor measured in the same run:
//! - 4 KiB `map_phys` + `unmap_phys` through the IOMMU (ops/s);
//! - IOVA alloc + free, a cached size (1 page) and a large one (1024 pages);
//! - a 4 MiB device write + read through IOMMU translation, against `memcpy` of the same bytes,
//!   with the buffer mapped by 2 MiB pages and by 4 KiB pages.

#![allow(clippy::many_single_char_names)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peerdma_dma::iova::IovaDomain;
use peerdma_dma::{Direction, DmaConfig, DmaSystem};
use peerdma_pci::{PhysAddr, examples, file};

const LEN: usize = 4 << 20;

fn setup() -> (DmaSystem, peerdma_pci::Bdf) {
    let f = Arc::new(file::load_str(examples::GPU_NIC_SWITCH, "box").unwrap());
    let nic = f.lookup("nic0").unwrap();
    let s = DmaSystem::new(f, true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    (s, nic)
}

fn map_unmap(c: &mut Criterion) {
    let (s, nic) = setup();
    let mut g = c.benchmark_group("map_unmap_4k");
    g.throughput(Throughput::Elements(1));
    g.bench_function("iommu", |b| {
        b.iter(|| {
            let a = s
                .map_phys(
                    nic,
                    PhysAddr(0x2_0000_0000),
                    4096,
                    Direction::Bidirectional,
                    0,
                )
                .unwrap();
            s.unmap_phys(nic, black_box(a), 4096, Direction::Bidirectional, 0);
        });
    });
    g.finish();
}

fn iova(c: &mut Criterion) {
    let mut g = c.benchmark_group("iova_alloc_free");
    g.throughput(Throughput::Elements(1));
    let mut d = IovaDomain::new(12, 1);
    g.bench_function("cached_1_page", |b| {
        b.iter(|| {
            let p = d.alloc_fast(1, (1 << 36) - 1, true).unwrap();
            d.free_fast(black_box(p), 1);
        });
    });
    let mut d = IovaDomain::new(12, 1);
    g.bench_function("large_1024_pages", |b| {
        b.iter(|| {
            let p = d.alloc_fast(1024, (1 << 36) - 1, true).unwrap();
            d.free_fast(black_box(p), 1024);
        });
    });
    g.finish();
}

fn dma_through_iommu(c: &mut Criterion) {
    let (s, nic) = setup();
    let f = s.fabric().clone();
    let big = s
        .map_phys(
            nic,
            PhysAddr(0x2_0000_0000),
            LEN as u64,
            Direction::Bidirectional,
            0,
        )
        .unwrap();
    let small = s
        .map_phys(
            nic,
            PhysAddr(0x3_0000_1000),
            LEN as u64,
            Direction::Bidirectional,
            0,
        )
        .unwrap();
    let d = s.domain_of(nic).unwrap();
    eprintln!(
        "PTEs: {} (2 MiB-aligned buffer and a 4 KiB-aligned one)",
        s.iommu().unwrap().entries(d)
    );
    let src: Vec<u8> = (0..LEN).map(|i| (i * 13) as u8).collect();
    let mut back = vec![0u8; LEN];
    let mut dst = vec![0u8; LEN];
    let mut g = c.benchmark_group("dma_4MiB_write_read_iommu");
    g.throughput(Throughput::Bytes(2 * LEN as u64));
    g.bench_function("memcpy_floor", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            back.copy_from_slice(black_box(&dst));
        });
    });
    g.bench_function("iova_2m_pages", |b| {
        b.iter(|| {
            f.dma_write(nic, big, black_box(&src)).unwrap();
            f.dma_read(nic, big, &mut back).unwrap();
        });
    });
    g.bench_function("iova_4k_pages", |b| {
        b.iter(|| {
            f.dma_write(nic, small, black_box(&src)).unwrap();
            f.dma_read(nic, small, &mut back).unwrap();
        });
    });
    g.finish();
    assert_eq!(back, src);
}

criterion_group!(benches, map_unmap, iova, dma_through_iommu);
criterion_main!(benches);
