//! Virtual machines: configuration, guest memory and guest boot.
//!
//! * [`config`]: the `vm=` command-line descriptions and their validation
//!   against the platform's PCI functions and IOMMU groups;
//! * [`memory`]: guest RAM backed by host frames, scrubbed, and the
//!   iommufd [`GuestMemory`](crate::iommufd::GuestMemory) over it;
//! * [`boot`]: the direct-boot protocol (ELF64 loading, start info,
//!   identity page tables, entry state);
//! * [`nested`]: the VM's nested page table (NPT / EPT) over its RAM and
//!   passed-through BARs;
//! * [`exits`]: what Sluice does with each vCPU exit, for any backend.

pub mod boot;
pub mod config;
pub mod exits;
pub mod instance;
pub mod memory;
pub mod nested;
