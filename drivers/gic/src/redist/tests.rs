//! Host tests of the redistributor code against the model.

use alloc::vec::Vec;

use sluice_hal::model::{ModelClock, ModelMemory};

use super::model::{DistModel, RedistModel, RedistSpec};
use super::*;
use crate::dist::DistributorInfo;

fn specs(v: &[bool]) -> Vec<RedistSpec> {
    v.iter()
        .enumerate()
        .map(|(i, &vlpis)| RedistSpec {
            affinity: Affinity(0x0100 | i as u32),
            processor_number: i as u16,
            physical_lpis: true,
            virtual_lpis: vlpis,
        })
        .collect()
}

#[test]
fn frames_are_walked_by_vlpis_until_last() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 4);
    let frames = walk_frames(&redist, redist.region_bytes()).unwrap();
    let offsets: Vec<_> = frames.iter().map(|f| f.offset).collect();
    assert_eq!(offsets, [0, 0x2_0000, 0x4_0000, 0x6_0000], "2 frames each");
    assert_eq!(
        frames.iter().map(|f| f.last).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    assert_eq!(frames[2].processor_number, 2);
    assert_eq!(frames[2].affinity, Affinity(2));
    assert_eq!(frames[3].rd_base(0x080a_0000), 0x080a_0000 + 0x6_0000);

    // GICv4 redistributors with VLPIS take four frames.
    let redist = RedistModel::new(&mem, 0x2f10_0000, 16, &specs(&[true, false, true]));
    let frames = walk_frames(&redist, redist.region_bytes()).unwrap();
    let offsets: Vec<_> = frames.iter().map(|f| f.offset).collect();
    assert_eq!(offsets, [0, 0x4_0000, 0x6_0000]);
    assert_eq!(frames[0].span(), 0x4_0000);
    assert_eq!(frames[1].span(), 0x2_0000);
    assert_eq!(redist.region_bytes(), 0xa_0000);
    let found = find_frame(&redist, redist.region_bytes(), Affinity(0x0102)).unwrap();
    assert_eq!(found.offset, 0x6_0000);
    assert_eq!(
        found.target(0x2f10_0000, true),
        RdBase::Address(0x2f16_0000)
    );
    assert_eq!(found.target(0x2f10_0000, false), RdBase::Processor(2));
    assert_eq!(
        find_frame(&redist, redist.region_bytes(), Affinity(7)),
        Err(RedistError::NotFound(Affinity(7)))
    );
    assert!(redist.violations().is_empty());
}

#[test]
fn a_region_without_last_or_cut_short_is_an_error() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 3);
    redist.set_omit_last(true);
    assert_eq!(
        walk_frames(&redist, redist.region_bytes()),
        Err(RedistError::NoLastFrame {
            region_bytes: 0x6_0000,
            scanned: 3
        })
    );
    assert!(redist.violations().is_empty(), "never read past the region");
    redist.set_omit_last(false);
    // A region declared shorter than the redistributors in it.
    assert_eq!(
        walk_frames(&redist, 0x5_0000),
        Err(RedistError::NoLastFrame {
            region_bytes: 0x5_0000,
            scanned: 2
        })
    );
    // A four-frame redistributor that would run past the end.
    let redist = RedistModel::new(&mem, 0, 16, &specs(&[true]));
    assert_eq!(
        walk_frames(&redist, 0x2_0000),
        Err(RedistError::NoLastFrame {
            region_bytes: 0x2_0000,
            scanned: 0
        })
    );
    assert_eq!(
        walk_frames(&redist, 0),
        Err(RedistError::NoLastFrame {
            region_bytes: 0,
            scanned: 0
        })
    );
}

#[test]
fn affinity_comes_from_mpidr_without_mt_and_u() {
    // Aff3 0x12 (bits 39:32), Aff2 0x34, Aff1 0x56, Aff0 0x78, with MT
    // (bit 24), U (bit 30) and the RES1 bit 31 set.
    let mpidr: u64 = (0x12 << 32) | (1 << 31) | (1 << 30) | (1 << 24) | 0x34_5678;
    assert_eq!(Affinity::from_mpidr(mpidr), Affinity(0x1234_5678));
    assert_eq!(alloc::format!("{}", Affinity(0x1234_5678)), "18.52.86.120");
    assert_eq!(
        Affinity::from_typer(0xdead_beef_0000_0000),
        Affinity(0xdead_beef)
    );
}

#[test]
fn lpi_config_bytes_follow_the_spec_layout() {
    assert_eq!(LpiConfig::enabled(0xa0).byte(), 0xa0 | 0b10 | 1);
    assert_eq!(
        LpiConfig::enabled(0xa3).byte(),
        0xa3,
        "priority bits 1:0 dropped"
    );
    assert_eq!(LpiConfig::disabled().byte() & 1, 0);
    assert_eq!(LpiConfig::from_byte(0x43), LpiConfig::enabled(0x40));
    let mem = ModelMemory::new();
    let tables = LpiTables::new(&mem, 14).unwrap();
    assert_eq!(mem.live_pages(), 2, "8192 LPIs: 8 KiB");
    tables
        .set(Lpi::new(8192).unwrap(), LpiConfig::enabled(0x10))
        .unwrap();
    tables
        .set(Lpi::new(8199).unwrap(), LpiConfig::enabled(0xf0))
        .unwrap();
    tables
        .set(Lpi::new(16383).unwrap(), LpiConfig::enabled(0x80))
        .unwrap();
    assert_eq!(
        tables.get(Lpi::new(8199).unwrap()),
        Ok(LpiConfig::enabled(0xf0))
    );
    let mut bytes = [0u8; 8];
    mem.peek(tables.base(), &mut bytes);
    assert_eq!(
        bytes,
        [0x13, 0, 0, 0, 0, 0, 0, 0xf3],
        "byte n is LPI 8192 + n"
    );
    assert_eq!(
        tables.set(Lpi::new(16384).unwrap(), LpiConfig::disabled()),
        Err(RedistError::LpiOutOfRange {
            lpi: 16384,
            limit: 16384
        })
    );
    assert_eq!(
        LpiTables::new(&mem, 13).err().map(|e| e.to_string()),
        Some(RedistError::IdBitsOutOfRange(13).to_string())
    );
    tables.free();
    assert_eq!(mem.live_pages(), 0);
    mem.fail_allocation_after(Some(0));
    assert!(matches!(
        LpiTables::new(&mem, 16).err(),
        Some(RedistError::OutOfMemory { .. })
    ));
}

#[test]
fn enabling_lpis_programs_both_tables_then_enable() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    let tables = LpiTables::new(&mem, 16).unwrap();
    let frame = find_frame(&redist, redist.region_bytes(), Affinity(1)).unwrap();
    let mut rd = Redistributor::new(&redist, &mem, frame);
    rd.enable_lpis(&tables).unwrap();
    assert!(redist.violations().is_empty(), "{:?}", redist.violations());
    assert!(redist.lpis_enabled(1) && !redist.lpis_enabled(0));
    let prop = redist.propbaser(1);
    assert_eq!(prop & baser::ID_BITS_MASK, 15, "IDbits = 16 - 1");
    assert_eq!(prop & baser::PROP_ADDR_MASK, tables.base().as_u64());
    assert_eq!(
        (prop & baser::INNER_CACHE_MASK) >> baser::INNER_CACHE_SHIFT,
        cache::WRITE_BACK
    );
    let pend = redist.pendbaser(1) & baser::PEND_ADDR_MASK;
    assert_eq!(pend % 0x1_0000, 0, "64 KiB aligned pending table");
    assert_eq!(rd.pending_table().map(|p| p.as_u64()), Some(pend));
    // 2^16 INTIDs, one bit each: 8 KiB in one aligned run.
    assert!(mem.contiguous_runs().contains(&(PhysAddr::new(pend), 2)));
    assert!(rd.coherent());
    // Again: nothing to do.
    rd.enable_lpis(&tables).unwrap();
    assert!(redist.violations().is_empty());
    // Pending bits as the redistributor sets them.
    assert!(!rd.lpi_pending(Lpi::new(8200).unwrap()));
    redist.deliver(1, 8200);
    assert!(rd.lpi_pending(Lpi::new(8200).unwrap()));
    assert!(!rd.lpi_pending(Lpi::new(8201).unwrap()));
    assert!(
        !rd.lpi_pending(Lpi::new(1 << 16).unwrap()),
        "beyond the table"
    );
}

#[test]
fn lpis_firmware_enabled_are_reported_not_reprogrammed() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    redist.preset_firmware_lpis(0, 0x7000_000f, 0x7001_0000);
    let tables = LpiTables::new(&mem, 16).unwrap();
    let live = mem.live_pages();
    let frame = walk_frames(&redist, redist.region_bytes()).unwrap()[0];
    let mut rd = Redistributor::new(&redist, &mem, frame);
    assert_eq!(
        rd.enable_lpis(&tables),
        Err(RedistError::LpisEnabledByFirmware {
            affinity: Affinity(0),
            propbaser: 0x7000_000f,
            pendbaser: 0x7001_0000
        })
    );
    assert_eq!(mem.live_pages(), live, "nothing allocated");
    assert_eq!(
        redist.propbaser(0),
        0x7000_000f,
        "firmware's tables untouched"
    );
    assert!(redist.violations().is_empty());
    let clock = ModelClock::new(1_000);
    // Where EnableLPIs cannot be cleared, that is reported too.
    assert_eq!(
        rd.disable_lpis(&clock, 1_000_000),
        Err(RedistError::CannotDisableLpis(Affinity(0)))
    );
    // Where it can, Sluice's tables replace firmware's.
    redist.set_lpis_clearable(true);
    rd.disable_lpis(&clock, 1_000_000).unwrap();
    rd.enable_lpis(&tables).unwrap();
    assert_eq!(
        redist.propbaser(0) & baser::PROP_ADDR_MASK,
        tables.base().as_u64()
    );
    assert!(redist.violations().is_empty(), "{:?}", redist.violations());
    // Disabling frees the pending table.
    let pages = mem.live_pages();
    rd.disable_lpis(&clock, 1_000_000).unwrap();
    assert_eq!(mem.live_pages(), pages - 2);
    assert_eq!(rd.pending_table(), None);
}

#[test]
fn redistributors_without_lpis_or_memory_are_refused_cleanly() {
    let mem = ModelMemory::new();
    let mut spec = RedistSpec::qemu(0);
    spec.physical_lpis = false;
    let redist = RedistModel::new(&mem, 0x080a_0000, 16, &[spec]);
    let tables = LpiTables::new(&mem, 16).unwrap();
    let frame = walk_frames(&redist, redist.region_bytes()).unwrap()[0];
    let mut rd = Redistributor::new(&redist, &mem, frame);
    assert_eq!(
        rd.enable_lpis(&tables),
        Err(RedistError::NoPhysicalLpis(Affinity(0)))
    );
    let redist = RedistModel::qemu(&mem, 1);
    let frame = walk_frames(&redist, redist.region_bytes()).unwrap()[0];
    let mut rd = Redistributor::new(&redist, &mem, frame);
    let live = mem.live_pages();
    mem.fail_allocation_after(Some(0));
    assert_eq!(
        rd.enable_lpis(&tables),
        Err(RedistError::OutOfMemory {
            what: "LPI pending table",
            bytes: 8192
        })
    );
    assert_eq!(mem.live_pages(), live);
    assert!(!redist.lpis_enabled(0));
    assert_eq!(redist.propbaser(0), 0);
}

#[test]
fn a_non_snooping_redistributor_gets_non_cacheable_tables() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 1);
    redist.set_non_shareable(true);
    let tables = LpiTables::new(&mem, 16).unwrap();
    let frame = walk_frames(&redist, redist.region_bytes()).unwrap()[0];
    let mut rd = Redistributor::new(&redist, &mem, frame);
    rd.enable_lpis(&tables).unwrap();
    assert!(!rd.coherent());
    let prop = redist.propbaser(0);
    assert_eq!(
        (prop & baser::INNER_CACHE_MASK) >> baser::INNER_CACHE_SHIFT,
        cache::NON_CACHEABLE
    );
    assert_eq!(
        (redist.pendbaser(0) & baser::INNER_CACHE_MASK) >> baser::INNER_CACHE_SHIFT,
        cache::NON_CACHEABLE
    );
}

#[test]
fn a_sleeping_redistributor_is_woken() {
    let mem = ModelMemory::new();
    let redist = RedistModel::qemu(&mem, 2);
    redist.put_to_sleep(1);
    let frame = find_frame(&redist, redist.region_bytes(), Affinity(1)).unwrap();
    let rd = Redistributor::new(&redist, &mem, frame);
    let clock = ModelClock::new(1_000);
    rd.wake(&clock, 1_000_000).unwrap();
    assert!(redist.awake(1));
}

#[test]
fn the_distributor_model_reports_qemu_lpi_support() {
    let d = DistributorInfo::read(&DistModel::qemu());
    assert!(d.lpis && d.affinity_routing);
    assert_eq!(d.lpi_id_bits(16), Ok(16));
}
