//! The cost of revoking a vfio-pci device's dma-bufs, next to its floor measured in the same
//! run:
//! - `revoke/N`: one COMMAND write turning memory decode off, which revokes all N exported
//!   buffers (one 4 KiB page of gpu0's 64 GiB BAR 2 each), each with 4 dynamic, peer-to-peer
//!   importers whose `invalidate` callbacks are empty; nothing is mapped. Only the memory-off
//!   write is timed: the memory-on write (the unrevoke) that puts the device back runs
//!   between timings, outside the measurement.
//! - `callbacks/N*4`: the floor — N × 4 calls of empty [`Invalidate`] callbacks
//!   (`Arc<dyn Fn(&Attachment, &ResvGuard)>`, one allocation each) through a `Vec`, with the
//!   same attachment and lock guard as arguments.
//! - a second floor, `locked/N*4`, for the summary: the least the kernel's contract lets a
//!   revoke do — take each of the N buffers' reservation locks in turn and make its 4 empty
//!   callbacks under it.
//!
//! At the end it prints, for each N, revoke ÷ callbacks, revoke ÷ the locked floor and the
//! revoke's cost per buffer. The goals: the cost is linear from 100 to 10,000 buffers (flat
//! per buffer), and revoke(10,000 × 4) ≤ 3 × the 40,000 empty callbacks.

#![allow(clippy::cast_precision_loss, clippy::many_single_char_names)]

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peerdma_dma::Direction;
use peerdma_dmabuf::{Attachment, File, ImporterOps, Invalidate, Process, ResvGuard};
use peerdma_pci::{Errno, regs};
use peerdma_uapi::feature::DmaBufRequest;
use peerdma_vfio::{DeviceFd, VfioPci};

const COUNTS: [usize; 3] = [100, 1_000, 10_000];
const ATTACHMENTS: usize = 4;
const PAGE: u64 = 4096;

/// A bound, open gpu0 with `n` exported buffers, each with [`ATTACHMENTS`] dynamic importers.
struct Setup {
    // Field order is drop order: importers go before their buffers, buffers before the device.
    atts: Vec<(Arc<File>, Arc<Attachment>)>,
    files: Vec<Arc<File>>,
    /// Holds the buffers' fds (and so the buffers) open.
    _proc: Process,
    fd: DeviceFd,
    _vfio: VfioPci,
}

fn setup(n: usize) -> Setup {
    let t = peerdma_vfio::testbed::testbed().unwrap();
    let (env, gpu, nics) = (t.env, t.gpu, [t.nic0, t.nic1]);
    let vfio = VfioPci::bind(&env, gpu).unwrap();
    let fd = vfio.open().unwrap();
    // Room for stdin/out/err and one fd per buffer.
    let proc = Process::with_limit(n + 16);
    let mut files = Vec::with_capacity(n);
    let mut atts = Vec::with_capacity(n * ATTACHMENTS);
    for i in 0..n as u64 {
        let req = DmaBufRequest::new(2, vec![(i * PAGE, PAGE)]);
        let dfd = fd.feature(&proc, &req.to_bytes()).unwrap();
        let f = proc.dma_buf_get(dfd).unwrap();
        let buf = f.dmabuf().unwrap();
        for k in 0..ATTACHMENTS {
            let ops = ImporterOps {
                allow_peer2peer: true,
                invalidate: Some(Arc::new(|_, _| {})),
                stub: false,
            };
            let a = buf.dynamic_attach(Some(nics[k % 2]), Some(ops)).unwrap();
            atts.push((f.clone(), a));
        }
        files.push(f);
    }
    Setup {
        atts,
        files,
        _proc: proc,
        fd,
        _vfio: vfio,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for (f, a) in self.atts.drain(..) {
            f.dmabuf().unwrap().detach(&a);
        }
        for f in self.files.drain(..) {
            f.put();
        }
    }
}

/// COMMAND with memory decode on or off (a revoke when off, an unrevoke when on).
fn cmd(d: &DeviceFd, mem: bool) {
    let v: u16 = if mem { regs::COMMAND_MEMORY } else { 0 };
    d.config_write(regs::COMMAND, &v.to_le_bytes()).unwrap();
}

/// A revoke really revokes: a map of any buffer is refused until the unrevoke.
fn check(s: &Setup) {
    let (f, a) = s.atts.last().unwrap();
    let buf = f.dmabuf().unwrap();
    cmd(&s.fd, false);
    assert!(!s.fd.memory_enabled());
    {
        let g = buf.lock();
        let r = buf.map_attachment(a, Direction::Bidirectional, &g);
        assert_eq!(r.err(), Some(Errno::ENODEV));
    }
    cmd(&s.fd, true);
    assert!(s.fd.memory_enabled());
}

/// Times the memory-off writes only; each is followed, untimed, by a memory-on write.
fn time_revokes(s: &Setup, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        cmd(black_box(&s.fd), false);
        total += t0.elapsed();
        cmd(&s.fd, true);
    }
    total
}

/// The floor: `cbs.len()` empty callbacks called through the `Vec`.
fn call_all(cbs: &[Invalidate], a: &Attachment, g: &ResvGuard<'_>) {
    for cb in black_box(cbs) {
        cb(black_box(a), black_box(g));
    }
}

/// The locked floor: each buffer's reservation lock taken in turn, and its share of `cbs`
/// (`cbs.len() / files.len()` callbacks) called under it.
fn lock_and_call(files: &[Arc<File>], cbs: &[Invalidate], a: &Attachment) {
    let per = cbs.len() / files.len();
    for (f, cbs) in black_box(files).iter().zip(cbs.chunks(per)) {
        let g = f.dmabuf().unwrap().lock();
        for cb in cbs {
            cb(black_box(a), black_box(&g));
        }
    }
}

/// Means (ns) per N, filled in as the benchmarks run: (N, revoke, callbacks, locked floor).
static RESULTS: Mutex<Vec<(usize, f64, f64, f64)>> = Mutex::new(Vec::new());

/// Mean time per iteration of `f` over a fixed wall-clock budget (for the summary; criterion's
/// own estimates are in its report).
fn mean_ns(budget: Duration, mut f: impl FnMut(u64) -> Duration) -> f64 {
    let (mut total, mut iters) = (Duration::ZERO, 0u64);
    let start = Instant::now();
    while start.elapsed() < budget || iters < 10 {
        total += f(1);
        iters += 1;
    }
    total.as_nanos() as f64 / iters as f64
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("revoke");
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    for &n in &COUNTS {
        let s = setup(n);
        check(&s);
        g.bench_function(BenchmarkId::new("revoke", n), |b| {
            b.iter_custom(|it| time_revokes(&s, it));
        });

        let m = n * ATTACHMENTS;
        let cbs: Vec<Invalidate> = (0..m)
            .map(|_| -> Invalidate { Arc::new(|_: &Attachment, _: &ResvGuard<'_>| {}) })
            .collect();
        let (f, a) = s.atts.first().unwrap();
        let buf = f.dmabuf().unwrap();
        let guard = buf.lock();
        g.bench_function(
            BenchmarkId::new("callbacks", format!("{n}*{ATTACHMENTS}")),
            |b| {
                b.iter(|| call_all(&cbs, a, &guard));
            },
        );

        // The same two, measured back to back for the summary.
        let budget = Duration::from_millis(500);
        let cb = mean_ns(budget, |it| {
            let t0 = Instant::now();
            for _ in 0..it {
                call_all(&cbs, a, &guard);
            }
            t0.elapsed()
        });
        drop(guard);
        let rv = mean_ns(budget, |it| time_revokes(&s, it));
        let locked = mean_ns(budget, |it| {
            let t0 = Instant::now();
            for _ in 0..it {
                lock_and_call(&s.files, &cbs, a);
            }
            t0.elapsed()
        });
        RESULTS.lock().unwrap().push((n, rv, cb, locked));
    }
    g.finish();
    summary();
}

fn summary() {
    let results = RESULTS.lock().unwrap();
    let Some(&(_, base, _, _)) = results.first() else {
        return;
    };
    let base_per = base / COUNTS[0] as f64;
    eprintln!();
    eprintln!("revoke summary (mean of back-to-back runs; criterion's estimates are above)");
    eprintln!(
        "{:>7} {:>13} {:>17} {:>7} {:>16} {:>7} {:>12} {:>15}",
        "N",
        "revoke",
        "callbacks(N*4)",
        "ratio",
        "locked(N, N*4)",
        "ratio",
        "per buffer",
        "vs N=100/buffer"
    );
    for &(n, rv, cb, locked) in results.iter() {
        let per = rv / n as f64;
        eprintln!(
            "{n:>7} {:>13} {:>17} {:>6.2}x {:>16} {:>6.2}x {:>9.1} ns {:>14.2}x",
            fmt(rv),
            fmt(cb),
            rv / cb,
            fmt(locked),
            rv / locked,
            per,
            per / base_per
        );
    }
    if let Some(&(n, rv, cb, _)) = results.last() {
        let ok = rv <= 3.0 * cb;
        eprintln!(
            "goal revoke({n} x {ATTACHMENTS}) <= 3 x {} callbacks: {:.2}x, {}",
            n * ATTACHMENTS,
            rv / cb,
            if ok { "met" } else { "NOT met" }
        );
    }
}

fn fmt(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
