//! Boot-time ownership of every SMMU of an IORT, over register models:
//! every stream aborting, RMR ranges identity-mapped for exactly the
//! StreamIDs they name, SMMUs that fail (or are not SMMUv3) reported with
//! the functions behind them uncovered.

use alloc::vec;
use alloc::vec::Vec;

use sluice_hal::model::ModelMemory;
use sluice_pci::caps::PortType;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::sdt::SdtHeader;
use sluice_pci::{PciAddress, Segment, enumerate};

use super::*;
use crate::acpi::iort::{
    IdMapping, IdMappingFlags, Iort, MemoryRange, Node, NodeKind, Rmr, RootComplex, Smmu, SmmuV3,
    SmmuV3Flags,
};
use crate::association::associate_iort;
use crate::smmuv3::SmmuError;
use crate::smmuv3::model::Stuck;
use crate::smmuv3::ownership::{
    DeviceStatus, OwnedSmmus, OwnershipConfig, OwnershipError, SmmuHardware, take_ownership,
};
use crate::smmuv3::walker::WalkError;

const ITS: u32 = 48;
const SMMU_A: u32 = 100;
const SMMU_B: u32 = 200;
const SMMU_V2: u32 = 300;
const RC: u32 = 400;

const RMR_1: (u64, u64) = (0x7d00_0000, 0x2_0000);
const RMR_2: (u64, u64) = (0x7e00_0000, 0x1000);

/// Behind smmu0 (RIDs 0x000-0x0ff): firmware keeps DMAing into RMR_1
/// through StreamID 0x10 and into both ranges through 0x18.
const USB: PciAddress = PciAddress::new(0, 0, 2, 0);
const NIC: PciAddress = PciAddress::new(0, 0, 3, 0);
const EDU: PciAddress = PciAddress::new(0, 0, 4, 0);
/// Bus 1 is behind smmu1, which never acknowledges CR0.
const DISK: PciAddress = PciAddress::new(0, 1, 0, 0);
/// Bus 2 is behind an SMMUv2.
const GPU: PciAddress = PciAddress::new(0, 2, 0, 0);
/// Bus 3 goes through smmu0 with StreamIDs from 0x9000: beyond the
/// 2-level table's 2^15.
const FAR: PciAddress = PciAddress::new(0, 3, 0, 0);
/// Bus 4 goes straight to the ITS: no SMMU.
const BYPASS: PciAddress = PciAddress::new(0, 4, 0, 0);

fn map(input: u32, count: u32, output: u32, target: u32) -> IdMapping {
    IdMapping {
        input_base: input,
        id_count_minus_one: count - 1,
        output_base: output,
        output_reference: target,
        flags: IdMappingFlags::empty(),
    }
}

fn single(output: u32, target: u32) -> IdMapping {
    IdMapping {
        flags: IdMappingFlags::SINGLE_MAPPING,
        ..map(0, 1, output, target)
    }
}

fn node(offset: u32, kind: NodeKind, mappings: Vec<IdMapping>) -> Node {
    Node {
        offset,
        revision: 0,
        identifier: offset,
        kind,
        mappings,
    }
}

fn smmuv3(base: u64) -> NodeKind {
    NodeKind::SmmuV3(SmmuV3 {
        base,
        flags: SmmuV3Flags::COHACC_OVERRIDE,
        vatos_address: 0,
        model: 0,
        event_gsiv: 0,
        pri_gsiv: 0,
        gerr_gsiv: 0,
        sync_gsiv: 0,
        proximity_domain: None,
        device_id_mapping_index: None,
    })
}

fn rmr(ranges: &[(u64, u64)]) -> NodeKind {
    NodeKind::Rmr(Rmr {
        flags: 0,
        ranges: ranges
            .iter()
            .map(|&(base, length)| MemoryRange { base, length })
            .collect(),
    })
}

fn iort(nodes: Vec<Node>) -> Iort {
    Iort {
        header: SdtHeader {
            signature: *b"IORT",
            length: 0,
            revision: 5,
            checksum: 0,
            oem_id: [0; 6],
            oem_table_id: [0; 8],
            oem_revision: 0,
            creator_id: 0,
            creator_revision: 0,
        },
        nodes,
        errors: Vec::new(),
    }
}

/// Two SMMUv3 (smmu0 at 0x9050000, smmu1 at 0x9060000), an SMMUv2
/// (smmu2), a root complex spreading its buses over them, and RMR nodes:
/// RMR_1 for StreamIDs 0x10 and 0x18, RMR_2 (plus an empty range) for
/// 0x18 and 0x19, one for smmu1, and one naming 64 Ki StreamIDs.
fn table() -> Iort {
    iort(vec![
        node(ITS, NodeKind::ItsGroup { its_ids: vec![0] }, vec![]),
        node(SMMU_A, smmuv3(0x0905_0000), vec![]),
        node(SMMU_B, smmuv3(0x0906_0000), vec![]),
        node(
            SMMU_V2,
            NodeKind::Smmu(Smmu {
                base: 0x0907_0000,
                span: 0x1_0000,
                model: 0,
                flags: 0,
                global_interrupts: None,
                context_interrupts: Vec::new(),
            }),
            vec![],
        ),
        node(
            RC,
            NodeKind::RootComplex(RootComplex {
                cache_coherent: 1,
                memory_access_flags: 0,
                ats_attribute: 0,
                segment: 0,
                address_size_limit: Some(48),
                pasid_capabilities: None,
                flags: None,
            }),
            vec![
                map(0x000, 0x100, 0, SMMU_A),
                map(0x100, 0x100, 0x100, SMMU_B),
                map(0x200, 0x100, 0x200, SMMU_V2),
                map(0x300, 0x100, 0x9000, SMMU_A),
                map(0x400, 0xfc00, 0x400, ITS),
            ],
        ),
        node(
            500,
            rmr(&[RMR_1]),
            vec![single(0x10, SMMU_A), single(0x18, SMMU_A)],
        ),
        node(
            600,
            rmr(&[RMR_2, (0x7f00_0000, 0)]),
            vec![map(0, 2, 0x18, SMMU_A), single(0x120, SMMU_B)],
        ),
        node(
            700,
            rmr(&[(0x7c00_0000, 0x1000)]),
            vec![map(0, 0x1_0000, 0, SMMU_A)],
        ),
    ])
}

fn machine() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    let endpoint =
        |class| FunctionBuilder::endpoint(0x8086, 0x1, class).pcie(PortType::Endpoint, false);
    m.add(
        PciAddress::new(0, 0, 0, 0),
        FunctionBuilder::endpoint(0x1b36, 0x0008, 0x060000),
    );
    m.add(USB, endpoint(0x0c0330));
    m.add(NIC, endpoint(0x020000));
    m.add(EDU, endpoint(0x00ff00));
    for (dev, bus) in [(6u8, 1u8), (7, 2), (8, 3), (9, 4)] {
        m.add(
            PciAddress::new(0, 0, dev, 0),
            FunctionBuilder::bridge(0x1b36, 0x000c, 0, bus, bus).pcie(PortType::RootPort, false),
        );
    }
    for addr in [DISK, GPU, FAR, BYPASS] {
        m.add(addr, endpoint(0x010802));
    }
    m
}

struct Models<'m> {
    mem: &'m ModelMemory,
    clock: sluice_hal::model::ModelClock,
    a: SmmuModel<'m>,
    b: SmmuModel<'m>,
}

fn models(mem: &ModelMemory) -> Models<'_> {
    let b = SmmuModel::new(mem, IdrBuilder::qemu_7_2());
    b.set_stuck(Stuck {
        cr0: true,
        ..Stuck::default()
    });
    Models {
        mem,
        clock: clock(),
        a: SmmuModel::new(mem, IdrBuilder::qemu_7_2()),
        b,
    }
}

fn own<'m>(p: &'m Models<'m>, iort: &Iort, m: &ModelConfigSpace) -> OwnedSmmus<'m> {
    let topo = enumerate(m, Segment(0), &[0], 0..=0xff);
    assert_eq!(topo.errors, vec![]);
    let association = associate_iort(iort, &topo);
    let config = OwnershipConfig {
        timeout_ns: 1_000_000,
        ..OwnershipConfig::new()
    };
    take_ownership(iort, &[association], &config, |ordinal, node| {
        let model = match (ordinal, node.base) {
            (0, 0x0905_0000) => &p.a,
            (1, 0x0906_0000) => &p.b,
            other => panic!("factory called for {other:x?}"),
        };
        Ok(SmmuHardware {
            mmio: model,
            mem: p.mem,
            clock: &p.clock,
        })
    })
}

fn reaches(model: &SmmuModel<'_>, sid: u32, iova: u64) -> Option<u64> {
    model.dma(write(sid, iova)).ok().map(|o| o.phys.as_u64())
}

#[test]
fn every_smmu_owned_rmrs_identity_mapped_and_failures_uncover_their_devices() {
    let mem = ModelMemory::new();
    let p = models(&mem);
    let table = table();
    let owned = own(&p, &table, &machine());

    // smmu0 is owned; smmu1 never acknowledged CR0; smmu2 is an SMMUv2.
    let ordinals: Vec<usize> = owned.units.iter().map(|u| u.ordinal).collect();
    assert_eq!(ordinals, [0]);
    assert_eq!(owned.units[0].base, 0x0905_0000);
    assert!(
        owned.units[0].unit.coherent(),
        "COHACC override from the IORT"
    );
    assert_eq!(owned.failed.len(), 2);
    assert_eq!(owned.failed[0].ordinal, 1);
    assert!(
        matches!(
            owned.failed[0].error,
            OwnershipError::Init(SmmuError::Timeout { .. })
        ),
        "{:?}",
        owned.failed[0].error
    );
    assert_eq!(owned.failed[0].devices, [DISK]);
    assert_eq!(owned.failed[1].ordinal, 2);
    assert_eq!(owned.failed[1].error, OwnershipError::NotSmmuV3);
    assert_eq!(owned.failed[1].devices, [GPU]);
    assert!(p.a.enabled() && !p.b.enabled());

    // Devices: StreamID = RID on bus 0; the far bus is beyond the table.
    assert_eq!(
        owned.status(EDU),
        DeviceStatus::Isolated {
            unit: 0,
            stream_id: 0x20
        }
    );
    assert!(owned.is_rmr_device(USB) && owned.is_rmr_device(NIC));
    assert!(!owned.is_rmr_device(EDU));
    let uncovered: Vec<PciAddress> = owned.uncovered.iter().copied().collect();
    assert_eq!(uncovered, [DISK, GPU, FAR, BYPASS]);
    for addr in [DISK, GPU, FAR, BYPASS] {
        assert_eq!(owned.status(addr), DeviceStatus::Uncovered, "{addr}");
    }
    assert!(owned.unit_of(EDU).is_some() && owned.unit_of(DISK).is_none());

    // Every stream nothing reserved for aborts, whatever it targets.
    for sid in [0x0u32, 0x08, 0x11, 0x20, 0x30, 0x1000, 0x7fff] {
        for iova in [0x0, RMR_1.0, RMR_2.0, 0x4000_0000] {
            assert!(
                reaches(&p.a, sid, iova).is_none(),
                "StreamID {sid:#x} reached {iova:#x}"
            );
        }
    }
    // StreamIDs beyond the stream table abort too (C_BAD_STREAMID).
    assert!(matches!(
        p.a.dma(read(0x9000, 0x1000)),
        Err(WalkError::Fault(_))
    ));

    // RMRs: each stream reaches exactly the ranges that name it, 1:1.
    let (r1, r2) = (RMR_1.0, RMR_2.0);
    let r1_last = RMR_1.0 + RMR_1.1 - 0x1000;
    assert_eq!(reaches(&p.a, 0x10, r1), Some(r1));
    assert_eq!(reaches(&p.a, 0x10, r1_last + 0x10), Some(r1_last + 0x10));
    assert_eq!(reaches(&p.a, 0x10, r1 + RMR_1.1), None, "past RMR_1");
    assert_eq!(reaches(&p.a, 0x10, r2), None, "RMR_2 is not 0x10's");
    assert_eq!(reaches(&p.a, 0x18, r1), Some(r1));
    assert_eq!(reaches(&p.a, 0x18, r2 + 0x8), Some(r2 + 0x8));
    assert_eq!(reaches(&p.a, 0x19, r2), Some(r2));
    assert_eq!(reaches(&p.a, 0x19, r1), None, "RMR_1 is not 0x19's");
    assert_eq!(reaches(&p.a, 0x19, r2 + 0x1000), None, "past RMR_2");

    let sids: Vec<(usize, u32)> = owned.rmr_streams.keys().copied().collect();
    assert_eq!(
        sids,
        [(0, 0x10), (0, 0x18), (0, 0x19)],
        "64 Ki StreamIDs refused"
    );
    let s10 = &owned.rmr_streams[&(0, 0x10)];
    let s18 = &owned.rmr_streams[&(0, 0x18)];
    let s19 = &owned.rmr_streams[&(0, 0x19)];
    assert!(s10.error.is_none() && s18.error.is_none() && s19.error.is_none());
    let domains = [s10.domain, s18.domain, s19.domain];
    assert!(domains.iter().all(Option::is_some));
    assert!(
        domains[0] != domains[1] && domains[1] != domains[2] && domains[0] != domains[2],
        "streams needing different ranges never share a domain"
    );
    assert_eq!(s10.regions.len(), 1);
    assert_eq!(
        (s10.regions[0].base, s10.regions[0].limit),
        (r1, r1 + RMR_1.1 - 1)
    );
    // RMR_2's node also has an empty range: recorded as refused.
    assert_eq!(s19.regions.len(), 2);
    assert_eq!(s19.regions[0].error, None);
    assert_eq!(s19.regions[1].error, Some(SmmuError::InvalidRange));
    assert_eq!(s18.regions.len(), 3);
    match owned.status(NIC) {
        DeviceStatus::Rmr {
            unit: 0,
            stream_id: 0x18,
            stream,
        } => assert_eq!(stream.domain, domains[1]),
        other => panic!("NIC: {other:?}"),
    }
    // Only the RMR streams have STEs; every other one still has no
    // level-2 table or an aborting STE.
    let unit = &owned.units[0].unit;
    assert_eq!(unit.stream_domain(0x10), domains[0]);
    assert_eq!(unit.stream_domain(0x20), None);
    assert!(p.a.violations().is_empty(), "{:?}", p.a.violations());
}

#[test]
fn bad_register_bases_and_missing_hardware_are_reported() {
    let mem = ModelMemory::new();
    let p = models(&mem);
    let table = iort(vec![
        node(ITS, NodeKind::ItsGroup { its_ids: vec![0] }, vec![]),
        node(SMMU_A, smmuv3(0x0905_0000), vec![]),
        node(SMMU_B, smmuv3(0x0905_0000), vec![]),
        node(SMMU_V2, smmuv3(0x0905_8000), vec![]),
        node(RC, smmuv3(0x0906_0000), vec![]),
    ]);
    let topo = enumerate(&machine(), Segment(0), &[0], 0..=0xff);
    let association = associate_iort(&table, &topo);
    let mut calls = Vec::new();
    let owned = take_ownership(
        &table,
        &[association],
        &OwnershipConfig {
            timeout_ns: 1_000_000,
            ..OwnershipConfig::new()
        },
        |ordinal, node| {
            calls.push(ordinal);
            if node.base == 0x0906_0000 {
                return Err("no mapping for the register window");
            }
            Ok(SmmuHardware {
                mmio: &p.a,
                mem: p.mem,
                clock: &p.clock,
            })
        },
    );
    assert_eq!(calls, [0, 3], "never called for a refused base");
    assert_eq!(owned.units.len(), 1);
    let errors: Vec<OwnershipError> = owned.failed.iter().map(|f| f.error).collect();
    assert_eq!(
        errors,
        [
            OwnershipError::DuplicateBase { first: 0 },
            OwnershipError::NoHardware("the register base is zero or not 64 KiB aligned"),
            OwnershipError::NoHardware("no mapping for the register window"),
        ]
    );
    // No root complex in this table: every function is uncovered.
    assert_eq!(owned.device_unit.len(), 0);
    assert_eq!(owned.uncovered.len(), topo.functions.len());
}
