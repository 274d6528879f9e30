//! `hostile`: hypercalls with hostile arguments. Each gets the errno that
//! `docs/hypercalls.md` documents, and the guest (and its hypervisor state)
//! carries on: a valid sequence at the end still works. On aarch64 the
//! guest also executes instructions Sluice traps and does not emulate
//! (`trapped`): each is UNDEFINED for it, and it carries on.

use sluice_abi::{self as abi, AbiStruct, cmd, errno};

use crate::arch;
use crate::console::{Outcome, Report, fail};
use crate::hypercall::{self as hc, expect_errno};
use crate::layout::{BUFFER_GPA, PAGE};
use crate::start_info::StartInfo;

/// Guest-physical address of a scratch argument: the buffer page.
const SCRATCH: u64 = BUFFER_GPA;

fn write_bytes(gpa: u64, bytes: &[u8]) {
    super::fill(gpa, bytes.len(), |i| bytes[i]);
}

/// Writes `value` (encoded, `size` patched) at `gpa` and calls `command`
/// with that GPA.
fn call_at<T: AbiStruct>(command: u64, gpa: u64, value: &T, size: u32) -> i64 {
    let mut bytes = [0u8; 64];
    value.encode(&mut bytes[..T::SIZE]);
    bytes[..4].copy_from_slice(&size.to_le_bytes());
    write_bytes(gpa, &bytes[..T::SIZE]);
    arch::hypercall(command, gpa)
}

pub fn run(info: &StartInfo, report: &mut Report) {
    report.step("arg-unmapped", arg_unmapped(info));
    report.step(
        "arg-in-ecam",
        expect_errno(
            "IOAS_ALLOC at the ECAM window",
            arch::hypercall(cmd::IOAS_ALLOC, info.ecam_base),
            errno::EFAULT,
        ),
    );
    report.step(
        "arg-in-bar-window",
        expect_errno(
            "IOAS_ALLOC in the BAR window",
            arch::hypercall(cmd::IOAS_ALLOC, crate::pci::BAR_WINDOW.0),
            errno::EFAULT,
        ),
    );
    report.step("arg-crosses-ram-end", arg_crosses_ram_end(info));
    report.step("size-too-small", size_too_small());
    report.step("size-trailing-bytes", size_trailing_bytes());
    report.step("size-too-big", size_too_big());
    report.step("unknown-command", unknown_command());
    report.step("unknown-flags", unknown_flags());
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
        "map-overflow",
        super::need(ioas, "IOAS_ALLOC").and_then(map_overflow),
    );
    report.step(
        "unmap-overflow",
        super::need(ioas, "IOAS_ALLOC").and_then(unmap_overflow),
    );
    report.step(
        "array-outside-ram",
        super::need(ioas, "IOAS_ALLOC").and_then(|a| array_outside_ram(info, a)),
    );
    report.step(
        "unknown-object",
        expect_errno("DESTROY of ID 0xdead", hc::destroy(0xdead), errno::ENOENT),
    );
    if let Some(device) = info.devices().first() {
        report.step(
            "bind-hostile-group-array",
            bind_hostile_array(info, device.guest_bdf),
        );
    } else {
        report.info(format_args!(
            "no device assigned: bind-hostile-group-array not run"
        ));
    }
    // aarch64: trapped instructions Sluice does not emulate are UNDEFINED
    // for the guest, which handles them and goes on.
    #[cfg(target_arch = "aarch64")]
    super::trapped::run(report);
    report.step(
        "still-working",
        super::need(ioas, "IOAS_ALLOC").and_then(still_working),
    );
}

/// The argument struct outside the VM's RAM: past its end, and at an
/// address whose `size` read would wrap.
fn arg_unmapped(info: &StartInfo) -> Outcome {
    let past = info.page_past_ram();
    expect_errno(
        "IOAS_ALLOC past the end of RAM",
        arch::hypercall(cmd::IOAS_ALLOC, past),
        errno::EFAULT,
    )?;
    expect_errno(
        "IOAS_ALLOC at 2^64 - 2",
        arch::hypercall(cmd::IOAS_ALLOC, u64::MAX - 1),
        errno::EFAULT,
    )?;
    expect_errno(
        "IOAS_ALLOC at 2^63",
        arch::hypercall(cmd::IOAS_ALLOC, 1 << 63),
        errno::EFAULT,
    )
}

/// `size` readable at the last bytes of RAM, the rest of the struct past
/// the end.
fn arg_crosses_ram_end(info: &StartInfo) -> Outcome {
    let end = info.ram_end();
    if end < PAGE || !info.is_free_ram(end - PAGE, PAGE) {
        return fail!("the last page of RAM ({:#x}) is not free RAM", end - PAGE);
    }
    let at = end - 8;
    let map = abi::IoasMap {
        size: abi::IoasMap::SIZE as u32,
        ..Default::default()
    };
    let mut bytes = [0u8; 8];
    map.encode(&mut bytes);
    write_bytes(at, &bytes);
    expect_errno(
        "IOAS_MAP with its struct across the end of RAM",
        arch::hypercall(cmd::IOAS_MAP, at),
        errno::EFAULT,
    )
}

/// `size` below the struct's minimum: `EINVAL`.
fn size_too_small() -> Outcome {
    let alloc = abi::IoasAlloc::default();
    for size in [0u32, 4, abi::IoasAlloc::SIZE as u32 - 1] {
        let ret = call_at(cmd::IOAS_ALLOC, SCRATCH, &alloc, size);
        expect_errno("IOAS_ALLOC with a short size", ret, errno::EINVAL)?;
    }
    let map = abi::IoasMap::default();
    expect_errno(
        "IOAS_MAP with size 8",
        call_at(cmd::IOAS_MAP, SCRATCH, &map, 8),
        errno::EINVAL,
    )
}

/// `size` beyond the struct: trailing zero bytes are accepted (a newer
/// guest's struct), a non-zero one is `E2BIG`.
fn size_trailing_bytes() -> Outcome {
    let alloc = abi::IoasAlloc::default();
    let size = abi::IoasAlloc::SIZE as u32 + 8;
    write_bytes(
        SCRATCH + abi::IoasAlloc::SIZE as u64,
        &[0, 0, 0, 0, 0, 0, 0, 1],
    );
    let mut bytes = [0u8; 12];
    alloc.encode(&mut bytes);
    bytes[..4].copy_from_slice(&size.to_le_bytes());
    write_bytes(SCRATCH, &bytes);
    expect_errno(
        "IOAS_ALLOC with a non-zero trailing byte",
        arch::hypercall(cmd::IOAS_ALLOC, SCRATCH),
        errno::E2BIG,
    )?;
    write_bytes(SCRATCH + abi::IoasAlloc::SIZE as u64, &[0; 8]);
    hc::ok(
        "IOAS_ALLOC with zero trailing bytes",
        arch::hypercall(cmd::IOAS_ALLOC, SCRATCH),
    )?;
    let mut id = [0u8; 4];
    for (i, b) in id.iter_mut().enumerate() {
        // SAFETY: the scratch page is free RAM of this VM.
        *b = unsafe { ((SCRATCH as usize + 8 + i) as *const u8).read_volatile() };
    }
    let id = u32::from_le_bytes(id);
    if id == 0 {
        return fail!("IOAS_ALLOC with trailing zero bytes wrote no ID");
    }
    hc::ok("DESTROY of that IOAS", hc::destroy(id))
}

/// `size` above 4096: `E2BIG` (Sluice bounds the zero check).
fn size_too_big() -> Outcome {
    write_bytes(SCRATCH, &[0; 64]);
    let ret = call_at(cmd::IOAS_ALLOC, SCRATCH, &abi::IoasAlloc::default(), 4097);
    expect_errno("IOAS_ALLOC with size 4097", ret, errno::E2BIG)
}

/// Unknown commands: `ENOTTY`, whatever the argument.
fn unknown_command() -> Outcome {
    // x86_64 passes all 64 bits of RAX; aarch64 function IDs carry 16.
    let commands: &[u64] = if cfg!(target_arch = "x86_64") {
        &[0, 0x88, 0x8b, 0x8f, 0xff, 0x10a, 0xffff, 1 << 32, u64::MAX]
    } else {
        &[0, 0x88, 0x8b, 0x8f, 0xff, 0x10a, 0xffff]
    };
    for &command in commands {
        let ret = arch::hypercall(command, SCRATCH);
        if ret != -errno::ENOTTY {
            return fail!(
                "command {command:#x} returned {}, expected ENOTTY (-25)",
                hc::Errno(ret)
            );
        }
    }
    Ok(())
}

/// Unknown flag bits: `EOPNOTSUPP`.
fn unknown_flags() -> Outcome {
    let mut alloc: abi::IoasAlloc = hc::new();
    alloc.flags = 1 << 31;
    expect_errno(
        "IOAS_ALLOC with flag bit 31",
        hc::call(cmd::IOAS_ALLOC, &mut alloc),
        errno::EOPNOTSUPP,
    )
}

/// `iova + length` and `addr + length` wrapping, and all-ones lengths:
/// `EOVERFLOW`; a non-zero reserved field: `EOPNOTSUPP`.
fn map_overflow(ioas: u32) -> Outcome {
    let top = u64::MAX - PAGE + 1;
    let ret = hc::ioas_map_raw(ioas, BUFFER_GPA, 2 * PAGE, top);
    expect_errno(
        "IOAS_MAP with iova + length wrapping",
        ret,
        errno::EOVERFLOW,
    )?;
    let ret = hc::ioas_map_raw(ioas, top, 2 * PAGE, 0x100_0000);
    expect_errno(
        "IOAS_MAP with addr + length wrapping",
        ret,
        errno::EOVERFLOW,
    )?;
    let ret = hc::ioas_map_raw(ioas, BUFFER_GPA, u64::MAX, 0x100_0000);
    expect_errno("IOAS_MAP with length 2^64 - 1", ret, errno::EOVERFLOW)?;
    let mut m: abi::IoasMap = hc::new();
    m.flags = sluice_abi::map_flags::FIXED_IOVA | sluice_abi::map_flags::READABLE;
    m.ioas_id = ioas;
    m.reserved = 1;
    m.addr = BUFFER_GPA;
    m.length = PAGE;
    m.iova = 0x100_0000;
    expect_errno(
        "IOAS_MAP with reserved = 1",
        hc::call(cmd::IOAS_MAP, &mut m),
        errno::EOPNOTSUPP,
    )
}

fn unmap_overflow(ioas: u32) -> Outcome {
    for (iova, length) in [(u64::MAX - PAGE + 1, 2 * PAGE), (PAGE, u64::MAX - 1)] {
        let mut u: abi::IoasUnmap = hc::new();
        u.ioas_id = ioas;
        u.iova = iova;
        u.length = length;
        expect_errno(
            "IOAS_UNMAP with iova + length wrapping",
            hc::call(cmd::IOAS_UNMAP, &mut u),
            errno::EOVERFLOW,
        )?;
    }
    Ok(())
}

/// An array the struct points to outside RAM: `EFAULT`.
fn array_outside_ram(info: &StartInfo, ioas: u32) -> Outcome {
    let mut a: abi::IoasAllowIovas = hc::new();
    a.ioas_id = ioas;
    a.num_iovas = 1;
    a.allowed_iovas = info.ecam_base;
    expect_errno(
        "IOAS_ALLOW_IOVAS reading its array from the ECAM window",
        hc::call(cmd::IOAS_ALLOW_IOVAS, &mut a),
        errno::EFAULT,
    )?;
    let mut r: abi::IoasIovaRanges = hc::new();
    r.ioas_id = ioas;
    r.num_iovas = 4;
    r.allowed_iovas = info.page_past_ram();
    expect_errno(
        "IOAS_IOVA_RANGES writing its array past RAM",
        hc::call(cmd::IOAS_IOVA_RANGES, &mut r),
        errno::EFAULT,
    )
}

/// `DEVICE_BIND` whose group array is in the ECAM window (`EFAULT`) or too
/// small (`EMSGSIZE` with the count): the device stays unbound each time.
fn bind_hostile_array(_info: &StartInfo, bdf: u32) -> Outcome {
    let mut b: abi::DeviceBind = hc::new();
    b.guest_bdf = bdf;
    b.num_group_devices = 4;
    b.group_devices = 0xe000_0000;
    expect_errno(
        "DEVICE_BIND with its group array in the ECAM window",
        hc::call(cmd::DEVICE_BIND, &mut b),
        errno::EFAULT,
    )?;
    unbound(bdf)?;
    let mut b: abi::DeviceBind = hc::new();
    b.guest_bdf = bdf;
    b.num_group_devices = 0;
    expect_errno(
        "DEVICE_BIND with no room for the group",
        hc::call(cmd::DEVICE_BIND, &mut b),
        errno::EMSGSIZE,
    )?;
    if b.num_group_devices == 0 {
        return fail!("DEVICE_BIND with EMSGSIZE did not report the group size");
    }
    unbound(bdf)
}

fn unbound(bdf: u32) -> Outcome {
    let mut list = [abi::DeviceInfo::default(); 16];
    let n = hc::device_list(&mut list)?;
    match list[..n].iter().find(|d| d.guest_bdf == bdf) {
        Some(d) if d.dev_id == 0 => Ok(()),
        Some(d) => fail!(
            "a failed DEVICE_BIND left BDF {bdf:#x} bound (dev_id {})",
            d.dev_id
        ),
        None => fail!("BDF {bdf:#x} is not in DEVICE_LIST"),
    }
}

/// After all that, ordinary calls still work: map, unmap, destroy.
fn still_working(ioas: u32) -> Outcome {
    hc::ioas_map(ioas, BUFFER_GPA, PAGE, 0x100_0000)?;
    let bytes = hc::ioas_unmap(ioas, 0x100_0000, PAGE)?;
    if bytes != PAGE {
        return fail!("IOAS_UNMAP removed {bytes:#x} bytes, expected {PAGE:#x}");
    }
    hc::ok("DESTROY", hc::destroy(ioas))
}
