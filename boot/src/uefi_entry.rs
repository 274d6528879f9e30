//! The UEFI side of the boot.

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use sluice_kernel::acpi_tables::Acpi;
use sluice_kernel::boot_info::{
    self, BootInfo, GuestImage, GuestImageError, MemoryRegion, RegionKind,
};
use sluice_kernel::cmdline::{CommandLine, decode_load_options};
use sluice_kernel::{fatal, println};
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::mem::memory_map::MemoryMap;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::file::{Directory, File, FileAttribute, FileMode, RegularFile};
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

/// Reads `\EFI\sluice\<name>` from `root` into loader-data pages, which
/// stay Sluice's after boot services end.
fn read_guest_image(root: &mut Directory, name: &str) -> Result<GuestImage, GuestImageError> {
    // `\EFI\sluice\` and at most 64 characters of name (the VM config
    // grammar), NUL-terminated.
    let mut path_buffer = [0u16; 96];
    let path = CStr16::from_str_with_buf(&boot_info::guest_image_path(name), &mut path_buffer)
        .map_err(|_| GuestImageError::Missing)?;
    let handle = root
        .open(path, FileMode::Read, FileAttribute::empty())
        .map_err(|e| match e.status() {
            Status::NOT_FOUND => GuestImageError::Missing,
            _ => GuestImageError::ReadFailed,
        })?;
    let mut file = handle.into_regular_file().ok_or(GuestImageError::Missing)?;
    // The size, without allocating a FileInfo: seek to the end.
    file.set_position(RegularFile::END_OF_FILE)
        .and_then(|()| file.get_position())
        .map_err(|_| GuestImageError::ReadFailed)
        .and_then(boot_info::check_guest_image_size)
        .and_then(|size| {
            file.set_position(0)
                .map_err(|_| GuestImageError::ReadFailed)?;
            let pages = size.div_ceil(4096);
            let memory =
                boot::allocate_pages(AllocateType::AnyPages, MemoryType::LOADER_DATA, pages)
                    .map_err(|_| GuestImageError::OutOfMemory)?;
            // SAFETY: firmware just gave us these pages (loader data, never
            // freed: they stay Sluice's after ExitBootServices); `size` bytes
            // of them are initialised by the reads below before anyone
            // reads them, and on failure nothing keeps the slice.
            let bytes: &'static mut [u8] =
                unsafe { core::slice::from_raw_parts_mut(memory.as_ptr(), size) };
            let mut filled = 0;
            while filled < size {
                match file.read(&mut bytes[filled..]) {
                    Ok(0) | Err(_) => {
                        // SAFETY: the pages allocated above, not used elsewhere.
                        let _ = unsafe { boot::free_pages(memory, pages) };
                        return Err(GuestImageError::ReadFailed);
                    }
                    Ok(n) => filled += n,
                }
            }
            Ok(GuestImage {
                name: String::from(name),
                bytes,
            })
        })
}

/// Reads every guest image the command line's `vm=` words name from the
/// volume Sluice was loaded from. Problems are logged with the file's path;
/// the VMs concerned cannot start, everything else carries on.
fn read_guest_images(command_line: &str) -> Vec<GuestImage> {
    let names = sluice_hypervisor::vm::config::image_names(command_line);
    if names.is_empty() {
        return Vec::new();
    }
    let volume = boot::get_image_file_system(boot::image_handle())
        .ok()
        .and_then(|mut fs| fs.open_volume().ok());
    let Some(mut root) = volume else {
        println!("guest images: cannot open the volume Sluice was loaded from; no VM can start");
        return Vec::new();
    };
    let mut images = Vec::new();
    for name in names {
        let path = boot_info::guest_image_path(&name);
        match read_guest_image(&mut root, &name) {
            Ok(image) => {
                println!(
                    "guest image {path}: {} KiB read",
                    image.bytes.len().div_ceil(1024)
                );
                images.push(image);
            }
            Err(why) => {
                println!("guest image {path}: {why}; the VMs using image={name} cannot start")
            }
        }
    }
    images
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

/// x86_64 starts the other CPUs through a real-mode trampoline that
/// STARTUP IPIs reach only below 640 KiB; firmware's allocator still finds
/// such a page easily now, the frame allocator may not later. Without one,
/// `smp::init` tries the frame allocator and reports if that fails too.
#[cfg(target_arch = "x86_64")]
fn reserve_trampoline_page() {
    if let Ok(page) = boot::allocate_pages(
        AllocateType::MaxAddress(0x9_ffff),
        MemoryType::LOADER_DATA,
        1,
    ) {
        sluice_kernel::arch::smp::set_trampoline_page(page.as_ptr() as u64);
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
    #[cfg(target_arch = "x86_64")]
    reserve_trampoline_page();

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
    let guest_images = read_guest_images(&command_line);

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
        guest_images,
    };
    let parsed = CommandLine::parse(&command_line);
    let platform = sluice_kernel::platform::init(boot_info, parsed, acpi);
    crate::scenarios::run(platform)
}
