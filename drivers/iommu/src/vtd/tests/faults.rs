//! Fault draining: decoding, attribution, overflow and rate limiting.

use sluice_hal::PAGE_SIZE;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::MapPerms;
use crate::vtd::caps::CapBuilder;
use crate::vtd::fault::{AccessKind, FaultClass, FaultReason};
use crate::vtd::model::InjectedFault;
use crate::vtd::regs::fsts;
use crate::vtd::unit::DomainConfig;

#[test]
fn faults_are_decoded_attributed_and_queued_per_domain() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    unit.map(dom, 0x1000, phys(0x2000), PAGE_SIZE, MapPerms::READ)
        .expect("map");
    unit.attach_device(DEV_A, dom).expect("attach");

    assert!(model.dma(write(DEV_A, 0x1234)).is_err(), "read-only page");
    assert!(model.dma(read(DEV_B, 0x5000)).is_err(), "blocked device");
    let drain = unit.drain_faults();
    assert!(!drain.overflowed);
    assert_eq!(drain.faults.len(), 2);
    let perm = &drain.faults[0];
    assert_eq!(perm.domain, Some(dom));
    assert_eq!(perm.record.source, DEV_A);
    assert_eq!(perm.record.address, 0x1000);
    assert_eq!(perm.record.access, AccessKind::Write);
    assert_eq!(perm.record.reason, FaultReason(0x05));
    assert_eq!(perm.record.reason.class(), FaultClass::Permission);
    let blocked = &drain.faults[1];
    assert_eq!(blocked.domain, None);
    assert_eq!(blocked.record.source, DEV_B);
    assert_eq!(blocked.record.access, AccessKind::Read);
    assert_eq!(
        blocked.record.reason.description(),
        "context entry not present"
    );
    // Every F bit was cleared; nothing is pending any more.
    assert_eq!(model.pending_fault_records(), 0);
    assert_eq!(model.fault_status() & fsts::PPF, 0);
    assert!(unit.drain_faults().faults.is_empty());

    let (queued, dropped) = unit.take_domain_faults(dom).expect("domain");
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].source, DEV_A);
    assert_eq!(dropped, 0);
    assert!(unit.take_domain_faults(dom).expect("domain").0.is_empty());
}

#[test]
fn pasid_faults_carry_the_pasid_and_reach_the_pasid_domain() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Scalable);
    let dom = unit.alloc_domain(DomainConfig::first_level()).expect("fl");
    unit.attach_pasid(DEV_A, 9, dom).expect("attach");
    assert!(
        model.dma(read(DEV_A, 0x7000).with_pasid(9)).is_err(),
        "nothing mapped"
    );
    assert!(
        model.dma(read(DEV_A, 0x7000).with_pasid(10)).is_err(),
        "PASID not attached"
    );
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 2);
    assert_eq!(drain.faults[0].record.pasid, Some(9));
    assert_eq!(drain.faults[0].domain, Some(dom));
    assert_eq!(drain.faults[1].record.pasid, Some(10));
    assert_eq!(drain.faults[1].record.reason, FaultReason(0x59));
    assert_eq!(
        drain.faults[1].record.reason.class(),
        FaultClass::NotPresent
    );
    assert_eq!(drain.faults[1].domain, None);
}

#[test]
fn overflow_is_reported_and_cleared() {
    let mem = ModelMemory::new();
    // QEMU's unit has a single fault-recording register.
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    for i in 0..3 {
        assert!(model.dma(read(DEV_A, i * PAGE_SIZE)).is_err());
    }
    assert_ne!(model.fault_status() & fsts::PFO, 0);
    let drain = unit.drain_faults();
    assert!(drain.overflowed);
    assert_eq!(drain.faults.len(), 1, "the first fault was kept");
    assert_eq!(drain.faults[0].record.address, 0);
    assert_eq!(model.fault_status() & (fsts::PFO | fsts::PPF), 0);
    // Recording works again.
    assert!(model.dma(read(DEV_A, 0x9000)).is_err());
    let again = unit.drain_faults();
    assert!(!again.overflowed);
    assert_eq!(again.faults[0].record.address, 0x9000);
}

#[test]
fn a_fault_storm_is_drained_in_bounded_passes_with_limited_logging() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut cfg = config(ModeRequest::Legacy);
    cfg.fault_log_limit = 2;
    cfg.domain_fault_queue = 3;
    let mut unit = VtdUnit::init(&model, &mem, &clock, cfg).expect("init");
    let dom = unit
        .alloc_domain(DomainConfig::second_level())
        .expect("domain");
    unit.attach_device(DEV_A, dom).expect("attach");
    // Fill all eight registers, then keep faulting: the rest overflow.
    for i in 0..20u64 {
        model.inject_fault(InjectedFault {
            sid: DEV_A.requester_id(),
            addr: i * PAGE_SIZE,
            reason: 0x06,
            write: false,
            pasid: None,
        });
    }
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 8, "one pass over the registers");
    assert!(drain.overflowed);
    assert_eq!(drain.suppressed_logs, 6, "2 logged, 6 counted");
    let addresses: alloc::vec::Vec<u64> = drain.faults.iter().map(|f| f.record.address).collect();
    assert_eq!(
        addresses,
        (0..8)
            .map(|i| i * PAGE_SIZE)
            .collect::<alloc::vec::Vec<_>>()
    );
    let (queued, dropped) = unit.take_domain_faults(dom).expect("domain");
    assert_eq!((queued.len(), dropped), (3, 5));

    // Draining starts at FRI: after a wrap the oldest pending record is
    // not at index 0.
    for i in 0..3u64 {
        model.inject_fault(InjectedFault {
            sid: DEV_B.requester_id(),
            addr: 0x10_0000 + i * PAGE_SIZE,
            reason: 0x02,
            write: true,
            pasid: None,
        });
    }
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 3);
    assert_eq!(
        drain.faults[0].record.index, 0,
        "recording continued after index 7"
    );
    assert_eq!(drain.faults[0].record.address, 0x10_0000);
    assert!(!drain.overflowed);
}

#[test]
fn faults_left_by_firmware_are_cleared_at_init() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    model.inject_fault(InjectedFault {
        sid: 0x00f8,
        addr: 0xdead_0000,
        reason: 0x01,
        write: true,
        pasid: None,
    });
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    assert_eq!(model.pending_fault_records(), 0);
    assert!(unit.drain_faults().faults.is_empty());
}
