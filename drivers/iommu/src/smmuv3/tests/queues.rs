//! The command queue: wrap-around, a full queue, CMD_SYNC completion by
//! CONS and by MSI, timeouts, and recovery from refused commands (Arm IHI
//! 0070, 3.5, 4.7.3, 7.1).

use alloc::vec::Vec;

use sluice_hal::DmaMemory;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::MapPerms;
use crate::smmuv3::commands::Command;
use crate::smmuv3::model::{Cmd, ModelEvent, Stuck};
use crate::smmuv3::unit::SmmuDomainConfig;
use crate::smmuv3::{CommandErrorKind, SmmuError};

fn asid_commands(n: u16) -> Vec<Command> {
    (0..n).map(|a| Command::tlbi_nh_asid(0, a)).collect()
}

#[test]
fn many_commands_wrap_the_queue_in_order() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    model.clear_events();
    // 256-entry queue: 700 commands plus syncs wrap it nearly three times.
    for chunk in asid_commands(700).chunks(233) {
        unit.submit_commands(chunk).unwrap();
    }
    let asids: Vec<u16> = model
        .commands()
        .iter()
        .filter_map(|c| match c {
            Cmd::TlbiNhAsid { asid, .. } => Some(*asid),
            _ => None,
        })
        .collect();
    assert_eq!(asids, (0..700).collect::<Vec<u16>>());
    // One batch larger than the queue.
    unit.submit_commands(&asid_commands(600)).unwrap();
    assert_eq!(
        model
            .commands()
            .iter()
            .filter(|c| matches!(c, Cmd::Sync { .. }))
            .count(),
        5,
        "four chunks and one large batch"
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn a_slow_consumer_fills_the_queue_without_overflow() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    // Three commands consumed per CMDQ_CONS read.
    model.set_throttle(Some(3));
    model.clear_events();
    unit.submit_commands(&asid_commands(500)).unwrap();
    assert_eq!(model.commands().len(), 501);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    // Normal operation continues through the throttled queue.
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(dom, 0, phys(0x1000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    assert_eq!(model.dma(read(SID_A, 0)).unwrap().phys, phys(0x1000));
}

#[test]
fn cmd_sync_that_never_completes_times_out() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(dom, 0, phys(0x1000), 0x20_0000, MapPerms::READ_WRITE)
        .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    model.set_stuck(Stuck {
        sync: true,
        ..Stuck::default()
    });
    assert!(matches!(
        unit.submit_commands(&[]),
        Err(SmmuError::Timeout {
            what: "CMD_SYNC",
            ..
        })
    ));
    // An unmap whose invalidation cannot complete keeps its tables out
    // of use.
    let r = unit.unmap(dom, 0, 0x20_0000);
    assert!(matches!(r, Err(SmmuError::Timeout { .. })), "{r:?}");
    assert!(unit.quarantined_pages() > 0);
    // Once the SMMU recovers, a full invalidation releases them.
    model.set_stuck(Stuck::default());
    let live = mem.live_pages();
    unit.flush_all().unwrap();
    assert_eq!(unit.quarantined_pages(), 0);
    assert!(mem.live_pages() < live);
}

#[test]
fn illegal_command_is_replaced_and_the_queue_restarts() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    model.clear_events();
    let bad = Command::from_words([0xff, 0]);
    let r = unit.submit_commands(&[
        Command::tlbi_nh_asid(0, 1),
        bad,
        Command::tlbi_nh_asid(0, 2),
    ]);
    // Init used 3 entries (CFGI_ALL, TLBI_NSNH_ALL, SYNC): the bad one is
    // entry 4.
    assert_eq!(
        r,
        Err(SmmuError::CommandError {
            kind: CommandErrorKind::Illegal,
            index: 4,
            command: [0xff, 0],
        })
    );
    assert_eq!(model.active_global_errors(), 0, "CMDQ_ERR acknowledged");
    let events = model.events();
    assert!(events.contains(&ModelEvent::CommandError { index: 4, code: 1 }));
    assert_eq!(
        model.commands(),
        [
            Cmd::TlbiNhAsid { vmid: 0, asid: 1 },
            // The replacement.
            Cmd::Sync { msi: None },
            Cmd::TlbiNhAsid { vmid: 0, asid: 2 },
            Cmd::Sync { msi: None },
        ]
    );
    // Later commands run normally.
    unit.submit_commands(&[Command::tlbi_nh_asid(0, 3)])
        .unwrap();
    // Stage-2 commands on a stage-1-only SMMU are illegal too.
    let r = unit.submit_commands(&[Command::tlbi_s12_vmall(1)]);
    assert!(matches!(
        r,
        Err(SmmuError::CommandError {
            kind: CommandErrorKind::Illegal,
            ..
        })
    ));
    // A one-page range without a level hint is reserved (4.4.1.1).
    let reserved = Command::from_words([
        Command::tlbi_nh_va(0, 1, 0, true, None).words()[0],
        0x1 | (0b01 << 10),
    ]);
    assert!(unit.submit_commands(&[reserved]).is_err());
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn command_fetch_abort_is_reported_and_recovered() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    // Reads of the next slot (index 3) abort on the interconnect.
    let slot = unit.command_queue().as_u64() + 3 * 16;
    model.add_abort_range(slot, slot + 16);
    let r = unit.submit_commands(&[Command::tlbi_nh_asid(0, 1)]);
    // The fault is persistent: each restart hits CERROR_ABT again, the
    // driver keeps repairing the slot and gives up after its timeout.
    assert!(
        matches!(
            r,
            Err(SmmuError::Timeout {
                what: "CMD_SYNC",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        model
            .events()
            .iter()
            .any(|e| matches!(e, ModelEvent::CommandError { code: 2, .. }))
    );
}

#[test]
fn msi_completion_writes_increasing_values() {
    let mem = ModelMemory::new();
    let idr = IdrBuilder {
        msi: true,
        ..IdrBuilder::qemu_7_2()
    };
    let model = SmmuModel::new(&mem, idr);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    assert!(unit.uses_msi_sync());
    unit.submit_commands(&[]).unwrap();
    unit.submit_commands(&[]).unwrap();
    let syncs: Vec<(u64, u32)> = model
        .commands()
        .iter()
        .filter_map(|c| match c {
            Cmd::Sync { msi: Some(m) } => Some(*m),
            _ => None,
        })
        .collect();
    assert_eq!(syncs.len(), 3, "init and two submissions");
    assert_eq!(syncs.iter().map(|s| s.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(syncs.iter().all(|s| s.0 == syncs[0].0));
    assert_eq!(mem.read_u32(phys(syncs[0].0)), 3);
    // Without MSI support, or when asked not to, CONS is polled.
    let cfg = crate::smmuv3::SmmuConfig {
        msi_sync: false,
        ..config()
    };
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, idr);
    let unit = init_with(&model, &mem, &clock, cfg);
    assert!(!unit.uses_msi_sync());
}

/// An attach whose STE invalidation never completes leaves the stream
/// aborting in memory (the new STE was written before the CMD_SYNC), so
/// the domain can be freed once a global invalidation succeeded, and the
/// stream attaches normally afterwards.
#[test]
fn attach_whose_invalidation_fails_leaves_the_stream_aborting() {
    use crate::smmuv3::structs::SteConfig;
    use crate::smmuv3::unit::StreamTableRequest;
    use crate::smmuv3::walker::WalkError;
    for stage in [SmmuDomainConfig::stage1(), SmmuDomainConfig::stage2()] {
        let mem = ModelMemory::new();
        let model = SmmuModel::new(&mem, both_stages());
        let clock = clock();
        // Linear: no level-2 table whose own invalidation would fail first.
        let config = crate::smmuv3::SmmuConfig {
            stream_table: StreamTableRequest::Linear,
            ..config()
        };
        let mut unit = init_with(&model, &mem, &clock, config);
        let base = mem.live_pages();
        let dom = unit.alloc_domain(stage).unwrap();
        unit.map(dom, 0, phys(0x1000), 0x1000, MapPerms::READ_WRITE)
            .unwrap();
        model.set_stuck(Stuck {
            sync: true,
            ..Stuck::default()
        });
        let r = unit.attach_stream(SID_A, dom);
        assert!(matches!(r, Err(SmmuError::Timeout { .. })), "{r:?}");
        assert_eq!(unit.stream_domain(SID_A), None);
        let ste = unit.read_ste(SID_A).unwrap();
        assert!(
            !ste.valid() || ste.config() == SteConfig::Abort,
            "{stage:?}: the failed STE stayed in memory: {ste:?}"
        );
        model.set_stuck(Stuck::default());
        unit.flush_all().unwrap();
        assert!(
            matches!(model.dma(read(SID_A, 0)), Err(WalkError::Abort)),
            "{stage:?}: the stream still translates"
        );
        unit.free_domain(dom).unwrap();
        // It attaches normally afterwards, and detaching gives back every
        // page the failed attach made.
        let dom = unit.alloc_domain(stage).unwrap();
        unit.map(dom, 0, phys(0x1000), 0x1000, MapPerms::READ_WRITE)
            .unwrap();
        unit.attach_stream(SID_A, dom).unwrap();
        assert_eq!(model.dma(read(SID_A, 0)).unwrap().phys, phys(0x1000));
        unit.detach_stream(SID_A).unwrap();
        unit.free_domain(dom).unwrap();
        assert_eq!(mem.live_pages(), base, "{stage:?}");
        assert!(model.violations().is_empty(), "{:?}", model.violations());
    }
}
