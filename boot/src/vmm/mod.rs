//! The hypervisor at run time on x86_64 (SVM with nested paging): what the
//! shared runtime (`crate::guest_runtime`) needs from this architecture —
//! the SVM vCPU backend of each CPU and VMs built with an NPT and the x86
//! direct-boot protocol — plus the VT-d side of the machine
//! ([`guests`]) and the `guests` scenario and demo ([`scenario`]).

pub mod guests;
pub mod hw;
pub mod scenario;

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use sluice_hypervisor::iommufd::VmId;
use sluice_hypervisor::vcpu::svm::{SvmBackend, SvmFeatures};
use sluice_hypervisor::vm::config::ValidVm;
use sluice_hypervisor::vm::instance::{BuildInputs, build_x86};
use sluice_iommu::pagetable::x86::AmdNpt;
use sluice_iommu::pagetable::{IoPageTable, PageSize, TableConfig};
use sluice_kernel::hw::FrameDmaMemory;
use sluice_kernel::platform::Platform;

use crate::guest_runtime::{ArchRuntime, BareMetalVm, KernelFrames};
use crate::pci::Pci;
use hw::BareMetalSvm;

/// x86_64 with AMD SVM and nested paging.
pub struct Svm;

impl ArchRuntime for Svm {
    type Backend = SvmBackend<BareMetalSvm>;

    /// SVM switched on for the calling CPU with its own host save and
    /// VMSAVE pages (reserved per CPU by `smp::init`).
    fn backend_for_this_cpu(platform: &'static Platform) -> Result<Self::Backend, String> {
        use sluice_kernel::arch::smp;
        sluice_kernel::smp::init(platform).map_err(|e| format!("smp: {e}"))?;
        let detected = smp::enable_svm().map_err(|e| format!("SVM: {e}"))?;
        let (_, host_vmsave) = smp::svm_pages().ok_or("SVM: this CPU has no host pages")?;
        let a = sluice_kernel::arch::cpuid(0x8000_000a, 0);
        let width = sluice_kernel::arch::cpuid(0x8000_0008, 0);
        let features = SvmFeatures::from_cpuid(a.ebx, a.edx, width.eax);
        log::info!(
            "SVM on this CPU: {} ASIDs, nested paging {}, next-RIP save {} (instruction lengths decoded by Sluice when absent)",
            detected.asids,
            detected.nested_paging,
            detected.next_rip_save
        );
        // SAFETY: SVM is enabled on this CPU; `host_vmsave` is its own
        // VMSAVE page, kept for Sluice's life.
        let hardware = unsafe { BareMetalSvm::new(host_vmsave) };
        SvmBackend::new(hardware, features).map_err(|e| format!("SVM backend: {e}"))
    }

    /// RAM from the frame allocator, an AMD NPT (4 levels, 2 MiB pages at
    /// most) and the x86 boot protocol.
    fn build_vm(
        platform: &'static Platform,
        pci: &'static Pci,
        valid: &ValidVm,
        id: VmId,
        image: &[u8],
    ) -> Result<BareMetalVm, String> {
        let tables: &'static FrameDmaMemory<'static> =
            Box::leak(Box::new(FrameDmaMemory::new(&platform.frames)));
        let physical_bits = sluice_kernel::arch::cpuid(0x8000_0008, 0).eax & 0xff;
        let format = AmdNpt::new(4, physical_bits).map_err(|e| format!("NPT format: {e:?}"))?;
        // 2 MiB leaves: guest RAM comes in 2 MiB chunks; 1 GiB pages would
        // need 1 GiB-aligned host memory the allocator rarely has.
        let npt = IoPageTable::new(tables, format, TableConfig::new(PageSize::Size2M, true))
            .map_err(|e| format!("NPT root: {e:?}"))?;
        let one_gib_pages = sluice_kernel::arch::cpuid(0x8000_0001, 0).edx & (1 << 26) != 0;
        build_x86(
            BuildInputs {
                id,
                vm: valid,
                image,
                host_config: &pci.ecam,
                topologies: &pci.segments,
                one_gib_pages,
            },
            KernelFrames::new(&platform.frames),
            Box::new(npt),
        )
        .map_err(|e| format!("VM {}: {e}", valid.config.name))
    }
}
