//! Substreams (PCIe PASIDs): CD tables indexed by SubstreamID, linear and
//! 2-level, with S1DSS for traffic without one (Arm IHI 0070, 3.3.3, 5.2
//! S1DSS/S1CDMax/S1Fmt, 5.3).

use sluice_hal::DmaMemory;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::pagetable::MapPerms;
use crate::smmuv3::events::EventKind;
use crate::smmuv3::model::Cmd;
use crate::smmuv3::structs::L1Cd;
use crate::smmuv3::unit::{SmmuDomainConfig, SmmuDomainId};
use crate::smmuv3::walker::WalkError;
use crate::smmuv3::{SmmuError, Stage};

fn kind(r: Result<crate::smmuv3::model::DmaOutcome, WalkError>) -> Option<EventKind> {
    match r {
        Err(WalkError::Fault(f)) => Some(f.kind),
        _ => None,
    }
}

fn domain_at(unit: &mut SmmuUnit<'_>, pa: u64) -> SmmuDomainId {
    let d = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.map(d, 0x1000, phys(pa), 0x1000, MapPerms::READ_WRITE)
        .unwrap();
    d
}

#[test]
fn substreams_are_refused_without_ssid_support() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    assert_eq!(unit.substream_limit(), 0);
    let d = domain_at(&mut unit, 0xa000);
    assert_eq!(
        unit.attach_substream(SID_A, 1, d),
        Err(SmmuError::SubstreamsUnsupported)
    );
    // Traffic with a SubstreamID is refused by the STE.
    unit.attach_stream(SID_A, d).unwrap();
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000).with_ssid(1))),
        Some(EventKind::BadSubstreamId)
    );
}

#[test]
fn rid_and_substream_traffic_translate_through_their_own_cds() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    assert_eq!(unit.substream_limit(), 256);
    let a = domain_at(&mut unit, 0xa000);
    let b = domain_at(&mut unit, 0xb000);
    let c = domain_at(&mut unit, 0xc000);

    // Substream first: traffic without SubstreamID terminates (S1DSS).
    unit.attach_substream(SID_A, 5, b).unwrap();
    assert_eq!(unit.substream_domain(SID_A, 5), Some(b));
    let ste = unit.read_ste(SID_A).unwrap();
    assert_eq!(
        (ste.s1_cd_max(), ste.s1_format(), ste.s1_dss()),
        (8, 0b01, 0b00)
    );
    assert_eq!(
        model.dma(read(SID_A, 0x1000).with_ssid(5)).unwrap().phys,
        phys(0xb000)
    );
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000))),
        Some(EventKind::StreamDisabled)
    );

    // Then the stream's own traffic: CD 0, S1DSS = substream 0.
    unit.attach_stream(SID_A, a).unwrap();
    assert_eq!(unit.read_ste(SID_A).unwrap().s1_dss(), 0b10);
    assert_eq!(model.dma(read(SID_A, 0x1000)).unwrap().phys, phys(0xa000));
    assert_eq!(
        model.dma(read(SID_A, 0x1000).with_ssid(5)).unwrap().phys,
        phys(0xb000)
    );
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000).with_ssid(0))),
        Some(EventKind::StreamDisabled),
        "substream 0 belongs to the stream's own traffic"
    );
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000).with_ssid(6))),
        Some(EventKind::BadCd),
        "a substream never attached"
    );
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000).with_ssid(256))),
        Some(EventKind::BadSubstreamId)
    );

    // A second leaf of the 2-level CD table, on demand.
    unit.attach_substream(SID_A, 200, c).unwrap();
    let root = unit.read_ste(SID_A).unwrap().s1_context_ptr();
    let l1 = L1Cd::from_raw(mem.read_u64(phys(root.as_u64() + 3 * 8)));
    assert!(l1.valid() && mem.is_live(l1.l2_ptr()));
    assert!(model.commands().contains(&Cmd::CfgiCd {
        sid: SID_A,
        ssid: 200,
        leaf: false
    }));
    assert_eq!(
        model.dma(write(SID_A, 0x1008).with_ssid(200)).unwrap().phys,
        phys(0xc008)
    );
    assert_eq!(
        unit.read_cd(SID_A, 200).unwrap().asid(),
        unit.domain_info(c).unwrap().tag
    );

    // Moving a substream: the old CD is invalidated first.
    unit.attach_substream(SID_A, 5, c).unwrap();
    assert_eq!(
        model.dma(read(SID_A, 0x1000).with_ssid(5)).unwrap().phys,
        phys(0xc000)
    );
    assert_eq!(unit.free_domain(b), Ok(()), "b is no longer used");

    // Detaching the stream keeps its substreams.
    unit.detach_stream(SID_A).unwrap();
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000))),
        Some(EventKind::StreamDisabled)
    );
    assert_eq!(
        model.dma(read(SID_A, 0x1000).with_ssid(200)).unwrap().phys,
        phys(0xc000)
    );
    unit.detach_substream(SID_A, 5).unwrap();
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000).with_ssid(5))),
        Some(EventKind::BadCd)
    );
    assert_eq!(unit.detach_substream(SID_A, 5), Err(SmmuError::NotAttached));
    unit.detach_substream(SID_A, 200).unwrap();
    // Nothing left in the level-2 table: it is gone.
    assert!(unit.level2_table(SID_A).is_none());
    assert_eq!(
        kind(model.dma(read(SID_A, 0x1000).with_ssid(200))),
        Some(EventKind::BadStreamId)
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn substream_attach_rules() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let s1 = domain_at(&mut unit, 0xa000);
    let s2 = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    assert_eq!(
        unit.attach_substream(SID_A, 0, s1),
        Err(SmmuError::SubstreamOutOfRange {
            ssid: 0,
            limit: 256
        })
    );
    assert_eq!(
        unit.attach_substream(SID_A, 256, s1),
        Err(SmmuError::SubstreamOutOfRange {
            ssid: 256,
            limit: 256
        })
    );
    assert_eq!(
        unit.attach_substream(SID_A, 1, s2),
        Err(SmmuError::WrongStage(Stage::Stage2))
    );
    unit.attach_stream(SID_A, s2).unwrap();
    assert_eq!(
        unit.attach_substream(SID_A, 1, s1),
        Err(SmmuError::WrongStage(Stage::Stage2)),
        "stage 1 under a stage-2 stream would be nested"
    );
    unit.detach_stream(SID_A).unwrap();
    unit.attach_substream(SID_A, 1, s1).unwrap();
    assert_eq!(
        unit.attach_stream(SID_A, s2),
        Err(SmmuError::WrongStage(Stage::Stage2))
    );
    assert_eq!(unit.free_domain(s1), Err(SmmuError::DomainInUse(s1.0)));
}

#[test]
fn linear_cd_tables_without_cd2l() {
    let mem = ModelMemory::new();
    let idr = IdrBuilder {
        ssid_bits: 4,
        cd2l: false,
        ..both_stages()
    };
    let model = SmmuModel::new(&mem, idr).check_flushes(&mem);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    assert_eq!(unit.substream_limit(), 16);
    let base = mem.live_pages();
    let a = domain_at(&mut unit, 0xa000);
    let b = domain_at(&mut unit, 0xb000);
    unit.attach_stream(SID_B, a).unwrap();
    unit.attach_substream(SID_B, 15, b).unwrap();
    let ste = unit.read_ste(SID_B).unwrap();
    assert_eq!((ste.s1_cd_max(), ste.s1_format()), (4, 0b00));
    assert_eq!(
        model.dma(read(SID_B, 0x1000).with_ssid(15)).unwrap().phys,
        phys(0xb000)
    );
    assert_eq!(model.dma(read(SID_B, 0x1000)).unwrap().phys, phys(0xa000));
    assert_eq!(
        unit.read_cd(SID_B, 15).unwrap().asid(),
        unit.domain_info(b).unwrap().tag
    );
    assert_eq!(
        unit.read_cd(SID_B, 0).unwrap().asid(),
        unit.domain_info(a).unwrap().tag
    );
    unit.detach_substream(SID_B, 15).unwrap();
    unit.detach_stream(SID_B).unwrap();
    unit.free_domain(a).unwrap();
    unit.free_domain(b).unwrap();
    assert_eq!(mem.live_pages(), base);
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}
