//! The monotonic clock every hardware timeout uses: the TSC on x86_64
//! (calibrated against the ACPI PM timer), the generic timer on aarch64.

use core::sync::atomic::{AtomicU64, Ordering};

/// Counter ticks per second; 0 until calibrated.
static FREQUENCY: AtomicU64 = AtomicU64::new(0);
static ORIGIN: AtomicU64 = AtomicU64::new(0);

/// Starts the clock with a counter running at `ticks_per_second`.
pub fn start(ticks_per_second: u64) {
    ORIGIN.store(crate::arch::read_counter(), Ordering::Relaxed);
    FREQUENCY.store(ticks_per_second, Ordering::Relaxed);
}

pub fn frequency() -> u64 {
    FREQUENCY.load(Ordering::Relaxed)
}

/// Nanoseconds since `start`, or `None` before it.
pub fn now_ns() -> Option<u64> {
    let frequency = FREQUENCY.load(Ordering::Relaxed);
    if frequency == 0 {
        return None;
    }
    let ticks = crate::arch::read_counter().wrapping_sub(ORIGIN.load(Ordering::Relaxed));
    Some((u128::from(ticks) * 1_000_000_000 / u128::from(frequency)) as u64)
}

/// The kernel clock as the drivers see it.
pub struct KernelClock;

impl sluice_hal::Clock for KernelClock {
    fn now_ns(&self) -> u64 {
        now_ns().unwrap_or(0)
    }
}

/// Busy-waits `ns` nanoseconds (no-op before calibration).
pub fn delay_ns(ns: u64) {
    let Some(start) = now_ns() else { return };
    while now_ns().is_some_and(|t| t.saturating_sub(start) < ns) {
        core::hint::spin_loop();
    }
}
