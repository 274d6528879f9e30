//! Every CPU, not just the boot CPU: numbering them from the MADT, starting
//! them, and handing them work.
//!
//! [`init`] reads the MADT and numbers the CPUs — the boot CPU is 0, the
//! other enabled processors follow in MADT order — and reserves each one's
//! stacks, descriptor tables and (x86) SVM pages. [`start`] brings one CPU
//! up at an entry function; [`run_on`] starts a CPU if needed with a mailbox
//! loop and gives it a closure, returning a [`Completion`] the caller can
//! wait on with a timeout. Every wait for another CPU is bounded.
//!
//! The arch-specific part (INIT/STARTUP IPIs and a real-mode trampoline on
//! x86_64, PSCI CPU_ON on aarch64) is `crate::arch::smp`.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use sluice_hal::Clock;

use crate::madt::{MadtError, Processor};

/// Who a CPU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    /// Sluice's number for it: 0 is the boot CPU.
    pub index: usize,
    /// The APIC ID (x86_64) or MPIDR affinity (aarch64).
    pub hw_id: u64,
    /// The ACPI processor UID from the MADT.
    pub processor_uid: u32,
}

/// Where a started CPU begins: its identity and the caller's argument.
pub type CpuEntry = fn(CpuInfo, usize) -> !;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// [`init`] has not run (or failed).
    NotInitialized,
    NoAcpi,
    NoMadt,
    Madt(MadtError),
    /// The running CPU's ID is not among the MADT's enabled processors.
    BootCpuNotInMadt {
        hw_id: u64,
    },
    NoSuchCpu {
        index: usize,
        count: usize,
    },
    /// The CPU is the one asking (the boot CPU runs already).
    CurrentCpu {
        index: usize,
    },
    AlreadyStarted {
        index: usize,
    },
    /// The CPU runs its own entry function, not the mailbox loop.
    NotServingMailbox {
        index: usize,
    },
    /// The CPU's mailbox still holds a job it has not picked up.
    MailboxBusy {
        index: usize,
    },
    /// No memory for per-CPU stacks and tables.
    OutOfMemory,
    /// The CPU did not check in after the start sequence.
    StartTimeout {
        index: usize,
        hw_id: u64,
        waited_ns: u64,
    },
    /// A job did not complete in time.
    JobTimeout {
        index: usize,
        waited_ns: u64,
    },
    /// x86_64: no free 4 KiB page below 640 KiB for the real-mode trampoline.
    NoLowMemory,
    /// x86_64: the local APIC is globally disabled (IA32_APIC_BASE.EN = 0).
    ApicDisabled,
    /// x86_64: the APIC ID does not fit xAPIC's 8-bit destination and the
    /// boot CPU's APIC is not in x2APIC mode.
    ApicIdNeedsX2apic {
        apic_id: u32,
    },
    /// x86_64: the local APIC kept a start-up IPI pending.
    IpiNotAccepted {
        apic_id: u32,
        waited_ns: u64,
    },
    /// x86_64: the trampoline page cannot be named by a STARTUP vector.
    BadTrampolinePage {
        address: u64,
    },
    /// x86_64: SVM cannot be enabled on this CPU.
    #[cfg(all(target_os = "uefi", target_arch = "x86_64"))]
    Svm(crate::arch::svm::SvmError),
    /// aarch64: the FADT names no usable PSCI conduit.
    PsciConduit(crate::psci::ConduitError),
    /// aarch64: firmware's PSCI is older than 0.2 (no standard CPU_ON).
    PsciTooOld {
        major: u16,
        minor: u16,
    },
    /// aarch64: a PSCI call failed.
    Psci {
        call: &'static str,
        error: crate::psci::PsciError,
    },
    /// Something about this machine Sluice cannot start other CPUs on (why).
    Unsupported(&'static str),
}

impl From<MadtError> for SmpError {
    fn from(e: MadtError) -> Self {
        Self::Madt(e)
    }
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInitialized => f.write_str("SMP support is not initialized (smp::init)"),
            Self::NoAcpi => f.write_str("no ACPI tables, so no list of processors"),
            Self::NoMadt => f.write_str("firmware published no MADT, so no list of processors"),
            Self::Madt(e) => write!(f, "{e}"),
            Self::BootCpuNotInMadt { hw_id } => write!(
                f,
                "the boot CPU (hardware ID {hw_id:#x}) is not an enabled processor in the MADT"
            ),
            Self::NoSuchCpu { index, count } => {
                write!(f, "there is no CPU {index}: the MADT lists {count}")
            }
            Self::CurrentCpu { index } => write!(f, "CPU {index} is the CPU asking"),
            Self::AlreadyStarted { index } => write!(f, "CPU {index} was started already"),
            Self::NotServingMailbox { index } => write!(
                f,
                "CPU {index} runs its own entry function and takes no jobs"
            ),
            Self::MailboxBusy { index } => write!(
                f,
                "CPU {index} has not picked up its previous job yet"
            ),
            Self::OutOfMemory => f.write_str("no memory for per-CPU stacks and tables"),
            Self::StartTimeout {
                index,
                hw_id,
                waited_ns,
            } => write!(
                f,
                "CPU {index} (hardware ID {hw_id:#x}) did not check in within {} ms of its start sequence",
                waited_ns / 1_000_000
            ),
            Self::JobTimeout { index, waited_ns } => write!(
                f,
                "the job on CPU {index} did not complete within {} ms",
                waited_ns / 1_000_000
            ),
            Self::NoLowMemory => f.write_str(
                "no free page below 640 KiB for the real-mode start-up trampoline",
            ),
            Self::ApicDisabled => f.write_str(
                "the boot CPU's local APIC is disabled (IA32_APIC_BASE.EN = 0); it cannot send start-up IPIs",
            ),
            Self::ApicIdNeedsX2apic { apic_id } => write!(
                f,
                "APIC ID {apic_id:#x} is above 255, which only x2APIC mode can address, and the boot CPU's APIC is in xAPIC mode"
            ),
            Self::IpiNotAccepted { apic_id, waited_ns } => write!(
                f,
                "the local APIC did not send a start-up IPI to APIC ID {apic_id:#x} within {} µs",
                waited_ns / 1000
            ),
            Self::BadTrampolinePage { address } => write!(
                f,
                "page {address:#x} cannot hold the start-up trampoline (a STARTUP IPI reaches only pages below 0xa0000)"
            ),
            #[cfg(all(target_os = "uefi", target_arch = "x86_64"))]
            Self::Svm(e) => write!(f, "{e}"),
            Self::PsciConduit(e) => write!(f, "{e}"),
            Self::PsciTooOld { major, minor } => write!(
                f,
                "firmware implements PSCI {major}.{minor}; CPU_ON needs 0.2 or later"
            ),
            Self::Psci { call, error } => write!(f, "PSCI {call} failed: {error}"),
            Self::Unsupported(why) => write!(f, "cannot start other CPUs: {why}"),
        }
    }
}

/// Numbers the CPUs: the boot CPU (`boot_hw_id`) is 0, the other enabled
/// processors follow in MADT order. Disabled ones (online-capable or not)
/// are left out: they cannot be started now.
pub fn number_cpus(processors: &[Processor], boot_hw_id: u64) -> Result<Vec<CpuInfo>, SmpError> {
    let boot = processors
        .iter()
        .find(|p| p.enabled && p.hw_id == boot_hw_id)
        .ok_or(SmpError::BootCpuNotInMadt { hw_id: boot_hw_id })?;
    let mut cpus = Vec::with_capacity(processors.len());
    cpus.push(CpuInfo {
        index: 0,
        hw_id: boot.hw_id,
        processor_uid: boot.processor_uid,
    });
    for p in processors
        .iter()
        .filter(|p| p.enabled && p.hw_id != boot_hw_id)
    {
        cpus.push(CpuInfo {
            index: cpus.len(),
            hw_id: p.hw_id,
            processor_uid: p.processor_uid,
        });
    }
    Ok(cpus)
}

/// A closure for another CPU.
type Work = Box<dyn FnOnce(CpuInfo) + Send>;

/// Lets the submitter of a job see it finish.
#[derive(Clone)]
pub struct Completion {
    index: usize,
    done: Arc<AtomicBool>,
}

impl Completion {
    /// The CPU the job runs on.
    pub fn cpu(&self) -> usize {
        self.index
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits up to `timeout_ns` on `clock` for the job to finish; whatever
    /// it wrote before finishing is visible afterwards.
    pub fn wait_with(&self, clock: &dyn Clock, timeout_ns: u64) -> Result<(), SmpError> {
        sluice_hal::poll_until(clock, timeout_ns, || self.is_done().then_some(())).map_err(|t| {
            SmpError::JobTimeout {
                index: self.index,
                waited_ns: t.waited_ns,
            }
        })
    }

    /// [`Completion::wait_with`] on the kernel clock.
    #[cfg(target_os = "uefi")]
    pub fn wait(&self, timeout_ns: u64) -> Result<(), SmpError> {
        self.wait_with(&crate::clock::KernelClock, timeout_ns)
    }
}

struct Job {
    work: Work,
    done: Arc<AtomicBool>,
}

/// One job slot per CPU: the submitter posts, the CPU's loop takes.
pub struct Mailbox {
    /// Set while a posted job waits to be taken, so the idle loop polls an
    /// atomic rather than the lock.
    pending: AtomicBool,
    job: spin::Mutex<Option<Job>>,
}

impl Default for Mailbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Mailbox {
    pub const fn new() -> Self {
        Self {
            pending: AtomicBool::new(false),
            job: spin::Mutex::new(None),
        }
    }

    /// Leaves `work` for CPU `index`. One job may wait at a time (another
    /// may be running).
    pub fn post(&self, index: usize, work: Work) -> Result<Completion, SmpError> {
        let mut slot = self.job.lock();
        if slot.is_some() {
            return Err(SmpError::MailboxBusy { index });
        }
        let done = Arc::new(AtomicBool::new(false));
        *slot = Some(Job {
            work,
            done: done.clone(),
        });
        self.pending.store(true, Ordering::Release);
        Ok(Completion { index, done })
    }

    /// Runs the waiting job, if any, as `cpu`; returns whether there was one.
    pub fn run_next(&self, cpu: CpuInfo) -> bool {
        if !self.pending.load(Ordering::Acquire) {
            return false;
        }
        let job = {
            let mut slot = self.job.lock();
            self.pending.store(false, Ordering::Relaxed);
            slot.take()
        };
        let Some(job) = job else { return false };
        (job.work)(cpu);
        job.done.store(true, Ordering::Release);
        true
    }
}

#[cfg(target_os = "uefi")]
pub use bare_metal::*;

#[cfg(target_os = "uefi")]
mod bare_metal {
    use super::*;

    use core::sync::atomic::AtomicU8;

    use log::{info, warn};
    use spin::{Mutex, Once};

    use crate::acpi_tables::RawMadt;
    use crate::arch::smp as arch;
    use crate::madt::Madt;
    use crate::platform::Platform;

    const OFFLINE: u8 = 0;
    const STARTING: u8 = 1;
    const ONLINE: u8 = 2;
    const FAILED: u8 = 3;

    /// Everything Sluice keeps per CPU.
    pub(crate) struct Cpu {
        pub(crate) info: CpuInfo,
        state: AtomicU8,
        /// Where `start` sends the CPU, read once by the CPU itself.
        launch: Mutex<Option<(CpuEntry, usize)>>,
        serves_mailbox: AtomicBool,
        mailbox: Mailbox,
        pub(crate) arch: arch::CpuResources,
    }

    static CPUS: Once<Vec<Cpu>> = Once::new();
    /// Serializes `init` and `start` (x86_64 starts through one shared
    /// trampoline page).
    static START_LOCK: Mutex<()> = Mutex::new(());

    fn cpus() -> Result<&'static [Cpu], SmpError> {
        CPUS.get()
            .map(Vec::as_slice)
            .ok_or(SmpError::NotInitialized)
    }

    fn cpu(index: usize) -> Result<&'static Cpu, SmpError> {
        let cpus = cpus()?;
        cpus.get(index).ok_or(SmpError::NoSuchCpu {
            index,
            count: cpus.len(),
        })
    }

    /// Finds the CPUs in the MADT and reserves their stacks and tables. A
    /// second call returns the same list.
    pub fn init(platform: &Platform) -> Result<Vec<CpuInfo>, SmpError> {
        let _guard = START_LOCK.lock();
        if let Some(cpus) = CPUS.get() {
            return Ok(cpus.iter().map(|c| c.info).collect());
        }
        let acpi = platform.acpi.as_ref().ok_or(SmpError::NoAcpi)?;
        let bytes = acpi.raw::<RawMadt>().ok_or(SmpError::NoMadt)?;
        let madt = Madt::parse(bytes)?;
        let processors = madt.processors()?;
        for p in processors.iter().filter(|p| !p.enabled) {
            info!(
                "smp: processor UID {} ({} {:#x}) is disabled{}; not started",
                p.processor_uid,
                arch::HW_ID_NAME,
                p.hw_id,
                if p.online_capable {
                    " (online capable)"
                } else {
                    ""
                }
            );
        }
        let infos = number_cpus(&processors, arch::this_cpu_hw_id())?;
        arch::init(platform, &madt)?;
        let mut frames = platform.frames.lock();
        let mut cpus: Vec<Cpu> = Vec::with_capacity(infos.len());
        for info in &infos {
            match arch::prepare_cpu(&mut frames, *info) {
                Ok(resources) => cpus.push(Cpu {
                    info: *info,
                    state: AtomicU8::new(if info.index == 0 { ONLINE } else { OFFLINE }),
                    launch: Mutex::new(None),
                    serves_mailbox: AtomicBool::new(false),
                    mailbox: Mailbox::new(),
                    arch: resources,
                }),
                Err(e) => {
                    // Give back what the CPUs before this one got.
                    for cpu in cpus {
                        arch::release_cpu(&mut frames, cpu.arch);
                    }
                    return Err(e);
                }
            }
        }
        drop(frames);
        CPUS.call_once(|| cpus);
        arch::boot_cpu_ready();
        for info in &infos {
            info!(
                "smp: CPU {} is {} {:#x} (ACPI UID {}){}",
                info.index,
                arch::HW_ID_NAME,
                info.hw_id,
                info.processor_uid,
                if info.index == 0 {
                    ", the boot CPU"
                } else {
                    ""
                }
            );
        }
        Ok(infos)
    }

    /// All CPUs `init` found, the boot CPU first.
    pub fn cpus_info() -> Vec<CpuInfo> {
        CPUS.get()
            .map(|c| c.iter().map(|c| c.info).collect())
            .unwrap_or_default()
    }

    /// Whether CPU `index` has checked in and runs.
    pub fn is_online(index: usize) -> bool {
        cpu(index).is_ok_and(|c| c.state.load(Ordering::Acquire) == ONLINE)
    }

    /// The running CPU, once `init` has run.
    pub fn current() -> Option<CpuInfo> {
        let index = arch::current_index()?;
        CPUS.get()?.get(index).map(|c| c.info)
    }

    /// Starts CPU `index` at `entry(info, arg)` and returns once it has
    /// checked in (it runs on its own stack with Sluice's page tables,
    /// descriptor tables and exception vectors by then).
    pub fn start(index: usize, entry: CpuEntry, arg: usize) -> Result<(), SmpError> {
        start_cpu(index, entry, arg, false)
    }

    fn start_cpu(
        index: usize,
        entry: CpuEntry,
        arg: usize,
        serves_mailbox: bool,
    ) -> Result<(), SmpError> {
        let cpu = cpu(index)?;
        if current().is_some_and(|c| c.index == index) {
            return Err(SmpError::CurrentCpu { index });
        }
        let _guard = START_LOCK.lock();
        let state = cpu.state.load(Ordering::Acquire);
        if !matches!(state, OFFLINE | FAILED) {
            return Err(SmpError::AlreadyStarted { index });
        }
        cpu.state.store(STARTING, Ordering::Release);
        cpu.serves_mailbox.store(serves_mailbox, Ordering::Release);
        *cpu.launch.lock() = Some((entry, arg));
        let arrived = || cpu.state.load(Ordering::Acquire) == ONLINE;
        match arch::boot(cpu, &arrived) {
            Ok(()) => {
                info!(
                    "smp: CPU {index} ({} {:#x}) is online",
                    arch::HW_ID_NAME,
                    cpu.info.hw_id
                );
                Ok(())
            }
            Err(e) => {
                cpu.state.store(FAILED, Ordering::Release);
                warn!("smp: CPU {index} failed to start: {e}");
                Err(e)
            }
        }
    }

    /// Runs `work` on CPU `index`, starting the CPU with the mailbox loop if
    /// it is offline. Wait for the result with [`Completion::wait`].
    pub fn run_on(
        index: usize,
        work: impl FnOnce(CpuInfo) + Send + 'static,
    ) -> Result<Completion, SmpError> {
        let cpu = cpu(index)?;
        if current().is_some_and(|c| c.index == index) {
            return Err(SmpError::CurrentCpu { index });
        }
        if matches!(cpu.state.load(Ordering::Acquire), OFFLINE | FAILED) {
            match start_cpu(index, mailbox_entry, 0, true) {
                Ok(()) | Err(SmpError::AlreadyStarted { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if !cpu.serves_mailbox.load(Ordering::Acquire) {
            return Err(SmpError::NotServingMailbox { index });
        }
        let completion = cpu.mailbox.post(index, Box::new(work))?;
        arch::wake_idle();
        Ok(completion)
    }

    fn mailbox_entry(info: CpuInfo, _arg: usize) -> ! {
        serve_mailbox(info)
    }

    /// Turns the calling CPU into a job server for [`run_on`]; an entry
    /// function passed to [`start`] may end with this.
    pub fn serve_mailbox(info: CpuInfo) -> ! {
        let Ok(cpu) = cpu(info.index) else {
            crate::arch::halt_forever()
        };
        cpu.serves_mailbox.store(true, Ordering::Release);
        loop {
            if !cpu.mailbox.run_next(info) {
                arch::idle_wait();
            }
        }
    }

    /// Called by the arch entry code on a new CPU once its stack, page
    /// tables, descriptor tables and vectors are in place.
    pub(crate) fn cpu_arrived(index: usize) -> ! {
        let Ok(cpu) = cpu(index) else {
            crate::arch::halt_forever()
        };
        let launch = cpu.launch.lock().take();
        cpu.state.store(ONLINE, Ordering::Release);
        match launch {
            Some((entry, arg)) => entry(cpu.info, arg),
            None => crate::arch::halt_forever(),
        }
    }

    /// The per-CPU resources of CPU `index`, for the arch entry code.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn resources(index: usize) -> Option<&'static Cpu> {
        cpu(index).ok()
    }

    /// Shows " on CPU <n> (<id>)" for the running CPU once `init` has run,
    /// nothing before: for fatal paths, without allocating.
    pub struct CurrentCpu;

    impl fmt::Display for CurrentCpu {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match current() {
                Some(c) => write!(
                    f,
                    " on CPU {} ({} {:#x})",
                    c.index,
                    arch::HW_ID_NAME,
                    c.hw_id
                ),
                None => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_hal::model::ModelClock;
    use std::sync::atomic::AtomicUsize;

    fn processor(uid: u32, hw_id: u64, enabled: bool) -> Processor {
        Processor {
            processor_uid: uid,
            hw_id,
            enabled,
            online_capable: !enabled,
        }
    }

    #[test]
    fn boot_cpu_is_zero_and_the_rest_follow_in_madt_order() {
        let p = [
            processor(0, 0, true),
            processor(1, 2, true),
            processor(2, 4, false),
            processor(3, 6, true),
        ];
        let cpus = number_cpus(&p, 2).unwrap();
        assert_eq!(
            cpus.iter()
                .map(|c| (c.index, c.hw_id, c.processor_uid))
                .collect::<Vec<_>>(),
            [(0, 2, 1), (1, 0, 0), (2, 6, 3)]
        );
        assert_eq!(
            number_cpus(&p, 4),
            Err(SmpError::BootCpuNotInMadt { hw_id: 4 }),
            "a disabled processor cannot be the one running"
        );
        assert_eq!(number_cpus(&[processor(0, 0, true)], 0).unwrap().len(), 1);
    }

    fn cpu(index: usize) -> CpuInfo {
        CpuInfo {
            index,
            hw_id: index as u64,
            processor_uid: 0,
        }
    }

    #[test]
    fn mailbox_runs_one_job_at_a_time_on_another_thread() {
        let mailbox = Arc::new(Mailbox::new());
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (mailbox, stop) = (mailbox.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ran = 0;
                while !stop.load(Ordering::Acquire) {
                    if mailbox.run_next(cpu(1)) {
                        ran += 1;
                    }
                }
                ran
            })
        };
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        let clock = ModelClock::new(1);
        for round in 0..50usize {
            let s = seen.clone();
            let done = mailbox
                .post(
                    1,
                    Box::new(move |info: CpuInfo| {
                        s.store(info.index * 1000 + round, Ordering::Relaxed);
                    }),
                )
                .unwrap();
            assert_eq!(done.cpu(), 1);
            done.wait_with(&clock, u64::MAX).unwrap();
            assert!(done.is_done());
            assert_eq!(
                seen.load(Ordering::Relaxed),
                1000 + round,
                "the job's write is visible"
            );
        }
        stop.store(true, Ordering::Release);
        assert_eq!(server.join().unwrap(), 50);
    }

    #[test]
    fn a_second_waiting_job_is_refused_and_waits_time_out() {
        let mailbox = Mailbox::new();
        let first = mailbox.post(3, Box::new(|_| {})).unwrap();
        assert!(matches!(
            mailbox.post(3, Box::new(|_| {})),
            Err(SmpError::MailboxBusy { index: 3 })
        ));
        let clock = ModelClock::new(1_000);
        assert_eq!(
            first.wait_with(&clock, 10_000),
            Err(SmpError::JobTimeout {
                index: 3,
                waited_ns: 10_000
            })
        );
        assert!(mailbox.run_next(cpu(3)));
        assert!(first.is_done());
        assert!(!mailbox.run_next(cpu(3)), "nothing left");
        mailbox.post(3, Box::new(|_| {})).expect("free again");
    }
}
