//! The on-demand-paging RDMA NIC as a dma-buf importer: `register_mr`, `dereg_mr`, `write`
//! and `read` with fuzzed keys, offsets and lengths on two NICs (nic0 beside gpu0, bus
//! addresses; acc0 behind the IOMMU), interleaved with revocations of gpu0's buffers (COMMAND
//! memory off and on, D3hot and D0, `VFIO_DEVICE_RESET`, hot reset, low power, close and
//! reopen) and with deregistrations and revocations replayed *inside* an access (at its
//! `odp.access.unlocked` interleaving point, after the region was looked up and before the
//! buffer's lock is taken).
//!
//! Asserts:
//! - no call panics (nor hangs: a revoke waiting for a mapping nobody will give back shows
//!   as a libFuzzer timeout), and the revocation watch sees no DMA land through a mapping
//!   that had been taken away;
//! - completions agree with a model: `BadKey` exactly for a key not registered (also one
//!   deregistered during the access), `OutOfBounds` exactly for a window past the region,
//!   never `Success` while gpu0 does not decode memory or for a buffer of an earlier open;
//!   `register_mr` of a file that is not a dma-buf is `EINVAL`, `dereg_mr` succeeds exactly
//!   for a registered key;
//! - while gpu0 does not decode memory, or after the device was closed, no region is mapped;
//! - a `Success` write lands at the BAR bytes the buffer's ranges name, and a read of the same
//!   window right after is `Success` with the same bytes;
//! - between inputs, every region deregistered, everything is given back (`Rig::settle`).
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use peerdma_dmabuf::{File, Process};
use peerdma_fuzz::{Reader, Rig, check_landed, install_eventfd, revoke, rig, window_range};
use peerdma_pci::Errno;
use peerdma_pci::sync::points::{self, HookGuard};
use peerdma_uapi::feature::DmaBufRequest;
use peerdma_vfio::DeviceFd;
use peerdma_vfio::rdma::{Completion, OdpNic};

struct Buf {
    file: Arc<File>,
    ranges: Vec<(u64, u64)>,
    size: u64,
    open: u32,
}

#[derive(Debug, Clone, Copy)]
struct Mr {
    nic: usize,
    buf: usize,
}

type Dev = Rc<RefCell<Option<DeviceFd>>>;

/// What an armed hook does inside the next access.
#[derive(Debug, Clone, Copy)]
enum Inside {
    Dereg(usize, u32),
    Revoke(u8),
}

struct State {
    rig: &'static Rig,
    proc: Rc<Process>,
    efd: i32,
    dev: Dev,
    open: u32,
    nics: Rc<[OdpNic; 2]>,
    bufs: Vec<Buf>,
    /// Registered regions by (nic, key).
    mrs: BTreeMap<(usize, u32), Mr>,
    hook: Option<(HookGuard, Inside, Rc<RefCell<bool>>)>,
}

impl State {
    fn key(&self, r: &mut Reader<'_>, nic: usize) -> u32 {
        let b = r.u8();
        let mine: Vec<u32> = self
            .mrs
            .keys()
            .filter(|(n, _)| *n == nic)
            .map(|&(_, k)| k)
            .collect();
        if b < 0xc0 && !mine.is_empty() {
            mine[usize::from(b) % mine.len()]
        } else if b < 0xf0 {
            u32::from(b % 16)
        } else {
            r.u32()
        }
    }

    fn window(r: &mut Reader<'_>, size: u64) -> (u64, usize) {
        let b = r.u8();
        let off = if b < 0xe0 {
            u64::from(r.u32()) % size
        } else if b < 0xf0 {
            size.saturating_sub(u64::from(r.u8()))
        } else {
            r.u64()
        };
        (off, 1 + usize::from(r.u8()))
    }

    fn export(&mut self, r: &mut Reader<'_>) {
        let n = 1 + r.pick(3);
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

    fn register(&mut self, r: &mut Reader<'_>) {
        let nic = r.pick(2);
        if self.bufs.is_empty() || r.u8() >= 0xf0 {
            let f = File::other("memfd");
            assert_eq!(self.nics[nic].register_mr(&f), Err(Errno::EINVAL));
            f.put();
            return;
        }
        let buf = r.pick(self.bufs.len());
        if let Ok(key) = self.nics[nic].register_mr(&self.bufs[buf].file) {
            let old = self.mrs.insert((nic, key), Mr { nic, buf });
            assert!(old.is_none(), "key {key} given out twice");
        }
    }

    fn dereg(&mut self, r: &mut Reader<'_>) {
        let nic = r.pick(2);
        let key = self.key(r, nic);
        let res = self.nics[nic].dereg_mr(key);
        let had = self.mrs.remove(&(nic, key)).is_some();
        assert_eq!(res.is_ok(), had, "dereg_mr({key}) on nic {nic}: {res:?}");
    }

    fn arm(&mut self, r: &mut Reader<'_>) {
        let inside = if r.u8() & 1 == 0 && !self.mrs.is_empty() {
            let (&(nic, key), _) = self.mrs.iter().nth(r.pick(self.mrs.len())).expect("mr");
            Inside::Dereg(nic, key)
        } else {
            Inside::Revoke(r.u8())
        };
        let (rig, dev, proc, efd, nics) = (
            self.rig,
            self.dev.clone(),
            self.proc.clone(),
            self.efd,
            self.nics.clone(),
        );
        let ran = Rc::new(RefCell::new(false));
        let ran2 = ran.clone();
        let guard = points::on("odp.access.unlocked", move || {
            if *ran2.borrow() {
                return;
            }
            *ran2.borrow_mut() = true;
            match inside {
                Inside::Dereg(nic, key) => {
                    let _ = nics[nic].dereg_mr(key);
                }
                Inside::Revoke(what) => {
                    if let Some(d) = dev.borrow().as_ref() {
                        revoke(rig, d, &proc, efd, what, true);
                    }
                }
            }
        });
        self.hook = Some((guard, inside, ran));
    }

    fn access(&mut self, r: &mut Reader<'_>) {
        let nic = r.pick(2);
        let key = self.key(r, nic);
        let write = r.u8() & 1 == 0;
        let fill = r.u8();
        let mr = self.mrs.get(&(nic, key)).copied();
        let size = mr.map_or(0x1000, |m| self.bufs[m.buf].size);
        let (off, n) = Self::window(r, size);
        let data: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
        let hook = self.hook.take();
        let c = if write {
            self.nics[nic].write(key, off, &data)
        } else {
            let mut back = vec![0u8; n];
            self.nics[nic].read(key, off, &mut back)
        };
        // What the hook did inside the access, if it ran.
        let mut dereg_inside = false;
        if let Some((guard, inside, ran)) = hook {
            drop(guard);
            if *ran.borrow() {
                if let Inside::Dereg(n2, k2) = inside {
                    let gone = self.mrs.remove(&(n2, k2)).is_some();
                    dereg_inside = gone && (n2, k2) == (nic, key);
                }
            }
        }
        let Some(mr) = mr else {
            assert_eq!(c, Completion::BadKey, "access to unregistered key {key}");
            return;
        };
        if dereg_inside {
            assert_eq!(
                c,
                Completion::BadKey,
                "an access to a region deregistered before it took the lock"
            );
            return;
        }
        let b = &self.bufs[mr.buf];
        let past = off.checked_add(n as u64).is_none_or(|e| e > b.size);
        if past {
            assert_eq!(
                c,
                Completion::OutOfBounds,
                "{n} bytes at {off:#x} of {:#x}",
                b.size
            );
            return;
        }
        assert_ne!(c, Completion::BadKey, "registered key {key}");
        assert_ne!(
            c,
            Completion::OutOfBounds,
            "{n} bytes at {off:#x} of {:#x}",
            b.size
        );
        if c != Completion::Success {
            return;
        }
        assert!(
            self.rig.decodes(),
            "Success while gpu0 does not decode memory"
        );
        assert_eq!(b.open, self.open, "Success on a buffer of a closed device");
        if write {
            check_landed(self.rig, 2, &b.ranges, off, &data);
            let mut back = vec![0u8; n];
            let c2 = self.nics[nic].read(key, off, &mut back);
            assert_eq!(c2, Completion::Success, "read right after a Success write");
            assert_eq!(back, data, "read back what was written");
        }
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
        let off = self.dev.borrow().is_none()
            || (!self.rig.decodes() && !self.rig.suspended_live(self.dev.borrow().as_ref()));
        for (&(nic, key), mr) in &self.mrs {
            if off || self.bufs[mr.buf].open != self.open {
                assert!(
                    !self.nics[nic].is_mapped(key),
                    "region {key} of nic {} mapped while gpu0 does not decode memory or was \
                     closed",
                    mr.nic
                );
            }
        }
    }
}

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    let rig = rig();
    let proc = Rc::new(Process::new());
    let efd = install_eventfd(&proc);
    let nics = Rc::new([
        OdpNic::new(rig.fabric.clone(), rig.nic),
        OdpNic::new(rig.fabric.clone(), rig.acc),
    ]);
    let mut st = State {
        rig,
        proc,
        efd,
        dev: Rc::new(RefCell::new(Some(rig.open()))),
        open: 0,
        nics,
        bufs: Vec::new(),
        mrs: BTreeMap::new(),
        hook: None,
    };
    let mut r = Reader::new(data);
    let mut ops = 0;
    while !r.done() && ops < 64 {
        ops += 1;
        match r.u8() % 11 {
            0 => {
                if st.bufs.len() < 8 {
                    st.export(&mut r);
                }
            }
            1 | 2 => st.register(&mut r),
            3 => st.dereg(&mut r),
            4..=6 => st.access(&mut r),
            7 | 8 => {
                let what = r.u8();
                if let Some(d) = st.dev.borrow().as_ref() {
                    revoke(rig, d, &st.proc, st.efd, what, true);
                }
            }
            9 => st.arm(&mut r),
            _ => st.reopen(),
        }
        st.check();
    }
    st.hook = None;
    for (nic, key) in std::mem::take(&mut st.mrs).into_keys() {
        st.nics[nic]
            .dereg_mr(key)
            .expect("dereg a registered region");
    }
    for b in st.bufs.drain(..) {
        b.file.put();
    }
    if let Some(d) = st.dev.borrow_mut().take() {
        d.close();
    }
    rig.settle(&st.proc);
});
