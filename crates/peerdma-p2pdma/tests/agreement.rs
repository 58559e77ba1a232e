//! The analysis must agree with the fabric. On generated platforms whose windows put CPU
//! addresses far from bus addresses (so that only a root complex can decode a CPU address)
//! and whose host bridges forward peer-to-peer as the CPU rule and allowlist predict, for
//! every provider BAR and every client:
//!
//! - `bus_addr` ⇒ a DMA from the client to the BAR's bus address lands in the BAR and never
//!   reaches a root complex;
//! - `thru_host_bridge` ⇒ a DMA to the BAR's CPU address (identity translation) reaches the
//!   root complex and is forwarded into the BAR;
//! - `not_supported` ⇒ the root complex refuses it.
//!
//! Why this holds although Linux tests ACS on more nodes than hardware consults (the
//! provider's own chain, the common ancestor, completion redirect): the kernel errs only
//! towards the host bridge, and a DMA aimed at the CPU address goes through the root complex
//! whatever the switches do. See ARCHITECTURE.md, "Analysis versus hardware".

use std::sync::Arc;

use peerdma_p2pdma::matrix::{self, Matrix};
use peerdma_p2pdma::path::{self, LiveView, Snapshot};
use peerdma_p2pdma::{MapType, P2pDma};
use peerdma_pci::generate::{GenParams, generate};
use peerdma_pci::route::FaultReason;
use peerdma_pci::{DmaAddr, Fabric, Target, examples, file};
use proptest::prelude::*;

fn check_fabric(f: &Fabric) -> Result<(usize, usize, usize), TestCaseError> {
    let live = LiveView(f);
    let snap = Snapshot::of(f);
    let mut seen = (0, 0, 0);
    for p in matrix::providers(f) {
        for c in matrix::clients(f) {
            let o = path::calc(&live, p, c, |_| {});
            let s = path::calc(&snap, snap.node(p).unwrap(), snap.node(c).unwrap(), |_| {});
            prop_assert_eq!(
                (o.map_type, o.distance),
                (s.map_type, s.distance),
                "snapshot disagrees for {} → {}",
                p,
                c
            );
            for bar in f
                .bar_states(p)
                .unwrap()
                .into_iter()
                .filter(|b| b.bar.kind.is_mem())
            {
                let off = bar.bar.size / 2;
                let want = Target::Bar {
                    bdf: p,
                    bar: bar.bar.index,
                    offset: off,
                };
                let cpu = bar.cpu.unwrap().get() + off;
                match o.map_type {
                    MapType::BusAddr => {
                        seen.0 += 1;
                        let t = f
                            .dma_write(c, DmaAddr(bar.bus.get() + off), b"bus")
                            .map_err(|e| {
                                TestCaseError::fail(format!("{p}→{c} bus_addr but {e}"))
                            })?;
                        prop_assert_eq!(t.segments[0].target, want);
                        prop_assert!(
                            !t.via_root_complex(),
                            "{} → {}: bus_addr went through a root complex",
                            c,
                            p
                        );
                    }
                    MapType::ThruHostBridge => {
                        seen.1 += 1;
                        let t = f.dma_write(c, DmaAddr(cpu), b"hb").map_err(|e| {
                            TestCaseError::fail(format!("{p}→{c} thru_host_bridge but {e}"))
                        })?;
                        prop_assert_eq!(t.segments[0].target, want);
                        prop_assert!(t.via_root_complex());
                    }
                    other => {
                        prop_assert_eq!(other, MapType::NotSupported);
                        seen.2 += 1;
                        let e = f.dma_write(c, DmaAddr(cpu), b"no").err();
                        prop_assert!(
                            matches!(
                                e.as_ref().map(|e| &e.reason),
                                Some(FaultReason::P2pNotForwarded { .. })
                            ),
                            "{} → {}: not_supported but the fabric said {:?}",
                            c,
                            p,
                            e
                        );
                    }
                }
            }
        }
    }
    Ok(seen)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48), ..ProptestConfig::default() })]

    #[test]
    fn analysis_agrees_with_the_fabric(seed in any::<u64>(), hbs in 1usize..4, rps in 1usize..4) {
        let spec = generate(&GenParams {
            seed,
            host_bridges: hbs,
            root_ports: rps,
            p2p: None,
            offset_windows: true,
            vary_platform: true,
            acs_percent: 50,
            ..GenParams::default()
        });
        let f = Fabric::build(&spec).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_fabric(&f)?;
    }
}

/// Over many seeds, every outcome actually occurs (the property is not vacuous).
#[test]
fn generated_platforms_cover_every_outcome() {
    let mut total = (0, 0, 0);
    for seed in 0..24 {
        let spec = generate(&GenParams {
            seed,
            p2p: None,
            offset_windows: true,
            vary_platform: true,
            ..GenParams::default()
        });
        let f = Fabric::build(&spec).unwrap();
        let s = check_fabric(&f).unwrap();
        total = (total.0 + s.0, total.1 + s.1, total.2 + s.2);
    }
    assert!(total.0 > 100 && total.1 > 100 && total.2 > 100, "{total:?}");
}

#[test]
fn each_outcome_happens_in_the_shipped_examples() {
    let load = |t: &str| Arc::new(file::load_str(t, "x").unwrap());
    let f = load(examples::GPU_NIC_SWITCH);
    let p2p = P2pDma::new(f.clone());
    let (gpu, nic) = (f.lookup("gpu0").unwrap(), f.lookup("nic0").unwrap());
    assert_eq!(
        p2p.calc_map_type_and_dist(gpu, nic, false),
        (MapType::BusAddr, 4)
    );
    let f = load(examples::TWO_ROOT_PORTS_ACS);
    let p2p = P2pDma::new(f.clone());
    let (n0, n1, g) = (
        f.lookup("nvme0").unwrap(),
        f.lookup("nvme1").unwrap(),
        f.lookup("gpu0").unwrap(),
    );
    assert_eq!(
        p2p.calc_map_type_and_dist(n0, n1, false),
        (MapType::ThruHostBridge, 4),
        "ACS RR on the switch ports"
    );
    assert_eq!(
        p2p.calc_map_type_and_dist(g, n0, false),
        (MapType::ThruHostBridge, 6),
        "two root ports, allowlisted"
    );
    let f = load(examples::ARM_OFFSET);
    let p2p = P2pDma::new(f.clone());
    let (acc, nic, nvme) = (
        f.lookup("acc0").unwrap(),
        f.lookup("nic0").unwrap(),
        f.lookup("nvme0").unwrap(),
    );
    assert_eq!(
        p2p.calc_map_type_and_dist(acc, nic, false),
        (MapType::BusAddr, 4)
    );
    assert_eq!(
        p2p.calc_map_type_and_dist(acc, nvme, false),
        (MapType::NotSupported, 6)
    );
    let f = load(examples::TWO_HOST_BRIDGES);
    let p2p = P2pDma::new(f.clone());
    let (gpu, nic) = (f.lookup("gpu0").unwrap(), f.lookup("nic0").unwrap());
    assert_eq!(
        p2p.calc_map_type_and_dist(gpu, nic, false),
        (MapType::ThruHostBridge, 4),
        "AMD Zen"
    );
    // And the hardware agrees on every shipped example with a bus offset.
    check_fabric(&load(examples::ARM_OFFSET)).unwrap();
}

#[test]
fn the_matrix_equals_the_kernel_walk_for_every_pair() {
    for (name, text) in examples::ALL {
        let f = file::load_str(text, name).unwrap();
        let m = Matrix::compute(&f);
        let p2p = P2pDma::new(Arc::new(file::load_str(text, name).unwrap()));
        for (r, &p) in m.providers.iter().enumerate() {
            for (c, &cl) in m.clients.iter().enumerate() {
                let cell = m.cell(r, c);
                assert_eq!(
                    (cell.map_type, cell.distance),
                    p2p.calc_map_type_and_dist(p, cl, false),
                    "{name}: {p} → {cl}"
                );
            }
        }
    }
}
