//! # peerdma-scenario — one scenario, two kernels
//!
//! A scenario is a TOML file of steps a VFIO user performs — open a device, export a dma-buf,
//! turn memory decoding off, map the buffer into an IOAS, make a DMA engine write through it —
//! each with the result it expects: an fd, an errno, bytes landed or not. [`format`](mod@format) reads
//! the files (docs/scenarios.md is the reference), [`run`](mod@run) plays one on any
//! [`ScenarioBackend`](peerdma_uapi::backend::ScenarioBackend) — the emulated machine or the
//! real kernel — and [`agree`] puts the two runs side by side: a step passes when both
//! backends saw the same thing and it is what the scenario expects, or when the difference is
//! a documented divergence.

pub mod agree;
pub mod format;
pub mod run;

pub use agree::{Row, Verdict, agreement, documented_divergences};
pub use format::{Action, Expect, Scenario, Step, load_path, load_str};
pub use run::{Check, RunCtx, StepResult, run, run_all};
