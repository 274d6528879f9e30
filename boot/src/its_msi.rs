//! The `its-msi` scenario (aarch64): Sluice takes every GIC ITS over and
//! proves with real MSIs from two edu devices that a device raises
//! exactly the LPIs Sluice mapped for its DeviceID:
//! * an MSI is a DMA write the SMMU translates: both edus' streams are
//!   attached to one stage-1 domain whose software-managed MSI window
//!   (IOVA 0x800_0000, as the iommufd object model sets it) maps the ITS
//!   doorbell page as device memory;
//! * the ITS drops the MSI of a DeviceID it has no mapping for, and an
//!   EventID the device's table lacks;
//! * a mapped (DeviceID, EventID) sets its own LPI pending at the boot
//!   CPU's redistributor and no other; no device reaches another's LPI
//!   whatever EventID it writes;
//! * an MSI aimed at an IOVA the domain does not map is a translation
//!   fault naming the device's StreamID, not an interrupt.
//!
//! Board facts (QEMU 7.2 `virt,gic-version=3`): the ITS takes the PCI
//! requester ID as DeviceID (the IORT maps RID → StreamID → DeviceID one
//! to one); the redistributor keeps LPI pending state in the pending table
//! in memory, where the host (interrupts masked at EL2) reads it.

extern crate alloc;

use alloc::format;
use alloc::string::String;

use log::info;
use sluice_gic::Lpi;
use sluice_gic::redist::LpiConfig;
use sluice_hal::{PAGE_SIZE, PhysAddr, poll_until};
use sluice_hypervisor::iommufd::ARM_SW_MSI_WINDOW;
use sluice_iommu::association::UnitId;
use sluice_iommu::pagetable::MapPerms;
use sluice_iommu::smmuv3::{Access, EventKind, MemoryKind, SmmuDomainConfig, SmmuUnit};
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::FrameDmaMemory;
use sluice_kernel::platform::Platform;
use sluice_pci::PciAddress;

use crate::edu::Edu;
use crate::its_owner::OwnedGic;

/// Where the domain maps the doorbell page: the first page of the window.
const MSI_IOVA: u64 = ARM_SW_MSI_WINDOW.0;
/// An IOVA in the window the domain does not map.
const UNMAPPED_MSI_IOVA: u64 = ARM_SW_MSI_WINDOW.0 + PAGE_SIZE;
/// QEMU delivers an MSI synchronously; hardware within microseconds.
const DELIVERY_TIMEOUT_NS: u64 = 100_000_000;
/// How long an MSI that must not arrive is given to arrive anyway.
const SETTLE_NS: u64 = 20_000_000;

/// One edu as the scenario drives it.
struct Device {
    edu: Edu,
    addr: PciAddress,
    stream_id: u32,
    device_id: u32,
}

/// Programs `device`'s MSI with `iova` and `event` and raises it.
fn raise(pci: &crate::pci::Pci, device: &Device, iova: u64, event: u16) -> Result<(), String> {
    pci.enable_msi(device.addr, iova, event)?;
    device.edu.raise_interrupt(1);
    Ok(())
}

fn pending(gic: &OwnedGic, lpi: Lpi) -> bool {
    gic.this_cpu()
        .is_some_and(|c| c.redistributor.lpi_pending(lpi))
}

fn expect_pending(gic: &OwnedGic, lpi: Lpi, what: &str) -> Result<(), String> {
    poll_until(&KernelClock, DELIVERY_TIMEOUT_NS, || {
        pending(gic, lpi).then_some(())
    })
    .map_err(|_| format!("{what}: {lpi} did not become pending"))?;
    info!("its-msi: {what}: {lpi} pending");
    Ok(())
}

fn expect_quiet(gic: &OwnedGic, lpis: &[Lpi], what: &str) -> Result<(), String> {
    sluice_kernel::clock::delay_ns(SETTLE_NS);
    if let Some(lpi) = lpis.iter().find(|&&l| pending(gic, l)) {
        return Err(format!("{what}: {lpi} became pending"));
    }
    info!("its-msi: {what}: dropped, no LPI pending");
    Ok(())
}

fn no_events(unit: &mut SmmuUnit<'_>, what: &str) -> Result<(), String> {
    let drain = unit.drain_events();
    if drain.faults.is_empty() && !drain.overflowed {
        return Ok(());
    }
    Err(format!(
        "{what}: the SMMU reported {:?}",
        drain
            .faults
            .iter()
            .map(|f| f.fault)
            .collect::<alloc::vec::Vec<_>>()
    ))
}

pub fn run(platform: &'static Platform) -> Result<(), String> {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let map = crate::pci::associate(acpi, &pci)?;
    let mut gic = crate::its_owner::take_ownership(platform)?;
    let mut devices = alloc::vec::Vec::new();
    for (edu, addr) in crate::scenarios::all_edus(&pci)? {
        let a = map
            .device(addr)
            .ok_or_else(|| format!("edu {addr} has no IOMMU association"))?;
        let (Some(stream_id), Some(device_id), Some(its_id)) =
            (a.stream_id, a.its_device_id, a.its_id)
        else {
            return Err(format!(
                "edu {addr}: the IORT gives it no StreamID, ITS DeviceID or ITS"
            ));
        };
        if a.unit != Some(UnitId::Smmu(0)) {
            return Err(format!("edu {addr} is not behind the first SMMU"));
        }
        devices.push((
            Device {
                edu,
                addr,
                stream_id,
                device_id,
            },
            its_id,
        ));
    }
    let [(a, its_a), (b, its_b)] = <[_; 2]>::try_from(devices)
        .map_err(|d| format!("the scenario needs two edus, the board has {}", d.len()))?;
    if its_a != its_b {
        return Err(String::from("the two edus signal different ITSes"));
    }
    let doorbell_address = gic
        .its_mut(its_a)
        .ok_or_else(|| format!("ITS ID {its_a} is not in the MADT"))?
        .doorbell();
    let doorbell = PhysAddr::new(doorbell_address & !(PAGE_SIZE - 1));
    let doorbell_offset = doorbell_address & (PAGE_SIZE - 1);
    let icid = gic
        .this_cpu()
        .ok_or("the boot CPU has no redistributor")?
        .icid;

    // The SMMU: one stage-1 domain for both streams with the doorbell at
    // the window's first page, as device memory.
    let (mmio, config) = crate::smmu_dma::smmu_registers(acpi, 0)?;
    let memory = FrameDmaMemory::new(&platform.frames);
    let mut unit = SmmuUnit::init(&mmio, &memory, &KernelClock, config)
        .map_err(|e| format!("SMMU init: {e}"))?;
    let domain = unit
        .alloc_domain(SmmuDomainConfig::any())
        .map_err(|e| format!("domain: {e}"))?;
    unit.map_memory(
        domain,
        MSI_IOVA,
        doorbell,
        PAGE_SIZE,
        MapPerms::READ_WRITE,
        MemoryKind::Device,
    )
    .map_err(|e| format!("doorbell map: {e}"))?;
    for d in [&a, &b] {
        unit.attach_stream(d.stream_id, domain)
            .map_err(|e| format!("attach {}: {e}", d.addr))?;
    }
    info!(
        "its-msi: edus {} (StreamID/DeviceID {:#x}) and {} ({:#x}) share a domain; doorbell {:#x} at IOVA {MSI_IOVA:#x}",
        a.addr, a.device_id, b.addr, b.device_id, doorbell_address
    );
    let msi = MSI_IOVA + doorbell_offset;

    // Two LPIs, enabled in the configuration table; only A is mapped.
    let lpi_a = gic.lpis.alloc().map_err(|e| format!("{e}"))?;
    let lpi_b = gic.lpis.alloc().map_err(|e| format!("{e}"))?;
    let its = gic.its_mut(its_a).ok_or("the ITS vanished")?;
    its.map_device(a.device_id, 1)
        .and_then(|()| its.map_event(a.device_id, 0, lpi_a, icid))
        .map_err(|e| format!("map A: {e}"))?;
    let (its, tables) = gic.its_with_tables(its_a).ok_or("the ITS vanished")?;
    its.configure_event(tables, a.device_id, 0, LpiConfig::enabled(0xa0))
        .map_err(|e| format!("configure A: {e}"))?;
    tables
        .set(lpi_b, LpiConfig::enabled(0xa0))
        .map_err(|e| format!("configure B's LPI: {e}"))?;
    if pending(&gic, lpi_a) || pending(&gic, lpi_b) {
        return Err(String::from("an LPI was pending before any MSI"));
    }

    // 1. An unmapped DeviceID: B's MSI reaches the doorbell and is dropped.
    raise(&pci, &b, msi, 0)?;
    expect_quiet(&gic, &[lpi_a, lpi_b], "MSI of an unmapped DeviceID")?;
    // 2. A with an EventID its table lacks: dropped, not someone else's.
    raise(&pci, &a, msi, 1)?;
    expect_quiet(&gic, &[lpi_a, lpi_b], "MSI with an unmapped EventID")?;
    no_events(&mut unit, "MSIs through the mapped doorbell")?;
    // 3. A's mapped event: its LPI, and only its.
    raise(&pci, &a, msi, 0)?;
    expect_pending(&gic, lpi_a, "edu A's event 0")?;
    expect_quiet(&gic, &[lpi_b], "edu A's event 0, B's LPI")?;
    // 4. Once B is mapped its MSI works too: step 1 was the ITS refusing,
    // not a broken path.
    let its = gic.its_mut(its_a).ok_or("the ITS vanished")?;
    its.map_device(b.device_id, 1)
        .and_then(|()| its.map_event(b.device_id, 0, lpi_b, icid))
        .and_then(|()| its.invalidate(b.device_id, 0))
        .map_err(|e| format!("map B: {e}"))?;
    raise(&pci, &b, msi, 0)?;
    expect_pending(&gic, lpi_b, "edu B's event 0 once mapped")?;
    no_events(&mut unit, "mapped MSIs")?;
    // 5. An MSI to an IOVA the domain does not map is a DMA fault.
    raise(&pci, &a, UNMAPPED_MSI_IOVA + doorbell_offset, 0)?;
    let drain = unit.drain_events();
    let fault = drain
        .faults
        .iter()
        .find(|f| f.fault.stream_id == a.stream_id)
        .ok_or("an MSI to an unmapped IOVA raised no SMMU event")?;
    if fault.fault.kind != EventKind::Translation
        || fault.fault.access != Some(Access::Write)
        || fault.fault.address != Some(UNMAPPED_MSI_IOVA + doorbell_offset)
    {
        return Err(format!(
            "unexpected event for the stray MSI: {}",
            fault.fault
        ));
    }
    info!("its-msi: MSI to an unmapped IOVA: {}", fault.fault);

    // Leave the devices quiet and the ITS without their mappings.
    for d in [&a, &b] {
        let its = gic.its_mut(its_a).ok_or("the ITS vanished")?;
        its.unmap_device(d.device_id)
            .map_err(|e| format!("unmap {}: {e}", d.addr))?;
        unit.detach_stream(d.stream_id)
            .map_err(|e| format!("detach {}: {e}", d.addr))?;
    }
    unit.free_domain(domain)
        .map_err(|e| format!("free the domain: {e}"))?;
    Ok(())
}
