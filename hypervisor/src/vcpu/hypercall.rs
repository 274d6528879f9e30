//! Hypercall transport: from the registers of a hypercall exit to the
//! iommufd dispatcher and back, with the register convention of
//! [`sluice_abi::regs`].
//!
//! * x86_64 (`VMMCALL`/`VMCALL`): `RAX` = command, `RBX` = guest-physical
//!   address of the argument struct; the result goes to `RAX`, every other
//!   register is left as it was.
//! * aarch64 (`HVC #0`, SMCCC): `X0` = function ID, `X1` = argument; the
//!   result goes to `X0`. A function ID that is not a Sluice call gets the
//!   SMCCC "not supported" value (-1) without reaching the dispatcher.
//!
//! The transport checks nothing about the argument pointer: the
//! dispatcher reads it through the VM's [`GuestMemory`], which refuses
//! anything that is not the VM's RAM (unaligned pointers are fine, the
//! ABI has no alignment rule).

use sluice_abi::regs;

use super::{GuestRegisters, gpr};
use crate::iommufd::{GuestMemory, IommuBackend, Iommufd, VmId};

/// SMCCC return value for an unknown function ID (SMC Calling Convention,
/// DEN0028, "NOT_SUPPORTED").
pub const SMCCC_NOT_SUPPORTED: i64 = -1;

/// A hypercall as the ABI defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallRequest {
    pub command: u64,
    /// Guest-physical address of the argument struct.
    pub argument: u64,
}

/// Whoever executes hypercalls: the iommufd object model, or a test double.
pub trait HypercallDispatcher {
    /// Runs `command` for `vm`; returns 0 / a non-negative value or `-errno`.
    fn dispatch(&mut self, vm: VmId, mem: &dyn GuestMemory, command: u64, argument: u64) -> i64;
}

impl<B: IommuBackend> HypercallDispatcher for Iommufd<B> {
    fn dispatch(&mut self, vm: VmId, mem: &dyn GuestMemory, command: u64, argument: u64) -> i64 {
        Iommufd::dispatch(self, vm, mem, command, argument)
    }
}

/// The request in x86 registers.
pub const fn x86_request(registers: &GuestRegisters) -> HypercallRequest {
    HypercallRequest {
        command: registers.gprs[gpr::RAX],
        argument: registers.gprs[gpr::RBX],
    }
}

/// Stores `result` in `RAX` (two's complement for `-errno`).
pub fn x86_complete(registers: &mut GuestRegisters, result: i64) {
    registers.gprs[gpr::RAX] = result as u64;
}

/// Runs the x86 hypercall in `registers` and stores the result in `RAX`.
/// The caller then advances RIP past the `VMMCALL`/`VMCALL`.
pub fn x86_hypercall<D: HypercallDispatcher + ?Sized>(
    dispatcher: &mut D,
    vm: VmId,
    mem: &dyn GuestMemory,
    registers: &mut GuestRegisters,
) -> i64 {
    let req = x86_request(registers);
    let result = dispatcher.dispatch(vm, mem, req.command, req.argument);
    x86_complete(registers, result);
    result
}

/// The request in aarch64 `X0`/`X1`, or `None` if `X0` is not a Sluice
/// function ID.
pub const fn aarch64_request(x: &[u64; 31]) -> Option<HypercallRequest> {
    match regs::aarch64_command(x[0]) {
        Some(command) => Some(HypercallRequest {
            command,
            argument: x[1],
        }),
        None => None,
    }
}

/// Runs the aarch64 hypercall in `x` and stores the result in `X0`.
pub fn aarch64_hypercall<D: HypercallDispatcher + ?Sized>(
    dispatcher: &mut D,
    vm: VmId,
    mem: &dyn GuestMemory,
    x: &mut [u64; 31],
) -> i64 {
    let result = match aarch64_request(x) {
        Some(req) => dispatcher.dispatch(vm, mem, req.command, req.argument),
        None => {
            log::debug!(
                "VM {}: HVC with function ID {:#x} is not a Sluice call",
                vm.0,
                x[0]
            );
            SMCCC_NOT_SUPPORTED
        }
    };
    x[0] = result as u64;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    struct Recorder(Vec<(u32, u64, u64)>, i64);

    impl HypercallDispatcher for Recorder {
        fn dispatch(
            &mut self,
            vm: VmId,
            _mem: &dyn GuestMemory,
            command: u64,
            argument: u64,
        ) -> i64 {
            self.0.push((vm.0, command, argument));
            self.1
        }
    }

    struct NoMemory;
    impl GuestMemory for NoMemory {
        fn read(&self, gpa: u64, _: &mut [u8]) -> Result<(), crate::iommufd::GuestMemoryError> {
            Err(crate::iommufd::GuestMemoryError::Unmapped { gpa })
        }
        fn write(&self, gpa: u64, _: &[u8]) -> Result<(), crate::iommufd::GuestMemoryError> {
            Err(crate::iommufd::GuestMemoryError::Unmapped { gpa })
        }
        fn ram_to_host(
            &self,
            gpa: u64,
        ) -> Result<(sluice_hal::PhysAddr, u64), crate::iommufd::GuestMemoryError> {
            Err(crate::iommufd::GuestMemoryError::Unmapped { gpa })
        }
    }

    #[test]
    fn x86_convention_rax_rbx_in_rax_out_others_preserved() {
        let mut regs = GuestRegisters::new();
        for (i, r) in regs.gprs.iter_mut().enumerate() {
            *r = 0x100 + i as u64;
        }
        regs.gprs[gpr::RAX] = sluice_abi::cmd::IOAS_ALLOC;
        regs.gprs[gpr::RBX] = 0x5000;
        let before = regs;
        let mut d = Recorder(Vec::new(), -22);
        let r = x86_hypercall(&mut d, VmId(3), &NoMemory, &mut regs);
        assert_eq!(r, -22);
        assert_eq!(d.0, [(3, sluice_abi::cmd::IOAS_ALLOC, 0x5000)]);
        assert_eq!(regs.gprs[gpr::RAX], (-22i64) as u64);
        assert_eq!(regs.gprs[1..], before.gprs[1..]);
        assert_eq!(regs.rip, before.rip);
    }

    #[test]
    fn aarch64_convention_and_foreign_function_ids() {
        let mut x = [0u64; 31];
        x[0] = regs::AARCH64_FUNCTION_BASE | sluice_abi::cmd::DEVICE_LIST;
        x[1] = 0x8000;
        x[2] = 77;
        let mut d = Recorder(Vec::new(), 0);
        assert_eq!(aarch64_hypercall(&mut d, VmId(1), &NoMemory, &mut x), 0);
        assert_eq!(d.0, [(1, sluice_abi::cmd::DEVICE_LIST, 0x8000)]);
        assert_eq!((x[0], x[1], x[2]), (0, 0x8000, 77));
        // A PSCI call (0x8400_0000, standard secure service) is not ours.
        x[0] = 0x8400_0000;
        assert_eq!(aarch64_hypercall(&mut d, VmId(1), &NoMemory, &mut x), -1);
        assert_eq!(x[0], u64::MAX);
        assert_eq!(d.0.len(), 1, "foreign calls never reach the dispatcher");
    }
}
