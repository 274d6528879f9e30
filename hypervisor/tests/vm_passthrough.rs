//! The guest's PCI configuration space over the host config-space model:
//! identity pass-through, bus-master gating, BAR sizing and pinning,
//! MSI/MSI-X mediation, dropped writes, unowned functions, and ECAM MMIO
//! exits decoded from guest instructions.

use sluice_hypervisor::iommufd::GuestMemory;
use sluice_hypervisor::passthrough::{
    BarMapping, EcamWindow, GuestMsi, GuestMsix, GuestPciBus, IoPortRange, MmioError,
    PassthroughError, emulate_ecam_access,
};
use sluice_hypervisor::vcpu::decode::{CodeMode, DecodeError, IdentityFetch};
use sluice_hypervisor::vcpu::{AccessKind, AccessSize, GuestRegisters};
use sluice_hypervisor::vm::memory::{GuestRam, ModelFrames, layout};
use sluice_pci::caps::PortType;
use sluice_pci::config::COMMAND;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{Bdf, ConfigSpace, PciAddress, Segment, Topology, enumerate};

use AccessSize::{Byte, Dword, Qword, Word};

const NIC: PciAddress = PciAddress::new(0, 0, 3, 0);
const OTHER: PciAddress = PciAddress::new(0, 0, 4, 0);
const GUEST_NIC: Bdf = Bdf::new(0, 1, 0);
const WINDOW: u64 = layout::BAR_WINDOW_BASE;
const MSI: u16 = 0x40 + 0x3c; // after the PCIe capability (0x40, 0x3c long)
const COMMAND_MEMORY_SPACE: u32 = sluice_pci::config::COMMAND_MEMORY_SPACE as u32;
const COMMAND_BUS_MASTER: u32 = sluice_pci::config::COMMAND_BUS_MASTER as u32;

/// A NIC with a 64-bit 16 KiB BAR, a 32-bit 4 KiB BAR, an I/O BAR, PCIe,
/// MSI (64-bit, per-vector masking) and MSI-X; and a device the guest
/// does not own.
fn host() -> (ModelConfigSpace, Topology) {
    let cfg = ModelConfigSpace::new();
    cfg.add(
        NIC,
        FunctionBuilder::endpoint(0x8086, 0x10d3, 0x02_00_00)
            .bar_mem64(0, 0xfe00_0000, 0x4000, false)
            .bar_mem32(2, 0xfebf_0000, 0x1000, true)
            .bar_io(3, 0xc000, 0x20, true)
            .pcie(PortType::Endpoint, true)
            .msi(true, true, 2)
            .msix(4, 2, 0x800, 2, 0xc00)
            .raw8(0x3d, 1)
            .raw8(0x3c, 0x0b)
            .command(COMMAND_MEMORY_SPACE as u16 | 1),
    );
    cfg.add(OTHER, FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00_ff_00));
    let topo = enumerate(&cfg, Segment(0), &[0], 0..=0);
    (cfg, topo)
}

fn bus<'c>(cfg: &'c ModelConfigSpace, topo: &Topology) -> GuestPciBus<&'c ModelConfigSpace> {
    let nic = topo.get(NIC).unwrap();
    GuestPciBus::new(cfg, &[(nic, GUEST_NIC)], WINDOW, layout::BAR_WINDOW_SIZE).unwrap()
}

#[test]
fn capability_layout_assumed_by_these_tests() {
    let (_, topo) = host();
    let caps = &topo.get(NIC).unwrap().caps;
    assert_eq!(caps.msi.unwrap().offset, MSI);
    assert!(caps.msix.is_some());
}

#[test]
fn identity_registers_pass_through_and_writes_to_them_are_dropped() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    assert_eq!(b.read(GUEST_NIC, 0, Dword), 0x10d3_8086);
    assert_eq!(b.read(GUEST_NIC, 2, Word), 0x10d3);
    assert_eq!(b.read(GUEST_NIC, 0x0b, Byte), 0x02, "base class");
    assert_eq!(b.read(GUEST_NIC, 0x34, Byte), 0x40, "capabilities pointer");
    assert_eq!(b.read(GUEST_NIC, MSI, Byte), 0x05, "MSI capability ID");
    let before = cfg.snapshot(NIC).unwrap();
    let writes_before = cfg.writes().len();
    b.write(GUEST_NIC, 0, Dword, 0xdead_beef);
    b.write(GUEST_NIC, 0x34, Byte, 0x80);
    b.write(GUEST_NIC, 0x0c, Byte, 0x10); // cache line size
    b.write(GUEST_NIC, 0x40 + 8, Word, 0x8000); // PCIe Device Control (FLR bit)
    b.write(GUEST_NIC, 0x100, Dword, 0); // extended space
    b.write(GUEST_NIC, 0x30, Dword, u32::MAX); // expansion ROM
    assert_eq!(
        cfg.writes().len(),
        writes_before,
        "nothing reached the host"
    );
    assert_eq!(cfg.snapshot(NIC).unwrap(), before);
    assert_eq!(b.read(GUEST_NIC, 0, Dword), 0x10d3_8086);
    assert_eq!(b.read(GUEST_NIC, 0x30, Dword), 0, "no ROM BAR");
    // Interrupt line is the guest's, the pin the host's.
    b.write(GUEST_NIC, 0x3c, Byte, 0x2a);
    assert_eq!(b.read(GUEST_NIC, 0x3c, Word), 0x012a);
    assert_eq!(cfg.read8(NIC, 0x3c).unwrap(), 0x0b);
}

#[test]
fn unowned_functions_read_all_ones_and_ignore_writes() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    let enumeration_writes = cfg.writes().len();
    // The host's 00:04.0 exists, but not in this guest; nor does 00:02.0.
    for guest in [
        Bdf::new(0, 4, 0),
        Bdf::new(0, 2, 0),
        Bdf::new(0, 1, 1),
        Bdf::new(1, 1, 0),
    ] {
        assert_eq!(b.read(guest, 0, Dword), 0xffff_ffff);
        assert_eq!(b.read(guest, 0, Word), 0xffff);
        assert_eq!(b.read(guest, 3, Byte), 0xff);
        b.write(guest, COMMAND, Word, 0x7);
    }
    assert_eq!(cfg.writes().len(), enumeration_writes);
    // Misaligned and 8-byte accesses to an owned function: all ones.
    assert_eq!(b.read(GUEST_NIC, 1, Word), 0xffff);
    assert_eq!(b.read(GUEST_NIC, 0, Qword), 0xffff_ffff);
    assert_eq!(b.read(GUEST_NIC, 4096, Byte), 0xff);
}

#[test]
fn bus_master_only_while_bound() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    let host_command = || u32::from(cfg.read16(NIC, COMMAND).unwrap());
    // Not bound: memory decode goes through, bus mastering does not.
    b.write(
        GUEST_NIC,
        COMMAND,
        Word,
        COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER,
    );
    assert_eq!(host_command() & COMMAND_BUS_MASTER, 0);
    assert_ne!(host_command() & COMMAND_MEMORY_SPACE, 0);
    assert_eq!(b.read(GUEST_NIC, COMMAND, Word) & COMMAND_BUS_MASTER, 0);
    // Bound: allowed.
    b.set_bus_master_allowed(GUEST_NIC, true);
    b.write(
        GUEST_NIC,
        COMMAND,
        Word,
        COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER,
    );
    assert_ne!(host_command() & COMMAND_BUS_MASTER, 0);
    assert_ne!(b.read(GUEST_NIC, COMMAND, Word) & COMMAND_BUS_MASTER, 0);
    // A byte write to COMMAND's low byte works the same.
    b.write(GUEST_NIC, COMMAND, Byte, COMMAND_MEMORY_SPACE);
    assert_eq!(host_command() & COMMAND_BUS_MASTER, 0);
    b.write(
        GUEST_NIC,
        COMMAND,
        Byte,
        COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER,
    );
    // Unbinding revokes it on the host at once.
    b.set_bus_master_allowed(GUEST_NIC, false);
    assert_eq!(host_command() & COMMAND_BUS_MASTER, 0);
    assert_eq!(b.read(GUEST_NIC, COMMAND, Word) & COMMAND_BUS_MASTER, 0);
    // Bits the guest does not control never reach the host (bit 9: fast
    // back-to-back, bit 4: memory write and invalidate).
    b.write(GUEST_NIC, COMMAND, Word, 0x0210 | COMMAND_MEMORY_SPACE);
    assert_eq!(host_command() & 0x0210, 0);
}

#[test]
fn status_write_one_to_clear_reaches_the_host_without_touching_command() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    let before = cfg.writes().len();
    b.write(GUEST_NIC, 0x06, Word, 0xffff);
    let w = &cfg.writes()[before..];
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].offset, COMMAND);
    assert_eq!(w[0].value >> 16, 0xf900, "only the write-1-to-clear bits");
    assert_eq!(
        w[0].value & 0xffff,
        u32::from(cfg.read16(NIC, COMMAND).unwrap())
    );
}

#[test]
fn bars_are_placed_by_sluice_and_sizing_works() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    // Largest first, naturally aligned in the window. BAR 2 holds the
    // MSI-X table (0x800) and PBA (0xc00) in its only page: not mapped.
    assert_eq!(
        b.bar_mappings(),
        [BarMapping {
            device: NIC,
            index: 0,
            guest: WINDOW,
            host: 0xfe00_0000,
            size: 0x4000,
            prefetchable: false
        }]
    );
    assert_eq!(
        b.io_ranges(),
        [IoPortRange {
            device: NIC,
            first: 0xc000,
            count: 0x20
        }]
    );
    assert_eq!(b.read(GUEST_NIC, 0x10, Dword), WINDOW as u32 | 0b100);
    assert_eq!(b.read(GUEST_NIC, 0x14, Dword), 0);
    assert_eq!(
        b.read(GUEST_NIC, 0x18, Dword),
        (WINDOW as u32 + 0x4000) | 0b1000
    );
    assert_eq!(
        b.read(GUEST_NIC, 0x1c, Dword),
        0xc001,
        "I/O BAR at the host port"
    );
    assert_eq!(b.read(GUEST_NIC, 0x20, Dword), 0, "unimplemented slot");

    let host_before = cfg.snapshot(NIC).unwrap();
    let enumeration_writes = cfg.writes().len();
    // Sizing the 64-bit BAR: both halves.
    b.write(GUEST_NIC, 0x10, Dword, u32::MAX);
    b.write(GUEST_NIC, 0x14, Dword, u32::MAX);
    assert_eq!(b.read(GUEST_NIC, 0x10, Dword), 0xffff_c004);
    assert_eq!(b.read(GUEST_NIC, 0x14, Dword), 0xffff_ffff);
    // Sizing the I/O BAR and an unimplemented one.
    b.write(GUEST_NIC, 0x1c, Dword, u32::MAX);
    assert_eq!(b.read(GUEST_NIC, 0x1c, Dword), 0xffff_ffe1);
    b.write(GUEST_NIC, 0x20, Dword, u32::MAX);
    assert_eq!(b.read(GUEST_NIC, 0x20, Dword), 0);
    // Writing the address back ends sizing.
    b.write(GUEST_NIC, 0x10, Dword, WINDOW as u32);
    b.write(GUEST_NIC, 0x14, Dword, 0);
    assert_eq!(b.read(GUEST_NIC, 0x10, Dword), WINDOW as u32 | 0b100);
    // Moving the BAR onto other memory is ignored: it stays put.
    b.write(GUEST_NIC, 0x10, Dword, 0x1000_0000);
    b.write(GUEST_NIC, 0x14, Dword, 0x1);
    assert_eq!(b.read(GUEST_NIC, 0x10, Dword), WINDOW as u32 | 0b100);
    assert_eq!(b.read(GUEST_NIC, 0x14, Dword), 0);
    assert_eq!(b.bar_mappings()[0].guest, WINDOW);
    // The host BARs were never written.
    assert_eq!(cfg.snapshot(NIC).unwrap(), host_before);
    assert!(
        cfg.writes()[enumeration_writes..]
            .iter()
            .all(|w| !(0x10..0x28).contains(&w.offset))
    );
}

#[test]
fn msix_table_and_pba_pages_stay_unmapped() {
    let cfg = ModelConfigSpace::new();
    // 64 KiB BAR 0 with a 64-entry MSI-X table at 0x3000 (1 KiB) and the
    // PBA at 0x9000 (8 bytes).
    cfg.add(
        NIC,
        FunctionBuilder::endpoint(0x15b3, 0x1017, 0x02_00_00)
            .bar_mem64(0, 0xf000_0000, 0x1_0000, false)
            .msix(64, 0, 0x3000, 0, 0x9000),
    );
    let topo = enumerate(&cfg, Segment(0), &[0], 0..=0);
    let b = GuestPciBus::new(
        &cfg,
        &[(topo.get(NIC).unwrap(), GUEST_NIC)],
        WINDOW,
        1 << 20,
    )
    .unwrap();
    let pieces: Vec<(u64, u64, u64)> = b
        .bar_mappings()
        .iter()
        .map(|m| (m.guest - WINDOW, m.host - 0xf000_0000, m.size))
        .collect();
    assert_eq!(
        pieces,
        [
            (0, 0, 0x3000),
            (0x4000, 0x4000, 0x5000),
            (0xa000, 0xa000, 0x6000)
        ]
    );
}

#[test]
fn bar_window_too_small() {
    let (cfg, topo) = host();
    let nic = topo.get(NIC).unwrap();
    assert_eq!(
        GuestPciBus::new(&cfg, &[(nic, GUEST_NIC)], WINDOW, 0x4000).err(),
        Some(PassthroughError::BarWindowFull {
            device: NIC,
            bar: 2,
            size: 0x1000
        })
    );
    assert_eq!(
        GuestPciBus::new(&cfg, &[(nic, GUEST_NIC), (nic, GUEST_NIC)], WINDOW, 1 << 20).err(),
        Some(PassthroughError::DuplicateGuestBdf(GUEST_NIC))
    );
}

#[test]
fn msi_and_msix_are_recorded_not_written_raw() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    let msix = topo.get(NIC).unwrap().caps.msix.unwrap().offset;
    let host_before = cfg.snapshot(NIC).unwrap();
    let writes_before = cfg.writes().len();
    // The guest programs MSI: address, data, mask, then enables 4 vectors.
    b.write(GUEST_NIC, MSI + 4, Dword, 0xfee0_1000);
    b.write(GUEST_NIC, MSI + 8, Dword, 0);
    b.write(GUEST_NIC, MSI + 0xc, Word, 0x4041);
    b.write(GUEST_NIC, MSI + 0x10, Dword, 0b1010);
    b.write(GUEST_NIC, MSI + 2, Word, 0x0021); // enable, MME = 2
    assert_eq!(
        b.device(GUEST_NIC).unwrap().msi(),
        Some(GuestMsi {
            enabled: true,
            vectors_log2: 2,
            address: 0xfee0_1000,
            data: 0x4041,
            mask: 0b1010
        })
    );
    // Reads show the guest's values merged with the host's read-only bits
    // (64-bit, per-vector masking, MMC = 2).
    assert_eq!(
        b.read(GUEST_NIC, MSI + 2, Word),
        0x0021 | (1 << 7) | (1 << 8) | (2 << 1)
    );
    assert_eq!(b.read(GUEST_NIC, MSI + 4, Dword), 0xfee0_1000);
    assert_eq!(b.read(GUEST_NIC, MSI + 0xc, Word), 0x4041);
    // MSI-X enable and function mask.
    b.write(GUEST_NIC, msix + 2, Word, 0xc000);
    assert_eq!(
        b.device(GUEST_NIC).unwrap().msix(),
        Some(GuestMsix {
            enabled: true,
            function_mask: true
        })
    );
    assert_eq!(
        b.read(GUEST_NIC, msix + 2, Word),
        0xc003,
        "table size 4 (N-1) from the host"
    );
    // Not a single raw write reached the device.
    assert_eq!(cfg.writes().len(), writes_before);
    assert_eq!(cfg.snapshot(NIC).unwrap(), host_before);
    assert_eq!(b.take_interrupt_changes(), [GUEST_NIC]);
    assert_eq!(b.take_interrupt_changes(), []);
    // Rewriting the same values is not a change.
    b.write(GUEST_NIC, MSI + 4, Dword, 0xfee0_1000);
    assert_eq!(b.take_interrupt_changes(), []);
}

#[test]
fn multi_function_bit_follows_the_guest_slot() {
    let cfg = ModelConfigSpace::new();
    let f0 = PciAddress::new(0, 0, 5, 0);
    let f1 = PciAddress::new(0, 0, 5, 1);
    cfg.add(
        f0,
        FunctionBuilder::endpoint(1, 2, 0x0c_03_30).multi_function(),
    );
    cfg.add(f1, FunctionBuilder::endpoint(1, 3, 0x0c_03_30));
    let topo = enumerate(&cfg, Segment(0), &[0], 0..=0);
    // Only function 1 is passed through, as guest function 0.
    let one =
        GuestPciBus::new(&cfg, &[(topo.get(f1).unwrap(), GUEST_NIC)], WINDOW, 1 << 20).unwrap();
    assert_eq!(one.read(GUEST_NIC, 0x0e, Byte), 0x00);
    let both = GuestPciBus::new(
        &cfg,
        &[
            (topo.get(f1).unwrap(), Bdf::new(0, 1, 0)),
            (topo.get(f0).unwrap(), Bdf::new(0, 1, 1)),
        ],
        WINDOW,
        1 << 20,
    )
    .unwrap();
    assert_eq!(both.read(Bdf::new(0, 1, 0), 0x0e, Byte), 0x80);
    assert_eq!(both.read(Bdf::new(0, 1, 1), 0x0e, Byte), 0x80);
}

#[test]
fn ecam_window_decoding() {
    let w = EcamWindow {
        base: layout::ECAM_BASE,
        buses: 1,
    };
    assert_eq!(w.size(), layout::ECAM_SIZE);
    assert_eq!(
        w.decode(layout::ECAM_BASE + 0x8004),
        Some((Bdf::new(0, 1, 0), 4))
    );
    assert_eq!(
        w.decode(layout::ECAM_BASE + 0xf_fffc),
        Some((Bdf::new(0, 31, 7), 0xffc))
    );
    assert_eq!(
        w.decode(layout::ECAM_BASE + (1 << 20)),
        None,
        "bus 1 is outside"
    );
    assert_eq!(w.decode(layout::ECAM_BASE - 1), None);
    assert_eq!(
        w.address(Bdf::new(0, 1, 0), 0x10),
        layout::ECAM_BASE + 0x8010
    );
}

/// Guest RAM with code at 0x1000, and a bus with the NIC.
struct Machine {
    ram: GuestRam<&'static ModelFrames>,
    regs: GuestRegisters,
    window: EcamWindow,
}

impl Machine {
    fn new(code: &[u8]) -> Self {
        let frames: &'static ModelFrames = Box::leak(Box::new(ModelFrames::new()));
        let ram = GuestRam::new(frames, &[(0, 0x10000)]).unwrap();
        ram.write(0x1000, code).unwrap();
        Self {
            ram,
            regs: GuestRegisters::new(),
            window: EcamWindow {
                base: layout::ECAM_BASE,
                buses: 1,
            },
        }
    }

    fn exit<C: ConfigSpace>(
        &mut self,
        bus: &mut GuestPciBus<C>,
        gpa: u64,
        access: AccessKind,
    ) -> Result<u8, MmioError> {
        emulate_ecam_access(
            bus,
            &self.window,
            gpa,
            access,
            &IdentityFetch(&self.ram),
            0x1000,
            CodeMode::Long64,
            &mut self.regs,
        )
    }
}

#[test]
fn ecam_loads_and_stores_from_guest_instructions() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    b.set_bus_master_allowed(GUEST_NIC, true);
    let base = layout::ECAM_BASE + 0x8000; // guest 00:01.0

    // mov eax, [rdi]: vendor/device into EAX, upper RAX cleared.
    let mut m = Machine::new(&[0x8b, 0x07]);
    m.regs.gprs[0] = u64::MAX;
    assert_eq!(m.exit(&mut b, base, AccessKind::Read), Ok(2));
    assert_eq!(m.regs.gprs[0], 0x10d3_8086);

    // movzx ecx, word [rdi+2]: device ID.
    let mut m = Machine::new(&[0x0f, 0xb7, 0x4f, 0x02]);
    m.regs.gprs[1] = u64::MAX;
    assert_eq!(m.exit(&mut b, base + 2, AccessKind::Read), Ok(4));
    assert_eq!(m.regs.gprs[1], 0x10d3);

    // mov word [rdi+4], 0x6 (memory + bus master), with 66 prefix.
    let mut m = Machine::new(&[0x66, 0xc7, 0x47, 0x04, 0x06, 0x00]);
    assert_eq!(m.exit(&mut b, base + 4, AccessKind::Write), Ok(6));
    assert_eq!(cfg.read16(NIC, COMMAND).unwrap() & 0x6, 0x6);

    // mov [rdi+0x10], r8d: BAR sizing through a REX register.
    let mut m = Machine::new(&[0x44, 0x89, 0x47, 0x10]);
    m.regs.gprs[8] = 0xffff_ffff;
    assert_eq!(m.exit(&mut b, base + 0x10, AccessKind::Write), Ok(4));
    let mut m = Machine::new(&[0x8b, 0x47, 0x10]);
    assert_eq!(m.exit(&mut b, base + 0x10, AccessKind::Read), Ok(3));
    assert_eq!(m.regs.gprs[0], 0xffff_c004);

    // mov al, [rdi + 0x0e]: a byte load keeps the rest of RAX.
    let mut m = Machine::new(&[0x8a, 0x47, 0x0e]);
    m.regs.gprs[0] = 0x1122_3344_5566_7788;
    assert_eq!(m.exit(&mut b, base + 0x0e, AccessKind::Read), Ok(3));
    assert_eq!(m.regs.gprs[0], 0x1122_3344_5566_7700);

    // An unowned function reads all ones.
    let mut m = Machine::new(&[0x8b, 0x07]);
    assert_eq!(
        m.exit(&mut b, layout::ECAM_BASE + 0x10000, AccessKind::Read),
        Ok(2)
    );
    assert_eq!(m.regs.gprs[0], 0xffff_ffff);

    // A qword load is not a valid ECAM access: all ones, nothing else.
    let mut m = Machine::new(&[0x48, 0x8b, 0x07]);
    assert_eq!(m.exit(&mut b, base, AccessKind::Read), Ok(3));
    assert_eq!(m.regs.gprs[0], u64::MAX);
}

#[test]
fn ecam_exits_that_cannot_be_emulated_stop_the_vm() {
    let (cfg, topo) = host();
    let mut b = bus(&cfg, &topo);
    let base = layout::ECAM_BASE + 0x8000;
    // A load that faulted as a write.
    let mut m = Machine::new(&[0x8b, 0x07]);
    assert_eq!(
        m.exit(&mut b, base, AccessKind::Write),
        Err(MmioError::AccessMismatch)
    );
    // Executing from the window.
    assert_eq!(
        m.exit(&mut b, base, AccessKind::Execute),
        Err(MmioError::AccessMismatch)
    );
    // Not a memory instruction.
    let mut m = Machine::new(&[0xf4]);
    assert_eq!(
        m.exit(&mut b, base, AccessKind::Read),
        Err(MmioError::NotAMemoryAccess)
    );
    // An instruction Sluice does not emulate (add [rdi], eax).
    let mut m = Machine::new(&[0x01, 0x07]);
    assert!(matches!(
        m.exit(&mut b, base, AccessKind::Write),
        Err(MmioError::Decode(DecodeError::UnsupportedOpcode { .. }))
    ));
    // Outside the window.
    let mut m = Machine::new(&[0x8b, 0x07]);
    assert_eq!(
        m.exit(&mut b, 0x5000, AccessKind::Read),
        Err(MmioError::NotEcam(0x5000))
    );
}

#[test]
fn from_a_validated_vm_to_the_guest_bus_and_start_info() {
    use sluice_hypervisor::vm::boot::{StartInfoDevice, start_info_devices};
    use sluice_hypervisor::vm::config::{
        PlatformDevice, PlatformLimits, VmConfig, passthrough_functions, validate,
    };
    let (cfg, topo) = host();
    let platform: Vec<PlatformDevice> = topo
        .functions
        .iter()
        .map(|f| PlatformDevice {
            address: f.addr,
            group: u32::from(f.addr.bdf.device()),
            iommu: true,
            bridge: f.is_bridge(),
        })
        .collect();
    let vm = VmConfig::parse("net0:mem=64M:image=guest0:dev=0000:00:04.0+0000:00:03.0").unwrap();
    let limits = PlatformLimits {
        memory: 1 << 30,
        max_cpus: 4,
    };
    let valid = validate(&[vm], &platform, limits).unwrap().remove(0);
    let topologies = [topo];
    let functions = passthrough_functions(&valid.devices, &topologies);
    assert_eq!(functions.len(), 2);
    let b = GuestPciBus::new(&cfg, &functions, WINDOW, layout::BAR_WINDOW_SIZE).unwrap();
    // 00:04.0 came first: guest 00:01.0; the NIC is 00:02.0.
    assert_eq!(b.read(Bdf::new(0, 1, 0), 0, Dword), 0x11e8_1234);
    assert_eq!(b.read(Bdf::new(0, 2, 0), 0, Dword), 0x10d3_8086);
    assert_eq!(
        start_info_devices(&valid.devices, &topologies),
        [
            StartInfoDevice {
                guest_bdf: sluice_abi::bdf(0, 0, 1, 0),
                vendor_id: 0x1234,
                device_id: 0x11e8,
                class_code: 0x00_ff_00,
                iommu_group: 4
            },
            StartInfoDevice {
                guest_bdf: sluice_abi::bdf(0, 0, 2, 0),
                vendor_id: 0x8086,
                device_id: 0x10d3,
                class_code: 0x02_00_00,
                iommu_group: 3
            },
        ]
    );
}
