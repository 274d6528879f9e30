//! Runs the cargo-fuzz target bodies (`fuzz/bodies.rs`) over thousands of
//! mutated tables, so the no-panic property is checked on every test run,
//! not only when someone runs the fuzzer.

mod common;

#[path = "../fuzz/bodies.rs"]
mod bodies;

use sluice_iommu::acpi::{dmar, iort};

/// xorshift64*: deterministic, so a failure reproduces.
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

/// A few random edits: byte flips, interesting 16/32-bit values at random
/// places (lengths, counts, offsets), truncation and growth.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut t = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if t.is_empty() {
            break;
        }
        let at = rng.below(t.len());
        match rng.below(6) {
            0 => t[at] ^= 1 << rng.below(8),
            1 => t[at] = rng.next() as u8,
            2 => {
                let v: u16 = [0, 1, 4, 6, 7, 0xff, 0xffff, 0x8000][rng.below(8)];
                for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                    if let Some(x) = t.get_mut(at + i) {
                        *x = b;
                    }
                }
            }
            3 => {
                let v: u32 = [
                    0,
                    1,
                    0x10,
                    0x30,
                    0xffff_ffff,
                    0x7fff_ffff,
                    seed.len() as u32,
                ][rng.below(7)];
                for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                    if let Some(x) = t.get_mut(at + i) {
                        *x = b;
                    }
                }
            }
            4 => t.truncate(at),
            _ => {
                let extra: Vec<u8> = (0..rng.below(32)).map(|_| rng.next() as u8).collect();
                t.splice(at..at, extra);
            }
        }
    }
    t
}

fn dmar_seeds() -> Vec<Vec<u8>> {
    use common::*;
    vec![
        qemu_q35_dmar(),
        include_bytes!("fixtures/qemu/q35-bridges-dmar.bin").to_vec(),
        dmar_table(
            46,
            7,
            &[
                drhd(1, 0, 0, 0x1000, &[scope(3, 1, 0xf0, &[(0x1f, 0)])]),
                rmrr(
                    0,
                    0x1000,
                    0x1fff,
                    &[scope(1, 0, 0, &[(2, 0), (0, 0), (1, 0)])],
                ),
                atsr(1, 0, &[scope(2, 0, 0, &[(2, 0)])]),
                rhsa(0x1000, 0),
                andd(1, "\\_SB.X"),
                satc(1, 0, &[scope(1, 0, 0, &[(8, 0)])]),
            ],
        ),
    ]
}

#[test]
fn dmar_body_survives_mutated_tables() {
    let mut rng = Rng(0x5eed_d3a2);
    let seeds = dmar_seeds();
    let (mut ok, mut with_errors) = (0, 0);
    for i in 0..4000 {
        let input = mutate(&mut rng, &seeds[i % seeds.len()]);
        bodies::dmar(&input);
        if let Some(t) = bodies::with_valid_header(&input, b"DMAR")
            && let Ok(d) = dmar::parse(&t)
        {
            ok += 1;
            with_errors += usize::from(!d.errors.is_empty());
        }
    }
    // The mutations must reach the structure parser, valid and broken.
    assert!(ok > 2000, "only {ok} inputs parsed");
    assert!(
        with_errors > 300,
        "only {with_errors} inputs had structure errors"
    );
}

#[test]
fn iort_body_survives_mutated_tables() {
    let mut rng = Rng(0x10a7_0001);
    let seed = common::qemu_virt_iort();
    let (mut ok, mut with_errors) = (0, 0);
    for _ in 0..4000 {
        let input = mutate(&mut rng, &seed);
        bodies::iort(&input);
        if let Some(t) = bodies::with_valid_header(&input, b"IORT")
            && let Ok(d) = iort::parse(&t)
        {
            ok += 1;
            with_errors += usize::from(!d.errors.is_empty());
        }
    }
    assert!(ok > 2000, "only {ok} inputs parsed");
    assert!(
        with_errors > 300,
        "only {with_errors} inputs had node errors"
    );
}

#[test]
fn bodies_survive_random_bytes() {
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let len = rng.below(300);
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        bodies::dmar(&data);
        bodies::iort(&data);
    }
    // Reaching here means no panic; check the header helper did its job.
    let t = bodies::with_valid_header(&[0u8; 40], b"DMAR").unwrap();
    assert_eq!(
        dmar::parse(&t).unwrap_err(),
        dmar::DmarError::Table(sluice_iommu::acpi::SdtError::LengthTooSmall {
            length: 40,
            minimum: 48
        })
    );
}
