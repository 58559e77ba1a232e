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
    assert_eq!(be.hot_reset(d, None), Ok(()));
    // Opened the group/container way, the device cannot prove ownership without group fds.
    let mut other = m.process();
    let g = other
        .open_device(b("0000:03:00.0"), OpenPath::GroupContainer)
        .unwrap();
    assert_eq!(other.hot_reset(g, None), Err(Errno::EINVAL));
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

#[test]
fn a_named_group_fd_is_the_group_file_and_holds_it_open() {
    let f = file::load_str(examples::QEMU_Q35, "q").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let (ivs, nvme, sib) = (b("0000:03:00.0"), b("0000:05:00.0"), b("0000:05:00.1"));
    let mut a = m.process();
    let d = a.open_device(nvme, OpenPath::GroupContainer).unwrap();
    // The process holds the group file: a second descriptor of it, as often as asked.
    let g1 = a.group_fd(nvme).unwrap();
    let g2 = a.group_fd(sib).unwrap();
    assert_ne!(g1, g2);
    // A group file is no dma-buf, has no read, seek or mmap.
    assert_eq!(a.dmabuf_info(g1), Err(Errno::EINVAL));
    assert_eq!(a.read_fd(g1, &mut [0; 8]), Err(Errno::EINVAL));
    assert_eq!(a.dmabuf_seek(g1, 0, 0), Err(Errno::ESPIPE));
    assert_eq!(a.dmabuf_mmap(g1, 0, 4096), Err(Errno::ENODEV));
    // Another process cannot open it while it is held.
    let mut b2 = m.process();
    assert_eq!(b2.group_fd(sib), Err(Errno::EBUSY));
    // The device closes; the named fds still hold the file: the group stays busy.
    a.close_device(d).unwrap();
    assert_eq!(
        b2.open_device(sib, OpenPath::CdevIommufd),
        Err(Errno::EBUSY)
    );
    assert_eq!(
        a.open_device(nvme, OpenPath::GroupContainer),
        Err(Errno::EBUSY),
        "the group file is open (by the named fds), so the container cannot open it"
    );
    a.close_fd(g1).unwrap();
    assert_eq!(b2.group_fd(nvme), Err(Errno::EBUSY));
    a.close_fd(g2).unwrap();
    // Free now: another process opens the group's char device itself.
    let h = b2.group_fd(nvme).unwrap();
    assert_eq!(a.group_fd(nvme), Err(Errno::EBUSY));
    // And that one blocks binding a cdev of the group until its process ends.
    assert_eq!(a.open_device(sib, OpenPath::CdevIommufd), Err(Errno::EBUSY));
    let _ = h;
    drop(b2);
    let c = a.open_device(sib, OpenPath::CdevIommufd).unwrap();
    // A bound cdev of the group: its group file cannot be opened.
    assert_eq!(a.group_fd(nvme), Err(Errno::EBUSY));
    // Other groups are free.
    a.group_fd(ivs).unwrap();
    a.close_device(c).unwrap();
    a.group_fd(nvme).unwrap();
}

#[test]
fn hot_reset_with_group_fds_follows_the_kernels_check_order() {
    let f = file::load_str(examples::QEMU_Q35, "q").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let (ivs, nvme, sib) = (b("0000:03:00.0"), b("0000:05:00.0"), b("0000:05:00.1"));
    let mut a = m.process();
    let d = a.open_device(nvme, OpenPath::GroupContainer).unwrap();
    let g = a.group_fd(nvme).unwrap();
    let ev = a.eventfd().unwrap();
    let closed = a.eventfd().unwrap();
    a.close_fd(closed).unwrap();
    // A group-opened device must give group fds.
    assert_eq!(a.hot_reset(d, None), Err(Errno::EINVAL));
    assert_eq!(a.hot_reset(d, Some(&[])), Err(Errno::EINVAL));
    // More fds than devices on the bus (2) is refused before any fd is looked at.
    assert_eq!(
        a.hot_reset(d, Some(&[closed, closed, closed])),
        Err(Errno::EINVAL)
    );
    // Then the fds in order: a closed one is EBADF, a file that is no group EINVAL.
    assert_eq!(a.hot_reset(d, Some(&[closed, ev])), Err(Errno::EBADF));
    assert_eq!(a.hot_reset(d, Some(&[ev, closed])), Err(Errno::EINVAL));
    assert_eq!(a.hot_reset(d, Some(&[g, closed])), Err(Errno::EBADF));
    // A group that holds none of the bus's devices proves nothing.
    let other = a.group_fd(ivs).unwrap();
    assert_eq!(a.hot_reset(d, Some(&[other])), Err(Errno::EINVAL));
    // The group of both functions: the reset goes through, with a foreign group beside it.
    assert_eq!(a.hot_reset(d, Some(&[g])), Ok(()));
    assert_eq!(a.hot_reset(d, Some(&[other, g])), Ok(()));
    // A cdev-opened device must not give any.
    a.close_device(d).unwrap();
    a.close_fd(g).unwrap();
    let c = a.open_device(sib, OpenPath::CdevIommufd).unwrap();
    assert_eq!(a.hot_reset(c, Some(&[other])), Err(Errno::EINVAL));
    assert_eq!(a.hot_reset(c, None), Ok(()));
    let _ = nvme;
}

#[test]
fn a_hot_reset_that_reaches_a_bridge_is_refused_and_its_info_lists_the_bridges() {
    // `vfio_pci_dev_set_resettable`: every device on and below the bus must be vfio-pci's.
    // A second function beside the switch's upstream port, below the root port: resetting
    // its bus reaches the switch's ports, which the PCIe port driver holds, so the reset is
    // EINVAL even with every endpoint below open in this process; GET_PCI_HOT_RESET_INFO
    // lists the ports too (`pci_walk_bus`).
    let text = format!(
        "{}\n[[device]]\nbdf = \"0000:01:00.1\"\nkind = \"endpoint\"\nparent = \"0000:00:01.0\"\nname = \"beside\"\nbars = [ {{ index = 0, size = \"4K\" }} ]\n",
        examples::QEMU_Q35
    );
    let f = file::load_str(&text, "q").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let mut be = m.process();
    let beside = be.role("beside").unwrap();
    let d = be.open_device(beside, OpenPath::CdevIommufd).unwrap();
    let mut opened = Vec::new();
    for ep in ["provider", "initiator", "pm_provider", "sibling"] {
        let bdf = be.role(ep).unwrap();
        opened.push(be.open_device(bdf, OpenPath::CdevIommufd).unwrap());
    }
    let info = be.hot_reset_info(d, 32).unwrap();
    let listed: Vec<Bdf> = info.devices.iter().map(|x| x.0).collect();
    for port in [
        "0000:01:00.0",
        "0000:02:00.0",
        "0000:02:01.0",
        "0000:02:02.0",
    ] {
        assert!(listed.contains(&b(port)), "{port} listed: {listed:?}");
    }
    assert_eq!(listed.len(), 9, "four ports and five endpoints: {listed:?}");
    assert_eq!(be.hot_reset(d, None), Err(Errno::EINVAL));
    // Below one of the switch's downstream ports there is no bridge: that reset goes through.
    assert_eq!(be.hot_reset(opened[2], None), Ok(()));
}

/// Every secondary bus reset the fabric reports, as (function, bridge), in order.
#[derive(Default)]
struct BusResets(std::sync::Mutex<Vec<(Bdf, Bdf)>>);

impl peerdma_pci::FabricObserver for BusResets {
    fn event(&self, e: &peerdma_pci::FabricEvent) {
        if let peerdma_pci::FabricEvent::Reset {
            bdf,
            cause: peerdma_pci::ResetCause::SecondaryBus { bridge },
        } = e
        {
            self.0.lock().unwrap().push((*bdf, *bridge));
        }
    }
}

impl BusResets {
    fn take(&self) -> Vec<(Bdf, Bdf)> {
        let mut v = std::mem::take(&mut *self.0.lock().unwrap());
        v.sort();
        v
    }
}

#[test]
fn a_function_that_cannot_reset_itself_is_reset_with_its_bus_once_the_whole_set_is_closed() {
    // `vfio_pci_core_disable` → `vfio_pci_dev_set_try_reset`: the edu beside the NVMe
    // controller has no FLR, no PM and a sibling on its bus, so its last close cannot reset
    // it (`needs_reset` stays set). The bus below 02:02.0 is reset for it at the first
    // close that leaves none of the set open — both functions, with their state saved and
    // written back.
    let f = file::load_str(examples::QEMU_Q35, "q").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let resets = Arc::new(BusResets::default());
    m.fabric().subscribe(resets.clone());
    let (nvme, sib, port) = (b("0000:05:00.0"), b("0000:05:00.1"), b("0000:02:02.0"));
    assert_eq!(
        m.dev_set(sib).iter().map(|v| v.bdf()).collect::<Vec<_>>(),
        [nvme, sib]
    );
    let mut be = m.process();
    // Closed while the NVMe controller is open: nothing, and the debt stays.
    let n = be.open_device(nvme, OpenPath::CdevIommufd).unwrap();
    let s = be.open_device(sib, OpenPath::CdevIommufd).unwrap();
    let bar0 = m.fabric().config_read(sib, 0x10, 4).unwrap();
    be.close_device(s).unwrap();
    assert_eq!(resets.take(), []);
    assert!(m.vfio(sib).unwrap().needs_reset());
    // The NVMe controller resets itself at its close (FLR), then the set is closed and one
    // of it needs a reset: the bus goes.
    be.close_device(n).unwrap();
    assert_eq!(resets.take(), [(nvme, port), (sib, port)]);
    assert!(!m.vfio(sib).unwrap().needs_reset());
    assert!(!m.vfio(nvme).unwrap().needs_reset());
    assert_eq!(
        m.fabric().config_read(sib, 0x10, 4).unwrap(),
        bar0,
        "the state was written back"
    );
    // Alone, the edu's close resets the bus at once.
    let s = be.open_device(sib, OpenPath::CdevIommufd).unwrap();
    be.close_device(s).unwrap();
    assert_eq!(resets.take(), [(nvme, port), (sib, port)]);
    // The NVMe controller alone resets itself: nobody owes anything, no bus reset.
    let n = be.open_device(nvme, OpenPath::CdevIommufd).unwrap();
    be.close_device(n).unwrap();
    assert_eq!(resets.take(), []);
}

#[test]
fn a_bus_with_a_function_outside_vfio_is_never_reset_for_the_set() {
    // `vfio_pci_dev_set_resettable`: every function the bus reset reaches must be in the
    // set. The ivshmem's port has the ivshmem alone: it resets itself by the bus (its own
    // reset method), and a VF or a root-bus device is a set of its own.
    let f = file::load_str(examples::SRIOV_NIC, "s").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let vf = m.fabric().lookup("vf0").unwrap();
    assert_eq!(
        m.dev_set(vf).iter().map(|v| v.bdf()).collect::<Vec<_>>(),
        [vf]
    );
}
