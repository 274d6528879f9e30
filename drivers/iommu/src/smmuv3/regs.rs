//! The SMMUv3 register block (Arm IHI 0070, chapter 6 "Memory map and
//! registers": 6.2 register map, 6.3 register formats), as typed registers
//! plus their bit fields.
//!
//! The Non-secure programming interface occupies two 64 KiB pages: page 0
//! holds control, identification and the queue base / command-queue
//! registers; page 1 (at +0x10000) holds the Event- and PRI-queue PROD/CONS
//! pointers (6.2, "SMMUv3_PAGE_1").

use sluice_hal::{ReadOnly, ReadWrite, Reg32, Reg64};

/// Offset of register page 1 from the base (6.2).
pub const PAGE1: usize = 0x1_0000;
/// Bytes of register space a Non-secure SMMUv3 interface needs (pages 0 and
/// 1).
pub const REGISTER_SPAN: usize = 2 * PAGE1;

/// Identification registers 0-5 (6.3.1-6.3.6).
pub const IDR0: Reg32<ReadOnly> = Reg32::new(0x00);
pub const IDR1: Reg32<ReadOnly> = Reg32::new(0x04);
pub const IDR2: Reg32<ReadOnly> = Reg32::new(0x08);
pub const IDR3: Reg32<ReadOnly> = Reg32::new(0x0c);
pub const IDR4: Reg32<ReadOnly> = Reg32::new(0x10);
pub const IDR5: Reg32<ReadOnly> = Reg32::new(0x14);
/// Implementation identification (6.3.7).
pub const IIDR: Reg32<ReadOnly> = Reg32::new(0x18);
/// Architecture version (6.3.8).
pub const AIDR: Reg32<ReadOnly> = Reg32::new(0x1c);
/// Global control 0 and its acknowledgement (6.3.9-6.3.10).
pub const CR0: Reg32<ReadWrite> = Reg32::new(0x20);
pub const CR0ACK: Reg32<ReadOnly> = Reg32::new(0x24);
/// Global control 1: table and queue memory attributes (6.3.11).
pub const CR1: Reg32<ReadWrite> = Reg32::new(0x28);
/// Global control 2 (6.3.12).
pub const CR2: Reg32<ReadWrite> = Reg32::new(0x2c);
/// Status (6.3.13).
pub const STATUSR: Reg32<ReadOnly> = Reg32::new(0x40);
/// Global bypass attributes (6.3.14): what happens to traffic while
/// SMMUEN = 0.
pub const GBPA: Reg32<ReadWrite> = Reg32::new(0x44);
/// Interrupt control and its acknowledgement (6.3.16-6.3.17).
pub const IRQ_CTRL: Reg32<ReadWrite> = Reg32::new(0x50);
pub const IRQ_CTRLACK: Reg32<ReadOnly> = Reg32::new(0x54);
/// Global errors and their acknowledgement (6.3.18-6.3.19): an error is
/// active while a GERROR bit differs from the same GERRORN bit.
pub const GERROR: Reg32<ReadOnly> = Reg32::new(0x60);
pub const GERRORN: Reg32<ReadWrite> = Reg32::new(0x64);
/// Global-error MSI address, data and attributes (6.3.20-6.3.22).
pub const GERROR_IRQ_CFG0: Reg64<ReadWrite> = Reg64::new(0x68);
pub const GERROR_IRQ_CFG1: Reg32<ReadWrite> = Reg32::new(0x70);
pub const GERROR_IRQ_CFG2: Reg32<ReadWrite> = Reg32::new(0x74);
/// Stream table base and configuration (6.3.24-6.3.25).
pub const STRTAB_BASE: Reg64<ReadWrite> = Reg64::new(0x80);
pub const STRTAB_BASE_CFG: Reg32<ReadWrite> = Reg32::new(0x88);
/// Command queue base, producer and consumer (6.3.26-6.3.28).
pub const CMDQ_BASE: Reg64<ReadWrite> = Reg64::new(0x90);
pub const CMDQ_PROD: Reg32<ReadWrite> = Reg32::new(0x98);
pub const CMDQ_CONS: Reg32<ReadWrite> = Reg32::new(0x9c);
/// Event queue base (6.3.29).
pub const EVENTQ_BASE: Reg64<ReadWrite> = Reg64::new(0xa0);
/// Event queue producer and consumer, in page 1 (6.3.30-6.3.31).
pub const EVENTQ_PROD: Reg32<ReadWrite> = Reg32::new(PAGE1 + 0xa8);
pub const EVENTQ_CONS: Reg32<ReadWrite> = Reg32::new(PAGE1 + 0xac);
/// Event-queue MSI address, data and attributes (6.3.32-6.3.34).
pub const EVENTQ_IRQ_CFG0: Reg64<ReadWrite> = Reg64::new(0xb0);
pub const EVENTQ_IRQ_CFG1: Reg32<ReadWrite> = Reg32::new(0xb8);
pub const EVENTQ_IRQ_CFG2: Reg32<ReadWrite> = Reg32::new(0xbc);

/// SMMU_CR0 / SMMU_CR0ACK bits (6.3.9): each enable has its
/// acknowledgement at the same position in CR0ACK.
pub mod cr0 {
    pub const SMMUEN: u32 = 1 << 0;
    pub const PRIQEN: u32 = 1 << 1;
    pub const EVENTQEN: u32 = 1 << 2;
    pub const CMDQEN: u32 = 1 << 3;
    pub const ATSCHK: u32 = 1 << 4;
    /// VMW, bits 8:6: VMID wildcard.
    pub const VMW_SHIFT: u32 = 6;
}

/// SMMU_CR1 fields (6.3.11): cacheability and shareability of the
/// SMMU's own accesses to the stream/CD tables and to the queues.
pub mod cr1 {
    pub const QUEUE_IC_SHIFT: u32 = 0;
    pub const QUEUE_OC_SHIFT: u32 = 2;
    pub const QUEUE_SH_SHIFT: u32 = 4;
    pub const TABLE_IC_SHIFT: u32 = 6;
    pub const TABLE_OC_SHIFT: u32 = 8;
    pub const TABLE_SH_SHIFT: u32 = 10;
    /// Cacheability encodings (IC/OC fields).
    pub const NON_CACHEABLE: u32 = 0b00;
    pub const WRITE_BACK: u32 = 0b01;
    pub const WRITE_THROUGH: u32 = 0b10;
    /// Shareability encodings (SH fields). With both IC and OC
    /// non-cacheable, SH is ignored and behaves as Outer Shareable.
    pub const NON_SHAREABLE: u32 = 0b00;
    pub const OUTER_SHAREABLE: u32 = 0b10;
    pub const INNER_SHAREABLE: u32 = 0b11;

    /// The CR1 value giving tables and queues the same attributes.
    pub const fn uniform(cache: u32, share: u32) -> u32 {
        (cache << QUEUE_IC_SHIFT)
            | (cache << QUEUE_OC_SHIFT)
            | (share << QUEUE_SH_SHIFT)
            | (cache << TABLE_IC_SHIFT)
            | (cache << TABLE_OC_SHIFT)
            | (share << TABLE_SH_SHIFT)
    }
}

/// SMMU_CR2 bits (6.3.12).
pub mod cr2 {
    /// E2H: EL2 StreamWorld uses the E2H regime.
    pub const E2H: u32 = 1 << 0;
    /// RECINVSID: record C_BAD_STREAMID for StreamIDs outside the table.
    pub const RECINVSID: u32 = 1 << 1;
    /// PTM: private TLB maintenance (broadcast TLBIs from CPUs ignored).
    pub const PTM: u32 = 1 << 2;
}

/// SMMU_GBPA fields (6.3.14).
pub mod gbpa {
    /// UPDATE: written 1 together with new field values; reads 1 until the
    /// SMMU has applied them. Fields are only changed by such a write.
    pub const UPDATE: u32 = 1 << 31;
    /// ABORT: traffic arriving while SMMUEN = 0 is aborted (otherwise it
    /// bypasses with the attributes below).
    pub const ABORT: u32 = 1 << 20;
    /// INSTCFG 19:18, PRIVCFG 17:16, SHCFG 13:12, ALLOCCFG 11:8, MTCFG 4,
    /// MemAttr 3:0: bypass attribute overrides.
    pub const SHCFG_SHIFT: u32 = 12;
    /// SHCFG = 0b01: use the incoming shareability.
    pub const SHCFG_INCOMING: u32 = 0b01 << SHCFG_SHIFT;
}

/// SMMU_IRQ_CTRL / IRQ_CTRLACK bits (6.3.16).
pub mod irq_ctrl {
    pub const GERROR_IRQEN: u32 = 1 << 0;
    pub const PRIQ_IRQEN: u32 = 1 << 1;
    pub const EVENTQ_IRQEN: u32 = 1 << 2;
}

/// SMMU_GERROR / GERRORN bits (6.3.18).
pub mod gerror {
    /// CMDQ_ERR: the command queue stopped on an error (CMDQ_CONS.ERR).
    pub const CMDQ_ERR: u32 = 1 << 0;
    /// EVENTQ_ABT_ERR: an event-queue write was aborted.
    pub const EVENTQ_ABT_ERR: u32 = 1 << 2;
    /// PRIQ_ABT_ERR: a PRI-queue write was aborted.
    pub const PRIQ_ABT_ERR: u32 = 1 << 3;
    /// MSI_*_ABT_ERR: an MSI write (CMD_SYNC, event queue, PRI queue,
    /// GERROR) was aborted.
    pub const MSI_CMDQ_ABT_ERR: u32 = 1 << 4;
    pub const MSI_EVENTQ_ABT_ERR: u32 = 1 << 5;
    pub const MSI_PRIQ_ABT_ERR: u32 = 1 << 6;
    pub const MSI_GERROR_ABT_ERR: u32 = 1 << 7;
    /// SFM_ERR: the SMMU entered service failure mode.
    pub const SFM_ERR: u32 = 1 << 8;
    /// Every error bit defined by SMMUv3.0-3.2.
    pub const ALL: u32 = CMDQ_ERR
        | EVENTQ_ABT_ERR
        | PRIQ_ABT_ERR
        | MSI_CMDQ_ABT_ERR
        | MSI_EVENTQ_ABT_ERR
        | MSI_PRIQ_ABT_ERR
        | MSI_GERROR_ABT_ERR
        | SFM_ERR;
}

/// SMMU_STRTAB_BASE / STRTAB_BASE_CFG fields (6.3.24-6.3.25).
pub mod strtab {
    /// RA: read-allocate hint.
    pub const RA: u64 = 1 << 62;
    /// ADDR, bits 51:6.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_ffc0;
    /// LOG2SIZE, bits 5:0: log2 of the number of StreamIDs covered.
    pub const LOG2SIZE_MASK: u32 = 0x3f;
    /// SPLIT, bits 10:6: StreamID bits resolved by the level-2 tables
    /// (6, 8 or 10).
    pub const SPLIT_SHIFT: u32 = 6;
    /// FMT, bits 17:16: 0b00 linear, 0b01 2-level.
    pub const FMT_SHIFT: u32 = 16;
    pub const FMT_LINEAR: u32 = 0b00;
    pub const FMT_2LEVEL: u32 = 0b01;
}

/// Command/Event queue base and pointer fields (6.3.26-6.3.31).
pub mod queue {
    /// RA (command queue) / WA (event queue): allocation hint, bit 62.
    pub const ALLOCATE_HINT: u64 = 1 << 62;
    /// ADDR, bits 51:5.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_ffe0;
    /// LOG2SIZE, bits 4:0: log2 of the number of entries.
    pub const LOG2SIZE_MASK: u64 = 0x1f;
    /// PROD.WR / CONS.RD: the index in bits LOG2SIZE-1:0 and the wrap
    /// flag in bit LOG2SIZE, within bits 19:0.
    pub const POINTER_MASK: u32 = 0xf_ffff;
    /// CMDQ_CONS.ERR, bits 30:24 (7.1).
    pub const CONS_ERR_SHIFT: u32 = 24;
    pub const CONS_ERR_MASK: u32 = 0x7f << CONS_ERR_SHIFT;
    /// EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG, bit 31: records were
    /// lost while the two differ.
    pub const OVERFLOW: u32 = 1 << 31;
    /// CMDQ_CONS.ERR codes (7.1).
    pub const CERROR_NONE: u32 = 0x00;
    pub const CERROR_ILL: u32 = 0x01;
    pub const CERROR_ABT: u32 = 0x02;
    pub const CERROR_ATC_INV_SYNC: u32 = 0x03;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_register_map() {
        assert_eq!(CR0.offset(), 0x20);
        assert_eq!(GBPA.offset(), 0x44);
        assert_eq!(GERRORN.offset(), 0x64);
        assert_eq!(STRTAB_BASE_CFG.offset(), 0x88);
        assert_eq!(CMDQ_CONS.offset(), 0x9c);
        assert_eq!(EVENTQ_PROD.offset(), 0x100a8);
        assert_eq!(EVENTQ_CONS.offset(), 0x100ac);
        assert_eq!(EVENTQ_IRQ_CFG2.offset(), 0xbc);
    }

    #[test]
    fn cr1_uniform_places_every_field() {
        let v = cr1::uniform(cr1::WRITE_BACK, cr1::INNER_SHAREABLE);
        assert_eq!(v, 0b11_01_01_11_01_01);
        assert_eq!(
            cr1::uniform(cr1::NON_CACHEABLE, cr1::OUTER_SHAREABLE),
            0b10_00_00_10_00_00
        );
    }
}
