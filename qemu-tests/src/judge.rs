//! Turning a serial log and QEMU's exit status into a verdict.
//!
//! Sluice's side of the contract: it prints `SLUICE-TEST <name> PASS` or
//! `SLUICE-TEST <name> FAIL <reason>` and exits with 0 (success), 1 (test
//! failure), 2 (panic) or 3 (CPU exception). On x86_64 it writes the code to
//! `isa-debug-exit`, so QEMU exits with `(code << 1) | 1`; on aarch64 it uses
//! semihosting `SYS_EXIT`, so QEMU's status is the code itself.

use std::fmt;
use std::time::Duration;

use crate::arch::Arch;
use crate::scenarios::Expected;

/// The marker that starts a result line.
pub const RESULT_MARKER: &str = "SLUICE-TEST";

/// What one `SLUICE-TEST` line said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail { reason: String },
}

/// One parsed `SLUICE-TEST <name> PASS|FAIL <reason>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultLine {
    pub test: String,
    pub verdict: Verdict,
}

/// Parses one serial line. The marker may follow console noise (escape
/// sequences, a timestamp) but the rest of the line must be well formed.
pub fn parse_result_line(line: &str) -> Option<ResultLine> {
    let start = line.find(RESULT_MARKER)?;
    let rest = line[start + RESULT_MARKER.len()..].strip_prefix(' ')?;
    let rest = rest.trim_end_matches(['\r', '\n']);
    let (test, rest) = rest.split_once(' ')?;
    if test.is_empty() {
        return None;
    }
    let verdict = if rest.trim_end() == "PASS" {
        Verdict::Pass
    } else if rest == "FAIL" {
        Verdict::Fail {
            reason: String::from("(no reason given)"),
        }
    } else {
        let reason = rest.strip_prefix("FAIL ")?.trim();
        Verdict::Fail {
            reason: if reason.is_empty() {
                String::from("(no reason given)")
            } else {
                reason.to_owned()
            },
        }
    };
    Some(ResultLine {
        test: test.to_owned(),
        verdict,
    })
}

/// Every result line of a serial log, in order.
pub fn result_lines(log: &str) -> Vec<ResultLine> {
    log.lines().filter_map(parse_result_line).collect()
}

/// How the QEMU process ended, before any decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawExit {
    /// QEMU exited with this status.
    Status(i32),
    /// QEMU was ended by this signal (not by the harness).
    Signal(i32),
    /// The harness killed QEMU when the time limit was reached.
    TimedOut(Duration),
}

impl RawExit {
    /// How a process that was not killed by the harness ended.
    pub fn from_status(status: std::process::ExitStatus) -> RawExit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => RawExit::Status(code),
            (None, Some(signal)) => RawExit::Signal(signal),
            (None, None) => RawExit::Status(-1),
        }
    }
}

/// Sluice's own exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SluiceCode {
    Success,
    TestFailure,
    Panic,
    CpuException,
    /// A value outside the contract.
    Unknown(i32),
}

impl SluiceCode {
    pub fn from_code(code: i32) -> SluiceCode {
        match code {
            0 => SluiceCode::Success,
            1 => SluiceCode::TestFailure,
            2 => SluiceCode::Panic,
            3 => SluiceCode::CpuException,
            other => SluiceCode::Unknown(other),
        }
    }

    pub fn code(self) -> i32 {
        match self {
            SluiceCode::Success => 0,
            SluiceCode::TestFailure => 1,
            SluiceCode::Panic => 2,
            SluiceCode::CpuException => 3,
            SluiceCode::Unknown(code) => code,
        }
    }

    fn meaning(self) -> &'static str {
        match self {
            SluiceCode::Success => "success",
            SluiceCode::TestFailure => "test failure",
            SluiceCode::Panic => "panic",
            SluiceCode::CpuException => "cpu exception",
            SluiceCode::Unknown(_) => "not a code Sluice defines",
        }
    }
}

/// QEMU's exit, decoded according to the architecture's exit device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SluiceExit {
    /// Sluice reported this code.
    Code(SluiceCode),
    /// x86_64 status 0: the guest powered off or QEMU quit, Sluice never wrote
    /// to `isa-debug-exit`.
    NoStatus,
    /// x86_64 even non-zero status: QEMU itself failed, not Sluice.
    QemuFailed(i32),
    /// QEMU refused its command line and exited with 1 (which on x86_64
    /// would otherwise read as Sluice's success); the message is QEMU's.
    QemuStartFailed,
    /// QEMU was ended by a signal it did not expect.
    Killed(i32),
    /// The harness killed QEMU at the time limit.
    TimedOut(Duration),
}

/// Decodes QEMU's exit for `arch`, telling QEMU's own start-up failure
/// (status 1 with a complaint about an option on stderr) from Sluice's status.
pub fn decode_exit_with_stderr(arch: Arch, raw: RawExit, stderr: &str) -> SluiceExit {
    if raw == RawExit::Status(1) && qemu_start_error(stderr).is_some() {
        return SluiceExit::QemuStartFailed;
    }
    decode_exit(arch, raw)
}

/// QEMU's complaint about one of its options, made at start-up, e.g.
/// `qemu-system-x86_64: -device foo: 'foo' is not a valid device model name`.
/// Run-time messages (`qemu-system-x86_64: vtd_...: ...`) do not count.
pub fn qemu_start_error(stderr: &str) -> Option<&str> {
    stderr.lines().find(|line| {
        line.starts_with("qemu-system-")
            && !line.contains("warning:")
            && line
                .split_once(": ")
                .is_some_and(|(_, rest)| rest.starts_with('-'))
    })
}

/// Decodes QEMU's exit for `arch`.
pub fn decode_exit(arch: Arch, raw: RawExit) -> SluiceExit {
    match raw {
        RawExit::Signal(signal) => SluiceExit::Killed(signal),
        RawExit::TimedOut(limit) => SluiceExit::TimedOut(limit),
        RawExit::Status(status) => match arch {
            Arch::X86_64 if status == 0 => SluiceExit::NoStatus,
            Arch::X86_64 if status & 1 == 1 => SluiceExit::Code(SluiceCode::from_code(status >> 1)),
            Arch::X86_64 => SluiceExit::QemuFailed(status),
            Arch::Aarch64 => SluiceExit::Code(SluiceCode::from_code(status)),
        },
    }
}

impl SluiceExit {
    /// The exit status `cargo xtask run` ends with: Sluice's code when it gave
    /// one, otherwise 125 ("QEMU ended without Sluice's verdict").
    pub fn process_status(self) -> i32 {
        match self {
            SluiceExit::Code(code) => code.code().clamp(0, 255),
            _ => NO_SLUICE_STATUS,
        }
    }
}

/// The exit status of `cargo xtask run` when Sluice never reported one.
pub const NO_SLUICE_STATUS: i32 = 125;

impl fmt::Display for SluiceExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SluiceExit::Code(code) => {
                write!(f, "Sluice exit code {} ({})", code.code(), code.meaning())
            }
            SluiceExit::NoStatus => f.write_str("QEMU exited without a status from Sluice"),
            SluiceExit::QemuFailed(status) => write!(
                f,
                "QEMU failed with status {status}, which is not a Sluice status"
            ),
            SluiceExit::QemuStartFailed => {
                f.write_str("QEMU failed to start (status 1), see its message")
            }
            SluiceExit::Killed(signal) => write!(f, "QEMU was killed by signal {signal}"),
            SluiceExit::TimedOut(limit) => write!(
                f,
                "timed out after {} s; QEMU was killed",
                limit.as_secs_f64()
            ),
        }
    }
}

/// The harness's verdict on one boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail { reason: String },
}

/// Judges one boot of test `test`: PASS needs a PASS line for it, no FAIL
/// line for it, and Sluice exit code 0. Everything else is a failure whose
/// reason names what was seen.
pub fn judge(test: &str, log: &str, exit: SluiceExit) -> Outcome {
    let lines: Vec<ResultLine> = result_lines(log)
        .into_iter()
        .filter(|line| line.test == test)
        .collect();
    let first_failure = lines.iter().find_map(|line| match &line.verdict {
        Verdict::Fail { reason } => Some(reason.as_str()),
        Verdict::Pass => None,
    });
    let passed = lines.iter().any(|line| line.verdict == Verdict::Pass);

    if let Some(reason) = first_failure {
        return Outcome::Fail {
            reason: format!("{reason} [{exit}]"),
        };
    }
    if let SluiceExit::TimedOut(_) = exit {
        let seen = if passed {
            "after its PASS line"
        } else {
            "with no result line"
        };
        return Outcome::Fail {
            reason: format!("{exit} {seen}"),
        };
    }
    match (passed, exit) {
        (true, SluiceExit::Code(SluiceCode::Success)) => Outcome::Pass,
        (true, exit) => Outcome::Fail {
            reason: format!("printed PASS but {exit}"),
        },
        (false, exit) => Outcome::Fail {
            reason: format!("no `{RESULT_MARKER} {test}` result line; {exit}"),
        },
    }
}

/// Compares the outcome with the scenario's expectation; `Err` says why not.
pub fn check_expected(expected: Expected, outcome: &Outcome) -> Result<(), String> {
    match (expected, outcome) {
        (Expected::Pass, Outcome::Pass) => Ok(()),
        (Expected::Pass, Outcome::Fail { reason }) => Err(reason.clone()),
        (Expected::Fail { reason_contains }, Outcome::Pass) => Err(format!(
            "expected a failure containing `{reason_contains}`, but it passed"
        )),
        (Expected::Fail { reason_contains }, Outcome::Fail { reason }) => {
            if reason.contains(reason_contains) {
                Ok(())
            } else {
                Err(format!(
                    "expected a failure containing `{reason_contains}`, got: {reason}"
                ))
            }
        }
    }
}

/// Removes ANSI escape sequences and carriage returns, for printing a log.
pub fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters... final byte in 0x40..=0x7e.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The last `count` lines of a log, made printable.
pub fn tail(log: &str, count: usize) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].iter().map(|line| printable(line)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASS_LOG: &str = "\u{1b}[2J\u{1b}[01;01HBdsDxe: starting Boot0001\r\n\
        Sluice 0.1.0 starting on x86_64\r\n\
        SLUICE-TEST boot PASS\r\n";

    const FAULT_LOG: &str = "Sluice 0.1.0 starting\r\n\
        CPU exception: #PF page fault at 0xdead0000 (write, not present)\r\n\
        rax=0000000000000000 rbx=0000000000000001\r\n\
        SLUICE-TEST fault FAIL cpu exception: #PF page fault at 0xdead0000\r\n";

    fn x86(code: i32) -> SluiceExit {
        decode_exit(Arch::X86_64, RawExit::Status((code << 1) | 1))
    }

    #[test]
    fn parses_pass_and_fail_lines() {
        assert_eq!(
            parse_result_line("SLUICE-TEST boot PASS\r"),
            Some(ResultLine {
                test: "boot".into(),
                verdict: Verdict::Pass
            })
        );
        assert_eq!(
            parse_result_line("\u{1b}[0mSLUICE-TEST dma FAIL edu: DMA fault reason 0x5 "),
            Some(ResultLine {
                test: "dma".into(),
                verdict: Verdict::Fail {
                    reason: "edu: DMA fault reason 0x5".into()
                }
            })
        );
        assert_eq!(
            parse_result_line("SLUICE-TEST x FAIL").map(|line| line.verdict),
            Some(Verdict::Fail {
                reason: "(no reason given)".into()
            })
        );
    }

    #[test]
    fn rejects_malformed_result_lines() {
        for line in [
            "Sluice starting",
            "SLUICE-TEST",
            "SLUICE-TEST boot",
            "SLUICE-TEST boot PASSED",
            "SLUICE-TEST boot OK",
            "SLUICE-TESTboot PASS",
            "SLUICE-TEST  PASS",
            "SLUICE-TEST boot FAILURE x",
        ] {
            assert_eq!(parse_result_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn decodes_x86_isa_debug_exit() {
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(1)),
            SluiceExit::Code(SluiceCode::Success)
        );
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(3)),
            SluiceExit::Code(SluiceCode::TestFailure)
        );
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(5)),
            SluiceExit::Code(SluiceCode::Panic)
        );
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(7)),
            SluiceExit::Code(SluiceCode::CpuException)
        );
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(0)),
            SluiceExit::NoStatus
        );
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(2)),
            SluiceExit::QemuFailed(2)
        );
        assert_eq!(
            decode_exit(Arch::X86_64, RawExit::Status(0x21)),
            SluiceExit::Code(SluiceCode::Unknown(0x10))
        );
        assert_eq!(
            NO_SLUICE_STATUS,
            decode_exit(Arch::X86_64, RawExit::Status(0)).process_status()
        );
        assert_eq!(x86(3).process_status(), 3);
    }

    #[test]
    fn tells_qemu_start_failures_from_sluice_status() {
        let refused = "qemu-system-x86_64: -device foo: 'foo' is not a valid device model name\n";
        assert_eq!(
            decode_exit_with_stderr(Arch::X86_64, RawExit::Status(1), refused),
            SluiceExit::QemuStartFailed
        );
        assert_eq!(
            decode_exit_with_stderr(Arch::Aarch64, RawExit::Status(1), refused),
            SluiceExit::QemuStartFailed
        );
        let runtime = "qemu-system-x86_64: vtd_iova_to_slpte: detected slpte permission error\n\
                       qemu-system-x86_64: warning: -device edu: something\n";
        assert_eq!(qemu_start_error(runtime), None);
        assert_eq!(
            decode_exit_with_stderr(Arch::X86_64, RawExit::Status(1), runtime),
            SluiceExit::Code(SluiceCode::Success)
        );
        assert_eq!(
            decode_exit_with_stderr(Arch::X86_64, RawExit::Status(3), refused),
            SluiceExit::Code(SluiceCode::TestFailure)
        );
        assert_eq!(
            SluiceExit::QemuStartFailed.process_status(),
            NO_SLUICE_STATUS
        );
    }

    #[test]
    fn decodes_aarch64_semihosting_exit() {
        for code in 0..=3 {
            assert_eq!(
                decode_exit(Arch::Aarch64, RawExit::Status(code)),
                SluiceExit::Code(SluiceCode::from_code(code))
            );
        }
        assert_eq!(
            decode_exit(Arch::Aarch64, RawExit::Signal(9)),
            SluiceExit::Killed(9)
        );
        let limit = Duration::from_secs(5);
        assert_eq!(
            decode_exit(Arch::Aarch64, RawExit::TimedOut(limit)),
            SluiceExit::TimedOut(limit)
        );
    }

    #[test]
    fn pass_needs_the_line_and_code_zero() {
        assert_eq!(judge("boot", PASS_LOG, x86(0)), Outcome::Pass);

        let Outcome::Fail { reason } = judge("boot", PASS_LOG, x86(2)) else {
            panic!("a PASS line with a panic code must fail");
        };
        assert!(reason.contains("printed PASS"), "{reason}");
        assert!(reason.contains("Sluice exit code 2 (panic)"), "{reason}");

        let Outcome::Fail { reason } = judge("boot", "Sluice 0.1.0\r\n", x86(0)) else {
            panic!("code 0 without a PASS line must fail");
        };
        assert!(
            reason.contains("no `SLUICE-TEST boot` result line"),
            "{reason}"
        );

        let Outcome::Fail { reason } = judge("other", PASS_LOG, x86(0)) else {
            panic!("a PASS line for another test does not count");
        };
        assert!(reason.contains("no `SLUICE-TEST other`"), "{reason}");
    }

    #[test]
    fn fail_line_wins_and_keeps_the_reason() {
        let Outcome::Fail { reason } = judge("fault", FAULT_LOG, x86(3)) else {
            panic!("a FAIL line must fail");
        };
        assert!(
            reason.starts_with("cpu exception: #PF page fault at 0xdead0000"),
            "{reason}"
        );
        assert!(
            reason.contains("Sluice exit code 3 (cpu exception)"),
            "{reason}"
        );

        let both = format!("{PASS_LOG}SLUICE-TEST boot FAIL late teardown error\r\n");
        let Outcome::Fail { reason } = judge("boot", &both, x86(0)) else {
            panic!("a FAIL line after PASS must fail");
        };
        assert!(reason.contains("late teardown error"), "{reason}");
    }

    #[test]
    fn no_status_and_timeout_are_failures() {
        let Outcome::Fail { reason } = judge(
            "boot",
            PASS_LOG,
            decode_exit(Arch::X86_64, RawExit::Status(0)),
        ) else {
            panic!("no exit status must fail");
        };
        assert!(
            reason.contains("QEMU exited without a status from Sluice"),
            "{reason}"
        );

        let exit = decode_exit(Arch::Aarch64, RawExit::TimedOut(Duration::from_secs(7)));
        let Outcome::Fail { reason } = judge("boot", "Sluice\r\n", exit) else {
            panic!("a timeout must fail");
        };
        assert!(reason.contains("timed out after 7 s"), "{reason}");
        assert!(reason.contains("no result line"), "{reason}");
    }

    #[test]
    fn compares_with_the_expectation() {
        let cpu = Expected::Fail {
            reason_contains: "cpu exception",
        };
        let fault = judge("fault", FAULT_LOG, x86(3));
        assert_eq!(check_expected(cpu, &fault), Ok(()));
        assert!(check_expected(Expected::Pass, &fault).is_err());

        let pass = judge("boot", PASS_LOG, x86(0));
        assert_eq!(check_expected(Expected::Pass, &pass), Ok(()));
        assert!(
            check_expected(cpu, &pass)
                .unwrap_err()
                .contains("but it passed")
        );

        let other = Outcome::Fail {
            reason: "panic: oops".into(),
        };
        assert!(
            check_expected(cpu, &other)
                .unwrap_err()
                .contains("panic: oops")
        );
    }

    #[test]
    fn makes_logs_printable() {
        assert_eq!(
            printable("\u{1b}[1m\u{1b}[33m\u{1b}[40mShell> \u{1b}[0m\r"),
            "Shell> "
        );
        let log = (1..=50)
            .map(|n| format!("line {n}\r\n"))
            .collect::<String>();
        let last = tail(&log, 40);
        assert_eq!(last.len(), 40);
        assert_eq!(last[0], "line 11");
        assert_eq!(last[39], "line 50");
        assert_eq!(tail("one\n", 40), vec!["one".to_owned()]);
    }
}
