//! What a translation-table format tells the engine.

use core::fmt;

use sluice_hal::PhysAddr;

use super::walk::WalkParams;
use super::{MapPerms, PageTableError};

/// One entry as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<A> {
    /// Not present: a walker faults here.
    Invalid,
    /// Points to the next-level table.
    Table(PhysAddr),
    /// Maps `level_size(level)` bytes starting at `phys`.
    Leaf {
        phys: PhysAddr,
        perms: MapPerms,
        attrs: A,
    },
}

/// A radix translation-table format with 4 KiB tables of 512 entries.
///
/// A format is a *value*: its level count, address widths and options (e.g.
/// VT-d's AGAW chosen from CAP.SAGAW) are decided at run time from the
/// hardware's capabilities. Levels are numbered from the leaf up (level 0
/// maps 4 KiB).
///
/// The engine only writes entries produced by [`table_entry`] and
/// [`leaf_entry`], and only reads them back through [`decode`].
///
/// [`table_entry`]: PageTableFormat::table_entry
/// [`leaf_entry`]: PageTableFormat::leaf_entry
/// [`decode`]: PageTableFormat::decode
pub trait PageTableFormat {
    /// Format-specific memory attributes of a leaf (memory type, snoop,
    /// shareability, user access, ...).
    type Attrs: Copy + Eq + fmt::Debug;

    /// Number of table levels walked; the root is level `levels() - 1`.
    fn levels(&self) -> u8;
    /// Width of the input address (IOVA / guest-physical address): the engine
    /// refuses IOVAs at or above `1 << input_bits()`.
    fn input_bits(&self) -> u32;
    /// Width of the output (physical) address the entries can hold.
    fn output_bits(&self) -> u32;
    /// The highest level at which the format can place a leaf (0: 4 KiB
    /// only, 1: 2 MiB, 2: 1 GiB). The engine caps this further with
    /// [`super::TableConfig::max_page_size`].
    fn max_leaf_level(&self) -> u8;
    /// Whether the format can express `perms` and `attrs`.
    fn check(&self, perms: MapPerms, attrs: &Self::Attrs) -> Result<(), PageTableError>;
    /// An entry at `level` (>= 1) pointing to the next-level table `table`.
    fn table_entry(&self, level: u8, table: PhysAddr) -> u64;
    /// A leaf entry at `level` mapping `phys` (aligned to the level's size).
    ///
    /// Must be linear in `phys`: `leaf_entry(level, phys + k * size, ..)`
    /// equals `leaf_entry(level, phys, ..) + k * size` for addresses within
    /// the output width (the address is one contiguous field), which lets
    /// the engine fill new tables without re-encoding every entry.
    fn leaf_entry(&self, level: u8, phys: PhysAddr, perms: MapPerms, attrs: &Self::Attrs) -> u64;
    /// Decodes an entry read from a table at `level`.
    fn decode(&self, level: u8, raw: u64) -> Decoded<Self::Attrs>;
    /// Bits of a leaf that hardware may set by itself (accessed/dirty). When
    /// a superpage is split, these are copied into every smaller leaf so that
    /// no access or dirty information is lost.
    fn hardware_managed_bits(&self) -> u64 {
        0
    }
    /// The bit hardware sets in a leaf when a write goes through it, if the
    /// format has one the engine can read and clear for dirty tracking
    /// (VT-d second level with SLADE, first level, NPT, EPT with A/D
    /// enabled in the EPTP). `None`: dirty tracking is not offered.
    fn dirty_bit(&self) -> Option<u64> {
        None
    }
    /// Whether replacing a superpage leaf by a table (a split) must go
    /// through an invalid entry and a TLB invalidation (Arm
    /// break-before-make). x86 formats allow the direct replacement.
    fn split_needs_break_before_make(&self) -> bool {
        false
    }
    /// The parameters the independent walker ([`super::walk`]) needs to walk
    /// tables of this format.
    fn walk_params(&self) -> WalkParams;
}

/// x86 memory types, as encoded in VT-d EMT and EPT memory-type fields
/// (Intel SDM vol. 3A, "Memory Cache Control", memory-type encodings; vol.
/// 3C, "EPT and Memory Typing"; VT-d spec rev 4.0 section 9.8, EMT). Values
/// 2, 3 and 7 are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum X86MemType {
    #[default]
    Uncacheable = 0,
    WriteCombining = 1,
    WriteThrough = 4,
    WriteProtected = 5,
    WriteBack = 6,
}

impl X86MemType {
    pub const fn bits(self) -> u64 {
        self as u64
    }

    pub const fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }
}

/// Arm shareability, the `SH[1:0]` field of VMSAv8-64 descriptors (Arm ARM
/// DDI 0487, "Shareability and cacheability attributes"): 0b01 is
/// reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Shareability {
    NonShareable = 0b00,
    OuterShareable = 0b10,
    #[default]
    InnerShareable = 0b11,
}

impl Shareability {
    pub const fn bits(self) -> u64 {
        self as u64
    }

    pub const fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            0b00 => Some(Self::NonShareable),
            0b10 => Some(Self::OuterShareable),
            0b11 => Some(Self::InnerShareable),
            _ => None,
        }
    }
}
