//! Entry encodings checked against the bit positions in the specifications
//! (written out as literals here, not through the formats' constants), and
//! the walker checked on hand-built tables.

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaMemory, PhysAddr};

use super::super::arm::{ArmS1Attrs, ArmS2Attrs, ArmStage1, ArmStage2};
use super::super::vtd::{FirstLevelAttrs, VtdFirstLevel, VtdSecondLevel, VtdSlAttrs};
use super::super::walk::{self, Access, WalkFault, WalkKind, WalkParams};
use super::super::x86::{AmdNpt, EptAttrs, IntelEpt, X86Caching};
use super::super::{
    Decoded, MapPerms, PageTableError, PageTableFormat, Shareability, X86MemType, level_size,
};
use super::support::{Rng, TestFormat};

fn pa(raw: u64) -> PhysAddr {
    PhysAddr::new(raw)
}

#[test]
fn vtd_second_level_bits() {
    let f = VtdSecondLevel::new(4, 48, 46).unwrap();
    let attrs = VtdSlAttrs {
        snoop: true,
        memory_type: X86MemType::WriteBack,
        ignore_pat: true,
    };
    // R bit 0, W bit 1, EMT 5:3 = 6 (WB), IPAT bit 6, SNP bit 11.
    let leaf = f.leaf_entry(0, pa(0x1234_5000), MapPerms::READ_WRITE, &attrs);
    assert_eq!(leaf, 0x1234_5000 | 0b011 | (6 << 3) | (1 << 6) | (1 << 11));
    // X bit 2 and PS bit 7 on a 2 MiB leaf.
    let leaf = f.leaf_entry(
        1,
        pa(0x4060_0000),
        MapPerms::new(false, true, true),
        &VtdSlAttrs::default(),
    );
    assert_eq!(leaf, 0x4060_0000 | 0b110 | (1 << 7));
    assert_eq!(f.table_entry(2, pa(0x9000)), 0x9000 | 0b111);
    assert_eq!(f.decode(1, 0x9000 | 0b111), Decoded::Table(pa(0x9000)));
    assert_eq!(
        f.decode(1, 0x9000 | 0b100),
        Decoded::Invalid,
        "R = W = 0 is not present"
    );
    assert_eq!(
        f.decode(0, leaf),
        Decoded::Leaf {
            phys: pa(0x4060_0000),
            perms: MapPerms::new(false, true, true),
            attrs: VtdSlAttrs::default(),
        },
        "PS is ignored at the 4 KiB level"
    );
    // A (bit 8) and D (bit 9) are hardware-managed and kept across splits.
    assert_eq!(f.hardware_managed_bits(), (1 << 8) | (1 << 9));
    assert_eq!(
        f.check(MapPerms::new(false, false, true), &attrs),
        Err(PageTableError::UnsupportedPermissions(MapPerms::new(
            false, false, true
        )))
    );
}

#[test]
fn vtd_first_level_bits() {
    let f = VtdFirstLevel::new(4, 46).unwrap();
    let attrs = FirstLevelAttrs {
        user: true,
        caching: X86Caching {
            write_through: true,
            cache_disable: false,
        },
    };
    // P 0, R/W 1, U/S 2, PWT 3, PS 7, XD 63.
    let leaf = f.leaf_entry(1, pa(0x20_0000), MapPerms::READ_WRITE, &attrs);
    assert_eq!(leaf, 0x20_0000 | 0b1111 | (1 << 7) | (1 << 63));
    let leaf = f.leaf_entry(
        0,
        pa(0x5000),
        MapPerms::new(true, false, true),
        &FirstLevelAttrs::default(),
    );
    assert_eq!(leaf, 0x5000 | 0b1);
    assert_eq!(f.table_entry(3, pa(0x7000)), 0x7000 | 0b111);
    assert_eq!(f.decode(2, 0x7000 | 0b110), Decoded::Invalid);
    assert_eq!(
        f.check(MapPerms::new(false, true, false), &attrs),
        Err(PageTableError::UnsupportedPermissions(MapPerms::new(
            false, true, false
        )))
    );
    // Lower canonical half only.
    assert_eq!((f.input_bits(), f.walk_params().input_bits), (47, 47));
    assert_eq!(VtdFirstLevel::new(5, 46).unwrap().input_bits(), 56);
    // A bit 5, D bit 6.
    assert_eq!(f.hardware_managed_bits(), (1 << 5) | (1 << 6));
}

#[test]
fn amd_npt_sets_user_on_every_level() {
    let f = AmdNpt::new(4, 48).unwrap();
    assert_eq!(f.table_entry(3, pa(0x3000)), 0x3000 | 0b111);
    let leaf = f.leaf_entry(2, pa(0x4000_0000), MapPerms::READ, &X86Caching::default());
    assert_eq!(leaf, 0x4000_0000 | 0b101 | (1 << 7) | (1 << 63));
    let leaf = f.leaf_entry(
        0,
        pa(0x6000),
        MapPerms::ALL,
        &X86Caching {
            write_through: false,
            cache_disable: true,
        },
    );
    assert_eq!(leaf, 0x6000 | 0b111 | (1 << 4));
}

#[test]
fn intel_ept_bits() {
    let f = IntelEpt::new(4, 46, false).unwrap();
    let attrs = EptAttrs {
        memory_type: X86MemType::WriteBack,
        ignore_pat: true,
    };
    // R/W/X bits 2:0, memory type 5:3, IPAT 6, PS 7.
    let leaf = f.leaf_entry(2, pa(0x8000_0000), MapPerms::ALL, &attrs);
    assert_eq!(leaf, 0x8000_0000 | 0b111 | (6 << 3) | (1 << 6) | (1 << 7));
    assert_eq!(f.table_entry(1, pa(0x5000)), 0x5000 | 0b111);
    assert_eq!(
        f.decode(0, 0x5000 | (6 << 3)),
        Decoded::Invalid,
        "bits 2:0 clear"
    );
    let write_only = MapPerms::new(false, true, false);
    let exec_only = MapPerms::new(false, false, true);
    assert_eq!(
        f.check(write_only, &attrs),
        Err(PageTableError::UnsupportedPermissions(write_only))
    );
    assert_eq!(
        f.check(exec_only, &attrs),
        Err(PageTableError::UnsupportedPermissions(exec_only))
    );
    let with_cap = IntelEpt::new(4, 46, true).unwrap();
    assert_eq!(with_cap.check(exec_only, &attrs), Ok(()));
    assert_eq!(f.hardware_managed_bits(), (1 << 8) | (1 << 9));
}

#[test]
fn arm_stage1_bits() {
    let f = ArmStage1::new(48, 48).unwrap();
    let user_ro_x = ArmS1Attrs {
        attr_index: 2,
        shareability: Shareability::InnerShareable,
        user: true,
        not_global: true,
    };
    // Page: bits 1:0 = 11, AttrIndx 4:2, AP[2:1] 7:6 = 11 (RO, EL0), SH 9:8,
    // AF 10, nG 11, PXN 53 (a user page is not privileged-executable).
    let page = f.leaf_entry(0, pa(0x7000), MapPerms::new(true, false, true), &user_ro_x);
    assert_eq!(
        page,
        0x7000 | 0b11 | (2 << 2) | (0b11 << 6) | (0b11 << 8) | (1 << 10) | (1 << 11) | (1 << 53)
    );
    // Block: bits 1:0 = 01, privileged RW, not executable: PXN and UXN.
    let block = f.leaf_entry(
        1,
        pa(0x20_0000),
        MapPerms::READ_WRITE,
        &ArmS1Attrs::default(),
    );
    assert_eq!(
        block,
        0x20_0000 | 0b01 | (0b11 << 8) | (1 << 10) | (1 << 53) | (1 << 54)
    );
    // Privileged executable: UXN only.
    let block = f.leaf_entry(2, pa(0x4000_0000), MapPerms::ALL, &ArmS1Attrs::default());
    assert_eq!(
        block,
        0x4000_0000 | 0b01 | (0b11 << 8) | (1 << 10) | (1 << 54)
    );
    assert_eq!(f.table_entry(3, pa(0x3000)), 0x3000 | 0b11);
    assert_eq!(
        f.decode(0, 0x7000 | 0b01),
        Decoded::Invalid,
        "block encoding at level 3"
    );
    assert_eq!(
        f.decode(2, 0x7000 | 0b10),
        Decoded::Invalid,
        "valid bit clear"
    );
    assert_eq!(
        f.check(MapPerms::new(false, true, false), &ArmS1Attrs::default()),
        Err(PageTableError::UnsupportedPermissions(MapPerms::new(
            false, true, false
        )))
    );
    let bad_index = ArmS1Attrs {
        attr_index: 8,
        ..ArmS1Attrs::default()
    };
    assert_eq!(
        f.check(MapPerms::READ, &bad_index),
        Err(PageTableError::UnsupportedAttributes)
    );
}

#[test]
fn arm_stage2_bits() {
    let f = ArmStage2::new(40, 44).unwrap();
    assert_eq!(f.levels(), 4);
    let attrs = ArmS2Attrs {
        mem_attr: 0b1111,
        shareability: Shareability::InnerShareable,
    };
    // MemAttr 5:2, S2AP 7:6 (6 read, 7 write), SH 9:8, AF 10, XN bit 54.
    let page = f.leaf_entry(0, pa(0x9000), MapPerms::READ_WRITE, &attrs);
    assert_eq!(
        page,
        0x9000 | 0b11 | (0b1111 << 2) | (0b11 << 6) | (0b11 << 8) | (1 << 10) | (1 << 54)
    );
    let block = f.leaf_entry(
        1,
        pa(0x60_0000),
        MapPerms::new(false, true, false),
        &ArmS2Attrs::default(),
    );
    assert_eq!(
        block,
        0x60_0000 | 0b01 | (1 << 7) | (0b11 << 8) | (1 << 10) | (1 << 54)
    );
    let exec_only = MapPerms::new(false, false, true);
    assert_eq!(
        f.check(exec_only, &attrs),
        Err(PageTableError::UnsupportedPermissions(exec_only))
    );
    let bad = ArmS2Attrs {
        mem_attr: 16,
        ..attrs
    };
    assert_eq!(
        f.check(MapPerms::READ, &bad),
        Err(PageTableError::UnsupportedAttributes)
    );
}

/// Writes `(table, index, raw)` entries into fresh model memory.
fn build(mem: &ModelMemory, entries: &[(u64, u64, u64)]) {
    for &(table, index, raw) in entries {
        mem.write_u64(PhysAddr::new(table + index * 8), raw);
    }
}

#[test]
fn walker_on_hand_built_ept() {
    let mem = ModelMemory::new();
    // 4-level EPT: GPA 0x4060_1234 → PML4[0] → PDPT[1] → PD[3], a 2 MiB
    // read+execute write-back leaf at HPA 0x7_0060_0000.
    build(
        &mem,
        &[
            (0x1000, 0, 0x2000 | 0b111),
            (0x2000, 1, 0x3000 | 0b111),
            (0x3000, 3, 0x7_0060_0000 | 0b101 | (6 << 3) | (1 << 7)),
        ],
    );
    let params = WalkParams {
        kind: WalkKind::IntelEpt,
        levels: 4,
        input_bits: 48,
        output_bits: 46,
    };
    let w = walk::walk(&mem, &params, PhysAddr::new(0x1000), 0x4060_1234).unwrap();
    assert_eq!(w.phys.as_u64(), 0x7_0060_1234);
    assert_eq!(w.page_size, 2 << 20);
    assert_eq!(w.level, 1);
    assert_eq!(w.perms, MapPerms::new(true, false, true));
    let write = Access {
        write: true,
        exec: false,
        user: false,
    };
    assert_eq!(
        walk::walk_access(&mem, &params, PhysAddr::new(0x1000), 0x4060_1000, write),
        Err(WalkFault::Permission)
    );
    assert_eq!(
        walk::walk(&mem, &params, PhysAddr::new(0x1000), 0x4080_0000),
        Err(WalkFault::NotPresent { level: 1 })
    );
    // Write without read is a misconfiguration.
    build(&mem, &[(0x3000, 4, 0x8000 | 0b010)]);
    assert_eq!(
        walk::walk(&mem, &params, PhysAddr::new(0x1000), 0x4080_0000),
        Err(WalkFault::Reserved { level: 1 })
    );
    // An address beyond the 46-bit output width is reserved.
    build(&mem, &[(0x3000, 5, (1 << 47) | 0b001 | (1 << 7))]);
    assert_eq!(
        walk::walk(&mem, &params, PhysAddr::new(0x1000), 0x40a0_0000),
        Err(WalkFault::Reserved { level: 1 })
    );
}

#[test]
fn walker_applies_x86_rights_over_levels() {
    let mem = ModelMemory::new();
    // VT-d first level, 4 levels: the PDPTE denies writes and user access,
    // the PTE grants both; XD in the PDE makes the page non-executable.
    build(
        &mem,
        &[
            (0x1000, 0, 0x2000 | 0b111),
            (0x2000, 0, 0x3000 | 0b001),
            (0x3000, 0, 0x4000 | 0b111 | (1 << 63)),
            (0x4000, 9, 0xa_b000 | 0b111),
        ],
    );
    let params = WalkParams {
        kind: WalkKind::VtdFirstLevel,
        levels: 4,
        input_bits: 48,
        output_bits: 46,
    };
    let w = walk::walk(&mem, &params, PhysAddr::new(0x1000), 0x9000).unwrap();
    assert_eq!(w.phys.as_u64(), 0xa_b000);
    assert_eq!(w.perms, MapPerms::new(true, false, false));
    assert!(!w.user);
}

#[test]
fn walker_applies_arm_hierarchical_controls() {
    let mem = ModelMemory::new();
    // Stage 1, 3 levels (39-bit): L1 table with APTable[1] (bit 62, no
    // write) → L2 table → L3 page RW for EL0 with UXN clear.
    build(
        &mem,
        &[
            (0x1000, 0, 0x2000 | 0b11 | (1 << 62)),
            (0x2000, 0, 0x3000 | 0b11),
            (
                0x3000,
                2,
                0x5_5000 | 0b11 | (0b01 << 6) | (1 << 10) | (1 << 53),
            ),
        ],
    );
    let params = WalkParams {
        kind: WalkKind::ArmStage1,
        levels: 3,
        input_bits: 39,
        output_bits: 48,
    };
    let root = PhysAddr::new(0x1000);
    let w = walk::walk(&mem, &params, root, 0x2000).unwrap();
    assert_eq!(w.phys.as_u64(), 0x5_5000);
    assert!(w.user);
    assert_eq!(w.perms, MapPerms::new(true, false, true));
    // UXNTable (bit 60) removes EL0 execution.
    build(&mem, &[(0x1000, 0, 0x2000 | 0b11 | (1 << 60))]);
    let w = walk::walk(&mem, &params, root, 0x2000).unwrap();
    assert_eq!(w.perms, MapPerms::new(true, true, false));
    // A level-1 block at the 3-level root (1 GiB) is valid; input above 39
    // bits is not.
    build(&mem, &[(0x1000, 1, 0x8000_0000 | 0b01 | (1 << 10))]);
    let w = walk::walk(&mem, &params, root, 0x4000_1000).unwrap();
    assert_eq!((w.phys.as_u64(), w.page_size), (0x8000_1000, 1 << 30));
    assert_eq!(
        walk::walk(&mem, &params, root, 1 << 39),
        Err(WalkFault::AddressTooWide)
    );
}

#[test]
fn walker_rejects_level0_block_in_4_level_arm_tables() {
    let mem = ModelMemory::new();
    build(&mem, &[(0x1000, 0, 0x8000_0000 | 0b01 | (1 << 10))]);
    let params = WalkParams {
        kind: WalkKind::ArmStage2,
        levels: 4,
        input_bits: 48,
        output_bits: 48,
    };
    assert_eq!(
        walk::walk(&mem, &params, PhysAddr::new(0x1000), 0x1000),
        Err(WalkFault::NotPresent { level: 3 })
    );
}

#[test]
fn register_fields_for_the_root() {
    let ept = IntelEpt::new(4, 46, false).unwrap();
    // WB (6), walk length 4 - 1 = 3 in bits 5:3, A/D enable bit 6.
    assert_eq!(
        ept.eptp(pa(0x12_3000), true),
        0x12_3000 | (3 << 3) | (1 << 6) | 6
    );
    assert_eq!(ept.eptp(pa(0x12_3000), false), 0x12_3000 | (3 << 3) | 6);
    let s2 = ArmStage2::new(40, 44).unwrap();
    assert_eq!((s2.t0sz(), s2.sl0()), (24, 0b10));
    let s2 = ArmStage2::new(39, 44).unwrap();
    assert_eq!((s2.t0sz(), s2.sl0()), (25, 0b01));
    assert_eq!(ArmStage1::new(48, 48).unwrap().t0sz(), 16);
}

/// The engine relies on leaf entries being linear in the address.
fn check_linear<F: TestFormat>(format: F, seed: u64) {
    let mut rng = Rng::new(seed);
    for _ in 0..200 {
        let (perms, attrs) = format.random_leaf(&mut rng);
        let level = rng.below(3) as u8;
        let size = level_size(level);
        let k = rng.below(512);
        let limit = 1u64 << format.output_bits();
        let base = (rng.below(limit / size / 2)) * size;
        let first = format.leaf_entry(level, pa(base), perms, &attrs);
        let later = format.leaf_entry(level, pa(base + k * size), perms, &attrs);
        assert_eq!(
            later,
            first + k * size,
            "level {level} base {base:#x} k {k}"
        );
    }
}

#[test]
fn leaf_entries_are_linear_in_the_address() {
    check_linear(VtdSecondLevel::new(4, 48, 46).unwrap(), 1);
    check_linear(VtdFirstLevel::new(4, 52).unwrap(), 2);
    check_linear(AmdNpt::new(4, 52).unwrap(), 3);
    check_linear(IntelEpt::new(4, 46, true).unwrap(), 4);
    check_linear(ArmStage1::new(48, 48).unwrap(), 5);
    check_linear(ArmStage2::new(48, 40).unwrap(), 6);
}

#[test]
fn dirty_bit_positions() {
    // VT-d second level D bit 9; x86 paging D bit 6; EPT D bit 9.
    assert_eq!(
        VtdSecondLevel::new(4, 48, 46).unwrap().dirty_bit(),
        Some(1 << 9)
    );
    assert_eq!(VtdFirstLevel::new(4, 46).unwrap().dirty_bit(), Some(1 << 6));
    assert_eq!(AmdNpt::new(4, 46).unwrap().dirty_bit(), Some(1 << 6));
    assert_eq!(
        IntelEpt::new(4, 46, false).unwrap().dirty_bit(),
        Some(1 << 9)
    );
    assert_eq!(ArmStage1::new(48, 48).unwrap().dirty_bit(), None);
    assert_eq!(ArmStage2::new(48, 48).unwrap().dirty_bit(), None);
}
