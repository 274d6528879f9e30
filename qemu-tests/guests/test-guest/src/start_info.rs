//! The start-info block (`docs/boot-protocol.md`, "Start-info block"),
//! checked field by field: nothing in it is trusted to be in bounds.

use core::fmt;

pub const MAGIC: &[u8; 8] = b"SLUICEBI";
/// The version this guest understands; later versions only add header
/// fields, so higher ones are read too.
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 0x60;
/// The start-info area is 8 KiB (0x2000-0x3fff).
pub const MAX_SIZE: usize = 0x2000;
const REGION_SIZE: usize = 24;
const DEVICE_SIZE: usize = 16;

pub const MAX_REGIONS: usize = 32;
pub const MAX_DEVICES: usize = 32;
pub const MAX_ARGS: usize = 64;

/// Memory-map kinds.
pub mod region {
    pub const RAM: u32 = 1;
    pub const BOOT: u32 = 2;
    pub const IMAGE: u32 = 3;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    pub base: u64,
    pub length: u64,
    pub kind: u32,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.length)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Device {
    pub guest_bdf: u32,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class_code: u32,
    pub iommu_group: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartInfo {
    pub version: u32,
    pub abi_version: u32,
    pub image_start: u64,
    pub image_end: u64,
    pub ecam_base: u64,
    pub ecam_buses: u32,
    pub console_kind: u32,
    pub console_address: u64,
    regions: [Region; MAX_REGIONS],
    region_count: usize,
    devices: [Device; MAX_DEVICES],
    device_count: usize,
    args: [u8; MAX_ARGS],
    args_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    BadMagic,
    BadVersion(u32),
    BadSize(u32),
    /// An array or the arguments lie outside the block.
    OutOfBounds(&'static str),
    TooMany(&'static str, u32),
    BadArgs,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadMagic => f.write_str("bad magic"),
            Error::BadVersion(v) => write!(f, "version {v}, expected at least {VERSION}"),
            Error::BadSize(s) => write!(f, "total size {s} outside [{HEADER_SIZE}, {MAX_SIZE}]"),
            Error::OutOfBounds(what) => write!(f, "the {what} lies outside the block"),
            Error::TooMany(what, n) => write!(f, "{n} {what} entries, this guest takes fewer"),
            Error::BadArgs => f.write_str("the arguments are not printable ASCII"),
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

/// `offset + count * size` inside `total`, as a range.
fn array(offset: u64, count: u32, size: usize, total: usize) -> Option<(usize, usize)> {
    let offset = usize::try_from(offset).ok()?;
    let len = (count as usize).checked_mul(size)?;
    let end = offset.checked_add(len)?;
    (end <= total && (count == 0 || offset >= HEADER_SIZE)).then_some((offset, end))
}

impl StartInfo {
    /// Parses a block: `bytes` holds at least its header (more is ignored
    /// beyond the total size it declares).
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.get(..8) != Some(&MAGIC[..]) {
            return Err(Error::BadMagic);
        }
        let version = u32_at(bytes, 0x08);
        if version < VERSION {
            return Err(Error::BadVersion(version));
        }
        let size = u32_at(bytes, 0x0c);
        let total = size as usize;
        if !(HEADER_SIZE..=MAX_SIZE).contains(&total) || total > bytes.len() {
            return Err(Error::BadSize(size));
        }
        let bytes = &bytes[..total];
        let mut info = StartInfo {
            version,
            abi_version: u32_at(bytes, 0x10),
            image_start: u64_at(bytes, 0x18),
            image_end: u64_at(bytes, 0x20),
            ecam_base: u64_at(bytes, 0x28),
            ecam_buses: u32_at(bytes, 0x30),
            console_kind: u32_at(bytes, 0x34),
            console_address: u64_at(bytes, 0x38),
            regions: [Region::default(); MAX_REGIONS],
            region_count: 0,
            devices: [Device::default(); MAX_DEVICES],
            device_count: 0,
            args: [0; MAX_ARGS],
            args_len: 0,
        };
        let regions = u32_at(bytes, 0x40);
        let devices = u32_at(bytes, 0x44);
        if regions as usize > MAX_REGIONS {
            return Err(Error::TooMany("memory-map", regions));
        }
        if devices as usize > MAX_DEVICES {
            return Err(Error::TooMany("device", devices));
        }
        let (map_at, _) = array(u64_at(bytes, 0x48), regions, REGION_SIZE, total)
            .ok_or(Error::OutOfBounds("memory map"))?;
        let (dev_at, _) = array(u64_at(bytes, 0x50), devices, DEVICE_SIZE, total)
            .ok_or(Error::OutOfBounds("device list"))?;
        for i in 0..regions as usize {
            let o = map_at + i * REGION_SIZE;
            info.regions[i] = Region {
                base: u64_at(bytes, o),
                length: u64_at(bytes, o + 8),
                kind: u32_at(bytes, o + 16),
            };
        }
        info.region_count = regions as usize;
        for i in 0..devices as usize {
            let o = dev_at + i * DEVICE_SIZE;
            info.devices[i] = Device {
                guest_bdf: u32_at(bytes, o),
                vendor_id: u16_at(bytes, o + 4),
                device_id: u16_at(bytes, o + 6),
                class_code: u32_at(bytes, o + 8),
                iommu_group: u32_at(bytes, o + 12),
            };
        }
        info.device_count = devices as usize;
        // The arguments: offset and length at 0x58 (0 and 0 when none).
        let args_len = u32_at(bytes, 0x5c);
        if args_len as usize > MAX_ARGS {
            return Err(Error::TooMany("argument byte", args_len));
        }
        if args_len > 0 {
            let (at, end) = array(u64::from(u32_at(bytes, 0x58)), args_len, 1, total)
                .ok_or(Error::OutOfBounds("argument string"))?;
            let args = &bytes[at..end];
            if !args.iter().all(|b| b.is_ascii_graphic()) {
                return Err(Error::BadArgs);
            }
            info.args[..args.len()].copy_from_slice(args);
            info.args_len = args.len();
        }
        Ok(info)
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.region_count]
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices[..self.device_count]
    }

    /// The `args=` word (empty without one).
    pub fn args(&self) -> &str {
        // Checked to be ASCII when parsed.
        core::str::from_utf8(&self.args[..self.args_len]).unwrap_or("")
    }

    fn is_ram(kind: u32) -> bool {
        matches!(kind, region::RAM | region::BOOT | region::IMAGE)
    }

    /// Whether `[base, base + length)` is wholly inside one free-RAM region.
    pub fn is_free_ram(&self, base: u64, length: u64) -> bool {
        let Some(end) = base.checked_add(length) else {
            return false;
        };
        self.regions()
            .iter()
            .any(|r| r.kind == region::RAM && r.base <= base && end <= r.end())
    }

    /// The first page boundary at or after [`StartInfo::ram_end`].
    pub fn page_past_ram(&self) -> u64 {
        self.ram_end()
            .checked_next_multiple_of(0x1000)
            .unwrap_or(u64::MAX - 0xfff)
    }

    /// The first byte after the highest RAM of the VM.
    pub fn ram_end(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| Self::is_ram(r.kind))
            .map(Region::end)
            .max()
            .unwrap_or(0)
    }
}

/// Reads the block at `address` (identity-mapped RAM of the boot area).
#[cfg(not(test))]
pub fn read(address: u64) -> Result<StartInfo, Error> {
    // The whole area is RAM the protocol gives the guest; the block is
    // parsed inside it.
    // SAFETY: Sluice put the start-info area at `address` (RDI); nothing
    // writes it while this runs.
    let area = unsafe { core::slice::from_raw_parts(address as *const u8, MAX_SIZE) };
    StartInfo::parse(area)
}

#[cfg(test)]
pub fn read(_address: u64) -> Result<StartInfo, Error> {
    Err(Error::BadMagic)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block as Sluice writes it: one RAM region, one edu, `args`.
    fn block(args: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE + REGION_SIZE + DEVICE_SIZE];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[0x10..0x14].copy_from_slice(&1u32.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&0xe000_0000u64.to_le_bytes());
        b[0x30..0x34].copy_from_slice(&1u32.to_le_bytes());
        b[0x34..0x38].copy_from_slice(&1u32.to_le_bytes());
        b[0x38..0x40].copy_from_slice(&0xe9u64.to_le_bytes());
        b[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        b[0x44..0x48].copy_from_slice(&1u32.to_le_bytes());
        b[0x48..0x50].copy_from_slice(&0x60u64.to_le_bytes());
        b[0x50..0x58].copy_from_slice(&0x78u64.to_le_bytes());
        b[0x60..0x68].copy_from_slice(&0x10_0000u64.to_le_bytes());
        b[0x68..0x70].copy_from_slice(&0xf0_0000u64.to_le_bytes());
        b[0x70..0x74].copy_from_slice(&1u32.to_le_bytes());
        b[0x78..0x7c].copy_from_slice(&8u32.to_le_bytes());
        b[0x7c..0x80].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        b[0x84..0x88].copy_from_slice(&3u32.to_le_bytes());
        if !args.is_empty() {
            let at = b.len() as u32;
            b[0x58..0x5c].copy_from_slice(&at.to_le_bytes());
            b[0x5c..0x60].copy_from_slice(&(args.len() as u32).to_le_bytes());
            b.extend_from_slice(args);
            b.push(0);
        }
        let total = b.len() as u32;
        b[0x0c..0x10].copy_from_slice(&total.to_le_bytes());
        b
    }

    #[test]
    fn parses_what_sluice_writes() {
        let info = StartInfo::parse(&block(b"dma")).unwrap();
        assert_eq!(info.args(), "dma");
        assert_eq!((info.console_kind, info.console_address), (1, 0xe9));
        assert_eq!(info.ecam_base, 0xe000_0000);
        assert_eq!(
            info.devices(),
            [Device {
                guest_bdf: 8,
                vendor_id: 0x1234,
                device_id: 0x11e8,
                class_code: 0,
                iommu_group: 3
            }]
        );
        assert_eq!(info.ram_end(), 0x100_0000);
        assert!(info.is_free_ram(0x40_0000, 0x2000));
        assert!(!info.is_free_ram(0xff_f000, 0x2000));
        assert!(!info.is_free_ram(u64::MAX, 2));
        assert_eq!(StartInfo::parse(&block(b"")).unwrap().args(), "");
    }

    #[test]
    fn refuses_bad_blocks_without_panicking() {
        let good = block(b"dma");
        let patched = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            b
        };
        assert_eq!(StartInfo::parse(&good[..4]), Err(Error::BadMagic));
        assert_eq!(StartInfo::parse(&patched(0, b"X")), Err(Error::BadMagic));
        assert_eq!(
            StartInfo::parse(&patched(8, &0u32.to_le_bytes())),
            Err(Error::BadVersion(0))
        );
        assert_eq!(
            StartInfo::parse(&good[..0x70]),
            Err(Error::BadSize(good.len() as u32))
        );
        assert_eq!(
            StartInfo::parse(&patched(0x0c, &0x10u32.to_le_bytes())),
            Err(Error::BadSize(0x10))
        );
        assert_eq!(
            StartInfo::parse(&patched(0x48, &u64::MAX.to_le_bytes())),
            Err(Error::OutOfBounds("memory map"))
        );
        assert_eq!(
            StartInfo::parse(&patched(0x50, &0x10u64.to_le_bytes())),
            Err(Error::OutOfBounds("device list")),
            "an array over the header"
        );
        assert_eq!(
            StartInfo::parse(&patched(0x44, &u32::MAX.to_le_bytes())),
            Err(Error::TooMany("device", u32::MAX))
        );
        assert_eq!(
            StartInfo::parse(&patched(0x40, &2u32.to_le_bytes())),
            Err(Error::OutOfBounds("memory map"))
        );
        assert_eq!(
            StartInfo::parse(&patched(0x58, &0xfff0u32.to_le_bytes())),
            Err(Error::OutOfBounds("argument string"))
        );
        assert_eq!(
            StartInfo::parse(&patched(0x5c, &65u32.to_le_bytes())),
            Err(Error::TooMany("argument byte", 65))
        );
        let at = good.len() - 4;
        assert_eq!(StartInfo::parse(&patched(at, b"\n")), Err(Error::BadArgs));
        // A later version with a longer header still reads.
        let newer = patched(8, &2u32.to_le_bytes());
        assert_eq!(StartInfo::parse(&newer).unwrap().version, 2);
        // Every truncation and every single-byte corruption is an answer,
        // never a panic.
        for len in 0..good.len() {
            let _ = StartInfo::parse(&good[..len]);
        }
        for at in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let _ = StartInfo::parse(&patched(at, &[v]));
            }
        }
    }
}
