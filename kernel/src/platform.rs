//! Bringing the machine under Sluice's control once firmware is gone.

use alloc::vec::Vec;

use log::{error, info, warn};
use spin::Mutex;

use crate::acpi_tables::Acpi;
use crate::boot_info::{BootInfo, GuestImage, MemoryRegion, summarize};
use crate::cmdline::CommandLine;
use crate::memory::frame::FrameAllocator;

/// Everything Sluice owns after `init`.
pub struct Platform {
    pub command_line: CommandLine,
    pub memory_map: Vec<MemoryRegion>,
    pub acpi: Option<Acpi>,
    pub frames: Mutex<FrameAllocator>,
    /// Bytes of physical address space the hypervisor's identity map covers.
    pub identity_mapped_bytes: u64,
    /// The guest images read from the ESP (see [`BootInfo::guest_images`]);
    /// look one up with [`crate::boot_info::find_guest_image`].
    pub guest_images: Vec<GuestImage>,
}

/// Chooses the console: SPCR's UART when firmware describes one, else the
/// architecture's default (COM1 on x86_64; on aarch64 QEMU virt's PL011 only
/// when running under QEMU).
pub fn install_console(acpi: Option<&Acpi>) {
    use crate::console::{Console, Pl011, Uart16550, UartAccess};
    use acpi::address::AddressSpace;
    use acpi::spcr::SpcrInterfaceType;

    if let Some(spcr) = acpi.and_then(Acpi::spcr) {
        let interface = spcr.interface_type();
        if let Some(Ok(address)) = spcr.base_address() {
            let is_mmio = address.address_space == AddressSpace::SystemMemory;
            match interface {
                SpcrInterfaceType::Full16550 | SpcrInterfaceType::Full16450 => {
                    let access = match address.address_space {
                        #[cfg(target_arch = "x86_64")]
                        AddressSpace::SystemIo => Some(UartAccess::Port(address.address as u16)),
                        AddressSpace::SystemMemory => Some(UartAccess::Mmio {
                            base: address.address,
                            stride: if address.bit_width >= 32 { 4 } else { 1 },
                            wide: address.bit_width >= 32,
                        }),
                        _ => None,
                    };
                    if let Some(access) = access {
                        // SAFETY: SPCR names this UART as the console.
                        crate::console::install(Console::Uart16550(unsafe {
                            Uart16550::new(access)
                        }));
                        return;
                    }
                }
                SpcrInterfaceType::ArmPL011
                | SpcrInterfaceType::ArmSBSAGeneric
                | SpcrInterfaceType::ArmSBSAGeneric32bit
                    if is_mmio =>
                {
                    // SAFETY: SPCR names this UART as the console.
                    crate::console::install(Console::Pl011(unsafe { Pl011::new(address.address) }));
                    return;
                }
                _ => {}
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: COM1 is the PC's first serial port; nothing else drives it
        // once Sluice runs.
        crate::console::install(Console::Uart16550(unsafe {
            Uart16550::new(UartAccess::Port(0x3f8))
        }));
    }
    #[cfg(target_arch = "aarch64")]
    if crate::fatal::under_qemu() {
        // SAFETY: QEMU virt's PL011 lives at 0x0900_0000.
        crate::console::install(Console::Pl011(unsafe { Pl011::new(0x0900_0000) }));
    }
}

#[cfg(target_arch = "x86_64")]
fn calibrate_counter(acpi: Option<&Acpi>) -> Result<u64, &'static str> {
    use acpi::address::AddressSpace;
    // ACPI PM timer: 3.579545 MHz (ACPI spec 4.8.3.3), 24 or 32 bits wide.
    const PM_TIMER_HZ: u64 = 3_579_545;
    let fadt = acpi.and_then(Acpi::fadt).ok_or("no FADT")?;
    let block = fadt
        .pm_timer_block()
        .ok()
        .flatten()
        .ok_or("FADT has no PM timer")?;
    if block.address_space != AddressSpace::SystemIo {
        return Err("the PM timer is not in I/O space");
    }
    let port = block.address as u16;
    let mask: u64 = if { fadt.flags }.pm_timer_is_32_bit() {
        0xffff_ffff
    } else {
        0x00ff_ffff
    };
    let read = || u64::from(crate::arch::port_read_u32(port)) & mask;
    // Count ~50 ms of PM-timer ticks and the TSC ticks over the same span.
    let target = PM_TIMER_HZ / 20;
    let start_pm = read();
    let start_tsc = crate::arch::read_counter();
    let mut elapsed = 0;
    let mut spins: u64 = 0;
    while elapsed < target {
        elapsed = read().wrapping_sub(start_pm) & mask;
        spins += 1;
        if spins > 100_000_000 {
            return Err("the PM timer does not advance");
        }
    }
    let tsc = crate::arch::read_counter().wrapping_sub(start_tsc);
    Ok(tsc * PM_TIMER_HZ / elapsed)
}

#[cfg(target_arch = "aarch64")]
fn calibrate_counter(_acpi: Option<&Acpi>) -> Result<u64, &'static str> {
    match crate::arch::counter_frequency() {
        0 => Err("CNTFRQ_EL0 is zero (firmware did not program the generic timer frequency)"),
        f => Ok(f),
    }
}

/// Takes over the machine: exceptions, frames, page tables, clock.
pub fn init(boot: BootInfo, command_line: CommandLine, acpi: Option<Acpi>) -> Platform {
    crate::console::init_logging(command_line.log_level);
    for problem in &command_line.problems {
        warn!("{problem}");
    }
    crate::arch::disable_interrupts();
    // The IDT's gates name Sluice's code selector, so the GDT comes first.
    #[cfg(target_arch = "x86_64")]
    crate::arch::gdt::init();
    crate::arch::exceptions::init();

    match calibrate_counter(acpi.as_ref()) {
        Ok(hz) => {
            crate::clock::start(hz);
            info!(
                "clock: {}.{:03} MHz counter",
                hz / 1_000_000,
                (hz / 1000) % 1000
            );
        }
        Err(why) => {
            // Without a calibrated clock every hardware timeout would be
            // wrong; assume 1 GHz and say so.
            error!(
                "clock: cannot calibrate the counter ({why}); assuming 1 GHz, timeouts are approximate"
            );
            crate::clock::start(1_000_000_000);
        }
    }

    let mut frames = FrameAllocator::from_memory_map(&boot.memory_map);
    info!(
        "memory: {} MiB free for Sluice's frame allocator; heap {} MiB at {:#x}",
        frames.free_frames() / 256,
        boot.heap.1 >> 20,
        boot.heap.0
    );
    for (kind, pages, count) in summarize(&boot.memory_map) {
        info!(
            "memory map: {:>17} {:>8} KiB in {} regions",
            kind.name(),
            pages * 4,
            count
        );
    }

    #[cfg(target_arch = "x86_64")]
    let identity = {
        let ram_top = boot
            .memory_map
            .iter()
            .map(MemoryRegion::end)
            .max()
            .unwrap_or(0);
        crate::arch::paging::build_identity_map(&mut frames, ram_top)
            .map(|map| {
                info!(
                    "paging: identity map of {} GiB with {} pages ({} table frames)",
                    map.mapped_bytes >> 30,
                    if map.uses_1g_pages { "1 GiB" } else { "2 MiB" },
                    map.table_frames
                );
                // SAFETY: the map covers all RAM and the physical address space.
                unsafe { crate::arch::paging::activate(&map) };
                map.mapped_bytes
            })
            .map_err(|e| alloc::format!("{e}"))
    };
    #[cfg(target_arch = "aarch64")]
    let identity = crate::arch::paging::build_identity_map(&mut frames, &boot.memory_map)
        .map(|map| {
            info!(
                "paging: EL2 identity map of {} GiB, {}-bit input range ({} table frames)",
                map.mapped_bytes >> 30,
                map.va_bits,
                map.table_frames
            );
            // SAFETY: the map covers all RAM with firmware's attributes.
            unsafe { crate::arch::paging::activate(&map) };
            map.mapped_bytes
        })
        .map_err(|e| alloc::format!("{e:?}"));
    let identity_mapped_bytes = identity.unwrap_or_else(|why| {
        error!("paging: keeping firmware's page tables: {why}");
        0
    });

    Platform {
        command_line,
        memory_map: boot.memory_map,
        acpi,
        frames: Mutex::new(frames),
        identity_mapped_bytes,
        guest_images: boot.guest_images,
    }
}
