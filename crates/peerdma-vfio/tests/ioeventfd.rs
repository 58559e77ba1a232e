//! `VFIO_DEVICE_IOEVENTFD` and eventfd writes on the emulated machine, where a test can
//! build what a scenario should not: a device that interrupts into the eventfd driving it.

use peerdma_pci::{Errno, regs};
use peerdma_uapi::backend::ScenarioBackend;
use peerdma_uapi::{OpenPath, UapiBackend};
use peerdma_vfio::pci::KernelConfig;

fn ioeventfd_req(offset: u64, size: u32, data: u64, fd: i32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&32u32.to_le_bytes());
    b[4..8].copy_from_slice(&size.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&data.to_le_bytes());
    b[24..28].copy_from_slice(&fd.to_le_bytes());
    b
}

#[test]
fn eventfd_writes_follow_eventfd_write() {
    let m = peerdma_vfio::testbed::qemu_machine(KernelConfig::default()).unwrap();
    let mut be = m.process();
    let ev = be.eventfd().unwrap();
    assert_eq!(
        be.write_fd(ev, &[1, 0, 0, 0, 0, 0, 0]),
        Err(Errno::EINVAL),
        "7 bytes"
    );
    assert_eq!(be.write_fd(ev, &u64::MAX.to_le_bytes()), Err(Errno::EINVAL));
    assert_eq!(be.write_fd(ev, &(u64::MAX - 1).to_le_bytes()), Ok(8));
    assert_eq!(
        be.write_fd(ev, &1u64.to_le_bytes()),
        Err(Errno::EAGAIN),
        "the counter would pass 2^64 - 2"
    );
    let mut b = [0u8; 8];
    assert_eq!(be.read_fd(ev, &mut b), Ok(8));
    assert_eq!(u64::from_le_bytes(b), u64::MAX - 1);
    assert_eq!(
        be.write_fd(ev, &0u64.to_le_bytes()),
        Ok(8),
        "0 is a write too"
    );
    assert_eq!(be.read_fd(ev, &mut b), Err(Errno::EAGAIN));
}

#[test]
fn an_ioeventfd_that_interrupts_into_its_own_eventfd_stops() {
    // edu's raise register driven by an ioeventfd whose eventfd is also edu's MSI vector:
    // each raise would signal the eventfd again. The nested signal is dropped (the kernel
    // drops a signal made inside an eventfd wakeup), so one write makes one raise.
    let m = peerdma_vfio::testbed::qemu_machine(KernelConfig::default()).unwrap();
    let mut be = m.process();
    let edu = be.role("initiator").unwrap();
    let d = be.open_device(edu, OpenPath::CdevIommufd).unwrap();
    let cmd = regs::COMMAND_MEMORY | regs::COMMAND_MASTER;
    be.config_write(d, u64::from(regs::COMMAND), &cmd.to_le_bytes())
        .unwrap();
    let ev = be.eventfd().unwrap();
    let mut set = vec![0u8; 24];
    set[0..4].copy_from_slice(&24u32.to_le_bytes());
    set[4..8].copy_from_slice(&((1u32 << 2) | (1 << 5)).to_le_bytes());
    set[8..12].copy_from_slice(&1u32.to_le_bytes());
    set[16..20].copy_from_slice(&1u32.to_le_bytes());
    set[20..24].copy_from_slice(&ev.to_le_bytes());
    be.set_irqs(d, &set).unwrap();
    be.ioeventfd(d, &ioeventfd_req(0x60, 4, 1, ev)).unwrap();
    assert_eq!(be.write_fd(ev, &1u64.to_le_bytes()), Ok(8));
    let mut st = [0u8; 4];
    be.region_read(d, 0, 0x24, &mut st).unwrap();
    assert_eq!(u32::from_le_bytes(st), 1, "raised");
    let mut b = [0u8; 8];
    assert_eq!(
        be.read_fd(ev, &mut b),
        Err(Errno::EAGAIN),
        "the MSI inside the wakeup was dropped, the write's count consumed"
    );
    // Started by the device instead (a raise from a region write): its MSI signals the
    // eventfd, whose wakeup raises again, and so on. The storm is served a bounded number
    // of rounds per access instead of hanging the caller.
    be.region_write(d, 0, 0x64, &1u32.to_le_bytes()).unwrap();
    be.region_write(d, 0, 0x60, &1u32.to_le_bytes()).unwrap();
    be.region_read(d, 0, 0x24, &mut st).unwrap();
    assert_eq!(u32::from_le_bytes(st), 1);
    // The registration stays usable: a later write raises again (after a lower).
    be.region_write(d, 0, 0x64, &1u32.to_le_bytes()).unwrap();
    assert_eq!(be.write_fd(ev, &1u64.to_le_bytes()), Ok(8));
    be.region_read(d, 0, 0x24, &mut st).unwrap();
    assert_eq!(u32::from_le_bytes(st), 1);
}

#[test]
fn an_ioeventfd_fires_from_whichever_thread_signals_it() {
    // Registered by this thread, signalled by another (as an interrupt handler would): the
    // write lands all the same.
    let m = peerdma_vfio::testbed::qemu_machine(KernelConfig::default()).unwrap();
    let mut be = m.process();
    let edu = be.role("initiator").unwrap();
    let d = be.open_device(edu, OpenPath::CdevIommufd).unwrap();
    let ev = be.eventfd().unwrap();
    be.ioeventfd(d, &ioeventfd_req(4, 4, 0x0f0f_0f0f, ev))
        .unwrap();
    let f = be.fget(ev).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| f.eventfd_signal(1));
    });
    f.put();
    let mut v = [0u8; 4];
    be.region_read(d, 0, 4, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0xf0f0_f0f0);
}
