//! Coherency and the WBINVD policy, PASIDs and the vPASID table, fault
//! queues, page-table quotas and the allocation-failure sweep.

use sluice_abi::{
    self as abi, cmd, errno, fault_flags, fault_reason, hw_caps, hwpt_flags, map_flags, wbinvd,
};
use sluice_hypervisor::iommufd::{FaultReason, Quota, VmConfig, VmId};
use sluice_hypervisor::testing::{DeviceSetup, DmaOutcome, Platform, VmSetup};

const VM: VmId = VmId(1);
const RW: u32 = map_flags::READABLE | map_flags::WRITEABLE;
const FIXED: u32 = map_flags::FIXED_IOVA | RW;
const S: u32 = abi::bdf(0, 0, 1, 0);
const N: u32 = abi::bdf(0, 0, 2, 0);
const Q: u32 = abi::bdf(0, 0, 3, 0);
const P: u32 = abi::bdf(0, 0, 4, 0);
const L: u32 = abi::bdf(0, 0, 5, 0);

fn vm_setup() -> VmSetup {
    VmSetup::new().ram(0, 64 << 20)
}

#[test]
fn coherency_enforcement_and_wbinvd_policy() {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        // S: snoop control. N: no snoop control, issues no-snoop DMA. Q: no
        // snoop control, never issues no-snoop DMA.
        .device(DeviceSetup::new(VM, S))
        .device(DeviceSetup::new(VM, N).snoop_control(false))
        .device(DeviceSetup::new(VM, Q).snoop_control(false).no_snoop(false))
        .build();
    let ioas = p.ioas_alloc(VM).unwrap();
    let s = p.bind(VM, S).unwrap().dev_id;
    let n = p.bind(VM, N).unwrap().dev_id;
    let q = p.bind(VM, Q).unwrap().dev_id;
    assert_ne!(
        p.hw_info(VM, s).unwrap().out_capabilities & hw_caps::ENFORCE_SNOOP,
        0
    );
    assert_eq!(
        p.hw_info(VM, n).unwrap().out_capabilities & hw_caps::ENFORCE_SNOOP,
        0
    );
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));

    let hs = p.attach(VM, s, ioas).unwrap();
    let snap = p.iommufd.snapshot(VM);
    let hwpt = snap.hwpts.iter().find(|h| h.id == hs).unwrap();
    assert!(
        hwpt.enforce_coherency,
        "HWPT of a snoop-control device enforces"
    );
    assert!(
        p.iommufd
            .backend()
            .domain_config(hwpt.domain)
            .unwrap()
            .enforce_coherency
    );
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));

    // A device that cannot force snooping may not join an enforcing HWPT...
    let explicit = p.hwpt_alloc(VM, s, ioas, 0, None).unwrap();
    assert_eq!(p.attach(VM, n, explicit), Err(errno::EINVAL));
    assert_eq!(p.attach(VM, n, hs), Err(errno::EINVAL));
    // ...with an IOAS target it gets a separate, non-enforcing HWPT.
    let hn = p.attach(VM, n, ioas).unwrap();
    assert_ne!(hn, hs);
    let snap = p.iommufd.snapshot(VM);
    assert!(
        !snap
            .hwpts
            .iter()
            .find(|h| h.id == hn)
            .unwrap()
            .enforce_coherency
    );
    // Now no-snoop DMA can bypass the caches: WBINVD must flush.
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::FLUSH));
    p.map(VM, ioas, 0x1000, 0x1000, Some(0x1000), FIXED)
        .unwrap();
    assert_eq!(
        p.dma(VM, N, None, 0x1000, true),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x1000
        }
    );
    p.detach(VM, n, None).unwrap();
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));
    // A device that never issues no-snoop DMA on a non-enforcing HWPT: no-op.
    p.attach(VM, q, ioas).unwrap();
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));
    let mut arg = abi::WbinvdPolicy {
        flags: 1,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::WBINVD_POLICY, &mut arg), -errno::EOPNOTSUPP);
}

fn pasid_platform() -> Platform {
    Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, P).pasid(20, 8))
        .device(DeviceSetup::new(VM, L))
        .build()
}

#[test]
fn pasid_attach_rules() {
    let mut p = pasid_platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    let ioas2 = p.ioas_alloc(VM).unwrap();
    p.map(VM, ioas, 0x10_0000, 0x1000, Some(0x4000), FIXED)
        .unwrap();
    p.map(VM, ioas2, 0x20_0000, 0x1000, Some(0x4000), FIXED)
        .unwrap();
    let dp = p.bind(VM, P).unwrap().dev_id;
    let dl = p.bind(VM, L).unwrap().dev_id;
    // Width: device and IOMMU combined.
    assert_eq!(p.hw_info(VM, dp).unwrap().out_max_pasid_log2, 8);
    assert_eq!(p.hw_info(VM, dl).unwrap().out_max_pasid_log2, 0);
    // No scalable mode / PASID capability: EINVAL.
    assert_eq!(
        p.hwpt_alloc(VM, dl, ioas, hwpt_flags::PASID, None),
        Err(errno::EINVAL)
    );
    assert_eq!(p.attach_pasid(VM, dl, 1, ioas), Err(errno::EINVAL));
    let hp = p.hwpt_alloc(VM, dp, ioas, hwpt_flags::PASID, None).unwrap();
    let hn = p.hwpt_alloc(VM, dp, ioas2, 0, None).unwrap();
    assert_eq!(
        p.attach_pasid(VM, dp, 256, hp),
        Err(errno::EINVAL),
        "beyond 8 bits"
    );
    assert_eq!(
        p.attach_pasid(VM, dp, 5, hn),
        Err(errno::EINVAL),
        "HWPT without PASID flag"
    );
    // RID on a non-PASID-compatible HWPT forbids PASID attach.
    p.attach(VM, dp, hn).unwrap();
    assert_eq!(p.attach_pasid(VM, dp, 5, hp), Err(errno::EINVAL));
    p.detach(VM, dp, None).unwrap();
    assert_eq!(p.attach_pasid(VM, dp, 5, hp), Ok(hp));
    assert_eq!(p.attach_pasid(VM, dp, 5, hp), Err(errno::EBUSY));
    // ... and with PASIDs attached, the RID needs a PASID-compatible HWPT.
    assert_eq!(p.attach(VM, dp, hn), Err(errno::EINVAL));
    let hr = p.attach(VM, dp, ioas2).unwrap();
    assert!(
        p.iommufd
            .snapshot(VM)
            .hwpts
            .iter()
            .any(|h| h.id == hr && h.pasid_compatible)
    );
    // Translation per (device, PASID).
    assert_eq!(
        p.dma(VM, P, Some(5), 0x4000, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x10_0000
        }
    );
    assert_eq!(
        p.dma(VM, P, None, 0x4000, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x20_0000
        }
    );
    assert_eq!(
        p.dma(VM, P, Some(6), 0x4000, false),
        DmaOutcome::Fault(FaultReason::Blocked)
    );
    // Replace the PASID to the IOAS of the RID.
    let h2 = p.replace_pasid(VM, dp, 5, ioas2).unwrap();
    assert_eq!(h2, hr, "the PASID-compatible automatic HWPT is reused");
    assert_eq!(
        p.dma(VM, P, Some(5), 0x4000, false),
        DmaOutcome::Ram {
            vm: VM,
            gpa: 0x20_0000
        }
    );
    assert_eq!(
        p.replace_pasid(VM, dp, 7, ioas2),
        Err(errno::EINVAL),
        "not attached"
    );
    p.detach(VM, dp, Some(5)).unwrap();
    assert_eq!(p.detach(VM, dp, Some(5)), Err(errno::EINVAL));
    assert_eq!(
        p.dma(VM, P, Some(5), 0x4000, false),
        DmaOutcome::Fault(FaultReason::Blocked)
    );
}

#[test]
fn vpasid_table_links_only_attached_pasids() {
    let mut p = pasid_platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    let dp = p.bind(VM, P).unwrap().dev_id;
    let hp = p.hwpt_alloc(VM, dp, ioas, hwpt_flags::PASID, None).unwrap();
    assert_eq!(p.vpasid_set(VM, dp, 100, 5), Err(errno::EINVAL));
    p.attach_pasid(VM, dp, 5, hp).unwrap();
    assert_eq!(p.vpasid_set(VM, dp, 100, 5), Ok(()));
    assert_eq!(p.iommufd.translate_vpasid(VM, 100), Some(5));
    assert_eq!(p.vpasid_set(VM, dp, 100, 5), Err(errno::EEXIST));
    assert_eq!(p.vpasid_set(VM, 77, 101, 5), Err(errno::ENOENT));
    // Detaching the PASID drops the link.
    p.detach(VM, dp, Some(5)).unwrap();
    assert_eq!(p.iommufd.translate_vpasid(VM, 100), None);
    assert_eq!(p.vpasid_clear(VM, 100), Err(errno::ENOENT));
    p.attach_pasid(VM, dp, 5, hp).unwrap();
    p.vpasid_set(VM, dp, 100, 5).unwrap();
    assert_eq!(p.vpasid_clear(VM, 100), Ok(()));
    assert_eq!(p.iommufd.translate_vpasid(VM, 100), None);
}

#[test]
fn faults_reach_the_queue_of_their_hwpt() {
    let mut p = pasid_platform();
    let ioas = p.ioas_alloc(VM).unwrap();
    let dp = p.bind(VM, P).unwrap().dev_id;
    let dl = p.bind(VM, L).unwrap().dev_id;
    let f = p.fault_queue_alloc(VM).unwrap();
    assert_eq!(
        p.hwpt_alloc(VM, dp, ioas, 0, Some(ioas)),
        Err(errno::ENOENT)
    );
    let h = p
        .hwpt_alloc(VM, dp, ioas, hwpt_flags::PASID, Some(f))
        .unwrap();
    assert_eq!(p.destroy(VM, f), Err(errno::EBUSY));
    p.attach(VM, dp, h).unwrap();
    p.attach_pasid(VM, dp, 3, h).unwrap();
    p.attach(VM, dl, ioas).unwrap();
    p.map(
        VM,
        ioas,
        0,
        0x1000,
        Some(0x1000),
        map_flags::FIXED_IOVA | map_flags::READABLE,
    )
    .unwrap();
    p.dma(VM, P, None, 0x5000, false);
    p.dma(VM, P, Some(3), 0x1000, true);
    // A device on a HWPT without a queue: its faults go nowhere.
    p.dma(VM, L, None, 0x5000, false);
    let (records, overflow) = p.fault_read(VM, f, 8).unwrap();
    assert_eq!(overflow, 0);
    assert_eq!(
        records,
        vec![
            abi::FaultRecord {
                dev_id: dp,
                pasid: 0,
                flags: 0,
                reason: fault_reason::NOT_PRESENT,
                iova: 0x5000,
            },
            abi::FaultRecord {
                dev_id: dp,
                pasid: 3,
                flags: fault_flags::PASID_VALID | fault_flags::WRITE,
                reason: fault_reason::PERMISSION,
                iova: 0x1000,
            },
        ]
    );
    // Overflow is counted, never blocking.
    for i in 0..70 {
        p.dma(VM, P, None, 0x10_0000 + i * 0x1000, false);
    }
    let (records, overflow) = p.fault_read(VM, f, 10).unwrap();
    assert_eq!((records.len(), overflow), (10, 70 - 64));
    assert_eq!(records[0].iova, 0x10_0000);
    let (records, overflow) = p.fault_read(VM, f, 100).unwrap();
    assert_eq!((records.len(), overflow), (54, 0));
    // A read into memory that is not RAM fails and loses nothing.
    p.dma(VM, P, None, 0x9000, false);
    p.iommufd.process_faults();
    let mut arg = abi::FaultRead {
        fault_id: f,
        num_records: 4,
        records: 0x9000_0000,
        ..Default::default()
    };
    assert_eq!(p.call(VM, cmd::FAULT_READ, &mut arg), -errno::EFAULT);
    let (records, _) = p.fault_read(VM, f, 4).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].iova, 0x9000);
    assert_eq!(p.fault_read(VM, h, 4), Err(errno::ENOENT));
    // Once the HWPT is gone the queue can be destroyed.
    p.unbind(VM, dp).unwrap();
    p.destroy(VM, h).unwrap();
    assert_eq!(p.destroy(VM, f), Ok(()));
}

#[test]
fn page_table_quota_gives_enomem_and_loses_nothing() {
    let mut p = Platform::builder()
        .vm(
            VM,
            vm_setup().config(VmConfig {
                quota: Quota {
                    max_page_table_pages: 3,
                    ..Default::default()
                },
                ..Default::default()
            }),
        )
        .device(DeviceSetup::new(VM, S))
        .build();
    let ioas = p.ioas_alloc(VM).unwrap();
    let d = p.bind(VM, S).unwrap().dev_id;
    p.attach(VM, d, ioas).unwrap(); // root table: 1 page
    p.map(VM, ioas, 0, 0x1000, Some(0), FIXED).unwrap(); // leaf: 2
    p.map(VM, ioas, 0, 0x1000, Some(2 << 20), FIXED).unwrap(); // leaf: 3
    assert_eq!(p.iommufd.page_table_pages(VM), 3);
    let before = p.iommufd.snapshot(VM);
    let live = p.host.live_pages();
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(4 << 20), FIXED),
        Err(errno::ENOMEM)
    );
    assert_eq!(p.hwpt_alloc(VM, d, ioas, 0, None), Err(errno::ENOMEM));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.host.live_pages(), live);
    // Within an existing leaf table there is still room.
    p.map(VM, ioas, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    p.unmap(VM, ioas, 2 << 20, 0x1000).unwrap();
    p.map(VM, ioas, 0, 0x1000, Some(4 << 20), FIXED).unwrap();
    assert_eq!(
        p.dma(VM, S, None, (4 << 20) + 4, false),
        DmaOutcome::Ram { vm: VM, gpa: 4 }
    );
}

// The allocation-failure sweep runs on every backend, the mock included,
// in tests/backends.rs.

#[test]
fn mapping_and_allowed_range_quotas() {
    let mut p = Platform::builder()
        .vm(
            VM,
            vm_setup().config(VmConfig {
                quota: Quota {
                    max_areas: 2,
                    max_allowed_ranges: 1,
                    ..Default::default()
                },
                ..Default::default()
            }),
        )
        .device(DeviceSetup::new(VM, S))
        .build();
    let a = p.ioas_alloc(VM).unwrap();
    let b = p.ioas_alloc(VM).unwrap();
    let d = p.bind(VM, S).unwrap().dev_id;
    p.attach(VM, d, a).unwrap();
    p.map(VM, a, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    // The mapping quota counts over all IOASes of the VM, copies included.
    p.copy(VM, b, a, 0x1000, 0x1000, Some(0x1000), FIXED)
        .unwrap();
    let before = p.iommufd.snapshot(VM);
    let live = p.host.live_pages();
    assert_eq!(
        p.map(VM, a, 0, 0x1000, Some(0x40_0000), FIXED),
        Err(errno::ENOMEM)
    );
    assert_eq!(
        p.copy(VM, a, b, 0x1000, 0x1000, None, RW),
        Err(errno::ENOMEM)
    );
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.host.live_pages(), live);
    // Destroying an IOAS returns its share.
    p.destroy(VM, b).unwrap();
    p.map(VM, a, 0, 0x1000, Some(0x40_0000), FIXED).unwrap();
    assert_eq!(
        p.allow_iovas(VM, a, &[(0, 0xfff), (0x10_0000, 0x10_0fff)]),
        Err(errno::ENOMEM)
    );
    assert_eq!(p.allow_iovas(VM, a, &[(0x10_0000, 0x10_0fff)]), Ok(()));
}
