//! A vfio-pci device's interrupts as the user sets them up (drivers/vfio/pci/vfio_pci_core.c
//! `vfio_pci_ioctl_get_irq_info`, `vfio_pci_ioctl_set_irqs`, `vfio_pci_get_irq_count`;
//! drivers/vfio/vfio_main.c `vfio_set_irqs_validate_and_prepare`; vfio_pci_intrs.c, the
//! handlers, `vfio_pci_ioctl_get_info`). What a user can observe is all kept: which eventfd
//! each index and vector signals, the loopback a `DATA_NONE`/`DATA_BOOL` trigger performs (the
//! kernel's way to test a setup), the state machine of the active interrupt type (none, INTx,
//! MSI, MSI-X), and every errno in the kernel's order. Enabling MSI also sets `msi_qmax`, which
//! the MSI capability's config-space handler uses ([`super::config_access`]), and sets the
//! enable bit and INTx-disable in the device. Interrupts the device raises (a device model's
//! `Msi`/`Intx` fabric events) are handled as `vfio_msihandler` and `vfio_intx_handler` do
//! ([`DeviceIrq`], delivered once `igate` is free).

use std::collections::BTreeMap;

use super::{Arc, DeviceFd, Errno, File, Ordering, Process, regs, sync, vcfg};

/// `VFIO_PCI_INTX_IRQ_INDEX` … `VFIO_PCI_REQ_IRQ_INDEX`, and `VFIO_PCI_NUM_IRQS` (also the
/// kernel's "no interrupt type active").
pub(crate) const INTX: u8 = 0;
pub(crate) const MSI: u8 = 1;
pub(crate) const MSIX: u8 = 2;
const ERR: u32 = 3;
const REQ: u32 = 4;
pub(crate) const NONE: u8 = 5;

/// `VFIO_IRQ_SET_DATA_*`, `VFIO_IRQ_SET_ACTION_*`.
const DATA_NONE: u32 = 1 << 0;
const DATA_BOOL: u32 = 1 << 1;
const DATA_EVENTFD: u32 = 1 << 2;
const DATA_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
const ACTION_MASK_BIT: u32 = 1 << 3;
const ACTION_UNMASK: u32 = 1 << 4;
const ACTION_TRIGGER: u32 = 1 << 5;
const ACTION_TYPE_MASK: u32 = ACTION_MASK_BIT | ACTION_UNMASK | ACTION_TRIGGER;

/// `VFIO_IRQ_INFO_*`.
const INFO_EVENTFD: u32 = 1 << 0;
const INFO_MASKABLE: u32 = 1 << 1;
const INFO_AUTOMASKED: u32 = 1 << 2;
const INFO_NORESIZE: u32 = 1 << 3;

/// `offsetofend(struct vfio_irq_set, count)` and `offsetofend(struct vfio_irq_info, count)`.
const SET_MINSZ: usize = 20;
/// `sizeof(struct vfio_device_info)`.
const DEVICE_INFO_SIZE: usize = 24;
/// `VFIO_DEVICE_FLAGS_RESET`, `VFIO_DEVICE_FLAGS_PCI`.
const DEVICE_FLAGS_RESET: u32 = 1 << 0;
const DEVICE_FLAGS_PCI: u32 = 1 << 1;
const INFO_MINSZ: usize = 16;

/// What `igate` guards.
#[derive(Default)]
pub(super) struct Irqs {
    /// INTx's eventfd (`ctx[0].trigger`), while INTx is the active type.
    intx_trigger: Option<Arc<File>>,
    /// INTx masked (`ctx->masked`); not observable here, kept for the state machine.
    intx_masked: bool,
    /// The eventfd INTx unmasks on (`ctx->unmask`, a virqfd).
    intx_unmask: Option<UnmaskFd>,
    /// MSI or MSI-X vectors allocated (`pci_alloc_irq_vectors`), and each one's eventfd.
    nvec: u32,
    vectors: BTreeMap<u32, Arc<File>>,
    /// `vdev->err_trigger`, `vdev->req_trigger`.
    err: Option<Arc<File>>,
    req: Option<Arc<File>>,
}

/// INTx's unmask eventfd, hooked as a virqfd: a write (or a signal) of it is consumed and
/// unmasks INTx. It holds the eventfd as an `eventfd_ctx` does — the `Arc`, but no file
/// reference — so the eventfd's last close unhooks it (`EPOLLHUP`).
pub(super) struct UnmaskFd {
    file: Arc<File>,
    waiter: u64,
    hup: u64,
}

impl UnmaskFd {
    /// `vfio_virqfd_disable`: unhooked, the count read away.
    fn release(self) {
        self.file.eventfd_remove_hup(self.hup);
        self.file.eventfd_remove_waiter(self.waiter);
    }
}

impl Irqs {
    /// Every eventfd let go (collected, to put once `igate` is dropped).
    fn drain(&mut self, out: &mut Vec<Arc<File>>) {
        out.extend(self.intx_trigger.take());
        if let Some(u) = self.intx_unmask.take() {
            u.release();
        }
        out.extend(std::mem::take(&mut self.vectors).into_values());
        self.nvec = 0;
        self.intx_masked = false;
    }
}

/// What a `VFIO_DEVICE_SET_IRQS` asks of its handler, past the index and action.
#[derive(Clone, Copy)]
struct Req<'a> {
    proc: &'a Process,
    start: u32,
    count: u32,
    flags: u32,
    /// One byte (`DATA_BOOL`) or one fd (`DATA_EVENTFD`) per vector.
    data: &'a [u8],
}

impl Req<'_> {
    /// A `DATA_NONE` trigger with count 0 while `index` is the active type: disable it.
    fn disables(&self, active: u8, index: u8) -> bool {
        active == index && self.count == 0 && self.flags & DATA_NONE != 0
    }
}

fn word(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// A signed fd in the data.
fn fd_at(buf: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

impl DeviceFd {
    /// `vfio_pci_get_irq_count`: INTx 1 when the user's interrupt pin is set, MSI and MSI-X
    /// from the hardware's capability, ERR 1 on a PCIe function, REQ 1.
    fn irq_count(&self, index: u32) -> u32 {
        let d = &self.dev;
        let (f, b) = (&*d.fabric, d.bdf);
        match index {
            0 => {
                let pin = d.read_mem(|m| {
                    m.vconfig
                        .as_ref()
                        .map_or(0, |v| v.get(regs::INTERRUPT_PIN, 1))
                });
                u32::from(pin != 0)
            }
            1 => vcfg::find_cap(f, b, vcfg::cap::MSI)
                .and_then(|p| f.config_read(b, p + 2, 2).ok())
                .map_or(0, |flags| 1 << ((flags & u32::from(vcfg::msi::QMASK)) >> 1)),
            2 => vcfg::find_cap(f, b, vcfg::cap::MSIX)
                .and_then(|p| f.config_read(b, p + 2, 2).ok())
                .map_or(0, |flags| (flags & u32::from(vcfg::msi::MSIX_QSIZE)) + 1),
            ERR => u32::from(f.function(b).is_ok_and(|x| x.caps().exp.is_some())),
            REQ => 1,
            _ => 0,
        }
    }

    /// `VFIO_DEVICE_GET_INFO` on the ioctl's buffer (`vfio_pci_ioctl_get_info`, `struct
    /// vfio_device_info`): `EINVAL` for an argsz below 16; else, as far as argsz reaches
    /// (at most 24 bytes), flags PCI plus RESET when the reset at the first open worked, the
    /// nine fixed regions plus the variant's own, five interrupt indexes. No capability is
    /// added: zPCI is s390's, and the AtomicOps one needs a function that completes
    /// AtomicOps (DevCap2), which none modelled here does.
    pub fn device_info(&self, buf: &mut [u8]) -> Result<(), Errno> {
        self.ioctl_prologue()?;
        if buf.len() < INFO_MINSZ {
            return Err(Errno::EFAULT);
        }
        let argsz = word(buf, 0) as usize;
        if argsz < INFO_MINSZ {
            return Err(Errno::EINVAL);
        }
        let mut out = [0u8; DEVICE_INFO_SIZE];
        out[..4].copy_from_slice(&buf[..4]);
        let mut flags = DEVICE_FLAGS_PCI;
        if self.dev.reset_works.load(Ordering::Acquire) {
            flags |= DEVICE_FLAGS_RESET;
        }
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        out[8..12].copy_from_slice(&9u32.to_le_bytes());
        out[12..16].copy_from_slice(&5u32.to_le_bytes());
        let n = argsz.min(DEVICE_INFO_SIZE).min(buf.len());
        buf[..n].copy_from_slice(&out[..n]);
        Ok(())
    }

    /// `VFIO_DEVICE_GET_IRQ_INFO` on the ioctl's buffer (`struct vfio_irq_info`: argsz,
    /// flags, index, count): `EINVAL` for an argsz below 16, an index past REQ, or ERR on a
    /// conventional PCI function; else flags and count filled in.
    pub fn irq_info(&self, buf: &mut [u8]) -> Result<(), Errno> {
        self.ioctl_prologue()?;
        if buf.len() < INFO_MINSZ {
            return Err(Errno::EFAULT);
        }
        let (argsz, index) = (word(buf, 0), word(buf, 8));
        if (argsz as usize) < INFO_MINSZ || index >= u32::from(NONE) {
            return Err(Errno::EINVAL);
        }
        if index == ERR && self.irq_count(ERR) == 0 {
            return Err(Errno::EINVAL);
        }
        let mut flags = INFO_EVENTFD;
        if index == u32::from(INTX) {
            flags |= INFO_MASKABLE | INFO_AUTOMASKED;
        } else if index != u32::from(MSIX) || !self.dev.dyn_msix {
            flags |= INFO_NORESIZE;
        }
        buf[4..8].copy_from_slice(&flags.to_le_bytes());
        buf[12..16].copy_from_slice(&self.irq_count(index).to_le_bytes());
        Ok(())
    }

    /// `VFIO_DEVICE_SET_IRQS` on the ioctl's buffer (`struct vfio_irq_set`: argsz, flags,
    /// index, start, count, then the data), checked as `vfio_set_irqs_validate_and_prepare`
    /// checks it, then handed to the index's handler under `igate`; `ENOTTY` when the index
    /// has none for the action (MSI masking, any action but trigger on ERR and REQ).
    pub fn set_irqs(&self, proc: &Process, buf: &[u8]) -> Result<(), Errno> {
        self.ioctl_prologue()?;
        if buf.len() < SET_MINSZ {
            return Err(Errno::EFAULT);
        }
        let (argsz, flags, index, start, count) = (
            word(buf, 0),
            word(buf, 4),
            word(buf, 8),
            word(buf, 12),
            word(buf, 16),
        );
        let max = self.irq_count(index);
        if (argsz as usize) < SET_MINSZ
            || index >= u32::from(NONE)
            || count >= u32::MAX - start
            || flags & !(DATA_MASK | ACTION_TYPE_MASK) != 0
        {
            return Err(Errno::EINVAL);
        }
        if start >= max || start + count > max {
            return Err(Errno::EINVAL);
        }
        let size = match flags & DATA_MASK {
            DATA_NONE => 0,
            DATA_BOOL => 1,
            DATA_EVENTFD => 4,
            _ => return Err(Errno::EINVAL),
        };
        let need = u64::from(count) * size;
        if size != 0 && u64::from(argsz) - (SET_MINSZ as u64) < need {
            return Err(Errno::EINVAL);
        }
        let data = buf
            .get(SET_MINSZ..SET_MINSZ + need as usize)
            .ok_or(Errno::EFAULT)?;
        let action = flags & ACTION_TYPE_MASK;
        let req = Req {
            proc,
            start,
            count,
            flags,
            data,
        };
        let d = &self.dev;
        let mut puts = Vec::new();
        let r = {
            let mut irqs = sync::lock(&d.irqs);
            match (index, action) {
                (0, ACTION_MASK_BIT | ACTION_UNMASK) => self.intx_mask(&mut irqs, action, &req),
                (0, ACTION_TRIGGER) => self.intx_trigger(&mut irqs, &req, &mut puts),
                (1 | 2, ACTION_TRIGGER) => {
                    self.msi_trigger(&mut irqs, index as u8, &req, &mut puts)
                }
                (ERR | REQ, ACTION_TRIGGER) => {
                    let slot = if index == ERR {
                        &mut irqs.err
                    } else {
                        &mut irqs.req
                    };
                    ctx_trigger_single(slot, &req, &mut puts)
                }
                _ => Err(Errno::ENOTTY),
            }
        };
        // Interrupts the device raised while `igate` was held (a line the set-up unmasked).
        d.deliver_irqs();
        for f in puts {
            f.put();
        }
        r
    }

    /// `vfio_pci_set_intx_mask`, `vfio_pci_set_intx_unmask`.
    fn intx_mask(&self, irqs: &mut Irqs, action: u32, req: &Req<'_>) -> Result<(), Errno> {
        let Req {
            proc,
            start,
            count,
            flags,
            data,
        } = *req;
        if self.dev.irq_type.load(Ordering::Acquire) != INTX || start != 0 || count != 1 {
            return Err(Errno::EINVAL);
        }
        let mask = action == ACTION_MASK_BIT;
        let fire = flags & DATA_NONE != 0 || (flags & DATA_BOOL != 0 && data[0] != 0);
        if fire && mask {
            self.dev.intx_mask_now(irqs);
        } else if fire {
            self.dev.intx_unmask_handler(irqs);
        } else if flags & DATA_EVENTFD != 0 {
            if mask {
                return Err(Errno::ENOTTY);
            }
            // `vfio_virqfd_enable`: the fd (EBADF, EINVAL for one that is not an eventfd),
            // then the slot (EBUSY while one is hooked); a count already there unmasks at
            // once, without being consumed. fd −1: `vfio_virqfd_disable`.
            let fd = fd_at(data, 0);
            if fd >= 0 {
                let e = eventfd_get(proc, fd)?;
                // An `eventfd_ctx` reference, not a file reference.
                e.clone().put();
                if irqs.intx_unmask.is_some() {
                    return Err(Errno::EBUSY);
                }
                let weak = Arc::downgrade(&self.dev);
                let fire = move || {
                    if let Some(d) = weak.upgrade() {
                        d.device_irq(DeviceIrq::Unmask);
                    }
                };
                let weak = Arc::downgrade(&self.dev);
                let gone = move || {
                    if let Some(d) = weak.upgrade() {
                        d.device_irq(DeviceIrq::UnmaskHup);
                    }
                };
                let (Some(waiter), Some(hup)) = (
                    e.eventfd_add_waiter(Arc::new(fire)),
                    e.eventfd_add_hup(Arc::new(gone)),
                ) else {
                    return Err(Errno::EINVAL);
                };
                let pending = e.eventfd_pending();
                irqs.intx_unmask = Some(UnmaskFd {
                    file: e,
                    waiter,
                    hup,
                });
                if pending {
                    // Served by this call's delivery, once `igate` goes.
                    sync::lock(&self.dev.irq_queue).push(DeviceIrq::Unmask);
                }
            } else if let Some(u) = irqs.intx_unmask.take() {
                u.release();
            }
        }
        Ok(())
    }

    /// `vfio_pci_set_intx_trigger`.
    fn intx_trigger(
        &self,
        irqs: &mut Irqs,
        req: &Req<'_>,
        puts: &mut Vec<Arc<File>>,
    ) -> Result<(), Errno> {
        let Req {
            proc,
            start,
            count,
            flags,
            data,
        } = *req;
        let d = &self.dev;
        let ty = d.irq_type.load(Ordering::Acquire);
        if req.disables(ty, INTX) {
            self.disable_irqs(irqs, puts);
            return Ok(());
        }
        if !(ty == INTX || ty == NONE) || start != 0 || count != 1 {
            return Err(Errno::EINVAL);
        }
        if flags & DATA_EVENTFD != 0 {
            let fd = fd_at(data, 0);
            let trigger = if fd >= 0 {
                Some(eventfd_get(proc, fd)?)
            } else {
                None
            };
            if ty != INTX {
                // `vfio_intx_enable`: a function without an interrupt line is ENODEV; every
                // modelled function with a pin has one.
                irqs.intx_masked = d.virq_disabled.load(Ordering::Acquire);
                d.irq_type.store(INTX, Ordering::Release);
                // `pci_intx(pdev, !masked)`: the device may signal by its pin now (a line
                // already asserted fires at once: the handler runs after `igate` goes).
                d.set_hw_intx_disable(irqs.intx_masked);
                // A line already asserted when INTx is enabled is not signalled: the real
                // kernel under QEMU showed nothing until the next edge (scenario
                // edu-interrupt-intx-pending-at-enable), though `request_irq` on a level
                // already high would suggest otherwise.
            }
            puts.extend(std::mem::replace(&mut irqs.intx_trigger, trigger));
            return Ok(());
        }
        if ty != INTX {
            return Err(Errno::EINVAL);
        }
        let fire = flags & DATA_NONE != 0 || (flags & DATA_BOOL != 0 && data[0] != 0);
        // `vfio_send_intx_eventfd`: nothing while the user's COMMAND disables INTx.
        if fire && !d.virq_disabled.load(Ordering::Acquire) {
            if let Some(t) = &irqs.intx_trigger {
                t.eventfd_signal(1);
            }
        }
        Ok(())
    }

    /// `vfio_pci_set_msi_trigger`, with `vfio_msi_enable`, `vfio_msi_set_block` and
    /// `vfio_msi_disable`.
    fn msi_trigger(
        &self,
        irqs: &mut Irqs,
        index: u8,
        req: &Req<'_>,
        puts: &mut Vec<Arc<File>>,
    ) -> Result<(), Errno> {
        let Req {
            proc,
            start,
            count,
            flags,
            data,
        } = *req;
        let d = &self.dev;
        let ty = d.irq_type.load(Ordering::Acquire);
        if req.disables(ty, index) {
            self.disable_irqs(irqs, puts);
            return Ok(());
        }
        if !(ty == index || ty == NONE) {
            return Err(Errno::EINVAL);
        }
        if flags & DATA_EVENTFD != 0 {
            let fds: Vec<i32> = (0..count as usize).map(|i| fd_at(data, 4 * i)).collect();
            if ty == index {
                return self.msi_set_block(irqs, proc, index, start, &fds, puts);
            }
            // `vfio_msi_enable` asks `pci_alloc_irq_vectors` for 1 to `start + count`
            // vectors: none at all is a range the PCI core refuses (`ERANGE`), and nothing
            // changes.
            if start + count == 0 {
                return Err(Errno::ERANGE);
            }
            irqs.nvec = start + count;
            d.irq_type.store(index, Ordering::Release);
            self.msi_hardware(index, true);
            if index == MSI {
                // `fls(nvec * 2 - 1) - 1`: the queue size for nvec vectors.
                let q = (irqs.nvec * 2 - 1).ilog2();
                d.msi_qmax.store(q as u16, Ordering::Release);
            }
            let r = self.msi_set_block(irqs, proc, index, start, &fds, puts);
            if r.is_err() {
                self.disable_irqs(irqs, puts);
            }
            return r;
        }
        if ty != index {
            return Err(Errno::EINVAL);
        }
        for v in start..start + count {
            let Some(t) = irqs.vectors.get(&v) else {
                continue;
            };
            let fire = flags & DATA_NONE != 0
                || (flags & DATA_BOOL != 0 && data[(v - start) as usize] != 0);
            if fire {
                t.eventfd_signal(1);
            }
        }
        Ok(())
    }

    /// `vfio_msi_set_block`: each vector's eventfd in turn (a negative fd leaves the vector
    /// without one); a vector past those allocated is `EINVAL` (MSI-X with dynamic
    /// allocation gets one more instead); on an error the vectors from `start` up to the
    /// failing one are let go.
    fn msi_set_block(
        &self,
        irqs: &mut Irqs,
        proc: &Process,
        index: u8,
        start: u32,
        fds: &[i32],
        puts: &mut Vec<Arc<File>>,
    ) -> Result<(), Errno> {
        let mut r = Ok(());
        let mut j = start;
        for &fd in fds {
            let had = irqs.vectors.remove(&j);
            let existed = had.is_some();
            puts.extend(had);
            j += 1;
            if fd < 0 {
                continue;
            }
            let v = j - 1;
            if !existed && v >= irqs.nvec {
                if index == MSIX && self.dev.dyn_msix {
                    irqs.nvec = v + 1;
                } else {
                    r = Err(Errno::EINVAL);
                    break;
                }
            }
            match eventfd_get(proc, fd) {
                Ok(e) => {
                    irqs.vectors.insert(v, e);
                }
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        if r.is_err() {
            for v in start..j {
                puts.extend(irqs.vectors.remove(&v));
            }
        }
        r
    }

    /// The active interrupt type disabled, its eventfds let go.
    fn disable_irqs(&self, irqs: &mut Irqs, puts: &mut Vec<Arc<File>>) {
        irqs.drain(puts);
        // Interrupts not yet delivered belong to the setup that goes.
        sync::lock(&self.dev.irq_queue).clear();
        let was = self.dev.irq_type.swap(NONE, Ordering::AcqRel);
        if was == MSI || was == MSIX {
            self.msi_hardware(was, false);
        }
    }

    /// What `pci_alloc_irq_vectors` and `pci_free_irq_vectors` do to the device: MSI
    /// Enable (or MSI-X Enable) set or cleared in its capability, and INTx disabled in
    /// COMMAND while message interrupts are on (`pci_intx_for_msi`), so that the device
    /// signals by message and not by its pin.
    fn msi_hardware(&self, index: u8, on: bool) {
        let (f, b) = (&*self.dev.fabric, self.dev.bdf);
        let (id, bit) = if index == MSI {
            (vcfg::cap::MSI, 0x0001u32)
        } else {
            (vcfg::cap::MSIX, 0x8000)
        };
        let Some(cap) = vcfg::find_cap(f, b, id) else {
            return;
        };
        if let Ok(flags) = f.config_read(b, cap + 2, 2) {
            let new = if on { flags | bit } else { flags & !bit };
            let _ = f.config_write(b, cap + 2, 2, new);
        }
        self.dev.set_hw_intx_disable(on);
    }

    /// The interrupts torn down at the last close (`vfio_pci_core_disable` disables the
    /// active type; `vfio_pci_core_close_device` drops the ERR and REQ eventfds).
    pub(super) fn irqs_release(&self) {
        let d = &self.dev;
        let mut puts = Vec::new();
        {
            let mut irqs = sync::lock(&d.irqs);
            self.disable_irqs(&mut irqs, &mut puts);
            puts.extend(irqs.err.take());
            puts.extend(irqs.req.take());
        }
        for f in puts {
            f.put();
        }
    }
}

/// `eventfd_ctx_fdget`: `EBADF` for a closed fd, `EINVAL` for a file that is not an eventfd.
fn eventfd_get(proc: &Process, fd: i32) -> Result<Arc<File>, Errno> {
    let f = proc.fget(fd)?;
    if !f.is_eventfd() {
        f.put();
        return Err(Errno::EINVAL);
    }
    Ok(f)
}

/// `vfio_pci_set_ctx_trigger_single` (ERR and REQ): `DATA_NONE` signals the eventfd
/// (`EINVAL` without one) or, with count 0, drops it; `DATA_BOOL` signals on a nonzero byte;
/// `DATA_EVENTFD` sets the eventfd, or drops it for fd −1 (other negative fds are `EINVAL`).
fn ctx_trigger_single(
    slot: &mut Option<Arc<File>>,
    req: &Req<'_>,
    puts: &mut Vec<Arc<File>>,
) -> Result<(), Errno> {
    let Req {
        proc,
        count,
        flags,
        data,
        ..
    } = *req;
    if flags & DATA_NONE != 0 {
        let Some(e) = slot.as_ref() else {
            return Err(Errno::EINVAL);
        };
        if count != 0 {
            e.eventfd_signal(1);
        } else {
            puts.extend(slot.take());
        }
        return Ok(());
    }
    if flags & DATA_BOOL != 0 {
        if count == 0 {
            return Err(Errno::EINVAL);
        }
        if data[0] != 0 {
            if let Some(e) = slot.as_ref() {
                e.eventfd_signal(1);
            }
        }
        return Ok(());
    }
    if flags & DATA_EVENTFD != 0 {
        if count == 0 {
            return Err(Errno::EINVAL);
        }
        let fd = fd_at(data, 0);
        if fd == -1 {
            puts.extend(slot.take());
            return Ok(());
        }
        if fd >= 0 {
            let e = eventfd_get(proc, fd)?;
            puts.extend(slot.replace(e));
            return Ok(());
        }
    }
    Err(Errno::EINVAL)
}

/// An interrupt the device raised, waiting for `igate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeviceIrq {
    /// An MSI or MSI-X message for this vector.
    Msi(u16),
    /// The INTx line rose.
    IntxAsserted,
    /// INTx's unmask eventfd was written (`vfio_pci_intx_unmask_handler`, then
    /// `vfio_send_intx_eventfd` when the interrupt is still pending).
    Unmask,
    /// INTx's unmask eventfd was released (`EPOLLHUP`): the slot is free.
    UnmaskHup,
}

impl super::Dev {
    /// An interrupt from the device (a fabric event): queued, then delivered unless `igate`
    /// is held, in which case its holder delivers it when done (`set_irqs`).
    pub(super) fn device_irq(&self, irq: DeviceIrq) {
        sync::lock(&self.irq_queue).push(irq);
        self.deliver_irqs();
    }

    /// The host's handlers for what the device raised: `vfio_msihandler` signals the
    /// vector's eventfd; `vfio_intx_handler` (INTx active and not masked, the interrupt
    /// pending in the device) sets INTx-disable in the device, marks it masked, and signals
    /// the INTx eventfd unless the user's COMMAND disables INTx.
    pub(super) fn deliver_irqs(&self) {
        // A device that interrupts into the eventfd driving it (an ioeventfd on its own
        // raise register) would go round for ever: it is served this many rounds per call,
        // the rest waiting in the queue for the next delivery, as an interrupt storm waits
        // for the CPU.
        const ROUNDS: usize = 16;
        for _ in 0..ROUNDS {
            let mut irqs = match self.irqs.try_lock() {
                Ok(g) => g,
                Err(sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(sync::TryLockError::WouldBlock) => return,
            };
            let queued = std::mem::take(&mut *sync::lock(&self.irq_queue));
            let ty = self.irq_type.load(Ordering::Acquire);
            for irq in queued {
                match irq {
                    DeviceIrq::Msi(v) if ty == MSI || ty == MSIX => {
                        if let Some(t) = irqs.vectors.get(&u32::from(v)) {
                            t.eventfd_signal(1);
                        }
                    }
                    DeviceIrq::IntxAsserted
                        if ty == INTX && !irqs.intx_masked && self.hw_intx_pending() =>
                    {
                        // Masked in the device under `igate`, so that an unmask cannot
                        // come between (re-entered observers only try `igate`).
                        irqs.intx_masked = true;
                        self.set_hw_intx_disable(true);
                        if !self.virq_disabled.load(Ordering::Acquire) {
                            if let Some(t) = &irqs.intx_trigger {
                                t.eventfd_signal(1);
                            }
                        }
                    }
                    DeviceIrq::Unmask if ty == INTX => self.intx_unmask_handler(&mut irqs),
                    // The slot's eventfd is gone; one hooked since stays.
                    DeviceIrq::UnmaskHup
                        if irqs
                            .intx_unmask
                            .as_ref()
                            .is_some_and(|u| u.file.refs() == 0) =>
                    {
                        if let Some(u) = irqs.intx_unmask.take() {
                            u.release();
                        }
                    }
                    _ => {}
                }
            }
            drop(irqs);
            // Whatever was queued while `igate` was held (by this delivery or by another
            // thread that could not take it) is delivered now.
            if sync::lock(&self.irq_queue).is_empty() {
                return;
            }
        }
    }

    /// The user's COMMAND INTx-disable changed (`vfio_basic_config_write`): set, it masks
    /// INTx (`vfio_pci_intx_mask`); cleared, it unmasks (`vfio_pci_intx_unmask`, which
    /// signals again when the interrupt is still pending). Without INTx active the device's
    /// INTx-disable just follows the user's bit.
    pub(super) fn virq_changed(&self, disabled: bool) {
        {
            let mut irqs = sync::lock(&self.irqs);
            if self.irq_type.load(Ordering::Acquire) != INTX {
                self.set_hw_intx_disable(disabled);
            } else if disabled {
                self.intx_mask_now(&mut irqs);
            } else {
                self.intx_unmask_handler(&mut irqs);
            }
        }
        self.deliver_irqs();
    }

    /// `vfio_pci_core_runtime_suspend`'s INTx part: INTx active and not already masked is
    /// masked (`vfio_pci_intx_mask`), and the resume will unmask it (`pm_intx_masked`).
    pub(super) fn pm_intx_mask(&self) {
        let masked = {
            let mut irqs = sync::lock(&self.irqs);
            self.irq_type.load(Ordering::Acquire) == INTX && self.intx_mask_now(&mut irqs)
        };
        self.pm_intx_masked.store(masked, Ordering::Release);
    }

    /// `vfio_pci_core_runtime_resume`'s: what the suspend masked is unmasked
    /// (`vfio_pci_intx_unmask`) — unless the user's COMMAND disables INTx; with the
    /// interrupt still pending it stays masked and the eventfd is signalled again.
    pub(super) fn pm_intx_unmask(&self) {
        if !self.pm_intx_masked.swap(false, Ordering::AcqRel) {
            return;
        }
        {
            let mut irqs = sync::lock(&self.irqs);
            if self.irq_type.load(Ordering::Acquire) == INTX {
                self.intx_unmask_handler(&mut irqs);
            }
        }
        self.deliver_irqs();
    }

    /// `__vfio_pci_intx_mask` for an active INTx: the device's INTx-disable set
    /// (`pci_intx(pdev, 0)`) unless it is masked already; whether this masked it.
    fn intx_mask_now(&self, irqs: &mut Irqs) -> bool {
        if irqs.intx_masked {
            return false;
        }
        self.set_hw_intx_disable(true);
        irqs.intx_masked = true;
        true
    }

    /// `vfio_pci_intx_unmask_handler` for an active INTx: a masked one the user's COMMAND
    /// does not disable is unmasked — or, with the interrupt still pending in the device
    /// (`pci_check_and_unmask_intx` refuses), stays masked and its eventfd is signalled
    /// again (`vfio_send_intx_eventfd`).
    fn intx_unmask_handler(&self, irqs: &mut Irqs) {
        if !irqs.intx_masked || self.virq_disabled.load(Ordering::Acquire) {
            return;
        }
        if self.hw_intx_pending() {
            if let Some(t) = &irqs.intx_trigger {
                t.eventfd_signal(1);
            }
        } else {
            self.set_hw_intx_disable(false);
            irqs.intx_masked = false;
        }
    }

    /// PCI Status' Interrupt bit in the device: its INTx is pending.
    pub(super) fn hw_intx_pending(&self) -> bool {
        self.fabric
            .config_read(self.bdf, regs::STATUS, 2)
            .is_ok_and(|st| st & 0x8 != 0)
    }

    /// COMMAND's INTx-disable in the device (`pci_intx`).
    pub(super) fn set_hw_intx_disable(&self, on: bool) {
        let (f, b) = (&*self.fabric, self.bdf);
        if let Ok(cmd) = f.config_read(b, regs::COMMAND, 2) {
            let dis = u32::from(regs::COMMAND_INTX_DISABLE);
            let new = if on { cmd | dis } else { cmd & !dis };
            if new != cmd {
                let _ = f.config_write(b, regs::COMMAND, 2, new);
            }
        }
    }
}
