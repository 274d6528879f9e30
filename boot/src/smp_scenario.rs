//! The `smp` scenario: every processor the MADT lists comes up. Each one
//! reports who it is (index, APIC ID or MPIDR, and what the per-CPU lookup
//! says), takes a spin lock shared with the others to bump a counter, and on
//! x86_64 enables SVM with its own host save area; then it serves jobs, and
//! the boot CPU runs closures on every CPU at once to check that they see
//! each other's writes under the lock.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use log::info;
use sluice_kernel::clock::KernelClock;
use sluice_kernel::platform::Platform;
use sluice_kernel::smp::{self, CpuInfo, SmpError};
use spin::Mutex;

/// What each CPU reports from its entry function.
#[derive(Debug, Clone)]
struct Arrival {
    info: CpuInfo,
    arg: usize,
    /// The hardware ID the CPU reads from its own interrupt controller.
    own_hw_id: u64,
    /// What `smp::current()` says on that CPU.
    current: Option<usize>,
    /// x86_64: `svm::detect` and enabling SVM on this CPU, as text.
    svm: Result<String, String>,
}

/// Where a job ran: the CPU it was given, and what `smp::current` said.
type JobSite = (usize, Option<usize>);

static ARRIVALS: Mutex<Vec<Arrival>> = Mutex::new(Vec::new());
/// The spin-locked counter every CPU bumps.
static COUNTER: Mutex<u64> = Mutex::new(0);

const ARG: usize = 0x5151_1ce0;
const ARRIVAL_TIMEOUT_NS: u64 = 5_000_000_000;
const JOB_TIMEOUT_NS: u64 = 5_000_000_000;
/// Increments per CPU in the contention round.
const ROUNDS: u64 = 20_000;

#[cfg(target_arch = "x86_64")]
fn svm_on_this_cpu() -> Result<String, String> {
    use sluice_kernel::arch::smp::enable_svm;
    use sluice_kernel::arch::svm;
    let features = enable_svm().map_err(|e| format!("{e}"))?;
    // EFER.SVME (APM vol. 2 §15.4) must now be set on this CPU.
    if svm::read_msr(0xc000_0080) & (1 << 12) == 0 {
        return Err(String::from("EFER.SVME is clear after enabling SVM"));
    }
    let again = svm::detect().map_err(|e| format!("svm::detect after enabling: {e}"))?;
    Ok(format!(
        "SVM revision {} with {} ASIDs, nested paging {}",
        again.revision, features.asids, again.nested_paging
    ))
}

#[cfg(target_arch = "aarch64")]
fn svm_on_this_cpu() -> Result<String, String> {
    Ok(format!(
        "running at EL{}",
        sluice_kernel::arch::current_el()
    ))
}

fn ap_entry(info: CpuInfo, arg: usize) -> ! {
    let own_hw_id = sluice_kernel::arch::smp::this_cpu_hw_id();
    let current = smp::current().map(|c| c.index);
    *COUNTER.lock() += 1;
    let svm = svm_on_this_cpu();
    info!(
        "smp: CPU {} here ({} {:#x}): {}",
        info.index,
        sluice_kernel::arch::smp::HW_ID_NAME,
        own_hw_id,
        match &svm {
            Ok(s) | Err(s) => s.as_str(),
        }
    );
    ARRIVALS.lock().push(Arrival {
        info,
        arg,
        own_hw_id,
        current,
        svm,
    });
    smp::serve_mailbox(info)
}

fn check(condition: bool, failure: impl FnOnce() -> String) -> Result<(), String> {
    if condition { Ok(()) } else { Err(failure()) }
}

pub fn run(platform: &Platform) -> Result<(), String> {
    let cpus = smp::init(platform).map_err(|e| format!("{e}"))?;
    check(cpus.len() >= 2, || {
        format!(
            "the MADT lists {} enabled CPU; this scenario needs at least two (QEMU -smp 2)",
            cpus.len()
        )
    })?;
    check(smp::current().map(|c| c.index) == Some(0), || {
        String::from("the boot CPU does not see itself as CPU 0")
    })?;
    check(
        sluice_kernel::arch::smp::this_cpu_hw_id() == cpus[0].hw_id,
        || String::from("CPU 0's hardware ID is not the running CPU's"),
    )?;

    // Wrong requests are refused before anything happens.
    check(
        matches!(
            smp::start(0, ap_entry, ARG),
            Err(SmpError::CurrentCpu { index: 0 })
        ),
        || String::from("starting the boot CPU was not refused"),
    )?;
    check(
        matches!(
            smp::start(cpus.len(), ap_entry, ARG),
            Err(SmpError::NoSuchCpu { .. })
        ),
        || String::from("starting a CPU beyond the MADT's was not refused"),
    )?;

    for cpu in &cpus[1..] {
        smp::start(cpu.index, ap_entry, ARG).map_err(|e| format!("{e}"))?;
    }
    let expected = cpus.len() - 1;
    sluice_hal::poll_until(&KernelClock, ARRIVAL_TIMEOUT_NS, || {
        (ARRIVALS.lock().len() == expected).then_some(())
    })
    .map_err(|_| {
        format!(
            "{} of {expected} CPUs reported within {} s",
            ARRIVALS.lock().len(),
            ARRIVAL_TIMEOUT_NS / 1_000_000_000
        )
    })?;
    check(
        matches!(
            smp::start(1, ap_entry, ARG),
            Err(SmpError::AlreadyStarted { index: 1 })
        ),
        || String::from("starting CPU 1 twice was not refused"),
    )?;

    let mut arrivals = ARRIVALS.lock().clone();
    arrivals.sort_by_key(|a| a.info.index);
    for (a, cpu) in arrivals.iter().zip(&cpus[1..]) {
        check(a.info == *cpu, || {
            format!("CPU {} arrived as {:?}", cpu.index, a.info)
        })?;
        check(a.arg == ARG, || {
            format!("CPU {} got argument {:#x}", cpu.index, a.arg)
        })?;
        check(a.own_hw_id == cpu.hw_id, || {
            format!(
                "CPU {} reads hardware ID {:#x}, the MADT says {:#x}: the wrong CPU started",
                cpu.index, a.own_hw_id, cpu.hw_id
            )
        })?;
        check(a.current == Some(cpu.index), || {
            format!("CPU {} sees itself as {:?}", cpu.index, a.current)
        })?;
        a.svm
            .as_ref()
            .map_err(|e| format!("CPU {}: {e}", cpu.index))?;
        check(smp::is_online(cpu.index), || {
            format!("CPU {} is not marked online", cpu.index)
        })?;
    }
    let counted = *COUNTER.lock();
    check(counted == expected as u64, || {
        format!("the shared counter is {counted}, expected {expected}")
    })?;
    info!("smp: all {expected} other CPUs arrived and counted under the lock");

    // Every CPU at once (the boot CPU too) hammers the same lock.
    let before = *COUNTER.lock();
    // (CPU a job ran for, CPU it found itself on)
    let seen: Arc<Mutex<Vec<JobSite>>> = Arc::default();
    let mut jobs = Vec::new();
    for cpu in &cpus[1..] {
        let seen = seen.clone();
        let job = smp::run_on(cpu.index, move |info| {
            for _ in 0..ROUNDS {
                *COUNTER.lock() += 1;
            }
            seen.lock()
                .push((info.index, smp::current().map(|c| c.index)));
        })
        .map_err(|e| format!("{e}"))?;
        jobs.push(job);
    }
    for _ in 0..ROUNDS {
        *COUNTER.lock() += 1;
    }
    for job in &jobs {
        job.wait(JOB_TIMEOUT_NS).map_err(|e| format!("{e}"))?;
    }
    let total = *COUNTER.lock() - before;
    check(total == ROUNDS * cpus.len() as u64, || {
        format!(
            "{} CPUs incremented {ROUNDS} times each under the lock, the counter moved by {total}",
            cpus.len()
        )
    })?;
    let mut seen = seen.lock().clone();
    seen.sort();
    let wanted: Vec<JobSite> = cpus[1..].iter().map(|c| (c.index, Some(c.index))).collect();
    check(seen == wanted, || {
        format!("jobs ran as {seen:?}, expected {wanted:?}")
    })?;
    check(
        matches!(
            smp::run_on(0, |_| {}),
            Err(SmpError::CurrentCpu { index: 0 })
        ),
        || String::from("running a job on the calling CPU was not refused"),
    )?;
    info!(
        "smp: {} CPUs incremented one spin-locked counter {ROUNDS} times each; jobs ran where asked",
        cpus.len()
    );
    Ok(())
}
