//! The virtual machine control block (AMD APM vol. 2, appendix B): the
//! control area (table B-1, offsets 0x000–0x3FF) and the state-save area
//! (table B-2, at offset 0x400), with the intercept, clean-bit, event and
//! segment-attribute encodings of chapter 15.

use super::super::{EntryState, Segment, cr};

/// Defines a `u32`/`u64` bit-set newtype with named bits.
macro_rules! bit_set {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($raw:ty) {
            $( $(#[$bmeta:meta])* const $bit:ident = $value:expr; )*
        }
    ) => {
        $(#[$meta])*
        #[repr(transparent)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
        pub struct $name(pub $raw);

        impl $name {
            $( $(#[$bmeta])* pub const $bit: Self = Self($value); )*
            pub const fn empty() -> Self {
                Self(0)
            }
            pub const fn bits(self) -> $raw {
                self.0
            }
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
        }
    };
}

bit_set! {
    /// Intercept vector 3 (VMCB offset 0x00C), APM vol. 2 table B-1.
    pub struct InterceptMisc1(u32) {
        const INTR = 1 << 0;
        const NMI = 1 << 1;
        const SMI = 1 << 2;
        const INIT = 1 << 3;
        const VINTR = 1 << 4;
        const CR0_SELECTIVE_WRITE = 1 << 5;
        const IDTR_READ = 1 << 6;
        const GDTR_READ = 1 << 7;
        const LDTR_READ = 1 << 8;
        const TR_READ = 1 << 9;
        const IDTR_WRITE = 1 << 10;
        const GDTR_WRITE = 1 << 11;
        const LDTR_WRITE = 1 << 12;
        const TR_WRITE = 1 << 13;
        const RDTSC = 1 << 14;
        const RDPMC = 1 << 15;
        const PUSHF = 1 << 16;
        const POPF = 1 << 17;
        const CPUID = 1 << 18;
        const RSM = 1 << 19;
        const IRET = 1 << 20;
        const INTN = 1 << 21;
        const INVD = 1 << 22;
        const PAUSE = 1 << 23;
        const HLT = 1 << 24;
        const INVLPG = 1 << 25;
        const INVLPGA = 1 << 26;
        /// Consult the IOPM for IN/OUT/INS/OUTS.
        const IOIO_PROT = 1 << 27;
        /// Consult the MSRPM for RDMSR/WRMSR.
        const MSR_PROT = 1 << 28;
        const TASK_SWITCH = 1 << 29;
        const FERR_FREEZE = 1 << 30;
        /// Shutdown (triple fault) in the guest.
        const SHUTDOWN = 1 << 31;
    }
}

bit_set! {
    /// Intercept vector 4 (VMCB offset 0x010), APM vol. 2 table B-1.
    pub struct InterceptMisc2(u32) {
        /// Must be set: VMRUN with it clear fails the consistency checks
        /// (APM vol. 2, 15.5.1).
        const VMRUN = 1 << 0;
        const VMMCALL = 1 << 1;
        const VMLOAD = 1 << 2;
        const VMSAVE = 1 << 3;
        const STGI = 1 << 4;
        const CLGI = 1 << 5;
        const SKINIT = 1 << 6;
        const RDTSCP = 1 << 7;
        const ICEBP = 1 << 8;
        /// WBINVD and WBNOINVD.
        const WBINVD = 1 << 9;
        const MONITOR = 1 << 10;
        const MWAIT = 1 << 11;
        const MWAIT_CONDITIONAL = 1 << 12;
        const XSETBV = 1 << 13;
        const RDPRU = 1 << 14;
        const EFER_WRITE_TRAP = 1 << 15;
    }
}

bit_set! {
    /// VMCB clean bits (offset 0x0C0), APM vol. 2 15.15.3: a set bit tells
    /// the processor that the group of fields is unchanged since the last
    /// VMRUN with this VMCB and may be taken from its cache.
    pub struct CleanBits(u32) {
        /// Intercept vectors, TSC offset, pause-filter fields.
        const INTERCEPTS = 1 << 0;
        /// IOPM_BASE, MSRPM_BASE.
        const IOPM = 1 << 1;
        const ASID = 1 << 2;
        /// V_TPR, V_IRQ, V_INTR_* fields.
        const TPR = 1 << 3;
        /// NP_ENABLE, N_CR3, G_PAT.
        const NP = 1 << 4;
        /// CR0, CR3, CR4, EFER.
        const CRX = 1 << 5;
        const DRX = 1 << 6;
        /// GDTR, IDTR.
        const DT = 1 << 7;
        /// CS, DS, SS, ES, CPL.
        const SEG = 1 << 8;
        const CR2 = 1 << 9;
        /// DbgCtlMsr, br_from/to, lastint_from/to.
        const LBR = 1 << 10;
        const AVIC = 1 << 11;
    }
}

impl CleanBits {
    /// Every group the processor defines so far.
    pub const ALL: Self = Self(0xfff);
}

/// TLB_CONTROL values (VMCB offset 0x05C), APM vol. 2 15.16.1.
pub mod tlb_control {
    pub const DO_NOTHING: u8 = 0x00;
    pub const FLUSH_ALL: u8 = 0x01;
    /// Needs CPUID Fn8000_000A EDX FlushByAsid.
    pub const FLUSH_GUEST: u8 = 0x03;
    pub const FLUSH_GUEST_NON_GLOBAL: u8 = 0x07;
}

/// EVENTINJ / EXITINTINFO format (APM vol. 2, 15.20): vector 7:0, type
/// 10:8, EV (error code valid) 11, V (valid) 31, error code 63:32.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventInjection(pub u64);

/// EVENTINJ.TYPE values.
pub mod event_type {
    pub const INTR: u8 = 0;
    pub const NMI: u8 = 2;
    pub const EXCEPTION: u8 = 3;
    pub const SOFTWARE_INTERRUPT: u8 = 4;
}

impl EventInjection {
    pub const VALID: u64 = 1 << 31;
    pub const ERROR_CODE_VALID: u64 = 1 << 11;

    pub const fn new(vector: u8, typ: u8, error_code: Option<u32>) -> Self {
        let ev = match error_code {
            Some(code) => Self::ERROR_CODE_VALID | ((code as u64) << 32),
            None => 0,
        };
        Self(vector as u64 | (((typ & 7) as u64) << 8) | ev | Self::VALID)
    }
    pub const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }
    pub const fn vector(self) -> u8 {
        self.0 as u8
    }
    pub const fn typ(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    pub const fn error_code(self) -> Option<u32> {
        if self.0 & Self::ERROR_CODE_VALID != 0 {
            Some((self.0 >> 32) as u32)
        } else {
            None
        }
    }
}

/// A segment register in the state-save area: selector, packed
/// attributes, limit, base (APM vol. 2, table B-2; attributes per 15.5.1:
/// bits 7:0 are descriptor bits 47:40, bits 11:8 descriptor bits 55:52).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmcbSegment {
    pub selector: u16,
    pub attributes: u16,
    pub limit: u32,
    pub base: u64,
}

const _: () = assert!(core::mem::size_of::<VmcbSegment>() == 16);

impl VmcbSegment {
    pub const fn new(selector: u16, attributes: u16, limit: u32, base: u64) -> Self {
        Self {
            selector,
            attributes,
            limit,
            base,
        }
    }

    /// Packs a [`Segment`] (the limit is the byte-granular effective limit,
    /// as the VMCB holds it).
    pub const fn from_segment(s: &Segment) -> Self {
        Self {
            selector: s.selector,
            attributes: s.access_byte() as u16 | ((s.flags_nibble() as u16) << 8),
            limit: s.limit,
            base: s.base,
        }
    }

    /// Unpacks into a [`Segment`].
    pub const fn to_segment(&self) -> Segment {
        let a = self.attributes;
        Segment {
            selector: self.selector,
            base: self.base,
            limit: self.limit,
            typ: (a & 0xf) as u8,
            code_or_data: a & (1 << 4) != 0,
            dpl: ((a >> 5) & 3) as u8,
            present: a & (1 << 7) != 0,
            available: a & (1 << 8) != 0,
            long: a & (1 << 9) != 0,
            default_big: a & (1 << 10) != 0,
            granularity: a & (1 << 11) != 0,
        }
    }
}

/// The control area, VMCB offsets 0x000–0x3FF (APM vol. 2, table B-1).
/// Fields Sluice does not use (AVIC, SEV) are kept as reserved bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlArea {
    /// 0x000: bits 15:0 intercept CR0–15 reads, bits 31:16 writes.
    pub intercept_cr: u32,
    /// 0x004: bits 15:0 intercept DR0–15 reads, bits 31:16 writes.
    pub intercept_dr: u32,
    /// 0x008: one bit per exception vector.
    pub intercept_exceptions: u32,
    /// 0x00C.
    pub intercept_misc1: InterceptMisc1,
    /// 0x010.
    pub intercept_misc2: InterceptMisc2,
    /// 0x014: INVLPGB, INVPCID, MCOMMIT, TLBSYNC intercepts.
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x24],
    /// 0x03C.
    pub pause_filter_threshold: u16,
    /// 0x03E.
    pub pause_filter_count: u16,
    /// 0x040: physical base of the 12 KiB I/O permission map.
    pub iopm_base_pa: u64,
    /// 0x048: physical base of the 8 KiB MSR permission map.
    pub msrpm_base_pa: u64,
    /// 0x050.
    pub tsc_offset: u64,
    /// 0x058: guest ASID (0 is the host's and illegal here).
    pub guest_asid: u32,
    /// 0x05C.
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// 0x060: V_TPR 7:0, V_IRQ 8, V_INTR_PRIO 19:16, V_IGN_TPR 20,
    /// V_INTR_MASKING 24, V_INTR_VECTOR 39:32.
    pub virtual_interrupt: u64,
    /// 0x068: bit 0 INTERRUPT_SHADOW, bit 1 GUEST_INTERRUPT_MASK.
    pub interrupt_shadow: u64,
    /// 0x070.
    pub exit_code: u64,
    /// 0x078.
    pub exit_info1: u64,
    /// 0x080.
    pub exit_info2: u64,
    /// 0x088: an event being delivered when the exit happened.
    pub exit_int_info: EventInjection,
    /// 0x090: bit 0 NP_ENABLE (SEV bits above).
    pub nested_control: u64,
    /// 0x098: AVIC APIC_BAR.
    pub avic_apic_bar: u64,
    /// 0x0A0: guest physical address of the GHCB (SEV-ES).
    pub ghcb_gpa: u64,
    /// 0x0A8.
    pub event_injection: EventInjection,
    /// 0x0B0: nested page-table root (N_CR3).
    pub n_cr3: u64,
    /// 0x0B8: bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub virtualization_extensions: u64,
    /// 0x0C0.
    pub clean_bits: CleanBits,
    _reserved_0c4: u32,
    /// 0x0C8: next sequential instruction pointer (NRIPS).
    pub next_rip: u64,
    /// 0x0D0: number of guest instruction bytes fetched (decode assists).
    pub instruction_bytes_fetched: u8,
    /// 0x0D1–0x0DF.
    pub instruction_bytes: [u8; 15],
    /// 0x0E0–0x3DF: AVIC pointers, VMSA pointer and other fields Sluice
    /// leaves zero.
    _reserved_0e0: [u8; 0x300],
    /// 0x3E0–0x3FF: reserved for the host's own use.
    pub host_reserved: [u8; 0x20],
}

/// NP_ENABLE in [`ControlArea::nested_control`].
pub const NP_ENABLE: u64 = 1 << 0;
/// INTERRUPT_SHADOW in [`ControlArea::interrupt_shadow`].
pub const INTERRUPT_SHADOW: u64 = 1 << 0;
/// V_IRQ in [`ControlArea::virtual_interrupt`].
pub const V_IRQ: u64 = 1 << 8;
/// V_INTR_MASKING in [`ControlArea::virtual_interrupt`].
pub const V_INTR_MASKING: u64 = 1 << 24;

/// The state-save area, VMCB offsets 0x400–0xFFF (APM vol. 2, table B-2;
/// offsets below are from the start of the area).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSaveArea {
    /// 0x000.
    pub es: VmcbSegment,
    /// 0x010.
    pub cs: VmcbSegment,
    /// 0x020.
    pub ss: VmcbSegment,
    /// 0x030.
    pub ds: VmcbSegment,
    /// 0x040.
    pub fs: VmcbSegment,
    /// 0x050.
    pub gs: VmcbSegment,
    /// 0x060: only base and limit are used.
    pub gdtr: VmcbSegment,
    /// 0x070.
    pub ldtr: VmcbSegment,
    /// 0x080: only base and limit are used.
    pub idtr: VmcbSegment,
    /// 0x090.
    pub tr: VmcbSegment,
    _reserved_0a0: [u8; 0x2b],
    /// 0x0CB.
    pub cpl: u8,
    _reserved_0cc: u32,
    /// 0x0D0.
    pub efer: u64,
    _reserved_0d8: [u8; 0x70],
    /// 0x148.
    pub cr4: u64,
    /// 0x150.
    pub cr3: u64,
    /// 0x158.
    pub cr0: u64,
    /// 0x160.
    pub dr7: u64,
    /// 0x168.
    pub dr6: u64,
    /// 0x170.
    pub rflags: u64,
    /// 0x178.
    pub rip: u64,
    _reserved_180: [u8; 0x58],
    /// 0x1D8.
    pub rsp: u64,
    /// 0x1E0–0x1F7: shadow-stack state (S_CET, SSP, ISST_ADDR), unused.
    _reserved_1e0: [u64; 3],
    /// 0x1F8.
    pub rax: u64,
    /// 0x200.
    pub star: u64,
    /// 0x208.
    pub lstar: u64,
    /// 0x210.
    pub cstar: u64,
    /// 0x218.
    pub sfmask: u64,
    /// 0x220.
    pub kernel_gs_base: u64,
    /// 0x228.
    pub sysenter_cs: u64,
    /// 0x230.
    pub sysenter_esp: u64,
    /// 0x238.
    pub sysenter_eip: u64,
    /// 0x240.
    pub cr2: u64,
    _reserved_248: [u8; 0x20],
    /// 0x268: guest PAT, used by nested paging.
    pub g_pat: u64,
    /// 0x270.
    pub dbgctl: u64,
    /// 0x278.
    pub br_from: u64,
    /// 0x280.
    pub br_to: u64,
    /// 0x288.
    pub last_exception_from: u64,
    /// 0x290.
    pub last_exception_to: u64,
    _reserved_298: [u8; 0xc00 - 0x298],
}

/// One VMCB: a 4 KiB-aligned page.
#[repr(C, align(4096))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vmcb {
    pub control: ControlArea,
    pub save: StateSaveArea,
}

macro_rules! assert_offset {
    ($ty:ty, $field:ident, $offset:expr) => {
        const _: () = assert!(core::mem::offset_of!($ty, $field) == $offset);
    };
}

const _: () = assert!(core::mem::size_of::<ControlArea>() == 0x400);
const _: () = assert!(core::mem::size_of::<StateSaveArea>() == 0xc00);
const _: () = assert!(core::mem::size_of::<Vmcb>() == 4096);
const _: () = assert!(core::mem::align_of::<Vmcb>() == 4096);
assert_offset!(Vmcb, save, 0x400);
assert_offset!(ControlArea, intercept_cr, 0x000);
assert_offset!(ControlArea, intercept_dr, 0x004);
assert_offset!(ControlArea, intercept_exceptions, 0x008);
assert_offset!(ControlArea, intercept_misc1, 0x00c);
assert_offset!(ControlArea, intercept_misc2, 0x010);
assert_offset!(ControlArea, intercept_misc3, 0x014);
assert_offset!(ControlArea, pause_filter_threshold, 0x03c);
assert_offset!(ControlArea, pause_filter_count, 0x03e);
assert_offset!(ControlArea, iopm_base_pa, 0x040);
assert_offset!(ControlArea, msrpm_base_pa, 0x048);
assert_offset!(ControlArea, tsc_offset, 0x050);
assert_offset!(ControlArea, guest_asid, 0x058);
assert_offset!(ControlArea, tlb_control, 0x05c);
assert_offset!(ControlArea, virtual_interrupt, 0x060);
assert_offset!(ControlArea, interrupt_shadow, 0x068);
assert_offset!(ControlArea, exit_code, 0x070);
assert_offset!(ControlArea, exit_info1, 0x078);
assert_offset!(ControlArea, exit_info2, 0x080);
assert_offset!(ControlArea, exit_int_info, 0x088);
assert_offset!(ControlArea, nested_control, 0x090);
assert_offset!(ControlArea, avic_apic_bar, 0x098);
assert_offset!(ControlArea, ghcb_gpa, 0x0a0);
assert_offset!(ControlArea, event_injection, 0x0a8);
assert_offset!(ControlArea, n_cr3, 0x0b0);
assert_offset!(ControlArea, virtualization_extensions, 0x0b8);
assert_offset!(ControlArea, clean_bits, 0x0c0);
assert_offset!(ControlArea, next_rip, 0x0c8);
assert_offset!(ControlArea, instruction_bytes_fetched, 0x0d0);
assert_offset!(ControlArea, instruction_bytes, 0x0d1);
assert_offset!(ControlArea, host_reserved, 0x3e0);
assert_offset!(StateSaveArea, es, 0x000);
assert_offset!(StateSaveArea, cs, 0x010);
assert_offset!(StateSaveArea, ss, 0x020);
assert_offset!(StateSaveArea, ds, 0x030);
assert_offset!(StateSaveArea, fs, 0x040);
assert_offset!(StateSaveArea, gs, 0x050);
assert_offset!(StateSaveArea, gdtr, 0x060);
assert_offset!(StateSaveArea, ldtr, 0x070);
assert_offset!(StateSaveArea, idtr, 0x080);
assert_offset!(StateSaveArea, tr, 0x090);
assert_offset!(StateSaveArea, cpl, 0x0cb);
assert_offset!(StateSaveArea, efer, 0x0d0);
assert_offset!(StateSaveArea, cr4, 0x148);
assert_offset!(StateSaveArea, cr3, 0x150);
assert_offset!(StateSaveArea, cr0, 0x158);
assert_offset!(StateSaveArea, dr7, 0x160);
assert_offset!(StateSaveArea, dr6, 0x168);
assert_offset!(StateSaveArea, rflags, 0x170);
assert_offset!(StateSaveArea, rip, 0x178);
assert_offset!(StateSaveArea, rsp, 0x1d8);
assert_offset!(StateSaveArea, rax, 0x1f8);
assert_offset!(StateSaveArea, star, 0x200);
assert_offset!(StateSaveArea, lstar, 0x208);
assert_offset!(StateSaveArea, cstar, 0x210);
assert_offset!(StateSaveArea, sfmask, 0x218);
assert_offset!(StateSaveArea, kernel_gs_base, 0x220);
assert_offset!(StateSaveArea, sysenter_cs, 0x228);
assert_offset!(StateSaveArea, sysenter_esp, 0x230);
assert_offset!(StateSaveArea, sysenter_eip, 0x238);
assert_offset!(StateSaveArea, cr2, 0x240);
assert_offset!(StateSaveArea, g_pat, 0x268);
assert_offset!(StateSaveArea, dbgctl, 0x270);
assert_offset!(StateSaveArea, last_exception_to, 0x290);

impl ControlArea {
    pub const fn zeroed() -> Self {
        Self {
            intercept_cr: 0,
            intercept_dr: 0,
            intercept_exceptions: 0,
            intercept_misc1: InterceptMisc1::empty(),
            intercept_misc2: InterceptMisc2::empty(),
            intercept_misc3: 0,
            _reserved_018: [0; 0x24],
            pause_filter_threshold: 0,
            pause_filter_count: 0,
            iopm_base_pa: 0,
            msrpm_base_pa: 0,
            tsc_offset: 0,
            guest_asid: 0,
            tlb_control: 0,
            _reserved_05d: [0; 3],
            virtual_interrupt: 0,
            interrupt_shadow: 0,
            exit_code: 0,
            exit_info1: 0,
            exit_info2: 0,
            exit_int_info: EventInjection(0),
            nested_control: 0,
            avic_apic_bar: 0,
            ghcb_gpa: 0,
            event_injection: EventInjection(0),
            n_cr3: 0,
            virtualization_extensions: 0,
            clean_bits: CleanBits::empty(),
            _reserved_0c4: 0,
            next_rip: 0,
            instruction_bytes_fetched: 0,
            instruction_bytes: [0; 15],
            _reserved_0e0: [0; 0x300],
            host_reserved: [0; 0x20],
        }
    }
}

impl StateSaveArea {
    pub const fn zeroed() -> Self {
        let z = VmcbSegment::new(0, 0, 0, 0);
        Self {
            es: z,
            cs: z,
            ss: z,
            ds: z,
            fs: z,
            gs: z,
            gdtr: z,
            ldtr: z,
            idtr: z,
            tr: z,
            _reserved_0a0: [0; 0x2b],
            cpl: 0,
            _reserved_0cc: 0,
            efer: 0,
            _reserved_0d8: [0; 0x70],
            cr4: 0,
            cr3: 0,
            cr0: 0,
            dr7: 0,
            dr6: 0,
            rflags: 0,
            rip: 0,
            _reserved_180: [0; 0x58],
            rsp: 0,
            _reserved_1e0: [0; 3],
            rax: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            cr2: 0,
            _reserved_248: [0; 0x20],
            g_pat: 0,
            dbgctl: 0,
            br_from: 0,
            br_to: 0,
            last_exception_from: 0,
            last_exception_to: 0,
            _reserved_298: [0; 0xc00 - 0x298],
        }
    }
}

/// The intercepts every Sluice guest runs with.
///
/// * physical INTR/NMI/SMI/INIT: the host owns the machine;
/// * CPUID (Sluice shapes what guests see), HLT, INVD (never let a guest
///   drop dirty lines), WBINVD (the iommufd WBINVD policy decides),
///   SHUTDOWN;
/// * IOIO_PROT and MSR_PROT: the permission maps decide per port / MSR;
/// * every SVM instruction (VMRUN is mandatory), MONITOR/MWAIT.
///
/// XSETBV is not intercepted: the run loop switches XCR0 around VMRUN.
pub const SLUICE_INTERCEPTS: (InterceptMisc1, InterceptMisc2) = (
    InterceptMisc1(
        InterceptMisc1::INTR.0
            | InterceptMisc1::NMI.0
            | InterceptMisc1::SMI.0
            | InterceptMisc1::INIT.0
            | InterceptMisc1::CPUID.0
            | InterceptMisc1::INVD.0
            | InterceptMisc1::HLT.0
            | InterceptMisc1::IOIO_PROT.0
            | InterceptMisc1::MSR_PROT.0
            | InterceptMisc1::SHUTDOWN.0,
    ),
    InterceptMisc2(
        InterceptMisc2::VMRUN.0
            | InterceptMisc2::VMMCALL.0
            | InterceptMisc2::VMLOAD.0
            | InterceptMisc2::VMSAVE.0
            | InterceptMisc2::STGI.0
            | InterceptMisc2::CLGI.0
            | InterceptMisc2::SKINIT.0
            | InterceptMisc2::ICEBP.0
            | InterceptMisc2::WBINVD.0
            | InterceptMisc2::MONITOR.0
            | InterceptMisc2::MWAIT.0
            | InterceptMisc2::MWAIT_CONDITIONAL.0,
    ),
);

/// Machine checks (vector 18) always go to the host.
pub const SLUICE_EXCEPTION_INTERCEPTS: u32 = 1 << 18;

/// Where a new vCPU's VMCB points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmcbSetup {
    pub asid: u32,
    pub iopm_base_pa: u64,
    pub msrpm_base_pa: u64,
    /// Nested page-table root; 0 leaves nested paging off.
    pub n_cr3: u64,
}

impl Vmcb {
    pub const fn zeroed() -> Self {
        Self {
            control: ControlArea::zeroed(),
            save: StateSaveArea::zeroed(),
        }
    }

    /// A VMCB that enters the guest at `entry` with Sluice's intercepts.
    /// EFER.SVME is added (VMRUN requires it in the guest image) and CPL is
    /// 0: the direct-boot protocol enters the guest kernel.
    pub const fn for_entry(entry: &EntryState, setup: &VmcbSetup) -> Self {
        let mut vmcb = Self::zeroed();
        let c = &mut vmcb.control;
        c.intercept_misc1 = SLUICE_INTERCEPTS.0;
        c.intercept_misc2 = SLUICE_INTERCEPTS.1;
        c.intercept_exceptions = SLUICE_EXCEPTION_INTERCEPTS;
        c.iopm_base_pa = setup.iopm_base_pa;
        c.msrpm_base_pa = setup.msrpm_base_pa;
        c.guest_asid = setup.asid;
        // The first VMRUN with a new ASID must not see stale entries.
        c.tlb_control = tlb_control::FLUSH_ALL;
        // Physical interrupts stay the host's even when the guest has IF=1.
        c.virtual_interrupt = V_INTR_MASKING;
        if setup.n_cr3 != 0 {
            c.nested_control = NP_ENABLE;
            c.n_cr3 = setup.n_cr3;
        }
        // Everything is new: nothing may come from a VMCB cache.
        c.clean_bits = CleanBits::empty();

        let s = &mut vmcb.save;
        s.es = VmcbSegment::from_segment(&entry.es);
        s.cs = VmcbSegment::from_segment(&entry.cs);
        s.ss = VmcbSegment::from_segment(&entry.ss);
        s.ds = VmcbSegment::from_segment(&entry.ds);
        s.fs = VmcbSegment::from_segment(&entry.fs);
        s.gs = VmcbSegment::from_segment(&entry.gs);
        s.tr = VmcbSegment::from_segment(&entry.tr);
        s.ldtr = VmcbSegment::from_segment(&entry.ldtr);
        s.gdtr = VmcbSegment::new(0, 0, entry.gdtr.limit as u32, entry.gdtr.base);
        s.idtr = VmcbSegment::new(0, 0, entry.idtr.limit as u32, entry.idtr.base);
        s.cpl = 0;
        s.efer = entry.efer | cr::EFER_SVME;
        s.cr0 = entry.cr0;
        s.cr3 = entry.cr3;
        s.cr4 = entry.cr4;
        // DR6/DR7 reset values (SDM vol. 3, 18.2.3-4; APM vol. 2, 13.1).
        s.dr6 = 0xffff_0ff0;
        s.dr7 = 0x400;
        s.rflags = entry.registers.rflags;
        s.rip = entry.registers.rip;
        s.rsp = entry.registers.gprs[super::super::gpr::RSP];
        s.rax = entry.registers.gprs[super::super::gpr::RAX];
        s.g_pat = entry.pat;
        vmcb
    }
}

/// A VMRUN consistency check the VMCB fails (APM vol. 2, 15.5.1,
/// "Canonicalization and Consistency Checks"); the processor would exit
/// with `VMEXIT_INVALID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsistencyError {
    SvmeClear,
    Cr0CdClearNwSet,
    Cr0HighBits,
    Cr3ReservedBits,
    Cr4ReservedBits,
    DebugHighBits,
    EferReservedBits,
    LongModeWithoutPae,
    LongModeWithoutProtection,
    LongCodeSegmentWithDefaultBig,
    VmrunNotIntercepted,
    AsidZero,
    /// IOPM or MSRPM base not 4 KiB aligned or beyond `physical_bits`.
    PermissionMapAddress,
    /// Nested paging on with an unaligned or too wide N_CR3.
    NestedRoot,
    /// EVENTINJ holds an impossible event (reserved type, exception vector
    /// 2 or above 31).
    BadEventInjection,
}

impl ConsistencyError {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::SvmeClear => "EFER.SVME is clear",
            Self::Cr0CdClearNwSet => "CR0.CD=0 with CR0.NW=1",
            Self::Cr0HighBits => "CR0 bits 63:32 are not zero",
            Self::Cr3ReservedBits => "CR3 has must-be-zero bits set",
            Self::Cr4ReservedBits => "CR4 has reserved bits set",
            Self::DebugHighBits => "DR6/DR7 bits 63:32 are not zero",
            Self::EferReservedBits => "EFER has reserved bits set",
            Self::LongModeWithoutPae => "EFER.LME and CR0.PG with CR4.PAE=0",
            Self::LongModeWithoutProtection => "EFER.LME and CR0.PG with CR0.PE=0",
            Self::LongCodeSegmentWithDefaultBig => "long mode with CS.L and CS.D both set",
            Self::VmrunNotIntercepted => "the VMRUN intercept is clear",
            Self::AsidZero => "guest ASID is 0",
            Self::PermissionMapAddress => "IOPM or MSRPM base unaligned or beyond MAXPHYADDR",
            Self::NestedRoot => "N_CR3 unaligned or beyond MAXPHYADDR",
            Self::BadEventInjection => "EVENTINJ holds an impossible event",
        }
    }
}

/// EFER bits defined on processors Sluice supports: SCE, LME, LMA, NXE,
/// SVME, LMSLE, FFXSR, TCE (APM vol. 2, 3.1.7).
const EFER_DEFINED: u64 =
    0x1 | (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

/// CR4 bits 0–24 are defined (APM vol. 2, 3.1.3); above them MBZ.
const CR4_DEFINED: u64 = (1 << 25) - 1;

/// Runs the VMRUN consistency checks of APM vol. 2, 15.5.1 that depend on
/// VMCB contents only. `physical_bits` is the host MAXPHYADDR.
pub fn check_consistency(vmcb: &Vmcb, physical_bits: u32) -> Result<(), ConsistencyError> {
    let s = &vmcb.save;
    let c = &vmcb.control;
    if s.efer & cr::EFER_SVME == 0 {
        return Err(ConsistencyError::SvmeClear);
    }
    if s.cr0 & cr::CR0_CD == 0 && s.cr0 & cr::CR0_NW != 0 {
        return Err(ConsistencyError::Cr0CdClearNwSet);
    }
    if s.cr0 >> 32 != 0 {
        return Err(ConsistencyError::Cr0HighBits);
    }
    let long = s.efer & cr::EFER_LME != 0 && s.cr0 & cr::CR0_PG != 0;
    // In long mode CR3 bits 63:MAXPHYADDR are MBZ.
    if long && physical_bits < 64 && s.cr3 >> physical_bits != 0 {
        return Err(ConsistencyError::Cr3ReservedBits);
    }
    if s.cr4 & !CR4_DEFINED != 0 {
        return Err(ConsistencyError::Cr4ReservedBits);
    }
    if s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0 {
        return Err(ConsistencyError::DebugHighBits);
    }
    if s.efer & !EFER_DEFINED != 0 {
        return Err(ConsistencyError::EferReservedBits);
    }
    if long && s.cr4 & cr::CR4_PAE == 0 {
        return Err(ConsistencyError::LongModeWithoutPae);
    }
    if long && s.cr0 & cr::CR0_PE == 0 {
        return Err(ConsistencyError::LongModeWithoutProtection);
    }
    let cs = s.cs.to_segment();
    if long && s.cr4 & cr::CR4_PAE != 0 && cs.long && cs.default_big {
        return Err(ConsistencyError::LongCodeSegmentWithDefaultBig);
    }
    if !c.intercept_misc2.contains(InterceptMisc2::VMRUN) {
        return Err(ConsistencyError::VmrunNotIntercepted);
    }
    if c.guest_asid == 0 {
        return Err(ConsistencyError::AsidZero);
    }
    let fits = |pa: u64, len: u64| {
        pa.is_multiple_of(4096)
            && pa
                .checked_add(len)
                .is_some_and(|end| physical_bits >= 64 || end <= 1u64 << physical_bits)
    };
    if !fits(c.iopm_base_pa, 3 * 4096) || !fits(c.msrpm_base_pa, 2 * 4096) {
        return Err(ConsistencyError::PermissionMapAddress);
    }
    if c.nested_control & NP_ENABLE != 0 && !fits(c.n_cr3, 4096) {
        return Err(ConsistencyError::NestedRoot);
    }
    let ev = c.event_injection;
    if ev.is_valid() {
        let bad_type = !matches!(
            ev.typ(),
            event_type::INTR
                | event_type::NMI
                | event_type::EXCEPTION
                | event_type::SOFTWARE_INTERRUPT
        );
        let bad_exception =
            ev.typ() == event_type::EXCEPTION && (ev.vector() == 2 || ev.vector() > 31);
        if bad_type || bad_exception {
            return Err(ConsistencyError::BadEventInjection);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::{DescriptorTable, GuestRegisters, PAT_RESET_VALUE};

    fn long_mode_entry() -> EntryState {
        let mut registers = GuestRegisters::new();
        registers.rip = 0x20_0000;
        registers.gprs[crate::vcpu::gpr::RSP] = 0x30_0000;
        EntryState {
            registers,
            cr0: cr::CR0_PE | cr::CR0_MP | cr::CR0_ET | cr::CR0_NE | cr::CR0_WP | cr::CR0_PG,
            cr3: 0x1000,
            cr4: cr::CR4_PAE,
            efer: cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE,
            cs: Segment::flat_code64(8),
            ds: Segment::flat_data(16),
            es: Segment::flat_data(16),
            ss: Segment::flat_data(16),
            fs: Segment::flat_data(16),
            gs: Segment::flat_data(16),
            tr: Segment::system(0, Segment::TYPE_TSS64_BUSY, 0, 0x67),
            ldtr: Segment::unusable(),
            gdtr: DescriptorTable {
                base: 0x500,
                limit: 23,
            },
            idtr: DescriptorTable::default(),
            pat: PAT_RESET_VALUE,
        }
    }

    fn setup() -> VmcbSetup {
        VmcbSetup {
            asid: 1,
            iopm_base_pa: 0x10_0000,
            msrpm_base_pa: 0x10_3000,
            n_cr3: 0x20_0000,
        }
    }

    #[test]
    fn raw_layout_matches_the_apm() {
        // Write through the typed fields and read the bytes back at the
        // APM offsets.
        let mut v = alloc::boxed::Box::new(Vmcb::zeroed());
        v.control.exit_code = 0x7b;
        v.control.guest_asid = 0xabcd;
        v.control.n_cr3 = 0x1234_5000;
        v.save.rip = 0xdead_beef;
        v.save.efer = 0x1d00;
        v.save.cs = VmcbSegment::from_segment(&Segment::flat_code64(8));
        // SAFETY: Vmcb is plain old data of 4096 bytes.
        let bytes: &[u8; 4096] = unsafe { &*(&*v as *const Vmcb as *const [u8; 4096]) };
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(0x070), 0x7b);
        assert_eq!(u64_at(0x058) & 0xffff_ffff, 0xabcd);
        assert_eq!(u64_at(0x0b0), 0x1234_5000);
        assert_eq!(u64_at(0x400 + 0x178), 0xdead_beef);
        assert_eq!(u64_at(0x400 + 0x0d0), 0x1d00);
        // CS selector 8, attributes 0xa9b (P, DPL0, S, type B; G, L).
        assert_eq!(&bytes[0x410..0x414], &[8, 0, 0x9b, 0x0a]);
    }

    #[test]
    fn segment_attributes_round_trip() {
        for s in [
            Segment::flat_code64(8),
            Segment::flat_data(0x10),
            Segment::system(0x18, Segment::TYPE_TSS64_BUSY, 0x1000, 0x67),
        ] {
            assert_eq!(VmcbSegment::from_segment(&s).to_segment(), s);
        }
        assert_eq!(
            VmcbSegment::from_segment(&Segment::flat_data(0x10)).attributes,
            0xc93
        );
    }

    #[test]
    fn entry_vmcb_passes_the_vmrun_checks() {
        let v = Vmcb::for_entry(&long_mode_entry(), &setup());
        assert_eq!(check_consistency(&v, 48), Ok(()));
        assert_ne!(v.save.efer & cr::EFER_SVME, 0);
        assert_eq!(v.control.nested_control & NP_ENABLE, NP_ENABLE);
        assert_eq!(v.control.n_cr3, 0x20_0000);
        assert_eq!(v.save.rip, 0x20_0000);
        assert_eq!(v.save.rsp, 0x30_0000);
        assert_eq!(v.save.g_pat, PAT_RESET_VALUE);
        assert_eq!(v.control.clean_bits, CleanBits::empty());
        assert!(
            v.control
                .intercept_misc1
                .contains(InterceptMisc1::IOIO_PROT)
        );
        assert!(v.control.intercept_misc2.contains(InterceptMisc2::VMMCALL));
    }

    #[test]
    fn consistency_checks_catch_each_bad_state() {
        let good = Vmcb::for_entry(&long_mode_entry(), &setup());
        let check = |f: &dyn Fn(&mut Vmcb)| {
            let mut v = good;
            f(&mut v);
            check_consistency(&v, 48)
        };
        assert_eq!(
            check(&|v| v.save.efer &= !cr::EFER_SVME),
            Err(ConsistencyError::SvmeClear)
        );
        assert_eq!(
            check(&|v| v.save.cr0 |= cr::CR0_NW),
            Err(ConsistencyError::Cr0CdClearNwSet)
        );
        assert_eq!(
            check(&|v| v.save.cr0 |= 1 << 40),
            Err(ConsistencyError::Cr0HighBits)
        );
        assert_eq!(
            check(&|v| v.save.cr3 = 1 << 50),
            Err(ConsistencyError::Cr3ReservedBits)
        );
        assert_eq!(
            check(&|v| v.save.cr4 |= 1 << 40),
            Err(ConsistencyError::Cr4ReservedBits)
        );
        assert_eq!(
            check(&|v| v.save.dr7 |= 1 << 33),
            Err(ConsistencyError::DebugHighBits)
        );
        assert_eq!(
            check(&|v| v.save.efer |= 1 << 20),
            Err(ConsistencyError::EferReservedBits)
        );
        assert_eq!(
            check(&|v| v.save.cr4 &= !cr::CR4_PAE),
            Err(ConsistencyError::LongModeWithoutPae)
        );
        assert_eq!(
            check(&|v| v.save.cr0 &= !cr::CR0_PE),
            Err(ConsistencyError::LongModeWithoutProtection)
        );
        assert_eq!(
            check(&|v| v.save.cs.attributes |= 1 << 10),
            Err(ConsistencyError::LongCodeSegmentWithDefaultBig)
        );
        assert_eq!(
            check(&|v| v.control.intercept_misc2 =
                v.control.intercept_misc2.difference(InterceptMisc2::VMRUN)),
            Err(ConsistencyError::VmrunNotIntercepted)
        );
        assert_eq!(
            check(&|v| v.control.guest_asid = 0),
            Err(ConsistencyError::AsidZero)
        );
        assert_eq!(
            check(&|v| v.control.iopm_base_pa = 0x10_0800),
            Err(ConsistencyError::PermissionMapAddress)
        );
        assert_eq!(
            check(&|v| v.control.msrpm_base_pa = (1 << 48) - 4096),
            Err(ConsistencyError::PermissionMapAddress)
        );
        assert_eq!(
            check(&|v| v.control.n_cr3 = 0x123),
            Err(ConsistencyError::NestedRoot)
        );
        assert_eq!(
            check(&|v| v.control.event_injection =
                EventInjection::new(2, event_type::EXCEPTION, None)),
            Err(ConsistencyError::BadEventInjection)
        );
        assert_eq!(
            check(&|v| v.control.event_injection = EventInjection::new(14, 1, Some(2))),
            Err(ConsistencyError::BadEventInjection)
        );
    }

    #[test]
    fn event_injection_encoding() {
        // #PF with error code 2: vector 14, type 3, EV, V, code in 63:32.
        let e = EventInjection::new(14, event_type::EXCEPTION, Some(2));
        assert_eq!(e.0, 0x0000_0002_8000_0b0e);
        assert_eq!((e.vector(), e.typ(), e.error_code()), (14, 3, Some(2)));
        let i = EventInjection::new(0x30, event_type::INTR, None);
        assert_eq!(i.0, 0x8000_0030);
        assert_eq!(i.error_code(), None);
        assert!(!EventInjection(0).is_valid());
    }
}
