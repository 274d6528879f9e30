//! PCI addresses: segment (ACPI "PCI segment group"), bus, device, function.

use core::fmt;

/// A PCI segment group number (the `SSSS` in `SSSS:BB:DD.F`).
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Segment(pub u16);

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}", self.0)
    }
}

/// Bus, device and function: the 16-bit PCI Express requester ID layout
/// (bus in bits 15:8, device in 7:3, function in 2:0).
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bdf(u16);

const _: () = assert!(core::mem::size_of::<Bdf>() == 2);

impl Bdf {
    /// `device` is masked to 5 bits and `function` to 3 bits, so every
    /// value of the inputs gives a valid address.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self(((bus as u16) << 8) | (((device & 0x1f) as u16) << 3) | (function & 7) as u16)
    }
    /// From a requester ID / source ID as carried in TLPs and fault records.
    pub const fn from_requester_id(rid: u16) -> Self {
        Self(rid)
    }
    pub const fn requester_id(self) -> u16 {
        self.0
    }
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// Device and function as one byte (`devfn`).
    pub const fn devfn(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bdf({self})")
    }
}

/// A function's full address: segment plus BDF, shown as `SSSS:BB:DD.F`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PciAddress {
    pub segment: Segment,
    pub bdf: Bdf,
}

impl PciAddress {
    pub const fn new(segment: u16, bus: u8, device: u8, function: u8) -> Self {
        Self {
            segment: Segment(segment),
            bdf: Bdf::new(bus, device, function),
        }
    }
    pub const fn from_parts(segment: Segment, bdf: Bdf) -> Self {
        Self { segment, bdf }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.bdf)
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PciAddress({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn bdf_fields_and_display() {
        let b = Bdf::new(0x3a, 0x1f, 7);
        assert_eq!(b.bus(), 0x3a);
        assert_eq!(b.device(), 0x1f);
        assert_eq!(b.function(), 7);
        assert_eq!(b.requester_id(), 0x3aff);
        assert_eq!(format!("{b}"), "3a:1f.7");
        let a = PciAddress::new(0x12, 0, 2, 1);
        assert_eq!(format!("{a}"), "0012:00:02.1");
        // Out-of-range device/function are masked, never overflow into the bus.
        assert_eq!(Bdf::new(1, 0x20, 8), Bdf::new(1, 0, 0));
    }
}
