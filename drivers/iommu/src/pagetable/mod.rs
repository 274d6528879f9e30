//! The IO page-table engine.
