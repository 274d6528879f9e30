//! The `guests` scenario on aarch64: the VMs of the command line run the
//! test guest at EL1 under Sluice's EL2, over the owned SMMUs, judged by
//! `crate::guest_runtime::verdict`.

extern crate alloc;

use alloc::string::String;

use sluice_kernel::platform::Platform;
use sluice_kernel::println;

use super::El2;
use super::guests::prepare;
use crate::guest_runtime::verdict;

/// Runs the configured VMs and judges them (the aarch64 `guests`
/// scenario). MSI isolation comes from the owned ITSes (see
/// [`prepare`]).
pub fn run(platform: &'static Platform) -> Result<(), String> {
    verdict::run_and_check::<El2, _>(&prepare(platform)?, false)
}

/// The demo with `vm=` words (see [`verdict::demo`]).
pub fn demo(platform: &'static Platform) -> bool {
    let start = sluice_kernel::clock::now_ns().unwrap_or(0);
    println!(
        "Sluice demo: taking over PCI, every SMMU and every GIC ITS; every device is blocked until a guest binds it"
    );
    verdict::demo::<El2, _>(prepare(platform), start)
}
