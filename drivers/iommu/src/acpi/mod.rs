//! ACPI tables that describe IOMMUs: the DMAR (Intel VT-d) and the IORT
//! (Arm). Both parsers take the whole table as bytes, header included, and
//! never trust a length, offset or count in it: fields are decoded from
//! bytes at checked offsets (no references into packed data), and problems
//! in one structure are collected alongside whatever else parsed.

pub mod dmar;
pub mod iort;

pub use sluice_pci::sdt::{SDT_HEADER_LEN, SdtError, SdtHeader, checksum_fixup};
