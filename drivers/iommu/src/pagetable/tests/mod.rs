//! Host tests of the page-table engine, the formats and the walker.

mod formats;
mod random;
mod support;
mod unit;
