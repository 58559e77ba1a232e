//! The lock types every peerdma crate uses, in one place so that the model checker can swap
//! in its own, and helpers that treat a poisoned lock as still usable (a panic in one test
//! thread must not turn every later hardware access into a second panic).
//!
//! Built with the `model` feature, the locks, condition variables, the atomics in
//! [`atomic`] and the thread-local state of [`points`] and [`order`] are
//! [loom](https://docs.rs/loom)'s, so a loom model (`crates/peerdma-vfio/tests/model.rs`)
//! explores every interleaving of the emulated kernel's own code. Such a build is only for
//! running inside `loom::model`.

#[cfg(feature = "model")]
pub use loom::{
    self,
    sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard},
};
pub use std::sync::{Arc, TryLockError, Weak};
#[cfg(not(feature = "model"))]
pub use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The atomics of the emulated kernel's shared state (loom's in a `model` build). A `static`
/// atomic keeps using `std`'s: loom's cannot be made in a constant.
pub mod atomic {
    #[cfg(feature = "model")]
    pub use loom::sync::atomic::{
        AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize,
    };
    pub use std::sync::atomic::Ordering;
    #[cfg(not(feature = "model"))]
    pub use std::sync::atomic::{
        AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize,
    };
}

/// Waits on `cv` until `done` says so (`Condvar::wait_while`, which loom lacks).
pub fn wait_until<'a, T>(
    cv: &Condvar,
    mut g: MutexGuard<'a, T>,
    mut done: impl FnMut(&mut T) -> bool,
) -> MutexGuard<'a, T> {
    while !done(&mut g) {
        g = cv
            .wait(g)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    g
}

/// Waits on `cv` until `done` says so or `timeout` has passed since the call; returns the
/// guard and whether `done` held (`Condvar::wait_timeout_while`, which loom lacks; under
/// loom a wait never times out).
pub fn wait_until_timeout<'a, T>(
    cv: &Condvar,
    mut g: MutexGuard<'a, T>,
    timeout: std::time::Duration,
    mut done: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    let start = std::time::Instant::now();
    loop {
        if done(&mut g) {
            return (g, true);
        }
        let Some(left) = timeout.checked_sub(start.elapsed()) else {
            return (g, false);
        };
        g = cv
            .wait_timeout(g, left)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

/// Locks a mutex, ignoring poisoning.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read-locks an `RwLock`, ignoring poisoning.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write-locks an `RwLock`, ignoring poisoning.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Named interleaving points: places in the emulated kernel where another thread could run
/// between two steps (for example between an importer looking up its state and taking the
/// buffer's lock). A test installs a hook for a point on its own thread and the hook runs
/// there, so a race that needs a precise interleaving can be replayed deterministically.
/// Without hooks a point costs one thread-local look-up.
pub mod points {
    #[cfg(feature = "model")]
    use loom::thread_local;
    use std::cell::RefCell;
    use std::collections::HashMap;

    type Hook = Box<dyn FnMut()>;

    thread_local! {
        static HOOKS: RefCell<HashMap<&'static str, Hook>> = RefCell::new(HashMap::new());
    }

    /// Runs this thread's hook for `name`, if one is installed. A hook does not run again
    /// while it is running (so a hook may call the code that contains its point).
    pub fn point(name: &'static str) {
        let hook = HOOKS.with(|h| h.borrow_mut().remove(name));
        if let Some(mut f) = hook {
            f();
            HOOKS.with(|h| {
                h.borrow_mut().entry(name).or_insert(f);
            });
        }
    }

    /// Installs `f` at point `name` on this thread until the returned guard is dropped.
    pub fn on(name: &'static str, f: impl FnMut() + 'static) -> HookGuard {
        HOOKS.with(|h| h.borrow_mut().insert(name, Box::new(f)));
        HookGuard(name)
    }

    /// Removes its hook when dropped.
    #[derive(Debug)]
    pub struct HookGuard(&'static str);

    impl Drop for HookGuard {
        fn drop(&mut self) {
            HOOKS.with(|h| h.borrow_mut().remove(self.0));
        }
    }
}

/// The lock order of the emulated kernel, checked. Every lock that takes part in revocation
/// has a level; a thread may block on a lock only if every lock it holds has a lower level
/// (a `try` acquisition, which cannot wait, may take an equal level: hot reset try-locks
/// several devices' `memory_lock`s). With debug assertions a violation panics, naming both
/// locks, at the acquisition that breaks the order — whether or not it would have deadlocked
/// this time; release builds only keep the bookkeeping out.
///
/// | level | lock | taken by |
/// |---|---|---|
/// | [`Level::Memory`](order::Level::Memory) | a vfio device's `memory_lock` | config writes, resets, low power, export, close, buffer release |
/// | [`Level::Resv`](order::Level::Resv) | a dma-buf's reservation lock | map/unmap, invalidation, importers' accesses |
///
/// Below these, the short internal mutexes (attachment lists, importer state, the watch's
/// ledger) are leaves: nothing blocks on a level-checked lock while holding one.
pub mod order {
    #[cfg(feature = "model")]
    use loom::thread_local;
    use std::cell::RefCell;

    /// A lock's place in the order (lower first).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        /// `vdev->memory_lock`.
        Memory = 1,
        /// `dma_resv` of a dma-buf.
        Resv = 2,
    }

    #[cfg(not(feature = "model"))]
    thread_local! {
        static HELD: RefCell<Vec<(Level, &'static str)>> = const { RefCell::new(Vec::new()) };
    }
    // Loom's thread-locals take no `const` initialiser.
    #[cfg(feature = "model")]
    thread_local! {
        static HELD: RefCell<Vec<(Level, &'static str)>> = RefCell::new(Vec::new());
    }

    /// Proof that a level-checked lock is held; gives the level back when dropped.
    #[derive(Debug)]
    pub struct Held(Level);

    /// Records that this thread is about to take `name` at `level`; `blocking` says whether
    /// it may wait for it. Panics (with debug assertions) if that breaks the order.
    pub fn acquire(level: Level, name: &'static str, blocking: bool) -> Held {
        if cfg!(debug_assertions) {
            HELD.with(|h| {
                let h = h.borrow();
                if let Some((l, n)) = h.iter().rev().find(|(l, _)| if blocking { *l >= level } else { *l > level }) {
                    panic!("lock order broken: blocking on {name} ({level:?}) while holding {n} ({l:?})");
                }
            });
            HELD.with(|h| h.borrow_mut().push((level, name)));
        }
        Held(level)
    }

    impl Drop for Held {
        fn drop(&mut self) {
            if cfg!(debug_assertions) {
                HELD.with(|h| {
                    let mut h = h.borrow_mut();
                    if let Some(i) = h.iter().rposition(|(l, _)| *l == self.0) {
                        h.remove(i);
                    }
                });
            }
        }
    }

    /// The levels this thread holds now (for tests).
    pub fn held() -> Vec<Level> {
        HELD.with(|h| h.borrow().iter().map(|(l, _)| *l).collect())
    }
}
