//! Device passthrough: the emulated PCI configuration space a guest sees.
