//! Guest-physical addresses and IOVAs the scenarios use. `dma` and
//! `attacker` share them: the attacker aims at the victim's addresses.
//!
//! Every GPA must be free RAM in the start-info memory map (the scenarios
//! check), so VMs need at least [`MIN_RAM`]. Every IOVA is below 256 MiB:
//! edu masks its DMA addresses to 28 bits by default.

/// Bytes of RAM a VM needs for these addresses.
pub const MIN_RAM: u64 = 8 << 20;
pub const PAGE: u64 = 0x1000;

/// Where guest RAM starts: 0 on x86_64, 1 GiB for the aarch64 guest
/// (`docs/boot-protocol.md`, "aarch64"). Host builds (the harness, Sluice)
/// see the x86_64 layout.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub const RAM_BASE: u64 = 0x4000_0000;
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
pub const RAM_BASE: u64 = 0;

/// Two pages: the DMA source (`+0`) and target (`+PAGE`) buffers.
pub const BUFFER_GPA: u64 = RAM_BASE + 0x0040_0000;
pub const BUFFER_PAGES: u64 = 2;
/// A page of guest RAM at 5 MiB into RAM; on x86_64 its GPA equals
/// [`UNMAPPED_IOVA`]: DMA to that IOVA must not land here (or anywhere).
pub const CANARY_GPA: u64 = RAM_BASE + 0x0050_0000;
/// The victim buffer `dma` leaves mapped at [`VICTIM_IOVA`].
pub const VICTIM_GPA: u64 = RAM_BASE + 0x0060_0000;

/// Where `dma` maps the buffer in its first IOAS.
pub const IOVA_A: u64 = 0x0100_0000;
/// Where `dma` maps the buffer in its second IOAS (after `DEVICE_REPLACE`).
pub const IOVA_B: u64 = 0x0200_0000;
/// Never mapped by anyone.
pub const UNMAPPED_IOVA: u64 = 0x0050_0000;
/// Where `dma` leaves [`VICTIM_GPA`] mapped.
pub const VICTIM_IOVA: u64 = 0x0700_0000;
/// Where `attacker` maps its own buffer.
pub const ATTACKER_IOVA: u64 = 0x0900_0000;

/// The largest IOVA edu can reach: its default 28-bit DMA mask on x86_64.
/// aarch64 scenarios raise the mask (`edu,dma_mask=...`: virt's RAM, so
/// the GPAs an attacker aims at, start at 1 GiB), and the guest allows
/// 40-bit addresses there.
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
pub const EDU_DMA_LIMIT: u64 = 1 << 28;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub const EDU_DMA_LIMIT: u64 = 1 << 40;

/// Bytes per edu transfer (QEMU 7.2's edu aborts on transfers that reach
/// the last byte of its 4 KiB buffer).
pub const TRANSFER: usize = 1024;

/// The pattern the victim buffer holds: byte `i` is `victim_byte(i)`.
pub const fn victim_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(7) ^ 0x5a
}

const _: () = {
    assert!(VICTIM_IOVA < EDU_DMA_LIMIT && ATTACKER_IOVA < EDU_DMA_LIMIT);
    assert!(IOVA_A < EDU_DMA_LIMIT && IOVA_B + BUFFER_PAGES * PAGE <= EDU_DMA_LIMIT);
    assert!(VICTIM_GPA + PAGE <= RAM_BASE + MIN_RAM);
    assert!(TRANSFER as u64 <= PAGE);
};
