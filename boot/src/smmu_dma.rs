//! The `smmu-dma` scenario (aarch64): Sluice brings up the SMMUv3 the IORT
//! puts in front of an edu device and proves, with real DMA, that
//! * a stream is blocked as soon as translation is on: its DMA is aborted,
//!   writes nothing, and an event names its StreamID;
//! * attached to a stage-1 domain, its DMA through IOVAs reaches exactly
//!   the pages mapped there, both ways;
//! * a write through a read-only IOVA and a read of an unmapped IOVA fault
//!   with the right event (name, StreamID, address, read/write) attributed
//!   to the domain;
//! * after an unmap, DMA to the old IOVA faults (the TLB was invalidated);
//! * after detach the stream is blocked again, and freeing the domain
//!   returns its table pages to the allocator.
//!
//! Board facts (QEMU 7.2 `virt,iommu=smmuv3`): firmware leaves the SMMU
//! disabled, and QEMU lets traffic bypass while SMMUEN = 0 (it has no GBPA
//! register, so the driver's GBPA.ABORT does not hold traffic during
//! bring-up as the spec says it would). Only the buses present at boot go
//! through the SMMU, and edu needs `dma_mask` raised for 48-bit IOVAs.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::info;
use sluice_hal::PhysAddr;
use sluice_iommu::acpi::iort::{self, NodeKind};
use sluice_iommu::association::UnitId;
use sluice_iommu::pagetable::MapPerms;
use sluice_iommu::smmuv3::regs::REGISTER_SPAN;
use sluice_iommu::smmuv3::{
    Access, AttributedFault, EventKind, FaultClass, SmmuConfig, SmmuDomainConfig, SmmuDomainId,
    SmmuUnit, Stage,
};
use sluice_kernel::acpi_tables::{Acpi, RawIort};
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::platform::Platform;

use crate::edu::Direction;

/// IOVAs far above RAM (virt's RAM starts at 1 GiB): what the device
/// uses is never a physical address of the buffers. Each check gets its
/// own page, so no TLB entry from an earlier check can answer for it.
const IOVA_SOURCE: u64 = 0x0040_0000_0000;
const IOVA_TARGET: u64 = 0x0040_0000_1000;
const IOVA_READ_ONLY: u64 = 0x0040_0020_0000;
const IOVA_UNMAPPED: u64 = 0x0040_0040_0000;
const LENGTH: u64 = 1024;
/// Refused transfers are short: each refused access is one event, and the
/// driver's event queue holds 128 records.
const FAULT_LENGTH: u64 = 256;

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

/// The events `sid` caused since the last drain: at least one, every one
/// accepted by `check`. A transfer the SMMU refuses is refused access by
/// access (QEMU checks each 8-byte access of edu's transfer, hardware each
/// transaction), each with its own event, so one refused DMA leaves
/// several records whose addresses step through the transfer.
fn expect_events(
    unit: &mut SmmuUnit<'_>,
    sid: u32,
    what: &str,
    check: impl Fn(&AttributedFault) -> bool,
) -> Result<usize, String> {
    let drain = unit.drain_events();
    if drain.overflowed {
        return Err(format!("{what}: the event queue overflowed"));
    }
    let summary = || {
        drain
            .faults
            .iter()
            .take(4)
            .map(|f| format!("{}", f.fault))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mine: Vec<&AttributedFault> = drain
        .faults
        .iter()
        .filter(|f| f.fault.stream_id == sid)
        .collect();
    let Some(first) = mine.first() else {
        return Err(format!(
            "{what}: no event from StreamID {sid:#x} ({} others: {})",
            drain.faults.len(),
            summary()
        ));
    };
    if mine.len() != drain.faults.len() {
        return Err(format!("{what}: events from other streams: {}", summary()));
    }
    if let Some(bad) = mine.iter().find(|f| !check(f)) {
        return Err(format!(
            "{what}: unexpected event {} (domain {:?}) among {} from StreamID {sid:#x}",
            bad.fault,
            bad.domain,
            mine.len()
        ));
    }
    info!(
        "smmu-dma: {what}: {} event(s), first: {}",
        mine.len(),
        first.fault
    );
    Ok(mine.len())
}

fn no_events(unit: &mut SmmuUnit<'_>, what: &str) -> Result<(), String> {
    let drain = unit.drain_events();
    if drain.faults.is_empty() && !drain.overflowed {
        Ok(())
    } else {
        Err(format!(
            "{what}: unexpected events {:?}",
            drain.faults.iter().map(|f| f.fault).collect::<Vec<_>>()
        ))
    }
}

/// A stage-1 fault on an address of the transfer at `iova` for `access`,
/// attributed to `domain`.
fn translation_fault(
    f: &AttributedFault,
    kind: EventKind,
    iova: u64,
    access: Access,
    domain: SmmuDomainId,
) -> bool {
    f.fault.kind == kind
        && f.fault
            .address
            .is_some_and(|a| (iova..iova + FAULT_LENGTH).contains(&a))
        && f.fault.access == Some(access)
        // CLASS is IN (0b10) for a fault on the input address (IHI 0070
        // 7.3.10-7.3.13); QEMU 7.2 never fills CLASS in for these events
        // and reports 0b00 (CD), so that is accepted too.
        && matches!(f.fault.class, Some(FaultClass::Input | FaultClass::Cd))
        && !f.fault.stage2
        && f.domain == Some(domain)
}

/// No configuration reaches the stream. The driver keeps a level-2
/// stream table only while one of its streams is attached, so a blocked
/// stream selects an L1 descriptor with Span 0: C_BAD_STREAMID (IHI 0070
/// 5.1 "Level 1 Stream Table Descriptor", 7.3.3). That record carries the
/// StreamID but, by the spec, no input address.
fn blocked(f: &AttributedFault) -> bool {
    f.fault.kind == EventKind::BadStreamId && f.fault.address.is_none() && f.domain.is_none()
}

/// The register window and driver configuration of SMMU `ordinal` (IORT
/// order), for scenarios that bring an SMMU up themselves.
pub fn smmu_registers(acpi: &Acpi, ordinal: usize) -> Result<(PhysMmio, SmmuConfig), String> {
    let bytes_iort = acpi.raw::<RawIort>().ok_or("no IORT table")?;
    let table = iort::parse(bytes_iort).map_err(|e| format!("IORT: {e}"))?;
    let node = table
        .smmus()
        .get(ordinal)
        .and_then(|&i| table.nodes.get(i))
        .ok_or_else(|| format!("the IORT has no SMMU {ordinal}"))?;
    let NodeKind::SmmuV3(smmu) = &node.kind else {
        return Err(format!("smmu{ordinal} is not an SMMUv3"));
    };
    if smmu.base == 0 || !smmu.base.is_multiple_of(0x1_0000) {
        return Err(format!(
            "smmu{ordinal}: register base {:#x} is not 64 KiB aligned",
            smmu.base
        ));
    }
    // SAFETY: the IORT names this register block (pages 0 and 1); the
    // calling scenario owns the SMMU.
    let mmio = unsafe { PhysMmio::new(smmu.base, REGISTER_SPAN as u64) };
    Ok((mmio, SmmuConfig::from_iort(ordinal as u32, smmu)))
}

pub fn run(platform: &Platform) -> Result<(), String> {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let map = crate::pci::associate(acpi, &pci)?;
    let (edu, addr) = crate::scenarios::first_edu(&pci)?;
    let device = map
        .device(addr)
        .ok_or("the edu device has no IOMMU association")?;
    let Some(UnitId::Smmu(ordinal)) = device.unit else {
        return Err(format!("edu {addr} is not behind an SMMU in the IORT"));
    };
    let sid = device
        .stream_id
        .ok_or_else(|| format!("edu {addr} has no StreamID"))?;
    let (mmio, config) = smmu_registers(acpi, ordinal)?;
    let memory = FrameDmaMemory::new(&platform.frames);
    let clock = KernelClock;
    let mut unit =
        SmmuUnit::init(&mmio, &memory, &clock, config).map_err(|e| format!("SMMU init: {e}"))?;
    info!(
        "smmu-dma: smmu{ordinal} @{:#x} up ({}coherent, {:?}); edu {addr} is StreamID {sid:#x}",
        mmio.base(),
        if unit.coherent() { "" } else { "non-" },
        unit.stream_table_layout()
    );
    if u64::from(sid) >= unit.stream_limit() {
        return Err(format!(
            "StreamID {sid:#x} is beyond the stream table ({:#x})",
            unit.stream_limit()
        ));
    }

    let buffers = platform
        .frames
        .lock()
        .allocate(2, 4096)
        .map_err(|e| format!("{e}"))?;
    let (source_page, target_page) = (buffers, buffers + 4096);
    fill(source_page, 1);
    fill(target_page, 0);

    // 1. Blocked: the stream's DMA is aborted, even to a real physical
    // address (what the device could reach before bring-up).
    let initial = bytes(target_page);
    edu.dma(Direction::ToRam, target_page, 0, FAULT_LENGTH)?;
    expect_events(&mut unit, sid, "blocked stream writing RAM", blocked)?;
    if bytes(target_page) != initial {
        return Err(String::from("a blocked stream changed memory"));
    }

    // 2. Attached: DMA through IOVAs reaches the mapped pages.
    let domain = unit
        .alloc_domain(SmmuDomainConfig::any())
        .map_err(|e| format!("domain: {e}"))?;
    let info_before = unit.domain_info(domain).map_err(|e| format!("{e}"))?;
    if info_before.stage != Stage::Stage1 || info_before.input_bits != 48 {
        return Err(format!(
            "expected a 48-bit stage-1 domain on QEMU's SMMU, got {info_before:?}"
        ));
    }
    unit.map(
        domain,
        IOVA_SOURCE,
        PhysAddr::new(source_page),
        4096,
        MapPerms::READ,
    )
    .map_err(|e| format!("map: {e}"))?;
    unit.map(
        domain,
        IOVA_TARGET,
        PhysAddr::new(target_page),
        4096,
        MapPerms::READ_WRITE,
    )
    .map_err(|e| format!("map: {e}"))?;
    unit.attach_stream(sid, domain)
        .map_err(|e| format!("attach: {e}"))?;
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LENGTH)?;
    edu.dma(Direction::ToRam, IOVA_TARGET, 0, LENGTH)?;
    no_events(&mut unit, "translated DMA")?;
    if bytes(target_page) != bytes(source_page) {
        return Err(String::from(
            "translated DMA did not copy the source page into the target page",
        ));
    }
    info!(
        "smmu-dma: {LENGTH} bytes moved IOVA {IOVA_SOURCE:#x} -> edu -> IOVA {IOVA_TARGET:#x} \
         (physical {source_page:#x} -> {target_page:#x}), ASID {}",
        info_before.tag
    );

    // 3. Write protection: a write through a read-only IOVA faults and
    // leaves the page alone.
    unit.map(
        domain,
        IOVA_READ_ONLY,
        PhysAddr::new(source_page),
        4096,
        MapPerms::READ,
    )
    .map_err(|e| format!("map: {e}"))?;
    let protected = bytes(source_page);
    edu.dma(Direction::ToRam, IOVA_READ_ONLY, 0, FAULT_LENGTH)?;
    let permission_faults = expect_events(&mut unit, sid, "write to a read-only IOVA", |f| {
        translation_fault(
            f,
            EventKind::Permission,
            IOVA_READ_ONLY,
            Access::Write,
            domain,
        )
    })?;
    if bytes(source_page) != protected {
        return Err(String::from(
            "a write through a read-only IOVA changed memory",
        ));
    }

    // 4. Unmapped IOVA.
    edu.dma(Direction::ToDevice, IOVA_UNMAPPED, 0, FAULT_LENGTH)?;
    let unmapped_faults = expect_events(&mut unit, sid, "read of an unmapped IOVA", |f| {
        translation_fault(
            f,
            EventKind::Translation,
            IOVA_UNMAPPED,
            Access::Read,
            domain,
        )
    })?;

    // 5. After unmap the old IOVA faults: the TLB entry the transfer in
    // step 2 left was invalidated (CMD_TLBI_NH_VA + CMD_SYNC).
    fill(target_page, 7);
    let before_unmap = bytes(target_page);
    let unmapped = unit
        .unmap(domain, IOVA_TARGET, 4096)
        .map_err(|e| format!("unmap: {e}"))?;
    if unmapped != 4096 {
        return Err(format!("unmap changed {unmapped} bytes, not 4096"));
    }
    edu.dma(Direction::ToRam, IOVA_TARGET, 0, FAULT_LENGTH)?;
    let stale_faults = expect_events(&mut unit, sid, "write after unmap", |f| {
        translation_fault(
            f,
            EventKind::Translation,
            IOVA_TARGET,
            Access::Write,
            domain,
        )
    })?;
    if bytes(target_page) != before_unmap {
        return Err(String::from(
            "DMA reached a page after its IOVA was unmapped",
        ));
    }
    // The domain's own fault queue got every fault above: the first ones
    // in order, the rest counted as dropped once it was full
    // (`SmmuConfig::domain_fault_queue`).
    let (queued, dropped) = unit
        .take_domain_faults(domain)
        .map_err(|e| format!("{e}"))?;
    let expected = permission_faults + unmapped_faults + stale_faults;
    let capacity = config.domain_fault_queue;
    let in_order = queued.iter().enumerate().all(|(i, f)| {
        let kind = if i < permission_faults {
            EventKind::Permission
        } else {
            EventKind::Translation
        };
        f.kind == kind && f.stream_id == sid
    });
    if queued.len() != expected.min(capacity)
        || queued.len() as u64 + dropped != expected as u64
        || !in_order
    {
        return Err(format!(
            "the domain's fault queue holds {} faults ({dropped} dropped) of {expected}",
            queued.len()
        ));
    }

    // 6. Detached: blocked again, even for the still-mapped source IOVA.
    unit.detach_stream(sid)
        .map_err(|e| format!("detach: {e}"))?;
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, FAULT_LENGTH)?;
    expect_events(&mut unit, sid, "read after detach", blocked)?;

    // 7. The domain's tables go back to the allocator, all of them, once
    // nothing points at them and its ASID was invalidated.
    let table_pages = unit
        .domain_info(domain)
        .map_err(|e| format!("{e}"))?
        .table_pages;
    let free_before = platform.frames.lock().free_frames();
    unit.free_domain(domain).map_err(|e| format!("free: {e}"))?;
    let released = platform.frames.lock().free_frames() - free_before;
    if table_pages == 0 || released != table_pages as u64 {
        return Err(format!(
            "freeing the domain released {released} pages; its tables held {table_pages}"
        ));
    }
    info!("smmu-dma: domain freed, its {released} table pages released");
    no_events(&mut unit, "the end")?;
    platform
        .frames
        .lock()
        .free(buffers, 2)
        .map_err(|e| format!("{e}"))?;
    Ok(())
}
