//! Event records decoded by name and attributed to domains, event-queue
//! overflow, and global errors (Arm IHI 0070, 7.3-7.5).

use alloc::vec::Vec;

use sluice_hal::DmaMemory;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::MapPerms;
use crate::smmuv3::commands::Command;
use crate::smmuv3::events::{Access, EventKind, FaultClass};
use crate::smmuv3::regs::gerror;
use crate::smmuv3::unit::{SmmuDomainConfig, SmmuDomainId};
use crate::smmuv3::walker::{self, MemFetch};
use crate::smmuv3::{SmmuConfig, SmmuError};

/// A stage-1 domain mapping 0x1000 (read-write) and 0x2000 (read-only),
/// attached to SID_A.
fn setup<'a>(
    model: &'a SmmuModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a sluice_hal::model::ModelClock,
    config: SmmuConfig,
) -> (SmmuUnit<'a>, SmmuDomainId) {
    let mut unit = init_with(model, mem, clock, config);
    let dom = unit.alloc_domain(SmmuDomainConfig::any()).unwrap();
    unit.map(dom, 0x1000, phys(0x4000_1000), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    unit.map(dom, 0x2000, phys(0x4000_2000), 0x1000, MapPerms::READ)
        .unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    (unit, dom)
}

fn kinds(unit: &mut SmmuUnit<'_>) -> Vec<EventKind> {
    unit.drain_events()
        .faults
        .iter()
        .map(|f| f.fault.kind)
        .collect()
}

#[test]
fn translation_faults_are_decoded_and_queued_for_their_domain() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let (mut unit, dom) = setup(&model, &mem, &clock, config());
    assert!(model.dma(write(SID_A, 0x9000)).is_err());
    assert!(model.dma(write(SID_A, 0x2008)).is_err());
    assert!(
        model.dma(read(SID_A + 3, 0x1000)).is_err(),
        "aborts silently"
    );
    assert!(model.dma(read(0x7f00, 0x1000)).is_err(), "no level-2 table");
    let drain = unit.drain_events();
    assert!(!drain.overflowed);
    assert_eq!(drain.faults.len(), 3);
    let t = drain.faults[0];
    assert_eq!(t.domain, Some(dom));
    assert_eq!(t.fault.kind, EventKind::Translation);
    assert_eq!(t.fault.stream_id, SID_A);
    assert_eq!(t.fault.substream_id, None);
    assert_eq!(t.fault.address, Some(0x9000));
    assert_eq!(t.fault.access, Some(Access::Write));
    assert!(!t.fault.stage2 && !t.fault.privileged);
    assert_eq!(t.fault.class, Some(FaultClass::Input));
    let p = drain.faults[1].fault;
    assert_eq!((p.kind, p.address), (EventKind::Permission, Some(0x2008)));
    let s = drain.faults[2];
    assert_eq!(s.fault.kind, EventKind::BadStreamId);
    assert_eq!((s.fault.stream_id, s.domain), (0x7f00, None));
    assert_eq!(s.fault.address, None);
    // The domain's owner gets its two.
    let (faults, dropped) = unit.take_domain_faults(dom).unwrap();
    assert_eq!(
        faults.iter().map(|f| f.kind).collect::<Vec<_>>(),
        [EventKind::Translation, EventKind::Permission]
    );
    assert_eq!(dropped, 0);
    assert!(unit.take_domain_faults(dom).unwrap().0.is_empty());
    assert!(unit.drain_events().faults.is_empty());
}

#[test]
fn stage2_faults_carry_the_ipa() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    unit.attach_stream(SID_B, dom).unwrap();
    assert!(model.dma(read(SID_B, 0x1234_5678)).is_err());
    let f = unit.drain_events().faults[0];
    assert_eq!(f.domain, Some(dom));
    assert_eq!(f.fault.kind, EventKind::Translation);
    assert!(f.fault.stage2);
    assert_eq!(f.fault.access, Some(Access::Read));
    assert_eq!(f.fault.ipa, Some(0x1234_5000));
    assert_eq!(f.fault.address, Some(0x1234_5678));
}

#[test]
fn configuration_and_fetch_faults_by_name() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let (mut unit, _dom) = setup(&model, &mem, &clock, config());
    let ste_addr = unit.level2_table(SID_A).unwrap().as_u64() + u64::from(SID_A & 63) * 64;
    let cd = unit.read_cd(SID_A, 0).unwrap();
    let cd_table = unit.read_ste(SID_A).unwrap().s1_context_ptr().as_u64();

    // A leaf without AF, then with an output beyond the 44-bit OAS.
    let walk = walker::translate(
        &MemFetch(&mem),
        &model.walker_config(),
        &model.stream_table(),
        &read(SID_A, 0x1000),
    )
    .unwrap();
    let leaf_table = walk.s1.unwrap().tables.last().unwrap().1;
    let leaf_addr = phys(leaf_table + 8);
    let leaf = mem.read_u64(leaf_addr);
    let refresh = |unit: &mut SmmuUnit<'_>| {
        unit.submit_commands(&[Command::cfgi_all(), Command::tlbi_nsnh_all()])
            .unwrap();
    };
    mem.write_u64(leaf_addr, leaf & !(1 << 10));
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    mem.write_u64(leaf_addr, leaf | (1 << 45));
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    mem.write_u64(leaf_addr, leaf);
    assert_eq!(kinds(&mut unit), [EventKind::Access, EventKind::AddrSize]);

    // An external abort walking the table.
    model.add_abort_range(leaf_table, leaf_table + 4096);
    refresh(&mut unit);
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    let f = unit.drain_events().faults[0].fault;
    assert_eq!(f.kind, EventKind::WalkEabt);
    assert_eq!(f.fetch_address, Some(leaf_table + 8));
    assert_eq!(f.class, Some(FaultClass::TableWalk));

    // An invalid CD, then one whose fetch aborts.
    mem.write_u64(phys(cd_table), cd.words()[0] & !(1 << 31));
    refresh(&mut unit);
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    mem.write_u64(phys(cd_table), cd.words()[0]);
    model.add_abort_range(cd_table, cd_table + 64);
    refresh(&mut unit);
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    let drained = unit.drain_events().faults;
    assert_eq!(drained[0].fault.kind, EventKind::BadCd);
    assert_eq!(drained[1].fault.kind, EventKind::CdFetch);
    assert_eq!(drained[1].fault.fetch_address, Some(cd_table));

    // An invalid STE, then one whose fetch aborts.
    let ste = mem.read_u64(phys(ste_addr));
    mem.write_u64(phys(ste_addr), ste & !1);
    refresh(&mut unit);
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    mem.write_u64(phys(ste_addr), ste);
    model.add_abort_range(ste_addr, ste_addr + 64);
    refresh(&mut unit);
    assert!(model.dma(read(SID_A, 0x1000)).is_err());
    let drained = unit.drain_events().faults;
    assert_eq!(drained[0].fault.kind, EventKind::BadSte);
    assert!(drained[0].fault.kind.is_configuration_error());
    assert_eq!(drained[1].fault.kind, EventKind::SteFetch);
    assert_eq!(drained[1].fault.fetch_address, Some(ste_addr));
    let line = alloc::format!("{}", drained[1].fault);
    assert!(
        line.starts_with("F_STE_FETCH from stream 0x18, fetching"),
        "{line}"
    );
}

#[test]
fn overflow_is_reported_and_acknowledged() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let cfg = SmmuConfig {
        domain_fault_queue: 5,
        ..config()
    };
    let (mut unit, dom) = setup(&model, &mem, &clock, cfg);
    // The 128-entry queue takes 128 records; 12 are lost.
    for i in 0..140u64 {
        assert!(model.dma(read(SID_A, 0x10_0000 + i * 0x1000)).is_err());
    }
    let drain = unit.drain_events();
    assert!(drain.overflowed);
    assert_eq!(drain.faults.len(), 128);
    assert_eq!(drain.suppressed_logs, 128 - 8);
    assert_eq!(
        drain.faults[127].fault.address,
        Some(0x10_0000 + 127 * 0x1000)
    );
    let (faults, dropped) = unit.take_domain_faults(dom).unwrap();
    assert_eq!((faults.len(), dropped), (5, 123));
    // Acknowledged: the next drain is clean and the queue works again,
    // now across its wrap.
    for i in 0..3u64 {
        assert!(model.dma(write(SID_A, 0x80_0000 + i * 0x1000)).is_err());
    }
    let drain = unit.drain_events();
    assert!(!drain.overflowed);
    assert_eq!(drain.faults.len(), 3);
    assert_eq!(drain.faults[2].fault.address, Some(0x80_2000));
    assert_eq!(model.pending_events(), 0);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn injected_records_of_every_kind_decode_by_name() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let names = [
        (0x01u64, "F_UUT"),
        (0x05, "F_BAD_ATS_TREQ"),
        (0x06, "F_STREAM_DISABLED"),
        (0x07, "F_TRANSL_FORBIDDEN"),
        (0x08, "C_BAD_SUBSTREAMID"),
        (0x20, "F_TLB_CONFLICT"),
        (0x21, "F_CFG_CONFLICT"),
        (0x25, "F_VMS_FETCH"),
        (0xe7, "unknown event"),
    ];
    for (code, _) in names {
        model.inject_event([
            code | (0x42 << 32) | (1 << 11) | (9 << 12),
            1 << 35,
            0xabc000,
            0,
        ]);
    }
    let drain = unit.drain_events();
    for (f, (code, name)) in drain.faults.iter().zip(names) {
        assert_eq!(f.fault.kind.code() as u64, code);
        assert_eq!(f.fault.kind.name(), name);
        assert_eq!((f.fault.stream_id, f.fault.substream_id), (0x42, Some(9)));
    }
    let tlb = drain.faults[5].fault;
    assert_eq!(
        (tlb.address, tlb.access),
        (Some(0xabc000), Some(Access::Read))
    );
}

#[test]
fn global_errors_are_acknowledged_by_toggling_gerrorn() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    assert_eq!(unit.handle_global_errors(), Ok(0));
    model.raise_global_error(gerror::EVENTQ_ABT_ERR | gerror::MSI_GERROR_ABT_ERR);
    assert_eq!(
        unit.handle_global_errors(),
        Ok(gerror::EVENTQ_ABT_ERR | gerror::MSI_GERROR_ABT_ERR)
    );
    assert_eq!(model.active_global_errors(), 0);
    // The same error again: GERROR toggles back, GERRORN follows.
    model.raise_global_error(gerror::EVENTQ_ABT_ERR);
    assert_eq!(unit.handle_global_errors(), Ok(gerror::EVENTQ_ABT_ERR));
    assert_eq!(model.active_global_errors(), 0);
    model.raise_global_error(gerror::SFM_ERR);
    assert_eq!(
        unit.handle_global_errors(),
        Err(SmmuError::GlobalError(gerror::SFM_ERR))
    );
    assert_eq!(model.active_global_errors(), 0);
    // Commands still run.
    unit.submit_commands(&[]).unwrap();
}
