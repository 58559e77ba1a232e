//! The conformance suite on the emulated machine, the agreement rules, and the scenario
//! format's errors.

use std::path::PathBuf;
use std::sync::Arc;

use peerdma_pci::{Bdf, Errno};
use peerdma_scenario::{
    Expect, RunCtx, Scenario, StepResult, Verdict, agreement, documented_divergences, load_path,
    load_str, run,
};
use peerdma_uapi::backend::{Landed, ScenarioBackend};
use peerdma_uapi::{DevHandle, DmabufInfo, IoasId, OpenPath, UapiBackend};
use peerdma_vfio::emulated::Machine;
use proptest::prelude::*;

fn dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios"))
}

fn all() -> Vec<Scenario> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files.iter().map(|f| load_path(f).unwrap()).collect()
}

/// The harness's machine as the reference kernel is built (no CONFIG_PM).
fn machine() -> Machine {
    machine_pm(false)
}

/// The harness's machine as one of its custom kernels is built: without CONFIG_PM and
/// transparent huge pages, or with both (harness/kernel-pm.config).
fn machine_pm(pm: bool) -> Machine {
    let f = peerdma_pci::file::load_str(peerdma_pci::examples::QEMU_Q35, "qemu-q35.toml").unwrap();
    Machine::with_config(Arc::new(f), peerdma_vfio::KernelConfig { pm, thp: pm }).unwrap()
}

fn run_all(m: &Machine, scenarios: &[Scenario]) -> Vec<StepResult> {
    peerdma_scenario::run_all(scenarios, || m.process())
}

#[test]
fn every_scenario_passes_on_the_emulated_machine() {
    let every = all();
    assert!(every.len() >= 40, "{} scenarios", every.len());
    // Those for a kernel with CONFIG_PM, on a machine built that way.
    let with_pm: Vec<Scenario> = every
        .iter()
        .filter(|s| s.runs_on(true, true))
        .cloned()
        .collect();
    let mp = machine_pm(true);
    let results = run_all(&mp, &with_pm);
    let failed: Vec<&StepResult> = results.iter().filter(|r| r.pass != Some(true)).collect();
    assert!(failed.is_empty(), "with CONFIG_PM: {failed:#?}");
    assert_eq!(mp.violation_count(), 0);
    // And the rest of the checks on the reference kernel's (no CONFIG_PM).
    let scenarios: Vec<Scenario> = every
        .into_iter()
        .filter(|s| s.runs_on(false, false))
        .collect();
    let m = machine();
    let results = run_all(&m, &scenarios);
    let failed: Vec<&StepResult> = results.iter().filter(|r| r.pass != Some(true)).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(m.violation_count(), 0);
    // The suite really moves bytes: DMAs land, and revoked ones do not.
    let count = |o: &str| results.iter().filter(|r| r.outcome == o).count();
    assert!(count("landed") >= 40, "{}", count("landed"));
    assert!(count("not landed") >= 15, "{}", count("not landed"));
    // Every action the format has is exercised somewhere.
    for word in [
        "open",
        "bind",
        "close",
        "feature",
        "export",
        "close_fd",
        "fdinfo",
        "config_read",
        "memory",
        "power",
        "flr",
        "af_flr",
        "reset",
        "hot_reset",
        "low_power",
        "ioas",
        "attach",
        "map",
        "unmap",
        "dma",
    ] {
        assert!(results.iter().any(|r| r.action == word), "no {word} step");
    }
}

#[test]
fn every_dma_of_a_run_writes_a_fresh_place() {
    let m = machine();
    let s = load_path(&dir().join("memory-off-revokes.toml")).unwrap();
    // Twice in one run: the second run's DMAs must not reuse the first run's bytes, or a
    // "landed" could be an old pattern and a "not landed" could hide a new one.
    let mut ctx = RunCtx::default();
    let a = run(&s, &mut m.process(), &mut ctx);
    let b = run(&s, &mut m.process(), &mut ctx);
    assert!(a.iter().chain(&b).all(|r| r.pass == Some(true)));
}

/// The emulated backend, broken on purpose: COMMAND writes swallowed (memory decode never
/// goes off), or DMAs reported the way the guest reports them (only the host can judge).
struct Tweaked<'m> {
    inner: peerdma_vfio::emulated::Emulated<'m>,
    deaf_to_command: bool,
    pending_dmas: bool,
}

impl UapiBackend for Tweaked<'_> {
    fn dup_fd(&mut self, fd: i32) -> Result<i32, Errno> {
        self.inner.dup_fd(fd)
    }
    fn group_fd(&mut self, bdf: Bdf) -> Result<i32, Errno> {
        self.inner.group_fd(bdf)
    }
    fn memfd(&mut self, size: u64) -> Result<i32, Errno> {
        self.inner.memfd(size)
    }
    fn memfd_sealed(&mut self, size: u64, seals: u32) -> Result<i32, Errno> {
        self.inner.memfd_sealed(size, seals)
    }
    fn udmabuf(&mut self, memfd: i32, flags: u32, offset: u64, size: u64) -> Result<i32, Errno> {
        self.inner.udmabuf(memfd, flags, offset, size)
    }
    fn eventfd(&mut self) -> Result<i32, Errno> {
        self.inner.eventfd()
    }
    fn read_fd(&mut self, fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
        self.inner.read_fd(fd, buf)
    }
    fn memfd_peek(&mut self, fd: i32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.inner.memfd_peek(fd, offset, buf)
    }
    fn open_device(&mut self, bdf: Bdf, path: OpenPath) -> Result<DevHandle, Errno> {
        self.inner.open_device(bdf, path)
    }
    fn close_device(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.inner.close_device(dev)
    }
    fn bind_device(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.inner.bind_device(dev)
    }
    fn bind_device_to(&mut self, dev: DevHandle, i: u32) -> Result<(), Errno> {
        self.inner.bind_device_to(dev, i)
    }
    fn iommufd_open(&mut self) -> Result<u32, Errno> {
        self.inner.iommufd_open()
    }
    fn device_feature(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<i32, Errno> {
        self.inner.device_feature(dev, buf)
    }
    fn config_read(&mut self, dev: DevHandle, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner.config_read(dev, offset, buf)
    }
    fn config_write(&mut self, dev: DevHandle, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if self.deaf_to_command && offset == u64::from(peerdma_pci::regs::COMMAND) {
            return Ok(());
        }
        self.inner.config_write(dev, offset, data)
    }
    fn reset(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.inner.reset(dev)
    }
    fn close_fd(&mut self, fd: i32) -> Result<(), Errno> {
        self.inner.close_fd(fd)
    }
    fn dmabuf_info(&mut self, fd: i32) -> Result<DmabufInfo, Errno> {
        self.inner.dmabuf_info(fd)
    }
    fn dmabuf_seek(&mut self, fd: i32, offset: i64, whence: i32) -> Result<u64, Errno> {
        self.inner.dmabuf_seek(fd, offset, whence)
    }
    fn dmabuf_mmap(&mut self, fd: i32, offset: u64, len: u64) -> Result<(), Errno> {
        self.inner.dmabuf_mmap(fd, offset, len)
    }
    fn ioas_alloc(&mut self) -> Result<IoasId, Errno> {
        self.inner.ioas_alloc()
    }
    fn ioas_alloc_in(&mut self, i: u32) -> Result<IoasId, Errno> {
        self.inner.ioas_alloc_in(i)
    }
    fn attach_ioas(&mut self, dev: DevHandle, ioas: IoasId) -> Result<(), Errno> {
        self.inner.attach_ioas(dev, ioas)
    }
    fn ioas_map_file(
        &mut self,
        ioas: IoasId,
        fd: i32,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        self.inner
            .ioas_map_file(ioas, fd, start, length, iova, flags)
    }
    fn ioas_map_user(
        &mut self,
        ioas: IoasId,
        memory: peerdma_uapi::backend::UserMemory,
        offset: u64,
        length: u64,
        iova: u64,
        flags: u32,
        reserved: u32,
    ) -> Result<u64, Errno> {
        self.inner
            .ioas_map_user(ioas, memory, offset, length, iova, flags, reserved)
    }
    fn detach_ioas(&mut self, dev: DevHandle) -> Result<(), Errno> {
        self.inner.detach_ioas(dev)
    }
    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<(), Errno> {
        self.inner.ioas_destroy(ioas)
    }
    fn ioas_iova_ranges(
        &mut self,
        ioas: IoasId,
        room: u32,
    ) -> Result<peerdma_uapi::backend::IovaRanges, Errno> {
        self.inner.ioas_iova_ranges(ioas, room)
    }
    fn ioas_unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64, Errno> {
        self.inner.ioas_unmap(ioas, iova, length)
    }
    fn ioeventfd(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno> {
        self.inner.ioeventfd(dev, buf)
    }
    fn write_fd(&mut self, fd: i32, data: &[u8]) -> Result<usize, Errno> {
        self.inner.write_fd(fd, data)
    }
    fn device_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner.device_info(dev, buf)
    }
    fn ioas_allow_iovas(
        &mut self,
        ioas: IoasId,
        ranges: &[(u64, u64)],
        reserved: u32,
    ) -> Result<(), Errno> {
        self.inner.ioas_allow_iovas(ioas, ranges, reserved)
    }
    fn irq_info(&mut self, dev: DevHandle, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner.irq_info(dev, buf)
    }
    fn set_irqs(&mut self, dev: DevHandle, buf: &[u8]) -> Result<(), Errno> {
        self.inner.set_irqs(dev, buf)
    }
    fn region_info(
        &mut self,
        dev: DevHandle,
        index: u32,
    ) -> Result<peerdma_uapi::backend::RegionInfo, Errno> {
        self.inner.region_info(dev, index)
    }
    fn region_read(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        self.inner.region_read(dev, index, offset, buf)
    }
    fn region_write(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, Errno> {
        self.inner.region_write(dev, index, offset, data)
    }
    fn region_mmap(
        &mut self,
        dev: DevHandle,
        index: u32,
        offset: u64,
        length: u64,
        shared: bool,
    ) -> Result<peerdma_uapi::backend::MapHandle, Errno> {
        self.inner.region_mmap(dev, index, offset, length, shared)
    }
    fn cpu_access(
        &mut self,
        map: peerdma_uapi::backend::MapHandle,
        offset: u64,
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), peerdma_uapi::backend::CpuFault> {
        self.inner.cpu_access(map, offset, buf, write)
    }
    fn cpu_unmap(&mut self, map: peerdma_uapi::backend::MapHandle) -> Result<(), Errno> {
        self.inner.cpu_unmap(map)
    }
    fn hot_reset_info(
        &mut self,
        dev: DevHandle,
        room: u32,
    ) -> Result<peerdma_uapi::backend::HotResetInfo, Errno> {
        self.inner.hot_reset_info(dev, room)
    }
}

impl ScenarioBackend for Tweaked<'_> {
    fn role(&self, role: &str) -> Result<Bdf, Errno> {
        self.inner.role(role)
    }
    fn hot_reset(&mut self, dev: DevHandle, groups: Option<&[i32]>) -> Result<(), Errno> {
        self.inner.hot_reset(dev, groups)
    }
    fn low_power_wakeup(
        &mut self,
        dev: DevHandle,
        reserved: u32,
        eventfd: Option<i32>,
    ) -> Result<(), Errno> {
        self.inner.low_power_wakeup(dev, reserved, eventfd)
    }
    fn dma(&mut self, dev: DevHandle, iova: u64, data: &[u8]) -> Result<(), Errno> {
        self.inner.dma(dev, iova, data)
    }
    fn landed(&mut self, bdf: Bdf, region: u32, offset: u64, data: &[u8]) -> Result<Landed, Errno> {
        if self.pending_dmas {
            return Ok(Landed::Later);
        }
        self.inner.landed(bdf, region, offset, data)
    }
}

#[test]
fn a_backend_that_never_revokes_fails_the_revocation_steps() {
    let m = machine();
    let s = load_path(&dir().join("memory-off-revokes.toml")).unwrap();
    let mut be = Tweaked {
        inner: m.process(),
        deaf_to_command: true,
        pending_dmas: false,
    };
    let r = run(&s, &mut be, &mut RunCtx::default());
    let failed: Vec<(usize, &str)> = r
        .iter()
        .filter(|r| r.pass == Some(false))
        .map(|r| (r.step, r.outcome.as_str()))
        .collect();
    // The DMA after "memory off" lands, the map that must be ENODEV works, and the old
    // mapping is still alive when memory is "back".
    assert_eq!(failed, vec![(9, "landed"), (10, "ok"), (12, "landed")]);
}

fn results_of(name: &str) -> (Vec<Scenario>, Vec<StepResult>) {
    let s = vec![load_path(&dir().join(format!("{name}.toml"))).unwrap()];
    let r = run_all(&machine(), &s);
    (s, r)
}

#[test]
fn the_table_agrees_disagrees_documents_and_misses() {
    let (s, emu) = results_of("export-unaligned");
    let rows = agreement(&s, &emu, &emu, None, &[]);
    assert!(
        rows.iter().all(|r| r.verdict == Verdict::Agree),
        "{rows:#?}"
    );

    let mut real = emu.clone();
    real[2].outcome = "EFAULT".into();
    real.pop();
    let rows = agreement(&s, &emu, &real, None, &[]);
    assert_eq!(rows[2].verdict, Verdict::Disagree);
    assert_eq!(rows[2].real, "EFAULT");
    assert_eq!(rows.last().unwrap().verdict, Verdict::Missing);
    assert!(!rows[2].verdict.passed() && !Verdict::Missing.passed());

    let doc = "Linux answers EFAULT here: scenario `export-unaligned` step 3.";
    let rows = agreement(&s, &emu, &real, None, &documented_divergences(doc));
    assert_eq!(rows[2].verdict, Verdict::Divergence);
    assert!(rows[2].verdict.passed());

    // Both wrong the same way is still a failure.
    let mut both = emu.clone();
    both[1].outcome = "ok".into();
    let rows = agreement(&s, &both, &both, None, &[]);
    assert_eq!(rows[1].verdict, Verdict::BothUnexpected);
}

#[test]
fn pending_real_dmas_are_decided_by_the_backing_file() {
    let (s, emu) = results_of("import-whole-buffer");
    let dmas: Vec<usize> = emu
        .iter()
        .enumerate()
        .filter(|(_, r)| r.action == "dma")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(dmas.len(), 3);
    // The real run as the guest reports it: every DMA pending, with where to look.
    let m = machine();
    let mut ctx = RunCtx::default();
    let mut be = Tweaked {
        inner: m.process(),
        deaf_to_command: false,
        pending_dmas: true,
    };
    let real = run(&s[0], &mut be, &mut ctx);
    let checks: Vec<_> = dmas
        .iter()
        .map(|&i| real[i].check.clone().unwrap())
        .collect();
    assert!(
        dmas.iter()
            .all(|&i| real[i].outcome == "pending" && real[i].pass.is_none())
    );
    // A backing file holding the two patterns that landed, not the third.
    let mut shm = vec![0u8; 1 << 20];
    for c in &checks[..2] {
        let bytes: Vec<u8> = (0..c.hex.len() / 2)
            .map(|i| u8::from_str_radix(&c.hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let o = c.offset as usize;
        shm[o..o + bytes.len()].copy_from_slice(&bytes);
    }
    let rows = agreement(&s, &emu, &real, Some(&shm), &[]);
    assert!(
        rows.iter().all(|r| r.verdict == Verdict::Agree),
        "{rows:#?}"
    );
    // An empty file: the landed ones disagree.
    let rows = agreement(&s, &emu, &real, Some(&vec![0u8; 1 << 20]), &[]);
    let bad: Vec<usize> = rows
        .iter()
        .filter(|r| r.verdict == Verdict::Disagree)
        .map(|r| r.step)
        .collect();
    assert_eq!(bad, vec![7, 8]);
    // No file at all: pending never agrees with a decided outcome.
    let rows = agreement(&s, &emu, &real, None, &[]);
    assert_eq!(rows.iter().filter(|r| !r.verdict.passed()).count(), 3);
}

#[test]
fn format_errors_name_the_step_and_the_key() {
    let e = |t: &str| load_str(t, "s").unwrap_err().to_string();
    let head = "about = \"x\"\n[[step]]\n";
    assert_eq!(e("about = \"x\"\n"), "s.step: no [[step]]");
    assert!(
        e(&format!("{head}do = \"opne\"\n")).starts_with("s: step[1].do: unknown action \"opne\"")
    );
    assert_eq!(
        e(&format!(
            "{head}do = \"open\"\ndev = \"provider\"\nas = \"p\"\ncolour = 1\n"
        )),
        "s: step[1].colour: unknown key"
    );
    assert_eq!(
        e(&format!(
            "{head}do = \"close\"\ndev = \"p\"\nexpect = \"EWHAT\"\n"
        )),
        "s: step[1].expect: \"EWHAT\": not ok, fd, landed, not_landed or an errno name"
    );
    assert_eq!(
        e(&format!(
            "{head}do = \"export\"\ndev = \"p\"\nranges = [[0]]\n"
        )),
        "s: step[1].ranges: each range is [offset, length]"
    );
    assert_eq!(
        e(&format!("{head}do = \"dma\"\ndev = \"e\"\niova = 0x1000\n")),
        "s: step[1].expect: missing (this step has no default)"
    );
    assert_eq!(
        e(&format!(
            "{head}do = \"dma\"\ndev = \"e\"\niova = 100\nexpect = \"landed\"\n"
        )),
        "s: step[1].iova: must be 16-byte aligned"
    );
    assert_eq!(
        e(&format!(
            "{head}do = \"map\"\nioas = \"a\"\nfd = \"b\"\nlength = -1\niova = 0\n"
        )),
        "s: step[1].length: -1 is negative"
    );
}

#[test]
fn names_never_given_are_errors_of_the_step_not_panics() {
    let s = load_str(
        "about = \"x\"\n[[step]]\ndo = \"close_fd\"\nfd = \"nope\"\n\
         [[step]]\ndo = \"dma\"\ndev = \"e\"\niova = 0x1000\nexpect = \"landed\"\n\
         [[step]]\ndo = \"open\"\ndev = \"gpu\"\nas = \"g\"\n",
        "s",
    )
    .unwrap();
    let r = run(&s, &mut machine().process(), &mut RunCtx::default());
    assert_eq!(r[0].outcome, "error: no fd named \"nope\"");
    assert_eq!(r[1].outcome, "error: no device named \"e\"");
    assert_eq!(r[2].outcome, "error: no device plays \"gpu\" here");
    assert!(r.iter().all(|r| r.pass == Some(false)));
}

#[test]
fn expectations_match_outcomes_exactly() {
    let fd = Expect::Fd {
        size: Some(4096),
        count: None,
        exp_name: Some("vfio_pci_core".into()),
        flags: Some(0o2000002),
    };
    assert!(fd.matches("fd size=4096 count=1 exp_name=vfio_pci_core flags=0o2000002"));
    assert!(!fd.matches("fd size=4096 count=1 exp_name=vfio_pci_core flags=0o2"));
    assert!(!fd.matches("fd size=40960 count=1 exp_name=vfio_pci_core flags=0o2000002"));
    assert!(!fd.matches("EINVAL"));
    assert!(Expect::Errno(Errno::ENODEV).matches("ENODEV"));
    assert!(!Expect::Errno(Errno::ENODEV).matches("ENODEVX"));
    assert!(Expect::Value(2).matches("0x0002"));
    assert!(!Expect::Landed(true).matches("pending"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Mutated scenario files load or are refused with a located error; never a panic.
    #[test]
    fn mutated_scenarios_never_panic_the_loader(which in 0usize..61, line in any::<u16>(), how in 0u8..4, n in any::<i64>()) {
        let scenarios: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir()).unwrap().map(|e| e.unwrap().path()).collect();
            v.sort();
            v
        };
        let text = std::fs::read_to_string(&scenarios[which % scenarios.len()]).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let i = usize::from(line) % lines.len();
        match how {
            0 => { lines.remove(i); }
            1 => lines[i] = lines[i].replace(|c: char| c.is_ascii_digit(), &n.to_string()),
            2 => lines[i] = format!("{} = {n}", lines[i].split('=').next().unwrap_or("x").trim()),
            _ => { let j = (i + 1) % lines.len(); lines.swap(i, j); }
        }
        let _ = load_str(&lines.join("\n"), "mutated");
    }
}

#[test]
fn the_group_path_subset_runs_without_iommufd() {
    let all = all();
    let group: Vec<Scenario> = all.iter().filter_map(Scenario::on_group_path).collect();
    assert!(group.len() >= 30, "{}", group.len());
    assert!(group.len() < all.len());
    for s in &group {
        assert!(!s.needs_iommufd() && !s.needs_udmabuf());
        for st in &s.steps {
            if let peerdma_scenario::Action::Open { path, .. } = &st.action {
                assert_eq!(*path, OpenPath::GroupContainer, "{}", s.name);
            }
        }
    }
    // On Debian's kernel (CONFIG_PM) and without CONFIG_PM, each with its own subset.
    for pm in [true, false] {
        let subset: Vec<Scenario> = group
            .iter()
            .filter(|s| s.runs_on(pm, pm))
            .cloned()
            .collect();
        let m = machine_pm(pm);
        let r = run_all(&m, &subset);
        let failed: Vec<_> = r.iter().filter(|r| r.pass != Some(true)).collect();
        assert!(failed.is_empty(), "pm {pm}: {failed:#?}");
        assert!(!r.iter().any(|r| r.action == "dma" || r.action == "map"));
    }
}

mod random {
    use super::*;
    use peerdma_scenario::format::{Cap, ConfigAt};
    use peerdma_scenario::{Action, Step};
    use peerdma_uapi::DmaBufRequest;

    fn pick<T: Clone + std::fmt::Debug + 'static>(v: Vec<T>) -> impl Strategy<Value = T> {
        proptest::sample::select(v)
    }

    fn dev() -> impl Strategy<Value = String> {
        pick(vec!["p".to_string(), "e".into(), "n".into(), "s".into()])
    }
    fn fd() -> impl Strategy<Value = String> {
        pick(vec!["a".to_string(), "b".into()])
    }
    fn ioas() -> impl Strategy<Value = String> {
        pick(vec!["x".to_string(), "y".into()])
    }
    fn iova() -> impl Strategy<Value = u64> {
        pick(vec![0x100_0000u64, 0x100_1000, 0x108_0000, 0x200_0000])
    }
    fn len() -> impl Strategy<Value = u64> {
        pick(vec![0u64, 100, 0x1000, 0x1_0000, 0x10_0000, 0x20_0000])
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            (
                pick(vec![
                    "provider",
                    "initiator",
                    "pm_provider",
                    "sibling",
                    "gpu"
                ]),
                dev(),
                any::<bool>()
            )
                .prop_map(|(r, name, cdev)| Action::Open {
                    role: r.into(),
                    name,
                    path: if cdev {
                        OpenPath::CdevIommufd
                    } else {
                        OpenPath::GroupContainer
                    },
                    iommufd: None,
                }),
            (pick(vec!["provider", "pm_provider", "sibling"]), dev()).prop_map(|(r, name)| {
                Action::Open {
                    role: r.into(),
                    name,
                    path: OpenPath::CdevUnbound,
                    iommufd: None,
                }
            }),
            (dev(), any::<bool>()).prop_map(|(dev, other)| Action::Bind {
                dev,
                iommufd: other.then(|| "x".to_string()),
            }),
            Just(Action::Iommufd { name: "x".into() }),
            dev().prop_map(|dev| Action::Close { dev }),
            (
                dev(),
                0u32..8,
                pick(vec![
                    vec![(0u64, 0x10_0000u64)],
                    vec![(0, 0x1000), (0x2000, 0x1000)],
                    vec![(0x8_0000, 0x1_0000)],
                    vec![(1, 0x1000)],
                    vec![(0xf_f000, 0x2000)],
                    vec![],
                ]),
                proptest::option::of(0u32..4),
                fd()
            )
                .prop_map(|(dev, region, ranges, nr, name)| {
                    let mut req = DmaBufRequest::new(region, ranges);
                    req.nr_ranges = nr;
                    Action::Export {
                        dev,
                        req,
                        name: Some(name),
                    }
                }),
            fd().prop_map(|fd| Action::CloseFd { fd }),
            fd().prop_map(|fd| Action::Fdinfo { fd }),
            (fd(), -2i64..2, 0i32..4).prop_map(|(fd, offset, whence)| Action::Seek {
                fd,
                offset,
                whence
            }),
            (fd(), len()).prop_map(|(fd, length)| Action::Mmap {
                fd,
                offset: 0,
                length
            }),
            (dev(), any::<bool>()).prop_map(|(dev, on)| Action::Memory { dev, on }),
            (dev(), pick(vec![0u16, 3]), pick(vec![1usize, 2, 4]))
                .prop_map(|(dev, state, size)| Action::Power { dev, state, size }),
            (dev(), pick(vec![1usize, 2, 4])).prop_map(|(dev, size)| Action::Flr { dev, size }),
            (
                dev(),
                pick(vec![
                    None,
                    Some(Cap::Std(0x01)),
                    Some(Cap::Std(0x10)),
                    Some(Cap::Std(0x11)),
                    Some(Cap::Ext(0x01))
                ]),
                0u16..0x40,
                1usize..=8,
                any::<u64>()
            )
                .prop_map(|(dev, cap, offset, size, value)| Action::ConfigWrite {
                    dev,
                    at: ConfigAt { cap, offset },
                    size,
                    value: if size == 8 {
                        value
                    } else {
                        value & ((1 << (8 * size)) - 1)
                    },
                }),
            dev().prop_map(|dev| Action::Reset { dev }),
            (
                dev(),
                proptest::option::of(proptest::collection::vec(fd(), 0..3))
            )
                .prop_map(|(dev, groups)| Action::HotReset { dev, groups }),
            (
                pick(vec!["provider", "pm_provider", "sibling", "initiator"]),
                fd()
            )
                .prop_map(|(r, name)| Action::Group {
                    dev: r.into(),
                    name
                }),
            (dev(), any::<bool>(), any::<bool>(), pick(vec![0u32, 1])).prop_map(
                |(dev, enter, w, r)| Action::LowPower {
                    dev,
                    enter,
                    wakeup: enter && w,
                    reserved: if enter && w { r } else { 0 },
                    eventfd: None,
                }
            ),
            (dev(), 0u32..12).prop_map(|(dev, region)| Action::RegionInfo { dev, region }),
            (
                dev(),
                0u32..10,
                pick(vec![0u64, 0xd0003, 0xffffc, 0x10_0000]),
                0usize..12
            )
                .prop_map(|(dev, region, offset, size)| Action::RegionRead {
                    dev,
                    region,
                    offset,
                    size,
                    show: true,
                }),
            (
                dev(),
                0u32..10,
                pick(vec![0u64, 0xd0001, 0xffffe]),
                1usize..9
            )
                .prop_map(|(dev, region, offset, n)| Action::RegionWrite {
                    dev,
                    region,
                    offset,
                    data: vec![0x5a; n],
                }),
            (
                dev(),
                0u32..9,
                pick(vec![0u64, 0x1000, 0xff000]),
                any::<bool>()
            )
                .prop_map(|(dev, region, offset, shared)| Action::CpuMap {
                    dev,
                    region,
                    offset,
                    length: 0x1000,
                    shared,
                    name: "m".into(),
                }),
            (pick(vec![0u64, 4, 0xffc]), pick(vec![1usize, 4, 8])).prop_map(|(offset, size)| {
                Action::CpuRead {
                    map: "m".into(),
                    offset,
                    size,
                    show: true,
                }
            }),
            pick(vec![0u64, 8]).prop_map(|offset| Action::CpuWrite {
                map: "m".into(),
                offset,
                data: vec![0xa5; 4],
            }),
            Just(Action::CpuUnmap { map: "m".into() }),
            (dev(), 0u32..4).prop_map(|(dev, room)| Action::HotResetInfo { dev, room }),
            (ioas(), any::<bool>()).prop_map(|(name, other)| Action::IoasAlloc {
                name,
                iommufd: other.then(|| "x".to_string()),
            }),
            (dev(), ioas()).prop_map(|(dev, ioas)| Action::Attach { dev, ioas }),
            (
                ioas(),
                fd(),
                pick(vec![0u64, 0x1000, 0x10_0000]),
                len(),
                iova()
            )
                .prop_map(|(ioas, fd, start, length, iova)| Action::Map {
                    ioas,
                    fd,
                    start,
                    length,
                    iova: iova.into(),
                    flags: 7,
                    name: None,
                }),
            (ioas(), iova(), len()).prop_map(|(ioas, iova, length)| Action::Unmap {
                ioas,
                iova: iova.into(),
                length
            }),
            (ioas(), 0u32..4).prop_map(|(ioas, room)| Action::IovaRanges { ioas, room }),
            dev().prop_map(|dev| Action::Detach { dev }),
            ioas().prop_map(|ioas| Action::IoasDestroy { ioas }),
            (dev(), iova()).prop_map(|(dev, iova)| Action::Dma {
                dev,
                iova: iova.into()
            }),
            (fd(), fd()).prop_map(|(fd, name)| Action::Dup { fd, name }),
            (
                pick(vec![0u64, 0x1000, 0x10_0000]),
                pick(vec![None, Some(0), Some(2), Some(0xa), Some(0x40)]),
                fd()
            )
                .prop_map(|(size, seals, name)| Action::Memfd { size, seals, name }),
            (
                fd(),
                pick(vec![0u32, 1, 0xff]),
                pick(vec![0u64, 0x800, 0x1000]),
                pick(vec![0u64, 0x1000, 0x2000, 65 << 20]),
                fd()
            )
                .prop_map(|(m, flags, offset, size, name)| Action::Udmabuf {
                    memfd: peerdma_scenario::format::FdArg::Named(m),
                    flags,
                    offset,
                    size,
                    name,
                }),
            fd().prop_map(|name| Action::Eventfd { name }),
            (fd(), pick(vec![0usize, 4, 8, 16])).prop_map(|(fd, size)| Action::Read {
                fd,
                size,
                show: true
            }),
            (dev(), fd()).prop_map(|(dev, fd)| Action::LowPower {
                dev,
                enter: true,
                wakeup: true,
                reserved: 0,
                eventfd: Some(fd),
            }),
        ]
    }

    proptest! {
           #![proptest_config(ProptestConfig::with_cases(256))]
           /// Any sequence of user actions, however wrong, gets outcomes and no panic; when the
           /// process goes, every device is closed, every buffer released, every registration
           /// reference given back, and no DMA ever landed in a revoked buffer.
           #[test]
           fn any_sequence_of_actions_leaves_nothing_behind(actions in proptest::collection::vec(action(), 1..40)) {
               let m = machine();
               let eps: Vec<Bdf> = m
                   .fabric()
                   .functions()
                   .filter(|f| f.kind() == peerdma_pci::DeviceKind::Endpoint)
                   .map(peerdma_pci::Function::bdf)
                   .collect();
               let before: Vec<usize> = eps.iter().map(|&b| m.vfio(b).unwrap().registration().count()).collect();
               // A working setup first (a provider's buffer mapped for the initiator), so the
               // random tail has something to break.
               let setup = load_path(&dir().join("import-whole-buffer.toml")).unwrap().steps;
               let mut steps: Vec<Step> = setup.into_iter().take(6).collect();
               let named = |n: &str| n.replace("buf", "a").replace('a', "x");
               for st in &mut steps {
                   match &mut st.action {
                       Action::Export { name: Some(n), .. } => *n = "a".into(),
                       Action::IoasAlloc { name, .. } => *name = named(name),
                       Action::Attach { ioas, .. } => *ioas = "x".into(),
                       Action::Map { ioas, fd, .. } => {
                           *ioas = "x".into();
                           *fd = "a".into();
                       }
                       _ => {}
                   }
               }
               steps.extend(actions.into_iter().map(|action| Step {
                   action,
                   expect: Expect::Ok,
                   dmesg: None,
    process: None,
               }));
               let s = Scenario { name: "random".into(), about: "random".into(), steps, pm: None, thp: None, group_path: true };
               let r = run(&s, &mut m.process(), &mut RunCtx::default());
               prop_assert_eq!(r.len(), s.steps.len());
               prop_assert_eq!(&r[5].outcome, "ok", "the setup maps the buffer");
               prop_assert!(r.iter().all(|r| !r.outcome.is_empty()));
               for (i, &b) in eps.iter().enumerate() {
                   let v = m.vfio(b).unwrap();
                   prop_assert_eq!(v.open_count(), 0, "{} still open", b);
                   prop_assert_eq!(v.dmabuf_count(), 0, "{} has buffers", b);
                   prop_assert_eq!(v.registration().count(), before[i], "{}: {:?}", b, v.registration().holders());
               }
               prop_assert_eq!(m.violation_count(), 0);
               // And every group is free again: its file opens, then its cdevs bind.
               for &b in &eps {
                   let mut p = m.process();
                   let d = p.open_device(b, OpenPath::GroupContainer);
                   prop_assert!(d.is_ok(), "{}: group file: {:?}", b, d);
                   drop(p);
                   let mut p = m.process();
                   let d = p.open_device(b, OpenPath::CdevIommufd);
                   prop_assert!(d.is_ok(), "{}: cdev: {:?}", b, d);
               }
           }
       }
}
