//! Map/unmap invalidation: exactly what the engine's result requires.

use alloc::vec::Vec;

use sluice_hal::PAGE_SIZE;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::MapPerms;
use crate::vtd::VtdError;
use crate::vtd::caps::CapBuilder;
use crate::vtd::descriptors::Descriptor;
use crate::vtd::model::{Inv, ModelEvent, Stuck, Via, VtdModel};
use crate::vtd::unit::{AtsConfig, DomainConfig, DomainId};
use crate::vtd::walker::TranslationFault;

/// A legacy unit with one domain holding DEV_A.
fn legacy_rig<'a>(
    model: &'a VtdModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a sluice_hal::model::ModelClock,
) -> (VtdUnit<'a>, DomainId) {
    let mut unit = init(model, mem, clock, ModeRequest::Legacy);
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    unit.attach_device(DEV_A, dom).expect("attach");
    model.clear_events();
    (unit, dom)
}

fn iotlb_pages(model: &VtdModel<'_>) -> Vec<(u64, u8, bool)> {
    model
        .invalidations()
        .into_iter()
        .filter_map(|i| match i {
            Inv::IotlbPage { addr, am, ih, .. } => Some((addr, am, ih)),
            _ => None,
        })
        .collect()
}

#[test]
fn unmap_invalidates_the_naturally_aligned_block_covering_the_range() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    unit.map(
        dom,
        0x40_0000,
        phys(0x100_0000),
        16 * PAGE_SIZE,
        MapPerms::READ_WRITE,
    )
    .expect("map");
    assert!(
        model.invalidations().is_empty(),
        "not-present → present needs nothing"
    );

    // Four aligned pages: AM 2 at their base; the table stays: IH = 1.
    assert_eq!(unit.unmap(dom, 0x40_4000, 4 * PAGE_SIZE), Ok(4 * PAGE_SIZE));
    assert_eq!(
        model.invalidations(),
        [Inv::IotlbPage {
            did: dom.0,
            addr: 0x40_4000,
            am: 2,
            ih: true
        }]
    );
    // Three pages 1..=3: the smallest aligned block holding them is 0..=3.
    model.clear_events();
    unit.unmap(dom, 0x40_1000, 3 * PAGE_SIZE).expect("unmap");
    assert_eq!(iotlb_pages(&model), [(0x40_0000, 2, true)]);
    // A single page: AM 0.
    model.clear_events();
    unit.unmap(dom, 0x40_9000, PAGE_SIZE).expect("unmap");
    assert_eq!(iotlb_pages(&model), [(0x40_9000, 0, true)]);
    // Unmapping nothing invalidates nothing.
    model.clear_events();
    assert_eq!(unit.unmap(dom, 0x40_9000, PAGE_SIZE), Ok(0));
    assert!(model.invalidations().is_empty());
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn domain_selective_invalidation_when_the_mask_or_psi_does_not_allow_it() {
    let mem = ModelMemory::new();
    let clock = clock();
    // MAMV 2: at most 4 pages per page-selective invalidation.
    let small_mask = model(
        &mem,
        CapBuilder {
            mamv: 2,
            ..CapBuilder::qemu_default()
        },
    );
    let (mut unit, dom) = legacy_rig(&small_mask, &mem, &clock);
    unit.map(dom, 0, phys(0x100_0000), 64 * PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.unmap(dom, 0, 4 * PAGE_SIZE).expect("unmap 4");
    assert_eq!(iotlb_pages(&small_mask), [(0, 2, true)]);
    small_mask.clear_events();
    unit.unmap(dom, 4 * PAGE_SIZE, 8 * PAGE_SIZE)
        .expect("unmap 8");
    assert_eq!(
        small_mask.invalidations(),
        [Inv::IotlbDomain { did: dom.0 }]
    );

    let no_psi = model(
        &mem,
        CapBuilder {
            psi: false,
            ..CapBuilder::qemu_default()
        },
    );
    let (mut unit, dom) = legacy_rig(&no_psi, &mem, &clock);
    unit.map(dom, 0, phys(0x100_0000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.unmap(dom, 0, PAGE_SIZE).expect("unmap");
    assert_eq!(no_psi.invalidations(), [Inv::IotlbDomain { did: dom.0 }]);
}

#[test]
fn invalidation_hint_is_set_only_when_no_table_was_freed_or_split() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    // Two pages in one last-level table: unmapping one keeps the table.
    unit.map(
        dom,
        0x60_0000,
        phys(0x100_0000),
        2 * PAGE_SIZE,
        MapPerms::READ,
    )
    .expect("map");
    unit.unmap(dom, 0x60_0000, PAGE_SIZE).expect("unmap");
    assert_eq!(iotlb_pages(&model), [(0x60_0000, 0, true)]);
    // The last page goes: the table is freed, paging-structure caches too.
    model.clear_events();
    unit.unmap(dom, 0x60_1000, PAGE_SIZE).expect("unmap");
    assert_eq!(iotlb_pages(&model), [(0x60_1000, 0, false)]);
    // Unmapping part of a 2 MiB page splits it: IH = 0 as well.
    unit.map(dom, 0x80_0000, phys(0x200_0000), 0x20_0000, MapPerms::READ)
        .expect("2M");
    model.clear_events();
    unit.unmap(dom, 0x80_0000, PAGE_SIZE).expect("split");
    assert_eq!(iotlb_pages(&model), [(0x80_0000, 0, false)]);
    assert_eq!(
        model.dma(read(DEV_A, 0x80_1000)).map(|o| o.phys),
        Ok(phys(0x200_1000))
    );
}

#[test]
fn stale_iotlb_entries_disappear_exactly_when_the_driver_invalidates() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    unit.map(dom, 0x1000, phys(0x5000), PAGE_SIZE, MapPerms::READ_WRITE)
        .expect("map");
    let first = model.dma(read(DEV_A, 0x1000)).expect("walk");
    assert!(!first.cached);
    assert!(model.dma(read(DEV_A, 0x1000)).expect("hit").cached);
    // Remap the IOVA elsewhere: a cached old translation would be a hole.
    unit.unmap(dom, 0x1000, PAGE_SIZE).expect("unmap");
    // (The last-level table was freed with the page: not present at the
    // level above.)
    assert!(matches!(
        model.dma(read(DEV_A, 0x1000)),
        Err(TranslationFault::NotPresent { .. })
    ));
    unit.map(dom, 0x1000, phys(0x7000), PAGE_SIZE, MapPerms::READ)
        .expect("remap");
    assert_eq!(
        model.dma(read(DEV_A, 0x1000)).map(|o| o.phys),
        Ok(phys(0x7000))
    );
    assert_eq!(
        model.dma(write(DEV_A, 0x1000)),
        Err(TranslationFault::WriteDenied)
    );
}

#[test]
fn freed_tables_leave_the_paging_structure_cache_before_they_are_reused() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    // A 4 KiB page: the model caches its last-level table.
    unit.map(dom, 0x20_3000, phys(0x900_3000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    assert!(model.dma(read(DEV_A, 0x20_3000)).is_ok());
    // Unmapping frees that table (IH = 0 drops the cached pointer) ...
    unit.unmap(dom, 0x20_3000, PAGE_SIZE).expect("unmap");
    // ... so the 2 MiB page now mapped over it is found by a fresh walk.
    unit.map(dom, 0x20_0000, phys(0x4000_0000), 0x20_0000, MapPerms::READ)
        .expect("2M");
    assert_eq!(
        model.dma(read(DEV_A, 0x20_3000)).map(|o| o.phys),
        Ok(phys(0x4000_3000))
    );
}

#[test]
fn caching_mode_invalidates_newly_present_mappings() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        caching_mode: true,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    assert_eq!(dom, DomainId(1), "DID 0 is reserved in caching mode");
    // A fault is cached as a not-present translation ...
    assert!(model.dma(read(DEV_A, 0x3000)).is_err());
    unit.map(dom, 0x3000, phys(0xa000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    // ... so the map invalidates the new page (IH = 0: tables were
    // installed), and the device sees the mapping.
    assert_eq!(iotlb_pages(&model), [(0x3000, 0, false)]);
    assert_eq!(
        model.dma(read(DEV_A, 0x3000)).map(|o| o.phys),
        Ok(phys(0xa000))
    );
    // A second page in the same table: only a leaf changed, IH = 1.
    model.clear_events();
    unit.map(dom, 0x4000, phys(0xb000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    assert_eq!(iotlb_pages(&model), [(0x4000, 0, true)]);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn caching_mode_attach_invalidates_the_cached_not_present_context() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        caching_mode: true,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    unit.map(dom, 0x3000, phys(0xa000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    assert!(
        model.dma(read(DEV_A, 0x3000)).is_err(),
        "blocked, and cached as such"
    );
    model.clear_events();
    unit.attach_device(DEV_A, dom).expect("attach");
    assert_eq!(
        model.invalidations(),
        [
            Inv::ContextDevice {
                did: 0,
                sid: DEV_A.requester_id(),
                fm: 0
            },
            Inv::IotlbDomain { did: dom.0 }
        ]
    );
    assert_eq!(
        model.dma(read(DEV_A, 0x3000)).map(|o| o.phys),
        Ok(phys(0xa000))
    );
}

#[test]
fn rwbf_units_get_a_write_buffer_flush_instead_of_an_invalidation_on_map() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        rwbf: true,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    unit.map(dom, 0x1000, phys(0x2000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    assert_eq!(
        model.events(),
        [
            ModelEvent::Gcmd(0x0400_0000 | 0x0800_0000 | 0x8000_0000),
            ModelEvent::WriteBufferFlush
        ]
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn freed_tables_are_released_only_after_their_invalidation_completed() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    let before = mem.live_pages();
    // 1 GiB-aligned page: a new level-1 and level-0 table.
    unit.map(dom, 0x4000_0000, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    assert_eq!(mem.live_pages(), before + 2);
    unit.unmap(dom, 0x4000_0000, PAGE_SIZE).expect("unmap");
    assert_eq!(mem.live_pages(), before, "freed after the invalidation");

    // Now the queue hangs: the unmap fails and the tables are kept.
    unit.map(dom, 0x4000_0000, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    model.set_stuck(Stuck {
        queue: true,
        ..Stuck::default()
    });
    assert!(matches!(
        unit.unmap(dom, 0x4000_0000, PAGE_SIZE),
        Err(VtdError::Timeout { .. })
    ));
    assert_eq!(
        mem.live_pages(),
        before + 2,
        "never freed without invalidation"
    );
    assert_eq!(unit.quarantined_pages(), 2);
    // Once the unit answers again, a global flush releases them.
    model.set_stuck(Stuck::default());
    unit.flush_all().expect("flush");
    assert_eq!(unit.quarantined_pages(), 0);
    assert_eq!(mem.live_pages(), before);
}

#[test]
fn non_coherent_units_see_every_structure_write_flushed() {
    for (caps, mode) in [
        (CapBuilder::qemu_default(), ModeRequest::Legacy),
        (
            CapBuilder {
                smpwc: false,
                ..CapBuilder::server()
            },
            ModeRequest::Scalable,
        ),
    ] {
        let mem = ModelMemory::new();
        mem.set_track_flushes(true);
        let model = model(&mem, caps);
        let clock = clock();
        let mut unit = init(&model, &mem, &clock, mode);
        let dom = unit
            .alloc_domain(DomainConfig::second_level())
            .expect("domain");
        unit.attach_device(DEV_A, dom).expect("attach");
        unit.attach_device(DEV_UPPER, dom).expect("attach");
        unit.map(
            dom,
            0x10_0000,
            phys(0x30_0000),
            0x40_0000,
            MapPerms::READ_WRITE,
        )
        .expect("map");
        unit.unmap(dom, 0x10_0000, 0x1000).expect("unmap");
        unit.detach_device(DEV_UPPER).expect("detach");
        // Everything the unit reads was flushed; only the status words the
        // unit itself wrote remain.
        let status = unit.invalidation_status_page().expect("queue");
        let unflushed: Vec<_> = mem
            .unflushed_words()
            .into_iter()
            .filter(|w| w.as_u64() & !0xfff != status.as_u64())
            .collect();
        assert_eq!(unflushed, [], "{mode:?}");
        assert!(!mem.flushes().is_empty());
    }
    // A coherent unit gets no flushes at all.
    let mem = ModelMemory::new();
    mem.set_track_flushes(true);
    let model = model(
        &mem,
        CapBuilder {
            coherent: true,
            ..CapBuilder::qemu_default()
        },
    );
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    unit.map(dom, 0, phys(0x30_0000), 0x1000, MapPerms::READ)
        .expect("map");
    assert_eq!(mem.flushes(), []);
}

#[test]
fn register_based_invalidation_carries_the_same_page_selective_requests() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        qi: false,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    unit.map(dom, 0x8000, phys(0x2_0000), 2 * PAGE_SIZE, MapPerms::READ)
        .expect("map");
    assert!(model.dma(read(DEV_A, 0x8000)).is_ok());
    unit.unmap(dom, 0x8000, 2 * PAGE_SIZE).expect("unmap");
    assert_eq!(
        model.events(),
        [ModelEvent::Invalidation {
            via: Via::Register,
            inv: Inv::IotlbPage {
                did: dom.0,
                addr: 0x8000,
                am: 1,
                ih: false
            }
        }]
    );
    assert!(model.dma(read(DEV_A, 0x8000)).is_err());
    unit.detach_device(DEV_A).expect("detach");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn a_rejected_descriptor_is_reported_skipped_and_the_queue_keeps_working() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    let bad = Descriptor::from_words([0xf, 0]);
    let result = unit.submit_descriptors(&[
        Descriptor::iotlb_domain(dom.0, true),
        bad,
        Descriptor::context_global(),
    ]);
    match result {
        Err(VtdError::InvalidationQueueError {
            descriptor, info, ..
        }) => {
            assert_eq!(descriptor, [0xf, 0]);
            assert_eq!(info, 3, "IQEI: invalid descriptor type");
        }
        other => panic!("expected a queue error, got {other:?}"),
    }
    // The descriptors around the bad one ran; IQE is clear again.
    assert_eq!(
        model.invalidations(),
        [Inv::IotlbDomain { did: dom.0 }, Inv::ContextGlobal]
    );
    assert_eq!(model.fault_status() & crate::vtd::regs::fsts::IQE, 0);
    // Reserved bits set in an otherwise valid descriptor: IQEI 4.
    let reserved = Descriptor::from_words([0x2 | (0b10 << 4) | (1 << 40), 0]);
    assert!(matches!(
        unit.submit_descriptors(&[reserved]),
        Err(VtdError::InvalidationQueueError { info: 4, .. })
    ));
    // Later work goes through normally.
    unit.map(dom, 0, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.unmap(dom, 0, PAGE_SIZE).expect("unmap after recovery");
    assert!(model.dma(read(DEV_A, 0)).is_err());
}

#[test]
fn the_queue_wraps_around_and_splits_long_lists() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    // Each unmap uses two slots (invalidation + wait): 200 of them go round
    // the 256-entry queue more than once.
    for i in 0..200u64 {
        let iova = i * PAGE_SIZE;
        unit.map(dom, iova, phys(0x10_0000 + iova), PAGE_SIZE, MapPerms::READ)
            .expect("map");
        assert!(model.dma(read(DEV_A, iova)).is_ok());
        unit.unmap(dom, iova, PAGE_SIZE).expect("unmap");
        assert!(model.dma(read(DEV_A, iova)).is_err(), "iteration {i}");
    }
    // One list longer than the queue goes in batches.
    model.clear_events();
    let many: Vec<Descriptor> = (0..600u64)
        .map(|i| Descriptor::iotlb_page(dom.0, i << 12, 0, true, true))
        .collect();
    unit.submit_descriptors(&many).expect("long list");
    assert_eq!(model.invalidations().len(), 600);
    let waits = model
        .events()
        .iter()
        .filter(|e| matches!(e, ModelEvent::Wait { status_write: true }))
        .count();
    assert_eq!(waits, 3, "600 descriptors in batches of 254");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn ats_devices_get_device_tlb_invalidations_and_timeouts_are_reported() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    let ats = AtsConfig {
        pfsid: DEV_A,
        queue_depth: 0,
    };
    unit.enable_device_tlb(DEV_A, ats).expect("ats");
    unit.attach_device(DEV_A, dom).expect("attach");
    assert_eq!(
        unit.enable_device_tlb(DEV_A, ats),
        Err(VtdError::DeviceBusy)
    );
    unit.map(
        dom,
        0x20_0000,
        phys(0x40_0000),
        8 * PAGE_SIZE,
        MapPerms::READ,
    )
    .expect("map");
    model.clear_events();
    unit.unmap(dom, 0x20_0000, 8 * PAGE_SIZE).expect("unmap");
    assert_eq!(
        model.invalidations(),
        [
            Inv::IotlbPage {
                did: dom.0,
                addr: 0x20_0000,
                am: 3,
                ih: false
            },
            Inv::DeviceTlb {
                sid: DEV_A.requester_id(),
                addr: 0x20_0000,
                order: 3
            }
        ]
    );
    // The device stops answering: ITE, reported by SID; the queue recovers.
    unit.map(dom, 0, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    model.set_device_unresponsive(DEV_A.requester_id(), true);
    assert_eq!(
        unit.unmap(dom, 0, PAGE_SIZE),
        Err(VtdError::DeviceTlbTimeout {
            sid: DEV_A.requester_id()
        })
    );
    model.set_device_unresponsive(DEV_A.requester_id(), false);
    unit.map(dom, 0, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.unmap(dom, 0, PAGE_SIZE).expect("queue works again");
    // A wrong completion (ICE) does not stop the queue, but is reported.
    unit.map(dom, 0, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    model.set_device_misbehaving(DEV_A.requester_id(), true);
    assert_eq!(
        unit.unmap(dom, 0, PAGE_SIZE),
        Err(VtdError::InvalidationCompletionError {
            sid: DEV_A.requester_id()
        })
    );
    assert_eq!(
        model.fault_status() & crate::vtd::regs::fsts::ICE,
        0,
        "cleared"
    );
    model.set_device_misbehaving(DEV_A.requester_id(), false);
    unit.map(dom, 0, phys(0x1000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.unmap(dom, 0, PAGE_SIZE).expect("and works again");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn first_level_domains_invalidate_per_pasid() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Scalable);
    let dom = unit.alloc_domain(DomainConfig::first_level()).expect("fl");
    unit.attach_pasid(DEV_A, 5, dom).expect("attach");
    unit.map(dom, 0x1000, phys(0x8000), PAGE_SIZE, MapPerms::READ_WRITE)
        .expect("map");
    let req = write(DEV_A, 0x1000).with_pasid(5);
    assert_eq!(model.dma(req).map(|o| o.phys), Ok(phys(0x8000)));
    model.clear_events();
    unit.unmap(dom, 0x1000, PAGE_SIZE).expect("unmap");
    assert_eq!(
        model.invalidations(),
        [Inv::PasidIotlb {
            granularity: 0b11,
            did: dom.0,
            pasid: 5,
            addr: 0x1000,
            am: 0,
            ih: false
        }]
    );
    assert!(
        model.dma(req).is_err(),
        "the cached first-level translation is gone"
    );
}

#[test]
fn scalable_ats_devices_get_pasid_device_tlb_invalidations() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Scalable);
    let ats = AtsConfig {
        pfsid: DEV_A,
        queue_depth: 0,
    };
    unit.enable_device_tlb(DEV_A, ats).expect("ats");
    let fl = unit.alloc_domain(DomainConfig::first_level()).expect("fl");
    let sl = unit.alloc_domain(DomainConfig::second_level()).expect("sl");
    unit.attach_pasid(DEV_A, 4, fl).expect("pasid");
    unit.attach_device(DEV_A, sl).expect("rid");
    unit.map(fl, 0x4000, phys(0x8000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.map(sl, 0x4000, phys(0x9000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    model.clear_events();
    unit.unmap(fl, 0x4000, PAGE_SIZE).expect("unmap fl");
    assert_eq!(
        model.invalidations()[1],
        Inv::PasidDeviceTlb {
            sid: DEV_A.requester_id(),
            pasid: 4,
            global: false,
            addr: 0x4000,
            order: 0
        }
    );
    model.clear_events();
    unit.unmap(sl, 0x4000, PAGE_SIZE).expect("unmap sl");
    assert_eq!(
        model.invalidations()[1],
        Inv::DeviceTlb {
            sid: DEV_A.requester_id(),
            addr: 0x4000,
            order: 0
        }
    );
    // A device detached in scalable mode keeps its context entry: enabling
    // ATS later sets DTE there and invalidates the cached copy.
    unit.attach_device(DEV_B, sl).expect("attach");
    unit.detach_device(DEV_B).expect("detach");
    model.clear_events();
    unit.enable_device_tlb(
        DEV_B,
        AtsConfig {
            pfsid: DEV_B,
            queue_depth: 0,
        },
    )
    .expect("ats after detach");
    assert_eq!(
        model.invalidations(),
        [Inv::ContextDevice {
            did: 0,
            sid: DEV_B.requester_id(),
            fm: 0
        }]
    );
    unit.attach_device(DEV_B, sl).expect("attach");
    model.clear_events();
    unit.unmap(sl, 0x4000, PAGE_SIZE).expect("unmap");
    unit.map(sl, 0x4000, phys(0x9000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.unmap(sl, 0x4000, PAGE_SIZE).expect("unmap");
    assert!(model.invalidations().contains(&Inv::DeviceTlb {
        sid: DEV_B.requester_id(),
        addr: 0x4000,
        order: 0
    }));
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn a_stalled_queue_is_never_overwritten() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let (mut unit, dom) = legacy_rig(&model, &mem, &clock);
    unit.map(dom, 0, phys(0x10_0000), 256 * PAGE_SIZE, MapPerms::READ)
        .expect("map");
    model.set_stuck(Stuck {
        queue: true,
        ..Stuck::default()
    });
    let mut queued = 0;
    let mut refused = 0;
    for i in 0..200u64 {
        match unit.unmap(dom, i * PAGE_SIZE, PAGE_SIZE) {
            Err(VtdError::Timeout {
                what: "an invalidation wait descriptor",
                ..
            }) => queued += 1,
            Err(VtdError::Timeout {
                what: "free space in the invalidation queue",
                ..
            }) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Two slots per unmap, one always empty: 127 fit in 256 entries.
    assert_eq!((queued, refused), (127, 73));
    model.set_stuck(Stuck::default());
    unit.flush_all().expect("the unit answers again");
    let performed = model
        .invalidations()
        .iter()
        .filter(|i| matches!(i, Inv::IotlbPage { .. }))
        .count();
    assert_eq!(
        performed, queued,
        "every queued descriptor ran, none was overwritten"
    );
    assert_eq!(unit.quarantined_pages(), 0);
}
