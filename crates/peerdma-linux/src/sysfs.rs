//! The running machine as a fabric: PCI topology from sysfs, windows and RAM from
//! `/proc/iomem`, the CPU from `/proc/cpuinfo`.
//!
//! - Hierarchy: each `/sys/bus/pci/devices/X` links to its place under
//!   `/sys/devices/pciDDDD:BB/…`; the directory above a device is its bridge, or its host
//!   bridge.
//! - Kind: header type (config byte 0x0e) and the PCI Express port type when config space past
//!   64 bytes is readable (root); otherwise inferred from the tree.
//! - BARs: CPU addresses from `resource`; bus addresses from the BAR registers in `config`
//!   (their difference is the window's bus offset).
//! - ACS control: from the extended config space when all 4 KiB are readable (root); else
//!   *unknown*, said so, never guessed.
//! - VFs: `physfn`; their PF's SR-IOV offset and stride are recovered from the VFs' addresses.
//! - Host bridge windows: the `PCI Bus DDDD:BB` lines of `/proc/iomem`; without addresses
//!   there (unprivileged), windows just covering the BARs.
//!
//! Everything is read through a [`Source`], so captured trees (tests/fixtures) and the live
//! `/` are read the same way.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use peerdma_pci::spec::{
    BarSpec, BarType, Cpu, CpuVendor, DeviceKind, DeviceSpec, FabricSpec, HostBridgeSpec,
    PlatformSpec, RamSpec, SriovSpec, WindowSpec,
};
use peerdma_pci::{Bdf, regs};

/// Where files come from.
pub trait Source {
    /// Reads a file (absolute path as on the host: `/sys/...`, `/proc/...`).
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Reads a symlink's target.
    fn read_link(&self, path: &str) -> io::Result<String>;
    /// Lists a directory's entries (names).
    fn list(&self, path: &str) -> io::Result<Vec<String>>;
}

/// Files under a root directory: `/` for the live machine, a fixture directory for tests.
#[derive(Debug, Clone)]
pub struct RootDir(pub PathBuf);

impl RootDir {
    fn at(&self, path: &str) -> PathBuf {
        self.0.join(path.trim_start_matches('/'))
    }
}

impl Source for RootDir {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.at(path))
    }
    fn read_link(&self, path: &str) -> io::Result<String> {
        Ok(std::fs::read_link(self.at(path))?
            .to_string_lossy()
            .into_owned())
    }
    fn list(&self, path: &str) -> io::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(self.at(path))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        v.sort();
        Ok(v)
    }
}

/// What sysfs says about one function beyond the fabric model.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct HostDevice {
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// The IOMMU group number, if any.
    pub iommu_group: Option<u32>,
    /// Bytes of config space this process could read (64 unprivileged, 4096 as root).
    pub config_len: usize,
    /// Whether ACS control bits could be read (needs the extended config space).
    pub acs_known: bool,
}

/// A scanned machine.
#[derive(Debug, Clone)]
pub struct HostScan {
    /// The fabric description (all BAR addresses fixed to what the machine has).
    pub spec: FabricSpec,
    /// Per-function facts sysfs adds.
    pub devices: BTreeMap<Bdf, HostDevice>,
    /// What could not be read or had to be assumed, in plain words.
    pub notes: Vec<String>,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// sysfs has no PCI devices directory.
    #[error("cannot list {path}: {err} (is this Linux with sysfs mounted?)")]
    NoSysfs {
        /// The path.
        path: String,
        /// The error.
        err: io::Error,
    },
}

struct Raw {
    bdf: Bdf,
    parent: Parent,
    vendor: u16,
    device: u16,
    class: u32,
    config: Vec<u8>,
    /// (index, cpu start, size, flags)
    resources: Vec<(u8, u64, u64, u64)>,
    physfn: Option<Bdf>,
    info: HostDevice,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Parent {
    Host(String),
    Bridge(Bdf),
}

const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x10_0000;

fn text(src: &dyn Source, path: &str) -> Option<String> {
    src.read(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn cfg_u16(c: &[u8], at: usize) -> Option<u16> {
    c.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn cfg_u32(c: &[u8], at: usize) -> Option<u32> {
    c.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The PCIe port type from a config dump, if the capability list is readable.
fn pcie_type(c: &[u8]) -> Option<u8> {
    if cfg_u16(c, regs::STATUS.into())? & regs::STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut pos = usize::from(*c.get(usize::from(regs::CAPABILITY_LIST))?) & !3;
    for _ in 0..48 {
        if pos < 0x40 {
            return None;
        }
        let id = *c.get(pos)?;
        if id == regs::CAP_ID_EXP {
            return Some(((cfg_u16(c, pos + 2)? >> 4) & 0xf) as u8);
        }
        pos = usize::from(*c.get(pos + 1)?) & !3;
    }
    None
}

/// A capability's offset, standard list.
fn find_cap(c: &[u8], id: u8) -> Option<usize> {
    let mut pos = usize::from(*c.get(usize::from(regs::CAPABILITY_LIST))?) & !3;
    for _ in 0..48 {
        if pos < 0x40 {
            return None;
        }
        if *c.get(pos)? == id {
            return Some(pos);
        }
        pos = usize::from(*c.get(pos + 1)?) & !3;
    }
    None
}

/// What a config dump says about ACS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acs {
    /// Only the unprivileged 64 bytes were readable.
    Unknown,
    /// No ACS capability (a 256-byte config space has no extended capabilities at all).
    Absent,
    /// The control register.
    Ctrl(u16),
}

fn acs_from_config(c: &[u8]) -> Acs {
    if c.len() < 256 {
        return Acs::Unknown;
    }
    if c.len() < 4096 {
        return Acs::Absent;
    }
    let mut pos = 0x100usize;
    for _ in 0..480 {
        let Some(h) = cfg_u32(c, pos) else {
            return Acs::Absent;
        };
        if h == 0 || h == 0xffff_ffff {
            return Acs::Absent;
        }
        if (h & 0xffff) as u16 == regs::EXT_CAP_ID_ACS {
            return cfg_u16(c, pos + usize::from(regs::ACS_CTRL)).map_or(Acs::Absent, Acs::Ctrl);
        }
        let next = ((h >> 20) & 0xffc) as usize;
        if next < 0x100 {
            return Acs::Absent;
        }
        pos = next;
    }
    Acs::Absent
}

fn parse_resources(t: &str) -> Vec<(u8, u64, u64, u64)> {
    let mut out = Vec::new();
    for (i, line) in t.lines().enumerate().take(6) {
        let f: Vec<u64> = line.split_whitespace().filter_map(hex).collect();
        if let [start, end, flags] = f[..] {
            if flags & (IORESOURCE_IO | IORESOURCE_MEM) != 0 && end > start {
                out.push((i as u8, start, end - start + 1, flags));
            }
        }
    }
    out
}

/// Top-level `/proc/iomem` ranges whose name starts with `prefix`.
fn iomem_ranges(t: &str, prefix: &str) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    for line in t.lines() {
        if line.starts_with(' ') {
            continue;
        }
        let Some((range, name)) = line.split_once(" : ") else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Some(a), Some(b)) = (hex(a), hex(b)) {
            if b > a {
                out.push((a, b - a + 1, name.to_string()));
            }
        }
    }
    out
}

fn cpu_of(cpuinfo: &str) -> Cpu {
    let field = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|x| x.trim() == k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    match field("vendor_id").as_deref() {
        Some("GenuineIntel") => Cpu {
            vendor: CpuVendor::Intel,
            family: field("cpu family")
                .and_then(|f| f.parse().ok())
                .unwrap_or(0),
        },
        Some("AuthenticAMD" | "HygonGenuine") => Cpu {
            vendor: CpuVendor::Amd,
            family: field("cpu family")
                .and_then(|f| f.parse().ok())
                .unwrap_or(0),
        },
        _ if field("CPU implementer").is_some() => Cpu {
            vendor: CpuVendor::Arm,
            family: 0,
        },
        _ => Cpu {
            vendor: CpuVendor::Other,
            family: 0,
        },
    }
}

/// Reads the machine.
pub fn scan(src: &dyn Source) -> Result<HostScan, ScanError> {
    let base = "/sys/bus/pci/devices";
    let names = src.list(base).map_err(|err| ScanError::NoSysfs {
        path: base.into(),
        err,
    })?;
    let mut notes = Vec::new();
    let mut raws: Vec<Raw> = Vec::new();
    for name in names {
        let Ok(bdf) = name.parse::<Bdf>() else {
            continue;
        };
        let dir = format!("{base}/{name}");
        let Ok(link) = src.read_link(&dir) else {
            notes.push(format!("{name}: not a link in {base}; skipped"));
            continue;
        };
        let comps: Vec<&str> = link
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".." && *c != "devices")
            .collect();
        let pos = comps
            .iter()
            .position(|c| c.starts_with("pci") && c.contains(':'));
        let parent = match pos {
            Some(p) if comps.len() >= p + 2 => {
                let above = comps[comps.len() - 2];
                match above.parse::<Bdf>() {
                    Ok(b) => Parent::Bridge(b),
                    Err(_) => Parent::Host(comps[p].to_string()),
                }
            }
            _ => {
                notes.push(format!(
                    "{name}: cannot place {link} under a host bridge; skipped"
                ));
                continue;
            }
        };
        let config = src.read(&format!("{dir}/config")).unwrap_or_default();
        let info = HostDevice {
            driver: src
                .read_link(&format!("{dir}/driver"))
                .ok()
                .and_then(|l| l.rsplit('/').next().map(str::to_string)),
            iommu_group: src
                .read_link(&format!("{dir}/iommu_group"))
                .ok()
                .and_then(|l| l.rsplit('/').next().and_then(|g| g.parse().ok())),
            config_len: config.len(),
            acs_known: config.len() >= 256,
        };
        raws.push(Raw {
            bdf,
            parent,
            vendor: text(src, &format!("{dir}/vendor"))
                .and_then(|v| hex(&v))
                .map_or(0xffff, |v| v as u16),
            device: text(src, &format!("{dir}/device"))
                .and_then(|v| hex(&v))
                .map_or(0xffff, |v| v as u16),
            class: text(src, &format!("{dir}/class"))
                .and_then(|v| hex(&v))
                .map_or(0, |v| v as u32),
            config,
            resources: text(src, &format!("{dir}/resource"))
                .map(|t| parse_resources(&t))
                .unwrap_or_default(),
            physfn: src
                .read_link(&format!("{dir}/physfn"))
                .ok()
                .and_then(|l| l.rsplit('/').next().and_then(|b| b.parse().ok())),
            info,
        });
    }
    if raws.iter().any(|r| r.config.len() < 256) {
        notes.push("config space past 64 bytes is readable only as root: ACS bits are unknown where it was not read".into());
    }
    let by_bdf: HashMap<Bdf, usize> = raws.iter().enumerate().map(|(i, r)| (r.bdf, i)).collect();

    // Bus offsets learnt from BARs whose registers were readable: (cpu, bus) pairs.
    let mut bar_pairs: Vec<(u64, u64, u64)> = Vec::new(); // cpu, size, bus
    let bus_addr = |r: &Raw, index: u8, cpu: u64, flags: u64| -> Option<u64> {
        let reg = usize::from(regs::BASE_ADDRESS_0) + 4 * usize::from(index);
        let lo = u64::from(cfg_u32(&r.config, reg)?);
        if flags & IORESOURCE_IO != 0 {
            return Some(cpu);
        }
        let mut v = lo & !0xf;
        if flags & IORESOURCE_MEM_64 != 0 {
            v |= u64::from(cfg_u32(&r.config, reg + 4)?) << 32;
        }
        (v != 0 || cpu == 0).then_some(v)
    };

    let mut devices = Vec::new();
    let mut vf_groups: BTreeMap<Bdf, Vec<usize>> = BTreeMap::new();
    for (i, r) in raws.iter().enumerate() {
        if let Some(pf) = r.physfn {
            vf_groups.entry(pf).or_default().push(i);
        }
    }
    let kind_of = |r: &Raw| -> DeviceKind {
        let header = r
            .config
            .get(usize::from(regs::HEADER_TYPE))
            .map_or(0, |h| h & 0x7f);
        let on_root = matches!(r.parent, Parent::Host(_));
        if header == regs::HEADER_TYPE_BRIDGE {
            match (pcie_type(&r.config), on_root) {
                (Some(regs::EXP_TYPE_ROOT_PORT), _) | (None, true) => DeviceKind::RootPort,
                (Some(regs::EXP_TYPE_UPSTREAM), _) => DeviceKind::SwitchUpstream,
                (Some(regs::EXP_TYPE_DOWNSTREAM), _) => DeviceKind::SwitchDownstream,
                _ => DeviceKind::PciBridge,
            }
        } else if on_root {
            if r.class >> 8 == 0x0600 && r.bdf.devfn() == 0 {
                DeviceKind::HostBridgeFunction
            } else {
                DeviceKind::Rciep
            }
        } else {
            DeviceKind::Endpoint
        }
    };
    let mut kinds: HashMap<Bdf, DeviceKind> = raws.iter().map(|r| (r.bdf, kind_of(r))).collect();
    // Without PCIe types: a bridge below a root port with bridge children is a switch's
    // upstream port, and bridges below it are its downstream ports.
    for r in &raws {
        if kinds[&r.bdf] == DeviceKind::PciBridge && pcie_type(&r.config).is_none() {
            if let Parent::Bridge(p) = r.parent {
                if kinds.get(&p) == Some(&DeviceKind::RootPort) {
                    let has_bridge_kids = raws.iter().any(|c| {
                        c.parent == Parent::Bridge(r.bdf)
                            && c.config.get(0x0e).is_some_and(|h| h & 0x7f == 1)
                    });
                    if has_bridge_kids {
                        kinds.insert(r.bdf, DeviceKind::SwitchUpstream);
                    }
                }
            }
        }
    }
    for r in &raws {
        if let Parent::Bridge(p) = r.parent {
            if kinds.get(&p) == Some(&DeviceKind::SwitchUpstream)
                && kinds[&r.bdf] == DeviceKind::PciBridge
            {
                kinds.insert(r.bdf, DeviceKind::SwitchDownstream);
            }
        }
    }

    for r in &raws {
        if r.physfn.is_some() {
            continue; // VFs come from their PF's sriov
        }
        let kind = kinds[&r.bdf];
        let mut d = DeviceSpec::new(
            r.bdf,
            kind,
            match &r.parent {
                Parent::Host(h) => h.clone(),
                Parent::Bridge(b) => b.to_string(),
            },
        );
        d.vendor = r.vendor;
        d.device = r.device;
        d.class = Some(r.class);
        d.acs = match acs_from_config(&r.config) {
            Acs::Ctrl(bits) => Some(bits),
            Acs::Unknown | Acs::Absent => None,
        };
        if let Some(exp) = find_cap(&r.config, regs::CAP_ID_EXP) {
            d.flr = cfg_u32(&r.config, exp + usize::from(regs::EXP_DEVCAP))
                .is_some_and(|c| c & regs::EXP_DEVCAP_FLR != 0);
        }
        if let Some(af) = find_cap(&r.config, regs::CAP_ID_AF) {
            d.af_flr = r
                .config
                .get(af + usize::from(regs::AF_CAP))
                .is_some_and(|c| {
                    c & (regs::AF_CAP_FLR | regs::AF_CAP_TP) == (regs::AF_CAP_FLR | regs::AF_CAP_TP)
                });
        }
        for &(index, cpu, size, flags) in &r.resources {
            if kind.is_bridge() && index > 1 {
                continue;
            }
            if !size.is_power_of_two() {
                notes.push(format!(
                    "{}: BAR{index} of {size:#x} bytes is not a power of two; left out",
                    r.bdf
                ));
                continue;
            }
            let bus = bus_addr(r, index, cpu, flags);
            if let Some(b) = bus {
                if flags & IORESOURCE_MEM != 0 {
                    bar_pairs.push((cpu, size, b));
                }
            }
            d.bars.push(BarSpec {
                index,
                size,
                kind: if flags & IORESOURCE_IO != 0 {
                    BarType::Io
                } else if flags & IORESOURCE_MEM_64 != 0 {
                    BarType::Mem64
                } else {
                    BarType::Mem32
                },
                prefetch: flags & IORESOURCE_PREFETCH != 0,
                addr: Some(bus.unwrap_or(cpu)),
            });
        }
        if let Some(vfs) = vf_groups.get(&r.bdf) {
            let mut vf_bdfs: Vec<Bdf> = vfs.iter().map(|&i| raws[i].bdf).collect();
            vf_bdfs.sort();
            let rid = |b: Bdf| i32::from(b.requester_id());
            let offset = rid(vf_bdfs[0]) - rid(r.bdf);
            let stride = if vf_bdfs.len() > 1 {
                rid(vf_bdfs[1]) - rid(vf_bdfs[0])
            } else {
                1
            };
            let first = &raws[by_bdf[&vf_bdfs[0]]];
            let bars = first
                .resources
                .iter()
                .filter(|(_, _, size, flags)| flags & IORESOURCE_MEM != 0 && size.is_power_of_two())
                .map(|&(index, cpu, size, flags)| BarSpec {
                    index,
                    size,
                    kind: if flags & IORESOURCE_MEM_64 != 0 {
                        BarType::Mem64
                    } else {
                        BarType::Mem32
                    },
                    prefetch: flags & IORESOURCE_PREFETCH != 0,
                    addr: Some(cpu), // corrected by the window offset below
                })
                .collect();
            d.sriov = Some(SriovSpec {
                vfs: vf_bdfs.len() as u16,
                offset: u16::try_from(offset).unwrap_or(1),
                stride: u16::try_from(stride).unwrap_or(1),
                vf_device: Some(first.device),
                bars,
            });
        }
        devices.push(d);
    }

    // Host bridges and their windows.
    let iomem = text(src, "/proc/iomem").unwrap_or_default();
    let mut host_names: Vec<String> = raws
        .iter()
        .filter_map(|r| match &r.parent {
            Parent::Host(h) => Some(h.clone()),
            Parent::Bridge(_) => None,
        })
        .collect();
    host_names.sort();
    host_names.dedup();
    let offset_of = |cpu: u64, size: u64| {
        bar_pairs
            .iter()
            .find(|(c, s, _)| *c >= cpu && c + s <= cpu + size)
            .map_or(0, |(c, _, b)| b.wrapping_sub(*c))
    };
    let mut host_bridges = Vec::new();
    for h in &host_names {
        let (dom, bus) = h
            .trim_start_matches("pci")
            .split_once(':')
            .unwrap_or(("0", "0"));
        let domain = u16::from_str_radix(dom, 16).unwrap_or(0);
        let bus = u8::from_str_radix(bus, 16).unwrap_or(0);
        let label = format!("PCI Bus {domain:04x}:{bus:02x}");
        let mut mmio: Vec<WindowSpec> = iomem_ranges(&iomem, &label)
            .into_iter()
            .map(|(cpu, size, _)| WindowSpec {
                cpu,
                bus: cpu.wrapping_add(offset_of(cpu, size)),
                size,
            })
            .collect();
        if mmio.is_empty() {
            mmio = synthesize_windows(&devices, &raws, h, domain);
            notes.push(format!(
                "{h}: no addresses in /proc/iomem (root only); windows made just to cover its BARs"
            ));
        }
        host_bridges.push(HostBridgeSpec {
            name: h.clone(),
            domain,
            bus,
            p2p: None,
            mmio,
        });
    }
    // VF BAR addresses are CPU addresses in sysfs: move them to the bus with their window's
    // offset.
    for d in &mut devices {
        let hb = host_of(&raws, &by_bdf, d.bdf);
        if let (Some(s), Some(hb)) = (
            &mut d.sriov,
            host_bridges.iter().find(|h| Some(&h.name) == hb.as_ref()),
        ) {
            for b in &mut s.bars {
                if let Some(a) = b.addr {
                    if let Some(w) = hb.mmio.iter().find(|w| a >= w.cpu && a - w.cpu < w.size) {
                        b.addr = Some(a.wrapping_add(w.offset()));
                    }
                }
            }
        }
    }
    let cpu = cpu_of(&text(src, "/proc/cpuinfo").unwrap_or_default());
    let mut ram: Vec<RamSpec> = iomem_ranges(&iomem, "System RAM")
        .into_iter()
        .map(|(cpu, size, _)| RamSpec { cpu, size })
        .collect();
    if ram.is_empty() {
        let kb = text(src, "/proc/meminfo")
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .and_then(|v| v.parse::<u64>().ok())
                    })
            })
            .unwrap_or(0);
        if kb > 0 {
            ram.push(RamSpec {
                cpu: 0,
                size: kb * 1024,
            });
            notes.push("RAM placed at 0 with MemTotal's size (its addresses are in /proc/iomem, root only)".into());
        }
    }
    let devs = raws.iter().map(|r| (r.bdf, r.info.clone())).collect();
    Ok(HostScan {
        spec: FabricSpec {
            platform: PlatformSpec { cpu, ram },
            host_bridges,
            devices,
        },
        devices: devs,
        notes,
    })
}

fn host_of(raws: &[Raw], by_bdf: &HashMap<Bdf, usize>, mut b: Bdf) -> Option<String> {
    for _ in 0..256 {
        let r = &raws[*by_bdf.get(&b)?];
        match &r.parent {
            Parent::Host(h) => return Some(h.clone()),
            Parent::Bridge(p) => b = *p,
        }
    }
    None
}

fn synthesize_windows(
    devices: &[DeviceSpec],
    raws: &[Raw],
    host: &str,
    domain: u16,
) -> Vec<WindowSpec> {
    let by_bdf: HashMap<Bdf, usize> = raws.iter().enumerate().map(|(i, r)| (r.bdf, i)).collect();
    let mut low: Option<(u64, u64)> = None;
    let mut high: Option<(u64, u64)> = None;
    for d in devices.iter().filter(|d| {
        d.bdf.domain() == domain && host_of(raws, &by_bdf, d.bdf).as_deref() == Some(host)
    }) {
        let areas = d
            .bars
            .iter()
            .map(|b| (b.kind, b.addr.unwrap_or(0), b.size))
            .chain(d.sriov.iter().flat_map(|s| {
                s.bars
                    .iter()
                    .map(|b| (b.kind, b.addr.unwrap_or(0), b.size * u64::from(s.vfs)))
            }));
        for (kind, a, size) in areas {
            if kind == BarType::Io {
                continue;
            }
            let slot = if a < 1 << 32 { &mut low } else { &mut high };
            let end = a + size;
            *slot = Some(slot.map_or((a, end), |(s, e)| (s.min(a), e.max(end))));
        }
    }
    [low, high]
        .into_iter()
        .flatten()
        .map(|(s, e)| {
            let s = s & !0xf_ffff;
            let e = (e + 0xf_ffff) & !0xf_ffff;
            WindowSpec {
                cpu: s,
                bus: s,
                size: e - s,
            }
        })
        .collect()
}

/// Reads the live machine (`/sys`, `/proc`).
pub fn scan_host() -> Result<HostScan, ScanError> {
    scan(&RootDir(PathBuf::from("/")))
}

/// Copies what [`scan`] reads from the live machine into `out`, keeping sysfs's links, so a
/// machine can be scanned again elsewhere (the tests' fixtures are made this way).
pub fn capture(out: &Path) -> io::Result<usize> {
    let mut n = 0;
    let base = Path::new("/sys/bus/pci/devices");
    std::fs::create_dir_all(out.join("sys/bus/pci/devices"))?;
    for e in std::fs::read_dir(base)? {
        let e = e?;
        let name = e.file_name();
        let link = std::fs::read_link(e.path())?;
        let real = std::fs::canonicalize(e.path())?;
        let dst = out.join(real.strip_prefix("/").unwrap_or(&real));
        std::fs::create_dir_all(&dst)?;
        std::os::unix::fs::symlink(&link, out.join("sys/bus/pci/devices").join(&name))?;
        for f in ["vendor", "device", "class", "config", "resource"] {
            if let Ok(b) = std::fs::read(real.join(f)) {
                std::fs::write(dst.join(f), b)?;
            }
        }
        for l in ["driver", "iommu_group", "physfn"] {
            if let Ok(t) = std::fs::read_link(real.join(l)) {
                std::os::unix::fs::symlink(t, dst.join(l))?;
            }
        }
        n += 1;
    }
    std::fs::create_dir_all(out.join("proc"))?;
    for f in ["iomem", "cpuinfo", "meminfo"] {
        if let Ok(b) = std::fs::read(Path::new("/proc").join(f)) {
            std::fs::write(out.join("proc").join(f), b)?;
        }
    }
    Ok(n)
}
