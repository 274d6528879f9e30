//! The binary fixtures equal what the documented builders produce.
//! `SLUICE_REGEN_FIXTURES=1` rewrites them from the builders instead.

mod common;

use std::path::PathBuf;

fn check(name: &str, built: Vec<u8>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    if std::env::var_os("SLUICE_REGEN_FIXTURES").is_some() {
        std::fs::write(&path, &built).expect("write fixture");
    }
    let stored =
        std::fs::read(&path).expect("fixture present (regenerate with SLUICE_REGEN_FIXTURES=1)");
    assert_eq!(stored, built, "{name} differs from its builder");
}

#[test]
fn qemu_q35_dmar_fixture_matches_builder() {
    check("qemu-q35-dmar.bin", common::qemu_q35_dmar());
}

#[test]
fn qemu_virt_iort_fixture_matches_builder() {
    check("qemu-virt-iort.bin", common::qemu_virt_iort());
}
