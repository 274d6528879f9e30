//! One ITS under Sluice's control: ownership (whatever firmware left is
//! disabled and replaced), the device and collection tables, collections,
//! devices and their ITTs, events mapped to LPIs, and a software record of
//! every mapping so nothing is mapped twice and the driver can say which
//! LPI a (DeviceID, EventID) reaches.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use sluice_hal::{Clock, DeviceAccess, DmaMemory, Mmio, PAGE_SIZE, PhysAddr};

use super::caps::{ItsCaps, TableCaps, probe_tables};
use super::commands::{ItsCommand, RdBase};
use super::error::ItsError;
use super::queue::{CommandQueue, Hw};
use super::regs::{self, ItsPageSize, TableType, baser, cache, cbaser, ctlr, share};
use crate::lpi::Lpi;
use crate::memory::Block;
use crate::redist::{LpiConfig, LpiTables};

/// How to lay out the device table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTableRequest {
    /// Flat when the DeviceIDs fit one page, else two-level when the ITS
    /// has it (level-2 pages allocated as devices appear), else flat over
    /// contiguous pages.
    Auto,
    Flat,
    /// Two-level, or an error without GITS_BASER.Indirect.
    Indirect,
}

/// The device table the unit runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTableLayout {
    Flat {
        /// DeviceIDs below 2^`device_bits` can be mapped.
        device_bits: u32,
        page_size: ItsPageSize,
        pages: u64,
    },
    Indirect {
        device_bits: u32,
        page_size: ItsPageSize,
        /// Pages of level-1 descriptors.
        l1_pages: u64,
        /// DeviceIDs one level-2 page covers.
        ids_per_l2: u64,
    },
}

impl DeviceTableLayout {
    pub const fn device_bits(&self) -> u32 {
        match *self {
            Self::Flat { device_bits, .. } | Self::Indirect { device_bits, .. } => device_bits,
        }
    }
    pub const fn page_size(&self) -> ItsPageSize {
        match *self {
            Self::Flat { page_size, .. } | Self::Indirect { page_size, .. } => page_size,
        }
    }
}

/// How to take an ITS over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItsConfig {
    /// For log lines (`its0`).
    pub index: u32,
    /// Register base (ITS_base), for log lines and the doorbell address.
    pub base: u64,
    /// How long any wait on the ITS may take.
    pub timeout_ns: u64,
    /// Collections (ICIDs `0..collections`) Sluice will map: one per PE
    /// that receives LPIs.
    pub collections: u32,
    pub device_table: DeviceTableRequest,
    /// Cover at most this many DeviceID bits (`None`: all the ITS has).
    /// PCI requester IDs need 16.
    pub max_device_bits: Option<u32>,
    /// INTID bits of the LPIs (GICR_PROPBASER.IDbits + 1): events can only
    /// be mapped to LPIs below 2^`lpi_id_bits`.
    pub lpi_id_bits: u32,
}

impl ItsConfig {
    pub const fn new(index: u32, base: u64, collections: u32, lpi_id_bits: u32) -> Self {
        Self {
            index,
            base,
            timeout_ns: 100_000_000,
            collections,
            device_table: DeviceTableRequest::Auto,
            max_device_bits: None,
            lpi_id_bits,
        }
    }
}

/// Where one event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMapping {
    pub lpi: Lpi,
    pub icid: u16,
}

struct Device {
    itt: Block,
    event_bits: u32,
    events: BTreeMap<u32, EventMapping>,
}

struct DeviceTable {
    layout: DeviceTableLayout,
    /// The flat table, or the level-1 table.
    root: Block,
    /// Level-2 pages by level-1 index.
    l2: BTreeMap<u64, Block>,
}

/// Commands of a batch the ITS stalled on (their indices).
struct Stalls(Vec<(usize, ItsError)>);

impl Stalls {
    fn hit(&self, index: usize) -> bool {
        self.0.iter().any(|&(i, _)| i == index)
    }
    fn first(&self) -> Option<ItsError> {
        self.0.first().map(|&(_, e)| e)
    }
    fn into_result(self) -> Result<(), ItsError> {
        self.first().map_or(Ok(()), Err)
    }
}

/// One ITS under Sluice's control.
pub struct ItsUnit<'a> {
    mmio: &'a dyn Mmio,
    mem: &'a dyn DmaMemory,
    clock: &'a dyn Clock,
    caps: ItsCaps,
    tables: [Option<TableCaps>; regs::BASER_COUNT],
    config: ItsConfig,
    coherent: bool,
    cmdq: CommandQueue,
    cmdq_block: Block,
    device_table: DeviceTable,
    collection_table: Option<Block>,
    collections: BTreeMap<u16, RdBase>,
    devices: BTreeMap<u32, Device>,
    /// LPI INTID → (DeviceID, EventID) reaching it.
    lpis: BTreeMap<u32, (u32, u32)>,
    /// A command timed out: the ITS's state is unknown.
    wedged: bool,
    /// Memory the ITS may still use after a timeout: never freed.
    quarantine: Vec<Block>,
}

/// Pieces of a bring-up in progress: freed (after the registers pointing
/// at them are invalidated) if it fails.
struct Bringup {
    blocks: Vec<Block>,
}

impl<'a> ItsUnit<'a> {
    // ---- ownership ------------------------------------------------------------

    /// Takes control of the ITS (IHI 0069, 5.2 "The ITS" and 12.19:
    /// `GITS_BASER<n>` and GITS_CBASER may only change while GITS_CTLR.Enabled
    /// = 0 and Quiescent = 1):
    ///
    /// 1. whatever firmware left, Enabled is cleared and Quiescent awaited,
    ///    so the ITS stops translating through tables Sluice does not own;
    /// 2. every `GITS_BASER<n>` is probed (and left invalid);
    /// 3. a command queue (one page, 128 commands), the device table
    ///    (see [`DeviceTableRequest`]) and, unless GITS_TYPER.HCC holds
    ///    every collection, a collection table are allocated and programmed;
    /// 4. GITS_CWRITER = GITS_CREADR = 0 (writing GITS_CBASER clears
    ///    CREADR), then Enabled is set.
    ///
    /// From then on no DeviceID is mapped: every MSI is dropped until
    /// [`ItsUnit::map_device`] and [`ItsUnit::map_event`]. On error the
    /// ITS is left disabled with every table invalid and nothing stays
    /// allocated.
    pub fn take_ownership(
        mmio: &'a dyn Mmio,
        mem: &'a dyn DmaMemory,
        clock: &'a dyn Clock,
        config: ItsConfig,
    ) -> Result<Self, ItsError> {
        let caps = ItsCaps::read(mmio);
        log::info!(
            "its{} @{:#x}: {}",
            config.index,
            config.base,
            caps.summary()
        );
        Self::check(&caps, &config)?;
        let hw = Hw {
            access: DeviceAccess {
                mmio,
                mem,
                clock,
                timeout_ns: config.timeout_ns,
                coherent: true,
            },
            index: config.index,
        };
        Self::disable(&hw)?;
        let tables = probe_tables(mmio);
        for t in tables.iter().flatten().filter(|t| t.was_valid()) {
            log::warn!(
                "its{}: firmware left GITS_BASER{} ({}) valid at {:#x}; replaced",
                config.index,
                t.index,
                t.kind.name(),
                t.found
            );
        }
        let mut bringup = Bringup { blocks: Vec::new() };
        match Self::build(hw, caps, tables, config, &mut bringup) {
            Ok(unit) => {
                log::info!(
                    "its{}: enabled ({:?}, {} collections{}); no device is mapped",
                    config.index,
                    unit.device_table.layout,
                    config.collections,
                    if unit.collection_table.is_none() {
                        " held by the ITS"
                    } else {
                        ""
                    }
                );
                Ok(unit)
            }
            Err(e) => {
                log::error!(
                    "its{}: taking ownership failed ({e}); the ITS stays disabled",
                    config.index
                );
                Self::invalidate_registers(&hw, &tables);
                for b in bringup.blocks {
                    b.free(mem);
                }
                Err(e)
            }
        }
    }

    fn check(caps: &ItsCaps, config: &ItsConfig) -> Result<(), ItsError> {
        if !caps.physical {
            return Err(ItsError::Unsupported("physical LPIs (GITS_TYPER.Physical)"));
        }
        if caps.itt_entry_bytes == 0 {
            return Err(ItsError::Unsupported(
                "ITT entries (GITS_TYPER.ITT_entry_size)",
            ));
        }
        if config.collections == 0 {
            return Err(ItsError::InvalidConfig("at least one collection is needed"));
        }
        if u64::from(config.collections) > u64::from(caps.collection_limit()) {
            return Err(ItsError::InvalidConfig(
                "more collections than the ITS has ICIDs (GITS_TYPER.CIDbits)",
            ));
        }
        if config.collections > u32::from(u16::MAX) + 1 {
            return Err(ItsError::InvalidConfig("ICIDs are 16 bits"));
        }
        if !(Lpi::MIN_ID_BITS..=32).contains(&config.lpi_id_bits) {
            return Err(ItsError::InvalidConfig("LPI INTID bits must be 14 to 32"));
        }
        if config.timeout_ns == 0 {
            return Err(ItsError::InvalidConfig("a zero timeout"));
        }
        Ok(())
    }

    /// Clears GITS_CTLR.Enabled and waits for Quiescent.
    fn disable(hw: &Hw<'_>) -> Result<(), ItsError> {
        let value = regs::CTLR.read(hw.mmio);
        if value & ctlr::ENABLED != 0 {
            log::warn!(
                "its{}: firmware left the ITS enabled; disabling it (its mappings stop now)",
                hw.index
            );
        }
        regs::CTLR.write(hw.mmio, value & !(ctlr::ENABLED | ctlr::QUIESCENT));
        hw.wait("quiescence after disabling (GITS_CTLR.Quiescent)", || {
            regs::CTLR.read(hw.mmio) & ctlr::QUIESCENT != 0
        })
    }

    /// Best effort after a failed bring-up: disabled, every table and the
    /// queue invalid, so nothing points at memory about to be freed.
    fn invalidate_registers(hw: &Hw<'_>, tables: &[Option<TableCaps>; regs::BASER_COUNT]) {
        if regs::CTLR.read(hw.mmio) & ctlr::ENABLED != 0 {
            regs::CTLR.write(hw.mmio, 0);
            if Self::disable(hw).is_err() {
                log::error!(
                    "its{}: not quiescent after a failed bring-up; tables invalidated anyway",
                    hw.index
                );
            }
        }
        for t in tables.iter().flatten() {
            regs::baser(t.index).write(hw.mmio, 0);
        }
        regs::CBASER.write(hw.mmio, 0);
    }

    fn build(
        mut hw: Hw<'a>,
        caps: ItsCaps,
        tables: [Option<TableCaps>; regs::BASER_COUNT],
        config: ItsConfig,
        bringup: &mut Bringup,
    ) -> Result<Self, ItsError> {
        let alloc = |bringup: &mut Bringup, what, bytes, align| {
            let b = Block::alloc(hw.mem, bytes, align)
                .map_err(|_| ItsError::OutOfMemory { what, bytes })?;
            bringup.blocks.push(b);
            Ok::<_, ItsError>(b)
        };
        // Device table.
        let dt_caps = tables
            .iter()
            .flatten()
            .find(|t| t.kind == TableType::Devices)
            .copied()
            .ok_or(ItsError::Unsupported(
                "a device table (no GITS_BASER<n> of type Devices)",
            ))?;
        let layout = plan_device_table(&caps, &dt_caps, &config)?;
        let page = layout.page_size().bytes();
        let root_bytes = match layout {
            DeviceTableLayout::Flat { pages, .. } => pages * page,
            DeviceTableLayout::Indirect { l1_pages, .. } => l1_pages * page,
        };
        let root = alloc(
            bringup,
            match layout {
                DeviceTableLayout::Flat { .. } => "flat device table",
                DeviceTableLayout::Indirect { .. } => "level-1 device table",
            },
            root_bytes,
            page,
        )?;
        // Collection table, unless the ITS holds every collection.
        let collection = if config.collections <= caps.hcc {
            None
        } else {
            let ct = tables
                .iter()
                .flatten()
                .find(|t| t.kind == TableType::Collections)
                .copied()
                .ok_or(ItsError::Unsupported(
                    "a collection table (no GITS_BASER<n> of type Collections, HCC too small)",
                ))?;
            let size = ct
                .page_sizes
                .smallest()
                .ok_or(ItsError::Unsupported("any GITS_BASER page size"))?;
            let bytes = u64::from(config.collections) * u64::from(ct.entry_bytes);
            let pages = bytes.div_ceil(size.bytes());
            if pages > baser::MAX_PAGES {
                return Err(ItsError::InvalidConfig(
                    "the collection table would exceed 256 pages",
                ));
            }
            let block = alloc(
                bringup,
                "collection table",
                pages * size.bytes(),
                size.bytes(),
            )?;
            Some((ct, size, pages, block))
        };
        // Command queue: one page.
        let queue = alloc(bringup, "command queue", PAGE_SIZE, PAGE_SIZE)?;

        // GITS_CBASER: write-back inner shareable; an ITS that does not
        // snoop keeps Shareability at Non-shareable (12.19.2), and then
        // gets Non-cacheable attributes and cleaned memory.
        let coherent_value = cbaser::VALID
            | (cache::WRITE_BACK << cbaser::INNER_CACHE_SHIFT)
            | (share::INNER_SHAREABLE << cbaser::SHAREABILITY_SHIFT)
            | (queue.start.as_u64() & cbaser::ADDR_MASK);
        regs::CBASER.write(hw.mmio, coherent_value);
        let back = regs::CBASER.read(hw.mmio);
        let mut coherent = (back & cbaser::SHAREABILITY_MASK) >> cbaser::SHAREABILITY_SHIFT
            != share::NON_SHAREABLE;
        let mut cbaser_value = coherent_value;
        if !coherent {
            cbaser_value = cbaser::VALID
                | (cache::NON_CACHEABLE << cbaser::INNER_CACHE_SHIFT)
                | (queue.start.as_u64() & cbaser::ADDR_MASK);
            regs::CBASER.write(hw.mmio, cbaser_value);
        }
        let back = regs::CBASER.read(hw.mmio);
        let check = cbaser::VALID | cbaser::ADDR_MASK | cbaser::SIZE_MASK;
        if back & check != cbaser_value & check {
            return Err(ItsError::RegisterRejected {
                what: "GITS_CBASER",
                wrote: cbaser_value,
                read: back,
            });
        }
        regs::CWRITER.write(hw.mmio, 0);
        let creadr = regs::CREADR.read(hw.mmio);
        if creadr != 0 {
            return Err(ItsError::RegisterRejected {
                what: "GITS_CREADR after writing GITS_CBASER",
                wrote: 0,
                read: creadr,
            });
        }

        // Device table descriptor.
        let (indirect, pages) = match layout {
            DeviceTableLayout::Flat { pages, .. } => (false, pages),
            DeviceTableLayout::Indirect { l1_pages, .. } => (true, l1_pages),
        };
        coherent &= Self::program_baser(
            &hw,
            &dt_caps,
            root.start,
            layout.page_size(),
            pages,
            indirect,
            coherent,
        )?;
        if let Some((ct, size, pages, block)) = collection {
            coherent &= Self::program_baser(&hw, &ct, block.start, size, pages, false, coherent)?;
        }
        if !coherent {
            log::info!(
                "its{}: the ITS does not snoop CPU caches; its memory is cleaned on every write",
                config.index
            );
            hw.access.coherent = false;
            for b in &bringup.blocks {
                hw.mem.flush_for_device(b.start, b.bytes());
            }
        }

        regs::CTLR.write(hw.mmio, ctlr::ENABLED);
        let back = regs::CTLR.read(hw.mmio);
        if back & ctlr::ENABLED == 0 {
            return Err(ItsError::RegisterRejected {
                what: "GITS_CTLR.Enabled",
                wrote: u64::from(ctlr::ENABLED),
                read: u64::from(back),
            });
        }
        Ok(Self {
            mmio: hw.mmio,
            mem: hw.mem,
            clock: hw.clock,
            caps,
            tables,
            config,
            coherent,
            cmdq: CommandQueue {
                base: queue.start,
                bytes: PAGE_SIZE,
                writer: 0,
            },
            cmdq_block: queue,
            device_table: DeviceTable {
                layout,
                root,
                l2: BTreeMap::new(),
            },
            collection_table: collection.map(|(_, _, _, b)| b),
            collections: BTreeMap::new(),
            devices: BTreeMap::new(),
            lpis: BTreeMap::new(),
            wedged: false,
            quarantine: Vec::new(),
        })
    }

    /// Programs one `GITS_BASER<n>` and checks it kept the values. Returns
    /// whether its Shareability stayed shareable (the ITS snoops).
    fn program_baser(
        hw: &Hw<'_>,
        t: &TableCaps,
        base: PhysAddr,
        page: ItsPageSize,
        pages: u64,
        indirect: bool,
        coherent: bool,
    ) -> Result<bool, ItsError> {
        let reg = regs::baser(t.index);
        let attrs = |coherent: bool| {
            if coherent {
                (cache::WRITE_BACK << baser::INNER_CACHE_SHIFT)
                    | (share::INNER_SHAREABLE << baser::SHAREABILITY_SHIFT)
            } else {
                cache::NON_CACHEABLE << baser::INNER_CACHE_SHIFT
            }
        };
        let fixed = (t.kind.field() << baser::TYPE_SHIFT)
            | ((u64::from(t.entry_bytes) - 1) << baser::ENTRY_SIZE_SHIFT)
            | baser::VALID
            | if indirect { baser::INDIRECT } else { 0 }
            | baser::encode_address(base.as_u64(), page.bytes())
            | (page.field() << baser::PAGE_SIZE_SHIFT)
            | ((pages - 1) & baser::SIZE_MASK);
        let mut value = fixed | attrs(coherent);
        reg.write(hw.mmio, value);
        let mut back = reg.read(hw.mmio);
        let snoops =
            (back & baser::SHAREABILITY_MASK) >> baser::SHAREABILITY_SHIFT != share::NON_SHAREABLE;
        if coherent && !snoops {
            value = fixed | attrs(false);
            reg.write(hw.mmio, value);
            back = reg.read(hw.mmio);
        }
        let check = baser::VALID
            | baser::INDIRECT
            | baser::ADDR_MASK
            | baser::PAGE_SIZE_MASK
            | baser::SIZE_MASK;
        if back & check != value & check {
            return Err(ItsError::RegisterRejected {
                what: match t.kind {
                    TableType::Devices => "GITS_BASER (device table)",
                    _ => "GITS_BASER (collection table)",
                },
                wrote: value,
                read: back,
            });
        }
        Ok(snoops)
    }

    // ---- accessors --------------------------------------------------------------

    pub const fn caps(&self) -> &ItsCaps {
        &self.caps
    }

    /// What each `GITS_BASER<n>` accepted when probed.
    pub const fn table_caps(&self) -> &[Option<TableCaps>; regs::BASER_COUNT] {
        &self.tables
    }

    pub const fn config(&self) -> &ItsConfig {
        &self.config
    }

    /// Whether the ITS's accesses to its queue and tables snoop CPU
    /// caches.
    pub const fn coherent(&self) -> bool {
        self.coherent
    }

    /// The address devices write MSIs to (GITS_TRANSLATER).
    pub const fn doorbell(&self) -> u64 {
        regs::doorbell_address(self.config.base)
    }

    pub const fn device_table_layout(&self) -> DeviceTableLayout {
        self.device_table.layout
    }

    /// DeviceIDs at or above this cannot be mapped.
    pub const fn device_limit(&self) -> u64 {
        1u64 << self.device_table.layout.device_bits()
    }

    /// ICIDs at or above this cannot be mapped.
    pub const fn collection_limit(&self) -> u32 {
        let caps = self.caps.collection_limit();
        if self.config.collections < caps {
            self.config.collections
        } else {
            caps
        }
    }

    /// LPI INTIDs at or above this cannot be mapped.
    pub const fn lpi_limit(&self) -> u64 {
        1u64 << self.config.lpi_id_bits
    }

    /// Commands the queue holds (one slot always stays free).
    pub const fn queue_slots(&self) -> u64 {
        self.cmdq.slots()
    }

    /// Whether an earlier command timed out (see [`ItsError::Wedged`]).
    pub const fn is_wedged(&self) -> bool {
        self.wedged
    }

    /// The level-2 device table page holding `device`'s entry, if any.
    pub fn level2_page(&self, device: u32) -> Option<PhysAddr> {
        match self.device_table.layout {
            DeviceTableLayout::Indirect { ids_per_l2, .. } => self
                .device_table
                .l2
                .get(&(u64::from(device) / ids_per_l2))
                .map(|b| b.start),
            DeviceTableLayout::Flat { .. } => None,
        }
    }

    /// 4 KiB pages the unit holds now: queue, tables, level-2 pages and
    /// ITTs (not counting quarantined ones).
    pub fn structure_pages(&self) -> u64 {
        self.cmdq_block.pages
            + self.device_table.root.pages
            + self.device_table.l2.values().map(|b| b.pages).sum::<u64>()
            + self.collection_table.map_or(0, |b| b.pages)
            + self.devices.values().map(|d| d.itt.pages).sum::<u64>()
    }

    /// 4 KiB pages kept because the ITS may still use them after a
    /// timeout.
    pub fn quarantined_pages(&self) -> u64 {
        self.quarantine.iter().map(|b| b.pages).sum()
    }

    /// Where (`device`, `event`) goes, per the software record.
    pub fn translate(&self, device: u32, event: u32) -> Option<EventMapping> {
        self.devices.get(&device)?.events.get(&event).copied()
    }

    /// The (DeviceID, EventID) that reaches `lpi`.
    pub fn lpi_owner(&self, lpi: Lpi) -> Option<(u32, u32)> {
        self.lpis.get(&lpi.intid()).copied()
    }

    /// EventID bits of a mapped device.
    pub fn device_event_bits(&self, device: u32) -> Option<u32> {
        self.devices.get(&device).map(|d| d.event_bits)
    }

    /// The ITT of a mapped device.
    pub fn device_itt(&self, device: u32) -> Option<PhysAddr> {
        self.devices.get(&device).map(|d| d.itt.start)
    }

    /// Every mapped DeviceID.
    pub fn mapped_devices(&self) -> Vec<u32> {
        self.devices.keys().copied().collect()
    }

    /// Every mapped event of `device`.
    pub fn mapped_events(&self, device: u32) -> Vec<(u32, EventMapping)> {
        self.devices
            .get(&device)
            .map(|d| d.events.iter().map(|(&e, &m)| (e, m)).collect())
            .unwrap_or_default()
    }

    /// The redistributor collection `icid` targets.
    pub fn collection_target(&self, icid: u16) -> Option<RdBase> {
        self.collections.get(&icid).copied()
    }

    // ---- commands -----------------------------------------------------------------

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

    /// What replaces a command the ITS stalled on: a SYNC to a collection
    /// the ITS already accepted, or else unmapping collection 0 — which,
    /// with no collection mapped, changes nothing.
    fn replacement(&self) -> ItsCommand {
        match self.collections.values().next() {
            Some(&rd) => ItsCommand::sync(rd),
            None => ItsCommand::unmapc(0),
        }
    }

    /// A SYNC for the end of a batch: to `preferred`'s target when given
    /// and mapped, else to any mapped collection's. `None` when no
    /// collection is mapped: then no LPI can be delivered anywhere, and
    /// the batch is complete once the ITS has consumed it.
    fn sync_for(&self, preferred: Option<u16>) -> Option<ItsCommand> {
        preferred
            .and_then(|icid| self.collections.get(&icid))
            .or_else(|| self.collections.values().next())
            .map(|&rd| ItsCommand::sync(rd))
    }

    /// Runs a batch. `Ok` lists the commands the ITS stalled on (each
    /// replaced and skipped); a timeout wedges the unit.
    fn run(&mut self, cmds: &[ItsCommand]) -> Result<Stalls, ItsError> {
        if self.wedged {
            return Err(ItsError::Wedged);
        }
        let hw = self.hw();
        let replacement = self.replacement();
        match self.cmdq.submit(&hw, cmds, replacement) {
            Ok(stalls) => Ok(Stalls(stalls)),
            Err(e) => {
                self.wedged = true;
                log::error!(
                    "its{}: {e}; no more commands will be sent to this ITS",
                    self.config.index
                );
                Err(e)
            }
        }
    }

    /// Sends a SYNC to `rd` and waits until the ITS has consumed it: every
    /// earlier command's effect on that redistributor is then visible.
    pub fn sync(&mut self, rd: RdBase) -> Result<(), ItsError> {
        if !rd.fits(self.caps.pta) {
            return Err(ItsError::WrongTarget(rd));
        }
        self.run(&[ItsCommand::sync(rd)])?.into_result()
    }

    // ---- collections ------------------------------------------------------------------

    /// Maps collection `icid` to the redistributor `target` (MAPC, then
    /// SYNC). `target` must be in the form GITS_TYPER.PTA asks for (see
    /// [`RedistributorFrame::target`](crate::redist::RedistributorFrame::target)).
    pub fn map_collection(&mut self, icid: u16, target: RdBase) -> Result<(), ItsError> {
        let limit = self.collection_limit();
        if u32::from(icid) >= limit {
            return Err(ItsError::CollectionOutOfRange { icid, limit });
        }
        if self.collections.contains_key(&icid) {
            return Err(ItsError::CollectionMapped(icid));
        }
        if !target.fits(self.caps.pta) {
            return Err(ItsError::WrongTarget(target));
        }
        let stalls = self.run(&[ItsCommand::mapc(icid, target), ItsCommand::sync(target)])?;
        if stalls.hit(0) {
            return stalls.into_result();
        }
        self.collections.insert(icid, target);
        stalls.into_result()
    }

    /// Unmaps collection `icid` (MAPC V=0). Refused while events target
    /// it.
    pub fn unmap_collection(&mut self, icid: u16) -> Result<(), ItsError> {
        let Some(&target) = self.collections.get(&icid) else {
            return Err(ItsError::CollectionNotMapped(icid));
        };
        if self
            .devices
            .values()
            .any(|d| d.events.values().any(|m| m.icid == icid))
        {
            return Err(ItsError::CollectionInUse(icid));
        }
        let stalls = self.run(&[ItsCommand::unmapc(icid), ItsCommand::sync(target)])?;
        if stalls.hit(0) {
            return stalls.into_result();
        }
        self.collections.remove(&icid);
        stalls.into_result()
    }

    // ---- devices ------------------------------------------------------------------

    /// Makes sure `device`'s device-table entry exists: in a two-level
    /// table its level-2 page is allocated and its level-1 descriptor
    /// made valid (5.2.1: software may add level-2 pages while the ITS
    /// runs). A new page stays even if the mapping then fails; it is part
    /// of the table.
    fn ensure_device_entry(&mut self, device: u32) -> Result<(), ItsError> {
        let DeviceTableLayout::Indirect {
            page_size,
            ids_per_l2,
            ..
        } = self.device_table.layout
        else {
            return Ok(());
        };
        let l1_index = u64::from(device) / ids_per_l2;
        if self.device_table.l2.contains_key(&l1_index) {
            return Ok(());
        }
        let bytes = page_size.bytes();
        let page = Block::alloc(self.mem, bytes, bytes).map_err(|_| ItsError::OutOfMemory {
            what: "level-2 device table page",
            bytes,
        })?;
        let hw = self.hw();
        hw.flush(page.start, page.bytes());
        let entry =
            PhysAddr::new(self.device_table.root.start.as_u64() + l1_index * baser::L1_ENTRY_BYTES);
        self.mem.write_u64(
            entry,
            baser::L1_VALID | (page.start.as_u64() & baser::L1_ADDR_MASK),
        );
        hw.flush(entry, baser::L1_ENTRY_BYTES);
        self.device_table.l2.insert(l1_index, page);
        Ok(())
    }

    /// Maps `device` with room for 2^`event_bits` EventIDs: allocates its
    /// ITT (256-byte aligned, 2^`event_bits` × ITT_entry_size bytes) and
    /// sends MAPD. Its events reach nothing until [`ItsUnit::map_event`].
    pub fn map_device(&mut self, device: u32, event_bits: u32) -> Result<(), ItsError> {
        let limit = self.device_limit();
        if u64::from(device) >= limit {
            return Err(ItsError::DeviceOutOfRange { device, limit });
        }
        if event_bits == 0 || event_bits > self.caps.event_bits {
            return Err(ItsError::EventBitsOutOfRange {
                bits: event_bits,
                max: self.caps.event_bits,
            });
        }
        if self.devices.contains_key(&device) {
            return Err(ItsError::DeviceMapped(device));
        }
        if self.wedged {
            return Err(ItsError::Wedged);
        }
        self.ensure_device_entry(device)?;
        let bytes = (1u64 << event_bits) * u64::from(self.caps.itt_entry_bytes);
        let itt = Block::alloc(self.mem, bytes, 256)
            .map_err(|_| ItsError::OutOfMemory { what: "ITT", bytes })?;
        self.hw().flush(itt.start, itt.bytes());
        let mut cmds = alloc::vec![ItsCommand::mapd(device, itt.start, event_bits)];
        cmds.extend(self.sync_for(None));
        let stalls = match self.run(&cmds) {
            Ok(s) => s,
            Err(e) => {
                // The ITS may still consume the MAPD: keep the ITT.
                self.quarantine.push(itt);
                return Err(e);
            }
        };
        if stalls.hit(0) {
            itt.free(self.mem);
            return stalls.into_result();
        }
        self.devices.insert(
            device,
            Device {
                itt,
                event_bits,
                events: BTreeMap::new(),
            },
        );
        stalls.into_result()
    }

    /// Unmaps `device`: DISCARD for every mapped event (their LPIs stop
    /// being pending), MAPD V=0, SYNC to every redistributor involved;
    /// then its ITT is freed. Its MSIs are dropped from then on.
    pub fn unmap_device(&mut self, device: u32) -> Result<(), ItsError> {
        let Some(dev) = self.devices.get(&device) else {
            return Err(ItsError::DeviceNotMapped(device));
        };
        let events: Vec<(u32, EventMapping)> = dev.events.iter().map(|(&e, &m)| (e, m)).collect();
        let mut cmds: Vec<ItsCommand> = events
            .iter()
            .map(|&(e, _)| ItsCommand::discard(device, e))
            .collect();
        let mapd_index = cmds.len();
        cmds.push(ItsCommand::unmapd(device));
        let targets: BTreeSet<RdBase> = events
            .iter()
            .filter_map(|(_, m)| self.collections.get(&m.icid).copied())
            .collect();
        if targets.is_empty() {
            cmds.extend(self.sync_for(None));
        } else {
            cmds.extend(targets.into_iter().map(ItsCommand::sync));
        }
        // A timeout keeps every record and the ITT (the ITS may still use
        // them); the unit is wedged.
        let stalls = self.run(&cmds)?;
        for (i, &(event, m)) in events.iter().enumerate() {
            if !stalls.hit(i) {
                self.forget_event(device, event, m);
            }
        }
        if !stalls.hit(mapd_index)
            && let Some(dev) = self.devices.remove(&device)
        {
            for (_, m) in dev.events {
                self.lpis.remove(&m.lpi.intid());
            }
            dev.itt.free(self.mem);
        }
        stalls.into_result()
    }

    fn forget_event(&mut self, device: u32, event: u32, m: EventMapping) {
        if let Some(dev) = self.devices.get_mut(&device) {
            dev.events.remove(&event);
        }
        self.lpis.remove(&m.lpi.intid());
    }

    // ---- events -----------------------------------------------------------------------

    fn check_event(&self, device: u32, event: u32) -> Result<&Device, ItsError> {
        let dev = self
            .devices
            .get(&device)
            .ok_or(ItsError::DeviceNotMapped(device))?;
        let limit = 1u64 << dev.event_bits;
        if u64::from(event) >= limit {
            return Err(ItsError::EventOutOfRange {
                device,
                event,
                limit,
            });
        }
        Ok(dev)
    }

    /// Maps (`device`, `event`) to `lpi` in collection `icid` (MAPTI, then
    /// SYNC to the collection's redistributor). Refuses an event already
    /// mapped, an LPI another event already reaches, an unmapped
    /// collection, and LPIs beyond the configured INTID bits.
    pub fn map_event(
        &mut self,
        device: u32,
        event: u32,
        lpi: Lpi,
        icid: u16,
    ) -> Result<(), ItsError> {
        let dev = self.check_event(device, event)?;
        if dev.events.contains_key(&event) {
            return Err(ItsError::EventMapped { device, event });
        }
        if u64::from(lpi.intid()) >= self.lpi_limit() {
            return Err(ItsError::LpiOutOfRange {
                lpi: lpi.intid(),
                first: Lpi::FIRST_INTID,
                limit: self.lpi_limit(),
            });
        }
        if let Some(&(d, e)) = self.lpis.get(&lpi.intid()) {
            return Err(ItsError::LpiInUse {
                lpi: lpi.intid(),
                device: d,
                event: e,
            });
        }
        let Some(&target) = self.collections.get(&icid) else {
            return Err(ItsError::CollectionNotMapped(icid));
        };
        let stalls = self.run(&[
            ItsCommand::mapti(device, event, lpi.intid(), icid),
            ItsCommand::sync(target),
        ])?;
        if stalls.hit(0) {
            return stalls.into_result();
        }
        if let Some(dev) = self.devices.get_mut(&device) {
            dev.events.insert(event, EventMapping { lpi, icid });
        }
        self.lpis.insert(lpi.intid(), (device, event));
        stalls.into_result()
    }

    /// Unmaps (`device`, `event`) (DISCARD, which also clears its LPI's
    /// pending state, then SYNC). The device's MSIs with this EventID are
    /// dropped from then on.
    pub fn unmap_event(&mut self, device: u32, event: u32) -> Result<(), ItsError> {
        let dev = self.check_event(device, event)?;
        let Some(&m) = dev.events.get(&event) else {
            return Err(ItsError::EventNotMapped { device, event });
        };
        let mut cmds = alloc::vec![ItsCommand::discard(device, event)];
        cmds.extend(self.sync_for(Some(m.icid)));
        let stalls = self.run(&cmds)?;
        if stalls.hit(0) {
            return stalls.into_result();
        }
        self.forget_event(device, event, m);
        stalls.into_result()
    }

    /// Makes the redistributor re-read the configuration of the LPI
    /// (`device`, `event`) reaches (INV, then SYNC): after changing its
    /// byte in the configuration table (5.1.1).
    pub fn invalidate(&mut self, device: u32, event: u32) -> Result<(), ItsError> {
        let dev = self.check_event(device, event)?;
        let Some(&m) = dev.events.get(&event) else {
            return Err(ItsError::EventNotMapped { device, event });
        };
        let mut cmds = alloc::vec![ItsCommand::inv(device, event)];
        cmds.extend(self.sync_for(Some(m.icid)));
        self.run(&cmds)?.into_result()
    }

    /// Sets the priority and enable of the LPI (`device`, `event`)
    /// reaches in the shared configuration table, then makes its
    /// redistributor re-read it (INV, then SYNC; 5.1.1).
    pub fn configure_event(
        &mut self,
        tables: &LpiTables<'_>,
        device: u32,
        event: u32,
        config: LpiConfig,
    ) -> Result<(), ItsError> {
        let dev = self.check_event(device, event)?;
        let Some(&m) = dev.events.get(&event) else {
            return Err(ItsError::EventNotMapped { device, event });
        };
        tables
            .set(m.lpi, config)
            .map_err(|_| ItsError::LpiOutOfRange {
                lpi: m.lpi.intid(),
                first: Lpi::FIRST_INTID,
                limit: tables.limit(),
            })?;
        self.invalidate(device, event)
    }

    /// Makes collection `icid`'s redistributor re-read every LPI
    /// configuration (INVALL, then SYNC).
    pub fn invalidate_collection(&mut self, icid: u16) -> Result<(), ItsError> {
        let Some(&target) = self.collections.get(&icid) else {
            return Err(ItsError::CollectionNotMapped(icid));
        };
        self.run(&[ItsCommand::invall(icid), ItsCommand::sync(target)])?
            .into_result()
    }

    // ---- shutdown ---------------------------------------------------------------------

    /// Disables the ITS (every MSI dropped from then on), waits for
    /// quiescence, invalidates its queue and tables and frees their
    /// memory, ITTs included. If the ITS does not quiesce, nothing is
    /// freed (it may still read the tables) and the timeout is returned.
    pub fn shut_down(self) -> Result<(), ItsError> {
        let hw = self.hw();
        regs::CTLR.write(self.mmio, 0);
        Self::disable(&hw)?;
        Self::invalidate_registers(&hw, &self.tables);
        for d in self.devices.into_values() {
            d.itt.free(self.mem);
        }
        for b in self.device_table.l2.into_values() {
            b.free(self.mem);
        }
        self.device_table.root.free(self.mem);
        if let Some(b) = self.collection_table {
            b.free(self.mem);
        }
        self.cmdq_block.free(self.mem);
        // After quiescence the ITS no longer reads anything: what a
        // timeout held back can go too.
        for b in self.quarantine {
            b.free(self.mem);
        }
        Ok(())
    }
}

/// The device table layout for an ITS (see [`DeviceTableRequest`]): the
/// smallest page size GITS_BASER accepts, DeviceIDs capped by
/// `max_device_bits`, and — where a table for every DeviceID would exceed
/// the 256 pages a GITS_BASER can describe — fewer DeviceID bits, with a
/// warning (the rest are refused by [`ItsUnit::map_device`]).
pub fn plan_device_table(
    caps: &ItsCaps,
    table: &TableCaps,
    config: &ItsConfig,
) -> Result<DeviceTableLayout, ItsError> {
    let page_size = table
        .page_sizes
        .smallest()
        .ok_or(ItsError::Unsupported("any GITS_BASER page size"))?;
    let page = page_size.bytes();
    let entry = u64::from(table.entry_bytes);
    if entry == 0 || entry > page {
        return Err(ItsError::Unsupported("the device table entry size"));
    }
    let wanted = config
        .max_device_bits
        .map_or(caps.device_bits, |m| m.min(caps.device_bits))
        .min(32);
    let flat_pages = |bits: u32| ((1u64 << bits) * entry).div_ceil(page);
    let indirect = match config.device_table {
        DeviceTableRequest::Indirect if !table.indirect => {
            return Err(ItsError::Unsupported(
                "two-level device tables (GITS_BASER.Indirect)",
            ));
        }
        DeviceTableRequest::Indirect => true,
        DeviceTableRequest::Flat => false,
        DeviceTableRequest::Auto => table.indirect && flat_pages(wanted) > 1,
    };
    let mut bits = wanted;
    let layout = if indirect {
        let ids_per_l2 = page / entry;
        let l1_pages = |bits: u32| {
            ((1u64 << bits).div_ceil(ids_per_l2) * baser::L1_ENTRY_BYTES).div_ceil(page)
        };
        while l1_pages(bits) > baser::MAX_PAGES {
            bits -= 1;
        }
        DeviceTableLayout::Indirect {
            device_bits: bits,
            page_size,
            l1_pages: l1_pages(bits),
            ids_per_l2,
        }
    } else {
        while flat_pages(bits) > baser::MAX_PAGES {
            bits -= 1;
        }
        DeviceTableLayout::Flat {
            device_bits: bits,
            page_size,
            pages: flat_pages(bits),
        }
    };
    if bits < wanted {
        log::warn!(
            "its{}: the device table covers DeviceIDs below {:#x} of {:#x}; the others are \
             refused",
            config.index,
            1u64 << bits,
            1u64 << wanted
        );
    }
    Ok(layout)
}
