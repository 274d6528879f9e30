//! What a change to a table requires the caller to invalidate, and the table
//! pages that may only be freed afterwards.

use alloc::vec::Vec;

use sluice_hal::{DmaMemory, PhysAddr};

/// A half-open IOVA range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

impl IovaRange {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    pub const fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub const fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova < self.end
    }
}

/// Table pages unlinked from a table that must not be reused until every
/// walker that might still read them has been invalidated (IOTLB and
/// paging-structure caches, or the CPU's TLBs for nested paging).
///
/// Call [`PendingFree::release`] after the invalidation completed. Dropping a
/// non-empty `PendingFree` without releasing it leaks the pages (and logs
/// it): reusing memory a walker may still read would let a device write
/// through stale tables, which is worse than a leak.
#[must_use = "table pages are freed only by release() after invalidation"]
#[derive(Debug, Default)]
pub struct PendingFree {
    pages: Vec<PhysAddr>,
}

impl PendingFree {
    pub(super) fn push(&mut self, page: PhysAddr) {
        if self.pages.try_reserve(1).is_ok() {
            self.pages.push(page);
        } else {
            // The table is already unlinked; losing track of it only leaks
            // it, which is safe, unlike freeing it before invalidation.
            log::error!("no heap left to queue unlinked IO page table {page}; leaking it");
        }
    }

    /// Moves `other`'s pages into `self`, to release several changes'
    /// tables after one invalidation.
    pub fn append(&mut self, mut other: PendingFree) {
        for page in other.pages.drain(..) {
            self.push(page);
        }
    }

    /// The pages waiting to be freed.
    pub fn pages(&self) -> &[PhysAddr] {
        &self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Returns the pages to `mem`. Only call this once the hardware can no
    /// longer read them.
    pub fn release<M: DmaMemory + ?Sized>(mut self, mem: &M) {
        for page in self.pages.drain(..) {
            mem.free_page(page);
        }
    }
}

impl Drop for PendingFree {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            log::error!(
                "{} IO page-table pages were unlinked but never released; leaking them \
                 rather than risking reuse while a walker may still read them",
                self.pages.len()
            );
        }
    }
}

/// Whether an [`Invalidation`] describes a map or an unmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Pages went from not present to present.
    Mapped,
    /// Pages went from present to not present.
    Unmapped,
    /// Dirty bits of present leaves were cleared; translations are
    /// unchanged, but cached ones must go so the next write sets the bit
    /// again.
    DirtyCleared,
}

/// Exactly what a successful `map` or `unmap` changed, and so what the caller
/// must invalidate before [`Invalidation::complete`].
///
/// `ranges` is the set of 4 KiB pages whose translation changed, written as
/// the fewest possible ranges: sorted, non-overlapping and non-adjacent
/// (adjacent runs are merged). A page is in a range if and only if its
/// translation changed; pages of a split superpage that still translate as
/// before are not (hardware invalidation by address also removes a cached
/// superpage that covers any invalidated address, and `largest_page` says a
/// superpage was involved).
#[must_use = "the caller must invalidate and then call complete()"]
#[derive(Debug)]
pub struct Invalidation {
    pub(super) kind: ChangeKind,
    pub(super) ranges: Vec<IovaRange>,
    pub(super) largest_page: u64,
    pub(super) tables_installed: bool,
    pub(super) tables_freed: bool,
    pub(super) superpage_split: bool,
    pub(super) pending: PendingFree,
}

impl Invalidation {
    pub(super) fn new(kind: ChangeKind) -> Self {
        let mut ranges = Vec::new();
        // Room for the common case up front; `record` copes without it.
        let _ = ranges.try_reserve(4);
        Self {
            kind,
            ranges,
            largest_page: 0,
            tables_installed: false,
            tables_freed: false,
            superpage_split: false,
            pending: PendingFree::default(),
        }
    }

    /// Records that `[start, start + len)` changed through a leaf of
    /// `leaf_size` bytes. Calls come in increasing IOVA order, so merging
    /// only ever looks at the last range.
    pub(super) fn record(&mut self, start: u64, len: u64, leaf_size: u64) {
        let end = start + len;
        self.largest_page = self.largest_page.max(leaf_size);
        let adjacent = self.ranges.last().is_some_and(|last| last.end == start);
        // Out of heap mid-change: widen the last range over the gap instead,
        // since invalidating unchanged pages too is always safe.
        let no_room = !adjacent && self.ranges.try_reserve(1).is_err();
        match self.ranges.last_mut() {
            Some(last) if adjacent || no_room => last.end = end,
            _ => self.ranges.push(IovaRange::new(start, end)),
        }
    }

    pub(super) fn touch_leaf(&mut self, leaf_size: u64) {
        self.largest_page = self.largest_page.max(leaf_size);
    }

    pub fn kind(&self) -> ChangeKind {
        self.kind
    }

    /// The pages whose translation changed (see the type's documentation).
    pub fn ranges(&self) -> &[IovaRange] {
        &self.ranges
    }

    /// The pages that went from not present to present: all of `ranges()`
    /// for a map, nothing otherwise. Hardware that caches not-present
    /// entries (VT-d caching mode) needs these invalidated too.
    pub fn newly_present(&self) -> &[IovaRange] {
        match self.kind {
            ChangeKind::Mapped => &self.ranges,
            ChangeKind::Unmapped | ChangeKind::DirtyCleared => &[],
        }
    }

    /// Total bytes whose translation changed.
    pub fn changed_bytes(&self) -> u64 {
        self.ranges.iter().map(IovaRange::len).sum()
    }

    /// The largest leaf written, cleared or split (0 when nothing changed):
    /// selects e.g. the VT-d page-selective invalidation address mask or the
    /// Arm TLBI range/TTL hint.
    pub fn largest_page(&self) -> u64 {
        self.largest_page
    }

    /// Whether nothing changed at all (e.g. unmap of an unmapped range).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.superpage_split && !self.tables_freed
    }

    /// A not-present entry now points to a new table (only relevant where
    /// not-present entries may be cached, e.g. VT-d caching mode).
    pub fn tables_installed(&self) -> bool {
        self.tables_installed
    }

    /// A table was unlinked: its pages are in [`Self::pending_free`].
    pub fn tables_freed(&self) -> bool {
        self.tables_freed
    }

    /// A superpage leaf was replaced by a table of smaller leaves.
    pub fn superpage_split(&self) -> bool {
        self.superpage_split
    }

    /// Whether cached non-leaf entries (VT-d paging-structure caches, Arm
    /// walk caches) may now be stale, so the invalidation must include them
    /// (VT-d IH = 0, Arm TLBI without the leaf-only hint).
    pub fn flush_paging_structures(&self) -> bool {
        self.tables_freed || self.superpage_split
    }

    /// Table pages that will be freed by [`Self::complete`].
    pub fn pending_free(&self) -> &[PhysAddr] {
        self.pending.pages()
    }

    /// Frees the unlinked table pages. Call only after the invalidation this
    /// value describes has completed.
    pub fn complete<M: DmaMemory + ?Sized>(self, mem: &M) {
        self.pending.release(mem);
    }

    /// Hands the unlinked table pages over separately, e.g. to batch their
    /// release after one invalidation covering several changes.
    pub fn into_pending_free(self) -> PendingFree {
        self.pending
    }
}
