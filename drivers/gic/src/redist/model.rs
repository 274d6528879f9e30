//! A register model of a GICR region (and of the distributor's two LPI
//! registers), for host tests of the redistributor code and as the
//! delivery end of the ITS model.
//!
//! [`RedistModel`] implements [`Mmio`] over the region: each redistributor
//! has RD_base and SGI_base frames (plus two more with VLPIS), GICR_TYPER
//! with its affinity, processor number and Last on the final one, and the
//! LPI registers with the rules of IHI 0069 12.11: PROPBASER/PENDBASER
//! written while EnableLPIs = 1 is a violation and ignored (UNPREDICTABLE
//! on hardware), EnableLPIs cannot be cleared unless the model is told
//! the implementation allows it. Delivered LPIs set their bit in the
//! pending table in memory; the configuration byte is read on first use
//! and cached until an INV/INVALL (5.1.1), so a test sees a stale priority
//! or enable exactly when the driver forgot the invalidation.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use sluice_hal::{DmaMemory, Mmio, PhysAddr};

use super::{Affinity, FRAME_BYTES, baser, ctlr, typer, waker};
use crate::lpi::Lpi;

/// One redistributor of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedistSpec {
    pub affinity: Affinity,
    pub processor_number: u16,
    pub physical_lpis: bool,
    /// GICv4 VLPIS: four frames instead of two.
    pub virtual_lpis: bool,
}

impl RedistSpec {
    /// CPU `n` of a QEMU `virt` machine: Aff0 = n, processor number n,
    /// physical LPIs, two frames.
    pub const fn qemu(n: u16) -> Self {
        Self {
            affinity: Affinity(n as u32),
            processor_number: n,
            physical_lpis: true,
            virtual_lpis: false,
        }
    }
}

/// What became of an LPI the ITS forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The LPI is now pending on redistributor `cpu`; `forwarded` when its
    /// (cached) configuration enables it, i.e. the CPU interface would be
    /// signalled.
    Pending { cpu: usize, forwarded: bool },
    /// GICR_CTLR.EnableLPIs = 0 there: dropped.
    LpisDisabled,
    /// Beyond the INTIDs PROPBASER.IDbits (and the distributor) allow:
    /// dropped.
    OutOfRange,
}

struct Cpu {
    spec: RedistSpec,
    offset: usize,
    last: bool,
    ctlr: u32,
    waker: u32,
    propbaser: u64,
    pendbaser: u64,
    config_cache: BTreeMap<u32, u8>,
}

impl Cpu {
    fn span(&self) -> usize {
        if self.spec.virtual_lpis {
            4 * FRAME_BYTES
        } else {
            2 * FRAME_BYTES
        }
    }
    fn typer(&self) -> u64 {
        let mut v = (u64::from(self.spec.affinity.0) << typer::AFFINITY_SHIFT)
            | (u64::from(self.spec.processor_number) << typer::PROCESSOR_SHIFT);
        if self.spec.physical_lpis {
            v |= typer::PLPIS;
        }
        if self.spec.virtual_lpis {
            v |= typer::VLPIS;
        }
        if self.last {
            v |= typer::LAST;
        }
        v
    }
}

/// The model. See the module documentation.
pub struct RedistModel<'m> {
    mem: &'m dyn DmaMemory,
    base: u64,
    gicd_id_bits: u32,
    region_bytes: usize,
    cpus: RefCell<Vec<Cpu>>,
    lpis_clearable: Cell<bool>,
    non_shareable: Cell<bool>,
    omit_last: Cell<bool>,
    violations: RefCell<Vec<&'static str>>,
}

impl<'m> RedistModel<'m> {
    /// A GICR region at physical `base` holding `specs`' redistributors in
    /// order, with tables in `mem` and a distributor of `gicd_id_bits`
    /// INTID bits. Out of reset: LPIs off, every PE awake.
    pub fn new(mem: &'m dyn DmaMemory, base: u64, gicd_id_bits: u32, specs: &[RedistSpec]) -> Self {
        let mut cpus = Vec::new();
        let mut offset = 0;
        for (i, &spec) in specs.iter().enumerate() {
            let cpu = Cpu {
                spec,
                offset,
                last: i + 1 == specs.len(),
                ctlr: 0,
                waker: 0,
                propbaser: 0,
                pendbaser: 0,
                config_cache: BTreeMap::new(),
            };
            offset += cpu.span();
            cpus.push(cpu);
        }
        Self {
            mem,
            base,
            gicd_id_bits,
            region_bytes: offset,
            cpus: RefCell::new(cpus),
            lpis_clearable: Cell::new(false),
            non_shareable: Cell::new(false),
            omit_last: Cell::new(false),
            violations: RefCell::new(Vec::new()),
        }
    }

    /// `n` QEMU-like CPUs (see [`RedistSpec::qemu`]) at QEMU `virt`'s GICR
    /// base, 16 INTID bits.
    pub fn qemu(mem: &'m dyn DmaMemory, n: u16) -> Self {
        let specs: Vec<_> = (0..n).map(RedistSpec::qemu).collect();
        Self::new(mem, 0x080a_0000, 16, &specs)
    }

    pub const fn base(&self) -> u64 {
        self.base
    }

    /// Bytes of the region (every redistributor's frames).
    pub const fn region_bytes(&self) -> usize {
        self.region_bytes
    }

    // ---- test controls ----------------------------------------------------

    /// Whether EnableLPIs may be cleared once set (IMPLEMENTATION DEFINED;
    /// off by default).
    pub fn set_lpis_clearable(&self, on: bool) {
        self.lpis_clearable.set(on);
    }

    /// A redistributor that does not snoop: Shareability reads back
    /// Non-shareable.
    pub fn set_non_shareable(&self, on: bool) {
        self.non_shareable.set(on);
    }

    /// No redistributor reports Last (broken firmware or hardware).
    pub fn set_omit_last(&self, on: bool) {
        self.omit_last.set(on);
    }

    /// Puts redistributor `cpu` in the state firmware may leave it in:
    /// LPIs on with its own tables.
    pub fn preset_firmware_lpis(&self, cpu: usize, propbaser: u64, pendbaser: u64) {
        let mut cpus = self.cpus.borrow_mut();
        let c = &mut cpus[cpu];
        c.propbaser = propbaser;
        c.pendbaser = pendbaser & !baser::PTZ;
        c.ctlr |= ctlr::ENABLE_LPIS;
    }

    /// Puts redistributor `cpu` to sleep (GICR_WAKER.ProcessorSleep and
    /// ChildrenAsleep set).
    pub fn put_to_sleep(&self, cpu: usize) {
        self.cpus.borrow_mut()[cpu].waker = waker::PROCESSOR_SLEEP | waker::CHILDREN_ASLEEP;
    }

    // ---- observations -------------------------------------------------------

    /// Programming errors the model detected (empty for a correct driver).
    pub fn violations(&self) -> Vec<&'static str> {
        self.violations.borrow().clone()
    }

    pub fn lpis_enabled(&self, cpu: usize) -> bool {
        self.cpus.borrow()[cpu].ctlr & ctlr::ENABLE_LPIS != 0
    }

    pub fn awake(&self, cpu: usize) -> bool {
        self.cpus.borrow()[cpu].waker == 0
    }

    pub fn propbaser(&self, cpu: usize) -> u64 {
        self.cpus.borrow()[cpu].propbaser
    }

    pub fn pendbaser(&self, cpu: usize) -> u64 {
        self.cpus.borrow()[cpu].pendbaser
    }

    /// The configuration byte redistributor `cpu` has cached for `lpi`.
    pub fn cached_config(&self, cpu: usize, lpi: u32) -> Option<u8> {
        self.cpus.borrow()[cpu].config_cache.get(&lpi).copied()
    }

    /// Whether `lpi`'s bit is set in redistributor `cpu`'s pending table.
    pub fn is_pending(&self, cpu: usize, lpi: u32) -> bool {
        let cpus = self.cpus.borrow();
        let c = &cpus[cpu];
        if c.pendbaser == 0 {
            return false;
        }
        let word = self.pending_word(c, lpi);
        self.mem.read_u64(word) & (1 << (lpi % 64)) != 0
    }

    /// Every pending LPI of redistributor `cpu` (INTIDs 8192 and up).
    pub fn pending_lpis(&self, cpu: usize) -> Vec<u32> {
        let limit = self.lpi_limit(cpu);
        (u64::from(Lpi::FIRST_INTID)..limit)
            .map(|i| i as u32)
            .filter(|&i| self.is_pending(cpu, i))
            .collect()
    }

    // ---- the ITS side -------------------------------------------------------

    /// The redistributor an ITS command's RDbase field names, for an ITS
    /// with GITS_TYPER.PTA = `pta`.
    pub fn resolve(&self, rd_field: u64, pta: bool) -> Option<usize> {
        let cpus = self.cpus.borrow();
        cpus.iter().position(|c| {
            if pta {
                self.base + c.offset as u64 == rd_field
            } else {
                u64::from(c.spec.processor_number) << 16 == rd_field
            }
        })
    }

    pub fn cpu_count(&self) -> usize {
        self.cpus.borrow().len()
    }

    fn lpi_limit(&self, cpu: usize) -> u64 {
        let c = &self.cpus.borrow()[cpu];
        let bits = ((c.propbaser & baser::ID_BITS_MASK) as u32 + 1).min(self.gicd_id_bits);
        1u64 << bits
    }

    fn pending_word(&self, c: &Cpu, lpi: u32) -> PhysAddr {
        PhysAddr::new((c.pendbaser & baser::PEND_ADDR_MASK) + u64::from(lpi / 64) * 8)
    }

    /// An LPI the ITS translated arrives at redistributor `cpu`.
    pub fn deliver(&self, cpu: usize, lpi: u32) -> Delivery {
        if !self.lpis_enabled(cpu) {
            return Delivery::LpisDisabled;
        }
        if lpi < Lpi::FIRST_INTID || u64::from(lpi) >= self.lpi_limit(cpu) {
            return Delivery::OutOfRange;
        }
        let mut cpus = self.cpus.borrow_mut();
        let c = &mut cpus[cpu];
        let config = match c.config_cache.get(&lpi) {
            Some(&b) => b,
            None => {
                let addr =
                    (c.propbaser & baser::PROP_ADDR_MASK) + u64::from(lpi - Lpi::FIRST_INTID);
                let b = (self.mem.read_u64(PhysAddr::new(addr & !7)) >> ((addr & 7) * 8)) as u8;
                c.config_cache.insert(lpi, b);
                b
            }
        };
        // Pending whatever the enable bit says; only forwarding to the CPU
        // interface depends on it.
        let word = self.pending_word(c, lpi);
        let value = self.mem.read_u64(word);
        self.mem.write_u64(word, value | (1 << (lpi % 64)));
        Delivery::Pending {
            cpu,
            forwarded: config & 1 != 0,
        }
    }

    /// DISCARD / CLEAR: `lpi` stops being pending on `cpu`.
    pub fn clear_pending(&self, cpu: usize, lpi: u32) {
        let cpus = self.cpus.borrow();
        let c = &cpus[cpu];
        if c.pendbaser == 0 || u64::from(lpi) >= self.lpi_limit_of(c) {
            return;
        }
        let word = self.pending_word(c, lpi);
        let value = self.mem.read_u64(word);
        self.mem.write_u64(word, value & !(1 << (lpi % 64)));
    }

    fn lpi_limit_of(&self, c: &Cpu) -> u64 {
        let bits = ((c.propbaser & baser::ID_BITS_MASK) as u32 + 1).min(self.gicd_id_bits);
        1u64 << bits
    }

    /// INV: `cpu` forgets its cached configuration of `lpi`.
    pub fn invalidate(&self, cpu: usize, lpi: u32) {
        self.cpus.borrow_mut()[cpu].config_cache.remove(&lpi);
    }

    /// INVALL: `cpu` forgets every cached configuration.
    pub fn invalidate_all(&self, cpu: usize) {
        self.cpus.borrow_mut()[cpu].config_cache.clear();
    }

    // ---- registers ------------------------------------------------------------

    fn locate(&self, offset: usize) -> Option<(usize, usize)> {
        self.cpus
            .borrow()
            .iter()
            .position(|c| c.offset <= offset && offset < c.offset + c.span())
            .map(|i| (i, offset - self.cpus.borrow()[i].offset))
    }

    fn violation(&self, what: &'static str) {
        self.violations.borrow_mut().push(what);
    }

    fn read_reg(&self, offset: usize) -> u64 {
        let Some((i, reg)) = self.locate(offset) else {
            self.violation("access outside the GICR region");
            return u64::MAX;
        };
        let cpus = self.cpus.borrow();
        let c = &cpus[i];
        match reg {
            0x0000 => u64::from(c.ctlr),
            0x0004 => 0x0000_043b,
            0x0008 => {
                let mut t = c.typer();
                if self.omit_last.get() {
                    t &= !typer::LAST;
                }
                t
            }
            0x0014 => u64::from(c.waker),
            0x0070 => c.propbaser,
            0x0078 => c.pendbaser,
            0xffe8 => {
                if c.spec.virtual_lpis {
                    0x4 << 4
                } else {
                    0x3 << 4
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&self, offset: usize, value: u64) {
        let Some((i, reg)) = self.locate(offset) else {
            self.violation("access outside the GICR region");
            return;
        };
        let mut cpus = self.cpus.borrow_mut();
        let c = &mut cpus[i];
        let enabled = c.ctlr & ctlr::ENABLE_LPIS != 0;
        match reg {
            0x0000 => {
                let want = value as u32 & ctlr::ENABLE_LPIS;
                if want != 0 && !enabled {
                    if c.propbaser == 0 || c.pendbaser == 0 {
                        self.violation("EnableLPIs set before PROPBASER and PENDBASER");
                    }
                    c.ctlr |= ctlr::ENABLE_LPIS;
                } else if want == 0 && enabled && self.lpis_clearable.get() {
                    c.ctlr &= !ctlr::ENABLE_LPIS;
                }
            }
            0x0014 => {
                let sleep = value as u32 & waker::PROCESSOR_SLEEP;
                c.waker = if sleep != 0 {
                    waker::PROCESSOR_SLEEP | waker::CHILDREN_ASLEEP
                } else {
                    0
                };
            }
            0x0070 | 0x0078 if enabled => {
                self.violation("PROPBASER/PENDBASER written while EnableLPIs = 1 (UNPREDICTABLE)");
            }
            0x0070 => {
                let mut v = value;
                if self.non_shareable.get() {
                    v &= !baser::SHAREABILITY_MASK;
                }
                c.propbaser = v;
            }
            0x0078 => {
                let mut v = value & !baser::PTZ;
                if self.non_shareable.get() {
                    v &= !baser::SHAREABILITY_MASK;
                }
                if value & baser::PEND_ADDR_MASK != value & 0x000f_ffff_ffff_f000 {
                    self.violation("PENDBASER address not 64 KiB aligned");
                }
                c.pendbaser = v;
            }
            _ => {}
        }
    }
}

/// Offsets (within RD_base) of the model's 64-bit registers.
const WIDE: [usize; 3] = [0x0008, 0x0070, 0x0078];

impl Mmio for RedistModel<'_> {
    fn read32(&self, offset: usize) -> u32 {
        let aligned = offset & !7;
        if WIDE.contains(&(aligned % FRAME_BYTES)) {
            (self.read_reg(aligned) >> ((offset & 4) * 8)) as u32
        } else {
            self.read_reg(offset) as u32
        }
    }
    fn write32(&self, offset: usize, value: u32) {
        if WIDE.contains(&((offset & !7) % FRAME_BYTES)) {
            self.violation("32-bit write to a 64-bit GICR register (the model takes whole ones)");
            return;
        }
        self.write_reg(offset, u64::from(value));
    }
    fn read64(&self, offset: usize) -> u64 {
        self.read_reg(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        self.write_reg(offset, value);
    }
}

/// GICD_CTLR and GICD_TYPER of a distributor, for tests.
pub struct DistModel {
    pub typer: Cell<u32>,
    pub ctlr: Cell<u32>,
}

impl DistModel {
    /// QEMU 7.2's GICv3 with an ITS: LPIs, 16 INTID bits, affinity
    /// routing on.
    pub fn qemu() -> Self {
        use crate::dist::{ctlr, typer};
        Self {
            typer: Cell::new(typer::LPIS | (15 << typer::ID_BITS_SHIFT)),
            ctlr: Cell::new(ctlr::ARE),
        }
    }
}

impl Mmio for DistModel {
    fn read32(&self, offset: usize) -> u32 {
        match offset {
            0x0 => self.ctlr.get(),
            0x4 => self.typer.get(),
            _ => 0,
        }
    }
    fn write32(&self, offset: usize, value: u32) {
        if offset == 0 {
            self.ctlr.set(value);
        }
    }
    fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
    }
}
