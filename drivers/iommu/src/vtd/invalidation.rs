//! Carrying out invalidations: the invalidation queue (VT-d spec rev 4.x,
//! 6.5.2) or, on units without ECAP.QI, the context-command and IOTLB
//! registers (6.5.1). Both take the same [`Descriptor`] lists, so the rest
//! of the driver decides *what* to invalidate once.

use sluice_hal::{DeviceAccess, PAGE_SIZE, PhysAddr};

use super::descriptors::{Descriptor, kind};
use super::error::VtdError;
use super::regs::{self, ccmd, fsts, iotlb, queue};

/// What the invalidation code needs from the unit: its [`DeviceAccess`]
/// (coherent: ECAP.C), where its IOTLB registers are, and its index.
pub(super) struct Hw<'a> {
    pub access: DeviceAccess<'a>,
    pub iotlb_offset: usize,
    pub unit: u32,
}

impl<'a> core::ops::Deref for Hw<'a> {
    type Target = DeviceAccess<'a>;
    fn deref(&self) -> &DeviceAccess<'a> {
        &self.access
    }
}

impl Hw<'_> {
    pub fn wait(&self, what: &'static str, done: impl FnMut() -> bool) -> Result<(), VtdError> {
        self.access.wait_until(done).map_err(|t| VtdError::Timeout {
            what,
            waited_ns: t.waited_ns,
        })
    }
}

/// A 4 KiB queue of 256 128-bit descriptors (IQA.QS = 0, DW = 0), plus a
/// page for wait-descriptor status writes.
pub(super) struct InvalidationQueue {
    pub base: PhysAddr,
    pub status: PhysAddr,
    /// Index of the next free slot (IQT / 16).
    tail: u32,
    /// Status value the next wait descriptor writes; never 0.
    token: u32,
}

pub(super) const QUEUE_ENTRIES: u32 = (PAGE_SIZE / 16) as u32;

/// How the unit is told to invalidate.
pub(super) enum Invalidator {
    Queue(InvalidationQueue),
    Registers,
}

impl InvalidationQueue {
    pub fn new(base: PhysAddr, status: PhysAddr) -> Self {
        Self {
            base,
            status,
            tail: 0,
            token: 1,
        }
    }

    fn slot(&self, index: u32) -> PhysAddr {
        PhysAddr::new(self.base.as_u64() + u64::from(index) * 16)
    }

    fn write_slot(&self, hw: &Hw<'_>, index: u32, d: Descriptor) {
        let [lo, hi] = d.words();
        let addr = self.slot(index);
        hw.mem.write_u64(addr, lo);
        hw.mem.write_u64(PhysAddr::new(addr.as_u64() + 8), hi);
        hw.flush(addr, 16);
    }

    /// Queues `descs` followed by a wait descriptor, rings the tail and
    /// waits for the status write. Large lists go in several batches so the
    /// queue never fills (one slot always stays empty, 6.5.2).
    fn submit(&mut self, hw: &Hw<'_>, descs: &[Descriptor]) -> Result<(), VtdError> {
        let batch = (QUEUE_ENTRIES - 2) as usize;
        let mut result = Ok(());
        let mut chunks = descs.chunks(batch);
        // An empty list still waits, which drains earlier work.
        let mut next = Some(chunks.next().unwrap_or(&[]));
        while let Some(chunk) = next {
            // After a timeout the hardware may still be behind: never
            // overwrite descriptors it has not fetched yet.
            let needed = chunk.len() as u32 + 1;
            hw.wait("free space in the invalidation queue", || {
                let head = ((regs::IQH.read(hw.mmio) & queue::INDEX_MASK) >> queue::INDEX_SHIFT)
                    as u32
                    % QUEUE_ENTRIES;
                let free = (head + QUEUE_ENTRIES - self.tail - 1) % QUEUE_ENTRIES;
                free >= needed
            })
            .inspect_err(|_| {
                if result.is_ok() {
                    log::error!(
                        "vtd{}: invalidation queue full; the unit stopped fetching",
                        hw.unit
                    );
                }
            })?;
            for &d in chunk {
                self.write_slot(hw, self.tail, d);
                self.tail = (self.tail + 1) % QUEUE_ENTRIES;
            }
            let token = self.token;
            self.token = self.token.wrapping_add(1).max(1);
            self.write_slot(hw, self.tail, Descriptor::wait(self.status, token, true));
            self.tail = (self.tail + 1) % QUEUE_ENTRIES;
            regs::IQT.write(hw.mmio, u64::from(self.tail) << queue::INDEX_SHIFT);
            if let Err(e) = self.wait_for(hw, token) {
                // Keep the first error, but finish the other batches: they
                // may be what stops a device from using freed memory.
                if result.is_ok() {
                    result = Err(e);
                }
                if matches!(e, VtdError::Timeout { .. }) {
                    return result;
                }
            }
            next = chunks.next();
        }
        result
    }

    fn wait_for(&mut self, hw: &Hw<'_>, token: u32) -> Result<(), VtdError> {
        let mut error = None;
        let mut outcome = Ok(());
        let done = hw.wait("an invalidation wait descriptor", || {
            if hw.mem.read_u32(self.status) == token {
                return true;
            }
            let status = regs::FSTS.read(hw.mmio);
            if status & (fsts::IQE | fsts::ITE | fsts::ICE) != 0 && error.is_none() {
                match self.recover(hw, status) {
                    // IQE: the queue runs on; keep waiting for our token.
                    Ok(e) => error = Some(e),
                    // ITE/ICE: the pending waits were discarded.
                    Err(e) => {
                        outcome = Err(e);
                        return true;
                    }
                }
            }
            false
        });
        outcome?;
        done?;
        if let Some(e) = error {
            return Err(e);
        }
        // A bad device-TLB completion (ICE) does not stop the queue, so the
        // wait can complete with it pending: check once more.
        let status = regs::FSTS.read(hw.mmio);
        if status & (fsts::ITE | fsts::ICE) != 0 {
            return match self.recover(hw, status) {
                Ok(e) | Err(e) => Err(e),
            };
        }
        Ok(())
    }

    /// Handles an error the queue stopped on (6.5.2.10). For IQE the bad
    /// descriptor at IQH is reported and replaced by a no-op, and clearing
    /// IQE lets the hardware resume: returns `Ok(error to report)`. For
    /// ITE/ICE the hardware dropped the pending wait descriptors: the error
    /// is cleared, the queue resynchronised, and `Err` returned.
    fn recover(&mut self, hw: &Hw<'_>, status: u32) -> Result<VtdError, VtdError> {
        let record = regs::IQERCD.read(hw.mmio);
        if status & fsts::IQE != 0 {
            let index = ((regs::IQH.read(hw.mmio) & queue::INDEX_MASK) >> queue::INDEX_SHIFT)
                as u32
                % QUEUE_ENTRIES;
            let slot = self.slot(index);
            let descriptor = [
                hw.mem.read_u64(slot),
                hw.mem.read_u64(PhysAddr::new(slot.as_u64() + 8)),
            ];
            let info = (record & queue::IQERCD_IQEI_MASK) as u8;
            log::error!(
                "vtd{}: invalidation queue rejected descriptor {index} ({:#018x}:{:#018x}, IQEI {info}); \
                 skipping it",
                hw.unit,
                descriptor[1],
                descriptor[0]
            );
            self.write_slot(hw, index, Descriptor::nop());
            regs::FSTS.write(hw.mmio, fsts::IQE);
            return Ok(VtdError::InvalidationQueueError {
                index,
                descriptor,
                info,
            });
        }
        let error = if status & fsts::ITE != 0 {
            VtdError::DeviceTlbTimeout {
                sid: (record >> queue::IQERCD_ITESID_SHIFT) as u16,
            }
        } else {
            VtdError::InvalidationCompletionError {
                sid: (record >> queue::IQERCD_ICESID_SHIFT) as u16,
            }
        };
        log::error!("vtd{}: {error}", hw.unit);
        regs::FSTS.write(hw.mmio, status & (fsts::ITE | fsts::ICE));
        // The hardware resumes after the discarded waits; wait until it has
        // caught up with our tail so the queue is consistent again.
        let tail = u64::from(self.tail) << queue::INDEX_SHIFT;
        hw.wait("the invalidation queue to drain", || {
            regs::IQH.read(hw.mmio) & queue::INDEX_MASK == tail
        })?;
        Err(error)
    }
}

impl Invalidator {
    /// Carries out `descs` in order and waits for completion.
    pub fn submit(&mut self, hw: &Hw<'_>, descs: &[Descriptor]) -> Result<(), VtdError> {
        match self {
            Invalidator::Queue(q) => q.submit(hw, descs),
            Invalidator::Registers => {
                for d in descs {
                    register_invalidate(hw, *d)?;
                }
                Ok(())
            }
        }
    }
}

/// Register-based invalidation of one descriptor's worth (6.5.1): context
/// cache through CCMD, IOTLB through the IVA/IOTLB registers, each polled
/// until the hardware clears its busy bit.
fn register_invalidate(hw: &Hw<'_>, d: Descriptor) -> Result<(), VtdError> {
    let [lo, hi] = d.words();
    let g = (lo >> 4) & 0b11;
    let did = (lo >> 16) & 0xffff;
    match d.kind() {
        kind::CONTEXT_CACHE => {
            let sid = (lo >> 32) & 0xffff;
            let fm = (lo >> 48) & 0b11;
            regs::CCMD.write(
                hw.mmio,
                ccmd::ICC
                    | (g << ccmd::CIRG_SHIFT)
                    | (fm << ccmd::FM_SHIFT)
                    | (sid << ccmd::SID_SHIFT)
                    | did,
            );
            hw.wait("a context-cache invalidation (CCMD.ICC)", || {
                regs::CCMD.read(hw.mmio) & ccmd::ICC == 0
            })
        }
        kind::IOTLB => {
            let (iva, iotlb_reg) = regs::iotlb_regs(hw.iotlb_offset);
            if g == iotlb::GRANULARITY_PAGE {
                iva.write(hw.mmio, hi);
            }
            let drain = if lo & (1 << 7) != 0 {
                iotlb::DRAIN_READS
            } else {
                0
            } | if lo & (1 << 6) != 0 {
                iotlb::DRAIN_WRITES
            } else {
                0
            };
            iotlb_reg.write(
                hw.mmio,
                iotlb::IVT | (g << iotlb::IIRG_SHIFT) | drain | (did << iotlb::DID_SHIFT),
            );
            hw.wait("an IOTLB invalidation (IOTLB.IVT)", || {
                iotlb_reg.read(hw.mmio) & iotlb::IVT == 0
            })
        }
        // Register-based invalidation is synchronous: nothing to wait for.
        kind::WAIT => Ok(()),
        _ => Err(VtdError::Unsupported(
            "device-TLB, PASID and interrupt-entry invalidation without queued invalidation",
        )),
    }
}
