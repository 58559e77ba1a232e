//! `peerdma` — the command line.
//!
//! | command | what it does |
//! |---|---|
//! | `topo` | show a platform as a tree (`--json` for the machine-readable contract); `--matrix` for the P2P matrix |
//! | `explain` | why a provider/client pair gets its P2P map type, hop by hop |
//! | `export` | (real machine) export BAR ranges of a vfio-pci device as a dma-buf |
//! | `import` | (real machine) map such a buffer into an iommufd IOAS another device uses |
//! | `demo` | the export → import → revoke → recover story on the emulated machine |
//! | `scenario` | the conformance suite: run scenario files on a backend, or compare two runs |
//!
//! Errors go to stderr in plain words; bad input exits with status 2.

mod p2p;
mod real;
mod scenario;
mod topo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peerdma_pci::{Fabric, FabricError, examples, file};
use peerdma_vfio::KernelConfig;

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
    /// Tell the whole story on the emulated machine, checking bytes at every step: export a
    /// GPU BAR slice, import it beside the GPU (bus address) and through iommufd (IOVA), reset
    /// the GPU, watch both importers lose it, bring it back, close. Exits 1 if a step fails.
    Demo {
        /// A fabric file (TOML); without it, the built-in GPU server.
        #[arg(long)]
        fabric: Option<PathBuf>,
        /// The exporting GPU.
        #[arg(long, default_value = "gpu0")]
        gpu: String,
        /// Its BAR.
        #[arg(long, default_value_t = 2)]
        bar: u32,
        /// The importer beside the GPU.
        #[arg(long, default_value = "nic0")]
        nic: String,
        /// The importer behind another root port.
        #[arg(long, default_value = "acc0")]
        far: String,
        /// Print the steps as JSON events, one per line.
        #[arg(long)]
        json: bool,
    },

    /// Show the platform: host bridges, bridges, functions, BARs, ACS, COMMAND, power.
    Topo {
        /// A fabric file (TOML); without it, the built-in GPU server.
        #[arg(long, conflicts_with = "host")]
        fabric: Option<PathBuf>,
        /// Read this machine instead (sysfs; run as root to see ACS bits and windows).
        #[arg(long)]
        host: bool,
        /// With --host: read a tree captured by `capture-sysfs` instead of `/`.
        #[arg(long, hide = true, requires = "host")]
        sysfs_root: Option<PathBuf>,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
        /// Show the peer-to-peer matrix: every provider against every client.
        #[arg(long)]
        matrix: bool,
    },
    /// Export ranges of a vfio-pci device's BAR as a dma-buf (real machine; root).
    Export {
        /// The device (bound to vfio-pci).
        #[arg(long)]
        device: String,
        /// The BAR (VFIO region index 0-5).
        #[arg(long)]
        bar: u32,
        /// A range `OFFSET:LENGTH` (sizes like 0x1000:64K); repeat for several.
        #[arg(long = "range", required = true)]
        ranges: Vec<String>,
        /// Open the device through the cdev + iommufd path instead of group/container.
        #[arg(long)]
        cdev: bool,
    },
    /// Map a dma-buf of a provider's BAR into an iommufd IOAS attached to an importer (real
    /// machine; root; needs IOMMUFD).
    Import {
        /// The provider device (bound to vfio-pci).
        #[arg(long)]
        provider: String,
        /// Its BAR.
        #[arg(long)]
        bar: u32,
        /// The one range `OFFSET:LENGTH` to export.
        #[arg(long)]
        range: String,
        /// The importing device (bound to vfio-pci).
        #[arg(long)]
        importer: String,
        /// The IOVA to map at.
        #[arg(long)]
        iova: String,
    },
    /// Run the in-guest tests (inside the QEMU harness's guest only).
    #[command(hide = true)]
    GuestTest {
        /// `custom` (iommufd kernel) or `debian`.
        #[arg(long, default_value = "custom")]
        mode: String,
    },
    /// Copy what `topo --host` reads (sysfs, /proc) into a directory, for scanning elsewhere.
    CaptureSysfs {
        /// Where to write.
        out: PathBuf,
    },
    /// The conformance suite: scenario files (docs/scenarios.md) run on the emulated
    /// machine or the real kernel, and the table comparing the two.
    Scenario {
        #[command(subcommand)]
        cmd: ScenarioCmd,
    },
    /// Explain the P2P map type of one provider/client pair, hop by hop.
    Explain {
        /// The provider: a device name from the fabric file or an address (0000:03:00.0).
        provider: String,
        /// The client: a name or an address.
        client: String,
        /// A fabric file (TOML); without it, the built-in GPU server.
        #[arg(long)]
        fabric: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ScenarioCmd {
    /// Run scenario files (or directories of them) on one backend; exits 1 if a step's
    /// outcome is not the expected one.
    Run {
        /// Scenario files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// `emulated` (the QEMU harness's machine, emulated) or `linux` (this machine's
        /// kernel: root, vfio-pci bound to an ivshmem and an edu device).
        #[arg(long, default_value = "emulated")]
        backend: String,
        /// With `--backend emulated`: another fabric file (devices named by role).
        #[arg(long)]
        fabric: Option<PathBuf>,
        /// For a kernel without iommufd: skip the scenarios that need it and open every
        /// device through its group and a container.
        #[arg(long)]
        group_only: bool,
        /// The kernel's CONFIG_PM (`on` or `off`): which scenarios run, and how the emulated
        /// machine's kernel is built. Default `off`, as the harness's custom kernel.
        #[arg(long, default_value = "off", value_parser = ["on", "off"])]
        pm: String,
        /// The kernel's CONFIG_TRANSPARENT_HUGEPAGE (`on` or `off`): which scenarios run,
        /// and how the emulated machine's iommufd aligns the IOVAs it chooses. Default
        /// `off`, as the harness's custom kernel.
        #[arg(long, default_value = "off", value_parser = ["on", "off"])]
        thp: String,
        /// One JSON object per step.
        #[arg(long)]
        json: bool,
    },
    /// Run the scenarios on the emulated machine and compare with a real run's JSON lines:
    /// prints the agreement table; exits 1 on an undocumented disagreement.
    Compare {
        /// Scenario files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The real run (`scenario run --backend linux --json` output; other lines ignored).
        #[arg(long)]
        real: PathBuf,
        /// The ivshmem backing file, to decide the real run's pending DMAs.
        #[arg(long)]
        shm: Option<PathBuf>,
        /// Where documented divergences are listed.
        #[arg(long, default_value = "docs/divergences.md")]
        divergences: PathBuf,
        /// Another fabric file for the emulated side.
        #[arg(long)]
        fabric: Option<PathBuf>,
        /// The real run was made with `--group-only`: compare the same subset, the same way.
        #[arg(long)]
        group_only: bool,
        /// The real kernel's CONFIG_PM (`on` or `off`): the emulated machine is built the
        /// same way and the same scenarios are compared. Default `off`.
        #[arg(long, default_value = "off", value_parser = ["on", "off"])]
        pm: String,
        /// The real kernel's CONFIG_TRANSPARENT_HUGEPAGE (`on` or `off`), as `--pm`.
        #[arg(long, default_value = "off", value_parser = ["on", "off"])]
        thp: String,
        /// One JSON object per row.
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

/// Scans this machine into a fabric.
fn load_host(
    root: Option<&std::path::Path>,
) -> Result<(Fabric, String, peerdma_linux::sysfs::HostScan), CliError> {
    let src = peerdma_linux::sysfs::RootDir(
        root.map_or_else(|| PathBuf::from("/"), std::path::Path::to_path_buf),
    );
    let scan = peerdma_linux::sysfs::scan(&src).map_err(|e| CliError {
        message: e.to_string(),
        status: 2,
    })?;
    let fabric = Fabric::build(&scan.spec).map_err(|e| CliError {
        message: format!("this machine's topology does not fit peerdma's model: {e}"),
        status: 1,
    })?;
    let source = match root {
        None => "this machine (sysfs)".to_string(),
        Some(r) => format!("machine captured in {}", r.display()),
    };
    Ok((fabric, source, scan))
}

/// Adds what only sysfs knows: drivers, IOMMU groups, and ACS bits that could not be read.
fn host_annotate(t: &mut peerdma_pci::topology::Topology, scan: &peerdma_linux::sysfs::HostScan) {
    for d in &mut t.devices {
        let Ok(b) = d.bdf.parse::<peerdma_pci::Bdf>() else {
            continue;
        };
        if let Some(h) = scan.devices.get(&b) {
            d.driver.clone_from(&h.driver);
            d.iommu_group = h.iommu_group;
            if !h.acs_known {
                d.acs_known = false;
            }
        }
    }
}

fn json_error(e: &serde_json::Error) -> CliError {
    CliError {
        message: format!("cannot encode JSON: {e}"),
        status: 1,
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Topo {
            fabric,
            host,
            sysfs_root,
            json,
            matrix,
        } => {
            let (fabric, source, scan) = if host {
                let (f, s, scan) = load_host(sysfs_root.as_deref())?;
                (f, s, Some(scan))
            } else {
                let (f, s) = load_fabric(fabric.as_ref())?;
                (f, s, None)
            };
            let mut topology = peerdma_pci::topology::Topology::of(&fabric);
            if let Some(scan) = &scan {
                host_annotate(&mut topology, scan);
            }
            if json {
                let mut value = serde_json::to_value(&topology).map_err(|e| json_error(&e))?;
                if matrix {
                    value["p2p"] =
                        serde_json::to_value(p2p::pairs(&fabric)).map_err(|e| json_error(&e))?;
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).map_err(|e| json_error(&e))?
                );
            } else if matrix {
                print!("{}", p2p::render_matrix(&fabric, &source));
            } else {
                print!("{}", topo::render(&topology, &source));
                for n in scan.iter().flat_map(|s| &s.notes) {
                    println!("note: {n}");
                }
            }
            Ok(())
        }
        Command::Export {
            device,
            bar,
            ranges,
            cdev,
        } => {
            let bad = |m: String| CliError {
                message: m,
                status: 2,
            };
            let device: peerdma_pci::Bdf = device
                .parse()
                .map_err(|e: peerdma_pci::bdf::ParseBdfError| bad(e.to_string()))?;
            let ranges = ranges
                .iter()
                .map(|r| real::parse_range(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            let path = if cdev {
                peerdma_uapi::OpenPath::CdevIommufd
            } else {
                peerdma_uapi::OpenPath::GroupContainer
            };
            let out = real::export(device, bar, &ranges, path).map_err(|m| CliError {
                message: m,
                status: 2,
            })?;
            print!("{out}");
            Ok(())
        }
        Command::Import {
            provider,
            bar,
            range,
            importer,
            iova,
        } => {
            let bad = |m: String| CliError {
                message: m,
                status: 2,
            };
            let pb = |s: &str| {
                s.parse::<peerdma_pci::Bdf>()
                    .map_err(|e| bad(e.to_string()))
            };
            let (provider, importer) = (pb(&provider)?, pb(&importer)?);
            let range = real::parse_range(&range).map_err(bad)?;
            let iova = peerdma_pci::size::parse_size(&iova).map_err(|e| bad(e.to_string()))?;
            let out = real::import(provider, bar, range, importer, iova).map_err(|m| CliError {
                message: m,
                status: 2,
            })?;
            println!("{out}");
            Ok(())
        }
        Command::GuestTest { mode } => {
            let (passed, failed) = peerdma_linux::guest::run(&mode);
            println!("guest: {passed} passed, {failed} failed");
            if failed == 0 {
                Ok(())
            } else {
                Err(CliError {
                    message: format!("{failed} guest test(s) failed"),
                    status: 1,
                })
            }
        }
        Command::CaptureSysfs { out } => {
            let n = peerdma_linux::sysfs::capture(&out).map_err(|e| CliError {
                message: format!("capturing into {}: {e}", out.display()),
                status: 1,
            })?;
            println!("captured {n} PCI functions into {}", out.display());
            Ok(())
        }
        Command::Demo {
            fabric,
            gpu,
            bar,
            nic,
            far,
            json,
        } => {
            let (fabric, source) = load_fabric(fabric.as_ref())?;
            let fabric = std::sync::Arc::new(fabric);
            let cast = peerdma_vfio::demo::Cast { gpu, bar, nic, far };
            let steps = peerdma_vfio::demo::run(&fabric, &cast);
            if !json {
                println!("{source}");
            }
            for s in &steps {
                if json {
                    let ev = serde_json::json!({"step": s.step, "ok": s.ok, "detail": s.detail});
                    println!("{ev}");
                } else {
                    println!(
                        "{} {:<22} {}",
                        if s.ok { "ok  " } else { "FAIL" },
                        s.step,
                        s.detail
                    );
                }
            }
            if steps.iter().all(|s| s.ok) {
                Ok(())
            } else {
                Err(CliError {
                    message: "the demo found a step that misbehaved".into(),
                    status: 1,
                })
            }
        }
        Command::Scenario { cmd } => match cmd {
            ScenarioCmd::Run {
                files,
                backend,
                fabric,
                group_only,
                pm,
                thp,
                json,
            } => scenario::run(
                &files,
                &backend,
                fabric.as_ref(),
                group_only,
                KernelConfig {
                    pm: pm == "on",
                    thp: thp == "on",
                },
                json,
            ),
            ScenarioCmd::Compare {
                files,
                real,
                shm,
                divergences,
                fabric,
                group_only,
                pm,
                thp,
                json,
            } => scenario::compare(
                &files,
                &real,
                shm.as_ref(),
                &divergences,
                fabric.as_ref(),
                group_only,
                KernelConfig {
                    pm: pm == "on",
                    thp: thp == "on",
                },
                json,
            ),
        },
        Command::Explain {
            provider,
            client,
            fabric,
            json,
        } => {
            let (fabric, source) = load_fabric(fabric.as_ref())?;
            let find = |s: &str| {
                fabric.lookup(s).map_err(|e| CliError {
                    message: e.to_string(),
                    status: 2,
                })
            };
            let (p, c) = (find(&provider)?, find(&client)?);
            let e = peerdma_p2pdma::explain(&fabric, p, c);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&e).map_err(|e| json_error(&e))?
                );
            } else {
                print!("{}", p2p::render_explanation(&fabric, &e, &source));
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
