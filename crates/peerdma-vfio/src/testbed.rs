//! The machine the vfio tests, the soak and the revoke benchmark share (`testbed.toml`):
//! gpu0 exports its 64 GiB BAR 2 and has PCIe FLR and AF FLR; nic0 sits beside it under one
//! switch (bus addresses); nic1 is behind another root port of the same host bridge (IOVAs
//! through the IOMMU). Both NICs are configured to use the IOMMU, so only the topology decides
//! which path each gets.

use peerdma_dma::{DmaConfig, DmaSystem};
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_p2pdma::P2pDma;
use peerdma_pci::sync::Arc;
use peerdma_pci::{Bdf, Fabric, file};

/// The fabric file.
pub const PLATFORM: &str = include_str!("testbed.toml");

/// The machine, built.
#[derive(Debug)]
pub struct Testbed {
    /// The hardware.
    pub fabric: Arc<Fabric>,
    /// The DMA and P2PDMA layers on it.
    pub env: DmaEnv,
    /// The exporting GPU.
    pub gpu: Bdf,
    /// The NIC beside it (bus addresses).
    pub nic0: Bdf,
    /// The NIC behind another root port (through the IOMMU).
    pub nic1: Bdf,
}

/// Builds the machine.
pub fn testbed() -> Result<Testbed, String> {
    testbed_from(PLATFORM)
}

/// Builds a variant of the machine from its fabric file's text (the same names must be in
/// it: gpu0, nic0, nic1).
pub fn testbed_from(text: &str) -> Result<Testbed, String> {
    let fabric = Arc::new(file::load_str(text, "testbed.toml").map_err(|e| e.to_string())?);
    let dma = Arc::new(DmaSystem::new(fabric.clone(), true));
    let p2p = P2pDma::new(fabric.clone());
    let look = |n: &str| fabric.lookup(n).map_err(|e| e.to_string());
    let (gpu, nic0, nic1) = (look("gpu0")?, look("nic0")?, look("nic1")?);
    for d in [nic0, nic1] {
        dma.configure(
            d,
            DmaConfig {
                iommu: true,
                ..DmaConfig::default()
            },
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(Testbed {
        fabric,
        env: DmaEnv { dma, p2p },
        gpu,
        nic0,
        nic1,
    })
}

/// The QEMU harness's machine (the `qemu-q35` example fabric) with vfio-pci bound to every
/// endpoint, on a kernel built as `config` says: what the scenario suite runs against.
pub fn qemu_machine(config: crate::KernelConfig) -> Result<crate::emulated::Machine, String> {
    machine_from(peerdma_pci::examples::QEMU_Q35, config)
}

/// The machine a fabric file's `text` describes, with vfio-pci bound to every endpoint, on a
/// kernel built as `config` says.
pub fn machine_from(
    text: &str,
    config: crate::KernelConfig,
) -> Result<crate::emulated::Machine, String> {
    let f = file::load_str(text, "fabric.toml").map_err(|e| e.to_string())?;
    crate::emulated::Machine::with_config(Arc::new(f), config).map_err(|e| e.to_string())
}
