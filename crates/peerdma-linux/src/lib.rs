//! # peerdma-linux — the real machine
//!
//! | module | what |
//! |---|---|
//! | [`sysfs`] | the running machine's PCI topology as a peerdma fabric (sysfs, `/proc/iomem`, `/proc/cpuinfo`) |

pub mod sysfs;
