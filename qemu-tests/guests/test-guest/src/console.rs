//! The console and the result lines Sluice collects from it.
//!
//! Line protocol (one line per step, nothing else starts with these words):
//! `GUEST-TEST <step> PASS`, `GUEST-TEST <step> FAIL <reason>`,
//! `GUEST-INFO <text>`, at most once `GUEST-READY`, and last `GUEST-DONE passed=<n> failed=<m>`.
//! Lines starting with `SLUICE-TEST` are Sluice's own and never printed here.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::arch;

/// Console kinds of the start info (0 is none).
pub mod kind {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub const X86_PORT: u32 = 1;
    pub const MMIO: u32 = 2;
}

static KIND: AtomicU32 = AtomicU32::new(arch::DEFAULT_CONSOLE.0);
static ADDRESS: AtomicU64 = AtomicU64::new(arch::DEFAULT_CONSOLE.1);
static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Uses the console the start info names.
pub fn set_console(kind: u32, address: u64) {
    KIND.store(kind, Ordering::Relaxed);
    ADDRESS.store(address, Ordering::Relaxed);
}

fn put_byte(byte: u8) {
    let address = ADDRESS.load(Ordering::Relaxed);
    match KIND.load(Ordering::Relaxed) {
        #[cfg(target_arch = "x86_64")]
        kind::X86_PORT => {
            if let Ok(port) = u16::try_from(address) {
                arch::port_write_byte(port, byte);
            }
        }
        // SAFETY: the start info names this byte register as the console.
        kind::MMIO => unsafe { arch::mmio_write8(address, byte) },
        _ => {}
    }
}

/// Writes to the console (host unit tests print nothing).
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if cfg!(not(test)) {
            s.bytes().for_each(put_byte);
        }
        Ok(())
    }
}

/// Longest reason: a result line stays under Sluice's 200-character
/// console line (longer ones are split, and the rest would not be a result
/// line).
const REASON_MAX: usize = 140;

/// A failure reason, formatted into a fixed buffer (the guest has no heap);
/// text beyond the buffer is cut.
pub struct Reason {
    bytes: [u8; REASON_MAX],
    len: usize,
}

impl Reason {
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut r = Reason {
            bytes: [0; REASON_MAX],
            len: 0,
        };
        let _ = r.write_fmt(args);
        r
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 sequences are ever appended.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

impl Write for Reason {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            // One line: a newline in a reason would forge a result line.
            let c = if c.is_control() { ' ' } else { c };
            let mut buf = [0u8; 4];
            let encoded = c.encode_utf8(&mut buf).as_bytes();
            if self.len + encoded.len() > self.bytes.len() {
                break;
            }
            self.bytes[self.len..self.len + encoded.len()].copy_from_slice(encoded);
            self.len += encoded.len();
        }
        Ok(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Err(Reason)` from a format string.
macro_rules! fail {
    ($($t:tt)*) => {
        Err($crate::console::Reason::new(format_args!($($t)*)))
    };
}
pub(crate) use fail;

/// What a step returns.
pub type Outcome = Result<(), Reason>;

/// Counts and prints step results.
pub struct Report;

impl Report {
    pub fn new() -> Self {
        Report
    }

    pub fn pass(&mut self, step: &str) {
        PASSED.fetch_add(1, Ordering::Relaxed);
        let _ = writeln!(Console, "GUEST-TEST {step} PASS");
    }

    pub fn fail(&mut self, step: &str, reason: impl fmt::Display) {
        FAILED.fetch_add(1, Ordering::Relaxed);
        let _ = writeln!(
            Console,
            "GUEST-TEST {step} FAIL {}",
            Reason::new(format_args!("{reason}"))
        );
    }

    /// Prints the step's line; true when it passed.
    pub fn step(&mut self, step: &str, outcome: Outcome) -> bool {
        match outcome {
            Ok(()) => {
                self.pass(step);
                true
            }
            Err(reason) => {
                self.fail(step, reason);
                false
            }
        }
    }

    pub fn info(&mut self, args: fmt::Arguments<'_>) {
        let _ = writeln!(Console, "GUEST-INFO {}", Reason::new(args));
    }

    /// `GUEST-READY`: what other VMs wait for is in place (Sluice starts
    /// its further VMs only after the first one says so, or ends).
    pub fn ready(&mut self) {
        let _ = writeln!(Console, "GUEST-READY");
    }

    /// The closing line, then halt.
    pub fn done(&mut self) -> ! {
        finish()
    }
}

fn finish() -> ! {
    let _ = writeln!(
        Console,
        "GUEST-DONE passed={} failed={}",
        PASSED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed)
    );
    arch::halt()
}

/// A panic is a bug in this guest: one failed step naming it, then done.
#[cfg(not(test))]
pub fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    FAILED.fetch_add(1, Ordering::Relaxed);
    let _ = writeln!(
        Console,
        "GUEST-TEST panic FAIL {}",
        Reason::new(format_args!("{info}"))
    );
    finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_stay_on_one_line_and_are_bounded() {
        let r = Reason::new(format_args!("a\nGUEST-DONE passed=1 failed=0\r{}", 5));
        assert_eq!(r.as_str(), "a GUEST-DONE passed=1 failed=0 5");
        let long = Reason::new(format_args!("{}", "é".repeat(200)));
        assert_eq!(long.as_str().chars().count(), REASON_MAX / 2);
        let outcome: Outcome = fail!("errno {}", 14);
        assert_eq!(outcome.unwrap_err().as_str(), "errno 14");
    }
}
