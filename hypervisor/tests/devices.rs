//! Device-centric calls: list, bind / unbind with group rules and MSI
//! isolation, attach / replace / detach with automatic HWPTs, reserved
//! regions. Errno values follow Linux iommufd where it has an equivalent.

use sluice_abi::{self as abi, cmd, errno, hw_caps, map_flags};
use sluice_hypervisor::iommufd::{AttachTarget, FaultReason, Quota, VmConfig, VmId};
use sluice_hypervisor::testing::{DeviceSetup, DmaOutcome, Platform, VmSetup};

const VM: VmId = VmId(1);
const OTHER: VmId = VmId(2);
const RW: u32 = map_flags::READABLE | map_flags::WRITEABLE;
const FIXED: u32 = map_flags::FIXED_IOVA | RW;
const A: u32 = abi::bdf(0, 0, 3, 0);
const B: u32 = abi::bdf(0, 0, 3, 1);
const C: u32 = abi::bdf(0, 0, 4, 0);

fn vm_setup() -> VmSetup {
    VmSetup::new().ram(0, 64 << 20)
}

/// A and B share group 1; C is alone.
fn platform() -> Platform {
    Platform::builder()
        .vm(VM, vm_setup())
        .vm(OTHER, VmSetup::new().ram(0, 16 << 20))
        .device(DeviceSetup::new(VM, A).group(1))
        .device(DeviceSetup::new(VM, B).group(1))
        .device(DeviceSetup::new(VM, C).group(2))
        .build()
}

#[test]
fn device_list_shows_the_guest_view() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(
            DeviceSetup::new(VM, abi::bdf(0, 1, 0, 0))
                .group(5)
                .pasid(20, 16),
        )
        .device(
            DeviceSetup::new(VM, abi::bdf(0, 0, 2, 0))
                .group(6)
                .snoop_control(false)
                .flr(false),
        )
        .build();
    let list = p.device_list(VM).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        list[0].guest_bdf,
        abi::bdf(0, 0, 2, 0),
        "sorted by guest BDF"
    );
    assert_eq!(list[0].group_id, 6);
    assert_eq!(list[0].dev_id, 0, "not bound yet");
    assert_eq!(list[0].capabilities & hw_caps::ENFORCE_SNOOP, 0);
    assert_eq!(list[0].capabilities & hw_caps::FLR, 0);
    assert_eq!(list[1].max_pasid_log2, 16);
    assert_ne!(list[1].capabilities & hw_caps::SCALABLE_MODE, 0);
    assert_ne!(list[1].capabilities & hw_caps::INTERRUPT_REMAPPING, 0);
    let bound = p.bind(VM, abi::bdf(0, 1, 0, 0)).unwrap();
    assert_eq!(p.device_list(VM).unwrap()[1].dev_id, bound.dev_id);
    // Array too small: EMSGSIZE with the count.
    let mut a = abi::DeviceList {
        num_devices: 1,
        devices: p.scratch(VM) + 4096,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::DEVICE_LIST, &mut a), -errno::EMSGSIZE);
    assert_eq!(a.num_devices, 2);
}

#[test]
fn bind_rules() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .vm(OTHER, VmSetup::new().ram(0, 16 << 20))
        .device(DeviceSetup::new(VM, A).group(1))
        .device(DeviceSetup::new(VM, B).group(1))
        .device(DeviceSetup::new(VM, C).group(2))
        // Group 2 is split between two VMs.
        .device(DeviceSetup::new(OTHER, A).group(2))
        // Group 3 has a member the host keeps.
        .device(DeviceSetup::new(VM, abi::bdf(0, 0, 9, 0)).group(3))
        .host_device(3)
        .build();
    assert_eq!(p.bind(VM, abi::bdf(0, 0, 9, 0)), Err(errno::EPERM));
    // Not assigned to this VM: ENODEV.
    assert_eq!(p.bind(VM, abi::bdf(0, 9, 0, 0)), Err(errno::ENODEV));
    // A group member in another VM: EPERM, for both VMs.
    assert_eq!(p.bind(VM, C), Err(errno::EPERM));
    assert_eq!(p.bind(OTHER, A), Err(errno::EPERM));
    // The bind result names the group and all its devices.
    let a = p.bind(VM, A).unwrap();
    assert_eq!(a.dev_id, 1);
    assert_eq!(a.group, 1);
    assert_eq!(a.group_bdfs, vec![A, B]);
    assert_eq!(p.bind(VM, A), Err(errno::EBUSY));
    // Group array too small: EMSGSIZE, count returned, nothing bound.
    let mut arg = abi::DeviceBind {
        guest_bdf: B,
        num_group_devices: 1,
        group_devices: p.scratch(VM) + 8192,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::DEVICE_BIND, &mut arg), -errno::EMSGSIZE);
    assert_eq!(arg.num_group_devices, 2);
    assert_eq!(
        p.device_list(VM)
            .unwrap()
            .iter()
            .filter(|d| d.dev_id != 0)
            .count(),
        1
    );
    // The whole group is blocked from the first bind on.
    for bdf in [A, B] {
        let dev = p.device_id(VM, bdf);
        assert_eq!(
            p.iommufd.backend().attachment(dev, None),
            AttachTarget::Blocking
        );
        assert_eq!(
            p.dma(VM, bdf, None, 0x1000, false),
            DmaOutcome::Fault(FaultReason::Blocked)
        );
    }
    // Unbind, bind again: same lowest free ID.
    assert_eq!(p.unbind(VM, a.dev_id), Ok(()));
    assert_eq!(p.unbind(VM, a.dev_id), Err(errno::ENOENT));
    assert_eq!(p.bind(VM, A).unwrap().dev_id, 1);
}

#[test]
fn msi_isolation_is_required_unless_the_vm_allows_unsafe_interrupts() {
    let no_ir = |vm| DeviceSetup::new(vm, A).interrupt_remapping(false);
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .vm(
            OTHER,
            VmSetup::new().ram(0, 16 << 20).config(VmConfig {
                allow_unsafe_interrupts: true,
                ..Default::default()
            }),
        )
        .device(no_ir(VM))
        .device(no_ir(OTHER))
        .build();
    assert_eq!(p.bind(VM, A), Err(errno::EPERM));
    let bound = p.bind(OTHER, A).unwrap();
    let info = p.hw_info(OTHER, bound.dev_id).unwrap();
    assert_eq!(info.out_capabilities & hw_caps::INTERRUPT_REMAPPING, 0);
}

#[test]
fn automatic_hwpt_is_shared_reused_and_destroyed_with_its_last_device() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    p.map(VM, ioas, 0x10_0000, 0x1000, Some(0x1000), FIXED)
        .unwrap();
    let h1 = p.attach(VM, a, ioas).unwrap();
    assert_eq!(p.attach(VM, a, ioas), Err(errno::EBUSY));
    let h2 = p.attach(VM, c, ioas).unwrap();
    assert_eq!(h1, h2, "compatible devices share the automatic HWPT");
    assert_eq!(p.destroy(VM, h1), Err(errno::EBUSY));
    assert_eq!(
        p.dma(VM, C, None, 0x1000, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x10_0000
        }
    );
    // Mappings made after attach are mirrored too.
    p.map(VM, ioas, 0x20_0000, 0x1000, Some(0x2000), FIXED)
        .unwrap();
    assert_eq!(
        p.dma(VM, A, None, 0x2000, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x20_0000
        }
    );
    p.detach(VM, a, None).unwrap();
    assert_eq!(p.detach(VM, a, None), Err(errno::EINVAL));
    assert_eq!(
        p.dma(VM, A, None, 0x2000, true),
        DmaOutcome::Fault(FaultReason::Blocked)
    );
    assert_eq!(p.iommufd.backend().domain_count(), 1);
    p.detach(VM, c, None).unwrap();
    assert_eq!(p.iommufd.backend().domain_count(), 0, "auto HWPT freed");
    assert_eq!(p.destroy(VM, h1), Err(errno::ENOENT));
    assert_eq!(p.destroy(VM, ioas), Ok(()));
    assert_eq!(p.host.live_pages(), 0);
}

#[test]
fn attach_argument_errors() {
    let mut p = platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    let fault = p.fault_queue_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    assert_eq!(p.attach(VM, a, 99), Err(errno::ENOENT));
    assert_eq!(p.attach(VM, a, fault), Err(errno::EINVAL));
    assert_eq!(p.attach(VM, 99, ioas), Err(errno::ENOENT));
    assert_eq!(p.attach(VM, ioas, ioas), Err(errno::ENOENT), "not a device");
    let mut arg = abi::DeviceAttach {
        dev_id: a,
        pt_id: ioas,
        pasid: 5,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::DEVICE_ATTACH, &mut arg), -errno::EINVAL);
    arg.flags = 2;
    assert_eq!(p.call(VM, cmd::DEVICE_ATTACH, &mut arg), -errno::EOPNOTSUPP);
    // Replace / detach of a device that is not attached: EINVAL.
    assert_eq!(p.replace(VM, a, ioas), Err(errno::EINVAL));
    assert_eq!(p.detach(VM, a, None), Err(errno::EINVAL));
}

#[test]
fn group_members_share_one_hwpt_and_replace_moves_the_group() {
    let mut p = platform();
    let ioas1 = p.ioas_alloc(VM).unwrap();
    let ioas2 = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let b = p.bind(VM, B).unwrap().dev_id;
    p.map(VM, ioas1, 0x10_0000, 0x1000, Some(0x5000), FIXED)
        .unwrap();
    p.map(VM, ioas2, 0x30_0000, 0x1000, Some(0x5000), FIXED)
        .unwrap();
    let explicit = p.hwpt_alloc(VM, a, ioas2, 0, None).unwrap();
    let h1 = p.attach(VM, a, ioas1).unwrap();
    // The other member: a different HWPT → EINVAL; the same IOAS → same HWPT.
    assert_eq!(p.attach(VM, b, explicit), Err(errno::EINVAL));
    assert_eq!(p.attach(VM, b, ioas2), Err(errno::EINVAL));
    assert_eq!(p.attach(VM, b, ioas1), Ok(h1));
    // Replace one member: the whole group moves.
    assert_eq!(p.replace(VM, b, explicit), Ok(explicit));
    for bdf in [A, B] {
        assert_eq!(
            p.dma(VM, bdf, None, 0x5000, false),
            DmaOutcome::Ram {
                vm: VM,
                gpa: 0x30_0000
            }
        );
    }
    assert_eq!(p.iommufd.backend().domain_count(), 1, "old auto HWPT freed");
    // Replace back to an IOAS: a new automatic HWPT.
    let h3 = p.replace(VM, a, ioas1).unwrap();
    assert_ne!(h3, explicit);
    assert_eq!(
        p.dma(VM, B, None, 0x5000, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x10_0000
        }
    );
    // Replace to the current HWPT is a no-op.
    assert_eq!(p.replace(VM, a, h3), Ok(h3));
    // A failing replace changes nothing: ioas2 gets a mapping inside the MSI
    // window, which the group's devices need reserved.
    p.destroy(VM, explicit).unwrap();
    p.map(VM, ioas2, 0x40_0000, 0x1000, Some(0xfee0_0000), FIXED)
        .unwrap();
    let before = p.iommufd.snapshot(VM);
    assert_eq!(p.replace(VM, a, ioas2), Err(errno::EADDRINUSE));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.iommufd.backend().domain_count(), 1);
    for bdf in [A, B] {
        assert_eq!(
            p.dma(VM, bdf, None, 0x5000, false),
            DmaOutcome::Ram {
                vm: VM,
                gpa: 0x10_0000
            }
        );
    }
}

#[test]
fn unbind_detaches_blocks_and_resets() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, A))
        .device(DeviceSetup::new(VM, C).flr(false))
        .build();
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    p.attach(VM, a, ioas).unwrap();
    p.attach(VM, c, ioas).unwrap();
    p.map(VM, ioas, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    p.unbind(VM, a).unwrap();
    assert_eq!(
        p.dma(VM, A, None, 0x1000, false),
        DmaOutcome::Fault(FaultReason::Blocked)
    );
    assert_eq!(p.iommufd.backend().resets(p.device_id(VM, A)), 1);
    assert_eq!(p.hw_info(VM, a).map(|_| ()), Err(errno::ENOENT));
    p.unbind(VM, c).unwrap();
    assert_eq!(p.iommufd.backend().resets(p.device_id(VM, C)), 0, "no FLR");
    assert_eq!(p.iommufd.backend().domain_count(), 0);
    // The MSI reservation left with the devices.
    assert_eq!(p.iova_ranges(VM, ioas, 4).unwrap().0, vec![(0, u64::MAX)]);
}

#[test]
fn reserved_regions_msi_window_and_rmrr() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, A).rmrr(0xd000_0000, 0xd00f_ffff))
        .device(DeviceSetup::new(VM, C))
        .build();
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    // A mapping in the MSI window blocks the attach: EADDRINUSE.
    p.map(VM, ioas, 0, 0x1000, Some(0xfee0_1000), FIXED)
        .unwrap();
    assert_eq!(p.attach(VM, c, ioas), Err(errno::EADDRINUSE));
    assert_eq!(
        p.iommufd.backend().domain_count(),
        0,
        "the auto HWPT was undone"
    );
    p.unmap(VM, ioas, 0, u64::MAX).unwrap();
    // An allowed range over the RMRR blocks the attach as well.
    p.allow_iovas(VM, ioas, &[(0xd000_0000, 0xd000_ffff)])
        .unwrap();
    assert_eq!(p.attach(VM, a, ioas), Err(errno::EADDRINUSE));
    p.allow_iovas(VM, ioas, &[]).unwrap();
    p.attach(VM, a, ioas).unwrap();
    let (ranges, align) = p.iova_ranges(VM, ioas, 8).unwrap();
    assert_eq!(
        ranges,
        vec![
            (0, 0xcfff_ffff),
            (0xd010_0000, 0xfedf_ffff),
            (0xfef0_0000, (1 << 48) - 1)
        ]
    );
    assert_eq!(align, 4096);
    // Reserved ranges refuse fixed maps (EINVAL) and allowed ranges
    // (EADDRINUSE); allocation avoids them.
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(0xd000_0000), FIXED),
        Err(errno::EINVAL)
    );
    assert_eq!(
        p.allow_iovas(VM, ioas, &[(0xc000_0000, 0xd000_0fff)]),
        Err(errno::EADDRINUSE)
    );
    p.allow_iovas(VM, ioas, &[(0xcfff_f000, 0xd01f_ffff)])
        .unwrap_err();
    p.allow_iovas(VM, ioas, &[(0xd010_0000, 0xd01f_ffff)])
        .unwrap();
    assert_eq!(p.map(VM, ioas, 0, 0x2000, None, RW), Ok(0xd010_0000));
    // Detach releases the RMRR reservation.
    p.unmap(VM, ioas, 0, u64::MAX).unwrap();
    p.allow_iovas(VM, ioas, &[]).unwrap();
    p.detach(VM, a, None).unwrap();
    assert_eq!(p.iova_ranges(VM, ioas, 8).unwrap().0, vec![(0, u64::MAX)]);
}

#[test]
fn domain_aperture_and_page_size_shape_the_ioas() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, A).input_address_bits(39))
        .device(DeviceSetup::new(VM, C).unit(1).page_sizes(1 << 16))
        .build();
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    // A mapping above the 39-bit aperture: the attach fails (EADDRINUSE).
    p.map(VM, ioas, 0, 0x1000, Some(1 << 40), FIXED).unwrap();
    assert_eq!(p.attach(VM, a, ioas), Err(errno::EADDRINUSE));
    p.unmap(VM, ioas, 0, u64::MAX).unwrap();
    p.attach(VM, a, ioas).unwrap();
    let (ranges, _) = p.iova_ranges(VM, ioas, 8).unwrap();
    assert_eq!(ranges.last(), Some(&(0xfef0_0000, (1 << 39) - 1)));
    // 64 KiB pages: 4 KiB-aligned mappings refuse the domain; afterwards the
    // IOAS alignment is 64 KiB.
    p.map(VM, ioas, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    assert_eq!(p.attach(VM, c, ioas), Err(errno::EADDRINUSE));
    p.unmap(VM, ioas, 0, u64::MAX).unwrap();
    p.attach(VM, c, ioas).unwrap();
    assert_eq!(p.iova_ranges(VM, ioas, 8).unwrap().1, 0x1_0000);
    assert_eq!(
        p.map(VM, ioas, 0, 0x1_0000, Some(0x1000), FIXED),
        Err(errno::EINVAL)
    );
    assert_eq!(p.map(VM, ioas, 0, 0x1000, None, RW), Err(errno::EINVAL));
    let iova = p.map(VM, ioas, 0, 0x1_0000, None, RW).unwrap();
    assert_eq!(iova % 0x1_0000, 0);
}

#[test]
fn explicit_hwpt_rules() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, A).unit(0))
        .device(DeviceSetup::new(VM, C).unit(1))
        .build();
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    p.map(VM, ioas, 0x10_0000, 0x3000, Some(0x8000), FIXED)
        .unwrap();
    // HWPT_ALLOC mirrors existing mappings from the start.
    let h = p.hwpt_alloc(VM, a, ioas, 0, None).unwrap();
    assert_eq!(p.attach(VM, a, h), Ok(h));
    assert_eq!(
        p.dma(VM, A, None, 0xa000, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x10_2000
        }
    );
    // Another IOMMU unit cannot use that domain: EINVAL; IOAS target gets
    // its own HWPT.
    assert_eq!(p.attach(VM, c, h), Err(errno::EINVAL));
    let hc = p.attach(VM, c, ioas).unwrap();
    assert_ne!(hc, h);
    // Argument checks.
    assert_eq!(p.hwpt_alloc(VM, 99, ioas, 0, None), Err(errno::ENOENT));
    assert_eq!(p.hwpt_alloc(VM, a, 99, 0, None), Err(errno::ENOENT));
    assert_eq!(
        p.hwpt_alloc(VM, a, h, 0, None),
        Err(errno::EOPNOTSUPP),
        "nesting"
    );
    assert_eq!(
        p.hwpt_alloc(VM, a, ioas, abi::hwpt_flags::DIRTY_TRACKING, None),
        Err(errno::EOPNOTSUPP)
    );
    assert_eq!(
        p.hwpt_alloc(VM, a, ioas, 1 << 9, None),
        Err(errno::EOPNOTSUPP)
    );
    let mut arg = abi::HwptAlloc {
        dev_id: a,
        pt_id: ioas,
        data_type: 7,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::HWPT_ALLOC, &mut arg), -errno::EOPNOTSUPP);
    arg.data_type = 0;
    arg.reserved = 1;
    assert_eq!(p.call(VM, cmd::HWPT_ALLOC, &mut arg), -errno::EOPNOTSUPP);
    // Explicit HWPTs stay after their devices detach; DESTROY frees them.
    p.detach(VM, a, None).unwrap();
    assert_eq!(p.destroy(VM, h), Ok(()));
    assert_eq!(p.iommufd.backend().domain_count(), 1);
}

#[test]
fn guest_bdf_may_differ_from_the_host_and_between_vms() {
    // Both VMs see "their" device at 00:03.0; they are different devices.
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .vm(OTHER, VmSetup::new().ram(0, 16 << 20))
        .device(DeviceSetup::new(VM, A))
        .device(DeviceSetup::new(OTHER, A))
        .build();
    assert_ne!(p.device_id(VM, A), p.device_id(OTHER, A));
    let i1 = p.ioas_alloc(VM).unwrap();
    let i2 = p.ioas_alloc(OTHER).unwrap();
    let d1 = p.bind(VM, A).unwrap().dev_id;
    let d2 = p.bind(OTHER, A).unwrap().dev_id;
    p.attach(VM, d1, i1).unwrap();
    p.attach(OTHER, d2, i2).unwrap();
    p.map(VM, i1, 0x1000, 0x1000, Some(0x10000), FIXED).unwrap();
    p.map(OTHER, i2, 0x2000, 0x1000, Some(0x10000), FIXED)
        .unwrap();
    assert_eq!(
        p.dma(VM, A, None, 0x10000, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x1000
        }
    );
    assert_eq!(
        p.dma(OTHER, A, None, 0x10000, true),
        DmaOutcome::Ram {
            vm: OTHER,
            gpa: 0x2000
        }
    );
}

#[test]
fn object_quota_gives_enomem_and_loses_nothing() {
    let mut p = Platform::builder()
        .vm(
            VM,
            vm_setup().config(VmConfig {
                quota: Quota {
                    max_objects: 3,
                    ..Default::default()
                },
                ..Default::default()
            }),
        )
        .device(DeviceSetup::new(VM, A))
        .build();
    let i1 = p.ioas_alloc(VM).unwrap();
    let d = p.bind(VM, A).unwrap().dev_id;
    p.map(VM, i1, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    let _h = p.attach(VM, d, i1).unwrap();
    let before = p.iommufd.snapshot(VM);
    assert_eq!(p.ioas_alloc(VM), Err(errno::ENOMEM));
    assert_eq!(p.fault_queue_alloc(VM), Err(errno::ENOMEM));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(
        p.dma(VM, A, None, 0x1000, false),
        DmaOutcome::Ram { vm: VM, gpa: 0 }
    );
}

#[test]
fn hardware_attach_failures_change_nothing() {
    let mut p = platform();
    let ioas1 = p.ioas_alloc(VM).unwrap();
    let ioas2 = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let b = p.bind(VM, B).unwrap().dev_id;
    p.map(VM, ioas1, 0x10_0000, 0x1000, Some(0x5000), FIXED)
        .unwrap();
    p.map(VM, ioas2, 0x30_0000, 0x1000, Some(0x5000), FIXED)
        .unwrap();
    // A failing attach to an IOAS undoes the automatic HWPT it made.
    p.iommufd.backend_mut().fail_attach_after(Some(0));
    let before = p.iommufd.snapshot(VM);
    assert_eq!(p.attach(VM, a, ioas1), Err(errno::EINVAL));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.iommufd.backend().domain_count(), 0);
    let h = p.attach(VM, a, ioas1).unwrap();
    p.attach(VM, b, ioas1).unwrap();
    // The second device of the group fails to move: the first goes back.
    p.iommufd.backend_mut().fail_attach_after(Some(1));
    let before = p.iommufd.snapshot(VM);
    let live = p.host.live_pages();
    assert_eq!(p.replace(VM, a, ioas2), Err(errno::EINVAL));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.host.live_pages(), live);
    for bdf in [A, B] {
        let dev = p.device_id(VM, bdf);
        let domain = before.hwpts.iter().find(|x| x.id == h).unwrap().domain;
        assert_eq!(
            p.iommufd.backend().attachment(dev, None),
            AttachTarget::Domain(domain)
        );
        assert_eq!(
            p.dma(VM, bdf, None, 0x5000, false),
            DmaOutcome::Ram {
                vm: VM,
                gpa: 0x10_0000
            }
        );
    }
}

#[test]
fn malformed_firmware_rmrr_is_refused_at_assignment() {
    use sluice_hypervisor::iommufd::{AssignedDevice, DeviceId, Error, IommuCaps};
    let mut p = platform();
    let caps = IommuCaps {
        unit: 0,
        snoop_control: true,
        interrupt_remapping: true,
        scalable_mode: false,
        max_pasid_log2: 0,
        page_sizes: 1 << 12,
        input_address_bits: 48,
    };
    p.iommufd
        .backend_mut()
        .add_device(DeviceId(50), caps, false);
    let device = |rmrrs, guest_bdf| AssignedDevice {
        device: DeviceId(50),
        guest_bdf,
        group: 9,
        rmrrs,
        no_snoop: false,
        flr: false,
        pasid_log2: 0,
        msi_doorbell: None,
    };
    let fresh = abi::bdf(0, 0, 7, 0);
    assert_eq!(
        p.iommufd
            .assign_device(VM, device(vec![(0xd000_0000, 0xcfff_ffff)], fresh)),
        Err(Error::Invalid("RMRR with start > last"))
    );
    // A guest BDF already used in the VM is refused too.
    assert!(matches!(
        p.iommufd.assign_device(VM, device(vec![], A)),
        Err(Error::Exists(_))
    ));
    assert_eq!(p.iommufd.assign_device(VM, device(vec![], fresh)), Ok(()));
    assert!(matches!(
        p.iommufd.assign_device(VM, device(vec![], fresh)),
        Err(Error::Busy(_))
    ));
    assert_eq!(p.bind(VM, fresh).map(|b| b.group), Ok(9));
}
