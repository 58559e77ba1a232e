//! `topo --matrix` and `explain`: the P2P analysis for people.

use std::collections::BTreeMap;
use std::fmt::Write;

use peerdma_p2pdma::explain::{Explanation, NodeInfo, label};
use peerdma_p2pdma::{MapType, Matrix, explain};
use peerdma_pci::{Bdf, Fabric};
use serde::Serialize;

/// One ordered pair for the JSON contract.
#[derive(Debug, Serialize)]
pub struct PairJson {
    /// Provider address.
    pub provider: String,
    /// Client address.
    pub client: String,
    /// `bus_addr`, `thru_host_bridge`, `not_supported`.
    pub map_type: MapType,
    /// Kernel distance.
    pub distance: u32,
    /// Nodes whose ACS redirect the kernel counted.
    pub acs_redirect: Vec<String>,
    /// Why.
    pub reason: String,
}

/// Every ordered pair of distinct provider and client.
pub fn pairs(fabric: &Fabric) -> Vec<PairJson> {
    let m = Matrix::compute(fabric);
    let mut out = Vec::new();
    for &p in &m.providers {
        for &c in &m.clients {
            if p == c {
                continue;
            }
            let e = explain(fabric, p, c);
            out.push(PairJson {
                provider: e.provider,
                client: e.client,
                map_type: e.map_type,
                distance: e.distance,
                acs_redirect: e.acs_redirect,
                reason: e.reason,
            });
        }
    }
    out
}

fn short(fabric: &Fabric, b: Bdf) -> String {
    match fabric.function(b).ok().and_then(|f| f.name()) {
        Some(n) => n.to_string(),
        None if b.domain() == 0 => format!("{:02x}:{:02x}.{}", b.bus(), b.device(), b.function()),
        None => b.to_string(),
    }
}

/// The matrix as a table with a legend and ACS footnotes.
pub fn render_matrix(fabric: &Fabric, source: &str) -> String {
    let m = Matrix::compute(fabric);
    let mut out = String::new();
    let _ = writeln!(out, "Fabric: {source}");
    let _ = writeln!(
        out,
        "P2P matrix: rows are providers (functions with a memory BAR), columns are clients (endpoints, RCiEPs, VFs)"
    );
    let _ = writeln!(out);
    if m.providers.is_empty() || m.clients.is_empty() {
        let _ = writeln!(out, "(no providers or no clients)");
        return out;
    }
    let heads: Vec<String> = m.clients.iter().map(|&c| short(fabric, c)).collect();
    let rows: Vec<String> = m.providers.iter().map(|&p| label(fabric, p)).collect();
    let rw = rows.iter().map(String::len).max().unwrap_or(0);
    let mut redirecting: BTreeMap<String, usize> = BTreeMap::new();
    let mut cells: Vec<Vec<String>> = Vec::new();
    for (r, &p) in m.providers.iter().enumerate() {
        let mut row = Vec::new();
        for (c, &cl) in m.clients.iter().enumerate() {
            if p == cl {
                row.push("X".to_string());
                continue;
            }
            let cell = m.cell(r, c);
            let mut code = cell.code();
            if cell.map_type != MapType::BusAddr {
                let e = explain(fabric, p, cl);
                if e.acs_considered && !e.acs_redirect.is_empty() {
                    code.push('*');
                    for n in e.acs_redirect {
                        *redirecting.entry(n).or_default() += 1;
                    }
                }
            }
            row.push(code);
        }
        cells.push(row);
    }
    let widths: Vec<usize> = (0..heads.len())
        .map(|c| {
            heads[c]
                .len()
                .max(cells.iter().map(|r| r[c].len()).max().unwrap_or(0))
        })
        .collect();
    let _ = write!(out, "{:rw$}", "");
    for (h, w) in heads.iter().zip(&widths) {
        let _ = write!(out, "  {h:>w$}");
    }
    let _ = writeln!(out);
    for (label, row) in rows.iter().zip(&cells) {
        let _ = write!(out, "{label:rw$}");
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(out, "  {cell:>w$}");
        }
        let _ = writeln!(out);
    }
    let (bus, hb, no) = m.counts();
    let _ = writeln!(out);
    let _ = writeln!(out, "Legend:");
    let _ = writeln!(out, "  X     the same function");
    let _ = writeln!(
        out,
        "  BUSn  switch-local: the client uses the BAR's PCI bus address (PCI_P2PDMA_MAP_BUS_ADDR), n = distance"
    );
    let _ = writeln!(
        out,
        "  HBn   through the host bridge: an ordinary DMA mapping, CPU address or IOVA (PCI_P2PDMA_MAP_THRU_HOST_BRIDGE)"
    );
    let _ = writeln!(
        out,
        "  NO    not supported: the host bridge is not known to forward peer-to-peer (PCI_P2PDMA_MAP_NOT_SUPPORTED)"
    );
    let _ = writeln!(
        out,
        "  *     the devices share a switch, but ACS redirect sends their traffic up to the root complex"
    );
    let _ = writeln!(
        out,
        "  {bus} BUS, {hb} HB, {no} NO (same-function cells included)"
    );
    if !redirecting.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Ports whose ACS redirect (RR, CR or EC) decides a '*' cell:"
        );
        for (n, count) in &redirecting {
            let bits = n
                .parse::<Bdf>()
                .ok()
                .and_then(|b| fabric.acs_ctrl(b).ok().flatten())
                .map(|a| peerdma_pci::spec::acs_names(a).join(" "))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {n}: ACS {bits}; {count} pair(s); pci=disable_acs_redir={n} would lift it"
            );
        }
    }
    out
}

fn node_line(n: &NodeInfo, role: &str, acs_matters: bool) -> String {
    let name = n
        .name
        .as_deref()
        .map(|x| format!(" {x}"))
        .unwrap_or_default();
    let acs = match &n.acs {
        None => "no ACS capability".to_string(),
        Some(bits) if bits.is_empty() => "ACS: no bits on".to_string(),
        Some(bits) => format!("ACS: {}", bits.join(" ")),
    };
    let mark = if n.redirect && acs_matters {
        "   ← redirects peer requests upstream"
    } else {
        ""
    };
    format!("  {}{name:<10} {:<20} {acs}{mark}{role}", n.bdf, n.kind)
}

/// The hop-by-hop account of one pair.
pub fn render_explanation(fabric: &Fabric, e: &Explanation, source: &str) -> String {
    let mut out = String::new();
    let name = |s: &str| {
        s.parse::<Bdf>()
            .map_or_else(|_| s.to_string(), |b| label(fabric, b))
    };
    let _ = writeln!(out, "Fabric: {source}");
    let _ = writeln!(
        out,
        "Provider {} → client {}",
        name(&e.provider),
        name(&e.client)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Path, from the client up and back down to the provider:"
    );
    if let Some(common) = &e.common_ancestor {
        for n in e.client_chain.iter().take_while(|n| &n.bdf != common) {
            let _ = writeln!(out, "{}", node_line(n, "", true));
        }
        if let Some(c) = e.provider_chain.iter().find(|n| &n.bdf == common) {
            let _ = writeln!(out, "{}", node_line(c, "   (common upstream bridge)", true));
        }
        let down: Vec<&NodeInfo> = e
            .provider_chain
            .iter()
            .take_while(|n| &n.bdf != common)
            .collect();
        for n in down.into_iter().rev() {
            let _ = writeln!(out, "{}", node_line(n, "", true));
        }
    } else {
        for n in &e.client_chain {
            let _ = writeln!(out, "{}", node_line(n, "", false));
        }
        if let Some(hb) = &e.host_bridge {
            for b in &hb.bridges {
                let rf = match (&b.root_function, b.vendor, b.device) {
                    (Some(r), Some(v), Some(d)) => format!("root function {r} {v:04x}:{d:04x}"),
                    _ => "no root function to check".to_string(),
                };
                let list = match &b.allowlist {
                    Some(k) if k == "any" => "on the allowlist",
                    Some(_) => "on the allowlist for its own root ports only",
                    None => "not on the allowlist",
                };
                let _ = writeln!(out, "  [host bridge {}]  {rf}, {list}", b.host_bridge);
            }
        }
        for n in e.provider_chain.iter().rev() {
            let _ = writeln!(out, "{}", node_line(n, "", false));
        }
        let _ = writeln!(
            out,
            "  (no upstream bridge in common: ACS on these ports does not change the decision)"
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Decision: {} ({}), distance {}",
        e.map_type,
        e.map_type.kernel_name(),
        e.distance
    );
    if let Some(hb) = &e.host_bridge {
        if hb.cpu_rule {
            let _ = writeln!(
                out,
                "CPU: {} — the CPU rule applies (AMD Zen or later forwards peer-to-peer)",
                hb.cpu
            );
        } else {
            let _ = writeln!(
                out,
                "CPU: {} — the CPU rule does not apply; the allowlist decides",
                hb.cpu
            );
        }
    }
    let _ = writeln!(out, "Why: {}.", e.reason);
    if let Some(d) = &e.disable_acs_redir {
        let _ = writeln!(
            out,
            "Kernel parameter to lift the redirect: pci=disable_acs_redir={d}"
        );
    }
    let _ = writeln!(out, "What would change it:");
    for c in &e.what_would_change {
        let _ = writeln!(out, "  - {c}");
    }
    out
}
