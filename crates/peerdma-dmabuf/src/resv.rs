//! The reservation object of a dma-buf (`struct dma_resv`): its lock, and the fences it holds.
//!
//! The lock is held as a [`ResvGuard`]; every operation that needs it held (map, unmap, pin,
//! unpin, invalidation, adding fences) takes the guard as an argument, so "called with the
//! reservation lock held" is checked by the compiler, and at run time that it is *this*
//! buffer's lock.

use peerdma_pci::sync::{Condvar, Mutex, MutexGuard};

use peerdma_pci::sync::order::{self, Level};
use std::time::Duration;

/// How a fence is used (`enum dma_resv_usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Usage {
    /// Kernel-internal work (memory management); static importers wait for these at map.
    Kernel,
    /// Implicit-sync writers.
    Write,
    /// Implicit-sync readers.
    Read,
    /// Bookkeeping only.
    Bookkeep,
}

#[derive(Debug, Default)]
struct FenceState {
    signaled: bool,
}

/// A one-shot completion: signalled once, waiters wake.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    inner: peerdma_pci::sync::Arc<(Mutex<FenceState>, Condvar)>,
}

impl Fence {
    /// An unsignalled fence.
    pub fn new() -> Fence {
        Fence::default()
    }
    /// Signals it (later calls do nothing). Returns whether this call signalled it.
    pub fn signal(&self) -> bool {
        let (m, cv) = &*self.inner;
        let mut s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.signaled {
            return false;
        }
        s.signaled = true;
        cv.notify_all();
        true
    }
    /// Whether it is signalled.
    pub fn is_signaled(&self) -> bool {
        self.inner
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .signaled
    }
    /// Waits until signalled, however long that takes.
    pub fn wait_forever(&self) {
        let (m, cv) = &*self.inner;
        let s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _s = peerdma_pci::sync::wait_until(cv, s, |s| s.signaled);
    }
    /// Waits until signalled or `timeout` passes; true if signalled.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (m, cv) = &*self.inner;
        let s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        peerdma_pci::sync::wait_until_timeout(cv, s, timeout, |s| s.signaled).1
    }
}

/// What the lock protects.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) fences: Vec<(Fence, Usage)>,
    /// The buffer's attachments, newest first (`dma_buf->attachments`, which the kernel also
    /// guards with the reservation lock). The first few live in the lock's own memory, so a
    /// revoke's walk over many buffers does not take one more cache miss per buffer to reach
    /// its callbacks.
    pub(crate) attachments: smallvec::SmallVec<[crate::buf::Attached; 4]>,
}

/// The reservation object (its id first, then the lock: see [`crate::DmaBuf`]'s layout).
#[derive(Debug)]
#[repr(C)]
pub struct Resv {
    id: u64,
    lock: Mutex<Inner>,
}

impl Default for Resv {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Resv {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            lock: Mutex::default(),
        }
    }
}

/// Proof that a buffer's reservation lock is held.
pub struct ResvGuard<'a> {
    pub(crate) resv: &'a Resv,
    pub(crate) inner: MutexGuard<'a, Inner>,
    _order: order::Held,
}

impl std::fmt::Debug for ResvGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResvGuard").finish_non_exhaustive()
    }
}

impl Resv {
    /// Takes the lock (`dma_resv_lock`).
    #[inline]
    pub fn lock(&self) -> ResvGuard<'_> {
        let held = order::acquire(Level::Resv, "a dma-buf's reservation lock", true);
        ResvGuard {
            _order: held,
            resv: self,
            inner: self
                .lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    /// Takes the lock if it is free (`dma_resv_trylock`).
    pub fn try_lock(&self) -> Option<ResvGuard<'_>> {
        let held = || order::acquire(Level::Resv, "a dma-buf's reservation lock", false);
        match self.lock.try_lock() {
            Ok(inner) => Some(ResvGuard {
                resv: self,
                inner,
                _order: held(),
            }),
            Err(peerdma_pci::sync::TryLockError::Poisoned(p)) => Some(ResvGuard {
                resv: self,
                inner: p.into_inner(),
                _order: held(),
            }),
            Err(peerdma_pci::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Whether `g` is this object's guard.
    pub fn holds(&self, g: &ResvGuard<'_>) -> bool {
        std::ptr::eq(self, g.resv)
    }

    /// A number naming this object (unique in the process).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl ResvGuard<'_> {
    /// The id of the object whose lock this is.
    pub fn resv_id(&self) -> u64 {
        self.resv.id
    }

    /// `dma_resv_add_fence`: signalled fences are dropped on the way.
    pub fn add_fence(&mut self, f: Fence, usage: Usage) {
        self.inner.fences.retain(|(f, _)| !f.is_signaled());
        self.inner.fences.push((f, usage));
    }

    /// Unsignalled fences of `usage` or a stronger one (lower in [`Usage`]'s order).
    pub fn fences(&self, usage: Usage) -> Vec<Fence> {
        self.inner
            .fences
            .iter()
            .filter(|(f, u)| *u <= usage && !f.is_signaled())
            .map(|(f, _)| f.clone())
            .collect()
    }

    /// Waits, without a bound, for every fence of `usage` or stronger (the kernel's
    /// `dma_resv_wait_timeout` with `MAX_SCHEDULE_TIMEOUT`).
    #[inline]
    pub fn wait_all(&self, usage: Usage) {
        for (f, u) in &self.inner.fences {
            if *u <= usage {
                f.wait_forever();
            }
        }
    }

    /// Waits for every fence of `usage` or stronger (`dma_resv_wait_timeout`); false on
    /// timeout.
    pub fn wait(&self, usage: Usage, timeout: Duration) -> bool {
        self.fences(usage).iter().all(|f| f.wait(timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_signal_once_and_wake_waiters() {
        let f = Fence::new();
        let g = f.clone();
        let t = std::thread::spawn(move || g.wait(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(10));
        assert!(f.signal());
        assert!(!f.signal());
        assert!(t.join().unwrap());
        assert!(!Fence::new().wait(Duration::from_millis(1)));
    }

    #[test]
    fn guard_knows_its_object_and_filters_by_usage() {
        let (mine, other) = (Resv::default(), Resv::default());
        let mut g = mine.lock();
        assert!(mine.holds(&g));
        assert!(!other.holds(&g));
        assert!(mine.try_lock().is_none());
        assert!(other.try_lock().is_some());
        assert_eq!(g.resv_id(), mine.id());
        let (k, r) = (Fence::new(), Fence::new());
        g.add_fence(k.clone(), Usage::Kernel);
        g.add_fence(r.clone(), Usage::Read);
        assert_eq!(g.fences(Usage::Kernel).len(), 1);
        assert_eq!(g.fences(Usage::Bookkeep).len(), 2);
        k.signal();
        assert!(g.wait(Usage::Kernel, Duration::from_millis(1)));
        assert!(!g.wait(Usage::Read, Duration::from_millis(1)));
    }
}
