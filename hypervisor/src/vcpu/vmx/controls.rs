//! VM-execution, VM-exit and VM-entry control bits (Intel SDM vol. 3,
//! "VM-Execution Control Fields", "VM-Exit Control Fields", "VM-Entry
//! Control Fields"), and their adjustment to what the processor allows
//! (appendix A, "VMX Capability Reporting Facility").

/// Pin-based VM-execution controls.
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
    pub const POSTED_INTERRUPTS: u32 = 1 << 7;
}

/// Primary processor-based VM-execution controls.
pub mod primary {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const RDTSC_EXITING: u32 = 1 << 12;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const TERTIARY_CONTROLS: u32 = 1 << 17;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const USE_TPR_SHADOW: u32 = 1 << 21;
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const PAUSE_EXITING: u32 = 1 << 30;
    pub const SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls.
pub mod secondary {
    pub const VIRTUALIZE_APIC_ACCESSES: u32 = 1 << 0;
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const DESCRIPTOR_TABLE_EXITING: u32 = 1 << 2;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const VIRTUALIZE_X2APIC: u32 = 1 << 4;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const WBINVD_EXITING: u32 = 1 << 6;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const APIC_REGISTER_VIRTUALIZATION: u32 = 1 << 8;
    pub const VIRTUAL_INTERRUPT_DELIVERY: u32 = 1 << 9;
    pub const PAUSE_LOOP_EXITING: u32 = 1 << 10;
    pub const RDRAND_EXITING: u32 = 1 << 11;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_VM_FUNCTIONS: u32 = 1 << 13;
    pub const VMCS_SHADOWING: u32 = 1 << 14;
    pub const ENCLS_EXITING: u32 = 1 << 15;
    pub const RDSEED_EXITING: u32 = 1 << 16;
    pub const ENABLE_PML: u32 = 1 << 17;
    pub const EPT_VIOLATION_VE: u32 = 1 << 18;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 19;
    pub const ENABLE_XSAVES: u32 = 1 << 20;
    pub const MODE_BASED_EXECUTE: u32 = 1 << 22;
    pub const SUB_PAGE_WRITE: u32 = 1 << 23;
    pub const PT_USES_GUEST_PHYSICAL: u32 = 1 << 24;
    pub const USE_TSC_SCALING: u32 = 1 << 25;
    pub const ENABLE_USER_WAIT_PAUSE: u32 = 1 << 26;
}

/// VM-exit controls.
pub mod exit {
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const LOAD_PERF_GLOBAL_CTRL: u32 = 1 << 12;
    pub const ACKNOWLEDGE_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
    pub const CLEAR_BNDCFGS: u32 = 1 << 23;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 24;
}

/// VM-entry controls.
pub mod entry {
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const ENTRY_TO_SMM: u32 = 1 << 10;
    pub const DEACTIVATE_DUAL_MONITOR: u32 = 1 << 11;
    pub const LOAD_PERF_GLOBAL_CTRL: u32 = 1 << 13;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
    pub const LOAD_BNDCFGS: u32 = 1 << 16;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 17;
}

/// The controls every Sluice guest runs with, before adjustment.
pub mod sluice {
    use super::*;
    /// Physical interrupts and NMIs exit to the host.
    pub const PIN: u32 = pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING;
    /// HLT exits; port I/O and MSRs go through the bitmaps; the secondary
    /// controls are used.
    pub const PRIMARY: u32 = primary::HLT_EXITING
        | primary::USE_IO_BITMAPS
        | primary::USE_MSR_BITMAPS
        | primary::MWAIT_EXITING
        | primary::MONITOR_EXITING
        | primary::SECONDARY_CONTROLS;
    /// EPT and VPID, WBINVD exits (the iommufd WBINVD policy), RDTSCP and
    /// INVPCID available to the guest.
    pub const SECONDARY: u32 = secondary::ENABLE_EPT
        | secondary::ENABLE_VPID
        | secondary::WBINVD_EXITING
        | secondary::ENABLE_RDTSCP
        | secondary::ENABLE_INVPCID;
    /// 64-bit host, PAT and EFER switched, interrupts acknowledged on exit.
    pub const EXIT: u32 = exit::HOST_ADDRESS_SPACE_SIZE
        | exit::ACKNOWLEDGE_INTERRUPT_ON_EXIT
        | exit::SAVE_PAT
        | exit::LOAD_PAT
        | exit::SAVE_EFER
        | exit::LOAD_EFER;
    /// 64-bit guest, PAT and EFER loaded.
    pub const ENTRY: u32 = entry::IA32E_MODE_GUEST | entry::LOAD_PAT | entry::LOAD_EFER;
}

/// Bits a control field needs but the processor does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsupportedControls(pub u32);

/// Adjusts `desired` to a capability MSR (`IA32_VMX_[TRUE_]PINBASED_CTLS`
/// and friends, SDM appendix A.3-A.5): bits 31:0 are the allowed 0-settings
/// (a 1 there means the control must be 1), bits 63:32 the allowed
/// 1-settings (a 0 there means it must be 0). Required bits are added;
/// wanted bits the processor cannot set are an error.
pub const fn adjust_controls(desired: u32, capability: u64) -> Result<u32, UnsupportedControls> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let missing = desired & !may_be_one;
    if missing != 0 {
        return Err(UnsupportedControls(missing));
    }
    Ok(desired | must_be_one)
}

/// Checks a CR0 or CR4 value against IA32_VMX_CR0/CR4_FIXED0 (bits that
/// must be 1) and FIXED1 (bits that may be 1), SDM appendix A.7-A.8.
/// Returns the offending bits.
pub const fn check_fixed_bits(value: u64, fixed0: u64, fixed1: u64) -> Result<(), u64> {
    let bad = (fixed0 & !value) | (value & !fixed1);
    if bad == 0 { Ok(()) } else { Err(bad) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjustment_adds_required_bits_and_refuses_impossible_ones() {
        // Must be one: bits 1, 2, 4 (a typical default1 class); may be one:
        // those plus bits 0 and 3.
        let cap = (0x1fu64 << 32) | 0x16;
        assert_eq!(adjust_controls(0x1, cap), Ok(0x17));
        assert_eq!(adjust_controls(0x9, cap), Ok(0x1f));
        assert_eq!(adjust_controls(0x21, cap), Err(UnsupportedControls(0x20)));
    }

    #[test]
    fn fixed_bits() {
        // Typical CR0 fixed values: PE, NE, PG required (without unrestricted
        // guest); everything below bit 32 allowed.
        let fixed0 = 0x8000_0021;
        let fixed1 = 0xffff_ffff;
        assert_eq!(check_fixed_bits(0x8000_0031, fixed0, fixed1), Ok(()));
        assert_eq!(check_fixed_bits(0x8000_0010, fixed0, fixed1), Err(0x21));
        assert_eq!(
            check_fixed_bits(0x1_8000_0021, fixed0, fixed1),
            Err(1 << 32)
        );
    }

    #[test]
    fn sluice_controls_are_disjoint_and_use_ept() {
        assert_ne!(sluice::SECONDARY & secondary::ENABLE_EPT, 0);
        assert_ne!(sluice::PRIMARY & primary::SECONDARY_CONTROLS, 0);
        assert_eq!(sluice::PRIMARY & primary::UNCONDITIONAL_IO_EXITING, 0);
        assert_ne!(sluice::ENTRY & entry::IA32E_MODE_GUEST, 0);
    }
}
