//! QEMU scenarios and their harness.
