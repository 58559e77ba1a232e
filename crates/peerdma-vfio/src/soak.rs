//! A concurrent soak of the whole revocation system on the emulated machine: threads doing
//! what users and importers do, at once, on one exporting device, while the revocation watch
//! ([`crate::watch`]) judges every DMA and a watchdog looks for threads that stopped moving.
//!
//! Each thread picks operations at random (from its own seed): export and release dma-bufs;
//! attach, map, DMA, unmap and detach as a DMA-API importer; register, access and deregister
//! ODP memory regions; map, DMA through and unmap iommufd areas; memory decode off and on with
//! COMMAND writes of 1, 2 and 4 bytes; D3hot and D0 through PMCSR; PCIe FLR and AF FLR through
//! their bits; `VFIO_DEVICE_RESET`; hot reset; low-power entry and exit; close and reopen;
//! and config writes of every length at random offsets.
//!
//! At the end every importer lets go and the device is closed, then the run checks what must
//! be back: no violation, no IOMMU entries, no IOVA allocated, DMA debug empty, no live
//! mapping, no dma-buf linked, registration holders none, the process's fds none.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use peerdma_dma::Direction;
use peerdma_dma::iommu::Attach;
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Process, ResvGuard, SgTable};
use peerdma_pci::sync::{self, Arc, Mutex};
use peerdma_pci::{Bdf, DmaAddr, Fabric, regs};
use peerdma_uapi::feature::{DmaBufRequest, header_bytes};

use crate::feature::{SET, id};
use crate::iommufd::Iommufd;
use crate::rdma::OdpNic;
use crate::{DeviceFd, VfioPci};

const DIR: Direction = Direction::Bidirectional;
const SLOTS: usize = 6;
const IOVA_BASE: u64 = 0x1000_0000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads.
    pub threads: usize,
    /// Operations in all, over every thread.
    pub ops: u64,
    /// The first thread's seed (thread `i` uses `seed + i`).
    pub seed: u64,
    /// A thread whose operation has not finished after this long is reported stuck.
    pub stall: Duration,
    /// A broken importer planted among the good ones, to show the soak catches it.
    pub plant: Plant,
}

/// A planted misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Plant {
    /// None: every importer keeps the rules.
    #[default]
    None,
    /// The DMA-API importer keeps its last address after unmapping and DMAs to it now and
    /// then (the watch must name those landings).
    StaleAddress,
    /// The DMA-API importer ignores invalidations and never unmaps (the next revoke waits
    /// forever, as in Linux; the watchdog must name the stuck thread).
    NeverUnmap,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            threads: 4,
            ops: 200_000,
            seed: 1,
            stall: Duration::from_secs(30),
            plant: Plant::None,
        }
    }
}

/// How a soak ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// Operations done.
    pub ops: u64,
    /// Threads.
    pub threads: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// DMAs that landed (legally).
    pub landed: u64,
    /// Revocations started (memory off, D3hot, FLRs, resets, low power, closes).
    pub revokes: u64,
    /// The watch's violations, described.
    pub violations: Vec<String>,
    /// Threads that stopped moving: name and the operation it was in.
    pub stuck: Vec<String>,
    /// End-of-run checks that failed.
    pub leaks: Vec<String>,
}

impl Report {
    /// Whether the run kept every promise.
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.stuck.is_empty() && self.leaks.is_empty()
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // a rate for people to read
        let ops = self.ops as f64;
        ops / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "soak: {} operations on {} threads in {:.1} s ({:.0} ops/s); {} DMAs landed, {} revocations",
            self.ops,
            self.threads,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.landed,
            self.revokes
        )?;
        writeln!(
            f,
            "soak: {} violations, {} stuck threads, {} leaks",
            self.violations.len(),
            self.stuck.len(),
            self.leaks.len()
        )?;
        for v in &self.violations {
            writeln!(f, "  violation: {v}")?;
        }
        for s in &self.stuck {
            writeln!(f, "  stuck: {s}")?;
        }
        for l in &self.leaks {
            writeln!(f, "  leak: {l}")?;
        }
        Ok(())
    }
}

/// A DMA-API importer on one buffer: maps under the buffer's lock, DMAs under it (so an
/// invalidation waits for a transfer in flight), unmaps when told.
struct ApiImporter {
    file: Arc<File>,
    att: Arc<Attachment>,
    table: Arc<Mutex<Option<SgTable>>>,
}

struct Slot {
    file: Arc<File>,
    api: Option<ApiImporter>,
    mr: Option<u32>,
    area: Option<u64>,
}

/// The soak's machine ([`crate::testbed`]): gpu0 exports, nic0 imports through the DMA API
/// and as an ODP NIC, nic1 through iommufd.
struct World {
    fabric: Arc<Fabric>,
    env: DmaEnv,
    gpu: Bdf,
    nic0: Bdf,
    nic1: Bdf,
    vfio: VfioPci,
    fd: Mutex<Option<Arc<DeviceFd>>>,
    proc: Process,
    slots: Vec<Mutex<Option<Slot>>>,
    nic: OdpNic,
    iommufd: Iommufd,
    ioas: u32,
    landed: AtomicU64,
    revokes: AtomicU64,
    plant: Plant,
    /// The planted importer's remembered address.
    stale: Mutex<Option<DmaAddr>>,
}

/// One thread's progress, for the watchdog.
struct Beat {
    done: AtomicU64,
    op: Mutex<&'static str>,
    since: Mutex<Instant>,
    finished: AtomicBool,
}

fn world(plant: Plant) -> Result<World, String> {
    let crate::testbed::Testbed {
        fabric,
        env,
        gpu,
        nic0,
        nic1,
    } = crate::testbed::testbed()?;
    // The soak judges landings by the watch; DMA debug stays on to catch mapping misuse.
    let vfio = VfioPci::bind(&env, gpu).map_err(|e| format!("bind: {e}"))?;
    let fd = vfio.open().map_err(|e| format!("open: {e}"))?;
    let iommufd = Iommufd::open(&env).map_err(|e| format!("iommufd: {e}"))?;
    let ioas = iommufd.ioas_alloc().map_err(|e| format!("ioas: {e}"))?;
    iommufd
        .attach(nic1, ioas)
        .map_err(|e| format!("attach: {e}"))?;
    Ok(World {
        nic: OdpNic::new(fabric.clone(), nic0),
        fabric,
        env,
        gpu,
        nic0,
        nic1,
        vfio,
        fd: Mutex::new(Some(Arc::new(fd))),
        proc: Process::new(),
        slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
        iommufd,
        ioas,
        landed: AtomicU64::new(0),
        revokes: AtomicU64::new(0),
        plant,
        stale: Mutex::new(None),
    })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl World {
    fn fd(&self) -> Option<Arc<DeviceFd>> {
        sync::lock(&self.fd).clone()
    }

    fn revoke_event(&self) {
        self.revokes.fetch_add(1, Ordering::Relaxed);
    }

    fn config(&self, off: u16, data: &[u8]) {
        if let Some(fd) = self.fd() {
            let _ = fd.config_write(off, data);
        }
    }

    /// The exporting function's PM, PCIe and AF capability offsets.
    fn caps(&self) -> (Option<u16>, Option<u16>, Option<u16>) {
        self.fabric
            .function(self.gpu)
            .map(|f| {
                let c = f.caps();
                (c.pm, c.exp, c.af)
            })
            .unwrap_or_default()
    }

    fn export(&self, slot: usize, rng: &mut Rng) {
        let Some(fd) = self.fd() else { return };
        let mut s = sync::lock(&self.slots[slot]);
        if s.is_some() {
            return;
        }
        // One range for iommufd, sometimes two (iommufd refuses those).
        let ranges = if rng.below(4) == 0 {
            vec![(0x10_000 * slot as u64, 0x2000), (0x100_000, 0x1000)]
        } else {
            vec![(0x10_000 * slot as u64, 0x4000)]
        };
        let req = DmaBufRequest::new(2, ranges);
        let Ok(n) = fd.feature(&self.proc, &req.to_bytes()) else {
            return;
        };
        let Ok(file) = self.proc.dma_buf_get(n) else {
            return;
        };
        let _ = self.proc.close(n);
        *s = Some(Slot {
            file,
            api: None,
            mr: None,
            area: None,
        });
    }

    /// Lets go of everything on a slot and releases its buffer.
    fn release(&self, slot: usize) {
        let Some(mut s) = sync::lock(&self.slots[slot]).take() else {
            return;
        };
        Self::drop_api(&mut s);
        if let Some(k) = s.mr.take() {
            let _ = self.nic.dereg_mr(k);
        }
        if let Some(iova) = s.area.take() {
            let _ = self.iommufd.unmap(self.ioas, iova, 0x4000);
        }
        s.file.put();
    }

    fn drop_api(s: &mut Slot) {
        if let Some(a) = s.api.take() {
            if let Some(b) = a.file.dmabuf() {
                {
                    let g = b.lock();
                    if let Some(t) = sync::lock(&a.table).take() {
                        b.unmap_attachment(&a.att, t, DIR, &g);
                    }
                }
                b.detach(&a.att);
            }
        }
    }

    fn api_op(&self, slot: usize, rng: &mut Rng) {
        let mut g = sync::lock(&self.slots[slot]);
        let Some(s) = g.as_mut() else { return };
        let Some(buf) = s.file.dmabuf().cloned() else {
            return;
        };
        match (&s.api, rng.below(4)) {
            (None, _) => {
                let table: Arc<Mutex<Option<SgTable>>> = Arc::new(Mutex::new(None));
                let (t2, f2) = (table.clone(), s.file.clone());
                let deaf = self.plant == Plant::NeverUnmap;
                let ops = ImporterOps {
                    allow_peer2peer: true,
                    invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
                        if deaf {
                            return;
                        }
                        if let (Some(t), Some(b)) = (sync::lock(&t2).take(), f2.dmabuf()) {
                            b.unmap_attachment(a, t, DIR, g);
                        }
                    })),
                    stub: false,
                };
                if let Ok(att) = buf.dynamic_attach(Some(self.nic0), Some(ops)) {
                    s.api = Some(ApiImporter {
                        file: s.file.clone(),
                        att,
                        table,
                    });
                }
            }
            (Some(_), 0) => Self::drop_api(s),
            (Some(a), _) => {
                // Map if needed, then DMA through the mapping, all under the buffer's lock.
                let lock = buf.lock();
                let mut t = sync::lock(&a.table);
                if t.is_none() {
                    if let Ok(m) = buf.map_attachment(&a.att, DIR, &lock) {
                        *t = Some(m);
                    }
                }
                if self.plant == Plant::StaleAddress {
                    let mut st = sync::lock(&self.stale);
                    if let Some(e) = t.as_ref().and_then(|t| t.entries().first().copied()) {
                        *st = Some(e.addr);
                    } else if let Some(old) = *st {
                        let _ = self.fabric.dma_write(self.nic0, old, b"stale!!!");
                    }
                }
                if let Some(e) = t.as_ref().and_then(|t| t.entries().first().copied()) {
                    let at = rng.below(u64::from(e.len).max(16) - 8) & !7;
                    if self
                        .fabric
                        .dma_write(self.nic0, DmaAddr(e.addr.get() + at), b"api-dma!")
                        .is_ok()
                    {
                        self.landed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if rng.below(3) == 0 {
                    if let Some(m) = t.take() {
                        buf.unmap_attachment(&a.att, m, DIR, &lock);
                    }
                }
            }
        }
    }

    fn odp_op(&self, slot: usize, rng: &mut Rng) {
        let mut g = sync::lock(&self.slots[slot]);
        let Some(s) = g.as_mut() else { return };
        match s.mr {
            None => s.mr = self.nic.register_mr(&s.file).ok(),
            Some(k) if rng.below(5) == 0 => {
                let _ = self.nic.dereg_mr(k);
                s.mr = None;
            }
            Some(k) => {
                // The access itself runs without the slot's lock, as a NIC's would.
                drop(g);
                let off = rng.below(0x3000) & !7;
                if self.nic.write(k, off, b"odp-dma!") == crate::rdma::Completion::Success {
                    self.landed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn iommufd_op(&self, slot: usize, rng: &mut Rng) {
        let iova = IOVA_BASE + 0x10_0000 * slot as u64;
        let mut g = sync::lock(&self.slots[slot]);
        let Some(s) = g.as_mut() else { return };
        match s.area {
            None => {
                if self
                    .iommufd
                    .map_file(self.ioas, &s.file, 0, 0x2000, iova)
                    .is_ok()
                {
                    s.area = Some(iova);
                }
            }
            Some(at) if rng.below(4) == 0 => {
                let _ = self.iommufd.unmap(self.ioas, at, 0x2000);
                s.area = None;
            }
            Some(at) => {
                drop(g);
                let off = rng.below(0x2000 - 8) & !7;
                if self
                    .fabric
                    .dma_write(self.nic1, DmaAddr(at + off), b"ioas-dma")
                    .is_ok()
                {
                    self.landed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Undoes whatever keeps the buffers revoked: reopen, leave low power, D0, decode on.
    fn bring_back(&self) {
        let (pm, _, _) = self.caps();
        {
            let mut g = sync::lock(&self.fd);
            if g.is_none() {
                if let Ok(fd) = self.vfio.open() {
                    *g = Some(Arc::new(fd));
                }
            }
        }
        if let Some(fd) = self.fd() {
            let _ = fd.feature(&self.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT));
        }
        if let Some(pm) = pm {
            self.config(pm + regs::PM_CTRL, &[0]);
        }
        self.config(regs::COMMAND, &[regs::COMMAND_MEMORY as u8]);
    }

    fn device_op(&self, rng: &mut Rng) {
        let (pm, exp, af) = self.caps();
        if rng.below(2) == 0 {
            self.bring_back();
            return;
        }
        match rng.below(13) {
            0 => {
                self.revoke_event();
                let n = [1usize, 2, 4][rng.below(3) as usize];
                self.config(regs::COMMAND, &[0u8; 4][..n]);
            }
            1 => {
                let n = [1usize, 2, 4][rng.below(3) as usize];
                let v = [regs::COMMAND_MEMORY as u8, 0, 0, 0];
                self.config(regs::COMMAND, &v[..n]);
            }
            2 => {
                if let Some(pm) = pm {
                    self.revoke_event();
                    self.config(pm + regs::PM_CTRL, &[3u8, 0][..=(rng.below(2) as usize)]);
                }
            }
            3 => {
                if let Some(pm) = pm {
                    self.config(pm + regs::PM_CTRL, &[0u8, 0][..=(rng.below(2) as usize)]);
                }
            }
            4 => {
                if let Some(e) = exp {
                    self.revoke_event();
                    if rng.below(2) == 0 {
                        self.config(e + regs::EXP_DEVCTL + 1, &[0x80]);
                    } else {
                        self.config(e + regs::EXP_DEVCTL, &0x8000u16.to_le_bytes());
                    }
                }
            }
            5 => {
                if let Some(a) = af {
                    self.revoke_event();
                    self.config(a + regs::AF_CTRL, &[regs::AF_CTRL_FLR]);
                }
            }
            6 => {
                if let Some(fd) = self.fd() {
                    self.revoke_event();
                    let _ = fd.reset();
                }
            }
            7 => {
                if let Some(fd) = self.fd() {
                    self.revoke_event();
                    let _ = fd.hot_reset(&[&self.vfio]);
                }
            }
            8 => {
                if let Some(fd) = self.fd() {
                    self.revoke_event();
                    let _ = fd.feature(&self.proc, &header_bytes(8, SET | id::LOW_POWER_ENTRY));
                }
            }
            9 => {
                if let Some(fd) = self.fd() {
                    let _ = fd.feature(&self.proc, &header_bytes(8, SET | id::LOW_POWER_EXIT));
                }
            }
            10 => {
                // Close (the last reference to the fd closes it) or reopen.
                let mut g = sync::lock(&self.fd);
                if g.is_some() {
                    self.revoke_event();
                    let old = g.take();
                    drop(g);
                    drop(old);
                } else if let Ok(fd) = self.vfio.open() {
                    *g = Some(Arc::new(fd));
                }
            }
            _ => {
                // Any length at a random offset, biased to the header and the capabilities.
                let len = rng.below(9) as usize;
                let base =
                    [0u16, pm.unwrap_or(0x40), exp.unwrap_or(0x40), 0x40][rng.below(4) as usize];
                let off = base + rng.below(16) as u16;
                let bytes = rng.next().to_le_bytes();
                if off != regs::COMMAND || bytes[0] & regs::COMMAND_MEMORY as u8 == 0 {
                    self.revoke_event();
                }
                self.config(off, &bytes[..len]);
            }
        }
    }

    fn step(&self, rng: &mut Rng, beat: &Beat) {
        let slot = rng.below(SLOTS as u64) as usize;
        let (name, f): (&'static str, &dyn Fn(&mut Rng)) = match rng.below(16) {
            0 | 1 => ("export", &|r: &mut Rng| self.export(slot, r)),
            2 => ("release", &|_: &mut Rng| self.release(slot)),
            3..=5 => ("DMA-API importer", &|r: &mut Rng| self.api_op(slot, r)),
            6..=8 => ("ODP importer", &|r: &mut Rng| self.odp_op(slot, r)),
            9..=11 => ("iommufd importer", &|r: &mut Rng| self.iommufd_op(slot, r)),
            12 | 13 => ("device event", &|r: &mut Rng| self.device_op(r)),
            _ => ("DMA-API importer", &|r: &mut Rng| self.api_op(slot, r)),
        };
        *sync::lock(&beat.op) = name;
        *sync::lock(&beat.since) = Instant::now();
        f(rng);
        beat.done.fetch_add(1, Ordering::Release);
    }

    /// Everything let go: importers, buffers, the device fd.
    fn wind_down(&self) {
        for s in 0..SLOTS {
            self.release(s);
        }
        sync::lock(&self.fd).take();
    }

    fn leaks(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                out.push(what);
            }
        };
        let iommu = self.env.dma.iommu();
        for dev in [self.nic0, self.nic1] {
            if let Some(Attach::Paging(d)) = iommu.map(|i| i.attachment(dev)) {
                let n = iommu.map_or(0, |i| i.entries(d));
                check(n == 0, format!("{n} IOMMU entries left in {dev}'s domain"));
            }
            let p = self.env.dma.iova_pages_in_use(dev);
            check(p == 0, format!("{p} IOVA pages still allocated for {dev}"));
        }
        let dbg = self.env.dma.debug_report();
        check(dbg.is_empty(), format!("DMA debug reports {dbg:?}"));
        let live = self.vfio.live_mappings();
        check(live == 0, format!("{live} importer mappings still live"));
        let linked = self.vfio.dmabuf_count();
        check(
            linked == 0,
            format!("{linked} dma-bufs still linked to the device"),
        );
        let holders = self.vfio.registration().holders();
        check(
            holders.is_empty(),
            format!("registration still held by {holders:?}"),
        );
        // Beyond stdin, stdout and stderr.
        let fds: Vec<i32> = self.proc.fds().into_iter().filter(|&f| f > 2).collect();
        check(fds.is_empty(), format!("fds still open: {fds:?}"));
        let open = self.vfio.open_count();
        check(open == 0, format!("device still open {open} times"));
        out
    }
}

/// Runs a soak. Returns its report; a stuck thread is reported (and left behind: a hang
/// cannot be undone from outside), and the end-of-run checks are then skipped.
pub fn run(opts: &Options) -> Result<Report, String> {
    let w = Arc::new(world(opts.plant)?);
    let threads = opts.threads.max(1);
    let per = opts.ops / threads as u64;
    let beats: Vec<Arc<Beat>> = (0..threads)
        .map(|_| {
            Arc::new(Beat {
                done: AtomicU64::new(0),
                op: Mutex::new("starting"),
                since: Mutex::new(Instant::now()),
                finished: AtomicBool::new(false),
            })
        })
        .collect();
    let start = Instant::now();
    let mut handles = Vec::new();
    for (i, beat) in beats.iter().enumerate() {
        let (w, beat) = (w.clone(), beat.clone());
        let seed = opts.seed.wrapping_add(i as u64) | 1;
        let h = thread::Builder::new()
            .name(format!("soak-{i}"))
            .spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                for _ in 0..per {
                    w.step(&mut rng, &beat);
                }
                beat.finished.store(true, Ordering::Release);
            })
            .map_err(|e| e.to_string())?;
        handles.push(h);
    }
    // The watchdog: a thread in the same operation for longer than `stall` is stuck.
    let mut stuck = Vec::new();
    loop {
        if beats.iter().all(|b| b.finished.load(Ordering::Acquire)) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
        for (i, b) in beats.iter().enumerate() {
            if b.finished.load(Ordering::Acquire) {
                continue;
            }
            let since = *sync::lock(&b.since);
            if since.elapsed() > opts.stall {
                stuck.push(format!(
                    "soak-{i} has been in \"{}\" for {:.0} s after {} operations (holders of the device: {:?}; importer mappings live: {}: {})",
                    *sync::lock(&b.op),
                    since.elapsed().as_secs_f64(),
                    b.done.load(Ordering::Acquire),
                    w.vfio.registration().holders(),
                    w.vfio.live_mappings(),
                    w.vfio.live_mapping_names().join(", ")
                ));
            }
        }
        if !stuck.is_empty() {
            break;
        }
    }
    let elapsed = start.elapsed();
    let ops = beats.iter().map(|b| b.done.load(Ordering::Acquire)).sum();
    let mut leaks = Vec::new();
    if stuck.is_empty() {
        for h in handles {
            if h.join().is_err() {
                leaks.push("a soak thread panicked".into());
            }
        }
        w.wind_down();
        leaks.extend(w.leaks());
    }
    Ok(Report {
        ops,
        threads,
        elapsed,
        landed: w.landed.load(Ordering::Relaxed),
        revokes: w.revokes.load(Ordering::Relaxed),
        violations: {
            let v = w
                .vfio
                .violations()
                .iter()
                .map(ToString::to_string)
                .collect();
            // Reported here, so expected from now on.
            w.vfio.acknowledge_violations();
            v
        },
        stuck,
        leaks,
    })
}
