//! Clients (`struct device`), `pci_p2pdma_distance_many` and `pci_p2pmem_find_many`.

use peerdma_pci::Bdf;
use peerdma_pci::sync;

use crate::maptype::MapType;
use crate::provider::P2pDma;

/// A device that may take part in peer-to-peer DMA: a PCI function, or something else (an
/// NVMe namespace, a platform device) that may have a PCI device above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A PCI function.
    Pci(Bdf),
    /// Not a PCI device.
    Other {
        /// Its name, for messages.
        name: String,
        /// Its parent, if any.
        parent: Option<Box<Device>>,
    },
}

impl Device {
    /// `find_parent_pci_dev`: itself if PCI, else the nearest PCI ancestor.
    pub fn pci_ancestor(&self) -> Option<Bdf> {
        match self {
            Device::Pci(b) => Some(*b),
            Device::Other { parent, .. } => parent.as_ref().and_then(|p| p.pci_ancestor()),
        }
    }

    /// Its name for messages.
    pub fn name(&self) -> String {
        match self {
            Device::Pci(b) => b.to_string(),
            Device::Other { name, .. } => name.clone(),
        }
    }
}

impl From<Bdf> for Device {
    fn from(b: Bdf) -> Device {
        Device::Pci(b)
    }
}

impl P2pDma {
    /// `pci_p2pdma_distance_many(provider, clients, verbose)`: the sum of the distances, or
    /// −1 if there are no clients, a client is not (below) a PCI device, or any client is
    /// not supported. Verbose mode keeps going to print every reason.
    pub fn distance_many(&self, provider: Bdf, clients: &[Device], verbose: bool) -> i32 {
        if clients.is_empty() {
            return -1;
        }
        let mut not_supported = false;
        let mut total: i32 = 0;
        for c in clients {
            let Some(pci) = c.pci_ancestor() else {
                if verbose {
                    self.warn(
                        c.name(),
                        "cannot be used for peer-to-peer DMA as it is not a PCI device".to_string(),
                    );
                }
                return -1;
            };
            let (map, d) = self.calc_map_type_and_dist(provider, pci, verbose);
            if map == MapType::NotSupported {
                not_supported = true;
            }
            if not_supported && !verbose {
                break;
            }
            total = total.saturating_add(i32::try_from(d).unwrap_or(i32::MAX));
        }
        if not_supported { -1 } else { total }
    }

    /// `pci_p2pdma_distance(provider, client, verbose)`.
    pub fn distance(&self, provider: Bdf, client: &Device, verbose: bool) -> i32 {
        self.distance_many(provider, std::slice::from_ref(client), verbose)
    }

    /// `pci_p2pmem_find_many(clients)`: among devices with published pool memory, in
    /// enumeration order, the closest to all clients; a random one among equals (at most 512
    /// are kept, as the kernel's one-page list).
    pub fn find_many(&self, clients: &[Device]) -> Option<Bdf> {
        const MAX_DEVS: usize = 4096 / 8;
        let mut all: Vec<Bdf> = self
            .fabric
            .functions()
            .map(peerdma_pci::Function::bdf)
            .collect();
        all.sort();
        let mut best = i32::MAX;
        let mut closest: Vec<Bdf> = Vec::new();
        for pdev in all {
            if !self.has_p2pmem(pdev) {
                continue;
            }
            let d = self.distance_many(pdev, clients, false);
            if d < 0 || d > best {
                continue;
            }
            if d == best && closest.len() >= MAX_DEVS {
                continue;
            }
            if d < best {
                closest.clear();
                best = d;
            }
            closest.push(pdev);
        }
        if closest.is_empty() {
            return None;
        }
        let i = sync::lock(&self.rng).below(closest.len() as u64) as usize;
        Some(closest[i])
    }
}
