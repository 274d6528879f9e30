//! The real SMMUv3 backend ([`SmmuBackend`] over [`SmmuUnit`]s) driving
//! register models of SMMUs ([`SmmuModel`]), as a [`TestIommu`].
//!
//! Each device's [`IommuCaps`] shape the SMMU it sits behind: PASID
//! support is IDR1.SSIDSIZE (with 2-level CD tables beyond 6 bits), the
//! input width is the width the backend's domains are made with; devices
//! whose capabilities (and test unit number) are equal share an SMMU,
//! others get one each (MSI isolation included: it belongs to the ITS
//! behind the SMMU). Two requests cannot be honoured and are reported
//! as the backend decides, not as asked: snoop control (an SMMU cannot
//! force a No-Snoop DMA coherent with stage-1 domains, see
//! [`crate::iommufd::smmu_backend`]) is always off, and the page sizes are
//! always 4 KiB, 2 MiB and 1 GiB. MSI isolation is declared for SMMUs
//! whose devices ask for it, as the boot code will once it programs the
//! ITS.
//!
//! A DMA goes through [`SmmuModel::dma`]: through the model's STE and CD
//! caches, TLB and walk caches (so a forgotten invalidation shows up as a
//! stale translation), and a refused DMA is written to the event queue,
//! where the backend's [`IommuBackend::drain_faults`] finds it.
//!
//! The units borrow their register model, memory and clock for `'static`,
//! as on bare metal: the test platform leaks those (a few kilobytes per
//! platform, in tests only).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::any::Any;
use core::cell::{Cell, RefCell};

use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_hal::{Mmio, PhysAddr};
use sluice_iommu::smmuv3::model::{self, SmmuModel};
use sluice_iommu::smmuv3::walker::{Request, WalkError};
use sluice_iommu::smmuv3::{
    EventKind, IdrBuilder, SmmuConfig, SmmuDomainConfig, SmmuUnit, StreamTableRequest, regs,
};
use sluice_pci::Bdf;

use super::TestIommu;
use crate::iommufd::smmu_backend::{SmmuBackend, SmmuDevice};
use crate::iommufd::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, DomainId, FaultReason,
    FunctionReset, IommuBackend, IommuCaps, PageBudget, Prot, ResetError,
};

/// The SMMU features a test platform does not take from device
/// capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuFlavour {
    /// IDR0.COHACC: table walks and queue accesses snoop CPU caches. Off,
    /// the model flags every word the SMMU reads that was never cleaned.
    pub coherent: bool,
    /// Stage 2 besides stage 1 (IDR0.S2P).
    pub stage2: bool,
    /// A 2-level stream table (IDR0.ST_LEVEL), else a linear one.
    pub two_level: bool,
    /// IDR3.RIL: range TLB invalidation.
    pub range_invalidation: bool,
}

impl SmmuFlavour {
    /// QEMU 7.2's `virt,iommu=smmuv3`: stage 1 only, coherent, 2-level
    /// stream table, range invalidation.
    pub const fn qemu() -> Self {
        Self {
            coherent: true,
            stage2: false,
            two_level: true,
            range_invalidation: true,
        }
    }
    /// A server part: both stages, non-coherent walks, linear stream
    /// table, no range invalidation (one TLBI per page).
    pub const fn server() -> Self {
        Self {
            coherent: false,
            stage2: true,
            two_level: false,
            range_invalidation: false,
        }
    }
}

/// The register model behind a unit, with one fault to inject: a lost
/// doorbell (a write to CMDQ_PROD the SMMU never sees), after which the
/// driver's wait for its CMD_SYNC times out, as with an SMMU that stopped
/// consuming commands. The next doorbell carries the lost commands too.
pub struct FlakySmmu {
    model: &'static SmmuModel<'static>,
    lose_next_doorbell: Cell<bool>,
    lost: Cell<u32>,
}

impl Mmio for FlakySmmu {
    fn read32(&self, offset: usize) -> u32 {
        self.model.read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        if offset == regs::CMDQ_PROD.offset() && self.lose_next_doorbell.replace(false) {
            self.lost.set(self.lost.get() + 1);
            return;
        }
        self.model.write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        self.model.read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        self.model.write64(offset, value)
    }
}

struct TestUnit {
    /// The test's unit number, the registers and IOVA width derived for
    /// it, and whether its ITS isolates MSIs.
    key: (u32, IdrBuilder, u8, bool),
    index: u32,
    model: &'static SmmuModel<'static>,
    mmio: &'static FlakySmmu,
}

/// Counts the function-level resets the backend asks for.
struct RecordingReset(Rc<RefCell<BTreeMap<Bdf, u32>>>);

impl FunctionReset for RecordingReset {
    fn function_level_reset(&mut self, rid: Bdf) -> Result<(), ResetError> {
        *self.0.borrow_mut().entry(rid).or_default() += 1;
        Ok(())
    }
}

/// A [`TestIommu`] running Sluice's SMMUv3 backend and driver over
/// register models. See the module documentation.
pub struct SmmuModelIommu {
    backend: SmmuBackend<'static>,
    mem: &'static ModelMemory,
    clock: &'static ModelClock,
    flavour: SmmuFlavour,
    units: Vec<TestUnit>,
    /// Device → (test unit, StreamID).
    devices: BTreeMap<DeviceId, (usize, u32)>,
    resets: Rc<RefCell<BTreeMap<Bdf, u32>>>,
    fail_attach_after: Option<u32>,
}

impl SmmuModelIommu {
    pub fn new(mem: Rc<ModelMemory>, flavour: SmmuFlavour) -> Self {
        let mem: &'static ModelMemory = Box::leak(Box::new(mem));
        let clock: &'static ModelClock = Box::leak(Box::new(ModelClock::new(1_000)));
        let resets = Rc::new(RefCell::new(BTreeMap::new()));
        let mut backend = SmmuBackend::new();
        backend.set_function_reset(Box::new(RecordingReset(resets.clone())));
        Self {
            backend,
            mem,
            clock,
            flavour,
            units: Vec::new(),
            devices: BTreeMap::new(),
            resets,
            fail_attach_after: None,
        }
    }

    pub fn backend(&self) -> &SmmuBackend<'static> {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut SmmuBackend<'static> {
        &mut self.backend
    }

    /// The register model of the SMMU translating `device`.
    pub fn model(&self, device: DeviceId) -> Option<&'static SmmuModel<'static>> {
        let &(u, _) = self.devices.get(&device)?;
        Some(self.units[u].model)
    }

    /// The StreamID the device was given.
    pub fn stream_id(&self, device: DeviceId) -> Option<u32> {
        self.devices.get(&device).map(|&(_, sid)| sid)
    }

    /// A DMA with the model's full outcome (TLB hit or not) or the walk's
    /// error; a fault is written to the event queue.
    pub fn dma_outcome(
        &self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<model::DmaOutcome, WalkError> {
        let &(u, sid) = self
            .devices
            .get(&device)
            .unwrap_or_else(|| panic!("device {} not added", device.0));
        self.units[u].model.dma(Request {
            sid,
            ssid: pasid,
            iova,
            write,
            privileged: false,
        })
    }

    /// Programming errors any model saw (empty for a correct driver).
    pub fn violations(&self) -> Vec<&'static str> {
        self.units
            .iter()
            .flat_map(|u| u.model.violations())
            .collect()
    }

    /// Pages the SMMUs' own structures hold (stream tables, queues, CD
    /// tables) plus pages kept out of use after failed invalidations:
    /// everything the units hold besides domain tables.
    pub fn structure_pages(&self) -> usize {
        self.units
            .iter()
            .filter_map(|u| self.backend.unit(u.index))
            .map(|u| u.structure_pages() + u.quarantined_pages())
            .sum()
    }

    /// The ID registers an SMMU for devices with these capabilities has.
    fn registers(&self, caps: &IommuCaps) -> IdrBuilder {
        let ssid_bits = if caps.scalable_mode {
            caps.max_pasid_log2
        } else {
            0
        };
        IdrBuilder {
            stage2: self.flavour.stage2,
            vmid16: self.flavour.stage2,
            coherent: self.flavour.coherent,
            two_level: self.flavour.two_level,
            ril: self.flavour.range_invalidation,
            // MSI-signalled CMD_SYNC on coherent SMMUs.
            msi: self.flavour.coherent,
            ssid_bits,
            cd2l: ssid_bits > 6,
            // 256 StreamIDs: every test StreamID fits a linear table too.
            sid_bits: if self.flavour.two_level { 16 } else { 8 },
            oas_bits: 48,
            ..IdrBuilder::qemu_7_2()
        }
    }

    fn unit_for(&mut self, caps: &IommuCaps) -> usize {
        let regs = self.registers(caps);
        let key = (
            caps.unit,
            regs,
            caps.input_address_bits,
            caps.interrupt_remapping,
        );
        if let Some(n) = self.units.iter().position(|u| u.key == key) {
            return n;
        }
        let mut model = SmmuModel::new(self.mem, regs);
        if !self.flavour.coherent {
            model = model.check_flushes(self.mem);
        }
        let model: &'static SmmuModel<'static> = Box::leak(Box::new(model));
        let mmio: &'static FlakySmmu = Box::leak(Box::new(FlakySmmu {
            model,
            lose_next_doorbell: Cell::new(false),
            lost: Cell::new(0),
        }));
        let n = self.units.len();
        let config = SmmuConfig {
            stream_table: if self.flavour.two_level {
                StreamTableRequest::TwoLevel
            } else {
                StreamTableRequest::Linear
            },
            // 1000 polls of the 1 us model clock.
            timeout_ns: 1_000_000,
            ..SmmuConfig::new(n as u32, 0x0905_0000 + 0x2_0000 * n as u64)
        };
        let unit = SmmuUnit::init(mmio, self.mem, self.clock, config)
            .unwrap_or_else(|e| panic!("SMMU model {n} did not come up: {e}"));
        let domains = SmmuDomainConfig::any().with_input_bits(u32::from(caps.input_address_bits));
        let index = self.backend.add_unit_with(unit, domains);
        if caps.interrupt_remapping {
            self.backend.set_msi_isolation(index, true);
        }
        self.units.push(TestUnit {
            key,
            index,
            model,
            mmio,
        });
        n
    }
}

/// How a refused DMA looks to the guest, read from the walk's error. A
/// fetch abort or access-flag fault is a driver bug: the test fails.
fn walker_reason(e: WalkError) -> FaultReason {
    match e {
        WalkError::Abort => FaultReason::Blocked,
        WalkError::Fault(f) => match f.kind {
            EventKind::Translation | EventKind::AddrSize => FaultReason::NotPresent,
            EventKind::Permission => FaultReason::Permission,
            EventKind::BadStreamId
            | EventKind::BadSte
            | EventKind::StreamDisabled
            | EventKind::BadSubstreamId
            | EventKind::BadCd => FaultReason::Blocked,
            other => panic!("the driver wrote broken structures or tables: {other:?}"),
        },
    }
}

impl IommuBackend for SmmuModelIommu {
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError> {
        self.backend.caps(device)
    }
    fn domain_alloc(
        &mut self,
        device: DeviceId,
        config: DomainConfig,
        budget: &mut PageBudget,
    ) -> Result<DomainId, BackendError> {
        self.backend.domain_alloc(device, config, budget)
    }
    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget) {
        self.backend.domain_free(domain, budget)
    }
    fn map(
        &mut self,
        domain: DomainId,
        iova: u64,
        phys: PhysAddr,
        length: u64,
        prot: Prot,
        large_pages: bool,
        budget: &mut PageBudget,
    ) -> Result<(), BackendError> {
        self.backend
            .map(domain, iova, phys, length, prot, large_pages, budget)
    }
    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget) {
        self.backend.unmap(domain, iova, length, budget)
    }
    fn attach(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        let inject = matches!(target, AttachTarget::Domain(_))
            && match self.fail_attach_after {
                Some(0) => {
                    self.fail_attach_after = None;
                    true
                }
                Some(n) => {
                    self.fail_attach_after = Some(n - 1);
                    false
                }
                None => false,
            };
        let Some(&(u, _)) = self.devices.get(&device) else {
            return self.backend.attach(device, pasid, target);
        };
        if !inject {
            return self.backend.attach(device, pasid, target);
        }
        let mmio = self.units[u].mmio;
        let lost = mmio.lost.get();
        mmio.lose_next_doorbell.set(true);
        let r = self.backend.attach(device, pasid, target);
        mmio.lose_next_doorbell.set(false);
        assert_eq!(
            mmio.lost.get(),
            lost + 1,
            "the attach submitted no command, so no failure could be injected"
        );
        r
    }
    fn reset_device(&mut self, device: DeviceId) -> Result<(), BackendError> {
        self.backend.reset_device(device)
    }
    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault)) {
        self.backend.drain_faults(sink)
    }
}

impl TestIommu for SmmuModelIommu {
    fn add_device(&mut self, device: DeviceId, caps: IommuCaps, flr: bool) {
        let u = self.unit_for(&caps);
        // Bus 0, from devfn 0x10 on: StreamIDs never collide with the
        // tests' guest BDFs by accident and fit a 256-entry linear table.
        let sid = 0x10 + device.0;
        assert!(sid < 0x100, "too many test devices for the stream table");
        assert!(
            self.devices.values().all(|&(_, s)| s != sid),
            "device {} would share StreamID {sid:#x}",
            device.0
        );
        self.backend
            .add_device(
                device,
                SmmuDevice {
                    unit: self.units[u].index,
                    stream_id: sid,
                    rid: Bdf::from_requester_id(sid as u16),
                    flr,
                },
            )
            .unwrap_or_else(|e| panic!("device {}: {e}", device.0));
        self.devices.insert(device, (u, sid));
    }

    fn dma(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason> {
        self.dma_outcome(device, pasid, iova, write)
            .map(|o| o.phys)
            .map_err(walker_reason)
    }

    fn domain_count(&self) -> usize {
        self.backend.domain_count()
    }

    fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget {
        self.backend.attachment(device, pasid)
    }

    fn resets(&self, device: DeviceId) -> u32 {
        self.stream_id(device)
            .and_then(|sid| {
                self.resets
                    .borrow()
                    .get(&Bdf::from_requester_id(sid as u16))
                    .copied()
            })
            .unwrap_or(0)
    }

    fn fail_attach_after(&mut self, successes: Option<u32>) {
        self.fail_attach_after = successes;
    }

    fn domain_config(&self, domain: DomainId) -> Option<DomainConfig> {
        self.backend.domain_config(domain)
    }

    fn domain_table_pages(&self, domain: DomainId) -> Option<u64> {
        let (unit, smmu) = self.backend.smmu_domain(domain)?;
        let info = self.backend.unit(unit)?.domain_info(smmu).ok()?;
        Some(info.table_pages as u64)
    }

    fn infrastructure_pages(&self) -> usize {
        self.structure_pages()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
