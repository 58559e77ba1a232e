//! The demo's story on the built-in GPU server: every step must hold.

use std::sync::Arc;

use peerdma_pci::{examples, file};
use peerdma_vfio::demo::{Cast, run};

#[test]
fn the_demo_story_holds_on_the_gpu_server() {
    let fabric = Arc::new(file::load_str(examples::GPU_SERVER, "gpu-server.toml").unwrap());
    let steps = run(&fabric, &Cast::default());
    let names: Vec<&str> = steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        names,
        [
            "export",
            "nic-dma",
            "iommufd-dma",
            "flr",
            "old-addresses-fault",
            "revoked-maps-refused",
            "memory-back",
            "closed",
            "no-landing-while-revoked"
        ],
        "{steps:#?}"
    );
    assert!(steps.iter().all(|s| s.ok), "{steps:#?}");
    assert!(steps[1].detail.contains("bus_addr"), "{}", steps[1].detail);
    assert!(
        steps[2].detail.contains("thru_host_bridge"),
        "{}",
        steps[2].detail
    );
}

#[test]
fn the_demo_reports_a_missing_cast_member() {
    let fabric = Arc::new(file::load_str(examples::GPU_SERVER, "gpu-server.toml").unwrap());
    let steps = run(
        &fabric,
        &Cast {
            far: "nope".into(),
            ..Cast::default()
        },
    );
    assert_eq!(steps.len(), 1);
    assert!(!steps[0].ok);
}
