//! iommufd's `IOMMU_IOAS_MAP_FILE` and `IOMMU_IOAS_UNMAP` in Linux 7.2's check order
//! (drivers/iommu/iommufd/ioas.c, io_pagetable.c, pages.c): which errno wins when several
//! checks fail, `EOVERFLOW` for ranges that wrap, read-only windows, and the unmap that
//! stops at the first area only partly inside its range — after unmapping those before it.

use peerdma_dmabuf::Process;
use peerdma_pci::{DmaAddr, Errno, regs};
use peerdma_uapi::backend::{MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE};
use peerdma_uapi::feature::DmaBufRequest;
use peerdma_vfio::iommufd::Iommufd;
use peerdma_vfio::testbed::{Testbed, testbed};
use peerdma_vfio::{DeviceFd, VfioPci};

const RW: u32 = MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE;
const IOVA: u64 = 0x100_0000;
const K64: u64 = 0x1_0000;

/// gpu0 open with a 128 KiB buffer of BAR 2 exported (fd `fd`), nic1 attached to IOAS `ioas`.
struct Rig {
    t: Testbed,
    proc: Process,
    fd: i32,
    ifd: Iommufd,
    ioas: u32,
    dev: DeviceFd,
    vfio: VfioPci,
}

fn rig() -> Rig {
    let r = bare();
    r.ifd.attach(r.t.nic1, r.ioas).unwrap();
    r
}

/// [`rig`] without the attach: an IOAS no device is attached to.
fn bare() -> Rig {
    let t = testbed().unwrap();
    let vfio = VfioPci::bind(&t.env, t.gpu).unwrap();
    let dev = vfio.open().unwrap();
    let proc = Process::new();
    let req = DmaBufRequest::new(2, vec![(0, 2 * K64)]);
    let fd = dev.feature(&proc, &req.to_bytes()).unwrap();
    let ifd = Iommufd::open(&t.env).unwrap();
    let ioas = ifd.ioas_alloc().unwrap();
    Rig {
        t,
        proc,
        fd,
        ifd,
        ioas,
        dev,
        vfio,
    }
}

impl Rig {
    fn map(&self, start: u64, length: u64, iova: u64, flags: u32) -> Result<u64, Errno> {
        self.ifd
            .map_file_ioctl(&self.proc, self.ioas, self.fd, start, length, iova, flags)
    }
    fn map_with(
        &self,
        ioas: u32,
        fd: i32,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Errno {
        self.ifd
            .map_file_ioctl(&self.proc, ioas, fd, start, length, iova, flags)
            .unwrap_err()
    }
    /// Whether a DMA write of nic1 at `iova` lands in the buffer at `off`.
    fn lands(&self, iova: u64, off: u64) -> bool {
        let pattern = *b"iommufd!landed!!";
        let _ = self
            .t
            .fabric
            .dma_write(self.t.nic1, DmaAddr(iova), &pattern);
        let mut got = [0; 16];
        self.t
            .fabric
            .bar_peek(self.t.gpu, 2, off, &mut got)
            .unwrap();
        let hit = got == pattern;
        self.t
            .fabric
            .bar_poke(self.t.gpu, 2, off, &[0; 16])
            .unwrap();
        hit
    }
}

#[test]
fn map_file_errnos_in_the_kernels_order() {
    let r = rig();
    let (io, fd, bad_io, bad_fd) = (r.ioas, r.fd, 999, 999);
    // Unknown flag first, before everything else.
    assert_eq!(
        r.map_with(bad_io, bad_fd, 0, 0, u64::MAX, 8 | RW),
        Errno::EOPNOTSUPP
    );
    // A length or IOVA of u64::MAX before the permission flags and the IOAS.
    assert_eq!(
        r.map_with(bad_io, bad_fd, 0, u64::MAX, IOVA, MAP_FIXED_IOVA),
        Errno::EOVERFLOW
    );
    assert_eq!(
        r.map_with(bad_io, bad_fd, 0, K64, u64::MAX, MAP_FIXED_IOVA),
        Errno::EOVERFLOW
    );
    // Neither readable nor writeable, before the IOAS.
    assert_eq!(
        r.map_with(bad_io, bad_fd, 0, K64, IOVA, MAP_FIXED_IOVA),
        Errno::EINVAL
    );
    // No such IOAS, before the length and the fd.
    assert_eq!(r.map_with(bad_io, bad_fd, 0, 0, IOVA, RW), Errno::ENOENT);
    // Length 0, then a window that wraps, both before the fd.
    assert_eq!(r.map_with(io, bad_fd, 0, 0, IOVA, RW), Errno::EINVAL);
    assert_eq!(
        r.map_with(io, bad_fd, u64::MAX - 0xfff, 0x2000, IOVA, RW),
        Errno::EOVERFLOW
    );
    // Then the fd.
    assert_eq!(r.map_with(io, bad_fd, 0, K64, IOVA, RW), Errno::EBADF);
    assert_eq!(
        r.map_with(io, 1, 0, K64, IOVA, RW),
        Errno::EINVAL,
        "stdout is no dma-buf"
    );
    // A window past the buffer's end before the buffer's revocation...
    r.dev.config_write(regs::COMMAND, &[0, 0]).unwrap();
    assert_eq!(r.map_with(io, fd, K64, 2 * K64, IOVA, RW), Errno::EINVAL);
    // ...and the revocation before the alignment of length and IOVA.
    assert_eq!(r.map_with(io, fd, 0, 0x1800, IOVA, RW), Errno::ENODEV);
    assert_eq!(r.map_with(io, fd, 0, K64, IOVA + 0x800, RW), Errno::ENODEV);
    let on = regs::COMMAND_MEMORY.to_le_bytes();
    r.dev.config_write(regs::COMMAND, &on).unwrap();
    // An IOVA range that wraps is found after the dma-buf is attached (EOVERFLOW).
    assert_eq!(
        r.map_with(io, fd, 0, 0x2000, u64::MAX - 0xfff, RW),
        Errno::EOVERFLOW
    );
    // An area in the way: EEXIST wins over a start that is not page aligned, but an
    // unaligned length is found first.
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert_eq!(r.map_with(io, fd, 0x800, 0x1000, IOVA, RW), Errno::EEXIST);
    assert_eq!(r.map_with(io, fd, 0, 0x1800, IOVA, RW), Errno::EINVAL);
    assert_eq!(
        r.map_with(io, fd, 0x800, 0x1000, IOVA + K64, RW),
        Errno::EINVAL
    );
    // Failed maps leave nothing attached: only the one area holds the buffer.
    let f = r.proc.fget(fd).unwrap();
    assert_eq!(f.dmabuf().unwrap().attachments().len(), 1);
    f.put();
    assert_eq!(r.vfio.violation_count(), 0);
}

#[test]
fn a_read_only_window_faults_writes() {
    let r = rig();
    assert_eq!(r.map(0, K64, IOVA, MAP_FIXED_IOVA | MAP_READABLE), Ok(IOVA));
    assert!(
        !r.lands(IOVA, 0),
        "a DMA write through a read-only area faults"
    );
    let mut b = [0u8; 8];
    r.t.fabric.bar_poke(r.t.gpu, 2, 0, b"readable").unwrap();
    r.t.fabric
        .dma_read(r.t.nic1, DmaAddr(IOVA), &mut b)
        .unwrap();
    assert_eq!(&b, b"readable");
    assert_eq!(r.ifd.unmap(r.ioas, IOVA, K64), Ok(K64));
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert!(r.lands(IOVA, 0));
}

#[test]
fn unmap_errnos_in_the_kernels_order() {
    let r = rig();
    assert_eq!(
        r.ifd.unmap(999, u64::MAX, 0),
        Err(Errno::ENOENT),
        "IOAS first"
    );
    assert_eq!(r.ifd.unmap(r.ioas, u64::MAX, 0), Err(Errno::EOVERFLOW));
    assert_eq!(r.ifd.unmap(r.ioas, 0x1000, u64::MAX), Err(Errno::EOVERFLOW));
    assert_eq!(r.ifd.unmap(r.ioas, 0x1000, 0), Err(Errno::EINVAL));
    assert_eq!(
        r.ifd.unmap(r.ioas, u64::MAX - 0xfff, 0x2000),
        Err(Errno::EOVERFLOW)
    );
    assert_eq!(
        r.ifd.unmap(r.ioas, IOVA, K64),
        Err(Errno::ENOENT),
        "nothing there"
    );
    // Everything at once: nothing mapped is success, with 0 bytes.
    assert_eq!(r.ifd.unmap(r.ioas, 0, u64::MAX), Ok(0));
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert_eq!(r.map(K64, K64, IOVA + 0x10_0000, RW), Ok(IOVA + 0x10_0000));
    assert_eq!(r.ifd.unmap(r.ioas, 0, u64::MAX), Ok(2 * K64));
    assert!(!r.lands(IOVA, 0) && !r.lands(IOVA + 0x10_0000, K64));
}

#[test]
fn an_unmap_stops_at_a_partial_area_after_unmapping_those_before_it() {
    let r = rig();
    // A at IOVA (the buffer's first 64K), B right after it (the second 64K).
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert_eq!(r.map(K64, K64, IOVA + K64, RW), Ok(IOVA + K64));
    // A range starting inside A: the first area met is partial, nothing goes.
    assert_eq!(
        r.ifd.unmap(r.ioas, IOVA + 0x1000, 2 * K64),
        Err(Errno::ENOENT)
    );
    assert!(r.lands(IOVA, 0) && r.lands(IOVA + K64, K64));
    // A whole, B in part: ENOENT, and A is gone already.
    assert_eq!(r.ifd.unmap(r.ioas, IOVA, K64 + 0x1000), Err(Errno::ENOENT));
    assert!(
        !r.lands(IOVA, 0),
        "A was unmapped before the walk stopped at B"
    );
    assert!(r.lands(IOVA + K64, K64), "B is untouched");
    assert_eq!(r.ifd.is_dead(r.ioas, IOVA), None, "A's IOVA is free again");
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert!(r.lands(IOVA, 0));
    assert_eq!(r.ifd.unmap(r.ioas, IOVA, 2 * K64), Ok(2 * K64));
    assert_eq!(r.vfio.live_mappings(), 0);
    let iommu = r.t.env.dma.iommu().unwrap();
    if let peerdma_dma::iommu::Attach::Paging(d) = iommu.attachment(r.t.nic1) {
        assert_eq!(iommu.entries(d), 0);
    }
    assert_eq!(r.vfio.violation_count(), 0);
}

/// Linux's IOAS alignment is one byte until a device's domain is attached, then the page
/// size: before, a window at any byte is accepted; an attach while such an area exists is
/// `EADDRINUSE`; after, the same window is `EINVAL`.
#[test]
fn the_ioas_alignment_is_a_byte_until_a_device_is_attached() {
    let r = bare();
    let (io, fd) = (r.ioas, r.fd);
    assert_eq!(r.map(0x800, 0x1800, IOVA + 0x800, RW), Ok(IOVA + 0x800));
    assert_eq!(r.ifd.attach(r.t.nic1, io), Err(Errno::EADDRINUSE));
    assert!(!r.lands(IOVA + 0x800, 0x800), "nic1 is not attached");
    assert_eq!(r.ifd.unmap(io, IOVA + 0x800, 0x1800), Ok(0x1800));
    // Aligned areas do not stand in the way.
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert_eq!(r.ifd.attach(r.t.nic1, io), Ok(()));
    assert!(
        r.lands(IOVA, 0),
        "mapped before the attach, reached after it"
    );
    assert_eq!(r.map_with(io, fd, 0, 0x1800, IOVA + K64, RW), Errno::EINVAL);
    assert_eq!(
        r.map_with(io, fd, 0, K64, IOVA + K64 + 0x800, RW),
        Errno::EINVAL
    );
    assert_eq!(
        r.map_with(io, fd, 0x800, 0x1000, IOVA + K64, RW),
        Errno::EINVAL
    );
    // A revoke kills the aligned area as usual.
    r.dev.config_write(regs::COMMAND, &[0, 0]).unwrap();
    assert!(!r.lands(IOVA, 0));
    assert_eq!(r.vfio.violation_count(), 0);
}

#[test]
fn an_ioas_a_device_leaves_goes_back_to_byte_alignment() {
    let r = rig();
    let other = r.ifd.ioas_alloc().unwrap();
    assert_eq!(
        r.map(0, 0x1800, IOVA, RW),
        Err(Errno::EINVAL),
        "nic1 is attached"
    );
    r.ifd.attach(r.t.nic1, other).unwrap();
    assert_eq!(r.map(0, 0x1800, IOVA, RW), Ok(IOVA), "nic1 moved away");
    assert_eq!(r.ifd.attach(r.t.nic1, r.ioas), Err(Errno::EADDRINUSE));
}

const MSI: u64 = 0xfee0_0000;
const PAST_APERTURE: u64 = 1 << 48;
const RO_RW: u32 = MAP_READABLE | MAP_WRITEABLE;

#[test]
fn attaching_over_an_area_in_the_msi_window_or_past_the_aperture_is_eaddrinuse() {
    for iova in [MSI, MSI + 0xf_0000, MSI - K64 + 0x1000, PAST_APERTURE] {
        let r = bare();
        // With no device, nothing is reserved: both map.
        assert_eq!(r.map(0, K64, iova, RW), Ok(iova), "{iova:#x}");
        assert_eq!(
            r.ifd.attach(r.t.nic1, r.ioas),
            Err(Errno::EADDRINUSE),
            "{iova:#x}"
        );
        // Nothing changed: the area is there, nothing is reserved, no device came.
        let rg = r.ifd.iova_ranges(r.ioas, 8, 0).unwrap();
        assert_eq!(rg.ranges, vec![(0, u64::MAX)]);
        assert_eq!(rg.alignment, 1);
        assert_eq!(r.ifd.unmap(r.ioas, iova, K64), Ok(K64));
        assert_eq!(r.ifd.attach(r.t.nic1, r.ioas), Ok(()));
    }
}

#[test]
fn a_map_into_a_reserved_region_of_an_attached_device_is_einval() {
    let r = rig();
    assert_eq!(r.map(0, K64, MSI, RW), Err(Errno::EINVAL));
    assert_eq!(
        r.map(0, K64, MSI - 0x1000, RW),
        Err(Errno::EINVAL),
        "reaches into it"
    );
    assert_eq!(
        r.map(0, K64, 0xfef0_0000, RW),
        Ok(0xfef0_0000),
        "just past it"
    );
    assert_eq!(r.map(0, K64, PAST_APERTURE, RW), Err(Errno::EINVAL));
    assert_eq!(
        r.map(0, K64, PAST_APERTURE - 0x1000, RW),
        Err(Errno::EINVAL),
        "reaches past the aperture"
    );
    // Reserved before overlapping: the reserved check comes first.
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert_eq!(r.map(0, K64, MSI, RW), Err(Errno::EINVAL));
    // Unaligned comes before reserved; a wrap before reserved too.
    assert_eq!(r.map(0, K64, MSI + 0x800, RW), Err(Errno::EINVAL));
    assert_eq!(r.vfio.violation_count(), 0);
}

#[test]
fn iova_ranges_follow_the_devices_and_the_domain() {
    let r = bare();
    let all = r.ifd.iova_ranges(r.ioas, 8, 0).unwrap();
    assert_eq!(
        (all.ranges, all.total, all.alignment),
        (vec![(0, u64::MAX)], 1, 1)
    );
    r.ifd.attach(r.t.nic1, r.ioas).unwrap();
    let want = vec![(0, MSI - 1), (0xfef0_0000, PAST_APERTURE - 1)];
    let got = r.ifd.iova_ranges(r.ioas, 8, 0).unwrap();
    assert_eq!(
        (got.ranges.clone(), got.total, got.alignment),
        (want.clone(), 2, 4096)
    );
    // Room for one: EMSGSIZE, with the count and the first range.
    let (e, part) = r.ifd.iova_ranges(r.ioas, 1, 0).unwrap_err();
    assert_eq!(e, Errno::EMSGSIZE);
    let part = part.unwrap();
    assert_eq!((part.ranges, part.total), (want[..1].to_vec(), 2));
    // A second device adds its own (identical) region; nothing new shows.
    r.ifd.attach(r.t.nic0, r.ioas).unwrap();
    assert_eq!(r.ifd.iova_ranges(r.ioas, 8, 0).unwrap().ranges, want);
    // Checks before the IOAS: the reserved word, then the IOAS.
    assert_eq!(
        r.ifd.iova_ranges(999, 8, 1).unwrap_err().0,
        Errno::EOPNOTSUPP
    );
    assert_eq!(r.ifd.iova_ranges(999, 8, 0).unwrap_err().0, Errno::ENOENT);
    // Both devices move away: the IOAS is as new.
    let other = r.ifd.ioas_alloc().unwrap();
    r.ifd.attach(r.t.nic1, other).unwrap();
    assert_eq!(
        r.ifd.iova_ranges(r.ioas, 8, 0).unwrap().ranges,
        want,
        "nic0 is still there"
    );
    r.ifd.attach(r.t.nic0, other).unwrap();
    let back = r.ifd.iova_ranges(r.ioas, 8, 0).unwrap();
    assert_eq!((back.ranges, back.alignment), (vec![(0, u64::MAX)], 1));
    // And the MSI window can be mapped again there.
    assert_eq!(r.map(0, K64, MSI, RW), Ok(MSI));
}

#[test]
fn the_kernel_picks_the_lowest_free_iova_and_dma_goes_through_it() {
    let r = rig();
    // From the second page up, page aligned (no transparent huge pages).
    assert_eq!(r.map(0, K64, 0, RO_RW), Ok(0x1000));
    assert_eq!(
        r.map(K64, K64, 0xdead_0000, RO_RW),
        Ok(0x1000 + K64),
        "the iova given is ignored"
    );
    assert!(r.lands(0x1000 + 0x40, 0x40));
    assert!(r.lands(0x1000 + K64 + 0x80, K64 + 0x80));
    // A hole is reused once it is big enough.
    assert_eq!(r.ifd.unmap(r.ioas, 0x1000, K64), Ok(K64));
    assert_eq!(r.map(0, 0x2000, 0, RO_RW), Ok(0x1000));
    assert_eq!(
        r.map(0, 2 * K64, 0, RO_RW),
        Ok(0x1000 + 2 * K64),
        "too big for the hole at 0x3000"
    );
    // A window past the buffer is refused before any IOVA is looked for.
    assert_eq!(r.map(0, 1 << 63, 0, RO_RW), Err(Errno::EINVAL));
    // The chosen area is revoked like any other.
    r.dev.config_write(regs::COMMAND, &[0, 0]).unwrap();
    assert!(!r.lands(0x1000 + 0x40, 0x40));
    assert_eq!(r.vfio.violation_count(), 0);
}

#[test]
fn a_detached_device_faults_and_its_reserved_regions_go() {
    let r = rig();
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert!(r.lands(IOVA, 0));
    assert_eq!(r.ifd.detach(r.t.nic1), Ok(()));
    assert!(!r.lands(IOVA, 0), "blocked once detached");
    let rg = r.ifd.iova_ranges(r.ioas, 8, 0).unwrap();
    assert_eq!((rg.ranges, rg.alignment), (vec![(0, u64::MAX)], 1));
    assert_eq!(
        r.ifd.detach(r.t.nic1),
        Ok(()),
        "a second detach does nothing"
    );
    r.ifd.attach(r.t.nic1, r.ioas).unwrap();
    assert!(r.lands(IOVA, 0), "the area is still there");
    assert_eq!(r.vfio.violation_count(), 0);
}

#[test]
fn an_ioas_is_destroyed_only_without_devices_and_takes_its_areas() {
    let r = rig();
    assert_eq!(r.map(0, K64, IOVA, RW), Ok(IOVA));
    assert_eq!(r.ifd.ioas_destroy(r.ioas), Err(Errno::EBUSY));
    assert!(r.lands(IOVA, 0), "nothing changed");
    assert_eq!(r.ifd.ioas_destroy(999), Err(Errno::ENOENT));
    r.ifd.detach(r.t.nic1).unwrap();
    let buf = r.proc.dma_buf_get(r.fd).unwrap();
    let before = buf.dmabuf().unwrap().attachments().len();
    assert_eq!(before, 1, "the area's attachment");
    assert_eq!(r.ifd.ioas_destroy(r.ioas), Ok(()));
    assert_eq!(
        buf.dmabuf().unwrap().attachments().len(),
        0,
        "gone with the area"
    );
    buf.put();
    assert_eq!(r.ifd.ioas_destroy(r.ioas), Err(Errno::ENOENT));
    assert_eq!(r.map(0, K64, IOVA, RW), Err(Errno::ENOENT));
    assert_eq!(r.ifd.attach(r.t.nic1, r.ioas), Err(Errno::ENOENT));
}
