//! Domains, attach/detach, aliases, PASIDs, snoop control and RMRR.

use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::{MapPerms, PageTableError};
use crate::vtd::VtdError;
use crate::vtd::caps::CapBuilder;
use crate::vtd::model::Inv;
use crate::vtd::unit::{DomainConfig, DomainId};
use crate::vtd::walker::{self, TranslationFault};

#[test]
fn attach_translates_detach_blocks_again_legacy() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    unit.map(
        dom,
        0x1000_0000,
        phys(0x8000_0000),
        0x2000,
        MapPerms::READ_WRITE,
    )
    .expect("map");
    unit.attach_device(DEV_A, dom).expect("attach");
    assert_eq!(unit.device_domain(DEV_A), Some(dom));

    let out = model.dma(read(DEV_A, 0x1000_1234)).expect("translated");
    assert_eq!(out.phys, phys(0x8000_1234));
    assert_eq!(
        model.dma(write(DEV_A, 0x1000_0008)).map(|o| o.phys),
        Ok(phys(0x8000_0008))
    );
    // Unmapped IOVA and other devices still fault.
    assert!(model.dma(read(DEV_A, 0x1000_2000)).is_err());
    assert_eq!(
        model.dma(read(DEV_B, 0x1000_0000)),
        Err(TranslationFault::ContextNotPresent)
    );
    // The tables agree with the independent walker reading memory directly.
    let root = model.active_root().expect("root");
    let t = walker::translate(
        &mem,
        root,
        &read(DEV_A, 0x1000_1234),
        &model.walker_config(),
    )
    .expect("walker translates");
    assert_eq!(t.walk.phys, phys(0x8000_1234));
    assert_eq!(t.context.did, dom.0);

    model.clear_events();
    unit.detach_device(DEV_A).expect("detach");
    assert_eq!(
        model.invalidations(),
        [
            Inv::ContextDevice {
                did: dom.0,
                sid: DEV_A.requester_id(),
                fm: 0
            },
            Inv::IotlbDomain { did: dom.0 }
        ]
    );
    // The model's context cache and IOTLB held the translation: only the
    // invalidation makes the device fault again.
    assert_eq!(
        model.dma(read(DEV_A, 0x1000_1234)),
        Err(TranslationFault::ContextNotPresent)
    );
    assert_eq!(unit.detach_device(DEV_A), Err(VtdError::NotAttached));
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn moving_a_device_between_domains_never_mixes_their_translations() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    let a = unit.alloc_domain(DomainConfig::second_level()).expect("a");
    let b = unit.alloc_domain(DomainConfig::second_level()).expect("b");
    unit.map(a, 0x4000, phys(0x10_0000), 0x1000, MapPerms::READ)
        .expect("map a");
    unit.map(b, 0x4000, phys(0x20_0000), 0x1000, MapPerms::READ)
        .expect("map b");
    unit.attach_device(DEV_A, a).expect("attach a");
    assert_eq!(
        model.dma(read(DEV_A, 0x4000)).map(|o| o.phys),
        Ok(phys(0x10_0000))
    );
    unit.attach_device(DEV_A, b).expect("move to b");
    assert_eq!(
        model.dma(read(DEV_A, 0x4000)).map(|o| o.phys),
        Ok(phys(0x20_0000))
    );
    assert_eq!(unit.free_domain(b), Err(VtdError::DomainInUse(b.0)));
    assert_eq!(unit.free_domain(a), Ok(()));
    assert!(model.violations().is_empty());
}

#[test]
fn dma_aliases_and_upper_devfns_attach_too() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    for mode in [ModeRequest::Legacy, ModeRequest::Scalable] {
        let mut unit = init(&model, &mem, &clock, mode);
        let dom = unit
            .alloc_domain(DomainConfig::second_level())
            .expect("domain");
        unit.map(
            dom,
            0x20_0000,
            phys(0x40_0000),
            0x1000,
            MapPerms::READ_WRITE,
        )
        .expect("map");
        unit.attach_device_with_aliases(DEV_BEHIND_BRIDGE, &[BRIDGE_ALIAS], dom)
            .expect("attach with alias");
        unit.attach_device(DEV_UPPER, dom).expect("upper devfn");
        for dev in [DEV_BEHIND_BRIDGE, BRIDGE_ALIAS, DEV_UPPER] {
            assert_eq!(
                model.dma(write(dev, 0x20_0010)).map(|o| o.phys),
                Ok(phys(0x40_0010)),
                "{dev} in {mode:?}"
            );
        }
        assert!(model.dma(read(DEV_A, 0x20_0000)).is_err());
        unit.detach_device(BRIDGE_ALIAS).expect("detach alias");
        assert!(model.dma(read(BRIDGE_ALIAS, 0x20_0000)).is_err());
        assert!(model.dma(read(DEV_BEHIND_BRIDGE, 0x20_0000)).is_ok());
    }
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn scalable_mode_blocks_with_an_empty_pasid_entry_and_attaches_pasids() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Scalable);
    let rid_dom = unit.alloc_domain(DomainConfig::second_level()).expect("sl");
    let pasid_dom = unit.alloc_domain(DomainConfig::first_level()).expect("fl");
    unit.map(
        rid_dom,
        0x1000,
        phys(0x11_0000),
        0x1000,
        MapPerms::READ_WRITE,
    )
    .expect("map");
    unit.map(
        pasid_dom,
        0x1000,
        phys(0x22_0000),
        0x1000,
        MapPerms::READ_WRITE,
    )
    .expect("map fl");
    unit.attach_pasid(DEV_A, 7, pasid_dom)
        .expect("pasid attach");
    // The context entry is present now, RID_PASID's entry is not: blocked.
    assert_eq!(
        model.dma(read(DEV_A, 0x1000)),
        Err(TranslationFault::PasidEntryNotPresent)
    );
    assert_eq!(
        model.dma(read(DEV_A, 0x1000).with_pasid(7)).map(|o| o.phys),
        Ok(phys(0x22_0000))
    );
    // Other PASIDs of the device stay blocked.
    assert!(model.dma(read(DEV_A, 0x1000).with_pasid(8)).is_err());

    unit.attach_device(DEV_A, rid_dom).expect("rid attach");
    assert_eq!(
        model.dma(read(DEV_A, 0x1000)).map(|o| o.phys),
        Ok(phys(0x11_0000))
    );
    assert_eq!(unit.pasid_domain(DEV_A, 7), Some(pasid_dom));

    model.clear_events();
    unit.detach_pasid(DEV_A, 7).expect("pasid detach");
    assert_eq!(
        model.invalidations(),
        [
            Inv::PasidCache {
                granularity: 0b01,
                did: pasid_dom.0,
                pasid: 7
            },
            Inv::PasidIotlb {
                granularity: 0b10,
                did: pasid_dom.0,
                pasid: 7,
                addr: 0,
                am: 0,
                ih: false
            }
        ]
    );
    assert_eq!(
        model.dma(read(DEV_A, 0x1000).with_pasid(7)),
        Err(TranslationFault::PasidEntryNotPresent)
    );
    assert_eq!(
        model.dma(read(DEV_A, 0x1000)).map(|o| o.phys),
        Ok(phys(0x11_0000))
    );
    unit.detach_device(DEV_A).expect("rid detach");
    assert_eq!(
        model.dma(read(DEV_A, 0x1000)),
        Err(TranslationFault::PasidEntryNotPresent)
    );

    // PASID 0 carries requests without PASID; the one-page directory ends
    // at 2^15; legacy units have no PASIDs.
    let limit = unit.pasid_limit();
    assert_eq!(
        unit.attach_pasid(DEV_A, 0, pasid_dom),
        Err(VtdError::PasidOutOfRange { pasid: 0, limit })
    );
    assert_eq!(
        unit.attach_pasid(DEV_A, limit, pasid_dom),
        Err(VtdError::PasidOutOfRange {
            pasid: limit,
            limit
        })
    );
    unit.attach_pasid(DEV_A, limit - 1, rid_dom)
        .expect("second-level domain on a PASID");
    assert_eq!(
        model
            .dma(write(DEV_A, 0x1000).with_pasid(limit - 1))
            .map(|o| o.phys),
        Ok(phys(0x11_0000))
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());

    let legacy_model = super::model(&mem, CapBuilder::server());
    let mut legacy = init(&legacy_model, &mem, &clock, ModeRequest::Legacy);
    let d = legacy
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    assert_eq!(
        legacy.attach_pasid(DEV_A, 3, d),
        Err(VtdError::NotScalableMode)
    );
    assert!(matches!(
        legacy.alloc_domain(DomainConfig::first_level()),
        Err(VtdError::Unsupported(_))
    ));
}

#[test]
fn snoop_control_sets_snp_in_legacy_pgsnp_in_scalable_and_is_refused_without_sc() {
    let mem = ModelMemory::new();
    let clock = clock();
    for (mode, leaf_snp) in [(ModeRequest::Legacy, true), (ModeRequest::Scalable, false)] {
        let model = model(&mem, CapBuilder::server());
        let mut unit = init(&model, &mem, &clock, mode);
        let snooped = unit
            .alloc_domain(DomainConfig::second_level().snooped())
            .expect("snooped");
        let plain = unit
            .alloc_domain(DomainConfig::second_level())
            .expect("plain");
        for d in [snooped, plain] {
            unit.map(d, 0x3000, phys(0x9000), 0x1000, MapPerms::READ_WRITE)
                .expect("map");
        }
        unit.attach_device(DEV_A, snooped).expect("attach");
        unit.attach_device(DEV_B, plain).expect("attach");
        assert_eq!(
            model.dma(read(DEV_A, 0x3000)).map(|o| o.snooped),
            Ok(true),
            "{mode:?}"
        );
        assert_eq!(
            model.dma(read(DEV_B, 0x3000)).map(|o| o.snooped),
            Ok(false),
            "{mode:?}"
        );
        let root = model.active_root().expect("root");
        let t = walker::translate(&mem, root, &read(DEV_A, 0x3000), &model.walker_config())
            .expect("walk");
        assert_eq!(t.walk.snoop, leaf_snp, "SNP leaf bit only in legacy mode");
        assert_eq!(
            t.context.page_snoop, !leaf_snp,
            "PGSNP only in scalable mode"
        );
        assert!(unit.domain_info(snooped).expect("info").snoop);
    }
    let model = model(&mem, CapBuilder::qemu_default());
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    assert_eq!(
        unit.alloc_domain(DomainConfig::second_level().snooped()),
        Err(VtdError::SnoopControlUnsupported)
    );
}

#[test]
fn domains_get_the_units_levels_and_page_sizes_and_ids_within_nd() {
    let mem = ModelMemory::new();
    let clock = clock();
    let qemu = model(&mem, CapBuilder::qemu_default());
    let mut unit = init(&qemu, &mem, &clock, ModeRequest::Legacy);
    let d = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    let info = unit.domain_info(d).expect("info");
    assert_eq!(
        (info.levels, info.iova_limit),
        (3, 1 << 39),
        "39-bit unit: 3 levels"
    );
    assert_eq!(info.page_sizes, (1 << 12) | (1 << 21) | (1 << 30));
    assert_eq!(d, DomainId(0), "DID 0 is usable without caching mode");
    assert!(matches!(
        unit.map(d, (1 << 39) - 0x1000, phys(0), 0x2000, MapPerms::READ),
        Err(VtdError::PageTable(PageTableError::IovaOutOfRange { .. }))
    ));

    let server = model(&mem, CapBuilder::server());
    let mut unit = init(&server, &mem, &clock, ModeRequest::Scalable);
    let d = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    assert_eq!(unit.domain_info(d).expect("info").levels, 4);
    let wide = DomainConfig {
        address_width: Some(57),
        ..DomainConfig::second_level()
    };
    // MGAW is 48 on this unit: 57 bits are capped to 48.
    let wide = unit.alloc_domain(wide).expect("wide");
    assert_eq!(unit.domain_info(wide).expect("info").levels, 4);
    let fl = unit.alloc_domain(DomainConfig::first_level()).expect("fl");
    assert_eq!(
        unit.domain_info(fl).expect("info").iova_limit,
        1 << 47,
        "canonical lower half"
    );

    // ND = 0: 16 domain IDs; caching mode reserves DID 0.
    let small = CapBuilder {
        nd: 0,
        caching_mode: true,
        ..CapBuilder::qemu_default()
    };
    let m = model(&mem, small);
    let mut unit = init(&m, &mem, &clock, ModeRequest::Legacy);
    let ids: alloc::vec::Vec<DomainId> = (0..15)
        .map(|_| unit.alloc_domain(DomainConfig::second_level()).expect("id"))
        .collect();
    assert_eq!(ids.first(), Some(&DomainId(1)));
    assert_eq!(ids.last(), Some(&DomainId(15)));
    assert_eq!(
        unit.alloc_domain(DomainConfig::second_level()),
        Err(VtdError::DomainIdsExhausted)
    );
    unit.free_domain(DomainId(4)).expect("free");
    assert_eq!(
        unit.alloc_domain(DomainConfig::second_level()),
        Ok(DomainId(4))
    );
}

#[test]
fn rmrr_regions_are_identity_mapped_for_their_devices() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    unit.map_rmrr(0x7d00_0000, 0x7d0f_ffff, &[DEV_A, DEV_B])
        .expect("rmrr");
    let shared = unit.device_domain(DEV_A).expect("attached");
    assert_eq!(unit.device_domain(DEV_B), Some(shared));
    // A second region, overlapping the first, for DEV_A only: DEV_A moves
    // to a domain with both regions, DEV_B keeps only the first.
    unit.map_rmrr(0x7d0f_0000, 0x7d1f_ffff, &[DEV_A])
        .expect("overlap");
    let own = unit.device_domain(DEV_A).expect("attached");
    assert_ne!(own, shared);
    assert_eq!(unit.device_domain(DEV_B), Some(shared));
    for dev in [DEV_A, DEV_B] {
        assert!(unit.is_rmrr_device(dev));
        assert_eq!(
            model.dma(write(dev, 0x7d00_4008)).map(|o| o.phys),
            Ok(phys(0x7d00_4008))
        );
    }
    assert_eq!(
        model.dma(read(DEV_A, 0x7d1f_f000)).map(|o| o.phys),
        Ok(phys(0x7d1f_f000))
    );
    assert!(model.dma(read(DEV_B, 0x7d1f_f000)).is_err());
    assert!(model.dma(read(DEV_B, 0x7d20_0000)).is_err());
    assert!(model.dma(read(DEV_A, 0x7d20_0000)).is_err());
    // A third region naming exactly the users of DEV_A's domain joins it.
    unit.map_rmrr(0x7e00_0000, 0x7e00_0fff, &[DEV_A])
        .expect("third");
    assert_eq!(unit.device_domain(DEV_A), Some(own));
    assert_eq!(
        model.dma(read(DEV_A, 0x7e00_0000)).map(|o| o.phys),
        Ok(phys(0x7e00_0000))
    );
    assert!(model.dma(read(DEV_B, 0x7e00_0000)).is_err());
    assert!(!unit.is_rmrr_device(BRIDGE_ALIAS));
    assert_eq!(
        unit.map_rmrr(0x1000, 0x1fff - 1, &[DEV_A]),
        Err(VtdError::InvalidRange)
    );
    assert_eq!(
        unit.map_rmrr(0x2000, 0xfff, &[DEV_A]),
        Err(VtdError::InvalidRange)
    );
    unit.detach_device(DEV_B).expect("detach");
    assert!(!unit.is_rmrr_device(DEV_B));
}

#[test]
fn five_level_tables_translate_high_iovas() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        mgaw: 57,
        ..CapBuilder::server()
    };
    let clock = clock();
    for mode in [ModeRequest::Legacy, ModeRequest::Scalable] {
        let model = model(&mem, caps);
        let mut unit = init(&model, &mem, &clock, mode);
        let wide = DomainConfig {
            address_width: Some(57),
            ..DomainConfig::second_level()
        };
        let dom = unit.alloc_domain(wide).expect("5-level domain");
        let info = unit.domain_info(dom).expect("info");
        assert_eq!((info.levels, info.iova_limit), (5, 1 << 57));
        let high = 0x0123_4567_8000_0000u64;
        unit.map(
            dom,
            high,
            phys(0x1_2340_0000),
            0x20_0000,
            MapPerms::READ_WRITE,
        )
        .expect("map high");
        unit.attach_device(DEV_A, dom).expect("attach");
        assert_eq!(
            model.dma(write(DEV_A, high + 0x1_2345)).map(|o| o.phys),
            Ok(phys(0x1_2341_2345)),
            "{mode:?}"
        );
        let root = model.active_root().expect("root");
        let t = walker::translate(&mem, root, &read(DEV_A, high), &model.walker_config())
            .expect("walk");
        assert_eq!(t.context.kind, walker::TableKind::SecondLevel { levels: 5 });
        assert_eq!(t.walk.page_size, 0x20_0000, "a 2 MiB leaf");
    }
    // First-level 5-level paging (CAP.FL5LP): the canonical lower half of
    // 57 bits.
    let model = model(&mem, caps);
    let mut unit = init(&model, &mem, &clock, ModeRequest::Scalable);
    let fl = DomainConfig {
        address_width: Some(57),
        ..DomainConfig::first_level()
    };
    let dom = unit.alloc_domain(fl).expect("fl5");
    let info = unit.domain_info(dom).expect("info");
    assert_eq!((info.levels, info.iova_limit), (5, 1 << 56));
    unit.map(dom, 1 << 55, phys(0x7000), PAGE, MapPerms::READ)
        .expect("map");
    unit.attach_pasid(DEV_A, 3, dom).expect("attach");
    assert_eq!(
        model
            .dma(read(DEV_A, 1 << 55).with_pasid(3))
            .map(|o| o.phys),
        Ok(phys(0x7000))
    );
}

const PAGE: u64 = 0x1000;

#[test]
fn a_second_init_takes_the_unit_over_from_running_firmware() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    // "Firmware": translation and queued invalidation on, a device mapped.
    let mut firmware = init(&model, &mem, &clock, ModeRequest::Legacy);
    let dom = firmware
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    firmware
        .map(dom, 0, phys(0x1000), PAGE, MapPerms::READ)
        .expect("map");
    firmware.attach_device(DEV_A, dom).expect("attach");
    assert!(model.dma(read(DEV_A, 0)).is_ok());
    model.clear_events();

    let unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    use crate::vtd::regs::global::{
        QUEUED_INVALIDATION as QIE, SET_ROOT_TABLE as SRTP, TRANSLATION_ENABLE as TE,
    };
    // QIE off (IQA may only change then), the new root with TE kept on,
    // QIE on again; TE is never switched off, so DMA is never untranslated.
    assert_eq!(model.gcmd_writes(), [TE, TE | SRTP, TE | QIE]);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    assert_eq!(model.active_root(), Some(unit.root_table().as_u64()));
    assert_eq!(
        model.dma(read(DEV_A, 0)),
        Err(TranslationFault::RootNotPresent)
    );
}
