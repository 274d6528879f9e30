//! How the hypercall layer reaches the memory of the calling VM.

use sluice_hal::PhysAddr;

/// Why a guest-physical access failed. Every variant becomes `EFAULT` at the
/// hypercall boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMemoryError {
    /// Nothing is mapped at this guest-physical address.
    Unmapped { gpa: u64 },
    /// The address is emulated MMIO or a passed-through BAR, not RAM.
    NotRam { gpa: u64 },
    /// The range wraps around the end of the address space.
    Overflow,
}

/// The RAM of one VM, as the hypercall dispatcher sees it.
///
/// The VM layer implements it over the VM's nested page tables; tests use
/// [`crate::testing`]'s model. Implementations must only ever give access to
/// memory the VM owns: that is what keeps a guest from mapping another VM's
/// memory for DMA.
pub trait GuestMemory {
    /// Copies `out.len()` bytes from guest-physical `gpa`. The whole range
    /// must be RAM of the VM (it may cross pages).
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Copies `data` to guest-physical `gpa`, with the same rules as `read`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError>;
    /// The host-physical address of guest RAM at `gpa` and how many bytes
    /// from there are contiguous in host memory (at least one byte). Callers
    /// walk a range by repeated calls.
    fn ram_to_host(&self, gpa: u64) -> Result<(PhysAddr, u64), GuestMemoryError>;
}

/// One piece of guest RAM backing part of a mapping: `length` bytes at host
/// `phys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostChunk {
    pub phys: PhysAddr,
    pub length: u64,
}

/// Translates `[gpa, gpa + length)` into host chunks (merging physically
/// contiguous pieces). Fails without side effects if any byte is not RAM.
pub fn translate_range(
    mem: &dyn GuestMemory,
    gpa: u64,
    length: u64,
) -> Result<alloc::vec::Vec<HostChunk>, GuestMemoryError> {
    let mut chunks: alloc::vec::Vec<HostChunk> = alloc::vec::Vec::new();
    let mut done = 0u64;
    while done < length {
        let at = gpa.checked_add(done).ok_or(GuestMemoryError::Overflow)?;
        let (phys, contiguous) = mem.ram_to_host(at)?;
        if contiguous == 0 {
            return Err(GuestMemoryError::NotRam { gpa: at });
        }
        let take = contiguous.min(length - done);
        match chunks.last_mut() {
            Some(last) if last.phys.checked_add(last.length) == Some(phys) => last.length += take,
            _ => chunks.push(HostChunk { phys, length: take }),
        }
        done += take;
    }
    Ok(chunks)
}
