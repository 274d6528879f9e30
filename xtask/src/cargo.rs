//! Running cargo for the workspace, and finding what it built.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_qemu_tests::Arch;

use crate::XtaskError;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// A cargo command run from the workspace root, with the cargo that runs us.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, echoing it first; an error when it fails.
pub fn run(mut command: Command, what: &str) -> Result<(), XtaskError> {
    eprintln!("xtask: {what}");
    let status = command
        .status()
        .map_err(|err| XtaskError::new(format!("cannot start cargo: {err}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(XtaskError::failed(format!("{what}: failed ({status})")))
    }
}

/// The workspace's target directory as cargo decides it (CARGO_TARGET_DIR,
/// `build.target-dir`, or `<root>/target`).
pub fn target_dir() -> Result<PathBuf, XtaskError> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .map_err(|err| XtaskError::new(format!("cannot run cargo metadata: {err}")))?;
    if !output.status.success() {
        return Err(XtaskError::new(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let json = String::from_utf8_lossy(&output.stdout);
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .ok_or_else(|| XtaskError::new("cargo metadata did not name the target directory"))
}

/// The value of the first `"field":"..."` string in `json`, unescaped.
/// Enough JSON for cargo metadata's paths; not a general parser.
pub fn json_string_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":");
    let start = json.find(&key)? + key.len();
    let rest = json[start..].trim_start().strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'r' => value.push('\r'),
                'b' => value.push('\u{8}'),
                'f' => value.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Builds `sluice-boot` for `arch` and returns the path of the `.efi` file.
pub fn build_boot(arch: Arch, release: bool, target_dir: &Path) -> Result<PathBuf, XtaskError> {
    let mut command = cargo();
    command.args(["build", "-p", "sluice-boot", "--target", arch.uefi_target()]);
    if release {
        command.arg("--release");
    }
    let profile = if release { "release" } else { "debug" };
    let what = format!(
        "cargo build -p sluice-boot --target {}{}",
        arch.uefi_target(),
        if release { " --release" } else { "" }
    );
    // A failed build is xtask's failure (status 100), never to be taken for
    // Sluice's exit code 1 by someone scripting `cargo xtask run`.
    run(command, &what).map_err(|err| XtaskError::new(err.message))?;
    let efi = target_dir
        .join(arch.uefi_target())
        .join(profile)
        .join("sluice-boot.efi");
    if efi.is_file() {
        Ok(efi)
    } else {
        Err(XtaskError::new(format!(
            "cargo built sluice-boot for {} but {} is missing",
            arch.uefi_target(),
            efi.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_string_fields() {
        let json = r#"{"packages":[],"target_directory":"/work/a \"b\"\\c\u00e9","version":1}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/work/a \"b\"\\cé")
        );
        assert_eq!(json_string_field(json, "missing"), None);
        assert_eq!(json_string_field(r#"{"x":"unterminated"#, "x"), None);
        assert_eq!(json_string_field(r#"{"x": 1}"#, "x"), None);
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
