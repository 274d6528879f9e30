//! Virtual CPUs: the arch-neutral backend interface and its SVM, VMX and
//! Arm EL2 implementations.
//!
//! A backend (AMD SVM, Intel VMX) turns a hardware exit (a VMCB `EXITCODE`
//! with its `EXITINFO` fields, or a VMCS exit reason with its
//! qualification) into one [`VcpuExit`], the only thing the exit handlers
//! above it look at. What the handlers need back from the backend — the
//! registers, "skip this instruction", "inject this event", "use this
//! nested page table" — is the [`VcpuBackend`] trait, shaped so that both
//! backends implement it and nothing above them changes.
//!
//! Instruction lengths: VMX always reports the length of the exiting
//! instruction (VMCS "VM-exit instruction length"); SVM does only with the
//! NRIPS feature (VMCB `nRIP`) and for IOIO exits (`EXITINFO2`). QEMU's TCG
//! emulates SVM without NRIPS, so an [`Exit`] carries the length when the
//! hardware gave it, and [`decode`] computes it from the guest's code
//! otherwise.

pub mod decode;
pub mod el2;
pub mod hypercall;
pub mod svm;
pub mod vmx;

use core::fmt;

use sluice_hal::PhysAddr;

/// Width of a port or memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccessSize {
    Byte = 1,
    Word = 2,
    Dword = 4,
    Qword = 8,
}

impl AccessSize {
    pub const fn bytes(self) -> u8 {
        self as u8
    }

    /// The size of `bytes` (1, 2, 4 or 8), or `None`.
    pub const fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            1 => Some(Self::Byte),
            2 => Some(Self::Word),
            4 => Some(Self::Dword),
            8 => Some(Self::Qword),
            _ => None,
        }
    }

    /// All ones in the low `bytes()` bytes.
    pub const fn mask(self) -> u64 {
        match self {
            Self::Qword => u64::MAX,
            _ => (1u64 << (8 * self as u32)) - 1,
        }
    }
}

/// Direction of a port I/O instruction, seen from the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoDirection {
    /// `IN`/`INS`: the device provides data.
    In,
    /// `OUT`/`OUTS`: the CPU provides data.
    Out,
}

/// A port I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortIo {
    pub port: u16,
    pub size: AccessSize,
    pub direction: IoDirection,
    /// `INS`/`OUTS`: data goes through memory at (E/R)SI / (E/R)DI.
    pub string: bool,
    /// `REP` prefix: repeated (E/R)CX times.
    pub rep: bool,
    /// For a non-string `OUT`, the value written (AL/AX/EAX, masked to the
    /// size); zero otherwise.
    pub value: u32,
}

/// The kind of access that caused a nested page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    Read,
    Write,
    Execute,
}

/// The instruction bytes the hardware fetched for an exit (SVM decode
/// assists, VMCB offsets 0xD0–0xDF), up to 15 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct InstructionBytes {
    bytes: [u8; 15],
    len: u8,
}

impl InstructionBytes {
    /// At most 15 bytes are kept.
    pub fn new(bytes: &[u8]) -> Self {
        let mut out = Self::default();
        let n = bytes.len().min(15);
        out.bytes[..n].copy_from_slice(&bytes[..n]);
        out.len = n as u8;
        out
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstructionBytes({:02x?})", self.as_slice())
    }
}

/// Whether an MSR exit was `RDMSR` or `WRMSR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsrAccess {
    Read,
    Write,
}

/// Why a vCPU stopped running guest code, independent of the architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// A Sluice hypercall (`VMMCALL`/`VMCALL`), with the command and the
    /// argument register of the ABI ([`sluice_abi::regs`]): x86 `RAX` and
    /// `RBX`.
    Hypercall {
        command: u64,
        argument: u64,
    },
    /// `IN`, `OUT`, `INS`, `OUTS` to an intercepted port.
    PortIo(PortIo),
    /// An access to guest-physical memory the nested page table does not
    /// map (emulated MMIO such as the ECAM window) or maps without this
    /// access.
    NestedPageFault {
        gpa: u64,
        access: AccessKind,
        /// The translation existed but forbade the access (a protection
        /// fault, not a missing page).
        present: bool,
        /// The faulting instruction, when the hardware provided it (empty
        /// otherwise: fetch it from guest memory).
        instruction: InstructionBytes,
    },
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    /// `RDMSR`/`WRMSR` of `index`; `value` is `EDX:EAX` for a write, zero
    /// for a read.
    Msr {
        access: MsrAccess,
        index: u32,
        value: u64,
    },
    Hlt,
    /// `WBINVD` (or `WBNOINVD`): handled by the iommufd WBINVD policy.
    Wbinvd,
    Invd,
    /// The guest triple-faulted (SVM `SHUTDOWN`, VMX "triple fault"): the VM
    /// is stopped.
    Shutdown,
    /// The guest can take an interrupt now (interrupt-window exiting was
    /// requested).
    InterruptWindow,
    /// A physical interrupt arrived while the guest ran; the host handles
    /// it and resumes.
    ExternalInterrupt,
    /// An intercepted exception in the guest.
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// A nested page fault (Arm: a stage-2 data abort) on a data access
    /// the hardware described completely (Arm `ESR_EL2.ISV` = 1): size,
    /// direction and register are known, no instruction is decoded.
    DecodedMmio {
        gpa: u64,
        access: DecodedAccess,
    },
    /// A nested page fault on a data access the hardware did not describe
    /// (Arm `ESR_EL2.ISV` = 0: load/store pairs, writeback addressing,
    /// SIMD and atomic instructions). Such an access cannot be emulated
    /// without decoding the instruction: the VM is stopped.
    UndecodableMmio {
        gpa: u64,
        access: AccessKind,
    },
    /// The guest waits for an event (Arm `WFE`): the instruction is
    /// skipped and the guest resumes, as if an event had arrived.
    Yield,
    /// An aarch64 `MRS`, `MSR`, `SYS` or `SYSL` that EL2 trapped (Arm
    /// `ESR_EL2.EC` = 0x18), decoded from the syndrome.
    SystemRegister(SystemRegisterAccess),
    /// An aarch64 `SMC` that EL2 trapped (`HCR_EL2.TSC`) and that is not a
    /// PSCI call (those arrive as [`VcpuExit::Hypercall`]): `function` is
    /// X0, `immediate` the instruction's `#imm16`.
    SecureMonitorCall {
        function: u64,
        immediate: u16,
    },
    /// An aarch64 instruction reported to EL2 for an unknown reason (Arm
    /// `ESR_EL2.EC` = 0x00, no syndrome): the architecture's way of
    /// saying the instruction is UNDEFINED.
    UndefinedInstruction,
    /// Anything else: the raw exit code (SVM `EXITCODE`, VMX basic exit
    /// reason, Arm `ESR_EL2`). The VM is stopped with a log line naming
    /// the code.
    Unknown {
        code: u64,
    },
}

/// A data access the hardware decoded for Sluice (Arm `ESR_EL2` ISS of a
/// data abort with ISV = 1: `SAS`, `SSE`, `SRT`, `SF`, `WnR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodedAccess {
    pub size: AccessSize,
    /// Read (a load) or Write (a store); never Execute.
    pub kind: AccessKind,
    /// The transfer register: Arm X0–X30, 31 the zero register.
    pub register: u8,
    /// A load sign-extends the value (`LDRS*`).
    pub sign_extend: bool,
    /// The register is 64 bits wide (Xn); else 32 (Wn), whose upper half
    /// a load clears.
    pub register_64: bool,
}

/// The encoding of an aarch64 system register or system instruction
/// (`op0`, `op1`, `CRn`, `CRm`, `op2`; Arm ARM DDI 0487, C5.1 "The System
/// instruction class encoding space").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemRegisterEncoding {
    pub op0: u8,
    pub op1: u8,
    pub crn: u8,
    pub crm: u8,
    pub op2: u8,
}

impl SystemRegisterEncoding {
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Self {
        Self {
            op0,
            op1,
            crn,
            crm,
            op2,
        }
    }

    /// `ACTLR_EL1` (trapped by `HCR_EL2.TACR`).
    pub const ACTLR_EL1: Self = Self::new(3, 0, 1, 0, 1);
    /// The EL1 physical timer (trapped by `CNTHCTL_EL2.EL1PCEN` = 0).
    pub const CNTP_TVAL_EL0: Self = Self::new(3, 3, 14, 2, 0);
    pub const CNTP_CTL_EL0: Self = Self::new(3, 3, 14, 2, 1);
    pub const CNTP_CVAL_EL0: Self = Self::new(3, 3, 14, 2, 2);
    /// Data-cache maintenance by set/way (trapped by `HCR_EL2.TSW`).
    pub const DC_ISW: Self = Self::new(1, 0, 7, 6, 2);
    pub const DC_CSW: Self = Self::new(1, 0, 7, 10, 2);
    pub const DC_CISW: Self = Self::new(1, 0, 7, 14, 2);

    /// A system instruction (`SYS`/`SYSL`: `op0` = 1) rather than a
    /// register.
    pub const fn is_instruction(&self) -> bool {
        self.op0 == 1
    }

    /// In the space reserved for IMPLEMENTATION DEFINED registers and
    /// instructions, which `HCR_EL2.TIDCP` traps: `op0` 1 or 3 with `CRn`
    /// 11 or 15 (Arm ARM, D18.3.2 "Reserved encodings for IMPLEMENTATION
    /// DEFINED registers" and the `HCR_EL2.TIDCP` description).
    pub const fn is_implementation_defined(&self) -> bool {
        (self.op0 == 1 || self.op0 == 3) && (self.crn == 11 || self.crn == 15)
    }

    /// Data-cache maintenance by set/way.
    pub const fn is_set_way_maintenance(&self) -> bool {
        matches!(
            (self.op0, self.op1, self.crn, self.crm, self.op2),
            (1, 0, 7, 6 | 10 | 14, 2)
        )
    }

    /// The architectural name of the encodings Sluice's configuration
    /// traps, for log lines; `None` for the rest.
    pub fn name(&self) -> Option<&'static str> {
        Some(match *self {
            Self::ACTLR_EL1 => "ACTLR_EL1",
            Self::CNTP_TVAL_EL0 => "CNTP_TVAL_EL0",
            Self::CNTP_CTL_EL0 => "CNTP_CTL_EL0",
            Self::CNTP_CVAL_EL0 => "CNTP_CVAL_EL0",
            Self::DC_ISW => "DC ISW",
            Self::DC_CSW => "DC CSW",
            Self::DC_CISW => "DC CISW",
            _ if self.is_implementation_defined() => "IMPLEMENTATION DEFINED",
            _ => return None,
        })
    }
}

/// The generic assembler name, `S<op0>_<op1>_C<n>_C<m>_<op2>`, followed
/// by the architectural name in parentheses where [`Self::name`] knows it.
impl fmt::Display for SystemRegisterEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "S{}_{}_C{}_C{}_{}",
            self.op0, self.op1, self.crn, self.crm, self.op2
        )?;
        match self.name() {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

/// A trapped aarch64 system-register access or system instruction (Arm
/// `ESR_EL2` ISS for EC 0x18: `Op0`, `Op2`, `Op1`, `CRn`, `Rt`, `CRm`,
/// `Direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemRegisterAccess {
    pub encoding: SystemRegisterEncoding,
    /// `Rt`: X0–X30, 31 the zero register.
    pub register: u8,
    /// `Read` for `MRS`/`SYSL`, `Write` for `MSR`/`SYS`.
    pub access: MsrAccess,
}

/// The instruction as an engineer would write it, e.g.
/// `MRS X3, S3_0_C1_C0_1 (ACTLR_EL1)`.
impl fmt::Display for SystemRegisterAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rt = Aarch64Register(self.register);
        match (self.encoding.is_instruction(), self.access) {
            (false, MsrAccess::Read) => write!(f, "MRS {rt}, {}", self.encoding),
            (false, MsrAccess::Write) => write!(f, "MSR {}, {rt}", self.encoding),
            (true, MsrAccess::Read) => write!(f, "SYSL {rt}, {}", self.encoding),
            (true, MsrAccess::Write) => write!(f, "SYS {}, {rt}", self.encoding),
        }
    }
}

/// An aarch64 general-purpose register number for display: `X0`–`X30`,
/// `XZR` for 31.
struct Aarch64Register(u8);

impl fmt::Display for Aarch64Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            31 => f.write_str("XZR"),
            n => write!(f, "X{n}"),
        }
    }
}

impl DecodedAccess {
    /// The register value a load of `value` (the `size` bytes read) leaves
    /// in the transfer register: sign- or zero-extended to the register
    /// width, a W register's upper half zero (Arm ARM, "Registers in
    /// AArch64 execution state": writes to Wn zero bits 63:32).
    pub const fn load_result(&self, value: u64) -> u64 {
        let bits = 8 * self.size.bytes() as u32;
        let value = value & self.size.mask();
        let extended = if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            (((value << shift) as i64) >> shift) as u64
        } else {
            value
        };
        if self.register_64 {
            extended
        } else {
            extended & 0xffff_ffff
        }
    }
}

/// How long the exiting instruction is, when the hardware said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstructionLength {
    /// Reported by hardware (VMX exit-instruction length, SVM `nRIP`, IOIO
    /// `EXITINFO2`).
    Known(u8),
    /// Not reported: decode the instruction at `rip` ([`decode`]).
    Unknown,
}

/// One exit, with where the guest was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub reason: VcpuExit,
    /// The guest RIP of the exiting instruction.
    pub rip: u64,
    pub length: InstructionLength,
}

/// The general-purpose registers, RIP and RFLAGS of a vCPU.
///
/// `gprs` is indexed by the x86 register number used in ModRM/REX
/// encodings: 0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI,
/// 8–15 R8–R15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestRegisters {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

/// Register numbers of [`GuestRegisters::gprs`].
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
}

/// RFLAGS bit 1 is reserved and always reads as one (SDM vol. 1, 3.4.3).
pub const RFLAGS_RESERVED_ONE: u64 = 1 << 1;

impl GuestRegisters {
    /// All zero, with the reserved RFLAGS bit set.
    pub const fn new() -> Self {
        Self {
            gprs: [0; 16],
            rip: 0,
            rflags: RFLAGS_RESERVED_ONE,
        }
    }
    pub const fn rax(&self) -> u64 {
        self.gprs[gpr::RAX]
    }
    pub const fn rbx(&self) -> u64 {
        self.gprs[gpr::RBX]
    }
    pub const fn rcx(&self) -> u64 {
        self.gprs[gpr::RCX]
    }
    pub const fn rdx(&self) -> u64 {
        self.gprs[gpr::RDX]
    }
}

/// An x86 segment register with its hidden part, in a neutral form that
/// both the VMCB (12-bit packed attributes) and the VMCS (access rights)
/// encode from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Descriptor type (bits 43:40 of the descriptor).
    pub typ: u8,
    /// S: code/data (true) or system segment.
    pub code_or_data: bool,
    pub dpl: u8,
    pub present: bool,
    pub available: bool,
    /// L: 64-bit code segment.
    pub long: bool,
    /// D/B: default operation size 32 bit.
    pub default_big: bool,
    /// G: limit in 4 KiB units.
    pub granularity: bool,
}

impl Segment {
    /// Execute/read code, accessed (type 0xB).
    pub const TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
    /// Read/write data, accessed (type 0x3).
    pub const TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
    /// 64-bit busy TSS (type 0xB, system).
    pub const TYPE_TSS64_BUSY: u8 = 0xb;
    /// LDT (type 0x2, system).
    pub const TYPE_LDT: u8 = 0x2;

    /// A flat 64-bit code segment (base 0, limit 4 GiB, L=1, D=0, DPL 0).
    pub const fn flat_code64(selector: u16) -> Self {
        Self {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            typ: Self::TYPE_CODE_EXEC_READ_ACCESSED,
            code_or_data: true,
            dpl: 0,
            present: true,
            available: false,
            long: true,
            default_big: false,
            granularity: true,
        }
    }

    /// A flat read/write data segment (base 0, limit 4 GiB, DPL 0).
    pub const fn flat_data(selector: u16) -> Self {
        Self {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            typ: Self::TYPE_DATA_READ_WRITE_ACCESSED,
            code_or_data: true,
            dpl: 0,
            present: true,
            available: false,
            long: false,
            default_big: true,
            granularity: true,
        }
    }

    /// A system segment (TSS, LDT) of `typ` with a byte-granular limit.
    pub const fn system(selector: u16, typ: u8, base: u64, limit: u32) -> Self {
        Self {
            selector,
            base,
            limit,
            typ,
            code_or_data: false,
            dpl: 0,
            present: true,
            available: false,
            long: false,
            default_big: false,
            granularity: false,
        }
    }

    /// A segment register that holds nothing usable (a null selector).
    pub const fn unusable() -> Self {
        Self {
            selector: 0,
            base: 0,
            limit: 0,
            typ: 0,
            code_or_data: false,
            dpl: 0,
            present: false,
            available: false,
            long: false,
            default_big: false,
            granularity: false,
        }
    }

    /// Descriptor bits 47:40 (type, S, DPL, P) as one byte.
    pub const fn access_byte(&self) -> u8 {
        (self.typ & 0xf)
            | ((self.code_or_data as u8) << 4)
            | ((self.dpl & 3) << 5)
            | ((self.present as u8) << 7)
    }

    /// Descriptor bits 55:52 (AVL, L, D/B, G) as a nibble.
    pub const fn flags_nibble(&self) -> u8 {
        (self.available as u8)
            | ((self.long as u8) << 1)
            | ((self.default_big as u8) << 2)
            | ((self.granularity as u8) << 3)
    }

    /// The 8-byte GDT descriptor of a code/data segment whose base fits in
    /// 32 bits (SDM vol. 3, 3.4.5). The limit is stored in the 20-bit field
    /// (in 4 KiB units when `granularity`).
    pub const fn descriptor(&self) -> u64 {
        let limit = if self.granularity {
            self.limit >> 12
        } else {
            self.limit
        } as u64;
        let base = self.base;
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((self.access_byte() as u64) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | ((self.flags_nibble() as u64) << 52)
            | (((base >> 24) & 0xff) << 56)
    }
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Architectural control-register bits used for guest entry (SDM vol. 3,
/// 2.5; AMD APM vol. 2, 3.1).
pub mod cr {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_NW: u64 = 1 << 29;
    pub const CR0_CD: u64 = 1 << 30;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_VMXE: u64 = 1 << 13;
    /// EFER (MSR C000_0080h).
    pub const EFER_SCE: u64 = 1 << 0;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    /// AMD only: SVM enable; must be set in a guest's EFER image for VMRUN
    /// (APM vol. 2, 15.5.1).
    pub const EFER_SVME: u64 = 1 << 12;
}

/// The state a vCPU starts with (the direct-boot protocol fills it in, see
/// [`crate::vm::boot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    pub registers: GuestRegisters,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// Architectural EFER; backends add what their hardware requires (SVM:
    /// EFER.SVME).
    pub efer: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub ss: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    /// IA32_PAT (power-on value 0x0007_0406_0007_0406, SDM vol. 3, 11.12.4).
    pub pat: u64,
}

/// IA32_PAT after reset (SDM vol. 3, table 11-12).
pub const PAT_RESET_VALUE: u64 = 0x0007_0406_0007_0406;

/// An event to deliver to the guest at the next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A hardware exception; `error_code` must be given exactly for the
    /// vectors that push one.
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// A maskable external interrupt (vector 32–255).
    Interrupt {
        vector: u8,
    },
    Nmi,
}

/// Exception vectors that push an error code in protected and long mode
/// (SDM vol. 3, table 6-1): #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP.
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

impl Event {
    /// Checks the event can be injected as described: exceptions are
    /// vectors 0–31 other than NMI (2) with an error code exactly when the
    /// vector pushes one, interrupts are vectors 32–255.
    pub const fn validate(&self) -> Result<(), VcpuError> {
        match *self {
            Event::Exception { vector, error_code } => {
                if vector >= 32 || vector == 2 {
                    return Err(VcpuError::BadEvent(
                        "exception vector must be 0-31 and not NMI",
                    ));
                }
                if exception_has_error_code(vector) != error_code.is_some() {
                    return Err(VcpuError::BadEvent(
                        "error code given for a vector without one, or missing",
                    ));
                }
                Ok(())
            }
            Event::Interrupt { vector } => {
                if vector < 32 {
                    Err(VcpuError::BadEvent("interrupt vectors 0-31 are exceptions"))
                } else {
                    Ok(())
                }
            }
            Event::Nmi => Ok(()),
        }
    }
}

/// The guest state that decides how its code is fetched and decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TranslationState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// CS.L and CS.D of the current code segment.
    pub cs_long: bool,
    pub cs_default_big: bool,
}

/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;

impl TranslationState {
    pub const fn paging(&self) -> bool {
        self.cr0 & cr::CR0_PG != 0
    }
    /// The decoder mode: 64-bit when EFER.LMA and CS.L, else by CS.D (and
    /// 16-bit outside protected mode).
    pub const fn code_mode(&self) -> decode::CodeMode {
        if self.efer & cr::EFER_LMA != 0 && self.cs_long {
            decode::CodeMode::Long64
        } else if self.cr0 & cr::CR0_PE != 0 && self.cs_default_big {
            decode::CodeMode::Protected32
        } else {
            decode::CodeMode::Real16
        }
    }
}

/// The general-purpose registers, PC and PSTATE of an aarch64 vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Aarch64Registers {
    /// X0–X30.
    pub x: [u64; 31],
    /// The address of the next instruction the guest executes (ELR_EL2
    /// while it is out).
    pub pc: u64,
    /// PSTATE in the `SPSR_EL2` layout.
    pub pstate: u64,
}

/// `PSTATE` / `SPSR_EL2` / `SPSR_EL1` bits (Arm ARM, D19 "SPSR_EL2" and
/// "SPSR_EL1" for exceptions taken from AArch64; the same layout holds
/// PSTATE in both).
pub mod pstate {
    /// `M[3:0]` = EL0 (EL0t).
    pub const MODE_EL0T: u64 = 0b0000;
    /// `M[3:0]` = EL1 with SP_EL0 (EL1t).
    pub const MODE_EL1T: u64 = 0b0100;
    /// `M[3:0]` = EL1 with SP_EL1 (EL1h).
    pub const MODE_EL1H: u64 = 0b0101;
    /// `M[3:0]`: exception level (bits 3:2) and stack pointer (bit 0).
    pub const MODE: u64 = 0b1111;
    /// `M[4]` (nRW): the state was AArch32.
    pub const AARCH32: u64 = 1 << 4;
    /// FIQ mask.
    pub const F: u64 = 1 << 6;
    /// IRQ mask.
    pub const I: u64 = 1 << 7;
    /// SError mask.
    pub const A: u64 = 1 << 8;
    /// Debug mask.
    pub const D: u64 = 1 << 9;
    /// `D`, `A`, `I`, `F` together.
    pub const DAIF: u64 = D | A | I | F;
    /// `BTYPE` (FEAT_BTI), cleared when an instruction retires.
    pub const BTYPE: u64 = 0b11 << 10;
    /// Speculative Store Bypass Safe (FEAT_SSBS).
    pub const SSBS: u64 = 1 << 12;
    /// All interrupts masked (FEAT_NMI).
    pub const ALLINT: u64 = 1 << 13;
    /// Illegal Execution state.
    pub const IL: u64 = 1 << 20;
    /// Software step.
    pub const SS: u64 = 1 << 21;
    /// Privileged Access Never (FEAT_PAN).
    pub const PAN: u64 = 1 << 22;
    /// User Access Override (FEAT_UAO).
    pub const UAO: u64 = 1 << 23;
    /// Tag Check Override (FEAT_MTE).
    pub const TCO: u64 = 1 << 25;
}

/// A synchronous exception Sluice makes an aarch64 guest take at EL1, as
/// the processor would have had the access not been trapped to EL2. The
/// backend builds the syndrome (`ESR_EL1`) from it and the exception
/// entry from where the guest was (Arm ARM DDI 0487 G.b, D1.10 "Exception
/// entry", and the pseudocode `AArch64.TakeException`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aarch64Exception {
    /// The instruction at the PC is UNDEFINED: `ESR_EL1.EC` = 0x00
    /// ("Unknown reason"), `IL` = 1 (the ESR_ELx `IL` field is RES1 for
    /// exceptions reported with EC 0x00), ISS zero; `ELR_EL1` is the
    /// instruction itself.
    Undefined,
    /// A synchronous external abort on a data access to the guest virtual
    /// address `far` by the instruction at the PC: EC 0x24 taken from EL0,
    /// 0x25 from EL1; `DFSC` = 0b010000, `WnR` = `write`, no instruction
    /// syndrome (`ISV` = 0, hence `IL` = 1); `FAR_EL1` = `far`.
    ExternalDataAbort { far: u64, write: bool },
}

impl Aarch64Exception {
    /// `ESR_EL1` for this exception taken from EL0 (`from_el0`) or EL1
    /// (Arm ARM, D19 "ESR_EL1": EC bits 31:26, IL bit 25, ISS bits 24:0;
    /// the data-abort ISS: WnR bit 6, DFSC bits 5:0).
    pub const fn syndrome(&self, from_el0: bool) -> u64 {
        const IL: u64 = 1 << 25;
        match *self {
            Self::Undefined => IL,
            Self::ExternalDataAbort { write, .. } => {
                let class: u64 = if from_el0 { 0x24 } else { 0x25 };
                let wnr = if write { 1 << 6 } else { 0 };
                (class << 26) | IL | wnr | 0b01_0000
            }
        }
    }

    /// The fault address the exception reports in `FAR_EL1`, if any.
    pub const fn fault_address(&self) -> Option<u64> {
        match *self {
            Self::Undefined => None,
            Self::ExternalDataAbort { far, .. } => Some(far),
        }
    }
}

impl Aarch64Registers {
    /// Whether the vCPU takes IRQs (PSTATE.I clear).
    pub const fn irqs_unmasked(&self) -> bool {
        self.pstate & pstate::I == 0
    }
}

/// The state an aarch64 vCPU starts with (the aarch64 direct-boot
/// protocol, [`crate::vm::boot`]); every EL1 system register not named
/// here starts at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aarch64EntryState {
    /// X0–X30, PC and PSTATE (`SPSR_EL2` layout, e.g. EL1h with DAIF set).
    pub registers: Aarch64Registers,
    pub sp_el1: u64,
    pub sctlr_el1: u64,
    /// `CPACR_EL1` (FP/SIMD access).
    pub cpacr_el1: u64,
}

/// Why a backend operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuError {
    /// The event cannot be injected as given.
    BadEvent(&'static str),
    /// An event is already pending injection.
    EventPending,
    /// The hardware refused the entry: the guest state is invalid (SVM
    /// `VMEXIT_INVALID`, VMX "VM-entry failure"), with the reason.
    InvalidGuestState(&'static str),
    /// The nested-paging root is not a 4 KiB-aligned address the hardware
    /// can use.
    BadNestedRoot(PhysAddr),
    /// No address-space identifier is left.
    OutOfAsids,
    /// Memory for the control block could not be allocated.
    OutOfMemory,
    /// An instruction length outside 1–15.
    BadInstructionLength(u64),
    /// The hardware feature is missing (e.g. no nested paging).
    Unsupported(&'static str),
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadEvent(why) => write!(f, "cannot inject event: {why}"),
            Self::EventPending => f.write_str("an event is already pending injection"),
            Self::InvalidGuestState(why) => write!(f, "invalid guest state: {why}"),
            Self::BadNestedRoot(root) => write!(f, "unusable nested page-table root {root}"),
            Self::OutOfAsids => f.write_str("no free address-space identifier"),
            Self::OutOfMemory => f.write_str("out of memory for the vCPU control block"),
            Self::BadInstructionLength(n) => write!(f, "instruction length {n} outside 1-15"),
            Self::Unsupported(what) => write!(f, "unsupported: {what}"),
        }
    }
}

/// The operations the VM layer needs from a hardware-virtualization
/// backend. SVM ([`svm::SvmBackend`]) and VMX ([`vmx::VmxBackend`]) implement it.
pub trait VcpuBackend {
    /// One virtual CPU: its control block (VMCB / VMCS) and the guest
    /// registers the hardware does not save.
    type Vcpu;

    /// A vCPU that starts at `entry`.
    fn create_vcpu(&mut self, entry: &EntryState) -> Result<Self::Vcpu, VcpuError>;
    /// Runs the guest until the next exit, and decodes it.
    fn run(&mut self, vcpu: &mut Self::Vcpu) -> Result<Exit, VcpuError>;
    fn registers(&self, vcpu: &Self::Vcpu) -> GuestRegisters;
    fn set_registers(&mut self, vcpu: &mut Self::Vcpu, registers: &GuestRegisters);
    /// Control registers, EFER and the code segment's mode bits.
    fn translation_state(&self, vcpu: &Self::Vcpu) -> TranslationState;
    /// Moves RIP past the exiting instruction of `length` bytes (1–15) and
    /// ends any interrupt shadow it created (as the CPU does when it retires
    /// an instruction).
    fn advance_rip(&mut self, vcpu: &mut Self::Vcpu, length: u8) -> Result<(), VcpuError>;
    /// Delivers `event` at the next entry. One event at a time:
    /// [`VcpuError::EventPending`] if one is still queued.
    fn inject_event(&mut self, vcpu: &mut Self::Vcpu, event: Event) -> Result<(), VcpuError>;
    /// Uses the nested page table (NPT / EPT) rooted at `root` from the next
    /// entry on, and flushes the vCPU's cached guest-physical translations.
    fn set_nested_root(&mut self, vcpu: &mut Self::Vcpu, root: PhysAddr) -> Result<(), VcpuError>;
    /// Gives back what the vCPU held (its ASID / VPID / VMID). Backends
    /// that tag translations per vCPU override this; for the rest dropping
    /// the vCPU is all there is to it.
    fn destroy_vcpu(&mut self, vcpu: Self::Vcpu) {
        drop(vcpu);
    }

    /// An aarch64 vCPU that starts at `entry`. x86 backends refuse.
    fn create_aarch64_vcpu(&mut self, entry: &Aarch64EntryState) -> Result<Self::Vcpu, VcpuError> {
        let _ = entry;
        Err(VcpuError::Unsupported(
            "an aarch64 vCPU on an x86 virtualization backend",
        ))
    }
    /// All of an aarch64 vCPU's registers; `None` on x86 backends (whose
    /// vCPUs [`VcpuBackend::registers`] describes completely).
    fn aarch64_registers(&self, vcpu: &Self::Vcpu) -> Option<Aarch64Registers> {
        let _ = vcpu;
        None
    }
    /// Makes an aarch64 vCPU take `exception` at EL1 at the next entry,
    /// as if the instruction at its PC had raised it (the counterpart of
    /// [`VcpuBackend::inject_event`], which carries x86 events only). One
    /// at a time: [`VcpuError::EventPending`] if one is still queued. x86
    /// backends refuse.
    fn inject_aarch64_exception(
        &mut self,
        vcpu: &mut Self::Vcpu,
        exception: Aarch64Exception,
    ) -> Result<(), VcpuError> {
        let _ = vcpu;
        log::error!(
            "cannot inject {exception:?}: an aarch64 exception on an x86 virtualization backend"
        );
        Err(VcpuError::Unsupported(
            "an aarch64 exception on an x86 virtualization backend",
        ))
    }
    /// Sets an aarch64 vCPU's registers. x86 backends refuse.
    fn set_aarch64_registers(
        &mut self,
        vcpu: &mut Self::Vcpu,
        registers: &Aarch64Registers,
    ) -> Result<(), VcpuError> {
        let _ = (vcpu, registers);
        Err(VcpuError::Unsupported(
            "aarch64 registers on an x86 virtualization backend",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_descriptors_match_the_architectural_encoding() {
        // SDM vol. 3, 3.4.5: the canonical flat 64-bit code descriptor is
        // 0x00af9b000000ffff and the flat data descriptor 0x00cf93000000ffff.
        assert_eq!(Segment::flat_code64(8).descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(Segment::flat_data(16).descriptor(), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn event_validation() {
        let gp = Event::Exception {
            vector: 13,
            error_code: Some(0),
        };
        assert_eq!(gp.validate(), Ok(()));
        let gp_without_code = Event::Exception {
            vector: 13,
            error_code: None,
        };
        assert!(matches!(
            gp_without_code.validate(),
            Err(VcpuError::BadEvent(_))
        ));
        let ud_with_code = Event::Exception {
            vector: 6,
            error_code: Some(1),
        };
        assert!(ud_with_code.validate().is_err());
        assert!(
            Event::Exception {
                vector: 2,
                error_code: None
            }
            .validate()
            .is_err()
        );
        assert!(
            Event::Exception {
                vector: 32,
                error_code: None
            }
            .validate()
            .is_err()
        );
        assert!(Event::Interrupt { vector: 31 }.validate().is_err());
        assert_eq!(Event::Interrupt { vector: 32 }.validate(), Ok(()));
        assert_eq!(Event::Nmi.validate(), Ok(()));
    }

    #[test]
    fn access_size_masks() {
        assert_eq!(AccessSize::Byte.mask(), 0xff);
        assert_eq!(AccessSize::Word.mask(), 0xffff);
        assert_eq!(AccessSize::Dword.mask(), 0xffff_ffff);
        assert_eq!(AccessSize::Qword.mask(), u64::MAX);
        assert_eq!(AccessSize::from_bytes(4), Some(AccessSize::Dword));
        assert_eq!(AccessSize::from_bytes(3), None);
    }

    #[test]
    fn decoded_loads_extend_like_the_arm_load_instructions() {
        let access = |size, sign_extend, register_64| DecodedAccess {
            size,
            kind: AccessKind::Read,
            register: 3,
            sign_extend,
            register_64,
        };
        // LDRB Wt / LDRH Wt / LDR Wt: zero-extended.
        assert_eq!(
            access(AccessSize::Byte, false, false).load_result(0x1ff),
            0xff
        );
        assert_eq!(
            access(AccessSize::Word, false, false).load_result(0x8001),
            0x8001
        );
        // LDRSB Wt: sign-extended to 32 bits, upper half clear.
        assert_eq!(
            access(AccessSize::Byte, true, false).load_result(0x80),
            0xffff_ff80
        );
        // LDRSB Xt / LDRSW Xt: sign-extended to 64 bits.
        assert_eq!(
            access(AccessSize::Byte, true, true).load_result(0x80),
            0xffff_ffff_ffff_ff80
        );
        assert_eq!(
            access(AccessSize::Dword, true, true).load_result(0x8000_0000),
            0xffff_ffff_8000_0000
        );
        assert_eq!(
            access(AccessSize::Dword, true, true).load_result(0x7fff_ffff),
            0x7fff_ffff
        );
        // LDR Xt: the whole value.
        assert_eq!(
            access(AccessSize::Qword, false, true).load_result(u64::MAX),
            u64::MAX
        );
    }

    #[test]
    fn x86_backends_refuse_aarch64_vcpus() {
        struct X86Only;
        impl VcpuBackend for X86Only {
            type Vcpu = ();
            fn create_vcpu(&mut self, _: &EntryState) -> Result<(), VcpuError> {
                Ok(())
            }
            fn run(&mut self, _: &mut ()) -> Result<Exit, VcpuError> {
                Err(VcpuError::Unsupported("test"))
            }
            fn registers(&self, _: &()) -> GuestRegisters {
                GuestRegisters::new()
            }
            fn set_registers(&mut self, _: &mut (), _: &GuestRegisters) {}
            fn translation_state(&self, _: &()) -> TranslationState {
                TranslationState::default()
            }
            fn advance_rip(&mut self, _: &mut (), _: u8) -> Result<(), VcpuError> {
                Ok(())
            }
            fn inject_event(&mut self, _: &mut (), _: Event) -> Result<(), VcpuError> {
                Ok(())
            }
            fn set_nested_root(&mut self, _: &mut (), _: PhysAddr) -> Result<(), VcpuError> {
                Ok(())
            }
        }
        let mut b = X86Only;
        let entry = Aarch64EntryState {
            registers: Aarch64Registers::default(),
            sp_el1: 0,
            sctlr_el1: 0,
            cpacr_el1: 0,
        };
        assert!(matches!(
            b.create_aarch64_vcpu(&entry),
            Err(VcpuError::Unsupported(_))
        ));
        assert_eq!(b.aarch64_registers(&()), None);
        assert!(matches!(
            b.inject_aarch64_exception(&mut (), Aarch64Exception::Undefined),
            Err(VcpuError::Unsupported(_))
        ));
        assert!(
            b.set_aarch64_registers(&mut (), &Aarch64Registers::default())
                .is_err()
        );
    }

    #[test]
    fn instruction_bytes_are_capped_at_15() {
        let b = InstructionBytes::new(&[0x90; 20]);
        assert_eq!(b.as_slice().len(), 15);
        assert!(InstructionBytes::new(&[]).is_empty());
    }
}
