//! Device -> IOMMU association, RMRR/RMR attachment and the boot log
//! lines, on model machines that mirror the QEMU boards (and the real
//! QEMU DMAR dumps in `fixtures/qemu/`).

mod common;

use common::*;
use sluice_iommu::acpi::dmar::{self, ScopeError};
use sluice_iommu::acpi::iort;
use sluice_iommu::association::{
    AssociationError, Coverage, UnitId, associate_dmar, associate_iort, device_log_line,
    dmar_log_lines, drhd_log_line, iort_log_lines, reserved_log_line, smmu_log_line,
};
use sluice_pci::caps::{AcsFlags, PortType};
use sluice_pci::mcfg::parse_mcfg;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{Bdf, PciAddress, Segment, Topology, enumerate};

fn addr(bus: u8, dev: u8, func: u8) -> PciAddress {
    PciAddress::new(0, bus, dev, func)
}

fn edu() -> FunctionBuilder {
    FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00)
        .pcie(PortType::RootComplexIntegratedEndpoint, false)
        .msi(true, false, 0)
        .bar_mem32(0, 0xfea0_0000, 0x10_0000, false)
}

/// The machine `qemu-tests/dump-acpi.sh` boots as `q35-bridges`:
/// edu at 00:01.0, a root port at 00:02.0 with edu at 01:00.0, a
/// pcie-pci-bridge at 00:03.0 with edu at 02:01.0 and 02:02.0, and the
/// ICH9 functions at 00:1f.0/2/3.
fn q35_bridges() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    m.add(
        addr(0, 0, 0),
        FunctionBuilder::endpoint(0x8086, 0x29c0, 0x060000),
    );
    m.add(addr(0, 1, 0), edu());
    m.add(
        addr(0, 2, 0),
        FunctionBuilder::bridge(0x1b36, 0x000c, 0, 1, 1)
            .pcie(PortType::RootPort, false)
            .msix(1, 0, 0, 0, 0x800),
    );
    m.add(
        addr(1, 0, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00)
            .pcie(PortType::Endpoint, false)
            .msi(true, false, 0),
    );
    m.add(
        addr(0, 3, 0),
        FunctionBuilder::bridge(0x1b36, 0x000e, 0, 2, 2).pcie(PortType::PcieToPciBridge, false),
    );
    m.add(
        addr(2, 1, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00).msi(true, false, 0),
    );
    m.add(
        addr(2, 2, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00).msi(true, false, 0),
    );
    m.add(
        addr(0, 0x1f, 0),
        FunctionBuilder::endpoint(0x8086, 0x2918, 0x060100).multi_function(),
    );
    m.add(
        addr(0, 0x1f, 2),
        FunctionBuilder::endpoint(0x8086, 0x2922, 0x010601)
            .multi_function()
            .msi(false, false, 0),
    );
    m.add(
        addr(0, 0x1f, 3),
        FunctionBuilder::endpoint(0x8086, 0x2930, 0x0c0500).multi_function(),
    );
    m
}

fn topology(m: &ModelConfigSpace) -> Topology {
    enumerate(m, Segment(0), &[0], 0..=0xff)
}

#[test]
fn real_q35_bridges_dmar_covers_every_device_with_aliases_and_groups() {
    let table = dmar::parse(include_bytes!("fixtures/qemu/q35-bridges-dmar.bin"))
        .expect("real dump parses");
    assert_eq!(table.errors, vec![]);
    let m = q35_bridges();
    let topo = topology(&m);
    assert_eq!(topo.errors, vec![]);
    let a = associate_dmar(&table, &topo, &m);
    assert_eq!(a.errors, vec![]);
    assert_eq!(a.uncovered, vec![]);
    assert!(
        a.devices
            .iter()
            .all(|d| d.unit == Some(UnitId::Drhd(0)) && d.assignable)
    );
    assert_eq!(
        a.get(addr(0, 1, 0)).unwrap().coverage,
        Some(Coverage::EndpointScope)
    );
    assert_eq!(
        a.get(addr(1, 0, 0)).unwrap().coverage,
        Some(Coverage::SubHierarchyScope)
    );
    let b1 = a.get(addr(2, 1, 0)).unwrap();
    let b2 = a.get(addr(2, 2, 0)).unwrap();
    assert_eq!(b1.requester_id, Bdf::new(2, 0, 0));
    assert_eq!(b2.requester_id, Bdf::new(2, 0, 0));
    assert_eq!(b1.group, b2.group);
    assert_eq!(
        a.get(addr(0, 0x1f, 0)).unwrap().group,
        a.get(addr(0, 0x1f, 3)).unwrap().group
    );

    let lines = dmar_log_lines(&table, &topo, &a);
    assert_eq!(
        lines,
        vec![
            "iommu dmar0 base=0xfed90000 size=0x1000 segment=0000 flags=none scopes=8",
            "pci 0000:00:00.0 8086:29c0 class=060000 iommu=dmar0 group=0 caps=none",
            "pci 0000:00:01.0 1234:11e8 class=00ff00 iommu=dmar0 group=1 caps=msi,pcie",
            "pci 0000:00:02.0 1b36:000c class=060400 iommu=dmar0 group=2 caps=msix,pcie",
            "pci 0000:00:03.0 1b36:000e class=060400 iommu=dmar0 group=3 caps=pcie",
            "pci 0000:00:1f.0 8086:2918 class=060100 iommu=dmar0 group=4 caps=none",
            "pci 0000:00:1f.2 8086:2922 class=010601 iommu=dmar0 group=4 caps=msi",
            "pci 0000:00:1f.3 8086:2930 class=0c0500 iommu=dmar0 group=4 caps=none",
            "pci 0000:01:00.0 1234:11e8 class=00ff00 iommu=dmar0 group=5 caps=msi,pcie",
            "pci 0000:02:01.0 1234:11e8 class=00ff00 iommu=dmar0 group=6 alias=02:00.0 caps=msi",
            "pci 0000:02:02.0 1234:11e8 class=00ff00 iommu=dmar0 group=6 alias=02:00.0 caps=msi",
        ]
    );
}

#[test]
fn real_q35_dumps_parse_and_a_device_missing_from_the_dmar_is_uncovered() {
    let vtd = dmar::parse(include_bytes!("fixtures/qemu/q35-vtd-dmar.bin")).unwrap();
    let sm = dmar::parse(include_bytes!("fixtures/qemu/q35-vtd-sm-dmar.bin")).unwrap();
    assert_eq!((vtd.host_address_width, sm.host_address_width), (39, 48));
    assert_eq!(vtd.drhds[0].register_base, 0xfed9_0000);
    assert!(!vtd.drhds[0].include_pci_all());
    let mcfg = parse_mcfg(include_bytes!("fixtures/qemu/q35-vtd-mcfg.bin")).unwrap();
    assert_eq!(mcfg.entries.len(), 1);
    assert_eq!(
        (
            mcfg.entries[0].base,
            mcfg.entries[0].start_bus,
            mcfg.entries[0].end_bus
        ),
        (0xb000_0000, 0, 0xff)
    );

    let m = ModelConfigSpace::new();
    m.add(
        addr(0, 0, 0),
        FunctionBuilder::endpoint(0x8086, 0x29c0, 0x060000),
    );
    m.add(addr(0, 1, 0), edu());
    m.add(
        addr(0, 5, 0),
        FunctionBuilder::endpoint(0x1af4, 0x1041, 0x020000),
    ); // not in the DMAR
    let topo = topology(&m);
    let a = associate_dmar(&vtd, &topo, &m);
    assert_eq!(a.uncovered, vec![addr(0, 5, 0)]);
    let d = a.get(addr(0, 5, 0)).unwrap();
    assert_eq!((d.unit, d.assignable), (None, false));
    assert_eq!(
        device_log_line(&topo, d),
        "pci 0000:00:05.0 1af4:1041 class=020000 iommu=none group=2 caps=none"
    );
    assert!(a.get(addr(0, 1, 0)).unwrap().assignable);
}

/// Bus 0: 00:02.0 endpoint, 00:03.0 root port -> 01:00.0, 00:04.0/.1
/// multi-function without ACS, 00:05.0 endpoint, 00:06.0 root port
/// (ACS) -> 02:00.0.
fn synthetic_machine() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    m.add(
        addr(0, 2, 0),
        FunctionBuilder::endpoint(0x8086, 0x1, 0x030000),
    );
    m.add(
        addr(0, 3, 0),
        FunctionBuilder::bridge(0x8086, 0x2, 0, 1, 1).pcie(PortType::RootPort, false),
    );
    m.add(
        addr(1, 0, 0),
        FunctionBuilder::endpoint(0x8086, 0x3, 0x020000).pcie(PortType::Endpoint, true),
    );
    m.add(
        addr(0, 4, 0),
        FunctionBuilder::endpoint(0x8086, 0x4, 0x0c0330).multi_function(),
    );
    m.add(
        addr(0, 4, 1),
        FunctionBuilder::endpoint(0x8086, 0x5, 0x0c0330).multi_function(),
    );
    m.add(
        addr(0, 5, 0),
        FunctionBuilder::endpoint(0x8086, 0x6, 0x0c0320),
    );
    m.add(
        addr(0, 6, 0),
        FunctionBuilder::bridge(0x8086, 0x7, 0, 2, 2)
            .pcie(PortType::RootPort, false)
            .acs(AcsFlags::all(), AcsFlags::ISOLATION),
    );
    m.add(
        addr(2, 0, 0),
        FunctionBuilder::endpoint(0x8086, 0x8, 0x010802).pcie(PortType::Endpoint, true),
    );
    m
}

#[test]
fn explicit_scopes_first_then_include_pci_all_and_rmrrs_attach() {
    let table = dmar::parse(&dmar_table(
        47,
        1,
        &[
            drhd(
                0,
                0,
                0,
                0xfed9_0000,
                &[
                    scope(1, 0, 0, &[(2, 0)]),
                    scope(2, 0, 0, &[(3, 0)]),
                    scope(1, 0, 0, &[(4, 0)]),
                    scope(1, 0, 0, &[(9, 0), (0, 0)]), // through a missing bridge
                ],
            ),
            drhd(1, 0, 0, 0xfed9_1000, &[scope(3, 2, 0xf0, &[(0x1f, 0)])]),
            drhd(
                0,
                0,
                0,
                0xfed9_2000,
                &[scope(1, 0, 0, &[(2, 0)]), scope(1, 0, 0, &[(6, 0)])],
            ),
            drhd(0, 0, 1, 0xfed9_3000, &[scope(1, 0, 0, &[(5, 0)])]), // other segment
            rmrr(
                0,
                0x7f00_0000,
                0x7f0f_ffff,
                &[scope(1, 0, 0, &[(5, 0)]), scope(1, 0, 0, &[(4, 1)])],
            ),
            rmrr(
                0,
                0x7e00_0000,
                0x7e00_0fff,
                &[scope(1, 0, 0, &[(3, 0), (0, 0)])],
            ),
        ],
    ))
    .unwrap();
    let m = synthetic_machine();
    let topo = topology(&m);
    let a = associate_dmar(&table, &topo, &m);
    let unit = |x| a.get(x).unwrap().unit;
    assert_eq!(unit(addr(0, 2, 0)), Some(UnitId::Drhd(0)));
    assert_eq!(unit(addr(0, 3, 0)), Some(UnitId::Drhd(0)));
    assert_eq!(unit(addr(1, 0, 0)), Some(UnitId::Drhd(0)));
    assert_eq!(unit(addr(0, 4, 0)), Some(UnitId::Drhd(0)));
    assert_eq!(unit(addr(0, 4, 1)), Some(UnitId::Drhd(1)), "catch-all");
    assert_eq!(
        unit(addr(0, 5, 0)),
        Some(UnitId::Drhd(1)),
        "segment 1 scope does not apply"
    );
    assert_eq!(unit(addr(0, 6, 0)), Some(UnitId::Drhd(2)));
    assert_eq!(unit(addr(2, 0, 0)), Some(UnitId::Drhd(1)));
    assert_eq!(
        a.get(addr(0, 4, 1)).unwrap().coverage,
        Some(Coverage::IncludePciAll)
    );
    assert_eq!(a.uncovered, vec![]);
    assert_eq!(
        a.errors,
        vec![
            AssociationError::Scope {
                structure: 48,
                error: ScopeError::MissingBridge {
                    at: addr(0, 9, 0),
                    hop: 0
                }
            },
            AssociationError::ConflictingScopes {
                device: addr(0, 2, 0),
                kept: UnitId::Drhd(0),
                ignored: UnitId::Drhd(2)
            },
        ]
    );
    // 00:04.0 and 00:04.1 share a group (no ACS) but not a unit: neither is assignable.
    let f0 = a.get(addr(0, 4, 0)).unwrap();
    let f1 = a.get(addr(0, 4, 1)).unwrap();
    assert_eq!(f0.group, f1.group);
    assert!(!f0.assignable && !f1.assignable);
    assert!(a.get(addr(2, 0, 0)).unwrap().assignable);

    assert_eq!(a.reserved.len(), 2);
    assert_eq!(a.reserved[0].devices, vec![addr(0, 4, 1), addr(0, 5, 0)]);
    assert_eq!(a.reserved[1].devices, vec![addr(1, 0, 0)]);
    assert_eq!(a.get(addr(0, 5, 0)).unwrap().reserved, vec![0]);
    assert_eq!(a.get(addr(1, 0, 0)).unwrap().reserved, vec![1]);
    assert_eq!(
        reserved_log_line(&a.reserved[0], Some(&table)),
        "rmrr segment=0000 range=0x7f000000-0x7f0fffff devices=0000:00:04.1,0000:00:05.0"
    );
    assert_eq!(
        drhd_log_line(1, &table.drhds[1]),
        "iommu dmar1 base=0xfed91000 size=0x1000 segment=0000 flags=INCLUDE_PCI_ALL scopes=1"
    );
}

/// `-M virt` with edu at 00:01.0 and a root port at 00:02.0 leading to
/// 01:00.0, as in the virt-smmuv3 dump scenario.
fn virt_machine() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    m.add(
        addr(0, 0, 0),
        FunctionBuilder::endpoint(0x1b36, 0x0008, 0x060000),
    );
    m.add(addr(0, 1, 0), edu());
    m.add(
        addr(0, 2, 0),
        FunctionBuilder::bridge(0x1b36, 0x000c, 0, 1, 1).pcie(PortType::RootPort, false),
    );
    m.add(
        addr(1, 0, 0),
        FunctionBuilder::endpoint(0x1af4, 0x1042, 0x010000).pcie(PortType::Endpoint, false),
    );
    m
}

#[test]
fn iort_maps_rids_to_stream_ids_on_the_smmu() {
    let table = iort::parse(include_bytes!("fixtures/qemu-virt-iort.bin")).unwrap();
    let m = virt_machine();
    let topo = topology(&m);
    let a = associate_iort(&table, &topo);
    assert_eq!(a.errors, vec![]);
    assert_eq!(a.uncovered, vec![]);
    for d in &a.devices {
        assert_eq!(d.unit, Some(UnitId::Smmu(0)));
        assert_eq!(d.stream_id, Some(u32::from(d.addr.bdf.requester_id())));
        assert_eq!(d.its_device_id, d.stream_id);
        assert_eq!(d.its_id, Some(0), "the first ITS of the group");
    }
    let lines = iort_log_lines(&table, &topo, &a);
    assert_eq!(
        lines[0],
        "iommu smmu0 smmuv3 base=0x9050000 model=0 flags=COHACC_OVERRIDE gsiv=106,107,109,108"
    );
    assert_eq!(
        lines[4],
        "pci 0000:01:00.0 1af4:1042 class=010000 iommu=smmu0 group=3 caps=pcie"
    );
    assert_eq!(smmu_log_line(&table, 1), None);
}

#[test]
fn iort_rmr_attaches_and_unmapped_rids_are_uncovered() {
    // SMMU at node 1; the RC maps only RIDs 0..=0xff; an RMR names StreamID 8.
    let its = its_group(0, &[0]);
    let smmu_len = smmuv3(1, 0, 0, 0, [0; 4], 0, 0, &[]).len();
    let rc_len = root_complex(2, 0, 0, &[(0, 0, 0, 0, 0)]).len();
    let offsets = node_offsets(&[its.len(), smmu_len, rc_len]);
    let smmu = smmuv3(1, 0x0905_0000, 0, 0, [1, 2, 3, 4], 0, 0, &[]);
    let rc = root_complex(2, 0, 0, &[(0, 0xff, 0, offsets[1], 0)]);
    let mut rmr_data = 0u32.to_le_bytes().to_vec();
    rmr_data.extend_from_slice(&1u32.to_le_bytes());
    rmr_data.extend_from_slice(&(16u32 + 12 + 20).to_le_bytes());
    let mut rmr = iort_node(6, 3, 9, &rmr_data, &[(8, 0, 8, offsets[1], 1)]);
    rmr.extend_from_slice(&0x8000_0000u64.to_le_bytes());
    rmr.extend_from_slice(&0x2000u64.to_le_bytes());
    rmr.extend_from_slice(&0u32.to_le_bytes());
    let len = rmr.len() as u16;
    rmr[1..3].copy_from_slice(&len.to_le_bytes());
    let table = iort::parse(&iort_table(5, &[its, smmu, rc, rmr])).unwrap();
    assert_eq!(table.errors, vec![]);

    let m = virt_machine();
    let topo = topology(&m);
    let a = associate_iort(&table, &topo);
    assert_eq!(a.uncovered, vec![addr(1, 0, 0)], "RID 0x100 has no mapping");
    assert!(
        matches!(a.errors[0], AssociationError::Iort { device, error: iort::IortError::NoMapping { id: 0x100, .. } } if device == addr(1, 0, 0))
    );
    assert!(!a.get(addr(1, 0, 0)).unwrap().assignable);
    assert_eq!(a.reserved.len(), 1);
    assert_eq!(a.reserved[0].devices, vec![addr(0, 1, 0)]);
    assert_eq!(a.get(addr(0, 1, 0)).unwrap().reserved, vec![0]);
    assert_eq!(
        reserved_log_line(&a.reserved[0], None),
        "rmr range=0x80000000-0x80001fff devices=0000:00:01.0"
    );
}

/// Collects log records so tests can assert on what a lab engineer reads.
struct CaptureLogger(std::sync::Mutex<Vec<(log::Level, String)>>);

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if let Ok(mut v) = self.0.lock() {
            v.push((record.level(), record.args().to_string()));
        }
    }
    fn flush(&self) {}
}

static LOGGER: CaptureLogger = CaptureLogger(std::sync::Mutex::new(Vec::new()));

#[test]
fn uncovered_devices_are_logged_as_errors() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    let table = dmar::parse(include_bytes!("fixtures/qemu/q35-vtd-dmar.bin")).unwrap();
    let m = ModelConfigSpace::new();
    m.add(
        PciAddress::new(0, 0, 0x17, 0),
        FunctionBuilder::endpoint(0x1af4, 0x1041, 0x020000),
    );
    let topo = topology(&m);
    let a = associate_dmar(&table, &topo, &m);
    assert_eq!(a.uncovered, vec![PciAddress::new(0, 0, 0x17, 0)]);
    let logged = LOGGER.0.lock().unwrap().clone();
    assert!(
        logged.iter().any(|(level, msg)| *level == log::Level::Error
            && msg == "pci 0000:00:17.0: no IOMMU translates this device's DMA; it will not be assigned"),
        "{logged:?}"
    );
}

#[test]
fn ats_is_permitted_by_atsr_root_ports_and_satc() {
    let m = ModelConfigSpace::new();
    let ats_ep = |dev| {
        FunctionBuilder::endpoint(0x8086, dev, 0x020000)
            .pcie(PortType::Endpoint, false)
            .ats(0, false)
    };
    m.add(
        addr(0, 2, 0),
        FunctionBuilder::endpoint(0x8086, 1, 0x030000)
            .pcie(PortType::RootComplexIntegratedEndpoint, false)
            .ats(0, true),
    );
    m.add(
        addr(0, 3, 0),
        FunctionBuilder::bridge(0x8086, 2, 0, 1, 1).pcie(PortType::RootPort, false),
    );
    m.add(addr(1, 0, 0), ats_ep(3));
    m.add(
        addr(0, 6, 0),
        FunctionBuilder::bridge(0x8086, 4, 0, 2, 2).pcie(PortType::RootPort, false),
    );
    m.add(addr(2, 0, 0), ats_ep(5));
    m.add(
        addr(0, 7, 0),
        FunctionBuilder::endpoint(0x8086, 6, 0x030000)
            .pcie(PortType::RootComplexIntegratedEndpoint, false)
            .ats(0, true),
    );
    m.add(
        addr(0, 8, 0),
        FunctionBuilder::endpoint(0x8086, 7, 0x030000),
    ); // in SATC but no ATS capability
    let topo = topology(&m);
    let table = dmar::parse(&dmar_table(
        38,
        0,
        &[
            drhd(1, 0, 0, 0xfed9_0000, &[]),
            atsr(
                0,
                0,
                &[scope(2, 0, 0, &[(6, 0)]), scope(2, 0, 0, &[(9, 0), (0, 0)])],
            ),
            satc(
                1,
                0,
                &[scope(1, 0, 0, &[(2, 0)]), scope(1, 0, 0, &[(8, 0)])],
            ),
        ],
    ))
    .unwrap();
    let a = associate_dmar(&table, &topo, &m);
    let ats = |x| a.get(x).unwrap().ats_permitted;
    assert!(ats(addr(0, 2, 0)), "integrated, named by SATC");
    assert!(!ats(addr(1, 0, 0)), "root port 00:03.0 not in the ATSR");
    assert!(ats(addr(2, 0, 0)), "root port 00:06.0 in the ATSR");
    assert!(!ats(addr(0, 7, 0)), "integrated, not in SATC");
    assert!(!ats(addr(0, 8, 0)), "no ATS capability");
    assert_eq!(
        a.errors,
        vec![AssociationError::Scope {
            structure: 48 + 16,
            error: ScopeError::MissingBridge {
                at: addr(0, 9, 0),
                hop: 0
            }
        }]
    );

    let all_ports = dmar::parse(&dmar_table(
        38,
        0,
        &[drhd(1, 0, 0, 0xfed9_0000, &[]), atsr(1, 0, &[])],
    ))
    .unwrap();
    let a = associate_dmar(&all_ports, &topo, &m);
    assert!(
        a.get(addr(1, 0, 0)).unwrap().ats_permitted && a.get(addr(2, 0, 0)).unwrap().ats_permitted
    );
    assert!(
        !a.get(addr(0, 2, 0)).unwrap().ats_permitted,
        "ALL_PORTS says nothing of integrated devices"
    );

    // IORT: the root complex's ATS attribute decides (QEMU fixture sets it).
    let iort_table = iort::parse(include_bytes!("fixtures/qemu-virt-iort.bin")).unwrap();
    let a = associate_iort(&iort_table, &topo);
    assert!(a.get(addr(1, 0, 0)).unwrap().ats_permitted);
    assert!(!a.get(addr(0, 8, 0)).unwrap().ats_permitted);
}

#[test]
fn interrupt_sources_resolve_from_the_real_dump() {
    let table = dmar::parse(include_bytes!("fixtures/qemu/q35-vtd-dmar.bin")).unwrap();
    let m = ModelConfigSpace::new();
    let (sources, errors) = table.interrupt_sources(&m);
    assert_eq!(errors, vec![]);
    assert_eq!(sources.len(), 1);
    assert_eq!(
        (sources[0].drhd, sources[0].kind, sources[0].id),
        (0, dmar::ScopeKind::IoApic, 0)
    );
    assert_eq!(sources[0].source_id, PciAddress::new(0, 0xff, 0, 0));
}
