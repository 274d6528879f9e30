//! Taking ownership of every SMMU the IORT describes, the way Sluice does
//! at boot (IORT, ARM DEN 0049: SMMUv3 nodes, RMR nodes):
//!
//! * one [`SmmuUnit`] per SMMUv3 node, brought up with a stream table in
//!   which every stream aborts, so every device behind it — enumerated or
//!   not — is blocked from the moment translation is on;
//! * each RMR (reserved memory range) node is identity-mapped, on the SMMU
//!   its ID mappings point at, for exactly the StreamIDs they name:
//!   firmware keeps DMAing there. The PCI functions using such a StreamID
//!   are flagged, since giving them to a guest would hand it that memory;
//! * an SMMU that cannot be brought up (or an SMMUv1/v2, which Sluice does
//!   not drive) is reported loudly, and every function behind it is
//!   marked uncovered: it is not isolated and is never assigned. So are
//!   functions the IORT sends past every SMMU, and functions whose
//!   StreamID lies beyond the stream table (blocked, but never
//!   attachable).
//!
//! Nothing here touches real hardware directly: the caller hands each
//! SMMU its register window, DMA memory and clock through a factory, so
//! the same logic runs over [`SmmuModel`](super::model::SmmuModel) in host
//! tests and over the real SMMUs at boot.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::fmt;

use sluice_hal::{Clock, DmaMemory, Mmio, PAGE_SIZE, PhysAddr};
use sluice_pci::PciAddress;

use super::error::SmmuError;
use super::unit::{SmmuConfig, SmmuDomainConfig, SmmuDomainId, SmmuUnit, StreamTableRequest};
use crate::acpi::iort::{Iort, NodeKind, SmmuV3};
use crate::association::{Association, UnitId};
use crate::pagetable::MapPerms;

/// What the driver needs to reach one SMMU.
#[derive(Clone, Copy)]
pub struct SmmuHardware<'a> {
    pub mmio: &'a dyn Mmio,
    pub mem: &'a dyn DmaMemory,
    pub clock: &'a dyn Clock,
}

/// How the SMMUs are brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnershipConfig {
    /// How long any single wait on an SMMU may take.
    pub timeout_ns: u64,
    pub stream_table: StreamTableRequest,
    /// Most StreamIDs one RMR ID mapping may name; a mapping naming more
    /// is refused (logged) rather than attaching thousands of streams to
    /// firmware memory.
    pub max_rmr_streams: u32,
}

impl OwnershipConfig {
    pub const fn new() -> Self {
        Self {
            timeout_ns: 100_000_000,
            stream_table: StreamTableRequest::Auto,
            max_rmr_streams: 256,
        }
    }
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One SMMU under Sluice's control.
pub struct OwnedSmmu<'a> {
    /// Position among the IORT's SMMU nodes (`smmuN` in the logs, as in
    /// [`UnitId::Smmu`]).
    pub ordinal: usize,
    /// Index of its node in [`Iort::nodes`].
    pub node: usize,
    pub base: u64,
    pub unit: SmmuUnit<'a>,
}

/// Why an SMMU node is not under Sluice's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnershipError {
    /// The platform could not provide the SMMU's registers or memory, or
    /// the node's register base is unusable.
    NoHardware(&'static str),
    /// An SMMUv1/v2 node: Sluice drives SMMUv3 only.
    NotSmmuV3,
    /// Another SMMU node already names the same register block.
    DuplicateBase { first: usize },
    /// Bring-up failed.
    Init(SmmuError),
}

impl fmt::Display for OwnershipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHardware(why) => write!(f, "its registers are unusable: {why}"),
            Self::NotSmmuV3 => f.write_str("it is an SMMUv1/v2, which Sluice does not drive"),
            Self::DuplicateBase { first } => {
                write!(f, "smmu{first} already uses the same register block")
            }
            Self::Init(e) => write!(f, "bring-up failed: {e}"),
        }
    }
}

/// An SMMU left alone, with the functions that are therefore not isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedSmmu {
    pub ordinal: usize,
    pub base: u64,
    pub error: OwnershipError,
    pub devices: Vec<PciAddress>,
}

/// One range of an RMR node identity-mapped for some streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmrRegion {
    /// Index of the RMR node in [`Iort::nodes`] and of the range in it.
    pub node: usize,
    pub range: usize,
    pub base: u64,
    /// Last byte (inclusive).
    pub limit: u64,
    /// Why the identity map could not be installed (the streams stay
    /// blocked from the range, so firmware DMA there faults).
    pub error: Option<SmmuError>,
}

/// A StreamID that RMR nodes name, on one owned SMMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RmrStream {
    /// The identity domain the stream is attached to; `None` when the
    /// domain could not be made or the attach failed (`error`), so the
    /// stream is still blocked.
    pub domain: Option<SmmuDomainId>,
    pub regions: Vec<RmrRegion>,
    pub error: Option<SmmuError>,
}

/// What Sluice may do with a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus<'s> {
    /// Behind an owned SMMU, blocked.
    Isolated { unit: usize, stream_id: u32 },
    /// Behind an owned SMMU, but firmware DMAs to these regions through
    /// its StreamID and they are identity-mapped for it: assigning it
    /// would hand a guest that memory.
    Rmr {
        unit: usize,
        stream_id: u32,
        stream: &'s RmrStream,
    },
    /// No owned SMMU can translate its DMA: never assign it.
    Uncovered,
}

/// Every SMMU of the platform under Sluice's control, for the hypervisor
/// runtime to take by value.
pub struct OwnedSmmus<'a> {
    pub units: Vec<OwnedSmmu<'a>>,
    /// Every function behind an owned SMMU → (index in
    /// [`units`](Self::units), StreamID).
    pub device_unit: BTreeMap<PciAddress, (usize, u32)>,
    /// (index in [`units`](Self::units), StreamID) → what RMRs need.
    pub rmr_streams: BTreeMap<(usize, u32), RmrStream>,
    /// Functions no owned SMMU covers (see the module docs).
    pub uncovered: BTreeSet<PciAddress>,
    pub failed: Vec<FailedSmmu>,
}

impl<'a> OwnedSmmus<'a> {
    pub fn unit_of(&self, addr: PciAddress) -> Option<&OwnedSmmu<'a>> {
        self.units.get(self.device_unit.get(&addr)?.0)
    }

    pub fn unit_of_mut(&mut self, addr: PciAddress) -> Option<&mut OwnedSmmu<'a>> {
        let index = self.device_unit.get(&addr)?.0;
        self.units.get_mut(index)
    }

    /// The owned unit of SMMU `smmuN`, if it came up.
    pub fn unit_for_ordinal(&self, ordinal: usize) -> Option<usize> {
        self.units.iter().position(|u| u.ordinal == ordinal)
    }

    pub fn status(&self, addr: PciAddress) -> DeviceStatus<'_> {
        match self.device_unit.get(&addr) {
            Some(&(unit, stream_id)) => match self.rmr_streams.get(&(unit, stream_id)) {
                Some(stream) => DeviceStatus::Rmr {
                    unit,
                    stream_id,
                    stream,
                },
                None => DeviceStatus::Isolated { unit, stream_id },
            },
            None => DeviceStatus::Uncovered,
        }
    }

    pub fn is_rmr_device(&self, addr: PciAddress) -> bool {
        matches!(self.status(addr), DeviceStatus::Rmr { .. })
    }
}

/// Brings up one unit per SMMUv3 node of `iort`, applies its RMR nodes and
/// returns the owned set. `associations` are the per-segment device
/// associations made from the same IORT; `hardware(ordinal, node)`
/// provides each SMMU's register window, memory and clock. Failures are
/// logged and recorded; this never gives up on the other SMMUs.
pub fn take_ownership<'a>(
    iort: &Iort,
    associations: &[Association],
    config: &OwnershipConfig,
    mut hardware: impl FnMut(usize, &SmmuV3) -> Result<SmmuHardware<'a>, &'static str>,
) -> OwnedSmmus<'a> {
    let mut owned = OwnedSmmus {
        units: Vec::new(),
        device_unit: BTreeMap::new(),
        rmr_streams: BTreeMap::new(),
        uncovered: BTreeSet::new(),
        failed: Vec::new(),
    };
    // SMMU ordinal → index in `owned.units`.
    let mut by_ordinal: BTreeMap<usize, usize> = BTreeMap::new();
    let mut bases: BTreeMap<u64, usize> = BTreeMap::new();
    for (ordinal, &node) in iort.smmus().iter().enumerate() {
        let Some(n) = iort.nodes.get(node) else {
            continue;
        };
        let (base, result) = match &n.kind {
            NodeKind::SmmuV3(s) => (s.base, bring_up(ordinal, s, config, &bases, &mut hardware)),
            NodeKind::Smmu(s) => (s.base, Err(OwnershipError::NotSmmuV3)),
            _ => continue,
        };
        match result {
            Ok(unit) => {
                by_ordinal.insert(ordinal, owned.units.len());
                bases.insert(base, ordinal);
                owned.units.push(OwnedSmmu {
                    ordinal,
                    node,
                    base,
                    unit,
                });
            }
            Err(error) => {
                log::error!(
                    "smmu{ordinal} @{base:#x}: NOT under Sluice's control, {error}; \
                     the devices behind it are not isolated and will never be assigned"
                );
                owned.failed.push(FailedSmmu {
                    ordinal,
                    base,
                    error,
                    devices: Vec::new(),
                });
            }
        }
    }

    for association in associations {
        for d in &association.devices {
            let (Some(UnitId::Smmu(n)), Some(sid)) = (d.unit, d.stream_id) else {
                owned.uncovered.insert(d.addr);
                continue;
            };
            let Some(&u) = by_ordinal.get(&n) else {
                owned.uncovered.insert(d.addr);
                if let Some(f) = owned.failed.iter_mut().find(|f| f.ordinal == n) {
                    f.devices.push(d.addr);
                }
                continue;
            };
            let limit = owned.units[u].unit.stream_limit();
            if u64::from(sid) >= limit {
                log::error!(
                    "pci {}: StreamID {sid:#x} is beyond smmu{n}'s stream table ({limit:#x}); \
                     its DMA is aborted and it will never be assigned",
                    d.addr
                );
                owned.uncovered.insert(d.addr);
                continue;
            }
            owned.device_unit.insert(d.addr, (u, sid));
        }
    }
    for f in &owned.failed {
        for addr in &f.devices {
            log::error!(
                "pci {addr}: its IOMMU smmu{} is not under Sluice's control; it will not be assigned",
                f.ordinal
            );
        }
    }

    apply_rmrs(iort, config, &by_ordinal, &mut owned);
    for (addr, &(unit, sid)) in &owned.device_unit {
        if owned.rmr_streams.contains_key(&(unit, sid)) {
            log::warn!(
                "pci {addr}: StreamID {sid:#x} has firmware-reserved memory (IORT RMR) \
                 identity-mapped; the device must not be assigned to a guest"
            );
        }
    }

    for (i, u) in owned.units.iter().enumerate() {
        let devices = owned.device_unit.values().filter(|d| d.0 == i).count();
        let rmr = owned.rmr_streams.keys().filter(|k| k.0 == i).count();
        log::info!(
            "smmu{} @{:#x}: owned, {} devices blocked, {} StreamIDs identity-mapped for RMRs",
            u.ordinal,
            u.base,
            devices,
            rmr
        );
    }
    owned
}

fn bring_up<'a>(
    ordinal: usize,
    node: &SmmuV3,
    config: &OwnershipConfig,
    bases: &BTreeMap<u64, usize>,
    hardware: &mut impl FnMut(usize, &SmmuV3) -> Result<SmmuHardware<'a>, &'static str>,
) -> Result<SmmuUnit<'a>, OwnershipError> {
    if let Some(&first) = bases.get(&node.base) {
        return Err(OwnershipError::DuplicateBase { first });
    }
    // The register pages are 64 KiB each (IHI 0070 6.2).
    if node.base == 0 || !node.base.is_multiple_of(0x1_0000) {
        return Err(OwnershipError::NoHardware(
            "the register base is zero or not 64 KiB aligned",
        ));
    }
    let hw = hardware(ordinal, node).map_err(OwnershipError::NoHardware)?;
    let unit_config = SmmuConfig {
        timeout_ns: config.timeout_ns,
        stream_table: config.stream_table,
        ..SmmuConfig::from_iort(ordinal as u32, node)
    };
    SmmuUnit::init(hw.mmio, hw.mem, hw.clock, unit_config).map_err(OwnershipError::Init)
}

/// The pages `[base, base + length)` of an RMR range covers, as (first
/// byte, length), or `None` when the range is empty or wraps.
fn rmr_pages(base: u64, length: u64) -> Option<(u64, u64)> {
    if length == 0 {
        return None;
    }
    let end = base.checked_add(length)?;
    let first = base & !(PAGE_SIZE - 1);
    let last = end.checked_next_multiple_of(PAGE_SIZE)?;
    Some((first, last - first))
}

/// An RMR range: (index of its node in [`Iort::nodes`], index in the
/// node).
type RangeRef = (usize, usize);

/// Identity-maps each RMR node's ranges for the StreamIDs its ID mappings
/// name. Streams needing the same set of ranges share one identity domain
/// (a stream attaches to one domain, and must reach only its own ranges).
fn apply_rmrs(
    iort: &Iort,
    config: &OwnershipConfig,
    by_ordinal: &BTreeMap<usize, usize>,
    owned: &mut OwnedSmmus<'_>,
) {
    let smmus = iort.smmus();
    // (unit, StreamID) → the (node, range) pairs it needs.
    let mut wanted: BTreeMap<(usize, u32), BTreeSet<RangeRef>> = BTreeMap::new();
    for (node_index, node) in iort.nodes.iter().enumerate() {
        let NodeKind::Rmr(rmr) = &node.kind else {
            continue;
        };
        if rmr.ranges.is_empty() {
            continue;
        }
        for m in &node.mappings {
            let ordinal = iort
                .node_at(m.output_reference)
                .and_then(|t| smmus.iter().position(|&s| s == t));
            let Some(ordinal) = ordinal else {
                log::error!(
                    "iort: RMR node at {:#x} maps StreamIDs to {:#x}, which is no SMMU; ignored",
                    node.offset,
                    m.output_reference
                );
                continue;
            };
            let Some(&unit) = by_ordinal.get(&ordinal) else {
                log::error!(
                    "iort: RMR node at {:#x} names StreamIDs of smmu{ordinal}, which is not \
                     under Sluice's control",
                    node.offset
                );
                continue;
            };
            let count = if m.is_single() { 1 } else { m.id_count() };
            if count > u64::from(config.max_rmr_streams) {
                log::error!(
                    "iort: RMR node at {:#x} names {count} StreamIDs from {:#x} (more than \
                     {}); refused, their firmware DMA will fault",
                    node.offset,
                    m.output_base,
                    config.max_rmr_streams
                );
                continue;
            }
            for i in 0..count {
                let Some(sid) = u32::try_from(u64::from(m.output_base) + i).ok() else {
                    break;
                };
                let set = wanted.entry((unit, sid)).or_default();
                for range in 0..rmr.ranges.len() {
                    set.insert((node_index, range));
                }
            }
        }
    }
    // Per unit, streams grouped by the ranges they need.
    let mut groups: BTreeMap<(usize, Vec<RangeRef>), Vec<u32>> = BTreeMap::new();
    for ((unit, sid), set) in wanted {
        groups
            .entry((unit, set.into_iter().collect()))
            .or_default()
            .push(sid);
    }
    for ((unit, ranges), sids) in groups {
        let Some(u) = owned.units.get_mut(unit) else {
            continue;
        };
        let domain = match u.unit.alloc_domain(SmmuDomainConfig::any()) {
            Ok(d) => Some(d),
            Err(e) => {
                log::error!(
                    "smmu{}: no identity domain for RMRs ({e}); StreamIDs {sids:#x?} stay blocked \
                     and their firmware DMA will fault",
                    u.ordinal
                );
                for sid in sids {
                    owned.rmr_streams.insert(
                        (unit, sid),
                        RmrStream {
                            domain: None,
                            regions: Vec::new(),
                            error: Some(e),
                        },
                    );
                }
                continue;
            }
        };
        let mut regions = Vec::new();
        for (node, range) in ranges {
            let Some(NodeKind::Rmr(rmr)) = iort.nodes.get(node).map(|n| &n.kind) else {
                continue;
            };
            let Some(r) = rmr.ranges.get(range) else {
                continue;
            };
            let limit = r.base.saturating_add(r.length.saturating_sub(1));
            let error = match (domain, rmr_pages(r.base, r.length)) {
                (Some(d), Some((first, len))) => u
                    .unit
                    .map(d, first, PhysAddr::new(first), len, MapPerms::READ_WRITE)
                    .err(),
                _ => Some(SmmuError::InvalidRange),
            };
            if let Some(e) = error {
                log::error!(
                    "smmu{}: RMR {:#x}..={limit:#x} could not be identity-mapped ({e}); \
                     firmware DMA there will fault",
                    u.ordinal,
                    r.base
                );
            }
            regions.push(RmrRegion {
                node,
                range,
                base: r.base,
                limit,
                error,
            });
        }
        let mut attached = 0;
        for sid in sids {
            let error = domain.and_then(|d| u.unit.attach_stream(sid, d).err());
            match error {
                Some(e) => log::error!(
                    "smmu{}: StreamID {sid:#x} could not be attached to its RMR identity map \
                     ({e}); it stays blocked",
                    u.ordinal
                ),
                None => attached += 1,
            }
            owned.rmr_streams.insert(
                (unit, sid),
                RmrStream {
                    domain: if error.is_none() { domain } else { None },
                    regions: regions.clone(),
                    error,
                },
            );
        }
        // A domain nothing could be attached to is given back.
        if attached == 0
            && let Some(d) = domain
            && let Err(e) = u.unit.free_domain(d)
        {
            log::error!(
                "smmu{}: freeing an unused RMR domain failed ({e})",
                u.ordinal
            );
        }
    }
}
