//! Judging the test guests (`qemu-tests/guests/test-guest`): their console
//! lines say what each step saw; Sluice checks them, and checks from the
//! host side what no guest can see: that the victim buffer of a `dma`
//! guest still holds its pattern after every other VM's DMA. Used by the
//! `guests` scenario and the demo on both architectures.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use sluice_abi::cmd;
use sluice_hypervisor::iommufd::{GuestMemory, IommuBackend};
use sluice_hypervisor::vm::instance::RunEnd;
use sluice_kernel::println;

use super::{ArchRuntime, Machine, RanVm, finish, run_all};

/// What translates a guest's physical addresses, for the narration.
const GUEST_PAGE_TABLES: &str = if cfg!(target_arch = "x86_64") {
    "nested (NPT) page tables"
} else {
    "stage-2 page tables"
};

/// The test guest's addresses and patterns, shared with it.
#[allow(dead_code)]
#[path = "../../../qemu-tests/guests/test-guest/src/layout.rs"]
mod guest_layout;

/// What one guest reported: passing steps, failed steps with their
/// reasons, its closing counts, and the victim buffer it announced.
#[derive(Debug, Default)]
struct GuestVerdict {
    passed: u32,
    failed: Vec<String>,
    done: Option<(u32, u32)>,
    victim: Option<u64>,
}

fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Reads the guest's result lines (`GUEST-TEST`, `GUEST-DONE`,
/// `GUEST-INFO victim gpa=`).
fn judge(console: &[String]) -> GuestVerdict {
    let mut v = GuestVerdict::default();
    for line in console {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("GUEST-TEST") => {
                let step = words.next().unwrap_or("?");
                match words.next() {
                    Some("PASS") => v.passed += 1,
                    _ => v
                        .failed
                        .push(format!("{step}: {}", words.collect::<Vec<_>>().join(" "))),
                }
            }
            Some("GUEST-DONE") => {
                let mut passed = None;
                let mut failed = None;
                for w in words {
                    if let Some(n) = w.strip_prefix("passed=") {
                        passed = n.parse().ok();
                    } else if let Some(n) = w.strip_prefix("failed=") {
                        failed = n.parse().ok();
                    }
                }
                if let (Some(p), Some(f)) = (passed, failed) {
                    v.done = Some((p, f));
                }
            }
            Some("GUEST-INFO") if words.next() == Some("victim") => {
                v.victim = words.find_map(|w| w.strip_prefix("gpa=")).and_then(number);
            }
            _ => {}
        }
    }
    v
}

/// Checks every VM's run; the error names the first problem of each VM.
fn check(ran: &[RanVm]) -> Result<(), String> {
    let mut problems = Vec::new();
    for r in ran {
        let name = &r.report.name;
        let stats = &r.report.stats;
        println!(
            "  VM {name}: {} exits ({} hypercalls, {} of them IOAS_MAP: one exit each; {} trapped memory accesses, {} port I/O), {} ms",
            stats.total,
            stats.hypercalls,
            stats.calls(cmd::IOAS_MAP),
            stats.nested_page_faults,
            stats.port_io,
            r.report.elapsed_ns / 1_000_000
        );
        if r.report.end != RunEnd::Finished {
            problems.push(format!("VM {name} did not finish: {:?}", r.report.end));
            continue;
        }
        let verdict = judge(&r.report.console);
        if let Some(first) = verdict.failed.first() {
            problems.push(format!(
                "VM {name}: {} step(s) failed, first {first}",
                verdict.failed.len()
            ));
            continue;
        }
        match verdict.done {
            Some((passed, 0)) if passed == verdict.passed && passed > 0 => {}
            other => {
                problems.push(format!(
                    "VM {name}: GUEST-DONE {other:?} does not match {} passing steps",
                    verdict.passed
                ));
                continue;
            }
        }
        if let Some(gpa) = verdict.victim {
            // Read through the VM's RAM from the host: no guest view can
            // hide a stray DMA write here.
            let mut page = alloc::vec![0u8; guest_layout::PAGE as usize];
            if let Err(e) = r.vm.ram.read(gpa, &mut page) {
                problems.push(format!(
                    "VM {name}: victim buffer at {gpa:#x} unreadable: {e:?}"
                ));
                continue;
            }
            match (0..page.len()).find(|&i| page[i] != guest_layout::victim_byte(i)) {
                Some(i) => problems.push(format!(
                    "VM {name}: victim buffer byte {i} is {:#x}, expected {:#x}: another VM's DMA reached it",
                    page[i],
                    guest_layout::victim_byte(i)
                )),
                None => println!(
                    "  VM {name}: victim buffer at {gpa:#x} intact after every other VM's DMA (checked from the host)"
                ),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Runs the VMs of `machine`, judges them and tears them down (the
/// `guests` scenario). With `narrate`, every guest step is printed as it
/// happens.
pub fn run_and_check<A: ArchRuntime, B: IommuBackend + 'static>(
    machine: &Machine<B>,
    narrate: bool,
) -> Result<(), String> {
    let ran = run_all::<A, B>(machine, narrate)?;
    let verdict = check(&ran);
    for r in ran {
        finish(machine, r);
    }
    verdict
}

/// The demo with `vm=` words: the VMs described, every step narrated as
/// the guests take it, then the same checks as the `guests` scenario.
/// Returns whether all passed.
pub fn demo<A: ArchRuntime, B: IommuBackend + 'static>(
    prepared: Result<Machine<B>, String>,
    start_ns: u64,
) -> bool {
    let machine = match prepared {
        Ok(m) => m,
        Err(why) => {
            println!("Sluice demo: cannot start the VMs: {why}");
            return false;
        }
    };
    for vm in &machine.vms {
        let devices: Vec<String> = vm
            .devices
            .iter()
            .map(|d| {
                format!(
                    "host {} as guest {} (IOMMU group {})",
                    d.host, d.guest, d.group
                )
            })
            .collect();
        println!(
            "  VM {}: {} MiB of scrubbed RAM behind {}, guest `{}` ({}), devices: {}",
            vm.config.name,
            vm.config.memory >> 20,
            GUEST_PAGE_TABLES,
            vm.config.image,
            vm.config.args,
            devices.join(", ")
        );
    }
    println!(
        "  Each VM runs on its own CPU; further VMs start once the first is ready. Guest steps:"
    );
    let verdict = run_and_check::<A, B>(&machine, true);
    let elapsed_ms = sluice_kernel::clock::now_ns()
        .unwrap_or(0)
        .saturating_sub(start_ns)
        / 1_000_000;
    match verdict {
        Ok(()) => {
            println!(
                "Sluice demo done in {elapsed_ms} ms: every guest step passed and no VM reached another's memory."
            );
            true
        }
        Err(why) => {
            println!("Sluice demo FAILED after {elapsed_ms} ms: {why}");
            false
        }
    }
}
