//! The user's config-space reads and writes as they reach a vfio-pci device
//! (drivers/vfio/pci/vfio_pci_config.c: `vfio_config_do_rw` and the COMMAND, PM, PCIe and
//! AF handlers that revoke, change power state or reset). The virtual config space they
//! work on is [`crate::config`]. Locking: see [`super`].

use super::{
    Dev, DeviceFd, Errno, MemGuard, Ordering, Owner, PowerState, VConfig, irqs, regs, vcfg,
};

/// The per-open config copy (there while the device is open).
fn vc<'a>(m: &'a mut MemGuard<'_>) -> Result<&'a mut VConfig, Errno> {
    m.vconfig.as_mut().ok_or(Errno::EINVAL)
}

/// DevCtl's Max_Read_Request_Size field.
const EXP_DEVCTL_READRQ: u16 = 0x7000;
/// DevCtl's Max_Payload_Size field.
const EXP_DEVCTL_PAYLOAD: u16 = 0x00e0;

impl Dev {
    /// `pcie_set_readrq(max(rq, pcie_get_mps))` as `vfio_exp_config_write` calls it: the
    /// hardware's DevCtl gets the larger of the requested read size and the payload size
    /// the device runs with; a size past 4096 (the reserved encodings 6 and 7) changes
    /// nothing (`EINVAL`, which the caller ignores). The default bus configuration clamps
    /// nothing further.
    fn set_readrq(&self, cap: u16, rq: u32) {
        let (f, b) = (&*self.fabric, self.bdf);
        let Ok(hw) = f.config_read(b, cap + regs::EXP_DEVCTL, 2) else {
            return;
        };
        let mps = 128u32 << ((hw as u16 & EXP_DEVCTL_PAYLOAD) >> 5);
        let rq = rq.max(mps);
        if rq > 4096 {
            return;
        }
        let field = (rq.trailing_zeros() - 7) << 12;
        let new = (hw & !u32::from(EXP_DEVCTL_READRQ)) | field;
        if new != hw {
            let _ = f.config_write(b, cap + regs::EXP_DEVCTL, 2, new);
        }
    }
    pub(super) fn unrevoke_if_enabled(&self, m: &mut MemGuard<'_>) {
        if self.memory_enabled(m) {
            m.move_bufs(false);
        }
    }

    /// Unrevokes after a user's config write if memory is enabled — never while runtime low
    /// power is engaged (divergence 6).
    pub(super) fn unrevoke_after_write(&self, m: &mut MemGuard<'_>) {
        if !m.engaged {
            self.unrevoke_if_enabled(m);
        }
    }

    /// One chunk of a user's config write (`vfio_pci_config_rw_single`).
    #[allow(clippy::many_single_char_names)]
    pub(super) fn write_chunk(
        &self,
        m: &mut MemGuard<'_>,
        pos: u16,
        n: usize,
        val: u32,
    ) -> Result<(), Errno> {
        let (f, b) = (&*self.fabric, self.bdf);
        let owner = vc(m)?.layout.owner(pos);
        match owner {
            Owner::Header if pos == regs::COMMAND => {
                // `vfio_basic_config_write`: the memory rules for a chunk that starts at
                // COMMAND (1, 2 or 4 bytes); the new command is the written value.
                let new_cmd = val as u16;
                let new_mem = new_cmd & regs::COMMAND_MEMORY != 0;
                if !new_mem {
                    m.move_bufs(true);
                }
                let (virt, phys) = (vc(m)?.command(), self.command_hw());
                let bit = |c: u16, b: u16| c & b != 0;
                let (mem, io) = (regs::COMMAND_MEMORY, regs::COMMAND_IO);
                // A backdoor reset lost the BARs (the user enables decode the copy says is
                // on, the hardware says off), or a saved BAR no longer matches the hardware
                // (`vfio_need_bar_restore`): put them back before decoding. A VF has none of
                // its own (`vfio_bar_restore` returns at once).
                let lost = (bit(new_cmd, mem) && bit(virt, mem) && !bit(phys, mem))
                    || (bit(new_cmd, io) && bit(virt, io) && !bit(phys, io))
                    || self.bars_moved(m);
                if lost && !self.is_vf {
                    self.restore_bars(m);
                }
                vc(m)?.default_write(f, b, pos, n, val)?;
                let mask = regs::COMMAND_MEMORY | regs::COMMAND_IO;
                let v = vc(m)?;
                let cmd = (v.command() & !mask) | (new_cmd & mask);
                v.set(regs::COMMAND, 2, u32::from(cmd));
                self.unrevoke_after_write(m);
            }
            Owner::Header => {
                let v = vc(m)?;
                v.default_write(f, b, pos, n, val)?;
                if (regs::BASE_ADDRESS_0..0x34).contains(&pos) {
                    v.bar_dirty = true;
                }
            }
            Owner::Pm(cap) => {
                vc(m)?.default_write(f, b, pos, n, val)?;
                if pos == cap + regs::PM_CTRL {
                    // `vfio_lock_and_set_power_state`.
                    let state = val as u16 & regs::PM_CTRL_STATE_MASK;
                    if state >= 3 {
                        m.move_bufs(true);
                    }
                    // `vfio_pci_set_power_state`, its result ignored: a PF with SR-IOV
                    // enabled refuses any state but D0 (`EBUSY`), and stays as it is.
                    if !m.engaged && (state == 0 || !self.sriov_active) {
                        self.set_power(PowerState::from_bits(state));
                    }
                    self.unrevoke_after_write(m);
                }
            }
            Owner::Exp(cap) | Owner::Af(cap) => {
                // `vfio_exp_config_write` / `vfio_af_config_write`: after the write, a set
                // (virtualised) FLR bit is cleared, and the function reset if its capability
                // register advertises FLR (for AF, FLR and TP).
                let v = vc(m)?;
                let is_exp = matches!(owner, Owner::Exp(_));
                let readrq = v.get(cap + regs::EXP_DEVCTL, 2) as u16 & EXP_DEVCTL_READRQ;
                v.default_write(f, b, pos, n, val)?;
                let (ctl, width, bit, cap_at, cap_width, need) = if is_exp {
                    (
                        regs::EXP_DEVCTL,
                        2,
                        u32::from(regs::EXP_DEVCTL_BCR_FLR),
                        regs::EXP_DEVCAP,
                        4,
                        regs::EXP_DEVCAP_FLR,
                    )
                } else {
                    (
                        regs::AF_CTRL,
                        1,
                        u32::from(regs::AF_CTRL_FLR),
                        regs::AF_CAP,
                        1,
                        u32::from(regs::AF_CAP_FLR | regs::AF_CAP_TP),
                    )
                };
                let c = v.get(cap + ctl, width);
                if c & bit != 0 {
                    v.set(cap + ctl, width, c & !bit);
                    let has = f.config_read(b, cap + cap_at, cap_width).unwrap_or(0);
                    if has & need == need {
                        self.config_flr(m);
                    }
                }
                // The Max_Read_Request_Size the user wrote (virtual) reaches the hardware,
                // at least the device's MPS (`pcie_set_readrq(max(rq, pcie_get_mps))`).
                let v = vc(m)?;
                let now = v.get(cap + regs::EXP_DEVCTL, 2) as u16 & EXP_DEVCTL_READRQ;
                if is_exp && now != readrq {
                    self.set_readrq(cap, 128 << (now >> 12));
                }
            }
            Owner::Msi(cap) => {
                // `vfio_msi_config_write`: the default write, then, if the chunk reaches
                // the flags (by the kernel's test, which a write ending just before them
                // passes too), the flags are fixed up in `vconfig` and written to the
                // hardware: MSI Enable cleared unless MSI is the active interrupt type (set
                // up through VFIO_DEVICE_SET_IRQS) and the queue size cut to `msi_qmax`.
                let v = vc(m)?;
                v.default_write(f, b, pos, n, val)?;
                let off = pos - cap;
                if off <= 2 && usize::from(off) + n >= 2 {
                    let qmax = self.msi_qmax.load(Ordering::Acquire);
                    let mut flags = v.get(cap + 2, 2) as u16;
                    if self.irq_type.load(Ordering::Acquire) != irqs::MSI {
                        flags &= !vcfg::msi::ENABLE;
                    }
                    let qsize = vcfg::msi::QSIZE;
                    if (flags & qsize) >> 4 > qmax {
                        flags = (flags & !qsize) | (qmax << 4);
                    }
                    v.set(cap + 2, 2, u32::from(flags));
                    f.config_write(b, cap + 2, 2, u32::from(flags))
                        .map_err(|_| Errno::EIO)?;
                }
            }
            Owner::Cap(..) | Owner::Ecap(..) | Owner::Unassigned => {
                match vcfg::Layout::access(owner) {
                    vcfg::Access::Perms => vc(m)?.default_write(f, b, pos, n, val)?,
                    vcfg::Access::Raw | vcfg::Access::DirectRaw => {
                        f.config_write(b, pos, n, val).map_err(|_| Errno::EIO)?;
                    }
                    // No write handler: the write is dropped and reported done.
                    vcfg::Access::Direct => {}
                }
            }
        }
        if pos == regs::COMMAND || pos == regs::COMMAND + 1 {
            // INTx disable is emulated: the user's bit decides whether INTx signals.
            let off = vc(m)?.command() & regs::COMMAND_INTX_DISABLE != 0;
            if self.virq_disabled.swap(off, Ordering::AcqRel) != off {
                self.virq_changed(off);
            }
        }
        Ok(())
    }

    /// The FLR a user's config write asked for: revoke, `pci_try_reset_function` (its result
    /// ignored, as the kernel does), unrevoke if memory is enabled. The reset leaves the
    /// device in D0 (`pci_dev_save_and_disable`); during low power with CONFIG_PM the put
    /// after the access suspends it again, and the buffers stay revoked either way
    /// (divergence 6).
    pub(super) fn config_flr(&self, m: &mut MemGuard<'_>) {
        m.move_bufs(true);
        let _ = self.fabric.reset_function(self.bdf);
        if self.runtime_suspended(m) {
            self.runtime_suspend();
        }
        self.unrevoke_after_write(m);
    }

    /// `vfio_need_bar_restore`: a BAR register that held an address at the first open reads
    /// something else now.
    fn bars_moved(&self, m: &MemGuard<'_>) -> bool {
        let Some(v) = m.vconfig.as_ref() else {
            return false;
        };
        vcfg::BAR_REGS[..6]
            .iter()
            .zip(v.bars_at_open)
            .any(|(&at, orig)| {
                orig != 0 && self.fabric.config_read(self.bdf, at, 4).ok() != Some(orig)
            })
    }

    /// `vfio_bar_restore`: the BAR registers written back as they were at the first open.
    pub(super) fn restore_bars(&self, m: &MemGuard<'_>) {
        let Some(v) = m.vconfig.as_ref() else { return };
        for (at, orig) in vcfg::BAR_REGS.into_iter().zip(v.bars_at_open) {
            let _ = self.fabric.config_write(self.bdf, at, 4, orig);
        }
    }
}

impl DeviceFd {
    /// A user config read of 1, 2 or 4 bytes at `offset`, as a little-endian value (see
    /// [`Self::read_config`]; other sizes `EINVAL`).
    pub fn config_read(&self, offset: u16, size: usize) -> Result<u32, Errno> {
        if !matches!(size, 1 | 2 | 4) {
            self.granted()?;
            return Err(Errno::EINVAL);
        }
        let mut b = [0u8; 4];
        self.read_config(offset, &mut b[..size])?;
        Ok(u32::from_le_bytes(b))
    }

    /// A user read of config space (a `pread` of the config region): any length, in the
    /// kernel's chunks, virtualised registers from the per-open copy (see [`crate::config`]).
    /// `EFAULT` past the config size.
    pub fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), Errno> {
        self.granted()?;
        // `vfio_pci_rw` resumes the device first, as every ioctl does: a wakeup-armed one
        // for good, any other for the access (PMCSR then reads D0).
        self.ioctl_resume();
        self.resumed(|| self.read_config_resumed(offset, buf))
    }

    fn read_config_resumed(&self, offset: u16, buf: &mut [u8]) -> Result<(), Errno> {
        let d = &self.dev;
        let mut m = d.lock_mem();
        let v = m.vconfig.as_mut().ok_or(Errno::EINVAL)?;
        let mut at = 0;
        for (pos, n) in vcfg::chunks(&v.layout, offset, buf.len())? {
            let val = v.read(&d.fabric, d.bdf, pos, n)?;
            for (i, b) in buf[at..at + n].iter_mut().enumerate() {
                *b = (val >> (8 * i)) as u8;
            }
            at += n;
        }
        Ok(())
    }

    /// A user write to config space (a `pwrite` of the config region): any length, cut into
    /// the kernel's chunks, each through its register's rules (see [`crate::config`]).
    /// COMMAND with memory off revokes, and every COMMAND write then unrevokes if memory is
    /// enabled; a PMCSR write of D3hot revokes and the power change unrevokes if memory is
    /// enabled; a PCIe or AF FLR revokes, resets and unrevokes. During runtime low power
    /// nothing a user writes brings buffers back or changes the power state (divergence 6).
    /// `EFAULT` past the config size; a chunk that fails stops the write there.
    pub fn config_write(&self, offset: u16, data: &[u8]) -> Result<(), Errno> {
        self.granted()?;
        self.ioctl_resume();
        let d = &self.dev;
        let mut m = d.lock_mem();
        let chunks = vcfg::chunks(
            &m.vconfig.as_ref().ok_or(Errno::EINVAL)?.layout,
            offset,
            data.len(),
        )?;
        let mut at = 0;
        for (pos, n) in chunks {
            let val = data[at..at + n]
                .iter()
                .enumerate()
                .fold(0u32, |v, (i, b)| v | u32::from(*b) << (8 * i));
            d.write_chunk(&mut m, pos, n, val)?;
            at += n;
        }
        Ok(())
    }
}
