//! Invariants over generated platforms and random inputs.

use peerdma_pci::generate::{GenParams, generate};
use peerdma_pci::memory::SparseMemory;
use peerdma_pci::{Bdf, DmaAddr, Fabric, Target};
use proptest::prelude::*;

fn mem_bars(f: &Fabric) -> Vec<(Bdf, u8, u64, u64, u64)> {
    let mut v = Vec::new();
    for func in f.functions() {
        for b in f.bar_states(func.bdf()).unwrap() {
            if b.bar.kind.is_mem() {
                v.push((
                    func.bdf(),
                    b.bar.index,
                    b.bus.get(),
                    b.bar.size,
                    b.cpu.map_or(u64::MAX, peerdma_pci::PhysAddr::get),
                ));
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64), ..ProptestConfig::default() })]

    /// The enumerator never gives two BARs the same addresses, and every BAR is reachable.
    #[test]
    fn generated_platforms_build_with_disjoint_reachable_bars(seed in any::<u64>()) {
        let spec = generate(&GenParams { seed, ..GenParams::default() });
        let f = Fabric::build(&spec).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bars = mem_bars(&f);
        for (i, a) in bars.iter().enumerate() {
            for b in &bars[i + 1..] {
                let disjoint = a.2 + a.3 <= b.2 || b.2 + b.3 <= a.2;
                prop_assert!(disjoint, "{:?} overlaps {:?}", a, b);
            }
            prop_assert!(a.4 != u64::MAX, "{:?} outside the windows", a);
        }
        // The CPU reaches every BAR at its CPU address, at both ends.
        for &(bdf, index, _, size, cpu) in &bars {
            for off in [0, size - 8] {
                let t = f.cpu_write(peerdma_pci::PhysAddr(cpu + off), &off.to_le_bytes()).unwrap();
                prop_assert_eq!(t.segments[0].target, Target::Bar { bdf, bar: index, offset: off });
            }
        }
    }

    /// With every root complex forwarding, a DMA from any function to any BAR's bus address
    /// lands in that BAR at that offset — switch-local, ACS-redirected or across host bridges.
    #[test]
    fn any_dma_to_a_bar_bus_address_lands_in_that_bar(seed in any::<u64>(), picks in prop::collection::vec((any::<u32>(), any::<u32>(), any::<u32>()), 16)) {
        let spec = generate(&GenParams { seed, ..GenParams::default() });
        let f = Fabric::build(&spec).unwrap();
        let bars = mem_bars(&f);
        let requesters: Vec<Bdf> = f.functions().filter(|x| !x.kind().is_bridge()).map(peerdma_pci::Function::bdf).collect();
        for (r, t, o) in picks {
            let req = requesters[r as usize % requesters.len()];
            let (bdf, index, bus, size, _) = bars[t as usize % bars.len()];
            let off = u64::from(o) % (size - 3);
            let tr = f.dma_write(req, DmaAddr(bus + off), b"p2p!").map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(tr.segments.len(), 1);
            prop_assert_eq!(tr.segments[0].target, Target::Bar { bdf, bar: index, offset: off });
            let mut back = [0u8; 4];
            f.bar_peek(bdf, index, off, &mut back).unwrap();
            prop_assert_eq!(&back, b"p2p!");
        }
    }

    /// Sparse memory behaves like a flat byte array.
    #[test]
    fn sparse_memory_matches_a_flat_array(ops in prop::collection::vec((0u64..40_000, prop::collection::vec(any::<u8>(), 0..9000), any::<bool>()), 1..40)) {
        let mut m = SparseMemory::new();
        let mut flat = vec![0u8; 50_000];
        for (at, data, write) in ops {
            let at = at as usize;
            if write {
                m.write(at as u64, &data);
                flat[at..at + data.len()].copy_from_slice(&data);
            } else {
                let mut buf = vec![0u8; data.len()];
                m.read(at as u64, &mut buf);
                prop_assert_eq!(&buf[..], &flat[at..at + data.len()]);
            }
        }
        prop_assert!(m.pages() <= 13);
    }

    /// Every valid address prints and parses back to itself.
    #[test]
    fn bdf_round_trip(domain in any::<u16>(), bus in any::<u8>(), dev in 0u8..32, func in 0u8..8) {
        let b = Bdf::new(domain, bus, dev, func).unwrap();
        prop_assert_eq!(b.to_string().parse::<Bdf>().unwrap(), b);
    }

    /// Config writes never change read-only bits, whatever is written where.
    #[test]
    fn config_writes_respect_read_only_bits(writes in prop::collection::vec((0u16..1024, any::<u32>()), 1..200)) {
        let f = peerdma_pci::file::load_str(peerdma_pci::examples::GPU_NIC_SWITCH, "x").unwrap();
        let gpu = f.lookup("gpu0").unwrap();
        let ids = f.config_read(gpu, 0, 4).unwrap();
        let caps = f.config_read(gpu, 0x34, 1).unwrap();
        for (off, v) in writes {
            let off = off & !3;
            f.config_write(gpu, off, 4, v).unwrap();
        }
        prop_assert_eq!(f.config_read(gpu, 0, 4).unwrap(), ids);
        prop_assert_eq!(f.config_read(gpu, 0x34, 1).unwrap(), caps);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64), ..ProptestConfig::default() })]

    /// Whatever text arrives as a fabric file, loading it gives a fabric or an error, never a
    /// panic.
    #[test]
    fn arbitrary_text_never_panics_the_loader(text in ".{0,400}") {
        let _ = peerdma_pci::file::load_str(&text, "fuzz.toml");
    }

    /// Mutated example files (a line dropped, a number changed, a value swapped) load or are
    /// refused with a located error; never a panic.
    #[test]
    fn mutated_examples_never_panic_the_loader(which in 0usize..peerdma_pci::examples::ALL.len(), line in any::<u16>(), how in 0u8..4, n in any::<u64>()) {
        let (name, text) = peerdma_pci::examples::ALL[which];
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let i = usize::from(line) % lines.len();
        match how {
            0 => { lines.remove(i); }
            1 => lines[i] = lines[i].replace(|c: char| c.is_ascii_digit(), &(n % 10).to_string()),
            2 => lines[i] = lines[i].replace('"', ""),
            _ => lines.insert(i, format!("size = {n}")),
        }
        let mutated = lines.join("\n");
        if let Err(e) = peerdma_pci::file::load_str(&mutated, name) {
            prop_assert_eq!(e.file.as_deref(), Some(name));
        }
    }

    /// Random config writes to every function of a platform, then DMA: nothing panics, and
    /// every DMA either lands or is a fault.
    #[test]
    fn random_config_writes_then_dma_never_panic(seed in any::<u64>(), writes in prop::collection::vec((any::<u16>(), 0u16..4096, any::<u32>(), 0u8..3), 1..100)) {
        let f = Fabric::build(&generate(&GenParams { seed, ..GenParams::default() })).unwrap();
        let all: Vec<Bdf> = f.functions().map(peerdma_pci::Function::bdf).collect();
        for (who, off, v, sz) in writes {
            let d = all[usize::from(who) % all.len()];
            let size = [1usize, 2, 4][usize::from(sz)];
            let _ = f.config_write(d, off, size, v);
            let _ = f.dma_write(d, DmaAddr(u64::from(v) << 8), b"x");
        }
    }
}
