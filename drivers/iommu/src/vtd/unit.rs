//! One DMA-remapping hardware unit (a DRHD): bring-up, domains, device and
//! PASID attachment, mapping with exactly the invalidation each change
//! needs, and fault draining.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use sluice_hal::{Clock, DeviceAccess, DmaMemory, Mmio, PAGE_SIZE, PhysAddr};
use sluice_pci::Bdf;

use super::caps::VtdCapabilities;
use super::descriptors::{
    Descriptor, DeviceTlbRange, PasidCacheGranularity, PasidIotlbGranularity,
};
use super::error::VtdError;
use super::fault::{self, FaultRecord};
use super::fault_event::{FaultEventMessage, FaultMailbox, StormPolicy};
use super::invalidation::{Hw, InvalidationQueue, Invalidator};
use super::regs::{self, global, queue, rtaddr};
use super::structs::{
    ContextEntry, PASID_DIR_ENTRIES_PER_PAGE, PASID_TABLE_ENTRIES, PasidDirEntry, PasidEntry,
    RootEntry, ScalableContextEntry, TranslationType,
};
use crate::pagetable::vtd::{FirstLevelAttrs, VtdFirstLevel, VtdSecondLevel, VtdSlAttrs};
use crate::pagetable::{
    ChangeKind, Invalidation, IoPageTable, IovaRange, MapPerms, PageSize, PageTableError,
    PendingFree, TableConfig, Translation,
};

/// Which translation-table mode to run the unit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeRequest {
    Legacy,
    /// Scalable mode, or an error when the unit lacks it (ECAP.SMTS) or
    /// queued invalidation.
    Scalable,
    /// Scalable mode when the unit offers it with second-level translation
    /// and queued invalidation, legacy otherwise.
    PreferScalable,
}

/// The mode the unit runs in (RTADDR.TTM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranslationMode {
    Legacy,
    Scalable,
}

/// How to bring a unit up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdConfig {
    /// For log lines (`vtd0`).
    pub index: u32,
    /// Register base, for log lines.
    pub base: u64,
    pub mode: ModeRequest,
    /// DMAR HAW + 1: the width of physical addresses in tables.
    pub host_address_width: u32,
    /// How long any wait on the unit may take.
    pub timeout_ns: u64,
    /// Fault records logged per drain; the rest are only counted.
    pub fault_log_limit: usize,
    /// Fault records each domain queues for its owner before dropping.
    pub domain_fault_queue: usize,
}

impl VtdConfig {
    pub const fn new(index: u32, base: u64, host_address_width: u32) -> Self {
        Self {
            index,
            base,
            mode: ModeRequest::PreferScalable,
            host_address_width,
            timeout_ns: 100_000_000,
            fault_log_limit: 8,
            domain_fault_queue: 64,
        }
    }
}

/// A domain, named by its domain ID on the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u16);

/// The page-table format of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// Second-level tables (legacy mode, or PGTT = second-level).
    SecondLevel,
    /// First-level tables (scalable mode, PGTT = first-level).
    FirstLevel,
}

/// How a domain is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainConfig {
    pub kind: DomainKind,
    /// Force every access through the domain to snoop (SNP in legacy-mode
    /// leaves, PGSNP in scalable-mode PASID entries). Needs ECAP.SC.
    pub enforce_snoop: bool,
    /// IOVA width wanted; the domain gets the smallest supported table
    /// covering it, capped by CAP.MGAW. Default 48.
    pub address_width: Option<u32>,
}

impl DomainConfig {
    pub const fn second_level() -> Self {
        Self {
            kind: DomainKind::SecondLevel,
            enforce_snoop: false,
            address_width: None,
        }
    }
    pub const fn first_level() -> Self {
        Self {
            kind: DomainKind::FirstLevel,
            enforce_snoop: false,
            address_width: None,
        }
    }
    pub const fn snooped(self) -> Self {
        Self {
            enforce_snoop: true,
            ..self
        }
    }
}

/// What a domain looks like to its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    pub kind: DomainKind,
    pub snoop: bool,
    /// IOVAs at or above this cannot be mapped.
    pub iova_limit: u64,
    /// Bitmap of page sizes the domain may use (bit n: 2^n bytes).
    pub page_sizes: u64,
    /// Table pages the domain uses now, for memory accounting.
    pub table_pages: usize,
    pub levels: u8,
}

/// What a domain made with a given [`DomainConfig`] would look like
/// ([`VtdUnit::domain_shape`]): the sizes [`VtdUnit::alloc_domain`] picks,
/// known before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainShape {
    pub kind: DomainKind,
    pub levels: u8,
    /// IOVAs at or above `1 << iova_bits` cannot be mapped.
    pub iova_bits: u32,
    /// The largest leaf the domain's table may use.
    pub max_page: PageSize,
}

impl DomainShape {
    /// Bitmap of the page sizes the domain may use (bit n: 2^n bytes), as
    /// [`DomainInfo::page_sizes`] reports it.
    pub fn page_sizes(&self) -> u64 {
        [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G]
            .into_iter()
            .filter(|&s| s <= self.max_page)
            .fold(0, |acc, s| acc | s.bytes())
    }

    /// `1 << iova_bits`, saturated.
    pub fn iova_limit(&self) -> u64 {
        if self.iova_bits >= 64 {
            u64::MAX
        } else {
            1 << self.iova_bits
        }
    }
}

/// ATS parameters of a device with its device TLB enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsConfig {
    /// The physical function (for VFs; the device itself otherwise).
    pub pfsid: Bdf,
    /// ATS invalidate queue depth hint (MIP).
    pub queue_depth: u8,
}

/// A fault with the domain it was attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributedFault {
    pub record: FaultRecord,
    /// The domain the faulting RID (or RID + PASID) is attached to, if any.
    pub domain: Option<DomainId>,
}

/// The outcome of [`VtdUnit::drain_faults`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultDrain {
    pub faults: Vec<AttributedFault>,
    /// Faults were lost (FSTS.PFO).
    pub overflowed: bool,
    /// Faults drained but not logged (rate limit).
    pub suppressed_logs: usize,
}

/// PASID carried by requests without one, in scalable mode (RID_PASID).
pub const RID_PASID: u32 = 0;
/// PDTS of the single-page PASID directories this driver builds: 2^(2+7) =
/// 512 entries of 64 PASIDs, so PASIDs below 2^15.
const PDTS: u8 = 2;
/// More page-selective invalidations than this in one change become one
/// domain-selective invalidation.
const MAX_PSI_DESCRIPTORS: usize = 16;

enum DomainTable<'a> {
    Second(IoPageTable<'a, VtdSecondLevel, dyn DmaMemory + 'a>),
    First(IoPageTable<'a, VtdFirstLevel, dyn DmaMemory + 'a>),
}

impl DomainTable<'_> {
    fn root(&self) -> PhysAddr {
        match self {
            DomainTable::Second(t) => t.root(),
            DomainTable::First(t) => t.root(),
        }
    }
    fn table_pages(&self) -> usize {
        match self {
            DomainTable::Second(t) => t.table_pages(),
            DomainTable::First(t) => t.table_pages(),
        }
    }
    fn max_page_size(&self) -> u64 {
        match self {
            DomainTable::Second(t) => t.max_page_size(),
            DomainTable::First(t) => t.max_page_size(),
        }
    }
}

struct Domain<'a> {
    table: DomainTable<'a>,
    kind: DomainKind,
    snoop: bool,
    levels: u8,
    iova_limit: u64,
    /// RIDs attached (legacy context entry or RID_PASID entry).
    rids: BTreeSet<u16>,
    /// (RID, PASID) pairs attached.
    pasids: BTreeSet<(u16, u32)>,
    faults: VecDeque<FaultRecord>,
    faults_dropped: u64,
}

#[derive(Default)]
struct Device {
    rid_domain: Option<u16>,
    pasids: BTreeMap<u32, u16>,
    ats: Option<AtsConfig>,
    rmrr: bool,
    /// Scalable mode: the context entry is present.
    context_present: bool,
    pasid_dir: Option<PhysAddr>,
    /// Directory index → PASID table.
    pasid_tables: BTreeMap<u32, PhysAddr>,
}

impl Device {
    fn is_attached(&self) -> bool {
        self.rid_domain.is_some() || !self.pasids.is_empty()
    }
}

/// One VT-d unit under Sluice's control. See the module documentation.
pub struct VtdUnit<'a> {
    pub(super) mmio: &'a dyn Mmio,
    pub(super) mem: &'a dyn DmaMemory,
    clock: &'a dyn Clock,
    pub(super) caps: VtdCapabilities,
    pub(super) config: VtdConfig,
    mode: TranslationMode,
    /// Whether the unit's page walks snoop: legacy ECAP.C; scalable
    /// ECAP.SMPWC (with PWSNP set in every PASID entry).
    tables_coherent: bool,
    root: PhysAddr,
    /// Context tables by bus (legacy) or by bus * 2 + upper half (scalable).
    context_tables: BTreeMap<u16, PhysAddr>,
    invalidator: Invalidator,
    domains: BTreeMap<u16, Domain<'a>>,
    devices: BTreeMap<u16, Device>,
    /// RMRR domains and the regions (`[start, end)`) each maps.
    rmrr_domains: BTreeMap<u16, Vec<(u64, u64)>>,
    /// Table pages whose invalidation failed: kept (never reused) until a
    /// global invalidation succeeds.
    quarantine: Vec<PendingFree>,
    /// The interrupt remapping table, once remapping is on.
    pub(super) ir: Option<super::intremap::IrTable>,
    /// Shared with the fault-event interrupt handler, once fault
    /// interrupts are on.
    fault_mailbox: Option<&'a FaultMailbox>,
}

impl<'a> VtdUnit<'a> {
    // ---- bring-up -----------------------------------------------------------

    /// Takes control of the unit: programs an empty root table (every
    /// device blocked), enables queued invalidation when available,
    /// invalidates every cache, and enables translation.
    pub fn init(
        mmio: &'a dyn Mmio,
        mem: &'a dyn DmaMemory,
        clock: &'a dyn Clock,
        config: VtdConfig,
    ) -> Result<Self, VtdError> {
        let caps = VtdCapabilities::read(mmio);
        log::info!(
            "vtd{} @{:#x}: {}",
            config.index,
            config.base,
            caps.summary()
        );
        if !(32..=52).contains(&config.host_address_width) {
            return Err(VtdError::InvalidConfig(
                "host address width outside 32..=52",
            ));
        }
        if caps.sl_levels().next().is_none() {
            return Err(VtdError::Unsupported(
                "any second-level table size (CAP.SAGAW = 0)",
            ));
        }
        let scalable_ok = caps.scalable_mode && caps.queued_invalidation;
        let mode = match config.mode {
            ModeRequest::Legacy => TranslationMode::Legacy,
            ModeRequest::Scalable if scalable_ok => TranslationMode::Scalable,
            ModeRequest::Scalable => {
                return Err(VtdError::Unsupported(
                    "scalable mode (ECAP.SMTS with queued invalidation)",
                ));
            }
            ModeRequest::PreferScalable if scalable_ok && caps.second_level_translation => {
                TranslationMode::Scalable
            }
            ModeRequest::PreferScalable => TranslationMode::Legacy,
        };
        let tables_coherent = match mode {
            TranslationMode::Legacy => caps.coherent,
            TranslationMode::Scalable => caps.scalable_page_walk_coherency,
        };
        let mut unit = Self {
            mmio,
            mem,
            clock,
            caps,
            config,
            mode,
            tables_coherent,
            root: PhysAddr::new(0),
            context_tables: BTreeMap::new(),
            invalidator: Invalidator::Registers,
            domains: BTreeMap::new(),
            devices: BTreeMap::new(),
            rmrr_domains: BTreeMap::new(),
            quarantine: Vec::new(),
            ir: None,
            fault_mailbox: None,
        };
        unit.take_over()?;
        Ok(unit)
    }

    pub(super) fn hw(&self) -> Hw<'a> {
        Hw {
            access: DeviceAccess {
                mmio: self.mmio,
                mem: self.mem,
                clock: self.clock,
                timeout_ns: self.config.timeout_ns,
                coherent: self.caps.coherent,
            },
            iotlb_offset: self.caps.iotlb_offset,
            unit: self.config.index,
        }
    }

    fn take_over(&mut self) -> Result<(), VtdError> {
        let hw = self.hw();
        // Firmware may have left queued invalidation on: let it drain, then
        // switch it off so the queue can be moved (IQA is only writable
        // with QIE clear).
        if regs::GSTS.read(self.mmio) & global::QUEUED_INVALIDATION != 0 {
            hw.wait("the firmware's invalidation queue to drain", || {
                regs::IQH.read(self.mmio) & queue::INDEX_MASK
                    == regs::IQT.read(self.mmio) & queue::INDEX_MASK
            })?;
            self.set_global(
                global::QUEUED_INVALIDATION,
                false,
                "queued invalidation disable",
            )?;
        }
        // Stale invalidation errors would stop our queue.
        regs::FSTS.write(
            self.mmio,
            regs::fsts::IQE | regs::fsts::ICE | regs::fsts::ITE,
        );

        // 1. An empty root table: every device blocked once TE is on.
        self.root = self.alloc_structure_page()?;
        let ttm = match self.mode {
            TranslationMode::Legacy => rtaddr::TTM_LEGACY,
            TranslationMode::Scalable => rtaddr::TTM_SCALABLE,
        };
        regs::RTADDR.write(self.mmio, self.root.as_u64() | (ttm << rtaddr::TTM_SHIFT));
        // 2. SRTP (one-shot; RTPS reports completion).
        self.one_shot(global::SET_ROOT_TABLE, "set root-table pointer", |s| {
            s & global::SET_ROOT_TABLE != 0
        })?;
        // 3. Write-buffer flush where required (6.8).
        self.write_buffer_flush()?;
        // 4. Queued invalidation, when the unit has it.
        if self.caps.queued_invalidation {
            let base = self.alloc_structure_page()?;
            let status = self.alloc_structure_page()?;
            regs::IQT.write(self.mmio, 0);
            regs::IQA.write(self.mmio, base.as_u64());
            self.set_global(
                global::QUEUED_INVALIDATION,
                true,
                "queued invalidation enable",
            )?;
            self.invalidator = Invalidator::Queue(InvalidationQueue::new(base, status));
        }
        // 5. Nothing cached may survive the new root table (6.5.3).
        let mut all = alloc::vec![
            Descriptor::context_global(),
            Descriptor::iotlb_global(self.drain())
        ];
        if self.mode == TranslationMode::Scalable {
            all.push(Descriptor::pasid_cache(PasidCacheGranularity::Global, 0, 0));
        }
        self.submit(&all)?;
        // 6. Translation on: from now on every DMA is checked.
        if regs::GSTS.read(self.mmio) & global::TRANSLATION_ENABLE == 0 {
            self.set_global(global::TRANSLATION_ENABLE, true, "translation enable")?;
        }
        // 7. Protected memory regions are redundant once remapping is on
        // (11.4.8.1); turn them off so they do not block our mappings.
        if (self.caps.protected_low_memory || self.caps.protected_high_memory)
            && regs::PMEN.read(self.mmio) & (1 << 31) != 0
        {
            regs::PMEN.write(self.mmio, 0);
            hw.wait("protected memory disable (PMEN.PRS)", || {
                regs::PMEN.read(self.mmio) & 1 == 0
            })?;
        }
        // 8. Faults left over from firmware.
        let stale = fault::drain_records(
            self.mmio,
            &self.caps,
            self.config.index,
            self.config.fault_log_limit,
        );
        if !stale.records.is_empty() {
            log::warn!(
                "vtd{}: cleared {} fault records left by firmware",
                self.config.index,
                stale.records.len()
            );
        }
        log::info!(
            "vtd{}: translation enabled in {} mode, all devices blocked",
            self.config.index,
            match self.mode {
                TranslationMode::Legacy => "legacy",
                TranslationMode::Scalable => "scalable",
            }
        );
        Ok(())
    }

    /// Sets or clears one persistent GCMD command (TE, QIE, IRE, ...) and
    /// waits for GSTS to follow. Per spec 11.4.4.1 the write starts from
    /// the current status with the one-shot bits masked out, so exactly one
    /// command changes.
    pub(super) fn set_global(
        &self,
        bit: u32,
        on: bool,
        what: &'static str,
    ) -> Result<(), VtdError> {
        let status = regs::GSTS.read(self.mmio) & global::PERSISTENT_STATUS_MASK;
        let value = if on { status | bit } else { status & !bit };
        regs::GCMD.write(self.mmio, value);
        self.hw()
            .wait(what, || (regs::GSTS.read(self.mmio) & bit != 0) == on)
    }

    /// Issues a one-shot command (SRTP, WBF, SIRTP, SFL) and waits until
    /// `done(GSTS)`.
    pub(super) fn one_shot(
        &self,
        bit: u32,
        what: &'static str,
        done: impl Fn(u32) -> bool,
    ) -> Result<(), VtdError> {
        let status = regs::GSTS.read(self.mmio) & global::PERSISTENT_STATUS_MASK;
        regs::GCMD.write(self.mmio, status | bit);
        self.hw().wait(what, || done(regs::GSTS.read(self.mmio)))
    }

    /// GCMD.WBF when CAP.RWBF asks for it (6.8); a no-op otherwise.
    fn write_buffer_flush(&self) -> Result<(), VtdError> {
        if !self.caps.required_write_buffer_flush {
            return Ok(());
        }
        self.one_shot(global::WRITE_BUFFER_FLUSH, "write-buffer flush", |s| {
            s & global::WRITE_BUFFER_FLUSH == 0
        })
    }

    fn drain(&self) -> bool {
        self.caps.drain_reads || self.caps.drain_writes
    }

    pub(super) fn submit(&mut self, descs: &[Descriptor]) -> Result<(), VtdError> {
        let hw = self.hw();
        self.invalidator.submit(&hw, descs)
    }

    /// Carries out raw invalidation descriptors in order and waits for them
    /// (e.g. interrupt-entry-cache invalidations for interrupt remapping).
    /// Without queued invalidation only context-cache and IOTLB descriptors
    /// can be carried out.
    pub fn submit_descriptors(&mut self, descs: &[Descriptor]) -> Result<(), VtdError> {
        self.submit(descs)
    }

    /// Invalidates every context, PASID and IOTLB cache entry and, once that
    /// succeeded, frees table pages whose earlier invalidation failed.
    pub fn flush_all(&mut self) -> Result<(), VtdError> {
        let mut all = alloc::vec![
            Descriptor::context_global(),
            Descriptor::iotlb_global(self.drain())
        ];
        if self.mode == TranslationMode::Scalable {
            all.push(Descriptor::pasid_cache(PasidCacheGranularity::Global, 0, 0));
        }
        self.submit(&all)?;
        for pending in self.quarantine.drain(..) {
            pending.release(self.mem);
        }
        Ok(())
    }

    // ---- accessors ----------------------------------------------------------

    pub fn capabilities(&self) -> &VtdCapabilities {
        &self.caps
    }

    pub fn mode(&self) -> TranslationMode {
        self.mode
    }

    pub fn uses_queued_invalidation(&self) -> bool {
        matches!(self.invalidator, Invalidator::Queue(_))
    }

    /// The root table (for tests and diagnostics).
    pub fn root_table(&self) -> PhysAddr {
        self.root
    }

    /// The page invalidation-wait descriptors write their status to (the
    /// unit writes it; the CPU only reads it).
    pub fn invalidation_status_page(&self) -> Option<PhysAddr> {
        match &self.invalidator {
            Invalidator::Queue(q) => Some(q.status),
            Invalidator::Registers => None,
        }
    }

    /// Pages the unit's own structures use: the root table, the
    /// invalidation queue and its status page, context tables, PASID
    /// directories and PASID tables, the interrupt-remapping table. With [`VtdUnit::domain_info`]'s
    /// `table_pages` of every domain and [`VtdUnit::quarantined_pages`]
    /// this accounts for every page the unit holds.
    pub fn structure_pages(&self) -> usize {
        let queue = match self.invalidator {
            Invalidator::Queue(_) => 2,
            Invalidator::Registers => 0,
        };
        let pasid: usize = self
            .devices
            .values()
            .map(|d| usize::from(d.pasid_dir.is_some()) + d.pasid_tables.len())
            .sum();
        let ir = usize::from(self.ir.is_some());
        1 + queue + self.context_tables.len() + pasid + ir
    }

    /// Pages held back because their invalidation failed.
    pub fn quarantined_pages(&self) -> usize {
        self.quarantine.iter().map(|p| p.pages().len()).sum()
    }

    /// The highest PASID + 1 attachable (0 when PASIDs are unavailable).
    pub fn pasid_limit(&self) -> u32 {
        if self.mode != TranslationMode::Scalable || !self.caps.pasid {
            return 0;
        }
        let dir_limit = PASID_DIR_ENTRIES_PER_PAGE * PASID_TABLE_ENTRIES;
        let unit_limit = self.caps.pasid_count().min(u64::from(u32::MAX)) as u32;
        dir_limit.min(unit_limit)
    }

    // ---- memory helpers -----------------------------------------------------

    pub(super) fn alloc_structure_page(&self) -> Result<PhysAddr, VtdError> {
        let page = self.mem.alloc_page().map_err(|_| VtdError::OutOfMemory)?;
        self.hw().flush(page, PAGE_SIZE);
        Ok(page)
    }

    /// Writes an entry so that the word with the present bit (`words[0]`)
    /// lands last, then makes it visible to a non-coherent unit.
    pub(super) fn publish(&self, addr: PhysAddr, words: &[u64]) {
        for (i, &w) in words.iter().enumerate().skip(1) {
            self.mem
                .write_u64(PhysAddr::new(addr.as_u64() + 8 * i as u64), w);
        }
        self.mem.write_u64(addr, words[0]);
        self.hw().flush(addr, 8 * words.len() as u64);
    }

    /// Clears an entry, present bit first.
    pub(super) fn retract(&self, addr: PhysAddr, len_words: usize) {
        self.mem.write_u64(addr, 0);
        for i in 1..len_words {
            self.mem
                .write_u64(PhysAddr::new(addr.as_u64() + 8 * i as u64), 0);
        }
        self.hw().flush(addr, 8 * len_words as u64);
    }

    // ---- domains ------------------------------------------------------------

    /// The shape of a domain made with `config` (levels, IOVA width, page
    /// sizes), or why the unit cannot make it, without allocating anything.
    /// [`VtdUnit::alloc_domain`] makes exactly this shape.
    pub fn domain_shape(&self, config: DomainConfig) -> Result<DomainShape, VtdError> {
        if config.enforce_snoop && !self.caps.snoop_control {
            return Err(VtdError::SnoopControlUnsupported);
        }
        let requested = config.address_width.unwrap_or(48);
        match config.kind {
            DomainKind::SecondLevel => {
                if self.mode == TranslationMode::Scalable && !self.caps.second_level_translation {
                    return Err(VtdError::Unsupported(
                        "second-level translation (ECAP.SLTS)",
                    ));
                }
                let width = requested.min(self.caps.max_guest_address_width);
                let levels = self
                    .caps
                    .sl_levels_for(width)
                    .ok_or(VtdError::AddressWidthUnsupported { requested })?;
                Ok(DomainShape {
                    kind: config.kind,
                    levels,
                    iova_bits: width,
                    max_page: self.caps.max_sl_page(),
                })
            }
            DomainKind::FirstLevel => {
                if self.mode != TranslationMode::Scalable || !self.caps.first_level_translation {
                    return Err(VtdError::Unsupported(
                        "first-level translation (scalable mode with ECAP.FLTS)",
                    ));
                }
                let levels = if requested > 48 && self.caps.first_level_5level {
                    5
                } else {
                    4
                };
                // Only the canonical lower half: the engine's first-level
                // input width counts the upper half too.
                let width = (12 + 9 * u32::from(levels) - 1).min(requested.max(12));
                Ok(DomainShape {
                    kind: config.kind,
                    levels,
                    iova_bits: width,
                    max_page: self.caps.max_fl_page(),
                })
            }
        }
    }

    /// Allocates an empty domain with the lowest free domain ID (DID 0 is
    /// reserved in caching mode, spec 6.2.2, where it tags cached
    /// not-present entries).
    pub fn alloc_domain(&mut self, config: DomainConfig) -> Result<DomainId, VtdError> {
        let shape = self.domain_shape(config)?;
        let first = if self.caps.caching_mode { 1 } else { 0 };
        let did = (first..self.caps.domain_count)
            .map(|d| d as u16)
            .find(|d| !self.domains.contains_key(d))
            .ok_or(VtdError::DomainIdsExhausted)?;
        let haw = self.config.host_address_width;
        let cfg = TableConfig::new(shape.max_page, self.tables_coherent);
        let table = match shape.kind {
            DomainKind::SecondLevel => {
                let format = VtdSecondLevel::new(shape.levels, shape.iova_bits, haw)?;
                DomainTable::Second(IoPageTable::new(self.mem, format, cfg)?)
            }
            DomainKind::FirstLevel => {
                let format = VtdFirstLevel::new(shape.levels, haw)?;
                DomainTable::First(IoPageTable::new(self.mem, format, cfg)?)
            }
        };
        self.domains.insert(
            did,
            Domain {
                table,
                kind: config.kind,
                snoop: config.enforce_snoop,
                levels: shape.levels,
                iova_limit: shape.iova_limit(),
                rids: BTreeSet::new(),
                pasids: BTreeSet::new(),
                faults: VecDeque::new(),
                faults_dropped: 0,
            },
        );
        Ok(DomainId(did))
    }

    pub fn domain_info(&self, domain: DomainId) -> Result<DomainInfo, VtdError> {
        let d = self
            .domains
            .get(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        let max = d.table.max_page_size();
        let page_sizes = [1u64 << 12, 1 << 21, 1 << 30]
            .into_iter()
            .filter(|&s| s <= max)
            .fold(0, |acc, s| acc | s);
        Ok(DomainInfo {
            kind: d.kind,
            snoop: d.snoop,
            iova_limit: d.iova_limit,
            page_sizes,
            table_pages: d.table.table_pages(),
            levels: d.levels,
        })
    }

    /// Frees a domain nothing is attached to, with its tables.
    pub fn free_domain(&mut self, domain: DomainId) -> Result<(), VtdError> {
        let d = self
            .domains
            .get(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        if !d.rids.is_empty() || !d.pasids.is_empty() {
            return Err(VtdError::DomainInUse(domain.0));
        }
        let d = self
            .domains
            .remove(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        self.rmrr_domains.remove(&domain.0);
        // Every detach invalidated this DID already: no walker can reach
        // these tables any more.
        let pending = match d.table {
            DomainTable::Second(t) => t.destroy(),
            DomainTable::First(t) => t.destroy(),
        };
        pending.release(self.mem);
        Ok(())
    }

    /// What `iova` translates to in the domain's table (software view).
    pub fn translate(
        &self,
        domain: DomainId,
        iova: u64,
    ) -> Result<Option<(PhysAddr, MapPerms)>, VtdError> {
        let d = self
            .domains
            .get(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        Ok(match &d.table {
            DomainTable::Second(t) => t.translate(iova).map(|t: Translation<_>| (t.phys, t.perms)),
            DomainTable::First(t) => t.translate(iova).map(|t: Translation<_>| (t.phys, t.perms)),
        })
    }

    /// Maps `[iova, iova + len)` to `[phys, phys + len)` and issues the
    /// invalidation the change needs (only in caching mode, where
    /// not-present entries may be cached; a write-buffer flush where
    /// CAP.RWBF asks for one).
    pub fn map(
        &mut self,
        domain: DomainId,
        iova: u64,
        phys: PhysAddr,
        len: u64,
        perms: MapPerms,
    ) -> Result<(), VtdError> {
        let legacy = self.mode == TranslationMode::Legacy;
        let d = self
            .domains
            .get_mut(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        let end = iova.checked_add(len).ok_or(VtdError::InvalidRange)?;
        if end > d.iova_limit {
            return Err(VtdError::PageTable(PageTableError::IovaOutOfRange {
                input_bits: 64 - d.iova_limit.leading_zeros() - 1,
            }));
        }
        let inv = match &mut d.table {
            DomainTable::Second(t) => {
                let attrs = VtdSlAttrs {
                    // SNP is a legacy-mode leaf bit; scalable mode uses
                    // PGSNP in the PASID entry instead.
                    snoop: d.snoop && legacy,
                    ..VtdSlAttrs::default()
                };
                t.map(iova, phys, len, perms, attrs)?
            }
            DomainTable::First(t) => {
                // DMA without PASID privilege is a user-mode access.
                let attrs = FirstLevelAttrs {
                    user: true,
                    ..FirstLevelAttrs::default()
                };
                t.map(iova, phys, len, perms, attrs)?
            }
        };
        self.complete_change(domain.0, inv)
    }

    /// Unmaps every mapped page of `[iova, iova + len)`, invalidates exactly
    /// what changed, and frees emptied tables once the invalidation
    /// completed. Returns the bytes whose translation changed.
    pub fn unmap(&mut self, domain: DomainId, iova: u64, len: u64) -> Result<u64, VtdError> {
        let d = self
            .domains
            .get_mut(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        let inv = match &mut d.table {
            DomainTable::Second(t) => t.unmap(iova, len)?,
            DomainTable::First(t) => t.unmap(iova, len)?,
        };
        let changed = inv.changed_bytes();
        self.complete_change(domain.0, inv)?;
        Ok(changed)
    }

    /// Acts on what the engine says changed, then frees unlinked tables.
    fn complete_change(&mut self, did: u16, inv: Invalidation) -> Result<(), VtdError> {
        let mapped = inv.kind() == ChangeKind::Mapped;
        let attached = self
            .domains
            .get(&did)
            .is_some_and(|d| !d.rids.is_empty() || !d.pasids.is_empty());
        let needs_invalidation = !inv.is_empty() && attached && (!mapped || self.caps.caching_mode);
        if !needs_invalidation {
            // A not-present → present change is seen by the walker once
            // the write reaches memory (write-buffer flush on RWBF units).
            if !inv.is_empty() && attached {
                self.write_buffer_flush()?;
            }
            inv.complete(self.mem);
            return Ok(());
        }
        let ranges: Vec<IovaRange> = if mapped {
            inv.newly_present().to_vec()
        } else {
            inv.ranges().to_vec()
        };
        // IH = 1 keeps the paging-structure caches: only when no non-leaf
        // entry changed (no table freed, split or, in caching mode, newly
        // installed).
        let ih = !(inv.flush_paging_structures() || (mapped && inv.tables_installed()));
        let descs = self.range_invalidation(did, &ranges, ih);
        match self.submit(&descs) {
            Ok(()) => {
                inv.complete(self.mem);
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "vtd{}: invalidation after a change to domain {did} failed ({e}); \
                     keeping {} table pages out of use",
                    self.config.index,
                    inv.pending_free().len()
                );
                self.quarantine.push(inv.into_pending_free());
                Err(e)
            }
        }
    }

    /// The smallest naturally aligned power-of-two block of pages that
    /// covers `range`: (address, AM).
    fn psi_cover(range: &IovaRange) -> (u64, u8) {
        let first = range.start >> 12;
        let last = (range.end - 1) >> 12;
        let am = (64 - (first ^ last).leading_zeros()) as u8;
        let base = if am >= 64 { 0 } else { (first >> am) << am };
        (base << 12, am)
    }

    /// IOTLB (and device-TLB) invalidation of `ranges` in domain `did`:
    /// page-selective with the address mask where the unit allows it
    /// (CAP.PSI, AM ≤ CAP.MAMV, few ranges), domain-selective otherwise.
    fn range_invalidation(&self, did: u16, ranges: &[IovaRange], ih: bool) -> Vec<Descriptor> {
        let Some(d) = self.domains.get(&did) else {
            return Vec::new();
        };
        let covers: Vec<(u64, u8)> = ranges.iter().map(Self::psi_cover).collect();
        let selective = self.caps.page_selective_invalidation
            && !covers.is_empty()
            && covers.len() <= MAX_PSI_DESCRIPTORS
            && covers
                .iter()
                .all(|&(_, am)| am <= self.caps.max_address_mask);
        let drain = self.drain();
        let mut descs = Vec::new();
        match d.kind {
            DomainKind::SecondLevel => {
                if d.rids.is_empty() && d.pasids.is_empty() {
                    return descs;
                }
                if selective {
                    for &(addr, am) in &covers {
                        descs.push(Descriptor::iotlb_page(did, addr, am, ih, drain));
                    }
                } else {
                    descs.push(Descriptor::iotlb_domain(did, drain));
                }
            }
            DomainKind::FirstLevel => {
                // First-level translations are cached per PASID (6.5.2.4).
                let mut pasids: Vec<u32> = d.pasids.iter().map(|&(_, p)| p).collect();
                if !d.rids.is_empty() {
                    pasids.push(RID_PASID);
                }
                pasids.sort_unstable();
                pasids.dedup();
                for p in pasids {
                    if selective {
                        for &(addr, am) in &covers {
                            descs.push(Descriptor::pasid_iotlb(
                                PasidIotlbGranularity::Page,
                                did,
                                p,
                                addr,
                                am,
                                ih,
                            ));
                        }
                    } else {
                        descs.push(Descriptor::pasid_iotlb(
                            PasidIotlbGranularity::Pasid,
                            did,
                            p,
                            0,
                            0,
                            false,
                        ));
                    }
                }
            }
        }
        // Device TLBs of ATS-enabled devices behind the domain.
        let dev_ranges: Vec<DeviceTlbRange> = if selective {
            covers
                .iter()
                .map(|&(addr, order)| DeviceTlbRange { addr, order })
                .collect()
        } else {
            alloc::vec![DeviceTlbRange::ALL]
        };
        for &rid in &d.rids {
            if let Some(ats) = self.devices.get(&rid).and_then(|dev| dev.ats) {
                for &r in &dev_ranges {
                    descs.push(Descriptor::device_tlb(
                        rid,
                        ats.pfsid.requester_id(),
                        ats.queue_depth,
                        r,
                    ));
                }
            }
        }
        for &(rid, pasid) in &d.pasids {
            if let Some(ats) = self.devices.get(&rid).and_then(|dev| dev.ats) {
                for &r in &dev_ranges {
                    descs.push(Descriptor::pasid_device_tlb(
                        rid,
                        ats.pfsid.requester_id(),
                        ats.queue_depth,
                        pasid,
                        r,
                    ));
                }
            }
        }
        descs
    }

    /// Fault records queued for `domain` since the last call, and how many
    /// were dropped because the queue was full.
    pub fn take_domain_faults(
        &mut self,
        domain: DomainId,
    ) -> Result<(Vec<FaultRecord>, u64), VtdError> {
        let d = self
            .domains
            .get_mut(&domain.0)
            .ok_or(VtdError::NoSuchDomain(domain.0))?;
        let dropped = core::mem::take(&mut d.faults_dropped);
        Ok((d.faults.drain(..).collect(), dropped))
    }
}

impl<'a> VtdUnit<'a> {
    // ---- devices --------------------------------------------------------------

    /// Enables device-TLB invalidation for a device whose ATS capability
    /// the caller enabled: its context entry allows translated requests
    /// (legacy TT = 01b, scalable DTE) and every unmap invalidates its ATS
    /// cache too. The device must not be attached.
    pub fn enable_device_tlb(&mut self, rid: Bdf, ats: AtsConfig) -> Result<(), VtdError> {
        if !self.caps.device_tlb || !self.uses_queued_invalidation() {
            return Err(VtdError::Unsupported(
                "device TLBs (ECAP.DT with queued invalidation)",
            ));
        }
        let sid = rid.requester_id();
        let dev = self.devices.entry(sid).or_default();
        if dev.is_attached() {
            return Err(VtdError::DeviceBusy);
        }
        dev.ats = Some(ats);
        if dev.context_present {
            // Scalable mode keeps the context entry of a detached device:
            // set DTE in its first word (one atomic write) and drop the
            // cached copy.
            if let Some(addr) = self.scalable_context_addr(sid) {
                let word = self.mem.read_u64(addr) | ScalableContextEntry::DEVICE_TLB_ENABLE;
                self.mem.write_u64(addr, word);
                self.hw().flush(addr, 8);
                return self.submit(&[Descriptor::context_device(0, sid, 0)]);
            }
        }
        Ok(())
    }

    /// The domain a device's requests without PASID translate through.
    pub fn device_domain(&self, rid: Bdf) -> Option<DomainId> {
        self.devices
            .get(&rid.requester_id())
            .and_then(|d| d.rid_domain)
            .map(DomainId)
    }

    /// The domain `(rid, pasid)` is attached to.
    pub fn pasid_domain(&self, rid: Bdf, pasid: u32) -> Option<DomainId> {
        self.devices
            .get(&rid.requester_id())
            .and_then(|d| d.pasids.get(&pasid).copied())
            .map(DomainId)
    }

    /// Whether the device was attached by [`VtdUnit::map_rmrr`] (its
    /// firmware-reserved region must stay mapped).
    pub fn is_rmrr_device(&self, rid: Bdf) -> bool {
        self.devices
            .get(&rid.requester_id())
            .is_some_and(|d| d.rmrr)
    }

    fn check_attachable(&self, did: u16, pasid: Option<u32>) -> Result<(), VtdError> {
        let d = self.domains.get(&did).ok_or(VtdError::NoSuchDomain(did))?;
        if self.mode == TranslationMode::Legacy && d.kind != DomainKind::SecondLevel {
            return Err(VtdError::WrongDomainKind);
        }
        if let Some(p) = pasid {
            if self.mode != TranslationMode::Scalable {
                return Err(VtdError::NotScalableMode);
            }
            let limit = self.pasid_limit();
            if p == RID_PASID || p >= limit {
                return Err(VtdError::PasidOutOfRange { pasid: p, limit });
            }
        }
        Ok(())
    }

    /// Points the requests of `rid` that carry no PASID at `domain`. A
    /// device attached elsewhere is moved (blocked in between, never torn).
    pub fn attach_device(&mut self, rid: Bdf, domain: DomainId) -> Result<(), VtdError> {
        self.check_attachable(domain.0, None)?;
        let sid = rid.requester_id();
        if self.devices.get(&sid).and_then(|d| d.rid_domain) == Some(domain.0) {
            return Ok(());
        }
        match self.mode {
            TranslationMode::Legacy => self.legacy_attach(sid, domain.0),
            TranslationMode::Scalable => self.scalable_attach(sid, RID_PASID, domain.0),
        }
    }

    /// Attaches `rid` and each of its DMA aliases (requester IDs a bridge
    /// may substitute) to `domain`; on failure the ones attached here are
    /// blocked again.
    pub fn attach_device_with_aliases(
        &mut self,
        rid: Bdf,
        aliases: &[Bdf],
        domain: DomainId,
    ) -> Result<(), VtdError> {
        let mut done: Vec<Bdf> = Vec::new();
        for &r in core::iter::once(&rid).chain(aliases.iter()) {
            if done.contains(&r) {
                continue;
            }
            if let Err(e) = self.attach_device(r, domain) {
                for &undo in &done {
                    let _ = self.detach_device(undo);
                }
                return Err(e);
            }
            done.push(r);
        }
        Ok(())
    }

    /// Blocks the requests of `rid` without PASID again.
    pub fn detach_device(&mut self, rid: Bdf) -> Result<(), VtdError> {
        let sid = rid.requester_id();
        let did = self
            .devices
            .get(&sid)
            .and_then(|d| d.rid_domain)
            .ok_or(VtdError::NotAttached)?;
        match self.mode {
            TranslationMode::Legacy => self.legacy_detach(sid, did),
            TranslationMode::Scalable => self.scalable_detach(sid, RID_PASID, did),
        }
    }

    /// Points requests of `rid` tagged with `pasid` at `domain` (scalable
    /// mode; second-level domains get PGTT = second-level, first-level
    /// domains PGTT = first-level).
    pub fn attach_pasid(&mut self, rid: Bdf, pasid: u32, domain: DomainId) -> Result<(), VtdError> {
        self.check_attachable(domain.0, Some(pasid))?;
        let sid = rid.requester_id();
        if self.pasid_domain(rid, pasid) == Some(domain) {
            return Ok(());
        }
        self.scalable_attach(sid, pasid, domain.0)
    }

    pub fn detach_pasid(&mut self, rid: Bdf, pasid: u32) -> Result<(), VtdError> {
        let sid = rid.requester_id();
        let did = self
            .devices
            .get(&sid)
            .and_then(|d| d.pasids.get(&pasid).copied())
            .ok_or(VtdError::NotAttached)?;
        self.scalable_detach(sid, pasid, did)
    }

    // ---- legacy mode (9.1, 9.3) ----------------------------------------------

    fn legacy_context_table(&mut self, bus: u8) -> Result<PhysAddr, VtdError> {
        if let Some(&t) = self.context_tables.get(&u16::from(bus)) {
            return Ok(t);
        }
        let table = self.alloc_structure_page()?;
        let entry = RootEntry::legacy(table);
        self.publish(self.root_entry_addr(bus), &entry.words());
        self.context_tables.insert(u16::from(bus), table);
        Ok(table)
    }

    fn root_entry_addr(&self, bus: u8) -> PhysAddr {
        PhysAddr::new(self.root.as_u64() + u64::from(bus) * 16)
    }

    fn legacy_attach(&mut self, sid: u16, did: u16) -> Result<(), VtdError> {
        let table = self.legacy_context_table((sid >> 8) as u8)?;
        let old = self.devices.get(&sid).and_then(|d| d.rid_domain);
        if let Some(old) = old {
            self.legacy_detach(sid, old)?;
        }
        let d = self.domains.get(&did).ok_or(VtdError::NoSuchDomain(did))?;
        let ats = self.devices.get(&sid).and_then(|d| d.ats).is_some();
        let tt = if ats {
            TranslationType::AllowDeviceTlb
        } else {
            TranslationType::UntranslatedOnly
        };
        let entry = ContextEntry::new(d.table.root(), d.levels - 2, did, tt);
        let addr = PhysAddr::new(table.as_u64() + u64::from(sid & 0xff) * 16);
        self.publish(addr, &entry.words());
        self.note_attached(sid, None, did);
        self.after_not_present_to_present(alloc::vec![
            // Caching mode: the not-present entry may be cached, tagged
            // with domain 0 (6.2.2).
            Descriptor::context_device(0, sid, 0),
            Descriptor::iotlb_domain(did, self.drain()),
        ])
    }

    /// After an entry went from not present to present: caching-mode units
    /// may have cached the not-present entry and need `descs`; others only
    /// need the write to reach memory (write-buffer flush on RWBF units).
    fn after_not_present_to_present(&mut self, descs: Vec<Descriptor>) -> Result<(), VtdError> {
        if self.caps.caching_mode {
            self.submit(&descs)
        } else {
            self.write_buffer_flush()
        }
    }

    fn legacy_detach(&mut self, sid: u16, did: u16) -> Result<(), VtdError> {
        let Some(&table) = self.context_tables.get(&(sid >> 8)) else {
            return Err(VtdError::NotAttached);
        };
        let addr = PhysAddr::new(table.as_u64() + u64::from(sid & 0xff) * 16);
        self.retract(addr, 2);
        self.note_detached(sid, None, did);
        // Present → not present: the context cache and the domain's IOTLB
        // entries may hold the old translation (6.5.3.3).
        let mut descs = alloc::vec![
            Descriptor::context_device(did, sid, 0),
            Descriptor::iotlb_domain(did, self.drain()),
        ];
        if let Some(ats) = self.devices.get(&sid).and_then(|d| d.ats) {
            descs.push(Descriptor::device_tlb(
                sid,
                ats.pfsid.requester_id(),
                ats.queue_depth,
                DeviceTlbRange::ALL,
            ));
        }
        self.submit(&descs)
    }

    fn note_attached(&mut self, sid: u16, pasid: Option<u32>, did: u16) {
        let dev = self.devices.entry(sid).or_default();
        match pasid {
            None => dev.rid_domain = Some(did),
            Some(p) => {
                dev.pasids.insert(p, did);
            }
        }
        if let Some(d) = self.domains.get_mut(&did) {
            match pasid {
                None => {
                    d.rids.insert(sid);
                }
                Some(p) => {
                    d.pasids.insert((sid, p));
                }
            }
        }
    }

    fn note_detached(&mut self, sid: u16, pasid: Option<u32>, did: u16) {
        if let Some(dev) = self.devices.get_mut(&sid) {
            match pasid {
                None => dev.rid_domain = None,
                Some(p) => {
                    dev.pasids.remove(&p);
                }
            }
            if !dev.is_attached() {
                dev.rmrr = false;
            }
        }
        if let Some(d) = self.domains.get_mut(&did) {
            match pasid {
                None => {
                    d.rids.remove(&sid);
                }
                Some(p) => {
                    d.pasids.remove(&(sid, p));
                }
            }
        }
    }

    // ---- scalable mode (9.2, 9.4-9.6) -------------------------------------------

    fn scalable_context_table(&mut self, sid: u16) -> Result<PhysAddr, VtdError> {
        let bus = (sid >> 8) as u8;
        let upper = sid & 0x80 != 0;
        let key = u16::from(bus) * 2 + u16::from(upper);
        if let Some(&t) = self.context_tables.get(&key) {
            return Ok(t);
        }
        let table = self.alloc_structure_page()?;
        // Each half of the root entry is one 64-bit word with its own
        // present bit: publish only ours.
        let other_half = self.context_tables.get(&(key ^ 1)).copied();
        let entry = if upper {
            RootEntry::scalable(other_half, Some(table))
        } else {
            RootEntry::scalable(Some(table), other_half)
        };
        let word = usize::from(upper);
        let addr = PhysAddr::new(self.root_entry_addr(bus).as_u64() + 8 * word as u64);
        self.publish(addr, &entry.words()[word..=word]);
        self.context_tables.insert(key, table);
        Ok(table)
    }

    fn scalable_context_addr(&self, sid: u16) -> Option<PhysAddr> {
        let key = (sid >> 8) * 2 + u16::from(sid & 0x80 != 0);
        let table = self.context_tables.get(&key)?;
        Some(PhysAddr::new(table.as_u64() + u64::from(sid & 0x7f) * 32))
    }

    /// Makes the device's scalable context entry present (with an empty
    /// PASID directory: every PASID, RID_PASID included, still blocked).
    fn ensure_scalable_context(&mut self, sid: u16) -> Result<(), VtdError> {
        if self.devices.get(&sid).is_some_and(|d| d.context_present) {
            return Ok(());
        }
        self.scalable_context_table(sid)?;
        let dir = self.alloc_structure_page()?;
        let ats = self.devices.get(&sid).and_then(|d| d.ats).is_some();
        let mut entry = ScalableContextEntry::new(dir, PDTS, RID_PASID);
        if self.caps.pasid {
            entry = entry.with_pasid_enable();
        }
        if ats {
            entry = entry.with_device_tlb();
        }
        let Some(addr) = self.scalable_context_addr(sid) else {
            self.mem.free_page(dir);
            return Err(VtdError::NotAttached);
        };
        self.publish(addr, &entry.words());
        let dev = self.devices.entry(sid).or_default();
        dev.context_present = true;
        dev.pasid_dir = Some(dir);
        self.after_not_present_to_present(alloc::vec![Descriptor::context_device(0, sid, 0)])
    }

    /// The address of the PASID entry of `(sid, pasid)`, allocating its
    /// PASID table if needed.
    fn pasid_entry_addr(&mut self, sid: u16, pasid: u32) -> Result<PhysAddr, VtdError> {
        let dir_index = pasid / PASID_TABLE_ENTRIES;
        let dev = self.devices.get(&sid).ok_or(VtdError::NotAttached)?;
        let dir = dev.pasid_dir.ok_or(VtdError::NotAttached)?;
        let table = match dev.pasid_tables.get(&dir_index) {
            Some(&t) => t,
            None => {
                let t = self.alloc_structure_page()?;
                let entry = PasidDirEntry::new(t);
                self.publish(
                    PhysAddr::new(dir.as_u64() + u64::from(dir_index) * 8),
                    &[entry.raw()],
                );
                if let Some(dev) = self.devices.get_mut(&sid) {
                    dev.pasid_tables.insert(dir_index, t);
                }
                t
            }
        };
        Ok(PhysAddr::new(
            table.as_u64() + u64::from(pasid % PASID_TABLE_ENTRIES) * 64,
        ))
    }

    fn scalable_attach(&mut self, sid: u16, pasid: u32, did: u16) -> Result<(), VtdError> {
        // Allocate everything first, so a failure leaves the old
        // attachment in place.
        self.ensure_scalable_context(sid)?;
        let addr = self.pasid_entry_addr(sid, pasid)?;
        let old = self.devices.get(&sid).and_then(|d| {
            if pasid == RID_PASID {
                d.rid_domain
            } else {
                d.pasids.get(&pasid).copied()
            }
        });
        if let Some(old) = old {
            self.scalable_detach(sid, pasid, old)?;
        }
        let d = self.domains.get(&did).ok_or(VtdError::NoSuchDomain(did))?;
        let mut entry = match d.kind {
            DomainKind::SecondLevel => PasidEntry::second_level(d.table.root(), d.levels - 2, did),
            DomainKind::FirstLevel => PasidEntry::first_level(d.table.root(), d.levels, did),
        };
        if d.snoop {
            entry = entry.with_page_snoop();
        }
        if self.caps.scalable_page_walk_coherency {
            entry = entry.with_page_walk_snoop();
        }
        self.publish(addr, &entry.words());
        self.note_attached(sid, (pasid != RID_PASID).then_some(pasid), did);
        self.after_not_present_to_present(alloc::vec![Descriptor::pasid_cache(
            // Which DID tags a cached not-present PASID entry is not
            // ours to know: invalidate the PASID cache globally.
            PasidCacheGranularity::Global,
            0,
            0,
        )])
    }

    fn scalable_detach(&mut self, sid: u16, pasid: u32, did: u16) -> Result<(), VtdError> {
        let addr = self.pasid_entry_addr(sid, pasid)?;
        let kind = self
            .domains
            .get(&did)
            .map_or(DomainKind::SecondLevel, |d| d.kind);
        self.retract(addr, 8);
        self.note_detached(sid, (pasid != RID_PASID).then_some(pasid), did);
        // Present → not present: PASID cache, then the translations cached
        // for the PASID (6.5.3.4), then the device TLB.
        let mut descs = alloc::vec![Descriptor::pasid_cache(
            PasidCacheGranularity::Pasid,
            did,
            pasid
        )];
        match kind {
            DomainKind::SecondLevel => descs.push(Descriptor::iotlb_domain(did, self.drain())),
            DomainKind::FirstLevel => descs.push(Descriptor::pasid_iotlb(
                PasidIotlbGranularity::Pasid,
                did,
                pasid,
                0,
                0,
                false,
            )),
        }
        if let Some(ats) = self.devices.get(&sid).and_then(|d| d.ats) {
            let pfsid = ats.pfsid.requester_id();
            descs.push(if pasid == RID_PASID {
                Descriptor::device_tlb(sid, pfsid, ats.queue_depth, DeviceTlbRange::ALL)
            } else {
                Descriptor::pasid_device_tlb(
                    sid,
                    pfsid,
                    ats.queue_depth,
                    pasid,
                    DeviceTlbRange::ALL,
                )
            });
        }
        self.submit(&descs)
    }

    // ---- RMRR ---------------------------------------------------------------

    /// Maps a firmware-reserved region (DMAR RMRR, `base ..= limit`)
    /// one-to-one for `devices`, attaches them to an RMRR domain and flags
    /// them as RMRR devices.
    ///
    /// Each RMRR domain holds exactly the regions of the devices attached
    /// to it, so a device reaches only the regions that name it: devices
    /// already sharing an RMRR domain with others not in `devices` move to
    /// a new domain holding their old regions plus this one.
    pub fn map_rmrr(&mut self, base: u64, limit: u64, devices: &[Bdf]) -> Result<(), VtdError> {
        let end = limit.checked_add(1).ok_or(VtdError::InvalidRange)?;
        if end <= base || !base.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
            return Err(VtdError::InvalidRange);
        }
        // Group the devices by the RMRR domain they are in now.
        let mut groups: BTreeMap<Option<u16>, Vec<Bdf>> = BTreeMap::new();
        for &dev in devices {
            let current = self
                .devices
                .get(&dev.requester_id())
                .and_then(|d| d.rid_domain)
                .filter(|d| self.rmrr_domains.contains_key(d));
            let group = groups.entry(current).or_default();
            if !group.contains(&dev) {
                group.push(dev);
            }
        }
        for (current, group) in groups {
            let whole_domain = current.and_then(|did| {
                let users = &self.domains.get(&did)?.rids;
                let named: BTreeSet<u16> = group.iter().map(|b| b.requester_id()).collect();
                (*users == named).then_some(did)
            });
            let did = match whole_domain {
                // Every user of the domain is named: the region joins it.
                Some(did) => did,
                None => {
                    let did = self.alloc_domain(DomainConfig::second_level())?.0;
                    let inherited = current
                        .and_then(|d| self.rmrr_domains.get(&d).cloned())
                        .unwrap_or_default();
                    self.rmrr_domains.insert(did, Vec::new());
                    let mapped = inherited
                        .iter()
                        .chain(core::iter::once(&(base, end)))
                        .try_for_each(|&(b, e)| self.identity_map(did, b, e));
                    if let Err(e) = mapped {
                        // Nothing is attached to it yet: free it with its
                        // tables.
                        let _ = self.free_domain(DomainId(did));
                        return Err(e);
                    }
                    did
                }
            };
            if whole_domain.is_some() {
                self.identity_map(did, base, end)?;
            }
            for dev in group {
                self.attach_device(dev, DomainId(did))?;
                self.devices.entry(dev.requester_id()).or_default().rmrr = true;
            }
            log::info!(
                "vtd{}: RMRR {base:#x}..={limit:#x} identity-mapped in domain {did}",
                self.config.index
            );
        }
        Ok(())
    }

    /// Identity-maps `[base, end)` in RMRR domain `did`; pages an
    /// overlapping region mapped already must be identity-mapped, the runs
    /// between them get mapped.
    fn identity_map(&mut self, did: u16, base: u64, end: u64) -> Result<(), VtdError> {
        let domain = DomainId(did);
        let mut page = base;
        while page < end {
            if let Some((phys, _)) = self.translate(domain, page)? {
                if phys.as_u64() != page {
                    return Err(VtdError::PageTable(PageTableError::AlreadyMapped {
                        iova: page,
                    }));
                }
                page += PAGE_SIZE;
                continue;
            }
            let mut run_end = page + PAGE_SIZE;
            while run_end < end && self.translate(domain, run_end)?.is_none() {
                run_end += PAGE_SIZE;
            }
            self.map(
                domain,
                page,
                PhysAddr::new(page),
                run_end - page,
                MapPerms::READ_WRITE,
            )?;
            page = run_end;
        }
        if let Some(regions) = self.rmrr_domains.get_mut(&did) {
            regions.push((base, end));
        }
        Ok(())
    }

    // ---- faults ---------------------------------------------------------------

    fn drain_with_mailbox(&self, mailbox: &FaultMailbox) -> fault::RawDrain {
        let hw = self.hw();
        // The handler holds the mailbox only while it empties the
        // registers (another CPU): wait for it, bounded.
        if hw
            .wait("the fault interrupt handler", || mailbox.try_lock())
            .is_err()
        {
            log::error!(
                "vtd{}: the fault interrupt handler held the fault registers too long; \
                 faults stay queued for the next drain",
                self.config.index
            );
            return fault::RawDrain::default();
        }
        let mut records = Vec::new();
        let (mut overflowed, mut dropped) = mailbox.collect_locked(self.mmio, &mut records);
        mailbox.unlock();
        // An interrupt that found the mailbox held left its faults in the
        // registers, where they keep PPF set (no further interrupt): one
        // more pass picks them up.
        if mailbox.take_deferred() && mailbox.try_lock() {
            let (o, d) = mailbox.collect_locked(self.mmio, &mut records);
            mailbox.unlock();
            overflowed |= o;
            dropped += d;
        }
        if dropped > 0 {
            log::warn!(
                "vtd{}: {dropped} faults drained by the interrupt handler were lost (mailbox full)",
                self.config.index
            );
        }
        let overflowed = overflowed || dropped > 0;
        let suppressed_logs = fault::log_records(
            self.config.index,
            &records,
            overflowed,
            self.config.fault_log_limit,
        );
        if mailbox.rearm(self.mmio, self.clock.now_ns()) {
            log::warn!(
                "vtd{}: fault interrupt unmasked again after a storm ({} storms so far)",
                self.config.index,
                mailbox.storms()
            );
        }
        fault::RawDrain {
            records,
            overflowed,
            suppressed_logs,
        }
    }

    /// Routes fault events to an interrupt (7.4.1): FEDATA/FEADDR (and
    /// FEUADDR on x2APIC-capable units) get `message`, the mailbox is
    /// shared with the handler (which must call
    /// [`FaultMailbox::service_interrupt`] and send EOI), and FECTL.IM is
    /// cleared. A fault already pending interrupts at once.
    pub fn enable_fault_interrupt(
        &mut self,
        message: FaultEventMessage,
        mailbox: &'a FaultMailbox,
        policy: StormPolicy,
    ) -> Result<(), VtdError> {
        if message.upper_address != 0 && !self.caps.extended_interrupt_mode {
            return Err(VtdError::InvalidConfig(
                "a destination above 255 needs ECAP.EIM (FEUADDR)",
            ));
        }
        if policy.max_interrupts == 0 {
            return Err(VtdError::InvalidConfig(
                "a storm policy allowing no interrupt",
            ));
        }
        regs::FECTL.write(self.mmio, regs::event_control::IM);
        mailbox.attach(
            self.caps.fault_record_offset,
            self.caps.fault_record_count,
            policy,
        );
        regs::FEDATA.write(self.mmio, message.data);
        regs::FEADDR.write(self.mmio, message.address);
        if self.caps.extended_interrupt_mode {
            regs::FEUADDR.write(self.mmio, message.upper_address);
        }
        self.fault_mailbox = Some(mailbox);
        regs::FECTL.write(self.mmio, 0);
        log::info!(
            "vtd{}: fault events interrupt vector {:#x} at {:#x}",
            self.config.index,
            message.data & 0xff,
            message.address
        );
        Ok(())
    }

    /// Masks the fault-event interrupt again; faults are found by polling
    /// [`VtdUnit::drain_faults`] only.
    pub fn disable_fault_interrupt(&mut self) {
        regs::FECTL.write(self.mmio, regs::event_control::IM);
        self.fault_mailbox = None;
    }

    /// Whether fault events interrupt (and are not storm-masked right now).
    pub fn fault_interrupt_enabled(&self) -> bool {
        self.fault_mailbox.is_some_and(|m| !m.storm_masked())
    }

    /// Drains the fault-recording registers once (bounded: CAP.NFR + 1
    /// reads), together with what the fault interrupt handler queued, logs
    /// them (rate-limited), attributes each fault to the domain its RID (or
    /// RID + PASID) is attached to, and queues it there for the domain's
    /// owner. A storm-masked fault interrupt is unmasked once its window
    /// has passed.
    pub fn drain_faults(&mut self) -> FaultDrain {
        let raw = match self.fault_mailbox {
            None => fault::drain_records(
                self.mmio,
                &self.caps,
                self.config.index,
                self.config.fault_log_limit,
            ),
            Some(mailbox) => self.drain_with_mailbox(mailbox),
        };
        let mut out = FaultDrain {
            faults: Vec::with_capacity(raw.records.len()),
            overflowed: raw.overflowed,
            suppressed_logs: raw.suppressed_logs,
        };
        let capacity = self.config.domain_fault_queue;
        for mut record in raw.records {
            // A record may name RID_PASID for a request without PASID
            // (QEMU's unit does): it is a fault of the RID, and is reported
            // as one (the log above still shows the record as read).
            if record.pasid == Some(RID_PASID) {
                record.pasid = None;
            }
            let sid = record.source.requester_id();
            let did = self.devices.get(&sid).and_then(|dev| match record.pasid {
                Some(p) if self.mode == TranslationMode::Scalable => dev.pasids.get(&p).copied(),
                _ => dev.rid_domain,
            });
            if let Some(d) = did.and_then(|d| self.domains.get_mut(&d)) {
                if d.faults.len() < capacity {
                    d.faults.push_back(record);
                } else {
                    d.faults_dropped += 1;
                }
            }
            out.faults.push(AttributedFault {
                record,
                domain: did.map(DomainId),
            });
        }
        out
    }
}
