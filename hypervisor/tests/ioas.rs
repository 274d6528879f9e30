//! IOAS_MAP / UNMAP / COPY / IOVA_RANGES / ALLOW_IOVAS / OPTION through the
//! hypercall dispatcher, with the errno values of Linux iommufd
//! (include/uapi/linux/iommufd.h and its selftests).

use sluice_abi::{self as abi, AbiStruct, cmd, errno, map_flags};
use sluice_hypervisor::iommufd::VmId;
use sluice_hypervisor::testing::{DeviceSetup, DmaOutcome, Platform, VmSetup};

const VM: VmId = VmId(1);
const RW: u32 = map_flags::READABLE | map_flags::WRITEABLE;
const FIXED: u32 = map_flags::FIXED_IOVA | RW;
const NIC: u32 = abi::bdf(0, 0, 3, 0);

fn platform() -> Platform {
    Platform::builder()
        .vm(
            VM,
            VmSetup::new()
                .ram(0, 64 << 20)
                .mmio(0x8000_0000, 0x10_0000)
                .ram(0x1_0000_0000, 16 << 20),
        )
        .vm(VmId(2), VmSetup::new().ram(0, 16 << 20))
        .device(DeviceSetup::new(VM, NIC))
        .build()
}

#[test]
fn ids_start_at_one_and_are_reused_after_destroy() {
    let mut p = platform();
    assert_eq!(p.ioas_alloc(VM), Ok(1));
    assert_eq!(p.ioas_alloc(VM), Ok(2));
    assert_eq!(p.destroy(VM, 1), Ok(()));
    assert_eq!(p.destroy(VM, 1), Err(errno::ENOENT));
    assert_eq!(p.ioas_alloc(VM), Ok(1));
    // Object tables are per VM.
    assert_eq!(p.ioas_alloc(VmId(2)), Ok(1));
    assert_eq!(p.destroy(VM, 0), Err(errno::ENOENT));
}

#[test]
fn argument_size_rules() {
    let mut p = platform();
    // Shorter than the struct: EINVAL.
    let (r, _) = p.raw_call(VM, cmd::IOAS_ALLOC, &[8, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r, -errno::EINVAL);
    // Longer with zero tail: accepted, output written.
    let mut bytes = vec![0u8; 32];
    bytes[0] = 32;
    let (r, out) = p.raw_call(VM, cmd::IOAS_ALLOC, &bytes);
    assert_eq!(r, 0);
    assert_eq!(abi::IoasAlloc::decode(&out).out_ioas_id, 1);
    assert!(out[12..].iter().all(|&b| b == 0), "tail is left alone");
    // Longer with a non-zero tail: E2BIG, nothing allocated.
    bytes[20] = 1;
    let (r, _) = p.raw_call(VM, cmd::IOAS_ALLOC, &bytes);
    assert_eq!(r, -errno::E2BIG);
    // Absurd sizes: E2BIG without scanning gigabytes.
    let mut huge = [0u8; 12];
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(p.raw_call(VM, cmd::IOAS_ALLOC, &huge).0, -errno::E2BIG);
    assert_eq!(p.ioas_alloc(VM), Ok(2));
    // Unknown flags / non-zero reserved: EOPNOTSUPP.
    let mut a = abi::IoasAlloc {
        flags: 1,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::IOAS_ALLOC, &mut a), -errno::EOPNOTSUPP);
    let mut m = abi::IoasMap {
        flags: RW | (1 << 3),
        ioas_id: 1,
        addr: 0,
        length: 4096,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::IOAS_MAP, &mut m), -errno::EOPNOTSUPP);
    m.flags = RW;
    m.reserved = 1;
    assert_eq!(p.call(VM, cmd::IOAS_MAP, &mut m), -errno::EOPNOTSUPP);
    // Unknown command: ENOTTY. Argument outside RAM: EFAULT.
    assert_eq!(p.raw_call(VM, 0x7f, &[8, 0, 0, 0]).0, -errno::ENOTTY);
    assert_eq!(
        p.dispatch_at(VM, cmd::IOAS_ALLOC, 0x8000_0000),
        -errno::EFAULT
    );
    assert_eq!(
        p.dispatch_at(VM, cmd::IOAS_ALLOC, u64::MAX - 2),
        -errno::EFAULT
    );
}

#[test]
fn map_fixed_and_allocated_with_permissions() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    p.attach(VM, dev, ioas).unwrap();
    assert_eq!(
        p.map(VM, ioas, 0x10_0000, 0x2000, Some(0x40_0000), FIXED),
        Ok(0x40_0000)
    );
    assert_eq!(
        p.dma(VM, NIC, None, 0x40_1008, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x10_1008
        }
    );
    // Read-only mapping: writes fault.
    let iova = p
        .map(VM, ioas, 0x20_0000, 0x1000, None, map_flags::READABLE)
        .unwrap();
    assert_eq!(
        p.dma(VM, NIC, None, iova, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x20_0000
        }
    );
    assert!(matches!(
        p.dma(VM, NIC, None, iova, true),
        DmaOutcome::Fault(_)
    ));
    // Allocated IOVAs never overlap existing ones.
    assert!(iova + 0x1000 <= 0x40_0000 || iova >= 0x40_2000);
    // Second RAM range is a different host range; still reachable.
    let hi = p.map(VM, ioas, 0x1_0000_0000, 0x1000, None, RW).unwrap();
    assert_eq!(
        p.dma(VM, NIC, None, hi, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x1_0000_0000
        }
    );
}

#[test]
fn map_error_rules() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    p.map(VM, ioas, 0, 0x4000, Some(0x10_0000), FIXED).unwrap();
    let before = p.iommufd.snapshot(VM);
    // No permission: EINVAL. Zero length: EINVAL.
    assert_eq!(p.map(VM, ioas, 0, 0x1000, None, 0), Err(errno::EINVAL));
    assert_eq!(p.map(VM, ioas, 0, 0, None, RW), Err(errno::EINVAL));
    // Overflowing iova + length and addr + length: EOVERFLOW.
    assert_eq!(
        p.map(VM, ioas, 0, 0x2000, Some(u64::MAX - 0xfff), FIXED),
        Err(errno::EOVERFLOW)
    );
    assert_eq!(
        p.map(VM, ioas, u64::MAX - 0xfff, 0x2000, None, RW),
        Err(errno::EOVERFLOW)
    );
    // All-ones IOVA or length: EOVERFLOW before anything else.
    assert_eq!(p.map(VM, 99, 0, u64::MAX, None, 0), Err(errno::EOVERFLOW));
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(u64::MAX), FIXED),
        Err(errno::EOVERFLOW)
    );
    assert_eq!(p.unmap(VM, ioas, 0x1000, u64::MAX), Err(errno::EOVERFLOW));
    // Unaligned.
    assert_eq!(p.map(VM, ioas, 0x10, 0x1000, None, RW), Err(errno::EINVAL));
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(0x20_0010), FIXED),
        Err(errno::EINVAL)
    );
    // Overlap with an existing mapping: EEXIST.
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(0x10_3000), FIXED),
        Err(errno::EEXIST)
    );
    assert_eq!(
        p.map(VM, ioas, 0, 0x2000, Some(0x0f_f000), FIXED),
        Err(errno::EEXIST)
    );
    // Not RAM of this VM: MMIO hole, unbacked GPA, RAM running into a hole.
    assert_eq!(
        p.map(VM, ioas, 0x8000_0000, 0x1000, None, RW),
        Err(errno::EFAULT)
    );
    assert_eq!(
        p.map(VM, ioas, 0x9000_0000, 0x1000, None, RW),
        Err(errno::EFAULT)
    );
    assert_eq!(
        p.map(VM, ioas, (64 << 20) - 0x1000, 0x2000, None, RW),
        Err(errno::EFAULT)
    );
    // Unknown IOAS: ENOENT.
    assert_eq!(p.map(VM, 99, 0, 0x1000, None, RW), Err(errno::ENOENT));
    assert_eq!(p.iommufd.snapshot(VM), before, "failed maps change nothing");
}

#[test]
fn unmap_rules() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    // Unmap all of an empty IOAS succeeds with 0; a range: ENOENT.
    assert_eq!(p.unmap(VM, ioas, 0, u64::MAX), Ok(0));
    assert_eq!(p.unmap(VM, ioas, 0x1000, 0x1000), Err(errno::ENOENT));
    p.map(VM, ioas, 0, 0x2000, Some(0x10_0000), FIXED).unwrap();
    p.map(VM, ioas, 0x2000, 0x2000, Some(0x10_2000), FIXED)
        .unwrap();
    p.map(VM, ioas, 0x4000, 0x1000, Some(0x20_0000), FIXED)
        .unwrap();
    let before = p.iommufd.snapshot(VM);
    // Partial overlap of an area: ENOENT, nothing unmapped (also the area
    // that was fully inside).
    assert_eq!(p.unmap(VM, ioas, 0x10_0000, 0x3000), Err(errno::ENOENT));
    assert_eq!(p.unmap(VM, ioas, 0x10_1000, 0x1000), Err(errno::ENOENT));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.unmap(VM, ioas, 0, 0), Err(errno::EINVAL));
    assert_eq!(p.unmap(VM, ioas, u64::MAX - 10, 100), Err(errno::EOVERFLOW));
    // A range covering two whole areas and a hole.
    assert_eq!(p.unmap(VM, ioas, 0x0f_0000, 0x10_0000), Ok(0x4000));
    assert_eq!(p.unmap(VM, ioas, 0, u64::MAX), Ok(0x1000));
    assert_eq!(p.unmap(VM, ioas, 0x20_0000, 0x1000), Err(errno::ENOENT));
}

#[test]
fn copy_shares_memory_and_checks_source() {
    let mut p = platform();
    let a = p.ioas_alloc(VM).unwrap();
    let b = p.ioas_alloc(VM).unwrap();
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    p.map(VM, a, 0x30_0000, 0x2000, Some(0x1000_0000), FIXED)
        .unwrap();
    p.map(VM, a, 0x50_0000, 0x1000, Some(0x1000_2000), FIXED)
        .unwrap();
    p.map(
        VM,
        a,
        0x60_0000,
        0x1000,
        Some(0x2000_0000),
        map_flags::FIXED_IOVA | map_flags::READABLE,
    )
    .unwrap();
    // A copy across two adjacent areas, part of each.
    let dst = p
        .copy(VM, b, a, 0x1000_1000, 0x2000, Some(0x7000_0000), FIXED)
        .unwrap();
    assert_eq!(dst, 0x7000_0000);
    p.attach(VM, dev, b).unwrap();
    assert_eq!(
        p.dma(VM, NIC, None, 0x7000_0000, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x30_1000
        }
    );
    assert_eq!(
        p.dma(VM, NIC, None, 0x7000_1004, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x50_0004
        }
    );
    // Holes: ENOENT. Writeable copy of a read-only mapping: EPERM.
    assert_eq!(
        p.copy(VM, b, a, 0x1000_0000, 0x4000, None, RW),
        Err(errno::ENOENT)
    );
    assert_eq!(
        p.copy(VM, b, a, 0x3000_0000, 0x1000, None, RW),
        Err(errno::ENOENT)
    );
    assert_eq!(
        p.copy(VM, b, a, 0x2000_0000, 0x1000, None, RW),
        Err(errno::EPERM)
    );
    assert!(
        p.copy(VM, b, a, 0x2000_0000, 0x1000, None, map_flags::READABLE)
            .is_ok()
    );
    // Destination overlap: EEXIST. Bad IDs: ENOENT. Overflow: EOVERFLOW.
    assert_eq!(
        p.copy(VM, b, a, 0x1000_0000, 0x1000, Some(0x7000_0000), FIXED),
        Err(errno::EEXIST)
    );
    assert_eq!(
        p.copy(VM, 42, a, 0x1000_0000, 0x1000, None, RW),
        Err(errno::ENOENT)
    );
    assert_eq!(
        p.copy(VM, b, a, u64::MAX - 0xfff, 0x2000, None, RW),
        Err(errno::EOVERFLOW)
    );
    // Unmapping the source keeps the copy alive.
    p.unmap(VM, a, 0, u64::MAX).unwrap();
    assert_eq!(
        p.dma(VM, NIC, None, 0x7000_0000, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x30_1000
        }
    );
}

#[test]
fn iova_ranges_and_allow_iovas() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    assert_eq!(p.iova_ranges(VM, ioas, 4), Ok((vec![(0, u64::MAX)], 4096)));
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    p.attach(VM, dev, ioas).unwrap();
    // 48-bit aperture and the MSI window are reserved.
    let expected = vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)];
    assert_eq!(p.iova_ranges(VM, ioas, 4), Ok((expected.clone(), 4096)));
    // Too small an array: EMSGSIZE with the count needed.
    assert_eq!(p.iova_ranges(VM, ioas, 1), Err((errno::EMSGSIZE, 2)));
    // Allowed ranges: overlapping each other → EINVAL, start > last →
    // EINVAL, reserved → EADDRINUSE.
    assert_eq!(
        p.allow_iovas(VM, ioas, &[(0x1000, 0x4fff), (0x4000, 0x8fff)]),
        Err(errno::EINVAL)
    );
    assert_eq!(
        p.allow_iovas(VM, ioas, &[(0x5000, 0x4fff)]),
        Err(errno::EINVAL)
    );
    assert_eq!(
        p.allow_iovas(VM, ioas, &[(0xfe00_0000, 0xfeff_ffff)]),
        Err(errno::EADDRINUSE)
    );
    // Allocation stays inside allowed ranges; ENOSPC when they are full.
    assert_eq!(
        p.allow_iovas(VM, ioas, &[(0x4000_0000, 0x4000_1fff)]),
        Ok(())
    );
    assert_eq!(p.map(VM, ioas, 0, 0x1000, None, RW), Ok(0x4000_0000));
    assert_eq!(p.map(VM, ioas, 0, 0x1000, None, RW), Ok(0x4000_1000));
    assert_eq!(p.map(VM, ioas, 0, 0x1000, None, RW), Err(errno::ENOSPC));
    // Fixed IOVAs outside the allowed ranges are still fine (as in iommufd).
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(0x10_0000), FIXED),
        Ok(0x10_0000)
    );
    // Fixed IOVA in the MSI window: EINVAL.
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(0xfee0_0000), FIXED),
        Err(errno::EINVAL)
    );
    // An empty list clears the allowed ranges.
    assert_eq!(p.allow_iovas(VM, ioas, &[]), Ok(()));
    assert_eq!(p.map(VM, ioas, 0, 0x1000, None, RW), Ok(0));
}

#[test]
fn huge_pages_option() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    assert_eq!(p.huge_pages(VM, ioas, None), Ok(1));
    assert_eq!(p.huge_pages(VM, ioas, Some(2)), Err(errno::EINVAL));
    assert_eq!(p.huge_pages(VM, 77, None), Err(errno::ENOENT));
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    let hwpt = p.attach(VM, dev, ioas).unwrap();
    // A 2 MiB-aligned 4 MiB mapping uses large pages: one root table, no
    // leaf tables.
    let pages_before = p.iommufd.page_table_pages(VM);
    p.map(VM, ioas, 0x20_0000, 0x40_0000, Some(0x4000_0000), FIXED)
        .unwrap();
    assert_eq!(p.iommufd.page_table_pages(VM), pages_before);
    // With mappings in a HWPT, huge pages cannot be turned off (EINVAL).
    assert_eq!(p.huge_pages(VM, ioas, Some(0)), Err(errno::EINVAL));
    p.unmap(VM, ioas, 0, u64::MAX).unwrap();
    assert_eq!(p.huge_pages(VM, ioas, Some(0)), Ok(0));
    p.map(VM, ioas, 0x20_0000, 0x40_0000, Some(0x4000_0000), FIXED)
        .unwrap();
    assert_eq!(
        p.iommufd.page_table_pages(VM),
        pages_before + 2,
        "two leaf tables"
    );
    assert!(hwpt > 0);
    let mut o = abi::IommuOption {
        option_id: 9,
        object_id: ioas,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::OPTION, &mut o), -errno::EOPNOTSUPP);
}

#[test]
fn destroy_of_ioas_in_use_is_ebusy() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    p.map(VM, ioas, 0, 0x1000, None, RW).unwrap();
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    let hwpt = p.hwpt_alloc(VM, dev, ioas, 0, None).unwrap();
    assert_eq!(p.destroy(VM, ioas), Err(errno::EBUSY));
    p.attach(VM, dev, hwpt).unwrap();
    assert_eq!(p.destroy(VM, hwpt), Err(errno::EBUSY));
    assert_eq!(p.destroy(VM, dev), Err(errno::EBUSY));
    p.detach(VM, dev, None).unwrap();
    assert_eq!(p.destroy(VM, hwpt), Ok(()));
    assert_eq!(p.destroy(VM, ioas), Ok(()));
    assert_eq!(p.iommufd.page_table_pages(VM), 0);
}

#[test]
fn a_vm_cannot_map_another_vms_memory() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VmId(2)).unwrap();
    // VM 2 has 16 MiB; 32 MiB exists only in VM 1.
    assert_eq!(
        p.map(VmId(2), ioas, 32 << 20, 0x1000, None, RW),
        Err(errno::EFAULT)
    );
    // VM 1's objects are invisible to VM 2.
    let a = p.ioas_alloc(VM).unwrap();
    let b = p.ioas_alloc(VM).unwrap();
    assert_eq!(p.destroy(VmId(2), b), Err(errno::ENOENT));
    assert!(a != b);
    // And VM 2 cannot bind VM 1's device.
    assert!(p.bind(VmId(2), NIC).is_err());
}
