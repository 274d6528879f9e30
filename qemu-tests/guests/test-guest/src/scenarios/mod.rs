//! The scenarios, chosen by the `args=` word, and what they share.

mod attacker;
mod dma;
mod hostile;
#[cfg(target_arch = "aarch64")]
mod trapped;

use sluice_abi::{self as abi, fault_flags, fault_reason};

use crate::console::{Outcome, Reason, Report, fail};
use crate::edu::Edu;
use crate::hypercall::{self as hc};
use crate::layout::{BUFFER_GPA, BUFFER_PAGES, CANARY_GPA, PAGE, VICTIM_GPA};
use crate::pci::COMMAND_BUS_MASTER;
use crate::start_info::StartInfo;

pub const NAMES: &str = "dma, attacker, hostile";

pub fn run(info: &StartInfo, report: &mut Report) {
    let scenario: fn(&StartInfo, &mut Report) = match info.args() {
        "dma" => dma::run,
        "attacker" => attacker::run,
        "hostile" => hostile::run,
        other => {
            report.fail(
                "scenario",
                format_args!("unknown scenario `{other}` (args= must be one of: {NAMES})"),
            );
            return;
        }
    };
    report.pass("scenario");
    report.step("hypervisor", hypervisor(info));
    report.step("memory-map", memory_map(info));
    scenario(info, report);
}

/// Sluice's CPUID leaves and the hypercall ABI version agree.
fn hypervisor(info: &StartInfo) -> Outcome {
    if info.abi_version != 1 {
        return fail!(
            "start info: hypercall ABI version {}, this guest speaks 1",
            info.abi_version
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        let [max, b, c, d] = crate::arch::cpuid(0x4000_0000);
        let mut signature = [0u8; 12];
        signature[..4].copy_from_slice(&b.to_le_bytes());
        signature[4..8].copy_from_slice(&c.to_le_bytes());
        signature[8..].copy_from_slice(&d.to_le_bytes());
        if &signature != b"SluiceSluice" || max < 0x4000_0001 {
            return fail!("CPUID 0x40000000: signature {signature:?}, max leaf {max:#x}");
        }
        let [version, ..] = crate::arch::cpuid(0x4000_0001);
        if version != info.abi_version {
            return fail!(
                "CPUID 0x40000001 says ABI version {version}, the start info {}",
                info.abi_version
            );
        }
    }
    Ok(())
}

/// The fixed buffers are free RAM of this VM.
fn memory_map(info: &StartInfo) -> Outcome {
    for (name, gpa, pages) in [
        ("buffer", BUFFER_GPA, BUFFER_PAGES),
        ("canary", CANARY_GPA, 1),
        ("victim", VICTIM_GPA, 1),
    ] {
        if !info.is_free_ram(gpa, pages * PAGE) {
            return fail!(
                "the {name} page {gpa:#x} is not free RAM (RAM ends at {:#x}; give the VM at least {} MiB)",
                info.ram_end(),
                crate::layout::MIN_RAM >> 20
            );
        }
    }
    Ok(())
}

/// Fills `len` bytes at `gpa` with `pattern(i)`.
pub fn fill(gpa: u64, len: usize, pattern: impl Fn(usize) -> u8) {
    for i in 0..len {
        // SAFETY: callers pass the fixed buffers, checked to be free RAM of
        // this VM (identity-mapped); volatile because devices read them.
        unsafe { ((gpa as usize + i) as *mut u8).write_volatile(pattern(i)) };
    }
}

/// Checks `len` bytes at `gpa` against `pattern(i)`.
pub fn check(what: &str, gpa: u64, len: usize, pattern: impl Fn(usize) -> u8) -> Outcome {
    for i in 0..len {
        // SAFETY: as `fill`; volatile because devices write them.
        let got = unsafe { ((gpa as usize + i) as *const u8).read_volatile() };
        if got != pattern(i) {
            return fail!(
                "{what}: byte {i} at {:#x} is {got:#04x}, expected {:#04x}",
                gpa + i as u64,
                pattern(i)
            );
        }
    }
    Ok(())
}

/// A byte pattern per seed, different for every seed and position.
pub fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8
}

pub fn need<T: Copy>(value: Option<T>, what: &str) -> Result<T, Reason> {
    match value {
        Some(v) => Ok(v),
        None => fail!("not run: {what} failed earlier"),
    }
}

/// Empties the fault queue (records from earlier steps).
pub fn drain_faults(fault_id: u32) -> Outcome {
    let mut records = [abi::FaultRecord::default(); 8];
    for _ in 0..64 {
        let (n, _) = hc::fault_read(fault_id, &mut records)?;
        if n == 0 {
            return Ok(());
        }
    }
    fail!("fault queue {fault_id} does not empty")
}

/// No fault was reported since the queue was drained.
pub fn expect_no_fault(fault_id: u32) -> Outcome {
    let mut records = [abi::FaultRecord::default(); 4];
    let (n, overflow) = hc::fault_read(fault_id, &mut records)?;
    if n > 0 || overflow > 0 {
        let r = records[0];
        return fail!(
            "unexpected DMA fault: {n} record(s), first dev {} iova {:#x} reason {}, overflow {overflow}",
            r.dev_id,
            r.iova,
            r.reason
        );
    }
    Ok(())
}

/// A fault record of `dev_id` at `iova`'s page arrives in the queue, with
/// the WRITE flag as `write` and a not-present or permission reason (an
/// unmapped IOVA is either, depending on the IOMMU's encoding). Records of
/// other addresses are skipped.
pub fn expect_fault(fault_id: u32, dev_id: u32, iova: u64, write: bool) -> Outcome {
    let mut records = [abi::FaultRecord::default(); 8];
    let mut others = 0u32;
    let mut first_other = None;
    // Faults are collected at FAULT_READ; a few reads cover a slow report.
    for _ in 0..200 {
        let (n, _) = hc::fault_read(fault_id, &mut records)?;
        for r in &records[..n] {
            if r.dev_id == dev_id && r.iova & !(PAGE - 1) == iova & !(PAGE - 1) {
                if (r.flags & fault_flags::WRITE != 0) != write {
                    return fail!(
                        "fault at {:#x} has flags {:#x}: the access was a {}",
                        r.iova,
                        r.flags,
                        if write { "write" } else { "read" }
                    );
                }
                if r.flags & fault_flags::PASID_VALID != 0 {
                    return fail!("fault at {:#x} claims PASID {}", r.iova, r.pasid);
                }
                if !matches!(
                    r.reason,
                    fault_reason::NOT_PRESENT | fault_reason::PERMISSION
                ) {
                    return fail!("fault at {:#x} has reason {}", r.iova, r.reason);
                }
                return Ok(());
            }
            others += 1;
            first_other.get_or_insert(*r);
        }
        for _ in 0..10_000 {
            crate::arch::relax();
        }
    }
    match first_other {
        Some(r) => fail!(
            "no fault record for device {dev_id} at {iova:#x}; {others} other(s), first device {} at {:#x}",
            r.dev_id,
            r.iova
        ),
        None => fail!(
            "no fault record for device {dev_id} at {iova:#x} (queue {fault_id} stayed empty)"
        ),
    }
}

/// The edu, found and checked, and the device setup `dma` and `attacker`
/// share.
pub struct Device {
    pub edu: Option<Edu>,
    pub dev_id: Option<u32>,
    pub fault_id: Option<u32>,
}

impl Device {
    pub fn find(info: &StartInfo, report: &mut Report) -> Device {
        let edu = match Edu::find(info, 0) {
            Ok(edu) => {
                report.pass("find-edu");
                Some(edu)
            }
            Err(why) => {
                report.fail("find-edu", why);
                None
            }
        };
        let device = Device {
            edu,
            dev_id: None,
            fault_id: None,
        };
        let outcome = device.busmaster_refused_before_bind();
        report.step("busmaster-before-bind", outcome);
        device
    }

    fn edu(&self) -> Result<&Edu, Reason> {
        self.edu
            .as_ref()
            .ok_or_else(|| Reason::new(format_args!("not run: no edu")))
    }

    /// Sluice refuses bus mastering while the device is not bound.
    fn busmaster_refused_before_bind(&self) -> Outcome {
        let edu = self.edu()?;
        let command = edu.function.set_command(COMMAND_BUS_MASTER, true);
        if command & COMMAND_BUS_MASTER != 0 {
            return fail!("COMMAND reads {command:#x}: bus mastering on before DEVICE_BIND");
        }
        Ok(())
    }

    /// `DEVICE_LIST` shows the edu, unbound, in the start info's group.
    pub fn listed(&self) -> Outcome {
        let edu = self.edu()?;
        let mut list = [abi::DeviceInfo::default(); 16];
        let n = hc::device_list(&mut list)?;
        let Some(d) = list[..n].iter().find(|d| d.guest_bdf == edu.function.bdf) else {
            return fail!(
                "edu at BDF {:#x} is not among the {n} listed devices",
                edu.function.bdf
            );
        };
        if d.group_id != edu.group {
            return fail!(
                "DEVICE_LIST group {} differs from the start info's {}",
                d.group_id,
                edu.group
            );
        }
        if d.dev_id != 0 {
            return fail!(
                "edu is listed as bound (dev_id {}) before DEVICE_BIND",
                d.dev_id
            );
        }
        Ok(())
    }

    /// `DEVICE_BIND`: the device ID, and the group with the edu in it.
    pub fn bind(&mut self) -> Outcome {
        let edu = self.edu()?;
        let mut group = [0u32; 8];
        let (ret, b) = hc::device_bind_raw(edu.function.bdf, &mut group);
        hc::ok("DEVICE_BIND", ret)?;
        if b.out_dev_id == 0 {
            return fail!("DEVICE_BIND returned device ID 0");
        }
        if b.out_group_id != edu.group {
            return fail!(
                "bound in group {}, the start info says {}",
                b.out_group_id,
                edu.group
            );
        }
        let members = (b.num_group_devices as usize).min(group.len());
        if !group[..members].contains(&edu.function.bdf) {
            return fail!(
                "the group's {} BDFs do not include the edu's",
                b.num_group_devices
            );
        }
        self.dev_id = Some(b.out_dev_id);
        Ok(())
    }

    /// Bus mastering goes on once bound.
    pub fn enable_busmaster(&self) -> Outcome {
        let edu = self.edu()?;
        need(self.dev_id, "DEVICE_BIND")?;
        let command = edu.function.set_command(COMMAND_BUS_MASTER, true);
        if command & COMMAND_BUS_MASTER == 0 {
            return fail!("COMMAND reads {command:#x} after setting bus master on a bound device");
        }
        Ok(())
    }

    pub fn alloc_fault_queue(&mut self) -> Outcome {
        self.fault_id = Some(hc::fault_queue_alloc()?);
        Ok(())
    }

    /// A HWPT on `ioas` reporting to the fault queue, and the RID attached
    /// to it; the HWPT.
    pub fn attach(&self, ioas: Option<u32>) -> Result<u32, Reason> {
        let ioas = need(ioas, "IOAS_ALLOC")?;
        let dev = need(self.dev_id, "DEVICE_BIND")?;
        let fault = need(self.fault_id, "FAULT_QUEUE_ALLOC")?;
        let hwpt = hc::hwpt_alloc(dev, ioas, fault)?;
        let used = hc::attach(sluice_abi::cmd::DEVICE_ATTACH, dev, hwpt)?;
        if used != hwpt {
            return fail!("DEVICE_ATTACH to HWPT {hwpt} reports HWPT {used}");
        }
        Ok(hwpt)
    }

    /// RAM at `src_iova` → edu → RAM at `dst_iova`: `dst_gpa` (what
    /// `dst_iova` maps) must then hold the pattern put at `src_gpa`, and
    /// no fault is reported.
    pub fn round_trip(&self, seed: u8, src: (u64, u64), dst: (u64, u64)) -> Outcome {
        use crate::edu::Direction;
        use crate::layout::TRANSFER;
        let edu = self.edu()?;
        let fault = need(self.fault_id, "FAULT_QUEUE_ALLOC")?;
        drain_faults(fault)?;
        fill(src.0, TRANSFER, pattern(seed));
        fill(dst.0, PAGE as usize, |_| 0xa5);
        edu.dma(Direction::ToDevice, src.1)?;
        edu.dma(Direction::ToRam, dst.1)?;
        expect_no_fault(fault)?;
        check("DMA target", dst.0, TRANSFER, pattern(seed))?;
        // Nothing beyond the transfer was written.
        check(
            "past the DMA target",
            dst.0 + TRANSFER as u64,
            PAGE as usize - TRANSFER,
            |_| 0xa5,
        )
    }

    /// edu → RAM at `iova` must fault (a write by the device) and leave
    /// every `(gpa, byte)` page as it was.
    pub fn blocked_write(&self, iova: u64, untouched: &[u64], record: bool) -> Outcome {
        use crate::edu::Direction;
        let edu = self.edu()?;
        let expected = if record {
            let fault = need(self.fault_id, "FAULT_QUEUE_ALLOC")?;
            drain_faults(fault)?;
            Some((fault, need(self.dev_id, "DEVICE_BIND")?))
        } else {
            None
        };
        for (i, &gpa) in untouched.iter().enumerate() {
            fill(gpa, PAGE as usize, pattern(0x80 + i as u8));
        }
        edu.dma(Direction::ToRam, iova)?;
        if let Some((fault, dev)) = expected {
            expect_fault(fault, dev, iova, true)?;
        }
        for (i, &gpa) in untouched.iter().enumerate() {
            check(
                "memory the DMA must not reach",
                gpa,
                PAGE as usize,
                pattern(0x80 + i as u8),
            )?;
        }
        Ok(())
    }
}
