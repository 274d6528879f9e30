//! The local APIC, as far as starting other processors needs it (Intel SDM
//! vol. 3A chapter 10): finding it (IA32_APIC_BASE), its ID, and the
//! interrupt command register that sends INIT and STARTUP IPIs, in xAPIC
//! (memory-mapped) and x2APIC (MSR) mode.
//!
//! Hardware is reached only through [`Mmio`], [`MsrAccess`] and [`Clock`],
//! so the start-up sequence and its delays are tested on the host against a
//! register model.

use core::fmt;

use sluice_hal::{Clock, Mmio, ReadOnly, ReadWrite, Reg32, poll_until};

/// IA32_APIC_BASE (SDM vol. 3A §10.4.4, figure 10-5).
pub const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;

/// xAPIC register offsets (SDM vol. 3A table 10-1). In x2APIC mode the
/// same register is MSR `0x800 + offset / 16` (§10.12.1.2).
pub mod reg {
    use super::*;
    pub const ID: Reg32<ReadWrite> = Reg32::new(0x20);
    pub const VERSION: Reg32<ReadOnly> = Reg32::new(0x30);
    pub const SVR: Reg32<ReadWrite> = Reg32::new(0xf0);
    pub const ESR: Reg32<ReadWrite> = Reg32::new(0x280);
    pub const ICR_LOW: Reg32<ReadWrite> = Reg32::new(0x300);
    pub const ICR_HIGH: Reg32<ReadWrite> = Reg32::new(0x310);
}

const X2APIC_MSR_BASE: u32 = 0x800;
/// The x2APIC ICR is one 64-bit MSR (§10.12.9).
const X2APIC_ICR: u32 = 0x830;
const SVR_APIC_ENABLE: u32 = 1 << 8;
/// A spurious vector for when Sluice has to software-enable the APIC; with
/// interrupts masked it is never delivered.
const SPURIOUS_VECTOR: u32 = 0xff;

/// Delays from the SDM's MP initialization example (vol. 3A §8.4.4.1):
/// 10 ms after INIT, 200 µs after each STARTUP.
pub const INIT_DELAY_NS: u64 = 10_000_000;
pub const STARTUP_DELAY_NS: u64 = 200_000;
/// How long an xAPIC may keep an IPI pending (no architectural bound;
/// generous because emulators are slow).
pub const DELIVERY_TIMEOUT_NS: u64 = 100_000_000;

/// What IA32_APIC_BASE says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicBase {
    /// Physical address of the xAPIC registers.
    pub address: u64,
    pub bsp: bool,
    pub enabled: bool,
    pub x2apic: bool,
}

impl ApicBase {
    /// Decodes the MSR; the address field is bits [MAXPHYADDR-1:12].
    pub const fn decode(msr: u64, physical_address_bits: u32) -> Self {
        let bits = if physical_address_bits > 52 || physical_address_bits < 32 {
            52
        } else {
            physical_address_bits
        };
        let mask = ((1u64 << bits) - 1) & !0xfff;
        Self {
            address: msr & mask,
            bsp: msr & APIC_BASE_BSP != 0,
            enabled: msr & APIC_BASE_ENABLE != 0,
            x2apic: msr & APIC_BASE_X2APIC != 0,
        }
    }
}

/// An interrupt command (SDM vol. 3A §10.6.1, figure 10-12): vector [7:0],
/// delivery mode [10:8], destination mode [11] (0 physical), delivery
/// status [12], level [14], trigger mode [15], shorthand [19:18]; the
/// destination APIC ID is ICR_HIGH[31:24] (xAPIC) or ICR[63:32] (x2APIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icr {
    pub low: u32,
    pub destination: u32,
}

const DELIVERY_INIT: u32 = 0b101 << 8;
const DELIVERY_STARTUP: u32 = 0b110 << 8;
const DELIVERY_STATUS_PENDING: u32 = 1 << 12;
const LEVEL_ASSERT: u32 = 1 << 14;

impl Icr {
    /// INIT, level assert, edge, physical destination, no shorthand (the
    /// SDM's example uses 0x4500 with the all-excluding-self shorthand).
    pub const fn init(destination: u32) -> Self {
        Self {
            low: DELIVERY_INIT | LEVEL_ASSERT,
            destination,
        }
    }

    /// STARTUP: the processor starts in real mode at `vector << 12`.
    pub const fn startup(destination: u32, vector: u8) -> Self {
        Self {
            low: DELIVERY_STARTUP | LEVEL_ASSERT | vector as u32,
            destination,
        }
    }

    pub const fn x2apic_value(self) -> u64 {
        ((self.destination as u64) << 32) | self.low as u64
    }
}

/// Read and write access to this CPU's model-specific registers.
pub trait MsrAccess {
    fn read_msr(&self, msr: u32) -> u64;
    fn write_msr(&self, msr: u32, value: u64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicError {
    /// The destination does not fit xAPIC's 8-bit ID field.
    NeedsX2apic { apic_id: u32 },
    /// The xAPIC kept the IPI pending (ICR delivery status) too long.
    NotAccepted {
        apic_id: u32,
        icr: u32,
        waited_ns: u64,
    },
    /// The trampoline page cannot be named by a STARTUP vector: it must be
    /// below 1 MiB, and vectors 0xA0–0xBF are reserved (SDM §8.4.4.1).
    BadStartupPage { address: u64 },
}

impl fmt::Display for LapicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeedsX2apic { apic_id } => write!(
                f,
                "APIC ID {apic_id:#x} is above 255, which only x2APIC mode can address, and the boot CPU's APIC is in xAPIC mode"
            ),
            Self::NotAccepted {
                apic_id,
                icr,
                waited_ns,
            } => write!(
                f,
                "the local APIC did not send IPI {icr:#x} to APIC ID {apic_id:#x} within {} µs",
                waited_ns / 1000
            ),
            Self::BadStartupPage { address } => write!(
                f,
                "page {address:#x} cannot be a STARTUP IPI target (must be below 0xa0000)"
            ),
        }
    }
}

/// This CPU's local APIC in the mode firmware left it.
pub enum LocalApic<M: Mmio, R: MsrAccess> {
    Xapic(M),
    X2apic(R),
}

impl<M: Mmio, R: MsrAccess> LocalApic<M, R> {
    fn read(&self, register: Reg32<impl sluice_hal::mmio::Readable>) -> u32 {
        match self {
            Self::Xapic(mmio) => register.read(mmio),
            Self::X2apic(msrs) => {
                msrs.read_msr(X2APIC_MSR_BASE + register.offset() as u32 / 16) as u32
            }
        }
    }

    fn write(&self, register: Reg32<impl sluice_hal::mmio::Writable>, value: u32) {
        match self {
            Self::Xapic(mmio) => register.write(mmio, value),
            Self::X2apic(msrs) => msrs.write_msr(
                X2APIC_MSR_BASE + register.offset() as u32 / 16,
                u64::from(value),
            ),
        }
    }

    pub fn is_x2apic(&self) -> bool {
        matches!(self, Self::X2apic(_))
    }

    /// The running CPU's APIC ID: ID[31:24] in xAPIC mode, the whole
    /// 32-bit register in x2APIC mode (§10.4.6, §10.12.5.1).
    pub fn id(&self) -> u32 {
        match self {
            Self::Xapic(_) => self.read(reg::ID) >> 24,
            Self::X2apic(_) => self.read(reg::ID),
        }
    }

    pub fn version(&self) -> u32 {
        self.read(reg::VERSION)
    }

    /// Sets SVR's APIC software enable if firmware left it clear; returns
    /// whether it had to.
    pub fn software_enable(&self) -> bool {
        let svr = self.read(reg::SVR);
        if svr & SVR_APIC_ENABLE != 0 {
            return false;
        }
        self.write(reg::SVR, (svr & !0xff) | SVR_APIC_ENABLE | SPURIOUS_VECTOR);
        true
    }

    /// Reads the error status; the write first latches the current errors
    /// into the register (§10.5.3).
    pub fn take_errors(&self) -> u32 {
        self.write(reg::ESR, 0);
        self.read(reg::ESR)
    }

    /// Sends `icr`; in xAPIC mode waits until the APIC has sent it.
    pub fn send(&self, icr: Icr, clock: &dyn Clock) -> Result<(), LapicError> {
        match self {
            Self::Xapic(mmio) => {
                if icr.destination > 0xff {
                    return Err(LapicError::NeedsX2apic {
                        apic_id: icr.destination,
                    });
                }
                reg::ICR_HIGH.write(mmio, icr.destination << 24);
                // Writing the low half sends the IPI.
                reg::ICR_LOW.write(mmio, icr.low);
                poll_until(clock, DELIVERY_TIMEOUT_NS, || {
                    (reg::ICR_LOW.read(mmio) & DELIVERY_STATUS_PENDING == 0).then_some(())
                })
                .map_err(|t| LapicError::NotAccepted {
                    apic_id: icr.destination,
                    icr: icr.low,
                    waited_ns: t.waited_ns,
                })
            }
            // x2APIC has no delivery status: the write is the send (§10.12.9).
            Self::X2apic(msrs) => {
                msrs.write_msr(X2APIC_ICR, icr.x2apic_value());
                Ok(())
            }
        }
    }
}

/// The STARTUP vector that starts a processor at `page` (real mode CS:IP =
/// `vector << 8`:0, so `page` = `vector << 12`).
pub fn startup_vector(page: u64) -> Result<u8, LapicError> {
    let bad = LapicError::BadStartupPage { address: page };
    if !page.is_multiple_of(4096) || page >= 0xa_0000 {
        return Err(bad);
    }
    u8::try_from(page >> 12).map_err(|_| bad)
}

fn delay(clock: &dyn Clock, ns: u64) {
    let start = clock.now_ns();
    while clock.now_ns().saturating_sub(start) < ns {
        core::hint::spin_loop();
    }
}

/// How a start-up sequence went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupReport {
    /// STARTUP IPIs sent (the second is skipped when the processor already
    /// arrived).
    pub startup_ipis: u32,
    /// Error status bits seen after the sequence (0 when clean).
    pub errors: u32,
}

/// The INIT / STARTUP / STARTUP sequence of SDM vol. 3A §8.4.4.1 for the
/// processor with `apic_id`, starting it at `page`. `arrived` says whether
/// it has checked in; the caller waits for that afterwards with its own
/// timeout.
pub fn start_processor<M: Mmio, R: MsrAccess>(
    apic: &LocalApic<M, R>,
    clock: &dyn Clock,
    apic_id: u32,
    page: u64,
    arrived: &dyn Fn() -> bool,
) -> Result<StartupReport, LapicError> {
    let vector = startup_vector(page)?;
    if !apic.is_x2apic() && apic_id > 0xff {
        return Err(LapicError::NeedsX2apic { apic_id });
    }
    apic.take_errors();
    apic.send(Icr::init(apic_id), clock)?;
    delay(clock, INIT_DELAY_NS);
    let mut startup_ipis = 0;
    for _ in 0..2 {
        if arrived() {
            break;
        }
        apic.send(Icr::startup(apic_id, vector), clock)?;
        startup_ipis += 1;
        delay(clock, STARTUP_DELAY_NS);
    }
    Ok(StartupReport {
        startup_ipis,
        errors: apic.take_errors(),
    })
}

/// Puts the processor back into wait-for-STARTUP (after a failed start, so
/// it cannot run the trampoline later).
pub fn park_processor<M: Mmio, R: MsrAccess>(
    apic: &LocalApic<M, R>,
    clock: &dyn Clock,
    apic_id: u32,
) -> Result<(), LapicError> {
    apic.send(Icr::init(apic_id), clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::{Cell, RefCell};
    use sluice_hal::model::ModelClock;
    use std::collections::HashMap;
    use std::rc::Rc;

    /// Register writes with the model clock's time at the write.
    type Log = Rc<RefCell<Vec<(u64, u32, u64)>>>;

    /// An xAPIC register file that logs writes; ICR delivery stays pending
    /// for `pending_reads` reads after each send.
    struct XapicModel {
        clock: Rc<ModelClock>,
        regs: RefCell<HashMap<usize, u32>>,
        log: Log,
        pending_reads: Cell<u32>,
        pending_per_send: u32,
    }

    impl Mmio for XapicModel {
        fn read32(&self, offset: usize) -> u32 {
            let value = *self.regs.borrow().get(&offset).unwrap_or(&0);
            if offset == 0x300 && self.pending_reads.get() > 0 {
                self.pending_reads.set(self.pending_reads.get() - 1);
                return value | DELIVERY_STATUS_PENDING;
            }
            value
        }
        fn write32(&self, offset: usize, value: u32) {
            self.log
                .borrow_mut()
                .push((self.clock.now_ns(), offset as u32, u64::from(value)));
            if offset == 0x300 {
                self.pending_reads.set(self.pending_per_send);
            }
            self.regs.borrow_mut().insert(offset, value);
        }
        fn read64(&self, _: usize) -> u64 {
            unreachable!("the local APIC has no 64-bit registers")
        }
        fn write64(&self, _: usize, _: u64) {
            unreachable!("the local APIC has no 64-bit registers")
        }
    }

    struct MsrModel {
        clock: Rc<ModelClock>,
        log: Log,
        values: RefCell<HashMap<u32, u64>>,
    }

    impl MsrAccess for MsrModel {
        fn read_msr(&self, msr: u32) -> u64 {
            *self.values.borrow().get(&msr).unwrap_or(&0)
        }
        fn write_msr(&self, msr: u32, value: u64) {
            self.log
                .borrow_mut()
                .push((self.clock.now_ns(), msr, value));
            self.values.borrow_mut().insert(msr, value);
        }
    }

    struct NoMsrs;
    impl MsrAccess for NoMsrs {
        fn read_msr(&self, _: u32) -> u64 {
            unreachable!("xAPIC mode uses no MSRs")
        }
        fn write_msr(&self, _: u32, _: u64) {
            unreachable!("xAPIC mode uses no MSRs")
        }
    }

    struct NoMmio;
    impl Mmio for NoMmio {
        fn read32(&self, _: usize) -> u32 {
            unreachable!("x2APIC mode uses no MMIO")
        }
        fn write32(&self, _: usize, _: u32) {
            unreachable!("x2APIC mode uses no MMIO")
        }
        fn read64(&self, _: usize) -> u64 {
            unreachable!()
        }
        fn write64(&self, _: usize, _: u64) {
            unreachable!()
        }
    }

    fn xapic(pending_per_send: u32) -> (LocalApic<XapicModel, NoMsrs>, Rc<ModelClock>, Log) {
        let clock = Rc::new(ModelClock::new(1_000));
        let log: Log = Rc::default();
        let model = XapicModel {
            clock: clock.clone(),
            regs: RefCell::default(),
            log: log.clone(),
            pending_reads: Cell::new(0),
            pending_per_send,
        };
        (LocalApic::Xapic(model), clock, log)
    }

    /// The ICR sends in a log: (time, value) for writes of ICR_LOW or the
    /// x2APIC ICR MSR.
    fn sends(log: &Log, icr: u32) -> Vec<(u64, u64)> {
        log.borrow()
            .iter()
            .filter(|(_, r, _)| *r == icr)
            .map(|(t, _, v)| (*t, *v))
            .collect()
    }

    #[test]
    fn icr_encodings_match_the_sdm() {
        // The SDM's broadcast example values without the shorthand bits.
        assert_eq!(Icr::init(3).low, 0x0000_4500);
        assert_eq!(Icr::startup(3, 0x9f).low, 0x0000_469f);
        assert_eq!(
            Icr::startup(0x1_0002, 0x08).x2apic_value(),
            0x0001_0002_0000_4608
        );
        assert_eq!(startup_vector(0x8000), Ok(0x08));
        assert_eq!(startup_vector(0x9f000), Ok(0x9f));
        for bad in [0xa0000, 0xbf000, 0x10_0000, 0x8800] {
            assert_eq!(
                startup_vector(bad),
                Err(LapicError::BadStartupPage { address: bad })
            );
        }
    }

    #[test]
    fn apic_base_decodes() {
        let b = ApicBase::decode(0xfee0_0900, 39);
        assert_eq!(
            b,
            ApicBase {
                address: 0xfee0_0000,
                bsp: true,
                enabled: true,
                x2apic: false
            }
        );
        let b = ApicBase::decode(0xffff_fff0_fee0_0c00, 40);
        assert_eq!(b.address, 0xf0_fee0_0000);
        assert!(b.x2apic && b.enabled && !b.bsp);
    }

    #[test]
    fn xapic_sequence_has_the_sdm_delays() {
        let (apic, clock, log) = xapic(3);
        let report = start_processor(&apic, clock.as_ref(), 5, 0x8000, &|| false).unwrap();
        assert_eq!(report.startup_ipis, 2);
        let s = sends(&log, 0x300);
        assert_eq!(
            s.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            [0x4500, 0x4608, 0x4608]
        );
        assert!(s[1].0 - s[0].0 >= INIT_DELAY_NS, "INIT to STARTUP: {s:?}");
        assert!(
            s[2].0 - s[1].0 >= STARTUP_DELAY_NS,
            "STARTUP to STARTUP: {s:?}"
        );
        // The destination went to ICR_HIGH before each send.
        let highs = sends(&log, 0x310);
        assert_eq!(highs.len(), 3);
        assert!(highs.iter().all(|(_, v)| *v == 5 << 24));
        assert!(highs.iter().zip(&s).all(|(h, l)| h.0 <= l.0));
    }

    #[test]
    fn second_startup_is_skipped_once_the_processor_arrived() {
        let (apic, clock, log) = xapic(0);
        let polls = Cell::new(0);
        let arrived = || {
            polls.set(polls.get() + 1);
            polls.get() > 1
        };
        let report = start_processor(&apic, clock.as_ref(), 1, 0x9f000, &arrived).unwrap();
        assert_eq!(report.startup_ipis, 1);
        assert_eq!(sends(&log, 0x300).len(), 2);
    }

    #[test]
    fn stuck_delivery_and_wide_ids_are_errors() {
        let (apic, clock, _log) = xapic(u32::MAX);
        assert!(matches!(
            start_processor(&apic, clock.as_ref(), 1, 0x8000, &|| false),
            Err(LapicError::NotAccepted {
                apic_id: 1,
                icr: 0x4500,
                ..
            })
        ));
        let (apic, clock, log) = xapic(0);
        assert_eq!(
            start_processor(&apic, clock.as_ref(), 256, 0x8000, &|| false),
            Err(LapicError::NeedsX2apic { apic_id: 256 })
        );
        assert!(sends(&log, 0x300).is_empty(), "nothing sent");
        assert!(matches!(
            start_processor(&apic, clock.as_ref(), 1, 0xb0000, &|| false),
            Err(LapicError::BadStartupPage { .. })
        ));
    }

    #[test]
    fn x2apic_uses_the_icr_msr() {
        let clock = Rc::new(ModelClock::new(1_000));
        let log: Log = Rc::default();
        let msrs = MsrModel {
            clock: clock.clone(),
            log: log.clone(),
            values: RefCell::new(HashMap::from([(0x802, 0x1_0000)])),
        };
        let apic: LocalApic<NoMmio, MsrModel> = LocalApic::X2apic(msrs);
        assert_eq!(apic.id(), 0x1_0000);
        let report = start_processor(&apic, clock.as_ref(), 0x1_0001, 0x8000, &|| false).unwrap();
        assert_eq!(report.startup_ipis, 2);
        let s = sends(&log, X2APIC_ICR);
        assert_eq!(
            s.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            [
                0x0001_0001_0000_4500,
                0x0001_0001_0000_4608,
                0x0001_0001_0000_4608
            ]
        );
        assert!(s[1].0 - s[0].0 >= INIT_DELAY_NS);
        assert!(s[2].0 - s[1].0 >= STARTUP_DELAY_NS);
        // ESR was cleared through its MSR (0x828) around the sequence.
        assert!(log.borrow().iter().any(|(_, r, _)| *r == 0x828));
    }

    #[test]
    fn software_enable_only_when_disabled() {
        let (apic, _, log) = xapic(0);
        assert!(apic.software_enable());
        assert_eq!(sends(&log, 0xf0), [(sends(&log, 0xf0)[0].0, 0x1ff)]);
        assert!(!apic.software_enable(), "already enabled");
        assert_eq!(sends(&log, 0xf0).len(), 1);
    }
}
