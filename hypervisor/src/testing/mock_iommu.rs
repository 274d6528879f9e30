//! An IOMMU backend with real translation state, for host tests.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaMemory, PhysAddr};

use crate::iommufd::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, DomainId, FaultReason,
    IommuBackend, IommuCaps, PageBudget, Prot,
};

/// Size covered by one leaf page table (512 entries of 4 KiB, as in VT-d
/// second-level and x86-style formats).
const LEAF_SPAN: u64 = 2 << 20;

struct MockDevice {
    caps: IommuCaps,
    flr: bool,
    rid: AttachTarget,
    pasids: BTreeMap<u32, DomainId>,
    resets: u32,
}

struct MockDomain {
    unit: u32,
    config: DomainConfig,
    aperture_last: u64,
    root: PhysAddr,
    /// Leaf tables by 2 MiB slot.
    leaves: BTreeMap<u64, PhysAddr>,
    /// Mapped ranges by first IOVA: (length, host address, rights).
    maps: BTreeMap<u64, (u64, PhysAddr, Prot)>,
    /// 2 MiB slots mapped with one large page (no leaf table).
    large: BTreeMap<u64, ()>,
    attachments: u32,
}

/// A mock IOMMU: domains are interval maps with page-table pages allocated
/// from a [`ModelMemory`] (so allocation failures can be injected and leaks
/// counted), attachments are per RID and per PASID, and a DMA can be
/// translated ([`MockIommu::translate`]) or issued ([`MockIommu::dma`],
/// which records a fault when it is refused).
pub struct MockIommu {
    mem: Rc<ModelMemory>,
    devices: BTreeMap<DeviceId, MockDevice>,
    domains: BTreeMap<DomainId, MockDomain>,
    next_domain: u64,
    faults: Vec<DmaFault>,
    /// Attaches to a domain that still succeed before one fails.
    fail_attach_after: Option<u32>,
}

impl MockIommu {
    pub fn new(mem: Rc<ModelMemory>) -> Self {
        Self {
            mem,
            devices: BTreeMap::new(),
            domains: BTreeMap::new(),
            next_domain: 1,
            faults: Vec::new(),
            fail_attach_after: None,
        }
    }

    /// Makes the attach to a domain after `successes` more successful ones
    /// fail (one-shot), as hardware that times out on a context-cache
    /// invalidation would; attaches to the blocking state never fail.
    pub fn fail_attach_after(&mut self, successes: Option<u32>) {
        self.fail_attach_after = successes;
    }

    /// Adds a device; it starts in the blocking state.
    pub fn add_device(&mut self, device: DeviceId, caps: IommuCaps, flr: bool) {
        self.devices.insert(
            device,
            MockDevice {
                caps,
                flr,
                rid: AttachTarget::Blocking,
                pasids: BTreeMap::new(),
                resets: 0,
            },
        );
    }

    /// Live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Function-level resets done on `device`.
    pub fn resets(&self, device: DeviceId) -> u32 {
        self.devices.get(&device).map_or(0, |d| d.resets)
    }

    /// Where the RID (or a PASID) of `device` points.
    pub fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget {
        let Some(d) = self.devices.get(&device) else {
            return AttachTarget::Blocking;
        };
        match pasid {
            None => d.rid,
            Some(p) => d
                .pasids
                .get(&p)
                .map_or(AttachTarget::Blocking, |&dom| AttachTarget::Domain(dom)),
        }
    }

    /// Whether a domain forces snooping.
    pub fn domain_config(&self, domain: DomainId) -> Option<DomainConfig> {
        self.domains.get(&domain).map(|d| d.config)
    }

    /// Page-table pages the domain holds (root and leaf tables).
    pub fn table_pages(&self, domain: DomainId) -> Option<u64> {
        self.domains.get(&domain).map(|d| 1 + d.leaves.len() as u64)
    }

    /// Slots of the domain mapped with large pages.
    pub fn large_page_count(&self, domain: DomainId) -> usize {
        self.domains.get(&domain).map_or(0, |d| d.large.len())
    }

    /// What a DMA of `device` (with `pasid`) at `iova` reaches, without
    /// recording anything.
    pub fn translate(
        &self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason> {
        let AttachTarget::Domain(dom) = self.attachment(device, pasid) else {
            return Err(FaultReason::Blocked);
        };
        let d = self.domains.get(&dom).ok_or(FaultReason::Blocked)?;
        let (&start, &(len, phys, prot)) = d
            .maps
            .range(..=iova)
            .next_back()
            .ok_or(FaultReason::NotPresent)?;
        if iova - start >= len {
            return Err(FaultReason::NotPresent);
        }
        if (write && !prot.write) || (!write && !prot.read) {
            return Err(FaultReason::Permission);
        }
        Ok(PhysAddr::new(phys.as_u64() + (iova - start)))
    }

    /// Issues a DMA: like [`MockIommu::translate`], but a refused access is
    /// recorded as a fault for [`IommuBackend::drain_faults`].
    pub fn dma(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason> {
        let r = self.translate(device, pasid, iova, write);
        if let Err(reason) = r {
            self.faults.push(DmaFault {
                device,
                pasid,
                iova,
                write,
                reason,
            });
        }
        r
    }

    fn slots(iova: u64, length: u64) -> impl Iterator<Item = u64> {
        let first = iova / LEAF_SPAN;
        let last = (iova + (length - 1)) / LEAF_SPAN;
        first..=last
    }
}

impl IommuBackend for MockIommu {
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError> {
        self.devices
            .get(&device)
            .map(|d| d.caps)
            .ok_or(BackendError::NoSuchDevice)
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
        if config.pasid_compatible && !caps.scalable_mode {
            return Err(BackendError::Incompatible);
        }
        budget.charge(1)?;
        let root = match self.mem.alloc_page() {
            Ok(p) => p,
            Err(_) => {
                budget.release(1);
                return Err(BackendError::OutOfMemory);
            }
        };
        let id = DomainId(self.next_domain);
        self.next_domain += 1;
        self.domains.insert(
            id,
            MockDomain {
                unit: caps.unit,
                config,
                aperture_last: caps.aperture_last(),
                root,
                leaves: BTreeMap::new(),
                maps: BTreeMap::new(),
                large: BTreeMap::new(),
                attachments: 0,
            },
        );
        Ok(id)
    }

    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget) {
        let Some(d) = self.domains.remove(&domain) else {
            panic!("mock IOMMU: free of unknown domain {domain:?}");
        };
        assert_eq!(d.attachments, 0, "mock IOMMU: freeing an attached domain");
        assert!(
            d.maps.is_empty(),
            "mock IOMMU: freeing a domain with mappings"
        );
        for (_, page) in d.leaves {
            self.mem.free_page(page);
            budget.release(1);
        }
        self.mem.free_page(d.root);
        budget.release(1);
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
        let d = self
            .domains
            .get_mut(&domain)
            .ok_or(BackendError::BadRange)?;
        if length == 0
            || !iova.is_multiple_of(4096)
            || !length.is_multiple_of(4096)
            || !phys.is_page_aligned()
        {
            return Err(BackendError::BadRange);
        }
        let last = iova.checked_add(length - 1).ok_or(BackendError::BadRange)?;
        if last > d.aperture_last {
            return Err(BackendError::BadRange);
        }
        if let Some((&s, &(l, _, _))) = d.maps.range(..=last).next_back()
            && s + (l - 1) >= iova
        {
            return Err(BackendError::BadRange);
        }
        // Slots fully covered by this range with 2 MiB-aligned host memory
        // take a large page; others need a leaf table.
        let mut new_leaves = Vec::new();
        let mut new_large = Vec::new();
        for slot in Self::slots(iova, length) {
            let slot_start = slot * LEAF_SPAN;
            let covered = slot_start >= iova && slot_start + (LEAF_SPAN - 1) <= last;
            let host_aligned = phys
                .as_u64()
                .wrapping_add(slot_start.wrapping_sub(iova))
                .is_multiple_of(LEAF_SPAN);
            if large_pages && covered && host_aligned {
                new_large.push(slot);
            } else if !d.leaves.contains_key(&slot) {
                new_leaves.push(slot);
            }
        }
        budget.charge(new_leaves.len() as u64)?;
        let mut pages = Vec::new();
        for _ in &new_leaves {
            match self.mem.alloc_page() {
                Ok(p) => pages.push(p),
                Err(_) => {
                    for p in pages {
                        self.mem.free_page(p);
                    }
                    budget.release(new_leaves.len() as u64);
                    return Err(BackendError::OutOfMemory);
                }
            }
        }
        for (slot, page) in new_leaves.into_iter().zip(pages) {
            d.leaves.insert(slot, page);
        }
        for slot in new_large {
            d.large.insert(slot, ());
        }
        d.maps.insert(iova, (length, phys, prot));
        Ok(())
    }

    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget) {
        let Some(d) = self.domains.get_mut(&domain) else {
            panic!("mock IOMMU: unmap in unknown domain {domain:?}");
        };
        let last = iova + (length - 1);
        let keys: Vec<u64> = d.maps.range(iova..=last).map(|(&k, _)| k).collect();
        let mut covered = 0;
        for k in keys {
            if let Some((l, _, _)) = d.maps.remove(&k) {
                assert!(
                    k + (l - 1) <= last,
                    "mock IOMMU: partial unmap of a mapping"
                );
                covered += l;
            }
        }
        assert_eq!(covered, length, "mock IOMMU: unmap of a range not mapped");
        for slot in Self::slots(iova, length) {
            let slot_start = slot * LEAF_SPAN;
            let slot_last = slot_start + (LEAF_SPAN - 1);
            let still_used = d
                .maps
                .range(..=slot_last)
                .next_back()
                .is_some_and(|(&s, &(l, _, _))| s + (l - 1) >= slot_start);
            if !still_used {
                d.large.remove(&slot);
                if let Some(page) = d.leaves.remove(&slot) {
                    self.mem.free_page(page);
                    budget.release(1);
                }
            }
        }
    }

    fn attach(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        let caps = self.caps(device)?;
        if let AttachTarget::Domain(_) = target {
            match self.fail_attach_after {
                Some(0) => {
                    self.fail_attach_after = None;
                    return Err(BackendError::Incompatible);
                }
                Some(n) => self.fail_attach_after = Some(n - 1),
                None => {}
            }
        }
        if let AttachTarget::Domain(dom) = target {
            let d = self.domains.get(&dom).ok_or(BackendError::Incompatible)?;
            if d.unit != caps.unit
                || (d.config.enforce_coherency && !caps.snoop_control)
                || (pasid.is_some() && (!caps.scalable_mode || !d.config.pasid_compatible))
            {
                return Err(BackendError::Incompatible);
            }
        }
        let dev = self
            .devices
            .get_mut(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        let old = match pasid {
            None => core::mem::replace(&mut dev.rid, target),
            Some(p) => match target {
                AttachTarget::Domain(dom) => dev
                    .pasids
                    .insert(p, dom)
                    .map_or(AttachTarget::Blocking, AttachTarget::Domain),
                AttachTarget::Blocking => dev
                    .pasids
                    .remove(&p)
                    .map_or(AttachTarget::Blocking, AttachTarget::Domain),
            },
        };
        if let AttachTarget::Domain(o) = old
            && let Some(d) = self.domains.get_mut(&o)
        {
            d.attachments -= 1;
        }
        if let AttachTarget::Domain(n) = target
            && let Some(d) = self.domains.get_mut(&n)
        {
            d.attachments += 1;
        }
        Ok(())
    }

    fn reset_device(&mut self, device: DeviceId) -> Result<(), BackendError> {
        let d = self
            .devices
            .get_mut(&device)
            .ok_or(BackendError::NoSuchDevice)?;
        if !d.flr {
            return Err(BackendError::Unsupported);
        }
        d.resets += 1;
        Ok(())
    }

    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault)) {
        for f in self.faults.drain(..) {
            sink(f);
        }
    }
}
