//! What can go wrong driving a VT-d unit.

use core::fmt;

use crate::pagetable::PageTableError;

/// Why a VT-d operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VtdError {
    /// The unit did not complete `what` within the timeout.
    Timeout {
        what: &'static str,
        waited_ns: u64,
    },
    /// No memory for a root/context/PASID table or the invalidation queue.
    OutOfMemory,
    /// The page-table engine refused a map or unmap.
    PageTable(PageTableError),
    /// The unit cannot do what was asked (names the missing capability).
    Unsupported(&'static str),
    /// A domain forcing snoop was requested but ECAP.SC = 0.
    SnoopControlUnsupported,
    /// No supported second-level table covers the requested address width.
    AddressWidthUnsupported {
        requested: u32,
    },
    /// The configuration passed to `init` is invalid.
    InvalidConfig(&'static str),
    NoSuchDomain(u16),
    /// The domain still has devices or PASIDs attached.
    DomainInUse(u16),
    /// Every domain ID the unit offers (CAP.ND) is taken.
    DomainIdsExhausted,
    /// The domain's kind cannot be attached this way (e.g. a first-level
    /// domain in legacy mode).
    WrongDomainKind,
    /// The device (or PASID) is not attached.
    NotAttached,
    /// The device is attached; detach it first.
    DeviceBusy,
    /// PASID attach needs scalable mode.
    NotScalableMode,
    /// The PASID is reserved (0 carries requests without PASID) or beyond
    /// what the unit and the PASID directory support.
    PasidOutOfRange {
        pasid: u32,
        limit: u32,
    },
    /// A range that is empty, misaligned or overflows.
    InvalidRange,
    /// The hardware rejected descriptor `descriptor` at queue index `index`
    /// (FSTS.IQE, IQERCD.IQEI = `info`). The queue was repaired and later
    /// descriptors ran.
    InvalidationQueueError {
        index: u32,
        descriptor: [u64; 2],
        info: u8,
    },
    /// A device-TLB invalidation of `sid` timed out (FSTS.ITE).
    DeviceTlbTimeout {
        sid: u16,
    },
    /// A device answered a device-TLB invalidation wrongly (FSTS.ICE).
    InvalidationCompletionError {
        sid: u16,
    },
}

impl From<PageTableError> for VtdError {
    fn from(e: PageTableError) -> Self {
        match e {
            PageTableError::OutOfMemory => VtdError::OutOfMemory,
            other => VtdError::PageTable(other),
        }
    }
}

impl fmt::Display for VtdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { what, waited_ns } => {
                write!(
                    f,
                    "the unit did not complete {what} within {} us",
                    waited_ns / 1000
                )
            }
            Self::OutOfMemory => f.write_str("out of memory for translation structures"),
            Self::PageTable(e) => write!(f, "page table: {e}"),
            Self::Unsupported(what) => write!(f, "the unit does not support {what}"),
            Self::SnoopControlUnsupported => {
                f.write_str("snoop control requested but the unit lacks ECAP.SC")
            }
            Self::AddressWidthUnsupported { requested } => {
                write!(
                    f,
                    "no supported table covers a {requested}-bit address width"
                )
            }
            Self::InvalidConfig(what) => write!(f, "invalid configuration: {what}"),
            Self::NoSuchDomain(did) => write!(f, "no domain {did}"),
            Self::DomainInUse(did) => write!(f, "domain {did} still has devices attached"),
            Self::DomainIdsExhausted => f.write_str("all domain IDs are in use"),
            Self::WrongDomainKind => f.write_str("this domain kind cannot be attached here"),
            Self::NotAttached => f.write_str("not attached"),
            Self::DeviceBusy => f.write_str("the device is attached; detach it first"),
            Self::NotScalableMode => f.write_str("PASID attach needs scalable mode"),
            Self::PasidOutOfRange { pasid, limit } => {
                write!(f, "PASID {pasid} is reserved or not below {limit}")
            }
            Self::InvalidRange => f.write_str("empty, misaligned or overflowing range"),
            Self::InvalidationQueueError {
                index,
                descriptor,
                info,
            } => write!(
                f,
                "invalidation queue rejected descriptor {index} ({:#018x}:{:#018x}, IQEI {info})",
                descriptor[1], descriptor[0]
            ),
            Self::DeviceTlbTimeout { sid } => write!(
                f,
                "device-TLB invalidation of {:02x}:{:02x}.{:x} timed out",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
            Self::InvalidationCompletionError { sid } => write!(
                f,
                "bad device-TLB invalidation completion from {:02x}:{:02x}.{:x}",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
        }
    }
}
