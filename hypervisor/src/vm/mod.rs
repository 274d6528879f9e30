//! Virtual machines: configuration, guest memory and guest boot.
