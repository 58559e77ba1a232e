//! P2PDMA hot paths, each against a floor measured in the same run:
//! - a cached `pci_p2pdma_map_type` lookup against a plain `HashMap` lookup of the same key;
//! - the all-pairs matrix of a generated platform with ≥ 4096 endpoints.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use peerdma_p2pdma::cache::map_types_idx;
use peerdma_p2pdma::{Device, MapType, Matrix, P2pDma, matrix};
use peerdma_pci::generate::{GenParams, generate};
use peerdma_pci::{Fabric, examples, file};

fn lookup(c: &mut Criterion) {
    let fabric = Arc::new(file::load_str(examples::GPU_SERVER, "gpu-server.toml").unwrap());
    let (gpu, nic) = (
        fabric.lookup("gpu0").unwrap(),
        fabric.lookup("nic0").unwrap(),
    );
    let p2p = P2pDma::new(fabric);
    let binding = p2p.bind(gpu).unwrap();
    binding.init().unwrap();
    let provider = binding.provider(2).unwrap().unwrap();
    let client = Device::Pci(nic);
    assert_eq!(p2p.map_type(&provider, &client), MapType::BusAddr); // warm the cache
    let mut plain: HashMap<u32, MapType> = HashMap::new();
    for i in 0..64u32 {
        plain.insert(i << 8, MapType::ThruHostBridge);
    }
    plain.insert(map_types_idx(nic), MapType::BusAddr);
    let key = map_types_idx(nic);

    let mut g = c.benchmark_group("map_type_lookup");
    g.bench_function("hashmap_floor", |b| {
        b.iter(|| *plain.get(black_box(&key)).unwrap());
    });
    g.bench_function("cached_map_type", |b| {
        b.iter(|| p2p.map_type(black_box(&provider), black_box(&client)));
    });
    g.finish();
}

/// A generated platform with at least 4096 endpoint functions.
pub fn big_fabric() -> Fabric {
    let spec = generate(&GenParams {
        seed: 4096,
        host_bridges: 24,
        root_ports: 16,
        switch_percent: 100,
        max_downstream: 4,
        max_functions: 8,
        acs_percent: 30,
        sriov_percent: 0,
        ..GenParams::default()
    });
    Fabric::build(&spec).unwrap_or_else(|e| panic!("{e}"))
}

fn all_pairs(c: &mut Criterion) {
    let fabric = big_fabric();
    let clients = matrix::clients(&fabric).len();
    let providers = matrix::providers(&fabric).len();
    assert!(clients >= 4096, "only {clients} endpoints");
    eprintln!(
        "all-pairs matrix: {providers} providers × {clients} clients = {} pairs",
        providers * clients
    );
    let mut g = c.benchmark_group("all_pairs_matrix");
    g.sample_size(10);
    g.bench_function(format!("{providers}x{clients}"), |b| {
        b.iter(|| black_box(Matrix::compute(&fabric)));
    });
    g.finish();
}

criterion_group!(benches, lookup, all_pairs);
criterion_main!(benches);
