//! Arm PL011 UART, transmit only, polled (Arm PrimeCell UART PL011 TRM:
//! UARTDR at 0x000, UARTFR at 0x018 with TXFF bit 5).

const UARTDR: u64 = 0x000;
const UARTFR: u64 = 0x018;
const FR_TXFF: u32 = 1 << 5;

pub struct Pl011 {
    base: u64,
}

impl Pl011 {
    /// Uses the UART as firmware left it configured.
    ///
    /// # Safety
    /// `base` must be a PL011's register block, identity-mapped as device
    /// memory, that nothing else drives.
    pub const unsafe fn new(base: u64) -> Self {
        Self { base }
    }

    pub fn put(&mut self, byte: u8) {
        for _ in 0..100_000 {
            // SAFETY: `new`'s contract.
            let flags = unsafe { core::ptr::read_volatile((self.base + UARTFR) as *const u32) };
            if flags & FR_TXFF == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: `new`'s contract.
        unsafe { core::ptr::write_volatile((self.base + UARTDR) as *mut u32, u32::from(byte)) };
    }
}
