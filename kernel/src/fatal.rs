//! The end of the road: panics, CPU exceptions and the exit status.
//!
//! Exit codes, shared with the QEMU harness: 0 success, 1 a test failed,
//! 2 panic, 3 CPU exception. Under QEMU Sluice ends the VM with the code
//! (x86: isa-debug-exit, aarch64: semihosting); on hardware it halts.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    Success = 0,
    TestFailed = 1,
    Panic = 2,
    CpuException = 3,
}

static UNDER_QEMU: AtomicBool = AtomicBool::new(false);
static CURRENT_TEST: Mutex<Option<&'static str>> = Mutex::new(None);

/// Records that the platform is QEMU, so exits end the VM with a status.
pub fn set_under_qemu(on: bool) {
    UNDER_QEMU.store(on, Ordering::Relaxed);
}

pub fn under_qemu() -> bool {
    UNDER_QEMU.load(Ordering::Relaxed)
}

/// Names the test scenario running now; fatal paths report against it.
pub fn set_current_test(name: Option<&'static str>) {
    *CURRENT_TEST.lock() = name;
}

fn current_test() -> Option<&'static str> {
    CURRENT_TEST.try_lock().and_then(|guard| *guard)
}

/// Leaves Sluice with `code`.
pub fn exit(code: ExitCode) -> ! {
    if under_qemu() {
        crate::arch::qemu_exit(code as u32);
    }
    crate::println!(
        "Sluice stopped (exit code {}); halting this CPU.",
        code as u32
    );
    crate::arch::halt_forever()
}

/// A short fixed-size text buffer for fatal paths, which must not allocate.
pub struct Reason {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Reason {
    fn default() -> Self {
        Self::new()
    }
}

impl Reason {
    pub const fn new() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 sequences are ever appended.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("<unprintable>")
    }
}

impl fmt::Write for Reason {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut buf = [0; 4];
            let encoded = c.encode_utf8(&mut buf);
            if self.len + encoded.len() > self.bytes.len() {
                return Err(fmt::Error);
            }
            self.bytes[self.len..self.len + encoded.len()].copy_from_slice(encoded.as_bytes());
            self.len += encoded.len();
        }
        Ok(())
    }
}

/// Called by the exception handlers after they printed the register dump.
pub fn cpu_exception(reason: &str) -> ! {
    if let Some(test) = current_test() {
        crate::println!("SLUICE-TEST {test} FAIL cpu exception: {reason}");
    }
    exit(ExitCode::CpuException)
}

/// Called by the binary's `#[panic_handler]`.
pub fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::console::enter_emergency();
    let mut message = Reason::new();
    let _ = fmt::write(&mut message, format_args!("{}", info.message()));
    match info.location() {
        Some(at) => crate::println!(
            "\n!!! Sluice panicked{} at {}:{}:{}: {}",
            crate::smp::CurrentCpu,
            at.file(),
            at.line(),
            at.column(),
            message.as_str()
        ),
        None => crate::println!(
            "\n!!! Sluice panicked{}: {}",
            crate::smp::CurrentCpu,
            message.as_str()
        ),
    }
    if let Some(test) = current_test() {
        crate::println!("SLUICE-TEST {test} FAIL panic: {}", message.as_str());
    }
    exit(ExitCode::Panic)
}
