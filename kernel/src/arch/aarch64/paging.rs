//! Sluice's EL2 stage-1 translation: an identity map of the physical
//! address space, RAM as Normal write-back memory and everything else as
//! Device-nGnRnE, execute-never.
//!
//! The tables are built for the translation regime firmware left running
//! (TCR_EL2's T0SZ and 4 KiB granule, MAIR_EL2's attribute slots) and
//! swapped in through TTBR0_EL2, so the switch never runs with the MMU off.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot_info::MemoryRegion;
use crate::memory::frame::{FRAME_SIZE, FrameAllocator, FrameError};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

// VMSAv8-64 descriptor bits (Arm ARM D8.3).
const VALID: u64 = 1 << 0;
const TABLE_OR_PAGE: u64 = 1 << 1;
const ATTR_INDEX_SHIFT: u64 = 2;
const INNER_SHAREABLE: u64 = 3 << 8;
const ACCESS_FLAG: u64 = 1 << 10;
const EXECUTE_NEVER: u64 = 1 << 54;

static PROBE: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub enum PagingError {
    Frames(FrameError),
    /// Firmware's regime is one we do not build tables for (with the reason).
    UnsupportedRegime(&'static str),
}

impl From<FrameError> for PagingError {
    fn from(e: FrameError) -> Self {
        Self::Frames(e)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct IdentityMap {
    pub root: u64,
    pub mapped_bytes: u64,
    pub va_bits: u32,
    pub table_frames: u64,
}

fn read_tcr() -> u64 {
    let v: u64;
    // SAFETY: reading TCR_EL2 has no side effects.
    unsafe { asm!("mrs {}, tcr_el2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn read_mair() -> u64 {
    let v: u64;
    // SAFETY: reading MAIR_EL2 has no side effects.
    unsafe { asm!("mrs {}, mair_el2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn physical_address_bits() -> u32 {
    let v: u64;
    // SAFETY: reading the ID register has no side effects.
    unsafe {
        asm!("mrs {}, id_aa64mmfr0_el1", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    match v & 0xf {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// An address the identity map leaves unmapped: inside the last GiB of the
/// input range, which is never mapped.
pub fn unmapped_probe_address() -> u64 {
    PROBE.load(Ordering::Relaxed)
}

fn find_attribute(mair: u64, wanted: &[u8]) -> Option<u64> {
    (0..8u64).find(|&i| wanted.contains(&((mair >> (i * 8)) as u8)))
}

/// Whether `[start, end)` is all RAM (`Some(true)`), all non-RAM
/// (`Some(false)`), or mixed (`None`).
fn classify(map: &[MemoryRegion], ram_top: u64, start: u64, end: u64) -> Option<bool> {
    if start >= ram_top {
        return Some(false);
    }
    let mut ram_bytes = 0;
    for r in map.iter().filter(|r| r.kind.is_ram()) {
        let s = r.start.max(start);
        let e = r.end().min(end);
        if s < e {
            ram_bytes += e - s;
        }
    }
    match ram_bytes {
        0 => Some(false),
        b if b == end - start => Some(true),
        _ => None,
    }
}

struct Builder<'a> {
    frames: &'a mut FrameAllocator,
    map: &'a [MemoryRegion],
    ram_top: u64,
    normal: u64,
    device: u64,
    table_frames: u64,
}

impl Builder<'_> {
    fn table(&mut self) -> Result<u64, FrameError> {
        let t = self.frames.allocate(1, FRAME_SIZE)?;
        // SAFETY: fresh frame, identity-mapped by firmware.
        unsafe { core::ptr::write_bytes(t as *mut u8, 0, FRAME_SIZE as usize) };
        self.table_frames += 1;
        Ok(t)
    }

    fn leaf(&self, address: u64, ram: bool, page: bool) -> u64 {
        let kind = if page { VALID | TABLE_OR_PAGE } else { VALID };
        let attributes = if ram {
            (self.normal << ATTR_INDEX_SHIFT) | INNER_SHAREABLE
        } else {
            (self.device << ATTR_INDEX_SHIFT) | EXECUTE_NEVER
        };
        address | kind | attributes | ACCESS_FLAG
    }

    /// Fills `table` (at `level`, covering `span` bytes per entry) for
    /// `[base, base + 512 * span)` up to `limit`.
    fn fill(&mut self, table: u64, level: u32, base: u64, limit: u64) -> Result<(), FrameError> {
        let span = 1u64 << (12 + 9 * (3 - level));
        for index in 0..512u64 {
            let start = base + index * span;
            if start >= limit {
                break;
            }
            let end = start + span;
            let entry = match (level, classify(self.map, self.ram_top, start, end)) {
                // Blocks exist at levels 1 and 2 with a 4 KiB granule; pages at 3.
                (1 | 2, Some(ram)) => self.leaf(start, ram, false),
                (3, class) => self.leaf(start, class.unwrap_or(false), true),
                _ => {
                    let next = self.table()?;
                    self.fill(next, level + 1, start, limit.min(end))?;
                    next | VALID | TABLE_OR_PAGE
                }
            };
            // SAFETY: `table` is a frame we allocated; index < 512.
            unsafe { core::ptr::write_volatile((table as *mut u64).add(index as usize), entry) };
        }
        Ok(())
    }
}

/// Builds the identity map for firmware's current regime, leaving the last
/// GiB of the input range unmapped.
pub fn build_identity_map(
    frames: &mut FrameAllocator,
    map: &[MemoryRegion],
) -> Result<IdentityMap, PagingError> {
    let tcr = read_tcr();
    if (tcr >> 14) & 3 != 0 {
        return Err(PagingError::UnsupportedRegime(
            "TCR_EL2.TG0 is not the 4 KiB granule",
        ));
    }
    let va_bits = 64 - (tcr & 0x3f) as u32;
    if !(31..=48).contains(&va_bits) {
        return Err(PagingError::UnsupportedRegime(
            "TCR_EL2.T0SZ outside 16..=33",
        ));
    }
    let mair = read_mair();
    let normal = find_attribute(mair, &[0xff]).ok_or(PagingError::UnsupportedRegime(
        "MAIR_EL2 has no Normal write-back slot",
    ))?;
    let device = find_attribute(mair, &[0x00, 0x04]).ok_or(PagingError::UnsupportedRegime(
        "MAIR_EL2 has no Device-nGnRnE/nGnRE slot",
    ))?;
    // Levels: 4 KiB granule resolves 9 bits per level above the 12-bit offset.
    let start_level = 3 - (va_bits - 12 - 1) / 9;
    let space = 1u64 << va_bits.min(physical_address_bits());
    let limit = space - GIB;
    PROBE.store(limit + 0x0dea_d000, Ordering::Relaxed);
    let ram_top = map
        .iter()
        .filter(|r| r.kind.is_ram())
        .map(MemoryRegion::end)
        .max()
        .unwrap_or(0);
    let mut builder = Builder {
        frames,
        map,
        ram_top,
        normal,
        device,
        table_frames: 0,
    };
    let root = builder.table()?;
    builder.fill(root, start_level, 0, limit)?;
    debug_assert!(limit.is_multiple_of(MIB2));
    Ok(IdentityMap {
        root,
        mapped_bytes: limit,
        va_bits,
        table_frames: builder.table_frames,
    })
}

/// Switches TTBR0_EL2 to `map` and drops stale translations.
///
/// # Safety
/// `map` must come from `build_identity_map` and cover all memory in use
/// with the attributes it has now.
pub unsafe fn activate(map: &IdentityMap) {
    // SAFETY: the new tables identity-map everything in use; the barriers
    // make the table writes visible to the walker before the switch.
    unsafe {
        asm!(
            "dsb ishst",
            "msr ttbr0_el2, {root}",
            "isb",
            "tlbi alle2",
            "dsb ish",
            "isb",
            root = in(reg) map.root,
            options(nostack)
        );
    }
}
