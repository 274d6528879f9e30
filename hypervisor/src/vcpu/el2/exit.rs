//! From an exception a guest took to EL2 to a [`VcpuExit`]: the exception
//! class and syndrome of `ESR_EL2`, the faulting address from `FAR_EL2` and
//! `HPFAR_EL2` (Arm ARM DDI 0487, D19 "ESR_EL2", "HPFAR_EL2"; the ISS
//! layouts per exception class are in the ESR_EL2 description).

use crate::vcpu::{
    AccessKind, AccessSize, DecodedAccess, InstructionBytes, InstructionLength, VcpuExit,
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
        // A trapped SMC: only PSCI calls are answered (as not supported by
        // the hypercall path), anything else stops the VM.
        ec::SMC64 if iss & 0xffff == 0 && is_psci_function(x0) => with(VcpuExit::Hypercall {
            command: x0,
            argument: x1,
        }),
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
        let e = esr(ec::SMC64, 0);
        assert_eq!(
            decode_exit(&sync(e), 0xc600_0001, 0).reason,
            VcpuExit::Unknown { code: e }
        );
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
        // A trapped MSR/MRS, an unknown instruction.
        for e in [esr(ec::SYSREG, 0x30_0000), esr(ec::UNKNOWN, 0)] {
            assert_eq!(
                decode_exit(&sync(e), 0, 0).reason,
                VcpuExit::Unknown { code: e }
            );
        }
        assert_eq!(hpfar_page(0xffff_ffff_ffff_ffff), 0x000f_ffff_ffff_f000);
    }
}
