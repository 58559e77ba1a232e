//! `peerdma scenario`: the conformance suite's runner and its agreement table.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peerdma_scenario::agree::table;
use peerdma_scenario::{
    Scenario, StepResult, agreement, documented_divergences, load_path, run_all,
};
use peerdma_vfio::KernelConfig;
use peerdma_vfio::emulated::Machine;

use crate::CliError;

fn bad(message: String) -> CliError {
    CliError { message, status: 2 }
}

/// Expands directories into their `*.toml` files (sorted) and loads every scenario that runs
/// on a kernel built as `kernel` says; with `group_only`, keeps those that run without
/// iommufd, opening devices the group way.
pub fn load_all(
    paths: &[PathBuf],
    group_only: bool,
    kernel: KernelConfig,
) -> Result<Vec<Scenario>, CliError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| bad(format!("{}: {e}", p.display())))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(bad("no scenario files".into()));
    }
    let mut out: Vec<Scenario> = Vec::new();
    for f in files {
        let s = load_path(&f).map_err(|e| bad(e.to_string()))?;
        if out.iter().any(|o| o.name == s.name) {
            return Err(bad(format!("two scenarios are named {:?}", s.name)));
        }
        out.push(s);
    }
    out.retain(|s| s.runs_on(kernel.pm, kernel.thp));
    if group_only {
        out = out.iter().filter_map(Scenario::on_group_path).collect();
    }
    Ok(out)
}

fn machine(fabric: Option<&PathBuf>, kernel: KernelConfig) -> Result<Machine, CliError> {
    let f = match fabric {
        Some(p) => peerdma_pci::file::load_path(p)?,
        None => peerdma_pci::file::load_str(peerdma_pci::examples::QEMU_Q35, "qemu-q35.toml")?,
    };
    Machine::with_config(Arc::new(f), kernel).map_err(|e| CliError {
        message: format!("building the emulated machine: {e}"),
        status: 1,
    })
}

/// Runs every scenario on the emulated machine; also reports DMAs that landed in a revoked
/// buffer anywhere on the machine (must be 0).
pub fn run_emulated(
    scenarios: &[Scenario],
    fabric: Option<&PathBuf>,
    kernel: KernelConfig,
) -> Result<(Vec<StepResult>, usize), CliError> {
    let m = machine(fabric, kernel)?;
    let out = run_all(scenarios, || m.process());
    Ok((out, m.violation_count()))
}

/// `peerdma scenario run`.
pub fn run(
    files: &[PathBuf],
    backend: &str,
    fabric: Option<&PathBuf>,
    group_only: bool,
    kernel: KernelConfig,
    json: bool,
) -> Result<(), CliError> {
    let scenarios = load_all(files, group_only, kernel)?;
    let (results, landings) = match backend {
        "emulated" => run_emulated(&scenarios, fabric, kernel)?,
        "linux" => (
            run_all(&scenarios, peerdma_linux::vfio::LinuxBackend::new),
            0,
        ),
        other => {
            return Err(bad(format!(
                "unknown backend {other:?} (emulated or linux)"
            )));
        }
    };
    let mut failed = 0;
    let mut pending = 0;
    for r in &results {
        match r.pass {
            Some(false) => failed += 1,
            None => pending += 1,
            Some(true) => {}
        }
        if json {
            println!(
                "{}",
                serde_json::to_string(r).map_err(|e| crate::json_error(&e))?
            );
        } else {
            if r.step == 1 {
                let about = scenarios
                    .iter()
                    .find(|s| s.name == r.scenario)
                    .map_or("", |s| s.about.as_str());
                println!("{} — {about}", r.scenario);
            }
            let mark = match r.pass {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "pending",
            };
            println!(
                "  {:>2} {:<12} {:<44} expect {:<28} {mark}",
                r.step, r.action, r.outcome, r.expect
            );
        }
    }
    if landings > 0 {
        failed += 1;
        eprintln!("peerdma: {landings} DMA(s) landed in a revoked buffer");
    }
    let passed = results.len() - failed - pending;
    if !json {
        println!("{passed} passed, {failed} failed, {pending} pending");
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(CliError {
            message: format!("{failed} step(s) failed"),
            status: 1,
        })
    }
}

/// Reads the JSON lines of a real run (anything else on a line is ignored).
fn read_real(path: &Path) -> Result<Vec<StepResult>, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepResult>(l.trim()).ok())
        .collect())
}

/// `peerdma scenario compare`: runs the scenarios on the emulated machine, puts them beside
/// the real run, prints the agreement table and one `TEST scenario:NAME … ok|FAILED` line per
/// scenario; fails on any step that is not an agreement or a documented divergence.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    files: &[PathBuf],
    real: &Path,
    shm: Option<&PathBuf>,
    divergences: &Path,
    fabric: Option<&PathBuf>,
    group_only: bool,
    kernel: KernelConfig,
    json: bool,
) -> Result<(), CliError> {
    let scenarios = load_all(files, group_only, kernel)?;
    let real = read_real(real)?;
    let shm = match shm {
        Some(p) => Some(std::fs::read(p).map_err(|e| bad(format!("{}: {e}", p.display())))?),
        None => None,
    };
    let doc = std::fs::read_to_string(divergences)
        .map_err(|e| bad(format!("{}: {e}", divergences.display())))?;
    let documented = documented_divergences(&doc);
    let (emu, landings) = run_emulated(&scenarios, fabric, kernel)?;
    let rows = agreement(&scenarios, &emu, &real, shm.as_deref(), &documented);
    if json {
        for r in &rows {
            println!(
                "{}",
                serde_json::to_string(r).map_err(|e| crate::json_error(&e))?
            );
        }
    } else {
        print!("{}", table(&rows));
    }
    let mut failed_steps = 0;
    for s in &scenarios {
        let bad_steps: Vec<String> = rows
            .iter()
            .filter(|r| r.scenario == s.name && !r.verdict.passed())
            .map(|r| {
                format!(
                    "step {} {}: emulated {:?}, real {:?}, expected {:?}",
                    r.step,
                    r.verdict.word(),
                    r.emulated,
                    r.real,
                    r.expect
                )
            })
            .collect();
        failed_steps += bad_steps.len();
        if !json {
            if bad_steps.is_empty() {
                println!("TEST scenario:{} ... ok", s.name);
            } else {
                println!(
                    "TEST scenario:{} ... FAILED: {}",
                    s.name,
                    bad_steps.join("; ")
                );
            }
        }
    }
    if landings > 0 {
        println!("TEST scenario:emulated_no_dma_lands_while_revoked ... FAILED: {landings} DMA(s)");
        failed_steps += 1;
    }
    let passed = rows.len() - rows.iter().filter(|r| !r.verdict.passed()).count();
    if !json {
        println!(
            "scenario steps: {passed} passed, {} failed",
            rows.len() - passed
        );
    }
    if failed_steps == 0 {
        Ok(())
    } else {
        Err(CliError {
            message: format!("{failed_steps} step(s) disagree or fail"),
            status: 1,
        })
    }
}
