//! A VM's nested page table (AMD NPT, Intel EPT, Arm stage 2): guest RAM
//! and the passed-through BARs, built with the IO page-table engine.
//!
//! What is not mapped faults to Sluice: the ECAM window (emulated config
//! space), the MSI window, the aarch64 console register, holes. RAM is
//! mapped write-back and executable; BARs uncacheable (Arm: Device-nGnRE),
//! read/write, never executable.

use sluice_hal::{DmaMemory, PhysAddr};
use sluice_iommu::pagetable::arm::{ArmS2Attrs, ArmStage2};
use sluice_iommu::pagetable::x86::{AmdNpt, EptAttrs, IntelEpt, X86Caching};
use sluice_iommu::pagetable::{IoPageTable, MapPerms, PageTableError, Shareability, X86MemType};

use super::memory::{FrameSource, GuestRam};
use crate::passthrough::BarMapping;

/// What a guest-physical range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingKind {
    Ram,
    Mmio,
}

/// A nested page table the VM layer can fill, whatever its format.
pub trait NestedPageTable {
    /// Maps `[gpa, gpa + len)` to host `[host, host + len)`.
    fn map_range(
        &mut self,
        gpa: u64,
        host: PhysAddr,
        len: u64,
        kind: MappingKind,
    ) -> Result<(), PageTableError>;
    /// The root for `set_nested_root` (N_CR3 / EPTP).
    fn root_address(&self) -> PhysAddr;
    /// Frees every table page. Only once no vCPU can use the table any
    /// more (the VM is stopped); its ASID / VPID is flushed when reused.
    fn release(self: alloc::boxed::Box<Self>);
}

impl<M: DmaMemory + ?Sized> NestedPageTable for IoPageTable<'_, AmdNpt, M> {
    fn map_range(
        &mut self,
        gpa: u64,
        host: PhysAddr,
        len: u64,
        kind: MappingKind,
    ) -> Result<(), PageTableError> {
        // NPT leaf PCD/PWT select the host PAT entry combined with the
        // guest's type (AMD APM vol. 2, 15.25.8): PAT entry 0 (WB) for RAM,
        // entry 3 (UC) for device memory.
        let (perms, caching) = match kind {
            MappingKind::Ram => (MapPerms::ALL, X86Caching::default()),
            MappingKind::Mmio => (
                MapPerms::READ_WRITE,
                X86Caching {
                    write_through: true,
                    cache_disable: true,
                },
            ),
        };
        // A new mapping needs no invalidation; nothing is unlinked.
        self.map(gpa, host, len, perms, caching).map(|_| ())
    }
    fn root_address(&self) -> PhysAddr {
        self.root()
    }
    fn release(self: alloc::boxed::Box<Self>) {
        let mem = self.memory();
        self.destroy().release(mem);
    }
}

impl<M: DmaMemory + ?Sized> NestedPageTable for IoPageTable<'_, IntelEpt, M> {
    fn map_range(
        &mut self,
        gpa: u64,
        host: PhysAddr,
        len: u64,
        kind: MappingKind,
    ) -> Result<(), PageTableError> {
        // EPT memory type WB for RAM (the guest PAT still applies); UC with
        // "ignore PAT" for device memory (SDM vol. 3, "Memory Type Used for
        // Translated Guest-Physical Addresses").
        let (perms, attrs) = match kind {
            MappingKind::Ram => (
                MapPerms::ALL,
                EptAttrs {
                    memory_type: X86MemType::WriteBack,
                    ignore_pat: false,
                },
            ),
            MappingKind::Mmio => (
                MapPerms::READ_WRITE,
                EptAttrs {
                    memory_type: X86MemType::Uncacheable,
                    ignore_pat: true,
                },
            ),
        };
        self.map(gpa, host, len, perms, attrs).map(|_| ())
    }
    fn root_address(&self) -> PhysAddr {
        self.root()
    }
    fn release(self: alloc::boxed::Box<Self>) {
        let mem = self.memory();
        self.destroy().release(mem);
    }
}

/// Stage-2 `MemAttr[3:0]` values (Arm ARM DDI 0487, "Stage 2 memory type
/// and Cacheability attributes when FEAT_S2FWB is disabled"):
/// bits 3:2 are the outer attribute (0b00 Device, 0b01 Non-cacheable,
/// 0b10 Write-Through, 0b11 Write-Back), bits 1:0 the inner one, or for
/// Device memory its kind (0b00 nGnRnE, 0b01 nGnRE, 0b10 nGRE, 0b11 GRE).
/// The guest's stage-1 attributes combine with these, the stronger type
/// winning, so a guest can never map a BAR cacheable.
pub mod stage2_mem_attr {
    /// Normal, Outer Write-Back, Inner Write-Back.
    pub const NORMAL_WRITE_BACK: u8 = 0b1111;
    /// Device-nGnRE: no gathering or reordering, early write ack.
    pub const DEVICE_NGNRE: u8 = 0b0001;
}

impl<M: DmaMemory + ?Sized> NestedPageTable for IoPageTable<'_, ArmStage2, M> {
    fn map_range(
        &mut self,
        gpa: u64,
        host: PhysAddr,
        len: u64,
        kind: MappingKind,
    ) -> Result<(), PageTableError> {
        // RAM: Normal write-back, Inner Shareable (the shareability the
        // host's own normal memory has, so guest and host views stay
        // coherent). BARs: Device-nGnRE, never executable (XN); the SH
        // field does not apply to Device memory, which is always treated
        // as Outer Shareable (Arm ARM, "Device memory").
        let (perms, attrs) = match kind {
            MappingKind::Ram => (
                MapPerms::ALL,
                ArmS2Attrs {
                    mem_attr: stage2_mem_attr::NORMAL_WRITE_BACK,
                    shareability: Shareability::InnerShareable,
                },
            ),
            MappingKind::Mmio => (
                MapPerms::READ_WRITE,
                ArmS2Attrs {
                    mem_attr: stage2_mem_attr::DEVICE_NGNRE,
                    shareability: Shareability::OuterShareable,
                },
            ),
        };
        self.map(gpa, host, len, perms, attrs).map(|_| ())
    }
    /// The VTTBR_EL2 base address (BADDR); the VMID is the vCPU backend's.
    fn root_address(&self) -> PhysAddr {
        self.root()
    }
    fn release(self: alloc::boxed::Box<Self>) {
        let mem = self.memory();
        self.destroy().release(mem);
    }
}

/// Why the nested table could not be filled. The table should be
/// destroyed: the VM cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedError {
    /// Mapping the RAM chunk or BAR at `gpa` failed.
    Map { gpa: u64, error: PageTableError },
    /// A BAR's host address or size is not page aligned.
    UnalignedBar { gpa: u64 },
}

/// Maps every RAM chunk of `ram` and every BAR of `bars` into `table`.
pub fn map_vm<S: FrameSource>(
    table: &mut dyn NestedPageTable,
    ram: &GuestRam<S>,
    bars: &[BarMapping],
) -> Result<(), NestedError> {
    for c in ram.chunks() {
        table
            .map_range(c.gpa, c.host, c.length, MappingKind::Ram)
            .map_err(|error| NestedError::Map { gpa: c.gpa, error })?;
    }
    for b in bars {
        if !b.host.is_multiple_of(4096) || !b.size.is_multiple_of(4096) {
            return Err(NestedError::UnalignedBar { gpa: b.guest });
        }
        table
            .map_range(b.guest, PhysAddr::new(b.host), b.size, MappingKind::Mmio)
            .map_err(|error| NestedError::Map {
                gpa: b.guest,
                error,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::memory::{ModelFrames, layout};
    use sluice_hal::model::ModelMemory;
    use sluice_iommu::pagetable::walk::walk;
    use sluice_iommu::pagetable::{PageSize, PageTableFormat, TableConfig};
    use sluice_pci::PciAddress;

    fn bar() -> BarMapping {
        BarMapping {
            device: PciAddress::new(0, 0, 3, 0),
            index: 0,
            guest: layout::BAR_WINDOW_BASE,
            host: 0xfe00_0000,
            size: 0x4000,
            prefetchable: false,
        }
    }

    #[test]
    fn npt_maps_ram_and_bars_and_nothing_else() {
        let frames = ModelFrames::new();
        frames.refuse_large(true);
        let ram = GuestRam::new(&frames, &[(0, 0x20_0000), (0x40_0000, 0x3000)]).unwrap();
        let tables = ModelMemory::new();
        let format = AmdNpt::new(4, 48).unwrap();
        let mut npt =
            IoPageTable::new(&tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
        map_vm(&mut npt, &ram, &[bar()]).unwrap();
        let params = format.walk_params();
        let root = npt.root_address();
        for gpa in [0u64, 0x1234, 0x1f_ffff, 0x40_2fff] {
            let w = walk(&tables, &params, root, gpa).unwrap();
            let (host, _) = crate::iommufd::GuestMemory::ram_to_host(&ram, gpa).unwrap();
            assert_eq!(w.phys, host, "{gpa:#x}");
            assert!(w.perms.write && w.perms.exec);
        }
        let w = walk(&tables, &params, root, layout::BAR_WINDOW_BASE + 0x3008).unwrap();
        assert_eq!(w.phys.as_u64(), 0xfe00_3008);
        assert!(!w.perms.exec);
        assert_eq!(w.leaf & 0x18, 0x18, "uncacheable");
        for hole in [0x20_0000, 0x40_3000, layout::ECAM_BASE, 0xfee0_0000] {
            assert!(
                walk(&tables, &params, root, hole).is_err(),
                "{hole:#x} must fault"
            );
        }
        npt.destroy().release(&tables);
        ram.release();
    }

    #[test]
    fn ept_maps_with_memory_types() {
        let frames = ModelFrames::new();
        let ram = GuestRam::new(&frames, &[(0, 0x40_0000)]).unwrap();
        let tables = ModelMemory::new();
        let format = IntelEpt::new(4, 46, false).unwrap();
        let mut ept =
            IoPageTable::new(&tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
        map_vm(&mut ept, &ram, &[bar()]).unwrap();
        let params = format.walk_params();
        let w = walk(&tables, &params, ept.root_address(), 0x20_0010).unwrap();
        assert_eq!(w.page_size, 0x20_0000, "2 MiB chunks map as 2 MiB pages");
        assert_eq!((w.leaf >> 3) & 7, 6, "write-back");
        let w = walk(
            &tables,
            &params,
            ept.root_address(),
            layout::BAR_WINDOW_BASE,
        )
        .unwrap();
        assert_eq!((w.leaf >> 3) & 7, 0, "uncacheable");
        assert_ne!(w.leaf & (1 << 6), 0, "ignore PAT");
        // A BAR placed over RAM is refused by the engine.
        let mut clash = bar();
        clash.guest = 0x10_0000;
        let mut fresh =
            IoPageTable::new(&tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
        assert_eq!(
            map_vm(&mut fresh, &ram, &[clash]),
            Err(NestedError::Map {
                gpa: 0x10_0000,
                error: PageTableError::AlreadyMapped { iova: 0x10_0000 }
            })
        );
        fresh.destroy().release(&tables);
        let mut odd = bar();
        odd.host = 0xfe00_0800;
        let mut fresh =
            IoPageTable::new(&tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
        assert_eq!(
            map_vm(&mut fresh, &ram, &[odd]),
            Err(NestedError::UnalignedBar {
                gpa: layout::BAR_WINDOW_BASE
            })
        );
        fresh.destroy().release(&tables);
        ept.destroy().release(&tables);
        ram.release();
    }

    #[test]
    fn arm_stage2_maps_ram_normal_and_bars_device() {
        let frames = ModelFrames::new();
        let base = 0x4000_0000;
        let ram = GuestRam::new(&frames, &[(base, 0x40_0000), (base + 0x80_0000, 0x3000)]).unwrap();
        let tables = ModelMemory::new();
        // 39-bit IPA: three levels from Arm level 1 (VTCR_EL2.SL0 = 1).
        let format = ArmStage2::new(39, 48).unwrap();
        assert_eq!((format.t0sz(), format.sl0()), (25, 1));
        let mut s2 =
            IoPageTable::new(&tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
        let mut device = bar();
        device.guest = 0x1000_0000;
        map_vm(&mut s2, &ram, &[device]).unwrap();
        let params = format.walk_params();
        let root = s2.root_address();
        for gpa in [base, base + 0x1234, base + 0x3f_ffff, base + 0x80_2fff] {
            let w = walk(&tables, &params, root, gpa).unwrap();
            let (host, _) = crate::iommufd::GuestMemory::ram_to_host(&ram, gpa).unwrap();
            assert_eq!(w.phys, host, "{gpa:#x}");
            assert!(w.perms.read && w.perms.write && w.perms.exec, "{gpa:#x}");
            // Stage-2 leaf fields (Arm ARM, stage 2 block and page
            // descriptors): MemAttr bits 5:2, SH bits 9:8, AF bit 10,
            // XN bits 54:53.
            assert_eq!((w.leaf >> 2) & 0xf, 0b1111, "normal write-back");
            assert_eq!((w.leaf >> 8) & 3, 0b11, "inner shareable");
            assert_ne!(w.leaf & (1 << 10), 0, "access flag set");
            assert_eq!((w.leaf >> 53) & 3, 0, "executable");
        }
        let w = walk(&tables, &params, root, base + 0x20_0010).unwrap();
        assert_eq!(w.page_size, 0x20_0000, "2 MiB chunks map as blocks");
        let w = walk(&tables, &params, root, 0x1000_3008).unwrap();
        assert_eq!(w.phys.as_u64(), 0xfe00_3008);
        assert!(w.perms.read && w.perms.write && !w.perms.exec);
        assert_eq!((w.leaf >> 2) & 0xf, 0b0001, "Device-nGnRE");
        assert_ne!(w.leaf & (1 << 54), 0, "device memory never executable");
        for hole in [
            0u64,
            base - 0x1000,
            base + 0x40_0000,
            base + 0x80_3000,
            0x1000_4000,
        ] {
            assert!(
                walk(&tables, &params, root, hole).is_err(),
                "{hole:#x} must fault"
            );
        }
        alloc::boxed::Box::new(s2).release();
        assert_eq!(tables.live_pages(), 0, "release frees every table page");
        ram.release();
    }
}
