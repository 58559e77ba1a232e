//! `phys_vec_to_sgt` throughput in ranges per second, for 1 … 1,000,000 ranges on each path,
//! next to floors measured in the same run:
//! - `vec_push`: pushing the same entries into a pre-sized `Vec` (the cost of the table alone);
//! - `raw_link` / `raw_map`: the DMA-layer calls the path makes, with no table at all.
//!
//! The per-range path and its floor also run with DMA debug accounting off (`_nodebug`): with
//! it on, a million live mappings make its bookkeeping the dominant cost.
//!
//! Ranges are 4 KiB pages of a 64 GiB BAR, 8 KiB apart, so no two are contiguous.

#![allow(clippy::many_single_char_names, clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peerdma_dma::iova_api::IovaState;
use peerdma_dma::{Direction, attrs};
use peerdma_dmabuf::buf::{DmaBufOps, ExportInfo, export, ops};
use peerdma_dmabuf::sgt::{PhysVec, SgDma, SgTable, free_sgt, phys_vec_to_sgt};
use peerdma_dmabuf::{Attachment, File, ImporterOps, ResvGuard};
use peerdma_pci::{Bdf, DmaAddr, Errno, PhysAddr};

const DIR: Direction = Direction::Bidirectional;
const COUNTS: [usize; 4] = [1, 100, 10_000, 1_000_000];

struct Nop;
impl DmaBufOps for Nop {
    fn provides(&self) -> u32 {
        ops::MAP | ops::UNMAP | ops::RELEASE
    }
    fn map(&self, _: &Attachment, _: Direction, _: &ResvGuard<'_>) -> Result<SgTable, Errno> {
        Err(Errno::ENOMEM)
    }
    fn unmap(&self, _: &Attachment, _: SgTable, _: Direction, _: &ResvGuard<'_>) {}
    fn release(&self, _: &peerdma_dmabuf::DmaBuf) {}
}

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Rig, rig};

/// A buffer to attach to (its exporter is never called here).
fn buffer() -> Arc<File> {
    let info = ExportInfo {
        exp_name: "bench".into(),
        size: 0,
        flags: 0,
        ops: Some(Arc::new(Nop)),
        has_priv: true,
    };
    export(info).unwrap()
}

fn ranges(bar: u64, n: usize) -> Vec<PhysVec> {
    (0..n as u64)
        .map(|i| PhysVec {
            paddr: PhysAddr(bar + i * 8192),
            len: 4096,
        })
        .collect()
}

fn attach(f: &File, dev: Bdf) -> Arc<Attachment> {
    let ops = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(Arc::new(|_, _| {})),
        stub: false,
    };
    f.dmabuf()
        .unwrap()
        .dynamic_attach(Some(dev), Some(ops))
        .unwrap()
}

/// Times `phys_vec_to_sgt` only: tables are built in batches (so the clock is read rarely)
/// and freed outside the timing.
fn time_build(r: &Rig, f: &File, a: &Attachment, v: &[PhysVec], iters: u64) -> Duration {
    let size = v.iter().map(|x| x.len).sum();
    let buf = f.dmabuf().unwrap();
    let g = buf.lock();
    let batch = (4096 / v.len()).max(1) as u64;
    let mut total = Duration::ZERO;
    let mut done = 0;
    let mut tables = Vec::with_capacity(usize::try_from(batch).unwrap());
    while done < iters {
        let k = batch.min(iters - done);
        let t0 = Instant::now();
        for _ in 0..k {
            tables.push(
                phys_vec_to_sgt(&r.env, a, Some(&r.provider), black_box(v), size, DIR, &g).unwrap(),
            );
        }
        total += t0.elapsed();
        for t in tables.drain(..) {
            free_sgt(&r.env, a, t, DIR, &g).unwrap();
        }
        done += k;
    }
    total
}

/// The floor of the per-range path: one `map_phys` per range, no table.
fn raw_map(r: &Rig, v: &[PhysVec], iters: u64) -> Duration {
    let dma = &r.env.dma;
    let mut total = Duration::ZERO;
    let mut got = Vec::with_capacity(v.len());
    for _ in 0..iters {
        let t0 = Instant::now();
        for x in v {
            got.push(
                dma.map_phys(r.nic1, x.paddr, 4096, DIR, attrs::MMIO)
                    .unwrap(),
            );
        }
        total += t0.elapsed();
        for a in got.drain(..) {
            dma.unmap_phys(r.nic1, a, 4096, DIR, attrs::MMIO);
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    let bus = rig(true);
    let iova = rig(true);
    let direct = rig(false);
    // The same machine without DMA debug accounting (a kernel without CONFIG_DMA_API_DEBUG).
    let quiet = rig(false);
    quiet.env.dma.set_debug(false);
    let file = buffer();
    let nic1 = iova.nic1;
    for &n in &COUNTS {
        let mut g = c.benchmark_group(format!("phys_vec_to_sgt/{n}"));
        g.throughput(Throughput::Elements(n as u64));
        if n >= 10_000 {
            g.sample_size(10);
        }
        let v = ranges(bus.bar, n);
        g.bench_function(BenchmarkId::new("vec_push", n), |b| {
            b.iter(|| {
                let mut out: Vec<SgDma> = Vec::with_capacity(n);
                for x in black_box(&v) {
                    out.push(SgDma {
                        addr: DmaAddr(x.paddr.get()),
                        len: 4096,
                    });
                }
                out
            });
        });
        let a = attach(&file, bus.nic0);
        g.bench_function(BenchmarkId::new("bus_addr", n), |b| {
            b.iter_custom(|it| time_build(&bus, &file, &a, &v, it));
        });
        let a = attach(&file, iova.nic1);
        g.bench_function(BenchmarkId::new("iova", n), |b| {
            b.iter_custom(|it| time_build(&iova, &file, &a, &v, it));
        });
        g.bench_function(BenchmarkId::new("raw_link", n), |b| {
            b.iter_custom(|it| {
                let dma = &iova.env.dma;
                let mut total = Duration::ZERO;
                for _ in 0..it {
                    let mut s = IovaState::default();
                    let t0 = Instant::now();
                    assert!(dma.iova_try_alloc(nic1, &mut s, 0, n as u64 * 4096));
                    for (i, x) in v.iter().enumerate() {
                        dma.iova_link(
                            nic1,
                            &mut s,
                            x.paddr.get(),
                            i as u64 * 4096,
                            4096,
                            DIR,
                            attrs::MMIO,
                        )
                        .unwrap();
                    }
                    dma.iova_sync(nic1, &s, 0, n as u64 * 4096).unwrap();
                    total += t0.elapsed();
                    dma.iova_destroy(nic1, &mut s, n as u64 * 4096, DIR, attrs::MMIO);
                }
                total
            });
        });
        for (name, r) in [("per_range", &direct), ("per_range_nodebug", &quiet)] {
            let a = attach(&file, r.nic1);
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter_custom(|it| time_build(r, &file, &a, &v, it));
            });
        }
        for (name, r) in [("raw_map", &direct), ("raw_map_nodebug", &quiet)] {
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter_custom(|it| raw_map(r, &v, it));
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
