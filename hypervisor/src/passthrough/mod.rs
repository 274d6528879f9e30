//! Device passthrough: the emulated PCI configuration space a guest sees.
//!
//! A guest reaches its devices' configuration space only through a
//! trapped ECAM window ([`ecam`]): the nested tables leave it unmapped,
//! each access faults, and [`ecam::emulate_ecam_access`] turns the
//! faulting instruction into a read or write of the [`GuestPciBus`]
//! ([`config_space`]), which shows the guest only its own functions at
//! their guest BDFs and decides per register what reaches the host
//! device: identity and capabilities pass through, bus mastering only
//! while the device is bound through iommufd, BARs stay where Sluice put
//! them, MSI/MSI-X programming is recorded for the interrupt layer, and
//! everything else is dropped.

pub mod config_space;
pub mod ecam;

pub use config_space::{
    BarMapping, GuestMsi, GuestMsix, GuestPciBus, IoPortRange, PassthroughDevice, PassthroughError,
};
pub use ecam::{EcamWindow, MmioError, emulate_ecam_access};
