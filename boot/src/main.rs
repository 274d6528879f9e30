//! Sluice's UEFI entry.
#![cfg_attr(target_os = "uefi", no_std, no_main)]

#[cfg(not(target_os = "uefi"))]
fn main() {
    eprintln!("sluice-boot is a UEFI application: build it with `cargo xtask build`.");
    std::process::exit(2);
}
