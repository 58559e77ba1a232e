//! The lock types every peerdma crate uses, in one place so that concurrency tests can swap
//! in a model checker, and helpers that treat a poisoned lock as still usable (a panic in one
//! test thread must not turn every later hardware access into a second panic).

pub use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

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
