//! Runs the cargo-fuzz target body (`fuzz/bodies.rs`) over thousands of
//! mutated configuration-space images on every test run.

#[path = "../fuzz/bodies.rs"]
mod bodies;

use sluice_pci::PciAddress;
use sluice_pci::caps::{AcsFlags, PortType, read_capabilities};
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Images of well-formed functions to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let m = ModelConfigSpace::new();
    let a = PciAddress::new(0, 0, 0, 0);
    let builders = [
        FunctionBuilder::endpoint(0x8086, 1, 0x020000)
            .power_management()
            .msi(true, true, 3)
            .msix(16, 0, 0x1000, 0, 0x2000)
            .pcie(PortType::Endpoint, true)
            .acs(AcsFlags::all(), AcsFlags::ISOLATION)
            .ats(0, true)
            .pri(32)
            .pasid(20, true, true)
            .sriov(4, 8)
            .bar_mem64(0, 0xe000_0000, 0x10_0000, true),
        FunctionBuilder::bridge(0x1b36, 0xc, 0, 1, 1)
            .pcie(PortType::RootPort, false)
            .acs(AcsFlags::all(), AcsFlags::empty()),
    ];
    builders
        .into_iter()
        .map(|b| {
            m.add(a, b);
            m.snapshot(a).unwrap()
        })
        .collect()
}

/// Rewrites pointers: 0x34, capability "next" bytes and extended "next"
/// fields get random (often wild) values; plus random byte noise.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut t = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 => t[0x34] = rng.next() as u8,
            1 => {
                let at = 0x40 + 4 * rng.below(48) + 1;
                t[at] = [0x00, 0x3c, 0x40, 0x41, 0xfc, 0xff, rng.next() as u8][rng.below(7)];
            }
            2 => {
                let at = 0x100 + 4 * rng.below(8);
                let next: u32 = [
                    0,
                    0xf0,
                    0x100,
                    0x102,
                    0xffc,
                    0xfff,
                    rng.next() as u32 & 0xfff,
                ][rng.below(7)];
                let header =
                    u32::from_le_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]]) & 0x000f_ffff;
                t[at..at + 4].copy_from_slice(&(header | (next << 20)).to_le_bytes());
            }
            3 => {
                let at = rng.below(t.len());
                t[at] = rng.next() as u8;
            }
            _ => t[6] |= 0x10, // capabilities-list bit on
        }
    }
    t
}

#[test]
fn capability_body_survives_mutated_images() {
    let mut rng = Rng(0xcafe_f00d);
    let seeds = seeds();
    let mut stopped_early = 0;
    for i in 0..3000 {
        let image = mutate(&mut rng, &seeds[i % seeds.len()]);
        bodies::capabilities(&image);
        let m = ModelConfigSpace::new();
        let a = PciAddress::new(0, 0, 0, 0);
        m.add(a, FunctionBuilder::from_image(&image));
        stopped_early += usize::from(!read_capabilities(&m, a).errors.is_empty());
    }
    // The mutations must produce broken lists, not only intact ones.
    assert!(
        stopped_early > 500,
        "only {stopped_early} images had capability errors"
    );
}

#[test]
fn capability_body_survives_random_images() {
    let mut rng = Rng(7);
    for _ in 0..300 {
        let image: Vec<u8> = (0..rng.below(4097)).map(|_| rng.next() as u8).collect();
        bodies::capabilities(&image);
    }
    // A fully looping extended list (every header points to itself) stops.
    let mut image = vec![0u8; 4096];
    image[0x06] = 0x10;
    image[0x34] = 0x40;
    image[0x40] = 0x10; // PCIe capability, so the extended list is walked
    image[0x100..0x104].copy_from_slice(&(0x000du32 | (0x100 << 20)).to_le_bytes());
    bodies::capabilities(&image);
    let m = ModelConfigSpace::new();
    let a = PciAddress::new(0, 0, 0, 0);
    m.add(a, FunctionBuilder::from_image(&image));
    let caps = read_capabilities(&m, a);
    assert_eq!(caps.extended.len(), 1);
    assert_eq!(
        caps.errors,
        vec![sluice_pci::caps::CapError::Loop {
            from: 0x100,
            pointer: 0x100
        }]
    );
}
