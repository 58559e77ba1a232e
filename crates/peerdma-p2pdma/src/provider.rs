//! Providers and the per-device P2PDMA state (`pcim_p2pdma_init`, `pcim_p2pdma_provider`,
//! `pci_p2pdma_map_type`, `calc_map_type_and_dist`).
//!
//! **Lifetimes.** P2PDMA state belongs to a driver's binding to a device: [`P2pDma::bind`]
//! gives a [`Binding`], `Binding::init` creates the state, and dropping the binding (driver
//! unbind) releases it — the kernel's device-managed release. A [`Provider`] handed out while
//! bound keeps describing its BAR afterwards, but it is dead: [`Provider::is_live`] turns false
//! and every map-type question about it answers `NotSupported`, as the kernel does once
//! `pdev->p2pdma` is gone. Users must stop using providers before the binding goes (VFIO does
//! so by revoking its dma-bufs).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use peerdma_pci::generate::Rng;
use peerdma_pci::sync::{self, Arc, Mutex, RwLock};
use peerdma_pci::{AsErrno, Bdf, BusAddr, Errno, Fabric, PhysAddr};

use crate::cache::{MapTypeCache, map_types_idx};
use crate::distance::Device;
use crate::maptype::MapType;
use crate::path::{self, LiveView};
use crate::pool::Pool;

/// Errors of the P2PDMA layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum P2pError {
    /// No such PCI function.
    #[error("no PCI function {0}")]
    NoDevice(Bdf),
    /// A driver is already bound to the function.
    #[error("{0} already has a driver bound")]
    Busy(Bdf),
    /// `pcim_p2pdma_provider` before `pcim_p2pdma_init` (the kernel WARNs and returns NULL).
    #[error("P2PDMA is not initialised for {0}: call init() first")]
    NotInitialised(Bdf),
    /// The device cannot take part in P2PDMA (its BARs are not mappable).
    #[error("{0} cannot provide P2PDMA memory: its BARs are not mappable")]
    NotSupported(Bdf),
    /// `pci_p2pdma_add_resource` arguments the kernel refuses.
    #[error("{bdf} BAR {bar}: {why}")]
    BadResource {
        /// The function.
        bdf: Bdf,
        /// The BAR.
        bar: u8,
        /// What is wrong.
        why: String,
    },
}

impl AsErrno for P2pError {
    fn errno(&self) -> Errno {
        match self {
            P2pError::NoDevice(_) => Errno::ENODEV,
            P2pError::Busy(_) => Errno::EBUSY,
            P2pError::NotInitialised(_) | P2pError::BadResource { .. } => Errno::EINVAL,
            P2pError::NotSupported(_) => Errno::EOPNOTSUPP,
        }
    }
}

/// A line the kernel would have printed (`pci_warn`, `pci_info`, `dev_warn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelMessage {
    /// `warn` or `info`.
    pub level: &'static str,
    /// The device the line is about (`0000:03:00.0`, or a non-PCI device's name).
    pub device: String,
    /// The text.
    pub text: String,
}

impl fmt::Display for KernelMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.device.parse::<Bdf>().is_ok() {
            write!(f, "pci {}: {}", self.device, self.text)
        } else {
            write!(f, "{}: {}", self.device, self.text)
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ProviderSlot {
    pub(crate) bar: u8,
    pub(crate) bus_offset: u64,
}

/// The P2PDMA state of one device (`struct pci_p2pdma`).
pub(crate) struct DevState {
    pub(crate) bdf: Bdf,
    pub(crate) providers: [Option<ProviderSlot>; 6],
    pub(crate) cache: MapTypeCache,
    pub(crate) pool: Mutex<Option<Pool>>,
    pub(crate) published: AtomicBool,
    pub(crate) live: AtomicBool,
}

/// One memory BAR of a device, as a source of peer-to-peer memory (`struct p2pdma_provider`).
#[derive(Clone)]
pub struct Provider {
    pub(crate) dev: Arc<DevState>,
    pub(crate) slot: ProviderSlot,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("owner", &self.dev.bdf)
            .field("bar", &self.slot.bar)
            .field("bus_offset", &format_args!("{:#x}", self.slot.bus_offset))
            .field("live", &self.is_live())
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// The function whose BAR this is.
    pub fn owner(&self) -> Bdf {
        self.dev.bdf
    }
    /// The BAR index.
    pub fn bar(&self) -> u8 {
        self.slot.bar
    }
    /// Bus address minus CPU address of the BAR (wrapping, as the kernel computes it).
    pub fn bus_offset(&self) -> u64 {
        self.slot.bus_offset
    }
    /// Whether the driver binding that created it still exists.
    pub fn is_live(&self) -> bool {
        self.dev.live.load(Ordering::Acquire)
    }
    /// `pci_p2pdma_bus_addr_map`: the bus address of a CPU physical address in the BAR.
    pub fn bus_addr_map(&self, paddr: PhysAddr) -> BusAddr {
        BusAddr(paddr.get().wrapping_add(self.slot.bus_offset))
    }
    /// Whether two handles name the same provider of the same binding.
    pub fn same_as(&self, other: &Provider) -> bool {
        Arc::ptr_eq(&self.dev, &other.dev) && self.slot.bar == other.slot.bar
    }
}

/// The P2PDMA subsystem of one emulated machine.
pub struct P2pDma {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) devs: RwLock<HashMap<Bdf, Arc<DevState>>>,
    bound: Mutex<HashSet<Bdf>>,
    non_mappable: RwLock<HashSet<Bdf>>,
    log: Mutex<Vec<KernelMessage>>,
    pub(crate) rng: Mutex<Rng>,
}

impl fmt::Debug for P2pDma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2pDma")
            .field("devices", &sync::read(&self.devs).len())
            .finish_non_exhaustive()
    }
}

/// A driver bound to a device: owner of the device's P2PDMA state. Dropping it is driver
/// unbind: the state is released and its providers die.
pub struct Binding {
    sys: Arc<P2pDma>,
    bdf: Bdf,
}

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("bdf", &self.bdf)
            .finish_non_exhaustive()
    }
}

impl P2pDma {
    /// The subsystem for a fabric; `find_many` draws ties with a generator seeded with 0.
    pub fn new(fabric: Arc<Fabric>) -> Arc<P2pDma> {
        P2pDma::with_seed(fabric, 0)
    }

    /// The same, with a chosen seed for `find_many`'s random choice among equals.
    pub fn with_seed(fabric: Arc<Fabric>, seed: u64) -> Arc<P2pDma> {
        Arc::new(P2pDma {
            fabric,
            devs: RwLock::new(HashMap::new()),
            bound: Mutex::new(HashSet::new()),
            non_mappable: RwLock::new(HashSet::new()),
            log: Mutex::new(Vec::new()),
            rng: Mutex::new(Rng::new(seed)),
        })
    }

    /// The fabric.
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    /// Binds a driver to a device (one at a time).
    pub fn bind(self: &Arc<Self>, bdf: Bdf) -> Result<Binding, P2pError> {
        self.fabric
            .function(bdf)
            .map_err(|_| P2pError::NoDevice(bdf))?;
        if !sync::lock(&self.bound).insert(bdf) {
            return Err(P2pError::Busy(bdf));
        }
        Ok(Binding {
            sys: self.clone(),
            bdf,
        })
    }

    /// Marks a device as having BARs that cannot be mapped (later kernels'
    /// `non_mappable_bars`): its P2PDMA init then fails with `EOPNOTSUPP`.
    pub fn set_non_mappable_bars(&self, bdf: Bdf, on: bool) {
        let mut s = sync::write(&self.non_mappable);
        if on {
            s.insert(bdf);
        } else {
            s.remove(&bdf);
        }
    }

    pub(crate) fn state(&self, bdf: Bdf) -> Option<Arc<DevState>> {
        sync::read(&self.devs).get(&bdf).cloned()
    }

    /// Whether a device has P2PDMA state now.
    pub fn is_initialised(&self, bdf: Bdf) -> bool {
        self.state(bdf).is_some()
    }

    pub(crate) fn warn(&self, device: impl Into<String>, text: String) {
        let m = KernelMessage {
            level: "warn",
            device: device.into(),
            text,
        };
        tracing::warn!(target: "peerdma::p2pdma", "{m}");
        sync::lock(&self.log).push(m);
    }

    pub(crate) fn info(&self, device: impl Into<String>, text: String) {
        let m = KernelMessage {
            level: "info",
            device: device.into(),
            text,
        };
        tracing::info!(target: "peerdma::p2pdma", "{m}");
        sync::lock(&self.log).push(m);
    }

    /// What the kernel would have printed so far.
    pub fn messages(&self) -> Vec<KernelMessage> {
        sync::lock(&self.log).clone()
    }

    /// Empties the message log and returns it.
    pub fn take_messages(&self) -> Vec<KernelMessage> {
        std::mem::take(&mut *sync::lock(&self.log))
    }

    /// `pci_p2pdma_map_type(provider, dev)`: a dead provider or a non-PCI client →
    /// `NotSupported`; a cached answer if there is one; else computed (with the kernel's
    /// warnings) and cached.
    pub fn map_type(&self, provider: &Provider, client: &Device) -> MapType {
        if !provider.is_live() {
            return MapType::NotSupported;
        }
        let Device::Pci(client) = client else {
            return MapType::NotSupported;
        };
        match provider.dev.cache.load(map_types_idx(*client)) {
            MapType::Unknown => {
                self.calc_map_type_and_dist(provider.dev.bdf, *client, true)
                    .0
            }
            t => t,
        }
    }

    /// What the provider device's cache holds for a client (`Unknown` if nothing, or if the
    /// device has no P2PDMA state).
    pub fn cached(&self, provider: Bdf, client: Bdf) -> MapType {
        self.state(provider)
            .map_or(MapType::Unknown, |d| d.cache.load(map_types_idx(client)))
    }

    /// `calc_map_type_and_dist(provider, client, &dist, verbose)`: computes, prints the
    /// kernel's warnings when `verbose`, stores the answer in the provider device's cache (if
    /// it has P2PDMA state), and returns the map type and distance.
    pub fn calc_map_type_and_dist(
        &self,
        provider: Bdf,
        client: Bdf,
        verbose: bool,
    ) -> (MapType, u32) {
        let live = LiveView(&self.fabric);
        let mut acs = Vec::new();
        let out = path::calc(&live, provider, client, |n| acs.push(n));
        if verbose && out.common.is_some() && out.acs_count > 0 {
            let (list, _) = path::acs_list_string(&acs);
            self.warn(
                client.to_string(),
                format!("ACS redirect is set between the client and provider ({provider})"),
            );
            self.warn(
                client.to_string(),
                format!(
                    "to disable ACS redirect for this path, add the kernel parameter: pci=disable_acs_redir={list}"
                ),
            );
        }
        if let Some(hb) = out.host_bridge {
            if verbose && !hb.cpu_rule {
                // The allowlist warns for each bridge it looks at and finds nothing for, with
                // the kernel's short-circuit: a second bridge is not looked at once the first
                // failed.
                let same = hb.provider_hb == hb.client_hb;
                for h in [hb.provider_hb, hb.client_hb]
                    .into_iter()
                    .take(if same { 1 } else { 2 })
                {
                    let ids = live.root_ids(h);
                    let known =
                        ids.and_then(|(v, d)| peerdma_pci::hostbridge::allowlist_lookup(v, d));
                    if known.is_none() {
                        if let (Some(root), Some((v, d))) = (self.fabric.root_bus_function(h), ids)
                        {
                            self.warn(
                                root.to_string(),
                                format!("Host bridge not in P2PDMA whitelist: {v:04x}:{d:04x}"),
                            );
                        }
                    }
                    if !path::allowlist_verdict(ids, same) {
                        break;
                    }
                }
            }
            if verbose && !hb.passed {
                self.warn(
                    client.to_string(),
                    format!(
                        "cannot be used for peer-to-peer DMA as the client and provider ({provider}) do not share an upstream bridge or whitelisted host bridge"
                    ),
                );
            }
        }
        if let Some(dev) = self.state(provider) {
            dev.cache.store(map_types_idx(client), out.map_type);
        }
        (out.map_type, out.distance)
    }
}

impl Binding {
    /// The bound device.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The subsystem.
    pub fn p2pdma(&self) -> &Arc<P2pDma> {
        &self.sys
    }

    /// `pcim_p2pdma_init`: creates one provider per memory BAR (I/O and unimplemented BARs
    /// get none), with `bus_offset = bus address − CPU address`. Idempotent. Devices with
    /// non-mappable BARs: `EOPNOTSUPP`.
    pub fn init(&self) -> Result<(), P2pError> {
        if sync::read(&self.sys.non_mappable).contains(&self.bdf) {
            return Err(P2pError::NotSupported(self.bdf));
        }
        let mut devs = sync::write(&self.sys.devs);
        if devs.contains_key(&self.bdf) {
            return Ok(());
        }
        let fabric = &self.sys.fabric;
        let mut providers = [None; 6];
        for b in fabric
            .bar_states(self.bdf)
            .map_err(|_| P2pError::NoDevice(self.bdf))?
        {
            if b.bar.kind.is_mem() {
                let cpu = b.cpu.map_or(b.bus.get(), PhysAddr::get);
                providers[usize::from(b.bar.index)] = Some(ProviderSlot {
                    bar: b.bar.index,
                    bus_offset: b.bus.get().wrapping_sub(cpu),
                });
            }
        }
        devs.insert(
            self.bdf,
            Arc::new(DevState {
                bdf: self.bdf,
                providers,
                cache: MapTypeCache::new(),
                pool: Mutex::new(None),
                published: AtomicBool::new(false),
                live: AtomicBool::new(true),
            }),
        );
        Ok(())
    }

    /// `pcim_p2pdma_provider(pdev, bar)`: the provider of a memory BAR; `Ok(None)` for an I/O
    /// or unimplemented BAR or an index past 5; an error before `init`.
    pub fn provider(&self, bar: u8) -> Result<Option<Provider>, P2pError> {
        let dev = self
            .sys
            .state(self.bdf)
            .ok_or(P2pError::NotInitialised(self.bdf))?;
        Ok(dev
            .providers
            .get(usize::from(bar))
            .copied()
            .flatten()
            .map(|slot| Provider {
                dev: dev.clone(),
                slot,
            }))
    }

    /// `pci_p2pmem_publish`: makes the pool visible to `find_many` (no-op without state).
    pub fn publish(&self, publish: bool) {
        if let Some(d) = self.sys.state(self.bdf) {
            d.published.store(publish, Ordering::Release);
        }
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if let Some(dev) = sync::write(&self.sys.devs).remove(&self.bdf) {
            dev.live.store(false, Ordering::Release);
            *sync::lock(&dev.pool) = None;
        }
        sync::lock(&self.sys.bound).remove(&self.bdf);
    }
}
