//! ITS commands (Arm IHI 0069, 5.3 "ITS commands"), 32 bytes each: four
//! little-endian doublewords DW0-DW3.
//!
//! Field positions (5.3.1-5.3.25, the command descriptions): the command
//! number in DW0 bits 7:0; DeviceID in DW0 bits 63:32; EventID in DW1 bits
//! 31:0; pINTID in DW1 bits 63:32 (MAPTI); Size in DW1 bits 4:0 (MAPD:
//! EventID bits minus one); ICID in DW2 bits 15:0; RDbase in DW2 bits
//! 51:16 (MAPC, SYNC; MOVALL's second in DW3); ITT_addr in DW2 bits 51:8
//! (MAPD); the valid bit V in DW2 bit 63 (MAPC, MAPD).

use core::fmt;

use sluice_hal::PhysAddr;

/// Command numbers (5.3, table "ITS commands").
pub mod opcode {
    pub const MOVI: u8 = 0x01;
    pub const INT: u8 = 0x03;
    pub const CLEAR: u8 = 0x04;
    pub const SYNC: u8 = 0x05;
    pub const MAPD: u8 = 0x08;
    pub const MAPC: u8 = 0x09;
    pub const MAPTI: u8 = 0x0a;
    pub const MAPI: u8 = 0x0b;
    pub const INV: u8 = 0x0c;
    pub const INVALL: u8 = 0x0d;
    pub const MOVALL: u8 = 0x0e;
    pub const DISCARD: u8 = 0x0f;

    /// The spec's name of a command, for logs.
    pub const fn name(op: u8) -> &'static str {
        match op {
            MOVI => "MOVI",
            INT => "INT",
            CLEAR => "CLEAR",
            SYNC => "SYNC",
            MAPD => "MAPD",
            MAPC => "MAPC",
            MAPTI => "MAPTI",
            MAPI => "MAPI",
            INV => "INV",
            INVALL => "INVALL",
            MOVALL => "MOVALL",
            DISCARD => "DISCARD",
            _ => "unknown ITS command",
        }
    }
}

/// A redistributor as ITS commands name it (the RDbase field, 5.3): with
/// GITS_TYPER.PTA = 0 its GICR_TYPER.Processor_Number, with PTA = 1 its
/// physical address, which is 64 KiB aligned, shifted right by 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RdBase {
    /// PTA = 0: GICR_TYPER.Processor_Number.
    Processor(u16),
    /// PTA = 1: the redistributor's physical address (its RD_base frame).
    Address(u64),
}

impl RdBase {
    /// Bits 51:16 of the RDbase field.
    pub const FIELD_MASK: u64 = 0x000f_ffff_ffff_0000;

    /// The value the command carries in bits 51:16 (already shifted).
    pub const fn field(self) -> u64 {
        match self {
            Self::Processor(n) => ((n as u64) << 16) & Self::FIELD_MASK,
            Self::Address(pa) => pa & Self::FIELD_MASK,
        }
    }

    /// Decodes bits 51:16 of a doubleword as the ITS with `pta` reads them.
    pub const fn from_field(dw: u64, pta: bool) -> Self {
        if pta {
            Self::Address(dw & Self::FIELD_MASK)
        } else {
            Self::Processor(((dw & Self::FIELD_MASK) >> 16) as u16)
        }
    }

    /// Whether this form is the one an ITS with GITS_TYPER.PTA = `pta`
    /// understands, and is encodable (an address must be 64 KiB aligned
    /// and below 2^52).
    pub const fn fits(self, pta: bool) -> bool {
        match self {
            Self::Processor(_) => !pta,
            Self::Address(pa) => pta && pa & !Self::FIELD_MASK == 0,
        }
    }
}

impl fmt::Display for RdBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Processor(n) => write!(f, "redistributor of processor {n}"),
            Self::Address(pa) => write!(f, "redistributor at {pa:#x}"),
        }
    }
}

/// One ITS command, 32 bytes.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct ItsCommand([u64; 4]);

const _: () = assert!(core::mem::size_of::<ItsCommand>() == 32);

/// A command decoded field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    Movi {
        device: u32,
        event: u32,
        icid: u16,
    },
    Int {
        device: u32,
        event: u32,
    },
    Clear {
        device: u32,
        event: u32,
    },
    Sync {
        rd: u64,
    },
    Mapd {
        device: u32,
        /// Size + 1: EventID bits of the device's ITT.
        event_bits: u32,
        itt: u64,
        valid: bool,
    },
    Mapc {
        icid: u16,
        rd: u64,
        valid: bool,
    },
    Mapti {
        device: u32,
        event: u32,
        lpi: u32,
        icid: u16,
    },
    Mapi {
        device: u32,
        event: u32,
        icid: u16,
    },
    Inv {
        device: u32,
        event: u32,
    },
    Invall {
        icid: u16,
    },
    Movall {
        from: u64,
        to: u64,
    },
    Discard {
        device: u32,
        event: u32,
    },
}

impl ItsCommand {
    /// MAPD Size field, DW1 bits 4:0.
    const SIZE_MASK: u64 = 0x1f;
    /// MAPD ITT_addr, DW2 bits 51:8.
    pub const ITT_ADDR_MASK: u64 = 0x000f_ffff_ffff_ff00;
    /// V, DW2 bit 63.
    const VALID: u64 = 1 << 63;
    const ICID_MASK: u64 = 0xffff;

    pub const fn from_words(words: [u64; 4]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 4] {
        self.0
    }
    pub const fn opcode(&self) -> u8 {
        self.0[0] as u8
    }
    pub const fn name(&self) -> &'static str {
        opcode::name(self.opcode())
    }

    const fn dw0(op: u8, device: u32) -> u64 {
        op as u64 | ((device as u64) << 32)
    }

    /// MAPD (5.3.8) with V = 1: `device`'s events are translated through
    /// the ITT at `itt` (256-byte aligned) covering 2^`event_bits`
    /// EventIDs (1 ≤ `event_bits` ≤ 32; Size = `event_bits` − 1).
    pub const fn mapd(device: u32, itt: PhysAddr, event_bits: u32) -> Self {
        Self([
            Self::dw0(opcode::MAPD, device),
            (event_bits.saturating_sub(1) as u64) & Self::SIZE_MASK,
            Self::VALID | (itt.as_u64() & Self::ITT_ADDR_MASK),
            0,
        ])
    }

    /// MAPD with V = 0: `device` is no longer translated.
    pub const fn unmapd(device: u32) -> Self {
        Self([Self::dw0(opcode::MAPD, device), 0, 0, 0])
    }

    /// MAPC (5.3.9) with V = 1: collection `icid` targets `rd`.
    pub const fn mapc(icid: u16, rd: RdBase) -> Self {
        Self([
            opcode::MAPC as u64,
            0,
            Self::VALID | rd.field() | icid as u64,
            0,
        ])
    }

    /// MAPC with V = 0: collection `icid` is unmapped.
    pub const fn unmapc(icid: u16) -> Self {
        Self([opcode::MAPC as u64, 0, icid as u64, 0])
    }

    /// MAPTI (5.3.11): (`device`, `event`) → LPI `lpi` in collection
    /// `icid`.
    pub const fn mapti(device: u32, event: u32, lpi: u32, icid: u16) -> Self {
        Self([
            Self::dw0(opcode::MAPTI, device),
            event as u64 | ((lpi as u64) << 32),
            icid as u64,
            0,
        ])
    }

    /// MAPI (5.3.10): (`device`, `event`) → LPI number `event` in
    /// collection `icid`.
    pub const fn mapi(device: u32, event: u32, icid: u16) -> Self {
        Self([
            Self::dw0(opcode::MAPI, device),
            event as u64,
            icid as u64,
            0,
        ])
    }

    const fn device_event(op: u8, device: u32, event: u32) -> Self {
        Self([Self::dw0(op, device), event as u64, 0, 0])
    }

    /// INV (5.3.6): the redistributor re-reads the configuration of the
    /// LPI (`device`, `event`) maps to.
    pub const fn inv(device: u32, event: u32) -> Self {
        Self::device_event(opcode::INV, device, event)
    }

    /// INVALL (5.3.7): every LPI configuration cached for collection
    /// `icid` is re-read.
    pub const fn invall(icid: u16) -> Self {
        Self([opcode::INVALL as u64, 0, icid as u64, 0])
    }

    /// SYNC (5.3.22): every earlier command's effect on `rd` is visible
    /// before this command completes.
    pub const fn sync(rd: RdBase) -> Self {
        Self([opcode::SYNC as u64, 0, rd.field(), 0])
    }

    /// DISCARD (5.3.4): the mapping of (`device`, `event`) is removed and
    /// its LPI's pending state cleared.
    pub const fn discard(device: u32, event: u32) -> Self {
        Self::device_event(opcode::DISCARD, device, event)
    }

    /// MOVI (5.3.15): (`device`, `event`) moves to collection `icid`.
    pub const fn movi(device: u32, event: u32, icid: u16) -> Self {
        Self([
            Self::dw0(opcode::MOVI, device),
            event as u64,
            icid as u64,
            0,
        ])
    }

    /// MOVALL (5.3.14): every LPI pending on `from` moves to `to`.
    pub const fn movall(from: RdBase, to: RdBase) -> Self {
        Self([opcode::MOVALL as u64, 0, from.field(), to.field()])
    }

    /// CLEAR (5.3.3): the LPI (`device`, `event`) maps to stops being
    /// pending.
    pub const fn clear(device: u32, event: u32) -> Self {
        Self::device_event(opcode::CLEAR, device, event)
    }

    /// INT (5.3.5): the LPI (`device`, `event`) maps to becomes pending,
    /// as if the device had written its MSI.
    pub const fn int(device: u32, event: u32) -> Self {
        Self::device_event(opcode::INT, device, event)
    }

    /// Decodes the command, or returns its unknown command number.
    /// RDbase fields come back raw (bits 51:16 in place); interpret them
    /// with [`RdBase::from_field`].
    pub const fn decode(&self) -> Result<Decoded, u8> {
        let [dw0, dw1, dw2, dw3] = self.0;
        let device = (dw0 >> 32) as u32;
        let event = dw1 as u32;
        let icid = (dw2 & Self::ICID_MASK) as u16;
        let valid = dw2 & Self::VALID != 0;
        Ok(match self.opcode() {
            opcode::MOVI => Decoded::Movi {
                device,
                event,
                icid,
            },
            opcode::INT => Decoded::Int { device, event },
            opcode::CLEAR => Decoded::Clear { device, event },
            opcode::SYNC => Decoded::Sync {
                rd: dw2 & RdBase::FIELD_MASK,
            },
            opcode::MAPD => Decoded::Mapd {
                device,
                event_bits: (dw1 & Self::SIZE_MASK) as u32 + 1,
                itt: dw2 & Self::ITT_ADDR_MASK,
                valid,
            },
            opcode::MAPC => Decoded::Mapc {
                icid,
                rd: dw2 & RdBase::FIELD_MASK,
                valid,
            },
            opcode::MAPTI => Decoded::Mapti {
                device,
                event,
                lpi: (dw1 >> 32) as u32,
                icid,
            },
            opcode::MAPI => Decoded::Mapi {
                device,
                event,
                icid,
            },
            opcode::INV => Decoded::Inv { device, event },
            opcode::INVALL => Decoded::Invall { icid },
            opcode::MOVALL => Decoded::Movall {
                from: dw2 & RdBase::FIELD_MASK,
                to: dw3 & RdBase::FIELD_MASK,
            },
            opcode::DISCARD => Decoded::Discard { device, event },
            other => return Err(other),
        })
    }
}

impl fmt::Debug for ItsCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Ok(d) => write!(f, "{d:?}"),
            Err(op) => write!(f, "ItsCommand(unknown {op:#04x}, {:#x?})", self.0),
        }
    }
}

impl fmt::Display for ItsCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Ok(Decoded::Mapd {
                device,
                event_bits,
                itt,
                valid: true,
            }) => write!(
                f,
                "MAPD DeviceID {device:#x} ({event_bits} EventID bits, ITT {itt:#x})"
            ),
            Ok(Decoded::Mapd { device, .. }) => write!(f, "MAPD DeviceID {device:#x} V=0"),
            Ok(Decoded::Mapc { icid, valid, .. }) => {
                write!(f, "MAPC ICID {icid}{}", if valid { "" } else { " V=0" })
            }
            Ok(Decoded::Mapti {
                device,
                event,
                lpi,
                icid,
            }) => write!(
                f,
                "MAPTI DeviceID {device:#x} EventID {event} → LPI {lpi} (ICID {icid})"
            ),
            Ok(
                Decoded::Int { device, event }
                | Decoded::Clear { device, event }
                | Decoded::Inv { device, event }
                | Decoded::Discard { device, event }
                | Decoded::Movi { device, event, .. }
                | Decoded::Mapi { device, event, .. },
            ) => write!(f, "{} DeviceID {device:#x} EventID {event}", self.name()),
            Ok(Decoded::Invall { icid }) => write!(f, "INVALL ICID {icid}"),
            Ok(Decoded::Sync { rd }) => write!(f, "SYNC RDbase {:#x}", rd >> 16),
            Ok(Decoded::Movall { .. }) => f.write_str("MOVALL"),
            Err(op) => write!(f, "unknown ITS command {op:#04x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapd_places_device_size_itt_and_valid() {
        let c = ItsCommand::mapd(0x0018, PhysAddr::new(0x1_2345_6700), 5).words();
        assert_eq!(c[0], 0x0000_0018_0000_0008, "DeviceID 63:32, command 0x08");
        assert_eq!(c[1], 4, "Size = EventID bits - 1 in 4:0");
        assert_eq!(c[2], (1 << 63) | 0x1_2345_6700, "V bit 63, ITT_addr 51:8");
        assert_eq!(c[3], 0);
        // ITT_addr keeps only bits 51:8.
        let c = ItsCommand::mapd(1, PhysAddr::new(0xfff0_0000_0000_00ff), 32).words();
        assert_eq!(c[2], (1 << 63), "{:#x}", c[2]);
        assert_eq!(c[1], 31);
        let u = ItsCommand::unmapd(0xffff_ffff).words();
        assert_eq!(u, [0xffff_ffff_0000_0008, 0, 0, 0]);
    }

    #[test]
    fn mapc_rdbase_follows_pta() {
        // PTA = 0: processor number in bits 51:16.
        let c = ItsCommand::mapc(3, RdBase::Processor(2)).words();
        assert_eq!(c[0], 0x09);
        assert_eq!(c[2], (1 << 63) | (2 << 16) | 3);
        // PTA = 1: the RD_base physical address, bits 51:16 in place.
        let c = ItsCommand::mapc(0xffff, RdBase::Address(0x080a_0000)).words();
        assert_eq!(c[2], (1 << 63) | 0x080a_0000 | 0xffff);
        assert_eq!(RdBase::from_field(c[2], true), RdBase::Address(0x080a_0000));
        assert_eq!(
            RdBase::from_field((1 << 63) | (2 << 16) | 3, false),
            RdBase::Processor(2)
        );
        assert_eq!(ItsCommand::unmapc(7).words(), [0x09, 0, 7, 0]);
        assert!(RdBase::Processor(1).fits(false) && !RdBase::Processor(1).fits(true));
        assert!(RdBase::Address(0x1_0000).fits(true));
        assert!(!RdBase::Address(0x1_8000).fits(true), "not 64 KiB aligned");
        assert!(!RdBase::Address(0x1_0000).fits(false));
    }

    #[test]
    fn mapti_mapi_and_event_commands() {
        let c = ItsCommand::mapti(0x10, 7, 8192, 1).words();
        assert_eq!(c, [0x0000_0010_0000_000a, (8192 << 32) | 7, 1, 0]);
        let c = ItsCommand::mapi(0x10, 7, 2).words();
        assert_eq!(c, [0x0000_0010_0000_000b, 7, 2, 0]);
        let c = ItsCommand::movi(0x10, 7, 5).words();
        assert_eq!(c, [0x0000_0010_0000_0001, 7, 5, 0]);
        for (cmd, op) in [
            (ItsCommand::inv(0x20, 9), 0x0c),
            (ItsCommand::discard(0x20, 9), 0x0f),
            (ItsCommand::clear(0x20, 9), 0x04),
            (ItsCommand::int(0x20, 9), 0x03),
        ] {
            assert_eq!(cmd.words(), [0x0000_0020_0000_0000 | op, 9, 0, 0]);
        }
        assert_eq!(ItsCommand::invall(4).words(), [0x0d, 0, 4, 0]);
        assert_eq!(
            ItsCommand::sync(RdBase::Processor(1)).words(),
            [0x05, 0, 1 << 16, 0]
        );
        assert_eq!(
            ItsCommand::movall(RdBase::Processor(1), RdBase::Processor(2)).words(),
            [0x0e, 0, 1 << 16, 2 << 16]
        );
    }

    #[test]
    fn decode_inverts_every_constructor() {
        let itt = PhysAddr::new(0x4000_0100);
        let cases = [
            (
                ItsCommand::mapd(5, itt, 3),
                Decoded::Mapd {
                    device: 5,
                    event_bits: 3,
                    itt: 0x4000_0100,
                    valid: true,
                },
            ),
            (
                ItsCommand::mapc(2, RdBase::Processor(9)),
                Decoded::Mapc {
                    icid: 2,
                    rd: 9 << 16,
                    valid: true,
                },
            ),
            (
                ItsCommand::mapti(5, 1, 8200, 2),
                Decoded::Mapti {
                    device: 5,
                    event: 1,
                    lpi: 8200,
                    icid: 2,
                },
            ),
            (
                ItsCommand::discard(5, 1),
                Decoded::Discard {
                    device: 5,
                    event: 1,
                },
            ),
            (ItsCommand::invall(3), Decoded::Invall { icid: 3 }),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.decode(), Ok(want), "{cmd}");
        }
        assert_eq!(ItsCommand::from_words([0x42, 0, 0, 0]).decode(), Err(0x42));
        assert_eq!(ItsCommand::mapti(5, 1, 8200, 2).name(), "MAPTI");
        let text = alloc::format!("{}", ItsCommand::mapti(5, 1, 8200, 2));
        assert!(text.contains("LPI 8200"), "{text}");
    }
}
