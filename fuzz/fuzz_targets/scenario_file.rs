//! Any bytes as a scenario file: a scenario or a located error, never a panic. A scenario
//! that loads is played on the emulated QEMU machine, with the kernel configuration it asks
//! for: every step gets an answer without a panic, and no DMA lands in a revoked buffer.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use peerdma_vfio::emulated::Machine;
use peerdma_vfio::pci::KernelConfig;

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    // Big inputs only repeat steps; keep each run short.
    if data.len() > 32 * 1024 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let scenario = match peerdma_scenario::load_str(text, "fuzz") {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let config = KernelConfig {
        pm: scenario.pm.unwrap_or(false),
        thp: scenario.thp.unwrap_or(false),
    };
    let fabric = peerdma_pci::file::load_str(peerdma_pci::examples::QEMU_Q35, "qemu-q35.toml")
        .expect("the example fabric loads");
    let m = Machine::with_config(Arc::new(fabric), config).expect("the machine builds");
    let results = peerdma_scenario::run_all(std::slice::from_ref(&scenario), || m.process());
    assert_eq!(results.len(), scenario.steps.len());
    assert_eq!(m.violation_count(), 0, "a DMA landed in a revoked buffer");
});
