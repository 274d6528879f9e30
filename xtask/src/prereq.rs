//! Prerequisite checks: each either passes, installs what it can, or says
//! the one command that installs what is missing.

use std::process::Command;

use sluice_qemu_tests::Arch;
use sluice_qemu_tests::qemu::{self, Firmware};

use crate::XtaskError;

/// Makes sure the rustc target for `arch` is installed, adding it with rustup when not.
pub fn rust_target(arch: Arch) -> Result<(), XtaskError> {
    rust_target_named(arch.uefi_target())
}

/// Makes sure the rustc target `target` is installed, adding it with rustup when not.
pub fn rust_target_named(target: &str) -> Result<(), XtaskError> {
    let Some(rustup) = qemu::find_program("rustup") else {
        // Without rustup we cannot tell; cargo will say so if it is missing.
        return Ok(());
    };
    let installed = Command::new(&rustup)
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|err| XtaskError::new(format!("cannot run rustup: {err}")))?;
    let listed = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success() && listed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    eprintln!("xtask: the rustc target {target} is missing; running: rustup target add {target}");
    let added = Command::new(&rustup)
        .args(["target", "add", target])
        .status()
        .map_err(|err| XtaskError::new(format!("cannot run rustup: {err}")))?;
    if added.success() {
        Ok(())
    } else {
        Err(XtaskError::new(format!(
            "could not install the rustc target {target}; install it with: rustup target add {target}"
        )))
    }
}

/// The QEMU binary and firmware for `arch`, or an error naming the install command.
pub fn qemu_and_firmware(arch: Arch) -> Result<(std::path::PathBuf, Firmware), XtaskError> {
    let program = qemu::locate_qemu(arch).map_err(XtaskError::new)?;
    let firmware = Firmware::locate(arch).map_err(XtaskError::new)?;
    Ok((program, firmware))
}

/// Everything `arch` needs to build and boot Sluice.
pub fn for_boot(arch: Arch) -> Result<(std::path::PathBuf, Firmware), XtaskError> {
    let found = qemu_and_firmware(arch)?;
    rust_target(arch)?;
    Ok(found)
}
