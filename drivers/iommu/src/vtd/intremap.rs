//! Interrupt remapping (VT-d spec rev 4.x, chapter 5 "Interrupt
//! Remapping", 9.9-9.10 table entry formats, 11.4.10.1 IRTA).
//!
//! Once remapping is on, a device's MSI reaches a CPU only through an
//! interrupt remapping table entry (IRTE) Sluice wrote: the entry picks the
//! destination and vector and checks the requester's source ID, so a
//! device (or the guest driving it) cannot forge another device's
//! interrupts or target arbitrary vectors. Compatibility-format interrupts
//! (the plain MSI format) are blocked (GCMD.CFI clear, 5.1.2.1).
//!
//! The table is one page: 256 entries (IRTA.S = 7), because
//! [`DmaMemory`](sluice_hal::DmaMemory) hands out single pages. Every entry
//! starts not-present; [`VtdUnit::set_interrupt_entry`] installs one and
//! invalidates its interrupt-entry-cache line (6.5.2.7).

use alloc::collections::BTreeSet;

use sluice_hal::{PAGE_SIZE, PhysAddr};
use sluice_pci::Bdf;

use super::descriptors::Descriptor;
use super::error::VtdError;
use super::regs::{self, global, irta};
use super::unit::VtdUnit;

/// log2 of the entries in the one-page table, minus one (IRTA.S).
pub const IRTA_SIZE: u8 = 7;
/// Entries of the table: 2^(S + 1).
pub const IRTE_COUNT: u32 = 1 << (IRTA_SIZE as u32 + 1);
const _: () = assert!(IRTE_COUNT as u64 * 16 == PAGE_SIZE);

/// How the host's local APICs are addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrConfig {
    /// The host runs its local APICs in x2APIC mode: 32-bit destination
    /// IDs (IRTA.EIME; needs ECAP.EIM).
    pub x2apic: bool,
}

/// IRTE delivery mode (DLM, bits 7:5; SDM vol. 3 10.11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeliveryMode {
    Fixed = 0b000,
    LowestPriority = 0b001,
    Smi = 0b010,
    Nmi = 0b100,
    Init = 0b101,
    ExtInt = 0b111,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerMode {
    Edge,
    Level,
}

/// Which bits of the requester ID the source check compares (SQ, 9.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SidQualifier {
    /// All 16 bits.
    Exact = 0b00,
    /// Ignore function bit 2.
    IgnoreFunction2 = 0b01,
    /// Ignore function bits 2:1.
    IgnoreFunction21 = 0b10,
    /// Ignore function bits 2:0 (any function of the device).
    AnyFunction = 0b11,
}

/// Which requesters may raise an entry's interrupt (SVT, 9.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceValidation {
    /// No check (SVT 00): only for sources that carry no trustworthy ID.
    None,
    /// The requester ID must match `rid` under `qualifier` (SVT 01).
    Requester { rid: Bdf, qualifier: SidQualifier },
    /// The requester's bus must lie in `first..=last` (SVT 10), for
    /// devices behind a PCIe-to-PCI bridge whose IDs the bridge may
    /// replace.
    BusRange { first: u8, last: u8 },
}

/// A remapped (not posted) interrupt: where an entry sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemappedInterrupt {
    /// Local APIC ID (8 bits in xAPIC mode, 32 in x2APIC mode), or a
    /// logical destination with `logical`.
    pub destination: u32,
    pub vector: u8,
    pub delivery: DeliveryMode,
    pub trigger: TriggerMode,
    /// Logical destination mode (DM).
    pub logical: bool,
    /// Redirection hint (RH): lowest-priority among the destinations.
    pub redirection_hint: bool,
    pub source: SourceValidation,
}

impl RemappedInterrupt {
    /// A fixed, edge-triggered interrupt to one APIC in physical mode,
    /// accepted only from `rid` exactly.
    pub const fn fixed(destination: u32, vector: u8, rid: Bdf) -> Self {
        Self {
            destination,
            vector,
            delivery: DeliveryMode::Fixed,
            trigger: TriggerMode::Edge,
            logical: false,
            redirection_hint: false,
            source: SourceValidation::Requester {
                rid,
                qualifier: SidQualifier::Exact,
            },
        }
    }
}

/// One interrupt remapping table entry (9.10), 128 bits.
///
/// Low word: P bit 0, FPD 1, DM 2, RH 3, TM 4, DLM 7:5, AVAIL 11:8,
/// IM 15 (0: remapped), V 23:16, DST 63:32 (xAPIC: APIC ID in 47:40).
/// High word: SID 15:0, SQ 17:16, SVT 19:18.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Irte([u64; 2]);
const _: () = assert!(core::mem::size_of::<Irte>() == 16);

impl Irte {
    pub const NOT_PRESENT: Self = Self([0, 0]);

    /// The entry for `irq`; `x2apic` selects the 32-bit destination
    /// layout.
    pub const fn remapped(irq: &RemappedInterrupt, x2apic: bool) -> Self {
        let mut low = 1u64; // P
        if irq.logical {
            low |= 1 << 2;
        }
        if irq.redirection_hint {
            low |= 1 << 3;
        }
        if matches!(irq.trigger, TriggerMode::Level) {
            low |= 1 << 4;
        }
        low |= (irq.delivery as u64) << 5;
        low |= (irq.vector as u64) << 16;
        low |= if x2apic {
            (irq.destination as u64) << 32
        } else {
            ((irq.destination as u64) & 0xff) << 40
        };
        let high = match irq.source {
            SourceValidation::None => 0,
            SourceValidation::Requester { rid, qualifier } => {
                (0b01 << 18) | ((qualifier as u64) << 16) | rid.requester_id() as u64
            }
            SourceValidation::BusRange { first, last } => {
                (0b10 << 18) | ((first as u64) << 8) | last as u64
            }
        };
        Self([low, high])
    }

    pub const fn words(&self) -> [u64; 2] {
        self.0
    }

    pub const fn is_present(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

/// An MSI in remappable format (5.1.5.2) naming entry `index`: address
/// 0xFEE in bits 31:20, handle[14:0] in 19:5, interrupt format (1) in bit
/// 4, SHV (0: no subhandle) in bit 3, handle[15] in bit 2; data 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemappableMsi {
    pub address: u32,
    pub data: u32,
}

impl RemappableMsi {
    pub const fn for_entry(index: u16) -> Self {
        let handle = index as u32;
        Self {
            address: 0xfee0_0000 | ((handle & 0x7fff) << 5) | (1 << 4) | ((handle >> 15) << 2),
            data: 0,
        }
    }
}

/// The unit's table, once remapping is on.
#[derive(Debug)]
pub(super) struct IrTable {
    base: PhysAddr,
    x2apic: bool,
    used: BTreeSet<u16>,
}

impl VtdUnit<'_> {
    /// Turns interrupt remapping on (5.1, 10.4.4 GCMD): an all-not-present
    /// table, IRTA (EIME for x2APIC hosts), SIRTP, a global
    /// interrupt-entry-cache invalidation, IRE, and compatibility-format
    /// interrupts blocked (CFI clear). Each command is one GCMD bit with
    /// its status polled under the unit's timeout.
    pub fn enable_interrupt_remapping(&mut self, config: IrConfig) -> Result<(), VtdError> {
        if !self.caps.interrupt_remapping {
            return Err(VtdError::Unsupported("interrupt remapping (ECAP.IR)"));
        }
        if config.x2apic && !self.caps.extended_interrupt_mode {
            return Err(VtdError::Unsupported(
                "x2APIC interrupt remapping (ECAP.EIM)",
            ));
        }
        // ECAP.IR implies QI (11.4.3): the entry cache has no register
        // interface.
        if !self.uses_queued_invalidation() {
            return Err(VtdError::Unsupported(
                "interrupt-entry-cache invalidation without queued invalidation",
            ));
        }
        if let Some(t) = &self.ir {
            return if t.x2apic == config.x2apic {
                Ok(())
            } else {
                Err(VtdError::InvalidConfig(
                    "interrupt remapping already on in the other APIC mode",
                ))
            };
        }
        let base = self.alloc_structure_page()?;
        let eime = if config.x2apic { irta::EIME } else { 0 };
        regs::IRTA.write(self.mmio, base.as_u64() | eime | u64::from(IRTA_SIZE));
        let result = self.switch_on_remapping();
        if let Err(e) = result {
            // Whatever the unit latched, it may still read the table: keep
            // the page (never reused) rather than free it under the unit.
            log::error!(
                "vtd{}: interrupt remapping could not be enabled ({e}); MSIs are not isolated",
                self.config.index
            );
            return Err(e);
        }
        self.ir = Some(IrTable {
            base,
            x2apic: config.x2apic,
            used: BTreeSet::new(),
        });
        log::info!(
            "vtd{}: interrupt remapping on ({} entries, {} mode), compatibility-format interrupts blocked",
            self.config.index,
            IRTE_COUNT,
            if config.x2apic { "x2APIC" } else { "xAPIC" }
        );
        Ok(())
    }

    fn switch_on_remapping(&mut self) -> Result<(), VtdError> {
        self.one_shot(
            global::SET_INTERRUPT_TABLE,
            "set interrupt remapping table pointer",
            |s| s & global::SET_INTERRUPT_TABLE != 0,
        )?;
        // The spec requires a global entry-cache invalidation after SIRTP
        // (11.4.4.1).
        self.submit(&[Descriptor::interrupt_entries_global()])?;
        if regs::GSTS.read(self.mmio) & global::INTERRUPT_REMAPPING == 0 {
            self.set_global(
                global::INTERRUPT_REMAPPING,
                true,
                "interrupt remapping enable",
            )?;
        }
        if regs::GSTS.read(self.mmio) & global::COMPAT_FORMAT_INTERRUPTS != 0 {
            self.set_global(
                global::COMPAT_FORMAT_INTERRUPTS,
                false,
                "compatibility-format interrupt blocking",
            )?;
        }
        Ok(())
    }

    /// Whether this unit remaps (and so isolates) interrupts: what MSI
    /// isolation for devices behind it rests on.
    pub fn interrupt_remapping_enabled(&self) -> bool {
        self.ir.is_some() && regs::GSTS.read(self.mmio) & global::INTERRUPT_REMAPPING != 0
    }

    /// Installs `irq` in entry `index` and invalidates the entry's cached
    /// copy. A present entry is first made not-present (and invalidated)
    /// so the unit never sees half of an update.
    pub fn set_interrupt_entry(
        &mut self,
        index: u16,
        irq: &RemappedInterrupt,
    ) -> Result<(), VtdError> {
        let (base, x2apic, present) = self.ir_slot(index)?;
        if !x2apic && irq.destination > 0xff {
            return Err(VtdError::InvalidConfig(
                "APIC destination above 255 in xAPIC mode",
            ));
        }
        if matches!(
            irq.delivery,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && irq.vector < 16
        {
            return Err(VtdError::InvalidConfig(
                "vectors 0-15 are reserved for exceptions",
            ));
        }
        if let SourceValidation::BusRange { first, last } = irq.source
            && first > last
        {
            return Err(VtdError::InvalidConfig("empty source bus range"));
        }
        let addr = PhysAddr::new(base.as_u64() + u64::from(index) * 16);
        if present {
            self.retract(addr, 2);
            self.submit(&[Descriptor::interrupt_entries(index, 0)])?;
        }
        let entry = Irte::remapped(irq, x2apic);
        self.publish(addr, &entry.words());
        if let Some(t) = &mut self.ir {
            t.used.insert(index);
        }
        self.submit(&[Descriptor::interrupt_entries(index, 0)])
    }

    /// Makes entry `index` not present again: its interrupts fault.
    pub fn clear_interrupt_entry(&mut self, index: u16) -> Result<(), VtdError> {
        let (base, _, present) = self.ir_slot(index)?;
        if !present {
            return Ok(());
        }
        self.retract(PhysAddr::new(base.as_u64() + u64::from(index) * 16), 2);
        if let Some(t) = &mut self.ir {
            t.used.remove(&index);
        }
        self.submit(&[Descriptor::interrupt_entries(index, 0)])
    }

    /// The lowest entry not in use, for a new remapped interrupt.
    pub fn free_interrupt_entry(&self) -> Option<u16> {
        let t = self.ir.as_ref()?;
        (0..IRTE_COUNT as u16).find(|i| !t.used.contains(i))
    }

    /// The interrupt remapping table (for tests and diagnostics).
    pub fn interrupt_table(&self) -> Option<PhysAddr> {
        self.ir.as_ref().map(|t| t.base)
    }

    fn ir_slot(&self, index: u16) -> Result<(PhysAddr, bool, bool), VtdError> {
        let t = self.ir.as_ref().ok_or(VtdError::Unsupported(
            "interrupt entries before remapping is on",
        ))?;
        if u32::from(index) >= IRTE_COUNT {
            return Err(VtdError::InvalidConfig(
                "interrupt entry index beyond the table",
            ));
        }
        Ok((t.base, t.x2apic, t.used.contains(&index)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irte_fields_follow_the_spec_layout() {
        let rid = Bdf::new(0, 4, 0);
        let e = Irte::remapped(&RemappedInterrupt::fixed(3, 0x41, rid), false);
        // P, DLM fixed, vector 0x41, APIC ID 3 in bits 47:40.
        assert_eq!(e.words()[0], 1 | (0x41 << 16) | (3 << 40));
        // SVT 01, SQ 00, SID 00:04.0.
        assert_eq!(e.words()[1], (1 << 18) | 0x20);
        let x2 = Irte::remapped(
            &RemappedInterrupt {
                destination: 0x1_0002,
                vector: 0xe0,
                delivery: DeliveryMode::LowestPriority,
                trigger: TriggerMode::Level,
                logical: true,
                redirection_hint: true,
                source: SourceValidation::BusRange { first: 2, last: 4 },
            },
            true,
        );
        assert_eq!(
            x2.words(),
            [
                1 | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (0xe0 << 16) | (0x1_0002 << 32),
                (2 << 18) | 0x0204
            ]
        );
        assert!(x2.is_present() && !Irte::NOT_PRESENT.is_present());
        // Remappable MSI: handle 0x8005 → bits 19:5 = 5, bit 2 = 1.
        assert_eq!(
            RemappableMsi::for_entry(0x8005).address,
            0xfee0_0000 | (5 << 5) | (1 << 4) | (1 << 2)
        );
    }
}
