//! dma-buf objects, their files, and a process's fd table (drivers/dma-buf/dma-buf.c, Linux
//! 7.2 semantics: no sg_table caching, pin-on-map for static importers, invalidation fan-out
//! to dynamic importers).
//!
//! Locking, as the kernel's convention: export, fd, get, put, attach, detach run without the
//! reservation lock (the exporter's `attach`/`detach`/`release` may take it); pin, unpin, map,
//! unmap and invalidation need it — they take a [`ResvGuard`] and check it is this buffer's.

use peerdma_pci::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::any::Any;
use std::collections::BTreeMap;

use peerdma_dma::Direction;
use peerdma_pci::sync::{self, Arc, Mutex};
use peerdma_pci::{Bdf, Errno};

use crate::resv::{Resv, ResvGuard, Usage};
use crate::sgt::SgTable;

/// Which exporter operations exist (the kernel checks presence at export).
pub mod ops {
    /// `map_dma_buf`.
    pub const MAP: u32 = 1;
    /// `unmap_dma_buf`.
    pub const UNMAP: u32 = 2;
    /// `release`.
    pub const RELEASE: u32 = 4;
    /// `pin`.
    pub const PIN: u32 = 8;
    /// `unpin`.
    pub const UNPIN: u32 = 16;
    /// `mmap` (a CPU mapping of the buffer's file).
    pub const MMAP: u32 = 32;
}

/// `lseek` whence values.
pub mod whence {
    /// `SEEK_SET`.
    pub const SET: i32 = 0;
    /// `SEEK_CUR`.
    pub const CUR: i32 = 1;
    /// `SEEK_END`.
    pub const END: i32 = 2;
    /// `SEEK_DATA`.
    pub const DATA: i32 = 3;
    /// `SEEK_HOLE`.
    pub const HOLE: i32 = 4;
}

/// The page size the memfd page cache is kept in.
const PAGE: u64 = 4096;

/// `O_ACCMODE | O_NONBLOCK`: what a dma-buf file keeps of the export flags.
pub const FILE_FLAGS_KEPT: u32 = 0o3 | 0o4000;

/// An exporter (`struct dma_buf_ops`).
pub trait DmaBufOps: Send + Sync {
    /// Which operations this exporter provides ([`ops`] bits).
    fn provides(&self) -> u32;
    /// `attach`, called without the reservation lock.
    fn attach(&self, _buf: &DmaBuf, _a: &Attachment) -> Result<(), Errno> {
        Ok(())
    }
    /// `detach`, without the lock.
    fn detach(&self, _buf: &DmaBuf, _a: &Attachment) {}
    /// `pin`, with the lock.
    fn pin(&self, _a: &Attachment, _g: &ResvGuard<'_>) -> Result<(), Errno> {
        Ok(())
    }
    /// `unpin`, with the lock.
    fn unpin(&self, _a: &Attachment, _g: &ResvGuard<'_>) {}
    /// `map_dma_buf`, with the lock.
    fn map(&self, a: &Attachment, dir: Direction, g: &ResvGuard<'_>) -> Result<SgTable, Errno>;
    /// `unmap_dma_buf`, with the lock.
    fn unmap(&self, a: &Attachment, sgt: SgTable, dir: Direction, g: &ResvGuard<'_>);
    /// `release`, when the last file reference goes.
    fn release(&self, buf: &DmaBuf);
    /// `mmap` of `len` bytes at `offset` (page aligned, inside the buffer), asked only of
    /// an exporter that provides [`ops::MMAP`]; the mapping is shared and read-only.
    fn mmap(&self, _buf: &DmaBuf, _offset: u64, _len: u64) -> Result<(), Errno> {
        Ok(())
    }
    /// The exporter itself, for importers that have a private interconnect with a known
    /// exporter (iommufd with vfio); `None` for exporters that offer none.
    fn interconnect(&self) -> Option<&dyn Any> {
        None
    }
}

/// What an exporter asks `dma_buf_export` for.
pub struct ExportInfo {
    /// `exp_name`.
    pub exp_name: String,
    /// Size in bytes.
    pub size: u64,
    /// Open flags for the file.
    pub flags: u32,
    /// The exporter; `None` models a missing ops table.
    pub ops: Option<Arc<dyn DmaBufOps>>,
    /// Whether the exporter gave a private pointer.
    pub has_priv: bool,
}

/// The invalidation callback of a dynamic importer.
pub type Invalidate = Arc<dyn Fn(&Attachment, &ResvGuard<'_>) + Send + Sync>;

/// A dynamic importer's operations (`struct dma_buf_attach_ops`).
#[derive(Clone)]
pub struct ImporterOps {
    /// `allow_peer2peer`: it can handle P2P addresses.
    pub allow_peer2peer: bool,
    /// `invalidate_mappings` (`move_notify` before 7.1); `None` models a missing callback.
    pub invalidate: Option<Invalidate>,
    /// The callback is the RDMA "cannot be invalidated" stub: present, but the importer is
    /// not revocable.
    pub stub: bool,
}

/// An attachment of a device to a buffer.
pub struct Attachment {
    /// The importing device.
    pub dev: Bdf,
    /// Whether it may receive P2P addresses.
    pub peer2peer: bool,
    /// Its operations, for a dynamic importer.
    pub importer: Option<ImporterOps>,
    /// The exporter's per-attachment data.
    pub exporter_priv: Mutex<Option<Box<dyn Any + Send>>>,
    resv_id: u64,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("dev", &self.dev)
            .field("peer2peer", &self.peer2peer)
            .field("dynamic", &self.is_dynamic())
            .finish_non_exhaustive()
    }
}

impl Attachment {
    /// `dma_buf_attachment_is_dynamic`.
    pub fn is_dynamic(&self) -> bool {
        self.importer.is_some()
    }
    /// `dma_buf_attach_revocable` (7.1+): a dynamic importer with a real invalidation callback.
    pub fn is_revocable(&self) -> bool {
        self.importer
            .as_ref()
            .is_some_and(|o| o.invalidate.is_some() && !o.stub)
    }

    /// `EINVAL` (with a warning) unless `g` is the lock of the buffer this attachment is on.
    pub fn check_locked(&self, g: &ResvGuard<'_>) -> Result<(), Errno> {
        if g.resv_id() == self.resv_id {
            Ok(())
        } else {
            tracing::warn!(target: "peerdma::dmabuf", "called without the buffer's reservation lock");
            Err(Errno::EINVAL)
        }
    }
}

/// A dma-buf. Laid out in declaration order: the reservation object first, so that its id
/// and its lock share the buffer's first cache line (an exporter walking many buffers can
/// warm that line ahead of the lock by reading the id).
#[repr(C)]
pub struct DmaBuf {
    /// Holds the attachment list too (see [`Attached`]).
    resv: Resv,
    size: u64,
    exp_name: String,
    ops: Arc<dyn DmaBufOps>,
    released: AtomicBool,
}

/// One entry of a buffer's attachment list, kept under the reservation lock: the attachment
/// and, for a dynamic importer, its invalidation callback beside it, so that invalidation
/// walks one contiguous list and calls each callback without first visiting its attachment.
pub(crate) struct Attached {
    att: Arc<Attachment>,
    invalidate: Option<Invalidate>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.att.fmt(f)
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("size", &self.size)
            .field("exp_name", &self.exp_name)
            .finish_non_exhaustive()
    }
}

/// The seals of a memfd (include/uapi/linux/fcntl.h `F_SEAL_*`).
pub mod seal {
    /// No more seals may be added.
    pub const SEAL: u32 = 0x1;
    /// The file may not shrink.
    pub const SHRINK: u32 = 0x2;
    /// The file may not grow.
    pub const GROW: u32 = 0x4;
    /// No writes, no writable shared mappings.
    pub const WRITE: u32 = 0x8;
    /// No new writes or writable mappings; existing mappings keep writing.
    pub const FUTURE_WRITE: u32 = 0x10;
    /// The exec bits of the file mode are fixed.
    pub const EXEC: u32 = 0x20;
    /// Every seal (mm/memfd.c `F_ALL_SEALS`).
    pub const ALL: u32 = SEAL | SHRINK | GROW | WRITE | FUTURE_WRITE | EXEC;
}

/// What a file is.
#[derive(Debug)]
pub enum FileKind {
    /// A dma-buf.
    DmaBuf(Arc<DmaBuf>),
    /// An eventfd (`eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`): a 64-bit counter that a
    /// signal adds to and a read takes (fs/eventfd.c).
    Eventfd(AtomicU64),
    /// A memfd (shmem): `size` bytes of RAM, contiguous here at CPU physical address
    /// `base` (mm/shmem.c; Linux scatters the pages, which no user of the fd can tell).
    Memfd {
        /// Where its bytes are in RAM.
        base: u64,
        /// Its size (`ftruncate`).
        size: u64,
        /// The pages (index from 0) that are in the page cache. A fresh memfd has none;
        /// pinning a range for iommufd allocates its pages (`memfd_pin_folios`), and reads
        /// of holes allocate nothing. `SEEK_DATA` and `SEEK_HOLE` see this.
        resident: std::sync::Mutex<std::collections::BTreeSet<u64>>,
        /// Its seals ([`seal`] bits; `F_GET_SEALS`). A memfd made without
        /// `MFD_ALLOW_SEALING` starts with [`seal::SEAL`], so it can never take another.
        seals: AtomicU32,
    },
    /// Some other file (to test that dma-buf calls refuse it).
    Other(String),
    /// A VFIO group's char device (`/dev/vfio/N`): no read, seek or mmap methods, so it
    /// answers those as [`FileKind::Other`] does. `id` names the group for whoever opened
    /// it; `release` runs once, when the last reference goes (`vfio_group_fops_release`).
    VfioGroup {
        /// The group.
        id: u64,
        /// What the last `fput` does.
        release: OnRelease,
    },
}

/// Something to do once, when a file's last reference goes.
#[derive(Default)]
pub struct OnRelease(std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl OnRelease {
    /// Runs `f` at release.
    pub fn new(f: impl FnOnce() + Send + 'static) -> OnRelease {
        OnRelease(std::sync::Mutex::new(Some(Box::new(f))))
    }
    fn run(&self) {
        let f = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(f) = f {
            f();
        }
    }
}

impl std::fmt::Debug for OnRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRelease")
    }
}

/// A reference-counted open file.
#[derive(Debug)]
pub struct File {
    kind: FileKind,
    refs: AtomicUsize,
    flags: u32,
    /// The file position (`f_pos`), which `read` and `lseek` move on a memfd.
    pos: AtomicU64,
    /// Who waits on an eventfd (the kernel's wait queue entries with a wake callback, as a
    /// virqfd installs): each is called when the eventfd is signalled or written, after the
    /// count was taken (`eventfd_ctx_do_read`).
    waiters: Waiters,
    /// Callbacks for the eventfd's release (`EPOLLHUP` to its wait queue).
    hups: Waiters,
    next_waiter: AtomicU64,
}

std::thread_local! {
    /// The eventfds whose waiters this thread is calling: a signal of one of them from
    /// inside its own wakeup (a device that interrupts into the eventfd that drives it) is
    /// dropped, as the kernel drops an eventfd signal made inside an eventfd wakeup
    /// (`eventfd_signal_mask`'s `current->in_eventfd`), instead of recursing without end.
    /// Per thread, as the kernel's flag is per task: other threads signal as usual.
    static WAKING: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes an eventfd off this thread's [`WAKING`] list when its wakeup ends (a panicking
/// waiter included).
struct Waking(usize);

impl Drop for Waking {
    fn drop(&mut self) {
        WAKING.with(|w| {
            let mut w = w.borrow_mut();
            if let Some(i) = w.iter().rposition(|&x| x == self.0) {
                w.remove(i);
            }
        });
    }
}

/// An eventfd's wake callbacks, by id.
#[derive(Default)]
struct Waiters(std::sync::Mutex<Vec<(u64, Waiter)>>);

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |w| w.len());
        write!(f, "{n} waiter(s)")
    }
}

/// A wake callback on an eventfd ([`File::eventfd_add_waiter`]).
pub type Waiter = Arc<dyn Fn() + Send + Sync>;

/// The largest file offset (`MAX_LFS_FILESIZE` on 64-bit: `LLONG_MAX`).
const MAX_LFS_FILESIZE: u64 = i64::MAX as u64;

impl File {
    fn new(kind: FileKind, flags: u32) -> Arc<File> {
        Arc::new(File {
            kind,
            refs: AtomicUsize::new(1),
            flags,
            pos: AtomicU64::new(0),
            waiters: Waiters::default(),
            hups: Waiters::default(),
            next_waiter: AtomicU64::new(0),
        })
    }
    /// An ordinary (non-dma-buf) file with one reference.
    pub fn other(name: &str) -> Arc<File> {
        File::new(FileKind::Other(name.to_string()), 0o2)
    }
    /// A VFIO group file of group `id`, open read-write; `release` runs at its last put.
    pub fn vfio_group(id: u64, release: OnRelease) -> Arc<File> {
        File::new(FileKind::VfioGroup { id, release }, 0o2)
    }
    /// The group, if it is a VFIO group file.
    pub fn vfio_group_id(&self) -> Option<u64> {
        match &self.kind {
            FileKind::VfioGroup { id, .. } => Some(*id),
            _ => None,
        }
    }
    /// A new eventfd, counter 0, open read-write and non-blocking.
    pub fn eventfd() -> Arc<File> {
        File::new(FileKind::Eventfd(AtomicU64::new(0)), 0o2 | 0o4000)
    }
    /// A new memfd of `size` bytes whose contents live in RAM at `base`, open read-write,
    /// made without `MFD_ALLOW_SEALING` (sealed against seals).
    pub fn memfd(base: u64, size: u64) -> Arc<File> {
        File::memfd_with_seals(base, size, seal::SEAL)
    }
    /// A new memfd as [`File::memfd`], starting with `seals` (0 for one made with
    /// `MFD_ALLOW_SEALING`).
    pub fn memfd_with_seals(base: u64, size: u64, seals: u32) -> Arc<File> {
        File::new(
            FileKind::Memfd {
                base,
                size,
                resident: std::sync::Mutex::default(),
                seals: AtomicU32::new(seals),
            },
            0o2,
        )
    }
    /// The file was opened for reading: `FMODE_READ`, which `OPEN_FMODE` gives the access
    /// modes O_RDONLY (0) and O_RDWR (2) — not O_WRONLY (1), nor 3, which reads and writes
    /// nothing (include/linux/fs.h `OPEN_FMODE`).
    pub fn can_read(&self) -> bool {
        matches!(self.flags & 0o3, 0 | 2)
    }

    /// The file was opened for writing (`FMODE_WRITE`): access modes O_WRONLY and O_RDWR.
    pub fn can_write(&self) -> bool {
        matches!(self.flags & 0o3, 1 | 2)
    }

    /// `F_GET_SEALS` (mm/memfd.c `memfd_get_seals`): a memfd's seals; any other file →
    /// `EINVAL`.
    pub fn seals(&self) -> Result<u32, Errno> {
        match &self.kind {
            FileKind::Memfd { seals, .. } => Ok(seals.load(Ordering::Acquire)),
            _ => Err(Errno::EINVAL),
        }
    }
    /// `F_ADD_SEALS` (mm/memfd.c `memfd_add_seals`), in its order: a file not open for
    /// writing → `EPERM`; a bit outside [`seal::ALL`] → `EINVAL`; not a memfd → `EINVAL`;
    /// already sealed with [`seal::SEAL`] → `EPERM`; otherwise the seals are added.
    /// [`seal::EXEC`] also adds the shrink, grow and both write seals: a memfd's mode has
    /// its exec bits (`MFD_EXEC`, what `memfd_create` assumes with `vm.memfd_noexec` at 0).
    /// Nothing here maps a memfd writable or pins its pages while it is sealed, so the
    /// write seal's waits (`mapping_deny_writable`, `memfd_wait_for_pins`) never refuse.
    pub fn add_seals(&self, add: u32) -> Result<(), Errno> {
        // FMODE_WRITE: opened O_WRONLY or O_RDWR.
        if !matches!(self.flags & 0o3, 0o1 | 0o2) {
            return Err(Errno::EPERM);
        }
        if add & !seal::ALL != 0 {
            return Err(Errno::EINVAL);
        }
        let FileKind::Memfd { seals, .. } = &self.kind else {
            return Err(Errno::EINVAL);
        };
        let mut add = add;
        if add & seal::EXEC != 0 {
            add |= seal::SHRINK | seal::GROW | seal::WRITE | seal::FUTURE_WRITE;
        }
        seals
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & seal::SEAL == 0).then_some(s | add)
            })
            .map(|_| ())
            .map_err(|_| Errno::EPERM)
    }
    /// What it is.
    pub fn kind(&self) -> &FileKind {
        &self.kind
    }
    /// Its flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }
    /// References now.
    pub fn refs(&self) -> usize {
        self.refs.load(Ordering::Acquire)
    }
    /// The buffer, if it is a dma-buf file.
    pub fn dmabuf(&self) -> Option<&Arc<DmaBuf>> {
        match &self.kind {
            FileKind::DmaBuf(b) => Some(b),
            _ => None,
        }
    }
    /// Whether it is an eventfd.
    pub fn is_eventfd(&self) -> bool {
        matches!(self.kind, FileKind::Eventfd(_))
    }
    /// `eventfd_signal`: adds `n` to an eventfd's counter (nothing on other files), then
    /// wakes its waiters.
    pub fn eventfd_signal(&self, n: u64) {
        let me = std::ptr::from_ref(self) as usize;
        if WAKING.with(|w| w.borrow().contains(&me)) {
            return;
        }
        if let FileKind::Eventfd(c) = &self.kind {
            // `eventfd_signal_mask`: the kernel's own signals may take the counter to
            // 2^64 − 1, which a user's write never reaches.
            let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_add(n))
            });
            self.wake();
        }
    }

    /// `write(2)` of this file (`vfs_write`'s checks, then the file's write method): an
    /// eventfd (`eventfd_write`) takes exactly an 8-byte count (`EINVAL` for any other size or for
    /// 2^64 − 1; `EAGAIN` when the counter would pass 2^64 − 2: every eventfd here is
    /// nonblocking), adds it and wakes its waiters; a file without a write method (a
    /// dma-buf, a VFIO group file) is `EINVAL`; one not open for writing `EBADF`. A memfd's
    /// write (shmem, which grows the file) is not modelled: `EINVAL`, and the scenario
    /// language does not offer it.
    pub fn write(&self, data: &[u8]) -> Result<usize, Errno> {
        if !self.can_write() {
            return Err(Errno::EBADF);
        }
        let FileKind::Eventfd(c) = &self.kind else {
            return Err(Errno::EINVAL);
        };
        let Ok(w) = <[u8; 8]>::try_from(data) else {
            return Err(Errno::EINVAL);
        };
        let add = u64::from_le_bytes(w);
        if add == u64::MAX {
            return Err(Errno::EINVAL);
        }
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (u64::MAX - v > add).then_some(v + add)
        })
        .map_err(|_| Errno::EAGAIN)?;
        self.wake();
        Ok(8)
    }

    /// Registers a wake callback on an eventfd (`vfio_virqfd_enable`'s wait queue entry);
    /// `None` for any other file. The caller checks [`File::eventfd_pending`] for a count
    /// already there.
    pub fn eventfd_add_waiter(&self, w: Waiter) -> Option<u64> {
        if !self.is_eventfd() {
            return None;
        }
        let id = self.next_waiter.fetch_add(1, Ordering::AcqRel);
        self.waiters
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((id, w));
        Some(id)
    }

    /// Takes a wake callback off (`vfio_virqfd_disable`).
    pub fn eventfd_remove_waiter(&self, id: u64) {
        self.waiters
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(i, _)| *i != id);
        // `eventfd_ctx_remove_wait_queue` reads the counter away as it unhooks.
        if let FileKind::Eventfd(c) = &self.kind {
            c.store(0, Ordering::Release);
        }
    }

    /// Registers a callback for the eventfd's release — its last reference put
    /// (`eventfd_release` wakes its queue with `EPOLLHUP`); `None` for any other file. A
    /// holder that wants to see it keeps the `Arc` but no file reference, as an
    /// `eventfd_ctx` does.
    pub fn eventfd_add_hup(&self, w: Waiter) -> Option<u64> {
        if !self.is_eventfd() {
            return None;
        }
        let id = self.next_waiter.fetch_add(1, Ordering::AcqRel);
        self.hups
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((id, w));
        Some(id)
    }

    /// Takes a release callback off again.
    pub fn eventfd_remove_hup(&self, id: u64) {
        self.hups
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(i, _)| *i != id);
    }

    /// An eventfd's counter is not 0 (`EPOLLIN`).
    pub fn eventfd_pending(&self) -> bool {
        matches!(&self.kind, FileKind::Eventfd(c) if c.load(Ordering::Acquire) != 0)
    }

    /// With waiters, the count is consumed (`virqfd_wakeup`'s `eventfd_ctx_do_read`) and
    /// each is called, with no lock held.
    fn wake(&self) {
        let ws: Vec<Waiter> = self
            .waiters
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(_, w)| w.clone())
            .collect();
        if ws.is_empty() {
            return;
        }
        if let FileKind::Eventfd(c) = &self.kind {
            c.store(0, Ordering::Release);
        }
        let me = std::ptr::from_ref(self) as usize;
        WAKING.with(|w| w.borrow_mut().push(me));
        let _done = Waking(me);
        for w in ws {
            w();
        }
    }

    /// The part of `read(2)` that is the file's: `vfs_read`'s checks (a file not open for
    /// reading → `EBADF`; no read method → `EINVAL`: a dma-buf), then the file's read
    /// method. An eventfd (`eventfd_read`) needs room for 8 bytes (`EINVAL`), is `EAGAIN`
    /// at 0 (non-blocking), and otherwise hands out its counter and resets it. A memfd reads
    /// from the file position to at most its size; `peek` reads its RAM. Returns the bytes
    /// read.
    pub fn read(&self, buf: &mut [u8], peek: impl FnOnce(u64, &mut [u8])) -> Result<usize, Errno> {
        if !self.can_read() {
            return Err(Errno::EBADF);
        }
        match &self.kind {
            FileKind::Eventfd(c) => {
                if buf.len() < 8 {
                    return Err(Errno::EINVAL);
                }
                let v = c.swap(0, Ordering::AcqRel);
                if v == 0 {
                    return Err(Errno::EAGAIN);
                }
                buf[..8].copy_from_slice(&v.to_le_bytes());
                Ok(8)
            }
            FileKind::Memfd { base, size, .. } => {
                let pos = self.pos.load(Ordering::Acquire);
                let n = size.saturating_sub(pos).min(buf.len() as u64);
                // `n` is at most `buf.len()`.
                let n = n as usize;
                if n > 0 {
                    peek(base + pos, &mut buf[..n]);
                    self.pos.store(pos + n as u64, Ordering::Release);
                }
                Ok(n)
            }
            FileKind::DmaBuf(_) | FileKind::Other(_) | FileKind::VfioGroup { .. } => {
                Err(Errno::EINVAL)
            }
        }
    }

    /// Marks the pages of a memfd that `[offset, offset + len)` touches as in the page
    /// cache, as pinning them does (nothing on other files).
    pub fn memfd_populate(&self, offset: u64, len: u64) {
        if let FileKind::Memfd { size, resident, .. } = &self.kind {
            let end = offset.saturating_add(len).min(*size);
            if end <= offset {
                return;
            }
            let mut r = resident
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for page in offset / PAGE..end.div_ceil(PAGE) {
                r.insert(page);
            }
        }
    }

    /// `lseek` on a file that is not a dma-buf (whence already checked ≤ `SEEK_MAX` by the
    /// caller): an eventfd's `noop_llseek` answers the position and moves nothing; a
    /// memfd's `shmem_file_llseek` is `generic_file_llseek_size` for `SEEK_SET`, `SEEK_CUR`
    /// and `SEEK_END` (a result below 0 or past `MAX_LFS_FILESIZE` → `EINVAL`), and
    /// `mapping_seek_hole_data` for `SEEK_DATA`/`SEEK_HOLE` (a negative offset, or one at
    /// or past the size → `ENXIO`; `SEEK_DATA` finds the first resident page at or after
    /// the offset, else `ENXIO`; `SEEK_HOLE` the first hole, the size counting as one);
    /// anything else → `ESPIPE`.
    pub fn llseek_other(&self, offset: i64, whence: i32) -> Result<u64, Errno> {
        let pos = self.pos.load(Ordering::Acquire);
        match &self.kind {
            FileKind::Eventfd(_) => Ok(pos),
            FileKind::Memfd { size, resident, .. } => {
                let size_i = i64::try_from(*size).map_err(|_| Errno::EINVAL)?;
                let to = match whence {
                    whence::SET | whence::CUR | whence::END => {
                        let base = match whence {
                            whence::SET => 0,
                            whence::CUR if offset == 0 => return Ok(pos),
                            whence::CUR => i64::try_from(pos).map_err(|_| Errno::EINVAL)?,
                            _ => size_i,
                        };
                        let to = base.checked_add(offset).ok_or(Errno::EINVAL)?;
                        u64::try_from(to).map_err(|_| Errno::EINVAL)?
                    }
                    whence::DATA | whence::HOLE => {
                        let start = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
                        if start >= *size {
                            return Err(Errno::ENXIO);
                        }
                        let r = resident
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if whence == whence::DATA {
                            let first = r.range(start / PAGE..).next().ok_or(Errno::ENXIO)?;
                            (first * PAGE).max(start).min(*size)
                        } else {
                            let mut page = start / PAGE;
                            while r.contains(&page) {
                                page += 1;
                            }
                            (page * PAGE).max(start).min(*size)
                        }
                    }
                    _ => return Err(Errno::EINVAL),
                };
                if to > MAX_LFS_FILESIZE {
                    return Err(Errno::EINVAL);
                }
                self.pos.store(to, Ordering::Release);
                Ok(to)
            }
            FileKind::DmaBuf(_) | FileKind::Other(_) | FileKind::VfioGroup { .. } => {
                Err(Errno::ESPIPE)
            }
        }
    }
    /// Takes another reference (`get_file`).
    pub fn get(self: &Arc<Self>) -> Arc<File> {
        self.refs.fetch_add(1, Ordering::AcqRel);
        self.clone()
    }
    /// `get_file_active`: a reference only if release has not begun.
    pub fn get_active(self: &Arc<Self>) -> Option<Arc<File>> {
        let mut n = self.refs.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match self
                .refs
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(self.clone()),
                Err(m) => n = m,
            }
        }
    }
    /// Drops a reference (`fput`); the last one releases the file (a dma-buf's exporter
    /// `release` runs exactly once).
    pub fn put(self: Arc<Self>) {
        if self.refs.fetch_sub(1, Ordering::AcqRel) == 1 {
            match &self.kind {
                FileKind::DmaBuf(b) => b.release(),
                FileKind::VfioGroup { release, .. } => release.run(),
                FileKind::Eventfd(_) => {
                    let hups = std::mem::take(
                        &mut *self
                            .hups
                            .0
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner),
                    );
                    for (_, h) in hups {
                        h();
                    }
                }
                _ => {}
            }
        }
    }
}

/// `dma_buf_export`: checks the exporter and returns the new file (one reference).
pub fn export(info: ExportInfo) -> Result<Arc<File>, Errno> {
    let Some(ops) = info.ops.filter(|_| info.has_priv) else {
        tracing::warn!(target: "peerdma::dmabuf", "export without ops or priv");
        return Err(Errno::EINVAL);
    };
    let p = ops.provides();
    if p & (ops::MAP | ops::UNMAP | ops::RELEASE) != (ops::MAP | ops::UNMAP | ops::RELEASE) {
        return Err(Errno::EINVAL);
    }
    if (p & ops::PIN != 0) != (p & ops::UNPIN != 0) {
        return Err(Errno::EINVAL);
    }
    let buf = Arc::new(DmaBuf {
        size: info.size,
        exp_name: info.exp_name,
        ops,
        resv: Resv::default(),
        released: AtomicBool::new(false),
    });
    Ok(File::new(
        FileKind::DmaBuf(buf),
        info.flags & FILE_FLAGS_KEPT,
    ))
}

impl DmaBuf {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The exporter's name.
    pub fn exp_name(&self) -> &str {
        &self.exp_name
    }
    /// The exporter.
    pub fn ops(&self) -> &Arc<dyn DmaBufOps> {
        &self.ops
    }
    /// Whether release has run.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }
    /// Takes the reservation lock.
    #[inline]
    pub fn lock(&self) -> ResvGuard<'_> {
        self.resv.lock()
    }
    /// The reservation object.
    pub fn resv(&self) -> &Resv {
        &self.resv
    }
    /// `lseek` on the buffer's file (`dma_buf_llseek`): only offset 0 from the start (→ 0) or
    /// the end (→ the size) — how userspace learns the size; anything else is `EINVAL`.
    pub fn llseek(&self, offset: i64, whence: i32) -> Result<u64, Errno> {
        if offset != 0 {
            return Err(Errno::EINVAL);
        }
        match whence {
            whence::END => Ok(self.size),
            whence::SET => Ok(0),
            _ => Err(Errno::EINVAL),
        }
    }

    /// `mmap` of the buffer's file, after the syscall's own checks (dma-buf.c
    /// `dma_buf_mmap_internal`): an exporter without an `mmap` operation (vfio's, on 7.2) →
    /// `EINVAL`; pages past the buffer's last whole page → `EINVAL`; then the exporter's.
    pub fn mmap(&self, offset: u64, len: u64) -> Result<(), Errno> {
        if self.ops.provides() & ops::MMAP == 0 {
            return Err(Errno::EINVAL);
        }
        let pages = len.div_ceil(PAGE);
        if (offset / PAGE).saturating_add(pages) > self.size / PAGE {
            return Err(Errno::EINVAL);
        }
        self.ops.mmap(self, offset, len)
    }

    /// The attachments now (newest first). Takes the reservation lock.
    pub fn attachments(&self) -> Vec<Arc<Attachment>> {
        let g = self.lock();
        g.inner.attachments.iter().map(|e| e.att.clone()).collect()
    }

    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.lock().inner.attachments.is_empty() {
            tracing::warn!(target: "peerdma::dmabuf", "release with attachments left");
        }
        self.ops.release(self);
    }

    fn check(&self, g: &ResvGuard<'_>) -> Result<(), Errno> {
        if self.resv.holds(g) {
            Ok(())
        } else {
            tracing::warn!(target: "peerdma::dmabuf", "called with another buffer's reservation lock");
            Err(Errno::EINVAL)
        }
    }

    /// `dma_buf_dynamic_attach`: `dev` `None` → EINVAL; importer ops without an
    /// invalidation callback are accepted (a pinned importer; whether to take it is the
    /// exporter's decision); the exporter's `attach` runs without the lock; the new
    /// attachment goes first.
    pub fn dynamic_attach(
        &self,
        dev: Option<Bdf>,
        importer: Option<ImporterOps>,
    ) -> Result<Arc<Attachment>, Errno> {
        let Some(dev) = dev else {
            return Err(Errno::EINVAL);
        };
        let a = Arc::new(Attachment {
            dev,
            peer2peer: importer.as_ref().is_some_and(|o| o.allow_peer2peer),
            importer,
            exporter_priv: Mutex::new(None),
            resv_id: self.resv.id(),
        });
        self.ops.attach(self, &a)?;
        let invalidate = a.importer.as_ref().and_then(|o| o.invalidate.clone());
        let entry = Attached {
            att: a.clone(),
            invalidate,
        };
        self.lock().inner.attachments.insert(0, entry);
        Ok(a)
    }

    /// `dma_buf_attach`: a static importer.
    pub fn attach(&self, dev: Bdf) -> Result<Arc<Attachment>, Errno> {
        self.dynamic_attach(Some(dev), None)
    }

    /// `dma_buf_detach`.
    pub fn detach(&self, a: &Arc<Attachment>) {
        self.lock()
            .inner
            .attachments
            .retain(|e| !Arc::ptr_eq(&e.att, a));
        self.ops.detach(self, a);
    }

    /// `dma_buf_pin` (a static importer gets a warning, as in the kernel).
    pub fn pin(&self, a: &Attachment, g: &ResvGuard<'_>) -> Result<(), Errno> {
        self.check(g)?;
        if !a.is_dynamic() {
            tracing::warn!(target: "peerdma::dmabuf", "pin of a static attachment");
        }
        if self.ops.provides() & ops::PIN != 0 {
            self.ops.pin(a, g)
        } else {
            Ok(())
        }
    }

    /// `dma_buf_unpin`.
    pub fn unpin(&self, a: &Attachment, g: &ResvGuard<'_>) {
        if self.check(g).is_ok() && self.ops.provides() & ops::UNPIN != 0 {
            self.ops.unpin(a, g);
        }
    }

    fn pins_on_map(&self, a: &Attachment) -> bool {
        !a.is_dynamic() && self.ops.provides() & ops::PIN != 0
    }

    /// `dma_buf_map_attachment`: pin-on-map for static importers of pinning exporters, the
    /// exporter's map, then (static importers) a wait for kernel fences.
    pub fn map_attachment(
        &self,
        a: &Attachment,
        dir: Direction,
        g: &ResvGuard<'_>,
    ) -> Result<SgTable, Errno> {
        self.check(g)?;
        // An attachment is mapped only while it is attached: decided under the lock that
        // `detach` takes, so a mapping can never be made on an attachment nobody will be
        // asked to unmap (in the kernel that would be a use after free).
        if !g
            .inner
            .attachments
            .iter()
            .any(|e| std::ptr::eq(Arc::as_ptr(&e.att), a))
        {
            tracing::warn!(target: "peerdma::dmabuf", "map of a detached attachment");
            return Err(Errno::EINVAL);
        }
        let pinned = self.pins_on_map(a);
        if pinned {
            if let Err(e) = self.ops.pin(a, g) {
                if e == Errno::EBUSY {
                    tracing::warn!(target: "peerdma::dmabuf", "pin-on-map: EBUSY");
                }
                return Err(e);
            }
        }
        let sgt = match self.ops.map(a, dir, g) {
            Ok(s) => s,
            Err(e) => {
                if pinned {
                    self.ops.unpin(a, g);
                }
                return Err(e);
            }
        };
        if !a.is_dynamic() {
            // Unbounded, as the kernel's wait (which only a signal interrupts; signals are
            // not modelled).
            g.wait_all(Usage::Kernel);
        }
        Ok(sgt)
    }

    /// `dma_buf_unmap_attachment`.
    pub fn unmap_attachment(
        &self,
        a: &Attachment,
        sgt: SgTable,
        dir: Direction,
        g: &ResvGuard<'_>,
    ) {
        if self.check(g).is_err() {
            return;
        }
        self.ops.unmap(a, sgt, dir, g);
        if self.pins_on_map(a) {
            self.ops.unpin(a, g);
        }
    }

    /// `dma_buf_invalidate_mappings` (`dma_buf_move_notify`): every dynamic importer's
    /// callback, synchronously, with the lock held; static attachments are skipped.
    #[inline]
    pub fn invalidate_mappings(&self, g: &ResvGuard<'_>) -> Result<usize, Errno> {
        self.check(g)?;
        let mut n = 0;
        // In place: the list changes only under the lock `g` holds.
        for e in &g.inner.attachments {
            if let Some(cb) = &e.invalidate {
                cb(&e.att, g);
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Drop for Process {
    /// Process exit: every open file is closed.
    fn drop(&mut self) {
        let files = std::mem::take(&mut *sync::lock(&self.fds));
        for (_, (f, _)) in files {
            f.put();
        }
    }
}

impl Default for Process {
    fn default() -> Self {
        Process::new()
    }
}

/// A process's file table.
#[derive(Debug)]
pub struct Process {
    fds: Mutex<BTreeMap<i32, (Arc<File>, bool)>>,
    max_fds: usize,
}

impl Process {
    /// A process with stdin, stdout and stderr taken (fds start at 3).
    pub fn new() -> Process {
        Process::with_limit(1024)
    }

    /// A process that may have at most `max_fds` fds open (`RLIMIT_NOFILE`).
    pub fn with_limit(max_fds: usize) -> Process {
        let p = Process {
            fds: Mutex::new(BTreeMap::new()),
            max_fds,
        };
        for fd in 0..3 {
            sync::lock(&p.fds).insert(fd, (File::other("tty"), false));
        }
        p
    }

    /// `dma_buf_fd`: installs the file at the lowest free fd, consuming the reference;
    /// EMFILE when the table is full (the reference is not consumed then).
    pub fn install(&self, f: Arc<File>, cloexec: bool) -> Result<i32, (Errno, Arc<File>)> {
        let max = self.max_fds;
        let mut t = sync::lock(&self.fds);
        let free = (0..i32::try_from(max).unwrap_or(i32::MAX)).find(|i| !t.contains_key(i));
        let Some(fd) = free else {
            return Err((Errno::EMFILE, f));
        };
        t.insert(fd, (f, cloexec));
        Ok(fd)
    }

    /// The file at `fd`, with a new reference (`fget`); EBADF if none.
    pub fn fget(&self, fd: i32) -> Result<Arc<File>, Errno> {
        sync::lock(&self.fds)
            .get(&fd)
            .map(|(f, _)| f.get())
            .ok_or(Errno::EBADF)
    }

    /// `dma_buf_get(fd)`: EBADF for a bad fd, EINVAL for a file that is not a dma-buf.
    pub fn dma_buf_get(&self, fd: i32) -> Result<Arc<File>, Errno> {
        let f = self.fget(fd)?;
        if f.dmabuf().is_none() {
            f.put();
            return Err(Errno::EINVAL);
        }
        Ok(f)
    }

    /// `fcntl(fd, F_DUPFD_CLOEXEC, 0)`: the same file at the lowest free fd, one more
    /// reference; EBADF for a bad fd, EMFILE when the table is full.
    pub fn dup(&self, fd: i32) -> Result<i32, Errno> {
        let f = self.fget(fd)?;
        self.install(f, true).map_err(|(e, f)| {
            f.put();
            e
        })
    }

    /// `close(fd)`.
    pub fn close(&self, fd: i32) -> Result<(), Errno> {
        let (f, _) = sync::lock(&self.fds).remove(&fd).ok_or(Errno::EBADF)?;
        f.put();
        Ok(())
    }

    /// `execve`: every close-on-exec fd is closed.
    pub fn exec(&self) {
        let gone: Vec<i32> = sync::lock(&self.fds)
            .iter()
            .filter(|(_, (_, c))| *c)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in gone {
            let _ = self.close(fd);
        }
    }

    /// Open fds.
    pub fn fds(&self) -> Vec<i32> {
        sync::lock(&self.fds).keys().copied().collect()
    }

    /// Whether `fd` is close-on-exec.
    pub fn cloexec(&self, fd: i32) -> Result<bool, Errno> {
        sync::lock(&self.fds)
            .get(&fd)
            .map(|(_, c)| *c)
            .ok_or(Errno::EBADF)
    }
}
