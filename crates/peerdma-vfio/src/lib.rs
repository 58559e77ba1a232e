//! # peerdma-vfio — VFIO on the emulated machine
//!
//! | module | kernel | what |
//! |---|---|---|
//! | [`registration`] | drivers/vfio/vfio_main.c | the device registration count; unregister waits for holders |
//! | [`demo`] | — | the story `peerdma demo` tells, as checked steps |
//! | [`feature`] | drivers/vfio/vfio_main.c | `VFIO_DEVICE_FEATURE` on raw bytes: header checks, `vfio_check_feature` |
//! | [`iommufd`] | drivers/iommu/iommufd/{ioas,io_pagetable,pages}.c | iommufd as a revocable importer whose dead areas stay dead; MAP_FILE and UNMAP in the kernel's check order |
//! | [`rdma`] | drivers/infiniband (ODP umem over dma-buf) | an on-demand-paging RDMA NIC and a static importer |
//! | [`emulated`] | — | the emulated machine behind the same userspace boundary as the real kernel (conformance suite) |
//! | [`pci`] | drivers/vfio/pci/vfio_pci_{core,config,dmabuf}.c | vfio-pci devices: config writes, reset, low power, `memory_lock`, dma-buf export and revocation (one submodule per kernel file) |
//! | [`config`] | drivers/vfio/pci/vfio_pci_config.c | the user's view of config space: chunks, per-register permissions, the per-open copy, BAR virtualisation |
//! | [`watch`] | — | the revocation watch: every landing attributed to the mapping it went through; violations named |
//! | [`soak`] | — | the concurrent soak with its watchdog and end-of-run leak checks |
//! | [`testbed`] | — | the machine the tests, the soak and the revoke benchmark share |

pub mod demo;
pub mod emulated;

pub mod config;
pub mod feature;
pub mod iommufd;
pub mod pci;
pub mod rdma;
pub mod registration;
pub mod soak;
pub mod testbed;
pub mod udmabuf;
pub mod watch;

pub use pci::{DeviceFd, KernelConfig, VfioPci};
pub use registration::{RegRef, Registration};
