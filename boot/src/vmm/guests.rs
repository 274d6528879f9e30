//! The VT-d side of an x86 machine running guests: PCI and every VT-d unit
//! under Sluice's control, and the VT-d backend under the iommufd object
//! model with every assignable function registered.

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use log::warn;
use sluice_hypervisor::iommufd::{MsiWindow, VmConfig, VtdBackend, VtdDevice, X86_MSI_WINDOW};
use sluice_hypervisor::vm::instance::device_id;
use sluice_kernel::platform::Platform;
use sluice_pci::PciAddress;

use crate::guest_runtime::{EcamReset, Machine, MsiRouting};
use crate::iommu_owner::OwnedIommus;
use crate::pci::{IommuMap, Pci};

/// The machine, over its VT-d units.
pub type VtdMachine = Machine<VtdBackend<'static>>;

/// The VT-d backend over every owned unit, with every covered function
/// registered (its requester ID and DMA alias). Functions an RMRR names stay
/// out: firmware DMAs into their RMRRs, so they are never assigned.
fn vtd_backend(
    owned: OwnedIommus,
    map: &IommuMap,
    pci: &'static Pci,
) -> (VtdBackend<'static>, BTreeSet<PciAddress>) {
    let mut backend = VtdBackend::new();
    backend.set_function_reset(Box::new(EcamReset {
        ecam: &pci.ecam,
        topologies: &pci.segments,
    }));
    let unit_index: Vec<u32> = owned
        .units
        .into_iter()
        .map(|unit| backend.add_unit(unit.unit))
        .collect();
    let mut registered = BTreeSet::new();
    for (&addr, &unit) in &owned.device_unit {
        if owned.rmrr_devices.contains_key(&addr) {
            warn!("pci {addr}: named by an RMRR; it stays with the host and cannot be assigned");
            continue;
        }
        let (Some(assoc), Some(function), Some(&unit)) = (
            map.device(addr),
            pci.functions().find(|f| f.addr == addr),
            unit_index.get(unit),
        ) else {
            continue;
        };
        if function.is_bridge() {
            continue;
        }
        let aliases = if assoc.requester_id != addr.bdf {
            alloc::vec![assoc.requester_id]
        } else {
            Vec::new()
        };
        let desc = VtdDevice {
            unit,
            rid: addr.bdf,
            aliases,
            flr: function.caps.flr(),
        };
        match backend.add_device(device_id(addr), desc) {
            Ok(()) => {
                registered.insert(addr);
            }
            Err(e) => warn!("pci {addr}: cannot be assigned: {e}"),
        }
    }
    (backend, registered)
}

/// Brings PCI and every VT-d unit under Sluice's control and validates the
/// `vm=` words against what was found (see [`Machine::new`]).
pub fn prepare(platform: &'static Platform) -> Result<VtdMachine, String> {
    let acpi = platform
        .acpi
        .as_ref()
        .ok_or("no ACPI tables: PCI and the IOMMUs are unknown")?;
    let pci: &'static Pci = Box::leak(Box::new(crate::pci::discover(acpi)?));
    let map = crate::pci::associate(acpi, pci)?;
    let owned = crate::iommu_owner::take_ownership(platform, &map)?;
    let (backend, registered) = vtd_backend(owned, &map, pci);
    Machine::new(
        platform,
        pci,
        &map,
        backend,
        &registered,
        MsiRouting {
            window: Some(MsiWindow::Bypass(X86_MSI_WINDOW)),
            doorbells: BTreeMap::new(),
        },
        VmConfig::default(),
    )
}
