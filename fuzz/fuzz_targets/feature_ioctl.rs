//! `VFIO_DEVICE_FEATURE` on arbitrary bytes, a sequence of calls on one open gpu0 (DMA_BUF
//! export, low power entry with and without wakeup, exit, probes, unknown features).
//!
//! Asserts: no call panics; a call that is not a DMA_BUF GET answers 0 or an errno and
//! installs no fd; an Ok DMA_BUF GET installs exactly one new fd, a vfio dma-buf whose size is
//! the sum of the range lengths asked for, with every range page aligned and inside the
//! region, and whose close-on-exec and access flags are those asked for. Between inputs the
//! device is closed, every fd closed, and the machine checked clean (see `Rig::settle`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerdma_dmabuf::Process;
use peerdma_fuzz::{PAGE, Reader, install_eventfd, rig};
use peerdma_uapi::feature::{O_CLOEXEC, O_RDWR};
use peerdma_vfio::feature::{GET, MASK, PROBE, id};

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// What an Ok DMA_BUF GET of `buf` must have exported, read from the uAPI layout directly:
/// (region index, open flags, the ranges).
fn asked(buf: &[u8]) -> (u32, u32, Vec<(u64, u64)>) {
    let p = 8;
    let region = u32_at(buf, p).expect("an Ok export had a payload");
    let open_flags = u32_at(buf, p + 4).expect("payload");
    let nr = u32_at(buf, p + 12).expect("payload") as usize;
    let ranges = (0..nr)
        .map(|i| {
            let at = p + 16 + 16 * i;
            let r = (u64_at(buf, at), u64_at(buf, at + 8));
            match r {
                (Some(o), Some(l)) => (o, l),
                _ => panic!("Ok export with range {i} of {nr} past the buffer"),
            }
        })
        .collect();
    (region, open_flags, ranges)
}

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    let rig = rig();
    let proc = Process::new();
    // fd 3: an eventfd for LOW_POWER_ENTRY_WITH_WAKEUP; fd 4: a file that is not one.
    let efd = install_eventfd(&proc);
    let other = proc
        .install(peerdma_dmabuf::File::other("memfd"), false)
        .map_err(|(e, _)| e)
        .expect("install");
    assert_eq!((efd, other), (3, 4));
    let dev = rig.open();
    let mut r = Reader::new(data);
    while !r.done() {
        // Each call: a length byte, then that many bytes (the whole rest if shorter).
        let n = usize::from(r.u8());
        let buf = r.bytes(if n == 0 { usize::MAX } else { n });
        let before = proc.fds();
        let res = dev.feature(&proc, buf);
        let after = proc.fds();
        let flags = u32_at(buf, 4).unwrap_or(0);
        let export = flags & MASK == id::DMA_BUF && flags & GET != 0 && flags & PROBE == 0;
        match res {
            Ok(fd) if export && fd != 0 => {
                let mut want = before.clone();
                want.push(fd);
                want.sort_unstable();
                assert_eq!(after, want, "an export installs exactly its fd");
                let (region, open_flags, ranges) = asked(buf);
                assert!(region < 6, "exported region {region}");
                let bar = rig
                    .fabric
                    .bar(rig.gpu, region as u8)
                    .expect("exported from a real BAR");
                let mut total = 0u64;
                for &(off, len) in &ranges {
                    assert!(
                        len > 0 && off % PAGE == 0 && len % PAGE == 0,
                        "range {off:#x}+{len:#x}"
                    );
                    let end = off.checked_add(len).expect("range end overflows");
                    assert!(
                        end <= bar.bar.size,
                        "range {off:#x}+{len:#x} past BAR{region}"
                    );
                    total += len;
                }
                let f = proc.dma_buf_get(fd).expect("the fd is a dma-buf");
                let b = f.dmabuf().expect("dma-buf");
                assert_eq!(b.size(), total, "dma-buf size is the sum of the ranges");
                assert_eq!(b.exp_name(), "vfio_pci_core");
                assert_eq!(
                    proc.cloexec(fd).expect("fd"),
                    open_flags & O_CLOEXEC != 0,
                    "close-on-exec as asked"
                );
                assert_eq!(
                    f.flags() & O_RDWR,
                    open_flags & O_RDWR,
                    "access mode as asked"
                );
                f.put();
                // Closed at once, so the fd table and the buffer count stay small.
                proc.close(fd).expect("close the export");
            }
            Ok(v) => {
                assert_eq!(v, 0, "a feature that is not an export answers 0");
                assert_eq!(after, before, "no fd without an export");
            }
            Err(_) => assert_eq!(after, before, "a failed call installs no fd"),
        }
        rig.check_watch();
    }
    dev.close();
    rig.settle(&proc);
});
