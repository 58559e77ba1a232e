//! Register files of emulated devices whose BAR is not plain memory: what a CPU load or store
//! to the BAR does. A function without a model keeps plain memory in every BAR.
//!
//! `QemuEdu` is QEMU's `edu` teaching device as the QEMU harness runs it (hw/misc/edu.c in
//! QEMU 10, read for this model, and checked against the guest): BAR 0 holds its registers.
//! QEMU's memory core refuses an access of fewer than 4 bytes (it reads 0, a write is
//! dropped); edu itself wants 4 bytes below 0x80 and 4 or 8 from 0x80 on, and answers any
//! other access, or one at an offset that is not a register, with all ones (writes ignored). 0x00 identification (0x010000ed, read-only); 0x04 liveness (a
//! write stores the complement); 0x08 factorial (a write of n reads back n!, 32-bit); 0x20
//! status (only the raise-interrupt-on-factorial bit, 0x80, is writable); 0x24 interrupt status,
//! raised by a write to 0x60 and lowered by a write to 0x64; 0x80, 0x88, 0x90 DMA source,
//! destination, count (a 4-byte write clears the upper half); 0x98 DMA command, taken only with
//! its run bit: the transfer between edu's 4 KiB buffer (device addresses 0x40000–0x40fff) and
//! a bus address runs through the fabric as the device's own DMA (through the IOMMU, faulting
//! where nothing is mapped), and the command reads back done (QEMU runs it 100 ms later; the
//! model at once), raising interrupt 0x100 when the command asks (bit 2). The interrupt status
//! drives the device's interrupt: an MSI on every raise while MSI is enabled in its
//! capability, else the INTx line (PCI Status' Interrupt bit) while any status bit is set.
//! The factorial is computed at once (QEMU's thread shows "computing" meanwhile).
//!
//! `QemuNvme` is the controller-register page of QEMU's `nvme` (hw/nvme/ctrl.c,
//! `nvme_mmio_read`/`nvme_write_bar`/`nvme_process_db`) in BAR 0, below the MSI-X table, as the
//! harness runs it (`cmb_size_mb=1`): reads return the register bytes at any size (0 past the
//! 4 KiB register page: the doorbells read 0). QEMU's memory core widens an access of 1 byte
//! to 2 at its own address (`nvme_mmio_ops` takes 2 to 8 bytes), the upper byte 0; the
//! register an access lands on is the one at its exact offset, and a write at any other
//! offset is dropped. Only INTMS/INTMC (which set and clear one mask both read), CC, AQA and
//! the upper halves of ASQ, ACQ and CMBMSC (32-bit stores whatever the width), and ASQ, ACQ
//! and CMBMSC themselves (stores at the write's widened width) take writes; the rest (CAP,
//! VS, CSTS, CMBLOC, CMBSZ, …) ignore them. Setting CC.EN makes the controller ready
//! (CSTS.RDY) and creates its admin queues unless `nvme_start_ctrl` refuses the admin queue
//! addresses, command set or page size (CSTS.CFS); clearing it resets the controller
//! (`nvme_ctrl_reset`: CC, CSTS and the interrupt mask go to 0, the queues go), and so does
//! a reset of the function (FLR, a bus reset: `DeviceModel::reset`). A shutdown request
//! (CC.SHN) completes at once. A write of CMBMSC with CRE fills in CMBLOC and CMBSZ
//! (`nvme_cmb_enable_regs`: BIR 2, 1 MiB), one without CRE zeroes both; CRE with CMSE maps
//! the buffer at CMBMSC's base address for the controller's own fetches, or, when that 1 MiB
//! would wrap, sets CMBSTS.CBAI instead; none of the buffer's controls is reset. A write of
//! the admin submission queue's tail doorbell (0x1000, 4-byte aligned, the tail inside the
//! queue, the queue created) makes the controller fetch each command from the old head to
//! the new tail, 64 bytes at ASQ + 64 × head: from the buffer when it lies in a mapped CMB,
//! else by its own DMA through the fabric (`nvme_process_sq`); a fetch that fails (Bus Master
//! Enable off, an IOMMU fault) makes the controller fatal (CSTS reads CFS alone). Not
//! modelled: what a fetched command does (it is consumed; no completion is posted and no
//! interrupt raised), I/O queues (only a command creates them), the completion doorbells,
//! NSSR and the PMR controls (the harness's controller has no PMR).
//!
//! `QemuIvshmem` is `ivshmem-plain`'s BAR 0 (hw/misc/ivshmem-pci.c `ivshmem_io_read`,
//! `ivshmem_io_write`; its ops take exactly 4 bytes, so QEMU cuts an 8-byte access in two and
//! widens a narrower one to 4 at its own address): INTRMASK at 0 and INTRSTATUS at 4 take a
//! write at any byte of them as the whole (zero-extended) value; a read reads a register only
//! at its own offset (else 0), and reading INTRSTATUS clears it; IVPOSITION at 8 reads 0, the
//! doorbell at 12 and everything past the registers keep nothing. A reset clears mask and
//! status. Its interrupt (status & mask on INTx) is not modelled.

use crate::memory::SparseMemory;

/// A device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceModel {
    /// QEMU's `edu` device.
    QemuEdu,
    /// QEMU's `nvme` controller.
    QemuNvme,
    /// QEMU's `ivshmem-plain`: BAR 0 is its register file.
    QemuIvshmem,
}

impl DeviceModel {
    /// By the name a fabric file gives it.
    pub fn from_name(name: &str) -> Option<DeviceModel> {
        match name {
            "qemu-edu" => Some(DeviceModel::QemuEdu),
            "qemu-nvme" => Some(DeviceModel::QemuNvme),
            "qemu-ivshmem" => Some(DeviceModel::QemuIvshmem),
            _ => None,
        }
    }

    /// Whether BAR `bar` is the model's register file.
    pub(crate) fn owns(self, bar: u8) -> bool {
        match self {
            DeviceModel::QemuEdu | DeviceModel::QemuNvme | DeviceModel::QemuIvshmem => bar == 0,
        }
    }

    /// What the registers hold at power-on.
    pub(crate) fn power_on(self, mem: &mut SparseMemory) {
        match self {
            DeviceModel::QemuEdu => mem.write(EDU_ID, &0x0100_00ed_u32.to_le_bytes()),
            DeviceModel::QemuNvme => {
                mem.write(NVME_CAP, &0x0240_0820_0f01_07ff_u64.to_le_bytes());
                mem.write(NVME_VS, &0x0001_0400_u32.to_le_bytes());
            }
            DeviceModel::QemuIvshmem => {}
        }
    }

    /// What a reset of the function (FLR, a bus reset, …) does to the registers. edu has no
    /// reset handler in QEMU: everything stays. NVMe runs `nvme_ctrl_reset`: CSTS, the
    /// interrupt mask (INTMS/INTMC) and CC go to 0; AQA, ASQ and ACQ keep what was written.
    pub(crate) fn reset(self, mem: &mut SparseMemory) {
        match self {
            DeviceModel::QemuEdu => {}
            DeviceModel::QemuNvme => nvme_reset(mem),
            // `ivshmem_reset`: the interrupt status and mask go to 0.
            DeviceModel::QemuIvshmem => mem.write(IVSHMEM_INTRMASK, &[0; 8]),
        }
    }

    /// A CPU load of `buf.len()` bytes at `offset`.
    pub(crate) fn load(self, mem: &mut SparseMemory, offset: u64, buf: &mut [u8]) {
        match self {
            DeviceModel::QemuIvshmem => ivshmem_load(mem, offset, buf),
            DeviceModel::QemuEdu => {
                if buf.len() < 4 {
                    buf.fill(0);
                } else if !edu_size_ok(offset, buf.len()) || !EDU_REGS.contains(&offset) {
                    buf.fill(0xff);
                } else {
                    mem.read(offset, buf);
                }
            }
            DeviceModel::QemuNvme => {
                if offset >= NVME_REGS_END {
                    if (NVME_MSIX_TABLE..NVME_MSIX_TABLE_END).contains(&offset) {
                        mem.read(offset, buf);
                    } else {
                        // The doorbells read 0; so does the PBA (no vector is ever pending
                        // here) and what no region of BAR 0 covers.
                        buf.fill(0);
                    }
                } else if offset + buf.len() as u64 > NVME_REGS_END {
                    buf.fill(0);
                } else {
                    mem.read(offset, buf);
                }
            }
        }
    }

    /// A CPU store of `data` at `offset`; what the device must then do outside its
    /// registers (a DMA, an interrupt line change) comes back for the fabric to carry out.
    pub(crate) fn store(self, mem: &mut SparseMemory, offset: u64, data: &[u8]) -> Option<Effect> {
        match self {
            DeviceModel::QemuIvshmem => {
                ivshmem_store(mem, offset, data);
                None
            }
            DeviceModel::QemuEdu => {
                if !edu_size_ok(offset, data.len()) {
                    return None;
                }
                let mut v = [0u8; 8];
                v[..data.len()].copy_from_slice(data);
                let val = u64::from_le_bytes(v);
                let cmd = {
                    let mut c = [0u8; 8];
                    mem.read(EDU_DMA_CMD, &mut c);
                    u64::from_le_bytes(c)
                };
                match offset {
                    0x04 => put32(mem, 0x04, !(val as u32)),
                    // The factorial, computed at once; with status bit 0x80 set the
                    // factorial interrupt (0x1) is raised when it is done (`edu_fact_thread`).
                    0x08 => {
                        let n = val as u32;
                        let f = (1..=n).fold(1u32, u32::wrapping_mul);
                        put32(mem, 0x08, f);
                        if get32(mem, 0x20) & 0x80 != 0 {
                            put32(mem, 0x24, get32(mem, 0x24) | 1);
                            return Some(Effect::Interrupt { raised: true });
                        }
                    }
                    0x20 => {
                        let st = get32(mem, 0x20);
                        put32(mem, 0x20, (st & !0x80) | (val as u32 & 0x80));
                    }
                    0x60 | 0x64 => {
                        let st = get32(mem, 0x24);
                        let new = if offset == 0x60 {
                            st | val as u32
                        } else {
                            st & !(val as u32)
                        };
                        put32(mem, 0x24, new);
                        return Some(Effect::Interrupt {
                            raised: offset == 0x60,
                        });
                    }
                    // The DMA registers stay as they are while a transfer runs.
                    0x80 | 0x88 | 0x90 if cmd & 1 == 0 => mem.write(offset, &val.to_le_bytes()),
                    EDU_DMA_CMD if val & 1 != 0 && cmd & 1 == 0 => {
                        mem.write(EDU_DMA_CMD, &val.to_le_bytes());
                        return Some(Effect::EduDma);
                    }
                    _ => {}
                }
                None
            }
            DeviceModel::QemuNvme => {
                if offset >= NVME_MSIX_TABLE {
                    // The MSI-X table keeps what is written; the PBA is read-only
                    // (`msix_pba_write` drops it) and past both nothing decodes.
                    if offset < NVME_MSIX_TABLE_END {
                        mem.write(offset, data);
                    }
                    return None;
                }
                if offset >= NVME_REGS_END {
                    return nvme_doorbell(mem, offset, data);
                }
                // The memory core widens a 1-byte access to the 2 bytes `nvme_mmio_ops`
                // takes at least, zero-extending what is written.
                let (val, width) = nvme_access(data);
                match offset {
                    NVME_INTMS | NVME_INTMC => {
                        let cur = get32(mem, NVME_INTMS);
                        let new = if offset == NVME_INTMS {
                            cur | val as u32
                        } else {
                            cur & !(val as u32)
                        };
                        put32(mem, NVME_INTMS, new);
                        put32(mem, NVME_INTMC, new);
                    }
                    // `nvme_write_bar`'s CC case: the value is stored; a shutdown request
                    // completes at once (CSTS.SHST = 2) and clearing it clears SHST; setting
                    // EN starts the controller (CSTS.RDY, or CSTS.CFS when `nvme_start_ctrl`
                    // refuses); clearing EN resets it (`nvme_ctrl_reset`: CC reads 0 after).
                    NVME_CC => {
                        let old = get32(mem, NVME_CC);
                        let new = val as u32;
                        put32(mem, NVME_CC, new);
                        let mut csts = get32(mem, NVME_CSTS);
                        let shn = |cc: u32| (cc >> 14) & 3;
                        if shn(new) != 0 && shn(old) == 0 {
                            csts = (csts & !NVME_CSTS_SHST) | (2 << 2);
                        } else if shn(new) == 0 && shn(old) != 0 {
                            csts &= !NVME_CSTS_SHST;
                        }
                        if new & 1 != 0 && old & 1 == 0 {
                            csts = if nvme_start_ok(mem, new) {
                                NvmeAdminSq::create(mem);
                                1
                            } else {
                                2
                            };
                        } else if new & 1 == 0 && old & 1 != 0 {
                            nvme_reset(mem);
                            return None;
                        }
                        put32(mem, NVME_CSTS, csts);
                    }
                    NVME_AQA => put32(mem, NVME_AQA, val as u32),
                    NVME_ASQ | NVME_ACQ => mem.write(offset, &val.to_le_bytes()[..width]),
                    NVME_CMBMSC => nvme_cmbmsc(mem, val, width),
                    o if o == NVME_ASQ + 4 || o == NVME_ACQ + 4 || o == NVME_CMBMSC + 4 => {
                        put32(mem, o, val as u32);
                    }
                    _ => {}
                }
                None
            }
        }
    }

    /// The transfer a started edu DMA command asks for (`edu_dma_timer`), read from its
    /// registers: the bus address (clamped to edu's 28-bit DMA mask, `edu_clamp_addr`), the
    /// offset in its 4 KiB buffer, the length, and the direction. `None` when the buffer
    /// range falls outside the buffer (QEMU logs it and goes on to copy outside its buffer,
    /// which the model does not: the command completes having moved nothing).
    pub(crate) fn edu_transfer(mem: &SparseMemory) -> Option<EduTransfer> {
        let (src, dst, cnt, cmd) = (
            get64(mem, 0x80),
            get64(mem, 0x88),
            get64(mem, 0x90),
            get64(mem, EDU_DMA_CMD),
        );
        let to_bus = cmd & 2 != 0;
        let (bus, local) = if to_bus { (dst, src) } else { (src, dst) };
        let end = local.checked_add(cnt)?;
        if local < EDU_DMA_START || end > EDU_DMA_START + EDU_DMA_SIZE {
            return None;
        }
        Some(EduTransfer {
            bus: bus & EDU_DMA_MASK,
            buf_offset: EDU_DMA_START + (local - EDU_DMA_START),
            len: cnt as usize,
            to_bus,
        })
    }

    /// Ends an edu DMA command: the run bit cleared, and with the command's interrupt bit
    /// the DMA interrupt (0x100) raised. Returns whether it was.
    pub(crate) fn edu_dma_done(mem: &mut SparseMemory) -> bool {
        let mut c = [0u8; 8];
        mem.read(EDU_DMA_CMD, &mut c);
        let cmd = u64::from_le_bytes(c) & !1;
        mem.write(EDU_DMA_CMD, &cmd.to_le_bytes());
        if cmd & 4 != 0 {
            let st = get32(mem, 0x24);
            put32(mem, 0x24, st | EDU_DMA_IRQ);
            return true;
        }
        false
    }

    /// Whether the device's interrupt condition holds (edu: its interrupt status is not 0).
    pub(crate) fn irq_pending(self, mem: &SparseMemory) -> bool {
        match self {
            DeviceModel::QemuEdu => get32(mem, 0x24) != 0,
            // ivshmem's INTx (status & mask) is not modelled.
            DeviceModel::QemuNvme | DeviceModel::QemuIvshmem => false,
        }
    }
}

/// What a store to a model's registers leaves the fabric to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// edu's DMA command was started: run the transfer ([`DeviceModel::edu_transfer`]).
    EduDma,
    /// The NVMe admin submission queue's tail moved: fetch its commands
    /// ([`DeviceModel::nvme_next_fetch`]).
    NvmeFetch,
    /// The interrupt status changed (raised by a write to 0x60, lowered by 0x64).
    Interrupt {
        /// Raised (an MSI is sent on every raise while MSI is enabled).
        raised: bool,
    },
}

/// One edu DMA transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EduTransfer {
    /// The bus address (an IOVA behind an IOMMU).
    pub bus: u64,
    /// Where in the model's memory the buffer range starts.
    pub buf_offset: u64,
    pub len: usize,
    /// From the buffer to the bus address (a DMA write), else from it (a read).
    pub to_bus: bool,
}

/// edu's DMA buffer: 4 KiB at device address 0x40000, not reachable through the BAR.
const EDU_DMA_START: u64 = 0x4_0000;
const EDU_DMA_SIZE: u64 = 4096;
/// edu's default `dma_mask`: 28 bits.
const EDU_DMA_MASK: u64 = (1 << 28) - 1;
/// The interrupt status bit a finished DMA raises.
const EDU_DMA_IRQ: u32 = 0x100;

/// ivshmem's registers (hw/misc/ivshmem-pci.c): the interrupt mask and status, the
/// position (read-only) and the doorbell (write-only, nothing to ring without peers).
const IVSHMEM_INTRMASK: u64 = 0x00;
const IVSHMEM_INTRSTATUS: u64 = 0x04;
const IVSHMEM_IVPOSITION: u64 = 0x08;

/// The 4-byte units QEMU's memory core cuts an access of `n` bytes at `offset` into for a
/// device whose ops take 4 bytes (`memory_access_size`: at most 4 at a time;
/// `access_with_adjusted_size`: each widened to 4 at its own address); vfio only makes
/// naturally aligned accesses, so each unit starts inside the access.
fn ivshmem_units(offset: u64, n: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    (0..n)
        .step_by(4)
        .map(move |at| (offset + at as u64, at, (n - at).min(4)))
}

/// `ivshmem_io_read`: only an access at a register's own offset reads it (anything else, 0);
/// reading the status clears it.
fn ivshmem_load(mem: &mut SparseMemory, offset: u64, buf: &mut [u8]) {
    for (addr, at, n) in ivshmem_units(offset, buf.len()) {
        let mut v = [0u8; 4];
        match addr {
            IVSHMEM_INTRMASK | IVSHMEM_IVPOSITION => mem.read(addr, &mut v),
            IVSHMEM_INTRSTATUS => {
                mem.read(addr, &mut v);
                mem.write(addr, &[0; 4]);
            }
            _ => {}
        }
        buf[at..at + n].copy_from_slice(&v[..n]);
    }
}

/// `ivshmem_io_write`: the address rounded down to its register (`addr &= 0xfc`), and the
/// register takes the whole value, zero-extended from a narrower write; the position and
/// the doorbell keep nothing.
fn ivshmem_store(mem: &mut SparseMemory, offset: u64, data: &[u8]) {
    for (addr, at, n) in ivshmem_units(offset, data.len()) {
        let reg = addr & 0xfc;
        if reg == IVSHMEM_INTRMASK || reg == IVSHMEM_INTRSTATUS {
            let mut v = [0u8; 4];
            v[..n].copy_from_slice(&data[at..at + n]);
            mem.write(reg, &v);
        }
    }
}

const NVME_CAP: u64 = 0x00;
const NVME_VS: u64 = 0x08;
const NVME_INTMS: u64 = 0x0c;
const NVME_INTMC: u64 = 0x10;
const NVME_CC: u64 = 0x14;
const NVME_CSTS: u64 = 0x1c;
const NVME_AQA: u64 = 0x24;
const NVME_ASQ: u64 = 0x28;
const NVME_ACQ: u64 = 0x30;
/// The register page ends here; the doorbells follow.
const NVME_REGS_END: u64 = 0x1000;
/// From here on BAR 0 is the MSI-X table (plain to this model; vfio guards it), then the PBA
/// at 0x3000 (the MSI-X capability's table and PBA offsets, as QEMU's NVMe lays them out).
const NVME_MSIX_TABLE: u64 = 0x2000;
/// The table's end: 65 vectors of 16 bytes (QEMU's NVMe: one per queue pair and the admin
/// queue, `max_ioqpairs` 64).
const NVME_MSIX_TABLE_END: u64 = NVME_MSIX_TABLE + 65 * 16;

/// CSTS.SHST, the shutdown status field.
const NVME_CSTS_SHST: u32 = 3 << 2;
/// CSTS.CFS, controller fatal status.
const NVME_CSTS_CFS: u32 = 2;
/// The controller memory buffer's registers: location, size, memory space control, status.
const NVME_CMBLOC: u64 = 0x38;
const NVME_CMBSZ: u64 = 0x3c;
const NVME_CMBMSC: u64 = 0x50;
const NVME_CMBSTS: u64 = 0x58;
/// CAP.CMBS: the controller has a memory buffer (QEMU sets it for `cmb_size_mb`).
const NVME_CAP_CMBS: u64 = 1 << 57;
/// CMBMSC.CRE (the location and size registers enabled) and CMBMSC.CMSE (the buffer mapped
/// in the controller's memory space).
const NVME_CMBMSC_CRE: u64 = 1;
const NVME_CMBMSC_CMSE: u64 = 2;
/// What `nvme_cmb_enable_regs` sets: CMBLOC BIR 2, CDPMLS, CDPCILS; CMBSZ SQS, LISTS, RDS,
/// WDS, a size unit of 1 MiB and a size of 1 (`cmb_size_mb=1`).
const NVME_CMBLOC_ENABLED: u32 = 0x62;
const NVME_CMBSZ_ENABLED: u32 = 0x121d;
/// The buffer's size: 1 MiB.
const NVME_CMB_SIZE: u64 = 1 << 20;
/// A submission queue entry: 64 bytes (`NVME_SQES` 6).
const NVME_SQE_SIZE: u64 = 64;
/// Controller state no register shows, kept in the model's memory far past any BAR 0 the
/// model answers (its load and store stop at the MSI-X table): the admin submission queue,
/// whether the buffer is mapped (`cmb.cmse`), and where (`cmb.cba`).
const NVME_SQ_STATE: u64 = 0x100_0000;
const NVME_CMB_MAPPED: u64 = NVME_SQ_STATE + 0x40;
const NVME_CMB_BASE: u64 = NVME_SQ_STATE + 0x48;

/// `nvme_ctrl_reset` on the registers: CSTS, the interrupt mask and CC go to 0 and the
/// queues are freed; AQA, ASQ, ACQ and the controller memory buffer's controls stay.
fn nvme_reset(mem: &mut SparseMemory) {
    for reg in [NVME_CSTS, NVME_INTMS, NVME_INTMC, NVME_CC] {
        put32(mem, reg, 0);
    }
    NvmeAdminSq::default().save(mem);
}

/// The value and width of a write as `nvme_mmio_ops` receives it: at least 2 bytes (the
/// memory core widens a 1-byte access, the upper byte 0), at most 8.
fn nvme_access(data: &[u8]) -> (u64, usize) {
    let n = data.len().min(8);
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(v), n.max(2))
}

/// `nvme_write_bar`'s CMBMSC case (CAP.CMBS is set): the write kept at its width; CRE fills
/// in CMBLOC and CMBSZ (`nvme_cmb_enable_regs` sets its bits in them), and with CMSE maps the
/// buffer at the base address CMBMSC then holds, unless its 1 MiB would wrap (CMBSTS.CBAI,
/// the buffer left unmapped); without CRE both read 0 again. Any write first unmaps it.
fn nvme_cmbmsc(mem: &mut SparseMemory, val: u64, width: usize) {
    if get64(mem, NVME_CAP) & NVME_CAP_CMBS == 0 {
        return;
    }
    mem.write(NVME_CMBMSC, &val.to_le_bytes()[..width]);
    put32(mem, NVME_CMB_MAPPED, 0);
    if val & NVME_CMBMSC_CRE == 0 {
        put32(mem, NVME_CMBLOC, 0);
        put32(mem, NVME_CMBSZ, 0);
        return;
    }
    put32(
        mem,
        NVME_CMBLOC,
        get32(mem, NVME_CMBLOC) | NVME_CMBLOC_ENABLED,
    );
    put32(mem, NVME_CMBSZ, get32(mem, NVME_CMBSZ) | NVME_CMBSZ_ENABLED);
    if val & NVME_CMBMSC_CMSE != 0 {
        let base = get64(mem, NVME_CMBMSC) & !0xfff;
        if base.checked_add(NVME_CMB_SIZE).is_none() {
            put32(mem, NVME_CMBSTS, get32(mem, NVME_CMBSTS) | 1);
            return;
        }
        put32(mem, NVME_CMB_MAPPED, 1);
        mem.write(NVME_CMB_BASE, &base.to_le_bytes());
    }
}

/// `nvme_process_db` for a write at or past 0x1000: one 4-byte aligned doorbell per queue
/// and direction, the submission queue's tail first. Only the admin submission queue's
/// (0x1000) does anything here: a misaligned write, a queue that does not exist (no command
/// creates one here) and a tail at or past the queue's size are ignored, and the completion
/// doorbells move nothing a register shows.
fn nvme_doorbell(mem: &mut SparseMemory, offset: u64, data: &[u8]) -> Option<Effect> {
    if offset != NVME_REGS_END {
        return None;
    }
    let mut sq = NvmeAdminSq::load(mem);
    // `nvme_process_db` takes the value as a 32-bit int; the tail is its low 16 bits.
    let tail = (nvme_access(data).0 & 0xffff) as u32;
    if !sq.live || tail >= sq.size {
        return None;
    }
    sq.tail = tail;
    sq.save(mem);
    Some(Effect::NvmeFetch)
}

/// The admin submission queue as `nvme_start_ctrl` creates it (`nvme_init_sq`): its size
/// (AQA.ASQS + 1), base address (ASQ at the start), head and tail. Kept in the model's memory
/// past the BAR, where no access reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NvmeAdminSq {
    live: bool,
    size: u32,
    head: u32,
    tail: u32,
    base: u64,
}

impl NvmeAdminSq {
    fn load(mem: &SparseMemory) -> NvmeAdminSq {
        NvmeAdminSq {
            live: get32(mem, NVME_SQ_STATE) != 0,
            size: get32(mem, NVME_SQ_STATE + 4),
            head: get32(mem, NVME_SQ_STATE + 8),
            tail: get32(mem, NVME_SQ_STATE + 12),
            base: get64(mem, NVME_SQ_STATE + 16),
        }
    }

    fn save(self, mem: &mut SparseMemory) {
        put32(mem, NVME_SQ_STATE, u32::from(self.live));
        put32(mem, NVME_SQ_STATE + 4, self.size);
        put32(mem, NVME_SQ_STATE + 8, self.head);
        put32(mem, NVME_SQ_STATE + 12, self.tail);
        mem.write(NVME_SQ_STATE + 16, &self.base.to_le_bytes());
    }

    /// A successful start: the queue from AQA and ASQ, empty.
    fn create(mem: &mut SparseMemory) {
        NvmeAdminSq {
            live: true,
            size: (get32(mem, NVME_AQA) & 0xfff) + 1,
            head: 0,
            tail: 0,
            base: get64(mem, NVME_ASQ),
        }
        .save(mem);
    }
}

/// Where the NVMe controller fetches its next command from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NvmeFetch {
    /// From its own controller memory buffer (BAR 2) at this offset: no DMA.
    Cmb(u64),
    /// By DMA from this bus address.
    Dma(u64),
}

impl DeviceModel {
    /// The next command the NVMe admin submission queue holds (head short of the tail), and
    /// where `nvme_addr_read` reads its 64 bytes from; `None` when the queue is empty or
    /// gone.
    pub(crate) fn nvme_next_fetch(mem: &SparseMemory) -> Option<NvmeFetch> {
        let sq = NvmeAdminSq::load(mem);
        if !sq.live || sq.head == sq.tail {
            return None;
        }
        // `sq->dma_addr + (head << NVME_SQES)` in 64 bits. The base is page aligned (the
        // start refused any other), so an entry never runs past the top of the address space
        // (`nvme_addr_read`'s wrap check cannot fire here).
        let at = sq.base.wrapping_add(u64::from(sq.head) * NVME_SQE_SIZE);
        let last = at + (NVME_SQE_SIZE - 1);
        let base = get64(mem, NVME_CMB_BASE);
        let in_cmb = |a: u64| a >= base && a - base < NVME_CMB_SIZE;
        if get32(mem, NVME_CMBSZ) != 0
            && get32(mem, NVME_CMB_MAPPED) != 0
            && in_cmb(at)
            && in_cmb(last)
        {
            return Some(NvmeFetch::Cmb(at - base));
        }
        Some(NvmeFetch::Dma(at))
    }

    /// Ends one fetch: a fetched command is consumed (the head moves on); a failed one makes
    /// the controller fatal (CSTS is CFS alone) and the queue stops where it is.
    pub(crate) fn nvme_fetched(mem: &mut SparseMemory, ok: bool) {
        let mut sq = NvmeAdminSq::load(mem);
        if ok {
            sq.head = (sq.head + 1) % sq.size.max(1);
        } else {
            put32(mem, NVME_CSTS, NVME_CSTS_CFS);
        }
        sq.save(mem);
    }
}

/// The checks of QEMU 10.0's `nvme_start_ctrl` that registers decide, in its order: the admin
/// queues aligned to the page size CC.MPS selects, a command set CAP.CSS offers, a page size
/// inside CAP.MPSMIN..=MPSMAX. (10.0 does not yet refuse zero admin queue sizes: the guest
/// showed a controller with AQA = 0 become ready.)
fn nvme_start_ok(mem: &SparseMemory, cc: u32) -> bool {
    let cap = get64(mem, NVME_CAP);
    let mps = u64::from((cc >> 7) & 0xf);
    let page = 1u64 << (mps + 12);
    let css = (cc >> 4) & 7;
    get64(mem, NVME_ASQ) & (page - 1) == 0
        && get64(mem, NVME_ACQ) & (page - 1) == 0
        && (cap >> 37) & 0xff & (1 << css) != 0
        && mps >= (cap >> 48) & 0xf
        && mps <= (cap >> 52) & 0xf
}

/// A little-endian 64-bit register.
fn get64(mem: &SparseMemory, at: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read(at, &mut b);
    u64::from_le_bytes(b)
}

/// A little-endian 32-bit register.
fn get32(mem: &SparseMemory, at: u64) -> u32 {
    let mut b = [0u8; 4];
    mem.read(at, &mut b);
    u32::from_le_bytes(b)
}

fn put32(mem: &mut SparseMemory, at: u64, x: u32) {
    mem.write(at, &x.to_le_bytes());
}

const EDU_ID: u64 = 0x00;
const EDU_DMA_CMD: u64 = 0x98;
/// The offsets edu answers a read at.
const EDU_REGS: [u64; 9] = [0x00, 0x04, 0x08, 0x20, 0x24, 0x80, 0x88, 0x90, 0x98];

fn edu_size_ok(offset: u64, size: usize) -> bool {
    if offset < 0x80 {
        size == 4
    } else {
        size == 4 || size == 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(mem: &mut SparseMemory, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        DeviceModel::QemuEdu.load(mem, at, &mut b);
        b
    }

    #[test]
    fn edu_registers_answer_as_the_guest_showed() {
        let mut m = SparseMemory::new();
        let edu = DeviceModel::QemuEdu;
        edu.power_on(&mut m);
        assert_eq!(rd(&mut m, 0, 4), 0x0100_00ed_u32.to_le_bytes());
        edu.store(&mut m, 0, &[0; 4]);
        assert_eq!(rd(&mut m, 0, 4), 0x0100_00ed_u32.to_le_bytes(), "read-only");
        edu.store(&mut m, 4, &0x1122_3344_u32.to_le_bytes());
        assert_eq!(rd(&mut m, 4, 4), 0xeedd_ccbb_u32.to_le_bytes());
        assert_eq!(rd(&mut m, 4, 2), [0, 0], "narrower than 4 bytes: refused");
        edu.store(&mut m, 4, &[0x55]);
        assert_eq!(rd(&mut m, 4, 4), 0xeedd_ccbb_u32.to_le_bytes());
        assert_eq!(rd(&mut m, 0, 8), [0xff; 8], "8 bytes below 0x80");
        assert_eq!(rd(&mut m, 0x0c, 4), [0xff; 4], "no register");
        edu.store(&mut m, 8, &5u32.to_le_bytes());
        assert_eq!(rd(&mut m, 8, 4), 120u32.to_le_bytes());
        edu.store(&mut m, 0x80, &u64::MAX.to_le_bytes());
        edu.store(&mut m, 0x80, &0x1234u32.to_le_bytes());
        assert_eq!(
            rd(&mut m, 0x80, 8),
            0x1234u64.to_le_bytes(),
            "a 4-byte write clears the top"
        );
        edu.store(&mut m, 0x98, &2u64.to_le_bytes());
        assert_eq!(rd(&mut m, 0x98, 8), [0; 8], "no run bit: ignored");
        assert_eq!(
            edu.store(&mut m, 0x98, &3u64.to_le_bytes()),
            Some(Effect::EduDma),
            "the transfer is the fabric's to run"
        );
        assert_eq!(
            rd(&mut m, 0x98, 8),
            3u64.to_le_bytes(),
            "running until it has"
        );
        edu.store(&mut m, 0x80, &0x99u32.to_le_bytes());
        assert_eq!(
            rd(&mut m, 0x80, 8),
            0x1234u64.to_le_bytes(),
            "kept while running"
        );
        assert!(!DeviceModel::edu_dma_done(&mut m), "no interrupt asked for");
        assert_eq!(rd(&mut m, 0x98, 8), 2u64.to_le_bytes(), "done");
        assert_eq!(
            edu.store(&mut m, 0x60, &0x11u32.to_le_bytes()),
            Some(Effect::Interrupt { raised: true })
        );
        edu.store(&mut m, 0x64, &0x01u32.to_le_bytes());
        assert_eq!(rd(&mut m, 0x24, 4), 0x10u32.to_le_bytes());
        assert!(edu.irq_pending(&m));
    }

    #[test]
    fn nvme_registers_take_only_their_writable_fields() {
        let mut m = SparseMemory::new();
        let nvme = DeviceModel::QemuNvme;
        nvme.power_on(&mut m);
        let rd = |m: &mut SparseMemory, at: u64, n: usize| {
            let mut b = vec![0u8; n];
            nvme.load(m, at, &mut b);
            b
        };
        nvme.store(&mut m, 0, &[0; 8]);
        assert_eq!(rd(&mut m, 0, 8), 0x0240_0820_0f01_07ff_u64.to_le_bytes());
        nvme.store(&mut m, 0x0c, &5u32.to_le_bytes());
        nvme.store(&mut m, 0x10, &1u32.to_le_bytes());
        assert_eq!(rd(&mut m, 0x0c, 8), [4, 0, 0, 0, 4, 0, 0, 0]);
        nvme.store(&mut m, 0x14, &1u32.to_le_bytes());
        assert_eq!(rd(&mut m, 0x1c, 4), 1u32.to_le_bytes(), "ready");
        nvme.store(&mut m, 0x14, &0u32.to_le_bytes());
        assert_eq!(rd(&mut m, 0x1c, 4), [0; 4]);
        nvme.store(&mut m, 0x1000, &[0xaa; 4]);
        assert_eq!(rd(&mut m, 0x1000, 4), [0; 4], "the doorbells read 0");
        assert_eq!(
            rd(&mut m, 0xffc, 8),
            [0; 8],
            "a read past the register page"
        );
    }

    #[test]
    fn nvme_widens_a_byte_write_to_two_and_stores_asq_acq_cmbmsc_at_that_width() {
        let mut m = SparseMemory::new();
        let nvme = DeviceModel::QemuNvme;
        nvme.power_on(&mut m);
        let rd = |m: &mut SparseMemory, at: u64| {
            let mut b = [0u8; 8];
            nvme.load(m, at, &mut b);
            u64::from_le_bytes(b)
        };
        for reg in [NVME_ASQ, NVME_ACQ, NVME_CMBMSC] {
            nvme.store(&mut m, reg, &0x8877_6655_4433_2211_u64.to_le_bytes());
            nvme.store(&mut m, reg, &[0x55]);
            assert_eq!(rd(&mut m, reg), 0x8877_6655_4433_0055, "{reg:#x}: 2 bytes");
            nvme.store(&mut m, reg + 1, &[0x99]);
            nvme.store(&mut m, reg + 2, &[0xbb, 0xaa]);
            assert_eq!(
                rd(&mut m, reg),
                0x8877_6655_4433_0055,
                "{reg:#x}: not a register"
            );
            nvme.store(&mut m, reg + 4, &[0x99]);
            assert_eq!(
                rd(&mut m, reg),
                0x99_4433_0055,
                "{reg:#x}: upper half, 32 bits"
            );
        }
        nvme.store(&mut m, NVME_AQA, &0x001f_001f_u32.to_le_bytes());
        nvme.store(&mut m, NVME_AQA, &[0x0a]);
        assert_eq!(get32(&m, NVME_AQA), 0x0a, "AQA: a 32-bit store");
    }

    #[test]
    fn nvme_cmbmsc_enables_and_zeroes_cmbloc_cmbsz_and_flags_a_wrapping_base() {
        let mut m = SparseMemory::new();
        let nvme = DeviceModel::QemuNvme;
        nvme.power_on(&mut m);
        let loc_sz = |m: &SparseMemory| (get32(m, NVME_CMBLOC), get32(m, NVME_CMBSZ));
        assert_eq!(loc_sz(&m), (0, 0), "not enabled at power-on");
        nvme.store(&mut m, NVME_CMBMSC, &1u64.to_le_bytes());
        assert_eq!(loc_sz(&m), (0x62, 0x121d));
        nvme.store(&mut m, NVME_CMBLOC, &0u32.to_le_bytes());
        nvme.store(&mut m, NVME_CMBSZ, &u32::MAX.to_le_bytes());
        assert_eq!(loc_sz(&m), (0x62, 0x121d), "read-only");
        nvme.store(&mut m, NVME_CMBMSC, &0x4000u16.to_le_bytes());
        assert_eq!(loc_sz(&m), (0, 0), "no CRE");
        nvme.store(&mut m, NVME_CMBMSC, &0x4000_0003_u64.to_le_bytes());
        assert_eq!(get32(&m, NVME_CMB_MAPPED), 1);
        assert_eq!(get32(&m, NVME_CMBSTS), 0);
        nvme.store(
            &mut m,
            NVME_CMBMSC,
            &0xffff_ffff_ffff_f003_u64.to_le_bytes(),
        );
        assert_eq!(get32(&m, NVME_CMBSTS), 1, "CBAI: the 1 MiB would wrap");
        assert_eq!(get32(&m, NVME_CMB_MAPPED), 0, "and it is not mapped");
        assert_eq!(loc_sz(&m), (0x62, 0x121d));
        nvme.reset(&mut m);
        assert_eq!(
            get64(&m, NVME_CMBMSC),
            0xffff_ffff_ffff_f003,
            "kept by a reset"
        );
        assert_eq!(get32(&m, NVME_CMBSTS), 1);
        // Without CAP.CMBS the register keeps nothing.
        let mut plain = SparseMemory::new();
        plain.write(NVME_CAP, &0x0040_0820_0f01_07ff_u64.to_le_bytes());
        nvme.store(&mut plain, NVME_CMBMSC, &1u64.to_le_bytes());
        assert_eq!((get64(&plain, NVME_CMBMSC), loc_sz(&plain)), (0, (0, 0)));
    }

    #[test]
    fn nvme_admin_doorbell_queues_fetches_only_for_a_live_queue_and_a_tail_inside_it() {
        let mut m = SparseMemory::new();
        let nvme = DeviceModel::QemuNvme;
        nvme.power_on(&mut m);
        let ring = |m: &mut SparseMemory, at: u64, v: &[u8]| nvme.store(m, at, v);
        nvme.store(&mut m, NVME_AQA, &3u32.to_le_bytes());
        nvme.store(&mut m, NVME_ASQ, &0x1000u64.to_le_bytes());
        assert_eq!(
            ring(&mut m, 0x1000, &1u32.to_le_bytes()),
            None,
            "no queue yet"
        );
        nvme.store(&mut m, NVME_CC, &0x0046_0001_u32.to_le_bytes());
        nvme.store(&mut m, NVME_ASQ, &0x9000u64.to_le_bytes());
        assert_eq!(
            ring(&mut m, 0x1000, &4u32.to_le_bytes()),
            None,
            "tail = size"
        );
        assert_eq!(ring(&mut m, 0x1004, &1u32.to_le_bytes()), None);
        assert_eq!(ring(&mut m, 0x1001, &[1]), None);
        assert_eq!(ring(&mut m, 0x1008, &1u32.to_le_bytes()), None);
        assert_eq!(
            ring(&mut m, 0x1000, &0x0001_0003_u32.to_le_bytes()),
            Some(Effect::NvmeFetch),
            "the tail is the low 16 bits"
        );
        let next = DeviceModel::nvme_next_fetch(&m);
        assert_eq!(
            next,
            Some(NvmeFetch::Dma(0x1000)),
            "ASQ as the start found it"
        );
        DeviceModel::nvme_fetched(&mut m, true);
        assert_eq!(
            DeviceModel::nvme_next_fetch(&m),
            Some(NvmeFetch::Dma(0x1040))
        );
        DeviceModel::nvme_fetched(&mut m, false);
        assert_eq!(get32(&m, NVME_CSTS), NVME_CSTS_CFS);
        assert_eq!(
            DeviceModel::nvme_next_fetch(&m),
            Some(NvmeFetch::Dma(0x1040)),
            "the head stays where the fetch failed"
        );
        nvme.store(&mut m, NVME_CC, &0u32.to_le_bytes());
        assert_eq!(DeviceModel::nvme_next_fetch(&m), None, "freed by the reset");
        // The entry address is computed in 64 bits: a queue at the top of the address space
        // goes on at 0 (the start's alignment keeps every entry whole).
        nvme.store(&mut m, NVME_AQA, &0xfffu32.to_le_bytes());
        nvme.store(&mut m, NVME_ASQ, &(!0xfff_u64).to_le_bytes());
        nvme.store(&mut m, NVME_CC, &0x0046_0001_u32.to_le_bytes());
        nvme.store(&mut m, 0x1000, &65u32.to_le_bytes());
        for _ in 0..63 {
            DeviceModel::nvme_fetched(&mut m, true);
        }
        let top = DeviceModel::nvme_next_fetch(&m);
        assert_eq!(top, Some(NvmeFetch::Dma(u64::MAX - 63)));
        DeviceModel::nvme_fetched(&mut m, true);
        assert_eq!(DeviceModel::nvme_next_fetch(&m), Some(NvmeFetch::Dma(0)));
    }
}
