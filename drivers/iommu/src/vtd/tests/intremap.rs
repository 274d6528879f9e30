//! Interrupt remapping: the enable sequence, remapped entries with source
//! checks, entry-cache invalidation, compatibility-format blocking.

use alloc::vec::Vec;

use sluice_hal::Mmio;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::vtd::VtdError;
use crate::vtd::caps::CapBuilder;
use crate::vtd::fault::FaultClass;
use crate::vtd::intremap::{
    DeliveryMode, IRTE_COUNT, IrConfig, RemappableMsi, RemappedInterrupt, SidQualifier,
    SourceValidation, TriggerMode,
};
use crate::vtd::model::{InterruptFault, InterruptRequest, Inv, ModelEvent, Stuck, VtdModel};
use crate::vtd::regs::global;

const XAPIC: IrConfig = IrConfig { x2apic: false };

/// QEMU's unit with `intremap=on`: IR without EIM.
fn qemu_ir() -> CapBuilder {
    CapBuilder {
        ir: true,
        ..CapBuilder::qemu_default()
    }
}

fn msi(dev: Bdf, index: u16) -> InterruptRequest {
    let m = RemappableMsi::for_entry(index);
    InterruptRequest {
        sid: dev.requester_id(),
        address: m.address,
        data: m.data,
    }
}

/// A plain (compatibility-format) MSI to APIC 0, vector 0x30.
fn compat(dev: Bdf) -> InterruptRequest {
    InterruptRequest {
        sid: dev.requester_id(),
        address: 0xfee0_0000,
        data: 0x30,
    }
}

fn interrupt_invalidations(model: &VtdModel<'_>) -> Vec<Inv> {
    model
        .invalidations()
        .into_iter()
        .filter(|i| matches!(i, Inv::InterruptEntries { .. }))
        .collect()
}

#[test]
fn enable_sets_the_table_invalidates_then_enables_one_bit_at_a_time() {
    let mem = ModelMemory::new();
    let model = model(&mem, qemu_ir());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    assert!(!unit.interrupt_remapping_enabled());
    model.clear_events();
    unit.enable_interrupt_remapping(XAPIC).expect("IR on");

    const QIE_TE: u32 = global::QUEUED_INVALIDATION | global::TRANSLATION_ENABLE;
    assert_eq!(
        model.gcmd_writes(),
        [
            QIE_TE | global::SET_INTERRUPT_TABLE,
            QIE_TE | global::INTERRUPT_REMAPPING
        ]
    );
    let events = model.events();
    let sirtp = events
        .iter()
        .position(|e| *e == ModelEvent::Gcmd(QIE_TE | global::SET_INTERRUPT_TABLE));
    let iec = events.iter().position(|e| {
        matches!(
            e,
            ModelEvent::Invalidation {
                inv: Inv::InterruptEntries { global: true, .. },
                ..
            }
        )
    });
    let ire = events
        .iter()
        .position(|e| *e == ModelEvent::Gcmd(QIE_TE | global::INTERRUPT_REMAPPING));
    assert!(sirtp < iec && iec < ire, "{events:?}");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    assert!(unit.interrupt_remapping_enabled() && model.interrupt_remapping_enabled());
    let table = unit.interrupt_table().expect("table");
    // xAPIC: no EIME; S = 7 (256 entries in one page).
    assert_eq!(model.active_interrupt_table(), Some(table.as_u64() | 7));
    assert_eq!(IRTE_COUNT, 256);
    // Idempotent in the same mode, refused in the other.
    assert_eq!(unit.enable_interrupt_remapping(XAPIC), Ok(()));
    assert!(matches!(
        unit.enable_interrupt_remapping(IrConfig { x2apic: true }),
        Err(VtdError::InvalidConfig(_) | VtdError::Unsupported(_))
    ));

    // Every entry starts not present; beyond the table is its own fault.
    for index in [0u16, 1, 100, 255] {
        assert_eq!(
            model.interrupt(msi(DEV_A, index)),
            Err(InterruptFault::NotPresent {
                index: u32::from(index)
            })
        );
        unit.drain_faults();
    }
    assert_eq!(
        model.interrupt(msi(DEV_A, 256)),
        Err(InterruptFault::IndexBeyondTable { index: 256 })
    );
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 1);
    assert_eq!(drain.faults[0].record.reason.0, 0x21);
    assert_eq!(
        drain.faults[0].record.reason.class(),
        FaultClass::InterruptRemapping
    );
    assert_eq!(drain.faults[0].record.source, DEV_A);
}

#[test]
fn compatibility_format_interrupts_are_blocked_even_if_firmware_allowed_them() {
    let mem = ModelMemory::new();
    let model = model(&mem, qemu_ir());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    // Before remapping, a plain MSI goes where it says.
    let through = model.interrupt(compat(DEV_A)).expect("no remapping yet");
    assert_eq!((through.destination, through.vector), (0, 0x30));
    assert!(!through.remapped);
    // Firmware left CFI set (compatibility format allowed through).
    model.write32(
        0x18,
        (model.gsts() & global::PERSISTENT_STATUS_MASK) | global::COMPAT_FORMAT_INTERRUPTS,
    );
    assert_ne!(model.gsts() & global::COMPAT_FORMAT_INTERRUPTS, 0);
    unit.enable_interrupt_remapping(XAPIC).expect("IR on");
    assert_eq!(model.gsts() & global::COMPAT_FORMAT_INTERRUPTS, 0);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
    assert_eq!(
        model.interrupt(compat(DEV_B)),
        Err(InterruptFault::CompatBlocked)
    );
    let drain = unit.drain_faults();
    assert_eq!(drain.faults.len(), 1);
    assert_eq!(drain.faults[0].record.reason.0, 0x25);
    assert_eq!(drain.faults[0].record.source, DEV_B);
}

#[test]
fn installed_entries_route_only_their_source_and_changes_are_invalidated() {
    let mem = ModelMemory::new();
    let model = model(&mem, qemu_ir());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    unit.enable_interrupt_remapping(XAPIC).expect("IR on");
    assert_eq!(unit.free_interrupt_entry(), Some(0));
    model.clear_events();

    unit.set_interrupt_entry(5, &RemappedInterrupt::fixed(2, 0x41, DEV_A))
        .expect("install");
    assert_eq!(
        interrupt_invalidations(&model),
        [Inv::InterruptEntries {
            global: false,
            index: 5,
            mask: 0
        }]
    );
    let out = model.interrupt(msi(DEV_A, 5)).expect("remapped");
    assert_eq!((out.destination, out.vector, out.delivery), (2, 0x41, 0));
    assert!(out.remapped && !out.level && !out.logical);
    // Cached now: a second interrupt is served from the entry cache.
    assert!(model.interrupt(msi(DEV_A, 5)).expect("again").cached);
    // Another device cannot raise it.
    assert_eq!(
        model.interrupt(msi(DEV_B, 5)),
        Err(InterruptFault::SourceMismatch { index: 5 })
    );
    let drain = unit.drain_faults();
    assert_eq!(drain.faults[0].record.reason.0, 0x26);
    assert_eq!(drain.faults[0].record.source, DEV_B);

    // Retargeting a present entry: the cached copy must go, or the old
    // vector would still be delivered.
    unit.set_interrupt_entry(5, &RemappedInterrupt::fixed(3, 0x42, DEV_A))
        .expect("retarget");
    let out = model.interrupt(msi(DEV_A, 5)).expect("remapped");
    assert_eq!((out.destination, out.vector), (3, 0x42));
    assert_eq!(unit.free_interrupt_entry(), Some(0));

    // Cleared: faults again.
    unit.clear_interrupt_entry(5).expect("clear");
    assert_eq!(
        model.interrupt(msi(DEV_A, 5)),
        Err(InterruptFault::NotPresent { index: 5 })
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn source_qualifiers_and_bus_ranges_are_encoded_as_the_unit_checks_them() {
    let mem = ModelMemory::new();
    let model = model(&mem, qemu_ir());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::Legacy);
    unit.enable_interrupt_remapping(XAPIC).expect("IR on");
    let any_function = RemappedInterrupt {
        source: SourceValidation::Requester {
            rid: Bdf::new(0, 4, 0),
            qualifier: SidQualifier::AnyFunction,
        },
        ..RemappedInterrupt::fixed(0, 0x50, DEV_A)
    };
    unit.set_interrupt_entry(1, &any_function).expect("install");
    assert!(model.interrupt(msi(Bdf::new(0, 4, 7), 1)).is_ok());
    assert!(model.interrupt(msi(Bdf::new(0, 5, 0), 1)).is_err());
    let behind_bridge = RemappedInterrupt {
        source: SourceValidation::BusRange { first: 2, last: 4 },
        trigger: TriggerMode::Level,
        delivery: DeliveryMode::LowestPriority,
        ..RemappedInterrupt::fixed(1, 0x51, DEV_A)
    };
    unit.set_interrupt_entry(2, &behind_bridge)
        .expect("install");
    let out = model.interrupt(msi(Bdf::new(3, 0, 0), 2)).expect("bus 3");
    assert!(out.level && out.delivery == 1);
    assert_eq!(
        model.interrupt(msi(Bdf::new(5, 0, 0), 2)),
        Err(InterruptFault::SourceMismatch { index: 2 })
    );

    // Nonsense is refused before anything is written.
    for (index, bad) in [
        (3, RemappedInterrupt::fixed(256, 0x40, DEV_A)),
        (3, RemappedInterrupt::fixed(0, 5, DEV_A)),
        (300, RemappedInterrupt::fixed(0, 0x40, DEV_A)),
        (
            3,
            RemappedInterrupt {
                source: SourceValidation::BusRange { first: 4, last: 2 },
                ..RemappedInterrupt::fixed(0, 0x40, DEV_A)
            },
        ),
    ] {
        assert!(matches!(
            unit.set_interrupt_entry(index, &bad),
            Err(VtdError::InvalidConfig(_))
        ));
    }
    assert_eq!(unit.free_interrupt_entry(), Some(0));
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn x2apic_hosts_get_eime_and_32_bit_destinations() {
    let mem = ModelMemory::new();
    let model = model(&mem, CapBuilder::server());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock, ModeRequest::PreferScalable);
    unit.enable_interrupt_remapping(IrConfig { x2apic: true })
        .expect("IR on");
    let table = unit.interrupt_table().expect("table").as_u64();
    assert_eq!(model.active_interrupt_table(), Some(table | (1 << 11) | 7));
    unit.set_interrupt_entry(0x80, &RemappedInterrupt::fixed(0x1_0002, 0xe0, DEV_UPPER))
        .expect("install");
    let out = model.interrupt(msi(DEV_UPPER, 0x80)).expect("remapped");
    assert_eq!((out.destination, out.vector), (0x1_0002, 0xe0));
    // With EIME compatibility format is blocked whatever CFI says.
    assert_eq!(
        model.interrupt(compat(DEV_UPPER)),
        Err(InterruptFault::CompatBlocked)
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn missing_capabilities_and_a_stuck_unit_are_errors_not_half_enabled_states() {
    let mem = ModelMemory::new();
    let clock = clock();

    let no_ir = model(&mem, CapBuilder::qemu_default());
    let mut unit = init(&no_ir, &mem, &clock, ModeRequest::Legacy);
    assert_eq!(
        unit.enable_interrupt_remapping(XAPIC),
        Err(VtdError::Unsupported("interrupt remapping (ECAP.IR)"))
    );
    assert!(!unit.interrupt_remapping_enabled());
    assert!(matches!(
        unit.set_interrupt_entry(0, &RemappedInterrupt::fixed(0, 0x40, DEV_A)),
        Err(VtdError::Unsupported(_))
    ));

    let no_eim = model(&mem, qemu_ir());
    let mut unit = init(&no_eim, &mem, &clock, ModeRequest::Legacy);
    assert!(matches!(
        unit.enable_interrupt_remapping(IrConfig { x2apic: true }),
        Err(VtdError::Unsupported(_))
    ));

    let stuck = model(&mem, qemu_ir());
    let mut unit = init(&stuck, &mem, &clock, ModeRequest::Legacy);
    stuck.set_stuck(Stuck {
        gcmd: true,
        ..Stuck::default()
    });
    assert!(matches!(
        unit.enable_interrupt_remapping(XAPIC),
        Err(VtdError::Timeout { .. })
    ));
    assert!(!unit.interrupt_remapping_enabled());
    assert_eq!(unit.free_interrupt_entry(), None);
}
