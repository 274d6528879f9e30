//! Links the bare-metal guest with its linker script: a static, non-PIE
//! executable at fixed addresses, as Sluice's direct-boot protocol asks
//! (`docs/boot-protocol.md`, "The image"). Host builds (unit tests) link
//! normally.

use std::env;
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    for script in ["link-x86_64.ld", "link-aarch64.ld"] {
        println!("cargo:rerun-if-changed={}", dir.join(script).display());
    }
    if os != "none" {
        return;
    }
    let script = dir.join(format!("link-{arch}.ld"));
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    // The bare-metal targets default to static PIE (ET_DYN); Sluice loads
    // only ET_EXEC at the addresses the script gives.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
}
