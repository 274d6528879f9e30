//! A register-level model of an SMMUv3, for host tests of the driver (and
//! of code built on it).
//!
//! [`SmmuModel`] implements [`Mmio`] over the register pages of an SMMU
//! with configurable ID registers ([`IdrBuilder`]) and behaves like the
//! hardware the spec (Arm IHI 0070) describes, synchronously:
//!
//! * CR0 enables are acknowledged in CR0ACK, GBPA changes only with its
//!   UPDATE protocol, IRQ_CTRL is acknowledged in IRQ_CTRLACK; base and
//!   attribute registers written while their unit is enabled are flagged
//!   ([`SmmuModel::violations`]);
//! * writing CMDQ_PROD runs the command queue: commands are decoded from
//!   memory with the model's own code, an illegal one stops the queue with
//!   CMDQ_CONS.ERR and GERROR.CMDQ_ERR (restarting once software
//!   acknowledges through GERRORN), CMD_SYNC completes (writing its MSI
//!   when asked). The queue can be throttled (a few commands per CONS read,
//!   so software sees a full queue) or made to never complete a CMD_SYNC;
//! * [`SmmuModel::dma`] translates a transaction through *caches* — L1STD,
//!   STE, L1CD and CD configuration caches, a TLB and walk caches — filled
//!   with the independent [`walker`] and emptied only by
//!   the CMD_CFGI_* / CMD_TLBI_* commands the spec says empty them. So a
//!   test sees stale configuration or translations exactly when the driver
//!   forgot an invalidation. Faults push event records into the event
//!   queue (with overflow signalled through EVENTQ_PROD.OVFLG);
//! * on a non-coherent SMMU (IDR0.COHACC = 0) with
//!   [`SmmuModel::check_flushes`], reading a structure or queue word the
//!   CPU wrote but never cleaned is a violation.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::cell::RefCell;

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaMemory, Mmio, PhysAddr};

use super::caps::{IdrBuilder, SmmuCapabilities};
use super::events::{EventKind, FaultClass};
use super::regs::{self, cr0, gbpa, gerror, queue};
use super::walker::{
    self, Context, ExternalAbort, Fetch, Request, StreamConfig, StreamTable, Trace, WalkError,
    WalkerConfig,
};

/// A command as the model decoded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    PrefetchConfig {
        sid: u32,
    },
    CfgiSte {
        sid: u32,
        leaf: bool,
    },
    CfgiSteRange {
        sid: u32,
        range: u8,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
        leaf: bool,
    },
    CfgiCdAll {
        sid: u32,
    },
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    TlbiNhVa {
        vmid: u16,
        asid: u16,
        addr: u64,
        pages: u64,
        leaf: bool,
    },
    TlbiEl2All,
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiS2Ipa {
        vmid: u16,
        addr: u64,
        pages: u64,
        leaf: bool,
    },
    TlbiNsnhAll,
    Sync {
        msi: Option<(u64, u32)>,
    },
}

/// Something the model saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelEvent {
    Gbpa(u32),
    Cr0(u32),
    Cr1(u32),
    Cr2(u32),
    IrqCtrl(u32),
    StrtabBase(u64),
    StrtabBaseCfg(u32),
    CmdqBase(u64),
    EventqBase(u64),
    Gerrorn(u32),
    /// A command was consumed.
    Command(Cmd),
    /// The queue stopped at `index` with CMDQ_CONS.ERR = `code`.
    CommandError {
        index: u32,
        code: u32,
    },
    /// An event record was written (or lost to overflow).
    Event {
        kind: EventKind,
        sid: u32,
        lost: bool,
    },
}

/// Parts of the model that can be made to never complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stuck {
    /// CR0ACK never follows CR0.
    pub cr0: bool,
    /// GBPA.UPDATE never clears.
    pub gbpa: bool,
    /// CMD_SYNC is never consumed.
    pub sync: bool,
}

/// A transaction the model let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaOutcome {
    pub phys: PhysAddr,
    /// Whether the translation came from the TLB.
    pub cached: bool,
    /// Whether the SMMU was disabled and the transaction bypassed (GBPA).
    pub bypassed: bool,
}

/// TLB entry tags: stage-1 (and nested) entries by VMID and ASID,
/// stage-2-only entries by VMID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tag {
    S1 { vmid: u16, asid: u16 },
    S2 { vmid: u16 },
}

#[derive(Debug, Clone, Copy)]
struct TlbEntry {
    size: u64,
    out: u64,
    read: bool,
    write: bool,
    user: bool,
}

struct Queue {
    base: u64,
    log2: u32,
}

impl Queue {
    fn index_mask(&self) -> u32 {
        (1 << self.log2) - 1
    }
    fn wrap_mask(&self) -> u32 {
        (1 << (self.log2 + 1)) - 1
    }
}

struct State {
    cr0: u32,
    cr0ack: u32,
    cr1: u32,
    cr2: u32,
    gbpa: u32,
    irq_ctrl: u32,
    gerror: u32,
    gerrorn: u32,
    strtab_base: u64,
    strtab_cfg: u32,
    cmdq_base: u64,
    cmdq_prod: u32,
    cmdq_cons: u32,
    eventq_base: u64,
    eventq_prod: u32,
    eventq_cons: u32,
    plain32: BTreeMap<usize, u32>,
    plain64: BTreeMap<usize, u64>,
    stuck: Stuck,
    throttle: Option<u32>,
    events: Vec<ModelEvent>,
    violations: Vec<&'static str>,
    abort_ranges: Vec<(u64, u64)>,
    // Configuration caches: (address, words).
    l1std_cache: BTreeMap<u32, (u64, u64)>,
    ste_cache: BTreeMap<u32, (u64, [u64; 8])>,
    l1cd_cache: BTreeMap<(u32, u32), (u64, u64)>,
    cd_cache: BTreeMap<(u32, u32), (u64, [u64; 8])>,
    tlb: BTreeMap<(Tag, u64), TlbEntry>,
    /// (tag, level, input prefix above the level's table) → table PA.
    walk_cache: BTreeMap<(Tag, u8, u64), u64>,
}

/// The model. See the module documentation.
pub struct SmmuModel<'m> {
    mem: &'m dyn DmaMemory,
    flush_check: Option<&'m ModelMemory>,
    idr: IdrBuilder,
    caps: SmmuCapabilities,
    state: RefCell<State>,
}

/// Offsets of the model's 32- and 64-bit registers that just hold values.
const PLAIN32: [usize; 4] = [
    regs::GERROR_IRQ_CFG1.offset(),
    regs::GERROR_IRQ_CFG2.offset(),
    regs::EVENTQ_IRQ_CFG1.offset(),
    regs::EVENTQ_IRQ_CFG2.offset(),
];
const PLAIN64: [usize; 2] = [
    regs::GERROR_IRQ_CFG0.offset(),
    regs::EVENTQ_IRQ_CFG0.offset(),
];

impl<'m> SmmuModel<'m> {
    /// An SMMU with the ID registers of `idr` whose structures live in
    /// `mem`, out of reset: everything disabled, GBPA = bypass.
    pub fn new(mem: &'m dyn DmaMemory, idr: IdrBuilder) -> Self {
        Self {
            mem,
            flush_check: None,
            idr,
            caps: idr.capabilities(),
            state: RefCell::new(State {
                cr0: 0,
                cr0ack: 0,
                cr1: 0,
                cr2: 0,
                gbpa: 0,
                irq_ctrl: 0,
                gerror: 0,
                gerrorn: 0,
                strtab_base: 0,
                strtab_cfg: 0,
                cmdq_base: 0,
                cmdq_prod: 0,
                cmdq_cons: 0,
                eventq_base: 0,
                eventq_prod: 0,
                eventq_cons: 0,
                plain32: BTreeMap::new(),
                plain64: BTreeMap::new(),
                stuck: Stuck::default(),
                throttle: None,
                events: Vec::new(),
                violations: Vec::new(),
                abort_ranges: Vec::new(),
                l1std_cache: BTreeMap::new(),
                ste_cache: BTreeMap::new(),
                l1cd_cache: BTreeMap::new(),
                cd_cache: BTreeMap::new(),
                tlb: BTreeMap::new(),
                walk_cache: BTreeMap::new(),
            }),
        }
    }

    /// On a non-coherent SMMU, flags reads of words `mem` says were
    /// written but never flushed.
    pub fn check_flushes(mut self, mem: &'m ModelMemory) -> Self {
        self.flush_check = Some(mem);
        mem.set_track_flushes(true);
        self
    }

    pub fn capabilities(&self) -> &SmmuCapabilities {
        &self.caps
    }

    pub fn idr(&self) -> IdrBuilder {
        self.idr
    }

    pub fn walker_config(&self) -> WalkerConfig {
        WalkerConfig::from_caps(&self.caps)
    }

    // ---- test controls and observations -----------------------------------

    pub fn set_stuck(&self, stuck: Stuck) {
        self.state.borrow_mut().stuck = stuck;
    }

    /// Consume at most `n` commands each time CMDQ_CONS is read (and none
    /// on CMDQ_PROD writes), so the queue fills up; `None`: consume
    /// everything on each PROD write.
    pub fn set_throttle(&self, n: Option<u32>) {
        self.state.borrow_mut().throttle = n;
    }

    /// Reads of `[start, end)` by the SMMU get an external abort.
    pub fn add_abort_range(&self, start: u64, end: u64) {
        self.state.borrow_mut().abort_ranges.push((start, end));
    }

    /// Puts the SMMU in the state firmware may leave it in: enabled with
    /// the given stream table, queues off, GBPA = bypass.
    pub fn preset_enabled(&self, strtab_base: u64, strtab_cfg: u32) {
        let mut st = self.state.borrow_mut();
        st.strtab_base = strtab_base;
        st.strtab_cfg = strtab_cfg;
        st.cr0 = cr0::SMMUEN;
        st.cr0ack = cr0::SMMUEN;
        st.gbpa = 0;
    }

    /// Raises global errors as the hardware would (toggling GERROR bits).
    pub fn raise_global_error(&self, bits: u32) {
        let mut st = self.state.borrow_mut();
        let inactive = !(st.gerror ^ st.gerrorn);
        st.gerror ^= bits & inactive;
    }

    pub fn events(&self) -> Vec<ModelEvent> {
        self.state.borrow().events.clone()
    }

    pub fn clear_events(&self) {
        self.state.borrow_mut().events.clear();
    }

    /// The commands consumed, oldest first.
    pub fn commands(&self) -> Vec<Cmd> {
        self.state
            .borrow()
            .events
            .iter()
            .filter_map(|e| match e {
                ModelEvent::Command(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    /// Programming errors the model detected (empty for a correct driver).
    pub fn violations(&self) -> Vec<&'static str> {
        self.state.borrow().violations.clone()
    }

    pub fn cr0(&self) -> u32 {
        self.state.borrow().cr0
    }

    pub fn gbpa(&self) -> u32 {
        self.state.borrow().gbpa
    }

    pub fn enabled(&self) -> bool {
        self.state.borrow().cr0ack & cr0::SMMUEN != 0
    }

    /// SMMU_STRTAB_BASE and STRTAB_BASE_CFG as programmed.
    pub fn stream_table(&self) -> StreamTable {
        let st = self.state.borrow();
        StreamTable {
            base: st.strtab_base,
            cfg: st.strtab_cfg,
        }
    }

    /// Active global errors (GERROR ^ GERRORN).
    pub fn active_global_errors(&self) -> u32 {
        let st = self.state.borrow();
        st.gerror ^ st.gerrorn
    }

    pub fn tlb_entries(&self) -> usize {
        self.state.borrow().tlb.len()
    }

    pub fn cached_stes(&self) -> usize {
        self.state.borrow().ste_cache.len()
    }

    /// Every StreamID with a cached STE.
    pub fn cached_stream_ids(&self) -> BTreeSet<u32> {
        self.state.borrow().ste_cache.keys().copied().collect()
    }

    /// Event records written and not yet consumed by software.
    pub fn pending_events(&self) -> u32 {
        let st = self.state.borrow();
        let log2 = (st.eventq_base & queue::LOG2SIZE_MASK) as u32;
        let mask = (1u32 << (log2 + 1)) - 1;
        (st.eventq_prod.wrapping_sub(st.eventq_cons)) & mask
    }

    // ---- memory as the SMMU sees it ---------------------------------------

    fn note_unflushed(&self, st: &mut State, addr: u64) {
        if self.caps.coherent {
            return;
        }
        if let Some(m) = self.flush_check
            && m.unflushed_words().contains(&PhysAddr::new(addr & !7))
        {
            st.violations
                .push("the SMMU read a word the CPU never cleaned to memory (COHACC = 0)");
        }
    }

    fn read_checked(&self, st: &mut State, addr: u64) -> Result<u64, ExternalAbort> {
        if st.abort_ranges.iter().any(|&(s, e)| s <= addr && addr < e) {
            return Err(ExternalAbort);
        }
        self.note_unflushed(st, addr);
        Ok(self.mem.read_u64(PhysAddr::new(addr)))
    }

    // ---- command queue ------------------------------------------------------

    fn cmdq(st: &State) -> Queue {
        Queue {
            base: st.cmdq_base & queue::ADDR_MASK,
            log2: (st.cmdq_base & queue::LOG2SIZE_MASK) as u32,
        }
    }

    fn process_commands(&self, st: &mut State, budget: Option<u32>) {
        let mut budget = budget;
        loop {
            if st.cr0ack & cr0::CMDQEN == 0 || (st.gerror ^ st.gerrorn) & gerror::CMDQ_ERR != 0 {
                return;
            }
            let q = Self::cmdq(st);
            let mask = q.wrap_mask();
            let cons = st.cmdq_cons & mask;
            if cons == st.cmdq_prod & mask {
                return;
            }
            if budget == Some(0) {
                return;
            }
            let index = cons & q.index_mask();
            let addr = q.base + u64::from(index) * 16;
            let words = match (self.read_checked(st, addr), self.read_checked(st, addr + 8)) {
                (Ok(a), Ok(b)) => [a, b],
                _ => {
                    self.command_error(st, index, queue::CERROR_ABT);
                    return;
                }
            };
            let cmd = match self.decode_command(words) {
                Some(c) => c,
                None => {
                    self.command_error(st, index, queue::CERROR_ILL);
                    return;
                }
            };
            if matches!(cmd, Cmd::Sync { .. }) && st.stuck.sync {
                return;
            }
            self.execute(st, cmd);
            st.events.push(ModelEvent::Command(cmd));
            st.cmdq_cons = (st.cmdq_cons & queue::CONS_ERR_MASK) | ((cons + 1) & mask);
            if let Some(b) = budget.as_mut() {
                *b -= 1;
            }
        }
    }

    fn command_error(&self, st: &mut State, index: u32, code: u32) {
        st.cmdq_cons = (st.cmdq_cons & !queue::CONS_ERR_MASK) | (code << queue::CONS_ERR_SHIFT);
        st.gerror ^= gerror::CMDQ_ERR;
        st.events.push(ModelEvent::CommandError { index, code });
    }

    /// Decodes a command (chapter 4), or `None` for CERROR_ILL.
    fn decode_command(&self, w: [u64; 2]) -> Option<Cmd> {
        let op = (w[0] & 0xff) as u8;
        let sid = (w[0] >> 32) as u32;
        let vmid = ((w[0] >> 32) & 0xffff) as u16;
        let asid = (w[0] >> 48) as u16;
        let s1 = self.caps.stage1;
        let s2 = self.caps.stage2;
        // Address-based TLBIs: NUM 16:12, SCALE 24:20, Leaf, TTL 9:8 and
        // TG 11:10 of word 1 (4.4.1.1).
        let ranged = |w: [u64; 2]| -> Option<u64> {
            let num = (w[0] >> 12) & 0x1f;
            let scale = (w[0] >> 20) & 0x1f;
            let ttl = (w[1] >> 8) & 0b11;
            let tg = (w[1] >> 10) & 0b11;
            if tg == 0 {
                if num != 0 || scale != 0 || ttl != 0 {
                    return None;
                }
                return Some(1);
            }
            if !self.caps.range_invalidation || tg != 0b01 {
                return None;
            }
            if num == 0 && scale == 0 && ttl == 0 {
                return None;
            }
            Some((num + 1) << scale)
        };
        Some(match op {
            0x01 => Cmd::PrefetchConfig { sid },
            0x03 => Cmd::CfgiSte {
                sid,
                leaf: w[1] & 1 != 0,
            },
            0x04 => Cmd::CfgiSteRange {
                sid,
                range: (w[1] & 0x1f) as u8,
            },
            0x05 => {
                let ssid = ((w[0] >> 12) & 0xf_ffff) as u32;
                if self.caps.ssid_bits == 0 && ssid != 0 {
                    return None;
                }
                Cmd::CfgiCd {
                    sid,
                    ssid,
                    leaf: w[1] & 1 != 0,
                }
            }
            0x06 => Cmd::CfgiCdAll { sid },
            0x10 if s1 => Cmd::TlbiNhAll { vmid },
            0x11 if s1 => Cmd::TlbiNhAsid { vmid, asid },
            0x12 if s1 => Cmd::TlbiNhVa {
                vmid,
                asid,
                addr: w[1] & !0xfff,
                pages: ranged(w)?,
                leaf: w[1] & 1 != 0,
            },
            0x20 if self.caps.hyp => Cmd::TlbiEl2All,
            0x28 if s2 => Cmd::TlbiS12Vmall { vmid },
            0x2a if s2 => Cmd::TlbiS2Ipa {
                vmid,
                addr: w[1] & 0x000f_ffff_ffff_f000,
                pages: ranged(w)?,
                leaf: w[1] & 1 != 0,
            },
            0x30 => Cmd::TlbiNsnhAll,
            0x46 => {
                let cs = (w[0] >> 12) & 0b11;
                match cs {
                    0b00 => Cmd::Sync { msi: None },
                    0b01 if self.caps.msi => Cmd::Sync {
                        msi: Some((w[1] & 0x000f_ffff_ffff_fffc, (w[0] >> 32) as u32)),
                    },
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    fn execute(&self, st: &mut State, cmd: Cmd) {
        let page = 1u64 << 12;
        match cmd {
            Cmd::PrefetchConfig { .. } | Cmd::TlbiEl2All => {}
            Cmd::CfgiSte { sid, leaf } => {
                st.ste_cache.remove(&sid);
                st.cd_cache.retain(|&(s, _), _| s != sid);
                st.l1cd_cache.retain(|&(s, _), _| s != sid);
                if !leaf {
                    let split = (st.strtab_cfg >> 6) & 0x1f;
                    st.l1std_cache.remove(&(sid >> split.min(31)));
                }
            }
            Cmd::CfgiSteRange { sid, range } => {
                let shift = u32::from(range) + 1;
                let matches = |s: u32| shift >= 32 || (s >> shift) == (sid >> shift);
                st.ste_cache.retain(|&s, _| !matches(s));
                st.cd_cache.retain(|&(s, _), _| !matches(s));
                st.l1cd_cache.retain(|&(s, _), _| !matches(s));
                let split = ((st.strtab_cfg >> 6) & 0x1f).min(31);
                st.l1std_cache.retain(|&i, _| {
                    // Any StreamID behind L1 entry i in the range.
                    let first = u64::from(i) << split;
                    let last = first + (1u64 << split) - 1;
                    if shift >= 32 {
                        return false;
                    }
                    let lo = u64::from(sid >> shift) << shift;
                    let hi = lo + (1u64 << shift) - 1;
                    last < lo || first > hi
                });
            }
            Cmd::CfgiCd { sid, ssid, leaf } => {
                st.cd_cache.remove(&(sid, ssid));
                if !leaf {
                    st.l1cd_cache.retain(|&(s, _), _| s != sid);
                }
            }
            Cmd::CfgiCdAll { sid } => {
                st.cd_cache.retain(|&(s, _), _| s != sid);
                st.l1cd_cache.retain(|&(s, _), _| s != sid);
            }
            Cmd::TlbiNhAll { vmid } => {
                Self::drop_tags(st, |t| matches!(t, Tag::S1 { vmid: v, .. } if v == vmid))
            }
            Cmd::TlbiNhAsid { vmid, asid } => Self::drop_tags(st, |t| t == Tag::S1 { vmid, asid }),
            Cmd::TlbiNhVa {
                vmid,
                asid,
                addr,
                pages,
                leaf,
            } => Self::drop_range(
                st,
                Tag::S1 { vmid, asid },
                addr,
                addr.saturating_add(pages * page),
                leaf,
            ),
            Cmd::TlbiS2Ipa {
                vmid,
                addr,
                pages,
                leaf,
            } => Self::drop_range(
                st,
                Tag::S2 { vmid },
                addr,
                addr.saturating_add(pages * page),
                leaf,
            ),
            Cmd::TlbiS12Vmall { vmid } => Self::drop_tags(st, |t| match t {
                Tag::S1 { vmid: v, .. } | Tag::S2 { vmid: v } => v == vmid,
            }),
            Cmd::TlbiNsnhAll => {
                st.tlb.clear();
                st.walk_cache.clear();
            }
            Cmd::Sync { msi } => {
                if let Some((addr, data)) = msi {
                    self.mem.write_u32(PhysAddr::new(addr), data);
                }
            }
        }
    }

    fn drop_tags(st: &mut State, hit: impl Fn(Tag) -> bool) {
        st.tlb.retain(|&(t, _), _| !hit(t));
        st.walk_cache.retain(|&(t, _, _), _| !hit(t));
    }

    fn drop_range(st: &mut State, tag: Tag, start: u64, end: u64, leaf: bool) {
        st.tlb
            .retain(|&(t, base), e| t != tag || base >= end || base + e.size <= start);
        if !leaf {
            st.walk_cache.retain(|&(t, level, prefix), _| {
                let shift = 12 + 9 * (u32::from(level) + 1);
                let first = if shift >= 64 { 0 } else { prefix << shift };
                let last = if shift >= 64 {
                    u64::MAX
                } else {
                    first | ((1u64 << shift) - 1)
                };
                t != tag || last < start || first >= end
            });
        }
    }

    // ---- event queue ----------------------------------------------------------

    fn eventq(st: &State) -> Queue {
        Queue {
            base: st.eventq_base & queue::ADDR_MASK,
            log2: (st.eventq_base & queue::LOG2SIZE_MASK) as u32,
        }
    }

    fn record_event(&self, st: &mut State, words: [u64; 4]) {
        let kind = EventKind::from_code(words[0] as u8);
        let sid = (words[0] >> 32) as u32;
        if st.cr0ack & cr0::EVENTQEN == 0 {
            st.events.push(ModelEvent::Event {
                kind,
                sid,
                lost: true,
            });
            return;
        }
        let q = Self::eventq(st);
        let mask = q.wrap_mask();
        let prod = st.eventq_prod & mask;
        let cons = st.eventq_cons & mask;
        let full = (prod ^ cons) == 1 << q.log2;
        if full {
            // Overflow: OVFLG toggles if no overflow is pending (7.4).
            let pending = (st.eventq_prod ^ st.eventq_cons) & queue::OVERFLOW != 0;
            if !pending {
                st.eventq_prod ^= queue::OVERFLOW;
            }
            st.events.push(ModelEvent::Event {
                kind,
                sid,
                lost: true,
            });
            return;
        }
        let addr = q.base + u64::from(prod & q.index_mask()) * 32;
        for (i, &w) in words.iter().enumerate() {
            self.mem.write_u64(PhysAddr::new(addr + 8 * i as u64), w);
        }
        st.eventq_prod = (st.eventq_prod & queue::OVERFLOW) | ((prod + 1) & mask);
        st.events.push(ModelEvent::Event {
            kind,
            sid,
            lost: false,
        });
    }

    /// Encodes an event record (7.3) with the model's own code.
    fn encode_event(req: &Request, fault: &walker::Fault) -> [u64; 4] {
        let mut w = [0u64; 4];
        w[0] = u64::from(fault.kind.code()) | (u64::from(req.sid) << 32);
        if let Some(ssid) = req.ssid {
            w[0] |= (1 << 11) | ((u64::from(ssid) & 0xf_ffff) << 12);
        }
        if fault.kind.has_input_address() {
            if !req.write {
                w[1] |= 1 << 35;
            }
            if req.privileged {
                w[1] |= 1 << 33;
            }
            if fault.stage2 {
                w[1] |= 1 << 39;
            }
            w[1] |= fault.class.bits() << 40;
            w[2] = req.iova;
            if let Some(ipa) = fault.ipa {
                w[3] = ipa & 0x00ff_ffff_ffff_f000;
            }
        }
        if let Some(fetch) = fault.fetch_addr {
            w[3] = fetch & 0x00ff_ffff_ffff_fff8;
        }
        w
    }

    /// Writes `words` as an event record, as the SMMU would (for tests of
    /// event decoding and queue wrap).
    pub fn inject_event(&self, words: [u64; 4]) {
        let mut st = self.state.borrow_mut();
        self.record_event(&mut st, words);
    }

    // ---- translation -----------------------------------------------------------

    /// A client transaction: translated through the caches (filled from
    /// memory on a miss), or faulted (recording an event when the
    /// configuration asks for one).
    pub fn dma(&self, req: Request) -> Result<DmaOutcome, WalkError> {
        let mut st = self.state.borrow_mut();
        if st.cr0ack & cr0::SMMUEN == 0 {
            if st.gbpa & gbpa::ABORT != 0 {
                return Err(WalkError::Abort);
            }
            return Ok(DmaOutcome {
                phys: PhysAddr::new(req.iova),
                cached: false,
                bypassed: true,
            });
        }
        let result = self.translate_cached(&mut st, &req);
        if let Err(WalkError::Fault(fault)) = &result
            && fault.record
        {
            let words = Self::encode_event(&req, fault);
            self.record_event(&mut st, words);
        }
        result
    }

    fn translate_cached(&self, st: &mut State, req: &Request) -> Result<DmaOutcome, WalkError> {
        let cfg = self.walker_config();
        let table = StreamTable {
            base: st.strtab_base,
            cfg: st.strtab_cfg,
        };
        // Configuration: cached words are served instead of memory.
        let mut trace = Trace::default();
        let resolved = {
            let view = CachedView {
                model: self,
                st: RefCell::new(&mut *st),
                sid: req.sid,
            };
            let stream = walker::resolve_stream(&view, &cfg, &table, req.sid, &mut trace);
            match &stream {
                Ok(s) => walker::resolve_context(&view, &cfg, s, req.ssid, req.iova, &mut trace)
                    .map(|c| (*s, c)),
                Err(e) => Err(*e),
            }
        };
        self.fill_config_caches(st, req.sid, &trace, &resolved);
        let (stream, context) = resolved?;
        self.translate_tables(st, req, &stream, context)
    }

    fn fill_config_caches(
        &self,
        st: &mut State,
        sid: u32,
        trace: &Trace,
        resolved: &Result<(StreamConfig, Option<Context>), WalkError>,
    ) {
        let fetch_abort = |kind| matches!(resolved, Err(WalkError::Fault(f)) if f.kind == kind);
        if let Some((addr, index)) = trace.l1std
            && !st.l1std_cache.contains_key(&index)
            && !fetch_abort(EventKind::SteFetch)
        {
            let word = self.mem.read_u64(PhysAddr::new(addr));
            st.l1std_cache.insert(index, (addr, word));
        }
        if let Some(addr) = trace.ste
            && !st.ste_cache.contains_key(&sid)
            && !fetch_abort(EventKind::SteFetch)
        {
            st.ste_cache.insert(sid, (addr, self.read_words(addr)));
        }
        // CDs reached through stage 2 are IPAs: not cached here.
        let nested = matches!(resolved, Ok((s, _)) if s.s2.is_some());
        if nested || fetch_abort(EventKind::CdFetch) {
            return;
        }
        if let Some((addr, index)) = trace.l1cd
            && !st.l1cd_cache.contains_key(&(sid, index))
        {
            let word = self.mem.read_u64(PhysAddr::new(addr));
            st.l1cd_cache.insert((sid, index), (addr, word));
        }
        if let Some((addr, index)) = trace.cd
            && !st.cd_cache.contains_key(&(sid, index))
        {
            st.cd_cache
                .insert((sid, index), (addr, self.read_words(addr)));
        }
    }

    fn read_words(&self, addr: u64) -> [u64; 8] {
        let mut w = [0; 8];
        for (i, word) in w.iter_mut().enumerate() {
            *word = self.mem.read_u64(PhysAddr::new(addr + 8 * i as u64));
        }
        w
    }

    fn translate_tables(
        &self,
        st: &mut State,
        req: &Request,
        stream: &StreamConfig,
        context: Option<Context>,
    ) -> Result<DmaOutcome, WalkError> {
        if stream.config == 0b100 {
            return Ok(DmaOutcome {
                phys: PhysAddr::new(req.iova),
                cached: false,
                bypassed: true,
            });
        }
        // Stage-1 entries are tagged with STE.S2VMID when stage 2 is
        // implemented (5.2, S2VMID), VMID 0 otherwise.
        let ste_vmid = if self.caps.stage2 {
            stream.vmid_field
        } else {
            0
        };
        let tag = match (&context, &stream.s2) {
            (Some(ctx), _) => Tag::S1 {
                vmid: ste_vmid,
                asid: ctx.asid,
            },
            (None, Some(s2)) => Tag::S2 { vmid: s2.vmid },
            (None, None) => {
                // Stage 1 bypassed by S1DSS without stage 2.
                return Ok(DmaOutcome {
                    phys: PhysAddr::new(req.iova),
                    cached: false,
                    bypassed: true,
                });
            }
        };
        for size in [1u64 << 12, 1 << 21, 1 << 30] {
            if let Some(e) = st.tlb.get(&(tag, req.iova & !(size - 1))).copied()
                && e.size == size
            {
                let allowed =
                    (req.privileged || e.user) && if req.write { e.write } else { e.read };
                if !allowed {
                    let stage2 = matches!(tag, Tag::S2 { .. });
                    return Err(WalkError::Fault(walker::Fault {
                        kind: EventKind::Permission,
                        stage2,
                        class: FaultClass::Input,
                        ipa: stage2.then_some(req.iova),
                        fetch_addr: None,
                        record: match (&context, &stream.s2) {
                            (Some(c), _) => c.record,
                            (None, Some(s2)) => s2.record,
                            _ => true,
                        },
                    }));
                }
                return Ok(DmaOutcome {
                    phys: PhysAddr::new(e.out + (req.iova & (size - 1))),
                    cached: true,
                    bypassed: false,
                });
            }
        }
        // Walk caches (not for nested walks): the deepest table known.
        let nested = context.is_some() && stream.s2.is_some();
        let mut start = None;
        if !nested {
            for level in 0..4u8 {
                let prefix = req.iova >> (12 + 9 * (u32::from(level) + 1));
                if let Some(&table) = st.walk_cache.get(&(tag, level, prefix)) {
                    start = Some((level, table));
                    break;
                }
            }
        }
        let (s1_start, s2_start) = match tag {
            Tag::S1 { .. } => (start, None),
            Tag::S2 { .. } => (None, start),
        };
        let walked = {
            let view = PlainView {
                model: self,
                st: RefCell::new(&mut *st),
            };
            // A failed walk caches nothing: translation faults are not cached.
            walker::finish(&view, stream, context, req, s1_start, s2_start)
        };
        let (phys, s1, s2) = walked?;
        let leaf = match tag {
            Tag::S1 { .. } => s1.as_ref(),
            Tag::S2 { .. } => s2.as_ref(),
        };
        if !nested
            && let Some(leaf) = leaf
            && let Some(&(level, table)) = leaf.tables.last()
        {
            let prefix = req.iova >> (12 + 9 * (u32::from(level) + 1));
            st.walk_cache.insert((tag, level, prefix), table);
        }
        let (size, read, write, user) = match (&s1, &s2) {
            (Some(a), Some(b)) => (
                a.size.min(b.size),
                a.read && b.read,
                a.write && b.write,
                a.user,
            ),
            (Some(a), None) => (a.size, a.read, a.write, a.user),
            (None, Some(b)) => (b.size, b.read, b.write, true),
            (None, None) => (1 << 12, true, true, true),
        };
        let base = req.iova & !(size - 1);
        st.tlb.insert(
            (tag, base),
            TlbEntry {
                size,
                out: phys - (req.iova - base),
                read,
                write,
                user,
            },
        );
        Ok(DmaOutcome {
            phys: PhysAddr::new(phys),
            cached: false,
            bypassed: false,
        })
    }

    // ---- registers ---------------------------------------------------------------

    fn read_reg32(&self, offset: usize) -> u32 {
        let mut st = self.state.borrow_mut();
        let idr = self.caps.idr;
        match offset {
            0x00 => idr[0],
            0x04 => idr[1],
            0x08 => idr[2],
            0x0c => idr[3],
            0x10 => idr[4],
            0x14 => idr[5],
            0x18 => self.caps.iidr,
            0x1c => self.caps.aidr,
            0x20 => st.cr0,
            0x24 => st.cr0ack,
            0x28 => st.cr1,
            0x2c => st.cr2,
            0x40 => 0,
            0x44 => st.gbpa,
            0x50 => st.irq_ctrl,
            0x54 => st.irq_ctrl,
            0x60 => st.gerror,
            0x64 => st.gerrorn,
            0x88 => st.strtab_cfg,
            0x98 => st.cmdq_prod,
            0x9c => {
                if let Some(n) = st.throttle {
                    self.process_commands(&mut st, Some(n));
                }
                st.cmdq_cons
            }
            o if o == regs::EVENTQ_PROD.offset() => st.eventq_prod,
            o if o == regs::EVENTQ_CONS.offset() => st.eventq_cons,
            o => st.plain32.get(&o).copied().unwrap_or(0),
        }
    }

    fn write_reg32(&self, offset: usize, value: u32) {
        let mut st = self.state.borrow_mut();
        let enabled = st.cr0ack & cr0::SMMUEN != 0;
        match offset {
            0x20 => {
                st.events.push(ModelEvent::Cr0(value));
                let was = st.cr0;
                st.cr0 = value;
                if st.stuck.cr0 {
                    return;
                }
                st.cr0ack = value;
                if value & cr0::SMMUEN != 0 && was & cr0::SMMUEN == 0 {
                    let base = st.strtab_base;
                    if base == 0 {
                        st.violations.push("SMMUEN set without a stream table");
                    }
                }
                if value & cr0::CMDQEN != 0 {
                    self.process_commands(&mut st, None);
                }
            }
            0x28 => {
                st.events.push(ModelEvent::Cr1(value));
                if enabled {
                    st.violations.push("CR1 written while SMMUEN = 1");
                }
                st.cr1 = value;
            }
            0x2c => {
                st.events.push(ModelEvent::Cr2(value));
                if enabled {
                    st.violations.push("CR2 written while SMMUEN = 1");
                }
                st.cr2 = value;
            }
            0x44 => {
                st.events.push(ModelEvent::Gbpa(value));
                if value & gbpa::UPDATE == 0 {
                    st.violations
                        .push("GBPA written without UPDATE: the write has no effect (6.3.14)");
                    return;
                }
                if st.gbpa & gbpa::UPDATE != 0 {
                    st.violations
                        .push("GBPA written while a previous update is in progress");
                }
                st.gbpa = value;
                if !st.stuck.gbpa {
                    st.gbpa &= !gbpa::UPDATE;
                }
            }
            0x50 => {
                st.events.push(ModelEvent::IrqCtrl(value));
                st.irq_ctrl = value;
            }
            0x64 => {
                st.events.push(ModelEvent::Gerrorn(value));
                st.gerrorn = value & gerror::ALL;
                self.process_commands(&mut st, None);
            }
            0x88 => {
                st.events.push(ModelEvent::StrtabBaseCfg(value));
                if enabled {
                    st.violations
                        .push("STRTAB_BASE_CFG written while SMMUEN = 1");
                }
                st.strtab_cfg = value;
            }
            0x98 => {
                let q = Self::cmdq(&st);
                let mask = q.wrap_mask();
                let new = value & mask;
                let cons = st.cmdq_cons & mask;
                if (new.wrapping_sub(cons) & mask) > (1 << q.log2) {
                    st.violations
                        .push("CMDQ_PROD moved past CMDQ_CONS: the command queue overflowed");
                }
                st.cmdq_prod = new;
                if st.throttle.is_none() {
                    self.process_commands(&mut st, None);
                }
            }
            0x9c => {
                if st.cr0ack & cr0::CMDQEN != 0 {
                    st.violations.push("CMDQ_CONS written while CMDQEN = 1");
                }
                st.cmdq_cons = value & queue::POINTER_MASK;
            }
            o if o == regs::EVENTQ_PROD.offset() => {
                if st.cr0ack & cr0::EVENTQEN != 0 {
                    st.violations.push("EVENTQ_PROD written while EVENTQEN = 1");
                }
                st.eventq_prod = value & (queue::POINTER_MASK | queue::OVERFLOW);
            }
            o if o == regs::EVENTQ_CONS.offset() => {
                let q = Self::eventq(&st);
                let mask = q.wrap_mask();
                let new = value & mask;
                let prod = st.eventq_prod & mask;
                let cons = st.eventq_cons & mask;
                if st.cr0ack & cr0::EVENTQEN != 0
                    && (new.wrapping_sub(cons) & mask) > (prod.wrapping_sub(cons) & mask)
                {
                    st.violations.push("EVENTQ_CONS moved past EVENTQ_PROD");
                }
                st.eventq_cons = value & (queue::POINTER_MASK | queue::OVERFLOW);
            }
            o if PLAIN32.contains(&o) => {
                st.plain32.insert(o, value);
            }
            _ => st.violations.push("write to an unmodelled 32-bit register"),
        }
    }

    fn read_reg64(&self, offset: usize) -> u64 {
        let st = self.state.borrow();
        match offset {
            0x80 => st.strtab_base,
            0x90 => st.cmdq_base,
            0xa0 => st.eventq_base,
            o => st.plain64.get(&o).copied().unwrap_or(0),
        }
    }

    fn write_reg64(&self, offset: usize, value: u64) {
        let mut st = self.state.borrow_mut();
        match offset {
            0x80 => {
                st.events.push(ModelEvent::StrtabBase(value));
                if st.cr0ack & cr0::SMMUEN != 0 {
                    st.violations.push("STRTAB_BASE written while SMMUEN = 1");
                }
                st.strtab_base = value;
            }
            0x90 => {
                st.events.push(ModelEvent::CmdqBase(value));
                if st.cr0ack & cr0::CMDQEN != 0 {
                    st.violations.push("CMDQ_BASE written while CMDQEN = 1");
                }
                if (value & queue::LOG2SIZE_MASK) as u8 > self.caps.cmdq_log2 {
                    st.violations.push("CMDQ_BASE.LOG2SIZE beyond IDR1.CMDQS");
                }
                st.cmdq_base = value;
            }
            0xa0 => {
                st.events.push(ModelEvent::EventqBase(value));
                if st.cr0ack & cr0::EVENTQEN != 0 {
                    st.violations.push("EVENTQ_BASE written while EVENTQEN = 1");
                }
                if (value & queue::LOG2SIZE_MASK) as u8 > self.caps.eventq_log2 {
                    st.violations
                        .push("EVENTQ_BASE.LOG2SIZE beyond IDR1.EVENTQS");
                }
                st.eventq_base = value;
            }
            o if PLAIN64.contains(&o) => {
                st.plain64.insert(o, value);
            }
            _ => st.violations.push("write to an unmodelled 64-bit register"),
        }
    }
}

impl Mmio for SmmuModel<'_> {
    fn read32(&self, offset: usize) -> u32 {
        self.read_reg32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        self.write_reg32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        self.read_reg64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        self.write_reg64(offset, value)
    }
}

/// Memory with the configuration caches of one StreamID on top.
struct CachedView<'a, 'b, 'm> {
    model: &'a SmmuModel<'m>,
    st: RefCell<&'b mut State>,
    sid: u32,
}

impl Fetch for CachedView<'_, '_, '_> {
    fn read(&self, addr: u64) -> Result<u64, ExternalAbort> {
        let mut st = self.st.borrow_mut();
        let in_words = |base: u64, words: &[u64; 8]| {
            (base..base + 64)
                .contains(&addr)
                .then(|| words[((addr - base) / 8) as usize])
        };
        if let Some((a, w)) = st.ste_cache.get(&self.sid)
            && let Some(v) = in_words(*a, w)
        {
            return Ok(v);
        }
        if let Some(&(_, w)) = st.l1std_cache.values().find(|(a, _)| *a == addr) {
            return Ok(w);
        }
        let cached_cd = st
            .cd_cache
            .range((self.sid, 0)..=(self.sid, u32::MAX))
            .find_map(|(_, (a, w))| in_words(*a, w));
        if let Some(v) = cached_cd {
            return Ok(v);
        }
        let cached_l1cd = st
            .l1cd_cache
            .range((self.sid, 0)..=(self.sid, u32::MAX))
            .find_map(|(_, (a, w))| (*a == addr).then_some(*w));
        if let Some(v) = cached_l1cd {
            return Ok(v);
        }
        self.model.read_checked(&mut st, addr)
    }
}

/// Memory as the table walker reads it (external aborts, flush checks).
struct PlainView<'a, 'b, 'm> {
    model: &'a SmmuModel<'m>,
    st: RefCell<&'b mut State>,
}

impl Fetch for PlainView<'_, '_, '_> {
    fn read(&self, addr: u64) -> Result<u64, ExternalAbort> {
        let mut st = self.st.borrow_mut();
        self.model.read_checked(&mut st, addr)
    }
}
