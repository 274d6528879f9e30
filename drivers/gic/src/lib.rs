//! The Arm Generic Interrupt Controller's message-based interrupts, as
//! Sluice owns them: the Interrupt Translation Service (ITS) and the
//! redistributors' LPI side.
//!
//! Written from the Arm Generic Interrupt Controller Architecture
//! Specification, GIC architecture version 3 and version 4 (Arm IHI 0069);
//! sections are cited where a fact comes from.
//!
//! On Arm a device's MSI is a 32-bit write of an EventID to the ITS
//! doorbell, GITS_TRANSLATER; the interconnect tags it with the writer's
//! DeviceID (for PCI, the requester ID mapped through the IORT). The ITS
//! translates (DeviceID, EventID) through tables in memory — device table
//! → the device's interrupt translation table (ITT) → an LPI INTID and a
//! collection → the collection's target redistributor — and sets the LPI
//! pending there (IHI 0069, 5.2 "The ITS"). A DeviceID or EventID without
//! a mapping produces nothing. With Sluice the only writer of those
//! tables (through the ITS command queue), a device can raise exactly the
//! interrupts Sluice mapped for it, which is what lets the SMMU backend
//! declare MSI isolation.
//!
//! * [`its`]: the ITS — registers, capabilities, commands, the command
//!   queue, [`its::ItsUnit`] (ownership, collections, devices, events,
//!   software record of every mapping) and [`its::model::ItsModel`];
//! * [`redist`]: finding a CPU's redistributor frame, the shared LPI
//!   configuration table, per-redistributor pending tables and
//!   GICR_CTLR.EnableLPIs, with [`redist::model::RedistModel`];
//! * [`dist`]: the distributor's LPI support (GICD_TYPER.LPIS, IDbits);
//! * [`lpi`]: LPI INTIDs and the allocator Sluice hands them out from.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod dist;
pub mod its;
pub mod lpi;
mod memory;
pub mod redist;

pub use lpi::{Lpi, LpiAllocator, LpiError};
