//! LPI INTIDs and the allocator Sluice hands them out from (Arm IHI 0069,
//! 5.1 "LPIs": LPI INTIDs start at 8192; how many exist is set by the
//! IDbits of GICR_PROPBASER, at most GICD_TYPER.IDbits + 1 bits).

use alloc::collections::BTreeSet;
use core::fmt;

/// An LPI INTID (8192 or above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lpi(u32);

impl Lpi {
    /// The first LPI INTID (5.1).
    pub const FIRST_INTID: u32 = 8192;
    /// Fewest INTID bits a system with LPIs has (GICR_PROPBASER.IDbits
    /// below 13 is reserved: 14 bits cover INTIDs up to 16383).
    pub const MIN_ID_BITS: u32 = 14;

    /// `intid` as an LPI, or `None` below 8192.
    pub const fn new(intid: u32) -> Option<Self> {
        if intid >= Self::FIRST_INTID {
            Some(Self(intid))
        } else {
            None
        }
    }
    pub const fn intid(self) -> u32 {
        self.0
    }
    /// Index into the LPI configuration table (which starts at 8192).
    pub const fn config_index(self) -> u64 {
        (self.0 - Self::FIRST_INTID) as u64
    }
}

impl fmt::Display for Lpi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LPI {}", self.0)
    }
}

/// LPI allocation failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LpiError {
    /// INTID bits must be 14..=32.
    IdBitsOutOfRange(u32),
    /// Every LPI is allocated.
    Exhausted,
    /// The LPI was not allocated here.
    NotAllocated(Lpi),
}

impl fmt::Display for LpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IdBitsOutOfRange(bits) => {
                write!(f, "{bits} INTID bits: LPIs need 14 to 32")
            }
            Self::Exhausted => f.write_str("every LPI is allocated"),
            Self::NotAllocated(lpi) => write!(f, "{lpi} is not allocated"),
        }
    }
}

/// Hands out LPI INTIDs in `8192..2^id_bits`, next-fit so a freed LPI is
/// not immediately reused (a late MSI for the old owner then finds it
/// unmapped rather than someone else's).
#[derive(Debug, Clone)]
pub struct LpiAllocator {
    id_bits: u32,
    allocated: BTreeSet<u32>,
    next: u32,
}

impl LpiAllocator {
    /// LPIs of `id_bits`-bit INTIDs (the IDbits + 1 programmed into
    /// GICR_PROPBASER).
    pub fn new(id_bits: u32) -> Result<Self, LpiError> {
        if !(Lpi::MIN_ID_BITS..=32).contains(&id_bits) {
            return Err(LpiError::IdBitsOutOfRange(id_bits));
        }
        Ok(Self {
            id_bits,
            allocated: BTreeSet::new(),
            next: Lpi::FIRST_INTID,
        })
    }

    pub const fn id_bits(&self) -> u32 {
        self.id_bits
    }

    /// INTIDs at or above this are not LPIs of this system.
    pub const fn limit(&self) -> u64 {
        1u64 << self.id_bits
    }

    /// How many LPIs exist.
    pub const fn capacity(&self) -> u64 {
        self.limit() - Lpi::FIRST_INTID as u64
    }

    pub fn allocated(&self) -> usize {
        self.allocated.len()
    }

    pub fn is_allocated(&self, lpi: Lpi) -> bool {
        self.allocated.contains(&lpi.intid())
    }

    /// Whether `lpi` exists in this system.
    pub const fn contains(&self, lpi: Lpi) -> bool {
        (lpi.intid() as u64) < self.limit()
    }

    pub fn alloc(&mut self) -> Result<Lpi, LpiError> {
        if self.allocated.len() as u64 >= self.capacity() {
            return Err(LpiError::Exhausted);
        }
        let limit = self.limit();
        let mut candidate = self.next;
        // At least one is free, so this ends within one lap.
        while self.allocated.contains(&candidate) {
            candidate = if u64::from(candidate) + 1 >= limit {
                Lpi::FIRST_INTID
            } else {
                candidate + 1
            };
        }
        self.allocated.insert(candidate);
        self.next = if u64::from(candidate) + 1 >= limit {
            Lpi::FIRST_INTID
        } else {
            candidate + 1
        };
        Ok(Lpi(candidate))
    }

    pub fn free(&mut self, lpi: Lpi) -> Result<(), LpiError> {
        if self.allocated.remove(&lpi.intid()) {
            Ok(())
        } else {
            Err(LpiError::NotAllocated(lpi))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpis_start_at_8192() {
        assert_eq!(Lpi::new(8191), None);
        assert_eq!(Lpi::new(8192).map(Lpi::intid), Some(8192));
        assert_eq!(Lpi::new(8200).unwrap().config_index(), 8);
    }

    #[test]
    fn allocator_covers_exactly_the_range_and_refuses_bad_bits() {
        assert_eq!(
            LpiAllocator::new(13).unwrap_err(),
            LpiError::IdBitsOutOfRange(13)
        );
        assert!(LpiAllocator::new(33).is_err());
        let mut a = LpiAllocator::new(14).unwrap();
        assert_eq!(a.capacity(), 8192);
        let mut seen = BTreeSet::new();
        for _ in 0..8192 {
            let lpi = a.alloc().unwrap();
            assert!((8192..16384).contains(&lpi.intid()), "{lpi}");
            assert!(seen.insert(lpi), "{lpi} handed out twice");
        }
        assert_eq!(a.alloc(), Err(LpiError::Exhausted));
        let some = Lpi::new(9000).unwrap();
        a.free(some).unwrap();
        assert_eq!(a.free(some), Err(LpiError::NotAllocated(some)));
        assert_eq!(a.alloc(), Ok(some), "the only free one");
        assert!(a.contains(Lpi::new(16383).unwrap()));
        assert!(!a.contains(Lpi::new(16384).unwrap()));
    }

    #[test]
    fn freed_lpis_are_not_reused_first() {
        let mut a = LpiAllocator::new(16).unwrap();
        let first = a.alloc().unwrap();
        a.free(first).unwrap();
        let second = a.alloc().unwrap();
        assert_ne!(first, second, "next-fit");
        assert_eq!(a.allocated(), 1);
        assert!(a.is_allocated(second) && !a.is_allocated(first));
    }
}
