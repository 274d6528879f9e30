//! Model-based random tests: long seeded sequences of map/unmap (with
//! superpage-aligned ranges, partial unmaps that split superpages, and
//! injected allocation failures), each checked against a reference model
//! through `translate` and the independent walker, with exact invalidation
//! ranges and leak checks.

use std::vec::Vec;

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaMemory, PhysAddr};

use super::super::arm::{ArmStage1, ArmStage2};
use super::super::vtd::{VtdFirstLevel, VtdSecondLevel};
use super::super::walk::{self, WalkFault};
use super::super::x86::{AmdNpt, IntelEpt};
use super::super::{IoPageTable, IovaRange, PageSize, PageTableError, TableConfig, level_size};
use super::support::{
    Model, Rng, TestFormat, check_no_leak, check_page, entry_address, expected_leaf_size, leaves_in,
};

const K4: u64 = 4 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
/// Each random region spans this much IOVA (plus what large ranges spill).
const REGION: u64 = 4 * G1;

/// A random range offset and length inside a region: small 4 KiB runs,
/// 2 MiB-aligned runs (sometimes ragged), 1 GiB-aligned runs, and long
/// unaligned ones.
fn random_range(rng: &mut Rng) -> (u64, u64) {
    let kind = rng.below(100);
    if kind < 45 {
        let off = K4 * rng.below(16 * 1024);
        let pages = if rng.chance(10) {
            1 + rng.below(1100)
        } else {
            1 + rng.below(32)
        };
        (off, K4 * pages)
    } else if kind < 80 {
        let mut off = M2 * rng.below(128);
        if rng.chance(20) {
            off += K4 * rng.below(512);
        }
        let mut len = M2 * (1 + rng.below(3));
        if rng.chance(30) {
            len += K4 * rng.below(512);
        }
        (off, len)
    } else if kind < 92 {
        let mut off = G1 * rng.below(3);
        if rng.chance(30) {
            off += M2 * rng.below(512);
        }
        let mut len = G1;
        if rng.chance(30) {
            len += M2 * rng.below(4);
        }
        (off, len)
    } else {
        (K4 * rng.below(1 << 20), K4 * (1 + rng.below(1 << 14)))
    }
}

/// Largest leaf size any block of `[start, end)` can use at offset `delta`.
fn expected_largest(start: u64, end: u64, delta: u64, max_level: u8) -> u64 {
    (0..=max_level)
        .rev()
        .map(level_size)
        .find(|&size| {
            let first = start.next_multiple_of(size);
            first.checked_add(size).is_some_and(|e| e <= end) && delta.is_multiple_of(size)
        })
        .unwrap_or(K4)
}

/// Pages to check after an operation on `[start, end)`: its ends, its
/// neighbours, and random pages inside.
fn sample_pages(rng: &mut Rng, start: u64, end: u64, space: u64) -> Vec<u64> {
    let mut pages = Vec::new();
    let count = (end - start) / K4;
    if count <= 48 {
        pages.extend((0..count).map(|i| start + i * K4));
    } else {
        pages.extend([start, start + K4, end - K4, end - 2 * K4]);
        pages.extend((0..24).map(|_| start + K4 * rng.below(count)));
    }
    if start >= K4 {
        pages.push(start - K4);
    }
    if end < space {
        pages.push(end);
    }
    pages
}

/// How often each interesting path was taken, so a run that never splits a
/// superpage or never rolls back a failed allocation fails loudly instead of
/// passing vacuously.
#[derive(Debug, Default)]
struct Coverage {
    maps: usize,
    conflicts: usize,
    map_oom: usize,
    unmaps: usize,
    splits: usize,
    split_oom: usize,
    tables_freed: usize,
    largest_leaf: u64,
}

pub fn run_random<F: TestFormat>(format: F, config: TableConfig, seed: u64, ops: usize) {
    let mut cov = Coverage::default();
    let mem = ModelMemory::new();
    let non_coherent = !config.coherent_walk;
    mem.set_track_flushes(non_coherent);
    let mut pt: IoPageTable<'_, F, ModelMemory> =
        IoPageTable::new(&mem, format, config).expect("root allocation");
    let mut model: Model<F::Attrs> = Model::new();
    let mut rng = Rng::new(seed);
    let space = 1u64 << pt.format().input_bits();
    let max_level = (pt.max_page_size().trailing_zeros() - 12) / 9;
    let max_level = max_level as u8;
    let regions = [0, space / 2, space - REGION];

    for op in 0..ops {
        let base = rng.pick(&regions);
        let (off, len) = random_range(&mut rng);
        let iova = base + off;
        // Keep 4 KiB-leaf counts modest: huge ranges only with superpages.
        let len = if max_level == 0 {
            len.min(16 << 20)
        } else {
            len
        };
        let len = len.min(space - iova);
        let end = iova + len;
        let is_map = rng.chance(55);
        // Splits are rarer than maps: inject failures into unmaps more often.
        let inject = rng
            .chance(if is_map { 6 } else { 30 })
            .then(|| rng.below(2));
        mem.fail_allocation_after(inject);
        let live_before = mem.live_pages();
        let tables_before = pt.table_pages();
        let ctx = format!("seed {seed} op {op}: [{iova:#x}, {end:#x})");

        if is_map {
            let delta_kind = if len > (64 << 20) {
                rng.below(85)
            } else {
                rng.below(100)
            };
            let phys = if delta_kind < 60 {
                G1 * rng.below(8) + iova % G1
            } else if delta_kind < 85 {
                M2 * rng.below(4096) + iova % M2
            } else {
                K4 * rng.below(1 << 20)
            };
            let delta = phys.wrapping_sub(iova);
            let (perms, attrs) = pt.format().random_leaf(&mut rng);
            let conflict = model.first_mapped(iova, end);
            match pt.map(iova, PhysAddr::new(phys), len, perms, attrs) {
                Ok(inv) => {
                    assert_eq!(conflict, None, "{ctx}: map over a mapped page succeeded");
                    assert_eq!(inv.ranges(), &[IovaRange::new(iova, end)], "{ctx}");
                    assert_eq!(inv.newly_present(), inv.ranges(), "{ctx}");
                    assert_eq!(
                        inv.largest_page(),
                        expected_largest(iova, end, delta, max_level),
                        "{ctx}: largest leaf"
                    );
                    assert!(!inv.flush_paging_structures(), "{ctx}");
                    assert!(inv.pending_free().is_empty(), "{ctx}");
                    cov.maps += 1;
                    cov.largest_leaf = cov.largest_leaf.max(inv.largest_page());
                    inv.complete(&mem);
                    model.insert(iova, end, phys, perms, attrs);
                    for page in sample_pages(&mut rng, iova, end, space) {
                        check_page(&pt, &mem, &model, page);
                        if (iova..end).contains(&page) {
                            let t = pt.translate(page).expect("just mapped");
                            assert_eq!(
                                t.page_size,
                                expected_leaf_size(page, iova, end, delta, max_level),
                                "{ctx}: leaf size at {page:#x}"
                            );
                        }
                    }
                }
                Err(PageTableError::AlreadyMapped { iova: at }) => {
                    assert_eq!(Some(at), conflict, "{ctx}: reported conflict");
                    cov.conflicts += 1;
                    assert_eq!(mem.live_pages(), live_before, "{ctx}");
                }
                Err(PageTableError::OutOfMemory) => {
                    assert!(inject.is_some(), "{ctx}: spurious out of memory");
                    assert_eq!(conflict, None, "{ctx}");
                    assert_eq!(mem.live_pages(), live_before, "{ctx}: failed map leaked");
                    assert_eq!(pt.table_pages(), tables_before, "{ctx}");
                    cov.map_oom += 1;
                }
                Err(e) => panic!("{ctx}: unexpected map error {e:?}"),
            }
        } else {
            let leaves = leaves_in(&pt, &mem, iova, end);
            let largest = leaves.iter().map(|l| l.1).max().unwrap_or(0);
            let split = leaves.iter().any(|&(s, size)| s < iova || s + size > end);
            let result = if pt.format().split_needs_break_before_make() {
                if split {
                    // Without a hook the split is refused, nothing changed.
                    let refused = pt.unmap(iova, len).map(|_| ());
                    assert_eq!(refused, Err(PageTableError::NeedsBreakBeforeMake), "{ctx}");
                    assert_eq!(leaves_in(&pt, &mem, iova, end), leaves, "{ctx}: changed");
                }
                let root = pt.root();
                let params = pt.format().walk_params();
                let mut broken = Vec::new();
                let mut hook = |range: IovaRange| {
                    // The superpage must already be invalid (and flushed).
                    let w = walk::walk(&mem, &params, root, range.start);
                    assert!(matches!(w, Err(WalkFault::NotPresent { .. })), "{w:?}");
                    // ... and the invalid entry visible to a non-coherent
                    // walker before the TLB invalidation.
                    let level = ((range.len().trailing_zeros() - 12) / 9) as u8;
                    let entry = entry_address(&mem, root, params.levels, range.start, level);
                    assert_eq!(mem.read_u64(entry) & 1, 0);
                    assert!(!mem.unflushed_words().contains(&entry), "break not flushed");
                    broken.push((range.start, range.len()));
                };
                let result = pt.unmap_with_break(iova, len, &mut hook);
                if result.is_ok() {
                    let partial: Vec<(u64, u64)> = leaves
                        .iter()
                        .copied()
                        .filter(|&(s, size)| s < iova || s + size > end)
                        .collect();
                    assert_eq!(broken, partial, "{ctx}: break-before-make ranges");
                } else {
                    assert!(broken.is_empty(), "{ctx}: failed unmap broke entries");
                }
                result
            } else {
                pt.unmap(iova, len)
            };
            match result {
                Ok(inv) => {
                    let runs = model.remove(iova, end);
                    assert_eq!(inv.ranges(), runs.as_slice(), "{ctx}: invalidation ranges");
                    assert_eq!(inv.largest_page(), largest, "{ctx}: largest leaf");
                    assert_eq!(inv.superpage_split(), split, "{ctx}: split");
                    assert!(inv.newly_present().is_empty(), "{ctx}");
                    assert_eq!(inv.tables_freed(), !inv.pending_free().is_empty(), "{ctx}");
                    for &page in inv.pending_free() {
                        assert!(mem.is_live(page), "{ctx}: freed before invalidation");
                    }
                    assert_eq!(
                        mem.live_pages(),
                        pt.table_pages() + inv.pending_free().len(),
                        "{ctx}"
                    );
                    cov.unmaps += usize::from(!inv.ranges().is_empty());
                    cov.splits += usize::from(inv.superpage_split());
                    cov.tables_freed += usize::from(inv.tables_freed());
                    inv.complete(&mem);
                    for page in sample_pages(&mut rng, iova, end, space) {
                        check_page(&pt, &mem, &model, page);
                    }
                    // The pages of split superpages outside the range keep
                    // translating as before.
                    for &(s, size) in &leaves {
                        for page in [s, s + size - K4] {
                            check_page(&pt, &mem, &model, page);
                        }
                    }
                }
                Err(PageTableError::OutOfMemory) => {
                    assert!(inject.is_some() && split, "{ctx}: spurious out of memory");
                    assert_eq!(mem.live_pages(), live_before, "{ctx}: failed unmap leaked");
                    assert_eq!(leaves_in(&pt, &mem, iova, end), leaves, "{ctx}: changed");
                    cov.split_oom += 1;
                }
                Err(e) => panic!("{ctx}: unexpected unmap error {e:?}"),
            }
        }
        mem.fail_allocation_after(None);

        assert_eq!(mem.live_pages(), pt.table_pages(), "{ctx}: live pages");
        if non_coherent {
            assert!(
                mem.unflushed_words().is_empty(),
                "{ctx}: unflushed table writes {:?}",
                mem.unflushed_words()
            );
        }
        // Live pages = tables reachable from the root = the engine's count.
        // A leak persists, so checking every few ops still catches it within
        // a few ops of the call that caused it (and keeps the suite fast).
        if op % 8 == 7 {
            check_no_leak(&pt, &mem);
        }
        if op % 400 == 399 || op + 1 == ops {
            check_everything(&pt, &mem, &model, &regions, space);
        }
    }

    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0, "destroy leaked pages");

    let enough = ops / 20;
    assert!(
        cov.maps > enough && cov.unmaps > enough && cov.conflicts > 0 && cov.tables_freed > 0,
        "seed {seed}: too little exercised: {cov:?}"
    );
    assert!(
        cov.map_oom > 0,
        "seed {seed}: no map rollback exercised: {cov:?}"
    );
    assert_eq!(
        cov.largest_leaf,
        level_size(max_level),
        "seed {seed}: {cov:?}"
    );
    if max_level > 0 {
        assert!(
            cov.splits > 0 && cov.split_oom > 0,
            "seed {seed}: no split exercised: {cov:?}"
        );
    }
}

/// Whole-table comparison: every leaf the walker finds is in the model, and
/// every model run is mapped (checked at its ends and middle).
fn check_everything<F: TestFormat>(
    pt: &IoPageTable<'_, F, ModelMemory>,
    mem: &ModelMemory,
    model: &Model<F::Attrs>,
    regions: &[u64],
    space: u64,
) {
    check_no_leak(pt, mem);
    let mut leaf_bytes = 0;
    for &base in regions {
        let span_end = (base + REGION + 2 * G1).min(space);
        for (start, size) in leaves_in(pt, mem, base, span_end) {
            leaf_bytes += size;
            check_page(pt, mem, model, start);
            check_page(pt, mem, model, start + size - K4);
        }
    }
    assert_eq!(leaf_bytes, model.mapped_bytes(), "mapped bytes");
    for (start, end) in model.runs() {
        let mid = start + (((end - start) / 2) & !(K4 - 1));
        for page in [start, mid, end - K4] {
            check_page(pt, mem, model, page);
        }
    }
}

const OPS: usize = 800;
const SEEDS: [u64; 2] = [1, 0x5eed_cafe];

fn coherent(max: PageSize) -> TableConfig {
    TableConfig::new(max, true)
}

#[test]
fn vtd_second_level_3_levels() {
    for seed in SEEDS {
        let f = VtdSecondLevel::new(3, 39, 39).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn vtd_second_level_4_levels_non_coherent_2m_max() {
    for seed in SEEDS {
        let f = VtdSecondLevel::new(4, 48, 46).unwrap();
        run_random(f, TableConfig::new(PageSize::Size2M, false), seed, OPS);
    }
}

#[test]
fn vtd_second_level_4_levels_narrow_input() {
    for seed in SEEDS {
        let f = VtdSecondLevel::new(4, 42, 46).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn vtd_second_level_5_levels() {
    for seed in SEEDS {
        let f = VtdSecondLevel::new(5, 57, 52).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn vtd_first_level_4_levels() {
    for seed in SEEDS {
        let f = VtdFirstLevel::new(4, 46).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn vtd_first_level_5_levels_non_coherent() {
    for seed in SEEDS {
        let f = VtdFirstLevel::new(5, 52).unwrap();
        run_random(f, TableConfig::new(PageSize::Size1G, false), seed, OPS);
    }
}

#[test]
fn arm_stage1_3_levels() {
    for seed in SEEDS {
        let f = ArmStage1::new(39, 48).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn arm_stage1_4_levels_non_coherent() {
    for seed in SEEDS {
        let f = ArmStage1::new(48, 44).unwrap();
        run_random(f, TableConfig::new(PageSize::Size1G, false), seed, OPS);
    }
}

#[test]
fn arm_stage1_4_levels_bbm_level2() {
    for seed in SEEDS {
        let f = ArmStage1::new(48, 48).unwrap().with_bbm_level2();
        run_random(f, coherent(PageSize::Size1G), seed, OPS / 2);
    }
}

#[test]
fn arm_stage2_3_levels_2m_max() {
    for seed in SEEDS {
        let f = ArmStage2::new(39, 40).unwrap();
        run_random(f, coherent(PageSize::Size2M), seed, OPS);
    }
}

#[test]
fn arm_stage2_4_levels() {
    for seed in SEEDS {
        let f = ArmStage2::new(48, 48).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn amd_npt_4_levels() {
    for seed in SEEDS {
        let f = AmdNpt::new(4, 48).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn intel_ept_4_levels() {
    for seed in SEEDS {
        let f = IntelEpt::new(4, 46, true).unwrap();
        run_random(f, coherent(PageSize::Size1G), seed, OPS);
    }
}

#[test]
fn vtd_second_level_4k_only() {
    for seed in SEEDS {
        let f = VtdSecondLevel::new(4, 48, 46).unwrap();
        run_random(f, coherent(PageSize::Size4K), seed, OPS / 3);
    }
}
