//! STEs, CDs and level-1 descriptors as the driver writes them, checked
//! field by field (Arm IHI 0070, 5.1-5.4) and through the independent
//! walker's decoding.

use sluice_hal::DmaMemory;
use sluice_hal::model::ModelMemory;

use super::*;
use crate::smmuv3::caps::oas_encoding_for;
use crate::smmuv3::structs::{L1Std, SteConfig, mair};
use crate::smmuv3::unit::SmmuDomainConfig;
use crate::smmuv3::walker;

#[test]
fn stage1_ste_and_cd_fields() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::qemu_7_2());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    let asid = unit.domain_info(dom).unwrap().tag;
    assert_eq!(asid, 1, "ASID 0 is never used");

    let ste = unit.read_ste(SID_A).unwrap();
    assert!(ste.valid());
    assert_eq!(ste.config(), SteConfig::Stage1);
    assert_eq!(ste.s1_format(), 0, "single CD");
    assert_eq!(ste.s1_cd_max(), 0, "QEMU: no substreams");
    let cd_table = ste.s1_context_ptr();
    assert!(cd_table.is_page_aligned() && mem.is_live(cd_table));
    assert_eq!(
        ste.s1_cd_attrs(),
        (0b01, 0b01, 0b11),
        "WB, WB, inner shareable"
    );
    assert!(!ste.s1_stall_disable(), "ILLEGAL when STALL_MODEL != 0");
    assert_eq!((ste.eats(), ste.strw()), (0, 0), "no ATS, NS-EL1");
    assert_eq!(ste.shcfg(), 0b01, "incoming shareability");
    let w = ste.words();
    assert_eq!(w[0], 1 | (0b101 << 1) | cd_table.as_u64());
    assert_eq!(w[2..], [0; 6], "no stage-2 fields, S2VMID 0");

    let cd = unit.read_cd(SID_A, 0).unwrap();
    assert!(cd.valid());
    assert_eq!(cd.t0sz(), 16, "48-bit input");
    assert_eq!(cd.tg0(), 0, "4 KiB granule");
    assert_eq!(cd.walk_attrs(), (0b01, 0b01, 0b11));
    assert!(!cd.epd0() && cd.epd1(), "TTB0 only");
    assert_eq!(cd.ips(), 4, "44-bit OAS");
    assert!(!cd.affd(), "leaves carry AF; access-flag faults stay on");
    assert!(cd.aa64());
    assert_eq!(cd.hardware_updates(), (false, false));
    assert_eq!(cd.fault_model(), (false, true, true), "S = 0, R = 1, A = 1");
    assert!(cd.aset());
    assert_eq!(cd.asid(), asid);
    assert_eq!(cd.mair(), mair::VALUE);
    assert!(mem.is_live(cd.ttb0()));
    let expected_w0: u64 = 16
        | (0b01 << 8)
        | (0b01 << 10)
        | (0b11 << 12)
        | (1 << 30)
        | (1 << 31)
        | (4 << 32)
        | (1 << 41)
        | (1 << 45)
        | (1 << 46)
        | (1 << 47)
        | (1 << 48);
    assert_eq!(cd.words()[0], expected_w0);
    assert_eq!(cd.words()[1], cd.ttb0().as_u64());

    // The independent decoding agrees.
    let cfg = model.walker_config();
    let stream = walker::decode_ste(&cfg, &ste.words()).unwrap();
    let s1 = stream.s1.unwrap();
    assert_eq!((s1.context_ptr, s1.cd_max), (cd_table.as_u64(), 0));
    let ctx = walker::decode_cd(&cfg, &cd.words(), None).unwrap();
    assert_eq!((ctx.asid, ctx.input_bits, ctx.levels), (asid, 48, 4));
    assert_eq!(
        (ctx.ttb0, ctx.output_bits, ctx.record),
        (cd.ttb0().as_u64(), 44, true)
    );

    // The level-1 descriptor leading to the STE: a 64-entry table.
    let l1 = mem.read_u64(phys(
        unit.stream_table().as_u64() + u64::from(SID_A >> 6) * 8,
    ));
    let l2 = unit.level2_table(SID_A).unwrap();
    assert_eq!(L1Std::from_raw(l1), L1Std::new(l2, 6));
    assert_eq!(l1, l2.as_u64() | 7, "Span = 7: 2^6 STEs");
}

#[test]
fn stage2_ste_fields() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage2()).unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    let info = unit.domain_info(dom).unwrap();
    assert_eq!(
        (info.input_bits, info.output_bits, info.levels),
        (44, 44, 4)
    );
    let vmid = info.tag;
    assert_eq!(vmid, 1, "VMID 0 tags stage-1 STEs");

    let ste = unit.read_ste(SID_A).unwrap();
    assert_eq!(ste.config(), SteConfig::Stage2);
    let w = ste.words();
    assert_eq!(w[0], 1 | (0b110 << 1), "no stage-1 fields");
    assert_eq!(w[1], 0b01 << 44, "SHCFG = incoming only");
    assert_eq!(ste.s2_vmid(), vmid);
    assert_eq!(ste.s2_t0sz(), 20);
    assert_eq!(ste.s2_sl0(), 2, "4 KiB granule, walk starts at level 0");
    assert_eq!(ste.s2_walk_attrs(), (0b01, 0b01, 0b11));
    assert_eq!(ste.s2_tg(), 0);
    assert_eq!(ste.s2_ps(), oas_encoding_for(44) as u8);
    assert!(ste.s2_aa64() && !ste.s2_affd() && ste.s2_record() && !ste.s2_stall());
    assert!(mem.is_live(ste.s2_ttb()));
    assert_eq!(w[3], ste.s2_ttb().as_u64());
    assert_eq!(w[4..], [0; 4]);

    let s2 = walker::decode_ste(&model.walker_config(), &w)
        .unwrap()
        .s2
        .unwrap();
    assert_eq!(
        (s2.vmid, s2.input_bits, s2.levels, s2.output_bits),
        (vmid, 44, 4, 44)
    );
    assert_eq!(s2.root, ste.s2_ttb().as_u64());

    // A narrower IPA space: 3 levels, SL0 = 1.
    let small = unit
        .alloc_domain(SmmuDomainConfig::stage2().with_input_bits(36))
        .unwrap();
    unit.attach_stream(SID_A + 1, small).unwrap();
    let ste = unit.read_ste(SID_A + 1).unwrap();
    assert_eq!((ste.s2_t0sz(), ste.s2_sl0()), (28, 1));
    assert_eq!(unit.domain_info(small).unwrap().tag, 2);
}

#[test]
fn non_coherent_smmu_structures_are_non_cacheable_and_stall_free() {
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, IdrBuilder::server()).check_flushes(&mem);
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    let ste = unit.read_ste(SID_A).unwrap();
    assert_eq!(
        ste.s1_cd_attrs(),
        (0b00, 0b00, 0b10),
        "NC, NC, outer shareable"
    );
    assert!(
        ste.s1_stall_disable(),
        "STALL_MODEL = 0: stalls disabled per STE"
    );
    assert_eq!(
        ste.s1_format(),
        0b01,
        "20-bit SubstreamIDs: 2-level CD table"
    );
    assert_eq!(ste.s1_cd_max(), 15, "one page of L1CDs: 2^15 substreams");
    let cd = unit.read_cd(SID_A, 0).unwrap();
    assert_eq!(cd.walk_attrs(), (0b00, 0b00, 0b10));
    assert_eq!(cd.ips(), 5, "48-bit OAS");
    assert!(
        mem.unflushed_words().is_empty(),
        "{:?}",
        mem.unflushed_words()
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[test]
fn domain_shape_predicts_the_domain_and_structure_pages_add_up() {
    use crate::smmuv3::{SmmuError, Stage};
    let mem = ModelMemory::new();
    let model = SmmuModel::new(&mem, both_stages());
    let clock = clock();
    let mut unit = init(&model, &mem, &clock);
    let base = unit.structure_pages();
    assert_eq!(base, unit.base_pages(), "nothing attached yet");
    assert_eq!(mem.live_pages(), base);
    for config in [
        SmmuDomainConfig::any(),
        SmmuDomainConfig::stage1(),
        SmmuDomainConfig::stage1().with_input_bits(39),
        SmmuDomainConfig::stage2(),
        SmmuDomainConfig::stage2().with_input_bits(40),
    ] {
        let shape = unit.domain_shape(config).unwrap();
        let before = mem.live_pages();
        let dom = unit.alloc_domain(config).unwrap();
        let info = unit.domain_info(dom).unwrap();
        assert_eq!(
            (
                shape.stage,
                shape.input_bits,
                shape.output_bits,
                shape.page_sizes
            ),
            (
                info.stage,
                info.input_bits,
                info.output_bits,
                info.page_sizes
            ),
            "{config:?}"
        );
        assert_eq!(mem.live_pages(), before + info.table_pages);
        unit.free_domain(dom).unwrap();
    }
    assert_eq!(
        unit.domain_shape(SmmuDomainConfig::any()).unwrap().stage,
        Stage::Stage1
    );
    assert!(matches!(
        unit.domain_shape(SmmuDomainConfig::stage1().with_input_bits(30)),
        Err(SmmuError::InvalidConfig(_))
    ));
    // Stream, CD and level-2 pages: every live page is a structure page
    // or a domain table page.
    let dom = unit.alloc_domain(SmmuDomainConfig::stage1()).unwrap();
    unit.attach_stream(SID_A, dom).unwrap();
    unit.attach_stream(SID_B, dom).unwrap();
    unit.attach_substream(SID_A, 3, dom).unwrap();
    let tables = unit.domain_info(dom).unwrap().table_pages;
    assert!(unit.structure_pages() > base + 2, "L2 tables and CD tables");
    assert_eq!(mem.live_pages(), unit.structure_pages() + tables);
    unit.detach_substream(SID_A, 3).unwrap();
    unit.detach_stream(SID_A).unwrap();
    unit.detach_stream(SID_B).unwrap();
    assert_eq!(unit.structure_pages(), base);
    unit.free_domain(dom).unwrap();
    assert_eq!(mem.live_pages(), base);
}
