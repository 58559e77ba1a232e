//! 4 MiB DMA write + read through the emulated fabric, into RAM (through the root complex) and
//! into a peer's BAR (through a switch), against `memcpy` of the same bytes in the same run.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peerdma_pci::{DmaAddr, file};
use std::hint::black_box;

const LEN: usize = 4 << 20;

fn dma(c: &mut Criterion) {
    let fabric =
        file::load_str(peerdma_pci::examples::GPU_NIC_SWITCH, "gpu-nic-switch.toml").unwrap();
    let gpu = fabric.lookup("gpu0").unwrap();
    let nic = fabric.lookup("nic0").unwrap();
    let bar = fabric.bar(gpu, 2).unwrap().bus.get();
    let ram = 0x1_0000_0000u64;
    let src: Vec<u8> = (0..LEN).map(|i| (i * 7) as u8).collect();
    let mut back = vec![0u8; LEN];
    let mut dst = vec![0u8; LEN];

    let mut g = c.benchmark_group("dma_4MiB_write_read");
    g.throughput(Throughput::Bytes(2 * LEN as u64));
    g.bench_function(BenchmarkId::new("memcpy", "floor"), |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            back.copy_from_slice(black_box(&dst));
            black_box(&back);
        });
    });
    g.bench_function(BenchmarkId::new("dma", "ram"), |b| {
        b.iter(|| {
            fabric
                .dma_write(nic, DmaAddr(ram), black_box(&src))
                .unwrap();
            fabric.dma_read(nic, DmaAddr(ram), &mut back).unwrap();
            black_box(&back);
        });
    });
    g.bench_function(BenchmarkId::new("dma", "peer_bar"), |b| {
        b.iter(|| {
            fabric
                .dma_write(nic, DmaAddr(bar), black_box(&src))
                .unwrap();
            fabric.dma_read(nic, DmaAddr(bar), &mut back).unwrap();
            black_box(&back);
        });
    });
    g.finish();
    assert_eq!(back, src);
}

criterion_group!(benches, dma);
criterion_main!(benches);
