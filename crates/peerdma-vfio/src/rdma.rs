//! An RDMA-style NIC as a dma-buf importer with on-demand paging (ODP): memory regions over
//! dma-bufs, mapped lazily at first access, dropped on invalidation, re-mapped on the next
//! access — which fails with a completion error while the buffer is revoked.
//!
//! Also a static importer (a display engine), which a vfio exporter refuses at attach.

use peerdma_pci::sync::{Arc, Mutex};
use std::collections::BTreeMap;

use peerdma_dma::Direction;
use peerdma_dmabuf::{Attachment, File, ImporterOps, ResvGuard, SgTable};
use peerdma_pci::{Bdf, DmaAddr, Errno, Fabric, sync};

/// How a work request completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The bytes moved.
    Success,
    /// No such memory region key.
    BadKey,
    /// Offset and length fall outside the region.
    OutOfBounds,
    /// The region could not be mapped on demand (the exporter's errno, e.g. `ENODEV` while
    /// revoked).
    MapFailed(Errno),
    /// The device's DMA faulted.
    DmaFault(String),
}

/// A region's mapping state. Changed only with the buffer's reservation lock held (the
/// invalidation callback runs under it, and `access` and `dereg_mr` take it), so whether the
/// region is still registered and whether it is mapped are decided together with the
/// exporter's revocation state.
struct MrState {
    table: Option<SgTable>,
    /// Cleared by `dereg_mr`; a region that is gone is never mapped again.
    registered: bool,
}

impl std::fmt::Display for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::Success => f.write_str("completed"),
            Completion::BadKey => f.write_str("no such memory region"),
            Completion::OutOfBounds => f.write_str("outside the memory region"),
            Completion::MapFailed(e) => write!(f, "could not map the region: {e}"),
            Completion::DmaFault(why) => write!(f, "the DMA faulted: {why}"),
        }
    }
}

struct Mr {
    file: Arc<File>,
    att: Arc<Attachment>,
    state: Arc<Mutex<MrState>>,
    len: u64,
}

/// The NIC.
pub struct OdpNic {
    dev: Bdf,
    fabric: Arc<Fabric>,
    mrs: Mutex<BTreeMap<u32, Mr>>,
    next: Mutex<u32>,
}

impl std::fmt::Debug for OdpNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdpNic")
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

const DIR: Direction = Direction::Bidirectional;

impl OdpNic {
    /// A NIC at `dev` on `fabric`.
    pub fn new(fabric: Arc<Fabric>, dev: Bdf) -> OdpNic {
        OdpNic {
            dev,
            fabric,
            mrs: Mutex::new(BTreeMap::new()),
            next: Mutex::new(1),
        }
    }

    /// Registers a memory region over a dma-buf (a dynamic, peer-to-peer, revocable
    /// attachment); nothing is mapped until first use. The region keeps its own file
    /// reference. Returns the key.
    pub fn register_mr(&self, file: &Arc<File>) -> Result<u32, Errno> {
        let buf = file.dmabuf().ok_or(Errno::EINVAL)?;
        let state = Arc::new(Mutex::new(MrState {
            table: None,
            registered: true,
        }));
        let (s2, f2) = (state.clone(), Arc::clone(file));
        let ops = ImporterOps {
            allow_peer2peer: true,
            invalidate: Some(Arc::new(move |a: &Attachment, g: &ResvGuard<'_>| {
                // Invalidate the region: drop the mapping now, map again on next access.
                if let (Some(t), Some(b)) = (sync::lock(&s2).table.take(), f2.dmabuf()) {
                    b.unmap_attachment(a, t, DIR, g);
                }
            })),
            stub: false,
        };
        let att = buf.dynamic_attach(Some(self.dev), Some(ops))?;
        sync::points::point("odp.register.attached");
        let mut n = sync::lock(&self.next);
        let key = *n;
        *n += 1;
        sync::lock(&self.mrs).insert(
            key,
            Mr {
                file: file.get(),
                att,
                state,
                len: buf.size(),
            },
        );
        Ok(key)
    }

    /// Whether region `key` is mapped now.
    pub fn is_mapped(&self, key: u32) -> bool {
        sync::lock(&self.mrs)
            .get(&key)
            .is_some_and(|m| sync::lock(&m.state).table.is_some())
    }

    /// Deregisters a region: unmaps, detaches, drops its file reference.
    pub fn dereg_mr(&self, key: u32) -> Result<(), Errno> {
        let mr = sync::lock(&self.mrs).remove(&key).ok_or(Errno::EINVAL)?;
        sync::points::point("odp.dereg.removed");
        if let Some(b) = mr.file.dmabuf() {
            {
                // Under the buffer's lock: an access that looked the region up before it was
                // removed sees it gone once it holds the lock, and maps nothing.
                let g = b.lock();
                let mut st = sync::lock(&mr.state);
                st.registered = false;
                if let Some(t) = st.table.take() {
                    b.unmap_attachment(&mr.att, t, DIR, &g);
                }
            }
            b.detach(&mr.att);
        }
        mr.file.put();
        Ok(())
    }

    /// An RDMA write of `data` at `offset` of region `key` (a remote peer's write landing in
    /// the region): maps on demand, then DMAs entry by entry.
    pub fn write(&self, key: u32, offset: u64, data: &[u8]) -> Completion {
        self.access(key, offset, data.len() as u64, |addr, at, n| {
            self.fabric
                .dma_write(self.dev, addr, &data[at..at + n])
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    /// An RDMA read of `buf.len()` bytes at `offset` of region `key`.
    pub fn read(&self, key: u32, offset: u64, buf: &mut [u8]) -> Completion {
        let len = buf.len() as u64;
        let cell = Mutex::new(buf);
        self.access(key, offset, len, |addr, at, n| {
            let mut b = sync::lock(&cell);
            self.fabric
                .dma_read(self.dev, addr, &mut b[at..at + n])
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn access(
        &self,
        key: u32,
        offset: u64,
        len: u64,
        mut dma: impl FnMut(DmaAddr, usize, usize) -> Result<(), String>,
    ) -> Completion {
        let (file, att, state, mr_len) = {
            let mrs = sync::lock(&self.mrs);
            let Some(m) = mrs.get(&key) else {
                return Completion::BadKey;
            };
            (m.file.clone(), m.att.clone(), m.state.clone(), m.len)
        };
        if offset.checked_add(len).is_none_or(|e| e > mr_len) {
            return Completion::OutOfBounds;
        }
        let Some(buf) = file.dmabuf() else {
            return Completion::MapFailed(Errno::EINVAL);
        };
        // The page-fault path: map under the reservation lock if not mapped, and do the
        // transfer while holding it so an invalidation waits for it.
        sync::points::point("odp.access.unlocked");
        let g = buf.lock();
        let mut st = sync::lock(&state);
        // Decided under the lock: a region deregistered since the look-up is gone.
        if !st.registered {
            return Completion::BadKey;
        }
        if st.table.is_none() {
            match buf.map_attachment(&att, DIR, &g) {
                Ok(s) => st.table = Some(s),
                Err(e) => return Completion::MapFailed(e),
            }
        }
        let Some(sgt) = st.table.as_ref() else {
            return Completion::MapFailed(Errno::ENOMEM);
        };
        let mut done = 0u64;
        let mut pos = 0u64;
        for e in sgt.entries() {
            let elen = u64::from(e.len);
            let (lo, hi) = (offset + done, offset + len);
            if lo < pos + elen && lo < hi {
                let n = (pos + elen).min(hi) - lo;
                let addr = DmaAddr(e.addr.get() + (lo - pos));
                #[allow(clippy::cast_possible_truncation)]
                if let Err(why) = dma(addr, done as usize, n as usize) {
                    return Completion::DmaFault(why);
                }
                done += n;
            }
            pos += elen;
        }
        Completion::Success
    }
}

/// A static importer (a display engine scanning out of a buffer): it cannot be told to let
/// go, so it attaches without importer operations.
#[derive(Debug)]
pub struct DisplayEngine {
    dev: Bdf,
}

impl DisplayEngine {
    /// A display engine at `dev`.
    pub fn new(dev: Bdf) -> DisplayEngine {
        DisplayEngine { dev }
    }

    /// Attaches for scan-out (a static attachment). A vfio exporter refuses it with
    /// `EOPNOTSUPP`: it is neither peer-to-peer capable nor revocable.
    pub fn attach(&self, file: &File) -> Result<Arc<Attachment>, Errno> {
        file.dmabuf().ok_or(Errno::EINVAL)?.attach(self.dev)
    }
}
