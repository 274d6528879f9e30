//! Guest RAM: scrubbing, the GuestMemory rules (page crossing, MMIO, holes,
//! overflow), the 4 KiB fallback and clean failure.

use sluice_hal::PhysAddr;
use sluice_hypervisor::iommufd::guest_memory::translate_range;
use sluice_hypervisor::iommufd::{GuestMemory, GuestMemoryError};
use sluice_hypervisor::vm::memory::{
    FrameSource, GuestRam, LARGE_CHUNK, MemoryError, ModelFrames, POISON, layout,
};

const MIB: u64 = 1 << 20;

fn read_all(ram: &GuestRam<&ModelFrames>, gpa: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xee; len];
    ram.read(gpa, &mut out).unwrap();
    out
}

#[test]
fn every_byte_the_guest_sees_is_zeroed() {
    let frames = ModelFrames::new();
    let ram = GuestRam::new(&frames, &[(0, 4 * MIB), (8 * MIB, 0x3000)]).unwrap();
    // The model returns POISON for frames nobody wrote: scrubbing must
    // have overwritten all of them.
    for &(gpa, len) in ram.regions() {
        let bytes = read_all(&ram, gpa, len as usize);
        assert!(
            bytes.iter().all(|&b| b == 0),
            "region {gpa:#x} not scrubbed"
        );
    }
    assert_eq!(frames.zeroed_bytes(), 4 * MIB + 0x3000);
    // Host frames directly: no POISON left in any chunk.
    for c in ram.chunks() {
        let mut raw = vec![POISON; c.length as usize];
        frames.read(c.host, &mut raw);
        assert!(raw.iter().all(|&b| b == 0));
    }
    ram.release();
}

#[test]
fn large_chunks_when_aligned_small_frames_otherwise() {
    let frames = ModelFrames::new();
    let ram = GuestRam::new(&frames, &[(0, 4 * MIB), (0x60_1000, 0x2000)]).unwrap();
    let chunks = ram.chunks();
    assert_eq!(chunks[0].gpa, 0);
    assert_eq!(chunks[0].host.as_u64() % LARGE_CHUNK, 0);
    assert_eq!(chunks[0].length, 4 * MIB, "contiguous 2 MiB chunks merge");
    // The unaligned region is 4 KiB frames (merged when contiguous).
    let rest: u64 = chunks[1..].iter().map(|c| c.length).sum();
    assert_eq!(rest, 0x2000);
    assert_eq!(ram.size(), 4 * MIB + 0x2000);
    ram.release();
    assert_eq!(frames.live_frames(), 0);
}

#[test]
fn falls_back_to_4k_frames_when_no_large_chunk_is_free() {
    let frames = ModelFrames::new();
    frames.refuse_large(true);
    let ram = GuestRam::new(&frames, &[(0, 2 * MIB)]).unwrap();
    assert_eq!(frames.live_frames(), 512);
    assert_eq!(
        read_all(&ram, 0, 2 * MIB as usize),
        vec![0; 2 * MIB as usize]
    );
    ram.release();
}

#[test]
fn out_of_memory_frees_everything() {
    let frames = ModelFrames::new();
    frames.limit_frames(Some(600));
    assert_eq!(
        GuestRam::new(&frames, &[(0, 4 * MIB)]).err(),
        Some(MemoryError::OutOfMemory {
            wanted: 4 * MIB,
            allocated: 2 * MIB + 88 * 4096
        })
    );
    assert_eq!(frames.live_frames(), 0);
}

#[test]
fn guest_memory_reads_and_writes_cross_pages_and_chunks() {
    let frames = ModelFrames::new();
    frames.refuse_large(true); // 4 KiB frames only
    let ram = GuestRam::new(&frames, &[(0, 0x4000)]).unwrap();
    let data: Vec<u8> = (0..0x2000u32).map(|i| i as u8).collect();
    ram.write(0xff0, &data).unwrap();
    assert_eq!(read_all(&ram, 0xff0, data.len()), data);
    assert_eq!(read_all(&ram, 0xfef, 1), [0]);
    // ram_to_host: the address and what is contiguous from there.
    let (host, len) = ram.ram_to_host(0x1010).unwrap();
    let mut b = [0u8; 1];
    frames.read(host, &mut b);
    assert_eq!(b[0], data[0x20]);
    assert!((0xff0..=0x3ff0).contains(&len));
    // translate_range walks it to exactly 0x2000 bytes.
    let chunks = translate_range(&ram, 0x800, 0x2000).unwrap();
    assert_eq!(chunks.iter().map(|c| c.length).sum::<u64>(), 0x2000);
    ram.release();
}

#[test]
fn non_ram_accesses_fail_without_effect() {
    let frames = ModelFrames::new();
    let mut ram = GuestRam::new(&frames, &[(0, 2 * MIB)]).unwrap();
    ram.add_mmio(layout::ECAM_BASE, layout::ECAM_SIZE).unwrap();
    assert_eq!(
        ram.add_mmio(MIB, 0x1000),
        Err(MemoryError::Overlap { gpa: MIB })
    );
    // Into MMIO: NotRam; into a hole: Unmapped; wrapping: Overflow.
    let mut buf = [0u8; 8];
    assert_eq!(
        ram.read(layout::ECAM_BASE + 4, &mut buf),
        Err(GuestMemoryError::NotRam {
            gpa: layout::ECAM_BASE + 4
        })
    );
    assert_eq!(
        ram.read(4 * MIB, &mut buf),
        Err(GuestMemoryError::Unmapped { gpa: 4 * MIB })
    );
    assert_eq!(
        ram.read(u64::MAX - 3, &mut buf),
        Err(GuestMemoryError::Overflow)
    );
    // A write that starts in RAM and runs past its end changes nothing.
    let end = 2 * MIB;
    assert_eq!(
        ram.write(end - 4, &[1; 8]),
        Err(GuestMemoryError::Unmapped { gpa: end })
    );
    assert_eq!(read_all(&ram, end - 4, 4), [0; 4]);
    assert_eq!(
        ram.ram_to_host(layout::ECAM_BASE),
        Err(GuestMemoryError::NotRam {
            gpa: layout::ECAM_BASE
        })
    );
    assert_eq!(
        translate_range(&ram, end - 0x1000, 0x2000),
        Err(GuestMemoryError::Unmapped { gpa: end })
    );
    // Zero-length accesses are fine anywhere in range.
    assert_eq!(ram.read(0, &mut []), Ok(()));
    ram.release();
}

#[test]
fn release_scrubs_and_frees() {
    let frames = ModelFrames::new();
    let ram = GuestRam::new(&frames, &[(0, 0x2000)]).unwrap();
    ram.write(0, b"secret").unwrap();
    let host = ram.chunks()[0].host;
    let zeroed_before = frames.zeroed_bytes();
    ram.release();
    assert_eq!(frames.zeroed_bytes() - zeroed_before, 0x2000);
    assert!(!frames.is_live(host));
    assert!(!frames.is_live(PhysAddr::new(host.as_u64() + 0x1000)));
}
