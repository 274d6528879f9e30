//! Boot-time ownership of every DRHD, over register models: every covered
//! device blocked, RMRRs identity-mapped for exactly the devices they name,
//! a unit that cannot be brought up reported with its devices uncovered.
//! What the devices can reach is checked with the independent walker and
//! an independent enumeration of the page-table leaves.

mod common;

use common::*;
use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_hal::{DmaMemory, PhysAddr};
use sluice_iommu::acpi::dmar::{self, Dmar};
use sluice_iommu::association::associate_dmar;
use sluice_iommu::vtd::model::{InterruptFault, InterruptRequest, Stuck, VtdModel};
use sluice_iommu::vtd::ownership::{
    DeviceStatus, OwnedIommus, OwnershipConfig, OwnershipError, UnitHardware, take_ownership,
};
use sluice_iommu::vtd::walker::{self, DmaRequest, TableKind};
use sluice_iommu::vtd::{CapBuilder, IrConfig, ModeRequest, TranslationMode, VtdError};
use sluice_pci::caps::PortType;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{Bdf, PciAddress, Segment, Topology, enumerate};

const HOST_BRIDGE: PciAddress = PciAddress::new(0, 0, 0, 0);
const EDU: PciAddress = PciAddress::new(0, 0, 2, 0);
const USB: PciAddress = PciAddress::new(0, 0, 3, 0);
const NIC: PciAddress = PciAddress::new(0, 0, 4, 0);
const DISK: PciAddress = PciAddress::new(0, 0, 5, 0);
const BRIDGE: PciAddress = PciAddress::new(0, 0, 6, 0);
/// Behind the PCIe-to-PCI bridge at 00:06.0 (secondary bus 1): its DMA
/// carries the alias 01:00.0.
const LEGACY_USB: PciAddress = PciAddress::new(0, 1, 1, 0);
const LEGACY_ALIAS: Bdf = Bdf::new(1, 0, 0);

const RMRR_BASE: u64 = 0x7d00_0000;
const RMRR_LIMIT: u64 = 0x7d01_ffff;
const LEGACY_RMRR_BASE: u64 = 0x7e00_0000;
const LEGACY_RMRR_LIMIT: u64 = 0x7e00_0fff;

fn machine() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    m.add(
        HOST_BRIDGE,
        FunctionBuilder::endpoint(0x8086, 0x29c0, 0x060000),
    );
    m.add(
        EDU,
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00)
            .pcie(PortType::RootComplexIntegratedEndpoint, false),
    );
    m.add(USB, FunctionBuilder::endpoint(0x8086, 0x1, 0x0c0330));
    m.add(NIC, FunctionBuilder::endpoint(0x8086, 0x2, 0x020000));
    m.add(DISK, FunctionBuilder::endpoint(0x8086, 0x3, 0x010802));
    m.add(
        BRIDGE,
        FunctionBuilder::bridge(0x1b36, 0x000e, 0, 1, 1).pcie(PortType::PcieToPciBridge, false),
    );
    m.add(LEGACY_USB, FunctionBuilder::endpoint(0x8086, 0x4, 0x0c0300));
    m
}

/// dmar0 lists edu; dmar1 lists the disk; dmar2 takes everything else
/// (INCLUDE_PCI_ALL). RMRRs: one for the USB controller, one for the
/// device behind the bridge, one (malformed, limit not at a page end) for
/// the NIC, one for the disk.
fn table() -> Dmar {
    dmar::parse(&dmar_table(
        38,
        1,
        &[
            drhd(0, 0, 0, 0xfed9_0000, &[scope(1, 0, 0, &[(2, 0)])]),
            drhd(0, 0, 0, 0xfed9_1000, &[scope(1, 0, 0, &[(5, 0)])]),
            drhd(1, 0, 0, 0xfed9_2000, &[]),
            rmrr(0, RMRR_BASE, RMRR_LIMIT, &[scope(1, 0, 0, &[(3, 0)])]),
            rmrr(
                0,
                LEGACY_RMRR_BASE,
                LEGACY_RMRR_LIMIT,
                &[scope(1, 0, 0, &[(6, 0), (1, 0)])],
            ),
            rmrr(0, 0x7f00_0000, 0x7f00_0ffe, &[scope(1, 0, 0, &[(4, 0)])]),
            rmrr(0, 0x7c00_0000, 0x7c00_0fff, &[scope(1, 0, 0, &[(5, 0)])]),
        ],
    ))
    .expect("DMAR parses")
}

fn topology(m: &ModelConfigSpace) -> Topology {
    enumerate(m, Segment(0), &[0], 0..=0xff)
}

const HAW: u32 = 39;

/// Every identity leaf of the second-level table at `root` (`levels`
/// levels), read straight from memory: (IOVA, output, size, writable).
fn leaves(mem: &ModelMemory, root: PhysAddr, levels: u8) -> Vec<(u64, u64, u64, bool)> {
    fn visit(
        mem: &ModelMemory,
        table: u64,
        level: u8,
        base: u64,
        out: &mut Vec<(u64, u64, u64, bool)>,
    ) {
        let shift = 12 + 9 * u32::from(level);
        for i in 0..512u64 {
            let raw = mem.read_u64(PhysAddr::new(table + i * 8));
            if raw & 0b11 == 0 {
                continue;
            }
            let iova = base + (i << shift);
            let next = raw & 0x000f_ffff_ffff_f000;
            if level == 0 || raw & (1 << 7) != 0 {
                out.push((iova, next, 1 << shift, raw & 0b10 != 0));
            } else {
                visit(mem, next, level - 1, iova, out);
            }
        }
    }
    let mut out = Vec::new();
    visit(mem, root.as_u64(), levels - 1, 0, &mut out);
    out
}

struct Platform {
    mem: &'static ModelMemory,
    clock: ModelClock,
    models: Vec<VtdModel<'static>>,
}

/// The three units: legacy QEMU-like, one whose GCMD never completes, and
/// a scalable server unit.
fn platform() -> &'static Platform {
    let mem: &'static ModelMemory = Box::leak(Box::new(ModelMemory::new()));
    let models = vec![
        VtdModel::new(mem, CapBuilder::qemu_default(), HAW),
        VtdModel::new(mem, CapBuilder::qemu_default(), HAW),
        VtdModel::new(mem, CapBuilder::server(), HAW),
    ];
    models[1].set_stuck(Stuck {
        gcmd: true,
        ..Stuck::default()
    });
    Box::leak(Box::new(Platform {
        mem,
        clock: ModelClock::new(1_000),
        models,
    }))
}

fn own(p: &'static Platform, dmar: &Dmar, m: &ModelConfigSpace) -> OwnedIommus<'static> {
    let topo = topology(m);
    assert_eq!(topo.errors, vec![]);
    let association = associate_dmar(dmar, &topo, m);
    let config = OwnershipConfig {
        mode: ModeRequest::PreferScalable,
        timeout_ns: 1_000_000,
        interrupt_remapping: Some(IrConfig { x2apic: false }),
    };
    take_ownership(dmar, &[association], &config, |index, drhd| {
        assert_eq!(
            drhd.register_base,
            0xfed9_0000 + 0x1000 * index as u64,
            "factory called with its own DRHD"
        );
        let model = p.models.get(index).ok_or("no such unit")?;
        Ok(UnitHardware {
            mmio: model,
            mem: p.mem,
            clock: &p.clock,
        })
    })
}

fn request(dev: Bdf, iova: u64, write: bool) -> DmaRequest {
    if write {
        DmaRequest::write(dev.requester_id(), iova)
    } else {
        DmaRequest::read(dev.requester_id(), iova)
    }
}

/// What the independent walker says a device reaches at `iova`.
fn reaches(model: &VtdModel<'_>, mem: &dyn DmaMemory, dev: Bdf, iova: u64) -> Option<u64> {
    let root = model.active_root()?;
    walker::translate(mem, root, &request(dev, iova, true), &model.walker_config())
        .ok()
        .map(|t| t.walk.phys.as_u64())
}

#[test]
fn every_drhd_is_owned_rmrrs_are_identity_mapped_and_failures_uncover_their_devices() {
    let p = platform();
    let dmar = table();
    let m = machine();
    let owned = own(p, &dmar, &m);
    let mem: &dyn DmaMemory = p.mem;

    // dmar0 and dmar2 are owned; dmar1 never acknowledged SRTP.
    let drhds: Vec<usize> = owned.units.iter().map(|u| u.drhd).collect();
    assert_eq!(drhds, [0, 2]);
    assert_eq!(owned.units[0].unit.mode(), TranslationMode::Legacy);
    assert_eq!(owned.units[1].unit.mode(), TranslationMode::Scalable);
    assert_eq!(owned.failed.len(), 1);
    assert_eq!(owned.failed[0].drhd, 1);
    assert!(matches!(
        owned.failed[0].error,
        OwnershipError::Init(VtdError::Timeout { .. })
    ));
    assert_eq!(owned.failed[0].devices, [DISK]);
    assert!(p.models[0].translation_enabled() && p.models[2].translation_enabled());
    // Interrupt remapping where the unit has it (the DMAR declares
    // INTR_REMAP): the server unit remaps and blocks plain MSIs, QEMU's
    // default unit cannot.
    assert!(!owned.units[0].unit.interrupt_remapping_enabled());
    assert!(owned.units[1].unit.interrupt_remapping_enabled());
    assert_eq!(
        p.models[2].interrupt(InterruptRequest {
            sid: NIC.bdf.requester_id(),
            address: 0xfee0_0000,
            data: 0x30,
        }),
        Err(InterruptFault::CompatBlocked)
    );
    for model in &p.models {
        assert!(model.violations().is_empty(), "{:?}", model.violations());
    }

    // Coverage: the disk's unit failed, so it is uncovered and never
    // assignable; everything else has an owned unit.
    assert_eq!(owned.device_unit.get(&EDU), Some(&0));
    for dev in [HOST_BRIDGE, USB, NIC, BRIDGE, LEGACY_USB] {
        assert_eq!(owned.device_unit.get(&dev), Some(&1), "{dev}");
    }
    assert_eq!(owned.uncovered.iter().copied().collect::<Vec<_>>(), [DISK]);
    assert_eq!(owned.status(DISK), DeviceStatus::Uncovered);
    assert_eq!(owned.status(EDU), DeviceStatus::Isolated { unit: 0 });
    assert_eq!(owned.unit_of(EDU).map(|u| u.drhd), Some(0));

    // RMRR devices: flagged with their regions; the disk's RMRR is not
    // applied (no owned unit), the NIC's is malformed and reported.
    let flagged: Vec<PciAddress> = owned.rmrr_devices.keys().copied().collect();
    assert_eq!(flagged, [USB, NIC, LEGACY_USB]);
    let usb = &owned.rmrr_devices[&USB];
    assert_eq!(usb.unit, 1);
    assert_eq!(usb.requester_ids, [USB.bdf]);
    assert_eq!(
        (
            usb.regions[0].base,
            usb.regions[0].limit,
            usb.regions[0].error
        ),
        (RMRR_BASE, RMRR_LIMIT, None)
    );
    assert_eq!(
        owned.rmrr_devices[&NIC].regions[0].error,
        Some(VtdError::InvalidRange)
    );
    assert_eq!(
        owned.rmrr_devices[&LEGACY_USB].requester_ids,
        [LEGACY_USB.bdf, LEGACY_ALIAS]
    );
    match owned.status(USB) {
        DeviceStatus::Rmrr { unit: 1, regions } => assert_eq!(regions.len(), 1),
        other => panic!("USB status {other:?}"),
    }
    let unit2 = &owned.units[1].unit;
    assert!(unit2.is_rmrr_device(USB.bdf));
    assert!(unit2.is_rmrr_device(LEGACY_ALIAS));
    assert!(!unit2.is_rmrr_device(NIC.bdf));

    // The independent walker: the USB controller reaches exactly its RMRR,
    // one to one, and nothing below or above it.
    let dmar2 = &p.models[2];
    for iova in (RMRR_BASE..=RMRR_LIMIT).step_by(0x1000) {
        assert_eq!(reaches(dmar2, mem, USB.bdf, iova + 0x10), Some(iova + 0x10));
    }
    for iova in [
        0,
        RMRR_BASE - 0x1000,
        RMRR_LIMIT + 1,
        LEGACY_RMRR_BASE,
        0x7f00_0000,
    ] {
        assert_eq!(reaches(dmar2, mem, USB.bdf, iova), None, "{iova:#x}");
    }
    // An independent reading of every leaf of its table: its RMRR's pages
    // and nothing else (the other device's RMRR lives in another domain).
    let root = dmar2.active_root().expect("SRTP done");
    let ctx = walker::resolve(
        mem,
        root,
        &request(USB.bdf, RMRR_BASE, false),
        &dmar2.walker_config(),
    )
    .expect("USB has a context");
    let TableKind::SecondLevel { levels } = ctx.kind else {
        panic!("RMRR domain is second-level, got {:?}", ctx.kind)
    };
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (iova, out, size, writable) in leaves(p.mem, ctx.table, levels) {
        assert_eq!(iova, out, "identity");
        assert!(writable);
        match covered.last_mut() {
            Some(last) if last.1 == iova => last.1 = iova + size,
            _ => covered.push((iova, iova + size)),
        }
    }
    assert_eq!(covered, [(RMRR_BASE, RMRR_LIMIT + 1)]);
    // The device behind the bridge reaches its region, and only it,
    // through its own RID and its alias.
    for rid in [LEGACY_USB.bdf, LEGACY_ALIAS] {
        assert_eq!(
            reaches(dmar2, mem, rid, LEGACY_RMRR_BASE + 0xff8),
            Some(LEGACY_RMRR_BASE + 0xff8)
        );
        for iova in [LEGACY_RMRR_BASE - 0x1000, LEGACY_RMRR_LIMIT + 1, RMRR_BASE] {
            assert_eq!(reaches(dmar2, mem, rid, iova), None, "{rid} {iova:#x}");
        }
    }

    // Every other device reaches nothing, the RMRR ranges included.
    let probes = [0, 0x1000, RMRR_BASE, LEGACY_RMRR_BASE, 0x7f00_0000, 1 << 32];
    for (model, dev) in [
        (&p.models[0], EDU.bdf),
        (&p.models[2], NIC.bdf),
        (&p.models[2], HOST_BRIDGE.bdf),
        (&p.models[2], BRIDGE.bdf),
        // Not in any topology: still blocked by the empty root table.
        (&p.models[2], Bdf::new(0x20, 0, 0)),
        (&p.models[0], USB.bdf),
    ] {
        for &iova in &probes {
            assert_eq!(reaches(model, mem, dev, iova), None, "{dev} at {iova:#x}");
        }
    }
    // And the model's cached path agrees, recording blocking faults.
    assert!(
        p.models[0]
            .dma(DmaRequest::write(EDU.bdf.requester_id(), 0x1000))
            .is_err()
    );
    assert_eq!(p.models[0].pending_fault_records(), 1);
}

#[test]
fn a_missing_register_window_or_a_duplicate_base_is_reported_not_fatal() {
    let mem: &'static ModelMemory = Box::leak(Box::new(ModelMemory::new()));
    let model: &'static VtdModel<'static> = Box::leak(Box::new(VtdModel::new(
        mem,
        CapBuilder::qemu_default(),
        HAW,
    )));
    let clock: &'static ModelClock = Box::leak(Box::new(ModelClock::new(1_000)));
    let dmar = dmar::parse(&dmar_table(
        38,
        0,
        &[
            drhd(0, 0, 0, 0xfed9_0000, &[scope(1, 0, 0, &[(2, 0)])]),
            drhd(0, 0, 0, 0xfed9_0000, &[scope(1, 0, 0, &[(3, 0)])]),
            drhd(1, 0, 0, 0xfed9_3000, &[]),
        ],
    ))
    .expect("parses");
    let m = machine();
    let topo = topology(&m);
    let association = associate_dmar(&dmar, &topo, &m);
    let owned = take_ownership(
        &dmar,
        &[association],
        &OwnershipConfig {
            timeout_ns: 1_000_000,
            ..OwnershipConfig::new()
        },
        |index, _| {
            if index == 2 {
                return Err("the register window is not mapped");
            }
            Ok(UnitHardware {
                mmio: model,
                mem,
                clock,
            })
        },
    );
    assert_eq!(owned.units.len(), 1);
    let errors: Vec<OwnershipError> = owned.failed.iter().map(|f| f.error).collect();
    assert_eq!(
        errors,
        [
            OwnershipError::DuplicateRegisterBase { first: 0 },
            OwnershipError::NoHardware("the register window is not mapped"),
        ]
    );
    assert_eq!(owned.failed[0].devices, [USB]);
    assert_eq!(owned.status(EDU), DeviceStatus::Isolated { unit: 0 });
    for dev in [USB, NIC, DISK, LEGACY_USB] {
        assert_eq!(owned.status(dev), DeviceStatus::Uncovered, "{dev}");
    }
    assert!(owned.rmrr_devices.is_empty());
}
