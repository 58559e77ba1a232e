//! Memory-request routing, as PCIe does it.
//!
//! A request starts at its requester (which needs Bus Master Enable and D0) and climbs:
//!
//! 0. A function addressing one of its own BARs serves the request internally (loopback).
//! 1. On each bus it reaches, a peer may claim it: a sibling bridge whose window holds the
//!    address, or a sibling function whose BAR does (VFs included). The claimant must decode
//!    memory (COMMAND.MEM, or the PF's VF MSE) and be in D0; one that would claim but may not
//!    is remembered to explain an Unsupported Request.
//! 2. A function or port with ACS P2P Request Redirect (or P2P Egress Control, modelled as
//!    blocking every peer) sends the request past its peers: from there on it goes straight up
//!    to the root complex.
//! 3. A bridge forwards upward only an address outside its own windows (one inside them that
//!    nothing below claimed is an Unsupported Request there) and only with its own Bus Master
//!    Enable on.
//! 4. A root port hands the request to the root complex, which asks the
//!    [`AddressTranslator`](crate::translate::AddressTranslator) for a CPU physical address,
//!    then serves RAM, or sends it down the root bus of the host bridge whose window holds the
//!    address — only if the host bridges involved forward peer-to-peer — else Unsupported
//!    Request.
//!
//! Going down, each bridge passes the request to the child that claims it until a function's
//! BAR takes it. Every transaction returns its [`Route`]: the hops and where it landed, or a
//! [`DmaFault`] saying where and why it failed. Faults are also logged in the fabric.
//!
//! A long transfer is routed once per *segment*: every decision taken on the way (each window
//! or BAR test, the translation) also yields the range of addresses for which it would come
//! out the same, and the segment is the intersection of those ranges. So a 4 MiB write into
//! one BAR is routed once, while one that runs off the end of a BAR is split exactly where
//! the decoding changes — the same result as routing every 4 KiB TLP on its own.

use std::fmt;
use std::sync::atomic::Ordering;

use crate::addr::{DmaAddr, PhysAddr, Span};
use crate::bdf::Bdf;
use crate::fabric::Fabric;
use crate::function::{FnId, Parent, PowerState, decode};
use crate::regs;
use crate::spec::P2pForwarding;
use crate::sync;
use crate::translate::{Access, TranslationFault};

/// Who issued a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// A PCI function (DMA).
    Device(Bdf),
    /// A CPU load or store (MMIO or RAM access).
    Cpu,
}

impl fmt::Display for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Initiator::Device(b) => write!(f, "{b}"),
            Initiator::Cpu => f.write_str("cpu"),
        }
    }
}

/// One step of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// The requester addressed one of its own BARs: the function serves it internally, and
    /// the request never reaches the link.
    Loopback,
    /// ACS on this function or port sent the request past its peers, toward the root complex.
    AcsRedirect {
        /// Where ACS acted (the ingress).
        port: Bdf,
    },
    /// A peer on the same bus claimed the request.
    Peer {
        /// The claimant (a bridge or a function).
        to: Bdf,
    },
    /// Forwarded upstream through this bridge.
    Up {
        /// The bridge.
        bridge: Bdf,
    },
    /// Reached a root complex.
    RootComplex {
        /// The host bridge.
        host_bridge: String,
    },
    /// The root complex translated the address.
    Translated {
        /// What arrived.
        from: DmaAddr,
        /// The CPU physical address it became.
        to: PhysAddr,
    },
    /// The root complex sent the request down a root bus (peer-to-peer through the host
    /// bridge, or a CPU access to MMIO).
    RootBus {
        /// The host bridge whose root bus it went down.
        host_bridge: String,
    },
    /// Forwarded downstream through this bridge.
    Down {
        /// The bridge.
        bridge: Bdf,
    },
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hop::Loopback => f.write_str("loopback"),
            Hop::AcsRedirect { port } => write!(f, "acs-redirect@{port}"),
            Hop::Peer { to } => write!(f, "peer→{to}"),
            Hop::Up { bridge } => write!(f, "up@{bridge}"),
            Hop::RootComplex { host_bridge } => write!(f, "root-complex({host_bridge})"),
            Hop::Translated { from, to } => write!(f, "translate {from}→{to}"),
            Hop::RootBus { host_bridge } => write!(f, "root-bus({host_bridge})"),
            Hop::Down { bridge } => write!(f, "down@{bridge}"),
        }
    }
}

/// Where a transaction landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// System RAM.
    Ram {
        /// CPU physical address of the first byte.
        addr: PhysAddr,
    },
    /// A BAR of a function.
    Bar {
        /// The function.
        bdf: Bdf,
        /// BAR index.
        bar: u8,
        /// Offset of the first byte inside the BAR.
        offset: u64,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Ram { addr } => write!(f, "RAM@{addr}"),
            Target::Bar { bdf, bar, offset } => write!(f, "{bdf} BAR{bar}+{offset:#x}"),
        }
    }
}

/// The route of one segment of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Address the segment was issued at.
    pub addr: u64,
    /// Bytes in the segment.
    pub len: u64,
    /// Steps, in order.
    pub hops: Vec<Hop>,
    /// Where it landed.
    pub target: Target,
}

impl Route {
    /// Whether any hop reached a root complex.
    pub fn via_root_complex(&self) -> bool {
        self.hops
            .iter()
            .any(|h| matches!(h, Hop::RootComplex { .. }))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}:", self.addr, self.len)?;
        for h in &self.hops {
            write!(f, " {h}")?;
        }
        write!(f, " ⇒ {}", self.target)
    }
}

/// A completed transaction: one route per segment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transfer {
    /// The segments, in address order.
    pub segments: Vec<Route>,
}

impl Transfer {
    /// The targets of all segments.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.segments.iter().map(|s| &s.target)
    }
    /// Whether any segment went through a root complex.
    pub fn via_root_complex(&self) -> bool {
        self.segments.iter().any(Route::via_root_complex)
    }
}

/// Where a fault happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// At a bridge (the request was inside its window, or it refused to forward).
    Bridge(Bdf),
    /// On a host bridge's root bus.
    RootBus(String),
    /// In a root complex.
    RootComplex(String),
    /// At the requester itself.
    Requester,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Bridge(b) => write!(f, "bridge {b}"),
            Location::RootBus(h) => write!(f, "root bus of {h}"),
            Location::RootComplex(h) => write!(f, "root complex {h}"),
            Location::Requester => f.write_str("requester"),
        }
    }
}

/// Why a request found no taker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrCause {
    /// No device decodes the address there.
    NoClaimant,
    /// This function's BAR holds the address but its memory decoding is off.
    MemoryDisabled(Bdf),
    /// This function or bridge would take it but is not in D0.
    PowerState(Bdf, PowerState),
    /// This VF's BAR holds the address but the VF is not enabled.
    VfDisabled(Bdf),
    /// This bridge's window holds the address but its memory forwarding (COMMAND.MEM) is off.
    ForwardingDisabled(Bdf),
    /// The CPU physical address is neither RAM nor inside any host bridge's window.
    NoRamOrWindow(PhysAddr),
}

impl fmt::Display for UrCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrCause::NoClaimant => f.write_str("no device decodes the address"),
            UrCause::MemoryDisabled(b) => write!(f, "{b} has memory decoding disabled"),
            UrCause::PowerState(b, s) => write!(f, "{b} is in {s}"),
            UrCause::VfDisabled(b) => write!(f, "VF {b} is not enabled"),
            UrCause::ForwardingDisabled(b) => {
                write!(f, "bridge {b} has memory forwarding (COMMAND.MEM) off")
            }
            UrCause::NoRamOrWindow(p) => {
                write!(
                    f,
                    "CPU address {p} is neither RAM nor in a host bridge window"
                )
            }
        }
    }
}

/// Why a transaction failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultReason {
    /// The requester is a VF that is not enabled.
    RequesterNotPresent,
    /// The requester is not in D0 and cannot master the bus.
    RequesterPowerState(PowerState),
    /// Bus Master Enable is off on the requester, or on a bridge that would forward upward.
    BusMasterDisabled(Bdf),
    /// Nobody took the request (PCIe Unsupported Request).
    UnsupportedRequest {
        /// Where it died.
        at: Location,
        /// Why.
        cause: UrCause,
    },
    /// The root complex's translator refused the address (an IOMMU fault).
    Translation(TranslationFault),
    /// A peer-to-peer request reached a root complex that does not forward it.
    P2pNotForwarded {
        /// The host bridge it came in through.
        from: String,
        /// The host bridge whose window holds the address.
        to: String,
    },
    /// The transaction's addresses run past 2^64.
    AddressOverflow,
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultReason::RequesterNotPresent => f.write_str("requester is not present"),
            FaultReason::RequesterPowerState(s) => {
                write!(f, "requester is in {s} and cannot master the bus")
            }
            FaultReason::BusMasterDisabled(b) => write!(f, "Bus Master Enable is off on {b}"),
            FaultReason::UnsupportedRequest { at, cause } => {
                write!(f, "Unsupported Request at {at}: {cause}")
            }
            FaultReason::Translation(t) => write!(f, "translation fault: {t}"),
            FaultReason::P2pNotForwarded { from, to } => {
                if from == to {
                    write!(
                        f,
                        "root complex {from} does not forward peer-to-peer requests"
                    )
                } else {
                    write!(
                        f,
                        "peer-to-peer from host bridge {from} to {to} is not forwarded"
                    )
                }
            }
            FaultReason::AddressOverflow => f.write_str("address range runs past 2^64"),
        }
    }
}

/// A failed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaFault {
    /// Who issued it.
    pub initiator: Initiator,
    /// Read or write.
    pub access: Access,
    /// Start address of the whole transaction.
    pub addr: u64,
    /// Length of the whole transaction.
    pub len: u64,
    /// Bytes that completed before the failing segment (earlier segments did land).
    pub completed: u64,
    /// The hops of the failing segment, up to where it died.
    pub hops: Vec<Hop>,
    /// Why it failed.
    pub reason: FaultReason,
}

impl DmaFault {
    /// Address of the first byte that failed.
    pub fn fault_addr(&self) -> u64 {
        self.addr.wrapping_add(self.completed)
    }
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} of {:#x} bytes at {:#x} failed at {:#x}: {}",
            self.initiator,
            self.access.as_str(),
            self.len,
            self.addr,
            self.fault_addr(),
            self.reason
        )?;
        if !self.hops.is_empty() {
            f.write_str(" (via")?;
            for h in &self.hops {
                write!(f, " {h}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl std::error::Error for DmaFault {}

impl crate::errno::AsErrno for DmaFault {
    fn errno(&self) -> crate::errno::Errno {
        crate::errno::Errno::EIO
    }
}

/// The address being routed and how many more bytes the decisions so far hold for.
struct Cursor {
    addr: u64,
    room: u64,
}

impl Cursor {
    /// Tests `addr ∈ span` and narrows `room` to where the answer stays the same.
    fn test(&mut self, span: Option<Span>) -> bool {
        let Some(s) = span else { return false };
        match s.last() {
            Some(last) if s.contains(self.addr) => {
                self.room = self.room.min(last - self.addr);
                true
            }
            Some(_) => {
                if s.start > self.addr {
                    self.room = self.room.min(s.start - self.addr - 1);
                }
                false
            }
            None => false,
        }
    }
}

enum Claim {
    No,
    Bridge,
    Bar(u8, Span),
    Disabled(UrCause),
}

type Routed = Result<Target, (FaultReason, Vec<Hop>)>;

impl Fabric {
    /// Routes a DMA write from `requester` and stores the bytes where it lands.
    pub fn dma_write(
        &self,
        requester: Bdf,
        addr: DmaAddr,
        data: &[u8],
    ) -> Result<Transfer, DmaFault> {
        let started = self.dma_start_tick();
        let mut work = Vec::new();
        let t = self.transfer(
            Initiator::Device(requester),
            addr.get(),
            data.len() as u64,
            Access::Write,
            |fab, t, at, n| {
                work.extend(fab.store(t, &data[at..at + n]));
            },
        );
        self.run_model_effects(work);
        let t = t?;
        self.notify_dma(requester, &t, true, started);
        Ok(t)
    }

    /// Routes a DMA read from `requester` and fills `buf` from where it lands.
    pub fn dma_read(
        &self,
        requester: Bdf,
        addr: DmaAddr,
        buf: &mut [u8],
    ) -> Result<Transfer, DmaFault> {
        let len = buf.len() as u64;
        let started = self.dma_start_tick();
        let t = self.transfer(
            Initiator::Device(requester),
            addr.get(),
            len,
            Access::Read,
            |fab, t, at, n| {
                fab.load(t, &mut buf[at..at + n]);
            },
        )?;
        self.notify_dma(requester, &t, false, started);
        Ok(t)
    }

    /// Routes a DMA without moving data: where would it go?
    pub fn route(
        &self,
        requester: Bdf,
        addr: DmaAddr,
        len: u64,
        access: Access,
    ) -> Result<Transfer, DmaFault> {
        self.transfer(
            Initiator::Device(requester),
            addr.get(),
            len,
            access,
            |_, _, _, _| {},
        )
    }

    /// A CPU store to a physical address (RAM or MMIO through a host bridge window).
    pub fn cpu_write(&self, addr: PhysAddr, data: &[u8]) -> Result<Transfer, DmaFault> {
        let mut work = Vec::new();
        let t = self.transfer(
            Initiator::Cpu,
            addr.get(),
            data.len() as u64,
            Access::Write,
            |fab, t, at, n| {
                work.extend(fab.store(t, &data[at..at + n]));
            },
        );
        self.run_model_effects(work);
        t
    }

    /// A CPU load from a physical address.
    pub fn cpu_read(&self, addr: PhysAddr, buf: &mut [u8]) -> Result<Transfer, DmaFault> {
        let len = buf.len() as u64;
        self.transfer(
            Initiator::Cpu,
            addr.get(),
            len,
            Access::Read,
            |fab, t, at, n| {
                fab.load(t, &mut buf[at..at + n]);
            },
        )
    }

    /// Stores the bytes; a device model's register write may leave work for afterwards
    /// ([`Fabric::run_model_effects`], once no lock of the transfer is held).
    fn store(&self, target: Target, data: &[u8]) -> Option<(FnId, crate::model::Effect)> {
        match target {
            Target::Ram { addr } => sync::lock(&self.ram).write(addr.get(), data),
            Target::Bar { bdf, bar, offset } => {
                if let Ok(id) = self.id(bdf) {
                    let f = &self.funcs[id];
                    let mut m = sync::lock(&f.mem[usize::from(bar)]);
                    match f.model.filter(|x| x.owns(bar)) {
                        Some(model) => return model.store(&mut m, offset, data).map(|e| (id, e)),
                        None => m.write(offset, data),
                    }
                }
            }
        }
        None
    }

    fn load(&self, target: Target, buf: &mut [u8]) {
        match target {
            Target::Ram { addr } => sync::lock(&self.ram).read(addr.get(), buf),
            Target::Bar { bdf, bar, offset } => {
                if let Ok(id) = self.id(bdf) {
                    let f = &self.funcs[id];
                    let mut m = sync::lock(&f.mem[usize::from(bar)]);
                    match f.model.filter(|x| x.owns(bar)) {
                        Some(model) => model.load(&mut m, offset, buf),
                        None => m.read(offset, buf),
                    }
                }
            }
        }
    }

    fn transfer(
        &self,
        initiator: Initiator,
        addr: u64,
        len: u64,
        access: Access,
        mut data: impl FnMut(&Fabric, Target, usize, usize),
    ) -> Result<Transfer, DmaFault> {
        let mut out = Transfer::default();
        let fault = |completed, hops, reason| DmaFault {
            initiator,
            access,
            addr,
            len,
            completed,
            hops,
            reason,
        };
        if len == 0 {
            return Ok(out);
        }
        if Span::new(addr, len).is_err() {
            let f = fault(0, Vec::new(), FaultReason::AddressOverflow);
            self.log_fault(&f);
            return Err(f);
        }
        if let Initiator::Device(bdf) = initiator {
            if let Err(reason) = self.check_requester(bdf) {
                let f = fault(0, Vec::new(), reason);
                self.log_fault(&f);
                return Err(f);
            }
        }
        let mut done = 0u64;
        while done < len {
            let at = addr + done;
            let mut cur = Cursor {
                addr: at,
                room: len - done - 1,
            };
            let mut hops = Vec::new();
            let routed = match initiator {
                Initiator::Device(bdf) => self.route_up(bdf, &mut cur, &mut hops, access),
                Initiator::Cpu => self.decode_phys(None, &mut cur, &mut hops),
            };
            match routed {
                Ok(target) => {
                    let n = cur.room + 1;
                    // `n <= len - done`, and `len` is a slice length on the data paths.
                    data(self, target, done as usize, n as usize);
                    self.transactions.fetch_add(1, Ordering::Relaxed);
                    out.segments.push(Route {
                        addr: at,
                        len: n,
                        hops,
                        target,
                    });
                    done += n;
                }
                Err((reason, hops)) => {
                    let f = fault(done, hops, reason);
                    self.log_fault(&f);
                    return Err(f);
                }
            }
        }
        Ok(out)
    }

    fn check_requester(&self, bdf: Bdf) -> Result<(), FaultReason> {
        let Ok(f) = self.function(bdf) else {
            return Err(FaultReason::RequesterNotPresent);
        };
        if !self.present(f) {
            return Err(FaultReason::RequesterNotPresent);
        }
        let power = self.power_state(bdf).unwrap_or(PowerState::D0);
        if power != PowerState::D0 {
            return Err(FaultReason::RequesterPowerState(power));
        }
        if decode::command(&sync::read(&f.cfg)) & regs::COMMAND_MASTER == 0 {
            return Err(FaultReason::BusMasterDisabled(bdf));
        }
        Ok(())
    }

    /// Whether ACS on this function or port keeps its requests away from its peers.
    fn acs_blocks_peers(&self, id: FnId) -> bool {
        let f = &self.funcs[id];
        decode::acs_ctrl(&sync::read(&f.cfg), &f.caps)
            .is_some_and(|c| c & (regs::ACS_RR | regs::ACS_EC) != 0)
    }

    fn route_up(
        &self,
        requester: Bdf,
        cur: &mut Cursor,
        hops: &mut Vec<Hop>,
        access: Access,
    ) -> Routed {
        let mut node = self
            .id(requester)
            .map_err(|_| (FaultReason::RequesterNotPresent, Vec::new()))?;
        if !self.funcs[node].kind.is_bridge() {
            if let claim @ Claim::Bar(..) = self.claim(node, cur) {
                hops.push(Hop::Loopback);
                return self.deliver(node, &claim, cur, hops);
            }
        }
        let mut redirected = false;
        loop {
            match self.funcs[node].parent {
                Parent::HostBridge(h) => return self.root_complex(h, requester, cur, hops, access),
                Parent::Bridge(b) => {
                    if !redirected && self.acs_blocks_peers(node) {
                        redirected = true;
                        hops.push(Hop::AcsRedirect {
                            port: self.funcs[node].bdf,
                        });
                    }
                    let mut disabled = None;
                    if !redirected {
                        for &sib in &self.funcs[b].children {
                            if sib == node {
                                continue;
                            }
                            match self.claim(sib, cur) {
                                Claim::No => {}
                                Claim::Disabled(c) => {
                                    disabled.get_or_insert(c);
                                }
                                claim => {
                                    hops.push(Hop::Peer {
                                        to: self.funcs[sib].bdf,
                                    });
                                    return self.deliver(sib, &claim, cur, hops);
                                }
                            }
                        }
                    }
                    let bf = &self.funcs[b];
                    if !redirected {
                        if let claim @ Claim::Bar(..) = self.claim_bars(bf, cur) {
                            hops.push(Hop::Peer { to: bf.bdf });
                            return self.deliver(b, &claim, cur, hops);
                        }
                    }
                    let (w, cmd, power) = {
                        let c = sync::read(&bf.cfg);
                        (
                            decode::windows(&c),
                            decode::command(&c),
                            decode::power_state(&c, &bf.caps),
                        )
                    };
                    let in_mem = cur.test(w.mem);
                    let in_pref = cur.test(w.pref);
                    if (in_mem || in_pref) && !redirected {
                        let cause = disabled.unwrap_or(UrCause::NoClaimant);
                        return Err((
                            FaultReason::UnsupportedRequest {
                                at: Location::Bridge(bf.bdf),
                                cause,
                            },
                            std::mem::take(hops),
                        ));
                    }
                    if power != PowerState::D0 {
                        return Err((
                            FaultReason::UnsupportedRequest {
                                at: Location::Bridge(bf.bdf),
                                cause: UrCause::PowerState(bf.bdf, power),
                            },
                            std::mem::take(hops),
                        ));
                    }
                    if cmd & regs::COMMAND_MASTER == 0 {
                        return Err((FaultReason::BusMasterDisabled(bf.bdf), std::mem::take(hops)));
                    }
                    hops.push(Hop::Up { bridge: bf.bdf });
                    node = b;
                }
            }
        }
    }

    fn root_complex(
        &self,
        h: usize,
        requester: Bdf,
        cur: &mut Cursor,
        hops: &mut Vec<Hop>,
        access: Access,
    ) -> Routed {
        let hb = &self.host_bridges[h];
        hops.push(Hop::RootComplex {
            host_bridge: hb.name.clone(),
        });
        let translator = sync::read(&self.translator).clone();
        let t = translator
            .translate(requester, DmaAddr(cur.addr), access)
            .map_err(|e| (FaultReason::Translation(e), std::mem::take(hops)))?;
        cur.room = cur.room.min(t.contiguous.saturating_sub(1));
        if t.phys.get() != cur.addr {
            hops.push(Hop::Translated {
                from: DmaAddr(cur.addr),
                to: t.phys,
            });
        }
        cur.addr = t.phys.get();
        self.decode_phys(Some(h), cur, hops)
    }

    /// Root-complex decode of a CPU physical address: RAM, or down a host bridge's root bus.
    /// `origin` is the host bridge a device request came in through (`None` for the CPU).
    fn decode_phys(&self, origin: Option<usize>, cur: &mut Cursor, hops: &mut Vec<Hop>) -> Routed {
        // Host bridge windows first: where one covers RAM (the PCI hole) the window wins.
        let mut hit = None;
        for (i, hb) in self.host_bridges.iter().enumerate() {
            for w in &hb.mmio {
                if cur.test(Some(Span {
                    start: w.cpu,
                    len: w.size,
                })) && hit.is_none()
                {
                    hit = Some((i, *w));
                }
            }
        }
        if hit.is_none() {
            let mut in_ram = false;
            for r in &self.platform.ram {
                in_ram |= cur.test(Some(Span {
                    start: r.cpu,
                    len: r.size,
                }));
            }
            if in_ram {
                return Ok(Target::Ram {
                    addr: PhysAddr(cur.addr),
                });
            }
        }
        let here = |o: Option<usize>| {
            o.map_or_else(|| "cpu".to_string(), |o| self.host_bridges[o].name.clone())
        };
        let Some((t, w)) = hit else {
            return Err((
                FaultReason::UnsupportedRequest {
                    at: Location::RootComplex(here(origin)),
                    cause: UrCause::NoRamOrWindow(PhysAddr(cur.addr)),
                },
                std::mem::take(hops),
            ));
        };
        if let Some(o) = origin {
            let (po, pt) = (self.host_bridges[o].p2p, self.host_bridges[t].p2p);
            let allowed = if o == t {
                po != P2pForwarding::None
            } else {
                po == P2pForwarding::Any && pt == P2pForwarding::Any
            };
            if !allowed {
                return Err((
                    FaultReason::P2pNotForwarded {
                        from: here(Some(o)),
                        to: here(Some(t)),
                    },
                    std::mem::take(hops),
                ));
            }
        }
        cur.addr = cur.addr - w.cpu + w.bus;
        let hb = &self.host_bridges[t];
        hops.push(Hop::RootBus {
            host_bridge: hb.name.clone(),
        });
        self.offer_down(
            &hb.root_children,
            Location::RootBus(hb.name.clone()),
            cur,
            hops,
        )
    }

    /// Offers a request to the devices on one bus, going down; if none takes it, it is an
    /// Unsupported Request at `at` (naming a device that would have taken it if enabled).
    fn offer_down(
        &self,
        bus: &[FnId],
        at: Location,
        cur: &mut Cursor,
        hops: &mut Vec<Hop>,
    ) -> Routed {
        let mut disabled = None;
        for &c in bus {
            match self.claim(c, cur) {
                Claim::No => {}
                Claim::Disabled(cause) => {
                    disabled.get_or_insert(cause);
                }
                claim => return self.deliver(c, &claim, cur, hops),
            }
        }
        Err((
            FaultReason::UnsupportedRequest {
                at,
                cause: disabled.unwrap_or(UrCause::NoClaimant),
            },
            std::mem::take(hops),
        ))
    }

    fn deliver(&self, id: FnId, claim: &Claim, cur: &mut Cursor, hops: &mut Vec<Hop>) -> Routed {
        let f = &self.funcs[id];
        if let Claim::Bar(bar, span) = claim {
            return Ok(Target::Bar {
                bdf: f.bdf,
                bar: *bar,
                offset: cur.addr - span.start,
            });
        }
        hops.push(Hop::Down { bridge: f.bdf });
        self.offer_down(&f.children, Location::Bridge(f.bdf), cur, hops)
    }

    /// Whether function `id` takes a memory request for `cur.addr` on its primary side.
    fn claim(&self, id: FnId, cur: &mut Cursor) -> Claim {
        let f = &self.funcs[id];
        if f.kind.is_bridge() {
            // A bridge's own BARs (BAR0/1) are decoded on its primary side, before its
            // forwarding windows.
            if let claim @ (Claim::Bar(..) | Claim::Disabled(_)) = self.claim_bars(f, cur) {
                return claim;
            }
            let (w, cmd, power) = {
                let c = sync::read(&f.cfg);
                (
                    decode::windows(&c),
                    decode::command(&c),
                    decode::power_state(&c, &f.caps),
                )
            };
            let a = cur.test(w.mem);
            let b = cur.test(w.pref);
            if !(a || b) {
                return Claim::No;
            }
            if cmd & regs::COMMAND_MEMORY == 0 {
                return Claim::Disabled(UrCause::ForwardingDisabled(f.bdf));
            }
            if power != PowerState::D0 {
                return Claim::Disabled(UrCause::PowerState(f.bdf, power));
            }
            return Claim::Bridge;
        }
        self.claim_bars(f, cur)
    }

    /// Whether one of the function's own memory BARs takes the request.
    fn claim_bars(&self, f: &crate::function::Function, cur: &mut Cursor) -> Claim {
        let mut hit = None;
        for bar in f.bars().filter(|b| b.kind.is_mem()) {
            let span = self.bar_span(f, bar);
            if cur.test(span) && hit.is_none() {
                hit = span.map(|s| (bar.index, s));
            }
        }
        let Some((index, span)) = hit else {
            return Claim::No;
        };
        if !self.present(f) {
            return Claim::Disabled(UrCause::VfDisabled(f.bdf));
        }
        let mem_on = match f.pf {
            None => decode::command(&sync::read(&f.cfg)) & regs::COMMAND_MEMORY != 0,
            Some(pf) => {
                let pf = &self.funcs[pf];
                decode::sriov(&sync::read(&pf.cfg), &pf.caps).is_some_and(|s| s.mse)
            }
        };
        if !mem_on {
            return Claim::Disabled(UrCause::MemoryDisabled(f.bdf));
        }
        let power = self.power_state(f.bdf).unwrap_or(PowerState::D0);
        if power != PowerState::D0 {
            return Claim::Disabled(UrCause::PowerState(f.bdf, power));
        }
        Claim::Bar(index, span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_narrows_to_the_stable_range() {
        let mut c = Cursor {
            addr: 0x1000,
            room: u64::MAX,
        };
        assert!(c.test(Some(Span {
            start: 0x0,
            len: 0x4000
        })));
        assert_eq!(c.room, 0x2fff);
        assert!(!c.test(Some(Span {
            start: 0x2000,
            len: 0x100
        })));
        assert_eq!(c.room, 0xfff);
        assert!(!c.test(Some(Span {
            start: 0x0,
            len: 0x800
        })));
        assert_eq!(c.room, 0xfff);
        assert!(!c.test(None));
    }

    #[test]
    fn cursor_at_the_top_of_the_space() {
        let mut c = Cursor {
            addr: u64::MAX,
            room: 0,
        };
        assert!(c.test(Some(Span {
            start: u64::MAX - 0xfff,
            len: 0x1000
        })));
        assert_eq!(c.room, 0);
    }
}
