//! The IO Remapping Table (Arm DEN0049, issue E.e): how IDs flow from PCI
//! root complexes and named components through SMMUs to ITS groups.
//!
//! Layout (§3): the 36-byte SDT header, Number of IORT Nodes (u32) at 36,
//! Offset to Array of IORT Nodes (u32) at 40, reserved (u32) at 44. Each
//! node starts with Type (u8), Length (u16), Revision (u8), Identifier
//! (u32), Number of ID mappings (u32) and Reference to ID Array (u32,
//! from the node's start). An ID mapping (§3.4) is Input base, Number of
//! IDs (*the count minus one*), Output base, Output reference (offset of
//! the target node from the start of the table) and Flags (bit 0: single
//! mapping), 20 bytes.
//!
//! # Overlapping mappings
//!
//! Firmware sometimes describes ranges whose inclusive ends overlap (QEMU's
//! root complex split at one ID is the known case). An input ID is mapped
//! by the **first mapping in table order** that contains it. This is
//! deterministic, keeps the lower range intact, and is what a reader of the
//! table would expect from its order.
//!
//! Single mappings describe the node's own ID (e.g. an SMMU's own MSIs)
//! and are never used to translate an input ID.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use bitflags::bitflags;
use sluice_pci::sdt::{SdtError, SdtHeader, le_u8, le_u16, le_u32, le_u64, parse_sdt};

pub const IORT_SIGNATURE: &[u8; 4] = b"IORT";

/// Byte offsets of the on-wire structures; each `LEN` is the fixed part,
/// checked against its last field at compile time.
pub mod layout {
    pub mod table {
        pub const NODE_COUNT: usize = 36;
        pub const NODE_ARRAY: usize = 40;
        pub const LEN: usize = 48;
        const _: () = assert!(NODE_ARRAY + 4 + 4 == LEN);
    }
    pub mod node {
        pub const TYPE: usize = 0;
        pub const LENGTH: usize = 1;
        pub const REVISION: usize = 3;
        pub const IDENTIFIER: usize = 4;
        pub const MAPPING_COUNT: usize = 8;
        pub const MAPPING_ARRAY: usize = 12;
        pub const LEN: usize = 16;
        const _: () = assert!(MAPPING_ARRAY + 4 == LEN);
    }
    pub mod id_mapping {
        pub const INPUT_BASE: usize = 0;
        pub const ID_COUNT: usize = 4;
        pub const OUTPUT_BASE: usize = 8;
        pub const OUTPUT_REFERENCE: usize = 12;
        pub const FLAGS: usize = 16;
        pub const LEN: usize = 20;
        const _: () = assert!(FLAGS + 4 == LEN);
    }
    /// ITS group (§3.1.1.1).
    pub mod its_group {
        pub const COUNT: usize = 16;
        pub const IDS: usize = 20;
        pub const LEN: usize = 20;
        const _: () = assert!(COUNT + 4 == LEN);
    }
    /// Named component (§3.1.1.2).
    pub mod named_component {
        pub const FLAGS: usize = 16;
        pub const CACHE_COHERENT: usize = 20;
        pub const HINTS: usize = 24;
        pub const MEMORY_ACCESS_FLAGS: usize = 27;
        pub const ADDRESS_SIZE_LIMIT: usize = 28;
        pub const NAME: usize = 29;
        /// Fixed part plus the name's NUL.
        pub const LEN: usize = 30;
        const _: () = assert!(NAME + 1 == LEN);
    }
    /// PCI root complex (§3.1.1.3).
    pub mod root_complex {
        pub const CACHE_COHERENT: usize = 16;
        pub const HINTS: usize = 20;
        pub const MEMORY_ACCESS_FLAGS: usize = 23;
        pub const ATS_ATTRIBUTE: usize = 24;
        pub const SEGMENT: usize = 28;
        /// Revision 0 ends here.
        pub const LEN: usize = 32;
        pub const ADDRESS_SIZE_LIMIT: usize = 32;
        pub const PASID_CAPABILITIES: usize = 33;
        pub const FLAGS: usize = 36;
        const _: () = assert!(SEGMENT + 4 == LEN);
    }
    /// SMMUv1/v2 (§3.1.1.4).
    pub mod smmu {
        pub const BASE: usize = 16;
        pub const SPAN: usize = 24;
        pub const MODEL: usize = 32;
        pub const FLAGS: usize = 36;
        pub const GLOBAL_INTERRUPTS: usize = 40;
        pub const CONTEXT_COUNT: usize = 44;
        pub const CONTEXT_ARRAY: usize = 48;
        pub const PMU_COUNT: usize = 52;
        pub const PMU_ARRAY: usize = 56;
        pub const LEN: usize = 60;
        const _: () = assert!(PMU_ARRAY + 4 == LEN);
    }
    /// SMMUv3 (§3.1.1.5).
    pub mod smmuv3 {
        pub const BASE: usize = 16;
        pub const FLAGS: usize = 24;
        pub const VATOS: usize = 32;
        pub const MODEL: usize = 40;
        pub const EVENT_GSIV: usize = 44;
        pub const PRI_GSIV: usize = 48;
        pub const GERR_GSIV: usize = 52;
        pub const SYNC_GSIV: usize = 56;
        /// Revisions before 2 end here.
        pub const LEN: usize = 60;
        pub const PROXIMITY_DOMAIN: usize = 60;
        pub const DEVICE_ID_MAPPING_INDEX: usize = 64;
        pub const FULL_LEN: usize = 68;
        const _: () = assert!(SYNC_GSIV + 4 == LEN);
        const _: () = assert!(DEVICE_ID_MAPPING_INDEX + 4 == FULL_LEN);
    }
    /// PMCG (§3.1.1.6).
    pub mod pmcg {
        pub const PAGE0_BASE: usize = 16;
        pub const OVERFLOW_GSIV: usize = 24;
        pub const NODE_REFERENCE: usize = 28;
        pub const LEN: usize = 32;
        pub const PAGE1_BASE: usize = 32;
        const _: () = assert!(NODE_REFERENCE + 4 == LEN);
    }
    /// Reserved memory range node (§3.1.1.7).
    pub mod rmr {
        pub const FLAGS: usize = 16;
        pub const RANGE_COUNT: usize = 20;
        pub const RANGE_ARRAY: usize = 24;
        pub const LEN: usize = 28;
        pub const RANGE_LEN: usize = 20;
        const _: () = assert!(RANGE_ARRAY + 4 == LEN);
    }
}

/// Node types (§3.1.1, Table 4).
pub mod node_type {
    pub const ITS_GROUP: u8 = 0;
    pub const NAMED_COMPONENT: u8 = 1;
    pub const ROOT_COMPLEX: u8 = 2;
    pub const SMMU: u8 = 3;
    pub const SMMUV3: u8 = 4;
    pub const PMCG: u8 = 5;
    pub const RMR: u8 = 6;
}

bitflags! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IdMappingFlags: u32 {
        const SINGLE_MAPPING = 1 << 0;
    }

    /// SMMUv3 node flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SmmuV3Flags: u32 {
        /// The SMMU's table walks are coherent whatever IDR0.COHACC says.
        const COHACC_OVERRIDE = 1 << 0;
        const HTTU_OVERRIDE_ACCESS = 1 << 1;
        const HTTU_OVERRIDE_DIRTY = 1 << 2;
        const PROXIMITY_DOMAIN_VALID = 1 << 3;
        const DEVICE_ID_MAPPING_INDEX_VALID = 1 << 4;
    }
}

/// One ID mapping. `id_count_minus_one` is stored as in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub input_base: u32,
    pub id_count_minus_one: u32,
    pub output_base: u32,
    /// Offset of the target node from the start of the table.
    pub output_reference: u32,
    pub flags: IdMappingFlags,
}

impl IdMapping {
    /// Number of IDs covered.
    pub fn id_count(&self) -> u64 {
        u64::from(self.id_count_minus_one) + 1
    }
    pub fn is_single(&self) -> bool {
        self.flags.contains(IdMappingFlags::SINGLE_MAPPING)
    }
    pub fn contains(&self, id: u32) -> bool {
        id >= self.input_base && u64::from(id - self.input_base) < self.id_count()
    }
    /// The output ID for `id`, `None` if not contained or past `u32::MAX`.
    pub fn map(&self, id: u32) -> Option<u32> {
        if !self.contains(id) {
            return None;
        }
        self.output_base.checked_add(id - self.input_base)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuV3 {
    pub base: u64,
    pub flags: SmmuV3Flags,
    pub vatos_address: u64,
    /// 0: generic SMMUv3; others name implementations with errata.
    pub model: u32,
    pub event_gsiv: u32,
    pub pri_gsiv: u32,
    pub gerr_gsiv: u32,
    pub sync_gsiv: u32,
    /// Present from node revision 2 when the flag says it is valid.
    pub proximity_domain: Option<u32>,
    pub device_id_mapping_index: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smmu {
    pub base: u64,
    pub span: u64,
    pub model: u32,
    pub flags: u32,
    /// NSgIrpt and NSgCfgIrpt GSIVs.
    pub global_interrupts: Option<(u32, u32)>,
    pub context_interrupts: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootComplex {
    pub cache_coherent: u32,
    pub memory_access_flags: u8,
    pub ats_attribute: u32,
    pub segment: u32,
    pub address_size_limit: Option<u8>,
    pub pasid_capabilities: Option<u16>,
    pub flags: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedComponent {
    pub flags: u32,
    pub cache_coherent: u32,
    pub memory_access_flags: u8,
    pub address_size_limit: u8,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pmcg {
    pub page0_base: u64,
    pub overflow_gsiv: u32,
    pub node_reference: u32,
    pub page1_base: Option<u64>,
}

/// A reserved memory range: memory the devices mapped to this node keep
/// accessing (firmware-owned buffers, MSI doorbells).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    pub base: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rmr {
    pub flags: u32,
    pub ranges: Vec<MemoryRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    ItsGroup { its_ids: Vec<u32> },
    NamedComponent(NamedComponent),
    RootComplex(RootComplex),
    Smmu(Smmu),
    SmmuV3(SmmuV3),
    Pmcg(Pmcg),
    Rmr(Rmr),
    Unknown(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Offset from the start of the table (what output references hold).
    pub offset: u32,
    pub revision: u8,
    pub identifier: u32,
    pub kind: NodeKind,
    pub mappings: Vec<IdMapping>,
}

impl Node {
    pub fn is_smmu(&self) -> bool {
        matches!(self.kind, NodeKind::Smmu(_) | NodeKind::SmmuV3(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IortError {
    /// Header problem: the table is rejected.
    Table(SdtError),
    /// The node array offset is outside the table.
    NodeArrayOutOfTable { offset: u32 },
    /// A node length below 16: the walk stops.
    NodeLengthTooSmall { offset: u32, length: u16 },
    /// A node running past the table: the walk stops.
    NodeOverrunsTable { offset: u32, length: u16 },
    /// Fewer nodes than the header's count before the table ended.
    MissingNodes { expected: u32, found: u32 },
    /// A node shorter than its type's fixed part: skipped.
    NodeTooShort {
        offset: u32,
        node_type: u8,
        length: u16,
        minimum: usize,
    },
    /// The ID mapping array does not fit in its node: mappings dropped.
    MappingsOutOfNode {
        offset: u32,
        count: u32,
        reference: u32,
    },
    /// A node's own array (ITS IDs, interrupts, RMR ranges) does not fit in
    /// the node: the node is skipped.
    ArrayOutOfNode { offset: u32 },
    /// A named component's name is not NUL-terminated ASCII: skipped.
    BadName { offset: u32 },
    /// Translation: no mapping of `node` contains `id`.
    NoMapping { node: u32, id: u32 },
    /// Translation: an output reference names no node.
    DanglingReference { node: u32, reference: u32 },
    /// Translation: output ID past `u32::MAX`.
    OutputOverflow { node: u32, id: u32 },
    /// Translation: more hops than any real topology has (a cycle).
    TranslationLoop { node: u32 },
    /// No root complex node for the segment.
    NoRootComplex { segment: u32 },
}

impl From<SdtError> for IortError {
    fn from(e: SdtError) -> Self {
        Self::Table(e)
    }
}

impl fmt::Display for IortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Table(e) => write!(f, "IORT rejected: {e}"),
            Self::NodeArrayOutOfTable { offset } => {
                write!(f, "node array offset {offset:#x} outside the table")
            }
            Self::NodeLengthTooSmall { offset, length } => {
                write!(
                    f,
                    "node at {offset:#x}: length {length} below 16; rest ignored"
                )
            }
            Self::NodeOverrunsTable { offset, length } => {
                write!(
                    f,
                    "node at {offset:#x}: length {length} runs past the table; rest ignored"
                )
            }
            Self::MissingNodes { expected, found } => {
                write!(f, "header counts {expected} nodes, found {found}")
            }
            Self::NodeTooShort {
                offset,
                node_type,
                length,
                minimum,
            } => write!(
                f,
                "node type {node_type} at {offset:#x}: length {length} below its minimum {minimum}; skipped"
            ),
            Self::MappingsOutOfNode {
                offset,
                count,
                reference,
            } => write!(
                f,
                "node at {offset:#x}: {count} ID mappings at +{reference:#x} do not fit; mappings dropped"
            ),
            Self::ArrayOutOfNode { offset } => {
                write!(f, "node at {offset:#x}: array does not fit; skipped")
            }
            Self::BadName { offset } => write!(
                f,
                "named component at {offset:#x}: bad object name; skipped"
            ),
            Self::NoMapping { node, id } => {
                write!(f, "node at {node:#x} has no mapping for ID {id:#x}")
            }
            Self::DanglingReference { node, reference } => {
                write!(
                    f,
                    "node at {node:#x} maps to {reference:#x}, which is no node"
                )
            }
            Self::OutputOverflow { node, id } => {
                write!(f, "node at {node:#x}: ID {id:#x} maps past 2^32")
            }
            Self::TranslationLoop { node } => write!(f, "ID translation loops at node {node:#x}"),
            Self::NoRootComplex { segment } => {
                write!(f, "no root complex node for segment {segment}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iort {
    pub header: SdtHeader,
    /// In table order.
    pub nodes: Vec<Node>,
    pub errors: Vec<IortError>,
}

/// The result of following an input ID through the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Translation {
    /// The first SMMU on the path (index in [`Iort::nodes`]) and the
    /// StreamID it sees.
    pub smmu: Option<(usize, u32)>,
    /// The ITS group the MSIs reach and the DeviceID the ITS sees.
    pub its: Option<(usize, u32)>,
}

/// No real topology has more than RC → SMMU → ITS plus a few
/// intermediaries; anything longer is a cycle.
const MAX_HOPS: usize = 16;

/// Parses a whole IORT (header included). Header problems reject the
/// table; problems in nodes are collected in [`Iort::errors`].
pub fn parse(bytes: &[u8]) -> Result<Iort, IortError> {
    let (header, table) = parse_sdt(bytes, IORT_SIGNATURE, layout::table::LEN)?;
    let count = le_u32(table, layout::table::NODE_COUNT).unwrap_or(0);
    let array = le_u32(table, layout::table::NODE_ARRAY).unwrap_or(0);
    let mut iort = Iort {
        header,
        nodes: Vec::new(),
        errors: Vec::new(),
    };
    let start = usize::try_from(array).unwrap_or(usize::MAX);
    if count > 0 && (start < layout::table::LEN || start >= table.len()) {
        iort.errors
            .push(IortError::NodeArrayOutOfTable { offset: array });
        return Ok(iort);
    }
    let mut at = start;
    let mut found = 0u32;
    while found < count {
        let offset = at as u32;
        let (Some(kind), Some(length)) = (
            le_u8(table, at + layout::node::TYPE),
            le_u16(table, at + layout::node::LENGTH),
        ) else {
            iort.errors.push(IortError::MissingNodes {
                expected: count,
                found,
            });
            break;
        };
        if usize::from(length) < layout::node::LEN {
            iort.errors
                .push(IortError::NodeLengthTooSmall { offset, length });
            break;
        }
        let Some(raw) = table.get(at..at + usize::from(length)) else {
            iort.errors
                .push(IortError::NodeOverrunsTable { offset, length });
            break;
        };
        if let Some(node) = parse_node(offset, kind, raw, &mut iort.errors) {
            iort.nodes.push(node);
        }
        at += usize::from(length);
        found += 1;
    }
    for e in &iort.errors {
        log::warn!("iort: {e}");
    }
    Ok(iort)
}

fn minimum_len(kind: u8) -> usize {
    match kind {
        node_type::ITS_GROUP => layout::its_group::LEN,
        node_type::NAMED_COMPONENT => layout::named_component::LEN,
        node_type::ROOT_COMPLEX => layout::root_complex::LEN,
        node_type::SMMU => layout::smmu::LEN,
        node_type::SMMUV3 => layout::smmuv3::LEN,
        node_type::PMCG => layout::pmcg::LEN,
        node_type::RMR => layout::rmr::LEN,
        _ => layout::node::LEN,
    }
}

/// `count` elements of `size` bytes at `reference` inside `raw`.
fn array_in(raw: &[u8], reference: u32, count: u32, size: usize) -> Option<&[u8]> {
    let start = usize::try_from(reference).ok()?;
    let len = usize::try_from(count).ok()?.checked_mul(size)?;
    raw.get(start..start.checked_add(len)?)
}

fn parse_node(offset: u32, kind: u8, raw: &[u8], errors: &mut Vec<IortError>) -> Option<Node> {
    let minimum = minimum_len(kind);
    if raw.len() < minimum {
        errors.push(IortError::NodeTooShort {
            offset,
            node_type: kind,
            length: raw.len() as u16,
            minimum,
        });
        return None;
    }
    // Fixed parts are in bounds past this point; the `unwrap_or(0)`s below
    // cannot take effect for them.
    let u8_at = |o| le_u8(raw, o).unwrap_or(0);
    let u32_at = |o| le_u32(raw, o).unwrap_or(0);
    let u64_at = |o| le_u64(raw, o).unwrap_or(0);
    let mapping_count = u32_at(layout::node::MAPPING_COUNT);
    let mapping_ref = u32_at(layout::node::MAPPING_ARRAY);
    // Fields added by later node revisions lie between the fixed part and
    // the ID mapping array; only bytes before that array can hold them, so
    // an older node's mappings are never misread as newer fields.
    let fields_end = if mapping_count == 0 {
        raw.len()
    } else {
        usize::try_from(mapping_ref)
            .unwrap_or(usize::MAX)
            .min(raw.len())
    };
    let fields = &raw[..fields_end.max(minimum)];
    let mappings = if mapping_count == 0 {
        Vec::new()
    } else {
        match array_in(raw, mapping_ref, mapping_count, layout::id_mapping::LEN) {
            Some(bytes) if mapping_ref as usize >= layout::node::LEN => bytes
                .chunks_exact(layout::id_mapping::LEN)
                .map(|m| IdMapping {
                    input_base: le_u32(m, layout::id_mapping::INPUT_BASE).unwrap_or(0),
                    id_count_minus_one: le_u32(m, layout::id_mapping::ID_COUNT).unwrap_or(0),
                    output_base: le_u32(m, layout::id_mapping::OUTPUT_BASE).unwrap_or(0),
                    output_reference: le_u32(m, layout::id_mapping::OUTPUT_REFERENCE).unwrap_or(0),
                    flags: IdMappingFlags::from_bits_truncate(
                        le_u32(m, layout::id_mapping::FLAGS).unwrap_or(0),
                    ),
                })
                .collect(),
            _ => {
                errors.push(IortError::MappingsOutOfNode {
                    offset,
                    count: mapping_count,
                    reference: mapping_ref,
                });
                Vec::new()
            }
        }
    };
    let node_kind = match kind {
        node_type::ITS_GROUP => {
            let n = u32_at(layout::its_group::COUNT);
            let Some(ids) = array_in(raw, layout::its_group::IDS as u32, n, 4) else {
                errors.push(IortError::ArrayOutOfNode { offset });
                return None;
            };
            NodeKind::ItsGroup {
                its_ids: ids
                    .chunks_exact(4)
                    .map(|c| le_u32(c, 0).unwrap_or(0))
                    .collect(),
            }
        }
        node_type::NAMED_COMPONENT => {
            use layout::named_component as nc;
            let name_bytes = &raw[nc::NAME..];
            let name = name_bytes
                .iter()
                .position(|&b| b == 0)
                .map(|end| &name_bytes[..end])
                .filter(|n| n.is_ascii())
                .and_then(|n| core::str::from_utf8(n).ok());
            let Some(name) = name else {
                errors.push(IortError::BadName { offset });
                return None;
            };
            NodeKind::NamedComponent(NamedComponent {
                flags: u32_at(nc::FLAGS),
                cache_coherent: u32_at(nc::CACHE_COHERENT),
                memory_access_flags: u8_at(nc::MEMORY_ACCESS_FLAGS),
                address_size_limit: u8_at(nc::ADDRESS_SIZE_LIMIT),
                name: String::from(name),
            })
        }
        node_type::ROOT_COMPLEX => {
            use layout::root_complex as rc;
            NodeKind::RootComplex(RootComplex {
                cache_coherent: u32_at(rc::CACHE_COHERENT),
                memory_access_flags: u8_at(rc::MEMORY_ACCESS_FLAGS),
                ats_attribute: u32_at(rc::ATS_ATTRIBUTE),
                segment: u32_at(rc::SEGMENT),
                address_size_limit: le_u8(fields, rc::ADDRESS_SIZE_LIMIT),
                pasid_capabilities: le_u16(fields, rc::PASID_CAPABILITIES),
                flags: le_u32(fields, rc::FLAGS),
            })
        }
        node_type::SMMU => {
            use layout::smmu as s;
            let global = array_in(raw, u32_at(s::GLOBAL_INTERRUPTS), 1, 16)
                .map(|g| (le_u32(g, 0).unwrap_or(0), le_u32(g, 8).unwrap_or(0)));
            let Some(contexts) =
                array_in(raw, u32_at(s::CONTEXT_ARRAY), u32_at(s::CONTEXT_COUNT), 8)
            else {
                errors.push(IortError::ArrayOutOfNode { offset });
                return None;
            };
            NodeKind::Smmu(Smmu {
                base: u64_at(s::BASE),
                span: u64_at(s::SPAN),
                model: u32_at(s::MODEL),
                flags: u32_at(s::FLAGS),
                global_interrupts: global,
                context_interrupts: contexts
                    .chunks_exact(8)
                    .map(|c| le_u32(c, 0).unwrap_or(0))
                    .collect(),
            })
        }
        node_type::SMMUV3 => {
            use layout::smmuv3 as s;
            let flags = SmmuV3Flags::from_bits_truncate(u32_at(s::FLAGS));
            NodeKind::SmmuV3(SmmuV3 {
                base: u64_at(s::BASE),
                flags,
                vatos_address: u64_at(s::VATOS),
                model: u32_at(s::MODEL),
                event_gsiv: u32_at(s::EVENT_GSIV),
                pri_gsiv: u32_at(s::PRI_GSIV),
                gerr_gsiv: u32_at(s::GERR_GSIV),
                sync_gsiv: u32_at(s::SYNC_GSIV),
                proximity_domain: le_u32(fields, s::PROXIMITY_DOMAIN)
                    .filter(|_| flags.contains(SmmuV3Flags::PROXIMITY_DOMAIN_VALID)),
                device_id_mapping_index: le_u32(fields, s::DEVICE_ID_MAPPING_INDEX)
                    .filter(|_| flags.contains(SmmuV3Flags::DEVICE_ID_MAPPING_INDEX_VALID)),
            })
        }
        node_type::PMCG => {
            use layout::pmcg as p;
            NodeKind::Pmcg(Pmcg {
                page0_base: u64_at(p::PAGE0_BASE),
                overflow_gsiv: u32_at(p::OVERFLOW_GSIV),
                node_reference: u32_at(p::NODE_REFERENCE),
                page1_base: le_u64(fields, p::PAGE1_BASE),
            })
        }
        node_type::RMR => {
            use layout::rmr as r;
            let Some(ranges) = array_in(
                raw,
                u32_at(r::RANGE_ARRAY),
                u32_at(r::RANGE_COUNT),
                r::RANGE_LEN,
            ) else {
                errors.push(IortError::ArrayOutOfNode { offset });
                return None;
            };
            NodeKind::Rmr(Rmr {
                flags: u32_at(r::FLAGS),
                ranges: ranges
                    .chunks_exact(r::RANGE_LEN)
                    .map(|c| MemoryRange {
                        base: le_u64(c, 0).unwrap_or(0),
                        length: le_u64(c, 8).unwrap_or(0),
                    })
                    .collect(),
            })
        }
        other => NodeKind::Unknown(other),
    };
    Some(Node {
        offset,
        revision: u8_at(layout::node::REVISION),
        identifier: u32_at(layout::node::IDENTIFIER),
        kind: node_kind,
        mappings,
    })
}

impl Iort {
    /// Index of the node at table offset `offset`.
    pub fn node_at(&self, offset: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.offset == offset)
    }

    /// Index of the root complex node for PCI segment `segment`.
    pub fn root_complex(&self, segment: u32) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| matches!(&n.kind, NodeKind::RootComplex(rc) if rc.segment == segment))
    }

    /// The SMMU nodes (v1/v2 and v3), as indices in [`Iort::nodes`], in
    /// table order: `smmu0`, `smmu1`, … in logs.
    pub fn smmus(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_smmu())
            .collect()
    }

    /// One step: the node and ID that `id` at node `index` maps to (the
    /// first non-single mapping containing it, in table order).
    pub fn map_id(&self, index: usize, id: u32) -> Result<(usize, u32), IortError> {
        let node = self
            .nodes
            .get(index)
            .ok_or(IortError::NoMapping { node: 0, id })?;
        let m = node
            .mappings
            .iter()
            .find(|m| !m.is_single() && m.contains(id))
            .ok_or(IortError::NoMapping {
                node: node.offset,
                id,
            })?;
        let out = m.map(id).ok_or(IortError::OutputOverflow {
            node: node.offset,
            id,
        })?;
        let next = self
            .node_at(m.output_reference)
            .ok_or(IortError::DanglingReference {
                node: node.offset,
                reference: m.output_reference,
            })?;
        Ok((next, out))
    }

    /// Follows `id` from node `index` until an ITS group, or a node with no
    /// mapping for it once an SMMU has been reached.
    pub fn translate(&self, index: usize, id: u32) -> Result<Translation, IortError> {
        let mut t = Translation::default();
        let (mut at, mut id) = (index, id);
        for _ in 0..MAX_HOPS {
            let (next, out) = match self.map_id(at, id) {
                Ok(step) => step,
                // An SMMU whose IDs go nowhere further (no MSI path): done.
                Err(IortError::NoMapping { .. }) if at != index => return Ok(t),
                Err(e) => return Err(e),
            };
            match &self.nodes[next].kind {
                NodeKind::ItsGroup { .. } => {
                    t.its = Some((next, out));
                    return Ok(t);
                }
                _ if self.nodes[next].is_smmu() && t.smmu.is_none() => t.smmu = Some((next, out)),
                _ => {}
            }
            at = next;
            id = out;
        }
        Err(IortError::TranslationLoop {
            node: self.nodes.get(at).map_or(0, |n| n.offset),
        })
    }

    /// Translates a requester ID on PCI segment `segment`.
    pub fn translate_rid(&self, segment: u32, rid: u16) -> Result<Translation, IortError> {
        let rc = self
            .root_complex(segment)
            .ok_or(IortError::NoRootComplex { segment })?;
        self.translate(rc, u32::from(rid))
    }
}
