//! Targeted tests: superpage choice, splitting, table freeing, deferred
//! freeing, bad input, allocation-failure sweeps and non-coherent flushing.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::vec::Vec;

use sluice_hal::model::ModelMemory;
use sluice_hal::{DmaAllocError, DmaMemory, PhysAddr};

use super::super::arm::{ArmS1Attrs, ArmStage1, ArmStage2};
use super::super::vtd::{VtdFirstLevel, VtdSecondLevel, VtdSlAttrs, VtdSlEntry};
use super::super::walk::{self, WalkFault};
use super::super::x86::{AmdNpt, IntelEpt};
use super::super::{
    IoPageTable, IovaRange, MapPerms, PageSize, PageTableError, PageTableFormat, TableConfig,
    X86MemType,
};
use super::support::{TestFormat, check_no_leak, entry_address, snapshot};

const K4: u64 = 4 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

fn vtd4() -> VtdSecondLevel {
    VtdSecondLevel::new(4, 48, 46).unwrap()
}

fn cfg(max: PageSize) -> TableConfig {
    TableConfig::new(max, true)
}

const SNOOP_WB: VtdSlAttrs = VtdSlAttrs {
    snoop: true,
    memory_type: X86MemType::WriteBack,
    ignore_pat: false,
};

type Vtd<'m> = IoPageTable<'m, VtdSecondLevel, ModelMemory>;

fn new_vtd(mem: &ModelMemory, max: PageSize) -> Vtd<'_> {
    IoPageTable::new(mem, vtd4(), cfg(max)).unwrap()
}

fn leaf_raw(pt: &Vtd<'_>, mem: &ModelMemory, iova: u64) -> (u64, u64) {
    let w = walk::walk(mem, &pt.format().walk_params(), pt.root(), iova).expect("mapped");
    (w.leaf, w.page_size)
}

#[test]
fn aligned_2m_map_is_one_2m_leaf() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    let inv = pt
        .map(
            0x4020_0000,
            PhysAddr::new(0x8_0060_0000),
            M2,
            MapPerms::READ_WRITE,
            SNOOP_WB,
        )
        .unwrap();
    assert_eq!(inv.ranges(), &[IovaRange::new(0x4020_0000, 0x4040_0000)]);
    assert_eq!(inv.largest_page(), M2);
    assert!(inv.tables_installed());
    inv.complete(&mem);
    // Root, a level-2 table and the level-1 table that holds the leaf.
    assert_eq!(pt.table_pages(), 3);
    check_no_leak(&pt, &mem);
    let (raw, size) = leaf_raw(&pt, &mem, 0x4030_1000);
    assert_eq!(size, M2);
    assert_ne!(raw & VtdSlEntry::PAGE_SIZE, 0, "PS set on the 2 MiB leaf");
    assert_ne!(raw & VtdSlEntry::SNOOP, 0);
    let t = pt.translate(0x4030_1234 & !0xfff).unwrap();
    assert_eq!(t.phys.as_u64(), 0x8_0070_1000);
    assert_eq!(t.page_size, M2);
    assert_eq!(t.attrs, SNOOP_WB);
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn one_gig_map_uses_1g_leaf_only_when_allowed() {
    for (max, leaf, tables) in [
        (PageSize::Size1G, G1, 2),
        (PageSize::Size2M, M2, 3),
        (PageSize::Size4K, K4, 3 + 512),
    ] {
        let mem = ModelMemory::new();
        let mut pt = new_vtd(&mem, max);
        let inv = pt
            .map(
                3 * G1,
                PhysAddr::new(5 * G1),
                G1,
                MapPerms::READ,
                VtdSlAttrs::default(),
            )
            .unwrap();
        assert_eq!(inv.largest_page(), leaf, "{max:?}");
        assert_eq!(inv.ranges(), &[IovaRange::new(3 * G1, 4 * G1)]);
        inv.complete(&mem);
        assert_eq!(pt.table_pages(), tables, "{max:?}");
        for iova in [3 * G1, 3 * G1 + 0x1234_5000, 4 * G1 - K4] {
            let t = pt.translate(iova).unwrap();
            assert_eq!(t.page_size, leaf);
            assert_eq!(t.phys.as_u64(), iova + 2 * G1);
        }
        check_no_leak(&pt, &mem);
        pt.destroy().release(&mem);
        assert_eq!(mem.live_pages(), 0);
    }
}

#[test]
fn differently_aligned_phys_prevents_superpages() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    // iova 2 MiB aligned, phys only 4 KiB aligned: 4 KiB leaves only.
    let inv = pt
        .map(
            0x20_0000,
            PhysAddr::new(0x9000),
            2 * M2,
            MapPerms::READ,
            VtdSlAttrs::default(),
        )
        .unwrap();
    assert_eq!(inv.largest_page(), K4);
    inv.complete(&mem);
    assert_eq!(pt.translate(0x20_0000).unwrap().page_size, K4);
    // Ragged range: 4K head, 2M middle, 4K tail.
    let inv = pt
        .map(
            G1 - K4,
            PhysAddr::new(2 * G1 - K4),
            M2 + 2 * K4,
            MapPerms::READ,
            VtdSlAttrs::default(),
        )
        .unwrap();
    assert_eq!(inv.largest_page(), M2);
    assert_eq!(inv.ranges(), &[IovaRange::new(G1 - K4, G1 + M2 + K4)]);
    inv.complete(&mem);
    assert_eq!(pt.translate(G1 - K4).unwrap().page_size, K4);
    assert_eq!(pt.translate(G1).unwrap().page_size, M2);
    assert_eq!(pt.translate(G1 + M2).unwrap().page_size, K4);
    check_no_leak(&pt, &mem);
    pt.destroy().release(&mem);
}

#[test]
fn unmapping_4k_inside_2m_leaf_splits_and_keeps_the_rest() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    let base = 0x7fe0_0000;
    let perms = MapPerms::new(true, false, true);
    pt.map(base, PhysAddr::new(0x1_2340_0000), M2, perms, SNOOP_WB)
        .unwrap()
        .complete(&mem);
    let before: Vec<_> = (0..512)
        .map(|i| pt.translate(base + i * K4).unwrap())
        .collect();
    let tables = pt.table_pages();

    let hole = base + 77 * K4;
    let inv = pt.unmap(hole, K4).unwrap();
    assert_eq!(inv.ranges(), &[IovaRange::new(hole, hole + K4)]);
    assert!(inv.superpage_split());
    assert!(inv.flush_paging_structures());
    assert!(!inv.tables_freed());
    assert_eq!(inv.largest_page(), M2);
    assert!(inv.pending_free().is_empty());
    inv.complete(&mem);
    assert_eq!(pt.table_pages(), tables + 1);

    for (i, old) in before.iter().enumerate() {
        let iova = base + i as u64 * K4;
        match pt.translate(iova) {
            None => assert_eq!(iova, hole),
            Some(t) => {
                assert_eq!(t.phys, old.phys);
                assert_eq!(t.perms, old.perms);
                assert_eq!(t.attrs, old.attrs);
                assert_eq!(t.page_size, K4);
            }
        }
    }
    check_no_leak(&pt, &mem);
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn splitting_a_1g_leaf_to_4k_needs_two_tables_and_keeps_accessed_dirty() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    pt.map(
        G1,
        PhysAddr::new(4 * G1),
        G1,
        MapPerms::READ_WRITE,
        SNOOP_WB,
    )
    .unwrap()
    .complete(&mem);
    assert_eq!(pt.table_pages(), 2);
    // Hardware marked the 1 GiB page accessed and dirty.
    let params = pt.format().walk_params();
    let w = walk::walk(&mem, &params, pt.root(), G1).unwrap();
    // Root entry 0 points to the level-2 table; its entry 1 is the leaf.
    let l2 = mem.read_u64(pt.root()) & 0x3f_ffff_f000;
    let entry_addr = PhysAddr::new(l2 + 8);
    assert_eq!(mem.read_u64(entry_addr), w.leaf);
    mem.write_u64(
        entry_addr,
        w.leaf | VtdSlEntry::ACCESSED | VtdSlEntry::DIRTY,
    );

    let hole = G1 + 300 * M2 + 5 * K4;
    let inv = pt.unmap(hole, 2 * K4).unwrap();
    assert_eq!(inv.ranges(), &[IovaRange::new(hole, hole + 2 * K4)]);
    assert_eq!(inv.largest_page(), G1);
    inv.complete(&mem);
    assert_eq!(pt.table_pages(), 4);
    for iova in [G1, hole - K4, hole + 2 * K4, G1 + 300 * M2, 2 * G1 - K4] {
        let w = walk::walk(&mem, &params, pt.root(), iova).unwrap();
        assert_eq!(w.phys.as_u64(), iova + 3 * G1);
        let ad = VtdSlEntry::ACCESSED | VtdSlEntry::DIRTY;
        assert_eq!(w.leaf & ad, ad, "A/D carried into split leaf at {iova:#x}");
    }
    assert_eq!(pt.translate(G1 + 301 * M2).unwrap().page_size, M2);
    assert_eq!(pt.translate(hole - K4).unwrap().page_size, K4);
    assert!(pt.translate(hole).is_none() && pt.translate(hole + K4).is_none());
    check_no_leak(&pt, &mem);
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn full_unmap_frees_tables_only_on_complete() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    let iova = 0x1234_5678_9000;
    pt.map(
        iova,
        PhysAddr::new(0x5000),
        K4,
        MapPerms::READ,
        VtdSlAttrs::default(),
    )
    .unwrap()
    .complete(&mem);
    assert_eq!(mem.live_pages(), 4);
    let inv = pt.unmap(iova, K4).unwrap();
    assert!(inv.tables_freed());
    assert!(inv.flush_paging_structures());
    assert_eq!(inv.pending_free().len(), 3);
    assert_eq!(pt.table_pages(), 1);
    // Not freed yet: a walker may still be reading them.
    assert_eq!(mem.live_pages(), 4);
    for &page in inv.pending_free() {
        assert!(mem.is_live(page));
    }
    let pending: Vec<PhysAddr> = inv.pending_free().to_vec();
    inv.complete(&mem);
    assert_eq!(mem.live_pages(), 1);
    for page in pending {
        assert!(!mem.is_live(page));
    }
    // The root is all zero again.
    assert!((0..512).all(|i| mem.read_u64(PhysAddr::new(pt.root().as_u64() + i * 8)) == 0));
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn contiguous_unmap_of_separate_maps_is_one_range() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    let base = G1 - 3 * K4;
    // Three separate maps with different leaf sizes, back to back.
    let pieces = [
        (base, 3 * K4, 0x10_0000_0000u64 - 3 * K4),
        (G1, M2, 0x20_0000_0000),
        (G1 + M2, 5 * K4, 0x3000),
    ];
    for (iova, len, phys) in pieces {
        pt.map(
            iova,
            PhysAddr::new(phys),
            len,
            MapPerms::READ,
            VtdSlAttrs::default(),
        )
        .unwrap()
        .complete(&mem);
    }
    let end = G1 + M2 + 5 * K4;
    let inv = pt.unmap(base - 16 * K4, end - base + 64 * K4).unwrap();
    assert_eq!(inv.ranges(), &[IovaRange::new(base, end)]);
    assert_eq!(inv.changed_bytes(), end - base);
    assert_eq!(inv.largest_page(), M2);
    inv.complete(&mem);
    assert_eq!(mem.live_pages(), 1);
    pt.destroy().release(&mem);
}

#[test]
fn unmap_of_nothing_changes_nothing() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    let inv = pt.unmap(0, 1 << 47).unwrap();
    assert!(inv.is_empty());
    assert_eq!(inv.largest_page(), 0);
    inv.complete(&mem);
    assert_eq!(mem.live_pages(), 1);
    pt.destroy().release(&mem);
}

#[test]
fn bad_input_is_refused_with_nothing_changed() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    pt.map(
        0x10_0000,
        PhysAddr::new(0x10_0000),
        16 * K4,
        MapPerms::READ,
        VtdSlAttrs::default(),
    )
    .unwrap()
    .complete(&mem);
    let before = snapshot(&pt, &mem);
    let live = mem.live_pages();
    let rw = MapPerms::READ_WRITE;
    let map_cases: [(u64, u64, u64, MapPerms, PageTableError); 12] = [
        (0x1000, 0, 0, rw, PageTableError::ZeroLength),
        (0x1800, 0, K4, rw, PageTableError::Misaligned),
        (0x1000, 0x10, K4, rw, PageTableError::Misaligned),
        (0x1000, 0, 100, rw, PageTableError::Misaligned),
        (u64::MAX - 0xfff, 0, 2 * K4, rw, PageTableError::Overflow),
        (0, u64::MAX - 0xfff, 2 * K4, rw, PageTableError::Overflow),
        (
            (1 << 48) - K4,
            0,
            2 * K4,
            rw,
            PageTableError::IovaOutOfRange { input_bits: 48 },
        ),
        (
            0,
            (1 << 46) - K4,
            2 * K4,
            rw,
            PageTableError::PhysOutOfRange { output_bits: 46 },
        ),
        (
            0x1000,
            0,
            K4,
            MapPerms::new(false, false, true),
            PageTableError::UnsupportedPermissions(MapPerms::new(false, false, true)),
        ),
        // Overlaps the start of the mapped range.
        (
            0x8000,
            0,
            0x10_0000,
            rw,
            PageTableError::AlreadyMapped { iova: 0x10_0000 },
        ),
        // Overlaps its last page.
        (
            0x10_f000,
            0,
            2 * K4,
            rw,
            PageTableError::AlreadyMapped { iova: 0x10_f000 },
        ),
        // A 2 MiB-aligned map over a range holding 4 KiB pages.
        (
            0,
            0,
            M2,
            rw,
            PageTableError::AlreadyMapped { iova: 0x10_0000 },
        ),
    ];
    for (i, (iova, phys, len, perms, expected)) in map_cases.into_iter().enumerate() {
        let result = pt.map(iova, PhysAddr::new(phys), len, perms, VtdSlAttrs::default());
        match result {
            Ok(inv) => panic!("case {i}: expected {expected:?}, got success {inv:?}"),
            Err(e) => assert_eq!(e, expected, "case {i}"),
        }
        assert_eq!(snapshot(&pt, &mem), before, "case {i} changed the table");
        assert_eq!(mem.live_pages(), live, "case {i} leaked");
    }
    for (result, expected) in [
        (pt.unmap(0x1000, 0), PageTableError::ZeroLength),
        (pt.unmap(0x1001, K4), PageTableError::Misaligned),
        (pt.unmap(0x1000, 7), PageTableError::Misaligned),
        (pt.unmap(u64::MAX - 0xfff, 2 * K4), PageTableError::Overflow),
        (
            pt.unmap(1 << 48, K4),
            PageTableError::IovaOutOfRange { input_bits: 48 },
        ),
    ] {
        assert_eq!(result.map(|_| ()).unwrap_err(), expected);
        assert_eq!(snapshot(&pt, &mem), before);
    }
    assert_eq!(pt.translate(1 << 48), None);
    assert_eq!(pt.translate(u64::MAX), None);
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn failed_root_allocation_is_an_error() {
    let mem = ModelMemory::new();
    mem.fail_allocation_after(Some(0));
    let r = IoPageTable::new(&mem, vtd4(), cfg(PageSize::Size1G));
    assert!(matches!(r, Err(PageTableError::OutOfMemory)));
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn invalid_format_parameters_are_refused() {
    assert_eq!(
        VtdSecondLevel::new(2, 30, 46),
        Err(PageTableError::InvalidFormat)
    );
    assert_eq!(
        VtdSecondLevel::new(3, 40, 46),
        Err(PageTableError::InvalidFormat)
    );
    assert_eq!(
        VtdSecondLevel::new(4, 48, 60),
        Err(PageTableError::InvalidFormat)
    );
    // SAGAW: bit 1 = 3-level, bit 2 = 4-level, bit 3 = 5-level.
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b0010, 39, 39).unwrap().levels(),
        3
    );
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b0110, 39, 39).unwrap().levels(),
        3
    );
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b0100, 39, 39).unwrap().levels(),
        4
    );
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b0110, 44, 46).unwrap().levels(),
        4
    );
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b1000, 48, 46).unwrap().levels(),
        5
    );
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b0010, 48, 46),
        Err(PageTableError::InvalidFormat)
    );
    assert_eq!(
        VtdSecondLevel::from_sagaw(0b0100, 48, 46)
            .unwrap()
            .context_aw(),
        2
    );
    assert_eq!(ArmStage1::new(30, 48), Err(PageTableError::InvalidFormat));
    assert_eq!(ArmStage1::new(49, 48), Err(PageTableError::InvalidFormat));
    assert_eq!(ArmStage1::new(39, 48).unwrap().levels(), 3);
    assert_eq!(ArmStage1::new(40, 48).unwrap().levels(), 4);
    assert_eq!(PageSize::from_vtd_sllps(0b11), PageSize::Size1G);
    assert_eq!(PageSize::from_vtd_sllps(0b01), PageSize::Size2M);
    assert_eq!(PageSize::from_vtd_sllps(0b00), PageSize::Size4K);
}

/// One step of a scripted sequence.
#[derive(Debug, Clone, Copy)]
enum Step {
    Map(u64, u64, u64),
    Unmap(u64, u64),
}

/// Fails the N-th allocation of every step for every N: each failed call
/// must leave the table bit-for-bit as before and leak nothing.
fn allocation_failure_sweep<F: TestFormat + Clone>(format: F, steps: &[Step])
where
    F::Attrs: Default,
{
    let mem = ModelMemory::new();
    let mut pt: IoPageTable<'_, F, ModelMemory> =
        IoPageTable::new(&mem, format.clone(), cfg(PageSize::Size1G)).unwrap();
    let perms = MapPerms::READ_WRITE;
    let mut failures = 0;
    for (i, &step) in steps.iter().enumerate() {
        let mut n = 0;
        loop {
            let before = snapshot(&pt, &mem);
            let live = mem.live_pages();
            mem.fail_allocation_after(Some(n));
            let result = match step {
                Step::Map(iova, phys, len) => {
                    pt.map(iova, PhysAddr::new(phys), len, perms, F::Attrs::default())
                }
                Step::Unmap(iova, len) => pt.unmap_with_break(iova, len, &mut |_| {}),
            };
            mem.fail_allocation_after(None);
            match result {
                Err(PageTableError::OutOfMemory) => {
                    failures += 1;
                    assert_eq!(
                        snapshot(&pt, &mem),
                        before,
                        "step {i} ({step:?}) failure {n}"
                    );
                    assert_eq!(mem.live_pages(), live, "step {i} failure {n} leaked");
                    n += 1;
                }
                Ok(inv) => {
                    inv.complete(&mem);
                    check_no_leak(&pt, &mem);
                    break;
                }
                Err(e) => panic!("step {i} ({step:?}): {e:?}"),
            }
        }
    }
    assert!(
        failures >= 10,
        "the script must exercise failures ({failures})"
    );
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

const SCRIPT: [Step; 10] = [
    Step::Map(0x1000, 0x7000, 3 * K4),
    // Needs new tables at several levels, far from the first map.
    Step::Map(0x40_0000_0000 - K4, 0x1_0000_0000 - K4, G1 + M2 + 2 * K4),
    Step::Map(5 * G1, 9 * G1, G1),
    // Split a 1 GiB leaf down to 4 KiB (two tables).
    Step::Unmap(5 * G1 + 7 * M2 + K4, K4),
    // Split both ends of a range inside 2 MiB leaves of another 1 GiB.
    Step::Map(7 * G1, 3 * G1, G1),
    Step::Unmap(7 * G1 + M2 - K4, 3 * M2 + 2 * K4),
    Step::Map(0x20_0000, 0x20_0000, 511 * M2),
    Step::Unmap(0x20_0000 + K4, 40 * M2),
    Step::Unmap(0, 64 * G1),
    Step::Map(0x123_4000_0000, 0x4000_0000, 2 * G1 + 4 * K4),
];

#[test]
fn allocation_failure_sweep_vtd_second_level() {
    allocation_failure_sweep(vtd4(), &SCRIPT);
    allocation_failure_sweep(VtdSecondLevel::new(3, 39, 39).unwrap(), &SCRIPT[..8]);
}

#[test]
fn allocation_failure_sweep_arm_stage1() {
    allocation_failure_sweep(ArmStage1::new(48, 48).unwrap(), &SCRIPT);
}

#[test]
fn allocation_failure_sweep_other_formats() {
    allocation_failure_sweep(ArmStage2::new(48, 44).unwrap(), &SCRIPT);
    allocation_failure_sweep(VtdFirstLevel::new(4, 46).unwrap(), &SCRIPT);
    allocation_failure_sweep(AmdNpt::new(4, 46).unwrap(), &SCRIPT);
    allocation_failure_sweep(IntelEpt::new(4, 46, false).unwrap(), &SCRIPT);
}

/// Wraps [`ModelMemory`] to check the publication order a non-coherent
/// walker needs: when an entry pointing to a table is written, that whole
/// table (including the zeroes of a fresh page) must already be flushed.
struct OrderChecker<'a> {
    inner: &'a ModelMemory,
    /// Words written (or zeroed by allocation) and not flushed since.
    dirty: RefCell<BTreeSet<u64>>,
    tables: RefCell<BTreeSet<u64>>,
    violations: RefCell<Vec<String>>,
}

impl<'a> OrderChecker<'a> {
    fn new(inner: &'a ModelMemory) -> Self {
        Self {
            inner,
            dirty: RefCell::new(BTreeSet::new()),
            tables: RefCell::new(BTreeSet::new()),
            violations: RefCell::new(Vec::new()),
        }
    }
}

impl DmaMemory for OrderChecker<'_> {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        let page = self.inner.alloc_page()?;
        let base = page.as_u64();
        self.dirty
            .borrow_mut()
            .extend((0..512).map(|i| base + i * 8));
        self.tables.borrow_mut().insert(base);
        Ok(page)
    }
    fn free_page(&self, page: PhysAddr) {
        let base = page.as_u64();
        self.tables.borrow_mut().remove(&base);
        self.dirty
            .borrow_mut()
            .retain(|&a| a < base || a >= base + 4096);
        self.inner.free_page(page)
    }
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        self.inner.read_u64(addr)
    }
    fn write_u64(&self, addr: PhysAddr, value: u64) {
        let target = value & 0x000f_ffff_ffff_f000;
        if self.tables.borrow().contains(&target) {
            let dirty = self.dirty.borrow();
            if dirty.range(target..target + 4096).next().is_some() {
                self.violations.borrow_mut().push(format!(
                    "entry at {addr:?} published table {target:#x} before it was flushed"
                ));
            }
        }
        self.dirty.borrow_mut().insert(addr.as_u64());
        self.inner.write_u64(addr, value)
    }
    fn flush_for_device(&self, addr: PhysAddr, len: u64) {
        let start = addr.as_u64();
        self.dirty
            .borrow_mut()
            .retain(|&a| a < start || a >= start + len);
        self.inner.flush_for_device(addr, len)
    }
}

#[test]
fn non_coherent_tables_are_flushed_before_publication() {
    let model = ModelMemory::new();
    model.set_track_flushes(true);
    let mem = OrderChecker::new(&model);
    let format = ArmStage1::new(48, 48).unwrap();
    let mut pt = IoPageTable::new(&mem, format, TableConfig::new(PageSize::Size1G, false)).unwrap();
    let a = ArmS1Attrs::default();
    let steps = SCRIPT;
    let mut breaks = 0;
    let root = pt.root();
    for step in steps {
        let inv = match step {
            Step::Map(iova, phys, len) => pt.map(iova, PhysAddr::new(phys), len, MapPerms::READ, a),
            Step::Unmap(iova, len) => pt.unmap_with_break(iova, len, &mut |range| {
                // The invalid entry is visible to the walker before the
                // TLB invalidation this hook stands for.
                let level = ((range.len().trailing_zeros() - 12) / 9) as u8;
                let entry = entry_address(&model, root, 4, range.start, level);
                assert_eq!(model.read_u64(entry), 0);
                assert!(!model.unflushed_words().contains(&entry));
                breaks += 1;
            }),
        }
        .unwrap();
        assert!(
            model.unflushed_words().is_empty(),
            "{step:?}: {:?}",
            model.unflushed_words()
        );
        assert!(mem.dirty.borrow().is_empty(), "{step:?}: unflushed words");
        inv.complete(&mem);
    }
    assert!(
        mem.violations.borrow().is_empty(),
        "{:?}",
        mem.violations.borrow()
    );
    assert!(!model.flushes().is_empty());
    pt.destroy().release(&mem);
    assert_eq!(model.live_pages(), 0);

    // The same script on a coherent table flushes nothing.
    let coherent = ModelMemory::new();
    let mut pt = IoPageTable::new(&coherent, format, cfg(PageSize::Size1G)).unwrap();
    for step in steps {
        match step {
            Step::Map(iova, phys, len) => pt.map(iova, PhysAddr::new(phys), len, MapPerms::READ, a),
            Step::Unmap(iova, len) => pt.unmap_with_break(iova, len, &mut |_| {}),
        }
        .unwrap()
        .complete(&coherent);
    }
    assert!(coherent.flushes().is_empty());
    pt.destroy().release(&coherent);
}

#[test]
fn dropping_an_undestroyed_table_leaks_rather_than_frees() {
    let mem = ModelMemory::new();
    {
        let mut pt = new_vtd(&mem, PageSize::Size1G);
        pt.map(
            0,
            PhysAddr::new(0),
            K4,
            MapPerms::READ,
            VtdSlAttrs::default(),
        )
        .unwrap()
        .complete(&mem);
    }
    // Hardware might still walk the table: its pages stay allocated.
    assert_eq!(mem.live_pages(), 4);
}

#[test]
fn destroy_hands_over_every_table() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size2M);
    for i in 0..8u64 {
        pt.map(
            i * 3 * G1 + i * K4,
            PhysAddr::new(i * M2),
            3 * M2,
            MapPerms::READ,
            SNOOP_WB,
        )
        .unwrap()
        .complete(&mem);
    }
    let live = mem.live_pages();
    let pending = pt.destroy();
    assert_eq!(pending.pages().len(), live);
    assert_eq!(mem.live_pages(), live, "nothing freed before release");
    pending.release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn walker_reports_faults() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    let params = pt.format().walk_params();
    pt.map(G1, PhysAddr::new(G1), K4, MapPerms::READ, SNOOP_WB)
        .unwrap()
        .complete(&mem);
    let root = pt.root();
    assert_eq!(
        walk::walk(&mem, &params, root, 1 << 48),
        Err(WalkFault::AddressTooWide)
    );
    assert_eq!(
        walk::walk(&mem, &params, root, 1 << 40),
        Err(WalkFault::NotPresent { level: 3 })
    );
    assert_eq!(
        walk::walk(&mem, &params, root, 2 * G1),
        Err(WalkFault::NotPresent { level: 2 })
    );
    assert_eq!(
        walk::walk(&mem, &params, root, G1 + M2),
        Err(WalkFault::NotPresent { level: 1 })
    );
    assert_eq!(
        walk::walk(&mem, &params, root, G1 + K4),
        Err(WalkFault::NotPresent { level: 0 })
    );
    let read = walk::Access {
        write: false,
        exec: false,
        user: false,
    };
    let w = walk::walk_access(&mem, &params, root, G1, read).unwrap();
    assert_eq!(w.phys.as_u64(), G1);
    assert_eq!(w.leaf & VtdSlEntry::SNOOP, VtdSlEntry::SNOOP);
    let write = walk::Access {
        write: true,
        ..read
    };
    assert_eq!(
        walk::walk_access(&mem, &params, root, G1, write),
        Err(WalkFault::Permission)
    );
    // A PS bit in the root (512 GiB leaf) is a reserved encoding.
    let root_entry = PhysAddr::new(root.as_u64() + 8);
    mem.write_u64(root_entry, 0x8000_0000_0000 | VtdSlEntry::PAGE_SIZE | 1);
    assert_eq!(
        walk::walk(&mem, &params, root, 1 << 39),
        Err(WalkFault::Reserved { level: 3 })
    );
    mem.write_u64(root_entry, 0);
    pt.destroy().release(&mem);
}

#[test]
fn arm_walker_checks_access_flag_and_user_permissions() {
    let mem = ModelMemory::new();
    let format = ArmStage1::new(39, 48).unwrap();
    let mut pt = IoPageTable::new(&mem, format, cfg(PageSize::Size1G)).unwrap();
    let params = format.walk_params();
    let user_rx = ArmS1Attrs {
        user: true,
        ..ArmS1Attrs::default()
    };
    pt.map(
        M2,
        PhysAddr::new(4 * M2),
        M2,
        MapPerms::new(true, false, true),
        user_rx,
    )
    .unwrap()
    .complete(&mem);
    let w = walk::walk(&mem, &params, pt.root(), M2 + K4).unwrap();
    assert_eq!(w.page_size, M2);
    assert!(w.user && w.perms.exec && !w.perms.write);
    let user_exec = walk::Access {
        write: false,
        exec: true,
        user: true,
    };
    assert!(walk::walk_access(&mem, &params, pt.root(), M2, user_exec).is_ok());
    let user_write = walk::Access {
        write: true,
        exec: false,
        user: true,
    };
    assert_eq!(
        walk::walk_access(&mem, &params, pt.root(), M2, user_write),
        Err(WalkFault::Permission)
    );
    // Clear AF in the block descriptor: an access-flag fault.
    let l1 = mem.read_u64(pt.root()) & 0xffff_ffff_f000;
    let entry = PhysAddr::new(l1 + 8);
    let raw = mem.read_u64(entry);
    assert_eq!(raw & 0b11, 0b01, "a block descriptor");
    mem.write_u64(entry, raw & !(1 << 10));
    assert_eq!(
        walk::walk(&mem, &params, pt.root(), M2),
        Err(WalkFault::AccessFlag { level: 1 })
    );
    mem.write_u64(entry, raw);
    pt.destroy().release(&mem);
}

#[test]
fn arm_split_needs_break_before_make() {
    let mem = ModelMemory::new();
    let format = ArmStage1::new(48, 48).unwrap();
    let mut pt = IoPageTable::new(&mem, format, cfg(PageSize::Size1G)).unwrap();
    let a = ArmS1Attrs::default();
    pt.map(G1, PhysAddr::new(2 * G1), G1, MapPerms::READ_WRITE, a)
        .unwrap()
        .complete(&mem);
    let before = snapshot(&pt, &mem);
    let hole = G1 + 5 * M2 + 3 * K4;
    assert_eq!(
        pt.unmap(hole, K4).map(|_| ()),
        Err(PageTableError::NeedsBreakBeforeMake)
    );
    assert_eq!(snapshot(&pt, &mem), before);
    assert_eq!(mem.live_pages(), 2);

    // Unmapping whole blocks needs no break.
    let params = format.walk_params();
    let root = pt.root();
    let mut seen = Vec::new();
    let inv = pt
        .unmap_with_break(hole, K4, &mut |range| {
            let w = walk::walk(&mem, &params, root, G1 + 100 * M2);
            assert_eq!(
                w,
                Err(WalkFault::NotPresent { level: 2 }),
                "block broken first"
            );
            seen.push(range);
        })
        .unwrap();
    assert_eq!(
        seen,
        [IovaRange::new(G1, 2 * G1)],
        "one break: the 1 GiB block"
    );
    assert_eq!(inv.ranges(), &[IovaRange::new(hole, hole + K4)]);
    assert!(inv.superpage_split());
    inv.complete(&mem);
    assert_eq!(
        pt.translate(G1 + 100 * M2).unwrap().phys.as_u64(),
        2 * G1 + 100 * M2
    );
    assert_eq!(pt.translate(hole + K4).unwrap().page_size, K4);
    assert!(pt.translate(hole).is_none());
    pt.destroy().release(&mem);

    // With BBM level 2 the split is a single atomic replacement.
    let mem = ModelMemory::new();
    let mut pt = IoPageTable::new(&mem, format.with_bbm_level2(), cfg(PageSize::Size1G)).unwrap();
    pt.map(G1, PhysAddr::new(2 * G1), G1, MapPerms::READ_WRITE, a)
        .unwrap()
        .complete(&mem);
    let inv = pt
        .unmap_with_break(hole, K4, &mut |_| panic!("no break needed"))
        .unwrap();
    assert!(inv.superpage_split());
    inv.complete(&mem);
    pt.unmap(G1, G1).unwrap().complete(&mem);
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn huge_requests_fail_cleanly() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    pt.map(
        0x1000,
        PhysAddr::new(0x1000),
        K4,
        MapPerms::READ,
        VtdSlAttrs::default(),
    )
    .unwrap()
    .complete(&mem);
    let before = snapshot(&pt, &mem);
    // 1 TiB with only 4 KiB alignment would need ~2^19 tables; the
    // allocator gives out 100.
    mem.fail_allocation_after(Some(100));
    let r = pt.map(
        1 << 40,
        PhysAddr::new(K4),
        1 << 40,
        MapPerms::READ,
        VtdSlAttrs::default(),
    );
    mem.fail_allocation_after(None);
    assert_eq!(r.map(|_| ()), Err(PageTableError::OutOfMemory));
    assert_eq!(snapshot(&pt, &mem), before);
    assert_eq!(mem.live_pages(), 4);
    // Unmapping the whole input space walks only what exists.
    let inv = pt.unmap(0, 1 << 48).unwrap();
    assert_eq!(inv.ranges(), &[IovaRange::new(0x1000, 0x2000)]);
    inv.complete(&mem);
    assert_eq!(mem.live_pages(), 1);
    pt.destroy().release(&mem);
}

#[test]
fn pending_frees_can_be_batched() {
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    for i in 0..3 {
        pt.map(
            i * G1,
            PhysAddr::new(K4),
            K4,
            MapPerms::READ,
            VtdSlAttrs::default(),
        )
        .unwrap()
        .complete(&mem);
    }
    assert_eq!(mem.live_pages(), 1 + 1 + 3 * 2);
    let mut batch = super::super::PendingFree::default();
    for i in 0..3 {
        batch.append(pt.unmap(i * G1, K4).unwrap().into_pending_free());
    }
    // Two leaf-level tables per map, and the shared level-2 table last.
    assert_eq!(batch.pages().len(), 7);
    assert_eq!(mem.live_pages(), 8, "nothing freed before release");
    batch.release(&mem);
    assert_eq!(mem.live_pages(), 1);
    pt.destroy().release(&mem);
}

#[test]
fn walker_and_translate_survive_garbage_tables() {
    use super::support::Rng;
    let mut rng = Rng::new(77);
    let mem = ModelMemory::new();
    let mut pt = new_vtd(&mem, PageSize::Size1G);
    pt.map(
        0,
        PhysAddr::new(0),
        4 * M2,
        MapPerms::READ,
        VtdSlAttrs::default(),
    )
    .unwrap()
    .complete(&mem);
    let root = pt.root();
    // Fill a few pages around the tables with random words: the walker and
    // translate must return something (or a fault) without panicking or
    // looping, whatever the bits.
    let pages: Vec<u64> = (0..6).map(|i| root.as_u64() + i * K4).collect();
    let kinds = [
        walk::WalkKind::VtdSecondLevel,
        walk::WalkKind::VtdFirstLevel,
        walk::WalkKind::ArmStage1,
        walk::WalkKind::ArmStage2,
        walk::WalkKind::AmdNpt,
        walk::WalkKind::IntelEpt,
    ];
    for round in 0..50 {
        for &page in &pages {
            for i in 0..512 {
                let mut word = rng.next();
                if rng.chance(50) {
                    // Point at one of the pages, so walks go deep.
                    word = (word & 0xfff) | pages[rng.below(6) as usize];
                }
                mem.write_u64(PhysAddr::new(page + i * 8), word);
            }
        }
        for _ in 0..200 {
            let iova = rng.next() & ((1 << 48) - 1);
            let _ = pt.translate(iova);
            let params = walk::WalkParams {
                kind: kinds[rng.below(6) as usize],
                levels: 3 + rng.below(3) as u8,
                input_bits: 39 + rng.below(19) as u32,
                output_bits: 32 + rng.below(21) as u32,
            };
            if let Ok(w) = walk::walk(&mem, &params, root, iova) {
                assert!(
                    w.page_size.is_power_of_two() && w.page_size >= K4,
                    "round {round}"
                );
                assert!(
                    w.phys.as_u64() >> params.output_bits == 0,
                    "round {round}: {w:?}"
                );
            }
        }
    }
    // The table is garbage now: leak it rather than free random pointers.
    core::mem::forget(pt);
}

/// Sets the hardware dirty bit of the leaf mapping `iova` at `level`, as a
/// device write would.
fn mark_dirty<F: PageTableFormat>(
    pt: &IoPageTable<'_, F, ModelMemory>,
    mem: &ModelMemory,
    iova: u64,
    level: u8,
) {
    let bit = pt.format().dirty_bit().expect("format has a dirty bit");
    let entry = entry_address(mem, pt.root(), pt.format().levels(), iova, level);
    mem.write_u64(entry, mem.read_u64(entry) | bit);
}

fn dirty_scenario<F: TestFormat>(format: F)
where
    F::Attrs: Default,
{
    let mem = ModelMemory::new();
    let mut pt: IoPageTable<'_, F, ModelMemory> =
        IoPageTable::new(&mem, format, cfg(PageSize::Size1G)).unwrap();
    let rw = MapPerms::READ_WRITE;
    pt.map(0, PhysAddr::new(G1), 4 * M2, rw, F::Attrs::default())
        .unwrap()
        .complete(&mem);
    let small = 8 * M2;
    pt.map(
        small,
        PhysAddr::new(0x5000),
        16 * K4,
        rw,
        F::Attrs::default(),
    )
    .unwrap()
    .complete(&mem);
    mark_dirty(&pt, &mem, M2, 1);
    mark_dirty(&pt, &mem, 2 * M2, 1);
    mark_dirty(&pt, &mem, small + K4, 0);
    mark_dirty(&pt, &mem, small + 2 * K4, 0);
    mark_dirty(&pt, &mem, small + 8 * K4, 0);
    let expected = [
        IovaRange::new(M2, 3 * M2),
        IovaRange::new(small + K4, small + 3 * K4),
        IovaRange::new(small + 8 * K4, small + 9 * K4),
    ];
    let before = snapshot(&pt, &mem);

    let mut seen = Vec::new();
    let inv = pt.read_dirty(0, G1, false, &mut |r| seen.push(r)).unwrap();
    assert_eq!(seen, expected);
    assert!(inv.is_empty());
    inv.complete(&mem);
    assert_eq!(
        snapshot(&pt, &mem),
        before,
        "reading without clear changes nothing"
    );

    // A query inside a dirty superpage reports the whole superpage.
    let mut seen = Vec::new();
    pt.read_dirty(M2 + K4, K4, false, &mut |r| seen.push(r))
        .unwrap()
        .complete(&mem);
    assert_eq!(seen, [IovaRange::new(M2, 2 * M2)]);

    let mut seen = Vec::new();
    let inv = pt.read_dirty(0, G1, true, &mut |r| seen.push(r)).unwrap();
    assert_eq!(seen, expected);
    assert_eq!(inv.kind(), super::super::ChangeKind::DirtyCleared);
    assert_eq!(inv.ranges(), &expected);
    assert_eq!(inv.largest_page(), M2);
    assert!(inv.newly_present().is_empty() && !inv.flush_paging_structures());
    inv.complete(&mem);
    for iova in [M2, 2 * M2, small + K4, small + 8 * K4] {
        let t = pt.translate(iova).unwrap();
        assert_eq!(t.perms, rw, "translation unchanged at {iova:#x}");
    }
    let mut seen = Vec::new();
    pt.read_dirty(0, G1, true, &mut |r| seen.push(r))
        .unwrap()
        .complete(&mem);
    assert!(seen.is_empty(), "bits were cleared: {seen:?}");
    pt.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn dirty_bits_are_read_and_cleared() {
    dirty_scenario(vtd4());
    dirty_scenario(VtdFirstLevel::new(4, 46).unwrap());
    dirty_scenario(AmdNpt::new(4, 46).unwrap());
    dirty_scenario(IntelEpt::new(4, 46, false).unwrap());
}

#[test]
fn dirty_tracking_needs_a_dirty_bit_and_a_coherent_walker() {
    let mem = ModelMemory::new();
    let mut arm =
        IoPageTable::new(&mem, ArmStage1::new(48, 48).unwrap(), cfg(PageSize::Size1G)).unwrap();
    assert_eq!(
        arm.read_dirty(0, K4, false, &mut |_| {}).map(|_| ()),
        Err(PageTableError::DirtyTrackingUnsupported)
    );
    arm.destroy().release(&mem);
    let mut vtd =
        IoPageTable::new(&mem, vtd4(), TableConfig::new(PageSize::Size1G, false)).unwrap();
    assert_eq!(
        vtd.read_dirty(0, K4, false, &mut |_| {}).map(|_| ()),
        Err(PageTableError::DirtyTrackingUnsupported)
    );
    vtd.destroy().release(&mem);
    assert_eq!(mem.live_pages(), 0);
}
