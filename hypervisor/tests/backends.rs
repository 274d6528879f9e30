//! The iommufd rules that depend on the IOMMU backend, run against every
//! backend: the mock IOMMU, and Sluice's VT-d backend and driver on
//! register models of VT-d units in legacy mode, scalable mode and
//! caching mode (with non-coherent walks and write-buffer flushing).
//!
//! On VT-d a DMA goes through the model's context, PASID and IOTLB caches,
//! so a missing invalidation shows up as a DMA that still reaches memory it
//! should not. Where the VT-d backend legitimately differs from the mock,
//! the test says why next to the check:
//!
//! * Capabilities belong to units on VT-d: devices asking for different
//!   ones sit behind different units, so they never share a domain.
//! * Page-table page counts: VT-d's 4-level tables hold more pages per
//!   mapping than the mock's root + leaf tables; tests compare the VM's
//!   budget with the backend's own count instead of with fixed numbers.
//! * Host pages: VT-d units keep root, context and PASID tables and their
//!   invalidation queue; leak checks count domain table pages only
//!   ([`AnyPlatform::live_table_pages`]).
//! * Fault records carry the page address (VT-d FRCD.FI is bits 63:12),
//!   so faults are provoked at page-aligned IOVAs.

use sluice_abi::{
    self as abi, errno, fault_flags, fault_reason, hw_caps, hwpt_flags, map_flags, wbinvd,
};
use sluice_hal::PhysAddr;
use sluice_hypervisor::iommufd::{
    ARM_SW_MSI_WINDOW, AttachTarget, DomainId, FaultReason, Quota, VmConfig, VmId,
};
use sluice_hypervisor::testing::{
    AnyPlatform, BackendKind, DeviceSetup, DmaOutcome, Platform, SmmuFlavour, VmSetup, VtdFlavour,
    VtdModelIommu,
};

const VM: VmId = VmId(1);
const OTHER: VmId = VmId(2);
const RW: u32 = map_flags::READABLE | map_flags::WRITEABLE;
const FIXED: u32 = map_flags::FIXED_IOVA | RW;
const A: u32 = abi::bdf(0, 0, 3, 0);
const B: u32 = abi::bdf(0, 0, 3, 1);
const C: u32 = abi::bdf(0, 0, 4, 0);

fn config(quota: Quota) -> VmConfig {
    VmConfig {
        quota,
        ..Default::default()
    }
}

fn vm_setup() -> VmSetup {
    VmSetup::new()
        .ram(0, 64 << 20)
        .config(config(Quota::default()))
}

fn small_vm() -> VmSetup {
    VmSetup::new()
        .ram(0, 16 << 20)
        .config(config(Quota::default()))
}

fn ram(vm: VmId, gpa: u64) -> DmaOutcome {
    DmaOutcome::Ram { vm, gpa }
}

fn fault(reason: FaultReason) -> DmaOutcome {
    DmaOutcome::Fault(reason)
}

/// The VM's page budget equals what the backend holds, page for page.
fn check_budget(p: &AnyPlatform, vm: VmId) {
    assert_eq!(
        p.iommufd.page_table_pages(vm),
        p.backend_table_pages(vm),
        "page budget and backend disagree"
    );
}

fn vtd(p: &AnyPlatform) -> Option<&VtdModelIommu> {
    p.iommufd.backend().as_any().downcast_ref::<VtdModelIommu>()
}

/// No model saw a programming error.
fn check_models(p: &AnyPlatform) {
    if let Some(v) = vtd(p) {
        assert!(v.violations().is_empty(), "{:?}", v.violations());
    }
}

/// A and B share group 1; C is alone.
fn platform(kind: BackendKind) -> AnyPlatform {
    Platform::builder()
        .vm(VM, vm_setup())
        .vm(OTHER, small_vm())
        .device(DeviceSetup::new(VM, A).group(1))
        .device(DeviceSetup::new(VM, B).group(1))
        .device(DeviceSetup::new(VM, C).group(2))
        .build_any(kind)
}

// ------------------------------------------------------------- devices

fn automatic_hwpt_is_shared_and_freed_with_its_last_device(kind: BackendKind) {
    let mut p = platform(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    // Bound devices are blocked.
    assert_eq!(
        p.dma(VM, A, None, 0x1000, false),
        fault(FaultReason::Blocked)
    );
    p.map(VM, ioas, 0x10_0000, 0x1000, Some(0x1000), FIXED)
        .unwrap();
    let h1 = p.attach(VM, a, ioas).unwrap();
    assert_eq!(p.attach(VM, a, ioas), Err(errno::EBUSY));
    let h2 = p.attach(VM, c, ioas).unwrap();
    assert_eq!(h1, h2, "compatible devices share the automatic HWPT");
    assert_eq!(p.dma(VM, C, None, 0x1000, true), ram(VM, 0x10_0000));
    // Mappings made after attach are mirrored (caching mode: the new
    // entries are invalidated, or the cached not-present entry would stay).
    assert_eq!(
        p.dma(VM, A, None, 0x2000, true),
        fault(FaultReason::NotPresent)
    );
    p.map(VM, ioas, 0x20_0000, 0x1000, Some(0x2000), FIXED)
        .unwrap();
    assert_eq!(p.dma(VM, A, None, 0x2000, true), ram(VM, 0x20_0000));
    check_budget(&p, VM);
    p.detach(VM, a, None).unwrap();
    assert_eq!(
        p.dma(VM, A, None, 0x2000, true),
        fault(FaultReason::Blocked)
    );
    assert_eq!(p.dma(VM, C, None, 0x2000, true), ram(VM, 0x20_0000));
    assert_eq!(p.iommufd.backend().domain_count(), 1);
    p.detach(VM, c, None).unwrap();
    assert_eq!(p.iommufd.backend().domain_count(), 0, "auto HWPT freed");
    assert_eq!(
        p.dma(VM, C, None, 0x2000, true),
        fault(FaultReason::Blocked)
    );
    assert_eq!(p.destroy(VM, ioas), Ok(()));
    assert_eq!(p.iommufd.page_table_pages(VM), 0);
    assert_eq!(p.live_table_pages(), 0);
    check_models(&p);
}

fn replace_moves_the_group_and_never_mixes_domains(kind: BackendKind) {
    let mut p = platform(kind);
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
    assert_eq!(p.attach(VM, b, explicit), Err(errno::EINVAL));
    assert_eq!(p.attach(VM, b, ioas1), Ok(h1));
    for bdf in [A, B] {
        assert_eq!(p.dma(VM, bdf, None, 0x5000, false), ram(VM, 0x10_0000));
    }
    // Replace one member: the whole group moves; the old translation (in
    // every cache) is gone.
    assert_eq!(p.replace(VM, b, explicit), Ok(explicit));
    for bdf in [A, B] {
        assert_eq!(p.dma(VM, bdf, None, 0x5000, false), ram(VM, 0x30_0000));
    }
    assert_eq!(p.iommufd.backend().domain_count(), 1, "old auto HWPT freed");
    let h3 = p.replace(VM, a, ioas1).unwrap();
    assert_ne!(h3, explicit);
    assert_eq!(p.dma(VM, B, None, 0x5000, false), ram(VM, 0x10_0000));
    assert_eq!(p.replace(VM, a, h3), Ok(h3));
    check_budget(&p, VM);
    // A failing replace changes nothing.
    p.destroy(VM, explicit).unwrap();
    p.map(VM, ioas2, 0x40_0000, 0x1000, Some(0xfee0_0000), FIXED)
        .unwrap();
    let before = p.iommufd.snapshot(VM);
    assert_eq!(p.replace(VM, a, ioas2), Err(errno::EADDRINUSE));
    assert_eq!(p.iommufd.snapshot(VM), before);
    for bdf in [A, B] {
        assert_eq!(p.dma(VM, bdf, None, 0x5000, false), ram(VM, 0x10_0000));
    }
    check_models(&p);
}

fn unbind_detaches_blocks_and_resets(kind: BackendKind) {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, A))
        .device(DeviceSetup::new(VM, C).flr(false))
        .build_any(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    p.attach(VM, a, ioas).unwrap();
    p.attach(VM, c, ioas).unwrap();
    p.map(VM, ioas, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    assert_eq!(p.dma(VM, A, None, 0x1000, false), ram(VM, 0));
    p.unbind(VM, a).unwrap();
    assert_eq!(
        p.dma(VM, A, None, 0x1000, false),
        fault(FaultReason::Blocked)
    );
    assert_eq!(p.dma(VM, C, None, 0x1000, false), ram(VM, 0));
    assert_eq!(p.iommufd.backend().resets(p.device_id(VM, A)), 1);
    p.unbind(VM, c).unwrap();
    assert_eq!(p.iommufd.backend().resets(p.device_id(VM, C)), 0, "no FLR");
    assert_eq!(p.iommufd.backend().domain_count(), 0);
    assert_eq!(p.live_table_pages(), 0);
    check_models(&p);
}

fn domains_stay_on_their_unit(kind: BackendKind) {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, A).unit(0))
        .device(DeviceSetup::new(VM, C).unit(1))
        .build_any(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    p.map(VM, ioas, 0x10_0000, 0x3000, Some(0x8000), FIXED)
        .unwrap();
    let h = p.hwpt_alloc(VM, a, ioas, 0, None).unwrap();
    assert_eq!(p.attach(VM, a, h), Ok(h));
    assert_eq!(p.dma(VM, A, None, 0xa000, false), ram(VM, 0x10_2000));
    // Another IOMMU unit cannot use that domain; an IOAS target gets its
    // own HWPT, filled with what the IOAS maps.
    assert_eq!(p.attach(VM, c, h), Err(errno::EINVAL));
    let hc = p.attach(VM, c, ioas).unwrap();
    assert_ne!(hc, h);
    assert_eq!(p.dma(VM, C, None, 0x8000, true), ram(VM, 0x10_0000));
    check_budget(&p, VM);
    p.detach(VM, a, None).unwrap();
    assert_eq!(p.destroy(VM, h), Ok(()));
    assert_eq!(p.iommufd.backend().domain_count(), 1);
    check_models(&p);
}

fn a_device_on_another_vm_never_reaches_this_one(kind: BackendKind) {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        .vm(OTHER, small_vm())
        .device(DeviceSetup::new(VM, A))
        .device(DeviceSetup::new(OTHER, A))
        .build_any(kind);
    let i1 = p.ioas_alloc(VM).unwrap();
    let i2 = p.ioas_alloc(OTHER).unwrap();
    let d1 = p.bind(VM, A).unwrap().dev_id;
    let d2 = p.bind(OTHER, A).unwrap().dev_id;
    p.attach(VM, d1, i1).unwrap();
    p.attach(OTHER, d2, i2).unwrap();
    p.map(VM, i1, 0x1000, 0x1000, Some(0x10000), FIXED).unwrap();
    p.map(OTHER, i2, 0x2000, 0x1000, Some(0x10000), FIXED)
        .unwrap();
    assert_eq!(p.dma(VM, A, None, 0x10000, true), ram(VM, 0x1000));
    assert_eq!(p.dma(OTHER, A, None, 0x10000, true), ram(OTHER, 0x2000));
    p.unmap(OTHER, i2, 0x10000, 0x1000).unwrap();
    assert_eq!(
        p.dma(OTHER, A, None, 0x10000, true),
        fault(FaultReason::NotPresent)
    );
    assert_eq!(p.dma(VM, A, None, 0x10000, true), ram(VM, 0x1000));
    check_budget(&p, VM);
    check_budget(&p, OTHER);
}

/// Run on the mock and on a caching-mode VT-d unit only: there every
/// attach needs an invalidation, which the harness makes time out (a lost
/// doorbell). On units without caching mode an attach from the blocked
/// state writes a context entry and needs no invalidation, so it cannot
/// fail this way.
fn hardware_attach_failures_change_nothing(kind: BackendKind) {
    let mut p = platform(kind);
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
    assert_eq!(
        p.dma(VM, A, None, 0x5000, false),
        fault(FaultReason::Blocked)
    );
    let h = p.attach(VM, a, ioas1).unwrap();
    p.attach(VM, b, ioas1).unwrap();
    // The second device of the group fails to move: the first goes back.
    p.iommufd.backend_mut().fail_attach_after(Some(1));
    let before = p.iommufd.snapshot(VM);
    let live = p.live_table_pages();
    assert_eq!(p.replace(VM, a, ioas2), Err(errno::EINVAL));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.live_table_pages(), live);
    let domain = before.hwpts.iter().find(|x| x.id == h).unwrap().domain;
    for bdf in [A, B] {
        let dev = p.device_id(VM, bdf);
        assert_eq!(
            p.iommufd.backend().attachment(dev, None),
            AttachTarget::Domain(domain)
        );
        assert_eq!(p.dma(VM, bdf, None, 0x5000, false), ram(VM, 0x10_0000));
    }
    check_budget(&p, VM);
    // Everything still works afterwards.
    assert_eq!(p.replace(VM, a, ioas2).map(|_| ()), Ok(()));
    for bdf in [A, B] {
        assert_eq!(p.dma(VM, bdf, None, 0x5000, false), ram(VM, 0x30_0000));
    }
    p.iommufd.destroy_vm(VM).unwrap();
    assert_eq!(p.live_table_pages(), 0);
    check_models(&p);
}

// ---------------------------------------------------------------- IOAS

const NIC: u32 = abi::bdf(0, 0, 3, 0);

fn ioas_platform(kind: BackendKind) -> AnyPlatform {
    Platform::builder()
        .vm(
            VM,
            VmSetup::new()
                .ram(0, 64 << 20)
                .mmio(0x8000_0000, 0x10_0000)
                .ram(0x1_0000_0000, 16 << 20)
                .config(config(Quota::default())),
        )
        .device(DeviceSetup::new(VM, NIC))
        .build_any(kind)
}

fn map_unmap_with_permissions(kind: BackendKind) {
    let mut p = ioas_platform(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    p.attach(VM, dev, ioas).unwrap();
    assert_eq!(
        p.map(VM, ioas, 0x10_0000, 0x2000, Some(0x40_0000), FIXED),
        Ok(0x40_0000)
    );
    assert_eq!(p.dma(VM, NIC, None, 0x40_1008, false), ram(VM, 0x10_1008));
    // Read-only and write-only mappings.
    let ro = p
        .map(VM, ioas, 0x20_0000, 0x1000, None, map_flags::READABLE)
        .unwrap();
    assert_eq!(p.dma(VM, NIC, None, ro, false), ram(VM, 0x20_0000));
    assert_eq!(
        p.dma(VM, NIC, None, ro, true),
        fault(FaultReason::Permission)
    );
    let wo = p
        .map(VM, ioas, 0x21_0000, 0x1000, None, map_flags::WRITEABLE)
        .unwrap();
    assert_eq!(p.dma(VM, NIC, None, wo, true), ram(VM, 0x21_0000));
    if kind.is_smmu() {
        // SMMU stage-1 descriptors cannot grant write without read: the
        // page is readable too (as Linux's io-pgtable-arm maps it).
        assert_eq!(p.dma(VM, NIC, None, wo, false), ram(VM, 0x21_0000));
    } else {
        assert_eq!(
            p.dma(VM, NIC, None, wo, false),
            fault(FaultReason::Permission)
        );
    }
    // The second RAM range is a different host range; still reachable.
    let hi = p.map(VM, ioas, 0x1_0000_0000, 0x1000, None, RW).unwrap();
    assert_eq!(p.dma(VM, NIC, None, hi, true), ram(VM, 0x1_0000_0000));
    check_budget(&p, VM);
    // Unmap: the translation is gone from every cache (the DMAs above
    // filled the IOTLB), and the IOVA can be mapped elsewhere.
    assert_eq!(p.unmap(VM, ioas, 0x40_0000, 0x2000), Ok(0x2000));
    assert_eq!(
        p.dma(VM, NIC, None, 0x40_1008, false),
        fault(FaultReason::NotPresent)
    );
    p.map(VM, ioas, 0x30_0000, 0x2000, Some(0x40_0000), FIXED)
        .unwrap();
    assert_eq!(p.dma(VM, NIC, None, 0x40_1008, false), ram(VM, 0x30_1008));
    // Failed maps change nothing.
    let before = p.iommufd.snapshot(VM);
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(0x40_1000), FIXED),
        Err(errno::EEXIST)
    );
    assert_eq!(
        p.map(VM, ioas, 0x8000_0000, 0x1000, None, RW),
        Err(errno::EFAULT)
    );
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.dma(VM, NIC, None, 0x40_1008, false), ram(VM, 0x30_1008));
    // Unmap all: everything faults, the domain holds only its root.
    p.unmap(VM, ioas, 0, u64::MAX).unwrap();
    for iova in [0x40_0000, ro, wo, hi] {
        assert_eq!(
            p.dma(VM, NIC, None, iova, false),
            fault(FaultReason::NotPresent)
        );
    }
    check_budget(&p, VM);
    assert_eq!(p.iommufd.page_table_pages(VM), 1);
    check_models(&p);
}

fn unmap_rules(kind: BackendKind) {
    let mut p = ioas_platform(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    p.attach(VM, dev, ioas).unwrap();
    assert_eq!(p.unmap(VM, ioas, 0, u64::MAX), Ok(0));
    assert_eq!(p.unmap(VM, ioas, 0x1000, 0x1000), Err(errno::ENOENT));
    p.map(VM, ioas, 0, 0x2000, Some(0x10_0000), FIXED).unwrap();
    p.map(VM, ioas, 0x2000, 0x2000, Some(0x10_2000), FIXED)
        .unwrap();
    p.map(VM, ioas, 0x4000, 0x1000, Some(0x20_0000), FIXED)
        .unwrap();
    let before = p.iommufd.snapshot(VM);
    assert_eq!(p.unmap(VM, ioas, 0x10_0000, 0x3000), Err(errno::ENOENT));
    assert_eq!(p.unmap(VM, ioas, 0x10_1000, 0x1000), Err(errno::ENOENT));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.dma(VM, NIC, None, 0x10_1000, false), ram(VM, 0x1000));
    assert_eq!(p.unmap(VM, ioas, 0x0f_0000, 0x10_0000), Ok(0x4000));
    assert_eq!(
        p.dma(VM, NIC, None, 0x10_1000, false),
        fault(FaultReason::NotPresent)
    );
    assert_eq!(p.dma(VM, NIC, None, 0x20_0000, false), ram(VM, 0x4000));
    assert_eq!(p.unmap(VM, ioas, 0, u64::MAX), Ok(0x1000));
    assert_eq!(
        p.dma(VM, NIC, None, 0x20_0000, false),
        fault(FaultReason::NotPresent)
    );
    check_budget(&p, VM);
}

fn copy_shares_memory_and_survives_the_source(kind: BackendKind) {
    let mut p = ioas_platform(kind);
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
    let dst = p
        .copy(VM, b, a, 0x1000_1000, 0x2000, Some(0x7000_0000), FIXED)
        .unwrap();
    assert_eq!(dst, 0x7000_0000);
    p.attach(VM, dev, b).unwrap();
    assert_eq!(p.dma(VM, NIC, None, 0x7000_0000, true), ram(VM, 0x30_1000));
    assert_eq!(p.dma(VM, NIC, None, 0x7000_1004, true), ram(VM, 0x50_0004));
    assert_eq!(
        p.copy(VM, b, a, 0x2000_0000, 0x1000, None, RW),
        Err(errno::EPERM)
    );
    let ro = p
        .copy(VM, b, a, 0x2000_0000, 0x1000, None, map_flags::READABLE)
        .unwrap();
    assert_eq!(
        p.dma(VM, NIC, None, ro, true),
        fault(FaultReason::Permission)
    );
    p.unmap(VM, a, 0, u64::MAX).unwrap();
    assert_eq!(p.dma(VM, NIC, None, 0x7000_0000, false), ram(VM, 0x30_1000));
    check_budget(&p, VM);
    check_models(&p);
}

fn huge_pages_use_fewer_table_pages(kind: BackendKind) {
    let mut p = ioas_platform(kind);
    let dev = p.bind(VM, NIC).unwrap().dev_id;
    let huge = p.ioas_alloc(VM).unwrap();
    let small = p.ioas_alloc(VM).unwrap();
    assert_eq!(p.huge_pages(VM, small, Some(0)), Ok(0));
    let hh = p.hwpt_alloc(VM, dev, huge, 0, None).unwrap();
    let hs = p.hwpt_alloc(VM, dev, small, 0, None).unwrap();
    let empty = p.iommufd.page_table_pages(VM);
    // A 2 MiB-aligned 4 MiB mapping, in each IOAS.
    p.map(VM, huge, 0x20_0000, 0x40_0000, Some(0x4000_0000), FIXED)
        .unwrap();
    let with_huge = p.iommufd.page_table_pages(VM) - empty;
    p.map(VM, small, 0x20_0000, 0x40_0000, Some(0x4000_0000), FIXED)
        .unwrap();
    let with_small = p.iommufd.page_table_pages(VM) - empty - with_huge;
    assert_eq!(
        with_small,
        with_huge + 2,
        "4 KiB pages need the two leaf tables 2 MiB pages do without"
    );
    check_budget(&p, VM);
    for h in [hh, hs] {
        p.attach(VM, dev, h).unwrap();
        assert_eq!(
            p.dma(VM, NIC, None, 0x4000_0000 + 0x31_2345, true),
            ram(VM, 0x51_2345)
        );
        p.detach(VM, dev, None).unwrap();
    }
    p.iommufd.destroy_vm(VM).unwrap();
    assert_eq!(p.live_table_pages(), 0);
}

// ------------------------------------------------------ PASID, coherency

const S: u32 = abi::bdf(0, 0, 1, 0);
const N: u32 = abi::bdf(0, 0, 2, 0);
const Q: u32 = abi::bdf(0, 0, 3, 0);
const P: u32 = abi::bdf(0, 0, 4, 0);
const L: u32 = abi::bdf(0, 0, 5, 0);

fn coherency_enforcement_and_wbinvd_policy(kind: BackendKind) {
    let mut p = Platform::builder()
        .vm(VM, vm_setup())
        // S: snoop control. N: none, issues no-snoop DMA. Q: none, never
        // issues no-snoop DMA.
        .device(DeviceSetup::new(VM, S))
        .device(DeviceSetup::new(VM, N).snoop_control(false))
        .device(DeviceSetup::new(VM, Q).snoop_control(false).no_snoop(false))
        .build_any(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let s = p.bind(VM, S).unwrap().dev_id;
    let n = p.bind(VM, N).unwrap().dev_id;
    let q = p.bind(VM, Q).unwrap().dev_id;
    let caps = |p: &mut AnyPlatform, d| p.hw_info(VM, d).unwrap().out_capabilities;
    assert_ne!(caps(&mut p, s) & hw_caps::ENFORCE_SNOOP, 0);
    assert_eq!(caps(&mut p, n) & hw_caps::ENFORCE_SNOOP, 0);
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));
    let hs = p.attach(VM, s, ioas).unwrap();
    let snap = p.iommufd.snapshot(VM);
    let hwpt = snap.hwpts.iter().find(|h| h.id == hs).unwrap();
    assert!(hwpt.enforce_coherency);
    let enforcing = hwpt.domain;
    assert!(
        p.iommufd
            .backend()
            .domain_config(enforcing)
            .unwrap()
            .enforce_coherency
    );
    // A device without snoop control may not join an enforcing HWPT; with
    // an IOAS target it gets its own, non-enforcing one.
    let explicit = p.hwpt_alloc(VM, s, ioas, 0, None).unwrap();
    assert_eq!(p.attach(VM, n, explicit), Err(errno::EINVAL));
    assert_eq!(p.attach(VM, n, hs), Err(errno::EINVAL));
    let hn = p.attach(VM, n, ioas).unwrap();
    assert_ne!(hn, hs);
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::FLUSH));
    p.map(VM, ioas, 0x1000, 0x1000, Some(0x1000), FIXED)
        .unwrap();
    assert_eq!(p.dma(VM, N, None, 0x1000, true), ram(VM, 0x1000));
    assert_eq!(p.dma(VM, S, None, 0x1000, true), ram(VM, 0x1000));
    if let Some(v) = vtd(&p) {
        // The hardware really forces snooping for S's domain (SNP leaves in
        // legacy mode, PGSNP in scalable mode) and not for N's.
        let snooped = |dev| {
            v.dma_outcome(p.device_id(VM, dev), None, 0x1000, true)
                .expect("mapped")
                .snooped
        };
        assert!(snooped(S), "enforcing domain snoops");
        assert!(!snooped(N), "N's domain cannot force snooping");
    }
    p.detach(VM, n, None).unwrap();
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));
    p.attach(VM, q, ioas).unwrap();
    assert_eq!(p.wbinvd_policy(VM), Ok(wbinvd::NOOP));
    check_budget(&p, VM);
    check_models(&p);
}

fn pasid_platform(kind: BackendKind) -> AnyPlatform {
    Platform::builder()
        .vm(VM, vm_setup())
        .device(DeviceSetup::new(VM, P).pasid(20, 8))
        .device(DeviceSetup::new(VM, L))
        .build_any(kind)
}

fn pasid_attach_rules(kind: BackendKind) {
    let mut p = pasid_platform(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let ioas2 = p.ioas_alloc(VM).unwrap();
    p.map(VM, ioas, 0x10_0000, 0x1000, Some(0x4000), FIXED)
        .unwrap();
    p.map(VM, ioas2, 0x20_0000, 0x1000, Some(0x4000), FIXED)
        .unwrap();
    let dp = p.bind(VM, P).unwrap().dev_id;
    let dl = p.bind(VM, L).unwrap().dev_id;
    assert_eq!(p.hw_info(VM, dp).unwrap().out_max_pasid_log2, 8);
    assert_eq!(p.hw_info(VM, dl).unwrap().out_max_pasid_log2, 0);
    assert_eq!(
        p.hwpt_alloc(VM, dl, ioas, hwpt_flags::PASID, None),
        Err(errno::EINVAL)
    );
    assert_eq!(p.attach_pasid(VM, dl, 1, ioas), Err(errno::EINVAL));
    let hp = p.hwpt_alloc(VM, dp, ioas, hwpt_flags::PASID, None).unwrap();
    let hn = p.hwpt_alloc(VM, dp, ioas2, 0, None).unwrap();
    assert_eq!(p.attach_pasid(VM, dp, 256, hp), Err(errno::EINVAL));
    assert_eq!(p.attach_pasid(VM, dp, 5, hn), Err(errno::EINVAL));
    p.attach(VM, dp, hn).unwrap();
    assert_eq!(p.attach_pasid(VM, dp, 5, hp), Err(errno::EINVAL));
    p.detach(VM, dp, None).unwrap();
    assert_eq!(p.attach_pasid(VM, dp, 5, hp), Ok(hp));
    assert_eq!(p.attach_pasid(VM, dp, 5, hp), Err(errno::EBUSY));
    assert_eq!(p.attach(VM, dp, hn), Err(errno::EINVAL));
    let hr = p.attach(VM, dp, ioas2).unwrap();
    // Translation per (device, PASID).
    assert_eq!(p.dma(VM, P, Some(5), 0x4000, false), ram(VM, 0x10_0000));
    assert_eq!(p.dma(VM, P, None, 0x4000, false), ram(VM, 0x20_0000));
    assert_eq!(
        p.dma(VM, P, Some(6), 0x4000, false),
        fault(FaultReason::Blocked)
    );
    // Replace the PASID to the IOAS of the RID: the old translation is
    // gone from the PASID's caches.
    assert_eq!(p.replace_pasid(VM, dp, 5, ioas2), Ok(hr));
    assert_eq!(p.dma(VM, P, Some(5), 0x4000, false), ram(VM, 0x20_0000));
    p.detach(VM, dp, Some(5)).unwrap();
    assert_eq!(
        p.dma(VM, P, Some(5), 0x4000, false),
        fault(FaultReason::Blocked)
    );
    assert_eq!(p.dma(VM, P, None, 0x4000, false), ram(VM, 0x20_0000));
    // PASID 0: the mock allows it; VT-d reserves it for requests without
    // PASID (RID_PASID) and the SMMU for the stream's own traffic
    // (SubstreamID 0 with S1DSS = substream 0), so attaching it is refused.
    let r = p.attach_pasid(VM, dp, 0, hp);
    if kind.is_vtd() || kind.is_smmu() {
        assert_eq!(r, Err(errno::EINVAL));
    } else {
        assert_eq!(r, Ok(hp));
    }
    check_budget(&p, VM);
    p.iommufd.destroy_vm(VM).unwrap();
    assert_eq!(p.live_table_pages(), 0);
    check_models(&p);
}

fn faults_reach_the_queue_of_their_hwpt(kind: BackendKind) {
    let mut p = pasid_platform(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let dp = p.bind(VM, P).unwrap().dev_id;
    let dl = p.bind(VM, L).unwrap().dev_id;
    let f = p.fault_queue_alloc(VM).unwrap();
    let h = p
        .hwpt_alloc(VM, dp, ioas, hwpt_flags::PASID, Some(f))
        .unwrap();
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
    assert_eq!(
        p.dma(VM, P, None, 0x5000, false),
        fault(FaultReason::NotPresent)
    );
    assert_eq!(
        p.dma(VM, P, Some(3), 0x1000, true),
        fault(FaultReason::Permission)
    );
    assert_eq!(
        p.dma(VM, P, Some(4), 0x1000, false),
        fault(FaultReason::Blocked)
    );
    // A device on a HWPT without a queue: its faults go nowhere.
    p.dma(VM, L, None, 0x5000, false);
    let (records, overflow) = p.fault_read(VM, f, 8).unwrap();
    assert_eq!(overflow, 0);
    // The blocked PASID 4 is attached to nothing: no HWPT, no queue.
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
    p.unbind(VM, dp).unwrap();
    p.destroy(VM, h).unwrap();
    assert_eq!(p.destroy(VM, f), Ok(()));
    check_models(&p);
}

// ------------------------------------------------- quota and allocation

fn page_table_quota_gives_enomem_and_loses_nothing(kind: BackendKind) {
    // Measure what one attach and one isolated 4 KiB mapping cost on this
    // backend, then give the VM room for exactly the attach and two such
    // mappings.
    let measure = {
        let mut p = Platform::builder()
            .vm(VM, vm_setup())
            .device(DeviceSetup::new(VM, S))
            .build_any(kind);
        let ioas = p.ioas_alloc(VM).unwrap();
        let d = p.bind(VM, S).unwrap().dev_id;
        p.attach(VM, d, ioas).unwrap();
        let root = p.iommufd.page_table_pages(VM);
        p.map(VM, ioas, 0, 0x1000, Some(0), FIXED).unwrap();
        let first = p.iommufd.page_table_pages(VM) - root;
        p.map(VM, ioas, 0, 0x1000, Some(2 << 20), FIXED).unwrap();
        let second = p.iommufd.page_table_pages(VM) - root - first;
        check_budget(&p, VM);
        (root, first, second)
    };
    let (root, first, second) = measure;
    assert!(root >= 1 && first >= 1 && second >= 1);
    let mut p = Platform::builder()
        .vm(
            VM,
            vm_setup().config(config(Quota {
                max_page_table_pages: root + first + second,
                ..Default::default()
            })),
        )
        .device(DeviceSetup::new(VM, S))
        .build_any(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let d = p.bind(VM, S).unwrap().dev_id;
    p.attach(VM, d, ioas).unwrap();
    p.map(VM, ioas, 0, 0x1000, Some(0), FIXED).unwrap();
    p.map(VM, ioas, 0, 0x1000, Some(2 << 20), FIXED).unwrap();
    let before = p.iommufd.snapshot(VM);
    let live = p.live_table_pages();
    assert_eq!(
        p.map(VM, ioas, 0, 0x1000, Some(4 << 20), FIXED),
        Err(errno::ENOMEM)
    );
    assert_eq!(p.hwpt_alloc(VM, d, ioas, 0, None), Err(errno::ENOMEM));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.live_table_pages(), live);
    // Nothing of the refused map is reachable.
    assert_eq!(
        p.dma(VM, S, None, 4 << 20, false),
        fault(FaultReason::NotPresent)
    );
    check_budget(&p, VM);
    // Within an existing leaf table there is still room.
    p.map(VM, ioas, 0, 0x1000, Some(0x1000), FIXED).unwrap();
    p.unmap(VM, ioas, 2 << 20, 0x1000).unwrap();
    p.map(VM, ioas, 0, 0x1000, Some(4 << 20), FIXED).unwrap();
    assert_eq!(p.dma(VM, S, None, (4 << 20) + 4, false), ram(VM, 4));
    check_budget(&p, VM);
    check_models(&p);
}

type Step = fn(&mut AnyPlatform) -> Result<(), i64>;

fn step(name: &'static str, f: Step) -> (&'static str, Step) {
    (name, f)
}

/// A scripted session touching every allocating path.
fn script() -> Vec<(&'static str, Step)> {
    // IDs: IOAS 1 and 2, devices S = 3, N = 4, P = 5.
    vec![
        step("ioas alloc", |p| p.ioas_alloc(VM).map(drop)),
        step("ioas alloc 2", |p| p.ioas_alloc(VM).map(drop)),
        step("bind S", |p| p.bind(VM, S).map(drop)),
        step("bind N", |p| p.bind(VM, N).map(drop)),
        step("bind P", |p| p.bind(VM, P).map(drop)),
        step("map small", |p| {
            p.map(VM, 1, 0, 0x3000, Some(0x1000), FIXED).map(drop)
        }),
        step("map huge", |p| {
            p.map(VM, 1, 2 << 20, 4 << 20, Some(8 << 20), FIXED)
                .map(drop)
        }),
        step("attach S", |p| p.attach(VM, 3, 1).map(drop)),
        step("attach N (separate HWPT)", |p| p.attach(VM, 4, 1).map(drop)),
        step("map mirrored into two domains", |p| {
            p.map(VM, 1, 0x40_0000, 0x1000, Some(0x40_0000), FIXED)
                .map(drop)
        }),
        step("map across 2 MiB slots", |p| {
            p.map(VM, 1, 0x10_0000, 0x30_0000, None, RW).map(drop)
        }),
        step("copy into ioas2", |p| {
            p.copy(VM, 2, 1, 0x1000, 0x2000, None, RW).map(drop)
        }),
        step("explicit PASID HWPT", |p| {
            p.hwpt_alloc(VM, 5, 2, hwpt_flags::PASID, None).map(drop)
        }),
        step("attach P PASID 1 to ioas", |p| {
            p.attach_pasid(VM, 5, 1, 1).map(drop)
        }),
        step("attach P PASID 100 to ioas", |p| {
            p.attach_pasid(VM, 5, 100, 1).map(drop)
        }),
        step("replace S to ioas2", |p| p.replace(VM, 3, 2).map(drop)),
        step("map into ioas2", |p| {
            p.map(VM, 2, 0x80_0000, 0x1000, Some(0x60_0000), FIXED)
                .map(drop)
        }),
        step("unmap part", |p| p.unmap(VM, 1, 0x1000, 0x3000).map(drop)),
        step("detach N", |p| p.detach(VM, 4, None).map(drop)),
        step("attach N again", |p| p.attach(VM, 4, 1).map(drop)),
        step("unbind S", |p| p.unbind(VM, 3).map(drop)),
    ]
}

/// On the SMMU, with Arm's software-managed MSI window and a doorbell per
/// device, so attaches and replaces map doorbell pages too.
fn sweep_platform(kind: BackendKind) -> AnyPlatform {
    let builder = Platform::builder().vm(VM, vm_setup());
    let (builder, doorbell) = if kind.is_smmu() {
        (builder.software_msi_window(), Some(DOORBELL_1))
    } else {
        (builder, None)
    };
    let device = |bdf| {
        let d = DeviceSetup::new(VM, bdf);
        match doorbell {
            Some(page) => d.msi_doorbell(page),
            None => d,
        }
    };
    builder
        .device(device(S))
        .device(device(N).snoop_control(false))
        .device(device(P).pasid(20, 8))
        .build_any(kind)
}

fn allocation_failure_sweep(kind: BackendKind) {
    let mut reference = sweep_platform(kind);
    for (name, step) in script() {
        step(&mut reference).unwrap_or_else(|e| panic!("{name}: {}", errno::name(e)));
    }
    let final_state = reference.iommufd.snapshot(VM);
    let strip = |mut s: sluice_hypervisor::iommufd::VmSnapshot| {
        for h in &mut s.hwpts {
            h.domain = DomainId(0);
        }
        s
    };
    let mut failures_seen = 0;
    for nth in 0.. {
        let mut p = sweep_platform(kind);
        p.host.fail_allocation_after(Some(nth));
        let mut failed_here = false;
        for (name, step) in script() {
            let before = p.iommufd.snapshot(VM);
            let live = p.live_table_pages();
            match step(&mut p) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(
                        e,
                        errno::ENOMEM,
                        "allocation {nth}, {name}: {}",
                        errno::name(e)
                    );
                    assert_eq!(
                        p.iommufd.snapshot(VM),
                        before,
                        "allocation {nth}: {name} changed state"
                    );
                    assert_eq!(
                        p.live_table_pages(),
                        live,
                        "allocation {nth}: {name} leaked pages"
                    );
                    failed_here = true;
                    step(&mut p).unwrap_or_else(|e| panic!("retry of {name}: {}", errno::name(e)));
                }
            }
            check_budget(&p, VM);
        }
        assert_eq!(strip(p.iommufd.snapshot(VM)), strip(final_state.clone()));
        p.iommufd.destroy_vm(VM).unwrap();
        assert_eq!(
            p.live_table_pages(),
            0,
            "allocation {nth}: leak after teardown"
        );
        check_models(&p);
        if !failed_here {
            break;
        }
        failures_seen += 1;
    }
    assert!(failures_seen > 10, "the script allocates: {failures_seen}");
}

// ----------------------------------------------------------- MSI window

/// Doorbell pages of the devices below (Arm: GITS_TRANSLATER pages of two
/// ITSes).
const DOORBELL_1: u64 = 0x0809_0000;
const DOORBELL_2: u64 = 0x0a09_0000;
const SW_MSI: u64 = ARM_SW_MSI_WINDOW.0;

/// A and B (group 1) signal the first ITS, C the second; the MSI window is
/// Arm's software-managed one.
fn msi_platform(kind: BackendKind) -> AnyPlatform {
    Platform::builder()
        .vm(VM, vm_setup())
        .software_msi_window()
        .device(DeviceSetup::new(VM, A).group(1).msi_doorbell(DOORBELL_1))
        .device(DeviceSetup::new(VM, B).group(1).msi_doorbell(DOORBELL_1))
        .device(DeviceSetup::new(VM, C).group(2).msi_doorbell(DOORBELL_2))
        .build_any(kind)
}

fn doorbell(page: u64) -> DmaOutcome {
    DmaOutcome::Host(PhysAddr::new(page))
}

fn msi_pages(p: &AnyPlatform, hwpt: u32) -> Vec<(u64, PhysAddr)> {
    let s = p.iommufd.snapshot(VM);
    s.hwpts
        .iter()
        .find(|h| h.id == hwpt)
        .unwrap()
        .msi_pages
        .clone()
}

fn window_reserved(p: &AnyPlatform, ioas: u32) -> bool {
    let s = p.iommufd.snapshot(VM);
    let i = s.ioases.iter().find(|i| i.id == ioas).unwrap();
    i.reserved
        .iter()
        .any(|&(start, last)| start <= SW_MSI && last >= ARM_SW_MSI_WINDOW.1)
}

/// Under a software-managed MSI window (Arm), attaching a device's RID
/// maps its doorbell page into the HWPT, write-only, one window page per
/// distinct doorbell; the window is reserved in the IOAS while any device
/// is attached or any doorbell is mapped, and everything goes with the
/// HWPT.
fn software_msi_window_maps_doorbells(kind: BackendKind) {
    let mut p = msi_platform(kind);
    let ioas = p.ioas_alloc(VM).unwrap();
    let a = p.bind(VM, A).unwrap().dev_id;
    let c = p.bind(VM, C).unwrap().dev_id;
    // Nothing attached: the window is ordinary IOVA space, and a mapping
    // there makes the attach fail (iommufd: EADDRINUSE) without a trace.
    p.map(VM, ioas, 0x10_0000, 0x1000, Some(SW_MSI), FIXED)
        .unwrap();
    let before = p.iommufd.snapshot(VM);
    let live = p.live_table_pages();
    assert_eq!(p.attach(VM, a, ioas), Err(errno::EADDRINUSE));
    assert_eq!(p.iommufd.snapshot(VM), before);
    assert_eq!(p.live_table_pages(), live);
    p.unmap(VM, ioas, SW_MSI, 0x1000).unwrap();
    p.map(VM, ioas, 0x10_0000, 0x1000, Some(0x10_0000), FIXED)
        .unwrap();

    // The first attach maps the doorbell at the window's first page.
    let h = p.attach(VM, a, ioas).unwrap();
    assert_eq!(msi_pages(&p, h), vec![(SW_MSI, PhysAddr::new(DOORBELL_1))]);
    assert!(window_reserved(&p, ioas));
    assert_eq!(
        p.dma(VM, A, None, SW_MSI + 0x40, true),
        doorbell(DOORBELL_1 + 0x40)
    );
    if !kind.is_smmu() {
        // A device only writes its doorbell. (SMMU stage 1 cannot express
        // write-only; isolation comes from the ITS, which keys on the
        // DeviceID.)
        assert_eq!(
            p.dma(VM, A, None, SW_MSI + 0x40, false),
            fault(FaultReason::Permission)
        );
    }
    assert_eq!(p.dma(VM, A, None, 0x10_0000, true), ram(VM, 0x10_0000));
    // The window cannot be mapped now (iommufd: reserved → EINVAL), nor
    // handed out.
    assert_eq!(
        p.map(VM, ioas, 0x20_0000, 0x1000, Some(SW_MSI + 0x8_0000), FIXED),
        Err(errno::EINVAL)
    );
    let (ranges, _) = p.iova_ranges(VM, ioas, 16).unwrap();
    assert!(
        ranges
            .iter()
            .all(|&(start, last)| last < SW_MSI || start > ARM_SW_MSI_WINDOW.1),
        "{ranges:?}"
    );
    // Another device of the same group and doorbell: no second page. A
    // device of another ITS sharing the HWPT: its doorbell on the next.
    let b = p.bind(VM, B).unwrap().dev_id;
    assert_eq!(p.attach(VM, b, ioas), Ok(h));
    assert_eq!(msi_pages(&p, h).len(), 1);
    assert_eq!(p.attach(VM, c, ioas), Ok(h));
    assert_eq!(
        msi_pages(&p, h),
        vec![
            (SW_MSI, PhysAddr::new(DOORBELL_1)),
            (SW_MSI + 0x1000, PhysAddr::new(DOORBELL_2))
        ]
    );
    assert_eq!(
        p.dma(VM, C, None, SW_MSI + 0x1040, true),
        doorbell(DOORBELL_2 + 0x40)
    );
    check_budget(&p, VM);
    // The last detach frees the automatic HWPT with its doorbells: the
    // window is free IOVA space again.
    for d in [a, b, c] {
        p.detach(VM, d, None).unwrap();
    }
    assert!(!window_reserved(&p, ioas));
    assert_eq!(p.iommufd.page_table_pages(VM), 0);
    p.map(VM, ioas, 0x20_0000, 0x1000, Some(SW_MSI), FIXED)
        .unwrap();
    p.unmap(VM, ioas, SW_MSI, 0x1000).unwrap();

    // An explicit HWPT keeps its doorbell after the detach, and the window
    // stays reserved until the HWPT is destroyed.
    let hwpt = p.hwpt_alloc(VM, a, ioas, 0, None).unwrap();
    p.attach(VM, a, hwpt).unwrap();
    p.detach(VM, a, None).unwrap();
    assert_eq!(msi_pages(&p, hwpt).len(), 1);
    assert!(window_reserved(&p, ioas));
    assert_eq!(
        p.map(VM, ioas, 0x20_0000, 0x1000, Some(SW_MSI), FIXED),
        Err(errno::EINVAL)
    );
    // A failing hardware attach takes the doorbell it mapped back out.
    p.destroy(VM, hwpt).unwrap();
    assert!(!window_reserved(&p, ioas));
    // (VT-d units without caching mode need no invalidation on attach,
    // so no failure can be injected there.)
    if !matches!(kind, BackendKind::Vtd(f) if !f.caching_mode) {
        p.iommufd.backend_mut().fail_attach_after(Some(0));
        let before = p.iommufd.snapshot(VM);
        let live = p.live_table_pages();
        assert_eq!(p.attach(VM, c, ioas), Err(errno::EINVAL));
        assert_eq!(p.iommufd.snapshot(VM), before);
        assert_eq!(p.live_table_pages(), live);
    }
    // Replace into a new HWPT maps the doorbell there first.
    let h1 = p.attach(VM, c, ioas).unwrap();
    let ioas2 = p.ioas_alloc(VM).unwrap();
    let h2 = p.replace(VM, c, ioas2).unwrap();
    assert_ne!(h1, h2);
    assert_eq!(msi_pages(&p, h2), vec![(SW_MSI, PhysAddr::new(DOORBELL_2))]);
    assert_eq!(
        p.dma(VM, C, None, SW_MSI + 0x40, true),
        doorbell(DOORBELL_2 + 0x40)
    );
    assert!(window_reserved(&p, ioas2) && !window_reserved(&p, ioas));
    check_budget(&p, VM);
    p.iommufd.destroy_vm(VM).unwrap();
    assert_eq!(p.live_table_pages(), 0);
    check_models(&p);
}

// ------------------------------------------------------------ instances

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod mock {
            $(#[test] fn $name() { super::$name(super::BackendKind::Mock) })*
        }
        mod vtd_legacy {
            $(#[test] fn $name() {
                super::$name(super::BackendKind::Vtd(super::VtdFlavour::legacy()))
            })*
        }
        mod vtd_scalable {
            $(#[test] fn $name() {
                super::$name(super::BackendKind::Vtd(super::VtdFlavour::scalable()))
            })*
        }
        mod vtd_caching_mode {
            $(#[test] fn $name() {
                super::$name(super::BackendKind::Vtd(super::VtdFlavour::caching_mode()))
            })*
        }
    };
}

on_every_backend!(
    automatic_hwpt_is_shared_and_freed_with_its_last_device,
    replace_moves_the_group_and_never_mixes_domains,
    unbind_detaches_blocks_and_resets,
    domains_stay_on_their_unit,
    a_device_on_another_vm_never_reaches_this_one,
    map_unmap_with_permissions,
    unmap_rules,
    copy_shares_memory_and_survives_the_source,
    huge_pages_use_fewer_table_pages,
    coherency_enforcement_and_wbinvd_policy,
    pasid_attach_rules,
    faults_reach_the_queue_of_their_hwpt,
    page_table_quota_gives_enomem_and_loses_nothing,
    allocation_failure_sweep,
    software_msi_window_maps_doorbells,
);

#[test]
fn hardware_attach_failures_change_nothing_mock() {
    hardware_attach_failures_change_nothing(BackendKind::Mock);
}

#[test]
fn hardware_attach_failures_change_nothing_vtd_caching_mode() {
    hardware_attach_failures_change_nothing(BackendKind::Vtd(VtdFlavour::caching_mode()));
}

/// The SMMUv3 backend and driver on register models of QEMU's SMMU and of
/// a non-coherent two-stage server part. Every test above runs there too
/// except `coherency_enforcement_and_wbinvd_policy`, which needs a device
/// with snoop control: an SMMU cannot force a No-Snoop DMA coherent with
/// the stage-1 domains Sluice makes (see `iommufd::smmu_backend`), so no
/// SMMU device offers it; hypervisor/tests/smmu_backend.rs checks the
/// SMMU's side of that policy. Every SMMU attach submits commands, so the
/// injected attach failures run on both.
macro_rules! on_smmu {
    ($($name:ident),* $(,)?) => {
        mod smmu_qemu {
            $(#[test] fn $name() {
                super::$name(super::BackendKind::Smmu(super::SmmuFlavour::qemu()))
            })*
        }
        mod smmu_server {
            $(#[test] fn $name() {
                super::$name(super::BackendKind::Smmu(super::SmmuFlavour::server()))
            })*
        }
    };
}

on_smmu!(
    automatic_hwpt_is_shared_and_freed_with_its_last_device,
    replace_moves_the_group_and_never_mixes_domains,
    unbind_detaches_blocks_and_resets,
    domains_stay_on_their_unit,
    a_device_on_another_vm_never_reaches_this_one,
    hardware_attach_failures_change_nothing,
    map_unmap_with_permissions,
    unmap_rules,
    copy_shares_memory_and_survives_the_source,
    huge_pages_use_fewer_table_pages,
    pasid_attach_rules,
    faults_reach_the_queue_of_their_hwpt,
    page_table_quota_gives_enomem_and_loses_nothing,
    allocation_failure_sweep,
    software_msi_window_maps_doorbells,
);
