//! An x86 instruction decoder for the instructions that exit to Sluice.
//!
//! Without NRIPS (QEMU's TCG SVM) the hypervisor must find the next RIP
//! itself, and an MMIO exit (a nested page fault on the ECAM window) says
//! which address was touched but not with which data: both need the
//! instruction. This decoder knows exactly the instructions that exit here
//! and refuses everything else, so a VM is stopped with a log line rather
//! than resumed at a wrong RIP:
//!
//! * `VMMCALL` (0F 01 D9), `VMCALL` (0F 01 C1), `CPUID` (0F A2), `HLT` (F4),
//!   `RDMSR` (0F 32), `WRMSR` (0F 30), `WBINVD` (0F 09), `WBNOINVD`
//!   (F3 0F 09), `INVD` (0F 08);
//! * `IN`/`OUT` (E4–E7, EC–EF) and `INS`/`OUTS` (6C–6F);
//! * `MOV` with a memory operand: 88, 89, 8A, 8B, C6 /0, C7 /0, and the
//!   zero-extending loads `MOVZX` (0F B6, 0F B7) compilers emit for narrow
//!   volatile reads.
//!
//! Encodings follow the Intel SDM vol. 2 (2.1 instruction format, 2.2.1
//! REX, tables 2-1 to 2-3 for ModRM/SIB in 16- and 32/64-bit addressing)
//! and AMD APM vol. 3 (VMMCALL, WBNOINVD). Bytes are fetched one at a time
//! through an [`InstructionFetch`], so an instruction that runs into a page
//! that is not RAM fails cleanly at that byte.

use core::fmt;

use super::{AccessSize, GuestRegisters, IoDirection};
use crate::iommufd::{GuestMemory, GuestMemoryError};

/// The architectural maximum instruction length (SDM vol. 2, 2.3.11).
pub const MAX_INSTRUCTION_LENGTH: usize = 15;

/// Reads the guest's code bytes.
pub trait InstructionFetch {
    /// Copies the bytes at guest linear address `linear` into `out`.
    fn fetch(&self, linear: u64, out: &mut [u8]) -> Result<(), FetchError>;
}

/// Why code bytes could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchError {
    /// The address is not guest RAM (MMIO, a hole, beyond RAM).
    Memory(GuestMemoryError),
    /// The linear address does not translate (guest paging).
    NotMapped { linear: u64 },
}

impl From<GuestMemoryError> for FetchError {
    fn from(e: GuestMemoryError) -> Self {
        FetchError::Memory(e)
    }
}

/// Code fetch for guests whose linear addresses equal guest-physical ones
/// (the identity tables of the direct-boot protocol): reads guest RAM
/// through [`GuestMemory`], which refuses anything that is not RAM.
pub struct IdentityFetch<'m>(pub &'m dyn GuestMemory);

impl InstructionFetch for IdentityFetch<'_> {
    fn fetch(&self, linear: u64, out: &mut [u8]) -> Result<(), FetchError> {
        self.0.read(linear, out).map_err(FetchError::Memory)
    }
}

/// Bytes the hardware already fetched (SVM decode assists) for the
/// instruction at `rip`, falling back to `rest` beyond them.
pub struct PrefetchedFetch<'a, F: InstructionFetch + ?Sized> {
    pub rip: u64,
    pub bytes: &'a [u8],
    pub rest: &'a F,
}

impl<F: InstructionFetch + ?Sized> InstructionFetch for PrefetchedFetch<'_, F> {
    fn fetch(&self, linear: u64, out: &mut [u8]) -> Result<(), FetchError> {
        for (i, slot) in out.iter_mut().enumerate() {
            let at = linear.wrapping_add(i as u64);
            let index = at.wrapping_sub(self.rip);
            match self.bytes.get(index as usize) {
                Some(&b) if index < self.bytes.len() as u64 => *slot = b,
                _ => self.rest.fetch(at, core::slice::from_mut(slot))?,
            }
        }
        Ok(())
    }
}

/// Code fetch through the guest's own 4- or 5-level IA-32e page tables
/// (SDM vol. 3, 4.5): each byte's linear address is translated by walking
/// the tables at `cr3` in guest RAM. A table entry that is not present,
/// has reserved bits in its address or lies outside RAM makes the fetch
/// fail; nothing is ever read outside the VM's RAM.
pub struct PagedFetch<'m> {
    pub mem: &'m dyn GuestMemory,
    pub cr3: u64,
    /// 5 with CR4.LA57, else 4.
    pub levels: u8,
}

/// Address bits 51:12 of a paging-structure entry.
const ENTRY_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const ENTRY_PRESENT: u64 = 1 << 0;
const ENTRY_PAGE_SIZE: u64 = 1 << 7;

impl PagedFetch<'_> {
    /// The guest-physical address of `linear`.
    pub fn translate(&self, linear: u64) -> Result<u64, FetchError> {
        let mut table = self.cr3 & ENTRY_ADDRESS;
        for level in (0..self.levels).rev() {
            let shift = 12 + 9 * u32::from(level);
            let index = (linear >> shift) & 0x1ff;
            let mut raw = [0u8; 8];
            self.mem.read(table + index * 8, &mut raw)?;
            let entry = u64::from_le_bytes(raw);
            if entry & ENTRY_PRESENT == 0 {
                return Err(FetchError::NotMapped { linear });
            }
            // PS in a PDE (2 MiB) or PDPTE (1 GiB) ends the walk.
            if (level == 1 || level == 2) && entry & ENTRY_PAGE_SIZE != 0 {
                let size = 1u64 << shift;
                return Ok((entry & ENTRY_ADDRESS & !(size - 1)) | (linear & (size - 1)));
            }
            if level > 2 && entry & ENTRY_PAGE_SIZE != 0 {
                // PS is reserved in PML4Es and PML5Es: a #PF on hardware.
                return Err(FetchError::NotMapped { linear });
            }
            table = entry & ENTRY_ADDRESS;
        }
        Ok(table | (linear & 0xfff))
    }
}

impl InstructionFetch for PagedFetch<'_> {
    fn fetch(&self, linear: u64, out: &mut [u8]) -> Result<(), FetchError> {
        for (i, slot) in out.iter_mut().enumerate() {
            let gpa = self.translate(linear.wrapping_add(i as u64))?;
            self.mem.read(gpa, core::slice::from_mut(slot))?;
        }
        Ok(())
    }
}

/// The code segment's mode, which decides default operand and address
/// sizes and whether REX exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeMode {
    /// 64-bit mode (EFER.LMA = 1, CS.L = 1).
    Long64,
    /// 32-bit protected or compatibility mode (CS.D = 1).
    Protected32,
    /// 16-bit code (real mode, virtual-8086, CS.D = 0).
    Real16,
}

/// A general-purpose register operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Register {
    /// Register number (0–15, as in [`GuestRegisters::gprs`]).
    pub index: u8,
    /// A byte operand names AH, CH, DH or BH (bits 15:8 of register
    /// `index`), which happens for numbers 4–7 without REX.
    pub high_byte: bool,
}

/// Where a port number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOperand {
    Immediate(u8),
    Dx,
}

/// The value a `MOV` store writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreSource {
    Register(Register),
    /// Already sign-extended to the operand size and masked to it.
    Immediate(u64),
}

/// What a decoded instruction does, as far as emulation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Vmmcall,
    Vmcall,
    Cpuid,
    Hlt,
    Rdmsr,
    Wrmsr,
    Wbinvd,
    Wbnoinvd,
    Invd,
    /// `IN`/`OUT`: data in AL/AX/EAX.
    PortIo {
        direction: IoDirection,
        size: AccessSize,
        port: PortOperand,
    },
    /// `INS`/`OUTS`.
    PortString {
        direction: IoDirection,
        size: AccessSize,
        rep: bool,
    },
    /// A memory store (`MOV m, r` / `MOV m, imm`).
    MovStore {
        size: AccessSize,
        source: StoreSource,
    },
    /// A memory load into a register (`MOV r, m`).
    MovLoad {
        size: AccessSize,
        destination: Register,
    },
    /// A zero-extending load (`MOVZX r, m8/m16`): `size` bytes are read and
    /// the destination, of `destination_size`, receives them zero-extended.
    MovZeroExtend {
        size: AccessSize,
        destination: Register,
        destination_size: AccessSize,
    },
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    /// Length in bytes, prefixes included (1–15).
    pub length: u8,
    pub operation: Operation,
}

/// Why an instruction could not be decoded. The VM is stopped: resuming at
/// a guessed RIP would corrupt the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A byte of the instruction could not be read; `offset` is its place
    /// in the instruction.
    Fetch { offset: u8, error: FetchError },
    /// More than 15 bytes without a complete instruction.
    TooLong,
    /// Not one of the instructions that exit to Sluice; `opcode` holds the
    /// opcode bytes read so far (escape byte first).
    UnsupportedOpcode { opcode: [u8; 3], len: u8 },
    /// A `MOV` whose ModRM names a register, not memory: it cannot have
    /// caused a memory exit.
    NoMemoryOperand,
    /// `LOCK` on an instruction that does not allow it (#UD on hardware).
    BadLockPrefix,
    /// The linear address of the instruction overflowed.
    AddressOverflow,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fetch { offset, error } => {
                write!(f, "instruction byte {offset} cannot be fetched: {error:?}")
            }
            Self::TooLong => f.write_str("instruction longer than 15 bytes"),
            Self::UnsupportedOpcode { opcode, len } => {
                write!(
                    f,
                    "opcode {:02x?} is not an instruction Sluice emulates",
                    &opcode[..usize::from(*len)]
                )
            }
            Self::NoMemoryOperand => f.write_str("MOV without a memory operand"),
            Self::BadLockPrefix => f.write_str("LOCK prefix on a non-lockable instruction"),
            Self::AddressOverflow => f.write_str("instruction address overflows"),
        }
    }
}

/// Reads instruction bytes one by one.
struct Cursor<'f, F: InstructionFetch + ?Sized> {
    fetch: &'f F,
    rip: u64,
    len: u8,
}

impl<F: InstructionFetch + ?Sized> Cursor<'_, F> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if usize::from(self.len) >= MAX_INSTRUCTION_LENGTH {
            return Err(DecodeError::TooLong);
        }
        let at = self
            .rip
            .checked_add(u64::from(self.len))
            .ok_or(DecodeError::AddressOverflow)?;
        let mut byte = [0u8];
        self.fetch
            .fetch(at, &mut byte)
            .map_err(|error| DecodeError::Fetch {
                offset: self.len,
                error,
            })?;
        self.len += 1;
        Ok(byte[0])
    }

    fn skip(&mut self, count: u8) -> Result<(), DecodeError> {
        for _ in 0..count {
            self.next()?;
        }
        Ok(())
    }

    fn immediate(&mut self, bytes: u8) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..bytes {
            value |= u64::from(self.next()?) << (8 * i);
        }
        Ok(value)
    }
}

#[derive(Default)]
struct Prefixes {
    operand_size: bool,
    address_size: bool,
    rep: bool,
    lock: bool,
    /// REX byte, if it immediately precedes the opcode.
    rex: Option<u8>,
}

impl Prefixes {
    fn rex_w(&self) -> bool {
        self.rex.is_some_and(|r| r & 0x8 != 0)
    }
    fn rex_r(&self) -> u8 {
        self.rex.map_or(0, |r| (r >> 2) & 1)
    }
}

/// Decodes the instruction at guest linear address `rip`.
pub fn decode<F: InstructionFetch + ?Sized>(
    fetch: &F,
    rip: u64,
    mode: CodeMode,
) -> Result<Instruction, DecodeError> {
    let mut c = Cursor { fetch, rip, len: 0 };
    let mut p = Prefixes::default();
    let opcode = loop {
        let b = c.next()?;
        match b {
            0x66 => p.operand_size = true,
            0x67 => p.address_size = true,
            0xf3 => p.rep = true,
            // REPNE: no meaning for the instructions here, but legal.
            0xf2 => p.rep = false,
            0xf0 => p.lock = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0x40..=0x4f if mode == CodeMode::Long64 => {
                // A REX counts only directly before the opcode; a legacy
                // prefix after it makes it ignored (SDM vol. 2, 2.2.1).
                p.rex = Some(b);
                continue;
            }
            _ => break b,
        }
        p.rex = None;
    };

    let operand_size = match mode {
        CodeMode::Long64 if p.rex_w() => AccessSize::Qword,
        CodeMode::Long64 | CodeMode::Protected32 if p.operand_size => AccessSize::Word,
        CodeMode::Long64 | CodeMode::Protected32 => AccessSize::Dword,
        CodeMode::Real16 if p.operand_size => AccessSize::Dword,
        CodeMode::Real16 => AccessSize::Word,
    };
    // IN/OUT have no 64-bit form: REX.W is ignored.
    let io_size = if p.operand_size ^ (mode == CodeMode::Real16) {
        AccessSize::Word
    } else {
        AccessSize::Dword
    };

    let operation = match opcode {
        0xf4 => Operation::Hlt,
        0xe4..=0xe7 | 0xec..=0xef => {
            let direction = if opcode & 2 == 0 {
                IoDirection::In
            } else {
                IoDirection::Out
            };
            let size = if opcode & 1 == 0 {
                AccessSize::Byte
            } else {
                io_size
            };
            let port = if opcode & 8 == 0 {
                PortOperand::Immediate(c.next()?)
            } else {
                PortOperand::Dx
            };
            Operation::PortIo {
                direction,
                size,
                port,
            }
        }
        0x6c..=0x6f => Operation::PortString {
            direction: if opcode & 2 == 0 {
                IoDirection::In
            } else {
                IoDirection::Out
            },
            size: if opcode & 1 == 0 {
                AccessSize::Byte
            } else {
                io_size
            },
            rep: p.rep,
        },
        0x88..=0x8b => {
            let byte_op = opcode & 1 == 0;
            let modrm = memory_operand(&mut c, &p, mode)?;
            let size = if byte_op {
                AccessSize::Byte
            } else {
                operand_size
            };
            let reg = register(modrm, &p, byte_op);
            if opcode & 2 == 0 {
                Operation::MovStore {
                    size,
                    source: StoreSource::Register(reg),
                }
            } else {
                Operation::MovLoad {
                    size,
                    destination: reg,
                }
            }
        }
        0xc6 | 0xc7 => {
            let modrm = memory_operand(&mut c, &p, mode)?;
            if (modrm >> 3) & 7 != 0 {
                return Err(DecodeError::UnsupportedOpcode {
                    opcode: [opcode, modrm, 0],
                    len: 2,
                });
            }
            let (size, imm_bytes) = if opcode == 0xc6 {
                (AccessSize::Byte, 1)
            } else if operand_size == AccessSize::Word {
                (AccessSize::Word, 2)
            } else {
                // imm32, sign-extended for a 64-bit operand.
                (operand_size, 4)
            };
            let raw = c.immediate(imm_bytes)?;
            let value = if imm_bytes == 4 {
                (raw as u32 as i32 as i64 as u64) & size.mask()
            } else {
                raw
            };
            Operation::MovStore {
                size,
                source: StoreSource::Immediate(value),
            }
        }
        0x0f => two_byte(&mut c, &p, mode, operand_size)?,
        other => {
            return Err(DecodeError::UnsupportedOpcode {
                opcode: [other, 0, 0],
                len: 1,
            });
        }
    };

    // None of these instructions (MOV included) accepts LOCK: #UD.
    if p.lock {
        return Err(DecodeError::BadLockPrefix);
    }
    Ok(Instruction {
        length: c.len,
        operation,
    })
}

fn two_byte<F: InstructionFetch + ?Sized>(
    c: &mut Cursor<'_, F>,
    p: &Prefixes,
    mode: CodeMode,
    operand_size: AccessSize,
) -> Result<Operation, DecodeError> {
    let op = c.next()?;
    Ok(match op {
        0x01 => match c.next()? {
            0xd9 => Operation::Vmmcall,
            0xc1 => Operation::Vmcall,
            other => {
                return Err(DecodeError::UnsupportedOpcode {
                    opcode: [0x0f, 0x01, other],
                    len: 3,
                });
            }
        },
        0xa2 => Operation::Cpuid,
        0x32 => Operation::Rdmsr,
        0x30 => Operation::Wrmsr,
        0x09 if p.rep => Operation::Wbnoinvd,
        0x09 => Operation::Wbinvd,
        0x08 => Operation::Invd,
        0xb6 | 0xb7 => {
            let modrm = memory_operand(c, p, mode)?;
            Operation::MovZeroExtend {
                size: if op == 0xb6 {
                    AccessSize::Byte
                } else {
                    AccessSize::Word
                },
                destination: register(modrm, p, false),
                destination_size: operand_size,
            }
        }
        other => {
            return Err(DecodeError::UnsupportedOpcode {
                opcode: [0x0f, other, 0],
                len: 2,
            });
        }
    })
}

/// The register named by ModRM.reg (extended by REX.R).
fn register(modrm: u8, p: &Prefixes, byte_op: bool) -> Register {
    let reg = (modrm >> 3) & 7;
    if byte_op && p.rex.is_none() && reg >= 4 {
        Register {
            index: reg - 4,
            high_byte: true,
        }
    } else {
        Register {
            index: reg | (p.rex_r() << 3),
            high_byte: false,
        }
    }
}

/// Reads ModRM and the SIB byte and displacement it announces; refuses a
/// register operand. Returns the ModRM byte.
fn memory_operand<F: InstructionFetch + ?Sized>(
    c: &mut Cursor<'_, F>,
    p: &Prefixes,
    mode: CodeMode,
) -> Result<u8, DecodeError> {
    let modrm = c.next()?;
    let md = modrm >> 6;
    let rm = modrm & 7;
    if md == 3 {
        return Err(DecodeError::NoMemoryOperand);
    }
    let address16 = match mode {
        CodeMode::Long64 => false,
        CodeMode::Protected32 => p.address_size,
        CodeMode::Real16 => !p.address_size,
    };
    if address16 {
        // SDM vol. 2, table 2-1.
        let disp = match (md, rm) {
            (0, 6) => 2,
            (0, _) => 0,
            (1, _) => 1,
            _ => 2,
        };
        c.skip(disp)?;
    } else {
        // SDM vol. 2, tables 2-2 and 2-3 (64-bit mode: mod 00 rm 101 is
        // RIP-relative, with the same disp32).
        let mut disp = match md {
            0 if rm == 5 => 4,
            0 => 0,
            1 => 1,
            _ => 4,
        };
        if rm == 4 {
            let sib = c.next()?;
            if md == 0 && sib & 7 == 5 {
                disp = 4;
            }
        }
        c.skip(disp)?;
    }
    Ok(modrm)
}

/// The value of `register` of `size` (for a store's source operand).
pub fn read_register(regs: &GuestRegisters, register: Register, size: AccessSize) -> u64 {
    let full = regs.gprs[usize::from(register.index & 15)];
    if register.high_byte {
        (full >> 8) & 0xff
    } else {
        full & size.mask()
    }
}

/// Writes a loaded `value` of `size` into `register` with the x86 rules:
/// 8- and 16-bit destinations keep the other bits, a 32-bit destination is
/// zero-extended to 64 bits (SDM vol. 1, 3.4.1.1).
pub fn write_register(regs: &mut GuestRegisters, register: Register, size: AccessSize, value: u64) {
    let slot = &mut regs.gprs[usize::from(register.index & 15)];
    *slot = match (size, register.high_byte) {
        (_, true) => (*slot & !0xff00) | ((value & 0xff) << 8),
        (AccessSize::Byte, false) => (*slot & !0xff) | (value & 0xff),
        (AccessSize::Word, false) => (*slot & !0xffff) | (value & 0xffff),
        (AccessSize::Dword, false) => value & 0xffff_ffff,
        (AccessSize::Qword, false) => value,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommufd::VmId;
    use crate::testing::{Platform, VmSetup};

    /// Code at address 0x1000 in a flat byte array.
    struct Code(alloc::vec::Vec<u8>);

    const BASE: u64 = 0x1000;

    impl InstructionFetch for Code {
        fn fetch(&self, linear: u64, out: &mut [u8]) -> Result<(), FetchError> {
            for (i, slot) in out.iter_mut().enumerate() {
                let at = linear + i as u64;
                *slot = at
                    .checked_sub(BASE)
                    .and_then(|o| self.0.get(o as usize))
                    .copied()
                    .ok_or(FetchError::Memory(GuestMemoryError::NotRam { gpa: at }))?;
            }
            Ok(())
        }
    }

    fn dec(bytes: &[u8]) -> Result<Instruction, DecodeError> {
        decode(&Code(bytes.to_vec()), BASE, CodeMode::Long64)
    }

    fn dec_mode(bytes: &[u8], mode: CodeMode) -> Result<Instruction, DecodeError> {
        decode(&Code(bytes.to_vec()), BASE, mode)
    }

    fn len(bytes: &[u8]) -> u8 {
        let insn = dec(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
        insn.length
    }

    #[test]
    fn system_instructions() {
        assert_eq!(
            dec(&[0x0f, 0x01, 0xd9]).unwrap().operation,
            Operation::Vmmcall
        );
        assert_eq!(len(&[0x0f, 0x01, 0xd9]), 3);
        assert_eq!(
            dec(&[0x0f, 0x01, 0xc1]).unwrap().operation,
            Operation::Vmcall
        );
        assert_eq!(
            dec(&[0x0f, 0xa2]).unwrap(),
            Instruction {
                length: 2,
                operation: Operation::Cpuid
            }
        );
        assert_eq!(
            dec(&[0xf4]).unwrap(),
            Instruction {
                length: 1,
                operation: Operation::Hlt
            }
        );
        assert_eq!(dec(&[0x0f, 0x32]).unwrap().operation, Operation::Rdmsr);
        assert_eq!(dec(&[0x0f, 0x30]).unwrap().operation, Operation::Wrmsr);
        assert_eq!(dec(&[0x0f, 0x09]).unwrap().operation, Operation::Wbinvd);
        assert_eq!(
            dec(&[0xf3, 0x0f, 0x09]).unwrap(),
            Instruction {
                length: 3,
                operation: Operation::Wbnoinvd
            }
        );
        assert_eq!(dec(&[0x0f, 0x08]).unwrap().operation, Operation::Invd);
        // Trailing bytes of the next instruction do not matter.
        assert_eq!(len(&[0xf4, 0xf4, 0xf4]), 1);
    }

    #[test]
    fn port_io_all_forms() {
        let io = |bytes: &[u8]| dec(bytes).unwrap();
        assert_eq!(
            io(&[0xe4, 0x60]),
            Instruction {
                length: 2,
                operation: Operation::PortIo {
                    direction: IoDirection::In,
                    size: AccessSize::Byte,
                    port: PortOperand::Immediate(0x60)
                }
            }
        );
        assert_eq!(
            io(&[0xe5, 0x71]).operation,
            Operation::PortIo {
                direction: IoDirection::In,
                size: AccessSize::Dword,
                port: PortOperand::Immediate(0x71)
            }
        );
        assert_eq!(
            io(&[0x66, 0xe7, 0xf4]),
            Instruction {
                length: 3,
                operation: Operation::PortIo {
                    direction: IoDirection::Out,
                    size: AccessSize::Word,
                    port: PortOperand::Immediate(0xf4)
                }
            }
        );
        assert_eq!(
            io(&[0xee]),
            Instruction {
                length: 1,
                operation: Operation::PortIo {
                    direction: IoDirection::Out,
                    size: AccessSize::Byte,
                    port: PortOperand::Dx
                }
            }
        );
        assert_eq!(
            io(&[0xec]).operation,
            Operation::PortIo {
                direction: IoDirection::In,
                size: AccessSize::Byte,
                port: PortOperand::Dx
            }
        );
        assert_eq!(
            io(&[0x66, 0xed]).operation,
            Operation::PortIo {
                direction: IoDirection::In,
                size: AccessSize::Word,
                port: PortOperand::Dx
            }
        );
        // REX.W does not make port I/O 64-bit; the REX byte still counts.
        assert_eq!(
            io(&[0x48, 0xef]),
            Instruction {
                length: 2,
                operation: Operation::PortIo {
                    direction: IoDirection::Out,
                    size: AccessSize::Dword,
                    port: PortOperand::Dx
                }
            }
        );
        // 16-bit code: default size 16, 66 selects 32.
        assert_eq!(
            dec_mode(&[0xed], CodeMode::Real16).unwrap().operation,
            Operation::PortIo {
                direction: IoDirection::In,
                size: AccessSize::Word,
                port: PortOperand::Dx
            }
        );
        assert_eq!(
            dec_mode(&[0x66, 0xed], CodeMode::Real16).unwrap().operation,
            Operation::PortIo {
                direction: IoDirection::In,
                size: AccessSize::Dword,
                port: PortOperand::Dx
            }
        );
    }

    #[test]
    fn string_port_io() {
        assert_eq!(
            dec(&[0xf3, 0x6e]).unwrap(),
            Instruction {
                length: 2,
                operation: Operation::PortString {
                    direction: IoDirection::Out,
                    size: AccessSize::Byte,
                    rep: true
                }
            }
        );
        assert_eq!(
            dec(&[0x6d]).unwrap().operation,
            Operation::PortString {
                direction: IoDirection::In,
                size: AccessSize::Dword,
                rep: false
            }
        );
        assert_eq!(
            dec(&[0x66, 0xf3, 0x6f]).unwrap(),
            Instruction {
                length: 3,
                operation: Operation::PortString {
                    direction: IoDirection::Out,
                    size: AccessSize::Word,
                    rep: true
                }
            }
        );
        assert_eq!(
            dec(&[0x6c]).unwrap().operation,
            Operation::PortString {
                direction: IoDirection::In,
                size: AccessSize::Byte,
                rep: false
            }
        );
    }

    fn reg(index: u8) -> Register {
        Register {
            index,
            high_byte: false,
        }
    }

    #[test]
    fn mov_store_and_load_addressing_forms() {
        // mov [rdi], eax
        assert_eq!(
            dec(&[0x89, 0x07]).unwrap(),
            Instruction {
                length: 2,
                operation: Operation::MovStore {
                    size: AccessSize::Dword,
                    source: StoreSource::Register(reg(0))
                }
            }
        );
        // mov [rdi+0x10], r9 (REX.WR)
        assert_eq!(
            dec(&[0x4c, 0x89, 0x4f, 0x10]).unwrap(),
            Instruction {
                length: 4,
                operation: Operation::MovStore {
                    size: AccessSize::Qword,
                    source: StoreSource::Register(reg(9))
                }
            }
        );
        // mov eax, [rip+0x12345678]
        assert_eq!(len(&[0x8b, 0x05, 0x78, 0x56, 0x34, 0x12]), 6);
        // mov eax, [rsp] needs a SIB.
        assert_eq!(len(&[0x8b, 0x04, 0x24]), 3);
        // mov eax, [rax*4 + disp32] (SIB base 101, mod 00)
        assert_eq!(len(&[0x8b, 0x04, 0x85, 0, 0x10, 0, 0]), 7);
        // mov eax, [rbp+rax*4+disp8] (SIB base 101, mod 01: disp8 only)
        assert_eq!(len(&[0x8b, 0x44, 0x85, 0x08]), 4);
        // mov eax, [rbx+disp32]
        assert_eq!(len(&[0x8b, 0x83, 0, 0, 0, 1]), 6);
        // mov r10w, [r11+rcx*2+disp32] with 66, REX and SIB
        let i = dec(&[0x66, 0x45, 0x8b, 0x94, 0x4b, 0, 1, 0, 0]).unwrap();
        assert_eq!(
            i,
            Instruction {
                length: 9,
                operation: Operation::MovLoad {
                    size: AccessSize::Word,
                    destination: reg(10)
                }
            }
        );
        // mov al, [rsi] / mov [rdx], bh (no REX: high byte) / mov [rdx], dil (REX)
        assert_eq!(
            dec(&[0x8a, 0x06]).unwrap().operation,
            Operation::MovLoad {
                size: AccessSize::Byte,
                destination: reg(0)
            }
        );
        assert_eq!(
            dec(&[0x88, 0x3a]).unwrap().operation,
            Operation::MovStore {
                size: AccessSize::Byte,
                source: StoreSource::Register(Register {
                    index: 3,
                    high_byte: true
                })
            }
        );
        assert_eq!(
            dec(&[0x40, 0x88, 0x3a]).unwrap().operation,
            Operation::MovStore {
                size: AccessSize::Byte,
                source: StoreSource::Register(reg(7))
            }
        );
        // Segment override and address-size prefix before the opcode.
        assert_eq!(len(&[0x65, 0x67, 0x8b, 0x03]), 4);
    }

    #[test]
    fn mov_immediate_forms() {
        // mov byte [rdi], 0x7f
        assert_eq!(
            dec(&[0xc6, 0x07, 0x7f]).unwrap(),
            Instruction {
                length: 3,
                operation: Operation::MovStore {
                    size: AccessSize::Byte,
                    source: StoreSource::Immediate(0x7f)
                }
            }
        );
        // mov word [rdi+4], 0x1234
        assert_eq!(
            dec(&[0x66, 0xc7, 0x47, 0x04, 0x34, 0x12]).unwrap(),
            Instruction {
                length: 6,
                operation: Operation::MovStore {
                    size: AccessSize::Word,
                    source: StoreSource::Immediate(0x1234)
                }
            }
        );
        // mov qword [rdi], -1: imm32 sign-extended
        assert_eq!(
            dec(&[0x48, 0xc7, 0x07, 0xff, 0xff, 0xff, 0xff]).unwrap(),
            Instruction {
                length: 7,
                operation: Operation::MovStore {
                    size: AccessSize::Qword,
                    source: StoreSource::Immediate(u64::MAX)
                }
            }
        );
        // mov dword [rip+disp32], imm32: 2 + 4 + 4
        assert_eq!(len(&[0xc7, 0x05, 1, 2, 3, 4, 5, 6, 7, 8]), 10);
        // C7 with reg != 0 is not MOV (C7 F8 is XBEGIN).
        assert!(matches!(
            dec(&[0xc7, 0x0f, 0, 0, 0, 0]),
            Err(DecodeError::UnsupportedOpcode { .. })
        ));
    }

    #[test]
    fn movzx_loads() {
        assert_eq!(
            dec(&[0x0f, 0xb6, 0x07]).unwrap(),
            Instruction {
                length: 3,
                operation: Operation::MovZeroExtend {
                    size: AccessSize::Byte,
                    destination: reg(0),
                    destination_size: AccessSize::Dword
                }
            }
        );
        assert_eq!(
            dec(&[0x48, 0x0f, 0xb7, 0x47, 0x02]).unwrap().operation,
            Operation::MovZeroExtend {
                size: AccessSize::Word,
                destination: reg(0),
                destination_size: AccessSize::Qword
            }
        );
    }

    #[test]
    fn addressing_in_32_and_16_bit_code() {
        // 32-bit: mod 00 rm 101 is disp32 (absolute).
        assert_eq!(
            dec_mode(&[0x89, 0x05, 0, 0, 0, 0], CodeMode::Protected32)
                .unwrap()
                .length,
            6
        );
        // 32-bit with 67: 16-bit addressing, [bp+si+disp16].
        assert_eq!(
            dec_mode(&[0x67, 0x89, 0x82, 0, 0], CodeMode::Protected32)
                .unwrap()
                .length,
            5
        );
        // 16-bit: mod 00 rm 110 is disp16; 40-4F are not REX.
        assert_eq!(
            dec_mode(&[0x89, 0x06, 0x34, 0x12], CodeMode::Real16)
                .unwrap()
                .length,
            4
        );
        assert!(matches!(
            dec_mode(&[0x48, 0xf4], CodeMode::Protected32),
            Err(DecodeError::UnsupportedOpcode {
                opcode: [0x48, 0, 0],
                ..
            })
        ));
        // 32-bit default operand size is 32, 66 gives 16; no REX.W.
        assert_eq!(
            dec_mode(&[0x66, 0x89, 0x07], CodeMode::Protected32)
                .unwrap()
                .operation,
            Operation::MovStore {
                size: AccessSize::Word,
                source: StoreSource::Register(reg(0))
            }
        );
    }

    #[test]
    fn rex_only_counts_directly_before_the_opcode() {
        // REX then 66: REX ignored, so 89 /r is a 16-bit store of AX.
        assert_eq!(
            dec(&[0x48, 0x66, 0x89, 0x07]).unwrap(),
            Instruction {
                length: 4,
                operation: Operation::MovStore {
                    size: AccessSize::Word,
                    source: StoreSource::Register(reg(0))
                }
            }
        );
    }

    #[test]
    fn refusals() {
        // Unknown opcode: a clear error, never a length.
        assert_eq!(
            dec(&[0x90]),
            Err(DecodeError::UnsupportedOpcode {
                opcode: [0x90, 0, 0],
                len: 1
            })
        );
        assert!(matches!(
            dec(&[0x0f, 0x01, 0xd8]),
            Err(DecodeError::UnsupportedOpcode { len: 3, .. })
        ));
        assert!(matches!(
            dec(&[0x0f, 0x0b]),
            Err(DecodeError::UnsupportedOpcode { len: 2, .. })
        ));
        // Register-form MOV cannot cause a memory exit.
        assert_eq!(dec(&[0x89, 0xc0]), Err(DecodeError::NoMemoryOperand));
        // 15 prefixes: too long.
        assert_eq!(dec(&[0x66; 16]), Err(DecodeError::TooLong));
        // 14 prefixes plus HLT is exactly 15 bytes: fine.
        let mut max = [0x3e; 15];
        max[14] = 0xf4;
        assert_eq!(len(&max), 15);
        // LOCK on HLT.
        assert_eq!(dec(&[0xf0, 0xf4]), Err(DecodeError::BadLockPrefix));
        // Runs off the end of RAM in the middle of the displacement.
        assert!(matches!(
            dec(&[0x8b, 0x83, 0, 0]),
            Err(DecodeError::Fetch { offset: 4, .. })
        ));
        // Address overflow.
        assert_eq!(
            decode(&Code(alloc::vec![]), u64::MAX, CodeMode::Long64).map(|_| ()),
            Err(DecodeError::Fetch {
                offset: 0,
                error: FetchError::Memory(GuestMemoryError::NotRam { gpa: u64::MAX })
            })
        );
    }

    #[test]
    fn fetch_through_guest_memory_stops_at_non_ram() {
        let vm = VmId(1);
        // RAM ends at 0x10000; MMIO follows.
        let p = Platform::builder()
            .vm(vm, VmSetup::new().ram(0, 0x10000).mmio(0x10000, 0x1000))
            .build();
        let mem = p.memory(vm);
        // A VMMCALL split across the last RAM page and the next.
        mem.write(0xfffe, &[0x0f, 0x01]).unwrap();
        let fetch = IdentityFetch(mem);
        assert_eq!(
            decode(&fetch, 0xfffe, CodeMode::Long64),
            Err(DecodeError::Fetch {
                offset: 2,
                error: FetchError::Memory(GuestMemoryError::NotRam { gpa: 0x10000 })
            })
        );
        // The same instruction wholly in RAM, crossing a page boundary.
        mem.write(0xffe, &[0x0f, 0x01, 0xd9]).unwrap();
        assert_eq!(
            decode(&fetch, 0xffe, CodeMode::Long64).unwrap().operation,
            Operation::Vmmcall
        );
    }

    #[test]
    fn fetch_through_guest_page_tables() {
        let vm = VmId(1);
        let p = Platform::builder()
            .vm(
                vm,
                VmSetup::new().ram(0, 0x40_0000).mmio(0xe000_0000, 0x1000),
            )
            .build();
        let mem = p.memory(vm);
        let entry = |addr: u64, flags: u64| (addr | flags | 1).to_le_bytes();
        // PML4 at 0x1000 → PDPT 0x2000 → PD 0x3000: linear 0x4000_0000
        // is a 2 MiB page at 0x20_0000; linear 0x4020_0000 goes through a
        // page table at 0x4000 to the 4 KiB page 0x5000.
        mem.write(0x1000, &entry(0x2000, 2)).unwrap();
        mem.write(0x2000 + 8, &entry(0x3000, 2)).unwrap();
        mem.write(0x3000, &entry(0x20_0000, 0x80)).unwrap();
        mem.write(0x3000 + 8, &entry(0x4000, 0)).unwrap();
        mem.write(0x4000, &entry(0x5000, 0)).unwrap();
        // PD entry 2 points its table into MMIO: hostile.
        mem.write(0x3000 + 16, &entry(0xe000_0000, 0)).unwrap();
        mem.write(0x20_0010, &[0x0f, 0x01, 0xd9]).unwrap();
        mem.write(0x5ffe, &[0x0f, 0xa2]).unwrap();
        let f = PagedFetch {
            mem,
            cr3: 0x1000 | 0x18,
            levels: 4,
        };
        assert_eq!(f.translate(0x4000_0010), Ok(0x20_0010));
        assert_eq!(
            decode(&f, 0x4000_0010, CodeMode::Long64).unwrap().operation,
            Operation::Vmmcall
        );
        assert_eq!(
            decode(&f, 0x4020_0ffe, CodeMode::Long64).unwrap().operation,
            Operation::Cpuid
        );
        assert_eq!(
            f.translate(0x4060_0000),
            Err(FetchError::NotMapped {
                linear: 0x4060_0000
            })
        );
        assert_eq!(
            f.translate(0x4040_0000),
            Err(FetchError::Memory(GuestMemoryError::NotRam {
                gpa: 0xe000_0000
            }))
        );
        assert_eq!(f.translate(0), Err(FetchError::NotMapped { linear: 0 }));
        // An instruction running into an unmapped page fails at that byte.
        mem.write(0x5fff, &[0x0f]).unwrap();
        assert!(matches!(
            decode(&f, 0x4020_0fff, CodeMode::Long64),
            Err(DecodeError::Fetch { offset: 1, .. })
        ));
    }

    #[test]
    fn prefetched_bytes_are_used_first() {
        let fallback = Code(alloc::vec![0x0f, 0x01, 0xd9]);
        // The hardware fetched only the first byte of a store with disp32.
        let pre = PrefetchedFetch {
            rip: 0x1000,
            bytes: &[0x89],
            rest: &Code(alloc::vec![0x00, 0x87, 1, 2, 3, 4]),
        };
        assert_eq!(decode(&pre, 0x1000, CodeMode::Long64).unwrap().length, 6);
        let pre = PrefetchedFetch {
            rip: 0x1000,
            bytes: &[0xf4],
            rest: &fallback,
        };
        assert_eq!(
            decode(&pre, 0x1000, CodeMode::Long64).unwrap().operation,
            Operation::Hlt
        );
    }

    #[test]
    fn register_write_semantics() {
        let mut r = GuestRegisters::new();
        r.gprs[0] = 0x1122_3344_5566_7788;
        write_register(&mut r, reg(0), AccessSize::Byte, 0xaa);
        assert_eq!(r.gprs[0], 0x1122_3344_5566_77aa);
        write_register(
            &mut r,
            Register {
                index: 0,
                high_byte: true,
            },
            AccessSize::Byte,
            0xbb,
        );
        assert_eq!(r.gprs[0], 0x1122_3344_5566_bbaa);
        write_register(&mut r, reg(0), AccessSize::Word, 0xcccc);
        assert_eq!(r.gprs[0], 0x1122_3344_5566_cccc);
        write_register(&mut r, reg(0), AccessSize::Dword, 0xdead_beef);
        assert_eq!(r.gprs[0], 0xdead_beef);
        write_register(&mut r, reg(15), AccessSize::Qword, u64::MAX);
        assert_eq!(r.gprs[15], u64::MAX);
        r.gprs[3] = 0xabcd;
        assert_eq!(
            read_register(
                &r,
                Register {
                    index: 3,
                    high_byte: true
                },
                AccessSize::Byte
            ),
            0xab
        );
        assert_eq!(read_register(&r, reg(3), AccessSize::Byte), 0xcd);
    }
}
