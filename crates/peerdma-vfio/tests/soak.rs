//! The soak, short: the whole mix on 2 and 4 threads keeps every promise, and the soak does
//! catch a planted stale-address importer (the watch) and a planted deaf importer (the
//! watchdog). `.ci/run` runs the release build of the long form with at least 200k operations.

use std::time::Duration;

use peerdma_vfio::soak::{Options, Plant, run};

fn soak(threads: usize, ops: u64, plant: Plant, stall: Duration) -> peerdma_vfio::soak::Report {
    run(&Options {
        threads,
        ops,
        seed: 7,
        stall,
        plant,
    })
    .unwrap()
}

#[test]
fn the_mix_on_two_and_four_threads_keeps_every_promise() {
    for threads in [2, 4] {
        let r = soak(threads, 20_000, Plant::None, Duration::from_secs(60));
        assert!(r.ok(), "{r}");
        assert_eq!(r.ops, 20_000);
        assert!(r.landed > 500, "DMAs did land: {r}");
        assert!(r.revokes > 200, "revocations did happen: {r}");
    }
}

#[test]
fn a_planted_stale_address_is_named_by_the_watch() {
    let r = soak(2, 20_000, Plant::StaleAddress, Duration::from_secs(60));
    assert!(
        !r.violations.is_empty(),
        "the stale DMAs were not caught: {r}"
    );
    assert!(r.violations[0].contains("landed in"), "{}", r.violations[0]);
}

#[test]
fn a_planted_deaf_importer_is_named_by_the_watchdog() {
    let r = soak(2, 20_000, Plant::NeverUnmap, Duration::from_secs(2));
    assert!(!r.stuck.is_empty(), "{r}");
    // The stuck revoke names the mapping it waits for: the DMA-API importer's, on nic0.
    assert!(
        r.stuck
            .iter()
            .any(|s| s.contains("(dma-buf map for 0000:04:00.0) of dma-buf #")),
        "{r}"
    );
}
