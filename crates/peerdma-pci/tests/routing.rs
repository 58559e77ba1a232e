//! Memory-request routing through the emulated fabric: where bytes land, and where and why
//! they do not.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{dev, example, example_edited, pattern};
use peerdma_pci::regs;
use peerdma_pci::route::{FaultReason, Location, UrCause};
use peerdma_pci::translate::{Access, AddressTranslator, Translation, TranslationFault};
use peerdma_pci::{Bdf, DmaAddr, Hop, PhysAddr, PowerState, Target};

fn b(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn switch_local_peer_write_lands_without_the_root_complex() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let bar = f.bar(gpu, 0).unwrap();
    let data = pattern(8192, 7);
    let t = f
        .dma_write(nic, DmaAddr(bar.bus.get() + 0x1000), &data)
        .unwrap();
    assert_eq!(t.segments.len(), 1);
    assert_eq!(
        t.segments[0].hops,
        vec![
            Hop::Up {
                bridge: b("0000:02:01.0")
            },
            Hop::Peer {
                to: b("0000:02:00.0")
            },
            Hop::Down {
                bridge: b("0000:02:00.0")
            },
        ]
    );
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: gpu,
            bar: 0,
            offset: 0x1000
        }
    );
    assert!(!t.via_root_complex());
    let mut back = vec![0u8; data.len()];
    f.bar_peek(gpu, 0, 0x1000, &mut back).unwrap();
    assert_eq!(back, data);
    // And the NIC reads it back over the same path.
    let mut read = vec![0u8; data.len()];
    f.dma_read(nic, DmaAddr(bar.bus.get() + 0x1000), &mut read)
        .unwrap();
    assert_eq!(read, data);
}

#[test]
fn acs_request_redirect_on_the_ingress_port_forces_the_root_complex() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    assert!(
        f.set_acs_ctrl(b("0000:02:01.0"), regs::ACS_SV | regs::ACS_RR)
            .unwrap()
    );
    let bar = f.bar(gpu, 2).unwrap();
    let t = f
        .dma_write(nic, DmaAddr(bar.bus.get()), b"redirected")
        .unwrap();
    let hops = &t.segments[0].hops;
    assert_eq!(
        hops[0],
        Hop::Up {
            bridge: b("0000:02:01.0")
        }
    );
    assert_eq!(
        hops[1],
        Hop::AcsRedirect {
            port: b("0000:02:01.0")
        }
    );
    assert!(
        hops.contains(&Hop::Up {
            bridge: b("0000:01:00.0")
        }),
        "{hops:?}"
    );
    assert!(hops.contains(&Hop::RootComplex {
        host_bridge: "hb0".into()
    }));
    assert!(hops.contains(&Hop::RootBus {
        host_bridge: "hb0".into()
    }));
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: gpu,
            bar: 2,
            offset: 0
        }
    );
    let mut back = [0u8; 10];
    f.bar_peek(gpu, 2, 0, &mut back).unwrap();
    assert_eq!(&back, b"redirected");
}

#[test]
fn egress_control_also_sends_peer_requests_up() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    f.set_acs_ctrl(b("0000:02:01.0"), regs::ACS_EC).unwrap();
    let t = f
        .dma_write(nic, DmaAddr(f.bar(gpu, 0).unwrap().bus.get()), b"x")
        .unwrap();
    assert!(t.via_root_complex());
    // Completion Redirect alone does not move requests.
    f.set_acs_ctrl(b("0000:02:01.0"), regs::ACS_CR).unwrap();
    let t = f
        .dma_write(nic, DmaAddr(f.bar(gpu, 0).unwrap().bus.get()), b"x")
        .unwrap();
    assert!(!t.via_root_complex());
}

#[test]
fn redirected_request_is_refused_by_a_root_complex_that_does_not_forward() {
    let f = example_edited("gpu-nic-switch.toml", "bus = 0\n", "bus = 0\np2p = false\n");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    f.set_acs_ctrl(b("0000:02:01.0"), regs::ACS_RR).unwrap();
    let err = f
        .dma_write(nic, DmaAddr(f.bar(gpu, 0).unwrap().bus.get()), b"nope")
        .unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::P2pNotForwarded {
            from: "hb0".into(),
            to: "hb0".into()
        }
    );
    assert_eq!(err.completed, 0);
    let mut back = [0u8; 4];
    f.bar_peek(gpu, 0, 0, &mut back).unwrap();
    assert_eq!(back, [0; 4], "nothing landed");
    assert_eq!(f.faults().last(), Some(&err));
    // Without redirect the switch still routes it locally: the root complex is not involved.
    f.set_acs_ctrl(b("0000:02:01.0"), 0).unwrap();
    f.dma_write(nic, DmaAddr(f.bar(gpu, 0).unwrap().bus.get()), b"fine")
        .unwrap();
}

#[test]
fn address_inside_a_switch_window_that_nobody_claims_is_an_unsupported_request() {
    let f = example("gpu-nic-switch.toml");
    let nic = dev(&f, "nic0");
    let port = b("0000:02:00.0");
    let mem = f.bridge_windows(port).unwrap().unwrap().mem.unwrap();
    // Narrow the GPU port's window to its first half: the upper half is still inside the
    // switch's upstream window, but no port below claims it.
    let half_last = mem.start + mem.len / 2 - 1;
    f.config_write(
        port,
        regs::MEMORY_LIMIT,
        2,
        ((half_last >> 16) as u32) & 0xfff0,
    )
    .unwrap();
    let gap = mem.start + mem.len / 2;
    assert!(
        f.bridge_windows(b("0000:01:00.0"))
            .unwrap()
            .unwrap()
            .mem
            .unwrap()
            .contains(gap)
    );
    let err = f.dma_write(nic, DmaAddr(gap), b"lost").unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::UnsupportedRequest {
            at: Location::Bridge(b("0000:01:00.0")),
            cause: UrCause::NoClaimant
        }
    );
}

#[test]
fn address_outside_every_window_and_ram_dies_in_the_root_complex() {
    let f = example("gpu-nic-switch.toml");
    let nic = dev(&f, "nic0");
    let err = f
        .dma_write(nic, DmaAddr(0x7000_0000_0000), b"x")
        .unwrap_err();
    assert!(matches!(
        err.reason,
        FaultReason::UnsupportedRequest { at: Location::RootComplex(ref h), cause: UrCause::NoRamOrWindow(_) } if h == "hb0"
    ));
    assert!(err.hops.contains(&Hop::RootComplex {
        host_bridge: "hb0".into()
    }));
}

#[test]
fn ram_round_trip() {
    let f = example("gpu-nic-switch.toml");
    let nic = dev(&f, "nic0");
    let data = pattern(3 * 4096 + 17, 3);
    let t = f.dma_write(nic, DmaAddr(0x1_0000_0ff0), &data).unwrap();
    assert_eq!(t.segments.len(), 1);
    assert_eq!(
        t.segments[0].target,
        Target::Ram {
            addr: PhysAddr(0x1_0000_0ff0)
        }
    );
    assert!(t.via_root_complex());
    let mut back = vec![0u8; data.len()];
    f.dma_read(nic, DmaAddr(0x1_0000_0ff0), &mut back).unwrap();
    assert_eq!(back, data);
    let mut peek = vec![0u8; data.len()];
    f.ram_peek(PhysAddr(0x1_0000_0ff0), &mut peek).unwrap();
    assert_eq!(peek, data);
}

#[test]
fn bus_offset_host_bridge_routes_bus_and_cpu_addresses_differently() {
    let f = example("arm-offset.toml");
    let (acc, nic) = (dev(&f, "acc0"), dev(&f, "nic0"));
    let bar = f.bar(acc, 0).unwrap();
    assert_eq!(bar.bus.get(), 0x4000_0000);
    assert_eq!(bar.cpu, Some(PhysAddr(0x10_0000_0000)));
    // Peer to peer with the bus address: lands, through the switch.
    let t = f
        .dma_write(nic, DmaAddr(bar.bus.get()), b"bus addr")
        .unwrap();
    assert!(!t.via_root_complex());
    // The CPU address is not a bus address: it climbs to the root complex, which does not
    // forward peer-to-peer on this platform.
    let err = f
        .dma_write(nic, DmaAddr(bar.cpu.unwrap().get()), b"cpu addr")
        .unwrap_err();
    assert!(
        matches!(err.reason, FaultReason::P2pNotForwarded { .. }),
        "{err}"
    );
    // The CPU reaches the BAR at its CPU address and sees what the NIC wrote.
    let mut back = [0u8; 8];
    f.cpu_read(bar.cpu.unwrap(), &mut back).unwrap();
    assert_eq!(&back, b"bus addr");
    // A bus address that the host bridge does not claim is RAM to the root complex: a DMA
    // aimed at "0x8000_0000 on the bus" lands in RAM, not in any BAR.
    let t = f.dma_write(nic, DmaAddr(0x8000_0000), b"ram").unwrap();
    assert_eq!(
        t.segments[0].target,
        Target::Ram {
            addr: PhysAddr(0x8000_0000)
        }
    );
}

#[test]
fn memory_decode_off_is_an_unsupported_request_naming_the_device() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let addr = DmaAddr(f.bar(gpu, 0).unwrap().bus.get());
    f.set_command_bits(gpu, regs::COMMAND_MEMORY, false)
        .unwrap();
    let err = f.dma_write(nic, addr, b"off").unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::UnsupportedRequest {
            at: Location::Bridge(b("0000:02:00.0")),
            cause: UrCause::MemoryDisabled(gpu)
        }
    );
    let mut back = [0u8; 3];
    f.bar_peek(gpu, 0, 0, &mut back).unwrap();
    assert_eq!(back, [0; 3]);
    f.set_command_bits(gpu, regs::COMMAND_MEMORY, true).unwrap();
    f.dma_write(nic, addr, b"on!").unwrap();
    f.bar_peek(gpu, 0, 0, &mut back).unwrap();
    assert_eq!(&back, b"on!");
}

#[test]
fn bridge_with_memory_forwarding_off_refuses() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    f.set_command_bits(b("0000:02:00.0"), regs::COMMAND_MEMORY, false)
        .unwrap();
    let err = f
        .dma_write(nic, DmaAddr(f.bar(gpu, 0).unwrap().bus.get()), b"x")
        .unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::UnsupportedRequest {
            at: Location::Bridge(b("0000:01:00.0")),
            cause: UrCause::ForwardingDisabled(b("0000:02:00.0"))
        }
    );
}

#[test]
fn d3hot_target_is_an_unsupported_request_and_d0_brings_it_back() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let addr = DmaAddr(f.bar(gpu, 2).unwrap().bus.get());
    f.set_power_state(gpu, PowerState::D3Hot).unwrap();
    assert_eq!(f.power_state(gpu).unwrap(), PowerState::D3Hot);
    let err = f.dma_write(nic, addr, b"zz").unwrap_err();
    assert!(matches!(
        err.reason,
        FaultReason::UnsupportedRequest { cause: UrCause::PowerState(d, PowerState::D3Hot), .. } if d == gpu
    ));
    // A device in D3hot cannot master the bus either.
    let err = f.dma_write(gpu, DmaAddr(0x1000), b"zz").unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::RequesterPowerState(PowerState::D3Hot)
    );
    f.set_power_state(gpu, PowerState::D0).unwrap();
    f.dma_write(nic, addr, b"ok").unwrap();
}

#[test]
fn no_bus_master_no_dma() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let addr = DmaAddr(f.bar(gpu, 0).unwrap().bus.get());
    f.set_command_bits(nic, regs::COMMAND_MASTER, false)
        .unwrap();
    let err = f.dma_write(nic, addr, b"x").unwrap_err();
    assert_eq!(err.reason, FaultReason::BusMasterDisabled(nic));
    assert!(err.hops.is_empty());
    f.set_command_bits(nic, regs::COMMAND_MASTER, true).unwrap();
    // A bridge without Bus Master Enable does not forward upstream.
    f.set_command_bits(b("0000:00:01.0"), regs::COMMAND_MASTER, false)
        .unwrap();
    let err = f.dma_write(nic, DmaAddr(0x1000), b"x").unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::BusMasterDisabled(b("0000:00:01.0"))
    );
    // ...but peer traffic below it does not need it.
    f.dma_write(nic, addr, b"x").unwrap();
}

#[test]
fn a_64_gib_bar_touched_at_both_ends_costs_two_pages() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let bar = f.bar(gpu, 2).unwrap();
    assert_eq!(bar.bar.size, 64 << 30);
    f.dma_write(nic, DmaAddr(bar.bus.get()), b"head").unwrap();
    f.dma_write(nic, DmaAddr(bar.bus.get() + (64 << 30) - 4), b"tail")
        .unwrap();
    assert_eq!(f.bar_resident_pages(gpu, 2).unwrap(), 2);
    let mut t = [0u8; 4];
    f.bar_peek(gpu, 2, (64 << 30) - 4, &mut t).unwrap();
    assert_eq!(&t, b"tail");
}

#[test]
fn a_write_running_off_a_bar_lands_up_to_the_edge_then_faults() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let bar = f.bar(gpu, 0).unwrap();
    let end = bar.bus.get() + bar.bar.size;
    let data = pattern(8192, 9);
    let err = f.dma_write(nic, DmaAddr(end - 4096), &data).unwrap_err();
    assert_eq!(err.completed, 4096);
    assert_eq!(err.fault_addr(), end);
    let mut back = vec![0u8; 4096];
    f.bar_peek(gpu, 0, bar.bar.size - 4096, &mut back).unwrap();
    assert_eq!(back, data[..4096]);
}

#[test]
fn a_write_across_two_adjacent_bars_is_split_where_decoding_changes() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let b2 = f.bar(gpu, 2).unwrap();
    let b4 = f.bar(gpu, 4).unwrap();
    assert_eq!(
        b2.bus.get() + b2.bar.size,
        b4.bus.get(),
        "the enumerator packs them"
    );
    let data = pattern(100, 1);
    let t = f.dma_write(nic, DmaAddr(b4.bus.get() - 60), &data).unwrap();
    assert_eq!(t.segments.len(), 2);
    assert_eq!(t.segments[0].len, 60);
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: gpu,
            bar: 2,
            offset: b2.bar.size - 60
        }
    );
    assert_eq!(
        t.segments[1].target,
        Target::Bar {
            bdf: gpu,
            bar: 4,
            offset: 0
        }
    );
    let mut x = [0u8; 40];
    f.bar_peek(gpu, 4, 0, &mut x).unwrap();
    assert_eq!(&x[..], &data[60..]);
}

#[test]
fn peer_to_peer_across_host_bridges_follows_both_bridges() {
    let f = example("two-host-bridges.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let bar = f.bar(gpu, 5).unwrap();
    let t = f
        .dma_write(nic, DmaAddr(bar.cpu.unwrap().get()), b"zen")
        .unwrap();
    let hops = &t.segments[0].hops;
    assert!(hops.contains(&Hop::RootComplex {
        host_bridge: "hb1".into()
    }));
    assert!(hops.contains(&Hop::RootBus {
        host_bridge: "hb0".into()
    }));
    let mut back = [0u8; 3];
    f.bar_peek(gpu, 5, 0, &mut back).unwrap();
    assert_eq!(&back, b"zen");

    let g = example_edited(
        "two-host-bridges.toml",
        "vendor = \"amd\", family = 0x19",
        "vendor = \"intel\", family = 6",
    );
    let err = g
        .dma_write(dev(&g, "nic0"), DmaAddr(bar.cpu.unwrap().get()), b"no")
        .unwrap_err();
    assert_eq!(
        err.reason,
        FaultReason::P2pNotForwarded {
            from: "hb1".into(),
            to: "hb0".into()
        }
    );
    // A root complex that forwards only between its own root ports refuses across bridges.
    let h = example_edited(
        "two-host-bridges.toml",
        "bus = 0x40\n",
        "bus = 0x40\np2p = \"same_host_bridge\"\n",
    );
    let err = h
        .dma_write(dev(&h, "nic0"), DmaAddr(bar.cpu.unwrap().get()), b"no")
        .unwrap_err();
    assert!(matches!(err.reason, FaultReason::P2pNotForwarded { .. }));
}

#[test]
fn vfs_decode_their_share_of_the_pf_area_and_vanish_when_disabled() {
    let f = example("sriov-nic.toml");
    let (pf0, pf1, vf0, vf1) = (
        dev(&f, "nic-pf0"),
        dev(&f, "nic-pf1"),
        dev(&f, "vf0"),
        dev(&f, "vf1"),
    );
    assert_eq!(f.physfn(vf0).unwrap(), Some(pf0));
    let v0 = f.bar(vf0, 0).unwrap();
    let v1 = f.bar(vf1, 0).unwrap();
    assert_eq!(
        v1.bus.get() - v0.bus.get(),
        128 << 10,
        "VF n's BAR is n strides into the area"
    );
    // pf1 and vf0 share bus 01: a peer claim on the same bus.
    let t = f
        .dma_write(pf1, DmaAddr(v0.bus.get() + 8), b"to vf0")
        .unwrap();
    assert_eq!(t.segments[0].hops, vec![Hop::Peer { to: vf0 }]);
    let mut back = [0u8; 6];
    f.bar_peek(vf0, 0, 8, &mut back).unwrap();
    assert_eq!(&back, b"to vf0");
    // vf1 has ACS RR: its request to vf0 goes round through the root complex.
    let t = f.dma_write(vf1, DmaAddr(v0.bus.get()), b"via rc").unwrap();
    assert_eq!(t.segments[0].hops[0], Hop::AcsRedirect { port: vf1 });
    assert!(t.via_root_complex());
    // VF MSE off: the VF BARs stop decoding.
    let s = f.function(pf0).unwrap().caps().sriov.unwrap();
    f.config_write(pf0, s + regs::SRIOV_CTRL, 2, regs::SRIOV_CTRL_VFE.into())
        .unwrap();
    let err = f.dma_write(pf1, DmaAddr(v0.bus.get()), b"x").unwrap_err();
    assert!(
        matches!(err.reason, FaultReason::UnsupportedRequest { cause: UrCause::MemoryDisabled(d), .. } if d == vf0),
        "{err}"
    );
    // VF Enable off: the VFs are gone.
    f.config_write(pf0, s + regs::SRIOV_CTRL, 2, 0).unwrap();
    assert!(!f.is_present(vf0).unwrap());
    assert!(f.config_read(vf0, 0, 4).is_err());
    let err = f.dma_write(vf0, DmaAddr(0x1000), b"x").unwrap_err();
    assert_eq!(err.reason, FaultReason::RequesterNotPresent);
    let err = f.dma_write(pf1, DmaAddr(v0.bus.get()), b"x").unwrap_err();
    assert!(
        matches!(err.reason, FaultReason::UnsupportedRequest { cause: UrCause::VfDisabled(d), .. } if d == vf0),
        "{err}"
    );
}

#[test]
fn cpu_reaches_ram_and_mmio() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    let bar = f.bar(gpu, 4).unwrap();
    let t = f.cpu_write(bar.cpu.unwrap(), b"mmio store").unwrap();
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: gpu,
            bar: 4,
            offset: 0
        }
    );
    let mut back = [0u8; 10];
    f.bar_peek(gpu, 4, 0, &mut back).unwrap();
    assert_eq!(&back, b"mmio store");
    f.cpu_write(PhysAddr(0x2000), b"ram").unwrap();
    let mut r = [0u8; 3];
    f.cpu_read(PhysAddr(0x2000), &mut r).unwrap();
    assert_eq!(&r, b"ram");
    // MMIO to a device with memory decoding off fails for the CPU too.
    f.set_command_bits(gpu, regs::COMMAND_MEMORY, false)
        .unwrap();
    assert!(f.cpu_read(bar.cpu.unwrap(), &mut back).is_err());
}

struct Offset {
    by: u64,
    refuse: u64,
}

impl AddressTranslator for Offset {
    fn translate(
        &self,
        requester: Bdf,
        addr: DmaAddr,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        if addr.get() >= self.refuse {
            return Err(TranslationFault {
                requester,
                addr,
                access,
                reason: "no mapping".into(),
            });
        }
        Ok(Translation {
            phys: PhysAddr(addr.get() + self.by),
            contiguous: self.refuse - addr.get(),
        })
    }
}

#[test]
fn the_root_complex_asks_the_translator() {
    let f = example("gpu-nic-switch.toml");
    let nic = dev(&f, "nic0");
    f.set_translator(Arc::new(Offset {
        by: 0x1_0000_0000,
        refuse: 0x10_0000,
    }));
    let t = f.dma_write(nic, DmaAddr(0x1000), b"iova").unwrap();
    assert!(t.segments[0].hops.contains(&Hop::Translated {
        from: DmaAddr(0x1000),
        to: PhysAddr(0x1_0000_1000)
    }));
    let mut back = [0u8; 4];
    f.ram_peek(PhysAddr(0x1_0000_1000), &mut back).unwrap();
    assert_eq!(&back, b"iova");
    // The translation's extent splits a transfer that runs past it, and the rest faults.
    let err = f
        .dma_write(nic, DmaAddr(0x10_0000 - 2), b"abcd")
        .unwrap_err();
    assert_eq!(err.completed, 2);
    assert!(matches!(err.reason, FaultReason::Translation(ref t) if t.reason == "no mapping"));
}

#[test]
fn overflowing_transfers_are_refused_whole() {
    let f = example("gpu-nic-switch.toml");
    let nic = dev(&f, "nic0");
    let err = f
        .dma_write(nic, DmaAddr(u64::MAX - 1), b"abcd")
        .unwrap_err();
    assert_eq!(err.reason, FaultReason::AddressOverflow);
    assert!(
        f.dma_write(nic, DmaAddr(u64::MAX), b"")
            .unwrap()
            .segments
            .is_empty()
    );
}

#[test]
fn reprogrammed_bar_is_decoded_where_the_registers_say() {
    let f = example("gpu-nic-switch.toml");
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let old = f.bar(gpu, 0).unwrap().bus.get();
    // Move BAR0 to the second 16 MiB of the port's window... which the window does not cover.
    f.config_write(gpu, regs::BASE_ADDRESS_0, 4, (old + (16 << 20)) as u32)
        .unwrap();
    assert_eq!(f.bar(gpu, 0).unwrap().bus.get(), old + (16 << 20));
    assert!(f.dma_write(nic, DmaAddr(old), b"x").is_err());
    assert!(f.dma_write(nic, DmaAddr(old + (16 << 20)), b"x").is_err());
    // Widen the port's and the switch's windows: now it routes.
    for br in ["0000:02:00.0", "0000:01:00.0", "0000:00:01.0"] {
        let limit = ((old + (32 << 20) - 1) >> 16) as u32 & 0xfff0;
        f.config_write(b(br), regs::MEMORY_LIMIT, 2, limit).unwrap();
    }
    f.dma_write(nic, DmaAddr(old + (16 << 20)), b"moved")
        .unwrap();
    let mut back = [0u8; 5];
    f.bar_peek(gpu, 0, 0, &mut back).unwrap();
    assert_eq!(&back, b"moved");
}

#[test]
fn dma_and_resets_race_without_tearing() {
    let f = Arc::new(example("gpu-nic-switch.toml"));
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let addr = DmaAddr(f.bar(gpu, 2).unwrap().bus.get());
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                f.set_command_bits(gpu, regs::COMMAND_MEMORY, n % 2 == 1)
                    .unwrap();
                n += 1;
            }
            f.set_command_bits(gpu, regs::COMMAND_MEMORY, true).unwrap();
        })
    };
    let data = pattern(4096, 5);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..2000 {
        match f.dma_write(nic, addr, &data) {
            Ok(t) => {
                assert_eq!(t.segments.len(), 1);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(
                    e.completed, 0,
                    "a single-BAR write lands whole or not at all"
                );
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    toggler.join().unwrap();
    assert_eq!(ok + refused, 2000);
    f.dma_write(nic, addr, &data).unwrap();
    assert!(f.faults().len() <= peerdma_pci::fabric::FAULT_LOG_CAPACITY);
}

#[test]
fn a_function_reaches_its_own_bar_by_loopback() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    let bar = f.bar(gpu, 2).unwrap();
    let t = f
        .dma_write(gpu, DmaAddr(bar.bus.get() + 64), b"self")
        .unwrap();
    assert_eq!(t.segments[0].hops, vec![Hop::Loopback]);
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: gpu,
            bar: 2,
            offset: 64
        }
    );
    // Even with ACS redirect on its port, a loopback never leaves the function.
    f.set_acs_ctrl(b("0000:02:00.0"), regs::ACS_RR).unwrap();
    assert!(
        !f.dma_write(gpu, DmaAddr(bar.bus.get()), b"self")
            .unwrap()
            .via_root_complex()
    );
}

const RC_AND_PCI_BRIDGE: &str = r#"
[platform]
cpu = { vendor = "intel", family = 6 }
ram = [ { cpu = 0, size = "1G" } ]

[[host_bridge]]
name = "hb0"
p2p = true
mmio = [ { cpu = 0x8000_0000, bus = 0x8000_0000, size = "1G" } ]

[[device]]
bdf = "0000:00:00.0"
kind = "host_bridge_function"
parent = "hb0"

[[device]]
bdf = "0000:00:04.0"
kind = "rciep"
parent = "hb0"
name = "dsa"
bars = [ { index = 0, size = "64K" } ]

[[device]]
bdf = "0000:00:05.0"
kind = "rciep"
parent = "hb0"
name = "qat"
bars = [ { index = 0, size = "64K" } ]

[[device]]
bdf = "0000:00:1c.0"
kind = "root_port"
parent = "hb0"

[[device]]
bdf = "0000:01:00.0"
kind = "pci_bridge"
parent = "0000:00:1c.0"

[[device]]
bdf = "0000:02:01.0"
kind = "endpoint"
parent = "0000:01:00.0"
name = "old0"
bars = [ { index = 0, size = "4K" } ]

[[device]]
bdf = "0000:02:02.0"
kind = "endpoint"
parent = "0000:01:00.0"
name = "old1"
bars = [ { index = 0, size = "4K" } ]
"#;

#[test]
fn rcieps_talk_through_the_root_complex() {
    let f = peerdma_pci::file::load_str(RC_AND_PCI_BRIDGE, "rc.toml").unwrap();
    let (dsa, qat, old0) = (dev(&f, "dsa"), dev(&f, "qat"), dev(&f, "old0"));
    assert_eq!(f.upstream_bridge(dsa).unwrap(), None);
    let t = f
        .dma_write(dsa, DmaAddr(f.bar(qat, 0).unwrap().bus.get()), b"rciep")
        .unwrap();
    assert_eq!(
        t.segments[0].hops,
        vec![
            Hop::RootComplex {
                host_bridge: "hb0".into()
            },
            Hop::RootBus {
                host_bridge: "hb0".into()
            }
        ]
    );
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: qat,
            bar: 0,
            offset: 0
        }
    );
    // An RCiEP reaches a device below a root port the same way, and RAM directly.
    let t = f
        .dma_write(dsa, DmaAddr(f.bar(old0, 0).unwrap().bus.get()), b"down")
        .unwrap();
    assert!(t.segments[0].hops.contains(&Hop::Down {
        bridge: b("0000:01:00.0")
    }));
    let t = f.dma_write(dsa, DmaAddr(0x1000), b"ram").unwrap();
    assert_eq!(
        t.segments[0].target,
        Target::Ram {
            addr: PhysAddr(0x1000)
        }
    );
}

#[test]
fn devices_behind_a_conventional_pci_bridge_share_one_bus() {
    let f = peerdma_pci::file::load_str(RC_AND_PCI_BRIDGE, "rc.toml").unwrap();
    let (old0, old1) = (dev(&f, "old0"), dev(&f, "old1"));
    assert_eq!(f.bridge_buses(b("0000:01:00.0")).unwrap(), Some((1, 2, 2)));
    let t = f
        .dma_write(
            old0,
            DmaAddr(f.bar(old1, 0).unwrap().bus.get()),
            b"same bus",
        )
        .unwrap();
    assert_eq!(t.segments[0].hops, vec![Hop::Peer { to: old1 }]);
    let mut back = [0u8; 8];
    f.bar_peek(old1, 0, 0, &mut back).unwrap();
    assert_eq!(&back, b"same bus");
}

#[test]
fn a_bridge_decodes_its_own_bars() {
    let text = RC_AND_PCI_BRIDGE.replace(
        "kind = \"pci_bridge\"\nparent = \"0000:00:1c.0\"\n",
        "kind = \"pci_bridge\"\nparent = \"0000:00:1c.0\"\nname = \"br\"\nbars = [ { index = 0, size = \"4K\" } ]\n",
    );
    let f = peerdma_pci::file::load_str(&text, "rc.toml").unwrap();
    let (br, old0, dsa) = (dev(&f, "br"), dev(&f, "old0"), dev(&f, "dsa"));
    let bar = f.bar(br, 0).unwrap();
    // From the CPU, from an RCiEP through the root complex, and from a device below it.
    f.cpu_write(bar.cpu.unwrap(), b"cpu").unwrap();
    let t = f.dma_write(dsa, DmaAddr(bar.bus.get() + 8), b"rc").unwrap();
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: br,
            bar: 0,
            offset: 8
        }
    );
    let t = f
        .dma_write(old0, DmaAddr(bar.bus.get() + 16), b"below")
        .unwrap();
    assert_eq!(
        t.segments[0].target,
        Target::Bar {
            bdf: br,
            bar: 0,
            offset: 16
        }
    );
    assert!(!t.via_root_complex());
    let mut back = [0u8; 21];
    f.bar_peek(br, 0, 0, &mut back).unwrap();
    assert_eq!(&back[..3], b"cpu");
    assert_eq!(&back[16..], b"below");
}
