//! The command queue: wrap-around, batches longer than the queue, SYNC
//! timeouts, stalls and their recovery.

use sluice_hal::model::ModelMemory;

use super::*;
use crate::its::commands::{Decoded, ItsCommand, opcode};
use crate::its::model::{CommandFault, DropReason, ItsModelEvent, ItsQuirks, MsiOutcome};

#[test]
fn the_queue_wraps_over_many_more_commands_than_it_holds() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 8).unwrap();
    // 200 MAPTI + SYNC pairs: 400 commands through a 128-slot queue.
    for e in 0..200 {
        unit.map_event(DEV_A, e, lpi(8192 + e), (e % 2) as u16)
            .unwrap();
    }
    let cmds = its.commands();
    let maptis = cmds.iter().filter(|c| c.opcode() == opcode::MAPTI).count();
    assert_eq!(maptis, 200);
    assert!(
        cmds.len() > 3 * 128,
        "wrapped several times: {}",
        cmds.len()
    );
    for e in 0..200 {
        assert_eq!(
            its.msi_write(DEV_A, e),
            MsiOutcome::Pending {
                cpu: (e % 2) as usize,
                lpi: 8192 + e,
                forwarded: false
            },
            "EventID {e}"
        );
    }
    assert!(its.violations().is_empty(), "{:?}", its.violations());
}

#[test]
fn a_batch_longer_than_the_queue_is_fed_as_space_frees() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 8).unwrap();
    for e in 0..250 {
        unit.map_event(DEV_A, e, lpi(9000 + e), (e % 2) as u16)
            .unwrap();
    }
    for e in 0..250 {
        assert!(matches!(
            its.msi_write(DEV_A, e),
            MsiOutcome::Pending { .. }
        ));
    }
    // A slow ITS: three commands per GITS_CREADR read.
    its.set_quirks(ItsQuirks {
        throttle: Some(3),
        ..ItsQuirks::default()
    });
    its.clear_events();
    let itt = unit.device_itt(DEV_A).unwrap();
    // 250 DISCARDs, MAPD V=0 and two SYNCs in one batch.
    unit.unmap_device(DEV_A).unwrap();
    let cmds = its.commands();
    assert_eq!(cmds.len(), 253);
    assert!(matches!(
        cmds[249].decode(),
        Ok(Decoded::Discard { event: 249, .. })
    ));
    assert_eq!(cmds[250], ItsCommand::unmapd(DEV_A));
    assert_eq!(cmds[251].opcode(), opcode::SYNC);
    assert!(!mem.is_live(itt), "the ITT is freed");
    for e in 0..250 {
        assert!(matches!(its.msi_write(DEV_A, e), MsiOutcome::Dropped(_)));
        assert!(
            !rds[(e % 2) as usize].lpi_pending(lpi(9000 + e)),
            "DISCARD clears pending"
        );
    }
    assert!(unit.lpi_owner(lpi(9000)).is_none());
    assert!(its.violations().is_empty(), "{:?}", its.violations());
}

#[test]
fn a_sync_that_never_completes_maps_nothing_and_wedges_the_unit() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 2).unwrap();
    its.set_quirks(ItsQuirks {
        stuck_queue: true,
        ..ItsQuirks::default()
    });
    let err = unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap_err();
    assert!(
        matches!(err, ItsError::CommandTimeout { command, .. } if command.opcode() == opcode::MAPTI),
        "{err}"
    );
    assert!(err.to_string().contains("MAPTI"), "{err}");
    assert_eq!(unit.translate(DEV_A, 0), None, "nothing claimed mapped");
    assert_eq!(unit.lpi_owner(lpi(8192)), None);
    assert!(unit.is_wedged());
    // No more commands: the state of the ITS is unknown.
    let before = its.events().len();
    assert_eq!(unit.map_device(DEV_B, 1), Err(ItsError::Wedged));
    assert_eq!(
        unit.map_event(DEV_A, 1, lpi(8193), 0),
        Err(ItsError::Wedged)
    );
    assert_eq!(unit.unmap_device(DEV_A), Err(ItsError::Wedged));
    assert_eq!(its.events().len(), before, "nothing written");
    assert!(unit.translate(DEV_A, 0).is_none());
    assert!(
        unit.device_event_bits(DEV_A).is_some(),
        "still recorded mapped"
    );
}

#[test]
fn an_itt_whose_mapd_timed_out_is_kept() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    unit.map_collection(0, processor(0)).unwrap();
    its.set_quirks(ItsQuirks {
        stuck_queue: true,
        ..ItsQuirks::default()
    });
    let live = mem.live_pages();
    let err = unit.map_device(DEV_A, 4).unwrap_err();
    assert!(
        matches!(err, ItsError::CommandTimeout { command, .. } if command == ItsCommand::mapd(DEV_A, command_itt(&command), 4)),
        "{err}"
    );
    assert_eq!(unit.device_event_bits(DEV_A), None, "not claimed mapped");
    assert_eq!(unit.quarantined_pages(), 1, "the ITT may still be used");
    assert_eq!(mem.live_pages(), live + 2, "level-2 page and the kept ITT");
}

fn command_itt(c: &ItsCommand) -> sluice_hal::PhysAddr {
    match c.decode() {
        Ok(Decoded::Mapd { itt, .. }) => sluice_hal::PhysAddr::new(itt),
        _ => sluice_hal::PhysAddr::new(0),
    }
}

#[test]
fn a_stalled_command_is_reported_skipped_and_the_queue_goes_on() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 2).unwrap();
    its.fail_next(opcode::MAPTI);
    let err = unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap_err();
    assert!(is_stall(&err, opcode::MAPTI), "{err}");
    assert!(err.to_string().contains("MAPTI"), "{err}");
    assert!(!its.stalled(), "restarted with GITS_CWRITER.Retry");
    assert!(its.events().iter().any(|e| matches!(
        e,
        ItsModelEvent::Refused {
            fault: CommandFault::Injected,
            stalled: true,
            ..
        }
    )));
    // Not mapped, in the record or in the ITS.
    assert_eq!(unit.translate(DEV_A, 0), None);
    assert_eq!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Dropped(DropReason::UnmappedEvent)
    );
    assert!(!unit.is_wedged());
    // The queue works again.
    unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap();
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending { lpi: 8192, .. }
    ));
}

#[test]
fn a_stalled_sync_reports_an_error_but_the_mapping_stands() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 2).unwrap();
    its.fail_next(opcode::SYNC);
    let err = unit.map_event(DEV_A, 1, lpi(8300), 0).unwrap_err();
    assert!(is_stall(&err, opcode::SYNC), "{err}");
    // MAPTI went through: the record says so, and so does the ITS.
    assert_eq!(unit.translate(DEV_A, 1).map(|m| m.lpi), Some(lpi(8300)));
    assert!(matches!(
        its.msi_write(DEV_A, 1),
        MsiOutcome::Pending { lpi: 8300, .. }
    ));
    unit.unmap_event(DEV_A, 1).unwrap();
    assert!(matches!(its.msi_write(DEV_A, 1), MsiOutcome::Dropped(_)));
}

#[test]
fn a_stall_before_any_collection_is_mapped_is_replaced_harmlessly() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    its.fail_next(opcode::MAPC);
    let err = unit.map_collection(0, processor(0)).unwrap_err();
    assert!(is_stall(&err, opcode::MAPC), "{err}");
    assert_eq!(unit.collection_target(0), None);
    assert_eq!(its.collection(0), None, "the replacement unmapped nothing");
    unit.map_collection(0, processor(0)).unwrap();
    assert_eq!(its.collection(0), Some(0));
    // A stall inside unmap_device: the DISCARD of one event fails, the
    // rest (MAPD V=0 included) goes through, so the device is gone.
    unit.map_device(DEV_A, 2).unwrap();
    unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap();
    unit.map_event(DEV_A, 1, lpi(8193), 0).unwrap();
    its.fail_next(opcode::DISCARD);
    let err = unit.unmap_device(DEV_A).unwrap_err();
    assert!(is_stall(&err, opcode::DISCARD), "{err}");
    assert_eq!(unit.device_event_bits(DEV_A), None);
    assert_eq!(unit.lpi_owner(lpi(8192)), None);
    assert_eq!(unit.lpi_owner(lpi(8193)), None);
    assert!(matches!(its.msi_write(DEV_A, 0), MsiOutcome::Dropped(_)));
    assert!(matches!(its.msi_write(DEV_A, 1), MsiOutcome::Dropped(_)));
}

#[test]
fn an_its_that_ignores_bad_commands_cannot_report_them() {
    // IHI 0069 leaves the response to a command error IMPLEMENTATION
    // DEFINED: stall, or ignore the command and go on (what QEMU does for
    // bad parameters). An ignoring ITS gives software no sign, which is
    // why the driver checks every request against its own record and the
    // ITS's limits before sending anything. This pins that limit down.
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let mut cfg = ItsModelConfig::qemu_7_2();
    cfg.stall_on_error = false;
    let its = ItsModel::new(&mem, &redist, cfg);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 1).unwrap();
    its.fail_next(opcode::MAPTI);
    assert_eq!(unit.map_event(DEV_A, 0, lpi(8192), 0), Ok(()));
    assert!(
        its.events()
            .iter()
            .any(|e| matches!(e, ItsModelEvent::Refused { stalled: false, .. }))
    );
    // The record says mapped; the ITS drops the MSI. Unmapping (DISCARD
    // of an unmapped event, ignored too) brings both back in line.
    assert!(unit.translate(DEV_A, 0).is_some());
    assert_eq!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Dropped(DropReason::UnmappedEvent)
    );
    unit.unmap_event(DEV_A, 0).unwrap();
    assert!(unit.translate(DEV_A, 0).is_none());
}
