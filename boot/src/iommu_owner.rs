//! Boot-time ownership of every VT-d unit (x86_64): the bare-metal side of
//! [`sluice_iommu::vtd::ownership`]. Each DRHD gets its own leaked
//! register window, DMA memory and clock, so the units live as long as
//! Sluice (`VtdUnit<'static>`) and the hypervisor runtime can take the
//! whole [`OwnedIommus`] by value.
//!
//! Fault events interrupt the boot CPU on
//! [`IOMMU_FAULT_VECTOR`](sluice_kernel::arch::interrupts::IOMMU_FAULT_VECTOR):
//! the handler empties each unit's fault registers into a static
//! [`FaultMailbox`] (no logging, no allocation) and masks storms; the
//! unit's `drain_faults` logs and attributes them. Sluice keeps interrupts
//! disabled outside `interrupts::with_interrupts` windows, so until the
//! runtime opens one the events stay pending and `drain_faults` (polling)
//! still finds every fault.
//!
//! Who takes ownership: the normal boot path (the demo, and the guest
//! runtime built on it) and the `vtd-ownership` scenario. The other QEMU
//! scenarios deliberately do not: `edu-dma` is the untranslated baseline
//! (firmware leaves QEMU's intel-iommu off, so edu DMA reaches physical
//! memory), and `vtd-dma` brings one unit up itself to drive it step by
//! step. Taking ownership in those would reset the unit under them, so
//! ownership is an explicit call here rather than part of platform
//! bring-up.

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use log::info;
use sluice_iommu::acpi::dmar::DmarFlags;
use sluice_iommu::vtd::ownership::{self, OwnershipConfig, UnitHardware};
use sluice_iommu::vtd::{FaultEventMessage, FaultMailbox, IrConfig, StormPolicy};
use sluice_kernel::arch::interrupts::{self, IOMMU_FAULT_VECTOR};
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::platform::Platform;

use crate::pci::IommuMap;

/// Every VT-d unit under Sluice's control.
pub type OwnedIommus = ownership::OwnedIommus<'static>;

static CLOCK: KernelClock = KernelClock;

/// IA32_APIC_BASE (SDM vol. 3A 10.4.4): bit 10 (EXTD) is set in x2APIC
/// mode.
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;

/// Units whose fault events interrupt; further units are polled only.
const FAULT_SLOTS: usize = 8;

/// What the fault interrupt handler needs of one unit: its register
/// window and the mailbox it shares with the unit.
struct FaultSlot {
    base: AtomicU64,
    size: AtomicU64,
    mailbox: FaultMailbox,
}

impl FaultSlot {
    const fn new() -> Self {
        Self {
            base: AtomicU64::new(0),
            size: AtomicU64::new(0),
            mailbox: FaultMailbox::new(),
        }
    }
}

static FAULT_UNITS: [FaultSlot; FAULT_SLOTS] = [const { FaultSlot::new() }; FAULT_SLOTS];

/// The fault-event interrupt handler: every unit with a slot empties its
/// fault registers into its mailbox (a unit without faults only reads
/// FSTS). The interrupts module sends EOI.
fn fault_interrupt() {
    let now = sluice_kernel::clock::now_ns().unwrap_or(0);
    for slot in &FAULT_UNITS {
        let base = slot.base.load(Ordering::Acquire);
        if base == 0 {
            continue;
        }
        // SAFETY: `base`/`size` were stored from the unit's DRHD when it
        // was taken over; Sluice owns the unit.
        let mmio = unsafe { PhysMmio::new(base, slot.size.load(Ordering::Relaxed)) };
        slot.mailbox.service_interrupt(&mmio, now);
    }
}

/// The mailbox unit `unit` (index in [`OwnedIommus::units`]) shares with
/// the fault interrupt handler, if its faults interrupt.
pub fn fault_mailbox(unit: usize) -> Option<&'static FaultMailbox> {
    let slot = FAULT_UNITS.get(unit)?;
    (slot.base.load(Ordering::Acquire) != 0).then_some(&slot.mailbox)
}

/// Routes every owned unit's fault events to this CPU's local APIC.
fn enable_fault_interrupts(owned: &mut OwnedIommus, dmar: &sluice_iommu::acpi::dmar::Dmar) {
    if let Err(e) = interrupts::register(IOMMU_FAULT_VECTOR, fault_interrupt) {
        log::error!("iommu: no fault interrupt ({e}); faults are found by polling only");
        return;
    }
    let apic_id = sluice_kernel::arch::smp::this_cpu_hw_id() as u32;
    let message = FaultEventMessage::to_apic(apic_id, IOMMU_FAULT_VECTOR);
    for (i, u) in owned.units.iter_mut().enumerate() {
        let Some(slot) = FAULT_UNITS.get(i) else {
            log::warn!(
                "dmar{}: more than {FAULT_SLOTS} units; its faults are found by polling only",
                u.drhd
            );
            continue;
        };
        let size = dmar.drhds.get(u.drhd).map_or(4096, |d| d.register_size());
        // The handler must never touch a register outside the window:
        // PhysMmio would log that, and logging in interrupt context can
        // deadlock on the console.
        let caps = u.unit.capabilities();
        let records_end = caps.fault_record_offset as u64 + 16 * u64::from(caps.fault_record_count);
        if records_end > size {
            log::error!(
                "dmar{}: fault-recording registers end at {records_end:#x}, beyond its {size:#x}-byte \
                 window; its faults are found by polling only",
                u.drhd
            );
            continue;
        }
        slot.size.store(size, Ordering::Relaxed);
        slot.base.store(u.register_base, Ordering::Release);
        if let Err(e) = u
            .unit
            .enable_fault_interrupt(message, &slot.mailbox, StormPolicy::new())
        {
            slot.base.store(0, Ordering::Release);
            log::error!(
                "dmar{}: fault interrupt not enabled ({e}); its faults are found by polling only",
                u.drhd
            );
        }
    }
}

/// The local APIC mode Sluice runs in, which decides the remapping
/// table's destination format.
fn host_x2apic() -> bool {
    sluice_kernel::arch::svm::read_msr(IA32_APIC_BASE) & APIC_BASE_X2APIC != 0
}

/// Brings up one unit per DRHD of the DMAR behind `map`: every device
/// blocked, RMRRs identity-mapped for the devices they name. A DRHD that
/// fails is logged and its devices marked uncovered; only a platform
/// without a DMAR is an error.
pub fn take_ownership(platform: &'static Platform, map: &IommuMap) -> Result<OwnedIommus, String> {
    let dmar = map
        .dmar
        .as_ref()
        .ok_or("no DMAR table: there is no VT-d unit to take over")?;
    info!(
        "iommu: taking over {} VT-d unit(s); every device is blocked until assigned",
        dmar.drhds.len()
    );
    let config = OwnershipConfig {
        interrupt_remapping: Some(IrConfig {
            x2apic: host_x2apic(),
        }),
        ..OwnershipConfig::new()
    };
    let owned = ownership::take_ownership(dmar, &map.per_segment, &config, |_, drhd| {
        // SAFETY: the DRHD names this register block, and Sluice owns
        // the unit from now on (nothing else drives it after boot
        // services are gone).
        let mmio: &'static PhysMmio = Box::leak(Box::new(unsafe {
            PhysMmio::new(drhd.register_base, drhd.register_size())
        }));
        let mem: &'static FrameDmaMemory<'static> =
            Box::leak(Box::new(FrameDmaMemory::new(&platform.frames)));
        Ok(UnitHardware {
            mmio,
            mem,
            clock: &CLOCK,
        })
    });
    if owned.units.is_empty() && !dmar.drhds.is_empty() {
        return Err(format!(
            "none of the {} VT-d units came up: no device is isolated",
            dmar.drhds.len()
        ));
    }
    let mut owned = owned;
    enable_fault_interrupts(&mut owned, dmar);
    Ok(owned)
}

/// The `vtd-ownership` scenario: after ownership every unit is up with its
/// capabilities logged and interrupt remapping on exactly where the unit
/// (ECAP.IR) and the DMAR (INTR_REMAP) offer it, and every edu's DMA is
/// blocked — it faults with the edu's own source ID (its alias behind a
/// PCIe-to-PCI bridge) and writes nothing.
pub fn scenario(platform: &'static Platform) -> Result<(), String> {
    use sluice_iommu::vtd::ownership::DeviceStatus;

    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let map = crate::pci::associate(acpi, &pci)?;
    let drhds = map.dmar.as_ref().map_or(0, |d| d.drhds.len());
    let platform_ir = map
        .dmar
        .as_ref()
        .is_some_and(|d| d.flags.contains(DmarFlags::INTR_REMAP));
    let mut owned = take_ownership(platform, &map)?;
    if let Some(f) = owned.failed.first() {
        return Err(format!("dmar{} was not taken over: {}", f.drhd, f.error));
    }
    if owned.units.len() != drhds {
        return Err(format!("{} of {drhds} DRHDs are owned", owned.units.len()));
    }
    for u in &owned.units {
        let caps = u.unit.capabilities();
        if !(39..=57).contains(&caps.max_guest_address_width) || caps.sl_levels().next().is_none() {
            return Err(format!(
                "dmar{}: capabilities decode to nonsense: {}",
                u.drhd,
                caps.summary()
            ));
        }
        let remapping = u.unit.interrupt_remapping_enabled();
        if remapping != (caps.interrupt_remapping && platform_ir) {
            return Err(format!(
                "dmar{}: interrupt remapping is {} with ECAP.IR = {} and DMAR INTR_REMAP = {platform_ir}",
                u.drhd,
                if remapping { "on" } else { "off" },
                caps.interrupt_remapping
            ));
        }
        info!(
            "vtd-ownership: dmar{} @{:#x} owned in {:?} mode, interrupt remapping {}: {}",
            u.drhd,
            u.register_base,
            u.unit.mode(),
            if remapping { "on" } else { "off" },
            caps.summary()
        );
    }

    let buffer = platform
        .frames
        .lock()
        .allocate_below(1, 4096, 1 << 28)
        .map_err(|e| format!("no DMA buffer: {e}"))?;
    let mut checked = 0;
    let mut tested: Option<TestedEdu> = None;
    for topology in &pci.segments {
        for f in topology.functions.iter().filter(|f| crate::edu::is_edu(f)) {
            let index = match owned.status(f.addr) {
                DeviceStatus::Isolated { unit } => unit,
                other => return Err(format!("edu {} is {other:?} after ownership", f.addr)),
            };
            let source = map
                .device(f.addr)
                .ok_or_else(|| format!("edu {} has no association", f.addr))?
                .requester_id;
            // Bus mastering on the edu and every bridge above it, so the
            // only thing stopping its DMA is the IOMMU.
            let mut cursor = Some(f);
            while let Some(function) = cursor {
                pci.enable_memory_and_bus_master(function.addr)?;
                cursor = function.upstream.and_then(|i| topology.functions.get(i));
            }
            let bar0 = f
                .bars
                .iter()
                .find(|b| b.index == 0 && b.address != 0)
                .ok_or_else(|| format!("edu {} has no assigned BAR 0", f.addr))?;
            // SAFETY: BAR 0 of an edu function is its register block.
            let edu = unsafe { crate::edu::Edu::new(bar0.address, bar0.size)? };
            fill(buffer, 0x5a);
            edu.dma(crate::edu::Direction::ToRam, buffer, 0, 512)?;
            let unit = &mut owned
                .units
                .get_mut(index)
                .ok_or("unit index out of range")?
                .unit;
            let drain = unit.drain_faults();
            let fault = drain
                .faults
                .iter()
                .map(|a| a.record)
                .find(|r| r.source == source)
                .ok_or_else(|| {
                    format!(
                        "edu {}: no fault from source {source} (recorded: {:?})",
                        f.addr, drain.faults
                    )
                })?;
            // Root / context (legacy), or scalable root / context / PASID
            // structures not present; QEMU 7.2 reports 0x58 for a missing
            // PASID entry.
            if !matches!(
                fault.reason.0,
                0x01 | 0x02 | 0x39 | 0x41 | 0x51 | 0x58 | 0x59
            ) || fault.address != buffer
            {
                return Err(format!("edu {}: unexpected fault {fault}", f.addr));
            }
            if !untouched(buffer, 0x5a) {
                return Err(format!("edu {}: blocked DMA changed memory", f.addr));
            }
            info!(
                "vtd-ownership: edu {} blocked: {fault} (source {source})",
                f.addr
            );
            checked += 1;
            if tested.is_none() {
                tested = Some(TestedEdu {
                    addr: f.addr,
                    edu,
                    bar0: (bar0.address, bar0.size),
                    unit: index,
                    source,
                    msi: f.caps.msi,
                });
            }
        }
    }
    if let Some(edu) = &tested {
        fault_interrupt_proof(&mut owned, edu, buffer)?;
        remapped_msi_proof(&pci, &mut owned, edu)?;
    }
    platform
        .frames
        .lock()
        .free(buffer, 1)
        .map_err(|e| format!("{e}"))?;
    if checked == 0 {
        return Err(String::from("no edu device on this board"));
    }
    info!("vtd-ownership: {checked} edu devices blocked by {drhds} owned unit(s)");
    Ok(())
}

fn fill(page: u64, value: u8) {
    // SAFETY: the page belongs to the scenario and is identity-mapped.
    unsafe { core::ptr::write_bytes(page as *mut u8, value, 4096) };
}

fn untouched(page: u64, value: u8) -> bool {
    // SAFETY: as `fill`.
    (0..4096).all(|i| unsafe { ((page + i) as *const u8).read_volatile() } == value)
}

/// The edu the interrupt proofs use.
struct TestedEdu {
    addr: sluice_pci::PciAddress,
    edu: crate::edu::Edu,
    bar0: (u64, u64),
    /// Index in `OwnedIommus::units`.
    unit: usize,
    source: sluice_pci::Bdf,
    msi: Option<sluice_pci::caps::MsiCap>,
}

fn wait_for(timeout_ns: u64, done: impl Fn() -> bool) -> bool {
    sluice_hal::poll_until(&CLOCK, timeout_ns, || done().then_some(())).is_ok()
}

/// A blocked DMA raises the unit's fault interrupt; the handler empties
/// the fault registers into the mailbox, where `drain_faults` finds the
/// record with the edu's source ID.
fn fault_interrupt_proof(
    owned: &mut OwnedIommus,
    t: &TestedEdu,
    buffer: u64,
) -> Result<(), String> {
    let mailbox = fault_mailbox(t.unit).ok_or("the unit's fault interrupt is not enabled")?;
    let unit = &mut owned
        .units
        .get_mut(t.unit)
        .ok_or("unit index out of range")?
        .unit;
    if !unit.fault_interrupt_enabled() {
        return Err(String::from("the unit's fault interrupt is masked"));
    }
    // Take what the polled checks above left pending in the local APIC.
    interrupts::with_interrupts(|| sluice_kernel::clock::delay_ns(10_000_000));
    unit.drain_faults();
    let before = mailbox.interrupts();
    fill(buffer, 0x5a);
    let dma = interrupts::with_interrupts(|| {
        let dma = t.edu.dma(crate::edu::Direction::ToRam, buffer, 0, 512);
        wait_for(1_000_000_000, || mailbox.interrupts() > before);
        dma
    });
    dma?;
    let taken = mailbox.interrupts() - before;
    let queued = mailbox.pending();
    if taken == 0 {
        return Err(format!(
            "edu {}: its blocked DMA raised no fault interrupt",
            t.addr
        ));
    }
    if queued == 0 {
        return Err(String::from(
            "the fault interrupt handler ran but queued no fault record",
        ));
    }
    let drain = unit.drain_faults();
    let fault = drain
        .faults
        .iter()
        .map(|a| a.record)
        .find(|r| r.source == t.source && r.address == buffer)
        .ok_or_else(|| format!("no queued fault from {} (got {:?})", t.source, drain.faults))?;
    if !untouched(buffer, 0x5a) {
        return Err(String::from("blocked DMA changed memory"));
    }
    info!(
        "vtd-ownership: fault interrupt taken {taken} time(s) on vector {IOMMU_FAULT_VECTOR:#x}; \
         the handler queued {queued} record(s): {fault}; {} unexpected, {} spurious interrupts",
        interrupts::unexpected_interrupts(),
        interrupts::spurious_interrupts()
    );
    Ok(())
}

/// edu's MSIs counted by their handler.
static EDU_MSIS: AtomicU64 = AtomicU64::new(0);
const EDU_MSI_VECTOR: u8 = 0xe1;
/// edu registers (QEMU's edu specification): writing the raise register
/// sets interrupt status bits and sends the MSI; acknowledge clears them.
const EDU_RAISE: usize = 0x60;
const EDU_ACK: usize = 0x64;

fn edu_msi() {
    EDU_MSIS.fetch_add(1, Ordering::Relaxed);
}

/// Points edu's MSI capability at `address`/`data` and enables it (one
/// vector).
fn program_msi(
    pci: &crate::pci::Pci,
    addr: sluice_pci::PciAddress,
    msi: sluice_pci::caps::MsiCap,
    address: u32,
    data: u16,
    enable: bool,
) -> Result<(), String> {
    use sluice_pci::ConfigSpace;
    let e = |e| format!("config space of {addr}: {e:?}");
    let cap = msi.offset;
    pci.ecam.write32(addr, cap + 4, address).map_err(e)?;
    let data_at = if msi.is_64bit {
        pci.ecam.write32(addr, cap + 8, 0).map_err(e)?;
        cap + 12
    } else {
        cap + 8
    };
    pci.ecam.write16(addr, data_at, data).map_err(e)?;
    let control = pci.ecam.read16(addr, cap + 2).map_err(e)?;
    // Message Control: enable bit 0; multiple message enable (6:4) 0,
    // one vector.
    let control = (control & !0x71) | u16::from(enable);
    pci.ecam.write16(addr, cap + 2, control).map_err(e)
}

/// With interrupt remapping on, edu's MSI in remappable format reaches the
/// CPU through the entry Sluice installed (destination, vector, source
/// check), and faults once the entry is cleared.
fn remapped_msi_proof(
    pci: &crate::pci::Pci,
    owned: &mut OwnedIommus,
    t: &TestedEdu,
) -> Result<(), String> {
    use sluice_iommu::vtd::{RemappableMsi, RemappedInterrupt};
    let unit = &mut owned
        .units
        .get_mut(t.unit)
        .ok_or("unit index out of range")?
        .unit;
    if !unit.interrupt_remapping_enabled() {
        info!("vtd-ownership: interrupt remapping is off; no remapped-MSI check");
        return Ok(());
    }
    let msi = t
        .msi
        .ok_or_else(|| format!("edu {} has no MSI capability", t.addr))?;
    interrupts::register(EDU_MSI_VECTOR, edu_msi).map_err(|e| format!("{e}"))?;
    let apic_id = sluice_kernel::arch::smp::this_cpu_hw_id() as u32;
    let entry = unit
        .free_interrupt_entry()
        .ok_or("no free interrupt remapping entry")?;
    unit.set_interrupt_entry(
        entry,
        &RemappedInterrupt::fixed(apic_id, EDU_MSI_VECTOR, t.source),
    )
    .map_err(|e| format!("installing entry {entry}: {e}"))?;
    let message = RemappableMsi::for_entry(entry);
    program_msi(pci, t.addr, msi, message.address, message.data as u16, true)?;
    // SAFETY: BAR 0 of the edu is its register block.
    let registers = unsafe { PhysMmio::new(t.bar0.0, t.bar0.1) };
    let raise = |registers: &PhysMmio| {
        use sluice_hal::Mmio;
        registers.write32(EDU_RAISE, 1);
    };
    let before = EDU_MSIS.load(Ordering::Relaxed);
    let delivered = interrupts::with_interrupts(|| {
        raise(&registers);
        wait_for(500_000_000, || EDU_MSIS.load(Ordering::Relaxed) > before)
    });
    {
        use sluice_hal::Mmio;
        registers.write32(EDU_ACK, 1);
    }
    if !delivered {
        program_msi(pci, t.addr, msi, 0, 0, false)?;
        return Err(format!(
            "edu {}: its MSI through remapping entry {entry} never reached vector {EDU_MSI_VECTOR:#x}",
            t.addr
        ));
    }
    info!(
        "vtd-ownership: edu {} MSI (remappable format, handle {entry}) delivered to APIC {apic_id} \
         vector {EDU_MSI_VECTOR:#x} through the remapping table",
        t.addr
    );
    // The same MSI goes nowhere when the entry names another requester,
    // or once the entry is cleared.
    let not_delivered = |what: &str| -> Result<(), String> {
        let before = EDU_MSIS.load(Ordering::Relaxed);
        interrupts::with_interrupts(|| {
            raise(&registers);
            sluice_kernel::clock::delay_ns(200_000_000);
        });
        {
            use sluice_hal::Mmio;
            registers.write32(EDU_ACK, 1);
        }
        if EDU_MSIS.load(Ordering::Relaxed) != before {
            return Err(format!("edu {}: an MSI {what} was delivered", t.addr));
        }
        Ok(())
    };
    let impostor = sluice_pci::Bdf::from_requester_id(t.source.requester_id() ^ 0x8);
    unit.set_interrupt_entry(
        entry,
        &RemappedInterrupt::fixed(apic_id, EDU_MSI_VECTOR, impostor),
    )
    .map_err(|e| format!("retargeting entry {entry}: {e}"))?;
    not_delivered("through an entry for another requester")?;
    info!(
        "vtd-ownership: with entry {entry} accepting only {impostor}, the MSI from {} was blocked",
        t.source
    );
    unit.clear_interrupt_entry(entry)
        .map_err(|e| format!("clearing entry {entry}: {e}"))?;
    let result = not_delivered("through a cleared entry");
    program_msi(pci, t.addr, msi, 0, 0, false)?;
    result?;
    let recorded = unit.drain_faults();
    info!(
        "vtd-ownership: with entry {entry} cleared the MSI was blocked ({} fault record(s): {:?})",
        recorded.faults.len(),
        recorded
            .faults
            .iter()
            .map(|f| f.record.reason)
            .collect::<alloc::vec::Vec<_>>()
    );
    Ok(())
}
