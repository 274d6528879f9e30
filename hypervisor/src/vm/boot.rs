//! The direct-boot protocol for 64-bit `no_std` ELF guests (the full
//! description, for guest authors, is `docs/boot-protocol.md`).
//!
//! Sluice loads the guest's ELF64 executable into guest RAM, writes a
//! start-info block describing the VM, builds identity page tables and a
//! GDT, and starts the first vCPU in 64-bit long mode at the ELF entry
//! point with `RDI` = the start-info address. Everything a guest gives
//! (the image) is checked before anything is written: overlapping or
//! out-of-RAM segments, bad headers and an entry point outside the
//! loaded code are errors, never a partially booted VM.
//!
//! aarch64 guests ([`boot_aarch64`]) start at EL1 with the MMU off instead:
//! no tables or descriptor tables are built, `X0` is the start-info
//! address and `SP_EL1` the top of the initial stack, in the first MiB of
//! their RAM at [`aarch64_layout::RAM_BASE`].
//!
//! Guest-physical layout of the x86 boot area (first MiB of RAM):
//!
//! | GPA | contents |
//! | --- | --- |
//! | `0x1000` | GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18) |
//! | `0x1080` | 64-bit TSS (104 bytes, no I/O bitmap) |
//! | `0x2000`–`0x3fff` | start-info block ([`StartInfo`]) |
//! | `0x4000`–`0x7ffff` | identity page tables |
//! | `0x80000`–`0xfffff` | initial stack (`RSP` = `0x100000 - 8`) |
//! | `0x100000`– | the image's `PT_LOAD` segments |

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;

use sluice_hal::{DmaAllocError, DmaMemory, PAGE_SIZE, PhysAddr};
use sluice_iommu::pagetable::x86::{FirstLevelAttrs, VtdFirstLevel, X86Caching};
use sluice_iommu::pagetable::{IoPageTable, MapPerms, PageSize, PageTableError, TableConfig};

use super::memory::layout;
use crate::iommufd::{GuestMemory, GuestMemoryError};
use crate::vcpu::el2::sysregs::{CPACR_EL1_FPEN, SCTLR_EL1_MMU_OFF};
use crate::vcpu::{
    Aarch64EntryState, Aarch64Registers, DescriptorTable, EntryState, GuestRegisters,
    PAT_RESET_VALUE, RFLAGS_RESERVED_ONE, Segment, cr, gpr, pstate,
};

pub const GDT_GPA: u64 = 0x1000;
pub const TSS_GPA: u64 = 0x1080;
pub const TSS_LIMIT: u32 = 0x67;
pub const START_INFO_GPA: u64 = 0x2000;
pub const START_INFO_MAX: u64 = 0x2000;
pub const PAGE_TABLES_GPA: u64 = 0x4000;
pub const PAGE_TABLES_END: u64 = 0x8_0000;
pub const STACK_TOP: u64 = 0x10_0000;
/// The lowest address a `PT_LOAD` segment may use.
pub const IMAGE_BASE_MIN: u64 = 0x10_0000;

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// `StartInfo::magic`: the bytes "SLUICEBI" (Sluice boot info).
pub const START_INFO_MAGIC: u64 = u64::from_le_bytes(*b"SLUICEBI");
/// Layout version of the start-info block.
pub const START_INFO_VERSION: u32 = 1;
/// Version of the hypercall ABI ([`sluice_abi`]) this hypervisor speaks.
pub const HYPERCALL_ABI_VERSION: u32 = 1;
/// The debug console: bytes written to this x86 I/O port are printed on
/// Sluice's console, prefixed with the VM name.
pub const CONSOLE_PORT: u16 = 0xe9;

/// The guest-physical address map of an aarch64 VM (close to QEMU's
/// `virt` board: devices below 1 GiB, RAM from 1 GiB; see
/// `docs/boot-protocol.md`, "aarch64"). Every address fits the 39-bit
/// guest-physical space of the stage-2 tables.
///
/// ```text
/// 0x0900_0000                  console byte register (trapped)
/// 0x1000_0000 - 0x2FFF_FFFF    passed-through BARs (placed by Sluice)
/// 0x3F00_0000 - 0x3F0F_FFFF    ECAM of guest bus 0 (trapped)
/// 0x4000_0000 -                RAM
/// ```
pub mod aarch64_layout {
    /// The console: a store of any size here prints its low byte; loads
    /// read 0. The page holding it is never mapped.
    pub const CONSOLE_GPA: u64 = 0x0900_0000;
    pub const BAR_WINDOW_BASE: u64 = 0x1000_0000;
    pub const BAR_WINDOW_SIZE: u64 = 0x2000_0000;
    /// The trapped ECAM window: bus 0 only.
    pub const ECAM_BASE: u64 = 0x3f00_0000;
    pub const ECAM_SIZE: u64 = 1 << 20;
    /// Guest RAM starts here and is contiguous.
    pub const RAM_BASE: u64 = 0x4000_0000;
    /// The highest guest-physical address plus one (39-bit IPA space).
    pub const GPA_LIMIT: u64 = 1 << 39;
    /// The boot area: the first MiB of RAM.
    pub const BOOT_AREA_SIZE: u64 = 0x10_0000;
    /// The start-info block (at most [`super::START_INFO_MAX`] bytes).
    pub const START_INFO_GPA: u64 = RAM_BASE + 0x2000;
    /// `SP_EL1` at entry: the initial stack is the boot area's upper half.
    pub const STACK_TOP: u64 = RAM_BASE + BOOT_AREA_SIZE;
    /// The lowest address a `PT_LOAD` segment may use.
    pub const IMAGE_BASE_MIN: u64 = RAM_BASE + BOOT_AREA_SIZE;

    /// RAM regions `(gpa, length)` for `memory` bytes: one, from
    /// [`RAM_BASE`].
    pub fn ram_regions(memory: u64) -> alloc::vec::Vec<(u64, u64)> {
        if memory == 0 {
            alloc::vec::Vec::new()
        } else {
            alloc::vec![(RAM_BASE, memory)]
        }
    }
}

/// ELF header and program header constants (System V ABI, "ELF Header"
/// and "Program Header" of the gABI; ELF-64 Object File Format).
mod elf {
    pub const MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
    pub const CLASS64: u8 = 2;
    pub const DATA_LSB: u8 = 1;
    pub const VERSION_CURRENT: u8 = 1;
    pub const ET_EXEC: u16 = 2;
    pub const EM_X86_64: u16 = 62;
    pub const EM_AARCH64: u16 = 183;
    pub const HEADER_SIZE: usize = 64;
    pub const PHDR_SIZE: u16 = 56;
    pub const PT_LOAD: u32 = 1;
    pub const PT_DYNAMIC: u32 = 2;
    pub const PT_INTERP: u32 = 3;
    pub const PF_X: u32 = 1;
    pub const PF_W: u32 = 2;
    /// e_phnum value meaning "too many, see section 0" (PN_XNUM).
    pub const PN_XNUM: u16 = 0xffff;
}

/// Most program headers accepted.
pub const MAX_PROGRAM_HEADERS: u16 = 64;

/// The architecture an image must be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    X86_64,
    Aarch64,
}

impl Machine {
    const fn elf_machine(self) -> u16 {
        match self {
            Machine::X86_64 => elf::EM_X86_64,
            Machine::Aarch64 => elf::EM_AARCH64,
        }
    }

    /// The boot area `[start, end)` no image segment may touch.
    pub const fn boot_area(self) -> (u64, u64) {
        match self {
            Machine::X86_64 => (0, IMAGE_BASE_MIN),
            Machine::Aarch64 => (aarch64_layout::RAM_BASE, aarch64_layout::IMAGE_BASE_MIN),
        }
    }

    /// The guest's ECAM window and BAR window, `(base, size)` each.
    pub const fn pci_windows(self) -> ((u64, u64), (u64, u64)) {
        match self {
            Machine::X86_64 => (
                (layout::ECAM_BASE, layout::ECAM_SIZE),
                (layout::BAR_WINDOW_BASE, layout::BAR_WINDOW_SIZE),
            ),
            Machine::Aarch64 => (
                (aarch64_layout::ECAM_BASE, aarch64_layout::ECAM_SIZE),
                (
                    aarch64_layout::BAR_WINDOW_BASE,
                    aarch64_layout::BAR_WINDOW_SIZE,
                ),
            ),
        }
    }
}

/// Why an image was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfError {
    TooShort,
    BadMagic,
    NotElf64,
    NotLittleEndian,
    BadVersion,
    /// Only static executables (`ET_EXEC`) are loaded; `ET_DYN` (PIE,
    /// shared objects) and others are refused.
    NotExecutable {
        e_type: u16,
    },
    WrongMachine {
        found: u16,
        expected: u16,
    },
    BadProgramHeaderSize(u16),
    TooManyProgramHeaders(u16),
    ProgramHeadersOutOfFile,
    /// `PT_INTERP` / `PT_DYNAMIC`: the image needs a dynamic loader.
    Dynamic,
    NoLoadableSegment,
    FileSizeAboveMemorySize {
        segment: usize,
    },
    SegmentOutOfFile {
        segment: usize,
    },
    SegmentOverflow {
        segment: usize,
    },
    /// Sluice guests start identity-mapped: `p_vaddr` must equal `p_paddr`.
    VirtualNotPhysical {
        segment: usize,
        vaddr: u64,
        paddr: u64,
    },
    /// The segment reaches into the boot area ([`Machine::boot_area`]: below
    /// [`IMAGE_BASE_MIN`] on x86_64, the first MiB of RAM on aarch64).
    InBootArea {
        segment: usize,
        gpa: u64,
    },
    /// The segment is not wholly in guest RAM.
    OutsideRam {
        segment: usize,
        gpa: u64,
        end: u64,
    },
    Overlap {
        first: usize,
        second: usize,
    },
    /// The entry point is not inside an executable loaded segment.
    EntryOutsideCode {
        entry: u64,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => f.write_str("image shorter than an ELF header"),
            Self::BadMagic => f.write_str("not an ELF file (bad magic)"),
            Self::NotElf64 => f.write_str("not a 64-bit ELF file"),
            Self::NotLittleEndian => f.write_str("not a little-endian ELF file"),
            Self::BadVersion => f.write_str("unknown ELF version"),
            Self::NotExecutable { e_type } => write!(
                f,
                "ELF type {e_type} is not a static executable (ET_EXEC); link with -static -no-pie"
            ),
            Self::WrongMachine { found, expected } => {
                write!(f, "ELF machine {found} is not the expected {expected}")
            }
            Self::BadProgramHeaderSize(s) => write!(f, "program header size {s}, expected 56"),
            Self::TooManyProgramHeaders(n) => {
                write!(f, "{n} program headers, at most {MAX_PROGRAM_HEADERS}")
            }
            Self::ProgramHeadersOutOfFile => f.write_str("program headers lie outside the file"),
            Self::Dynamic => f.write_str("the image needs a dynamic loader"),
            Self::NoLoadableSegment => f.write_str("no PT_LOAD segment"),
            Self::FileSizeAboveMemorySize { segment } => {
                write!(f, "segment {segment}: file size above memory size")
            }
            Self::SegmentOutOfFile { segment } => {
                write!(f, "segment {segment}: contents lie outside the file")
            }
            Self::SegmentOverflow { segment } => {
                write!(f, "segment {segment}: address + size overflows")
            }
            Self::VirtualNotPhysical {
                segment,
                vaddr,
                paddr,
            } => write!(
                f,
                "segment {segment}: virtual address {vaddr:#x} differs from physical {paddr:#x}; guests start identity-mapped"
            ),
            Self::InBootArea { segment, gpa } => write!(
                f,
                "segment {segment} at {gpa:#x} reaches into the boot area (images start at {IMAGE_BASE_MIN:#x} on x86_64, {:#x} on aarch64)",
                aarch64_layout::IMAGE_BASE_MIN
            ),
            Self::OutsideRam { segment, gpa, end } => write!(
                f,
                "segment {segment} [{gpa:#x}, {end:#x}) is not inside guest RAM"
            ),
            Self::Overlap { first, second } => {
                write!(f, "segments {first} and {second} overlap")
            }
            Self::EntryOutsideCode { entry } => write!(
                f,
                "entry point {entry:#x} is not inside an executable loaded segment"
            ),
        }
    }
}

/// Why a VM could not be booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootError {
    Elf(ElfError),
    /// Guest RAM refused an access (the boot area is not RAM: the VM has
    /// too little memory).
    Memory(GuestMemoryError),
    /// The identity tables could not be built.
    PageTables(PageTableError),
    /// The start-info block does not fit in its area.
    StartInfoTooLarge {
        bytes: usize,
    },
    /// The guest arguments break the `args=` rules
    /// ([`super::config::valid_args`]).
    BadArgs,
    /// Guest RAM reaches `end`, beyond the guest-physical address space
    /// (aarch64: [`aarch64_layout::GPA_LIMIT`]).
    RamBeyondAddressSpace {
        end: u64,
    },
}

impl From<ElfError> for BootError {
    fn from(e: ElfError) -> Self {
        BootError::Elf(e)
    }
}

impl From<GuestMemoryError> for BootError {
    fn from(e: GuestMemoryError) -> Self {
        BootError::Memory(e)
    }
}

impl From<PageTableError> for BootError {
    fn from(e: PageTableError) -> Self {
        BootError::PageTables(e)
    }
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Elf(e) => write!(f, "guest image refused: {e}"),
            Self::Memory(e) => write!(f, "guest RAM: {e:?}"),
            Self::PageTables(e) => write!(f, "guest page tables: {e}"),
            Self::StartInfoTooLarge { bytes } => {
                write!(
                    f,
                    "start info of {bytes} bytes exceeds {START_INFO_MAX} bytes"
                )
            }
            Self::BadArgs => {
                f.write_str("guest arguments must be 1-64 letters, digits, `_`, `.`, `,` or `-`")
            }
            Self::RamBeyondAddressSpace { end } => write!(
                f,
                "guest RAM ends at {end:#x}, beyond the {} GiB guest-physical address space",
                aarch64_layout::GPA_LIMIT >> 30
            ),
        }
    }
}

/// A `PT_LOAD` segment as loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedSegment {
    pub gpa: u64,
    pub file_size: u64,
    pub memory_size: u64,
    pub executable: bool,
    pub writable: bool,
}

/// What [`load_elf`] put into guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    pub entry: u64,
    pub segments: Vec<LoadedSegment>,
    /// Lowest segment address.
    pub start: u64,
    /// First byte after the highest segment.
    pub end: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(raw)
}

struct Segment64 {
    index: usize,
    flags: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Checks `image` completely, then copies its `PT_LOAD` segments into
/// guest RAM (zero-filling each segment beyond its file size). `ram` are
/// the VM's RAM regions `(gpa, length)`. Nothing is written unless the
/// whole image is acceptable.
pub fn load_elf(
    mem: &dyn GuestMemory,
    ram: &[(u64, u64)],
    image: &[u8],
    machine: Machine,
) -> Result<LoadedImage, ElfError> {
    if image.len() < elf::HEADER_SIZE {
        return Err(ElfError::TooShort);
    }
    if image[..4] != elf::MAGIC {
        return Err(ElfError::BadMagic);
    }
    if image[4] != elf::CLASS64 {
        return Err(ElfError::NotElf64);
    }
    if image[5] != elf::DATA_LSB {
        return Err(ElfError::NotLittleEndian);
    }
    if image[6] != elf::VERSION_CURRENT || u32_at(image, 20) != 1 {
        return Err(ElfError::BadVersion);
    }
    let e_type = u16_at(image, 16);
    if e_type != elf::ET_EXEC {
        return Err(ElfError::NotExecutable { e_type });
    }
    let machine_found = u16_at(image, 18);
    if machine_found != machine.elf_machine() {
        return Err(ElfError::WrongMachine {
            found: machine_found,
            expected: machine.elf_machine(),
        });
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54);
    let phnum = u16_at(image, 56);
    if phentsize != elf::PHDR_SIZE {
        return Err(ElfError::BadProgramHeaderSize(phentsize));
    }
    if phnum == elf::PN_XNUM || phnum > MAX_PROGRAM_HEADERS {
        return Err(ElfError::TooManyProgramHeaders(phnum));
    }
    let table_end = u64::from(phnum)
        .checked_mul(u64::from(elf::PHDR_SIZE))
        .and_then(|len| phoff.checked_add(len))
        .ok_or(ElfError::ProgramHeadersOutOfFile)?;
    if table_end > image.len() as u64 {
        return Err(ElfError::ProgramHeadersOutOfFile);
    }

    let mut loads: Vec<Segment64> = Vec::new();
    for index in 0..usize::from(phnum) {
        let at = phoff as usize + index * usize::from(elf::PHDR_SIZE);
        let ph = &image[at..at + usize::from(elf::PHDR_SIZE)];
        let p_type = u32_at(ph, 0);
        if p_type == elf::PT_INTERP || p_type == elf::PT_DYNAMIC {
            return Err(ElfError::Dynamic);
        }
        if p_type != elf::PT_LOAD {
            continue;
        }
        let seg = Segment64 {
            index,
            flags: u32_at(ph, 4),
            offset: u64_at(ph, 8),
            paddr: u64_at(ph, 24),
            filesz: u64_at(ph, 32),
            memsz: u64_at(ph, 40),
        };
        let vaddr = u64_at(ph, 16);
        if seg.memsz == 0 {
            continue;
        }
        if seg.filesz > seg.memsz {
            return Err(ElfError::FileSizeAboveMemorySize { segment: index });
        }
        let file_end = seg
            .offset
            .checked_add(seg.filesz)
            .ok_or(ElfError::SegmentOutOfFile { segment: index })?;
        if file_end > image.len() as u64 {
            return Err(ElfError::SegmentOutOfFile { segment: index });
        }
        let end = seg
            .paddr
            .checked_add(seg.memsz)
            .ok_or(ElfError::SegmentOverflow { segment: index })?;
        if vaddr != seg.paddr {
            return Err(ElfError::VirtualNotPhysical {
                segment: index,
                vaddr,
                paddr: seg.paddr,
            });
        }
        let (boot_start, boot_end) = machine.boot_area();
        if seg.paddr < boot_end && end > boot_start {
            return Err(ElfError::InBootArea {
                segment: index,
                gpa: seg.paddr,
            });
        }
        if !ram
            .iter()
            .any(|&(base, len)| seg.paddr >= base && end <= base + len)
        {
            return Err(ElfError::OutsideRam {
                segment: index,
                gpa: seg.paddr,
                end,
            });
        }
        if let Some(other) = loads
            .iter()
            .find(|o| seg.paddr < o.paddr + o.memsz && o.paddr < end)
        {
            return Err(ElfError::Overlap {
                first: other.index,
                second: index,
            });
        }
        loads.push(seg);
    }
    if loads.is_empty() {
        return Err(ElfError::NoLoadableSegment);
    }
    if !loads
        .iter()
        .any(|s| s.flags & elf::PF_X != 0 && entry >= s.paddr && entry - s.paddr < s.memsz)
    {
        return Err(ElfError::EntryOutsideCode { entry });
    }

    // Everything checked: copy. Writes cannot fail now (every byte is in
    // RAM), but an error is still reported rather than ignored.
    let zeros = [0u8; 4096];
    for s in &loads {
        let data = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write(s.paddr, data).map_err(|_| ElfError::OutsideRam {
            segment: s.index,
            gpa: s.paddr,
            end: s.paddr + s.memsz,
        })?;
        let mut at = s.paddr + s.filesz;
        let end = s.paddr + s.memsz;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            mem.write(at, &zeros[..n])
                .map_err(|_| ElfError::OutsideRam {
                    segment: s.index,
                    gpa: s.paddr,
                    end,
                })?;
            at += n as u64;
        }
    }
    Ok(LoadedImage {
        entry,
        start: loads.iter().map(|s| s.paddr).min().unwrap_or(0),
        end: loads.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0),
        segments: loads
            .iter()
            .map(|s| LoadedSegment {
                gpa: s.paddr,
                file_size: s.filesz,
                memory_size: s.memsz,
                executable: s.flags & elf::PF_X != 0,
                writable: s.flags & elf::PF_W != 0,
            })
            .collect(),
    })
}

/// `MemoryRegion::kind` values.
pub mod region_kind {
    /// Free RAM the guest may use.
    pub const RAM: u32 = 1;
    /// The boot area: GDT, TSS, start info, page tables, initial stack.
    /// Reusable once the guest no longer needs them.
    pub const BOOT: u32 = 2;
    /// The loaded image.
    pub const IMAGE: u32 = 3;
    /// The ECAM window of the guest's PCI bus.
    pub const ECAM: u32 = 4;
    /// Where the guest's passed-through BARs are.
    pub const PCI_MMIO: u32 = 5;
}

/// One entry of the start-info memory map (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub base: u64,
    pub length: u64,
    pub kind: u32,
}

/// One passed-through device in the start info (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartInfoDevice {
    /// [`sluice_abi::bdf`] packing, as in `DEVICE_LIST`.
    pub guest_bdf: u32,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class, sub-class, programming interface (`0xBBSSPP`).
    pub class_code: u32,
    pub iommu_group: u32,
}

/// The start-info device list of a VM's assigned functions, with their
/// identity from enumeration (`topologies`: one per segment). Functions
/// missing from the topologies are left out.
pub fn start_info_devices(
    devices: &[super::config::AssignedPci],
    topologies: &[sluice_pci::Topology],
) -> Vec<StartInfoDevice> {
    devices
        .iter()
        .filter_map(|d| {
            let f = topologies.iter().find_map(|t| t.get(d.host))?;
            Some(StartInfoDevice {
                guest_bdf: d.guest_abi_bdf(),
                vendor_id: f.vendor_id,
                device_id: f.device_id,
                class_code: f.class_code,
                iommu_group: d.group,
            })
        })
        .collect()
}

/// `StartInfo::console_kind` values.
pub mod console_kind {
    pub const NONE: u32 = 0;
    /// `console_address` is an x86 I/O port; each byte `OUT` is a character.
    pub const X86_PORT: u32 = 1;
    /// `console_address` is a guest-physical MMIO byte register.
    pub const MMIO: u32 = 2;
}

/// The start-info block: a 96-byte header followed by the memory map and
/// the device list. All fields little-endian.
///
/// | offset | field |
/// | --- | --- |
/// | 0x00 | u64 magic ([`START_INFO_MAGIC`]) |
/// | 0x08 | u32 version ([`START_INFO_VERSION`]) |
/// | 0x0c | u32 total size in bytes |
/// | 0x10 | u32 hypercall ABI version |
/// | 0x14 | u32 flags (0) |
/// | 0x18 | u64 image start |
/// | 0x20 | u64 image end |
/// | 0x28 | u64 ECAM base |
/// | 0x30 | u32 ECAM bus count |
/// | 0x34 | u32 console kind |
/// | 0x38 | u64 console address |
/// | 0x40 | u32 memory-map entries |
/// | 0x44 | u32 device entries |
/// | 0x48 | u64 memory-map offset (from the block start) |
/// | 0x50 | u64 device-list offset |
/// | 0x58 | u32 guest-arguments offset (0 without arguments) |
/// | 0x5c | u32 guest-arguments length in bytes |
///
/// The guest arguments (the VM's `args=` word) follow the device list,
/// followed by one NUL byte that the length does not count. Version 1
/// first had a reserved zero u64 at 0x58, which reads as "no arguments".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartInfo {
    pub image_start: u64,
    pub image_end: u64,
    pub ecam_base: u64,
    pub ecam_buses: u32,
    pub console_kind: u32,
    pub console_address: u64,
    pub memory_map: Vec<MemoryRegion>,
    pub devices: Vec<StartInfoDevice>,
    /// The VM's `args=` word ([`super::config::valid_args`]), or empty.
    pub args: String,
}

pub const START_INFO_HEADER_SIZE: usize = 0x60;
pub const MEMORY_REGION_SIZE: usize = 24;
pub const DEVICE_ENTRY_SIZE: usize = 16;

impl StartInfo {
    /// The block's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let map_offset = START_INFO_HEADER_SIZE;
        let dev_offset = map_offset + self.memory_map.len() * MEMORY_REGION_SIZE;
        let args_offset = dev_offset + self.devices.len() * DEVICE_ENTRY_SIZE;
        let total = if self.args.is_empty() {
            args_offset
        } else {
            args_offset + self.args.len() + 1
        };
        let mut b = vec![0u8; total];
        let put = |b: &mut Vec<u8>, o: usize, v: &[u8]| b[o..o + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &START_INFO_MAGIC.to_le_bytes());
        put(&mut b, 0x08, &START_INFO_VERSION.to_le_bytes());
        put(&mut b, 0x0c, &(total as u32).to_le_bytes());
        put(&mut b, 0x10, &HYPERCALL_ABI_VERSION.to_le_bytes());
        put(&mut b, 0x18, &self.image_start.to_le_bytes());
        put(&mut b, 0x20, &self.image_end.to_le_bytes());
        put(&mut b, 0x28, &self.ecam_base.to_le_bytes());
        put(&mut b, 0x30, &self.ecam_buses.to_le_bytes());
        put(&mut b, 0x34, &self.console_kind.to_le_bytes());
        put(&mut b, 0x38, &self.console_address.to_le_bytes());
        put(&mut b, 0x40, &(self.memory_map.len() as u32).to_le_bytes());
        put(&mut b, 0x44, &(self.devices.len() as u32).to_le_bytes());
        put(&mut b, 0x48, &(map_offset as u64).to_le_bytes());
        put(&mut b, 0x50, &(dev_offset as u64).to_le_bytes());
        if !self.args.is_empty() {
            put(&mut b, 0x58, &(args_offset as u32).to_le_bytes());
            put(&mut b, 0x5c, &(self.args.len() as u32).to_le_bytes());
            // The NUL after the bytes is already there (zero-filled).
            put(&mut b, args_offset, self.args.as_bytes());
        }
        for (i, r) in self.memory_map.iter().enumerate() {
            let o = map_offset + i * MEMORY_REGION_SIZE;
            put(&mut b, o, &r.base.to_le_bytes());
            put(&mut b, o + 8, &r.length.to_le_bytes());
            put(&mut b, o + 16, &r.kind.to_le_bytes());
        }
        for (i, d) in self.devices.iter().enumerate() {
            let o = dev_offset + i * DEVICE_ENTRY_SIZE;
            put(&mut b, o, &d.guest_bdf.to_le_bytes());
            put(&mut b, o + 4, &d.vendor_id.to_le_bytes());
            put(&mut b, o + 6, &d.device_id.to_le_bytes());
            put(&mut b, o + 8, &d.class_code.to_le_bytes());
            put(&mut b, o + 12, &d.iommu_group.to_le_bytes());
        }
        b
    }
}

/// `ram` minus the ranges in `taken` (both sorted or not), as free RAM
/// regions, sorted.
fn subtract(ram: &[(u64, u64)], taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut free: Vec<(u64, u64)> = ram.iter().map(|&(b, l)| (b, b + l)).collect();
    for &(tb, tl) in taken {
        let te = tb + tl;
        let mut next = Vec::new();
        for (s, e) in free {
            if te <= s || e <= tb {
                next.push((s, e));
                continue;
            }
            if s < tb {
                next.push((s, tb));
            }
            if te < e {
                next.push((te, e));
            }
        }
        free = next;
    }
    free.sort_unstable();
    free.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// The memory map of an x86 VM with `ram` regions and `image` loaded.
pub fn memory_map(ram: &[(u64, u64)], image: &LoadedImage) -> Vec<MemoryRegion> {
    machine_memory_map(Machine::X86_64, ram, image)
}

/// The memory map of a `machine` VM with `ram` regions and `image` loaded:
/// free RAM, the boot area, the image, the ECAM and BAR windows.
pub fn machine_memory_map(
    machine: Machine,
    ram: &[(u64, u64)],
    image: &LoadedImage,
) -> Vec<MemoryRegion> {
    let (boot_start, boot_end) = machine.boot_area();
    let boot = (boot_start, boot_end - boot_start);
    let ((ecam_base, ecam_size), (bar_base, bar_size)) = machine.pci_windows();
    let page = |x: u64| x & !(PAGE_SIZE - 1);
    let image_ranges: Vec<(u64, u64)> = image
        .segments
        .iter()
        .map(|s| {
            let start = page(s.gpa);
            let end = (s.gpa + s.memory_size).next_multiple_of(PAGE_SIZE);
            (start, end - start)
        })
        .collect();
    let mut taken = vec![boot];
    taken.extend(&image_ranges);
    let mut map: Vec<MemoryRegion> = subtract(ram, &taken)
        .into_iter()
        .map(|(base, length)| MemoryRegion {
            base,
            length,
            kind: region_kind::RAM,
        })
        .collect();
    // The boot area as far as it is RAM.
    for (base, length) in ram.iter().filter_map(|&(b, l)| {
        let s = b.max(boot_start);
        let e = (b + l).min(boot_end);
        if s < e { Some((s, e - s)) } else { None }
    }) {
        map.push(MemoryRegion {
            base,
            length,
            kind: region_kind::BOOT,
        });
    }
    for (base, length) in image_ranges {
        map.push(MemoryRegion {
            base,
            length,
            kind: region_kind::IMAGE,
        });
    }
    map.push(MemoryRegion {
        base: ecam_base,
        length: ecam_size,
        kind: region_kind::ECAM,
    });
    map.push(MemoryRegion {
        base: bar_base,
        length: bar_size,
        kind: region_kind::PCI_MMIO,
    });
    map.sort_by_key(|r| r.base);
    map
}

/// Table pages for the guest's identity map, allocated from the page-table
/// area of the boot area; "physical" addresses are guest-physical.
struct BootTableMemory<'m> {
    mem: &'m dyn GuestMemory,
    next: Cell<u64>,
}

impl DmaMemory for BootTableMemory<'_> {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        let page = self.next.get();
        if page >= PAGE_TABLES_END {
            return Err(DmaAllocError);
        }
        self.mem
            .write(page, &[0u8; PAGE_SIZE as usize])
            .map_err(|_| DmaAllocError)?;
        self.next.set(page + PAGE_SIZE);
        Ok(PhysAddr::new(page))
    }
    /// The tables are handed to the guest: nothing returns to Sluice.
    fn free_page(&self, _page: PhysAddr) {}
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        let mut raw = [0u8; 8];
        // Only pages this allocator handed out are read: they are RAM.
        match self.mem.read(addr.as_u64(), &mut raw) {
            Ok(()) => u64::from_le_bytes(raw),
            Err(e) => {
                log::error!("boot page tables: reading {addr} failed: {e:?}");
                0
            }
        }
    }
    fn write_u64(&self, addr: PhysAddr, value: u64) {
        if let Err(e) = self.mem.write(addr.as_u64(), &value.to_le_bytes()) {
            log::error!("boot page tables: writing {addr} failed: {e:?}");
        }
    }
    fn flush_for_device(&self, _addr: PhysAddr, _len: u64) {}
}

/// Builds the guest's 4-level identity page tables in the boot area and
/// returns the PML4 address (for CR3): RAM write-back and executable,
/// the BAR and ECAM windows uncacheable (PCD|PWT: PAT entry 3, UC with the
/// reset PAT) and not executable. `one_gib_pages` when the guest CPU has
/// 1 GiB pages (CPUID 8000_0001h EDX bit 26).
pub fn build_identity_tables(
    mem: &dyn GuestMemory,
    ram: &[(u64, u64)],
    one_gib_pages: bool,
) -> Result<u64, BootError> {
    let tables = BootTableMemory {
        mem,
        next: Cell::new(PAGE_TABLES_GPA),
    };
    let max = if one_gib_pages {
        PageSize::Size1G
    } else {
        PageSize::Size2M
    };
    // Guest-physical addresses up to 52 bits; 48-bit linear addresses.
    let format = VtdFirstLevel::new(4, 52)?;
    let mut table = IoPageTable::new(&tables, format, TableConfig::new(max, true))?;
    let write_back = FirstLevelAttrs {
        user: false,
        caching: X86Caching::default(),
    };
    let uncached = FirstLevelAttrs {
        user: false,
        caching: X86Caching {
            write_through: true,
            cache_disable: true,
        },
    };
    let mut result = Ok(());
    for &(base, len) in ram {
        if let Err(e) = table.map(base, PhysAddr::new(base), len, MapPerms::ALL, write_back) {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        for (base, len) in [
            (layout::BAR_WINDOW_BASE, layout::BAR_WINDOW_SIZE),
            (layout::ECAM_BASE, layout::ECAM_SIZE),
        ] {
            if let Err(e) = table.map(
                base,
                PhysAddr::new(base),
                len,
                MapPerms::READ_WRITE,
                uncached,
            ) {
                result = Err(e);
                break;
            }
        }
    }
    let root = table.root().as_u64();
    // The tables now belong to the guest: no invalidation is pending and
    // freeing is a no-op.
    table.destroy().release(&tables);
    result?;
    Ok(root)
}

/// Writes the boot GDT and TSS.
fn write_descriptor_tables(mem: &dyn GuestMemory) -> Result<(), GuestMemoryError> {
    let code = Segment::flat_code64(CODE_SELECTOR).descriptor();
    let data = Segment::flat_data(DATA_SELECTOR).descriptor();
    // A 64-bit TSS descriptor is 16 bytes: the low 8 like a segment
    // descriptor (type 9, available 64-bit TSS), the high 8 the base's
    // bits 63:32 (SDM vol. 3, 8.2.3).
    let tss_low = Segment::system(TSS_SELECTOR, 0x9, TSS_GPA, TSS_LIMIT).descriptor();
    let tss_high = TSS_GPA >> 32;
    let mut gdt = [0u8; 40];
    for (i, d) in [0, code, data, tss_low, tss_high].iter().enumerate() {
        gdt[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    mem.write(GDT_GPA, &gdt)?;
    // TSS: all zero except the I/O map base at offset 0x66, set beyond the
    // limit (no I/O permission bitmap).
    let mut tss = [0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&((TSS_LIMIT + 1) as u16).to_le_bytes());
    mem.write(TSS_GPA, &tss)
}

/// The vCPU state at the guest entry point: 64-bit mode, paging with
/// `cr3`, flat segments from the boot GDT, interrupts off, `RDI` = start
/// info, `RSP` = [`STACK_TOP`] - 8 over a zero return address (as after a
/// `call`, so the System V stack alignment holds).
pub fn x86_entry_state(entry: u64, cr3: u64) -> EntryState {
    let mut registers = GuestRegisters::new();
    registers.rip = entry;
    registers.rflags = RFLAGS_RESERVED_ONE;
    registers.gprs[gpr::RDI] = START_INFO_GPA;
    registers.gprs[gpr::RSP] = STACK_TOP - 8;
    EntryState {
        registers,
        cr0: cr::CR0_PE | cr::CR0_MP | cr::CR0_ET | cr::CR0_NE | cr::CR0_WP | cr::CR0_PG,
        cr3,
        cr4: cr::CR4_PAE | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT,
        efer: cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE,
        cs: Segment::flat_code64(CODE_SELECTOR),
        ds: Segment::flat_data(DATA_SELECTOR),
        es: Segment::flat_data(DATA_SELECTOR),
        ss: Segment::flat_data(DATA_SELECTOR),
        fs: Segment::flat_data(DATA_SELECTOR),
        gs: Segment::flat_data(DATA_SELECTOR),
        tr: Segment::system(TSS_SELECTOR, Segment::TYPE_TSS64_BUSY, TSS_GPA, TSS_LIMIT),
        ldtr: Segment::unusable(),
        gdtr: DescriptorTable {
            base: GDT_GPA,
            limit: 39,
        },
        idtr: DescriptorTable { base: 0, limit: 0 },
        pat: PAT_RESET_VALUE,
    }
}

/// What [`boot_x86`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootedGuest {
    pub entry_state: EntryState,
    pub image: LoadedImage,
    pub start_info: StartInfo,
}

/// Boots an x86 guest: loads `image`, writes the GDT, TSS, start info and
/// identity tables, and returns the first vCPU's entry state. `ram` are
/// the VM's RAM regions; `devices` its passed-through functions; `args`
/// its `args=` word (`VmConfig::args`, empty for none).
pub fn boot_x86(
    mem: &dyn GuestMemory,
    ram: &[(u64, u64)],
    image: &[u8],
    devices: &[StartInfoDevice],
    args: &str,
    one_gib_pages: bool,
) -> Result<BootedGuest, BootError> {
    if !args.is_empty() && !super::config::valid_args(args) {
        return Err(BootError::BadArgs);
    }
    // The boot area must be RAM before anything else is done.
    let boot_ram = ram.iter().any(|&(b, l)| b == 0 && l >= IMAGE_BASE_MIN);
    if !boot_ram {
        return Err(BootError::Memory(GuestMemoryError::Unmapped {
            gpa: IMAGE_BASE_MIN - 1,
        }));
    }
    let loaded = load_elf(mem, ram, image, Machine::X86_64)?;
    let info = StartInfo {
        image_start: loaded.start,
        image_end: loaded.end,
        ecam_base: layout::ECAM_BASE,
        ecam_buses: 1,
        console_kind: console_kind::X86_PORT,
        console_address: u64::from(CONSOLE_PORT),
        memory_map: memory_map(ram, &loaded),
        devices: devices.to_vec(),
        args: String::from(args),
    };
    let bytes = info.encode();
    if bytes.len() as u64 > START_INFO_MAX {
        return Err(BootError::StartInfoTooLarge { bytes: bytes.len() });
    }
    mem.write(START_INFO_GPA, &bytes)?;
    write_descriptor_tables(mem)?;
    let cr3 = build_identity_tables(mem, ram, one_gib_pages)?;
    Ok(BootedGuest {
        entry_state: x86_entry_state(loaded.entry, cr3),
        image: loaded,
        start_info: info,
    })
}

/// The vCPU state at an aarch64 guest's entry point: EL1h with D, A, I
/// and F masked, the MMU, caches and alignment checks off, FP/SIMD usable,
/// `X0` = start info, `SP_EL1` = [`aarch64_layout::STACK_TOP`], every other
/// register zero.
pub fn aarch64_entry_state(entry: u64) -> Aarch64EntryState {
    let mut x = [0u64; 31];
    x[0] = aarch64_layout::START_INFO_GPA;
    Aarch64EntryState {
        registers: Aarch64Registers {
            x,
            pc: entry,
            pstate: pstate::MODE_EL1H | pstate::D | pstate::A | pstate::I | pstate::F,
        },
        sp_el1: aarch64_layout::STACK_TOP,
        sctlr_el1: SCTLR_EL1_MMU_OFF,
        cpacr_el1: CPACR_EL1_FPEN,
    }
}

/// What [`boot_aarch64`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootedAarch64Guest {
    pub entry_state: Aarch64EntryState,
    pub image: LoadedImage,
    pub start_info: StartInfo,
}

/// Boots an aarch64 guest: loads `image` (`EM_AARCH64`), writes the start
/// info, and returns the first vCPU's entry state ([`aarch64_entry_state`]).
/// The guest starts with its MMU off, so no tables are built. `ram` are
/// the VM's RAM regions (the first MiB at [`aarch64_layout::RAM_BASE`] is
/// the boot area); `devices` its passed-through functions; `args` its
/// `args=` word (empty for none).
pub fn boot_aarch64(
    mem: &dyn GuestMemory,
    ram: &[(u64, u64)],
    image: &[u8],
    devices: &[StartInfoDevice],
    args: &str,
) -> Result<BootedAarch64Guest, BootError> {
    if !args.is_empty() && !super::config::valid_args(args) {
        return Err(BootError::BadArgs);
    }
    if let Some(end) = ram
        .iter()
        .map(|&(b, l)| b.saturating_add(l))
        .find(|&end| end > aarch64_layout::GPA_LIMIT)
    {
        return Err(BootError::RamBeyondAddressSpace { end });
    }
    let (boot_start, boot_end) = Machine::Aarch64.boot_area();
    if !ram
        .iter()
        .any(|&(b, l)| b <= boot_start && b.saturating_add(l) >= boot_end)
    {
        return Err(BootError::Memory(GuestMemoryError::Unmapped {
            gpa: boot_end - 1,
        }));
    }
    let loaded = load_elf(mem, ram, image, Machine::Aarch64)?;
    let info = StartInfo {
        image_start: loaded.start,
        image_end: loaded.end,
        ecam_base: aarch64_layout::ECAM_BASE,
        ecam_buses: 1,
        console_kind: console_kind::MMIO,
        console_address: aarch64_layout::CONSOLE_GPA,
        memory_map: machine_memory_map(Machine::Aarch64, ram, &loaded),
        devices: devices.to_vec(),
        args: String::from(args),
    };
    let bytes = info.encode();
    if bytes.len() as u64 > START_INFO_MAX {
        return Err(BootError::StartInfoTooLarge { bytes: bytes.len() });
    }
    mem.write(aarch64_layout::START_INFO_GPA, &bytes)?;
    Ok(BootedAarch64Guest {
        entry_state: aarch64_entry_state(loaded.entry),
        image: loaded,
        start_info: info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_ranges() {
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 10), (50, 60)]),
            [(0, 10), (20, 30)]
        );
        assert_eq!(subtract(&[(0, 100), (200, 10)], &[(0, 100)]), [(200, 10)]);
        assert_eq!(subtract(&[(0, 100)], &[]), [(0, 100)]);
    }

    #[test]
    fn start_info_layout() {
        let info = StartInfo {
            image_start: 0x10_0000,
            image_end: 0x10_2000,
            ecam_base: 0xe000_0000,
            ecam_buses: 1,
            console_kind: console_kind::X86_PORT,
            console_address: 0xe9,
            memory_map: vec![MemoryRegion {
                base: 0x20_0000,
                length: 0x10_0000,
                kind: region_kind::RAM,
            }],
            devices: vec![StartInfoDevice {
                guest_bdf: 0x0008,
                vendor_id: 0x1234,
                device_id: 0x11e8,
                class_code: 0x00ff00,
                iommu_group: 7,
            }],
            args: String::new(),
        };
        let b = info.encode();
        assert_eq!(b.len(), 0x60 + 24 + 16);
        assert_eq!(u64_at(&b, 0x58), 0, "no arguments: offset and length 0");
        assert_eq!(&b[..8], b"SLUICEBI");
        assert_eq!(u32_at(&b, 0x0c) as usize, b.len());
        assert_eq!(u64_at(&b, 0x48), 0x60);
        assert_eq!(u64_at(&b, 0x50), 0x78);
        assert_eq!(u64_at(&b, 0x60), 0x20_0000);
        assert_eq!(u32_at(&b, 0x60 + 16), region_kind::RAM);
        assert_eq!(u32_at(&b, 0x78), 0x0008);
        assert_eq!(u16_at(&b, 0x7c), 0x1234);
        assert_eq!(u32_at(&b, 0x84), 7);

        let with_args = StartInfo {
            args: String::from("dma"),
            ..info
        };
        let b = with_args.encode();
        assert_eq!(b.len(), 0x60 + 24 + 16 + 3 + 1);
        assert_eq!(u32_at(&b, 0x0c) as usize, b.len());
        assert_eq!((u32_at(&b, 0x58), u32_at(&b, 0x5c)), (0x88, 3));
        assert_eq!(&b[0x88..], b"dma\0");
        assert_eq!(u32_at(&b, 0x78), 0x0008, "arrays unchanged");
    }
}
