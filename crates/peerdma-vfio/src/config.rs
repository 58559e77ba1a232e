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
//! - *MSI* (`init_pci_cap_msi_perm`, `vfio_msi_config_write`): the low byte of the flags,
//!   the address and the data are virtual and writable, per-vector mask and pending bits go
//!   to the hardware; a write reaching the flags clears MSI Enable unless MSI is the active
//!   interrupt type (enabled through SET_IRQS, [`crate::pci`]'s `irqs`) and cuts the queue
//!   size to the one the last MSI enable allowed.
//! - *Which handler* (`vfio_config_do_rw` in `vfio_pci_config_rw_single`, `vfio_cap_init`,
//!   `vfio_ecap_init`): a byte map built at the first open names the capability that owns
//!   each byte. Capabilities vfio does not know the length of (Slot ID, EA, PASID, DPC, …)
//!   are hidden: unlinked from the chain the user walks, their bytes unassigned. Bytes
//!   outside every capability are raw both ways; a capability without a permission table
//!   (MSI-X, SR-IOV, ACS, …) reads from the hardware with its ID and next pointer from
//!   `vconfig` and drops writes; vendor-specific ones and DVSEC take raw writes; PCI-X, VPD,
//!   AER and Power Budgeting have tables of their own.

use peerdma_pci::{BarType, Bdf, Errno, Fabric, regs};

/// Which register block owns a byte, as `pci_config_map` says.
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
    /// The MSI capability at this offset (the per-device `msi_perm`).
    Msi(u16),
    /// Another standard capability kept in the chain: its ID and offset. PCI-X and VPD have
    /// permission tables, a vendor-specific one is written raw, every other (MSI-X, HT,
    /// SATA, AGP, …) has no write handler, so writes are dropped (`cap_perms[]`).
    Cap(u8, u16),
    /// An extended capability kept in the chain (or the placeholder left for a hidden first
    /// one): the low byte of its ID, as the kernel's byte map holds it, and its offset. AER
    /// and Power Budgeting have permission tables, vendor-specific and DVSEC are written raw,
    /// every other drops writes (`ecap_perms[]`, `direct_ro_perms`).
    Ecap(u8, u16),
    /// Outside every capability: read and written raw (`unassigned_perms`).
    Unassigned,
}

/// `pci_config_map`'s mark for bytes outside every capability (`PCI_CAP_ID_INVALID`).
const MAP_INVALID: u8 = 0xff;
/// `PCI_CAP_ID_BASIC`: the standard header.
const MAP_BASIC: u8 = 0;

/// Standard capability IDs the permissions name (`pci_regs.h`).
pub(crate) mod cap {
    use peerdma_pci::regs;
    pub const PM: u8 = regs::CAP_ID_PM;
    pub const AGP: u8 = 0x02;
    pub const VPD: u8 = 0x03;
    pub const MSI: u8 = 0x05;
    pub const PCIX: u8 = 0x07;
    pub const HT: u8 = 0x08;
    pub const VNDR: u8 = 0x09;
    pub const EXP: u8 = regs::CAP_ID_EXP;
    pub const MSIX: u8 = 0x11;
    pub const SATA: u8 = 0x12;
    pub const AF: u8 = regs::CAP_ID_AF;
}

/// Extended capability IDs the permissions name.
mod ecap {
    pub const ERR: u16 = 0x01;
    pub const VC: u16 = 0x02;
    pub const DSN: u16 = 0x03;
    pub const PWR: u16 = 0x04;
    pub const MFVC: u16 = 0x08;
    pub const VC9: u16 = 0x09;
    pub const VNDR: u16 = 0x0b;
    pub const ACS: u16 = 0x0d;
    pub const ARI: u16 = 0x0e;
    pub const ATS: u16 = 0x0f;
    pub const SRIOV: u16 = 0x10;
    pub const MCAST: u16 = 0x12;
    pub const PRI: u16 = 0x13;
    pub const REBAR: u16 = 0x15;
    pub const DPA: u16 = 0x16;
    pub const TPH: u16 = 0x17;
    pub const LTR: u16 = 0x18;
    pub const DVSEC: u16 = 0x23;
    /// `PCI_EXT_CAP_ID_MAX` (Physical Layer 64.0 GT/s).
    pub const MAX: u16 = 0x31;
}

/// `PCI_MSI_FLAGS_*` and `PCI_MSIX_FLAGS_QSIZE`: the MSI and MSI-X control words.
pub(crate) mod msi {
    pub const ENABLE: u16 = 0x0001;
    /// Multiple Message Capable.
    pub const QMASK: u16 = 0x000e;
    /// Multiple Message Enable.
    pub const QSIZE: u16 = 0x0070;
    pub const BIT64: u16 = 0x0080;
    pub const MASKBIT: u16 = 0x0100;
    /// MSI-X table size − 1.
    pub const MSIX_QSIZE: u16 = 0x07ff;
}

/// `pci_cap_length[]`: a fixed length, 0 for a capability vfio hides, `None` when the
/// length is read from the capability (`vfio_cap_len`).
#[allow(clippy::match_same_arms)] // one arm per entry of the kernel's table
fn cap_length(id: u8) -> Option<u16> {
    match id {
        cap::PM => Some(u16::from(regs::PM_SIZEOF)),
        cap::AGP => Some(12),
        cap::VPD => Some(8),
        cap::MSIX => Some(12),
        cap::AF => Some(6),
        cap::MSI | cap::PCIX | cap::HT | cap::VNDR | cap::EXP | cap::SATA => None,
        // ID 0, Slot ID, CompactPCI hot swap and CRC, Debug, SHPC, SSVID, AGP 8x, Secure
        // Device, Enhanced Allocation and every ID past PCI_CAP_ID_MAX.
        _ => Some(0),
    }
}

/// `pci_ext_cap_length[]`, as [`cap_length`] (`vfio_ext_cap_len` for `None`).
#[allow(clippy::match_same_arms)] // one arm per entry of the kernel's table
fn ecap_length(id: u16) -> Option<u16> {
    match id {
        ecap::ERR => Some(0x2c),
        ecap::DSN => Some(12),
        ecap::PWR => Some(0x10),
        ecap::ARI | ecap::ATS | ecap::LTR => Some(8),
        ecap::SRIOV => Some(0x40),
        ecap::MCAST => Some(40),
        ecap::PRI => Some(16),
        ecap::VC
        | ecap::VC9
        | ecap::MFVC
        | ecap::VNDR
        | ecap::ACS
        | ecap::REBAR
        | ecap::DPA
        | ecap::TPH
        | ecap::DVSEC => None,
        // Root-complex-only ones, MR-IOV, PASID, DPC, L1SS, PTM, DOE, … and past the max.
        _ => Some(0),
    }
}

/// The layout vfio-pci builds at the first open (`vfio_config_init`, `vfio_cap_init`,
/// `vfio_ecap_init`): which capability owns each byte, and the ones the handlers need.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The MSI capability's flags at the first open, which fix its permissions
    /// (`vfio_msi_cap_len`, `init_pci_cap_msi_perm`).
    msi_flags: Option<u16>,
    /// 4096 with a PCIe capability, else 256 (`pdev->cfg_size`).
    pub(crate) size: usize,
    /// `pci_config_map`: per byte, [`MAP_BASIC`], a capability ID (the low byte of an
    /// extended one's), or [`MAP_INVALID`].
    map: Box<[u8; regs::CFG_SIZE]>,
}

impl Layout {
    /// The layout of the function's current registers.
    pub(crate) fn of(fabric: &Fabric, bdf: Bdf) -> Result<Layout, Errno> {
        Self::scan(fabric, bdf, None)
    }

    /// Walks both capability lists as `vfio_cap_init` and `vfio_ecap_init` do. With
    /// `vconfig`, also makes the edits they make there: a hidden capability is unlinked by
    /// rewriting the previous next pointer; a hidden first extended capability keeps only
    /// its next pointer; with no standard capability kept, STATUS loses Capabilities List;
    /// with no extended one kept, dword 0x100 is 0; PM's PME bits are cleared.
    fn scan(fabric: &Fabric, bdf: Bdf, mut vconfig: Option<&mut [u8]>) -> Result<Layout, Errno> {
        let f = fabric.function(bdf).map_err(|_| Errno::ENODEV)?;
        let size = if f.caps().exp.is_some() {
            regs::CFG_SIZE
        } else {
            regs::STD_SIZE
        };
        let rd = |off: u16, n: usize| fabric.config_read(bdf, off, n).map_err(|_| Errno::EIO);
        let mut l = Layout {
            msi_flags: None,
            size,
            map: Box::new([MAP_INVALID; regs::CFG_SIZE]),
        };
        l.map[..0x40].fill(MAP_BASIC);
        let mut extended = false;
        if rd(regs::STATUS, 2)? & u32::from(regs::STATUS_CAP_LIST) != 0 {
            let mut pos = rd(regs::CAPABILITY_LIST, 1)? as u16;
            let mut prev = regs::CAPABILITY_LIST;
            let mut kept = 0;
            let mut loops = (regs::STD_SIZE - 0x40) / 4;
            while pos != 0 && loops > 0 {
                loops -= 1;
                let id = rd(pos, 1)? as u8;
                let next = rd(pos + 1, 1)? as u16;
                let len = match cap_length(id) {
                    Some(n) => n,
                    None => l.cap_len(fabric, bdf, id, pos, &mut extended)?,
                };
                if len == 0 {
                    if let Some(v) = vconfig.as_deref_mut() {
                        v[usize::from(prev)] = next as u8;
                    }
                    pos = next;
                    continue;
                }
                let end = (usize::from(pos) + usize::from(len)).min(regs::STD_SIZE);
                l.map[usize::from(pos)..end].fill(id);
                if let Some(v) = vconfig.as_deref_mut() {
                    fabric
                        .config_read_into(bdf, pos, &mut v[usize::from(pos)..end])
                        .map_err(|_| Errno::EIO)?;
                    if id == cap::PM {
                        v[usize::from(pos) + 3] &= !0xf8;
                        v[usize::from(pos) + 5] &= !0x81;
                    }
                }
                prev = pos + 1;
                pos = next;
                kept += 1;
            }
            if kept == 0 {
                if let Some(v) = vconfig.as_deref_mut() {
                    v[usize::from(regs::STATUS)] &= !(regs::STATUS_CAP_LIST as u8);
                }
            }
        }
        if extended {
            l.scan_ecaps(fabric, bdf, vconfig)?;
        }
        Ok(l)
    }

    /// `vfio_cap_len` for the capabilities whose length is read from them. The PCIe and
    /// PCI-X 2.0 capabilities also decide whether extended capabilities are walked: only
    /// if dword 0x100 is not 0.
    fn cap_len(
        &mut self,
        fabric: &Fabric,
        bdf: Bdf,
        id: u8,
        pos: u16,
        extended: &mut bool,
    ) -> Result<u16, Errno> {
        let rd = |off: u16, n: usize| fabric.config_read(bdf, off, n).map_err(|_| Errno::EIO);
        let probe_ext = |extended: &mut bool| -> Result<(), Errno> {
            if self.size > regs::STD_SIZE {
                *extended = rd(0x100, 4)? != 0;
            }
            Ok(())
        };
        Ok(match id {
            cap::MSI => {
                let flags = rd(pos + 2, 2)? as u16;
                self.msi_flags.get_or_insert(flags);
                10 + if flags & msi::BIT64 != 0 { 4 } else { 0 }
                    + if flags & msi::MASKBIT != 0 { 10 } else { 0 }
            }
            cap::PCIX => {
                if (rd(pos + 2, 2)? >> 12) & 3 != 0 {
                    probe_ext(extended)?;
                    24
                } else {
                    8
                }
            }
            cap::VNDR => rd(pos + 2, 1)? as u16,
            cap::EXP => {
                probe_ext(extended)?;
                // By version and type: 0x14 for v1 (0xc for a root-complex integrated
                // endpoint), 0x34 for v2 (0x2c).
                let flags = rd(pos + regs::EXP_FLAGS, 2)?;
                let rciep = (flags >> 4) & 0xf == u32::from(regs::EXP_TYPE_RC_END);
                match (flags & u32::from(regs::EXP_FLAGS_VERS) == 1, rciep) {
                    (true, true) => 0xc,
                    (true, false) => 0x14,
                    (false, true) => 0x2c,
                    (false, false) => 0x34,
                }
            }
            cap::HT => {
                if rd(pos + 3, 1)? & 0xe0 != 0 {
                    24
                } else {
                    28
                }
            }
            cap::SATA => {
                if rd(pos + 4, 1)? & 0xf == 0xf {
                    16
                } else {
                    8
                }
            }
            _ => 0,
        })
    }

    /// `vfio_ecap_init`.
    fn scan_ecaps(
        &mut self,
        fabric: &Fabric,
        bdf: Bdf,
        mut vconfig: Option<&mut [u8]>,
    ) -> Result<(), Errno> {
        let rd = |off: u16, n: usize| fabric.config_read(bdf, off, n).map_err(|_| Errno::EIO);
        let mut epos: u16 = 0x100;
        let mut prev: Option<u16> = None;
        let mut kept = 0;
        let mut loops = (self.size - regs::STD_SIZE) / 4;
        while loops > 0 && epos >= 0x100 && usize::from(epos) + 4 <= self.size {
            loops -= 1;
            let header = rd(epos, 4)?;
            let id = (header & 0xffff) as u16;
            let next = ((header >> 20) & 0xffc) as u16;
            let mut len = if id <= ecap::MAX {
                match ecap_length(id) {
                    Some(n) => n,
                    None => ecap_len(fabric, bdf, id, epos)?,
                }
            } else {
                0
            };
            let mut hidden = false;
            if len == 0 {
                if let Some(p) = prev {
                    if let Some(v) = vconfig.as_deref_mut() {
                        let at = usize::from(p);
                        let old = u32::from_le_bytes([v[at], v[at + 1], v[at + 2], v[at + 3]]);
                        let new = (old & !(0xffc << 20)) | (u32::from(next) << 20);
                        v[at..at + 4].copy_from_slice(&new.to_le_bytes());
                    }
                    epos = next;
                    continue;
                }
                len = 4;
                hidden = true;
            }
            let end = (usize::from(epos) + usize::from(len)).min(self.size);
            self.map[usize::from(epos)..end].fill(id as u8);
            if let Some(v) = vconfig.as_deref_mut() {
                fabric
                    .config_read_into(bdf, epos, &mut v[usize::from(epos)..end])
                    .map_err(|_| Errno::EIO)?;
                if hidden {
                    let at = usize::from(epos);
                    let new = header & (0xffc << 20);
                    v[at..at + 4].copy_from_slice(&new.to_le_bytes());
                }
            }
            if !hidden {
                kept += 1;
            }
            prev = Some(epos);
            epos = next;
        }
        if kept == 0 {
            if let Some(v) = vconfig {
                v[0x100..0x104].fill(0);
            }
        }
        Ok(())
    }

    pub(crate) fn owner(&self, pos: u16) -> Owner {
        let id = self.map[usize::from(pos)];
        if pos < 0x40 {
            return Owner::Header;
        }
        if id == MAP_INVALID {
            return Owner::Unassigned;
        }
        let base: u16 = if pos >= 0x100 { 0x100 } else { 0x40 };
        let mut start = pos;
        while start > base && self.map[usize::from(start - 1)] == id {
            start -= 1;
        }
        if pos >= 0x100 {
            return Owner::Ecap(id, start);
        }
        match id {
            cap::PM => Owner::Pm(start),
            cap::EXP => Owner::Exp(start),
            cap::AF => Owner::Af(start),
            cap::MSI => Owner::Msi(start),
            _ => Owner::Cap(id, start),
        }
    }

    /// The length of the chunk that starts at `pos` when `left` bytes remain: at most to
    /// the end of the dword and of the bytes with the same map mark
    /// (`vfio_pci_cap_remaining_dword`), then 4, 2 or 1 by alignment.
    pub(crate) fn chunk(&self, pos: u16, left: usize) -> usize {
        let id = self.map[usize::from(pos)];
        let mut same = 1usize;
        while (usize::from(pos) + same) % 4 != 0 && self.map[usize::from(pos) + same] == id {
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

    /// How a chunk owned by `owner` is read and written.
    pub(crate) fn access(owner: Owner) -> Access {
        match owner {
            Owner::Header | Owner::Pm(_) | Owner::Exp(_) | Owner::Af(_) | Owner::Msi(_) => {
                Access::Perms
            }
            Owner::Cap(cap::PCIX | cap::VPD, _) => Access::Perms,
            Owner::Ecap(id, _) if u16::from(id) == ecap::ERR || u16::from(id) == ecap::PWR => {
                Access::Perms
            }
            Owner::Cap(cap::VNDR, _) => Access::DirectRaw,
            Owner::Ecap(id, _) if u16::from(id) == ecap::VNDR || u16::from(id) == ecap::DVSEC => {
                Access::DirectRaw
            }
            Owner::Cap(..) | Owner::Ecap(..) => Access::Direct,
            Owner::Unassigned => Access::Raw,
        }
    }

    /// The (writable, virtualised) bits of the byte at `pos`, for the owners with
    /// permission tables ([`Access::Perms`]); others have none.
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
                regs::EXP_DEVCTL2 => (0xdf, 0),
                0x29 => (0xff, 0),
                _ => (0, 0),
            },
            Owner::Af(c) => match pos - c {
                1 => (0, 0xff),
                4 => (regs::AF_CTRL_FLR, regs::AF_CTRL_FLR),
                _ => (0, 0),
            },
            Owner::Msi(c) => msi_perm(self.msi_flags.unwrap_or(0), pos - c),
            Owner::Cap(cap::PCIX, c) => match pos - c {
                1 => (0, 0xff),
                // Command, and the ECC control/status dword.
                2 | 3 | 8..=11 => (0xff, 0),
                _ => (0, 0),
            },
            Owner::Cap(cap::VPD, c) => match pos - c {
                1 => (0, 0xff),
                // Address and data: virtualised (the kernel moves the data itself).
                2..=7 => (0xff, 0xff),
                _ => (0, 0),
            },
            Owner::Ecap(id, c) if u16::from(id) == ecap::ERR => aer_perm(pos - c),
            Owner::Ecap(id, c) if u16::from(id) == ecap::PWR => match pos - c {
                0..=3 => (0, 0xff),
                8 => (0xff, 0),
                _ => (0, 0),
            },
            _ => (0, 0),
        }
    }
}

/// How the kernel reaches a chunk's bytes (`vfio_config_do_rw`'s choice of `perm_bits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Through a permission table: virtualised bits from `vconfig`, writable ones to the
    /// hardware (`vfio_default_config_read`/`_write` and the special handlers).
    Perms,
    /// Read from the hardware with the capability's ID and next pointer (an extended one's
    /// whole header) from `vconfig` (`vfio_direct_config_read`); writes dropped.
    Direct,
    /// As [`Access::Direct`], but writes go to the hardware as they are
    /// (`vfio_raw_config_write`: vendor-specific and DVSEC).
    DirectRaw,
    /// Raw both ways (`unassigned_perms`).
    Raw,
}

/// `init_pci_cap_msi_perm`: next pointer virtual; the low byte of the flags, the address
/// and the data virtual and writable; the mask and pending bits writable to the hardware.
#[allow(clippy::match_same_arms)] // one arm per entry of the kernel's table
fn msi_perm(flags: u16, off: u16) -> (u8, u8) {
    let wide = flags & msi::BIT64 != 0;
    let masked = flags & msi::MASKBIT != 0;
    let data = if wide { 0xc } else { 0x8 };
    match off {
        1 => (0, 0xff),
        2 => (0xff, 0xff),
        4..=7 => (0xff, 0xff),
        8..=11 if wide => (0xff, 0xff),
        o if o == data || o == data + 1 => (0xff, 0xff),
        o if masked && o >= data + 4 && o < data + 12 => (0xff, 0),
        _ => (0, 0),
    }
}

/// `init_pci_ext_cap_err_perm`: the header virtual; the uncorrectable status, mask and
/// severity, the correctable status and mask, and ECRC generation/check enable writable.
fn aer_perm(off: u16) -> (u8, u8) {
    const UNC: u32 = 0x0000_0001
        | 0x0000_0010
        | 0x0000_0020
        | 0x0000_1000
        | 0x0000_2000
        | 0x0000_4000
        | 0x0000_8000
        | 0x0001_0000
        | 0x0002_0000
        | 0x0004_0000
        | 0x0008_0000
        | 0x0010_0000
        | 0x0020_0000
        | 0x0040_0000
        | 0x0080_0000
        | 0x0100_0000
        | 0x0200_0000;
    const COR: u32 = 0x0001 | 0x0040 | 0x0080 | 0x0100 | 0x1000 | 0x2000 | 0x4000 | 0x8000;
    const ECRC: u32 = 0x0040 | 0x0100;
    let byte = |m: u32| (m >> (8 * u32::from(off % 4))) as u8;
    match off {
        0..=3 => (0, 0xff),
        4..=0xf => (byte(UNC), 0),
        0x10..=0x17 => (byte(COR), 0),
        0x18..=0x1b => (byte(ECRC), 0),
        _ => (0, 0),
    }
}

/// `vfio_ext_cap_len` for the extended capabilities whose length is read from them.
fn ecap_len(fabric: &Fabric, bdf: Bdf, id: u16, epos: u16) -> Result<u16, Errno> {
    let rd = |off: u16, n: usize| fabric.config_read(bdf, off, n).map_err(|_| Errno::EIO);
    Ok(match id {
        ecap::VNDR | ecap::DVSEC => ((rd(epos + 4, 4)? >> 20) & 0xfff) as u16,
        ecap::VC | ecap::VC9 | ecap::MFVC => {
            // `vfio_vc_cap_len`: the base, one block per VC, and the arbitration table.
            let evcc = rd(epos + 4, 4)? & 0x7;
            let cap2 = rd(epos + 8, 4)?;
            let phases = if cap2 & 0x8 != 0 {
                128
            } else if cap2 & 0x4 != 0 {
                64
            } else if cap2 & 0x2 != 0 {
                32
            } else {
                0
            };
            let mut len = 0x10 + (1 + evcc as u16) * 0x0c;
            if phases != 0 {
                len = len.div_ceil(16) * 16 + phases * 4 / 8;
            }
            len
        }
        ecap::ACS => {
            if rd(epos + 4, 1)? & 0x20 != 0 {
                let bits = rd(epos + 5, 1)? as u16;
                let bits = if bits == 0 {
                    256
                } else {
                    bits.div_ceil(32) * 32
                };
                8 + bits / 8
            } else {
                8
            }
        }
        ecap::REBAR => 4 + ((rd(epos + 8, 1)? as u16 & 0xe0) >> 5) * 8,
        ecap::DPA => 16 + (rd(epos + 4, 1)? as u16 & 0x1f) + 1,
        ecap::TPH => {
            let c = rd(epos + 4, 4)?;
            if c & 0x600 == 0x200 {
                0xc + ((c & 0x07ff_0000) >> 16) as u16 * 2 + 2
            } else {
                0xc
            }
        }
        _ => 0,
    })
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
    /// A VF: no Memory Space bit of its own (`pdev->no_command_memory`).
    pub(crate) no_command_memory: bool,
}

/// `PCI_ROM_ADDRESS`.
pub(crate) const ROM_ADDRESS: u16 = 0x30;

/// The six BAR registers and the ROM BAR.
pub(crate) const BAR_REGS: [u16; 7] = [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, ROM_ADDRESS];

impl VConfig {
    /// The per-open copy (`vfio_config_init`): the hardware's header, each capability the
    /// walk keeps (with the edits of [`Layout::scan`]), a VF's IDs from the PCI core with
    /// interrupt pin 0 and Memory Space set (a VF has no memory enable bit of its own), and
    /// the BARs marked dirty so the first read masks them to their sizes.
    pub(crate) fn init(fabric: &Fabric, bdf: Bdf) -> Result<VConfig, Errno> {
        let f = fabric.function(bdf).map_err(|_| Errno::ENODEV)?;
        let mut bytes = Box::new([0u8; regs::CFG_SIZE]);
        fabric
            .config_read_into(bdf, 0, &mut bytes[..0x40])
            .map_err(|_| Errno::EIO)?;
        let bars_at_open = BAR_REGS.map(|at| {
            let i = usize::from(at);
            u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
        });
        if f.is_vf() {
            bytes[0..2].copy_from_slice(&f.vendor().to_le_bytes());
            bytes[2..4].copy_from_slice(&f.device().to_le_bytes());
            bytes[usize::from(regs::INTERRUPT_PIN)] = 0;
            bytes[usize::from(regs::COMMAND)] |= regs::COMMAND_MEMORY as u8;
        }
        let layout = Layout::scan(fabric, bdf, Some(&mut bytes[..]))?;
        Ok(VConfig {
            bytes,
            layout,
            bar_dirty: true,
            bars_at_open,
            no_command_memory: f.is_vf(),
        })
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

    /// What a user reads in chunk `[pos, pos + n)` (`vfio_config_do_rw`'s read handler):
    /// through a permission table, virtualised bits from `vconfig` and the rest from the
    /// hardware (`vfio_default_config_read`, after `vfio_bar_fixup` in the header); for a
    /// capability without one, the hardware with the ID and next pointer (an extended
    /// capability's header) from `vconfig` (`vfio_direct_config_read`); outside every
    /// capability, the hardware.
    pub(crate) fn read(
        &mut self,
        fabric: &Fabric,
        bdf: Bdf,
        pos: u16,
        n: usize,
    ) -> Result<u32, Errno> {
        let owner = self.layout.owner(pos);
        let hw = |n| fabric.config_read(bdf, pos, n).map_err(|_| Errno::EIO);
        match Layout::access(owner) {
            Access::Perms => {
                if owner == Owner::Header && (regs::BASE_ADDRESS_0..0x34).contains(&pos) {
                    self.bar_fixup(fabric, bdf);
                }
                let (_, virt) = self.masks(pos, n);
                let hw = if virt == u32::MAX >> (32 - 8 * n) {
                    0
                } else {
                    hw(n)?
                };
                let mut val = (self.get(pos, n) & virt) | (hw & !virt);
                if pos == regs::COMMAND && self.no_command_memory {
                    // `vfio_basic_config_read`: the virtual Memory Space bit shows.
                    val |= u32::from(self.command() & regs::COMMAND_MEMORY);
                }
                Ok(val)
            }
            Access::Direct | Access::DirectRaw => {
                let val = hw(n)?;
                let start = match owner {
                    Owner::Cap(_, c) | Owner::Ecap(_, c) => c,
                    _ => pos,
                };
                let virt_bytes = match (pos >= 0x100, pos - start) {
                    (true, 0..=3) => n,
                    (false, 0) if n > 1 => 2,
                    (false, 1) => 1,
                    _ => 0,
                };
                let mask = if virt_bytes == 0 {
                    0
                } else {
                    u32::MAX >> (32 - 8 * virt_bytes)
                };
                Ok((self.get(pos, n) & mask) | (val & !mask))
            }
            Access::Raw => hw(n),
        }
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
