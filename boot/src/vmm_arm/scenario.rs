//! The `guests` scenario on aarch64: the VMs of the command line run the
//! test guest (`qemu-tests/guests/test-guest`) at EL1 under Sluice's EL2,
//! and Sluice judges the steps their console lines report, plus, for a
//! `dma` guest's victim buffer, that no other VM's DMA reached it (read
//! from the host).

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use sluice_abi::cmd;
use sluice_hypervisor::iommufd::{GuestMemory, VmConfig};
use sluice_hypervisor::vm::instance::RunEnd;
use sluice_kernel::platform::Platform;
use sluice_kernel::println;

use super::guests::{self, RanVm};

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
            "  VM {name}: {} exits ({} hypercalls, {} of them IOAS_MAP; {} stage-2 faults: console and config space), {} ms",
            stats.total,
            stats.hypercalls,
            stats.calls(cmd::IOAS_MAP),
            stats.nested_page_faults,
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

/// Runs the configured VMs and judges them (the aarch64 `guests`
/// scenario).
///
/// MSIs are not isolated on aarch64 yet: an MSI is a write to the GIC ITS,
/// and Sluice has no ITS driver, so the SMMU backend reports no MSI
/// isolation and the object model would refuse every `DEVICE_BIND`. This
/// test scenario's VMs are therefore declared with
/// `allow_unsafe_interrupts`, which logs a warning for every device bound
/// that way; nothing else about them is relaxed.
pub fn run(platform: &'static Platform) -> Result<(), String> {
    println!(
        "  aarch64 guests: MSIs are not isolated (no ITS driver yet); the VMs bind their devices with allow_unsafe_interrupts"
    );
    let config = VmConfig {
        allow_unsafe_interrupts: true,
        ..VmConfig::default()
    };
    let machine = guests::prepare(platform, config)?;
    let ran = guests::run_all(&machine)?;
    let verdict = check(&ran);
    for r in ran {
        guests::finish(&machine, r);
    }
    verdict
}
