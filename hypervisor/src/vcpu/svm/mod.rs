//! AMD SVM: the VMCB ([`vmcb`]), exit decoding ([`exit`]), the I/O and
//! MSR permission maps ([`permission_maps`]), ASIDs ([`asid`]) and the
//! [`VcpuBackend`] over them ([`SvmBackend`]).
//!
//! The backend is complete except for the instruction sequence that
//! enters the guest (VMLOAD, VMRUN, VMSAVE and the GPR save/restore
//! around them), which is the [`SvmHardware`] trait: the bare-metal kernel
//! implements it, host tests script it.

pub mod asid;
pub mod exit;
pub mod permission_maps;
pub mod vmcb;

use alloc::boxed::Box;

use sluice_hal::PhysAddr;

use super::{
    EntryState, Event, Exit, GuestRegisters, TranslationState, VcpuBackend, VcpuError, gpr,
};
use asid::{AsidAllocator, AsidError};
use permission_maps::{IoPermissionMap, MsrPermissionMap};
use vmcb::{
    CleanBits, EventInjection, INTERRUPT_SHADOW, NP_ENABLE, Vmcb, VmcbSetup, check_consistency,
    event_type, tlb_control,
};

/// SVM features of the processor (CPUID Fn8000_000A, APM vol. 3 appendix
/// E.4.9) and its physical address width (Fn8000_0008 EAX bits 7:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvmFeatures {
    /// EBX: number of ASIDs.
    pub asids: u32,
    /// EDX bit 0: nested paging.
    pub nested_paging: bool,
    /// EDX bit 3: the VMCB nRIP field is filled on instruction intercepts.
    pub nrips: bool,
    /// EDX bit 5: VMCB clean bits are honoured.
    pub vmcb_clean: bool,
    /// EDX bit 6: TLB_CONTROL values 3 and 7.
    pub flush_by_asid: bool,
    /// EDX bit 7: guest instruction bytes in the VMCB on #NPF.
    pub decode_assists: bool,
    pub physical_bits: u32,
}

impl SvmFeatures {
    /// Decodes CPUID Fn8000_000A EBX/EDX and Fn8000_0008 EAX.
    pub const fn from_cpuid(
        fn8000_000a_ebx: u32,
        fn8000_000a_edx: u32,
        fn8000_0008_eax: u32,
    ) -> Self {
        Self {
            asids: fn8000_000a_ebx,
            nested_paging: fn8000_000a_edx & (1 << 0) != 0,
            nrips: fn8000_000a_edx & (1 << 3) != 0,
            vmcb_clean: fn8000_000a_edx & (1 << 5) != 0,
            flush_by_asid: fn8000_000a_edx & (1 << 6) != 0,
            decode_assists: fn8000_000a_edx & (1 << 7) != 0,
            physical_bits: fn8000_0008_eax & 0xff,
        }
    }
}

/// What only bare metal can do.
pub trait SvmHardware {
    /// The physical address of a host object (a VMCB, a permission map):
    /// the identity on Sluice's own page tables.
    fn physical_address(&self, object: *const u8) -> PhysAddr;
    /// Enters the guest of `vmcb` and returns at its next `#VMEXIT`. VMRUN
    /// loads and saves RAX, RSP, RIP and RFLAGS through the VMCB; the other
    /// general-purpose registers are loaded from and saved to `gprs`
    /// (whose RAX/RSP slots are ignored).
    fn vmrun(&mut self, vmcb: &mut Vmcb, gprs: &mut GuestRegisters);
}

/// One SVM vCPU.
pub struct SvmVcpu {
    vmcb: Box<Vmcb>,
    gprs: GuestRegisters,
    asid: u32,
}

impl SvmVcpu {
    pub fn vmcb(&self) -> &Vmcb {
        &self.vmcb
    }
    pub fn asid(&self) -> u32 {
        self.asid
    }
}

/// The SVM implementation of [`VcpuBackend`].
pub struct SvmBackend<H: SvmHardware> {
    hardware: H,
    features: SvmFeatures,
    asids: AsidAllocator,
    iopm: Box<IoPermissionMap>,
    msrpm: Box<MsrPermissionMap>,
}

impl<H: SvmHardware> SvmBackend<H> {
    /// A backend with every port intercepted and the default MSR policy
    /// ([`MsrPermissionMap::sluice_default`]). Refuses a processor without
    /// nested paging: Sluice never runs a guest on host-physical memory.
    pub fn new(hardware: H, features: SvmFeatures) -> Result<Self, VcpuError> {
        if !features.nested_paging {
            return Err(VcpuError::Unsupported("SVM without nested paging"));
        }
        Ok(Self {
            hardware,
            features,
            asids: AsidAllocator::new(features.asids),
            iopm: Box::new(IoPermissionMap::intercept_all()),
            msrpm: Box::new(MsrPermissionMap::sluice_default()),
        })
    }

    pub fn features(&self) -> &SvmFeatures {
        &self.features
    }
    pub fn hardware(&self) -> &H {
        &self.hardware
    }
    pub fn hardware_mut(&mut self) -> &mut H {
        &mut self.hardware
    }
    /// The shared I/O permission map (open a passed-through I/O BAR here).
    pub fn io_permission_map_mut(&mut self) -> &mut IoPermissionMap {
        &mut self.iopm
    }
    pub fn msr_permission_map_mut(&mut self) -> &mut MsrPermissionMap {
        &mut self.msrpm
    }

    fn flush_value(&self) -> u8 {
        if self.features.flush_by_asid {
            tlb_control::FLUSH_GUEST
        } else {
            tlb_control::FLUSH_ALL
        }
    }
}

impl<H: SvmHardware> VcpuBackend for SvmBackend<H> {
    type Vcpu = SvmVcpu;

    /// Releases the vCPU's ASID.
    fn destroy_vcpu(&mut self, vcpu: SvmVcpu) {
        if let Err(e) = self.asids.free(vcpu.asid) {
            log::error!("SVM: freeing vCPU ASID failed: {e:?}");
        }
    }

    fn create_vcpu(&mut self, entry: &EntryState) -> Result<SvmVcpu, VcpuError> {
        let asid = self.asids.allocate().map_err(|e| match e {
            AsidError::Exhausted => VcpuError::OutOfAsids,
            AsidError::NotAllocated(_) => VcpuError::OutOfAsids,
        })?;
        let setup = VmcbSetup {
            asid,
            iopm_base_pa: self
                .hardware
                .physical_address(self.iopm.as_bytes().as_ptr())
                .as_u64(),
            msrpm_base_pa: self
                .hardware
                .physical_address(self.msrpm.as_bytes().as_ptr())
                .as_u64(),
            n_cr3: 0,
        };
        let vmcb = Box::new(Vmcb::for_entry(entry, &setup));
        Ok(SvmVcpu {
            vmcb,
            gprs: entry.registers,
            asid,
        })
    }

    fn run(&mut self, vcpu: &mut SvmVcpu) -> Result<Exit, VcpuError> {
        if vcpu.vmcb.control.nested_control & NP_ENABLE == 0 {
            return Err(VcpuError::InvalidGuestState(
                "nested paging is not set up (set_nested_root first)",
            ));
        }
        check_consistency(&vcpu.vmcb, self.features.physical_bits)
            .map_err(|e| VcpuError::InvalidGuestState(e.describe()))?;
        if !self.features.vmcb_clean {
            vcpu.vmcb.control.clean_bits = CleanBits::empty();
        }
        self.hardware.vmrun(&mut vcpu.vmcb, &mut vcpu.gprs);

        let c = &mut vcpu.vmcb.control;
        c.tlb_control = tlb_control::DO_NOTHING;
        // The processor's cached copy now matches the VMCB; setters clear
        // the bits of what they change.
        c.clean_bits = CleanBits::ALL;
        // An event whose delivery was interrupted by the exit is
        // re-injected (APM vol. 2, 15.7.2); a delivered one is gone.
        c.event_injection = if c.exit_int_info.is_valid() {
            c.exit_int_info
        } else {
            EventInjection(0)
        };
        if c.exit_code == exit::code::INVALID {
            return Err(VcpuError::InvalidGuestState(
                "VMRUN refused the guest state (VMEXIT_INVALID)",
            ));
        }
        Ok(exit::decode_exit(
            &vcpu.vmcb,
            &vcpu.gprs,
            self.features.nrips,
        ))
    }

    fn registers(&self, vcpu: &SvmVcpu) -> GuestRegisters {
        let mut r = vcpu.gprs;
        r.gprs[gpr::RAX] = vcpu.vmcb.save.rax;
        r.gprs[gpr::RSP] = vcpu.vmcb.save.rsp;
        r.rip = vcpu.vmcb.save.rip;
        r.rflags = vcpu.vmcb.save.rflags;
        r
    }

    fn translation_state(&self, vcpu: &SvmVcpu) -> TranslationState {
        let s = &vcpu.vmcb.save;
        let cs = s.cs.to_segment();
        TranslationState {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs_long: cs.long,
            cs_default_big: cs.default_big,
        }
    }

    fn set_registers(&mut self, vcpu: &mut SvmVcpu, registers: &GuestRegisters) {
        vcpu.gprs = *registers;
        vcpu.vmcb.save.rax = registers.gprs[gpr::RAX];
        vcpu.vmcb.save.rsp = registers.gprs[gpr::RSP];
        vcpu.vmcb.save.rip = registers.rip;
        vcpu.vmcb.save.rflags = registers.rflags | super::RFLAGS_RESERVED_ONE;
    }

    fn advance_rip(&mut self, vcpu: &mut SvmVcpu, length: u8) -> Result<(), VcpuError> {
        if !(1..=15).contains(&length) {
            return Err(VcpuError::BadInstructionLength(u64::from(length)));
        }
        let s = &mut vcpu.vmcb.save;
        s.rip = s.rip.wrapping_add(u64::from(length));
        vcpu.vmcb.control.interrupt_shadow &= !INTERRUPT_SHADOW;
        Ok(())
    }

    fn inject_event(&mut self, vcpu: &mut SvmVcpu, event: Event) -> Result<(), VcpuError> {
        event.validate()?;
        if vcpu.vmcb.control.event_injection.is_valid() {
            return Err(VcpuError::EventPending);
        }
        vcpu.vmcb.control.event_injection = match event {
            Event::Exception { vector, error_code } => {
                EventInjection::new(vector, event_type::EXCEPTION, error_code)
            }
            Event::Interrupt { vector } => EventInjection::new(vector, event_type::INTR, None),
            Event::Nmi => EventInjection::new(2, event_type::NMI, None),
        };
        Ok(())
    }

    fn set_nested_root(&mut self, vcpu: &mut SvmVcpu, root: PhysAddr) -> Result<(), VcpuError> {
        let bits = self.features.physical_bits.min(63);
        if root.as_u64() == 0 || !root.is_page_aligned() || root.as_u64() >> bits != 0 {
            return Err(VcpuError::BadNestedRoot(root));
        }
        let flush = self.flush_value();
        let c = &mut vcpu.vmcb.control;
        c.nested_control |= NP_ENABLE;
        c.n_cr3 = root.as_u64();
        c.tlb_control = flush;
        c.clean_bits = c.clean_bits.difference(CleanBits::NP);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::{DescriptorTable, InstructionLength, PAT_RESET_VALUE, Segment, VcpuExit, cr};
    use alloc::vec::Vec;

    /// Records what each VMRUN saw and plays one scripted exit per run.
    #[derive(Default)]
    struct Scripted {
        exits: Vec<(u64, u64, u64)>,
        seen: Vec<Vmcb>,
        /// Value to leave in RBX, to check GPRs flow back.
        rbx_after: u64,
        interrupt_delivery: bool,
    }

    impl SvmHardware for Scripted {
        fn physical_address(&self, object: *const u8) -> PhysAddr {
            // A stand-in physical address below the 40-bit MAXPHYADDR of
            // `features()`, keeping the object's page alignment.
            PhysAddr::new(object as u64 & ((1 << 39) - 1))
        }
        fn vmrun(&mut self, vmcb: &mut Vmcb, gprs: &mut GuestRegisters) {
            self.seen.push(*vmcb);
            let (code, info1, info2) = self.exits.remove(0);
            vmcb.control.exit_code = code;
            vmcb.control.exit_info1 = info1;
            vmcb.control.exit_info2 = info2;
            vmcb.control.exit_int_info = if self.interrupt_delivery {
                vmcb.control.event_injection
            } else {
                EventInjection(0)
            };
            gprs.gprs[gpr::RBX] = self.rbx_after;
        }
    }

    fn features() -> SvmFeatures {
        // QEMU TCG: NPT, no NRIPS, no decode assists, 16 ASIDs.
        SvmFeatures::from_cpuid(16, 1, 40)
    }

    fn entry() -> EntryState {
        let mut registers = GuestRegisters::new();
        registers.rip = 0x10_0000;
        EntryState {
            registers,
            cr0: cr::CR0_PE | cr::CR0_ET | cr::CR0_NE | cr::CR0_PG,
            cr3: 0x1000,
            cr4: cr::CR4_PAE,
            efer: cr::EFER_LME | cr::EFER_LMA,
            cs: Segment::flat_code64(8),
            ds: Segment::flat_data(16),
            es: Segment::flat_data(16),
            ss: Segment::flat_data(16),
            fs: Segment::flat_data(16),
            gs: Segment::flat_data(16),
            tr: Segment::system(0, Segment::TYPE_TSS64_BUSY, 0, 0x67),
            ldtr: Segment::unusable(),
            gdtr: DescriptorTable { base: 0, limit: 23 },
            idtr: DescriptorTable::default(),
            pat: PAT_RESET_VALUE,
        }
    }

    fn backend(exits: &[(u64, u64, u64)]) -> SvmBackend<Scripted> {
        let hw = Scripted {
            exits: exits.to_vec(),
            rbx_after: 0x5000,
            ..Default::default()
        };
        SvmBackend::new(hw, features()).unwrap()
    }

    #[test]
    fn features_from_cpuid() {
        let f = SvmFeatures::from_cpuid(0x8000, 0b1110_1001, 0x3030);
        assert_eq!(f.asids, 0x8000);
        assert!(f.nested_paging && f.nrips && f.vmcb_clean && f.flush_by_asid && f.decode_assists);
        assert_eq!(f.physical_bits, 0x30);
        assert!(matches!(
            SvmBackend::new(Scripted::default(), SvmFeatures::from_cpuid(8, 0, 40)),
            Err(VcpuError::Unsupported(_))
        ));
    }

    #[test]
    fn refuses_to_run_without_nested_paging_or_with_bad_state() {
        let mut b = backend(&[]);
        let mut v = b.create_vcpu(&entry()).unwrap();
        assert!(matches!(
            b.run(&mut v),
            Err(VcpuError::InvalidGuestState(_))
        ));
        assert_eq!(
            b.set_nested_root(&mut v, PhysAddr::new(0x1234)),
            Err(VcpuError::BadNestedRoot(PhysAddr::new(0x1234)))
        );
        assert_eq!(
            b.set_nested_root(&mut v, PhysAddr::new(0)),
            Err(VcpuError::BadNestedRoot(PhysAddr::new(0)))
        );
        assert_eq!(
            b.set_nested_root(&mut v, PhysAddr::new(1 << 40)),
            Err(VcpuError::BadNestedRoot(PhysAddr::new(1 << 40)))
        );
        b.set_nested_root(&mut v, PhysAddr::new(0x8000)).unwrap();
        v.vmcb.save.cr4 = 0; // long mode without PAE
        assert_eq!(
            b.run(&mut v),
            Err(VcpuError::InvalidGuestState(
                "EFER.LME and CR0.PG with CR4.PAE=0"
            ))
        );
        assert!(b.hardware().seen.is_empty(), "VMRUN never attempted");
    }

    #[test]
    fn run_decodes_hypercall_and_skips_it() {
        let mut b = backend(&[(exit::code::VMMCALL, 0, 0), (exit::code::HLT, 0, 0)]);
        let mut v = b.create_vcpu(&entry()).unwrap();
        assert_eq!(v.asid(), 1);
        b.set_nested_root(&mut v, PhysAddr::new(0x8000)).unwrap();
        let mut regs = b.registers(&v);
        regs.gprs[gpr::RAX] = sluice_abi::cmd::IOAS_ALLOC;
        b.set_registers(&mut v, &regs);

        let exit = b.run(&mut v).unwrap();
        assert_eq!(
            exit,
            Exit {
                reason: VcpuExit::Hypercall {
                    command: sluice_abi::cmd::IOAS_ALLOC,
                    argument: 0x5000
                },
                rip: 0x10_0000,
                length: InstructionLength::Unknown
            }
        );
        let first = &b.hardware().seen[0];
        assert_eq!(first.control.n_cr3, 0x8000);
        assert_eq!(first.control.tlb_control, tlb_control::FLUSH_ALL);
        assert_eq!(first.control.guest_asid, 1);
        assert_eq!(first.control.iopm_base_pa % 4096, 0);

        b.advance_rip(&mut v, 3).unwrap();
        assert_eq!(b.registers(&v).rip, 0x10_0003);
        assert_eq!(
            b.advance_rip(&mut v, 0),
            Err(VcpuError::BadInstructionLength(0))
        );
        assert_eq!(
            b.advance_rip(&mut v, 16),
            Err(VcpuError::BadInstructionLength(16))
        );
        assert_eq!(b.run(&mut v).unwrap().reason, VcpuExit::Hlt);
        // The second entry did not flush the TLB again.
        assert_eq!(
            b.hardware().seen[1].control.tlb_control,
            tlb_control::DO_NOTHING
        );
        assert_eq!(b.hardware().seen[1].save.rip, 0x10_0003);
    }

    #[test]
    fn event_injection_and_redelivery() {
        let mut b = backend(&[
            (exit::code::NPF, 0, 0x1000),
            (exit::code::HLT, 0, 0),
            (exit::code::HLT, 0, 0),
        ]);
        let mut v = b.create_vcpu(&entry()).unwrap();
        b.set_nested_root(&mut v, PhysAddr::new(0x8000)).unwrap();
        let pf = Event::Exception {
            vector: 14,
            error_code: Some(2),
        };
        b.inject_event(&mut v, pf).unwrap();
        assert_eq!(
            b.inject_event(&mut v, Event::Nmi),
            Err(VcpuError::EventPending)
        );
        // An aarch64 exception is refused and leaves the #PF queued.
        assert!(matches!(
            b.inject_aarch64_exception(&mut v, crate::vcpu::Aarch64Exception::Undefined),
            Err(VcpuError::Unsupported(_))
        ));
        assert_eq!(
            v.vmcb().control.event_injection,
            EventInjection::new(14, 3, Some(2))
        );
        assert!(
            b.inject_event(&mut v, Event::Interrupt { vector: 3 })
                .is_err()
        );
        // The delivery is interrupted by a nested page fault: the event is
        // queued again for the next entry.
        b.hardware_mut().interrupt_delivery = true;
        b.run(&mut v).unwrap();
        assert_eq!(
            b.hardware().seen[0].control.event_injection,
            EventInjection::new(14, 3, Some(2))
        );
        assert_eq!(
            v.vmcb().control.event_injection,
            EventInjection::new(14, 3, Some(2))
        );
        // Delivered this time: nothing pending afterwards.
        b.hardware_mut().interrupt_delivery = false;
        b.run(&mut v).unwrap();
        assert!(!v.vmcb().control.event_injection.is_valid());
        b.inject_event(&mut v, Event::Interrupt { vector: 0x30 })
            .unwrap();
        assert_eq!(v.vmcb().control.event_injection.0, 0x8000_0030);
    }

    #[test]
    fn registers_round_trip_through_vmcb_and_gprs() {
        let mut b = backend(&[(exit::code::HLT, 0, 0)]);
        let mut v = b.create_vcpu(&entry()).unwrap();
        let mut r = GuestRegisters::new();
        for (i, g) in r.gprs.iter_mut().enumerate() {
            *g = 0x1111 * (i as u64 + 1);
        }
        r.rip = 0x4000;
        r.rflags = 0x202;
        b.set_registers(&mut v, &r);
        assert_eq!(b.registers(&v), r);
        assert_eq!(v.vmcb().save.rax, 0x1111);
        assert_eq!(v.vmcb().save.rsp, 0x1111 * 5);
        // Every ASID is handed out once; destroy returns it.
        let v2 = b.create_vcpu(&entry()).unwrap();
        assert_eq!(v2.asid(), 2);
        b.destroy_vcpu(v2);
        assert_eq!(b.create_vcpu(&entry()).unwrap().asid(), 2);
    }

    #[test]
    fn out_of_asids() {
        let hw = Scripted::default();
        let mut b = SvmBackend::new(hw, SvmFeatures::from_cpuid(2, 1, 40)).unwrap();
        assert!(b.create_vcpu(&entry()).is_ok());
        assert!(matches!(
            b.create_vcpu(&entry()),
            Err(VcpuError::OutOfAsids)
        ));
    }

    #[test]
    fn vmexit_invalid_is_an_error() {
        let mut b = backend(&[(exit::code::INVALID, 0, 0)]);
        let mut v = b.create_vcpu(&entry()).unwrap();
        b.set_nested_root(&mut v, PhysAddr::new(0x8000)).unwrap();
        assert!(matches!(
            b.run(&mut v),
            Err(VcpuError::InvalidGuestState(_))
        ));
    }
}
