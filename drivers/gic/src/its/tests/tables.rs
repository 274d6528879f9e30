//! Device table layouts: flat and two-level, level-2 pages on demand,
//! fixed 64 KiB pages, contiguous memory, DeviceID caps.

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaMemory, PhysAddr};

use super::*;
use crate::its::caps::{PageSizes, TableCaps, TyperBuilder};
use crate::its::model::{DropReason, MsiOutcome};
use crate::its::regs::{ItsPageSize, TableType, baser};
use crate::its::unit::{DeviceTableLayout, DeviceTableRequest, plan_device_table};

fn with_typer(typer: TyperBuilder) -> ItsModelConfig {
    ItsModelConfig {
        typer,
        ..ItsModelConfig::qemu_7_2()
    }
}

#[test]
fn few_device_ids_get_a_flat_single_page() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = ItsModel::new(
        &mem,
        &redist,
        with_typer(TyperBuilder {
            device_bits: 5,
            ..TyperBuilder::qemu_7_2()
        }),
    );
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    assert_eq!(
        unit.device_table_layout(),
        DeviceTableLayout::Flat {
            device_bits: 5,
            page_size: ItsPageSize::Size4K,
            pages: 1
        }
    );
    assert_eq!(its.baser(0) & baser::INDIRECT, 0);
    assert_eq!(its.baser(0) & baser::SIZE_MASK, 0, "one page");
    unit.map_collection(0, processor(0)).unwrap();
    unit.map_device(31, 1).unwrap();
    assert_eq!(
        unit.map_device(32, 1),
        Err(ItsError::DeviceOutOfRange {
            device: 32,
            limit: 32
        })
    );
    assert!(unit.level2_page(31).is_none());
}

#[test]
fn two_level_tables_get_level2_pages_on_demand() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    unit.map_collection(0, processor(0)).unwrap();
    let l1 = PhysAddr::new(baser::decode_address(its.baser(0), 0x1000));
    let live = mem.live_pages();
    // DEV_A and DEV_B share level-2 page 0 (DeviceIDs 0-511).
    unit.map_device(DEV_A, 1).unwrap();
    assert_eq!(mem.live_pages(), live + 2, "a level-2 page and an ITT");
    let page0 = unit.level2_page(DEV_A).expect("level-2 page");
    unit.map_device(DEV_B, 1).unwrap();
    assert_eq!(mem.live_pages(), live + 3, "just an ITT");
    assert_eq!(unit.level2_page(DEV_B), Some(page0));
    // DeviceID 0x1000 is behind level-1 entry 8.
    unit.map_device(0x1000, 1).unwrap();
    let page8 = unit.level2_page(0x1000).expect("level-2 page");
    assert_ne!(page8, page0);
    assert_eq!(
        mem.read_u64(l1),
        baser::L1_VALID | page0.as_u64(),
        "level-1 descriptor 0"
    );
    assert_eq!(
        mem.read_u64(PhysAddr::new(l1.as_u64() + 8 * 8)),
        baser::L1_VALID | page8.as_u64()
    );
    assert_eq!(
        mem.read_u64(PhysAddr::new(l1.as_u64() + 8)),
        0,
        "entry 1 absent"
    );
    // DeviceIDs behind absent level-1 entries are refused by the ITS.
    assert_eq!(
        its.msi_write(0x0300, 0),
        MsiOutcome::Dropped(DropReason::DeviceOutOfRange)
    );
    assert_eq!(unit.structure_pages(), mem.live_pages() as u64);
    // Unmapping keeps the level-2 page (part of the table).
    unit.unmap_device(DEV_A).unwrap();
    assert_eq!(unit.level2_page(DEV_B), Some(page0));
    assert!(its.violations().is_empty());
}

#[test]
fn without_indirect_a_large_flat_table_needs_contiguous_memory() {
    let clock = clock();
    let cfg = ItsModelConfig::qemu_7_2().fixed_pages(ItsPageSize::Size4K, false);
    {
        let mem = ModelMemory::new();
        let redist = RedistModel::qemu(&mem, 1);
        let its = ItsModel::new(&mem, &redist, cfg);
        let mut unit = take(&its, &mem, &clock);
        assert_eq!(
            unit.device_table_layout(),
            DeviceTableLayout::Flat {
                device_bits: 16,
                page_size: ItsPageSize::Size4K,
                pages: 128
            }
        );
        assert_eq!(its.baser(0) & baser::SIZE_MASK, 127);
        let runs = mem.contiguous_runs();
        assert!(runs.iter().any(|&(_, n)| n == 128), "{runs:?}");
        unit.map_collection(0, processor(0)).unwrap();
        unit.map_device(0xffff, 1).unwrap();
    }
    // Memory that cannot hand out 128 contiguous pages: a clear error,
    // nothing left behind.
    let mem = ModelMemory::new();
    mem.set_max_contiguous_pages(Some(1));
    let redist = RedistModel::qemu(&mem, 1);
    let its = ItsModel::new(&mem, &redist, cfg);
    let err = ItsUnit::take_ownership(&its, &mem, &clock, config()).err();
    assert_eq!(
        err,
        Some(ItsError::OutOfMemory {
            what: "flat device table",
            bytes: 128 * 4096
        })
    );
    assert_eq!(mem.live_pages(), 0);
    assert!(!its.enabled());
    // Capping the DeviceIDs to what one page holds makes it fit.
    let unit = take_with(
        &its,
        &mem,
        &clock,
        ItsConfig {
            max_device_bits: Some(9),
            ..config()
        },
    );
    assert_eq!(unit.device_limit(), 512);
    // And asking for a two-level table where there is none is refused.
    let its = ItsModel::new(&mem, &redist, cfg);
    let err = ItsUnit::take_ownership(
        &its,
        &mem,
        &clock,
        ItsConfig {
            device_table: DeviceTableRequest::Indirect,
            ..config()
        },
    )
    .err();
    assert!(matches!(err, Some(ItsError::Unsupported(_))), "{err:?}");
}

#[test]
fn fixed_64k_pages_use_aligned_runs_or_fail_clearly() {
    let clock = clock();
    for indirect in [false, true] {
        let cfg = ItsModelConfig::qemu_7_2().fixed_pages(ItsPageSize::Size64K, indirect);
        let mem = ModelMemory::new();
        let redist = RedistModel::qemu(&mem, 1);
        let (_t, _rds) = lpis_on(&redist, &mem);
        let its = ItsModel::new(&mem, &redist, cfg);
        let mut unit = take(&its, &mem, &clock);
        let layout = unit.device_table_layout();
        assert_eq!(layout.page_size(), ItsPageSize::Size64K);
        let raw = its.baser(0);
        assert_eq!(ItsPageSize::from_field(raw >> 8), ItsPageSize::Size64K);
        let base = baser::decode_address(raw, 0x1_0000);
        assert_eq!(base % 0x1_0000, 0, "64 KiB aligned table");
        if indirect {
            // 8192 DeviceIDs per 64 KiB level-2 page: 8 level-1 entries.
            assert_eq!(
                layout,
                DeviceTableLayout::Indirect {
                    device_bits: 16,
                    page_size: ItsPageSize::Size64K,
                    l1_pages: 1,
                    ids_per_l2: 8192
                }
            );
        } else {
            assert_eq!(
                layout,
                DeviceTableLayout::Flat {
                    device_bits: 16,
                    page_size: ItsPageSize::Size64K,
                    pages: 8
                }
            );
        }
        unit.map_collection(0, processor(0)).unwrap();
        unit.map_device(0x4000, 1).unwrap();
        unit.map_event(0x4000, 1, lpi(8192), 0).unwrap();
        assert!(matches!(
            its.msi_write(0x4000, 1),
            MsiOutcome::Pending { .. }
        ));
        if let Some(l2) = unit.level2_page(0x4000) {
            assert_eq!(l2.as_u64() % 0x1_0000, 0, "64 KiB level-2 page");
        }

        // Memory without contiguous runs cannot even hold one 64 KiB page.
        let mem = ModelMemory::new();
        mem.set_max_contiguous_pages(Some(1));
        let redist = RedistModel::qemu(&mem, 1);
        let its = ItsModel::new(&mem, &redist, cfg);
        let err = ItsUnit::take_ownership(&its, &mem, &clock, config()).err();
        assert!(
            matches!(err, Some(ItsError::OutOfMemory { bytes, .. }) if bytes % 0x1_0000 == 0),
            "{err:?}"
        );
        assert_eq!(mem.live_pages(), 0);
    }
}

#[test]
fn the_device_table_plan_caps_device_bits_to_256_pages() {
    let table = |indirect| TableCaps {
        index: 0,
        kind: TableType::Devices,
        entry_bytes: 8,
        page_sizes: PageSizes::only(ItsPageSize::Size4K),
        indirect,
        found: 0,
    };
    let caps = TyperBuilder {
        device_bits: 32,
        ..TyperBuilder::qemu_7_2()
    }
    .caps();
    // Two-level with 4 KiB pages: 256 level-1 pages × 512 descriptors ×
    // 512 DeviceIDs = 2^26.
    let plan = plan_device_table(&caps, &table(true), &config()).unwrap();
    assert_eq!(
        plan,
        DeviceTableLayout::Indirect {
            device_bits: 26,
            page_size: ItsPageSize::Size4K,
            l1_pages: 256,
            ids_per_l2: 512
        }
    );
    // Flat: 256 pages of 512 entries = 2^17.
    let plan = plan_device_table(&caps, &table(false), &config()).unwrap();
    assert_eq!(plan.device_bits(), 17);
    // The configuration's cap applies first.
    let capped = ItsConfig {
        max_device_bits: Some(16),
        ..config()
    };
    let plan = plan_device_table(&caps, &table(true), &capped).unwrap();
    assert_eq!(plan.device_bits(), 16);
    // Auto picks flat when one page covers every DeviceID even with
    // Indirect available.
    let small = TyperBuilder {
        device_bits: 9,
        ..TyperBuilder::qemu_7_2()
    }
    .caps();
    assert!(matches!(
        plan_device_table(&small, &table(true), &config()).unwrap(),
        DeviceTableLayout::Flat { pages: 1, .. }
    ));
    let forced = ItsConfig {
        device_table: DeviceTableRequest::Indirect,
        ..config()
    };
    assert!(matches!(
        plan_device_table(&small, &table(true), &forced).unwrap(),
        DeviceTableLayout::Indirect { l1_pages: 1, .. }
    ));
}

#[test]
fn device_ids_beyond_the_capped_table_are_refused() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = ItsModel::new(
        &mem,
        &redist,
        with_typer(TyperBuilder {
            device_bits: 32,
            ..TyperBuilder::qemu_7_2()
        }),
    );
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    assert_eq!(unit.device_limit(), 1 << 26);
    unit.map_collection(0, processor(0)).unwrap();
    unit.map_device((1 << 26) - 1, 1).unwrap();
    assert_eq!(
        unit.map_device(1 << 26, 1),
        Err(ItsError::DeviceOutOfRange {
            device: 1 << 26,
            limit: 1 << 26
        })
    );
}

#[test]
fn allocation_failures_while_mapping_a_device_change_nothing_in_the_its() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    let its = qemu_model(&mem, &redist);
    let clock = clock();
    let mut unit = take(&its, &mem, &clock);
    unit.map_collection(0, processor(0)).unwrap();
    let live = mem.live_pages();
    let commands = its.commands().len();
    // The level-2 page.
    mem.fail_allocation_after(Some(0));
    assert_eq!(
        unit.map_device(DEV_A, 4),
        Err(ItsError::OutOfMemory {
            what: "level-2 device table page",
            bytes: 4096
        })
    );
    assert_eq!(mem.live_pages(), live);
    assert_eq!(unit.level2_page(DEV_A), None);
    // The ITT, once the level-2 page exists (which stays: it is part of
    // the table and the next device in its range uses it).
    mem.fail_allocation_after(Some(1));
    assert_eq!(
        unit.map_device(DEV_A, 4),
        Err(ItsError::OutOfMemory {
            what: "ITT",
            bytes: 16 * 12
        })
    );
    assert_eq!(mem.live_pages(), live + 1);
    assert!(unit.level2_page(DEV_A).is_some());
    assert_eq!(unit.device_event_bits(DEV_A), None);
    assert_eq!(its.commands().len(), commands, "no MAPD sent");
    // A large ITT needs a contiguous run; without one, the same error.
    mem.set_max_contiguous_pages(Some(1));
    assert_eq!(
        unit.map_device(DEV_A, 16),
        Err(ItsError::OutOfMemory {
            what: "ITT",
            bytes: (1 << 16) * 12
        })
    );
    mem.set_max_contiguous_pages(None);
    unit.map_device(DEV_A, 16).unwrap();
    let itt = unit.device_itt(DEV_A).unwrap();
    assert_eq!(itt.as_u64() % 256, 0);
    assert!(mem.contiguous_runs().contains(&(itt, 192)), "768 KiB ITT");
    assert_eq!(unit.structure_pages(), mem.live_pages() as u64);
}
