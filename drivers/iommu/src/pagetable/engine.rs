//! The engine: maps and unmaps ranges in a table of any [`PageTableFormat`].

use alloc::vec::Vec;

use sluice_hal::{DmaMemory, PAGE_SIZE, PhysAddr};

use super::format::{Decoded, PageTableFormat};
use super::invalidation::{ChangeKind, Invalidation, IovaRange, PendingFree};
use super::{
    ENTRIES_PER_TABLE, MapPerms, PageSize, PageTableError, Translation, level_index, level_size,
};

/// How the engine uses a table, decided from the hardware's capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableConfig {
    /// The largest leaf the engine may write, further capped by the format
    /// (e.g. from VT-d CAP.SLLPS, or 2 MiB for a CPU without 1 GiB pages).
    pub max_page_size: PageSize,
    /// Whether the walker snoops CPU caches. When false (VT-d ECAP.C = 0,
    /// SMMU IDR0.COHACC = 0) every entry written is flushed with
    /// [`DmaMemory::flush_for_device`] before the change is published, and a
    /// new table is flushed in full before the entry pointing to it is
    /// written.
    pub coherent_walk: bool,
}

impl TableConfig {
    pub const fn new(max_page_size: PageSize, coherent_walk: bool) -> Self {
        Self {
            max_page_size,
            coherent_walk,
        }
    }
}

/// One translation table (a VT-d domain's second-level table, an SMMU
/// context descriptor's TTB0, a VM's NPT/EPT/stage-2 root, ...).
///
/// Calls take `&mut self`: callers serialise changes to one table. Each
/// successful `map`/`unmap` returns an [`Invalidation`] that the caller acts
/// on and then completes, which frees any unlinked tables.
///
/// Dropping a table without [`IoPageTable::destroy`] leaks its pages (with an
/// error log): the engine cannot know whether hardware still walks it, and
/// reusing such pages would open a DMA hole.
pub struct IoPageTable<'m, F: PageTableFormat, M: DmaMemory + ?Sized = dyn DmaMemory> {
    mem: &'m M,
    format: F,
    root: PhysAddr,
    root_level: u8,
    max_leaf_level: u8,
    coherent: bool,
    /// Table pages currently linked into the table, root included.
    tables: usize,
}

/// The state of one unmap call.
struct UnmapJob<'h> {
    /// Tables allocated up front for superpage splits.
    pool: Vec<PhysAddr>,
    inv: Invalidation,
    /// Set for formats that need break-before-make on splits.
    break_hook: Option<&'h mut dyn FnMut(IovaRange)>,
}

/// The state of one dirty scan.
struct DirtyScan<'r> {
    dirty_bit: u64,
    clear: bool,
    /// The dirty run not reported yet (extended while leaves are adjacent).
    pending: Option<IovaRange>,
    report: &'r mut dyn FnMut(IovaRange),
    inv: Invalidation,
}

/// The parts of a map request every level needs.
struct MapJob<A> {
    end: u64,
    /// `phys - iova` (wrapping): the physical address of IOVA `v` is
    /// `v.wrapping_add(delta)`.
    delta: u64,
    perms: MapPerms,
    attrs: A,
}

impl<'m, F: PageTableFormat, M: DmaMemory + ?Sized> IoPageTable<'m, F, M> {
    /// An empty table: allocates the root.
    pub fn new(mem: &'m M, format: F, config: TableConfig) -> Result<Self, PageTableError> {
        let levels = format.levels();
        if !(1..=5).contains(&levels)
            || format.input_bits() < super::PAGE_SHIFT
            || format.input_bits() > super::PAGE_SHIFT + super::BITS_PER_LEVEL * u32::from(levels)
            || format.output_bits() < super::PAGE_SHIFT
            || format.output_bits() > 64
        {
            return Err(PageTableError::InvalidFormat);
        }
        let root_level = levels - 1;
        let max_leaf_level = format
            .max_leaf_level()
            .min(config.max_page_size.level())
            .min(root_level);
        let root = mem.alloc_page().map_err(|_| PageTableError::OutOfMemory)?;
        let table = Self {
            mem,
            format,
            root,
            root_level,
            max_leaf_level,
            coherent: config.coherent_walk,
            tables: 1,
        };
        table.flush_page(root);
        Ok(table)
    }

    /// Physical address of the root table, for the context entry / context
    /// descriptor / VMCB / VMCS / VTTBR.
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    pub fn format(&self) -> &F {
        &self.format
    }

    /// The memory the tables live in (to release what [`Self::destroy`]
    /// returns).
    pub fn memory(&self) -> &'m M {
        self.mem
    }

    /// Table pages currently linked (root included); unlinked pages waiting in
    /// an [`Invalidation`] are not counted.
    pub fn table_pages(&self) -> usize {
        self.tables
    }

    /// The largest leaf this table writes.
    pub fn max_page_size(&self) -> u64 {
        level_size(self.max_leaf_level)
    }

    /// Maps `[iova, iova + len)` to `[phys, phys + len)` with the largest
    /// leaves that the format, the configured maximum and the alignment of
    /// `iova`, `phys` and the remaining length allow.
    ///
    /// Fails with nothing changed if any page of the range is already mapped
    /// ([`PageTableError::AlreadyMapped`]), on bad input, or when a table
    /// cannot be allocated (all tables are allocated before the first entry
    /// is written).
    pub fn map(
        &mut self,
        iova: u64,
        phys: PhysAddr,
        len: u64,
        perms: MapPerms,
        attrs: F::Attrs,
    ) -> Result<Invalidation, PageTableError> {
        let end = self.check_iova_range(iova, len)?;
        if !phys.is_page_aligned() {
            return Err(PageTableError::Misaligned);
        }
        let phys_end = phys.checked_add(len).ok_or(PageTableError::Overflow)?;
        let output_bits = self.format.output_bits();
        if u128::from(phys_end.as_u64()) > 1u128 << output_bits {
            return Err(PageTableError::PhysOutOfRange { output_bits });
        }
        self.format.check(perms, &attrs)?;
        let job = MapJob {
            end,
            delta: phys.as_u64().wrapping_sub(iova),
            perms,
            attrs,
        };

        let needed = self.count_map_tables(Some(self.root), self.root_level, iova, end, &job)?;
        let mut pool = self.allocate_pool(needed)?;
        let mut inv = Invalidation::new(ChangeKind::Mapped);
        self.map_into(
            self.root,
            self.root_level,
            iova,
            end,
            &job,
            false,
            &mut pool,
            &mut inv,
        );
        debug_assert!(pool.is_empty(), "map used fewer tables than counted");
        self.tables += needed - pool.len();
        self.free_pool(pool);
        Ok(inv)
    }

    /// Unmaps every mapped page in `[iova, iova + len)`; pages already
    /// unmapped are skipped. A superpage only partly inside the range is
    /// split so the rest keeps translating as before; tables left empty are
    /// unlinked and handed to the returned [`Invalidation`] for freeing after
    /// invalidation. If a split cannot allocate its table, nothing changes.
    ///
    /// Formats whose splits need break-before-make
    /// ([`PageTableFormat::split_needs_break_before_make`]) refuse a split
    /// here with [`PageTableError::NeedsBreakBeforeMake`] (nothing changed);
    /// use [`IoPageTable::unmap_with_break`] for them.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<Invalidation, PageTableError> {
        self.unmap_inner(iova, len, None)
    }

    /// [`IoPageTable::unmap`] with break-before-make for superpage splits:
    /// the superpage entry is first made invalid (and flushed for a
    /// non-coherent walker), then `invalidate` is called with the
    /// superpage's IOVA range and must invalidate it in every TLB and wait
    /// for completion, and only then is the table of smaller leaves linked
    /// (Arm ARM DDI 0487, "Using break-before-make when updating
    /// translation table entries", which covers block-to-table changes; the
    /// SMMUv3 spec IHI 0070 applies the same rule unless SMMU_IDR3.BBML
    /// reports level 2). While
    /// that happens, accesses to the rest of the superpage fault.
    pub fn unmap_with_break(
        &mut self,
        iova: u64,
        len: u64,
        invalidate: &mut dyn FnMut(IovaRange),
    ) -> Result<Invalidation, PageTableError> {
        self.unmap_inner(iova, len, Some(invalidate))
    }

    fn unmap_inner(
        &mut self,
        iova: u64,
        len: u64,
        break_hook: Option<&mut dyn FnMut(IovaRange)>,
    ) -> Result<Invalidation, PageTableError> {
        let end = self.check_iova_range(iova, len)?;
        let needed = self.count_split_tables(self.root, self.root_level, iova, end);
        let break_before_make = self.format.split_needs_break_before_make();
        if needed > 0 && break_before_make && break_hook.is_none() {
            return Err(PageTableError::NeedsBreakBeforeMake);
        }
        let mut job = UnmapJob {
            pool: self.allocate_pool(needed)?,
            inv: Invalidation::new(ChangeKind::Unmapped),
            break_hook: if break_before_make { break_hook } else { None },
        };
        self.unmap_from(self.root, self.root_level, iova, end, true, &mut job);
        debug_assert!(job.pool.is_empty(), "unmap used fewer tables than counted");
        self.free_pool(core::mem::take(&mut job.pool));
        Ok(job.inv)
    }

    /// What `iova` translates to, or `None` if it is not mapped (or beyond
    /// the input width).
    pub fn translate(&self, iova: u64) -> Option<Translation<F::Attrs>> {
        if u128::from(iova) >= 1u128 << self.format.input_bits() {
            return None;
        }
        let mut table = self.root;
        let mut level = self.root_level;
        loop {
            let raw = self.read(table, level_index(iova, level));
            match self.format.decode(level, raw) {
                Decoded::Invalid => return None,
                Decoded::Table(next) if level > 0 => {
                    table = next;
                    level -= 1;
                }
                Decoded::Table(_) => return None,
                Decoded::Leaf { phys, perms, attrs } => {
                    let size = level_size(level);
                    return Some(Translation {
                        phys: PhysAddr::new(phys.as_u64() + (iova & (size - 1))),
                        perms,
                        attrs,
                        page_size: size,
                    });
                }
            }
        }
    }

    /// Reports the dirty leaves in `[iova, iova + len)` to `report` (as
    /// merged IOVA ranges, in increasing order) and, with `clear`, clears
    /// their dirty bits.
    ///
    /// A leaf has one dirty bit, so a dirty superpage is reported whole,
    /// even where it extends beyond the range (clearing its bit forgets the
    /// whole superpage's state). The returned [`Invalidation`]
    /// ([`ChangeKind::DirtyCleared`]) lists the leaves whose bit was cleared:
    /// until the caller invalidates them, a device can keep writing through
    /// a cached translation without setting the bit again.
    ///
    /// Only for coherent walkers of formats with a dirty bit
    /// ([`PageTableFormat::dirty_bit`]); the caller must have enabled
    /// hardware dirty updates (VT-d SLADE, EPTP A/D).
    pub fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        clear: bool,
        report: &mut dyn FnMut(IovaRange),
    ) -> Result<Invalidation, PageTableError> {
        let end = self.check_iova_range(iova, len)?;
        let dirty_bit = match self.format.dirty_bit() {
            Some(bit) if self.coherent => bit,
            _ => return Err(PageTableError::DirtyTrackingUnsupported),
        };
        let mut scan = DirtyScan {
            dirty_bit,
            clear,
            pending: None,
            report,
            inv: Invalidation::new(ChangeKind::DirtyCleared),
        };
        self.scan_dirty(self.root, self.root_level, iova, end, &mut scan);
        if let Some(range) = scan.pending.take() {
            (scan.report)(range);
        }
        Ok(scan.inv)
    }

    fn scan_dirty(
        &self,
        table: PhysAddr,
        level: u8,
        start: u64,
        end: u64,
        scan: &mut DirtyScan<'_>,
    ) {
        let size = level_size(level);
        let mut iova = start;
        while iova < end {
            let index = level_index(iova, level);
            let entry_start = iova & !(size - 1);
            let entry_end = (entry_start + size).min(end);
            let raw = self.read(table, index);
            match self.format.decode(level, raw) {
                Decoded::Table(child) if level > 0 => {
                    self.scan_dirty(child, level - 1, iova, entry_end, scan);
                }
                Decoded::Leaf { .. } if raw & scan.dirty_bit != 0 => {
                    let leaf = IovaRange::new(entry_start, entry_start + size);
                    match scan.pending.as_mut() {
                        Some(run) if run.end == leaf.start => run.end = leaf.end,
                        _ => {
                            if let Some(run) = scan.pending.replace(leaf) {
                                (scan.report)(run);
                            }
                        }
                    }
                    if scan.clear {
                        self.write(table, index, raw & !scan.dirty_bit);
                        scan.inv.record(entry_start, size, size);
                    }
                }
                _ => {}
            }
            iova = entry_end;
        }
    }

    /// Unlinks nothing but hands every table page (root included) over for
    /// freeing. Release the result only once no walker can use the table any
    /// more (detached from all devices and invalidated).
    pub fn destroy(mut self) -> PendingFree {
        let mut pending = PendingFree::default();
        self.collect_tables(self.root, self.root_level, &mut pending);
        self.tables = 0;
        pending
    }

    // ---- input checks ----------------------------------------------------

    fn check_iova_range(&self, iova: u64, len: u64) -> Result<u64, PageTableError> {
        if len == 0 {
            return Err(PageTableError::ZeroLength);
        }
        if !iova.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(PageTableError::Misaligned);
        }
        let end = iova.checked_add(len).ok_or(PageTableError::Overflow)?;
        let input_bits = self.format.input_bits();
        if u128::from(end) > 1u128 << input_bits {
            return Err(PageTableError::IovaOutOfRange { input_bits });
        }
        Ok(end)
    }

    // ---- memory helpers --------------------------------------------------

    fn entry_addr(table: PhysAddr, index: u64) -> PhysAddr {
        PhysAddr::new(table.as_u64() + index * 8)
    }

    fn read(&self, table: PhysAddr, index: u64) -> u64 {
        self.mem.read_u64(Self::entry_addr(table, index))
    }

    fn write(&self, table: PhysAddr, index: u64, value: u64) {
        self.mem.write_u64(Self::entry_addr(table, index), value);
    }

    /// Makes entries `first..=last` of `table` visible to a non-coherent
    /// walker.
    fn flush_entries(&self, table: PhysAddr, first: u64, last: u64) {
        if !self.coherent {
            self.mem
                .flush_for_device(Self::entry_addr(table, first), (last - first + 1) * 8);
        }
    }

    fn flush_page(&self, table: PhysAddr) {
        if !self.coherent {
            self.mem.flush_for_device(table, PAGE_SIZE);
        }
    }

    /// Allocates `count` zeroed tables, or none at all.
    fn allocate_pool(&self, count: usize) -> Result<Vec<PhysAddr>, PageTableError> {
        // `count` follows from caller-supplied lengths: a huge request must
        // fail cleanly, not abort on a heap allocation failure.
        let mut pool = Vec::new();
        pool.try_reserve_exact(count)
            .map_err(|_| PageTableError::OutOfMemory)?;
        for _ in 0..count {
            match self.mem.alloc_page() {
                Ok(page) => pool.push(page),
                Err(_) => {
                    self.free_pool(pool);
                    return Err(PageTableError::OutOfMemory);
                }
            }
        }
        Ok(pool)
    }

    /// Returns never-published pages straight away.
    fn free_pool(&self, pool: Vec<PhysAddr>) {
        for page in pool {
            self.mem.free_page(page);
        }
    }

    fn leaf_fits(&self, level: u8, iova: u64, job: &MapJob<F::Attrs>) -> bool {
        let size = level_size(level);
        level <= self.max_leaf_level
            && iova.is_multiple_of(size)
            && iova.wrapping_add(job.delta).is_multiple_of(size)
            && job.end - iova >= size
    }

    // ---- map ---------------------------------------------------------------

    /// How many new tables mapping `[start, end)` below `table` (a table at
    /// `level`, or `None` for a table that does not exist yet) needs, or
    /// `AlreadyMapped`. Reads only.
    fn count_map_tables(
        &self,
        table: Option<PhysAddr>,
        level: u8,
        start: u64,
        end: u64,
        job: &MapJob<F::Attrs>,
    ) -> Result<usize, PageTableError> {
        if table.is_none() && level == 0 {
            return Ok(0);
        }
        let size = level_size(level);
        let mut needed = 0;
        let mut iova = start;
        while iova < end {
            let entry_end = ((iova & !(size - 1)) + size).min(end);
            let raw = table.map_or(0, |t| self.read(t, level_index(iova, level)));
            match self.format.decode(level, raw) {
                Decoded::Invalid => {
                    if !self.leaf_fits(level, iova, job) {
                        needed +=
                            1 + self.count_map_tables(None, level - 1, iova, entry_end, job)?;
                    }
                }
                // A present table is never empty, so if a leaf would fit
                // here the recursion finds the conflicting mapping; if it
                // does not, the recursion maps around what is there.
                Decoded::Table(child) if level > 0 => {
                    needed +=
                        self.count_map_tables(Some(child), level - 1, iova, entry_end, job)?;
                }
                Decoded::Table(_) | Decoded::Leaf { .. } => {
                    return Err(PageTableError::AlreadyMapped { iova });
                }
            }
            iova = entry_end;
        }
        Ok(needed)
    }

    /// Writes the mapping of `[start, end)` below `table`. `fresh` tables
    /// are new and not yet linked: they are known to be zero and their
    /// caller flushes them whole before linking them.
    #[allow(clippy::too_many_arguments)]
    fn map_into(
        &self,
        table: PhysAddr,
        level: u8,
        start: u64,
        end: u64,
        job: &MapJob<F::Attrs>,
        fresh: bool,
        pool: &mut Vec<PhysAddr>,
        inv: &mut Invalidation,
    ) {
        let size = level_size(level);
        let mut written: Option<(u64, u64)> = None;
        let mut iova = start;
        while iova < end {
            let index = level_index(iova, level);
            if fresh && self.leaf_fits(level, iova, job) {
                // A new table is all free, and consecutive leaves differ only
                // in their address field (`leaf_entry` is linear in `phys`):
                // write the whole run without re-encoding.
                let run = ((end - iova) / size).min(ENTRIES_PER_TABLE - index);
                let phys = PhysAddr::new(iova.wrapping_add(job.delta));
                let first = self.format.leaf_entry(level, phys, job.perms, &job.attrs);
                for k in 0..run {
                    self.write(table, index + k, first + k * size);
                }
                inv.record(iova, run * size, size);
                iova += run * size;
                continue;
            }
            let entry_end = ((iova & !(size - 1)) + size).min(end);
            let raw = if fresh { 0 } else { self.read(table, index) };
            match self.format.decode(level, raw) {
                Decoded::Invalid if self.leaf_fits(level, iova, job) => {
                    let phys = PhysAddr::new(iova.wrapping_add(job.delta));
                    let entry = self.format.leaf_entry(level, phys, job.perms, &job.attrs);
                    self.write(table, index, entry);
                    widen(&mut written, index);
                    inv.record(iova, size, size);
                }
                Decoded::Invalid => {
                    let Some(child) = pool.pop() else {
                        debug_assert!(false, "map ran out of pre-allocated tables");
                        return;
                    };
                    self.map_into(child, level - 1, iova, entry_end, job, true, pool, inv);
                    self.flush_page(child);
                    self.write(table, index, self.format.table_entry(level, child));
                    widen(&mut written, index);
                    inv.tables_installed = true;
                }
                Decoded::Table(child) => {
                    self.map_into(child, level - 1, iova, entry_end, job, false, pool, inv);
                }
                Decoded::Leaf { .. } => {
                    debug_assert!(false, "count_map_tables let a mapped page through");
                }
            }
            iova = entry_end;
        }
        if let (Some((first, last)), false) = (written, fresh) {
            self.flush_entries(table, first, last);
        }
    }

    // ---- unmap -------------------------------------------------------------

    /// How many tables splitting superpages for unmapping `[start, end)`
    /// below `table` needs. Reads only.
    fn count_split_tables(&self, table: PhysAddr, level: u8, start: u64, end: u64) -> usize {
        let size = level_size(level);
        let mut needed = 0;
        let mut iova = start;
        while iova < end {
            let entry_end = ((iova & !(size - 1)) + size).min(end);
            let partial = entry_end - iova != size;
            match self
                .format
                .decode(level, self.read(table, level_index(iova, level)))
            {
                Decoded::Leaf { .. } if partial && level > 0 => {
                    needed += split_cost(level, iova, entry_end);
                }
                Decoded::Table(child) if partial && level > 0 => {
                    needed += self.count_split_tables(child, level - 1, iova, entry_end);
                }
                _ => {}
            }
            iova = entry_end;
        }
        needed
    }

    /// Clears every mapped page of `[start, end)` below `table`.
    /// `published` is false for a split table not linked yet: its caller
    /// flushes it whole, and hardware cannot see it, so it needs neither
    /// per-entry flushes nor break-before-make.
    fn unmap_from(
        &mut self,
        table: PhysAddr,
        level: u8,
        start: u64,
        end: u64,
        published: bool,
        job: &mut UnmapJob<'_>,
    ) {
        let size = level_size(level);
        let mut written: Option<(u64, u64)> = None;
        let mut iova = start;
        while iova < end {
            let index = level_index(iova, level);
            let entry_start = iova & !(size - 1);
            let entry_end = (entry_start + size).min(end);
            let whole = entry_end - iova == size;
            let raw = self.read(table, index);
            match self.format.decode(level, raw) {
                Decoded::Invalid => {}
                Decoded::Leaf { .. } if whole || level == 0 => {
                    self.write(table, index, 0);
                    widen(&mut written, index);
                    job.inv.record(entry_start, size, size);
                }
                // A table entry at level 0 would be a format bug; clearing it
                // is the safe reading.
                Decoded::Table(_) if level == 0 => {
                    self.write(table, index, 0);
                    widen(&mut written, index);
                    job.inv.record(entry_start, size, size);
                }
                Decoded::Leaf { phys, perms, attrs } => {
                    let Some(split) = job.pool.pop() else {
                        debug_assert!(false, "unmap ran out of pre-allocated tables");
                        return;
                    };
                    let kept = raw & self.format.hardware_managed_bits();
                    let child_size = level_size(level - 1);
                    for i in 0..ENTRIES_PER_TABLE {
                        let child_phys = PhysAddr::new(phys.as_u64() + i * child_size);
                        let entry = self.format.leaf_entry(level - 1, child_phys, perms, &attrs);
                        self.write(split, i, entry | kept);
                    }
                    self.unmap_from(split, level - 1, iova, entry_end, false, job);
                    self.flush_page(split);
                    if published && let Some(hook) = job.break_hook.as_mut() {
                        // Break: the superpage becomes invalid and every TLB
                        // forgets it before the table is linked.
                        self.write(table, index, 0);
                        self.flush_entries(table, index, index);
                        hook(IovaRange::new(entry_start, entry_start + size));
                    }
                    self.write(table, index, self.format.table_entry(level, split));
                    widen(&mut written, index);
                    self.tables += 1;
                    job.inv.superpage_split = true;
                    job.inv.touch_leaf(size);
                }
                Decoded::Table(child) if whole => {
                    self.detach(child, level - 1, entry_start, &mut job.inv);
                    self.write(table, index, 0);
                    widen(&mut written, index);
                    job.inv.tables_freed = true;
                }
                Decoded::Table(child) => {
                    self.unmap_from(child, level - 1, iova, entry_end, true, job);
                    if self.is_empty(child, level - 1, level_index(entry_end - 1, level - 1)) {
                        self.write(table, index, 0);
                        widen(&mut written, index);
                        job.inv.pending.push(child);
                        self.tables -= 1;
                        job.inv.tables_freed = true;
                    }
                }
            }
            iova = entry_end;
        }
        if let (Some((first, last)), true) = (written, published) {
            self.flush_entries(table, first, last);
        }
    }

    /// Records every leaf below `table` (mapping from `base`) as changed and
    /// queues the subtree's tables for freeing. The subtree is left intact:
    /// a walker still using it until invalidation sees the old mappings.
    fn detach(&mut self, table: PhysAddr, level: u8, base: u64, inv: &mut Invalidation) {
        let size = level_size(level);
        for index in 0..ENTRIES_PER_TABLE {
            let iova = base + index * size;
            match self.format.decode(level, self.read(table, index)) {
                Decoded::Invalid => {}
                Decoded::Table(child) if level > 0 => self.detach(child, level - 1, iova, inv),
                Decoded::Table(_) | Decoded::Leaf { .. } => inv.record(iova, size, size),
            }
        }
        inv.pending.push(table);
        self.tables -= 1;
    }

    /// Whether `table` has no valid entry. The scan starts at `hint`, the
    /// last entry the unmap touched (still valid if it led to a table that
    /// was kept), and wraps, so in-order unmaps find a valid entry at once.
    fn is_empty(&self, table: PhysAddr, level: u8, hint: u64) -> bool {
        let start = hint % ENTRIES_PER_TABLE;
        (start..ENTRIES_PER_TABLE).chain(0..start).all(|i| {
            matches!(
                self.format.decode(level, self.read(table, i)),
                Decoded::Invalid
            )
        })
    }

    fn collect_tables(&self, table: PhysAddr, level: u8, pending: &mut PendingFree) {
        if level > 0 {
            for index in 0..ENTRIES_PER_TABLE {
                if let Decoded::Table(child) = self.format.decode(level, self.read(table, index)) {
                    self.collect_tables(child, level - 1, pending);
                }
            }
        }
        pending.push(table);
    }
}

impl<F: PageTableFormat, M: DmaMemory + ?Sized> Drop for IoPageTable<'_, F, M> {
    fn drop(&mut self) {
        if self.tables != 0 {
            log::error!(
                "IO page table at {} dropped without destroy(): leaking its {} table pages, \
                 since hardware may still walk them",
                self.root,
                self.tables
            );
        }
    }
}

fn widen(range: &mut Option<(u64, u64)>, index: u64) {
    *range = Some(match *range {
        None => (index, index),
        Some((first, last)) => (first.min(index), last.max(index)),
    });
}

/// Tables needed to split a leaf at `level` (>= 1) so that exactly
/// `[start, end)` — a non-empty part, not the whole, of the leaf's range —
/// can be cleared: one table for this leaf, plus the splits of the (at most
/// two) smaller leaves that the range's ends cut.
fn split_cost(level: u8, start: u64, end: u64) -> usize {
    if level == 1 {
        return 1;
    }
    let child_size = level_size(level - 1);
    let first_child = start & !(child_size - 1);
    let last_child = (end - 1) & !(child_size - 1);
    let cut = |child: u64| {
        let lo = start.max(child);
        let hi = end.min(child + child_size);
        if hi - lo == child_size {
            0
        } else {
            split_cost(level - 1, lo, hi)
        }
    };
    let mut needed = 1 + cut(first_child);
    if last_child != first_child {
        needed += cut(last_child);
    }
    needed
}
