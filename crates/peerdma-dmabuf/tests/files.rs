//! Files that are not dma-bufs — eventfds, memfds — and what `read`, `lseek` and `dup` do
//! with them (fs/eventfd.c, mm/shmem.c, fs/read_write.c, fs/fcntl.c).

#![allow(
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_possible_truncation
)] // small test offsets

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use peerdma_dmabuf::buf::whence;
use peerdma_dmabuf::{File, Process};
use peerdma_pci::Errno;

const PAGE: u64 = 4096;

/// A memfd's RAM for the tests: byte `i` of the file is `i as u8` at CPU address
/// `BASE + i`.
const BASE: u64 = 0x4000_0000;

fn peek(at: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (at - BASE + i as u64) as u8;
    }
}

fn read(f: &File, n: usize) -> Result<Vec<u8>, Errno> {
    let mut b = vec![0xee; n];
    let k = f.read(&mut b, peek)?;
    b.truncate(k);
    Ok(b)
}

#[test]
fn an_eventfd_reads_its_counter_once_and_is_eagain_at_zero() {
    let e = File::eventfd();
    assert_eq!(read(&e, 8), Err(Errno::EAGAIN));
    e.eventfd_signal(1);
    e.eventfd_signal(2);
    // Room for fewer than 8 bytes is EINVAL even with a count waiting, and takes nothing.
    for n in 0..8 {
        assert_eq!(read(&e, n), Err(Errno::EINVAL), "{n}-byte read");
    }
    assert_eq!(read(&e, 64), Ok(3u64.to_le_bytes().to_vec()));
    assert_eq!(read(&e, 8), Err(Errno::EAGAIN));
    // The kernel's own signals take the counter up to u64::MAX (`eventfd_signal_mask`, as
    // the real kernel showed); a user's write can then add nothing, not even 0.
    e.eventfd_signal(u64::MAX);
    e.eventfd_signal(5);
    assert_eq!(e.write(&0u64.to_le_bytes()), Err(Errno::EAGAIN));
    assert_eq!(read(&e, 8), Ok(u64::MAX.to_le_bytes().to_vec()));
    // A write is exactly 8 bytes (`eventfd_write`): 16 or 4 are EINVAL and add nothing.
    assert_eq!(e.write(&[1u8; 16]), Err(Errno::EINVAL));
    assert_eq!(e.write(&[1u8; 4]), Err(Errno::EINVAL));
    assert_eq!(read(&e, 8), Err(Errno::EAGAIN));
}

#[test]
fn eventfd_signals_racing_reads_are_each_counted_once() {
    let e = File::eventfd();
    let got = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let e = e.clone();
            let got = got.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    if let Ok(b) = read(&e, 8) {
                        let v = u64::from_le_bytes(b.try_into().unwrap());
                        got.fetch_add(v, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for _ in 0..50_000 {
        e.eventfd_signal(1);
    }
    for r in readers {
        r.join().unwrap();
    }
    let rest = read(&e, 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    assert_eq!(got.load(Ordering::Relaxed) + rest, 50_000);
}

#[test]
fn an_eventfd_seeks_nowhere_and_other_files_cannot_seek() {
    let e = File::eventfd();
    for w in 0..=4 {
        assert_eq!(e.llseek_other(12345, w), Ok(0), "whence {w}");
    }
    let o = File::other("pipe");
    assert_eq!(o.llseek_other(0, whence::SET), Err(Errno::ESPIPE));
    assert_eq!(read(&o, 8), Err(Errno::EINVAL));
}

#[test]
fn a_memfd_reads_from_its_position_to_its_end_at_every_offset() {
    let size = 3 * PAGE + 100;
    let m = File::memfd(BASE, size);
    for pos in (0..size + 2 * PAGE).step_by(97) {
        for n in [0usize, 1, 7, 4096, 5000] {
            assert_eq!(m.llseek_other(pos as i64, whence::SET), Ok(pos));
            let b = read(&m, n).unwrap();
            let want = size.saturating_sub(pos).min(n as u64) as usize;
            assert_eq!(b.len(), want, "pos {pos} n {n}");
            for (i, &x) in b.iter().enumerate() {
                assert_eq!(x, (pos + i as u64) as u8, "pos {pos} byte {i}");
            }
            assert_eq!(
                m.llseek_other(0, whence::CUR),
                Ok(pos + want as u64),
                "the read moves the position by what it read"
            );
        }
    }
}

#[test]
fn a_memfd_seeks_set_cur_end_and_refuses_negative_and_wrapping_positions() {
    let m = File::memfd(BASE, 10_000);
    assert_eq!(m.llseek_other(-1, whence::END), Ok(9_999));
    assert_eq!(m.llseek_other(1, whence::CUR), Ok(10_000));
    assert_eq!(m.llseek_other(-10_001, whence::CUR), Err(Errno::EINVAL));
    assert_eq!(
        m.llseek_other(0, whence::CUR),
        Ok(10_000),
        "a refusal moves nothing"
    );
    assert_eq!(m.llseek_other(-1, whence::SET), Err(Errno::EINVAL));
    assert_eq!(m.llseek_other(i64::MAX, whence::SET), Ok(i64::MAX as u64));
    assert_eq!(m.llseek_other(1, whence::CUR), Err(Errno::EINVAL));
    assert_eq!(m.llseek_other(i64::MAX, whence::END), Err(Errno::EINVAL));
    assert_eq!(m.llseek_other(i64::MIN, whence::END), Err(Errno::EINVAL));
    assert_eq!(m.llseek_other(0, 5), Err(Errno::EINVAL));
}

/// The model of SEEK_DATA / SEEK_HOLE: a byte is data when its page is resident.
fn data_hole(resident: &[bool], size: u64, off: i64, data: bool) -> Result<u64, Errno> {
    let start = u64::try_from(off).map_err(|_| Errno::ENXIO)?;
    if start >= size {
        return Err(Errno::ENXIO);
    }
    let is_data = |b: u64| resident[(b / PAGE) as usize];
    let mut b = start;
    while b < size && is_data(b) != data {
        b += 1;
    }
    if data && b >= size {
        return Err(Errno::ENXIO);
    }
    Ok(b.min(size))
}

#[test]
fn seek_data_and_hole_follow_the_pinned_pages_at_every_offset() {
    let size = 6 * PAGE - 10;
    let m = File::memfd(BASE, size);
    let mut resident = vec![false; 6];
    // Pages come in the order a user pins them: one inside, a span, the tail.
    let pins = [(PAGE + 5, 1), (3 * PAGE, 2 * PAGE), (5 * PAGE + 1, 1 << 20)];
    let offsets: Vec<i64> = (-2..size as i64 + PAGE as i64)
        .step_by(251)
        .chain([
            0,
            PAGE as i64 - 1,
            PAGE as i64,
            size as i64 - 1,
            size as i64,
        ])
        .collect();
    for step in 0..=pins.len() {
        for &off in &offsets {
            for data in [true, false] {
                let w = if data { whence::DATA } else { whence::HOLE };
                assert_eq!(
                    m.llseek_other(off, w),
                    data_hole(&resident, size, off, data),
                    "after {step} pins, offset {off}, {}",
                    if data { "SEEK_DATA" } else { "SEEK_HOLE" }
                );
            }
        }
        if let Some(&(at, len)) = pins.get(step) {
            m.memfd_populate(at, len);
            let end = (at + len).min(size);
            for p in at / PAGE..end.div_ceil(PAGE) {
                resident[p as usize] = true;
            }
        }
    }
    // Reads allocate nothing: a fresh memfd read through stays all hole.
    let fresh = File::memfd(BASE, 2 * PAGE);
    read(&fresh, 2 * PAGE as usize).unwrap();
    assert_eq!(fresh.llseek_other(0, whence::DATA), Err(Errno::ENXIO));
    // Populating past the end or an empty range changes nothing.
    fresh.memfd_populate(2 * PAGE, PAGE);
    fresh.memfd_populate(0, 0);
    assert_eq!(fresh.llseek_other(0, whence::DATA), Err(Errno::ENXIO));
}

#[test]
fn a_dup_shares_the_file_and_its_position_and_outlives_the_original() {
    let p = Process::new();
    let fd = p.install(File::memfd(BASE, 8 * PAGE), true).unwrap();
    let twin = p.dup(fd).unwrap();
    assert_ne!(twin, fd);
    assert_eq!(p.cloexec(twin), Ok(true), "F_DUPFD_CLOEXEC");
    let a = p.fget(fd).unwrap();
    assert_eq!(a.refs(), 3, "two fds and this reference");
    assert_eq!(a.llseek_other(100, whence::SET), Ok(100));
    a.put();
    p.close(fd).unwrap();
    let b = p.fget(twin).unwrap();
    assert_eq!(b.refs(), 2);
    assert_eq!(b.llseek_other(0, whence::CUR), Ok(100), "one file position");
    assert_eq!(read(&b, 1), Ok(vec![100]));
    b.put();
    assert_eq!(p.dup(fd), Err(Errno::EBADF));
    assert_eq!(p.fget(fd).err(), Some(Errno::EBADF));
    p.close(twin).unwrap();
    assert_eq!(p.dup(twin), Err(Errno::EBADF));
}

#[test]
fn a_full_table_refuses_a_dup_and_keeps_the_count() {
    let p = Process::with_limit(4);
    let fd = p.install(File::eventfd(), false).unwrap();
    assert_eq!(p.dup(fd), Err(Errno::EMFILE));
    let f = p.fget(fd).unwrap();
    assert_eq!(f.refs(), 2, "the refused dup gave its reference back");
    f.put();
}
