//! Fuzz target bodies, shared by the cargo-fuzz targets and the host test
//! that runs them over mutated tables (`tests/fuzz_bodies.rs`).
//!
//! Each body parses the input as is, then again with the header made valid
//! (signature, length, checksum) so the fuzzer reaches the structures, and
//! drives everything that consumes the parse: scope resolution and
//! association against a small model machine, ID translation. The property
//! is: no panic, no hang, and the invariants asserted here.

// Each fuzz target uses only some of the bodies.
#![allow(dead_code)]

use sluice_iommu::acpi::{checksum_fixup, dmar, iort};
use sluice_iommu::association::{associate_dmar, associate_iort, dmar_log_lines, iort_log_lines};
use sluice_pci::caps::PortType;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{PciAddress, Segment, Topology, enumerate};

/// `data` with the first 4 bytes replaced by `signature`, its length field
/// set to its size and its checksum fixed; `None` if shorter than a header.
pub fn with_valid_header(data: &[u8], signature: &[u8; 4]) -> Option<Vec<u8>> {
    if data.len() < 36 {
        return None;
    }
    let mut t = data.to_vec();
    t[..4].copy_from_slice(signature);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = checksum_fixup(&t);
    Some(t)
}

/// A root port with a bridge behind it and a few endpoints.
pub fn model_machine() -> (ModelConfigSpace, Topology) {
    let m = ModelConfigSpace::new();
    m.add(
        PciAddress::new(0, 0, 0, 0),
        FunctionBuilder::endpoint(0x8086, 0x29c0, 0x060000),
    );
    m.add(
        PciAddress::new(0, 0, 2, 0),
        FunctionBuilder::bridge(0x1b36, 0xc, 0, 1, 2).pcie(PortType::RootPort, false),
    );
    m.add(
        PciAddress::new(0, 1, 0, 0),
        FunctionBuilder::bridge(0x1b36, 0xe, 1, 2, 2).pcie(PortType::PcieToPciBridge, false),
    );
    m.add(
        PciAddress::new(0, 2, 1, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00),
    );
    m.add(
        PciAddress::new(0, 0, 8, 0),
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00),
    );
    let topo = enumerate(&m, Segment(0), &[0], 0..=0xff);
    (m, topo)
}

pub fn dmar(data: &[u8]) {
    let _ = dmar::parse(data);
    let Some(table) = with_valid_header(data, b"DMAR") else {
        return;
    };
    let Ok(parsed) = dmar::parse(&table) else {
        return;
    };
    let structures = parsed.drhds.len()
        + parsed.rmrrs.len()
        + parsed.atsrs.len()
        + parsed.rhsas.len()
        + parsed.andds.len()
        + parsed.satcs.len()
        + parsed.unknown.len();
    // Every structure is at least 4 bytes long.
    assert!(structures * 4 <= table.len());
    let (m, topo) = model_machine();
    for drhd in &parsed.drhds {
        for scope in &drhd.scopes {
            let _ = scope.resolve(drhd.segment, &m);
        }
    }
    let a = associate_dmar(&parsed, &topo, &m);
    assert_eq!(a.devices.len(), topo.functions.len());
    assert!(
        a.uncovered
            .iter()
            .all(|u| a.get(*u).is_some_and(|d| !d.assignable))
    );
    let _ = dmar_log_lines(&parsed, &topo, &a);
}

pub fn iort(data: &[u8]) {
    let _ = iort::parse(data);
    let Some(table) = with_valid_header(data, b"IORT") else {
        return;
    };
    let Ok(parsed) = iort::parse(&table) else {
        return;
    };
    assert!(parsed.nodes.len() * 16 <= table.len());
    for rid in [0u16, 1, 8, 0x100, 0xffff] {
        let _ = parsed.translate_rid(0, rid);
    }
    for i in 0..parsed.nodes.len() {
        let _ = parsed.translate(i, 0);
    }
    let (_, topo) = model_machine();
    let a = associate_iort(&parsed, &topo);
    assert_eq!(a.devices.len(), topo.functions.len());
    let _ = iort_log_lines(&parsed, &topo, &a);
}
