//! The revocation watch: every DMA that lands is attributed to the mapping it went through,
//! and a landing through a mapping that had been taken away is a violation, named.
//!
//! A *grant* is one mapping an importer holds: the DMA addresses it was given (a bus address
//! or an IOVA of the importing device, or an iommufd area's IOVA for any device in the IOAS)
//! and the physical bytes of the exporting device they reach. The exporter records a grant
//! when it hands out a scatter table (and iommufd when it writes an area's IOMMU entries), and
//! ends it when the mapping is given back.
//!
//! Every `DmaLanded` event of the fabric carries the requester, the address it was issued at,
//! where it landed, and the fabric tick at which the DMA started. A landing in memory that a
//! grant covers (the same address reaching the same physical byte, from the grant's device) is
//! legal when some such grant was alive at some moment of the DMA (born before it landed, not
//! gone before it started); when every grant that covers it was already gone — its buffer revoked (a revoke counts once it has finished: flag set,
//! importers told, fences waited for, every mapping given back), its buffer released, or the
//! mapping unmapped — the landing is a [`Violation`]. A device close revokes its buffers for
//! good, so a landing through a mapping made before a close is one too, also after a reopen.
//! A DMA that started before the mapping was taken away and landed while it was going is
//! in flight, as the kernel allows until the revoke returns.
//!
//! Ended grants are remembered (the newest [`HISTORY`]) so that a stale address can still be
//! named. Landings that no grant ever covered are not the watch's business: they did not come
//! through a dma-buf.

use peerdma_pci::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::collections::VecDeque;
use std::fmt;

use peerdma_pci::route::Target;
use peerdma_pci::{Bdf, Fabric, sync};

use peerdma_pci::sync::{Arc, Mutex};

/// How many ended grants per device are remembered for naming stale addresses.
pub const HISTORY: usize = 256;
/// How many violations per device are kept in full (all are counted).
pub const KEPT: usize = 1024;

/// A grant's name in its device's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub u64);

/// The watch's view of one exported buffer.
#[derive(Debug)]
pub(crate) struct BufWatch {
    /// The buffer's number on its device (1, 2, … in export order).
    pub(crate) serial: u64,
    /// The tick at which the current revocation finished (0: not revoked).
    pub(crate) revoked_at: AtomicU64,
    /// The tick at which the buffer was released (0: alive).
    pub(crate) released_at: AtomicU64,
}

impl BufWatch {
    pub(crate) fn new(serial: u64) -> BufWatch {
        BufWatch {
            serial,
            revoked_at: AtomicU64::new(0),
            released_at: AtomicU64::new(0),
        }
    }
}

/// Why a landing broke the promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The buffer had been revoked (by a revoke event, or for good by the device's close).
    Revoked,
    /// The buffer had been released.
    Released,
    /// The importer had unmapped the mapping (its IOMMU entries or address should be gone).
    Unmapped,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Revoked => "its dma-buf was revoked",
            Reason::Released => "its dma-buf was released",
            Reason::Unmapped => "the mapping had been unmapped",
        })
    }
}

/// A DMA that landed through a mapping that had been taken away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The exporting device.
    pub exporter: Bdf,
    /// The buffer's number on that device (export order, from 1).
    pub buffer: u64,
    /// The mapping it went through.
    pub mapping: GrantId,
    /// What the mapping was ("dma-buf map for 0000:02:00.0", "iommufd area").
    pub what: String,
    /// Why the mapping was no longer good.
    pub reason: Reason,
    /// The device that issued the DMA.
    pub requester: Bdf,
    /// The address it was issued at.
    pub addr: u64,
    /// Where it landed.
    pub target: Target,
    /// Bytes landed in this segment.
    pub len: u64,
    /// A write (else a read).
    pub write: bool,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DMA {} by {} at {:#x} ({} bytes) landed in {} through mapping #{} ({}) of dma-buf #{} of {}, but {}",
            if self.write { "write" } else { "read" },
            self.requester,
            self.addr,
            self.len,
            self.target,
            self.mapping.0,
            self.what,
            self.buffer,
            self.exporter,
            self.reason
        )
    }
}

/// One contiguous piece of a grant: `len` bytes from DMA address `dma` reach physical `phys`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub(crate) dma: u64,
    pub(crate) phys: u64,
    pub(crate) len: u64,
}

struct Grant {
    id: GrantId,
    buf: Arc<BufWatch>,
    /// The importing device (`None`: any device, as for an iommufd area).
    requester: Option<Bdf>,
    /// What hands it out: an attachment pointer and first address, for finding it at unmap.
    key: Option<(usize, u64)>,
    what: String,
    pieces: Vec<Piece>,
    born: u64,
    ended: u64,
}

impl Grant {
    fn covers(&self, requester: Bdf, addr: u64, phys: u64) -> bool {
        self.requester.is_none_or(|r| r == requester)
            && self.pieces.iter().any(|p| {
                addr.wrapping_sub(p.dma) < p.len && p.phys.wrapping_add(addr - p.dma) == phys
            })
    }

    /// Why the grant could not carry a DMA that started at `started` (None: it could).
    fn gone_at(&self, started: u64) -> Option<Reason> {
        let before = |t: u64| t != 0 && t < started;
        if before(self.buf.released_at.load(Ordering::SeqCst)) {
            Some(Reason::Released)
        } else if before(self.buf.revoked_at.load(Ordering::SeqCst)) {
            Some(Reason::Revoked)
        } else if before(self.ended) {
            Some(Reason::Unmapped)
        } else {
            None
        }
    }
}

#[derive(Default)]
struct Grants {
    live: Vec<Grant>,
    ended: VecDeque<Grant>,
    next: u64,
}

/// One device's ledger of grants and the violations found against them.
pub(crate) struct Ledger {
    exporter: Bdf,
    grants: Mutex<Grants>,
    /// Grants ever made (a fast "nothing to check" for devices that never exported).
    made: AtomicUsize,
    count: AtomicUsize,
    /// Violations someone has looked at and expected (a planted one).
    acknowledged: AtomicUsize,
    kept: Mutex<Vec<Violation>>,
}

impl Ledger {
    pub(crate) fn new(exporter: Bdf) -> Ledger {
        Ledger {
            exporter,
            grants: Mutex::new(Grants::default()),
            made: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            acknowledged: AtomicUsize::new(0),
            kept: Mutex::new(Vec::new()),
        }
    }

    /// Records a grant made at tick `born`.
    pub(crate) fn add(
        &self,
        buf: &Arc<BufWatch>,
        requester: Option<Bdf>,
        key: Option<(usize, u64)>,
        what: String,
        pieces: Vec<Piece>,
        born: u64,
    ) -> GrantId {
        let mut g = sync::lock(&self.grants);
        g.next += 1;
        let id = GrantId(g.next);
        g.live.push(Grant {
            id,
            buf: buf.clone(),
            requester,
            key,
            what,
            pieces,
            born,
            ended: 0,
        });
        self.made.fetch_add(1, Ordering::Release);
        id
    }

    /// Ends grant `id` at tick `at`.
    pub(crate) fn end(&self, id: GrantId, at: u64) {
        let mut g = sync::lock(&self.grants);
        if let Some(i) = g.live.iter().position(|x| x.id == id) {
            Self::retire(&mut g, i, at);
        }
    }

    /// Ends the live grant handed out under `key` (an unmap of that scatter table).
    pub(crate) fn end_key(&self, key: (usize, u64), at: u64) {
        let mut g = sync::lock(&self.grants);
        if let Some(i) = g.live.iter().rposition(|x| x.key == Some(key)) {
            Self::retire(&mut g, i, at);
        }
    }

    fn retire(g: &mut Grants, i: usize, at: u64) {
        let mut x = g.live.swap_remove(i);
        x.ended = at;
        if g.ended.len() == HISTORY {
            g.ended.pop_front();
        }
        g.ended.push_back(x);
    }

    /// Whether any grant was ever made (a device that never handed out a mapping has no
    /// landing to judge).
    pub(crate) fn has_grants(&self) -> bool {
        self.made.load(Ordering::Acquire) != 0
    }

    /// Grants alive now (mapped and not given back), for end-of-run checks.
    pub(crate) fn live(&self) -> usize {
        sync::lock(&self.grants).live.len()
    }

    /// The live grants, described ("mapping #3 (dma-buf map for 0000:03:00.0) of dma-buf #2").
    pub(crate) fn live_names(&self) -> Vec<String> {
        sync::lock(&self.grants)
            .live
            .iter()
            .map(|g| {
                format!(
                    "mapping #{} ({}) of dma-buf #{}",
                    g.id.0, g.what, g.buf.serial
                )
            })
            .collect()
    }

    /// Checks one landing at physical address `phys` of a DMA that started at tick
    /// `started` and had landed by tick `landed`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        &self,
        requester: Bdf,
        addr: u64,
        started: u64,
        landed: u64,
        phys: u64,
        target: Target,
        len: u64,
        write: bool,
    ) {
        let found = {
            let g = sync::lock(&self.grants);
            let mut gone: Option<(&Grant, Reason)> = None;
            let mut legal = false;
            for x in g.live.iter().rev().chain(g.ended.iter().rev()) {
                // A grant born after the DMA landed cannot have carried it; one born while it
                // was in flight can (its address was translated after the entries existed).
                if x.born >= landed || !x.covers(requester, addr, phys) {
                    continue;
                }
                match x.gone_at(started) {
                    None => {
                        legal = true;
                        break;
                    }
                    Some(r) => {
                        if gone.is_none() {
                            gone = Some((x, r));
                        }
                    }
                }
            }
            match (legal, gone) {
                (false, Some((x, reason))) => Some(Violation {
                    exporter: self.exporter,
                    buffer: x.buf.serial,
                    mapping: x.id,
                    what: x.what.clone(),
                    reason,
                    requester,
                    addr,
                    target,
                    len,
                    write,
                }),
                _ => None,
            }
        };
        if let Some(v) = found {
            tracing::error!(target: "peerdma::vfio", "revocation broken: {v}");
            self.count.fetch_add(1, Ordering::AcqRel);
            let mut k = sync::lock(&self.kept);
            if k.len() < KEPT {
                k.push(v);
            }
        }
    }

    /// Violations found so far.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Marks every violation so far as expected.
    pub(crate) fn acknowledge(&self) {
        self.acknowledged
            .store(self.count.load(Ordering::Acquire), Ordering::Release);
    }

    /// Violations nobody acknowledged.
    pub(crate) fn unacknowledged(&self) -> usize {
        self.count() - self.acknowledged.load(Ordering::Acquire).min(self.count())
    }

    /// The first [`KEPT`] violations.
    pub(crate) fn violations(&self) -> Vec<Violation> {
        sync::lock(&self.kept).clone()
    }
}

/// The physical address of the first byte of a landing (`None` if the BAR has no CPU address).
pub(crate) fn target_phys(fabric: &Fabric, t: &Target) -> Option<u64> {
    match *t {
        Target::Ram { addr } => Some(addr.get()),
        Target::Bar { bdf, bar, offset } => fabric
            .bar(bdf, bar)
            .ok()
            .and_then(|b| b.cpu)
            .map(|c| c.get().wrapping_add(offset)),
    }
}

/// A grant's birth: the fabric tick taken *before* the mapping's entries are written, so a
/// DMA that starts once they exist is never older than the grant that carries it.
pub fn birth(buf: &peerdma_dmabuf::DmaBuf) -> u64 {
    crate::pci::with_ledger(buf, |_, _, fabric| fabric.tick()).unwrap_or(0)
}

/// Records a grant on the vfio buffer `buf` for a mapping made outside the exporter (an
/// iommufd area): `len` bytes at `dma`, reaching `phys`, from `requester` (`None`: any
/// device), born at `born` (from [`birth`], taken before the entries were written). `None` if
/// `buf` is not a vfio dma-buf.
pub fn grant(
    buf: &peerdma_dmabuf::DmaBuf,
    requester: Option<Bdf>,
    piece: (u64, u64, u64),
    what: &str,
    born: u64,
) -> Option<GrantId> {
    let (dma, phys, len) = piece;
    crate::pci::with_ledger(buf, |l, w, _| {
        l.add(
            w,
            requester,
            None,
            what.to_string(),
            vec![Piece { dma, phys, len }],
            born,
        )
    })
}

/// Ends a grant made with [`grant`] (its mapping is gone).
pub fn end(buf: &peerdma_dmabuf::DmaBuf, id: GrantId) {
    crate::pci::with_ledger(buf, |l, _, fabric| l.end(id, fabric.tick()));
}
