//! The iommufd hypercalls (`docs/hypercalls.md`) with `sluice_abi`'s
//! structs. This guest is identity-mapped, so the address of a local is
//! its guest-physical address.

use sluice_abi::{self as abi, AbiStruct, cmd, errno, hwpt_flags, map_flags};

use crate::arch;
use crate::console::{Reason, fail};

/// Issues `command` with `arg` (its `size` set by the caller).
pub fn call<T: AbiStruct>(command: u64, arg: &mut T) -> i64 {
    arch::hypercall(command, core::ptr::from_mut(arg) as u64)
}

/// A new struct of type `T` with `size` = its full size.
pub fn new<T: AbiStruct>() -> T {
    let mut bytes = [0u8; 64];
    let n = T::SIZE.min(bytes.len());
    bytes[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
    T::decode(&bytes[..n])
}

/// `-errno` as text: `EFAULT (-14)`, or `0`.
pub struct Errno(pub i64);

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 < 0 {
            write!(f, "{} ({})", errno::name(-self.0), self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Success, or a reason naming the call and the errno.
pub fn ok(what: &str, ret: i64) -> Result<(), Reason> {
    if ret == 0 {
        Ok(())
    } else {
        fail!("{what} returned {}", Errno(ret))
    }
}

/// The call must fail with exactly `-expected`.
pub fn expect_errno(what: &str, ret: i64, expected: i64) -> Result<(), Reason> {
    if ret == -expected {
        Ok(())
    } else {
        fail!(
            "{what} returned {}, expected {} (-{expected})",
            Errno(ret),
            errno::name(expected)
        )
    }
}

pub fn ioas_alloc() -> Result<u32, Reason> {
    let mut a: abi::IoasAlloc = new();
    ok("IOAS_ALLOC", call(cmd::IOAS_ALLOC, &mut a))?;
    if a.out_ioas_id == 0 {
        return fail!("IOAS_ALLOC returned object ID 0");
    }
    Ok(a.out_ioas_id)
}

/// `IOAS_MAP` of `[gpa, gpa + length)` at fixed `iova`, readable and
/// writeable; the raw result.
pub fn ioas_map_raw(ioas: u32, gpa: u64, length: u64, iova: u64) -> i64 {
    let mut m: abi::IoasMap = new();
    m.flags = map_flags::FIXED_IOVA | map_flags::READABLE | map_flags::WRITEABLE;
    m.ioas_id = ioas;
    m.addr = gpa;
    m.length = length;
    m.iova = iova;
    call(cmd::IOAS_MAP, &mut m)
}

pub fn ioas_map(ioas: u32, gpa: u64, length: u64, iova: u64) -> Result<(), Reason> {
    ok("IOAS_MAP", ioas_map_raw(ioas, gpa, length, iova))
}

/// `IOAS_UNMAP`; the bytes unmapped.
pub fn ioas_unmap(ioas: u32, iova: u64, length: u64) -> Result<u64, Reason> {
    let mut u: abi::IoasUnmap = new();
    u.ioas_id = ioas;
    u.iova = iova;
    u.length = length;
    ok("IOAS_UNMAP", call(cmd::IOAS_UNMAP, &mut u))?;
    Ok(u.length)
}

pub fn destroy(id: u32) -> i64 {
    let mut d: abi::Destroy = new();
    d.id = id;
    call(cmd::DESTROY, &mut d)
}

/// `DEVICE_LIST` into `out`; the number of devices.
pub fn device_list(out: &mut [abi::DeviceInfo]) -> Result<usize, Reason> {
    let mut l: abi::DeviceList = new();
    l.num_devices = out.len() as u32;
    l.devices = out.as_mut_ptr() as u64;
    ok("DEVICE_LIST", call(cmd::DEVICE_LIST, &mut l))?;
    if l.num_devices as usize > out.len() {
        return fail!(
            "DEVICE_LIST reports {} devices in a {}-entry array",
            l.num_devices,
            out.len()
        );
    }
    Ok(l.num_devices as usize)
}

/// `DEVICE_BIND` of `bdf`, the group's BDFs into `group`; the raw result
/// and the struct as returned.
pub fn device_bind_raw(bdf: u32, group: &mut [u32]) -> (i64, abi::DeviceBind) {
    let mut b: abi::DeviceBind = new();
    b.guest_bdf = bdf;
    b.num_group_devices = group.len() as u32;
    b.group_devices = group.as_mut_ptr() as u64;
    let ret = call(cmd::DEVICE_BIND, &mut b);
    (ret, b)
}

pub fn device_unbind(dev_id: u32) -> i64 {
    let mut u: abi::DeviceUnbind = new();
    u.dev_id = dev_id;
    call(cmd::DEVICE_UNBIND, &mut u)
}

pub fn fault_queue_alloc() -> Result<u32, Reason> {
    let mut f: abi::FaultAlloc = new();
    ok("FAULT_QUEUE_ALLOC", call(cmd::FAULT_QUEUE_ALLOC, &mut f))?;
    if f.out_fault_id == 0 {
        return fail!("FAULT_QUEUE_ALLOC returned object ID 0");
    }
    Ok(f.out_fault_id)
}

/// A paging HWPT on `ioas` for `dev_id` whose faults go to `fault_id`.
pub fn hwpt_alloc(dev_id: u32, ioas: u32, fault_id: u32) -> Result<u32, Reason> {
    let mut h: abi::HwptAlloc = new();
    h.flags = hwpt_flags::FAULT_ID_VALID;
    h.dev_id = dev_id;
    h.pt_id = ioas;
    h.fault_id = fault_id;
    ok("HWPT_ALLOC", call(cmd::HWPT_ALLOC, &mut h))?;
    if h.out_hwpt_id == 0 {
        return fail!("HWPT_ALLOC returned object ID 0");
    }
    Ok(h.out_hwpt_id)
}

/// `DEVICE_ATTACH` or `DEVICE_REPLACE` (`command`) of the RID to `pt_id`;
/// the HWPT used.
pub fn attach(command: u64, dev_id: u32, pt_id: u32) -> Result<u32, Reason> {
    let mut a: abi::DeviceAttach = new();
    a.dev_id = dev_id;
    a.pt_id = pt_id;
    let what = if command == cmd::DEVICE_ATTACH {
        "DEVICE_ATTACH"
    } else {
        "DEVICE_REPLACE"
    };
    ok(what, call(command, &mut a))?;
    Ok(a.out_hwpt_id)
}

pub fn detach(dev_id: u32) -> i64 {
    let mut d: abi::DeviceDetach = new();
    d.dev_id = dev_id;
    call(cmd::DEVICE_DETACH, &mut d)
}

/// `FAULT_READ` of up to `out.len()` records; (records read, overflow).
pub fn fault_read(fault_id: u32, out: &mut [abi::FaultRecord]) -> Result<(usize, u64), Reason> {
    let mut r: abi::FaultRead = new();
    r.fault_id = fault_id;
    r.num_records = out.len() as u32;
    r.records = out.as_mut_ptr() as u64;
    ok("FAULT_READ", call(cmd::FAULT_READ, &mut r))?;
    if r.num_records as usize > out.len() {
        return fail!(
            "FAULT_READ reports {} records for {} slots",
            r.num_records,
            out.len()
        );
    }
    Ok((r.num_records as usize, r.out_overflow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_start_with_their_size() {
        let m: abi::IoasMap = new();
        assert_eq!(m.size, 40);
        assert_eq!(m.flags, 0);
        let b: abi::DeviceBind = new();
        assert_eq!(b.size as usize, abi::DeviceBind::SIZE);
        assert_eq!(format!("{}", Errno(-14)), "EFAULT (-14)");
        assert!(expect_errno("X", -14, errno::EFAULT).is_ok());
        assert_eq!(
            expect_errno("X", 0, errno::EFAULT).unwrap_err().as_str(),
            "X returned 0, expected EFAULT (-14)"
        );
    }
}
