//! Runs the harness end to end on fake "QEMU" shell scripts, to prove that
//! PASS, FAIL lines, missing result lines, missing exit status and timeouts
//! are each judged as they must be, and that a timeout kills the whole
//! process group.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_qemu_tests::harness::{ArchSetup, Harness, ScenarioReport};
use sluice_qemu_tests::judge::Outcome;
use sluice_qemu_tests::qemu::Firmware;
use sluice_qemu_tests::{Arch, Expected, Scenario};

/// A scratch directory of its own for each test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-qemu-{test}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A harness whose `arch` "QEMU" is `script` (a /bin/sh body).
fn harness(dir: &Path, arch: Arch, script: &str) -> Harness {
    let qemu = dir.join(format!("fake-{}", arch.qemu_program()));
    fs::write(&qemu, format!("#!/bin/sh\n{script}")).unwrap();
    fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).unwrap();
    let boot_efi = dir.join("sluice-boot.efi");
    fs::write(&boot_efi, b"MZ not really an EFI image").unwrap();
    let firmware = Firmware {
        code: dir.join("CODE.fd"),
        vars_template: dir.join("VARS.fd"),
    };
    fs::write(&firmware.code, [0u8; 512]).unwrap();
    fs::write(&firmware.vars_template, [0u8; 512]).unwrap();
    let mut setups = BTreeMap::new();
    setups.insert(
        arch,
        Ok(ArchSetup {
            qemu,
            firmware,
            boot_efi,
            guest_images: Vec::new(),
        }),
    );
    Harness {
        target_dir: dir.join("target"),
        setups,
        echo: false,
    }
}

const BOOT: Scenario = Scenario {
    name: "boot",
    cmdline: "test=boot loglevel=debug",
    qemu_args: &["-device", "edu"],
    time_limit: Duration::from_secs(30),
    ..Scenario::DEFAULT
};

const FAULT: Scenario = Scenario {
    name: "fault",
    cmdline: "test=fault",
    time_limit: Duration::from_secs(30),
    expected: Expected::Fail {
        reason_contains: "cpu exception",
    },
    ..Scenario::DEFAULT
};

/// Finds the ESP directory among the fake QEMU's arguments and shows what
/// the firmware would find there, then prints `body`.
const SHOW_ESP: &str = r#"
for arg in "$@"; do
  case "$arg" in
    *fat:rw:*) esp="${arg#*fat:rw:}" ;;
  esac
done
echo "args: $*"
ls "$esp/EFI/BOOT"
echo "cmdline: $(cat "$esp/EFI/sluice/cmdline.txt")"
"#;

fn reason(report: &ScenarioReport) -> &str {
    match &report.outcome {
        Outcome::Fail { reason } => reason,
        Outcome::Pass => "",
    }
}

#[test]
fn pass_line_and_exit_code_zero_pass() {
    let dir = scratch("pass");
    let script = format!(
        "{SHOW_ESP}\necho 'Sluice 0.1.0 (fake)'\nprintf 'SLUICE-TEST boot PASS\\r\\n'\nexit 1\n"
    );
    let harness = harness(&dir, Arch::X86_64, &script);
    let report = harness.run_scenario(Arch::X86_64, &BOOT);
    assert_eq!(report.outcome, Outcome::Pass, "{:?}", report.tail);
    assert_eq!(report.verdict, Ok(()));
    assert_eq!(report.id, "x86_64-boot");

    let log = fs::read_to_string(dir.join("target/qemu-tests/x86_64-boot.log")).unwrap();
    assert!(log.contains("BOOTX64.EFI"), "{log}");
    assert!(log.contains("cmdline: test=boot loglevel=debug"), "{log}");
    assert!(
        log.contains("-device intel-iommu -device edu -device isa-debug-exit"),
        "{log}"
    );
    assert!(log.contains("SLUICE-TEST boot PASS"), "{log}");
}

#[test]
fn aarch64_status_is_the_code() {
    let dir = scratch("aarch64");
    let script = format!("{SHOW_ESP}\necho 'SLUICE-TEST boot PASS'\nexit 0\n");
    let harness = harness(&dir, Arch::Aarch64, &script);
    let report = harness.run_scenario(Arch::Aarch64, &BOOT);
    assert_eq!(report.outcome, Outcome::Pass, "{:?}", report.tail);
    let log = fs::read_to_string(&report.log_path).unwrap();
    assert!(log.contains("BOOTAA64.EFI"), "{log}");
    assert!(
        log.contains("-semihosting-config enable=on,target=native"),
        "{log}"
    );

    // Exit 2 on aarch64 is Sluice's panic code, even after a PASS line.
    let dir = scratch("aarch64-panic");
    let harness_panic = self::harness(
        &dir,
        Arch::Aarch64,
        "echo 'SLUICE-TEST boot PASS'\nexit 2\n",
    );
    let report = harness_panic.run_scenario(Arch::Aarch64, &BOOT);
    assert!(
        reason(&report).contains("Sluice exit code 2 (panic)"),
        "{}",
        reason(&report)
    );
}

#[test]
fn fail_line_is_detected_and_the_self_test_expectation_holds() {
    let dir = scratch("fault");
    let script = "echo 'Sluice 0.1.0 (fake)'\n\
        echo 'CPU exception: #UD invalid opcode at rip=0x1000'\n\
        echo 'SLUICE-TEST fault FAIL cpu exception: #UD invalid opcode'\n\
        exit 7\n";
    let harness = harness(&dir, Arch::X86_64, script);
    let report = harness.run_scenario(Arch::X86_64, &FAULT);
    assert!(
        reason(&report).starts_with("cpu exception: #UD invalid opcode"),
        "{}",
        reason(&report)
    );
    assert!(reason(&report).contains("Sluice exit code 3 (cpu exception)"));
    assert_eq!(report.verdict, Ok(()), "the expected failure is a pass");

    // The same boot against a scenario expecting PASS is a failure, and the
    // report shows the log.
    let expecting_pass = Scenario {
        expected: Expected::Pass,
        ..FAULT
    };
    let mut out = Vec::new();
    let (summary, _) = harness
        .run(&[(Arch::X86_64, &expecting_pass)], &mut out)
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!((summary.passed, summary.failed), (0, 1));
    assert!(text.contains("FAIL x86_64-fault"), "{text}");
    assert!(
        text.contains("CPU exception: #UD invalid opcode at rip=0x1000"),
        "{text}"
    );
    assert!(text.ends_with("\n0 passed, 1 failed\n"), "{text}");
}

#[test]
fn missing_result_line_and_missing_status_fail() {
    let dir = scratch("silent");
    // Powered off without writing to isa-debug-exit: QEMU status 0.
    let harness = harness(&dir, Arch::X86_64, "echo 'Sluice 0.1.0 (fake)'\nexit 0\n");
    let report = harness.run_scenario(Arch::X86_64, &BOOT);
    let why = reason(&report);
    assert!(why.contains("no `SLUICE-TEST boot` result line"), "{why}");
    assert!(
        why.contains("QEMU exited without a status from Sluice"),
        "{why}"
    );
    assert!(report.verdict.is_err());

    // QEMU failing to start (even status) is not taken for a Sluice code.
    let dir = scratch("qemu-error");
    let harness = self::harness(
        &dir,
        Arch::X86_64,
        "echo 'qemu-system-x86_64: -device edu: no such device' >&2\nexit 2\n",
    );
    let report = harness.run_scenario(Arch::X86_64, &BOOT);
    let why = reason(&report);
    assert!(why.contains("QEMU failed with status 2"), "{why}");
    assert!(
        report
            .tail
            .iter()
            .any(|line| line.contains("no such device")),
        "QEMU's stderr is part of the log: {:?}",
        report.tail
    );

    // QEMU refusing an option exits with 1, which is not Sluice's success.
    let dir = scratch("qemu-refused");
    let harness = self::harness(
        &dir,
        Arch::X86_64,
        "echo \"qemu-system-x86_64: -device foo: 'foo' is not a valid device model name\" >&2\nexit 1\n",
    );
    let report = harness.run_scenario(Arch::X86_64, &BOOT);
    let why = reason(&report);
    assert!(why.contains("QEMU failed to start (status 1)"), "{why}");
    assert!(
        report
            .tail
            .iter()
            .any(|line| line.contains("not a valid device model name")),
        "QEMU's stderr is part of the log: {:?}",
        report.tail
    );
}

#[test]
fn timeout_kills_the_process_group_and_shows_the_last_40_lines() {
    let dir = scratch("timeout");
    let pid_file = dir.join("child.pid");
    // A child that inherits the serial pipe: unless the whole group is
    // killed, the harness would wait for it to close the pipe for 300 s.
    let script = format!(
        "i=1; while [ $i -le 100 ]; do echo \"boot line $i\"; i=$((i+1)); done\n\
         sleep 300 &\necho $! > '{}'\nwait\n",
        pid_file.display()
    );
    let harness = harness(&dir, Arch::X86_64, &script);
    let hanging = Scenario {
        time_limit: Duration::from_secs(2),
        ..BOOT
    };
    let start = Instant::now();
    let mut out = Vec::new();
    let (summary, reports) = harness.run(&[(Arch::X86_64, &hanging)], &mut out).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(took >= Duration::from_secs(2), "took {took:?}");
    assert_eq!((summary.passed, summary.failed), (0, 1));
    let why = reason(&reports[0]);
    assert!(why.contains("timed out after 2 s"), "{why}");
    assert!(why.contains("no result line"), "{why}");

    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("--- last 40 lines of"), "{text}");
    assert!(text.contains("    boot line 61\n"), "{text}");
    assert!(text.contains("    boot line 100\n"), "{text}");
    assert!(!text.contains("boot line 60\n"), "{text}");
    assert!(text.ends_with("\n0 passed, 1 failed\n"), "{text}");

    let child: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Gone, or a zombie waiting for a reaper: either way no longer running.
        let state = fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit(") ").next().map(|rest| rest.chars().next()))
            .flatten();
        if matches!(state, None | Some('Z') | Some('X')) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "child {child} survived: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
