//! IO page-table engine throughput, VT-d second-level 4-level tables.
//!
//! `cargo bench -p sluice-iommu --bench pagetable` prints, for each
//! scenario, the best of several runs in ns per page and as a ratio to a
//! plain loop writing the same number of 8-byte entries into a `Vec` (the
//! floor for any table writer), plus table memory per GiB mapped. Figures
//! only: nothing here asserts on time.

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::time::{Duration, Instant};

use sluice_hal::{DmaAllocError, DmaMemory, PAGE_SIZE, PhysAddr};
use sluice_iommu::pagetable::vtd::{VtdSecondLevel, VtdSlAttrs};
use sluice_iommu::pagetable::{IoPageTable, MapPerms, PageSize, TableConfig};

const K4: u64 = 4 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// Page-granular memory backed by one preallocated slice, with a free list:
/// as cheap as table memory gets, so the figures measure the engine.
struct Arena {
    base: u64,
    words: Box<[Cell<u64>]>,
    next: Cell<usize>,
    free: RefCell<Vec<usize>>,
}

impl Arena {
    fn new(pages: usize) -> Self {
        Self {
            base: 0x10_0000_0000,
            words: (0..pages * WORDS_PER_PAGE).map(|_| Cell::new(0)).collect(),
            next: Cell::new(0),
            free: RefCell::new(Vec::new()),
        }
    }

    fn word(&self, addr: PhysAddr) -> &Cell<u64> {
        &self.words[((addr.as_u64() - self.base) / 8) as usize]
    }
}

impl DmaMemory for Arena {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        let page = match self.free.borrow_mut().pop() {
            Some(page) => page,
            None => {
                let page = self.next.get();
                if (page + 1) * WORDS_PER_PAGE > self.words.len() {
                    return Err(DmaAllocError);
                }
                self.next.set(page + 1);
                page
            }
        };
        let words = &self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE];
        for w in words {
            w.set(0);
        }
        Ok(PhysAddr::new(self.base + page as u64 * PAGE_SIZE))
    }
    fn free_page(&self, page: PhysAddr) {
        let index = ((page.as_u64() - self.base) / PAGE_SIZE) as usize;
        self.free.borrow_mut().push(index);
    }
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        self.word(addr).get()
    }
    fn write_u64(&self, addr: PhysAddr, value: u64) {
        self.word(addr).set(value)
    }
    fn flush_for_device(&self, _addr: PhysAddr, _len: u64) {}
}

fn best_of(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

/// Time to write `entries` 8-byte entries into a `Vec`.
fn vec_bound(entries: usize, runs: usize) -> Duration {
    let mut v = vec![0u64; entries];
    best_of(runs, || {
        let start = Instant::now();
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = black_box(0x2_0000_0000 + i as u64 * K4) | 3;
        }
        black_box(&v);
        start.elapsed()
    })
}

struct Figures {
    map: Duration,
    unmap: Duration,
    table_bytes: usize,
}

/// Maps and unmaps with `calls` map calls of `len` bytes each, starting
/// at `iova` with `stride` between calls, then one unmap call per map call.
fn scenario(
    mem: &Arena,
    max: PageSize,
    calls: u64,
    len: u64,
    stride: u64,
    phys_offset: u64,
    runs: usize,
) -> Figures {
    let format = VtdSecondLevel::new(4, 48, 46).expect("valid format");
    let mut pt: IoPageTable<'_, VtdSecondLevel, Arena> =
        IoPageTable::new(mem, format, TableConfig::new(max, true)).expect("root");
    let attrs = VtdSlAttrs {
        snoop: true,
        ..VtdSlAttrs::default()
    };
    let iova0 = 4 * G1;
    let mut table_bytes = 0;
    let mut best_map = Duration::MAX;
    let mut best_unmap = Duration::MAX;
    for _ in 0..runs {
        let start = Instant::now();
        for i in 0..calls {
            let iova = iova0 + i * stride;
            let phys = PhysAddr::new(8 * G1 + phys_offset + i * stride);
            let inv = pt
                .map(iova, phys, len, MapPerms::READ_WRITE, attrs)
                .expect("map");
            inv.complete(mem);
        }
        best_map = best_map.min(start.elapsed());
        table_bytes = pt.table_pages() * PAGE_SIZE as usize;
        let start = Instant::now();
        for i in 0..calls {
            let inv = pt.unmap(iova0 + i * stride, len).expect("unmap");
            black_box(inv.ranges());
            inv.complete(mem);
        }
        best_unmap = best_unmap.min(start.elapsed());
    }
    pt.destroy().release(mem);
    Figures {
        map: best_map,
        unmap: best_unmap,
        table_bytes,
    }
}

fn report(name: &str, pages: u64, entries: usize, figures: &Figures, runs: usize) {
    let bound = vec_bound(entries, runs.max(5));
    let per = |d: Duration| d.as_nanos() as f64 / pages as f64;
    let ratio = |d: Duration| d.as_nanos() as f64 / bound.as_nanos().max(1) as f64;
    println!("{name}");
    println!(
        "  map   {:>10.2} ms  {:>8.2} ns/page  {:>7.1}x the Vec bound",
        figures.map.as_secs_f64() * 1e3,
        per(figures.map),
        ratio(figures.map)
    );
    println!(
        "  unmap {:>10.2} ms  {:>8.2} ns/page  {:>7.1}x the Vec bound",
        figures.unmap.as_secs_f64() * 1e3,
        per(figures.unmap),
        ratio(figures.unmap)
    );
    println!(
        "  Vec bound: {entries} entries in {:.3} ms ({:.2} ns/entry); tables while mapped: {} KiB",
        bound.as_secs_f64() * 1e3,
        bound.as_nanos() as f64 / entries as f64,
        figures.table_bytes / 1024
    );
}

fn main() {
    // 1 GiB of 4 KiB leaves needs 512 leaf tables plus the upper levels.
    let mem = Arena::new(1024);
    println!("VT-d second level, 4 levels (48-bit), coherent walker; best of several runs");
    println!("(ns/page: per 4 KiB page for 4 KiB leaves, per 2 MiB leaf for 2 MiB leaves)\n");

    let runs = 5;
    let pages_4k = G1 / K4;
    // phys offset by 4 KiB against the IOVA: no superpage can be used.
    let f = scenario(&mem, PageSize::Size1G, 1, G1, 0, K4, runs);
    report(
        "1 GiB as 4 KiB pages, one call",
        pages_4k,
        pages_4k as usize,
        &f,
        runs,
    );
    println!(
        "  page-table bytes per GiB mapped with 4 KiB pages: {} ({:.2} MiB)\n",
        f.table_bytes,
        f.table_bytes as f64 / (1 << 20) as f64
    );

    let f = scenario(&mem, PageSize::Size2M, 1, G1, 0, 0, runs * 20);
    report("1 GiB as 2 MiB pages, one call", 512, 512, &f, runs * 20);
    println!(
        "  page-table bytes per GiB mapped with 2 MiB pages: {} ({:.1} KiB)\n",
        f.table_bytes,
        f.table_bytes as f64 / 1024.0
    );

    let f = scenario(&mem, PageSize::Size1G, 1024, 256 * K4, 256 * K4, K4, runs);
    report(
        "1 GiB as 1024 calls of 256 x 4 KiB (1 MiB) ranges",
        pages_4k,
        pages_4k as usize,
        &f,
        runs,
    );
    println!();

    let f = scenario(&mem, PageSize::Size1G, 256, K4, K4, 0, runs * 20);
    report(
        "256 separate 4 KiB ranges (one call each, adjacent IOVAs)",
        256,
        256,
        &f,
        runs * 20,
    );
    println!();

    let f = scenario(&mem, PageSize::Size1G, 256, K4, M2 + K4, 0, runs * 20);
    report(
        "256 separate 4 KiB ranges, scattered (2 MiB + 4 KiB apart: a leaf table each)",
        256,
        256,
        &f,
        runs * 20,
    );
}
