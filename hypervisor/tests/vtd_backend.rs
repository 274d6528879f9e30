//! `VtdBackend` through its own API, as the boot code uses it: units made
//! by `VtdUnit::init` (here over register models, with borrowed memory),
//! devices with requester IDs and DMA aliases, a function-reset method.
//! Translations are checked with the model (through its caches) and the
//! independent VT-d walker.

use std::cell::RefCell;
use std::rc::Rc;

use sluice_abi::{self as abi, errno, hw_caps};
use sluice_hal::PhysAddr;
use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_hypervisor::iommufd::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, FaultReason, FunctionReset,
    IommuBackend, PageBudget, Prot, RegisterError, ResetError, VmConfig, VmId, VtdBackend,
    VtdDevice,
};
use sluice_hypervisor::testing::{DeviceSetup, Platform, VmSetup, VtdFlavour};
use sluice_iommu::vtd::model::{InjectedFault, Stuck, VtdModel};
use sluice_iommu::vtd::walker::{self, DmaRequest, TranslationFault};
use sluice_iommu::vtd::{CapBuilder, IrConfig, ModeRequest, VtdConfig, VtdUnit};
use sluice_pci::Bdf;

const HAW: u32 = 46;
const RW: Prot = Prot {
    read: true,
    write: true,
    mmio: false,
};
const RO: Prot = Prot {
    read: true,
    write: false,
    mmio: false,
};

fn unit<'a>(
    model: &'a VtdModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a ModelClock,
    mode: ModeRequest,
) -> VtdUnit<'a> {
    let config = VtdConfig {
        mode,
        timeout_ns: 1_000_000,
        ..VtdConfig::new(0, 0xfed9_0000, HAW)
    };
    VtdUnit::init(model, mem, clock, config).expect("unit comes up")
}

fn caps_with_records(caps: CapBuilder) -> CapBuilder {
    CapBuilder { nfr: 16, ..caps }
}

fn device(unit: u32, rid: Bdf) -> VtdDevice {
    VtdDevice {
        unit,
        rid,
        aliases: Vec::new(),
        flr: true,
    }
}

fn drain(b: &mut VtdBackend<'_>) -> Vec<DmaFault> {
    let mut out = Vec::new();
    b.drain_faults(&mut |f| out.push(f));
    out
}

fn read(rid: Bdf, iova: u64) -> DmaRequest {
    DmaRequest::read(rid.requester_id(), iova)
}

fn write(rid: Bdf, iova: u64) -> DmaRequest {
    DmaRequest::write(rid.requester_id(), iova)
}

const DEV: DeviceId = DeviceId(1);
const RID: Bdf = Bdf::new(3, 0, 0);

#[test]
fn caps_come_from_the_units_registers() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let qemu = VtdModel::new(&mem, CapBuilder::qemu_default(), HAW);
    let server = VtdModel::new(&mem, CapBuilder::server(), HAW);
    let no_large = VtdModel::new(
        &mem,
        CapBuilder {
            sllps: 0,
            ..CapBuilder::qemu_default()
        },
        HAW,
    );
    let mut b = VtdBackend::new();
    let u0 = b.add_unit(unit(&qemu, &mem, &clock, ModeRequest::Legacy));
    let u1 = b.add_unit(unit(&server, &mem, &clock, ModeRequest::Scalable));
    let u2 = b.add_unit(unit(&no_large, &mem, &clock, ModeRequest::Legacy));
    assert_eq!((u0, u1, u2), (0, 1, 2));
    for (n, u) in [u0, u1, u2].into_iter().enumerate() {
        b.add_device(DeviceId(n as u32), device(u, RID)).unwrap();
    }
    let c = b.caps(DeviceId(0)).unwrap();
    assert_eq!(c.unit, 0);
    assert!(!c.snoop_control && !c.scalable_mode && !c.interrupt_remapping);
    assert_eq!(c.max_pasid_log2, 0);
    assert_eq!(c.page_sizes, (1 << 12) | (1 << 21) | (1 << 30));
    assert_eq!(c.input_address_bits, 39, "3-level tables, MGAW 39");
    let c = b.caps(DeviceId(1)).unwrap();
    assert_eq!(c.unit, 1);
    assert!(c.snoop_control && c.scalable_mode);
    // ECAP.IR is set on this unit, but remapping is not enabled yet: MSIs
    // are not isolated.
    assert!(!c.interrupt_remapping);
    // 20 PASID bits in the unit; the driver's one-page PASID directory
    // reaches 2^15.
    assert_eq!(c.max_pasid_log2, 15);
    assert_eq!(c.input_address_bits, 48);
    assert_eq!(b.caps(DeviceId(2)).unwrap().page_sizes, 1 << 12);
    b.unit_mut(u1)
        .unwrap()
        .enable_interrupt_remapping(IrConfig { x2apic: true })
        .unwrap();
    assert!(
        b.caps(DeviceId(1)).unwrap().interrupt_remapping,
        "read live"
    );
    assert_eq!(b.caps(DeviceId(9)), Err(BackendError::NoSuchDevice));
}

#[test]
fn msis_are_isolated_once_sluice_enables_interrupt_remapping() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let server = VtdModel::new(&mem, CapBuilder::server(), HAW);
    let mut u = unit(&server, &mem, &clock, ModeRequest::Scalable);
    u.enable_interrupt_remapping(IrConfig { x2apic: false })
        .unwrap();
    assert!(u.interrupt_remapping_enabled());
    let mut b = VtdBackend::new();
    let index = b.add_unit(u);
    b.add_device(DeviceId(0), device(index, RID)).unwrap();
    assert!(b.caps(DeviceId(0)).unwrap().interrupt_remapping);
}

#[test]
fn registration_refuses_unknown_units_and_duplicate_devices_or_rids() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, CapBuilder::qemu_default(), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Legacy));
    assert_eq!(
        b.add_device(DEV, device(7, RID)),
        Err(RegisterError::NoSuchUnit(7))
    );
    b.add_device(DEV, device(u, RID)).unwrap();
    assert_eq!(
        b.add_device(DEV, device(u, Bdf::new(3, 1, 0))),
        Err(RegisterError::DeviceExists(DEV))
    );
    assert_eq!(
        b.add_device(DeviceId(2), device(u, RID)),
        Err(RegisterError::RidTaken {
            rid: RID,
            owner: DEV
        })
    );
    // Two devices behind one PCIe-to-PCI bridge share its alias.
    let bridge = Bdf::new(0, 0x1e, 0);
    for (id, rid) in [(3, Bdf::new(5, 0, 0)), (4, Bdf::new(5, 1, 0))] {
        let d = VtdDevice {
            aliases: vec![bridge],
            ..device(u, rid)
        };
        b.add_device(DeviceId(id), d).unwrap();
    }
    assert_eq!(b.device(DeviceId(4)).unwrap().aliases, vec![bridge]);
}

#[test]
fn incompatible_domains_and_attachments_are_refused() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let legacy = VtdModel::new(&mem, CapBuilder::qemu_default(), HAW);
    let scalable = VtdModel::new(&mem, CapBuilder::server(), HAW);
    let mut b = VtdBackend::new();
    let ul = b.add_unit(unit(&legacy, &mem, &clock, ModeRequest::Legacy));
    let us = b.add_unit(unit(&scalable, &mem, &clock, ModeRequest::Scalable));
    let (dl, ds) = (DeviceId(1), DeviceId(2));
    b.add_device(dl, device(ul, RID)).unwrap();
    b.add_device(ds, device(us, RID)).unwrap();
    let mut budget = PageBudget::new(100);
    let coherent = DomainConfig {
        enforce_coherency: true,
        pasid_compatible: false,
    };
    let pasid = DomainConfig {
        enforce_coherency: false,
        pasid_compatible: true,
    };
    // No snoop control / no scalable mode on the legacy unit.
    assert_eq!(
        b.domain_alloc(dl, coherent, &mut budget),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.domain_alloc(dl, pasid, &mut budget),
        Err(BackendError::Incompatible)
    );
    assert_eq!(budget.used_pages, 0);
    let on_legacy = b
        .domain_alloc(dl, DomainConfig::default(), &mut budget)
        .unwrap();
    let on_scalable = b.domain_alloc(ds, coherent, &mut budget).unwrap();
    let pasid_dom = b.domain_alloc(ds, pasid, &mut budget).unwrap();
    // A domain only attaches to devices of its unit.
    assert_eq!(
        b.attach(ds, None, AttachTarget::Domain(on_legacy)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(dl, None, AttachTarget::Domain(on_scalable)),
        Err(BackendError::Incompatible)
    );
    // PASIDs: not on a legacy unit, not on a domain made without PASID
    // support, never PASID 0 (RID_PASID) or beyond the directory.
    assert_eq!(
        b.attach(dl, Some(1), AttachTarget::Domain(on_legacy)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(ds, Some(1), AttachTarget::Domain(on_scalable)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(ds, Some(0), AttachTarget::Domain(pasid_dom)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(ds, Some(1 << 15), AttachTarget::Domain(pasid_dom)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(DeviceId(9), None, AttachTarget::Blocking),
        Err(BackendError::NoSuchDevice)
    );
    // Nothing was attached by any of these.
    for d in [dl, ds] {
        assert_eq!(b.attachment(d, None), AttachTarget::Blocking);
    }
    assert_eq!(b.attachment(ds, Some(1)), AttachTarget::Blocking);
    assert_eq!(
        b.attach(ds, Some(1), AttachTarget::Domain(pasid_dom)),
        Ok(())
    );
    assert_eq!(
        scalable
            .dma(read(RID, 0).with_pasid(1))
            .map_err(|f| f.reason_code(true, false)),
        Err(0x82),
        "attached, nothing mapped"
    );
}

#[test]
fn page_budget_is_charged_exactly_and_failed_maps_leave_nothing() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, CapBuilder::server(), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Legacy));
    b.add_device(DEV, device(u, RID)).unwrap();
    let mut budget = PageBudget::new(5);
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    let (_, vtd) = b.vtd_domain(dom).unwrap();
    let table_pages =
        |b: &VtdBackend<'_>| b.unit(u).unwrap().domain_info(vtd).unwrap().table_pages as u64;
    assert_eq!((budget.used_pages, table_pages(&b)), (1, 1));
    // One 4 KiB page in a 4-level table: three tables below the root.
    b.map(
        dom,
        0x1000,
        PhysAddr::new(0x10_0000),
        0x1000,
        RW,
        true,
        &mut budget,
    )
    .unwrap();
    assert_eq!((budget.used_pages, table_pages(&b)), (4, 4));
    assert_eq!(b.domain_pages(dom), Some(4));
    // Another 512 GiB slot needs three more: over the budget of 5. Nothing
    // stays mapped, charged or allocated.
    let live = mem.live_pages();
    assert_eq!(
        b.map(
            dom,
            1 << 39,
            PhysAddr::new(0x20_0000),
            0x1000,
            RW,
            true,
            &mut budget
        ),
        Err(BackendError::QuotaExceeded)
    );
    assert_eq!((budget.used_pages, table_pages(&b)), (4, 4));
    assert_eq!(mem.live_pages(), live);
    assert_eq!(b.unit(u).unwrap().translate(vtd, 1 << 39), Ok(None));
    // Memory runs out instead: OutOfMemory, the same nothing-left.
    mem.fail_allocation_after(Some(1));
    assert_eq!(
        b.map(
            dom,
            1 << 30,
            PhysAddr::new(0x20_0000),
            0x1000,
            RW,
            true,
            &mut budget
        ),
        Err(BackendError::OutOfMemory)
    );
    assert_eq!((budget.used_pages, table_pages(&b)), (4, 4));
    assert_eq!(mem.live_pages(), live);
    // Refusals of the table (already mapped, beyond the width) too.
    assert_eq!(
        b.map(dom, 0, PhysAddr::new(0), 0x2000, RW, true, &mut budget),
        Err(BackendError::BadRange)
    );
    assert_eq!(
        b.map(
            dom,
            1 << 48,
            PhysAddr::new(0),
            0x1000,
            RW,
            true,
            &mut budget
        ),
        Err(BackendError::BadRange)
    );
    assert_eq!(
        b.unit(u)
            .unwrap()
            .translate(vtd, 0x1000)
            .unwrap()
            .map(|t| t.0),
        Some(PhysAddr::new(0x10_0000)),
        "the existing mapping is untouched"
    );
    // Within the existing tables there is room; unmapping gives pages back.
    b.map(
        dom,
        0x2000,
        PhysAddr::new(0x30_0000),
        0x1000,
        RO,
        true,
        &mut budget,
    )
    .unwrap();
    assert_eq!(budget.used_pages, 4);
    b.unmap(dom, 0x1000, 0x2000, &mut budget);
    assert_eq!((budget.used_pages, table_pages(&b)), (1, 1));
    b.domain_free(dom, &mut budget);
    assert_eq!(budget.used_pages, 0);
    assert_eq!(b.domain_count(), 0);
    let structures = b.unit(u).unwrap().structure_pages();
    assert_eq!(mem.live_pages(), structures);
}

#[test]
fn a_map_whose_invalidation_fails_is_undone() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let caps = CapBuilder {
        caching_mode: true,
        ..CapBuilder::qemu_default()
    };
    let m = VtdModel::new(&mem, caps, HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Legacy));
    b.add_device(DEV, device(u, RID)).unwrap();
    let mut budget = PageBudget::new(100);
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    b.attach(DEV, None, AttachTarget::Domain(dom)).unwrap();
    let (_, vtd) = b.vtd_domain(dom).unwrap();
    let charged = budget.used_pages;
    // Caching mode: a new mapping needs an invalidation; the unit stops
    // answering.
    m.set_stuck(Stuck {
        queue: true,
        ..Stuck::default()
    });
    assert_eq!(
        b.map(
            dom,
            0x4000,
            PhysAddr::new(0x10_0000),
            0x1000,
            RW,
            true,
            &mut budget
        ),
        Err(BackendError::Incompatible)
    );
    assert_eq!(b.unit(u).unwrap().translate(vtd, 0x4000), Ok(None));
    assert_eq!(budget.used_pages, charged, "nothing charged");
    m.set_stuck(Stuck::default());
    assert_eq!(
        m.dma(read(RID, 0x4000)).map(|o| o.phys),
        Err(TranslationFault::NotPresent { level: 2 }),
        "the table the failed map built is gone"
    );
    // Once the unit answers again, freeing flushes every cache first and
    // releases what was held back.
    b.attach(DEV, None, AttachTarget::Blocking).unwrap();
    b.domain_free(dom, &mut budget);
    assert_eq!(budget.used_pages, 0);
    assert_eq!(b.unit(u).unwrap().quarantined_pages(), 0);
    assert_eq!(mem.live_pages(), b.unit(u).unwrap().structure_pages());
    assert!(m.violations().is_empty(), "{:?}", m.violations());
}

#[test]
fn without_large_pages_every_leaf_is_4k() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, CapBuilder::qemu_default(), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Legacy));
    b.add_device(DEV, device(u, RID)).unwrap();
    let mut budget = PageBudget::new(100);
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    b.attach(DEV, None, AttachTarget::Domain(dom)).unwrap();
    let rtaddr = m.active_root().expect("root table set");
    let page_size = |iova| {
        walker::translate(&mem, rtaddr, &read(RID, iova), &m.walker_config())
            .expect("mapped")
            .walk
            .page_size
    };
    // 4 MiB, 2 MiB-aligned on both sides, at 1 GiB and at 2 GiB.
    let (base, len) = (PhysAddr::new(0x4000_0000), 4 << 20);
    b.map(dom, 1 << 30, base, len, RW, true, &mut budget)
        .unwrap();
    let large = budget.used_pages;
    b.map(dom, 2 << 30, base, len, RW, false, &mut budget)
        .unwrap();
    let small = budget.used_pages - large;
    for off in [0, 0x10_0000, 0x1f_f000, 0x20_0000, 0x3f_f000] {
        assert_eq!(page_size((1 << 30) + off), 2 << 20);
        assert_eq!(page_size((2 << 30) + off), 0x1000);
        assert_eq!(
            m.dma(write(RID, (2 << 30) + off + 8)).map(|o| o.phys),
            Ok(PhysAddr::new(base.as_u64() + off + 8))
        );
    }
    // 3-level table: the 4 KiB mapping needs its level-1 table and two
    // leaf tables; the 2 MiB one only its level-1 table.
    assert_eq!((large - 1, small), (1, 3));
}

#[test]
fn aliases_attach_fault_and_detach_with_their_devices() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, caps_with_records(CapBuilder::qemu_default()), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Legacy));
    let bridge = Bdf::new(0, 0x1e, 0);
    let (d, e) = (DeviceId(1), DeviceId(2));
    let (rd, re) = (Bdf::new(5, 0, 0), Bdf::new(5, 1, 0));
    for (id, rid) in [(d, rd), (e, re)] {
        let desc = VtdDevice {
            aliases: vec![bridge],
            ..device(u, rid)
        };
        b.add_device(id, desc).unwrap();
    }
    let mut budget = PageBudget::new(100);
    let dom = b
        .domain_alloc(d, DomainConfig::default(), &mut budget)
        .unwrap();
    b.map(
        dom,
        0x1000,
        PhysAddr::new(0x10_0000),
        0x1000,
        RO,
        true,
        &mut budget,
    )
    .unwrap();
    b.attach(d, None, AttachTarget::Domain(dom)).unwrap();
    for rid in [rd, bridge] {
        assert_eq!(
            m.dma(read(rid, 0x1008)).map(|o| o.phys),
            Ok(PhysAddr::new(0x10_0008))
        );
    }
    // A fault carrying the bridge's requester ID is D's: the alias is
    // attached to D's domain. The page address is reported; write to a
    // read-only page is a permission fault, an unmapped page not present.
    assert!(m.dma(write(bridge, 0x1008)).is_err());
    assert!(m.dma(read(bridge, 0x9000)).is_err());
    assert!(m.dma(read(re, 0x1000)).is_err());
    assert_eq!(
        drain(&mut b),
        vec![
            DmaFault {
                device: d,
                pasid: None,
                iova: 0x1000,
                write: true,
                reason: FaultReason::Permission,
            },
            DmaFault {
                device: d,
                pasid: None,
                iova: 0x9000,
                write: false,
                reason: FaultReason::NotPresent,
            },
            DmaFault {
                device: e,
                pasid: None,
                iova: 0x1000,
                write: false,
                reason: FaultReason::Blocked,
            },
        ]
    );
    // E joins; D leaves: the shared alias stays with E.
    b.attach(e, None, AttachTarget::Domain(dom)).unwrap();
    b.attach(d, None, AttachTarget::Blocking).unwrap();
    assert_eq!(
        m.dma(read(rd, 0x1000)).map(|o| o.phys),
        Err(TranslationFault::ContextNotPresent)
    );
    for rid in [re, bridge] {
        assert!(m.dma(read(rid, 0x1000)).is_ok());
    }
    b.attach(e, None, AttachTarget::Blocking).unwrap();
    for rid in [rd, re, bridge] {
        assert_eq!(
            m.dma(read(rid, 0x1000)).map(|o| o.phys),
            Err(TranslationFault::ContextNotPresent)
        );
    }
    b.unmap(dom, 0x1000, 0x1000, &mut budget);
    b.domain_free(dom, &mut budget);
    assert_eq!((budget.used_pages, b.domain_count()), (0, 0));
    assert!(m.violations().is_empty(), "{:?}", m.violations());
}

#[test]
fn pasid_faults_carry_the_pasid_and_scalable_reasons_decode() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, CapBuilder::server(), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Scalable));
    b.add_device(DEV, device(u, RID)).unwrap();
    let mut budget = PageBudget::new(100);
    let config = DomainConfig {
        enforce_coherency: true,
        pasid_compatible: true,
    };
    let dom = b.domain_alloc(DEV, config, &mut budget).unwrap();
    b.map(
        dom,
        0x1000,
        PhysAddr::new(0x10_0000),
        0x1000,
        RO,
        true,
        &mut budget,
    )
    .unwrap();
    b.attach(DEV, Some(9), AttachTarget::Domain(dom)).unwrap();
    assert!(m.dma(read(RID, 0x1000)).is_err(), "RID_PASID still blocked");
    assert!(m.dma(write(RID, 0x1000).with_pasid(9)).is_err());
    assert!(m.dma(read(RID, 0x2000).with_pasid(9)).is_err());
    assert!(m.dma(read(RID, 1 << 48).with_pasid(9)).is_err());
    assert!(m.dma(read(RID, 0x1000).with_pasid(10)).is_err());
    let faults: Vec<(Option<u32>, FaultReason)> =
        drain(&mut b).iter().map(|f| (f.pasid, f.reason)).collect();
    assert_eq!(
        faults,
        vec![
            (None, FaultReason::Blocked),
            (Some(9), FaultReason::Permission),
            (Some(9), FaultReason::NotPresent),
            (Some(9), FaultReason::NotPresent),
            (Some(10), FaultReason::Blocked),
        ]
    );
    assert_eq!(
        m.dma(read(RID, 0x1000).with_pasid(9))
            .map(|o| (o.phys, o.snooped)),
        Ok((PhysAddr::new(0x10_0000), true)),
        "PGSNP forces snooping"
    );
    b.attach(DEV, Some(9), AttachTarget::Blocking).unwrap();
    assert_eq!(b.attachment(DEV, Some(9)), AttachTarget::Blocking);
    assert!(m.dma(read(RID, 0x1000).with_pasid(9)).is_err());
}

#[test]
fn a_fault_record_naming_rid_pasid_is_a_rid_fault() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, CapBuilder::server(), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Scalable));
    b.add_device(DEV, device(u, RID)).unwrap();
    let mut budget = PageBudget::new(100);
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    b.map(
        dom,
        0x1000,
        PhysAddr::new(0x10_0000),
        0x1000,
        RO,
        true,
        &mut budget,
    )
    .unwrap();
    b.attach(DEV, None, AttachTarget::Domain(dom)).unwrap();
    // Some units (QEMU's) record a request without PASID that faulted in
    // the RID_PASID entry's table with PASID 0: a write to a read-only
    // page and a read of an unmapped one.
    for (addr, write) in [(0x1000, true), (0x5000, false)] {
        m.inject_fault(InjectedFault {
            sid: RID.requester_id(),
            addr,
            reason: if write { 0x81 } else { 0x82 },
            write,
            pasid: Some(0),
        });
    }
    let faults: Vec<(Option<u32>, u64, FaultReason)> = drain(&mut b)
        .iter()
        .map(|f| (f.pasid, f.iova, f.reason))
        .collect();
    assert_eq!(
        faults,
        vec![
            (None, 0x1000, FaultReason::Permission),
            (None, 0x5000, FaultReason::NotPresent),
        ]
    );
}

struct Resets {
    done: Rc<RefCell<Vec<Bdf>>>,
    fail: bool,
}

impl FunctionReset for Resets {
    fn function_level_reset(&mut self, rid: Bdf) -> Result<(), ResetError> {
        if self.fail {
            return Err(ResetError::Timeout);
        }
        self.done.borrow_mut().push(rid);
        Ok(())
    }
}

#[test]
fn function_level_reset_goes_through_the_boot_codes_method() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = VtdModel::new(&mem, CapBuilder::qemu_default(), HAW);
    let mut b = VtdBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock, ModeRequest::Legacy));
    b.add_device(DEV, device(u, RID)).unwrap();
    let no_flr = VtdDevice {
        flr: false,
        ..device(u, Bdf::new(3, 1, 0))
    };
    b.add_device(DeviceId(2), no_flr).unwrap();
    assert_eq!(
        b.reset_device(DEV),
        Err(BackendError::Unsupported),
        "no method"
    );
    let done = Rc::new(RefCell::new(Vec::new()));
    b.set_function_reset(Box::new(Resets {
        done: done.clone(),
        fail: false,
    }));
    assert_eq!(b.reset_device(DEV), Ok(()));
    assert_eq!(b.reset_device(DeviceId(2)), Err(BackendError::Unsupported));
    assert_eq!(b.reset_device(DeviceId(9)), Err(BackendError::NoSuchDevice));
    assert_eq!(*done.borrow(), vec![RID]);
    b.set_function_reset(Box::new(Resets {
        done: done.clone(),
        fail: true,
    }));
    assert_eq!(b.reset_device(DEV), Err(BackendError::Unsupported));
}

#[test]
fn msi_isolation_on_the_platform_follows_the_units_interrupt_remapping() {
    let vm = VmId(1);
    let other = VmId(2);
    let (nic, old) = (abi::bdf(0, 0, 3, 0), abi::bdf(0, 0, 4, 0));
    // `old` sits behind a unit without interrupt remapping.
    let mut p = Platform::builder()
        .vm(vm, VmSetup::new().ram(0, 16 << 20))
        .vm(
            other,
            VmSetup::new().ram(0, 16 << 20).config(VmConfig {
                allow_unsafe_interrupts: true,
                ..Default::default()
            }),
        )
        .device(DeviceSetup::new(vm, nic))
        .device(DeviceSetup::new(vm, old).interrupt_remapping(false))
        .device(DeviceSetup::new(other, old).interrupt_remapping(false))
        .build_vtd(VtdFlavour::legacy());
    let dev = p.bind(vm, nic).unwrap().dev_id;
    let info = p.hw_info(vm, dev).unwrap();
    assert_ne!(info.out_capabilities & hw_caps::INTERRUPT_REMAPPING, 0);
    assert_eq!(p.bind(vm, old), Err(errno::EPERM));
    let dev = p.bind(other, old).unwrap().dev_id;
    let info = p.hw_info(other, dev).unwrap();
    assert_eq!(info.out_capabilities & hw_caps::INTERRUPT_REMAPPING, 0);
    assert_ne!(info.out_capabilities & hw_caps::ENFORCE_SNOOP, 0);
}
