//! The hypercall transport end to end: registers of a VMMCALL exit →
//! the iommufd dispatcher → RAX, over a VM's real guest RAM, with hostile
//! argument pointers and sizes.

use std::rc::Rc;

use sluice_abi::{self as abi, AbiStruct, cmd, errno, map_flags};
use sluice_hal::model::ModelMemory;
use sluice_hypervisor::iommufd::{GuestMemory, Iommufd, VmConfig, VmId};
use sluice_hypervisor::testing::MockIommu;
use sluice_hypervisor::vcpu::hypercall::x86_hypercall;
use sluice_hypervisor::vcpu::{GuestRegisters, gpr};
use sluice_hypervisor::vm::memory::{GuestRam, ModelFrames, layout};

const MIB: u64 = 1 << 20;
const RAM_END: u64 = 4 * MIB;
const VM: VmId = VmId(1);

struct Setup {
    iommufd: Iommufd<MockIommu>,
    ram: GuestRam<&'static ModelFrames>,
}

fn setup() -> Setup {
    let frames: &'static ModelFrames = Box::leak(Box::new(ModelFrames::new()));
    let mut ram = GuestRam::new(frames, &[(0, RAM_END)]).unwrap();
    ram.add_mmio(layout::ECAM_BASE, layout::ECAM_SIZE).unwrap();
    let mut iommufd = Iommufd::new(MockIommu::new(Rc::new(ModelMemory::new())), None);
    iommufd.create_vm(VM, VmConfig::default()).unwrap();
    Setup { iommufd, ram }
}

/// Runs a hypercall the way the exit handler does and returns RAX.
fn call(s: &mut Setup, command: u64, arg_gpa: u64) -> (i64, GuestRegisters) {
    let mut regs = GuestRegisters::new();
    for (i, r) in regs.gprs.iter_mut().enumerate() {
        *r = 0xaa00 + i as u64;
    }
    regs.gprs[gpr::RAX] = command;
    regs.gprs[gpr::RBX] = arg_gpa;
    let r = x86_hypercall(&mut s.iommufd, VM, &s.ram, &mut regs);
    assert_eq!(regs.gprs[gpr::RAX], r as u64, "result is in RAX");
    (r, regs)
}

fn put<T: AbiStruct>(s: &Setup, gpa: u64, value: &T) {
    let mut bytes = vec![0u8; T::SIZE];
    value.encode(&mut bytes);
    bytes[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
    s.ram.write(gpa, &bytes).unwrap();
}

fn get<T: AbiStruct>(s: &Setup, gpa: u64) -> T {
    let mut bytes = vec![0u8; T::SIZE];
    s.ram.read(gpa, &mut bytes).unwrap();
    T::decode(&bytes)
}

#[test]
fn success_writes_back_and_preserves_other_registers() {
    let mut s = setup();
    // An unaligned argument pointer is fine: the ABI has no alignment rule.
    put(&s, 0x1003, &abi::IoasAlloc::default());
    let (r, regs) = call(&mut s, cmd::IOAS_ALLOC, 0x1003);
    assert_eq!(r, 0);
    assert_eq!(get::<abi::IoasAlloc>(&s, 0x1003).out_ioas_id, 1);
    assert_eq!(regs.gprs[gpr::RBX], 0x1003);
    for i in (1..16).filter(|&i| i != gpr::RBX) {
        assert_eq!(regs.gprs[i], 0xaa00 + i as u64, "register {i} preserved");
    }
}

#[test]
fn argument_pointer_outside_ram_is_efault() {
    let mut s = setup();
    // MMIO (the ECAM window), a hole, the very top of the address space.
    for gpa in [layout::ECAM_BASE, RAM_END + 0x1000, u64::MAX - 1, u64::MAX] {
        assert_eq!(
            call(&mut s, cmd::IOAS_ALLOC, gpa).0,
            -errno::EFAULT,
            "{gpa:#x}"
        );
    }
    // A struct that starts in RAM and crosses into non-RAM: EFAULT, and
    // nothing was allocated (the next IOAS still gets ID 1).
    let at = RAM_END - 6;
    let mut head = [0u8; 6];
    head[..4].copy_from_slice(&(abi::IoasAlloc::SIZE as u32).to_le_bytes());
    s.ram.write(at, &head).unwrap();
    assert_eq!(call(&mut s, cmd::IOAS_ALLOC, at).0, -errno::EFAULT);
    put(&s, 0x2000, &abi::IoasAlloc::default());
    assert_eq!(call(&mut s, cmd::IOAS_ALLOC, 0x2000).0, 0);
    assert_eq!(get::<abi::IoasAlloc>(&s, 0x2000).out_ioas_id, 1);
}

#[test]
fn hostile_sizes_and_commands() {
    let mut s = setup();
    // A declared size of 4 GiB - 1: E2BIG before anything is read beyond.
    s.ram.write(0x3000, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(call(&mut s, cmd::IOAS_ALLOC, 0x3000).0, -errno::E2BIG);
    // Size 0: EINVAL.
    s.ram.write(0x3000, &0u32.to_le_bytes()).unwrap();
    assert_eq!(call(&mut s, cmd::IOAS_ALLOC, 0x3000).0, -errno::EINVAL);
    // Unknown command numbers, including ones with high bits.
    for c in [0, 0x7f, 0x200, u64::MAX, 1 << 63 | cmd::IOAS_ALLOC] {
        assert_eq!(call(&mut s, c, 0x3000).0, -errno::ENOTTY, "{c:#x}");
    }
}

#[test]
fn hostile_map_ranges() {
    let mut s = setup();
    put(&s, 0x1000, &abi::IoasAlloc::default());
    assert_eq!(call(&mut s, cmd::IOAS_ALLOC, 0x1000).0, 0);
    let ioas = get::<abi::IoasAlloc>(&s, 0x1000).out_ioas_id;
    let flags = map_flags::READABLE | map_flags::WRITEABLE | map_flags::FIXED_IOVA;
    let map = |addr: u64, length: u64| abi::IoasMap {
        flags,
        ioas_id: ioas,
        addr,
        length,
        iova: 0x1000_0000,
        ..Default::default()
    };
    let cases = [
        // Huge length: overflow.
        (map(0, u64::MAX), errno::EOVERFLOW),
        (map(0x10_0000, u64::MAX - 0xfff), errno::EOVERFLOW),
        // Guest memory that is MMIO, a hole, or runs past the end of RAM.
        (map(layout::ECAM_BASE, 0x1000), errno::EFAULT),
        (map(RAM_END, 0x1000), errno::EFAULT),
        (map(RAM_END - 0x1000, 0x2000), errno::EFAULT),
        // Unaligned guest address.
        (map(0x1800, 0x1000), errno::EINVAL),
    ];
    for (arg, want) in cases {
        put(&s, 0x2000, &arg);
        assert_eq!(call(&mut s, cmd::IOAS_MAP, 0x2000).0, -want, "{arg:?}");
    }
    // Nothing was mapped by any of them: the exact mapping still works.
    put(&s, 0x2000, &map(RAM_END - 0x2000, 0x2000));
    assert_eq!(call(&mut s, cmd::IOAS_MAP, 0x2000).0, 0);
}
