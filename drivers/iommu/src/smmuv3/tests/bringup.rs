//! Bring-up: the init order, stream-table layouts, capabilities and
//! timeouts.

use alloc::vec::Vec;

use sluice_hal::model::ModelMemory;

use super::*;
use crate::smmuv3::SmmuError;
use crate::smmuv3::model::{Cmd, ModelEvent, Stuck};
use crate::smmuv3::regs::{cr0, cr1, cr2, gbpa};
use crate::smmuv3::structs::SteConfig;
use crate::smmuv3::unit::{StreamTableLayout, StreamTableRequest};
use crate::smmuv3::walker::WalkError;

fn position(events: &[ModelEvent], f: impl Fn(&ModelEvent) -> bool) -> usize {
    events.iter().position(f).expect("event present")
}

#[test]
fn abort_is_set_before_anything_and_translation_enabled_last() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let unit = init(&model, &mem, &clock);
    let events = model.events();
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    // The very first write is GBPA with ABORT and UPDATE.
    assert!(
        matches!(events[0], ModelEvent::Gbpa(v) if v & gbpa::ABORT != 0 && v & gbpa::UPDATE != 0),
        "{events:?}"
    );
    assert_eq!(model.gbpa() & (gbpa::ABORT | gbpa::UPDATE), gbpa::ABORT);
    // Disabled before anything else is programmed.
    assert_eq!(events[1], ModelEvent::Cr0(0));
    let strtab = position(&events, |e| matches!(e, ModelEvent::StrtabBase(_)));
    let cmdq = position(&events, |e| matches!(e, ModelEvent::CmdqBase(_)));
    let cmdqen = position(&events, |e| *e == ModelEvent::Cr0(cr0::CMDQEN));
    let first_cmd = position(&events, |e| matches!(e, ModelEvent::Command(_)));
    let smmuen = position(
        &events,
        |e| matches!(e, ModelEvent::Cr0(v) if v & cr0::SMMUEN != 0),
    );
    assert!(strtab < cmdqen && cmdq < cmdqen && cmdqen < first_cmd && first_cmd < smmuen);
    assert_eq!(smmuen, events.len() - 1, "SMMUEN is the last write");
    assert_eq!(
        model.cr0(),
        cr0::SMMUEN | cr0::CMDQEN | cr0::EVENTQEN,
        "both queues on"
    );
    // Every cache invalidated before translation is on.
    let cmds = model.commands();
    assert_eq!(
        cmds,
        [
            Cmd::CfgiSteRange { sid: 0, range: 31 },
            Cmd::TlbiNsnhAll,
            Cmd::Sync { msi: None }
        ]
    );
    // Coherent: write-back inner-shareable tables and queues.
    let cr1_value = events
        .iter()
        .find_map(|e| match e {
            ModelEvent::Cr1(v) => Some(*v),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        cr1_value,
        cr1::uniform(cr1::WRITE_BACK, cr1::INNER_SHAREABLE)
    );
    assert!(events.contains(&ModelEvent::Cr2(cr2::RECINVSID | cr2::PTM)));
    assert_eq!(
        unit.stream_table_layout(),
        StreamTableLayout::TwoLevel { sid_bits: 15 },
        "QEMU: 16-bit StreamIDs, one page of L1 descriptors"
    );
    assert_eq!(unit.stream_limit(), 1 << 15);
    assert_eq!(unit.substream_limit(), 0);
    assert_eq!(unit.base_pages(), 3);
    assert_eq!(mem.live_pages(), 3, "stream table, command and event queue");
}

#[test]
fn every_stream_aborts_after_init() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let unit = init(&model, &mem, &clock);
    // 2-level: no level-2 tables yet, so C_BAD_STREAMID for every SID.
    for sid in [0, SID_A, SID_B, 0x7fff] {
        let r = model.dma(read(sid, 0x1000));
        assert!(
            matches!(r, Err(WalkError::Fault(f)) if f.kind.name() == "C_BAD_STREAMID"),
            "{sid:#x}: {r:?}"
        );
    }
    // Beyond the stream table too.
    assert!(model.dma(read(0x8000, 0)).is_err());
    assert!(unit.level2_table(SID_A).is_none());

    // A linear table: every STE valid with Config = abort (no event).
    let mem = ModelMemory::new();
    let idr = IdrBuilder {
        two_level: false,
        sid_bits: 6,
        ..IdrBuilder::qemu_7_2()
    };
    let model = SmmuModel::new(&mem, idr);
    let unit = init(&model, &mem, &clock);
    assert_eq!(
        unit.stream_table_layout(),
        StreamTableLayout::Linear { sid_bits: 6 }
    );
    for sid in 0..64 {
        assert_eq!(model.dma(write(sid, 0x2000)), Err(WalkError::Abort));
        let ste = unit.read_ste(sid).unwrap();
        assert!(ste.valid());
        assert_eq!(ste.config(), SteConfig::Abort);
    }
    assert_eq!(model.pending_events(), 0, "abort STEs record nothing");
}

#[test]
fn firmware_left_enabled_bypass_is_closed_before_disabling() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    // Firmware: SMMU on with some table, GBPA = bypass.
    model.preset_enabled(0x4000_0000, 0);
    let clock = clock();
    let _unit = init(&model, &mem, &clock);
    let events = model.events();
    let abort = position(
        &events,
        |e| matches!(e, ModelEvent::Gbpa(v) if v & gbpa::ABORT != 0),
    );
    let disable = position(&events, |e| *e == ModelEvent::Cr0(0));
    assert!(abort < disable, "{events:?}");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn disabled_smmu_honours_gbpa() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    // Out of reset GBPA bypasses.
    let out = model.dma(read(1, 0x1234)).unwrap();
    assert!(out.bypassed);
    // A failing bring-up leaves GBPA aborting. (CR0ACK stuck at its reset
    // value 0: the disable "succeeds", the first enable does not.)
    model.set_stuck(Stuck {
        cr0: true,
        ..Stuck::default()
    });
    let clock = clock();
    let err = SmmuUnit::init(&model, &mem, &clock, config()).err();
    assert!(
        matches!(
            err,
            Some(SmmuError::Timeout {
                what: "command queue enable",
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(model.gbpa() & gbpa::ABORT, gbpa::ABORT);
    assert_eq!(mem.live_pages(), 0, "nothing leaked");
}

#[test]
fn stuck_gbpa_update_times_out() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    model.set_stuck(Stuck {
        gbpa: true,
        ..Stuck::default()
    });
    let clock = clock();
    let err = SmmuUnit::init(&model, &mem, &clock, config()).err();
    assert!(
        matches!(
            err,
            Some(SmmuError::Timeout {
                what: "GBPA update",
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        !model
            .events()
            .iter()
            .any(|e| matches!(e, ModelEvent::Cr0(_))),
        "nothing else touched"
    );
}

#[test]
fn stream_table_requests() {
    let clock = clock();
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let cfg = crate::smmuv3::SmmuConfig {
        stream_table: StreamTableRequest::Linear,
        ..config()
    };
    let unit = init_with(&model, &mem, &clock, cfg);
    assert_eq!(
        unit.stream_table_layout(),
        StreamTableLayout::Linear { sid_bits: 6 }
    );
    assert_eq!(unit.stream_limit(), 64);

    let mem = ModelMemory::new();
    let model = SmmuModel::new(
        &mem,
        IdrBuilder {
            two_level: false,
            ..IdrBuilder::qemu_7_2()
        },
    );
    let cfg = crate::smmuv3::SmmuConfig {
        stream_table: StreamTableRequest::TwoLevel,
        ..config()
    };
    assert_eq!(
        SmmuUnit::init(&model, &mem, &clock, cfg).err(),
        Some(SmmuError::Unsupported(
            "2-level stream tables (IDR0.ST_LEVEL)"
        ))
    );
}

#[test]
fn unsupported_smmus_are_refused_with_the_reason() {
    let clock = clock();
    let cases: Vec<(IdrBuilder, &str)> = alloc::vec![
        (
            IdrBuilder {
                stage1: false,
                stage2: false,
                ..IdrBuilder::qemu_7_2()
            },
            "any translation stage (IDR0.S1P/S2P)",
        ),
        (
            IdrBuilder {
                granules: (false, true, true),
                ..IdrBuilder::qemu_7_2()
            },
            "the 4 KiB granule (IDR5.GRAN4K)",
        ),
        (
            IdrBuilder {
                stall_model: 0b10,
                ..IdrBuilder::qemu_7_2()
            },
            "terminating faults (IDR0.STALL_MODEL forces stalls)",
        ),
    ];
    for (idr, why) in cases {
        let mem = ModelMemory::new();
        let model = SmmuModel::new(&mem, idr);
        assert_eq!(
            SmmuUnit::init(&model, &mem, &clock, config()).err(),
            Some(SmmuError::Unsupported(why))
        );
        assert!(
            model.events().is_empty(),
            "refused before touching anything"
        );
    }
}

#[test]
fn non_coherent_smmu_gets_non_cacheable_attributes() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::server()).check_flushes(&mem);
    let clock = clock();
    let unit = init(&model, &mem, &clock);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    assert!(
        mem.unflushed_words().is_empty(),
        "{:?}",
        mem.unflushed_words()
    );
    assert!(model.events().contains(&ModelEvent::Cr1(cr1::uniform(
        cr1::NON_CACHEABLE,
        cr1::OUTER_SHAREABLE
    ))));
    assert!(
        !unit.uses_msi_sync(),
        "MSI completion needs coherent polling"
    );
    assert!(!mem.flushes().is_empty());
}

#[test]
fn firmware_can_override_cohacc() {
    let mem = ModelMemory::new();
    // The SMMU claims coherency; the IORT says otherwise.
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    mem.set_track_flushes(true);
    let cfg = crate::smmuv3::SmmuConfig {
        coherent_override: Some(false),
        ..config()
    };
    let unit = init_with(&model, &mem, &clock, cfg);
    assert!(!unit.coherent());
    assert!(model.events().contains(&ModelEvent::Cr1(cr1::uniform(
        cr1::NON_CACHEABLE,
        cr1::OUTER_SHAREABLE
    ))));
    assert!(mem.unflushed_words().is_empty());
    assert!(!mem.flushes().is_empty());
}

#[test]
fn iort_node_gives_base_and_coherency() {
    use crate::acpi::iort::{SmmuV3, SmmuV3Flags};
    let node = |flags| SmmuV3 {
        base: 0x0905_0000,
        flags,
        vatos_address: 0,
        model: 0,
        event_gsiv: 106,
        pri_gsiv: 107,
        gerr_gsiv: 109,
        sync_gsiv: 108,
        proximity_domain: None,
        device_id_mapping_index: None,
    };
    // QEMU's virt sets the flag (and IDR0.COHACC): coherent.
    let cfg = crate::smmuv3::SmmuConfig::from_iort(2, &node(SmmuV3Flags::COHACC_OVERRIDE));
    assert_eq!((cfg.index, cfg.base), (2, 0x0905_0000));
    assert_eq!(cfg.coherent_override, Some(true));
    // Without the flag firmware does not vouch for coherency: the unit
    // cleans what it writes even though IDR0.COHACC claims coherency.
    let cfg = crate::smmuv3::SmmuConfig::from_iort(0, &node(SmmuV3Flags::empty()));
    assert_eq!(cfg.coherent_override, Some(false));
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let unit = init_with(
        &model,
        &mem,
        &clock,
        crate::smmuv3::SmmuConfig {
            timeout_ns: config().timeout_ns,
            ..cfg
        },
    );
    assert!(!unit.coherent());
}
