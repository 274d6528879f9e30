//! [`IommuBackend`] over Sluice's VT-d driver: the iommufd object model's
//! devices, domains and attachments carried out on one or more
//! [`VtdUnit`]s (one per DRHD).
//!
//! The boot code brings the units up, hands them over with
//! [`VtdBackend::add_unit`], registers every assignable device with the
//! unit that translates it, its requester ID and its DMA aliases
//! ([`VtdBackend::add_device`]), and optionally gives the backend a way to
//! reset functions ([`VtdBackend::set_function_reset`]).
//!
//! * Domains are second-level tables (first-level on a scalable-mode unit
//!   without ECAP.SLTS) of the unit of the device they were made for, with
//!   the widest IOVA space up to 48 bits the unit offers; attaching one to a
//!   device of another unit is `Incompatible`.
//! * Every page-table page a domain holds is charged to the caller's
//!   [`PageBudget`] exactly (the driver's `table_pages` count), and
//!   released when the table page is freed. Pages are charged after the
//!   driver mapped (the driver has no way to price a map beforehand): a map
//!   that exceeds the budget is undone, so the overshoot is transient and
//!   bounded by the tables of one map call.
//! * Operations are all-or-nothing: a failed map leaves nothing mapped and
//!   nothing charged; a failed attach puts every requester ID back where it
//!   was.
//! * When an invalidation fails (a unit that stopped answering), the unit
//!   is marked stale: before a domain is freed its caches are flushed
//!   globally, and if that fails too the domain's tables are kept out of
//!   use rather than reused while a cache may still point at them.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use sluice_hal::PhysAddr;
use sluice_iommu::pagetable::MapPerms;
use sluice_iommu::vtd::{self, TranslationMode, VtdError, VtdUnit};
use sluice_pci::Bdf;

use super::backend::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, DomainId, FaultReason,
    FunctionReset, IommuBackend, IommuCaps, PageBudget, Prot, reset_function,
};

/// An assignable device as the backend needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtdDevice {
    /// The backend unit translating the device (from
    /// [`VtdBackend::add_unit`]).
    pub unit: u32,
    /// The device's own requester ID.
    pub rid: Bdf,
    /// Requester IDs its DMA may carry besides its own (a PCIe-to-PCI
    /// bridge above it, DMA-alias quirks). Aliases may be shared by
    /// several devices (which are then in one IOMMU group).
    pub aliases: Vec<Bdf>,
    /// The device supports function-level reset.
    pub flr: bool,
}

/// Why [`VtdBackend::add_device`] refused a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    NoSuchUnit(u32),
    DeviceExists(DeviceId),
    /// Another device already has this requester ID as its own.
    RidTaken {
        rid: Bdf,
        owner: DeviceId,
    },
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchUnit(u) => write!(f, "no VT-d unit {u} registered"),
            Self::DeviceExists(d) => write!(f, "device {} is already registered", d.0),
            Self::RidTaken { rid, owner } => {
                write!(
                    f,
                    "requester ID {rid} already belongs to device {}",
                    owner.0
                )
            }
        }
    }
}

struct Unit<'a> {
    unit: VtdUnit<'a>,
    /// What every device of the unit sees; `None` when the unit cannot make
    /// a domain at all (logged at registration).
    caps: Option<IommuCaps>,
    domain_kind: vtd::DomainKind,
    /// An invalidation failed since the last successful global flush.
    stale: bool,
}

struct Device {
    desc: VtdDevice,
    rid_target: AttachTarget,
    pasids: BTreeMap<u32, DomainId>,
}

impl Device {
    /// The device's own requester ID first, then its aliases, without
    /// repeats.
    fn requester_ids(&self) -> Vec<Bdf> {
        let mut out = alloc::vec![self.desc.rid];
        for &a in &self.desc.aliases {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

struct Domain {
    unit: u32,
    vtd: vtd::DomainId,
    config: DomainConfig,
    /// Table pages charged to the owner's budget: always the driver's
    /// `table_pages` of the domain after each operation.
    charged: u64,
    /// RID and PASID attachments.
    users: u32,
}

/// The VT-d implementation of [`IommuBackend`]. See the module docs.
pub struct VtdBackend<'a> {
    units: Vec<Unit<'a>>,
    devices: BTreeMap<DeviceId, Device>,
    domains: BTreeMap<DomainId, Domain>,
    next_domain: u64,
    reset: Option<Box<dyn FunctionReset + 'a>>,
}

impl Default for VtdBackend<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// Errors after which the unit's caches may hold entries the tables no
/// longer have (every other driver error is a refusal before any change).
fn is_hardware_failure(e: &VtdError) -> bool {
    matches!(
        e,
        VtdError::Timeout { .. }
            | VtdError::InvalidationQueueError { .. }
            | VtdError::DeviceTlbTimeout { .. }
            | VtdError::InvalidationCompletionError { .. }
    )
}

fn backend_error(e: VtdError) -> BackendError {
    match e {
        VtdError::OutOfMemory | VtdError::DomainIdsExhausted => BackendError::OutOfMemory,
        VtdError::PageTable(_) | VtdError::InvalidRange | VtdError::NoSuchDomain(_) => {
            BackendError::BadRange
        }
        // Hardware that does not complete an invalidation is reported as
        // the IOMMU refusing the change (the object model's EINVAL).
        _ => BackendError::Incompatible,
    }
}

fn floor_log2(v: u32) -> u8 {
    if v == 0 {
        0
    } else {
        (31 - v.leading_zeros()) as u8
    }
}

impl<'a> VtdBackend<'a> {
    pub fn new() -> Self {
        Self {
            units: Vec::new(),
            devices: BTreeMap::new(),
            domains: BTreeMap::new(),
            next_domain: 1,
            reset: None,
        }
    }

    /// How [`IommuBackend::reset_device`] resets functions. Without one,
    /// resets are `Unsupported`.
    pub fn set_function_reset(&mut self, reset: Box<dyn FunctionReset + 'a>) {
        self.reset = Some(reset);
    }

    /// Takes over a unit that [`VtdUnit::init`] brought up; returns its
    /// index for [`VtdDevice::unit`] (and [`IommuCaps::unit`]).
    pub fn add_unit(&mut self, unit: VtdUnit<'a>) -> u32 {
        let index = self.units.len() as u32;
        let c = unit.capabilities();
        let domain_kind = if unit.mode() == TranslationMode::Scalable && !c.second_level_translation
        {
            vtd::DomainKind::FirstLevel
        } else {
            vtd::DomainKind::SecondLevel
        };
        let config = vtd::DomainConfig {
            kind: domain_kind,
            enforce_snoop: false,
            address_width: None,
        };
        let caps = match unit.domain_shape(config) {
            Ok(shape) => Some(IommuCaps {
                unit: index,
                snoop_control: c.snoop_control,
                // Read live by `caps`: remapping may be enabled later.
                interrupt_remapping: false,
                scalable_mode: unit.mode() == TranslationMode::Scalable,
                max_pasid_log2: floor_log2(unit.pasid_limit()),
                page_sizes: shape.page_sizes(),
                input_address_bits: shape.iova_bits.min(64) as u8,
            }),
            Err(e) => {
                log::error!(
                    "vtd backend: unit {index} cannot make domains ({e}); its devices cannot be assigned"
                );
                None
            }
        };
        self.units.push(Unit {
            unit,
            caps,
            domain_kind,
            stale: false,
        });
        index
    }

    /// Registers an assignable device. Its requester IDs are the backend's
    /// from now on: the object model blocks them when the device is first
    /// bound (detaching them from anything the boot code attached, RMRR
    /// identity domains included).
    pub fn add_device(&mut self, device: DeviceId, desc: VtdDevice) -> Result<(), RegisterError> {
        if desc.unit as usize >= self.units.len() {
            return Err(RegisterError::NoSuchUnit(desc.unit));
        }
        if self.devices.contains_key(&device) {
            return Err(RegisterError::DeviceExists(device));
        }
        if let Some((&owner, _)) = self
            .devices
            .iter()
            .find(|(_, d)| d.desc.unit == desc.unit && d.desc.rid == desc.rid)
        {
            return Err(RegisterError::RidTaken {
                rid: desc.rid,
                owner,
            });
        }
        self.devices.insert(
            device,
            Device {
                desc,
                rid_target: AttachTarget::Blocking,
                pasids: BTreeMap::new(),
            },
        );
        Ok(())
    }

    pub fn unit(&self, index: u32) -> Option<&VtdUnit<'a>> {
        self.units.get(index as usize).map(|u| &u.unit)
    }

    pub fn unit_mut(&mut self, index: u32) -> Option<&mut VtdUnit<'a>> {
        self.units.get_mut(index as usize).map(|u| &mut u.unit)
    }

    pub fn unit_count(&self) -> u32 {
        self.units.len() as u32
    }

    pub fn device(&self, device: DeviceId) -> Option<&VtdDevice> {
        self.devices.get(&device).map(|d| &d.desc)
    }

    /// Live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// The unit and driver domain behind a backend domain.
    pub fn vtd_domain(&self, domain: DomainId) -> Option<(u32, vtd::DomainId)> {
        self.domains.get(&domain).map(|d| (d.unit, d.vtd))
    }

    pub fn domain_config(&self, domain: DomainId) -> Option<DomainConfig> {
        self.domains.get(&domain).map(|d| d.config)
    }

    /// Pages charged for the domain (its table pages).
    pub fn domain_pages(&self, domain: DomainId) -> Option<u64> {
        self.domains.get(&domain).map(|d| d.charged)
    }

    /// Where the RID (or a PASID) of `device` points.
    pub fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget {
        let Some(d) = self.devices.get(&device) else {
            return AttachTarget::Blocking;
        };
        match pasid {
            None => d.rid_target,
            Some(p) => d
                .pasids
                .get(&p)
                .map_or(AttachTarget::Blocking, |&dom| AttachTarget::Domain(dom)),
        }
    }

    fn table_pages(&self, domain: &Domain) -> u64 {
        self.units[domain.unit as usize]
            .unit
            .domain_info(domain.vtd)
            .map_or(0, |i| i.table_pages as u64)
    }

    /// Brings the budget and the domain's record in line with the driver's
    /// table-page count after a change; fails (changing nothing) when the
    /// budget cannot take the growth.
    fn settle_pages(&mut self, id: DomainId, budget: &mut PageBudget) -> Result<(), BackendError> {
        let Some(d) = self.domains.get(&id) else {
            return Ok(());
        };
        let now = self.table_pages(d);
        match self.domains.get_mut(&id) {
            Some(d) => budget.settle(&mut d.charged, now),
            None => Ok(()),
        }
    }

    /// Unmaps `[iova, iova + len)` of a domain in the driver, logging
    /// failures (the range is then kept out of use by the driver).
    fn unmap_range(&mut self, unit: u32, vtd: vtd::DomainId, iova: u64, len: u64) {
        let u = &mut self.units[unit as usize];
        if let Err(e) = u.unit.unmap(vtd, iova, len) {
            log::error!(
                "vtd backend: unit {unit}: unmap of {iova:#x}+{len:#x} in domain {} failed: {e}",
                vtd.0
            );
            if is_hardware_failure(&e) {
                u.stale = true;
            }
        }
    }

    /// Flushes every cache of a unit on which an invalidation failed.
    fn ensure_clean(&mut self, unit: u32) -> Result<(), VtdError> {
        let u = &mut self.units[unit as usize];
        if u.stale {
            u.unit.flush_all()?;
            u.stale = false;
        }
        Ok(())
    }

    /// Other devices of the unit using `rid` (as own RID or alias) whose
    /// RID is attached to the driver domain `vtd`.
    fn rid_shared_on(&self, me: DeviceId, unit: u32, rid: Bdf, vtd: vtd::DomainId) -> bool {
        self.devices.iter().any(|(&id, d)| {
            id != me
                && d.desc.unit == unit
                && (d.desc.rid == rid || d.desc.aliases.contains(&rid))
                && matches!(d.rid_target, AttachTarget::Domain(dom)
                    if self.domains.get(&dom).is_some_and(|x| x.vtd == vtd))
        })
    }

    /// Puts each requester ID back on the driver domain it had (`None`:
    /// blocked).
    fn restore_rids(&mut self, unit: u32, prior: &[(Bdf, Option<vtd::DomainId>)]) {
        let u = &mut self.units[unit as usize];
        for &(rid, was) in prior {
            let now = u.unit.device_domain(rid);
            if now == was {
                continue;
            }
            let r = match was {
                Some(dom) => u.unit.attach_device(rid, dom),
                None => u.unit.detach_device(rid),
            };
            if let Err(e) = r {
                log::error!(
                    "vtd backend: unit {unit}: could not restore {rid} after a failed attach: {e}; it is left blocked"
                );
                if is_hardware_failure(&e) {
                    u.stale = true;
                }
                if was.is_some() && u.unit.device_domain(rid).is_some() {
                    let _ = u.unit.detach_device(rid);
                }
            }
        }
    }

    fn attach_rid(
        &mut self,
        device: DeviceId,
        unit: u32,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        let dev = self
            .devices
            .get(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let rids = dev.requester_ids();
        let old = dev.rid_target;
        let u = &self.units[unit as usize];
        let prior: Vec<(Bdf, Option<vtd::DomainId>)> =
            rids.iter().map(|&r| (r, u.unit.device_domain(r))).collect();
        let mut failure = None;
        match target {
            AttachTarget::Domain(dom) => {
                let vtd = self
                    .domains
                    .get(&dom)
                    .ok_or(BackendError::Incompatible)?
                    .vtd;
                for &rid in &rids {
                    if let Err(e) = self.units[unit as usize].unit.attach_device(rid, vtd) {
                        failure = Some((rid, e));
                        break;
                    }
                }
            }
            AttachTarget::Blocking => {
                let to_block: Vec<Bdf> = prior
                    .iter()
                    .filter(|&&(rid, was)| match was {
                        None => false,
                        // An alias another attached device still uses stays.
                        Some(vtd) => rid == rids[0] || !self.rid_shared_on(device, unit, rid, vtd),
                    })
                    .map(|&(rid, _)| rid)
                    .collect();
                let mut caches_unsure = None;
                for rid in to_block {
                    match self.units[unit as usize].unit.detach_device(rid) {
                        Ok(()) => {}
                        // The driver cleared the entry before its
                        // invalidation failed: go on, flush globally below.
                        Err(e) if is_hardware_failure(&e) => {
                            self.units[unit as usize].stale = true;
                            caches_unsure.get_or_insert((rid, e));
                        }
                        Err(e) => {
                            failure = Some((rid, e));
                            break;
                        }
                    }
                }
                if failure.is_none()
                    && let Some((rid, e)) = caches_unsure
                    && self.ensure_clean(unit).is_err()
                {
                    failure = Some((rid, e));
                }
            }
        }
        if let Some((rid, e)) = failure {
            log::warn!(
                "vtd backend: unit {unit}: moving {rid} (device {}) to {target:?} failed: {e}",
                device.0
            );
            if is_hardware_failure(&e) {
                self.units[unit as usize].stale = true;
            }
            self.restore_rids(unit, &prior);
            return Err(backend_error(e));
        }
        self.retarget(device, None, old, target);
        Ok(())
    }

    fn attach_pasid(
        &mut self,
        device: DeviceId,
        unit: u32,
        pasid: u32,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        let dev = self
            .devices
            .get(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let rid = dev.desc.rid;
        let old = dev
            .pasids
            .get(&pasid)
            .map_or(AttachTarget::Blocking, |&d| AttachTarget::Domain(d));
        let u = &mut self.units[unit as usize];
        if u.unit.mode() != TranslationMode::Scalable || u.unit.pasid_limit() == 0 {
            return Err(BackendError::Incompatible);
        }
        let prior = u.unit.pasid_domain(rid, pasid);
        let result = match target {
            AttachTarget::Domain(dom) => {
                let d = self.domains.get(&dom).ok_or(BackendError::Incompatible)?;
                if !d.config.pasid_compatible {
                    return Err(BackendError::Incompatible);
                }
                let vtd = d.vtd;
                self.units[unit as usize].unit.attach_pasid(rid, pasid, vtd)
            }
            AttachTarget::Blocking => match prior {
                // Requests tagged with a PASID come from the device's own
                // requester ID only (a PCI bridge cannot carry the prefix).
                Some(_) => self.units[unit as usize].unit.detach_pasid(rid, pasid),
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            log::warn!(
                "vtd backend: unit {unit}: moving {rid} PASID {pasid} to {target:?} failed: {e}"
            );
            let u = &mut self.units[unit as usize];
            let mut restored = true;
            if is_hardware_failure(&e) {
                u.stale = true;
                if matches!(target, AttachTarget::Blocking) && u.unit.flush_all().is_ok() {
                    // The entry is cleared and no cache holds it any more.
                    u.stale = false;
                    self.retarget(device, Some(pasid), old, target);
                    return Ok(());
                }
            }
            if u.unit.pasid_domain(rid, pasid) != prior {
                let r = match prior {
                    Some(dom) => u.unit.attach_pasid(rid, pasid, dom),
                    None => u.unit.detach_pasid(rid, pasid),
                };
                restored = r.is_ok();
            }
            if !restored {
                log::error!(
                    "vtd backend: unit {unit}: could not restore {rid} PASID {pasid}; it is left blocked"
                );
            }
            return Err(backend_error(e));
        }
        self.retarget(device, Some(pasid), old, target);
        Ok(())
    }

    /// Records a successful move in the device and domain bookkeeping.
    fn retarget(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        old: AttachTarget,
        new: AttachTarget,
    ) {
        if let Some(dev) = self.devices.get_mut(&device) {
            match (pasid, new) {
                (None, t) => dev.rid_target = t,
                (Some(p), AttachTarget::Domain(d)) => {
                    dev.pasids.insert(p, d);
                }
                (Some(p), AttachTarget::Blocking) => {
                    dev.pasids.remove(&p);
                }
            }
        }
        if old == new {
            return;
        }
        if let AttachTarget::Domain(o) = old
            && let Some(d) = self.domains.get_mut(&o)
        {
            d.users = d.users.saturating_sub(1);
        }
        if let AttachTarget::Domain(n) = new
            && let Some(d) = self.domains.get_mut(&n)
        {
            d.users += 1;
        }
    }

    /// The device a fault's requester ID stands for: the device whose own
    /// RID it is, else a device using it as an alias whose RID is attached
    /// to the domain the fault was attributed to, else the first device
    /// using it as an alias.
    fn fault_device(&self, unit: u32, rid: Bdf, domain: Option<vtd::DomainId>) -> Option<DeviceId> {
        let mut candidates = self.devices.iter().filter(|(_, d)| d.desc.unit == unit);
        let mut first_alias = None;
        let mut attached_alias = None;
        for (&id, d) in &mut candidates {
            if d.desc.rid == rid {
                return Some(id);
            }
            if d.desc.aliases.contains(&rid) {
                first_alias.get_or_insert(id);
                if let (Some(vtd), AttachTarget::Domain(dom)) = (domain, d.rid_target)
                    && self.domains.get(&dom).is_some_and(|x| x.vtd == vtd)
                {
                    attached_alias.get_or_insert(id);
                }
            }
        }
        attached_alias.or(first_alias)
    }

    fn map_inner(
        &mut self,
        (unit, vtd): (u32, vtd::DomainId),
        iova: u64,
        phys: PhysAddr,
        length: u64,
        perms: MapPerms,
        large_pages: bool,
    ) -> Result<(), VtdError> {
        let max_page = self.units[unit as usize]
            .unit
            .domain_info(vtd)
            .map_or(sluice_hal::PAGE_SIZE, |i| {
                1u64 << (63 - i.page_sizes.leading_zeros())
            });
        // Without large pages, map in pieces no superpage fits in: a piece
        // of at most 1 MiB can never hold a 2 MiB leaf.
        let piece: u64 = if large_pages || max_page <= sluice_hal::PAGE_SIZE {
            u64::MAX
        } else {
            1 << 20
        };
        let mut done = 0;
        while done < length {
            let at = iova + done;
            let n = (length - done).min(piece - at % piece);
            let u = &mut self.units[unit as usize];
            if let Err(e) = u
                .unit
                .map(vtd, at, PhysAddr::new(phys.as_u64() + done), n, perms)
            {
                // A hardware failure comes after the table changed: this
                // piece is mapped and must go too.
                let undo = if is_hardware_failure(&e) {
                    u.stale = true;
                    done + n
                } else {
                    done
                };
                if undo > 0 {
                    self.unmap_range(unit, vtd, iova, undo);
                }
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }
}

/// What a VT-d fault reason means to the guest. `mapped` tells whether the
/// faulting page is mapped in the domain the request was attributed to: a
/// second-level entry has no present bit, so hardware reports a missing
/// mapping and a missing permission with the same reason (legacy 05h/06h)
/// and only the domain's own table tells them apart.
fn guest_reason(code: vtd::FaultReason, mapped: impl FnOnce() -> bool) -> Option<FaultReason> {
    use vtd::FaultClass;
    let translation = |mapped: bool| {
        if mapped {
            FaultReason::Permission
        } else {
            FaultReason::NotPresent
        }
    };
    Some(match code.class() {
        // First-level entry not present (SFL); every other "not present"
        // is a root, context or PASID structure: the request is blocked.
        FaultClass::NotPresent if code.0 == 0x71 => FaultReason::NotPresent,
        FaultClass::NotPresent | FaultClass::Blocked => FaultReason::Blocked,
        FaultClass::Permission => translation(mapped()),
        FaultClass::AddressWidth => FaultReason::NotPresent,
        FaultClass::Malformed => {
            log::error!("vtd backend: fault on malformed translation structures: {code}");
            FaultReason::Blocked
        }
        FaultClass::InterruptRemapping => return None,
        FaultClass::Other => match code.0 {
            // Scalable-mode general faults: beyond the address width
            // (SGN.1), then paging faults.
            0x80 => FaultReason::NotPresent,
            0x70..=0x7d | 0x81..=0x89 | 0x90 | 0x91 => translation(mapped()),
            _ => {
                log::warn!("vtd backend: fault with unknown reason {code}");
                FaultReason::Blocked
            }
        },
    })
}

impl IommuBackend for VtdBackend<'_> {
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError> {
        let d = self
            .devices
            .get(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let u = &self.units[d.desc.unit as usize];
        let mut caps = u.caps.ok_or(BackendError::Unsupported)?;
        // What Sluice enabled (IRTA programmed, IRE set, CFI clear), not
        // what ECAP.IR offers: only then are the MSIs of the unit's devices
        // isolated.
        caps.interrupt_remapping = u.unit.interrupt_remapping_enabled();
        Ok(caps)
    }

    fn domain_alloc(
        &mut self,
        device: DeviceId,
        config: DomainConfig,
        budget: &mut PageBudget,
    ) -> Result<DomainId, BackendError> {
        let caps = self.caps(device)?;
        if config.enforce_coherency && !caps.snoop_control {
            return Err(BackendError::Incompatible);
        }
        if config.pasid_compatible && (!caps.scalable_mode || caps.max_pasid_log2 == 0) {
            return Err(BackendError::Incompatible);
        }
        let unit = caps.unit;
        let u = &mut self.units[unit as usize];
        let vtd_config = vtd::DomainConfig {
            kind: u.domain_kind,
            enforce_snoop: config.enforce_coherency,
            address_width: None,
        };
        let vtd = u.unit.alloc_domain(vtd_config).map_err(|e| {
            log::warn!("vtd backend: unit {unit}: domain allocation failed: {e}");
            backend_error(e)
        })?;
        let id = DomainId(self.next_domain);
        self.next_domain += 1;
        self.domains.insert(
            id,
            Domain {
                unit,
                vtd,
                config,
                charged: 0,
                users: 0,
            },
        );
        if let Err(e) = self.settle_pages(id, budget) {
            self.domains.remove(&id);
            if let Err(fe) = self.units[unit as usize].unit.free_domain(vtd) {
                log::error!("vtd backend: unit {unit}: freeing a fresh domain failed: {fe}");
            }
            return Err(e);
        }
        Ok(id)
    }

    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget) {
        let Some(d) = self.domains.get(&domain) else {
            log::error!("vtd backend: free of unknown domain {}", domain.0);
            return;
        };
        if d.users > 0 {
            log::error!(
                "vtd backend: domain {} freed with {} attachments; kept",
                domain.0,
                d.users
            );
            return;
        }
        let (unit, vtd, charged) = (d.unit, d.vtd, d.charged);
        if let Err(e) = self.ensure_clean(unit) {
            // A cache may still point into these tables: never reuse them.
            log::error!(
                "vtd backend: unit {unit}: caches could not be flushed ({e}); keeping domain {}'s {charged} table pages out of use",
                vtd.0
            );
            self.domains.remove(&domain);
            budget.release(charged);
            return;
        }
        match self.units[unit as usize].unit.free_domain(vtd) {
            Ok(()) => {
                self.domains.remove(&domain);
                budget.release(charged);
            }
            Err(e) => log::error!(
                "vtd backend: unit {unit}: freeing domain {} failed: {e}; kept",
                vtd.0
            ),
        }
    }

    fn map(
        &mut self,
        domain: DomainId,
        iova: u64,
        phys: PhysAddr,
        length: u64,
        prot: Prot,
        large_pages: bool,
        budget: &mut PageBudget,
    ) -> Result<(), BackendError> {
        let d = self.domains.get(&domain).ok_or(BackendError::BadRange)?;
        let (unit, vtd) = (d.unit, d.vtd);
        if length == 0 {
            return Err(BackendError::BadRange);
        }
        let perms = MapPerms::new(prot.read, prot.write, false);
        if let Err(e) = self.map_inner((unit, vtd), iova, phys, length, perms, large_pages) {
            // Tables the failed map allocated were freed with its undo.
            let _ = self.settle_pages(domain, budget);
            return Err(backend_error(e));
        }
        if let Err(e) = self.settle_pages(domain, budget) {
            self.unmap_range(unit, vtd, iova, length);
            let _ = self.settle_pages(domain, budget);
            return Err(e);
        }
        Ok(())
    }

    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget) {
        let Some(d) = self.domains.get(&domain) else {
            log::error!("vtd backend: unmap in unknown domain {}", domain.0);
            return;
        };
        let (unit, vtd) = (d.unit, d.vtd);
        self.unmap_range(unit, vtd, iova, length);
        let _ = self.settle_pages(domain, budget);
    }

    fn attach(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        let dev = self
            .devices
            .get(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let unit = dev.desc.unit;
        if let AttachTarget::Domain(dom) = target {
            let d = self.domains.get(&dom).ok_or(BackendError::Incompatible)?;
            let caps = self.caps(device)?;
            if d.unit != unit || (d.config.enforce_coherency && !caps.snoop_control) {
                return Err(BackendError::Incompatible);
            }
        }
        match pasid {
            None => self.attach_rid(device, unit, target),
            Some(p) => self.attach_pasid(device, unit, p, target),
        }
    }

    fn reset_device(&mut self, device: DeviceId) -> Result<(), BackendError> {
        let d = self
            .devices
            .get(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let (flr, rid) = (d.desc.flr, d.desc.rid);
        reset_function(self.reset.as_deref_mut(), flr, rid, "vtd")
    }

    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault)) {
        for index in 0..self.units.len() {
            let unit = index as u32;
            let drained = self.units[index].unit.drain_faults();
            let mut domains = Vec::new();
            for f in &drained.faults {
                let r = f.record;
                let Some(device) = self.fault_device(unit, r.source, f.domain) else {
                    log::warn!("vtd backend: unit {unit}: fault from unregistered requester: {r}");
                    continue;
                };
                let u = &self.units[index].unit;
                let mapped = || {
                    f.domain
                        .is_some_and(|d| matches!(u.translate(d, r.address), Ok(Some(_))))
                };
                let Some(reason) = guest_reason(r.reason, mapped) else {
                    continue;
                };
                if let Some(d) = f.domain
                    && !domains.contains(&d)
                {
                    domains.push(d);
                }
                sink(DmaFault {
                    device,
                    // The driver reports RID_PASID faults as RID faults.
                    pasid: r.pasid,
                    iova: r.address,
                    write: r.access == vtd::AccessKind::Write,
                    reason,
                });
            }
            // The driver also queues faults per domain for other users;
            // this backend reported them already.
            for d in domains {
                let _ = self.units[index].unit.take_domain_faults(d);
            }
        }
    }
}
