//! The header every ACPI system description table starts with (ACPI 6.5
//! §5.2.6), and little-endian field decoding from bytes.
//!
//! Tables come from firmware, so nothing here trusts a length or offset:
//! every read is bounds-checked and returns `None` past the end. Fields are
//! decoded from byte slices, never through references to packed structs.

use core::fmt;

/// Length of the standard header.
pub const SDT_HEADER_LEN: usize = 36;

/// Reads a little-endian `u8`/`u16`/`u32`/`u64` at `offset`, or `None` when
/// it would run past the end of `bytes`.
pub fn le_u8(bytes: &[u8], offset: usize) -> Option<u8> {
    bytes.get(offset).copied()
}

pub fn le_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let b = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

pub fn le_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub fn le_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    let b = bytes.get(offset..offset.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// The decoded standard header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdtHeader {
    pub signature: [u8; 4],
    pub length: u32,
    pub revision: u8,
    pub checksum: u8,
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: u32,
    pub creator_revision: u32,
}

/// Why a table was rejected as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdtError {
    /// Fewer bytes than the 36-byte header (or than the table's fixed part).
    TooShort {
        have: usize,
        need: usize,
    },
    BadSignature {
        expected: [u8; 4],
        found: [u8; 4],
    },
    /// The header's length field claims more bytes than were provided.
    LengthExceedsBuffer {
        length: u32,
        available: usize,
    },
    /// The header's length field is smaller than the table's fixed part.
    LengthTooSmall {
        length: u32,
        minimum: usize,
    },
    /// The bytes of the table do not sum to zero mod 256.
    BadChecksum {
        sum: u8,
    },
}

impl fmt::Display for SdtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { have, need } => {
                write!(f, "table too short: {have} bytes, need {need}")
            }
            Self::BadSignature { expected, found } => write!(
                f,
                "signature {:?} is not {:?}",
                core::str::from_utf8(found).unwrap_or("<non-ascii>"),
                core::str::from_utf8(expected).unwrap_or("<non-ascii>")
            ),
            Self::LengthExceedsBuffer { length, available } => write!(
                f,
                "header length {length} exceeds the {available} bytes available"
            ),
            Self::LengthTooSmall { length, minimum } => {
                write!(f, "header length {length} below the minimum {minimum}")
            }
            Self::BadChecksum { sum } => write!(f, "checksum fails (bytes sum to {sum:#04x})"),
        }
    }
}

/// Validates signature, length and checksum, and returns the header with
/// the table cut to its declared length. `minimum_len` is the table's fixed
/// part (header included).
pub fn parse_sdt<'a>(
    bytes: &'a [u8],
    signature: &[u8; 4],
    minimum_len: usize,
) -> Result<(SdtHeader, &'a [u8]), SdtError> {
    if bytes.len() < SDT_HEADER_LEN {
        return Err(SdtError::TooShort {
            have: bytes.len(),
            need: SDT_HEADER_LEN,
        });
    }
    let mut found = [0u8; 4];
    found.copy_from_slice(&bytes[0..4]);
    if &found != signature {
        return Err(SdtError::BadSignature {
            expected: *signature,
            found,
        });
    }
    let length = le_u32(bytes, 4).unwrap_or(0);
    let Ok(len) = usize::try_from(length) else {
        return Err(SdtError::LengthExceedsBuffer {
            length,
            available: bytes.len(),
        });
    };
    if len > bytes.len() {
        return Err(SdtError::LengthExceedsBuffer {
            length,
            available: bytes.len(),
        });
    }
    if len < minimum_len.max(SDT_HEADER_LEN) {
        return Err(SdtError::LengthTooSmall {
            length,
            minimum: minimum_len.max(SDT_HEADER_LEN),
        });
    }
    let table = &bytes[..len];
    let sum = table.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    if sum != 0 {
        return Err(SdtError::BadChecksum { sum });
    }
    let mut oem_id = [0u8; 6];
    oem_id.copy_from_slice(&table[10..16]);
    let mut oem_table_id = [0u8; 8];
    oem_table_id.copy_from_slice(&table[16..24]);
    let header = SdtHeader {
        signature: found,
        length,
        revision: table[8],
        checksum: table[9],
        oem_id,
        oem_table_id,
        oem_revision: le_u32(table, 24).unwrap_or(0),
        creator_id: le_u32(table, 28).unwrap_or(0),
        creator_revision: le_u32(table, 32).unwrap_or(0),
    };
    Ok((header, table))
}

/// The byte that makes `table` sum to zero when stored at offset 9 (for
/// building tables in tests and fixtures).
pub fn checksum_fixup(table: &[u8]) -> u8 {
    let sum = table
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 9)
        .fold(0u8, |s, (_, &b)| s.wrapping_add(b));
    0u8.wrapping_sub(sum)
}
