//! Plays a [`Scenario`] on a backend and records what each step produced.
//!
//! Outcomes are short, backend-independent words so two runs can be compared as strings:
//! `ok`; an errno name (`EINVAL`); `fd size=… count=… exp_name=… flags=0o…` for a new
//! dma-buf (its fdinfo); a
//! masked config value (`0x0002`); `landed` / `not landed` for a DMA (or `pending` when only
//! the host can look); `error: …` when the scenario itself is wrong (a name never given).

use std::collections::{HashMap, HashSet};

use peerdma_pci::{Bdf, Errno, regs};
use peerdma_uapi::backend::{CpuFault, Landed, MapHandle, ScenarioBackend};
use peerdma_uapi::feature::{VFIO_DEVICE_FEATURE_SET, header_bytes};
use peerdma_uapi::{DevHandle, IoasId, OpenPath};
use serde::{Deserialize, Serialize};

use crate::format::{Action, Cap, ConfigAt, FdArg, Iova, IrqData, Scenario, Step};

/// Bytes each DMA step writes: `peerdma!`, a sequence number, filler. Short on purpose: a
/// revoked DMA faults once per 4 bytes in QEMU's IOMMU, and fault storms are what the real
/// side has least need of.
pub const PATTERN_LEN: u64 = 16;

/// Where a pending DMA must be looked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The provider's region (BAR).
    pub region: u32,
    /// Offset in it.
    pub offset: u64,
    /// The pattern, hex.
    pub hex: String,
}

/// What one step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// The scenario's name.
    pub scenario: String,
    /// The step, from 1.
    pub step: usize,
    /// Its `do` word.
    #[serde(rename = "do")]
    pub action: String,
    /// What it expects.
    pub expect: String,
    /// What it got.
    pub outcome: String,
    /// Whether that is what it expects (`None` while pending).
    pub pass: Option<bool>,
    /// For a pending DMA: where to look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// What the kernel printed during the step ([`ScenarioBackend::kernel_messages`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel: Vec<String>,
}

/// State that lives across the scenarios of one run (one boot of the guest, one emulated
/// machine): which bytes of the providers' memory earlier DMAs used, so that every DMA of
/// the run writes a fresh place and a later one cannot fake or hide an earlier result; and
/// which 16-byte slots CPU writes touched, so that no DMA uses them and no CPU write
/// overwrites a pattern the host has yet to look for.
#[derive(Debug, Default)]
pub struct RunCtx {
    used: HashSet<(Bdf, u32, u64)>,
    cpu_written: HashSet<(Bdf, u32, u64)>,
    seq: u32,
}

impl RunCtx {
    /// Claims the slots `[offset, offset + len)` of region `region` of `bdf` for a CPU
    /// write; an error if a DMA of the run used one of them.
    fn claim_for_cpu(
        &mut self,
        bdf: Bdf,
        region: u32,
        offset: u64,
        len: u64,
    ) -> Result<(), String> {
        let first = offset / PATTERN_LEN;
        let last = offset.saturating_add(len.max(1) - 1) / PATTERN_LEN;
        if let Some(s) = (first..=last).find(|&s| self.used.contains(&(bdf, region, s))) {
            return Err(format!(
                "error: the write would overwrite the pattern an earlier DMA of the run left at {:#x} of region {region}",
                s * PATTERN_LEN
            ));
        }
        for s in first..=last {
            self.cpu_written.insert((bdf, region, s));
        }
        Ok(())
    }
}

struct Export {
    bdf: Bdf,
    region: u32,
    ranges: Vec<(u64, u64)>,
}

/// What a named fd is, as far as a DMA through a window of it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// A dma-buf an export step made (an index into `State::exports`).
    Export(usize),
    /// A memfd (numbered in the scenario's order): a DMA through it is checked by reading
    /// the file.
    Memfd(u32),
    /// Anything else (an eventfd).
    Other,
}

struct Window {
    iova: u64,
    length: u64,
    start: u64,
    /// The mapped fd (its number at map time) and what it is.
    fd: i32,
    src: Src,
}

/// The fd number that stands for a closed fd: past any process's fd table, so no file is
/// ever there and every call with it answers as for a closed fd (`EBADF`). The number the
/// fd had may be reused by a later fd, so it cannot stand for it; a negative number would
/// be refused by some calls before they look (a wakeup eventfd of -1 is `EINVAL`).
const CLOSED_FD: i32 = 0x3fff_ffff;

#[derive(Default)]
struct State {
    devs: HashMap<String, (DevHandle, Bdf)>,
    fds: HashMap<String, (i32, Src)>,
    /// Names of fds a `close_fd` step closed.
    closed: std::collections::HashSet<String>,
    /// Memfds made so far.
    memfds: u32,
    /// The runner's own descriptor of each memfd (by number), through which a DMA into it
    /// is checked whatever the scenario does with its fd.
    memfd_peek: HashMap<u32, i32>,
    /// 16-byte slots of memfds (by number) a DMA of the scenario wrote.
    memfd_used: HashSet<(u32, u64)>,
    exports: Vec<Export>,
    ioas: HashMap<String, IoasId>,
    /// iommufds opened by `iommufd` steps, by name.
    iommufds: HashMap<String, u32>,
    windows: Vec<Window>,
    /// The IOVAs named maps got.
    iovas: HashMap<String, u64>,
    /// CPU mappings of device regions: the mapping, and where it starts (device, region,
    /// offset).
    cpu_maps: HashMap<String, (MapHandle, Bdf, u32, u64)>,
}

/// Plays `s` on `be`. Every step runs, whatever earlier ones produced. A step in another
/// process (`process = "…"`) fails: `be` alone cannot make one ([`run_all`] can).
pub fn run(s: &Scenario, be: &mut dyn ScenarioBackend, ctx: &mut RunCtx) -> Vec<StepResult> {
    run_in(s, be, ctx, &mut || None)
}

/// A maker of the scenario's other processes.
type Spawn<'a> = dyn FnMut() -> Option<Box<dyn ScenarioBackend + 'a>> + 'a;

/// [`run`], with `spawn` making a backend for each other process the scenario names, on
/// first use. They go (closing what they left open) when the scenario ends, before `be`.
fn run_in<'a>(
    s: &Scenario,
    be: &mut dyn ScenarioBackend,
    ctx: &mut RunCtx,
    spawn: &mut Spawn<'a>,
) -> Vec<StepResult> {
    let mut st = State::default();
    let mut others: Vec<(String, Box<dyn ScenarioBackend + 'a>, State)> = Vec::new();
    let mut out = Vec::new();
    // What the kernel printed before the scenario belongs to no step.
    let _ = be.kernel_messages();
    for (i, step) in s.steps.iter().enumerate() {
        let played = match &step.process {
            None => play(&step.action, be, &mut st, ctx),
            Some(p) => {
                if !others.iter().any(|(n, ..)| n == p) {
                    if let Some(mut b) = spawn() {
                        let _ = b.kernel_messages();
                        others.push((p.clone(), b, State::default()));
                    }
                }
                match others.iter_mut().find(|(n, ..)| n == p) {
                    Some((_, b, pst)) => play(&step.action, &mut **b, pst, ctx),
                    None => Err("error: this backend cannot start another process".into()),
                }
            }
        };
        let (outcome, check) = played.unwrap_or_else(|e| (e, None));
        // The kernel's log is one: read it once, and let the other processes' readers skip
        // what they would only repeat.
        let kernel = be.kernel_messages();
        for (_, b, _) in &mut others {
            let _ = b.kernel_messages();
        }
        let pass = if outcome == "pending" {
            None
        } else {
            Some(
                step.expect.matches(&outcome)
                    && kernel_problem(step, &kernel, be.has_kernel_log()).is_none(),
            )
        };
        out.push(StepResult {
            scenario: s.name.clone(),
            step: i + 1,
            action: step.action.word().into(),
            expect: step.expect.to_string(),
            outcome,
            pass,
            check,
            kernel,
        });
    }
    drop(others);
    out
}

/// Plays every scenario in order as one run (one [`RunCtx`]), each in a fresh process from
/// `process` — dropped at the scenario's end, closing whatever it left open. A scenario's
/// other processes come from `process` too.
pub fn run_all<B: ScenarioBackend>(
    scenarios: &[Scenario],
    mut process: impl FnMut() -> B,
) -> Vec<StepResult> {
    let mut ctx = RunCtx::default();
    let mut out = Vec::new();
    for s in scenarios {
        let mut be = process();
        let mut spawn = || Some(Box::new(process()) as Box<dyn ScenarioBackend>);
        out.extend(run_in(s, &mut be, &mut ctx, &mut spawn));
    }
    out
}

type Played = Result<(String, Option<Check>), String>;

/// What is wrong with what the kernel printed during `step`: a warning, bug or oops the
/// step does not expect, or (on a backend with a kernel log) the message it expects missing.
pub fn kernel_problem(step: &Step, kernel: &[String], has_log: bool) -> Option<String> {
    let expected = |l: &String| step.dmesg.as_deref().is_some_and(|d| l.contains(d));
    if let Some(w) = kernel
        .iter()
        .find(|l| peerdma_uapi::backend::is_kernel_warning(l) && !expected(l))
    {
        return Some(format!("the kernel warned: {w}"));
    }
    match &step.dmesg {
        Some(d) if has_log && !kernel.iter().any(|l| l.contains(d.as_str())) => {
            Some(format!("the kernel did not print {d:?}"))
        }
        _ => None,
    }
}

fn errno_word(e: Errno) -> String {
    e.name()
        .map_or_else(|| format!("errno {}", e.0), str::to_string)
}

#[allow(clippy::unnecessary_wraps)] // shaped like every other arm of `play`
fn ok_or_errno(r: Result<(), Errno>) -> Played {
    Ok((r.map_or_else(errno_word, |()| "ok".into()), None))
}

/// What a read produced: the bytes, or (when the step does not look at them) their count.
fn read_outcome(b: &[u8], show: bool) -> String {
    if show {
        format!("read {}", hex(b))
    } else {
        format!("read {} bytes", b.len())
    }
}

/// `devices 0000:05:00.0=devid 0000:05:00.1=owned flags=dev_id,owned`: each device the
/// reset reaches and how the kernel named it (`devid`, `owned`, `not_owned`, `group`; ids
/// themselves differ between backends), then the flags (`none` for 0).
/// The outcome of an `irq_info` step: `irq count=1 flags=eventfd,maskable,automasked`.
fn device_info_outcome(flags: u32, regions: u32, irqs: u32) -> String {
    let names = [(1, "reset"), (2, "pci"), (0x80, "caps")];
    format!(
        "info flags={} regions={regions} irqs={irqs}",
        crate::format::flag_words(flags, &names)
    )
}

fn irq_info_outcome(flags: u32, count: u32) -> String {
    let names = [
        (1, "eventfd"),
        (2, "maskable"),
        (4, "automasked"),
        (8, "noresize"),
    ];
    format!(
        "irq count={count} flags={}",
        crate::format::flag_words(flags, &names)
    )
}

fn hot_reset_outcome(i: &peerdma_uapi::backend::HotResetInfo) -> String {
    use peerdma_uapi::backend::{Dependent, HOT_RESET_FLAG_DEV_ID, HOT_RESET_FLAG_DEV_ID_OWNED};
    let mut words = vec!["devices".to_string()];
    for (b, d) in &i.devices {
        let w = match d {
            Dependent::DevId(id) => format!("devid:{id}"),
            Dependent::Owned => "owned".into(),
            Dependent::NotOwned => "not_owned".into(),
            Dependent::Group(_) => "group".into(),
        };
        words.push(format!("{b}={w}"));
    }
    let mut f = Vec::new();
    if i.flags & HOT_RESET_FLAG_DEV_ID != 0 {
        f.push("dev_id".to_string());
    }
    if i.flags & HOT_RESET_FLAG_DEV_ID_OWNED != 0 {
        f.push("owned".to_string());
    }
    let rest = i.flags & !3;
    if rest != 0 {
        f.push(format!("{rest:#x}"));
    }
    if f.is_empty() {
        f.push("none".into());
    }
    words.push(format!("flags={}", f.join(",")));
    words.join(" ")
}

fn fault_word(f: CpuFault) -> String {
    match f {
        CpuFault::Sigbus => "SIGBUS".into(),
        CpuFault::Errno(e) => errno_word(e),
    }
}

/// A fd's outcome: `fd` and, for a dma-buf, what its fdinfo says; the errno when the fd is
/// not open.
fn fd_outcome(be: &mut dyn ScenarioBackend, fd: i32) -> String {
    match be.dmabuf_info(fd) {
        Ok(i) => format!(
            "fd size={} count={} exp_name={} flags={:#o}",
            i.size, i.count, i.exp_name, i.flags
        ),
        // Not a dma-buf: there is nothing more to say of it.
        Err(Errno::EINVAL) => "fd".into(),
        Err(e) => errno_word(e),
    }
}

impl State {
    fn dev(&self, name: &str) -> Result<(DevHandle, Bdf), String> {
        self.devs
            .get(name)
            .copied()
            .ok_or_else(|| format!("error: no device named {name:?}"))
    }
    fn fd(&self, name: &str) -> Result<(i32, Src), String> {
        if self.closed.contains(name) {
            return Ok((CLOSED_FD, Src::Other));
        }
        self.fds
            .get(name)
            .copied()
            .ok_or_else(|| format!("error: no fd named {name:?}"))
    }
    /// The address of an IOVA field.
    fn iova(&self, v: &Iova) -> Result<u64, String> {
        match v {
            Iova::At(a) => Ok(*a),
            Iova::Named { name, plus } => self
                .iovas
                .get(name)
                .ok_or_else(|| format!("error: no map named {name:?} got an IOVA"))?
                .checked_add(*plus)
                .ok_or_else(|| format!("error: {name}+{plus:#x} is past 2^64")),
        }
    }
    fn cpu_map(&self, name: &str) -> Result<(MapHandle, Bdf, u32, u64), String> {
        self.cpu_maps
            .get(name)
            .copied()
            .ok_or_else(|| format!("error: no CPU mapping named {name:?}"))
    }
    fn iommufd(&self, name: &str) -> Result<u32, String> {
        self.iommufds
            .get(name)
            .copied()
            .ok_or_else(|| format!("error: no iommufd named {name:?}"))
    }
    fn ioas(&self, name: &str) -> Result<IoasId, String> {
        self.ioas
            .get(name)
            .copied()
            .ok_or_else(|| format!("error: no IOAS named {name:?}"))
    }
    /// Keeps a new fd under `name`; `export` says which export made it.
    fn keep(&mut self, name: Option<&String>, fd: i32, export: Option<Export>) {
        let src = export.map_or(Src::Other, |e| {
            self.exports.push(e);
            Src::Export(self.exports.len() - 1)
        });
        if let Some(n) = name {
            self.keep_as(n, fd, src);
        }
    }
    fn keep_as(&mut self, name: &str, fd: i32, src: Src) {
        self.closed.remove(name);
        self.fds.insert(name.to_string(), (fd, src));
    }
}

fn read_cfg(
    be: &mut dyn ScenarioBackend,
    d: DevHandle,
    off: u16,
    size: usize,
) -> Result<u32, Errno> {
    read_cfg_wide(be, d, off, size).map(|v| v as u32)
}

/// A config read of 1 to 8 bytes, little-endian.
fn read_cfg_wide(
    be: &mut dyn ScenarioBackend,
    d: DevHandle,
    off: u16,
    size: usize,
) -> Result<u64, Errno> {
    let mut b = vec![0u8; size];
    be.config_read(d, u64::from(off), &mut b)?;
    Ok(b.iter()
        .enumerate()
        .fold(0u64, |v, (i, x)| v | u64::from(*x) << (8 * i)))
}

/// The absolute offset of `at`: `Ok(None)` when its capability is absent.
fn resolve(
    be: &mut dyn ScenarioBackend,
    d: DevHandle,
    at: &ConfigAt,
) -> Result<Option<u16>, Errno> {
    let base = match at.cap {
        None => Some(0),
        Some(Cap::Std(id)) => find_cap(be, d, id)?,
        Some(Cap::Ext(id)) => find_ecap(be, d, id)?,
    };
    Ok(base.map(|b| b + at.offset))
}

/// Finds extended capability `id` by walking the list from 0x100 through config reads.
fn find_ecap(be: &mut dyn ScenarioBackend, d: DevHandle, id: u16) -> Result<Option<u16>, Errno> {
    let mut p: u16 = 0x100;
    // Each header is at least 4 bytes past the last, inside 0x100..0x1000.
    for _ in 0..(0x1000 - 0x100) / 4 {
        let hdr = read_cfg(be, d, p, 4)?;
        if hdr == 0 || hdr == u32::MAX {
            return Ok(None);
        }
        if hdr & 0xffff == u32::from(id) {
            return Ok(Some(p));
        }
        let next = (hdr >> 20) as u16 & 0xffc;
        if next < 0x100 {
            return Ok(None);
        }
        p = next;
    }
    Ok(None)
}

/// The outcome of a step that needs a capability the device lacks.
fn no_cap(at: &ConfigAt) -> String {
    format!(
        "no {} capability",
        at.cap.map_or_else(String::new, Cap::name)
    )
}

/// Finds capability `id` by walking the list through config reads, as a user would.
fn find_cap(be: &mut dyn ScenarioBackend, d: DevHandle, id: u8) -> Result<Option<u16>, Errno> {
    let status = read_cfg(be, d, regs::STATUS, 2)?;
    if status & u32::from(regs::STATUS_CAP_LIST) == 0 {
        return Ok(None);
    }
    let mut p = read_cfg(be, d, regs::CAPABILITY_LIST, 1)? as u16 & 0xfc;
    for _ in 0..48 {
        if p == 0 {
            break;
        }
        let hdr = read_cfg(be, d, p, 2)?;
        if hdr & 0xff == u32::from(id) {
            return Ok(Some(p));
        }
        p = (hdr >> 8) as u16 & 0xfc;
    }
    Ok(None)
}

/// The provider memory a DMA at `iova` would reach through the newest window holding it, at
/// a 16-byte slot no earlier DMA of the run used: (iova, provider, region, offset).
/// What a map step answers: `ok` for a fixed IOVA, the kernel's choice without, or the
/// errno.
fn map_outcome(r: Result<u64, Errno>, flags: u32) -> String {
    match r {
        Ok(_) if flags & peerdma_uapi::backend::MAP_FIXED_IOVA != 0 => "ok".into(),
        Ok(at) => format!("iova {at:#x}"),
        Err(e) => errno_word(e),
    }
}

/// Where a DMA at `iova` is aimed and where its bytes must land.
enum Target {
    /// At `offset` of region `region` of the provider `bdf`.
    Bar(Bdf, u32, u64),
    /// At `offset` of the memfd numbered `id`, through its fd `fd`.
    Memfd(i32, u32, u64),
}

/// The first IOVA from `iova` up, in the newest window holding it, whose 16 bytes land
/// where no earlier DMA or CPU write of this run put anything.
fn pick_target(st: &State, ctx: &RunCtx, iova: u64) -> Result<(u64, Target), String> {
    let w = st
        .windows
        .iter()
        .rev()
        .find(|w| iova >= w.iova && iova - w.iova < w.length)
        .ok_or_else(|| format!("error: {iova:#x} is in no window an earlier map step made"))?;
    let (e, memfd) = match w.src {
        Src::Export(i) => (Some(&st.exports[i]), None),
        Src::Memfd(id) => (None, Some(id)),
        Src::Other => return Err("error: the window's fd is not an export or a memfd".into()),
    };
    let mut cand = iova;
    // Offsets into the window, so that a window at the top of the address space cannot
    // overflow.
    while cand - w.iova <= w.length.saturating_sub(PATTERN_LEN) && w.length >= PATTERN_LEN {
        let Some(mut b) = (cand - w.iova).checked_add(w.start) else {
            break;
        };
        let Some(e) = e else {
            let id = memfd.unwrap_or(0);
            let slots = [b / PATTERN_LEN, b.div_ceil(PATTERN_LEN)];
            if !slots.iter().any(|&x| st.memfd_used.contains(&(id, x))) {
                return Ok((cand, Target::Memfd(w.fd, id, b)));
            }
            let Some(next) = cand.checked_add(PATTERN_LEN) else {
                break;
            };
            cand = next;
            continue;
        };
        let mut at = None;
        for &(off, len) in &e.ranges {
            if b < len {
                at = (b + PATTERN_LEN <= len).then_some(off + b);
                break;
            }
            b -= len;
        }
        if let Some(off) = at {
            let slot = (e.bdf, e.region, off / PATTERN_LEN);
            // The pattern's first and last bytes' slots (it straddles two when unaligned).
            let cpu = [off, off + PATTERN_LEN - 1].iter().any(|b| {
                ctx.cpu_written
                    .contains(&(e.bdf, e.region, b / PATTERN_LEN))
            });
            if !ctx.used.contains(&slot) && !cpu {
                return Ok((cand, Target::Bar(e.bdf, e.region, off)));
            }
        }
        let Some(next) = cand.checked_add(PATTERN_LEN) else {
            break;
        };
        cand = next;
    }
    Err("error: no unused 16-byte slot left in the window".into())
}

fn pattern(seq: u32) -> Vec<u8> {
    let mut p = b"peerdma!".to_vec();
    p.extend_from_slice(&seq.to_le_bytes());
    while p.len() < PATTERN_LEN as usize {
        let i = p.len() as u32;
        p.push((seq.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) as u8) | 1);
    }
    p
}

/// Bytes as lowercase hex, as `Check::hex` holds them.
pub(crate) fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn play(a: &Action, be: &mut dyn ScenarioBackend, st: &mut State, ctx: &mut RunCtx) -> Played {
    match a {
        Action::Open {
            role,
            name,
            path,
            iommufd,
        } => {
            let bdf = be
                .role(role)
                .map_err(|_| format!("error: no device plays {role:?} here"))?;
            let ictx = iommufd.as_ref().map(|n| st.iommufd(n)).transpose()?;
            // Bound to another iommufd: the cdev opened, then bound to it, as one step.
            let opened = match ictx {
                None => be.open_device(bdf, *path),
                Some(i) => be.open_device(bdf, OpenPath::CdevUnbound).and_then(|h| {
                    be.bind_device_to(h, i).map(|()| h).inspect_err(|_| {
                        let _ = be.close_device(h);
                    })
                }),
            };
            match opened {
                Ok(h) => {
                    st.devs.insert(name.clone(), (h, bdf));
                    Ok(("ok".into(), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::Bind { dev, iommufd } => {
            let (d, _) = st.dev(dev)?;
            let i = iommufd.as_ref().map_or(Ok(0), |n| st.iommufd(n))?;
            ok_or_errno(be.bind_device_to(d, i))
        }
        Action::Iommufd { name } => match be.iommufd_open() {
            Ok(i) => {
                st.iommufds.insert(name.clone(), i);
                Ok(("ok".into(), None))
            }
            Err(e) => Ok((errno_word(e), None)),
        },
        Action::Close { dev } => {
            let (d, _) = st.dev(dev)?;
            st.devs.remove(dev);
            ok_or_errno(be.close_device(d))
        }
        Action::Feature {
            dev,
            flags,
            argsz,
            data,
            name,
        } => {
            let (d, _) = st.dev(dev)?;
            let total = u32::try_from(8 + data.len()).unwrap_or(u32::MAX);
            let mut b = header_bytes(argsz.unwrap_or(total), *flags);
            b.extend_from_slice(data);
            match be.device_feature(d, &mut b) {
                Ok(0) => Ok(("ok".into(), None)),
                Ok(fd) => {
                    st.keep(name.as_ref(), fd, None);
                    Ok((fd_outcome(be, fd), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::Export { dev, req, name } => {
            let (d, bdf) = st.dev(dev)?;
            let mut b = req.to_bytes();
            match be.device_feature(d, &mut b) {
                Ok(0) => Ok(("ok".into(), None)),
                Ok(fd) => {
                    let e = Export {
                        bdf,
                        region: req.region_index,
                        ranges: req.ranges.clone(),
                    };
                    st.keep(name.as_ref(), fd, Some(e));
                    Ok((fd_outcome(be, fd), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::CloseFd { fd } => {
            let (n, _) = st.fd(fd)?;
            st.fds.remove(fd);
            st.closed.insert(fd.clone());
            ok_or_errno(be.close_fd(n))
        }
        Action::Dup { fd, name } => {
            let (n, src) = st.fd(fd)?;
            match be.dup_fd(n) {
                Ok(new) => {
                    st.keep_as(name, new, src);
                    Ok((fd_outcome(be, new), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::Udmabuf {
            memfd,
            flags,
            offset,
            size,
            name,
        } => {
            let m = match memfd {
                FdArg::Named(n) => st.fd(n)?.0,
                FdArg::Raw(n) => *n,
            };
            match be.udmabuf(m, *flags, *offset, *size) {
                Ok(new) => {
                    st.keep_as(name, new, Src::Other);
                    Ok((fd_outcome(be, new), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::Memfd { size, seals, name } => match match seals {
            None => be.memfd(*size),
            Some(s) => be.memfd_sealed(*size, *s),
        } {
            Ok(n) => {
                st.memfds += 1;
                if let Ok(own) = be.dup_fd(n) {
                    st.memfd_peek.insert(st.memfds, own);
                }
                st.keep_as(name, n, Src::Memfd(st.memfds));
                Ok(("ok".into(), None))
            }
            Err(e) => Ok((errno_word(e), None)),
        },
        Action::Settle { ms } => {
            be.settle(*ms);
            Ok(("ok".into(), None))
        }
        Action::Eventfd { name } => match be.eventfd() {
            Ok(n) => {
                st.keep_as(name, n, Src::Other);
                Ok(("ok".into(), None))
            }
            Err(e) => Ok((errno_word(e), None)),
        },
        Action::Read { fd, size, show } => {
            let (n, _) = st.fd(fd)?;
            let mut b = vec![0u8; *size];
            Ok((
                match be.read_fd(n, &mut b) {
                    Ok(k) => read_outcome(&b[..k.min(b.len())], *show),
                    Err(e) => errno_word(e),
                },
                None,
            ))
        }
        Action::Fdinfo { fd } => {
            let (n, _) = st.fd(fd)?;
            Ok((fd_outcome(be, n), None))
        }
        Action::Seek { fd, offset, whence } => {
            let (n, _) = st.fd(fd)?;
            Ok((
                be.dmabuf_seek(n, *offset, *whence)
                    .map_or_else(errno_word, |p| format!("position {p}")),
                None,
            ))
        }
        Action::Mmap { fd, offset, length } => {
            let (n, _) = st.fd(fd)?;
            ok_or_errno(be.dmabuf_mmap(n, *offset, *length))
        }
        Action::ConfigRead {
            dev,
            at,
            size,
            mask,
        } => {
            let (d, _) = st.dev(dev)?;
            let Some(off) = resolve(be, d, at).map_err(errno_word)? else {
                return Ok((no_cap(at), None));
            };
            Ok((
                read_cfg_wide(be, d, off, *size)
                    .map_or_else(errno_word, |v| format!("{:#06x}", v & mask)),
                None,
            ))
        }
        Action::ConfigWrite {
            dev,
            at,
            size,
            value,
        } => {
            let (d, _) = st.dev(dev)?;
            let Some(off) = resolve(be, d, at).map_err(errno_word)? else {
                return Ok((no_cap(at), None));
            };
            let bytes = value.to_le_bytes();
            ok_or_errno(be.config_write(d, u64::from(off), &bytes[..*size]))
        }
        Action::Memory { dev, on } => {
            let (d, _) = st.dev(dev)?;
            let r = read_cfg(be, d, regs::COMMAND, 2).and_then(|c| {
                let m = u32::from(regs::COMMAND_MEMORY);
                let v = if *on { c | m } else { c & !m } as u16;
                be.config_write(d, u64::from(regs::COMMAND), &v.to_le_bytes())
            });
            ok_or_errno(r)
        }
        Action::Power { dev, state, size } => {
            let (d, _) = st.dev(dev)?;
            let Some(pm) = find_cap(be, d, regs::CAP_ID_PM).map_err(errno_word)? else {
                return Ok(("no PM capability".into(), None));
            };
            let at = pm + regs::PM_CTRL;
            let r = read_cfg(be, d, at, *size).and_then(|c| {
                let v = (c & !u32::from(regs::PM_CTRL_STATE_MASK)) | u32::from(*state);
                be.config_write(d, u64::from(at), &v.to_le_bytes()[..*size])
            });
            ok_or_errno(r)
        }
        Action::Flr { dev, size } => {
            let (d, _) = st.dev(dev)?;
            let Some(e) = find_cap(be, d, regs::CAP_ID_EXP).map_err(errno_word)? else {
                return Ok(("no PCIe capability".into(), None));
            };
            let cap = read_cfg(be, d, e + regs::EXP_DEVCAP, 4).map_err(errno_word)?;
            if cap & regs::EXP_DEVCAP_FLR == 0 {
                return Ok(("no FLR".into(), None));
            }
            let flr = u32::from(regs::EXP_DEVCTL_BCR_FLR);
            let ctl = e + regs::EXP_DEVCTL;
            let r = match size {
                // DevCtl's high byte, where the FLR bit is.
                1 => read_cfg(be, d, ctl + 1, 1)
                    .and_then(|c| be.config_write(d, u64::from(ctl + 1), &[(c | flr >> 8) as u8])),
                // DevCtl with DevSta, whose write-one-to-clear bits get zeros.
                4 => read_cfg(be, d, ctl, 2)
                    .and_then(|c| be.config_write(d, u64::from(ctl), &(c | flr).to_le_bytes())),
                _ => read_cfg(be, d, ctl, 2).and_then(|c| {
                    be.config_write(d, u64::from(ctl), &((c | flr) as u16).to_le_bytes())
                }),
            };
            ok_or_errno(r)
        }
        Action::AfFlr { dev } => {
            let (d, _) = st.dev(dev)?;
            let Some(a) = find_cap(be, d, regs::CAP_ID_AF).map_err(errno_word)? else {
                return Ok(("no AF capability".into(), None));
            };
            ok_or_errno(be.config_write(d, u64::from(a + regs::AF_CTRL), &[regs::AF_CTRL_FLR]))
        }
        Action::Reset { dev } => {
            let (d, _) = st.dev(dev)?;
            ok_or_errno(be.reset(d))
        }
        Action::HotReset { dev, groups } => {
            let (d, _) = st.dev(dev)?;
            let fds = match groups {
                None => None,
                Some(names) => Some(
                    names
                        .iter()
                        .map(|n| st.fd(n).map(|(fd, _)| fd))
                        .collect::<Result<Vec<i32>, String>>()?,
                ),
            };
            ok_or_errno(be.hot_reset(d, fds.as_deref()))
        }
        Action::Group { dev, name } => {
            let bdf = be
                .role(dev)
                .map_err(|_| format!("error: no device plays {dev:?} here"))?;
            match be.group_fd(bdf) {
                Ok(n) => {
                    st.keep_as(name, n, Src::Other);
                    Ok(("ok".into(), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::LowPower {
            dev,
            enter: true,
            wakeup: true,
            reserved,
            eventfd,
        } => {
            let (d, _) = st.dev(dev)?;
            let efd = match eventfd {
                Some(name) => Some(st.fd(name)?.0),
                None => None,
            };
            ok_or_errno(be.low_power_wakeup(d, *reserved, efd))
        }
        Action::LowPower { dev, enter, .. } => {
            let (d, _) = st.dev(dev)?;
            let id = if *enter { 3 } else { 5 };
            let mut b = header_bytes(8, VFIO_DEVICE_FEATURE_SET | id);
            ok_or_errno(be.device_feature(d, &mut b).map(drop))
        }
        Action::IoasAlloc { name, iommufd } => match iommufd
            .as_ref()
            .map_or(Ok(0), |n| st.iommufd(n))
            .map(|i| be.ioas_alloc_in(i))?
        {
            Ok(id) => {
                st.ioas.insert(name.clone(), id);
                Ok(("ok".into(), None))
            }
            Err(e) => Ok((errno_word(e), None)),
        },
        Action::Attach { dev, ioas } => {
            let (d, _) = st.dev(dev)?;
            let i = st.ioas(ioas)?;
            ok_or_errno(be.attach_ioas(d, i))
        }
        Action::Map {
            ioas,
            fd,
            start,
            length,
            iova,
            flags,
            name,
        } => {
            let space = st.ioas(ioas)?;
            let (n, src) = st.fd(fd)?;
            let asked = st.iova(iova)?;
            let r = be.ioas_map_file(space, n, *start, *length, asked, *flags);
            if let Ok(at) = r {
                st.windows.push(Window {
                    iova: at,
                    length: *length,
                    start: *start,
                    fd: n,
                    src,
                });
                if let Some(name) = name {
                    st.iovas.insert(name.clone(), at);
                }
            }
            Ok((map_outcome(r, *flags), None))
        }
        Action::MapUser {
            ioas,
            memfd,
            read_only,
            offset,
            length,
            iova,
            flags,
            reserved,
            name,
        } => {
            let space = st.ioas(ioas)?;
            let fd = match memfd {
                Some(m) => match st.fd(m)? {
                    (n, src @ Src::Memfd(_)) => Some((n, src)),
                    _ => return Err(format!("error: fd {m:?} is not a memfd")),
                },
                None => None,
            };
            let asked = st.iova(iova)?;
            let memory = peerdma_uapi::backend::UserMemory {
                memfd: fd.map(|(n, _)| n),
                read_only: *read_only,
            };
            let r = be.ioas_map_user(space, memory, *offset, *length, asked, *flags, *reserved);
            if let (Ok(at), Some((n, src))) = (r, fd) {
                st.windows.push(Window {
                    iova: at,
                    length: *length,
                    start: *offset,
                    fd: n,
                    src,
                });
            }
            if let (Ok(at), Some(name)) = (r, name) {
                st.iovas.insert(name.clone(), at);
            }
            Ok((map_outcome(r, *flags), None))
        }
        Action::Unmap { ioas, iova, length } => {
            let i = st.ioas(ioas)?;
            let at = st.iova(iova)?;
            Ok((
                match be.ioas_unmap(i, at, *length) {
                    Ok(n) if n == *length => "ok".into(),
                    Ok(n) => format!("unmapped {n:#x}"),
                    Err(e) => errno_word(e),
                },
                None,
            ))
        }
        Action::Detach { dev } => {
            let (d, _) = st.dev(dev)?;
            ok_or_errno(be.detach_ioas(d))
        }
        Action::IoasDestroy { ioas } => {
            let i = st.ioas(ioas)?;
            ok_or_errno(be.ioas_destroy(i))
        }
        Action::AllowIovas {
            ioas,
            ranges,
            reserved,
        } => {
            let i = st.ioas(ioas)?;
            Ok((
                be.ioas_allow_iovas(i, ranges, *reserved)
                    .map_or_else(errno_word, |()| "ok".into()),
                None,
            ))
        }
        Action::IovaRanges { ioas, room } => {
            let i = st.ioas(ioas)?;
            Ok((
                match be.ioas_iova_ranges(i, *room) {
                    Ok(r) => crate::format::ranges_outcome(&r.ranges, r.alignment),
                    Err(e) => errno_word(e),
                },
                None,
            ))
        }
        Action::RegionInfo { dev, region } => {
            let (d, _) = st.dev(dev)?;
            Ok((
                be.region_info(d, *region).map_or_else(errno_word, |i| {
                    format!(
                        "region size={:#x} flags={} offset={:#x} caps={}",
                        i.size,
                        crate::format::region_flag_words(i.flags),
                        i.offset,
                        crate::format::region_cap_words(&i.caps)
                    )
                }),
                None,
            ))
        }
        Action::RegionRead {
            dev,
            region,
            offset,
            size,
            show,
        } => {
            let (d, _) = st.dev(dev)?;
            let mut b = vec![0u8; *size];
            Ok((
                match be.region_read(d, *region, *offset, &mut b) {
                    Ok(n) => read_outcome(&b[..n.min(b.len())], *show),
                    Err(e) => errno_word(e),
                },
                None,
            ))
        }
        Action::RegionWrite {
            dev,
            region,
            offset,
            data,
        } => {
            let (d, bdf) = st.dev(dev)?;
            if *region < 6 {
                ctx.claim_for_cpu(bdf, *region, *offset, data.len() as u64)?;
            }
            Ok((
                match be.region_write(d, *region, *offset, data) {
                    Ok(n) if n == data.len() => "ok".into(),
                    Ok(n) => format!("wrote {n}"),
                    Err(e) => errno_word(e),
                },
                None,
            ))
        }
        Action::CpuMap {
            dev,
            region,
            offset,
            length,
            shared,
            name,
        } => {
            let (d, bdf) = st.dev(dev)?;
            match be.region_mmap(d, *region, *offset, *length, *shared) {
                Ok(m) => {
                    st.cpu_maps.insert(name.clone(), (m, bdf, *region, *offset));
                    Ok(("ok".into(), None))
                }
                Err(e) => Ok((errno_word(e), None)),
            }
        }
        Action::CpuRead {
            map,
            offset,
            size,
            show,
        } => {
            let (m, ..) = st.cpu_map(map)?;
            let mut b = vec![0u8; *size];
            Ok((
                match be.cpu_access(m, *offset, &mut b, false) {
                    Ok(()) => read_outcome(&b, *show),
                    Err(f) => fault_word(f),
                },
                None,
            ))
        }
        Action::CpuWrite { map, offset, data } => {
            let (m, bdf, region, base) = st.cpu_map(map)?;
            ctx.claim_for_cpu(bdf, region, base.saturating_add(*offset), data.len() as u64)?;
            let mut b = data.clone();
            Ok((
                match be.cpu_access(m, *offset, &mut b, true) {
                    Ok(()) => "ok".into(),
                    Err(f) => fault_word(f),
                },
                None,
            ))
        }
        Action::Ioeventfd {
            dev,
            region,
            offset,
            flags,
            data,
            fd,
            argsz,
        } => {
            let (d, bdf) = st.dev(dev)?;
            let fd = match fd {
                FdArg::Named(n) => st.fd(n)?.0,
                FdArg::Raw(n) => *n,
            };
            if *region < 6 && (1..=8).contains(flags) {
                ctx.claim_for_cpu(bdf, *region, *offset, u64::from(*flags))?;
            }
            let mut b = [0u8; 32];
            b[0..4].copy_from_slice(&argsz.to_le_bytes());
            b[4..8].copy_from_slice(&flags.to_le_bytes());
            let off = (u64::from(*region) << peerdma_uapi::backend::REGION_OFFSET_SHIFT) | *offset;
            b[8..16].copy_from_slice(&off.to_le_bytes());
            b[16..24].copy_from_slice(&data.to_le_bytes());
            b[24..28].copy_from_slice(&fd.to_le_bytes());
            Ok((
                be.ioeventfd(d, &b)
                    .map_or_else(errno_word, |()| "ok".into()),
                None,
            ))
        }
        Action::Write { fd, data } => {
            let (n, src) = st.fd(fd)?;
            if matches!(src, Src::Memfd(_)) {
                return Err(format!(
                    "error: write to the memfd {fd:?} is not part of the language (a memfd grows on write; the emulated one cannot)"
                ));
            }
            Ok((
                match be.write_fd(n, data) {
                    Ok(k) if k == data.len() => "ok".into(),
                    Ok(k) => format!("wrote {k}"),
                    Err(e) => errno_word(e),
                },
                None,
            ))
        }
        Action::DeviceInfo { dev, argsz } => {
            let (d, _) = st.dev(dev)?;
            let mut b = [0u8; 24];
            b[0..4].copy_from_slice(&argsz.to_le_bytes());
            Ok((
                be.device_info(d, &mut b).map_or_else(errno_word, |()| {
                    let word =
                        |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    device_info_outcome(word(4), word(8), word(12))
                }),
                None,
            ))
        }
        Action::IrqInfo { dev, index, argsz } => {
            let (d, _) = st.dev(dev)?;
            let mut b = [0u8; 16];
            b[0..4].copy_from_slice(&argsz.to_le_bytes());
            b[8..12].copy_from_slice(&index.to_le_bytes());
            Ok((
                be.irq_info(d, &mut b).map_or_else(errno_word, |()| {
                    let word =
                        |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    irq_info_outcome(word(4), word(12))
                }),
                None,
            ))
        }
        Action::SetIrqs {
            dev,
            flags,
            index,
            start,
            count,
            data,
            argsz,
        } => {
            let (d, _) = st.dev(dev)?;
            let bytes: Vec<u8> = match data {
                IrqData::None => Vec::new(),
                IrqData::Bools(b) => b.clone(),
                IrqData::Fds(v) => {
                    let mut out = Vec::new();
                    for a in v {
                        let fd = match a {
                            FdArg::Named(n) => st.fd(n)?.0,
                            FdArg::Raw(n) => *n,
                        };
                        out.extend_from_slice(&fd.to_le_bytes());
                    }
                    out
                }
            };
            let argsz = argsz.unwrap_or(u32::try_from(20 + bytes.len()).unwrap_or(u32::MAX));
            // Room for every byte the header asks the kernel to copy (zeros past the data).
            let per = match flags & 7 {
                2 => 1,
                4 => 4,
                _ => 0,
            };
            let want = 20 + (*count as usize).min(4096) * per;
            let mut b = vec![0u8; want.max(20 + bytes.len())];
            for (at, w) in [
                (0, argsz),
                (4, *flags),
                (8, *index),
                (12, *start),
                (16, *count),
            ] {
                b[at..at + 4].copy_from_slice(&w.to_le_bytes());
            }
            b[20..20 + bytes.len()].copy_from_slice(&bytes);
            ok_or_errno(be.set_irqs(d, &b))
        }
        Action::HotResetInfo { dev, room } => {
            let (d, _) = st.dev(dev)?;
            Ok((
                be.hot_reset_info(d, *room)
                    .map_or_else(errno_word, |i| hot_reset_outcome(&i)),
                None,
            ))
        }
        Action::CpuUnmap { map } => {
            let (m, ..) = st.cpu_map(map)?;
            st.cpu_maps.remove(map);
            ok_or_errno(be.cpu_unmap(m))
        }
        Action::Dma { dev, iova } => {
            let (d, _) = st.dev(dev)?;
            let iova = st.iova(iova)?;
            let (at, target) = pick_target(st, ctx, iova)?;
            ctx.seq += 1;
            let p = pattern(ctx.seq);
            let (bdf, region, offset) = match target {
                Target::Bar(bdf, region, offset) => (bdf, region, offset),
                Target::Memfd(fd, id, offset) => {
                    st.memfd_used.insert((id, offset / PATTERN_LEN));
                    st.memfd_used.insert((id, offset.div_ceil(PATTERN_LEN)));
                    be.dma(d, at, &p)
                        .map_err(|e| format!("error: the DMA engine failed: {}", errno_word(e)))?;
                    let mut got = vec![0u8; p.len()];
                    let fd = st.memfd_peek.get(&id).copied().unwrap_or(fd);
                    return Ok(match be.memfd_peek(fd, offset, &mut got) {
                        Err(e) => (
                            format!("error: cannot read the memfd: {}", errno_word(e)),
                            None,
                        ),
                        Ok(n) if n == p.len() && got == p => ("landed".into(), None),
                        Ok(_) => ("not landed".into(), None),
                    });
                }
            };
            ctx.used.insert((bdf, region, offset / PATTERN_LEN));
            be.dma(d, at, &p)
                .map_err(|e| format!("error: the DMA engine failed: {}", errno_word(e)))?;
            Ok(match be.landed(bdf, region, offset, &p) {
                Err(e) => (
                    format!(
                        "error: cannot read the provider's memory: {}",
                        errno_word(e)
                    ),
                    None,
                ),
                Ok(Landed::Yes) => ("landed".into(), None),
                Ok(Landed::No) => ("not landed".into(), None),
                Ok(Landed::Later) => (
                    "pending".into(),
                    Some(Check {
                        region,
                        offset,
                        hex: hex(&p),
                    }),
                ),
            })
        }
    }
}
