//! Taking ownership: the order of register writes, what firmware left,
//! quiescence, capability and configuration checks, allocation failures,
//! and shutting down.

use sluice_hal::PhysAddr;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::its::ItsPageSize;
use crate::its::caps::TyperBuilder;
use crate::its::model::{DropReason, FIRMWARE_DEVICE, ItsModelEvent, ItsQuirks, MsiOutcome};
use crate::its::regs::{baser, cache, cbaser, ctlr};
use crate::its::unit::DeviceTableLayout;

fn position(events: &[ItsModelEvent], f: impl Fn(&ItsModelEvent) -> bool) -> usize {
    events.iter().position(f).expect("event present")
}

#[test]
fn disabled_first_tables_while_quiescent_enabled_last() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let unit = take(&its, &mem, &clock);
    let events = its.events();
    assert!(its.violations().is_empty(), "{:?}", its.violations());
    assert!(
        matches!(events[0], ItsModelEvent::Ctlr(v) if v & ctlr::ENABLED == 0),
        "the first write disables the ITS: {events:?}"
    );
    let cbaser_at = position(
        &events,
        |e| matches!(e, ItsModelEvent::Cbaser(v) if v & cbaser::VALID != 0),
    );
    let cwriter_at = position(&events, |e| *e == ItsModelEvent::Cwriter(0));
    let dt_at = position(
        &events,
        |e| matches!(e, ItsModelEvent::Baser(0, v) if v & baser::VALID != 0),
    );
    let ct_at = position(
        &events,
        |e| matches!(e, ItsModelEvent::Baser(1, v) if v & baser::VALID != 0),
    );
    let enable_at = position(
        &events,
        |e| matches!(e, ItsModelEvent::Ctlr(v) if v & ctlr::ENABLED != 0),
    );
    assert!(cbaser_at < cwriter_at && cwriter_at < enable_at);
    assert!(dt_at < enable_at && ct_at < enable_at);
    assert_eq!(enable_at, events.len() - 1, "enabling is the last write");
    assert!(its.enabled());
    assert_eq!(its.creadr(), 0);
    // QEMU: 16-bit DeviceIDs of 8-byte entries need 128 pages flat, so a
    // two-level table with one level-1 page and 512 DeviceIDs per level-2
    // page; the collection table is one page.
    assert_eq!(
        unit.device_table_layout(),
        DeviceTableLayout::Indirect {
            device_bits: 16,
            page_size: ItsPageSize::Size4K,
            l1_pages: 1,
            ids_per_l2: 512,
        }
    );
    assert_ne!(its.baser(0) & baser::INDIRECT, 0);
    assert_eq!(unit.device_limit(), 1 << 16);
    assert_eq!(unit.queue_slots(), 128);
    assert!(unit.coherent());
    assert_eq!(
        (its.cbaser() >> cbaser::INNER_CACHE_SHIFT) & 0b111,
        cache::WRITE_BACK
    );
    assert_eq!(
        unit.structure_pages(),
        3,
        "queue, level-1 table, collections"
    );
    assert_eq!(mem.live_pages(), 3);
    assert_eq!(unit.doorbell(), 0x0809_0040);
    // No device is mapped: every MSI is dropped.
    for dev in [0, DEV_A, DEV_B, 0xffff] {
        assert!(
            matches!(its.msi_write(dev, 0), MsiOutcome::Dropped(_)),
            "DeviceID {dev:#x}"
        );
    }
}

#[test]
fn firmware_mappings_stop_at_the_takeover() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (_tables, _rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    its.preset_firmware();
    its.set_quirks(ItsQuirks {
        quiesce_delay: 5,
        ..ItsQuirks::default()
    });
    // Firmware's device reaches its LPI before Sluice takes over.
    assert_eq!(
        its.msi_write(FIRMWARE_DEVICE, 0),
        MsiOutcome::Pending {
            cpu: 0,
            lpi: 8192,
            forwarded: false
        }
    );
    let clock = clock();
    let _unit = take(&its, &mem, &clock);
    // No table descriptor was touched before the ITS was quiescent.
    assert!(its.violations().is_empty(), "{:?}", its.violations());
    assert!(
        matches!(its.events()[0], ItsModelEvent::Ctlr(v) if v & ctlr::ENABLED == 0),
        "disabled first"
    );
    // Firmware's queue and tables are gone; its device reaches nothing.
    assert_ne!(
        its.cbaser() & cbaser::ADDR_MASK,
        crate::its::model::FIRMWARE_MEMORY
    );
    assert!(matches!(
        its.msi_write(FIRMWARE_DEVICE, 0),
        MsiOutcome::Dropped(DropReason::DeviceOutOfRange | DropReason::UnmappedDevice)
    ));
}

#[test]
fn an_its_that_never_quiesces_is_left_alone() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = qemu_model(&mem, &redist);
    its.preset_firmware();
    its.set_quirks(ItsQuirks {
        never_quiesce: true,
        ..ItsQuirks::default()
    });
    let clock = clock();
    let err = ItsUnit::take_ownership(&its, &mem, &clock, config()).err();
    assert!(
        matches!(err, Some(ItsError::Timeout { what, .. }) if what.contains("Quiescent")),
        "{err:?}"
    );
    assert!(
        its.events()
            .iter()
            .all(|e| !matches!(e, ItsModelEvent::Baser(..) | ItsModelEvent::Cbaser(_))),
        "no table written while not quiescent: {:?}",
        its.events()
    );
    assert!(its.violations().is_empty());
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn capability_and_configuration_errors_write_nothing() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let clock = clock();
    let mut no_physical = ItsModelConfig::qemu_7_2();
    no_physical.typer.physical = false;
    let its = ItsModel::new(&mem, &redist, no_physical);
    assert!(matches!(
        ItsUnit::take_ownership(&its, &mem, &clock, config()).err(),
        Some(ItsError::Unsupported(_))
    ));
    assert!(its.events().is_empty());

    let its = qemu_model(&mem, &redist);
    for bad in [
        ItsConfig {
            collections: 0,
            ..config()
        },
        ItsConfig {
            lpi_id_bits: 13,
            ..config()
        },
        ItsConfig {
            timeout_ns: 0,
            ..config()
        },
    ] {
        assert!(matches!(
            ItsUnit::take_ownership(&its, &mem, &clock, bad).err(),
            Some(ItsError::InvalidConfig(_))
        ));
    }
    // 8 collection ID bits: 256 ICIDs at most.
    let mut narrow = ItsModelConfig::qemu_7_2();
    narrow.typer.collection_bits = Some(8);
    let its = ItsModel::new(&mem, &redist, narrow);
    assert!(matches!(
        ItsUnit::take_ownership(
            &its,
            &mem,
            &clock,
            ItsConfig {
                collections: 257,
                ..config()
            }
        )
        .err(),
        Some(ItsError::InvalidConfig(_))
    ));
    assert!(its.events().is_empty());
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn every_allocation_failure_during_takeover_frees_everything() {
    let clock = clock();
    let mut failures = 0;
    for n in 0.. {
        let mem = ModelMemory::new();
        let redist = RedistModel::qemu(&mem, 2);
        let its = qemu_model(&mem, &redist);
        mem.fail_allocation_after(Some(n));
        match ItsUnit::take_ownership(&its, &mem, &clock, config()) {
            Ok(unit) => {
                assert_eq!(n, 3, "three allocations: level-1 table, collections, queue");
                assert_eq!(mem.live_pages() as u64, unit.structure_pages());
                break;
            }
            Err(e) => {
                failures += 1;
                assert!(matches!(e, ItsError::OutOfMemory { .. }), "{e}");
                assert_eq!(mem.live_pages(), 0, "after failure {n}: everything freed");
                assert!(!its.enabled());
                assert_eq!(its.cbaser() & cbaser::VALID, 0);
                for b in 0..8 {
                    assert_eq!(
                        its.baser(b) & baser::VALID,
                        0,
                        "GITS_BASER{b} after failure {n}"
                    );
                }
                assert!(its.violations().is_empty(), "{:?}", its.violations());
            }
        }
    }
    assert_eq!(failures, 3);
}

#[test]
fn a_missing_collection_table_is_reported_and_nothing_stays() {
    // No GITS_BASER of type Collections and HCC = 0: the device table is
    // already allocated when that is found out.
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let mut cfg = ItsModelConfig::qemu_7_2();
    cfg.tables[1] = None;
    let its = ItsModel::new(&mem, &redist, cfg);
    let clock = clock();
    let err = ItsUnit::take_ownership(&its, &mem, &clock, config()).err();
    assert!(
        matches!(err, Some(ItsError::Unsupported(what)) if what.contains("collection table")),
        "{err:?}"
    );
    assert_eq!(mem.live_pages(), 0);
    assert!(!its.enabled());
    assert_eq!(its.baser(0) & baser::VALID, 0);
}

#[test]
fn a_non_snooping_its_gets_non_cacheable_attributes_and_cleaned_memory() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let mut cfg = ItsModelConfig::qemu_7_2();
    cfg.shareable = false;
    let its = ItsModel::new(&mem, &redist, cfg);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    assert!(!unit.coherent());
    assert_eq!(
        (its.cbaser() >> cbaser::INNER_CACHE_SHIFT) & 0b111,
        cache::NON_CACHEABLE
    );
    assert_eq!(
        (its.baser(0) >> baser::INNER_CACHE_SHIFT) & 0b111,
        cache::NON_CACHEABLE
    );
    let queue = PhysAddr::new(its.cbaser() & cbaser::ADDR_MASK);
    mem.set_track_flushes(true);
    unit.map_collection(0, processor(0)).unwrap();
    // (The model's own table writes count as unflushed too: only the
    // queue is checked.)
    let unflushed_commands: alloc::vec::Vec<_> = mem
        .unflushed_words()
        .into_iter()
        .filter(|a| a.as_u64() & !0xfff == queue.as_u64())
        .collect();
    assert!(
        unflushed_commands.is_empty(),
        "every command cleaned: {unflushed_commands:?}"
    );
    assert!(
        mem.flushes()
            .iter()
            .any(|&(a, _)| a.as_u64() & !0xfff == queue.as_u64()),
        "queue slots cleaned"
    );
}

#[test]
fn shutting_down_disables_and_frees_everything() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let before = mem.live_pages();
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 4).unwrap();
    unit.map_device(0x1000, 1).unwrap();
    unit.map_event(DEV_A, 3, lpi(8200), 1).unwrap();
    assert!(mem.live_pages() > before);
    unit.shut_down().unwrap();
    assert_eq!(mem.live_pages(), before, "ITS memory all freed");
    assert!(!its.enabled());
    assert_eq!(its.cbaser() & cbaser::VALID, 0);
    assert_eq!(its.baser(0) & baser::VALID, 0);
    assert!(matches!(
        its.msi_write(DEV_A, 3),
        MsiOutcome::Dropped(DropReason::ItsDisabled)
    ));
    assert!(its.violations().is_empty(), "{:?}", its.violations());
}

#[test]
fn hcc_collections_need_no_table() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (tables, rds) = lpis_on(&redist, &mem);
    let mut cfg = ItsModelConfig::qemu_7_2();
    cfg.typer = TyperBuilder {
        hcc: 4,
        ..cfg.typer
    };
    let its = ItsModel::new(&mem, &redist, cfg);
    let clock = clock();
    let pages = mem.live_pages();
    let mut unit = take(&its, &mem, &clock);
    assert_eq!(its.baser(1) & baser::VALID, 0, "no collection table");
    assert_eq!(mem.live_pages() - pages, 2, "queue and level-1 table only");
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 1).unwrap();
    unit.map_event(DEV_A, 1, lpi(9000), 1).unwrap();
    tables
        .set(lpi(9000), crate::redist::LpiConfig::enabled(0x80))
        .unwrap();
    assert_eq!(
        its.msi_write(DEV_A, 1),
        MsiOutcome::Pending {
            cpu: 1,
            lpi: 9000,
            forwarded: true
        }
    );
    assert!(rds[1].lpi_pending(lpi(9000)));
    // More collections than HCC: a table after all.
    let mem2 = ModelMemory::new();
    let redist2 = RedistModel::qemu(&mem2, 1);
    let its2 = ItsModel::new(&mem2, &redist2, cfg);
    let _unit2 = take_with(
        &its2,
        &mem2,
        &clock,
        ItsConfig {
            collections: 5,
            ..config()
        },
    );
    assert_ne!(its2.baser(1) & baser::VALID, 0);
}
