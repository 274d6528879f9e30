//! A register and command-queue model of an ITS, for host tests of the
//! driver (and of code built on it).
//!
//! [`ItsModel`] implements [`Mmio`] over the two ITS frames with a
//! configurable GITS_TYPER ([`TyperBuilder`]) and table descriptors
//! ([`ItsModelConfig`]) and behaves, synchronously, like the hardware IHI
//! 0069 describes:
//!
//! * GITS_CTLR.Quiescent is 0 while the ITS is enabled and for a
//!   configurable number of reads after it is disabled (or forever);
//!   `GITS_BASER<n>`/GITS_CBASER written while it is enabled or not
//!   quiescent are flagged ([`ItsModel::violations`]) — UNPREDICTABLE on
//!   hardware (12.19.1-2). Writing GITS_CBASER clears GITS_CREADR;
//! * each `GITS_BASER<n>` keeps Type and Entry_Size read-only, accepts only
//!   the page sizes and the Indirect bit the configuration allows (the
//!   way probing finds them), and Shareability only on a snooping ITS;
//! * writing GITS_CWRITER while enabled runs the queue: every command is
//!   decoded and checked like hardware does (DeviceID beyond Devbits or the
//!   device table, ITT size beyond ID_bits, ICID beyond the collections,
//!   unknown RDbase, unmapped device / event / collection, pINTID out of
//!   range). A bad command stalls the queue (GITS_CREADR.Stalled, CREADR
//!   left at it) until software writes GITS_CWRITER.Retry, or — as QEMU
//!   does for bad parameters — is ignored. The queue can be throttled or
//!   stuck, and a stall injected;
//! * mappings live in the memory software gave the ITS, in the model's own
//!   entry formats (the spec leaves them IMPLEMENTATION DEFINED): device
//!   table entries (flat or through level-1 descriptors), ITT entries,
//!   collection table entries — so a table that is too small, a level-2
//!   page that is missing or an ITT that was freed shows up as it would;
//! * [`ItsModel::msi_write`] is a device's write to GITS_TRANSLATER: it is
//!   translated through those tables and delivered to the
//!   [`RedistModel`], which sets the LPI's pending bit.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::RefCell;

use sluice_hal::{DmaMemory, Mmio, PhysAddr};

use super::caps::{ItsCaps, PageSizes, TyperBuilder};
use super::commands::{Decoded, ItsCommand};
use super::regs::{self, ItsPageSize, TableType, baser, cbaser, ctlr, queue};
use crate::lpi::Lpi;
use crate::redist::model::{Delivery, RedistModel};

/// One `GITS_BASER<n>` of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelTable {
    pub kind: TableType,
    /// Bytes per entry (at least 8: the model's entries are one word).
    /// The ITT entry size (GITS_TYPER) must likewise be at least 8 and a
    /// multiple of 4.
    pub entry_bytes: u32,
    /// Page sizes Page_Size accepts; a single one makes it read-only.
    pub page_sizes: PageSizes,
    /// Whether Indirect can be set.
    pub indirect: bool,
}

impl ModelTable {
    pub const fn new(kind: TableType, entry_bytes: u32) -> Self {
        Self {
            kind,
            entry_bytes,
            page_sizes: PageSizes::only(ItsPageSize::Size4K)
                .with(ItsPageSize::Size16K)
                .with(ItsPageSize::Size64K),
            indirect: true,
        }
    }
}

/// How the modelled ITS is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItsModelConfig {
    pub typer: TyperBuilder,
    pub tables: [Option<ModelTable>; regs::BASER_COUNT],
    /// INTID bits a pINTID must fit (the distributor's).
    pub lpi_id_bits: u32,
    /// Command errors stall the queue; otherwise the command is ignored.
    pub stall_on_error: bool,
    /// Shareability fields keep what is written (the ITS snoops).
    pub shareable: bool,
}

impl ItsModelConfig {
    /// QEMU 7.2's ITS: GITS_BASER0 the device table, GITS_BASER1 the
    /// collection table, 8-byte entries, every page size and Indirect
    /// writable; bad command parameters stall here (QEMU ignores them,
    /// see [`ItsModelConfig::stall_on_error`]).
    pub const fn qemu_7_2() -> Self {
        let mut tables = [None; regs::BASER_COUNT];
        tables[0] = Some(ModelTable::new(TableType::Devices, 8));
        tables[1] = Some(ModelTable::new(TableType::Collections, 8));
        Self {
            typer: TyperBuilder::qemu_7_2(),
            tables,
            lpi_id_bits: 16,
            stall_on_error: true,
            shareable: true,
        }
    }

    /// The same with every table descriptor accepting only `size` pages
    /// and no Indirect.
    pub const fn fixed_pages(mut self, size: ItsPageSize, indirect: bool) -> Self {
        let mut i = 0;
        while i < regs::BASER_COUNT {
            if let Some(mut t) = self.tables[i] {
                t.page_sizes = PageSizes::only(size);
                t.indirect = indirect;
                self.tables[i] = Some(t);
            }
            i += 1;
        }
        self
    }
}

/// Why the model refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandFault {
    UnknownCommand,
    /// [`ItsModel::fail_next`] asked for it.
    Injected,
    /// DeviceID beyond Devbits or what the device table covers (or its
    /// level-1 entry is not valid).
    DeviceOutOfRange,
    /// MAPD Size beyond GITS_TYPER.ID_bits.
    IttSizeOutOfRange,
    /// ICID beyond the collection IDs or the collection table.
    CollectionOutOfRange,
    /// RDbase names no redistributor.
    RdBaseOutOfRange,
    UnmappedDevice,
    EventOutOfRange,
    UnmappedEvent,
    UnmappedCollection,
    /// pINTID not an LPI of this system.
    PhysicalIdOutOfRange,
}

/// Why a device's MSI produced nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    ItsDisabled,
    DeviceOutOfRange,
    UnmappedDevice,
    EventOutOfRange,
    UnmappedEvent,
    UnmappedCollection,
    /// The target redistributor has EnableLPIs = 0.
    LpisDisabled,
    /// The LPI is beyond what the target redistributor's tables cover.
    LpiOutOfRange,
}

/// What a device's write to GITS_TRANSLATER did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiOutcome {
    /// LPI `lpi` is pending on redistributor `cpu`; `forwarded` when it is
    /// enabled in the configuration the redistributor uses.
    Pending {
        cpu: usize,
        lpi: u32,
        forwarded: bool,
    },
    Dropped(DropReason),
}

/// Something the model saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItsModelEvent {
    Ctlr(u32),
    Cbaser(u64),
    Cwriter(u64),
    Baser(usize, u64),
    /// A command was consumed.
    Command(ItsCommand),
    /// A command was refused; the queue stalled at it or went on.
    Refused {
        command: ItsCommand,
        fault: CommandFault,
        stalled: bool,
    },
}

/// Parts of the model that can be made slow or stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ItsQuirks {
    /// Quiescent reads 0 this many more times after the ITS is disabled.
    pub quiesce_delay: u32,
    /// Quiescent never comes back after disabling.
    pub never_quiesce: bool,
    /// GITS_CREADR never moves.
    pub stuck_queue: bool,
    /// At most this many commands are consumed per GITS_CREADR read (and
    /// none on GITS_CWRITER writes), so software sees a full queue.
    pub throttle: Option<u32>,
}

/// A device table entry in the model's format: bit 0 valid, bits 5:1
/// EventID bits − 1, bits 51:8 the ITT address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dte {
    event_bits: u32,
    itt: u64,
}

/// An ITT entry in the model's format: bit 0 valid, bits 16:1 ICID, bits
/// 48:17 the LPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Itte {
    lpi: u32,
    icid: u16,
}

struct State {
    enabled: bool,
    /// Reads of GITS_CTLR left before Quiescent reads 1 (`None`: never).
    busy_reads: Option<u32>,
    cbaser: u64,
    cwriter: u64,
    creadr: u64,
    stalled: bool,
    baser: [u64; regs::BASER_COUNT],
    /// Collections held in the ITS (ICIDs below HCC): RDbase fields.
    hw_collections: BTreeMap<u16, u64>,
    quirks: ItsQuirks,
    fail_next: Option<u8>,
    events: Vec<ItsModelEvent>,
    violations: Vec<&'static str>,
}

/// The model. See the module documentation.
pub struct ItsModel<'m> {
    mem: &'m dyn DmaMemory,
    redist: &'m RedistModel<'m>,
    config: ItsModelConfig,
    caps: ItsCaps,
    state: RefCell<State>,
}

/// Where [`ItsModel::preset_firmware`] puts firmware's structures.
pub const FIRMWARE_MEMORY: u64 = 0x4000_0000;
/// The device firmware left mapped (EventID 0 → LPI 8192, ICID 0).
pub const FIRMWARE_DEVICE: u32 = 0x10;

impl<'m> ItsModel<'m> {
    /// An ITS built as `config` whose tables live in `mem` and which
    /// delivers to `redist`. Out of reset: disabled and quiescent, every
    /// table invalid.
    pub fn new(
        mem: &'m dyn DmaMemory,
        redist: &'m RedistModel<'m>,
        config: ItsModelConfig,
    ) -> Self {
        let mut baser_reset = [0u64; regs::BASER_COUNT];
        for (n, t) in config.tables.iter().enumerate() {
            if let Some(t) = t {
                baser_reset[n] = (t.kind.field() << baser::TYPE_SHIFT)
                    | ((u64::from(t.entry_bytes) - 1) << baser::ENTRY_SIZE_SHIFT)
                    | (t.page_sizes
                        .smallest()
                        .unwrap_or(ItsPageSize::Size4K)
                        .field()
                        << baser::PAGE_SIZE_SHIFT);
            }
        }
        Self {
            mem,
            redist,
            config,
            caps: config.typer.caps(),
            state: RefCell::new(State {
                enabled: false,
                busy_reads: Some(0),
                cbaser: 0,
                cwriter: 0,
                creadr: 0,
                stalled: false,
                baser: baser_reset,
                hw_collections: BTreeMap::new(),
                quirks: ItsQuirks::default(),
                fail_next: None,
                events: Vec::new(),
                violations: Vec::new(),
            }),
        }
    }

    pub const fn caps(&self) -> &ItsCaps {
        &self.caps
    }

    // ---- test controls ------------------------------------------------------

    pub fn set_quirks(&self, quirks: ItsQuirks) {
        self.state.borrow_mut().quirks = quirks;
    }

    /// The next command with command number `op` is refused
    /// ([`CommandFault::Injected`]).
    pub fn fail_next(&self, op: u8) {
        self.state.borrow_mut().fail_next = Some(op);
    }

    /// Puts the ITS in the state firmware may leave it in: enabled and
    /// busy, with its own command queue, device table and collection table
    /// at [`FIRMWARE_MEMORY`] and [`FIRMWARE_DEVICE`]'s EventID 0 mapped to
    /// LPI 8192 in collection 0, which targets redistributor 0.
    pub fn preset_firmware(&self) {
        let mut st = self.state.borrow_mut();
        let queue = FIRMWARE_MEMORY;
        let devices = FIRMWARE_MEMORY + 0x1_0000;
        let collections = FIRMWARE_MEMORY + 0x2_0000;
        let itt = FIRMWARE_MEMORY + 0x3_0000;
        st.cbaser = cbaser::VALID | queue;
        for (n, t) in self.config.tables.iter().enumerate() {
            let Some(t) = t else { continue };
            let base = match t.kind {
                TableType::Devices => devices,
                TableType::Collections => collections,
                _ => continue,
            };
            let page = t.page_sizes.smallest().unwrap_or(ItsPageSize::Size4K);
            st.baser[n] = baser::VALID
                | (st.baser[n] & !baser::PAGE_SIZE_MASK)
                | (page.field() << baser::PAGE_SIZE_SHIFT)
                | baser::encode_address(base, page.bytes());
        }
        let rd = if self.caps.pta {
            self.redist.base() & 0x000f_ffff_ffff_0000
        } else {
            0
        };
        let dte = Dte { event_bits: 1, itt };
        let _ = self.write_dte(&st, FIRMWARE_DEVICE, Some(dte));
        self.write_itte(
            dte,
            0,
            Some(Itte {
                lpi: Lpi::FIRST_INTID,
                icid: 0,
            }),
        );
        let _ = self.write_collection(&mut st, 0, Some(rd));
        st.enabled = true;
        st.busy_reads = Some(0);
    }

    // ---- observations -------------------------------------------------------

    pub fn events(&self) -> Vec<ItsModelEvent> {
        self.state.borrow().events.clone()
    }

    pub fn clear_events(&self) {
        self.state.borrow_mut().events.clear();
    }

    /// The commands consumed, oldest first.
    pub fn commands(&self) -> Vec<ItsCommand> {
        self.state
            .borrow()
            .events
            .iter()
            .filter_map(|e| match e {
                ItsModelEvent::Command(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    /// Programming errors the model detected (empty for a correct driver).
    pub fn violations(&self) -> Vec<&'static str> {
        self.state.borrow().violations.clone()
    }

    pub fn enabled(&self) -> bool {
        self.state.borrow().enabled
    }

    pub fn stalled(&self) -> bool {
        self.state.borrow().stalled
    }

    pub fn cbaser(&self) -> u64 {
        self.state.borrow().cbaser
    }

    pub fn baser(&self, n: usize) -> u64 {
        self.state.borrow().baser[n]
    }

    /// Byte offset GITS_CREADR holds.
    pub fn creadr(&self) -> u64 {
        self.state.borrow().creadr
    }

    /// The LPI and ICID (`device`, `event`) maps to, read from the tables.
    pub fn translation(&self, device: u32, event: u32) -> Option<(u32, u16)> {
        let st = self.state.borrow();
        self.lookup(&st, device, event)
            .ok()
            .map(|(_, i)| (i.lpi, i.icid))
    }

    /// The RDbase field collection `icid` targets, read from the ITS.
    pub fn collection(&self, icid: u16) -> Option<u64> {
        let st = self.state.borrow();
        self.read_collection(&st, icid).ok().flatten()
    }

    // ---- the device side ----------------------------------------------------

    /// A device with DeviceID `device` writes `event` to GITS_TRANSLATER
    /// (5.2 "The ITS": translation, then the LPI set pending at the
    /// collection's redistributor).
    pub fn msi_write(&self, device: u32, event: u32) -> MsiOutcome {
        let st = self.state.borrow();
        if !st.enabled {
            return MsiOutcome::Dropped(DropReason::ItsDisabled);
        }
        let itte = match self.lookup(&st, device, event) {
            Ok((_, i)) => i,
            Err(f) => {
                return MsiOutcome::Dropped(match f {
                    CommandFault::DeviceOutOfRange => DropReason::DeviceOutOfRange,
                    CommandFault::EventOutOfRange => DropReason::EventOutOfRange,
                    CommandFault::UnmappedEvent => DropReason::UnmappedEvent,
                    _ => DropReason::UnmappedDevice,
                });
            }
        };
        let Some(cpu) = self.collection_cpu(&st, itte.icid) else {
            return MsiOutcome::Dropped(DropReason::UnmappedCollection);
        };
        match self.redist.deliver(cpu, itte.lpi) {
            Delivery::Pending { cpu, forwarded } => MsiOutcome::Pending {
                cpu,
                lpi: itte.lpi,
                forwarded,
            },
            Delivery::LpisDisabled => MsiOutcome::Dropped(DropReason::LpisDisabled),
            Delivery::OutOfRange => MsiOutcome::Dropped(DropReason::LpiOutOfRange),
        }
    }

    // ---- tables in memory -----------------------------------------------------

    /// The valid `GITS_BASER<n>` describing `kind`, with its entry size.
    fn table(&self, st: &State, kind: TableType) -> Option<(u64, u32)> {
        self.config
            .tables
            .iter()
            .enumerate()
            .find_map(|(n, t)| match t {
                Some(t) if t.kind == kind && st.baser[n] & baser::VALID != 0 => {
                    Some((st.baser[n], t.entry_bytes))
                }
                _ => None,
            })
    }

    /// Where entry `index` of the `kind` table is, or `None` when the
    /// table does not cover it.
    fn entry_addr(&self, st: &State, kind: TableType, index: u64) -> Option<u64> {
        let (raw, entry) = self.table(st, kind)?;
        let entry = u64::from(entry);
        let page = ItsPageSize::from_field(raw >> baser::PAGE_SIZE_SHIFT).bytes();
        let pages = (raw & baser::SIZE_MASK) + 1;
        let base = baser::decode_address(raw, page);
        if raw & baser::INDIRECT == 0 {
            let offset = index.checked_mul(entry)?;
            return (offset + entry <= pages * page).then_some(base + offset);
        }
        let per_page = page / entry;
        let l1_index = index / per_page;
        if (l1_index + 1) * baser::L1_ENTRY_BYTES > pages * page {
            return None;
        }
        let l1 = self
            .mem
            .read_u64(PhysAddr::new(base + l1_index * baser::L1_ENTRY_BYTES));
        if l1 & baser::L1_VALID == 0 {
            return None;
        }
        Some((l1 & baser::L1_ADDR_MASK) + (index % per_page) * entry)
    }

    fn dte_addr(&self, st: &State, device: u32) -> Result<u64, CommandFault> {
        if u64::from(device) >= self.caps.device_limit() {
            return Err(CommandFault::DeviceOutOfRange);
        }
        self.entry_addr(st, TableType::Devices, u64::from(device))
            .ok_or(CommandFault::DeviceOutOfRange)
    }

    fn read_dte(&self, st: &State, device: u32) -> Result<Option<Dte>, CommandFault> {
        let word = self.mem.read_u64(PhysAddr::new(self.dte_addr(st, device)?));
        Ok((word & 1 != 0).then_some(Dte {
            event_bits: ((word >> 1) & 0x1f) as u32 + 1,
            itt: word & 0x000f_ffff_ffff_ff00,
        }))
    }

    fn write_dte(&self, st: &State, device: u32, dte: Option<Dte>) -> Result<(), CommandFault> {
        let addr = self.dte_addr(st, device)?;
        let word = dte.map_or(0, |d| {
            1 | ((u64::from(d.event_bits) - 1) << 1) | (d.itt & 0x000f_ffff_ffff_ff00)
        });
        self.mem.write_u64(PhysAddr::new(addr), word);
        Ok(())
    }

    fn itte_addr(&self, dte: Dte, event: u32) -> PhysAddr {
        PhysAddr::new(dte.itt + u64::from(event) * u64::from(self.caps.itt_entry_bytes))
    }

    /// ITT entries are 4-byte multiples (12 bytes on QEMU), so an entry
    /// is read and written as two 32-bit halves.
    fn read_itte_word(&self, addr: PhysAddr) -> u64 {
        u64::from(self.mem.read_u32(addr))
            | (u64::from(self.mem.read_u32(PhysAddr::new(addr.as_u64() + 4))) << 32)
    }

    fn write_itte(&self, dte: Dte, event: u32, itte: Option<Itte>) {
        let word = itte.map_or(0, |i| {
            1 | (u64::from(i.icid) << 1) | (u64::from(i.lpi) << 17)
        });
        let addr = self.itte_addr(dte, event);
        self.mem.write_u32(addr, word as u32);
        self.mem
            .write_u32(PhysAddr::new(addr.as_u64() + 4), (word >> 32) as u32);
    }

    /// The device's DTE and the ITT entry of `event`.
    fn lookup(&self, st: &State, device: u32, event: u32) -> Result<(Dte, Itte), CommandFault> {
        let dte = self
            .read_dte(st, device)?
            .ok_or(CommandFault::UnmappedDevice)?;
        if u64::from(event) >= 1u64 << dte.event_bits {
            return Err(CommandFault::EventOutOfRange);
        }
        let word = self.read_itte_word(self.itte_addr(dte, event));
        if word & 1 == 0 {
            return Err(CommandFault::UnmappedEvent);
        }
        Ok((
            dte,
            Itte {
                icid: ((word >> 1) & 0xffff) as u16,
                lpi: ((word >> 17) & 0xffff_ffff) as u32,
            },
        ))
    }

    fn check_icid(&self, icid: u16) -> Result<(), CommandFault> {
        if u32::from(icid) >= self.caps.collection_limit() {
            return Err(CommandFault::CollectionOutOfRange);
        }
        Ok(())
    }

    fn read_collection(&self, st: &State, icid: u16) -> Result<Option<u64>, CommandFault> {
        self.check_icid(icid)?;
        if u32::from(icid) < self.caps.hcc {
            return Ok(st.hw_collections.get(&icid).copied());
        }
        let addr = self
            .entry_addr(st, TableType::Collections, u64::from(icid))
            .ok_or(CommandFault::CollectionOutOfRange)?;
        let word = self.mem.read_u64(PhysAddr::new(addr));
        Ok((word & 1 != 0).then_some(word & 0x000f_ffff_ffff_0000))
    }

    fn write_collection(
        &self,
        st: &mut State,
        icid: u16,
        rd: Option<u64>,
    ) -> Result<(), CommandFault> {
        self.check_icid(icid)?;
        if u32::from(icid) < self.caps.hcc {
            match rd {
                Some(rd) => st.hw_collections.insert(icid, rd),
                None => st.hw_collections.remove(&icid),
            };
            return Ok(());
        }
        let addr = self
            .entry_addr(st, TableType::Collections, u64::from(icid))
            .ok_or(CommandFault::CollectionOutOfRange)?;
        self.mem
            .write_u64(PhysAddr::new(addr), rd.map_or(0, |rd| 1 | rd));
        Ok(())
    }

    /// The redistributor collection `icid` targets, if mapped.
    fn collection_cpu(&self, st: &State, icid: u16) -> Option<usize> {
        let rd = self.read_collection(st, icid).ok().flatten()?;
        self.redist.resolve(rd, self.caps.pta)
    }

    // ---- commands -------------------------------------------------------------

    fn queue_bytes(st: &State) -> u64 {
        ((st.cbaser & cbaser::SIZE_MASK) + 1) * 4096
    }

    fn process(&self, st: &mut State, mut budget: Option<u32>) {
        loop {
            if !st.enabled || st.stalled || st.quirks.stuck_queue || st.cbaser & cbaser::VALID == 0
            {
                return;
            }
            let bytes = Self::queue_bytes(st);
            if st.creadr == st.cwriter || st.cwriter >= bytes {
                return;
            }
            if budget == Some(0) {
                return;
            }
            let slot = (st.cbaser & cbaser::ADDR_MASK) + st.creadr;
            let mut w = [0u64; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = self.mem.read_u64(PhysAddr::new(slot + 8 * i as u64));
            }
            let command = ItsCommand::from_words(w);
            let result = if st.fail_next == Some(command.opcode()) {
                st.fail_next = None;
                Err(CommandFault::Injected)
            } else {
                self.execute(st, command)
            };
            match result {
                Ok(()) => st.events.push(ItsModelEvent::Command(command)),
                Err(fault) => {
                    let stalled = self.config.stall_on_error;
                    st.events.push(ItsModelEvent::Refused {
                        command,
                        fault,
                        stalled,
                    });
                    if stalled {
                        st.stalled = true;
                        return;
                    }
                }
            }
            st.creadr = (st.creadr + queue::COMMAND_BYTES) % bytes;
            if let Some(b) = budget.as_mut() {
                *b -= 1;
            }
        }
    }

    fn execute(&self, st: &mut State, command: ItsCommand) -> Result<(), CommandFault> {
        let decoded = command.decode().map_err(|_| CommandFault::UnknownCommand)?;
        let pta = self.caps.pta;
        match decoded {
            Decoded::Mapd {
                device,
                event_bits,
                itt,
                valid,
            } => {
                let dte = if valid {
                    if event_bits > self.caps.event_bits {
                        return Err(CommandFault::IttSizeOutOfRange);
                    }
                    Some(Dte { event_bits, itt })
                } else {
                    None
                };
                self.write_dte(st, device, dte)
            }
            Decoded::Mapc { icid, rd, valid } => {
                if valid && self.redist.resolve(rd, pta).is_none() {
                    self.check_icid(icid)?;
                    return Err(CommandFault::RdBaseOutOfRange);
                }
                self.write_collection(st, icid, valid.then_some(rd))
            }
            Decoded::Mapti {
                device,
                event,
                lpi,
                icid,
            } => self.map_event(st, device, event, lpi, icid),
            Decoded::Mapi {
                device,
                event,
                icid,
            } => self.map_event(st, device, event, event, icid),
            Decoded::Inv { device, event } => {
                let (_, itte) = self.lookup(st, device, event)?;
                let cpu = self
                    .collection_cpu(st, itte.icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                self.redist.invalidate(cpu, itte.lpi);
                Ok(())
            }
            Decoded::Invall { icid } => {
                self.check_icid(icid)?;
                let cpu = self
                    .collection_cpu(st, icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                self.redist.invalidate_all(cpu);
                Ok(())
            }
            Decoded::Sync { rd } => self
                .redist
                .resolve(rd, pta)
                .map(|_| ())
                .ok_or(CommandFault::RdBaseOutOfRange),
            Decoded::Discard { device, event } => {
                let (dte, itte) = self.lookup(st, device, event)?;
                let cpu = self
                    .collection_cpu(st, itte.icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                self.redist.clear_pending(cpu, itte.lpi);
                self.write_itte(dte, event, None);
                Ok(())
            }
            Decoded::Clear { device, event } => {
                let (_, itte) = self.lookup(st, device, event)?;
                let cpu = self
                    .collection_cpu(st, itte.icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                self.redist.clear_pending(cpu, itte.lpi);
                Ok(())
            }
            Decoded::Int { device, event } => {
                let (_, itte) = self.lookup(st, device, event)?;
                let cpu = self
                    .collection_cpu(st, itte.icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                self.redist.deliver(cpu, itte.lpi);
                Ok(())
            }
            Decoded::Movi {
                device,
                event,
                icid,
            } => {
                let (dte, itte) = self.lookup(st, device, event)?;
                let from = self
                    .collection_cpu(st, itte.icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                self.check_icid(icid)?;
                let to = self
                    .collection_cpu(st, icid)
                    .ok_or(CommandFault::UnmappedCollection)?;
                if self.redist.is_pending(from, itte.lpi) {
                    self.redist.clear_pending(from, itte.lpi);
                    self.redist.deliver(to, itte.lpi);
                }
                self.write_itte(dte, event, Some(Itte { icid, ..itte }));
                Ok(())
            }
            Decoded::Movall { from, to } => {
                self.redist
                    .resolve(from, pta)
                    .ok_or(CommandFault::RdBaseOutOfRange)?;
                self.redist
                    .resolve(to, pta)
                    .ok_or(CommandFault::RdBaseOutOfRange)?;
                Ok(())
            }
        }
    }

    fn map_event(
        &self,
        st: &State,
        device: u32,
        event: u32,
        lpi: u32,
        icid: u16,
    ) -> Result<(), CommandFault> {
        let dte = self
            .read_dte(st, device)?
            .ok_or(CommandFault::UnmappedDevice)?;
        if u64::from(event) >= 1u64 << dte.event_bits {
            return Err(CommandFault::EventOutOfRange);
        }
        self.check_icid(icid)?;
        if lpi < Lpi::FIRST_INTID || u64::from(lpi) >= 1u64 << self.config.lpi_id_bits {
            return Err(CommandFault::PhysicalIdOutOfRange);
        }
        self.write_itte(dte, event, Some(Itte { lpi, icid }));
        Ok(())
    }

    // ---- registers --------------------------------------------------------------

    fn quiescent(st: &State) -> bool {
        !st.enabled && st.busy_reads == Some(0)
    }

    fn read_ctlr(&self) -> u32 {
        let mut st = self.state.borrow_mut();
        let mut value = if st.enabled { ctlr::ENABLED } else { 0 };
        if Self::quiescent(&st) {
            value |= ctlr::QUIESCENT;
        } else if !st.enabled
            && let Some(n) = st.busy_reads.as_mut()
        {
            *n -= 1;
        }
        value
    }

    fn write_ctlr(&self, value: u32) {
        let mut st = self.state.borrow_mut();
        st.events.push(ItsModelEvent::Ctlr(value));
        let enable = value & ctlr::ENABLED != 0;
        if enable && !st.enabled {
            st.enabled = true;
            if st.quirks.throttle.is_none() {
                self.process(&mut st, None);
            }
        } else if !enable && st.enabled {
            st.enabled = false;
            st.busy_reads = if st.quirks.never_quiesce {
                None
            } else {
                Some(st.quirks.quiesce_delay)
            };
        }
    }

    fn write_baser(&self, n: usize, value: u64) {
        let mut st = self.state.borrow_mut();
        st.events.push(ItsModelEvent::Baser(n, value));
        let Some(t) = self.config.tables[n] else {
            return;
        };
        if !Self::quiescent(&st) {
            st.violations.push(
                "GITS_BASER<n> written while the ITS is enabled or not quiescent (UNPREDICTABLE)",
            );
        }
        let ro = (baser::TYPE_MASK << baser::TYPE_SHIFT)
            | (baser::ENTRY_SIZE_MASK << baser::ENTRY_SIZE_SHIFT);
        let mut v = (value & !ro) | (st.baser[n] & ro);
        let size = ItsPageSize::from_field(value >> baser::PAGE_SIZE_SHIFT);
        if !t.page_sizes.contains(size) {
            v = (v & !baser::PAGE_SIZE_MASK) | (st.baser[n] & baser::PAGE_SIZE_MASK);
        }
        if !t.indirect {
            v &= !baser::INDIRECT;
        }
        if !self.config.shareable {
            v &= !baser::SHAREABILITY_MASK;
        }
        st.baser[n] = v;
    }

    fn write_cbaser(&self, value: u64) {
        let mut st = self.state.borrow_mut();
        st.events.push(ItsModelEvent::Cbaser(value));
        if !Self::quiescent(&st) {
            st.violations.push(
                "GITS_CBASER written while the ITS is enabled or not quiescent (UNPREDICTABLE)",
            );
        }
        let mut v = value;
        if !self.config.shareable {
            v &= !cbaser::SHAREABILITY_MASK;
        }
        st.cbaser = v;
        // 12.19.4: writing GITS_CBASER clears GITS_CREADR.
        st.creadr = 0;
        st.stalled = false;
    }

    fn write_cwriter(&self, value: u64) {
        let mut st = self.state.borrow_mut();
        st.events.push(ItsModelEvent::Cwriter(value));
        let offset = value & queue::OFFSET_MASK;
        if offset >= Self::queue_bytes(&st) {
            st.violations
                .push("GITS_CWRITER beyond the command queue (CONSTRAINED UNPREDICTABLE)");
        }
        st.cwriter = offset;
        if value & queue::RETRY != 0 {
            st.stalled = false;
        }
        if st.quirks.throttle.is_none() {
            self.process(&mut st, None);
        }
    }

    fn read_creadr(&self) -> u64 {
        let mut st = self.state.borrow_mut();
        if let Some(n) = st.quirks.throttle {
            self.process(&mut st, Some(n));
        }
        st.creadr | if st.stalled { queue::STALLED } else { 0 }
    }

    fn read64_reg(&self, offset: usize) -> u64 {
        match offset {
            0x0008 => self.config.typer.raw(),
            0x0080 => self.state.borrow().cbaser,
            0x0088 => self.state.borrow().cwriter,
            0x0090 => self.read_creadr(),
            o if (0x0100..0x0140).contains(&o) && o % 8 == 0 => {
                self.state.borrow().baser[(o - 0x100) / 8]
            }
            _ => 0,
        }
    }
}

impl Mmio for ItsModel<'_> {
    fn read32(&self, offset: usize) -> u32 {
        match offset {
            0x0000 => self.read_ctlr(),
            0x0004 => 0x0000_043b,
            0xffe8 => {
                if self.config.typer.virtual_lpis {
                    0x4 << 4
                } else {
                    0x3 << 4
                }
            }
            o => (self.read64_reg(o & !7) >> ((o & 4) * 8)) as u32,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        match offset {
            0x0000 => self.write_ctlr(value),
            o if o == regs::TRANSLATER.offset() => {
                // A CPU's write carries an IMPLEMENTATION DEFINED
                // DeviceID; the model has none to translate.
            }
            _ => self
                .state
                .borrow_mut()
                .violations
                .push("32-bit write to a 64-bit ITS register (the model takes whole ones)"),
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        self.read64_reg(offset)
    }

    fn write64(&self, offset: usize, value: u64) {
        match offset {
            0x0080 => self.write_cbaser(value),
            0x0088 => self.write_cwriter(value),
            o if (0x0100..0x0140).contains(&o) && o % 8 == 0 => {
                self.write_baser((o - 0x100) / 8, value)
            }
            _ => {}
        }
    }
}
