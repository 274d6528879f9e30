//! The SMMU side of an aarch64 machine running guests: PCI and every SMMU
//! under Sluice's control, and the SMMUv3 backend under the iommufd object
//! model with every assignable function registered by its StreamID.

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use log::warn;
use sluice_hal::PhysAddr;
use sluice_hypervisor::iommufd::smmu_backend::{SmmuBackend, SmmuDevice};
use sluice_hypervisor::iommufd::{ARM_SW_MSI_WINDOW, MsiWindow, VmConfig};
use sluice_hypervisor::vm::instance::device_id;
use sluice_kernel::platform::Platform;
use sluice_kernel::println;
use sluice_pci::PciAddress;

use crate::guest_runtime::{EcamReset, Machine, MsiRouting};
use crate::pci::{IommuMap, Pci};
use crate::smmu_owner::OwnedSmmus;

/// The machine, over its SMMUs.
pub type SmmuMachine = Machine<SmmuBackend<'static>>;

/// The SMMUv3 backend over every owned SMMU, with every covered function
/// registered by its StreamID. Functions an RMR names stay out: firmware
/// DMAs into their RMR ranges, so they are never assigned.
fn smmu_backend(
    owned: OwnedSmmus,
    pci: &'static Pci,
) -> (SmmuBackend<'static>, BTreeMap<PciAddress, u32>) {
    let mut backend = SmmuBackend::new();
    backend.set_function_reset(Box::new(EcamReset {
        ecam: &pci.ecam,
        topologies: &pci.segments,
    }));
    let rmr: BTreeSet<PciAddress> = owned
        .device_unit
        .keys()
        .copied()
        .filter(|&a| owned.is_rmr_device(a))
        .collect();
    let mut unit_index = Vec::new();
    for unit in owned.units {
        unit_index.push(backend.add_unit(unit.unit));
    }
    let mut registered = BTreeMap::new();
    for (&addr, &(unit, stream_id)) in &owned.device_unit {
        if rmr.contains(&addr) {
            warn!("pci {addr}: named by an RMR; it stays with the host and cannot be assigned");
            continue;
        }
        let Some(function) = pci.functions().find(|f| f.addr == addr) else {
            continue;
        };
        if function.is_bridge() {
            continue;
        }
        let Some(&unit) = unit_index.get(unit) else {
            continue;
        };
        let desc = SmmuDevice {
            unit,
            stream_id,
            rid: addr.bdf,
            flr: function.caps.flr(),
        };
        match backend.add_device(device_id(addr), desc) {
            Ok(()) => {
                registered.insert(addr, unit);
            }
            Err(e) => warn!("pci {addr}: cannot be assigned: {e:?}"),
        }
    }
    (backend, registered)
}

/// MSI isolation for the registered functions (by backend unit): every
/// ITS taken over, each function's doorbell page from the ITS the IORT
/// sends its MSIs to. A unit is isolated when every function behind it
/// signals an owned ITS; the backend is told so, per unit.
fn isolate_msis(
    platform: &'static Platform,
    map: &IommuMap,
    backend: &mut SmmuBackend<'static>,
    registered: &BTreeMap<PciAddress, u32>,
) -> (BTreeMap<PciAddress, PhysAddr>, bool) {
    let gic = match crate::its_owner::take_ownership(platform) {
        Ok(gic) => gic,
        Err(e) => {
            warn!("gic: {e}; device MSIs cannot be isolated");
            return (BTreeMap::new(), false);
        }
    };
    let pages = gic.doorbell_pages();
    let mut doorbells = BTreeMap::new();
    let mut unisolated = BTreeSet::new();
    for d in map.per_segment.iter().flat_map(|a| &a.devices) {
        let Some(&unit) = registered.get(&d.addr) else {
            continue;
        };
        match d.its_id.and_then(|id| pages.get(&id)) {
            Some(&page) => {
                doorbells.insert(d.addr, page);
            }
            None => {
                warn!(
                    "pci {}: its MSIs reach no ITS Sluice owns; SMMU unit {unit} cannot isolate MSIs",
                    d.addr
                );
                unisolated.insert(unit);
            }
        }
    }
    let units: BTreeSet<u32> = registered.values().copied().collect();
    for &unit in &units {
        backend.set_msi_isolation(unit, !pages.is_empty() && !unisolated.contains(&unit));
    }
    // Sluice keeps the ITSes for good: their tables must outlive any
    // mapping a device could use.
    Box::leak(Box::new(gic));
    (doorbells, !pages.is_empty() && unisolated.is_empty())
}

/// Brings PCI, every SMMU and every GIC ITS under Sluice's control and
/// validates the `vm=` words against what was found (see
/// [`Machine::new`]). Where every assignable function's MSIs go to an ITS
/// Sluice owns, the VMs need nothing more; otherwise they are declared
/// with `allow_unsafe_interrupts` (said on the console, warned per device
/// bound), the iommufd answer to an IOMMU that cannot isolate MSIs.
pub fn prepare(platform: &'static Platform) -> Result<SmmuMachine, String> {
    let acpi = platform
        .acpi
        .as_ref()
        .ok_or("no ACPI tables: PCI and the SMMUs are unknown")?;
    let pci: &'static Pci = Box::leak(Box::new(crate::pci::discover(acpi)?));
    let map = crate::pci::associate(acpi, pci)?;
    let owned = crate::smmu_owner::take_ownership(platform, &map)?;
    let (mut backend, registered) = smmu_backend(owned, pci);
    let (doorbells, isolated) = isolate_msis(platform, &map, &mut backend, &registered);
    let vm_config = if isolated {
        println!("  MSIs: every ITS is Sluice's; devices raise only the interrupts Sluice maps");
        VmConfig::default()
    } else {
        println!(
            "  MSIs: not every device signals an ITS Sluice owns; the VMs bind their devices with allow_unsafe_interrupts"
        );
        VmConfig {
            allow_unsafe_interrupts: true,
            ..VmConfig::default()
        }
    };
    // On Arm an MSI is a write the SMMU translates like any other, to the
    // ITS doorbell: the software-managed window holds the doorbell pages
    // the object model maps.
    let msi = MsiRouting {
        window: Some(MsiWindow::SoftwareManaged(ARM_SW_MSI_WINDOW)),
        doorbells,
    };
    let registered: BTreeSet<PciAddress> = registered.into_keys().collect();
    Machine::new(platform, pci, &map, backend, &registered, msi, vm_config)
}
