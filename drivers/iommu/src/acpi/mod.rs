//! ACPI tables that describe IOMMUs.
