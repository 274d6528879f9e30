//! `attacker`: a VM whose edu is attached to an IOAS holding only its own
//! buffer aims DMA at the addresses where `dma` left its victim buffer —
//! the victim's IOVA and the victim's GPA — in both directions. Every
//! access faults into its own queue, and none of its own memory changes
//! (what the victim's memory holds is for Sluice to check: the victim's
//! pattern is `layout::victim_byte`).

use super::{Device, check, expect_fault, fill, need, pattern};
use crate::console::{Outcome, Report, fail};
use crate::edu::Direction;
use crate::hypercall as hc;
use crate::layout::{
    ATTACKER_IOVA, BUFFER_GPA, BUFFER_PAGES, PAGE, TRANSFER, VICTIM_GPA, VICTIM_IOVA, victim_byte,
};
use crate::start_info::StartInfo;

const SOURCE: u64 = BUFFER_GPA;
const TARGET: u64 = BUFFER_GPA + PAGE;
/// What the edu buffer holds before each read attack.
const BEFORE_READ: u8 = 0x3c;

pub fn run(info: &StartInfo, report: &mut Report) {
    let mut device = Device::find(info, report);
    report.step("device-list", device.listed());
    let ioas = match hc::ioas_alloc() {
        Ok(id) => {
            report.pass("ioas-alloc");
            Some(id)
        }
        Err(why) => {
            report.fail("ioas-alloc", why);
            None
        }
    };
    report.step(
        "ioas-map",
        need(ioas, "IOAS_ALLOC")
            .and_then(|a| hc::ioas_map(a, BUFFER_GPA, BUFFER_PAGES * PAGE, ATTACKER_IOVA)),
    );
    let bound = device.bind();
    report.step("device-bind", bound);
    report.step("busmaster", device.enable_busmaster());
    let queue = device.alloc_fault_queue();
    report.step("fault-queue-alloc", queue);
    let attached = device.attach(ioas).map(|_| ());
    let attach_ok = attached.is_ok();
    report.step("hwpt-attach", attached);
    let ready = |outcome: Outcome| {
        if attach_ok {
            outcome
        } else {
            fail!("not run: HWPT_ALLOC/DEVICE_ATTACH failed earlier")
        }
    };
    // Its own DMA works: the faults below are the IOMMU's, not a dead device.
    report.step(
        "dma-own-buffer",
        ready(Ok(())).and_then(|()| {
            device.round_trip(3, (SOURCE, ATTACKER_IOVA), (TARGET, ATTACKER_IOVA + PAGE))
        }),
    );
    for (step, target) in [
        ("write-victim-iova", VICTIM_IOVA),
        ("write-victim-gpa", VICTIM_GPA),
    ] {
        report.step(
            step,
            ready(Ok(()))
                .and_then(|()| device.blocked_write(target, &[VICTIM_GPA, SOURCE, TARGET], true)),
        );
    }
    for (step, target) in [
        ("read-victim-iova", VICTIM_IOVA),
        ("read-victim-gpa", VICTIM_GPA),
    ] {
        report.step(
            step,
            ready(Ok(())).and_then(|()| read_attack(&device, target)),
        );
    }
}

/// edu reads from `target`: a read fault, and the edu buffer (copied back
/// into its own buffer) holds neither the victim's bytes nor the bytes of
/// this VM's own page at that address.
fn read_attack(device: &Device, target: u64) -> Outcome {
    let edu = device.edu()?;
    let fault = need(device.fault_id, "FAULT_QUEUE_ALLOC")?;
    let dev = need(device.dev_id, "DEVICE_BIND")?;
    super::drain_faults(fault)?;
    // Load a known pattern into the device, and its own page at the victim
    // GPA with its own pattern.
    fill(SOURCE, TRANSFER, |_| BEFORE_READ);
    edu.dma(Direction::ToDevice, ATTACKER_IOVA)?;
    super::expect_no_fault(fault)?;
    fill(VICTIM_GPA, PAGE as usize, pattern(0x44));
    edu.dma(Direction::ToDevice, target)?;
    expect_fault(fault, dev, target, false)?;
    // An IOMMU may record every faulting access of the transfer (SMMUv3
    // does): the rest of them are not a fault of the next step.
    super::drain_faults(fault)?;
    fill(TARGET, PAGE as usize, |_| 0);
    edu.dma(Direction::ToRam, ATTACKER_IOVA + PAGE)?;
    super::expect_no_fault(fault)?;
    let victim = check("", TARGET, TRANSFER, victim_byte).is_ok();
    let own = check("", TARGET, TRANSFER, pattern(0x44)).is_ok();
    if victim || own {
        return fail!(
            "edu read the {} bytes at {target:#x} through the IOMMU",
            if victim { "victim's" } else { "own page's" }
        );
    }
    check(
        "own page at the victim GPA",
        VICTIM_GPA,
        PAGE as usize,
        pattern(0x44),
    )
}
