//! Boots scenarios under QEMU with a time limit, keeps their serial logs and
//! judges them against the scenario table.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::arch::Arch;
use crate::guests::GuestImageFile;
use crate::judge::{self, Outcome, RawExit};
use crate::qemu::{BootLock, BootRequest, Firmware};
use crate::scenarios::{Expected, Scenario};

/// How many log lines are shown when a scenario does not meet its expectation.
pub const TAIL_LINES: usize = 40;

/// What one bounded run of a process produced.
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub raw: RawExit,
    /// Everything the process wrote on stdout (the serial console).
    pub serial: String,
    /// Everything the process wrote on stderr (QEMU's own messages).
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `command` in its own process group with stdin closed, stdout saved
/// to `log_path` (and echoed to our stdout when `echo`), and kills the whole
/// group when `limit` is reached. QEMU's stderr is appended to the log.
pub fn run_with_limit(
    mut command: Command,
    limit: Duration,
    log_path: &Path,
    echo: bool,
) -> io::Result<RunOutput> {
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir)?;
    }
    let log = Arc::new(Mutex::new(fs::File::create(log_path)?));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_parent(&mut command);
    let start = Instant::now();
    let mut child = command.spawn()?;
    let group = ProcessGroup(child.id());

    let stdout = child.stdout.take().map(|pipe| {
        let log = Arc::clone(&log);
        thread::spawn(move || copy_serial(pipe, &log, echo))
    });
    let stderr = child
        .stderr
        .take()
        .map(|mut pipe| thread::spawn(move || read_all(&mut pipe)));

    let waited = wait_with_limit(&mut child, &group, limit);
    if waited.is_err() {
        group.kill();
    }
    let raw = waited?;
    let elapsed = start.elapsed();
    // Anything the process left behind (a fake QEMU's children, say) would
    // keep the pipes open; it goes with the group.
    group.kill();

    let serial = stdout.map(join_reader).unwrap_or_default();
    let stderr = stderr.map(join_reader).unwrap_or_default();
    let mut file = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !stderr.is_empty() {
        write!(file, "\n--- QEMU stderr ---\n{stderr}")?;
    }
    file.flush()?;
    Ok(RunOutput {
        raw,
        serial,
        stderr,
        elapsed,
    })
}

/// QEMU runs in a process group of its own, out of reach of the terminal's
/// Ctrl-C: have the kernel kill it when we die, however we die.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2), which is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// The process group of a child started with `process_group(0)`: its id is the child's pid.
struct ProcessGroup(u32);

impl ProcessGroup {
    fn kill(&self) {
        let Ok(group) = libc::pid_t::try_from(self.0) else {
            return;
        };
        // SAFETY: killpg only sends a signal; `group` is the group we created
        // for our own child, and ESRCH (the group is already gone) is fine.
        unsafe {
            libc::killpg(group, libc::SIGKILL);
        }
    }
}

fn wait_with_limit(
    child: &mut Child,
    group: &ProcessGroup,
    limit: Duration,
) -> io::Result<RawExit> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(RawExit::from_status(status));
        }
        if Instant::now() >= deadline {
            group.kill();
            child.wait()?;
            return Ok(RawExit::TimedOut(limit));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn copy_serial(mut pipe: impl Read, log: &Mutex<fs::File>, echo: bool) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                all.extend_from_slice(&buf[..n]);
                let mut file = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // A log write error must not stop the pipe from draining.
                let _ = file.write_all(&buf[..n]);
                if echo {
                    let mut out = io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn read_all(pipe: &mut impl Read) -> String {
    let mut all = Vec::new();
    let _ = pipe.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

fn join_reader(handle: thread::JoinHandle<String>) -> String {
    handle.join().unwrap_or_default()
}

/// What the harness needs to boot one architecture.
#[derive(Clone, Debug)]
pub struct ArchSetup {
    /// The QEMU binary (a fake one in the harness's own tests).
    pub qemu: PathBuf,
    pub firmware: Firmware,
    /// The built `sluice-boot.efi`.
    pub boot_efi: PathBuf,
    /// Guest images every boot of this architecture gets on its ESP.
    pub guest_images: Vec<GuestImageFile>,
}

/// The scenario runner.
#[derive(Clone, Debug)]
pub struct Harness {
    /// Logs go to `<target_dir>/qemu-tests/`, ESPs to `<target_dir>/esp/`.
    pub target_dir: PathBuf,
    /// Per architecture: its setup, or why it could not be set up (a missing
    /// prerequisite, a failed build); its scenarios then fail with that reason.
    pub setups: BTreeMap<Arch, Result<ArchSetup, String>>,
    /// Echo the serial console live while scenarios run.
    pub echo: bool,
}

/// The result of one scenario on one architecture.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    pub id: String,
    pub outcome: Outcome,
    /// `Ok` when the outcome meets the scenario's expectation.
    pub verdict: Result<(), String>,
    pub elapsed: Duration,
    pub log_path: PathBuf,
    /// The last lines of the log (console and QEMU's stderr), printable.
    pub tail: Vec<String>,
}

/// Scenarios selected by `filter` (a substring of `<arch>-<name>`) on `arches`,
/// architecture by architecture, in table order.
pub fn select(
    table: &'static [Scenario],
    arches: &[Arch],
    filter: Option<&str>,
) -> Vec<(Arch, &'static Scenario)> {
    let mut selected = Vec::new();
    for &arch in arches {
        for scenario in table.iter().filter(|s| s.runs_on(arch)) {
            if filter.is_none_or(|f| scenario.id(arch).contains(f)) {
                selected.push((arch, scenario));
            }
        }
    }
    selected
}

/// The counts the summary line reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

impl Summary {
    /// Exactly `N passed, N failed`.
    pub fn line(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

impl Harness {
    /// Where the serial log of `<arch>-<name>` is kept.
    pub fn log_path(&self, arch: Arch, scenario: &Scenario) -> PathBuf {
        self.target_dir
            .join("qemu-tests")
            .join(format!("{}.log", scenario.id(arch)))
    }

    /// Boots one scenario and judges it.
    pub fn run_scenario(&self, arch: Arch, scenario: &Scenario) -> ScenarioReport {
        let id = scenario.id(arch);
        let log_path = self.log_path(arch, scenario);
        let failed = |reason: String| ScenarioReport {
            id: id.clone(),
            outcome: Outcome::Fail {
                reason: reason.clone(),
            },
            verdict: Err(reason),
            elapsed: Duration::ZERO,
            log_path: log_path.clone(),
            tail: Vec::new(),
        };
        let setup = match self.setups.get(&arch) {
            Some(Ok(setup)) => setup,
            Some(Err(reason)) => return failed(format!("not run: {reason}")),
            None => return failed(format!("not run: no {arch} setup")),
        };
        let _lock = match BootLock::acquire(&self.target_dir, arch, scenario.name) {
            Ok(lock) => lock,
            Err(err) => return failed(format!("cannot lock the ESP of {id}: {err}")),
        };
        let mut request = BootRequest::for_scenario(arch, scenario);
        request.guest_images = setup.guest_images.clone();
        let config = match request.prepare(
            &self.target_dir,
            &setup.boot_efi,
            &setup.firmware,
            &setup.qemu,
        ) {
            Ok(config) => config,
            Err(reason) => return failed(reason),
        };
        let output =
            match run_with_limit(config.command(), scenario.time_limit, &log_path, self.echo) {
                Ok(output) => output,
                Err(err) => {
                    return failed(format!("cannot run {}: {err}", setup.qemu.display()));
                }
            };
        let exit = judge::decode_exit_with_stderr(arch, output.raw, &output.stderr);
        let outcome = judge::judge(scenario.test_name(), &output.serial, exit);
        let verdict = judge::check_expected(scenario.expected, &outcome);
        let mut log = output.serial;
        if !output.stderr.is_empty() {
            log.push_str("\n--- QEMU stderr ---\n");
            log.push_str(&output.stderr);
        }
        ScenarioReport {
            id,
            outcome,
            verdict,
            elapsed: output.elapsed,
            log_path,
            tail: judge::tail(&log, TAIL_LINES),
        }
    }

    /// Runs `selected` one after the other, reports each on `out` and ends
    /// with the summary line.
    pub fn run(
        &self,
        selected: &[(Arch, &Scenario)],
        out: &mut dyn Write,
    ) -> io::Result<(Summary, Vec<ScenarioReport>)> {
        let mut summary = Summary::default();
        let mut reports = Vec::new();
        for (arch, scenario) in selected {
            writeln!(out, "qemu-test {} ...", scenario.id(*arch))?;
            out.flush()?;
            let report = self.run_scenario(*arch, scenario);
            write_report(out, scenario, &report)?;
            match report.verdict {
                Ok(()) => summary.passed += 1,
                Err(_) => summary.failed += 1,
            }
            reports.push(report);
        }
        writeln!(out, "{}", summary.line())?;
        Ok((summary, reports))
    }
}

fn write_report(
    out: &mut dyn Write,
    scenario: &Scenario,
    report: &ScenarioReport,
) -> io::Result<()> {
    let secs = report.elapsed.as_secs_f64();
    match (&report.verdict, &report.outcome, scenario.expected) {
        (Ok(()), Outcome::Pass, _) => writeln!(out, "PASS {} ({secs:.1} s)", report.id),
        (Ok(()), Outcome::Fail { reason }, Expected::Fail { .. }) => writeln!(
            out,
            "PASS {} ({secs:.1} s): failed as expected: {reason}",
            report.id
        ),
        (Ok(()), Outcome::Fail { reason }, Expected::Pass) => {
            // check_expected never accepts this; report it rather than hide it.
            writeln!(out, "FAIL {} ({secs:.1} s): {reason}", report.id)
        }
        (Err(reason), _, _) => {
            writeln!(out, "FAIL {} ({secs:.1} s): {reason}", report.id)?;
            if !report.tail.is_empty() {
                writeln!(
                    out,
                    "--- last {} lines of {} ---",
                    report.tail.len(),
                    report.log_path.display()
                )?;
                for line in &report.tail {
                    writeln!(out, "    {line}")?;
                }
                writeln!(out, "--- end of {} ---", report.id)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::SCENARIOS;

    #[test]
    fn selects_by_arch_and_filter() {
        let all = select(SCENARIOS, &Arch::ALL, None);
        let runs: usize = SCENARIOS.iter().map(|s| s.arches.len()).sum();
        assert_eq!(all.len(), runs);
        assert_eq!(all[0].0, Arch::X86_64);
        assert!(all.iter().all(|(arch, s)| s.runs_on(*arch)));
        let aarch64 = select(SCENARIOS, &[Arch::Aarch64], None);
        assert!(aarch64.iter().all(|(arch, _)| *arch == Arch::Aarch64));
        assert!(aarch64.iter().all(|(_, s)| s.name != "svm"));
        let ids: Vec<String> = select(SCENARIOS, &Arch::ALL, Some("aarch64-fa"))
            .iter()
            .map(|(arch, s)| s.id(*arch))
            .collect();
        assert_eq!(ids, vec!["aarch64-fault"]);
        assert!(select(SCENARIOS, &[Arch::X86_64], Some("aarch64")).is_empty());
        let boots = select(SCENARIOS, &Arch::ALL, Some("boot"));
        assert!(boots.iter().all(|(_, s)| s.name == "boot"));
        assert_eq!(boots.len(), 2);
    }

    #[test]
    fn summary_line_is_exact() {
        let summary = Summary {
            passed: 3,
            failed: 1,
        };
        assert_eq!(summary.line(), "3 passed, 1 failed");
    }

    #[test]
    fn missing_setup_fails_every_scenario_with_the_reason() {
        let mut setups = BTreeMap::new();
        setups.insert(
            Arch::Aarch64,
            Err(String::from("qemu-system-aarch64 is not on PATH")),
        );
        let harness = Harness {
            target_dir: std::env::temp_dir().join("sluice-harness-unit"),
            setups,
            echo: false,
        };
        let mut out = Vec::new();
        let (summary, reports) = harness
            .run(&select(SCENARIOS, &Arch::ALL, None), &mut out)
            .unwrap();
        assert_eq!(summary.passed, 0);
        assert_eq!(summary.failed, reports.len());
        assert_eq!(
            reports.len(),
            SCENARIOS.iter().map(|s| s.arches.len()).sum::<usize>()
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("not run: qemu-system-aarch64 is not on PATH"),
            "{text}"
        );
        assert!(text.contains("not run: no x86_64 setup"), "{text}");
        assert!(text.ends_with(&format!("0 passed, {} failed\n", reports.len())));
    }
}
