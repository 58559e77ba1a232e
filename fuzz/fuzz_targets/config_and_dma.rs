//! Any sequence of config writes and DMAs on the example server: never a panic, and a DMA
//! that returns Ok moved every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerdma_pci::{Bdf, DmaAddr, examples, file};

fuzz_target!(|data: &[u8]| {
    let fabric = file::load_str(examples::GPU_SERVER, "gpu-server.toml").expect("example builds");
    let all: Vec<Bdf> = fabric.functions().map(|f| f.bdf()).collect();
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
});
