//! `peerdma` — the command line.
//!
//! | command | what it does |
//! |---|---|
//! | `topo` | show a platform as a tree (`--json` for the machine-readable contract) |
//!
//! Errors go to stderr in plain words; bad input exits with status 2.

mod topo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peerdma_pci::{Fabric, FabricError, examples, file};

/// PCI peer-to-peer DMA: P2P path analysis, dma-buf export of device memory and its
/// revocation, on an emulated PCIe platform.
#[derive(Parser)]
#[command(name = "peerdma", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the platform: host bridges, bridges, functions, BARs, ACS, COMMAND, power.
    Topo {
        /// A fabric file (TOML); without it, the built-in GPU server.
        #[arg(long)]
        fabric: Option<PathBuf>,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
    },
}

/// An error for the user: message to stderr, and the exit status.
struct CliError {
    message: String,
    status: u8,
}

impl From<FabricError> for CliError {
    fn from(e: FabricError) -> CliError {
        CliError {
            message: e.to_string(),
            status: 2,
        }
    }
}

/// Loads the fabric named on the command line, or the built-in one. Returns it and a line
/// saying which it is.
fn load_fabric(path: Option<&PathBuf>) -> Result<(Fabric, String), CliError> {
    match path {
        Some(p) => Ok((file::load_path(p)?, format!("fabric file {}", p.display()))),
        None => Ok((
            file::load_str(examples::GPU_SERVER, "<built-in gpu-server.toml>")?,
            "built-in example fabric gpu-server.toml (use --fabric FILE for another)".to_string(),
        )),
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Topo { fabric, json } => {
            let (fabric, source) = load_fabric(fabric.as_ref())?;
            let topology = peerdma_pci::topology::Topology::of(&fabric);
            if json {
                let text = serde_json::to_string_pretty(&topology).map_err(|e| CliError {
                    message: format!("cannot encode JSON: {e}"),
                    status: 1,
                })?;
                println!("{text}");
            } else {
                print!("{}", topo::render(&topology, &source));
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerdma: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}
