//! vfio-pci on the emulated machine: the DMA_BUF feature's errnos in the kernel's order, and
//! revocation, checked by bytes: after every revoke event DMA through the old mapping does
//! not reach the BAR, a new map gets ENODEV, and after the unrevoke point it works again.

#![allow(clippy::many_single_char_names, clippy::semicolon_if_nothing_returned)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use peerdma_dma::{Direction, DmaConfig, DmaSystem};
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Process, ResvGuard, SgTable};
use peerdma_p2pdma::P2pDma;
use peerdma_pci::{Bdf, Errno, Fabric, file, regs};
use peerdma_uapi::feature::{DmaBufRequest, O_CLOEXEC, O_RDWR, header_bytes};
use peerdma_vfio::VfioPci;
use peerdma_vfio::feature::{GET, PROBE, SET, id};

const DIR: Direction = Direction::Bidirectional;
const BAR_GIB: u64 = 64;

struct Rig {
    fabric: Arc<Fabric>,
    env: DmaEnv,
    gpu: Bdf,
    nic1: Bdf,
    nic0: Bdf,
    proc: Process,
}

/// The shared test machine ([`peerdma_vfio::testbed`]): gpu0 with AF FLR as well as PCIe FLR.
fn rig() -> Rig {
    rig_from(peerdma_vfio::testbed::PLATFORM)
}

/// A variant of the test machine, from its fabric file's text.
fn rig_from(text: &str) -> Rig {
    let t = peerdma_vfio::testbed::testbed_from(text).unwrap();
    Rig {
        fabric: t.fabric,
        env: t.env,
        gpu: t.gpu,
        nic1: t.nic1,
        nic0: t.nic0,
        proc: Process::new(),
    }
}

fn get(r: &Rig, fd: i32) -> Arc<File> {
    r.proc.dma_buf_get(fd).unwrap()
}

/// A dynamic, peer-to-peer, revocable importer that drops its mapping when told to, and
/// tries to map again from inside the callback (recording what that gave).
struct Importer {
    att: Arc<Attachment>,
    table: Arc<Mutex<Option<SgTable>>>,
    remaps: Arc<Mutex<Vec<Result<(), Errno>>>>,
}

fn import(_r: &Rig, f: &Arc<File>, dev: Bdf) -> Result<Importer, Errno> {
    let table: Arc<Mutex<Option<SgTable>>> = Arc::new(Mutex::new(None));
    let remaps = Arc::new(Mutex::new(Vec::new()));
    // A plain Arc clone: the importer's own file reference is the caller's.
    let (t2, r2, file) = (table.clone(), remaps.clone(), Arc::clone(f));
    let ops = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
            let b = file.dmabuf().unwrap();
            if let Some(t) = t2.lock().unwrap().take() {
                b.unmap_attachment(a, t, DIR, g);
                let again = b
                    .map_attachment(a, DIR, g)
                    .map(|t| b.unmap_attachment(a, t, DIR, g));
                r2.lock().unwrap().push(again);
            }
        })),
        stub: false,
    };
    let att = f.dmabuf().unwrap().dynamic_attach(Some(dev), Some(ops))?;
    Ok(Importer { att, table, remaps })
}

impl Importer {
    fn map(&self, f: &File) -> Result<(), Errno> {
        let b = f.dmabuf().unwrap();
        let g = b.lock();
        let t = b.map_attachment(&self.att, DIR, &g)?;
        *self.table.lock().unwrap() = Some(t);
        Ok(())
    }
    fn first_addr(&self) -> Option<peerdma_pci::DmaAddr> {
        self.table
            .lock()
            .unwrap()
            .as_ref()
            .map(|t| t.entries()[0].addr)
    }
}

fn export(r: &Rig, dev: &peerdma_vfio::DeviceFd, req: &DmaBufRequest) -> Result<i32, Errno> {
    dev.feature(&r.proc, &req.to_bytes())
}

/// gpu0 bound and open, with one buffer exported by [`ok_req`].
fn exported(r: &Rig) -> (VfioPci, peerdma_vfio::DeviceFd, Arc<File>) {
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let f = get(r, export(r, &d, &ok_req()).unwrap());
    (v, d, f)
}

fn ok_req() -> DmaBufRequest {
    DmaBufRequest::new(2, vec![(0, 0x4000), (0x10_000, 0x2000)])
}

/// A `LOW_POWER_ENTRY_WITH_WAKEUP` feature request with a fresh eventfd of `r`'s process.
fn wakeup_entry(r: &Rig) -> Vec<u8> {
    let efd = r
        .proc
        .install(peerdma_dmabuf::File::eventfd(), true)
        .map_err(|(e, _)| e)
        .unwrap();
    let mut entry = header_bytes(16, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
    entry.extend_from_slice(&efd.to_le_bytes());
    entry.extend_from_slice(&0u32.to_le_bytes());
    entry
}

/// Leaves low power, then a fresh importer of `f` maps it and nic1's DMA of `marker` must
/// land at the start of BAR 0; returns the importer (it gives its mapping back on close).
fn exit_and_land(r: &Rig, d: &peerdma_vfio::DeviceFd, f: &Arc<File>, marker: [u8; 8]) -> Importer {
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT)),
        Ok(0)
    );
    let imp = import(r, f, r.nic1).unwrap();
    imp.map(f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), &marker)
        .unwrap();
    assert_eq!(bar0(r, 8), marker);
    imp
}

// ---- errnos, in order ---------------------------------------------------------------------

#[test]
fn dma_buf_errnos_in_the_kernels_order() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let with = |f: &dyn Fn(&mut DmaBufRequest)| {
        let mut q = ok_req();
        f(&mut q);
        export(&r, &d, &q)
    };
    // check_feature: SET refused even with PROBE; PROBE answers 0; argsz short.
    assert_eq!(
        with(&|q| q.feature_flags = SET | id::DMA_BUF),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        with(&|q| q.feature_flags = SET | PROBE | id::DMA_BUF),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        with(&|q| q.feature_flags = GET | PROBE | id::DMA_BUF),
        Ok(0)
    );
    assert_eq!(with(&|q| q.argsz = Some(8 + 15)), Err(Errno::EINVAL));
    // nr_ranges and flags before region_index.
    assert_eq!(
        with(&|q| {
            q.nr_ranges = Some(0);
            q.region_index = 9
        }),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        with(&|q| {
            q.flags = 1;
            q.region_index = 9
        }),
        Err(Errno::EINVAL)
    );
    // region_index before the ranges; an unimplemented BAR is ENODEV.
    assert_eq!(
        with(&|q| {
            q.region_index = 6;
            q.ranges[0].1 = 0
        }),
        Err(Errno::ENODEV)
    );
    assert_eq!(
        with(&|q| {
            q.region_index = 4;
            q.ranges[0].1 = 0
        }),
        Err(Errno::ENODEV)
    );
    // A huge nr_ranges is ENOMEM; one past the buffer is EFAULT.
    assert_eq!(with(&|q| q.nr_ranges = Some(u32::MAX)), Err(Errno::ENOMEM));
    assert_eq!(with(&|q| q.nr_ranges = Some(3)), Err(Errno::EFAULT));
    // The copy is one kmalloc: 4 MiB of ranges (262,144) is allocated and then read (the
    // buffer is short: EFAULT); one range more is refused before anything is read.
    assert_eq!(with(&|q| q.nr_ranges = Some(262_144)), Err(Errno::EFAULT));
    assert_eq!(with(&|q| q.nr_ranges = Some(262_145)), Err(Errno::ENOMEM));
    // Range checks: empty, unaligned → EINVAL; the alignment check beats the overflow one.
    assert_eq!(with(&|q| q.ranges[1].1 = 0), Err(Errno::EINVAL));
    assert_eq!(with(&|q| q.ranges[1].0 = 0x10_800), Err(Errno::EINVAL));
    assert_eq!(with(&|q| q.ranges[1].1 = 0x2800), Err(Errno::EINVAL));
    // Total overflows u64 → EINVAL; total with bit 63 → EINVAL.
    assert_eq!(
        with(&|q| q.ranges = vec![(0, 1 << 63), (0, 1 << 63)]),
        Err(Errno::EINVAL)
    );
    assert_eq!(with(&|q| q.ranges = vec![(0, 1 << 63)]), Err(Errno::EINVAL));
    // Offset + length past the BAR → EINVAL; overflowing u64 → EOVERFLOW.
    assert_eq!(
        with(&|q| q.ranges = vec![((BAR_GIB << 30) - 0x1000, 0x2000)]),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        with(&|q| q.ranges = vec![(!0xfffu64, 0x1000)]),
        Err(Errno::EOVERFLOW)
    );
    assert_eq!(
        with(&|q| q.ranges = vec![(0x1000, (u64::MAX >> 1) & !0xfff)]),
        Err(Errno::EINVAL)
    );
    // Nothing was exported by any of that.
    assert_eq!(v.dmabuf_count(), 0);
    assert_eq!(r.proc.fds(), vec![0, 1, 2]);
    // Success: an fd whose buffer is the sum of the ranges.
    // What the real 7.2 kernel answered under QEMU (real-kernel observations).
    assert_eq!(with(&|q| q.nr_ranges = Some(1 << 28)), Err(Errno::ENOMEM));
    assert_eq!(with(&|q| q.flags = 0x8000_0000), Err(Errno::EINVAL));
    assert_eq!(with(&|q| q.region_index = 7), Err(Errno::ENODEV));
    assert_eq!(with(&|q| q.region_index = u32::MAX), Err(Errno::ENODEV));
    assert_eq!(
        with(&|q| q.ranges = vec![(BAR_GIB << 30, 0x1000)]),
        Err(Errno::EINVAL)
    );
    let fd = export(&r, &d, &ok_req()).unwrap();
    assert_eq!(fd, 3);
    assert_eq!(get(&r, fd).dmabuf().unwrap().size(), 0x6000);
    assert_eq!(get(&r, fd).dmabuf().unwrap().exp_name(), "vfio_pci_core");
    assert!(r.proc.cloexec(fd).unwrap());
    assert_eq!(get(&r, fd).flags(), O_RDWR);
    let q = DmaBufRequest {
        open_flags: O_RDWR,
        ..ok_req()
    };
    let fd2 = export(&r, &d, &q).unwrap();
    assert!(!r.proc.cloexec(fd2).unwrap());
}

#[test]
fn feature_header_errnos_and_unknown_features() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    assert_eq!(d.feature(&r.proc, &[0; 4]), Err(Errno::EFAULT));
    assert_eq!(
        d.feature(&r.proc, &header_bytes(4, GET | id::DMA_BUF)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, (1 << 20) | id::DMA_BUF)),
        Err(Errno::EINVAL)
    );
    for f in [
        id::MIGRATION,
        id::MIG_DEVICE_STATE,
        id::DMA_LOGGING_START,
        id::MIG_DATA_SIZE,
        id::BUS_MASTER,
        0xffff,
    ] {
        assert_eq!(
            d.feature(&r.proc, &header_bytes(8, GET | PROBE | f)),
            Err(Errno::ENOTTY),
            "feature {f}"
        );
    }
    // Pre-copy info v2 is vfio core's: a device without pre-copy migration refuses it.
    assert_eq!(
        d.feature(
            &r.proc,
            &header_bytes(8, GET | PROBE | id::MIG_PRECOPY_INFO_V2)
        ),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | PROBE | id::LOW_POWER_ENTRY)),
        Ok(0)
    );
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, GET | id::LOW_POWER_ENTRY)),
        Err(Errno::EINVAL)
    );
}

#[test]
fn a_device_whose_p2p_init_is_refused_works_but_cannot_export() {
    let r = rig();
    r.env.p2p.set_non_mappable_bars(r.gpu, true);
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    assert!(!v.p2p_ready());
    let d = v.open().unwrap();
    assert_eq!(export(&r, &d, &ok_req()), Err(Errno::EINVAL));
    d.reset().unwrap();
}

// ---- exporter rules -----------------------------------------------------------------------

#[test]
fn attach_needs_a_p2p_revocable_importer_and_pin_is_a_no_op() {
    let r = rig();
    let (_v, d, f) = exported(&r);
    let b = f.dmabuf().unwrap();
    assert_eq!(b.attach(r.nic1).unwrap_err(), Errno::EOPNOTSUPP);
    let noop: peerdma_dmabuf::Invalidate = Arc::new(|_, _| {});
    let no_p2p = ImporterOps {
        allow_peer2peer: false,
        invalidate: Some(noop.clone()),
        stub: false,
    };
    assert_eq!(
        b.dynamic_attach(Some(r.nic1), Some(no_p2p)).unwrap_err(),
        Errno::EOPNOTSUPP
    );
    let stub = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(noop.clone()),
        stub: true,
    };
    assert_eq!(
        b.dynamic_attach(Some(r.nic1), Some(stub)).unwrap_err(),
        Errno::EOPNOTSUPP
    );
    let imp = import(&r, &f, r.nic1).unwrap();
    let g = b.lock();
    // vfio's exporter has no pin op: `dma_buf_pin` is 0.
    assert_eq!(b.pin(&imp.att, &g), Ok(()));
    drop(g);
    // `vfio_pci_dma_buf_attach`'s order: a peer-to-peer importer without an invalidation
    // callback is told the buffer is revoked (ENODEV) before that it is not revocable.
    let pinned = || ImporterOps {
        allow_peer2peer: true,
        invalidate: None,
        stub: false,
    };
    assert_eq!(
        b.dynamic_attach(Some(r.nic1), Some(pinned())).unwrap_err(),
        Errno::EOPNOTSUPP
    );
    d.config_write(regs::COMMAND, &0u16.to_le_bytes()).unwrap();
    assert_eq!(
        b.dynamic_attach(Some(r.nic1), Some(pinned())).unwrap_err(),
        Errno::ENODEV
    );
    let no_p2p = ImporterOps {
        allow_peer2peer: false,
        invalidate: Some(noop),
        stub: false,
    };
    assert_eq!(
        b.dynamic_attach(Some(r.nic1), Some(no_p2p)).unwrap_err(),
        Errno::EOPNOTSUPP,
        "not peer-to-peer comes first"
    );
}

/// Maps, DMAs a marker into the BAR through the mapping, returns the importer.
fn live_mapping(r: &Rig, f: &Arc<File>, marker: &[u8]) -> Importer {
    let imp = import(r, f, r.nic1).unwrap();
    imp.map(f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), marker)
        .unwrap();
    let mut back = vec![0; marker.len()];
    r.fabric.bar_peek(r.gpu, 2, 0, &mut back).unwrap();
    assert_eq!(back, marker);
    imp
}

fn bar0(r: &Rig, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    r.fabric.bar_peek(r.gpu, 2, 0, &mut v).unwrap();
    v
}

/// After a revoke: the importer was told (its table is gone and unmapped), a map tried from
/// its callback got ENODEV, and DMA to the old address does not land.
fn assert_revoked(r: &Rig, imp: &Importer, old: peerdma_pci::DmaAddr) {
    assert!(imp.table.lock().unwrap().is_none(), "importer invalidated");
    assert_eq!(imp.remaps.lock().unwrap().as_slice(), [Err(Errno::ENODEV)]);
    let before = bar0(r, 8);
    let _ = r.fabric.dma_write(r.nic1, old, b"LEAKED!!");
    assert_eq!(bar0(r, 8), before, "DMA after revoke must not land");
}

// ---- revoke events ------------------------------------------------------------------------

/// Runs `revoke` then `unrevoke` around a live mapping and checks both sides by bytes.
fn revoke_cycle(
    revoke: impl Fn(&peerdma_vfio::DeviceFd),
    unrevoke: impl Fn(&peerdma_vfio::DeviceFd),
) {
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"mapped-1");
    let old = imp.first_addr().unwrap();
    revoke(&d);
    assert_revoked(&r, &imp, old);
    if !d.memory_enabled() {
        // Still revoked (memory off, D3hot, low power): maps are refused until the unrevoke.
        assert_eq!(imp.map(&f), Err(Errno::ENODEV));
    }
    unrevoke(&d);
    assert!(d.memory_enabled());
    imp.map(&f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"mapped-2")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"mapped-2");
    assert_eq!(v.violation_count(), 0, "no DMA landed while revoked");
}

fn cmd(d: &peerdma_vfio::DeviceFd, mem: bool) {
    let v: u16 = if mem { regs::COMMAND_MEMORY } else { 0 };
    d.config_write(regs::COMMAND, &v.to_le_bytes()).unwrap();
}

#[test]
fn command_memory_off_revokes_and_on_unrevokes() {
    revoke_cycle(|d| cmd(d, false), |d| cmd(d, true));
}

fn pm_ctrl(r: &Rig) -> u16 {
    r.fabric.function(r.gpu).unwrap().caps().pm.unwrap() + 4
}

#[test]
fn a_function_that_resets_itself_in_d3hot_gets_its_state_back_at_d0() {
    // No_Soft_Reset clear: D3hot → D0 is an internal reset; vfio_pci_set_power_state saved
    // the state on the way in and restores it after, so the BARs decode again and the
    // buffer, unrevoked, is reached by DMA.
    let text = peerdma_vfio::testbed::PLATFORM.replace(
        "name = \"gpu0\"\n",
        "name = \"gpu0\"\nno_soft_reset = false\n",
    );
    assert_ne!(text, peerdma_vfio::testbed::PLATFORM);
    let r = rig_from(&text);
    let pm = pm_ctrl(&r);
    let (v, d, f) = exported(&r);
    let bar2 = r.fabric.config_read(r.gpu, 0x18, 4).unwrap();
    let imp = live_mapping(&r, &f, b"before-1");
    let old = imp.first_addr().unwrap();
    d.config_write(pm, &3u16.to_le_bytes()).unwrap();
    assert_revoked(&r, &imp, old);
    d.config_write(pm, &0u16.to_le_bytes()).unwrap();
    assert_eq!(
        r.fabric.config_read(r.gpu, 0x18, 4).unwrap(),
        bar2,
        "BAR 2 restored"
    );
    assert_ne!(
        r.fabric.config_read(r.gpu, regs::COMMAND, 2).unwrap() & u32::from(regs::COMMAND_MEMORY),
        0,
        "memory decode restored"
    );
    remap_and_land(&r, &imp, &f, &v, b"after--2");
}

/// The importer maps the buffer again and a DMA through the new mapping lands; nothing
/// landed while it was revoked.
fn remap_and_land(r: &Rig, imp: &Importer, f: &Arc<File>, v: &VfioPci, marker: &[u8]) {
    imp.map(f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), marker)
        .unwrap();
    assert_eq!(bar0(r, marker.len()), marker);
    assert_eq!(v.violation_count(), 0);
}

/// Every reset the fabric reports, in order.
#[derive(Default)]
struct Resets(Mutex<Vec<(Bdf, peerdma_pci::ResetCause)>>);

impl peerdma_pci::FabricObserver for Resets {
    fn event(&self, e: &peerdma_pci::FabricEvent) {
        if let peerdma_pci::FabricEvent::Reset { bdf, cause } = e {
            self.0.lock().unwrap().push((*bdf, *cause));
        }
    }
}

#[test]
fn a_function_without_flr_resets_by_pm_before_any_bus_reset() {
    // `pci_reset_fn_methods`: FLR, AF FLR, PM, then the bus. gpu0 without either FLR but
    // with No_Soft_Reset clear resets by D3hot → D0, although it is alone on its bus, and
    // comes back decoding with its buffer live.
    let text = peerdma_vfio::testbed::PLATFORM.replace(
        "name = \"gpu0\"\n",
        "name = \"gpu0\"\nno_soft_reset = false\nflr = false\n",
    );
    let text = text.replacen("af_flr = true\n", "", 1);
    let r = rig_from(&text);
    let resets = Arc::new(Resets::default());
    r.fabric.subscribe(resets.clone());
    let (v, d, f) = exported(&r);
    // The first open resets it the same way (`pci_try_reset_function` in
    // `vfio_pci_core_enable`).
    assert_eq!(
        std::mem::take(&mut *resets.0.lock().unwrap()),
        [(r.gpu, peerdma_pci::ResetCause::PowerOn)]
    );
    let imp = live_mapping(&r, &f, b"before-1");
    let old = imp.first_addr().unwrap();
    d.reset().unwrap();
    assert_eq!(
        resets.0.lock().unwrap().as_slice(),
        &[(r.gpu, peerdma_pci::ResetCause::PowerOn)]
    );
    assert_revoked(&r, &imp, old);
    remap_and_land(&r, &imp, &f, &v, b"after--2");
}

#[test]
fn any_command_write_puts_back_a_bar_the_hardware_lost() {
    // `vfio_need_bar_restore`: a BAR that held an address at the first open and reads
    // differently now is written back on the next COMMAND write, whatever it writes.
    let r = rig();
    let (_v, d, _f) = exported(&r);
    let bar0 = r.fabric.config_read(r.gpu, 0x10, 4).unwrap();
    assert_ne!(bar0 & !0xf, 0);
    r.fabric.config_write(r.gpu, 0x10, 4, 0).unwrap();
    cmd(&d, false);
    assert_eq!(r.fabric.config_read(r.gpu, 0x10, 4).unwrap(), bar0);
    r.fabric.config_write(r.gpu, 0x10, 4, 0).unwrap();
    cmd(&d, true);
    assert_eq!(r.fabric.config_read(r.gpu, 0x10, 4).unwrap(), bar0);
}

#[test]
fn d3hot_revokes_and_d0_unrevokes() {
    let r = rig();
    let pm = pm_ctrl(&r);
    revoke_cycle(
        |d| d.config_write(pm, &3u16.to_le_bytes()).unwrap(),
        |d| d.config_write(pm, &0u16.to_le_bytes()).unwrap(),
    );
}

#[test]
fn pcie_flr_revokes_then_unrevokes_after_the_reset() {
    let r = rig();
    let devctl = r.fabric.function(r.gpu).unwrap().caps().exp.unwrap() + 8;
    revoke_cycle(
        |d| d.config_write(devctl, &0x8000u16.to_le_bytes()).unwrap(),
        |_| {},
    );
}

#[test]
fn af_flr_revokes_then_unrevokes_after_the_reset() {
    let r = rig();
    let ctrl = r.fabric.function(r.gpu).unwrap().caps().af.unwrap() + 4;
    revoke_cycle(|d| d.config_write(ctrl, &[1]).unwrap(), |_| {});
}

#[test]
fn device_reset_revokes_then_unrevokes() {
    revoke_cycle(|d| d.reset().unwrap(), |_| {});
}

#[test]
fn low_power_entry_revokes_and_exit_unrevokes() {
    let r = rig();
    let p = Process::new();
    let _ = &r;
    revoke_cycle(
        |d| {
            assert_eq!(
                d.feature(&p, &header_bytes(8, SET | id::LOW_POWER_ENTRY)),
                Ok(0)
            )
        },
        |d| {
            assert_eq!(
                d.feature(&p, &header_bytes(8, SET | id::LOW_POWER_EXIT)),
                Ok(0)
            )
        },
    );
}

/// Divergence 5 (docs/divergences.md): Linux revokes on a second low-power entry and then
/// fails it with EINVAL, leaving buffers revoked with nothing to unrevoke them; here the
/// second entry fails first and changes nothing.
#[test]
fn divergence_second_low_power_entry_changes_nothing() {
    let r = rig();
    let (_v, d, f) = exported(&r);
    let entry = header_bytes(8, SET | id::LOW_POWER_ENTRY);
    assert_eq!(d.feature(&r.proc, &entry), Ok(0));
    assert_eq!(d.feature(&r.proc, &entry), Err(Errno::EINVAL));
    let _imp = exit_and_land(&r, &d, &f, *b"awake!!!");
}

#[test]
fn a_buffer_exported_with_memory_off_is_born_revoked() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    cmd(&d, false);
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    let imp = import(&r, &f, r.nic1);
    assert_eq!(
        imp.err(),
        Some(Errno::ENODEV),
        "attach refuses a revoked buffer"
    );
    cmd(&d, true);
    let imp = import(&r, &f, r.nic1).unwrap();
    imp.map(&f).unwrap();
}

/// Divergence 6 (docs/divergences.md): Linux decides whether memory is enabled while the
/// user's access has runtime-resumed the device, so during low power a new buffer is born
/// live and a COMMAND write unrevokes; here low power keeps every buffer revoked until the
/// exit.
#[test]
fn divergence_low_power_keeps_buffers_revoked_whatever_the_user_does() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let old = get(&r, export(&r, &d, &ok_req()).unwrap());
    let entry = header_bytes(8, SET | id::LOW_POWER_ENTRY);
    assert_eq!(d.feature(&r.proc, &entry), Ok(0));
    // Born revoked.
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    assert_eq!(import(&r, &f, r.nic1).err(), Some(Errno::ENODEV));
    // A COMMAND write with memory on does not unrevoke.
    cmd(&d, false);
    cmd(&d, true);
    assert_eq!(import(&r, &old, r.nic1).err(), Some(Errno::ENODEV));
    assert_eq!(import(&r, &f, r.nic1).err(), Some(Errno::ENODEV));
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT)),
        Ok(0)
    );
    // Both come to life at the exit; each lands its own bytes (the importers stay attached
    // and give their mappings back when the device closes).
    let mut importers = Vec::new();
    for (buf, marker) in [(&f, b"woken-1!"), (&old, b"woken-2!")] {
        let imp = import(&r, buf, r.nic1).unwrap();
        imp.map(buf).unwrap();
        r.fabric
            .dma_write(r.nic1, imp.first_addr().unwrap(), marker)
            .unwrap();
        assert_eq!(bar0(&r, 8), marker);
        importers.push(imp);
    }
}

/// Divergence 7 (docs/divergences.md): an ioctl wakes a device out of wakeup-armed low power
/// for good; Linux then leaves its buffers revoked until something else unrevokes them, here
/// they come back with the wake.
#[test]
fn divergence_a_wakeup_brings_the_buffers_back() {
    let r = rig();
    let (_v, d, f) = exported(&r);
    let entry = wakeup_entry(&r);
    assert_eq!(d.feature(&r.proc, &entry), Ok(0));
    assert_eq!(import(&r, &f, r.nic1).err(), Some(Errno::ENODEV));
    assert_eq!(d.wakeups(), 0);
    // Not an eventfd: EINVAL; a negative fd: EINVAL; no such fd: EBADF.
    let bad = |fd: i32| {
        let mut b = header_bytes(16, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
        b.extend_from_slice(&fd.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    };
    let probe = header_bytes(8, PROBE | GET | id::DMA_BUF);
    // Any ioctl wakes it: here a probe.
    assert_eq!(d.feature(&r.proc, &probe), Ok(0));
    assert_eq!(d.wakeups(), 1);
    let imp = import(&r, &f, r.nic1).unwrap();
    imp.map(&f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"wakeup!!")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"wakeup!!");
    // Awake for good: entering again works; the wrong eventfds are refused first.
    let dmabuf_fd = r.proc.fds()[0];
    assert_eq!(d.feature(&r.proc, &bad(dmabuf_fd)), Err(Errno::EINVAL));
    assert_eq!(d.feature(&r.proc, &bad(-1)), Err(Errno::EINVAL));
    assert_eq!(d.feature(&r.proc, &bad(999)), Err(Errno::EBADF));
    assert_eq!(d.feature(&r.proc, &entry), Ok(0));
}

// ---- lifecycles ---------------------------------------------------------------------------

#[test]
fn close_revokes_for_good_and_the_fd_outlives_the_device() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let fd = export(&r, &d, &ok_req()).unwrap();
    let f = get(&r, fd);
    let imp = live_mapping(&r, &f, b"open....");
    let old = imp.first_addr().unwrap();
    assert_eq!(
        v.registration().count(),
        3,
        "initial + device file + dma-buf"
    );
    d.close();
    assert_revoked(&r, &imp, old);
    assert_eq!(imp.map(&f), Err(Errno::ENODEV));
    assert_eq!(v.dmabuf_count(), 0);
    assert_eq!(
        v.registration().count(),
        1,
        "the buffer gave its registration back at close"
    );
    // Reopening does not bring the old buffer back.
    let d2 = v.open().unwrap();
    assert_eq!(imp.map(&f), Err(Errno::ENODEV));
    drop(d2);
    // The fd is still a file, and closing it releases the buffer.
    f.put();
    r.proc.close(fd).unwrap();
}

#[test]
fn buffer_released_before_close_unlinks_and_puts_its_registration() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let fd = export(&r, &d, &ok_req()).unwrap();
    assert_eq!((v.dmabuf_count(), v.registration().count()), (1, 3));
    r.proc.close(fd).unwrap();
    assert_eq!((v.dmabuf_count(), v.registration().count()), (0, 2));
    d.close();
    assert_eq!(v.registration().count(), 1);
}

/// divergences.md: a revoke does not skip a buffer whose release has begun (Linux's
/// `get_file_active` would). Here an importer still attached when the last file reference
/// goes is told and refused a new mapping by a revoke that comes while the release waits
/// for `memory_lock`; the release then unlinks the buffer as usual.
#[test]
fn divergence_a_revoke_reaches_a_buffer_whose_release_has_begun() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let d = std::rc::Rc::new(d);
    let imp = import(&r, &f, r.nic0).unwrap();
    imp.map(&f).unwrap();
    let fd = r.proc.fds().into_iter().find(|&n| n >= 3).unwrap();
    let ran = std::rc::Rc::new(std::cell::Cell::new(false));
    let (d2, ran2, f2) = (d.clone(), ran.clone(), f.clone());
    let hook = peerdma_pci::sync::points::on("vfio.release.unlinking", move || {
        assert_eq!(f2.refs(), 0, "the release has begun");
        cmd(&d2, false);
        ran2.set(true);
    });
    r.proc.close(fd).unwrap();
    f.clone().put();
    drop(hook);
    assert!(ran.get(), "the release ran, and the revoke inside it");
    assert!(
        imp.table.lock().unwrap().is_none(),
        "the importer was told and unmapped"
    );
    assert_eq!(*imp.remaps.lock().unwrap(), vec![Err(Errno::ENODEV)]);
    assert_eq!(v.dmabuf_count(), 0, "the release still unlinked the buffer");
    f.dmabuf().unwrap().detach(&imp.att);
    cmd(&d, true);
    assert_eq!(v.violation_count(), 0);
}

#[test]
fn unregister_waits_for_a_live_buffer_and_finishes_when_it_goes() {
    let r = rig();
    let v = Arc::new(VfioPci::bind(&r.env, r.gpu).unwrap());
    let d = v.open().unwrap();
    let fd = export(&r, &d, &ok_req()).unwrap();
    let v2 = v.clone();
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let t = std::thread::spawn(move || {
        v2.unregister(Duration::from_millis(20), |_, h| {
            s2.lock().unwrap().push(h.to_vec())
        })
    });
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(
        v.open().unwrap_err(),
        Errno::ENODEV,
        "no new opens while unregistering"
    );
    let mut first = seen.lock().unwrap()[0].clone();
    first.sort();
    assert_eq!(first, ["device file", "dma-buf"]);
    // The buffer goes: the device file still holds it.
    r.proc.close(fd).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    assert!(!v.registration().is_complete());
    assert_eq!(seen.lock().unwrap().last().unwrap(), &["device file"]);
    d.close();
    let n = t.join().unwrap();
    assert!(n >= 4, "requests made: {n}");
    assert!(v.registration().is_complete());
}

#[test]
fn closing_the_device_drops_the_buffers_registration_so_unregister_finishes() {
    let r = rig();
    let v = Arc::new(VfioPci::bind(&r.env, r.gpu).unwrap());
    let d = v.open().unwrap();
    let fd = export(&r, &d, &ok_req()).unwrap();
    d.close();
    assert_eq!(
        v.unregister(Duration::from_secs(5), |_, h| panic!("held by {h:?}")),
        0
    );
    // The buffer's fd is still open, dead.
    assert!(r.proc.dma_buf_get(fd).is_ok());
}

#[test]
fn release_racing_a_revoke_from_another_thread() {
    for _ in 0..30 {
        let r = rig();
        let v = VfioPci::bind(&r.env, r.gpu).unwrap();
        let d = v.open().unwrap();
        let fd = export(&r, &d, &ok_req()).unwrap();
        let f = get(&r, fd);
        let imp = live_mapping(&r, &f, b"race....");
        let d = Arc::new(d);
        let d2 = d.clone();
        let t = std::thread::spawn(move || {
            cmd(&d2, false);
            cmd(&d2, true);
        });
        {
            let b = f.dmabuf().unwrap();
            let g = b.lock();
            if let Some(tb) = imp.table.lock().unwrap().take() {
                b.unmap_attachment(&imp.att, tb, DIR, &g);
            }
        }
        b_detach(&f, &imp);
        f.put();
        r.proc.close(fd).unwrap();
        t.join().unwrap();
        assert_eq!(v.dmabuf_count(), 0);
        assert!(r.env.dma.debug_report().is_empty());
    }
}

fn b_detach(f: &File, imp: &Importer) {
    f.dmabuf().unwrap().detach(&imp.att);
}

#[test]
fn bus_address_importer_gets_bus_addresses() {
    let r = rig();
    let (_v, d, f) = exported(&r);
    let imp = import(&r, &f, r.nic0).unwrap();
    imp.map(&f).unwrap();
    r.fabric
        .dma_write(r.nic0, imp.first_addr().unwrap(), b"switch!!")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"switch!!");
    cmd(&d, false);
    assert!(imp.table.lock().unwrap().is_none());
    let _ = O_CLOEXEC;
}

#[test]
fn hot_reset_revokes_then_unrevokes_and_refuses_unowned_or_busy_sets() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"before..");
    let old = imp.first_addr().unwrap();
    // The bus holds gpu0 only; a caller that does not prove it owns gpu0 is refused.
    assert_eq!(d.hot_reset(&[]), Err(Errno::EINVAL));
    assert!(
        imp.table.lock().unwrap().is_some(),
        "nothing revoked by a refused reset"
    );
    d.hot_reset(&[&v]).unwrap();
    assert_revoked(&r, &imp, old);
    assert!(d.memory_enabled(), "registers restored after the bus reset");
    imp.map(&f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"after...")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"after...");
    assert_eq!(v.violation_count(), 0);
}

#[test]
fn hot_reset_is_ebusy_while_memory_lock_is_held() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = Arc::new(v.open().unwrap());
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    // An importer that takes its time to let go: its callback runs under memory_lock.
    let noop_slow: peerdma_dmabuf::Invalidate =
        Arc::new(|_, _| std::thread::sleep(Duration::from_millis(300)));
    let ops = ImporterOps {
        allow_peer2peer: true,
        invalidate: Some(noop_slow),
        stub: false,
    };
    f.dmabuf()
        .unwrap()
        .dynamic_attach(Some(r.nic1), Some(ops))
        .unwrap();
    let d2 = d.clone();
    let t = std::thread::spawn(move || cmd(&d2, false));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.hot_reset(&[&v]), Err(Errno::EBUSY));
    t.join().unwrap();
    d.hot_reset(&[&v]).unwrap();
}

// ---- nvgrace-gpu --------------------------------------------------------------------------

/// resmem 16 MiB and usemem 3 MiB (shown as 4 MiB) of coherent device memory, placed in the
/// machine's memory map above 8 GiB.
const RESMEM: (u64, u64) = (0x2_0000_0000, 16 << 20);
const USEMEM: (u64, u64) = (0x2_4000_0000, 3 << 20);

fn nvgrace(r: &Rig) -> VfioPci {
    let variant = Arc::new(peerdma_vfio::pci::NvgraceGpu {
        resmem: RESMEM,
        usemem: USEMEM,
    });
    VfioPci::bind_variant(&r.env, r.gpu, variant).unwrap()
}

#[test]
fn nvgrace_exports_device_memory_and_refuses_the_padding() {
    use peerdma_vfio::pci::Variant;
    let r = rig();
    let v = nvgrace(&r);
    assert_eq!(v.driver(), "nvgrace-gpu");
    let nv = peerdma_vfio::pci::NvgraceGpu {
        resmem: RESMEM,
        usemem: USEMEM,
    };
    assert_eq!(nv.region_size(4), Some(4 << 20));
    let d = v.open().unwrap();
    // usemem: the whole real length is fine, the padding is not.
    assert!(export(&r, &d, &DmaBufRequest::new(4, vec![(0, 3 << 20)])).is_ok());
    assert_eq!(
        export(&r, &d, &DmaBufRequest::new(4, vec![(3 << 20, 0x1000)])),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        export(&r, &d, &DmaBufRequest::new(4, vec![(0, 4 << 20)])),
        Err(Errno::EINVAL)
    );
    // resmem and usemem, bytes checked: an importer DMAs into the device memory itself.
    for (region, (phys, _)) in [(2u32, RESMEM), (4, USEMEM)] {
        let f = get(
            &r,
            export(&r, &d, &DmaBufRequest::new(region, vec![(0x2000, 0x1000)])).unwrap(),
        );
        let imp = import(&r, &f, r.nic1).unwrap();
        imp.map(&f).unwrap();
        r.fabric
            .dma_write(r.nic1, imp.first_addr().unwrap(), b"devmem!!")
            .unwrap();
        let mut back = [0u8; 8];
        r.fabric
            .ram_peek(peerdma_pci::PhysAddr(phys + 0x2000), &mut back)
            .unwrap();
        assert_eq!(&back, b"devmem!!", "region {region}");
        // Revocation works the same way for device memory.
        cmd(&d, false);
        assert!(imp.table.lock().unwrap().is_none());
        assert_eq!(imp.map(&f), Err(Errno::ENODEV));
        cmd(&d, true);
    }
    assert_eq!(v.violation_count(), 0);
    // Regions the variant does not own are the plain BARs.
    assert!(export(&r, &d, &DmaBufRequest::new(0, vec![(0, 0x1000)])).is_ok());
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any bytes at all: an errno or a valid fd, never a panic; a failed call exports
        /// nothing.
        #[test]
        fn any_feature_buffer_gets_an_errno_or_an_fd(
            raw in prop::collection::vec(any::<u8>(), 0..96),
            feature in prop::sample::select(vec![id::DMA_BUF, id::LOW_POWER_ENTRY, id::LOW_POWER_EXIT, 0, 12]),
            flags in prop::sample::select(vec![GET, SET, PROBE | GET, GET | SET, 0]),
            keep_header in any::<bool>(),
        ) {
            let r = rig();
            let v = VfioPci::bind(&r.env, r.gpu).unwrap();
            let d = v.open().unwrap();
            let mut buf = raw.clone();
            if keep_header && buf.len() >= 8 {
                let argsz = u32::try_from(buf.len()).unwrap();
                buf[..8].copy_from_slice(&header_bytes(argsz, flags | feature));
            }
            match d.feature(&r.proc, &buf) {
                Ok(fd) if fd >= 3 => prop_assert_eq!(v.dmabuf_count(), 1),
                Ok(_) | Err(_) => prop_assert_eq!(v.dmabuf_count(), 0),
            }
        }
    }
}

#[test]
fn low_power_with_wakeup_needs_its_payload_and_revokes_like_entry() {
    let r = rig();
    let (_v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"wake....");
    let short = header_bytes(8 + 4, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
    let mut short_buf = short.clone();
    short_buf.extend_from_slice(&[0; 4]);
    assert_eq!(d.feature(&r.proc, &short_buf), Err(Errno::EINVAL));
    assert!(
        imp.table.lock().unwrap().is_some(),
        "a refused entry revokes nothing"
    );
    let efd = r
        .proc
        .install(peerdma_dmabuf::File::eventfd(), true)
        .map_err(|(e, _)| e)
        .unwrap();
    let mut ok = header_bytes(8 + 8, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
    ok.extend_from_slice(&efd.to_le_bytes());
    ok.extend_from_slice(&[0; 4]);
    assert_eq!(d.feature(&r.proc, &ok), Ok(0));
    assert!(imp.table.lock().unwrap().is_none());
    assert!(!d.memory_enabled());
    // The reserved word is never looked at: a second entry fails only because low power
    // is engaged, and after an exit an entry with reserved = 1 goes through.
    let mut reserved = header_bytes(8 + 8, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
    reserved.extend_from_slice(&efd.to_le_bytes());
    reserved.extend_from_slice(&1u32.to_le_bytes());
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT)),
        Ok(0)
    );
    assert_eq!(d.feature(&r.proc, &reserved), Ok(0));
    assert!(d.low_power_engaged());
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT)),
        Ok(0)
    );
    imp.map(&f).unwrap();
}

#[test]
fn a_device_without_flr_alone_below_its_port_resets_by_bus_reset() {
    // As ivshmem behind a switch port under QEMU: no FLR, yet VFIO_DEVICE_RESET works.
    let text = include_str!("../../peerdma-dmabuf/tests/platform.toml")
        .replace("class = 0x030200", "class = 0x030200\nflr = false");
    let mut r = rig();
    r.fabric = Arc::new(file::load_str(&text, "platform.toml").unwrap());
    let dma = Arc::new(DmaSystem::new(r.fabric.clone(), true));
    dma.configure(
        r.nic1,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    r.env = DmaEnv {
        dma,
        p2p: P2pDma::new(r.fabric.clone()),
    };
    assert!(!r.fabric.function(r.gpu).unwrap().has_flr());
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    let imp = live_mapping(&r, &f, b"sbr.....");
    let old = imp.first_addr().unwrap();
    d.reset().unwrap();
    assert_revoked(&r, &imp, old);
    imp.map(&f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"sbr-ok!!")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"sbr-ok!!");
    assert_eq!(v.violation_count(), 0);
}

// ---- importers: an ODP RDMA NIC and a static display engine -------------------------------

#[test]
fn odp_nic_maps_on_demand_fails_while_revoked_and_recovers() {
    use peerdma_vfio::rdma::{Completion, OdpNic};
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let fd = export(&r, &d, &ok_req()).unwrap();
    let f = get(&r, fd);
    let nic = OdpNic::new(r.fabric.clone(), r.nic1);
    let key = nic.register_mr(&f).unwrap();
    assert!(!nic.is_mapped(key), "nothing mapped before first use");
    // A write spanning both ranges of the buffer (0x4000 of range 0, then range 1).
    assert_eq!(nic.write(key, 0x3ffc, b"spanning"), Completion::Success);
    assert!(nic.is_mapped(key));
    assert_eq!(bar0_at(&r, 0x3ffc, 4), b"span");
    assert_eq!(bar0_at(&r, 0x10_000, 4), b"ning");
    let mut back = [0u8; 8];
    assert_eq!(nic.read(key, 0x3ffc, &mut back), Completion::Success);
    assert_eq!(&back, b"spanning");
    assert_eq!(
        nic.write(key, 0x6000 - 4, b"too long"),
        Completion::OutOfBounds
    );
    assert_eq!(nic.write(key + 1, 0, b"x"), Completion::BadKey);
    // Revoked: the region is invalidated, the next access faults in and fails, no byte lands.
    cmd(&d, false);
    assert!(!nic.is_mapped(key));
    assert_eq!(
        nic.write(key, 0, b"REVOKED!"),
        Completion::MapFailed(Errno::ENODEV)
    );
    cmd(&d, true);
    assert_ne!(bar0_at(&r, 0, 8), b"REVOKED!");
    // Memory back: the same region maps again on demand and the transfer completes.
    assert_eq!(nic.write(key, 0, b"resumed!"), Completion::Success);
    assert_eq!(bar0_at(&r, 0, 8), b"resumed!");
    // Close: dead for good.
    d.close();
    assert_eq!(
        nic.write(key, 0, b"closed!!"),
        Completion::MapFailed(Errno::ENODEV)
    );
    assert_eq!(bar0_at(&r, 0, 8), b"resumed!");
    assert_eq!(v.violation_count(), 0, "no DMA landed while revoked");
    nic.dereg_mr(key).unwrap();
    f.put();
    r.proc.close(fd).unwrap();
    assert!(r.env.dma.debug_report().is_empty());
}

#[test]
fn a_static_importer_is_refused_at_attach() {
    let r = rig();
    let (_v, _d, f) = exported(&r);
    let display = peerdma_vfio::rdma::DisplayEngine::new(r.nic0);
    assert_eq!(display.attach(&f).unwrap_err(), Errno::EOPNOTSUPP);
    assert!(f.dmabuf().unwrap().attachments().is_empty());
}

fn bar0_at(r: &Rig, off: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    r.fabric.bar_peek(r.gpu, 2, off, &mut v).unwrap();
    v
}

// ---- iommufd ------------------------------------------------------------------------------

#[test]
fn iommufd_map_file_revocation_keeps_the_area_dead_until_remapped() {
    use peerdma_vfio::iommufd::Iommufd;
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let ifd = Iommufd::open(&r.env).unwrap();
    let ioas = ifd.ioas_alloc().unwrap();
    ifd.attach(r.nic1, ioas).unwrap();
    let one = get(
        &r,
        export(&r, &d, &DmaBufRequest::new(2, vec![(0, 0x10_0000)])).unwrap(),
    );
    let two = get(&r, export(&r, &d, &ok_req()).unwrap());
    let iova_base: u64 = 0x100_0000;
    // Refusals: two ranges; a window outside the buffer.
    assert_eq!(
        ifd.map_file(ioas, &two, 0, 0x6000, iova_base),
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(
        ifd.map_file(ioas, &one, 0xff000, 0x2000, iova_base),
        Err(Errno::EINVAL)
    );
    // Whole buffer, then the same IOVA again → EEXIST; a partial map elsewhere works.
    ifd.map_file(ioas, &one, 0, 0x10_0000, iova_base).unwrap();
    assert_eq!(
        ifd.map_file(ioas, &one, 0, 0x1000, iova_base + 0x1000),
        Err(Errno::EEXIST)
    );
    ifd.map_file(ioas, &one, 0x2_0000, 0x1000, 0x4000_0000)
        .unwrap();
    let dma = |iova: u64, data: &[u8]| r.fabric.dma_write(r.nic1, peerdma_pci::DmaAddr(iova), data);
    dma(iova_base + 0x10, b"iommufd!").unwrap();
    assert_eq!(bar0_at(&r, 0x10, 8), b"iommufd!");
    dma(0x4000_0000, b"partial!").unwrap();
    assert_eq!(bar0_at(&r, 0x2_0000, 8), b"partial!");
    // Memory off: both areas die; DMA faults, nothing lands; MAP_FILE now ENODEV.
    cmd(&d, false);
    assert_eq!(ifd.is_dead(ioas, iova_base), Some(true));
    assert!(dma(iova_base + 0x10, b"LEAKED!!").is_err());
    assert_eq!(
        ifd.map_file(ioas, &one, 0, 0x1000, 0x8000_0000),
        Err(Errno::ENODEV)
    );
    // Memory back: the area stays dead.
    cmd(&d, true);
    assert!(dma(iova_base + 0x10, b"LEAKED!!").is_err());
    assert_eq!(bar0_at(&r, 0x10, 8), b"iommufd!");
    // Unmap must be whole; then map again and DMA lands.
    assert_eq!(ifd.unmap(ioas, iova_base, 0x1000), Err(Errno::ENOENT));
    ifd.unmap(ioas, iova_base, 0x10_0000).unwrap();
    ifd.map_file(ioas, &one, 0, 0x10_0000, iova_base).unwrap();
    dma(iova_base + 0x10, b"again!!!").unwrap();
    assert_eq!(bar0_at(&r, 0x10, 8), b"again!!!");
    // Device closed: dead for good.
    d.close();
    assert!(dma(iova_base + 0x10, b"closed!!").is_err());
    ifd.unmap(ioas, iova_base, 0x10_0000).unwrap();
    assert_eq!(
        ifd.map_file(ioas, &one, 0, 0x10_0000, iova_base),
        Err(Errno::ENODEV)
    );
    assert_eq!(bar0_at(&r, 0x10, 8), b"again!!!");
    assert_eq!(v.violation_count(), 0, "no DMA landed while revoked");
}

#[test]
fn iommufd_refuses_a_dma_buf_from_another_exporter() {
    use peerdma_dmabuf::buf::{DmaBufOps, ExportInfo, ops};
    struct Other;
    impl DmaBufOps for Other {
        fn provides(&self) -> u32 {
            ops::MAP | ops::UNMAP | ops::RELEASE
        }
        fn map(&self, _: &Attachment, _: Direction, _: &ResvGuard<'_>) -> Result<SgTable, Errno> {
            Err(Errno::ENOMEM)
        }
        fn unmap(&self, _: &Attachment, _: SgTable, _: Direction, _: &ResvGuard<'_>) {}
        fn release(&self, _: &peerdma_dmabuf::DmaBuf) {}
    }
    let r = rig();
    let f = peerdma_dmabuf::export(ExportInfo {
        exp_name: "udmabuf".into(),
        size: 0x1000,
        flags: 0,
        ops: Some(Arc::new(Other)),
        has_priv: true,
    })
    .unwrap();
    let ifd = peerdma_vfio::iommufd::Iommufd::open(&r.env).unwrap();
    let ioas = ifd.ioas_alloc().unwrap();
    assert_eq!(
        ifd.map_file(ioas, &f, 0, 0x1000, 0x1000),
        Err(Errno::EOPNOTSUPP)
    );
    assert!(
        f.dmabuf().unwrap().attachments().is_empty(),
        "the failed import detached"
    );
}

// ---- the watch ----------------------------------------------------------------------------

/// An importer that plays by the rules towards the exporter (it unmaps when told) but keeps
/// the bus address and DMAs to it later: the planted violation the watch must name.
fn rogue_address(r: &Rig, f: &Arc<File>) -> (Importer, peerdma_pci::DmaAddr) {
    let imp = import(r, f, r.nic0).unwrap();
    imp.map(f).unwrap();
    let addr = imp.first_addr().unwrap();
    r.fabric.dma_write(r.nic0, addr, b"allowed!").unwrap();
    assert_eq!(bar0(r, 8), b"allowed!");
    (imp, addr)
}

#[test]
fn the_watch_names_a_landing_through_a_mapping_made_before_a_close() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let (_imp, stale) = rogue_address(&r, &f);
    assert_eq!(
        v.violation_count(),
        0,
        "a DMA through a live mapping is legal"
    );
    d.close();
    // Reopened: the BAR decodes again, and the old buffer is revoked for good.
    let d = v.open().unwrap();
    // A second buffer, live, mapped by a well-behaved importer: its DMA is legal, although
    // another buffer of the same device is revoked.
    let f2 = get(&r, export(&r, &d, &ok_req()).unwrap());
    let good = import(&r, &f2, r.nic1).unwrap();
    good.map(&f2).unwrap();
    r.fabric
        .dma_write(r.nic1, good.first_addr().unwrap(), b"legal!!!")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"legal!!!");
    assert_eq!(
        v.violation_count(),
        0,
        "one buffer revoked does not make others' DMAs illegal"
    );
    // The rogue's stale bus address reaches the new BAR: a violation, named.
    r.fabric.dma_write(r.nic0, stale, b"rogue!!!").unwrap();
    assert_eq!(
        bar0(&r, 8),
        b"rogue!!!",
        "the bytes did land (hardware cannot stop it)"
    );
    assert_eq!(v.violation_count(), 1);
    let w = &v.violations()[0];
    assert_eq!(
        (w.buffer, w.reason, w.requester),
        (1, peerdma_vfio::watch::Reason::Revoked, r.nic0)
    );
    assert!(w.write);
    let text = w.to_string();
    assert!(
        text.contains("dma-buf #1") && text.contains("revoked"),
        "{text}"
    );
    v.acknowledge_violations();
}

#[test]
fn the_watch_names_a_landing_through_an_unmapped_mapping_after_a_reset() {
    // A reset revokes and unrevokes: the importer unmapped; its old IOVA (nic1 is behind the
    // IOMMU) must fault, and if it lands the watch must call it unmapped. Here the rogue
    // writes the old IOMMU entry back by hand to make the DMA land.
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"mapped-1");
    let old = imp.first_addr().unwrap();
    d.reset().unwrap();
    assert!(
        r.fabric.dma_write(r.nic1, old, b"faulted!").is_err(),
        "the old IOVA faults"
    );
    assert_eq!(v.violation_count(), 0);
    // Plant: map the old IOVA again behind the exporter's back.
    let iommu = r.env.dma.iommu().unwrap();
    let dom = match iommu.attachment(r.nic1) {
        peerdma_dma::iommu::Attach::Paging(d) => d,
        other => panic!("nic1 is not translated: {other:?}"),
    };
    let bar = r.fabric.bar(r.gpu, 2).unwrap().cpu.unwrap().get();
    let page = old.get() & !0xfff;
    iommu
        .map(
            dom,
            page,
            bar,
            0x1000,
            peerdma_dma::iommu::prot::READ
                | peerdma_dma::iommu::prot::WRITE
                | peerdma_dma::iommu::prot::MMIO,
        )
        .unwrap();
    r.fabric.dma_write(r.nic1, old, b"planted!").unwrap();
    assert_eq!(bar0(&r, 8), b"planted!");
    assert_eq!(v.violation_count(), 1);
    assert_eq!(
        v.violations()[0].reason,
        peerdma_vfio::watch::Reason::Unmapped
    );
    v.acknowledge_violations();
}

// ---- races, replayed at their interleaving points -----------------------------------------

/// Runs `f` on another thread and fails the test if it has not finished within 10 s (a
/// revoke that waits forever for a mapping nobody will unmap hangs in `f`, or in the drops at
/// its end); a panic in `f` fails the test with its own message.
fn within_10s(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r.is_ok());
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(true) => {}
        Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within 10 s: deadlock")
        }
    }
}

#[test]
fn odp_deregistration_in_the_gap_before_the_lock_leaves_no_mapping() {
    within_10s("the test", odp_deregistration_in_the_gap);
}

fn odp_deregistration_in_the_gap() {
    use peerdma_vfio::rdma::{Completion, OdpNic};
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let fd = export(&r, &d, &ok_req()).unwrap();
    let f = get(&r, fd);
    let nic = Arc::new(OdpNic::new(r.fabric.clone(), r.nic1));
    let key = nic.register_mr(&f).unwrap();
    // The whole deregistration runs after the access looked the region up and before it
    // takes the buffer's lock.
    let n2 = nic.clone();
    let _hook = peerdma_pci::sync::points::on("odp.access.unlocked", move || {
        let _ = n2.dereg_mr(key);
    });
    assert_eq!(nic.write(key, 0, b"too late"), Completion::BadKey);
    assert_ne!(bar0(&r, 8), b"too late");
    assert_eq!(
        v.live_mappings(),
        0,
        "nothing mapped on a deregistered region"
    );
    // A revoke must not wait for a mapping that nobody will unmap.
    cmd(&d, false);
    assert_eq!(f.dmabuf().unwrap().attachments().len(), 0);
    f.put();
}

#[test]
fn iommufd_revoke_and_unrevoke_before_the_map_locks_cannot_leave_a_live_dead_area() {
    use peerdma_vfio::iommufd::Iommufd;
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = Arc::new(v.open().unwrap());
    let ifd = Iommufd::open(&r.env).unwrap();
    let ioas = ifd.ioas_alloc().unwrap();
    ifd.attach(r.nic1, ioas).unwrap();
    let one = get(
        &r,
        export(&r, &d, &DmaBufRequest::new(2, vec![(0, 0x4000)])).unwrap(),
    );
    // A reset (revoke + unrevoke) between attaching and taking the buffer's lock.
    let d2 = d.clone();
    let hook = peerdma_pci::sync::points::on("iommufd.map_file.attached", move || {
        d2.reset().unwrap();
    });
    let iova = 0x100_0000;
    ifd.map_file(ioas, &one, 0, 0x4000, iova).unwrap();
    drop(hook);
    let dma = |data: &[u8]| r.fabric.dma_write(r.nic1, peerdma_pci::DmaAddr(iova), data);
    assert_eq!(
        ifd.is_dead(ioas, iova),
        Some(false),
        "the buffer was live when it mapped"
    );
    dma(b"live!!!!").unwrap();
    assert_eq!(bar0(&r, 8), b"live!!!!");
    // Now a revoke must reach the area: it dies, its DMA faults.
    d.reset().unwrap();
    assert_eq!(ifd.is_dead(ioas, iova), Some(true));
    assert!(
        dma(b"LEAKED!!").is_err(),
        "DMA through a revoked area must fault"
    );
    assert_eq!(bar0(&r, 8), b"live!!!!");
    ifd.unmap(ioas, iova, 0x4000).unwrap();
    let iommu = r.env.dma.iommu().unwrap();
    let dom = match iommu.attachment(r.nic1) {
        peerdma_dma::iommu::Attach::Paging(d) => d,
        other => panic!("nic1 is not in the IOAS: {other:?}"),
    };
    assert_eq!(iommu.entries(dom), 0, "no IOMMU entries left behind");
    assert_eq!(v.violation_count(), 0);
    assert_eq!(v.live_mappings(), 0);
}

#[test]
fn a_detached_attachment_cannot_be_mapped() {
    within_10s("the test", a_detached_attachment);
}

fn a_detached_attachment() {
    let r = rig();
    let (v, _d, f) = exported(&r);
    let imp = import(&r, &f, r.nic1).unwrap();
    f.dmabuf().unwrap().detach(&imp.att);
    assert_eq!(imp.map(&f), Err(Errno::EINVAL));
    assert_eq!(v.live_mappings(), 0);
}

// ---- the virtual config space at every size and alignment ---------------------------------

/// Whether the buffer behind `imp` is revoked now: a map is refused with ENODEV.
fn revoked_now(f: &Arc<File>, imp: &Importer) -> bool {
    match imp.map(f) {
        Ok(()) => {
            let b = f.dmabuf().unwrap();
            let g = b.lock();
            if let Some(t) = imp.table.lock().unwrap().take() {
                b.unmap_attachment(&imp.att, t, DIR, &g);
            }
            false
        }
        Err(Errno::ENODEV) => true,
        Err(e) => panic!("map failed with {e}"),
    }
}

fn hw_command(r: &Rig) -> u16 {
    r.fabric.config_read(r.gpu, regs::COMMAND, 2).unwrap() as u16
}

#[test]
fn command_writes_of_every_size_and_offset_keep_hardware_decode_and_revocation_together() {
    // Every write of 1..=8 bytes starting anywhere in the first 12 bytes, with every byte 0
    // or every byte 0xff: whenever the hardware stops decoding memory the buffer is revoked,
    // and whenever it decodes (and the virtual COMMAND says so) the buffer is live.
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = import(&r, &f, r.nic1).unwrap();
    let mut kinds = 0;
    for start in 0u16..12 {
        for len in 1usize..=8 {
            for fill in [0u8, 0xff] {
                cmd(&d, true);
                let data = vec![fill; len];
                d.config_write(start, &data).unwrap();
                let hw_mem = hw_command(&r) & regs::COMMAND_MEMORY != 0;
                let revoked = revoked_now(&f, &imp);
                assert_eq!(
                    revoked, !hw_mem,
                    "write of {len} x {fill:#x} at {start:#x}: hardware decode {hw_mem}, revoked {revoked}"
                );
                assert_eq!(d.memory_enabled(), hw_mem);
                kinds += usize::from(revoked);
            }
        }
    }
    assert!(kinds > 10, "some of the writes did turn decode off");
    // The classic hole: one byte at COMMAND.
    d.config_write(regs::COMMAND, &[0]).unwrap();
    assert!(revoked_now(&f, &imp));
    let born = get(&r, export(&r, &d, &ok_req()).unwrap());
    let imp2 = import(&r, &born, r.nic1);
    assert!(
        matches!(imp2, Err(Errno::ENODEV)),
        "a buffer exported now is born revoked"
    );
    d.config_write(regs::COMMAND, &[regs::COMMAND_MEMORY as u8])
        .unwrap();
    assert!(!revoked_now(&f, &imp));
    assert_eq!(v.violation_count(), 0);
}

#[test]
fn a_one_byte_pmcsr_write_revokes_and_d0_unrevokes() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"mapped-1");
    let old = imp.first_addr().unwrap();
    d.config_write(pm_ctrl(&r), &[3]).unwrap();
    assert_eq!(
        r.fabric.power_state(r.gpu).unwrap(),
        peerdma_pci::PowerState::D3Hot
    );
    assert!(imp.table.lock().unwrap().is_none(), "importer invalidated");
    assert!(r.fabric.dma_write(r.nic1, old, b"LEAKED!!").is_err());
    // The high byte of PMCSR alone changes no power state.
    d.config_write(pm_ctrl(&r) + 1, &[0]).unwrap();
    assert_eq!(
        r.fabric.power_state(r.gpu).unwrap(),
        peerdma_pci::PowerState::D3Hot
    );
    assert!(revoked_now(&f, &imp));
    d.config_write(pm_ctrl(&r), &[0]).unwrap();
    assert!(!revoked_now(&f, &imp));
    assert_eq!(v.violation_count(), 0);
}

#[test]
fn the_flr_bit_written_alone_revokes_resets_and_restores() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"mapped-1");
    let bar_before = r.fabric.bar(r.gpu, 2).unwrap().bus;
    let exp = r.fabric.function(r.gpu).unwrap().caps().exp.unwrap();
    // DevCtl's high byte only: bit 15, FLR.
    d.config_write(exp + regs::EXP_DEVCTL + 1, &[0x80]).unwrap();
    assert_eq!(
        imp.remaps.lock().unwrap().as_slice(),
        [Err(Errno::ENODEV)],
        "revoked first"
    );
    assert_eq!(
        r.fabric.bar(r.gpu, 2).unwrap().bus,
        bar_before,
        "BARs restored"
    );
    assert_eq!(
        d.config_read(exp + regs::EXP_DEVCTL, 2).unwrap() & 0x8000,
        0,
        "FLR reads 0"
    );
    imp.map(&f).unwrap();
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"mapped-2")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"mapped-2");
    // And as part of a 4-byte DevCtl+DevSta write.
    d.config_write(exp + regs::EXP_DEVCTL, &0x8000u32.to_le_bytes())
        .unwrap();
    assert!(imp.table.lock().unwrap().is_none());
    assert_eq!(v.violation_count(), 0);
}

#[test]
fn a_user_bar_write_is_virtual_and_sizes_like_hardware() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"mapped-1");
    let hw = r.fabric.bar(r.gpu, 2).unwrap();
    let lo_before = d.config_read(0x18, 4).unwrap();
    assert_eq!(u64::from(lo_before & !0xf), hw.bus.get() & 0xffff_fff0);
    // Sizing: all ones, read back the size mask with the flags.
    d.config_write(0x18, &[0xff; 8]).unwrap();
    let lo = d.config_read(0x18, 4).unwrap();
    let hi = d.config_read(0x1c, 4).unwrap();
    let size = !((u64::from(hi) << 32) | u64::from(lo & !0xf)) + 1;
    assert_eq!(size, hw.bar.size, "sized like the hardware BAR");
    assert_eq!(lo & 0xf, hw_flags(&r), "flags kept");
    // The hardware did not move: the live importer's DMA still lands.
    assert_eq!(r.fabric.bar(r.gpu, 2).unwrap().bus, hw.bus);
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"still!!!")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"still!!!");
    // Single bytes too.
    d.config_write(0x1b, &[0x12]).unwrap();
    assert_eq!(r.fabric.bar(r.gpu, 2).unwrap().bus, hw.bus);
    assert_eq!(v.violation_count(), 0);
}

fn hw_flags(r: &Rig) -> u32 {
    r.fabric.config_read(r.gpu, 0x18, 4).unwrap() & 0xf
}

#[test]
fn low_power_stays_low_power_whatever_the_user_writes() {
    let r = rig();
    let (v, d, f) = exported(&r);
    let imp = live_mapping(&r, &f, b"mapped-1");
    d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_ENTRY))
        .unwrap();
    let exp = r.fabric.function(r.gpu).unwrap().caps().exp.unwrap();
    for (off, data) in [
        (pm_ctrl(&r), vec![0u8]),
        (pm_ctrl(&r), vec![0, 0]),
        (regs::COMMAND, vec![regs::COMMAND_MEMORY as u8]),
        (regs::COMMAND, vec![0x06, 0, 0, 0]),
        (exp + regs::EXP_DEVCTL + 1, vec![0x80]),
    ] {
        d.config_write(off, &data).unwrap();
        assert_eq!(
            r.fabric.power_state(r.gpu).unwrap(),
            peerdma_pci::PowerState::D3Hot,
            "write {data:?} at {off:#x}"
        );
        assert!(
            revoked_now(&f, &imp),
            "write {data:?} at {off:#x} brought the buffer back"
        );
    }
    d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT))
        .unwrap();
    assert!(!revoked_now(&f, &imp));
    assert_eq!(v.violation_count(), 0);
}

#[test]
fn config_access_bounds_are_efault_and_any_length_works() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    assert_eq!(d.config_write(0xfff, &[0, 0]), Err(Errno::EFAULT));
    assert_eq!(d.config_write(0x1000, &[0]), Err(Errno::EFAULT));
    let mut b = [0u8; 3];
    assert_eq!(d.read_config(0x1000, &mut b[..1]), Err(Errno::EFAULT));
    d.config_write(0x10, &[]).unwrap();
    // A 3-byte read at an odd offset: the vendor and device IDs' bytes in order.
    d.read_config(1, &mut b).unwrap();
    let id = r.fabric.config_read(r.gpu, 0, 4).unwrap().to_le_bytes();
    assert_eq!(b, [id[1], id[2], id[3]]);
    // The whole header in one read agrees with 4-byte reads.
    let mut all = [0u8; 64];
    d.read_config(0, &mut all).unwrap();
    for i in (0..64).step_by(4) {
        let w = d.config_read(i as u16, 4).unwrap().to_le_bytes();
        assert_eq!(&all[i..i + 4], &w, "dword {i:#x}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Any sequence of config writes — any offset in the first 0x100 bytes, any length up to
    /// 8, any bytes — keeps the promise: while the hardware does not decode memory (COMMAND
    /// off, or not D0) the buffer is revoked, a DMA to the old address does not land, and no
    /// violation is ever seen.
    #[test]
    fn any_config_writes_keep_revocation_with_hardware(
        ops in proptest::collection::vec((0u16..0x100, 0usize..9, proptest::collection::vec(proptest::prelude::any::<u8>(), 8)), 1..40)
    ) {
        let r = rig();
        let v = VfioPci::bind(&r.env, r.gpu).unwrap();
        let d = v.open().unwrap();
        let f = get(&r, export(&r, &d, &ok_req()).unwrap());
        let imp = import(&r, &f, r.nic1).unwrap();
        let pm = pm_ctrl(&r);
        for (off, len, bytes) in ops {
            // Bias towards the registers that matter.
            let off = match off % 5 { 0 => 4 + off % 4, 1 => pm + off % 4, _ => off };
            let _ = d.config_write(off, &bytes[..len]);
            let decoding = hw_command(&r) & regs::COMMAND_MEMORY != 0
                && r.fabric.power_state(r.gpu).unwrap() == peerdma_pci::PowerState::D0;
            let revoked = revoked_now(&f, &imp);
            if !decoding {
                proptest::prop_assert!(revoked, "hardware stopped decoding after {len} bytes at {off:#x} but the buffer is live");
            }
            let _ = r.fabric.dma_write(r.nic1, peerdma_pci::DmaAddr(0x1000), b"probe!!!");
        }
        proptest::prop_assert_eq!(v.violation_count(), 0);
    }
}

// ---- the lock order ---------------------------------------------------------------------

#[test]
fn the_lock_order_checker_catches_memory_lock_taken_under_a_reservation_lock() {
    // The planted inversion: an importer that, from its invalidation callback (the buffer's
    // reservation lock held), does something that takes the device's memory_lock.
    if !cfg!(debug_assertions) {
        return; // the checker runs with debug assertions only
    }
    let r = rig();
    let v = Arc::new(VfioPci::bind(&r.env, r.gpu).unwrap());
    let d = v.open().unwrap();
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    let b = f.dmabuf().unwrap();
    let g = b.lock();
    assert_eq!(
        peerdma_pci::sync::order::held(),
        [peerdma_pci::sync::order::Level::Resv]
    );
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.memory_enabled()));
    let msg = caught.unwrap_err();
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("lock order broken") && msg.contains("memory_lock"),
        "{msg}"
    );
    drop(g);
    assert!(peerdma_pci::sync::order::held().is_empty());
    assert!(d.memory_enabled(), "the right order is fine");
}

// ---- every two-operation interleaving at the named points ---------------------------------

/// The interleaving points in the importer, iommufd and export/release paths where no lock
/// is held (so another operation can run there).
const POINTS: [&str; 7] = [
    "odp.access.unlocked",
    "odp.register.attached",
    "odp.dereg.removed",
    "iommufd.map_file.attached",
    "iommufd.unmap.removed",
    "vfio.export.unlinked",
    "vfio.release.unlinking",
];
const OPS: [&str; 7] = [
    "odp access",
    "odp register",
    "odp deregister",
    "iommufd map",
    "iommufd unmap",
    "export",
    "release",
];
const DISRUPTIONS: [&str; 9] = [
    "memory off and on",
    "reset",
    "one-byte FLR",
    "low power in and out",
    "close and reopen",
    "odp deregister",
    "odp access",
    "iommufd unmap",
    "memory off",
];

/// Runs operation `op` with `disruption` injected at interleaving point `point`; returns
/// whether the disruption ran. Afterwards a revoke must finish, nothing may land through any
/// mapping made, and once everything is let go no mapping, IOMMU entry or violation is left.
type Fd = std::rc::Rc<peerdma_vfio::DeviceFd>;

fn interleaving(op: &'static str, point: &'static str, disruption: &'static str) -> bool {
    use peerdma_vfio::iommufd::Iommufd;
    use peerdma_vfio::rdma::OdpNic;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    let r = Rc::new(rig());
    let v = Rc::new(VfioPci::bind(&r.env, r.gpu).unwrap());
    let d: Rc<RefCell<Option<Fd>>> = Rc::new(RefCell::new(Some(Rc::new(v.open().unwrap()))));
    // The fd in use now, if open (the borrow ends at once: a disruption may close it).
    let cur = |d: &RefCell<Option<Fd>>| d.borrow().clone();
    let one = DmaBufRequest::new(2, vec![(0, 0x4000)]);
    let exp = |q: &DmaBufRequest| {
        let n = cur(&d).unwrap().feature(&r.proc, &q.to_bytes()).unwrap();
        let f = r.proc.dma_buf_get(n).unwrap();
        r.proc.close(n).unwrap();
        f
    };
    let f = exp(&one);
    let f2 = exp(&one);
    let nic = Rc::new(OdpNic::new(r.fabric.clone(), r.nic0));
    let key = nic.register_mr(&f).unwrap();
    assert_eq!(
        nic.write(key, 0, b"odp-live"),
        peerdma_vfio::rdma::Completion::Success
    );
    let ifd = Rc::new(Iommufd::open(&r.env).unwrap());
    let ioas = ifd.ioas_alloc().unwrap();
    ifd.attach(r.nic1, ioas).unwrap();
    let (x, y) = (0x100_0000u64, 0x200_0000u64);
    ifd.map_file(ioas, &f, 0, 0x4000, x).unwrap();
    let fired = Rc::new(Cell::new(false));
    let hook = {
        let (r, v, d, nic, ifd, fired) = (
            r.clone(),
            v.clone(),
            d.clone(),
            nic.clone(),
            ifd.clone(),
            fired.clone(),
        );
        peerdma_pci::sync::points::on(point, move || {
            if fired.replace(true) {
                return;
            }
            let with = |f: &dyn Fn(&peerdma_vfio::DeviceFd)| {
                if let Some(fd) = cur(&d) {
                    f(&fd);
                }
            };
            match disruption {
                "memory off and on" => with(&|fd| {
                    cmd(fd, false);
                    cmd(fd, true);
                }),
                "memory off" => with(&|fd| cmd(fd, false)),
                "reset" => with(&|fd| fd.reset().unwrap()),
                "one-byte FLR" => with(&|fd| {
                    let e = r.fabric.function(r.gpu).unwrap().caps().exp.unwrap();
                    fd.config_write(e + regs::EXP_DEVCTL + 1, &[0x80]).unwrap();
                }),
                "low power in and out" => with(&|fd| {
                    fd.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_ENTRY))
                        .unwrap();
                    fd.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT))
                        .unwrap();
                }),
                "close and reopen" => {
                    let old = d.borrow_mut().take();
                    drop(old);
                    *d.borrow_mut() = Some(Rc::new(v.open().unwrap()));
                }
                "odp deregister" => {
                    let _ = nic.dereg_mr(key);
                }
                "odp access" => {
                    let _ = nic.write(key, 8, b"odp-race");
                }
                "iommufd unmap" => {
                    let _ = ifd.unmap(ioas, x, 0x4000);
                }
                other => panic!("unknown disruption {other}"),
            }
        })
    };
    let mut new_keys = Vec::new();
    let mut f2 = Some(f2);
    match op {
        "odp access" => {
            let _ = nic.write(key, 16, b"odp-op!!");
        }
        "odp register" => new_keys.extend(nic.register_mr(&f).ok()),
        "odp deregister" => {
            let _ = nic.dereg_mr(key);
        }
        "iommufd map" => {
            let _ = ifd.map_file(ioas, &f, 0, 0x1000, y);
        }
        "iommufd unmap" => {
            let _ = ifd.unmap(ioas, x, 0x4000);
        }
        "export" => {
            if let Some(fd) = cur(&d) {
                if let Ok(n) = fd.feature(&r.proc, &one.to_bytes()) {
                    r.proc.close(n).unwrap();
                }
            }
        }
        "release" => {
            if let Some(g) = f2.take() {
                g.put();
            }
        }
        other => panic!("unknown op {other}"),
    }
    drop(hook);
    // A revoke now finishes, and afterwards nothing lands through any mapping made.
    if let Some(fd) = cur(&d) {
        cmd(&fd, false);
    }
    let before = bar0_at(&r, 0, 0x40);
    for k in std::iter::once(key).chain(new_keys.iter().copied()) {
        let _ = nic.write(k, 0, b"AFTER!!!");
    }
    for iova in [x, y] {
        let _ = r
            .fabric
            .dma_write(r.nic1, peerdma_pci::DmaAddr(iova), b"AFTER!!!");
    }
    assert_eq!(
        bar0_at(&r, 0, 0x40),
        before,
        "{op} / {disruption} at {point}: a DMA landed after the revoke"
    );
    assert_eq!(
        v.violation_count(),
        0,
        "{op} / {disruption} at {point}: {:?}",
        v.violations()
    );
    // Everything let go: nothing left behind.
    for k in std::iter::once(key).chain(new_keys) {
        let _ = nic.dereg_mr(k);
    }
    let _ = ifd.unmap(ioas, x, 0x4000);
    let _ = ifd.unmap(ioas, y, 0x1000);
    f.put();
    if let Some(g) = f2 {
        g.put();
    }
    d.borrow_mut().take();
    assert_eq!(
        v.live_mappings(),
        0,
        "{op} / {disruption} at {point}: {:?}",
        v.live_mapping_names()
    );
    let iommu = r.env.dma.iommu().unwrap();
    if let peerdma_dma::iommu::Attach::Paging(dom) = iommu.attachment(r.nic1) {
        assert_eq!(
            iommu.entries(dom),
            0,
            "{op} / {disruption} at {point}: IOMMU entries left"
        );
    }
    assert_eq!(
        v.dmabuf_count(),
        0,
        "{op} / {disruption} at {point}: buffers still linked"
    );
    fired.get()
}

#[test]
fn every_operation_with_every_disruption_at_every_point() {
    within_10s("the interleavings", || {
        let mut fired = 0;
        for op in OPS {
            for point in POINTS {
                for disruption in DISRUPTIONS {
                    fired += usize::from(interleaving(op, point, disruption));
                }
            }
        }
        // Every point is on some operation's path (each fires for all nine disruptions).
        assert!(
            fired >= POINTS.len() * DISRUPTIONS.len(),
            "only {fired} interleavings ran"
        );
    });
}

/// Without CONFIG_PM (`KernelConfig { pm: false }`, the harness's reference kernel) nothing
/// suspends and nothing wakes: a wakeup-armed low power survives every access, a second entry
/// is `EINVAL`, the buffer stays revoked and the device stays in D0; only the exit leaves.
#[test]
fn without_config_pm_nothing_wakes_a_device_in_low_power() {
    let r = rig();
    let v = VfioPci::bind_with(
        &r.env,
        r.gpu,
        peerdma_vfio::KernelConfig {
            pm: false,
            thp: false,
        },
    )
    .unwrap();
    let d = v.open().unwrap();
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    let entry = wakeup_entry(&r);
    assert_eq!(d.feature(&r.proc, &entry), Ok(0));
    assert_eq!(
        r.fabric.power_state(r.gpu).unwrap(),
        peerdma_pci::PowerState::D0,
        "nothing suspends it"
    );
    // Accesses of every kind: a probe, a config read, a config write.
    let probe = header_bytes(8, PROBE | GET | id::DMA_BUF);
    assert_eq!(d.feature(&r.proc, &probe), Ok(0));
    d.config_read(regs::COMMAND, 2).unwrap();
    cmd(&d, true);
    assert_eq!(d.wakeups(), 0);
    assert_eq!(import(&r, &f, r.nic1).err(), Some(Errno::ENODEV));
    assert_eq!(
        d.feature(&r.proc, &entry),
        Err(Errno::EINVAL),
        "still engaged"
    );
    let _imp = exit_and_land(&r, &d, &f, *b"exit-pm!");
    // After the exit an entry works again.
    assert_eq!(d.feature(&r.proc, &entry), Ok(0));
    assert_eq!(d.wakeups(), 0);
}

/// With CONFIG_PM a reset during (not wakeup-armed) low power runs with the device resumed
/// and brings the buffer back, and the device is suspended again at the end of the ioctl:
/// the mapping exists, but a DMA does not reach the BAR until the exit (as the CONFIG_PM
/// kernel showed: scenario `low-power-then-reset-with-pm`).
#[test]
fn with_config_pm_a_reset_in_low_power_leaves_the_device_suspended() {
    let r = rig();
    let v = VfioPci::bind_with(
        &r.env,
        r.gpu,
        peerdma_vfio::KernelConfig {
            pm: true,
            thp: false,
        },
    )
    .unwrap();
    let d = v.open().unwrap();
    let f = get(&r, export(&r, &d, &ok_req()).unwrap());
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_ENTRY)),
        Ok(0)
    );
    assert_eq!(d.reset(), Ok(()));
    assert_eq!(
        r.fabric.power_state(r.gpu).unwrap(),
        peerdma_pci::PowerState::D3Hot
    );
    let imp = import(&r, &f, r.nic1).unwrap();
    imp.map(&f).unwrap();
    let _ = r
        .fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"in-d3!!!");
    assert_ne!(bar0(&r, 8), b"in-d3!!!");
    assert_eq!(
        d.feature(&r.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT)),
        Ok(0)
    );
    r.fabric
        .dma_write(r.nic1, imp.first_addr().unwrap(), b"awake!!!")
        .unwrap();
    assert_eq!(bar0(&r, 8), b"awake!!!");
}

/// Divergence 8 (docs/divergences.md): the last close puts back the COMMAND saved at the
/// first open (here: an I/O decode bit the user cleared comes back), but turns memory decode
/// off where Linux leaves it on; the next open turns it on again.
#[test]
fn divergence_the_last_close_restores_command_but_memory_decode_off() {
    let r = rig();
    let v = VfioPci::bind(&r.env, r.gpu).unwrap();
    let d = v.open().unwrap();
    let at_open = r.fabric.command(r.gpu).unwrap();
    assert_ne!(at_open & regs::COMMAND_MEMORY, 0);
    d.config_write(regs::COMMAND, &[0, 0]).unwrap();
    d.close();
    let after = r.fabric.command(r.gpu).unwrap();
    assert_eq!(
        after & regs::COMMAND_MEMORY,
        0,
        "memory decode off after the close"
    );
    assert_eq!(
        after & !(regs::COMMAND_MEMORY | regs::COMMAND_MASTER),
        at_open & !(regs::COMMAND_MEMORY | regs::COMMAND_MASTER),
        "the rest as saved at the first open"
    );
    let d = v.open().unwrap();
    assert!(d.memory_enabled());
}

#[test]
fn unrevoke_waits_for_every_fence_before_the_buffer_is_live_again() {
    // `vfio_pci_dma_buf_move` waits for BOOKKEEP fences on the way back too: memory coming
    // back does not return, nor may anything map, until the fence added while revoked is
    // signalled.
    use peerdma_dmabuf::{Fence, Usage};
    let r = rig();
    let (_v, d, f) = exported(&r);
    let b = f.dmabuf().unwrap();
    d.config_write(regs::COMMAND, &0u16.to_le_bytes()).unwrap();
    let fence = Fence::new();
    b.lock().add_fence(fence.clone(), Usage::Bookkeep);
    let signaller = {
        let fence = fence.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            fence.signal();
        })
    };
    let start = std::time::Instant::now();
    d.config_write(regs::COMMAND, &regs::COMMAND_MEMORY.to_le_bytes())
        .unwrap();
    assert!(
        fence.is_signaled(),
        "the unrevoke returned before the fence was signalled"
    );
    assert!(start.elapsed() >= Duration::from_millis(90));
    signaller.join().unwrap();
    // Live again: an importer maps.
    let imp = import(&r, &f, r.nic1).unwrap();
    imp.map(&f).unwrap();
}
