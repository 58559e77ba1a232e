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
//! revoke's cost per buffer, from rounds that measure the three in turn (the median of the
//! per-round ratios, and their range, so that noise from elsewhere on a shared machine does
//! not land on one of the three alone). The goals: the cost is linear from 100 to 10,000 buffers (flat
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

/// How many rounds the summary measures per N.
const ROUNDS: usize = 15;

/// One round's means (ns per iteration).
#[derive(Clone, Copy)]
struct Round {
    rv: f64,
    cb: f64,
    locked: f64,
}

/// The rounds per N, filled in as the benchmarks run.
static RESULTS: Mutex<Vec<(usize, Vec<Round>)>> = Mutex::new(Vec::new());

/// The median of `v` (which it sorts).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

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

        drop(guard);

        // For the summary: the three measured in turn, round after round, so that a burst of
        // noise from elsewhere on the machine lands on all three rather than on one; each
        // ratio is the median of its per-round ratios.
        let budget = Duration::from_millis(40);
        let mut rounds = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let cb = {
                let guard = buf.lock();
                mean_ns(budget, |it| {
                    let t0 = Instant::now();
                    for _ in 0..it {
                        call_all(&cbs, a, &guard);
                    }
                    t0.elapsed()
                })
            };
            let rv = mean_ns(budget, |it| time_revokes(&s, it));
            let locked = mean_ns(budget, |it| {
                let t0 = Instant::now();
                for _ in 0..it {
                    lock_and_call(&s.files, &cbs, a);
                }
                t0.elapsed()
            });
            rounds.push(Round { rv, cb, locked });
        }
        RESULTS.lock().unwrap().push((n, rounds));
    }
    g.finish();
    summary();
}

/// Per N: median revoke, callbacks and locked floor, the median of the per-round ratios to
/// each floor, and the range of the ratio to the callbacks over the rounds.
struct Summary {
    n: usize,
    rv: f64,
    cb: f64,
    locked: f64,
    to_cb: f64,
    to_locked: f64,
    to_cb_range: (f64, f64),
}

fn summarize(n: usize, rounds: &[Round]) -> Summary {
    let pick = |f: &dyn Fn(&Round) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };
    let mut to_cb = pick(&|r| r.rv / r.cb);
    let to_cb_median = median(&mut to_cb);
    Summary {
        n,
        rv: median(&mut pick(&|r| r.rv)),
        cb: median(&mut pick(&|r| r.cb)),
        locked: median(&mut pick(&|r| r.locked)),
        to_cb: to_cb_median,
        to_locked: median(&mut pick(&|r| r.rv / r.locked)),
        to_cb_range: (to_cb[0], to_cb[to_cb.len() - 1]),
    }
}

fn summary() {
    let results = RESULTS.lock().unwrap();
    let rows: Vec<Summary> = results.iter().map(|(n, r)| summarize(*n, r)).collect();
    let Some(base) = rows.first() else {
        return;
    };
    let base_per = base.rv / base.n as f64;
    eprintln!();
    eprintln!(
        "revoke summary ({ROUNDS} rounds of the three in turn; medians, and the range of the \
         callbacks ratio over the rounds; criterion's estimates are above)"
    );
    eprintln!(
        "{:>7} {:>11} {:>15} {:>7} {:>15} {:>15} {:>7} {:>11} {:>15}",
        "N",
        "revoke",
        "callbacks(N*4)",
        "ratio",
        "(range)",
        "locked(N, N*4)",
        "ratio",
        "per buffer",
        "vs N=100/buffer"
    );
    for r in &rows {
        let per = r.rv / r.n as f64;
        eprintln!(
            "{:>7} {:>11} {:>15} {:>6.2}x {:>15} {:>15} {:>6.2}x {:>8.1} ns {:>14.2}x",
            r.n,
            fmt(r.rv),
            fmt(r.cb),
            r.to_cb,
            format!("{:.2}-{:.2}x", r.to_cb_range.0, r.to_cb_range.1),
            fmt(r.locked),
            r.to_locked,
            per,
            per / base_per
        );
    }
    if let Some(r) = rows.last() {
        eprintln!(
            "goal revoke({} x {ATTACHMENTS}) <= 3 x {} callbacks: {:.2}x, {}",
            r.n,
            r.n * ATTACHMENTS,
            r.to_cb,
            if r.to_cb <= 3.0 { "met" } else { "NOT met" }
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
