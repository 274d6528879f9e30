//! Starting aarch64 CPUs with PSCI CPU_ON (Arm DEN0022 §5.6), over the
//! conduit the FADT names. The new CPU enters an assembly stub at EL2 with
//! its MMU off; the stub installs the boot CPU's EL2 translation regime
//! (MAIR, TCR, TTBR0, HCR, CPTR, SCTLR) and Sluice's vectors, switches to
//! the CPU's own stack and calls into Rust.
//!
//! Per CPU Sluice keeps a 64 KiB stack and one page for the start-up block
//! the stub reads. TPIDR_EL2, which only EL2 can touch, holds the CPU index.

use core::arch::{asm, global_asm};
use core::mem::offset_of;

use acpi::AcpiTable;
use log::{info, warn};
use spin::Once;

use crate::clock::KernelClock;
use crate::madt::{MPIDR_AFFINITY_MASK, Madt};
use crate::memory::frame::{FRAME_SIZE, FrameAllocator};
use crate::platform::Platform;
use crate::psci::{self, AffinityState, Conduit, PsciError, Version, function};
use crate::smp::{CpuInfo, SmpError};

/// What the MADT's hardware ID is on this architecture, for messages.
pub const HW_ID_NAME: &str = "MPIDR";

const STACK_FRAMES: u64 = 16;
/// The start-up block page, then the stack.
const AP_FRAMES: u64 = 1 + STACK_FRAMES;

/// How long a started CPU has to check in.
const CHECK_IN_TIMEOUT_NS: u64 = 2_000_000_000;

/// TPIDR_EL2 holds this marker in bits 63:48 and the CPU index in 31:0, so
/// a value firmware left there is not mistaken for an index.
const CPU_MARKER: u64 = 0x511c << 48;

/// What the stub loads, in this order of fields (the assembly below
/// addresses them by offset).
#[repr(C)]
struct StartupBlock {
    hcr: u64,
    mair: u64,
    tcr: u64,
    ttbr0: u64,
    cptr: u64,
    vbar: u64,
    sctlr: u64,
    stack_top: u64,
    entry: u64,
    index: u64,
}
const _: () = assert!(size_of::<StartupBlock>() <= FRAME_SIZE as usize);

// PSCI starts the CPU here at EL2 with the MMU and caches off, x0 = the
// context ID (the start-up block's address, identity-mapped). The regime
// goes in before SCTLR_EL2.M turns the MMU on, with the TLBs and I-cache
// invalidated first (Arm ARM D5.10 "TLB maintenance"; B2.4 "Caches").
global_asm!(
    r#"
    .balign 8
    .global sluice_ap_entry_el2
sluice_ap_entry_el2:
    msr daifset, #0xf
    ldr x1, [x0, #{hcr}]
    msr hcr_el2, x1
    isb
    ldr x1, [x0, #{mair}]
    msr mair_el2, x1
    ldr x1, [x0, #{tcr}]
    msr tcr_el2, x1
    ldr x1, [x0, #{ttbr0}]
    msr ttbr0_el2, x1
    ldr x1, [x0, #{cptr}]
    msr cptr_el2, x1
    ldr x1, [x0, #{vbar}]
    msr vbar_el2, x1
    isb
    tlbi alle2
    dsb ish
    ic iallu
    dsb ish
    isb
    ldr x1, [x0, #{sctlr}]
    msr sctlr_el2, x1
    isb
    msr spsel, #1
    ldr x1, [x0, #{stack}]
    mov sp, x1
    ldr x1, [x0, #{entry}]
    blr x1
1:
    wfi
    b 1b
    .global sluice_ap_entry_el2_end
sluice_ap_entry_el2_end:
"#,
    hcr = const offset_of!(StartupBlock, hcr),
    mair = const offset_of!(StartupBlock, mair),
    tcr = const offset_of!(StartupBlock, tcr),
    ttbr0 = const offset_of!(StartupBlock, ttbr0),
    cptr = const offset_of!(StartupBlock, cptr),
    vbar = const offset_of!(StartupBlock, vbar),
    sctlr = const offset_of!(StartupBlock, sctlr),
    stack = const offset_of!(StartupBlock, stack_top),
    entry = const offset_of!(StartupBlock, entry),
);

unsafe extern "C" {
    static sluice_ap_entry_el2: u8;
    static sluice_ap_entry_el2_end: u8;
}

/// One CPU's reserved memory (none for the boot CPU).
pub struct CpuResources {
    base: u64,
    frames: u64,
    block: u64,
    stack_top: u64,
}

/// The boot CPU's EL2 regime, repeated on every CPU.
struct Shared {
    conduit: Conduit,
    regime: [u64; 7],
}

static SHARED: Once<Shared> = Once::new();

macro_rules! read_sysreg {
    ($name:literal) => {{
        let value: u64;
        // SAFETY: reading an EL2 system register has no side effects.
        unsafe {
            asm!(concat!("mrs {}, ", $name), out(reg) value, options(nomem, nostack, preserves_flags))
        };
        value
    }};
}

/// The running CPU's MPIDR affinity fields, as the MADT lists them.
pub fn this_cpu_hw_id() -> u64 {
    read_sysreg!("mpidr_el1") & MPIDR_AFFINITY_MASK
}

/// The running CPU's index, from TPIDR_EL2.
pub fn current_index() -> Option<usize> {
    let value = read_sysreg!("tpidr_el2");
    (value & !0xffff_ffff == CPU_MARKER).then_some(value as u32 as usize)
}

fn set_current_index(index: usize) {
    // SAFETY: TPIDR_EL2 is a software register that only Sluice uses.
    unsafe {
        asm!("msr tpidr_el2, {}", in(reg) CPU_MARKER | index as u64, options(nomem, nostack, preserves_flags))
    };
}

fn call(conduit: Conduit, function: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    let mut x0 = u64::from(function);
    // SAFETY: a PSCI call per SMCCC (Arm DEN0028): arguments in x1-x3, the
    // result in x0; the caller-saved registers may be clobbered.
    unsafe {
        match conduit {
            Conduit::Smc => asm!(
                "smc #0",
                inout("x0") x0,
                inout("x1") a1 => _,
                inout("x2") a2 => _,
                inout("x3") a3 => _,
                clobber_abi("C"),
                options(nostack)
            ),
            Conduit::Hvc => asm!(
                "hvc #0",
                inout("x0") x0,
                inout("x1") a1 => _,
                inout("x2") a2 => _,
                inout("x3") a3 => _,
                clobber_abi("C"),
                options(nostack)
            ),
        }
    }
    x0
}

/// ACPI 6.5 §5.2.9 table 5.9: the ARM boot architecture flags are the u16
/// at offset 129 of the FADT (revision 5 and later).
const FADT_ARM_BOOT_FLAGS_END: u32 = 131;

/// Chooses the PSCI conduit, checks the PSCI version and records the
/// regime the other CPUs will repeat.
pub(crate) fn init(platform: &Platform, madt: &Madt<'_>) -> Result<(), SmpError> {
    let acpi = platform.acpi.as_ref().ok_or(SmpError::NoAcpi)?;
    let fadt = acpi
        .fadt()
        .ok_or(SmpError::Unsupported("firmware published no FADT"))?;
    if { fadt.header().length } < FADT_ARM_BOOT_FLAGS_END {
        return Err(SmpError::Unsupported(
            "the FADT is too short to carry the ARM boot architecture flags",
        ));
    }
    let flags = { fadt.arm_boot_arch };
    let conduit = psci::conduit(
        flags.implements_psci(),
        flags.use_hvc_as_psci_conduit(),
        super::current_el(),
    )
    .map_err(SmpError::PsciConduit)?;
    let raw = call(conduit, function::PSCI_VERSION, 0, 0, 0);
    let version = PsciError::check(raw)
        .map(Version::from_raw)
        .map_err(|error| SmpError::Psci {
            call: "PSCI_VERSION",
            error,
        })?;
    if !version.has_standard_cpu_on() {
        return Err(SmpError::PsciTooOld {
            major: version.major,
            minor: version.minor,
        });
    }
    match madt.gicd() {
        Some(gicd) => info!(
            "smp: PSCI {version} via {conduit:?}; GICv{} distributor at {:#x}, {} redistributor ranges",
            gicd.version,
            gicd.physical_base,
            madt.gicr().count()
        ),
        None => info!("smp: PSCI {version} via {conduit:?}; the MADT lists no GIC distributor"),
    }
    let regime = [
        read_sysreg!("hcr_el2"),
        read_sysreg!("mair_el2"),
        read_sysreg!("tcr_el2"),
        read_sysreg!("ttbr0_el2"),
        read_sysreg!("cptr_el2"),
        read_sysreg!("vbar_el2"),
        read_sysreg!("sctlr_el2"),
    ];
    // SCTLR_EL2.M (bit 0): without the MMU on, there is no regime to share.
    if regime[6] & 1 == 0 {
        return Err(SmpError::Unsupported(
            "the boot CPU runs with its EL2 MMU off",
        ));
    }
    SHARED.call_once(|| Shared { conduit, regime });
    Ok(())
}

pub(crate) fn prepare_cpu(
    frames: &mut FrameAllocator,
    info: CpuInfo,
) -> Result<CpuResources, SmpError> {
    if info.index == 0 {
        return Ok(CpuResources {
            base: 0,
            frames: 0,
            block: 0,
            stack_top: 0,
        });
    }
    let base = frames
        .allocate(AP_FRAMES, FRAME_SIZE)
        .map_err(|_| SmpError::OutOfMemory)?;
    Ok(CpuResources {
        base,
        frames: AP_FRAMES,
        block: base,
        stack_top: base + AP_FRAMES * FRAME_SIZE,
    })
}

pub(crate) fn release_cpu(frames: &mut FrameAllocator, resources: CpuResources) {
    if resources.frames > 0
        && let Err(e) = frames.free(resources.base, resources.frames)
    {
        warn!("smp: {e}");
    }
}

/// The boot CPU is CPU 0.
pub(crate) fn boot_cpu_ready() {
    set_current_index(0);
}

/// CPU_ON for `cpu`, then waits for it to check in.
pub(crate) fn boot(cpu: &crate::smp::Cpu, arrived: &dyn Fn() -> bool) -> Result<(), SmpError> {
    let shared = SHARED.get().ok_or(SmpError::NotInitialized)?;
    let [hcr, mair, tcr, ttbr0, cptr, vbar, sctlr] = shared.regime;
    let block = StartupBlock {
        hcr,
        mair,
        tcr,
        ttbr0,
        cptr,
        vbar,
        sctlr,
        stack_top: cpu.arch.stack_top,
        entry: sluice_ap_entry as *const () as u64,
        index: cpu.info.index as u64,
    };
    // SAFETY: the block page was reserved for this CPU in `prepare_cpu`;
    // the CPU is off, so nothing reads it yet.
    unsafe { (cpu.arch.block as *mut StartupBlock).write_volatile(block) };
    // The new CPU reads the block and the stub with its caches off: both
    // must be in memory, not only in this CPU's caches.
    super::clean_dcache_range(cpu.arch.block, size_of::<StartupBlock>() as u64);
    let stub = &raw const sluice_ap_entry_el2 as u64;
    let stub_end = &raw const sluice_ap_entry_el2_end as u64;
    super::clean_dcache_range(stub, stub_end - stub);

    let raw = call(
        shared.conduit,
        function::CPU_ON_64,
        cpu.info.hw_id,
        stub,
        cpu.arch.block,
    );
    PsciError::check(raw).map_err(|error| SmpError::Psci {
        call: "CPU_ON",
        error,
    })?;
    let clock = KernelClock;
    sluice_hal::poll_until(&clock, CHECK_IN_TIMEOUT_NS, || arrived().then_some(())).map_err(|t| {
        let state = PsciError::check(call(
            shared.conduit,
            function::AFFINITY_INFO_64,
            cpu.info.hw_id,
            0,
            0,
        ))
        .map(AffinityState::from_raw);
        warn!(
            "smp: MPIDR {:#x} did not check in; firmware says it is {state:?}",
            cpu.info.hw_id
        );
        SmpError::StartTimeout {
            index: cpu.info.index,
            hw_id: cpu.info.hw_id,
            waited_ns: t.waited_ns,
        }
    })
}

/// What an idle CPU does between looks at its mailbox: WFE, until an event
/// such as [`wake_idle`]'s SEV (Arm ARM D1.6.1 "Wait for Event").
pub(crate) fn idle_wait() {
    // SAFETY: WFE only pauses this CPU until the next event.
    unsafe { asm!("wfe", options(nomem, nostack, preserves_flags)) };
}

/// Wakes CPUs waiting in [`idle_wait`] once the mailbox store is visible.
pub(crate) fn wake_idle() {
    // SAFETY: DSB orders the earlier stores; SEV only signals an event.
    unsafe { asm!("dsb ishst", "sev", options(nostack, preserves_flags)) };
}

/// Where the stub lands: MMU on, Sluice's vectors, the CPU's own stack.
extern "C" fn sluice_ap_entry(block: &StartupBlock) -> ! {
    let index = block.index as usize;
    set_current_index(index);
    crate::smp::cpu_arrived(index)
}
