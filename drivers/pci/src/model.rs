//! A host model of PCI configuration space, for tests of enumeration,
//! capabilities, DMA aliases, IOMMU groups and DMAR scope resolution.
//!
//! Each function is a 4 KiB image plus a per-bit writable mask: a write
//! changes only writable bits, so BAR sizing behaves like hardware (writing
//! all ones reads back the size mask with the read-only type bits intact).
//! Addresses with no function read all ones. The model logs every write and
//! counts BAR sizing done while decode was enabled in COMMAND.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use crate::address::PciAddress;
use crate::caps::{AcsFlags, PortType, cap_id, ext_cap_id};
use crate::config::{
    BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, ConfigError,
    ConfigSpace, HEADER_TYPE, HEADER_TYPE_MULTI_FUNCTION, STATUS, STATUS_CAPABILITIES_LIST,
    check_offset,
};

const SPACE: usize = 4096;

/// One function's configuration space image under construction.
#[derive(Clone)]
pub struct FunctionBuilder {
    image: Vec<u8>,
    writable: Vec<u8>,
    /// Offset of the last capability's "next" byte (0x34 for none yet).
    cap_link: u16,
    next_cap: u16,
    /// Offset of the last extended capability header, if any.
    ext_last: Option<u16>,
    next_ext: u16,
    bar_slots: u8,
    pcie_at: Option<u16>,
}

impl FunctionBuilder {
    fn new(vendor: u16, device: u16, class_code: u32, header_type: u8) -> Self {
        let mut b = Self {
            image: vec![0; SPACE],
            writable: vec![0; SPACE],
            cap_link: CAPABILITIES_POINTER,
            next_cap: 0x40,
            ext_last: None,
            next_ext: 0x100,
            bar_slots: if header_type == 1 { 2 } else { 6 },
            pcie_at: None,
        };
        b.put16(0, vendor);
        b.put16(2, device);
        b.put32(8, (class_code << 8) | 0x01);
        b.put8(HEADER_TYPE, header_type);
        // COMMAND: I/O, memory, bus master, parity, SERR, INTx disable.
        b.writable16(COMMAND, 0x0547);
        b
    }

    /// A type 0 function.
    pub fn endpoint(vendor: u16, device: u16, class_code: u32) -> Self {
        Self::new(vendor, device, class_code, 0)
    }

    /// A type 1 (PCI-to-PCI bridge) function with firmware's bus numbers.
    pub fn bridge(vendor: u16, device: u16, primary: u8, secondary: u8, subordinate: u8) -> Self {
        let mut b = Self::new(vendor, device, 0x06_04_00, 1);
        b.put8(0x18, primary);
        b.put8(0x19, secondary);
        b.put8(0x1a, subordinate);
        for o in 0x18..0x1b {
            b.writable[o] = 0xff;
        }
        b
    }

    /// Sets the multi-function bit in the header type.
    pub fn multi_function(mut self) -> Self {
        self.image[usize::from(HEADER_TYPE)] |= HEADER_TYPE_MULTI_FUNCTION;
        self
    }

    /// Sets COMMAND (e.g. decode enabled as firmware leaves it).
    pub fn command(mut self, value: u16) -> Self {
        self.put16(COMMAND, value);
        self
    }

    /// A 32-bit memory BAR of `size` bytes (a power of two ≥ 16) at `address`.
    pub fn bar_mem32(mut self, index: u8, address: u32, size: u32, prefetchable: bool) -> Self {
        let flags = if prefetchable { 1 << 3 } else { 0 };
        let at = BAR0 + 4 * u16::from(index);
        self.put32(at, (address & !(size - 1)) | flags);
        self.writable32(at, !(size - 1) & !0xf);
        self
    }

    /// A 64-bit memory BAR in slots `index` and `index + 1`.
    pub fn bar_mem64(mut self, index: u8, address: u64, size: u64, prefetchable: bool) -> Self {
        let flags = 0b100 | if prefetchable { 1 << 3 } else { 0 };
        let at = BAR0 + 4 * u16::from(index);
        let value = address & !(size - 1);
        let mask = !(size - 1);
        self.put32(at, (value as u32) | flags);
        self.put32(at + 4, (value >> 32) as u32);
        self.writable32(at, (mask as u32) & !0xf);
        self.writable32(at + 4, (mask >> 32) as u32);
        self
    }

    /// An I/O BAR of `size` bytes; `upper_bits` false models a device that
    /// decodes only 16 I/O address bits.
    pub fn bar_io(mut self, index: u8, port: u32, size: u32, upper_bits: bool) -> Self {
        let at = BAR0 + 4 * u16::from(index);
        self.put32(at, (port & !(size - 1)) | 1);
        let mut mask = !(size - 1) & !3;
        if !upper_bits {
            mask &= 0xffff;
        }
        self.writable32(at, mask);
        self
    }

    /// Appends a conventional capability of `len` bytes and returns its
    /// offset. Capabilities are placed one after another from 0x40.
    pub fn add_capability(&mut self, id: u8, len: u16) -> u16 {
        let at = self.next_cap;
        self.put8(at, id);
        self.put8(at + 1, 0);
        self.put8(self.cap_link, at as u8);
        self.cap_link = at + 1;
        self.next_cap = (at + len + 3) & !3;
        let status = self.get16(STATUS) | STATUS_CAPABILITIES_LIST;
        self.put16(STATUS, status);
        at
    }

    /// Appends an extended capability of `len` bytes and returns its offset.
    pub fn add_extended_capability(&mut self, id: u16, version: u8, len: u16) -> u16 {
        let at = self.next_ext;
        self.put32(at, u32::from(id) | (u32::from(version & 0xf) << 16));
        if let Some(last) = self.ext_last {
            let header = self.get32(last) & 0x000f_ffff;
            self.put32(last, header | (u32::from(at) << 20));
        }
        self.ext_last = Some(at);
        self.next_ext = (at + len + 3) & !3;
        at
    }

    /// The PCI Express capability (version 2) with a device/port type.
    pub fn pcie(mut self, port_type: PortType, flr: bool) -> Self {
        let at = self.add_capability(cap_id::PCI_EXPRESS, 0x3c);
        self.pcie_at = Some(at);
        self.put16(at + 2, 2 | (u16::from(port_type.raw()) << 4));
        self.put32(at + 4, if flr { 1 << 28 } else { 0 });
        self
    }

    pub fn power_management(mut self) -> Self {
        let at = self.add_capability(cap_id::POWER_MANAGEMENT, 8);
        self.put16(at + 2, 0x0003);
        self
    }

    /// MSI with 2^`log2_vectors` vectors requested.
    pub fn msi(mut self, is_64bit: bool, per_vector_masking: bool, log2_vectors: u8) -> Self {
        let len = 0x0a + if is_64bit { 4 } else { 0 } + if per_vector_masking { 0x0a } else { 0 };
        let at = self.add_capability(cap_id::MSI, len);
        let control = (u16::from(log2_vectors & 7) << 1)
            | if is_64bit { 1 << 7 } else { 0 }
            | if per_vector_masking { 1 << 8 } else { 0 };
        self.put16(at + 2, control);
        self
    }

    /// MSI-X with `entries` table entries at `table_offset` in BAR `bir`.
    pub fn msix(
        mut self,
        entries: u16,
        bir: u8,
        table_offset: u32,
        pba_bir: u8,
        pba_offset: u32,
    ) -> Self {
        let at = self.add_capability(cap_id::MSIX, 12);
        self.put16(at + 2, (entries.saturating_sub(1)) & 0x7ff);
        self.put32(at + 4, (table_offset & !7) | u32::from(bir & 7));
        self.put32(at + 8, (pba_offset & !7) | u32::from(pba_bir & 7));
        self
    }

    /// ACS with the given capability bits; `control` is what firmware
    /// enabled (writable within `capability`).
    pub fn acs(mut self, capability: AcsFlags, control: AcsFlags) -> Self {
        let at = self.add_extended_capability(ext_cap_id::ACS, 1, 8);
        self.put16(at + 4, capability.bits());
        self.put16(at + 6, (control & capability).bits());
        self.writable16(at + 6, capability.bits());
        self
    }

    pub fn ats(mut self, invalidate_queue_depth: u8, page_aligned: bool) -> Self {
        let at = self.add_extended_capability(ext_cap_id::ATS, 1, 8);
        self.put16(
            at + 4,
            u16::from(invalidate_queue_depth & 0x1f) | if page_aligned { 1 << 5 } else { 0 },
        );
        self.writable16(at + 6, 0x801f);
        self
    }

    pub fn pri(mut self, outstanding_capacity: u32) -> Self {
        let at = self.add_extended_capability(ext_cap_id::PRI, 1, 16);
        self.put32(at + 8, outstanding_capacity);
        self.writable16(at + 4, 0x0003);
        self
    }

    pub fn pasid(mut self, max_width: u8, execute: bool, privileged: bool) -> Self {
        let at = self.add_extended_capability(ext_cap_id::PASID, 1, 8);
        let capability = (u16::from(max_width & 0x1f) << 8)
            | if execute { 1 << 1 } else { 0 }
            | if privileged { 1 << 2 } else { 0 };
        self.put16(at + 4, capability);
        self.writable16(at + 6, 0x0007);
        self
    }

    /// SR-IOV with VF routing: VF n has requester ID
    /// `PF + first_vf_offset + (n - 1) * vf_stride`.
    pub fn sriov(mut self, initial_vfs: u16, total_vfs: u16) -> Self {
        let at = self.add_extended_capability(ext_cap_id::SRIOV, 1, 0x40);
        self.put16(at + 0x0c, initial_vfs);
        self.put16(at + 0x0e, total_vfs);
        self.writable16(at + 0x10, 0xffff);
        self.put16(at + 0x14, 0x80);
        self.put16(at + 0x16, 2);
        self
    }

    /// ARI with the next function number of the device's chain.
    pub fn ari(mut self, next_function: u8) -> Self {
        let at = self.add_extended_capability(ext_cap_id::ARI, 1, 8);
        self.put16(at + 4, u16::from(next_function) << 8);
        self
    }

    /// Sets ARI Forwarding Enable in the PCI Express capability's Device
    /// Control 2 (call after [`FunctionBuilder::pcie`]).
    pub fn ari_forwarding(mut self) -> Self {
        if let Some(at) = self.pcie_at {
            let v = self.get16(at + 0x28) | (1 << 5);
            self.put16(at + 0x28, v);
        }
        self
    }

    /// Raw byte poke, for malformed images (looping capability lists…).
    pub fn raw8(mut self, offset: u16, value: u8) -> Self {
        self.put8(offset, value);
        self
    }

    pub fn raw16(mut self, offset: u16, value: u16) -> Self {
        self.put16(offset, value);
        self
    }

    pub fn raw32(mut self, offset: u16, value: u32) -> Self {
        self.put32(offset, value);
        self
    }

    /// Builds from a raw image (fuzzing); bytes beyond 4 KiB are ignored.
    pub fn from_image(bytes: &[u8]) -> Self {
        let mut b = Self::new(0, 0, 0, 0);
        b.image.iter_mut().for_each(|x| *x = 0);
        let n = bytes.len().min(SPACE);
        b.image[..n].copy_from_slice(&bytes[..n]);
        b.writable.iter_mut().for_each(|x| *x = 0xff);
        b
    }

    fn put8(&mut self, offset: u16, value: u8) {
        if let Some(b) = self.image.get_mut(usize::from(offset)) {
            *b = value;
        }
    }
    fn put16(&mut self, offset: u16, value: u16) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.put8(offset.wrapping_add(i as u16), b);
        }
    }
    fn put32(&mut self, offset: u16, value: u32) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.put8(offset.wrapping_add(i as u16), b);
        }
    }
    fn get16(&self, offset: u16) -> u16 {
        let o = usize::from(offset);
        u16::from_le_bytes([self.image[o], self.image[o + 1]])
    }
    fn get32(&self, offset: u16) -> u32 {
        let o = usize::from(offset);
        u32::from_le_bytes([
            self.image[o],
            self.image[o + 1],
            self.image[o + 2],
            self.image[o + 3],
        ])
    }
    fn writable16(&mut self, offset: u16, mask: u16) {
        for (i, b) in mask.to_le_bytes().into_iter().enumerate() {
            self.writable[usize::from(offset) + i] = b;
        }
    }
    fn writable32(&mut self, offset: u16, mask: u32) {
        for (i, b) in mask.to_le_bytes().into_iter().enumerate() {
            self.writable[usize::from(offset) + i] = b;
        }
    }
}

struct ModelFunction {
    image: Vec<u8>,
    writable: Vec<u8>,
    bar_slots: u8,
}

/// One configuration write the code under test made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigWrite {
    pub addr: PciAddress,
    pub offset: u16,
    pub value: u32,
}

/// The configuration space of a whole (model) machine.
#[derive(Default)]
pub struct ModelConfigSpace {
    functions: RefCell<BTreeMap<PciAddress, ModelFunction>>,
    writes: RefCell<Vec<ConfigWrite>>,
    sizing_while_decoding: Cell<u32>,
}

impl ModelConfigSpace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the function at `addr`.
    pub fn add(&self, addr: PciAddress, function: FunctionBuilder) -> &Self {
        self.functions.borrow_mut().insert(
            addr,
            ModelFunction {
                image: function.image,
                writable: function.writable,
                bar_slots: function.bar_slots,
            },
        );
        self
    }

    pub fn remove(&self, addr: PciAddress) {
        self.functions.borrow_mut().remove(&addr);
    }

    /// Every write made so far, oldest first.
    pub fn writes(&self) -> Vec<ConfigWrite> {
        self.writes.borrow().clone()
    }

    /// How many times all ones was written to a BAR while COMMAND had
    /// memory or I/O decode on (should stay zero).
    pub fn sizing_while_decoding(&self) -> u32 {
        self.sizing_while_decoding.get()
    }

    /// A function's image as it is now.
    pub fn snapshot(&self, addr: PciAddress) -> Option<Vec<u8>> {
        self.functions.borrow().get(&addr).map(|f| f.image.clone())
    }
}

impl ConfigSpace for ModelConfigSpace {
    fn read32(&self, addr: PciAddress, offset: u16) -> Result<u32, ConfigError> {
        check_offset(addr, offset, 4)?;
        let functions = self.functions.borrow();
        let Some(f) = functions.get(&addr) else {
            return Ok(0xffff_ffff);
        };
        let o = usize::from(offset);
        Ok(u32::from_le_bytes([
            f.image[o],
            f.image[o + 1],
            f.image[o + 2],
            f.image[o + 3],
        ]))
    }

    fn write32(&self, addr: PciAddress, offset: u16, value: u32) -> Result<(), ConfigError> {
        check_offset(addr, offset, 4)?;
        self.writes.borrow_mut().push(ConfigWrite {
            addr,
            offset,
            value,
        });
        let mut functions = self.functions.borrow_mut();
        let Some(f) = functions.get_mut(&addr) else {
            return Ok(());
        };
        let o = usize::from(offset);
        let bar_range = BAR0..BAR0 + 4 * u16::from(f.bar_slots);
        let command = u16::from_le_bytes([f.image[4], f.image[5]]);
        if bar_range.contains(&offset)
            && value == 0xffff_ffff
            && command & (COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE) != 0
        {
            self.sizing_while_decoding
                .set(self.sizing_while_decoding.get() + 1);
        }
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            let mask = f.writable[o + i];
            f.image[o + i] = (f.image[o + i] & !mask) | (b & mask);
        }
        Ok(())
    }
}
