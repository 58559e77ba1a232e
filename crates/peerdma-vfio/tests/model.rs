//! Model checks: a revoke against release, map, unmap, importer invalidation callbacks and
//! importer deregistration, with every interleaving of the emulated kernel's own code
//! explored by [loom](https://docs.rs/loom).
//!
//! Built with the `model` feature, every lock, condition variable and shared atomic the
//! emulated kernel uses comes from loom (`peerdma_pci::sync`), so each of these models runs
//! the real vfio, dma-buf, iommufd, ODP and IOMMU code, not a copy of it. Loom runs each model
//! once per distinct schedule, exhaustively: every order of the steps that touch the same
//! lock or atomic, leaving out (by loom's partial-order reduction) schedules that only
//! reorder independent steps. `PEERDMA_MODEL_PREEMPTIONS=N` bounds the preemptions (switches
//! away from a thread that could have gone on) for bigger models; by default there is no
//! bound. A deadlock (every thread blocked — a revoke waiting for a mapping nobody will give
//! back) fails the model, as does any assertion in any schedule.
//!
//! Not modelled: `static` atomics and the counters of the P2PDMA cache and the router, which
//! stay `std`'s (they order nothing), and time (a wait never times out under loom).
//!
//! Run: `cargo test --release -p peerdma-vfio --features model --test model`
//! (`-- --nocapture` prints how many schedules each model ran).
//!
//! Two models replay the races the interleaving tests in `vfio.rs` pin down at one point
//! each; here no point is named, and both fail on the code before their fixes:
//! [`odp_access_against_deregistration`] (the access's mapping on a deregistered region:
//! the next revoke deadlocks) and [`iommufd_map_against_a_reset`] (an area dead before it
//! was mapped: DMA lands while revoked).

#![cfg(feature = "model")]

use std::sync::atomic::{AtomicUsize, Ordering};

use loom::thread;
use peerdma_dma::Direction;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Process, ResvGuard, SgTable};
use peerdma_pci::sync::{Arc, Mutex, loom};
use peerdma_pci::{Bdf, DmaAddr, Errno, regs};
use peerdma_uapi::feature::DmaBufRequest;
use peerdma_vfio::iommufd::Iommufd;
use peerdma_vfio::rdma::{Completion, OdpNic};
use peerdma_vfio::testbed::{Testbed, testbed};
use peerdma_vfio::{DeviceFd, VfioPci};

const DIR: Direction = Direction::Bidirectional;

/// Runs `f` under loom in every schedule up to the preemption bound; prints the count.
fn check(name: &str, f: impl Fn() + Send + Sync + 'static) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    // `none`: no bound (every schedule).
    let bound: Option<usize> = match std::env::var("PEERDMA_MODEL_PREEMPTIONS") {
        Ok(v) if v == "none" => None,
        Ok(v) => Some(
            v.parse()
                .expect("PEERDMA_MODEL_PREEMPTIONS: a number or none"),
        ),
        Err(_) => None,
    };
    let mut b = loom::model::Builder::new();
    b.preemption_bound = bound;
    b.max_branches = 1_000_000;
    let start = std::time::Instant::now();
    RUNS.store(0, Ordering::SeqCst);
    let f = Arc::new(f);
    b.check(move || {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let f = f.clone();
        spawn(move || f()).join().unwrap();
    });
    let bound = bound.map_or("any number of".to_string(), |n| format!("at most {n}"));
    eprintln!(
        "model {name}: {} schedules with {bound} preemptions, all passed, in {:.1} s",
        RUNS.load(Ordering::SeqCst),
        start.elapsed().as_secs_f64()
    );
}

/// A model thread with room for the emulated kernel's call chains (an unoptimised build
/// overflows loom's default coroutine stack). The model's own body runs on one too.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(f)
        .unwrap()
}

/// gpu0 bound and open with one 16 KiB buffer of BAR 2 exported; the buffer's fd is in
/// `proc`, and `file` is one more reference to it.
struct Rig {
    t: Testbed,
    proc: Process,
    fd: i32,
    file: Arc<File>,
    dev: Arc<DeviceFd>,
    vfio: VfioPci,
}

fn rig() -> Rig {
    let t = testbed().unwrap();
    let vfio = VfioPci::bind(&t.env, t.gpu).unwrap();
    let dev = Arc::new(vfio.open().unwrap());
    let proc = Process::new();
    let req = DmaBufRequest::new(2, vec![(0, 0x4000)]);
    let fd = dev.feature(&proc, &req.to_bytes()).unwrap();
    let file = proc.dma_buf_get(fd).unwrap();
    Rig {
        t,
        proc,
        fd,
        file,
        dev,
        vfio,
    }
}

fn memory(d: &DeviceFd, on: bool) {
    let v: u16 = if on { regs::COMMAND_MEMORY } else { 0 };
    d.config_write(regs::COMMAND, &v.to_le_bytes()).unwrap();
}

/// What the first bytes of gpu0's BAR 2 hold.
fn bar2(t: &Testbed, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    t.fabric.bar_peek(t.gpu, 2, 0, &mut b).unwrap();
    b
}

/// A DMA-API importer (nic0, bus addresses) that unmaps when told.
struct Importer {
    att: Arc<Attachment>,
    table: Arc<Mutex<Option<SgTable>>>,
}

fn import(f: &Arc<File>, dev: Bdf) -> Importer {
    let table: Arc<Mutex<Option<SgTable>>> = Arc::new(Mutex::new(None));
    let (t2, file) = (table.clone(), Arc::clone(f));
    let ops = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
            if let Some(t) = t2.lock().unwrap().take() {
                file.dmabuf().unwrap().unmap_attachment(a, t, DIR, g);
            }
        })),
        stub: false,
    };
    let att = f
        .dmabuf()
        .unwrap()
        .dynamic_attach(Some(dev), Some(ops))
        .unwrap();
    Importer { att, table }
}

impl Importer {
    /// Maps under the lock; the first DMA address, or the errno.
    fn map(&self, f: &File) -> Result<DmaAddr, Errno> {
        let b = f.dmabuf().unwrap();
        let g = b.lock();
        let t = b.map_attachment(&self.att, DIR, &g)?;
        let addr = t.entries()[0].addr;
        *self.table.lock().unwrap() = Some(t);
        Ok(addr)
    }
    /// A DMA write through its mapping, if it still has one (holding it, so an
    /// invalidation waits for the DMA to finish, as the importer contract asks).
    fn dma(&self, t: &Testbed, data: &[u8]) {
        if let Some(tbl) = self.table.lock().unwrap().as_ref() {
            t.fabric
                .dma_write(t.nic0, tbl.entries()[0].addr, data)
                .unwrap();
        }
    }
    /// Gives its mapping back, if it has one.
    fn unmap(&self, f: &File) {
        let b = f.dmabuf().unwrap();
        let g = b.lock();
        if let Some(t) = self.table.lock().unwrap().take() {
            b.unmap_attachment(&self.att, t, DIR, &g);
        }
    }
}

/// Memory decode off on one thread, the buffer's last references put on another: the
/// release and the revoke each finish, the buffer is unlinked once, the registration
/// reference comes back, and the device closes clean.
#[test]
fn revoke_against_release() {
    check("revoke_against_release", || {
        let r = rig();
        let dev = r.dev.clone();
        let t = spawn(move || memory(&dev, false));
        r.proc.close(r.fd).unwrap();
        r.file.put();
        t.join().unwrap();
        assert_eq!(r.vfio.dmabuf_count(), 0);
        assert_eq!(r.vfio.registration().count(), 2, "bind and the open fd");
        assert_eq!(r.vfio.violation_count(), 0);
    });
}

/// A revoke against an importer that maps, DMAs and unmaps: whichever order, the revoke
/// finishes, the importer's DMA lands (it runs only while the mapping is live; the watch
/// checks every landing), nothing is mapped once both are done, and a DMA through the old
/// address then does not reach the BAR.
#[test]
fn revoke_against_map_dma_and_unmap() {
    check("revoke_against_map_dma_and_unmap", || {
        let r = rig();
        let imp = import(&r.file, r.t.nic0);
        let dev = r.dev.clone();
        let t = spawn(move || memory(&dev, false));
        let mapped = imp.map(&r.file);
        if mapped.is_ok() {
            // As the importer contract asks: DMA only through a mapping it still holds,
            // and the invalidation waits for a DMA in flight (both take `table`).
            imp.dma(&r.t, b"in time?");
            imp.unmap(&r.file);
        }
        t.join().unwrap();
        assert_eq!(r.vfio.live_mappings(), 0);
        let again = imp.map(&r.file);
        assert!(
            again == Err(Errno::ENODEV),
            "revoked now, but the map gave {again:?}"
        );
        if let Ok(a) = mapped {
            let _ = r.t.fabric.dma_write(r.t.nic0, a, b"too late");
            assert_ne!(bar2(&r.t, 8), b"too late");
        }
        assert_eq!(r.vfio.violation_count(), 0, "{:?}", r.vfio.violations());
        r.file.dmabuf().unwrap().detach(&imp.att);
    });
}

/// A revoke against an importer that was mapped and now unmaps and detaches on its own: the
/// revoke's invalidation and the importer's unmap never both give the mapping back, and
/// the revoke never waits for a mapping that is gone.
#[test]
fn revoke_against_unmap_and_detach() {
    check("revoke_against_unmap_and_detach", || {
        let r = rig();
        let imp = import(&r.file, r.t.nic0);
        imp.map(&r.file).unwrap();
        let dev = r.dev.clone();
        let t = spawn(move || memory(&dev, false));
        imp.unmap(&r.file);
        r.file.dmabuf().unwrap().detach(&imp.att);
        t.join().unwrap();
        assert_eq!(r.vfio.live_mappings(), 0);
        assert_eq!(r.file.dmabuf().unwrap().attachments().len(), 0);
        assert_eq!(r.vfio.violation_count(), 0);
    });
}

/// Regression model of the first race: an ODP access (lookup, then map under the lock)
/// against the region's deregistration. Before the fix the access could map on a region
/// deregistered in between; the revoke after it then waited forever (a loom deadlock).
#[test]
fn odp_access_against_deregistration() {
    check("odp_access_against_deregistration", || {
        let r = rig();
        let nic = Arc::new(OdpNic::new(r.t.fabric.clone(), r.t.nic1));
        let key = nic.register_mr(&r.file).unwrap();
        let n2 = nic.clone();
        let t = spawn(move || n2.write(key, 0, b"odp data"));
        let _ = nic.dereg_mr(key);
        let c = t.join().unwrap();
        assert!(
            matches!(c, Completion::Success | Completion::BadKey),
            "{c:?}"
        );
        assert_eq!(r.vfio.live_mappings(), 0, "nothing mapped on a gone region");
        memory(&r.dev, false);
        assert_eq!(r.file.dmabuf().unwrap().attachments().len(), 0);
        assert_eq!(r.vfio.violation_count(), 0);
    });
}

/// Regression model of the second race: iommufd's `map_file` against a reset (revoke and
/// unrevoke). Before the fix a reset between the attach and the map marked the area dead
/// before it was mapped, and no later revoke reached it: DMA through it landed while
/// revoked. Whatever the order, a later revoke must kill the area, a DMA through it must
/// fault, and the unmap must leave no IOMMU entry.
#[test]
fn iommufd_map_against_a_reset() {
    check("iommufd_map_against_a_reset", || {
        let r = rig();
        let ifd = Iommufd::open(&r.t.env).unwrap();
        let ioas = ifd.ioas_alloc().unwrap();
        ifd.attach(r.t.nic1, ioas).unwrap();
        let dev = r.dev.clone();
        let t = spawn(move || dev.reset().unwrap());
        let iova = 0x100_0000;
        let mapped = ifd.map_file(ioas, &r.file, 0, 0x4000, iova);
        t.join().unwrap();
        if mapped.is_ok() {
            memory(&r.dev, false);
            assert_eq!(
                ifd.is_dead(ioas, iova),
                Some(true),
                "a revoke kills the area"
            );
            let dma = r.t.fabric.dma_write(r.t.nic1, DmaAddr(iova), b"LEAKED!!");
            assert!(dma.is_err(), "DMA through a revoked area faults");
            ifd.unmap(ioas, iova, 0x4000).unwrap();
        }
        assert_ne!(bar2(&r.t, 8), b"LEAKED!!");
        let iommu = r.t.env.dma.iommu().unwrap();
        if let peerdma_dma::iommu::Attach::Paging(d) = iommu.attachment(r.t.nic1) {
            assert_eq!(iommu.entries(d), 0, "no IOMMU entries left behind");
        }
        assert_eq!(r.vfio.violation_count(), 0);
        assert_eq!(r.vfio.live_mappings(), 0);
    });
}

/// The device closed on one thread while an ODP NIC accesses the buffer on another: the
/// close revokes for good, the access lands only while the buffer was live, and after both
/// nothing is mapped and a new access is refused.
#[test]
fn close_against_an_odp_access() {
    check("close_against_an_odp_access", || {
        let r = rig();
        let nic = Arc::new(OdpNic::new(r.t.fabric.clone(), r.t.nic1));
        let key = nic.register_mr(&r.file).unwrap();
        let n2 = nic.clone();
        let t = spawn(move || n2.write(key, 0, b"odp data"));
        let Rig {
            dev, vfio, file, ..
        } = r;
        Arc::into_inner(dev).unwrap().close();
        let _ = t.join().unwrap();
        assert_eq!(vfio.live_mappings(), 0);
        assert_ne!(nic.write(key, 0, b"closed!!"), Completion::Success);
        nic.dereg_mr(key).unwrap();
        assert_eq!(vfio.violation_count(), 0);
        file.put();
    });
}

/// Three threads: a revoke, an ODP access and the region's deregistration, in every order.
/// The revoke finishes, nothing stays mapped, and the buffer is left with no attachment.
#[test]
fn revoke_odp_access_and_deregistration() {
    check("revoke_odp_access_and_deregistration", || {
        let r = rig();
        let nic = Arc::new(OdpNic::new(r.t.fabric.clone(), r.t.nic1));
        let key = nic.register_mr(&r.file).unwrap();
        let n2 = nic.clone();
        let access = spawn(move || n2.write(key, 0, b"odp data"));
        let dev = r.dev.clone();
        let revoke = spawn(move || memory(&dev, false));
        let _ = nic.dereg_mr(key);
        let c = access.join().unwrap();
        revoke.join().unwrap();
        assert!(
            matches!(
                c,
                Completion::Success | Completion::BadKey | Completion::MapFailed(Errno::ENODEV)
            ),
            "{c:?}"
        );
        assert_eq!(r.vfio.live_mappings(), 0);
        assert_eq!(r.file.dmabuf().unwrap().attachments().len(), 0);
        assert_eq!(r.vfio.violation_count(), 0);
    });
}

/// Three threads: the device's close, an iommufd `map_file` and its `unmap`, in every
/// order. The close revokes for good; whatever mapped is dead or unmapped, a DMA through
/// the IOVA faults, and once unmapped no IOMMU entry is left.
#[test]
fn close_against_iommufd_map_and_unmap() {
    check("close_against_iommufd_map_and_unmap", || {
        let r = rig();
        let ifd = Arc::new(Iommufd::open(&r.t.env).unwrap());
        let ioas = ifd.ioas_alloc().unwrap();
        ifd.attach(r.t.nic1, ioas).unwrap();
        let iova = 0x100_0000;
        let (i2, f2) = (ifd.clone(), r.file.clone());
        let map = spawn(move || i2.map_file(ioas, &f2, 0, 0x4000, iova));
        let i3 = ifd.clone();
        let unmap = spawn(move || i3.unmap(ioas, iova, 0x4000));
        let Rig {
            t, dev, vfio, file, ..
        } = r;
        Arc::into_inner(dev).unwrap().close();
        let _ = map.join().unwrap();
        let _ = unmap.join().unwrap();
        let dma = t.fabric.dma_write(t.nic1, DmaAddr(iova), b"LEAKED!!");
        assert!(dma.is_err(), "no DMA through the IOAS after the close");
        assert_ne!(bar2(&t, 8), b"LEAKED!!");
        let _ = ifd.unmap(ioas, iova, 0x4000);
        let iommu = t.env.dma.iommu().unwrap();
        if let peerdma_dma::iommu::Attach::Paging(d) = iommu.attachment(t.nic1) {
            assert_eq!(iommu.entries(d), 0, "no IOMMU entries left behind");
        }
        assert_eq!(vfio.live_mappings(), 0);
        assert_eq!(vfio.violation_count(), 0);
        file.put();
    });
}

/// A CPU store through a BAR mapping against memory decoding turned off: in every order,
/// once the `COMMAND` write has returned, the BAR does not change — the store either landed
/// before (and the snapshot shows it) or died of `SIGBUS`. Fails if the page fault's check
/// and the store are not made under one hold of `memory_lock`.
#[test]
fn cpu_store_against_memory_off() {
    check("cpu_store_against_memory_off", || {
        let r = rig();
        let dev = r.dev.clone();
        dev.mmap_check(2 << 40, 4096, true).unwrap();
        let t = spawn(move || dev.cpu_access(2, 0, &mut [0xa5; 4], true));
        memory(&r.dev, false);
        let after_off = bar2(&r.t, 4);
        let res = t.join().unwrap();
        assert_eq!(
            bar2(&r.t, 4),
            after_off,
            "a store landed after memory went off"
        );
        if res.is_ok() {
            assert_eq!(after_off, vec![0xa5; 4]);
        }
    });
}
