//! External interrupts Sluice handles itself: IDT gates for vectors
//! [`FIRST_VECTOR`]..=[`LAST_VECTOR`], one registered handler each, a
//! spurious-interrupt gate, end-of-interrupt, and bounded windows with
//! interrupts enabled.
//!
//! Sluice runs with interrupts disabled; [`with_interrupts`] opens a window
//! with the task priority raised so only these vectors (priority class 14
//! and up) are taken, and the 8259 PICs masked, since firmware's timer
//! vectors have no gate.
//!
//! The local APIC module ([`super::lapic`]) covers what starting CPUs
//! needs; EOI and TPR are written here (SDM vol. 3A 10.8.5, 10.8.3.1), in
//! xAPIC (memory-mapped) or x2APIC (MSR) mode.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use sluice_hal::{ReadWrite, Reg32};

use super::lapic::{self, ApicBase};
use super::svm;
use crate::hw::PhysMmio;

/// The vectors handlers can be registered for.
pub const FIRST_VECTOR: u8 = 0xe0;
pub const LAST_VECTOR: u8 = 0xef;
/// Gated so a spurious interrupt (SDM 10.9) is harmless; gets no EOI.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// VT-d fault events.
pub const IOMMU_FAULT_VECTOR: u8 = 0xe0;

const VECTORS: usize = (LAST_VECTOR - FIRST_VECTOR) as usize + 1;
/// TPR while a window is open: priority class 13, so classes 14-15
/// ([`FIRST_VECTOR`] and up) are delivered and everything below is held.
const WINDOW_TPR: u32 = 0xd0;

const TPR: Reg32<ReadWrite> = Reg32::new(0x80);
const EOI: Reg32<ReadWrite> = Reg32::new(0xb0);
const X2APIC_MSR_BASE: u32 = 0x800;

// Stubs push their vector; the common path saves the caller-saved
// registers (the UEFI target has no SSE state in use: soft float), keeps
// RSP 16-byte aligned at the call (CPU frame 5 + vector 1 + 10 pushes),
// and calls `sluice_interrupt_dispatch(vector)` with the System V ABI.
global_asm!(
    r#"
.macro SLUICE_IRQ_STUB n
.global sluice_irq_stub_\n
sluice_irq_stub_\n:
    push \n
    jmp sluice_irq_common
.endm
SLUICE_IRQ_STUB 224
SLUICE_IRQ_STUB 225
SLUICE_IRQ_STUB 226
SLUICE_IRQ_STUB 227
SLUICE_IRQ_STUB 228
SLUICE_IRQ_STUB 229
SLUICE_IRQ_STUB 230
SLUICE_IRQ_STUB 231
SLUICE_IRQ_STUB 232
SLUICE_IRQ_STUB 233
SLUICE_IRQ_STUB 234
SLUICE_IRQ_STUB 235
SLUICE_IRQ_STUB 236
SLUICE_IRQ_STUB 237
SLUICE_IRQ_STUB 238
SLUICE_IRQ_STUB 239
SLUICE_IRQ_STUB 255
sluice_irq_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    cld
    mov rdi, [rsp + 80]
    call sluice_interrupt_dispatch
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 8
    iretq
"#
);

unsafe extern "C" {
    safe fn sluice_irq_stub_224();
    safe fn sluice_irq_stub_225();
    safe fn sluice_irq_stub_226();
    safe fn sluice_irq_stub_227();
    safe fn sluice_irq_stub_228();
    safe fn sluice_irq_stub_229();
    safe fn sluice_irq_stub_230();
    safe fn sluice_irq_stub_231();
    safe fn sluice_irq_stub_232();
    safe fn sluice_irq_stub_233();
    safe fn sluice_irq_stub_234();
    safe fn sluice_irq_stub_235();
    safe fn sluice_irq_stub_236();
    safe fn sluice_irq_stub_237();
    safe fn sluice_irq_stub_238();
    safe fn sluice_irq_stub_239();
    safe fn sluice_irq_stub_255();
}

const STUBS: [extern "C" fn(); VECTORS] = [
    sluice_irq_stub_224,
    sluice_irq_stub_225,
    sluice_irq_stub_226,
    sluice_irq_stub_227,
    sluice_irq_stub_228,
    sluice_irq_stub_229,
    sluice_irq_stub_230,
    sluice_irq_stub_231,
    sluice_irq_stub_232,
    sluice_irq_stub_233,
    sluice_irq_stub_234,
    sluice_irq_stub_235,
    sluice_irq_stub_236,
    sluice_irq_stub_237,
    sluice_irq_stub_238,
    sluice_irq_stub_239,
];

static HANDLERS: [spin::Once<fn()>; VECTORS] = [const { spin::Once::new() }; VECTORS];
static INSTALLED: spin::Once<()> = spin::Once::new();
/// Interrupts on a vector without a handler, and spurious interrupts.
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);
static SPURIOUS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptError {
    /// Only [`FIRST_VECTOR`]..=[`LAST_VECTOR`] take handlers.
    VectorOutOfRange(u8),
    /// The vector has a handler already.
    VectorTaken(u8),
}

impl core::fmt::Display for InterruptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::VectorOutOfRange(v) => write!(
                f,
                "vector {v:#x} is outside {FIRST_VECTOR:#x}..={LAST_VECTOR:#x}"
            ),
            Self::VectorTaken(v) => write!(f, "vector {v:#x} already has a handler"),
        }
    }
}

/// Installs the gates (once) and masks the 8259 PICs, which Sluice never
/// uses: their interrupts arrive as ExtINT, which the TPR does not hold
/// back (SDM 10.8.3.1).
fn install() {
    INSTALLED.call_once(|| {
        for (i, stub) in STUBS.iter().enumerate() {
            super::exceptions::set_interrupt_gate(FIRST_VECTOR + i as u8, *stub as usize as u64);
        }
        let spurious: extern "C" fn() = sluice_irq_stub_255;
        super::exceptions::set_interrupt_gate(SPURIOUS_VECTOR, spurious as usize as u64);
        // OCW1 on both PICs: mask every line.
        super::port_write_u8(0x21, 0xff);
        super::port_write_u8(0xa1, 0xff);
    });
}

/// Runs `handler` (in interrupt context, interrupts disabled, then EOI)
/// for every interrupt on `vector`. Handlers must not block, log or
/// allocate: the interrupted code may hold the console or heap lock.
pub fn register(vector: u8, handler: fn()) -> Result<(), InterruptError> {
    if !(FIRST_VECTOR..=LAST_VECTOR).contains(&vector) {
        return Err(InterruptError::VectorOutOfRange(vector));
    }
    install();
    let slot = &HANDLERS[usize::from(vector - FIRST_VECTOR)];
    let mut fresh = false;
    slot.call_once(|| {
        fresh = true;
        handler
    });
    if fresh {
        Ok(())
    } else {
        Err(InterruptError::VectorTaken(vector))
    }
}

#[unsafe(no_mangle)]
extern "sysv64" fn sluice_interrupt_dispatch(vector: u64) {
    if vector == u64::from(SPURIOUS_VECTOR) {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let handler = vector
        .checked_sub(u64::from(FIRST_VECTOR))
        .and_then(|i| HANDLERS.get(i as usize))
        .and_then(|slot| slot.get());
    match handler {
        Some(handler) => handler(),
        None => {
            UNEXPECTED.fetch_add(1, Ordering::Relaxed);
        }
    }
    eoi();
}

/// Interrupts that arrived on a vector without a handler.
pub fn unexpected_interrupts() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// Spurious interrupts taken.
pub fn spurious_interrupts() -> u64 {
    SPURIOUS.load(Ordering::Relaxed)
}

fn physical_address_bits() -> u32 {
    if super::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        super::cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

/// This CPU's local APIC register `reg`, read or written in its mode.
fn apic_access(reg: Reg32<ReadWrite>, write: Option<u32>) -> u32 {
    let base = ApicBase::decode(
        svm::read_msr(lapic::IA32_APIC_BASE),
        physical_address_bits(),
    );
    if base.x2apic {
        let msr = X2APIC_MSR_BASE + reg.offset() as u32 / 16;
        match write {
            // SAFETY: an x2APIC register MSR, written as the SDM describes.
            Some(v) => unsafe {
                svm::write_msr(msr, u64::from(v));
                0
            },
            None => svm::read_msr(msr) as u32,
        }
    } else {
        // SAFETY: IA32_APIC_BASE names this CPU's xAPIC register page,
        // identity-mapped and uncacheable through the MTRRs.
        let mmio = unsafe { PhysMmio::new(base.address, 4096) };
        match write {
            Some(v) => {
                reg.write(&mmio, v);
                0
            }
            None => reg.read(&mmio),
        }
    }
}

/// Signals end of interrupt to this CPU's local APIC.
pub fn eoi() {
    apic_access(EOI, Some(0));
}

/// Runs `f` with interrupts enabled for vectors [`FIRST_VECTOR`] and up,
/// then disables them again and restores the task priority. Pending
/// lower-priority interrupts stay pending.
pub fn with_interrupts<R>(f: impl FnOnce() -> R) -> R {
    install();
    let saved = apic_access(TPR, None);
    apic_access(TPR, Some(WINDOW_TPR));
    // SAFETY: every vector the TPR lets through has a gate; handlers run
    // with interrupts disabled and return with IRETQ.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let result = f();
    super::disable_interrupts();
    apic_access(TPR, Some(saved));
    result
}
