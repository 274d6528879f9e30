//! Monotonic time, and the one helper every hardware wait goes through.

/// A monotonic clock in nanoseconds since an arbitrary origin.
pub trait Clock {
    fn now_ns(&self) -> u64;
}

/// A wait on hardware did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    /// How long we waited, in nanoseconds.
    pub waited_ns: u64,
}

/// Calls `poll` until it returns `Some`, or fails with [`Timeout`] once
/// `timeout_ns` have passed on `clock`. `poll` is always tried at least once,
/// and once more after the deadline, so a slow clock never causes a spurious
/// timeout for a condition that is already true.
pub fn poll_until<T>(
    clock: &dyn Clock,
    timeout_ns: u64,
    mut poll: impl FnMut() -> Option<T>,
) -> Result<T, Timeout> {
    let start = clock.now_ns();
    loop {
        if let Some(value) = poll() {
            return Ok(value);
        }
        let waited_ns = clock.now_ns().saturating_sub(start);
        if waited_ns >= timeout_ns {
            return poll().ok_or(Timeout { waited_ns });
        }
        core::hint::spin_loop();
    }
}
