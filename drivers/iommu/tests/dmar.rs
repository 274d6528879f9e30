//! DMAR parsing: every structure type, the QEMU fixture, scope resolution,
//! and malformed tables.

mod common;

use common::*;
use sluice_iommu::acpi::SdtError;
use sluice_iommu::acpi::dmar::{
    AtsrFlags, DmarError, DmarFlags, DrhdFlags, SatcFlags, ScopeError, ScopeKind, StructureError,
    parse,
};
use sluice_pci::caps::PortType;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{PciAddress, Segment};

fn every_structure_table() -> Vec<u8> {
    dmar_table(
        46,
        0b111,
        &[
            drhd(
                0,
                2,
                0,
                0xfed9_0000,
                &[scope(1, 0, 0, &[(2, 0)]), scope(2, 0, 0, &[(3, 0), (0, 0)])],
            ),
            drhd(
                1,
                0,
                0,
                0xfed9_1000,
                &[
                    scope(3, 8, 0xf0, &[(0x1f, 0)]),
                    scope(4, 0, 0, &[(0x1f, 7)]),
                    scope(5, 1, 0, &[(0x15, 1)]),
                ],
            ),
            rmrr(
                0,
                0x7f00_0000,
                0x7f7f_ffff,
                &[scope(1, 0, 0, &[(0x1d, 0)]), scope(1, 0, 0, &[(0x1a, 0)])],
            ),
            atsr(1, 0, &[scope(2, 0, 0, &[(3, 0)])]),
            rhsa(0xfed9_1000, 1),
            andd(1, "\\_SB.PCI0.I2C1"),
            satc(1, 0, &[scope(1, 0, 0, &[(2, 0)])]),
            raw_structure(0x99, &[1, 2, 3, 4]),
        ],
    )
}

#[test]
fn every_structure_type_is_parsed() {
    let t = every_structure_table();
    let d = parse(&t).expect("valid DMAR");
    assert_eq!(d.errors, vec![]);
    assert_eq!(d.host_address_width, 47);
    assert_eq!(
        d.flags,
        DmarFlags::INTR_REMAP | DmarFlags::X2APIC_OPT_OUT | DmarFlags::DMA_CTRL_PLATFORM_OPT_IN
    );
    assert_eq!(&d.header.oem_id, b"BOCHS ");

    assert_eq!(d.drhds.len(), 2);
    let a = &d.drhds[0];
    assert_eq!(
        (a.flags, a.size, a.segment, a.register_base),
        (DrhdFlags::empty(), 2, Segment(0), 0xfed9_0000)
    );
    assert_eq!(a.register_size(), 16384);
    assert_eq!(a.scopes.len(), 2);
    assert_eq!(a.scopes[0].kind, ScopeKind::PciEndpoint);
    assert_eq!(a.scopes[0].path, vec![(2, 0)]);
    assert_eq!(a.scopes[1].kind, ScopeKind::PciSubHierarchy);
    assert_eq!(a.scopes[1].path, vec![(3, 0), (0, 0)]);
    let b = &d.drhds[1];
    assert!(b.include_pci_all());
    assert_eq!(b.offset, 48 + 16 + 8 + 10);
    let kinds: Vec<_> = b
        .scopes
        .iter()
        .map(|s| (s.kind, s.enumeration_id, s.start_bus))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ScopeKind::IoApic, 8, 0xf0),
            (ScopeKind::HpetMsi, 0, 0),
            (ScopeKind::AcpiNamespaceDevice, 1, 0)
        ]
    );

    assert_eq!(d.rmrrs.len(), 1);
    let r = &d.rmrrs[0];
    assert_eq!(
        (r.segment, r.base, r.limit),
        (Segment(0), 0x7f00_0000, 0x7f7f_ffff)
    );
    assert_eq!(
        r.scopes.iter().map(|s| s.path[0]).collect::<Vec<_>>(),
        vec![(0x1d, 0), (0x1a, 0)]
    );

    assert_eq!(d.atsrs.len(), 1);
    assert_eq!(d.atsrs[0].flags, AtsrFlags::ALL_PORTS);
    assert_eq!(d.atsrs[0].scopes[0].kind, ScopeKind::PciSubHierarchy);
    assert_eq!(
        (d.rhsas[0].register_base, d.rhsas[0].proximity_domain),
        (0xfed9_1000, 1)
    );
    assert_eq!(
        (
            d.andds[0].acpi_device_number,
            d.andds[0].object_name.as_str()
        ),
        (1, "\\_SB.PCI0.I2C1")
    );
    assert_eq!(d.satcs[0].flags, SatcFlags::ATC_REQUIRED);
    assert_eq!(d.satcs[0].scopes[0].path, vec![(2, 0)]);
    assert_eq!(d.unknown.len(), 1);
    assert_eq!(
        (d.unknown[0].structure_type, d.unknown[0].length),
        (0x99, 8)
    );
}

#[test]
fn qemu_q35_fixture_parses() {
    let fixture = include_bytes!("fixtures/qemu-q35-dmar.bin");
    let d = parse(fixture).expect("fixture parses");
    assert_eq!(d.errors, vec![]);
    assert_eq!(d.host_address_width, 39);
    assert_eq!(d.flags, DmarFlags::INTR_REMAP | DmarFlags::X2APIC_OPT_OUT);
    assert_eq!(d.drhds.len(), 1);
    let u = &d.drhds[0];
    assert_eq!(
        (u.register_base, u.segment, u.include_pci_all()),
        (0xfed9_0000, Segment(0), false)
    );
    assert_eq!(u.scopes.len(), 8);
    assert_eq!(
        (u.scopes[0].kind, u.scopes[0].start_bus),
        (ScopeKind::IoApic, 0xff)
    );
    assert_eq!(d.atsrs[0].flags, AtsrFlags::ALL_PORTS);
}

#[test]
fn header_problems_reject_the_table() {
    let t = every_structure_table();
    assert!(matches!(
        parse(&t[..t.len() - 1]),
        Err(DmarError::Table(SdtError::LengthExceedsBuffer { .. }))
    ));
    assert!(matches!(
        parse(&t[..30]),
        Err(DmarError::Table(SdtError::TooShort { have: 30, need: 36 }))
    ));
    let mut bad = t.clone();
    bad[60] ^= 0x40;
    assert!(matches!(
        parse(&bad),
        Err(DmarError::Table(SdtError::BadChecksum { .. }))
    ));
    let mut sig = t.clone();
    sig[..4].copy_from_slice(b"DMAX");
    fix_checksum(&mut sig);
    assert!(matches!(
        parse(&sig),
        Err(DmarError::Table(SdtError::BadSignature { .. }))
    ));
    // Header claims 40 bytes: less than the DMAR's fixed 48.
    let mut short = t[..40].to_vec();
    fix_length_and_checksum(&mut short);
    assert_eq!(
        parse(&short),
        Err(DmarError::Table(SdtError::LengthTooSmall {
            length: 40,
            minimum: 48
        }))
    );
    // Extra bytes after the declared length are ignored.
    let mut longer = t.clone();
    longer.extend_from_slice(&[0xaa; 7]);
    assert_eq!(parse(&longer).unwrap().drhds.len(), 2);
}

#[test]
fn zero_length_structure_stops_the_walk_but_keeps_what_came_before() {
    let mut zero = raw_structure(1, &[]);
    zero[2..4].copy_from_slice(&0u16.to_le_bytes());
    let t = dmar_table(
        38,
        0,
        &[
            drhd(1, 0, 0, 0xfed9_0000, &[]),
            zero,
            drhd(0, 0, 1, 0xfed9_1000, &[]),
        ],
    );
    let d = parse(&t).unwrap();
    assert_eq!(d.drhds.len(), 1);
    assert_eq!(
        d.errors,
        vec![StructureError {
            offset: 64,
            structure_type: 1,
            error: DmarError::StructureLengthTooSmall { length: 0 }
        }]
    );
}

#[test]
fn lying_structure_length_stops_the_walk() {
    let mut lying = drhd(0, 0, 0, 0xfed9_1000, &[]);
    lying[2..4].copy_from_slice(&0x400u16.to_le_bytes());
    let t = dmar_table(38, 0, &[rhsa(0xfed9_0000, 0), lying]);
    let d = parse(&t).unwrap();
    assert_eq!(d.rhsas.len(), 1);
    assert!(d.drhds.is_empty());
    assert_eq!(
        d.errors[0].error,
        DmarError::StructureOverrunsTable {
            length: 0x400,
            remaining: 16
        }
    );
}

#[test]
fn short_structures_are_skipped_and_the_rest_parsed() {
    // A DRHD 12 bytes long (fixed part is 16), then a good RHSA.
    let mut short = raw_structure(0, &[0; 8]);
    short[2..4].copy_from_slice(&12u16.to_le_bytes());
    let t = dmar_table(38, 0, &[short, rhsa(0x1000, 3), vec![0, 0]]);
    let d = parse(&t).unwrap();
    assert!(d.drhds.is_empty());
    assert_eq!(d.rhsas[0].proximity_domain, 3);
    assert_eq!(
        d.errors.iter().map(|e| e.error).collect::<Vec<_>>(),
        vec![
            DmarError::StructureTooShort {
                length: 12,
                minimum: 16
            },
            DmarError::TrailingBytes { count: 2 }
        ]
    );
}

#[test]
fn bad_scopes_are_reported_per_scope() {
    let zero_scope = vec![1, 0, 0, 0, 0, 0];
    let odd_path = vec![1, 7, 0, 0, 0, 0, 3];
    let no_path = vec![1, 6, 0, 0, 0, 0];
    let mut overrun = scope(1, 0, 0, &[(4, 0)]);
    overrun[1] = 20;
    let t = dmar_table(
        38,
        0,
        &[
            drhd(
                0,
                0,
                0,
                0x1000,
                &[
                    scope(1, 0, 0, &[(1, 0)]),
                    odd_path,
                    no_path,
                    scope(1, 0, 0, &[(2, 0)]),
                    zero_scope,
                    scope(1, 0, 0, &[(9, 0)]),
                ],
            ),
            drhd(0, 0, 0, 0x2000, &[scope(1, 0, 0, &[(3, 0)]), overrun]),
            rhsa(0x1000, 0),
        ],
    );
    let d = parse(&t).unwrap();
    assert_eq!(d.drhds.len(), 2);
    assert_eq!(
        d.drhds[0]
            .scopes
            .iter()
            .map(|s| s.path[0])
            .collect::<Vec<_>>(),
        vec![(1, 0), (2, 0)]
    );
    assert_eq!(d.drhds[1].scopes.len(), 1);
    assert_eq!(d.rhsas.len(), 1);
    let errors: Vec<_> = d.errors.iter().map(|e| e.error).collect();
    assert_eq!(
        errors,
        vec![
            DmarError::ScopeBadPath {
                at: 48 + 16 + 8,
                length: 7
            },
            DmarError::ScopeBadPath {
                at: 48 + 16 + 8 + 7,
                length: 6
            },
            DmarError::ScopeLengthTooSmall {
                at: 48 + 16 + 8 + 7 + 6 + 8,
                length: 0
            },
            DmarError::ScopeOverrunsStructure {
                at: 48 + 16 + 8 + 7 + 6 + 8 + 6 + 8 + 16 + 8,
                length: 20
            },
        ]
    );
}

#[test]
fn rmrr_ranges_are_checked() {
    let t = dmar_table(
        38,
        0,
        &[
            rmrr(0, 0x2000, 0x1fff, &[]),
            rmrr(0, 0x3000_0100, 0x3000_1fff, &[scope(1, 0, 0, &[(0x14, 0)])]),
            andd(2, "bad\u{e9}"),
        ],
    );
    let d = parse(&t).unwrap();
    assert_eq!(d.rmrrs.len(), 1, "inverted RMRR skipped, misaligned kept");
    assert_eq!(d.rmrrs[0].base, 0x3000_0100);
    assert!(d.andds.is_empty());
    assert_eq!(
        d.errors.iter().map(|e| e.error).collect::<Vec<_>>(),
        vec![
            DmarError::RmrrInverted {
                base: 0x2000,
                limit: 0x1fff
            },
            DmarError::RmrrMisaligned {
                base: 0x3000_0100,
                limit: 0x3000_1fff
            },
            DmarError::AnddBadName
        ]
    );
}

#[test]
fn every_truncation_parses_without_panic() {
    let t = every_structure_table();
    // Structure boundaries, from the structure lengths in the table.
    let mut boundaries = vec![48usize];
    while let Some(&at) = boundaries.last() {
        if at >= t.len() {
            break;
        }
        boundaries.push(at + u16::from_le_bytes([t[at + 2], t[at + 3]]) as usize);
    }
    assert_eq!(boundaries.len(), 9);
    for len in 36..t.len() {
        let mut cut = t[..len].to_vec();
        fix_length_and_checksum(&mut cut);
        match parse(&cut) {
            Ok(d) => {
                assert!(d.drhds.len() <= 2 && d.rmrrs.len() <= 1);
                let whole = boundaries.iter().filter(|&&b| b <= len).count() - 1;
                let parsed = d.drhds.len()
                    + d.rmrrs.len()
                    + d.atsrs.len()
                    + d.rhsas.len()
                    + d.andds.len()
                    + d.satcs.len()
                    + d.unknown.len();
                if boundaries.contains(&len) {
                    assert!(d.errors.is_empty(), "cut at boundary {len}: {:?}", d.errors);
                    assert_eq!(parsed, whole, "cut at {len}");
                } else {
                    assert!(!d.errors.is_empty(), "cut at {len} must be reported");
                    // The cut structure may survive with fewer scopes, never more structures.
                    assert!(
                        parsed == whole || parsed == whole + 1,
                        "cut at {len}: {parsed} vs {whole}"
                    );
                }
            }
            Err(e) => assert_eq!(
                e,
                DmarError::Table(SdtError::LengthTooSmall {
                    length: len as u32,
                    minimum: 48
                })
            ),
        }
    }
}

fn scope_machine() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    m.add(
        PciAddress::new(0, 0, 3, 0),
        FunctionBuilder::bridge(0x1b36, 0xc, 0, 5, 6).pcie(PortType::RootPort, false),
    );
    m.add(
        PciAddress::new(0, 5, 0, 0),
        FunctionBuilder::bridge(0x1b36, 0xe, 5, 6, 6).pcie(PortType::PcieToPciBridge, false),
    );
    m.add(
        PciAddress::new(0, 6, 2, 0),
        FunctionBuilder::endpoint(0x10ec, 0x8139, 0x020000),
    );
    m.add(
        PciAddress::new(0, 0, 4, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00),
    );
    m.add(
        PciAddress::new(0, 0, 7, 0),
        FunctionBuilder::bridge(0x1b36, 0xc, 0, 0, 0),
    );
    m
}

#[test]
fn scope_paths_follow_bridge_secondary_buses() {
    let t = dmar_table(
        38,
        0,
        &[drhd(
            0,
            0,
            0,
            0x1000,
            &[
                scope(1, 0, 0, &[(3, 0), (0, 0), (2, 0)]),
                scope(1, 0, 0, &[(4, 0)]),
                scope(1, 0, 0, &[(9, 0), (0, 0)]),
                scope(1, 0, 0, &[(4, 0), (0, 0)]),
                scope(1, 0, 0, &[(3, 0), (1, 0), (0, 0)]),
                scope(1, 0, 0, &[(7, 0), (0, 0)]),
            ],
        )],
    );
    let d = parse(&t).unwrap();
    let m = scope_machine();
    let resolved: Vec<_> = d.drhds[0]
        .scopes
        .iter()
        .map(|s| s.resolve(Segment(0), &m))
        .collect();
    assert_eq!(resolved[0], Ok(PciAddress::new(0, 6, 2, 0)));
    assert_eq!(resolved[1], Ok(PciAddress::new(0, 0, 4, 0)));
    assert_eq!(
        resolved[2],
        Err(ScopeError::MissingBridge {
            at: PciAddress::new(0, 0, 9, 0),
            hop: 0
        })
    );
    assert_eq!(
        resolved[3],
        Err(ScopeError::NotABridge {
            at: PciAddress::new(0, 0, 4, 0),
            hop: 0
        })
    );
    assert_eq!(
        resolved[4],
        Err(ScopeError::MissingBridge {
            at: PciAddress::new(0, 5, 1, 0),
            hop: 1
        })
    );
    assert_eq!(
        resolved[5],
        Err(ScopeError::BadSecondaryBus {
            at: PciAddress::new(0, 0, 7, 0),
            secondary: 0
        })
    );
}
