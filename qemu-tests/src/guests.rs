//! Guest images Sluice boots in scenarios: how they are built and where
//! they go on the ESP (`\EFI\sluice\<image>`, the `image=` of a `vm=` word;
//! `docs/boot-protocol.md`).
//!
//! The test guest (`qemu-tests/guests/test-guest`) is a bare-metal crate in
//! its own workspace, built for `x86_64-unknown-none` or
//! `aarch64-unknown-none` into `<target>/guests`. Its address layout is shared here, so that host code
//! (scenarios, checks) names the same victim buffer as the guest.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::arch::Arch;

/// The test guest's fixed guest-physical addresses and IOVAs (its
/// `src/layout.rs`, compiled here too).
#[path = "../guests/test-guest/src/layout.rs"]
pub mod test_guest_layout;

/// The test guest's image name: `image=test-guest`.
pub const TEST_GUEST: &str = "test-guest";

/// A file to put on the ESP as `\EFI\sluice\<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImageFile {
    pub name: String,
    pub path: PathBuf,
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// The test guest's manifest.
pub fn test_guest_manifest() -> PathBuf {
    workspace_root().join("qemu-tests/guests/test-guest/Cargo.toml")
}

/// Where guests are built: `<target>/guests`.
pub fn guests_target_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("guests")
}

/// The rustc target the test guest is built for on `arch`; `None` for an
/// architecture without a direct-boot protocol.
pub const fn test_guest_target(arch: Arch) -> Option<&'static str> {
    match arch {
        Arch::X86_64 => Some("x86_64-unknown-none"),
        Arch::Aarch64 => Some("aarch64-unknown-none"),
    }
}

fn cargo_program() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A build of the test guest: the command to run, its description for
/// logs, and the image it produces.
#[derive(Debug)]
pub struct GuestBuild {
    pub command: Command,
    pub description: String,
    pub image: GuestImageFile,
}

/// How to build the test guest for `arch` (release, into
/// `<target_dir>/guests`), or `None` if it does not run on `arch`.
pub fn test_guest_build(arch: Arch, target_dir: &Path) -> Option<GuestBuild> {
    let target = test_guest_target(arch)?;
    let guests = guests_target_dir(target_dir);
    let manifest = test_guest_manifest();
    let mut command = Command::new(cargo_program());
    command
        .current_dir(workspace_root())
        .args(["build", "--release", "--manifest-path"]);
    command
        .arg(&manifest)
        .args(["--target", target, "--target-dir"])
        .arg(&guests);
    Some(GuestBuild {
        command,
        description: format!(
            "cargo build --release --manifest-path qemu-tests/guests/test-guest/Cargo.toml --target {target} --target-dir {}",
            guests.display()
        ),
        image: GuestImageFile {
            name: String::from(TEST_GUEST),
            path: guests.join(target).join("release").join(TEST_GUEST),
        },
    })
}

/// `cargo test` of the test guest's host unit tests (start-info parsing,
/// result lines), which the workspace's `cargo test` does not reach.
pub fn test_guest_unit_tests(target_dir: &Path) -> (Command, String) {
    let guests = guests_target_dir(target_dir);
    let mut command = Command::new(cargo_program());
    command
        .current_dir(workspace_root())
        .args(["test", "--manifest-path"])
        .arg(test_guest_manifest())
        .arg("--target-dir")
        .arg(&guests);
    let description = format!(
        "cargo test --manifest-path qemu-tests/guests/test-guest/Cargo.toml --target-dir {}",
        guests.display()
    );
    (command, description)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_into_the_guests_target_dir() {
        let build = test_guest_build(Arch::X86_64, Path::new("/t")).unwrap();
        assert_eq!(
            build.image,
            GuestImageFile {
                name: "test-guest".into(),
                path: PathBuf::from("/t/guests/x86_64-unknown-none/release/test-guest"),
            }
        );
        let args: Vec<_> = build.command.get_args().collect();
        assert_eq!(args[..3], ["build", "--release", "--manifest-path"]);
        assert!(
            Path::new(args[3]).ends_with("qemu-tests/guests/test-guest/Cargo.toml"),
            "{args:?}"
        );
        assert_eq!(
            args[4..],
            [
                "--target",
                "x86_64-unknown-none",
                "--target-dir",
                "/t/guests"
            ]
        );
        assert!(test_guest_manifest().is_file());
        let arm = test_guest_build(Arch::Aarch64, Path::new("/t")).unwrap();
        assert_eq!(
            arm.image.path,
            PathBuf::from("/t/guests/aarch64-unknown-none/release/test-guest")
        );
    }
}
