//! `soak`: the concurrent soak of the revocation system on the emulated machine (see
//! `peerdma_vfio::soak`). `cargo run --release --bin soak -- --threads 8 --ops 10M`.
//! Exits 0 when every promise held, 1 on a violation or leak, 2 on a stuck thread.

use std::time::Duration;

use clap::Parser;

/// Threads doing what users and importers do at once, judged by the revocation watch.
#[derive(Parser, Debug)]
#[command(name = "soak", version)]
struct Args {
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Operations in all (a number, or with a k or M suffix: 200k, 10M).
    #[arg(long, default_value = "200k", value_parser = parse_count)]
    ops: u64,
    /// The first thread's seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds an operation may take before its thread is reported stuck.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
}

fn parse_count(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.strip_suffix(['k', 'K']) {
        Some(n) => (n, 1_000),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1_000_000),
            None => (s, 1),
        },
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("not a count: {s:?} (try 200000, 200k or 10M)"))
}

fn main() {
    let a = Args::parse();
    let opts = peerdma_vfio::soak::Options {
        threads: a.threads,
        ops: a.ops,
        seed: a.seed,
        stall: Duration::from_secs(a.stall_secs),
        plant: peerdma_vfio::soak::Plant::None,
    };
    match peerdma_vfio::soak::run(&opts) {
        Ok(r) => {
            println!(
                "soak: seed {} (run again with --threads {} --ops {} --seed {})",
                a.seed, a.threads, a.ops, a.seed
            );
            print!("{r}");
            if !r.stuck.is_empty() {
                std::process::exit(2);
            }
            if !r.ok() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("soak: cannot build the machine: {e}");
            std::process::exit(1);
        }
    }
}
