//! The example fabrics shipped in the project's `examples/` folder, compiled in.

/// A realistic GPU server: Ice Lake-SP host bridge, a PCIe switch with two GPUs and an
/// SR-IOV NIC (ACS redirect disabled on the switch, as for GPUDirect), an NVMe drive and an
/// accelerator on their own root ports. The default platform of the CLI.
pub const GPU_SERVER: &str = include_str!("../../../examples/gpu-server.toml");
/// A one-switch box: a GPU and a NIC under the same switch.
pub const GPU_NIC_SWITCH: &str = include_str!("../../../examples/gpu-nic-switch.toml");
/// A two-root-port server with ACS redirect on everywhere (P2P goes through the root complex).
pub const TWO_ROOT_PORTS_ACS: &str = include_str!("../../../examples/two-root-ports-acs.toml");
/// An Arm server whose host bridge places the bus at a non-zero offset from CPU addresses.
pub const ARM_OFFSET: &str = include_str!("../../../examples/arm-offset.toml");
/// An SR-IOV NIC with named VFs.
pub const SRIOV_NIC: &str = include_str!("../../../examples/sriov-nic.toml");
/// An AMD machine with two host bridges.
pub const TWO_HOST_BRIDGES: &str = include_str!("../../../examples/two-host-bridges.toml");
/// The QEMU harness's machine (q35, Intel IOMMU, a switch with ivshmem and edu below it):
/// the emulated backend of the conformance suite.
pub const QEMU_Q35: &str = include_str!("../../../examples/qemu-q35.toml");

/// Every example, with its file name.
pub const ALL: [(&str, &str); 7] = [
    ("gpu-server.toml", GPU_SERVER),
    ("gpu-nic-switch.toml", GPU_NIC_SWITCH),
    ("two-root-ports-acs.toml", TWO_ROOT_PORTS_ACS),
    ("arm-offset.toml", ARM_OFFSET),
    ("sriov-nic.toml", SRIOV_NIC),
    ("two-host-bridges.toml", TWO_HOST_BRIDGES),
    ("qemu-q35.toml", QEMU_Q35),
];
