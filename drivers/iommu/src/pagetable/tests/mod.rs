//! Host tests of the page-table engine, the formats and the walker.

mod random;
mod support;
mod unit;
