//! The agreement table: the emulated run and the real run of the same scenarios, step by
//! step.
//!
//! A real DMA step is `pending` until the host has looked at the ivshmem backing file
//! (region 2 of the provider is that file, byte for byte); [`agreement`] resolves it from the
//! file's bytes. A step passes when both backends produced the same outcome and it is the
//! expected one, or when the two differ in a way `docs/divergences.md` documents (a line
//! naming ``scenario `NAME` step N``).

use std::collections::HashMap;
use std::fmt::Write;

use serde::Serialize;

use crate::format::Scenario;
use crate::run::StepResult;

/// How a step came out across the two backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Same outcome, and the expected one.
    Agree,
    /// Same outcome on both, but not the one the scenario expects.
    BothUnexpected,
    /// Different outcomes, documented in docs/divergences.md.
    Divergence,
    /// Different outcomes, undocumented.
    Disagree,
    /// The real run has no result for this step (the guest stopped early).
    Missing,
    /// The real kernel printed a warning, bug or oops the step does not expect, or not the
    /// message it expects.
    Kernel,
}

impl Verdict {
    /// Whether the step counts as passed.
    pub fn passed(self) -> bool {
        matches!(self, Verdict::Agree | Verdict::Divergence)
    }
    /// The word printed in the table.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Agree => "agree",
            Verdict::BothUnexpected => "BOTH UNEXPECTED",
            Verdict::Divergence => "divergence (documented)",
            Verdict::Disagree => "DISAGREE",
            Verdict::Missing => "MISSING",
            Verdict::Kernel => "KERNEL",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Scenario.
    pub scenario: String,
    /// Step (from 1).
    pub step: usize,
    /// Its `do` word.
    #[serde(rename = "do")]
    pub action: String,
    /// What it expects.
    pub expect: String,
    /// Emulated outcome.
    pub emulated: String,
    /// Real outcome.
    pub real: String,
    /// Verdict.
    pub verdict: Verdict,
    /// What the real kernel printed during the step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernel: Vec<String>,
}

/// The `(scenario, step)` pairs `docs/divergences.md` documents: every ``scenario `NAME`
/// step N`` in the text.
pub fn documented_divergences(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("scenario `") {
        rest = &rest[i + "scenario `".len()..];
        let Some(end) = rest.find('`') else { break };
        let name = &rest[..end];
        let after = rest[end + 1..].trim_start();
        if let Some(n) = after.strip_prefix("step ") {
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(step) = digits.parse() {
                out.push((name.to_string(), step));
            }
        }
        rest = &rest[end + 1..];
    }
    out
}

/// Resolves a pending real DMA from the backing file's bytes.
fn resolve(r: &StepResult, shm: Option<&[u8]>) -> String {
    let (Some(c), Some(shm)) = (&r.check, shm) else {
        return r.outcome.clone();
    };
    if r.outcome != "pending" || c.region != 2 {
        return r.outcome.clone();
    }
    let Ok(off) = usize::try_from(c.offset) else {
        return "not landed".into();
    };
    let n = c.hex.len() / 2;
    // The offset comes from a file: no arithmetic on it may overflow.
    let got = off
        .checked_add(n)
        .and_then(|end| shm.get(off..end))
        .map(crate::run::hex);
    if got.as_deref() == Some(c.hex.as_str()) {
        "landed".into()
    } else {
        "not landed".into()
    }
}

/// Builds the table for `scenarios` from both runs. `shm` is the ivshmem backing file after
/// the guest ran; `documented` the pairs from [`documented_divergences`].
pub fn agreement(
    scenarios: &[Scenario],
    emulated: &[StepResult],
    real: &[StepResult],
    shm: Option<&[u8]>,
    documented: &[(String, usize)],
) -> Vec<Row> {
    let key = |r: &StepResult| (r.scenario.clone(), r.step);
    let emu: HashMap<_, _> = emulated.iter().map(|r| (key(r), r)).collect();
    let re: HashMap<_, _> = real.iter().map(|r| (key(r), r)).collect();
    let mut rows = Vec::new();
    for s in scenarios {
        for (i, step) in s.steps.iter().enumerate() {
            let k = (s.name.clone(), i + 1);
            let e = emu
                .get(&k)
                .map_or_else(|| "(not run)".to_string(), |r| r.outcome.clone());
            let r = re.get(&k).map(|r| resolve(r, shm));
            let kernel = re.get(&k).map(|r| r.kernel.clone()).unwrap_or_default();
            let verdict = match &r {
                None => Verdict::Missing,
                Some(_) if crate::run::kernel_problem(step, &kernel, true).is_some() => {
                    Verdict::Kernel
                }
                Some(r) if *r == e && step.expect.matches(r) => Verdict::Agree,
                Some(r) if *r == e => Verdict::BothUnexpected,
                Some(_) if documented.contains(&k) => Verdict::Divergence,
                Some(_) => Verdict::Disagree,
            };
            rows.push(Row {
                scenario: s.name.clone(),
                step: i + 1,
                action: step.action.word().into(),
                expect: step.expect.to_string(),
                emulated: e,
                real: r.unwrap_or_else(|| "(no result)".into()),
                verdict,
                kernel,
            });
        }
    }
    rows
}

/// A kernel line the table shows: a warning, bug or oops, or an IOMMU fault.
fn notable(line: &str) -> bool {
    peerdma_uapi::backend::is_kernel_warning(line) || line.contains("DMAR")
}

/// The table as text: a header, one line per step, aligned.
pub fn table(rows: &[Row]) -> String {
    let head = [
        "scenario", "step", "do", "expect", "emulated", "real", "verdict",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.step.to_string(),
                r.action.clone(),
                r.expect.clone(),
                r.emulated.clone(),
                r.real.clone(),
                r.verdict.word().to_string(),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for c in &cells {
        for (i, x) in c.iter().enumerate() {
            w[i] = w[i].max(x.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            if i + 1 == c.len() {
                s.push_str(x);
            } else {
                let _ = write!(s, "{x:<width$}  ", width = w[i]);
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&head.map(str::to_string));
    for (c, r) in cells.iter().zip(rows) {
        out.push_str(&line(c));
        // What the real kernel printed that a reader must see, under its step: warnings,
        // bugs, oopses and IOMMU faults (the rest, such as the PCI core's "resetting", stays
        // in the JSON lines for `dmesg` expectations).
        for k in r.kernel.iter().filter(|k| notable(k)) {
            let _ = writeln!(out, "    kernel: {k}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_warning_fails_a_step_unless_the_step_expects_it() {
        let text = "about = \"k\"\n[[step]]\ndo = \"ioas\"\nas = \"a\"\n\
                    [[step]]\ndo = \"ioas\"\nas = \"b\"\ndmesg = \"WARNING: CPU\"\n";
        let s = crate::format::load_str(text, "k").unwrap();
        let res = |step: usize, kernel: &[&str]| StepResult {
            scenario: "k".into(),
            step,
            action: "ioas".into(),
            expect: "ok".into(),
            outcome: "ok".into(),
            pass: Some(true),
            check: None,
            kernel: kernel.iter().map(|k| (*k).to_string()).collect(),
        };
        let emu = [res(1, &[]), res(2, &[])];
        let warn = "WARNING: CPU: 1 PID: 7 at drivers/vfio/pci/vfio_pci_core.c:1 f";
        let verdicts = |real: &[StepResult]| -> Vec<Verdict> {
            agreement(std::slice::from_ref(&s), &emu, real, None, &[])
                .iter()
                .map(|r| r.verdict)
                .collect()
        };
        // A warning in step 1 fails it; a DMAR fault is shown but fails nothing.
        assert_eq!(
            verdicts(&[res(1, &[warn]), res(2, &[warn])]),
            [Verdict::Kernel, Verdict::Agree]
        );
        assert_eq!(
            verdicts(&[res(1, &["DMAR: [DMA Write] fault"]), res(2, &[warn])]),
            [Verdict::Agree, Verdict::Agree]
        );
        // Step 2 expects a message the kernel did not print.
        assert_eq!(
            verdicts(&[res(1, &[]), res(2, &[])]),
            [Verdict::Agree, Verdict::Kernel]
        );
        let rows = agreement(
            std::slice::from_ref(&s),
            &emu,
            &[res(1, &[warn]), res(2, &[warn])],
            None,
            &[],
        );
        assert!(table(&rows).contains("    kernel: WARNING: CPU: 1"));
        // On a backend without a kernel log an expected message cannot be missing.
        assert!(crate::run::kernel_problem(&s.steps[1], &[], false).is_none());
        assert!(crate::run::kernel_problem(&s.steps[1], &[], true).is_some());
    }

    #[test]
    fn divergence_lines_are_found() {
        let t = "Scenario: scenario `low-power-twice` step 5 and scenario `x` step 12.\n\
                 A scenario `broken` without a step.";
        assert_eq!(
            documented_divergences(t),
            vec![("low-power-twice".into(), 5), ("x".into(), 12)]
        );
    }
}
