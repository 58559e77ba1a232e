//! The story `peerdma demo` tells, step by step, on an emulated machine: export a slice of a
//! GPU BAR, import it into a NIC beside the GPU (bus address) and into a device behind another
//! root port through iommufd (IOVA), DMA from both, reset the GPU, watch both importers lose
//! the memory, bring it back, close the device. Every step checks bytes and reports what it
//! saw; [`Step::ok`] is false where the system misbehaved.

use peerdma_pci::sync::Arc;

use peerdma_dma::{DmaConfig, DmaSystem};
use peerdma_dmabuf::Process;
use peerdma_dmabuf::sgt::DmaEnv;
use peerdma_p2pdma::{Device, P2pDma};
use peerdma_pci::{DmaAddr, Errno, Fabric};
use peerdma_uapi::feature::DmaBufRequest;

use crate::iommufd::Iommufd;
use crate::pci::VfioPci;
use crate::rdma::{Completion, OdpNic};

/// One step of the story.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Short name.
    pub step: String,
    /// What happened.
    pub detail: String,
    /// Whether it is what the system must do.
    pub ok: bool,
}

/// Which devices play which part.
#[derive(Debug, Clone)]
pub struct Cast {
    /// The exporting GPU and its BAR.
    pub gpu: String,
    /// The BAR.
    pub bar: u32,
    /// A NIC under the same switch (bus-address importer, on-demand paging).
    pub nic: String,
    /// A device behind another root port (iommufd importer).
    pub far: String,
}

impl Default for Cast {
    fn default() -> Self {
        Cast {
            gpu: "gpu0".into(),
            bar: 2,
            nic: "nic0".into(),
            far: "acc0".into(),
        }
    }
}

struct Log(Vec<Step>);

impl Log {
    fn say(&mut self, step: &str, ok: bool, detail: impl Into<String>) -> bool {
        self.0.push(Step {
            step: step.into(),
            detail: detail.into(),
            ok,
        });
        ok
    }
}

const IOVA: u64 = 0x100_0000;
const LEN: u64 = 0x10_0000;

/// Runs the story on `fabric`; stops at the first step that goes wrong.
pub fn run(fabric: &Arc<Fabric>, cast: &Cast) -> Vec<Step> {
    let mut log = Log(Vec::new());
    let _ = story(fabric, cast, &mut log);
    log.0
}

fn story(fabric: &Arc<Fabric>, cast: &Cast, log: &mut Log) -> Option<()> {
    let look = |n: &str| fabric.lookup(n).ok();
    let (Some(gpu), Some(nic), Some(far)) = (look(&cast.gpu), look(&cast.nic), look(&cast.far))
    else {
        log.say("cast", false, "the fabric lacks one of the devices");
        return None;
    };
    let dma = Arc::new(DmaSystem::new(fabric.clone(), true));
    for d in [nic, far] {
        dma.configure(
            d,
            DmaConfig {
                iommu: true,
                ..DmaConfig::default()
            },
        )
        .ok()?;
    }
    let env = DmaEnv {
        dma,
        p2p: P2pDma::new(fabric.clone()),
    };
    let proc = Process::new();
    let vfio = VfioPci::bind(&env, gpu).ok()?;
    let dev = vfio.open().ok()?;
    let bytes = DmaBufRequest::new(cast.bar, vec![(0, LEN)]).to_bytes();
    let fd = match dev.feature(&proc, &bytes) {
        Ok(fd) => fd,
        Err(e) => {
            log.say(
                "export",
                false,
                format!("VFIO_DEVICE_FEATURE DMA_BUF failed: {e}"),
            );
            return None;
        }
    };
    let file = proc.dma_buf_get(fd).ok()?;
    log.say(
        "export",
        true,
        format!(
            "{} BAR{} [0, {LEN:#x}) exported as dma-buf fd {fd}",
            cast.gpu, cast.bar
        ),
    );
    let provider = vfio.provider(cast.bar as u8)?;
    let kind = |c| env.p2p.map_type(&provider, &Device::Pci(c)).as_str();

    let bar_has = |off: u64, data: &[u8]| {
        let mut b = vec![0; data.len()];
        fabric.bar_peek(gpu, cast.bar as u8, off, &mut b).is_ok() && b == data
    };
    // The NIC beside the GPU.
    let rnic = OdpNic::new(fabric.clone(), nic);
    let key = rnic.register_mr(&file).ok()?;
    let c = rnic.write(key, 0x100, b"from the NIC");
    let ok = c == Completion::Success && bar_has(0x100, b"from the NIC");
    if !log.say(
        "nic-dma",
        ok,
        format!(
            "{} ({}) wrote through its memory region: {c}",
            cast.nic,
            kind(nic)
        ),
    ) {
        return None;
    }
    // The far device through iommufd.
    let ifd = Iommufd::open(&env).ok()?;
    let ioas = ifd.ioas_alloc().ok()?;
    ifd.attach(far, ioas).ok()?;
    let r = ifd.map_file(ioas, &file, 0, LEN, IOVA);
    let landed = r.is_ok()
        && fabric
            .dma_write(far, DmaAddr(IOVA + 0x200), b"via iommufd")
            .is_ok()
        && bar_has(0x200, b"via iommufd");
    if !log.say(
        "iommufd-dma",
        landed,
        format!(
            "{} ({}) mapped the buffer at IOVA {IOVA:#x} ({}) and wrote through it",
            cast.far,
            kind(far),
            outcome(&r)
        ),
    ) {
        return None;
    }
    // Reset the GPU.
    let before = (
        bar_has(0x100, b"from the NIC"),
        bar_has(0x200, b"via iommufd"),
    );
    let r = dev.reset();
    let dead = ifd.is_dead(ioas, IOVA) == Some(true) && !rnic.is_mapped(key);
    if !log.say(
        "flr",
        r.is_ok() && dead,
        format!(
            "VFIO_DEVICE_RESET {}; both importers invalidated: {}",
            outcome(&r),
            if dead { "yes" } else { "no" }
        ),
    ) {
        return None;
    }
    let faulted = fabric
        .dma_write(far, DmaAddr(IOVA + 0x200), b"LEAKED!!!!!")
        .is_err()
        && bar_has(0x200, b"via iommufd") == before.1;
    if !log.say(
        "old-addresses-fault",
        faulted,
        "the far device's DMA to its old IOVA faults in the IOMMU; the BAR is untouched",
    ) {
        return None;
    }
    // Memory off: maps are refused.
    let cmd = |on: bool| {
        dev.config_write(
            peerdma_pci::regs::COMMAND,
            &(if on {
                peerdma_pci::regs::COMMAND_MEMORY
            } else {
                0
            })
            .to_le_bytes(),
        )
    };
    cmd(false).ok()?;
    let c = rnic.write(key, 0x100, b"while off!!!");
    let m = ifd
        .unmap(ioas, IOVA, LEN)
        .and_then(|_| ifd.map_file(ioas, &file, 0, LEN, IOVA));
    let refused = c == Completion::MapFailed(Errno::ENODEV)
        && m == Err(Errno::ENODEV)
        && bar_has(0x100, b"from the NIC");
    if !log.say(
        "revoked-maps-refused",
        refused,
        format!(
            "memory decode off: NIC access {c}, iommufd map {}",
            outcome(&m)
        ),
    ) {
        return None;
    }
    // Memory back.
    cmd(true).ok()?;
    let c = rnic.write(key, 0x100, b"NIC is back!");
    let m = ifd.map_file(ioas, &file, 0, LEN, IOVA);
    let back = c == Completion::Success
        && m.is_ok()
        && fabric
            .dma_write(far, DmaAddr(IOVA + 0x200), b"far is back")
            .is_ok()
        && bar_has(0x100, b"NIC is back!")
        && bar_has(0x200, b"far is back");
    if !log.say(
        "memory-back",
        back,
        format!(
            "memory decode on: NIC access {c}, iommufd map {}, both DMAs landed",
            outcome(&m)
        ),
    ) {
        return None;
    }
    // Close the device: dead for good.
    dev.close();
    let c = rnic.write(key, 0x100, b"after close!");
    let _ = ifd.unmap(ioas, IOVA, LEN);
    let m = ifd.map_file(ioas, &file, 0, LEN, IOVA);
    let gone = c == Completion::MapFailed(Errno::ENODEV)
        && m == Err(Errno::ENODEV)
        && bar_has(0x100, b"NIC is back!");
    log.say(
        "closed",
        gone,
        format!(
            "device closed: NIC access {c}, iommufd map {}; the fd stays, the buffer is dead",
            outcome(&m)
        ),
    );
    let n = vfio.violation_count();
    log.say(
        "no-landing-while-revoked",
        n == 0,
        format!(
            "every DMA of the story was watched: {n} landed through a mapping that had been revoked, released or unmapped"
        ),
    );
    let _ = rnic.dereg_mr(key);
    file.put();
    Some(())
}

/// A result as words: "succeeded" or "failed with ENODEV (…)".
fn outcome<T>(r: &Result<T, Errno>) -> String {
    match r {
        Ok(_) => "succeeded".into(),
        Err(e) => format!("failed with {e}"),
    }
}
