//! Boot-time ownership of every VT-d unit (x86_64): the bare-metal side of
//! [`sluice_iommu::vtd::ownership`]. Each DRHD gets its own leaked
//! register window, DMA memory and clock, so the units live as long as
//! Sluice (`VtdUnit<'static>`) and the hypervisor runtime can take the
//! whole [`OwnedIommus`] by value.
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

use log::info;
use sluice_iommu::acpi::dmar::DmarFlags;
use sluice_iommu::vtd::IrConfig;
use sluice_iommu::vtd::ownership::{self, OwnershipConfig, UnitHardware};
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
        }
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
