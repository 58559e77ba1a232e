//! The `topo` tree, in the spirit of `lspci -tv`.

use std::collections::HashMap;
use std::fmt::Write;

use peerdma_pci::size::format_size;
use peerdma_pci::topology::{DeviceInfo, Topology};

fn span_text(start: u64, size: u64) -> String {
    format!(
        "{start:#x}-{:#x}",
        start.saturating_add(size.saturating_sub(1))
    )
}

/// Renders a topology as a tree with one block per function.
pub fn render(t: &Topology, source: &str) -> String {
    let mut out = String::new();
    let ram: Vec<String> = t
        .platform
        .ram
        .iter()
        .map(|r| format!("{} @ {:#x}", format_size(r.size), r.cpu))
        .collect();
    let _ = writeln!(out, "Fabric: {source}");
    let _ = writeln!(
        out,
        "Platform: {} CPU family {:#x}; RAM {}",
        t.platform.cpu.vendor,
        t.platform.cpu.family,
        if ram.is_empty() {
            "none".to_string()
        } else {
            ram.join(", ")
        }
    );
    let mut children: HashMap<&str, Vec<&DeviceInfo>> = HashMap::new();
    for d in &t.devices {
        children.entry(d.parent.as_str()).or_default().push(d);
    }
    for hb in &t.host_bridges {
        let _ = writeln!(out);
        let why = match (hb.p2p_source.as_str(), &hb.root_function) {
            ("file", _) => "set in the fabric file".to_string(),
            (_, Some(rf)) => format!("from the CPU and root-bus function {rf}"),
            _ => "from the CPU; no root-bus function".to_string(),
        };
        let _ = writeln!(
            out,
            "{}  domain {:04x} root bus {:02x}  peer-to-peer forwarding: {} ({why})",
            hb.name, hb.domain, hb.bus, hb.p2p_scope
        );
        for w in &hb.mmio {
            let _ = writeln!(
                out,
                "    mmio cpu {} → bus {} ({})",
                span_text(w.cpu, w.size),
                span_text(w.bus, w.size),
                format_size(w.size)
            );
        }
        let kids = children.get(hb.name.as_str()).cloned().unwrap_or_default();
        render_children(&mut out, &children, &kids, "");
    }
    out
}

fn render_children(
    out: &mut String,
    children: &HashMap<&str, Vec<&DeviceInfo>>,
    kids: &[&DeviceInfo],
    prefix: &str,
) {
    for (i, d) in kids.iter().enumerate() {
        let last = i + 1 == kids.len();
        let (branch, cont) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        let name = d
            .name
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        let mut flags = d
            .command
            .iter()
            .map(|c| if c == "BUS_MASTER" { "BM" } else { c.as_str() })
            .collect::<Vec<_>>()
            .join(" ");
        if flags.is_empty() {
            flags = "-".to_string();
        }
        let acs = if !d.acs_known {
            "  ACS[unknown]".to_string()
        } else if d.acs_cap {
            format!("  ACS[{}]", d.acs.join(" "))
        } else {
            String::new()
        };
        let drv = match (&d.driver, d.iommu_group) {
            (Some(drv), Some(g)) => format!("  driver {drv}, iommu group {g}"),
            (Some(drv), None) => format!("  driver {drv}"),
            (None, Some(g)) => format!("  iommu group {g}"),
            (None, None) => String::new(),
        };
        let vf = d
            .physfn
            .as_deref()
            .map(|p| format!("  VF of {p}"))
            .unwrap_or_default();
        let absent = if d.present { "" } else { "  (not present)" };
        let _ = writeln!(
            out,
            "{prefix}{branch}{} {}{name}  {:04x}:{:04x}{acs}{vf}  [{flags}] {}{absent}{drv}",
            d.bdf, d.kind, d.vendor, d.device, d.power
        );
        let sub = children.get(d.bdf.as_str()).cloned().unwrap_or_default();
        let inner = format!("{prefix}{cont}");
        let detail = if sub.is_empty() {
            format!("{inner}   ")
        } else {
            format!("{inner}│  ")
        };
        if let Some(b) = &d.bridge {
            let mut w = Vec::new();
            if let Some(m) = &b.mem {
                w.push(format!("mem {}", span_text(m.start, m.size)));
            }
            if let Some(p) = &b.pref {
                w.push(format!("pref {}", span_text(p.start, p.size)));
            }
            if let Some(io) = &b.io {
                w.push(format!("io {}", span_text(io.start, io.size)));
            }
            let windows = if w.is_empty() {
                "no windows".to_string()
            } else {
                w.join(", ")
            };
            let _ = writeln!(
                out,
                "{detail}buses {:02x}-{:02x}; {windows}",
                b.secondary_bus, b.subordinate_bus
            );
        }
        for bar in &d.bars {
            let pf = if bar.prefetch { " pref" } else { "" };
            let cpu = bar
                .cpu_addr
                .map_or_else(|| "outside windows".to_string(), |c| format!("{c:#x}"));
            let _ = writeln!(
                out,
                "{detail}BAR{} {}{pf} {}  cpu {cpu}  bus {:#x}",
                bar.index,
                bar.kind,
                format_size(bar.size),
                bar.bus_addr
            );
        }
        render_children(out, children, &sub, &inner);
    }
}
