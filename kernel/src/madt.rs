//! The Multiple APIC Description Table (ACPI 6.5 §5.2.12): which processors
//! exist and how to reach their interrupt controllers.
//!
//! Layout (§5.2.12, table 5.19): the 36-byte SDT header, Local Interrupt
//! Controller Address (u32) at 36, Flags (u32) at 40, then interrupt
//! controller structures from offset 44, each starting with Type (u8) and
//! Length (u8). Firmware wrote these bytes, so every structure is length-
//! checked and a malformed one is an error, never a panic.

use alloc::vec::Vec;
use core::fmt;

use sluice_pci::sdt::{SdtError, SdtHeader, le_u8, le_u32, le_u64, parse_sdt};

pub const MADT_SIGNATURE: &[u8; 4] = b"APIC";

/// Byte offsets of the on-wire structures (ACPI 6.5 §5.2.12.*). Each `LEN`
/// is the structure's minimum length, checked against its last field.
pub mod layout {
    pub mod table {
        pub const LOCAL_APIC_ADDRESS: usize = 36;
        pub const FLAGS: usize = 40;
        pub const FIRST_STRUCTURE: usize = 44;
        const _: () = assert!(FLAGS + 4 == FIRST_STRUCTURE);
    }
    /// Interrupt controller structure types (table 5.21).
    pub mod kind {
        pub const LOCAL_APIC: u8 = 0x00;
        pub const LOCAL_APIC_ADDRESS_OVERRIDE: u8 = 0x05;
        pub const LOCAL_X2APIC: u8 = 0x09;
        pub const GICC: u8 = 0x0b;
        pub const GICD: u8 = 0x0c;
        pub const GICR: u8 = 0x0e;
        pub const GIC_ITS: u8 = 0x0f;
    }
    /// Processor Local APIC (§5.2.12.2).
    pub mod local_apic {
        pub const PROCESSOR_UID: usize = 2;
        pub const APIC_ID: usize = 3;
        pub const FLAGS: usize = 4;
        pub const LEN: usize = 8;
        const _: () = assert!(FLAGS + 4 == LEN);
    }
    /// Local APIC Address Override (§5.2.12.8).
    pub mod address_override {
        pub const ADDRESS: usize = 4;
        pub const LEN: usize = 12;
        const _: () = assert!(ADDRESS + 8 == LEN);
    }
    /// Processor Local x2APIC (§5.2.12.12).
    pub mod x2apic {
        pub const X2APIC_ID: usize = 4;
        pub const FLAGS: usize = 8;
        pub const PROCESSOR_UID: usize = 12;
        pub const LEN: usize = 16;
        const _: () = assert!(PROCESSOR_UID + 4 == LEN);
    }
    /// GIC CPU Interface (§5.2.12.14). ACPI 6.0 defines 80 bytes; later
    /// revisions append fields Sluice does not use.
    pub mod gicc {
        pub const CPU_INTERFACE_NUMBER: usize = 4;
        pub const PROCESSOR_UID: usize = 8;
        pub const FLAGS: usize = 12;
        pub const PHYSICAL_BASE: usize = 32;
        pub const GICR_BASE: usize = 60;
        pub const MPIDR: usize = 68;
        pub const EFFICIENCY_CLASS: usize = 76;
        pub const LEN: usize = 80;
        const _: () = assert!(MPIDR + 8 + 4 == LEN);
    }
    /// GIC Distributor (§5.2.12.15).
    pub mod gicd {
        pub const GIC_ID: usize = 4;
        pub const PHYSICAL_BASE: usize = 8;
        pub const VERSION: usize = 20;
        pub const LEN: usize = 24;
        const _: () = assert!(VERSION + 4 == LEN);
    }
    /// GIC Redistributor (§5.2.12.17).
    pub mod gicr {
        pub const BASE: usize = 4;
        pub const LENGTH: usize = 12;
        pub const LEN: usize = 16;
        const _: () = assert!(LENGTH + 4 == LEN);
    }
    /// GIC Interrupt Translation Service (§5.2.12.18).
    pub mod gic_its {
        pub const ITS_ID: usize = 4;
        pub const PHYSICAL_BASE: usize = 8;
        pub const LEN: usize = 20;
        const _: () = assert!(PHYSICAL_BASE + 8 + 4 == LEN);
    }
}

/// "Enabled", bit 0 of the Local APIC / x2APIC flags (table 5.23) and of
/// the GICC flags (table 5.37).
pub const FLAG_ENABLED: u32 = 1 << 0;
/// "Online Capable": bit 1 for Local APIC / x2APIC (table 5.23)…
pub const APIC_FLAG_ONLINE_CAPABLE: u32 = 1 << 1;
/// …and bit 3 for GICC (table 5.37).
pub const GICC_FLAG_ONLINE_CAPABLE: u32 = 1 << 3;

/// Bits of MPIDR_EL1 that name a processor (Aff3 [39:32], Aff2 [23:16],
/// Aff1 [15:8], Aff0 [7:0]); ACPI requires the others to be zero.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The x2APIC ID that means "all processors", never a processor's own.
const BROADCAST_X2APIC_ID: u32 = u32::MAX;
/// The xAPIC broadcast ID, invalid in a Local APIC structure.
const BROADCAST_APIC_ID: u8 = 0xff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MadtError {
    Table(SdtError),
    /// A structure header runs past the end of the table.
    StructureTruncated {
        offset: usize,
    },
    /// A structure whose length field is shorter than its type requires (a
    /// zero length would also loop forever).
    StructureTooShort {
        offset: usize,
        kind: u8,
        length: u8,
        minimum: usize,
    },
    /// A structure whose length runs past the end of the table.
    StructureOverruns {
        offset: usize,
        kind: u8,
        length: u8,
    },
    /// A processor structure names the broadcast ID.
    BroadcastProcessorId {
        offset: usize,
    },
    /// A GICC's MPIDR has bits set outside the affinity fields.
    BadMpidr {
        offset: usize,
        mpidr: u64,
    },
    /// Two enabled processors with the same hardware ID.
    DuplicateProcessor {
        hw_id: u64,
    },
}

impl From<SdtError> for MadtError {
    fn from(e: SdtError) -> Self {
        Self::Table(e)
    }
}

impl fmt::Display for MadtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Table(e) => write!(f, "MADT rejected: {e}"),
            Self::StructureTruncated { offset } => {
                write!(
                    f,
                    "MADT structure at offset {offset:#x} is cut off by the table's end"
                )
            }
            Self::StructureTooShort {
                offset,
                kind,
                length,
                minimum,
            } => write!(
                f,
                "MADT structure type {kind:#04x} at offset {offset:#x} is {length} bytes, needs at least {minimum}"
            ),
            Self::StructureOverruns {
                offset,
                kind,
                length,
            } => write!(
                f,
                "MADT structure type {kind:#04x} at offset {offset:#x} ({length} bytes) runs past the table's end"
            ),
            Self::BroadcastProcessorId { offset } => write!(
                f,
                "MADT processor structure at offset {offset:#x} names the broadcast APIC ID"
            ),
            Self::BadMpidr { offset, mpidr } => write!(
                f,
                "MADT GICC at offset {offset:#x} has MPIDR {mpidr:#x} with bits outside Aff3..Aff0"
            ),
            Self::DuplicateProcessor { hw_id } => write!(
                f,
                "MADT lists two enabled processors with hardware ID {hw_id:#x}"
            ),
        }
    }
}

/// A Processor Local APIC or Local x2APIC structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalApic {
    pub processor_uid: u32,
    pub apic_id: u32,
    pub flags: u32,
    /// From a Local x2APIC structure (32-bit ID) rather than a Local APIC
    /// one (8-bit ID).
    pub x2apic: bool,
}

impl LocalApic {
    pub const fn enabled(&self) -> bool {
        self.flags & FLAG_ENABLED != 0
    }
    /// Not enabled now, but firmware may bring it online later (hot add).
    pub const fn online_capable(&self) -> bool {
        self.flags & APIC_FLAG_ONLINE_CAPABLE != 0
    }
}

/// A GIC CPU Interface structure: one Arm processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gicc {
    pub cpu_interface_number: u32,
    pub processor_uid: u32,
    pub flags: u32,
    /// GICv2 CPU interface base (0 with GICv3 system registers).
    pub physical_base: u64,
    /// This CPU's redistributor, or 0 when GICR structures describe them.
    pub gicr_base: u64,
    /// MPIDR_EL1 affinity fields: the PSCI CPU_ON target.
    pub mpidr: u64,
    pub efficiency_class: u8,
}

impl Gicc {
    pub const fn enabled(&self) -> bool {
        self.flags & FLAG_ENABLED != 0
    }
    pub const fn online_capable(&self) -> bool {
        self.flags & GICC_FLAG_ONLINE_CAPABLE != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gicd {
    pub gic_id: u32,
    pub physical_base: u64,
    /// 1..=4 for GICv1..v4; 0 means "discover from the hardware".
    pub version: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gicr {
    pub base: u64,
    pub length: u32,
}

/// A GIC ITS: the ID the IORT's ITS groups name it by and its 128 KiB
/// register frames (control, then translation with GITS_TRANSLATER).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicIts {
    pub its_id: u32,
    pub physical_base: u64,
}

/// One interrupt controller structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    LocalApic(LocalApic),
    LocalApicAddressOverride(u64),
    Gicc(Gicc),
    Gicd(Gicd),
    Gicr(Gicr),
    GicIts(GicIts),
    /// A structure Sluice does not decode (I/O APIC, overrides, NMIs, …).
    Other {
        kind: u8,
        bytes: &'a [u8],
    },
}

/// A processor as the rest of Sluice sees it, on either architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Processor {
    pub processor_uid: u32,
    /// The APIC ID (x86) or MPIDR affinity (Arm).
    pub hw_id: u64,
    pub enabled: bool,
    pub online_capable: bool,
}

/// A validated MADT.
#[derive(Debug, Clone, Copy)]
pub struct Madt<'a> {
    pub header: SdtHeader,
    /// The 32-bit local APIC address (x86), before any override.
    pub local_apic_address: u32,
    pub flags: u32,
    table: &'a [u8],
}

impl<'a> Madt<'a> {
    /// Validates the header and checksum and every structure's length.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, MadtError> {
        let (header, table) = parse_sdt(bytes, MADT_SIGNATURE, layout::table::FIRST_STRUCTURE)?;
        let madt = Self {
            header,
            local_apic_address: le_u32(table, layout::table::LOCAL_APIC_ADDRESS).unwrap_or(0),
            flags: le_u32(table, layout::table::FLAGS).unwrap_or(0),
            table,
        };
        for entry in madt.entries() {
            entry?;
        }
        Ok(madt)
    }

    /// The structures in table order; iteration stops after the first error.
    pub fn entries(&self) -> Entries<'a> {
        Entries {
            table: self.table,
            offset: layout::table::FIRST_STRUCTURE,
            failed: false,
        }
    }

    /// The local APIC's physical address: the override's when present.
    pub fn local_apic_base(&self) -> u64 {
        self.entries()
            .filter_map(Result::ok)
            .find_map(|e| match e {
                Entry::LocalApicAddressOverride(address) => Some(address),
                _ => None,
            })
            .unwrap_or(u64::from(self.local_apic_address))
    }

    /// Every processor in table order (Local APIC, x2APIC and GICC
    /// structures). Two enabled processors with one hardware ID are an
    /// error: Sluice could not tell which one it started.
    pub fn processors(&self) -> Result<Vec<Processor>, MadtError> {
        let mut processors: Vec<Processor> = Vec::new();
        for entry in self.entries() {
            let processor = match entry? {
                Entry::LocalApic(apic) => Processor {
                    processor_uid: apic.processor_uid,
                    hw_id: u64::from(apic.apic_id),
                    enabled: apic.enabled(),
                    online_capable: apic.online_capable(),
                },
                Entry::Gicc(gicc) => Processor {
                    processor_uid: gicc.processor_uid,
                    hw_id: gicc.mpidr,
                    enabled: gicc.enabled(),
                    online_capable: gicc.online_capable(),
                },
                _ => continue,
            };
            if processor.enabled
                && processors
                    .iter()
                    .any(|p| p.enabled && p.hw_id == processor.hw_id)
            {
                return Err(MadtError::DuplicateProcessor {
                    hw_id: processor.hw_id,
                });
            }
            processors.push(processor);
        }
        Ok(processors)
    }

    pub fn gicc(&self) -> impl Iterator<Item = Gicc> + 'a {
        self.entries().filter_map(|e| match e {
            Ok(Entry::Gicc(g)) => Some(g),
            _ => None,
        })
    }

    pub fn gicd(&self) -> Option<Gicd> {
        self.entries().find_map(|e| match e {
            Ok(Entry::Gicd(g)) => Some(g),
            _ => None,
        })
    }

    pub fn gicr(&self) -> impl Iterator<Item = Gicr> + 'a {
        self.entries().filter_map(|e| match e {
            Ok(Entry::Gicr(g)) => Some(g),
            _ => None,
        })
    }

    pub fn gic_its(&self) -> impl Iterator<Item = GicIts> + 'a {
        self.entries().filter_map(|e| match e {
            Ok(Entry::GicIts(g)) => Some(g),
            _ => None,
        })
    }
}

/// Iterator over a MADT's structures.
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    table: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, MadtError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.table.len() {
            return None;
        }
        let result = decode(self.table, self.offset);
        match &result {
            Ok((_, length)) => self.offset += length,
            Err(_) => self.failed = true,
        }
        Some(result.map(|(entry, _)| entry))
    }
}

/// Decodes the structure at `offset`, returning it and its length.
fn decode(table: &[u8], offset: usize) -> Result<(Entry<'_>, usize), MadtError> {
    let (Some(kind), Some(length)) = (le_u8(table, offset), le_u8(table, offset + 1)) else {
        return Err(MadtError::StructureTruncated { offset });
    };
    let minimum = match kind {
        layout::kind::LOCAL_APIC => layout::local_apic::LEN,
        layout::kind::LOCAL_APIC_ADDRESS_OVERRIDE => layout::address_override::LEN,
        layout::kind::LOCAL_X2APIC => layout::x2apic::LEN,
        layout::kind::GICC => layout::gicc::LEN,
        layout::kind::GICD => layout::gicd::LEN,
        layout::kind::GICR => layout::gicr::LEN,
        layout::kind::GIC_ITS => layout::gic_its::LEN,
        _ => 2,
    };
    if usize::from(length) < minimum {
        return Err(MadtError::StructureTooShort {
            offset,
            kind,
            length,
            minimum,
        });
    }
    let bytes =
        table
            .get(offset..offset + usize::from(length))
            .ok_or(MadtError::StructureOverruns {
                offset,
                kind,
                length,
            })?;
    // The lengths were checked above, so the field reads below cannot fail;
    // `unwrap_or` keeps that a local fact rather than a panic.
    let u8_at = |o| le_u8(bytes, o).unwrap_or(0);
    let u32_at = |o| le_u32(bytes, o).unwrap_or(0);
    let u64_at = |o| le_u64(bytes, o).unwrap_or(0);
    let entry = match kind {
        layout::kind::LOCAL_APIC => {
            use layout::local_apic as l;
            let apic_id = u8_at(l::APIC_ID);
            let flags = u32_at(l::FLAGS);
            if apic_id == BROADCAST_APIC_ID && flags & FLAG_ENABLED != 0 {
                return Err(MadtError::BroadcastProcessorId { offset });
            }
            Entry::LocalApic(LocalApic {
                processor_uid: u32::from(u8_at(l::PROCESSOR_UID)),
                apic_id: u32::from(apic_id),
                flags,
                x2apic: false,
            })
        }
        layout::kind::LOCAL_X2APIC => {
            use layout::x2apic as l;
            let apic_id = u32_at(l::X2APIC_ID);
            let flags = u32_at(l::FLAGS);
            if apic_id == BROADCAST_X2APIC_ID && flags & FLAG_ENABLED != 0 {
                return Err(MadtError::BroadcastProcessorId { offset });
            }
            Entry::LocalApic(LocalApic {
                processor_uid: u32_at(l::PROCESSOR_UID),
                apic_id,
                flags,
                x2apic: true,
            })
        }
        layout::kind::LOCAL_APIC_ADDRESS_OVERRIDE => {
            Entry::LocalApicAddressOverride(u64_at(layout::address_override::ADDRESS))
        }
        layout::kind::GICC => {
            use layout::gicc as l;
            let mpidr = u64_at(l::MPIDR);
            if mpidr & !MPIDR_AFFINITY_MASK != 0 {
                return Err(MadtError::BadMpidr { offset, mpidr });
            }
            Entry::Gicc(Gicc {
                cpu_interface_number: u32_at(l::CPU_INTERFACE_NUMBER),
                processor_uid: u32_at(l::PROCESSOR_UID),
                flags: u32_at(l::FLAGS),
                physical_base: u64_at(l::PHYSICAL_BASE),
                gicr_base: u64_at(l::GICR_BASE),
                mpidr,
                efficiency_class: u8_at(l::EFFICIENCY_CLASS),
            })
        }
        layout::kind::GICD => {
            use layout::gicd as l;
            Entry::Gicd(Gicd {
                gic_id: u32_at(l::GIC_ID),
                physical_base: u64_at(l::PHYSICAL_BASE),
                version: u8_at(l::VERSION),
            })
        }
        layout::kind::GICR => {
            use layout::gicr as l;
            Entry::Gicr(Gicr {
                base: u64_at(l::BASE),
                length: u32_at(l::LENGTH),
            })
        }
        layout::kind::GIC_ITS => {
            use layout::gic_its as l;
            Entry::GicIts(GicIts {
                its_id: u32_at(l::ITS_ID),
                physical_base: u64_at(l::PHYSICAL_BASE),
            })
        }
        _ => Entry::Other { kind, bytes },
    };
    Ok((entry, bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_pci::sdt::checksum_fixup;

    /// A MADT with `structures` after the fixed part, checksum fixed up.
    fn table(structures: &[&[u8]]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"APIC");
        t.extend_from_slice(&[0; 4]);
        t.push(5); // revision
        t.push(0); // checksum
        t.extend_from_slice(b"SLUICE");
        t.extend_from_slice(b"TESTMADT");
        t.extend_from_slice(&[0; 12]);
        t.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        for s in structures {
            t.extend_from_slice(s);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[9] = checksum_fixup(&t);
        t
    }

    fn local_apic(uid: u8, id: u8, flags: u32) -> Vec<u8> {
        let mut s = vec![0, 8, uid, id];
        s.extend_from_slice(&flags.to_le_bytes());
        s
    }

    fn x2apic(id: u32, flags: u32, uid: u32) -> Vec<u8> {
        let mut s = vec![9, 16, 0, 0];
        s.extend_from_slice(&id.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s.extend_from_slice(&uid.to_le_bytes());
        s
    }

    fn gicc(uid: u32, flags: u32, mpidr: u64, gicr: u64, length: u8) -> Vec<u8> {
        let mut s = vec![0u8; usize::from(length)];
        s[0] = 0x0b;
        s[1] = length;
        s[4..8].copy_from_slice(&uid.to_le_bytes());
        s[8..12].copy_from_slice(&uid.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s[60..68].copy_from_slice(&gicr.to_le_bytes());
        s[68..76].copy_from_slice(&mpidr.to_le_bytes());
        s
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn local_apic_and_x2apic_processors_in_table_order() {
        let io_apic = [1u8, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0];
        let t = table(&[
            &local_apic(0, 0, FLAG_ENABLED),
            &io_apic,
            &local_apic(1, 2, FLAG_ENABLED),
            &local_apic(2, 4, APIC_FLAG_ONLINE_CAPABLE),
            &x2apic(0x1_0000, FLAG_ENABLED, 300),
        ]);
        let madt = Madt::parse(&t).unwrap();
        assert_eq!(madt.local_apic_base(), 0xfee0_0000);
        let p = madt.processors().unwrap();
        let ids: Vec<(u64, bool, bool)> = p
            .iter()
            .map(|p| (p.hw_id, p.enabled, p.online_capable))
            .collect();
        assert_eq!(
            ids,
            [
                (0, true, false),
                (2, true, false),
                (4, false, true),
                (0x1_0000, true, false)
            ]
        );
        assert_eq!(p[3].processor_uid, 300);
        let others = madt
            .entries()
            .filter(|e| matches!(e, Ok(Entry::Other { kind: 1, .. })))
            .count();
        assert_eq!(others, 1, "the I/O APIC is passed through undecoded");
    }

    #[test]
    fn address_override_replaces_the_header_address() {
        let mut o = vec![5u8, 12, 0, 0];
        o.extend_from_slice(&0x1_2345_6000u64.to_le_bytes());
        let t = table(&[&local_apic(0, 0, FLAG_ENABLED), &o]);
        assert_eq!(Madt::parse(&t).unwrap().local_apic_base(), 0x1_2345_6000);
    }

    #[test]
    fn gicc_gicd_gicr_decode() {
        let mut gicd = vec![0x0cu8, 24, 0, 0];
        gicd.extend_from_slice(&0u32.to_le_bytes());
        gicd.extend_from_slice(&0x0800_0000u64.to_le_bytes());
        gicd.extend_from_slice(&0u32.to_le_bytes());
        gicd.extend_from_slice(&[3, 0, 0, 0]);
        let mut gicr = vec![0x0eu8, 16, 0, 0];
        gicr.extend_from_slice(&0x080a_0000u64.to_le_bytes());
        gicr.extend_from_slice(&0xf6_0000u32.to_le_bytes());
        let its = |id: u32, base: u64| {
            let mut its = vec![0x0fu8, 20, 0, 0];
            its.extend_from_slice(&id.to_le_bytes());
            its.extend_from_slice(&base.to_le_bytes());
            its.extend_from_slice(&0u32.to_le_bytes());
            its
        };
        let t = table(&[
            &gicc(0, FLAG_ENABLED, 0, 0, 80),
            // ACPI 6.5 GICCs are 82 bytes; the extra bytes are skipped.
            &gicc(1, FLAG_ENABLED, 0x1_0000_0100, 0x080c_0000, 82),
            &gicc(2, GICC_FLAG_ONLINE_CAPABLE, 0x2, 0, 80),
            &gicd,
            &gicr,
            &its(0, 0x0808_0000),
            &its(7, 0x1_0000_0000),
        ]);
        let madt = Madt::parse(&t).unwrap();
        let g: Vec<Gicc> = madt.gicc().collect();
        assert_eq!(g.len(), 3);
        assert_eq!(g[1].mpidr, 0x1_0000_0100);
        assert_eq!(g[1].gicr_base, 0x080c_0000);
        assert!(g[2].online_capable() && !g[2].enabled());
        assert_eq!(
            madt.gicd(),
            Some(Gicd {
                gic_id: 0,
                physical_base: 0x0800_0000,
                version: 3
            })
        );
        assert_eq!(
            madt.gicr().collect::<Vec<_>>(),
            [Gicr {
                base: 0x080a_0000,
                length: 0xf6_0000
            }]
        );
        assert_eq!(
            madt.gic_its().collect::<Vec<_>>(),
            [
                GicIts {
                    its_id: 0,
                    physical_base: 0x0808_0000
                },
                GicIts {
                    its_id: 7,
                    physical_base: 0x1_0000_0000
                }
            ]
        );
        let p = madt.processors().unwrap();
        assert_eq!(p.iter().filter(|p| p.enabled).count(), 2);
        // An ITS structure shorter than ACPI's 20 bytes is refused.
        let t = table(&[&[0x0fu8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]);
        assert!(matches!(
            Madt::parse(&t),
            Err(MadtError::StructureTooShort {
                kind: 0x0f,
                minimum: 20,
                ..
            })
        ));
    }

    #[test]
    fn malformed_structures_are_errors() {
        // Zero length: would loop forever if accepted.
        let t = table(&[&local_apic(0, 0, 1), &[0x04, 0]]);
        assert_eq!(
            Madt::parse(&t).unwrap_err(),
            MadtError::StructureTooShort {
                offset: 52,
                kind: 4,
                length: 0,
                minimum: 2
            }
        );
        // A Local APIC structure shorter than 8 bytes.
        let t = table(&[&[0u8, 6, 0, 1, 1, 0]]);
        assert!(matches!(
            Madt::parse(&t),
            Err(MadtError::StructureTooShort { kind: 0, .. })
        ));
        // A structure running past the end.
        let mut short_gicc = gicc(0, 1, 0, 0, 80);
        short_gicc.truncate(40);
        let t = table(&[&short_gicc]);
        assert!(matches!(
            Madt::parse(&t),
            Err(MadtError::StructureOverruns { kind: 0x0b, .. })
        ));
        // One trailing byte: no room for a structure header.
        let t = table(&[&local_apic(0, 0, 1), &[0x00]]);
        assert_eq!(
            Madt::parse(&t).unwrap_err(),
            MadtError::StructureTruncated { offset: 52 }
        );
        // Broadcast IDs and non-affinity MPIDR bits.
        let t = table(&[&local_apic(0, 0xff, FLAG_ENABLED)]);
        assert!(matches!(
            Madt::parse(&t),
            Err(MadtError::BroadcastProcessorId { .. })
        ));
        let t = table(&[&x2apic(u32::MAX, FLAG_ENABLED, 0)]);
        assert!(matches!(
            Madt::parse(&t),
            Err(MadtError::BroadcastProcessorId { .. })
        ));
        let t = table(&[&gicc(0, 1, 1 << 24, 0, 80)]);
        assert_eq!(
            Madt::parse(&t).unwrap_err(),
            MadtError::BadMpidr {
                offset: 44,
                mpidr: 1 << 24
            }
        );
        // Duplicate enabled processors; a disabled duplicate is fine.
        let t = table(&[&local_apic(0, 3, 1), &x2apic(3, 1, 9)]);
        assert_eq!(
            Madt::parse(&t).unwrap().processors(),
            Err(MadtError::DuplicateProcessor { hw_id: 3 })
        );
        let t = table(&[&local_apic(0, 3, 1), &local_apic(1, 3, 0)]);
        assert_eq!(Madt::parse(&t).unwrap().processors().unwrap().len(), 2);
        // Header problems.
        let mut t = table(&[&local_apic(0, 0, 1)]);
        t[20] ^= 1;
        assert!(matches!(
            Madt::parse(&t),
            Err(MadtError::Table(SdtError::BadChecksum { .. }))
        ));
        assert!(matches!(
            Madt::parse(&t[..30]),
            Err(MadtError::Table(SdtError::TooShort { .. }))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Every possible truncation and single-byte corruption of a real
        // table either parses or is an error.
        let real = fixture("virt-gicv3-smp4-apic.bin");
        let parsed = Madt::parse(&real).expect("the fixture parses");
        assert_eq!(parsed.gicc().count(), 4);
        for cut in 0..real.len() {
            let mut t = real[..cut].to_vec();
            if t.len() >= 10 {
                let len = t.len() as u32;
                t[4..8].copy_from_slice(&len.to_le_bytes());
                t[9] = checksum_fixup(&t);
            }
            if let Ok(m) = Madt::parse(&t) {
                let _ = m.processors();
            }
        }
        for i in 36..real.len() {
            for value in [0u8, 1, 0x7f, 0xff] {
                let mut t = real.clone();
                t[i] = value;
                t[9] = checksum_fixup(&t);
                if let Ok(m) = Madt::parse(&t) {
                    let _ = m.processors();
                    let _ = m.local_apic_base();
                    let _ = m.gic_its().count();
                    let _ = m.gicr().count();
                }
            }
        }
    }

    #[test]
    fn qemu_q35_with_four_cpus() {
        // Dumped with `cargo xtask run --arch x86_64 --smp 4 --cmdline test=acpi-dump`.
        let bytes = fixture("q35-smp4-apic.bin");
        let madt = Madt::parse(&bytes).unwrap();
        assert_eq!(madt.local_apic_base(), 0xfee0_0000);
        let p = madt.processors().unwrap();
        assert_eq!(
            p.iter()
                .map(|p| (p.processor_uid, p.hw_id))
                .collect::<Vec<_>>(),
            [(0, 0), (1, 1), (2, 2), (3, 3)]
        );
        assert!(p.iter().all(|p| p.enabled));
        assert!(madt.gicd().is_none());
    }

    #[test]
    fn qemu_virt_gicv3_with_four_cpus() {
        // Dumped with `cargo xtask run --arch aarch64 --smp 4 --cmdline test=acpi-dump`.
        let bytes = fixture("virt-gicv3-smp4-apic.bin");
        let madt = Madt::parse(&bytes).unwrap();
        let g: Vec<Gicc> = madt.gicc().collect();
        assert_eq!(g.iter().map(|g| g.mpidr).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(g.iter().all(|g| g.enabled() && g.gicr_base == 0));
        assert_eq!(
            madt.gicd(),
            Some(Gicd {
                gic_id: 0,
                physical_base: 0x0800_0000,
                version: 3
            })
        );
        assert_eq!(
            madt.gicr().collect::<Vec<_>>(),
            [Gicr {
                base: 0x080a_0000,
                length: 0xf6_0000
            }]
        );
        assert_eq!(madt.processors().unwrap().len(), 4);
    }
}
