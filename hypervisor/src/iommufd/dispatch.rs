//! The hypercall boundary: argument structs in guest memory in, errno out.
//!
//! Everything a guest passes is hostile until checked here: the struct
//! `size`, flags and reserved fields follow the rules of
//! [`sluice_abi`]; arrays are copied in with bounds; errors become
//! `-errno` only in [`Iommufd::dispatch`].

use alloc::vec::Vec;

use sluice_abi::{self as abi, AbiStruct, attach_flags, cmd, hwpt_flags, map_flags, option};

use super::{Error, GuestMemory, IommuBackend, Iommufd, Prot, VmId};

/// Largest `size` accepted: bytes beyond the known struct are checked for
/// zero, and this bounds that work (a bigger `size` → `E2BIG`).
pub const MAX_ARGUMENT_SIZE: u32 = 4096;

/// Largest array (of IOVA ranges, devices, fault records) copied per call.
pub const MAX_ARRAY_ENTRIES: u32 = 4096;

/// An argument struct read from the guest, with the `size` it declared.
struct Arg<T> {
    value: T,
    size: u32,
    gpa: u64,
}

fn read_arg<T: AbiStruct>(mem: &dyn GuestMemory, gpa: u64) -> Result<Arg<T>, Error> {
    let mut raw = [0u8; 4];
    mem.read(gpa, &mut raw)?;
    let size = u32::from_le_bytes(raw);
    if (size as usize) < T::MIN_SIZE {
        return Err(Error::ArgumentTooSmall);
    }
    if size > MAX_ARGUMENT_SIZE {
        return Err(Error::ArgumentTooBig);
    }
    gpa.checked_add(u64::from(size))
        .ok_or(Error::GuestMemory(super::GuestMemoryError::Overflow))?;
    let mut known_bytes = [0u8; 64];
    let known = T::SIZE.min(known_bytes.len()).min(size as usize);
    mem.read(gpa, &mut known_bytes[..known])?;
    // Bytes beyond what this ABI version knows must be zero.
    let mut buf = [0u8; 64];
    let mut offset = T::SIZE as u64;
    while offset < u64::from(size) {
        let n = (u64::from(size) - offset).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        mem.read(gpa + offset, chunk)?;
        if chunk.iter().any(|&b| b != 0) {
            return Err(Error::ArgumentTooBig);
        }
        offset += n as u64;
    }
    Ok(Arg {
        value: T::decode(&known_bytes[..known]),
        size,
        gpa,
    })
}

fn write_back<T: AbiStruct>(mem: &dyn GuestMemory, arg: &Arg<T>) -> Result<(), Error> {
    let mut buf = [0u8; 64];
    let n = T::SIZE.min(arg.size as usize).min(buf.len());
    arg.value.encode(&mut buf[..n]);
    mem.write(arg.gpa, &buf[..n])?;
    Ok(())
}

fn read_array<T: AbiStruct>(mem: &dyn GuestMemory, gpa: u64, count: u32) -> Result<Vec<T>, Error> {
    if count > MAX_ARRAY_ENTRIES {
        return Err(Error::QuotaExceeded("array too long"));
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..u64::from(count) {
        let at = (T::SIZE as u64)
            .checked_mul(i)
            .and_then(|off| gpa.checked_add(off))
            .ok_or(Error::GuestMemory(super::GuestMemoryError::Overflow))?;
        mem.read(at, &mut buf[..T::SIZE])?;
        out.push(T::decode(&buf[..T::SIZE]));
    }
    Ok(out)
}

fn write_array<T: AbiStruct>(mem: &dyn GuestMemory, gpa: u64, items: &[T]) -> Result<(), Error> {
    let mut buf = [0u8; 64];
    for (i, item) in items.iter().enumerate() {
        let at = (T::SIZE as u64)
            .checked_mul(i as u64)
            .and_then(|off| gpa.checked_add(off))
            .ok_or(Error::GuestMemory(super::GuestMemoryError::Overflow))?;
        item.encode(&mut buf[..T::SIZE]);
        mem.write(at, &buf[..T::SIZE])?;
    }
    Ok(())
}

fn check_flags(flags: u32, known: u32) -> Result<(), Error> {
    if flags & !known != 0 {
        Err(Error::UnsupportedFlags)
    } else {
        Ok(())
    }
}

fn check_reserved(values: &[u64]) -> Result<(), Error> {
    if values.iter().any(|&v| v != 0) {
        Err(Error::ReservedNotZero)
    } else {
        Ok(())
    }
}

fn map_prot(flags: u32) -> Prot {
    Prot {
        read: flags & map_flags::READABLE != 0,
        write: flags & map_flags::WRITEABLE != 0,
        mmio: false,
    }
}

const MAP_FLAGS: u32 = map_flags::FIXED_IOVA | map_flags::WRITEABLE | map_flags::READABLE;

impl<B: IommuBackend> Iommufd<B> {
    /// Runs one hypercall of `vm`: `command` with its argument struct at
    /// guest-physical `arg_gpa` in `mem`. Returns 0 (or a documented
    /// non-negative value) on success, `-errno` on failure.
    pub fn dispatch(&mut self, vm: VmId, mem: &dyn GuestMemory, command: u64, arg_gpa: u64) -> i64 {
        match self.run(vm, mem, command, arg_gpa) {
            Ok(v) => v,
            Err(e) => {
                log::debug!(
                    "VM {}: hypercall {:#x} failed with {}: {:?}",
                    vm.0,
                    command,
                    abi::errno::name(e.errno()),
                    e
                );
                -e.errno()
            }
        }
    }

    fn run(
        &mut self,
        vm: VmId,
        mem: &dyn GuestMemory,
        command: u64,
        gpa: u64,
    ) -> Result<i64, Error> {
        match command {
            cmd::DESTROY => {
                let a = read_arg::<abi::Destroy>(mem, gpa)?;
                self.destroy(vm, a.value.id)?;
            }
            cmd::IOAS_ALLOC => {
                let mut a = read_arg::<abi::IoasAlloc>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                a.value.out_ioas_id = self.ioas_alloc(vm)?;
                if let Err(e) = write_back(mem, &a) {
                    let _ = self.destroy(vm, a.value.out_ioas_id);
                    return Err(e);
                }
            }
            cmd::IOAS_MAP => {
                let mut a = read_arg::<abi::IoasMap>(mem, gpa)?;
                let m = a.value;
                check_flags(m.flags, MAP_FLAGS)?;
                check_reserved(&[m.reserved.into()])?;
                let fixed = (m.flags & map_flags::FIXED_IOVA != 0).then_some(m.iova);
                let iova = self.ioas_map(
                    vm,
                    mem,
                    m.ioas_id,
                    m.addr,
                    m.length,
                    fixed,
                    map_prot(m.flags),
                )?;
                a.value.iova = iova;
                if let Err(e) = write_back(mem, &a) {
                    let _ = self.ioas_unmap(vm, m.ioas_id, iova, m.length);
                    return Err(e);
                }
            }
            cmd::IOAS_UNMAP => {
                let mut a = read_arg::<abi::IoasUnmap>(mem, gpa)?;
                let u = a.value;
                a.value.length = self.ioas_unmap(vm, u.ioas_id, u.iova, u.length)?;
                // The unmap happened; a failed write-back cannot undo it.
                write_back(mem, &a)?;
            }
            cmd::IOAS_COPY => {
                let mut a = read_arg::<abi::IoasCopy>(mem, gpa)?;
                let c = a.value;
                check_flags(c.flags, MAP_FLAGS)?;
                let fixed = (c.flags & map_flags::FIXED_IOVA != 0).then_some(c.dst_iova);
                let iova = self.ioas_copy(
                    vm,
                    c.dst_ioas_id,
                    c.src_ioas_id,
                    c.src_iova,
                    c.length,
                    fixed,
                    map_prot(c.flags),
                )?;
                a.value.dst_iova = iova;
                if let Err(e) = write_back(mem, &a) {
                    let _ = self.ioas_unmap(vm, c.dst_ioas_id, iova, c.length);
                    return Err(e);
                }
            }
            cmd::IOAS_IOVA_RANGES => {
                let mut a = read_arg::<abi::IoasIovaRanges>(mem, gpa)?;
                check_reserved(&[a.value.reserved.into()])?;
                let (ranges, alignment) = self.ioas_iova_ranges(vm, a.value.ioas_id)?;
                let fit = ranges.len().min(a.value.num_iovas as usize);
                let items: Vec<abi::IovaRange> = ranges[..fit]
                    .iter()
                    .map(|&(start, last)| abi::IovaRange { start, last })
                    .collect();
                write_array(mem, a.value.allowed_iovas, &items)?;
                let too_small = ranges.len() > a.value.num_iovas as usize;
                a.value.num_iovas = ranges.len() as u32;
                a.value.out_iova_alignment = alignment;
                write_back(mem, &a)?;
                if too_small {
                    return Err(Error::BufferTooSmall {
                        needed: ranges.len() as u32,
                    });
                }
            }
            cmd::IOAS_ALLOW_IOVAS => {
                let a = read_arg::<abi::IoasAllowIovas>(mem, gpa)?;
                check_reserved(&[a.value.reserved.into()])?;
                let ranges =
                    read_array::<abi::IovaRange>(mem, a.value.allowed_iovas, a.value.num_iovas)?;
                let spans = ranges.iter().map(|r| (r.start, r.last)).collect();
                self.ioas_allow_iovas(vm, a.value.ioas_id, spans)?;
            }
            cmd::OPTION => {
                let mut a = read_arg::<abi::IommuOption>(mem, gpa)?;
                let o = a.value;
                check_reserved(&[o.reserved.into()])?;
                let set = match o.op {
                    option::OP_SET => Some(o.val64),
                    option::OP_GET => None,
                    _ => return Err(Error::NotSupported("unknown OPTION op")),
                };
                match o.option_id {
                    option::HUGE_PAGES => {
                        a.value.val64 = self.ioas_huge_pages(vm, o.object_id, set)?;
                    }
                    _ => return Err(Error::NotSupported("unknown option")),
                }
                write_back(mem, &a)?;
            }
            cmd::HWPT_ALLOC => {
                let mut a = read_arg::<abi::HwptAlloc>(mem, gpa)?;
                let h = a.value;
                check_flags(
                    h.flags,
                    hwpt_flags::NEST_PARENT
                        | hwpt_flags::DIRTY_TRACKING
                        | hwpt_flags::FAULT_ID_VALID
                        | hwpt_flags::PASID,
                )?;
                check_reserved(&[h.reserved.into(), h.reserved2.into()])?;
                if h.flags & (hwpt_flags::NEST_PARENT | hwpt_flags::DIRTY_TRACKING) != 0 {
                    return Err(Error::NotSupported("nesting and dirty tracking"));
                }
                if h.data_type != abi::HWPT_DATA_NONE {
                    return Err(Error::NotSupported("HWPT data types other than NONE"));
                }
                if h.data_len != 0 || h.data_uptr != 0 {
                    return Err(Error::Invalid("data with data type NONE"));
                }
                let fault = (h.flags & hwpt_flags::FAULT_ID_VALID != 0).then_some(h.fault_id);
                let id = self.hwpt_alloc(
                    vm,
                    h.dev_id,
                    h.pt_id,
                    h.flags & hwpt_flags::PASID != 0,
                    fault,
                )?;
                a.value.out_hwpt_id = id;
                if let Err(e) = write_back(mem, &a) {
                    let _ = self.destroy(vm, id);
                    return Err(e);
                }
            }
            cmd::GET_HW_INFO => {
                let mut a = read_arg::<abi::HwInfo>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                check_reserved(&[a.value.reserved0.into(), a.value.reserved1.into()])?;
                let info = self.hw_info(vm, a.value.dev_id)?;
                a.value.data_len = 0;
                a.value.out_data_type = abi::HW_INFO_TYPE_NONE;
                a.value.out_max_pasid_log2 = info.max_pasid_log2;
                a.value.out_capabilities = info.capabilities;
                write_back(mem, &a)?;
            }
            cmd::FAULT_QUEUE_ALLOC => {
                let mut a = read_arg::<abi::FaultAlloc>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                let id = self.fault_queue_alloc(vm)?;
                a.value.out_fault_id = id;
                a.value.out_reserved = 0;
                if let Err(e) = write_back(mem, &a) {
                    let _ = self.destroy(vm, id);
                    return Err(e);
                }
            }
            cmd::DEVICE_LIST => {
                let mut a = read_arg::<abi::DeviceList>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                check_reserved(&[a.value.reserved.into()])?;
                let devices = self.device_list(vm)?;
                let fit = devices.len().min(a.value.num_devices as usize);
                let items: Vec<abi::DeviceInfo> = devices[..fit]
                    .iter()
                    .map(|d| abi::DeviceInfo {
                        guest_bdf: d.guest_bdf,
                        group_id: d.group,
                        dev_id: d.dev_id,
                        max_pasid_log2: d.max_pasid_log2,
                        reserved0: 0,
                        reserved1: 0,
                        capabilities: d.capabilities,
                    })
                    .collect();
                write_array(mem, a.value.devices, &items)?;
                let too_small = devices.len() > a.value.num_devices as usize;
                a.value.num_devices = devices.len() as u32;
                write_back(mem, &a)?;
                if too_small {
                    return Err(Error::BufferTooSmall {
                        needed: devices.len() as u32,
                    });
                }
            }
            cmd::DEVICE_BIND => {
                let mut a = read_arg::<abi::DeviceBind>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                let b = match self.device_bind(vm, a.value.guest_bdf, a.value.num_group_devices) {
                    Ok(b) => b,
                    Err(Error::BufferTooSmall { needed }) => {
                        a.value.num_group_devices = needed;
                        write_back(mem, &a)?;
                        return Err(Error::BufferTooSmall { needed });
                    }
                    Err(e) => return Err(e),
                };
                a.value.out_dev_id = b.dev_id;
                a.value.out_group_id = b.group;
                a.value.num_group_devices = b.group_bdfs.len() as u32;
                let mut bytes = Vec::with_capacity(b.group_bdfs.len() * 4);
                for bdf in &b.group_bdfs {
                    bytes.extend_from_slice(&bdf.to_le_bytes());
                }
                let written = mem
                    .write(a.value.group_devices, &bytes)
                    .map_err(Error::from)
                    .and_then(|()| write_back(mem, &a));
                if let Err(e) = written {
                    let _ = self.device_unbind(vm, b.dev_id);
                    return Err(e);
                }
            }
            cmd::DEVICE_UNBIND => {
                let a = read_arg::<abi::DeviceUnbind>(mem, gpa)?;
                self.device_unbind(vm, a.value.dev_id)?;
            }
            cmd::DEVICE_ATTACH | cmd::DEVICE_REPLACE => {
                let mut a = read_arg::<abi::DeviceAttach>(mem, gpa)?;
                let d = a.value;
                check_flags(d.flags, attach_flags::PASID)?;
                let pasid = (d.flags & attach_flags::PASID != 0).then_some(d.pasid);
                if pasid.is_none() && d.pasid != 0 {
                    return Err(Error::Invalid("pasid given without the PASID flag"));
                }
                let h = if command == cmd::DEVICE_ATTACH {
                    self.device_attach(vm, d.dev_id, pasid, d.pt_id)?
                } else {
                    self.device_replace(vm, d.dev_id, pasid, d.pt_id)?
                };
                a.value.out_hwpt_id = h;
                write_back(mem, &a)?;
            }
            cmd::DEVICE_DETACH => {
                let a = read_arg::<abi::DeviceDetach>(mem, gpa)?;
                let d = a.value;
                check_flags(d.flags, attach_flags::PASID)?;
                let pasid = (d.flags & attach_flags::PASID != 0).then_some(d.pasid);
                if pasid.is_none() && d.pasid != 0 {
                    return Err(Error::Invalid("pasid given without the PASID flag"));
                }
                self.device_detach(vm, d.dev_id, pasid)?;
            }
            cmd::FAULT_READ => {
                let mut a = read_arg::<abi::FaultRead>(mem, gpa)?;
                check_reserved(&[a.value.reserved.into()])?;
                // Collect what the IOMMU recorded since the last interrupt.
                self.process_faults();
                let max = a.value.num_records.min(MAX_ARRAY_ENTRIES);
                let (records, overflow) = self.fault_read(vm, a.value.fault_id, max)?;
                if let Err(e) = write_array(mem, a.value.records, &records) {
                    // Nothing is lost: the records go back to the queue.
                    self.fault_unread(vm, a.value.fault_id, records, overflow);
                    return Err(e);
                }
                a.value.num_records = records.len() as u32;
                a.value.out_overflow = overflow;
                write_back(mem, &a)?;
            }
            cmd::WBINVD_POLICY => {
                let mut a = read_arg::<abi::WbinvdPolicy>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                check_reserved(&[a.value.reserved.into()])?;
                a.value.out_policy = self.wbinvd_policy(vm)?;
                write_back(mem, &a)?;
            }
            cmd::VPASID_SET => {
                let a = read_arg::<abi::VpasidSet>(mem, gpa)?;
                check_flags(a.value.flags, 0)?;
                check_reserved(&[a.value.reserved.into()])?;
                self.vpasid_set(vm, a.value.dev_id, a.value.vpasid, a.value.pasid)?;
            }
            cmd::VPASID_CLEAR => {
                let a = read_arg::<abi::VpasidClear>(mem, gpa)?;
                self.vpasid_clear(vm, a.value.vpasid)?;
            }
            _ => return Err(Error::UnknownCommand),
        }
        Ok(0)
    }
}
