//! The test machine (tests/platform.toml) and a BAR exporter built on `phys_vec_to_sgt`.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use peerdma_dma::{Direction, DmaConfig, DmaSystem};
use peerdma_dmabuf::buf::ops;
use peerdma_dmabuf::sgt::{DmaEnv, PhysVec, SgTable, free_sgt, phys_vec_to_sgt};
use peerdma_dmabuf::{Attachment, DmaBuf, DmaBufOps, ResvGuard};
use peerdma_p2pdma::{Binding, P2pDma, Provider};
use peerdma_pci::{Bdf, DmaAddr, Errno, Fabric, PhysAddr, file};

pub const PLATFORM: &str = include_str!("../platform.toml");

/// The machine: gpu0 (provider, BAR 2), nic0 (bus_addr), nic1 (thru_host_bridge), nic2
/// (not_supported).
pub struct Rig {
    pub fabric: Arc<Fabric>,
    pub env: DmaEnv,
    pub binding: Binding,
    pub provider: Provider,
    pub gpu: Bdf,
    pub nic0: Bdf,
    pub nic1: Bdf,
    pub nic2: Bdf,
    /// CPU address of gpu0's BAR 2.
    pub bar: u64,
}

/// The machine, with nic1 behind the IOMMU (`iommu`) or on dma-direct.
pub fn rig(iommu: bool) -> Rig {
    let fabric = Arc::new(file::load_str(PLATFORM, "platform.toml").unwrap());
    let dma = Arc::new(DmaSystem::new(fabric.clone(), true));
    let p2p = P2pDma::new(fabric.clone());
    let [gpu, nic0, nic1, nic2] =
        ["gpu0", "nic0", "nic1", "nic2"].map(|n| fabric.lookup(n).unwrap());
    for (d, mmu) in [(nic0, true), (nic1, iommu), (nic2, true)] {
        dma.configure(
            d,
            DmaConfig {
                iommu: mmu,
                ..DmaConfig::default()
            },
        )
        .unwrap();
    }
    let binding = p2p.bind(gpu).unwrap();
    binding.init().unwrap();
    let provider = binding.provider(2).unwrap().unwrap();
    let bar = fabric.bar(gpu, 2).unwrap().cpu.unwrap().get();
    Rig {
        fabric,
        env: DmaEnv { dma, p2p },
        binding,
        provider,
        gpu,
        nic0,
        nic1,
        nic2,
        bar,
    }
}

impl Rig {
    /// A range at `off` bytes into the BAR.
    pub fn range(&self, off: u64, len: u64) -> PhysVec {
        PhysVec {
            paddr: PhysAddr(self.bar + off),
            len,
        }
    }

    /// The importer writes `data` through the table at buffer offset `at` (split across
    /// entries as a device would).
    pub fn dma_write(&self, dev: Bdf, sgt: &SgTable, at: u64, data: &[u8]) -> Result<(), String> {
        let mut done = 0usize;
        while done < data.len() {
            let off = at + done as u64;
            let a = sgt.dma_addr_of(off).ok_or("outside the table")?;
            // Stay inside the entry.
            let mut pos = 0u64;
            let mut left = 0u64;
            for e in sgt.entries() {
                if off < pos + u64::from(e.len) {
                    left = pos + u64::from(e.len) - off;
                    break;
                }
                pos += u64::from(e.len);
            }
            let n = (data.len() - done).min(usize::try_from(left).unwrap());
            self.fabric
                .dma_write(dev, DmaAddr(a.get()), &data[done..done + n])
                .map_err(|e| e.to_string())?;
            done += n;
        }
        Ok(())
    }

    /// Bytes of gpu0's BAR 2 at `off`.
    pub fn bar_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fabric.bar_peek(self.gpu, 2, off, &mut v).unwrap();
        v
    }

    /// Nothing leaked or misused, per DMA debug.
    pub fn assert_clean(&self) {
        let r = self.env.dma.debug_report();
        assert!(r.is_empty(), "DMA debug: {r:#?}");
    }
}

/// A test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An exporter of ranges of a BAR, counting its calls.
pub struct BarExporter {
    pub env: DmaEnv,
    pub provider: Provider,
    pub ranges: Vec<PhysVec>,
    pub provides: u32,
    pub log: Mutex<Vec<String>>,
    pub releases: AtomicUsize,
    /// What `attach` returns.
    pub attach_result: Mutex<Result<(), Errno>>,
    /// What `pin` returns.
    pub pin_result: Mutex<Result<(), Errno>>,
    /// The buffer's reservation object id, when the exporter wants to check the lock.
    pub attach_saw_lock_free: Mutex<Vec<bool>>,
}

impl BarExporter {
    pub fn new(r: &Rig, ranges: Vec<PhysVec>, provides: u32) -> Arc<BarExporter> {
        BarExporter::with(r.env.clone(), r.provider.clone(), ranges, provides)
    }
    pub fn with(
        env: DmaEnv,
        provider: Provider,
        ranges: Vec<PhysVec>,
        provides: u32,
    ) -> Arc<BarExporter> {
        Arc::new(BarExporter {
            env,
            provider,
            ranges,
            provides,
            log: Mutex::new(Vec::new()),
            releases: AtomicUsize::new(0),
            attach_result: Mutex::new(Ok(())),
            pin_result: Mutex::new(Ok(())),
            attach_saw_lock_free: Mutex::new(Vec::new()),
        })
    }
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn note(&self, s: &str) {
        self.log.lock().unwrap().push(s.to_string());
    }
    pub fn releases(&self) -> usize {
        self.releases.load(Ordering::SeqCst)
    }
}

/// Every op the core requires.
pub const ALL: u32 = ops::MAP | ops::UNMAP | ops::RELEASE | ops::PIN | ops::UNPIN;
/// Required ops only (no pin: "always resident").
pub const NO_PIN: u32 = ops::MAP | ops::UNMAP | ops::RELEASE;

impl DmaBufOps for BarExporter {
    fn provides(&self) -> u32 {
        self.provides
    }
    fn attach(&self, buf: &DmaBuf, _a: &Attachment) -> Result<(), Errno> {
        let free = buf.resv().try_lock().is_some();
        self.attach_saw_lock_free.lock().unwrap().push(free);
        self.note("attach");
        *self.attach_result.lock().unwrap()
    }
    fn detach(&self, _buf: &DmaBuf, _a: &Attachment) {
        self.note("detach");
    }
    fn pin(&self, a: &Attachment, g: &ResvGuard<'_>) -> Result<(), Errno> {
        a.check_locked(g)?;
        self.note("pin");
        *self.pin_result.lock().unwrap()
    }
    fn unpin(&self, _a: &Attachment, _g: &ResvGuard<'_>) {
        self.note("unpin");
    }
    fn map(&self, a: &Attachment, dir: Direction, g: &ResvGuard<'_>) -> Result<SgTable, Errno> {
        self.note("map");
        let size = self.ranges.iter().map(|r| r.len).sum();
        phys_vec_to_sgt(
            &self.env,
            a,
            Some(&self.provider),
            &self.ranges,
            size,
            dir,
            g,
        )
    }
    fn unmap(&self, a: &Attachment, sgt: SgTable, dir: Direction, g: &ResvGuard<'_>) {
        self.note("unmap");
        free_sgt(&self.env, a, sgt, dir, g).unwrap();
    }
    fn release(&self, _buf: &DmaBuf) {
        self.note("release");
        self.releases.fetch_add(1, Ordering::SeqCst);
    }
}
