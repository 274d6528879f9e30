//! A register-level model of a VT-d remapping unit, for host tests of the
//! driver (and of code built on it, such as the hypervisor's iommufd
//! layer).
//!
//! [`VtdModel`] implements [`Mmio`] over the register block of a unit with
//! configurable CAP/ECAP ([`CapBuilder`]) and behaves like the hardware the
//! VT-d spec describes, synchronously:
//!
//! * GCMD commands update GSTS (TE, SRTP, WBF, QIE, IRE, SIRTP, ...); the
//!   model flags every write that changes more than one command bit, writes
//!   a one-shot status bit back, or enables translation before a root table
//!   was set ([`VtdModel::violations`]);
//! * writing IQT processes the invalidation queue: descriptors are decoded
//!   from memory with the model's own code, wait descriptors write their
//!   status, a malformed descriptor stops the queue with FSTS.IQE and IQH
//!   on it (resuming once software clears IQE), a device-TLB invalidation
//!   of a device marked as unresponsive raises ITE;
//! * CCMD and the IOTLB register perform register-based invalidation;
//! * every invalidation is recorded ([`VtdModel::invalidations`]);
//! * [`VtdModel::dma`] translates a DMA request through *caches* — a
//!   context cache, a PASID cache, an IOTLB and a paging-structure cache —
//!   filled from memory with the independent [`walker`](super::walker)
//!   and emptied only by the invalidations the spec says empty them. In
//!   caching mode (CAP.CM) not-present entries are cached too. So a test
//!   sees stale translations exactly when the driver forgot an
//!   invalidation.
//! * faults are recorded in the fault-recording registers (FSTS.PPF/FRI,
//!   PFO when full), and tests can inject their own;
//! * interrupt remapping: SIRTP latches IRTA, [`VtdModel::interrupt`]
//!   remaps an MSI through an interrupt entry cache filled from the table
//!   (decoded with the model's own code) and emptied only by
//!   interrupt-entry-cache invalidations; blocked compatibility-format
//!   interrupts, missing or malformed entries and source-ID mismatches are
//!   recorded as faults with the spec's reasons;
//! * "stuck" switches make GCMD, the queue or the invalidation registers
//!   never complete, so timeouts can be tested.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::cell::RefCell;

use sluice_hal::{DmaAllocError, DmaMemory, Mmio, PhysAddr};

use super::caps::{CapBuilder, VtdCapabilities};
use super::regs::{self, fsts, global};
use super::walker::{
    self, DmaRequest, PageWalk, ResolvedContext, TableKind, TranslationFault, WalkerConfig,
};
use crate::pagetable::MapPerms;

/// How an invalidation reached the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Queue,
    Register,
}

/// One invalidation the model performed, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inv {
    ContextGlobal,
    ContextDomain {
        did: u16,
    },
    ContextDevice {
        did: u16,
        sid: u16,
        fm: u8,
    },
    IotlbGlobal,
    IotlbDomain {
        did: u16,
    },
    IotlbPage {
        did: u16,
        addr: u64,
        am: u8,
        ih: bool,
    },
    /// `order`: log2 of the pages covered (decoded from the S bit and the
    /// address).
    DeviceTlb {
        sid: u16,
        addr: u64,
        order: u8,
    },
    PasidCache {
        granularity: u8,
        did: u16,
        pasid: u32,
    },
    PasidIotlb {
        granularity: u8,
        did: u16,
        pasid: u32,
        addr: u64,
        am: u8,
        ih: bool,
    },
    PasidDeviceTlb {
        sid: u16,
        pasid: u32,
        global: bool,
        addr: u64,
        order: u8,
    },
    InterruptEntries {
        global: bool,
        index: u16,
        mask: u8,
    },
}

/// Something the model saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelEvent {
    /// A raw GCMD write.
    Gcmd(u32),
    WriteBufferFlush,
    Invalidation {
        via: Via,
        inv: Inv,
    },
    /// An invalidation-wait descriptor completed.
    Wait {
        status_write: bool,
    },
    /// The queue stopped on a bad descriptor at `head` (IQEI `info`).
    QueueError {
        head: u32,
        info: u8,
    },
    /// A device-TLB invalidation timed out (ITE).
    DeviceTlbTimeout {
        sid: u16,
    },
    /// The unit wrote its fault-event message (FEADDR/FEUADDR/FEDATA).
    FaultInterrupt {
        address: u32,
        upper_address: u32,
        data: u32,
    },
}

/// A fault for [`VtdModel::inject_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    pub sid: u16,
    pub addr: u64,
    pub reason: u8,
    pub write: bool,
    pub pasid: Option<u32>,
}

/// Parts of the model that can be made to never complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stuck {
    /// GSTS never reflects GCMD writes.
    pub gcmd: bool,
    /// IQT writes are accepted but nothing is processed.
    pub queue: bool,
    /// CCMD.ICC and IOTLB.IVT never clear.
    pub registers: bool,
}

/// An MSI as the unit receives it: the requester and the memory write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptRequest {
    pub sid: u16,
    pub address: u32,
    pub data: u32,
}

/// Where an interrupt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptOutcome {
    pub destination: u32,
    pub vector: u8,
    /// Delivery mode (SDM encoding).
    pub delivery: u8,
    pub level: bool,
    pub logical: bool,
    /// Through a remapping table entry (false: remapping off, or a
    /// compatibility-format interrupt let through by CFI).
    pub remapped: bool,
    /// The entry came from the interrupt entry cache.
    pub cached: bool,
}

/// Why the model blocked an interrupt (VT-d appendix A reasons 0x20-0x26).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptFault {
    /// Reserved bits in the remappable MSI (0x20).
    ReservedRequest,
    /// Handle (+ subhandle) at or beyond the table size (0x21).
    IndexBeyondTable { index: u32 },
    /// IRTE P clear (0x22).
    NotPresent { index: u32 },
    /// Reserved bits, posted mode or a reserved delivery mode (0x24).
    ReservedEntry { index: u32 },
    /// Compatibility format with CFI clear or EIME set (0x25).
    CompatBlocked,
    /// The requester failed the entry's source check (0x26).
    SourceMismatch { index: u32 },
}

impl InterruptFault {
    pub const fn reason_code(self) -> u8 {
        match self {
            Self::ReservedRequest => 0x20,
            Self::IndexBeyondTable { .. } => 0x21,
            Self::NotPresent { .. } => 0x22,
            Self::ReservedEntry { .. } => 0x24,
            Self::CompatBlocked => 0x25,
            Self::SourceMismatch { .. } => 0x26,
        }
    }
}

/// A DMA the model let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaOutcome {
    pub phys: PhysAddr,
    /// Whether the access was forced to snoop (SNP leaf / PGSNP).
    pub snooped: bool,
    /// Whether the translation came from the IOTLB.
    pub cached: bool,
}

#[derive(Debug, Clone, Copy)]
struct IotlbEntry {
    size: u64,
    phys: u64,
    perms: MapPerms,
    snooped: bool,
    /// Caching mode: a not-present translation was cached.
    negative: bool,
}

/// (DID, PASID tag for first-level translations, IOVA base of the leaf).
type IotlbKey = (u16, Option<u32>, u64);
/// (DID, PASID tag, level of the cached table, IOVA prefix it covers).
type PscKey = (u16, Option<u32>, u8, u64);

#[derive(Debug, Clone)]
struct CachedWords {
    /// (address, value) pairs served instead of memory.
    words: Vec<(u64, u64)>,
    /// The DID the entry is tagged with (legacy context: its DID; scalable
    /// context entries: `None`, matched by any DID; PASID entries: theirs;
    /// caching-mode negative entries: 0).
    did: Option<u16>,
}

struct State {
    gsts: u32,
    rtaddr: u64,
    /// RTADDR latched by the last SRTP.
    active_rtaddr: Option<u64>,
    fsts: u32,
    fectl: u32,
    plain32: BTreeMap<usize, u32>,
    plain64: BTreeMap<usize, u64>,
    ccmd: u64,
    iva: u64,
    iotlb_reg: u64,
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    iqercd: u64,
    records: Vec<[u64; 2]>,
    next_record: usize,
    events: Vec<ModelEvent>,
    violations: Vec<&'static str>,
    stuck: Stuck,
    unresponsive_devices: BTreeSet<u16>,
    misbehaving_devices: BTreeSet<u16>,
    context_cache: BTreeMap<u16, CachedWords>,
    pasid_cache: BTreeMap<(u16, u32), CachedWords>,
    iotlb: BTreeMap<IotlbKey, IotlbEntry>,
    psc: BTreeMap<PscKey, u64>,
    /// IRTA as latched by the last SIRTP.
    active_irta: Option<u64>,
    /// A global interrupt-entry-cache invalidation followed the last SIRTP.
    iec_flushed_since_sirtp: bool,
    /// Interrupt entry cache: index → IRTE words.
    iec: BTreeMap<u32, [u64; 2]>,
}

/// The model. See the module documentation.
pub struct VtdModel<'m> {
    mem: &'m dyn DmaMemory,
    caps: VtdCapabilities,
    haw: u32,
    state: RefCell<State>,
}

const CMD_BITS: u32 = 0xff80_0000;
const ONE_SHOT: u32 = global::SET_ROOT_TABLE
    | global::SET_FAULT_LOG
    | global::WRITE_BUFFER_FLUSH
    | global::SET_INTERRUPT_TABLE;

impl<'m> VtdModel<'m> {
    /// A unit with the capabilities of `caps` whose structures live in
    /// `mem`; `haw` is the host address width (DMAR HAW + 1).
    pub fn new(mem: &'m dyn DmaMemory, caps: CapBuilder, haw: u32) -> Self {
        let caps = caps.capabilities();
        Self {
            mem,
            caps,
            haw,
            state: RefCell::new(State {
                gsts: 0,
                rtaddr: 0,
                active_rtaddr: None,
                fsts: 0,
                fectl: regs::event_control::IM,
                plain32: BTreeMap::new(),
                plain64: BTreeMap::new(),
                ccmd: 0,
                iva: 0,
                iotlb_reg: 0,
                iqh: 0,
                iqt: 0,
                iqa: 0,
                ics: 0,
                iqercd: 0,
                records: alloc::vec![[0, 0]; caps.fault_record_count as usize],
                next_record: 0,
                events: Vec::new(),
                violations: Vec::new(),
                stuck: Stuck::default(),
                unresponsive_devices: BTreeSet::new(),
                misbehaving_devices: BTreeSet::new(),
                context_cache: BTreeMap::new(),
                pasid_cache: BTreeMap::new(),
                iotlb: BTreeMap::new(),
                psc: BTreeMap::new(),
                active_irta: None,
                iec_flushed_since_sirtp: false,
                iec: BTreeMap::new(),
            }),
        }
    }

    pub fn capabilities(&self) -> &VtdCapabilities {
        &self.caps
    }

    pub fn walker_config(&self) -> WalkerConfig {
        WalkerConfig {
            mgaw: self.caps.max_guest_address_width,
            sagaw: self.caps.sagaw,
            haw: self.haw,
        }
    }

    // ---- test controls and observations ---------------------------------

    pub fn set_stuck(&self, stuck: Stuck) {
        self.state.borrow_mut().stuck = stuck;
    }

    /// Device-TLB invalidations for `sid` time out (FSTS.ITE).
    pub fn set_device_unresponsive(&self, sid: u16, unresponsive: bool) {
        let mut st = self.state.borrow_mut();
        if unresponsive {
            st.unresponsive_devices.insert(sid);
        } else {
            st.unresponsive_devices.remove(&sid);
        }
    }

    /// Device-TLB invalidations for `sid` complete wrongly (FSTS.ICE); the
    /// queue keeps running.
    pub fn set_device_misbehaving(&self, sid: u16, misbehaving: bool) {
        let mut st = self.state.borrow_mut();
        if misbehaving {
            st.misbehaving_devices.insert(sid);
        } else {
            st.misbehaving_devices.remove(&sid);
        }
    }

    pub fn events(&self) -> Vec<ModelEvent> {
        self.state.borrow().events.clone()
    }

    pub fn clear_events(&self) {
        self.state.borrow_mut().events.clear();
    }

    /// The invalidations performed, oldest first.
    pub fn invalidations(&self) -> Vec<Inv> {
        self.state
            .borrow()
            .events
            .iter()
            .filter_map(|e| match e {
                ModelEvent::Invalidation { inv, .. } => Some(*inv),
                _ => None,
            })
            .collect()
    }

    /// Fault-event interrupts sent, oldest first: (address, upper
    /// address, data).
    pub fn fault_interrupts(&self) -> Vec<(u32, u32, u32)> {
        self.state
            .borrow()
            .events
            .iter()
            .filter_map(|e| match e {
                ModelEvent::FaultInterrupt {
                    address,
                    upper_address,
                    data,
                } => Some((*address, *upper_address, *data)),
                _ => None,
            })
            .collect()
    }

    /// FECTL as software reads it (IM, IP).
    pub fn fault_event_control(&self) -> u32 {
        self.state.borrow().fectl
    }

    /// Raw GCMD writes, oldest first.
    pub fn gcmd_writes(&self) -> Vec<u32> {
        self.state
            .borrow()
            .events
            .iter()
            .filter_map(|e| match e {
                ModelEvent::Gcmd(v) => Some(*v),
                _ => None,
            })
            .collect()
    }

    /// Programming errors the model detected (empty for a correct driver).
    pub fn violations(&self) -> Vec<&'static str> {
        self.state.borrow().violations.clone()
    }

    pub fn gsts(&self) -> u32 {
        self.state.borrow().gsts
    }

    pub fn translation_enabled(&self) -> bool {
        self.gsts() & global::TRANSLATION_ENABLE != 0
    }

    /// RTADDR as latched by the last SRTP.
    pub fn active_root(&self) -> Option<u64> {
        self.state.borrow().active_rtaddr
    }

    /// Pending fault records (F set).
    pub fn pending_fault_records(&self) -> usize {
        self.state
            .borrow()
            .records
            .iter()
            .filter(|r| r[1] & regs::frcd::F != 0)
            .count()
    }

    pub fn fault_status(&self) -> u32 {
        self.read_fsts(&self.state.borrow())
    }

    /// Number of cached IOTLB entries.
    pub fn iotlb_entries(&self) -> usize {
        self.state.borrow().iotlb.len()
    }

    /// Records a fault as the hardware would (PFO if no register is free).
    pub fn inject_fault(&self, fault: InjectedFault) {
        let mut st = self.state.borrow_mut();
        Self::record_fault(&mut st, fault);
    }

    /// A DMA request: translated through the caches (filled from memory on
    /// a miss), or faulted and recorded. With translation disabled the
    /// address passes through.
    pub fn dma(&self, req: DmaRequest) -> Result<DmaOutcome, TranslationFault> {
        let mut st = self.state.borrow_mut();
        if st.gsts & global::TRANSLATION_ENABLE == 0 {
            return Ok(DmaOutcome {
                phys: PhysAddr::new(req.iova),
                snooped: false,
                cached: false,
            });
        }
        let rtaddr = st.active_rtaddr.unwrap_or(0);
        let scalable = (rtaddr >> regs::rtaddr::TTM_SHIFT) & 0b11 == regs::rtaddr::TTM_SCALABLE;
        let result = self.translate_cached(&mut st, rtaddr, &req);
        if let Err(fault) = result {
            Self::record_fault(
                &mut st,
                InjectedFault {
                    sid: req.sid,
                    addr: req.iova,
                    reason: fault.reason_code(scalable, req.write),
                    write: req.write,
                    pasid: req.pasid,
                },
            );
        }
        result
    }

    /// GSTS.IRES.
    pub fn interrupt_remapping_enabled(&self) -> bool {
        self.gsts() & global::INTERRUPT_REMAPPING != 0
    }

    /// IRTA as latched by the last SIRTP.
    pub fn active_interrupt_table(&self) -> Option<u64> {
        self.state.borrow().active_irta
    }

    /// Entries in the interrupt entry cache.
    pub fn interrupt_cache_entries(&self) -> usize {
        self.state.borrow().iec.len()
    }

    /// An MSI from `req.sid`: remapped through the interrupt entry cache
    /// (filled from the table on a miss), let through unremapped when
    /// remapping is off, or blocked and recorded as a fault.
    pub fn interrupt(&self, req: InterruptRequest) -> Result<InterruptOutcome, InterruptFault> {
        let mut st = self.state.borrow_mut();
        let result = self.remap_interrupt(&mut st, req);
        if let Err(fault) = result {
            let index = match fault {
                InterruptFault::IndexBeyondTable { index }
                | InterruptFault::NotPresent { index }
                | InterruptFault::ReservedEntry { index }
                | InterruptFault::SourceMismatch { index } => index,
                _ => 0,
            };
            // Interrupt faults carry the interrupt index in FI bits 63:48.
            Self::record_fault(
                &mut st,
                InjectedFault {
                    sid: req.sid,
                    addr: u64::from(index) << 48,
                    reason: fault.reason_code(),
                    write: true,
                    pasid: None,
                },
            );
        }
        result
    }

    fn remap_interrupt(
        &self,
        st: &mut State,
        req: InterruptRequest,
    ) -> Result<InterruptOutcome, InterruptFault> {
        // Compatibility format (SDM 10.11.1): destination in address bits
        // 19:12, vector and delivery mode in the data.
        let compat = InterruptOutcome {
            destination: (req.address >> 12) & 0xff,
            vector: req.data as u8,
            delivery: ((req.data >> 8) & 0b111) as u8,
            level: req.data & (1 << 15) != 0,
            logical: req.address & (1 << 2) != 0,
            remapped: false,
            cached: false,
        };
        if st.gsts & global::INTERRUPT_REMAPPING == 0 {
            return Ok(compat);
        }
        let irta = st.active_irta.unwrap_or(0);
        let eime = irta & regs::irta::EIME != 0;
        // Remappable format (5.1.5.2): interrupt format bit 4.
        if req.address & (1 << 4) == 0 {
            let cfi = st.gsts & global::COMPAT_FORMAT_INTERRUPTS != 0;
            return if cfi && !eime {
                Ok(compat)
            } else {
                Err(InterruptFault::CompatBlocked)
            };
        }
        if req.address & 0b11 != 0 {
            return Err(InterruptFault::ReservedRequest);
        }
        let handle = ((req.address >> 5) & 0x7fff) | (((req.address >> 2) & 1) << 15);
        let index = if req.address & (1 << 3) != 0 {
            handle + (req.data & 0xffff)
        } else {
            handle
        };
        let entries = 2u32 << (irta & regs::irta::SIZE_MASK);
        if index >= entries {
            return Err(InterruptFault::IndexBeyondTable { index });
        }
        let (words, cached) = match st.iec.get(&index) {
            Some(&w) => (w, true),
            None => {
                let at = (irta & regs::irta::ADDRESS_MASK) + u64::from(index) * 16;
                let w = [
                    self.mem.read_u64(PhysAddr::new(at)),
                    self.mem.read_u64(PhysAddr::new(at + 8)),
                ];
                (w, false)
            }
        };
        let [low, high] = words;
        if low & 1 == 0 {
            // Not-present entries are cached only in caching mode.
            if self.caps.caching_mode {
                st.iec.insert(index, words);
            }
            return Err(InterruptFault::NotPresent { index });
        }
        st.iec.insert(index, words);
        // IRTE (9.10): reserved 14:12 and 31:24, IM (15) posted, and in
        // xAPIC mode destination bits 39:32 and 63:48; high 63:20.
        let mut reserved_low = (0b111 << 12) | (0xff << 24) | (1 << 15);
        if !eime {
            reserved_low |= (0xff << 32) | (0xffff << 48);
        }
        let delivery = ((low >> 5) & 0b111) as u8;
        let svt = (high >> 18) & 0b11;
        if low & reserved_low != 0
            || high >> 20 != 0
            || matches!(delivery, 0b011 | 0b110)
            || svt == 0b11
        {
            return Err(InterruptFault::ReservedEntry { index });
        }
        let sid_field = (high & 0xffff) as u16;
        let source_ok = match svt {
            0b01 => {
                let ignore: u16 = match (high >> 16) & 0b11 {
                    0b00 => 0,
                    0b01 => 0b100,
                    0b10 => 0b110,
                    _ => 0b111,
                };
                req.sid & !ignore == sid_field & !ignore
            }
            0b10 => {
                let bus = req.sid >> 8;
                (sid_field >> 8) <= bus && bus <= (sid_field & 0xff)
            }
            _ => true,
        };
        if !source_ok {
            return Err(InterruptFault::SourceMismatch { index });
        }
        Ok(InterruptOutcome {
            destination: if eime {
                (low >> 32) as u32
            } else {
                ((low >> 40) & 0xff) as u32
            },
            vector: (low >> 16) as u8,
            delivery,
            level: low & (1 << 4) != 0,
            logical: low & (1 << 2) != 0,
            remapped: true,
            cached,
        })
    }

    // ---- translation through the caches -----------------------------------

    fn context_entry_addrs(&self, rtaddr: u64, sid: u16) -> (u64, Option<(u64, usize)>) {
        let root = rtaddr & !0xfff;
        let bus = u64::from(sid >> 8);
        let devfn = u64::from(sid & 0xff);
        let root_entry = root + bus * 16;
        let scalable = (rtaddr >> regs::rtaddr::TTM_SHIFT) & 0b11 == regs::rtaddr::TTM_SCALABLE;
        let half = if scalable && devfn >= 128 { 8 } else { 0 };
        let raw = self.mem.read_u64(PhysAddr::new(root_entry + half));
        if raw & 1 == 0 {
            return (root_entry, None);
        }
        let table = raw & 0x000f_ffff_ffff_f000;
        if scalable {
            (root_entry, Some((table + (devfn % 128) * 32, 4)))
        } else {
            (root_entry, Some((table + devfn * 16, 2)))
        }
    }

    fn translate_cached(
        &self,
        st: &mut State,
        rtaddr: u64,
        req: &DmaRequest,
    ) -> Result<DmaOutcome, TranslationFault> {
        let cfg = self.walker_config();
        let ctx = self.resolve_cached(st, rtaddr, req, &cfg)?;
        let tag = match ctx.kind {
            TableKind::FirstLevel { .. } => ctx.pasid,
            _ => None,
        };
        for size in [1u64 << 12, 1 << 21, 1 << 30] {
            let key = (ctx.did, tag, req.iova & !(size - 1));
            if let Some(e) = st.iotlb.get(&key).copied()
                && e.size == size
            {
                if e.negative {
                    return Err(TranslationFault::NotPresent { level: 0 });
                }
                let walk = PageWalk {
                    phys: PhysAddr::new(e.phys + (req.iova & (size - 1))),
                    page_size: size,
                    perms: e.perms,
                    snoop: e.snooped,
                    tables: Vec::new(),
                };
                walker::check_access(&walk, req.write)?;
                return Ok(DmaOutcome {
                    phys: walk.phys,
                    snooped: e.snooped,
                    cached: true,
                });
            }
        }
        // Paging-structure cache: the deepest remembered table.
        let mut start = None;
        for level in 0..5u8 {
            let prefix = req.iova >> (12 + 9 * (u32::from(level) + 1)).min(63);
            if let Some(&table) = st.psc.get(&(ctx.did, tag, level, prefix)) {
                start = Some((level, PhysAddr::new(table)));
                break;
            }
        }
        let walk = match walker::walk_tables(self.mem, &ctx, req.iova, &cfg, start) {
            Ok(w) => w,
            Err(fault) => {
                if self.caps.caching_mode && matches!(fault, TranslationFault::NotPresent { .. }) {
                    st.iotlb.insert(
                        (ctx.did, tag, req.iova & !0xfff),
                        IotlbEntry {
                            size: 1 << 12,
                            phys: 0,
                            perms: MapPerms::default(),
                            snooped: false,
                            negative: true,
                        },
                    );
                }
                return Err(fault);
            }
        };
        let snooped = if ctx.scalable {
            ctx.page_snoop
        } else {
            walk.snoop
        };
        if let Some(&(level, table)) = walk.tables.last() {
            let prefix = req.iova >> (12 + 9 * (u32::from(level) + 1)).min(63);
            st.psc.insert((ctx.did, tag, level, prefix), table.as_u64());
        }
        let base = walk.phys.as_u64() & !(walk.page_size - 1);
        st.iotlb.insert(
            (ctx.did, tag, req.iova & !(walk.page_size - 1)),
            IotlbEntry {
                size: walk.page_size,
                phys: base,
                perms: walk.perms,
                snooped,
                negative: false,
            },
        );
        walker::check_access(&walk, req.write)?;
        Ok(DmaOutcome {
            phys: walk.phys,
            snooped,
            cached: false,
        })
    }

    fn resolve_cached(
        &self,
        st: &mut State,
        rtaddr: u64,
        req: &DmaRequest,
        cfg: &WalkerConfig,
    ) -> Result<ResolvedContext, TranslationFault> {
        let scalable = (rtaddr >> regs::rtaddr::TTM_SHIFT) & 0b11 == regs::rtaddr::TTM_SCALABLE;
        let mut overlay = BTreeMap::new();
        if let Some(cached) = st.context_cache.get(&req.sid) {
            overlay.extend(cached.words.iter().copied());
        }
        for ((sid, _), cached) in st.pasid_cache.iter() {
            if *sid == req.sid {
                overlay.extend(cached.words.iter().copied());
            }
        }
        let view = Overlay {
            mem: self.mem,
            words: &overlay,
        };
        let result = walker::resolve(&view, rtaddr, req, cfg);
        // Fill the context cache (present entries; not-present ones too in
        // caching mode) from what the walk read.
        let cache_context = match result {
            Ok(_) => true,
            Err(TranslationFault::RootNotPresent | TranslationFault::ContextNotPresent) => {
                self.caps.caching_mode
            }
            Err(_) => true,
        };
        if cache_context && !st.context_cache.contains_key(&req.sid) {
            let (root_entry, ctx) = self.context_entry_addrs(rtaddr, req.sid);
            let mut words: Vec<(u64, u64)> = (0..2)
                .map(|i| {
                    let a = root_entry + i * 8;
                    (a, view.read_u64(PhysAddr::new(a)))
                })
                .collect();
            let mut did = if scalable { None } else { Some(0) };
            if let Some((entry, n)) = ctx {
                for i in 0..n as u64 {
                    let a = entry + i * 8;
                    words.push((a, view.read_u64(PhysAddr::new(a))));
                }
                if !scalable {
                    did = Some(((view.read_u64(PhysAddr::new(entry + 8)) >> 8) & 0xffff) as u16);
                }
            }
            st.context_cache.insert(req.sid, CachedWords { words, did });
        }
        // Fill the PASID cache.
        if scalable {
            let cache_pasid = match result {
                Ok(_) => true,
                Err(TranslationFault::PasidEntryNotPresent) => self.caps.caching_mode,
                Err(_) => false,
            };
            if cache_pasid
                && let Some((pasid, entry)) = self.pasid_entry_addr(&view, rtaddr, req)
                && !st.pasid_cache.contains_key(&(req.sid, pasid))
            {
                let words: Vec<(u64, u64)> = (0..8)
                    .map(|i| {
                        let a = entry + i * 8;
                        (a, view.read_u64(PhysAddr::new(a)))
                    })
                    .collect();
                let did = match result {
                    Ok(ref c) => c.did,
                    Err(_) => 0,
                };
                st.pasid_cache.insert(
                    (req.sid, pasid),
                    CachedWords {
                        words,
                        did: Some(did),
                    },
                );
            }
        }
        result
    }

    fn pasid_entry_addr(
        &self,
        view: &Overlay<'_>,
        rtaddr: u64,
        req: &DmaRequest,
    ) -> Option<(u32, u64)> {
        let (_, ctx) = self.context_entry_addrs(rtaddr, req.sid);
        let (entry, _) = ctx?;
        let w0 = view.read_u64(PhysAddr::new(entry));
        let w1 = view.read_u64(PhysAddr::new(entry + 8));
        let pasid = req.pasid.unwrap_or((w1 & 0xf_ffff) as u32);
        let dir = w0 & 0x000f_ffff_ffff_f000;
        let dir_entry = self
            .mem
            .read_u64(PhysAddr::new(dir + u64::from(pasid >> 6) * 8));
        if dir_entry & 1 == 0 {
            return None;
        }
        Some((
            pasid,
            (dir_entry & 0x000f_ffff_ffff_f000) + u64::from(pasid & 0x3f) * 64,
        ))
    }

    // ---- faults -------------------------------------------------------------

    fn record_fault(st: &mut State, fault: InjectedFault) {
        let n = st.records.len();
        if n == 0 {
            return;
        }
        let index = st.next_record % n;
        if st.records[index][1] & regs::frcd::F != 0 {
            if st.fsts & fsts::PFO == 0 {
                st.fsts |= fsts::PFO;
                Self::fault_event(st);
            }
            return;
        }
        let pending_before = st.records.iter().any(|r| r[1] & regs::frcd::F != 0);
        let mut hi = regs::frcd::F
            | (u64::from(fault.reason) << regs::frcd::FR_SHIFT)
            | u64::from(fault.sid);
        if !fault.write {
            hi |= regs::frcd::T1;
        }
        if let Some(p) = fault.pasid {
            hi |= regs::frcd::PP | ((u64::from(p) & regs::frcd::PV_MASK) << regs::frcd::PV_SHIFT);
        }
        st.records[index] = [fault.addr & !0xfff, hi];
        if !pending_before {
            st.fsts = (st.fsts & !fsts::FRI_MASK) | ((index as u32) << fsts::FRI_SHIFT);
        }
        st.next_record = (index + 1) % n;
        if !pending_before {
            Self::fault_event(st);
        }
    }

    /// A fault status went 0 → 1 (7.4.1): the unit writes the fault-event
    /// message, or with FECTL.IM set notes it in FECTL.IP.
    fn fault_event(st: &mut State) {
        if st.fectl & regs::event_control::IM != 0 {
            st.fectl |= regs::event_control::IP;
            return;
        }
        Self::send_fault_interrupt(st);
    }

    fn send_fault_interrupt(st: &mut State) {
        let reg = |o: usize| st.plain32.get(&o).copied().unwrap_or(0);
        let message = ModelEvent::FaultInterrupt {
            address: reg(0x40),
            upper_address: reg(0x44),
            data: reg(0x3c),
        };
        st.fectl &= !regs::event_control::IP;
        st.events.push(message);
    }

    fn read_fsts(&self, st: &State) -> u32 {
        let ppf = st.records.iter().any(|r| r[1] & regs::frcd::F != 0);
        st.fsts | if ppf { fsts::PPF } else { 0 }
    }

    // ---- global command -----------------------------------------------------

    fn write_gcmd(&self, st: &mut State, value: u32) {
        st.events.push(ModelEvent::Gcmd(value));
        let persistent = st.gsts & global::PERSISTENT_STATUS_MASK;
        let commands = ((value ^ persistent) | (value & ONE_SHOT)) & CMD_BITS;
        if commands.count_ones() > 1 {
            st.violations
                .push("GCMD write changes more than one command bit (spec 11.4.4.1)");
        }
        if st.stuck.gcmd {
            return;
        }
        let changed = (value ^ persistent) & !ONE_SHOT & CMD_BITS;
        if changed & global::TRANSLATION_ENABLE != 0 {
            if value & global::TRANSLATION_ENABLE != 0 {
                if st.active_rtaddr.is_none() {
                    st.violations
                        .push("translation enabled before a root table was set");
                }
                st.gsts |= global::TRANSLATION_ENABLE;
            } else {
                st.gsts &= !global::TRANSLATION_ENABLE;
            }
        }
        if changed & global::QUEUED_INVALIDATION != 0 {
            if value & global::QUEUED_INVALIDATION != 0 {
                st.iqh = 0;
                st.gsts |= global::QUEUED_INVALIDATION;
            } else {
                if st.iqh != st.iqt {
                    st.violations
                        .push("queued invalidation disabled with descriptors pending");
                }
                st.gsts &= !global::QUEUED_INVALIDATION;
            }
        }
        if changed & global::INTERRUPT_REMAPPING != 0 && value & global::INTERRUPT_REMAPPING != 0 {
            if !self.caps.interrupt_remapping {
                st.violations
                    .push("interrupt remapping enabled on a unit without ECAP.IR");
            }
            if st.active_irta.is_none() {
                st.violations
                    .push("interrupt remapping enabled before a table was set (SIRTP)");
            } else if !st.iec_flushed_since_sirtp {
                st.violations.push(
                    "interrupt remapping enabled without a global entry-cache invalidation after SIRTP",
                );
            }
        }
        for bit in [
            global::ADVANCED_FAULT_LOG,
            global::INTERRUPT_REMAPPING,
            global::COMPAT_FORMAT_INTERRUPTS,
        ] {
            if changed & bit != 0 {
                st.gsts ^= bit;
            }
        }
        if value & global::SET_ROOT_TABLE != 0 {
            st.active_rtaddr = Some(st.rtaddr);
            st.gsts |= global::SET_ROOT_TABLE;
        }
        if value & global::WRITE_BUFFER_FLUSH != 0 {
            if !self.caps.required_write_buffer_flush {
                st.violations
                    .push("write-buffer flush on a unit without CAP.RWBF");
            }
            st.events.push(ModelEvent::WriteBufferFlush);
            // The flush completes at once: WBFS reads 0.
        }
        if value & global::SET_INTERRUPT_TABLE != 0 {
            let irta = st.plain64.get(&0xb8).copied().unwrap_or(0);
            if irta & regs::irta::EIME != 0 && !self.caps.extended_interrupt_mode {
                st.violations
                    .push("IRTA.EIME set on a unit without ECAP.EIM");
            }
            st.active_irta = Some(irta);
            st.iec_flushed_since_sirtp = false;
            st.gsts |= global::SET_INTERRUPT_TABLE;
        }
        if value & global::SET_FAULT_LOG != 0 {
            st.gsts |= global::SET_FAULT_LOG;
        }
    }

    // ---- invalidation -------------------------------------------------------

    fn perform(&self, st: &mut State, via: Via, inv: Inv) {
        st.events.push(ModelEvent::Invalidation { via, inv });
        match inv {
            Inv::ContextGlobal => st.context_cache.clear(),
            Inv::ContextDomain { did } => st
                .context_cache
                .retain(|_, c| c.did.is_some_and(|d| d != did)),
            Inv::ContextDevice { did, sid, fm } => {
                // FM masks the low 0, 1, 2 or 3 function bits.
                let mask: u16 = match fm {
                    0 => 0xffff,
                    1 => 0xfffb,
                    2 => 0xfff9,
                    _ => 0xfff8,
                };
                st.context_cache
                    .retain(|&s, c| !(s & mask == sid & mask && c.did.is_none_or(|d| d == did)));
            }
            Inv::IotlbGlobal => {
                st.iotlb.clear();
                st.psc.clear();
            }
            Inv::IotlbDomain { did } => {
                st.iotlb
                    .retain(|&(d, tag, _), _| !(d == did && tag.is_none()));
                st.psc
                    .retain(|&(d, tag, _, _), _| !(d == did && tag.is_none()));
            }
            Inv::IotlbPage { did, addr, am, ih } => {
                self.check_page_selective(st, addr, am);
                Self::invalidate_range(st, did, None, addr, am, ih);
            }
            Inv::PasidIotlb {
                granularity,
                did,
                pasid,
                addr,
                am,
                ih,
            } => match granularity {
                0b00 | 0b01 => {
                    st.iotlb
                        .retain(|&(d, tag, _), _| !(d == did && tag.is_some()));
                    st.psc
                        .retain(|&(d, tag, _, _), _| !(d == did && tag.is_some()));
                }
                0b10 => {
                    st.iotlb
                        .retain(|&(d, tag, _), _| !(d == did && tag == Some(pasid)));
                    st.psc
                        .retain(|&(d, tag, _, _), _| !(d == did && tag == Some(pasid)));
                }
                _ => {
                    self.check_page_selective(st, addr, am);
                    Self::invalidate_range(st, did, Some(pasid), addr, am, ih);
                }
            },
            Inv::PasidCache {
                granularity,
                did,
                pasid,
            } => match granularity {
                0b00 => st.pasid_cache.retain(|_, c| c.did != Some(did)),
                0b01 => st
                    .pasid_cache
                    .retain(|&(_, p), c| !(c.did == Some(did) && p == pasid)),
                _ => st.pasid_cache.clear(),
            },
            Inv::InterruptEntries { global: true, .. } => {
                st.iec.clear();
                st.iec_flushed_since_sirtp = true;
            }
            Inv::InterruptEntries { index, mask, .. } => {
                let span = 1u32 << mask.min(16);
                let first = u32::from(index) & !(span - 1);
                st.iec.retain(|&i, _| !(first..first + span).contains(&i));
            }
            Inv::DeviceTlb { .. } | Inv::PasidDeviceTlb { .. } => {}
        }
    }

    /// Page-selective requests must be supported (CAP.PSI), within CAP.MAMV
    /// and naturally aligned (6.5.2.3); hardware would silently invalidate
    /// a different block otherwise.
    fn check_page_selective(&self, st: &mut State, addr: u64, am: u8) {
        if !self.caps.page_selective_invalidation {
            st.violations
                .push("page-selective invalidation on a unit without CAP.PSI");
        }
        if am > self.caps.max_address_mask {
            st.violations.push("address mask above CAP.MAMV");
        }
        if am < 52 && addr & ((1u64 << (12 + u32::from(am))) - 1) != 0 {
            st.violations
                .push("page-selective address not aligned to its mask");
        }
    }

    fn invalidate_range(st: &mut State, did: u16, tag: Option<u32>, addr: u64, am: u8, ih: bool) {
        let start = addr & !((1u64 << (12 + u32::from(am))) - 1);
        let end = start + (1u64 << (12 + u32::from(am)));
        st.iotlb.retain(|&(d, t, base), e| {
            !(d == did && t == tag && base < end && base + e.size > start)
        });
        if !ih {
            st.psc.retain(|&(d, t, level, prefix), _| {
                let span_shift = (12 + 9 * (u32::from(level) + 1)).min(63);
                let lo = prefix << span_shift;
                let hi = lo.saturating_add(1u64 << span_shift);
                !(d == did && t == tag && lo < end && hi > start)
            });
        }
    }

    fn queue_entries(st: &State) -> u64 {
        256u64 << (st.iqa & regs::queue::IQA_QS_MASK)
    }

    /// Processes descriptors from IQH to IQT until done or an error stops
    /// the queue.
    fn process_queue(&self, st: &mut State) {
        if st.gsts & global::QUEUED_INVALIDATION == 0 || st.stuck.queue {
            return;
        }
        let entries = Self::queue_entries(st);
        let base = st.iqa & regs::queue::IQA_ADDRESS_MASK;
        if st.iqa & regs::queue::IQA_DW_256 != 0 {
            st.violations.push("256-bit descriptors are not modelled");
        }
        let mut guard = 0;
        while st.fsts & (fsts::IQE | fsts::ITE) == 0 && st.iqh != st.iqt && guard < entries {
            guard += 1;
            let index = (st.iqh >> regs::queue::INDEX_SHIFT) % entries;
            let addr = base + index * 16;
            let q0 = self.mem.read_u64(PhysAddr::new(addr));
            let q1 = self.mem.read_u64(PhysAddr::new(addr + 8));
            match self.decode(q0, q1) {
                Err(info) => {
                    st.fsts |= fsts::IQE;
                    st.iqercd = u64::from(info);
                    st.events.push(ModelEvent::QueueError {
                        head: index as u32,
                        info,
                    });
                    return;
                }
                Ok(Decoded::Wait {
                    sw,
                    int,
                    data,
                    status,
                }) => {
                    if sw {
                        self.mem.write_u32(PhysAddr::new(status), data);
                    }
                    if int {
                        st.ics |= regs::queue::ICS_IWC;
                    }
                    st.events.push(ModelEvent::Wait { status_write: sw });
                }
                Ok(Decoded::Inv(inv)) => {
                    let sid = match inv {
                        Inv::DeviceTlb { sid, .. } | Inv::PasidDeviceTlb { sid, .. } => Some(sid),
                        _ => None,
                    };
                    self.perform(st, Via::Queue, inv);
                    if let Some(sid) = sid
                        && st.unresponsive_devices.contains(&sid)
                    {
                        st.fsts |= fsts::ITE;
                        st.iqercd = u64::from(sid) << regs::queue::IQERCD_ITESID_SHIFT;
                        st.events.push(ModelEvent::DeviceTlbTimeout { sid });
                        // Hardware discards the rest of the queue, waits
                        // included (spec 6.5.2.10).
                        st.iqh = st.iqt;
                        return;
                    }
                    if let Some(sid) = sid
                        && st.misbehaving_devices.contains(&sid)
                    {
                        st.fsts |= fsts::ICE;
                        st.iqercd = u64::from(sid) << regs::queue::IQERCD_ICESID_SHIFT;
                    }
                }
            }
            st.iqh =
                (((index + 1) % entries) << regs::queue::INDEX_SHIFT) & regs::queue::INDEX_MASK;
        }
    }

    /// Decodes one 128-bit descriptor, or the IQEI code of why it is
    /// invalid (3: invalid type, 4: reserved field set).
    fn decode(&self, q0: u64, q1: u64) -> Result<Decoded, u8> {
        let kind = (q0 & 0xf) | ((q0 >> 5) & 0x70);
        let g = ((q0 >> 4) & 0b11) as u8;
        let did = ((q0 >> 16) & 0xffff) as u16;
        let pasid = ((q0 >> 32) & 0xf_ffff) as u32;
        let check = |allowed0: u64, allowed1: u64| -> Result<(), u8> {
            if q0 & !allowed0 != 0 || q1 & !allowed1 != 0 {
                Err(4)
            } else {
                Ok(())
            }
        };
        let scalable_ops = self.caps.scalable_mode;
        match kind {
            1 => {
                check(0x0003_ffff_ffff_003f, 0)?;
                Ok(Decoded::Inv(match g {
                    0b01 => Inv::ContextGlobal,
                    0b10 => Inv::ContextDomain { did },
                    0b11 => Inv::ContextDevice {
                        did,
                        sid: (q0 >> 32) as u16,
                        fm: ((q0 >> 48) & 0b11) as u8,
                    },
                    _ => return Err(4),
                }))
            }
            2 => {
                check(0x0000_0000_ffff_00ff, !0xf80)?;
                Ok(Decoded::Inv(match g {
                    0b01 => Inv::IotlbGlobal,
                    0b10 => Inv::IotlbDomain { did },
                    0b11 => Inv::IotlbPage {
                        did,
                        addr: q1 & !0xfff,
                        am: (q1 & 0x3f) as u8,
                        ih: q1 & 0x40 != 0,
                    },
                    _ => return Err(4),
                }))
            }
            3 if self.caps.device_tlb => {
                check(0xfff0_ffff_001f_f00f, !0xffe)?;
                let (addr, order) = decode_size(q1 & !0xfff, q1 & 1 != 0);
                Ok(Decoded::Inv(Inv::DeviceTlb {
                    sid: (q0 >> 32) as u16,
                    addr,
                    order,
                }))
            }
            4 => {
                check(0x0000_ffff_f800_001f, 0)?;
                Ok(Decoded::Inv(Inv::InterruptEntries {
                    global: q0 & 0x10 == 0,
                    index: (q0 >> 32) as u16,
                    mask: ((q0 >> 27) & 0x1f) as u8,
                }))
            }
            5 => {
                check(0xffff_ffff_0000_00ff, !0b11)?;
                Ok(Decoded::Wait {
                    int: q0 & 0x10 != 0,
                    sw: q0 & 0x20 != 0,
                    data: (q0 >> 32) as u32,
                    status: q1 & !0b11,
                })
            }
            6 if scalable_ops => {
                check(0x000f_ffff_ffff_003f, !0xf80)?;
                Ok(Decoded::Inv(Inv::PasidIotlb {
                    granularity: g,
                    did,
                    pasid,
                    addr: q1 & !0xfff,
                    am: (q1 & 0x3f) as u8,
                    ih: q1 & 0x40 != 0,
                }))
            }
            7 if scalable_ops => {
                check(0x000f_ffff_ffff_003f, 0)?;
                if g == 0b10 {
                    return Err(4);
                }
                Ok(Decoded::Inv(Inv::PasidCache {
                    granularity: g,
                    did,
                    pasid,
                }))
            }
            8 if scalable_ops && self.caps.device_tlb => {
                check(0xffff_ffff_ffff_f1ff, !0x7fe)?;
                let (addr, order) = decode_size(q1 & !0xfff, q1 & (1 << 11) != 0);
                Ok(Decoded::Inv(Inv::PasidDeviceTlb {
                    sid: (q0 >> 16) as u16,
                    pasid,
                    global: q1 & 1 != 0,
                    addr,
                    order,
                }))
            }
            _ => Err(3),
        }
    }
}

enum Decoded {
    Inv(Inv),
    Wait {
        sw: bool,
        int: bool,
        data: u32,
        status: u64,
    },
}

/// Device-TLB address/size decoding (6.5.2.5): S = 1 means the lowest clear
/// address bit at or above bit 12 gives the size.
fn decode_size(addr: u64, s: bool) -> (u64, u8) {
    if !s {
        return (addr, 0);
    }
    let ones = (!(addr >> 12)).trailing_zeros().min(51);
    let order = ones as u8 + 1;
    let aligned = addr & !((1u64 << (12 + u32::from(order))) - 1);
    (aligned, order)
}

/// Memory as seen through the model's context and PASID caches.
struct Overlay<'a> {
    mem: &'a dyn DmaMemory,
    words: &'a BTreeMap<u64, u64>,
}

impl DmaMemory for Overlay<'_> {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        Err(DmaAllocError)
    }
    fn free_page(&self, _page: PhysAddr) {}
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        match self.words.get(&addr.as_u64()) {
            Some(&v) => v,
            None => self.mem.read_u64(addr),
        }
    }
    fn write_u64(&self, _addr: PhysAddr, _value: u64) {}
    fn flush_for_device(&self, _addr: PhysAddr, _len: u64) {}
}

impl VtdModel<'_> {
    fn fault_record_slot(&self, offset: usize) -> Option<(usize, bool)> {
        let base = self.caps.fault_record_offset;
        let n = self.caps.fault_record_count as usize;
        if offset >= base && offset < base + 16 * n && offset.is_multiple_of(8) {
            let rel = offset - base;
            Some((rel / 16, rel % 16 == 8))
        } else {
            None
        }
    }

    fn unexpected(&self, st: &mut State, _offset: usize) -> u64 {
        st.violations
            .push("access to an unmodelled register or with the wrong width");
        0
    }
}

impl Mmio for VtdModel<'_> {
    fn read32(&self, offset: usize) -> u32 {
        let mut st = self.state.borrow_mut();
        match offset {
            0x00 => (self.caps.version_major << 4 | self.caps.version_minor) as u32,
            0x18 => 0,
            0x1c => st.gsts,
            0x34 => {
                self.process_queue(&mut st);
                self.read_fsts(&st)
            }
            0x38 => st.fectl,
            0x9c => st.ics,
            0x3c | 0x40 | 0x44 | 0x64 | 0x68 | 0x6c | 0xa0 | 0xa4 | 0xa8 | 0xac => {
                st.plain32.get(&offset).copied().unwrap_or(0)
            }
            _ => self.unexpected(&mut st, offset) as u32,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut st = self.state.borrow_mut();
        match offset {
            0x18 => self.write_gcmd(&mut st, value),
            0x34 => {
                let clear = value & fsts::W1C_MASK;
                st.fsts &= !clear;
                if clear & fsts::IQE != 0 {
                    // Hardware resumes fetching at IQH (6.5.2.10).
                    self.process_queue(&mut st);
                }
            }
            0x38 => {
                let pending = st.fectl & regs::event_control::IP;
                st.fectl = (value & regs::event_control::IM) | pending;
                // Unmasking with an event pending sends it (11.4.7.2).
                if value & regs::event_control::IM == 0 && pending != 0 {
                    Self::send_fault_interrupt(&mut st);
                }
            }
            0x9c => st.ics &= !(value & regs::queue::ICS_IWC),
            0x3c | 0x40 | 0x44 | 0x64 | 0x68 | 0x6c | 0xa0 | 0xa4 | 0xa8 | 0xac => {
                st.plain32.insert(offset, value);
            }
            _ => {
                self.unexpected(&mut st, offset);
            }
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        let mut st = self.state.borrow_mut();
        if let Some((index, high)) = self.fault_record_slot(offset) {
            return st.records[index][usize::from(high)];
        }
        let iotlb = self.caps.iotlb_offset;
        match offset {
            0x08 => self.caps.cap,
            0x10 => self.caps.ecap,
            0x20 => st.rtaddr,
            0x28 => st.ccmd,
            0x80 => {
                // Time passes while software polls: a queue that was held
                // up (stuck, now released) makes progress.
                self.process_queue(&mut st);
                st.iqh
            }
            0x88 => st.iqt,
            0x90 => st.iqa,
            0xb0 => st.iqercd,
            0x58 | 0x70 | 0x78 | 0xb8 => st.plain64.get(&offset).copied().unwrap_or(0),
            o if o == iotlb => st.iva,
            o if o == iotlb + 8 => st.iotlb_reg,
            _ => self.unexpected(&mut st, offset),
        }
    }

    fn write64(&self, offset: usize, value: u64) {
        let mut st = self.state.borrow_mut();
        if let Some((index, high)) = self.fault_record_slot(offset) {
            if high && value & regs::frcd::F != 0 {
                st.records[index][1] &= !regs::frcd::F;
            }
            return;
        }
        let iotlb = self.caps.iotlb_offset;
        match offset {
            0x20 => st.rtaddr = value,
            0x28 => {
                st.ccmd = value;
                if value & regs::ccmd::ICC != 0 {
                    if st.gsts & global::QUEUED_INVALIDATION != 0 {
                        st.violations
                            .push("register-based invalidation while queued invalidation is on");
                    }
                    if st.stuck.registers {
                        return;
                    }
                    let g = (value >> regs::ccmd::CIRG_SHIFT) & 0b11;
                    let did = (value & regs::ccmd::DID_MASK) as u16;
                    let inv = match g {
                        0b01 => Some(Inv::ContextGlobal),
                        0b10 => Some(Inv::ContextDomain { did }),
                        0b11 => Some(Inv::ContextDevice {
                            did,
                            sid: (value >> regs::ccmd::SID_SHIFT) as u16,
                            fm: ((value >> regs::ccmd::FM_SHIFT) & 0b11) as u8,
                        }),
                        _ => None,
                    };
                    if let Some(inv) = inv {
                        self.perform(&mut st, Via::Register, inv);
                    } else {
                        st.violations.push("CCMD with reserved granularity");
                    }
                    st.ccmd = (value & !regs::ccmd::ICC & !(0b11 << regs::ccmd::CAIG_SHIFT))
                        | (g << regs::ccmd::CAIG_SHIFT);
                }
            }
            0x88 => {
                st.iqt = value & regs::queue::INDEX_MASK;
                self.process_queue(&mut st);
            }
            0x90 => {
                if st.gsts & global::QUEUED_INVALIDATION != 0 {
                    st.violations
                        .push("IQA written while queued invalidation is on");
                }
                st.iqa = value;
            }
            0x58 | 0x70 | 0x78 | 0xb8 => {
                st.plain64.insert(offset, value);
            }
            o if o == iotlb => st.iva = value,
            o if o == iotlb + 8 => {
                st.iotlb_reg = value;
                if value & regs::iotlb::IVT != 0 {
                    if st.gsts & global::QUEUED_INVALIDATION != 0 {
                        st.violations
                            .push("register-based invalidation while queued invalidation is on");
                    }
                    if st.stuck.registers {
                        return;
                    }
                    let g = (value >> regs::iotlb::IIRG_SHIFT) & 0b11;
                    let did = (value >> regs::iotlb::DID_SHIFT) as u16;
                    let iva = st.iva;
                    let inv = match g {
                        0b01 => Some(Inv::IotlbGlobal),
                        0b10 => Some(Inv::IotlbDomain { did }),
                        0b11 => Some(Inv::IotlbPage {
                            did,
                            addr: iva & !0xfff,
                            am: (iva & regs::iotlb::IVA_AM_MASK) as u8,
                            ih: iva & regs::iotlb::IVA_IH != 0,
                        }),
                        _ => None,
                    };
                    if let Some(inv) = inv {
                        self.perform(&mut st, Via::Register, inv);
                    } else {
                        st.violations
                            .push("IOTLB invalidation with reserved granularity");
                    }
                    st.iotlb_reg = (value & !regs::iotlb::IVT & !(0b11 << regs::iotlb::IAIG_SHIFT))
                        | (g << regs::iotlb::IAIG_SHIFT);
                }
            }
            _ => {
                self.unexpected(&mut st, offset);
            }
        }
    }
}
