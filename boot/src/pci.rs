//! PCI discovery on the real machine: ECAM windows from MCFG, reached
//! through Sluice's identity map, and enumeration of every segment.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::{info, warn};
use sluice_kernel::acpi_tables::{Acpi, RawMcfg};
use sluice_kernel::hw::PhysMmio;
use sluice_pci::config::ConfigSpace;
use sluice_pci::mcfg::parse_mcfg;
use sluice_pci::{Ecam, EcamWindow, PciAddress, Topology, enumerate};

pub struct Pci {
    pub ecam: Ecam<PhysMmio>,
    pub segments: Vec<Topology>,
}

impl Pci {
    pub fn functions(&self) -> impl Iterator<Item = &sluice_pci::Function> {
        self.segments.iter().flat_map(|t| t.functions.iter())
    }

    /// Sets memory decode and bus mastering in COMMAND so the device can
    /// answer MMIO and issue DMA.
    pub fn enable_memory_and_bus_master(&self, addr: PciAddress) -> Result<(), String> {
        use sluice_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE};
        let command = self
            .ecam
            .read16(addr, COMMAND)
            .map_err(|e| format!("{e:?}"))?;
        self.ecam
            .write16(
                addr,
                COMMAND,
                command | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER,
            )
            .map_err(|e| format!("{e:?}"))
    }

    /// Points `addr`'s MSI at `address` with `data` and enables it, one
    /// vector (PCI Local Bus 3.0 §6.8.1: Message Control at +2 with MSI
    /// Enable in bit 0, Message Address at +4, Message Upper Address at +8
    /// and Message Data at +0xC on a 64-bit capable function, Message Data
    /// at +8 otherwise).
    #[cfg_attr(
        not(target_arch = "aarch64"),
        expect(
            dead_code,
            reason = "only the aarch64 ITS scenario programs MSIs so far"
        )
    )]
    pub fn enable_msi(&self, addr: PciAddress, address: u64, data: u16) -> Result<(), String> {
        let function = self
            .functions()
            .find(|f| f.addr == addr)
            .ok_or_else(|| format!("pci {addr}: no such function"))?;
        let msi = function
            .caps
            .msi
            .ok_or_else(|| format!("pci {addr}: no MSI capability"))?;
        if !msi.is_64bit && address >> 32 != 0 {
            return Err(format!(
                "pci {addr}: MSI address {address:#x} needs a 64-bit capable function"
            ));
        }
        let e = |e| format!("pci {addr}: {e:?}");
        let control = msi.offset + 2;
        let c = self.ecam.read16(addr, control).map_err(e)?;
        // Disabled while it changes; Multiple Message Enable (6:4) = 1
        // vector.
        self.ecam
            .write16(addr, control, c & !(1 | 0b111 << 4))
            .map_err(e)?;
        self.ecam
            .write32(addr, msi.offset + 4, address as u32)
            .map_err(e)?;
        let data_at = if msi.is_64bit {
            self.ecam
                .write32(addr, msi.offset + 8, (address >> 32) as u32)
                .map_err(e)?;
            msi.offset + 0xc
        } else {
            msi.offset + 8
        };
        self.ecam.write16(addr, data_at, data).map_err(e)?;
        self.ecam
            .write16(addr, control, (c & !(0b111 << 4)) | 1)
            .map_err(e)
    }
}

/// Which IOMMU translates each function, for every segment, from the DMAR
/// (x86_64) or IORT (aarch64); the boot log gets one line per unit, device
/// and reserved region.
pub struct IommuMap {
    pub per_segment: Vec<sluice_iommu::association::Association>,
    /// The parsed DMAR on VT-d machines (the units' register bases and the
    /// host address width live there).
    #[cfg_attr(
        not(target_arch = "x86_64"),
        expect(dead_code, reason = "only the x86 VT-d scenarios read the DMAR so far")
    )]
    pub dmar: Option<sluice_iommu::acpi::dmar::Dmar>,
}

impl IommuMap {
    pub fn device(
        &self,
        addr: PciAddress,
    ) -> Option<&sluice_iommu::association::DeviceAssociation> {
        self.per_segment.iter().find_map(|a| a.get(addr))
    }
}

pub fn associate(acpi: &Acpi, pci: &Pci) -> Result<IommuMap, String> {
    use sluice_iommu::acpi::{dmar, iort};
    use sluice_iommu::association::{
        associate_dmar, associate_iort, dmar_log_lines, iort_log_lines, log_lines,
    };
    use sluice_kernel::acpi_tables::{RawDmar, RawIort};

    if let Some(bytes) = acpi.raw::<RawDmar>() {
        let table = dmar::parse(bytes).map_err(|e| format!("DMAR is malformed: {e:?}"))?;
        for problem in &table.errors {
            warn!("dmar: structure ignored: {problem:?}");
        }
        let per_segment: Vec<_> = pci
            .segments
            .iter()
            .map(|topology| associate_dmar(&table, topology, &pci.ecam))
            .collect();
        for (topology, association) in pci.segments.iter().zip(&per_segment) {
            log_lines(&dmar_log_lines(&table, topology, association));
            for problem in &association.errors {
                warn!("dmar: {problem}");
            }
        }
        return Ok(IommuMap {
            per_segment,
            dmar: Some(table),
        });
    }
    if let Some(bytes) = acpi.raw::<RawIort>() {
        let table = iort::parse(bytes).map_err(|e| format!("IORT is malformed: {e:?}"))?;
        let per_segment: Vec<_> = pci
            .segments
            .iter()
            .map(|topology| associate_iort(&table, topology))
            .collect();
        for (topology, association) in pci.segments.iter().zip(&per_segment) {
            log_lines(&iort_log_lines(&table, topology, association));
            for problem in &association.errors {
                warn!("iort: {problem}");
            }
        }
        return Ok(IommuMap {
            per_segment,
            dmar: None,
        });
    }
    Err(String::from(
        "firmware describes no IOMMU (no DMAR or IORT table): no device can be isolated, none will be assigned",
    ))
}

pub fn discover(acpi: &Acpi) -> Result<Pci, String> {
    let bytes = acpi
        .raw::<RawMcfg>()
        .ok_or("firmware has no MCFG table, so PCI Express configuration space is unknown")?;
    let mcfg = parse_mcfg(bytes).map_err(|e| format!("MCFG is malformed: {e:?}"))?;
    for problem in &mcfg.errors {
        warn!("pci: MCFG entry ignored: {problem:?}");
    }
    let mut windows = Vec::new();
    for entry in &mcfg.entries {
        let Some((start, length)) = entry.mapped_range() else {
            warn!(
                "pci: MCFG entry for segment {} has an unusable bus range",
                entry.segment.0
            );
            continue;
        };
        info!(
            "pci: ECAM segment {:04x} buses {:02x}-{:02x} at {:#x}",
            entry.segment.0, entry.start_bus, entry.end_bus, start
        );
        // SAFETY: MCFG describes this range as the segment's ECAM window.
        let mmio = unsafe { PhysMmio::new(start, length) };
        windows.push(EcamWindow::from_mcfg(entry, mmio));
    }
    let ecam = Ecam::new(windows);
    let segments = mcfg
        .entries
        .iter()
        .map(|e| enumerate(&ecam, e.segment, &[e.start_bus], e.start_bus..=e.end_bus))
        .collect::<Vec<_>>();
    for topology in &segments {
        for problem in &topology.errors {
            warn!(
                "pci: part of segment {:04x} was not scanned: {problem:?}",
                topology.segment.0
            );
        }
    }
    Ok(Pci { ecam, segments })
}
