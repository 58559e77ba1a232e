//! Providers and bindings, the map-type cache, distance_many, find_many, the p2pmem pool.

mod common;

use common::{SKYLAKE, UNKNOWN, b, d, platform};
use peerdma_p2pdma::{Device, MapType, P2pDma, P2pError};
use peerdma_pci::regs::ACS_RR;
use peerdma_pci::{AsErrno, BusAddr, Errno, PhysAddr};

#[test]
fn init_creates_one_provider_per_memory_bar_and_is_idempotent() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = p2p.bind(d(&f, "a")).unwrap();
    // Asking before init is an error, not a crash.
    assert_eq!(
        a.provider(0).unwrap_err(),
        P2pError::NotInitialised(d(&f, "a"))
    );
    assert_eq!(a.provider(0).unwrap_err().errno(), Errno::EINVAL);
    a.init().unwrap();
    a.init().unwrap();
    let bar0 = a.provider(0).unwrap().unwrap();
    let bar2 = a.provider(2).unwrap().unwrap();
    assert_eq!((bar0.owner(), bar0.bar()), (d(&f, "a"), 0));
    assert_eq!(bar2.bar(), 2);
    assert!(
        a.provider(1).unwrap().is_none(),
        "BAR1 is the upper half of a 64-bit BAR"
    );
    assert!(
        a.provider(4).unwrap().is_none(),
        "an I/O BAR has no provider"
    );
    assert!(a.provider(5).unwrap().is_none());
    assert!(a.provider(9).unwrap().is_none());
    assert_eq!(bar0.bus_offset(), 0, "identity windows");
    // Idempotent: a second init leaves the same state (same cache).
    p2p.calc_map_type_and_dist(d(&f, "a"), d(&f, "b"), false);
    a.init().unwrap();
    assert_eq!(p2p.cached(d(&f, "a"), d(&f, "b")), MapType::BusAddr);
}

#[test]
fn bus_offset_is_bus_minus_cpu_wrapping() {
    let f = std::sync::Arc::new(
        peerdma_pci::file::load_str(peerdma_pci::examples::ARM_OFFSET, "arm").unwrap(),
    );
    let p2p = P2pDma::new(f.clone());
    let acc = d(&f, "acc0");
    let bnd = p2p.bind(acc).unwrap();
    bnd.init().unwrap();
    let prov = bnd.provider(0).unwrap().unwrap();
    let bar = f.bar(acc, 0).unwrap();
    assert_eq!(
        prov.bus_offset(),
        bar.bus.get().wrapping_sub(bar.cpu.unwrap().get())
    );
    assert_eq!(prov.bus_addr_map(bar.cpu.unwrap()), bar.bus);
    assert_eq!(
        prov.bus_addr_map(PhysAddr(bar.cpu.unwrap().get() + 0x10)),
        BusAddr(bar.bus.get() + 0x10)
    );
    // The 64-bit window has its own offset.
    let prov2 = bnd.provider(2).unwrap().unwrap();
    assert_ne!(prov2.bus_offset(), prov.bus_offset());
}

#[test]
fn binding_rules() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = p2p.bind(d(&f, "a")).unwrap();
    assert_eq!(p2p.bind(d(&f, "a")).unwrap_err().errno(), Errno::EBUSY);
    assert_eq!(
        p2p.bind(b("0000:09:00.0")).unwrap_err().errno(),
        Errno::ENODEV
    );
    drop(a);
    let again = p2p.bind(d(&f, "a")).unwrap();
    assert!(
        !p2p.is_initialised(d(&f, "a")),
        "a new binding starts without state"
    );
    drop(again);
    p2p.set_non_mappable_bars(d(&f, "b"), true);
    let bb = p2p.bind(d(&f, "b")).unwrap();
    assert_eq!(bb.init().unwrap_err().errno(), Errno::EOPNOTSUPP);
}

#[test]
fn unbinding_kills_providers() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = p2p.bind(d(&f, "a")).unwrap();
    a.init().unwrap();
    let prov = a.provider(2).unwrap().unwrap();
    assert!(prov.is_live());
    assert_eq!(
        p2p.map_type(&prov, &Device::Pci(d(&f, "b"))),
        MapType::BusAddr
    );
    drop(a);
    assert!(!prov.is_live());
    assert_eq!(
        p2p.map_type(&prov, &Device::Pci(d(&f, "b"))),
        MapType::NotSupported
    );
    assert_eq!(
        p2p.cached(d(&f, "a"), d(&f, "b")),
        MapType::Unknown,
        "the cache went with the state"
    );
}

#[test]
fn map_type_refuses_non_pci_clients_without_walking_up() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = p2p.bind(d(&f, "a")).unwrap();
    a.init().unwrap();
    let prov = a.provider(0).unwrap().unwrap();
    let ns = Device::Other {
        name: "nvme0n1".into(),
        parent: Some(Box::new(Device::Pci(d(&f, "b")))),
    };
    assert_eq!(p2p.map_type(&prov, &ns), MapType::NotSupported);
}

#[test]
fn the_cache_is_written_on_every_computation_and_never_invalidated() {
    let f = platform(UNKNOWN, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = p2p.bind(d(&f, "a")).unwrap();
    a.init().unwrap();
    let prov = a.provider(0).unwrap().unwrap();
    let (bc, cc) = (Device::Pci(d(&f, "b")), Device::Pci(d(&f, "c")));
    assert_eq!(p2p.cached(d(&f, "a"), d(&f, "b")), MapType::Unknown);
    assert_eq!(p2p.map_type(&prov, &bc), MapType::BusAddr);
    assert_eq!(p2p.cached(d(&f, "a"), d(&f, "b")), MapType::BusAddr);
    // NOT_SUPPORTED answers are cached too, and the computation warned once.
    assert_eq!(p2p.map_type(&prov, &cc), MapType::NotSupported);
    assert_eq!(p2p.cached(d(&f, "a"), d(&f, "c")), MapType::NotSupported);
    let warned = p2p.take_messages().len();
    assert!(warned > 0);
    assert_eq!(p2p.map_type(&prov, &cc), MapType::NotSupported);
    assert!(p2p.messages().is_empty(), "a cache hit prints nothing");
    // An ACS change after the first lookup is not seen by map_type...
    f.set_acs_ctrl(b("0000:02:01.0"), ACS_RR).unwrap();
    assert_eq!(
        p2p.map_type(&prov, &bc),
        MapType::BusAddr,
        "stale by design"
    );
    // ...but any fresh computation (distance_many) sees it and overwrites the cache.
    assert_eq!(p2p.distance(d(&f, "a"), &bc, false), -1);
    assert_eq!(p2p.cached(d(&f, "a"), d(&f, "b")), MapType::NotSupported);
    assert_eq!(p2p.map_type(&prov, &bc), MapType::NotSupported);
    // The cache is per provider device, shared by its BAR providers, keyed by the client.
    let bar2 = a.provider(2).unwrap().unwrap();
    assert_eq!(p2p.map_type(&bar2, &bc), MapType::NotSupported);
    // A device without P2PDMA state caches nothing.
    p2p.calc_map_type_and_dist(d(&f, "b"), d(&f, "a"), false);
    assert_eq!(p2p.cached(d(&f, "b"), d(&f, "a")), MapType::Unknown);
}

#[test]
fn distance_many_sums_or_refuses() {
    let f = platform(UNKNOWN, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = d(&f, "a");
    let pci = |n: &str| Device::Pci(d(&f, n));
    assert_eq!(p2p.distance_many(a, &[], true), -1);
    assert_eq!(
        p2p.distance_many(a, &[pci("a"), pci("a1"), pci("b")], false),
        6,
        "0 + 2 + 4"
    );
    assert_eq!(p2p.distance(a, &pci("b"), false), 4);
    // A non-PCI client is walked up to its PCI parent...
    let ns = Device::Other {
        name: "nvme0n1".into(),
        parent: Some(Box::new(pci("b"))),
    };
    assert_eq!(p2p.distance_many(a, &[ns], false), 4);
    // ...and one with no PCI device above it fails the whole list, with a warning.
    let orphan = Device::Other {
        name: "platform-dma0".into(),
        parent: None,
    };
    assert_eq!(p2p.distance_many(a, &[pci("b"), orphan], true), -1);
    assert_eq!(
        p2p.take_messages().last().unwrap().to_string(),
        "platform-dma0: cannot be used for peer-to-peer DMA as it is not a PCI device"
    );
    // One unsupported client fails the list; quietly it stops at the first, verbosely it
    // goes on and reports every one.
    assert_eq!(p2p.distance_many(a, &[pci("c"), pci("rc1")], false), -1);
    assert!(p2p.messages().is_empty());
    assert_eq!(p2p.distance_many(a, &[pci("c"), pci("rc1")], true), -1);
    let not_supported = p2p
        .messages()
        .iter()
        .filter(|m| m.text.starts_with("cannot be used"))
        .count();
    assert_eq!(not_supported, 2);
}

#[test]
fn find_many_picks_the_closest_published_pool_at_random_among_equals() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::with_seed(f.clone(), 7);
    let pci = |n: &str| Device::Pci(d(&f, n));
    assert_eq!(
        p2p.find_many(&[pci("b")]),
        None,
        "nobody has published memory"
    );
    let bind_pool = |n: &str, publish: bool| {
        let bd = p2p.bind(d(&f, n)).unwrap();
        bd.add_resource(0, 0, 0).unwrap();
        bd.publish(publish);
        bd
    };
    let _c = bind_pool("c", true);
    assert_eq!(p2p.find_many(&[pci("b")]), Some(d(&f, "c")), "the only one");
    let _a = bind_pool("a", true);
    assert_eq!(
        p2p.find_many(&[pci("b")]),
        Some(d(&f, "a")),
        "distance 4 beats 6"
    );
    let a1 = bind_pool("a1", false);
    assert_eq!(
        p2p.find_many(&[pci("a")]),
        Some(d(&f, "a")),
        "unpublished a1 is skipped; a is distance 0"
    );
    a1.publish(true);
    // b is at distance 4 from both a and a1: over many draws both are chosen.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        seen.insert(p2p.find_many(&[pci("b")]).unwrap());
    }
    assert_eq!(seen, [d(&f, "a"), d(&f, "a1")].into_iter().collect());
    // The choice among equals follows the seed: the same seed draws the same sequence.
    let draws = |seed: u64| {
        let q = P2pDma::with_seed(f.clone(), seed);
        let keep: Vec<_> = ["a", "a1"]
            .iter()
            .map(|n| {
                let bd = q.bind(d(&f, n)).unwrap();
                bd.add_resource(0, 0, 0).unwrap();
                bd.publish(true);
                bd
            })
            .collect();
        let picks: Vec<_> = (0..32).map(|_| q.find_many(&[pci("b")]).unwrap()).collect();
        drop(keep);
        picks
    };
    assert_eq!(draws(7), draws(7));
    assert_ne!(draws(7), draws(8));
    // No client reachable at all: none.
    assert_eq!(
        p2p.find_many(&[Device::Other {
            name: "x".into(),
            parent: None
        }]),
        None
    );
}

#[test]
fn add_resource_refuses_what_the_kernel_refuses() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = p2p.bind(d(&f, "a")).unwrap();
    let mib = 1 << 20;
    for (bar, size, off) in [
        (4u8, 0, 0),
        (1, 0, 0),
        (7, 0, 0),
        (0, 0, mib),
        (0, 4096, mib - 1024),
        (0, mib + 4096, 0),
    ] {
        let e = a.add_resource(bar, size, off).unwrap_err();
        assert_eq!(
            e.errno(),
            Errno::EINVAL,
            "bar {bar} size {size} off {off}: {e}"
        );
    }
    assert!(!p2p.is_initialised(d(&f, "a")), "refusals change nothing");
    a.add_resource(0, 0, 512 << 10).unwrap();
    assert!(
        p2p.is_initialised(d(&f, "a")),
        "add_resource initialises P2PDMA"
    );
    assert_eq!(p2p.p2pmem_sizes(d(&f, "a")), Some((512 << 10, 512 << 10)));
    let m = p2p.messages();
    assert!(
        m[0].text.starts_with("added peer-to-peer DMA memory 0x"),
        "{m:?}"
    );
}

#[test]
fn p2pmem_allocations_carry_bus_addresses_and_really_reach_the_bar() {
    let f = platform(SKYLAKE, &[]);
    let p2p = P2pDma::new(f.clone());
    let a = d(&f, "a");
    let bd = p2p.bind(a).unwrap();
    bd.add_resource(2, 64 << 10, 4096).unwrap();
    assert!(!p2p.has_p2pmem(a));
    bd.publish(true);
    assert!(p2p.has_p2pmem(a));
    let m1 = p2p.alloc_p2pmem(a, 100).unwrap();
    let bar = f.bar(a, 2).unwrap();
    assert_eq!(m1.bus, BusAddr(bar.bus.get() + 4096));
    assert_eq!(p2p.p2pmem_virt_to_bus(a, Some(m1.cpu)), m1.bus);
    assert_eq!(p2p.p2pmem_virt_to_bus(a, None), BusAddr(0));
    assert_eq!(p2p.p2pmem_virt_to_bus(d(&f, "b"), Some(m1.cpu)), BusAddr(0));
    let m2 = p2p.alloc_p2pmem(a, 8192).unwrap();
    assert_eq!(m2.bus.get(), m1.bus.get() + 4096, "page granular");
    // A peer writes through the bus address and the bytes are in the BAR at that offset.
    f.dma_write(d(&f, "b"), peerdma_pci::DmaAddr(m2.bus.get()), b"p2pmem")
        .unwrap();
    let mut back = [0u8; 6];
    f.bar_peek(a, 2, 4096 + 4096, &mut back).unwrap();
    assert_eq!(&back, b"p2pmem");
    let sgl = p2p.p2pmem_alloc_sgl(a, 4096).unwrap();
    assert_eq!(sgl.len(), 1);
    assert!(p2p.alloc_p2pmem(a, 64 << 10).is_none(), "full");
    p2p.p2pmem_free_sgl(a, sgl);
    assert!(p2p.free_p2pmem(a, &m1));
    assert!(!p2p.free_p2pmem(a, &m1), "double free refused");
    assert!(p2p.free_p2pmem(a, &m2));
    assert_eq!(p2p.p2pmem_sizes(a), Some((64 << 10, 64 << 10)));
    drop(bd);
    assert!(
        p2p.alloc_p2pmem(a, 4096).is_none(),
        "the pool went with the binding"
    );
    assert!(!p2p.has_p2pmem(a));
}
