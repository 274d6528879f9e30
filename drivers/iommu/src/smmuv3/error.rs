//! What can go wrong driving an SMMUv3.

use core::fmt;

use super::commands::opcode;
use crate::pagetable::PageTableError;

/// A translation stage (Arm IHI 0070, 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// VA → IPA/PA, tagged by ASID, configured by a CD.
    Stage1,
    /// IPA → PA, tagged by VMID, configured by the STE.
    Stage2,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Stage1 => "stage 1",
            Stage::Stage2 => "stage 2",
        })
    }
}

/// CMDQ_CONS.ERR (7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandErrorKind {
    /// CERROR_ILL: unknown opcode, or a reserved field / invalid value.
    Illegal,
    /// CERROR_ABT: external abort fetching the command.
    Abort,
    /// CERROR_ATC_INV_SYNC: a CMD_SYNC could not complete ATC
    /// invalidations.
    AtcInvalidationSync,
    /// Any other code.
    Other(u8),
}

impl CommandErrorKind {
    pub const fn from_code(code: u32) -> Self {
        match code {
            0x01 => Self::Illegal,
            0x02 => Self::Abort,
            0x03 => Self::AtcInvalidationSync,
            other => Self::Other(other as u8),
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Self::Illegal => "CERROR_ILL",
            Self::Abort => "CERROR_ABT",
            Self::AtcInvalidationSync => "CERROR_ATC_INV_SYNC",
            Self::Other(_) => "unknown CERROR",
        }
    }
}

/// Why an SMMU operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmmuError {
    /// The SMMU did not complete `what` within the timeout.
    Timeout {
        what: &'static str,
        waited_ns: u64,
    },
    /// No memory for a table or queue.
    OutOfMemory,
    /// The page-table engine refused a map or unmap.
    PageTable(PageTableError),
    /// The SMMU cannot do what was asked (names the missing capability).
    Unsupported(&'static str),
    /// A domain of this stage was requested but the SMMU lacks it
    /// (IDR0.S1P / IDR0.S2P).
    StageUnsupported(Stage),
    /// The configuration passed to `init` is invalid.
    InvalidConfig(&'static str),
    NoSuchDomain(u32),
    /// The domain still has streams or substreams attached.
    DomainInUse(u32),
    /// Every ASID (stage 1) or VMID (stage 2) is taken.
    TagsExhausted(Stage),
    /// The StreamID is beyond what the stream table covers.
    StreamOutOfRange {
        sid: u32,
        limit: u64,
    },
    /// Substream attach on an SMMU without substreams (IDR1.SSIDSIZE = 0).
    SubstreamsUnsupported,
    /// The SubstreamID is reserved (0 carries the stream's own traffic) or
    /// beyond what the CD table covers.
    SubstreamOutOfRange {
        ssid: u32,
        limit: u32,
    },
    /// The domain's stage cannot be attached this way (substreams need
    /// stage-1 domains and a stream not translated by a stage-2 domain).
    WrongStage(Stage),
    /// The stream (or substream) is not attached.
    NotAttached,
    /// A range that is empty, misaligned or overflows.
    InvalidRange,
    /// The SMMU refused command `command` at queue index `index`
    /// (CMDQ_CONS.ERR); it was replaced by a CMD_SYNC and the queue
    /// restarted.
    CommandError {
        kind: CommandErrorKind,
        index: u32,
        command: [u64; 2],
    },
    /// The SMMU reported global errors (GERROR bits) that stop it from
    /// working, e.g. service failure mode.
    GlobalError(u32),
}

impl From<PageTableError> for SmmuError {
    fn from(e: PageTableError) -> Self {
        match e {
            PageTableError::OutOfMemory => SmmuError::OutOfMemory,
            other => SmmuError::PageTable(other),
        }
    }
}

impl fmt::Display for SmmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { what, waited_ns } => write!(
                f,
                "the SMMU did not complete {what} within {} us",
                waited_ns / 1000
            ),
            Self::OutOfMemory => f.write_str("out of memory for SMMU tables or queues"),
            Self::PageTable(e) => write!(f, "page table: {e}"),
            Self::Unsupported(what) => write!(f, "the SMMU does not support {what}"),
            Self::StageUnsupported(stage) => write!(
                f,
                "{stage} translation requested but the SMMU does not implement it"
            ),
            Self::InvalidConfig(what) => write!(f, "invalid configuration: {what}"),
            Self::NoSuchDomain(d) => write!(f, "no domain {d}"),
            Self::DomainInUse(d) => write!(f, "domain {d} still has streams attached"),
            Self::TagsExhausted(Stage::Stage1) => f.write_str("all ASIDs are in use"),
            Self::TagsExhausted(Stage::Stage2) => f.write_str("all VMIDs are in use"),
            Self::StreamOutOfRange { sid, limit } => {
                write!(f, "StreamID {sid:#x} is not below {limit:#x}")
            }
            Self::SubstreamsUnsupported => {
                f.write_str("the SMMU has no substreams (IDR1.SSIDSIZE = 0)")
            }
            Self::SubstreamOutOfRange { ssid, limit } => {
                write!(
                    f,
                    "SubstreamID {ssid:#x} is reserved or not below {limit:#x}"
                )
            }
            Self::WrongStage(stage) => {
                write!(f, "a {stage} domain cannot be attached this way")
            }
            Self::NotAttached => f.write_str("not attached"),
            Self::InvalidRange => f.write_str("empty, misaligned or overflowing range"),
            Self::CommandError {
                kind,
                index,
                command,
            } => write!(
                f,
                "the SMMU refused {} at command-queue index {index} with {} \
                 ({:#018x}:{:#018x})",
                opcode::name(command[0] as u8),
                kind.name(),
                command[1],
                command[0]
            ),
            Self::GlobalError(bits) => write!(f, "global error (GERROR {bits:#x})"),
        }
    }
}
