//! Intel VMX: VMCS field encodings ([`fields`]), control bits
//! ([`controls`]), exit decoding ([`exit`]), the I/O and MSR bitmaps, and
//! the [`VcpuBackend`] over them ([`VmxBackend`]).
//!
//! As for SVM, everything but the instructions is here and host-tested:
//! VMCLEAR/VMPTRLD with the host-state fields, VMLAUNCH/VMRESUME with the
//! GPR save/restore, VMREAD/VMWRITE and INVEPT are the [`VmxHardware`]
//! trait the bare-metal kernel implements for Intel servers.

pub mod controls;
pub mod exit;
pub mod fields;

use alloc::boxed::Box;

use sluice_hal::PhysAddr;
use sluice_iommu::pagetable::x86::IntelEpt;

use super::svm::asid::AsidAllocator;
use super::{
    EntryState, Event, Exit, GuestRegisters, MsrAccess, RFLAGS_RESERVED_ONE, Segment,
    TranslationState, VcpuBackend, VcpuError, cr, gpr,
};
use controls::{adjust_controls, check_fixed_bits, sluice};
use exit::{VmxExitInfo, interruption};
use fields::{
    Field16, Field32, Field64, FieldNatural, control_natural, control16, control32, control64,
    exit_natural, exit32, exit64, guest_natural, guest16, guest32, guest64,
};

/// VMREAD / VMWRITE of one VMCS.
pub trait VmcsAccess {
    fn read(&self, encoding: u32) -> u64;
    fn write(&mut self, encoding: u32, value: u64);

    fn read16(&self, field: Field16) -> u16 {
        self.read(field.encoding()) as u16
    }
    fn read32(&self, field: Field32) -> u32 {
        self.read(field.encoding()) as u32
    }
    fn read64(&self, field: Field64) -> u64 {
        self.read(field.encoding())
    }
    fn read_natural(&self, field: FieldNatural) -> u64 {
        self.read(field.encoding())
    }
    fn write16(&mut self, field: Field16, value: u16) {
        self.write(field.encoding(), u64::from(value))
    }
    fn write32(&mut self, field: Field32, value: u32) {
        self.write(field.encoding(), u64::from(value))
    }
    fn write64(&mut self, field: Field64, value: u64) {
        self.write(field.encoding(), value)
    }
    fn write_natural(&mut self, field: FieldNatural, value: u64) {
        self.write(field.encoding(), value)
    }
}

/// What only bare metal can do.
pub trait VmxHardware {
    type Vmcs: VmcsAccess;
    /// A fresh, current VMCS (VMCLEAR + VMPTRLD of a new region with the
    /// revision identifier) whose host-state fields are filled in.
    fn create_vmcs(&mut self) -> Result<Self::Vmcs, VcpuError>;
    /// VMLAUNCH (`launched` false) or VMRESUME, returning at the next VM
    /// exit with every guest GPR saved into `gprs` (RSP, RIP, RFLAGS live
    /// in the VMCS). `Err(n)` when the instruction failed with
    /// VM-instruction error `n` (VMfailValid).
    fn enter(
        &mut self,
        vmcs: &mut Self::Vmcs,
        gprs: &mut GuestRegisters,
        launched: bool,
    ) -> Result<(), u32>;
    /// INVEPT single-context for `eptp`.
    fn invalidate_ept(&mut self, eptp: u64);
    /// Physical address of a host object (bitmaps).
    fn physical_address(&self, object: *const u8) -> PhysAddr;
}

/// The processor's VMX capability MSRs (SDM appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxCapabilities {
    /// IA32_VMX_TRUE_PINBASED_CTLS (or IA32_VMX_PINBASED_CTLS).
    pub pin: u64,
    pub primary: u64,
    /// IA32_VMX_PROCBASED_CTLS2.
    pub secondary: u64,
    pub exit: u64,
    pub entry: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// IA32_VMX_EPT_VPID_CAP bit 0: execute-only EPT translations.
    pub ept_execute_only: bool,
    pub physical_bits: u32,
}

/// The adjusted controls a backend programs into every VMCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxControls {
    pub pin: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
}

/// VMX I/O bitmaps A (ports 0–0x7FFF) and B (0x8000–0xFFFF), one bit per
/// port, set = exit (SDM vol. 3, "I/O-Bitmap Addresses").
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct IoBitmaps {
    bits: [u8; 8192],
}

impl IoBitmaps {
    pub const fn intercept_all() -> Self {
        Self { bits: [0xff; 8192] }
    }
    pub fn allow(&mut self, first: u16, count: u32) {
        let end = (u32::from(first) + count).min(0x1_0000);
        for port in u32::from(first)..end {
            self.bits[port as usize / 8] &= !(1 << (port % 8));
        }
    }
    /// Whether an access of `size` bytes at `port` exits: any of its
    /// ports' bits, and always when it wraps past 0xFFFF.
    pub fn intercepts(&self, port: u16, size: u8) -> bool {
        (0..u32::from(size)).any(|i| {
            let p = u32::from(port) + i;
            p > 0xffff || self.bits[p as usize / 8] & (1 << (p % 8)) != 0
        })
    }
    pub fn bitmap_a(&self) -> &[u8] {
        &self.bits[..4096]
    }
    pub fn bitmap_b(&self) -> &[u8] {
        &self.bits[4096..]
    }
}

/// The VMX MSR bitmap: read bitmaps for MSRs 0–0x1FFF (bytes 0–1023) and
/// C000_0000h–C000_1FFFh (1024–2047), write bitmaps at 2048 and 3072 (SDM
/// vol. 3, "MSR-Bitmap Address"). MSRs outside both ranges always exit.
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct MsrBitmap {
    bits: [u8; 4096],
}

/// MSRs whose guest values the VMCS holds, so the guest may access them
/// directly: FS.base, GS.base, SYSENTER_CS/ESP/EIP.
pub const VMCS_BACKED_MSRS: [u32; 5] = [0xc000_0100, 0xc000_0101, 0x174, 0x175, 0x176];

impl MsrBitmap {
    pub const fn intercept_all() -> Self {
        Self { bits: [0xff; 4096] }
    }

    pub fn sluice_default() -> Self {
        let mut m = Self::intercept_all();
        for msr in VMCS_BACKED_MSRS {
            m.set(msr, MsrAccess::Read, false);
            m.set(msr, MsrAccess::Write, false);
        }
        m
    }

    fn bit(msr: u32, access: MsrAccess) -> Option<usize> {
        let (base, index) = if msr < 0x2000 {
            (0, msr)
        } else if (0xc000_0000..0xc000_2000).contains(&msr) {
            (1024, msr - 0xc000_0000)
        } else {
            return None;
        };
        let write = if access == MsrAccess::Write { 2048 } else { 0 };
        Some((base + write) * 8 + index as usize)
    }

    /// Returns false for an MSR outside the bitmap (it always exits).
    pub fn set(&mut self, msr: u32, access: MsrAccess, intercept: bool) -> bool {
        let Some(bit) = Self::bit(msr, access) else {
            return false;
        };
        if intercept {
            self.bits[bit / 8] |= 1 << (bit % 8);
        } else {
            self.bits[bit / 8] &= !(1 << (bit % 8));
        }
        true
    }

    pub fn intercepts(&self, msr: u32, access: MsrAccess) -> bool {
        Self::bit(msr, access).is_none_or(|bit| self.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }

    pub fn as_bytes(&self) -> &[u8; 4096] {
        &self.bits
    }
}

/// Guest segment access rights in the VMCS format (SDM vol. 3, "Guest
/// Register State"): descriptor bits 47:40 in 7:0, AVL/L/D/G in 15:12,
/// bit 16 "unusable".
pub const fn access_rights(s: &Segment) -> u32 {
    if !s.present {
        return 1 << 16;
    }
    s.access_byte() as u32 | ((s.flags_nibble() as u32) << 12)
}

/// Interruptibility state: blocking by STI (bit 0) and by MOV SS (bit 1).
const INTERRUPTIBILITY_SHADOW: u32 = 0b11;

/// One VMX vCPU.
pub struct VmxVcpu<V: VmcsAccess> {
    vmcs: V,
    gprs: GuestRegisters,
    launched: bool,
    vpid: u16,
    eptp: u64,
}

impl<V: VmcsAccess> VmxVcpu<V> {
    pub fn vmcs(&self) -> &V {
        &self.vmcs
    }
    pub fn vpid(&self) -> u16 {
        self.vpid
    }
}

/// The VMX implementation of [`VcpuBackend`].
pub struct VmxBackend<H: VmxHardware> {
    hardware: H,
    caps: VmxCapabilities,
    controls: VmxControls,
    ept: IntelEpt,
    vpids: AsidAllocator,
    io: Box<IoBitmaps>,
    msrs: Box<MsrBitmap>,
}

impl<H: VmxHardware> VmxBackend<H> {
    /// Adjusts Sluice's controls ([`controls::sluice`]) to the processor;
    /// refuses one that lacks any of them (EPT above all).
    pub fn new(hardware: H, caps: VmxCapabilities) -> Result<Self, VcpuError> {
        let adjust = |desired, cap, what| {
            adjust_controls(desired, cap).map_err(|_| VcpuError::Unsupported(what))
        };
        let controls = VmxControls {
            pin: adjust(sluice::PIN, caps.pin, "VMX pin-based controls Sluice needs")?,
            primary: adjust(
                sluice::PRIMARY,
                caps.primary,
                "VMX processor controls Sluice needs",
            )?,
            secondary: adjust(
                sluice::SECONDARY,
                caps.secondary,
                "VMX secondary controls Sluice needs (EPT, VPID, WBINVD exiting)",
            )?,
            exit: adjust(sluice::EXIT, caps.exit, "VMX exit controls Sluice needs")?,
            entry: adjust(sluice::ENTRY, caps.entry, "VMX entry controls Sluice needs")?,
        };
        let ept = IntelEpt::new(4, caps.physical_bits.clamp(32, 52), caps.ept_execute_only)
            .map_err(|_| VcpuError::Unsupported("EPT with this physical address width"))?;
        Ok(Self {
            hardware,
            caps,
            controls,
            ept,
            vpids: AsidAllocator::new(0x1_0000),
            io: Box::new(IoBitmaps::intercept_all()),
            msrs: Box::new(MsrBitmap::sluice_default()),
        })
    }

    pub fn controls(&self) -> &VmxControls {
        &self.controls
    }
    pub fn hardware(&self) -> &H {
        &self.hardware
    }
    pub fn hardware_mut(&mut self) -> &mut H {
        &mut self.hardware
    }
    pub fn io_bitmaps_mut(&mut self) -> &mut IoBitmaps {
        &mut self.io
    }
    pub fn msr_bitmap_mut(&mut self) -> &mut MsrBitmap {
        &mut self.msrs
    }

    fn write_segment(vmcs: &mut H::Vmcs, index: u32, s: &Segment) {
        // Selector, limit, access rights and base of ES..TR share their
        // index (SDM appendix B): 2*index apart from the first of each.
        vmcs.write(
            guest16::ES_SELECTOR.encoding() + 2 * index,
            u64::from(s.selector),
        );
        vmcs.write(guest32::ES_LIMIT.encoding() + 2 * index, u64::from(s.limit));
        vmcs.write(
            guest32::ES_ACCESS_RIGHTS.encoding() + 2 * index,
            u64::from(access_rights(s)),
        );
        vmcs.write(guest_natural::ES_BASE.encoding() + 2 * index, s.base);
    }
}

fn entry_error(instruction_error: u32) -> VcpuError {
    // VM-instruction error numbers (SDM vol. 3, "VM-Instruction Error
    // Numbers").
    VcpuError::InvalidGuestState(match instruction_error {
        4 => "VMLAUNCH with a non-clear VMCS",
        5 => "VMRESUME with a non-launched VMCS",
        7 => "VM entry with invalid control fields",
        8 => "VM entry with invalid host-state fields",
        _ => "VMLAUNCH/VMRESUME failed",
    })
}

impl<H: VmxHardware> VcpuBackend for VmxBackend<H> {
    type Vcpu = VmxVcpu<H::Vmcs>;

    /// Releases the vCPU's VPID.
    fn destroy_vcpu(&mut self, vcpu: VmxVcpu<H::Vmcs>) {
        if let Err(e) = self.vpids.free(u32::from(vcpu.vpid)) {
            log::error!("VMX: freeing VPID failed: {e:?}");
        }
    }

    fn create_vcpu(&mut self, entry: &EntryState) -> Result<Self::Vcpu, VcpuError> {
        let c = &self.caps;
        // CR0/CR4 as VMX operation requires them (CR4.VMXE is forced and
        // hidden from the guest through the read shadow).
        let cr0 = entry.cr0 | c.cr0_fixed0;
        let cr4 = entry.cr4 | c.cr4_fixed0;
        check_fixed_bits(cr0, c.cr0_fixed0, c.cr0_fixed1)
            .map_err(|_| VcpuError::InvalidGuestState("CR0 not allowed in VMX operation"))?;
        check_fixed_bits(cr4, c.cr4_fixed0, c.cr4_fixed1)
            .map_err(|_| VcpuError::InvalidGuestState("CR4 not allowed in VMX operation"))?;
        let long_mode = entry.efer & cr::EFER_LMA != 0;
        if long_mode != entry.cs.long {
            return Err(VcpuError::InvalidGuestState(
                "EFER.LMA and CS.L disagree for the entry state",
            ));
        }
        let vpid = self.vpids.allocate().map_err(|_| VcpuError::OutOfAsids)? as u16;
        let mut vmcs = match self.hardware.create_vmcs() {
            Ok(v) => v,
            Err(e) => {
                let _ = self.vpids.free(u32::from(vpid));
                return Err(e);
            }
        };
        let ctl = self.controls;
        let entry_controls = if long_mode {
            ctl.entry
        } else {
            ctl.entry & !controls::entry::IA32E_MODE_GUEST
        };
        vmcs.write32(control32::PIN_BASED_CONTROLS, ctl.pin);
        vmcs.write32(control32::PRIMARY_PROCESSOR_CONTROLS, ctl.primary);
        vmcs.write32(control32::SECONDARY_PROCESSOR_CONTROLS, ctl.secondary);
        vmcs.write32(control32::EXIT_CONTROLS, ctl.exit);
        vmcs.write32(control32::ENTRY_CONTROLS, entry_controls);
        vmcs.write32(control32::EXCEPTION_BITMAP, 1 << 18);
        vmcs.write16(control16::VPID, vpid);
        let io = self.io.bitmap_a().as_ptr();
        vmcs.write64(
            control64::IO_BITMAP_A,
            self.hardware.physical_address(io).as_u64(),
        );
        vmcs.write64(
            control64::IO_BITMAP_B,
            self.hardware
                .physical_address(self.io.bitmap_b().as_ptr())
                .as_u64(),
        );
        vmcs.write64(
            control64::MSR_BITMAPS,
            self.hardware
                .physical_address(self.msrs.as_bytes().as_ptr())
                .as_u64(),
        );
        vmcs.write_natural(control_natural::CR0_GUEST_HOST_MASK, c.cr0_fixed0);
        vmcs.write_natural(control_natural::CR0_READ_SHADOW, entry.cr0);
        vmcs.write_natural(
            control_natural::CR4_GUEST_HOST_MASK,
            cr::CR4_VMXE | c.cr4_fixed0,
        );
        vmcs.write_natural(control_natural::CR4_READ_SHADOW, entry.cr4);
        // No shadow VMCS: the link pointer must be all ones.
        vmcs.write64(guest64::VMCS_LINK_POINTER, u64::MAX);

        for (i, s) in [
            &entry.es,
            &entry.cs,
            &entry.ss,
            &entry.ds,
            &entry.fs,
            &entry.gs,
            &entry.ldtr,
            &entry.tr,
        ]
        .into_iter()
        .enumerate()
        {
            Self::write_segment(&mut vmcs, i as u32, s);
        }
        vmcs.write_natural(guest_natural::GDTR_BASE, entry.gdtr.base);
        vmcs.write32(guest32::GDTR_LIMIT, u32::from(entry.gdtr.limit));
        vmcs.write_natural(guest_natural::IDTR_BASE, entry.idtr.base);
        vmcs.write32(guest32::IDTR_LIMIT, u32::from(entry.idtr.limit));
        vmcs.write_natural(guest_natural::CR0, cr0);
        vmcs.write_natural(guest_natural::CR3, entry.cr3);
        vmcs.write_natural(guest_natural::CR4, cr4);
        vmcs.write_natural(guest_natural::DR7, 0x400);
        vmcs.write64(guest64::EFER, entry.efer);
        vmcs.write64(guest64::PAT, entry.pat);
        vmcs.write32(guest32::ACTIVITY_STATE, 0);
        vmcs.write32(guest32::INTERRUPTIBILITY_STATE, 0);
        vmcs.write_natural(guest_natural::PENDING_DEBUG_EXCEPTIONS, 0);
        let mut vcpu = VmxVcpu {
            vmcs,
            gprs: entry.registers,
            launched: false,
            vpid,
            eptp: 0,
        };
        self.set_registers(&mut vcpu, &entry.registers);
        Ok(vcpu)
    }

    fn run(&mut self, vcpu: &mut Self::Vcpu) -> Result<Exit, VcpuError> {
        if vcpu.eptp == 0 {
            return Err(VcpuError::InvalidGuestState(
                "nested paging is not set up (set_nested_root first)",
            ));
        }
        self.hardware
            .enter(&mut vcpu.vmcs, &mut vcpu.gprs, vcpu.launched)
            .map_err(entry_error)?;
        vcpu.launched = true;
        let v = &mut vcpu.vmcs;
        let info = VmxExitInfo {
            reason: v.read32(exit32::EXIT_REASON),
            qualification: v.read_natural(exit_natural::EXIT_QUALIFICATION),
            guest_physical_address: v.read64(exit64::GUEST_PHYSICAL_ADDRESS),
            instruction_length: v.read32(exit32::EXIT_INSTRUCTION_LENGTH),
            interruption_info: v.read32(exit32::EXIT_INTERRUPTION_INFO),
            interruption_error_code: v.read32(exit32::EXIT_INTERRUPTION_ERROR_CODE),
            rip: v.read_natural(guest_natural::RIP),
        };
        if info.reason & exit::EXIT_REASON_ENTRY_FAILURE != 0 {
            return Err(VcpuError::InvalidGuestState(match info.reason as u16 {
                exit::reason::INVALID_GUEST_STATE => "VM entry failed: invalid guest state",
                exit::reason::MSR_LOADING => "VM entry failed: MSR loading",
                exit::reason::MACHINE_CHECK => "VM entry failed: machine check",
                _ => "VM entry failed",
            }));
        }
        // An event whose delivery the exit interrupted is delivered again
        // at the next entry (SDM vol. 3, "Information for VM Exits During
        // Event Delivery").
        let idt = v.read32(exit32::IDT_VECTORING_INFO);
        if idt & interruption::VALID != 0 {
            v.write32(control32::ENTRY_INTERRUPTION_INFO, idt & !(1 << 12));
            if idt & interruption::ERROR_CODE_VALID != 0 {
                let code = v.read32(exit32::IDT_VECTORING_ERROR_CODE);
                v.write32(control32::ENTRY_EXCEPTION_ERROR_CODE, code);
            }
            let length = v.read32(exit32::EXIT_INSTRUCTION_LENGTH);
            v.write32(control32::ENTRY_INSTRUCTION_LENGTH, length);
        }
        Ok(exit::decode_exit(&info, &vcpu.gprs))
    }

    fn registers(&self, vcpu: &Self::Vcpu) -> GuestRegisters {
        let mut r = vcpu.gprs;
        r.gprs[gpr::RSP] = vcpu.vmcs.read_natural(guest_natural::RSP);
        r.rip = vcpu.vmcs.read_natural(guest_natural::RIP);
        r.rflags = vcpu.vmcs.read_natural(guest_natural::RFLAGS);
        r
    }

    fn translation_state(&self, vcpu: &Self::Vcpu) -> TranslationState {
        let v = &vcpu.vmcs;
        let cs = v.read32(guest32::CS_ACCESS_RIGHTS);
        TranslationState {
            // The guest's view: CR4.VMXE is Sluice's, not the guest's.
            cr0: v.read_natural(guest_natural::CR0),
            cr3: v.read_natural(guest_natural::CR3),
            cr4: v.read_natural(guest_natural::CR4) & !cr::CR4_VMXE,
            efer: v.read64(guest64::EFER),
            cs_long: cs & (1 << 13) != 0,
            cs_default_big: cs & (1 << 14) != 0,
        }
    }

    fn set_registers(&mut self, vcpu: &mut Self::Vcpu, registers: &GuestRegisters) {
        vcpu.gprs = *registers;
        vcpu.vmcs
            .write_natural(guest_natural::RSP, registers.gprs[gpr::RSP]);
        vcpu.vmcs.write_natural(guest_natural::RIP, registers.rip);
        vcpu.vmcs.write_natural(
            guest_natural::RFLAGS,
            registers.rflags | RFLAGS_RESERVED_ONE,
        );
    }

    fn advance_rip(&mut self, vcpu: &mut Self::Vcpu, length: u8) -> Result<(), VcpuError> {
        if !(1..=15).contains(&length) {
            return Err(VcpuError::BadInstructionLength(u64::from(length)));
        }
        let rip = vcpu.vmcs.read_natural(guest_natural::RIP);
        vcpu.vmcs
            .write_natural(guest_natural::RIP, rip.wrapping_add(u64::from(length)));
        let state = vcpu.vmcs.read32(guest32::INTERRUPTIBILITY_STATE);
        vcpu.vmcs.write32(
            guest32::INTERRUPTIBILITY_STATE,
            state & !INTERRUPTIBILITY_SHADOW,
        );
        Ok(())
    }

    fn inject_event(&mut self, vcpu: &mut Self::Vcpu, event: Event) -> Result<(), VcpuError> {
        event.validate()?;
        if vcpu.vmcs.read32(control32::ENTRY_INTERRUPTION_INFO) & interruption::VALID != 0 {
            return Err(VcpuError::EventPending);
        }
        let info = match event {
            Event::Exception { vector, error_code } => {
                if let Some(code) = error_code {
                    vcpu.vmcs
                        .write32(control32::ENTRY_EXCEPTION_ERROR_CODE, code);
                }
                interruption::encode(
                    vector,
                    interruption::TYPE_HARDWARE_EXCEPTION,
                    error_code.is_some(),
                )
            }
            Event::Interrupt { vector } => {
                interruption::encode(vector, interruption::TYPE_EXTERNAL_INTERRUPT, false)
            }
            Event::Nmi => interruption::encode(2, interruption::TYPE_NMI, false),
        };
        vcpu.vmcs.write32(control32::ENTRY_INTERRUPTION_INFO, info);
        Ok(())
    }

    fn set_nested_root(&mut self, vcpu: &mut Self::Vcpu, root: PhysAddr) -> Result<(), VcpuError> {
        let bits = self.caps.physical_bits.min(63);
        if root.as_u64() == 0 || !root.is_page_aligned() || root.as_u64() >> bits != 0 {
            return Err(VcpuError::BadNestedRoot(root));
        }
        let eptp = self.ept.eptp(root, false);
        vcpu.vmcs.write64(control64::EPT_POINTER, eptp);
        vcpu.eptp = eptp;
        self.hardware.invalidate_ept(eptp);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
