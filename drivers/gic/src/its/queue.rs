//! The ITS command queue as the driver drives it (Arm IHI 0069, 5.3 "ITS
//! commands" and 12.19.2-5: GITS_CBASER, GITS_CREADR, GITS_CWRITER).
//!
//! The queue is a ring of 32-byte commands. Software writes commands at
//! GITS_CWRITER and then advances it; the ITS consumes from GITS_CREADR.
//! Both are byte offsets with no wrap flag, so the queue is empty when they
//! are equal and one slot always stays free (full: CWRITER one slot behind
//! CREADR). On a command error the ITS may stall with GITS_CREADR.Stalled
//! set and CREADR at the offending command; writing GITS_CWRITER with
//! Retry = 1 makes it try that slot again (12.19.5).

use alloc::vec::Vec;

use sluice_hal::{DeviceAccess, PhysAddr, Timeout, poll_until};

use super::commands::ItsCommand;
use super::error::ItsError;
use super::regs::{self, queue};

/// What every wait and every queue write needs: the ITS's
/// [`DeviceAccess`] (coherent: its Shareability fields kept a shareable
/// value) and its index for logs.
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
    pub fn wait(&self, what: &'static str, done: impl FnMut() -> bool) -> Result<(), ItsError> {
        self.access
            .wait_until(done)
            .map_err(|Timeout { waited_ns }| ItsError::Timeout { what, waited_ns })
    }
}

/// The command queue: one or more 4 KiB pages of commands.
pub(super) struct CommandQueue {
    pub base: PhysAddr,
    pub bytes: u64,
    /// Our copy of GITS_CWRITER.Offset.
    pub writer: u64,
}

/// What the ITS reported while the driver waited on the queue.
struct Progress {
    /// Commands of the batch written to the queue so far.
    written: usize,
    /// Batch index and error of every command the ITS stalled on.
    stalls: Vec<(usize, ItsError)>,
}

impl CommandQueue {
    pub const fn slots(&self) -> u64 {
        self.bytes / queue::COMMAND_BYTES
    }

    fn slot(&self, offset: u64) -> PhysAddr {
        PhysAddr::new(self.base.as_u64() + offset % self.bytes)
    }

    fn advance(&self, offset: u64) -> u64 {
        (offset + queue::COMMAND_BYTES) % self.bytes
    }

    /// Slots software may fill with the ITS reading at `reader`.
    fn free_slots(&self, reader: u64) -> u64 {
        let used = (self.writer + self.bytes - reader % self.bytes) % self.bytes;
        (self.bytes - used) / queue::COMMAND_BYTES - 1
    }

    fn read_command(&self, hw: &Hw<'_>, offset: u64) -> ItsCommand {
        let slot = self.slot(offset);
        let mut w = [0u64; 4];
        for (i, word) in w.iter_mut().enumerate() {
            *word = hw.mem.read_u64(PhysAddr::new(slot.as_u64() + 8 * i as u64));
        }
        ItsCommand::from_words(w)
    }

    fn write_command(&self, hw: &Hw<'_>, offset: u64, cmd: ItsCommand) {
        let slot = self.slot(offset);
        for (i, &word) in cmd.words().iter().enumerate() {
            hw.mem
                .write_u64(PhysAddr::new(slot.as_u64() + 8 * i as u64), word);
        }
        hw.flush(slot, queue::COMMAND_BYTES);
    }

    /// Handles a stalled queue: reports the command at CREADR, puts
    /// `replacement` in its slot and restarts the ITS there.
    fn recover(&self, hw: &Hw<'_>, creadr: u64, replacement: ItsCommand, progress: &mut Progress) {
        let offset = creadr & queue::OFFSET_MASK;
        let command = self.read_command(hw, offset);
        let err = ItsError::CommandStalled {
            command,
            offset: offset as u32,
        };
        log::error!(
            "its{}: {err}; replaced by {replacement}, queue restarted",
            hw.index
        );
        // The command `distance` slots behind the writer is the batch's
        // `written - distance`-th.
        let distance = ((self.writer + self.bytes - offset) % self.bytes) / queue::COMMAND_BYTES;
        let index = progress.written.saturating_sub(distance as usize);
        progress.stalls.push((index, err));
        self.write_command(hw, offset, replacement);
        regs::CWRITER.write(hw.mmio, self.writer | queue::RETRY);
    }

    /// Polls the queue until `done(creadr_offset)`; stalls are recovered
    /// on the way. A timeout names the command the ITS is stuck at.
    fn wait(
        &self,
        hw: &Hw<'_>,
        replacement: ItsCommand,
        progress: &mut Progress,
        stall_limit: usize,
        mut done: impl FnMut(u64) -> bool,
    ) -> Result<(), ItsError> {
        let mut gave_up = None;
        let result = poll_until(hw.clock, hw.timeout_ns, || {
            let creadr = regs::CREADR.read(hw.mmio);
            if creadr & queue::STALLED != 0 {
                if progress.stalls.len() >= stall_limit {
                    gave_up = Some(creadr);
                    return Some(());
                }
                self.recover(hw, creadr, replacement, progress);
                return None;
            }
            done(creadr & queue::OFFSET_MASK).then_some(())
        });
        if gave_up.is_some() {
            log::error!(
                "its{}: the queue keeps stalling, even on the replacement command",
                hw.index
            );
            return Err(ItsError::Wedged);
        }
        result.map_err(|Timeout { waited_ns }| {
            let reader = regs::CREADR.read(hw.mmio) & queue::OFFSET_MASK;
            ItsError::CommandTimeout {
                command: self.read_command(hw, reader),
                waited_ns,
            }
        })
    }

    /// Queues `cmds` (the caller ends them with a SYNC) and waits until
    /// the ITS has consumed all of them. A command the ITS stalls on is
    /// replaced by `replacement` (which must be harmless and valid) and the
    /// queue restarted; the stalls are returned, by batch index, once
    /// everything after them has been consumed. Batches longer than the
    /// queue are fed in as space frees up. `Err` is a timeout (or a queue
    /// that stalls even on the replacement): the ITS's state is unknown.
    pub fn submit(
        &mut self,
        hw: &Hw<'_>,
        cmds: &[ItsCommand],
        replacement: ItsCommand,
    ) -> Result<Vec<(usize, ItsError)>, ItsError> {
        let mut progress = Progress {
            written: 0,
            stalls: Vec::new(),
        };
        // Every command may stall once, and so may each replacement; more
        // means the ITS rejects even the replacement.
        let stall_limit = 2 * cmds.len() + 1;
        let mut written = 0;
        while written < cmds.len() {
            let mut free = 0;
            self.wait(hw, replacement, &mut progress, stall_limit, |reader| {
                free = self.free_slots(reader);
                free > 0
            })?;
            let n = (free as usize).min(cmds.len() - written);
            for &cmd in &cmds[written..written + n] {
                self.write_command(hw, self.writer, cmd);
                self.writer = self.advance(self.writer);
            }
            written += n;
            progress.written = written;
            regs::CWRITER.write(hw.mmio, self.writer);
        }
        let writer = self.writer;
        self.wait(hw, replacement, &mut progress, stall_limit, |reader| {
            reader == writer
        })?;
        Ok(progress.stalls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_always_stays_free() {
        let mut q = CommandQueue {
            base: PhysAddr::new(0x1000),
            bytes: 4096,
            writer: 0,
        };
        assert_eq!(q.slots(), 128);
        assert_eq!(q.free_slots(0), 127, "empty: all but one");
        q.writer = 127 * 32;
        assert_eq!(q.free_slots(0), 0, "full");
        q.writer = 0;
        assert_eq!(q.free_slots(32), 0, "writer just behind reader: full");
        assert_eq!(q.free_slots(64), 1);
        q.writer = 4064;
        assert_eq!(q.advance(q.writer), 0, "wraps");
        assert_eq!(q.free_slots(4064), 127);
    }
}
