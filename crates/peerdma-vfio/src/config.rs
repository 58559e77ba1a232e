//! The user's view of a vfio-pci device's config space (drivers/vfio/pci/vfio_pci_config.c,
//! Linux 7.2): accesses of any length are cut into aligned chunks that stay inside one
//! capability, and each chunk goes through its register's permissions — virtualised bits live
//! in a per-open copy (`vconfig`), writable bits reach the hardware read-modify-write, the rest
//! is dropped. COMMAND, the PM control register, the PCIe and AF FLR bits and the BARs get the
//! kernel's special handling at every size and alignment it accepts; how they revoke and
//! unrevoke dma-bufs is decided in [`crate::pci`].
//!
//! The rules, with their places in vfio_pci_config.c:
//! - *Bounds* (`vfio_pci_config_rw_single`): a start past the function's config size (4096
//!   with a PCIe capability, else 256) or an end past it is `EFAULT`; nothing is written.
//! - *Chunks* (`vfio_pci_config_rw_single`, `vfio_pci_cap_remaining_dword`): at most to the end
//!   of the dword and of the capability that owns the first byte; then 4 bytes if 4-aligned
//!   and that many remain, else 2 if 2-aligned, else 1.
//! - *Default write* (`vfio_default_config_write`): bits that are writable and virtualised go
//!   to `vconfig`; writable and not virtualised go to hardware (read, merge, write the chunk);
//!   a chunk with no writable bit is dropped.
//! - *Header* (`init_pci_cap_basic_perm`): IDs and class read-only; COMMAND writable, its
//!   INTx-disable bit virtualised; STATUS read-only with the capability-list bit virtualised;
//!   cache line, latency timer, BIST writable; the six BARs and the ROM BAR fully virtualised
//!   (a user's BAR write changes what the user reads back, never where the device decodes);
//!   capability pointer and interrupt pin virtualised read-only; interrupt line virtualised.
//! - *COMMAND* (`vfio_basic_config_write`): only a chunk that starts at offset 4 is a COMMAND
//!   write for the memory rules — a 1-, 2- or 4-byte write there. The new memory bit comes
//!   from the written value; the memory and I/O enable bits are then copied into `vconfig`.
//! - *BAR reads* (`vfio_bar_fixup`): after a BAR write the virtual BARs are masked to their
//!   size and get the hardware's flag bits back (sizing by writing all ones works); a BAR with
//!   no address reads 0; the upper half of a 64-bit BAR is masked with the upper size bits.
//! - *PM* (`init_pci_cap_pm_perm`, `vfio_pm_config_write`): the PME-support bits of PMC and
//!   PME enable/status of PMCSR are virtualised; the power-state bits are not written through
//!   — a chunk that starts at PMCSR sets the power state from its low two bits.
//! - *PCIe* (`init_pci_cap_exp_perm`, `vfio_exp_config_write`): in DevCtl the FLR bit, the
//!   payload size and the read-request size are virtualised and the phantom-functions bit is
//!   read-only; DevCtl2 writable except ARI. After any write into the capability, a set FLR
//!   bit is cleared and, if DevCap advertises FLR, the function is reset. (The kernel also
//!   programs the hardware's read-request size, at least the MPS, when the user's changes;
//!   not modelled: the value stays virtual.)
//! - *AF* (`init_pci_cap_af_perm`, `vfio_af_config_write`): the FLR bit of AF control is
//!   virtualised; once set it is cleared and, if AF capabilities advertise FLR and TP, the
//!   function is reset.
//! - Other capabilities and unassigned bytes are passed through here (the kernel has
//!   permissions for MSI, MSI-X, VPD and the extended capabilities too; none of them takes
//!   part in revocation, and they are not modelled).

use peerdma_pci::{BarType, Bdf, Errno, Fabric, regs};

/// Which register block owns a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The standard header (0x00–0x3f).
    Header,
    /// The PM capability at this offset.
    Pm(u16),
    /// The PCIe capability at this offset.
    Exp(u16),
    /// The AF capability at this offset.
    Af(u16),
    /// The MSI-X capability at this offset: vfio-pci gives it no write handler, so writes
    /// are dropped (`cap_perms[PCI_CAP_ID_MSIX]`); reads come from the device.
    Msix(u16),
    /// Anything else: passed through.
    Other,
}

/// `pci_cap_length[PCI_CAP_ID_MSIX]`.
const MSIX_LEN: u16 = 12;

/// `pci_cap_length[PCI_CAP_ID_AF]`.
const AF_LEN: u16 = 6;

/// The capabilities the permissions need.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    pub(crate) pm: Option<u16>,
    pub(crate) exp: Option<u16>,
    pub(crate) af: Option<u16>,
    /// The MSI-X capability, found through the list at the first open.
    pub(crate) msix: Option<u16>,
    /// The PCIe capability's length by its version and type (`vfio_cap_len`): 0x14 for v1
    /// (0xc for a root-complex integrated endpoint), 0x34 for v2 (0x2c).
    pub(crate) exp_len: u16,
    /// 4096 with a PCIe capability, else 256 (`pdev->cfg_size`).
    pub(crate) size: usize,
}

impl Layout {
    pub(crate) fn of(fabric: &Fabric, bdf: Bdf) -> Result<Layout, Errno> {
        let f = fabric.function(bdf).map_err(|_| Errno::ENODEV)?;
        let c = f.caps();
        let exp_len = c.exp.map_or(0, |e| {
            let flags = fabric.config_read(bdf, e + regs::EXP_FLAGS, 2).unwrap_or(0);
            let rciep = (flags >> 4) & 0xf == u32::from(regs::EXP_TYPE_RC_END);
            match (flags & u32::from(regs::EXP_FLAGS_VERS) == 1, rciep) {
                (true, true) => 0xc,
                (true, false) => 0x14,
                (false, true) => 0x2c,
                (false, false) => 0x34,
            }
        });
        Ok(Layout {
            pm: c.pm,
            exp: c.exp,
            af: c.af,
            msix: find_cap(fabric, bdf, CAP_ID_MSIX),
            exp_len,
            size: if c.exp.is_some() {
                regs::CFG_SIZE
            } else {
                regs::STD_SIZE
            },
        })
    }

    pub(crate) fn owner(&self, pos: u16) -> Owner {
        let inside = |cap: Option<u16>, len: u16| cap.filter(|&c| pos >= c && pos < c + len);
        if pos < 0x40 {
            Owner::Header
        } else if let Some(c) = inside(self.pm, u16::from(regs::PM_SIZEOF)) {
            Owner::Pm(c)
        } else if let Some(c) = inside(self.exp, self.exp_len) {
            Owner::Exp(c)
        } else if let Some(c) = inside(self.af, AF_LEN) {
            Owner::Af(c)
        } else if let Some(c) = inside(self.msix, MSIX_LEN) {
            Owner::Msix(c)
        } else {
            Owner::Other
        }
    }

    /// The length of the chunk that starts at `pos` when `left` bytes remain.
    pub(crate) fn chunk(&self, pos: u16, left: usize) -> usize {
        let owner = self.owner(pos);
        let mut same = 1usize;
        while (usize::from(pos) + same) % 4 != 0 && self.owner(pos + same as u16) == owner {
            same += 1;
        }
        let n = left.min(same);
        if n >= 4 && pos % 4 == 0 {
            4
        } else if n >= 2 && pos % 2 == 0 {
            2
        } else {
            1
        }
    }

    /// The (writable, virtualised) bits of the byte at `pos`.
    #[allow(clippy::match_same_arms)] // one arm per register, as the kernel's tables list them
    pub(crate) fn perm(&self, pos: u16) -> (u8, u8) {
        match self.owner(pos) {
            Owner::Header => header_perm(pos),
            Owner::Pm(c) => match pos - c {
                1 => (0, 0xff),
                // PMC bits 11–15: PME support.
                3 => (0, 0xf8),
                // PMCSR: the state bits are trapped, PME enable (bit 8) and status (bit 15)
                // virtualised, the rest (incl. PMCSR_BSE and data) written through.
                4 => (0xfc, 0),
                5 => (0x7e, 0x81),
                6 | 7 => (0xff, 0),
                _ => (0, 0),
            },
            Owner::Exp(c) => match pos - c {
                1 => (0, 0xff),
                // DevCtl: payload (bits 5–7), read request (12–14), FLR (15) virtualised;
                // phantom functions (bit 9) read-only.
                8 => (0xff, 0xe0),
                9 => (0xfd, 0xf0),
                // DevCtl2: all but ARI (bit 5).
                0x28 => (0xdf, 0),
                0x29 => (0xff, 0),
                _ => (0, 0),
            },
            Owner::Af(c) => match pos - c {
                1 => (0, 0xff),
                4 => (regs::AF_CTRL_FLR, regs::AF_CTRL_FLR),
                _ => (0, 0),
            },
            // Read from the device; writes never reach it (the handler drops them).
            Owner::Msix(_) => (0, 0),
            Owner::Other => (0xff, 0),
        }
    }
}

#[allow(clippy::match_same_arms)] // one arm per register, as the kernel's table lists them
fn header_perm(pos: u16) -> (u8, u8) {
    match pos {
        0..=3 => (0, 0xff),
        4 => (0xff, 0),
        // COMMAND bit 10, INTx disable.
        5 => (0xff, 0x04),
        // STATUS bit 4, capability list.
        6 => (0, 0x10),
        0x0c | 0x0d | 0x0f => (0xff, 0),
        0x10..=0x27 | 0x30..=0x33 | 0x3c => (0xff, 0xff),
        0x34 | 0x3d => (0, 0xff),
        _ => (0, 0),
    }
}

/// The per-open copy of config space (`vdev->vconfig`), made at the first open.
#[derive(Debug, Clone)]
pub(crate) struct VConfig {
    pub(crate) bytes: Box<[u8; regs::CFG_SIZE]>,
    pub(crate) layout: Layout,
    /// A BAR was written: reads mask them first (`vdev->bardirty`).
    pub(crate) bar_dirty: bool,
    /// The hardware's BAR registers ([`BAR_REGS`]) at the first open, for `vfio_bar_restore`
    /// (`vdev->rbar`).
    pub(crate) bars_at_open: [u32; 7],
}

/// `PCI_ROM_ADDRESS`.
pub(crate) const ROM_ADDRESS: u16 = 0x30;

/// The six BAR registers and the ROM BAR.
pub(crate) const BAR_REGS: [u16; 7] = [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, ROM_ADDRESS];

impl VConfig {
    /// A copy of the hardware's registers, with the PME bits cleared (`vfio_config_init`,
    /// `vfio_cap_init`).
    pub(crate) fn init(fabric: &Fabric, bdf: Bdf) -> Result<VConfig, Errno> {
        let layout = Layout::of(fabric, bdf)?;
        let mut bytes = Box::new([0u8; regs::CFG_SIZE]);
        fabric
            .config_read_into(bdf, 0, &mut bytes[..layout.size])
            .map_err(|_| Errno::EIO)?;
        let bars_at_open = BAR_REGS.map(|at| {
            let i = usize::from(at);
            u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
        });
        let mut v = VConfig {
            bytes,
            layout,
            bar_dirty: false,
            bars_at_open,
        };
        if let Some(pm) = layout.pm {
            v.bytes[usize::from(pm + 3)] &= !0xf8;
            v.bytes[usize::from(pm + 5)] &= !0x81;
        }
        Ok(v)
    }

    pub(crate) fn get(&self, pos: u16, n: usize) -> u32 {
        (0..n).fold(0, |v, i| {
            v | u32::from(self.bytes[usize::from(pos) + i]) << (8 * i)
        })
    }

    pub(crate) fn set(&mut self, pos: u16, n: usize, val: u32) {
        for i in 0..n {
            self.bytes[usize::from(pos) + i] = (val >> (8 * i)) as u8;
        }
    }

    /// The virtual COMMAND register.
    pub(crate) fn command(&self) -> u16 {
        self.get(regs::COMMAND, 2) as u16
    }

    /// The masks of chunk `[pos, pos + n)`, as little-endian words.
    pub(crate) fn masks(&self, pos: u16, n: usize) -> (u32, u32) {
        (0..n).fold((0, 0), |(w, v), i| {
            let (bw, bv) = self.layout.perm(pos + i as u16);
            (w | u32::from(bw) << (8 * i), v | u32::from(bv) << (8 * i))
        })
    }

    /// `vfio_default_config_write`: virtualised writable bits to `vconfig`, the other
    /// writable bits to hardware.
    pub(crate) fn default_write(
        &mut self,
        fabric: &Fabric,
        bdf: Bdf,
        pos: u16,
        n: usize,
        val: u32,
    ) -> Result<(), Errno> {
        let (write, virt) = self.masks(pos, n);
        if write == 0 {
            return Ok(());
        }
        if write & virt != 0 {
            let v = self.get(pos, n);
            self.set(pos, n, (v & !(write & virt)) | (val & write & virt));
        }
        if write & !virt != 0 {
            let hw = fabric.config_read(bdf, pos, n).map_err(|_| Errno::EIO)?;
            let merged = (hw & !(write & !virt)) | (val & write & !virt);
            fabric
                .config_write(bdf, pos, n, merged)
                .map_err(|_| Errno::EIO)?;
        }
        Ok(())
    }

    /// What a user reads in chunk `[pos, pos + n)`: virtualised bits from `vconfig`, the rest
    /// from hardware (`vfio_default_config_read`, after `vfio_bar_fixup`).
    pub(crate) fn read(
        &mut self,
        fabric: &Fabric,
        bdf: Bdf,
        pos: u16,
        n: usize,
    ) -> Result<u32, Errno> {
        if self.layout.owner(pos) == Owner::Header && (regs::BASE_ADDRESS_0..0x34).contains(&pos) {
            self.bar_fixup(fabric, bdf);
        }
        let (_, virt) = self.masks(pos, n);
        let hw = if virt == u32::MAX >> (32 - 8 * n) {
            0
        } else {
            fabric.config_read(bdf, pos, n).map_err(|_| Errno::EIO)?
        };
        Ok((self.get(pos, n) & virt) | (hw & !virt))
    }

    /// `vfio_bar_fixup`: the virtual BARs masked to their sizes, with the hardware's flags.
    fn bar_fixup(&mut self, fabric: &Fabric, bdf: Bdf) {
        if !self.bar_dirty {
            return;
        }
        let mut i = 0u8;
        while i < 6 {
            let at = regs::BASE_ADDRESS_0 + 4 * u16::from(i);
            let Ok(b) = fabric.bar(bdf, i) else {
                self.set(at, 4, 0);
                i += 1;
                continue;
            };
            if b.bar.size == 0 || b.bus.get() == 0 {
                self.set(at, 4, 0);
                i += 1;
                continue;
            }
            let mask = !(b.bar.size - 1);
            let flags = match b.bar.kind {
                BarType::Io => regs::BAR_SPACE_IO,
                BarType::Mem32 => u32::from(b.bar.prefetch) * regs::BAR_MEM_PREFETCH,
                BarType::Mem64 => {
                    regs::BAR_MEM_TYPE_64 | (u32::from(b.bar.prefetch) * regs::BAR_MEM_PREFETCH)
                }
            };
            // `vfio_bar_fixup`: the size mask alone (an I/O BAR of 4 or 8 bytes keeps bits 2-3).
            let lo = self.get(at, 4) & (mask as u32);
            self.set(at, 4, lo | flags);
            if b.bar.kind == BarType::Mem64 && i < 5 {
                let hi = self.get(at + 4, 4) & (mask >> 32) as u32;
                self.set(at + 4, 4, hi);
                i += 1;
            }
            i += 1;
        }
        // No ROM BARs are modelled: the ROM register reads 0.
        self.set(ROM_ADDRESS, 4, 0);
        self.bar_dirty = false;
    }
}

/// `PCI_CAP_ID_MSIX`.
pub(crate) const CAP_ID_MSIX: u8 = 0x11;

/// Capability `id` in the device's standard list (at most 48 entries, as `vfio_cap_init`).
pub(crate) fn find_cap(fabric: &Fabric, bdf: Bdf, id: u8) -> Option<u16> {
    let rd = |off: u16, n: usize| fabric.config_read(bdf, off, n).ok();
    if rd(regs::STATUS, 2)? & u32::from(regs::STATUS_CAP_LIST) == 0 {
        return None;
    }
    let mut p = rd(regs::CAPABILITY_LIST, 1)? as u16 & 0xfc;
    for _ in 0..48 {
        if p < 0x40 {
            return None;
        }
        let hdr = rd(p, 2)?;
        if hdr & 0xff == u32::from(id) {
            return Some(p);
        }
        p = (hdr >> 8) as u16 & 0xfc;
    }
    None
}

/// The chunks of an access of `len` bytes at `offset`, after the bounds check.
pub(crate) fn chunks(layout: &Layout, offset: u16, len: usize) -> Result<Vec<(u16, usize)>, Errno> {
    if usize::from(offset) >= layout.size || usize::from(offset) + len > layout.size {
        return Err(Errno::EFAULT);
    }
    let mut out = Vec::new();
    let (mut pos, mut left) = (offset, len);
    while left > 0 {
        let n = layout.chunk(pos, left);
        out.push((pos, n));
        pos += n as u16;
        left -= n;
    }
    Ok(out)
}
