//! Host-side stand-ins for the hardware traits, used by tests of every
//! driver. They record what the code under test did (pages live, cache
//! flushes) so tests can assert on it.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use crate::clock::Clock;
use crate::dma::{DmaAllocError, DmaMemory, PAGE_SIZE, PhysAddr};

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// Sparse physical memory made of 4 KiB pages.
///
/// * Pages handed out by [`DmaMemory::alloc_page`] come from a bump pointer
///   above `0x1_0000_0000` and are tracked as live until freed; freeing a page
///   that is not live panics (a double free is a bug in the code under test).
/// * [`DmaMemory::alloc_contiguous`] hands out aligned runs of pages from
///   the same bump pointer; every page of a run counts as live, the run is
///   one allocation, and it must be returned whole with
///   [`DmaMemory::free_contiguous`] (freeing part of it, or freeing it with
///   another page count, panics). [`ModelMemory::set_max_contiguous_pages`]
///   makes longer runs fail, like memory that cannot find them.
/// * [`ModelMemory::fail_allocation_after`] makes the N-th next allocation
///   (single page or contiguous run) fail, for allocation-failure sweeps.
/// * Reads of pages never written return zero; [`ModelMemory::poke`] lets a
///   test place data anywhere (e.g. guest RAM).
/// * With [`ModelMemory::set_track_flushes`], every flushed range is logged
///   and words written but not yet flushed are tracked, so tests of
///   non-coherent walkers can assert that everything written was flushed.
pub struct ModelMemory {
    pages: RefCell<BTreeMap<u64, Box<[u64; WORDS_PER_PAGE]>>>,
    live: RefCell<BTreeMap<u64, ()>>,
    /// Contiguous runs: first page → page count.
    runs: RefCell<BTreeMap<u64, u64>>,
    max_contiguous: Cell<Option<u64>>,
    next_page: Cell<u64>,
    allocations: Cell<u64>,
    fail_after: Cell<Option<u64>>,
    track_flushes: Cell<bool>,
    unflushed: RefCell<BTreeMap<u64, ()>>,
    flushes: RefCell<Vec<(PhysAddr, u64)>>,
}

impl Default for ModelMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelMemory {
    pub const ALLOC_BASE: u64 = 0x1_0000_0000;

    pub fn new() -> Self {
        Self {
            pages: RefCell::new(BTreeMap::new()),
            live: RefCell::new(BTreeMap::new()),
            runs: RefCell::new(BTreeMap::new()),
            max_contiguous: Cell::new(None),
            next_page: Cell::new(Self::ALLOC_BASE),
            allocations: Cell::new(0),
            fail_after: Cell::new(None),
            track_flushes: Cell::new(false),
            unflushed: RefCell::new(BTreeMap::new()),
            flushes: RefCell::new(Vec::new()),
        }
    }

    /// Pages allocated and not yet freed.
    pub fn live_pages(&self) -> usize {
        self.live.borrow().len()
    }

    /// Whether `page` is currently allocated.
    pub fn is_live(&self, page: PhysAddr) -> bool {
        self.live.borrow().contains_key(&page.as_u64())
    }

    /// Successful allocations so far.
    pub fn allocation_count(&self) -> u64 {
        self.allocations.get()
    }

    /// The allocation after `successes` more successful ones fails (0: the
    /// very next one). `None` switches injection off. The injected failure is
    /// one-shot.
    pub fn fail_allocation_after(&self, successes: Option<u64>) {
        self.fail_after.set(successes);
    }

    /// Contiguous runs longer than `pages` fail (`None`: any length).
    /// Such a refusal is how this memory is, not an injected failure: it
    /// does not use up [`ModelMemory::fail_allocation_after`].
    pub fn set_max_contiguous_pages(&self, pages: Option<u64>) {
        self.max_contiguous.set(pages);
    }

    /// Contiguous runs allocated and not yet freed, as (start, pages).
    pub fn contiguous_runs(&self) -> Vec<(PhysAddr, u64)> {
        self.runs
            .borrow()
            .iter()
            .map(|(&s, &n)| (PhysAddr::new(s), n))
            .collect()
    }

    pub fn set_track_flushes(&self, on: bool) {
        self.track_flushes.set(on);
    }

    /// Ranges passed to `flush_for_device`, oldest first.
    pub fn flushes(&self) -> Vec<(PhysAddr, u64)> {
        self.flushes.borrow().clone()
    }

    /// Word addresses written while flush tracking was on and not flushed
    /// since.
    pub fn unflushed_words(&self) -> Vec<PhysAddr> {
        self.unflushed
            .borrow()
            .keys()
            .map(|&a| PhysAddr::new(a))
            .collect()
    }

    /// Writes raw bytes anywhere (test setup: guest RAM contents, ACPI images).
    pub fn poke(&self, addr: PhysAddr, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let a = addr.as_u64() + i as u64;
            let word_addr = a & !7;
            let shift = (a & 7) * 8;
            let old = self.read_word(word_addr);
            self.write_word(
                word_addr,
                (old & !(0xff << shift)) | (u64::from(b) << shift),
            );
        }
    }

    /// Reads raw bytes anywhere.
    pub fn peek(&self, addr: PhysAddr, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let a = addr.as_u64() + i as u64;
            *b = (self.read_word(a & !7) >> ((a & 7) * 8)) as u8;
        }
    }

    fn read_word(&self, addr: u64) -> u64 {
        let page = addr & !(PAGE_SIZE - 1);
        let index = ((addr % PAGE_SIZE) / 8) as usize;
        self.pages.borrow().get(&page).map_or(0, |p| p[index])
    }

    fn write_word(&self, addr: u64, value: u64) {
        let page = addr & !(PAGE_SIZE - 1);
        let index = ((addr % PAGE_SIZE) / 8) as usize;
        self.pages
            .borrow_mut()
            .entry(page)
            .or_insert_with(|| Box::new([0; WORDS_PER_PAGE]))[index] = value;
    }
}

impl ModelMemory {
    /// Applies [`ModelMemory::fail_allocation_after`] to one allocation.
    fn injected_failure(&self) -> bool {
        match self.fail_after.get() {
            Some(0) => {
                self.fail_after.set(None);
                true
            }
            Some(n) => {
                self.fail_after.set(Some(n - 1));
                false
            }
            None => false,
        }
    }

    /// Makes `page` live and zeroed.
    fn hand_out(&self, page: u64) {
        self.pages
            .borrow_mut()
            .insert(page, Box::new([0; WORDS_PER_PAGE]));
        self.live.borrow_mut().insert(page, ());
    }

    /// Makes `page` not live (and forgets its contents).
    fn take_back(&self, page: u64) {
        let removed = self.live.borrow_mut().remove(&page);
        assert!(
            removed.is_some(),
            "free of a page that is not allocated: {:?}",
            PhysAddr::new(page)
        );
        self.pages.borrow_mut().remove(&page);
        let mut unflushed = self.unflushed.borrow_mut();
        let stale: Vec<u64> = unflushed
            .range(page..page + PAGE_SIZE)
            .map(|(&a, _)| a)
            .collect();
        for a in stale {
            unflushed.remove(&a);
        }
    }

    /// The contiguous run `page` belongs to, if any.
    fn run_containing(&self, page: u64) -> Option<(u64, u64)> {
        self.runs
            .borrow()
            .range(..=page)
            .next_back()
            .map(|(&s, &n)| (s, n))
            .filter(|&(s, n)| page < s + n * PAGE_SIZE)
    }
}

impl DmaMemory for ModelMemory {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        if self.injected_failure() {
            return Err(DmaAllocError);
        }
        let page = self.next_page.get();
        self.next_page.set(page + PAGE_SIZE);
        self.allocations.set(self.allocations.get() + 1);
        self.hand_out(page);
        Ok(PhysAddr::new(page))
    }

    fn free_page(&self, page: PhysAddr) {
        if let Some((start, pages)) = self.run_containing(page.as_u64()) {
            panic!(
                "free_page of {page:?}, which belongs to the contiguous run of {pages} pages at \
                 {:?}",
                PhysAddr::new(start)
            );
        }
        self.take_back(page.as_u64());
    }

    fn alloc_contiguous(&self, pages: u64, align: u64) -> Result<PhysAddr, DmaAllocError> {
        let align = align.max(PAGE_SIZE);
        if pages == 0 || !align.is_power_of_two() {
            return Err(DmaAllocError);
        }
        if self.max_contiguous.get().is_some_and(|max| pages > max) {
            return Err(DmaAllocError);
        }
        let bytes = pages.checked_mul(PAGE_SIZE).ok_or(DmaAllocError)?;
        if self.injected_failure() {
            return Err(DmaAllocError);
        }
        let start = self
            .next_page
            .get()
            .checked_next_multiple_of(align)
            .ok_or(DmaAllocError)?;
        let end = start.checked_add(bytes).ok_or(DmaAllocError)?;
        self.next_page.set(end);
        self.allocations.set(self.allocations.get() + 1);
        for i in 0..pages {
            self.hand_out(start + i * PAGE_SIZE);
        }
        self.runs.borrow_mut().insert(start, pages);
        Ok(PhysAddr::new(start))
    }

    fn free_contiguous(&self, start: PhysAddr, pages: u64) {
        let recorded = self.runs.borrow().get(&start.as_u64()).copied();
        assert_eq!(
            recorded,
            Some(pages),
            "free_contiguous({start:?}, {pages}) does not match an allocated run"
        );
        self.runs.borrow_mut().remove(&start.as_u64());
        for i in 0..pages {
            self.take_back(start.as_u64() + i * PAGE_SIZE);
        }
    }

    fn read_u64(&self, addr: PhysAddr) -> u64 {
        debug_assert!(
            addr.as_u64().is_multiple_of(8),
            "unaligned 64-bit read at {addr:?}"
        );
        self.read_word(addr.as_u64())
    }

    fn write_u64(&self, addr: PhysAddr, value: u64) {
        debug_assert!(
            addr.as_u64().is_multiple_of(8),
            "unaligned 64-bit write at {addr:?}"
        );
        self.write_word(addr.as_u64(), value);
        if self.track_flushes.get() {
            self.unflushed.borrow_mut().insert(addr.as_u64(), ());
        }
    }

    fn flush_for_device(&self, addr: PhysAddr, len: u64) {
        self.flushes.borrow_mut().push((addr, len));
        let start = addr.as_u64() & !7;
        let end = addr.as_u64().saturating_add(len);
        let mut unflushed = self.unflushed.borrow_mut();
        let done: Vec<u64> = unflushed.range(start..end).map(|(&a, _)| a).collect();
        for a in done {
            unflushed.remove(&a);
        }
    }
}

/// A clock that moves forward by a fixed step each time it is read, so
/// timeouts in host tests happen after a predictable number of polls and
/// never depend on the speed of the machine.
pub struct ModelClock {
    now: Cell<u64>,
    step_ns: u64,
}

impl ModelClock {
    pub const fn new(step_ns: u64) -> Self {
        Self {
            now: Cell::new(0),
            step_ns,
        }
    }
    /// Jumps forward, e.g. to simulate time spent in a guest.
    pub fn advance(&self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }
}

impl Clock for ModelClock {
    fn now_ns(&self) -> u64 {
        let t = self.now.get();
        self.now.set(t + self.step_ns);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::poll_until;

    #[test]
    fn allocation_failure_is_injected_once_and_pages_are_tracked() {
        let mem = ModelMemory::new();
        mem.fail_allocation_after(Some(1));
        let a = mem.alloc_page().expect("first allocation succeeds");
        assert_eq!(mem.alloc_page(), Err(DmaAllocError));
        let b = mem.alloc_page().expect("injection is one-shot");
        assert_ne!(a, b);
        assert_eq!(mem.live_pages(), 2);
        mem.write_u64(a, 0xdead_beef);
        assert_eq!(mem.read_u64(a), 0xdead_beef);
        mem.free_page(a);
        assert_eq!(mem.live_pages(), 1);
        assert!(!mem.is_live(a));
    }

    #[test]
    #[should_panic(expected = "not allocated")]
    fn double_free_is_caught() {
        let mem = ModelMemory::new();
        let a = mem.alloc_page().unwrap();
        mem.free_page(a);
        mem.free_page(a);
    }

    #[test]
    fn contiguous_runs_are_aligned_live_zeroed_and_freed_whole() {
        let mem = ModelMemory::new();
        let single = mem.alloc_page().unwrap();
        mem.write_u64(single, 7);
        let run = mem.alloc_contiguous(16, 0x1_0000).unwrap();
        assert_eq!(run.as_u64() % 0x1_0000, 0, "64 KiB aligned: {run:?}");
        assert_eq!(mem.live_pages(), 17);
        assert_eq!(mem.allocation_count(), 2, "a run is one allocation");
        assert_eq!(mem.contiguous_runs(), [(run, 16)]);
        let last = PhysAddr::new(run.as_u64() + 15 * PAGE_SIZE);
        assert!(mem.is_live(last));
        assert_eq!(mem.read_u64(last), 0, "zeroed");
        mem.write_u64(last, 1);
        // An odd page-aligned request is fine too.
        let small = mem.alloc_contiguous(3, 0).unwrap();
        assert!(small.is_page_aligned());
        assert!(
            small.as_u64() >= run.as_u64() + 16 * PAGE_SIZE,
            "no overlap"
        );
        mem.free_contiguous(run, 16);
        assert!(!mem.is_live(last));
        assert_eq!(mem.live_pages(), 4);
        mem.free_contiguous(small, 3);
        mem.free_page(single);
        assert_eq!(mem.live_pages(), 0);
        assert!(mem.contiguous_runs().is_empty());
    }

    #[test]
    fn contiguous_runs_honour_injection_and_the_length_limit() {
        let mem = ModelMemory::new();
        mem.set_max_contiguous_pages(Some(2));
        assert_eq!(mem.alloc_contiguous(3, 0), Err(DmaAllocError));
        assert_eq!(mem.alloc_contiguous(0, 0), Err(DmaAllocError));
        assert_eq!(mem.alloc_contiguous(1, 3 * PAGE_SIZE), Err(DmaAllocError));
        mem.fail_allocation_after(Some(0));
        assert_eq!(
            mem.alloc_contiguous(2, 0),
            Err(DmaAllocError),
            "injected failure applies to runs"
        );
        let ok = mem.alloc_contiguous(2, 0).unwrap();
        assert_eq!(mem.live_pages(), 2);
        assert_eq!(mem.allocation_count(), 1);
        mem.free_contiguous(ok, 2);
        assert_eq!(mem.live_pages(), 0);
    }

    #[test]
    #[should_panic(expected = "contiguous run")]
    fn freeing_part_of_a_run_is_caught() {
        let mem = ModelMemory::new();
        let run = mem.alloc_contiguous(2, 0).unwrap();
        mem.free_page(PhysAddr::new(run.as_u64() + PAGE_SIZE));
    }

    #[test]
    #[should_panic(expected = "does not match")]
    fn freeing_a_run_with_the_wrong_length_is_caught() {
        let mem = ModelMemory::new();
        let run = mem.alloc_contiguous(2, 0).unwrap();
        mem.free_contiguous(run, 1);
    }

    #[test]
    fn flush_tracking_reports_unflushed_words() {
        let mem = ModelMemory::new();
        mem.set_track_flushes(true);
        let p = mem.alloc_page().unwrap();
        mem.write_u64(p, 1);
        mem.write_u64(PhysAddr::new(p.as_u64() + 64), 2);
        mem.flush_for_device(p, 8);
        assert_eq!(mem.unflushed_words(), [PhysAddr::new(p.as_u64() + 64)]);
    }

    #[test]
    fn u32_access_merges_into_words_and_poke_peek_roundtrip() {
        let mem = ModelMemory::new();
        mem.write_u32(PhysAddr::new(0x1004), 0xaabb_ccdd);
        mem.write_u32(PhysAddr::new(0x1000), 0x1122_3344);
        assert_eq!(mem.read_u64(PhysAddr::new(0x1000)), 0xaabb_ccdd_1122_3344);
        mem.poke(PhysAddr::new(0x2003), b"sluice");
        let mut out = [0u8; 6];
        mem.peek(PhysAddr::new(0x2003), &mut out);
        assert_eq!(&out, b"sluice");
    }

    #[test]
    fn poll_until_times_out_on_model_clock() {
        let clock = ModelClock::new(100);
        let mut polls = 0;
        let r: Result<(), _> = poll_until(&clock, 1_000, || {
            polls += 1;
            None
        });
        let err = r.unwrap_err();
        assert!(err.waited_ns >= 1_000);
        assert!(polls >= 10, "polled {polls} times");
        let ok = poll_until(&clock, 1_000, || Some(7));
        assert_eq!(ok, Ok(7));
    }
}
