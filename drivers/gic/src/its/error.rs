//! What can go wrong driving an ITS.

use core::fmt;

use super::commands::{ItsCommand, RdBase};

/// Why an ITS operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItsError {
    /// The ITS cannot do what Sluice needs (names the missing feature).
    Unsupported(&'static str),
    /// The configuration passed to [`ItsUnit::take_ownership`] is invalid.
    ///
    /// [`ItsUnit::take_ownership`]: super::ItsUnit::take_ownership
    InvalidConfig(&'static str),
    /// A register wait (`what`) did not finish in time.
    Timeout {
        what: &'static str,
        waited_ns: u64,
    },
    /// The ITS did not consume the command queue in time; `command` is
    /// the first command it had not consumed. Whether it will later is
    /// unknown, so the unit refuses further commands ([`ItsError::Wedged`])
    /// and keeps every structure the command might still use.
    CommandTimeout {
        command: ItsCommand,
        waited_ns: u64,
    },
    /// The ITS stalled on `command` at byte offset `offset` of the queue
    /// (GITS_CREADR.Stalled, IHI 0069 5.3 "command errors"). It was
    /// replaced by a harmless command and the queue restarted
    /// (GITS_CWRITER.Retry); the operation did not take effect.
    CommandStalled {
        command: ItsCommand,
        offset: u32,
    },
    /// An earlier command timed out: the ITS's state is unknown and no
    /// more commands are sent to it.
    Wedged,
    /// No memory for `what` (`bytes` bytes, contiguous when more than a
    /// page or aligned beyond 4 KiB).
    OutOfMemory {
        what: &'static str,
        bytes: u64,
    },
    /// The device table for `device_bits` DeviceID bits needs more than a
    /// GITS_BASER can describe (256 pages), and no smaller layout fits.
    DeviceTableTooLarge {
        device_bits: u32,
        bytes: u64,
    },
    /// A register did not keep the value written (`what`).
    RegisterRejected {
        what: &'static str,
        wrote: u64,
        read: u64,
    },
    DeviceOutOfRange {
        device: u32,
        limit: u64,
    },
    /// A device's EventID bits must be 1..=`max` (GITS_TYPER.ID_bits).
    EventBitsOutOfRange {
        bits: u32,
        max: u32,
    },
    EventOutOfRange {
        device: u32,
        event: u32,
        limit: u64,
    },
    /// LPI INTIDs must be in `first..limit`.
    LpiOutOfRange {
        lpi: u32,
        first: u32,
        limit: u64,
    },
    CollectionOutOfRange {
        icid: u16,
        limit: u32,
    },
    /// The redistributor is named in the form the ITS does not use
    /// (GITS_TYPER.PTA), or its address is not 64 KiB aligned.
    WrongTarget(RdBase),
    DeviceMapped(u32),
    DeviceNotMapped(u32),
    EventMapped {
        device: u32,
        event: u32,
    },
    EventNotMapped {
        device: u32,
        event: u32,
    },
    /// The LPI is already what another (device, event) reaches: two
    /// events on one LPI would let one device raise another's interrupt.
    LpiInUse {
        lpi: u32,
        device: u32,
        event: u32,
    },
    CollectionMapped(u16),
    CollectionNotMapped(u16),
    /// Events still target the collection.
    CollectionInUse(u16),
}

impl fmt::Display for ItsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(what) => write!(f, "the ITS does not support {what}"),
            Self::InvalidConfig(what) => write!(f, "invalid ITS configuration: {what}"),
            Self::Timeout { what, waited_ns } => write!(
                f,
                "the ITS did not complete {what} within {} us",
                waited_ns / 1000
            ),
            Self::CommandTimeout { command, waited_ns } => write!(
                f,
                "the ITS did not consume {command} within {} us; its state is unknown",
                waited_ns / 1000
            ),
            Self::CommandStalled { command, offset } => write!(
                f,
                "the ITS stalled on {command} (queue offset {offset:#x}); it was skipped"
            ),
            Self::Wedged => f.write_str(
                "the ITS stopped consuming commands earlier; no more commands are sent to it",
            ),
            Self::OutOfMemory { what, bytes } => {
                write!(
                    f,
                    "could not allocate {bytes} bytes of memory for the {what}"
                )
            }
            Self::DeviceTableTooLarge { device_bits, bytes } => write!(
                f,
                "a device table for {device_bits} DeviceID bits needs {bytes} bytes, more than \
                 a GITS_BASER can describe"
            ),
            Self::RegisterRejected { what, wrote, read } => {
                write!(f, "{what}: wrote {wrote:#x}, read back {read:#x}")
            }
            Self::DeviceOutOfRange { device, limit } => {
                write!(f, "DeviceID {device:#x} is not below {limit:#x}")
            }
            Self::EventBitsOutOfRange { bits, max } => {
                write!(
                    f,
                    "{bits} EventID bits requested; the ITS allows 1 to {max}"
                )
            }
            Self::EventOutOfRange {
                device,
                event,
                limit,
            } => write!(
                f,
                "EventID {event} of DeviceID {device:#x} is not below {limit}"
            ),
            Self::LpiOutOfRange { lpi, first, limit } => {
                write!(f, "LPI {lpi} is not in {first}..{limit}")
            }
            Self::CollectionOutOfRange { icid, limit } => {
                write!(f, "ICID {icid} is not below {limit}")
            }
            Self::WrongTarget(rd) => write!(
                f,
                "{rd} cannot be named to this ITS (GITS_TYPER.PTA, 64 KiB alignment)"
            ),
            Self::DeviceMapped(d) => write!(f, "DeviceID {d:#x} is already mapped"),
            Self::DeviceNotMapped(d) => write!(f, "DeviceID {d:#x} is not mapped"),
            Self::EventMapped { device, event } => {
                write!(
                    f,
                    "EventID {event} of DeviceID {device:#x} is already mapped"
                )
            }
            Self::EventNotMapped { device, event } => {
                write!(f, "EventID {event} of DeviceID {device:#x} is not mapped")
            }
            Self::LpiInUse { lpi, device, event } => write!(
                f,
                "LPI {lpi} is already reached by EventID {event} of DeviceID {device:#x}"
            ),
            Self::CollectionMapped(c) => write!(f, "collection {c} is already mapped"),
            Self::CollectionNotMapped(c) => write!(f, "collection {c} is not mapped"),
            Self::CollectionInUse(c) => write!(f, "events still target collection {c}"),
        }
    }
}
