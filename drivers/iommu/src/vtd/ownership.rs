//! Taking ownership of every VT-d unit the DMAR describes, the way Sluice
//! does at boot (VT-d spec rev 4.x, 8.3 DRHD and 8.4 RMRR):
//!
//! * one [`VtdUnit`] per DRHD, brought up with an empty root table, so
//!   every device it covers — listed or not, enumerated or not — is blocked
//!   from the moment translation is on;
//! * each RMRR is identity-mapped, on the unit that covers them, for the
//!   devices its scopes name (and their DMA aliases), and those devices are
//!   flagged: their firmware keeps DMAing there, so giving them to a guest
//!   would let the guest reach that memory;
//! * a DRHD that cannot be brought up is reported loudly, and every device
//!   it covers is marked uncovered: it is not isolated and is never
//!   assigned;
//! * interrupt remapping is switched on where the unit has it (ECAP.IR)
//!   and the DMAR says the platform supports it (INTR_REMAP, 8.1), with
//!   every entry not present and compatibility-format interrupts blocked;
//!   a unit where that fails stays owned for DMA but reports
//!   [`VtdUnit::interrupt_remapping_enabled`] false, so its devices get no
//!   MSI isolation.
//!
//! Nothing here touches real hardware directly: the caller hands each DRHD
//! its register window, DMA memory and clock through a factory, so the same
//! logic runs over [`VtdModel`](super::model::VtdModel) in host tests and
//! over the real units at boot.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::fmt;

use sluice_hal::{Clock, DmaMemory, Mmio};
use sluice_pci::{Bdf, PciAddress, Segment};

use super::error::VtdError;
use super::intremap::IrConfig;
use super::unit::{ModeRequest, VtdConfig, VtdUnit};
use crate::acpi::dmar::{Dmar, DmarFlags, Drhd};
use crate::association::{Association, ReservedSource, UnitId};

/// What the driver needs to reach one DRHD.
#[derive(Clone, Copy)]
pub struct UnitHardware<'a> {
    pub mmio: &'a dyn Mmio,
    pub mem: &'a dyn DmaMemory,
    pub clock: &'a dyn Clock,
}

/// How the units are brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnershipConfig {
    pub mode: ModeRequest,
    /// How long any single wait on a unit may take.
    pub timeout_ns: u64,
    /// Switch interrupt remapping on (for hosts whose APICs run in this
    /// mode) wherever the unit and the platform support it; `None` leaves
    /// it off.
    pub interrupt_remapping: Option<IrConfig>,
}

impl OwnershipConfig {
    pub const fn new() -> Self {
        Self {
            mode: ModeRequest::PreferScalable,
            timeout_ns: 100_000_000,
            interrupt_remapping: Some(IrConfig { x2apic: false }),
        }
    }
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One unit under Sluice's control.
pub struct OwnedUnit<'a> {
    /// Index of its DRHD in [`Dmar::drhds`] (`dmarN` in the logs).
    pub drhd: usize,
    pub segment: Segment,
    pub register_base: u64,
    pub unit: VtdUnit<'a>,
}

/// Why a DRHD is not under Sluice's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnershipError {
    /// The platform could not provide the unit's registers or memory.
    NoHardware(&'static str),
    /// Another DRHD already names the same register block.
    DuplicateRegisterBase { first: usize },
    /// Bring-up failed.
    Init(VtdError),
}

impl fmt::Display for OwnershipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHardware(why) => write!(f, "its registers are unusable: {why}"),
            Self::DuplicateRegisterBase { first } => {
                write!(f, "dmar{first} already uses the same register block")
            }
            Self::Init(e) => write!(f, "bring-up failed: {e}"),
        }
    }
}

/// A DRHD left alone, with the devices that are therefore not isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedUnit {
    pub drhd: usize,
    pub register_base: u64,
    pub error: OwnershipError,
    pub devices: Vec<PciAddress>,
}

/// A firmware-reserved region (RMRR) a device keeps reaching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmrrRegion {
    /// Index in [`Dmar::rmrrs`].
    pub rmrr: usize,
    pub base: u64,
    /// Last byte (inclusive).
    pub limit: u64,
    /// Why the identity map could not be installed (the device stays
    /// blocked from the region, so its firmware's DMA there faults).
    pub error: Option<VtdError>,
}

/// A device some RMRR names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RmrrDevice {
    /// Index in [`OwnedIommus::units`].
    pub unit: usize,
    /// The requester IDs attached to the identity map: the function and
    /// its DMA alias, if it has one.
    pub requester_ids: Vec<Bdf>,
    pub regions: Vec<RmrrRegion>,
}

/// What Sluice may do with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus<'s> {
    /// Covered by an owned unit and blocked.
    Isolated { unit: usize },
    /// Covered by an owned unit, but firmware DMAs to these regions and
    /// they are identity-mapped for it: assigning it would hand a guest that
    /// memory.
    Rmrr {
        unit: usize,
        regions: &'s [RmrrRegion],
    },
    /// No owned unit translates its DMA: never assign it.
    Uncovered,
}

/// Every VT-d unit of the platform under Sluice's control, for the
/// hypervisor runtime to take by value.
pub struct OwnedIommus<'a> {
    pub units: Vec<OwnedUnit<'a>>,
    /// Every enumerated function covered by an owned unit → index in
    /// [`units`](Self::units).
    pub device_unit: BTreeMap<PciAddress, usize>,
    /// Functions an RMRR names (on an owned unit).
    pub rmrr_devices: BTreeMap<PciAddress, RmrrDevice>,
    /// Functions no owned unit covers: outside every scope, or behind a
    /// unit that failed.
    pub uncovered: BTreeSet<PciAddress>,
    pub failed: Vec<FailedUnit>,
}

impl<'a> OwnedIommus<'a> {
    pub fn unit_of(&self, addr: PciAddress) -> Option<&OwnedUnit<'a>> {
        self.units.get(*self.device_unit.get(&addr)?)
    }

    pub fn unit_of_mut(&mut self, addr: PciAddress) -> Option<&mut OwnedUnit<'a>> {
        let index = *self.device_unit.get(&addr)?;
        self.units.get_mut(index)
    }

    /// The owned unit of DRHD `drhd`, if it came up.
    pub fn unit_for_drhd(&self, drhd: usize) -> Option<usize> {
        self.units.iter().position(|u| u.drhd == drhd)
    }

    pub fn is_rmrr_device(&self, addr: PciAddress) -> bool {
        self.rmrr_devices.contains_key(&addr)
    }

    pub fn status(&self, addr: PciAddress) -> DeviceStatus<'_> {
        match (self.device_unit.get(&addr), self.rmrr_devices.get(&addr)) {
            (Some(&unit), Some(r)) => DeviceStatus::Rmrr {
                unit,
                regions: &r.regions,
            },
            (Some(&unit), None) => DeviceStatus::Isolated { unit },
            (None, _) => DeviceStatus::Uncovered,
        }
    }
}

/// Brings up one unit per DRHD of `dmar`, applies the RMRRs, and returns
/// the owned set. `associations` are the per-segment device associations
/// made from the same DMAR; `hardware(index, drhd)` provides each DRHD's
/// register window, memory and clock. Failures are logged and recorded;
/// this never gives up on the other units.
pub fn take_ownership<'a>(
    dmar: &Dmar,
    associations: &[Association],
    config: &OwnershipConfig,
    mut hardware: impl FnMut(usize, &Drhd) -> Result<UnitHardware<'a>, &'static str>,
) -> OwnedIommus<'a> {
    let mut owned = OwnedIommus {
        units: Vec::new(),
        device_unit: BTreeMap::new(),
        rmrr_devices: BTreeMap::new(),
        uncovered: BTreeSet::new(),
        failed: Vec::new(),
    };
    // DRHD index → index in `owned.units`.
    let mut by_drhd: BTreeMap<usize, usize> = BTreeMap::new();
    let mut bases: BTreeMap<u64, usize> = BTreeMap::new();
    for (index, drhd) in dmar.drhds.iter().enumerate() {
        match bring_up(dmar, index, drhd, config, &bases, &mut hardware) {
            Ok(unit) => {
                by_drhd.insert(index, owned.units.len());
                bases.insert(drhd.register_base, index);
                owned.units.push(OwnedUnit {
                    drhd: index,
                    segment: drhd.segment,
                    register_base: drhd.register_base,
                    unit,
                });
            }
            Err(error) => {
                log::error!(
                    "dmar{index} @{:#x}: NOT under Sluice's control, {error}; \
                     the devices it covers are not isolated and will never be assigned",
                    drhd.register_base
                );
                owned.failed.push(FailedUnit {
                    drhd: index,
                    register_base: drhd.register_base,
                    error,
                    devices: Vec::new(),
                });
            }
        }
    }

    for association in associations {
        for d in &association.devices {
            match d.unit {
                Some(UnitId::Drhd(n)) => match by_drhd.get(&n) {
                    Some(&u) => {
                        owned.device_unit.insert(d.addr, u);
                    }
                    None => {
                        owned.uncovered.insert(d.addr);
                        if let Some(f) = owned.failed.iter_mut().find(|f| f.drhd == n) {
                            f.devices.push(d.addr);
                        }
                    }
                },
                _ => {
                    owned.uncovered.insert(d.addr);
                }
            }
        }
    }
    for f in &owned.failed {
        for addr in &f.devices {
            log::error!(
                "pci {addr}: its IOMMU dmar{} is not under Sluice's control; it will not be assigned",
                f.drhd
            );
        }
    }

    apply_rmrrs(associations, &mut owned);

    for (i, u) in owned.units.iter().enumerate() {
        let devices = owned.device_unit.values().filter(|&&x| x == i).count();
        let rmrr = owned.rmrr_devices.values().filter(|r| r.unit == i).count();
        log::info!(
            "dmar{} @{:#x}: owned, {:?} mode, {} devices blocked, {} identity-mapped for RMRRs, \
             interrupt remapping {}",
            u.drhd,
            u.register_base,
            u.unit.mode(),
            devices.saturating_sub(rmrr),
            rmrr,
            if u.unit.interrupt_remapping_enabled() {
                "on"
            } else {
                "off"
            }
        );
    }
    owned
}

fn bring_up<'a>(
    dmar: &Dmar,
    index: usize,
    drhd: &Drhd,
    config: &OwnershipConfig,
    bases: &BTreeMap<u64, usize>,
    hardware: &mut impl FnMut(usize, &Drhd) -> Result<UnitHardware<'a>, &'static str>,
) -> Result<VtdUnit<'a>, OwnershipError> {
    if let Some(&first) = bases.get(&drhd.register_base) {
        return Err(OwnershipError::DuplicateRegisterBase { first });
    }
    if drhd.register_base == 0 || !drhd.register_base.is_multiple_of(4096) {
        return Err(OwnershipError::NoHardware(
            "the register base is zero or not page-aligned",
        ));
    }
    let hw = hardware(index, drhd).map_err(OwnershipError::NoHardware)?;
    let unit_config = VtdConfig {
        mode: config.mode,
        timeout_ns: config.timeout_ns,
        ..VtdConfig::new(
            index as u32,
            drhd.register_base,
            u32::from(dmar.host_address_width),
        )
    };
    let mut unit =
        VtdUnit::init(hw.mmio, hw.mem, hw.clock, unit_config).map_err(OwnershipError::Init)?;
    if let Some(ir) = config.interrupt_remapping {
        let platform_ir = dmar.flags.contains(DmarFlags::INTR_REMAP);
        match (unit.capabilities().interrupt_remapping, platform_ir) {
            (true, true) => {
                // Logged inside; DMA isolation stands either way.
                let _ = unit.enable_interrupt_remapping(ir);
            }
            (true, false) => log::warn!(
                "dmar{index}: the unit can remap interrupts but the DMAR does not declare \
                 INTR_REMAP; interrupt remapping stays off, MSIs are not isolated"
            ),
            (false, _) => log::warn!(
                "dmar{index}: no interrupt remapping (ECAP.IR = 0); MSIs of its devices are not isolated"
            ),
        }
    }
    Ok(unit)
}

/// Identity-maps each RMRR on the unit of each device it names.
fn apply_rmrrs(associations: &[Association], owned: &mut OwnedIommus<'_>) {
    for association in associations {
        for region in &association.reserved {
            let ReservedSource::Rmrr(rmrr) = region.source else {
                continue;
            };
            // Devices of this region, grouped by owned unit.
            let mut per_unit: BTreeMap<usize, Vec<(PciAddress, Vec<Bdf>)>> = BTreeMap::new();
            for &addr in &region.devices {
                let Some(&unit) = owned.device_unit.get(&addr) else {
                    log::error!(
                        "pci {addr}: RMRR {:#x}..={:#x} names it but no owned IOMMU covers it",
                        region.base,
                        region.limit
                    );
                    continue;
                };
                let mut rids = alloc::vec![addr.bdf];
                if let Some(alias) = association.get(addr).and_then(|d| d.alias)
                    && alias.requester_id != addr.bdf
                {
                    rids.push(alias.requester_id);
                }
                per_unit.entry(unit).or_default().push((addr, rids));
            }
            for (unit, devices) in per_unit {
                let Some(owned_unit) = owned.units.get_mut(unit) else {
                    continue;
                };
                let mut rids: Vec<Bdf> = devices.iter().flat_map(|(_, r)| r.clone()).collect();
                rids.sort_unstable();
                rids.dedup();
                let error = owned_unit
                    .unit
                    .map_rmrr(region.base, region.limit, &rids)
                    .err();
                for (addr, device_rids) in devices {
                    match error {
                        Some(e) => log::error!(
                            "pci {addr}: RMRR {:#x}..={:#x} could not be identity-mapped ({e}); \
                             its firmware's DMA there will fault",
                            region.base,
                            region.limit
                        ),
                        None => log::warn!(
                            "pci {addr}: RMRR {:#x}..={:#x} identity-mapped on dmar{}; \
                             the device must not be assigned to a guest",
                            region.base,
                            region.limit,
                            owned_unit.drhd
                        ),
                    }
                    let entry = owned.rmrr_devices.entry(addr).or_insert(RmrrDevice {
                        unit,
                        requester_ids: device_rids,
                        regions: Vec::new(),
                    });
                    entry.regions.push(RmrrRegion {
                        rmrr,
                        base: region.base,
                        limit: region.limit,
                        error,
                    });
                }
            }
        }
    }
}
