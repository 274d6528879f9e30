//! Guest RAM: guest-physical regions backed by host frames.
//!
//! * Frames come from a [`FrameSource`] (the kernel's frame allocator on
//!   bare metal, [`ModelFrames`] in host tests), in 2 MiB chunks where the
//!   guest address allows (so the nested tables can use large pages),
//!   else in 4 KiB frames.
//! * Every frame is zeroed before the guest can see it, and again when
//!   the RAM is released: a guest never reads what the host or another
//!   guest left behind.
//! * [`GuestRam`] implements the iommufd [`GuestMemory`] trait: accesses
//!   may cross pages and chunks, must be wholly RAM (an MMIO window or a
//!   hole is an error, checked before anything is copied) and never wrap.
//!
//! The guest-physical layout of x86 VMs is in [`layout`].

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;

use sluice_hal::{PAGE_SIZE, PhysAddr};

use crate::iommufd::{GuestMemory, GuestMemoryError};

/// The guest-physical address map of an x86 VM.
///
/// ```text
/// 0x0000_0000 - min(mem, 3 GiB)   RAM
/// 0xC000_0000 - 0xDFFF_FFFF       passed-through BARs (placed by Sluice)
/// 0xE000_0000 - 0xE00F_FFFF       ECAM of guest bus 0 (trapped)
/// 0xFEE0_0000 - 0xFEEF_FFFF       MSI window (never RAM, never mapped)
/// 0x1_0000_0000 -                 RAM beyond the first 3 GiB
/// ```
pub mod layout {
    /// RAM below 4 GiB ends here at the latest.
    pub const LOW_RAM_LIMIT: u64 = 0xc000_0000;
    /// RAM beyond [`LOW_RAM_LIMIT`] continues here.
    pub const HIGH_RAM_BASE: u64 = 0x1_0000_0000;
    /// Where Sluice places the guest's view of passed-through BARs.
    pub const BAR_WINDOW_BASE: u64 = 0xc000_0000;
    pub const BAR_WINDOW_SIZE: u64 = 0x2000_0000;
    /// The trapped ECAM window: bus 0 only (32 devices × 8 functions ×
    /// 4 KiB).
    pub const ECAM_BASE: u64 = 0xe000_0000;
    pub const ECAM_SIZE: u64 = 1 << 20;

    /// RAM regions `(gpa, length)` for `memory` bytes.
    pub fn x86_ram_regions(memory: u64) -> alloc::vec::Vec<(u64, u64)> {
        let low = memory.min(LOW_RAM_LIMIT);
        let mut regions = alloc::vec![(0, low)];
        if memory > low {
            regions.push((HIGH_RAM_BASE, memory - low));
        }
        regions.retain(|&(_, len)| len > 0);
        regions
    }
}

/// Size of the chunks guest RAM is allocated in when possible.
pub const LARGE_CHUNK: u64 = 2 << 20;

/// Why host frames could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameError;

/// Physical memory for guests.
///
/// Reads and writes stay inside one allocation; implementations may
/// assume so.
pub trait FrameSource {
    /// `frames` physically contiguous 4 KiB frames, aligned to `align`
    /// bytes (a power of two ≥ 4 KiB). Their contents are whatever the
    /// previous owner left.
    fn allocate(&self, frames: u64, align: u64) -> Result<PhysAddr, FrameError>;
    /// Gives back frames obtained from [`FrameSource::allocate`].
    fn free(&self, base: PhysAddr, frames: u64);
    fn read(&self, phys: PhysAddr, out: &mut [u8]);
    fn write(&self, phys: PhysAddr, data: &[u8]);
    fn zero(&self, phys: PhysAddr, len: u64);
}

impl<S: FrameSource + ?Sized> FrameSource for &S {
    fn allocate(&self, frames: u64, align: u64) -> Result<PhysAddr, FrameError> {
        (**self).allocate(frames, align)
    }
    fn free(&self, base: PhysAddr, frames: u64) {
        (**self).free(base, frames)
    }
    fn read(&self, phys: PhysAddr, out: &mut [u8]) {
        (**self).read(phys, out)
    }
    fn write(&self, phys: PhysAddr, data: &[u8]) {
        (**self).write(phys, data)
    }
    fn zero(&self, phys: PhysAddr, len: u64) {
        (**self).zero(phys, len)
    }
}

/// Why guest RAM could not be set up. Nothing stays allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryError {
    /// A region's address or length is not 4 KiB aligned, or it is empty.
    Misaligned { gpa: u64, length: u64 },
    /// `gpa + length` wraps.
    Overflow { gpa: u64 },
    /// Two regions (RAM or MMIO) overlap.
    Overlap { gpa: u64 },
    /// The host ran out of frames after `allocated` bytes of `wanted`.
    OutOfMemory { wanted: u64, allocated: u64 },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned { gpa, length } => write!(
                f,
                "guest region {gpa:#x}+{length:#x} is empty or not 4 KiB aligned"
            ),
            Self::Overflow { gpa } => write!(f, "guest region at {gpa:#x} wraps around"),
            Self::Overlap { gpa } => write!(f, "guest regions overlap at {gpa:#x}"),
            Self::OutOfMemory { wanted, allocated } => write!(
                f,
                "out of host memory: {} KiB of {} KiB allocated",
                allocated >> 10,
                wanted >> 10
            ),
        }
    }
}

/// A piece of guest RAM backed by contiguous host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamChunk {
    pub gpa: u64,
    pub host: PhysAddr,
    pub length: u64,
}

impl RamChunk {
    fn end(&self) -> u64 {
        self.gpa + self.length
    }
}

/// The RAM of one VM.
pub struct GuestRam<S: FrameSource> {
    source: S,
    /// Sorted by `gpa`, not overlapping.
    chunks: Vec<RamChunk>,
    /// As allocated (for freeing): (host base, frames).
    allocations: Vec<(PhysAddr, u64)>,
    regions: Vec<(u64, u64)>,
    mmio: Vec<(u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl<S: FrameSource> GuestRam<S> {
    /// RAM for `regions` (`(gpa, length)`, 4 KiB aligned), allocated and
    /// zeroed. On failure everything allocated so far is freed.
    pub fn new(source: S, regions: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let mut sorted: Vec<(u64, u64)> = Vec::new();
        for &(gpa, length) in regions {
            if length == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !length.is_multiple_of(PAGE_SIZE) {
                return Err(MemoryError::Misaligned { gpa, length });
            }
            gpa.checked_add(length)
                .ok_or(MemoryError::Overflow { gpa })?;
            if let Some(&(o, _)) = sorted.iter().find(|&&r| overlaps(r, (gpa, length))) {
                return Err(MemoryError::Overlap { gpa: gpa.max(o) });
            }
            sorted.push((gpa, length));
        }
        sorted.sort_unstable();
        let mut ram = Self {
            source,
            chunks: Vec::new(),
            allocations: Vec::new(),
            regions: sorted.clone(),
            mmio: Vec::new(),
        };
        let wanted: u64 = sorted.iter().map(|r| r.1).sum();
        let mut allocated = 0u64;
        for (gpa, length) in sorted {
            let mut at = gpa;
            let end = gpa + length;
            while at < end {
                let large = at.is_multiple_of(LARGE_CHUNK) && end - at >= LARGE_CHUNK;
                let got = if large {
                    ram.source
                        .allocate(LARGE_CHUNK / PAGE_SIZE, LARGE_CHUNK)
                        .map(|h| (h, LARGE_CHUNK))
                        .or_else(|_| ram.source.allocate(1, PAGE_SIZE).map(|h| (h, PAGE_SIZE)))
                } else {
                    ram.source.allocate(1, PAGE_SIZE).map(|h| (h, PAGE_SIZE))
                };
                let Ok((host, len)) = got else {
                    ram.free_all();
                    return Err(MemoryError::OutOfMemory { wanted, allocated });
                };
                ram.source.zero(host, len);
                ram.allocations.push((host, len / PAGE_SIZE));
                ram.push_chunk(RamChunk {
                    gpa: at,
                    host,
                    length: len,
                });
                at += len;
                allocated += len;
            }
        }
        Ok(ram)
    }

    /// Appends a chunk, merging it into the previous one when both guest
    /// and host addresses continue.
    fn push_chunk(&mut self, chunk: RamChunk) {
        if let Some(last) = self.chunks.last_mut()
            && last.end() == chunk.gpa
            && last.host.checked_add(last.length) == Some(chunk.host)
        {
            last.length += chunk.length;
            return;
        }
        self.chunks.push(chunk);
    }

    fn free_all(&mut self) {
        for &(host, frames) in &self.allocations {
            self.source.zero(host, frames * PAGE_SIZE);
            self.source.free(host, frames);
        }
        self.allocations.clear();
        self.chunks.clear();
    }

    /// Declares `[gpa, gpa + length)` an MMIO window: accesses there are
    /// [`GuestMemoryError::NotRam`], not `Unmapped`.
    pub fn add_mmio(&mut self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        gpa.checked_add(length)
            .ok_or(MemoryError::Overflow { gpa })?;
        if length == 0 {
            return Err(MemoryError::Misaligned { gpa, length });
        }
        if self
            .regions
            .iter()
            .chain(&self.mmio)
            .any(|&r| overlaps(r, (gpa, length)))
        {
            return Err(MemoryError::Overlap { gpa });
        }
        self.mmio.push((gpa, length));
        Ok(())
    }

    /// The RAM regions `(gpa, length)`, sorted.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    pub fn mmio_windows(&self) -> &[(u64, u64)] {
        &self.mmio
    }

    /// Host backing, sorted by guest address (for the nested tables).
    pub fn chunks(&self) -> &[RamChunk] {
        &self.chunks
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Zeroes and frees every frame. Call only once no nested table or
    /// IOMMU domain maps the RAM any more.
    pub fn release(mut self) {
        self.free_all();
    }

    fn chunk_of(&self, gpa: u64) -> Result<&RamChunk, GuestMemoryError> {
        let i = self.chunks.partition_point(|c| c.end() <= gpa);
        match self.chunks.get(i) {
            Some(c) if c.gpa <= gpa => Ok(c),
            _ => {
                if self.mmio.iter().any(|&(s, l)| gpa >= s && gpa - s < l) {
                    Err(GuestMemoryError::NotRam { gpa })
                } else {
                    Err(GuestMemoryError::Unmapped { gpa })
                }
            }
        }
    }

    /// Calls `f(host, offset_in_buffer, len)` for each piece of
    /// `[gpa, gpa + len)` after checking that all of it is RAM.
    fn walk(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(PhysAddr, usize, usize),
    ) -> Result<(), GuestMemoryError> {
        gpa.checked_add(len as u64)
            .ok_or(GuestMemoryError::Overflow)?;
        let mut pieces: Vec<(PhysAddr, usize, usize)> = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let c = self.chunk_of(at)?;
            let offset = at - c.gpa;
            let n = ((c.length - offset).min((len - done) as u64)) as usize;
            pieces.push((PhysAddr::new(c.host.as_u64() + offset), done, n));
            done += n;
        }
        for (host, at, n) in pieces {
            f(host, at, n);
        }
        Ok(())
    }
}

impl<S: FrameSource> Drop for GuestRam<S> {
    fn drop(&mut self) {
        if !self.allocations.is_empty() {
            // The frames may still be mapped for DMA: leaking them is the
            // safe choice.
            log::error!(
                "guest RAM dropped without release: {} KiB of host frames leaked",
                self.allocations.iter().map(|a| a.1).sum::<u64>() * 4
            );
        }
    }
}

impl<S: FrameSource> GuestMemory for GuestRam<S> {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.walk(gpa, out.len(), |host, at, n| {
            self.source.read(host, &mut out[at..at + n])
        })
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.walk(gpa, data.len(), |host, at, n| {
            self.source.write(host, &data[at..at + n])
        })
    }

    fn ram_to_host(&self, gpa: u64) -> Result<(PhysAddr, u64), GuestMemoryError> {
        let c = self.chunk_of(gpa)?;
        let offset = gpa - c.gpa;
        Ok((PhysAddr::new(c.host.as_u64() + offset), c.length - offset))
    }
}

/// A host model of physical memory for tests of guest RAM.
///
/// * Frames come from a bump pointer starting at [`ModelFrames::BASE`];
///   freed frames are not reused, so a use after free is visible.
/// * A frame never written since allocation reads as [`POISON`]: what a
///   previous owner might have left. Tests check that guests never see it.
/// * [`ModelFrames::refuse_large`] makes multi-frame requests fail (to
///   exercise the 4 KiB fallback); [`ModelFrames::limit_frames`] caps the
///   total.
/// * Touching a frame that is not allocated panics: that is a bug in the
///   code under test, not a guest error.
pub struct ModelFrames {
    pages: RefCell<BTreeMap<u64, Box<[u8; 4096]>>>,
    /// Allocated frame numbers.
    live: RefCell<BTreeMap<u64, ()>>,
    next: Cell<u64>,
    refuse_large: Cell<bool>,
    limit: Cell<Option<u64>>,
    zeroed: Cell<u64>,
}

/// What [`ModelFrames`] memory holds before anyone writes it.
pub const POISON: u8 = 0xa5;

impl Default for ModelFrames {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelFrames {
    pub const BASE: u64 = 0x4000_0000;

    pub fn new() -> Self {
        Self {
            pages: RefCell::new(BTreeMap::new()),
            live: RefCell::new(BTreeMap::new()),
            next: Cell::new(Self::BASE),
            refuse_large: Cell::new(false),
            limit: Cell::new(None),
            zeroed: Cell::new(0),
        }
    }

    pub fn refuse_large(&self, on: bool) {
        self.refuse_large.set(on);
    }

    /// At most `frames` frames live at once (`None`: unlimited).
    pub fn limit_frames(&self, frames: Option<u64>) {
        self.limit.set(frames);
    }

    pub fn live_frames(&self) -> u64 {
        self.live.borrow().len() as u64
    }

    pub fn is_live(&self, phys: PhysAddr) -> bool {
        self.live
            .borrow()
            .contains_key(&(phys.as_u64() / PAGE_SIZE))
    }

    /// Bytes zeroed through [`FrameSource::zero`] so far.
    pub fn zeroed_bytes(&self) -> u64 {
        self.zeroed.get()
    }

    fn check_live(&self, phys: u64, len: usize) {
        let live = self.live.borrow();
        let first = phys / PAGE_SIZE;
        let last = (phys + len.max(1) as u64 - 1) / PAGE_SIZE;
        for frame in first..=last {
            assert!(
                live.contains_key(&frame),
                "access to frame {:#x} that is not allocated",
                frame * PAGE_SIZE
            );
        }
    }
}

impl FrameSource for ModelFrames {
    fn allocate(&self, frames: u64, align: u64) -> Result<PhysAddr, FrameError> {
        if frames == 0 || (frames > 1 && self.refuse_large.get()) {
            return Err(FrameError);
        }
        if let Some(limit) = self.limit.get()
            && self.live_frames() + frames > limit
        {
            return Err(FrameError);
        }
        let align = align.max(PAGE_SIZE);
        let base = self.next.get().next_multiple_of(align);
        self.next.set(base + frames * PAGE_SIZE);
        let mut live = self.live.borrow_mut();
        for f in 0..frames {
            live.insert(base / PAGE_SIZE + f, ());
            // Fresh frames hold a previous owner's data.
            self.pages.borrow_mut().remove(&(base / PAGE_SIZE + f));
        }
        Ok(PhysAddr::new(base))
    }

    fn free(&self, base: PhysAddr, frames: u64) {
        let mut live = self.live.borrow_mut();
        for f in 0..frames {
            assert!(
                live.remove(&(base.as_u64() / PAGE_SIZE + f)).is_some(),
                "double free of frame {:#x}",
                base.as_u64() + f * PAGE_SIZE
            );
        }
    }

    fn read(&self, phys: PhysAddr, out: &mut [u8]) {
        self.check_live(phys.as_u64(), out.len());
        let pages = self.pages.borrow();
        let mut done = 0usize;
        while done < out.len() {
            let a = phys.as_u64() + done as u64;
            let from = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - from).min(out.len() - done);
            match pages.get(&(a / PAGE_SIZE)) {
                Some(p) => out[done..done + n].copy_from_slice(&p[from..from + n]),
                None => out[done..done + n].fill(POISON),
            }
            done += n;
        }
    }

    fn write(&self, phys: PhysAddr, data: &[u8]) {
        self.check_live(phys.as_u64(), data.len());
        let mut pages = self.pages.borrow_mut();
        let mut done = 0usize;
        while done < data.len() {
            let a = phys.as_u64() + done as u64;
            let from = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - from).min(data.len() - done);
            pages
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| Box::new([POISON; 4096]))[from..from + n]
                .copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn zero(&self, phys: PhysAddr, len: u64) {
        self.check_live(phys.as_u64(), len as usize);
        self.zeroed.set(self.zeroed.get() + len);
        let mut pages = self.pages.borrow_mut();
        let mut a = phys.as_u64();
        let end = a + len;
        while a < end {
            let page = pages
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| Box::new([POISON; 4096]));
            let from = (a % PAGE_SIZE) as usize;
            let n = ((PAGE_SIZE - a % PAGE_SIZE).min(end - a)) as usize;
            page[from..from + n].fill(0);
            a += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_pci_hole() {
        assert_eq!(layout::x86_ram_regions(64 << 20), [(0, 64 << 20)]);
        assert_eq!(
            layout::x86_ram_regions(4 << 30),
            [(0, 3 << 30), (layout::HIGH_RAM_BASE, 1 << 30)]
        );
        assert_eq!(layout::x86_ram_regions(3 << 30), [(0, 3 << 30)]);
        let ecam = (layout::ECAM_BASE, layout::ECAM_SIZE);
        assert!(!overlaps(
            ecam,
            (layout::BAR_WINDOW_BASE, layout::BAR_WINDOW_SIZE)
        ));
        assert!(layout::ECAM_BASE + layout::ECAM_SIZE <= crate::iommufd::X86_MSI_WINDOW.0);
    }

    #[test]
    fn region_checks() {
        let f = ModelFrames::new();
        assert_eq!(
            GuestRam::new(&f, &[(0x800, 0x1000)]).err(),
            Some(MemoryError::Misaligned {
                gpa: 0x800,
                length: 0x1000
            })
        );
        assert_eq!(
            GuestRam::new(&f, &[(0, 0)]).err(),
            Some(MemoryError::Misaligned { gpa: 0, length: 0 })
        );
        assert_eq!(
            GuestRam::new(&f, &[(u64::MAX - 0xfff, 0x2000)]).err(),
            Some(MemoryError::Overflow {
                gpa: u64::MAX - 0xfff
            })
        );
        assert_eq!(
            GuestRam::new(&f, &[(0, 0x4000), (0x3000, 0x1000)]).err(),
            Some(MemoryError::Overlap { gpa: 0x3000 })
        );
        assert_eq!(f.live_frames(), 0);
    }
}
