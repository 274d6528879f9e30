//! The hypervisor at run time on aarch64 (EL2 with a stage-2 table per
//! VM): what the shared runtime (`crate::guest_runtime`) needs from this
//! architecture — the EL2 vCPU backend of each CPU and VMs built with a
//! stage-2 table and the aarch64 direct-boot protocol — plus the SMMU side
//! of the machine ([`guests`]) and the `guests` scenario ([`scenario`]).

pub mod guests;
pub mod hw;
pub mod scenario;

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use sluice_hypervisor::iommufd::VmId;
use sluice_hypervisor::vcpu::el2::{El2Backend, El2Features, PstateFeatures};
use sluice_hypervisor::vm::config::ValidVm;
use sluice_hypervisor::vm::instance::{BuildInputs, build_aarch64};
use sluice_iommu::pagetable::{IoPageTable, PageSize, TableConfig};
use sluice_kernel::arch::guest;
use sluice_kernel::hw::FrameDmaMemory;
use sluice_kernel::platform::Platform;

use crate::guest_runtime::{ArchRuntime, BareMetalVm, KernelFrames};
use crate::pci::Pci;
use hw::BareMetalEl2;

/// The processor's stage-2 features, and the PSTATE features exception
/// entry to a guest's EL1 depends on.
fn features() -> El2Features {
    let (mmfr0, mmfr1) = guest::memory_model_features();
    let (pfr1, mmfr2) = guest::pstate_feature_registers();
    El2Features::from_id_registers(mmfr0, mmfr1)
        .with_pstate_features(PstateFeatures::from_id_registers(pfr1, mmfr1, mmfr2))
}

/// aarch64 at EL2 with guests at EL1.
pub struct El2;

impl ArchRuntime for El2 {
    type Backend = El2Backend<BareMetalEl2>;

    fn backend_for_this_cpu(_platform: &'static Platform) -> Result<Self::Backend, String> {
        let hardware = BareMetalEl2::for_this_cpu().map_err(|e| format!("EL2: {e}"))?;
        let features = features();
        log::info!(
            "EL2 on this CPU: {}-bit physical addresses, {}-bit VMIDs, guests get a {}-bit stage-2 space; exception entry features {:?}",
            features.physical_bits,
            features.vmid_bits,
            sluice_hypervisor::vcpu::el2::IPA_BITS,
            features.pstate
        );
        El2Backend::new(hardware, features).map_err(|e| format!("EL2 backend: {e}"))
    }

    /// RAM from the frame allocator, its stage-2 table (2 MiB blocks at
    /// most) and the aarch64 boot protocol; then the guest's RAM is cleaned
    /// to the point of coherency and the instruction caches invalidated, so
    /// its first fetches see the image Sluice wrote.
    fn build_vm(
        platform: &'static Platform,
        pci: &'static Pci,
        valid: &ValidVm,
        id: VmId,
        image: &[u8],
    ) -> Result<BareMetalVm, String> {
        let tables: &'static FrameDmaMemory<'static> =
            Box::leak(Box::new(FrameDmaMemory::new(&platform.frames)));
        let format = features()
            .stage2_format()
            .map_err(|e| format!("stage-2 format: {e:?}"))?;
        // 2 MiB leaves: guest RAM comes in 2 MiB chunks; 1 GiB blocks would
        // need 1 GiB-aligned host memory the allocator rarely has. The CPU's
        // stage-2 walks are cache-coherent (VTCR_EL2 IRGN0/ORGN0 write-back).
        let s2 = IoPageTable::new(tables, format, TableConfig::new(PageSize::Size2M, true))
            .map_err(|e| format!("stage-2 root: {e:?}"))?;
        let vm = build_aarch64(
            BuildInputs {
                id,
                vm: valid,
                image,
                host_config: &pci.ecam,
                topologies: &pci.segments,
                one_gib_pages: false,
            },
            KernelFrames::new(&platform.frames),
            Box::new(s2),
        )
        .map_err(|e| format!("VM {}: {e}", valid.config.name))?;
        for chunk in vm.ram.chunks() {
            sluice_kernel::arch::clean_dcache_range(chunk.host.as_u64(), chunk.length);
        }
        guest::invalidate_instruction_caches();
        Ok(vm)
    }
}
