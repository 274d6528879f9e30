//! Enumeration, DMA aliases and IOMMU groups on a model machine.

use sluice_pci::caps::{AcsFlags, PortType};
use sluice_pci::enumerate::{EnumError, HeaderType};
use sluice_pci::groups::{AliasRule, dma_alias, effective_requester_id};
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{Bdf, PciAddress, Segment, Topology, enumerate, iommu_groups};

fn addr(bus: u8, dev: u8, func: u8) -> PciAddress {
    PciAddress::new(0, bus, dev, func)
}

fn root_port(secondary: u8, subordinate: u8, acs: bool) -> FunctionBuilder {
    let b = FunctionBuilder::bridge(0x1b36, 0x000c, 0, secondary, subordinate)
        .pcie(PortType::RootPort, false);
    if acs {
        b.acs(AcsFlags::all(), AcsFlags::ISOLATION)
    } else {
        b
    }
}

fn endpoint(device: u16) -> FunctionBuilder {
    FunctionBuilder::endpoint(0x8086, device, 0x020000)
        .pcie(PortType::Endpoint, true)
        .msi(true, false, 0)
}

fn conventional(device: u16) -> FunctionBuilder {
    FunctionBuilder::endpoint(0x10ec, device, 0x020000)
}

/// The reference machine used by the topology tests:
///
/// ```text
/// 00:00.0 host bridge
/// 00:01.0 RC-integrated endpoint
/// 00:02.0 root port, ACS          -> 01:00.0 endpoint
/// 00:03.0 root port, ACS          -> 02:00.0 PCIe-to-PCI bridge -> 03:01.0, 03:02.0
/// 00:04.0/.1 multi-function endpoint without ACS
/// 00:05.0 root port, ACS          -> 04:00.0 switch upstream port
///     05:00.0 downstream port, ACS    -> 06:00.0/.1 multi-function, ACS redirect
///     05:01.0 downstream port, no ACS -> 07:00.0/.1 multi-function, ACS redirect
/// 00:06.0 conventional PCI bridge -> 08:01.0
/// ```
fn machine() -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    let redirect = AcsFlags::P2P_REQUEST_REDIRECT | AcsFlags::P2P_COMPLETION_REDIRECT;
    m.add(
        addr(0, 0, 0),
        FunctionBuilder::endpoint(0x8086, 0x29c0, 0x060000),
    );
    m.add(
        addr(0, 1, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00)
            .pcie(PortType::RootComplexIntegratedEndpoint, false),
    );
    m.add(addr(0, 2, 0), root_port(1, 1, true));
    m.add(addr(1, 0, 0), endpoint(0x10d3));
    m.add(addr(0, 3, 0), root_port(2, 3, true));
    m.add(
        addr(2, 0, 0),
        FunctionBuilder::bridge(0x1b36, 0x000e, 2, 3, 3).pcie(PortType::PcieToPciBridge, false),
    );
    m.add(addr(3, 1, 0), conventional(0x8139));
    m.add(addr(3, 2, 0), conventional(0x8139));
    m.add(addr(0, 4, 0), endpoint(0x1500).multi_function());
    m.add(addr(0, 4, 1), endpoint(0x1501).multi_function());
    m.add(addr(0, 5, 0), root_port(4, 7, true));
    m.add(
        addr(4, 0, 0),
        FunctionBuilder::bridge(0x10b5, 0x8724, 4, 5, 7).pcie(PortType::UpstreamSwitchPort, false),
    );
    m.add(
        addr(5, 0, 0),
        FunctionBuilder::bridge(0x10b5, 0x8724, 5, 6, 6)
            .pcie(PortType::DownstreamSwitchPort, false)
            .acs(AcsFlags::all(), AcsFlags::ISOLATION),
    );
    m.add(
        addr(5, 1, 0),
        FunctionBuilder::bridge(0x10b5, 0x8724, 5, 7, 7)
            .pcie(PortType::DownstreamSwitchPort, false),
    );
    for bus in [6, 7] {
        m.add(
            addr(bus, 0, 0),
            endpoint(0x1572).multi_function().acs(redirect, redirect),
        );
        m.add(
            addr(bus, 0, 1),
            endpoint(0x1572).multi_function().acs(redirect, redirect),
        );
    }
    m.add(
        addr(0, 6, 0),
        FunctionBuilder::bridge(0x8086, 0x244e, 0, 8, 8),
    );
    m.add(addr(8, 1, 0), conventional(0x2000));
    m
}

fn enumerate_machine(m: &ModelConfigSpace) -> Topology {
    enumerate(m, Segment(0), &[0], 0..=0xff)
}

#[test]
fn enumeration_finds_every_function_through_bridges() {
    let m = machine();
    let t = enumerate_machine(&m);
    assert_eq!(t.errors, vec![]);
    let found: Vec<String> = t.functions.iter().map(|f| f.addr.to_string()).collect();
    assert_eq!(
        found,
        [
            "0000:00:00.0",
            "0000:00:01.0",
            "0000:00:02.0",
            "0000:00:03.0",
            "0000:00:04.0",
            "0000:00:04.1",
            "0000:00:05.0",
            "0000:00:06.0",
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:03:01.0",
            "0000:03:02.0",
            "0000:04:00.0",
            "0000:05:00.0",
            "0000:05:01.0",
            "0000:06:00.0",
            "0000:06:00.1",
            "0000:07:00.0",
            "0000:07:00.1",
            "0000:08:01.0",
        ]
    );
    let ep = t.get(addr(1, 0, 0)).unwrap();
    assert_eq!(ep.upstream, t.index_of(addr(0, 2, 0)));
    assert_eq!(
        (ep.vendor_id, ep.device_id, ep.class_code),
        (0x8086, 0x10d3, 0x020000)
    );
    assert_eq!(ep.header_type, HeaderType::Endpoint);
    let rp = t.get(addr(0, 3, 0)).unwrap();
    assert_eq!(rp.header_type, HeaderType::PciBridge);
    assert_eq!(
        rp.bridge.map(|b| (b.secondary, b.subordinate)),
        Some((2, 3))
    );
    assert!(t.is_below(
        t.index_of(addr(3, 2, 0)).unwrap(),
        t.index_of(addr(0, 3, 0)).unwrap()
    ));
    assert!(!t.is_below(
        t.index_of(addr(1, 0, 0)).unwrap(),
        t.index_of(addr(0, 3, 0)).unwrap()
    ));
}

#[test]
fn aliases_follow_the_documented_bridge_rules() {
    let m = machine();
    let t = enumerate_machine(&m);
    let idx = |a| t.index_of(a).unwrap();
    let behind_pcie_to_pci = dma_alias(&t, idx(addr(3, 1, 0))).unwrap();
    assert_eq!(behind_pcie_to_pci.requester_id, Bdf::new(3, 0, 0));
    assert_eq!(behind_pcie_to_pci.bridge, addr(2, 0, 0));
    assert_eq!(behind_pcie_to_pci.rule, AliasRule::PcieToPciBridge);
    assert_eq!(
        dma_alias(&t, idx(addr(3, 2, 0))).map(|a| a.requester_id),
        Some(Bdf::new(3, 0, 0))
    );
    let behind_conventional = dma_alias(&t, idx(addr(8, 1, 0))).unwrap();
    assert_eq!(behind_conventional.requester_id, Bdf::new(0, 6, 0));
    assert_eq!(behind_conventional.rule, AliasRule::ConventionalBridge);
    assert_eq!(dma_alias(&t, idx(addr(1, 0, 0))), None);
    assert_eq!(
        dma_alias(&t, idx(addr(2, 0, 0))),
        None,
        "the bridge itself keeps its ID"
    );
    assert_eq!(
        effective_requester_id(&t, idx(addr(7, 0, 1))),
        Some(Bdf::new(7, 0, 1))
    );
}

#[test]
fn groups_follow_acs_and_aliases() {
    let m = machine();
    let t = enumerate_machine(&m);
    let g = iommu_groups(&t);
    let group = |a| g.group_of[t.index_of(a).unwrap()];
    // Numbered by lowest member address.
    let expected = [
        (addr(0, 0, 0), 0),
        (addr(0, 1, 0), 1),
        (addr(0, 2, 0), 2),
        (addr(0, 3, 0), 3),
        (addr(0, 4, 0), 4),
        (addr(0, 4, 1), 4), // multi-function without ACS
        (addr(0, 5, 0), 5),
        (addr(0, 6, 0), 6),
        (addr(8, 1, 0), 6), // alias = the conventional bridge itself
        (addr(1, 0, 0), 7),
        (addr(2, 0, 0), 8),
        (addr(3, 1, 0), 9), // share alias 03:00.0
        (addr(3, 2, 0), 9),
        (addr(4, 0, 0), 10),
        (addr(5, 0, 0), 11),
        (addr(5, 1, 0), 12),
        (addr(6, 0, 0), 13), // ACS downstream port, ACS redirect on both functions
        (addr(6, 0, 1), 14),
        (addr(7, 0, 0), 15), // downstream port without ACS
        (addr(7, 0, 1), 15),
    ];
    for (a, n) in expected {
        assert_eq!(group(a), n, "group of {a}");
    }
    assert_eq!(g.count, 16);
    assert_eq!(g.members(9).len(), 2);
    // Deterministic: enumerating again gives the same numbering.
    assert_eq!(iommu_groups(&enumerate_machine(&m)), g);
}

#[test]
fn root_port_without_acs_merges_its_subtree() {
    let m = ModelConfigSpace::new();
    m.add(addr(0, 2, 0), root_port(1, 2, false));
    m.add(
        addr(1, 0, 0),
        FunctionBuilder::bridge(0x10b5, 1, 1, 2, 2).pcie(PortType::UpstreamSwitchPort, false),
    );
    m.add(addr(2, 0, 0), endpoint(1));
    m.add(addr(0, 3, 0), root_port(3, 3, true));
    m.add(addr(3, 0, 0), endpoint(2));
    let t = enumerate_machine(&m);
    let g = iommu_groups(&t);
    let group = |a| g.group_of[t.index_of(a).unwrap()];
    assert_eq!(group(addr(1, 0, 0)), group(addr(2, 0, 0)));
    assert_ne!(group(addr(0, 2, 0)), group(addr(2, 0, 0)));
    assert_ne!(group(addr(3, 0, 0)), group(addr(2, 0, 0)));
}

#[test]
fn bus_loops_and_wild_secondary_buses_are_not_followed() {
    let m = ModelConfigSpace::new();
    m.add(addr(0, 1, 0), root_port(1, 3, true));
    // A bridge on bus 1 claiming bus 1 as its secondary (self loop).
    m.add(
        addr(1, 0, 0),
        FunctionBuilder::bridge(0x1b36, 1, 1, 1, 1).pcie(PortType::DownstreamSwitchPort, false),
    );
    // A bridge on bus 1 claiming bus 0 (loop back to the root).
    m.add(
        addr(1, 1, 0),
        FunctionBuilder::bridge(0x1b36, 1, 1, 0, 0).pcie(PortType::DownstreamSwitchPort, false),
    );
    // A bridge leading outside its parent's 1..=3 range.
    m.add(
        addr(1, 2, 0),
        FunctionBuilder::bridge(0x1b36, 1, 1, 9, 9).pcie(PortType::DownstreamSwitchPort, false),
    );
    // Two bridges to bus 2.
    m.add(
        addr(1, 3, 0),
        FunctionBuilder::bridge(0x1b36, 1, 1, 2, 2).pcie(PortType::DownstreamSwitchPort, false),
    );
    m.add(
        addr(1, 4, 0),
        FunctionBuilder::bridge(0x1b36, 1, 1, 2, 2).pcie(PortType::DownstreamSwitchPort, false),
    );
    // Subordinate below secondary.
    m.add(
        addr(1, 5, 0),
        FunctionBuilder::bridge(0x1b36, 1, 1, 3, 2).pcie(PortType::DownstreamSwitchPort, false),
    );
    m.add(addr(2, 0, 0), endpoint(7));
    let t = enumerate(&m, Segment(0), &[0], 0..=0x0f);
    assert_eq!(
        t.errors,
        vec![
            EnumError::SecondaryNotBelow {
                bridge: addr(1, 0, 0),
                secondary: 1
            },
            EnumError::SecondaryNotBelow {
                bridge: addr(1, 1, 0),
                secondary: 0
            },
            EnumError::SecondaryOutOfRange {
                bridge: addr(1, 2, 0),
                secondary: 9
            },
            EnumError::BusAlreadyScanned {
                bridge: addr(1, 4, 0),
                secondary: 2
            },
            EnumError::SubordinateBelowSecondary {
                bridge: addr(1, 5, 0),
                secondary: 3,
                subordinate: 2
            },
        ]
    );
    assert_eq!(
        t.get(addr(2, 0, 0)).unwrap().upstream,
        t.index_of(addr(1, 3, 0))
    );
    assert_eq!(t.functions.len(), 8);
    // Outside the ECAM window's buses.
    let t = enumerate(&m, Segment(0), &[0], 0..=0);
    assert_eq!(
        t.errors,
        vec![EnumError::SecondaryOutOfRange {
            bridge: addr(0, 1, 0),
            secondary: 1
        }]
    );
}

fn ari_machine(acs: bool, last_next: u8) -> ModelConfigSpace {
    let m = ModelConfigSpace::new();
    m.add(addr(0, 1, 0), root_port(1, 1, true).ari_forwarding());
    let redirect = AcsFlags::P2P_REQUEST_REDIRECT | AcsFlags::P2P_COMPLETION_REDIRECT;
    // Functions 0, 8 and 0x11 chained by ARI Next Function Number.
    for (devfn, next) in [(0u8, 8u8), (8, 0x11), (0x11, last_next)] {
        let mut f = endpoint(0x1572).multi_function().ari(next);
        if acs {
            f = f.acs(redirect, redirect);
        }
        m.add(addr(1, devfn >> 3, devfn & 7), f);
    }
    m
}

#[test]
fn ari_devices_are_enumerated_through_the_next_function_chain() {
    let m = ari_machine(true, 0);
    let t = enumerate_machine(&m);
    assert_eq!(t.errors, vec![]);
    let below: Vec<_> = t
        .functions
        .iter()
        .filter(|f| f.addr.bdf.bus() == 1)
        .collect();
    assert_eq!(
        below.iter().map(|f| f.addr).collect::<Vec<_>>(),
        vec![addr(1, 0, 0), addr(1, 1, 0), addr(1, 2, 1)]
    );
    assert!(below.iter().all(|f| f.ari_function));
    assert_eq!(below[1].caps.ari.map(|a| a.next_function), Some(0x11));
    let g = iommu_groups(&t);
    let group = |a| g.group_of[t.index_of(a).unwrap()];
    assert_ne!(
        group(addr(1, 0, 0)),
        group(addr(1, 1, 0)),
        "ACS redirect on every function"
    );

    // Without ACS, all functions of the ARI device share one group, even
    // though their devfns span several "device numbers".
    let t = enumerate_machine(&ari_machine(false, 0));
    let g = iommu_groups(&t);
    let group = |a| g.group_of[t.index_of(a).unwrap()];
    assert_eq!(group(addr(1, 0, 0)), group(addr(1, 1, 0)));
    assert_eq!(group(addr(1, 0, 0)), group(addr(1, 2, 1)));
}

#[test]
fn broken_ari_chains_stop_with_an_error() {
    // 0x11 points back to 8: would loop.
    let t = enumerate_machine(&ari_machine(true, 8));
    assert_eq!(
        t.errors,
        vec![EnumError::AriChainBroken {
            function: addr(1, 2, 1),
            next: 8
        }]
    );
    assert_eq!(
        t.functions.iter().filter(|f| f.addr.bdf.bus() == 1).count(),
        3
    );
    // 0x11 points to a function that does not answer.
    let t = enumerate_machine(&ari_machine(true, 0x40));
    assert_eq!(
        t.errors,
        vec![EnumError::AriChainBroken {
            function: addr(1, 2, 1),
            next: 0x40
        }]
    );
}
