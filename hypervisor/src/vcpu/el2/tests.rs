//! The backend over a scripted world switch: what it hands to the
//! hardware, and what it makes of each exit.

use alloc::vec::Vec;

use super::exit::ec;
use super::sysregs::{CPACR_EL1_FPEN, SCTLR_EL1_MMU_OFF};
use super::*;
use crate::vcpu::{
    Aarch64Exception, AccessKind, AccessSize, DecodedAccess, InstructionLength, VcpuExit,
};

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

/// The vector table the scripted guest installs (2 KiB aligned; the low
/// bits of VBAR_EL1 are RES0 and never reach the PC).
const VBAR: u64 = 0x4030_0800;
/// Where the trapped instruction is.
const TRAP_PC: u64 = ENTRY_PC + 0x10;
/// `MRS X3, ACTLR_EL1`: ISS Op0 3, Op2 1, Op1 0, CRn 1, Rt 3, CRm 0, read.
const MRS_X3_ACTLR_ISS: u64 = (3 << 20) | (1 << 17) | (1 << 10) | (3 << 5) | 1;

/// The guest installed its vectors and reached the trapped instruction.
fn guest_reads_actlr(c: &mut GuestContext) {
    c.el1.vbar_el1 = VBAR | 0x7ff;
    c.el1.far_el1 = 0xfa4;
    c.registers.pc = TRAP_PC;
}

/// A backend whose guest exits on `MRS X3, ACTLR_EL1` at [`TRAP_PC`], then
/// on WFI; the vCPU after the first exit, in `mode` with NZCV set.
fn trapped_in(mode: u64, features: El2Features) -> (El2Backend<Scripted>, El2Vcpu) {
    trapped_after(guest_reads_actlr, mode, features)
}

/// The same, the guest's context as `guest` leaves it.
fn trapped_after(
    guest: fn(&mut GuestContext),
    mode: u64,
    features: El2Features,
) -> (El2Backend<Scripted>, El2Vcpu) {
    let mut b = El2Backend::new(
        Scripted {
            exits: vec![
                (syndrome(ec::SYSREG, MRS_X3_ACTLR_ISS), guest),
                (syndrome(ec::WFX, 0), nothing),
            ],
            ..Default::default()
        },
        features,
    )
    .unwrap();
    let mut v = b.create_aarch64_vcpu(&entry()).unwrap();
    b.set_nested_root(&mut v, PhysAddr::new(0x8000_0000))
        .unwrap();
    let exit = b.run(&mut v).unwrap();
    assert_eq!(exit.rip, TRAP_PC, "a trapped MRS's ELR is the MRS");
    assert_eq!(exit.length, InstructionLength::Known(4));
    let VcpuExit::SystemRegister(access) = exit.reason else {
        panic!("{exit:?}");
    };
    assert_eq!(
        access.encoding,
        crate::vcpu::SystemRegisterEncoding::ACTLR_EL1
    );
    assert_eq!(access.register, 3);
    let mut r = b.aarch64_registers(&v).unwrap();
    r.pstate = (0b1111 << 28) | pstate::DAIF | mode;
    b.set_aarch64_registers(&mut v, &r).unwrap();
    (b, v)
}

#[test]
fn undef_enters_the_vector_of_where_the_guest_was() {
    for (mode, offset) in [
        (pstate::MODE_EL1H, 0x200),
        (pstate::MODE_EL1T, 0x000),
        (pstate::MODE_EL0T, 0x400),
    ] {
        let (mut b, mut v) = trapped_in(mode, features());
        let before = *v.context();
        b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined)
            .unwrap();
        assert_eq!(
            v.pending_exception(),
            Some(Aarch64Exception::Undefined),
            "taken at the next entry"
        );
        assert_eq!(*v.context(), before, "nothing changes before the entry");
        assert_eq!(b.run(&mut v).unwrap().reason, VcpuExit::Hlt);
        assert_eq!(v.pending_exception(), None);
        let (entered, _) = b.hardware().seen[1];
        let el1 = &entered.el1;
        assert_eq!(entered.registers.pc, 0x4030_0800 + offset, "mode {mode:#b}");
        assert_eq!(
            el1.elr_el1, TRAP_PC,
            "the preferred return address is the MRS"
        );
        assert_eq!(el1.spsr_el1, before.registers.pstate, "SPSR_EL1 = PSTATE");
        // EC 0 "unknown reason", IL 1 (RES1 for EC 0), ISS 0.
        assert_eq!(el1.esr_el1, 0x0200_0000);
        assert_eq!(el1.far_el1, 0xfa4, "FAR_EL1 is not an UNDEF's");
        // EL1h, D/A/I/F masked, NZCV kept; no PSTATE features on this CPU.
        assert_eq!(entered.registers.pstate, 0xf000_03c5, "mode {mode:#b}");
        // Registers are the guest's.
        assert_eq!(entered.registers.x, before.registers.x);
        assert_eq!(el1.vbar_el1, VBAR | 0x7ff);
    }
}

#[test]
fn pstate_on_entry_follows_each_feature() {
    use super::inject::pstate_on_entry;
    use super::sysregs::sctlr;
    let all = PstateFeatures {
        pan: true,
        uao: true,
        bti: true,
        ssbs: true,
        mte: true,
        nmi: true,
        gcs: false,
    };
    const DIT: u64 = 1 << 24;
    let old = (0b1010 << 28)
        | DIT
        | pstate::UAO
        | pstate::SS
        | pstate::IL
        | pstate::SSBS
        | pstate::BTYPE
        | pstate::MODE_EL0T;
    // SCTLR_EL1.SPAN, DSSBS and SPINTMASK clear: PAN and ALLINT set, SSBS
    // clear, TCO set; UAO, BTYPE, SS and IL clear; NZCV and DIT kept.
    assert_eq!(
        pstate_on_entry(old, 0, &all),
        (0b1010 << 28)
            | DIT
            | pstate::PAN
            | pstate::TCO
            | pstate::ALLINT
            | pstate::DAIF
            | pstate::MODE_EL1H
    );
    // SPAN set leaves PAN as it was; DSSBS sets SSBS; SPINTMASK clears
    // ALLINT.
    let sctlr = sctlr::SPAN | sctlr::DSSBS | sctlr::SPINTMASK;
    let entered = pstate_on_entry(pstate::MODE_EL1H | pstate::ALLINT, sctlr, &all);
    assert_eq!(entered & (pstate::PAN | pstate::ALLINT), 0);
    assert_ne!(entered & pstate::SSBS, 0);
    assert_ne!(
        pstate_on_entry(pstate::MODE_EL1T | pstate::PAN, sctlr, &all) & pstate::PAN,
        0
    );
    // Without the features those bits do not exist and stay as they were;
    // SS and IL clear on every processor.
    let none = PstateFeatures::default();
    assert_eq!(
        pstate_on_entry(old, 0, &none),
        (0b1010 << 28)
            | DIT
            | pstate::UAO
            | pstate::SSBS
            | pstate::BTYPE
            | pstate::DAIF
            | pstate::MODE_EL1H
    );
}

#[test]
fn pstate_features_from_the_id_registers() {
    // BT 1, SSBS 2, MTE 0, NMI 1; PAN 3 (FEAT_PAN3); UAO 1.
    let f = PstateFeatures::from_id_registers(0x0000_0010_0000_0021, 0x0030_0000, 0x10);
    assert_eq!(
        f,
        PstateFeatures {
            pan: true,
            uao: true,
            bti: true,
            ssbs: true,
            mte: false,
            nmi: true,
            gcs: false,
        }
    );
    let f = PstateFeatures::from_id_registers(0x0000_1000_0000_0200, 0, 0);
    assert!(f.mte && f.gcs && !f.bti && !f.pan && !f.uao);
    assert_eq!(features().pstate, PstateFeatures::default());
    let with = features().with_pstate_features(f);
    assert_eq!((with.pstate, with.physical_bits), (f, 48));
}

#[test]
fn the_entry_uses_the_processor_features() {
    let mut cpu = features();
    cpu.pstate.pan = true;
    cpu.pstate.bti = true;
    // The boot protocol's SCTLR_EL1 has bit 23 set (RES1 in Armv8.0, SPAN
    // from Armv8.1): PAN stays as it was.
    let (mut b, mut v) = trapped_in(pstate::MODE_EL1H | pstate::BTYPE, cpu);
    b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined)
        .unwrap();
    b.run(&mut v).unwrap();
    let (entered, _) = b.hardware().seen[1];
    assert_eq!(
        entered.registers.pstate, 0xf000_03c5,
        "BTYPE cleared, no PAN"
    );
    assert_ne!(entered.el1.spsr_el1 & pstate::BTYPE, 0, "SPSR keeps BTYPE");
    // A guest that cleared SCTLR_EL1.SPAN: PAN is set on entry.
    fn clears_span(c: &mut GuestContext) {
        guest_reads_actlr(c);
        c.el1.sctlr_el1 &= !(1 << 23);
    }
    let (mut b, mut v) = trapped_after(clears_span, pstate::MODE_EL1H, cpu);
    b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined)
        .unwrap();
    b.run(&mut v).unwrap();
    let (entered, _) = b.hardware().seen[1];
    assert_eq!(entered.registers.pstate, 0xf000_03c5 | pstate::PAN);
}

#[test]
fn external_data_abort_reports_the_address() {
    let (mut b, mut v) = trapped_in(pstate::MODE_EL1H, features());
    let abort = Aarch64Exception::ExternalDataAbort {
        far: 0xffff_0000_0900_1000,
        write: true,
    };
    b.inject_aarch64_exception(&mut v, abort).unwrap();
    b.run(&mut v).unwrap();
    let (entered, _) = b.hardware().seen[1];
    // EC 0x25 (data abort, same EL), IL, WnR, DFSC 0b010000.
    assert_eq!(entered.el1.esr_el1, 0x9600_0050);
    assert_eq!(entered.el1.far_el1, 0xffff_0000_0900_1000);
    assert_eq!(entered.registers.pc, 0x4030_0a00);
    // From EL0: EC 0x24; a read.
    let from_el0 = Aarch64Exception::ExternalDataAbort {
        far: 0x1000,
        write: false,
    };
    assert_eq!(from_el0.syndrome(true), 0x9200_0010);
    assert_eq!(Aarch64Exception::Undefined.syndrome(true), 0x0200_0000);
}

#[test]
fn one_exception_at_a_time_and_refusals() {
    let (mut b, mut v) = trapped_in(pstate::MODE_EL1H, features());
    b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined)
        .unwrap();
    assert_eq!(
        b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined),
        Err(VcpuError::EventPending)
    );
    assert!(matches!(
        b.inject_event(&mut v, Event::Nmi),
        Err(VcpuError::Unsupported(_))
    ));
    b.run(&mut v).unwrap();
    // Taken: the next one may come.
    b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined)
        .unwrap();

    // A FEAT_GCS processor: refused at injection, nothing queued.
    let mut gcs = features();
    gcs.pstate.gcs = true;
    let (mut b, mut v) = trapped_in(pstate::MODE_EL1H, gcs);
    assert!(matches!(
        b.inject_aarch64_exception(&mut v, Aarch64Exception::Undefined),
        Err(VcpuError::Unsupported(_))
    ));
    assert_eq!(v.pending_exception(), None);

    // States the guest is never run in: AArch32 EL0 (vector 0x600 exists,
    // but Sluice does not resume AArch32) and EL2.
    let mut context = GuestContext::default();
    context.registers.pstate = pstate::AARCH32;
    assert_eq!(
        super::inject::vector_group(context.registers.pstate),
        Some(0x600)
    );
    assert!(matches!(
        super::inject::take_exception(
            &mut context,
            Aarch64Exception::Undefined,
            &PstateFeatures::default()
        ),
        Err(VcpuError::BadEvent(_))
    ));
    context.registers.pstate = 0b1001;
    assert_eq!(super::inject::vector_group(context.registers.pstate), None);
    assert!(matches!(
        super::inject::take_exception(
            &mut context,
            Aarch64Exception::Undefined,
            &PstateFeatures::default()
        ),
        Err(VcpuError::InvalidGuestState(_))
    ));
    assert_eq!(
        context,
        GuestContext {
            registers: Aarch64Registers {
                pstate: 0b1001,
                ..Default::default()
            },
            ..Default::default()
        }
    );
}
