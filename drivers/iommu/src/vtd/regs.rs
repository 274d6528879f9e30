//! The VT-d remapping-unit register block (VT-d spec rev 4.x, chapter 11
//! "Register Descriptions", table 11-1 "Address Mapping for Remapping
//! Hardware Registers"), as typed registers plus their bit fields.
//!
//! The IOTLB registers and the fault-recording registers live at offsets the
//! unit reports itself (ECAP.IRO, CAP.FRO): see [`iotlb_regs`] and
//! [`fault_record`].

use sluice_hal::{ReadOnly, ReadWrite, Reg32, Reg64, WriteOnly};

/// Version (11.4.1).
pub const VER: Reg32<ReadOnly> = Reg32::new(0x00);
/// Capability (11.4.2).
pub const CAP: Reg64<ReadOnly> = Reg64::new(0x08);
/// Extended capability (11.4.3).
pub const ECAP: Reg64<ReadOnly> = Reg64::new(0x10);
/// Global command (11.4.4.1): write-only, one command at a time.
pub const GCMD: Reg32<WriteOnly> = Reg32::new(0x18);
/// Global status (11.4.4.2).
pub const GSTS: Reg32<ReadOnly> = Reg32::new(0x1c);
/// Root-table address (11.4.5).
pub const RTADDR: Reg64<ReadWrite> = Reg64::new(0x20);
/// Context command (11.4.6.1), register-based context-cache invalidation.
pub const CCMD: Reg64<ReadWrite> = Reg64::new(0x28);
/// Fault status (11.4.7.1).
pub const FSTS: Reg32<ReadWrite> = Reg32::new(0x34);
/// Fault event control (11.4.7.2).
pub const FECTL: Reg32<ReadWrite> = Reg32::new(0x38);
/// Fault event data (11.4.7.3).
pub const FEDATA: Reg32<ReadWrite> = Reg32::new(0x3c);
/// Fault event address (11.4.7.4).
pub const FEADDR: Reg32<ReadWrite> = Reg32::new(0x40);
/// Fault event upper address (11.4.7.5).
pub const FEUADDR: Reg32<ReadWrite> = Reg32::new(0x44);
/// Advanced fault log (11.4.7.7).
pub const AFLOG: Reg64<ReadWrite> = Reg64::new(0x58);
/// Protected memory enable (11.4.8.1).
pub const PMEN: Reg32<ReadWrite> = Reg32::new(0x64);
/// Protected low-memory base / limit, high-memory base / limit (11.4.8).
pub const PLMBASE: Reg32<ReadWrite> = Reg32::new(0x68);
pub const PLMLIMIT: Reg32<ReadWrite> = Reg32::new(0x6c);
pub const PHMBASE: Reg64<ReadWrite> = Reg64::new(0x70);
pub const PHMLIMIT: Reg64<ReadWrite> = Reg64::new(0x78);
/// Invalidation queue head (11.4.9.1): read-only to software.
pub const IQH: Reg64<ReadOnly> = Reg64::new(0x80);
/// Invalidation queue tail (11.4.9.2).
pub const IQT: Reg64<ReadWrite> = Reg64::new(0x88);
/// Invalidation queue address (11.4.9.3).
pub const IQA: Reg64<ReadWrite> = Reg64::new(0x90);
/// Invalidation completion status (11.4.9.4).
pub const ICS: Reg32<ReadWrite> = Reg32::new(0x9c);
/// Invalidation event control / data / address / upper address (11.4.9.5-8).
pub const IECTL: Reg32<ReadWrite> = Reg32::new(0xa0);
pub const IEDATA: Reg32<ReadWrite> = Reg32::new(0xa4);
pub const IEADDR: Reg32<ReadWrite> = Reg32::new(0xa8);
pub const IEUADDR: Reg32<ReadWrite> = Reg32::new(0xac);
/// Invalidation queue error record (11.4.9.9).
pub const IQERCD: Reg64<ReadOnly> = Reg64::new(0xb0);
/// Interrupt remapping table address (11.4.10.1).
pub const IRTA: Reg64<ReadWrite> = Reg64::new(0xb8);

/// The IOTLB register pair of a unit: the invalidate-address register at
/// `ECAP.IRO * 16` and the IOTLB invalidate register 8 bytes further
/// (11.4.6.2-3).
pub const fn iotlb_regs(iotlb_offset: usize) -> (Reg64<ReadWrite>, Reg64<ReadWrite>) {
    (Reg64::new(iotlb_offset), Reg64::new(iotlb_offset + 8))
}

/// Fault-recording register `index` (11.4.7.6): 128 bits at
/// `CAP.FRO * 16 + index * 16`; returns (low, high) halves.
pub const fn fault_record(fro_offset: usize, index: usize) -> (Reg64<ReadOnly>, Reg64<ReadWrite>) {
    let low: Reg64<ReadOnly> = Reg64::new(fro_offset).at(index, 16);
    let high: Reg64<ReadWrite> = Reg64::new(fro_offset + 8).at(index, 16);
    (low, high)
}

/// GCMD / GSTS bits (11.4.4): each command bit has its status bit at the
/// same position.
pub mod global {
    /// TE / TES: translation enable.
    pub const TRANSLATION_ENABLE: u32 = 1 << 31;
    /// SRTP / RTPS: set root-table pointer (one-shot).
    pub const SET_ROOT_TABLE: u32 = 1 << 30;
    /// SFL / FLS: set fault log (one-shot).
    pub const SET_FAULT_LOG: u32 = 1 << 29;
    /// EAFL / AFLS: advanced fault logging.
    pub const ADVANCED_FAULT_LOG: u32 = 1 << 28;
    /// WBF / WBFS: write-buffer flush (one-shot; WBFS reads 1 while the
    /// flush is in progress).
    pub const WRITE_BUFFER_FLUSH: u32 = 1 << 27;
    /// QIE / QIES: queued invalidation enable.
    pub const QUEUED_INVALIDATION: u32 = 1 << 26;
    /// IRE / IRES: interrupt remapping enable.
    pub const INTERRUPT_REMAPPING: u32 = 1 << 25;
    /// SIRTP / IRTPS: set interrupt remapping table pointer (one-shot).
    pub const SET_INTERRUPT_TABLE: u32 = 1 << 24;
    /// CFI / CFIS: compatibility-format interrupts.
    pub const COMPAT_FORMAT_INTERRUPTS: u32 = 1 << 23;
    /// The status bits that describe persistent state, as opposed to the
    /// one-shot commands (SRTP, SFL, WBF, SIRTP) whose status bits must not
    /// be written back: spec 11.4.4.1 tells software to start every GCMD
    /// write from `GSTS & 0x96FF_FFFF`.
    pub const PERSISTENT_STATUS_MASK: u32 = 0x96ff_ffff;
}

/// RTADDR bits (11.4.5).
pub mod rtaddr {
    /// TTM: translation-table mode, bits 11:10.
    pub const TTM_SHIFT: u32 = 10;
    pub const TTM_MASK: u64 = 0b11 << TTM_SHIFT;
    pub const TTM_LEGACY: u64 = 0b00;
    pub const TTM_SCALABLE: u64 = 0b01;
    pub const TTM_ABORT_DMA: u64 = 0b11;
    pub const ADDRESS_MASK: u64 = !0xfff;
}

/// IRTA bits (11.4.10.1).
pub mod irta {
    /// S, bits 3:0: the table holds 2^(S + 1) entries.
    pub const SIZE_MASK: u64 = 0xf;
    /// EIME: extended (x2APIC) interrupt mode, 32-bit destination IDs.
    pub const EIME: u64 = 1 << 11;
    pub const ADDRESS_MASK: u64 = !0xfff;
}

/// CCMD bits (11.4.6.1).
pub mod ccmd {
    /// ICC: set by software to start, cleared by hardware when done.
    pub const ICC: u64 = 1 << 63;
    /// CIRG: requested granularity, bits 62:61.
    pub const CIRG_SHIFT: u32 = 61;
    /// CAIG: actual granularity, bits 60:59.
    pub const CAIG_SHIFT: u32 = 59;
    /// FM: function mask, bits 33:32.
    pub const FM_SHIFT: u32 = 32;
    /// SID: bits 31:16.
    pub const SID_SHIFT: u32 = 16;
    /// DID: bits 15:0.
    pub const DID_MASK: u64 = 0xffff;
    pub const GRANULARITY_GLOBAL: u64 = 0b01;
    pub const GRANULARITY_DOMAIN: u64 = 0b10;
    pub const GRANULARITY_DEVICE: u64 = 0b11;
}

/// IOTLB invalidate register bits (11.4.6.3) and invalidate-address
/// register bits (11.4.6.2).
pub mod iotlb {
    /// IVT: set by software to start, cleared by hardware when done.
    pub const IVT: u64 = 1 << 63;
    /// IIRG: requested granularity, bits 61:60.
    pub const IIRG_SHIFT: u32 = 60;
    /// IAIG: actual granularity, bits 58:57.
    pub const IAIG_SHIFT: u32 = 57;
    /// DR / DW: drain reads / writes (with CAP.DRD / CAP.DWD).
    pub const DRAIN_READS: u64 = 1 << 49;
    pub const DRAIN_WRITES: u64 = 1 << 48;
    /// DID: bits 47:32.
    pub const DID_SHIFT: u32 = 32;
    pub const GRANULARITY_GLOBAL: u64 = 0b01;
    pub const GRANULARITY_DOMAIN: u64 = 0b10;
    pub const GRANULARITY_PAGE: u64 = 0b11;
    /// IVA: AM bits 5:0, IH bit 6, ADDR bits 63:12.
    pub const IVA_AM_MASK: u64 = 0x3f;
    pub const IVA_IH: u64 = 1 << 6;
}

/// FSTS bits (11.4.7.1).
pub mod fsts {
    /// PFO: primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// PPF: primary pending fault (read-only OR of all F bits).
    pub const PPF: u32 = 1 << 1;
    /// AFO / APF: advanced fault overflow / pending (RW1C).
    pub const AFO: u32 = 1 << 2;
    pub const APF: u32 = 1 << 3;
    /// IQE: invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// ICE: invalidation completion error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// ITE: invalidation time-out error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// FRI: fault record index, bits 15:8.
    pub const FRI_SHIFT: u32 = 8;
    pub const FRI_MASK: u32 = 0xff << FRI_SHIFT;
    /// Every write-1-to-clear bit.
    pub const W1C_MASK: u32 = PFO | AFO | APF | IQE | ICE | ITE;
}

/// FECTL / IECTL bits (11.4.7.2, 11.4.9.5).
pub mod event_control {
    /// IM: interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// IP: interrupt pending.
    pub const IP: u32 = 1 << 30;
}

/// Invalidation queue registers (11.4.9).
pub mod queue {
    /// IQH / IQT: the head/tail index sits in bits 18:4 (the byte offset of
    /// a 128-bit descriptor).
    pub const INDEX_SHIFT: u32 = 4;
    pub const INDEX_MASK: u64 = 0x7fff0;
    /// IQA: QS bits 2:0 (queue is 2^QS pages), DW bit 11 (256-bit
    /// descriptors), base address bits 63:12.
    pub const IQA_QS_MASK: u64 = 0b111;
    pub const IQA_DW_256: u64 = 1 << 11;
    pub const IQA_ADDRESS_MASK: u64 = !0xfff;
    /// ICS: IWC, invalidation wait descriptor complete (RW1C).
    pub const ICS_IWC: u32 = 1;
    /// IQERCD: IQEI bits 3:0, ITESID bits 47:32, ICESID bits 63:48.
    pub const IQERCD_IQEI_MASK: u64 = 0xf;
    pub const IQERCD_ITESID_SHIFT: u32 = 32;
    pub const IQERCD_ICESID_SHIFT: u32 = 48;
}

/// Fault-recording register bits (11.4.7.6), in the high 64-bit half.
pub mod frcd {
    /// F: fault (RW1C).
    pub const F: u64 = 1 << 63;
    /// T1: type bit 1 (0 write, 1 read/AtomicOp).
    pub const T1: u64 = 1 << 62;
    /// AT: address type, bits 61:60.
    pub const AT_SHIFT: u32 = 60;
    /// PV: PASID value, bits 59:40.
    pub const PV_SHIFT: u32 = 40;
    pub const PV_MASK: u64 = 0xf_ffff;
    /// FR: fault reason, bits 39:32.
    pub const FR_SHIFT: u32 = 32;
    /// PP: PASID present.
    pub const PP: u64 = 1 << 31;
    /// EXE: execute requested.
    pub const EXE: u64 = 1 << 30;
    /// PRIV: privileged-mode requested.
    pub const PRIV: u64 = 1 << 29;
    /// T2: type bit 2 (rev 3.x+: distinguishes page requests / atomics).
    pub const T2: u64 = 1 << 28;
    /// SID: bits 15:0.
    pub const SID_MASK: u64 = 0xffff;
    /// FI (low half): page address of the faulting request, bits 63:12.
    pub const FI_MASK: u64 = !0xfff;
}
