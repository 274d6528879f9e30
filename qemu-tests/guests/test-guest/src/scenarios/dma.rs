//! `dma`: the device life cycle through the iommufd hypercalls, with real
//! edu DMA at every stage.
//!
//! list → IOAS → map → (map outside RAM: EFAULT) → (bind a foreign BDF:
//! ENODEV) → bind → bus master → fault queue → HWPT → attach → DMA both
//! ways → unmapped IOVA faults → unmap, old IOVA faults → replace onto a
//! second IOAS/HWPT, DMA works there → old objects destroyed → detach,
//! DMA blocked → unbind, bus master revoked, DMA blocked → victim buffer
//! still intact and left mapped, then `GUEST-READY` lets `attacker` start
//! against it.

use sluice_abi::{cmd, errno};

use super::{Device, check, fill, need};
use crate::console::{Outcome, Report, fail};
use crate::edu::Direction;
use crate::hypercall as hc;
use crate::layout::{
    BUFFER_GPA, BUFFER_PAGES, CANARY_GPA, IOVA_A, IOVA_B, PAGE, UNMAPPED_IOVA, VICTIM_GPA,
    VICTIM_IOVA, victim_byte,
};
use crate::pci::COMMAND_BUS_MASTER;
use crate::start_info::StartInfo;

const BUFFER_LEN: u64 = BUFFER_PAGES * PAGE;
const SOURCE: u64 = BUFFER_GPA;
const TARGET: u64 = BUFFER_GPA + PAGE;

pub fn run(info: &StartInfo, report: &mut Report) {
    let mut device = Device::find(info, report);
    report.step("device-list", device.listed());

    let ioas_a = hc::ioas_alloc();
    let ioas_a = match ioas_a {
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
        need(ioas_a, "IOAS_ALLOC").and_then(|a| hc::ioas_map(a, BUFFER_GPA, BUFFER_LEN, IOVA_A)),
    );
    // The victim page goes in first and stays mapped (in IOAS B once IOAS
    // A is gone) to the end.
    let published = need(ioas_a, "IOAS_ALLOC").and_then(publish_victim);
    let published_ok = published.is_ok();
    report.step("victim-published", published);
    if published_ok {
        report.info(format_args!(
            "victim gpa={VICTIM_GPA:#x} iova={VICTIM_IOVA:#x}"
        ));
    }
    report.step("map-outside-ram", map_outside_ram(info, ioas_a));
    report.step("bind-foreign-bdf", bind_foreign(info));
    let bound = device.bind();
    report.step("device-bind", bound);
    report.step("busmaster", device.enable_busmaster());
    let queue = device.alloc_fault_queue();
    report.step("fault-queue-alloc", queue);
    let hwpt_a = device.attach(ioas_a);
    let hwpt_a = match hwpt_a {
        Ok(h) => {
            report.pass("hwpt-attach");
            Some(h)
        }
        Err(why) => {
            report.fail("hwpt-attach", why);
            None
        }
    };

    report.step(
        "dma-both-ways",
        need(hwpt_a, "HWPT_ALLOC/DEVICE_ATTACH")
            .and_then(|_| device.round_trip(1, (SOURCE, IOVA_A), (TARGET, IOVA_A + PAGE))),
    );
    report.step(
        "fault-unmapped-iova",
        need(hwpt_a, "HWPT_ALLOC/DEVICE_ATTACH")
            .and_then(|_| device.blocked_write(UNMAPPED_IOVA, &[CANARY_GPA, TARGET], true)),
    );
    report.step("fault-unmapped-read", unmapped_read(&device, hwpt_a));

    let unmapped = need(ioas_a, "IOAS_ALLOC").and_then(|a| {
        let bytes = hc::ioas_unmap(a, IOVA_A, BUFFER_LEN)?;
        if bytes != BUFFER_LEN {
            return fail!("IOAS_UNMAP unmapped {bytes:#x} bytes, expected {BUFFER_LEN:#x}");
        }
        Ok(())
    });
    let unmap_ok = unmapped.is_ok();
    report.step("ioas-unmap", unmapped);
    report.step(
        "fault-after-unmap",
        if unmap_ok {
            device.blocked_write(IOVA_A + PAGE, &[TARGET, SOURCE], true)
        } else {
            fail!("not run: IOAS_UNMAP failed earlier")
        },
    );

    // A second IOAS with the buffer at another IOVA, its own HWPT, and the
    // device moved there in one step.
    let second = replace(&device);
    let (ioas_b, hwpt_b) = match second {
        Ok(ids) => {
            report.pass("device-replace");
            (Some(ids.0), Some(ids.1))
        }
        Err(why) => {
            report.fail("device-replace", why);
            (None, None)
        }
    };
    report.step(
        "dma-after-replace",
        need(hwpt_b, "DEVICE_REPLACE")
            .and_then(|_| device.round_trip(2, (SOURCE, IOVA_B), (TARGET, IOVA_B + PAGE))),
    );
    report.step(
        "old-iova-after-replace",
        need(hwpt_b, "DEVICE_REPLACE")
            .and_then(|_| device.blocked_write(IOVA_A + PAGE, &[TARGET], true)),
    );
    report.step("destroy-old", destroy_old(hwpt_a, ioas_a, hwpt_b));

    // Detached: blocked. No HWPT means no fault queue: the fault is Sluice's
    // to log, the guest checks that nothing was written.
    let detached =
        need(device.dev_id, "DEVICE_BIND").and_then(|d| hc::ok("DEVICE_DETACH", hc::detach(d)));
    let detach_ok = detached.is_ok();
    report.step("device-detach", detached);
    report.step(
        "dma-after-detach",
        if detach_ok {
            device.blocked_write(IOVA_B + PAGE, &[TARGET, SOURCE], false)
        } else {
            fail!("not run: DEVICE_DETACH failed earlier")
        },
    );
    let unbound = unbind(&device);
    let unbind_ok = unbound.is_ok();
    report.step("device-unbind", unbound);
    report.step(
        "dma-after-unbind",
        if unbind_ok {
            device.blocked_write(IOVA_B + PAGE, &[TARGET, SOURCE], false)
        } else {
            fail!("not run: DEVICE_UNBIND failed earlier")
        },
    );

    report.step("victim-kept", keep_victim(ioas_b));
    // Only now may the attacker start (Sluice holds further VMs until the
    // first is ready): VT-d units may have a single fault-recording
    // register (QEMU's has), so faults of two devices at the same moment
    // overflow it and one record is lost; the steps above each expect
    // their own record.
    report.ready();
}

/// `IOAS_MAP` of guest-physical memory that is not this VM's RAM (the
/// first page past its RAM, and the PCI BAR window): `EFAULT`.
fn map_outside_ram(info: &StartInfo, ioas: Option<u32>) -> Outcome {
    let ioas = need(ioas, "IOAS_ALLOC")?;
    let past_ram = info.page_past_ram();
    if past_ram < crate::layout::MIN_RAM {
        return fail!("the memory map shows only {past_ram:#x} bytes of RAM");
    }
    for (what, gpa) in [
        ("past the end of RAM", past_ram),
        ("in the BAR window", crate::pci::BAR_WINDOW.0),
    ] {
        let ret = hc::ioas_map_raw(ioas, gpa, PAGE, IOVA_A + 0x10_0000);
        hc::expect_errno(format_str(what, gpa).as_str(), ret, errno::EFAULT)?;
    }
    // RAM that runs past the end: also refused, nothing mapped.
    let ret = hc::ioas_map_raw(ioas, past_ram - PAGE, 2 * PAGE, IOVA_A + 0x10_0000);
    hc::expect_errno("IOAS_MAP across the end of RAM", ret, errno::EFAULT)?;
    // The IOVA is still free: mapping and unmapping real RAM there works.
    hc::ioas_map(ioas, CANARY_GPA, PAGE, IOVA_A + 0x10_0000)?;
    let bytes = hc::ioas_unmap(ioas, IOVA_A + 0x10_0000, PAGE)?;
    if bytes != PAGE {
        return fail!("unmapping the probe mapping removed {bytes:#x} bytes");
    }
    Ok(())
}

/// "IOAS_MAP <what> (<gpa>)" for an errno message, without a heap.
fn format_str(what: &str, gpa: u64) -> crate::console::Reason {
    crate::console::Reason::new(format_args!("IOAS_MAP {what} ({gpa:#x})"))
}

/// `DEVICE_BIND` of a BDF no device of this VM has: `ENODEV`.
fn bind_foreign(info: &StartInfo) -> Outcome {
    // The highest device number of bus 0 that the start info does not list.
    let Some(bdf) = (1u8..32)
        .rev()
        .map(|d| sluice_abi::bdf(0, 0, d, 0))
        .find(|b| info.devices().iter().all(|d| d.guest_bdf != *b))
    else {
        return fail!("every BDF of bus 0 is assigned");
    };
    let mut group = [0u32; 4];
    let (ret, _) = hc::device_bind_raw(bdf, &mut group);
    hc::expect_errno("DEVICE_BIND of an unassigned BDF", ret, errno::ENODEV)
}

/// edu reading from an unmapped IOVA faults as a read.
fn unmapped_read(device: &Device, hwpt: Option<u32>) -> Outcome {
    need(hwpt, "HWPT_ALLOC/DEVICE_ATTACH")?;
    let edu = device.edu()?;
    let fault = need(device.fault_id, "FAULT_QUEUE_ALLOC")?;
    let dev = need(device.dev_id, "DEVICE_BIND")?;
    super::drain_faults(fault)?;
    edu.dma(Direction::ToDevice, UNMAPPED_IOVA)?;
    super::expect_fault(fault, dev, UNMAPPED_IOVA, false)
}

/// IOAS B with the buffer at `IOVA_B`, HWPT B on it, `DEVICE_REPLACE` of
/// the RID onto HWPT B: (IOAS B, HWPT B).
fn replace(device: &Device) -> Result<(u32, u32), crate::console::Reason> {
    let dev = need(device.dev_id, "DEVICE_BIND")?;
    let fault = need(device.fault_id, "FAULT_QUEUE_ALLOC")?;
    let ioas = hc::ioas_alloc()?;
    hc::ioas_map(ioas, BUFFER_GPA, BUFFER_LEN, IOVA_B)?;
    let hwpt = hc::hwpt_alloc(dev, ioas, fault)?;
    let used = hc::attach(cmd::DEVICE_REPLACE, dev, hwpt)?;
    if used != hwpt {
        return fail!("DEVICE_REPLACE onto HWPT {hwpt} reports HWPT {used}");
    }
    Ok((ioas, hwpt))
}

/// The first HWPT and IOAS are unused after the replace: `DESTROY` works,
/// and the HWPT in use is refused with `EBUSY`.
fn destroy_old(hwpt_a: Option<u32>, ioas_a: Option<u32>, hwpt_b: Option<u32>) -> Outcome {
    let hwpt_b = need(hwpt_b, "DEVICE_REPLACE")?;
    hc::expect_errno(
        "DESTROY of the attached HWPT",
        hc::destroy(hwpt_b),
        errno::EBUSY,
    )?;
    let hwpt_a = need(hwpt_a, "HWPT_ALLOC")?;
    let ioas_a = need(ioas_a, "IOAS_ALLOC")?;
    hc::ok("DESTROY of the old HWPT", hc::destroy(hwpt_a))?;
    hc::ok("DESTROY of the old IOAS", hc::destroy(ioas_a))
}

/// `DEVICE_UNBIND`: bus mastering is revoked and the device is listed as
/// unbound again.
fn unbind(device: &Device) -> Outcome {
    let edu = device.edu()?;
    let dev = need(device.dev_id, "DEVICE_BIND")?;
    hc::ok("DEVICE_UNBIND", hc::device_unbind(dev))?;
    let command = edu.function.command();
    if command & COMMAND_BUS_MASTER != 0 {
        return fail!("COMMAND reads {command:#x}: bus mastering survived DEVICE_UNBIND");
    }
    let mut list = [sluice_abi::DeviceInfo::default(); 16];
    let n = hc::device_list(&mut list)?;
    match list[..n].iter().find(|d| d.guest_bdf == edu.function.bdf) {
        Some(d) if d.dev_id == 0 => Ok(()),
        Some(d) => fail!(
            "still listed as bound (dev_id {}) after DEVICE_UNBIND",
            d.dev_id
        ),
        None => fail!("the edu disappeared from DEVICE_LIST"),
    }
}

/// The victim page, filled with its pattern and mapped at `VICTIM_IOVA`
/// in IOAS A.
fn publish_victim(ioas: u32) -> Outcome {
    fill(VICTIM_GPA, PAGE as usize, victim_byte);
    hc::ioas_map(ioas, VICTIM_GPA, PAGE, VICTIM_IOVA)?;
    Ok(())
}

/// IOAS A is gone by now: the victim page is mapped again at
/// `VICTIM_IOVA` in IOAS B (which keeps its HWPT), and still holds its
/// pattern: nothing, the attacker included, wrote to it. Sluice checks the
/// same from the host once every VM has ended.
fn keep_victim(ioas_b: Option<u32>) -> Outcome {
    let ioas = need(ioas_b, "the second IOAS")?;
    hc::ioas_map(ioas, VICTIM_GPA, PAGE, VICTIM_IOVA)?;
    check("victim", VICTIM_GPA, PAGE as usize, victim_byte)?;
    Ok(())
}
