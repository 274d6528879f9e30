//! The hypervisor heap: a fixed region reserved from firmware before boot
//! services exit, managed by a linked-list allocator.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Hands `[start, start + size)` to the global allocator.
///
/// # Safety
/// The range must be RAM that nothing else uses for the rest of Sluice's
/// life, and this must be called once, before the first allocation.
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: the caller guarantees the range is ours and unused.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
}

/// (used, free) bytes.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
