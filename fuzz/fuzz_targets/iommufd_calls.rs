//! iommufd as a dma-buf importer: `ioas_alloc`, `attach`, `map_file` and `unmap` with fuzzed
//! IOAS ids, IOVAs, lengths and starts, interleaved with revocations of gpu0's buffers
//! (COMMAND memory off and on, D3hot and D0, `VFIO_DEVICE_RESET`, low power, close and
//! reopen), revocations replayed *inside* `map_file` (at its `iommufd.map_file.attached`
//! interleaving point, between attaching and taking the buffer's lock), and DMAs from the
//! attached devices (acc0 behind the IOMMU, nic0 beside gpu0).
//!
//! Asserts:
//! - no call panics, and the revocation watch sees no DMA land through a taken-away mapping;
//! - `unmap` answers exactly what a model of the IOAS areas says (bytes unmapped, or `EINVAL`
//!   / `ENOENT`), `attach` succeeds exactly for an IOAS that exists, a `map_file` that
//!   succeeds was aligned, inside its single-range buffer and free in its IOAS, and `EEXIST`
//!   means the IOVA range was taken;
//! - while gpu0 does not decode memory, or after the device was closed, every area of its
//!   buffers is dead; a buffer of an earlier open never maps again;
//! - an IOMMU domain whose areas are all dead (or that has none) has no page-table entries;
//! - acc0's DMA inside a dead area faults; inside a live one it lands, at the BAR bytes the
//!   buffer names, and reads back;
//! - at the end of each input everything unmaps and every IOAS domain is empty.
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use peerdma_dma::iommu::{Attach, DomainId};
use peerdma_dmabuf::{File, Process};
use peerdma_fuzz::{PAGE, Reader, Rig, install_eventfd, revoke, rig, window_range};
use peerdma_pci::sync::points::{self, HookGuard};
use peerdma_pci::{Bdf, DmaAddr, Errno};
use peerdma_uapi::feature::DmaBufRequest;
use peerdma_vfio::DeviceFd;
use peerdma_vfio::iommufd::Iommufd;

/// IOASes made when the process starts (ids 1 to `PRE`), so that inputs see the same ids.
const PRE: usize = 12;
/// At most this many IOASes in a process: an IOAS's IOMMU domain is never freed.
const MAX_IOAS: usize = 32;
/// IOVAs the fuzzer aims at lie below this (page tables are never freed either).
const IOVA_SPAN: u64 = 256 << 20;

/// The process's iommufd and its IOASes with their IOMMU domains.
struct Fd {
    ifd: Iommufd,
    ioas: RefCell<Vec<(u32, DomainId)>>,
}

thread_local! {
    static FD: &'static Fd = Box::leak(Box::new(open_fd()));
}

fn domain_of(rig: &Rig, ifd: &Iommufd, id: u32) -> DomainId {
    ifd.attach(rig.nvme, id).expect("attach the probe device");
    match rig.env.dma.iommu().expect("IOMMU").attachment(rig.nvme) {
        Attach::Paging(d) => d,
        other => panic!("IOAS {id} attached as {other:?}"),
    }
}

fn open_fd() -> Fd {
    let rig = rig();
    let ifd = Iommufd::open(&rig.env).expect("iommufd");
    let ioas = (0..PRE)
        .map(|_| {
            let id = ifd.ioas_alloc().expect("ioas");
            (id, domain_of(rig, &ifd, id))
        })
        .collect();
    Fd {
        ifd,
        ioas: RefCell::new(ioas),
    }
}

struct Buf {
    file: Arc<File>,
    ranges: Vec<(u64, u64)>,
    size: u64,
    open: u32,
}

#[derive(Debug, Clone, Copy)]
struct Area {
    ioas: u32,
    iova: u64,
    len: u64,
    start: u64,
    buf: usize,
}

type Dev = Rc<RefCell<Option<DeviceFd>>>;

struct State {
    rig: &'static Rig,
    fd: &'static Fd,
    proc: Process,
    efd: i32,
    dev: Dev,
    open: u32,
    bufs: Vec<Buf>,
    areas: Vec<Area>,
    attached: BTreeMap<Bdf, u32>,
    hook: Option<HookGuard>,
}

impl State {
    fn known(&self, id: u32) -> bool {
        self.fd.ioas.borrow().iter().any(|&(i, _)| i == id)
    }

    fn ioas_id(&self, r: &mut Reader<'_>) -> u32 {
        // Mostly one of four IOASes (so maps, attaches and DMAs meet), sometimes any id
        // near the ones given out (0 and unknown ones included), rarely any u32.
        let b = r.u8();
        if b < 0xc0 {
            1 + u32::from(b % 4)
        } else if b < 0xf8 {
            u32::from(b % 40)
        } else {
            r.u32()
        }
    }

    fn iova(r: &mut Reader<'_>) -> u64 {
        let b = r.u8();
        if b < 0xe0 {
            u64::from(r.u16()) * PAGE % IOVA_SPAN
        } else if b < 0xf0 {
            u64::from(r.u16()) % IOVA_SPAN
        } else {
            r.u64()
        }
    }

    fn length(r: &mut Reader<'_>, size: u64) -> u64 {
        let b = r.u8();
        if b < 0x40 {
            size
        } else if b < 0xe0 {
            u64::from(r.u8() % 20) * PAGE
        } else if b < 0xf0 {
            u64::from(r.u16())
        } else {
            r.u64()
        }
    }

    fn alloc(&mut self) {
        if self.fd.ioas.borrow().len() >= MAX_IOAS {
            return;
        }
        let id = self.fd.ifd.ioas_alloc().expect("ioas_alloc");
        assert!(!self.known(id), "IOAS id {id} given out twice");
        let d = domain_of(self.rig, &self.fd.ifd, id);
        self.fd.ioas.borrow_mut().push((id, d));
    }

    fn attach(&mut self, r: &mut Reader<'_>) {
        let dev = if r.u8() & 1 == 0 {
            self.rig.acc
        } else {
            self.rig.nic
        };
        let id = self.ioas_id(r);
        let res = self.fd.ifd.attach(dev, id);
        assert_eq!(res.is_ok(), self.known(id), "attach to IOAS {id}: {res:?}");
        if res.is_ok() {
            self.attached.insert(dev, id);
        }
    }

    fn export(&mut self, r: &mut Reader<'_>) {
        let n = if r.u8() < 0xe0 { 1 } else { 2 };
        let ranges: Vec<(u64, u64)> = (0..n).map(|_| window_range(r)).collect();
        let req = DmaBufRequest::new(2, ranges.clone());
        let fd = self
            .dev
            .borrow()
            .as_ref()
            .expect("open")
            .feature(&self.proc, &req.to_bytes())
            .expect("an export inside BAR 2 succeeds");
        let file = self.proc.dma_buf_get(fd).expect("dma-buf");
        self.bufs.push(Buf {
            size: ranges.iter().map(|r| r.1).sum(),
            file,
            ranges,
            open: self.open,
        });
    }

    fn map_file(&mut self, r: &mut Reader<'_>) {
        if self.bufs.is_empty() {
            return;
        }
        let k = r.pick(self.bufs.len());
        let id = self.ioas_id(r);
        let size = self.bufs[k].size;
        let start = match r.u8() {
            0..0xc0 => 0,
            0xc0..0xf0 => u64::from(r.u8() % 16) * PAGE,
            _ => r.u64(),
        };
        let length = Self::length(r, size);
        let iova = Self::iova(r);
        let hook = self.hook.take();
        let res = self
            .fd
            .ifd
            .map_file(id, &self.bufs[k].file, start, length, iova);
        drop(hook);
        let b = &self.bufs[k];
        let overlap = self.areas.iter().any(|a| {
            a.ioas == id
                && iova.checked_add(length).is_some_and(|e| a.iova < e)
                && a.iova + a.len > iova
        });
        match res {
            Ok(()) => {
                assert!(self.known(id), "map_file into unknown IOAS {id}");
                assert!(
                    length > 0
                        && (start | length | iova) % PAGE == 0
                        && start.checked_add(length).is_some_and(|e| e <= b.size),
                    "map_file of {start:#x}+{length:#x} at {iova:#x} of a {:#x} buffer",
                    b.size
                );
                assert_eq!(b.ranges.len(), 1, "map_file of a buffer of several ranges");
                assert!(!overlap, "map_file over an existing area");
                assert_eq!(b.open, self.open, "a buffer of a closed device mapped");
                self.areas.push(Area {
                    ioas: id,
                    iova,
                    len: length,
                    start,
                    buf: k,
                });
            }
            Err(Errno::EEXIST) => assert!(overlap, "EEXIST without an overlapping area"),
            Err(_) => {}
        }
    }

    fn unmap(&mut self, r: &mut Reader<'_>) {
        let (id, iova, len) = if !self.areas.is_empty() && r.u8() < 0xc0 {
            let a = self.areas[r.pick(self.areas.len())];
            match r.u8() % 4 {
                0 => (a.ioas, a.iova, a.len),
                1 => (a.ioas, a.iova, a.len - PAGE.min(a.len)),
                2 => (a.ioas, a.iova.saturating_sub(PAGE), a.len + 2 * PAGE),
                _ => (a.ioas, 0, IOVA_SPAN),
            }
        } else {
            let id = self.ioas_id(r);
            (id, Self::iova(r), Self::length(r, PAGE))
        };
        let model = self.model_unmap(id, iova, len);
        let res = self.fd.ifd.unmap(id, iova, len);
        assert_eq!(res, model, "unmap({id}, {iova:#x}, {len:#x})");
        if res.is_ok() {
            let end = iova + len;
            self.areas
                .retain(|a| !(a.ioas == id && a.iova >= iova && a.iova + a.len <= end));
        }
    }

    /// What `IOMMU_IOAS_UNMAP` must answer, from the model.
    fn model_unmap(&self, id: u32, iova: u64, len: u64) -> Result<u64, Errno> {
        let end = iova.checked_add(len).ok_or(Errno::EINVAL)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        if !self.known(id) {
            return Err(Errno::ENOENT);
        }
        let hit: Vec<&Area> = self
            .areas
            .iter()
            .filter(|a| a.ioas == id && a.iova < end && a.iova + a.len > iova)
            .collect();
        if hit.is_empty() || hit.iter().any(|a| a.iova < iova || a.iova + a.len > end) {
            return Err(Errno::ENOENT);
        }
        Ok(hit.iter().map(|a| a.len).sum())
    }

    fn is_dead(&self, a: &Area) -> bool {
        match self.fd.ifd.is_dead(a.ioas, a.iova) {
            Some(d) => d,
            None => panic!("area {a:x?} of the model is not in the IOAS"),
        }
    }

    fn dma(&mut self, r: &mut Reader<'_>) {
        let dev = if r.u8() & 3 != 0 {
            self.rig.acc
        } else {
            self.rig.nic
        };
        let fill = r.u8();
        if self.areas.is_empty() || r.u8() >= 0xe0 {
            let iova = Self::iova(r);
            let _ = self.rig.fabric.dma_write(dev, DmaAddr(iova), &[fill; 8]);
            return;
        }
        // Mostly an area of the IOAS the device is attached to.
        let mine: Vec<Area> = self
            .areas
            .iter()
            .filter(|a| self.attached.get(&dev) == Some(&a.ioas))
            .copied()
            .collect();
        let a = if !mine.is_empty() && r.u8() < 0xc0 {
            mine[r.pick(mine.len())]
        } else {
            self.areas[r.pick(self.areas.len())]
        };
        let off = u64::from(r.u32()) % a.len;
        let n = (1 + usize::from(r.u8())).min(usize::try_from(a.len - off).unwrap_or(256));
        let data: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
        let addr = DmaAddr(a.iova + off);
        let res = self.rig.fabric.dma_write(dev, addr, &data);
        if dev != self.rig.acc || self.attached.get(&dev) != Some(&a.ioas) {
            return;
        }
        if self.is_dead(&a) {
            assert!(res.is_err(), "acc0's DMA through dead area {a:x?} landed");
            return;
        }
        assert!(
            res.is_ok(),
            "acc0's DMA through live area {a:x?} faulted: {res:?}"
        );
        let mut back = vec![0u8; n];
        let rr = self.rig.fabric.dma_read(dev, addr, &mut back);
        assert!(rr.is_ok(), "acc0's read through live area {a:x?}: {rr:?}");
        assert_eq!(back, data, "read back through area {a:x?}");
        let b = &self.bufs[a.buf];
        let bar_off = b.ranges[0].0 + a.start + off;
        assert_eq!(
            self.rig.peek(2, bar_off, n),
            data,
            "landed at BAR2+{bar_off:#x}"
        );
    }

    fn arm(&mut self, r: &mut Reader<'_>) {
        let what = r.u8();
        let (rig, dev, efd) = (self.rig, self.dev.clone(), self.efd);
        let proc = Rc::new(Process::new());
        // The wakeup variant needs an eventfd in the same table as the device's ioctl sees;
        // the hook uses its own table, where the wakeup entry just fails with EBADF.
        self.hook = Some(points::on("iommufd.map_file.attached", move || {
            if let Some(d) = dev.borrow().as_ref() {
                revoke(rig, d, &proc, efd, what, false);
            }
        }));
    }

    fn reopen(&mut self) {
        if let Some(d) = self.dev.borrow_mut().take() {
            d.close();
        }
        self.check();
        *self.dev.borrow_mut() = Some(self.rig.open());
        self.open += 1;
    }

    /// The promises that hold after every call.
    fn check(&self) {
        self.rig.check_watch();
        let off = self.dev.borrow().is_none() || !self.rig.decodes();
        // Each area's state looked up once (nothing changes it during the check).
        let dead: Vec<bool> = self.areas.iter().map(|a| self.is_dead(a)).collect();
        for (a, &dead) in self.areas.iter().zip(&dead) {
            if off || self.bufs[a.buf].open != self.open {
                assert!(
                    dead,
                    "area {a:x?} is live while gpu0 does not decode memory or was closed"
                );
            }
        }
        let iommu = self.rig.env.dma.iommu().expect("IOMMU");
        for &(id, dom) in self.fd.ioas.borrow().iter() {
            let live = self
                .areas
                .iter()
                .zip(&dead)
                .any(|(a, &dead)| a.ioas == id && !dead);
            if !live {
                let n = iommu.entries(dom);
                assert_eq!(n, 0, "IOAS {id} has no live area but {n} IOMMU entries");
            }
        }
    }
}

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    let rig = rig();
    let fd = FD.with(|f| *f);
    let proc = Process::new();
    let efd = install_eventfd(&proc);
    let mut st = State {
        rig,
        fd,
        proc,
        efd,
        dev: Rc::new(RefCell::new(Some(rig.open()))),
        open: 0,
        bufs: Vec::new(),
        areas: Vec::new(),
        attached: BTreeMap::new(),
        hook: None,
    };
    let mut r = Reader::new(data);
    let mut ops = 0;
    while !r.done() && ops < 64 {
        ops += 1;
        match r.u8() % 12 {
            0 => st.alloc(),
            1 => st.attach(&mut r),
            2 => {
                if st.bufs.len() < 8 {
                    st.export(&mut r);
                }
            }
            3 | 4 => st.map_file(&mut r),
            5 => st.unmap(&mut r),
            6 | 7 => {
                let what = r.u8();
                if let Some(d) = st.dev.borrow().as_ref() {
                    revoke(rig, d, &st.proc, st.efd, what, false);
                }
            }
            8 | 9 => st.dma(&mut r),
            10 => st.arm(&mut r),
            _ => st.reopen(),
        }
        st.check();
    }
    st.hook = None;
    // Unmap everything, IOAS by IOAS, and check that every domain is empty.
    let iommu = rig.env.dma.iommu().expect("IOMMU");
    for &(id, dom) in fd.ioas.borrow().iter() {
        let model = st.model_unmap(id, 0, u64::MAX);
        let res = fd.ifd.unmap(id, 0, u64::MAX);
        assert_eq!(res, model, "unmapping all of IOAS {id}");
        assert_eq!(
            iommu.entries(dom),
            0,
            "IOAS {id} keeps IOMMU entries after unmap"
        );
    }
    st.areas.clear();
    for b in st.bufs.drain(..) {
        b.file.put();
    }
    if let Some(d) = st.dev.borrow_mut().take() {
        d.close();
    }
    rig.settle(&st.proc);
});
