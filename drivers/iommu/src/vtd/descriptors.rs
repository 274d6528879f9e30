//! Queued-invalidation descriptors (VT-d spec rev 4.x, 6.5.2), 128-bit
//! format (IQA.DW = 0).
//!
//! Every descriptor carries its type in bits 3:0 (and bits 11:9, zero for
//! all types used here). Fields are placed with `const fn` constructors; the
//! register model decodes them with its own code.

use sluice_hal::PhysAddr;

/// Descriptor types (6.5.2, table "Invalidation Descriptor Types").
pub mod kind {
    pub const CONTEXT_CACHE: u64 = 0x1;
    pub const IOTLB: u64 = 0x2;
    pub const DEVICE_TLB: u64 = 0x3;
    pub const INTERRUPT_ENTRY_CACHE: u64 = 0x4;
    pub const WAIT: u64 = 0x5;
    pub const PASID_IOTLB: u64 = 0x6;
    pub const PASID_CACHE: u64 = 0x7;
    pub const PASID_DEVICE_TLB: u64 = 0x8;
}

/// Granularity of a PASID-cache invalidation (6.5.2.2, G bits 5:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PasidCacheGranularity {
    /// Every PASID entry cached with the DID.
    Domain = 0b00,
    /// The entry of one PASID with the DID.
    Pasid = 0b01,
    /// Everything.
    Global = 0b11,
}

/// Granularity of a PASID-based IOTLB invalidation (6.5.2.4, G bits 5:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PasidIotlbGranularity {
    /// Every mapping (and paging-structure cache) of the PASID in the DID.
    Pasid = 0b10,
    /// The pages of ADDR/AM of the PASID in the DID.
    Page = 0b11,
}

/// One 128-bit invalidation descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor([u64; 2]);
const _: () = assert!(core::mem::size_of::<Descriptor>() == 16);

const fn did_at_16(did: u16) -> u64 {
    (did as u64) << 16
}

impl Descriptor {
    pub const fn from_words(words: [u64; 2]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 2] {
        self.0
    }
    /// The type (bits 3:0 and 11:9).
    pub const fn kind(&self) -> u64 {
        (self.0[0] & 0xf) | ((self.0[0] >> 5) & 0x70)
    }

    // ---- context-cache invalidate (6.5.2.1) ----
    // bits 5:4 G (01 global, 10 domain, 11 device), 31:16 DID, 47:32 SID,
    // 49:48 FM.

    pub const fn context_global() -> Self {
        Self([kind::CONTEXT_CACHE | (0b01 << 4), 0])
    }
    pub const fn context_domain(did: u16) -> Self {
        Self([kind::CONTEXT_CACHE | (0b10 << 4) | did_at_16(did), 0])
    }
    /// Device-selective: the context entry of `sid` (with function mask
    /// `fm`, 0 = exact) cached with `did`.
    pub const fn context_device(did: u16, sid: u16, fm: u8) -> Self {
        Self([
            kind::CONTEXT_CACHE
                | (0b11 << 4)
                | did_at_16(did)
                | ((sid as u64) << 32)
                | ((fm as u64 & 0b11) << 48),
            0,
        ])
    }

    // ---- IOTLB invalidate (6.5.2.3) ----
    // bits 5:4 G (01 global, 10 domain, 11 page), bit 6 DW, bit 7 DR, 31:16
    // DID; high: 5:0 AM, 6 IH, 63:12 ADDR.

    const fn drain(drain: bool) -> u64 {
        if drain { (1 << 6) | (1 << 7) } else { 0 }
    }
    pub const fn iotlb_global(drain: bool) -> Self {
        Self([kind::IOTLB | (0b01 << 4) | Self::drain(drain), 0])
    }
    pub const fn iotlb_domain(did: u16, drain: bool) -> Self {
        Self([
            kind::IOTLB | (0b10 << 4) | Self::drain(drain) | did_at_16(did),
            0,
        ])
    }
    /// Page-selective: the `2^am` pages at `addr` (aligned to their size);
    /// `ih` keeps the paging-structure caches (only leaves changed).
    pub const fn iotlb_page(did: u16, addr: u64, am: u8, ih: bool, drain: bool) -> Self {
        Self([
            kind::IOTLB | (0b11 << 4) | Self::drain(drain) | did_at_16(did),
            (addr & !0xfff) | (if ih { 1 << 6 } else { 0 }) | (am as u64 & 0x3f),
        ])
    }

    // ---- device-TLB invalidate (6.5.2.5) ----
    // bits 15:12 PFSID[3:0], 20:16 MIP, 47:32 SID, 63:52 PFSID[15:4];
    // high: bit 0 S, 63:12 ADDR.

    /// Invalidates `range` in the ATS cache of the device `sid` (physical
    /// function `pfsid`, invalidate queue depth hint `mip`).
    pub const fn device_tlb(sid: u16, pfsid: u16, mip: u8, range: DeviceTlbRange) -> Self {
        Self([
            kind::DEVICE_TLB
                | ((pfsid as u64 & 0xf) << 12)
                | ((mip as u64 & 0x1f) << 16)
                | ((sid as u64) << 32)
                | ((pfsid as u64 >> 4) << 52),
            range.encoded(),
        ])
    }

    // ---- interrupt-entry-cache invalidate (6.5.2.7) ----
    // bit 4 G (0 global, 1 index-selective), 31:27 IM, 47:32 IIDX.

    pub const fn interrupt_entries_global() -> Self {
        Self([kind::INTERRUPT_ENTRY_CACHE, 0])
    }
    pub const fn interrupt_entries(index: u16, index_mask: u8) -> Self {
        Self([
            kind::INTERRUPT_ENTRY_CACHE
                | (1 << 4)
                | ((index_mask as u64 & 0x1f) << 27)
                | ((index as u64) << 32),
            0,
        ])
    }

    // ---- invalidation wait (6.5.2.8) ----
    // bit 4 IF, bit 5 SW, bit 6 FN, bit 7 PD, 63:32 status data; high: 63:2
    // status address.

    /// Writes `data` to `status` once every earlier descriptor completed;
    /// with `fence`, later descriptors wait for it.
    pub const fn wait(status: PhysAddr, data: u32, fence: bool) -> Self {
        Self([
            kind::WAIT | (1 << 5) | (if fence { 1 << 6 } else { 0 }) | ((data as u64) << 32),
            status.as_u64() & !0b11,
        ])
    }
    /// A wait without status write or interrupt: a harmless no-op, used to
    /// overwrite a descriptor the hardware rejected.
    pub const fn nop() -> Self {
        Self([kind::WAIT, 0])
    }

    // ---- PASID-cache invalidate (6.5.2.2) ----
    // bits 5:4 G, 31:16 DID, 51:32 PASID.

    pub const fn pasid_cache(granularity: PasidCacheGranularity, did: u16, pasid: u32) -> Self {
        Self([
            kind::PASID_CACHE
                | ((granularity as u64) << 4)
                | did_at_16(did)
                | ((pasid as u64 & 0xf_ffff) << 32),
            0,
        ])
    }

    // ---- PASID-based IOTLB invalidate (6.5.2.4) ----
    // bits 5:4 G, 31:16 DID, 51:32 PASID; high: 5:0 AM, 6 IH, 63:12 ADDR.

    pub const fn pasid_iotlb(
        granularity: PasidIotlbGranularity,
        did: u16,
        pasid: u32,
        addr: u64,
        am: u8,
        ih: bool,
    ) -> Self {
        let high = match granularity {
            PasidIotlbGranularity::Pasid => 0,
            PasidIotlbGranularity::Page => {
                (addr & !0xfff) | (if ih { 1 << 6 } else { 0 }) | (am as u64 & 0x3f)
            }
        };
        Self([
            kind::PASID_IOTLB
                | ((granularity as u64) << 4)
                | did_at_16(did)
                | ((pasid as u64 & 0xf_ffff) << 32),
            high,
        ])
    }

    // ---- PASID-based device-TLB invalidate (6.5.2.6) ----
    // bits 8:4 MIP, 15:12 PFSID[3:0], 31:16 SID, 51:32 PASID, 63:52
    // PFSID[15:4]; high: bit 0 G (global: all PASIDs), bit 11 S, 63:12 ADDR.

    pub const fn pasid_device_tlb(
        sid: u16,
        pfsid: u16,
        mip: u8,
        pasid: u32,
        range: DeviceTlbRange,
    ) -> Self {
        let encoded = range.encoded();
        Self([
            kind::PASID_DEVICE_TLB
                | ((mip as u64 & 0x1f) << 4)
                | ((pfsid as u64 & 0xf) << 12)
                | ((sid as u64) << 16)
                | ((pasid as u64 & 0xf_ffff) << 32)
                | ((pfsid as u64 >> 4) << 52),
            // Same ADDR/size encoding, with S in bit 11 instead of bit 0.
            (encoded & !0xfff) | ((encoded & 1) << 11),
        ])
    }
}

/// The address range of a device-TLB invalidation (6.5.2.5): with S = 0 one
/// 4 KiB page; with S = 1 the size is encoded in the address: the lowest
/// clear bit at or above bit 12 marks the size (bit 12 clear: 8 KiB, bits 12
/// set and 13 clear: 16 KiB, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTlbRange {
    /// Aligned to its size.
    pub addr: u64,
    /// log2 of the number of 4 KiB pages (0..=51).
    pub order: u8,
}

impl DeviceTlbRange {
    /// Every translation the device caches.
    pub const ALL: Self = Self { addr: 0, order: 51 };

    pub const fn encoded(self) -> u64 {
        if self.order == 0 {
            self.addr & !0xfff
        } else {
            let ones = ((1u64 << (self.order - 1)) - 1) << 12;
            ((self.addr & !0xfff) | ones) | 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_fields_follow_the_spec_layout() {
        assert_eq!(Descriptor::context_global().words(), [0x11, 0]);
        assert_eq!(Descriptor::context_domain(5).words(), [0x21 | (5 << 16), 0]);
        assert_eq!(
            Descriptor::context_device(5, 0x0108, 0).words(),
            [0x31 | (5 << 16) | (0x0108 << 32), 0]
        );
        assert_eq!(Descriptor::iotlb_global(true).words(), [0x12 | 0xc0, 0]);
        assert_eq!(
            Descriptor::iotlb_domain(3, false).words(),
            [0x22 | (3 << 16), 0]
        );
        assert_eq!(
            Descriptor::iotlb_page(3, 0x20_0000, 9, true, false).words(),
            [0x32 | (3 << 16), 0x20_0000 | 0x40 | 9]
        );
        let wait = Descriptor::wait(PhysAddr::new(0x1_0000_0040), 0xabcd, true);
        assert_eq!(wait.words(), [0x65 | (0xabcd << 32), 0x1_0000_0040]);
        assert_eq!(wait.kind(), kind::WAIT);
        assert_eq!(
            Descriptor::pasid_cache(PasidCacheGranularity::Pasid, 2, 0x12345).words(),
            [0x17 | (2 << 16) | (0x12345 << 32), 0]
        );
        assert_eq!(
            Descriptor::pasid_iotlb(PasidIotlbGranularity::Page, 2, 7, 0x4000, 1, false).words(),
            [0x36 | (2 << 16) | (7 << 32), 0x4001]
        );
        assert_eq!(
            Descriptor::interrupt_entries(0x10, 2).words(),
            [0x14 | (2 << 27) | (0x10 << 32), 0]
        );
    }

    #[test]
    fn device_tlb_size_is_encoded_in_the_address() {
        assert_eq!(
            DeviceTlbRange {
                addr: 0x5000,
                order: 0
            }
            .encoded(),
            0x5000
        );
        // 8 KiB: S=1, bit 12 clear.
        assert_eq!(
            DeviceTlbRange {
                addr: 0x4000,
                order: 1
            }
            .encoded(),
            0x4001
        );
        // 2 MiB (order 9): bits 12..=19 set, bit 20 clear.
        assert_eq!(
            DeviceTlbRange {
                addr: 0x20_0000,
                order: 9
            }
            .encoded(),
            0x20_0000 | 0xf_f000 | 1
        );
        let d = Descriptor::device_tlb(
            0x0100,
            0x0100,
            0,
            DeviceTlbRange {
                addr: 0x4000,
                order: 1,
            },
        );
        assert_eq!(d.words(), [0x3 | (0x0100 << 32) | (0x010 << 52), 0x4001]);
        let p = Descriptor::pasid_device_tlb(
            0x0100,
            0x0100,
            0,
            3,
            DeviceTlbRange {
                addr: 0x4000,
                order: 1,
            },
        );
        assert_eq!(p.words()[1], 0x4000 | (1 << 11));
        assert_eq!(p.kind(), kind::PASID_DEVICE_TLB);
    }
}
