//! aarch64, part of `hostile`: instructions Sluice traps to EL2 and does
//! not emulate are UNDEFINED for the guest. With its own EL1 vector table
//! installed, the guest executes each one and checks the exception its
//! handler took: `ESR_EL1` = 0x0200_0000 (EC 0 "unknown reason", IL 1,
//! ISS 0), `ELR_EL1` = the instruction, `SPSR_EL1` = where it was (mode,
//! D/A/I/F masked as the guest runs), the vector of that mode (0x200 EL1h,
//! 0x000 EL1t, 0x400 EL0), and the handler at EL1h with D/A/I/F masked.
//! The handler steps over the instruction and the guest goes on: before
//! this, Sluice stopped the VM at the first such instruction.

use crate::arch::vectors::{self, RECORD};
use crate::console::{Outcome, Report, fail};

/// `ESR_EL1` of an UNDEFINED instruction: EC 0, IL 1, ISS 0.
const ESR_UNDEFINED: u64 = 0x0200_0000;
/// `SPSR_EL1.M[4:0]` and `D`, `A`, `I`, `F`.
const SPSR_MODE_DAIF: u64 = 0x3df;
const DAIF_MASKED: u64 = 0x3c0;
/// `CurrentEL` reads EL1 as 0b0100.
const CURRENT_EL1: u64 = 1 << 2;

pub fn run(report: &mut Report) {
    vectors::install();
    report.step(
        "undef-sysreg-el1h",
        expect_undefined("MRS ACTLR_EL1 at EL1h", 0x200, 0b0101, || {
            vectors::read_actlr_el1()
        }),
    );
    report.step(
        "undef-sysreg-el1t",
        expect_undefined("MSR ACTLR_EL1 at EL1t", 0x000, 0b0100, || {
            vectors::write_actlr_el1_on_sp_el0()
        }),
    );
    report.step(
        "undef-timer-el0",
        expect_undefined("MRS CNTP_CTL_EL0 at EL0", 0x400, 0b0000, || {
            vectors::read_physical_timer_at_el0()
        }),
    );
    report.step(
        "undef-smc",
        expect_undefined("SMC #0 (not PSCI) at EL1h", 0x200, 0b0101, || {
            vectors::smc_not_psci()
        }),
    );
}

/// Runs `probe` (which returns the address of its trapped instruction)
/// with the handler armed, and checks the one exception it took.
fn expect_undefined(what: &str, vector: u64, mode: u64, probe: impl FnOnce() -> u64) -> Outcome {
    RECORD.arm();
    let at = probe();
    let seen = RECORD.take();
    if seen.count != 1 {
        return fail!(
            "{what}: {} exceptions taken, expected 1 (UNDEFINED)",
            seen.count
        );
    }
    if seen.esr != ESR_UNDEFINED {
        return fail!(
            "{what}: ESR_EL1 {:#x} (EC {:#x}), expected {ESR_UNDEFINED:#x}",
            seen.esr,
            seen.esr >> 26
        );
    }
    if seen.elr != at {
        return fail!(
            "{what}: ELR_EL1 {:#x}, the instruction is at {at:#x}",
            seen.elr
        );
    }
    if seen.vector != vector {
        return fail!(
            "{what}: taken at VBAR_EL1 + {:#x}, expected + {vector:#x}",
            seen.vector
        );
    }
    if seen.spsr & SPSR_MODE_DAIF != DAIF_MASKED | mode {
        return fail!(
            "{what}: SPSR_EL1 {:#x}, expected mode {mode:#06b} with D/A/I/F set",
            seen.spsr
        );
    }
    if (seen.daif, seen.current_el, seen.spsel) != (DAIF_MASKED, CURRENT_EL1, 1) {
        return fail!(
            "{what}: handler ran with DAIF {:#x}, CurrentEL {:#x}, SPSel {} (expected EL1h, all masked)",
            seen.daif,
            seen.current_el,
            seen.spsel
        );
    }
    Ok(())
}
