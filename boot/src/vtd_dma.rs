//! The `vtd-dma` scenario: Sluice takes over the VT-d unit that covers an
//! edu device and proves, with real DMA, that
//! * a device is blocked as soon as translation is on (its DMA faults with
//!   its requester ID and writes nothing);
//! * attached to a domain, its DMA through IOVAs reaches exactly the pages
//!   mapped there, both ways;
//! * DMA to an unmapped IOVA faults with the right reason, source and
//!   address;
//! * after an unmap, DMA to the old IOVA faults (the IOTLB was invalidated);
//! * after detach the device is blocked again.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::info;
use sluice_hal::PhysAddr;
use sluice_iommu::association::UnitId;
use sluice_iommu::pagetable::MapPerms;
use sluice_iommu::vtd::{AccessKind, DomainConfig, FaultRecord, VtdConfig, VtdUnit};
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::platform::Platform;
use sluice_pci::Bdf;

use crate::edu::Direction;

const IOVA_SOURCE: u64 = 0x0010_0000;
const IOVA_TARGET: u64 = 0x0010_1000;
const IOVA_UNMAPPED: u64 = 0x0020_0000;
const IOVA_READ_ONLY: u64 = 0x0030_0000;
const LENGTH: u64 = 1024;

fn fill(page: u64, seed: u8) {
    for i in 0..LENGTH as usize {
        // SAFETY: the page belongs to the scenario and is identity-mapped.
        unsafe {
            ((page as usize + i) as *mut u8)
                .write_volatile(seed.wrapping_add(i as u8).wrapping_mul(13))
        };
    }
}

fn bytes(page: u64) -> Vec<u8> {
    // SAFETY: as `fill`.
    (0..LENGTH as usize)
        .map(|i| unsafe { ((page as usize + i) as *const u8).read_volatile() })
        .collect()
}

/// What a fault's reason code must be (VT-d spec, appendix A
/// "Non-recoverable fault reason encodings"). QEMU 7.2 reports legacy codes
/// for second-level faults in scalable mode too, and 0x58 for a PASID entry
/// that is not present, so both encodings are accepted where they differ.
#[derive(Clone, Copy)]
enum Expect {
    /// No context (or root) entry for the requester: it is blocked.
    Blocked,
    /// The page does not allow the access (not present counts: R=W=0).
    NoPermission,
}

impl Expect {
    fn accepts(self, reason: u8) -> bool {
        match self {
            // Root / context not present; scalable root / context / PASID
            // directory / PASID entry not present.
            Self::Blocked => matches!(reason, 0x01 | 0x02 | 0x39 | 0x41 | 0x51 | 0x58 | 0x59),
            // Write / read without permission; scalable second-level faults.
            Self::NoPermission => matches!(reason, 0x05 | 0x06 | 0x78..=0x7d),
        }
    }
}

/// A fault from `source` at `address`'s page, for `access`, with a reason
/// `expect` accepts.
fn expect_fault(
    unit: &mut VtdUnit<'_>,
    source: Bdf,
    address: u64,
    access: AccessKind,
    expect: Expect,
    what: &str,
) -> Result<FaultRecord, String> {
    let drain = unit.drain_faults();
    let records: Vec<FaultRecord> = drain.faults.iter().map(|f| f.record).collect();
    let Some(record) = records.iter().find(|r| r.source == source) else {
        return Err(format!(
            "{what}: no fault recorded for {source} (recorded: {records:?})"
        ));
    };
    if record.address != address & !0xfff
        || record.access != access
        || !expect.accepts(record.reason.0)
    {
        return Err(format!(
            "{what}: fault {record}, expected a {access:?} at {address:#x}"
        ));
    }
    info!("vtd-dma: {what}: fault {record}");
    Ok(*record)
}

fn no_faults(unit: &mut VtdUnit<'_>, what: &str) -> Result<(), String> {
    let drain = unit.drain_faults();
    if drain.faults.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: unexpected faults {:?}", drain.faults))
    }
}

pub fn run(platform: &Platform) -> Result<(), String> {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let map = crate::pci::associate(acpi, &pci)?;
    let (edu, addr) = crate::scenarios::first_edu(&pci)?;
    let device = map
        .device(addr)
        .ok_or("the edu device has no IOMMU association")?;
    let Some(UnitId::Drhd(unit_index)) = device.unit else {
        return Err(format!("edu {addr} is not covered by a VT-d unit"));
    };
    let source = device.requester_id;
    let table = map.dmar.as_ref().ok_or("no DMAR table")?;
    let drhd = table.drhds.get(unit_index).ok_or("DRHD vanished")?;
    // SAFETY: the DRHD names this register block; Sluice owns the unit now.
    let mmio = unsafe { PhysMmio::new(drhd.register_base, drhd.register_size()) };
    let memory = FrameDmaMemory::new(&platform.frames);
    let clock = KernelClock;
    let config = VtdConfig::new(
        unit_index as u32,
        drhd.register_base,
        u32::from(table.host_address_width),
    );
    let mut unit =
        VtdUnit::init(&mmio, &memory, &clock, config).map_err(|e| format!("VT-d init: {e:?}"))?;
    info!(
        "vtd-dma: dmar{unit_index} runs in {:?} mode; every device is blocked",
        unit.mode()
    );

    // Two buffers anywhere in RAM: with translation the device never sees
    // their physical addresses, only IOVAs below edu's 28-bit DMA mask.
    let buffers = platform
        .frames
        .lock()
        .allocate(2, 4096)
        .map_err(|e| format!("{e}"))?;
    let (source_page, target_page) = (buffers, buffers + 4096);
    fill(source_page, 1);
    fill(target_page, 0);

    // 1. Blocked: physical addresses mean nothing to a blocked device.
    let initial = bytes(target_page);
    edu.dma(Direction::ToRam, target_page, 0, LENGTH)?;
    expect_fault(
        &mut unit,
        source,
        target_page,
        AccessKind::Write,
        Expect::Blocked,
        "blocked device writing RAM",
    )?;
    if bytes(target_page) != initial {
        return Err(String::from("a blocked device changed memory"));
    }

    // 2. Attached: DMA through IOVAs reaches the mapped pages.
    // Coherency: with ECAP.SC the domain forces snooping (SNP in legacy
    // leaves, PGSNP in scalable PASID entries); without it such a domain is
    // refused with a clear error.
    let snooped = unit.capabilities().snoop_control;
    if !snooped {
        match unit.alloc_domain(DomainConfig::second_level().snooped()) {
            Err(sluice_iommu::vtd::VtdError::SnoopControlUnsupported) => {}
            other => {
                return Err(format!(
                    "a snoop-enforcing domain without ECAP.SC gave {other:?}"
                ));
            }
        }
    }
    let config = if snooped {
        DomainConfig::second_level().snooped()
    } else {
        DomainConfig::second_level()
    };
    let domain = unit.alloc_domain(config).map_err(|e| format!("{e:?}"))?;
    info!("vtd-dma: domain {domain:?} allocated, snoop enforced: {snooped}");
    unit.map(
        domain,
        IOVA_SOURCE,
        PhysAddr::new(source_page),
        4096,
        MapPerms::READ,
    )
    .map_err(|e| format!("{e:?}"))?;
    unit.map(
        domain,
        IOVA_TARGET,
        PhysAddr::new(target_page),
        4096,
        MapPerms::READ_WRITE,
    )
    .map_err(|e| format!("{e:?}"))?;
    let aliases: Vec<Bdf> = device.alias.map(|a| a.requester_id).into_iter().collect();
    unit.attach_device_with_aliases(addr.bdf, &aliases, domain)
        .map_err(|e| format!("{e:?}"))?;
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LENGTH)?;
    edu.dma(Direction::ToRam, IOVA_TARGET, 0, LENGTH)?;
    no_faults(&mut unit, "translated DMA")?;
    if bytes(target_page) != bytes(source_page) {
        return Err(String::from(
            "translated DMA did not copy the source page into the target page",
        ));
    }
    info!(
        "vtd-dma: {LENGTH} bytes moved IOVA {IOVA_SOURCE:#x} -> edu -> IOVA {IOVA_TARGET:#x} (physical {source_page:#x} -> {target_page:#x})"
    );

    // 3. Write protection: a write to a read-only IOVA faults and leaves
    // the page alone. The IOVA is fresh so the unit walks the tables: QEMU
    // 7.2 drops a permission failure served from its IOTLB without
    // recording a fault (hardware records it either way).
    unit.map(
        domain,
        IOVA_READ_ONLY,
        PhysAddr::new(source_page),
        4096,
        MapPerms::READ,
    )
    .map_err(|e| format!("{e:?}"))?;
    let protected = bytes(source_page);
    edu.dma(Direction::ToRam, IOVA_READ_ONLY, 0, LENGTH)?;
    expect_fault(
        &mut unit,
        source,
        IOVA_READ_ONLY,
        AccessKind::Write,
        Expect::NoPermission,
        "write to a read-only IOVA",
    )?;
    if bytes(source_page) != protected {
        return Err(String::from(
            "a write through a read-only IOVA changed memory",
        ));
    }

    // 4. Unmapped IOVA.
    edu.dma(Direction::ToDevice, IOVA_UNMAPPED, 0, LENGTH)?;
    expect_fault(
        &mut unit,
        source,
        IOVA_UNMAPPED,
        AccessKind::Read,
        Expect::NoPermission,
        "read of an unmapped IOVA",
    )?;

    // 5. After unmap the old IOVA faults: the IOTLB entry the transfer above
    // used is gone.
    fill(target_page, 7);
    let before_unmap = bytes(target_page);
    unit.unmap(domain, IOVA_TARGET, 4096)
        .map_err(|e| format!("{e:?}"))?;
    edu.dma(Direction::ToRam, IOVA_TARGET, 0, LENGTH)?;
    expect_fault(
        &mut unit,
        source,
        IOVA_TARGET,
        AccessKind::Write,
        Expect::NoPermission,
        "write after unmap",
    )?;
    if bytes(target_page) != before_unmap {
        return Err(String::from(
            "DMA reached a page after its IOVA was unmapped",
        ));
    }

    // 6. Detached: blocked again, even for the still-mapped source IOVA.
    unit.detach_device(addr.bdf).map_err(|e| format!("{e:?}"))?;
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LENGTH)?;
    expect_fault(
        &mut unit,
        source,
        IOVA_SOURCE,
        AccessKind::Read,
        Expect::Blocked,
        "read after detach",
    )?;
    // The domain's tables go back to the allocator only now that no
    // context entry points at them and the IOTLB was invalidated.
    let free_before = platform.frames.lock().free_frames();
    unit.free_domain(domain).map_err(|e| format!("{e:?}"))?;
    let released = platform.frames.lock().free_frames() - free_before;
    if released == 0 {
        return Err(String::from(
            "freeing the domain released no page-table pages",
        ));
    }
    info!("vtd-dma: domain freed, {released} page-table pages released");
    platform
        .frames
        .lock()
        .free(buffers, 2)
        .map_err(|e| format!("{e}"))?;
    Ok(())
}
