//! What the fuzz targets share: a byte reader that never runs out, and the vfio test machine
//! (built once per process, see [`rig`]) with the checks every target makes between inputs.
//!
//! The machine is the built-in GPU server (`examples/gpu-server.toml`) with AF FLR added to the
//! GPUs, so a config write can reset gpu0 three ways (PCIe FLR, AF FLR, `VFIO_DEVICE_RESET`):
//! gpu0 exports from BAR 2; nic0 sits beside it under the switch (bus addresses); acc0 is
//! behind another root port (IOVAs through the IOMMU); nvme0 never DMAs and is used only to
//! learn which IOMMU domain an IOAS has.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use peerdma_dma::iommu::Attach;
use peerdma_dma::{Direction, DmaConfig, DmaSystem};
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Process, ResvGuard, SgTable};
use peerdma_p2pdma::P2pDma;
use peerdma_pci::fabric::SavedConfig;
use peerdma_pci::{Bdf, DmaAddr, Errno, Fabric, PowerState, examples, file, regs};
use peerdma_uapi::feature::header_bytes;
use peerdma_vfio::feature::{SET, id};
use peerdma_vfio::{DeviceFd, VfioPci};

/// Direction of every importer mapping the targets make.
pub const DIR: Direction = Direction::Bidirectional;
/// Exported ranges stay inside the first `WINDOW` bytes of a BAR, so the BAR's sparse memory
/// (which only grows) stays small however long a run lasts.
pub const WINDOW: u64 = 16 << 20;
/// A page.
pub const PAGE: u64 = 4096;

/// Reads fuzz input as a stream of numbers; past the end every read is 0 (and
/// [`Reader::done`] tells the caller to stop).
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, pos: 0 }
    }
    /// Whether every byte has been read.
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// The next 2 bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// The next 4 bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// The next 8 bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// The next `n` bytes (shorter at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = self.pos.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
    /// One of `n` choices (`n > 0`).
    pub fn pick(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n
    }
}

/// The vfio test machine: hardware, DMA system with an IOMMU, vfio-pci bound to gpu0.
pub struct Rig {
    /// The hardware.
    pub fabric: Arc<Fabric>,
    /// DMA mapping and P2PDMA.
    pub env: DmaEnv,
    /// The exporter.
    pub gpu: Bdf,
    /// Beside gpu0 under the switch: bus addresses.
    pub nic: Bdf,
    /// Behind another root port: IOVAs.
    pub acc: Bdf,
    /// Never DMAs; attached to an IOAS only to learn its domain.
    pub nvme: Bdf,
    /// vfio-pci on gpu0.
    pub vfio: VfioPci,
    /// gpu0's registers and the bridge above it as built, written back after every input.
    saved: Vec<(Bdf, SavedConfig)>,
    /// The IOMMU attachments of nic0, acc0 and nvme0 as built, put back after every input.
    attach: Vec<(Bdf, Attach)>,
}

impl std::fmt::Debug for Rig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rig")
            .field("gpu", &self.gpu)
            .finish_non_exhaustive()
    }
}

fn build() -> Rig {
    let text = examples::GPU_SERVER.replace("class = 0x030200", "class = 0x030200\naf_flr = true");
    let fabric = Arc::new(file::load_str(&text, "gpu-server.toml").expect("the example builds"));
    let [gpu, nic, acc, nvme] =
        ["gpu0", "nic0", "acc0", "nvme0"].map(|n| fabric.lookup(n).expect("device in example"));
    let dma = Arc::new(DmaSystem::new(fabric.clone(), true));
    for d in [nic, acc] {
        dma.configure(
            d,
            DmaConfig {
                iommu: true,
                ..DmaConfig::default()
            },
        )
        .expect("DMA config");
    }
    let env = DmaEnv {
        dma,
        p2p: P2pDma::new(fabric.clone()),
    };
    let vfio = VfioPci::bind(&env, gpu).expect("vfio-pci binds gpu0");
    assert!(vfio.p2p_ready(), "gpu0 can export");
    let bridge = fabric
        .upstream_bridge(gpu)
        .ok()
        .flatten()
        .expect("gpu0 is below a bridge");
    let saved = [bridge, gpu]
        .iter()
        .map(|&b| (b, fabric.save_config(b).expect("save config")))
        .collect();
    let iommu = env.dma.iommu().expect("the machine has an IOMMU");
    let attach = [nic, acc, nvme]
        .iter()
        .map(|&b| (b, iommu.attachment(b)))
        .collect();
    Rig {
        fabric,
        env,
        gpu,
        nic,
        acc,
        nvme,
        vfio,
        saved,
        attach,
    }
}

/// Switches libFuzzer's comparison tracing (`-sanitizer-coverage-trace-compares`) off and on
/// at run time.
///
/// `ci.sh` builds with `-sanitizer-coverage-gated-trace-callbacks` and `--cfg fuzz_cmp_gate`:
/// every traced comparison is then made only while the global `__sancov_should_track` is
/// non-zero. It starts at 0, so every target turns it on before its first input (`init:` of
/// `fuzz_target!` calls [`cmp_trace::on`]) and off only around work that is the same for
/// every input ([`Rig::open`], [`restore_config`]): there the comparisons (in the open, a
/// hash of the same address per config byte) cost most of the time and only flood
/// libFuzzer's table of recent comparisons. Edge coverage is not affected. Built without the
/// flags (`cargo fuzz run`), every comparison is traced and these functions do nothing.
#[allow(unexpected_cfgs)]
pub mod cmp_trace {
    #[cfg(fuzz_cmp_gate)]
    unsafe extern "C" {
        static mut __sancov_should_track: u64;
    }

    /// Sets tracing on or off; returns whether it was on.
    pub fn set(on: bool) -> bool {
        #[cfg(fuzz_cmp_gate)]
        // SAFETY: the gate is a plain word the instrumentation reads; the targets run on one
        // thread.
        unsafe {
            let g = &raw mut __sancov_should_track;
            let was = g.read_volatile() != 0;
            g.write_volatile(u64::from(on));
            was
        }
        #[cfg(not(fuzz_cmp_gate))]
        {
            let _ = on;
            true
        }
    }

    /// Turns tracing on (every target's `init`).
    pub fn on() {
        set(true);
    }
}

thread_local! {
    static RIG: &'static Rig = Box::leak(Box::new(build()));
    static INPUTS: Cell<u64> = const { Cell::new(0) };
}

/// The machine, built on first use in this process (libFuzzer calls the target on one
/// thread; the machine is leaked so hooks and importers may hold `&'static` references).
pub fn rig() -> &'static Rig {
    RIG.with(|r| *r)
}

impl Rig {
    /// Opens gpu0 (the group way: bound at once).
    ///
    /// The first open copies gpu0's 4 KiB config space into the per-open copy one byte at a
    /// time (`VConfig::init`), the same work whatever the input; its comparisons are not
    /// traced (see [`cmp_trace`]), which makes the open about three times cheaper.
    pub fn open(&self) -> DeviceFd {
        let was = cmp_trace::set(false);
        let dev = self.vfio.open();
        cmp_trace::set(was);
        dev.expect("gpu0 opens")
    }

    /// Offsets of the registers vfio-pci virtualises (the revocation triggers), and BARs.
    pub fn interesting_offsets(&self) -> Vec<u16> {
        let caps = self.fabric.function(self.gpu).expect("gpu0").caps();
        let mut v = vec![regs::COMMAND, regs::COMMAND + 1, 0x10, 0x18, 0x1c, 0x20];
        if let Some(pm) = caps.pm {
            v.extend([pm + regs::PM_CTRL, pm + regs::PM_CTRL + 1]);
        }
        if let Some(e) = caps.exp {
            v.extend([e + regs::EXP_DEVCTL, e + regs::EXP_DEVCTL + 1]);
        }
        if let Some(a) = caps.af {
            v.push(a + regs::AF_CTRL);
        }
        v
    }

    /// Whether gpu0's hardware decodes memory right now (COMMAND.MEMORY set and in D0), as
    /// the fabric sees it, whatever vfio-pci believes.
    pub fn decodes(&self) -> bool {
        let cmd = self.fabric.command(self.gpu).unwrap_or(0);
        let d0 = self
            .fabric
            .power_state(self.gpu)
            .is_ok_and(|p| p == PowerState::D0);
        cmd & regs::COMMAND_MEMORY != 0 && d0
    }

    /// gpu0 is in engaged low power and suspended (D3hot): on a CONFIG_PM kernel a reset
    /// then brings its buffers back, as Linux does, and the device is suspended again when
    /// the ioctl ends — live buffers on a device that does not decode (their DMA cannot
    /// reach the BAR; the watch would see it if it did).
    pub fn suspended_live(&self, d: Option<&DeviceFd>) -> bool {
        d.is_some_and(|d| {
            d.low_power_engaged() && self.fabric.power_state(self.gpu) == Ok(PowerState::D3Hot)
        })
    }

    /// Fails the input if the revocation watch saw a DMA land through a mapping that had been
    /// taken away.
    pub fn check_watch(&self) {
        let n = self.vfio.violation_count();
        assert!(
            n == 0,
            "revocation broken: {n} violation(s): {:#?}",
            self.vfio.violations()
        );
    }

    /// After an input: the caller has closed the device, dropped its importers and unmapped
    /// what it mapped; closes every fd the input left open, checks that nothing of the input
    /// survives (no buffer linked, no mapping held, no registration, no DMA-API leak) and
    /// puts gpu0's registers and the IOMMU attachments back as built.
    pub fn settle(&self, proc: &Process) {
        for fd in proc.fds() {
            if fd >= 3 {
                proc.close(fd).expect("close an open fd");
            }
        }
        self.check_watch();
        assert_eq!(self.vfio.open_count(), 0, "device still open");
        assert_eq!(self.vfio.dmabuf_count(), 0, "a dma-buf outlived its fds");
        assert_eq!(
            self.vfio.live_mappings(),
            0,
            "a mapping outlived its importer"
        );
        assert_eq!(
            self.vfio.registration().count(),
            1,
            "a registration reference outlived its holder"
        );
        let report = self.env.dma.debug_report();
        assert!(report.is_empty(), "DMA debug: {report:#?}");
        let _ = self.fabric.set_power_state(self.gpu, PowerState::D0);
        for (b, s) in &self.saved {
            // Most inputs leave the registers as built: then writing them back changes
            // nothing (`restore_config` writes the saved writable bits and keeps the rest),
            // and comparing a copy is much cheaper than the byte-by-byte write-back.
            if self.fabric.save_config(*b).as_ref() != Ok(s) {
                restore_config(&self.fabric, s);
            }
        }
        let iommu = self.env.dma.iommu().expect("IOMMU");
        for &(b, a) in &self.attach {
            iommu.attach(b, a).expect("re-attach");
        }
        INPUTS.with(|n| n.set(n.get() + 1));
    }

    /// The BAR `bar` bytes at `offset` (the device's side, no routing).
    pub fn peek(&self, bar: u8, offset: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fabric
            .bar_peek(self.gpu, bar, offset, &mut v)
            .expect("peek inside the BAR");
        v
    }
}

/// Writes registers saved when the machine was built back (between inputs), without tracing
/// its comparisons: a walk over all 4 KiB whose comparisons are the same for every input.
pub fn restore_config(fabric: &Fabric, saved: &SavedConfig) {
    let was = cmp_trace::set(false);
    let res = fabric.restore_config(saved);
    cmp_trace::set(was);
    res.expect("restore config");
}

/// A page-aligned range inside [`WINDOW`]: (offset, length), 1 to 16 pages.
pub fn window_range(r: &mut Reader<'_>) -> (u64, u64) {
    let off = u64::from(r.u16()) % (WINDOW / PAGE) * PAGE;
    let len = (u64::from(r.u8() % 16) + 1) * PAGE;
    (off, len)
}

/// The BAR offset of byte `at` of a buffer made of `ranges` (offsets into the BAR).
pub fn bar_offset(ranges: &[(u64, u64)], mut at: u64) -> Option<u64> {
    for &(off, len) in ranges {
        if at < len {
            return Some(off + at);
        }
        at -= len;
    }
    None
}

/// Checks that `data` is what the BAR holds for buffer bytes `[at, at + data.len())`.
pub fn check_landed(rig: &Rig, bar: u8, ranges: &[(u64, u64)], at: u64, data: &[u8]) {
    // One peek per range the bytes fall in (not one per byte).
    let mut done = 0usize;
    let mut got = Vec::new();
    while done < data.len() {
        let pos = at + done as u64;
        let o = bar_offset(ranges, pos).expect("inside the buffer");
        let room = room_in_range(ranges, pos).expect("inside the buffer");
        let n = (data.len() - done).min(usize::try_from(room).unwrap_or(usize::MAX));
        got.resize(n, 0);
        rig.fabric
            .bar_peek(rig.gpu, bar, o, &mut got)
            .expect("peek inside the BAR");
        if let Some(i) = (0..n).find(|&i| got[i] != data[done + i]) {
            panic!(
                "buffer byte {:#x} (BAR{bar}+{:#x}) after a successful DMA: {:#x}, wrote {:#x}",
                pos + i as u64,
                o + i as u64,
                got[i],
                data[done + i]
            );
        }
        done += n;
    }
}

/// How many buffer bytes from byte `at` on lie in the same range as it.
fn room_in_range(ranges: &[(u64, u64)], mut at: u64) -> Option<u64> {
    for &(_, len) in ranges {
        if at < len {
            return Some(len - at);
        }
        at -= len;
    }
    None
}

/// A well-behaved dynamic importer (as an RDMA or GPU driver would be): peer-to-peer
/// capable, it drops its mapping when told to, holds its own file reference, and DMAs only
/// through the mapping it holds.
pub struct Importer {
    /// The importing device.
    pub dev: Bdf,
    /// The buffer's file (the importer's own reference).
    pub file: Arc<File>,
    /// The attachment.
    pub att: Arc<Attachment>,
    /// The mapping it holds, if any.
    pub table: Arc<Mutex<Option<SgTable>>>,
    /// The first DMA address of the last mapping it held (kept after it is taken away).
    pub last: Cell<Option<(DmaAddr, u64)>>,
    /// Detached (the attachment must never map again).
    pub detached: bool,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

impl Importer {
    /// Attaches `dev` to the buffer of `file`.
    pub fn attach(file: &Arc<File>, dev: Bdf) -> Result<Importer, Errno> {
        let table: Arc<Mutex<Option<SgTable>>> = Arc::new(Mutex::new(None));
        let own = file.get();
        let (t2, f2) = (table.clone(), Arc::clone(file));
        let ops = ImporterOps {
            allow_peer2peer: true,
            invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
                if let (Some(t), Some(b)) = (lock(&t2).take(), f2.dmabuf()) {
                    b.unmap_attachment(a, t, DIR, g);
                }
            })),
            stub: false,
        };
        let buf = file.dmabuf().ok_or(Errno::EINVAL)?;
        match buf.dynamic_attach(Some(dev), Some(ops)) {
            Ok(att) => Ok(Importer {
                dev,
                file: own,
                att,
                table,
                last: Cell::new(None),
                detached: false,
            }),
            Err(e) => {
                own.put();
                Err(e)
            }
        }
    }

    /// Maps (under the buffer's lock) if not mapped.
    pub fn map(&self) -> Result<(), Errno> {
        let b = self.file.dmabuf().ok_or(Errno::EINVAL)?;
        let g = b.lock();
        let mut t = lock(&self.table);
        if t.is_some() {
            return Ok(());
        }
        let s = b.map_attachment(&self.att, DIR, &g)?;
        let total: u64 = s.entries().iter().map(|e| u64::from(e.len)).sum();
        if let Some(e) = s.entries().first() {
            self.last.set(Some((e.addr, total)));
        }
        *t = Some(s);
        Ok(())
    }

    /// Gives the mapping back.
    pub fn unmap(&self) {
        if let Some(b) = self.file.dmabuf() {
            let g = b.lock();
            if let Some(t) = lock(&self.table).take() {
                b.unmap_attachment(&self.att, t, DIR, &g);
            }
        }
    }

    /// Whether it holds a mapping now.
    pub fn mapped(&self) -> bool {
        lock(&self.table).is_some()
    }

    /// The DMA address of buffer byte `at` through the mapping held, and how many bytes from
    /// there are contiguous.
    pub fn addr_of(&self, at: u64) -> Option<(DmaAddr, u64)> {
        let t = lock(&self.table);
        let mut pos = 0u64;
        for e in t.as_ref()?.entries() {
            let len = u64::from(e.len);
            if at < pos + len {
                return Some((DmaAddr(e.addr.get() + (at - pos)), pos + len - at));
            }
            pos += len;
        }
        None
    }

    /// Unmaps, detaches (the attachment is kept, to try a map on it later).
    pub fn detach(&mut self) {
        if self.detached {
            return;
        }
        self.unmap();
        if let Some(b) = self.file.dmabuf() {
            b.detach(&self.att);
        }
        self.detached = true;
    }

    /// Unmaps, detaches, gives the file reference back.
    pub fn drop_all(mut self) {
        self.detach();
        self.file.put();
    }
}

/// Locks, ignoring poison (a panic fails the input anyway).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Installs an eventfd-like file in `proc` (for low power with wakeup) and returns its fd.
pub fn install_eventfd(proc: &Process) -> i32 {
    proc.install(File::other("eventfd"), true)
        .map_err(|(e, _)| e)
        .expect("install an eventfd")
}

/// A revocation (or its undoing) on the open device, chosen by `what`: memory decode off or
/// on, `VFIO_DEVICE_RESET`, D3hot or D0 through PMCSR, low-power entry (plain or with the
/// wakeup eventfd `efd`) or exit, and — with `hot_reset` — a hot reset of gpu0's bus.
pub fn revoke(rig: &Rig, dev: &DeviceFd, proc: &Process, efd: i32, what: u8, hot_reset: bool) {
    let cmd = rig.fabric.command(rig.gpu).unwrap_or(0);
    let pm = rig.fabric.function(rig.gpu).expect("gpu0").caps().pm;
    let _ = match what % if hot_reset { 9 } else { 8 } {
        0 => dev.config_write(regs::COMMAND, &(cmd & !regs::COMMAND_MEMORY).to_le_bytes()),
        1 => dev.config_write(regs::COMMAND, &(cmd | regs::COMMAND_MEMORY).to_le_bytes()),
        2 => dev.reset(),
        3 => pm.map_or(Ok(()), |pm| {
            dev.config_write(pm + regs::PM_CTRL, &3u16.to_le_bytes())
        }),
        4 => pm.map_or(Ok(()), |pm| {
            dev.config_write(pm + regs::PM_CTRL, &0u16.to_le_bytes())
        }),
        5 => dev
            .feature(proc, &header_bytes(8, SET | id::LOW_POWER_ENTRY))
            .map(drop),
        6 => {
            let mut b = header_bytes(16, SET | id::LOW_POWER_ENTRY_WITH_WAKEUP);
            b.extend_from_slice(&efd.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            dev.feature(proc, &b).map(drop)
        }
        7 => dev
            .feature(proc, &header_bytes(8, SET | id::LOW_POWER_EXIT))
            .map(drop),
        _ => dev.hot_reset(&[&rig.vfio]),
    };
}
