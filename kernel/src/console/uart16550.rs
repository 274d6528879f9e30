//! 16550-compatible UART, transmit only, polled.
//!
//! Register offsets from the PC16550D datasheet: THR 0, IER 1, FCR 2,
//! LCR 3, MCR 4, LSR 5 (bit 5 THRE: transmit holding register empty).

const THR: u64 = 0;
const IER: u64 = 1;
const FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const DLL: u64 = 0;
const DLM: u64 = 1;
const LSR_THRE: u8 = 1 << 5;

/// How the UART's registers are reached.
#[derive(Debug, Clone, Copy)]
pub enum UartAccess {
    /// x86 I/O ports at `base + register`.
    #[cfg(target_arch = "x86_64")]
    Port(u16),
    /// Memory-mapped, registers `stride` bytes apart, accessed with 8- or
    /// 32-bit loads and stores as SPCR's access size says.
    Mmio { base: u64, stride: u64, wide: bool },
}

pub struct Uart16550 {
    access: UartAccess,
}

impl Uart16550 {
    /// Programs 115200 8N1 with FIFOs on, interrupts off.
    ///
    /// # Safety
    /// `access` must name a 16550's registers that nothing else drives.
    pub unsafe fn new(access: UartAccess) -> Self {
        let uart = Self { access };
        uart.write(IER, 0);
        uart.write(LCR, 0x80); // DLAB on
        uart.write(DLL, 1); // divisor 1: 115200 baud from 1.8432 MHz
        uart.write(DLM, 0);
        uart.write(LCR, 0x03); // 8N1, DLAB off
        uart.write(FCR, 0x07);
        uart.write(MCR, 0x03);
        uart
    }

    pub fn put(&mut self, byte: u8) {
        // Bounded wait: a missing or wedged UART must not hang Sluice.
        for _ in 0..100_000 {
            if self.read(LSR) & LSR_THRE != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        self.write(THR, byte);
    }

    fn write(&self, register: u64, value: u8) {
        match self.access {
            #[cfg(target_arch = "x86_64")]
            UartAccess::Port(base) => crate::arch::port_write_u8(base + register as u16, value),
            UartAccess::Mmio { base, stride, wide } => {
                let addr = base + register * stride;
                // SAFETY: `new`'s contract: this is the UART's register block,
                // identity-mapped as device memory.
                unsafe {
                    if wide {
                        core::ptr::write_volatile(addr as *mut u32, u32::from(value))
                    } else {
                        core::ptr::write_volatile(addr as *mut u8, value)
                    }
                }
            }
        }
    }

    fn read(&self, register: u64) -> u8 {
        match self.access {
            #[cfg(target_arch = "x86_64")]
            UartAccess::Port(base) => crate::arch::port_read_u8(base + register as u16),
            UartAccess::Mmio { base, stride, wide } => {
                let addr = base + register * stride;
                // SAFETY: as in `write`.
                unsafe {
                    if wide {
                        core::ptr::read_volatile(addr as *const u32) as u8
                    } else {
                        core::ptr::read_volatile(addr as *const u8)
                    }
                }
            }
        }
    }
}
