//! Fabric files: TOML in, [`FabricSpec`] out, with every error pointing at its file, line
//! and key.
//!
//! The schema is a contract (see the crate's README section in the project docs and the files
//! under `examples/`): `[platform]` with `cpu` and `ram`, `[[host_bridge]]` with `name`,
//! `domain`, `bus`, `p2p`, `mmio`, and `[[device]]` entries with `bdf`, `kind`, `parent`,
//! `name`, `vendor`, `device`, `class`, `flr`, `af_flr`, `acs`, `no_soft_reset`, `pm`,
//! `express`, `bars`,
//! `sriov`. Unknown keys are refused, so a typo never silently changes a platform.
//!
//! Sizes and addresses may be integers or strings (`"16M"`, `"0x8000_0000"`); addresses at or
//! above 2^63 must be strings, since TOML integers are signed 64-bit.

use std::collections::HashMap;
use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use crate::bdf::Bdf;
use crate::error::FabricError;
use crate::fabric::Fabric;
use crate::regs;
use crate::size::parse_size;
use crate::spec::{
    BarSpec, BarType, Cpu, CpuVendor, DeviceKind, DeviceSpec, FabricSpec, HostBridgeSpec,
    P2pForwarding, PlatformSpec, RamSpec, SriovSpec, WindowSpec, acs_bit,
};

/// Where each key path of a document sits: its line and the byte span of its value.
#[derive(Debug, Default, Clone)]
pub struct SourceMap {
    entries: HashMap<String, (usize, Range<usize>)>,
    keys: Vec<(Range<usize>, String)>,
}

impl SourceMap {
    fn build(text: &str) -> SourceMap {
        let mut map = SourceMap::default();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let line_of = |pos: usize| starts.partition_point(|&s| s <= pos);
        if let Ok(doc) = DeTable::parse(text) {
            walk_table(doc.get_ref(), "", &mut map, &line_of);
        }
        map
    }

    /// The line of a key path, or of the nearest enclosing path that has one.
    pub fn line(&self, key: &str) -> Option<usize> {
        let mut k = key;
        loop {
            if let Some((line, _)) = self.entries.get(k) {
                return Some(*line);
            }
            let cut = k.rfind(['.', '['])?;
            k = &k[..cut];
        }
    }

    /// The key path at byte `pos`: the key written there, else the deepest value holding it.
    fn key_at(&self, pos: usize) -> Option<(&str, usize)> {
        if let Some((_, k)) = self.keys.iter().find(|(span, _)| span.contains(&pos)) {
            return self.entries.get(k).map(|(line, _)| (k.as_str(), *line));
        }
        self.entries
            .iter()
            .filter(|(_, (_, span))| span.contains(&pos))
            .min_by_key(|(_, (_, span))| span.len())
            .map(|(k, (line, _))| (k.as_str(), *line))
    }
}

fn walk_table(
    t: &DeTable<'_>,
    prefix: &str,
    map: &mut SourceMap,
    line_of: &dyn Fn(usize) -> usize,
) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        let line = line_of(k.span().start);
        map.entries.insert(path.clone(), (line, v.span()));
        map.keys.push((k.span(), path.clone()));
        walk_value(v.get_ref(), &path, map, line_of);
    }
}

fn walk_value(v: &DeValue<'_>, path: &str, map: &mut SourceMap, line_of: &dyn Fn(usize) -> usize) {
    match v {
        DeValue::Table(t) => walk_table(t, path, map, line_of),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let span = item.span();
                // An array-of-tables element's span starts at its `[[header]]` line, so an
                // error about a whole entry (or a key it lacks) points at the header.
                map.entries.insert(p.clone(), (line_of(span.start), span));
                walk_value(item.get_ref(), &p, map, line_of);
            }
        }
        _ => {}
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawP2p {
    Bool(bool),
    Str(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    platform: RawPlatform,
    #[serde(default)]
    host_bridge: Vec<RawHostBridge>,
    #[serde(default)]
    device: Vec<RawDevice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlatform {
    cpu: RawCpu,
    #[serde(default)]
    ram: Vec<RawRam>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCpu {
    vendor: String,
    #[serde(default)]
    family: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRam {
    cpu: Num,
    size: Num,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostBridge {
    name: String,
    #[serde(default)]
    domain: u16,
    #[serde(default)]
    bus: u8,
    p2p: Option<RawP2p>,
    #[serde(default)]
    mmio: Vec<RawWindow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    cpu: Num,
    bus: Num,
    size: Num,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    bdf: String,
    kind: String,
    parent: String,
    name: Option<String>,
    vendor: Option<u16>,
    device: Option<u16>,
    class: Option<u32>,
    flr: Option<bool>,
    af_flr: Option<bool>,
    acs: Option<Vec<String>>,
    no_soft_reset: Option<bool>,
    pm: Option<bool>,
    express: Option<bool>,
    #[serde(default)]
    bars: Vec<RawBar>,
    sriov: Option<RawSriov>,
    config: Option<Vec<(Num, String)>>,
    wmask: Option<Vec<(Num, String)>>,
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBar {
    index: u8,
    size: Num,
    #[serde(rename = "type")]
    kind: Option<String>,
    prefetch: Option<bool>,
    addr: Option<Num>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSriov {
    vfs: u16,
    offset: Option<u16>,
    stride: Option<u16>,
    vf_device: Option<u16>,
    #[serde(default)]
    bars: Vec<RawBar>,
}

fn num(n: &Num, key: &str, what: &str) -> Result<u64, FabricError> {
    match n {
        Num::Int(i) => u64::try_from(*i)
            .map_err(|_| FabricError::at(key, format!("{what} cannot be negative ({i})"))),
        Num::Str(s) => parse_size(s).map_err(|e| FabricError::at(key, e.to_string())),
    }
}

fn bar(b: &RawBar, key: &str) -> Result<BarSpec, FabricError> {
    let kind = match &b.kind {
        None => BarType::Mem32,
        Some(t) => BarType::parse(t).ok_or_else(|| {
            FabricError::at(
                format!("{key}.type"),
                format!("unknown BAR type {t:?} (mem32, mem64 or io)"),
            )
        })?,
    };
    Ok(BarSpec {
        index: b.index,
        size: num(&b.size, &format!("{key}.size"), "a BAR size")?,
        kind,
        prefetch: b.prefetch.unwrap_or(false),
        addr: b
            .addr
            .as_ref()
            .map(|a| num(a, &format!("{key}.addr"), "an address"))
            .transpose()?,
    })
}

fn convert(raw: &RawFile) -> Result<FabricSpec, FabricError> {
    let vendor = CpuVendor::parse(&raw.platform.cpu.vendor).ok_or_else(|| {
        FabricError::at(
            "platform.cpu.vendor",
            format!(
                "unknown CPU vendor {:?} (amd, intel, arm or other)",
                raw.platform.cpu.vendor
            ),
        )
    })?;
    let mut ram = Vec::new();
    for (i, r) in raw.platform.ram.iter().enumerate() {
        let k = format!("platform.ram[{i}]");
        ram.push(RamSpec {
            cpu: num(&r.cpu, &format!("{k}.cpu"), "an address")?,
            size: num(&r.size, &format!("{k}.size"), "a size")?,
        });
    }
    let mut host_bridges = Vec::new();
    for (h, hb) in raw.host_bridge.iter().enumerate() {
        let k = format!("host_bridge[{h}]");
        let p2p = match &hb.p2p {
            None => None,
            Some(RawP2p::Bool(true)) => Some(P2pForwarding::Any),
            Some(RawP2p::Bool(false)) => Some(P2pForwarding::None),
            Some(RawP2p::Str(s)) => Some(match s.as_str() {
                "any" => P2pForwarding::Any,
                "none" => P2pForwarding::None,
                "same_host_bridge" => P2pForwarding::SameHostBridge,
                _ => {
                    return Err(FabricError::at(
                        format!("{k}.p2p"),
                        format!(
                            "p2p is true, false, \"same_host_bridge\", \"any\" or \"none\", not {s:?}"
                        ),
                    ));
                }
            }),
        };
        let mut mmio = Vec::new();
        for (w, win) in hb.mmio.iter().enumerate() {
            let wk = format!("{k}.mmio[{w}]");
            mmio.push(WindowSpec {
                cpu: num(&win.cpu, &format!("{wk}.cpu"), "an address")?,
                bus: num(&win.bus, &format!("{wk}.bus"), "an address")?,
                size: num(&win.size, &format!("{wk}.size"), "a size")?,
            });
        }
        host_bridges.push(HostBridgeSpec {
            name: hb.name.clone(),
            domain: hb.domain,
            bus: hb.bus,
            p2p,
            mmio,
        });
    }
    let mut devices = Vec::new();
    for (i, d) in raw.device.iter().enumerate() {
        let k = format!("device[{i}]");
        let bdf: Bdf = d.bdf.parse().map_err(|e: crate::bdf::ParseBdfError| {
            FabricError::at(format!("{k}.bdf"), e.to_string())
        })?;
        let kind = DeviceKind::parse(&d.kind).ok_or_else(|| {
            let all: Vec<&str> = DeviceKind::ALL.iter().map(|k| k.as_str()).collect();
            FabricError::at(
                format!("{k}.kind"),
                format!("unknown kind {:?} (one of {})", d.kind, all.join(", ")),
            )
        })?;
        let acs = match &d.acs {
            None => None,
            Some(names) => {
                let mut bits = 0;
                for n in names {
                    bits |= acs_bit(n).ok_or_else(|| {
                        FabricError::at(
                            format!("{k}.acs"),
                            format!("unknown ACS bit {n:?} (SV, TB, RR, CR, UF, EC, DT)"),
                        )
                    })?;
                }
                Some(bits)
            }
        };
        let bars = d
            .bars
            .iter()
            .enumerate()
            .map(|(b, r)| bar(r, &format!("{k}.bars[{b}]")))
            .collect::<Result<_, _>>()?;
        let sriov = match &d.sriov {
            None => None,
            Some(s) => Some(SriovSpec {
                vfs: s.vfs,
                offset: s.offset.unwrap_or(1),
                stride: s.stride.unwrap_or(1),
                vf_device: s.vf_device,
                bars: s
                    .bars
                    .iter()
                    .enumerate()
                    .map(|(b, r)| bar(r, &format!("{k}.sriov.bars[{b}]")))
                    .collect::<Result<_, _>>()?,
            }),
        };
        let mut spec = DeviceSpec::new(bdf, kind, d.parent.clone());
        spec.name.clone_from(&d.name);
        spec.vendor = d.vendor.unwrap_or(spec.vendor);
        spec.device = d.device.unwrap_or(spec.device);
        spec.class = d.class;
        spec.pm = d.pm.unwrap_or(true);
        spec.express = d.express.unwrap_or(true);
        if !spec.express && kind != DeviceKind::Endpoint {
            return Err(FabricError::at(
                format!("{k}.express"),
                "only an endpoint can be conventional PCI",
            ));
        }
        spec.flr = d.flr.unwrap_or(spec.express);
        if spec.flr && !spec.express {
            return Err(FabricError::at(
                format!("{k}.flr"),
                "FLR needs the PCIe capability (express = true)",
            ));
        }
        spec.af_flr = d.af_flr.unwrap_or(false);
        spec.acs = acs;
        spec.no_soft_reset = d.no_soft_reset.unwrap_or(true);
        spec.bars = bars;
        spec.sriov = sriov;
        if let Some(cfg) = &d.config {
            captured_config(&mut spec, d, cfg, &k)?;
        } else if d.wmask.is_some() {
            return Err(FabricError::at(
                format!("{k}.wmask"),
                "needs `config`: write masks are measured with the captured bytes",
            ));
        }
        if let Some(name) = &d.model {
            if d.kind != "endpoint" {
                return Err(FabricError::at(
                    format!("{k}.model"),
                    "only an endpoint has a device model",
                ));
            }
            spec.model = Some(crate::model::DeviceModel::from_name(name).ok_or_else(|| {
                FabricError::at(
                    format!("{k}.model"),
                    format!("unknown device model {name:?} (known: \"qemu-edu\", \"qemu-nvme\", \"qemu-ivshmem\")"),
                )
            })?);
        }
        devices.push(spec);
    }
    Ok(FabricSpec {
        platform: PlatformSpec {
            cpu: Cpu {
                vendor,
                family: raw.platform.cpu.family,
            },
            ram,
        },
        host_bridges,
        devices,
    })
}

/// A device's `config`: captured bytes, from which its IDs, class and capability flags are
/// taken (giving those keys too is an error: the bytes are the truth).
fn captured_config(
    spec: &mut DeviceSpec,
    d: &RawDevice,
    cfg: &[(Num, String)],
    k: &str,
) -> Result<(), FabricError> {
    let key = format!("{k}.config");
    let given = [
        ("vendor", d.vendor.is_some()),
        ("device", d.device.is_some()),
        ("class", d.class.is_some()),
        ("flr", d.flr.is_some()),
        ("af_flr", d.af_flr.is_some()),
        ("acs", d.acs.is_some()),
        ("no_soft_reset", d.no_soft_reset.is_some()),
        ("pm", d.pm.is_some()),
        ("express", d.express.is_some()),
        ("sriov", d.sriov.is_some()),
    ];
    if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
        return Err(FabricError::at(
            format!("{k}.{name}"),
            "comes from `config` when the device has one",
        ));
    }
    let runs = hex_runs(cfg, &key)?;
    let mut image = crate::config::ConfigSpace::new();
    for (off, bytes) in &runs {
        for (i, b) in bytes.iter().enumerate() {
            image.set8(off + i as u16, *b);
        }
    }
    spec.vendor = image.read16(regs::VENDOR_ID);
    spec.device = image.read16(regs::DEVICE_ID);
    spec.class = Some(image.read32(regs::REVISION_ID) >> 8);
    let pm = image.find_cap(regs::CAP_ID_PM);
    let exp = image.find_cap(regs::CAP_ID_EXP);
    spec.pm = pm.is_some();
    spec.no_soft_reset =
        pm.is_some_and(|p| image.read16(p + regs::PM_CTRL) & regs::PM_CTRL_NO_SOFT_RESET != 0);
    spec.express = exp.is_some();
    spec.flr = exp.is_some_and(|e| image.read32(e + regs::EXP_DEVCAP) & regs::EXP_DEVCAP_FLR != 0);
    spec.af_flr = image
        .find_cap(regs::CAP_ID_AF)
        .is_some_and(|a| image.read8(a + regs::AF_CAP) & regs::AF_CAP_FLR != 0);
    spec.acs = image
        .find_ext_cap(regs::EXT_CAP_ID_ACS)
        .map(|a| image.read16(a + regs::ACS_CTRL));
    if !spec.express && spec.kind != DeviceKind::Endpoint {
        return Err(FabricError::at(
            key,
            "only an endpoint can lack a PCIe capability",
        ));
    }
    spec.config = runs;
    if let Some(w) = &d.wmask {
        spec.wmask = hex_runs(w, &format!("{k}.wmask"))?;
    }
    Ok(())
}

/// `[[offset, "hex"], …]` runs of bytes inside the 4 KiB config space. The hex is pairs of
/// digits, spaces ignored; a word `XX*N` stands for the byte XX repeated N times.
fn hex_runs(cfg: &[(Num, String)], key: &str) -> Result<Vec<(u16, Vec<u8>)>, FabricError> {
    let mut runs = Vec::new();
    for (j, (off, hex)) in cfg.iter().enumerate() {
        let at = format!("{key}[{j}]");
        let off = num(off, &at, "the offset")?;
        if off >= regs::CFG_SIZE as u64 {
            return Err(FabricError::at(at, "the offset must be below 0x1000"));
        }
        let bad = || {
            FabricError::at(
                at.clone(),
                "the bytes must be pairs of hex digits (or XX*N)",
            )
        };
        let mut bytes = Vec::new();
        for word in hex.split_whitespace() {
            let (digits, times) = match word.split_once('*') {
                Some((d, n)) => (d, n.parse::<usize>().map_err(|_| bad())?),
                None => (word, 1),
            };
            if digits.len() % 2 != 0 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            if times > regs::CFG_SIZE || (times != 1 && digits.len() != 2) {
                return Err(bad());
            }
            let one: Vec<u8> = (0..digits.len() / 2)
                .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).unwrap_or(0))
                .collect();
            for _ in 0..times {
                bytes.extend_from_slice(&one);
            }
            if bytes.len() > regs::CFG_SIZE {
                break;
            }
        }
        if off as usize + bytes.len() > regs::CFG_SIZE {
            return Err(FabricError::at(
                at,
                "the bytes run past the 4 KiB config space",
            ));
        }
        runs.push((off as u16, bytes));
    }
    Ok(runs)
}

/// Parses a fabric file's text into a spec. `file` names it in errors.
pub fn parse_spec(text: &str, file: &str) -> Result<(FabricSpec, SourceMap), FabricError> {
    let map = SourceMap::build(text);
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (key, line) = match e.span() {
            Some(span) => match map.key_at(span.start) {
                Some((k, l)) => (k.to_string(), Some(line_at(text, span.start).max(l))),
                None => (String::new(), Some(line_at(text, span.start))),
            },
            None => (String::new(), None),
        };
        FabricError {
            file: Some(file.to_string()),
            line,
            key,
            message: e.message().trim().to_string(),
        }
    })?;
    let spec = convert(&raw).map_err(|e| locate(e, &map, file))?;
    Ok((spec, map))
}

fn line_at(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())].matches('\n').count() + 1
}

fn locate(mut e: FabricError, map: &SourceMap, file: &str) -> FabricError {
    e.file = Some(file.to_string());
    if e.line.is_none() {
        e.line = map.line(&e.key);
    }
    e
}

/// Parses and builds a fabric file; every error names `file`, the line and the key.
pub fn load_str(text: &str, file: &str) -> Result<Fabric, FabricError> {
    let (spec, map) = parse_spec(text, file)?;
    Fabric::build(&spec).map_err(|e| locate(e, &map, file))
}

/// Reads, parses and builds a fabric file from disk.
pub fn load_path(path: &std::path::Path) -> Result<Fabric, FabricError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FabricError {
        file: Some(name.clone()),
        line: None,
        key: String::new(),
        message: format!("cannot read the file: {e}"),
    })?;
    load_str(&text, &name)
}
