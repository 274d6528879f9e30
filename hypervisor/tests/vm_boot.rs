//! The direct-boot protocol: ELF64 loading with every refusal, the start
//! info in guest RAM, the identity tables (checked with the page-table
//! engine's independent walker) and an entry state the SVM VMRUN checks
//! accept.

use sluice_hal::{DmaAllocError, DmaMemory, PhysAddr};
use sluice_hypervisor::iommufd::GuestMemory;
use sluice_hypervisor::vcpu::svm::vmcb::{Vmcb, VmcbSetup, check_consistency};
use sluice_hypervisor::vcpu::{cr, gpr};
use sluice_hypervisor::vm::boot::{
    self, BootError, ElfError, LoadedSegment, Machine, MemoryRegion, StartInfoDevice, load_elf,
    region_kind,
};
use sluice_hypervisor::vm::memory::{GuestRam, ModelFrames, layout};
use sluice_iommu::pagetable::PageTableFormat;
use sluice_iommu::pagetable::walk::{WalkFault, walk};
use sluice_iommu::pagetable::x86::VtdFirstLevel;

const MIB: u64 = 1 << 20;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

struct Seg {
    p_type: u32,
    flags: u32,
    vaddr: u64,
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

fn load(flags: u32, addr: u64, data: &[u8], memsz: u64) -> Seg {
    Seg {
        p_type: 1,
        flags,
        vaddr: addr,
        paddr: addr,
        data: data.to_vec(),
        memsz,
    }
}

/// An ELF64 executable for x86-64 with `segs`, contents after the headers.
fn elf(entry: u64, segs: &[Seg]) -> Vec<u8> {
    let phoff = 64u64;
    let data_start = phoff + 56 * segs.len() as u64;
    let mut out = vec![0u8; data_start as usize];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // little endian
    out[6] = 1; // EV_CURRENT
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&phoff.to_le_bytes());
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[54..56].copy_from_slice(&56u16.to_le_bytes());
    out[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    let mut offset = data_start;
    for (i, s) in segs.iter().enumerate() {
        let ph = 64 + 56 * i;
        out[ph..ph + 4].copy_from_slice(&s.p_type.to_le_bytes());
        out[ph + 4..ph + 8].copy_from_slice(&s.flags.to_le_bytes());
        out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        out[ph + 16..ph + 24].copy_from_slice(&s.vaddr.to_le_bytes());
        out[ph + 24..ph + 32].copy_from_slice(&s.paddr.to_le_bytes());
        out[ph + 32..ph + 40].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
        out[ph + 40..ph + 48].copy_from_slice(&s.memsz.to_le_bytes());
        out[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        offset += s.data.len() as u64;
    }
    for s in segs {
        out.extend_from_slice(&s.data);
    }
    out
}

/// A guest with code at 1 MiB (VMMCALL; HLT) and data + bss at 2 MiB.
fn guest_image() -> Vec<u8> {
    elf(
        0x10_0000,
        &[
            load(PF_R | PF_X, 0x10_0000, &[0x0f, 0x01, 0xd9, 0xf4], 0x1000),
            load(PF_R | PF_W, 0x20_0000, b"data", 0x3000),
        ],
    )
}

fn ram(size: u64) -> GuestRam<&'static ModelFrames> {
    let frames: &'static ModelFrames = Box::leak(Box::new(ModelFrames::new()));
    let mut ram = GuestRam::new(frames, &layout::x86_ram_regions(size)).unwrap();
    ram.add_mmio(layout::ECAM_BASE, layout::ECAM_SIZE).unwrap();
    ram
}

fn bytes(ram: &GuestRam<&ModelFrames>, gpa: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    ram.read(gpa, &mut out).unwrap();
    out
}

#[test]
fn loads_segments_and_zero_fills() {
    let r = ram(8 * MIB);
    // Garbage where the bss will be: the loader must zero it.
    r.write(0x20_0004, &[0xff; 64]).unwrap();
    let img = load_elf(&r, r.regions(), &guest_image(), Machine::X86_64).unwrap();
    assert_eq!(img.entry, 0x10_0000);
    assert_eq!((img.start, img.end), (0x10_0000, 0x20_3000));
    assert_eq!(
        img.segments,
        [
            LoadedSegment {
                gpa: 0x10_0000,
                file_size: 4,
                memory_size: 0x1000,
                executable: true,
                writable: false
            },
            LoadedSegment {
                gpa: 0x20_0000,
                file_size: 4,
                memory_size: 0x3000,
                executable: false,
                writable: true
            },
        ]
    );
    assert_eq!(bytes(&r, 0x10_0000, 4), [0x0f, 0x01, 0xd9, 0xf4]);
    assert_eq!(bytes(&r, 0x20_0000, 4), b"data");
    assert!(bytes(&r, 0x20_0004, 0x2ffc).iter().all(|&b| b == 0));
}

/// Loads `image` into fresh RAM; asserts that a refusal wrote nothing.
fn refuse(image: &[u8]) -> ElfError {
    let r = ram(8 * MIB);
    let e = load_elf(&r, r.regions(), image, Machine::X86_64).unwrap_err();
    assert!(
        bytes(&r, 0x10_0000, 0x30_0000).iter().all(|&b| b == 0),
        "a refused image wrote into guest RAM ({e})"
    );
    e
}

#[test]
fn header_refusals() {
    let good = guest_image();
    let patched = |at: usize, value: &[u8]| {
        let mut img = good.clone();
        img[at..at + value.len()].copy_from_slice(value);
        img
    };
    assert_eq!(refuse(&good[..63]), ElfError::TooShort);
    assert_eq!(refuse(&patched(0, b"\x7fELG")), ElfError::BadMagic);
    assert_eq!(refuse(&patched(4, &[1])), ElfError::NotElf64);
    assert_eq!(refuse(&patched(5, &[2])), ElfError::NotLittleEndian);
    assert_eq!(refuse(&patched(6, &[0])), ElfError::BadVersion);
    assert_eq!(
        refuse(&patched(16, &3u16.to_le_bytes())),
        ElfError::NotExecutable { e_type: 3 }
    );
    assert_eq!(
        refuse(&patched(18, &183u16.to_le_bytes())),
        ElfError::WrongMachine {
            found: 183,
            expected: 62
        }
    );
    assert_eq!(
        refuse(&patched(54, &32u16.to_le_bytes())),
        ElfError::BadProgramHeaderSize(32)
    );
    assert_eq!(
        refuse(&patched(56, &0xffffu16.to_le_bytes())),
        ElfError::TooManyProgramHeaders(0xffff)
    );
    assert_eq!(
        refuse(&patched(56, &65u16.to_le_bytes())),
        ElfError::TooManyProgramHeaders(65)
    );
    assert_eq!(
        refuse(&patched(56, &60u16.to_le_bytes())),
        ElfError::ProgramHeadersOutOfFile
    );
    assert_eq!(
        refuse(&patched(32, &u64::MAX.to_le_bytes())),
        ElfError::ProgramHeadersOutOfFile
    );
    // The right machine for another architecture is refused too.
    let r = ram(8 * MIB);
    assert_eq!(
        load_elf(&r, r.regions(), &good, Machine::Aarch64),
        Err(ElfError::WrongMachine {
            found: 62,
            expected: 183
        })
    );
}

#[test]
fn segment_refusals() {
    let code = || load(PF_R | PF_X, 0x10_0000, &[0xf4], 0x1000);
    assert_eq!(refuse(&elf(0x10_0000, &[])), ElfError::NoLoadableSegment);
    let mut interp = code();
    interp.p_type = 3;
    assert_eq!(
        refuse(&elf(0x10_0000, &[code(), interp])),
        ElfError::Dynamic
    );
    assert_eq!(
        refuse(&elf(0x10_0000, &[load(PF_X, 0x10_0000, &[0xf4; 16], 8)])),
        ElfError::FileSizeAboveMemorySize { segment: 0 }
    );
    let mut img = elf(0x10_0000, &[code()]);
    img.truncate(img.len() - 1);
    assert_eq!(refuse(&img), ElfError::SegmentOutOfFile { segment: 0 });
    assert_eq!(
        refuse(&elf(
            0x10_0000,
            &[code(), load(PF_R, u64::MAX - 0xfff, &[], 0x2000)]
        )),
        ElfError::SegmentOverflow { segment: 1 }
    );
    let mut higher_half = code();
    higher_half.vaddr = 0xffff_8000_0010_0000;
    assert_eq!(
        refuse(&elf(0x10_0000, &[higher_half])),
        ElfError::VirtualNotPhysical {
            segment: 0,
            vaddr: 0xffff_8000_0010_0000,
            paddr: 0x10_0000
        }
    );
    assert_eq!(
        refuse(&elf(
            0x10_0000,
            &[code(), load(PF_R, 0xf_f000, &[1], 0x2000)]
        )),
        ElfError::InBootArea {
            segment: 1,
            gpa: 0xf_f000
        }
    );
    // Past the end of RAM, and in the ECAM window.
    assert_eq!(
        refuse(&elf(
            0x10_0000,
            &[code(), load(PF_R, 0x7f_f000, &[1], 0x2000)]
        )),
        ElfError::OutsideRam {
            segment: 1,
            gpa: 0x7f_f000,
            end: 0x80_1000
        }
    );
    assert_eq!(
        refuse(&elf(
            0x10_0000,
            &[code(), load(PF_R, layout::ECAM_BASE, &[1], 0x1000)]
        )),
        ElfError::OutsideRam {
            segment: 1,
            gpa: layout::ECAM_BASE,
            end: layout::ECAM_BASE + 0x1000
        }
    );
    assert_eq!(
        refuse(&elf(
            0x10_0000,
            &[code(), load(PF_R, 0x10_0800, &[1], 0x1000)]
        )),
        ElfError::Overlap {
            first: 0,
            second: 1
        }
    );
    // Entry in a data segment, past the code, or nowhere.
    let data = load(PF_R | PF_W, 0x20_0000, &[0], 0x1000);
    assert_eq!(
        refuse(&elf(0x20_0000, &[code(), data])),
        ElfError::EntryOutsideCode { entry: 0x20_0000 }
    );
    assert_eq!(
        refuse(&elf(0x10_1000, &[code()])),
        ElfError::EntryOutsideCode { entry: 0x10_1000 }
    );
    // Segments with memsz 0 are skipped, not errors.
    let empty = load(PF_R, 0, &[], 0);
    let r = ram(8 * MIB);
    assert!(
        load_elf(
            &r,
            r.regions(),
            &elf(0x10_0000, &[code(), empty]),
            Machine::X86_64
        )
        .is_ok()
    );
}

/// Guest RAM as the walker's memory (guest-physical = "physical").
struct GuestView<'a>(&'a GuestRam<&'static ModelFrames>);

impl DmaMemory for GuestView<'_> {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        Err(DmaAllocError)
    }
    fn free_page(&self, _: PhysAddr) {}
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        let mut raw = [0u8; 8];
        self.0.read(addr.as_u64(), &mut raw).unwrap();
        u64::from_le_bytes(raw)
    }
    fn write_u64(&self, _: PhysAddr, _: u64) {
        unreachable!("the walker only reads")
    }
    fn flush_for_device(&self, _: PhysAddr, _: u64) {}
}

fn devices() -> Vec<StartInfoDevice> {
    vec![StartInfoDevice {
        guest_bdf: sluice_abi::bdf(0, 0, 1, 0),
        vendor_id: 0x1234,
        device_id: 0x11e8,
        class_code: 0x00_ff_00,
        iommu_group: 3,
    }]
}

#[test]
fn boot_writes_start_info_tables_and_entry_state() {
    let r = ram(64 * MIB);
    let booted = boot::boot_x86(&r, r.regions(), &guest_image(), &devices(), "dma", false).unwrap();
    let e = booted.entry_state;
    assert_eq!(e.registers.rip, 0x10_0000);
    assert_eq!(e.registers.gprs[gpr::RDI], boot::START_INFO_GPA);
    assert_eq!(e.registers.gprs[gpr::RSP], boot::STACK_TOP - 8);
    assert_eq!(e.registers.gprs[gpr::RSP] % 16, 8, "as after a call");
    assert_eq!(
        bytes(&r, boot::STACK_TOP - 8, 8),
        [0; 8],
        "zero return address"
    );
    assert_eq!(e.efer & cr::EFER_LMA, cr::EFER_LMA);
    assert_eq!(e.cr3, boot::PAGE_TABLES_GPA);

    // The start info, read back as a guest would.
    let info = bytes(&r, boot::START_INFO_GPA, 0x60);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(&info[..8], b"SLUICEBI");
    assert_eq!(u32_at(&info, 8), boot::START_INFO_VERSION);
    assert_eq!(u32_at(&info, 0x10), boot::HYPERCALL_ABI_VERSION);
    assert_eq!(u64_at(&info, 0x18), 0x10_0000);
    assert_eq!(u64_at(&info, 0x20), 0x20_3000);
    assert_eq!(u64_at(&info, 0x28), layout::ECAM_BASE);
    assert_eq!(u32_at(&info, 0x34), boot::console_kind::X86_PORT);
    assert_eq!(u64_at(&info, 0x38), 0xe9);
    let regions = u32_at(&info, 0x40) as usize;
    let map_at = u64_at(&info, 0x48) as usize;
    let dev_at = u64_at(&info, 0x50) as usize;
    let total = u32_at(&info, 0xc) as usize;
    let all = bytes(&r, boot::START_INFO_GPA, total);
    let map: Vec<MemoryRegion> = (0..regions)
        .map(|i| {
            let o = map_at + i * 24;
            MemoryRegion {
                base: u64_at(&all, o),
                length: u64_at(&all, o + 8),
                kind: u32_at(&all, o + 16),
            }
        })
        .collect();
    let mib = |n: u64| n * MIB;
    assert_eq!(
        map,
        [
            MemoryRegion {
                base: 0,
                length: mib(1),
                kind: region_kind::BOOT
            },
            MemoryRegion {
                base: mib(1),
                length: 0x1000,
                kind: region_kind::IMAGE
            },
            MemoryRegion {
                base: mib(1) + 0x1000,
                length: mib(1) - 0x1000,
                kind: region_kind::RAM
            },
            MemoryRegion {
                base: mib(2),
                length: 0x3000,
                kind: region_kind::IMAGE
            },
            MemoryRegion {
                base: mib(2) + 0x3000,
                length: mib(62) - 0x3000,
                kind: region_kind::RAM
            },
            MemoryRegion {
                base: layout::BAR_WINDOW_BASE,
                length: layout::BAR_WINDOW_SIZE,
                kind: region_kind::PCI_MMIO
            },
            MemoryRegion {
                base: layout::ECAM_BASE,
                length: layout::ECAM_SIZE,
                kind: region_kind::ECAM
            },
        ]
    );
    assert_eq!(u32_at(&info, 0x44), 1);
    assert_eq!(u32_at(&all, dev_at), sluice_abi::bdf(0, 0, 1, 0));
    assert_eq!(u32_at(&all, dev_at + 4), 0x11e8_1234);
    assert_eq!(u32_at(&all, dev_at + 12), 3);
    // The guest arguments after the device list, NUL-terminated.
    let (args_at, args_len) = (u32_at(&info, 0x58) as usize, u32_at(&info, 0x5c) as usize);
    assert_eq!(args_at, dev_at + 16);
    assert_eq!(&all[args_at..args_at + args_len], b"dma");
    assert_eq!(all[args_at + args_len], 0);
    assert_eq!(total, args_at + args_len + 1);
    assert_eq!(booted.start_info.args, "dma");

    // The identity tables, walked independently.
    let params = VtdFirstLevel::new(4, 52).unwrap().walk_params();
    let view = GuestView(&r);
    let root = PhysAddr::new(e.cr3);
    for gpa in [0, 0x10_0000, 0x20_0123, 64 * MIB - 1] {
        let w = walk(&view, &params, root, gpa).unwrap();
        assert_eq!(w.phys.as_u64(), gpa);
        assert!(w.perms.write && w.perms.exec);
        assert_eq!(w.page_size, 2 * MIB, "2 MiB pages without 1 GiB support");
        assert_eq!(w.leaf & 0x18, 0, "RAM is write-back");
    }
    for gpa in [layout::ECAM_BASE + 0x8000, layout::BAR_WINDOW_BASE] {
        let w = walk(&view, &params, root, gpa).unwrap();
        assert_eq!(w.phys.as_u64(), gpa);
        assert!(!w.perms.exec);
        assert_eq!(w.leaf & 0x18, 0x18, "MMIO is PCD|PWT: uncacheable");
    }
    assert_eq!(
        walk(&view, &params, root, 64 * MIB),
        Err(WalkFault::NotPresent { level: 1 })
    );
    assert!(
        walk(&view, &params, root, 0xfee0_0000).is_err(),
        "the MSI window is not mapped"
    );

    // The GDT the guest may reload, and the TSS.
    let gdt = bytes(&r, boot::GDT_GPA, 40);
    assert_eq!(u64_at(&gdt, 8), 0x00af_9b00_0000_ffff);
    assert_eq!(u64_at(&gdt, 16), 0x00cf_9300_0000_ffff);
    assert_eq!(e.gdtr.base, boot::GDT_GPA);

    // SVM accepts the entry state.
    let vmcb = Vmcb::for_entry(
        &e,
        &VmcbSetup {
            asid: 1,
            iopm_base_pa: 0x10_0000,
            msrpm_base_pa: 0x10_3000,
            n_cr3: 0x20_0000,
        },
    );
    assert_eq!(check_consistency(&vmcb, 40), Ok(()));
}

#[test]
fn large_vms_use_one_gib_pages_when_the_cpu_has_them() {
    // The tables live in the boot area; the map covers the RAM regions of a
    // 4 GiB VM (up to 3 GiB, then above 4 GiB) without the test having to
    // back them all.
    let r = ram(2 * MIB);
    let big = layout::x86_ram_regions(4 << 30);
    let cr3 = boot::build_identity_tables(&r, &big, true).unwrap();
    let params = VtdFirstLevel::new(4, 52).unwrap().walk_params();
    let view = GuestView(&r);
    let root = PhysAddr::new(cr3);
    let w = walk(&view, &params, root, (1 << 30) + 5).unwrap();
    assert_eq!((w.phys.as_u64(), w.page_size), ((1 << 30) + 5, 1 << 30));
    let w = walk(&view, &params, root, (4 << 30) + 0x1234).unwrap();
    assert_eq!(w.phys.as_u64(), (4 << 30) + 0x1234);
    assert!(walk(&view, &params, root, 5 << 30).is_err());
    // Without 1 GiB pages the same map needs more tables, still in the area.
    let cr3 = boot::build_identity_tables(&r, &big, false).unwrap();
    let w = walk(&view, &params, PhysAddr::new(cr3), (3 << 30) - 1).unwrap();
    assert_eq!((w.phys.as_u64(), w.page_size), ((3 << 30) - 1, 2 * MIB));
    // A map that needs more tables than the area holds fails cleanly.
    let huge = [(0u64, 1u64 << 40)];
    assert!(matches!(
        boot::build_identity_tables(&r, &huge, false),
        Err(BootError::PageTables(_))
    ));
}

#[test]
fn boot_refusals() {
    // The image is refused before the start info is written.
    let r = ram(8 * MIB);
    assert_eq!(
        boot::boot_x86(&r, r.regions(), b"MZ not an elf", &[], "", false).err(),
        Some(BootError::Elf(ElfError::TooShort))
    );
    assert_eq!(bytes(&r, boot::START_INFO_GPA, 8), [0; 8]);
    // RAM that does not cover the boot area.
    let frames: &'static ModelFrames = Box::leak(Box::new(ModelFrames::new()));
    let high = GuestRam::new(frames, &[(16 * MIB, 8 * MIB)]).unwrap();
    assert!(matches!(
        boot::boot_x86(&high, high.regions(), &guest_image(), &[], "", false),
        Err(BootError::Memory(_))
    ));
    // Arguments the command line could not have produced are refused
    // before anything is written.
    let r = ram(8 * MIB);
    for bad in ["a:b", "a=b", "with space", &"x".repeat(65)] {
        assert_eq!(
            boot::boot_x86(&r, r.regions(), &guest_image(), &[], bad, false).err(),
            Some(BootError::BadArgs),
            "{bad}"
        );
    }
    assert_eq!(bytes(&r, 0x10_0000, 4), [0; 4]);
    assert_eq!(bytes(&r, boot::START_INFO_GPA, 8), [0; 8]);
}

#[test]
fn start_info_without_arguments_keeps_the_v1_header() {
    let r = ram(16 * MIB);
    let booted = boot::boot_x86(&r, r.regions(), &guest_image(), &devices(), "", false).unwrap();
    let info = bytes(&r, boot::START_INFO_GPA, 0x60);
    let u32_at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(8), 1, "still version 1");
    assert_eq!((u32_at(0x58), u32_at(0x5c)), (0, 0));
    let dev_at = u32_at(0x50) as usize;
    assert_eq!(
        u32_at(0x0c) as usize,
        dev_at + 16,
        "nothing after the devices"
    );
    assert_eq!(booted.start_info.args, "");
}
