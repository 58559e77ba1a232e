//! Any sequence of config writes and DMAs on the example server: never a panic, and a DMA
//! that returns Ok moved every byte.
//!
//! The platform is built once per process. After every input each function is put back in
//! D0 and its registers as built are written back, so every input starts from the same
//! registers; the platform is rebuilt only when the sparse RAM and BAR memory the DMAs
//! created passes `MAX_PAGES` (memory is never freed otherwise).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use peerdma_pci::fabric::SavedConfig;
use peerdma_pci::{Bdf, DmaAddr, Fabric, PowerState, examples, file};

/// Resident 4 KiB pages (RAM and BARs) past which the platform is built anew.
const MAX_PAGES: usize = 32 * 1024;

struct Platform {
    fabric: Fabric,
    all: Vec<Bdf>,
    saved: Vec<(Bdf, SavedConfig)>,
}

fn build() -> Platform {
    let fabric = file::load_str(examples::GPU_SERVER, "gpu-server.toml").expect("example builds");
    let all: Vec<Bdf> = fabric.functions().map(|f| f.bdf()).collect();
    // VFs are not present until SR-IOV is enabled: only present functions can be saved.
    let saved = all
        .iter()
        .filter_map(|&b| Some((b, fabric.save_config(b).ok()?)))
        .collect();
    Platform { fabric, all, saved }
}

impl Platform {
    fn resident(&self) -> usize {
        let bars: usize = self
            .all
            .iter()
            .flat_map(|&b| (0u8..6).map(move |i| (b, i)))
            .filter_map(|(b, i)| self.fabric.bar_resident_pages(b, i).ok())
            .sum();
        self.fabric.ram_resident_pages() + bars
    }

    /// Every function back in D0 with its registers as built.
    fn restore(&self) {
        for &b in &self.all {
            let _ = self.fabric.set_power_state(b, PowerState::D0);
        }
        for (b, s) in &self.saved {
            // Registers that hold what was saved need no write-back (`restore_config` would
            // change nothing); a copy compares much faster than the write-back walks.
            if self.fabric.save_config(*b).as_ref() != Ok(s) {
                peerdma_fuzz::restore_config(&self.fabric, s);
            }
        }
    }
}

thread_local! {
    static PLATFORM: RefCell<Platform> = RefCell::new(build());
}

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    PLATFORM.with(|p| {
        {
            let p = p.borrow();
            let fabric = &p.fabric;
            let all = &p.all;
            for op in data.chunks(12) {
                if op.len() < 12 {
                    break;
                }
                let who = all[usize::from(op[0]) % all.len()];
                let off = u16::from_le_bytes([op[1], op[2]]) & 0xfff;
                let size = [1usize, 2, 4][usize::from(op[3] % 3)];
                let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
                if op[3] & 0x80 == 0 {
                    let _ = fabric.config_write(who, off & !(size as u16 - 1), size, value);
                } else {
                    let addr = u64::from(value) << (op[8] % 24);
                    let len = usize::from(op[9]) * 64 + 1;
                    if let Ok(t) = fabric.dma_write(who, DmaAddr(addr), &vec![op[10]; len]) {
                        assert_eq!(t.segments.iter().map(|s| s.len).sum::<u64>(), len as u64);
                    }
                }
            }
            p.restore();
        }
        if p.borrow().resident() > MAX_PAGES {
            *p.borrow_mut() = build();
        }
    });
});
