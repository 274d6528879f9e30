//! Requester IDs, DMA aliases and IOMMU groups.
//!
//! An IOMMU can only tell devices apart by the requester ID on their DMA.
//! Devices whose requests can carry the same requester ID, or that can
//! reach each other without passing through the IOMMU, cannot be isolated
//! from each other and so form one group: the unit of assignment.
//!
//! # DMA alias rules
//!
//! Conventional PCI carries no requester ID, so one is made up where a
//! request enters PCI Express:
//!
//! 1. A **PCIe-to-PCI/PCI-X bridge** (PCIe port type 7) takes ownership of
//!    requests from its conventional side using its *secondary bus number
//!    with device 0, function 0* (PCI Express to PCI/PCI-X Bridge
//!    Specification 1.0, §2.3). We use this rule, not the bridge's own
//!    BDF, because it is what the specification mandates and what the
//!    root complex (and so the IOMMU's context lookup) actually sees. On a
//!    PCI-X secondary the original ID may be kept for some requests, so the
//!    device's own ID and the alias are both possible: they end up in one
//!    group either way.
//! 2. A **conventional PCI-to-PCI bridge** (no PCI Express capability)
//!    that is the topmost bridge on the path presents requests from below
//!    with its own BDF: there is no PCIe-to-PCI bridge above it to assign
//!    one, so the ID the root complex sees is the bridge's.
//!
//! The rule of the topmost such bridge on the path wins, since that is the
//! last place the ID is rewritten before the root complex.
//!
//! # Group rules
//!
//! Functions are merged into one group when:
//! * they share an effective requester ID (own BDF or alias), or one's
//!   alias is another's own BDF;
//! * they are functions of one multi-function device (all functions of an
//!   ARI device count as one device) and not every
//!   function has ACS P2P Request Redirect and Completion Redirect enabled
//!   (without these, functions may talk to each other internally);
//! * they are below the same bridge that does not isolate its downstream
//!   devices: a root port or switch downstream port without ACS Source
//!   Validation, P2P Request Redirect, P2P Completion Redirect and Upstream
//!   Forwarding all enabled (PCIe Base 6.0 §6.12), or any conventional or
//!   PCIe-to-PCI bridge (a shared bus has no isolation at all).
//!
//! Groups are numbered from 0 in ascending order of their lowest-addressed
//! member, so the numbering depends only on the topology.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::address::{Bdf, PciAddress};
use crate::caps::{AcsFlags, PortType};
use crate::enumerate::Topology;

/// Which rule produced an alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasRule {
    /// Secondary bus, device 0, function 0 of a PCIe-to-PCI/PCI-X bridge.
    PcieToPciBridge,
    /// Own BDF of a conventional PCI-to-PCI bridge.
    ConventionalBridge,
}

/// The requester ID a function's DMA reaches the root complex with, when it
/// is not the function's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAlias {
    pub requester_id: Bdf,
    /// The bridge that rewrites the ID.
    pub bridge: PciAddress,
    pub rule: AliasRule,
}

/// The DMA alias of function `index`, if its requests do not arrive with
/// its own BDF.
pub fn dma_alias(topo: &Topology, index: usize) -> Option<DmaAlias> {
    let f = topo.functions.get(index)?;
    let mut alias = None;
    let mut cursor = f.upstream;
    let mut hops = 0;
    while let Some(up) = cursor {
        let bridge = topo.functions.get(up)?;
        match (bridge.port_type(), bridge.bridge) {
            (Some(PortType::PcieToPciBridge), Some(buses)) => {
                alias = Some(DmaAlias {
                    requester_id: Bdf::new(buses.secondary, 0, 0),
                    bridge: bridge.addr,
                    rule: AliasRule::PcieToPciBridge,
                });
            }
            (None, Some(_)) => {
                alias = Some(DmaAlias {
                    requester_id: bridge.addr.bdf,
                    bridge: bridge.addr,
                    rule: AliasRule::ConventionalBridge,
                });
            }
            _ => {}
        }
        hops += 1;
        if hops > topo.functions.len() {
            break;
        }
        cursor = bridge.upstream;
    }
    alias.filter(|a| a.requester_id != f.addr.bdf)
}

/// The requester ID the IOMMU sees for function `index`.
pub fn effective_requester_id(topo: &Topology, index: usize) -> Option<Bdf> {
    let f = topo.functions.get(index)?;
    Some(dma_alias(topo, index).map_or(f.addr.bdf, |a| a.requester_id))
}

/// Group number of every function, indexed like [`Topology::functions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    pub group_of: Vec<u32>,
    pub count: u32,
}

impl Groups {
    /// Members of group `group`, in topology order.
    pub fn members(&self, group: u32) -> Vec<usize> {
        (0..self.group_of.len())
            .filter(|&i| self.group_of[i] == group)
            .collect()
    }
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// Computes IOMMU groups for every function (rules in the module docs).
pub fn iommu_groups(topo: &Topology) -> Groups {
    let n = topo.functions.len();
    let mut uf = UnionFind((0..n).collect());

    // Shared requester IDs.
    let mut by_rid: BTreeMap<Bdf, usize> = BTreeMap::new();
    for (i, f) in topo.functions.iter().enumerate() {
        by_rid.entry(f.addr.bdf).or_insert(i);
    }
    for i in 0..n {
        if let Some(alias) = dma_alias(topo, i) {
            match by_rid.get(&alias.requester_id) {
                Some(&owner) => uf.union(i, owner),
                None => {
                    by_rid.insert(alias.requester_id, i);
                }
            }
        }
    }

    // Multi-function devices without ACS redirect on every function.
    let mut slots: BTreeMap<(u8, u8), Vec<usize>> = BTreeMap::new();
    for (i, f) in topo.functions.iter().enumerate() {
        // Under ARI every function on the bus belongs to device 0.
        let device = if f.ari_function {
            0
        } else {
            f.addr.bdf.device()
        };
        slots.entry((f.addr.bdf.bus(), device)).or_default().push(i);
    }
    let redirect = AcsFlags::P2P_REQUEST_REDIRECT | AcsFlags::P2P_COMPLETION_REDIRECT;
    for members in slots.values() {
        if members.len() < 2 {
            continue;
        }
        let isolated = members
            .iter()
            .all(|&i| topo.functions[i].caps.acs_control().contains(redirect));
        if !isolated {
            for &m in &members[1..] {
                uf.union(members[0], m);
            }
        }
    }

    // Bridges that do not isolate what is below them.
    for (b, bridge) in topo.functions.iter().enumerate() {
        if bridge.bridge.is_none() {
            continue;
        }
        let isolates = match bridge.port_type() {
            Some(PortType::RootPort) | Some(PortType::DownstreamSwitchPort) => {
                bridge.caps.acs_control().contains(AcsFlags::ISOLATION)
            }
            // An upstream port forwards everything to its downstream
            // ports, which make the isolation decision.
            Some(PortType::UpstreamSwitchPort) => true,
            // Conventional and PCIe-to-PCI bridges: a shared bus.
            _ => false,
        };
        if isolates {
            continue;
        }
        let below: Vec<usize> = (0..n).filter(|&i| topo.is_below(i, b)).collect();
        if let Some((&first, rest)) = below.split_first() {
            for &m in rest {
                uf.union(first, m);
            }
        }
    }

    // Number groups by their lowest member address.
    let mut lowest: BTreeMap<usize, PciAddress> = BTreeMap::new();
    for (i, f) in topo.functions.iter().enumerate() {
        let root = uf.find(i);
        let entry = lowest.entry(root).or_insert(f.addr);
        if f.addr < *entry {
            *entry = f.addr;
        }
    }
    let mut order: Vec<(PciAddress, usize)> = lowest.into_iter().map(|(r, a)| (a, r)).collect();
    order.sort();
    let number: BTreeMap<usize, u32> = order
        .iter()
        .enumerate()
        .map(|(g, &(_, root))| (root, g as u32))
        .collect();
    let group_of = (0..n)
        .map(|i| {
            let root = uf.find(i);
            number.get(&root).copied().unwrap_or(0)
        })
        .collect();
    Groups {
        group_of,
        count: order.len() as u32,
    }
}
