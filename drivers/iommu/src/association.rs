//! Which IOMMU unit translates each PCI function, with which requester
//! ID / StreamID, in which group, and which reserved memory regions it
//! needs; plus the boot log lines that report all of it.
//!
//! # Rules
//!
//! * **DMAR** (VT-d 4.1 §8.3.1-8.3.2): DRHD device scopes are resolved
//!   through the bridges' secondary bus numbers. An endpoint scope covers
//!   that function; a sub-hierarchy scope covers the bridge and every
//!   function below it. Explicit scopes of all DRHDs are applied first,
//!   in table order (a function claimed twice keeps its first unit and
//!   the conflict is reported). Then a DRHD with INCLUDE_PCI_ALL covers
//!   every function of its segment still uncovered.
//! * **IORT** (DEN0049 §3.1.1.3): the function's requester ID as seen at
//!   the root complex (its DMA alias if it has one) is mapped through the
//!   segment's root complex node; the first SMMU on the path is its unit
//!   and the ID there its StreamID.
//! * A function no unit covers is listed in [`Association::uncovered`],
//!   logged with `log::error!`, and is not assignable. A function is
//!   assignable only when it and every member of its group are covered
//!   by the same unit: a group straddling units (or partly uncovered)
//!   cannot be isolated as one.
//! * RMRRs (DMAR) and RMR nodes (IORT) are attached to the functions
//!   their scopes / ID mappings name.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use sluice_pci::groups::{DmaAlias, dma_alias, iommu_groups};
use sluice_pci::{Bdf, ConfigSpace, PciAddress, Topology};

use crate::acpi::dmar::{
    AtsrFlags, DeviceScope, Dmar, Drhd, DrhdFlags, Rmrr, ScopeError, ScopeKind,
};
use crate::acpi::iort::{Iort, IortError, NodeKind, SmmuV3Flags};

/// An IOMMU unit, named as in the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum UnitId {
    /// Index in [`Dmar::drhds`]; shown as `dmarN`.
    Drhd(usize),
    /// Position among the IORT's SMMU nodes ([`Iort::smmus`]); shown as
    /// `smmuN`.
    Smmu(usize),
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Drhd(n) => write!(f, "dmar{n}"),
            Self::Smmu(n) => write!(f, "smmu{n}"),
        }
    }
}

/// Why a function was attached to its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    EndpointScope,
    SubHierarchyScope,
    IncludePciAll,
    IortRootComplex,
}

/// Where a reserved region comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservedSource {
    /// Index in [`Dmar::rmrrs`].
    Rmrr(usize),
    /// Index in [`Iort::nodes`] of the RMR node, and of the range in it.
    Rmr { node: usize, range: usize },
}

/// A memory range some functions must keep reaching by DMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedRegion {
    pub source: ReservedSource,
    pub base: u64,
    /// Last byte (inclusive).
    pub limit: u64,
    pub devices: Vec<PciAddress>,
}

/// One function's IOMMU attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAssociation {
    pub addr: PciAddress,
    /// Index in [`Topology::functions`].
    pub index: usize,
    pub unit: Option<UnitId>,
    pub coverage: Option<Coverage>,
    /// The requester ID the IOMMU sees (the alias if there is one).
    pub requester_id: Bdf,
    pub alias: Option<DmaAlias>,
    /// SMMU StreamID (IORT only).
    pub stream_id: Option<u32>,
    /// ITS DeviceID of the function's MSIs (IORT only).
    pub its_device_id: Option<u32>,
    /// The ITS the function's MSIs go to: the first ITS of the IORT ITS
    /// group its IDs reach (the group's ITSes all accept them; DEN0049
    /// §3.1.1.5), by the GIC ITS ID the MADT describes it with.
    pub its_id: Option<u32>,
    pub group: u32,
    pub assignable: bool,
    /// The function has an ATS capability and the platform allows ATS for
    /// it: its root port is in an ATSR (or ATSR ALL_PORTS) / a SATC names
    /// it when it is root-complex integrated (VT-d 4.1 §8.5, §8.8), or the
    /// IORT root complex node sets ATS support (DEN0049 §3.1.1.3).
    pub ats_permitted: bool,
    /// Indices in [`Association::reserved`].
    pub reserved: Vec<usize>,
}

/// A problem met while associating; the function concerned stays
/// uncovered or keeps its first unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssociationError {
    /// A scope of the DMAR structure at `structure` (table offset) could
    /// not be followed.
    Scope { structure: usize, error: ScopeError },
    /// A function claimed by two units' explicit scopes.
    ConflictingScopes {
        device: PciAddress,
        kept: UnitId,
        ignored: UnitId,
    },
    /// The function's requester ID could not be translated through the IORT.
    Iort {
        device: PciAddress,
        error: IortError,
    },
}

impl fmt::Display for AssociationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scope { structure, error } => {
                write!(f, "DMAR structure at {structure:#x}: {error}")
            }
            Self::ConflictingScopes {
                device,
                kept,
                ignored,
            } => {
                write!(
                    f,
                    "{device} claimed by {kept} and {ignored}; keeping {kept}"
                )
            }
            Self::Iort { device, error } => write!(f, "{device}: {error}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Association {
    /// One per function, in topology order.
    pub devices: Vec<DeviceAssociation>,
    /// Functions no IOMMU translates: never assignable.
    pub uncovered: Vec<PciAddress>,
    pub reserved: Vec<ReservedRegion>,
    pub errors: Vec<AssociationError>,
}

impl Association {
    pub fn get(&self, addr: PciAddress) -> Option<&DeviceAssociation> {
        self.devices.iter().find(|d| d.addr == addr)
    }

    fn new_for(topo: &Topology) -> Self {
        let groups = iommu_groups(topo);
        let devices = topo
            .functions
            .iter()
            .enumerate()
            .map(|(index, f)| {
                let alias = dma_alias(topo, index);
                DeviceAssociation {
                    addr: f.addr,
                    index,
                    unit: None,
                    coverage: None,
                    requester_id: alias.map_or(f.addr.bdf, |a| a.requester_id),
                    alias,
                    stream_id: None,
                    its_device_id: None,
                    its_id: None,
                    group: groups.group_of.get(index).copied().unwrap_or(0),
                    assignable: false,
                    ats_permitted: false,
                    reserved: Vec::new(),
                }
            })
            .collect();
        Self {
            devices,
            ..Self::default()
        }
    }

    fn claim(&mut self, index: usize, unit: UnitId, coverage: Coverage) {
        let Some(d) = self.devices.get_mut(index) else {
            return;
        };
        match d.unit {
            None => {
                d.unit = Some(unit);
                d.coverage = Some(coverage);
            }
            Some(kept) if kept != unit => self.errors.push(AssociationError::ConflictingScopes {
                device: d.addr,
                kept,
                ignored: unit,
            }),
            Some(_) => {}
        }
    }

    /// Uncovered list, assignability, and the error log lines.
    fn finish(&mut self) {
        for i in 0..self.devices.len() {
            let d = &self.devices[i];
            let consistent = d.unit.is_some()
                && self
                    .devices
                    .iter()
                    .filter(|o| o.group == d.group)
                    .all(|o| o.unit == d.unit);
            self.devices[i].assignable = consistent;
        }
        self.uncovered = self
            .devices
            .iter()
            .filter(|d| d.unit.is_none())
            .map(|d| d.addr)
            .collect();
        for addr in &self.uncovered {
            log::error!(
                "pci {addr}: no IOMMU translates this device's DMA; it will not be assigned"
            );
        }
        for e in &self.errors {
            log::warn!("iommu association: {e}");
        }
    }
}

/// Functions a scope names: the endpoint, or the bridge and everything
/// below it.
fn scope_targets(
    topo: &Topology,
    scope: &DeviceScope,
    cfg: &dyn ConfigSpace,
) -> Result<Vec<(usize, Coverage)>, ScopeError> {
    let addr = scope.resolve(topo.segment, cfg)?;
    let Some(index) = topo.index_of(addr) else {
        // A scope for an empty slot or a device enumeration did not reach.
        return Ok(Vec::new());
    };
    match scope.kind {
        ScopeKind::PciEndpoint => Ok(alloc::vec![(index, Coverage::EndpointScope)]),
        ScopeKind::PciSubHierarchy => {
            let mut v = alloc::vec![(index, Coverage::SubHierarchyScope)];
            v.extend(
                (0..topo.functions.len())
                    .filter(|&i| topo.is_below(i, index))
                    .map(|i| (i, Coverage::SubHierarchyScope)),
            );
            Ok(v)
        }
        _ => Ok(Vec::new()),
    }
}

fn is_pci_scope(scope: &DeviceScope) -> bool {
    matches!(
        scope.kind,
        ScopeKind::PciEndpoint | ScopeKind::PciSubHierarchy
    )
}

/// Associates every function of `topo` with a DMAR unit (rules in the
/// module docs). `cfg` is used to follow scope paths.
pub fn associate_dmar(dmar: &Dmar, topo: &Topology, cfg: &dyn ConfigSpace) -> Association {
    let mut a = Association::new_for(topo);
    let segment = topo.segment;
    for (n, drhd) in dmar.drhds.iter().enumerate() {
        if drhd.segment != segment || drhd.include_pci_all() {
            continue;
        }
        for scope in drhd.scopes.iter().filter(|s| is_pci_scope(s)) {
            match scope_targets(topo, scope, cfg) {
                Ok(targets) => {
                    for (i, coverage) in targets {
                        a.claim(i, UnitId::Drhd(n), coverage);
                    }
                }
                Err(error) => a.errors.push(AssociationError::Scope {
                    structure: drhd.offset,
                    error,
                }),
            }
        }
    }
    if let Some(n) = dmar
        .drhds
        .iter()
        .position(|d| d.segment == segment && d.include_pci_all())
    {
        for d in a.devices.iter_mut().filter(|d| d.unit.is_none()) {
            d.unit = Some(UnitId::Drhd(n));
            d.coverage = Some(Coverage::IncludePciAll);
        }
    }
    apply_dmar_ats_policy(dmar, topo, cfg, &mut a);
    for (n, rmrr) in dmar.rmrrs.iter().enumerate() {
        if rmrr.segment != segment {
            continue;
        }
        let mut devices = Vec::new();
        for scope in rmrr.scopes.iter().filter(|s| is_pci_scope(s)) {
            match scope_targets(topo, scope, cfg) {
                Ok(targets) => devices.extend(targets.into_iter().map(|(i, _)| i)),
                Err(error) => a.errors.push(AssociationError::Scope {
                    structure: rmrr.offset,
                    error,
                }),
            }
        }
        devices.sort_unstable();
        devices.dedup();
        let region = a.reserved.len();
        for &i in &devices {
            if let Some(d) = a.devices.get_mut(i) {
                d.reserved.push(region);
            }
        }
        a.reserved.push(ReservedRegion {
            source: ReservedSource::Rmrr(n),
            base: rmrr.base,
            limit: rmrr.limit,
            devices: devices
                .iter()
                .filter_map(|&i| topo.functions.get(i))
                .map(|f| f.addr)
                .collect(),
        });
    }
    a.finish();
    a
}

/// The root port (topmost bridge) above function `index`, `None` for a
/// function on a root bus.
fn root_port_of(topo: &Topology, index: usize) -> Option<usize> {
    let mut cursor = topo.functions.get(index)?.upstream?;
    for _ in 0..topo.functions.len() {
        match topo.functions.get(cursor)?.upstream {
            Some(up) => cursor = up,
            None => return Some(cursor),
        }
    }
    None
}

fn apply_dmar_ats_policy(dmar: &Dmar, topo: &Topology, cfg: &dyn ConfigSpace, a: &mut Association) {
    let mut all_ports = false;
    let mut ports = Vec::new();
    for atsr in dmar.atsrs.iter().filter(|x| x.segment == topo.segment) {
        all_ports |= atsr.flags.contains(AtsrFlags::ALL_PORTS);
        for scope in atsr
            .scopes
            .iter()
            .filter(|s| s.kind == ScopeKind::PciSubHierarchy)
        {
            match scope.resolve(topo.segment, cfg) {
                Ok(port) => ports.extend(topo.index_of(port)),
                Err(error) => a.errors.push(AssociationError::Scope {
                    structure: atsr.offset,
                    error,
                }),
            }
        }
    }
    let mut integrated = Vec::new();
    for satc in dmar.satcs.iter().filter(|x| x.segment == topo.segment) {
        for scope in satc
            .scopes
            .iter()
            .filter(|s| s.kind == ScopeKind::PciEndpoint)
        {
            match scope.resolve(topo.segment, cfg) {
                Ok(dev) => integrated.extend(topo.index_of(dev)),
                Err(error) => a.errors.push(AssociationError::Scope {
                    structure: satc.offset,
                    error,
                }),
            }
        }
    }
    for d in &mut a.devices {
        let has_ats = topo
            .functions
            .get(d.index)
            .is_some_and(|f| f.caps.ats.is_some());
        d.ats_permitted = has_ats
            && match root_port_of(topo, d.index) {
                Some(port) => all_ports || ports.contains(&port),
                None => integrated.contains(&d.index),
            };
    }
}

/// Associates every function of `topo` with an SMMU through the IORT.
pub fn associate_iort(iort: &Iort, topo: &Topology) -> Association {
    let mut a = Association::new_for(topo);
    let smmus = iort.smmus();
    let segment = u32::from(topo.segment.0);
    let rc_ats = iort
        .root_complex(segment)
        .and_then(|i| match &iort.nodes[i].kind {
            NodeKind::RootComplex(rc) => Some(rc.ats_attribute & 1 != 0),
            _ => None,
        })
        .unwrap_or(false);
    for d in &mut a.devices {
        d.ats_permitted = rc_ats
            && topo
                .functions
                .get(d.index)
                .is_some_and(|f| f.caps.ats.is_some());
        match iort.translate_rid(segment, d.requester_id.requester_id()) {
            Ok(t) => {
                if let Some((node, sid)) = t.smmu
                    && let Some(ordinal) = smmus.iter().position(|&s| s == node)
                {
                    d.unit = Some(UnitId::Smmu(ordinal));
                    d.coverage = Some(Coverage::IortRootComplex);
                    d.stream_id = Some(sid);
                }
                d.its_device_id = t.its.map(|(_, id)| id);
                d.its_id = t
                    .its
                    .and_then(|(node, _)| match &iort.nodes.get(node)?.kind {
                        NodeKind::ItsGroup { its_ids } => its_ids.first().copied(),
                        _ => None,
                    });
            }
            Err(error) => a.errors.push(AssociationError::Iort {
                device: d.addr,
                error,
            }),
        }
    }
    // RMR nodes: each ID mapping names StreamIDs on an SMMU.
    for (node_index, node) in iort.nodes.iter().enumerate() {
        let NodeKind::Rmr(rmr) = &node.kind else {
            continue;
        };
        let mut devices = Vec::new();
        for m in &node.mappings {
            let Some(target) = iort.node_at(m.output_reference) else {
                continue;
            };
            let Some(ordinal) = smmus.iter().position(|&s| s == target) else {
                continue;
            };
            let first = u64::from(m.output_base);
            let last = first
                + if m.is_single() {
                    0
                } else {
                    u64::from(m.id_count_minus_one)
                };
            for (i, d) in a.devices.iter().enumerate() {
                if d.unit == Some(UnitId::Smmu(ordinal))
                    && d.stream_id
                        .is_some_and(|s| (first..=last).contains(&u64::from(s)))
                {
                    devices.push(i);
                }
            }
        }
        devices.sort_unstable();
        devices.dedup();
        for (range_index, range) in rmr.ranges.iter().enumerate() {
            let region = a.reserved.len();
            for &i in &devices {
                a.devices[i].reserved.push(region);
            }
            a.reserved.push(ReservedRegion {
                source: ReservedSource::Rmr {
                    node: node_index,
                    range: range_index,
                },
                base: range.base,
                limit: range.base.saturating_add(range.length.saturating_sub(1)),
                devices: devices.iter().map(|&i| a.devices[i].addr).collect(),
            });
        }
    }
    a.finish();
    a
}

// ------------------------------------------------------------ log lines

/// `pci SSSS:BB:DD.F VVVV:DDDD class=CCCCCC iommu=<unit> group=<n>
/// [alias=BB:DD.F] caps=<comma list>`; `iommu=none` when uncovered and
/// `caps=none` when the function has none of the capabilities Sluice
/// reports.
pub fn device_log_line(topo: &Topology, d: &DeviceAssociation) -> String {
    let Some(f) = topo.functions.get(d.index) else {
        return format!("pci {} <not in topology>", d.addr);
    };
    let unit = d.unit.map_or(String::from("none"), |u| format!("{u}"));
    let alias = d
        .alias
        .map_or(String::new(), |a| format!(" alias={}", a.requester_id));
    let names = f.caps.names();
    let caps = if names.is_empty() {
        String::from("none")
    } else {
        names.join(",")
    };
    format!(
        "pci {} {:04x}:{:04x} class={:06x} iommu={unit} group={}{alias} caps={caps}",
        f.addr, f.vendor_id, f.device_id, f.class_code, d.group
    )
}

/// `iommu dmarN base=0x… size=0x… segment=SSSS flags=<list|none> scopes=<n>`.
pub fn drhd_log_line(index: usize, drhd: &Drhd) -> String {
    let flags = if drhd.flags.contains(DrhdFlags::INCLUDE_PCI_ALL) {
        "INCLUDE_PCI_ALL"
    } else {
        "none"
    };
    format!(
        "iommu {} base={:#x} size={:#x} segment={} flags={flags} scopes={}",
        UnitId::Drhd(index),
        drhd.register_base,
        drhd.register_size(),
        drhd.segment,
        drhd.scopes.len()
    )
}

/// `iommu smmuN smmuv3 base=0x… model=<n> flags=<list|none> gsiv=event,pri,gerr,sync`
/// (or `smmuv2 base=0x… span=0x… model=<n>`), for the N-th SMMU node.
pub fn smmu_log_line(iort: &Iort, ordinal: usize) -> Option<String> {
    let node = iort.nodes.get(*iort.smmus().get(ordinal)?)?;
    match &node.kind {
        NodeKind::SmmuV3(s) => {
            let mut flags = Vec::new();
            for (flag, name) in [
                (SmmuV3Flags::COHACC_OVERRIDE, "COHACC_OVERRIDE"),
                (SmmuV3Flags::HTTU_OVERRIDE_ACCESS, "HTTU_ACCESS"),
                (SmmuV3Flags::HTTU_OVERRIDE_DIRTY, "HTTU_DIRTY"),
            ] {
                if s.flags.contains(flag) {
                    flags.push(name);
                }
            }
            let flags = if flags.is_empty() {
                String::from("none")
            } else {
                flags.join(",")
            };
            Some(format!(
                "iommu {} smmuv3 base={:#x} model={} flags={flags} gsiv={},{},{},{}",
                UnitId::Smmu(ordinal),
                s.base,
                s.model,
                s.event_gsiv,
                s.pri_gsiv,
                s.gerr_gsiv,
                s.sync_gsiv
            ))
        }
        NodeKind::Smmu(s) => Some(format!(
            "iommu {} smmuv2 base={:#x} span={:#x} model={}",
            UnitId::Smmu(ordinal),
            s.base,
            s.span,
            s.model
        )),
        _ => None,
    }
}

/// `rmrr segment=SSSS range=0x…-0x… devices=<list|none>` or
/// `rmr range=0x…-0x… devices=<list|none>`.
pub fn reserved_log_line(region: &ReservedRegion, dmar: Option<&Dmar>) -> String {
    let devices = if region.devices.is_empty() {
        String::from("none")
    } else {
        region
            .devices
            .iter()
            .map(|d| format!("{d}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match region.source {
        ReservedSource::Rmrr(n) => {
            let segment = dmar
                .and_then(|d| d.rmrrs.get(n))
                .map(|r: &Rmrr| r.segment)
                .unwrap_or_default();
            format!(
                "rmrr segment={segment} range={:#x}-{:#x} devices={devices}",
                region.base, region.limit
            )
        }
        ReservedSource::Rmr { .. } => {
            format!(
                "rmr range={:#x}-{:#x} devices={devices}",
                region.base, region.limit
            )
        }
    }
}

/// Every boot line for a DMAR machine, in order: units, devices, RMRRs.
pub fn dmar_log_lines(dmar: &Dmar, topo: &Topology, a: &Association) -> Vec<String> {
    let mut lines: Vec<String> = dmar
        .drhds
        .iter()
        .enumerate()
        .map(|(i, d)| drhd_log_line(i, d))
        .collect();
    lines.extend(a.devices.iter().map(|d| device_log_line(topo, d)));
    lines.extend(a.reserved.iter().map(|r| reserved_log_line(r, Some(dmar))));
    lines
}

/// Every boot line for an IORT machine, in order: units, devices, RMRs.
pub fn iort_log_lines(iort: &Iort, topo: &Topology, a: &Association) -> Vec<String> {
    let mut lines: Vec<String> = (0..iort.smmus().len())
        .filter_map(|i| smmu_log_line(iort, i))
        .collect();
    lines.extend(a.devices.iter().map(|d| device_log_line(topo, d)));
    lines.extend(a.reserved.iter().map(|r| reserved_log_line(r, None)));
    lines
}

/// Emits the boot lines through `log::info!`.
pub fn log_lines(lines: &[String]) {
    for l in lines {
        log::info!("{l}");
    }
}
