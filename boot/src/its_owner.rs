//! Boot-time ownership of every GIC ITS and of the redistributors' LPI
//! side (aarch64): the bare-metal wrapper of [`sluice_gic`].
//!
//! On Arm a device's MSI is a write of an EventID to its ITS's doorbell
//! (GITS_TRANSLATER); the ITS maps (DeviceID, EventID) to an LPI through
//! tables only its command queue writes. Once Sluice has taken every ITS
//! over (disabled, fresh tables, nothing mapped, enabled) a device can
//! raise exactly the LPIs Sluice maps for it, whatever a guest programs
//! into its MSI capability: that is MSI isolation, and what lets the SMMU
//! backend declare it.
//!
//! What it sets up, from the MADT (ACPI 6.5 §5.2.12.15-18):
//! * the distributor's LPI support is checked (GICD_TYPER.LPIS, IDbits,
//!   ARE_NS);
//! * one LPI configuration table, shared by every redistributor, and for
//!   each enabled CPU its redistributor woken with LPIs enabled on a pending
//!   table of its own;
//! * every ITS taken over, with collection `n` targeting CPU `n` (in MADT
//!   order of the enabled GIC CPU interfaces).
//!
//! Each piece gets its own leaked register window, and the DMA memory and
//! clock are static, so everything lives as long as Sluice.

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::info;
use sluice_gic::LpiAllocator;
use sluice_gic::dist::DistributorInfo;
use sluice_gic::its::{ItsConfig, ItsUnit, RdBase};
use sluice_gic::redist::{Affinity, LpiTables, Redistributor, RedistributorFrame, walk_frames};
use sluice_hal::{Mmio, PAGE_SIZE, PhysAddr};
use sluice_kernel::acpi_tables::RawMadt;
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::madt::Madt;
use sluice_kernel::platform::Platform;

/// INTID bits Sluice asks for: LPIs 8192-65535 (a 56 KiB configuration
/// table and an 8 KiB pending table per CPU).
const LPI_ID_BITS: u32 = 16;
/// GICD register frame (IHI 0069 12.8: 64 KiB).
const GICD_SPAN: u64 = 0x1_0000;
/// An ITS's control and translation frames (IHI 0069 12.19: 2 × 64 KiB).
const ITS_SPAN: u64 = 0x2_0000;
/// A redistributor described by its GICC alone: RD_base, SGI_base and,
/// with GICv4, the two vLPI frames (IHI 0069 12.10).
const GICC_REDIST_SPAN: u64 = 0x4_0000;
/// Any wait on the GIC.
const TIMEOUT_NS: u64 = 100_000_000;

static CLOCK: KernelClock = KernelClock;

/// One CPU's redistributor with LPIs on.
pub struct CpuRedistributor {
    pub hw_id: u64,
    /// The ITS collection that targets this CPU.
    pub icid: u16,
    pub region_base: u64,
    pub redistributor: Redistributor<'static>,
}

/// One owned ITS.
pub struct OwnedIts {
    /// The GIC ITS ID the MADT and IORT name it by.
    pub its_id: u32,
    pub unit: ItsUnit<'static>,
}

/// Every ITS under Sluice's control, and the LPI state they deliver into.
pub struct OwnedGic {
    pub its: Vec<OwnedIts>,
    pub cpus: Vec<CpuRedistributor>,
    pub lpi_tables: LpiTables<'static>,
    pub lpis: LpiAllocator,
}

impl OwnedGic {
    /// Each owned ITS's doorbell page, by GIC ITS ID.
    pub fn doorbell_pages(&self) -> BTreeMap<u32, PhysAddr> {
        self.its
            .iter()
            .map(|i| {
                (
                    i.its_id,
                    PhysAddr::new(i.unit.doorbell() & !(PAGE_SIZE - 1)),
                )
            })
            .collect()
    }

    pub fn its_mut(&mut self, its_id: u32) -> Option<&mut ItsUnit<'static>> {
        self.its_with_tables(its_id).map(|(unit, _)| unit)
    }

    /// The ITS `its_id` and the LPI configuration table, for
    /// [`ItsUnit::configure_event`].
    pub fn its_with_tables(
        &mut self,
        its_id: u32,
    ) -> Option<(&mut ItsUnit<'static>, &LpiTables<'static>)> {
        let unit = self
            .its
            .iter_mut()
            .find(|i| i.its_id == its_id)
            .map(|i| &mut i.unit)?;
        Some((unit, &self.lpi_tables))
    }

    /// The redistributor of the CPU Sluice runs on.
    pub fn this_cpu(&self) -> Option<&CpuRedistributor> {
        let hw_id = sluice_kernel::arch::smp::this_cpu_hw_id();
        self.cpus.iter().find(|c| c.hw_id == hw_id)
    }
}

fn leak_mmio(base: u64, size: u64) -> &'static dyn Mmio {
    // SAFETY: callers pass register frames the MADT describes (GICD, GICR,
    // ITS), which Sluice owns from now on; the identity map covers them as
    // device memory.
    Box::leak(Box::new(unsafe { PhysMmio::new(base, size) }))
}

/// The GICR frames of every enabled CPU: from the MADT's GICR structures
/// when there are any, else each GICC's own GICR base.
/// Each comes with the base and register window of the region it is in.
fn redistributor_frames(
    madt: &Madt<'_>,
) -> Result<Vec<(u64, &'static dyn Mmio, RedistributorFrame)>, String> {
    let mut frames = Vec::new();
    let regions: Vec<_> = madt.gicr().collect();
    if regions.is_empty() {
        for gicc in madt.gicc().filter(|g| g.enabled() && g.gicr_base != 0) {
            let mmio = leak_mmio(gicc.gicr_base, GICC_REDIST_SPAN);
            frames.push((gicc.gicr_base, mmio, RedistributorFrame::read(mmio, 0)));
        }
        return Ok(frames);
    }
    for region in regions {
        let mmio = leak_mmio(region.base, u64::from(region.length));
        for frame in walk_frames(mmio, region.length as usize)
            .map_err(|e| format!("GICR region at {:#x}: {e}", region.base))?
        {
            frames.push((region.base, mmio, frame));
        }
    }
    Ok(frames)
}

/// Takes every ITS the MADT lists over. `Ok` with no ITS on a machine
/// without one (its MSIs cannot be isolated; the caller says so); any
/// failure is an error naming the piece, with nothing enabled half-way on
/// the ITS that failed.
pub fn take_ownership(platform: &'static Platform) -> Result<OwnedGic, String> {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let bytes = acpi.raw::<RawMadt>().ok_or("no MADT: the GIC is unknown")?;
    let madt = Madt::parse(bytes).map_err(|e| format!("MADT: {e:?}"))?;
    let its_list: Vec<_> = madt.gic_its().collect();
    let gicd = madt.gicd().ok_or("the MADT lists no GIC distributor")?;
    let dist = DistributorInfo::read(leak_mmio(gicd.physical_base, GICD_SPAN));
    let memory: &'static FrameDmaMemory<'static> =
        Box::leak(Box::new(FrameDmaMemory::new(&platform.frames)));
    let id_bits = dist
        .lpi_id_bits(LPI_ID_BITS)
        .map_err(|e| format!("GIC distributor at {:#x}: {e}", gicd.physical_base))?;
    let lpi_tables =
        LpiTables::new(memory, id_bits).map_err(|e| format!("LPI configuration table: {e}"))?;
    let lpis = LpiAllocator::new(id_bits).map_err(|e| format!("LPIs: {e}"))?;

    let frames = redistributor_frames(&madt)?;
    let mut cpus = Vec::new();
    for (icid, gicc) in madt.gicc().filter(|g| g.enabled()).enumerate() {
        let affinity = Affinity::from_mpidr(gicc.mpidr);
        let &(region_base, region, frame) = frames
            .iter()
            .find(|(_, _, f)| f.affinity == affinity)
            .ok_or_else(|| {
                format!(
                    "CPU {:#x}: no redistributor in the MADT's GICR ranges",
                    gicc.mpidr
                )
            })?;
        let mut redistributor = Redistributor::new(region, memory, frame);
        redistributor
            .wake(&CLOCK, TIMEOUT_NS)
            .and_then(|()| redistributor.enable_lpis(&lpi_tables))
            .map_err(|e| format!("redistributor of CPU {:#x}: {e}", gicc.mpidr))?;
        let icid = u16::try_from(icid).map_err(|_| "more than 65536 CPUs")?;
        cpus.push(CpuRedistributor {
            hw_id: gicc.mpidr,
            icid,
            region_base,
            redistributor,
        });
    }

    let mut its = Vec::new();
    for (index, entry) in its_list.iter().enumerate() {
        let config = ItsConfig::new(
            index as u32,
            entry.physical_base,
            cpus.len() as u32,
            id_bits,
        );
        let mmio = leak_mmio(entry.physical_base, ITS_SPAN);
        let mut unit = ItsUnit::take_ownership(mmio, memory, &CLOCK, config)
            .map_err(|e| format!("its{index} (ITS ID {}): {e}", entry.its_id))?;
        let pta = unit.caps().pta;
        for cpu in &cpus {
            let target: RdBase = cpu.redistributor.frame().target(cpu.region_base, pta);
            unit.map_collection(cpu.icid, target).map_err(|e| {
                format!(
                    "its{index}: collection {} → CPU {:#x}: {e}",
                    cpu.icid, cpu.hw_id
                )
            })?;
        }
        info!(
            "its{index} (ITS ID {}) @{:#x}: owned, doorbell {:#x}, {} collection(s); every DeviceID unmapped: MSIs are dropped until Sluice maps them",
            entry.its_id,
            entry.physical_base,
            unit.doorbell(),
            cpus.len()
        );
        its.push(OwnedIts {
            its_id: entry.its_id,
            unit,
        });
    }
    info!(
        "gic: LPIs on for {} CPU(s) ({} INTID bits), {} ITS(es) owned",
        cpus.len(),
        id_bits,
        its.len()
    );
    Ok(OwnedGic {
        its,
        cpus,
        lpi_tables,
        lpis,
    })
}
