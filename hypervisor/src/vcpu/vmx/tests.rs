//! The VMX backend over a VMCS model and scripted VM entries.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::*;
use crate::vcpu::{DescriptorTable, InstructionLength, PAT_RESET_VALUE, VcpuExit};
use exit::reason;

#[derive(Default, Debug)]
struct ModelVmcs(BTreeMap<u32, u64>);

impl VmcsAccess for ModelVmcs {
    fn read(&self, encoding: u32) -> u64 {
        self.0.get(&encoding).copied().unwrap_or(0)
    }
    fn write(&mut self, encoding: u32, value: u64) {
        // The model keeps each field at its width, as VMWRITE does.
        let value = match fields::width_of(encoding) {
            fields::Width::Bits16 => value & 0xffff,
            fields::Width::Bits32 => value & 0xffff_ffff,
            _ => value,
        };
        self.0.insert(encoding, value);
    }
}

/// One scripted exit: reason, qualification, instruction length, GPA,
/// IDT-vectoring info.
type Step = (u32, u64, u32, u64, u32);

#[derive(Default)]
struct Scripted {
    steps: Vec<Step>,
    entries: Vec<(bool, u32)>,
    invepts: Vec<u64>,
    fail_entry: Option<u32>,
}

impl VmxHardware for Scripted {
    type Vmcs = ModelVmcs;
    fn create_vmcs(&mut self) -> Result<ModelVmcs, VcpuError> {
        Ok(ModelVmcs::default())
    }
    fn enter(
        &mut self,
        vmcs: &mut ModelVmcs,
        gprs: &mut GuestRegisters,
        launched: bool,
    ) -> Result<(), u32> {
        if let Some(e) = self.fail_entry {
            return Err(e);
        }
        let injected = vmcs.read32(control32::ENTRY_INTERRUPTION_INFO);
        self.entries.push((launched, injected));
        // VM exits clear the valid bit of the entry interruption field.
        vmcs.write32(
            control32::ENTRY_INTERRUPTION_INFO,
            injected & !interruption::VALID,
        );
        let (r, q, len, gpa, idt) = self.steps.remove(0);
        vmcs.write32(exit32::EXIT_REASON, r);
        vmcs.write_natural(exit_natural::EXIT_QUALIFICATION, q);
        vmcs.write32(exit32::EXIT_INSTRUCTION_LENGTH, len);
        vmcs.write64(exit64::GUEST_PHYSICAL_ADDRESS, gpa);
        vmcs.write32(exit32::IDT_VECTORING_INFO, idt);
        gprs.gprs[gpr::RBX] = 0x7000;
        Ok(())
    }
    fn invalidate_ept(&mut self, eptp: u64) {
        self.invepts.push(eptp);
    }
    fn physical_address(&self, object: *const u8) -> PhysAddr {
        PhysAddr::new(object as u64 & ((1 << 39) - 1))
    }
}

/// Capabilities of a typical server: everything Sluice wants is allowed,
/// the usual default-1 bits are required.
fn caps() -> VmxCapabilities {
    VmxCapabilities {
        pin: (0xffu64 << 32) | 0x16,
        primary: (0xffff_fffeu64 << 32) | 0x0401_e172,
        secondary: 0x00ff_ffffu64 << 32,
        exit: (0x00ff_ffffu64 << 32) | 0x0003_6dfb,
        entry: (0x0003_ffffu64 << 32) | 0x0000_11fb,
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x003f_ffff,
        ept_execute_only: true,
        physical_bits: 46,
    }
}

fn entry() -> EntryState {
    let mut registers = GuestRegisters::new();
    registers.rip = 0x10_0000;
    registers.gprs[gpr::RSP] = 0xfff8;
    EntryState {
        registers,
        cr0: cr::CR0_PE | cr::CR0_ET | cr::CR0_NE | cr::CR0_PG,
        cr3: 0x4000,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA,
        cs: Segment::flat_code64(8),
        ds: Segment::flat_data(16),
        es: Segment::flat_data(16),
        ss: Segment::flat_data(16),
        fs: Segment::flat_data(16),
        gs: Segment::flat_data(16),
        tr: Segment::system(0x18, Segment::TYPE_TSS64_BUSY, 0x1080, 0x67),
        ldtr: Segment::unusable(),
        gdtr: DescriptorTable {
            base: 0x1000,
            limit: 39,
        },
        idtr: DescriptorTable::default(),
        pat: PAT_RESET_VALUE,
    }
}

fn backend(steps: &[Step]) -> VmxBackend<Scripted> {
    let hw = Scripted {
        steps: steps.to_vec(),
        ..Default::default()
    };
    VmxBackend::new(hw, caps()).unwrap()
}

#[test]
fn controls_are_adjusted_or_refused() {
    let b = backend(&[]);
    let c = b.controls();
    assert_eq!(c.pin & 0x16, 0x16, "default-1 bits added");
    assert_eq!(c.pin & sluice::PIN, sluice::PIN);
    assert_ne!(c.secondary & controls::secondary::ENABLE_EPT, 0);
    // A processor without EPT cannot run Sluice guests.
    let mut no_ept = caps();
    no_ept.secondary &= !((controls::secondary::ENABLE_EPT as u64) << 32);
    assert!(matches!(
        VmxBackend::new(Scripted::default(), no_ept),
        Err(VcpuError::Unsupported(_))
    ));
}

#[test]
fn guest_state_written_from_the_entry_state() {
    let mut b = backend(&[]);
    let v = b.create_vcpu(&entry()).unwrap();
    let m = v.vmcs();
    assert_eq!(m.read16(guest16::CS_SELECTOR), 8);
    assert_eq!(m.read32(guest32::CS_ACCESS_RIGHTS), 0xa09b);
    assert_eq!(m.read32(guest32::SS_ACCESS_RIGHTS), 0xc093);
    assert_eq!(m.read32(guest32::TR_ACCESS_RIGHTS), 0x8b);
    assert_eq!(m.read_natural(guest_natural::TR_BASE), 0x1080);
    assert_eq!(m.read32(guest32::LDTR_ACCESS_RIGHTS), 1 << 16, "unusable");
    assert_eq!(m.read_natural(guest_natural::GDTR_BASE), 0x1000);
    assert_eq!(m.read32(guest32::GDTR_LIMIT), 39);
    assert_eq!(m.read_natural(guest_natural::RIP), 0x10_0000);
    assert_eq!(m.read_natural(guest_natural::RSP), 0xfff8);
    assert_eq!(m.read_natural(guest_natural::RFLAGS), 2);
    assert_eq!(
        m.read_natural(guest_natural::CR4),
        cr::CR4_PAE | cr::CR4_VMXE
    );
    assert_eq!(
        m.read_natural(control_natural::CR4_READ_SHADOW),
        cr::CR4_PAE,
        "VMXE hidden"
    );
    assert_eq!(m.read64(guest64::VMCS_LINK_POINTER), u64::MAX);
    assert_eq!(m.read64(guest64::EFER), cr::EFER_LME | cr::EFER_LMA);
    assert_eq!(m.read64(guest64::PAT), PAT_RESET_VALUE);
    assert_eq!(m.read16(control16::VPID), 1);
    assert_ne!(
        m.read32(control32::ENTRY_CONTROLS) & controls::entry::IA32E_MODE_GUEST,
        0
    );
    assert_eq!(m.read64(control64::IO_BITMAP_A) % 4096, 0);
    assert_eq!(
        m.read64(control64::IO_BITMAP_B) - m.read64(control64::IO_BITMAP_A),
        4096
    );
    // CR0 not allowed by the fixed bits, and LMA without CS.L.
    let mut bad = entry();
    bad.cr0 |= 1 << 40;
    assert!(matches!(
        b.create_vcpu(&bad),
        Err(VcpuError::InvalidGuestState(_))
    ));
    let mut bad = entry();
    bad.cs.long = false;
    assert!(matches!(
        b.create_vcpu(&bad),
        Err(VcpuError::InvalidGuestState(_))
    ));
}

#[test]
fn run_decodes_exits_and_skips_instructions() {
    let mut b = backend(&[
        (u32::from(reason::VMCALL), 0, 3, 0, 0),
        (
            u32::from(reason::EPT_VIOLATION),
            exit::ept::WRITE,
            0,
            0xe000_8004,
            0,
        ),
    ]);
    let mut v = b.create_vcpu(&entry()).unwrap();
    assert!(
        matches!(b.run(&mut v), Err(VcpuError::InvalidGuestState(_))),
        "no EPT yet"
    );
    b.set_nested_root(&mut v, PhysAddr::new(0x20_0000)).unwrap();
    assert_eq!(v.vmcs().read64(control64::EPT_POINTER), 0x20_001e);
    assert_eq!(b.hardware().invepts, [0x20_001e]);
    let mut r = b.registers(&v);
    r.gprs[gpr::RAX] = sluice_abi::cmd::IOAS_ALLOC;
    b.set_registers(&mut v, &r);
    let e = b.run(&mut v).unwrap();
    assert_eq!(
        e,
        Exit {
            reason: VcpuExit::Hypercall {
                command: sluice_abi::cmd::IOAS_ALLOC,
                argument: 0x7000
            },
            rip: 0x10_0000,
            length: InstructionLength::Known(3)
        }
    );
    b.advance_rip(&mut v, 3).unwrap();
    assert_eq!(b.registers(&v).rip, 0x10_0003);
    let e = b.run(&mut v).unwrap();
    assert!(matches!(
        e.reason,
        VcpuExit::NestedPageFault {
            gpa: 0xe000_8004,
            ..
        }
    ));
    // VMLAUNCH first, VMRESUME after.
    assert_eq!(
        b.hardware().entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        [false, true]
    );
    assert_eq!(
        b.set_nested_root(&mut v, PhysAddr::new(0x123)),
        Err(VcpuError::BadNestedRoot(PhysAddr::new(0x123)))
    );
}

#[test]
fn injection_and_redelivery() {
    let pf = interruption::encode(14, interruption::TYPE_HARDWARE_EXCEPTION, true);
    let mut b = backend(&[
        (
            u32::from(reason::EPT_VIOLATION),
            exit::ept::WRITE,
            0,
            0x5000,
            pf,
        ),
        (u32::from(reason::HLT), 0, 1, 0, 0),
    ]);
    let mut v = b.create_vcpu(&entry()).unwrap();
    b.set_nested_root(&mut v, PhysAddr::new(0x20_0000)).unwrap();
    b.inject_event(
        &mut v,
        Event::Exception {
            vector: 14,
            error_code: Some(2),
        },
    )
    .unwrap();
    assert_eq!(
        b.inject_event(&mut v, Event::Nmi),
        Err(VcpuError::EventPending)
    );
    assert_eq!(v.vmcs().read32(control32::ENTRY_EXCEPTION_ERROR_CODE), 2);
    // An aarch64 exception is refused and leaves the #PF queued.
    assert!(matches!(
        b.inject_aarch64_exception(&mut v, crate::vcpu::Aarch64Exception::Undefined),
        Err(VcpuError::Unsupported(_))
    ));
    assert_eq!(v.vmcs().read32(control32::ENTRY_INTERRUPTION_INFO), pf);
    // The #PF's delivery hits an EPT violation: it is queued again.
    b.run(&mut v).unwrap();
    assert_eq!(b.hardware().entries[0].1, pf);
    assert_eq!(v.vmcs().read32(control32::ENTRY_INTERRUPTION_INFO), pf);
    b.run(&mut v).unwrap();
    assert_eq!(b.hardware().entries[1].1, pf);
    assert_eq!(
        v.vmcs().read32(control32::ENTRY_INTERRUPTION_INFO) & interruption::VALID,
        0
    );
    b.inject_event(&mut v, Event::Interrupt { vector: 0x40 })
        .unwrap();
    assert_eq!(
        v.vmcs().read32(control32::ENTRY_INTERRUPTION_INFO),
        0x8000_0040
    );
}

#[test]
fn entry_failures_are_errors() {
    let mut b = backend(&[(
        exit::EXIT_REASON_ENTRY_FAILURE | u32::from(reason::INVALID_GUEST_STATE),
        0,
        0,
        0,
        0,
    )]);
    let mut v = b.create_vcpu(&entry()).unwrap();
    b.set_nested_root(&mut v, PhysAddr::new(0x20_0000)).unwrap();
    assert_eq!(
        b.run(&mut v),
        Err(VcpuError::InvalidGuestState(
            "VM entry failed: invalid guest state"
        ))
    );
    b.hardware_mut().fail_entry = Some(7);
    assert_eq!(
        b.run(&mut v),
        Err(VcpuError::InvalidGuestState(
            "VM entry with invalid control fields"
        ))
    );
}

#[test]
fn bitmaps() {
    let mut io = alloc::boxed::Box::new(IoBitmaps::intercept_all());
    io.allow(0x7ffe, 4);
    assert!(!io.intercepts(0x7ffe, 4), "spans bitmaps A and B");
    assert_eq!(io.bitmap_a()[0xfff], 0x3f);
    assert_eq!(io.bitmap_b()[0], 0xfc);
    assert!(io.intercepts(0x7ffd, 2));
    io.allow(0xfffe, 2);
    assert!(!io.intercepts(0xfffe, 2));
    assert!(io.intercepts(0xffff, 2), "wrapping accesses always exit");

    let m = alloc::boxed::Box::new(MsrBitmap::sluice_default());
    assert!(!m.intercepts(0xc000_0100, MsrAccess::Read));
    assert!(!m.intercepts(0x174, MsrAccess::Write));
    assert!(m.intercepts(0xc000_0080, MsrAccess::Write));
    assert!(
        m.intercepts(0xc001_0000, MsrAccess::Read),
        "outside both ranges"
    );
    // FS.base: high read bitmap at byte 1024, bit 0x100 → byte 1024 + 32.
    assert_eq!(m.as_bytes()[1024 + 32] & 1, 0);
    assert_eq!(m.as_bytes()[3072 + 32] & 1, 0);
    let mut m2 = MsrBitmap::intercept_all();
    assert!(!m2.set(0x4000_0000, MsrAccess::Read, false));
}
