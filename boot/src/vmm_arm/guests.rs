//! The SMMU side of an aarch64 machine running guests: PCI and every SMMU
//! under Sluice's control, and the SMMUv3 backend under the iommufd object
//! model with every assignable function registered by its StreamID.

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use log::warn;
use sluice_hypervisor::iommufd::smmu_backend::{SmmuBackend, SmmuDevice};
use sluice_hypervisor::iommufd::{ARM_SW_MSI_WINDOW, MsiWindow, VmConfig};
use sluice_hypervisor::vm::instance::device_id;
use sluice_kernel::platform::Platform;
use sluice_pci::PciAddress;

use crate::guest_runtime::{EcamReset, Machine, MsiRouting};
use crate::pci::Pci;
use crate::smmu_owner::OwnedSmmus;

/// The machine, over its SMMUs.
pub type SmmuMachine = Machine<SmmuBackend<'static>>;

/// The SMMUv3 backend over every owned SMMU, with every covered function
/// registered by its StreamID. Functions an RMR names stay out: firmware
/// DMAs into their RMR ranges, so they are never assigned.
fn smmu_backend(
    owned: OwnedSmmus,
    pci: &'static Pci,
) -> (SmmuBackend<'static>, BTreeSet<PciAddress>) {
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
    let mut registered = BTreeSet::new();
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
                registered.insert(addr);
            }
            Err(e) => warn!("pci {addr}: cannot be assigned: {e:?}"),
        }
    }
    (backend, registered)
}

/// Brings PCI and every SMMU under Sluice's control and validates the
/// `vm=` words against what was found (see [`Machine::new`]). Every VM
/// gets `vm_config` in the object model.
pub fn prepare(platform: &'static Platform, vm_config: VmConfig) -> Result<SmmuMachine, String> {
    let acpi = platform
        .acpi
        .as_ref()
        .ok_or("no ACPI tables: PCI and the SMMUs are unknown")?;
    let pci: &'static Pci = Box::leak(Box::new(crate::pci::discover(acpi)?));
    let map = crate::pci::associate(acpi, pci)?;
    let owned = crate::smmu_owner::take_ownership(platform, &map)?;
    let (backend, registered) = smmu_backend(owned, pci);
    // On Arm an MSI is a write the SMMU translates like any other, to the
    // ITS doorbell: the software-managed window is reserved for the
    // doorbell pages the object model maps.
    let msi = MsiRouting {
        window: Some(MsiWindow::SoftwareManaged(ARM_SW_MSI_WINDOW)),
        doorbells: BTreeMap::new(),
    };
    Machine::new(platform, pci, &map, backend, &registered, msi, vm_config)
}
