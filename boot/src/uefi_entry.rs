//! The UEFI side of the boot.

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use sluice_kernel::acpi_tables::Acpi;
use sluice_kernel::boot_info::{BootInfo, MemoryRegion, RegionKind};
use sluice_kernel::cmdline::{CommandLine, decode_load_options};
use sluice_kernel::{fatal, println};
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::mem::memory_map::MemoryMap;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::file::{File, FileAttribute, FileMode};
use uefi::table::cfg::ConfigTableEntry;
use uefi::{CStr16, Status, cstr16};

/// The hypervisor heap, reserved from firmware as loader data.
const HEAP_BYTES: u64 = 64 << 20;
const COMMAND_LINE_FILE: &CStr16 = cstr16!("\\EFI\\sluice\\cmdline.txt");

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    fatal::panic(info)
}

fn find_rsdp() -> Option<u64> {
    uefi::system::with_config_table(|entries| {
        let find = |guid| {
            entries
                .iter()
                .find(|e| e.guid == guid)
                .map(|e| e.address as u64)
        };
        find(ConfigTableEntry::ACPI2_GUID).or_else(|| find(ConfigTableEntry::ACPI_GUID))
    })
}

fn load_options() -> Option<String> {
    let image = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle()).ok()?;
    decode_load_options(image.load_options_as_bytes()?)
}

fn command_line_file() -> Option<String> {
    let mut fs = boot::get_image_file_system(boot::image_handle()).ok()?;
    let mut root = fs.open_volume().ok()?;
    let handle = root
        .open(COMMAND_LINE_FILE, FileMode::Read, FileAttribute::empty())
        .ok()?;
    let mut file = handle.into_regular_file()?;
    let mut buffer = [0u8; 1024];
    let length = file.read(&mut buffer).ok()?;
    let text = core::str::from_utf8(&buffer[..length]).ok()?;
    Some(String::from(text.trim()))
}

fn region_kind(ty: MemoryType) -> RegionKind {
    match ty {
        MemoryType::CONVENTIONAL => RegionKind::Usable,
        MemoryType::LOADER_CODE | MemoryType::LOADER_DATA => RegionKind::Hypervisor,
        MemoryType::BOOT_SERVICES_CODE | MemoryType::BOOT_SERVICES_DATA => RegionKind::BootServices,
        MemoryType::RUNTIME_SERVICES_CODE | MemoryType::RUNTIME_SERVICES_DATA => {
            RegionKind::RuntimeServices
        }
        MemoryType::ACPI_RECLAIM => RegionKind::AcpiReclaimable,
        MemoryType::ACPI_NON_VOLATILE => RegionKind::AcpiNvs,
        MemoryType::MMIO | MemoryType::MMIO_PORT_SPACE => RegionKind::Mmio,
        MemoryType::UNUSABLE => RegionKind::Unusable,
        MemoryType::PERSISTENT_MEMORY => RegionKind::Persistent,
        _ => RegionKind::Reserved,
    }
}

#[uefi::entry]
fn efi_main() -> Status {
    // The heap first: everything after this may allocate.
    let Ok(heap) = boot::allocate_pages(
        AllocateType::AnyPages,
        MemoryType::LOADER_DATA,
        (HEAP_BYTES / 4096) as usize,
    ) else {
        return Status::OUT_OF_RESOURCES;
    };
    let heap_start = heap.as_ptr() as u64;
    // SAFETY: firmware just gave us these pages for good (loader data).
    unsafe { sluice_kernel::memory::heap::init(heap_start, HEAP_BYTES) };

    let rsdp = find_rsdp();
    // SAFETY: the address comes from firmware's configuration table.
    let acpi = rsdp.and_then(|address| unsafe { Acpi::from_rsdp(address) }.ok());
    fatal::set_under_qemu(acpi.as_ref().is_some_and(Acpi::is_qemu));
    sluice_kernel::platform::install_console(acpi.as_ref());

    println!();
    println!(
        "Sluice {} ({}) — an IOMMU-first type-1 hypervisor{}",
        env!("CARGO_PKG_VERSION"),
        sluice_kernel::arch::ARCH_NAME,
        if fatal::under_qemu() {
            ", running under QEMU"
        } else {
            ""
        }
    );
    #[cfg(target_arch = "aarch64")]
    println!("running at EL{}", sluice_kernel::arch::current_el());

    let (command_line, source) = match load_options() {
        Some(text) => (text, "UEFI load options"),
        None => match command_line_file() {
            Some(text) => (text, "\\EFI\\sluice\\cmdline.txt"),
            None => (String::new(), "none"),
        },
    };
    println!("command line ({source}): {command_line}");

    // SAFETY: nothing of boot services is used past this point: no UEFI
    // protocol handles are held and our allocator is our own heap.
    let uefi_map = unsafe { boot::exit_boot_services(None) };
    let memory_map: Vec<MemoryRegion> = uefi_map
        .entries()
        .map(|d| MemoryRegion {
            start: d.phys_start,
            pages: d.page_count,
            kind: region_kind(d.ty),
        })
        .collect();

    let boot_info = BootInfo {
        memory_map,
        rsdp,
        command_line: command_line.clone(),
        command_line_source: source,
        heap: (heap_start, HEAP_BYTES),
    };
    let parsed = CommandLine::parse(&command_line);
    let platform = sluice_kernel::platform::init(boot_info, parsed, acpi);
    crate::scenarios::run(platform)
}
