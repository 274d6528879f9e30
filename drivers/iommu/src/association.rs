//! Which IOMMU unit translates each PCI device.
