//! Domains, attach/detach and map/unmap, checked by DMA through the model
//! (whose caches only the right invalidations empty) and against the
//! independent walker.

use alloc::vec::Vec;

use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::MapPerms;
use crate::smmuv3::events::EventKind;
use crate::smmuv3::model::{Cmd, ModelEvent};
use crate::smmuv3::unit::SmmuDomainConfig;
use crate::smmuv3::walker::{self, MemFetch, WalkError};
use crate::smmuv3::{SmmuError, Stage};

const MIB: u64 = 1 << 20;

fn fault_kind(r: Result<crate::smmuv3::model::DmaOutcome, WalkError>) -> Option<EventKind> {
    match r {
        Err(WalkError::Fault(f)) => Some(f.kind),
        _ => None,
    }
}

#[test]
fn stage1_translation_through_the_walker() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::any()).unwrap();
    assert_eq!(unit.domain_info(dom).unwrap().stage, Stage::Stage1);
    // A 2 MiB block and a 4 KiB page after it, and a read-only page.
    unit.map(
        dom,
        0x20_0000,
        phys(0x8000_0000),
        2 * MIB + 0x1000,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    unit.map(dom, 0x100_0000, phys(0x9000_0000), 0x1000, MapPerms::READ)
        .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    assert_eq!(unit.stream_domain(SID_A), Some(dom));

    let cases = [
        (0x20_0000u64, 0x8000_0000u64),
        (0x2f_f123, 0x800f_f123),
        (0x40_0abc, 0x8020_0abc),
    ];
    for (iova, pa) in cases {
        let out = model.dma(write(SID_A, iova)).unwrap();
        assert_eq!(out.phys, phys(pa), "{iova:#x}");
        // The uncached walk from memory agrees.
        let t = walker::translate(
            &MemFetch(&mem),
            &model.walker_config(),
            &model.stream_table(),
            &write(SID_A, iova),
        )
        .unwrap();
        assert_eq!(t.phys, pa);
        assert!(t.trace.l1std.is_some() && t.trace.cd.is_some());
    }
    let block = walker::translate(
        &MemFetch(&mem),
        &model.walker_config(),
        &model.stream_table(),
        &read(SID_A, 0x30_0000),
    )
    .unwrap();
    assert_eq!(block.s1.unwrap().size, 2 * MIB);
    // Second access hits the TLB.
    assert!(model.dma(read(SID_A, 0x20_0040)).unwrap().cached);
    // Read-only page: reads pass, writes fault.
    assert_eq!(
        model.dma(read(SID_A, 0x100_0008)).unwrap().phys,
        phys(0x9000_0008)
    );
    assert_eq!(
        fault_kind(model.dma(write(SID_A, 0x100_0008))),
        Some(EventKind::Permission)
    );
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 0x5000_0000))),
        Some(EventKind::Translation)
    );
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 1 << 48))),
        Some(EventKind::Translation),
        "beyond T0SZ"
    );
    // Another StreamID in the same level-2 table still aborts silently.
    assert_eq!(model.dma(read(SID_A + 1, 0x20_0000)), Err(WalkError::Abort));
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn stage2_translation_and_refusal_without_stage2() {
    let mem = ModelMemory::new();
    let clock = clock();
    {
        let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
        let mut unit = init(&model, &mem, &clock);
        assert_eq!(
            unit.alloc_domain(SmmuDomainConfig::stage2()),
            Err(SmmuError::StageUnsupported(Stage::Stage2))
        );
    }
    let model = SmmuModel::new(&mem, both_stages());
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    unit.map(
        dom,
        0x4000_0000,
        phys(0x1_2340_0000),
        4 * MIB,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    unit.map(
        dom,
        0x8000_0000,
        phys(0x7000),
        0x1000,
        MapPerms::new(false, true, false),
    )
    .unwrap();
    unit.attach_stream(SID_B, dom).unwrap();
    let out = model.dma(read(SID_B, 0x4012_3456)).unwrap();
    assert_eq!(out.phys, phys(0x1_2352_3456));
    assert_eq!(
        model.dma(write(SID_B, 0x8000_0010)).unwrap().phys,
        phys(0x7010)
    );
    let r = model.dma(read(SID_B, 0x8000_0010));
    assert!(
        matches!(r, Err(WalkError::Fault(f)) if f.kind == EventKind::Permission && f.stage2 && f.ipa == Some(0x8000_0010)),
        "write-only page: {r:?}"
    );
    let r = model.dma(read(SID_B, 1 << 44));
    assert!(
        matches!(r, Err(WalkError::Fault(f)) if f.kind == EventKind::Translation && f.stage2),
        "beyond the IPA size: {r:?}"
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

/// A doorbell mapped as device memory gets Device-nGnRE attributes, RAM
/// stays Normal write-back: stage 1 through the CD's MAIR index, stage 2
/// through MemAttr.
#[test]
fn device_memory_mappings_get_device_attributes() {
    use crate::smmuv3::MemoryKind;
    use crate::smmuv3::structs::mair;
    let mem = ModelMemory::new();
    let clock = clock();
    let model = SmmuModel::new(&mem, both_stages());
    let mut unit = init(&model, &mem, &clock);
    let walk = |sid, iova| {
        walker::translate(
            &MemFetch(&mem),
            &model.walker_config(),
            &model.stream_table(),
            &write(sid, iova),
        )
        .unwrap()
    };
    let s1 = unit.alloc_domain(SmmuDomainConfig::any()).unwrap();
    let s2 = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    for dom in [s1, s2] {
        unit.map(
            dom,
            0x10_0000,
            phys(0x4000_0000),
            0x1000,
            MapPerms::READ_WRITE,
        )
        .unwrap();
        unit.map_memory(
            dom,
            0x800_0000,
            phys(0x809_0000),
            0x1000,
            MapPerms::READ_WRITE,
            MemoryKind::Device,
        )
        .unwrap();
    }
    unit.attach_stream(SID_A, s1).unwrap();
    unit.attach_stream(SID_B, s2).unwrap();
    let ram = walk(SID_A, 0x10_0000);
    let doorbell = walk(SID_A, 0x800_0040);
    assert_eq!(doorbell.phys, 0x809_0040);
    assert_eq!(ram.s1.unwrap().memory_attr, mair::INDEX_NORMAL);
    assert_eq!(doorbell.s1.unwrap().memory_attr, mair::INDEX_DEVICE);
    // The index selects Device-nGnRE in the MAIR Sluice programs.
    assert_eq!((mair::VALUE >> (8 * mair::INDEX_DEVICE)) & 0xff, 0x04);
    let ram = walk(SID_B, 0x10_0000);
    let doorbell = walk(SID_B, 0x800_0040);
    assert_eq!(doorbell.phys, 0x809_0040);
    assert_eq!(ram.s2.unwrap().memory_attr, 0b1111, "Normal write-back");
    assert_eq!(doorbell.s2.unwrap().memory_attr, 0b0001, "Device-nGnRE");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn unmap_invalidates_by_range_and_frees_tables_after_sync() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    let asid = unit.domain_info(dom).unwrap().tag;
    unit.map(
        dom,
        0x10_0000,
        phys(0x5000_0000),
        64 * 0x1000,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    for page in 0..64u64 {
        model.dma(read(SID_A, 0x10_0000 + page * 0x1000)).unwrap();
    }
    assert!(model.tlb_entries() >= 64);
    model.clear_events();
    // Unmap 40 pages out of the middle: one range TLBI, then SYNC.
    let changed = unit.unmap(dom, 0x10_8000, 40 * 0x1000).unwrap();
    assert_eq!(changed, 40 * 0x1000);
    let cmds = model.commands();
    assert_eq!(
        cmds,
        [
            Cmd::TlbiNhVa {
                vmid: 0,
                asid,
                addr: 0x10_8000,
                pages: 40,
                leaf: true
            },
            Cmd::Sync { msi: None }
        ]
    );
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 0x10_8000))),
        Some(EventKind::Translation)
    );
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 0x12_f000))),
        Some(EventKind::Translation)
    );
    assert!(model.dma(read(SID_A, 0x13_0000)).is_ok());
    assert!(model.dma(read(SID_A, 0x10_7000)).is_ok());
    // Unmapping the rest empties the tables: non-leaf invalidation, and
    // the tables are freed once the SYNC completed.
    let before = unit.domain_info(dom).unwrap().table_pages;
    assert_eq!(before, 4);
    model.clear_events();
    unit.unmap(dom, 0, 1 << 30).unwrap();
    assert_eq!(unit.domain_info(dom).unwrap().table_pages, 1);
    let cmds = model.commands();
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Cmd::TlbiNhVa { leaf: false, .. })),
        "{cmds:?}"
    );
    assert_eq!(cmds.last(), Some(&Cmd::Sync { msi: None }));
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 0x13_0000))),
        Some(EventKind::Translation)
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn without_range_invalidation_pages_are_invalidated_one_by_one() {
    let mem = ModelMemory::new();
    let idr = IdrBuilder {
        ril: false,
        ..both_stages()
    };
    let model = SmmuModel::new(&mem, idr);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    let vmid = unit.domain_info(dom).unwrap().tag;
    unit.map(dom, 0, phys(0x10_0000), 8 * 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    model.dma(read(SID_A, 0x3000)).unwrap();
    model.clear_events();
    unit.unmap(dom, 0x2000, 3 * 0x1000).unwrap();
    let cmds = model.commands();
    let ipas: Vec<u64> = cmds
        .iter()
        .filter_map(|c| match c {
            Cmd::TlbiS2Ipa {
                vmid: v,
                addr,
                pages: 1,
                leaf: true,
            } if *v == vmid => Some(*addr),
            _ => None,
        })
        .collect();
    assert_eq!(ipas, [0x2000, 0x3000, 0x4000]);
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 0x3000))),
        Some(EventKind::Translation)
    );
    // A large unmap becomes one VMID-wide invalidation.
    unit.map(
        dom,
        0x10_0000,
        phys(0x20_0000),
        64 * 0x1000,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    model.clear_events();
    unit.unmap(dom, 0, 1 << 30).unwrap();
    assert!(model.commands().contains(&Cmd::TlbiS12Vmall { vmid }));
}

#[test]
fn superpage_split_uses_break_before_make() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(
        dom,
        0x4000_0000,
        phys(0x8000_0000),
        2 * MIB,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    model.dma(read(SID_A, 0x4000_0000)).unwrap();
    model.clear_events();
    unit.unmap(dom, 0x4010_0000, 0x1000).unwrap();
    let cmds = model.commands();
    // The whole block is invalidated (break), synced, then the one page.
    assert!(
        matches!(
            cmds[0],
            Cmd::TlbiNhVa {
                addr: 0x4000_0000,
                pages: 512,
                ..
            }
        ),
        "{cmds:?}"
    );
    assert_eq!(cmds[1], Cmd::Sync { msi: None });
    assert_eq!(
        fault_kind(model.dma(read(SID_A, 0x4010_0000))),
        Some(EventKind::Translation)
    );
    assert_eq!(
        model.dma(read(SID_A, 0x4010_1000)).unwrap().phys,
        phys(0x8010_1000)
    );
    assert_eq!(
        unit.translate(dom, 0x401f_f000).unwrap().unwrap().0,
        phys(0x801f_f000)
    );

    // With BBML = 2 the split needs no invalidation in between.
    let mem = ModelMemory::new();
    let model = SmmuModel::new(
        &mem,
        IdrBuilder {
            bbml: 2,
            ..IdrBuilder::qemu_7_2()
        },
    );
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(
        dom,
        0x4000_0000,
        phys(0x8000_0000),
        2 * MIB,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    model.clear_events();
    unit.unmap(dom, 0x4010_0000, 0x1000).unwrap();
    let cmds = model.commands();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(matches!(
        cmds[0],
        Cmd::TlbiNhVa {
            addr: 0x4010_0000,
            pages: 1,
            leaf: false,
            ..
        }
    ));
}

#[test]
fn level2_stream_tables_come_and_go_on_demand() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let base = mem.live_pages();
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(dom, 0, phys(0x6000_0000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    // The absent level-2 table was seen (and cached) before the attach.
    assert_eq!(
        fault_kind(model.dma(read(SID_B, 0))),
        Some(EventKind::BadStreamId)
    );
    unit.attach_stream(SID_B, dom).unwrap();
    let l2 = unit.level2_table(SID_B).expect("allocated on demand");
    assert!(
        unit.level2_table(SID_A).is_none(),
        "other tables stay absent"
    );
    // The cached Span-0 L1STD was invalidated: the new table is used.
    assert_eq!(
        model.dma(read(SID_B, 0x10)).unwrap().phys,
        phys(0x6000_0010)
    );
    assert!(model.commands().contains(&Cmd::CfgiSte {
        sid: SID_B,
        leaf: false
    }));
    // Neighbours in the new table abort without an event.
    assert_eq!(model.dma(read(SID_B + 1, 0)), Err(WalkError::Abort));
    unit.attach_stream(SID_A, dom).unwrap();
    assert_ne!(unit.level2_table(SID_A), Some(l2));
    assert_eq!(
        mem.live_pages(),
        base + 4 + 2 + 2,
        "4 page-table pages, 2 level-2 tables, 2 CD tables"
    );

    unit.detach_stream(SID_B).unwrap();
    assert!(
        unit.level2_table(SID_B).is_none(),
        "freed with its last stream"
    );
    assert!(!mem.is_live(l2));
    assert!(model.commands().contains(&Cmd::CfgiSteRange {
        sid: SID_B & !63,
        range: 5
    }));
    assert_eq!(
        fault_kind(model.dma(read(SID_B, 0))),
        Some(EventKind::BadStreamId)
    );
    unit.detach_stream(SID_A).unwrap();
    assert_eq!(unit.detach_stream(SID_A), Err(SmmuError::NotAttached));
    assert_eq!(
        unit.attach_stream(0x8000, dom),
        Err(SmmuError::StreamOutOfRange {
            sid: 0x8000,
            limit: 0x8000
        })
    );
    unit.free_domain(dom).unwrap();
    assert_eq!(mem.live_pages(), base, "nothing leaked");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn moving_a_stream_goes_through_abort_and_stays_consistent() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let a = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    let b = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    let c = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(a, 0x1000, phys(0xa000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.map(b, 0x1000, phys(0xb000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.map(c, 0x1000, phys(0xc000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, a).unwrap();
    assert_eq!(model.dma(read(SID_A, 0x1000)).unwrap().phys, phys(0xa000));
    unit.attach_stream(SID_A, b).unwrap();
    assert_eq!(model.dma(read(SID_A, 0x1000)).unwrap().phys, phys(0xb000));
    unit.attach_stream(SID_A, c).unwrap();
    assert_eq!(model.dma(read(SID_A, 0x1000)).unwrap().phys, phys(0xc000));
    unit.attach_stream(SID_A, c).unwrap();
    assert_eq!(unit.free_domain(c), Err(SmmuError::DomainInUse(c.0)));
    assert!(unit.domain_info(a).unwrap().table_pages >= 1);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn freed_asids_are_invalidated_before_reuse() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let first = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    let asid = unit.domain_info(first).unwrap().tag;
    unit.map(first, 0x1000, phys(0x11_1000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, first).unwrap();
    model.dma(read(SID_A, 0x1000)).unwrap();
    unit.detach_stream(SID_A).unwrap();
    model.clear_events();
    unit.free_domain(first).unwrap();
    assert_eq!(
        model.commands(),
        [Cmd::TlbiNhAsid { vmid: 0, asid }, Cmd::Sync { msi: None }]
    );
    let second = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    assert_eq!(unit.domain_info(second).unwrap().tag, asid, "ASID reused");
    unit.map(
        second,
        0x1000,
        phys(0x22_2000),
        0x1000,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    unit.attach_stream(SID_A, second).unwrap();
    let out = model.dma(read(SID_A, 0x1000)).unwrap();
    assert_eq!(out.phys, phys(0x22_2000), "no stale translation");
    assert!(!out.cached);
    assert_eq!(
        unit.free_domain(first),
        Err(SmmuError::NoSuchDomain(first.0))
    );
}

#[test]
fn no_pages_leak_after_freeing_domains() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let base = mem.live_pages();
    let mut doms = Vec::new();
    for i in 0..4u64 {
        let cfg = if i % 2 == 0 {
            SmmuDomainConfig::stage1()
        } else {
            SmmuDomainConfig::stage2()
        };
        let d = unit.alloc_domain(cfg).unwrap();
        unit.map(d, i << 30, phys(0x1000_0000), 3 * MIB, MapPerms::READ_WRITE)
            .unwrap();
        unit.attach_stream(0x40 * i as u32, d).unwrap();
        doms.push(d);
    }
    unit.attach_substream(0, 7, doms[2]).unwrap();
    for (i, &d) in doms.iter().enumerate() {
        unit.unmap(d, (i as u64) << 30, MIB).unwrap();
    }
    unit.detach_substream(0, 7).unwrap();
    for i in 0..4u32 {
        unit.detach_stream(0x40 * i).unwrap();
    }
    for d in doms {
        unit.free_domain(d).unwrap();
    }
    assert_eq!(unit.quarantined_pages(), 0);
    assert_eq!(mem.live_pages(), base);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    assert!(
        !model
            .events()
            .iter()
            .any(|e| matches!(e, ModelEvent::CommandError { .. }))
    );
}

#[test]
fn non_coherent_smmu_sees_every_write_cleaned() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::server()).check_flushes(&mem);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let s1 = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    let s2 = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    unit.map(
        s1,
        0x40_0000,
        phys(0x9000_0000),
        4 * MIB,
        MapPerms::READ_WRITE,
    )
    .unwrap();
    unit.map(s2, 0x1000, phys(0x7000_0000), 0x3000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, s1).unwrap();
    unit.attach_substream(SID_A, 0x3000, s1).unwrap();
    unit.attach_stream(SID_B, s2).unwrap();
    assert!(
        mem.unflushed_words().is_empty(),
        "{:?}",
        mem.unflushed_words()
    );
    assert_eq!(
        model.dma(write(SID_A, 0x40_1234)).unwrap().phys,
        phys(0x9000_1234)
    );
    assert_eq!(
        model
            .dma(read(SID_A, 0x50_0000).with_ssid(0x3000))
            .unwrap()
            .phys,
        phys(0x9010_0000)
    );
    assert_eq!(
        model.dma(read(SID_B, 0x2008)).unwrap().phys,
        phys(0x7000_1008)
    );
    unit.unmap(s1, 0x40_0000, 0x1000).unwrap();
    unit.unmap(s2, 0x1000, 0x3000).unwrap();
    unit.detach_substream(SID_A, 0x3000).unwrap();
    unit.detach_stream(SID_A).unwrap();
    assert!(
        mem.unflushed_words().is_empty(),
        "{:?}",
        mem.unflushed_words()
    );
    // The flush log shows the structures: stream table pages, STEs, CDs,
    // queue slots and page-table entries.
    let flushes = mem.flushes();
    assert!(flushes.iter().any(|&(_, len)| len == 16), "command slots");
    assert!(
        flushes.iter().any(|&(_, len)| len == 56),
        "STE/CD words 1-7"
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn allocation_failures_leave_everything_working_and_nothing_leaked() {
    // Each step of a full setup, failing at every allocation in turn.
    for fail_at in 0..40u64 {
        let mem = ModelMemory::new();
        let model = SmmuModel::new(&mem, both_stages());
        let clock = clock();
        let mut unit = init(&model, &mem, &clock);
        let base = mem.live_pages();
        let keep = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
        unit.map(keep, 0x1000, phys(0x5000), 0x1000, MapPerms::READ_WRITE)
            .unwrap();
        unit.attach_stream(0x5, keep).unwrap();
        mem.fail_allocation_after(Some(fail_at));
        let result: Result<(), SmmuError> = (|| {
            let d = unit.alloc_domain(SmmuDomainConfig::stage1())?;
            unit.map(d, 0x20_0000, phys(0x20_0000), 0x1000, MapPerms::READ_WRITE)?;
            unit.attach_stream(SID_B, d)?;
            unit.attach_substream(SID_B, 0x80, d)?;
            unit.attach_substream(0x5, 0x41, d)?;
            Ok(())
        })();
        mem.fail_allocation_after(None);
        if let Err(e) = result {
            assert_eq!(e, SmmuError::OutOfMemory, "failing allocation {fail_at}");
        }
        // What was set up before still translates.
        assert_eq!(
            model.dma(read(0x5, 0x1000)).unwrap().phys,
            phys(0x5000),
            "failing allocation {fail_at}"
        );
        assert!(model.violations().is_empty(), "{:?}", model.violations());
        // Tear everything down: no page may be left.
        for (sid, ssid) in [(SID_B, 0x80), (0x5, 0x41)] {
            let _ = unit.detach_substream(sid, ssid);
        }
        for sid in [SID_B, 0x5] {
            let _ = unit.detach_stream(sid);
        }
        for id in 1..8 {
            let _ = unit.free_domain(crate::smmuv3::SmmuDomainId(id));
        }
        assert_eq!(mem.live_pages(), base, "failing allocation {fail_at}");
        if result.is_ok() {
            return;
        }
    }
    panic!("the setup never completed");
}

#[test]
fn stage2_only_smmu_gives_stage2_domains_and_refuses_stage1() {
    let mem = ModelMemory::new();
    let idr = IdrBuilder {
        stage1: false,
        stage2: true,
        vmid16: false,
        ..IdrBuilder::qemu_7_2()
    };
    let model = SmmuModel::new(&mem, idr);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let base = mem.live_pages();
    assert_eq!(
        unit.alloc_domain(SmmuDomainConfig::stage1()),
        Err(SmmuError::StageUnsupported(Stage::Stage1))
    );
    let d = unit.alloc_domain(SmmuDomainConfig::any()).unwrap();
    let info = unit.domain_info(d).unwrap();
    assert_eq!(info.stage, Stage::Stage2);
    unit.map(d, 0x8000, phys(0x3_0000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, d).unwrap();
    assert_eq!(
        model.dma(write(SID_A, 0x8004)).unwrap().phys,
        phys(0x3_0004)
    );
    unit.unmap(d, 0x8000, 0x1000).unwrap();
    assert_eq!(
        fault_kind(model.dma(write(SID_A, 0x8004))),
        Some(EventKind::Translation)
    );
    unit.detach_stream(SID_A).unwrap();
    unit.free_domain(d).unwrap();
    assert!(
        model
            .commands()
            .contains(&Cmd::TlbiS12Vmall { vmid: info.tag })
    );
    assert_eq!(mem.live_pages(), base);
    assert!(
        !model
            .events()
            .iter()
            .any(|e| matches!(e, ModelEvent::CommandError { .. })),
        "no stage-1 command reached a stage-2-only SMMU"
    );
}
