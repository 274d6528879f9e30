//! Sluice's own 4-level page tables: an identity map of the physical
//! address space, so physical addresses (MMIO, ACPI tables, DMA buffers) can
//! be used directly. Memory types come from the MTRRs firmware programmed
//! (MMIO holes are uncacheable there), so every entry uses PAT index 0 (WB).

use crate::memory::frame::{FRAME_SIZE, FrameAllocator, FrameError};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

/// Largest identity map we build: 64 TiB, well inside the lower canonical
/// half, so `UNMAPPED_PROBE_ADDRESS` stays unmapped.
const MAX_IDENTITY: u64 = 64 << 40;
/// Without 1 GiB pages, cap the map at 1 TiB (4 MiB of 2 MiB-page tables).
const MAX_IDENTITY_2M: u64 = 1 << 40;

/// An address no mapping covers (the `fault` scenario reads it).
pub const UNMAPPED_PROBE_ADDRESS: u64 = 0x0000_7fff_dead_0000;

#[derive(Debug, Clone, Copy)]
pub struct IdentityMap {
    pub root: u64,
    pub mapped_bytes: u64,
    pub uses_1g_pages: bool,
    pub table_frames: u64,
}

fn cpu_physical_address_bits() -> u32 {
    if super::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        super::cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

fn cpu_has_1g_pages() -> bool {
    super::cpuid(0x8000_0000, 0).eax >= 0x8000_0001
        && super::cpuid(0x8000_0001, 0).edx & (1 << 26) != 0
}

fn new_table(frames: &mut FrameAllocator, count: &mut u64) -> Result<u64, FrameError> {
    let table = frames.allocate(1, FRAME_SIZE)?;
    // SAFETY: the frame was just allocated for us and firmware's identity
    // map (or ours) covers it.
    unsafe { core::ptr::write_bytes(table as *mut u8, 0, FRAME_SIZE as usize) };
    *count += 1;
    Ok(table)
}

fn set_entry(table: u64, index: u64, value: u64) {
    // SAFETY: `table` is a page-table frame we allocated; index < 512.
    unsafe { core::ptr::write_volatile((table as *mut u64).add(index as usize), value) };
}

/// Builds the identity map covering at least `[0, ram_top)` and the CPU's
/// physical address space up to the caps above.
pub fn build_identity_map(
    frames: &mut FrameAllocator,
    ram_top: u64,
) -> Result<IdentityMap, FrameError> {
    let uses_1g_pages = cpu_has_1g_pages();
    let physical_space = 1u64 << cpu_physical_address_bits().min(52);
    let cap = if uses_1g_pages {
        MAX_IDENTITY
    } else {
        MAX_IDENTITY_2M
    };
    let limit = physical_space.max(ram_top).min(cap).next_multiple_of(GIB);
    let mut table_frames = 0;
    let pml4 = new_table(frames, &mut table_frames)?;
    let mut pdpt = 0;
    let mut address = 0;
    while address < limit {
        let pml4_index = address >> 39;
        let pdpt_index = (address >> 30) & 511;
        if pdpt_index == 0 {
            pdpt = new_table(frames, &mut table_frames)?;
            set_entry(pml4, pml4_index, pdpt | PRESENT | WRITABLE);
        }
        if uses_1g_pages {
            set_entry(
                pdpt,
                pdpt_index,
                address | PRESENT | WRITABLE | PAGE_SIZE_BIT,
            );
        } else {
            let pd = new_table(frames, &mut table_frames)?;
            for pd_index in 0..512 {
                set_entry(
                    pd,
                    pd_index,
                    (address + pd_index * MIB2) | PRESENT | WRITABLE | PAGE_SIZE_BIT,
                );
            }
            set_entry(pdpt, pdpt_index, pd | PRESENT | WRITABLE);
        }
        address += GIB;
    }
    Ok(IdentityMap {
        root: pml4,
        mapped_bytes: limit,
        uses_1g_pages,
        table_frames,
    })
}

/// Switches to `map`.
///
/// # Safety
/// `map` must come from `build_identity_map` and cover all memory in use.
pub unsafe fn activate(map: &IdentityMap) {
    // SAFETY: the identity map maps everything in use at its own address.
    unsafe { super::write_cr3(map.root) };
}
