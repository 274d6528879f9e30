//! IORT parsing and ID translation.

mod common;

use common::*;
use sluice_iommu::acpi::SdtError;
use sluice_iommu::acpi::iort::{
    IdMappingFlags, IortError, MemoryRange, NodeKind, SmmuV3Flags, Translation, parse,
};

fn named_component(identifier: u32, name: &str, mappings: &[IdMap]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&0u32.to_le_bytes()); // flags
    d.extend_from_slice(&1u32.to_le_bytes()); // coherent
    d.extend_from_slice(&[0, 0, 0, 0]);
    d.push(40); // address size limit
    d.extend_from_slice(name.as_bytes());
    d.push(0);
    while d.len() % 4 != 0 {
        d.push(0);
    }
    iort_node(1, 4, identifier, &d, mappings)
}

fn smmuv2(base: u64, contexts: &[u32], mappings: &[IdMap]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&0x2_0000u64.to_le_bytes()); // span
    d.extend_from_slice(&1u32.to_le_bytes()); // model: SMMUv2 generic
    d.extend_from_slice(&1u32.to_le_bytes()); // flags: DVM
    d.extend_from_slice(&60u32.to_le_bytes()); // global interrupts at +60
    d.extend_from_slice(&(contexts.len() as u32).to_le_bytes());
    d.extend_from_slice(&76u32.to_le_bytes()); // contexts at +76
    d.extend_from_slice(&0u32.to_le_bytes());
    d.extend_from_slice(&0u32.to_le_bytes());
    for v in [100u32, 0, 101, 0] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    for &c in contexts {
        d.extend_from_slice(&c.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
    }
    iort_node(3, 3, 7, &d, mappings)
}

fn pmcg(page0: u64, gsiv: u32, reference: u32, page1: u64) -> Vec<u8> {
    let mut d = page0.to_le_bytes().to_vec();
    d.extend_from_slice(&gsiv.to_le_bytes());
    d.extend_from_slice(&reference.to_le_bytes());
    d.extend_from_slice(&page1.to_le_bytes());
    iort_node(5, 2, 8, &d, &[])
}

fn rmr(flags: u32, ranges: &[(u64, u64)], mappings: &[IdMap]) -> Vec<u8> {
    // Ranges placed after the ID mappings.
    let mut d = flags.to_le_bytes().to_vec();
    d.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    let ranges_at = 16 + 12 + 20 * mappings.len() as u32;
    d.extend_from_slice(&ranges_at.to_le_bytes());
    let mut node = iort_node(6, 3, 9, &d, mappings);
    for &(b, l) in ranges {
        node.extend_from_slice(&b.to_le_bytes());
        node.extend_from_slice(&l.to_le_bytes());
        node.extend_from_slice(&0u32.to_le_bytes());
    }
    let len = node.len() as u16;
    node[1..3].copy_from_slice(&len.to_le_bytes());
    node
}

/// ITS, SMMUv3, SMMUv2, named component, root complex, PMCG, RMR.
fn every_node_table() -> (Vec<u8>, Vec<u32>) {
    let its = its_group(0, &[0, 1]);
    let s3 = |its_off| {
        smmuv3(
            1,
            0x0905_0000,
            (SmmuV3Flags::COHACC_OVERRIDE
                | SmmuV3Flags::PROXIMITY_DOMAIN_VALID
                | SmmuV3Flags::DEVICE_ID_MAPPING_INDEX_VALID)
                .bits(),
            0,
            [0x6a, 0x6b, 0x6d, 0x6c],
            2,
            1,
            &[
                (0, 0xffff, 0x1_0000, its_off, 0),
                (0, 0, 0x7_0000, its_off, 1),
            ],
        )
    };
    let s2 = smmuv2(0x2b40_0000, &[200, 201, 202], &[]);
    let nc = |smmu_off| named_component(3, "\\_SB.DMA0", &[(0, 3, 0x400, smmu_off, 0)]);
    let rc = |smmu_off| {
        root_complex(
            4,
            0,
            1,
            &[
                (0x10, 0xf, 0x1000, smmu_off, 0),
                (0x20, 0xf, 0x2000, smmu_off, 0),
                (0x100, 0xfeff, 0x100, smmu_off, 0),
            ],
        )
    };
    let pm = |smmu_off| pmcg(0x2c00_0000, 300, smmu_off, 0x2c01_0000);
    let rm = |smmu_off| {
        rmr(
            1,
            &[(0x8000_0000, 0x10_0000), (0x8800_0000, 0x1000)],
            &[(0x30, 1, 0x30, smmu_off, 0)],
        )
    };
    let offsets = node_offsets(&[
        its.len(),
        s3(0).len(),
        s2.len(),
        nc(0).len(),
        rc(0).len(),
        pm(0).len(),
        rm(0).len(),
    ]);
    let (its_off, smmu_off) = (offsets[0], offsets[1]);
    let t = iort_table(
        5,
        &[
            its,
            s3(its_off),
            s2,
            nc(smmu_off),
            rc(smmu_off),
            pm(smmu_off),
            rm(smmu_off),
        ],
    );
    (t, offsets)
}

#[test]
fn every_node_type_is_parsed() {
    let (t, offsets) = every_node_table();
    let iort = parse(&t).expect("valid IORT");
    assert_eq!(iort.errors, vec![]);
    assert_eq!(iort.nodes.len(), 7);
    assert_eq!(
        iort.nodes.iter().map(|n| n.offset).collect::<Vec<_>>(),
        offsets
    );
    assert_eq!(
        iort.nodes[0].kind,
        NodeKind::ItsGroup {
            its_ids: vec![0, 1]
        }
    );
    let NodeKind::SmmuV3(s) = &iort.nodes[1].kind else {
        panic!("SMMUv3 expected")
    };
    assert_eq!(s.base, 0x0905_0000);
    assert!(s.flags.contains(SmmuV3Flags::COHACC_OVERRIDE));
    assert_eq!(
        (s.event_gsiv, s.pri_gsiv, s.gerr_gsiv, s.sync_gsiv),
        (0x6a, 0x6b, 0x6d, 0x6c)
    );
    assert_eq!(
        (s.proximity_domain, s.device_id_mapping_index),
        (Some(2), Some(1))
    );
    assert_eq!(
        iort.nodes[1].mappings[1].flags,
        IdMappingFlags::SINGLE_MAPPING
    );
    assert_eq!(
        iort.nodes[1].mappings[0].id_count(),
        0x1_0000,
        "count field is N-1"
    );
    let NodeKind::Smmu(s2) = &iort.nodes[2].kind else {
        panic!("SMMUv2 expected")
    };
    assert_eq!((s2.base, s2.span, s2.model), (0x2b40_0000, 0x2_0000, 1));
    assert_eq!(s2.global_interrupts, Some((100, 101)));
    assert_eq!(s2.context_interrupts, vec![200, 201, 202]);
    let NodeKind::NamedComponent(nc) = &iort.nodes[3].kind else {
        panic!("named component expected")
    };
    assert_eq!(
        (nc.name.as_str(), nc.address_size_limit),
        ("\\_SB.DMA0", 40)
    );
    let NodeKind::RootComplex(rc) = &iort.nodes[4].kind else {
        panic!("root complex expected")
    };
    assert_eq!(
        (rc.segment, rc.ats_attribute, rc.address_size_limit),
        (0, 1, Some(48))
    );
    let NodeKind::Pmcg(p) = &iort.nodes[5].kind else {
        panic!("PMCG expected")
    };
    assert_eq!(
        (
            p.page0_base,
            p.overflow_gsiv,
            p.node_reference,
            p.page1_base
        ),
        (0x2c00_0000, 300, offsets[1], Some(0x2c01_0000))
    );
    let NodeKind::Rmr(r) = &iort.nodes[6].kind else {
        panic!("RMR expected")
    };
    assert_eq!(
        r.ranges,
        vec![
            MemoryRange {
                base: 0x8000_0000,
                length: 0x10_0000
            },
            MemoryRange {
                base: 0x8800_0000,
                length: 0x1000
            }
        ]
    );
    assert_eq!(iort.smmus(), vec![1, 2]);
}

#[test]
fn rids_translate_to_stream_ids_and_its_device_ids() {
    let (t, _) = every_node_table();
    let iort = parse(&t).unwrap();
    assert_eq!(
        iort.translate_rid(0, 0x15),
        Ok(Translation {
            smmu: Some((1, 0x1005)),
            its: Some((0, 0x1_1005))
        })
    );
    // Overlap rule: 0x20 lies in no overlap here; 0x1f is the last of the first range.
    assert_eq!(
        iort.translate_rid(0, 0x1f).map(|t| t.smmu),
        Ok(Some((1, 0x100f)))
    );
    assert_eq!(
        iort.translate_rid(0, 0x2f).map(|t| t.smmu),
        Ok(Some((1, 0x200f)))
    );
    assert_eq!(
        iort.translate_rid(0, 0x5),
        Err(IortError::NoMapping {
            node: iort.nodes[4].offset,
            id: 5
        })
    );
    assert_eq!(
        iort.translate_rid(1, 0x5),
        Err(IortError::NoRootComplex { segment: 1 })
    );
    // Named component IDs go the same way.
    assert_eq!(iort.translate(3, 2).map(|t| t.smmu), Ok(Some((1, 0x402))));
}

#[test]
fn overlapping_mappings_resolve_to_the_first_in_table_order() {
    let its = its_group(0, &[0]);
    let smmu_len = smmuv3(1, 0, 0, 0, [0; 4], 0, 0, &[]).len();
    let offsets = node_offsets(&[its.len(), smmu_len]);
    let smmu = smmuv3(1, 0x0905_0000, 0, 0, [0; 4], 0, 0, &[]);
    // 0x10..=0x20 and 0x20..=0x2f overlap at 0x20 with different outputs.
    let rc = root_complex(
        2,
        0,
        0,
        &[
            (0x10, 0x10, 0x1000, offsets[1], 0),
            (0x20, 0xf, 0x2000, offsets[1], 0),
        ],
    );
    let iort = parse(&iort_table(3, &[its, smmu, rc])).unwrap();
    assert_eq!(
        iort.translate_rid(0, 0x20),
        Ok(Translation {
            smmu: Some((1, 0x1010)),
            its: None
        })
    );
    assert_eq!(
        iort.translate_rid(0, 0x21).map(|t| t.smmu),
        Ok(Some((1, 0x2001)))
    );
}

#[test]
fn qemu_virt_fixture_translates_the_whole_rid_space() {
    let fixture = include_bytes!("fixtures/qemu-virt-iort.bin");
    let iort = parse(fixture).expect("fixture parses");
    assert_eq!(iort.errors, vec![]);
    assert_eq!(iort.nodes.len(), 3);
    let NodeKind::SmmuV3(s) = &iort.nodes[1].kind else {
        panic!("SMMUv3 expected")
    };
    assert_eq!(s.base, 0x0905_0000);
    for rid in [0u16, 0x8, 0xff, 0x100, 0x101, 0xffff] {
        let t = iort.translate_rid(0, rid).unwrap();
        assert_eq!(t.smmu, Some((1, u32::from(rid))), "rid {rid:#x}");
        assert_eq!(t.its, Some((0, u32::from(rid))), "rid {rid:#x}");
    }
}

#[test]
fn translation_errors_are_specific() {
    // RC -> SMMU -> RC ... loops; a second RC maps to nowhere; a third overflows.
    let smmu_len = smmuv3(1, 0, 0, 0, [0; 4], 0, 0, &[(0, 0, 0, 0, 0)]).len();
    let rc_len = root_complex(2, 0, 0, &[(0, 0, 0, 0, 0)]).len();
    let offsets = node_offsets(&[smmu_len, rc_len, rc_len, rc_len]);
    let smmu = smmuv3(
        1,
        0x1000,
        0,
        0,
        [0; 4],
        0,
        0,
        &[(0, 0xffff, 0, offsets[1], 0)],
    );
    let rc0 = root_complex(2, 0, 0, &[(0, 0xffff, 0, offsets[0], 0)]);
    let rc1 = root_complex(3, 1, 0, &[(0, 0xffff, 0, 0x7777, 0)]);
    let rc2 = root_complex(4, 2, 0, &[(0, 0xffff, 0xffff_ff00, offsets[0], 0)]);
    let iort = parse(&iort_table(3, &[smmu, rc0, rc1, rc2])).unwrap();
    assert!(matches!(
        iort.translate_rid(0, 1),
        Err(IortError::TranslationLoop { .. })
    ));
    assert_eq!(
        iort.translate_rid(1, 1),
        Err(IortError::DanglingReference {
            node: offsets[2],
            reference: 0x7777
        })
    );
    assert_eq!(
        iort.translate_rid(2, 0x100),
        Err(IortError::OutputOverflow {
            node: offsets[3],
            id: 0x100
        })
    );
}

#[test]
fn malformed_tables_are_reported_and_the_rest_parsed() {
    let (t, offsets) = every_node_table();
    // Header problems.
    assert!(matches!(
        parse(&t[..t.len() - 1]),
        Err(IortError::Table(SdtError::LengthExceedsBuffer { .. }))
    ));
    let mut bad = t.clone();
    bad[50] ^= 1;
    assert!(matches!(
        parse(&bad),
        Err(IortError::Table(SdtError::BadChecksum { .. }))
    ));

    // Node array offset outside the table.
    let mut wild = t.clone();
    wild[40..44].copy_from_slice(&0x10_0000u32.to_le_bytes());
    fix_checksum(&mut wild);
    assert_eq!(
        parse(&wild).unwrap().errors,
        vec![IortError::NodeArrayOutOfTable { offset: 0x10_0000 }]
    );

    // Zero-length third node: the walk stops there, earlier nodes kept.
    let mut zero = t.clone();
    let third = offsets[2] as usize;
    zero[third + 1..third + 3].copy_from_slice(&0u16.to_le_bytes());
    fix_checksum(&mut zero);
    let iort = parse(&zero).unwrap();
    assert_eq!(iort.nodes.len(), 2);
    assert_eq!(
        iort.errors,
        vec![IortError::NodeLengthTooSmall {
            offset: offsets[2],
            length: 0
        }]
    );

    // Lying node length.
    let mut lying = t.clone();
    lying[third + 1..third + 3].copy_from_slice(&0xfff0u16.to_le_bytes());
    fix_checksum(&mut lying);
    assert_eq!(
        parse(&lying).unwrap().errors,
        vec![IortError::NodeOverrunsTable {
            offset: offsets[2],
            length: 0xfff0
        }]
    );

    // Node count larger than the nodes present.
    let mut more = t.clone();
    more[36..40].copy_from_slice(&9u32.to_le_bytes());
    fix_checksum(&mut more);
    let iort = parse(&more).unwrap();
    assert_eq!(iort.nodes.len(), 7);
    assert_eq!(
        iort.errors,
        vec![IortError::MissingNodes {
            expected: 9,
            found: 7
        }]
    );

    // Mapping count past the node: mappings dropped, node kept.
    let mut maps = t.clone();
    let rc = offsets[4] as usize;
    maps[rc + 8..rc + 12].copy_from_slice(&1000u32.to_le_bytes());
    fix_checksum(&mut maps);
    let iort = parse(&maps).unwrap();
    assert_eq!(iort.nodes.len(), 7);
    assert!(iort.nodes[4].mappings.is_empty());
    assert_eq!(
        iort.errors,
        vec![IortError::MappingsOutOfNode {
            offset: offsets[4],
            count: 1000,
            reference: 36
        }]
    );
    assert_eq!(
        iort.translate_rid(0, 0x15),
        Err(IortError::NoMapping {
            node: offsets[4],
            id: 0x15
        })
    );

    // ITS count lying: the ITS node is skipped, the rest kept.
    let mut its = t.clone();
    its[48 + 16..48 + 20].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    fix_checksum(&mut its);
    let iort = parse(&its).unwrap();
    assert_eq!(iort.nodes.len(), 6);
    assert_eq!(iort.errors, vec![IortError::ArrayOutOfNode { offset: 48 }]);
    // The SMMU's MSI mapping now points at no node.
    assert_eq!(
        iort.translate_rid(0, 0x15),
        Err(IortError::DanglingReference {
            node: offsets[1],
            reference: 48
        })
    );
}

#[test]
fn every_truncation_parses_without_panic() {
    let (t, offsets) = every_node_table();
    for len in 36..t.len() {
        let mut cut = t[..len].to_vec();
        fix_length_and_checksum(&mut cut);
        match parse(&cut) {
            Ok(iort) => {
                let whole = offsets
                    .iter()
                    .enumerate()
                    .filter(|&(i, &o)| {
                        let end = offsets.get(i + 1).copied().unwrap_or(t.len() as u32);
                        o < len as u32 && end <= len as u32
                    })
                    .count();
                assert_eq!(iort.nodes.len(), whole, "cut at {len}");
                assert!(!iort.errors.is_empty(), "cut at {len} must be reported");
            }
            Err(e) => assert_eq!(
                e,
                IortError::Table(SdtError::LengthTooSmall {
                    length: len as u32,
                    minimum: 48
                })
            ),
        }
    }
}

#[test]
fn older_node_revisions_do_not_read_mappings_as_newer_fields() {
    // A revision-0 root complex: 32-byte fixed part, then one ID mapping.
    let mut d = Vec::new();
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&[0; 4]);
    d.extend_from_slice(&0u32.to_le_bytes()); // ATS
    d.extend_from_slice(&0u32.to_le_bytes()); // segment
    let smmu_len = smmuv3(1, 0, 0, 0, [0; 4], 0, 0, &[]).len();
    let rc = iort_node(2, 0, 2, &d, &[(0x77, 0xff, 0, IORT_FIRST_NODE, 0)]);
    let smmu = smmuv3(1, 0x1000, 0, 0, [0; 4], 0, 0, &[]);
    let table = iort_table(0, &[smmu, rc]);
    let parsed = parse(&table).unwrap();
    assert_eq!(parsed.errors, vec![]);
    let NodeKind::RootComplex(rc) = &parsed.nodes[1].kind else {
        panic!("root complex expected")
    };
    assert_eq!(
        (rc.address_size_limit, rc.pasid_capabilities, rc.flags),
        (None, None, None)
    );
    assert_eq!(parsed.nodes[1].offset, IORT_FIRST_NODE + smmu_len as u32);
    assert_eq!(
        parsed.translate_rid(0, 0x80).map(|t| t.smmu),
        Ok(Some((0, 0x9)))
    );
}
