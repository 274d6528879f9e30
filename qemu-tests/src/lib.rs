//! QEMU scenarios and their harness.
//!
//! - [`scenarios`]: the one table of scenarios `cargo xtask test` boots.
//! - [`qemu`]: the one place that lays out an ESP and builds QEMU command
//!   lines, shared by the harness and `cargo xtask run` / `qemu-cmd`.
//! - [`judge`]: result lines, exit-status decoding and verdicts.
//! - [`guests`]: building guest images and the test guest's address layout.
//! - [`harness`]: bounded QEMU runs, logs, and the `N passed, N failed` summary.

pub mod arch;
pub mod guests;
pub mod harness;
pub mod judge;
pub mod qemu;
pub mod scenarios;

pub use arch::Arch;
pub use scenarios::{Expected, SCENARIOS, Scenario};
