//! The command queue and the event queue as the driver drives them (Arm
//! IHI 0070, 3.5 "Command and Event queues", 7.1 "Command queue errors",
//! 7.4 "Event queue overflow").
//!
//! Both queues are circular buffers of 2^LOG2SIZE entries in one 4 KiB
//! page. PROD and CONS carry the index in bits LOG2SIZE-1:0 and a wrap
//! flag in bit LOG2SIZE, so equal indices mean empty when the wrap flags
//! agree and full when they differ (3.5.1).

use alloc::vec::Vec;

use sluice_hal::{DeviceAccess, PhysAddr};

use super::commands::{Command, SyncSignal};
use super::error::{CommandErrorKind, SmmuError};
use super::events::EventRecord;
use super::regs::{self, gerror, queue};

/// What every wait and every table write needs: the SMMU's
/// [`DeviceAccess`] (coherent: IDR0.COHACC) and its index for logs.
#[derive(Clone, Copy)]
pub(super) struct Hw<'a> {
    pub access: DeviceAccess<'a>,
    pub index: u32,
}

impl<'a> core::ops::Deref for Hw<'a> {
    type Target = DeviceAccess<'a>;
    fn deref(&self) -> &DeviceAccess<'a> {
        &self.access
    }
}

impl Hw<'_> {
    pub fn wait(&self, what: &'static str, done: impl FnMut() -> bool) -> Result<(), SmmuError> {
        self.access
            .wait_until(done)
            .map_err(|t| SmmuError::Timeout {
                what,
                waited_ns: t.waited_ns,
            })
    }
}

/// Queue pointer arithmetic for 2^`log2` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ring {
    pub log2: u32,
}

impl Ring {
    pub const fn size(self) -> u32 {
        1 << self.log2
    }
    /// Index and wrap bits.
    pub const fn mask(self) -> u32 {
        (1 << (self.log2 + 1)) - 1
    }
    pub const fn index(self, ptr: u32) -> u32 {
        ptr & (self.size() - 1)
    }
    pub const fn advance(self, ptr: u32, n: u32) -> u32 {
        ptr.wrapping_add(n) & self.mask()
    }
    /// Entries between `from` and `to` (`to` at or after `from`).
    pub const fn distance(self, from: u32, to: u32) -> u32 {
        to.wrapping_sub(from) & self.mask()
    }
}

/// The command queue.
pub(super) struct CommandQueue {
    pub base: PhysAddr,
    pub ring: Ring,
    /// Our copy of CMDQ_PROD.
    pub prod: u32,
    /// With IDR0.MSI on a coherent SMMU: CMD_SYNC writes an increasing
    /// value here, which the CPU polls instead of CMDQ_CONS.
    pub msi: Option<(PhysAddr, u32)>,
}

impl CommandQueue {
    /// Entries one page holds: 256 commands of 16 bytes.
    pub const PAGE_LOG2: u32 = 8;

    fn slot(&self, ptr: u32) -> PhysAddr {
        PhysAddr::new(self.base.as_u64() + u64::from(self.ring.index(ptr)) * 16)
    }

    /// Handles a stopped queue (7.1): reads the error, replaces the
    /// offending command with a CMD_SYNC, and acknowledges CMDQ_ERR through
    /// GERRORN so consumption resumes at the same entry. Returns the error,
    /// if there was one.
    pub fn recover(&self, hw: &Hw<'_>) -> Option<SmmuError> {
        let active = regs::GERROR.read(hw.mmio) ^ regs::GERRORN.read(hw.mmio);
        if active & gerror::CMDQ_ERR == 0 {
            return None;
        }
        let cons = regs::CMDQ_CONS.read(hw.mmio);
        let code = (cons & queue::CONS_ERR_MASK) >> queue::CONS_ERR_SHIFT;
        let slot = self.slot(cons);
        let command = [
            hw.mem.read_u64(slot),
            hw.mem.read_u64(PhysAddr::new(slot.as_u64() + 8)),
        ];
        let index = self.ring.index(cons);
        let kind = CommandErrorKind::from_code(code);
        let err = SmmuError::CommandError {
            kind,
            index,
            command,
        };
        log::error!(
            "smmu{}: {err}; replaced by CMD_SYNC, queue restarted",
            hw.index
        );
        let sync = Command::sync(SyncSignal::None).words();
        hw.mem.write_u64(slot, sync[0]);
        hw.mem.write_u64(PhysAddr::new(slot.as_u64() + 8), sync[1]);
        hw.flush(slot, 16);
        let gerrorn = regs::GERRORN.read(hw.mmio);
        regs::GERRORN.write(hw.mmio, gerrorn ^ gerror::CMDQ_ERR);
        Some(err)
    }

    /// Free entries, waiting (and recovering from command errors) until
    /// there is at least one.
    fn wait_for_space(
        &mut self,
        hw: &Hw<'_>,
        errors: &mut Vec<SmmuError>,
    ) -> Result<u32, SmmuError> {
        let mut space = 0;
        let ring = self.ring;
        let prod = self.prod;
        let mut recovered = Vec::new();
        hw.wait("command-queue space", || {
            if let Some(e) = self.recover(hw) {
                recovered.push(e);
            }
            let cons = regs::CMDQ_CONS.read(hw.mmio) & ring.mask();
            space = ring.size() - ring.distance(cons, prod);
            space > 0
        })?;
        errors.extend(recovered);
        Ok(space)
    }

    /// Queues `cmds` followed by a CMD_SYNC and waits for the SYNC to
    /// complete (4.7.3). A command the SMMU refuses is replaced and the
    /// queue restarted; the first such error is returned once everything
    /// after it has completed.
    pub fn submit(&mut self, hw: &Hw<'_>, cmds: &[Command]) -> Result<(), SmmuError> {
        let mut errors = Vec::new();
        let sync = match &mut self.msi {
            Some((addr, seq)) => {
                *seq = seq.wrapping_add(1);
                Command::sync(SyncSignal::Msi {
                    address: addr.as_u64(),
                    data: *seq,
                })
            }
            None => Command::sync(SyncSignal::None),
        };
        let total = cmds.len() + 1;
        let mut written = 0;
        let mut sync_ptr = self.prod;
        while written < total {
            let space = self.wait_for_space(hw, &mut errors)? as usize;
            let n = space.min(total - written);
            for i in 0..n {
                let cmd = cmds.get(written + i).copied().unwrap_or(sync);
                if written + i == total - 1 {
                    sync_ptr = self.prod;
                }
                let slot = self.slot(self.prod);
                let w = cmd.words();
                hw.mem.write_u64(slot, w[0]);
                hw.mem.write_u64(PhysAddr::new(slot.as_u64() + 8), w[1]);
                hw.flush(slot, 16);
                self.prod = self.ring.advance(self.prod, 1);
            }
            written += n;
            regs::CMDQ_PROD.write(hw.mmio, self.prod);
        }
        self.wait_for_sync(hw, sync_ptr, &mut errors)?;
        match errors.first() {
            Some(&e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until the CMD_SYNC at `sync_ptr` was consumed (CONS moved
    /// past it) or, with MSI completion, wrote its value.
    fn wait_for_sync(
        &mut self,
        hw: &Hw<'_>,
        sync_ptr: u32,
        errors: &mut Vec<SmmuError>,
    ) -> Result<(), SmmuError> {
        let ring = self.ring;
        let prod = self.prod;
        let after = ring.advance(sync_ptr, 1);
        let msi = self.msi;
        let mut recovered = Vec::new();
        let result = hw.wait("CMD_SYNC", || {
            if let Some((addr, seq)) = msi
                && hw.mem.read_u32(addr) == seq
            {
                return true;
            }
            if let Some(e) = self.recover(hw) {
                recovered.push(e);
            }
            let cons = regs::CMDQ_CONS.read(hw.mmio) & ring.mask();
            ring.distance(after, cons) <= ring.distance(after, prod)
        });
        errors.extend(recovered);
        result
    }
}

/// The event queue.
pub(super) struct EventQueue {
    pub base: PhysAddr,
    pub ring: Ring,
    /// Our copy of EVENTQ_CONS (with OVACKFLG).
    pub cons: u32,
}

impl EventQueue {
    /// Entries one page holds: 128 records of 32 bytes.
    pub const PAGE_LOG2: u32 = 7;

    /// Reads every record written since the last call (at most one queue's
    /// worth, so a stuck producer cannot keep the CPU here), acknowledges
    /// them and any overflow. Returns the records and whether records were
    /// lost to overflow.
    pub fn drain(&mut self, hw: &Hw<'_>) -> (Vec<EventRecord>, bool) {
        let prod_reg = regs::EVENTQ_PROD.read(hw.mmio);
        let prod = prod_reg & self.ring.mask();
        let mut cons = self.cons & self.ring.mask();
        let mut records = Vec::new();
        let pending = self.ring.distance(cons, prod).min(self.ring.size());
        for _ in 0..pending {
            let slot = PhysAddr::new(self.base.as_u64() + u64::from(self.ring.index(cons)) * 32);
            let mut w = [0u64; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = hw.mem.read_u64(PhysAddr::new(slot.as_u64() + 8 * i as u64));
            }
            records.push(EventRecord::from_words(w));
            cons = self.ring.advance(cons, 1);
        }
        // OVACKFLG = OVFLG acknowledges the overflow (7.4).
        let overflowed = (prod_reg ^ self.cons) & queue::OVERFLOW != 0;
        self.cons = cons | (prod_reg & queue::OVERFLOW);
        regs::EVENTQ_CONS.write(hw.mmio, self.cons);
        (records, overflowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_arithmetic_follows_the_wrap_flag() {
        let r = Ring { log2: 2 };
        assert_eq!(r.size(), 4);
        assert_eq!(r.mask(), 0b111);
        assert_eq!(r.advance(0b011, 1), 0b100, "index wraps, wrap flag flips");
        assert_eq!(r.advance(0b111, 1), 0b000);
        assert_eq!(r.index(0b110), 0b10);
        assert_eq!(r.distance(0b011, 0b100), 1);
        assert_eq!(r.distance(0b010, 0b110), 4, "same index, other wrap: full");
        assert_eq!(r.distance(0b110, 0b110), 0);
    }
}
