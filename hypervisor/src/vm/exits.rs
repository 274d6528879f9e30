//! What Sluice does with each [`VcpuExit`], independent of SVM or VMX.
//!
//! The bare-metal run loop calls [`VcpuBackend::run`], hands the exit to
//! [`handle_exit`] and acts on the returned [`ExitAction`]. Everything an
//! exit needs is here and host-tested:
//!
//! * the instruction length when the hardware did not give it (QEMU's
//!   SVM without NRIPS): decoded from guest code, fetched through the
//!   guest's own page tables, and checked to be the instruction the exit
//!   claims — otherwise the VM stops, it never resumes at a guessed RIP;
//! * hypercalls to the iommufd dispatcher ([`crate::vcpu::hypercall`]);
//! * ECAM accesses to the emulated PCI configuration space
//!   ([`crate::passthrough`]);
//! * the debug console port, CPUID (with the virtualization features
//!   hidden and a hypervisor leaf), MSRs (`#GP`, none are emulated yet),
//!   HLT, WBINVD/INVD (the iommufd WBINVD policy), triple faults.
//!
//! aarch64 vCPUs (the backend answers [`VcpuBackend::aarch64_registers`])
//! take their own paths where the architectures differ: hypercalls use the
//! SMCCC registers ([`aarch64_hypercall`]: X0/X1 in, X0 out), and MMIO
//! exits arrive decoded by the hardware ([`VcpuExit::DecodedMmio`]), so the
//! console register and the ECAM window are emulated from the access's
//! size, direction and register without fetching the instruction. `WFI`
//! is HLT, `WFE` a yield; an access the hardware could not describe stops
//! the VM. A trapped system-register access Sluice does not emulate, a
//! non-PSCI `SMC` and an instruction reported for an unknown reason make
//! the guest take an UNDEFINED-instruction exception at EL1 (the Arm
//! counterpart of x86's `#GP` for MSRs); set/way cache maintenance, which
//! the guest needs done, stops the VM instead.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use sluice_pci::ConfigSpace;

use crate::iommufd::{GuestMemory, VmId};
use crate::passthrough::{EcamWindow, GuestPciBus, MmioError, emulate_ecam_access};
use crate::vcpu::decode::{
    self, DecodeError, IdentityFetch, InstructionFetch, Operation, PagedFetch, PrefetchedFetch,
};
use crate::vcpu::hypercall::{HypercallDispatcher, aarch64_hypercall, x86_hypercall};
use crate::vcpu::{
    Aarch64Exception, AccessKind, AccessSize, CR4_LA57, DecodedAccess, Event, Exit,
    InstructionLength, IoDirection, SystemRegisterAccess, VcpuBackend, VcpuError, VcpuExit, gpr,
};

use super::boot::{CONSOLE_PORT, HYPERCALL_ABI_VERSION, aarch64_layout};

/// Longest console line before it is flushed without a newline.
pub const CONSOLE_LINE_MAX: usize = 200;

/// The VM's debug console: bytes written to [`CONSOLE_PORT`], collected
/// into lines. Control characters other than tab are shown as `?`, so a
/// guest cannot drive the lab engineer's terminal.
#[derive(Debug, Clone, Default)]
pub struct Console {
    line: String,
}

impl Console {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a byte; returns a complete line (without the newline).
    pub fn push(&mut self, byte: u8) -> Option<String> {
        match byte {
            b'\n' => return Some(core::mem::take(&mut self.line)),
            b'\r' => {}
            b'\t' | 0x20..=0x7e => self.line.push(byte as char),
            _ => self.line.push('?'),
        }
        (self.line.len() >= CONSOLE_LINE_MAX).then(|| core::mem::take(&mut self.line))
    }
}

/// Host CPUID, as the run loop reads it.
pub trait CpuidSource {
    /// EAX, EBX, ECX, EDX of `CPUID(leaf, subleaf)` on the host.
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
}

/// The hypervisor leaves' vendor signature (EBX, ECX, EDX of 0x4000_0000).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"SluiceSluice";
/// The highest hypervisor leaf.
pub const HYPERVISOR_MAX_LEAF: u32 = 0x4000_0001;

/// What a guest sees for `CPUID(leaf, subleaf)` given the host's values:
///
/// * leaf 1 ECX: VMX (5), SMX (6) and MONITOR (3, intercepted) cleared,
///   OSXSAVE (27) as the guest's CR4.OSXSAVE (bit 18), hypervisor-present
///   (31) set;
/// * leaf 8000_0001h ECX: SVM (2) cleared;
/// * leaves 4000_0000h–4000_00FFh: Sluice's: the maximum leaf and
///   [`HYPERVISOR_SIGNATURE`], then the hypercall ABI version in EAX of
///   4000_0001h; zeros above;
/// * everything else as on the host.
pub fn guest_cpuid(leaf: u32, subleaf: u32, guest_cr4: u64, host: &dyn CpuidSource) -> [u32; 4] {
    let sig = |i: usize| {
        u32::from_le_bytes([
            HYPERVISOR_SIGNATURE[i],
            HYPERVISOR_SIGNATURE[i + 1],
            HYPERVISOR_SIGNATURE[i + 2],
            HYPERVISOR_SIGNATURE[i + 3],
        ])
    };
    match leaf {
        0x4000_0000 => [HYPERVISOR_MAX_LEAF, sig(0), sig(4), sig(8)],
        0x4000_0001 => [HYPERCALL_ABI_VERSION, 0, 0, 0],
        0x4000_0002..=0x4000_00ff => [0; 4],
        1 => {
            let mut r = host.host_cpuid(1, subleaf);
            r[2] &= !((1 << 5) | (1 << 6) | (1 << 3) | (1 << 27));
            if guest_cr4 & (1 << 18) != 0 {
                r[2] |= 1 << 27;
            }
            r[2] |= 1 << 31;
            r
        }
        0x8000_0001 => {
            let mut r = host.host_cpuid(leaf, subleaf);
            r[2] &= !(1 << 2);
            r
        }
        _ => host.host_cpuid(leaf, subleaf),
    }
}

/// Why a VM is stopped. Each is one log line a lab engineer can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    TripleFault,
    /// The exiting instruction could not be decoded.
    Decode {
        rip: u64,
        error: DecodeError,
    },
    /// The instruction at RIP is not the one the exit reports (the code
    /// changed under us).
    InstructionMismatch {
        rip: u64,
    },
    Mmio {
        rip: u64,
        error: MmioError,
    },
    /// An access to guest-physical memory that is neither RAM nor emulated.
    UnhandledMemoryAccess {
        rip: u64,
        gpa: u64,
        access: AccessKind,
    },
    /// String port I/O is not emulated.
    StringPortIo {
        rip: u64,
        port: u16,
    },
    /// An exception Sluice does not expect to intercept.
    Exception {
        rip: u64,
        vector: u8,
    },
    /// A data access the hardware did not describe (Arm ISV = 0) reached
    /// emulated memory.
    UndecodableAccess {
        rip: u64,
        gpa: u64,
        access: AccessKind,
    },
    /// The hardware gave no length for an instruction that must be skipped.
    UnknownLength {
        rip: u64,
    },
    /// Data-cache maintenance by set/way (Arm `DC ISW/CSW/CISW`, trapped by
    /// `HCR_EL2.TSW` because it reaches caches Sluice shares): the guest
    /// needs it done, and Sluice does not emulate it.
    SetWayMaintenance {
        rip: u64,
        access: SystemRegisterAccess,
    },
    /// The backend refused an operation.
    Backend(VcpuError),
    /// An exit Sluice has no handler for.
    Unhandled {
        rip: u64,
        exit: VcpuExit,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TripleFault => f.write_str("the guest triple-faulted"),
            Self::Decode { rip, error } => {
                write!(f, "cannot decode the instruction at {rip:#x}: {error}")
            }
            Self::InstructionMismatch { rip } => write!(
                f,
                "the instruction at {rip:#x} is not the one that exited (code modified?)"
            ),
            Self::Mmio { rip, error } => {
                write!(f, "cannot emulate the MMIO access at {rip:#x}: {error:?}")
            }
            Self::UnhandledMemoryAccess { rip, gpa, access } => write!(
                f,
                "{access:?} of guest-physical {gpa:#x} at {rip:#x}: not RAM and not emulated"
            ),
            Self::StringPortIo { rip, port } => {
                write!(
                    f,
                    "string I/O to port {port:#x} at {rip:#x} is not emulated"
                )
            }
            Self::Exception { rip, vector } => {
                write!(f, "unexpected exception {vector} at {rip:#x}")
            }
            Self::UndecodableAccess { rip, gpa, access } => write!(
                f,
                "{access:?} of emulated guest-physical {gpa:#x} at {rip:#x} without an instruction syndrome (load/store pair, writeback, SIMD or atomic access): use a single LDR/STR"
            ),
            Self::UnknownLength { rip } => {
                write!(f, "no instruction length for the exit at {rip:#x}")
            }
            Self::SetWayMaintenance { rip, access } => write!(
                f,
                "{access} at {rip:#x}: cache maintenance by set/way is trapped (HCR_EL2.TSW) and not emulated; clean and invalidate by address (DC CIVAC) instead"
            ),
            Self::Backend(e) => write!(f, "vCPU backend: {e}"),
            Self::Unhandled { rip, exit } => write!(f, "unhandled exit {exit:?} at {rip:#x}"),
        }
    }
}

/// What the run loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Resume,
    /// The vCPU executed HLT: wait for an event for it, then resume.
    Halt,
    /// Write back and invalidate the caches of the CPUs this VM ran on,
    /// then resume (WBINVD/INVD under the `FLUSH` policy).
    FlushCaches,
    /// Stop the VM and log the reason.
    Stop(StopReason),
}

/// Everything an exit may touch besides the vCPU.
pub struct ExitEnv<'a, D: HypercallDispatcher + ?Sized, C: ConfigSpace> {
    pub vm: VmId,
    /// For log lines.
    pub vm_name: &'a str,
    pub memory: &'a dyn GuestMemory,
    pub dispatcher: &'a mut D,
    pub pci: &'a mut GuestPciBus<C>,
    pub ecam: EcamWindow,
    pub console: &'a mut Console,
    pub cpuid: &'a dyn CpuidSource,
    /// The iommufd WBINVD policy of the VM is `FLUSH`.
    pub wbinvd_flushes: bool,
    /// Console lines, for the caller to print (and tests to read).
    pub console_lines: Vec<String>,
}

/// Fetches through the guest's page tables when paging is on, else by
/// physical address; bytes the hardware already fetched come first.
fn with_fetch<R>(
    memory: &dyn GuestMemory,
    cr3: u64,
    cr4: u64,
    paging: bool,
    rip: u64,
    prefetched: &[u8],
    f: impl FnOnce(&dyn InstructionFetch) -> R,
) -> R {
    if paging {
        let levels = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let paged = PagedFetch {
            mem: memory,
            cr3,
            levels,
        };
        f(&PrefetchedFetch {
            rip,
            bytes: prefetched,
            rest: &paged,
        })
    } else {
        let identity = IdentityFetch(memory);
        f(&PrefetchedFetch {
            rip,
            bytes: prefetched,
            rest: &identity,
        })
    }
}

/// Handles one exit of `vcpu`. Registers, RIP and pending events are
/// updated through `backend`; the caller acts on the result.
pub fn handle_exit<B, D, C>(
    backend: &mut B,
    vcpu: &mut B::Vcpu,
    exit: &Exit,
    env: &mut ExitEnv<'_, D, C>,
) -> ExitAction
where
    B: VcpuBackend,
    D: HypercallDispatcher + ?Sized,
    C: ConfigSpace,
{
    match handle(backend, vcpu, exit, env) {
        Ok(action) => action,
        Err(reason) => {
            log::error!("VM {} stopped: {reason}", env.vm_name);
            ExitAction::Stop(reason)
        }
    }
}

/// The length of the exiting instruction: from the hardware, or decoded
/// and checked with `expected`.
fn instruction_length<B: VcpuBackend>(
    backend: &B,
    vcpu: &B::Vcpu,
    exit: &Exit,
    memory: &dyn GuestMemory,
    expected: impl Fn(&Operation) -> bool,
) -> Result<u8, StopReason> {
    if let InstructionLength::Known(n) = exit.length {
        return Ok(n);
    }
    let t = backend.translation_state(vcpu);
    let insn = with_fetch(memory, t.cr3, t.cr4, t.paging(), exit.rip, &[], |f| {
        decode::decode(f, exit.rip, t.code_mode())
    })
    .map_err(|error| StopReason::Decode {
        rip: exit.rip,
        error,
    })?;
    if !expected(&insn.operation) {
        return Err(StopReason::InstructionMismatch { rip: exit.rip });
    }
    Ok(insn.length)
}

/// The length the hardware reported for `exit` (aarch64 always reports
/// it, in `ESR_EL2.IL`).
fn known_length(exit: &Exit) -> Result<u8, StopReason> {
    match exit.length {
        InstructionLength::Known(n) => Ok(n),
        InstructionLength::Unknown => Err(StopReason::UnknownLength { rip: exit.rip }),
    }
}

/// Whether a configuration access of `size` at `offset` is one the
/// configuration space takes: at most a dword, not crossing one (PCIe Base
/// §7.2.2.2); others complete as unsupported requests (reads all ones,
/// writes dropped).
fn config_access_valid(offset: u16, size: AccessSize) -> bool {
    size != AccessSize::Qword && (offset & 3) + u16::from(size.bytes()) <= 4
}

/// Emulates a hardware-decoded access at `gpa` on the aarch64 registers
/// `x` (register 31 is the zero register): the console byte register
/// (stores print their low byte, loads read 0) or the ECAM window.
fn emulate_decoded_access<D, C>(
    env: &mut ExitEnv<'_, D, C>,
    gpa: u64,
    access: DecodedAccess,
    x: &mut [u64; 31],
    rip: u64,
) -> Result<(), StopReason>
where
    D: HypercallDispatcher + ?Sized,
    C: ConfigSpace,
{
    if access.kind == AccessKind::Execute {
        return Err(StopReason::UnhandledMemoryAccess {
            rip,
            gpa,
            access: access.kind,
        });
    }
    let register = usize::from(access.register);
    let stored = x.get(register).copied().unwrap_or(0) & access.size.mask();
    let loaded = if gpa == aarch64_layout::CONSOLE_GPA {
        match access.kind {
            AccessKind::Write => {
                if let Some(line) = env.console.push(stored as u8) {
                    log::info!("[{}] {}", env.vm_name, line);
                    env.console_lines.push(line);
                }
                None
            }
            _ => Some(0),
        }
    } else if let Some((bdf, offset)) = env.ecam.decode(gpa) {
        let valid = config_access_valid(offset, access.size);
        match access.kind {
            AccessKind::Write => {
                if valid {
                    env.pci.write(bdf, offset, access.size, stored as u32);
                } else {
                    log::debug!(
                        "ECAM write of {} bytes at {gpa:#x} dropped",
                        access.size.bytes()
                    );
                }
                None
            }
            _ => Some(if valid {
                u64::from(env.pci.read(bdf, offset, access.size))
            } else {
                access.size.mask()
            }),
        }
    } else {
        return Err(StopReason::UnhandledMemoryAccess {
            rip,
            gpa,
            access: access.kind,
        });
    };
    if let Some(value) = loaded
        && let Some(slot) = x.get_mut(register)
    {
        *slot = access.load_result(value);
    }
    Ok(())
}

fn handle<B, D, C>(
    backend: &mut B,
    vcpu: &mut B::Vcpu,
    exit: &Exit,
    env: &mut ExitEnv<'_, D, C>,
) -> Result<ExitAction, StopReason>
where
    B: VcpuBackend,
    D: HypercallDispatcher + ?Sized,
    C: ConfigSpace,
{
    let rip = exit.rip;
    let skip = |backend: &mut B, vcpu: &mut B::Vcpu, length: u8| {
        backend
            .advance_rip(vcpu, length)
            .map_err(StopReason::Backend)
    };
    match exit.reason {
        VcpuExit::Hypercall { .. } if let Some(mut arm) = backend.aarch64_registers(vcpu) => {
            let length = known_length(exit)?;
            aarch64_hypercall(env.dispatcher, env.vm, env.memory, &mut arm.x);
            backend
                .set_aarch64_registers(vcpu, &arm)
                .map_err(StopReason::Backend)?;
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::Hypercall { .. } => {
            let length = instruction_length(backend, vcpu, exit, env.memory, |op| {
                matches!(op, Operation::Vmmcall | Operation::Vmcall)
            })?;
            let mut regs = backend.registers(vcpu);
            x86_hypercall(env.dispatcher, env.vm, env.memory, &mut regs);
            backend.set_registers(vcpu, &regs);
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::PortIo(io) => {
            if io.string {
                return Err(StopReason::StringPortIo { rip, port: io.port });
            }
            let length = instruction_length(backend, vcpu, exit, env.memory, |op| {
                matches!(op, Operation::PortIo { .. })
            })?;
            match io.direction {
                IoDirection::Out => {
                    if io.port == CONSOLE_PORT
                        && io.size == AccessSize::Byte
                        && let Some(line) = env.console.push(io.value as u8)
                    {
                        log::info!("[{}] {}", env.vm_name, line);
                        env.console_lines.push(line);
                    }
                }
                IoDirection::In => {
                    // No device answers: all ones, as on an empty bus.
                    let mut regs = backend.registers(vcpu);
                    decode::write_register(
                        &mut regs,
                        decode::Register {
                            index: 0,
                            high_byte: false,
                        },
                        io.size,
                        io.size.mask(),
                    );
                    backend.set_registers(vcpu, &regs);
                }
            }
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        // aarch64 data accesses arrive as DecodedMmio/UndecodableMmio;
        // what remains (instruction fetches, the guest's own table walks)
        // is never emulated, and x86 code must not be decoded.
        VcpuExit::NestedPageFault { gpa, access, .. }
            if backend.aarch64_registers(vcpu).is_some() =>
        {
            Err(StopReason::UnhandledMemoryAccess { rip, gpa, access })
        }
        VcpuExit::NestedPageFault {
            gpa,
            access,
            instruction,
            ..
        } => {
            if !env.ecam.contains(gpa) {
                return Err(StopReason::UnhandledMemoryAccess { rip, gpa, access });
            }
            let t = backend.translation_state(vcpu);
            let mut regs = backend.registers(vcpu);
            let pci = &mut *env.pci;
            let ecam = env.ecam;
            let length = with_fetch(
                env.memory,
                t.cr3,
                t.cr4,
                t.paging(),
                rip,
                instruction.as_slice(),
                |f| emulate_ecam_access(pci, &ecam, gpa, access, f, rip, t.code_mode(), &mut regs),
            )
            .map_err(|error| StopReason::Mmio { rip, error })?;
            backend.set_registers(vcpu, &regs);
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::Cpuid { leaf, subleaf } => {
            let length = instruction_length(backend, vcpu, exit, env.memory, |op| {
                matches!(op, Operation::Cpuid)
            })?;
            let cr4 = backend.translation_state(vcpu).cr4;
            let [a, b, c, d] = guest_cpuid(leaf, subleaf, cr4, env.cpuid);
            let mut regs = backend.registers(vcpu);
            // CPUID zero-extends into the 64-bit registers.
            regs.gprs[gpr::RAX] = u64::from(a);
            regs.gprs[gpr::RBX] = u64::from(b);
            regs.gprs[gpr::RCX] = u64::from(c);
            regs.gprs[gpr::RDX] = u64::from(d);
            backend.set_registers(vcpu, &regs);
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::Msr { index, access, .. } => {
            // No MSR is emulated yet: the architectural answer to an MSR
            // that does not exist is #GP(0), with RIP left on the
            // instruction.
            log::debug!(
                "VM {}: {access:?} of MSR {index:#x} at {rip:#x}: #GP",
                env.vm_name
            );
            backend
                .inject_event(
                    vcpu,
                    Event::Exception {
                        vector: 13,
                        error_code: Some(0),
                    },
                )
                .map_err(StopReason::Backend)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::Hlt => {
            let length = instruction_length(backend, vcpu, exit, env.memory, |op| {
                matches!(op, Operation::Hlt)
            })?;
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Halt)
        }
        VcpuExit::Wbinvd | VcpuExit::Invd => {
            // INVD would drop dirty lines of memory devices may read: it is
            // treated as WBINVD.
            let length = instruction_length(backend, vcpu, exit, env.memory, |op| {
                matches!(
                    op,
                    Operation::Wbinvd | Operation::Wbnoinvd | Operation::Invd
                )
            })?;
            skip(backend, vcpu, length)?;
            Ok(if env.wbinvd_flushes {
                ExitAction::FlushCaches
            } else {
                ExitAction::Resume
            })
        }
        VcpuExit::DecodedMmio { gpa, access } => {
            let length = known_length(exit)?;
            let mut arm = backend.aarch64_registers(vcpu).ok_or(StopReason::Backend(
                VcpuError::Unsupported("a decoded MMIO exit without aarch64 registers"),
            ))?;
            emulate_decoded_access(env, gpa, access, &mut arm.x, rip)?;
            backend
                .set_aarch64_registers(vcpu, &arm)
                .map_err(StopReason::Backend)?;
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::UndecodableMmio { gpa, access } => {
            Err(StopReason::UndecodableAccess { rip, gpa, access })
        }
        VcpuExit::Yield => {
            // WFE may complete at any time (Arm ARM, "Wait for Event"):
            // carrying on is a correct answer.
            let length = known_length(exit)?;
            skip(backend, vcpu, length)?;
            Ok(ExitAction::Resume)
        }
        VcpuExit::SystemRegister(access) if access.encoding.is_set_way_maintenance() => {
            Err(StopReason::SetWayMaintenance { rip, access })
        }
        VcpuExit::SystemRegister(access) => {
            // Nothing is emulated yet: like an MSR on x86, an access that
            // EL2 trapped (HCR_EL2.TIDCP, TACR, CNTHCTL_EL2.EL1PCEN, ...)
            // is UNDEFINED for the guest, with the PC left on it.
            log::debug!(
                "VM {}: {access} at {rip:#x} trapped to EL2, not emulated: UNDEFINED instruction exception",
                env.vm_name
            );
            undefined(backend, vcpu)
        }
        VcpuExit::SecureMonitorCall {
            function,
            immediate,
        } => {
            // No secure firmware answers guests: their SMC behaves as on a
            // processor without EL3, where SMC at EL1 is UNDEFINED (Arm ARM
            // C6.2 "SMC" and its pseudocode AArch64.CheckForSMCUndefOrTrap).
            // PSCI calls arrive as hypercalls instead.
            log::debug!(
                "VM {}: SMC #{immediate:#x} with function {function:#x} at {rip:#x} is not a PSCI call: UNDEFINED instruction exception",
                env.vm_name
            );
            undefined(backend, vcpu)
        }
        VcpuExit::UndefinedInstruction => {
            log::debug!(
                "VM {}: instruction at {rip:#x} trapped to EL2 for an unknown reason (ESR_EL2.EC 0): UNDEFINED instruction exception",
                env.vm_name
            );
            undefined(backend, vcpu)
        }
        VcpuExit::Shutdown => Err(StopReason::TripleFault),
        VcpuExit::InterruptWindow | VcpuExit::ExternalInterrupt => Ok(ExitAction::Resume),
        VcpuExit::Exception { vector, .. } => Err(StopReason::Exception { rip, vector }),
        other @ VcpuExit::Unknown { .. } => Err(StopReason::Unhandled { rip, exit: other }),
    }
}

/// Makes the guest take an UNDEFINED-instruction exception at the
/// instruction it exited on, and resumes it (at its EL1 vector).
fn undefined<B: VcpuBackend>(
    backend: &mut B,
    vcpu: &mut B::Vcpu,
) -> Result<ExitAction, StopReason> {
    backend
        .inject_aarch64_exception(vcpu, Aarch64Exception::Undefined)
        .map_err(StopReason::Backend)?;
    Ok(ExitAction::Resume)
}

#[cfg(test)]
mod tests;
