//! The serial console and the `log` backend.
//!
//! x86_64 uses a 16550 (from SPCR when present, else COM1 at port 0x3f8);
//! aarch64 uses the PL011 that SPCR names. Until a console is chosen, output
//! is dropped.

pub mod pl011;
pub mod uart16550;

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

pub use pl011::Pl011;
pub use uart16550::{Uart16550, UartAccess};

pub enum Console {
    Uart16550(Uart16550),
    Pl011(Pl011),
}

impl Console {
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Uart16550(_) => "16550 UART",
            Self::Pl011(_) => "PL011 UART",
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.put(b'\r');
            }
            self.put(byte);
        }
        Ok(())
    }
}

impl Console {
    fn put(&mut self, byte: u8) {
        match self {
            Self::Uart16550(uart) => uart.put(byte),
            Self::Pl011(uart) => uart.put(byte),
        }
    }
}

static CONSOLE: Mutex<Option<Console>> = Mutex::new(None);
static PANICKING: AtomicBool = AtomicBool::new(false);

/// Installs the console; later output goes to it.
pub fn install(console: Console) {
    *CONSOLE.lock() = Some(console);
}

pub fn describe() -> Option<&'static str> {
    CONSOLE.lock().as_ref().map(Console::describe)
}

/// How many times a fatal path retries the console lock before taking it
/// anyway: long enough for another CPU to finish a line, short enough that
/// a holder that will never return (the interrupted code on this CPU)
/// costs little.
const EMERGENCY_LOCK_SPINS: u32 = 1 << 20;

/// Prints formatted text on the console. The lock keeps lines from several
/// CPUs whole.
pub fn print(args: fmt::Arguments<'_>) {
    if PANICKING.load(Ordering::Relaxed) {
        emergency_print(args);
        return;
    }
    if let Some(console) = CONSOLE.lock().as_mut() {
        let _ = console.write_fmt(args);
    }
}

/// A fatal path must never wait for good: the lock holder may be the code
/// this CPU interrupted. Wait a bounded time for another CPU to finish its
/// line, then write regardless (at worst characters interleave).
fn emergency_print(args: fmt::Arguments<'_>) {
    for _ in 0..EMERGENCY_LOCK_SPINS {
        if let Some(mut guard) = CONSOLE.try_lock() {
            if let Some(console) = guard.as_mut() {
                let _ = console.write_fmt(args);
            }
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the holder is stuck or slower than a fatal report may wait;
    // the console keeps no state a torn write could break beyond garbled
    // characters.
    unsafe { CONSOLE.force_unlock() };
    if let Some(mut guard) = CONSOLE.try_lock()
        && let Some(console) = guard.as_mut()
    {
        let _ = console.write_fmt(args);
    }
}

/// From now on printing waits only a bounded time for the console lock (a
/// panic or an exception may have interrupted its holder on this CPU).
pub fn enter_emergency() {
    PANICKING.store(true, Ordering::Relaxed);
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The `log` facade's backend: `[   seconds] LEVEL target: message`.
struct ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let micros = crate::clock::now_ns().map(|ns| ns / 1000);
        match micros {
            Some(us) => print(format_args!(
                "[{:5}.{:06}] {:5} {}: {}\n",
                us / 1_000_000,
                us % 1_000_000,
                record.level(),
                record.target(),
                record.args()
            )),
            None => print(format_args!(
                "[     -.------] {:5} {}: {}\n",
                record.level(),
                record.target(),
                record.args()
            )),
        }
    }

    fn flush(&self) {}
}

static LOGGER: ConsoleLogger = ConsoleLogger;

/// Routes `log` records to the console at `level` and above.
pub fn init_logging(level: log::LevelFilter) {
    // A second call only changes the level.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
