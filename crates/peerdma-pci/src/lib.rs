//! # peerdma-pci — the emulated PCIe hardware
//!
//! The bottom layer of peerdma: a PCIe platform that really moves bytes. Everything above it
//! (P2P analysis, the DMA API, dma-buf, VFIO) runs on this model, and every test that says
//! "the bytes landed" reads them back from here.
//!
//! | module | what it is |
//! |---|---|
//! | [`addr`] | address newtypes (`PhysAddr`, `BusAddr`, `DmaAddr`, `Iova`) and `Span`, all checked |
//! | [`bdf`] | `Bdf`: `0000:03:00.0` |
//! | [`errno`] | Linux errno numbers, shared by every layer |
//! | [`size`] | `"16M"`-style sizes |
//! | [`regs`] | config register offsets and bits |
//! | [`config`] | a function's 4 KiB register file, write masks, capability chains |
//! | [`function`] | a function: BARs, capabilities, what config writes do (FLR, PM, SBR) |
//! | [`memory`] | sparse backing memory for RAM and BARs |
//! | [`spec`] | the platform description (what a fabric file says) |
//! | [`file`](mod@file) | fabric files: TOML → spec, errors with file, line and key |
//! | [`build`] | spec → live fabric: validation, bus numbers, BAR assignment |
//! | [`generate`] | random platforms for property tests and benchmarks |
//! | [`hostbridge`] | which root complexes forward peer-to-peer (CPU rule and allowlist) |
//! | [`fabric`] | the live platform: config access, resets, events, memory views |
//! | [`route`] | memory-request routing: DMA and CPU access, routes and faults |
//! | [`translate`] | the root complex's address-translation hook (identity; IOMMU later) |
//! | [`topology`] | a serialisable snapshot of the platform (the `topo --json` contract) |
//! | [`sync`] | the lock types every crate uses |
//!
//! ```
//! use peerdma_pci::{Fabric, file, addr::DmaAddr};
//! let fabric = file::load_str(peerdma_pci::examples::GPU_NIC_SWITCH, "gpu-nic-switch.toml").unwrap();
//! let gpu = fabric.lookup("gpu0").unwrap();
//! let nic = fabric.lookup("nic0").unwrap();
//! let bar = fabric.bar(gpu, 0).unwrap();
//! // The NIC writes into the GPU's BAR by its bus address: the switch routes it peer to peer.
//! let t = fabric.dma_write(nic, DmaAddr(bar.bus.get()), b"hello").unwrap();
//! assert!(!t.via_root_complex());
//! let mut back = [0u8; 5];
//! fabric.bar_peek(gpu, 0, 0, &mut back).unwrap();
//! assert_eq!(&back, b"hello");
//! ```

pub mod addr;
pub mod bdf;
pub mod build;
pub mod config;
pub mod errno;
pub mod error;
pub mod examples;
pub mod fabric;
pub mod file;
pub mod function;
pub mod generate;
pub mod hostbridge;
pub mod memory;
pub mod model;
pub mod regs;
pub mod route;
pub mod size;
pub mod spec;
pub mod sync;
pub mod topology;
pub mod translate;

pub use addr::{BusAddr, DmaAddr, Iova, PhysAddr, Span};
pub use bdf::Bdf;
pub use errno::{AsErrno, Errno};
pub use error::{FabricError, PciError};
pub use fabric::{Fabric, FabricEvent, FabricObserver, HostBridge};
pub use function::{Bar, Function, PowerState, ResetCause};
pub use route::{DmaFault, FaultReason, Hop, Route, Target, Transfer};
pub use spec::{BarType, DeviceKind, FabricSpec, P2pForwarding};
pub use translate::{Access, AddressTranslator};
