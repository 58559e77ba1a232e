//! iommufd as a dma-buf importer: `ioas_alloc`, `attach`, `map_file` and `unmap` with fuzzed
//! IOAS ids, IOVAs, lengths and starts, interleaved with revocations of gpu0's buffers
//! (COMMAND memory off and on, D3hot and D0, `VFIO_DEVICE_RESET`, low power, close and
//! reopen), revocations replayed *inside* `map_file` (at its `iommufd.map_file.attached`
//! interleaving point, between attaching and taking the buffer's lock), and DMAs from the
//! attached devices (acc0 behind the IOMMU, nic0 beside gpu0).
//!
//! Asserts:
//! - no call panics, and the revocation watch sees no DMA land through a taken-away mapping;
//! - `unmap` answers exactly what a model of the IOAS areas says in Linux 7.2's order (bytes
//!   unmapped, `ENOENT`, `EINVAL`, `EOVERFLOW`) and removes the areas the model says — on an
//!   `ENOENT` at a partial area, those before it; `attach` succeeds exactly for an IOAS that
//!   exists (named by its id or its HWPT's), unless it has no device yet and an area not page
//!   aligned (`EADDRINUSE`); a `map_file` that succeeds was aligned to the IOAS's alignment (a
//!   byte with no device, the page size with one), inside its single-range buffer and free in
//!   its IOAS, and `EEXIST` means the IOVA range was taken;
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
use peerdma_dma::iommu::{APERTURE_END, Attach, DomainId, MSI_WINDOW};
use peerdma_dmabuf::{File, Process};
use peerdma_fuzz::{PAGE, Reader, Rig, install_eventfd, revoke, rig, window_range};
use peerdma_pci::sync::points::{self, HookGuard};
use peerdma_pci::{Bdf, DmaAddr, Errno};
use peerdma_uapi::feature::DmaBufRequest;
use peerdma_vfio::DeviceFd;
use peerdma_vfio::iommufd::Iommufd;

/// IOASes made when the process starts (the same ids every input; their automatic HWPTs'
/// ids lie among them, so the small ids the fuzzer favours name both kinds).
const PRE: usize = 12;
/// At most this many IOASes in a process: an IOAS's IOMMU domain is never freed.
const MAX_IOAS: usize = 32;
/// IOVAs the fuzzer aims at lie below this (page tables are never freed either).
const IOVA_SPAN: u64 = 256 << 20;

/// Whether `a` meets `[first, last]`.
fn meets(a: &Area, first: u64, last: u64) -> bool {
    a.iova <= last && a.iova + (a.len - 1) >= first
}

/// The process's iommufd and its IOASes with their IOMMU domains.
struct Fd {
    ifd: Iommufd,
    ioas: RefCell<Vec<(u32, DomainId)>>,
    /// The IOAS each device is attached to now (attachments outlive an input).
    devices: RefCell<BTreeMap<Bdf, u32>>,
}

impl Fd {
    /// Linux's IOAS alignment: a byte while no device is attached, else the page size.
    fn alignment(&self, id: u32) -> u64 {
        if self.devices.borrow().values().any(|&i| i == id) {
            PAGE
        } else {
            1
        }
    }
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
    let ioas: Vec<(u32, DomainId)> = (0..PRE)
        .map(|_| {
            let id = ifd.ioas_alloc().expect("ioas");
            (id, domain_of(rig, &ifd, id))
        })
        .collect();
    let last = ioas.last().map(|&(id, _)| id);
    Fd {
        ifd,
        ioas: RefCell::new(ioas),
        devices: RefCell::new(last.map(|id| (rig.nvme, id)).into_iter().collect()),
    }
}

struct Buf {
    fd: i32,
    file: Arc<File>,
    ranges: Vec<(u64, u64)>,
    size: u64,
    open: u32,
}

#[derive(Debug, Clone, Copy)]
struct Area {
    /// `IOMMU_IOAS_MAP_*` flags it was mapped with (writeable 2, readable 4).
    flags: u32,
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
        if r.u8() == 0xff {
            // Now and then around the MSI window.
            return MSI_WINDOW.0 - 0x10_0000 + u64::from(r.u16()) * PAGE;
        }
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
        self.fd.devices.borrow_mut().insert(self.rig.nvme, id);
    }

    fn attach(&mut self, r: &mut Reader<'_>) {
        let dev = if r.u8() & 1 == 0 {
            self.rig.acc
        } else {
            self.rig.nic
        };
        let named = self.ioas_id(r);
        // An id may name an IOAS or its automatic HWPT (taken before the call: the attach may
        // replace it); either attaches to the IOAS.
        let hwpt = self.fd.ifd.hwpt_ioas(named);
        let id = hwpt.unwrap_or(named);
        let res = self.fd.ifd.attach(dev, named);
        // A device new to the IOAS brings its reserved region (the MSI window): no area may
        // meet it. The first device brings the domain: every area page aligned and inside
        // the 48-bit aperture.
        let new_here = self.attached.get(&dev) != Some(&id);
        let first = self.fd.alignment(id) == 1;
        let in_ioas = |a: &&Area| a.ioas == id;
        let msi = self
            .areas
            .iter()
            .filter(in_ioas)
            .any(|a| meets(a, MSI_WINDOW.0, MSI_WINDOW.1));
        let domain = self.areas.iter().filter(in_ioas).any(|a| {
            (a.iova | a.len | a.start) % PAGE != 0 || meets(a, APERTURE_END + 1, u64::MAX)
        });
        let want = if !self.known(id) {
            Err(Errno::ENOENT)
        } else if new_here && (msi || (first && domain)) {
            Err(Errno::EADDRINUSE)
        } else {
            Ok(())
        };
        assert_eq!(res, want, "attach to IOAS {id} (named as {named})");
        if res.is_ok() {
            self.attached.insert(dev, id);
            self.fd.devices.borrow_mut().insert(dev, id);
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
            fd,
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
        // Mostly fixed IOVA, readable and writeable; sometimes any flags, through the
        // ioctl's own entry (its fd and flag checks come first).
        let flags = if r.u8() < 0xe0 { 7 } else { r.u32() & 0xf };
        let hook = self.hook.take();
        let res = if flags == 7 && r.u8() < 0x80 {
            self.fd
                .ifd
                .map_file(id, &self.bufs[k].file, start, length, iova)
                .map(|()| iova)
        } else {
            let fd = self.bufs[k].fd;
            self.fd
                .ifd
                .map_file_ioctl(&self.proc, id, fd, start, length, iova, flags)
        };
        drop(hook);
        if flags & !7 != 0 {
            assert_eq!(
                res,
                Err(Errno::EOPNOTSUPP),
                "unknown MAP_FILE flags {flags:#x}"
            );
        } else if iova == u64::MAX || length == u64::MAX {
            assert_eq!(res, Err(Errno::EOVERFLOW), "MAP_FILE of u64::MAX");
        } else if flags & 6 == 0 {
            assert_eq!(
                res,
                Err(Errno::EINVAL),
                "MAP_FILE neither readable nor writeable"
            );
        }
        let fixed = flags & 1 == 1;
        if let Ok(at) = res {
            if fixed {
                assert_eq!(at, iova, "the fixed IOVA is the one given");
            } else {
                // The kernel's choice: from the second page up, page aligned (plus the
                // start's offset in its page), never in a reserved range.
                // (Page aligned only once a device is attached; with a byte alignment the
                // rounded-up hole start keeps its low bits.)
                let aligned = self.fd.alignment(id) == 1 || at % PAGE == start % PAGE;
                assert!(at >= PAGE && aligned, "chosen IOVA {at:#x}");
            }
        }
        let iova = res.unwrap_or(iova);
        let b = &self.bufs[k];
        let overlap = self.areas.iter().any(|a| {
            a.ioas == id
                && iova.checked_add(length).is_some_and(|e| a.iova < e)
                && a.iova + a.len > iova
        });
        let align = self.fd.alignment(id);
        // With a device attached: the MSI window and everything past the aperture.
        let reserved = align != 1
            && length > 0
            && iova.checked_add(length - 1).is_some_and(|last| {
                (iova <= MSI_WINDOW.1 && last >= MSI_WINDOW.0) || last > APERTURE_END
            });
        match res {
            Ok(_) => {
                assert!(!reserved, "map_file into a reserved range at {iova:#x}");
                assert!(self.known(id), "map_file into unknown IOAS {id}");
                assert!(
                    length > 0
                        && (length | iova) % align == 0
                        && (start % PAGE) % align == 0
                        && start.checked_add(length).is_some_and(|e| e <= b.size),
                    "map_file of {start:#x}+{length:#x} at {iova:#x} of a {:#x} buffer \
                     (IOAS alignment {align:#x})",
                    b.size
                );
                assert_eq!(b.ranges.len(), 1, "map_file of a buffer of several ranges");
                assert!(!overlap, "map_file over an existing area");
                assert_eq!(b.open, self.open, "a buffer of a closed device mapped");
                self.areas.push(Area {
                    flags,
                    ioas: id,
                    iova,
                    len: length,
                    start,
                    buf: k,
                });
            }
            Err(Errno::EEXIST) => assert!(overlap && fixed, "EEXIST without an overlapping area"),
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
        let (model, gone) = self.model_unmap(id, iova, len);
        let res = self.fd.ifd.unmap(id, iova, len);
        assert_eq!(res, model, "unmap({id}, {iova:#x}, {len:#x})");
        let mut i = 0;
        self.areas.retain(|_| {
            i += 1;
            !gone.contains(&(i - 1))
        });
    }

    /// What `IOMMU_IOAS_UNMAP` must answer, from the model (Linux 7.2's order), and which
    /// areas (indexes into `areas`) it removes — on `ENOENT` too, those before the first
    /// area only partly inside the range.
    fn model_unmap(&self, id: u32, iova: u64, len: u64) -> (Result<u64, Errno>, Vec<usize>) {
        if !self.known(id) {
            return (Err(Errno::ENOENT), Vec::new());
        }
        let all = iova == 0 && len == u64::MAX;
        if !all {
            if iova == u64::MAX || len == u64::MAX {
                return (Err(Errno::EOVERFLOW), Vec::new());
            }
            if len == 0 {
                return (Err(Errno::EINVAL), Vec::new());
            }
        }
        let last = if all {
            u64::MAX
        } else if let Some(l) = iova.checked_add(len - 1) {
            l
        } else {
            return (Err(Errno::EOVERFLOW), Vec::new());
        };
        let mut hit: Vec<(usize, &Area)> = self
            .areas
            .iter()
            .enumerate()
            .filter(|(_, a)| a.ioas == id && a.iova <= last && a.iova + (a.len - 1) >= iova)
            .collect();
        hit.sort_by_key(|(_, a)| a.iova);
        let (mut gone, mut total) = (Vec::new(), 0);
        for (k, a) in hit {
            if a.iova < iova || a.iova + (a.len - 1) > last {
                return (Err(Errno::ENOENT), gone);
            }
            gone.push(k);
            total += a.len;
        }
        if total == 0 && !all {
            return (Err(Errno::ENOENT), gone);
        }
        (Ok(total), gone)
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
        if self.rig.suspended_live(self.dev.borrow().as_ref()) {
            assert!(
                res.is_err(),
                "acc0's DMA reached suspended gpu0 through {a:x?}"
            );
            return;
        }
        let b = &self.bufs[a.buf];
        let bar_off = b.ranges[0].0 + a.start + off;
        let mut back = vec![0u8; n];
        let rr = self.rig.fabric.dma_read(dev, addr, &mut back);
        assert_eq!(
            rr.is_ok(),
            a.flags & 4 != 0,
            "acc0's read through {a:x?}: {rr:?}"
        );
        if a.flags & 2 == 0 {
            assert!(
                res.is_err(),
                "acc0's write through read-only area {a:x?} landed"
            );
            if rr.is_ok() {
                assert_eq!(back, self.rig.peek(2, bar_off, n), "read through {a:x?}");
            }
            return;
        }
        assert!(
            res.is_ok(),
            "acc0's DMA through live area {a:x?} faulted: {res:?}"
        );
        if rr.is_ok() {
            assert_eq!(back, data, "read back through area {a:x?}");
        }
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
        // Off: closed, or not decoding (but see `Rig::suspended_live`).
        let off = self.dev.borrow().is_none()
            || (!self.rig.decodes() && !self.rig.suspended_live(self.dev.borrow().as_ref()));
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
        let (model, _) = st.model_unmap(id, 0, u64::MAX);
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
