//! The dma-buf core, rule by rule (export, fds and lifetime, attach, pin, map, invalidate).

#![allow(clippy::many_single_char_names)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ALL, BarExporter, NO_PIN, Rig, rig};
use peerdma_dma::Direction;
use peerdma_dmabuf::buf::{FILE_FLAGS_KEPT, ops};
use peerdma_dmabuf::sgt::SgKind;
use peerdma_dmabuf::{
    Attachment, DmaBuf, ExportInfo, Fence, File, ImporterOps, Process, ResvGuard, Usage, export,
};
use peerdma_pci::{Bdf, Errno};

const DIR: Direction = Direction::Bidirectional;

fn exporter(r: &Rig, provides: u32) -> Arc<BarExporter> {
    BarExporter::new(
        r,
        vec![r.range(0, 0x4000), r.range(0x8000, 0x2000)],
        provides,
    )
}

fn file_of(e: &Arc<BarExporter>) -> Arc<File> {
    export(ExportInfo {
        exp_name: "bar".into(),
        size: 0x6000,
        flags: 0o2,
        ops: Some(e.clone()),
        has_priv: true,
    })
    .unwrap()
}

fn buf(f: &Arc<File>) -> &DmaBuf {
    f.dmabuf().unwrap()
}

/// Importer ops counting their invalidations (and checking the lock they get).
fn dynamic(p2p: bool, count: &Arc<AtomicUsize>) -> ImporterOps {
    let c = count.clone();
    ImporterOps {
        allow_peer2peer: p2p,
        invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
            a.check_locked(g).unwrap();
            c.fetch_add(1, Ordering::SeqCst);
        })),
        stub: false,
    }
}

// ---- 3.1 export, fd, lifetime -------------------------------------------------------------

#[test]
fn export_requires_ops_priv_map_unmap_release() {
    let r = rig(true);
    let info = |ops: Option<Arc<BarExporter>>, has_priv| ExportInfo {
        exp_name: "x".into(),
        size: 4096,
        flags: 0,
        ops: ops.map(|o| o as Arc<dyn peerdma_dmabuf::DmaBufOps>),
        has_priv,
    };
    assert_eq!(export(info(None, true)).unwrap_err(), Errno::EINVAL);
    assert_eq!(
        export(info(Some(exporter(&r, ALL)), false)).unwrap_err(),
        Errno::EINVAL
    );
    for missing in [ops::MAP, ops::UNMAP, ops::RELEASE] {
        assert_eq!(
            export(info(Some(exporter(&r, ALL & !missing)), true)).unwrap_err(),
            Errno::EINVAL
        );
    }
}

#[test]
fn export_wants_pin_and_unpin_both_or_neither() {
    let r = rig(true);
    for (p, ok) in [
        (ALL, true),
        (NO_PIN, true),
        (NO_PIN | ops::PIN, false),
        (NO_PIN | ops::UNPIN, false),
    ] {
        let e = exporter(&r, p);
        let res = export(ExportInfo {
            exp_name: "x".into(),
            size: 1,
            flags: 0,
            ops: Some(e),
            has_priv: true,
        });
        assert_eq!(res.is_ok(), ok, "ops {p:#x}");
        if !ok {
            assert_eq!(res.unwrap_err(), Errno::EINVAL);
        }
    }
}

#[test]
fn file_keeps_only_access_mode_and_nonblock() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = export(ExportInfo {
        exp_name: "x".into(),
        size: 1,
        flags: 0o2 | 0o4000 | 0o2000000 | 0o100,
        ops: Some(e),
        has_priv: true,
    })
    .unwrap();
    assert_eq!(f.flags(), 0o2 | 0o4000);
    assert_eq!(f.flags() & !FILE_FLAGS_KEPT, 0);
    assert_eq!((buf(&f).size(), buf(&f).exp_name()), (1, "x"));
}

#[test]
fn lseek_tells_the_size_and_mmap_is_refused() {
    use peerdma_dmabuf::buf::whence;
    let r = rig(true);
    let f = file_of(&exporter(&r, ALL));
    let b = buf(&f);
    assert_eq!(b.llseek(0, whence::END), Ok(b.size()));
    assert_eq!(b.llseek(0, whence::SET), Ok(0));
    assert_eq!(b.llseek(0, whence::CUR), Err(Errno::EINVAL));
    assert_eq!(b.llseek(4096, whence::SET), Err(Errno::EINVAL));
    assert_eq!(b.llseek(-1, whence::END), Err(Errno::EINVAL));
    assert_eq!(b.llseek(0, 7), Err(Errno::EINVAL));
    assert_eq!(b.mmap(0, 4096), Err(Errno::EINVAL));
}

#[test]
fn fds_lowest_free_from_3_cloexec_and_exec() {
    let r = rig(true);
    let p = Process::new();
    let e = exporter(&r, ALL);
    let a = p.install(file_of(&e), true).unwrap();
    let b = p.install(file_of(&e), false).unwrap();
    assert_eq!((a, b), (3, 4));
    assert!(p.cloexec(3).unwrap());
    assert!(!p.cloexec(4).unwrap());
    p.close(3).unwrap();
    assert_eq!(p.install(file_of(&e), false).unwrap(), 3);
    assert_eq!(e.releases(), 1);
    let c = p.install(file_of(&e), true).unwrap();
    p.exec();
    assert_eq!(p.fds(), vec![0, 1, 2, 3, 4]);
    assert_eq!(p.cloexec(c).unwrap_err(), Errno::EBADF);
    assert_eq!(e.releases(), 2);
}

#[test]
fn install_consumes_the_reference_except_on_emfile() {
    let r = rig(true);
    let p = Process::with_limit(4);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let fd = p.install(f.clone(), false).unwrap();
    assert_eq!((fd, f.refs()), (3, 1));
    let (err, back) = p.install(file_of(&e), false).unwrap_err();
    assert_eq!((err, back.refs()), (Errno::EMFILE, 1));
    back.put();
    assert_eq!(e.releases(), 1);
    p.close(fd).unwrap();
    assert_eq!(e.releases(), 2);
    assert_eq!(p.close(fd).unwrap_err(), Errno::EBADF);
}

#[test]
fn get_is_ebadf_for_a_bad_fd_and_einval_for_another_file() {
    let r = rig(true);
    let p = Process::new();
    assert_eq!(p.dma_buf_get(42).unwrap_err(), Errno::EBADF);
    assert_eq!(p.dma_buf_get(-1).unwrap_err(), Errno::EBADF);
    let other = File::other("notes.txt");
    let fd = p.install(other.clone(), false).unwrap();
    assert_eq!(p.dma_buf_get(fd).unwrap_err(), Errno::EINVAL);
    assert_eq!(other.refs(), 1, "the reference taken by get was dropped");
    let e = exporter(&r, ALL);
    let fd = p.install(file_of(&e), false).unwrap();
    let f = p.dma_buf_get(fd).unwrap();
    assert_eq!(f.refs(), 2);
    f.put();
}

#[test]
fn release_runs_once_after_the_last_reference_and_get_active_fails_after() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let p = Process::new();
    let fd = p.install(file_of(&e), false).unwrap();
    let f = p.dma_buf_get(fd).unwrap();
    let weak = f.clone();
    p.close(fd).unwrap();
    assert_eq!(e.releases(), 0, "the importer's reference keeps it alive");
    let g = weak.get_active().unwrap();
    g.put();
    f.put();
    assert_eq!(e.releases(), 1);
    assert!(buf(&weak).is_released());
    assert!(weak.get_active().is_none());
    assert_eq!(e.releases(), 1);
}

#[test]
fn racing_puts_release_exactly_once() {
    let r = rig(true);
    for _ in 0..50 {
        let e = exporter(&r, ALL);
        let f = file_of(&e);
        let refs: Vec<Arc<File>> = (0..7).map(|_| f.get()).collect();
        let hs: Vec<_> = refs
            .into_iter()
            .map(|x| std::thread::spawn(move || x.put()))
            .collect();
        let probe = f.clone();
        f.put();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(e.releases(), 1);
        assert!(probe.get_active().is_none());
    }
}

#[test]
fn attachments_hold_no_file_reference() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let _a = buf(&f).attach(r.nic0).unwrap();
    assert_eq!(f.refs(), 1);
}

// ---- 3.2 attach --------------------------------------------------------------------------

#[test]
fn attach_refuses_no_device_and_leaves_ops_without_callback_to_the_exporter() {
    let r = rig(true);
    let f = file_of(&exporter(&r, ALL));
    assert_eq!(
        buf(&f).dynamic_attach(None, None).unwrap_err(),
        Errno::EINVAL
    );
    let no_cb = ImporterOps {
        allow_peer2peer: true,
        invalidate: None,
        stub: false,
    };
    assert!(buf(&f).attachments().is_empty());
    // A pinned importer (no invalidation callback): 7.2's core takes it; this exporter
    // accepts everything, so the attachment is made, dynamic but not revocable.
    let a = buf(&f).dynamic_attach(Some(r.nic0), Some(no_cb)).unwrap();
    assert!(a.is_dynamic() && a.peer2peer && !a.is_revocable());
    assert_eq!(buf(&f).attachments().len(), 1);
}

#[test]
fn attach_flags_static_dynamic_p2p_revocable() {
    let r = rig(true);
    let f = file_of(&exporter(&r, ALL));
    let n = Arc::new(AtomicUsize::new(0));
    let s = buf(&f).attach(r.nic0).unwrap();
    assert!(!s.is_dynamic() && !s.peer2peer && !s.is_revocable());
    let d = buf(&f)
        .dynamic_attach(Some(r.nic0), Some(dynamic(true, &n)))
        .unwrap();
    assert!(d.is_dynamic() && d.peer2peer && d.is_revocable());
    let d2 = buf(&f)
        .dynamic_attach(Some(r.nic1), Some(dynamic(false, &n)))
        .unwrap();
    assert!(!d2.peer2peer);
    let stub = ImporterOps {
        stub: true,
        ..dynamic(true, &n)
    };
    let pinned = buf(&f).dynamic_attach(Some(r.nic0), Some(stub)).unwrap();
    assert!(pinned.is_dynamic() && !pinned.is_revocable());
    // Newest first.
    let order: Vec<Bdf> = buf(&f).attachments().iter().map(|a| a.dev).collect();
    assert_eq!(order, vec![r.nic0, r.nic1, r.nic0, r.nic0]);
    assert!(Arc::ptr_eq(&buf(&f).attachments()[0], &pinned));
}

#[test]
fn exporter_attach_runs_without_the_lock_and_its_error_propagates() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    buf(&f).attach(r.nic0).unwrap();
    *e.attach_result.lock().unwrap() = Err(Errno::ENODEV);
    assert_eq!(buf(&f).attach(r.nic1).unwrap_err(), Errno::ENODEV);
    assert_eq!(*e.attach_saw_lock_free.lock().unwrap(), vec![true, true]);
    assert_eq!(buf(&f).attachments().len(), 1);
}

#[test]
fn detach_removes_and_calls_the_exporter() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let a = buf(&f).attach(r.nic0).unwrap();
    let b = buf(&f).attach(r.nic1).unwrap();
    buf(&f).detach(&a);
    assert_eq!(buf(&f).attachments().len(), 1);
    assert!(Arc::ptr_eq(&buf(&f).attachments()[0], &b));
    assert_eq!(e.log(), ["attach", "attach", "detach"]);
}

// ---- 3.3 pin / unpin ---------------------------------------------------------------------

#[test]
fn pin_and_unpin_call_the_exporter_under_the_lock() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let n = Arc::new(AtomicUsize::new(0));
    let d = buf(&f)
        .dynamic_attach(Some(r.nic0), Some(dynamic(true, &n)))
        .unwrap();
    {
        let g = buf(&f).lock();
        buf(&f).pin(&d, &g).unwrap();
        buf(&f).unpin(&d, &g);
    }
    *e.pin_result.lock().unwrap() = Err(Errno::ENOSPC);
    let g = buf(&f).lock();
    assert_eq!(buf(&f).pin(&d, &g).unwrap_err(), Errno::ENOSPC);
    assert_eq!(e.log(), ["attach", "pin", "unpin", "pin"]);
}

#[test]
fn pin_without_exporter_pin_succeeds_doing_nothing() {
    let r = rig(true);
    let e = exporter(&r, NO_PIN);
    let f = file_of(&e);
    let n = Arc::new(AtomicUsize::new(0));
    let d = buf(&f)
        .dynamic_attach(Some(r.nic0), Some(dynamic(true, &n)))
        .unwrap();
    let g = buf(&f).lock();
    buf(&f).pin(&d, &g).unwrap();
    buf(&f).unpin(&d, &g);
    assert_eq!(e.log(), ["attach"]);
}

#[test]
fn pin_with_another_buffers_lock_is_refused() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let (f, other) = (file_of(&e), file_of(&e));
    let n = Arc::new(AtomicUsize::new(0));
    let d = buf(&f)
        .dynamic_attach(Some(r.nic0), Some(dynamic(true, &n)))
        .unwrap();
    let g = buf(&other).lock();
    assert_eq!(buf(&f).pin(&d, &g).unwrap_err(), Errno::EINVAL);
    buf(&f).unpin(&d, &g);
    assert_eq!(e.log(), ["attach"]);
}

#[test]
fn static_importer_of_a_pinning_exporter_is_pinned_around_its_mapping() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let a = buf(&f).attach(r.nic0).unwrap();
    let g = buf(&f).lock();
    let t = buf(&f).map_attachment(&a, DIR, &g).unwrap();
    assert_eq!(t.kind(), SgKind::BusAddr);
    buf(&f).unmap_attachment(&a, t, DIR, &g);
    assert_eq!(e.log(), ["attach", "pin", "map", "unmap", "unpin"]);
    r.assert_clean();
}

#[test]
fn pin_on_map_failure_stops_before_map_and_map_failure_unpins() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let a = buf(&f).attach(r.nic0).unwrap();
    let bad = buf(&f).attach(r.nic2).unwrap();
    let g = buf(&f).lock();
    *e.pin_result.lock().unwrap() = Err(Errno::EBUSY);
    assert_eq!(
        buf(&f).map_attachment(&a, DIR, &g).unwrap_err(),
        Errno::EBUSY
    );
    *e.pin_result.lock().unwrap() = Ok(());
    // nic2 cannot reach the provider: the exporter's map fails, and the pin is undone.
    assert_eq!(
        buf(&f).map_attachment(&bad, DIR, &g).unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(e.log(), ["attach", "attach", "pin", "pin", "map", "unpin"]);
    r.assert_clean();
}

#[test]
fn dynamic_importers_and_non_pinning_exporters_get_no_pin_on_map() {
    let r = rig(true);
    let n = Arc::new(AtomicUsize::new(0));
    for (provides, dynamic_importer) in [(ALL, true), (NO_PIN, false)] {
        let e = exporter(&r, provides);
        let f = file_of(&e);
        let a = if dynamic_importer {
            buf(&f)
                .dynamic_attach(Some(r.nic1), Some(dynamic(true, &n)))
                .unwrap()
        } else {
            buf(&f).attach(r.nic1).unwrap()
        };
        let g = buf(&f).lock();
        let t = buf(&f).map_attachment(&a, DIR, &g).unwrap();
        assert_eq!(t.kind(), SgKind::Iova);
        buf(&f).unmap_attachment(&a, t, DIR, &g);
        assert_eq!(e.log(), ["attach", "map", "unmap"]);
    }
    r.assert_clean();
}

// ---- 3.4 map / unmap ---------------------------------------------------------------------

#[test]
fn map_with_the_wrong_lock_is_refused_before_the_exporter_runs() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let (f, other) = (file_of(&e), file_of(&e));
    let a = buf(&f).attach(r.nic0).unwrap();
    let g = buf(&other).lock();
    assert_eq!(
        buf(&f).map_attachment(&a, DIR, &g).unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(e.log(), ["attach"]);
}

#[test]
fn static_importers_wait_for_kernel_fences_dynamic_ones_do_not() {
    let r = rig(true);
    let e = exporter(&r, NO_PIN);
    let f = file_of(&e);
    let n = Arc::new(AtomicUsize::new(0));
    let s = buf(&f).attach(r.nic0).unwrap();
    let d = buf(&f)
        .dynamic_attach(Some(r.nic0), Some(dynamic(true, &n)))
        .unwrap();
    let kernel = Fence::new();
    let reader = Fence::new();
    {
        let mut g = buf(&f).lock();
        g.add_fence(kernel.clone(), Usage::Kernel);
        g.add_fence(reader.clone(), Usage::Read);
    }
    // The dynamic importer maps at once, fences or not.
    let g = buf(&f).lock();
    let t = buf(&f).map_attachment(&d, DIR, &g).unwrap();
    assert!(!kernel.is_signaled());
    buf(&f).unmap_attachment(&d, t, DIR, &g);
    drop(g);
    // The static importer waits for the kernel fence (not the reader's).
    let k = kernel.clone();
    let signaller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        k.signal();
    });
    let start = Instant::now();
    let g = buf(&f).lock();
    let t = buf(&f).map_attachment(&s, DIR, &g).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(40));
    assert!(kernel.is_signaled() && !reader.is_signaled());
    buf(&f).unmap_attachment(&s, t, DIR, &g);
    signaller.join().unwrap();
    r.assert_clean();
}

#[test]
fn the_mapping_is_real_until_unmapped() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let n = Arc::new(AtomicUsize::new(0));
    let a = buf(&f)
        .dynamic_attach(Some(r.nic1), Some(dynamic(true, &n)))
        .unwrap();
    let g = buf(&f).lock();
    let t = buf(&f).map_attachment(&a, DIR, &g).unwrap();
    // Buffer offset 0x4000 is the second range, BAR offset 0x8000.
    r.dma_write(r.nic1, &t, 0x4000, b"mapped").unwrap();
    assert_eq!(r.bar_bytes(0x8000, 6), b"mapped");
    let addr = t.dma_addr_of(0x4000).unwrap();
    buf(&f).unmap_attachment(&a, t, DIR, &g);
    assert!(r.fabric.dma_write(r.nic1, addr, b"late").is_err());
    assert_eq!(r.bar_bytes(0x8000, 6), b"mapped");
}

// ---- 3.5 invalidation --------------------------------------------------------------------

#[test]
fn invalidate_calls_dynamic_importers_only_with_the_lock() {
    let r = rig(true);
    let e = exporter(&r, ALL);
    let (f, other) = (file_of(&e), file_of(&e));
    let n = Arc::new(AtomicUsize::new(0));
    buf(&f).attach(r.nic0).unwrap();
    buf(&f)
        .dynamic_attach(Some(r.nic0), Some(dynamic(true, &n)))
        .unwrap();
    buf(&f)
        .dynamic_attach(Some(r.nic1), Some(dynamic(true, &n)))
        .unwrap();
    {
        let g = buf(&other).lock();
        assert_eq!(buf(&f).invalidate_mappings(&g).unwrap_err(), Errno::EINVAL);
    }
    assert_eq!(n.load(Ordering::SeqCst), 0);
    let g = buf(&f).lock();
    assert_eq!(buf(&f).invalidate_mappings(&g).unwrap(), 2);
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[test]
fn an_importer_drops_its_mapping_when_invalidated_and_remaps() {
    // The importer keeps its table in a slot; the callback unmaps it under the lock.
    let r = rig(true);
    let e = exporter(&r, ALL);
    let f = file_of(&e);
    let slot: Arc<Mutex<Option<peerdma_dmabuf::SgTable>>> = Arc::new(Mutex::new(None));
    let (s2, env) = (slot.clone(), r.env.clone());
    let ops = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
            if let Some(t) = s2.lock().unwrap().take() {
                peerdma_dmabuf::free_sgt(&env, a, t, DIR, g).unwrap();
            }
        })),
        stub: false,
    };
    let a = buf(&f).dynamic_attach(Some(r.nic1), Some(ops)).unwrap();
    let g = buf(&f).lock();
    *slot.lock().unwrap() = Some(buf(&f).map_attachment(&a, DIR, &g).unwrap());
    let addr = slot.lock().unwrap().as_ref().unwrap().entries()[0].addr;
    r.fabric.dma_write(r.nic1, addr, b"before").unwrap();
    buf(&f).invalidate_mappings(&g).unwrap();
    assert!(slot.lock().unwrap().is_none());
    assert!(r.fabric.dma_write(r.nic1, addr, b"after!").is_err());
    assert_eq!(r.bar_bytes(0, 6), b"before");
    r.assert_clean();
    let t = buf(&f).map_attachment(&a, DIR, &g).unwrap();
    r.dma_write(r.nic1, &t, 0, b"again!").unwrap();
    assert_eq!(r.bar_bytes(0, 6), b"again!");
    buf(&f).unmap_attachment(&a, t, DIR, &g);
    r.assert_clean();
}
