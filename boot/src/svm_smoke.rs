//! The `svm` scenario: proves the SVM primitives on this CPU (or QEMU's
//! TCG model of it) by running a few instructions of 64-bit guest code and
//! checking every exit. It builds the VMCB
//! through the hypervisor crate's typed VMCB, checked by the same VMRUN
//! consistency rules the vCPU backend applies. Nested paging is off here (the guest runs on Sluice's identity
//! map): this checks VMRUN and exit handling only, not isolation.

extern crate alloc;

use alloc::format;
use alloc::string::String;

use log::info;
use sluice_hypervisor::vcpu::svm::exit::code;
use sluice_hypervisor::vcpu::svm::vmcb::{
    InterceptMisc1, InterceptMisc2, Vmcb, VmcbSegment, check_consistency,
};
use sluice_kernel::arch::svm::{self, GuestGprs};
use sluice_kernel::platform::Platform;

/// mov eax, 0x1234; vmmcall; xor eax, eax; cpuid; hlt
const GUEST_CODE: [u8; 13] = [
    0xb8, 0x34, 0x12, 0, 0, 0x0f, 0x01, 0xd9, 0x31, 0xc0, 0x0f, 0xa2, 0xf4,
];

fn control_registers() -> (u64, u64, u64) {
    let (cr0, cr3, cr4): (u64, u64, u64);
    // SAFETY: reading control registers has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
    }
    (cr0, cr3, cr4)
}

pub fn run(platform: &Platform) -> Result<(), String> {
    let features = svm::detect().map_err(|e| format!("{e}"))?;
    info!(
        "svm: revision {}, {} ASIDs, nested paging {}, next-RIP save {}, decode assists {}",
        features.revision,
        features.asids,
        features.nested_paging,
        features.next_rip_save,
        features.decode_assists
    );
    let pages = platform
        .frames
        .lock()
        .allocate(5, 4096)
        .map_err(|e| format!("{e}"))?;
    // SAFETY: five fresh identity-mapped frames, zeroed before use.
    unsafe { core::ptr::write_bytes(pages as *mut u8, 0, 5 * 4096) };
    let (hsave, host_vmsave, vmcb, code_page, stack) = (
        pages,
        pages + 4096,
        pages + 8192,
        pages + 12288,
        pages + 16384,
    );
    // SAFETY: the host save area page is reserved for this CPU from now on.
    unsafe { svm::enable(hsave) };
    // SAFETY: the code page is ours.
    unsafe {
        core::ptr::copy_nonoverlapping(GUEST_CODE.as_ptr(), code_page as *mut u8, GUEST_CODE.len())
    };

    // SAFETY: the page is ours, 4 KiB aligned and zeroed, and a zeroed
    // VMCB is a valid `Vmcb`; nothing else refers to it while `v` lives.
    let v = unsafe {
        let page = vmcb as *mut Vmcb;
        page.write(Vmcb::zeroed());
        &mut *page
    };
    v.control.intercept_misc1 = InterceptMisc1::CPUID.union(InterceptMisc1::HLT);
    v.control.intercept_misc2 = InterceptMisc2::VMRUN.union(InterceptMisc2::VMMCALL);
    v.control.guest_asid = 1;
    // 64-bit code (type 0xA, S, P, L, G), flat data (type 0x3, S, P, D/B, G).
    v.save.cs = VmcbSegment::new(0x08, 0x0a9a, 0xffff_ffff, 0);
    let data = VmcbSegment::new(0x10, 0x0c93, 0xffff_ffff, 0);
    (v.save.ds, v.save.es, v.save.ss) = (data, data, data);
    v.save.tr = VmcbSegment::new(0x18, 0x008b, 0x67, 0);
    let (cr0, cr3, cr4) = control_registers();
    (v.save.cr0, v.save.cr3, v.save.cr4) = (cr0, cr3, cr4);
    // LME | LMA | SVME: a guest's EFER.SVME must be set (APM 15.5.1).
    v.save.efer = (1 << 8) | (1 << 10) | (1 << 12);
    v.save.dr6 = 0xffff_0ff0;
    v.save.dr7 = 0x400;
    v.save.rflags = 2;
    v.save.rip = code_page;
    v.save.rsp = stack + 4096;
    v.save.g_pat = 0x0007_0406_0007_0406;
    let physical_bits = sluice_kernel::arch::cpuid(0x8000_0008, 0).eax & 0xff;
    check_consistency(v, physical_bits).map_err(|e| format!("VMCB fails VMRUN's checks: {e:?}"))?;

    let mut gprs = GuestGprs {
        rbx: 0xfeed_f00d,
        ..GuestGprs::default()
    };
    let expected = [(code::VMMCALL, 3u64), (code::CPUID, 2), (code::HLT, 1)];
    for (step, (want, length)) in expected.iter().enumerate() {
        // SAFETY: SVM is enabled, the VMCB passed the fields above, and the
        // pages are ours; the VMCB pointer is passed from `v` so the compiler
        // sees the hardware's writes to it. Without nested paging the guest could reach all
        // memory; its code is fixed and does not.
        unsafe { svm::run(core::ptr::from_mut(v) as u64, &mut gprs, host_vmsave) };
        let code_seen = v.control.exit_code;
        if code_seen != *want {
            return Err(format!(
                "exit {step}: expected exit code {want:#x}, got {code_seen:#x}"
            ));
        }
        match code_seen {
            code::VMMCALL => {
                let rax = v.save.rax;
                if rax != 0x1234 || gprs.rbx != 0xfeed_f00d {
                    return Err(format!("VMMCALL saw RAX={rax:#x} RBX={:#x}", gprs.rbx));
                }
                v.save.rax = 0;
            }
            code::CPUID => {
                // Emulate leaf 0 with Sluice's vendor string.
                v.save.rax = 0;
                gprs.rbx = u64::from(u32::from_le_bytes(*b"Slui"));
                gprs.rdx = u64::from(u32::from_le_bytes(*b"ce-V"));
                gprs.rcx = u64::from(u32::from_le_bytes(*b"M-x8"));
            }
            _ => {}
        }
        // No NRIPS on QEMU's model: the lengths of these fixed instructions
        // are known.
        let rip = v.save.rip;
        v.save.rip = rip + length;
        info!(
            "svm: exit {step} code {code_seen:#x} handled, guest RIP {rip:#x} -> {:#x}",
            rip + length
        );
    }
    let rip = v.save.rip;
    if rip != code_page + GUEST_CODE.len() as u64 {
        return Err(format!(
            "guest stopped at RIP {rip:#x}, expected {:#x}",
            code_page + GUEST_CODE.len() as u64
        ));
    }
    platform
        .frames
        .lock()
        .free(vmcb, 3)
        .map_err(|e| format!("{e}"))?;
    Ok(())
}
