//! Test helpers: a PRNG, a reference model of what should be mapped, and a
//! per-format description of valid random leaves.

use std::collections::BTreeMap;
use std::vec::Vec;

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaMemory, PhysAddr};

use super::super::arm::{ArmS1Attrs, ArmS2Attrs, ArmStage1, ArmStage2};
use super::super::vtd::{FirstLevelAttrs, VtdFirstLevel, VtdSecondLevel, VtdSlAttrs};
use super::super::walk::{self, WalkFault};
use super::super::x86::{AmdNpt, EptAttrs, IntelEpt, X86Caching};
use super::super::{
    IoPageTable, IovaRange, MapPerms, PageTableFormat, Shareability, X86MemType, level_index,
    level_size,
};

/// xorshift64* (Vigna, "An experimental exploration of Marsaglia's
/// xorshift generators", 2016): small, seedable and good enough for tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn bool(&mut self) -> bool {
        self.next() & 1 != 0
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A format plus how to make valid random leaves for it and what the
/// independent walker should report for them.
pub trait TestFormat: PageTableFormat {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, Self::Attrs);
    /// Whether the walker should report the page as usable by unprivileged
    /// requests.
    fn expects_user(&self, _attrs: &Self::Attrs) -> bool {
        true
    }
}

const MEM_TYPES: [X86MemType; 5] = [
    X86MemType::Uncacheable,
    X86MemType::WriteCombining,
    X86MemType::WriteThrough,
    X86MemType::WriteProtected,
    X86MemType::WriteBack,
];
const SHAREABILITY: [Shareability; 3] = [
    Shareability::NonShareable,
    Shareability::OuterShareable,
    Shareability::InnerShareable,
];

impl TestFormat for VtdSecondLevel {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, VtdSlAttrs) {
        let perms = rng.pick(&[
            MapPerms::new(true, false, false),
            MapPerms::new(false, true, false),
            MapPerms::new(true, true, false),
            MapPerms::new(true, true, true),
            MapPerms::new(true, false, true),
        ]);
        let attrs = VtdSlAttrs {
            snoop: rng.bool(),
            memory_type: rng.pick(&MEM_TYPES),
            ignore_pat: rng.bool(),
        };
        (perms, attrs)
    }
}

impl TestFormat for VtdFirstLevel {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, FirstLevelAttrs) {
        let perms = MapPerms::new(true, rng.bool(), rng.bool());
        let attrs = FirstLevelAttrs {
            user: rng.bool(),
            caching: X86Caching {
                write_through: rng.bool(),
                cache_disable: rng.bool(),
            },
        };
        (perms, attrs)
    }
    fn expects_user(&self, attrs: &FirstLevelAttrs) -> bool {
        attrs.user
    }
}

impl TestFormat for AmdNpt {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, X86Caching) {
        let perms = MapPerms::new(true, rng.bool(), rng.bool());
        let attrs = X86Caching {
            write_through: rng.bool(),
            cache_disable: rng.bool(),
        };
        (perms, attrs)
    }
}

impl TestFormat for IntelEpt {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, EptAttrs) {
        let perms = rng.pick(&[
            MapPerms::new(true, false, false),
            MapPerms::new(true, true, false),
            MapPerms::new(true, true, true),
            MapPerms::new(true, false, true),
            MapPerms::new(false, false, true),
        ]);
        let attrs = EptAttrs {
            memory_type: rng.pick(&MEM_TYPES),
            ignore_pat: rng.bool(),
        };
        (perms, attrs)
    }
}

impl TestFormat for ArmStage1 {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, ArmS1Attrs) {
        let perms = MapPerms::new(true, rng.bool(), rng.bool());
        let attrs = ArmS1Attrs {
            attr_index: rng.below(8) as u8,
            shareability: rng.pick(&SHAREABILITY),
            user: rng.bool(),
            not_global: rng.bool(),
        };
        (perms, attrs)
    }
    fn expects_user(&self, attrs: &ArmS1Attrs) -> bool {
        attrs.user
    }
}

impl TestFormat for ArmStage2 {
    fn random_leaf(&self, rng: &mut Rng) -> (MapPerms, ArmS2Attrs) {
        let perms = rng.pick(&[
            MapPerms::new(true, false, false),
            MapPerms::new(false, true, false),
            MapPerms::new(true, true, false),
            MapPerms::new(true, true, true),
            MapPerms::new(true, false, true),
        ]);
        let attrs = ArmS2Attrs {
            mem_attr: rng.below(16) as u8,
            shareability: rng.pick(&SHAREABILITY),
        };
        (perms, attrs)
    }
}

/// One mapped run in the model: `[start, end)` → `phys + (iova - start)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent<A> {
    end: u64,
    phys: u64,
    perms: MapPerms,
    attrs: A,
}

/// What the table should contain, kept as runs of pages (a 1 GiB mapping is
/// one entry, so random tests can afford superpage-sized ranges).
pub struct Model<A> {
    extents: BTreeMap<u64, Extent<A>>,
}

impl<A: Copy + Eq + core::fmt::Debug> Model<A> {
    pub fn new() -> Self {
        Self {
            extents: BTreeMap::new(),
        }
    }

    /// The lowest mapped page in `[start, end)`.
    pub fn first_mapped(&self, start: u64, end: u64) -> Option<u64> {
        if let Some((_, e)) = self.extents.range(..=start).next_back()
            && e.end > start
        {
            return Some(start);
        }
        self.extents.range(start..end).next().map(|(&s, _)| s)
    }

    pub fn insert(&mut self, start: u64, end: u64, phys: u64, perms: MapPerms, attrs: A) {
        debug_assert!(self.first_mapped(start, end).is_none());
        self.extents.insert(
            start,
            Extent {
                end,
                phys,
                perms,
                attrs,
            },
        );
    }

    /// Removes `[start, end)`; returns the pages that were mapped, as merged
    /// runs (the exact invalidation a correct unmap reports).
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<IovaRange> {
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&s, e)) = self.extents.range(..start).next_back()
            && e.end > start
        {
            hit.push(s);
        }
        hit.extend(self.extents.range(start..end).map(|(&s, _)| s));
        let mut runs: Vec<IovaRange> = Vec::new();
        for s in hit {
            let Some(e) = self.extents.remove(&s) else {
                continue;
            };
            let lo = s.max(start);
            let hi = e.end.min(end);
            if s < lo {
                self.extents.insert(s, Extent { end: lo, ..e });
            }
            if hi < e.end {
                self.extents.insert(
                    hi,
                    Extent {
                        phys: e.phys + (hi - s),
                        ..e
                    },
                );
            }
            match runs.last_mut() {
                Some(last) if last.end == lo => last.end = hi,
                _ => runs.push(IovaRange::new(lo, hi)),
            }
        }
        runs
    }

    pub fn lookup(&self, iova: u64) -> Option<(u64, MapPerms, A)> {
        let (&s, e) = self.extents.range(..=iova).next_back()?;
        (iova < e.end).then(|| (e.phys + (iova - s), e.perms, e.attrs))
    }

    /// Every mapped run, for whole-table comparisons.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        self.extents.iter().map(|(&s, e)| (s, e.end)).collect()
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.extents.iter().map(|(&s, e)| e.end - s).sum()
    }
}

/// Checks `iova` against the model with both the engine's `translate` and
/// the independent walker.
pub fn check_page<F: TestFormat>(
    pt: &IoPageTable<'_, F, ModelMemory>,
    mem: &ModelMemory,
    model: &Model<F::Attrs>,
    iova: u64,
) {
    let params = pt.format().walk_params();
    let translated = pt.translate(iova);
    let walked = walk::walk(mem, &params, pt.root(), iova);
    match model.lookup(iova) {
        None => {
            assert_eq!(translated, None, "iova {iova:#x} should not be mapped");
            assert!(
                matches!(walked, Err(WalkFault::NotPresent { .. })),
                "walker at unmapped iova {iova:#x}: {walked:?}"
            );
        }
        Some((phys, perms, attrs)) => {
            let t = translated.unwrap_or_else(|| panic!("iova {iova:#x} should be mapped"));
            assert_eq!(t.phys.as_u64(), phys, "translate phys at {iova:#x}");
            assert_eq!(t.perms, perms, "translate perms at {iova:#x}");
            assert_eq!(t.attrs, attrs, "translate attrs at {iova:#x}");
            let w = walked.unwrap_or_else(|f| panic!("walker faulted at {iova:#x}: {f:?}"));
            assert_eq!(w.phys.as_u64(), phys, "walker phys at {iova:#x}");
            assert_eq!(w.perms, perms, "walker perms at {iova:#x}");
            assert_eq!(
                w.user,
                pt.format().expects_user(&attrs),
                "walker user at {iova:#x}"
            );
            assert_eq!(w.page_size, t.page_size, "page size at {iova:#x}");
        }
    }
}

/// Leaves intersecting `[start, end)` as (leaf start, size), found with the
/// independent walker (skipping unmapped holes level by level).
pub fn leaves_in<F: PageTableFormat>(
    pt: &IoPageTable<'_, F, ModelMemory>,
    mem: &ModelMemory,
    start: u64,
    end: u64,
) -> Vec<(u64, u64)> {
    let params = pt.format().walk_params();
    let mut out = Vec::new();
    let mut iova = start;
    while iova < end {
        match walk::walk(mem, &params, pt.root(), iova) {
            Ok(w) => {
                let leaf_start = iova & !(w.page_size - 1);
                out.push((leaf_start, w.page_size));
                iova = leaf_start + w.page_size;
            }
            Err(WalkFault::NotPresent { level }) => {
                let size = level_size(level);
                iova = (iova & !(size - 1)) + size;
            }
            Err(other) => panic!("walker fault {other:?} at {iova:#x}"),
        }
    }
    out
}

/// The raw contents of every reachable table, keyed by address: equal
/// snapshots mean the table is exactly as it was.
pub fn snapshot<F: PageTableFormat>(
    pt: &IoPageTable<'_, F, ModelMemory>,
    mem: &ModelMemory,
) -> BTreeMap<u64, Vec<u64>> {
    let params = pt.format().walk_params();
    walk::reachable_tables(mem, &params, pt.root())
        .into_iter()
        .map(|t| {
            let words = (0..512)
                .map(|i| mem.read_u64(PhysAddr::new(t.as_u64() + i * 8)))
                .collect();
            (t.as_u64(), words)
        })
        .collect()
}

/// Live pages, reachable tables and the engine's own count agree.
pub fn check_no_leak<F: PageTableFormat>(pt: &IoPageTable<'_, F, ModelMemory>, mem: &ModelMemory) {
    let params = pt.format().walk_params();
    let reachable = walk::reachable_tables(mem, &params, pt.root());
    assert_eq!(
        mem.live_pages(),
        reachable.len(),
        "live pages vs reachable tables"
    );
    assert_eq!(pt.table_pages(), reachable.len(), "engine table count");
    for t in reachable {
        assert!(mem.is_live(t), "reachable table {t:?} was freed");
    }
}

/// The leaf size the engine should choose for page `iova` of a map of
/// `[start, end)` at offset `delta` (phys - iova): the largest allowed size
/// whose aligned block around the page lies inside the range, with iova and
/// phys equally aligned.
pub fn expected_leaf_size(iova: u64, start: u64, end: u64, delta: u64, max_level: u8) -> u64 {
    (0..=max_level)
        .rev()
        .map(level_size)
        .find(|&size| {
            let block = iova & !(size - 1);
            block >= start && block + size <= end && delta.is_multiple_of(size)
        })
        .unwrap_or(4096)
}

/// Address of the entry at `level` that translates `iova`, following table
/// pointers from the root by raw reads (every format keeps the next-table
/// address in bits 51:12 and sets nothing above it in table entries).
pub fn entry_address(
    mem: &ModelMemory,
    root: PhysAddr,
    levels: u8,
    iova: u64,
    level: u8,
) -> PhysAddr {
    let mut table = root.as_u64();
    let mut current = levels - 1;
    loop {
        let entry = table + level_index(iova, current) * 8;
        if current == level {
            return PhysAddr::new(entry);
        }
        table = mem.read_u64(PhysAddr::new(entry)) & 0x000f_ffff_ffff_f000;
        current -= 1;
    }
}
