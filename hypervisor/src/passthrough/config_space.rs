//! The configuration space a guest sees for its passed-through devices.
//!
//! Per register of the type 0 header (PCI Local Bus Specification 3.0,
//! §6.1–6.2) and of the MSI / MSI-X capabilities (§6.8.1–6.8.2):
//!
//! | register | read | write |
//! | --- | --- | --- |
//! | vendor/device, revision/class, cache line, latency, BIST, subsystem, capabilities pointer, interrupt pin | host | dropped |
//! | header type | host, multi-function bit set when the guest slot has several functions | dropped |
//! | COMMAND | guest's value | I/O, memory, parity, SERR, INTx-disable go to the host; **bus master only while the device is bound** through iommufd |
//! | STATUS | host | write-1-to-clear error bits go to the host |
//! | BARs | the address Sluice chose (the size mask while the guest sizes) | all ones starts sizing; anything else is ignored: a guest never moves a BAR |
//! | expansion ROM, CardBus CIS | 0 | dropped |
//! | interrupt line | guest's value | kept, not written to the host |
//! | MSI: control enable/MME, address, data, mask | guest's values | recorded for the interrupt layer, never written to the host raw |
//! | MSI-X: control enable and function mask | guest's values | recorded, never written raw |
//! | other capabilities, extended space | host | dropped |
//!
//! Memory BARs are mapped into the guest page by page
//! ([`GuestPciBus::bar_mappings`]), minus the pages of the MSI-X table and
//! pending-bit array, which must fault to Sluice.
//!
//! Functions the guest does not own read as all ones and ignore writes,
//! like an empty slot.

use alloc::vec::Vec;

use sluice_pci::bar::{Bar, BarKind};
use sluice_pci::config::{
    BAR0, COMMAND, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, ConfigSpace,
    HEADER_TYPE, HEADER_TYPE_MULTI_FUNCTION,
};
use sluice_pci::{Bdf, Function, PciAddress};

use crate::vcpu::AccessSize;

/// COMMAND parity error response (bit 6), SERR# enable (8), INTx disable
/// (10).
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// COMMAND bits a guest controls.
const GUEST_COMMAND_BITS: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;
/// STATUS write-1-to-clear bits (PCI 3.0 §6.2.3): master data parity
/// error, signaled/received target abort, received master abort, signaled
/// system error, detected parity error.
const STATUS_W1C: u16 = 0xf900;
const EXPANSION_ROM: u16 = 0x30;
const CARDBUS_CIS: u16 = 0x28;
const INTERRUPT_LINE: u16 = 0x3c;

/// Why a passthrough bus could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughError {
    /// Two devices at the same guest BDF.
    DuplicateGuestBdf(Bdf),
    /// The guest BAR window cannot hold every memory BAR.
    BarWindowFull {
        device: PciAddress,
        bar: u8,
        size: u64,
    },
    /// Only type 0 functions can be passed through.
    NotAnEndpoint(PciAddress),
}

/// Where a memory BAR is mapped for the guest: the nested tables map
/// `guest..guest + size` to `host..host + size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    pub device: PciAddress,
    pub index: u8,
    pub guest: u64,
    pub host: u64,
    pub size: u64,
    pub prefetchable: bool,
}

/// An I/O BAR the guest reaches directly (the same ports as the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoPortRange {
    pub device: PciAddress,
    pub first: u16,
    pub count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GuestBar {
    bar: Bar,
    guest: u64,
    sizing_low: bool,
    sizing_high: bool,
}

impl GuestBar {
    fn flags(&self) -> u32 {
        match self.bar.kind {
            BarKind::Io => 1,
            BarKind::Memory32 => u32::from(self.bar.prefetchable) << 3,
            BarKind::Memory64 => 0b100 | u32::from(self.bar.prefetchable) << 3,
        }
    }
    fn mask(&self) -> u64 {
        !(self.bar.size.max(1) - 1)
    }
    fn low(&self) -> u32 {
        let address = if self.sizing_low {
            self.mask()
        } else {
            self.guest
        } as u32;
        let type_bits = if self.bar.kind == BarKind::Io { 3 } else { 0xf };
        (address & !type_bits) | self.flags()
    }
    fn high(&self) -> u32 {
        if self.sizing_high {
            (self.mask() >> 32) as u32
        } else {
            (self.guest >> 32) as u32
        }
    }
}

/// The guest's view of an MSI capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestMsi {
    pub enabled: bool,
    /// log2 of the vectors the guest enabled (Multiple Message Enable).
    pub vectors_log2: u8,
    pub address: u64,
    pub data: u16,
    /// Per-vector mask bits (0 without per-vector masking).
    pub mask: u32,
}

/// The guest's view of an MSI-X capability's control bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestMsix {
    pub enabled: bool,
    pub function_mask: bool,
}

#[derive(Debug, Clone, Copy)]
struct MsiShadow {
    offset: u16,
    is_64bit: bool,
    per_vector_masking: bool,
    state: GuestMsi,
}

impl MsiShadow {
    fn data_offset(&self) -> u16 {
        if self.is_64bit { 0x0c } else { 0x08 }
    }
    fn mask_offset(&self) -> Option<u16> {
        self.per_vector_masking
            .then_some(if self.is_64bit { 0x10 } else { 0x0c })
    }
}

/// MSI Message Control bits a guest writes: enable (0) and Multiple
/// Message Enable (6:4).
const MSI_CONTROL_GUEST: u16 = 0x0071;
/// MSI-X Message Control: function mask (14) and enable (15).
const MSIX_CONTROL_GUEST: u16 = 0xc000;

/// One passed-through function.
#[derive(Debug, Clone)]
pub struct PassthroughDevice {
    pub host: PciAddress,
    pub guest: Bdf,
    bars: Vec<GuestBar>,
    command: u16,
    interrupt_line: u8,
    bus_master_allowed: bool,
    multi_function: bool,
    msi: Option<MsiShadow>,
    msix: Option<(u16, GuestMsix)>,
    /// (BAR index, byte offset, length) of the MSI-X table and PBA.
    msix_structures: Vec<(u8, u64, u64)>,
}

impl PassthroughDevice {
    pub fn bus_master_allowed(&self) -> bool {
        self.bus_master_allowed
    }
    /// The COMMAND value the guest sees.
    pub fn guest_command(&self) -> u16 {
        self.command
    }
    pub fn msi(&self) -> Option<GuestMsi> {
        self.msi.map(|m| m.state)
    }
    pub fn msix(&self) -> Option<GuestMsix> {
        self.msix.map(|m| m.1)
    }
}

/// The passed-through functions of one VM and the host configuration
/// space behind them.
pub struct GuestPciBus<C: ConfigSpace> {
    host: C,
    devices: Vec<PassthroughDevice>,
    /// Guest BDFs whose MSI/MSI-X state changed since the last
    /// [`GuestPciBus::take_interrupt_changes`].
    interrupt_changes: Vec<Bdf>,
}

impl<C: ConfigSpace> GuestPciBus<C> {
    /// A bus with `functions` (host function from enumeration, guest BDF)
    /// whose memory BARs are placed in `[window_base, window_base +
    /// window_size)`, largest first, each naturally aligned. I/O BARs keep
    /// their host ports.
    pub fn new(
        host: C,
        functions: &[(&Function, Bdf)],
        window_base: u64,
        window_size: u64,
    ) -> Result<Self, PassthroughError> {
        let mut devices: Vec<PassthroughDevice> = Vec::new();
        for &(f, guest) in functions {
            if f.is_bridge() {
                return Err(PassthroughError::NotAnEndpoint(f.addr));
            }
            if devices.iter().any(|d| d.guest == guest) {
                return Err(PassthroughError::DuplicateGuestBdf(guest));
            }
            let msi = f.caps.msi.map(|m| MsiShadow {
                offset: m.offset,
                is_64bit: m.is_64bit,
                per_vector_masking: m.per_vector_masking,
                state: GuestMsi::default(),
            });
            devices.push(PassthroughDevice {
                host: f.addr,
                guest,
                bars: f
                    .bars
                    .iter()
                    .map(|&bar| GuestBar {
                        bar,
                        guest: if bar.kind == BarKind::Io {
                            bar.address
                        } else {
                            0
                        },
                        sizing_low: false,
                        sizing_high: false,
                    })
                    .collect(),
                command: 0,
                interrupt_line: 0xff,
                bus_master_allowed: false,
                multi_function: false,
                msi,
                msix: f.caps.msix.map(|m| (m.offset, GuestMsix::default())),
                msix_structures: f
                    .caps
                    .msix
                    .map(|m| {
                        // Table: 16 bytes per entry; PBA: one bit per entry
                        // in qwords (PCI 3.0 §6.8.2).
                        let entries = u64::from(m.table_size);
                        alloc::vec![
                            (m.table_bir, u64::from(m.table_offset), entries * 16),
                            (m.pba_bir, u64::from(m.pba_offset), entries.div_ceil(64) * 8),
                        ]
                    })
                    .unwrap_or_default(),
            });
        }
        let slots: Vec<u8> = devices.iter().map(|d| d.guest.devfn() >> 3).collect();
        for (i, d) in devices.iter_mut().enumerate() {
            d.multi_function = slots
                .iter()
                .enumerate()
                .any(|(j, &s)| j != i && s == slots[i]);
        }
        place_bars(&mut devices, window_base, window_size)?;
        Ok(Self {
            host,
            devices,
            interrupt_changes: Vec::new(),
        })
    }

    pub fn devices(&self) -> &[PassthroughDevice] {
        &self.devices
    }

    pub fn device(&self, guest: Bdf) -> Option<&PassthroughDevice> {
        self.devices.iter().find(|d| d.guest == guest)
    }

    pub fn host(&self) -> &C {
        &self.host
    }

    /// Memory BARs to map into the guest's nested tables, as page ranges.
    ///
    /// Left out, so that guest accesses fault to Sluice instead:
    /// * BARs smaller than a page (mapping their page would expose
    ///   whatever else shares it);
    /// * the pages holding a device's MSI-X table and pending-bit array:
    ///   a guest writing raw MSI addresses there could make the device
    ///   write anywhere in the interrupt window.
    pub fn bar_mappings(&self) -> Vec<BarMapping> {
        let mut out = Vec::new();
        for d in &self.devices {
            for b in &d.bars {
                if b.bar.kind == BarKind::Io || b.bar.size < 4096 {
                    continue;
                }
                // Page ranges of this BAR that must stay unmapped.
                let mut holes: Vec<(u64, u64)> = d
                    .msix_structures
                    .iter()
                    .filter(|&&(bir, _, len)| bir == b.bar.index && len > 0)
                    .map(|&(_, offset, len)| {
                        let start = offset & !0xfff;
                        let end = offset.saturating_add(len).next_multiple_of(4096);
                        (start, end.min(b.bar.size))
                    })
                    .collect();
                holes.sort_unstable();
                let mut at = 0u64;
                let mut pieces = Vec::new();
                for (start, end) in holes {
                    if start > at {
                        pieces.push((at, start));
                    }
                    at = at.max(end);
                }
                if at < b.bar.size {
                    pieces.push((at, b.bar.size));
                }
                for (start, end) in pieces {
                    out.push(BarMapping {
                        device: d.host,
                        index: b.bar.index,
                        guest: b.guest + start,
                        host: b.bar.address + start,
                        size: end - start,
                        prefetchable: b.bar.prefetchable,
                    });
                }
            }
        }
        out
    }

    /// I/O BARs to open in the I/O permission map.
    pub fn io_ranges(&self) -> Vec<IoPortRange> {
        let mut out = Vec::new();
        for d in &self.devices {
            for b in d.bars.iter().filter(|b| b.bar.kind == BarKind::Io) {
                if let Ok(first) = u16::try_from(b.bar.address) {
                    out.push(IoPortRange {
                        device: d.host,
                        first,
                        count: b.bar.size.min(0x1_0000) as u32,
                    });
                }
            }
        }
        out
    }

    /// Called by the iommufd layer: `allowed` while the device at `guest`
    /// is bound (`DEVICE_BIND` … `DEVICE_UNBIND`). Revoking clears bus
    /// mastering on the host at once, so the device stops DMA before it
    /// leaves its IOMMU domain.
    pub fn set_bus_master_allowed(&mut self, guest: Bdf, allowed: bool) {
        let Some(i) = self.devices.iter().position(|d| d.guest == guest) else {
            return;
        };
        self.devices[i].bus_master_allowed = allowed;
        if !allowed && self.devices[i].command & COMMAND_BUS_MASTER != 0 {
            self.devices[i].command &= !COMMAND_BUS_MASTER;
            let command = self.devices[i].command;
            self.write_host_command(i, command);
        }
    }

    /// Guest BDFs whose MSI or MSI-X settings changed since the last call.
    pub fn take_interrupt_changes(&mut self) -> Vec<Bdf> {
        core::mem::take(&mut self.interrupt_changes)
    }

    fn write_host_command(&self, i: usize, guest_command: u16) {
        let d = &self.devices[i];
        let host = match self.host.read16(d.host, COMMAND) {
            Ok(v) => v,
            Err(e) => {
                log::error!("{}: reading COMMAND failed: {e}", d.host);
                return;
            }
        };
        let value = (host & !GUEST_COMMAND_BITS) | (guest_command & GUEST_COMMAND_BITS);
        if let Err(e) = self.host.write16(d.host, COMMAND, value) {
            log::error!("{}: writing COMMAND failed: {e}", d.host);
        }
    }

    fn host_dword(&self, d: &PassthroughDevice, offset: u16) -> u32 {
        self.host.read32(d.host, offset).unwrap_or(u32::MAX)
    }

    /// The dword the guest sees at `offset` (dword aligned).
    fn read_dword(&self, d: &PassthroughDevice, offset: u16) -> u32 {
        match offset {
            COMMAND => {
                let status = self.host_dword(d, COMMAND) & 0xffff_0000;
                status | u32::from(d.command)
            }
            // Cache line, latency timer, header type (byte 2), BIST.
            o if o == HEADER_TYPE & !3 => {
                let v = self.host_dword(d, o);
                let ht = (((v >> 16) as u8) & !HEADER_TYPE_MULTI_FUNCTION)
                    | if d.multi_function {
                        HEADER_TYPE_MULTI_FUNCTION
                    } else {
                        0
                    };
                (v & 0xff00_ffff) | (u32::from(ht) << 16)
            }
            o if (BAR0..BAR0 + 24).contains(&o) => {
                let slot = ((o - BAR0) / 4) as u8;
                for b in &d.bars {
                    if b.bar.index == slot {
                        return b.low();
                    }
                    if b.bar.kind == BarKind::Memory64 && b.bar.index + 1 == slot {
                        return b.high();
                    }
                }
                0
            }
            CARDBUS_CIS | EXPANSION_ROM => 0,
            INTERRUPT_LINE => {
                (self.host_dword(d, INTERRUPT_LINE) & !0xff) | u32::from(d.interrupt_line)
            }
            o => {
                let host = self.host_dword(d, o);
                self.capability_view(d, o, host)
            }
        }
    }

    /// Overlays the guest's MSI / MSI-X state on the host dword at `o`.
    fn capability_view(&self, d: &PassthroughDevice, o: u16, host: u32) -> u32 {
        if let Some(m) = &d.msi {
            let rel = o.wrapping_sub(m.offset);
            let s = &m.state;
            if rel == 0 {
                let control = (u32::from(s.enabled)) | (u32::from(s.vectors_log2 & 7) << 4);
                return (host & !(u32::from(MSI_CONTROL_GUEST) << 16)) | (control << 16);
            }
            if rel == 4 {
                return s.address as u32 & !3;
            }
            if m.is_64bit && rel == 8 {
                return (s.address >> 32) as u32;
            }
            if rel == m.data_offset() {
                return u32::from(s.data);
            }
            if Some(rel) == m.mask_offset() {
                return s.mask;
            }
        }
        if let Some((offset, x)) = &d.msix
            && o == *offset
        {
            let control = (u32::from(x.function_mask) << 14) | (u32::from(x.enabled) << 15);
            return (host & !(u32::from(MSIX_CONTROL_GUEST) << 16)) | (control << 16);
        }
        host
    }

    /// A guest read of `size` bytes at `offset` of guest function `guest`.
    /// Misaligned or 8-byte accesses and unowned functions read all ones.
    pub fn read(&self, guest: Bdf, offset: u16, size: AccessSize) -> u32 {
        let width = u16::from(size.bytes());
        if size == AccessSize::Qword || !offset.is_multiple_of(width) || offset >= 4096 {
            return all_ones(size);
        }
        let Some(d) = self.device(guest) else {
            return all_ones(size);
        };
        let dword = self.read_dword(d, offset & !3);
        ((u64::from(dword) >> ((offset & 3) * 8)) & size.mask()) as u32
    }

    /// A guest write of `size` bytes of `value` at `offset`.
    pub fn write(&mut self, guest: Bdf, offset: u16, size: AccessSize, value: u32) {
        let width = u16::from(size.bytes());
        if size == AccessSize::Qword || !offset.is_multiple_of(width) || offset >= 4096 {
            log::debug!("guest {guest}: config write of {width} bytes at {offset:#x} dropped");
            return;
        }
        let Some(i) = self.devices.iter().position(|d| d.guest == guest) else {
            return;
        };
        let shift = u32::from(offset & 3) * 8;
        let lanes = (size.mask() as u32) << shift;
        let value = (value << shift) & lanes;
        self.write_dword(i, offset & !3, value, lanes);
    }

    /// Applies the bytes of `value` selected by `lanes` to the dword at
    /// `offset`.
    fn write_dword(&mut self, i: usize, offset: u16, value: u32, lanes: u32) {
        let host = self.devices[i].host;
        match offset {
            COMMAND => {
                if lanes & 0xffff != 0 {
                    let old = self.devices[i].command;
                    let mut new = (old & !(lanes as u16)) | (value as u16);
                    new &= GUEST_COMMAND_BITS;
                    if new & COMMAND_BUS_MASTER != 0 && !self.devices[i].bus_master_allowed {
                        log::warn!(
                            "guest {}: bus mastering refused for {host}: the device is not bound through iommufd",
                            self.devices[i].guest
                        );
                        new &= !COMMAND_BUS_MASTER;
                    }
                    self.devices[i].command = new;
                    self.write_host_command(i, new);
                }
                let clear = ((value >> 16) as u16) & STATUS_W1C;
                if lanes & 0xffff_0000 != 0 && clear != 0 {
                    let command = self.host.read16(host, COMMAND).unwrap_or(0);
                    let dword = u32::from(command) | (u32::from(clear) << 16);
                    if let Err(e) = self.host.write32(host, COMMAND, dword) {
                        log::error!("{host}: clearing STATUS failed: {e}");
                    }
                }
            }
            o if (BAR0..BAR0 + 24).contains(&o) => {
                let slot = ((o - BAR0) / 4) as u8;
                let d = &mut self.devices[i];
                let sizing = lanes == u32::MAX && value == u32::MAX;
                for b in &mut d.bars {
                    let (which, current) = if b.bar.index == slot {
                        (0, b.guest as u32)
                    } else if b.bar.kind == BarKind::Memory64 && b.bar.index + 1 == slot {
                        (1, (b.guest >> 32) as u32)
                    } else {
                        continue;
                    };
                    if which == 0 {
                        b.sizing_low = sizing;
                    } else {
                        b.sizing_high = sizing;
                    }
                    let keep = if which == 0 { !0xf } else { u32::MAX };
                    if !sizing && (value & lanes & keep) != (current & lanes & keep) {
                        log::info!(
                            "guest {}: write {value:#x} to BAR slot {slot} of {host} ignored; the BAR stays where Sluice placed it",
                            d.guest
                        );
                    }
                }
            }
            INTERRUPT_LINE => {
                if lanes & 0xff != 0 {
                    self.devices[i].interrupt_line = value as u8;
                }
            }
            o => {
                if !self.write_capability(i, o, value, lanes) {
                    log::debug!(
                        "guest {}: config write at {o:#x} (lanes {lanes:#x}) of {host} dropped",
                        self.devices[i].guest
                    );
                }
            }
        }
    }

    /// MSI / MSI-X writes; false if `o` is not theirs.
    fn write_capability(&mut self, i: usize, o: u16, value: u32, lanes: u32) -> bool {
        let guest = self.devices[i].guest;
        let d = &mut self.devices[i];
        let merge = |old: u32| (old & !lanes) | (value & lanes);
        if let Some(m) = &mut d.msi
            && o >= m.offset
            && o - m.offset < 0x18
        {
            let rel = o - m.offset;
            let data_offset = m.data_offset();
            let mask_offset = m.mask_offset();
            let s = &mut m.state;
            let before = *s;
            if rel == 0 {
                let control =
                    (merge((u32::from(s.enabled) | (u32::from(s.vectors_log2) << 4)) << 16) >> 16)
                        as u16;
                s.enabled = control & 1 != 0;
                s.vectors_log2 = ((control >> 4) & 7) as u8;
            } else if rel == 4 {
                s.address = (s.address & !0xffff_ffff) | u64::from(merge(s.address as u32) & !3);
            } else if m.is_64bit && rel == 8 {
                s.address =
                    (s.address & 0xffff_ffff) | (u64::from(merge((s.address >> 32) as u32)) << 32);
            } else if rel == data_offset {
                s.data = merge(u32::from(s.data)) as u16;
            } else if Some(rel) == mask_offset {
                s.mask = merge(s.mask);
            } else {
                return false;
            }
            if *s != before && !self.interrupt_changes.contains(&guest) {
                self.interrupt_changes.push(guest);
            }
            return true;
        }
        if let Some((offset, x)) = &mut d.msix
            && o == *offset
        {
            let before = *x;
            let old = ((u32::from(x.function_mask) << 14) | (u32::from(x.enabled) << 15)) << 16;
            let control = (merge(old) >> 16) as u16;
            x.function_mask = control & (1 << 14) != 0;
            x.enabled = control & (1 << 15) != 0;
            if *x != before && !self.interrupt_changes.contains(&guest) {
                self.interrupt_changes.push(guest);
            }
            return true;
        }
        // Everything else in the header is read-only for guests, as are
        // other capabilities and the extended space.
        false
    }
}

fn all_ones(size: AccessSize) -> u32 {
    size.mask() as u32
}

/// Places every memory BAR in the window, largest first, naturally
/// aligned (a BAR's address is a multiple of its size, PCI 3.0 §6.2.5.1).
fn place_bars(
    devices: &mut [PassthroughDevice],
    window_base: u64,
    window_size: u64,
) -> Result<(), PassthroughError> {
    let mut order: Vec<(usize, usize)> = Vec::new();
    for (di, d) in devices.iter().enumerate() {
        for (bi, b) in d.bars.iter().enumerate() {
            if b.bar.kind != BarKind::Io {
                order.push((di, bi));
            }
        }
    }
    order.sort_by_key(|&(di, bi)| core::cmp::Reverse(devices[di].bars[bi].bar.size));
    let end = window_base.saturating_add(window_size);
    let mut next = window_base;
    for (di, bi) in order {
        let bar = devices[di].bars[bi].bar;
        // Sub-page BARs still get a page of their own in the guest's view.
        let size = bar.size.max(4096);
        let at = next
            .checked_next_multiple_of(size)
            .filter(|&a| a.checked_add(size).is_some_and(|e| e <= end))
            .filter(|&a| bar.kind == BarKind::Memory64 || a + size <= 1 << 32)
            .ok_or(PassthroughError::BarWindowFull {
                device: devices[di].host,
                bar: bar.index,
                size: bar.size,
            })?;
        devices[di].bars[bi].guest = at;
        next = at + size;
    }
    Ok(())
}
