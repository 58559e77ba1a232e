//! # peerdma-linux — the real machine
//!
//! | module | what |
//! |---|---|
//! | [`vfio`] | VFIO (group/container and cdev) and iommufd on the real kernel, as a [`peerdma_uapi::UapiBackend`] |
//! | [`guest`] | the in-guest tests the QEMU harness runs on the real kernel |
//! | [`sysfs`] | the running machine's PCI topology as a peerdma fabric (sysfs, `/proc/iomem`, `/proc/cpuinfo`) |

pub mod guest;
pub mod sysfs;
pub mod vfio;
