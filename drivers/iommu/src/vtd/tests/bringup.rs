//! Bring-up: the init sequence, mode choice, capabilities and timeouts.

use alloc::vec::Vec;

use sluice_hal::model::ModelMemory;

use super::*;
use crate::vtd::VtdError;
use crate::vtd::caps::CapBuilder;
use crate::vtd::descriptors::Descriptor;
use crate::vtd::model::{Inv, ModelEvent, Stuck, Via};
use crate::vtd::regs::global;
use crate::vtd::unit::TranslationMode;
use crate::vtd::walker::{self, TranslationFault};

const SRTP: u32 = global::SET_ROOT_TABLE;
const WBF: u32 = global::WRITE_BUFFER_FLUSH;
const QIE: u32 = global::QUEUED_INVALIDATION;
const TE: u32 = global::TRANSLATION_ENABLE;

fn invalidations_with_via(model: &crate::vtd::model::VtdModel<'_>) -> Vec<(Via, Inv)> {
    model
        .events()
        .into_iter()
        .filter_map(|e| match e {
            ModelEvent::Invalidation { via, inv } => Some((via, inv)),
            _ => None,
        })
        .collect()
}

#[test]
fn legacy_init_sets_root_then_enables_queue_then_translation_one_bit_at_a_time() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let unit = init(&model, &mem, &clock, ModeRequest::Legacy);

    assert_eq!(unit.mode(), TranslationMode::Legacy);
    assert!(unit.uses_queued_invalidation());
    // Each write is the previous status (one-shot bits masked) plus one
    // command: SRTP alone, then QIE (RTPS is not written back), then TE with
    // QIE kept.
    assert_eq!(model.gcmd_writes(), [SRTP, QIE, QIE | TE]);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    assert!(model.translation_enabled());
    assert_eq!(
        model.active_root(),
        Some(unit.root_table().as_u64()),
        "TTM = legacy"
    );
    // Global invalidation through the queue came after QIE and before TE.
    let events = model.events();
    let qie = events
        .iter()
        .position(|e| *e == ModelEvent::Gcmd(QIE))
        .expect("QIE");
    let te = events
        .iter()
        .position(|e| *e == ModelEvent::Gcmd(QIE | TE))
        .expect("TE");
    let inv: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, ModelEvent::Invalidation { .. }))
        .map(|(i, _)| i)
        .collect();
    assert!(inv.iter().all(|&i| qie < i && i < te), "{events:?}");
    assert_eq!(
        invalidations_with_via(&model),
        [
            (Via::Queue, Inv::ContextGlobal),
            (Via::Queue, Inv::IotlbGlobal)
        ]
    );
}

#[test]
fn write_buffer_flush_follows_srtp_on_rwbf_units() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        rwbf: true,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let _unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    assert_eq!(model.gcmd_writes(), [SRTP, WBF, QIE, QIE | TE]);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn register_based_invalidation_is_used_without_queued_invalidation() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        qi: false,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let unit = init(&model, &mem, &clock, ModeRequest::PreferScalable);
    assert!(!unit.uses_queued_invalidation());
    assert_eq!(model.gcmd_writes(), [SRTP, TE]);
    assert_eq!(
        invalidations_with_via(&model),
        [
            (Via::Register, Inv::ContextGlobal),
            (Via::Register, Inv::IotlbGlobal)
        ]
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn scalable_mode_programs_ttm_and_invalidates_the_pasid_cache() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let unit = init(&model, &mem, &clock, ModeRequest::Scalable);
    assert_eq!(unit.mode(), TranslationMode::Scalable);
    assert_eq!(
        model.active_root(),
        Some(unit.root_table().as_u64() | (1 << 10))
    );
    assert_eq!(
        model.invalidations(),
        [
            Inv::ContextGlobal,
            Inv::IotlbGlobal,
            Inv::PasidCache {
                granularity: 0b11,
                did: 0,
                pasid: 0
            }
        ]
    );
    assert_eq!(unit.pasid_limit(), 1 << 15, "one-page PASID directory");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn mode_choice_follows_the_request_and_the_capabilities() {
    let mem = ModelMemory::new();
    let clock = clock();
    // QEMU's default unit has no scalable mode: preferred → legacy,
    // required → a clear error.
    let qemu = model(&mem, CapBuilder::qemu_default());
    let unit = init(&qemu, &mem, &clock, ModeRequest::PreferScalable);
    assert_eq!(unit.mode(), TranslationMode::Legacy);
    let qemu2 = model(&mem, CapBuilder::qemu_default());
    assert!(matches!(
        VtdUnit::init(&qemu2, &mem, &clock, config(ModeRequest::Scalable)),
        Err(VtdError::Unsupported(_))
    ));
    // The server unit prefers scalable mode but can run legacy.
    let server = model(&mem, CapBuilder::server());
    assert_eq!(
        init(&server, &mem, &clock, ModeRequest::PreferScalable).mode(),
        TranslationMode::Scalable
    );
    let server2 = model(&mem, CapBuilder::server());
    assert_eq!(
        init(&server2, &mem, &clock, ModeRequest::Legacy).mode(),
        TranslationMode::Legacy
    );
    // Bad platform data is refused.
    let bad = model(&mem, CapBuilder::qemu_default());
    let mut cfg = config(ModeRequest::Legacy);
    cfg.host_address_width = 64;
    assert!(matches!(
        VtdUnit::init(&bad, &mem, &clock, cfg),
        Err(VtdError::InvalidConfig(_))
    ));
}

#[test]
fn every_device_is_blocked_once_translation_is_enabled() {
    for (caps, mode) in [
        (CapBuilder::qemu_default(), ModeRequest::Legacy),
        (CapBuilder::server(), ModeRequest::Scalable),
    ] {
        let mem = ModelMemory::new();
        let model = model(&mem, caps);
        let clock = clock();
        let _unit = init(&model, &mem, &clock, mode);
        let cfg = model.walker_config();
        let root = model.active_root().expect("root set");
        for sid in [0x0000u16, 0x0018, 0x00ff, 0x0100, 0x0588, 0xff80, 0xffff] {
            for req in [
                DmaRequest::read(sid, 0x1000),
                DmaRequest::write(sid, 0xfee0_0000),
            ] {
                assert_eq!(
                    walker::translate(&mem, root, &req, &cfg).map(|t| t.walk.phys),
                    Err(TranslationFault::RootNotPresent)
                );
                assert_eq!(
                    model.dma(req).map(|o| o.phys),
                    Err(TranslationFault::RootNotPresent)
                );
            }
        }
        assert!(model.pending_fault_records() > 0);
    }
}

#[test]
fn a_unit_that_never_answers_gives_timeouts_not_hangs() {
    let clock = clock();
    // GCMD never reflected in GSTS.
    let mem = ModelMemory::new();
    let m = model(&mem, CapBuilder::qemu_default());
    m.set_stuck(Stuck {
        gcmd: true,
        ..Stuck::default()
    });
    match VtdUnit::init(&m, &mem, &clock, config(ModeRequest::Legacy)) {
        Err(VtdError::Timeout { what, waited_ns }) => {
            assert_eq!(what, "set root-table pointer");
            assert!(waited_ns >= 1_000_000);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("init succeeded on a stuck unit"),
    }
    assert!(!m.translation_enabled());

    // The queue never processes descriptors.
    let m = model(&mem, CapBuilder::qemu_default());
    m.set_stuck(Stuck {
        queue: true,
        ..Stuck::default()
    });
    assert!(matches!(
        VtdUnit::init(&m, &mem, &clock, config(ModeRequest::Legacy)),
        Err(VtdError::Timeout {
            what: "an invalidation wait descriptor",
            ..
        })
    ));
    assert!(
        !m.translation_enabled(),
        "TE only after caches were invalidated"
    );

    // Register-based invalidation never completes.
    let caps = CapBuilder {
        qi: false,
        ..CapBuilder::qemu_default()
    };
    let m = model(&mem, caps);
    m.set_stuck(Stuck {
        registers: true,
        ..Stuck::default()
    });
    assert!(matches!(
        VtdUnit::init(&m, &mem, &clock, config(ModeRequest::Legacy)),
        Err(VtdError::Timeout {
            what: "a context-cache invalidation (CCMD.ICC)",
            ..
        })
    ));
}

#[test]
fn raw_descriptors_without_queue_are_refused_clearly() {
    let mem = ModelMemory::new();
    let caps = CapBuilder {
        qi: false,
        ..CapBuilder::qemu_default()
    };
    let model = model(&mem, caps);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    assert!(matches!(
        unit.submit_descriptors(&[Descriptor::interrupt_entries_global()]),
        Err(VtdError::Unsupported(_))
    ));
    assert_eq!(
        unit.submit_descriptors(&[Descriptor::iotlb_domain(3, true)]),
        Ok(())
    );
    assert_eq!(
        model.invalidations().last(),
        Some(&Inv::IotlbDomain { did: 3 })
    );
}
