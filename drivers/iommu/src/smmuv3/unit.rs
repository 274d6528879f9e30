//! One SMMUv3 under Sluice's control: bring-up with every stream aborting,
//! stage-1 and stage-2 domains over the IO page-table engine, stream and
//! substream attachment, mapping with exactly the TLB invalidation each
//! change needs, event draining with per-domain fault queues, and global
//! error handling.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use sluice_hal::{Clock, DeviceAccess, DmaMemory, Mmio, PAGE_SIZE, PhysAddr};

use super::caps::{SmmuCapabilities, oas_encoding_for};
use super::commands::{Command, TlbiRange};
use super::error::{SmmuError, Stage};
use super::events::SmmuFault;
use super::queue::{CommandQueue, EventQueue, Hw, Ring};
use super::regs::{self, cr0, cr1, cr2, gbpa, gerror, queue, strtab};
use super::structs::{
    Cd, CdParams, CdTableFormat, DefaultSubstream, ENTRIES_PER_PAGE, L1_ENTRIES_PER_PAGE, L1Cd,
    L1Std, PAGE_INDEX_BITS, Ste, SteStage1, SteStage2, WalkAttrs, mair,
};
use crate::pagetable::arm::{ArmS1Attrs, ArmS2Attrs, ArmStage1, ArmStage2};
use crate::pagetable::{
    Invalidation, IoPageTable, IovaRange, MapPerms, PageSize, PendingFree, Shareability,
    TableConfig,
};

/// How to lay out the stream table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTableRequest {
    /// 2-level when the SMMU has it (IDR0.ST_LEVEL) and more than 64
    /// StreamIDs exist, linear otherwise.
    Auto,
    Linear,
    /// 2-level, or an error without IDR0.ST_LEVEL = 2-level.
    TwoLevel,
}

/// The stream table the unit runs with. Every table is one 4 KiB page: a
/// linear table holds 64 STEs; a 2-level table has one page of up to 512
/// level-1 descriptors, each (on demand) pointing to a page of 64 STEs
/// (STRTAB_BASE_CFG.SPLIT = 6), so StreamIDs below 2^15.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTableLayout {
    Linear { sid_bits: u32 },
    TwoLevel { sid_bits: u32 },
}

impl StreamTableLayout {
    pub const fn sid_bits(self) -> u32 {
        match self {
            Self::Linear { sid_bits } | Self::TwoLevel { sid_bits } => sid_bits,
        }
    }
}

/// How to bring an SMMU up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuConfig {
    /// For log lines (`smmu0`).
    pub index: u32,
    /// Register base, for log lines.
    pub base: u64,
    pub stream_table: StreamTableRequest,
    /// The IORT's COHACC override (IORT SMMUv3 node flags): firmware
    /// knows better than IDR0.COHACC whether the SMMU's table and queue
    /// accesses are coherent in this system.
    pub coherent_override: Option<bool>,
    /// Complete CMD_SYNC with an MSI write to memory (IDR0.MSI on a
    /// coherent SMMU) instead of polling CMDQ_CONS.
    pub msi_sync: bool,
    /// How long any wait on the SMMU may take.
    pub timeout_ns: u64,
    /// Events logged per drain; the rest are only counted.
    pub event_log_limit: usize,
    /// Faults each domain queues for its owner before dropping.
    pub domain_fault_queue: usize,
}

impl SmmuConfig {
    pub const fn new(index: u32, base: u64) -> Self {
        Self {
            index,
            base,
            stream_table: StreamTableRequest::Auto,
            coherent_override: None,
            msi_sync: true,
            timeout_ns: 100_000_000,
            event_log_limit: 8,
            domain_fault_queue: 64,
        }
    }

    /// The configuration for the IORT SMMUv3 node `node` (`smmuN` with N
    /// = `index`, its position among the IORT's SMMU nodes). The node's
    /// COHACC Override flag (IORT, ARM DEN 0049, SMMUv3 node "Flags" bit
    /// 0) is how firmware states whether the SMMU's table and queue
    /// accesses are coherent in this system; it is taken as the answer
    /// either way. Trusting a coherent IDR0.COHACC that firmware does not
    /// confirm could let the SMMU read stale tables; the other way round
    /// only costs cache maintenance.
    pub fn from_iort(index: u32, node: &crate::acpi::iort::SmmuV3) -> Self {
        use crate::acpi::iort::SmmuV3Flags;
        Self {
            coherent_override: Some(node.flags.contains(SmmuV3Flags::COHACC_OVERRIDE)),
            ..Self::new(index, node.base)
        }
    }
}

/// A domain on one SMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SmmuDomainId(pub u32);

/// Which stage a domain translates with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageRequest {
    Stage1,
    Stage2,
    /// Stage 1 when implemented, stage 2 otherwise.
    Any,
}

/// How a domain is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuDomainConfig {
    pub stage: StageRequest,
    /// Input (IOVA / IPA) width wanted; default 48 bits for stage 1, the
    /// output size (up to 48 bits) for stage 2.
    pub input_bits: Option<u32>,
}

impl SmmuDomainConfig {
    pub const fn stage1() -> Self {
        Self {
            stage: StageRequest::Stage1,
            input_bits: None,
        }
    }
    pub const fn stage2() -> Self {
        Self {
            stage: StageRequest::Stage2,
            input_bits: None,
        }
    }
    pub const fn any() -> Self {
        Self {
            stage: StageRequest::Any,
            input_bits: None,
        }
    }
    pub const fn with_input_bits(self, bits: u32) -> Self {
        Self {
            input_bits: Some(bits),
            ..self
        }
    }
}

/// What a domain looks like to its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuDomainInfo {
    pub stage: Stage,
    /// The ASID (stage 1) or VMID (stage 2) tagging its TLB entries.
    pub tag: u16,
    /// IOVAs at or above `1 << input_bits` cannot be mapped.
    pub input_bits: u32,
    pub output_bits: u32,
    pub levels: u8,
    /// Bitmap of page sizes the domain may use (bit n: 2^n bytes).
    pub page_sizes: u64,
    /// Table pages the domain uses now, for memory accounting.
    pub table_pages: usize,
}

/// What a domain would be, before it is made
/// ([`SmmuUnit::domain_shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuDomainShape {
    pub stage: Stage,
    pub input_bits: u32,
    pub output_bits: u32,
    /// Bitmap of page sizes (bit n: 2^n bytes).
    pub page_sizes: u64,
}

/// Leaf sizes of every domain: 4 KiB, 2 MiB, 1 GiB.
const DOMAIN_PAGE_SIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);

/// A fault with the domain it was attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributedFault {
    pub fault: SmmuFault,
    /// The domain the faulting stream (or substream) is attached to.
    pub domain: Option<SmmuDomainId>,
}

/// The outcome of [`SmmuUnit::drain_events`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventDrain {
    pub faults: Vec<AttributedFault>,
    /// Records were lost (EVENTQ_PROD.OVFLG).
    pub overflowed: bool,
    /// Records drained but not logged (rate limit).
    pub suppressed_logs: usize,
}

/// More single-page TLBIs than this in one change (without range
/// invalidation), or more range TLBIs, become one ASID / VMID invalidation.
const MAX_TLBI_PER_CHANGE: usize = 32;
/// StreamID bits a 2-level table covers with one page of L1 descriptors.
const MAX_TWO_LEVEL_SID_BITS: u32 = PAGE_INDEX_BITS + 9;

enum DomainTable<'a> {
    S1(IoPageTable<'a, ArmStage1, dyn DmaMemory + 'a>),
    S2(IoPageTable<'a, ArmStage2, dyn DmaMemory + 'a>),
}

impl DomainTable<'_> {
    fn table_pages(&self) -> usize {
        match self {
            Self::S1(t) => t.table_pages(),
            Self::S2(t) => t.table_pages(),
        }
    }
    fn max_page_size(&self) -> u64 {
        match self {
            Self::S1(t) => t.max_page_size(),
            Self::S2(t) => t.max_page_size(),
        }
    }
}

struct Domain<'a> {
    table: DomainTable<'a>,
    stage: Stage,
    tag: u16,
    input_bits: u32,
    output_bits: u32,
    levels: u8,
    /// Stage 1: the CD every stream or substream attached uses.
    cd: Option<Cd>,
    /// Stage 2: the translation half of the STE.
    s2: Option<SteStage2>,
    streams: BTreeSet<u32>,
    substreams: BTreeSet<(u32, u32)>,
    faults: VecDeque<SmmuFault>,
    faults_dropped: u64,
}

/// A stream's CD table: one page of CDs, or one page of L1CDs with leaf
/// pages of 64 CDs allocated on demand.
struct CdTable {
    root: PhysAddr,
    two_level: bool,
    leaves: BTreeMap<u32, PhysAddr>,
}

#[derive(Default)]
struct Stream {
    rid_domain: Option<u32>,
    substreams: BTreeMap<u32, u32>,
    cd_table: Option<CdTable>,
    /// The STE as last written.
    ste: Option<Ste>,
}

impl Stream {
    fn is_attached(&self) -> bool {
        self.rid_domain.is_some() || !self.substreams.is_empty()
    }
}

/// What a mapping's target is, for its memory attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryKind {
    /// RAM: Normal, write-back cacheable, inner shareable.
    #[default]
    Normal,
    /// Device registers: Device-nGnRE (stage-1 MAIR index
    /// [`mair::INDEX_DEVICE`]).
    Device,
}

/// One SMMUv3 under Sluice's control.
pub struct SmmuUnit<'a> {
    mmio: &'a dyn Mmio,
    mem: &'a dyn DmaMemory,
    clock: &'a dyn Clock,
    caps: SmmuCapabilities,
    config: SmmuConfig,
    /// Whether the SMMU's accesses to tables and queues snoop CPU caches
    /// (IDR0.COHACC, or the firmware's override).
    coherent: bool,
    layout: StreamTableLayout,
    strtab: PhysAddr,
    /// Level-2 stream tables by level-1 index.
    l2_tables: BTreeMap<u32, PhysAddr>,
    cmdq: CommandQueue,
    evtq: EventQueue,
    /// CD table layout: SubstreamID bits covered (0: one CD).
    cd_bits: u32,
    domains: BTreeMap<u32, Domain<'a>>,
    next_domain: u32,
    streams: BTreeMap<u32, Stream>,
    asids: BTreeSet<u16>,
    vmids: BTreeSet<u16>,
    /// Table pages whose invalidation failed: kept (never reused) until a
    /// global invalidation succeeds.
    quarantine: Vec<PendingFree>,
    /// Structure pages (level-2 stream tables) likewise held back.
    quarantined_structures: Vec<PhysAddr>,
    /// Pages allocated at bring-up (stream table, queues, MSI target).
    base_pages: Vec<PhysAddr>,
}

impl<'a> SmmuUnit<'a> {
    // ---- bring-up -------------------------------------------------------------

    /// Takes control of the SMMU (3.21.1 "Initialization"): incoming
    /// traffic is aborted first (GBPA.ABORT), the SMMU is disabled, a
    /// stream table in which every STE aborts and both queues are set up,
    /// every cache is invalidated, and translation is enabled. From the
    /// first register write on, no transaction reaches memory untranslated.
    pub fn init(
        mmio: &'a dyn Mmio,
        mem: &'a dyn DmaMemory,
        clock: &'a dyn Clock,
        config: SmmuConfig,
    ) -> Result<Self, SmmuError> {
        let caps = SmmuCapabilities::read(mmio);
        log::info!(
            "smmu{} @{:#x}: {}",
            config.index,
            config.base,
            caps.summary()
        );
        Self::check_capabilities(&caps)?;
        let layout = match config.stream_table {
            StreamTableRequest::TwoLevel if !caps.two_level_stream_table => {
                return Err(SmmuError::Unsupported(
                    "2-level stream tables (IDR0.ST_LEVEL)",
                ));
            }
            StreamTableRequest::TwoLevel => StreamTableLayout::TwoLevel {
                sid_bits: u32::from(caps.sid_bits).min(MAX_TWO_LEVEL_SID_BITS),
            },
            StreamTableRequest::Auto
                if caps.two_level_stream_table && u32::from(caps.sid_bits) > PAGE_INDEX_BITS =>
            {
                StreamTableLayout::TwoLevel {
                    sid_bits: u32::from(caps.sid_bits).min(MAX_TWO_LEVEL_SID_BITS),
                }
            }
            StreamTableRequest::Auto | StreamTableRequest::Linear => StreamTableLayout::Linear {
                sid_bits: u32::from(caps.sid_bits).min(PAGE_INDEX_BITS),
            },
        };
        if layout.sid_bits() < u32::from(caps.sid_bits) {
            log::warn!(
                "smmu{}: the stream table covers StreamIDs below {:#x} of {:#x}; others abort",
                config.index,
                1u64 << layout.sid_bits(),
                1u64 << caps.sid_bits
            );
        }
        let ssid_bits = u32::from(caps.ssid_bits);
        let cd_bits = if caps.cd2l {
            ssid_bits.min(PAGE_INDEX_BITS + 9)
        } else {
            ssid_bits.min(PAGE_INDEX_BITS)
        };
        let coherent = config.coherent_override.unwrap_or(caps.coherent);
        if coherent != caps.coherent {
            log::warn!(
                "smmu{}: firmware overrides IDR0.COHACC = {}: table walks are {}",
                config.index,
                u8::from(caps.coherent),
                if coherent { "coherent" } else { "non-coherent" }
            );
        }
        let mut unit = Self {
            mmio,
            mem,
            clock,
            caps,
            config,
            coherent,
            layout,
            strtab: PhysAddr::new(0),
            l2_tables: BTreeMap::new(),
            cmdq: CommandQueue {
                base: PhysAddr::new(0),
                ring: Ring {
                    log2: CommandQueue::PAGE_LOG2.min(u32::from(caps.cmdq_log2)),
                },
                prod: 0,
                msi: None,
            },
            evtq: EventQueue {
                base: PhysAddr::new(0),
                ring: Ring {
                    log2: EventQueue::PAGE_LOG2.min(u32::from(caps.eventq_log2)),
                },
                cons: 0,
            },
            cd_bits,
            domains: BTreeMap::new(),
            next_domain: 1,
            streams: BTreeMap::new(),
            asids: BTreeSet::new(),
            vmids: BTreeSet::new(),
            quarantine: Vec::new(),
            quarantined_structures: Vec::new(),
            base_pages: Vec::new(),
        };
        if let Err(e) = unit.take_over() {
            log::error!(
                "smmu{}: bring-up failed ({e}); incoming traffic stays aborted",
                config.index
            );
            unit.release_base_pages();
            return Err(e);
        }
        Ok(unit)
    }

    fn check_capabilities(caps: &SmmuCapabilities) -> Result<(), SmmuError> {
        if !caps.stage1 && !caps.stage2 {
            return Err(SmmuError::Unsupported(
                "any translation stage (IDR0.S1P/S2P)",
            ));
        }
        if !caps.aarch64_tables {
            return Err(SmmuError::Unsupported("VMSAv8-64 tables (IDR0.TTF)"));
        }
        if !caps.granule_4k {
            return Err(SmmuError::Unsupported("the 4 KiB granule (IDR5.GRAN4K)"));
        }
        if !caps.little_endian_tables() {
            return Err(SmmuError::Unsupported(
                "little-endian tables (IDR0.TTENDIAN)",
            ));
        }
        if caps.stall_model == 0b10 {
            return Err(SmmuError::Unsupported(
                "terminating faults (IDR0.STALL_MODEL forces stalls)",
            ));
        }
        if caps.relative_base || caps.queues_preset || caps.tables_preset {
            return Err(SmmuError::Unsupported(
                "software-placed tables and queues (IDR1 REL/PRESET)",
            ));
        }
        if caps.cmdq_log2 == 0 || caps.eventq_log2 == 0 {
            return Err(SmmuError::Unsupported("command and event queues"));
        }
        Ok(())
    }

    fn hw(&self) -> Hw<'a> {
        Hw {
            access: DeviceAccess {
                mmio: self.mmio,
                mem: self.mem,
                clock: self.clock,
                timeout_ns: self.config.timeout_ns,
                coherent: self.coherent,
            },
            index: self.config.index,
        }
    }

    fn take_over(&mut self) -> Result<(), SmmuError> {
        let hw = self.hw();
        // 1. Abort whatever arrives while the SMMU is disabled, before
        // disabling it (6.3.14: fields change only through UPDATE).
        self.update_gbpa(gbpa::ABORT | gbpa::SHCFG_INCOMING)?;
        // 2. Disable translation and both queues (firmware may have left
        // them on): from now on GBPA aborts everything.
        self.write_cr0(0, "SMMU disable")?;
        // 3. No interrupts: Sluice polls.
        regs::IRQ_CTRL.write(self.mmio, 0);
        hw.wait("interrupt disable (IRQ_CTRLACK)", || {
            regs::IRQ_CTRLACK.read(self.mmio) == 0
        })?;
        // 4. Errors left by firmware.
        let stale = regs::GERROR.read(self.mmio) ^ regs::GERRORN.read(self.mmio);
        if stale != 0 {
            log::warn!(
                "smmu{}: acknowledging global errors left by firmware ({stale:#x})",
                self.config.index
            );
            regs::GERRORN.write(self.mmio, regs::GERROR.read(self.mmio));
        }
        // 5. Memory attributes of the SMMU's own table and queue accesses
        // (6.3.11): cacheable only where its accesses snoop.
        let cr1_value = if self.coherent {
            cr1::uniform(cr1::WRITE_BACK, cr1::INNER_SHAREABLE)
        } else {
            cr1::uniform(cr1::NON_CACHEABLE, cr1::OUTER_SHAREABLE)
        };
        regs::CR1.write(self.mmio, cr1_value);
        // Record out-of-range StreamIDs; ignore broadcast TLB maintenance
        // (our ASIDs and VMIDs are private to the SMMU).
        regs::CR2.write(self.mmio, cr2::RECINVSID | cr2::PTM);
        // 6. The stream table: every StreamID aborts.
        self.build_stream_table()?;
        // 7. Queues.
        let cmdq = self.alloc_structure_page()?;
        self.base_pages.push(cmdq);
        self.cmdq.base = cmdq;
        let hint = if self.coherent {
            queue::ALLOCATE_HINT
        } else {
            0
        };
        regs::CMDQ_BASE.write(
            self.mmio,
            hint | (cmdq.as_u64() & queue::ADDR_MASK) | u64::from(self.cmdq.ring.log2),
        );
        regs::CMDQ_PROD.write(self.mmio, 0);
        regs::CMDQ_CONS.write(self.mmio, 0);
        let evtq = self.alloc_structure_page()?;
        self.base_pages.push(evtq);
        self.evtq.base = evtq;
        regs::EVENTQ_BASE.write(
            self.mmio,
            hint | (evtq.as_u64() & queue::ADDR_MASK) | u64::from(self.evtq.ring.log2),
        );
        regs::EVENTQ_PROD.write(self.mmio, 0);
        regs::EVENTQ_CONS.write(self.mmio, 0);
        if self.config.msi_sync && self.caps.msi && self.coherent {
            let page = self.alloc_structure_page()?;
            self.base_pages.push(page);
            self.cmdq.msi = Some((page, 0));
        }
        // 8. Command queue on; nothing cached may survive (3.21.1).
        self.write_cr0(cr0::CMDQEN, "command queue enable")?;
        let mut all = alloc::vec![Command::cfgi_all()];
        if self.caps.hyp {
            all.push(Command::tlbi_el2_all());
        }
        all.push(Command::tlbi_nsnh_all());
        self.submit(&all)?;
        // 9. Event queue, then translation.
        self.write_cr0(cr0::CMDQEN | cr0::EVENTQEN, "event queue enable")?;
        self.write_cr0(cr0::CMDQEN | cr0::EVENTQEN | cr0::SMMUEN, "SMMU enable")?;
        log::info!(
            "smmu{}: translation enabled ({}, StreamIDs below {:#x}), every stream aborts",
            self.config.index,
            match self.layout {
                StreamTableLayout::Linear { .. } => "linear stream table",
                StreamTableLayout::TwoLevel { .. } => "2-level stream table",
            },
            1u64 << self.layout.sid_bits()
        );
        Ok(())
    }

    /// GBPA update protocol (6.3.14): wait for any update in progress,
    /// write the new fields with UPDATE, wait for UPDATE to clear.
    fn update_gbpa(&self, value: u32) -> Result<(), SmmuError> {
        let hw = self.hw();
        hw.wait("a previous GBPA update", || {
            regs::GBPA.read(self.mmio) & gbpa::UPDATE == 0
        })?;
        regs::GBPA.write(self.mmio, value | gbpa::UPDATE);
        hw.wait("GBPA update", || {
            regs::GBPA.read(self.mmio) & gbpa::UPDATE == 0
        })
    }

    /// Writes CR0 and waits for CR0ACK to match (6.3.9-10).
    fn write_cr0(&self, value: u32, what: &'static str) -> Result<(), SmmuError> {
        regs::CR0.write(self.mmio, value);
        self.hw()
            .wait(what, || regs::CR0ACK.read(self.mmio) == value)
    }

    fn build_stream_table(&mut self) -> Result<(), SmmuError> {
        let page = self.alloc_structure_page()?;
        self.base_pages.push(page);
        self.strtab = page;
        let cfg = match self.layout {
            StreamTableLayout::Linear { sid_bits } => {
                self.fill_abort(page, 1 << sid_bits);
                sid_bits | (strtab::FMT_LINEAR << strtab::FMT_SHIFT)
            }
            StreamTableLayout::TwoLevel { sid_bits } => {
                // Every L1STD absent (Span 0): C_BAD_STREAMID until a
                // level-2 table is installed. The zeroed page is that.
                sid_bits
                    | (PAGE_INDEX_BITS << strtab::SPLIT_SHIFT)
                    | (strtab::FMT_2LEVEL << strtab::FMT_SHIFT)
            }
        };
        let hint = if self.coherent { strtab::RA } else { 0 };
        regs::STRTAB_BASE.write(self.mmio, hint | (page.as_u64() & strtab::ADDR_MASK));
        regs::STRTAB_BASE_CFG.write(self.mmio, cfg);
        Ok(())
    }

    /// Writes `count` aborting STEs at `table`.
    fn fill_abort(&self, table: PhysAddr, count: u64) {
        let words = Ste::abort().words();
        for i in 0..count {
            for (w, &value) in words.iter().enumerate() {
                self.mem
                    .write_u64(PhysAddr::new(table.as_u64() + i * 64 + 8 * w as u64), value);
            }
        }
        self.hw().flush(table, count * 64);
    }

    fn release_base_pages(&mut self) {
        for page in self.base_pages.drain(..) {
            self.mem.free_page(page);
        }
    }

    // ---- accessors --------------------------------------------------------------

    pub fn capabilities(&self) -> &SmmuCapabilities {
        &self.caps
    }

    /// Whether table and queue writes need no cleaning for the SMMU.
    pub fn coherent(&self) -> bool {
        self.coherent
    }

    pub fn stream_table_layout(&self) -> StreamTableLayout {
        self.layout
    }

    /// The stream table (linear table or level-1 table).
    pub fn stream_table(&self) -> PhysAddr {
        self.strtab
    }

    /// StreamIDs at or above this cannot be attached.
    pub fn stream_limit(&self) -> u64 {
        1 << self.layout.sid_bits()
    }

    /// SubstreamIDs at or above this cannot be attached (0: no
    /// substreams).
    pub fn substream_limit(&self) -> u32 {
        if self.caps.ssid_bits == 0 {
            0
        } else {
            1 << self.cd_bits
        }
    }

    /// The level-2 stream table holding `sid`'s STE, if allocated.
    pub fn level2_table(&self, sid: u32) -> Option<PhysAddr> {
        self.l2_tables.get(&(sid >> PAGE_INDEX_BITS)).copied()
    }

    /// Pages allocated by bring-up (stream table, queues, MSI target).
    pub fn base_pages(&self) -> usize {
        self.base_pages.len()
    }

    /// Pages the unit's own structures hold now: what bring-up allocated,
    /// level-2 stream tables, and CD tables (roots and leaves). Domain
    /// tables are counted per domain ([`SmmuDomainInfo::table_pages`]),
    /// pages held back after failed invalidations by
    /// [`quarantined_pages`](Self::quarantined_pages).
    pub fn structure_pages(&self) -> usize {
        let cd_pages: usize = self
            .streams
            .values()
            .filter_map(|s| s.cd_table.as_ref())
            .map(|t| 1 + t.leaves.len())
            .sum();
        self.base_pages.len() + self.l2_tables.len() + cd_pages
    }

    pub fn command_queue(&self) -> PhysAddr {
        self.cmdq.base
    }

    pub fn event_queue(&self) -> PhysAddr {
        self.evtq.base
    }

    /// Whether CMD_SYNC completion is signalled by an MSI write.
    pub fn uses_msi_sync(&self) -> bool {
        self.cmdq.msi.is_some()
    }

    /// Pages held back because their invalidation failed.
    pub fn quarantined_pages(&self) -> usize {
        self.quarantine
            .iter()
            .map(|p| p.pages().len())
            .sum::<usize>()
            + self.quarantined_structures.len()
    }

    /// The STE of `sid` as it is in memory.
    pub fn read_ste(&self, sid: u32) -> Option<Ste> {
        let addr = self.ste_addr(sid)?;
        let mut w = [0u64; 8];
        for (i, word) in w.iter_mut().enumerate() {
            *word = self
                .mem
                .read_u64(PhysAddr::new(addr.as_u64() + 8 * i as u64));
        }
        Some(Ste::from_words(w))
    }

    /// The CD `sid` uses for `ssid` (0: its own traffic), as it is in
    /// memory.
    pub fn read_cd(&self, sid: u32, ssid: u32) -> Option<Cd> {
        let table = self.streams.get(&sid)?.cd_table.as_ref()?;
        let addr = Self::cd_addr_in(table, ssid)?;
        let mut w = [0u64; 8];
        for (i, word) in w.iter_mut().enumerate() {
            *word = self
                .mem
                .read_u64(PhysAddr::new(addr.as_u64() + 8 * i as u64));
        }
        Some(Cd::from_words(w))
    }

    // ---- memory helpers ---------------------------------------------------------

    fn alloc_structure_page(&self) -> Result<PhysAddr, SmmuError> {
        let page = self.mem.alloc_page().map_err(|_| SmmuError::OutOfMemory)?;
        self.hw().flush(page, PAGE_SIZE);
        Ok(page)
    }

    fn write_words(&self, addr: PhysAddr, words: &[u64]) {
        for (i, &w) in words.iter().enumerate() {
            self.mem
                .write_u64(PhysAddr::new(addr.as_u64() + 8 * i as u64), w);
        }
        self.hw().flush(addr, 8 * words.len() as u64);
    }

    /// Writes a structure whose valid bit is in word 0 (STE, CD): every
    /// other word first, made visible, then word 0 (3.21.3).
    fn publish(&self, addr: PhysAddr, words: &[u64; 8]) {
        self.write_words(PhysAddr::new(addr.as_u64() + 8), &words[1..]);
        self.write_words(addr, &words[..1]);
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), SmmuError> {
        let hw = self.hw();
        self.cmdq.submit(&hw, cmds)
    }

    /// Queues raw commands and a CMD_SYNC and waits for them (e.g. for
    /// invalidations other code needs). A refused command is reported
    /// after the queue has been repaired and the rest completed.
    pub fn submit_commands(&mut self, cmds: &[Command]) -> Result<(), SmmuError> {
        self.submit(cmds)
    }

    /// Invalidates every configuration and TLB entry and, once that
    /// succeeded, frees table pages whose earlier invalidation failed.
    pub fn flush_all(&mut self) -> Result<(), SmmuError> {
        let mut all = alloc::vec![Command::cfgi_all()];
        if self.caps.hyp {
            all.push(Command::tlbi_el2_all());
        }
        all.push(Command::tlbi_nsnh_all());
        self.submit(&all)?;
        for pending in self.quarantine.drain(..) {
            pending.release(self.mem);
        }
        for page in self.quarantined_structures.drain(..) {
            self.mem.free_page(page);
        }
        Ok(())
    }

    // ---- stream table ------------------------------------------------------------

    fn check_sid(&self, sid: u32) -> Result<(), SmmuError> {
        let limit = self.stream_limit();
        if u64::from(sid) >= limit {
            return Err(SmmuError::StreamOutOfRange { sid, limit });
        }
        Ok(())
    }

    fn ste_addr(&self, sid: u32) -> Option<PhysAddr> {
        if u64::from(sid) >= self.stream_limit() {
            return None;
        }
        let (table, index) = match self.layout {
            StreamTableLayout::Linear { .. } => (self.strtab, u64::from(sid)),
            StreamTableLayout::TwoLevel { .. } => (
                *self.l2_tables.get(&(sid >> PAGE_INDEX_BITS))?,
                u64::from(sid) & (ENTRIES_PER_PAGE - 1),
            ),
        };
        Some(PhysAddr::new(table.as_u64() + index * 64))
    }

    /// Makes sure `sid`'s STE exists: in a 2-level table its level-2 page
    /// is allocated (all STEs aborting), linked, and the cached L1STD
    /// invalidated (5.1: a Span change needs a non-leaf CMD_CFGI_STE).
    fn ensure_ste(&mut self, sid: u32) -> Result<PhysAddr, SmmuError> {
        self.check_sid(sid)?;
        if let StreamTableLayout::TwoLevel { .. } = self.layout {
            let l1 = sid >> PAGE_INDEX_BITS;
            if !self.l2_tables.contains_key(&l1) {
                let page = self.alloc_structure_page()?;
                self.fill_abort(page, ENTRIES_PER_PAGE);
                let desc = L1Std::new(page, PAGE_INDEX_BITS);
                self.write_words(
                    PhysAddr::new(self.strtab.as_u64() + u64::from(l1) * 8),
                    &[desc.raw()],
                );
                self.l2_tables.insert(l1, page);
                // On failure the table stays linked (all STEs abort); the
                // next attach retries the invalidation.
                self.submit(&[Command::cfgi_ste(sid, false)])?;
            }
        }
        self.ste_addr(sid).ok_or(SmmuError::StreamOutOfRange {
            sid,
            limit: self.stream_limit(),
        })
    }

    /// Frees `sid`'s level-2 table once no StreamID it covers is
    /// attached: the L1STD goes absent, the range is invalidated, then
    /// the page is freed.
    fn maybe_free_l2(&mut self, sid: u32) -> Result<(), SmmuError> {
        if !matches!(self.layout, StreamTableLayout::TwoLevel { .. }) {
            return Ok(());
        }
        let l1 = sid >> PAGE_INDEX_BITS;
        let first = l1 << PAGE_INDEX_BITS;
        let last = first + (ENTRIES_PER_PAGE as u32 - 1);
        if self
            .streams
            .range(first..=last)
            .any(|(_, s)| s.is_attached() || s.cd_table.is_some())
        {
            return Ok(());
        }
        let Some(page) = self.l2_tables.remove(&l1) else {
            return Ok(());
        };
        self.write_words(
            PhysAddr::new(self.strtab.as_u64() + u64::from(l1) * 8),
            &[L1Std::absent().raw()],
        );
        let range = Command::cfgi_ste_range(first, (PAGE_INDEX_BITS - 1) as u8);
        let result = self.submit(&[range]);
        let stale: Vec<u32> = self.streams.range(first..=last).map(|(&s, _)| s).collect();
        for s in stale {
            self.streams.remove(&s);
        }
        match result {
            Ok(()) => {
                self.mem.free_page(page);
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "smmu{}: invalidating level-2 stream table {page} failed ({e}); keeping it",
                    self.config.index
                );
                self.quarantined_structures.push(page);
                Err(e)
            }
        }
    }

    /// Installs `new` as `sid`'s STE without any transaction ever seeing a
    /// mix of old and new (3.21.3): from an aborting or invalid STE, the
    /// other words go first and word 0 (V, Config) last; a change that
    /// only touches word 1 (S1DSS) is one atomic write; anything else goes
    /// through an aborting STE. Each step is followed by CMD_CFGI_STE and
    /// CMD_SYNC.
    fn install_ste(&mut self, sid: u32, new: Ste) -> Result<(), SmmuError> {
        let addr = self.ensure_ste(sid)?;
        let old = self
            .streams
            .get(&sid)
            .and_then(|s| s.ste)
            .unwrap_or_else(Ste::abort);
        if old == new {
            return Ok(());
        }
        let cfgi = [Command::cfgi_ste(sid, true)];
        let old_w = old.words();
        let new_w = new.words();
        let translating = |s: &Ste| s.valid() && s.config() != super::structs::SteConfig::Abort;
        if !translating(&old) {
            self.publish(addr, &new_w);
        } else if !translating(&new) {
            self.write_words(addr, &new_w[..1]);
            self.set_ste(sid, new);
            self.submit(&cfgi)?;
            // Fields the SMMU now ignores; cleared so the next install
            // starts from a clean entry.
            self.write_words(PhysAddr::new(addr.as_u64() + 8), &new_w[1..]);
            return Ok(());
        } else if old_w[0] == new_w[0] && old_w[2..] == new_w[2..] {
            self.write_words(PhysAddr::new(addr.as_u64() + 8), &new_w[1..2]);
        } else {
            self.install_ste(sid, Ste::abort())?;
            self.publish(addr, &new_w);
        }
        self.set_ste(sid, new);
        self.submit(&cfgi)
    }

    fn set_ste(&mut self, sid: u32, ste: Ste) {
        self.streams.entry(sid).or_default().ste = Some(ste);
    }

    // ---- CD tables --------------------------------------------------------------

    fn cd_addr_in(table: &CdTable, index: u32) -> Option<PhysAddr> {
        if table.two_level {
            let leaf = table.leaves.get(&(index >> PAGE_INDEX_BITS))?;
            Some(PhysAddr::new(
                leaf.as_u64() + u64::from(index & (ENTRIES_PER_PAGE as u32 - 1)) * 64,
            ))
        } else {
            Some(PhysAddr::new(table.root.as_u64() + u64::from(index) * 64))
        }
    }

    /// The CD slot for (`sid`, `index`), creating the stream's CD table
    /// and (2-level) the leaf page as needed. Returns the slot and whether
    /// an L1CD was written.
    fn cd_slot(&mut self, sid: u32, index: u32) -> Result<(PhysAddr, bool), SmmuError> {
        if self.streams.get(&sid).is_none_or(|s| s.cd_table.is_none()) {
            let root = self.alloc_structure_page()?;
            self.streams.entry(sid).or_default().cd_table = Some(CdTable {
                root,
                two_level: self.cd_bits > PAGE_INDEX_BITS,
                leaves: BTreeMap::new(),
            });
        }
        let (two_level, root, has_leaf) = {
            let t = self
                .streams
                .get(&sid)
                .and_then(|s| s.cd_table.as_ref())
                .ok_or(SmmuError::NotAttached)?;
            (
                t.two_level,
                t.root,
                t.leaves.contains_key(&(index >> PAGE_INDEX_BITS)),
            )
        };
        let mut l1_written = false;
        if two_level && !has_leaf {
            let l1_index = index >> PAGE_INDEX_BITS;
            if u64::from(l1_index) >= L1_ENTRIES_PER_PAGE {
                return Err(SmmuError::SubstreamOutOfRange {
                    ssid: index,
                    limit: self.substream_limit(),
                });
            }
            let leaf = self.alloc_structure_page()?;
            self.write_words(
                PhysAddr::new(root.as_u64() + u64::from(l1_index) * 8),
                &[L1Cd::new(leaf).raw()],
            );
            if let Some(t) = self.streams.get_mut(&sid).and_then(|s| s.cd_table.as_mut()) {
                t.leaves.insert(l1_index, leaf);
            }
            l1_written = true;
        }
        let table = self
            .streams
            .get(&sid)
            .and_then(|s| s.cd_table.as_ref())
            .ok_or(SmmuError::NotAttached)?;
        let slot = Self::cd_addr_in(table, index).ok_or(SmmuError::NotAttached)?;
        Ok((slot, l1_written))
    }

    /// Writes the CD of (`sid`, `index`) and invalidates any cached copy
    /// (and the L1CD when one was added).
    fn write_cd(&mut self, sid: u32, index: u32, cd: Cd) -> Result<(), SmmuError> {
        let (slot, l1_written) = self.cd_slot(sid, index)?;
        let current = {
            let mut w = [0u64; 8];
            for (i, word) in w.iter_mut().enumerate() {
                *word = self
                    .mem
                    .read_u64(PhysAddr::new(slot.as_u64() + 8 * i as u64));
            }
            Cd::from_words(w)
        };
        let mut cmds = Vec::new();
        if l1_written {
            cmds.push(Command::cfgi_cd(sid, index, false));
        }
        if current.valid() && current != cd {
            // Valid → different valid: through invalid (never torn).
            self.write_words(slot, &[0]);
            self.submit(&[Command::cfgi_cd(sid, index, true)])?;
        }
        self.publish(slot, &cd.words());
        cmds.push(Command::cfgi_cd(sid, index, true));
        if self.stream_uses_cd_table(sid) {
            self.submit(&cmds)?;
        }
        Ok(())
    }

    fn clear_cd(&mut self, sid: u32, index: u32) -> Result<(), SmmuError> {
        let Some(slot) = self
            .streams
            .get(&sid)
            .and_then(|s| s.cd_table.as_ref())
            .and_then(|t| Self::cd_addr_in(t, index))
        else {
            return Ok(());
        };
        self.write_words(slot, &[0]);
        let result = if self.stream_uses_cd_table(sid) {
            self.submit(&[Command::cfgi_cd(sid, index, true)])
        } else {
            Ok(())
        };
        self.write_words(PhysAddr::new(slot.as_u64() + 8), &[0; 7]);
        result
    }

    fn stream_uses_cd_table(&self, sid: u32) -> bool {
        self.streams
            .get(&sid)
            .and_then(|s| s.ste)
            .is_some_and(|ste| ste.config().stage1())
    }

    fn free_cd_table(&mut self, sid: u32) {
        if let Some(table) = self.streams.get_mut(&sid).and_then(|s| s.cd_table.take()) {
            for (_, leaf) in table.leaves {
                self.mem.free_page(leaf);
            }
            self.mem.free_page(table.root);
        }
    }

    /// The stage-1 STE for `sid` with its CD table.
    fn stage1_ste(&self, sid: u32) -> Option<Ste> {
        let stream = self.streams.get(&sid)?;
        let table = stream.cd_table.as_ref()?;
        let rid_stage1 = stream
            .rid_domain
            .and_then(|d| self.domains.get(&d))
            .is_some_and(|d| d.stage == Stage::Stage1);
        Some(Ste::stage1(SteStage1 {
            context_ptr: table.root,
            cd_max: self.cd_bits as u8,
            format: if table.two_level {
                CdTableFormat::TwoLevel4K
            } else {
                CdTableFormat::Linear
            },
            default_substream: if rid_stage1 {
                DefaultSubstream::Substream0
            } else {
                DefaultSubstream::Terminate
            },
            cd_attrs: WalkAttrs::for_coherency(self.coherent),
            // S1STALLD is only legal with a configurable stall model.
            stall_disable: self.caps.stall_model == 0b00,
        }))
    }

    // ---- domains ------------------------------------------------------------------

    /// The output size of every table: the OAS, at most 48 bits (no
    /// 52-bit formats).
    fn output_bits(&self) -> u32 {
        self.caps.oas_bits.min(48)
    }

    /// What a domain allocated with `config` would be (stage, address
    /// sizes, page sizes), without allocating anything: the same checks
    /// [`alloc_domain`](Self::alloc_domain) makes.
    pub fn domain_shape(&self, config: SmmuDomainConfig) -> Result<SmmuDomainShape, SmmuError> {
        let stage = match config.stage {
            StageRequest::Stage1 if !self.caps.stage1 => {
                return Err(SmmuError::StageUnsupported(Stage::Stage1));
            }
            StageRequest::Stage2 if !self.caps.stage2 => {
                return Err(SmmuError::StageUnsupported(Stage::Stage2));
            }
            StageRequest::Stage1 => Stage::Stage1,
            StageRequest::Stage2 => Stage::Stage2,
            StageRequest::Any if self.caps.stage1 => Stage::Stage1,
            StageRequest::Any => Stage::Stage2,
        };
        let output_bits = self.output_bits();
        let input_bits = match stage {
            Stage::Stage1 => {
                let bits = config.input_bits.unwrap_or(48).min(self.caps.va_bits);
                if !(31..=48).contains(&bits) {
                    return Err(SmmuError::InvalidConfig(
                        "stage-1 input size outside 31..=48 bits",
                    ));
                }
                bits
            }
            Stage::Stage2 => {
                // The IPA size cannot exceed the output size (IAS = OAS
                // for VMSAv8-64-only SMMUs, 3.4).
                let bits = config.input_bits.unwrap_or(output_bits);
                if !(31..=output_bits).contains(&bits) {
                    return Err(SmmuError::InvalidConfig(
                        "stage-2 input size outside 31 bits..OAS",
                    ));
                }
                bits
            }
        };
        Ok(SmmuDomainShape {
            stage,
            input_bits,
            output_bits,
            // 4 KiB granule: pages, 2 MiB and 1 GiB blocks (every table has
            // a level-1 at least, as inputs are 31 bits or more).
            page_sizes: DOMAIN_PAGE_SIZES,
        })
    }

    /// Allocates an empty domain translating with the stage `config`
    /// asks for, tagged with a fresh ASID (stage 1) or VMID (stage 2).
    pub fn alloc_domain(&mut self, config: SmmuDomainConfig) -> Result<SmmuDomainId, SmmuError> {
        let shape = self.domain_shape(config)?;
        let (stage, output_bits) = (shape.stage, shape.output_bits);
        let coherent = self.coherent;
        let table_config = TableConfig::new(PageSize::Size1G, coherent);
        let bbm2 = self.caps.bbml == 2;
        let walk_attrs = WalkAttrs::for_coherency(coherent);
        let domain = match stage {
            Stage::Stage1 => {
                let input_bits = shape.input_bits;
                // ASID 0 is left unused so a zeroed CD never aliases a domain.
                let asid = (1..self.caps.asid_count())
                    .map(|a| a as u16)
                    .find(|a| !self.asids.contains(a))
                    .ok_or(SmmuError::TagsExhausted(Stage::Stage1))?;
                let mut format = ArmStage1::new(input_bits, output_bits)?;
                if bbm2 {
                    format = format.with_bbm_level2();
                }
                let table = IoPageTable::new(self.mem, format, table_config)?;
                let cd = Cd::stage1(CdParams {
                    asid,
                    ttb0: table.root(),
                    t0sz: format.t0sz(),
                    ips: oas_encoding_for(output_bits) as u8,
                    walk_attrs,
                    mair: mair::VALUE,
                });
                self.asids.insert(asid);
                Domain {
                    levels: if input_bits > 39 { 4 } else { 3 },
                    table: DomainTable::S1(table),
                    stage,
                    tag: asid,
                    input_bits,
                    output_bits,
                    cd: Some(cd),
                    s2: None,
                    streams: BTreeSet::new(),
                    substreams: BTreeSet::new(),
                    faults: VecDeque::new(),
                    faults_dropped: 0,
                }
            }
            Stage::Stage2 => {
                let input_bits = shape.input_bits;
                // VMID 0 tags the stage-1-only STEs.
                let vmid = (1..self.caps.vmid_count())
                    .map(|v| v as u16)
                    .find(|v| !self.vmids.contains(v))
                    .ok_or(SmmuError::TagsExhausted(Stage::Stage2))?;
                let mut format = ArmStage2::new(input_bits, output_bits)?;
                if bbm2 {
                    format = format.with_bbm_level2();
                }
                let table = IoPageTable::new(self.mem, format, table_config)?;
                let s2 = SteStage2 {
                    vmid,
                    t0sz: format.t0sz(),
                    sl0: format.sl0(),
                    walk_attrs,
                    ps: oas_encoding_for(output_bits) as u8,
                    ttb: table.root(),
                    affd: false,
                    record_faults: true,
                };
                self.vmids.insert(vmid);
                Domain {
                    levels: format.sl0() + 2,
                    table: DomainTable::S2(table),
                    stage,
                    tag: vmid,
                    input_bits,
                    output_bits,
                    cd: None,
                    s2: Some(s2),
                    streams: BTreeSet::new(),
                    substreams: BTreeSet::new(),
                    faults: VecDeque::new(),
                    faults_dropped: 0,
                }
            }
        };
        let id = self.next_domain;
        self.next_domain = self.next_domain.wrapping_add(1).max(1);
        self.domains.insert(id, domain);
        Ok(SmmuDomainId(id))
    }

    fn domain(&self, id: SmmuDomainId) -> Result<&Domain<'a>, SmmuError> {
        self.domains.get(&id.0).ok_or(SmmuError::NoSuchDomain(id.0))
    }

    pub fn domain_info(&self, id: SmmuDomainId) -> Result<SmmuDomainInfo, SmmuError> {
        let d = self.domain(id)?;
        let max = d.table.max_page_size();
        let page_sizes = [1u64 << 12, 1 << 21, 1 << 30]
            .into_iter()
            .filter(|&s| s <= max)
            .fold(0, |acc, s| acc | s);
        Ok(SmmuDomainInfo {
            stage: d.stage,
            tag: d.tag,
            input_bits: d.input_bits,
            output_bits: d.output_bits,
            levels: d.levels,
            page_sizes,
            table_pages: d.table.table_pages(),
        })
    }

    /// Frees a domain nothing is attached to: its ASID / VMID is
    /// invalidated from the TLBs before the tag and the tables are reused.
    pub fn free_domain(&mut self, id: SmmuDomainId) -> Result<(), SmmuError> {
        let d = self.domain(id)?;
        if !d.streams.is_empty() || !d.substreams.is_empty() {
            return Err(SmmuError::DomainInUse(id.0));
        }
        let inv = match d.stage {
            Stage::Stage1 => Command::tlbi_nh_asid(0, d.tag),
            Stage::Stage2 => Command::tlbi_s12_vmall(d.tag),
        };
        let result = self.submit(&[inv]);
        let d = self
            .domains
            .remove(&id.0)
            .ok_or(SmmuError::NoSuchDomain(id.0))?;
        let pending = match d.table {
            DomainTable::S1(t) => t.destroy(),
            DomainTable::S2(t) => t.destroy(),
        };
        match result {
            Ok(()) => {
                match d.stage {
                    Stage::Stage1 => self.asids.remove(&d.tag),
                    Stage::Stage2 => self.vmids.remove(&d.tag),
                };
                pending.release(self.mem);
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "smmu{}: TLB invalidation of freed domain {} failed ({e}); its tables \
                     and tag stay out of use",
                    self.config.index,
                    id.0
                );
                self.quarantine.push(pending);
                Err(e)
            }
        }
    }

    /// What `iova` translates to in the domain's table (software view).
    pub fn translate(
        &self,
        id: SmmuDomainId,
        iova: u64,
    ) -> Result<Option<(PhysAddr, MapPerms)>, SmmuError> {
        let d = self.domain(id)?;
        Ok(match &d.table {
            DomainTable::S1(t) => t.translate(iova).map(|t| (t.phys, t.perms)),
            DomainTable::S2(t) => t.translate(iova).map(|t| (t.phys, t.perms)),
        })
    }

    /// Maps `[iova, iova + len)` to `[phys, phys + len)`. Arm TLBs never
    /// hold translation faults, so a map needs no invalidation; on a
    /// non-coherent SMMU the engine cleans every entry it writes.
    pub fn map(
        &mut self,
        id: SmmuDomainId,
        iova: u64,
        phys: PhysAddr,
        len: u64,
        perms: MapPerms,
    ) -> Result<(), SmmuError> {
        self.map_memory(id, iova, phys, len, perms, MemoryKind::Normal)
    }

    /// [`Self::map`] with the memory type of the target: RAM, or device
    /// registers (an MSI doorbell), which must not be reached with
    /// cacheable attributes.
    pub fn map_memory(
        &mut self,
        id: SmmuDomainId,
        iova: u64,
        phys: PhysAddr,
        len: u64,
        perms: MapPerms,
        memory: MemoryKind,
    ) -> Result<(), SmmuError> {
        let d = self
            .domains
            .get_mut(&id.0)
            .ok_or(SmmuError::NoSuchDomain(id.0))?;
        let inv = match &mut d.table {
            DomainTable::S1(t) => {
                let attrs = ArmS1Attrs {
                    attr_index: match memory {
                        MemoryKind::Normal => mair::INDEX_NORMAL,
                        MemoryKind::Device => mair::INDEX_DEVICE,
                    },
                    shareability: Shareability::InnerShareable,
                    // Device traffic is unprivileged (no PASID privilege).
                    user: true,
                    // Entries tagged by ASID: never shared between domains.
                    not_global: true,
                };
                t.map(iova, phys, len, perms, attrs)?
            }
            DomainTable::S2(t) => {
                let attrs = ArmS2Attrs {
                    // Stage-2 MemAttr (Arm ARM D8.5.5, FWB = 0): 0b1111
                    // Normal inner and outer write-back, 0b0001
                    // Device-nGnRE.
                    mem_attr: match memory {
                        MemoryKind::Normal => 0b1111,
                        MemoryKind::Device => 0b0001,
                    },
                    shareability: Shareability::InnerShareable,
                };
                t.map(iova, phys, len, perms, attrs)?
            }
        };
        inv.complete(self.mem);
        Ok(())
    }

    /// Unmaps every mapped page of `[iova, iova + len)`, invalidates the
    /// TLBs by VA (stage 1) or IPA (stage 2) for exactly what changed,
    /// waits for CMD_SYNC, and only then frees emptied tables. Superpage
    /// splits go through break-before-make unless IDR3.BBML = 2. Returns
    /// the bytes whose translation changed.
    pub fn unmap(&mut self, id: SmmuDomainId, iova: u64, len: u64) -> Result<u64, SmmuError> {
        let hw = self.hw();
        let range_inv = self.caps.range_invalidation;
        let Self { domains, cmdq, .. } = self;
        let d = domains
            .get_mut(&id.0)
            .ok_or(SmmuError::NoSuchDomain(id.0))?;
        let (stage, tag) = (d.stage, d.tag);
        let mut break_error = None;
        let mut on_break = |range: IovaRange| {
            let cmds = tlbi_for_ranges(stage, tag, &[range], false, range_inv);
            if let Err(e) = cmdq.submit(&hw, &cmds) {
                break_error.get_or_insert(e);
            }
        };
        let inv: Invalidation = match &mut d.table {
            DomainTable::S1(t) => t.unmap_with_break(iova, len, &mut on_break)?,
            DomainTable::S2(t) => t.unmap_with_break(iova, len, &mut on_break)?,
        };
        let changed = inv.changed_bytes();
        if let Some(e) = break_error {
            log::error!(
                "smmu{}: break-before-make invalidation failed ({e})",
                self.config.index
            );
            self.quarantine.push(inv.into_pending_free());
            return Err(e);
        }
        self.complete_change(stage, tag, inv)?;
        Ok(changed)
    }

    /// Invalidates what an unmap changed and frees the unlinked tables.
    fn complete_change(
        &mut self,
        stage: Stage,
        tag: u16,
        inv: Invalidation,
    ) -> Result<(), SmmuError> {
        if inv.is_empty() {
            inv.complete(self.mem);
            return Ok(());
        }
        // Leaf-only invalidation keeps walk caches: only when no table was
        // freed or split.
        let leaf = !inv.flush_paging_structures();
        let cmds = tlbi_for_ranges(stage, tag, inv.ranges(), leaf, self.caps.range_invalidation);
        match self.submit(&cmds) {
            Ok(()) => {
                inv.complete(self.mem);
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "smmu{}: TLB invalidation after an unmap failed ({e}); keeping {} table \
                     pages out of use",
                    self.config.index,
                    inv.pending_free().len()
                );
                self.quarantine.push(inv.into_pending_free());
                Err(e)
            }
        }
    }

    // ---- streams ------------------------------------------------------------------

    /// The domain `sid`'s own traffic (without SubstreamID) translates
    /// through.
    pub fn stream_domain(&self, sid: u32) -> Option<SmmuDomainId> {
        self.streams
            .get(&sid)
            .and_then(|s| s.rid_domain)
            .map(SmmuDomainId)
    }

    /// The domain (`sid`, `ssid`) is attached to.
    pub fn substream_domain(&self, sid: u32, ssid: u32) -> Option<SmmuDomainId> {
        self.streams
            .get(&sid)
            .and_then(|s| s.substreams.get(&ssid).copied())
            .map(SmmuDomainId)
    }

    /// Points `sid`'s traffic at `domain`. A stream attached elsewhere is
    /// moved (aborting in between, never torn).
    pub fn attach_stream(&mut self, sid: u32, domain: SmmuDomainId) -> Result<(), SmmuError> {
        self.check_sid(sid)?;
        let d = self.domain(domain)?;
        let stage = d.stage;
        let has_substreams = self
            .streams
            .get(&sid)
            .is_some_and(|s| !s.substreams.is_empty());
        if stage == Stage::Stage2 && has_substreams {
            // Substreams need stage 1; stage 2 under them would be nested.
            return Err(SmmuError::WrongStage(Stage::Stage2));
        }
        if self.stream_domain(sid) == Some(domain) {
            return Ok(());
        }
        // Allocate what the new configuration needs before touching the
        // old one.
        self.ensure_ste(sid)?;
        if self.stream_domain(sid).is_some() {
            self.detach_stream_inner(sid, false)?;
        }
        match stage {
            Stage::Stage1 => {
                let cd = self
                    .domain(domain)?
                    .cd
                    .ok_or(SmmuError::WrongStage(Stage::Stage2))?;
                if let Err(e) = self.write_cd(sid, 0, cd) {
                    self.drop_unused_stream_state(sid);
                    return Err(e);
                }
                let previous = self.current_ste(sid);
                self.note_attached(sid, None, domain.0);
                let ste = self.stage1_ste(sid).ok_or(SmmuError::NotAttached)?;
                if let Err(e) = self.install_ste(sid, ste) {
                    self.note_detached(sid, None, domain.0);
                    self.roll_back_ste(sid, previous);
                    return Err(e);
                }
            }
            Stage::Stage2 => {
                let s2 = self
                    .domain(domain)?
                    .s2
                    .ok_or(SmmuError::WrongStage(Stage::Stage1))?;
                let previous = self.current_ste(sid);
                self.note_attached(sid, None, domain.0);
                if let Err(e) = self.install_ste(sid, Ste::stage2(s2)) {
                    self.note_detached(sid, None, domain.0);
                    self.roll_back_ste(sid, previous);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The STE of `sid` as last written (aborting if never).
    fn current_ste(&self, sid: u32) -> Ste {
        self.streams
            .get(&sid)
            .and_then(|s| s.ste)
            .unwrap_or_else(Ste::abort)
    }

    /// After an attach whose STE invalidation failed (the new STE may
    /// already be in memory): `previous` is put back, so the stream never
    /// keeps translating through a domain the caller was told it is not
    /// attached to. The SMMU may still hold the failed configuration in
    /// its caches until an invalidation succeeds: callers flush
    /// ([`flush_all`](Self::flush_all)) before freeing the domain. A CD
    /// table made for the attach is freed only once the rollback's
    /// CMD_CFGI_STE (which also drops the CDs cached through the STE, as
    /// detaching relies on) completed.
    fn roll_back_ste(&mut self, sid: u32, previous: Ste) {
        match self.install_ste(sid, previous) {
            Ok(()) => {
                let substreams = self
                    .streams
                    .get(&sid)
                    .is_some_and(|s| !s.substreams.is_empty());
                if substreams {
                    let _ = self.clear_cd(sid, 0);
                } else {
                    self.drop_unused_stream_state(sid);
                }
            }
            Err(e) => log::error!(
                "smmu{}: StreamID {sid:#x}: restoring its STE after a failed attach failed \
                 ({e}); it aborts in memory, but the SMMU may hold the failed configuration \
                 until a global invalidation",
                self.config.index
            ),
        }
    }

    /// Aborts `sid`'s own traffic again.
    pub fn detach_stream(&mut self, sid: u32) -> Result<(), SmmuError> {
        self.check_sid(sid)?;
        if self.stream_domain(sid).is_none() {
            return Err(SmmuError::NotAttached);
        }
        self.detach_stream_inner(sid, true)
    }

    fn detach_stream_inner(&mut self, sid: u32, release: bool) -> Result<(), SmmuError> {
        let Some(did) = self.streams.get(&sid).and_then(|s| s.rid_domain) else {
            return Err(SmmuError::NotAttached);
        };
        let has_substreams = self
            .streams
            .get(&sid)
            .is_some_and(|s| !s.substreams.is_empty());
        self.note_detached(sid, None, did);
        if has_substreams {
            // Keep the substreams: traffic without SubstreamID now
            // terminates (S1DSS), then CD 0 is cleared.
            let ste = self.stage1_ste(sid).ok_or(SmmuError::NotAttached)?;
            self.install_ste(sid, ste)?;
            self.clear_cd(sid, 0)?;
            return Ok(());
        }
        self.install_ste(sid, Ste::abort())?;
        // The CMD_CFGI_STE also dropped every CD cached through the STE
        // (5.2.1): the CD table is unreachable.
        self.free_cd_table(sid);
        if release {
            self.maybe_free_l2(sid)?;
        }
        Ok(())
    }

    /// Points (`sid`, `ssid`) at the stage-1 `domain` (PCIe PASID
    /// traffic). Needs substreams (IDR1.SSIDSIZE > 0); SubstreamID 0 is
    /// reserved for the stream's own traffic (S1DSS = substream 0).
    pub fn attach_substream(
        &mut self,
        sid: u32,
        ssid: u32,
        domain: SmmuDomainId,
    ) -> Result<(), SmmuError> {
        self.check_sid(sid)?;
        if self.caps.ssid_bits == 0 {
            return Err(SmmuError::SubstreamsUnsupported);
        }
        let limit = self.substream_limit();
        if ssid == 0 || ssid >= limit {
            return Err(SmmuError::SubstreamOutOfRange { ssid, limit });
        }
        let d = self.domain(domain)?;
        let cd = d.cd.ok_or(SmmuError::WrongStage(Stage::Stage2))?;
        let rid_stage2 = self
            .stream_domain(sid)
            .and_then(|r| self.domains.get(&r.0))
            .is_some_and(|r| r.stage == Stage::Stage2);
        if rid_stage2 {
            return Err(SmmuError::WrongStage(Stage::Stage2));
        }
        if self.substream_domain(sid, ssid) == Some(domain) {
            return Ok(());
        }
        self.ensure_ste(sid)?;
        if let Some(old) = self.substream_domain(sid, ssid) {
            self.note_detached(sid, Some(ssid), old.0);
        }
        if let Err(e) = self.write_cd(sid, ssid, cd) {
            self.drop_unused_stream_state(sid);
            return Err(e);
        }
        self.note_attached(sid, Some(ssid), domain.0);
        let ste = self.stage1_ste(sid).ok_or(SmmuError::NotAttached)?;
        self.install_ste(sid, ste)
    }

    pub fn detach_substream(&mut self, sid: u32, ssid: u32) -> Result<(), SmmuError> {
        let did = self
            .substream_domain(sid, ssid)
            .ok_or(SmmuError::NotAttached)?;
        self.clear_cd(sid, ssid)?;
        self.note_detached(sid, Some(ssid), did.0);
        let attached = self.streams.get(&sid).is_some_and(Stream::is_attached);
        if !attached {
            self.install_ste(sid, Ste::abort())?;
            self.free_cd_table(sid);
            self.maybe_free_l2(sid)?;
        }
        Ok(())
    }

    /// After a failed attach: a CD table nothing uses is freed (the STE
    /// never pointed at it), and with it an unused level-2 table.
    fn drop_unused_stream_state(&mut self, sid: u32) {
        let unused = self
            .streams
            .get(&sid)
            .is_none_or(|s| !s.is_attached() && !s.ste.is_some_and(|ste| ste.config().stage1()));
        if unused {
            self.free_cd_table(sid);
            if let Err(e) = self.maybe_free_l2(sid) {
                log::error!(
                    "smmu{}: releasing the level-2 table of StreamID {sid:#x} failed ({e})",
                    self.config.index
                );
            }
        }
    }

    fn note_attached(&mut self, sid: u32, ssid: Option<u32>, did: u32) {
        let stream = self.streams.entry(sid).or_default();
        match ssid {
            None => stream.rid_domain = Some(did),
            Some(s) => {
                stream.substreams.insert(s, did);
            }
        }
        if let Some(d) = self.domains.get_mut(&did) {
            match ssid {
                None => {
                    d.streams.insert(sid);
                }
                Some(s) => {
                    d.substreams.insert((sid, s));
                }
            }
        }
    }

    fn note_detached(&mut self, sid: u32, ssid: Option<u32>, did: u32) {
        if let Some(stream) = self.streams.get_mut(&sid) {
            match ssid {
                None => stream.rid_domain = None,
                Some(s) => {
                    stream.substreams.remove(&s);
                }
            }
        }
        if let Some(d) = self.domains.get_mut(&did) {
            match ssid {
                None => {
                    d.streams.remove(&sid);
                }
                Some(s) => {
                    d.substreams.remove(&(sid, s));
                }
            }
        }
    }

    // ---- events and global errors ---------------------------------------------------

    /// Drains the event queue once (at most one queue's worth), attributes
    /// each event to the domain its stream (or substream) is attached to,
    /// and queues it there for the domain's owner.
    pub fn drain_events(&mut self) -> EventDrain {
        let hw = self.hw();
        let (records, overflowed) = self.evtq.drain(&hw);
        let mut out = EventDrain {
            faults: Vec::with_capacity(records.len()),
            overflowed,
            suppressed_logs: 0,
        };
        if overflowed {
            log::warn!(
                "smmu{}: event queue overflowed; events were lost",
                self.config.index
            );
        }
        let capacity = self.config.domain_fault_queue;
        for (i, record) in records.iter().enumerate() {
            let fault = record.decode();
            if i < self.config.event_log_limit {
                log::warn!("smmu{}: {fault}", self.config.index);
            } else {
                out.suppressed_logs += 1;
            }
            let did = self
                .streams
                .get(&fault.stream_id)
                .and_then(|s| match fault.substream_id {
                    Some(ssid) => s.substreams.get(&ssid).copied(),
                    None => s.rid_domain,
                });
            if let Some(d) = did.and_then(|d| self.domains.get_mut(&d)) {
                if d.faults.len() < capacity {
                    d.faults.push_back(fault);
                } else {
                    d.faults_dropped += 1;
                }
            }
            out.faults.push(AttributedFault {
                fault,
                domain: did.map(SmmuDomainId),
            });
        }
        out
    }

    /// Faults queued for `domain` since the last call, and how many were
    /// dropped because the queue was full.
    pub fn take_domain_faults(
        &mut self,
        domain: SmmuDomainId,
    ) -> Result<(Vec<SmmuFault>, u64), SmmuError> {
        let d = self
            .domains
            .get_mut(&domain.0)
            .ok_or(SmmuError::NoSuchDomain(domain.0))?;
        let dropped = core::mem::take(&mut d.faults_dropped);
        Ok((d.faults.drain(..).collect(), dropped))
    }

    /// Handles active global errors (GERROR bits differing from GERRORN,
    /// 7.5): a stopped command queue is repaired; the others are logged by
    /// name and acknowledged by toggling their GERRORN bits. Returns the
    /// bits handled, or an error when the SMMU entered service failure
    /// mode (it needs a reset).
    pub fn handle_global_errors(&mut self) -> Result<u32, SmmuError> {
        let hw = self.hw();
        let mut active = regs::GERROR.read(self.mmio) ^ regs::GERRORN.read(self.mmio);
        active &= gerror::ALL;
        if active == 0 {
            return Ok(0);
        }
        if active & gerror::CMDQ_ERR != 0 {
            let _ = self.cmdq.recover(&hw);
        }
        let others = active & !gerror::CMDQ_ERR;
        let names: [(u32, &str); 8] = [
            (gerror::EVENTQ_ABT_ERR, "event queue write aborted"),
            (gerror::PRIQ_ABT_ERR, "PRI queue write aborted"),
            (gerror::MSI_CMDQ_ABT_ERR, "CMD_SYNC MSI aborted"),
            (gerror::MSI_EVENTQ_ABT_ERR, "event queue MSI aborted"),
            (gerror::MSI_PRIQ_ABT_ERR, "PRI queue MSI aborted"),
            (gerror::MSI_GERROR_ABT_ERR, "global error MSI aborted"),
            (gerror::SFM_ERR, "service failure mode"),
            (gerror::CMDQ_ERR, "command queue error"),
        ];
        for (bit, name) in names {
            if active & bit != 0 {
                log::error!("smmu{}: global error: {name}", self.config.index);
            }
        }
        if others != 0 {
            let gerrorn = regs::GERRORN.read(self.mmio);
            regs::GERRORN.write(self.mmio, gerrorn ^ others);
        }
        if active & gerror::SFM_ERR != 0 {
            return Err(SmmuError::GlobalError(active));
        }
        Ok(active)
    }
}

/// TLB invalidation of `ranges` in the stage-1 ASID or stage-2 VMID
/// `tag` (4.4): range commands with IDR3.RIL, one command per page
/// otherwise; too many commands become one ASID / VMID invalidation.
fn tlbi_for_ranges(
    stage: Stage,
    tag: u16,
    ranges: &[IovaRange],
    leaf: bool,
    range_invalidation: bool,
) -> Vec<Command> {
    let one = |addr: u64, range: Option<TlbiRange>| match stage {
        Stage::Stage1 => Command::tlbi_nh_va(0, tag, addr, leaf, range),
        Stage::Stage2 => Command::tlbi_s2_ipa(tag, addr, leaf, range),
    };
    let wide = match stage {
        Stage::Stage1 => Command::tlbi_nh_asid(0, tag),
        Stage::Stage2 => Command::tlbi_s12_vmall(tag),
    };
    let mut cmds = Vec::new();
    for r in ranges {
        let mut addr = r.start & !(PAGE_SIZE - 1);
        let end = r.end;
        while addr < end {
            let pages = (end - addr).div_ceil(PAGE_SIZE);
            if range_invalidation && pages >= 2 {
                // (NUM + 1) * 2^SCALE pages with NUM + 1 ≤ 32.
                let scale = (64 - pages.leading_zeros()).saturating_sub(5).min(31);
                let count = (pages >> scale).min(32);
                match TlbiRange::for_pages(count << scale) {
                    Some(range) => {
                        cmds.push(one(addr, Some(range)));
                        addr += range.pages() * PAGE_SIZE;
                    }
                    None => {
                        cmds.push(one(addr, None));
                        addr += PAGE_SIZE;
                    }
                }
            } else {
                cmds.push(one(addr, None));
                addr += PAGE_SIZE;
            }
            if cmds.len() > MAX_TLBI_PER_CHANGE {
                return alloc::vec![wide];
            }
        }
    }
    if cmds.is_empty() {
        cmds.push(wide);
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_invalidation_covers_exactly_the_pages() {
        let cmds = tlbi_for_ranges(
            Stage::Stage1,
            5,
            &[IovaRange::new(0x1000, 0x1000 + 100 * 4096)],
            true,
            true,
        );
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        let w = cmds[0].words();
        assert_eq!((w[0] >> 12) & 0x1f, 24, "NUM + 1 = 25");
        assert_eq!((w[0] >> 20) & 0x1f, 2, "SCALE = 2");
        assert_eq!(w[1] & !0xfff, 0x1000);
        // 37 pages: 36 (9 * 2^2) then 1 single page.
        let cmds = tlbi_for_ranges(
            Stage::Stage2,
            3,
            &[IovaRange::new(0, 37 * 4096)],
            false,
            true,
        );
        let covered: u64 = cmds
            .iter()
            .map(|c| {
                let tg = (c.words()[1] >> 10) & 3;
                if tg == 0 {
                    1
                } else {
                    (((c.words()[0] >> 12) & 0x1f) + 1) << ((c.words()[0] >> 20) & 0x1f)
                }
            })
            .sum();
        assert_eq!(covered, 37);
    }

    #[test]
    fn many_pages_without_ril_become_one_asid_invalidation() {
        let few = tlbi_for_ranges(
            Stage::Stage1,
            9,
            &[IovaRange::new(0, 4 * 4096)],
            true,
            false,
        );
        assert_eq!(few.len(), 4);
        let many = tlbi_for_ranges(Stage::Stage1, 9, &[IovaRange::new(0, 1 << 21)], true, false);
        assert_eq!(many, [Command::tlbi_nh_asid(0, 9)]);
        let s2 = tlbi_for_ranges(Stage::Stage2, 4, &[IovaRange::new(0, 1 << 30)], true, false);
        assert_eq!(s2, [Command::tlbi_s12_vmall(4)]);
    }
}
