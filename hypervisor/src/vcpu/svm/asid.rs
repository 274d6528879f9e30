//! Address-space identifiers (AMD APM vol. 2, 15.16): each VM's TLB
//! entries are tagged with its ASID so that no flush is needed on a
//! world switch. ASID 0 belongs to the host; CPUID Fn8000_000A EBX gives
//! the number of ASIDs (so the guest ones are 1..NASID-1).

use alloc::vec;
use alloc::vec::Vec;

/// Why an ASID could not be allocated or freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsidError {
    /// Every guest ASID is in use.
    Exhausted,
    /// The ASID is the host's, beyond the range, or not allocated.
    NotAllocated(u32),
}

/// Hands out guest ASIDs, lowest free first.
#[derive(Debug, Clone)]
pub struct AsidAllocator {
    /// Number of ASIDs the processor supports, host ASID 0 included.
    count: u32,
    used: Vec<u64>,
}

impl AsidAllocator {
    /// `nasid` from CPUID Fn8000_000A EBX.
    pub fn new(nasid: u32) -> Self {
        Self {
            count: nasid,
            used: vec![0; (nasid as usize).div_ceil(64)],
        }
    }

    fn is_used(&self, asid: u32) -> bool {
        self.used[asid as usize / 64] & (1 << (asid % 64)) != 0
    }

    pub fn allocate(&mut self) -> Result<u32, AsidError> {
        let asid = (1..self.count)
            .find(|&a| !self.is_used(a))
            .ok_or(AsidError::Exhausted)?;
        self.used[asid as usize / 64] |= 1 << (asid % 64);
        Ok(asid)
    }

    pub fn free(&mut self, asid: u32) -> Result<(), AsidError> {
        if asid == 0 || asid >= self.count || !self.is_used(asid) {
            return Err(AsidError::NotAllocated(asid));
        }
        self.used[asid as usize / 64] &= !(1 << (asid % 64));
        Ok(())
    }

    /// Guest ASIDs in use.
    pub fn in_use(&self) -> u32 {
        self.used.iter().map(|w| w.count_ones()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_from_one_and_reuses_freed() {
        let mut a = AsidAllocator::new(4);
        assert_eq!(a.allocate(), Ok(1));
        assert_eq!(a.allocate(), Ok(2));
        assert_eq!(a.allocate(), Ok(3));
        assert_eq!(a.allocate(), Err(AsidError::Exhausted));
        assert_eq!(a.free(2), Ok(()));
        assert_eq!(a.in_use(), 2);
        assert_eq!(a.allocate(), Ok(2));
    }

    #[test]
    fn refuses_bad_frees() {
        let mut a = AsidAllocator::new(130);
        assert_eq!(a.free(0), Err(AsidError::NotAllocated(0)));
        assert_eq!(a.free(5), Err(AsidError::NotAllocated(5)));
        assert_eq!(a.free(130), Err(AsidError::NotAllocated(130)));
        for _ in 0..129 {
            a.allocate().unwrap();
        }
        assert_eq!(a.in_use(), 129);
        assert_eq!(a.allocate(), Err(AsidError::Exhausted));
        assert_eq!(a.free(129), Ok(()));
        assert_eq!(a.free(129), Err(AsidError::NotAllocated(129)));
        // A processor reporting no ASIDs at all has none for guests.
        assert_eq!(AsidAllocator::new(0).allocate(), Err(AsidError::Exhausted));
    }
}
