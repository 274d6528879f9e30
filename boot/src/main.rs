//! Sluice's UEFI entry, for x86_64 and aarch64.
//!
//! While boot services still run it finds the ACPI RSDP, reserves the
//! hypervisor heap, chooses the console and reads the command line (UEFI load
//! options, else `\EFI\sluice\cmdline.txt` on the ESP); then it leaves boot
//! services, converts the memory map and hands everything to the kernel.
#![cfg_attr(target_os = "uefi", no_std, no_main)]

#[cfg(target_os = "uefi")]
mod edu;
#[cfg(target_os = "uefi")]
mod guest_runtime;
#[cfg(all(target_os = "uefi", target_arch = "x86_64"))]
mod iommu_owner;
#[cfg(all(target_os = "uefi", target_arch = "aarch64"))]
mod its_msi;
#[cfg(all(target_os = "uefi", target_arch = "aarch64"))]
mod its_owner;
#[cfg(target_os = "uefi")]
mod pci;
#[cfg(target_os = "uefi")]
mod scenarios;
#[cfg(all(target_os = "uefi", target_arch = "aarch64"))]
mod smmu_dma;
#[cfg(all(target_os = "uefi", target_arch = "aarch64"))]
mod smmu_owner;
#[cfg(target_os = "uefi")]
mod smp_scenario;
#[cfg(all(target_os = "uefi", target_arch = "x86_64"))]
mod svm_smoke;
#[cfg(target_os = "uefi")]
mod uefi_entry;
#[cfg(all(target_os = "uefi", target_arch = "x86_64"))]
mod vmm;
#[cfg(all(target_os = "uefi", target_arch = "aarch64"))]
mod vmm_arm;
#[cfg(all(target_os = "uefi", target_arch = "x86_64"))]
mod vtd_dma;

#[cfg(not(target_os = "uefi"))]
fn main() {
    eprintln!("sluice-boot is a UEFI application: build it with `cargo xtask build`.");
    std::process::exit(2);
}
