//! The IORT that QEMU 7.2's `virt,iommu=smmuv3` board really emits (dumped
//! by Sluice's `acpi-dump` scenario with one edu on bus 0, see
//! `qemu-tests/dump-acpi.sh`).
//!
//! QEMU builds the table after firmware enumerated PCI: the root complex
//! sends the RIDs of the buses it found (bus 0 here) to the SMMU and every
//! other RID straight to the ITS, so those devices bypass translation. Its
//! first mapping's ID count is one too large, so RID 0x100 matches both
//! mappings; the first in table order wins.

use sluice_iommu::acpi::iort::{self, NodeKind};

const REAL: &[u8] = include_bytes!("fixtures/qemu/virt-smmuv3-iort.bin");
const MIRROR: &[u8] = include_bytes!("fixtures/qemu-virt-iort.bin");

#[test]
fn real_virt_iort_translates_bus_0_through_the_smmu_and_bypasses_the_rest() {
    let table = iort::parse(REAL).expect("QEMU's IORT parses");
    let smmus = table.smmus();
    assert_eq!(smmus.len(), 1);
    match &table.nodes[smmus[0]].kind {
        NodeKind::SmmuV3(smmu) => assert_eq!(smmu.base, 0x0905_0000),
        other => panic!("expected an SMMUv3 node, got {other:?}"),
    }
    for rid in [0x0000u16, 0x0008, 0x00ff, 0x0100] {
        let t = table.translate_rid(0, rid).expect("mapped");
        assert_eq!(t.smmu, Some((smmus[0], u32::from(rid))), "RID {rid:#06x}");
        assert_eq!(
            t.its.map(|(_, id)| id),
            Some(u32::from(rid)),
            "RID {rid:#06x}"
        );
    }
    for rid in [0x0101u16, 0x0208, 0xffff] {
        let t = table.translate_rid(0, rid).expect("mapped");
        assert_eq!(t.smmu, None, "RID {rid:#06x} bypasses the SMMU");
        assert_eq!(
            t.its.map(|(_, id)| id),
            Some(u32::from(rid)),
            "RID {rid:#06x}"
        );
    }
    assert!(
        table.translate_rid(1, 0).is_err(),
        "no root complex for segment 1"
    );
}

#[test]
fn hand_built_mirror_agrees_with_the_real_table_where_the_smmu_translates() {
    let real = iort::parse(REAL).unwrap();
    let mirror = iort::parse(MIRROR).unwrap();
    for rid in 0..=0x100u16 {
        let r = real
            .translate_rid(0, rid)
            .map(|t| (t.smmu.map(|s| s.1), t.its.map(|i| i.1)));
        let m = mirror
            .translate_rid(0, rid)
            .map(|t| (t.smmu.map(|s| s.1), t.its.map(|i| i.1)));
        assert_eq!(r, m, "RID {rid:#06x}");
    }
}
