//! MSI isolation end to end: a device's events reach exactly the LPIs
//! Sluice mapped for them, on the redistributor of their collection;
//! unmapped devices and events produce nothing; unmapping stops delivery;
//! bad requests change nothing; LPI configuration changes need an INV.

use alloc::vec;
use alloc::vec::Vec;

use sluice_hal::model::ModelMemory;

use super::*;
use crate::its::caps::TyperBuilder;
use crate::its::commands::{Decoded, opcode};
use crate::its::model::{DropReason, MsiOutcome};
use crate::redist::LpiConfig;

#[test]
fn each_event_reaches_only_its_lpi_and_unmapped_ones_reach_nothing() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 2).unwrap();
    unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap();
    unit.map_event(DEV_A, 1, lpi(8193), 1).unwrap();
    for l in [8192, 8193] {
        tables.set(lpi(l), LpiConfig::enabled(0xa0)).unwrap();
        // Nothing was delivered yet, so nothing is cached: no INV needed.
    }
    assert_eq!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending {
            cpu: 0,
            lpi: 8192,
            forwarded: true
        }
    );
    assert_eq!(
        its.msi_write(DEV_A, 1),
        MsiOutcome::Pending {
            cpu: 1,
            lpi: 8193,
            forwarded: true
        }
    );
    assert!(rds[0].lpi_pending(lpi(8192)) && !rds[1].lpi_pending(lpi(8192)));
    assert!(rds[1].lpi_pending(lpi(8193)) && !rds[0].lpi_pending(lpi(8193)));
    // EventID 2 exists (2 bits) but is not mapped; 4 is beyond the ITT.
    assert_eq!(
        its.msi_write(DEV_A, 2),
        MsiOutcome::Dropped(DropReason::UnmappedEvent)
    );
    assert_eq!(
        its.msi_write(DEV_A, 4),
        MsiOutcome::Dropped(DropReason::EventOutOfRange)
    );
    // Device B, unmapped, in the same level-2 page and beyond it.
    assert_eq!(
        its.msi_write(DEV_B, 0),
        MsiOutcome::Dropped(DropReason::UnmappedDevice)
    );
    assert_eq!(
        its.msi_write(0x8000, 1),
        MsiOutcome::Dropped(DropReason::DeviceOutOfRange)
    );
    // Exactly two LPIs pending in the whole system.
    assert_eq!(redist.pending_lpis(0), vec![8192]);
    assert_eq!(redist.pending_lpis(1), vec![8193]);
    // The software record agrees with the ITS.
    assert_eq!(unit.translate(DEV_A, 0).map(|m| m.lpi), Some(lpi(8192)));
    assert_eq!(unit.translate(DEV_A, 1).map(|m| m.icid), Some(1));
    assert_eq!(unit.lpi_owner(lpi(8193)), Some((DEV_A, 1)));
    assert_eq!(unit.translate(DEV_B, 0), None);
    assert_eq!(its.translation(DEV_A, 1), Some((8193, 1)));
    assert!(its.violations().is_empty() && redist.violations().is_empty());
}

#[test]
fn discard_and_unmap_stop_delivery() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 1).unwrap();
    unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap();
    unit.map_event(DEV_A, 1, lpi(8193), 0).unwrap();
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending { .. }
    ));
    assert!(rds[0].lpi_pending(lpi(8192)));
    // DISCARD: no longer translated, and no longer pending.
    unit.unmap_event(DEV_A, 0).unwrap();
    assert!(!rds[0].lpi_pending(lpi(8192)));
    assert_eq!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Dropped(DropReason::UnmappedEvent)
    );
    assert!(!rds[0].lpi_pending(lpi(8192)));
    assert!(matches!(
        its.msi_write(DEV_A, 1),
        MsiOutcome::Pending { lpi: 8193, .. }
    ));
    // The freed LPI can go to another device.
    assert_eq!(unit.lpi_owner(lpi(8192)), None);
    unit.map_device(DEV_B, 1).unwrap();
    unit.map_event(DEV_B, 0, lpi(8192), 0).unwrap();
    assert!(matches!(
        its.msi_write(DEV_B, 0),
        MsiOutcome::Pending { lpi: 8192, .. }
    ));
    // Unmapping the device: every event dropped, its ITT freed.
    let itt = unit.device_itt(DEV_A).unwrap();
    unit.unmap_device(DEV_A).unwrap();
    assert!(!mem.is_live(itt));
    assert!(!rds[0].lpi_pending(lpi(8193)), "DISCARD before MAPD V=0");
    for e in 0..2 {
        assert_eq!(
            its.msi_write(DEV_A, e),
            MsiOutcome::Dropped(DropReason::UnmappedDevice)
        );
    }
    assert!(matches!(
        its.msi_write(DEV_B, 0),
        MsiOutcome::Pending { .. }
    ));
    // Mapped again, the device starts with an empty ITT.
    unit.map_device(DEV_A, 1).unwrap();
    assert_eq!(
        its.msi_write(DEV_A, 1),
        MsiOutcome::Dropped(DropReason::UnmappedEvent)
    );
    let cmds = its.commands();
    let last_discards: Vec<_> = cmds
        .iter()
        .filter_map(|c| match c.decode() {
            Ok(Decoded::Discard { device, event }) => Some((device, event)),
            _ => None,
        })
        .collect();
    assert_eq!(last_discards, [(DEV_A, 0), (DEV_A, 1)]);
}

/// What the driver's record and the ITS hold, to compare before and after
/// a refused request.
fn snapshot(
    unit: &ItsUnit<'_>,
    its: &ItsModel<'_>,
    mem: &ModelMemory,
) -> impl PartialEq + core::fmt::Debug + use<> {
    let devices = unit.mapped_devices();
    let events: Vec<_> = devices.iter().map(|&d| unit.mapped_events(d)).collect();
    (
        devices,
        events,
        its.events().len(),
        mem.live_pages(),
        unit.collection_target(0),
        unit.collection_target(1),
    )
}

#[test]
fn bad_requests_are_refused_without_changing_anything() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let (_tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    unit.map_collection(0, rds[0].frame().target(redist.base(), false))
        .unwrap();
    unit.map_device(DEV_A, 2).unwrap();
    unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap();
    let before = snapshot(&unit, &its, &mem);
    let cases: Vec<(ItsError, Result<(), ItsError>)> = vec![
        (
            ItsError::DeviceOutOfRange {
                device: 1 << 16,
                limit: 1 << 16,
            },
            unit.map_device(1 << 16, 1),
        ),
        (
            ItsError::EventBitsOutOfRange { bits: 0, max: 16 },
            unit.map_device(DEV_B, 0),
        ),
        (
            ItsError::EventBitsOutOfRange { bits: 17, max: 16 },
            unit.map_device(DEV_B, 17),
        ),
        (ItsError::DeviceMapped(DEV_A), unit.map_device(DEV_A, 1)),
        (
            ItsError::DeviceNotMapped(DEV_B),
            unit.map_event(DEV_B, 0, lpi(9000), 0),
        ),
        (
            ItsError::EventOutOfRange {
                device: DEV_A,
                event: 4,
                limit: 4,
            },
            unit.map_event(DEV_A, 4, lpi(9000), 0),
        ),
        (
            ItsError::LpiOutOfRange {
                lpi: 1 << 16,
                first: 8192,
                limit: 1 << 16,
            },
            unit.map_event(DEV_A, 1, lpi(1 << 16), 0),
        ),
        (
            ItsError::LpiInUse {
                lpi: 8192,
                device: DEV_A,
                event: 0,
            },
            unit.map_event(DEV_A, 1, lpi(8192), 0),
        ),
        (
            ItsError::EventMapped {
                device: DEV_A,
                event: 0,
            },
            unit.map_event(DEV_A, 0, lpi(9000), 0),
        ),
        (
            ItsError::CollectionNotMapped(1),
            unit.map_event(DEV_A, 1, lpi(9000), 1),
        ),
        (
            ItsError::CollectionOutOfRange { icid: 2, limit: 2 },
            unit.map_collection(2, processor(0)),
        ),
        (
            ItsError::CollectionMapped(0),
            unit.map_collection(0, processor(1)),
        ),
        (
            ItsError::WrongTarget(RdBase::Address(0x080c_0000)),
            unit.map_collection(1, RdBase::Address(0x080c_0000)),
        ),
        (
            ItsError::EventNotMapped {
                device: DEV_A,
                event: 1,
            },
            unit.unmap_event(DEV_A, 1),
        ),
        (ItsError::DeviceNotMapped(DEV_B), unit.unmap_device(DEV_B)),
        (ItsError::CollectionInUse(0), unit.unmap_collection(0)),
        (ItsError::CollectionNotMapped(1), unit.unmap_collection(1)),
        (
            ItsError::EventNotMapped {
                device: DEV_A,
                event: 3,
            },
            unit.invalidate(DEV_A, 3),
        ),
        (
            ItsError::CollectionNotMapped(1),
            unit.invalidate_collection(1),
        ),
        (
            ItsError::WrongTarget(RdBase::Address(0x080a_0000)),
            unit.sync(RdBase::Address(0x080a_0000)),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(got, Err(want), "{want}");
    }
    assert_eq!(snapshot(&unit, &its, &mem), before, "nothing changed");
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending { lpi: 8192, .. }
    ));
    assert!(!unit.is_wedged());
}

#[test]
fn lpi_configuration_changes_apply_after_an_inv() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let (tables, rds) = lpis_on(&redist, &mem);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    map_collections(&mut unit, &rds, redist.base());
    unit.map_device(DEV_A, 1).unwrap();
    unit.map_event(DEV_A, 0, lpi(8192), 0).unwrap();
    // Disabled LPIs still become pending; they are just not forwarded.
    assert_eq!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending {
            cpu: 0,
            lpi: 8192,
            forwarded: false
        }
    );
    tables.set(lpi(8192), LpiConfig::enabled(0x40)).unwrap();
    assert_eq!(redist.cached_config(0, 8192), Some(0), "stale until INV");
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending {
            forwarded: false,
            ..
        }
    ));
    unit.invalidate(DEV_A, 0).unwrap();
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending {
            forwarded: true,
            ..
        }
    ));
    assert_eq!(
        redist.cached_config(0, 8192),
        Some(LpiConfig::enabled(0x40).byte())
    );
    tables.set(lpi(8192), LpiConfig::disabled()).unwrap();
    unit.invalidate_collection(0).unwrap();
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending {
            forwarded: false,
            ..
        }
    ));
    // The one-call form: byte and INV together.
    unit.configure_event(&tables, DEV_A, 0, LpiConfig::enabled(0x20))
        .unwrap();
    assert_eq!(tables.get(lpi(8192)), Ok(LpiConfig::enabled(0x20)));
    assert!(matches!(
        its.msi_write(DEV_A, 0),
        MsiOutcome::Pending {
            forwarded: true,
            ..
        }
    ));
    assert_eq!(
        unit.configure_event(&tables, DEV_A, 1, LpiConfig::disabled()),
        Err(ItsError::EventNotMapped {
            device: DEV_A,
            event: 1
        })
    );
    let cmds = its.commands();
    assert!(cmds.iter().any(|c| c.opcode() == opcode::INV));
    assert!(cmds.iter().any(|c| c.opcode() == opcode::INVALL));
}

#[test]
fn pta_decides_how_collections_name_redistributors() {
    for pta in [false, true] {
        let mem = ModelMemory::new();
        let redist = RedistModel::qemu(&mem, 2);
        let (_tables, rds) = lpis_on(&redist, &mem);
        let mut cfg = ItsModelConfig::qemu_7_2();
        cfg.typer = TyperBuilder { pta, ..cfg.typer };
        let its = ItsModel::new(&mem, &redist, cfg);
        let clock = clock();
        let mut unit = take(&its, &mem, &clock);
        assert_eq!(unit.caps().pta, pta);
        let target = rds[1].frame().target(redist.base(), pta);
        if pta {
            // CPU 1's RD_base: two 64 KiB frames after CPU 0's.
            assert_eq!(target, RdBase::Address(0x080c_0000));
            assert_eq!(
                unit.map_collection(1, RdBase::Processor(1)),
                Err(ItsError::WrongTarget(RdBase::Processor(1)))
            );
        } else {
            assert_eq!(target, RdBase::Processor(1));
        }
        unit.map_collection(1, target).unwrap();
        let mapc = its
            .commands()
            .into_iter()
            .find(|c| c.opcode() == opcode::MAPC)
            .expect("MAPC consumed");
        let dw2 = mapc.words()[2];
        let rd_field = if pta { 0x080c_0000 } else { 1 << 16 };
        assert_eq!(dw2, (1 << 63) | rd_field | 1, "V, RDbase 51:16, ICID");
        let sync = its
            .commands()
            .into_iter()
            .find(|c| c.opcode() == opcode::SYNC)
            .expect("SYNC consumed");
        assert_eq!(sync.words()[2], rd_field);
        assert_eq!(its.collection(1), Some(rd_field));
        unit.map_device(DEV_A, 1).unwrap();
        unit.map_event(DEV_A, 1, lpi(8500), 1).unwrap();
        assert!(matches!(
            its.msi_write(DEV_A, 1),
            MsiOutcome::Pending {
                cpu: 1,
                lpi: 8500,
                ..
            }
        ));
        assert!(rds[1].lpi_pending(lpi(8500)));
    }
}
