//! A sequence of user operations on gpu0 through vfio-pci, decoded from the input: config
//! writes and reads of any size and offset, `VFIO_DEVICE_RESET`, hot reset, low power entry
//! and exit (with and without wakeup), dma-buf exports, importers (nic0 by bus address, acc0
//! by IOVA) that attach, map, DMA, unmap and detach, fd closes, and closing and reopening the
//! device.
//!
//! Asserts:
//! - no operation panics; a config write or `read_config` of any length (0 to 8 here) is
//!   `EFAULT` if it starts at or reaches past 4 KiB and succeeds otherwise; `config_read` of a
//!   size other than 1, 2 or 4 is `EINVAL` and otherwise answers what `read_config` of the
//!   same bytes reads; no user operation moves a BAR (vfio-pci virtualises them);
//! - the revocation watch sees no DMA land through a mapping that had been taken away;
//! - the revocation promise in its strong form: whenever gpu0's hardware does not decode
//!   memory (COMMAND.MEMORY clear, or not in D0), or the device is closed, no importer holds a
//!   mapping, and a new map is refused;
//! - a buffer exported before the device was closed never maps again (also after a reopen);
//! - a detached attachment never maps;
//! - a DMA write through a live mapping that succeeds lands at the BAR bytes the buffer's
//!   ranges name, and reading it back gives the same bytes;
//! - between inputs, everything is given back (see `Rig::settle`).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use peerdma_dmabuf::{File, Process};
use peerdma_fuzz::{Importer, Reader, Rig, check_landed, install_eventfd, rig, window_range};
use peerdma_pci::{Errno, regs};
use peerdma_uapi::feature::{DmaBufRequest, header_bytes};
use peerdma_vfio::DeviceFd;
use peerdma_vfio::feature::{GET, PROBE, SET, id};

struct Buf {
    fd: i32,
    file: Arc<File>,
    bar: u8,
    ranges: Vec<(u64, u64)>,
    size: u64,
    /// Which open of the device exported it.
    open: u32,
}

struct Imp {
    imp: Importer,
    buf: usize,
}

struct State {
    rig: &'static Rig,
    proc: Process,
    efd: i32,
    dev: Option<DeviceFd>,
    open: u32,
    bufs: Vec<Buf>,
    imps: Vec<Imp>,
    offsets: Vec<u16>,
    bars: Vec<u64>,
}

impl State {
    fn dev(&self) -> &DeviceFd {
        self.dev.as_ref().expect("device open")
    }

    /// BAR bus addresses now (vfio-pci virtualises the BARs: no user write moves them).
    fn bars_now(&self) -> Vec<u64> {
        [0u8, 2, 4]
            .iter()
            .map(|&i| {
                self.rig
                    .fabric
                    .bar(self.rig.gpu, i)
                    .map_or(0, |b| b.bus.get())
            })
            .collect()
    }

    fn config_write(&mut self, r: &mut Reader<'_>) {
        let sel = r.u8();
        let offset = if sel < 0x80 {
            self.offsets[usize::from(sel) % self.offsets.len()]
        } else {
            r.u16() % 0x1001
        };
        // Any length from 0 to 8 (a `pwrite` of the config region).
        let size = usize::from(r.u8() % 9);
        let data = r.bytes(size).to_vec();
        let res = self.dev().config_write(offset, &data);
        if usize::from(offset) >= regs::CFG_SIZE
            || usize::from(offset) + data.len() > regs::CFG_SIZE
        {
            assert_eq!(
                res,
                Err(Errno::EFAULT),
                "config write of {data:x?} at {offset:#x}"
            );
        } else {
            assert_eq!(res, Ok(()), "config write of {data:x?} at {offset:#x}");
        }
    }

    fn config_read(&mut self, r: &mut Reader<'_>) {
        let offset = r.u16() % 0x1001;
        let size = usize::from(r.u8() % 9);
        let out =
            usize::from(offset) >= regs::CFG_SIZE || usize::from(offset) + size > regs::CFG_SIZE;
        let mut bytes = vec![0u8; size];
        let whole = self.dev().read_config(offset, &mut bytes);
        if out {
            assert_eq!(whole, Err(Errno::EFAULT), "read of {size} at {offset:#x}");
        } else {
            assert_eq!(whole, Ok(()), "read of {size} at {offset:#x}");
        }
        let res = self.dev().config_read(offset, size);
        if !matches!(size, 1 | 2 | 4) {
            assert_eq!(
                res,
                Err(Errno::EINVAL),
                "config read of {size} at {offset:#x}"
            );
        } else if out {
            assert_eq!(
                res,
                Err(Errno::EFAULT),
                "config read of {size} at {offset:#x}"
            );
        } else {
            let mut w = [0u8; 4];
            w[..size].copy_from_slice(&bytes);
            assert_eq!(
                res,
                Ok(u32::from_le_bytes(w)),
                "config_read and read_config of {size} at {offset:#x} disagree"
            );
        }
    }

    fn low_power(&mut self, r: &mut Reader<'_>) {
        let bytes = match r.pick(5) {
            0 => header_bytes(8, SET | id::LOW_POWER_ENTRY),
            1 => header_bytes(8, SET | id::LOW_POWER_EXIT),
            2 | 3 => {
                let mut b = header_bytes(16, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
                let fd = if r.u8() & 1 == 0 {
                    self.efd
                } else {
                    i32::from(r.u8() as i8)
                };
                b.extend_from_slice(&fd.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b
            }
            _ => header_bytes(8, GET | PROBE | id::DMA_BUF),
        };
        let _ = self.dev().feature(&self.proc, &bytes);
    }

    fn export(&mut self, r: &mut Reader<'_>) {
        let bar = [2u8, 2, 4, 0][r.pick(4)];
        let n = 1 + r.pick(3);
        let ranges: Vec<(u64, u64)> = (0..n).map(|_| window_range(r)).collect();
        let req = DmaBufRequest::new(u32::from(bar), ranges.clone());
        let bar_size = self
            .rig
            .fabric
            .bar(self.rig.gpu, bar)
            .map_or(0, |b| b.bar.size);
        match self.dev().feature(&self.proc, &req.to_bytes()) {
            Ok(fd) => {
                let size: u64 = ranges.iter().map(|r| r.1).sum();
                assert!(
                    ranges.iter().all(|&(o, l)| o + l <= bar_size),
                    "export past BAR{bar}"
                );
                let file = self.proc.dma_buf_get(fd).expect("dma-buf fd");
                assert_eq!(file.dmabuf().expect("dma-buf").size(), size);
                self.bufs.push(Buf {
                    fd,
                    file,
                    bar,
                    ranges,
                    size,
                    open: self.open,
                });
            }
            Err(e) => assert!(
                e == Errno::EINVAL
                    && (ranges.iter().any(|&(o, l)| o + l > bar_size)
                        || self.rig.vfio.provider(bar).is_none()),
                "export of {ranges:x?} from BAR{bar} (size {bar_size:#x}) refused: {e:?}"
            ),
        }
    }

    fn attach(&mut self, r: &mut Reader<'_>) {
        if self.bufs.is_empty() || self.imps.len() >= 8 {
            return;
        }
        let buf = r.pick(self.bufs.len());
        let dev = if r.u8() & 1 == 0 {
            self.rig.nic
        } else {
            self.rig.acc
        };
        if let Ok(imp) = Importer::attach(&self.bufs[buf].file, dev) {
            self.imps.push(Imp { imp, buf });
        }
    }

    fn map(&mut self, r: &mut Reader<'_>) {
        if self.imps.is_empty() {
            return;
        }
        let i = &self.imps[r.pick(self.imps.len())];
        let res = i.imp.map();
        let b = &self.bufs[i.buf];
        if i.imp.detached {
            assert!(res.is_err(), "a detached attachment mapped");
        } else if b.open != self.open || self.dev.is_none() {
            assert_eq!(
                res,
                Err(Errno::ENODEV),
                "a buffer of a closed device mapped"
            );
        }
        if !self.rig.decodes() && !self.rig.suspended_live(self.dev.as_ref()) {
            assert!(res.is_err(), "mapped while gpu0 does not decode memory");
        }
    }

    fn dma(&mut self, r: &mut Reader<'_>) {
        if self.imps.is_empty() {
            return;
        }
        let i = &self.imps[r.pick(self.imps.len())];
        let b = &self.bufs[i.buf];
        let at = u64::from(r.u32()) % b.size;
        let want = 1 + usize::from(r.u8());
        let fill = r.u8();
        let Some((addr, room)) = i.imp.addr_of(at) else {
            return;
        };
        let n = want.min(usize::try_from(room).unwrap_or(usize::MAX));
        let data: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
        let fabric = &self.rig.fabric;
        if fabric.dma_write(i.imp.dev, addr, &data).is_ok() {
            let mut back = vec![0u8; n];
            if fabric.dma_read(i.imp.dev, addr, &mut back).is_ok() {
                assert_eq!(back, data, "read back through the mapping");
            }
            check_landed(self.rig, b.bar, &b.ranges, at, &data);
        }
    }

    /// A DMA at an IOVA acc0 was given before (its mapping may be gone): it may fault or land
    /// (the IOVA may have been given out again), and the watch judges the landing.
    fn stale_dma(&mut self, r: &mut Reader<'_>) {
        let acc = self.rig.acc;
        let Some(i) = self.imps.iter().filter(|i| i.imp.dev == acc).nth(r.pick(8)) else {
            return;
        };
        let Some((addr, len)) = i.imp.last.get() else {
            return;
        };
        let off = u64::from(r.u32()) % len.max(1);
        let data = [r.u8(); 8];
        let a = peerdma_pci::DmaAddr(addr.get() + off);
        let _ = self.rig.fabric.dma_write(acc, a, &data);
    }

    fn close_buf(&mut self, r: &mut Reader<'_>) {
        if self.bufs.is_empty() {
            return;
        }
        let k = r.pick(self.bufs.len());
        let fd = self.bufs[k].fd;
        if fd >= 0 {
            self.proc.close(fd).expect("close a dma-buf fd");
            self.bufs[k].fd = -1;
        }
    }

    fn reopen(&mut self) {
        if let Some(d) = self.dev.take() {
            d.close();
        }
        self.check();
        self.dev = Some(self.rig.open());
        self.open += 1;
    }

    /// The promises that hold after every operation.
    fn check(&self) {
        self.rig.check_watch();
        assert_eq!(
            self.bars_now(),
            self.bars,
            "a user operation moved gpu0's BARs"
        );
        let off = self.dev.is_none()
            || (!self.rig.decodes() && !self.rig.suspended_live(self.dev.as_ref()));
        for (k, i) in self.imps.iter().enumerate() {
            let b = &self.bufs[i.buf];
            if off || b.open != self.open {
                assert!(
                    !i.imp.mapped(),
                    "importer {k} ({}) still holds a mapping of buffer {} while gpu0 does not \
                     decode memory (COMMAND {:#x}, {:?}) or the device was closed",
                    i.imp.dev,
                    i.buf,
                    self.rig.fabric.command(self.rig.gpu).unwrap_or(0),
                    self.rig.fabric.power_state(self.rig.gpu)
                );
            }
        }
    }
}

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    let rig = rig();
    let proc = Process::new();
    let efd = install_eventfd(&proc);
    let bars = {
        let s = |i| rig.fabric.bar(rig.gpu, i).map_or(0, |b| b.bus.get());
        vec![s(0), s(2), s(4)]
    };
    let mut st = State {
        rig,
        proc,
        efd,
        dev: Some(rig.open()),
        open: 0,
        bufs: Vec::new(),
        imps: Vec::new(),
        offsets: rig.interesting_offsets(),
        bars,
    };
    let mut r = Reader::new(data);
    let mut ops = 0;
    while !r.done() && ops < 64 {
        ops += 1;
        match r.u8() % 14 {
            0 | 1 => st.config_write(&mut r),
            2 => st.config_read(&mut r),
            3 => {
                let _ = st.dev().reset();
            }
            4 => {
                if r.u8() & 1 == 0 {
                    let _ = st.dev().hot_reset(&[&rig.vfio]);
                } else {
                    let res = st.dev().hot_reset(&[]);
                    assert_eq!(res, Err(Errno::EINVAL), "hot reset without owning gpu0");
                }
            }
            5 => st.low_power(&mut r),
            6 => st.export(&mut r),
            7 => st.attach(&mut r),
            8 => st.map(&mut r),
            9 => {
                if !st.imps.is_empty() {
                    let k = r.pick(st.imps.len());
                    st.imps[k].imp.unmap();
                }
            }
            10 => st.dma(&mut r),
            11 => st.stale_dma(&mut r),
            12 => {
                if !st.imps.is_empty() {
                    let k = r.pick(st.imps.len());
                    if r.u8() & 1 == 0 {
                        st.imps[k].imp.detach();
                    } else {
                        st.close_buf(&mut r);
                    }
                }
            }
            _ => st.reopen(),
        }
        st.check();
    }
    // Give everything back: importers first, then the device, then the fds.
    for i in st.imps.drain(..) {
        i.imp.drop_all();
    }
    for b in st.bufs.drain(..) {
        b.file.put();
    }
    if let Some(d) = st.dev.take() {
        d.close();
    }
    rig.settle(&st.proc);
});
