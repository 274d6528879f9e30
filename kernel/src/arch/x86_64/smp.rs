//! Starting x86_64 application processors (Intel SDM vol. 3A §8.4
//! "Multiple-processor (MP) initialization"): INIT and STARTUP IPIs from the
//! boot CPU's local APIC send the processor to a trampoline page below
//! 640 KiB, which goes from real mode through 32-bit protected mode to long
//! mode on Sluice's page tables and calls into Rust on the CPU's own stack.
//! There the CPU loads its own GDT and TSS and the shared IDT.
//!
//! Per CPU Sluice keeps: a 64 KiB stack, a 16 KiB IST stack for fatal
//! exceptions, a page for the GDT and TSS, and two pages for SVM (the host
//! save area VMRUN needs and a page for the host's VMSAVE state).

use core::arch::{asm, global_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use log::{info, warn};
use spin::Once;

use super::gdt::{self, CpuTables};
use super::lapic::{self, ApicBase, LapicError, LocalApic, MsrAccess};
use super::{exceptions, svm};
use crate::clock::KernelClock;
use crate::hw::PhysMmio;
use crate::madt::Madt;
use crate::memory::frame::{FRAME_SIZE, FrameAllocator};
use crate::platform::Platform;
use crate::smp::{CpuInfo, SmpError};

/// What the MADT's hardware ID is on this architecture, for messages.
pub const HW_ID_NAME: &str = "APIC ID";

const STACK_FRAMES: u64 = 16;
const IST_FRAMES: u64 = 4;
/// SVM host save area, host VMSAVE page, GDT+TSS page, IST stack, stack.
const AP_FRAMES: u64 = 3 + IST_FRAMES + STACK_FRAMES;
/// The boot CPU keeps its stacks and tables; it only needs the SVM pages.
const BSP_FRAMES: u64 = 2;

/// How long a started CPU has to check in: the trampoline takes
/// microseconds on hardware, emulators are much slower.
const CHECK_IN_TIMEOUT_NS: u64 = 2_000_000_000;

/// STARTUP IPIs reach pages below 1 MiB, and 0xa0000 up is legacy video
/// and ROM.
const TRAMPOLINE_LIMIT: u64 = 0xa_0000;

const MSR_EFER: u32 = 0xc000_0080;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;
const CR4_PCIDE: u64 = 1 << 17;

/// A page below 640 KiB the boot code reserved from firmware for the
/// trampoline (0: none, allocate one from free memory).
static RESERVED_TRAMPOLINE: AtomicU64 = AtomicU64::new(0);

/// Hands Sluice a page below 640 KiB for the start-up trampoline; the boot
/// code reserves it before leaving boot services, when low memory is still
/// easy to find.
pub fn set_trampoline_page(page: u64) {
    RESERVED_TRAMPOLINE.store(page, Ordering::Relaxed);
}

/// Where the trampoline's data block sits in its page; the code comes
/// first and must end before it.
const DATA: usize = 0xe00;

/// The trampoline's data, written by the boot CPU before each start. Field
/// layout is what the assembly below addresses.
#[repr(C)]
struct TrampolineData {
    /// null, 32-bit code (0x08), data (0x10), 64-bit code (0x18), all flat.
    gdt: [u64; 4],
    pad0: [u16; 3],
    /// LGDT's operand: limit, then the 32-bit base (the page's physical
    /// address plus `DATA`).
    gdtr_limit: u16,
    gdtr_base: u32,
    /// `ljmpl *` operands (offset, then selector) into 32-bit and 64-bit
    /// code.
    far32_offset: u32,
    far32_selector: u16,
    pad1: u16,
    far64_offset: u32,
    far64_selector: u16,
    pad2: [u16; 3],
    /// CR4 for the 32-bit phase (the boot CPU's, without PCIDE, which
    /// needs long mode).
    cr4: u64,
    /// A page-table root below 4 GiB (a 32-bit MOV to CR3 loads it).
    cr3: u64,
    efer: u64,
    cr0: u64,
    stack_top: u64,
    entry: u64,
    arg: u64,
}
const _: () = {
    assert!(offset_of!(TrampolineData, gdtr_limit) + 2 == offset_of!(TrampolineData, gdtr_base));
    assert!(
        offset_of!(TrampolineData, far32_offset) + 4 == offset_of!(TrampolineData, far32_selector)
    );
    assert!(
        offset_of!(TrampolineData, far64_offset) + 4 == offset_of!(TrampolineData, far64_selector)
    );
    assert!(DATA + size_of::<TrampolineData>() <= FRAME_SIZE as usize);
};

const TRAMPOLINE_CODE32: u16 = 0x08;
const TRAMPOLINE_DATA32: u16 = 0x10;
const TRAMPOLINE_CODE64: u16 = 0x18;
const TRAMPOLINE_GDT: [u64; 4] = [
    0,
    0x00cf_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00af_9a00_0000_ffff,
];

// The trampoline, copied to a page P below 640 KiB. A STARTUP IPI with
// vector P >> 12 starts the CPU in real mode at CS = P >> 4, IP = 0 (SDM
// §8.4.4.1). It addresses its data relative to P: through DS = CS in real
// mode, through EBX = P after that, so it runs wherever it is copied. The
// far jumps go through pointers the boot CPU fills in (P + label offset).
// Mode switch order per SDM §9.9.1 (protected mode: LGDT, CR0.PE, far jump)
// and §9.8.5 (IA-32e mode: CR4.PAE, CR3, EFER.LME, CR0.PG, far jump).
global_asm!(
    r#"
    .p2align 4
    .global sluice_ap_trampoline
sluice_ap_trampoline:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    movzwl %ax, %ebx
    shll $4, %ebx
    lgdtl {gdtr}
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl *{far32}

    .code32
    .global sluice_ap_trampoline_32
sluice_ap_trampoline_32:
    movw ${data32}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl {cr4}(%ebx), %eax
    movl %eax, %cr4
    movl {cr3}(%ebx), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    movl {efer}(%ebx), %eax
    movl {efer_high}(%ebx), %edx
    wrmsr
    movl {cr0}(%ebx), %eax
    movl %eax, %cr0
    ljmpl *{far64}(%ebx)

    .code64
    .global sluice_ap_trampoline_64
sluice_ap_trampoline_64:
    movl %ebx, %ebx
    movq {stack}(%rbx), %rsp
    movq {arg}(%rbx), %rdi
    movq {entry}(%rbx), %rax
    callq *%rax
2:
    cli
    hlt
    jmp 2b
    .global sluice_ap_trampoline_end
sluice_ap_trampoline_end:
"#,
    gdtr = const DATA + offset_of!(TrampolineData, gdtr_limit),
    far32 = const DATA + offset_of!(TrampolineData, far32_offset),
    data32 = const TRAMPOLINE_DATA32,
    cr4 = const DATA + offset_of!(TrampolineData, cr4),
    cr3 = const DATA + offset_of!(TrampolineData, cr3),
    efer = const DATA + offset_of!(TrampolineData, efer),
    efer_high = const DATA + offset_of!(TrampolineData, efer) + 4,
    cr0 = const DATA + offset_of!(TrampolineData, cr0),
    far64 = const DATA + offset_of!(TrampolineData, far64_offset),
    stack = const DATA + offset_of!(TrampolineData, stack_top),
    arg = const DATA + offset_of!(TrampolineData, arg),
    entry = const DATA + offset_of!(TrampolineData, entry),
    options(att_syntax)
);

unsafe extern "C" {
    static sluice_ap_trampoline: u8;
    static sluice_ap_trampoline_32: u8;
    static sluice_ap_trampoline_64: u8;
    static sluice_ap_trampoline_end: u8;
}

/// What every start shares.
struct Shared {
    trampoline: u64,
    /// The boot CPU's CR3 and CR4, which every CPU ends up with.
    cr3: u64,
    cr4: u64,
}

static SHARED: Once<Shared> = Once::new();

/// One CPU's reserved memory.
pub struct CpuResources {
    base: u64,
    frames: u64,
    /// The GDT+TSS page (0 on the boot CPU, which keeps its static tables).
    tables: u64,
    ist_top: u64,
    stack_top: u64,
    /// The host save area VMRUN uses on this CPU (VM_HSAVE_PA).
    pub svm_host_save: u64,
    /// A page for the host state VMSAVE/VMLOAD keep across a VMRUN (the
    /// `host_vmsave` argument of `svm::run`).
    pub svm_host_vmsave: u64,
}

struct CpuMsrs;

impl MsrAccess for CpuMsrs {
    fn read_msr(&self, msr: u32) -> u64 {
        svm::read_msr(msr)
    }
    fn write_msr(&self, msr: u32, value: u64) {
        // SAFETY: only local APIC MSRs reach here, written as the SDM
        // describes.
        unsafe { svm::write_msr(msr, value) }
    }
}

type Apic = LocalApic<PhysMmio, CpuMsrs>;

fn physical_address_bits() -> u32 {
    if super::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        super::cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

fn apic_base() -> ApicBase {
    ApicBase::decode(
        svm::read_msr(lapic::IA32_APIC_BASE),
        physical_address_bits(),
    )
}

/// The running CPU's local APIC, in the mode it is in.
fn local_apic() -> Result<Apic, SmpError> {
    let base = apic_base();
    if !base.enabled {
        return Err(SmpError::ApicDisabled);
    }
    Ok(if base.x2apic {
        LocalApic::X2apic(CpuMsrs)
    } else {
        // SAFETY: IA32_APIC_BASE names this CPU's xAPIC register page; the
        // MTRRs make it uncacheable, and only start-up code touches it.
        LocalApic::Xapic(unsafe { PhysMmio::new(base.address, FRAME_SIZE) })
    })
}

impl From<LapicError> for SmpError {
    fn from(e: LapicError) -> Self {
        match e {
            LapicError::NeedsX2apic { apic_id } => Self::ApicIdNeedsX2apic { apic_id },
            LapicError::NotAccepted {
                apic_id, waited_ns, ..
            } => Self::IpiNotAccepted { apic_id, waited_ns },
            LapicError::BadStartupPage { address } => Self::BadTrampolinePage { address },
        }
    }
}

/// The running CPU's APIC ID (the local APIC's, else CPUID's initial one).
pub fn this_cpu_hw_id() -> u64 {
    match local_apic() {
        Ok(apic) => u64::from(apic.id()),
        Err(_) => u64::from(super::cpuid(1, 0).ebx >> 24),
    }
}

/// The running CPU's index, from the marker in its GDT.
pub fn current_index() -> Option<usize> {
    gdt::current_cpu_index().map(|i| i as usize)
}

fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Sets up the trampoline page once.
pub(crate) fn init(platform: &Platform, madt: &Madt<'_>) -> Result<(), SmpError> {
    let apic = local_apic()?;
    let base = apic_base();
    if !base.x2apic && base.address != madt.local_apic_base() {
        warn!(
            "smp: IA32_APIC_BASE says {:#x}, the MADT {:#x}; using the MSR",
            base.address,
            madt.local_apic_base()
        );
    }
    if apic.software_enable() {
        info!("smp: software-enabled the boot CPU's local APIC");
    }
    info!(
        "smp: local APIC in {} mode, version {:#x}",
        if apic.is_x2apic() { "x2APIC" } else { "xAPIC" },
        apic.version() & 0xff
    );

    let code_start = &raw const sluice_ap_trampoline as u64;
    let code_len = &raw const sluice_ap_trampoline_end as u64 - code_start;
    if code_len > DATA as u64 {
        return Err(SmpError::Unsupported(
            "the start-up trampoline's code overlaps its data block",
        ));
    }
    let mut frames = platform.frames.lock();
    let page = match RESERVED_TRAMPOLINE.load(Ordering::Relaxed) {
        0 => frames
            .allocate_below(1, FRAME_SIZE, TRAMPOLINE_LIMIT)
            .map_err(|_| SmpError::NoLowMemory)?,
        reserved => reserved,
    };
    lapic::startup_vector(page)?;
    let cr3 = super::read_cr3();
    let root = cr3 & !0xfff;
    // The 32-bit phase loads CR3 with a 32-bit MOV: a root above 4 GiB is
    // copied below (only the top level; its entries are 64-bit).
    let ap_root = if root + FRAME_SIZE <= 1 << 32 {
        root
    } else {
        let low = frames
            .allocate_below(1, FRAME_SIZE, 1 << 32)
            .map_err(|_| SmpError::OutOfMemory)?;
        // SAFETY: `low` was just allocated to us; `root` is the live PML4;
        // both are identity-mapped pages.
        unsafe { core::ptr::copy_nonoverlapping(root as *const u8, low as *mut u8, 4096) };
        info!("smp: page-table root {root:#x} is above 4 GiB; CPUs start on a copy at {low:#x}");
        low
    };
    drop(frames);

    // SAFETY: the page is ours (reserved by the boot code or just
    // allocated), identity-mapped, and no CPU runs it yet.
    unsafe {
        core::ptr::copy_nonoverlapping(code_start as *const u8, page as *mut u8, code_len as usize);
        let data = (page + DATA as u64) as *mut TrampolineData;
        let offset = |symbol: u64| (page + symbol - code_start) as u32;
        data.write(TrampolineData {
            gdt: TRAMPOLINE_GDT,
            pad0: [0; 3],
            gdtr_limit: (size_of::<[u64; 4]>() - 1) as u16,
            gdtr_base: (page + DATA as u64) as u32,
            far32_offset: offset(&raw const sluice_ap_trampoline_32 as u64),
            far32_selector: TRAMPOLINE_CODE32,
            pad1: 0,
            far64_offset: offset(&raw const sluice_ap_trampoline_64 as u64),
            far64_selector: TRAMPOLINE_CODE64,
            pad2: [0; 3],
            cr4: read_cr4() & !CR4_PCIDE,
            cr3: ap_root,
            efer: svm::read_msr(MSR_EFER) & (EFER_SCE | EFER_LME | EFER_NXE) | EFER_LME,
            cr0: read_cr0(),
            stack_top: 0,
            entry: sluice_ap_entry as *const () as u64,
            arg: 0,
        });
    }
    info!("smp: start-up trampoline at {page:#x} ({code_len} bytes of code)");
    SHARED.call_once(|| Shared {
        trampoline: page,
        cr3,
        cr4: read_cr4(),
    });
    Ok(())
}

/// Reserves one CPU's memory.
pub(crate) fn prepare_cpu(
    frames: &mut FrameAllocator,
    info: CpuInfo,
) -> Result<CpuResources, SmpError> {
    let count = if info.index == 0 {
        BSP_FRAMES
    } else {
        AP_FRAMES
    };
    let base = frames
        .allocate(count, FRAME_SIZE)
        .map_err(|_| SmpError::OutOfMemory)?;
    // SAFETY: fresh identity-mapped frames; the SVM pages and the tables
    // must start zeroed.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, (3.min(count) * FRAME_SIZE) as usize) };
    let end = base + count * FRAME_SIZE;
    Ok(if info.index == 0 {
        CpuResources {
            base,
            frames: count,
            tables: 0,
            ist_top: 0,
            stack_top: 0,
            svm_host_save: base,
            svm_host_vmsave: base + FRAME_SIZE,
        }
    } else {
        CpuResources {
            base,
            frames: count,
            svm_host_save: base,
            svm_host_vmsave: base + FRAME_SIZE,
            tables: base + 2 * FRAME_SIZE,
            ist_top: base + (3 + IST_FRAMES) * FRAME_SIZE,
            stack_top: end,
        }
    })
}

pub(crate) fn release_cpu(frames: &mut FrameAllocator, resources: CpuResources) {
    if let Err(e) = frames.free(resources.base, resources.frames) {
        warn!("smp: {e}");
    }
}

/// Nothing to do: the boot CPU's GDT carries index 0 since `gdt::init`.
pub(crate) fn boot_cpu_ready() {}

/// Sends INIT/STARTUP/STARTUP to `cpu` and waits for it to check in.
pub(crate) fn boot(cpu: &crate::smp::Cpu, arrived: &dyn Fn() -> bool) -> Result<(), SmpError> {
    let shared = SHARED.get().ok_or(SmpError::NotInitialized)?;
    let apic_id = u32::try_from(cpu.info.hw_id)
        .map_err(|_| SmpError::ApicIdNeedsX2apic { apic_id: u32::MAX })?;
    let data = (shared.trampoline + DATA as u64) as *mut TrampolineData;
    // SAFETY: the trampoline page is ours; starts are serialized, and the
    // previous CPU read these fields before it checked in.
    unsafe {
        (&raw mut (*data).stack_top).write_volatile(cpu.arch.stack_top);
        (&raw mut (*data).arg).write_volatile(cpu.info.index as u64);
    }
    // The stores above must be visible before the IPI starts the CPU.
    fence(Ordering::SeqCst);
    let apic = local_apic()?;
    let clock = KernelClock;
    let report = lapic::start_processor(&apic, &clock, apic_id, shared.trampoline, arrived)?;
    if report.errors != 0 {
        warn!(
            "smp: local APIC error status {:#x} after starting APIC ID {apic_id:#x}",
            report.errors
        );
    }
    sluice_hal::poll_until(&clock, CHECK_IN_TIMEOUT_NS, || arrived().then_some(())).map_err(|t| {
        // Back to wait-for-STARTUP, so it cannot run the trampoline
        // later while another CPU uses it.
        if let Err(e) = lapic::park_processor(&apic, &clock, apic_id) {
            warn!("smp: could not park APIC ID {apic_id:#x}: {e}");
        }
        SmpError::StartTimeout {
            index: cpu.info.index,
            hw_id: cpu.info.hw_id,
            waited_ns: t.waited_ns,
        }
    })
}

/// Where the trampoline lands, in long mode on the CPU's own stack.
extern "sysv64" fn sluice_ap_entry(index: usize) -> ! {
    let (Some(cpu), Some(shared)) = (crate::smp::resources(index), SHARED.get()) else {
        super::halt_forever()
    };
    // SAFETY: the tables page and IST stack were reserved for this CPU in
    // `prepare_cpu` and live forever.
    unsafe {
        gdt::load(
            cpu.arch.tables as *mut CpuTables,
            cpu.arch.ist_top,
            index as u32,
        )
    };
    exceptions::load();
    // SAFETY: the boot CPU's root and CR4 describe the same identity map
    // this CPU runs on (the trampoline may have used a copy below 4 GiB).
    unsafe {
        if super::read_cr3() != shared.cr3 {
            super::write_cr3(shared.cr3);
        }
        if read_cr4() != shared.cr4 {
            asm!("mov cr4, {}", in(reg) shared.cr4, options(nostack, preserves_flags));
        }
    }
    crate::smp::cpu_arrived(index)
}

/// What an idle CPU does between looks at its mailbox: PAUSE (Sluice
/// takes no interrupts yet, so HLT would never end).
pub(crate) fn idle_wait() {
    core::hint::spin_loop();
}

/// Nothing to wake: idle CPUs poll.
pub(crate) fn wake_idle() {}

/// This CPU's SVM pages, once `smp::init` has run.
pub fn svm_pages() -> Option<(u64, u64)> {
    let index = current_index()?;
    let cpu = crate::smp::resources(index)?;
    Some((cpu.arch.svm_host_save, cpu.arch.svm_host_vmsave))
}

/// Detects SVM and enables it on the running CPU with that CPU's own host
/// save area; returns the features. Every CPU that runs guests calls this
/// once.
pub fn enable_svm() -> Result<svm::SvmFeatures, SmpError> {
    let (host_save, _) = svm_pages().ok_or(SmpError::NotInitialized)?;
    let features = svm::detect().map_err(SmpError::Svm)?;
    // SAFETY: SVM is present (detected above); the page is this CPU's alone
    // for Sluice's life.
    unsafe { svm::enable(host_save) };
    Ok(features)
}
