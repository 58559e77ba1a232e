//! Runtime power management of a vfio-pci device as the user drives it
//! (drivers/vfio/pci/vfio_pci_core.c: `vfio_pci_core_pm_entry`, `..._pm_entry_with_wakeup`,
//! `..._pm_exit` and the resume an ioctl triggers): low-power entry revokes, the exit
//! unrevokes, and a wakeup-armed device wakes on any access. Locking: see [`super`].

use super::{Arc, Dev, DeviceFd, Errno, File, MemGuard, Ordering, PowerState, sync};

impl Dev {
    /// `vfio_pci_set_power_state` (and the runtime-PM suspend and resume, which save and
    /// restore the same way): a function whose PMCSR has No_Soft_Reset clear
    /// (`needs_pm_restore`) resets itself on D3hot → D0, so its state is saved on the way
    /// into D3hot and written back after D0 ([`peerdma_pci::Fabric::save_config`],
    /// `restore_config`: BARs, COMMAND and the capabilities' control registers). A function
    /// that keeps its state, or has no PM capability, only changes state.
    pub(super) fn set_power(&self, state: PowerState) {
        let (f, b) = (&*self.fabric, self.bdf);
        let Ok(func) = f.function(b) else { return };
        let needs = !func.no_soft_reset();
        let cur = f.power_state(b).unwrap_or(PowerState::D0);
        let save = needs && cur < PowerState::D3Hot && state >= PowerState::D3Hot;
        let restore = needs && cur >= PowerState::D3Hot && state == PowerState::D0;
        if save {
            *sync::lock(&self.pm_save) = f.save_config(b).ok();
        }
        if f.set_power_state(b, state).is_err() {
            return;
        }
        if restore {
            if let Some(saved) = sync::lock(&self.pm_save).take() {
                let _ = f.restore_config(&saved);
            }
        }
    }

    /// `vfio_pci_core_runtime_suspend` and the PCI core after it: INTx masked if active
    /// (remembered for the resume), then D3hot — which a function without PM cannot enter:
    /// it stays in D0, runtime-suspended all the same.
    pub(super) fn runtime_suspend(&self) {
        self.pm_intx_mask();
        self.set_power(PowerState::D3Hot);
    }

    /// The PCI core's runtime resume, then `vfio_pci_core_runtime_resume`'s INTx unmask.
    pub(super) fn runtime_resume(&self) {
        self.set_power(PowerState::D0);
        self.pm_intx_unmask();
    }

    /// The function is runtime-suspended between accesses: low power is engaged and runtime
    /// PM can suspend it ([`Dev::runtime_suspends`]).
    pub(super) fn runtime_suspended(&self, m: &super::Mem) -> bool {
        m.engaged && self.runtime_suspends()
    }

    /// Runtime PM can suspend the function once nothing holds it: the kernel has
    /// CONFIG_PM, and it is not a PF with SR-IOV enabled (whose `sriov_configure` keeps a
    /// runtime-PM reference while its VFs exist).
    pub(super) fn runtime_suspends(&self) -> bool {
        self.pm.load(Ordering::Acquire) && !self.sriov_active
    }

    /// `pci_pm_reset` inside `pci_reset_function`'s save and restore: D3hot, then D0, where
    /// the function resets itself; its registers come back from the copy taken before.
    pub(super) fn pm_reset(&self) -> Result<(), Errno> {
        let (f, b) = (&*self.fabric, self.bdf);
        let saved = f.save_config(b).map_err(|_| Errno::EIO)?;
        f.set_power_state(b, PowerState::D3Hot)
            .and_then(|()| f.set_power_state(b, PowerState::D0))
            .and_then(|()| f.restore_config(&saved))
            .map_err(|_| Errno::EIO)
    }

    /// Low power is no longer engaged: the wake eventfd (if any) is let go with the lock.
    pub(super) fn disengage(&self, m: &mut MemGuard<'_>) {
        m.engaged = false;
        self.engaged_hint.store(false, Ordering::Release);
        if let Some(w) = m.wake.take() {
            m.puts.push(w);
        }
        self.wake_armed.store(false, Ordering::Release);
    }
}

impl DeviceFd {
    pub(super) fn low_power_entry(&self, wake: Option<Arc<File>>) -> Result<(), Errno> {
        let d = &self.dev;
        let mut m = d.lock_mem();
        // Linux revokes before checking whether low power is already engaged, and a second
        // entry then fails without unrevoking; here the check comes first
        // (docs/divergences.md).
        if m.engaged {
            m.puts.extend(wake);
            return Err(Errno::EINVAL);
        }
        m.move_bufs(true);
        m.engaged = true;
        d.engaged_hint.store(true, Ordering::Release);
        d.wake_armed.store(wake.is_some(), Ordering::Release);
        m.wake = wake;
        // Without CONFIG_PM the runtime-PM put does nothing: the device stays in D0. Nor
        // does it on a PF with SR-IOV enabled, whose `sriov_configure` holds a runtime-PM
        // reference while its VFs exist.
        if d.runtime_suspends() {
            d.runtime_suspend();
        }
        Ok(())
    }

    /// Leaves low power (explicitly, or woken): resumed if it was runtime-suspended (D0,
    /// INTx unmasked; without CONFIG_PM nothing suspended it, and its power state stays
    /// whatever the user made it), the wake eventfd let go, and — once memory is enabled —
    /// the buffers back. Linux skips that last part on a wakeup (divergence 7).
    pub(super) fn leave_low_power(d: &Dev, m: &mut MemGuard<'_>) {
        if d.runtime_suspended(m) {
            d.runtime_resume();
        }
        d.disengage(m);
        d.unrevoke_if_enabled(m);
    }

    pub(super) fn low_power_exit(&self) {
        let d = &self.dev;
        let mut m = d.lock_mem();
        Self::leave_low_power(d, &mut m);
    }

    /// Every device-fd ioctl and region access (`vfio_pci_rw`) runtime-resumes the device
    /// first; a device asleep in a wakeup-armed low power wakes for good: the eventfd is
    /// signalled and low power left. Without CONFIG_PM nothing happens.
    pub(super) fn ioctl_resume(&self) {
        Self::resume_dev(&self.dev);
    }

    /// [`DeviceFd::ioctl_resume`] of any device (a hot reset resumes its whole set).
    pub(super) fn resume_dev(d: &Arc<Dev>) {
        // Only a device asleep with a wakeup armed has anything to do with the lock (and only
        // then is `memory_lock` taken, as the runtime-resume callback takes it). One asleep
        // without is resumed for the ioctl and suspended again after it: its INTx unmasked
        // and masked again (`pm_intx_masked`), which signals an interrupt left pending.
        if !d.wake_armed.load(Ordering::Acquire) {
            if d.runtime_suspends() && d.engaged_hint.load(Ordering::Acquire) {
                d.pm_intx_unmask();
                d.pm_intx_mask();
            }
            return;
        }
        // Without CONFIG_PM there is no runtime resume: nothing wakes.
        if !d.pm.load(Ordering::Acquire) {
            return;
        }
        let mut m = d.lock_mem();
        // An armed wake implies low power is engaged.
        if let Some(w) = &m.wake {
            w.eventfd_signal(1);
            m.wakeups += 1;
            Self::leave_low_power(d, &mut m);
        }
    }

    /// Runs `f` with the device resumed, as `vfio_pci_rw`'s runtime-PM get does for a region
    /// access: with CONFIG_PM a runtime-suspended device (low power engaged, D3hot) is in D0
    /// for the access, and the idle that follows suspends it again.
    pub(super) fn resumed<R>(&self, f: impl FnOnce() -> R) -> R {
        let d = &self.dev;
        let suspended = d.read_mem(|m| d.runtime_suspended(m));
        if suspended {
            d.runtime_resume();
        }
        let r = f();
        if suspended && d.read_mem(|m| d.runtime_suspended(m)) {
            d.runtime_suspend();
        }
        r
    }

    /// Whether runtime low power is engaged (entered and not yet left).
    pub fn low_power_engaged(&self) -> bool {
        self.dev.read_mem(|m| m.engaged)
    }

    /// How many times an access woke the device out of a wakeup-armed low power (each one
    /// signals the eventfd given at entry).
    pub fn wakeups(&self) -> u32 {
        self.dev.read_mem(|m| m.wakeups)
    }
}
