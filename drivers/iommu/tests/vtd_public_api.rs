//! The VT-d driver through its public API only, the way the hypervisor's
//! iommufd backend and boot code use it: a QEMU-like unit modelled by
//! `vtd::model`, a guest buffer mapped for an assigned device, DMA checked
//! through the model's caches, faults drained and classified.

use sluice_hal::PhysAddr;
use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_iommu::pagetable::MapPerms;
use sluice_iommu::vtd::model::VtdModel;
use sluice_iommu::vtd::walker::{DmaRequest, TranslationFault};
use sluice_iommu::vtd::{
    CapBuilder, DomainConfig, FaultClass, ModeRequest, VtdConfig, VtdError, VtdUnit,
};
use sluice_pci::Bdf;

const EDU: Bdf = Bdf::new(0, 4, 0);

#[test]
fn guest_buffer_dma_translates_and_stray_dma_faults() {
    let mem = ModelMemory::new();
    let model = VtdModel::new(&mem, CapBuilder::qemu_default(), 39);
    let clock = ModelClock::new(1_000);
    let config = VtdConfig {
        mode: ModeRequest::PreferScalable,
        timeout_ns: 1_000_000,
        ..VtdConfig::new(0, 0xfed9_0000, 39)
    };
    let mut unit = VtdUnit::init(&model, &mem, &clock, config).expect("init");
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    // The guest's 8 KiB DMA buffer at guest-physical 0x10_0000 lives at
    // host 0x2_3450_0000.
    unit.map(
        dom,
        0x10_0000,
        PhysAddr::new(0x2_3450_0000),
        0x2000,
        MapPerms::READ_WRITE,
    )
    .expect("map");
    unit.attach_device(EDU, dom).expect("attach");

    let sid = EDU.requester_id();
    let ok = model
        .dma(DmaRequest::write(sid, 0x10_1800))
        .expect("translated");
    assert_eq!(ok.phys, PhysAddr::new(0x2_3450_1800));
    // Nothing mapped there: no second-level permission, so legacy mode
    // reports a read-permission fault.
    assert!(matches!(
        model.dma(DmaRequest::read(sid, 0x40_0000)),
        Err(TranslationFault::NotPresent { level: 1 })
    ));

    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 1);
    let fault = drain.faults[0];
    assert_eq!(fault.domain, Some(dom));
    assert_eq!(fault.record.source, EDU);
    assert_eq!(fault.record.address, 0x40_0000);
    assert_eq!(fault.record.reason.class(), FaultClass::Permission);

    // Teardown in the order the object model uses.
    unit.detach_device(EDU).expect("detach");
    assert!(model.dma(DmaRequest::write(sid, 0x10_1800)).is_err());
    assert_eq!(unit.unmap(dom, 0x10_0000, 0x2000), Ok(0x2000));
    assert_eq!(unit.free_domain(dom), Ok(()));
    assert_eq!(unit.free_domain(dom), Err(VtdError::NoSuchDomain(dom.0)));
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}
