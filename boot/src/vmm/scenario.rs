//! The `guests` scenario and the guest part of the demo on x86_64: the
//! VMs of the command line over the owned VT-d units, judged by
//! `crate::guest_runtime::verdict`.

extern crate alloc;

use alloc::string::String;

use sluice_kernel::platform::Platform;
use sluice_kernel::println;

use super::Svm;
use super::guests::prepare;
use crate::guest_runtime::verdict;

/// Runs the configured VMs and judges them (the `guests` scenario).
pub fn run(platform: &'static Platform) -> Result<(), String> {
    verdict::run_and_check::<Svm, _>(&prepare(platform)?, false)
}

/// The demo with `vm=` words (see [`verdict::demo`]).
pub fn demo(platform: &'static Platform) -> bool {
    let start = sluice_kernel::clock::now_ns().unwrap_or(0);
    println!(
        "Sluice demo: taking over PCI and every VT-d unit; every device is blocked until a guest binds it"
    );
    verdict::demo::<Svm, _>(prepare(platform), start)
}
