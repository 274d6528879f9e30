//! The interface between the iommufd object model and an IOMMU driver.
//!
//! The VT-d and SMMUv3 drivers implement [`IommuBackend`]; so does
//! [`crate::testing::MockIommu`], which keeps real translation state so tests
//! can ask where a DMA lands. The object model never touches IOMMU hardware
//! any other way.

use sluice_hal::PhysAddr;
use sluice_pci::Bdf;

/// A physical device as the platform names it (an index the PCI layer hands
/// out; the backend maps it to its requester ID and DMA aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u32);

/// A paging domain (one IO page table) inside a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u64);

/// What the IOMMU translating a device can do, decoded once by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuCaps {
    /// Which IOMMU unit translates the device; domains only attach to
    /// devices of the unit they were allocated for.
    pub unit: u32,
    /// Snoop control (VT-d ECAP.SC): a domain can force every access to
    /// snoop, whatever the device's no-snoop attribute says.
    pub snoop_control: bool,
    /// Interrupt remapping is on: the device's MSIs are isolated.
    pub interrupt_remapping: bool,
    /// Scalable mode (VT-d) / substreams (SMMU): PASID-granular attach.
    pub scalable_mode: bool,
    /// PASID bits the IOMMU supports (0: none).
    pub max_pasid_log2: u8,
    /// Bitmap of supported page sizes (bit n set: 2^n bytes).
    pub page_sizes: u64,
    /// Input-address width of the domains: IOVAs at or above
    /// `1 << input_address_bits` cannot be mapped.
    pub input_address_bits: u8,
}

impl IommuCaps {
    /// The smallest page size, which IOVA alignment must follow.
    pub fn min_page_size(&self) -> u64 {
        if self.page_sizes == 0 {
            sluice_hal::PAGE_SIZE
        } else {
            1 << self.page_sizes.trailing_zeros()
        }
    }
    /// The last IOVA a domain of this IOMMU can translate.
    pub fn aperture_last(&self) -> u64 {
        if self.input_address_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.input_address_bits) - 1
        }
    }
}

/// How a domain is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DomainConfig {
    /// Force snooping of every access (VT-d SNP / PGSNP) for the domain's
    /// whole life.
    pub enforce_coherency: bool,
    /// The domain may be attached to (device, PASID) and may be the RID
    /// domain of a device with PASIDs attached.
    pub pasid_compatible: bool,
}

/// Access rights of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
    /// The target is a device register (an MSI doorbell), not RAM: mapped
    /// with device memory attributes where the format has them (Arm
    /// stage-1 AttrIndx, stage-2 MemAttr); VT-d tables carry no memory
    /// type, so there it changes nothing.
    pub mmio: bool,
}

/// Where a device's RID or (device, PASID) translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachTarget {
    /// Every DMA faults.
    Blocking,
    Domain(DomainId),
}

/// Page-table memory a VM may still use. Backends charge every page-table
/// page they allocate for a domain to the budget passed in, and release it
/// when they free the page, so a guest cannot exhaust the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBudget {
    pub used_pages: u64,
    pub limit_pages: u64,
}

impl PageBudget {
    pub const fn new(limit_pages: u64) -> Self {
        Self {
            used_pages: 0,
            limit_pages,
        }
    }
    /// Reserves `pages` pages, or fails without changing anything.
    pub fn charge(&mut self, pages: u64) -> Result<(), BackendError> {
        match self.used_pages.checked_add(pages) {
            Some(total) if total <= self.limit_pages => {
                self.used_pages = total;
                Ok(())
            }
            _ => Err(BackendError::QuotaExceeded),
        }
    }
    pub fn release(&mut self, pages: u64) {
        debug_assert!(pages <= self.used_pages, "page budget released twice");
        self.used_pages = self.used_pages.saturating_sub(pages);
    }

    /// Brings what an object is charged (`charged`) to what it holds now
    /// (`now`): charges the growth or releases the shrinkage. Over the
    /// limit nothing changes.
    pub fn settle(&mut self, charged: &mut u64, now: u64) -> Result<(), BackendError> {
        if now > *charged {
            self.charge(now - *charged)?;
        } else {
            self.release(*charged - now);
        }
        *charged = now;
        Ok(())
    }
}

/// Why a backend operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// The device is not known to this backend.
    NoSuchDevice,
    /// Page-table memory could not be allocated.
    OutOfMemory,
    /// The VM's page-table budget is used up.
    QuotaExceeded,
    /// The domain cannot be attached to this device (other IOMMU unit,
    /// enforced coherency without snoop control, PASID without scalable mode).
    Incompatible,
    /// The IOVA range is outside the domain or overlaps an existing mapping.
    BadRange,
    /// The operation is not available (e.g. function-level reset).
    Unsupported,
}

/// A DMA the IOMMU refused, as the driver decoded it from its fault record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    pub device: DeviceId,
    pub pasid: Option<u32>,
    pub iova: u64,
    pub write: bool,
    pub reason: FaultReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    NotPresent,
    Permission,
    Blocked,
}

/// Resets a PCI function on behalf of the backend (the boot code implements
/// it over PCI configuration space: PCIe base spec, "Function Level
/// Reset").
pub trait FunctionReset {
    /// Issues a function-level reset of `rid` and waits for it to finish.
    fn function_level_reset(&mut self, rid: Bdf) -> Result<(), ResetError>;
}

/// Why a function-level reset did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetError {
    /// The function has no FLR capability.
    NotCapable,
    /// The function did not come back within the allowed time.
    Timeout,
    /// Anything else, described for the log.
    Failed(&'static str),
}

/// A backend's [`IommuBackend::reset_device`]: `Unsupported` (logged by
/// `backend`'s name) without FLR, without a reset method, or when the
/// reset fails.
pub fn reset_function(
    reset: Option<&mut (dyn FunctionReset + '_)>,
    flr: bool,
    rid: Bdf,
    backend: &str,
) -> Result<(), BackendError> {
    if !flr {
        return Err(BackendError::Unsupported);
    }
    let Some(reset) = reset else {
        log::warn!("{backend} backend: no function-reset method; {rid} not reset");
        return Err(BackendError::Unsupported);
    };
    reset.function_level_reset(rid).map_err(|e| {
        log::warn!("{backend} backend: function-level reset of {rid} failed: {e:?}");
        BackendError::Unsupported
    })
}

/// What an IOMMU driver provides to the iommufd object model.
///
/// Every operation is all-or-nothing: on error nothing changed (no mapping
/// made, no page charged, no attachment moved).
pub trait IommuBackend {
    /// Capabilities of the IOMMU translating `device`.
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError>;

    /// Allocates an empty paging domain usable by `device` (and any device of
    /// the same unit with compatible capabilities).
    fn domain_alloc(
        &mut self,
        device: DeviceId,
        config: DomainConfig,
        budget: &mut PageBudget,
    ) -> Result<DomainId, BackendError>;

    /// Frees a domain nothing is attached to, with its page tables.
    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget);

    /// Maps `[iova, iova + length)` to host `[phys, phys + length)`. All
    /// three are aligned to the domain's smallest page size and the range is
    /// not mapped yet. `large_pages` allows pages larger than the smallest.
    #[allow(clippy::too_many_arguments)]
    fn map(
        &mut self,
        domain: DomainId,
        iova: u64,
        phys: PhysAddr,
        length: u64,
        prot: Prot,
        large_pages: bool,
        budget: &mut PageBudget,
    ) -> Result<(), BackendError>;

    /// Unmaps `[iova, iova + length)` (which was mapped by one or more `map`
    /// calls covering it exactly), flushes the IOTLB and frees page tables
    /// that became empty.
    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget);

    /// Points the device's requester ID (and its DMA aliases), or one of its
    /// PASIDs, at `target`.
    fn attach(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        target: AttachTarget,
    ) -> Result<(), BackendError>;

    /// Function-level reset of the device, if it supports it
    /// (`Unsupported` otherwise).
    fn reset_device(&mut self, device: DeviceId) -> Result<(), BackendError>;

    /// Hands every DMA fault recorded since the last call to `sink`.
    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_charges_growth_releases_shrinkage_and_refuses_over_the_limit() {
        let mut budget = PageBudget::new(10);
        let mut charged = 0;
        budget.settle(&mut charged, 4).unwrap();
        assert_eq!((budget.used_pages, charged), (4, 4));
        budget.settle(&mut charged, 1).unwrap();
        assert_eq!((budget.used_pages, charged), (1, 1));
        assert_eq!(
            budget.settle(&mut charged, 12),
            Err(BackendError::QuotaExceeded)
        );
        assert_eq!((budget.used_pages, charged), (1, 1), "nothing changed");
    }

    #[test]
    fn resets_need_flr_and_a_method() {
        struct Counting(u32, Result<(), ResetError>);
        impl FunctionReset for Counting {
            fn function_level_reset(&mut self, _rid: Bdf) -> Result<(), ResetError> {
                self.0 += 1;
                self.1
            }
        }
        let rid = Bdf::new(0, 3, 0);
        let mut ok = Counting(0, Ok(()));
        assert_eq!(
            reset_function(Some(&mut ok), false, rid, "t"),
            Err(BackendError::Unsupported)
        );
        assert_eq!(ok.0, 0, "no FLR: not attempted");
        assert_eq!(
            reset_function(None, true, rid, "t"),
            Err(BackendError::Unsupported)
        );
        assert_eq!(reset_function(Some(&mut ok), true, rid, "t"), Ok(()));
        assert_eq!(ok.0, 1);
        let mut failing = Counting(0, Err(ResetError::Timeout));
        assert_eq!(
            reset_function(Some(&mut failing), true, rid, "t"),
            Err(BackendError::Unsupported)
        );
    }
}
