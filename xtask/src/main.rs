//! Sluice's developer commands. Run `cargo xtask --help`.

mod cargo;
mod prereq;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;

use clap::{Args, Parser, Subcommand};
use sluice_qemu_tests::guests::{self, GuestImageFile};
use sluice_qemu_tests::harness::{self, ArchSetup, Harness};
use sluice_qemu_tests::judge::{self, RawExit};
use sluice_qemu_tests::qemu::{self, BootLock, BootRequest, QemuConfig};
use sluice_qemu_tests::{Arch, SCENARIOS, scenarios};

/// Exit status of `run` when Sluice gave none (see [`judge::NO_SLUICE_STATUS`]).
const NO_SLUICE_STATUS: u8 = 125;

/// Exit status of xtask's own failures (a missing prerequisite, a failed build).
const XTASK_ERROR: u8 = 100;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Sluice's developer commands",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the UEFI application (both architectures unless --arch is given).
    Build {
        #[arg(long, value_parser = parse_arch)]
        arch: Option<Arch>,
        #[arg(long)]
        release: bool,
    },
    /// Build Sluice and boot it under QEMU with the serial console on this
    /// terminal; exit with Sluice's exit code (125 when Sluice gave none).
    Run(BootArgs),
    /// Build Sluice, lay out the ESP and print the QEMU command line that boots it.
    QemuCmd(BootArgs),
    /// Run the host unit tests, then every QEMU scenario on both architectures.
    Test {
        /// Only the host unit tests.
        #[arg(long, conflicts_with = "qemu_only")]
        host_only: bool,
        /// Only the QEMU scenarios.
        #[arg(long)]
        qemu_only: bool,
        /// Only scenarios on this architecture.
        #[arg(long, value_parser = parse_arch)]
        arch: Option<Arch>,
        /// Only scenarios whose `<arch>-<name>` contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Echo every scenario's serial console while it runs.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Run the IO page-table benchmark (`cargo bench -p sluice-iommu --bench pagetable`).
    Bench,
    /// Fuzz every target under drivers/*/fuzz for a bounded time (needs cargo-fuzz and nightly).
    Fuzz {
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
}

#[derive(Args)]
struct BootArgs {
    /// Architecture to boot.
    #[arg(long, value_parser = parse_arch, default_value = "x86_64")]
    arch: Arch,
    /// Build and boot the release profile.
    #[arg(long)]
    release: bool,
    /// Boot a scenario from the table (its command line and board) instead of the demo.
    #[arg(long)]
    scenario: Option<String>,
    /// x86_64: replace the intel-iommu properties, e.g. aw-bits=48,x-scalable-mode=on,caching-mode=on.
    #[arg(long, value_name = "KEY=VALUE,...")]
    iommu: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    smp: Option<u32>,
    /// Guest memory in QEMU's syntax (e.g. 2G).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Words appended to the Sluice command line, e.g. "loglevel=debug".
    #[arg(long)]
    cmdline: Option<String>,
    /// Extra QEMU arguments, after `--`.
    #[arg(last = true, value_name = "QEMU ARGS")]
    qemu_args: Vec<String>,
}

fn parse_arch(text: &str) -> Result<Arch, String> {
    text.parse()
}

/// A failure of xtask itself, or of a step it ran.
#[derive(Debug)]
pub struct XtaskError {
    message: String,
    status: u8,
}

impl XtaskError {
    /// A prerequisite or setup problem.
    pub fn new(message: impl Into<String>) -> Self {
        XtaskError {
            message: message.into(),
            status: XTASK_ERROR,
        }
    }

    /// A step that ran and failed (a build, a test run).
    pub fn failed(message: impl Into<String>) -> Self {
        XtaskError {
            message: message.into(),
            status: 1,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Build { arch, release } => build(arch, release),
        Task::Run(args) => run(&args),
        Task::QemuCmd(args) => qemu_cmd(&args),
        Task::Test {
            host_only,
            qemu_only,
            arch,
            filter,
            verbose,
        } => test(!qemu_only, !host_only, arch, filter.as_deref(), verbose),
        Task::Bench => bench(),
        Task::Fuzz { seconds } => fuzz(seconds),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("xtask: error: {}", err.message);
            ExitCode::from(err.status)
        }
    }
}

fn arches(arch: Option<Arch>) -> Vec<Arch> {
    arch.map_or_else(|| Arch::ALL.to_vec(), |arch| vec![arch])
}

fn build(arch: Option<Arch>, release: bool) -> Result<u8, XtaskError> {
    let target_dir = cargo::target_dir()?;
    for arch in arches(arch) {
        prereq::rust_target(arch)?;
        let efi = cargo::build_boot(arch, release, &target_dir)?;
        println!("{}", efi.display());
    }
    Ok(0)
}

/// Builds Sluice and prepares the boot `args` describe; the lock keeps other
/// runs of the same `<arch>-<name>` off its ESP until it is dropped.
fn prepare_boot(args: &BootArgs) -> Result<(QemuConfig, BootLock), XtaskError> {
    let arch = args.arch;
    if arch == Arch::Aarch64 && args.iommu.is_some() {
        return Err(XtaskError::new(qemu::SMMU_HAS_NO_PROPERTIES));
    }
    let mut request = match &args.scenario {
        None => BootRequest::demo(arch),
        Some(name) => {
            let scenario = scenarios::find(name).ok_or_else(|| {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                XtaskError::new(format!(
                    "no scenario `{name}`; the table has: {}",
                    names.join(", ")
                ))
            })?;
            if !scenario.runs_on(arch) {
                return Err(XtaskError::new(format!(
                    "scenario `{name}` does not run on {arch}"
                )));
            }
            BootRequest::for_scenario(arch, scenario)
        }
    };
    if let Some(iommu) = &args.iommu {
        request.intel_iommu = iommu.clone();
    }
    if let Some(smp) = args.smp {
        if smp == 0 {
            return Err(XtaskError::new("--smp must be at least 1"));
        }
        request.smp = smp;
    }
    if let Some(mem) = &args.mem {
        request.mem = mem.clone();
    }
    if let Some(words) = &args.cmdline {
        request.cmdline = format!("{} {words}", request.cmdline);
    }
    request.extra = args.qemu_args.clone();

    let (program, firmware) = prereq::for_boot(arch)?;
    let target_dir = cargo::target_dir()?;
    let efi = cargo::build_boot(arch, args.release, &target_dir)?;
    request.guest_images = build_guests(arch, &target_dir)?;
    let lock = BootLock::acquire(&target_dir, arch, &request.run_name).map_err(|err| {
        XtaskError::new(format!(
            "cannot lock the ESP of {arch}-{}: {err}",
            request.run_name
        ))
    })?;
    let config = request
        .prepare(&target_dir, &efi, &firmware, &program)
        .map_err(XtaskError::new)?;
    Ok((config, lock))
}

fn qemu_cmd(args: &BootArgs) -> Result<u8, XtaskError> {
    let (config, _lock) = prepare_boot(args)?;
    println!("{}", config.shell_line());
    Ok(0)
}

fn run(args: &BootArgs) -> Result<u8, XtaskError> {
    let (config, _lock) = prepare_boot(args)?;
    eprintln!("xtask: {}", config.shell_line());
    // The console stays on this terminal; QEMU's own messages are passed on
    // and kept, to tell a QEMU start-up error from a Sluice exit status.
    let mut child = config
        .command()
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| {
            XtaskError::new(format!("cannot start {}: {err}", config.program.display()))
        })?;
    let stderr = child.stderr.take().map(|pipe| {
        thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("{line}");
                text.push_str(&line);
                text.push('\n');
            }
            text
        })
    });
    let status = child
        .wait()
        .map_err(|err| XtaskError::new(format!("cannot wait for QEMU: {err}")))?;
    let stderr = stderr
        .and_then(|handle| handle.join().ok())
        .unwrap_or_default();
    let exit = judge::decode_exit_with_stderr(config.arch, RawExit::from_status(status), &stderr);
    let _ = io::stdout().flush();
    eprintln!("\nxtask: {exit}");
    Ok(u8::try_from(exit.process_status()).unwrap_or(NO_SLUICE_STATUS))
}

fn test(
    host: bool,
    qemu: bool,
    arch: Option<Arch>,
    filter: Option<&str>,
    verbose: bool,
) -> Result<u8, XtaskError> {
    let arches = arches(arch);
    // Check every prerequisite before spending time on anything.
    let mut found = BTreeMap::new();
    if qemu {
        for &arch in &arches {
            found.insert(arch, prereq::for_boot(arch)?);
        }
    }
    let mut host_failed = false;
    if host {
        let mut command = cargo::cargo();
        command.args(["test", "--workspace", "--exclude", "sluice-boot"]);
        if let Err(err) = cargo::run(command, "cargo test --workspace --exclude sluice-boot") {
            eprintln!("xtask: {}", err.message);
            host_failed = true;
        }
        // The test guest is a workspace of its own: its unit tests run apart.
        let (command, what) = guests::test_guest_unit_tests(&cargo::target_dir()?);
        if let Err(err) = cargo::run(command, &what) {
            eprintln!("xtask: {}", err.message);
            host_failed = true;
        }
    }
    if !qemu {
        return Ok(u8::from(host_failed));
    }

    let target_dir = cargo::target_dir()?;
    let mut setups = BTreeMap::new();
    for (arch, (qemu_program, firmware)) in found {
        let setup = cargo::build_boot(arch, false, &target_dir)
            .and_then(|boot_efi| {
                Ok(ArchSetup {
                    qemu: qemu_program,
                    firmware,
                    boot_efi,
                    guest_images: build_guests(arch, &target_dir)?,
                })
            })
            .map_err(|err| err.message);
        setups.insert(arch, setup);
    }
    let harness = Harness {
        target_dir,
        setups,
        echo: verbose,
    };
    let selected = harness::select(SCENARIOS, &arches, filter);
    if selected.is_empty() {
        return Err(XtaskError::failed(format!(
            "no QEMU scenario matches {:?}",
            filter.unwrap_or("")
        )));
    }
    if host_failed {
        println!(
            "xtask: the host unit tests failed (see above); running the QEMU scenarios anyway"
        );
    }
    let mut stdout = io::stdout();
    let (summary, _) = harness
        .run(&selected, &mut stdout)
        .map_err(|err| XtaskError::new(format!("cannot write the report: {err}")))?;
    Ok(u8::from(host_failed || summary.failed > 0))
}

/// Builds the guest images `arch`'s boots carry on their ESP: the test
/// guest, built for `arch`.
fn build_guests(arch: Arch, target_dir: &Path) -> Result<Vec<GuestImageFile>, XtaskError> {
    let Some(build) = guests::test_guest_build(arch, target_dir) else {
        return Ok(Vec::new());
    };
    if let Some(target) = guests::test_guest_target(arch) {
        prereq::rust_target_named(target)?;
    }
    cargo::run(build.command, &build.description).map_err(|err| XtaskError::new(err.message))?;
    if !build.image.path.is_file() {
        return Err(XtaskError::new(format!(
            "the test guest built, but {} is missing",
            build.image.path.display()
        )));
    }
    Ok(vec![build.image])
}

fn bench() -> Result<u8, XtaskError> {
    let root = cargo::workspace_root();
    if !has_bench(&root.join("drivers/iommu"), "pagetable") {
        return Err(XtaskError::new(
            "the benchmark `pagetable` of sluice-iommu does not exist yet \
             (expected drivers/iommu/benches/pagetable.rs or a [[bench]] named pagetable)",
        ));
    }
    let mut command = cargo::cargo();
    command.args(["bench", "-p", "sluice-iommu", "--bench", "pagetable"]);
    cargo::run(command, "cargo bench -p sluice-iommu --bench pagetable")?;
    Ok(0)
}

/// Whether the crate in `dir` has a bench target `name` (auto-discovered or declared).
fn has_bench(dir: &Path, name: &str) -> bool {
    if dir.join("benches").join(format!("{name}.rs")).is_file()
        || dir.join("benches").join(name).join("main.rs").is_file()
    {
        return true;
    }
    let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
        return false;
    };
    manifest.split("[[bench]]").skip(1).any(|section| {
        let section = section.split("\n[").next().unwrap_or("");
        section.lines().any(|line| {
            let line = line.replace(' ', "");
            line == format!("name=\"{name}\"")
        })
    })
}

fn fuzz(seconds: u32) -> Result<u8, XtaskError> {
    if qemu::find_program("cargo-fuzz").is_none() {
        return Err(XtaskError::new(
            "cargo-fuzz is not installed; install it with: cargo install cargo-fuzz",
        ));
    }
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        return Err(XtaskError::new(
            "cargo fuzz needs a nightly toolchain; install it with: rustup toolchain install nightly",
        ));
    }
    let targets = fuzz_targets(&cargo::workspace_root().join("drivers"));
    if targets.is_empty() {
        return Err(XtaskError::new(
            "no fuzz targets found (expected drivers/<crate>/fuzz/fuzz_targets/<target>.rs)",
        ));
    }
    let mut failed = Vec::new();
    for (crate_dir, target) in &targets {
        // `cargo` from PATH (rustup's proxy), which understands `+nightly`.
        let mut command = Command::new("cargo");
        command.current_dir(crate_dir).args([
            "+nightly",
            "fuzz",
            "run",
            target,
            "--",
            &format!("-max_total_time={seconds}"),
        ]);
        let what = format!(
            "cargo +nightly fuzz run {target} -- -max_total_time={seconds} (in {})",
            crate_dir.display()
        );
        if let Err(err) = cargo::run(command, &what) {
            eprintln!("xtask: {}", err.message);
            failed.push(target.clone());
        }
    }
    if failed.is_empty() {
        println!(
            "xtask: {} fuzz target(s) ran {seconds} s each without a crash",
            targets.len()
        );
        Ok(0)
    } else {
        Err(XtaskError::failed(format!(
            "fuzz targets failed: {}",
            failed.join(", ")
        )))
    }
}

/// `(crate directory, target name)` for every `drivers/*/fuzz/fuzz_targets/*.rs`.
fn fuzz_targets(drivers: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let Ok(crates) = std::fs::read_dir(drivers) else {
        return found;
    };
    let mut crate_dirs: Vec<PathBuf> = crates.filter_map(|e| e.ok().map(|e| e.path())).collect();
    crate_dirs.sort();
    for crate_dir in crate_dirs {
        let Ok(files) = std::fs::read_dir(crate_dir.join("fuzz").join("fuzz_targets")) else {
            continue;
        };
        let mut names: Vec<String> = files
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(String::from))?
            })
            .collect();
        names.sort();
        found.extend(names.into_iter().map(|name| (crate_dir.clone(), name)));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        assert_eq!(i32::from(NO_SLUICE_STATUS), judge::NO_SLUICE_STATUS);
    }

    #[test]
    fn parses_run_with_qemu_args() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--arch",
            "aarch64",
            "--scenario",
            "boot",
            "--smp",
            "2",
            "--mem",
            "2G",
            "--cmdline",
            "loglevel=trace",
            "--",
            "-d",
            "int",
        ])
        .unwrap();
        let Task::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.arch, Arch::Aarch64);
        assert_eq!(args.scenario.as_deref(), Some("boot"));
        assert_eq!(args.smp, Some(2));
        assert_eq!(args.qemu_args, vec!["-d", "int"]);
        assert!(Cli::try_parse_from(["xtask", "run", "--arch", "mips"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "test", "--host-only", "--qemu-only"]).is_err());
    }

    #[test]
    fn finds_benches_and_fuzz_targets() {
        let dir = std::env::temp_dir().join(format!("xtask-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let iommu = dir.join("drivers/iommu");
        std::fs::create_dir_all(iommu.join("fuzz/fuzz_targets")).unwrap();
        std::fs::create_dir_all(dir.join("drivers/pci/fuzz/fuzz_targets")).unwrap();
        std::fs::write(iommu.join("fuzz/fuzz_targets/dmar.rs"), "").unwrap();
        std::fs::write(iommu.join("fuzz/fuzz_targets/iort.rs"), "").unwrap();
        std::fs::write(dir.join("drivers/pci/fuzz/fuzz_targets/caps.rs"), "").unwrap();
        std::fs::write(dir.join("drivers/pci/fuzz/fuzz_targets/README"), "").unwrap();
        let targets = fuzz_targets(&dir.join("drivers"));
        let names: Vec<&str> = targets.iter().map(|(_, name)| name.as_str()).collect();
        assert_eq!(names, vec!["dmar", "iort", "caps"]);
        assert_eq!(targets[0].0, iommu);

        assert!(!has_bench(&iommu, "pagetable"));
        std::fs::write(
            iommu.join("Cargo.toml"),
            "[package]\nname = \"x\"\n\n[[bench]]\nname = \"pagetable\"\nharness = false\n",
        )
        .unwrap();
        assert!(has_bench(&iommu, "pagetable"));
        assert!(!has_bench(&iommu, "other"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
