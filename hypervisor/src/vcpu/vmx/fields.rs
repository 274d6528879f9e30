//! VMCS field encodings (Intel SDM vol. 3, appendix B, "Field Encoding in
//! VMCS").
//!
//! An encoding is a 32-bit value: bit 0 access type (0 full, 1 high half
//! of a 64-bit field), bits 9:1 index, bits 11:10 type (0 control, 1
//! VM-exit information, 2 guest state, 3 host state), bits 14:13 width
//! (0 16-bit, 1 64-bit, 2 32-bit, 3 natural width). Each constant below
//! has a width-typed wrapper whose constructor checks, at compile time,
//! that the encoding's width bits match, so a 16-bit field can never be
//! written as a 64-bit one.

/// Width bits 14:13 of an encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Bits16,
    Bits64,
    Bits32,
    Natural,
}

/// Type bits 11:10 of an encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Control,
    ExitInformation,
    GuestState,
    HostState,
}

/// Decodes the width of any encoding.
pub const fn width_of(encoding: u32) -> Width {
    match (encoding >> 13) & 3 {
        0 => Width::Bits16,
        1 => Width::Bits64,
        2 => Width::Bits32,
        _ => Width::Natural,
    }
}

/// Decodes the type of any encoding.
pub const fn type_of(encoding: u32) -> FieldType {
    match (encoding >> 10) & 3 {
        0 => FieldType::Control,
        1 => FieldType::ExitInformation,
        2 => FieldType::GuestState,
        _ => FieldType::HostState,
    }
}

macro_rules! typed_field {
    ($name:ident, $width:ident, $doc:literal) => {
        #[doc = $doc]
        #[repr(transparent)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u32);

        impl $name {
            /// Panics at compile time (in a `const`) if `encoding` is not of
            /// this width or is a "high" access.
            pub const fn new(encoding: u32) -> Self {
                assert!(matches!(width_of(encoding), Width::$width));
                assert!(
                    encoding & 1 == 0,
                    "high-half encodings come from Field64::high"
                );
                Self(encoding)
            }
            pub const fn encoding(self) -> u32 {
                self.0
            }
            pub const fn field_type(self) -> FieldType {
                type_of(self.0)
            }
            pub const fn index(self) -> u32 {
                (self.0 >> 1) & 0x1ff
            }
        }
    };
}

typed_field!(Field16, Bits16, "A 16-bit VMCS field.");
typed_field!(Field32, Bits32, "A 32-bit VMCS field.");
typed_field!(Field64, Bits64, "A 64-bit VMCS field (full access).");
typed_field!(FieldNatural, Natural, "A natural-width VMCS field.");

impl Field64 {
    /// The encoding of the high 32 bits (for 32-bit VMREAD/VMWRITE).
    pub const fn high(self) -> u32 {
        self.0 | 1
    }
}

macro_rules! fields {
    ($ty:ident { $( $(#[$m:meta])* $name:ident = $enc:expr; )* }) => {
        $( $(#[$m])* pub const $name: $ty = $ty::new($enc); )*
    };
}

/// 16-bit control fields (table B-1).
pub mod control16 {
    use super::Field16;
    fields!(Field16 {
        VPID = 0x0000;
        POSTED_INTERRUPT_NOTIFICATION_VECTOR = 0x0002;
        EPTP_INDEX = 0x0004;
    });
}

/// 16-bit guest-state fields (table B-2).
pub mod guest16 {
    use super::Field16;
    fields!(Field16 {
        ES_SELECTOR = 0x0800;
        CS_SELECTOR = 0x0802;
        SS_SELECTOR = 0x0804;
        DS_SELECTOR = 0x0806;
        FS_SELECTOR = 0x0808;
        GS_SELECTOR = 0x080a;
        LDTR_SELECTOR = 0x080c;
        TR_SELECTOR = 0x080e;
        INTERRUPT_STATUS = 0x0810;
        PML_INDEX = 0x0812;
    });
}

/// 16-bit host-state fields (table B-3).
pub mod host16 {
    use super::Field16;
    fields!(Field16 {
        ES_SELECTOR = 0x0c00;
        CS_SELECTOR = 0x0c02;
        SS_SELECTOR = 0x0c04;
        DS_SELECTOR = 0x0c06;
        FS_SELECTOR = 0x0c08;
        GS_SELECTOR = 0x0c0a;
        TR_SELECTOR = 0x0c0c;
    });
}

/// 64-bit control fields (table B-4).
pub mod control64 {
    use super::Field64;
    fields!(Field64 {
        IO_BITMAP_A = 0x2000;
        IO_BITMAP_B = 0x2002;
        MSR_BITMAPS = 0x2004;
        EXIT_MSR_STORE = 0x2006;
        EXIT_MSR_LOAD = 0x2008;
        ENTRY_MSR_LOAD = 0x200a;
        EXECUTIVE_VMCS_POINTER = 0x200c;
        PML_ADDRESS = 0x200e;
        TSC_OFFSET = 0x2010;
        VIRTUAL_APIC_ADDRESS = 0x2012;
        APIC_ACCESS_ADDRESS = 0x2014;
        POSTED_INTERRUPT_DESCRIPTOR = 0x2016;
        VM_FUNCTION_CONTROLS = 0x2018;
        EPT_POINTER = 0x201a;
        EOI_EXIT_BITMAP0 = 0x201c;
        EOI_EXIT_BITMAP1 = 0x201e;
        EOI_EXIT_BITMAP2 = 0x2020;
        EOI_EXIT_BITMAP3 = 0x2022;
        EPTP_LIST = 0x2024;
        VMREAD_BITMAP = 0x2026;
        VMWRITE_BITMAP = 0x2028;
        VE_INFORMATION = 0x202a;
        XSS_EXITING_BITMAP = 0x202c;
        ENCLS_EXITING_BITMAP = 0x202e;
        TSC_MULTIPLIER = 0x2032;
    });
}

/// 64-bit read-only data fields (table B-5).
pub mod exit64 {
    use super::Field64;
    fields!(Field64 {
        GUEST_PHYSICAL_ADDRESS = 0x2400;
    });
}

/// 64-bit guest-state fields (table B-6).
pub mod guest64 {
    use super::Field64;
    fields!(Field64 {
        VMCS_LINK_POINTER = 0x2800;
        DEBUGCTL = 0x2802;
        PAT = 0x2804;
        EFER = 0x2806;
        PERF_GLOBAL_CTRL = 0x2808;
        PDPTE0 = 0x280a;
        PDPTE1 = 0x280c;
        PDPTE2 = 0x280e;
        PDPTE3 = 0x2810;
        BNDCFGS = 0x2812;
    });
}

/// 64-bit host-state fields (table B-7).
pub mod host64 {
    use super::Field64;
    fields!(Field64 {
        PAT = 0x2c00;
        EFER = 0x2c02;
        PERF_GLOBAL_CTRL = 0x2c04;
    });
}

/// 32-bit control fields (table B-8).
pub mod control32 {
    use super::Field32;
    fields!(Field32 {
        PIN_BASED_CONTROLS = 0x4000;
        PRIMARY_PROCESSOR_CONTROLS = 0x4002;
        EXCEPTION_BITMAP = 0x4004;
        PAGE_FAULT_ERROR_CODE_MASK = 0x4006;
        PAGE_FAULT_ERROR_CODE_MATCH = 0x4008;
        CR3_TARGET_COUNT = 0x400a;
        EXIT_CONTROLS = 0x400c;
        EXIT_MSR_STORE_COUNT = 0x400e;
        EXIT_MSR_LOAD_COUNT = 0x4010;
        ENTRY_CONTROLS = 0x4012;
        ENTRY_MSR_LOAD_COUNT = 0x4014;
        ENTRY_INTERRUPTION_INFO = 0x4016;
        ENTRY_EXCEPTION_ERROR_CODE = 0x4018;
        ENTRY_INSTRUCTION_LENGTH = 0x401a;
        TPR_THRESHOLD = 0x401c;
        SECONDARY_PROCESSOR_CONTROLS = 0x401e;
        PLE_GAP = 0x4020;
        PLE_WINDOW = 0x4022;
    });
}

/// 32-bit read-only data fields (table B-9).
pub mod exit32 {
    use super::Field32;
    fields!(Field32 {
        INSTRUCTION_ERROR = 0x4400;
        EXIT_REASON = 0x4402;
        EXIT_INTERRUPTION_INFO = 0x4404;
        EXIT_INTERRUPTION_ERROR_CODE = 0x4406;
        IDT_VECTORING_INFO = 0x4408;
        IDT_VECTORING_ERROR_CODE = 0x440a;
        EXIT_INSTRUCTION_LENGTH = 0x440c;
        EXIT_INSTRUCTION_INFO = 0x440e;
    });
}

/// 32-bit guest-state fields (table B-10).
pub mod guest32 {
    use super::Field32;
    fields!(Field32 {
        ES_LIMIT = 0x4800;
        CS_LIMIT = 0x4802;
        SS_LIMIT = 0x4804;
        DS_LIMIT = 0x4806;
        FS_LIMIT = 0x4808;
        GS_LIMIT = 0x480a;
        LDTR_LIMIT = 0x480c;
        TR_LIMIT = 0x480e;
        GDTR_LIMIT = 0x4810;
        IDTR_LIMIT = 0x4812;
        ES_ACCESS_RIGHTS = 0x4814;
        CS_ACCESS_RIGHTS = 0x4816;
        SS_ACCESS_RIGHTS = 0x4818;
        DS_ACCESS_RIGHTS = 0x481a;
        FS_ACCESS_RIGHTS = 0x481c;
        GS_ACCESS_RIGHTS = 0x481e;
        LDTR_ACCESS_RIGHTS = 0x4820;
        TR_ACCESS_RIGHTS = 0x4822;
        INTERRUPTIBILITY_STATE = 0x4824;
        ACTIVITY_STATE = 0x4826;
        SMBASE = 0x4828;
        SYSENTER_CS = 0x482a;
        PREEMPTION_TIMER_VALUE = 0x482e;
    });
}

/// 32-bit host-state field (table B-11).
pub mod host32 {
    use super::Field32;
    fields!(Field32 {
        SYSENTER_CS = 0x4c00;
    });
}

/// Natural-width control fields (table B-12).
pub mod control_natural {
    use super::FieldNatural;
    fields!(FieldNatural {
        CR0_GUEST_HOST_MASK = 0x6000;
        CR4_GUEST_HOST_MASK = 0x6002;
        CR0_READ_SHADOW = 0x6004;
        CR4_READ_SHADOW = 0x6006;
        CR3_TARGET_VALUE0 = 0x6008;
        CR3_TARGET_VALUE1 = 0x600a;
        CR3_TARGET_VALUE2 = 0x600c;
        CR3_TARGET_VALUE3 = 0x600e;
    });
}

/// Natural-width read-only data fields (table B-13).
pub mod exit_natural {
    use super::FieldNatural;
    fields!(FieldNatural {
        EXIT_QUALIFICATION = 0x6400;
        IO_RCX = 0x6402;
        IO_RSI = 0x6404;
        IO_RDI = 0x6406;
        IO_RIP = 0x6408;
        GUEST_LINEAR_ADDRESS = 0x640a;
    });
}

/// Natural-width guest-state fields (table B-14).
pub mod guest_natural {
    use super::FieldNatural;
    fields!(FieldNatural {
        CR0 = 0x6800;
        CR3 = 0x6802;
        CR4 = 0x6804;
        ES_BASE = 0x6806;
        CS_BASE = 0x6808;
        SS_BASE = 0x680a;
        DS_BASE = 0x680c;
        FS_BASE = 0x680e;
        GS_BASE = 0x6810;
        LDTR_BASE = 0x6812;
        TR_BASE = 0x6814;
        GDTR_BASE = 0x6816;
        IDTR_BASE = 0x6818;
        DR7 = 0x681a;
        RSP = 0x681c;
        RIP = 0x681e;
        RFLAGS = 0x6820;
        PENDING_DEBUG_EXCEPTIONS = 0x6822;
        SYSENTER_ESP = 0x6824;
        SYSENTER_EIP = 0x6826;
        S_CET = 0x6828;
        SSP = 0x682a;
        INTERRUPT_SSP_TABLE = 0x682c;
    });
}

/// Natural-width host-state fields (table B-15).
pub mod host_natural {
    use super::FieldNatural;
    fields!(FieldNatural {
        CR0 = 0x6c00;
        CR3 = 0x6c02;
        CR4 = 0x6c04;
        FS_BASE = 0x6c06;
        GS_BASE = 0x6c08;
        TR_BASE = 0x6c0a;
        GDTR_BASE = 0x6c0c;
        IDTR_BASE = 0x6c0e;
        SYSENTER_ESP = 0x6c10;
        SYSENTER_EIP = 0x6c12;
        RSP = 0x6c14;
        RIP = 0x6c16;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_decode_into_their_parts() {
        // Guest RIP: natural width, guest state, index 15.
        assert_eq!(width_of(guest_natural::RIP.encoding()), Width::Natural);
        assert_eq!(guest_natural::RIP.field_type(), FieldType::GuestState);
        assert_eq!(guest_natural::RIP.index(), 15);
        // EPT pointer: 64-bit control, index 13, high half 0x201b.
        assert_eq!(control64::EPT_POINTER.field_type(), FieldType::Control);
        assert_eq!(control64::EPT_POINTER.index(), 13);
        assert_eq!(control64::EPT_POINTER.high(), 0x201b);
        assert_eq!(exit32::EXIT_REASON.field_type(), FieldType::ExitInformation);
        assert_eq!(host16::TR_SELECTOR.field_type(), FieldType::HostState);
        assert_eq!(
            exit64::GUEST_PHYSICAL_ADDRESS.field_type(),
            FieldType::ExitInformation
        );
    }

    #[test]
    fn the_guest_segment_fields_line_up() {
        // Selector, limit, access rights and base of each segment share
        // the index, in the order ES CS SS DS FS GS LDTR TR.
        let sel = [
            guest16::ES_SELECTOR,
            guest16::CS_SELECTOR,
            guest16::SS_SELECTOR,
            guest16::DS_SELECTOR,
            guest16::FS_SELECTOR,
            guest16::GS_SELECTOR,
            guest16::LDTR_SELECTOR,
            guest16::TR_SELECTOR,
        ];
        let lim = [
            guest32::ES_LIMIT,
            guest32::CS_LIMIT,
            guest32::SS_LIMIT,
            guest32::DS_LIMIT,
            guest32::FS_LIMIT,
            guest32::GS_LIMIT,
            guest32::LDTR_LIMIT,
            guest32::TR_LIMIT,
        ];
        let ar = [
            guest32::ES_ACCESS_RIGHTS,
            guest32::CS_ACCESS_RIGHTS,
            guest32::SS_ACCESS_RIGHTS,
            guest32::DS_ACCESS_RIGHTS,
            guest32::FS_ACCESS_RIGHTS,
            guest32::GS_ACCESS_RIGHTS,
            guest32::LDTR_ACCESS_RIGHTS,
            guest32::TR_ACCESS_RIGHTS,
        ];
        let base = [
            guest_natural::ES_BASE,
            guest_natural::CS_BASE,
            guest_natural::SS_BASE,
            guest_natural::DS_BASE,
            guest_natural::FS_BASE,
            guest_natural::GS_BASE,
            guest_natural::LDTR_BASE,
            guest_natural::TR_BASE,
        ];
        for i in 0..8 {
            assert_eq!(sel[i].index(), i as u32);
            assert_eq!(lim[i].index(), i as u32);
            assert_eq!(ar[i].index(), i as u32 + 10);
            assert_eq!(base[i].index(), i as u32 + 3);
        }
    }
}
