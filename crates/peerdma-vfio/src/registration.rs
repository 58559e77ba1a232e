//! The device registration count (`vfio_device.refcount` and its completion).
//!
//! Registering sets the count to 1. Holders — an open device file, a live dma-buf — take a
//! reference with [`Registration::try_get`], which fails once unregistering has begun; the
//! reference is a value ([`RegRef`]) that gives itself back when dropped. Unregistering drops
//! the initial reference and waits for the count to reach zero, calling a request callback at
//! every slice that passes without it (vfio-pci relays these to the user's "req" eventfd).

use peerdma_pci::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use peerdma_pci::sync::{Arc, Condvar, Mutex};
use std::collections::BTreeMap;
use std::time::Duration;

use peerdma_pci::sync;

#[derive(Debug, Default)]
struct Inner {
    count: AtomicUsize,
    unregistering: peerdma_pci::sync::atomic::AtomicBool,
    next: AtomicU64,
    holders: Mutex<BTreeMap<u64, String>>,
    done: Mutex<bool>,
    cv: Condvar,
}

impl Inner {
    fn put(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            *sync::lock(&self.done) = true;
            self.cv.notify_all();
        }
    }
}

/// A device's registration.
#[derive(Debug, Clone)]
pub struct Registration {
    inner: Arc<Inner>,
}

/// One reference to a registration, held by someone; dropping it puts it.
#[derive(Debug)]
pub struct RegRef {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for RegRef {
    fn drop(&mut self) {
        sync::lock(&self.inner.holders).remove(&self.id);
        self.inner.put();
    }
}

impl Default for Registration {
    fn default() -> Self {
        Registration::new()
    }
}

impl Registration {
    /// A registered device: the count is 1.
    pub fn new() -> Registration {
        let inner = Inner::default();
        inner.count.store(1, Ordering::Release);
        Registration {
            inner: Arc::new(inner),
        }
    }

    /// `vfio_device_try_get_registration`: a reference, unless unregistering has begun (the
    /// count already reached zero). `holder` says who holds it, for [`Self::holders`].
    pub fn try_get(&self, holder: &str) -> Option<RegRef> {
        let mut n = self.inner.count.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match self.inner.count.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(m) => n = m,
            }
        }
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        sync::lock(&self.inner.holders).insert(id, holder.to_string());
        Some(RegRef {
            inner: self.inner.clone(),
            id,
        })
    }

    /// References now (the initial one included until unregistering).
    pub fn count(&self) -> usize {
        self.inner.count.load(Ordering::Acquire)
    }

    /// Who holds references now.
    pub fn holders(&self) -> Vec<String> {
        sync::lock(&self.inner.holders).values().cloned().collect()
    }

    /// Whether unregistering has begun (new opens are refused from then on).
    pub fn is_unregistering(&self) -> bool {
        self.inner.unregistering.load(Ordering::Acquire)
    }

    /// Whether the last reference is gone.
    pub fn is_complete(&self) -> bool {
        *sync::lock(&self.inner.done)
    }

    /// `vfio_unregister_group_dev`: drops the initial reference, then waits for the count to
    /// reach zero in slices of `slice`; after each slice that ends without it, calls
    /// `request(n, holders)` with n = 0, 1, 2, … Returns how many requests were made. Calling
    /// it again after it returned does nothing.
    pub fn unregister(&self, slice: Duration, mut request: impl FnMut(u32, &[String])) -> u32 {
        if self.inner.unregistering.swap(true, Ordering::AcqRel) {
            return 0;
        }
        self.inner.put();
        let mut n = 0;
        let mut done = sync::lock(&self.inner.done);
        while !*done {
            let (d, t) = self
                .inner
                .cv
                .wait_timeout(done, slice)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            done = d;
            if t.timed_out() && !*done {
                drop(done);
                if n == 0 {
                    tracing::warn!(target: "peerdma::vfio", "device in use, blocked until released by its holders");
                }
                request(n, &self.holders());
                n += 1;
                done = sync::lock(&self.inner.done);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_get_fails_once_unregistered_and_the_last_put_completes() {
        let r = Registration::new();
        let a = r.try_get("device file").unwrap();
        assert_eq!(
            (r.count(), r.holders()),
            (2, vec!["device file".to_string()])
        );
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let n = r2.unregister(Duration::from_millis(10), |i, h| seen.push((i, h.to_vec())));
            (n, seen)
        });
        while r.count() != 1 {
            std::thread::yield_now();
        }
        assert!(
            r.try_get("late").is_some(),
            "count is 1: the holder's reference"
        );
        std::thread::sleep(Duration::from_millis(35));
        drop(a);
        let (n, seen) = t.join().unwrap();
        assert!(n >= 2, "requests while held: {n}");
        assert_eq!(seen[0], (0, vec!["device file".to_string()]));
        assert!(r.is_complete());
        assert!(r.try_get("after").is_none());
        assert_eq!(r.unregister(Duration::from_millis(1), |_, _| panic!()), 0);
    }

    #[test]
    fn unregister_without_holders_returns_at_once() {
        let r = Registration::new();
        assert_eq!(
            r.unregister(Duration::from_secs(10), |_, _| panic!("no request")),
            0
        );
        assert!(r.try_get("x").is_none());
    }
}
