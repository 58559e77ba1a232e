//! Random platforms for property tests and benchmarks.
//!
//! [`generate`] builds a [`FabricSpec`] from a seed: host bridges (each in its own PCI domain,
//! with identity CPU↔bus windows that do not overlap between bridges), root ports, switches
//! with downstream ports, multi-function endpoints, SR-IOV PFs with VFs, random ACS control
//! bits. The same seed always gives the same platform.

use crate::bdf::Bdf;
use crate::spec::{
    BarSpec, BarType, Cpu, CpuVendor, DeviceKind, DeviceSpec, FabricSpec, HostBridgeSpec,
    P2pForwarding, PlatformSpec, RamSpec, SriovSpec, WindowSpec,
};

/// A small deterministic generator (xorshift64*), so specs depend on nothing but the seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; every seed gives its own sequence (the state is a SplitMix64 mix of it, and
    /// never zero).
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u32) -> bool {
        self.below(100) < u64::from(percent)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Seed.
    pub seed: u64,
    /// Host bridges (each its own domain), at most 64.
    pub host_bridges: usize,
    /// Root ports per host bridge, 1..=31.
    pub root_ports: usize,
    /// Chance (percent) that a root port leads to a switch rather than one endpoint device.
    pub switch_percent: u32,
    /// Downstream ports per switch, at most.
    pub max_downstream: usize,
    /// Functions per endpoint device, at most (1..=8).
    pub max_functions: usize,
    /// Chance (percent) that a port or function has an ACS capability (with random bits).
    pub acs_percent: u32,
    /// Chance (percent) that function 0 of an endpoint is an SR-IOV PF with two VFs.
    pub sriov_percent: u32,
    /// The CPU.
    pub cpu: Cpu,
    /// Forwarding of every host bridge (`None` = derived from the CPU and allowlist).
    pub p2p: Option<P2pForwarding>,
    /// Put every window's CPU range 2^47 above its bus range, so that no CPU address is ever
    /// a bus address (a DMA to a CPU address can then only be decoded by a root complex).
    pub offset_windows: bool,
    /// Draw the CPU (AMD Zen, older AMD, Intel, Arm) and each host bridge's root-bus function
    /// (allowlisted, allowlisted for the same bridge only, unknown, or none at devfn 00.0 so
    /// that the first root port is the one looked at) at random, overriding `cpu`.
    pub vary_platform: bool,
}

impl Default for GenParams {
    fn default() -> GenParams {
        GenParams {
            seed: 1,
            host_bridges: 2,
            root_ports: 3,
            switch_percent: 50,
            max_downstream: 3,
            max_functions: 3,
            acs_percent: 40,
            sriov_percent: 20,
            cpu: Cpu {
                vendor: CpuVendor::Intel,
                family: 6,
            },
            p2p: Some(P2pForwarding::Any),
            offset_windows: false,
            vary_platform: false,
        }
    }
}

fn endpoint_bars(rng: &mut Rng) -> Vec<BarSpec> {
    let mut bars = vec![BarSpec {
        index: 0,
        size: 4096 << rng.below(5), // 4 KiB .. 64 KiB, 32-bit
        kind: BarType::Mem32,
        prefetch: false,
        addr: None,
    }];
    if rng.chance(70) {
        bars.push(BarSpec {
            index: 2,
            size: (1 << 20) << rng.below(11), // 1 MiB .. 1 GiB
            kind: BarType::Mem64,
            prefetch: true,
            addr: None,
        });
    }
    bars
}

fn random_acs(rng: &mut Rng, percent: u32) -> Option<u16> {
    rng.chance(percent).then(|| {
        let mut bits = crate::regs::ACS_SV;
        for b in [
            crate::regs::ACS_RR,
            crate::regs::ACS_CR,
            crate::regs::ACS_EC,
            crate::regs::ACS_UF,
        ] {
            if rng.chance(40) {
                bits |= b;
            }
        }
        bits
    })
}

/// Builds a platform description from `p`.
pub fn generate(p: &GenParams) -> FabricSpec {
    let mut rng = Rng::new(p.seed);
    let cpu = if p.vary_platform {
        match rng.below(4) {
            0 => Cpu {
                vendor: CpuVendor::Amd,
                family: 0x19,
            },
            1 => Cpu {
                vendor: CpuVendor::Amd,
                family: 0x15,
            },
            2 => Cpu {
                vendor: CpuVendor::Intel,
                family: 6,
            },
            _ => Cpu {
                vendor: CpuVendor::Arm,
                family: 0,
            },
        }
    } else {
        p.cpu
    };
    let cpu_offset = if p.offset_windows { 1u64 << 47 } else { 0 };
    let mut devices = Vec::new();
    let mut host_bridges = Vec::new();
    let mut n = 0usize;
    for h in 0..p.host_bridges.min(64) {
        let domain = h as u16;
        let name = format!("hb{h}");
        // Below 4 GiB every host bridge gets an equal share of 2 GiB.
        let np_size = (0x8000_0000 / (p.host_bridges.clamp(4, 64) as u64)) & !0xf_ffff;
        let np_base = 0x8000_0000 + (h as u64) * np_size;
        let pref_base = 0x100_0000_0000 * (h as u64 + 1);
        host_bridges.push(HostBridgeSpec {
            name: name.clone(),
            domain,
            bus: 0,
            p2p: p.p2p,
            mmio: vec![
                WindowSpec {
                    cpu: np_base + cpu_offset,
                    bus: np_base,
                    size: np_size,
                },
                WindowSpec {
                    cpu: pref_base + cpu_offset,
                    bus: pref_base,
                    size: 1 << 40,
                },
            ],
        });
        // The root-bus function the P2P allowlist looks at.
        let (root_ids, with_hbf) = if p.vary_platform {
            match rng.below(4) {
                0 => ((0x8086, 0x2020), true),
                1 => ((0x8086, 0x3c00), true),
                2 => ((0x8086, 0x1234), true),
                _ => ((0x8086, [0x2031, 0x5678][rng.below(2) as usize]), false),
            }
        } else {
            ((0x8086, 0x2020), true)
        };
        if with_hbf {
            let mut hbf = DeviceSpec::new(
                Bdf::new(domain, 0, 0, 0).expect("valid"),
                DeviceKind::HostBridgeFunction,
                name.clone(),
            );
            (hbf.vendor, hbf.device) = root_ids;
            devices.push(hbf);
        }
        let mut next_bus: u16 = 1;
        for r in 0..p.root_ports.clamp(1, 31) {
            if next_bus > 250 {
                break;
            }
            let rp_bdf = Bdf::new(domain, 0, r as u8 + 1, 0).expect("valid");
            let mut rp = DeviceSpec::new(rp_bdf, DeviceKind::RootPort, name.clone());
            if !with_hbf {
                (rp.vendor, rp.device) = root_ids;
            }
            rp.acs = random_acs(&mut rng, p.acs_percent);
            devices.push(rp);
            let bus = next_bus as u8;
            next_bus += 1;
            if rng.chance(p.switch_percent) {
                let usp_bdf = Bdf::new(domain, bus, 0, 0).expect("valid");
                devices.push(DeviceSpec::new(
                    usp_bdf,
                    DeviceKind::SwitchUpstream,
                    rp_bdf.to_string(),
                ));
                let internal = next_bus as u8;
                next_bus += 1;
                let ports = 1 + rng.below(p.max_downstream.max(1) as u64) as u8;
                for d in 0..ports {
                    let dsp_bdf = Bdf::new(domain, internal, d, 0).expect("valid");
                    let mut dsp =
                        DeviceSpec::new(dsp_bdf, DeviceKind::SwitchDownstream, usp_bdf.to_string());
                    dsp.acs = random_acs(&mut rng, p.acs_percent);
                    devices.push(dsp);
                    let ep_bus = next_bus as u8;
                    next_bus += 1;
                    add_endpoint(
                        &mut rng,
                        p,
                        &mut devices,
                        domain,
                        ep_bus,
                        &dsp_bdf.to_string(),
                        &mut n,
                    );
                }
            } else {
                add_endpoint(
                    &mut rng,
                    p,
                    &mut devices,
                    domain,
                    bus,
                    &rp_bdf.to_string(),
                    &mut n,
                );
            }
        }
    }
    FabricSpec {
        platform: PlatformSpec {
            cpu,
            ram: vec![RamSpec {
                cpu: 0,
                size: 1 << 31,
            }],
        },
        host_bridges,
        devices,
    }
}

fn add_endpoint(
    rng: &mut Rng,
    p: &GenParams,
    devices: &mut Vec<DeviceSpec>,
    domain: u16,
    bus: u8,
    parent: &str,
    n: &mut usize,
) {
    let functions = 1 + rng.below(p.max_functions.clamp(1, 8) as u64) as u8;
    let sriov = rng.chance(p.sriov_percent);
    for f in 0..functions {
        let mut d = DeviceSpec::new(
            Bdf::new(domain, bus, 0, f).expect("valid"),
            DeviceKind::Endpoint,
            parent.to_string(),
        );
        d.name = Some(format!("ep{n}"));
        *n += 1;
        d.bars = endpoint_bars(rng);
        if functions > 1 {
            d.acs = random_acs(rng, p.acs_percent);
        }
        if f == 0 && sriov {
            // VFs at device 1 (routing ID +8): clear of the 8 possible functions of device 0.
            d.sriov = Some(SriovSpec {
                vfs: 2,
                offset: 8,
                stride: 1,
                vf_device: None,
                bars: vec![BarSpec {
                    index: 0,
                    size: 64 << 10,
                    kind: BarType::Mem64,
                    prefetch: true,
                    addr: None,
                }],
            });
        }
        devices.push(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_platform() {
        let p = GenParams {
            seed: 42,
            ..GenParams::default()
        };
        assert_eq!(generate(&p), generate(&p));
        let q = GenParams {
            seed: 43,
            ..GenParams::default()
        };
        assert_ne!(generate(&p), generate(&q));
    }

    #[test]
    fn rng_is_spread() {
        let mut r = Rng::new(0);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[r.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }
}
