//! The test guest, as built for x86_64, is an image Sluice's direct-boot
//! loader accepts (static ET_EXEC, identity-placed PT_LOAD segments above
//! the boot area, entry in executable code), and its fixed buffers are
//! free RAM of a VM of the size it asks for. This checks the image, not a
//! run: the guest runs only under Sluice (QEMU scenarios).

use std::fs;
use std::path::Path;

use sluice_hypervisor::iommufd::GuestMemory;
use sluice_hypervisor::vm::boot::{self, StartInfoDevice, region_kind};
use sluice_hypervisor::vm::memory::{GuestRam, ModelFrames, layout};
use sluice_qemu_tests::Arch;
use sluice_qemu_tests::guests::{self, test_guest_layout as guest};

fn built_test_guest() -> Vec<u8> {
    // The workspace target directory, where xtask builds guests too.
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory");
    let mut build = guests::test_guest_build(Arch::X86_64, target_dir).expect("x86_64 guest");
    let status = build.command.status().expect("cargo runs");
    assert!(status.success(), "{} failed", build.description);
    fs::read(&build.image.path).expect("the built guest")
}

#[test]
fn the_test_guest_is_an_image_the_loader_accepts() {
    let image = built_test_guest();
    let frames: &'static ModelFrames = Box::leak(Box::new(ModelFrames::new()));
    let mut ram = GuestRam::new(frames, &layout::x86_ram_regions(guest::MIN_RAM)).unwrap();
    ram.add_mmio(layout::ECAM_BASE, layout::ECAM_SIZE).unwrap();
    let edu = StartInfoDevice {
        guest_bdf: sluice_abi::bdf(0, 0, 1, 0),
        vendor_id: 0x1234,
        device_id: 0x11e8,
        class_code: 0x00_ff_00,
        iommu_group: 1,
    };
    let booted = boot::boot_x86(&ram, ram.regions(), &image, &[edu], "dma", false)
        .unwrap_or_else(|e| panic!("Sluice refuses the test guest: {e}"));

    // Linked at 2 MiB, entry in the first (executable) segment.
    assert_eq!(booted.image.start, 0x20_0000);
    let code = booted.image.segments.iter().find(|s| s.executable).unwrap();
    assert_eq!(booted.entry_state.registers.rip, code.gpa);
    assert!(
        booted
            .image
            .segments
            .iter()
            .all(|s| !(s.executable && s.writable)),
        "no segment is both writable and executable"
    );
    let mut first = [0u8; 4];
    ram.read(code.gpa, &mut first).unwrap();
    assert_ne!(first, [0; 4], "the entry point holds code");

    // The guest's buffers are free RAM after the image, in the start info.
    assert!(
        booted.image.end <= guest::BUFFER_GPA,
        "image ends at {:#x}",
        booted.image.end
    );
    for (gpa, pages) in [
        (guest::BUFFER_GPA, guest::BUFFER_PAGES),
        (guest::CANARY_GPA, 1),
        (guest::VICTIM_GPA, 1),
    ] {
        assert!(
            booted.start_info.memory_map.iter().any(|r| {
                r.kind == region_kind::RAM
                    && r.base <= gpa
                    && gpa + pages * guest::PAGE <= r.base + r.length
            }),
            "{gpa:#x} is not free RAM in {:?}",
            booted.start_info.memory_map
        );
    }
    assert_eq!(booted.start_info.args, "dma");
}
