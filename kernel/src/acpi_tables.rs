//! Finding firmware's ACPI tables (through the `acpi` crate, which checks
//! signatures and checksums) and handing their bytes to the parsers.
//!
//! Sluice runs on an identity map, so "mapping" a table is taking its
//! physical address as a pointer. ACPI tables live in memory the frame
//! allocator never hands out (ACPI reclaim/NVS), so their bytes stay valid
//! for Sluice's life.

use alloc::vec::Vec;
use core::ptr::NonNull;

use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};

#[derive(Clone, Copy, Debug)]
pub struct IdentityHandler;

#[repr(C, align(16))]
struct ZeroTable([u8; 4096]);

static NULL_TABLE: ZeroTable = ZeroTable([0; 4096]);

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // A null pointer (a corrupt XSDT entry) reads as zeros, which no
        // signature or checksum check accepts, so the table is skipped.
        let (virtual_start, mapped) = match NonNull::new(physical_address as *mut T) {
            Some(pointer) => (pointer, size),
            None => (
                NonNull::from(&NULL_TABLE).cast::<T>(),
                size.min(NULL_TABLE.0.len()),
            ),
        };
        // SAFETY: physical memory is identity-mapped; the `acpi` crate only
        // reads regions firmware described as tables (or the zero block).
        unsafe { PhysicalMapping::new(physical_address, virtual_start, size, mapped, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

macro_rules! raw_table {
    ($name:ident, $signature:ident) => {
        /// A table found by signature and handed to our own parser as bytes.
        #[repr(C, packed)]
        pub struct $name {
            header: SdtHeader,
        }

        // SAFETY: the struct is exactly the common header, which every table
        // with this signature begins with.
        unsafe impl AcpiTable for $name {
            const SIGNATURE: Signature = Signature::$signature;
            fn header(&self) -> &SdtHeader {
                &self.header
            }
        }
    };
}

raw_table!(RawDmar, DMAR);
raw_table!(RawIort, IORT);
raw_table!(RawMcfg, MCFG);
raw_table!(RawMadt, MADT);
raw_table!(RawSpcr, SPCR);

/// One entry of the table list in the boot log.
#[derive(Debug, Clone, Copy)]
pub struct TableSummary {
    pub signature: [u8; 4],
    pub oem_id: [u8; 6],
    pub revision: u8,
    pub length: u32,
}

impl TableSummary {
    pub fn signature_str(&self) -> &str {
        core::str::from_utf8(&self.signature).unwrap_or("????")
    }
    pub fn oem_str(&self) -> &str {
        core::str::from_utf8(&self.oem_id)
            .unwrap_or("??????")
            .trim_end()
    }
}

pub struct Acpi {
    tables: AcpiTables<IdentityHandler>,
}

impl Acpi {
    /// # Safety
    /// `rsdp` must be the RSDP address firmware published.
    pub unsafe fn from_rsdp(rsdp: u64) -> Result<Self, acpi::AcpiError> {
        // SAFETY: the caller vouches for the address; the crate validates it.
        let tables = unsafe { AcpiTables::from_rsdp(IdentityHandler, rsdp as usize)? };
        Ok(Self { tables })
    }

    pub fn summaries(&self) -> Vec<TableSummary> {
        self.tables
            .headers()
            .map(|h| TableSummary {
                signature: h
                    .signature
                    .as_str()
                    .as_bytes()
                    .try_into()
                    .unwrap_or(*b"????"),
                oem_id: h.oem_id,
                revision: h.revision,
                length: h.length,
            })
            .collect()
    }

    /// The whole table with `T`'s signature, checksum verified, as bytes.
    pub fn raw<T: AcpiTable>(&self) -> Option<&'static [u8]> {
        let mapping = self.tables.find_table::<T>().ok()?;
        let header: &SdtHeader = mapping.get().get_ref().header();
        let length = { header.length } as usize;
        let start = mapping.physical_start();
        // SAFETY: the table is `length` bytes at `start` (checksum verified
        // over that length by `find_table`), identity-mapped and never
        // reused while Sluice runs.
        Some(unsafe { core::slice::from_raw_parts(start as *const u8, length) })
    }

    pub fn fadt(&self) -> Option<PhysicalMapping<IdentityHandler, acpi::fadt::Fadt>> {
        self.tables.find_table::<acpi::fadt::Fadt>().ok()
    }

    pub fn spcr(&self) -> Option<PhysicalMapping<IdentityHandler, acpi::spcr::Spcr>> {
        self.tables.find_table::<acpi::spcr::Spcr>().ok()
    }

    /// QEMU's ACPI tables carry the OEM ID "BOCHS ".
    pub fn is_qemu(&self) -> bool {
        self.fadt()
            .is_some_and(|fadt| fadt.header().oem_id == *b"BOCHS ")
    }
}

impl core::fmt::Debug for Acpi {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Acpi")
    }
}
