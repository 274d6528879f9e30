//! VMX exit reasons (Intel SDM vol. 3, appendix C, "VMX Basic Exit
//! Reasons"), exit qualifications ("Exit Qualification for I/O
//! Instructions", "Exit Qualification for EPT Violations") and their
//! decoding into [`VcpuExit`].

use super::super::{
    AccessKind, AccessSize, Exit, GuestRegisters, InstructionBytes, InstructionLength, IoDirection,
    MsrAccess, PortIo, VcpuExit, gpr,
};

/// Basic exit reasons (bits 15:0 of the exit-reason field).
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const IO_SMI: u16 = 5;
    pub const OTHER_SMI: u16 = 6;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const GETSEC: u16 = 11;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const INVLPG: u16 = 14;
    pub const RDPMC: u16 = 15;
    pub const RDTSC: u16 = 16;
    pub const RSM: u16 = 17;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMLAUNCH: u16 = 20;
    pub const VMPTRLD: u16 = 21;
    pub const VMPTRST: u16 = 22;
    pub const VMREAD: u16 = 23;
    pub const VMRESUME: u16 = 24;
    pub const VMWRITE: u16 = 25;
    pub const VMXOFF: u16 = 26;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const MOV_DR: u16 = 29;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const INVALID_GUEST_STATE: u16 = 33;
    pub const MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR_TRAP_FLAG: u16 = 37;
    pub const MONITOR: u16 = 39;
    pub const PAUSE: u16 = 40;
    pub const MACHINE_CHECK: u16 = 41;
    pub const TPR_BELOW_THRESHOLD: u16 = 43;
    pub const APIC_ACCESS: u16 = 44;
    pub const VIRTUALIZED_EOI: u16 = 45;
    pub const GDTR_IDTR_ACCESS: u16 = 46;
    pub const LDTR_TR_ACCESS: u16 = 47;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIGURATION: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const RDTSCP: u16 = 51;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    pub const APIC_WRITE: u16 = 56;
    pub const RDRAND: u16 = 57;
    pub const INVPCID: u16 = 58;
    pub const VMFUNC: u16 = 59;
    pub const ENCLS: u16 = 60;
    pub const RDSEED: u16 = 61;
    pub const PML_FULL: u16 = 62;
    pub const XSAVES: u16 = 63;
    pub const XRSTORS: u16 = 64;
}

/// Bit 31 of the exit reason: the VM entry failed.
pub const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// I/O exit qualification fields.
pub mod io {
    /// Bits 2:0: size of access minus one (0, 1 or 3).
    pub const SIZE_MASK: u64 = 0x7;
    /// Bit 3: 1 = IN.
    pub const DIRECTION_IN: u64 = 1 << 3;
    pub const STRING: u64 = 1 << 4;
    pub const REP: u64 = 1 << 5;
    /// Bit 6: 1 = port from the immediate operand, 0 = DX.
    pub const IMMEDIATE: u64 = 1 << 6;
    pub const PORT_SHIFT: u32 = 16;
}

/// EPT violation exit qualification bits.
pub mod ept {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const FETCH: u64 = 1 << 2;
    /// Bits 5:3: the access rights of the EPT entries (the AND over the
    /// walk): any set means a translation existed.
    pub const READABLE: u64 = 1 << 3;
    pub const WRITABLE: u64 = 1 << 4;
    pub const EXECUTABLE: u64 = 1 << 5;
    pub const LINEAR_ADDRESS_VALID: u64 = 1 << 7;
    /// With bit 7: the access was to the translated linear address (1),
    /// not to a guest paging structure (0).
    pub const TRANSLATED_ACCESS: u64 = 1 << 8;
    pub const NMI_UNBLOCKING: u64 = 1 << 12;
}

/// Interruption-information format (VM-exit interruption information,
/// IDT-vectoring information, VM-entry interruption information): vector
/// 7:0, type 10:8, error code valid 11, valid 31.
pub mod interruption {
    pub const VALID: u32 = 1 << 31;
    pub const ERROR_CODE_VALID: u32 = 1 << 11;
    pub const TYPE_EXTERNAL_INTERRUPT: u32 = 0;
    pub const TYPE_NMI: u32 = 2;
    pub const TYPE_HARDWARE_EXCEPTION: u32 = 3;
    pub const TYPE_SOFTWARE_INTERRUPT: u32 = 4;
    pub const TYPE_PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const TYPE_SOFTWARE_EXCEPTION: u32 = 6;

    pub const fn encode(vector: u8, typ: u32, error_code: bool) -> u32 {
        VALID | (vector as u32) | ((typ & 7) << 8) | if error_code { ERROR_CODE_VALID } else { 0 }
    }
}

/// The exit-information fields of one exit, as read from the VMCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmxExitInfo {
    pub reason: u32,
    pub qualification: u64,
    pub guest_physical_address: u64,
    pub instruction_length: u32,
    pub interruption_info: u32,
    pub interruption_error_code: u32,
    pub rip: u64,
}

/// A decoded EPT violation qualification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptViolation {
    pub access: AccessKind,
    /// The guest-physical address had a translation (a permission fault).
    pub present: bool,
    /// The access was to guest paging structures, not data.
    pub paging_structure: bool,
}

/// Decodes an EPT violation qualification. An instruction fetch wins over
/// a write, a write over a read (a locked read-modify-write sets both).
pub const fn decode_ept_violation(qualification: u64) -> EptViolation {
    let access = if qualification & ept::FETCH != 0 {
        AccessKind::Execute
    } else if qualification & ept::WRITE != 0 {
        AccessKind::Write
    } else {
        AccessKind::Read
    };
    EptViolation {
        access,
        present: qualification & (ept::READABLE | ept::WRITABLE | ept::EXECUTABLE) != 0,
        paging_structure: qualification & ept::LINEAR_ADDRESS_VALID != 0
            && qualification & ept::TRANSLATED_ACCESS == 0,
    }
}

/// Decodes an I/O qualification, or `None` for a reserved size.
pub const fn decode_io(qualification: u64, rax: u64) -> Option<PortIo> {
    let size = match qualification & io::SIZE_MASK {
        0 => AccessSize::Byte,
        1 => AccessSize::Word,
        3 => AccessSize::Dword,
        _ => return None,
    };
    let direction = if qualification & io::DIRECTION_IN != 0 {
        IoDirection::In
    } else {
        IoDirection::Out
    };
    let string = qualification & io::STRING != 0;
    let out_value = matches!(direction, IoDirection::Out) && !string;
    Some(PortIo {
        port: (qualification >> io::PORT_SHIFT) as u16,
        size,
        direction,
        string,
        rep: qualification & io::REP != 0,
        value: if out_value {
            (rax & size.mask()) as u32
        } else {
            0
        },
    })
}

/// Decodes an exit. `gprs` holds all guest GPRs (VMX saves none of them).
/// An exit that is not an instruction has no length; an unknown or
/// malformed exit decodes to [`VcpuExit::Unknown`] with the basic reason.
pub fn decode_exit(info: &VmxExitInfo, gprs: &GuestRegisters) -> Exit {
    let basic = info.reason as u16;
    let length = match info.instruction_length {
        n @ 1..=15 => InstructionLength::Known(n as u8),
        _ => InstructionLength::Unknown,
    };
    let rax = gprs.gprs[gpr::RAX];
    let unknown = Exit {
        reason: VcpuExit::Unknown {
            code: u64::from(basic),
        },
        rip: info.rip,
        length: InstructionLength::Unknown,
    };
    let (reason, is_instruction) = match basic {
        reason::VMCALL => (
            VcpuExit::Hypercall {
                command: rax,
                argument: gprs.gprs[gpr::RBX],
            },
            true,
        ),
        reason::CPUID => (
            VcpuExit::Cpuid {
                leaf: rax as u32,
                subleaf: gprs.gprs[gpr::RCX] as u32,
            },
            true,
        ),
        reason::HLT => (VcpuExit::Hlt, true),
        reason::INVD => (VcpuExit::Invd, true),
        reason::WBINVD => (VcpuExit::Wbinvd, true),
        reason::RDMSR => (
            VcpuExit::Msr {
                access: MsrAccess::Read,
                index: gprs.gprs[gpr::RCX] as u32,
                value: 0,
            },
            true,
        ),
        reason::WRMSR => (
            VcpuExit::Msr {
                access: MsrAccess::Write,
                index: gprs.gprs[gpr::RCX] as u32,
                value: (gprs.gprs[gpr::RDX] << 32) | (rax & 0xffff_ffff),
            },
            true,
        ),
        reason::IO_INSTRUCTION => match decode_io(info.qualification, rax) {
            Some(io) => (VcpuExit::PortIo(io), true),
            None => return unknown,
        },
        reason::EPT_VIOLATION => {
            let v = decode_ept_violation(info.qualification);
            (
                VcpuExit::NestedPageFault {
                    gpa: info.guest_physical_address,
                    access: v.access,
                    present: v.present,
                    instruction: InstructionBytes::default(),
                },
                false,
            )
        }
        reason::TRIPLE_FAULT => (VcpuExit::Shutdown, false),
        reason::INTERRUPT_WINDOW => (VcpuExit::InterruptWindow, false),
        reason::EXTERNAL_INTERRUPT => (VcpuExit::ExternalInterrupt, false),
        reason::EXCEPTION_OR_NMI => {
            let ii = info.interruption_info;
            if ii & interruption::VALID == 0 {
                return unknown;
            }
            match (ii >> 8) & 7 {
                interruption::TYPE_NMI => (VcpuExit::ExternalInterrupt, false),
                interruption::TYPE_HARDWARE_EXCEPTION
                | interruption::TYPE_SOFTWARE_EXCEPTION
                | interruption::TYPE_PRIVILEGED_SOFTWARE_EXCEPTION => (
                    VcpuExit::Exception {
                        vector: ii as u8,
                        error_code: (ii & interruption::ERROR_CODE_VALID != 0)
                            .then_some(info.interruption_error_code),
                    },
                    false,
                ),
                _ => return unknown,
            }
        }
        _ => return unknown,
    };
    Exit {
        reason,
        rip: info.rip,
        length: if is_instruction {
            length
        } else {
            InstructionLength::Unknown
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> GuestRegisters {
        let mut r = GuestRegisters::new();
        r.gprs[gpr::RAX] = 0xffff_ffff_0000_0085;
        r.gprs[gpr::RBX] = 0x5000;
        r.gprs[gpr::RCX] = 0xc000_0080;
        r.gprs[gpr::RDX] = 0x1;
        r
    }

    fn info(reason: u16, qualification: u64, length: u32) -> VmxExitInfo {
        VmxExitInfo {
            reason: u32::from(reason),
            qualification,
            instruction_length: length,
            rip: 0x1000,
            ..Default::default()
        }
    }

    #[test]
    fn instruction_exits_carry_their_length() {
        assert_eq!(
            decode_exit(&info(reason::VMCALL, 0, 3), &regs()),
            Exit {
                reason: VcpuExit::Hypercall {
                    command: 0xffff_ffff_0000_0085,
                    argument: 0x5000
                },
                rip: 0x1000,
                length: InstructionLength::Known(3)
            }
        );
        assert_eq!(
            decode_exit(&info(reason::CPUID, 0, 2), &regs()).reason,
            VcpuExit::Cpuid {
                leaf: 0x85,
                subleaf: 0xc000_0080
            }
        );
        assert_eq!(
            decode_exit(&info(reason::WRMSR, 0, 2), &regs()).reason,
            VcpuExit::Msr {
                access: MsrAccess::Write,
                index: 0xc000_0080,
                value: 0x1_0000_0085
            }
        );
        assert_eq!(
            decode_exit(&info(reason::HLT, 0, 1), &regs()).reason,
            VcpuExit::Hlt
        );
        assert_eq!(
            decode_exit(&info(reason::WBINVD, 0, 2), &regs()).reason,
            VcpuExit::Wbinvd
        );
        assert_eq!(
            decode_exit(&info(reason::INVD, 0, 2), &regs()).reason,
            VcpuExit::Invd
        );
        // A length outside 1-15 is not trusted.
        assert_eq!(
            decode_exit(&info(reason::HLT, 0, 0), &regs()).length,
            InstructionLength::Unknown
        );
        assert_eq!(
            decode_exit(&info(reason::HLT, 0, 16), &regs()).length,
            InstructionLength::Unknown
        );
    }

    #[test]
    fn io_qualification() {
        // OUT DX, AX to 0xcfc: size 1 (2 bytes), port in 31:16.
        let q = (0xcfc << 16) | 1;
        assert_eq!(
            decode_exit(&info(reason::IO_INSTRUCTION, q, 2), &regs()),
            Exit {
                reason: VcpuExit::PortIo(PortIo {
                    port: 0xcfc,
                    size: AccessSize::Word,
                    direction: IoDirection::Out,
                    string: false,
                    rep: false,
                    value: 0x85
                }),
                rip: 0x1000,
                length: InstructionLength::Known(2)
            }
        );
        // REP INSD from port 0x60 (immediate form flag is irrelevant).
        let q = (0x60 << 16) | 3 | io::DIRECTION_IN | io::STRING | io::REP | io::IMMEDIATE;
        assert_eq!(
            decode_exit(&info(reason::IO_INSTRUCTION, q, 2), &regs()).reason,
            VcpuExit::PortIo(PortIo {
                port: 0x60,
                size: AccessSize::Dword,
                direction: IoDirection::In,
                string: true,
                rep: true,
                value: 0
            })
        );
        // Size encoding 2 is reserved.
        assert_eq!(
            decode_exit(&info(reason::IO_INSTRUCTION, 2, 1), &regs()).reason,
            VcpuExit::Unknown {
                code: u64::from(reason::IO_INSTRUCTION)
            }
        );
    }

    #[test]
    fn ept_violations() {
        let v =
            decode_ept_violation(ept::WRITE | ept::LINEAR_ADDRESS_VALID | ept::TRANSLATED_ACCESS);
        assert_eq!(
            v,
            EptViolation {
                access: AccessKind::Write,
                present: false,
                paging_structure: false
            }
        );
        let v = decode_ept_violation(ept::READ | ept::READABLE | ept::LINEAR_ADDRESS_VALID);
        assert_eq!(
            v,
            EptViolation {
                access: AccessKind::Read,
                present: true,
                paging_structure: true
            }
        );
        assert_eq!(
            decode_ept_violation(ept::FETCH | ept::READ).access,
            AccessKind::Execute
        );
        let mut i = info(reason::EPT_VIOLATION, ept::WRITE, 3);
        i.guest_physical_address = 0xe000_8004;
        let e = decode_exit(&i, &regs());
        assert_eq!(
            e.reason,
            VcpuExit::NestedPageFault {
                gpa: 0xe000_8004,
                access: AccessKind::Write,
                present: false,
                instruction: InstructionBytes::default()
            }
        );
        assert_eq!(
            e.length,
            InstructionLength::Unknown,
            "faults have no length"
        );
    }

    #[test]
    fn events_and_unknown_reasons() {
        let mut i = info(reason::EXCEPTION_OR_NMI, 0, 0);
        i.interruption_info = interruption::encode(13, interruption::TYPE_HARDWARE_EXCEPTION, true);
        i.interruption_error_code = 0x18;
        assert_eq!(
            decode_exit(&i, &regs()).reason,
            VcpuExit::Exception {
                vector: 13,
                error_code: Some(0x18)
            }
        );
        i.interruption_info = interruption::encode(2, interruption::TYPE_NMI, false);
        assert_eq!(decode_exit(&i, &regs()).reason, VcpuExit::ExternalInterrupt);
        i.interruption_info = 0;
        assert_eq!(
            decode_exit(&i, &regs()).reason,
            VcpuExit::Unknown { code: 0 }
        );
        assert_eq!(
            decode_exit(&info(reason::TRIPLE_FAULT, 0, 0), &regs()).reason,
            VcpuExit::Shutdown
        );
        assert_eq!(
            decode_exit(&info(reason::INTERRUPT_WINDOW, 0, 0), &regs()).reason,
            VcpuExit::InterruptWindow
        );
        assert_eq!(
            decode_exit(&info(reason::XSETBV, 0, 3), &regs()).reason,
            VcpuExit::Unknown {
                code: u64::from(reason::XSETBV)
            }
        );
        assert_eq!(interruption::encode(14, 3, true), 0x8000_0b0e);
    }
}
