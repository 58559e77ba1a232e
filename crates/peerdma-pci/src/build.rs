//! From a [`FabricSpec`] to a live [`Fabric`]: validation, VF creation, bus numbering, BAR
//! address assignment (what firmware does at boot) and register programming.
//!
//! Every refusal is a [`FabricError`] naming the key path (`device[3].bars[1].size`) and what
//! is wrong; the file loader adds the file and line.
//!
//! **BAR assignment.** Memory BARs fall in two classes, as in Linux's resource sizing:
//! prefetchable 64-bit BARs go in the host bridge's largest window above 4 GiB (its largest
//! window below 4 GiB if it has none), everything else in its largest window below 4 GiB.
//! Fixed addresses (`addr = …`) are reserved first; the rest is assigned depth first, size
//! descending inside a function, each bridge's subtree kept contiguous and 1 MiB aligned so
//! that sibling windows never overlap. Bridge windows are then set to cover exactly their
//! subtree (1 MiB granules for memory, 4 KiB for I/O). I/O BARs get ports from 0x1000 up.
//!
//! **Bus numbers** come from the BDFs in the file: a bridge's secondary bus is its children's
//! bus, its subordinate the highest bus below it. A bridge with nothing below keeps
//! secondary = subordinate = 0 (firmware would give it a bus; nothing here needs one).

use std::collections::{HashMap, HashSet};

use crate::addr::Span;
use crate::bdf::Bdf;
use crate::config::ConfigSpace;
use crate::error::FabricError;
use crate::fabric::{Fabric, HostBridge, Platform};
use crate::function::{Bar, Caps, FnId, Function, Parent};
use crate::hostbridge;
use crate::regs;
use crate::spec::{BarSpec, BarType, DeviceKind, FabricSpec};
use crate::sync::{Mutex, RwLock};

const MIB: u64 = 1 << 20;
const GIB4: u64 = 1 << 32;

fn err(key: impl Into<String>, msg: impl Into<String>) -> FabricError {
    FabricError::at(key, msg)
}

fn dev_key(i: usize) -> String {
    format!("device[{i}]")
}

/// A function before it is live.
struct Proto {
    bdf: Bdf,
    kind: DeviceKind,
    name: Option<String>,
    vendor: u16,
    device: u16,
    class: u32,
    parent: Parent,
    host_bridge: usize,
    pf: Option<FnId>,
    vf_index: u16,
    vfs: Vec<FnId>,
    children: Vec<FnId>,
    bars: [Option<Bar>; 6],
    vf_bars: [Option<Bar>; 6],
    fixed: [Option<u64>; 6],
    vf_fixed: [Option<u64>; 6],
    flr: bool,
    af_flr: bool,
    acs: Option<u16>,
    no_soft_reset: bool,
    pm: bool,
    express: bool,
    sriov: Option<(u16, u16, u16, u16)>, // vfs, offset, stride, vf device id
    /// Captured config bytes (see [`DeviceSpec::config`]).
    config: Vec<(u16, Vec<u8>)>,
    /// Measured write masks (see [`DeviceSpec::wmask`]).
    wmask: Vec<(u16, Vec<u8>)>,
    /// See [`DeviceSpec::model`].
    model: Option<crate::model::DeviceModel>,
    key: String,
}

/// Implemented BARs by index, and the fixed addresses among them.
type BarTable = ([Option<Bar>; 6], [Option<u64>; 6]);

fn check_bars(
    key: &str,
    bars: &[BarSpec],
    bridge: bool,
    for_vf: bool,
) -> Result<BarTable, FabricError> {
    let mut out: [Option<Bar>; 6] = [None; 6];
    let mut fixed = [None; 6];
    let mut used = [None::<usize>; 6];
    for (k, b) in bars.iter().enumerate() {
        let bk = format!("{key}.bars[{k}]");
        let max_index = if bridge { 1 } else { 5 };
        if b.index > max_index {
            return Err(err(
                format!("{bk}.index"),
                if bridge {
                    format!(
                        "BAR index {} on a bridge: a type 1 header has only BAR0 and BAR1",
                        b.index
                    )
                } else {
                    format!("BAR index {} out of range (0-5)", b.index)
                },
            ));
        }
        let regs_used = if b.kind == BarType::Mem64 { 2 } else { 1 };
        if usize::from(b.index) + regs_used - 1 > usize::from(max_index) {
            return Err(err(
                format!("{bk}.index"),
                format!(
                    "a 64-bit BAR at index {} needs register {} too, which does not exist",
                    b.index,
                    b.index + 1
                ),
            ));
        }
        for (r, slot) in used
            .iter_mut()
            .enumerate()
            .skip(usize::from(b.index))
            .take(regs_used)
        {
            if let Some(other) = *slot {
                return Err(err(
                    format!("{bk}.index"),
                    format!("BAR register {r} is already used by bars[{other}]"),
                ));
            }
            *slot = Some(k);
        }
        if !b.size.is_power_of_two() {
            return Err(err(
                format!("{bk}.size"),
                format!("BAR size {:#x} is not a power of two", b.size),
            ));
        }
        match b.kind {
            BarType::Io => {
                if for_vf {
                    return Err(err(
                        format!("{bk}.type"),
                        "VF BARs must be memory BARs (SR-IOV has no I/O VF BARs)",
                    ));
                }
                if !(4..=256).contains(&b.size) {
                    return Err(err(
                        format!("{bk}.size"),
                        format!("an I/O BAR is 4 to 256 bytes, not {}", b.size),
                    ));
                }
                if b.prefetch {
                    return Err(err(
                        format!("{bk}.prefetch"),
                        "an I/O BAR cannot be prefetchable",
                    ));
                }
            }
            BarType::Mem32 => {
                if b.size < 16 || b.size > (1 << 31) {
                    return Err(err(
                        format!("{bk}.size"),
                        format!(
                            "a 32-bit memory BAR is 16 bytes to 2 GiB, not {:#x}",
                            b.size
                        ),
                    ));
                }
            }
            BarType::Mem64 => {
                if b.size < 16 {
                    return Err(err(
                        format!("{bk}.size"),
                        "a memory BAR is at least 16 bytes",
                    ));
                }
            }
        }
        if let Some(a) = b.addr {
            if a & (b.size - 1) != 0 {
                return Err(err(
                    format!("{bk}.addr"),
                    format!(
                        "address {a:#x} is not aligned to the BAR size {:#x}",
                        b.size
                    ),
                ));
            }
            let limit: u128 = match b.kind {
                BarType::Io => 0x1_0000,
                BarType::Mem32 => u128::from(GIB4),
                BarType::Mem64 => 1u128 << 64,
            };
            if u128::from(a) + u128::from(b.size) > limit {
                return Err(err(
                    format!("{bk}.addr"),
                    format!(
                        "address {a:#x} + {:#x} does not fit a {} BAR",
                        b.size,
                        b.kind.as_str()
                    ),
                ));
            }
            fixed[usize::from(b.index)] = Some(a);
        }
        out[usize::from(b.index)] = Some(Bar {
            index: b.index,
            kind: b.kind,
            prefetch: b.prefetch,
            size: b.size,
        });
    }
    Ok((out, fixed))
}

fn validate_platform(spec: &FabricSpec) -> Result<(), FabricError> {
    let mut cpu_ranges: Vec<(Span, String)> = Vec::new();
    for (i, r) in spec.platform.ram.iter().enumerate() {
        let key = format!("platform.ram[{i}]");
        if r.size == 0 {
            return Err(err(format!("{key}.size"), "RAM range of size 0"));
        }
        let s = Span::new(r.cpu, r.size).map_err(|_| err(&key, "RAM range runs past 2^64"))?;
        if let Some((_, other)) = cpu_ranges.iter().find(|(o, _)| o.overlaps(&s)) {
            return Err(err(&key, format!("RAM {s} overlaps {other}")));
        }
        cpu_ranges.push((s, key));
    }
    let mut names = HashSet::new();
    let mut roots = HashMap::new();
    for (h, hb) in spec.host_bridges.iter().enumerate() {
        let key = format!("host_bridge[{h}]");
        if hb.name.is_empty() {
            return Err(err(format!("{key}.name"), "host bridge name is empty"));
        }
        if hb.name.parse::<Bdf>().is_ok() {
            return Err(err(
                format!("{key}.name"),
                format!("host bridge name {:?} looks like a PCI address", hb.name),
            ));
        }
        if !names.insert(hb.name.clone()) {
            return Err(err(
                format!("{key}.name"),
                format!("host bridge name {:?} is used twice", hb.name),
            ));
        }
        if let Some(other) = roots.insert((hb.domain, hb.bus), hb.name.clone()) {
            return Err(err(
                format!("{key}.bus"),
                format!(
                    "bus clash: domain {:04x} root bus {:02x} already belongs to host bridge {other}",
                    hb.domain, hb.bus
                ),
            ));
        }
        let mut bus_ranges: Vec<Span> = Vec::new();
        for (k, w) in hb.mmio.iter().enumerate() {
            let wk = format!("{key}.mmio[{k}]");
            if w.size == 0 {
                return Err(err(format!("{wk}.size"), "window of size 0"));
            }
            let cs = Span::new(w.cpu, w.size)
                .map_err(|_| err(format!("{wk}.cpu"), "window runs past 2^64 in CPU space"))?;
            let bs = Span::new(w.bus, w.size)
                .map_err(|_| err(format!("{wk}.bus"), "window runs past 2^64 in bus space"))?;
            // A window may cover RAM (the "PCI hole": the window wins there), but never
            // another window.
            if let Some((_, other)) = cpu_ranges
                .iter()
                .find(|(o, k)| k.contains("mmio") && o.overlaps(&cs))
            {
                return Err(err(&wk, format!("CPU range {cs} overlaps {other}")));
            }
            if bus_ranges.iter().any(|o| o.overlaps(&bs)) {
                return Err(err(
                    format!("{wk}.bus"),
                    format!("bus range {bs} overlaps another window of {}", hb.name),
                ));
            }
            cpu_ranges.push((cs, wk));
            bus_ranges.push(bs);
        }
    }
    Ok(())
}

impl Fabric {
    /// Validates, enumerates and builds a platform.
    pub fn build(spec: &FabricSpec) -> Result<Fabric, FabricError> {
        validate_platform(spec)?;
        let hb_index: HashMap<&str, usize> = spec
            .host_bridges
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();

        // Names and addresses of explicit, non-VF functions.
        let mut by_bdf: HashMap<Bdf, usize> = HashMap::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (i, d) in spec.devices.iter().enumerate() {
            if d.kind == DeviceKind::Vf {
                continue;
            }
            if let Some(&j) = by_bdf.get(&d.bdf) {
                return Err(err(
                    format!("{}.bdf", dev_key(i)),
                    format!("{} is already device[{j}]", d.bdf),
                ));
            }
            by_bdf.insert(d.bdf, i);
        }
        for (i, d) in spec.devices.iter().enumerate() {
            if let Some(n) = &d.name {
                if n.is_empty() || n.parse::<Bdf>().is_ok() || hb_index.contains_key(n.as_str()) {
                    return Err(err(
                        format!("{}.name", dev_key(i)),
                        format!(
                            "name {n:?} is empty, looks like a PCI address, or is a host bridge's name"
                        ),
                    ));
                }
                if let Some(j) = by_name.insert(n.clone(), i) {
                    return Err(err(
                        format!("{}.name", dev_key(i)),
                        format!("name {n:?} is already device[{j}]'s"),
                    ));
                }
            }
        }
        let resolve = |s: &str| -> Option<usize> {
            by_name
                .get(s)
                .copied()
                .or_else(|| s.parse::<Bdf>().ok().and_then(|b| by_bdf.get(&b).copied()))
        };

        // Explicit functions → protos (same index as spec.devices for non-VFs).
        let mut protos: Vec<Proto> = Vec::new();
        let mut spec_to_proto: HashMap<usize, FnId> = HashMap::new();
        for (i, d) in spec.devices.iter().enumerate() {
            if d.kind == DeviceKind::Vf {
                continue;
            }
            let key = dev_key(i);
            if d.acs.is_some_and(|a| a & !regs::ACS_ALL != 0) {
                return Err(err(format!("{key}.acs"), "unknown ACS control bits"));
            }
            let (bars, fixed) = check_bars(&key, &d.bars, d.kind.is_bridge(), false)?;
            let mut sriov = None;
            let (mut vf_bars, mut vf_fixed) = ([None; 6], [None; 6]);
            if let Some(s) = &d.sriov {
                if !matches!(d.kind, DeviceKind::Endpoint | DeviceKind::Rciep) {
                    return Err(err(
                        format!("{key}.sriov"),
                        format!(
                            "SR-IOV on a {}: only endpoints and RCiEPs can be PFs",
                            d.kind
                        ),
                    ));
                }
                if s.vfs == 0 {
                    return Err(err(
                        format!("{key}.sriov.vfs"),
                        "a PF needs at least one VF",
                    ));
                }
                if s.offset == 0 || (s.vfs > 1 && s.stride == 0) {
                    return Err(err(
                        format!("{key}.sriov"),
                        "First VF Offset must be ≥ 1 and VF Stride ≥ 1",
                    ));
                }
                let (vb, vfx) = check_bars(&format!("{key}.sriov"), &s.bars, false, true)?;
                for b in vb.iter().flatten() {
                    if u128::from(b.size) * u128::from(s.vfs) > u128::from(u64::MAX) {
                        return Err(err(
                            format!("{key}.sriov.bars"),
                            "VF BAR area larger than 2^64",
                        ));
                    }
                }
                vf_bars = vb;
                vf_fixed = vfx;
                sriov = Some((s.vfs, s.offset, s.stride, s.vf_device.unwrap_or(d.device)));
            }
            spec_to_proto.insert(i, protos.len());
            protos.push(Proto {
                bdf: d.bdf,
                kind: d.kind,
                name: d.name.clone(),
                vendor: d.vendor,
                device: d.device,
                class: d.class.unwrap_or_else(|| d.kind.default_class()),
                parent: Parent::HostBridge(usize::MAX),
                host_bridge: usize::MAX,
                pf: None,
                vf_index: 0,
                vfs: Vec::new(),
                children: Vec::new(),
                bars,
                vf_bars,
                fixed,
                vf_fixed,
                flr: d.flr,
                af_flr: d.af_flr,
                acs: d.acs,
                no_soft_reset: d.no_soft_reset,
                pm: d.pm,
                express: d.express,
                sriov,
                config: d.config.clone(),
                wmask: d.wmask.clone(),
                model: d.model,
                key,
            });
        }

        // Parents.
        for (i, d) in spec.devices.iter().enumerate() {
            let Some(&p) = spec_to_proto.get(&i) else {
                continue;
            };
            let key = dev_key(i);
            let pkey = format!("{key}.parent");
            if d.kind.on_root_bus() {
                let Some(&h) = hb_index.get(d.parent.as_str()) else {
                    let why = if resolve(&d.parent).is_some() {
                        format!(
                            "a {} sits on a root bus: its parent must be a host bridge, not {:?}",
                            d.kind, d.parent
                        )
                    } else {
                        format!(
                            "unknown parent {:?}: no host bridge has that name",
                            d.parent
                        )
                    };
                    return Err(err(pkey, why));
                };
                let hb = &spec.host_bridges[h];
                if d.bdf.domain() != hb.domain || d.bdf.bus() != hb.bus {
                    return Err(err(
                        format!("{key}.bdf"),
                        format!(
                            "bus clash: {} is not on {}'s root bus {:04x}:{:02x}",
                            d.bdf, hb.name, hb.domain, hb.bus
                        ),
                    ));
                }
                protos[p].parent = Parent::HostBridge(h);
            } else {
                let parent_idx = match resolve(&d.parent) {
                    Some(j) => j,
                    None if hb_index.contains_key(d.parent.as_str()) => {
                        let hint = if d.kind == DeviceKind::Endpoint {
                            " (use kind = \"rciep\" for a root-complex integrated endpoint)"
                        } else {
                            ""
                        };
                        return Err(err(
                            pkey,
                            format!("a {} cannot sit directly on a root bus{hint}", d.kind),
                        ));
                    }
                    None => {
                        return Err(err(
                            pkey,
                            format!(
                                "unknown parent {:?}: no host bridge, device name or device address",
                                d.parent
                            ),
                        ));
                    }
                };
                let pk = spec.devices[parent_idx].kind;
                let ok = match d.kind {
                    DeviceKind::SwitchDownstream => pk == DeviceKind::SwitchUpstream,
                    _ => matches!(
                        pk,
                        DeviceKind::RootPort | DeviceKind::SwitchDownstream | DeviceKind::PciBridge
                    ),
                };
                if !ok {
                    let want = if d.kind == DeviceKind::SwitchDownstream {
                        "a switch_upstream"
                    } else {
                        "a root_port, switch_downstream or pci_bridge"
                    };
                    return Err(err(
                        pkey,
                        format!(
                            "a {} must sit below {want}, and {:?} is a {}",
                            d.kind, d.parent, pk
                        ),
                    ));
                }
                protos[p].parent = Parent::Bridge(spec_to_proto[&parent_idx]);
            }
        }

        // Host bridge of each function: follow parents (they form a forest: every parent is
        // a bridge kind and kinds nest strictly by bus number, checked below; guard loops).
        for p in 0..protos.len() {
            let mut cur = p;
            let mut steps = 0;
            let h = loop {
                match protos[cur].parent {
                    Parent::HostBridge(h) => break h,
                    Parent::Bridge(b) => cur = b,
                }
                steps += 1;
                if steps > protos.len() {
                    return Err(err(
                        format!("{}.parent", protos[p].key),
                        "parents form a loop",
                    ));
                }
            };
            protos[p].host_bridge = h;
            if protos[p].bdf.domain() != spec.host_bridges[h].domain {
                return Err(err(
                    format!("{}.bdf", protos[p].key),
                    format!(
                        "{} is in domain {:04x} but sits under host bridge {} of domain {:04x}",
                        protos[p].bdf,
                        protos[p].bdf.domain(),
                        spec.host_bridges[h].name,
                        spec.host_bridges[h].domain
                    ),
                ));
            }
        }

        // Children lists and the one-bus-per-bridge rule.
        let explicit = protos.len();
        for p in 0..explicit {
            if let Parent::Bridge(b) = protos[p].parent {
                protos[b].children.push(p);
            }
        }
        for b in 0..explicit {
            let kids = protos[b].children.clone();
            if let Some(&first) = kids.first() {
                let bus = protos[first].bdf.bus();
                for &k in &kids {
                    if protos[k].bdf.bus() != bus {
                        return Err(err(
                            format!("{}.bdf", protos[k].key),
                            format!(
                                "bus clash: {} sits below {} whose other children are on bus {bus:02x}",
                                protos[k].bdf, protos[b].bdf
                            ),
                        ));
                    }
                }
                if bus <= protos[b].bdf.bus() {
                    return Err(err(
                        format!("{}.bdf", protos[first].key),
                        format!(
                            "bus clash: {} sits below {} but its bus is not higher than the bridge's own",
                            protos[first].bdf, protos[b].bdf
                        ),
                    ));
                }
                if matches!(
                    protos[b].kind,
                    DeviceKind::RootPort | DeviceKind::SwitchDownstream
                ) {
                    for &k in &kids {
                        if protos[k].bdf.device() != 0 {
                            return Err(err(
                                format!("{}.bdf", protos[k].key),
                                format!(
                                    "{} is device {:02x} below a PCIe port, whose link carries only device 00",
                                    protos[k].bdf,
                                    protos[k].bdf.device()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        // Function 0 must exist in every device.
        for p in protos.iter().take(explicit) {
            let b = p.bdf;
            if b.function() != 0 {
                let f0 = b.with_function(0).expect("function 0 is always valid");
                if !by_bdf.contains_key(&f0) {
                    return Err(err(
                        format!("{}.bdf", p.key),
                        format!("{b} has no function 0 ({f0}): every PCI device has a function 0"),
                    ));
                }
            }
        }

        // VFs.
        let mut taken: HashSet<Bdf> = by_bdf.keys().copied().collect();
        for pf in 0..explicit {
            let Some((vfs, offset, stride, vf_dev)) = protos[pf].sriov else {
                continue;
            };
            let rid = u32::from(protos[pf].bdf.requester_id());
            for n in 0..vfs {
                let vrid = rid + u32::from(offset) + u32::from(n) * u32::from(stride);
                if vrid >> 8 != rid >> 8 {
                    return Err(err(
                        format!("{}.sriov", protos[pf].key),
                        format!(
                            "VF {n} would be at routing ID {vrid:#x}, off the PF's bus {:02x}: VFs must stay on their PF's bus here",
                            rid >> 8
                        ),
                    ));
                }
                let vbdf = Bdf::from_devfn(
                    protos[pf].bdf.domain(),
                    (vrid >> 8) as u8,
                    (vrid & 0xff) as u8,
                );
                if !taken.insert(vbdf) {
                    return Err(err(
                        format!("{}.sriov", protos[pf].key),
                        format!("VF {n} would be at {vbdf}, which is already a function"),
                    ));
                }
                let id = protos.len();
                let bars = protos[pf].vf_bars;
                protos.push(Proto {
                    bdf: vbdf,
                    kind: DeviceKind::Vf,
                    name: None,
                    vendor: protos[pf].vendor,
                    device: vf_dev,
                    class: protos[pf].class,
                    parent: protos[pf].parent,
                    host_bridge: protos[pf].host_bridge,
                    pf: Some(pf),
                    vf_index: n,
                    vfs: Vec::new(),
                    children: Vec::new(),
                    bars,
                    vf_bars: [None; 6],
                    fixed: [None; 6],
                    vf_fixed: [None; 6],
                    flr: true,
                    af_flr: false,
                    acs: None,
                    no_soft_reset: true,
                    pm: true,
                    express: true,
                    sriov: None,
                    config: Vec::new(),
                    wmask: Vec::new(),
                    model: None,
                    key: format!("{}.sriov.vf[{n}]", protos[pf].key),
                });
                protos[pf].vfs.push(id);
                if let Parent::Bridge(b) = protos[pf].parent {
                    protos[b].children.push(id);
                }
            }
        }
        // `vf` entries name or add ACS to generated VFs.
        for (i, d) in spec.devices.iter().enumerate() {
            if d.kind != DeviceKind::Vf {
                continue;
            }
            let key = dev_key(i);
            let pf = resolve(&d.parent).and_then(|j| spec_to_proto.get(&j).copied());
            let Some(pf) = pf.filter(|&p| protos[p].sriov.is_some()) else {
                return Err(err(
                    format!("{key}.parent"),
                    format!("VF without PF: {:?} is not a device with sriov", d.parent),
                ));
            };
            let Some(&vf) = protos[pf].vfs.iter().find(|&&v| protos[v].bdf == d.bdf) else {
                let first = protos[protos[pf].vfs[0]].bdf;
                let last = protos[*protos[pf].vfs.last().expect("a PF has ≥ 1 VF")].bdf;
                return Err(err(
                    format!("{key}.bdf"),
                    format!(
                        "VF without PF: {} is not one of {}'s VFs ({first} to {last})",
                        d.bdf, protos[pf].bdf
                    ),
                ));
            };
            if !d.bars.is_empty() || d.sriov.is_some() {
                return Err(err(
                    &key,
                    "a vf entry sets only name and acs: its BARs come from the PF's sriov.bars",
                ));
            }
            if d.acs.is_some_and(|a| a & !regs::ACS_ALL != 0) {
                return Err(err(format!("{key}.acs"), "unknown ACS control bits"));
            }
            protos[vf].name.clone_from(&d.name);
            protos[vf].acs = d.acs;
            protos[vf].key = key;
        }
        let bdf_of: Vec<Bdf> = protos.iter().map(|p| p.bdf).collect();
        for p in &mut protos {
            p.children.sort_by_key(|&c| bdf_of[c]);
        }

        // Host-bridge root buses.
        let mut root_children: Vec<Vec<FnId>> = vec![Vec::new(); spec.host_bridges.len()];
        for (id, p) in protos.iter().enumerate() {
            if let Parent::HostBridge(h) = p.parent {
                root_children[h].push(id);
            }
        }
        for rc in &mut root_children {
            rc.sort_by_key(|&c| bdf_of[c]);
        }

        // Bus numbers.
        let buses = bus_numbers(&protos, spec)?;

        // Address assignment.
        let assigned = assign(&protos, &root_children, spec)?;

        // Registers.
        let mut multi: HashMap<(u16, u8, u8), usize> = HashMap::new();
        for p in protos.iter().filter(|p| p.pf.is_none()) {
            *multi
                .entry((p.bdf.domain(), p.bdf.bus(), p.bdf.device()))
                .or_default() += 1;
        }
        let mut funcs = Vec::with_capacity(protos.len());
        for (id, p) in protos.iter().enumerate() {
            let mf = p.pf.is_none() && multi[&(p.bdf.domain(), p.bdf.bus(), p.bdf.device())] > 1;
            let (image, caps) = power_on_config(p, mf);
            let mut live = image.clone();
            program(&mut live, p, &caps, id, &assigned, buses.get(&id).copied());
            funcs.push(Function {
                id,
                bdf: p.bdf,
                kind: p.kind,
                name: p.name.clone(),
                vendor: p.vendor,
                device: p.device,
                class: p.class,
                parent: p.parent,
                children: p.children.clone(),
                host_bridge: p.host_bridge,
                pf: p.pf,
                vf_index: p.vf_index,
                vfs: p.vfs.clone(),
                bars: p.bars,
                vf_bars: p.vf_bars,
                caps,
                no_soft_reset: p.no_soft_reset,
                storage: image.storage_ranges(),
                reset_image: image,
                cfg: RwLock::new(live),
                mem: std::array::from_fn(|i| {
                    let mut m = crate::memory::SparseMemory::new();
                    if let Some(model) = p.model.filter(|x| x.owns(i as u8)) {
                        model.power_on(&mut m);
                    }
                    Mutex::new(m)
                }),
                model: p.model,
            });
        }

        let host_bridges = spec
            .host_bridges
            .iter()
            .enumerate()
            .map(|(h, hs)| {
                let root_function = root_children[h].first().copied().filter(|&f| {
                    protos[f].bdf.devfn() == 0 || protos[f].kind == DeviceKind::RootPort
                });
                let ids = root_function.map(|f| (protos[f].vendor, protos[f].device));
                HostBridge {
                    name: hs.name.clone(),
                    domain: hs.domain,
                    bus: hs.bus,
                    p2p: hs
                        .p2p
                        .unwrap_or_else(|| hostbridge::default_forwarding(spec.platform.cpu, ids)),
                    p2p_explicit: hs.p2p.is_some(),
                    mmio: hs.mmio.clone(),
                    root_children: root_children[h].clone(),
                    root_function,
                }
            })
            .collect();
        let platform = Platform {
            cpu: spec.platform.cpu,
            ram: spec.platform.ram.clone(),
        };
        Ok(Fabric::assemble(platform, host_bridges, funcs))
    }
}

/// (secondary, subordinate) per bridge, checked against every other function's bus.
fn bus_numbers(
    protos: &[Proto],
    spec: &FabricSpec,
) -> Result<HashMap<FnId, (u8, u8)>, FabricError> {
    fn sub(protos: &[Proto], id: FnId) -> u8 {
        let mut m = protos[id].bdf.bus();
        for &c in &protos[id].children {
            m = m.max(protos[c].bdf.bus());
            if protos[c].kind.is_bridge() {
                m = m.max(sub(protos, c));
            }
        }
        m
    }
    fn below(protos: &[Proto], id: FnId, out: &mut HashSet<FnId>) {
        for &c in &protos[id].children {
            out.insert(c);
            below(protos, c, out);
        }
    }
    let mut out = HashMap::new();
    for (id, p) in protos.iter().enumerate() {
        if !p.kind.is_bridge() {
            continue;
        }
        let Some(&first) = p.children.first() else {
            out.insert(id, (0, 0));
            continue;
        };
        let sec = protos[first].bdf.bus();
        let subn = sub(protos, id);
        let mut mine = HashSet::new();
        below(protos, id, &mut mine);
        for (o, q) in protos.iter().enumerate() {
            if o != id
                && !mine.contains(&o)
                && q.bdf.domain() == p.bdf.domain()
                && (sec..=subn).contains(&q.bdf.bus())
            {
                return Err(err(
                    format!("{}.bdf", q.key),
                    format!(
                        "bus clash: bus {:02x} of {} lies in {}'s bus range {sec:02x}-{subn:02x} but {} is not below it",
                        q.bdf.bus(),
                        q.bdf,
                        p.bdf,
                        q.bdf
                    ),
                ));
            }
        }
        for hb in &spec.host_bridges {
            if hb.domain == p.bdf.domain() && (sec..=subn).contains(&hb.bus) {
                return Err(err(
                    format!("{}.bdf", p.key),
                    format!(
                        "bus clash: {}'s bus range {sec:02x}-{subn:02x} contains host bridge {}'s root bus",
                        p.bdf, hb.name
                    ),
                ));
            }
        }
        out.insert(id, (sec, subn));
    }
    Ok(out)
}

/// Which allocation class a memory BAR belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    NonPref,
    Pref,
    Io,
}

fn class_of(b: &Bar) -> Class {
    match (b.kind, b.prefetch) {
        (BarType::Io, _) => Class::Io,
        (BarType::Mem64, true) => Class::Pref,
        _ => Class::NonPref,
    }
}

/// Assigned addresses: per function, BAR bus addresses; per PF, VF BAR area bases; per bridge,
/// its windows.
#[derive(Default)]
struct Assigned {
    bar: HashMap<(FnId, u8), u64>,
    vf_bar: HashMap<(FnId, u8), u64>,
    windows: HashMap<FnId, [Option<Span>; 3]>, // NonPref, Pref, Io
}

struct Allocator<'a> {
    windows: Vec<Span>,
    cursors: Vec<u64>,
    np: Option<usize>,
    pref: Option<usize>,
    reserved: &'a [Span],
    io_cursor: u64,
    io_reserved: &'a [Span],
    hb_name: &'a str,
}

impl Allocator<'_> {
    fn window_for(&self, class: Class) -> Option<usize> {
        match class {
            Class::NonPref => self.np,
            Class::Pref => self.pref.or(self.np),
            Class::Io => None,
        }
    }

    fn align_all(&mut self, granule: u64) {
        for c in &mut self.cursors {
            *c = c.div_ceil(granule).saturating_mul(granule);
        }
        self.io_cursor = self.io_cursor.div_ceil(0x1000) * 0x1000;
    }

    /// `size` bytes aligned to `align` (a power of two), clear of fixed BARs.
    fn alloc(
        &mut self,
        class: Class,
        size: u64,
        align: u64,
        what: &str,
        key: &str,
    ) -> Result<u64, FabricError> {
        if class == Class::Io {
            let mut a = self.io_cursor.div_ceil(align) * align;
            while let Some(r) = self.io_reserved.iter().find(|r| {
                r.overlaps(&Span {
                    start: a,
                    len: size,
                })
            }) {
                a = (r.start + r.len).div_ceil(align) * align;
            }
            if a + size > 0x1_0000 {
                return Err(err(key, format!("no I/O port space left for {what}")));
            }
            self.io_cursor = a + size;
            return Ok(a);
        }
        let Some(w) = self.window_for(class) else {
            return Err(err(
                key,
                format!(
                    "{what} needs a memory window below 4 GiB and host bridge {} has none",
                    self.hb_name
                ),
            ));
        };
        let win = self.windows[w];
        let mut a = self.cursors[w].div_ceil(align).saturating_mul(align);
        while let Ok(s) = Span::new(a, size) {
            let Some(r) = self.reserved.iter().find(|r| r.overlaps(&s)) else {
                break;
            };
            a = r
                .start
                .saturating_add(r.len)
                .div_ceil(align)
                .saturating_mul(align);
        }
        let fits = Span::new(a, size).is_ok_and(|s| win.contains_span(&s));
        if !fits {
            return Err(err(
                key,
                format!(
                    "no room for {what} ({:#x} bytes) in host bridge {}'s window {win}: BAR outside the host bridge windows",
                    size, self.hb_name
                ),
            ));
        }
        self.cursors[w] = a + size;
        Ok(a)
    }
}

fn assign(
    protos: &[Proto],
    root_children: &[Vec<FnId>],
    spec: &FabricSpec,
) -> Result<Assigned, FabricError> {
    let mut out = Assigned::default();
    for (h, hb) in spec.host_bridges.iter().enumerate() {
        let windows: Vec<Span> = hb
            .mmio
            .iter()
            .map(|w| Span {
                start: w.bus,
                len: w.size,
            })
            .collect();
        let below4g = |s: &Span| s.last().is_some_and(|l| l < GIB4);
        let largest = |f: &dyn Fn(&Span) -> bool| {
            windows
                .iter()
                .enumerate()
                .filter(|(_, s)| f(s))
                .max_by_key(|(_, s)| s.len)
                .map(|(i, _)| i)
        };
        let np = largest(&below4g);
        let pref = largest(&|s: &Span| s.start >= GIB4);

        // Reserve fixed addresses, checking each lies inside a window.
        let mut reserved = Vec::new();
        let mut io_reserved = Vec::new();
        for (id, p) in protos
            .iter()
            .enumerate()
            .filter(|(_, p)| p.host_bridge == h)
        {
            let all = p
                .fixed
                .iter()
                .zip(p.bars.iter())
                .map(|(a, b)| (a, b, 1u64, false));
            let vfs = p
                .vf_fixed
                .iter()
                .zip(p.vf_bars.iter())
                .map(|(a, b)| (a, b, u64::from(p.sriov.map_or(0, |s| s.0)), true));
            for (addr, bar, count, is_vf) in all.chain(vfs) {
                let (Some(a), Some(bar)) = (addr, bar) else {
                    continue;
                };
                let len = bar.size * count;
                let s = Span::new(*a, len)
                    .map_err(|_| err(&p.key, "fixed BAR address runs past 2^64"))?;
                let key = if is_vf {
                    format!("{}.sriov.bars", p.key)
                } else {
                    format!("{}.bars", p.key)
                };
                if bar.kind == BarType::Io {
                    io_reserved.push(s);
                    continue;
                }
                if !windows.iter().any(|w| w.contains_span(&s)) {
                    return Err(err(
                        key,
                        format!(
                            "BAR{} at bus address {s} is outside host bridge {}'s windows",
                            bar.index, hb.name
                        ),
                    ));
                }
                if let Some(o) = reserved
                    .iter()
                    .find(|(r, _): &&(Span, FnId)| r.overlaps(&s))
                {
                    return Err(err(
                        key,
                        format!(
                            "BAR{} at {s} overlaps a fixed BAR of {}",
                            bar.index, protos[o.1].bdf
                        ),
                    ));
                }
                reserved.push((s, id));
                if is_vf {
                    out.vf_bar.insert((id, bar.index), *a);
                } else {
                    out.bar.insert((id, bar.index), *a);
                }
            }
        }
        let reserved_spans: Vec<Span> = reserved.iter().map(|(s, _)| *s).collect();
        let mut al = Allocator {
            cursors: windows.iter().map(|w| w.start).collect(),
            windows: windows.clone(),
            np,
            pref,
            reserved: &reserved_spans,
            io_cursor: 0x1000,
            io_reserved: &io_reserved,
            hb_name: &hb.name,
        };
        for &c in &root_children[h] {
            place(protos, c, &mut al, &mut out)?;
        }
        for &c in &root_children[h] {
            hull(protos, c, &mut out);
        }
        // Checks: bridge windows honest, siblings disjoint.
        check_bus(protos, &root_children[h], &out)?;
    }
    Ok(out)
}

fn place(
    protos: &[Proto],
    id: FnId,
    al: &mut Allocator,
    out: &mut Assigned,
) -> Result<(), FabricError> {
    let p = &protos[id];
    if p.kind.is_bridge() {
        al.align_all(MIB);
    }
    let mut own: Vec<(Bar, bool)> = p.bars.iter().flatten().map(|b| (*b, false)).collect();
    if let Some((vfs, ..)) = p.sriov {
        own.extend(p.vf_bars.iter().flatten().map(|b| {
            (
                Bar {
                    size: b.size * u64::from(vfs),
                    ..*b
                },
                true,
            )
        }));
    }
    own.sort_by_key(|(b, _)| std::cmp::Reverse(b.size));
    for (b, is_vf) in own {
        let map = if is_vf { &mut out.vf_bar } else { &mut out.bar };
        if map.contains_key(&(id, b.index)) {
            continue; // fixed
        }
        let what = format!("{} {}BAR{}", p.bdf, if is_vf { "VF " } else { "" }, b.index);
        let key = if is_vf {
            format!("{}.sriov.bars", p.key)
        } else {
            format!("{}.bars", p.key)
        };
        // A VF BAR area is aligned to one VF's BAR size (`b.size` is the whole area).
        let align = if is_vf {
            b.size / u64::from(p.sriov.map_or(1, |s| s.0))
        } else {
            b.size
        };
        let a = al.alloc(class_of(&b), b.size, align, &what, &key)?;
        map.insert((id, b.index), a);
    }
    for &c in &p.children {
        if protos[c].pf.is_none() {
            place(protos, c, al, out)?;
        }
    }
    if p.kind.is_bridge() {
        al.align_all(MIB);
    }
    Ok(())
}

fn union(a: Option<Span>, b: Span) -> Option<Span> {
    if b.len == 0 {
        return a;
    }
    Some(match a {
        None => b,
        Some(a) => {
            let start = a.start.min(b.start);
            let last = a.last().unwrap_or(a.start).max(b.last().unwrap_or(b.start));
            Span {
                start,
                len: last - start + 1,
            }
        }
    })
}

fn round(s: Option<Span>, g: u64) -> Option<Span> {
    s.map(|s| {
        let start = s.start / g * g;
        let last = s.last().unwrap_or(s.start) | (g - 1);
        Span {
            start,
            len: last - start + 1,
        }
    })
}

/// The decode ranges of one function: (class, span) per BAR / VF BAR area / window.
fn ranges_of(protos: &[Proto], id: FnId, out: &Assigned) -> Vec<(Class, Span)> {
    let p = &protos[id];
    if p.kind.is_bridge() {
        let w = out.windows.get(&id).copied().unwrap_or([None; 3]);
        let mut v: Vec<(Class, Span)> = Vec::new();
        for (c, s) in [
            (Class::NonPref, w[0]),
            (Class::Pref, w[1]),
            (Class::Io, w[2]),
        ] {
            if let Some(s) = s {
                v.push((c, s));
            }
        }
        for b in p.bars.iter().flatten() {
            if let Some(&a) = out.bar.get(&(id, b.index)) {
                v.push((
                    class_of(b),
                    Span {
                        start: a,
                        len: b.size,
                    },
                ));
            }
        }
        return v;
    }
    let mut v = Vec::new();
    if let Some(pf) = p.pf {
        for b in p.bars.iter().flatten() {
            if let Some(&a) = out.vf_bar.get(&(pf, b.index)) {
                v.push((
                    class_of(b),
                    Span {
                        start: a + b.size * u64::from(p.vf_index),
                        len: b.size,
                    },
                ));
            }
        }
        return v;
    }
    for b in p.bars.iter().flatten() {
        if let Some(&a) = out.bar.get(&(id, b.index)) {
            v.push((
                class_of(b),
                Span {
                    start: a,
                    len: b.size,
                },
            ));
        }
    }
    if let Some((vfs, ..)) = p.sriov {
        for b in p.vf_bars.iter().flatten() {
            if let Some(&a) = out.vf_bar.get(&(id, b.index)) {
                v.push((
                    class_of(b),
                    Span {
                        start: a,
                        len: b.size * u64::from(vfs),
                    },
                ));
            }
        }
    }
    v
}

fn hull(protos: &[Proto], id: FnId, out: &mut Assigned) {
    let p = &protos[id];
    if !p.kind.is_bridge() {
        return;
    }
    let mut w: [Option<Span>; 3] = [None; 3];
    for &c in &p.children {
        hull(protos, c, out);
        for (class, s) in ranges_of(protos, c, out) {
            let i = match class {
                Class::NonPref => 0,
                Class::Pref => 1,
                Class::Io => 2,
            };
            w[i] = union(w[i], s);
        }
    }
    w[0] = round(w[0], MIB);
    w[1] = round(w[1], MIB);
    w[2] = round(w[2], 0x1000);
    out.windows.insert(id, w);
}

fn check_bus(protos: &[Proto], kids: &[FnId], out: &Assigned) -> Result<(), FabricError> {
    let mut seen: Vec<(Span, FnId)> = Vec::new();
    for &k in kids {
        let p = &protos[k];
        if p.pf.is_some() {
            continue; // a VF's BAR lies inside its PF's VF BAR area, checked with the PF
        }
        if p.kind.is_bridge() {
            if let Some(np) = out.windows.get(&k).and_then(|w| w[0]) {
                if np.last().is_some_and(|l| l >= GIB4) {
                    return Err(err(
                        format!("{}.bdf", p.key),
                        format!(
                            "the non-prefetchable window of {} would reach above 4 GiB ({np}): a non-prefetchable BAR below it is fixed above 4 GiB",
                            p.bdf
                        ),
                    ));
                }
            }
        }
        for (class, s) in ranges_of(protos, k, out) {
            if class == Class::Io {
                continue;
            }
            if let Some((_, o)) = seen.iter().find(|(x, o)| *o != k && x.overlaps(&s)) {
                return Err(err(
                    format!("{}.bdf", p.key),
                    format!(
                        "address clash: {}'s range {s} overlaps {}'s on the same bus (fixed BAR addresses force this)",
                        p.bdf, protos[*o].bdf
                    ),
                ));
            }
            seen.push((s, k));
        }
        if p.kind.is_bridge() {
            check_bus(protos, &p.children, out)?;
        }
    }
    Ok(())
}

/// The registers a function has at power-on, and its capability offsets.
fn power_on_config(p: &Proto, multifunction: bool) -> (ConfigSpace, Caps) {
    let mut c = ConfigSpace::new();
    let is_vf = p.pf.is_some();
    let (vendor, device) = if is_vf {
        (0xffff, 0xffff)
    } else {
        (p.vendor, p.device)
    };
    c.set16(regs::VENDOR_ID, vendor);
    c.set16(regs::DEVICE_ID, device);
    c.set32(regs::REVISION_ID, (p.class << 8) | 0x01);
    let header = if p.kind.is_bridge() {
        regs::HEADER_TYPE_BRIDGE
    } else {
        regs::HEADER_TYPE_NORMAL
    };
    c.set8(
        regs::HEADER_TYPE,
        header
            | if multifunction {
                regs::HEADER_TYPE_MFD
            } else {
                0
            },
    );
    let cmd_mask = if is_vf {
        regs::COMMAND_MASTER
    } else {
        regs::COMMAND_IO
            | regs::COMMAND_MEMORY
            | regs::COMMAND_MASTER
            | regs::COMMAND_PARITY
            | regs::COMMAND_SERR
            | regs::COMMAND_INTX_DISABLE
    };
    c.set_wmask(regs::COMMAND, 2, cmd_mask.into());
    c.set_w1c(regs::STATUS, 2, regs::STATUS_W1C.into());
    c.set_wmask(regs::CACHE_LINE_SIZE, 1, 0xff);
    c.set_wmask(regs::LATENCY_TIMER, 1, 0xff);
    c.set_wmask(regs::INTERRUPT_LINE, 1, 0xff);
    if !is_vf {
        for b in p.bars.iter().flatten() {
            let off = regs::BASE_ADDRESS_0 + 4 * u16::from(b.index);
            c.set32(off, b.flag_bits());
            c.set_wmask(off, 4, b.wmask_lo());
            if b.kind == BarType::Mem64 {
                c.set_wmask(off + 4, 4, b.wmask_hi());
            }
        }
    }
    if p.kind.is_bridge() {
        c.set_wmask(regs::PRIMARY_BUS, 4, 0x00ff_ffff);
        c.set8(regs::IO_BASE, regs::IO_RANGE_TYPE_16);
        c.set_wmask(regs::IO_BASE, 1, 0xf0);
        c.set_wmask(regs::IO_LIMIT, 1, 0xf0);
        c.set_wmask(regs::MEMORY_BASE, 2, 0xfff0);
        c.set_wmask(regs::MEMORY_LIMIT, 2, 0xfff0);
        c.set16(regs::PREF_MEMORY_BASE, regs::PREF_RANGE_TYPE_64);
        c.set16(regs::PREF_MEMORY_LIMIT, regs::PREF_RANGE_TYPE_64);
        c.set_wmask(regs::PREF_MEMORY_BASE, 2, 0xfff0);
        c.set_wmask(regs::PREF_MEMORY_LIMIT, 2, 0xfff0);
        c.set_wmask(regs::PREF_BASE_UPPER32, 4, 0xffff_ffff);
        c.set_wmask(regs::PREF_LIMIT_UPPER32, 4, 0xffff_ffff);
        c.set_wmask(regs::IO_BASE_UPPER16, 4, 0xffff_ffff);
        c.set_wmask(regs::BRIDGE_CONTROL, 2, 0x0fff);
    }
    if !p.config.is_empty() {
        return captured_config(c, p);
    }
    let mut caps = Caps::default();
    if !is_vf && p.pm && p.kind != DeviceKind::HostBridgeFunction {
        let pm = c
            .add_cap(regs::CAP_ID_PM, regs::PM_SIZEOF)
            .expect("empty config space has room");
        c.set16(pm + regs::PM_PMC, 0x0003);
        c.set16(
            pm + regs::PM_CTRL,
            if p.no_soft_reset {
                regs::PM_CTRL_NO_SOFT_RESET
            } else {
                0
            },
        );
        c.set_wmask(pm + regs::PM_CTRL, 2, regs::PM_CTRL_STATE_MASK.into());
        caps.pm = Some(pm);
    }
    if let Some(t) = p.kind.pcie_type().filter(|_| p.express) {
        let e = c
            .add_cap(regs::CAP_ID_EXP, regs::EXP_SIZEOF_V2)
            .expect("room for the PCIe capability");
        c.set16(e + regs::EXP_FLAGS, 0x0002 | (u16::from(t) << 4));
        c.set32(
            e + regs::EXP_DEVCAP,
            0x1 | if p.flr { regs::EXP_DEVCAP_FLR } else { 0 },
        );
        c.set16(e + regs::EXP_DEVCTL, 0x2810);
        c.set_wmask(e + regs::EXP_DEVCTL, 2, 0x7fff);
        c.set32(e + regs::EXP_LNKCAP, 0x0000_0104);
        c.set_wmask(e + regs::EXP_LNKCTL, 2, 0x0fff);
        c.set16(e + regs::EXP_LNKSTA, 0x1041);
        caps.exp = Some(e);
    }
    if p.af_flr {
        let a = c
            .add_cap(regs::CAP_ID_AF, regs::AF_SIZEOF)
            .expect("room for AF");
        c.set8(a + regs::AF_LENGTH, regs::AF_SIZEOF);
        c.set8(a + regs::AF_CAP, regs::AF_CAP_TP | regs::AF_CAP_FLR);
        caps.af = Some(a);
    }
    if let Some(bits) = p.acs {
        let a = c
            .add_ext_cap(regs::EXT_CAP_ID_ACS, 1, 12)
            .expect("room for ACS");
        c.set16(a + regs::ACS_CAP, regs::ACS_ALL | (8 << 8));
        c.set16(a + regs::ACS_CTRL, bits);
        c.set_wmask(a + regs::ACS_CTRL, 2, regs::ACS_ALL.into());
        c.set32(a + regs::ACS_EGRESS_CTL_V, 0xff);
        c.set_wmask(a + regs::ACS_EGRESS_CTL_V, 4, 0xff);
        caps.acs = Some(a);
    }
    if let Some((vfs, offset, stride, vf_dev)) = p.sriov {
        let s = c
            .add_ext_cap(regs::EXT_CAP_ID_SRIOV, 1, regs::SRIOV_SIZEOF)
            .expect("room for SR-IOV");
        c.set_wmask(
            s + regs::SRIOV_CTRL,
            2,
            (regs::SRIOV_CTRL_VFE | regs::SRIOV_CTRL_MSE).into(),
        );
        c.set16(s + regs::SRIOV_INITIAL_VF, vfs);
        c.set16(s + regs::SRIOV_TOTAL_VF, vfs);
        c.set_wmask(s + regs::SRIOV_NUM_VF, 2, 0xffff);
        c.set16(s + regs::SRIOV_VF_OFFSET, offset);
        c.set16(s + regs::SRIOV_VF_STRIDE, stride);
        c.set16(s + regs::SRIOV_VF_DID, vf_dev);
        c.set32(s + regs::SRIOV_SUP_PGSIZE, 0x553);
        c.set32(s + regs::SRIOV_SYS_PGSIZE, 0x1);
        c.set_wmask(s + regs::SRIOV_SYS_PGSIZE, 4, 0xffff_ffff);
        for b in p.vf_bars.iter().flatten() {
            let off = s + regs::SRIOV_BAR + 4 * u16::from(b.index);
            c.set32(off, b.flag_bits());
            c.set_wmask(off, 4, b.wmask_lo());
            if b.kind == BarType::Mem64 {
                c.set_wmask(off + 4, 4, b.wmask_hi());
            }
        }
        caps.sriov = Some(s);
    }
    (c, caps)
}

/// The registers of a function whose config bytes were captured: the bytes laid over the
/// standard header's write masks, the capabilities found by walking their chains, and the
/// write masks of the registers the model acts on set where those capabilities are.
fn captured_config(mut c: ConfigSpace, p: &Proto) -> (ConfigSpace, Caps) {
    for (off, bytes) in &p.config {
        for (i, b) in bytes.iter().enumerate() {
            c.set8(off + i as u16, *b);
        }
    }
    let caps = Caps {
        pm: c.find_cap(regs::CAP_ID_PM),
        exp: c.find_cap(regs::CAP_ID_EXP),
        af: c.find_cap(regs::CAP_ID_AF),
        acs: c.find_ext_cap(regs::EXT_CAP_ID_ACS),
        sriov: None,
    };
    if let Some(pm) = caps.pm {
        c.set_wmask(pm + regs::PM_CTRL, 2, regs::PM_CTRL_STATE_MASK.into());
    }
    if let Some(e) = caps.exp {
        c.set_wmask(e + regs::EXP_DEVCTL, 2, 0x7fff);
        c.set_wmask(e + regs::EXP_LNKCTL, 2, 0x0fff);
    }
    if let Some(a) = caps.acs {
        c.set_wmask(a + regs::ACS_CTRL, 2, regs::ACS_ALL.into());
    }
    for (off, mask) in &p.wmask {
        for (i, m) in mask.iter().enumerate() {
            c.set_wmask(off + i as u16, 1, u32::from(*m));
        }
    }
    (c, caps)
}

fn set_window(c: &mut ConfigSpace, base_reg: u16, limit_reg: u16, w: Option<Span>) {
    let keep_b = c.read16(base_reg) & 0xf;
    let keep_l = c.read16(limit_reg) & 0xf;
    if let Some(s) = w {
        let last = s.last().unwrap_or(s.start);
        c.set16(base_reg, ((s.start >> 16) as u16 & 0xfff0) | keep_b);
        c.set16(limit_reg, ((last >> 16) as u16 & 0xfff0) | keep_l);
    } else {
        // Base above limit: the window is closed.
        c.set16(base_reg, 0xfff0 | keep_b);
        c.set16(limit_reg, keep_l);
    }
}

/// What firmware and drivers leave in the registers after boot.
fn program(
    c: &mut ConfigSpace,
    p: &Proto,
    caps: &Caps,
    id: FnId,
    assigned: &Assigned,
    buses: Option<(u8, u8)>,
) {
    let mut cmd = regs::COMMAND_MASTER;
    if p.pf.is_none() {
        for b in p.bars.iter().flatten() {
            let addr = assigned.bar.get(&(id, b.index)).copied().unwrap_or(0);
            let off = regs::BASE_ADDRESS_0 + 4 * u16::from(b.index);
            c.set32(off, (addr as u32 & !0xf) | b.flag_bits());
            if b.kind == BarType::Mem64 {
                c.set32(off + 4, (addr >> 32) as u32);
            }
            if b.kind == BarType::Io {
                c.set32(off, (addr as u32 & !0x3) | b.flag_bits());
                cmd |= regs::COMMAND_IO;
            } else {
                cmd |= regs::COMMAND_MEMORY;
            }
        }
    }
    if let Some(s) = caps.sriov {
        for b in p.vf_bars.iter().flatten() {
            let addr = assigned.vf_bar.get(&(id, b.index)).copied().unwrap_or(0);
            let off = s + regs::SRIOV_BAR + 4 * u16::from(b.index);
            c.set32(off, (addr as u32 & !0xf) | b.flag_bits());
            if b.kind == BarType::Mem64 {
                c.set32(off + 4, (addr >> 32) as u32);
            }
        }
        let vfs = p.sriov.map_or(0, |s| s.0);
        c.set16(s + regs::SRIOV_NUM_VF, vfs);
        c.set16(
            s + regs::SRIOV_CTRL,
            regs::SRIOV_CTRL_VFE | regs::SRIOV_CTRL_MSE,
        );
    }
    if p.kind.is_bridge() {
        let (sec, sub) = buses.unwrap_or((0, 0));
        c.set8(regs::PRIMARY_BUS, p.bdf.bus());
        c.set8(regs::SECONDARY_BUS, sec);
        c.set8(regs::SUBORDINATE_BUS, sub);
        let w = assigned.windows.get(&id).copied().unwrap_or([None; 3]);
        set_window(c, regs::MEMORY_BASE, regs::MEMORY_LIMIT, w[0]);
        set_window(c, regs::PREF_MEMORY_BASE, regs::PREF_MEMORY_LIMIT, w[1]);
        let (pb, pl) = w[1].map_or((0, 0), |s| {
            (s.start >> 32, s.last().unwrap_or(s.start) >> 32)
        });
        c.set32(regs::PREF_BASE_UPPER32, pb as u32);
        c.set32(regs::PREF_LIMIT_UPPER32, pl as u32);
        cmd |= regs::COMMAND_MEMORY;
        if let Some(s) = w[2] {
            cmd |= regs::COMMAND_IO;
            let last = s.last().unwrap_or(s.start);
            c.set8(
                regs::IO_BASE,
                ((s.start >> 8) as u8 & 0xf0) | regs::IO_RANGE_TYPE_16,
            );
            c.set8(
                regs::IO_LIMIT,
                ((last >> 8) as u8 & 0xf0) | regs::IO_RANGE_TYPE_16,
            );
        } else {
            c.set8(regs::IO_BASE, 0xf0);
            c.set8(regs::IO_LIMIT, 0x00);
        }
    }
    if p.pf.is_some() {
        cmd = regs::COMMAND_MASTER;
    }
    if !p.config.is_empty() {
        // What the firmware left there, as captured.
        cmd = c.read16(regs::COMMAND);
    }
    c.set16(regs::COMMAND, cmd);
}
