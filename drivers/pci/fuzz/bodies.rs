//! Fuzz target body, shared by the cargo-fuzz target and the host test
//! that runs it over mutated configuration-space images.
//!
//! The input is a function's configuration space image (up to 4 KiB; the
//! rest reads zero). It is placed at 00:00.0 and, as a second function of
//! a bridge's secondary bus, at 01:00.0, then walked, sized, enumerated
//! and grouped. The property: no panic, no hang, and the invariants
//! asserted here.

// Each fuzz target uses only some of the bodies.
#![allow(dead_code)]

use sluice_pci::bar::size_bars;
use sluice_pci::caps::{MAX_CAPS, MAX_EXT_CAPS, read_capabilities};
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{PciAddress, Segment, enumerate, iommu_groups};

pub fn capabilities(data: &[u8]) {
    let m = ModelConfigSpace::new();
    let a = PciAddress::new(0, 0, 0, 0);
    m.add(a, FunctionBuilder::from_image(data));
    m.add(
        PciAddress::new(0, 0, 1, 0),
        FunctionBuilder::bridge(0x1b36, 0xc, 0, 1, 1),
    );
    m.add(
        PciAddress::new(0, 1, 0, 0),
        FunctionBuilder::from_image(data),
    );

    let caps = read_capabilities(&m, a);
    assert!(caps.list.len() <= MAX_CAPS);
    assert!(caps.extended.len() <= MAX_EXT_CAPS);
    assert!(
        caps.list
            .iter()
            .all(|c| (0x40..=0xfc).contains(&c.offset) && c.offset % 4 == 0)
    );
    assert!(
        caps.extended
            .iter()
            .all(|c| (0x100..=0xffc).contains(&c.offset) && c.offset % 4 == 0)
    );

    let (bars, _) = size_bars(&m, a, 6);
    assert!(bars.iter().all(|b| b.size.is_power_of_two()));

    let topo = enumerate(&m, Segment(0), &[0], 0..=0xff);
    assert!(topo.functions.len() <= 256 * 32 * 8);
    let groups = iommu_groups(&topo);
    assert_eq!(groups.group_of.len(), topo.functions.len());
    assert!(groups.group_of.iter().all(|&g| g < groups.count));
}
