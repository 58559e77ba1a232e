//! CPU access to device regions through the device fd: region info, `pread`/`pwrite` of a
//! BAR and of config space, `mmap` and the page fault's verdict, and what every revoke does
//! to them — each checked by the bytes in the BAR.
#![allow(clippy::many_single_char_names)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use peerdma_pci::{Bdf, Errno, examples, file};
use peerdma_uapi::backend::{CpuFault, MapHandle, REGION_OFFSET_SHIFT, ScenarioBackend, region};
use peerdma_uapi::{DevHandle, OpenPath, UapiBackend};
use peerdma_vfio::emulated::{Emulated, Machine};
use peerdma_vfio::pci::KernelConfig;

fn machine(pm: bool) -> Machine {
    peerdma_vfio::testbed::qemu_machine(KernelConfig { pm, thp: false }).unwrap()
}

fn open(be: &mut Emulated<'_>, role: &str) -> (DevHandle, Bdf) {
    let bdf = be.role(role).unwrap();
    (be.open_device(bdf, OpenPath::CdevIommufd).unwrap(), bdf)
}

fn memory(be: &mut Emulated<'_>, d: DevHandle, on: bool) {
    let mut c = [0u8; 2];
    be.config_read(d, 4, &mut c).unwrap();
    let v = u16::from_le_bytes(c);
    let v = if on { v | 2 } else { v & !2 };
    be.config_write(d, 4, &v.to_le_bytes()).unwrap();
}

fn peek(m: &Machine, bdf: Bdf, bar: u8, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    m.fabric().bar_peek(bdf, bar, off, &mut b).unwrap();
    b
}

#[test]
fn every_size_and_offset_of_a_bar_access_reads_back_what_was_written_and_nothing_while_memory_is_off()
 {
    let m = machine(false);
    let mut be = m.process();
    let (p, bdf) = open(&mut be, "provider");
    for off in 0..16u64 {
        for len in 1..=17usize {
            let at = 0x8_0000 + off * 64;
            let data: Vec<u8> = (0..len).map(|i| (off as u8) << 4 | i as u8 | 1).collect();
            assert_eq!(be.region_write(p, 2, at, &data), Ok(len));
            assert_eq!(
                peek(&m, bdf, 2, at, len),
                data,
                "the store landed in the BAR"
            );
            let mut got = vec![0u8; len];
            assert_eq!(be.region_read(p, 2, at, &mut got), Ok(len));
            assert_eq!(got, data);
            memory(&mut be, p, false);
            let before = peek(&m, bdf, 2, at, len);
            assert_eq!(be.region_write(p, 2, at, &vec![0xee; len]), Err(Errno::EIO));
            assert_eq!(be.region_read(p, 2, at, &mut got), Err(Errno::EIO));
            assert_eq!(
                peek(&m, bdf, 2, at, len),
                before,
                "nothing written while off"
            );
            memory(&mut be, p, true);
        }
    }
}

#[test]
fn a_bar_access_is_clipped_at_the_end_and_refused_past_it() {
    let m = machine(false);
    let mut be = m.process();
    let (p, _) = open(&mut be, "provider");
    let mut b = [0u8; 8];
    assert_eq!(be.region_read(p, 2, (1 << 20) - 3, &mut b), Ok(3));
    assert_eq!(be.region_read(p, 2, 1 << 20, &mut b), Err(Errno::EINVAL));
    assert_eq!(
        be.region_read(p, 2, u64::MAX >> 30, &mut b),
        Err(Errno::EINVAL)
    );
    // Unused BAR, ROM, VGA, past the regions; a ROM write.
    for idx in [1, region::ROM, region::VGA, 9, 1000] {
        assert_eq!(
            be.region_read(p, idx, 0, &mut b),
            Err(Errno::EINVAL),
            "{idx}"
        );
    }
    assert_eq!(be.region_write(p, region::ROM, 0, &[0]), Err(Errno::EINVAL));
    // Zero length: 0 wherever it points.
    assert_eq!(be.region_read(p, 1000, 0, &mut []), Ok(0));
    // Past what a file offset holds.
    assert_eq!(be.region_read(p, u32::MAX, 0, &mut b), Err(Errno::EINVAL));
    // Config space through the region: EFAULT past its 256 bytes.
    assert_eq!(
        be.region_read(p, region::CONFIG, 0xfe, &mut b[..4]),
        Err(Errno::EFAULT)
    );
    assert_eq!(be.region_read(p, region::CONFIG, 0, &mut b[..2]), Ok(2));
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x1af4);
}

#[test]
fn region_info_follows_the_resources_and_the_mmap_probe() {
    let m = machine(false);
    let mut be = m.process();
    let (p, _) = open(&mut be, "provider");
    let (n, _) = open(&mut be, "pm_provider");
    let i = be.region_info(p, 0).unwrap();
    assert_eq!((i.size, i.flags, i.offset), (256, 7, 0));
    let i = be.region_info(p, 2).unwrap();
    assert_eq!(
        (i.size, i.flags, i.offset),
        (1 << 20, 7, 2 << REGION_OFFSET_SHIFT)
    );
    assert_eq!(be.region_info(p, 1).unwrap().flags, 0);
    assert_eq!(be.region_info(p, region::CONFIG).unwrap().size, 256);
    assert_eq!(be.region_info(p, region::VGA), Err(Errno::EINVAL));
    // The MSI-X table's BAR says it may be mapped anyway.
    let i = be.region_info(n, 0).unwrap();
    assert_eq!(
        (i.size, i.flags, i.caps.as_slice()),
        (16 << 10, 15, &[3u16][..])
    );
    assert_eq!(be.region_info(n, region::CONFIG).unwrap().size, 4096);
}

#[test]
fn the_msix_table_reads_all_ones_and_drops_writes() {
    let m = machine(false);
    let mut be = m.process();
    let (n, bdf) = open(&mut be, "pm_provider");
    // Table at 0x2000, 65 entries of 16 bytes: up to 0x2410. Just before it is the NVMe
    // model's page past the doorbells: writes go nowhere and it reads 0.
    let mut b = [0u8; 32];
    assert_eq!(be.region_write(n, 0, 0x1ff0, &[0x11; 32]), Ok(32));
    assert_eq!(peek(&m, bdf, 0, 0x1ff0, 32), [0; 32]);
    assert_eq!(be.region_read(n, 0, 0x1ff0, &mut b), Ok(32));
    assert_eq!(b, *[[0; 16], [0xff; 16]].concat());
    // Past the table nothing of BAR 0 decodes until the PBA at 0x3000, which is read-only:
    // writes there go nowhere either.
    be.region_write(n, 0, 0x2400, &[0x22; 32]).unwrap();
    assert_eq!(peek(&m, bdf, 0, 0x2400, 32), [0; 32]);
    be.region_write(n, 0, 0x3000, &[0x33; 16]).unwrap();
    assert_eq!(be.region_read(n, 0, 0x3000, &mut b[..16]), Ok(16));
    assert_eq!(b[..16], [0; 16]);
}

fn cpu_read(be: &mut Emulated<'_>, map: MapHandle, off: u64) -> Result<u32, CpuFault> {
    let mut b = [0u8; 4];
    be.cpu_access(map, off, &mut b, false)
        .map(|()| u32::from_le_bytes(b))
}

#[test]
fn a_cpu_mapping_faults_after_every_revoke_and_works_when_the_kernel_allows_it_again() {
    for pm in [false, true] {
        let m = machine(pm);
        let mut be = m.process();
        let (n, bdf) = open(&mut be, "pm_provider");
        let map = be.region_mmap(n, 2, 0, 1 << 20, true).unwrap();
        be.cpu_access(map, 0x40, &mut 0xfeed_f00du32.to_le_bytes(), true)
            .unwrap();
        assert_eq!(peek(&m, bdf, 2, 0x40, 4), 0xfeed_f00du32.to_le_bytes());
        assert_eq!(cpu_read(&mut be, map, 0x40), Ok(0xfeed_f00d));
        // Memory off.
        memory(&mut be, n, false);
        assert_eq!(cpu_read(&mut be, map, 0x40), Err(CpuFault::Sigbus));
        assert_eq!(
            be.cpu_access(map, 0x40, &mut [0; 4], true),
            Err(CpuFault::Sigbus)
        );
        assert_eq!(peek(&m, bdf, 2, 0x40, 4), 0xfeed_f00du32.to_le_bytes());
        memory(&mut be, n, true);
        assert_eq!(cpu_read(&mut be, map, 0x40), Ok(0xfeed_f00d));
        // D3hot through PMCSR (PM capability at 0x60).
        be.config_write(n, 0x64, &[3, 0]).unwrap();
        assert_eq!(cpu_read(&mut be, map, 0x40), Err(CpuFault::Sigbus));
        let mut b = [0u8; 4];
        assert_eq!(be.region_read(n, 2, 0x40, &mut b), Err(Errno::EIO));
        be.config_write(n, 0x64, &[0, 0]).unwrap();
        assert!(cpu_read(&mut be, map, 0x40).is_ok());
        // Low power: the mapping faults, a read through the fd still works.
        let mut f = peerdma_uapi::feature::header_bytes(
            8,
            peerdma_uapi::feature::VFIO_DEVICE_FEATURE_SET | 3,
        );
        be.device_feature(n, &mut f).unwrap();
        assert_eq!(
            cpu_read(&mut be, map, 0x40),
            Err(CpuFault::Sigbus),
            "pm {pm}"
        );
        assert_eq!(be.region_read(n, 2, 0x40, &mut b), Ok(4), "pm {pm}");
        let mut f = peerdma_uapi::feature::header_bytes(
            8,
            peerdma_uapi::feature::VFIO_DEVICE_FEATURE_SET | 5,
        );
        be.device_feature(n, &mut f).unwrap();
        assert!(cpu_read(&mut be, map, 0x40).is_ok());
        // A reset with memory off stays faulting.
        memory(&mut be, n, false);
        be.reset(n).unwrap();
        assert_eq!(cpu_read(&mut be, map, 0x40), Err(CpuFault::Sigbus));
        memory(&mut be, n, true);
        assert!(cpu_read(&mut be, map, 0x40).is_ok());
    }
}

#[test]
fn mmap_refuses_what_the_kernel_refuses() {
    let m = machine(false);
    let mut be = m.process();
    let (p, _) = open(&mut be, "provider");
    let e = Err(Errno::EINVAL);
    assert_eq!(be.region_mmap(p, 2, 0, 4096, false), e);
    for idx in [1, region::ROM, region::CONFIG, region::VGA, 9] {
        assert_eq!(be.region_mmap(p, idx, 0, 4096, true), e, "{idx}");
    }
    assert_eq!(be.region_mmap(p, 2, 0xff000, 0x2000, true), e);
    assert_eq!(be.region_mmap(p, 2, 0x10, 4096, true), e);
    assert_eq!(be.region_mmap(p, 2, 0, 0, true), e);
    // A length the mm refuses before vfio-pci sees it: ENOMEM (page-aligns to 0, or longer
    // than the address space), as the real kernel answered.
    assert_eq!(be.region_mmap(p, 2, 0, u64::MAX, true), Err(Errno::ENOMEM));
    assert_eq!(be.region_mmap(p, 2, 0, 1 << 48, true), Err(Errno::ENOMEM));
    assert_eq!(be.region_mmap(p, 0, 0, 0x2000, true), e);
    let map = be.region_mmap(p, 0, 0, 4096, true).unwrap();
    // Accesses outside the mapping, unaligned, or of odd sizes are the caller's fault.
    let efault = Err(CpuFault::Errno(Errno::EFAULT));
    assert_eq!(be.cpu_access(map, 4096, &mut [0; 4], false), efault);
    assert_eq!(be.cpu_access(map, 2, &mut [0; 4], false), efault);
    assert_eq!(be.cpu_access(map, 0, &mut [0; 3], false), efault);
    assert_eq!(be.cpu_access(map, u64::MAX, &mut [0; 1], false), efault);
    assert_eq!(be.cpu_unmap(map), Ok(()));
    assert_eq!(be.cpu_unmap(map), Err(Errno::EINVAL));
}

#[test]
fn a_mapping_holds_the_device_open_past_its_close_and_the_unmap_revokes() {
    let m = machine(false);
    let mut be = m.process();
    let (p, bdf) = open(&mut be, "provider");
    let mut req = peerdma_uapi::DmaBufRequest::new(2, vec![(0, 1 << 20)]).to_bytes();
    let fd = be.device_feature(p, &mut req).unwrap();
    let map = be.region_mmap(p, 2, 0, 4096, true).unwrap();
    assert_eq!(be.close_device(p), Ok(()));
    // The fd is gone for the user; the device is not.
    assert_eq!(be.region_info(p, 2), Err(Errno::EBADF));
    assert_eq!(be.close_device(p), Err(Errno::EBADF));
    assert_eq!(m.vfio(bdf).unwrap().open_count(), 1);
    let a = be.ioas_alloc().unwrap();
    let (e, _) = open(&mut be, "initiator");
    be.attach_ioas(e, a).unwrap();
    assert_eq!(
        be.ioas_map_file(a, fd, 0, 1 << 20, 1 << 24, 7),
        Ok(1 << 24),
        "the buffer is still live"
    );
    assert!(cpu_read(&mut be, map, 0).is_ok());
    be.cpu_unmap(map).unwrap();
    assert_eq!(
        m.vfio(bdf).unwrap().open_count(),
        0,
        "the unmap was the close"
    );
    be.ioas_unmap(a, 1 << 24, 1 << 20).unwrap();
    assert_eq!(
        be.ioas_map_file(a, fd, 0, 1 << 20, 1 << 24, 7),
        Err(Errno::ENODEV),
        "revoked for good"
    );
}

#[test]
fn no_cpu_store_lands_while_memory_is_off_whatever_the_interleaving() {
    // Two opens of one device the group way: one toggles memory decoding, the other stores
    // through a mapping as fast as it can. While memory is off the BAR must not change.
    let m = machine(false);
    let bdf = m.fabric().lookup("provider").unwrap();
    let v = m.vfio(bdf).unwrap();
    let toggler = v.open().unwrap();
    let writer = v.open().unwrap();
    writer
        .mmap_check(2 << REGION_OFFSET_SHIFT, 4096, true)
        .unwrap();
    let stop = AtomicBool::new(false);
    let mut landed_while_off = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(1);
                let _ = writer.cpu_access(2, 0x100, &mut i.to_le_bytes(), true);
            }
        });
        for _ in 0..3000 {
            let cmd = toggler.config_read(4, 2).unwrap() as u16;
            toggler.config_write(4, &(cmd & !2).to_le_bytes()).unwrap();
            let before = peek(&m, bdf, 2, 0x100, 4);
            for _ in 0..20 {
                std::hint::spin_loop();
            }
            let mut r = [0u8; 4];
            assert_eq!(
                writer.cpu_access(2, 0x100, &mut r, false),
                Err(CpuFault::Sigbus)
            );
            if peek(&m, bdf, 2, 0x100, 4) != before {
                landed_while_off += 1;
            }
            toggler.config_write(4, &(cmd | 2).to_le_bytes()).unwrap();
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(landed_while_off, 0);
}

#[test]
fn an_io_bar_sized_with_all_ones_reads_its_size_mask_and_the_io_flag() {
    // `vfio_bar_fixup`: the value AND the size mask, OR the flags — an 8-byte I/O BAR keeps
    // bit 2, so all ones read 0xfffffff9.
    let text = examples::QEMU_Q35.replace(
        "bars = [ { index = 0, size = 256, addr = 0xfe20_0000 },",
        "bars = [ { index = 0, size = 8, type = \"io\", addr = 0xc000 },",
    );
    let no_pm = KernelConfig {
        pm: false,
        thp: false,
    };
    let m = peerdma_vfio::testbed::machine_from(&text, no_pm).unwrap();
    let mut be = m.process();
    let (p, _) = open(&mut be, "provider");
    be.config_write(p, 0x10, &u32::MAX.to_le_bytes()).unwrap();
    let mut b = [0u8; 4];
    be.config_read(p, 0x10, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xffff_fff9);
    // An I/O BAR is never mappable, and its region reads go through without a memory check.
    assert_eq!(be.region_info(p, 0).unwrap().flags, 3);
    memory(&mut be, p, false);
    assert_eq!(be.region_read(p, 0, 0, &mut b), Ok(4));
}

#[test]
fn an_sriov_pf_takes_a_vf_token_by_set_only_and_other_functions_know_no_such_feature() {
    use peerdma_uapi::feature::{
        VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET, header_bytes,
    };
    let f = file::load_str(examples::SRIOV_NIC, "s").unwrap();
    let m = Machine::new(Arc::new(f)).unwrap();
    let mut be = m.process();
    let pf = m.fabric().lookup("nic-pf0").unwrap();
    let vf = m.fabric().lookup("vf0").unwrap();
    let p = be.open_device(pf, OpenPath::CdevIommufd).unwrap();
    let v = be.open_device(vf, OpenPath::CdevIommufd).unwrap();
    let token = |flags: u32, data: &[u8]| {
        let mut b = header_bytes(u32::try_from(8 + data.len()).unwrap(), flags);
        b.extend_from_slice(data);
        b
    };
    let uuid: Vec<u8> = (1..=16).collect();
    let set = VFIO_DEVICE_FEATURE_SET;
    // A VF has no token: ENOTTY whatever is asked.
    assert_eq!(
        be.device_feature(v, &mut token(set, &uuid)),
        Err(Errno::ENOTTY)
    );
    // The PF: PROBE of SET is 0, GET is refused, a short payload is EINVAL.
    assert_eq!(
        be.device_feature(p, &mut token(set | VFIO_DEVICE_FEATURE_PROBE, &[])),
        Ok(0)
    );
    assert_eq!(
        be.device_feature(p, &mut token(VFIO_DEVICE_FEATURE_GET, &uuid)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        be.device_feature(p, &mut token(set, &uuid[..8])),
        Err(Errno::EINVAL)
    );
    assert_eq!(m.vfio(pf).unwrap().vf_token(), Some([0; 16]));
    assert_eq!(be.device_feature(p, &mut token(set, &uuid)), Ok(0));
    assert_eq!(m.vfio(pf).unwrap().vf_token().unwrap().to_vec(), uuid);
    assert_eq!(m.vfio(vf).unwrap().vf_token(), None);
}
