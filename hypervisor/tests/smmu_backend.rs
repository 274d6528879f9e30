//! `SmmuBackend` through its own API, as the boot code uses it: SMMUs
//! brought up by `SmmuUnit::init` (here over register models, with
//! borrowed memory), devices registered by StreamID, a function-reset
//! method. Translations are checked through the model (its configuration
//! caches and TLB included), faults through the event queue.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use sluice_abi::{self as abi, errno, hw_caps, wbinvd};
use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_hal::{Mmio, PhysAddr};
use sluice_hypervisor::iommufd::smmu_backend::{SmmuBackend, SmmuDevice, SmmuRegisterError};
use sluice_hypervisor::iommufd::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, FaultReason, FunctionReset,
    IommuBackend, IommuCaps, PageBudget, Prot, ResetError, VmConfig, VmId,
};
use sluice_hypervisor::testing::{DeviceSetup, Platform, SmmuFlavour, VmSetup};
use sluice_iommu::smmuv3::model::SmmuModel;
use sluice_iommu::smmuv3::walker::{Request, WalkError};
use sluice_iommu::smmuv3::{
    EventKind, IdrBuilder, SmmuConfig, SmmuDomainConfig, SmmuUnit, Stage, StreamTableRequest, regs,
};
use sluice_pci::Bdf;

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
const WO: Prot = Prot {
    read: false,
    write: true,
    mmio: false,
};
const ALL_PAGES: u64 = (1 << 12) | (1 << 21) | (1 << 30);

const DEV: DeviceId = DeviceId(1);
const SID: u32 = 0x18;

fn unit<'a>(mmio: &'a dyn Mmio, mem: &'a ModelMemory, clock: &'a ModelClock) -> SmmuUnit<'a> {
    let config = SmmuConfig {
        timeout_ns: 1_000_000,
        ..SmmuConfig::new(0, 0x0905_0000)
    };
    SmmuUnit::init(mmio, mem, clock, config).expect("SMMU comes up")
}

fn linear_unit<'a>(
    mmio: &'a dyn Mmio,
    mem: &'a ModelMemory,
    clock: &'a ModelClock,
) -> SmmuUnit<'a> {
    let config = SmmuConfig {
        timeout_ns: 1_000_000,
        stream_table: StreamTableRequest::Linear,
        ..SmmuConfig::new(0, 0x0905_0000)
    };
    SmmuUnit::init(mmio, mem, clock, config).expect("SMMU comes up")
}

/// Both stages, 8-bit SubstreamIDs with 2-level CD tables.
fn with_substreams() -> IdrBuilder {
    IdrBuilder {
        stage2: true,
        vmid16: true,
        ssid_bits: 8,
        cd2l: true,
        ..IdrBuilder::qemu_7_2()
    }
}

fn device(unit: u32, sid: u32) -> SmmuDevice {
    SmmuDevice {
        unit,
        stream_id: sid,
        rid: Bdf::from_requester_id(sid as u16),
        flr: true,
    }
}

fn drain(b: &mut SmmuBackend<'_>) -> Vec<DmaFault> {
    let mut out = Vec::new();
    b.drain_faults(&mut |f| out.push(f));
    out
}

fn req(sid: u32, ssid: Option<u32>, iova: u64, write: bool) -> Request {
    Request {
        sid,
        ssid,
        iova,
        write,
        privileged: false,
    }
}

/// Where the model sends a DMA (through its caches), or `None`.
fn lands(
    model: &SmmuModel<'_>,
    sid: u32,
    ssid: Option<u32>,
    iova: u64,
    write: bool,
) -> Option<u64> {
    model
        .dma(req(sid, ssid, iova, write))
        .ok()
        .map(|o| o.phys.as_u64())
}

#[test]
fn caps_come_from_the_smmus_registers() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let qemu = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let ssid8 = SmmuModel::new(&mem, with_substreams());
    let ssid20 = SmmuModel::new(
        &mem,
        IdrBuilder {
            ssid_bits: 20,
            cd2l: true,
            ..IdrBuilder::qemu_7_2()
        },
    );
    let linear_cds = SmmuModel::new(
        &mem,
        IdrBuilder {
            ssid_bits: 20,
            cd2l: false,
            ..IdrBuilder::qemu_7_2()
        },
    );
    let stage2_only = SmmuModel::new(
        &mem,
        IdrBuilder {
            stage1: false,
            stage2: true,
            ssid_bits: 8,
            ..IdrBuilder::qemu_7_2()
        },
    );
    let narrow = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mut b = SmmuBackend::new();
    let units = [
        b.add_unit(unit(&qemu, &mem, &clock)),
        b.add_unit(unit(&ssid8, &mem, &clock)),
        b.add_unit(unit(&ssid20, &mem, &clock)),
        b.add_unit(unit(&linear_cds, &mem, &clock)),
        b.add_unit(unit(&stage2_only, &mem, &clock)),
    ];
    assert_eq!(units, [0, 1, 2, 3, 4]);
    for u in units {
        b.add_device(DeviceId(u + 1), device(u, SID)).unwrap();
    }
    let caps = |b: &SmmuBackend<'_>, u: u32| b.caps(DeviceId(u + 1)).unwrap();
    assert_eq!(
        caps(&b, 0),
        IommuCaps {
            unit: 0,
            snoop_control: false,
            interrupt_remapping: false,
            scalable_mode: false,
            max_pasid_log2: 0,
            page_sizes: ALL_PAGES,
            input_address_bits: 48,
        },
        "QEMU 7.2: stage 1, no substreams, no MSI isolation without an ITS"
    );
    // PASID bits are what the CD tables cover: 2^15 with 2-level tables,
    // 64 CDs in one linear page.
    let pasids: Vec<(bool, u8)> = (1..4)
        .map(|u| (caps(&b, u).scalable_mode, caps(&b, u).max_pasid_log2))
        .collect();
    assert_eq!(pasids, [(true, 8), (true, 15), (true, 6)]);
    // Stage 2 only: no substreams (they need stage 1); IPAs as wide as
    // the output (OAS 44).
    let s2 = caps(&b, 4);
    assert_eq!(
        (s2.scalable_mode, s2.max_pasid_log2, s2.input_address_bits),
        (false, 0, 44)
    );
    assert_eq!(s2.page_sizes, ALL_PAGES);
    // MSI isolation is whatever the boot code declares for the ITS.
    assert!(b.set_msi_isolation(1, true));
    assert!(caps(&b, 1).interrupt_remapping);
    assert!(!caps(&b, 0).interrupt_remapping);
    assert!(!b.set_msi_isolation(9, true));
    assert_eq!(b.caps(DeviceId(9)), Err(BackendError::NoSuchDevice));

    // A narrower IOVA space for a unit's domains.
    let u = b.add_unit_with(
        unit(&narrow, &mem, &clock),
        SmmuDomainConfig::any().with_input_bits(39),
    );
    b.add_device(DeviceId(10), device(u, SID)).unwrap();
    assert_eq!(b.caps(DeviceId(10)).unwrap().input_address_bits, 39);
    let mut budget = PageBudget::new(64);
    let dom = b
        .domain_alloc(DeviceId(10), DomainConfig::default(), &mut budget)
        .unwrap();
    let (unit_index, smmu) = b.smmu_domain(dom).unwrap();
    let info = b.unit(unit_index).unwrap().domain_info(smmu).unwrap();
    assert_eq!((info.input_bits, info.levels), (39, 3));
    assert_eq!(
        b.map(
            dom,
            1 << 39,
            PhysAddr::new(0x1000),
            0x1000,
            RW,
            true,
            &mut budget
        ),
        Err(BackendError::BadRange),
        "beyond the domain's input range"
    );
}

#[test]
fn registration_refuses_unknown_units_duplicates_and_streams_beyond_the_table() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mut b = SmmuBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock));
    assert_eq!(
        b.add_device(DEV, device(7, SID)),
        Err(SmmuRegisterError::NoSuchUnit(7))
    );
    b.add_device(DEV, device(u, SID)).unwrap();
    assert_eq!(
        b.add_device(DEV, device(u, 0x20)),
        Err(SmmuRegisterError::DeviceExists(DEV))
    );
    // QEMU: 16-bit StreamIDs, one page of level-1 descriptors covers 2^15.
    assert_eq!(
        b.add_device(DeviceId(2), device(u, 0x8000)),
        Err(SmmuRegisterError::StreamOutOfRange {
            stream_id: 0x8000,
            limit: 0x8000
        })
    );
    // Devices behind a PCIe-to-PCI bridge share its StreamID.
    b.add_device(DeviceId(3), device(u, SID)).unwrap();
    assert_eq!(b.device(DeviceId(3)).unwrap().stream_id, SID);
    assert_eq!(b.attachment(DeviceId(3), None), AttachTarget::Blocking);
}

#[test]
fn incompatible_domains_and_attachments_are_refused() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m0 = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let m1 = SmmuModel::new(&mem, with_substreams());
    let mut b = SmmuBackend::new();
    let u0 = b.add_unit(unit(&m0, &mem, &clock));
    let u1 = b.add_unit(unit(&m1, &mem, &clock));
    b.add_device(DeviceId(1), device(u0, SID)).unwrap();
    b.add_device(DeviceId(2), device(u1, SID)).unwrap();
    let mut budget = PageBudget::new(64);
    let enforcing = DomainConfig {
        enforce_coherency: true,
        pasid_compatible: false,
    };
    let pasid = DomainConfig {
        enforce_coherency: false,
        pasid_compatible: true,
    };
    assert_eq!(
        b.domain_alloc(DeviceId(1), enforcing, &mut budget),
        Err(BackendError::Incompatible),
        "an SMMU cannot force snooping"
    );
    assert_eq!(
        b.domain_alloc(DeviceId(1), pasid, &mut budget),
        Err(BackendError::Incompatible),
        "no substreams on QEMU's SMMU"
    );
    assert_eq!(budget.used_pages, 0);
    let d0 = b
        .domain_alloc(DeviceId(1), DomainConfig::default(), &mut budget)
        .unwrap();
    let d1 = b
        .domain_alloc(DeviceId(2), DomainConfig::default(), &mut budget)
        .unwrap();
    let p1 = b.domain_alloc(DeviceId(2), pasid, &mut budget).unwrap();
    // Domains stay on their SMMU.
    assert_eq!(
        b.attach(DeviceId(2), None, AttachTarget::Domain(d0)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(DeviceId(1), None, AttachTarget::Domain(d1)),
        Err(BackendError::Incompatible)
    );
    // PASIDs: only PASID-compatible domains, never PASID 0 (the stream's
    // own traffic) or beyond the CD tables, never on QEMU's SMMU.
    assert_eq!(
        b.attach(DeviceId(2), Some(5), AttachTarget::Domain(d1)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(DeviceId(2), Some(0), AttachTarget::Domain(p1)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(DeviceId(2), Some(256), AttachTarget::Domain(p1)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(DeviceId(1), Some(5), AttachTarget::Domain(d0)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(
        b.attach(DeviceId(9), None, AttachTarget::Blocking),
        Err(BackendError::NoSuchDevice)
    );
    for d in [DeviceId(1), DeviceId(2)] {
        assert_eq!(b.attachment(d, None), AttachTarget::Blocking);
    }
    assert!(m0.violations().is_empty() && m1.violations().is_empty());
}

#[test]
fn dma_translates_faults_are_attributed_and_the_budget_is_exact() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mut b = SmmuBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock));
    b.add_device(DEV, device(u, SID)).unwrap();
    let base = mem.live_pages();
    let mut budget = PageBudget::new(6);
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    let (_, smmu) = b.smmu_domain(dom).unwrap();
    let table_pages =
        |b: &SmmuBackend<'_>| b.unit(u).unwrap().domain_info(smmu).unwrap().table_pages as u64;
    assert_eq!((budget.used_pages, table_pages(&b)), (1, 1));
    // A bound device is blocked: C_BAD_STREAMID, attributed to it.
    assert_eq!(lands(&m, SID, None, 0x1000, false), None);
    let faults = drain(&mut b);
    assert_eq!(faults.len(), 1);
    assert_eq!(
        (faults[0].device, faults[0].reason, faults[0].iova),
        (DEV, FaultReason::Blocked, 0),
        "configuration events carry no address"
    );
    // 48-bit stage 1: one page needs three tables below the root.
    b.map(
        dom,
        0x1000,
        PhysAddr::new(0x10_0000),
        0x2000,
        RW,
        true,
        &mut budget,
    )
    .unwrap();
    b.map(
        dom,
        0x4000,
        PhysAddr::new(0x30_0000),
        0x1000,
        RO,
        true,
        &mut budget,
    )
    .unwrap();
    assert_eq!((budget.used_pages, table_pages(&b)), (4, 4));
    assert_eq!(b.domain_pages(dom), Some(4));
    b.attach(DEV, None, AttachTarget::Domain(dom)).unwrap();
    assert_eq!(b.attachment(DEV, None), AttachTarget::Domain(dom));
    assert_eq!(lands(&m, SID, None, 0x2008, true), Some(0x10_1008));
    assert_eq!(lands(&m, SID, None, 0x4000, false), Some(0x30_0000));
    assert_eq!(lands(&m, SID, None, 0x4000, true), None);
    assert_eq!(lands(&m, SID, None, 0x8000, false), None);
    let faults = drain(&mut b);
    let seen: Vec<(DeviceId, Option<u32>, u64, bool, FaultReason)> = faults
        .iter()
        .map(|f| (f.device, f.pasid, f.iova, f.write, f.reason))
        .collect();
    assert_eq!(
        seen,
        [
            (DEV, None, 0x4000, true, FaultReason::Permission),
            (DEV, None, 0x8000, false, FaultReason::NotPresent),
        ]
    );
    // Another 512 GiB slot needs three more tables: over the budget of 6.
    // Nothing stays mapped, charged or allocated.
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
    assert_eq!(budget.used_pages, 4);
    assert_eq!(mem.live_pages(), live);
    assert_eq!(b.unit(u).unwrap().translate(smmu, 1 << 39), Ok(None));
    // Out of memory half-way: the same.
    let mut roomy = PageBudget::new(100);
    roomy.used_pages = budget.used_pages;
    mem.fail_allocation_after(Some(1));
    assert_eq!(
        b.map(
            dom,
            1 << 39,
            PhysAddr::new(0x20_0000),
            0x1000,
            RW,
            true,
            &mut roomy
        ),
        Err(BackendError::OutOfMemory)
    );
    mem.fail_allocation_after(None);
    assert_eq!((roomy.used_pages, mem.live_pages()), (4, live));
    // An unmap is invalidated: the TLB entry the DMA above left is gone,
    // and the emptied tables are released from the budget.
    b.map(
        dom,
        1 << 39,
        PhysAddr::new(0x20_0000),
        0x1000,
        RW,
        true,
        &mut roomy,
    )
    .unwrap();
    assert_eq!(roomy.used_pages, 7);
    assert_eq!(lands(&m, SID, None, 1 << 39, true), Some(0x20_0000));
    b.unmap(dom, 1 << 39, 0x1000, &mut roomy);
    assert_eq!(roomy.used_pages, table_pages(&b));
    assert_eq!(roomy.used_pages, 4);
    assert_eq!(lands(&m, SID, None, 1 << 39, true), None);
    b.unmap(dom, 0x1000, 0x2000, &mut roomy);
    assert_eq!(lands(&m, SID, None, 0x2008, true), None, "TLB invalidated");
    drain(&mut b);
    // Blocking again; then the domain and every table page go.
    b.attach(DEV, None, AttachTarget::Blocking).unwrap();
    assert!(matches!(
        m.dma(req(SID, None, 0x4000, false)),
        Err(WalkError::Fault(f)) if f.kind == EventKind::BadStreamId
    ));
    b.domain_free(dom, &mut roomy);
    assert_eq!((roomy.used_pages, b.domain_count()), (0, 0));
    assert_eq!(mem.live_pages(), base);
    assert!(m.violations().is_empty(), "{:?}", m.violations());
}

#[test]
fn write_only_maps_are_readable_on_stage_1_and_write_only_on_stage_2() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let s1 = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let s2 = SmmuModel::new(
        &mem,
        IdrBuilder {
            stage1: false,
            stage2: true,
            vmid16: true,
            ..IdrBuilder::qemu_7_2()
        },
    );
    let mut b = SmmuBackend::new();
    let u1 = b.add_unit(unit(&s1, &mem, &clock));
    let u2 = b.add_unit(unit(&s2, &mem, &clock));
    b.add_device(DeviceId(1), device(u1, SID)).unwrap();
    b.add_device(DeviceId(2), device(u2, SID)).unwrap();
    let mut budget = PageBudget::new(64);
    for (dev, model, stage, readable) in [
        (DeviceId(1), &s1, Stage::Stage1, true),
        (DeviceId(2), &s2, Stage::Stage2, false),
    ] {
        let dom = b
            .domain_alloc(dev, DomainConfig::default(), &mut budget)
            .unwrap();
        let (u, smmu) = b.smmu_domain(dom).unwrap();
        assert_eq!(b.unit(u).unwrap().domain_info(smmu).unwrap().stage, stage);
        b.map(
            dom,
            0x1000,
            PhysAddr::new(0x40_0000),
            0x1000,
            WO,
            true,
            &mut budget,
        )
        .unwrap();
        b.attach(dev, None, AttachTarget::Domain(dom)).unwrap();
        assert_eq!(lands(model, SID, None, 0x1000, true), Some(0x40_0000));
        assert_eq!(
            lands(model, SID, None, 0x1000, false).is_some(),
            readable,
            "{stage:?}"
        );
        assert!(model.violations().is_empty());
    }
}

#[test]
fn devices_sharing_a_stream_keep_it_while_one_is_attached() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mut b = SmmuBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock));
    // Two functions behind a PCIe-to-PCI bridge: one StreamID.
    let (a, c) = (DeviceId(1), DeviceId(2));
    b.add_device(a, device(u, 0x200)).unwrap();
    b.add_device(c, device(u, 0x200)).unwrap();
    let mut budget = PageBudget::new(64);
    let dom = b
        .domain_alloc(a, DomainConfig::default(), &mut budget)
        .unwrap();
    b.map(
        dom,
        0,
        PhysAddr::new(0x50_0000),
        0x1000,
        RW,
        true,
        &mut budget,
    )
    .unwrap();
    b.attach(a, None, AttachTarget::Domain(dom)).unwrap();
    b.attach(c, None, AttachTarget::Domain(dom)).unwrap();
    // Blocking one keeps the stream for the other.
    b.attach(a, None, AttachTarget::Blocking).unwrap();
    assert_eq!(lands(&m, 0x200, None, 0x10, true), Some(0x50_0010));
    // A fault is the attached sharer's.
    assert_eq!(lands(&m, 0x200, None, 0x8000, true), None);
    let faults = drain(&mut b);
    assert_eq!(faults.len(), 1);
    assert_eq!(
        (faults[0].device, faults[0].reason),
        (c, FaultReason::NotPresent)
    );
    // The last one blocks it.
    b.attach(c, None, AttachTarget::Blocking).unwrap();
    assert_eq!(lands(&m, 0x200, None, 0x10, true), None);
    drain(&mut b);
    b.domain_free(dom, &mut budget);
    assert_eq!((b.domain_count(), budget.used_pages), (0, 0));
}

#[test]
fn pasids_are_substreams_with_their_own_faults() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = SmmuModel::new(&mem, with_substreams());
    let mut b = SmmuBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock));
    b.add_device(DEV, device(u, SID)).unwrap();
    let mut budget = PageBudget::new(64);
    let pasid_config = DomainConfig {
        enforce_coherency: false,
        pasid_compatible: true,
    };
    let rid = b.domain_alloc(DEV, pasid_config, &mut budget).unwrap();
    let p5 = b.domain_alloc(DEV, pasid_config, &mut budget).unwrap();
    b.map(
        rid,
        0x1000,
        PhysAddr::new(0x60_0000),
        0x1000,
        RW,
        true,
        &mut budget,
    )
    .unwrap();
    b.map(
        p5,
        0x1000,
        PhysAddr::new(0x70_0000),
        0x1000,
        RO,
        true,
        &mut budget,
    )
    .unwrap();
    b.attach(DEV, Some(5), AttachTarget::Domain(p5)).unwrap();
    assert_eq!(b.attachment(DEV, Some(5)), AttachTarget::Domain(p5));
    // The stream's own traffic is still blocked (S1DSS terminates it).
    assert_eq!(lands(&m, SID, None, 0x1000, false), None);
    assert_eq!(lands(&m, SID, Some(5), 0x1000, false), Some(0x70_0000));
    b.attach(DEV, None, AttachTarget::Domain(rid)).unwrap();
    assert_eq!(lands(&m, SID, None, 0x1000, false), Some(0x60_0000));
    assert_eq!(lands(&m, SID, Some(5), 0x1000, true), None);
    assert_eq!(lands(&m, SID, Some(6), 0x1000, false), None);
    let faults: Vec<(Option<u32>, FaultReason)> =
        drain(&mut b).iter().map(|f| (f.pasid, f.reason)).collect();
    assert_eq!(
        faults,
        [
            (None, FaultReason::Blocked),
            (Some(5), FaultReason::Permission),
            (Some(6), FaultReason::Blocked),
        ]
    );
    // Detached PASIDs are blocked; the RID keeps translating.
    b.attach(DEV, Some(5), AttachTarget::Blocking).unwrap();
    assert_eq!(lands(&m, SID, Some(5), 0x1000, false), None);
    assert_eq!(lands(&m, SID, None, 0x1000, false), Some(0x60_0000));
    b.attach(DEV, None, AttachTarget::Blocking).unwrap();
    drain(&mut b);
    b.domain_free(rid, &mut budget);
    b.domain_free(p5, &mut budget);
    assert_eq!(budget.used_pages, 0);
    assert!(m.violations().is_empty(), "{:?}", m.violations());
}

/// The register model with a doorbell that can be lost (a CMDQ_PROD write
/// the SMMU never sees), as an SMMU that stopped consuming commands.
struct LossyDoorbell<'m> {
    model: &'m SmmuModel<'m>,
    lose: Cell<bool>,
}

impl Mmio for LossyDoorbell<'_> {
    fn read32(&self, offset: usize) -> u32 {
        self.model.read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        if offset == regs::CMDQ_PROD.offset() && self.lose.replace(false) {
            return;
        }
        self.model.write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        self.model.read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        self.model.write64(offset, value)
    }
}

#[test]
fn an_attach_whose_invalidation_fails_changes_nothing() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mmio = LossyDoorbell {
        model: &m,
        lose: Cell::new(false),
    };
    let mut b = SmmuBackend::new();
    // Linear: the STE itself, not a new level-2 table, is what the lost
    // invalidation was for.
    let u = b.add_unit(linear_unit(&mmio, &mem, &clock));
    b.add_device(DEV, device(u, SID)).unwrap();
    let base = mem.live_pages();
    let mut budget = PageBudget::new(64);
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    b.map(
        dom,
        0,
        PhysAddr::new(0x80_0000),
        0x1000,
        RW,
        true,
        &mut budget,
    )
    .unwrap();
    mmio.lose.set(true);
    assert_eq!(
        b.attach(DEV, None, AttachTarget::Domain(dom)),
        Err(BackendError::Incompatible)
    );
    assert_eq!(b.attachment(DEV, None), AttachTarget::Blocking);
    assert_eq!(lands(&m, SID, None, 0, true), None, "still blocked");
    // The domain can go: the unit is flushed first.
    b.domain_free(dom, &mut budget);
    assert_eq!((budget.used_pages, mem.live_pages()), (0, base));
    // And the device attaches normally afterwards.
    let dom = b
        .domain_alloc(DEV, DomainConfig::default(), &mut budget)
        .unwrap();
    b.map(
        dom,
        0,
        PhysAddr::new(0x80_0000),
        0x1000,
        RW,
        true,
        &mut budget,
    )
    .unwrap();
    b.attach(DEV, None, AttachTarget::Domain(dom)).unwrap();
    assert_eq!(lands(&m, SID, None, 0x10, true), Some(0x80_0010));
    assert!(m.violations().is_empty(), "{:?}", m.violations());
}

#[test]
fn without_large_pages_every_leaf_is_4k() {
    let mem = ModelMemory::new();
    let clock = ModelClock::new(1_000);
    let m = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mut b = SmmuBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock));
    b.add_device(DEV, device(u, SID)).unwrap();
    let mut budget = PageBudget::new(64);
    let pages = |large: bool, b: &mut SmmuBackend<'_>, budget: &mut PageBudget| {
        let dom = b
            .domain_alloc(DEV, DomainConfig::default(), budget)
            .unwrap();
        b.map(
            dom,
            4 << 20,
            PhysAddr::new(8 << 20),
            4 << 20,
            RW,
            large,
            budget,
        )
        .unwrap();
        let n = b.domain_pages(dom).unwrap();
        b.domain_free(dom, budget);
        n
    };
    // 2 MiB blocks: root and two tables; 4 KiB pages: two leaf tables more.
    assert_eq!(pages(true, &mut b, &mut budget), 3);
    assert_eq!(pages(false, &mut b, &mut budget), 5);
    assert_eq!(budget.used_pages, 0);
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
    let m = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let mut b = SmmuBackend::new();
    let u = b.add_unit(unit(&m, &mem, &clock));
    b.add_device(DEV, device(u, SID)).unwrap();
    b.add_device(
        DeviceId(2),
        SmmuDevice {
            flr: false,
            ..device(u, 0x20)
        },
    )
    .unwrap();
    assert_eq!(b.reset_device(DEV), Err(BackendError::Unsupported));
    let done = Rc::new(RefCell::new(Vec::new()));
    b.set_function_reset(Box::new(Resets {
        done: done.clone(),
        fail: false,
    }));
    assert_eq!(b.reset_device(DEV), Ok(()));
    assert_eq!(b.reset_device(DeviceId(2)), Err(BackendError::Unsupported));
    assert_eq!(b.reset_device(DeviceId(9)), Err(BackendError::NoSuchDevice));
    assert_eq!(*done.borrow(), vec![Bdf::from_requester_id(SID as u16)]);
    b.set_function_reset(Box::new(Resets {
        done: done.clone(),
        fail: true,
    }));
    assert_eq!(b.reset_device(DEV), Err(BackendError::Unsupported));
}

/// The object model's view of an SMMU device: no snoop control (so no
/// enforcing HWPT, and a VM whose device issues no-snoop DMA must flush
/// caches on WBINVD), and MSIs isolated only where the ITS is declared
/// isolating, else binding is refused unless the VM allows it.
#[test]
fn the_object_model_sees_no_snoop_control_and_msi_isolation_from_the_its() {
    let (vm, other) = (VmId(1), VmId(2));
    let (nic, old) = (abi::bdf(0, 0, 3, 0), abi::bdf(0, 0, 4, 0));
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
        .build_smmu(SmmuFlavour::qemu());
    let dev = p.bind(vm, nic).unwrap().dev_id;
    let info = p.hw_info(vm, dev).unwrap();
    assert_ne!(info.out_capabilities & hw_caps::INTERRUPT_REMAPPING, 0);
    assert_eq!(info.out_capabilities & hw_caps::ENFORCE_SNOOP, 0);
    assert_eq!(info.out_max_pasid_log2, 0);
    assert_eq!(p.bind(vm, old), Err(errno::EPERM));
    let dev_other = p.bind(other, old).unwrap().dev_id;
    let info = p.hw_info(other, dev_other).unwrap();
    assert_eq!(info.out_capabilities & hw_caps::INTERRUPT_REMAPPING, 0);
    // The device issues no-snoop DMA and nothing can force it coherent.
    let ioas = p.ioas_alloc(vm).unwrap();
    let h = p.attach(vm, dev, ioas).unwrap();
    let snap = p.iommufd.snapshot(vm);
    assert!(
        !snap
            .hwpts
            .iter()
            .find(|x| x.id == h)
            .unwrap()
            .enforce_coherency
    );
    assert_eq!(p.wbinvd_policy(vm), Ok(wbinvd::FLUSH));
    assert!(p.iommufd.backend().violations().is_empty());
}
