//! The `svm` scenario: proves the SVM primitives on this CPU (or QEMU's
//! TCG model of it) by running a few instructions of 64-bit guest code and
//! checking every exit. It writes VMCB fields by their offsets in AMD64 APM
//! vol. 2 appendix B (control area tables B-1, state save area B-2); the
//! typed VMCB of the hypervisor crate replaces this once the vCPU backend
//! uses it. Nested paging is off here (the guest runs on Sluice's identity
//! map): this checks VMRUN and exit handling only, not isolation.

extern crate alloc;

use alloc::format;
use alloc::string::String;

use log::info;
use sluice_kernel::arch::svm::{self, GuestGprs};
use sluice_kernel::platform::Platform;

// Control area.
const INTERCEPT_MISC1: usize = 0x00c;
const INTERCEPT_MISC2: usize = 0x010;
const GUEST_ASID: usize = 0x058;
const EXIT_CODE: usize = 0x070;
// State save area.
const SAVE: usize = 0x400;
const CS: usize = SAVE + 0x10;
const SS: usize = SAVE + 0x20;
const DS: usize = SAVE + 0x30;
const ES: usize = SAVE;
const GDTR: usize = SAVE + 0x60;
const IDTR: usize = SAVE + 0x80;
const TR: usize = SAVE + 0x90;
const EFER: usize = SAVE + 0xd0;
const CR4: usize = SAVE + 0x148;
const CR3: usize = SAVE + 0x150;
const CR0: usize = SAVE + 0x158;
const DR7: usize = SAVE + 0x160;
const DR6: usize = SAVE + 0x168;
const RFLAGS: usize = SAVE + 0x170;
const RIP: usize = SAVE + 0x178;
const RSP: usize = SAVE + 0x1d8;
const RAX: usize = SAVE + 0x1f8;
const G_PAT: usize = SAVE + 0x268;

const MISC1_CPUID: u32 = 1 << 18;
const MISC1_HLT: u32 = 1 << 24;
const MISC2_VMRUN: u32 = 1 << 0;
const MISC2_VMMCALL: u32 = 1 << 1;

const EXIT_CPUID: u64 = 0x72;
const EXIT_HLT: u64 = 0x78;
const EXIT_VMMCALL: u64 = 0x81;

/// mov eax, 0x1234; vmmcall; xor eax, eax; cpuid; hlt
const GUEST_CODE: [u8; 13] = [
    0xb8, 0x34, 0x12, 0, 0, 0x0f, 0x01, 0xd9, 0x31, 0xc0, 0x0f, 0xa2, 0xf4,
];

struct Vmcb(u64);

impl Vmcb {
    fn write<T: Copy>(&self, offset: usize, value: T) {
        // SAFETY: the VMCB page belongs to this scenario; offsets are inside it.
        unsafe { core::ptr::write_unaligned((self.0 as usize + offset) as *mut T, value) }
    }
    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: as `write`.
        unsafe { core::ptr::read_unaligned((self.0 as usize + offset) as *const T) }
    }
    /// selector, attributes (APM's packed form), limit, base.
    fn segment(&self, offset: usize, selector: u16, attributes: u16, limit: u32, base: u64) {
        self.write(offset, selector);
        self.write(offset + 2, attributes);
        self.write(offset + 4, limit);
        self.write(offset + 8, base);
    }
}

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
    let (hsave, host_vmsave, vmcb, code, stack) = (
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
        core::ptr::copy_nonoverlapping(GUEST_CODE.as_ptr(), code as *mut u8, GUEST_CODE.len())
    };

    let v = Vmcb(vmcb);
    v.write(INTERCEPT_MISC1, MISC1_CPUID | MISC1_HLT);
    v.write(INTERCEPT_MISC2, MISC2_VMRUN | MISC2_VMMCALL);
    v.write(GUEST_ASID, 1u32);
    // 64-bit code (type 0xA, S, P, L, G), flat data (type 0x3, S, P, D/B, G).
    v.segment(CS, 0x08, 0x0a9a, 0xffff_ffff, 0);
    for seg in [DS, ES, SS] {
        v.segment(seg, 0x10, 0x0c93, 0xffff_ffff, 0);
    }
    v.segment(TR, 0x18, 0x008b, 0x67, 0);
    v.segment(GDTR, 0, 0, 0, 0);
    v.segment(IDTR, 0, 0, 0, 0);
    let (cr0, cr3, cr4) = control_registers();
    v.write(CR0, cr0);
    v.write(CR3, cr3);
    v.write(CR4, cr4);
    // LME | LMA | SVME: a guest's EFER.SVME must be set (APM 15.5.1).
    v.write(EFER, (1u64 << 8) | (1 << 10) | (1 << 12));
    v.write(DR6, 0xffff_0ff0u64);
    v.write(DR7, 0x400u64);
    v.write(RFLAGS, 2u64);
    v.write(RIP, code);
    v.write(RSP, stack + 4096);
    v.write(G_PAT, 0x0007_0406_0007_0406u64);

    let mut gprs = GuestGprs {
        rbx: 0xfeed_f00d,
        ..GuestGprs::default()
    };
    let expected = [(EXIT_VMMCALL, 3u64), (EXIT_CPUID, 2), (EXIT_HLT, 1)];
    for (step, (want, length)) in expected.iter().enumerate() {
        // SAFETY: SVM is enabled, the VMCB passed the fields above, and the
        // pages are ours. Without nested paging the guest could reach all
        // memory; its code is fixed and does not.
        unsafe { svm::run(vmcb, &mut gprs, host_vmsave) };
        let code_seen: u64 = v.read(EXIT_CODE);
        if code_seen != *want {
            return Err(format!(
                "exit {step}: expected exit code {want:#x}, got {code_seen:#x}"
            ));
        }
        match code_seen {
            EXIT_VMMCALL => {
                let rax: u64 = v.read(RAX);
                if rax != 0x1234 || gprs.rbx != 0xfeed_f00d {
                    return Err(format!("VMMCALL saw RAX={rax:#x} RBX={:#x}", gprs.rbx));
                }
                v.write(RAX, 0u64);
            }
            EXIT_CPUID => {
                // Emulate leaf 0 with Sluice's vendor string.
                v.write(RAX, 0u64);
                gprs.rbx = u64::from(u32::from_le_bytes(*b"Slui"));
                gprs.rdx = u64::from(u32::from_le_bytes(*b"ce-V"));
                gprs.rcx = u64::from(u32::from_le_bytes(*b"M-x8"));
            }
            _ => {}
        }
        // No NRIPS on QEMU's model: the lengths of these fixed instructions
        // are known.
        let rip: u64 = v.read(RIP);
        v.write(RIP, rip + length);
        info!(
            "svm: exit {step} code {code_seen:#x} handled, guest RIP {rip:#x} -> {:#x}",
            rip + length
        );
    }
    let rip: u64 = v.read(RIP);
    if rip != code + GUEST_CODE.len() as u64 {
        return Err(format!(
            "guest stopped at RIP {rip:#x}, expected {:#x}",
            code + GUEST_CODE.len() as u64
        ));
    }
    platform
        .frames
        .lock()
        .free(vmcb, 3)
        .map_err(|e| format!("{e}"))?;
    Ok(())
}
