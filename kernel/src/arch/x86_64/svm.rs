//! AMD SVM primitives (AMD64 APM vol. 2, chapter 15): feature detection,
//! enabling SVM on this CPU and the VMRUN call itself. The VMCB contents and
//! exit decoding live in the hypervisor crate.

use core::arch::{asm, global_asm};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;
const VM_CR_SVMDIS: u64 = 1 << 4;

/// What CPUID 0x8000_000A reports (APM vol. 3, CPUID Fn8000_000A).
#[derive(Debug, Clone, Copy)]
pub struct SvmFeatures {
    pub revision: u32,
    pub asids: u32,
    pub nested_paging: bool,
    pub next_rip_save: bool,
    pub vmcb_clean_bits: bool,
    pub decode_assists: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvmError {
    /// CPUID says this CPU has no SVM.
    NotSupported,
    /// VM_CR.SVMDIS: firmware disabled SVM (BIOS setting).
    DisabledByFirmware,
    /// SVM without nested paging: Sluice requires NPT.
    NoNestedPaging,
}

impl core::fmt::Display for SvmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NotSupported => "this CPU does not support AMD SVM",
            Self::DisabledByFirmware => "SVM is disabled by firmware (VM_CR.SVMDIS); enable virtualization in the BIOS setup",
            Self::NoNestedPaging => "this CPU's SVM has no nested paging (NPT), which Sluice requires",
        })
    }
}

pub fn read_msr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reading an architectural MSR that exists on SVM-capable CPUs.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// # Safety
/// Writing an MSR changes CPU behaviour; the caller owns that change.
pub unsafe fn write_msr(msr: u32, value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

pub fn detect() -> Result<SvmFeatures, SvmError> {
    if super::cpuid(0x8000_0000, 0).eax < 0x8000_000a
        || super::cpuid(0x8000_0001, 0).ecx & (1 << 2) == 0
    {
        return Err(SvmError::NotSupported);
    }
    if read_msr(MSR_VM_CR) & VM_CR_SVMDIS != 0 {
        return Err(SvmError::DisabledByFirmware);
    }
    let leaf = super::cpuid(0x8000_000a, 0);
    let features = SvmFeatures {
        revision: leaf.eax & 0xff,
        asids: leaf.ebx,
        nested_paging: leaf.edx & (1 << 0) != 0,
        next_rip_save: leaf.edx & (1 << 3) != 0,
        vmcb_clean_bits: leaf.edx & (1 << 5) != 0,
        decode_assists: leaf.edx & (1 << 7) != 0,
    };
    if !features.nested_paging {
        return Err(SvmError::NoNestedPaging);
    }
    Ok(features)
}

/// Sets EFER.SVME and the host save area on this CPU.
///
/// # Safety
/// `host_save_area` must be a 4 KiB-aligned page reserved for the CPU for
/// as long as SVM stays enabled.
pub unsafe fn enable(host_save_area: u64) {
    // SAFETY: SVM is present (the caller ran `detect`); the page is the
    // caller's to give.
    unsafe {
        write_msr(MSR_EFER, read_msr(MSR_EFER) | EFER_SVME);
        write_msr(MSR_VM_HSAVE_PA, host_save_area);
    }
}

/// Guest general-purpose registers VMRUN does not switch (RAX and RSP live
/// in the VMCB).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestGprs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}
const _: () = assert!(core::mem::size_of::<GuestGprs>() == 14 * 8);

// sluice_svm_run(vmcb_pa: rdi, gprs: rsi, host_vmsave_pa: rdx), System V.
// VMSAVE/VMLOAD move the state VMRUN leaves alone (FS, GS, TR, LDTR,
// KernelGSBase, STAR family, SYSENTER MSRs) between host and guest; GIF is
// cleared around the switch (APM 15.17).
global_asm!(
    r#"
.global sluice_svm_run
sluice_svm_run:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rsi
    push rdi
    mov rax, rdx
    vmsave rax
    push rdx
    mov rax, rsi
    mov rbx, [rax + 0]
    mov rcx, [rax + 8]
    mov rdx, [rax + 16]
    mov rsi, [rax + 24]
    mov rdi, [rax + 32]
    mov rbp, [rax + 40]
    mov r8, [rax + 48]
    mov r9, [rax + 56]
    mov r10, [rax + 64]
    mov r11, [rax + 72]
    mov r12, [rax + 80]
    mov r13, [rax + 88]
    mov r14, [rax + 96]
    mov r15, [rax + 104]
    mov rax, [rsp + 8]
    clgi
    vmload rax
    vmrun rax
    vmsave rax
    mov rax, [rsp + 16]
    mov [rax + 0], rbx
    mov [rax + 8], rcx
    mov [rax + 16], rdx
    mov [rax + 24], rsi
    mov [rax + 32], rdi
    mov [rax + 40], rbp
    mov [rax + 48], r8
    mov [rax + 56], r9
    mov [rax + 64], r10
    mov [rax + 72], r11
    mov [rax + 80], r12
    mov [rax + 88], r13
    mov [rax + 96], r14
    mov [rax + 104], r15
    pop rax
    vmload rax
    stgi
    add rsp, 16
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#
);

unsafe extern "sysv64" {
    fn sluice_svm_run(vmcb: u64, gprs: *mut GuestGprs, host_vmsave: u64);
}

/// Runs the guest described by the VMCB at `vmcb` until its next #VMEXIT.
///
/// # Safety
/// SVM must be enabled on this CPU; `vmcb` and `host_vmsave` must be
/// distinct 4 KiB pages owned by the caller, the VMCB must pass VMRUN's
/// consistency checks, and the guest must not be able to reach Sluice's
/// memory (nested paging).
pub unsafe fn run(vmcb: u64, gprs: &mut GuestGprs, host_vmsave: u64) {
    // SAFETY: the caller's contract.
    unsafe { sluice_svm_run(vmcb, gprs, host_vmsave) };
}
