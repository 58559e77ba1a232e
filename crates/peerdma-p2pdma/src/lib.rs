//! # peerdma-p2pdma — Linux's PCI peer-to-peer DMA rules
//!
//! `drivers/pci/p2pdma.c` of Linux 7.2, on the emulated fabric of [`peerdma_pci`]: which
//! devices can reach which BARs directly, through the root complex, or not at all, and why.
//!
//! | module | kernel | what |
//! |---|---|---|
//! | [`maptype`] | `enum pci_p2pdma_map_type` | the four answers and their numbers |
//! | [`path`] | `calc_map_type_and_dist`, `pci_bridge_has_acs_redir`, `host_bridge_whitelist`, `cpu_supports_p2pdma` | the walk, over a live view or a snapshot |
//! | [`provider`] | `pcim_p2pdma_init`, `pcim_p2pdma_provider`, `pci_p2pdma_map_type`, `pci_p2pdma_bus_addr_map` | bindings, providers, the kernel-facing API and its warnings |
//! | [`cache`] | the `map_types` xarray | per-provider map-type cache, never invalidated |
//! | [`distance`] | `pci_p2pdma_distance_many`, `pci_p2pmem_find_many` | clients, distances, choosing a provider |
//! | [`pool`] | `pci_p2pdma_add_resource`, `pci_alloc_p2pmem`, … | the struct-page p2pmem pool |
//! | [`explain`](mod@explain) | — | why a pair gets its answer, as data, and what would change it |
//! | [`matrix`] | — | all providers × all clients, fast |
//!
//! ```
//! use std::sync::Arc;
//! use peerdma_p2pdma::{P2pDma, MapType, Device};
//! let fabric = Arc::new(peerdma_pci::file::load_str(peerdma_pci::examples::GPU_NIC_SWITCH, "box").unwrap());
//! let (gpu, nic) = (fabric.lookup("gpu0").unwrap(), fabric.lookup("nic0").unwrap());
//! let p2p = P2pDma::new(fabric);
//! let binding = p2p.bind(gpu).unwrap();
//! binding.init().unwrap();
//! let provider = binding.provider(2).unwrap().unwrap();
//! assert_eq!(p2p.map_type(&provider, &Device::Pci(nic)), MapType::BusAddr);
//! ```

pub mod cache;
pub mod distance;
pub mod explain;
pub mod maptype;
pub mod matrix;
pub mod path;
pub mod pool;
pub mod provider;

pub use distance::Device;
pub use explain::{Explanation, explain};
pub use maptype::MapType;
pub use matrix::Matrix;
pub use pool::P2pMem;
pub use provider::{Binding, KernelMessage, P2pDma, P2pError, Provider};
