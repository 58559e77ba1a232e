//! `calc_map_type_and_dist`: the kernel's walk from provider and client up to a common
//! upstream bridge, the ACS redirect test on every node of the path, and the host-bridge
//! check (CPU rule, allowlist).
//!
//! The algorithm is written once, over a [`PathView`]: [`LiveView`] reads the fabric's
//! registers as the kernel reads config space (used by the kernel-facing API), [`Snapshot`]
//! precomputes the same facts into arrays (used by the all-pairs matrix, where the walk runs
//! millions of times). Both give the same answers; a test checks it.
//!
//! Rules (Linux 7.2):
//! - `upstream(dev)`: a VF stands for its PF; a device on a root bus has none, any other has
//!   the bridge above it. A chain is `[dev, upstream(dev), …]`.
//! - For each node `a` of the provider's chain (distance `i`): test ACS redirect on `a`, then
//!   look for `a` in the client's chain (distance `j`). Found: test ACS redirect on the client's
//!   chain below the common node; `dist = i + j`; no redirect anywhere → `BusAddr`. Not found:
//!   `dist = len(provider chain) + len(client chain)` (the client's ACS is not tested).
//! - Otherwise: `ThruHostBridge` if the CPU forwards (AMD, family ≥ 0x17) or the host bridges
//!   pass the allowlist (the same bridge: its entry with "same bridge" allowed; two bridges:
//!   both entries, each without "same bridge only"), else `NotSupported`.
//! - ACS redirect on a node = its ACS control has RR, CR or EC — tested on every node,
//!   endpoints and the common node included (the common node once, on the provider side).

use peerdma_pci::hostbridge::{self, AllowlistEntry};
use peerdma_pci::{Bdf, Fabric, regs};

use crate::maptype::MapType;

/// The facts the walk needs about a topology.
pub trait PathView {
    /// A device.
    type Node: Copy + Eq;
    /// `pci_upstream_bridge`.
    fn upstream(&self, n: Self::Node) -> Option<Self::Node>;
    /// `pci_bridge_has_acs_redir`: ACS control has RR, CR or EC.
    fn acs_redirect(&self, n: Self::Node) -> bool;
    /// Index of the device's host bridge.
    fn host_bridge(&self, n: Self::Node) -> usize;
    /// `cpu_supports_p2pdma`.
    fn cpu_supports_p2pdma(&self) -> bool;
    /// `__host_bridge_whitelist(host, same_host_bridge)` (without the warning).
    fn host_bridge_allowed(&self, hb: usize, same_host_bridge: bool) -> bool;
}

/// What the host-bridge check looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBridgeCheck {
    /// The CPU rule held (the allowlist was not consulted).
    pub cpu_rule: bool,
    /// Host bridge of the provider.
    pub provider_hb: usize,
    /// Host bridge of the client.
    pub client_hb: usize,
    /// Whether the check passed.
    pub passed: bool,
}

/// The result of one walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome<N> {
    /// The map type.
    pub map_type: MapType,
    /// The kernel's distance.
    pub distance: u32,
    /// The common upstream node, if any.
    pub common: Option<N>,
    /// How many nodes had ACS redirect (counted the kernel's way).
    pub acs_count: u32,
    /// The host-bridge check, when it ran.
    pub host_bridge: Option<HostBridgeCheck>,
}

/// Runs `calc_map_type_and_dist`. `on_acs` hears of every node with ACS redirect, in the
/// kernel's order (provider side up to the common node, then client side below it; with no
/// common node, the provider side only).
pub fn calc<V: PathView>(
    v: &V,
    provider: V::Node,
    client: V::Node,
    mut on_acs: impl FnMut(V::Node),
) -> Outcome<V::Node> {
    let mut acs_count = 0u32;
    let mut dist_a = 0u32;
    let mut dist_b = 0u32;
    let mut common = None;
    let mut a = Some(provider);
    while let Some(an) = a {
        dist_b = 0;
        if v.acs_redirect(an) {
            on_acs(an);
            acs_count += 1;
        }
        let mut bb = Some(client);
        while let Some(bn) = bb {
            if bn == an {
                common = Some(an);
                break;
            }
            bb = v.upstream(bn);
            dist_b += 1;
        }
        if common.is_some() {
            break;
        }
        a = v.upstream(an);
        dist_a += 1;
    }
    let distance = dist_a + dist_b;
    if let Some(c) = common {
        let mut bb = Some(client);
        while let Some(bn) = bb {
            if bn == c {
                break;
            }
            if v.acs_redirect(bn) {
                on_acs(bn);
                acs_count += 1;
            }
            bb = v.upstream(bn);
        }
        if acs_count == 0 {
            return Outcome {
                map_type: MapType::BusAddr,
                distance,
                common,
                acs_count,
                host_bridge: None,
            };
        }
    }
    let (provider_hb, client_hb) = (v.host_bridge(provider), v.host_bridge(client));
    let cpu_rule = v.cpu_supports_p2pdma();
    let passed = cpu_rule
        || if provider_hb == client_hb {
            v.host_bridge_allowed(provider_hb, true)
        } else {
            v.host_bridge_allowed(provider_hb, false) && v.host_bridge_allowed(client_hb, false)
        };
    Outcome {
        map_type: if passed {
            MapType::ThruHostBridge
        } else {
            MapType::NotSupported
        },
        distance,
        common,
        acs_count,
        host_bridge: Some(HostBridgeCheck {
            cpu_rule,
            provider_hb,
            client_hb,
            passed,
        }),
    }
}

/// The allowlist verdict for a root-bus function's IDs.
pub fn allowlist_verdict(ids: Option<(u16, u16)>, same_host_bridge: bool) -> bool {
    match ids.and_then(|(v, d)| hostbridge::allowlist_lookup(v, d)) {
        Some(AllowlistEntry {
            same_host_bridge_only: true,
            ..
        }) => same_host_bridge,
        Some(_) => true,
        None => false,
    }
}

/// `ACS RR | CR | EC`.
pub const ACS_REDIRECT_BITS: u16 = regs::ACS_RR | regs::ACS_CR | regs::ACS_EC;

/// The fabric as the kernel sees it: every question is a config read now.
#[derive(Debug, Clone, Copy)]
pub struct LiveView<'f>(pub &'f Fabric);

impl LiveView<'_> {
    /// The (vendor, device) of a host bridge's root-bus function, if it has one.
    pub fn root_ids(&self, hb: usize) -> Option<(u16, u16)> {
        let b = self.0.root_bus_function(hb)?;
        let f = self.0.function(b).ok()?;
        Some((f.vendor(), f.device()))
    }
}

impl PathView for LiveView<'_> {
    type Node = Bdf;
    fn upstream(&self, n: Bdf) -> Option<Bdf> {
        self.0.upstream_bridge(n).ok().flatten()
    }
    fn acs_redirect(&self, n: Bdf) -> bool {
        self.0
            .acs_ctrl(n)
            .ok()
            .flatten()
            .is_some_and(|c| c & ACS_REDIRECT_BITS != 0)
    }
    fn host_bridge(&self, n: Bdf) -> usize {
        self.0.host_bridge_index(n).unwrap_or(usize::MAX)
    }
    fn cpu_supports_p2pdma(&self) -> bool {
        hostbridge::cpu_forwards_p2p(self.0.platform().cpu)
    }
    fn host_bridge_allowed(&self, hb: usize, same: bool) -> bool {
        allowlist_verdict(self.root_ids(hb), same)
    }
}

const NONE: u32 = u32::MAX;

/// The same facts, read once into arrays.
#[derive(Debug, Clone)]
pub struct Snapshot {
    bdfs: Vec<Bdf>,
    up: Vec<u32>,
    acs: Vec<bool>,
    hb: Vec<u32>,
    cpu: bool,
    allowed_same: Vec<bool>,
    allowed_cross: Vec<bool>,
}

impl Snapshot {
    /// Reads the fabric's current state.
    pub fn of(fabric: &Fabric) -> Snapshot {
        let live = LiveView(fabric);
        let mut bdfs: Vec<Bdf> = fabric.functions().map(peerdma_pci::Function::bdf).collect();
        bdfs.sort();
        let index: std::collections::HashMap<Bdf, u32> = bdfs
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, i as u32))
            .collect();
        let up = bdfs
            .iter()
            .map(|&b| live.upstream(b).map_or(NONE, |u| index[&u]))
            .collect();
        let acs = bdfs.iter().map(|&b| live.acs_redirect(b)).collect();
        let hb = bdfs.iter().map(|&b| live.host_bridge(b) as u32).collect();
        let n = fabric.host_bridges().len();
        Snapshot {
            bdfs,
            up,
            acs,
            hb,
            cpu: live.cpu_supports_p2pdma(),
            allowed_same: (0..n).map(|h| live.host_bridge_allowed(h, true)).collect(),
            allowed_cross: (0..n).map(|h| live.host_bridge_allowed(h, false)).collect(),
        }
    }

    /// The node of a function.
    pub fn node(&self, bdf: Bdf) -> Option<u32> {
        self.bdfs.binary_search(&bdf).ok().map(|i| i as u32)
    }

    /// The function of a node.
    pub fn bdf(&self, n: u32) -> Bdf {
        self.bdfs[n as usize]
    }

    /// How many functions.
    pub fn len(&self) -> usize {
        self.bdfs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bdfs.is_empty()
    }
}

impl PathView for Snapshot {
    type Node = u32;
    fn upstream(&self, n: u32) -> Option<u32> {
        let u = self.up[n as usize];
        (u != NONE).then_some(u)
    }
    fn acs_redirect(&self, n: u32) -> bool {
        self.acs[n as usize]
    }
    fn host_bridge(&self, n: u32) -> usize {
        self.hb[n as usize] as usize
    }
    fn cpu_supports_p2pdma(&self) -> bool {
        self.cpu
    }
    fn host_bridge_allowed(&self, hb: usize, same: bool) -> bool {
        if same {
            self.allowed_same[hb]
        } else {
            self.allowed_cross[hb]
        }
    }
}

/// The kernel's `pci=disable_acs_redir=` value for a list of nodes: `name;name;…` built in a
/// 128-byte buffer; the final `;` is dropped unless the buffer overflowed (then the text is
/// cut at 127 bytes). Returns the text and whether it overflowed.
pub fn acs_list_string(nodes: &[Bdf]) -> (String, bool) {
    const SIZE: usize = 128;
    let mut s = String::new();
    for n in nodes {
        let e = format!("{n};");
        if e.len() < SIZE - s.len() {
            s.push_str(&e);
        } else {
            let room = SIZE - 1 - s.len();
            s.push_str(&e[..room]);
            return (s, true);
        }
    }
    s.pop();
    (s, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acs_list_drops_the_last_semicolon_unless_it_overflows() {
        let b = |s: &str| s.parse::<Bdf>().unwrap();
        assert_eq!(
            acs_list_string(&[b("0000:02:00.0")]),
            ("0000:02:00.0".to_string(), false)
        );
        assert_eq!(
            acs_list_string(&[b("0000:02:00.0"), b("0000:00:01.0")]),
            ("0000:02:00.0;0000:00:01.0".to_string(), false)
        );
        let many: Vec<Bdf> = (0..12).map(|i| Bdf::new(0, i, 0, 0).unwrap()).collect();
        let (s, over) = acs_list_string(&many);
        assert!(over);
        assert_eq!(s.len(), 127);
        let nine = acs_list_string(&many[..9]);
        assert!(!nine.1);
        assert_eq!(nine.0.len(), 9 * 13 - 1);
    }

    #[test]
    fn allowlist_verdicts() {
        assert!(allowlist_verdict(Some((0x8086, 0x2020)), false));
        assert!(allowlist_verdict(Some((0x8086, 0x3c00)), true));
        assert!(!allowlist_verdict(Some((0x8086, 0x3c00)), false));
        assert!(!allowlist_verdict(Some((0x8086, 0x0001)), true));
        assert!(!allowlist_verdict(None, true));
    }
}
