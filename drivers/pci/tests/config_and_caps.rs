//! ECAM, MCFG, BAR sizing and capability decoding against the host models.

use std::cell::RefCell;
use std::collections::BTreeMap;

use sluice_hal::Mmio;
use sluice_pci::bar::{BarError, BarKind, size_bars};
use sluice_pci::caps::{
    AcsFlags, CapError, PortType, read_capabilities, walk_capabilities, walk_extended_capabilities,
};
use sluice_pci::config::{COMMAND, ConfigError};
use sluice_pci::mcfg::{McfgEntryError, parse_mcfg};
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::sdt::{SdtError, checksum_fixup};
use sluice_pci::{ConfigSpace, Ecam, EcamWindow, PciAddress, Segment};

/// Register window that remembers 32-bit writes; unwritten dwords read as
/// `0xffff_ffff` like an empty ECAM slot.
#[derive(Default)]
struct FakeWindow(RefCell<BTreeMap<usize, u32>>);

impl Mmio for FakeWindow {
    fn read32(&self, offset: usize) -> u32 {
        *self.0.borrow().get(&offset).unwrap_or(&0xffff_ffff)
    }
    fn write32(&self, offset: usize, value: u32) {
        self.0.borrow_mut().insert(offset, value);
    }
    fn read64(&self, _offset: usize) -> u64 {
        unreachable!("ECAM never makes 64-bit accesses")
    }
    fn write64(&self, _offset: usize, _value: u64) {
        unreachable!("ECAM never makes 64-bit accesses")
    }
}

#[test]
fn ecam_computes_offsets_per_window_and_rejects_uncovered_buses() {
    let window = FakeWindow::default();
    // Bus 0x11, device 3, function 2, offset 0x44 in a window starting at bus 0x10.
    window.write32((1 << 20) | (3 << 15) | (2 << 12) | 0x44, 0xdead_beef);
    let ecam = Ecam::new(vec![EcamWindow {
        segment: Segment(1),
        start_bus: 0x10,
        end_bus: 0x1f,
        mmio: window,
    }]);
    let a = PciAddress::new(1, 0x11, 3, 2);
    assert_eq!(ecam.read32(a, 0x44), Ok(0xdead_beef));
    assert_eq!(ecam.read16(a, 0x46), Ok(0xdead));
    assert_eq!(ecam.read8(a, 0x45), Ok(0xbe));
    let outside = PciAddress::new(1, 0x20, 0, 0);
    assert_eq!(ecam.read32(outside, 0), Err(ConfigError::NoWindow(outside)));
    let other_segment = PciAddress::new(0, 0x11, 0, 0);
    assert_eq!(
        ecam.read32(other_segment, 0),
        Err(ConfigError::NoWindow(other_segment))
    );
    assert_eq!(
        ecam.read32(a, 0x42),
        Err(ConfigError::Misaligned {
            addr: a,
            offset: 0x42
        })
    );
    assert_eq!(
        ecam.read32(a, 0x1000),
        Err(ConfigError::OffsetOutOfRange {
            addr: a,
            offset: 0x1000
        })
    );
    assert_eq!(
        ecam.read16(a, 0xfff),
        Err(ConfigError::Misaligned {
            addr: a,
            offset: 0xfff
        })
    );
}

#[test]
fn narrow_command_write_does_not_write_back_status_error_bits() {
    let window = FakeWindow::default();
    let ecam = Ecam::new(vec![EcamWindow {
        segment: Segment(0),
        start_bus: 0,
        end_bus: 0,
        mmio: window,
    }]);
    let a = PciAddress::new(0, 0, 1, 0);
    // Status has a write-1-to-clear error bit set (Received Master Abort, bit 13).
    ecam.write32(a, 0x04, (1 << 29) | 0x0006).unwrap();
    ecam.write16(a, COMMAND, 0x0002).unwrap();
    let window = &ecam.windows()[0].mmio;
    assert_eq!(
        window.read32((1 << 15) | 4),
        0x0000_0002,
        "status half must be written as zero"
    );
    // Other narrow writes keep their neighbours.
    ecam.write32(a, 0x40, 0x1122_3344).unwrap();
    ecam.write8(a, 0x41, 0xaa).unwrap();
    assert_eq!(ecam.read32(a, 0x40), Ok(0x1122_aa44));
}

fn mcfg_table(entries: &[(u64, u16, u8, u8)], extra: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(b"MCFG");
    t.extend_from_slice(&0u32.to_le_bytes());
    t.push(1);
    t.push(0);
    t.extend_from_slice(b"SLUICE");
    t.extend_from_slice(b"TESTMCFG");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"SLCE");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    for &(base, seg, start, end) in entries {
        t.extend_from_slice(&base.to_le_bytes());
        t.extend_from_slice(&seg.to_le_bytes());
        t.push(start);
        t.push(end);
        t.extend_from_slice(&[0; 4]);
    }
    t.extend_from_slice(extra);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = checksum_fixup(&t);
    t
}

#[test]
fn mcfg_parses_entries_and_reports_bad_ones() {
    let t = mcfg_table(
        &[
            (0xb000_0000, 0, 0, 0xff),
            (0x40_0000_0000, 1, 0x80, 0x7f),
            (0xc000_0000, 2, 0x10, 0x1f),
        ],
        &[1, 2, 3],
    );
    let m = parse_mcfg(&t).expect("valid table");
    assert_eq!(m.entries.len(), 2);
    assert_eq!(m.entries[0].base, 0xb000_0000);
    assert_eq!(m.entries[0].mapped_range(), Some((0xb000_0000, 256 << 20)));
    assert_eq!(m.entries[1].segment, Segment(2));
    assert_eq!(
        m.entries[1].mapped_range(),
        Some((0xc000_0000 + (0x10 << 20), 16 << 20))
    );
    assert_eq!(
        m.errors,
        vec![
            McfgEntryError::InvertedBusRange {
                index: 1,
                start_bus: 0x80,
                end_bus: 0x7f
            },
            McfgEntryError::TrailingBytes { count: 3 }
        ]
    );

    let mut bad = t.clone();
    bad[50] ^= 1;
    assert!(matches!(
        parse_mcfg(&bad),
        Err(SdtError::BadChecksum { .. })
    ));
    assert!(matches!(
        parse_mcfg(&t[..40]),
        Err(SdtError::LengthExceedsBuffer { .. })
    ));
    assert!(matches!(
        parse_mcfg(&t[..20]),
        Err(SdtError::TooShort { have: 20, need: 36 })
    ));
    let mut sig = t.clone();
    sig[0] = b'X';
    assert!(matches!(
        parse_mcfg(&sig),
        Err(SdtError::BadSignature { .. })
    ));
}

fn addr(bus: u8, dev: u8, func: u8) -> PciAddress {
    PciAddress::new(0, bus, dev, func)
}

#[test]
fn bar_sizing_disables_decode_and_restores_bars_and_command_exactly() {
    let cfg = ModelConfigSpace::new();
    let a = addr(0, 3, 0);
    cfg.add(
        a,
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00ff00)
            .bar_mem32(0, 0xfe00_0000, 0x10_0000, false)
            .bar_mem64(2, 0x80_0000_0000, 0x2_0000_0000, true)
            .bar_io(4, 0xc000, 0x20, false)
            .command(0x0007),
    );
    let before = cfg.snapshot(a).unwrap();
    let (bars, errors) = size_bars(&cfg, a, 6);
    assert_eq!(errors, vec![]);
    assert_eq!(bars.len(), 3);
    assert_eq!(
        (
            bars[0].index,
            bars[0].kind,
            bars[0].prefetchable,
            bars[0].address,
            bars[0].size
        ),
        (0, BarKind::Memory32, false, 0xfe00_0000, 0x10_0000)
    );
    assert_eq!(
        (
            bars[1].index,
            bars[1].kind,
            bars[1].prefetchable,
            bars[1].address,
            bars[1].size
        ),
        (2, BarKind::Memory64, true, 0x80_0000_0000, 0x2_0000_0000)
    );
    assert_eq!(
        (bars[2].index, bars[2].kind, bars[2].address, bars[2].size),
        (4, BarKind::Io, 0xc000, 0x20)
    );
    assert_eq!(cfg.sizing_while_decoding(), 0);
    assert_eq!(
        cfg.snapshot(a).unwrap(),
        before,
        "BARs and COMMAND restored exactly"
    );
    let writes = cfg.writes();
    let first = writes.first().unwrap();
    assert_eq!(
        (first.offset, first.value & 0xffff),
        (COMMAND, 0x0004),
        "decode off, bus master kept"
    );
    let last = writes.last().unwrap();
    assert_eq!((last.offset, last.value & 0xffff), (COMMAND, 0x0007));
}

#[test]
fn bar_sizing_reports_malformed_bars() {
    let cfg = ModelConfigSpace::new();
    let a = addr(0, 4, 0);
    // 64-bit BAR in the last slot; reserved memory type 11b in slot 0.
    cfg.add(
        a,
        FunctionBuilder::endpoint(0x1af4, 0x1000, 0x020000)
            .raw32(0x10, 0b110)
            .raw32(0x24, 0b100),
    );
    let (bars, errors) = size_bars(&cfg, a, 6);
    assert!(bars.is_empty());
    assert_eq!(
        errors,
        vec![
            BarError::ReservedMemoryType { index: 0 },
            BarError::Memory64InLastSlot { index: 5 }
        ]
    );
}

#[test]
fn capabilities_are_decoded() {
    let cfg = ModelConfigSpace::new();
    let a = addr(0, 5, 0);
    cfg.add(
        a,
        FunctionBuilder::endpoint(0x8086, 0x1234, 0x010802)
            .power_management()
            .msi(true, true, 5)
            .msix(64, 2, 0x2000, 3, 0x3000)
            .pcie(PortType::Endpoint, true)
            .acs(AcsFlags::all(), AcsFlags::P2P_REQUEST_REDIRECT)
            .ats(0, true)
            .pri(512)
            .pasid(20, true, false)
            .sriov(8, 64),
    );
    let caps = read_capabilities(&cfg, a);
    assert_eq!(caps.errors, vec![]);
    assert!(caps.power_management);
    let msi = caps.msi.unwrap();
    assert!(msi.is_64bit && msi.per_vector_masking);
    assert_eq!(msi.multiple_message_capable, 5);
    let msix = caps.msix.unwrap();
    assert_eq!(
        (
            msix.table_size,
            msix.table_bir,
            msix.table_offset,
            msix.pba_bir,
            msix.pba_offset
        ),
        (64, 2, 0x2000, 3, 0x3000)
    );
    let pcie = caps.pcie.unwrap();
    assert_eq!(
        (pcie.port_type, pcie.flr, pcie.version),
        (PortType::Endpoint, true, 2)
    );
    let acs = caps.acs.unwrap();
    assert_eq!(acs.capability, AcsFlags::all());
    assert_eq!(acs.control, AcsFlags::P2P_REQUEST_REDIRECT);
    let ats = caps.ats.unwrap();
    assert!(ats.page_aligned_request && !ats.enabled);
    assert_eq!(caps.pri.unwrap().outstanding_capacity, 512);
    let pasid = caps.pasid.unwrap();
    assert_eq!(
        (
            pasid.max_width,
            pasid.execute_permission,
            pasid.privileged_mode
        ),
        (20, true, false)
    );
    let sriov = caps.sriov.unwrap();
    assert_eq!(
        (sriov.initial_vfs, sriov.total_vfs, sriov.num_vfs),
        (8, 64, 0)
    );
    assert_eq!((sriov.first_vf_offset, sriov.vf_stride), (0x80, 2));
    // PF 00:05.0 is RID 0x0028: VF1 = 0x00a8 (00:15.0), VF64 = 0x00a8 + 63 * 2 = 0x0126 (01:04.6).
    assert_eq!(
        sriov.vf_requester_id(a.bdf, 1),
        Some(sluice_pci::Bdf::new(0, 0x15, 0))
    );
    assert_eq!(
        sriov.vf_requester_id(a.bdf, 64),
        Some(sluice_pci::Bdf::new(1, 4, 6))
    );
    assert_eq!(sriov.vf_requester_id(a.bdf, 0), None);
    assert_eq!(sriov.vf_requester_id(a.bdf, 65), None);
    assert_eq!(
        sriov.vf_requester_id(sluice_pci::Bdf::new(0xff, 0x1f, 7), 1),
        None,
        "past RID 0xffff"
    );
    assert_eq!(
        caps.names(),
        vec![
            "pm", "msi", "msix", "pcie", "flr", "acs", "ats", "pri", "pasid", "sriov"
        ]
    );
    assert_eq!(caps.list.len(), 4);
    assert_eq!(caps.extended.len(), 5);
    assert!(
        caps.extended
            .iter()
            .all(|e| e.offset >= 0x100 && e.offset % 4 == 0)
    );

    // MSI without 64-bit addressing or masking.
    let b = addr(0, 6, 0);
    cfg.add(
        b,
        FunctionBuilder::endpoint(0x8086, 0x1235, 0x020000).msi(false, false, 0),
    );
    let msi = read_capabilities(&cfg, b).msi.unwrap();
    assert!(!msi.is_64bit && !msi.per_vector_masking);
    // No capability list at all.
    let c = addr(0, 7, 0);
    cfg.add(c, FunctionBuilder::endpoint(0x8086, 0x1236, 0x020000));
    assert_eq!(read_capabilities(&cfg, c), Default::default());
}

fn with_cap_list(
    pointer_at_0x34: u8,
    tweak: impl FnOnce(FunctionBuilder) -> FunctionBuilder,
) -> (ModelConfigSpace, PciAddress) {
    let cfg = ModelConfigSpace::new();
    let a = addr(0, 1, 0);
    let f = FunctionBuilder::endpoint(0x1b36, 0x0001, 0x020000)
        .power_management()
        .msi(true, false, 0);
    cfg.add(a, tweak(f).raw8(0x34, pointer_at_0x34));
    (cfg, a)
}

#[test]
fn looping_and_wild_capability_pointers_are_errors() {
    // PM at 0x40 (len 8) then MSI at 0x48. Make MSI point back at PM.
    let (cfg, a) = with_cap_list(0x40, |f| f.raw8(0x49, 0x40));
    let (list, err) = walk_capabilities(&cfg, a);
    assert_eq!(list.len(), 2);
    assert_eq!(
        err,
        Some(CapError::Loop {
            from: 0x49,
            pointer: 0x40
        })
    );

    // A capability pointing at itself.
    let (cfg, a) = with_cap_list(0x40, |f| f.raw8(0x41, 0x40));
    let (list, err) = walk_capabilities(&cfg, a);
    assert_eq!(list.len(), 1);
    assert_eq!(
        err,
        Some(CapError::Loop {
            from: 0x41,
            pointer: 0x40
        })
    );

    // Into the header.
    let (cfg, a) = with_cap_list(0x40, |f| f.raw8(0x49, 0x3c));
    assert_eq!(
        walk_capabilities(&cfg, a).1,
        Some(CapError::PointerIntoHeader {
            from: 0x49,
            pointer: 0x3c
        })
    );
    let (cfg, a) = with_cap_list(0x10, |f| f);
    let (list, err) = walk_capabilities(&cfg, a);
    assert!(list.is_empty());
    assert_eq!(
        err,
        Some(CapError::PointerIntoHeader {
            from: 0x34,
            pointer: 0x10
        })
    );

    // Misaligned.
    let (cfg, a) = with_cap_list(0x40, |f| f.raw8(0x41, 0x4a));
    assert_eq!(
        walk_capabilities(&cfg, a).1,
        Some(CapError::Misaligned {
            from: 0x41,
            pointer: 0x4a
        })
    );
    let (cfg, a) = with_cap_list(0xff, |f| f);
    assert_eq!(
        walk_capabilities(&cfg, a).1,
        Some(CapError::Misaligned {
            from: 0x34,
            pointer: 0xff
        })
    );

    // The errors reach the decoded summary, and what came before is kept.
    let (cfg, a) = with_cap_list(0x40, |f| f.raw8(0x49, 0x40));
    let caps = read_capabilities(&cfg, a);
    assert!(caps.power_management && caps.msi.is_some());
    assert_eq!(
        caps.errors,
        vec![CapError::Loop {
            from: 0x49,
            pointer: 0x40
        }]
    );
}

#[test]
fn a_chain_of_every_slot_stops_at_the_space_limit() {
    // 0x40 -> 0x44 -> ... -> 0xfc -> 0x40: 48 capabilities then a loop.
    let mut f = FunctionBuilder::endpoint(0x1b36, 0x0002, 0x020000)
        .raw16(0x06, 0x10)
        .raw8(0x34, 0x40);
    for at in (0x40u16..=0xfc).step_by(4) {
        let next = if at == 0xfc { 0x40 } else { at + 4 };
        f = f.raw8(at, 0x09).raw8(at + 1, next as u8);
    }
    let cfg = ModelConfigSpace::new();
    cfg.add(addr(0, 2, 0), f);
    let (list, err) = walk_capabilities(&cfg, addr(0, 2, 0));
    assert_eq!(list.len(), 48);
    assert_eq!(
        err,
        Some(CapError::Loop {
            from: 0xfd,
            pointer: 0x40
        })
    );
}

#[test]
fn looping_and_wild_extended_capabilities_are_errors() {
    let base = || {
        FunctionBuilder::endpoint(0x8086, 0x10, 0x020000)
            .pcie(PortType::Endpoint, false)
            .acs(AcsFlags::all(), AcsFlags::all())
            .ats(0, false)
    };
    // ACS at 0x100, ATS at 0x108. Make ATS point back to ACS.
    let cfg = ModelConfigSpace::new();
    let a = addr(0, 1, 0);
    cfg.add(a, base().raw32(0x108, 0x000f | (1 << 16) | (0x100 << 20)));
    let (list, err) = walk_extended_capabilities(&cfg, a);
    assert_eq!(list.len(), 2);
    assert_eq!(
        err,
        Some(CapError::Loop {
            from: 0x108,
            pointer: 0x100
        })
    );
    let caps = read_capabilities(&cfg, a);
    assert!(caps.acs.is_some() && caps.ats.is_some());
    assert_eq!(
        caps.errors,
        vec![CapError::Loop {
            from: 0x108,
            pointer: 0x100
        }]
    );

    cfg.add(a, base().raw32(0x108, 0x000f | (0x0f0 << 20)));
    assert_eq!(
        walk_extended_capabilities(&cfg, a).1,
        Some(CapError::PointerIntoHeader {
            from: 0x108,
            pointer: 0xf0
        })
    );
    cfg.add(a, base().raw32(0x108, 0x000f | (0x10a << 20)));
    assert_eq!(
        walk_extended_capabilities(&cfg, a).1,
        Some(CapError::Misaligned {
            from: 0x108,
            pointer: 0x10a
        })
    );
    // Next pointer to an all-ones header.
    cfg.add(
        a,
        base()
            .raw32(0x108, 0x000f | (0x200 << 20))
            .raw32(0x200, 0xffff_ffff),
    );
    assert_eq!(
        walk_extended_capabilities(&cfg, a).1,
        Some(CapError::AllOnesHeader { at: 0x200 })
    );
    // An extended capability in the very last dword has no room for fields.
    cfg.add(
        a,
        base()
            .raw32(0x108, 0x000f | (0xffc << 20))
            .raw32(0xffc, 0x000d),
    );
    let caps = read_capabilities(&cfg, a);
    assert_eq!(caps.extended.len(), 3);
    assert!(
        caps.errors.is_empty(),
        "ACS already decoded at 0x100; a duplicate is ignored: {:?}",
        caps.errors
    );
    cfg.add(
        a,
        FunctionBuilder::endpoint(0x8086, 0x10, 0x020000)
            .pcie(PortType::Endpoint, false)
            .raw32(0x100, 0x000d | (1 << 16))
            .raw32(0x100, 0x000f | (0xffc << 20))
            .raw32(0xffc, 0x000d),
    );
    let caps = read_capabilities(&cfg, a);
    assert_eq!(
        caps.errors,
        vec![CapError::Config(ConfigError::OffsetOutOfRange {
            addr: a,
            offset: 0x1000
        })]
    );
    assert!(caps.acs.is_none());
}

#[test]
fn ecam_window_from_mcfg_entry_decodes_from_its_start_bus() {
    let t = mcfg_table(&[(0xe000_0000, 3, 0x40, 0x4f)], &[]);
    let entry = parse_mcfg(&t).unwrap().entries[0];
    assert_eq!(
        entry.mapped_range(),
        Some((0xe000_0000 + (0x40 << 20), 16 << 20))
    );
    let window = FakeWindow::default();
    // 41:02.0 offset 0 is at (0x41 - 0x40) << 20 | 2 << 15 in the mapped window.
    window.write32((1 << 20) | (2 << 15), 0x11e8_1234);
    let ecam = Ecam::new(vec![EcamWindow::from_mcfg(&entry, window)]);
    assert_eq!(
        ecam.read32(PciAddress::new(3, 0x41, 2, 0), 0),
        Ok(0x11e8_1234)
    );
    assert_eq!(
        ecam.read16(PciAddress::new(3, 0x41, 3, 0), 0),
        Ok(0xffff),
        "empty slot reads all ones"
    );
    let below = PciAddress::new(3, 0x3f, 0, 0);
    assert_eq!(ecam.read32(below, 0), Err(ConfigError::NoWindow(below)));
}
