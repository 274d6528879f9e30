//! What the UEFI entry hands to the kernel once boot services are gone.

use alloc::string::String;
use alloc::vec::Vec;

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
