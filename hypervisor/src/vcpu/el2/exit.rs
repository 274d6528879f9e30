//! From an exception a guest took to EL2 to a [`VcpuExit`]: the exception
//! class and syndrome of `ESR_EL2`, the faulting address from `FAR_EL2` and
//! `HPFAR_EL2` (Arm ARM DDI 0487, D19 "ESR_EL2", "HPFAR_EL2"; the ISS
//! layouts per exception class are in the ESR_EL2 description).

use crate::vcpu::{
    AccessKind, AccessSize, DecodedAccess, InstructionBytes, InstructionLength, MsrAccess,
    SystemRegisterAccess, SystemRegisterEncoding, VcpuExit,
};

/// Which of the four vectors of the lower-EL group the guest's exception
/// came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionKind {
    Synchronous,
    Irq,
    Fiq,
    SError,
}

/// What the world switch saw when the guest left: the exception kind and
/// the EL2 syndrome registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitSyndrome {
    pub kind: ExceptionKind,
    pub esr: u64,
    pub far: u64,
    pub hpfar: u64,
}

/// `ESR_EL2.EC` values (bits 31:26) Sluice handles.
pub mod ec {
    pub const UNKNOWN: u64 = 0x00;
    pub const WFX: u64 = 0x01;
    pub const HVC32: u64 = 0x12;
    pub const SMC32: u64 = 0x13;
    pub const HVC64: u64 = 0x16;
    pub const SMC64: u64 = 0x17;
    pub const SYSREG: u64 = 0x18;
    pub const INSTRUCTION_ABORT_LOWER: u64 = 0x20;
    pub const DATA_ABORT_LOWER: u64 = 0x24;
}

/// `ESR_EL2.IL` (bit 25): the trapped instruction is 32 bits long (else a
/// 16-bit T32 one).
const IL: u64 = 1 << 25;
const ISS_MASK: u64 = (1 << 25) - 1;

/// ISS of a trapped MSR, MRS or system instruction (EC 0x18, "ISS encoding
/// for an exception from MSR, MRS, or System instruction execution in
/// AArch64 state").
mod sysreg {
    pub const OP0_SHIFT: u32 = 20;
    pub const OP2_SHIFT: u32 = 17;
    pub const OP1_SHIFT: u32 = 14;
    pub const CRN_SHIFT: u32 = 10;
    pub const RT_SHIFT: u32 = 5;
    pub const CRM_SHIFT: u32 = 1;
    /// 1: read (`MRS`, `SYSL`); 0: write (`MSR`, `SYS`).
    pub const DIRECTION_READ: u64 = 1;
}

/// Decodes the ISS of a trapped MSR/MRS/system instruction.
pub const fn decode_system_register(iss: u64) -> SystemRegisterAccess {
    const fn field(iss: u64, shift: u32, bits: u32) -> u8 {
        ((iss >> shift) & ((1 << bits) - 1)) as u8
    }
    SystemRegisterAccess {
        encoding: SystemRegisterEncoding::new(
            field(iss, sysreg::OP0_SHIFT, 2),
            field(iss, sysreg::OP1_SHIFT, 3),
            field(iss, sysreg::CRN_SHIFT, 4),
            field(iss, sysreg::CRM_SHIFT, 4),
            field(iss, sysreg::OP2_SHIFT, 3),
        ),
        register: field(iss, sysreg::RT_SHIFT, 5),
        access: if iss & sysreg::DIRECTION_READ != 0 {
            MsrAccess::Read
        } else {
            MsrAccess::Write
        },
    }
}

/// Data-abort ISS fields.
mod dabt {
    /// Instruction syndrome valid: SAS, SSE, SRT, SF describe the access.
    pub const ISV: u64 = 1 << 24;
    pub const SAS_SHIFT: u32 = 22;
    pub const SSE: u64 = 1 << 21;
    pub const SRT_SHIFT: u32 = 16;
    pub const SF: u64 = 1 << 15;
    /// FAR_EL2 is not valid.
    pub const FNV: u64 = 1 << 10;
    /// A cache-maintenance instruction faulted.
    pub const CM: u64 = 1 << 8;
    /// The fault happened on the guest's own stage-1 table walk.
    pub const S1PTW: u64 = 1 << 7;
    /// Write not read.
    pub const WNR: u64 = 1 << 6;
}

/// PSCI function IDs (Arm DEN0022, "Function IDs"): 0x8400_0000-0x8400_001F
/// (SMC32) and 0xC400_0000-0xC400_001F (SMC64).
pub const fn is_psci_function(x0: u64) -> bool {
    let id = x0 & 0xffff_ffff;
    x0 >> 32 == 0 && matches!(id & !0x1f, 0x8400_0000 | 0xc400_0000)
}

/// The kind of a stage-2 fault status code (DFSC/IFSC, bits 5:0), or `None`
/// for codes that are not stage-2 translation-table faults (external
/// aborts, TLB conflicts, ...), whose address registers do not describe
/// an IPA.
fn stage2_fault(fsc: u64) -> Option<bool> {
    match fsc >> 2 {
        // Address size and translation faults: nothing mapped.
        0b0000 | 0b0001 => Some(false),
        // Access flag and permission faults: a mapping exists.
        0b0010 | 0b0011 => Some(true),
        _ => None,
    }
}

/// The faulting IPA's page from `HPFAR_EL2.FIPA` (bits 43:4 hold IPA
/// bits 51:12).
pub const fn hpfar_page(hpfar: u64) -> u64 {
    ((hpfar >> 4) & ((1 << 40) - 1)) << 12
}

/// A decoded exit: the reason, the length of the instruction to skip when
/// the exit is handled, and how far `ELR_EL2` is past that instruction
/// (HVC's preferred return address is the next instruction, every other
/// trapped instruction's is itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedExit {
    pub reason: VcpuExit,
    pub length: InstructionLength,
    pub elr_past_instruction: bool,
}

fn unknown(esr: u64) -> DecodedExit {
    DecodedExit {
        reason: VcpuExit::Unknown { code: esr },
        length: InstructionLength::Unknown,
        elr_past_instruction: false,
    }
}

/// Decodes `syndrome` for a guest whose X0 and X1 are `x0`, `x1`.
pub fn decode_exit(syndrome: &ExitSyndrome, x0: u64, x1: u64) -> DecodedExit {
    let esr = syndrome.esr;
    match syndrome.kind {
        ExceptionKind::Irq | ExceptionKind::Fiq => {
            return DecodedExit {
                reason: VcpuExit::ExternalInterrupt,
                length: InstructionLength::Unknown,
                elr_past_instruction: false,
            };
        }
        ExceptionKind::SError => return unknown(esr),
        ExceptionKind::Synchronous => {}
    }
    let class = (esr >> 26) & 0x3f;
    let iss = esr & ISS_MASK;
    let length = InstructionLength::Known(if esr & IL != 0 { 4 } else { 2 });
    let with = |reason| DecodedExit {
        reason,
        length,
        elr_past_instruction: false,
    };
    match class {
        ec::WFX => {
            // ISS.TI: 0b00 WFI, 0b01 WFE, 0b10 WFIT, 0b11 WFET.
            if iss & 1 == 0 {
                with(VcpuExit::Hlt)
            } else {
                with(VcpuExit::Yield)
            }
        }
        ec::HVC64 if iss & 0xffff == 0 => DecodedExit {
            reason: VcpuExit::Hypercall {
                command: sluice_abi::regs::aarch64_command(x0).unwrap_or(x0),
                argument: x1,
            },
            length,
            elr_past_instruction: true,
        },
        // A trapped SMC (its ELR is the SMC itself): PSCI calls go to the
        // hypercall path (which answers them NOT_SUPPORTED), any other is
        // reported for the exit handler to refuse.
        ec::SMC64 if iss & 0xffff == 0 && is_psci_function(x0) => with(VcpuExit::Hypercall {
            command: x0,
            argument: x1,
        }),
        ec::SMC64 => with(VcpuExit::SecureMonitorCall {
            function: x0,
            immediate: (iss & 0xffff) as u16,
        }),
        ec::SYSREG => with(VcpuExit::SystemRegister(decode_system_register(iss))),
        ec::UNKNOWN => with(VcpuExit::UndefinedInstruction),
        ec::DATA_ABORT_LOWER => decode_data_abort(syndrome, iss, length),
        ec::INSTRUCTION_ABORT_LOWER => {
            let Some(present) = stage2_fault(iss & 0x3f) else {
                return unknown(esr);
            };
            if iss & dabt::FNV != 0 {
                return unknown(esr);
            }
            with(VcpuExit::NestedPageFault {
                gpa: hpfar_page(syndrome.hpfar) | (syndrome.far & 0xfff),
                access: AccessKind::Execute,
                present,
                instruction: InstructionBytes::default(),
            })
        }
        _ => unknown(esr),
    }
}

fn decode_data_abort(syndrome: &ExitSyndrome, iss: u64, length: InstructionLength) -> DecodedExit {
    let esr = syndrome.esr;
    let Some(present) = stage2_fault(iss & 0x3f) else {
        return unknown(esr);
    };
    let with = |reason| DecodedExit {
        reason,
        length,
        elr_past_instruction: false,
    };
    let page = hpfar_page(syndrome.hpfar);
    let access = if iss & dabt::WNR != 0 {
        AccessKind::Write
    } else {
        AccessKind::Read
    };
    if iss & dabt::S1PTW != 0 {
        // The guest's page tables are not in its RAM: HPFAR names the
        // table's page, FAR the address being translated.
        return with(VcpuExit::NestedPageFault {
            gpa: page,
            access: AccessKind::Read,
            present,
            instruction: InstructionBytes::default(),
        });
    }
    if iss & (dabt::CM | dabt::FNV) != 0 {
        // Cache maintenance on an unmapped address, or no faulting address:
        // nothing to emulate.
        return unknown(esr);
    }
    let gpa = page | (syndrome.far & 0xfff);
    if iss & dabt::ISV == 0 {
        return with(VcpuExit::UndecodableMmio { gpa, access });
    }
    let size = match (iss >> dabt::SAS_SHIFT) & 0b11 {
        0 => AccessSize::Byte,
        1 => AccessSize::Word,
        2 => AccessSize::Dword,
        _ => AccessSize::Qword,
    };
    with(VcpuExit::DecodedMmio {
        gpa,
        access: DecodedAccess {
            size,
            kind: access,
            register: ((iss >> dabt::SRT_SHIFT) & 0x1f) as u8,
            sign_extend: iss & dabt::SSE != 0,
            register_64: iss & dabt::SF != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(esr: u64) -> ExitSyndrome {
        ExitSyndrome {
            kind: ExceptionKind::Synchronous,
            esr,
            far: 0,
            hpfar: 0,
        }
    }

    /// ESR_EL2 of `class` with IL set and `iss`.
    fn esr(class: u64, iss: u64) -> u64 {
        (class << 26) | IL | iss
    }

    #[test]
    fn hvc_is_a_hypercall_with_elr_past_it() {
        let x0 = sluice_abi::regs::AARCH64_FUNCTION_BASE | sluice_abi::cmd::IOAS_MAP;
        let d = decode_exit(&sync(esr(ec::HVC64, 0)), x0, 0x4000_5000);
        assert_eq!(
            d.reason,
            VcpuExit::Hypercall {
                command: sluice_abi::cmd::IOAS_MAP,
                argument: 0x4000_5000
            }
        );
        assert_eq!(d.length, InstructionLength::Known(4));
        assert!(d.elr_past_instruction);
        // A foreign function ID is reported as it is (the hypercall path
        // answers it NOT_SUPPORTED).
        let d = decode_exit(&sync(esr(ec::HVC64, 0)), 0x8400_0000, 0);
        assert_eq!(
            d.reason,
            VcpuExit::Hypercall {
                command: 0x8400_0000,
                argument: 0
            }
        );
        // HVC #1 is not the SMCCC conduit.
        let e = esr(ec::HVC64, 1);
        assert_eq!(
            decode_exit(&sync(e), x0, 0).reason,
            VcpuExit::Unknown { code: e }
        );
    }

    #[test]
    fn smc_only_for_psci() {
        let d = decode_exit(&sync(esr(ec::SMC64, 0)), 0x8400_0008, 0);
        assert_eq!(
            d.reason,
            VcpuExit::Hypercall {
                command: 0x8400_0008,
                argument: 0
            }
        );
        assert!(!d.elr_past_instruction, "a trapped SMC's ELR is the SMC");
        assert!(is_psci_function(0xc400_0003));
        assert!(!is_psci_function(0xc400_0020));
        assert!(!is_psci_function(0x1_8400_0000));
        // Any other SMC is reported with its function ID and immediate, at
        // the SMC (the exit handler makes it UNDEFINED for the guest).
        let d = decode_exit(&sync(esr(ec::SMC64, 0)), 0xc200_0001, 0);
        assert_eq!(
            d.reason,
            VcpuExit::SecureMonitorCall {
                function: 0xc200_0001,
                immediate: 0
            }
        );
        assert_eq!(d.length, InstructionLength::Known(4));
        assert!(!d.elr_past_instruction);
        // SMC #5 is not the SMCCC conduit, even with a PSCI function ID.
        assert_eq!(
            decode_exit(&sync(esr(ec::SMC64, 5)), 0x8400_0000, 0).reason,
            VcpuExit::SecureMonitorCall {
                function: 0x8400_0000,
                immediate: 5
            }
        );
    }

    #[test]
    fn trapped_system_registers_and_instructions() {
        // MRS X3, ACTLR_EL1: Op0 3, Op2 1, Op1 0, CRn 1, Rt 3, CRm 0, read.
        let iss = (3 << 20) | (1 << 17) | (1 << 10) | (3 << 5) | 1;
        let d = decode_exit(&sync(esr(ec::SYSREG, iss)), 0, 0);
        let expected = SystemRegisterAccess {
            encoding: SystemRegisterEncoding::ACTLR_EL1,
            register: 3,
            access: MsrAccess::Read,
        };
        assert_eq!(d.reason, VcpuExit::SystemRegister(expected));
        assert_eq!(d.length, InstructionLength::Known(4));
        assert!(!d.elr_past_instruction, "a trapped MRS's ELR is the MRS");
        assert_eq!(
            alloc::format!("{expected}"),
            "MRS X3, S3_0_C1_C0_1 (ACTLR_EL1)"
        );
        // MSR CNTP_CTL_EL0, XZR: Op0 3, Op2 1, Op1 3, CRn 14, Rt 31, CRm 2,
        // write.
        let iss = (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (31 << 5) | (2 << 1);
        let VcpuExit::SystemRegister(a) = decode_exit(&sync(esr(ec::SYSREG, iss)), 0, 0).reason
        else {
            panic!("not a system register exit");
        };
        assert_eq!(
            (a.encoding, a.register, a.access),
            (SystemRegisterEncoding::CNTP_CTL_EL0, 31, MsrAccess::Write)
        );
        assert_eq!(
            alloc::format!("{a}"),
            "MSR S3_3_C14_C2_1 (CNTP_CTL_EL0), XZR"
        );
        // DC CISW, X0 (SYS: Op0 1, Op1 0, CRn 7, CRm 14, Op2 2, write).
        let iss = (1 << 20) | (2 << 17) | (7 << 10) | (14 << 1);
        let VcpuExit::SystemRegister(a) = decode_exit(&sync(esr(ec::SYSREG, iss)), 0, 0).reason
        else {
            panic!("not a system register exit");
        };
        assert!(a.encoding.is_set_way_maintenance() && a.encoding.is_instruction());
        assert_eq!(alloc::format!("{a}"), "SYS S1_0_C7_C14_2 (DC CISW), X0");
        // An IMPLEMENTATION DEFINED register, every field at its maximum
        // but CRn: MRS X30, S3_7_C15_C15_7.
        let iss = (3 << 20) | (7 << 17) | (7 << 14) | (15 << 10) | (30 << 5) | (15 << 1) | 1;
        let VcpuExit::SystemRegister(a) = decode_exit(&sync(esr(ec::SYSREG, iss)), 0, 0).reason
        else {
            panic!("not a system register exit");
        };
        assert_eq!(a.encoding, SystemRegisterEncoding::new(3, 7, 15, 15, 7));
        assert!(a.encoding.is_implementation_defined() && !a.encoding.is_set_way_maintenance());
        assert_eq!(
            alloc::format!("{a}"),
            "MRS X30, S3_7_C15_C15_7 (IMPLEMENTATION DEFINED)"
        );
        // SYSL X1, IMPLEMENTATION DEFINED instruction space (Op0 1, CRn 11).
        let iss = (1 << 20) | (11 << 10) | (1 << 5) | 1;
        let VcpuExit::SystemRegister(a) = decode_exit(&sync(esr(ec::SYSREG, iss)), 0, 0).reason
        else {
            panic!("not a system register exit");
        };
        assert_eq!(
            alloc::format!("{a}"),
            "SYSL X1, S1_0_C11_C0_0 (IMPLEMENTATION DEFINED)"
        );
        // An encoding Sluice has no name for; bits above the ISS ignored.
        let e = esr(ec::SYSREG, (3 << 20) | (2 << 10)) | (0x1f << 32);
        let VcpuExit::SystemRegister(a) = decode_exit(&sync(e), 0, 0).reason else {
            panic!("not a system register exit");
        };
        assert_eq!(alloc::format!("{a}"), "MSR S3_0_C2_C0_0, X0");
        assert_eq!(a.encoding.name(), None);
    }

    #[test]
    fn wfi_halts_wfe_yields() {
        let d = decode_exit(&sync(esr(ec::WFX, 0)), 0, 0);
        assert_eq!(d.reason, VcpuExit::Hlt);
        assert_eq!(d.length, InstructionLength::Known(4));
        assert_eq!(
            decode_exit(&sync(esr(ec::WFX, 1)), 0, 0).reason,
            VcpuExit::Yield
        );
        // WFIT (TI = 0b10) waits like WFI.
        assert_eq!(
            decode_exit(&sync(esr(ec::WFX, 2)), 0, 0).reason,
            VcpuExit::Hlt
        );
        // A 16-bit T32 WFI (IL clear).
        let d = decode_exit(&sync(ec::WFX << 26), 0, 0);
        assert_eq!(d.length, InstructionLength::Known(2));
    }

    #[test]
    fn data_abort_with_syndrome() {
        // STRB W5, [X1] to IPA 0x0900_0000: ISV, SAS 0, SRT 5, WnR,
        // translation fault level 3 (DFSC 0b000111).
        let iss = dabt::ISV | (5 << dabt::SRT_SHIFT) | dabt::WNR | 0b000111;
        let s = ExitSyndrome {
            kind: ExceptionKind::Synchronous,
            esr: esr(ec::DATA_ABORT_LOWER, iss),
            far: 0x0900_0000,
            hpfar: (0x0900_0000 >> 12) << 4,
        };
        let d = decode_exit(&s, 0, 0);
        assert_eq!(
            d.reason,
            VcpuExit::DecodedMmio {
                gpa: 0x0900_0000,
                access: DecodedAccess {
                    size: AccessSize::Byte,
                    kind: AccessKind::Write,
                    register: 5,
                    sign_extend: false,
                    register_64: false,
                }
            }
        );
        assert_eq!(d.length, InstructionLength::Known(4));
        // LDRSH X30, [..] at an ECAM offset: FAR gives the low 12 bits, the
        // page comes from HPFAR (FAR is the guest's virtual address).
        let iss = dabt::ISV
            | (1 << dabt::SAS_SHIFT)
            | dabt::SSE
            | (30 << dabt::SRT_SHIFT)
            | dabt::SF
            | 0b000110;
        let s = ExitSyndrome {
            kind: ExceptionKind::Synchronous,
            esr: esr(ec::DATA_ABORT_LOWER, iss),
            far: 0xffff_0000_1234_5ffe,
            hpfar: (0x3f00_8000u64 >> 12) << 4 | (1 << 63),
        };
        assert_eq!(
            decode_exit(&s, 0, 0).reason,
            VcpuExit::DecodedMmio {
                gpa: 0x3f00_8ffe,
                access: DecodedAccess {
                    size: AccessSize::Word,
                    kind: AccessKind::Read,
                    register: 30,
                    sign_extend: true,
                    register_64: true,
                }
            }
        );
        // Doubleword.
        let iss = dabt::ISV | (3 << dabt::SAS_SHIFT) | dabt::SF | 0b000101;
        let s = ExitSyndrome {
            esr: esr(ec::DATA_ABORT_LOWER, iss),
            ..s
        };
        assert!(matches!(
            decode_exit(&s, 0, 0).reason,
            VcpuExit::DecodedMmio {
                access: DecodedAccess {
                    size: AccessSize::Qword,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn data_abort_without_syndrome_or_address() {
        let base = ExitSyndrome {
            kind: ExceptionKind::Synchronous,
            esr: esr(ec::DATA_ABORT_LOWER, dabt::WNR | 0b000111),
            far: 0x3f00_0010,
            hpfar: (0x3f00_0000 >> 12) << 4,
        };
        assert_eq!(
            decode_exit(&base, 0, 0).reason,
            VcpuExit::UndecodableMmio {
                gpa: 0x3f00_0010,
                access: AccessKind::Write
            }
        );
        // FnV: no faulting address; CM: cache maintenance; an external
        // abort (DFSC 0b010000): none can be emulated.
        for iss in [
            dabt::ISV | dabt::FNV | 0b000111,
            dabt::ISV | dabt::CM | dabt::WNR | 0b000111,
            dabt::ISV | 0b010000,
        ] {
            let s = ExitSyndrome {
                esr: esr(ec::DATA_ABORT_LOWER, iss),
                ..base
            };
            assert_eq!(
                decode_exit(&s, 0, 0).reason,
                VcpuExit::Unknown { code: s.esr }
            );
        }
        // A fault on the guest's own table walk names the table page.
        let s = ExitSyndrome {
            esr: esr(ec::DATA_ABORT_LOWER, dabt::S1PTW | 0b000101),
            far: 0x1234_5678,
            hpfar: (0x7000_0000 >> 12) << 4,
            ..base
        };
        assert_eq!(
            decode_exit(&s, 0, 0).reason,
            VcpuExit::NestedPageFault {
                gpa: 0x7000_0000,
                access: AccessKind::Read,
                present: false,
                instruction: InstructionBytes::default()
            }
        );
        // A permission fault is on a present mapping.
        let s = ExitSyndrome {
            esr: esr(ec::DATA_ABORT_LOWER, dabt::WNR | 0b001111),
            ..base
        };
        assert!(matches!(
            decode_exit(&s, 0, 0).reason,
            VcpuExit::UndecodableMmio { .. }
        ));
    }

    #[test]
    fn instruction_abort_interrupts_and_others() {
        let s = ExitSyndrome {
            kind: ExceptionKind::Synchronous,
            esr: esr(ec::INSTRUCTION_ABORT_LOWER, 0b000110),
            far: 0x1000_0004,
            hpfar: (0x1000_0000 >> 12) << 4,
        };
        assert_eq!(
            decode_exit(&s, 0, 0).reason,
            VcpuExit::NestedPageFault {
                gpa: 0x1000_0004,
                access: AccessKind::Execute,
                present: false,
                instruction: InstructionBytes::default()
            }
        );
        for kind in [ExceptionKind::Irq, ExceptionKind::Fiq] {
            let d = decode_exit(&ExitSyndrome { kind, ..s }, 0, 0);
            assert_eq!(d.reason, VcpuExit::ExternalInterrupt);
            assert_eq!(d.length, InstructionLength::Unknown);
        }
        let serror = ExitSyndrome {
            kind: ExceptionKind::SError,
            esr: 0xbe00_0000,
            ..s
        };
        assert_eq!(
            decode_exit(&serror, 0, 0).reason,
            VcpuExit::Unknown { code: 0xbe00_0000 }
        );
        // An instruction reported for an unknown reason (IL is RES1).
        let d = decode_exit(&sync(esr(ec::UNKNOWN, 0)), 0, 0);
        assert_eq!(d.reason, VcpuExit::UndefinedInstruction);
        assert_eq!(d.length, InstructionLength::Known(4));
        assert!(!d.elr_past_instruction);
        // Exception classes Sluice does not handle (a trapped FP access,
        // a breakpoint) stay unknown: the VM stops.
        for e in [esr(0x07, 0), esr(0x3c, 0)] {
            assert_eq!(
                decode_exit(&sync(e), 0, 0).reason,
                VcpuExit::Unknown { code: e }
            );
        }
        assert_eq!(hpfar_page(0xffff_ffff_ffff_ffff), 0x000f_ffff_ffff_f000);
    }
}
