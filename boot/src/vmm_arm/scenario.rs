//! The `guests` scenario on aarch64: the VMs of the command line run the
//! test guest at EL1 under Sluice's EL2, over the owned SMMUs, judged by
//! `crate::guest_runtime::verdict`.

extern crate alloc;

use alloc::string::String;

use sluice_hypervisor::iommufd::VmConfig;
use sluice_kernel::platform::Platform;
use sluice_kernel::println;

use super::El2;
use super::guests::prepare;
use crate::guest_runtime::verdict;

/// Runs the configured VMs and judges them (the aarch64 `guests`
/// scenario).
///
/// MSIs are not isolated on aarch64 yet: an MSI is a write to the GIC ITS,
/// and Sluice has no ITS driver, so the SMMU backend reports no MSI
/// isolation and the object model would refuse every `DEVICE_BIND`. This
/// test scenario's VMs are therefore declared with
/// `allow_unsafe_interrupts`, which logs a warning for every device bound
/// that way; nothing else about them is relaxed.
pub fn run(platform: &'static Platform) -> Result<(), String> {
    verdict::run_and_check::<El2, _>(&prepare(platform, unisolated_msis())?, false)
}

/// The demo with `vm=` words (see [`verdict::demo`]), under the same MSI
/// caveat as [`run`].
pub fn demo(platform: &'static Platform) -> bool {
    let start = sluice_kernel::clock::now_ns().unwrap_or(0);
    println!(
        "Sluice demo: taking over PCI and every SMMU; every device is blocked until a guest binds it"
    );
    verdict::demo::<El2, _>(prepare(platform, unisolated_msis()), start)
}

/// The VM configuration while MSIs cannot be isolated (see [`run`]).
fn unisolated_msis() -> VmConfig {
    println!(
        "  aarch64 guests: MSIs are not isolated (no ITS driver yet); the VMs bind their devices with allow_unsafe_interrupts"
    );
    VmConfig {
        allow_unsafe_interrupts: true,
        ..VmConfig::default()
    }
}
