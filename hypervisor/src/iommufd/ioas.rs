//! IO address spaces: the guest's mappings, its allowed ranges and the
//! reserved ranges of whatever is attached, kept independent of any IOMMU
//! domain. Every function here checks; none changes hardware.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::Error;
use super::backend::Prot;
use super::guest_memory::HostChunk;

/// Inclusive IOVA range.
pub type Span = (u64, u64);

/// One `IOAS_MAP` or `IOAS_COPY` result: `length` bytes at `iova`, backed by
/// `chunks` in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Area {
    pub iova: u64,
    pub length: u64,
    pub prot: Prot,
    pub chunks: Vec<HostChunk>,
}

impl Area {
    pub fn last(&self) -> u64 {
        self.iova + (self.length - 1)
    }
}

/// Who reserved an IOVA range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReserveOwner {
    /// The part of the IOVA space a HWPT's domain cannot translate.
    Hwpt(u32),
    /// MSI window and RMRRs of an attached device (or of a PASID attachment).
    Device { dev_id: u32, pasid: Option<u32> },
    /// The software-managed MSI window of a HWPT with doorbell pages mapped
    /// in it: kept while the pages are, after every device detached.
    MsiPages(u32),
}

#[derive(Debug, Default)]
pub struct Ioas {
    /// Keyed by first IOVA; never overlapping.
    pub areas: BTreeMap<u64, Area>,
    /// `IOAS_ALLOW_IOVAS` ranges, sorted, not overlapping.
    pub allowed: Vec<Span>,
    pub reserved: BTreeMap<ReserveOwner, Vec<Span>>,
    /// HWPTs built on this IOAS, with the smallest page size of their domain.
    pub hwpts: BTreeMap<u32, u64>,
    /// `OPTION HUGE_PAGES` (on by default, as in iommufd).
    pub large_pages: bool,
}

fn overlaps(a: Span, b: Span) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Sorted union of spans.
pub fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if s.0 <= last.1.saturating_add(1) => last.1 = last.1.max(s.1),
            _ => out.push(s),
        }
    }
    out
}

/// `[0, u64::MAX]` minus the sorted, merged `holes`.
pub fn complement(holes: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut next = Some(0u64);
    for &(start, last) in holes {
        if let Some(n) = next
            && start > n
        {
            out.push((n, start - 1));
        }
        next = last.checked_add(1);
    }
    if let Some(n) = next {
        out.push((n, u64::MAX));
    }
    out
}

impl Ioas {
    pub fn new() -> Self {
        Self {
            large_pages: true,
            ..Self::default()
        }
    }

    /// IOVA alignment: the largest of the smallest page sizes of the domains
    /// (at least 4 KiB, the granule of guest memory).
    pub fn iova_alignment(&self) -> u64 {
        self.hwpts
            .values()
            .copied()
            .fold(sluice_hal::PAGE_SIZE, u64::max)
    }

    pub fn reserved_spans(&self) -> Vec<Span> {
        merge(self.reserved.values().flatten().copied().collect())
    }

    /// What `IOAS_IOVA_RANGES` reports.
    pub fn usable_ranges(&self) -> Vec<Span> {
        complement(&self.reserved_spans())
    }

    /// Keys of the areas intersecting `span`, in order.
    pub fn areas_in(&self, span: Span) -> Vec<u64> {
        let mut keys = Vec::new();
        if let Some((&k, a)) = self.areas.range(..span.0).next_back()
            && a.last() >= span.0
        {
            keys.push(k);
        }
        keys.extend(self.areas.range(span.0..=span.1).map(|(&k, _)| k));
        keys
    }

    /// Checks a caller-chosen IOVA (iommufd: unaligned or reserved →
    /// `EINVAL`, already mapped → `EEXIST`).
    pub fn check_fixed(&self, iova: u64, length: u64) -> Result<(), Error> {
        if !iova.is_multiple_of(self.iova_alignment()) {
            return Err(Error::Invalid("IOVA is not aligned to the IOAS alignment"));
        }
        let last = iova.checked_add(length - 1).ok_or(Error::Overflow)?;
        if self
            .reserved_spans()
            .iter()
            .any(|&r| overlaps(r, (iova, last)))
        {
            return Err(Error::Invalid("IOVA range intersects a reserved range"));
        }
        if !self.areas_in((iova, last)).is_empty() {
            return Err(Error::AlreadyMapped);
        }
        Ok(())
    }

    /// Picks the lowest free IOVA for `length` bytes: aligned to the IOAS
    /// alignment (and to 2 MiB when large pages are on and the mapping is at
    /// least that big, so the domain can use them), inside the allowed ranges
    /// if there are any, outside reserved ranges and existing mappings.
    pub fn allocate(&self, length: u64) -> Result<u64, Error> {
        const LARGE: u64 = 2 << 20;
        let base = self.iova_alignment();
        let mut alignments = Vec::new();
        if self.large_pages && length >= LARGE && LARGE > base {
            alignments.push(LARGE);
        }
        alignments.push(base);
        let mut busy = self.reserved_spans();
        busy.extend(self.areas.values().map(|a| (a.iova, a.last())));
        let busy = merge(busy);
        let free = complement(&busy);
        let windows: Vec<Span> = if self.allowed.is_empty() {
            alloc::vec![(0, u64::MAX)]
        } else {
            self.allowed.clone()
        };
        for align in alignments {
            for &w in &windows {
                for &f in &free {
                    if !overlaps(w, f) {
                        continue;
                    }
                    let start = w.0.max(f.0);
                    let last = w.1.min(f.1);
                    let Some(aligned) = start.checked_next_multiple_of(align) else {
                        continue;
                    };
                    if let Some(end) = aligned.checked_add(length - 1)
                        && aligned >= start
                        && end <= last
                    {
                        return Ok(aligned);
                    }
                }
            }
        }
        Err(Error::NoIovaSpace)
    }

    /// Whether `spans` could become reserved: none may intersect a mapping or
    /// an allowed range (iommufd: `EADDRINUSE`).
    pub fn check_reservable(&self, spans: &[Span]) -> Result<(), Error> {
        for &s in spans {
            if !self.areas_in(s).is_empty() {
                return Err(Error::AddressInUse("a reserved range is already mapped"));
            }
            if self.allowed.iter().any(|&a| overlaps(a, s)) {
                return Err(Error::AddressInUse(
                    "a reserved range intersects an allowed range",
                ));
            }
        }
        Ok(())
    }

    /// Whether a domain with `min_page` and `aperture_last` can mirror this
    /// IOAS (iommufd: `EADDRINUSE` otherwise).
    pub fn check_domain_fits(&self, min_page: u64, aperture_last: u64) -> Result<(), Error> {
        if self
            .areas
            .values()
            .any(|a| a.iova % min_page != 0 || a.length % min_page != 0)
        {
            return Err(Error::AddressInUse(
                "existing mappings are not aligned to the domain's page size",
            ));
        }
        if aperture_last < u64::MAX {
            self.check_reservable(&[(aperture_last + 1, u64::MAX)])?;
        }
        Ok(())
    }

    /// The host chunks behind `[iova, iova + length)`, which must be fully
    /// mapped (`ENOENT` otherwise), and whether all of it is writable.
    pub fn chunks_for(&self, iova: u64, length: u64) -> Result<(Vec<HostChunk>, bool), Error> {
        let last = iova.checked_add(length - 1).ok_or(Error::Overflow)?;
        let mut out: Vec<HostChunk> = Vec::new();
        let mut writable = true;
        let mut cursor = iova;
        for key in self.areas_in((iova, last)) {
            let area = &self.areas[&key];
            if area.iova > cursor {
                return Err(Error::NotMapped);
            }
            writable &= area.prot.write;
            // Walk the area's chunks, keeping the part inside [cursor, last].
            let mut at = area.iova;
            for c in &area.chunks {
                let c_last = at + (c.length - 1);
                if c_last >= cursor && at <= last {
                    let from = cursor.max(at);
                    let to = last.min(c_last);
                    out.push(HostChunk {
                        phys: sluice_hal::PhysAddr::new(c.phys.as_u64() + (from - at)),
                        length: to - from + 1,
                    });
                }
                at = at.wrapping_add(c.length);
            }
            match area.last().checked_add(1) {
                Some(next) if area.last() < last => cursor = next,
                _ => return Ok((out, writable)),
            }
        }
        Err(Error::NotMapped)
    }

    /// Validates and normalises `IOAS_ALLOW_IOVAS` ranges: each `start <=
    /// last`, none overlapping another (`EINVAL`), none reserved
    /// (`EADDRINUSE`).
    pub fn check_allowed(&self, mut spans: Vec<Span>) -> Result<Vec<Span>, Error> {
        if spans.iter().any(|s| s.0 > s.1) {
            return Err(Error::Invalid("allowed range with start > last"));
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 <= w[0].1) {
            return Err(Error::Invalid("allowed ranges overlap"));
        }
        let reserved = self.reserved_spans();
        if spans
            .iter()
            .any(|&s| reserved.iter().any(|&r| overlaps(r, s)))
        {
            return Err(Error::AddressInUse(
                "allowed range intersects a reserved range",
            ));
        }
        Ok(spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complement_and_merge() {
        assert_eq!(complement(&[]), [(0, u64::MAX)]);
        assert_eq!(
            complement(&merge(alloc::vec![
                (10, 20),
                (15, 30),
                (31, 40),
                (u64::MAX - 1, u64::MAX)
            ])),
            [(0, 9), (41, u64::MAX - 2)]
        );
        assert_eq!(complement(&[(0, u64::MAX)]), []);
    }

    #[test]
    fn allocation_skips_reserved_and_honours_alignment_and_allowed() {
        let mut ioas = Ioas::new();
        ioas.reserved
            .insert(ReserveOwner::Hwpt(1), alloc::vec![(0, 0xfff)]);
        assert_eq!(ioas.allocate(0x1000), Ok(0x1000));
        assert_eq!(ioas.allocate(2 << 20), Ok(2 << 20));
        ioas.allowed = alloc::vec![(0x10_0000, 0x10_1fff)];
        assert_eq!(ioas.allocate(0x2000), Ok(0x10_0000));
        assert_eq!(ioas.allocate(0x3000), Err(Error::NoIovaSpace));
    }
}
