//! The C header in `hypervisor/abi/include/sluice/hypercall.h` is generated
//! from the sluice-abi crate. This test fails when they drift apart; run it
//! with `SLUICE_BLESS=1` to regenerate the header. When a C compiler is
//! available, it also checks that C sees the same sizes and offsets.

use std::path::PathBuf;

fn header_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("abi/include/sluice/hypercall.h")
}

fn generated() -> String {
    let mut s = String::new();
    sluice_abi::write_c_header(&mut s).expect("writing to a String cannot fail");
    s
}

#[test]
fn c_header_is_up_to_date() {
    let text = generated();
    let path = header_path();
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&path, &text).expect("write header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{} is stale: rerun with SLUICE_BLESS=1",
        path.display()
    );
    assert!(text.contains("#define SLUICE_CMD_IOAS_MAP 0x85ULL"));
    assert!(text.contains("struct sluice_ioas_map {"));
}

#[test]
fn c_compiler_agrees_on_the_layout() {
    let Ok(dir) = std::env::var("CARGO_TARGET_TMPDIR") else {
        return;
    };
    let src = PathBuf::from(dir).join("sluice_header_check.c");
    std::fs::write(
        &src,
        format!(
            "#include \"{}\"\nint main(void) {{ return 0; }}\n",
            header_path().display()
        ),
    )
    .unwrap();
    match std::process::Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-fsyntax-only"])
        .arg(&src)
        .output()
    {
        // No C compiler on this machine: the Rust-side layout tests still run.
        Err(_) => eprintln!("no C compiler; skipping the C layout check"),
        Ok(out) => assert!(
            out.status.success(),
            "the generated header does not compile or its layout asserts fail:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
