//! Fault events by interrupt: the message, the handler's drain into the
//! mailbox, storm masking and re-arming, and the hand-over to
//! `drain_faults`.

use sluice_hal::model::ModelMemory;
use sluice_hal::{Clock, Mmio};

use super::*;
use crate::vtd::VtdError;
use crate::vtd::caps::CapBuilder;
use crate::vtd::fault_event::{FaultEventMessage, FaultMailbox, MAILBOX_RECORDS, StormPolicy};
use crate::vtd::model::InjectedFault;
use crate::vtd::regs::event_control;

const VECTOR: u8 = 0xe0;

fn blocked(model: &crate::vtd::model::VtdModel<'_>, dev: Bdf, iova: u64) {
    assert!(model.dma(write(dev, iova)).is_err(), "blocked");
}

#[test]
fn message_encodes_the_destination_for_xapic_and_x2apic() {
    let xapic = FaultEventMessage::to_apic(3, VECTOR);
    assert_eq!(
        (xapic.address, xapic.upper_address, xapic.data),
        (0xfee0_3000, 0, 0xe0)
    );
    let x2 = FaultEventMessage::to_apic(0x1_0203, VECTOR);
    assert_eq!((x2.address, x2.upper_address), (0xfee0_3000, 0x1_0200));

    let mailbox = FaultMailbox::new();
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    assert!(matches!(
        unit.enable_fault_interrupt(x2, &mailbox, StormPolicy::new()),
        Err(VtdError::InvalidConfig(_))
    ));
    assert!(!unit.fault_interrupt_enabled());
}

#[test]
fn each_fault_interrupts_and_the_handler_hands_records_to_drain_faults() {
    let mailbox = FaultMailbox::new();
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    // Masked by default: a fault only sets IP.
    blocked(&model, DEV_A, 0x1000);
    assert!(model.fault_interrupts().is_empty());
    assert_ne!(model.fault_event_control() & event_control::IP, 0);
    unit.drain_faults();

    let message = FaultEventMessage::to_apic(0, VECTOR);
    unit.enable_fault_interrupt(message, &mailbox, StormPolicy::new())
        .expect("enable");
    assert!(unit.fault_interrupt_enabled());
    assert_eq!(model.fault_event_control() & event_control::IM, 0);
    // The pending IP from before fires once IM clears.
    assert_eq!(model.fault_interrupts(), [(0xfee0_0000, 0, 0xe0)]);
    model.clear_events();

    // QEMU's unit has one fault-recording register: without the handler
    // emptying it the second fault would be lost.
    for (n, dev) in [DEV_A, DEV_B].into_iter().enumerate() {
        blocked(&model, dev, 0x2000);
        assert_eq!(model.fault_interrupts().len(), n + 1, "one per fault");
        let service = mailbox.service_interrupt(&model, clock.now_ns());
        assert_eq!(
            (service.drained, service.deferred, service.masked),
            (1, false, false)
        );
        assert_eq!(model.pending_fault_records(), 0, "registers emptied");
    }
    assert_eq!(mailbox.interrupts(), 2);
    assert_eq!(mailbox.pending(), 2);
    let drain = unit.drain_faults();
    assert!(!drain.overflowed);
    let sources: alloc::vec::Vec<Bdf> = drain.faults.iter().map(|f| f.record.source).collect();
    assert_eq!(sources, [DEV_A, DEV_B]);
    assert_eq!(mailbox.pending(), 0);
    assert!(unit.drain_faults().faults.is_empty());

    unit.disable_fault_interrupt();
    blocked(&model, DEV_A, 0x3000);
    assert_eq!(model.fault_interrupts().len(), 2, "masked again");
    assert_eq!(unit.drain_faults().faults.len(), 1);
}

#[test]
fn a_storm_masks_the_interrupt_until_its_window_has_passed() {
    let mailbox = FaultMailbox::new();
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::qemu_default());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    let policy = StormPolicy {
        max_interrupts: 3,
        window_ns: 1_000_000,
    };
    unit.enable_fault_interrupt(FaultEventMessage::to_apic(0, VECTOR), &mailbox, policy)
        .expect("enable");
    let mut masked_at = None;
    for i in 0..6u64 {
        blocked(&model, DEV_A, 0x1000 * (i + 1));
        if model.fault_event_control() & event_control::IM != 0 {
            continue;
        }
        let s = mailbox.service_interrupt(&model, clock.now_ns());
        if s.masked {
            masked_at = Some(i);
        }
    }
    // The fourth interrupt in the window crossed the limit; later faults
    // only set IP (the unit's single record register keeps the 5th, the
    // 6th overflows).
    assert_eq!(masked_at, Some(3));
    assert_eq!(model.fault_interrupts().len(), 4);
    assert!(mailbox.storm_masked() && !unit.fault_interrupt_enabled());
    assert_ne!(model.fault_event_control() & event_control::IP, 0);
    assert_eq!(mailbox.storms(), 1);

    // Draining within the window keeps it masked...
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 5);
    assert!(drain.overflowed, "the 6th fault was lost");
    assert!(mailbox.storm_masked());
    // ...after the window it is unmasked, and the pending event fires.
    clock.advance(2_000_000);
    blocked(&model, DEV_A, 0x9000);
    unit.drain_faults();
    assert!(!mailbox.storm_masked() && unit.fault_interrupt_enabled());
    assert_eq!(model.fault_event_control() & event_control::IM, 0);
    assert_eq!(model.fault_interrupts().len(), 5);
}

#[test]
fn a_deferred_interrupt_leaves_the_registers_to_the_drain() {
    let mailbox = FaultMailbox::new();
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    unit.enable_fault_interrupt(
        FaultEventMessage::to_apic(0, VECTOR),
        &mailbox,
        StormPolicy::new(),
    )
    .expect("enable");
    // The unit's drain holds the mailbox (as if interrupted mid-drain).
    assert!(mailbox.try_lock());
    blocked(&model, DEV_A, 0x1000);
    let s = mailbox.service_interrupt(&model, clock.now_ns());
    assert!(s.deferred && s.drained == 0);
    assert_eq!(model.pending_fault_records(), 1);
    mailbox.unlock();
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 1);
    assert_eq!(drain.faults[0].record.source, DEV_A);
}

#[test]
fn a_full_mailbox_counts_lost_faults() {
    let mailbox = FaultMailbox::new();
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    unit.enable_fault_interrupt(
        FaultEventMessage::to_apic(0, VECTOR),
        &mailbox,
        StormPolicy {
            max_interrupts: 1000,
            window_ns: 1_000_000,
        },
    )
    .expect("enable");
    // Eight records per interrupt (CAP.NFR + 1 = 8), five interrupts.
    for round in 0..5u64 {
        for i in 0..8u64 {
            model.inject_fault(InjectedFault {
                sid: DEV_A.requester_id(),
                addr: (round * 8 + i) << 12,
                reason: 0x02,
                write: true,
                pasid: None,
            });
        }
        assert_eq!(mailbox.service_interrupt(&model, clock.now_ns()).drained, 8);
    }
    assert_eq!(mailbox.pending(), MAILBOX_RECORDS);
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), MAILBOX_RECORDS);
    assert!(drain.overflowed, "8 faults did not fit");
    assert_eq!(drain.suppressed_logs, MAILBOX_RECORDS - 8);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    // FECTL stays unmasked throughout.
    assert_eq!(model.read32(0x38) & event_control::IM, 0);
}
