//! Enumeration: finds every function below the root buses by following
//! the bus numbers firmware programmed into each bridge. Nothing is
//! assigned or reprogrammed (BAR sizing restores what it touches).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use core::ops::RangeInclusive;

use crate::address::{Bdf, PciAddress, Segment};
use crate::bar::{BRIDGE_BARS, Bar, BarError, ENDPOINT_BARS, size_bars};
use crate::caps::{Capabilities, PortType, read_capabilities};
use crate::config::{
    ConfigError, ConfigSpace, HEADER_TYPE, HEADER_TYPE_MULTI_FUNCTION, NO_DEVICE_VENDOR,
    PRIMARY_BUS, REVISION_ID, SECONDARY_BUS, SUBORDINATE_BUS, VENDOR_ID,
};

/// Header layout (PCI 3.0 §6.1, bits 6:0 of Header Type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderType {
    Endpoint,
    PciBridge,
    CardBusBridge,
    Unknown(u8),
}

/// The bus numbers of a type 1 function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeBuses {
    pub primary: u8,
    pub secondary: u8,
    pub subordinate: u8,
}

impl BridgeBuses {
    /// Buses this bridge forwards configuration requests to.
    pub fn range(&self) -> RangeInclusive<u8> {
        self.secondary..=self.subordinate
    }
}

/// One function found by enumeration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub addr: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, sub-class, programming interface (`0xBBSSPP`).
    pub class_code: u32,
    pub header_type: HeaderType,
    pub multi_function: bool,
    /// Index in [`Topology::functions`] of the bridge above, `None` on a
    /// root bus.
    pub upstream: Option<usize>,
    /// Bus numbers, for type 1 functions.
    pub bridge: Option<BridgeBuses>,
    pub bars: Vec<Bar>,
    pub bar_errors: Vec<BarError>,
    pub caps: Capabilities,
    /// Found through an ARI Next Function chain: `devfn` is all function
    /// number, and every function on the bus belongs to device 0.
    pub ari_function: bool,
}

impl Function {
    pub fn port_type(&self) -> Option<PortType> {
        self.caps.pcie.map(|p| p.port_type)
    }
    pub fn is_bridge(&self) -> bool {
        self.bridge.is_some()
    }
}

/// Why part of the hierarchy was not scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnumError {
    /// A bridge's secondary bus is not above its own bus (would loop).
    SecondaryNotBelow {
        bridge: PciAddress,
        secondary: u8,
    },
    /// A bridge's secondary bus lies outside the buses the ECAM window
    /// decodes (or outside its parent bridge's range).
    SecondaryOutOfRange {
        bridge: PciAddress,
        secondary: u8,
    },
    /// Subordinate bus below secondary bus.
    SubordinateBelowSecondary {
        bridge: PciAddress,
        secondary: u8,
        subordinate: u8,
    },
    /// Two bridges lead to the same bus; the second is not followed.
    BusAlreadyScanned {
        bridge: PciAddress,
        secondary: u8,
    },
    /// An ARI Next Function Number that does not go up (would loop), or
    /// names a function that does not answer; the chain stops there.
    AriChainBroken {
        function: PciAddress,
        next: u8,
    },
    Config(ConfigError),
}

impl fmt::Display for EnumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SecondaryNotBelow { bridge, secondary } => {
                write!(
                    f,
                    "bridge {bridge}: secondary bus {secondary:#04x} not below it; not followed"
                )
            }
            Self::SecondaryOutOfRange { bridge, secondary } => {
                write!(
                    f,
                    "bridge {bridge}: secondary bus {secondary:#04x} outside the decoded range; not followed"
                )
            }
            Self::SubordinateBelowSecondary {
                bridge,
                secondary,
                subordinate,
            } => write!(
                f,
                "bridge {bridge}: subordinate bus {subordinate:#04x} below secondary {secondary:#04x}; not followed"
            ),
            Self::BusAlreadyScanned { bridge, secondary } => {
                write!(
                    f,
                    "bridge {bridge}: bus {secondary:#04x} already scanned; not followed"
                )
            }
            Self::AriChainBroken { function, next } => write!(
                f,
                "{function}: ARI next function {next:#04x} is not a higher function that answers; chain stopped"
            ),
            Self::Config(e) => write!(f, "{e}"),
        }
    }
}

/// All functions of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub segment: Segment,
    /// In discovery order (depth first, devices and functions ascending).
    pub functions: Vec<Function>,
    pub errors: Vec<EnumError>,
}

impl Topology {
    pub fn index_of(&self, addr: PciAddress) -> Option<usize> {
        self.functions.iter().position(|f| f.addr == addr)
    }
    pub fn get(&self, addr: PciAddress) -> Option<&Function> {
        self.functions.iter().find(|f| f.addr == addr)
    }
    /// The bridge whose secondary bus is `bus`, if one was followed.
    pub fn bridge_to(&self, bus: u8) -> Option<usize> {
        self.functions
            .iter()
            .position(|f| f.bridge.is_some_and(|b| b.secondary == bus) && f.addr.bdf.bus() != bus)
    }
    /// Whether function `index` is below bridge `bridge` (any depth).
    pub fn is_below(&self, index: usize, bridge: usize) -> bool {
        let mut cursor = self.functions.get(index).and_then(|f| f.upstream);
        let mut hops = 0;
        while let Some(up) = cursor {
            if up == bridge {
                return true;
            }
            hops += 1;
            if hops > self.functions.len() {
                return false;
            }
            cursor = self.functions.get(up).and_then(|f| f.upstream);
        }
        false
    }
}

/// Enumerates `segment` from each of `root_buses`, following bridges to
/// buses inside `bus_range` (the ECAM window's buses).
pub fn enumerate(
    cfg: &dyn ConfigSpace,
    segment: Segment,
    root_buses: &[u8],
    bus_range: RangeInclusive<u8>,
) -> Topology {
    let mut topo = Topology {
        segment,
        ..Topology::default()
    };
    let mut scanned: BTreeMap<u8, ()> = BTreeMap::new();
    // (bus, upstream bridge index, buses the upstream bridge forwards)
    let mut stack: Vec<(u8, Option<usize>, RangeInclusive<u8>)> = Vec::new();
    for &root in root_buses.iter().rev() {
        stack.push((root, None, bus_range.clone()));
    }
    while let Some((bus, upstream, allowed)) = stack.pop() {
        if !bus_range.contains(&bus) || scanned.insert(bus, ()).is_some() {
            continue;
        }
        let first_new = topo.functions.len();
        let ari = upstream
            .and_then(|u| topo.functions.get(u))
            .and_then(|f| f.caps.pcie)
            .is_some_and(|p| p.ari_forwarding);
        if !(ari && scan_ari_device(cfg, segment, bus, upstream, &mut topo)) {
            scan_bus(cfg, segment, bus, upstream, &mut topo);
        }
        let mut children = Vec::new();
        for index in first_new..topo.functions.len() {
            let f = &topo.functions[index];
            let Some(b) = f.bridge else { continue };
            let err = if b.secondary <= bus {
                Some(EnumError::SecondaryNotBelow {
                    bridge: f.addr,
                    secondary: b.secondary,
                })
            } else if !allowed.contains(&b.secondary) || !bus_range.contains(&b.secondary) {
                Some(EnumError::SecondaryOutOfRange {
                    bridge: f.addr,
                    secondary: b.secondary,
                })
            } else if b.subordinate < b.secondary {
                Some(EnumError::SubordinateBelowSecondary {
                    bridge: f.addr,
                    secondary: b.secondary,
                    subordinate: b.subordinate,
                })
            } else if scanned.contains_key(&b.secondary)
                || children.iter().any(|&(s, _, _)| s == b.secondary)
            {
                Some(EnumError::BusAlreadyScanned {
                    bridge: f.addr,
                    secondary: b.secondary,
                })
            } else {
                None
            };
            match err {
                Some(e) => {
                    log::warn!("pci: {e}");
                    topo.errors.push(e);
                }
                None => {
                    // A child's range is clipped to its parent's, so a
                    // lying subordinate number cannot widen the search.
                    let end = b.subordinate.min(*allowed.end());
                    children.push((b.secondary, Some(index), b.secondary..=end));
                }
            }
        }
        for child in children.into_iter().rev() {
            stack.push(child);
        }
    }
    topo
}

/// Below a port with ARI forwarding, follows the Next Function chain of an
/// ARI device at devfn 0 (PCIe Base 6.0 §6.13). Returns false when devfn 0
/// holds no ARI device, so the bus is scanned the conventional way.
fn scan_ari_device(
    cfg: &dyn ConfigSpace,
    segment: Segment,
    bus: u8,
    upstream: Option<usize>,
    topo: &mut Topology,
) -> bool {
    let first = PciAddress::from_parts(segment, Bdf::new(bus, 0, 0));
    let f0 = match probe_function(cfg, first, upstream) {
        Ok(Some(f)) if f.caps.ari.is_some() => f,
        _ => return false,
    };
    let mut current = f0;
    loop {
        let next = current.caps.ari.map_or(0, |a| a.next_function);
        let here = current.addr;
        let here_fn = here.bdf.devfn();
        current.ari_function = true;
        topo.functions.push(current);
        if next == 0 {
            return true;
        }
        let broken = EnumError::AriChainBroken {
            function: here,
            next,
        };
        if next <= here_fn {
            log::warn!("pci: {broken}");
            topo.errors.push(broken);
            return true;
        }
        let addr = PciAddress::from_parts(
            segment,
            Bdf::from_requester_id(u16::from(bus) << 8 | u16::from(next)),
        );
        match probe_function(cfg, addr, upstream) {
            Ok(Some(f)) => current = f,
            Ok(None) => {
                log::warn!("pci: {broken}");
                topo.errors.push(broken);
                return true;
            }
            Err(e) => {
                topo.errors.push(EnumError::Config(e));
                return true;
            }
        }
    }
}

fn scan_bus(
    cfg: &dyn ConfigSpace,
    segment: Segment,
    bus: u8,
    upstream: Option<usize>,
    topo: &mut Topology,
) {
    for device in 0..32u8 {
        let addr0 = PciAddress::from_parts(segment, Bdf::new(bus, device, 0));
        match probe_function(cfg, addr0, upstream) {
            Ok(Some(f0)) => {
                let multi = f0.multi_function;
                topo.functions.push(f0);
                if !multi {
                    continue;
                }
                for function in 1..8u8 {
                    let addr = PciAddress::from_parts(segment, Bdf::new(bus, device, function));
                    match probe_function(cfg, addr, upstream) {
                        Ok(Some(f)) => topo.functions.push(f),
                        Ok(None) => {}
                        Err(e) => topo.errors.push(EnumError::Config(e)),
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                topo.errors.push(EnumError::Config(e));
                // No window for this bus: nothing else on it is reachable.
                if matches!(e, ConfigError::NoWindow(_)) {
                    return;
                }
            }
        }
    }
}

fn probe_function(
    cfg: &dyn ConfigSpace,
    addr: PciAddress,
    upstream: Option<usize>,
) -> Result<Option<Function>, ConfigError> {
    let id = cfg.read32(addr, VENDOR_ID)?;
    let vendor_id = (id & 0xffff) as u16;
    if vendor_id == NO_DEVICE_VENDOR || vendor_id == 0 {
        return Ok(None);
    }
    let class_rev = cfg.read32(addr, REVISION_ID & !3)?;
    let header = cfg.read8(addr, HEADER_TYPE)?;
    let header_type = match header & 0x7f {
        0 => HeaderType::Endpoint,
        1 => HeaderType::PciBridge,
        2 => HeaderType::CardBusBridge,
        other => HeaderType::Unknown(other),
    };
    let bridge = if header_type == HeaderType::PciBridge {
        Some(BridgeBuses {
            primary: cfg.read8(addr, PRIMARY_BUS)?,
            secondary: cfg.read8(addr, SECONDARY_BUS)?,
            subordinate: cfg.read8(addr, SUBORDINATE_BUS)?,
        })
    } else {
        None
    };
    let (bars, bar_errors) = match header_type {
        HeaderType::Endpoint => size_bars(cfg, addr, ENDPOINT_BARS),
        HeaderType::PciBridge => size_bars(cfg, addr, BRIDGE_BARS),
        _ => (Vec::new(), Vec::new()),
    };
    let caps = read_capabilities(cfg, addr);
    for e in &caps.errors {
        log::warn!("pci {addr}: {e}");
    }
    Ok(Some(Function {
        addr,
        vendor_id,
        device_id: (id >> 16) as u16,
        revision: (class_rev & 0xff) as u8,
        class_code: class_rev >> 8,
        header_type,
        multi_function: header & HEADER_TYPE_MULTI_FUNCTION != 0,
        upstream,
        bridge,
        bars,
        bar_errors,
        caps,
        ari_function: false,
    }))
}
