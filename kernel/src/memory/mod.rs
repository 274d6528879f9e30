//! Physical memory: the frame allocator and the hypervisor heap.

pub mod frame;
#[cfg(target_os = "uefi")]
pub mod heap;
