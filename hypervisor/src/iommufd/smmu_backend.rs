//! [`IommuBackend`] over Sluice's SMMUv3 driver: the iommufd object
//! model's devices, domains and attachments carried out on one or more
//! [`SmmuUnit`]s (one per IORT SMMUv3 node).
//!
//! The boot code brings the SMMUs up (`smmuv3::ownership`), hands them
//! over with [`SmmuBackend::add_unit`], and registers every assignable
//! device with the SMMU that translates it and its StreamID from the IORT
//! (`DeviceAssociation::stream_id`) with [`SmmuBackend::add_device`].
//!
//! * Domains are stage-1 tables (stage 2 on an SMMU without stage 1) of
//!   the SMMU of the device they were made for, 48-bit IOVAs where the
//!   SMMU has them; attaching one to a device of another SMMU is
//!   `Incompatible`.
//! * A device's DMA carries its StreamID (its DMA alias's, behind a
//!   PCIe-to-PCI bridge), so devices sharing a StreamID share its
//!   translation: blocking one keeps the stream translated while another
//!   device attached to the same domain uses it. PASIDs are SubstreamIDs
//!   (PASID 0 is the stream's own traffic, so it cannot be attached).
//! * Every page-table page a domain holds is charged to the caller's
//!   [`PageBudget`] exactly (the driver's `table_pages`), charged after the
//!   driver mapped and undone when the budget cannot take it, as in the
//!   VT-d backend.
//! * Operations are all-or-nothing: a failed map leaves nothing mapped and
//!   nothing charged; a failed attach puts the stream back where it was.
//! * When an invalidation fails, the SMMU is marked stale: before a domain
//!   is freed its caches are flushed globally, and if that fails too the
//!   domain's tables are kept out of use.
//!
//! Capabilities, and why:
//!
//! * `snoop_control` is false. A stage-1 domain cannot make a PCIe
//!   No-Snoop write coherent: the root complex hands it to the SMMU as
//!   non-cacheable and stage-1 table attributes do not override that. The
//!   one SMMU mechanism that does, stage-2 forced write-back (SMMUv3.2
//!   STE.S2FWB, IHI 0070 5.2), needs stage-2 domains with FWB leaves,
//!   which the driver does not build; firmware's IORT CANWBS root-complex
//!   attribute (all traffic write-back cacheable) is not used either.
//! * `interrupt_remapping` means "the device's MSIs are isolated". On Arm
//!   an MSI is a write to the GIC ITS doorbell, and the ITS maps it by the
//!   DeviceID the IORT gives the device, which the device cannot forge:
//!   isolation comes from an ITS whose device table holds only the
//!   DeviceIDs and events Sluice set up, not from the SMMU. The backend
//!   reports false until the boot code, having taken every ITS the unit's
//!   devices signal over (`boot/src/its_owner.rs`, `sluice_gic`), says so
//!   with [`SmmuBackend::set_msi_isolation`]; until then the object model
//!   refuses to bind such devices unless the VM allows unsafe interrupts.
//!   The MSI write itself is DMA this SMMU translates: the object model
//!   maps each device's doorbell page into its HWPT through Arm's
//!   software-managed MSI window (`MsiWindow::SoftwareManaged`).
//! * `scalable_mode` is substream support (IDR1.SSIDSIZE > 0, with stage
//!   1), and `max_pasid_log2` the SubstreamID bits the driver's CD tables
//!   cover.
//! * Page sizes are 4 KiB, 2 MiB and 1 GiB (4 KiB granule); the input
//!   width is the domains' (`SmmuUnit::domain_shape`).
//!
//! A write-only mapping in a stage-1 domain is readable too: stage-1
//! descriptors cannot grant write without read (see [`IommuBackend::map`]
//! below).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use sluice_hal::PhysAddr;
use sluice_iommu::pagetable::MapPerms;
use sluice_iommu::smmuv3::{
    Access, EventKind, MemoryKind, SmmuDomainConfig, SmmuDomainId, SmmuError, SmmuFault, SmmuUnit,
    Stage, StageRequest,
};

use super::backend::FunctionReset;
use super::backend::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, DomainId, FaultReason,
    IommuBackend, IommuCaps, PageBudget, Prot, reset_function,
};

/// An assignable device as the backend needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuDevice {
    /// The backend unit translating the device (from
    /// [`SmmuBackend::add_unit`]).
    pub unit: u32,
    /// The StreamID its DMA carries (from the IORT).
    pub stream_id: u32,
    /// Its requester ID, for function-level resets.
    pub rid: sluice_pci::Bdf,
    /// The device supports function-level reset.
    pub flr: bool,
}

/// Why [`SmmuBackend::add_device`] refused a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmmuRegisterError {
    NoSuchUnit(u32),
    DeviceExists(DeviceId),
    /// The StreamID is beyond the SMMU's stream table: it can never be
    /// attached.
    StreamOutOfRange {
        stream_id: u32,
        limit: u64,
    },
}

impl fmt::Display for SmmuRegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchUnit(u) => write!(f, "no SMMU {u} registered"),
            Self::DeviceExists(d) => write!(f, "device {} is already registered", d.0),
            Self::StreamOutOfRange { stream_id, limit } => write!(
                f,
                "StreamID {stream_id:#x} is beyond the stream table ({limit:#x})"
            ),
        }
    }
}

struct Unit<'a> {
    unit: SmmuUnit<'a>,
    /// What every device of the unit sees; `None` when the unit cannot make
    /// a domain at all (logged at registration).
    caps: Option<IommuCaps>,
    /// How its domains are made.
    domains: SmmuDomainConfig,
    /// The ITS behind this SMMU isolates its devices' MSIs.
    msi_isolation: bool,
    /// An invalidation failed since the last successful global flush.
    stale: bool,
}

struct Device {
    desc: SmmuDevice,
    rid_target: AttachTarget,
    pasids: BTreeMap<u32, DomainId>,
}

struct Domain {
    unit: u32,
    smmu: SmmuDomainId,
    config: DomainConfig,
    /// Table pages charged to the owner's budget: always the driver's
    /// `table_pages` of the domain after each operation.
    charged: u64,
    /// RID and PASID attachments.
    users: u32,
}

/// The SMMUv3 implementation of [`IommuBackend`]. See the module docs.
pub struct SmmuBackend<'a> {
    units: Vec<Unit<'a>>,
    devices: BTreeMap<DeviceId, Device>,
    domains: BTreeMap<DomainId, Domain>,
    next_domain: u64,
    reset: Option<alloc::boxed::Box<dyn FunctionReset + 'a>>,
}

impl Default for SmmuBackend<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// Errors after which the SMMU's caches may hold entries the tables no
/// longer have (every other driver error is a refusal before any change).
fn is_hardware_failure(e: &SmmuError) -> bool {
    matches!(
        e,
        SmmuError::Timeout { .. } | SmmuError::CommandError { .. } | SmmuError::GlobalError(_)
    )
}

fn backend_error(e: SmmuError) -> BackendError {
    match e {
        SmmuError::OutOfMemory | SmmuError::TagsExhausted(_) => BackendError::OutOfMemory,
        SmmuError::PageTable(_) | SmmuError::InvalidRange | SmmuError::NoSuchDomain(_) => {
            BackendError::BadRange
        }
        // Hardware that does not complete an invalidation is reported as
        // the IOMMU refusing the change (the object model's EINVAL), like
        // every configuration the SMMU cannot take.
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

/// What an SMMU event means to the guest (IHI 0070 7.3); `None` for
/// events that are not a refused DMA.
fn guest_reason(f: &SmmuFault) -> Option<FaultReason> {
    Some(match f.kind {
        // No valid descriptor, or an input address outside the table.
        EventKind::Translation | EventKind::AddrSize => FaultReason::NotPresent,
        EventKind::Permission => FaultReason::Permission,
        // No configuration for the stream or substream: blocked.
        EventKind::BadStreamId
        | EventKind::BadSte
        | EventKind::StreamDisabled
        | EventKind::BadSubstreamId
        | EventKind::BadCd
        | EventKind::TranslForbidden
        | EventKind::BadAtsTreq
        | EventKind::Uut => FaultReason::Blocked,
        // Sluice writes every leaf with AF set and its structures where
        // the SMMU can fetch them: these mean broken structures or memory.
        EventKind::Access
        | EventKind::SteFetch
        | EventKind::CdFetch
        | EventKind::WalkEabt
        | EventKind::VmsFetch
        | EventKind::TlbConflict
        | EventKind::CfgConflict => {
            log::error!("smmu backend: {f}");
            FaultReason::Blocked
        }
        EventKind::PageRequest => return None,
        EventKind::Other(_) => {
            log::warn!("smmu backend: unknown event {f}");
            FaultReason::Blocked
        }
    })
}

impl<'a> SmmuBackend<'a> {
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
    pub fn set_function_reset(&mut self, reset: alloc::boxed::Box<dyn FunctionReset + 'a>) {
        self.reset = Some(reset);
    }

    /// Takes over an SMMU that [`SmmuUnit::init`] brought up; returns its
    /// index for [`SmmuDevice::unit`] (and [`IommuCaps::unit`]). Domains
    /// are stage 1 where the SMMU has it, with 48-bit IOVAs where it
    /// offers them.
    pub fn add_unit(&mut self, unit: SmmuUnit<'a>) -> u32 {
        self.add_unit_with(unit, SmmuDomainConfig::any())
    }

    /// [`add_unit`](Self::add_unit) with the domains made as `domains`
    /// says (e.g. a narrower IOVA space).
    pub fn add_unit_with(&mut self, unit: SmmuUnit<'a>, domains: SmmuDomainConfig) -> u32 {
        let index = self.units.len() as u32;
        let caps = match unit.domain_shape(domains) {
            Ok(shape) => {
                let substreams = unit.substream_limit() > 1 && shape.stage == Stage::Stage1;
                Some(IommuCaps {
                    unit: index,
                    snoop_control: false,
                    // Read live by `caps`.
                    interrupt_remapping: false,
                    scalable_mode: substreams,
                    max_pasid_log2: if substreams {
                        floor_log2(unit.substream_limit())
                    } else {
                        0
                    },
                    page_sizes: shape.page_sizes,
                    input_address_bits: shape.input_bits.min(64) as u8,
                })
            }
            Err(e) => {
                log::error!(
                    "smmu backend: unit {index} cannot make domains ({e}); its devices cannot be assigned"
                );
                None
            }
        };
        self.units.push(Unit {
            unit,
            caps,
            domains,
            msi_isolation: false,
            stale: false,
        });
        index
    }

    /// Declares whether the MSIs of unit `index`'s devices are isolated:
    /// true once the boot code programmed the ITS they reach so that only
    /// the DeviceIDs and events Sluice set up are delivered. Returns false
    /// for an unknown unit.
    pub fn set_msi_isolation(&mut self, index: u32, isolated: bool) -> bool {
        match self.units.get_mut(index as usize) {
            Some(u) => {
                u.msi_isolation = isolated;
                true
            }
            None => false,
        }
    }

    /// Registers an assignable device. Its StreamID is the backend's from
    /// now on: the object model blocks it when the device is first bound
    /// (detaching it from anything the boot code attached, RMR identity
    /// domains included). Devices may share a StreamID (a PCIe-to-PCI
    /// bridge's alias); they are then in one IOMMU group.
    pub fn add_device(
        &mut self,
        device: DeviceId,
        desc: SmmuDevice,
    ) -> Result<(), SmmuRegisterError> {
        let u = self
            .units
            .get(desc.unit as usize)
            .ok_or(SmmuRegisterError::NoSuchUnit(desc.unit))?;
        if self.devices.contains_key(&device) {
            return Err(SmmuRegisterError::DeviceExists(device));
        }
        let limit = u.unit.stream_limit();
        if u64::from(desc.stream_id) >= limit {
            return Err(SmmuRegisterError::StreamOutOfRange {
                stream_id: desc.stream_id,
                limit,
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

    pub fn unit(&self, index: u32) -> Option<&SmmuUnit<'a>> {
        self.units.get(index as usize).map(|u| &u.unit)
    }

    pub fn unit_mut(&mut self, index: u32) -> Option<&mut SmmuUnit<'a>> {
        self.units.get_mut(index as usize).map(|u| &mut u.unit)
    }

    pub fn unit_count(&self) -> u32 {
        self.units.len() as u32
    }

    pub fn device(&self, device: DeviceId) -> Option<&SmmuDevice> {
        self.devices.get(&device).map(|d| &d.desc)
    }

    /// Live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// The unit and driver domain behind a backend domain.
    pub fn smmu_domain(&self, domain: DomainId) -> Option<(u32, SmmuDomainId)> {
        self.domains.get(&domain).map(|d| (d.unit, d.smmu))
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
            .domain_info(domain.smmu)
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
    /// failures (the driver then keeps the tables out of use).
    fn unmap_range(&mut self, unit: u32, smmu: SmmuDomainId, iova: u64, len: u64) {
        let u = &mut self.units[unit as usize];
        if let Err(e) = u.unit.unmap(smmu, iova, len) {
            log::error!(
                "smmu backend: unit {unit}: unmap of {iova:#x}+{len:#x} in domain {} failed: {e}",
                smmu.0
            );
            if is_hardware_failure(&e) {
                u.stale = true;
            }
        }
    }

    /// Flushes every cache of a unit on which an invalidation failed.
    fn ensure_clean(&mut self, unit: u32) -> Result<(), SmmuError> {
        let u = &mut self.units[unit as usize];
        if u.stale {
            u.unit.flush_all()?;
            u.stale = false;
        }
        Ok(())
    }

    /// Another device of the unit with the same StreamID whose RID is
    /// attached to the driver domain `smmu`.
    fn stream_shared_on(&self, me: DeviceId, unit: u32, sid: u32, smmu: SmmuDomainId) -> bool {
        self.devices.iter().any(|(&id, d)| {
            id != me
                && d.desc.unit == unit
                && d.desc.stream_id == sid
                && matches!(d.rid_target, AttachTarget::Domain(dom)
                    if self.domains.get(&dom).is_some_and(|x| x.smmu == smmu))
        })
    }

    /// Puts `sid` back on the driver domain it had (`None`: blocked).
    fn restore_stream(&mut self, unit: u32, sid: u32, was: Option<SmmuDomainId>) {
        let u = &mut self.units[unit as usize];
        if u.unit.stream_domain(sid) == was {
            return;
        }
        let r = match was {
            Some(dom) => u.unit.attach_stream(sid, dom),
            None => u.unit.detach_stream(sid),
        };
        if let Err(e) = r {
            log::error!(
                "smmu backend: unit {unit}: could not restore StreamID {sid:#x} after a failed \
                 attach: {e}; it is left blocked"
            );
            if is_hardware_failure(&e) {
                u.stale = true;
            }
            if was.is_some() && u.unit.stream_domain(sid).is_some() {
                let _ = u.unit.detach_stream(sid);
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
        let (sid, old) = (dev.desc.stream_id, dev.rid_target);
        let prior = self.units[unit as usize].unit.stream_domain(sid);
        let result = match target {
            AttachTarget::Domain(dom) => {
                let smmu = self
                    .domains
                    .get(&dom)
                    .ok_or(BackendError::Incompatible)?
                    .smmu;
                self.units[unit as usize].unit.attach_stream(sid, smmu)
            }
            AttachTarget::Blocking => match prior {
                None => Ok(()),
                // Another device using the stream keeps it translated.
                Some(smmu) if self.stream_shared_on(device, unit, sid, smmu) => Ok(()),
                Some(_) => match self.units[unit as usize].unit.detach_stream(sid) {
                    // The STE was made aborting before its invalidation
                    // failed: a global flush settles it.
                    Err(e) if is_hardware_failure(&e) => {
                        self.units[unit as usize].stale = true;
                        self.ensure_clean(unit).map_err(|_| e)
                    }
                    other => other,
                },
            },
        };
        if let Err(e) = result {
            log::warn!(
                "smmu backend: unit {unit}: moving StreamID {sid:#x} (device {}) to {target:?} \
                 failed: {e}",
                device.0
            );
            if is_hardware_failure(&e) {
                self.units[unit as usize].stale = true;
            }
            self.restore_stream(unit, sid, prior);
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
        let sid = dev.desc.stream_id;
        let old = dev
            .pasids
            .get(&pasid)
            .map_or(AttachTarget::Blocking, |&d| AttachTarget::Domain(d));
        let u = &self.units[unit as usize];
        // SubstreamID 0 carries the stream's own traffic.
        if pasid == 0 || pasid >= u.unit.substream_limit() {
            return Err(BackendError::Incompatible);
        }
        let prior = u.unit.substream_domain(sid, pasid);
        let result = match target {
            AttachTarget::Domain(dom) => {
                let d = self.domains.get(&dom).ok_or(BackendError::Incompatible)?;
                if !d.config.pasid_compatible {
                    return Err(BackendError::Incompatible);
                }
                let smmu = d.smmu;
                self.units[unit as usize]
                    .unit
                    .attach_substream(sid, pasid, smmu)
            }
            AttachTarget::Blocking => match prior {
                Some(_) => self.units[unit as usize].unit.detach_substream(sid, pasid),
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            log::warn!(
                "smmu backend: unit {unit}: moving StreamID {sid:#x} PASID {pasid} to {target:?} \
                 failed: {e}"
            );
            let u = &mut self.units[unit as usize];
            if is_hardware_failure(&e) {
                u.stale = true;
                if matches!(target, AttachTarget::Blocking) && u.unit.flush_all().is_ok() {
                    // The CD is cleared and no cache holds it any more.
                    u.stale = false;
                    if u.unit.substream_domain(sid, pasid).is_none() {
                        self.retarget(device, Some(pasid), old, target);
                        return Ok(());
                    }
                }
            }
            let u = &mut self.units[unit as usize];
            if u.unit.substream_domain(sid, pasid) != prior {
                let r = match prior {
                    Some(dom) => u.unit.attach_substream(sid, pasid, dom),
                    None => u.unit.detach_substream(sid, pasid),
                };
                if r.is_err() {
                    log::error!(
                        "smmu backend: unit {unit}: could not restore StreamID {sid:#x} PASID \
                         {pasid}; it is left blocked"
                    );
                }
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

    /// The device a fault's StreamID stands for: one using the StreamID
    /// whose RID (or the faulting PASID) is attached to the domain the
    /// fault was attributed to, else the first using it.
    fn fault_device(
        &self,
        unit: u32,
        sid: u32,
        pasid: Option<u32>,
        domain: Option<SmmuDomainId>,
    ) -> Option<DeviceId> {
        let mut first = None;
        for (&id, d) in &self.devices {
            if d.desc.unit != unit || d.desc.stream_id != sid {
                continue;
            }
            first.get_or_insert(id);
            let target = match pasid {
                None => Some(d.rid_target),
                Some(p) => d.pasids.get(&p).map(|&dom| AttachTarget::Domain(dom)),
            };
            if let (Some(smmu), Some(AttachTarget::Domain(dom))) = (domain, target)
                && self.domains.get(&dom).is_some_and(|x| x.smmu == smmu)
            {
                return Some(id);
            }
        }
        first
    }

    fn map_inner(
        &mut self,
        (unit, smmu): (u32, SmmuDomainId),
        iova: u64,
        phys: PhysAddr,
        length: u64,
        (perms, memory): (MapPerms, MemoryKind),
        large_pages: bool,
    ) -> Result<(), SmmuError> {
        // Without large pages, map in pieces no block fits in: a piece of
        // at most 1 MiB can never hold a 2 MiB block.
        let piece: u64 = if large_pages { u64::MAX } else { 1 << 20 };
        let mut done = 0;
        while done < length {
            let at = iova + done;
            let n = (length - done).min(piece - at % piece);
            let u = &mut self.units[unit as usize];
            // A map changes no cached state (Arm TLBs never hold
            // translation faults): a failure leaves this piece unmapped.
            if let Err(e) = u.unit.map_memory(
                smmu,
                at,
                PhysAddr::new(phys.as_u64() + done),
                n,
                perms,
                memory,
            ) {
                if done > 0 {
                    self.unmap_range(unit, smmu, iova, done);
                }
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }
}

impl IommuBackend for SmmuBackend<'_> {
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError> {
        let d = self
            .devices
            .get(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let u = &self.units[d.desc.unit as usize];
        let mut caps = u.caps.ok_or(BackendError::Unsupported)?;
        caps.interrupt_remapping = u.msi_isolation;
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
        // Substreams need stage-1 domains; `any` is stage 1 wherever the
        // SMMU has it, which `scalable_mode` already required.
        let base = self.units[unit as usize].domains;
        let smmu_config = if config.pasid_compatible {
            SmmuDomainConfig {
                stage: StageRequest::Stage1,
                ..base
            }
        } else {
            base
        };
        let smmu = self.units[unit as usize]
            .unit
            .alloc_domain(smmu_config)
            .map_err(|e| {
                log::warn!("smmu backend: unit {unit}: domain allocation failed: {e}");
                backend_error(e)
            })?;
        let id = DomainId(self.next_domain);
        self.next_domain += 1;
        self.domains.insert(
            id,
            Domain {
                unit,
                smmu,
                config,
                charged: 0,
                users: 0,
            },
        );
        if let Err(e) = self.settle_pages(id, budget) {
            self.domains.remove(&id);
            if let Err(fe) = self.units[unit as usize].unit.free_domain(smmu) {
                log::error!("smmu backend: unit {unit}: freeing a fresh domain failed: {fe}");
            }
            return Err(e);
        }
        Ok(id)
    }

    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget) {
        let Some(d) = self.domains.get(&domain) else {
            log::error!("smmu backend: free of unknown domain {}", domain.0);
            return;
        };
        if d.users > 0 {
            log::error!(
                "smmu backend: domain {} freed with {} attachments; kept",
                domain.0,
                d.users
            );
            return;
        }
        let (unit, smmu, charged) = (d.unit, d.smmu, d.charged);
        if let Err(e) = self.ensure_clean(unit) {
            // A cache may still point into these tables: never reuse them.
            log::error!(
                "smmu backend: unit {unit}: caches could not be flushed ({e}); keeping domain \
                 {}'s {charged} table pages out of use",
                smmu.0
            );
            self.domains.remove(&domain);
            budget.release(charged);
            return;
        }
        match self.units[unit as usize].unit.free_domain(smmu) {
            Ok(()) => {
                self.domains.remove(&domain);
                budget.release(charged);
            }
            Err(e) if is_hardware_failure(&e) => {
                // The driver removed the domain and quarantined its tables
                // (kept until a global invalidation succeeds).
                self.units[unit as usize].stale = true;
                log::error!(
                    "smmu backend: unit {unit}: invalidating freed domain {} failed: {e}; its \
                     tables are kept out of use",
                    smmu.0
                );
                self.domains.remove(&domain);
                budget.release(charged);
            }
            Err(e) => log::error!(
                "smmu backend: unit {unit}: freeing domain {} failed: {e}; kept",
                smmu.0
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
        let (unit, smmu) = (d.unit, d.smmu);
        if length == 0 {
            return Err(BackendError::BadRange);
        }
        // VMSAv8-64 stage-1 descriptors always grant read (AP[2:1], Arm
        // ARM D8.4.1): a write-only mapping is made readable too, as
        // Linux's io-pgtable-arm makes it, rather than refused (guests map
        // device-to-memory buffers write-only). Stage 2 (S2AP) can express
        // write-only.
        let stage1 = self.units[unit as usize]
            .unit
            .domain_info(smmu)
            .is_ok_and(|i| i.stage == Stage::Stage1);
        let read = prot.read || (stage1 && prot.write);
        let perms = MapPerms::new(read, prot.write, false);
        let memory = if prot.mmio {
            MemoryKind::Device
        } else {
            MemoryKind::Normal
        };
        if let Err(e) = self.map_inner(
            (unit, smmu),
            iova,
            phys,
            length,
            (perms, memory),
            large_pages,
        ) {
            // Tables the failed map allocated were freed with its undo.
            let _ = self.settle_pages(domain, budget);
            return Err(backend_error(e));
        }
        if let Err(e) = self.settle_pages(domain, budget) {
            self.unmap_range(unit, smmu, iova, length);
            let _ = self.settle_pages(domain, budget);
            return Err(e);
        }
        Ok(())
    }

    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget) {
        let Some(d) = self.domains.get(&domain) else {
            log::error!("smmu backend: unmap in unknown domain {}", domain.0);
            return;
        };
        let (unit, smmu) = (d.unit, d.smmu);
        self.unmap_range(unit, smmu, iova, length);
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
        reset_function(self.reset.as_deref_mut(), flr, rid, "smmu")
    }

    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault)) {
        for index in 0..self.units.len() {
            let unit = index as u32;
            let drained = self.units[index].unit.drain_events();
            if drained.overflowed {
                log::warn!("smmu backend: unit {unit}: events were lost (event queue overflow)");
            }
            let mut domains = Vec::new();
            for a in &drained.faults {
                let f = &a.fault;
                let Some(device) = self.fault_device(unit, f.stream_id, f.substream_id, a.domain)
                else {
                    log::warn!("smmu backend: unit {unit}: event from an unregistered stream: {f}");
                    continue;
                };
                let Some(reason) = guest_reason(f) else {
                    continue;
                };
                if let Some(d) = a.domain
                    && !domains.contains(&d)
                {
                    domains.push(d);
                }
                sink(DmaFault {
                    device,
                    pasid: f.substream_id,
                    // Configuration events (blocked streams) carry no
                    // address (IHI 0070 7.3).
                    iova: f.address.unwrap_or(0),
                    write: f.access == Some(Access::Write),
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
