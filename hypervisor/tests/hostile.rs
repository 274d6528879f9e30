//! Hostile guests: random commands with random (but field-aware) argument
//! structs must never panic, must return 0 or a known -errno, and must
//! never let a device reach memory its VM does not own.

use sluice_abi::{self as abi, AbiStruct, Field, cmd, errno};
use sluice_hypervisor::iommufd::VmId;
use sluice_hypervisor::testing::{DeviceSetup, DmaOutcome, Platform, VmSetup};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KNOWN_ERRNOS: &[i64] = &[
    errno::EPERM,
    errno::ENOENT,
    errno::E2BIG,
    errno::ENOMEM,
    errno::EFAULT,
    errno::EBUSY,
    errno::EEXIST,
    errno::ENODEV,
    errno::EINVAL,
    errno::ENOTTY,
    errno::ENOSPC,
    errno::EOVERFLOW,
    errno::EMSGSIZE,
    errno::EOPNOTSUPP,
    errno::EADDRINUSE,
];

fn value(rng: &mut Rng, field: &Field, bdfs: &[u32]) -> u64 {
    let interesting = [
        0,
        1,
        0x1000,
        0x20_0000,
        0xfee0_0000,
        u64::MAX,
        u64::MAX - 0xfff,
        1 << 47,
    ];
    let roll = rng.below(100);
    if field.name.contains("reserved") {
        return if roll < 90 { 0 } else { rng.next() };
    }
    if field.name.contains("flags") {
        return match roll {
            0..30 => 0,
            30..85 => rng.below(8),
            _ => rng.next(),
        };
    }
    if field.name.starts_with("data") && roll < 85 {
        return 0;
    }
    if field.name.contains("bdf") {
        return if roll < 90 {
            u64::from(bdfs[rng.below(bdfs.len() as u64) as usize])
        } else {
            rng.next()
        };
    }
    if field.name.contains("iova") && !field.name.contains("iovas") && roll < 70 {
        return rng.below(64) << 12;
    }
    if field.name == "length" {
        return match roll {
            0..70 => (1 + rng.below(16)) << 12,
            70..80 => u64::MAX,
            _ => rng.next(),
        };
    }
    match (field.size, roll) {
        (8, 0..60) => rng.below(1 << 12) << 12,
        (8, 60..80) => interesting[rng.below(interesting.len() as u64) as usize],
        (_, 0..75) => rng.below(7),
        (_, 75..85) => u64::from(bdfs[rng.below(bdfs.len() as u64) as usize]),
        _ => rng.next(),
    }
}

fn random_arg<T: AbiStruct>(rng: &mut Rng, bdfs: &[u32]) -> Vec<u8> {
    let mut bytes = vec![0u8; T::SIZE + 16];
    for f in T::FIELDS {
        let v = value(rng, f, bdfs).to_le_bytes();
        bytes[f.offset..f.offset + f.size].copy_from_slice(&v[..f.size]);
    }
    let size = match rng.below(20) {
        0 => rng.below(T::SIZE as u64 + 16),
        1 => T::SIZE as u64 + 16,
        _ => T::SIZE as u64,
    };
    if size > T::SIZE as u64 && rng.below(2) == 0 {
        let at = T::SIZE + rng.below(16) as usize;
        bytes[at] = 0x5a;
    }
    bytes[..4].copy_from_slice(&(size as u32).to_le_bytes());
    bytes
}

type MakeArg = fn(&mut Rng, &[u32]) -> Vec<u8>;

fn random_call(rng: &mut Rng, bdfs: &[u32]) -> (u64, Vec<u8>) {
    let commands: &[(u64, MakeArg)] = &[
        (cmd::DESTROY, random_arg::<abi::Destroy>),
        (cmd::IOAS_ALLOC, random_arg::<abi::IoasAlloc>),
        (cmd::IOAS_ALLOW_IOVAS, random_arg::<abi::IoasAllowIovas>),
        (cmd::IOAS_COPY, random_arg::<abi::IoasCopy>),
        (cmd::IOAS_IOVA_RANGES, random_arg::<abi::IoasIovaRanges>),
        (cmd::IOAS_MAP, random_arg::<abi::IoasMap>),
        (cmd::IOAS_MAP, random_arg::<abi::IoasMap>),
        (cmd::IOAS_UNMAP, random_arg::<abi::IoasUnmap>),
        (cmd::OPTION, random_arg::<abi::IommuOption>),
        (cmd::HWPT_ALLOC, random_arg::<abi::HwptAlloc>),
        (cmd::GET_HW_INFO, random_arg::<abi::HwInfo>),
        (cmd::DEVICE_LIST, random_arg::<abi::DeviceList>),
        (cmd::DEVICE_BIND, random_arg::<abi::DeviceBind>),
        (cmd::DEVICE_BIND, random_arg::<abi::DeviceBind>),
        (cmd::DEVICE_UNBIND, random_arg::<abi::DeviceUnbind>),
        (cmd::DEVICE_ATTACH, random_arg::<abi::DeviceAttach>),
        (cmd::DEVICE_ATTACH, random_arg::<abi::DeviceAttach>),
        (cmd::DEVICE_ATTACH, random_arg::<abi::DeviceAttach>),
        (cmd::DEVICE_ATTACH, random_arg::<abi::DeviceAttach>),
        (cmd::IOAS_UNMAP, random_arg::<abi::IoasUnmap>),
        (cmd::DEVICE_REPLACE, random_arg::<abi::DeviceAttach>),
        (cmd::DEVICE_DETACH, random_arg::<abi::DeviceDetach>),
        (cmd::FAULT_READ, random_arg::<abi::FaultRead>),
        (cmd::FAULT_QUEUE_ALLOC, random_arg::<abi::FaultAlloc>),
        (cmd::WBINVD_POLICY, random_arg::<abi::WbinvdPolicy>),
        (cmd::VPASID_SET, random_arg::<abi::VpasidSet>),
        (cmd::VPASID_CLEAR, random_arg::<abi::VpasidClear>),
    ];
    if rng.below(50) == 0 {
        return (rng.next() % 0x200, vec![8, 0, 0, 0, 1, 0, 0, 0]);
    }
    let (c, make) = commands[rng.below(commands.len() as u64) as usize];
    (c, make(rng, bdfs))
}

#[test]
fn random_hypercalls_never_panic_or_break_isolation() {
    let vm1 = VmId(1);
    let vm2 = VmId(2);
    let a = abi::bdf(0, 0, 3, 0);
    let b = abi::bdf(0, 0, 4, 0);
    let c = abi::bdf(0, 0, 5, 0);
    let bdfs = [a, b, c];
    let mut succeeded = std::collections::BTreeMap::<u64, u32>::new();
    for seed in 1..=6u64 {
        let mut p = Platform::builder()
            .vm(
                vm1,
                VmSetup::new().ram(0, 64 << 20).mmio(0x1000_0000, 1 << 20),
            )
            .vm(vm2, VmSetup::new().ram(0, 64 << 20))
            .device(DeviceSetup::new(vm1, a).group(1).pasid(20, 8))
            .device(DeviceSetup::new(vm1, b).group(1).snoop_control(false))
            .device(
                DeviceSetup::new(vm1, c)
                    .group(2)
                    .rmrr(0xd000_0000, 0xd000_ffff),
            )
            .device(DeviceSetup::new(vm2, a).group(3))
            .build();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Start from a populated state so random calls reach deep paths.
        let rw = abi::map_flags::READABLE | abi::map_flags::WRITEABLE;
        let i1 = p.ioas_alloc(vm1).unwrap();
        let i2 = p.ioas_alloc(vm1).unwrap();
        let da = p.bind(vm1, a).unwrap().dev_id;
        let dc = p.bind(vm1, c).unwrap().dev_id;
        p.attach(vm1, da, i1).unwrap();
        p.attach(vm1, dc, i2).unwrap();
        p.map(
            vm1,
            i1,
            0,
            0x4000,
            Some(0x1000),
            rw | abi::map_flags::FIXED_IOVA,
        )
        .unwrap();
        p.map(vm1, i2, 0x10_0000, 0x4000, None, rw).unwrap();
        let mut successes = 0;
        for step in 0..3000 {
            let vm = if rng.below(4) == 0 { vm2 } else { vm1 };
            let (command, arg) = random_call(&mut rng, &bdfs);
            let (r, _) = p.raw_call(vm, command, &arg);
            assert!(
                r >= 0 || KNOWN_ERRNOS.contains(&-r),
                "seed {seed} step {step}: command {command:#x} returned {r}"
            );
            if r >= 0 {
                successes += 1;
                *succeeded.entry(command).or_default() += 1;
            }
            if step % 100 == 99 {
                for (vm, bdf) in [(vm1, a), (vm1, b), (vm1, c), (vm2, a)] {
                    for iova in [0u64, 0x1000, 0x20_0000, 0x8000_0000, 0xfee0_0000] {
                        match p.dma(vm, bdf, None, iova, false) {
                            DmaOutcome::Ram { vm: owner, .. } => {
                                assert_eq!(owner, vm, "a device reached another VM's RAM")
                            }
                            DmaOutcome::Host(addr) => panic!("DMA reached host memory {addr}"),
                            DmaOutcome::Fault(_) => {}
                        }
                    }
                }
            }
        }
        assert!(
            successes > 150,
            "seed {seed}: only {successes} calls succeeded"
        );
        p.iommufd.destroy_vm(vm1).unwrap();
        p.iommufd.destroy_vm(vm2).unwrap();
        assert_eq!(p.host.live_pages(), 0, "seed {seed}: page tables leaked");
    }
    // The random calls got deep enough to change state.
    for command in [
        cmd::IOAS_MAP,
        cmd::IOAS_UNMAP,
        cmd::DEVICE_BIND,
        cmd::DEVICE_UNBIND,
        cmd::DESTROY,
    ] {
        assert!(
            succeeded.get(&command).copied().unwrap_or(0) >= 3,
            "command {command:#x} rarely succeeded: {succeeded:x?}"
        );
    }
}
