//! The backend over a scripted world switch: what it hands to the
//! hardware, and what it makes of each exit.

use alloc::vec::Vec;

use super::exit::ec;
use super::sysregs::{CPACR_EL1_FPEN, SCTLR_EL1_MMU_OFF};
use super::*;
use crate::vcpu::{AccessKind, AccessSize, DecodedAccess, InstructionLength, VcpuExit};

/// One scripted exit: the syndrome, and what the guest did to its context.
type Step = (ExitSyndrome, fn(&mut GuestContext));

/// Plays one syndrome per entry; the closure may change the context as
/// the guest would have.
#[derive(Default)]
struct Scripted {
    exits: Vec<Step>,
    seen: Vec<(GuestContext, GuestControl)>,
}

impl El2Hardware for Scripted {
    fn enter(&mut self, context: &mut GuestContext, control: &GuestControl) -> ExitSyndrome {
        self.seen.push((*context, *control));
        let (syndrome, guest) = self.exits.remove(0);
        guest(context);
        syndrome
    }
}

const ENTRY_PC: u64 = 0x4020_0000;
const EL1H_MASKED: u64 = pstate::MODE_EL1H | pstate::D | pstate::A | pstate::I | pstate::F;

fn entry() -> Aarch64EntryState {
    let mut x = [0; 31];
    x[0] = 0x4000_2000;
    let registers = Aarch64Registers {
        x,
        pc: ENTRY_PC,
        pstate: EL1H_MASKED,
    };
    Aarch64EntryState {
        registers,
        sp_el1: 0x4010_0000,
        sctlr_el1: SCTLR_EL1_MMU_OFF,
        cpacr_el1: CPACR_EL1_FPEN,
    }
}

/// QEMU `-cpu max`: 48-bit PARange, 16-bit VMIDs.
fn features() -> El2Features {
    El2Features::from_id_registers(0b0101, 0b0010 << 4)
}

fn syndrome(class: u64, iss: u64) -> ExitSyndrome {
    ExitSyndrome {
        kind: ExceptionKind::Synchronous,
        esr: (class << 26) | (1 << 25) | iss,
        far: 0,
        hpfar: 0,
    }
}

fn nothing(_: &mut GuestContext) {}

fn backend(exits: Vec<Step>) -> El2Backend<Scripted> {
    El2Backend::new(
        Scripted {
            exits,
            ..Default::default()
        },
        features(),
    )
    .unwrap()
}

#[test]
fn features_and_vtcr() {
    let f = features();
    assert_eq!((f.physical_bits, f.vmid_bits), (48, 16));
    let b = backend(Vec::new());
    // T0SZ 25, SL0 1, PS 48 bits, 16-bit VMIDs.
    assert_eq!(b.vtcr_el2(), 0x800d_3559);
    let narrow = El2Features::from_id_registers(0b0010, 0);
    assert_eq!((narrow.physical_bits, narrow.vmid_bits), (40, 8));
    let b = El2Backend::new(Scripted::default(), narrow).unwrap();
    assert_eq!((b.vtcr_el2() >> 16) & 7, 0b010);
    // 52-bit PARange: the tables still output 48 bits.
    let wide = El2Features::from_id_registers(0b0110, 0);
    assert_eq!(wide.stage2_output_bits(), 48);
    assert_eq!(wide.stage2_format().unwrap().t0sz(), 25);
}

#[test]
fn entry_state_control_and_hypercall() {
    fn guest_calls(c: &mut GuestContext) {
        // The guest put a call in X0/X1 and executed HVC #0 at ENTRY_PC:
        // ELR_EL2 is the next instruction.
        c.registers.x[0] = sluice_abi::regs::AARCH64_FUNCTION_BASE | sluice_abi::cmd::IOAS_ALLOC;
        c.registers.x[1] = 0x4000_8000;
        c.registers.pc = ENTRY_PC + 4;
    }
    let mut b = backend(vec![
        (syndrome(ec::HVC64, 0), guest_calls),
        (syndrome(ec::WFX, 0), nothing),
    ]);
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    assert_eq!(v.vmid(), 1);
    assert!(matches!(
        b.run(&mut v),
        Err(VcpuError::InvalidGuestState(_))
    ));
    assert!(b.hardware().seen.is_empty(), "no entry without stage 2");
    b.set_nested_root(&mut v, PhysAddr::new(0x8123_4000))
        .unwrap();

    let exit = b.run(&mut v).unwrap();
    assert_eq!(
        exit,
        Exit {
            reason: VcpuExit::Hypercall {
                command: sluice_abi::cmd::IOAS_ALLOC,
                argument: 0x4000_8000
            },
            rip: ENTRY_PC,
            length: InstructionLength::Known(4)
        }
    );
    let (context, control) = b.hardware().seen[0];
    assert_eq!(context.registers.pc, ENTRY_PC);
    assert_eq!(context.registers.x[0], 0x4000_2000, "X0 = start info");
    assert_eq!(context.registers.pstate, 0x3c5);
    assert_eq!(context.el1.sp_el1, 0x4010_0000);
    assert_eq!(context.el1.sctlr_el1, 0x30d0_0800);
    assert_eq!(context.el1.cpacr_el1, 3 << 20);
    assert_eq!(context.el1.vbar_el1, 0, "other EL1 registers start at zero");
    assert_eq!(control.hcr_el2, hcr::GUEST);
    assert_eq!(control.vtcr_el2, b.vtcr_el2());
    assert_eq!(control.vttbr_el2, (1 << 48) | 0x8123_4000);
    assert_eq!(control.vmpidr_el2, 0x8000_0000);
    assert!(control.flush_tlb, "a VMID's first entry flushes it");

    // The PC names the HVC; skipping it resumes after it.
    assert_eq!(b.registers(&v).rip, ENTRY_PC);
    b.advance_rip(&mut v, 4).unwrap();
    assert_eq!(b.run(&mut v).unwrap().reason, VcpuExit::Hlt);
    let (context, control) = b.hardware().seen[1];
    assert_eq!(context.registers.pc, ENTRY_PC + 4);
    assert!(!control.flush_tlb, "no flush once the VMID is clean");
}

#[test]
fn data_abort_registers_and_pc() {
    fn guest_stores(c: &mut GuestContext) {
        c.registers.pc = ENTRY_PC + 0x40;
        c.registers.x[30] = 0x5a;
    }
    // STRB W30 to 0x0900_0000.
    let mut s = syndrome(
        ec::DATA_ABORT_LOWER,
        (1 << 24) | (30 << 16) | (1 << 6) | 0b000111,
    );
    s.far = 0x0900_0000;
    s.hpfar = (0x0900_0000 >> 12) << 4;
    let mut b = backend(vec![(s, guest_stores)]);
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    b.set_nested_root(&mut v, PhysAddr::new(0x8000_0000))
        .unwrap();
    let exit = b.run(&mut v).unwrap();
    assert_eq!(
        exit.reason,
        VcpuExit::DecodedMmio {
            gpa: 0x0900_0000,
            access: DecodedAccess {
                size: AccessSize::Byte,
                kind: AccessKind::Write,
                register: 30,
                sign_extend: false,
                register_64: false
            }
        }
    );
    assert_eq!(
        exit.rip,
        ENTRY_PC + 0x40,
        "a data abort's ELR is the access"
    );
    let regs = b.aarch64_registers(&v).unwrap();
    assert_eq!(regs.x[30], 0x5a);
    // The x86-shaped view: X0-X15, PC, PSTATE.
    let view = b.registers(&v);
    assert_eq!(view.gprs[0], 0x4000_2000);
    assert_eq!((view.rip, view.rflags), (ENTRY_PC + 0x40, 0x3c5));
    let mut changed = view;
    changed.gprs[15] = 0x1515;
    b.set_registers(&mut v, &changed);
    assert_eq!(b.aarch64_registers(&v).unwrap().x[15], 0x1515);
    assert_eq!(
        b.aarch64_registers(&v).unwrap().x[30],
        0x5a,
        "X16-X30 untouched"
    );
    assert_eq!(b.translation_state(&v), TranslationState::default());
}

#[test]
fn advance_rejects_bad_lengths_and_clears_btype() {
    let mut b = backend(Vec::new());
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    let mut r = b.aarch64_registers(&v).unwrap();
    r.pstate |= pstate::BTYPE;
    b.set_aarch64_registers(&mut v, &r).unwrap();
    b.advance_rip(&mut v, 4).unwrap();
    let r = b.aarch64_registers(&v).unwrap();
    assert_eq!(r.pc, ENTRY_PC + 4);
    assert_eq!(r.pstate & pstate::BTYPE, 0);
    for bad in [0, 1, 3, 8, 15] {
        assert_eq!(
            b.advance_rip(&mut v, bad),
            Err(VcpuError::BadInstructionLength(u64::from(bad)))
        );
    }
}

#[test]
fn never_enters_a_guest_at_el2() {
    let mut b = backend(vec![(syndrome(ec::WFX, 0), nothing)]);
    let mut bad = entry();
    bad.registers.pstate = 0b1001; // EL2h
    assert!(matches!(
        b.create_aarch64_vcpu(&bad),
        Err(VcpuError::InvalidGuestState(_))
    ));
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    b.set_nested_root(&mut v, PhysAddr::new(0x8000_0000))
        .unwrap();
    let mut r = b.aarch64_registers(&v).unwrap();
    r.pstate = 0b1001;
    assert!(b.set_aarch64_registers(&mut v, &r).is_err());
    // Through the x86-shaped view too: the entry is refused.
    let mut view = b.registers(&v);
    view.rflags = 0b1101; // EL3h
    b.set_registers(&mut v, &view);
    assert!(matches!(
        b.run(&mut v),
        Err(VcpuError::InvalidGuestState(_))
    ));
    assert!(b.hardware().seen.is_empty());
}

#[test]
fn roots_vmids_events() {
    let mut b = backend(Vec::new());
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    for bad in [0u64, 0x1234, 1 << 48] {
        assert_eq!(
            b.set_nested_root(&mut v, PhysAddr::new(bad)),
            Err(VcpuError::BadNestedRoot(PhysAddr::new(bad)))
        );
    }
    assert!(matches!(
        b.inject_event(
            &mut v,
            Event::Exception {
                vector: 13,
                error_code: Some(0)
            }
        ),
        Err(VcpuError::Unsupported(_))
    ));
    assert!(matches!(
        b.create_vcpu(&crate::vm::boot::x86_entry_state(0x10_0000, 0x4000)),
        Err(VcpuError::Unsupported(_))
    ));
    let second = b.create_aarch64_vcpu(&entry()).unwrap();
    assert_eq!(second.vmid(), 2);
    b.destroy_vcpu(second);
    assert_eq!(b.create_aarch64_vcpu(&entry()).unwrap().vmid(), 2);
    // 8-bit VMIDs: 255 guests, VMID 0 never handed out.
    let mut small =
        El2Backend::new(Scripted::default(), El2Features::from_id_registers(5, 0)).unwrap();
    for expected in 1..=255u16 {
        assert_eq!(
            small.create_aarch64_vcpu(&entry()).unwrap().vmid(),
            expected
        );
    }
    assert!(matches!(
        small.create_aarch64_vcpu(&entry()),
        Err(VcpuError::OutOfAsids)
    ));
}

#[test]
fn interrupts_resume_where_the_guest_was() {
    fn moved(c: &mut GuestContext) {
        c.registers.pc = ENTRY_PC + 0x100;
    }
    let irq = ExitSyndrome {
        kind: ExceptionKind::Irq,
        esr: 0,
        far: 0,
        hpfar: 0,
    };
    let mut b = backend(vec![(irq, moved)]);
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    b.set_nested_root(&mut v, PhysAddr::new(0x8000_0000))
        .unwrap();
    let exit = b.run(&mut v).unwrap();
    assert_eq!(exit.reason, VcpuExit::ExternalInterrupt);
    assert_eq!(exit.rip, ENTRY_PC + 0x100);
    assert_eq!(exit.length, InstructionLength::Unknown);
}
