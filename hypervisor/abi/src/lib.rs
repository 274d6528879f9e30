//! The Sluice hypercall ABI.
//!
//! A guest (its kernel or a user-space driver inside it) manages the DMA of
//! the devices assigned to it through an iommufd-style interface. This crate
//! is everything a guest needs to speak it: command numbers ([`cmd`]), the
//! argument structs, the errno values ([`errno`]) and the register convention
//! ([`regs`]). It has no dependencies and builds for any target.
//!
//! # General argument format
//!
//! Every command takes one argument: the guest-physical address of a struct
//! whose first `u32` is `size`, the number of bytes the caller passes. As in
//! Linux iommufd (`include/uapi/linux/iommufd.h`, "General ioctl format"):
//!
//! * `size` smaller than the struct's minimum size → `EINVAL`;
//! * `size` larger than the struct Sluice knows: the extra bytes must be zero,
//!   else `E2BIG`; a newer guest can thus run on an older hypervisor as long
//!   as it does not use the new fields;
//! * unknown `flags` bits or non-zero `reserved` fields → `EOPNOTSUPP`.
//!
//! Outputs (`out_*` fields) are written back into the same struct, over the
//! first `min(size, SIZE)` bytes.
//!
//! Structs are `#[repr(C)]`, little-endian, without implicit padding; each
//! has its layout as data ([`AbiStruct::FIELDS`]) so that the C header
//! ([`write_c_header`]) is generated from the very same definitions.
#![no_std]

use core::fmt;

/// Linux errno values returned (negated) by hypercalls. The numbers are the
/// Linux generic ones (`include/uapi/asm-generic/errno-base.h`, `errno.h`),
/// identical on x86_64 and aarch64.
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const ENOENT: i64 = 2;
    pub const E2BIG: i64 = 7;
    pub const ENOMEM: i64 = 12;
    pub const EFAULT: i64 = 14;
    pub const EBUSY: i64 = 16;
    pub const EEXIST: i64 = 17;
    pub const ENODEV: i64 = 19;
    pub const EINVAL: i64 = 22;
    pub const ENOTTY: i64 = 25;
    pub const ENOSPC: i64 = 28;
    pub const ERANGE: i64 = 34;
    pub const ENOSYS: i64 = 38;
    pub const EOVERFLOW: i64 = 75;
    pub const EMSGSIZE: i64 = 90;
    pub const EOPNOTSUPP: i64 = 95;
    pub const EADDRINUSE: i64 = 98;

    /// Symbolic name of an errno value, for logs and test messages.
    pub const fn name(errno: i64) -> &'static str {
        match errno {
            EPERM => "EPERM",
            ENOENT => "ENOENT",
            E2BIG => "E2BIG",
            ENOMEM => "ENOMEM",
            EFAULT => "EFAULT",
            EBUSY => "EBUSY",
            EEXIST => "EEXIST",
            ENODEV => "ENODEV",
            EINVAL => "EINVAL",
            ENOTTY => "ENOTTY",
            ENOSPC => "ENOSPC",
            ERANGE => "ERANGE",
            ENOSYS => "ENOSYS",
            EOVERFLOW => "EOVERFLOW",
            EMSGSIZE => "EMSGSIZE",
            EOPNOTSUPP => "EOPNOTSUPP",
            EADDRINUSE => "EADDRINUSE",
            _ => "E?",
        }
    }
}

/// Command numbers. Commands with a Linux iommufd equivalent use the same
/// number as `IOMMUFD_CMD_*` in `include/uapi/linux/iommufd.h`; Sluice's own
/// commands (device handling, which Linux does through VFIO, fault reading,
/// the WBINVD policy and the vPASID table) start at `0x100`. An unknown
/// command returns `ENOTTY`, as an unknown ioctl does.
pub mod cmd {
    pub const DESTROY: u64 = 0x80;
    pub const IOAS_ALLOC: u64 = 0x81;
    pub const IOAS_ALLOW_IOVAS: u64 = 0x82;
    pub const IOAS_COPY: u64 = 0x83;
    pub const IOAS_IOVA_RANGES: u64 = 0x84;
    pub const IOAS_MAP: u64 = 0x85;
    pub const IOAS_UNMAP: u64 = 0x86;
    pub const OPTION: u64 = 0x87;
    pub const HWPT_ALLOC: u64 = 0x89;
    pub const GET_HW_INFO: u64 = 0x8a;
    pub const FAULT_QUEUE_ALLOC: u64 = 0x8e;

    pub const DEVICE_LIST: u64 = 0x100;
    pub const DEVICE_BIND: u64 = 0x101;
    pub const DEVICE_UNBIND: u64 = 0x102;
    pub const DEVICE_ATTACH: u64 = 0x103;
    pub const DEVICE_REPLACE: u64 = 0x104;
    pub const DEVICE_DETACH: u64 = 0x105;
    pub const FAULT_READ: u64 = 0x106;
    pub const WBINVD_POLICY: u64 = 0x107;
    pub const VPASID_SET: u64 = 0x108;
    pub const VPASID_CLEAR: u64 = 0x109;

    /// Every command, with its C name, for the generated header.
    pub const ALL: &[(&str, u64)] = &[
        ("DESTROY", DESTROY),
        ("IOAS_ALLOC", IOAS_ALLOC),
        ("IOAS_ALLOW_IOVAS", IOAS_ALLOW_IOVAS),
        ("IOAS_COPY", IOAS_COPY),
        ("IOAS_IOVA_RANGES", IOAS_IOVA_RANGES),
        ("IOAS_MAP", IOAS_MAP),
        ("IOAS_UNMAP", IOAS_UNMAP),
        ("OPTION", OPTION),
        ("HWPT_ALLOC", HWPT_ALLOC),
        ("GET_HW_INFO", GET_HW_INFO),
        ("FAULT_QUEUE_ALLOC", FAULT_QUEUE_ALLOC),
        ("DEVICE_LIST", DEVICE_LIST),
        ("DEVICE_BIND", DEVICE_BIND),
        ("DEVICE_UNBIND", DEVICE_UNBIND),
        ("DEVICE_ATTACH", DEVICE_ATTACH),
        ("DEVICE_REPLACE", DEVICE_REPLACE),
        ("DEVICE_DETACH", DEVICE_DETACH),
        ("FAULT_READ", FAULT_READ),
        ("WBINVD_POLICY", WBINVD_POLICY),
        ("VPASID_SET", VPASID_SET),
        ("VPASID_CLEAR", VPASID_CLEAR),
    ];
}

/// How the hypercall instruction carries a command.
///
/// * **x86_64** (`VMCALL` on Intel VMX, `VMMCALL` on AMD SVM): `RAX` = command
///   number, `RBX` = guest-physical address of the argument struct. The result
///   comes back in `RAX`; every other register is preserved.
/// * **aarch64** (`HVC #0`, SMC Calling Convention): `X0` = function ID =
///   [`regs::AARCH64_FUNCTION_BASE`]` | command` (a fast SMC64 call owned by
///   "vendor specific hypervisor service", owner 6), `X1` = guest-physical
///   address of the argument struct. The result comes back in `X0`.
///
/// The result is `0` (or a non-negative value a command documents) on
/// success, `-errno` on failure.
pub mod regs {
    /// SMCCC function ID bits: fast call (bit 31), SMC64 (bit 30), owning
    /// entity 6 (bits 29:24).
    pub const AARCH64_FUNCTION_BASE: u64 = 0xc600_0000;
    /// Mask of the command number inside an aarch64 function ID.
    pub const AARCH64_FUNCTION_MASK: u64 = 0xffff;

    /// The command number encoded in an aarch64 `X0`, or `None` if the
    /// function ID is not a Sluice iommufd call.
    pub const fn aarch64_command(x0: u64) -> Option<u64> {
        if x0 & !AARCH64_FUNCTION_MASK == AARCH64_FUNCTION_BASE {
            Some(x0 & AARCH64_FUNCTION_MASK)
        } else {
            None
        }
    }
}

/// `IOAS_MAP` / `IOAS_COPY` flags (same bits as `IOMMU_IOAS_MAP_*`).
pub mod map_flags {
    pub const FIXED_IOVA: u32 = 1 << 0;
    pub const WRITEABLE: u32 = 1 << 1;
    pub const READABLE: u32 = 1 << 2;
}

/// `HWPT_ALLOC` flags (same bits as `IOMMU_HWPT_ALLOC_*`).
pub mod hwpt_flags {
    pub const NEST_PARENT: u32 = 1 << 0;
    pub const DIRTY_TRACKING: u32 = 1 << 1;
    pub const FAULT_ID_VALID: u32 = 1 << 2;
    pub const PASID: u32 = 1 << 3;
}

/// `HWPT_ALLOC.data_type`: only `NONE` (a plain paging HWPT) is supported.
pub const HWPT_DATA_NONE: u32 = 0;
/// `GET_HW_INFO.out_data_type`: Sluice returns no vendor data.
pub const HW_INFO_TYPE_NONE: u32 = 0;

/// `GET_HW_INFO.out_capabilities` and `DeviceInfo::capabilities` bits. The
/// low bits follow `IOMMU_HW_CAP_*`; bits 32 and up are Sluice's own.
pub mod hw_caps {
    pub const DIRTY_TRACKING: u64 = 1 << 0;
    /// The device's IOMMU can force snooping (VT-d ECAP.SC): HWPTs allocated
    /// for it enforce cache coherency.
    pub const ENFORCE_SNOOP: u64 = 1 << 32;
    /// The device's IOMMU remaps interrupts (MSIs are isolated).
    pub const INTERRUPT_REMAPPING: u64 = 1 << 33;
    /// The device can issue no-snoop DMA.
    pub const NO_SNOOP_DMA: u64 = 1 << 34;
    /// The IOMMU runs in scalable mode (PASID-granular translation).
    pub const SCALABLE_MODE: u64 = 1 << 35;
    /// The device supports function-level reset (done on unbind).
    pub const FLR: u64 = 1 << 36;
}

/// `OPTION` identifiers and operations (`IOMMU_OPTION_*`).
pub mod option {
    pub const RLIMIT_MODE: u32 = 0;
    pub const HUGE_PAGES: u32 = 1;
    pub const OP_SET: u16 = 0;
    pub const OP_GET: u16 = 1;
}

/// `DEVICE_ATTACH` / `DEVICE_REPLACE` / `DEVICE_DETACH` flags.
pub mod attach_flags {
    /// The `pasid` field is valid: act on (device, PASID), not the RID.
    pub const PASID: u32 = 1 << 0;
}

/// `FaultRecord::flags` bits.
pub mod fault_flags {
    pub const PASID_VALID: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
}

/// `FaultRecord::reason` values.
pub mod fault_reason {
    /// Nothing is mapped at the IOVA.
    pub const NOT_PRESENT: u32 = 1;
    /// Mapped, but not with the access the device attempted.
    pub const PERMISSION: u32 = 2;
    /// The (device, PASID) is in the blocking state.
    pub const BLOCKED: u32 = 3;
}

/// `WbinvdPolicy::out_policy` values.
pub mod wbinvd {
    /// Guest WBINVD is a no-op: no device can make caches incoherent.
    pub const NOOP: u32 = 0;
    /// Guest WBINVD writes back and invalidates the caches of the CPUs the VM
    /// runs on: a no-snoop-capable device is attached to a HWPT that does not
    /// enforce coherency.
    pub const FLUSH: u32 = 1;
}

/// Guest-visible PCI address: `segment << 16 | bus << 8 | device << 3 | function`.
pub const fn bdf(segment: u16, bus: u8, device: u8, function: u8) -> u32 {
    ((segment as u32) << 16)
        | ((bus as u32) << 8)
        | (((device & 0x1f) as u32) << 3)
        | (function & 7) as u32
}

/// A field of an ABI struct, for header generation and layout tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub c_type: &'static str,
    pub offset: usize,
    pub size: usize,
}

/// What every ABI struct provides.
pub trait AbiStruct: Copy + Default {
    /// The C name (`struct sluice_<NAME>`).
    const C_NAME: &'static str;
    /// Bytes of the struct this ABI version knows.
    const SIZE: usize;
    /// Smallest `size` a caller may pass (the first version's size).
    const MIN_SIZE: usize;
    const FIELDS: &'static [Field];
    /// Decodes little-endian bytes; `bytes` must be `SIZE` long (shorter
    /// input reads as zero).
    fn decode(bytes: &[u8]) -> Self;
    /// Encodes into `out` (at most `SIZE` bytes are written).
    fn encode(&self, out: &mut [u8]);
}

trait LeField: Sized {
    const C_TYPE: &'static str;
    fn get(bytes: &[u8], offset: usize) -> Self;
    fn put(self, out: &mut [u8], offset: usize);
}

macro_rules! le_field {
    ($ty:ty, $c:literal) => {
        impl LeField for $ty {
            const C_TYPE: &'static str = $c;
            fn get(bytes: &[u8], offset: usize) -> Self {
                let mut raw = [0u8; core::mem::size_of::<$ty>()];
                for (i, b) in raw.iter_mut().enumerate() {
                    *b = bytes.get(offset + i).copied().unwrap_or(0);
                }
                <$ty>::from_le_bytes(raw)
            }
            fn put(self, out: &mut [u8], offset: usize) {
                for (i, b) in self.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = out.get_mut(offset + i) {
                        *slot = *b;
                    }
                }
            }
        }
    };
}
le_field!(u8, "uint8_t");
le_field!(u16, "uint16_t");
le_field!(u32, "uint32_t");
le_field!(u64, "uint64_t");

macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($c_name:literal) {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),*
        }

        const _: () = assert!(
            0 $(+ core::mem::size_of::<$ty>())* == core::mem::size_of::<$name>(),
            "ABI structs must not contain implicit padding"
        );

        impl AbiStruct for $name {
            const C_NAME: &'static str = $c_name;
            const SIZE: usize = core::mem::size_of::<$name>();
            const MIN_SIZE: usize = core::mem::size_of::<$name>();
            const FIELDS: &'static [Field] = &[
                $( Field {
                    name: stringify!($field),
                    c_type: <$ty as LeField>::C_TYPE,
                    offset: core::mem::offset_of!($name, $field),
                    size: core::mem::size_of::<$ty>(),
                } ),*
            ];
            fn decode(bytes: &[u8]) -> Self {
                Self {
                    $( $field: <$ty as LeField>::get(bytes, core::mem::offset_of!($name, $field)) ),*
                }
            }
            fn encode(&self, out: &mut [u8]) {
                $( LeField::put(self.$field, out, core::mem::offset_of!($name, $field)); )*
            }
        }
    };
}

abi_struct! {
    /// `DESTROY`: destroys the object `id` (IOAS, HWPT or fault queue).
    /// `EBUSY` while the object is in use; devices are released with
    /// `DEVICE_UNBIND` (`DESTROY` on a device ID gives `EBUSY`).
    pub struct Destroy ("destroy") {
        pub size: u32,
        pub id: u32,
    }
}

abi_struct! {
    /// `IOAS_ALLOC`: creates an empty IO address space.
    pub struct IoasAlloc ("ioas_alloc") {
        pub size: u32,
        pub flags: u32,
        pub out_ioas_id: u32,
    }
}

abi_struct! {
    /// An inclusive IOVA range `[start, last]` (`struct iommu_iova_range`).
    pub struct IovaRange ("iova_range") {
        pub start: u64,
        pub last: u64,
    }
}

abi_struct! {
    /// `IOAS_IOVA_RANGES`: the IOVA ranges usable for mapping (the complement
    /// of the reserved ranges). `num_iovas` is the capacity of the
    /// `allowed_iovas` array on input and the number of ranges on output; if
    /// the array is too small, `EMSGSIZE` is returned with `num_iovas` set.
    pub struct IoasIovaRanges ("ioas_iova_ranges") {
        pub size: u32,
        pub ioas_id: u32,
        pub num_iovas: u32,
        pub reserved: u32,
        /// Guest-physical address of an array of [`IovaRange`].
        pub allowed_iovas: u64,
        pub out_iova_alignment: u64,
    }
}

abi_struct! {
    /// `IOAS_ALLOW_IOVAS`: replaces the list of IOVA ranges the IOAS must
    /// keep usable; automatic IOVA allocation stays inside them.
    pub struct IoasAllowIovas ("ioas_allow_iovas") {
        pub size: u32,
        pub ioas_id: u32,
        pub num_iovas: u32,
        pub reserved: u32,
        /// Guest-physical address of an array of [`IovaRange`].
        pub allowed_iovas: u64,
    }
}

abi_struct! {
    /// `IOAS_MAP`: maps guest RAM `[addr, addr + length)` at `iova`.
    /// Differs from Linux: `addr` is a guest-physical address (not a user
    /// virtual address) and must be 4 KiB aligned.
    pub struct IoasMap ("ioas_map") {
        pub size: u32,
        pub flags: u32,
        pub ioas_id: u32,
        pub reserved: u32,
        pub addr: u64,
        pub length: u64,
        /// Input with `FIXED_IOVA`, output otherwise.
        pub iova: u64,
    }
}

abi_struct! {
    /// `IOAS_COPY`: maps into `dst_ioas_id` the memory mapped at
    /// `[src_iova, src_iova + length)` of `src_ioas_id`.
    pub struct IoasCopy ("ioas_copy") {
        pub size: u32,
        pub flags: u32,
        pub dst_ioas_id: u32,
        pub src_ioas_id: u32,
        pub length: u64,
        /// Input with `FIXED_IOVA`, output otherwise.
        pub dst_iova: u64,
        pub src_iova: u64,
    }
}

abi_struct! {
    /// `IOAS_UNMAP`: unmaps whole mappings inside `[iova, iova + length)`;
    /// `iova = 0, length = u64::MAX` unmaps everything. `length` returns the
    /// number of bytes unmapped.
    pub struct IoasUnmap ("ioas_unmap") {
        pub size: u32,
        pub ioas_id: u32,
        pub iova: u64,
        pub length: u64,
    }
}

abi_struct! {
    /// `OPTION`: reads or sets an option of an object.
    pub struct IommuOption ("option") {
        pub size: u32,
        pub option_id: u32,
        pub op: u16,
        pub reserved: u16,
        pub object_id: u32,
        pub val64: u64,
    }
}

abi_struct! {
    /// `HWPT_ALLOC`: allocates a paging HWPT on the IOAS `pt_id` for the
    /// bound device `dev_id`.
    pub struct HwptAlloc ("hwpt_alloc") {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub pt_id: u32,
        pub out_hwpt_id: u32,
        pub reserved: u32,
        pub data_type: u32,
        pub data_len: u32,
        pub data_uptr: u64,
        pub fault_id: u32,
        pub reserved2: u32,
    }
}

abi_struct! {
    /// `GET_HW_INFO`: what the IOMMU of bound device `dev_id` can do.
    pub struct HwInfo ("hw_info") {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        /// In: bytes at `data_uptr`; out: bytes of vendor data (always 0).
        pub data_len: u32,
        pub data_uptr: u64,
        pub out_data_type: u32,
        pub out_max_pasid_log2: u8,
        pub reserved0: u8,
        pub reserved1: u16,
        pub out_capabilities: u64,
    }
}

abi_struct! {
    /// `FAULT_QUEUE_ALLOC`: creates a fault queue (read with `FAULT_READ`;
    /// there are no file descriptors, so `out_reserved` is always 0).
    pub struct FaultAlloc ("fault_alloc") {
        pub size: u32,
        pub flags: u32,
        pub out_fault_id: u32,
        pub out_reserved: u32,
    }
}

abi_struct! {
    /// `DEVICE_LIST`: the devices assigned to the VM, as [`DeviceInfo`].
    /// `num_devices` is the array capacity in, the device count out
    /// (`EMSGSIZE` if the array is too small).
    pub struct DeviceList ("device_list") {
        pub size: u32,
        pub flags: u32,
        pub num_devices: u32,
        pub reserved: u32,
        pub devices: u64,
    }
}

abi_struct! {
    /// One assigned device, as the guest sees it.
    pub struct DeviceInfo ("device_info") {
        /// The guest's BDF (see [`bdf`]).
        pub guest_bdf: u32,
        /// The IOMMU group: devices that cannot be isolated from each other.
        pub group_id: u32,
        /// Object ID of the binding, 0 while unbound.
        pub dev_id: u32,
        /// Bits of PASID the device and its IOMMU both support (0: none).
        pub max_pasid_log2: u8,
        pub reserved0: u8,
        pub reserved1: u16,
        /// [`hw_caps`] bits.
        pub capabilities: u64,
    }
}

abi_struct! {
    /// `DEVICE_BIND`: takes ownership of the device at `guest_bdf`. Returns
    /// the device ID, its group and the guest BDFs of every device of the
    /// group (an array of `u32` at `group_devices` with room for
    /// `num_group_devices`; too small → `EMSGSIZE`, nothing bound).
    pub struct DeviceBind ("device_bind") {
        pub size: u32,
        pub flags: u32,
        pub guest_bdf: u32,
        pub out_dev_id: u32,
        pub out_group_id: u32,
        pub num_group_devices: u32,
        pub group_devices: u64,
    }
}

abi_struct! {
    /// `DEVICE_UNBIND`: releases a bound device.
    pub struct DeviceUnbind ("device_unbind") {
        pub size: u32,
        pub dev_id: u32,
    }
}

abi_struct! {
    /// `DEVICE_ATTACH` and `DEVICE_REPLACE`: attaches the device (or the
    /// (device, PASID) with [`attach_flags::PASID`]) to `pt_id`, an IOAS
    /// (automatic HWPT) or a HWPT. Returns the HWPT used.
    pub struct DeviceAttach ("device_attach") {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub pt_id: u32,
        pub pasid: u32,
        pub out_hwpt_id: u32,
    }
}

abi_struct! {
    /// `DEVICE_DETACH`: back to the blocking state.
    pub struct DeviceDetach ("device_detach") {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub pasid: u32,
    }
}

abi_struct! {
    /// `FAULT_READ`: moves up to `num_records` [`FaultRecord`]s to
    /// `records`; `num_records` returns how many were written and
    /// `out_overflow` how many faults were dropped since the last read.
    pub struct FaultRead ("fault_read") {
        pub size: u32,
        pub fault_id: u32,
        pub num_records: u32,
        pub reserved: u32,
        pub records: u64,
        pub out_overflow: u64,
    }
}

abi_struct! {
    /// One DMA fault.
    pub struct FaultRecord ("fault_record") {
        pub dev_id: u32,
        pub pasid: u32,
        pub flags: u32,
        pub reason: u32,
        pub iova: u64,
    }
}

abi_struct! {
    /// `WBINVD_POLICY`: what guest WBINVD currently does ([`wbinvd`]).
    pub struct WbinvdPolicy ("wbinvd_policy") {
        pub size: u32,
        pub flags: u32,
        pub out_policy: u32,
        pub reserved: u32,
    }
}

abi_struct! {
    /// `VPASID_SET`: links the guest's `vpasid` to the host `pasid`, which the
    /// VM must have attached on device `dev_id`.
    pub struct VpasidSet ("vpasid_set") {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub vpasid: u32,
        pub pasid: u32,
        pub reserved: u32,
    }
}

abi_struct! {
    /// `VPASID_CLEAR`: removes the link of `vpasid`.
    pub struct VpasidClear ("vpasid_clear") {
        pub size: u32,
        pub vpasid: u32,
    }
}

fn write_struct<T: AbiStruct>(out: &mut dyn fmt::Write) -> fmt::Result {
    writeln!(out, "struct sluice_{} {{", T::C_NAME)?;
    for f in T::FIELDS {
        writeln!(out, "\t{} {};", f.c_type, f.name)?;
    }
    writeln!(out, "}};")?;
    for f in T::FIELDS {
        writeln!(
            out,
            "_Static_assert(offsetof(struct sluice_{}, {}) == {}, \"ABI offset\");",
            T::C_NAME,
            f.name,
            f.offset
        )?;
    }
    writeln!(
        out,
        "_Static_assert(sizeof(struct sluice_{}) == {}, \"ABI size\");\n",
        T::C_NAME,
        T::SIZE
    )
}

fn write_consts(out: &mut dyn fmt::Write, prefix: &str, items: &[(&str, u64)]) -> fmt::Result {
    for (name, value) in items {
        writeln!(out, "#define SLUICE_{prefix}{name} {value:#x}ULL")?;
    }
    writeln!(out)
}

/// Writes the C header (`sluice/hypercall.h`) generated from this crate.
pub fn write_c_header(out: &mut dyn fmt::Write) -> fmt::Result {
    writeln!(
        out,
        "/* SPDX-License-Identifier: MIT OR Apache-2.0 */\n\
         /* Generated from the sluice-abi crate: do not edit. */\n\
         #ifndef SLUICE_HYPERCALL_H\n#define SLUICE_HYPERCALL_H\n\n\
         #include <stddef.h>\n#include <stdint.h>\n"
    )?;
    writeln!(
        out,
        "/* x86_64: VMCALL/VMMCALL, RAX = command, RBX = argument GPA, result in RAX.\n \
         * aarch64: HVC #0, X0 = SLUICE_AARCH64_FUNCTION_BASE | command, X1 = argument GPA,\n \
         * result in X0. Result: >= 0 success, -errno failure. */"
    )?;
    write_consts(
        out,
        "",
        &[("AARCH64_FUNCTION_BASE", regs::AARCH64_FUNCTION_BASE)],
    )?;
    write_consts(out, "CMD_", cmd::ALL)?;
    write_consts(
        out,
        "",
        &[
            ("MAP_FIXED_IOVA", map_flags::FIXED_IOVA as u64),
            ("MAP_WRITEABLE", map_flags::WRITEABLE as u64),
            ("MAP_READABLE", map_flags::READABLE as u64),
            ("HWPT_ALLOC_NEST_PARENT", hwpt_flags::NEST_PARENT as u64),
            (
                "HWPT_ALLOC_DIRTY_TRACKING",
                hwpt_flags::DIRTY_TRACKING as u64,
            ),
            (
                "HWPT_ALLOC_FAULT_ID_VALID",
                hwpt_flags::FAULT_ID_VALID as u64,
            ),
            ("HWPT_ALLOC_PASID", hwpt_flags::PASID as u64),
            ("ATTACH_PASID", attach_flags::PASID as u64),
            ("CAP_ENFORCE_SNOOP", hw_caps::ENFORCE_SNOOP),
            ("CAP_INTERRUPT_REMAPPING", hw_caps::INTERRUPT_REMAPPING),
            ("CAP_NO_SNOOP_DMA", hw_caps::NO_SNOOP_DMA),
            ("CAP_SCALABLE_MODE", hw_caps::SCALABLE_MODE),
            ("CAP_FLR", hw_caps::FLR),
            ("OPTION_RLIMIT_MODE", option::RLIMIT_MODE as u64),
            ("OPTION_HUGE_PAGES", option::HUGE_PAGES as u64),
            ("OPTION_OP_SET", option::OP_SET as u64),
            ("OPTION_OP_GET", option::OP_GET as u64),
            ("FAULT_PASID_VALID", fault_flags::PASID_VALID as u64),
            ("FAULT_WRITE", fault_flags::WRITE as u64),
            ("FAULT_NOT_PRESENT", fault_reason::NOT_PRESENT as u64),
            ("FAULT_PERMISSION", fault_reason::PERMISSION as u64),
            ("FAULT_BLOCKED", fault_reason::BLOCKED as u64),
            ("WBINVD_NOOP", wbinvd::NOOP as u64),
            ("WBINVD_FLUSH", wbinvd::FLUSH as u64),
        ],
    )?;
    write_struct::<Destroy>(out)?;
    write_struct::<IoasAlloc>(out)?;
    write_struct::<IovaRange>(out)?;
    write_struct::<IoasIovaRanges>(out)?;
    write_struct::<IoasAllowIovas>(out)?;
    write_struct::<IoasMap>(out)?;
    write_struct::<IoasCopy>(out)?;
    write_struct::<IoasUnmap>(out)?;
    write_struct::<IommuOption>(out)?;
    write_struct::<HwptAlloc>(out)?;
    write_struct::<HwInfo>(out)?;
    write_struct::<FaultAlloc>(out)?;
    write_struct::<DeviceList>(out)?;
    write_struct::<DeviceInfo>(out)?;
    write_struct::<DeviceBind>(out)?;
    write_struct::<DeviceUnbind>(out)?;
    write_struct::<DeviceAttach>(out)?;
    write_struct::<DeviceDetach>(out)?;
    write_struct::<FaultRead>(out)?;
    write_struct::<FaultRecord>(out)?;
    write_struct::<WbinvdPolicy>(out)?;
    write_struct::<VpasidSet>(out)?;
    write_struct::<VpasidClear>(out)?;
    writeln!(out, "#endif /* SLUICE_HYPERCALL_H */")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_linux_where_shared() {
        // Sizes of the Linux structs these mirror (include/uapi/linux/iommufd.h).
        assert_eq!(Destroy::SIZE, 8);
        assert_eq!(IoasAlloc::SIZE, 12);
        assert_eq!(IovaRange::SIZE, 16);
        assert_eq!(IoasIovaRanges::SIZE, 32);
        assert_eq!(IoasAllowIovas::SIZE, 24);
        assert_eq!(IoasMap::SIZE, 40);
        assert_eq!(IoasCopy::SIZE, 40);
        assert_eq!(IoasUnmap::SIZE, 24);
        assert_eq!(IommuOption::SIZE, 24);
        assert_eq!(HwptAlloc::SIZE, 48);
        assert_eq!(HwInfo::SIZE, 40);
        assert_eq!(core::mem::offset_of!(HwInfo, out_capabilities), 32);
        assert_eq!(core::mem::offset_of!(IoasMap, iova), 32);
    }

    #[test]
    fn encode_decode_roundtrip_and_short_input_reads_zero() {
        let m = IoasMap {
            size: 40,
            flags: 7,
            ioas_id: 3,
            reserved: 0,
            addr: 0x1234_5000,
            length: 0x2000,
            iova: 0xdead_0000,
        };
        let mut bytes = [0u8; IoasMap::SIZE];
        m.encode(&mut bytes);
        assert_eq!(&bytes[0..4], &40u32.to_le_bytes());
        assert_eq!(IoasMap::decode(&bytes), m);
        let short = IoasMap::decode(&bytes[..16]);
        assert_eq!(short.addr, 0);
        assert_eq!(short.ioas_id, 3);
    }

    #[test]
    fn aarch64_function_ids() {
        assert_eq!(
            regs::aarch64_command(regs::AARCH64_FUNCTION_BASE | cmd::IOAS_MAP),
            Some(cmd::IOAS_MAP)
        );
        assert_eq!(regs::aarch64_command(0x8400_0000), None);
    }

    #[test]
    fn bdf_packing() {
        assert_eq!(bdf(0, 0, 3, 0), 0x18);
        assert_eq!(bdf(1, 2, 31, 7), 0x1_02ff);
    }
}
