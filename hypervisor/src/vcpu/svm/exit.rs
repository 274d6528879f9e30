//! SVM exit codes (AMD APM vol. 2, appendix C) and their decoding into
//! [`VcpuExit`].

use super::super::{
    AccessKind, AccessSize, Exit, GuestRegisters, InstructionBytes, InstructionLength, IoDirection,
    MsrAccess, PortIo, VcpuExit, exception_has_error_code, gpr,
};
use super::vmcb::Vmcb;

/// `EXITCODE` values (APM vol. 2, table C-1).
pub mod code {
    /// CR0–CR15 reads are 0x00–0x0F, writes 0x10–0x1F.
    pub const CR0_READ: u64 = 0x00;
    pub const CR0_WRITE: u64 = 0x10;
    /// DR0–DR15 reads 0x20–0x2F, writes 0x30–0x3F.
    pub const DR0_READ: u64 = 0x20;
    pub const DR0_WRITE: u64 = 0x30;
    /// Exception vector n exits with 0x40 + n.
    pub const EXCEPTION_BASE: u64 = 0x40;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const INIT: u64 = 0x63;
    pub const VINTR: u64 = 0x64;
    pub const CR0_SELECTIVE_WRITE: u64 = 0x65;
    pub const RDTSC: u64 = 0x6e;
    pub const RDPMC: u64 = 0x6f;
    pub const PUSHF: u64 = 0x70;
    pub const POPF: u64 = 0x71;
    pub const CPUID: u64 = 0x72;
    pub const RSM: u64 = 0x73;
    pub const IRET: u64 = 0x74;
    pub const SWINT: u64 = 0x75;
    pub const INVD: u64 = 0x76;
    pub const PAUSE: u64 = 0x77;
    pub const HLT: u64 = 0x78;
    pub const INVLPG: u64 = 0x79;
    pub const INVLPGA: u64 = 0x7a;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const TASK_SWITCH: u64 = 0x7d;
    pub const FERR_FREEZE: u64 = 0x7e;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const RDTSCP: u64 = 0x87;
    pub const ICEBP: u64 = 0x88;
    pub const WBINVD: u64 = 0x89;
    pub const MONITOR: u64 = 0x8a;
    pub const MWAIT: u64 = 0x8b;
    pub const MWAIT_CONDITIONAL: u64 = 0x8c;
    pub const XSETBV: u64 = 0x8d;
    pub const RDPRU: u64 = 0x8e;
    pub const EFER_WRITE_TRAP: u64 = 0x8f;
    pub const NPF: u64 = 0x400;
    pub const AVIC_INCOMPLETE_IPI: u64 = 0x401;
    pub const AVIC_NOACCEL: u64 = 0x402;
    pub const VMGEXIT: u64 = 0x403;
    /// VMRUN failed its consistency checks (-1).
    pub const INVALID: u64 = u64::MAX;
    /// The VMSA was busy (SEV-ES, -2).
    pub const BUSY: u64 = u64::MAX - 1;
}

/// IOIO `EXITINFO1` fields (APM vol. 2, 15.10.2, figure 15-2).
pub mod ioio {
    /// 1 = IN, 0 = OUT.
    pub const TYPE_IN: u64 = 1 << 0;
    pub const STRING: u64 = 1 << 2;
    pub const REP: u64 = 1 << 3;
    pub const SIZE8: u64 = 1 << 4;
    pub const SIZE16: u64 = 1 << 5;
    pub const SIZE32: u64 = 1 << 6;
    pub const PORT_SHIFT: u32 = 16;
}

/// Nested page fault `EXITINFO1` error-code bits (APM vol. 2, 15.25.6;
/// the #PF error code of 8.4.2 plus the nested bits).
pub mod npf {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const RESERVED_BIT: u64 = 1 << 3;
    pub const INSTRUCTION_FETCH: u64 = 1 << 4;
    /// The fault was on the final guest-physical address.
    pub const FINAL_ADDRESS: u64 = 1 << 32;
    /// The fault was on a guest page-table access.
    pub const PAGE_TABLE_WALK: u64 = 1 << 33;
}

/// Decodes the exit recorded in `vmcb`. `gprs` are the registers the run
/// loop saved (VMRUN keeps only RAX, RSP, RIP, RFLAGS in the VMCB);
/// `nrips` says whether the processor fills `nRIP` (CPUID Fn8000_000A EDX
/// bit 3).
///
/// A malformed `EXITINFO1` (e.g. an IOIO exit with no size bit) decodes to
/// [`VcpuExit::Unknown`] so that the VM is stopped, never resumed on a
/// guess.
pub fn decode_exit(vmcb: &Vmcb, gprs: &GuestRegisters, nrips: bool) -> Exit {
    let c = &vmcb.control;
    let rip = vmcb.save.rip;
    let rax = vmcb.save.rax;
    let length_from = |next: u64| match next.checked_sub(rip) {
        Some(n @ 1..=15) => InstructionLength::Known(n as u8),
        _ => InstructionLength::Unknown,
    };
    let instruction_length = if nrips {
        length_from(c.next_rip)
    } else {
        InstructionLength::Unknown
    };
    let unknown = Exit {
        reason: VcpuExit::Unknown { code: c.exit_code },
        rip,
        length: InstructionLength::Unknown,
    };
    let mut length = instruction_length;
    let reason = match c.exit_code {
        code::VMMCALL => VcpuExit::Hypercall {
            command: rax,
            argument: gprs.gprs[gpr::RBX],
        },
        code::CPUID => VcpuExit::Cpuid {
            leaf: rax as u32,
            subleaf: gprs.gprs[gpr::RCX] as u32,
        },
        code::HLT => VcpuExit::Hlt,
        code::WBINVD => VcpuExit::Wbinvd,
        code::INVD => VcpuExit::Invd,
        code::SHUTDOWN => VcpuExit::Shutdown,
        code::VINTR => VcpuExit::InterruptWindow,
        code::INTR | code::NMI | code::SMI | code::INIT => VcpuExit::ExternalInterrupt,
        code::MSR => {
            let index = gprs.gprs[gpr::RCX] as u32;
            match c.exit_info1 {
                0 => VcpuExit::Msr {
                    access: MsrAccess::Read,
                    index,
                    value: 0,
                },
                1 => VcpuExit::Msr {
                    access: MsrAccess::Write,
                    index,
                    value: (gprs.gprs[gpr::RDX] << 32) | (rax & 0xffff_ffff),
                },
                _ => return unknown,
            }
        }
        code::IOIO => {
            let info = c.exit_info1;
            let size = match info & (ioio::SIZE8 | ioio::SIZE16 | ioio::SIZE32) {
                ioio::SIZE8 => AccessSize::Byte,
                ioio::SIZE16 => AccessSize::Word,
                ioio::SIZE32 => AccessSize::Dword,
                _ => return unknown,
            };
            let direction = if info & ioio::TYPE_IN != 0 {
                IoDirection::In
            } else {
                IoDirection::Out
            };
            let string = info & ioio::STRING != 0;
            // EXITINFO2 holds the next RIP for IOIO, NRIPS or not.
            length = length_from(c.exit_info2);
            VcpuExit::PortIo(PortIo {
                port: (info >> ioio::PORT_SHIFT) as u16,
                size,
                direction,
                string,
                rep: info & ioio::REP != 0,
                value: if direction == IoDirection::Out && !string {
                    (rax & size.mask()) as u32
                } else {
                    0
                },
            })
        }
        code::NPF => {
            let error = c.exit_info1;
            let access = if error & npf::INSTRUCTION_FETCH != 0 {
                AccessKind::Execute
            } else if error & npf::WRITE != 0 {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            let fetched = usize::from(c.instruction_bytes_fetched).min(15);
            VcpuExit::NestedPageFault {
                gpa: c.exit_info2,
                access,
                present: error & npf::PRESENT != 0,
                instruction: InstructionBytes::new(&c.instruction_bytes[..fetched]),
            }
        }
        n @ code::EXCEPTION_BASE..=0x5f => {
            let vector = (n - code::EXCEPTION_BASE) as u8;
            length = InstructionLength::Unknown;
            VcpuExit::Exception {
                vector,
                error_code: exception_has_error_code(vector).then_some(c.exit_info1 as u32),
            }
        }
        _ => return unknown,
    };
    // nRIP is defined for instruction intercepts only (APM vol. 2,
    // 15.7.1); after a fault or an interrupt there is nothing to skip.
    if matches!(
        reason,
        VcpuExit::NestedPageFault { .. }
            | VcpuExit::ExternalInterrupt
            | VcpuExit::InterruptWindow
            | VcpuExit::Shutdown
    ) {
        length = InstructionLength::Unknown;
    }
    Exit {
        reason,
        rip,
        length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;

    fn vmcb(code: u64, info1: u64, info2: u64) -> Box<Vmcb> {
        let mut v = Box::new(Vmcb::zeroed());
        v.control.exit_code = code;
        v.control.exit_info1 = info1;
        v.control.exit_info2 = info2;
        v.save.rip = 0x1000;
        v
    }

    fn regs() -> GuestRegisters {
        let mut r = GuestRegisters::new();
        r.gprs[gpr::RBX] = 0xb0b0;
        r.gprs[gpr::RCX] = 0xc000_0080;
        r.gprs[gpr::RDX] = 0x1234;
        r
    }

    #[test]
    fn hypercall_cpuid_msr() {
        let mut v = vmcb(code::VMMCALL, 0, 0);
        v.save.rax = 0x85;
        v.control.next_rip = 0x1003;
        let e = decode_exit(&v, &regs(), true);
        assert_eq!(
            e,
            Exit {
                reason: VcpuExit::Hypercall {
                    command: 0x85,
                    argument: 0xb0b0
                },
                rip: 0x1000,
                length: InstructionLength::Known(3)
            }
        );
        // Without NRIPS the length is unknown even if nRIP holds garbage.
        assert_eq!(
            decode_exit(&v, &regs(), false).length,
            InstructionLength::Unknown
        );

        let mut v = vmcb(code::CPUID, 0, 0);
        v.save.rax = 0xffff_ffff_8000_0001;
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::Cpuid {
                leaf: 0x8000_0001,
                subleaf: 0xc000_0080
            }
        );

        let mut v = vmcb(code::MSR, 1, 0);
        v.save.rax = 0xffff_ffff_aabb_ccdd;
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::Msr {
                access: MsrAccess::Write,
                index: 0xc000_0080,
                value: 0x1234_aabb_ccdd
            }
        );
        let v = vmcb(code::MSR, 0, 0);
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::Msr {
                access: MsrAccess::Read,
                index: 0xc000_0080,
                value: 0
            }
        );
        let v = vmcb(code::MSR, 7, 0);
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::Unknown { code: code::MSR }
        );
    }

    #[test]
    fn ioio_exitinfo1() {
        // OUT DX, AL to 0x3f8: port in 31:16, SZ8, next RIP in EXITINFO2.
        let mut v = vmcb(code::IOIO, (0x3f8 << 16) | ioio::SIZE8, 0x1001);
        v.save.rax = 0x4142;
        let e = decode_exit(&v, &regs(), false);
        assert_eq!(
            e.reason,
            VcpuExit::PortIo(PortIo {
                port: 0x3f8,
                size: AccessSize::Byte,
                direction: IoDirection::Out,
                string: false,
                rep: false,
                value: 0x42
            })
        );
        assert_eq!(e.length, InstructionLength::Known(1));
        // REP INSW from port 0x1f0.
        let v = vmcb(
            code::IOIO,
            (0x1f0 << 16) | ioio::SIZE16 | ioio::REP | ioio::STRING | ioio::TYPE_IN,
            0x1003,
        );
        assert_eq!(
            decode_exit(&v, &regs(), false),
            Exit {
                reason: VcpuExit::PortIo(PortIo {
                    port: 0x1f0,
                    size: AccessSize::Word,
                    direction: IoDirection::In,
                    string: true,
                    rep: true,
                    value: 0
                }),
                rip: 0x1000,
                length: InstructionLength::Known(3)
            }
        );
        // 32-bit OUT keeps EAX only.
        let mut v = vmcb(code::IOIO, (0xcfc << 16) | ioio::SIZE32, 0x1001);
        v.save.rax = 0xffff_ffff_1234_5678;
        assert!(matches!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::PortIo(PortIo {
                value: 0x1234_5678,
                ..
            })
        ));
        // No size bit, or two: refuse.
        let v = vmcb(code::IOIO, 0x3f8 << 16, 0x1001);
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::Unknown { code: code::IOIO }
        );
        let v = vmcb(code::IOIO, ioio::SIZE8 | ioio::SIZE16, 0x1001);
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::Unknown { code: code::IOIO }
        );
        // An EXITINFO2 that is not 1-15 bytes ahead gives no length.
        let v = vmcb(code::IOIO, ioio::SIZE8, 0x1000);
        assert_eq!(
            decode_exit(&v, &regs(), false).length,
            InstructionLength::Unknown
        );
    }

    #[test]
    fn nested_page_fault() {
        let mut v = vmcb(
            code::NPF,
            npf::WRITE | npf::USER | npf::FINAL_ADDRESS,
            0xb000_0004,
        );
        v.control.instruction_bytes_fetched = 2;
        v.control.instruction_bytes[..2].copy_from_slice(&[0x89, 0x07]);
        assert_eq!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::NestedPageFault {
                gpa: 0xb000_0004,
                access: AccessKind::Write,
                present: false,
                instruction: InstructionBytes::new(&[0x89, 0x07])
            }
        );
        let v = vmcb(code::NPF, npf::PRESENT | npf::INSTRUCTION_FETCH, 0x5000);
        assert!(matches!(
            decode_exit(&v, &regs(), false).reason,
            VcpuExit::NestedPageFault {
                access: AccessKind::Execute,
                present: true,
                ..
            }
        ));
        // A hostile fetched count is clamped to the 15 bytes that exist.
        let mut v = vmcb(code::NPF, 0, 0x5000);
        v.control.instruction_bytes_fetched = 200;
        match decode_exit(&v, &regs(), false).reason {
            VcpuExit::NestedPageFault { instruction, .. } => {
                assert_eq!(instruction.as_slice().len(), 15)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn simple_exits_and_exceptions() {
        for (c, want) in [
            (code::HLT, VcpuExit::Hlt),
            (code::WBINVD, VcpuExit::Wbinvd),
            (code::INVD, VcpuExit::Invd),
            (code::SHUTDOWN, VcpuExit::Shutdown),
            (code::VINTR, VcpuExit::InterruptWindow),
            (code::INTR, VcpuExit::ExternalInterrupt),
            (code::RDPRU, VcpuExit::Unknown { code: code::RDPRU }),
            (code::INVALID, VcpuExit::Unknown { code: u64::MAX }),
        ] {
            assert_eq!(decode_exit(&vmcb(c, 0, 0), &regs(), false).reason, want);
        }
        assert_eq!(
            decode_exit(&vmcb(0x4d, 0x18, 0), &regs(), false).reason,
            VcpuExit::Exception {
                vector: 13,
                error_code: Some(0x18)
            }
        );
        assert_eq!(
            decode_exit(&vmcb(0x46, 0x18, 0), &regs(), false).reason,
            VcpuExit::Exception {
                vector: 6,
                error_code: None
            }
        );
    }
}
