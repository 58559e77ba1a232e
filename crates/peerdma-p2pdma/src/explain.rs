//! Why a provider/client pair gets its map type, as data, and what would change it.

use peerdma_pci::hostbridge;
use peerdma_pci::spec::{CpuVendor, acs_names};
use peerdma_pci::{Bdf, Fabric};
use serde::Serialize;

use crate::maptype::MapType;
use crate::path::{self, ACS_REDIRECT_BITS, LiveView, PathView};

/// One device on a chain.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// Address.
    pub bdf: String,
    /// Kind.
    pub kind: String,
    /// Name, if any.
    pub name: Option<String>,
    /// ACS control bits that are on (`None`: no ACS capability).
    pub acs: Option<Vec<String>>,
    /// Whether its ACS redirects (RR, CR or EC on).
    pub redirect: bool,
}

/// What the allowlist says about one host bridge.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BridgeVerdict {
    /// Host bridge name.
    pub host_bridge: String,
    /// The root-bus function looked at (devfn 00.0 or the first root port), if any.
    pub root_function: Option<String>,
    /// Its vendor ID.
    pub vendor: Option<u16>,
    /// Its device ID.
    pub device: Option<u16>,
    /// `any`, `same_host_bridge_only`, or `None` when not on the allowlist.
    pub allowlist: Option<String>,
    /// Whether this bridge passes for this pair.
    pub passed: bool,
}

/// The host-bridge check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostBridgeDecision {
    /// The CPU rule applied (AMD, family ≥ 0x17): the allowlist was not needed.
    pub cpu_rule: bool,
    /// `vendor family` of the CPU.
    pub cpu: String,
    /// Provider and client are under the same host bridge.
    pub same_host_bridge: bool,
    /// The bridges and their verdicts.
    pub bridges: Vec<BridgeVerdict>,
    /// The outcome.
    pub passed: bool,
}

/// A full account of one pair.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// Provider function.
    pub provider: String,
    /// Client function.
    pub client: String,
    /// The decision.
    pub map_type: MapType,
    /// The kernel's distance.
    pub distance: u32,
    /// `[provider, upstream(provider), …]` to a root bus.
    pub provider_chain: Vec<NodeInfo>,
    /// `[client, upstream(client), …]` to a root bus.
    pub client_chain: Vec<NodeInfo>,
    /// The first node the chains share.
    pub common_ancestor: Option<String>,
    /// Nodes whose ACS redirect the kernel counted, in its order.
    pub acs_redirect: Vec<String>,
    /// Whether ACS decided anything (false when the chains do not meet: the path crosses a
    /// host bridge regardless).
    pub acs_considered: bool,
    /// The `pci=disable_acs_redir=` value that would make the pair switch-local, if ACS is
    /// what stands in the way.
    pub disable_acs_redir: Option<String>,
    /// The host-bridge check, when it ran.
    pub host_bridge: Option<HostBridgeDecision>,
    /// Why, in one paragraph.
    pub reason: String,
    /// What would change the outcome.
    pub what_would_change: Vec<String>,
}

fn node_info(fabric: &Fabric, b: Bdf) -> NodeInfo {
    let f = fabric.function(b).ok();
    let acs = fabric.acs_ctrl(b).ok().flatten();
    NodeInfo {
        bdf: b.to_string(),
        kind: f.map(|f| f.kind().as_str().to_string()).unwrap_or_default(),
        name: f.and_then(|f| f.name().map(str::to_string)),
        acs: acs.map(|a| acs_names(a).into_iter().map(str::to_string).collect()),
        redirect: acs.is_some_and(|a| a & ACS_REDIRECT_BITS != 0),
    }
}

fn chain(v: LiveView<'_>, from: Bdf) -> Vec<Bdf> {
    let mut out = vec![from];
    let mut cur = from;
    while let Some(u) = v.upstream(cur) {
        out.push(u);
        cur = u;
    }
    out
}

/// Names a function with its name if it has one: `0000:03:00.0 (gpu0)`.
pub fn label(fabric: &Fabric, b: Bdf) -> String {
    match fabric.function(b).ok().and_then(|f| f.name()) {
        Some(n) => format!("{b} ({n})"),
        None => b.to_string(),
    }
}

/// Explains a pair, reading the fabric as it is now (no cache involved, nothing printed).
pub fn explain(fabric: &Fabric, provider: Bdf, client: Bdf) -> Explanation {
    let live = LiveView(fabric);
    let mut acs = Vec::new();
    let out = path::calc(&live, provider, client, |n| acs.push(n));
    let pchain = chain(live, provider);
    let cchain = chain(live, client);
    let (plabel, clabel) = (label(fabric, provider), label(fabric, client));
    let platform_cpu = fabric.platform().cpu;
    let host_bridge = out.host_bridge.map(|hb| {
        let same = hb.provider_hb == hb.client_hb;
        let bridges = if same {
            vec![hb.provider_hb]
        } else {
            vec![hb.provider_hb, hb.client_hb]
        };
        HostBridgeDecision {
            cpu_rule: hb.cpu_rule,
            cpu: format!(
                "{} family {:#x}",
                platform_cpu.vendor.as_str(),
                platform_cpu.family
            ),
            same_host_bridge: same,
            bridges: bridges
                .into_iter()
                .map(|h| {
                    let ids = live.root_ids(h);
                    let entry = ids.and_then(|(v, d)| hostbridge::allowlist_lookup(v, d));
                    BridgeVerdict {
                        host_bridge: fabric.host_bridges()[h].name().to_string(),
                        root_function: fabric.root_bus_function(h).map(|b| b.to_string()),
                        vendor: ids.map(|i| i.0),
                        device: ids.map(|i| i.1),
                        allowlist: entry.map(|e| {
                            if e.same_host_bridge_only {
                                "same_host_bridge_only"
                            } else {
                                "any"
                            }
                            .to_string()
                        }),
                        passed: path::allowlist_verdict(ids, same),
                    }
                })
                .collect(),
            passed: hb.passed,
        }
    });
    let acs_names_list: Vec<String> = acs.iter().map(ToString::to_string).collect();
    let acs_considered = out.common.is_some();
    let disable = (acs_considered && !acs.is_empty()).then(|| path::acs_list_string(&acs).0);
    let mut change = Vec::new();
    let reason = match (out.map_type, out.common) {
        (MapType::BusAddr, Some(common)) => {
            let path_nodes: Vec<Bdf> = pchain
                .iter()
                .take_while(|&&n| n != common)
                .chain(std::iter::once(&common))
                .chain(cchain.iter().take_while(|&&n| n != common))
                .copied()
                .collect();
            let with_acs: Vec<String> = path_nodes
                .iter()
                .filter(|&&n| fabric.acs_ctrl(n).ok().flatten().is_some())
                .map(ToString::to_string)
                .collect();
            if with_acs.is_empty() {
                change.push(
                    "nothing on this path has an ACS capability; only moving a device changes it"
                        .to_string(),
                );
            } else {
                change.push(format!(
                    "turning on ACS RR, CR or EC at any of {} would send the transfer through the root complex",
                    with_acs.join(", ")
                ));
            }
            if provider == client {
                format!(
                    "{clabel} is the provider itself and redirects nothing: it is given the BAR's bus address"
                )
            } else {
                format!(
                    "{clabel} and {plabel} meet at {} and no device on the way has ACS redirect (RR, CR or EC) on: \
                     the client is programmed with the BAR's PCI bus address and the switch routes the \
                     transfer directly, bypassing the IOMMU",
                    label(fabric, common)
                )
            }
        }
        (t, Some(common)) => {
            let d = disable.clone().unwrap_or_default();
            change.push(format!(
                "booting with pci=disable_acs_redir={d} would make the path switch-local (bus_addr)"
            ));
            let fwd = if t == MapType::ThruHostBridge {
                "the root complex forwards peer-to-peer, so the client gets an ordinary DMA mapping (a CPU physical address, or an IOVA under an IOMMU)"
            } else {
                "the root complex is not known to forward peer-to-peer, so the mapping is refused"
            };
            format!(
                "{clabel} and {plabel} meet at {}, but ACS redirect is on at {}: peer requests go up to the root complex; {fwd}",
                label(fabric, common),
                acs_names_list.join(", ")
            )
        }
        (t, None) => {
            let hb = host_bridge.as_ref();
            let names: Vec<String> = hb
                .map(|h| h.bridges.iter().map(|b| b.host_bridge.clone()).collect())
                .unwrap_or_default();
            let why = match hb {
                Some(h) if h.cpu_rule => format!("the CPU ({}) is an AMD Zen or later, which forwards peer-to-peer", h.cpu),
                Some(h) => h
                    .bridges
                    .iter()
                    .map(|b| match (&b.root_function, &b.allowlist, b.passed) {
                        (None, _, _) => format!("host bridge {} has no function at 00.0 or root port first on its root bus to check", b.host_bridge),
                        (Some(r), None, _) => format!(
                            "host bridge {}'s root function {r} ({:04x}:{:04x}) is not on the P2PDMA allowlist",
                            b.host_bridge,
                            b.vendor.unwrap_or(0),
                            b.device.unwrap_or(0)
                        ),
                        (Some(r), Some(_), false) => format!(
                            "host bridge {}'s root function {r} is allowlisted for peer-to-peer within one host bridge only",
                            b.host_bridge
                        ),
                        (Some(r), Some(_), true) => format!("host bridge {}'s root function {r} is on the allowlist", b.host_bridge),
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                None => String::new(),
            };
            if t == MapType::ThruHostBridge {
                change.push("only putting both devices under one switch (without ACS redirect) would make it switch-local".to_string());
            } else {
                change.push("putting both devices under one switch without ACS redirect would allow bus-address P2P".to_string());
                if platform_cpu.vendor != CpuVendor::Amd {
                    change.push("a root complex on the allowlist (or an AMD Zen CPU) would allow it through the host bridge".to_string());
                }
            }
            format!(
                "{clabel} and {plabel} share no upstream bridge: the transfer must cross {}; {why}",
                if names.len() > 1 {
                    format!("host bridges {}", names.join(" and "))
                } else {
                    format!("host bridge {}", names.join(""))
                }
            )
        }
    };
    Explanation {
        provider: provider.to_string(),
        client: client.to_string(),
        map_type: out.map_type,
        distance: out.distance,
        provider_chain: pchain.iter().map(|&b| node_info(fabric, b)).collect(),
        client_chain: cchain.iter().map(|&b| node_info(fabric, b)).collect(),
        common_ancestor: out.common.map(|b| b.to_string()),
        acs_redirect: acs_names_list,
        acs_considered,
        disable_acs_redir: disable,
        host_bridge,
        reason,
        what_would_change: change,
    }
}
