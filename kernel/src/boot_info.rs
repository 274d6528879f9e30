//! What the UEFI entry hands to the kernel once boot services are gone.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// What a range of physical memory holds, from the firmware's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Free RAM the frame allocator may hand out.
    Usable,
    /// Sluice's own image, heap and data.
    Hypervisor,
    /// Firmware boot-services memory: free now, but the UEFI stack we still
    /// run on lives here, so it is not handed out.
    BootServices,
    RuntimeServices,
    AcpiReclaimable,
    AcpiNvs,
    Mmio,
    Reserved,
    Unusable,
    Persistent,
}

impl RegionKind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Usable => "usable",
            Self::Hypervisor => "hypervisor",
            Self::BootServices => "boot-services",
            Self::RuntimeServices => "runtime-services",
            Self::AcpiReclaimable => "acpi-reclaimable",
            Self::AcpiNvs => "acpi-nvs",
            Self::Mmio => "mmio",
            Self::Reserved => "reserved",
            Self::Unusable => "unusable",
            Self::Persistent => "persistent",
        }
    }

    /// RAM (as opposed to device memory): mapped cacheable.
    pub const fn is_ram(self) -> bool {
        !matches!(self, Self::Mmio | Self::Reserved | Self::Unusable)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub pages: u64,
    pub kind: RegionKind,
}

impl MemoryRegion {
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.pages.saturating_mul(4096))
    }
}

#[derive(Debug, Clone)]
pub struct BootInfo {
    pub memory_map: Vec<MemoryRegion>,
    /// Physical address of the ACPI RSDP, if firmware published one.
    pub rsdp: Option<u64>,
    /// The raw command line, and where it came from.
    pub command_line: String,
    pub command_line_source: &'static str,
    /// The heap Sluice reserved before leaving boot services.
    pub heap: (u64, u64),
    /// The guest images the command line's `vm=` words name, read from the
    /// ESP before leaving boot services (missing or refused ones are not
    /// here: their problem was logged then).
    pub guest_images: Vec<GuestImage>,
}

/// Largest guest image file Sluice reads.
pub const MAX_GUEST_IMAGE_BYTES: u64 = 16 << 20;

/// A guest image file, as read from the ESP.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The `image=` name: the file is `\EFI\sluice\<name>`.
    pub name: String,
    /// The file's bytes, in firmware loader-data pages that stay Sluice's.
    pub bytes: &'static [u8],
}

/// The image called `name` among `images`.
pub fn find_guest_image<'a>(images: &'a [GuestImage], name: &str) -> Option<&'a GuestImage> {
    images.iter().find(|image| image.name == name)
}

/// The ESP path of image `name`, as the firmware's file protocol takes it.
pub fn guest_image_path(name: &str) -> String {
    alloc::format!("\\EFI\\sluice\\{name}")
}

/// Why a guest image was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestImageError {
    /// No such file on the ESP (or it is not a regular file).
    Missing,
    /// The file is larger than [`MAX_GUEST_IMAGE_BYTES`].
    TooLarge {
        bytes: u64,
    },
    Empty,
    /// The firmware refused the read, or returned fewer bytes than the
    /// file's size.
    ReadFailed,
    /// No pages for the file's contents.
    OutOfMemory,
}

impl fmt::Display for GuestImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("no such file on the ESP"),
            Self::TooLarge { bytes } => write!(
                f,
                "{} KiB is larger than the {} MiB Sluice reads",
                bytes.div_ceil(1024),
                MAX_GUEST_IMAGE_BYTES >> 20
            ),
            Self::Empty => f.write_str("the file is empty"),
            Self::ReadFailed => f.write_str("the firmware could not read the whole file"),
            Self::OutOfMemory => f.write_str("no memory for the file"),
        }
    }
}

/// Checks an image file's size before it is read: its length in bytes.
pub fn check_guest_image_size(bytes: u64) -> Result<usize, GuestImageError> {
    if bytes == 0 {
        return Err(GuestImageError::Empty);
    }
    if bytes > MAX_GUEST_IMAGE_BYTES {
        return Err(GuestImageError::TooLarge { bytes });
    }
    usize::try_from(bytes).map_err(|_| GuestImageError::TooLarge { bytes })
}

/// Totals per kind, for the boot log.
pub fn summarize(map: &[MemoryRegion]) -> Vec<(RegionKind, u64, usize)> {
    let mut totals: Vec<(RegionKind, u64, usize)> = Vec::new();
    for region in map {
        match totals.iter_mut().find(|(kind, _, _)| *kind == region.kind) {
            Some(entry) => {
                entry.1 += region.pages;
                entry.2 += 1;
            }
            None => totals.push((region.kind, region.pages, 1)),
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_image_sizes_and_paths() {
        assert_eq!(check_guest_image_size(4096), Ok(4096));
        assert_eq!(
            check_guest_image_size(MAX_GUEST_IMAGE_BYTES),
            Ok(MAX_GUEST_IMAGE_BYTES as usize)
        );
        assert_eq!(
            check_guest_image_size(MAX_GUEST_IMAGE_BYTES + 1),
            Err(GuestImageError::TooLarge {
                bytes: MAX_GUEST_IMAGE_BYTES + 1
            })
        );
        assert_eq!(check_guest_image_size(0), Err(GuestImageError::Empty));
        assert_eq!(
            alloc::format!("{}", GuestImageError::TooLarge { bytes: 20 << 20 }),
            "20480 KiB is larger than the 16 MiB Sluice reads"
        );
        assert_eq!(guest_image_path("test-guest"), "\\EFI\\sluice\\test-guest");
        static BYTES: [u8; 4] = *b"\x7fELF";
        let images = [GuestImage {
            name: "test-guest".into(),
            bytes: &BYTES,
        }];
        assert_eq!(
            find_guest_image(&images, "test-guest").map(|i| i.bytes.len()),
            Some(4)
        );
        assert!(find_guest_image(&images, "other").is_none());
    }

    #[test]
    fn summary_adds_pages_per_kind() {
        let map = [
            MemoryRegion {
                start: 0,
                pages: 10,
                kind: RegionKind::Usable,
            },
            MemoryRegion {
                start: 0x10000,
                pages: 2,
                kind: RegionKind::AcpiNvs,
            },
            MemoryRegion {
                start: 0x100000,
                pages: 5,
                kind: RegionKind::Usable,
            },
        ];
        let summary = summarize(&map);
        assert_eq!(
            summary,
            [(RegionKind::Usable, 15, 2), (RegionKind::AcpiNvs, 2, 1)]
        );
        assert_eq!(map[2].end(), 0x105000);
    }
}
