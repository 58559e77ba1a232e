//! Interrupt setup through `VFIO_DEVICE_SET_IRQS` on the emulated machine: every eventfd the
//! device holds is given back when the user drops it, replaces it, or closes the device, and
//! no hostile header reaches a handler or panics.

use peerdma_pci::Errno;
use peerdma_uapi::backend::ScenarioBackend;
use peerdma_uapi::{DevHandle, OpenPath, UapiBackend};
use peerdma_vfio::emulated::{Emulated, Machine};
use peerdma_vfio::pci::KernelConfig;

fn machine() -> Machine {
    peerdma_vfio::testbed::qemu_machine(KernelConfig {
        pm: false,
        thp: false,
    })
    .unwrap()
}

fn open(be: &mut Emulated<'_>, role: &str) -> DevHandle {
    let bdf = be.role(role).unwrap();
    be.open_device(bdf, OpenPath::CdevIommufd).unwrap()
}

/// `struct vfio_irq_set` with its data.
fn set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    let argsz = u32::try_from(20 + data.len()).unwrap();
    for w in [argsz, flags, index, start, count] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.extend_from_slice(data);
    b
}

const EVENTFD_TRIGGER: u32 = 4 | 32;
const NONE_TRIGGER: u32 = 1 | 32;

fn fds(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

#[test]
fn every_eventfd_a_device_holds_is_given_back() {
    let m = machine();
    let mut be = m.process();
    let n = open(&mut be, "pm_provider");
    let e = open(&mut be, "initiator");
    let evs: Vec<i32> = (0..4).map(|_| be.eventfd().unwrap()).collect();
    for &ev in &evs {
        assert_eq!(be.fd_refs(ev), Ok(1));
    }
    // ERR and REQ on the NVMe, MSI-X vectors 0..3 with the same eventfds, INTx on edu.
    be.set_irqs(n, &set(EVENTFD_TRIGGER, 3, 0, 1, &fds(&evs[..1])))
        .unwrap();
    be.set_irqs(n, &set(EVENTFD_TRIGGER, 4, 0, 1, &fds(&evs[1..2])))
        .unwrap();
    be.set_irqs(n, &set(EVENTFD_TRIGGER, 2, 0, 3, &fds(&evs[..3])))
        .unwrap();
    be.set_irqs(e, &set(EVENTFD_TRIGGER, 0, 0, 1, &fds(&evs[3..])))
        .unwrap();
    assert_eq!(be.fd_refs(evs[0]), Ok(3));
    assert_eq!(be.fd_refs(evs[3]), Ok(2));
    // Replacing a vector's eventfd puts the old one; a failing block puts what it set.
    be.set_irqs(n, &set(EVENTFD_TRIGGER, 2, 0, 1, &fds(&evs[3..])))
        .unwrap();
    assert_eq!(be.fd_refs(evs[0]), Ok(2));
    assert_eq!(
        be.set_irqs(n, &set(EVENTFD_TRIGGER, 2, 5, 2, &fds(&[evs[2], 99_999]))),
        Err(Errno::EBADF)
    );
    assert_eq!(
        be.fd_refs(evs[2]),
        Ok(2),
        "vector 5 was undone, vector 2 kept"
    );
    // Disabling INTx gives its eventfd back; closing the NVMe gives back the rest.
    be.set_irqs(e, &set(NONE_TRIGGER, 0, 0, 0, &[])).unwrap();
    assert_eq!(be.fd_refs(evs[3]), Ok(2), "still MSI-X vector 0's");
    be.close_device(n).unwrap();
    for &ev in &evs {
        assert_eq!(be.fd_refs(ev), Ok(1), "fd {ev}");
    }
}

#[test]
fn hostile_headers_are_refused_before_any_handler() {
    let m = machine();
    let mut be = m.process();
    let n = open(&mut be, "pm_provider");
    let ev = be.eventfd().unwrap();
    for (flags, index, start, count) in [
        (NONE_TRIGGER, 2, u32::MAX, 1),
        (NONE_TRIGGER, 2, 1, u32::MAX),
        (NONE_TRIGGER, 2, 65, 0),
        (NONE_TRIGGER, 2, 0, 66),
        (NONE_TRIGGER, u32::MAX, 0, 1),
        (EVENTFD_TRIGGER, 2, 0, 1000),
        (u32::MAX, 2, 0, 1),
        (1 | 2 | 32, 3, 0, 1),
    ] {
        assert_eq!(
            be.set_irqs(n, &set(flags, index, start, count, &fds(&[ev]))),
            Err(Errno::EINVAL),
            "{flags:#x} {index} {start} {count}"
        );
    }
    // A header claiming more data than the buffer holds, or a short buffer: EFAULT, never a
    // read past the end.
    let mut b = set(EVENTFD_TRIGGER, 2, 0, 8, &fds(&[ev]));
    b[0..4].copy_from_slice(&1000u32.to_le_bytes());
    assert_eq!(be.set_irqs(n, &b), Err(Errno::EFAULT));
    assert_eq!(be.set_irqs(n, &[0u8; 7]), Err(Errno::EFAULT));
    let mut info = [0u8; 3];
    assert_eq!(be.irq_info(n, &mut info), Err(Errno::EFAULT));
    assert_eq!(be.fd_refs(ev), Ok(1));
}
