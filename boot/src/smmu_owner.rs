//! Boot-time ownership of every SMMU (aarch64): the bare-metal side of
//! [`sluice_iommu::smmuv3::ownership`]. Each SMMU gets its own leaked
//! register window, DMA memory and clock, so the units live as long as
//! Sluice (`SmmuUnit<'static>`) and the hypervisor runtime can take the
//! whole [`OwnedSmmus`] by value.
//!
//! Events are polled (`SmmuUnit::drain_events`): the driver leaves the
//! SMMU's interrupts off.
//!
//! Who takes ownership: the normal boot path (the demo) and the
//! `smmu-ownership` scenario. `edu-dma` (the untranslated baseline: the
//! firmware leaves the SMMU disabled, and QEMU lets traffic bypass it) and
//! `smmu-dma` (which brings the SMMU up itself to drive it step by step)
//! deliberately do not.

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use log::info;
use sluice_iommu::acpi::iort::{self, Iort};
use sluice_iommu::smmuv3::EventKind;
use sluice_iommu::smmuv3::ownership::{self, DeviceStatus, OwnershipConfig, SmmuHardware};
use sluice_iommu::smmuv3::regs::REGISTER_SPAN;
use sluice_kernel::acpi_tables::RawIort;
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::platform::Platform;

use crate::pci::IommuMap;

/// Every SMMU under Sluice's control.
pub type OwnedSmmus = ownership::OwnedSmmus<'static>;

static CLOCK: KernelClock = KernelClock;

fn parse_iort(platform: &Platform) -> Result<Iort, String> {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let bytes = acpi
        .raw::<RawIort>()
        .ok_or("no IORT table: there is no SMMU to take over")?;
    iort::parse(bytes).map_err(|e| format!("IORT: {e}"))
}

/// Brings up one unit per SMMUv3 node of the IORT: every stream aborts,
/// RMR ranges are identity-mapped for the StreamIDs they name. An SMMU
/// that fails is logged and the functions behind it marked uncovered; only
/// a platform without an IORT, or one where no SMMU came up, is an error.
pub fn take_ownership(platform: &'static Platform, map: &IommuMap) -> Result<OwnedSmmus, String> {
    let table = parse_iort(platform)?;
    let smmus = table.smmus().len();
    info!("iommu: taking over {smmus} SMMU(s); every device is blocked until assigned");
    let owned = ownership::take_ownership(
        &table,
        &map.per_segment,
        &OwnershipConfig::new(),
        |_, node| {
            // SAFETY: the IORT names this register block (pages 0 and 1),
            // and Sluice owns the SMMU from now on (nothing else drives it
            // after boot services are gone).
            let mmio: &'static PhysMmio = Box::leak(Box::new(unsafe {
                PhysMmio::new(node.base, REGISTER_SPAN as u64)
            }));
            let mem: &'static FrameDmaMemory<'static> =
                Box::leak(Box::new(FrameDmaMemory::new(&platform.frames)));
            Ok(SmmuHardware {
                mmio,
                mem,
                clock: &CLOCK,
            })
        },
    );
    if owned.units.is_empty() && smmus > 0 {
        return Err(format!(
            "none of the {smmus} SMMUs came up: no device is isolated"
        ));
    }
    Ok(owned)
}

fn fill(page: u64, value: u8) {
    // SAFETY: the page belongs to the scenario and is identity-mapped.
    unsafe { core::ptr::write_bytes(page as *mut u8, value, 4096) };
}

fn untouched(page: u64, value: u8) -> bool {
    // SAFETY: as `fill`.
    (0..4096).all(|i| unsafe { ((page + i) as *const u8).read_volatile() } == value)
}

/// The `smmu-ownership` scenario: after ownership every SMMUv3 of the
/// IORT is up, and every edu behind one is blocked — its DMA writes
/// nothing and the SMMU records C_BAD_STREAMID with the edu's own
/// StreamID. An edu the IORT sends past every SMMU must be reported
/// uncovered (its DMA is not tried: nothing would stop it).
pub fn scenario(platform: &'static Platform) -> Result<(), String> {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let map = crate::pci::associate(acpi, &pci)?;
    let table = parse_iort(platform)?;
    let mut owned = take_ownership(platform, &map)?;
    if let Some(f) = owned.failed.first() {
        return Err(format!("smmu{} was not taken over: {}", f.ordinal, f.error));
    }
    if owned.units.len() != table.smmus().len() {
        return Err(format!(
            "{} of {} SMMUs are owned",
            owned.units.len(),
            table.smmus().len()
        ));
    }
    for u in &owned.units {
        info!(
            "smmu-ownership: smmu{} @{:#x} owned, StreamIDs below {:#x}: {}",
            u.ordinal,
            u.base,
            u.unit.stream_limit(),
            u.unit.capabilities().summary()
        );
    }

    let buffer = platform
        .frames
        .lock()
        .allocate(1, 4096)
        .map_err(|e| format!("no DMA buffer: {e}"))?;
    let (mut blocked, mut uncovered) = (0, 0);
    for topology in &pci.segments {
        for f in topology.functions.iter().filter(|f| crate::edu::is_edu(f)) {
            let expected_sid = map.device(f.addr).and_then(|d| d.stream_id);
            let (unit, sid) = match owned.status(f.addr) {
                DeviceStatus::Isolated { unit, stream_id } => (unit, stream_id),
                DeviceStatus::Uncovered if expected_sid.is_none() => {
                    info!(
                        "smmu-ownership: edu {} is behind no SMMU in the IORT: reported uncovered, never assigned",
                        f.addr
                    );
                    uncovered += 1;
                    continue;
                }
                other => return Err(format!("edu {} is {other:?} after ownership", f.addr)),
            };
            if Some(sid) != expected_sid {
                return Err(format!(
                    "edu {}: StreamID {sid:#x}, the IORT says {expected_sid:x?}",
                    f.addr
                ));
            }
            // Bus mastering on the edu and every bridge above it, so the
            // only thing stopping its DMA is the SMMU.
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
            edu.dma(crate::edu::Direction::ToRam, buffer, 0, 256)?;
            let smmu = &mut owned
                .units
                .get_mut(unit)
                .ok_or("unit index out of range")?
                .unit;
            let drain = smmu.drain_events();
            let mine: alloc::vec::Vec<_> = drain
                .faults
                .iter()
                .filter(|a| a.fault.stream_id == sid)
                .collect();
            // One event per refused access of the transfer; a blocked
            // stream selects an absent level-2 table (IHI 0070 5.1).
            if mine.is_empty()
                || mine
                    .iter()
                    .any(|a| a.fault.kind != EventKind::BadStreamId || a.domain.is_some())
            {
                return Err(format!(
                    "edu {}: expected C_BAD_STREAMID from StreamID {sid:#x}, recorded {:?}",
                    f.addr,
                    drain
                        .faults
                        .iter()
                        .take(4)
                        .map(|a| a.fault)
                        .collect::<alloc::vec::Vec<_>>()
                ));
            }
            if !untouched(buffer, 0x5a) {
                return Err(format!("edu {}: blocked DMA changed memory", f.addr));
            }
            info!(
                "smmu-ownership: edu {} blocked: {} event(s) {}",
                f.addr,
                mine.len(),
                mine[0].fault
            );
            blocked += 1;
        }
    }
    platform
        .frames
        .lock()
        .free(buffer, 1)
        .map_err(|e| format!("{e}"))?;
    if blocked == 0 {
        return Err(String::from("no edu device behind an SMMU on this board"));
    }
    info!(
        "smmu-ownership: {blocked} edu device(s) blocked by {} owned SMMU(s), {uncovered} behind none",
        owned.units.len()
    );
    Ok(())
}
