//! IOMMU groups by Linux's PCI rules, and hot-reset ownership by group.
#![allow(clippy::many_single_char_names)]

use std::sync::Arc;

use peerdma_pci::{Bdf, Errno, examples, file};
use peerdma_uapi::backend::ScenarioBackend;
use peerdma_uapi::{OpenPath, UapiBackend};
use peerdma_vfio::emulated::Machine;
use peerdma_vfio::pci::iommu_group;

fn b(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn groups_follow_acs_and_multifunction_as_on_the_qemu_guest() {
    // What the guest's sysfs shows (tests/fixtures/qemu-guest in peerdma-linux): each device
    // shares a group with its ACS-less downstream port; the NVMe controller and its sibling
    // function are one group.
    let f = file::load_str(examples::QEMU_Q35, "q").unwrap();
    let g = |s: &str| iommu_group(&f, b(s));
    assert_eq!(g("0000:03:00.0"), b("0000:02:00.0"));
    assert_eq!(g("0000:04:00.0"), b("0000:02:01.0"));
    assert_eq!(g("0000:05:00.0"), g("0000:05:00.1"));
    assert_ne!(g("0000:03:00.0"), g("0000:04:00.0"));
    // The root port has ACS: the switch below it is a group of its own.
    assert_eq!(g("0000:01:00.0"), b("0000:01:00.0"));
}

#[test]
fn acs_on_every_port_isolates_each_device() {
    let f = file::load_str(examples::TWO_ROOT_PORTS_ACS, "t").unwrap();
    let eps: Vec<Bdf> = f
        .functions()
        .filter(|x| x.kind() == peerdma_pci::DeviceKind::Endpoint)
        .map(peerdma_pci::Function::bdf)
        .collect();
    assert!(eps.len() >= 2);
    for &e in &eps {
        assert_eq!(iommu_group(&f, e), e);
    }
}

#[test]
fn a_hot_reset_is_owned_through_the_group() {
    let f = file::load_str(examples::QEMU_Q35, "q").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let mut be = m.process();
    let nvme = be.role("pm_provider").unwrap();
    let sib = be.role("sibling").unwrap();
    assert_eq!(sib, b("0000:05:00.1"));
    let d = be.open_device(nvme, OpenPath::CdevIommufd).unwrap();
    // The sibling is not open, but its group is: the reset goes through.
    assert_eq!(be.hot_reset(d), Ok(()));
    // Opened the group/container way, the device cannot prove ownership without group fds.
    let mut other = m.process();
    let g = other
        .open_device(b("0000:03:00.0"), OpenPath::GroupContainer)
        .unwrap();
    assert_eq!(other.hot_reset(g), Err(Errno::EINVAL));
}

#[test]
fn a_group_is_used_through_its_file_or_through_bound_cdevs_never_both() {
    let f = file::load_str(examples::QEMU_Q35, "q").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let (ivs, nvme, sib) = (b("0000:03:00.0"), b("0000:05:00.0"), b("0000:05:00.1"));
    let mut a = m.process();
    let g = a.open_device(nvme, OpenPath::GroupContainer).unwrap();
    // The same process reaches the group's other device through the open group file.
    let g2 = a.open_device(sib, OpenPath::GroupContainer).unwrap();
    // Another process cannot open the group file, nor bind a cdev of the group.
    let mut b2 = m.process();
    assert_eq!(
        b2.open_device(sib, OpenPath::GroupContainer),
        Err(Errno::EBUSY)
    );
    assert_eq!(
        b2.open_device(nvme, OpenPath::CdevIommufd),
        Err(Errno::EBUSY)
    );
    let u = b2.open_device(nvme, OpenPath::CdevUnbound).unwrap();
    assert_eq!(b2.bind_device(u), Err(Errno::EBUSY));
    // Other groups are free.
    b2.open_device(ivs, OpenPath::CdevIommufd).unwrap();
    // The group file goes with the last group-opened device.
    a.close_device(g).unwrap();
    assert_eq!(b2.bind_device(u), Err(Errno::EBUSY));
    a.close_device(g2).unwrap();
    assert_eq!(b2.bind_device(u), Ok(()));
    assert_eq!(b2.bind_device(u), Err(Errno::EINVAL));
    // Now the bound cdev blocks the group file, until it closes (or its process ends).
    assert_eq!(
        a.open_device(sib, OpenPath::GroupContainer),
        Err(Errno::EBUSY)
    );
    drop(b2);
    a.open_device(sib, OpenPath::GroupContainer).unwrap();
}
