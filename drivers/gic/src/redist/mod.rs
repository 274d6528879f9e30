//! The redistributors' LPI side (Arm IHI 0069, 5.1 "LPIs", 12.10-12.11
//! the GICR_* registers).
//!
//! Every PE has a redistributor: a run of 64 KiB frames in the GICR
//! region — RD_base (control, GICR_TYPER, the LPI table bases) and
//! SGI_base, plus VLPI_base and a reserved frame when the redistributor
//! supports direct injection of virtual LPIs (GICR_TYPER.VLPIS, GICv4);
//! GICR_TYPER.Last marks the final redistributor of a region (12.10,
//! "Redistributor register map").
//!
//! LPIs need two tables in memory (5.1.1, 5.1.2):
//! * one **configuration table** shared by every redistributor
//!   (GICR_PROPBASER): a byte per LPI from INTID 8192 up — priority and
//!   enable — which redistributors may cache, so a change needs an INV
//!   (through the ITS) before it is sure to apply;
//! * a **pending table** per redistributor (GICR_PENDBASER): a bit per
//!   INTID from 0, 64 KiB aligned, zero at first (the first 1 KiB is
//!   IMPLEMENTATION DEFINED and must start zeroed).
//!
//! Once GICR_CTLR.EnableLPIs is 1, changing PROPBASER or PENDBASER is
//! UNPREDICTABLE (12.11.x), and whether EnableLPIs can be cleared again is
//! IMPLEMENTATION DEFINED; so a redistributor firmware left with LPIs on
//! is reported, not silently reprogrammed.

pub mod model;

use alloc::vec::Vec;
use core::fmt;

use sluice_hal::{Clock, DmaMemory, Mmio, PhysAddr, ReadOnly, ReadWrite, Reg32, Reg64, poll_until};

use crate::its::RdBase;
use crate::its::regs::{cache, share};
use crate::lpi::Lpi;
use crate::memory::Block;

/// Bytes of one redistributor frame.
pub const FRAME_BYTES: usize = 0x1_0000;

/// GICR_CTLR (12.11.2), in RD_base.
pub const CTLR: Reg32<ReadWrite> = Reg32::new(0x0000);
/// GICR_IIDR (12.11.16).
pub const IIDR: Reg32<ReadOnly> = Reg32::new(0x0004);
/// GICR_TYPER (12.11.37), 64 bits.
pub const TYPER: Reg64<ReadOnly> = Reg64::new(0x0008);
/// GICR_WAKER (12.11.38).
pub const WAKER: Reg32<ReadWrite> = Reg32::new(0x0014);
/// GICR_PROPBASER (12.11.29): the LPI configuration table.
pub const PROPBASER: Reg64<ReadWrite> = Reg64::new(0x0070);
/// GICR_PENDBASER (12.11.28): this redistributor's pending table.
pub const PENDBASER: Reg64<ReadWrite> = Reg64::new(0x0078);

/// GICR_CTLR bits.
pub mod ctlr {
    /// EnableLPIs.
    pub const ENABLE_LPIS: u32 = 1 << 0;
    /// RWP: a write (among them EnableLPIs 1 → 0) is still taking effect.
    pub const RWP: u32 = 1 << 3;
}

/// GICR_TYPER fields.
pub mod typer {
    /// PLPIS: physical LPIs.
    pub const PLPIS: u64 = 1 << 0;
    /// VLPIS: virtual LPIs; the redistributor has four frames.
    pub const VLPIS: u64 = 1 << 1;
    /// DirectLPI: GICR_SETLPIR and friends.
    pub const DIRECT_LPI: u64 = 1 << 3;
    /// Last: the last redistributor of the region.
    pub const LAST: u64 = 1 << 4;
    /// Processor_Number, bits 23:8: the RDbase ITS commands use with
    /// GITS_TYPER.PTA = 0.
    pub const PROCESSOR_SHIFT: u32 = 8;
    pub const PROCESSOR_MASK: u64 = 0xffff;
    /// Affinity_Value, bits 63:32: Aff3.Aff2.Aff1.Aff0 of the PE.
    pub const AFFINITY_SHIFT: u32 = 32;
}

/// GICR_WAKER bits.
pub mod waker {
    pub const PROCESSOR_SLEEP: u32 = 1 << 1;
    pub const CHILDREN_ASLEEP: u32 = 1 << 2;
}

/// GICR_PROPBASER / GICR_PENDBASER fields.
pub mod baser {
    /// PROPBASER.IDbits, bits 4:0: INTID bits, minus one.
    pub const ID_BITS_MASK: u64 = 0x1f;
    /// InnerCache, bits 9:7.
    pub const INNER_CACHE_SHIFT: u32 = 7;
    pub const INNER_CACHE_MASK: u64 = 0b111 << INNER_CACHE_SHIFT;
    /// Shareability, bits 11:10.
    pub const SHAREABILITY_SHIFT: u32 = 10;
    pub const SHAREABILITY_MASK: u64 = 0b11 << SHAREABILITY_SHIFT;
    /// PROPBASER.Physical_Address, bits 51:12.
    pub const PROP_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// PENDBASER.Physical_Address, bits 51:16: the table is 64 KiB
    /// aligned.
    pub const PEND_ADDR_MASK: u64 = 0x000f_ffff_ffff_0000;
    /// OuterCache, bits 58:56.
    pub const OUTER_CACHE_SHIFT: u32 = 56;
    /// PENDBASER.PTZ: the pending table is all zeros (write-only; reads
    /// 0).
    pub const PTZ: u64 = 1 << 62;
    /// Pending tables are 64 KiB aligned.
    pub const PENDING_ALIGN: u64 = 0x1_0000;
}

/// `reg` of the redistributor whose RD_base is at `offset` in the region.
const fn in_frame32<A>(reg: Reg32<A>, offset: usize) -> Reg32<A> {
    Reg32::new(reg.offset() + offset)
}

const fn in_frame64<A>(reg: Reg64<A>, offset: usize) -> Reg64<A> {
    Reg64::new(reg.offset() + offset)
}

/// A PE's affinity as the GIC sees it: Aff3.Aff2.Aff1.Aff0 packed in 32
/// bits (GICR_TYPER.Affinity_Value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Affinity(pub u32);

impl Affinity {
    /// From MPIDR_EL1 (Aff0 7:0, Aff1 15:8, Aff2 23:16, Aff3 39:32).
    pub const fn from_mpidr(mpidr: u64) -> Self {
        Self(((mpidr & 0x00ff_ffff) | ((mpidr >> 8) & 0xff00_0000)) as u32)
    }
    pub const fn from_typer(typer_raw: u64) -> Self {
        Self((typer_raw >> typer::AFFINITY_SHIFT) as u32)
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        write!(
            f,
            "{}.{}.{}.{}",
            a >> 24,
            (a >> 16) & 0xff,
            (a >> 8) & 0xff,
            a & 0xff
        )
    }
}

/// One redistributor found in a GICR region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedistributorFrame {
    /// Offset of its RD_base frame in the region.
    pub offset: usize,
    pub typer: u64,
    pub affinity: Affinity,
    pub processor_number: u16,
    pub physical_lpis: bool,
    pub virtual_lpis: bool,
    pub last: bool,
}

impl RedistributorFrame {
    pub const fn decode(offset: usize, typer_raw: u64) -> Self {
        Self {
            offset,
            typer: typer_raw,
            affinity: Affinity::from_typer(typer_raw),
            processor_number: ((typer_raw >> typer::PROCESSOR_SHIFT) & typer::PROCESSOR_MASK)
                as u16,
            physical_lpis: typer_raw & typer::PLPIS != 0,
            virtual_lpis: typer_raw & typer::VLPIS != 0,
            last: typer_raw & typer::LAST != 0,
        }
    }

    /// Reads the redistributor whose RD_base is at `offset` of `mmio`.
    pub fn read(mmio: &dyn Mmio, offset: usize) -> Self {
        Self::decode(offset, in_frame64(TYPER, offset).read(mmio))
    }

    /// Frames this redistributor occupies: 2, or 4 with VLPIS (12.10).
    pub const fn frames(&self) -> usize {
        if self.virtual_lpis { 4 } else { 2 }
    }

    /// Bytes this redistributor occupies.
    pub const fn span(&self) -> usize {
        self.frames() * FRAME_BYTES
    }

    /// The physical address of its RD_base, in a region at
    /// `region_base`.
    pub const fn rd_base(&self, region_base: u64) -> u64 {
        region_base + self.offset as u64
    }

    /// How ITS commands name this redistributor, for an ITS with
    /// GITS_TYPER.PTA = `pta` (5.3: RDbase).
    pub const fn target(&self, region_base: u64, pta: bool) -> RdBase {
        if pta {
            RdBase::Address(self.rd_base(region_base))
        } else {
            RdBase::Processor(self.processor_number)
        }
    }
}

/// Why a redistributor could not be found or set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedistError {
    /// The region ended (after `scanned` redistributors) before one with
    /// GICR_TYPER.Last, or a redistributor would run past its end.
    NoLastFrame {
        region_bytes: usize,
        scanned: usize,
    },
    /// No redistributor of the region serves this PE.
    NotFound(Affinity),
    /// GICR_TYPER.PLPIS = 0.
    NoPhysicalLpis(Affinity),
    /// Firmware left LPIs enabled with tables Sluice does not own;
    /// reprogramming them is UNPREDICTABLE (12.11.28-29).
    LpisEnabledByFirmware {
        affinity: Affinity,
        propbaser: u64,
        pendbaser: u64,
    },
    /// GICR_CTLR.EnableLPIs stayed 1 after writing 0 (clearing it is
    /// IMPLEMENTATION DEFINED).
    CannotDisableLpis(Affinity),
    /// LPI INTID bits must be 14..=32 (and what the distributor allows).
    IdBitsOutOfRange(u32),
    LpiOutOfRange {
        lpi: u32,
        limit: u64,
    },
    OutOfMemory {
        what: &'static str,
        bytes: u64,
    },
    RegisterRejected {
        what: &'static str,
        wrote: u64,
        read: u64,
    },
    Timeout {
        what: &'static str,
        waited_ns: u64,
    },
}

impl fmt::Display for RedistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoLastFrame {
                region_bytes,
                scanned,
            } => write!(
                f,
                "the {region_bytes:#x}-byte GICR region ends after {scanned} redistributors \
                 without one marked Last"
            ),
            Self::NotFound(a) => write!(f, "no redistributor for the PE with affinity {a}"),
            Self::NoPhysicalLpis(a) => {
                write!(f, "the redistributor of PE {a} has no physical LPIs")
            }
            Self::LpisEnabledByFirmware {
                affinity,
                propbaser,
                pendbaser,
            } => write!(
                f,
                "firmware left LPIs enabled on the redistributor of PE {affinity} (PROPBASER \
                 {propbaser:#x}, PENDBASER {pendbaser:#x}); its tables cannot be replaced"
            ),
            Self::CannotDisableLpis(a) => write!(
                f,
                "the redistributor of PE {a} keeps LPIs enabled (EnableLPIs cannot be cleared)"
            ),
            Self::IdBitsOutOfRange(bits) => write!(f, "{bits} LPI INTID bits: need 14 to 32"),
            Self::LpiOutOfRange { lpi, limit } => {
                write!(f, "LPI {lpi} is not in 8192..{limit}")
            }
            Self::OutOfMemory { what, bytes } => {
                write!(
                    f,
                    "could not allocate {bytes} bytes of memory for the {what}"
                )
            }
            Self::RegisterRejected { what, wrote, read } => {
                write!(f, "{what}: wrote {wrote:#x}, read back {read:#x}")
            }
            Self::Timeout { what, waited_ns } => write!(
                f,
                "the redistributor did not complete {what} within {} us",
                waited_ns / 1000
            ),
        }
    }
}

/// Every redistributor of the GICR region `mmio` (`region_bytes` long),
/// walking frames by GICR_TYPER.VLPIS until GICR_TYPER.Last. A region that
/// ends first is an error, so a missing Last bit cannot run the walk into
/// other memory.
pub fn walk_frames(
    mmio: &dyn Mmio,
    region_bytes: usize,
) -> Result<Vec<RedistributorFrame>, RedistError> {
    let mut frames = Vec::new();
    let mut offset = 0usize;
    loop {
        // At least RD_base and SGI_base must be in the region.
        let fits = |span: usize| {
            offset
                .checked_add(span)
                .is_some_and(|end| end <= region_bytes)
        };
        if !fits(2 * FRAME_BYTES) {
            return Err(RedistError::NoLastFrame {
                region_bytes,
                scanned: frames.len(),
            });
        }
        let frame = RedistributorFrame::read(mmio, offset);
        if !fits(frame.span()) {
            return Err(RedistError::NoLastFrame {
                region_bytes,
                scanned: frames.len(),
            });
        }
        frames.push(frame);
        if frame.last {
            return Ok(frames);
        }
        offset += frame.span();
    }
}

/// The redistributor of the PE with `affinity` in the GICR region.
pub fn find_frame(
    mmio: &dyn Mmio,
    region_bytes: usize,
    affinity: Affinity,
) -> Result<RedistributorFrame, RedistError> {
    walk_frames(mmio, region_bytes)?
        .into_iter()
        .find(|f| f.affinity == affinity)
        .ok_or(RedistError::NotFound(affinity))
}

/// An LPI's configuration byte (5.1.1: priority in bits 7:2, bit 1 RES1,
/// Enable in bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpiConfig {
    pub enabled: bool,
    /// The priority; only bits 7:2 are kept.
    pub priority: u8,
}

impl LpiConfig {
    const ENABLE: u8 = 1 << 0;
    const RES1: u8 = 1 << 1;

    pub const fn enabled(priority: u8) -> Self {
        Self {
            enabled: true,
            priority,
        }
    }
    pub const fn disabled() -> Self {
        Self {
            enabled: false,
            priority: 0xa0,
        }
    }
    pub const fn byte(self) -> u8 {
        (self.priority & 0xfc) | Self::RES1 | if self.enabled { Self::ENABLE } else { 0 }
    }
    pub const fn from_byte(byte: u8) -> Self {
        Self {
            enabled: byte & Self::ENABLE != 0,
            priority: byte & 0xfc,
        }
    }
}

fn read_byte(mem: &dyn DmaMemory, addr: u64) -> u8 {
    (mem.read_u64(PhysAddr::new(addr & !7)) >> ((addr & 7) * 8)) as u8
}

fn write_byte(mem: &dyn DmaMemory, addr: u64, value: u8) {
    let word_addr = PhysAddr::new(addr & !7);
    let shift = (addr & 7) * 8;
    let word = mem.read_u64(word_addr);
    mem.write_u64(
        word_addr,
        (word & !(0xffu64 << shift)) | (u64::from(value) << shift),
    );
}

/// The LPI configuration table every redistributor shares.
pub struct LpiTables<'a> {
    mem: &'a dyn DmaMemory,
    id_bits: u32,
    table: Block,
}

impl<'a> LpiTables<'a> {
    /// A configuration table for `id_bits`-bit INTIDs (see
    /// [`DistributorInfo::lpi_id_bits`](crate::dist::DistributorInfo::lpi_id_bits)),
    /// every LPI disabled: 2^`id_bits` − 8192 bytes, contiguous.
    pub fn new(mem: &'a dyn DmaMemory, id_bits: u32) -> Result<Self, RedistError> {
        if !(Lpi::MIN_ID_BITS..=32).contains(&id_bits) {
            return Err(RedistError::IdBitsOutOfRange(id_bits));
        }
        let bytes = (1u64 << id_bits) - u64::from(Lpi::FIRST_INTID);
        let table = Block::alloc(mem, bytes, 0x1000).map_err(|_| RedistError::OutOfMemory {
            what: "LPI configuration table",
            bytes,
        })?;
        // Zero (every LPI disabled) is what the allocator handed out; a
        // non-snooping redistributor must see that too.
        mem.flush_for_device(table.start, table.bytes());
        Ok(Self {
            mem,
            id_bits,
            table,
        })
    }

    pub const fn id_bits(&self) -> u32 {
        self.id_bits
    }

    /// INTIDs at or above this are not LPIs here.
    pub const fn limit(&self) -> u64 {
        1u64 << self.id_bits
    }

    pub const fn base(&self) -> PhysAddr {
        self.table.start
    }

    fn entry(&self, lpi: Lpi) -> Result<u64, RedistError> {
        if u64::from(lpi.intid()) >= self.limit() {
            return Err(RedistError::LpiOutOfRange {
                lpi: lpi.intid(),
                limit: self.limit(),
            });
        }
        Ok(self.table.start.as_u64() + lpi.config_index())
    }

    /// Sets `lpi`'s priority and enable. Redistributors may have cached
    /// the old value: follow with an INV through the ITS
    /// ([`ItsUnit::invalidate`](crate::its::ItsUnit::invalidate)) for it
    /// to be sure to apply (5.1.1).
    pub fn set(&self, lpi: Lpi, config: LpiConfig) -> Result<(), RedistError> {
        let addr = self.entry(lpi)?;
        write_byte(self.mem, addr, config.byte());
        self.mem.flush_for_device(PhysAddr::new(addr & !7), 8);
        Ok(())
    }

    /// `lpi`'s configuration as in memory.
    pub fn get(&self, lpi: Lpi) -> Result<LpiConfig, RedistError> {
        Ok(LpiConfig::from_byte(read_byte(self.mem, self.entry(lpi)?)))
    }

    /// The GICR_PROPBASER value for this table: Normal write-back inner
    /// shareable when `coherent`, Non-cacheable otherwise.
    pub const fn propbaser(&self, coherent: bool) -> u64 {
        let attrs = if coherent {
            (cache::WRITE_BACK << baser::INNER_CACHE_SHIFT)
                | (share::INNER_SHAREABLE << baser::SHAREABILITY_SHIFT)
        } else {
            cache::NON_CACHEABLE << baser::INNER_CACHE_SHIFT
        };
        attrs
            | (self.table.start.as_u64() & baser::PROP_ADDR_MASK)
            | ((self.id_bits as u64 - 1) & baser::ID_BITS_MASK)
    }

    /// Frees the table. Only once no redistributor uses it (EnableLPIs =
    /// 0 everywhere), which the caller knows and this cannot check.
    pub fn free(self) {
        self.table.free(self.mem);
    }
}

/// One redistributor's LPI side.
pub struct Redistributor<'a> {
    mmio: &'a dyn Mmio,
    mem: &'a dyn DmaMemory,
    frame: RedistributorFrame,
    /// The pending table Sluice gave it, and its INTID bits.
    pending: Option<(Block, u32)>,
    /// Whether its table accesses snoop CPU caches (PROPBASER kept a
    /// shareable value).
    coherent: bool,
}

impl<'a> Redistributor<'a> {
    /// The redistributor `frame` of the GICR region `mmio`.
    pub fn new(mmio: &'a dyn Mmio, mem: &'a dyn DmaMemory, frame: RedistributorFrame) -> Self {
        Self {
            mmio,
            mem,
            frame,
            pending: None,
            coherent: true,
        }
    }

    fn ctlr(&self) -> Reg32<ReadWrite> {
        in_frame32(CTLR, self.frame.offset)
    }
    fn propbaser_reg(&self) -> Reg64<ReadWrite> {
        in_frame64(PROPBASER, self.frame.offset)
    }
    fn pendbaser_reg(&self) -> Reg64<ReadWrite> {
        in_frame64(PENDBASER, self.frame.offset)
    }

    pub const fn frame(&self) -> &RedistributorFrame {
        &self.frame
    }

    /// GICR_CTLR.EnableLPIs as the hardware reports it.
    pub fn lpis_enabled(&self) -> bool {
        self.ctlr().read(self.mmio) & ctlr::ENABLE_LPIS != 0
    }

    /// Whether the redistributor's table accesses snoop CPU caches.
    pub const fn coherent(&self) -> bool {
        self.coherent
    }

    /// The pending table Sluice gave this redistributor.
    pub fn pending_table(&self) -> Option<PhysAddr> {
        self.pending.map(|(b, _)| b.start)
    }

    /// Wakes the redistributor if firmware left it asleep
    /// (GICR_WAKER.ProcessorSleep = 0, then ChildrenAsleep clears,
    /// 12.11.38); needed before it forwards any interrupt.
    pub fn wake(&self, clock: &dyn Clock, timeout_ns: u64) -> Result<(), RedistError> {
        let reg = in_frame32(WAKER, self.frame.offset);
        let value = reg.read(self.mmio);
        if value & (waker::PROCESSOR_SLEEP | waker::CHILDREN_ASLEEP) == 0 {
            return Ok(());
        }
        reg.write(self.mmio, value & !waker::PROCESSOR_SLEEP);
        poll_until(clock, timeout_ns, || {
            (reg.read(self.mmio) & waker::CHILDREN_ASLEEP == 0).then_some(())
        })
        .map_err(|t| RedistError::Timeout {
            what: "waking up (GICR_WAKER.ChildrenAsleep)",
            waited_ns: t.waited_ns,
        })
    }

    /// Gives the redistributor the shared configuration table and a fresh
    /// pending table, then sets GICR_CTLR.EnableLPIs (5.1: tables first,
    /// enable last).
    ///
    /// Refuses a redistributor without physical LPIs, and one where
    /// firmware already enabled LPIs with other tables (changing them is
    /// UNPREDICTABLE; [`Redistributor::disable_lpis`] may get out of that
    /// where the implementation allows). Calling it again once enabled
    /// with these tables does nothing. On error nothing stays allocated
    /// and LPIs stay off.
    pub fn enable_lpis(&mut self, tables: &LpiTables<'_>) -> Result<(), RedistError> {
        let affinity = self.frame.affinity;
        if !self.frame.physical_lpis {
            return Err(RedistError::NoPhysicalLpis(affinity));
        }
        let propbaser = self.propbaser_reg().read(self.mmio);
        let pendbaser = self.pendbaser_reg().read(self.mmio);
        if self.lpis_enabled() {
            let ours = self.pending.is_some_and(|(b, _)| {
                pendbaser & baser::PEND_ADDR_MASK == b.start.as_u64()
                    && propbaser & baser::PROP_ADDR_MASK == tables.base().as_u64()
            });
            if ours {
                return Ok(());
            }
            log::error!(
                "GICR {affinity}: firmware left LPIs enabled (PROPBASER {propbaser:#x}, \
                 PENDBASER {pendbaser:#x})"
            );
            return Err(RedistError::LpisEnabledByFirmware {
                affinity,
                propbaser,
                pendbaser,
            });
        }
        // One bit per INTID from 0, 64 KiB aligned (5.1.2).
        let bytes = tables.limit() / 8;
        let table = Block::alloc(self.mem, bytes, baser::PENDING_ALIGN).map_err(|_| {
            RedistError::OutOfMemory {
                what: "LPI pending table",
                bytes,
            }
        })?;
        match self.program(tables, table) {
            Ok(()) => {
                self.pending = Some((table, tables.id_bits()));
                log::info!(
                    "GICR {affinity} (processor {}): LPIs on, INTIDs below {:#x}, pending table \
                     {}",
                    self.frame.processor_number,
                    tables.limit(),
                    table.start
                );
                Ok(())
            }
            Err(e) => {
                self.propbaser_reg().write(self.mmio, 0);
                self.pendbaser_reg().write(self.mmio, 0);
                table.free(self.mem);
                Err(e)
            }
        }
    }

    fn program(&mut self, tables: &LpiTables<'_>, pending: Block) -> Result<(), RedistError> {
        // Configuration table: try cacheable inner shareable; a
        // redistributor that does not snoop keeps Shareability at
        // Non-shareable, and then gets Non-cacheable attributes (its
        // tables are cleaned to memory on every write anyway).
        let wanted = tables.propbaser(true);
        self.propbaser_reg().write(self.mmio, wanted);
        let mut back = self.propbaser_reg().read(self.mmio);
        self.coherent =
            (back & baser::SHAREABILITY_MASK) >> baser::SHAREABILITY_SHIFT != share::NON_SHAREABLE;
        if !self.coherent {
            let plain = tables.propbaser(false);
            self.propbaser_reg().write(self.mmio, plain);
            back = self.propbaser_reg().read(self.mmio);
        }
        let check = baser::PROP_ADDR_MASK | baser::ID_BITS_MASK;
        if back & check != wanted & check {
            return Err(RedistError::RegisterRejected {
                what: "GICR_PROPBASER",
                wrote: wanted,
                read: back,
            });
        }
        self.mem.flush_for_device(pending.start, pending.bytes());
        let attrs = if self.coherent {
            (cache::WRITE_BACK << baser::INNER_CACHE_SHIFT)
                | (share::INNER_SHAREABLE << baser::SHAREABILITY_SHIFT)
        } else {
            cache::NON_CACHEABLE << baser::INNER_CACHE_SHIFT
        };
        // PTZ: the table is zero, the redistributor need not read it.
        let pend = baser::PTZ | attrs | (pending.start.as_u64() & baser::PEND_ADDR_MASK);
        self.pendbaser_reg().write(self.mmio, pend);
        let back = self.pendbaser_reg().read(self.mmio);
        if back & baser::PEND_ADDR_MASK != pending.start.as_u64() {
            return Err(RedistError::RegisterRejected {
                what: "GICR_PENDBASER",
                wrote: pend,
                read: back,
            });
        }
        let ctlr_value = self.ctlr().read(self.mmio);
        self.ctlr().write(self.mmio, ctlr_value | ctlr::ENABLE_LPIS);
        if !self.lpis_enabled() {
            return Err(RedistError::RegisterRejected {
                what: "GICR_CTLR.EnableLPIs",
                wrote: u64::from(ctlr_value | ctlr::ENABLE_LPIS),
                read: u64::from(self.ctlr().read(self.mmio)),
            });
        }
        Ok(())
    }

    /// Clears GICR_CTLR.EnableLPIs and waits for GICR_CTLR.RWP. Where the
    /// implementation does not allow clearing it (IMPLEMENTATION DEFINED),
    /// that is [`RedistError::CannotDisableLpis`]. A pending table Sluice
    /// gave the redistributor is freed once LPIs are off.
    pub fn disable_lpis(&mut self, clock: &dyn Clock, timeout_ns: u64) -> Result<(), RedistError> {
        let value = self.ctlr().read(self.mmio);
        if value & ctlr::ENABLE_LPIS != 0 {
            self.ctlr().write(self.mmio, value & !ctlr::ENABLE_LPIS);
            poll_until(clock, timeout_ns, || {
                (self.ctlr().read(self.mmio) & ctlr::RWP == 0).then_some(())
            })
            .map_err(|t| RedistError::Timeout {
                what: "disabling LPIs (GICR_CTLR.RWP)",
                waited_ns: t.waited_ns,
            })?;
            if self.lpis_enabled() {
                return Err(RedistError::CannotDisableLpis(self.frame.affinity));
            }
        }
        if let Some((table, _)) = self.pending.take() {
            table.free(self.mem);
        }
        Ok(())
    }

    /// Whether `lpi` is pending, read from the pending table Sluice gave
    /// this redistributor (false without one, or beyond its INTIDs).
    ///
    /// The table is the architectural record of pending LPIs, but a
    /// redistributor may keep pending state it has not yet written back
    /// (5.1.2): on hardware a `false` is only certain once LPIs are off.
    /// QEMU keeps the pending state in the table itself.
    pub fn lpi_pending(&self, lpi: Lpi) -> bool {
        let Some((table, id_bits)) = self.pending else {
            return false;
        };
        let intid = u64::from(lpi.intid());
        if intid >= 1u64 << id_bits {
            return false;
        }
        let word = self
            .mem
            .read_u64(PhysAddr::new(table.start.as_u64() + (intid / 64) * 8));
        word & (1 << (intid % 64)) != 0
    }
}

#[cfg(test)]
mod tests;
