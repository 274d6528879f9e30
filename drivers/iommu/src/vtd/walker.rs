//! An independent VT-d translation walker, for tests and the register
//! model.
//!
//! It follows a DMA request the way the remapping hardware does (VT-d spec
//! rev 4.x, chapter 3 "DMA Remapping" and chapter 9 "Translation Structure
//! Formats"): root table → context entry (legacy or scalable mode) → PASID
//! directory / PASID table (scalable) → first- or second-level page table →
//! physical address, or a fault. It decodes raw memory words itself and
//! shares no code with the driver that writes these structures
//! ([`super::structs`]) or with the page-table engine's formats, so a test
//! that checks the driver's tables with it checks them against a second
//! reading of the spec.

use alloc::vec::Vec;

use sluice_hal::{DmaMemory, PhysAddr};

use crate::pagetable::MapPerms;

fn bit(raw: u64, n: u32) -> bool {
    raw & (1u64 << n) != 0
}

fn bits(raw: u64, hi: u32, lo: u32) -> u64 {
    (raw >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// One DMA request as the unit sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRequest {
    /// Requester ID (source ID): bus in bits 15:8, devfn in 7:0.
    pub sid: u16,
    /// The PASID TLP prefix, if any.
    pub pasid: Option<u32>,
    pub iova: u64,
    pub write: bool,
}

impl DmaRequest {
    pub const fn read(sid: u16, iova: u64) -> Self {
        Self {
            sid,
            pasid: None,
            iova,
            write: false,
        }
    }
    pub const fn write(sid: u16, iova: u64) -> Self {
        Self {
            sid,
            pasid: None,
            iova,
            write: true,
        }
    }
    pub const fn with_pasid(self, pasid: u32) -> Self {
        Self {
            pasid: Some(pasid),
            ..self
        }
    }
}

/// What the walker needs to know about the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkerConfig {
    /// CAP.MGAW + 1.
    pub mgaw: u32,
    /// CAP.SAGAW.
    pub sagaw: u8,
    /// Host address width: output addresses at or above `1 << haw` are
    /// reserved.
    pub haw: u32,
}

/// Why a request faulted. [`TranslationFault::reason_code`] gives the
/// spec's fault reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranslationFault {
    /// Root entry (legacy P; scalable LP/UP for the devfn's half) clear.
    RootNotPresent,
    /// Context entry P clear.
    ContextNotPresent,
    /// The context entry is present but unusable (AW not in SAGAW, reserved
    /// translation type).
    ContextInvalid,
    /// A legacy context entry whose translation type does not allow this
    /// request.
    TranslationTypeBlocked,
    /// A PASID-tagged request while the scalable context entry has
    /// PASIDE = 0.
    PasidNotEnabled,
    /// The PASID is beyond the PASID directory (PDTS).
    PasidBeyondDirectory,
    PasidDirNotPresent,
    PasidEntryNotPresent,
    /// A present PASID entry with a reserved or unsupported PGTT or AW.
    PasidEntryInvalid,
    /// The IOVA is at or above `2^min(MGAW, AGAW)`.
    AddressBeyondWidth,
    /// A first-level input address that is not canonical.
    NonCanonical,
    /// The paging entry at `level` (0 = 4 KiB level) is not present.
    NotPresent {
        level: u8,
    },
    /// The paging entry at `level` has reserved bits set.
    Reserved {
        level: u8,
    },
    WriteDenied,
    ReadDenied,
}

impl TranslationFault {
    /// The fault reason a unit records for this fault (VT-d spec appendix
    /// "Non-recoverable Fault Reason Encodings").
    ///
    /// Legacy-mode codes are the spec's. For scalable mode the structure
    /// faults use the spec's encodings of each structure's "not present"
    /// (x.2) and "reserved/invalid" entries; for paging faults the model
    /// uses the first-level (SFL) and general (SGN) groups the same way the
    /// legacy codes do (no present bit in second-level entries: a missing
    /// mapping is a missing read/write permission).
    pub const fn reason_code(self, scalable: bool, write: bool) -> u8 {
        use TranslationFault::*;
        if !scalable {
            return match self {
                RootNotPresent => 0x01,
                ContextNotPresent => 0x02,
                ContextInvalid | PasidNotEnabled | PasidBeyondDirectory => 0x03,
                AddressBeyondWidth | NonCanonical => 0x04,
                WriteDenied => 0x05,
                ReadDenied => 0x06,
                NotPresent { .. } => {
                    if write {
                        0x05
                    } else {
                        0x06
                    }
                }
                Reserved { .. } => 0x0c,
                TranslationTypeBlocked => 0x0d,
                PasidDirNotPresent | PasidEntryNotPresent | PasidEntryInvalid => 0x03,
            };
        }
        match self {
            RootNotPresent => 0x39,
            ContextNotPresent => 0x41,
            ContextInvalid | PasidNotEnabled | PasidBeyondDirectory | TranslationTypeBlocked => {
                0x43
            }
            PasidDirNotPresent => 0x51,
            PasidEntryNotPresent => 0x59,
            PasidEntryInvalid => 0x5b,
            AddressBeyondWidth | NonCanonical => 0x80,
            NotPresent { .. } | WriteDenied | ReadDenied => {
                if write {
                    0x81
                } else {
                    0x82
                }
            }
            Reserved { .. } => 0x7a,
        }
    }
}

/// Which table a request is translated through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// Second-level table of 3-5 levels.
    SecondLevel { levels: u8 },
    /// First-level (IA-32e layout) table of 4 or 5 levels.
    FirstLevel { levels: u8 },
    /// No translation (pass-through).
    PassThrough,
}

/// The outcome of the root/context/PASID stage: where a request's address
/// is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedContext {
    pub did: u16,
    /// The PASID the translation belongs to: the request's, or in scalable
    /// mode the context entry's RID_PASID for requests without one.
    pub pasid: Option<u32>,
    pub kind: TableKind,
    pub table: PhysAddr,
    /// Input addresses at or above `1 << input_bits` fault.
    pub input_bits: u32,
    /// Scalable PGSNP: every access snoops.
    pub page_snoop: bool,
    /// Scalable mode.
    pub scalable: bool,
    /// First level: the PASID entry's NXE (XD is reserved without it).
    pub no_execute_enable: bool,
}

/// A successful page walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageWalk {
    pub phys: PhysAddr,
    pub page_size: u64,
    pub perms: MapPerms,
    /// Second-level leaf SNP bit.
    pub snoop: bool,
    /// The tables visited, root first, with the level of each.
    pub tables: Vec<(u8, PhysAddr)>,
}

/// A full translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub context: ResolvedContext,
    pub walk: PageWalk,
}

impl Translated {
    /// Whether the access is forced to snoop (leaf SNP in legacy mode,
    /// PGSNP in scalable mode).
    pub fn snooped(&self) -> bool {
        if self.context.scalable {
            self.context.page_snoop
        } else {
            self.walk.snoop
        }
    }
}

/// Root-table address register value (RTADDR: address bits 63:12, TTM bits
/// 11:10) as latched by SRTP.
fn is_scalable(rtaddr: u64) -> bool {
    bits(rtaddr, 11, 10) == 0b01
}

/// Resolves the root, context and (scalable mode) PASID structures for
/// `req`.
pub fn resolve<M: DmaMemory + ?Sized>(
    mem: &M,
    rtaddr: u64,
    req: &DmaRequest,
    cfg: &WalkerConfig,
) -> Result<ResolvedContext, TranslationFault> {
    let root_table = rtaddr & ADDR;
    let bus = u64::from(req.sid >> 8);
    let devfn = u64::from(req.sid & 0xff);
    let root_lo = mem.read_u64(PhysAddr::new(root_table + bus * 16));
    let root_hi = mem.read_u64(PhysAddr::new(root_table + bus * 16 + 8));
    if !is_scalable(rtaddr) {
        // Legacy (3.4.2, 9.1, 9.3): 256 context entries of 16 bytes.
        if !bit(root_lo, 0) {
            return Err(TranslationFault::RootNotPresent);
        }
        let ctx = (root_lo & ADDR) + devfn * 16;
        let lo = mem.read_u64(PhysAddr::new(ctx));
        let hi = mem.read_u64(PhysAddr::new(ctx + 8));
        if !bit(lo, 0) {
            return Err(TranslationFault::ContextNotPresent);
        }
        if req.pasid.is_some() {
            // Legacy mode has no PASID support: such requests are blocked.
            return Err(TranslationFault::TranslationTypeBlocked);
        }
        let tt = bits(lo, 3, 2);
        let did = bits(hi, 23, 8) as u16;
        let kind = match tt {
            0b00 | 0b01 => {
                let aw = bits(hi, 2, 0) as u8;
                let levels = aw + 2;
                if !(1..=3).contains(&aw) || cfg.sagaw & (1 << aw) == 0 {
                    return Err(TranslationFault::ContextInvalid);
                }
                TableKind::SecondLevel { levels }
            }
            0b10 => TableKind::PassThrough,
            _ => return Err(TranslationFault::ContextInvalid),
        };
        let input_bits = match kind {
            TableKind::SecondLevel { levels } => cfg.mgaw.min(12 + 9 * u32::from(levels)),
            _ => cfg.haw,
        };
        return Ok(ResolvedContext {
            did,
            pasid: None,
            kind,
            table: PhysAddr::new(lo & ADDR),
            input_bits,
            page_snoop: false,
            scalable: false,
            no_execute_enable: false,
        });
    }

    // Scalable mode (3.4.3, 9.2, 9.4-9.6).
    let half = if devfn < 128 { root_lo } else { root_hi };
    if !bit(half, 0) {
        return Err(TranslationFault::RootNotPresent);
    }
    let ctx = (half & ADDR) + (devfn % 128) * 32;
    let w0 = mem.read_u64(PhysAddr::new(ctx));
    let w1 = mem.read_u64(PhysAddr::new(ctx + 8));
    if !bit(w0, 0) {
        return Err(TranslationFault::ContextNotPresent);
    }
    let pasid = match req.pasid {
        Some(p) => {
            if !bit(w0, 3) {
                return Err(TranslationFault::PasidNotEnabled);
            }
            p
        }
        None => bits(w1, 19, 0) as u32,
    };
    let dir_entries = 1u64 << (bits(w0, 11, 9) + 7);
    let dir_index = u64::from(pasid >> 6);
    if dir_index >= dir_entries {
        return Err(TranslationFault::PasidBeyondDirectory);
    }
    let dir_entry = mem.read_u64(PhysAddr::new((w0 & ADDR) + dir_index * 8));
    if !bit(dir_entry, 0) {
        return Err(TranslationFault::PasidDirNotPresent);
    }
    let pe = (dir_entry & ADDR) + u64::from(pasid & 0x3f) * 64;
    let p0 = mem.read_u64(PhysAddr::new(pe));
    let p1 = mem.read_u64(PhysAddr::new(pe + 8));
    let p2 = mem.read_u64(PhysAddr::new(pe + 16));
    if !bit(p0, 0) {
        return Err(TranslationFault::PasidEntryNotPresent);
    }
    let did = bits(p1, 15, 0) as u16;
    let page_snoop = bit(p1, 24);
    let (kind, table, input_bits) = match bits(p0, 8, 6) {
        0b001 => {
            let levels = if bits(p2, 3, 2) == 1 { 5 } else { 4 };
            if bits(p2, 3, 2) > 1 {
                return Err(TranslationFault::PasidEntryInvalid);
            }
            (
                TableKind::FirstLevel { levels },
                p2 & ADDR,
                12 + 9 * u32::from(levels),
            )
        }
        0b010 => {
            let aw = bits(p0, 4, 2) as u8;
            if !(1..=3).contains(&aw) || cfg.sagaw & (1 << aw) == 0 {
                return Err(TranslationFault::PasidEntryInvalid);
            }
            let levels = aw + 2;
            (
                TableKind::SecondLevel { levels },
                p0 & ADDR,
                cfg.mgaw.min(12 + 9 * u32::from(levels)),
            )
        }
        0b100 => (TableKind::PassThrough, 0, cfg.haw),
        // Nested translation is not modelled; 000, 101-111 are reserved.
        _ => return Err(TranslationFault::PasidEntryInvalid),
    };
    Ok(ResolvedContext {
        did,
        pasid: Some(pasid),
        kind,
        table: PhysAddr::new(table),
        input_bits,
        page_snoop,
        scalable: true,
        no_execute_enable: bit(p2, 5),
    })
}

/// Walks the page table of `ctx` for `iova`, starting at its root, or at
/// `start = (level, table)` (a table a paging-structure cache remembered).
/// Permissions are not checked here: see [`check_access`].
pub fn walk_tables<M: DmaMemory + ?Sized>(
    mem: &M,
    ctx: &ResolvedContext,
    iova: u64,
    cfg: &WalkerConfig,
    start: Option<(u8, PhysAddr)>,
) -> Result<PageWalk, TranslationFault> {
    let (levels, first_level) = match ctx.kind {
        TableKind::PassThrough => {
            return Ok(PageWalk {
                phys: PhysAddr::new(iova),
                page_size: 1 << 12,
                perms: MapPerms::ALL,
                snoop: false,
                tables: Vec::new(),
            });
        }
        TableKind::SecondLevel { levels } => (levels, false),
        TableKind::FirstLevel { levels } => (levels, true),
    };
    if first_level {
        // IA-32e: bits 63:(input_bits-1) must all equal bit input_bits-1,
        // and DMA only uses the lower half.
        if iova >> (ctx.input_bits - 1) != 0 {
            return Err(TranslationFault::NonCanonical);
        }
    } else if ctx.input_bits < 64 && iova >> ctx.input_bits != 0 {
        return Err(TranslationFault::AddressBeyondWidth);
    }
    let (mut level, mut table) = start.unwrap_or((levels - 1, ctx.table));
    let mut read = true;
    let mut write = true;
    let mut exec = true;
    let mut user = true;
    let mut tables = Vec::new();
    loop {
        tables.push((level, table));
        let shift = 12 + 9 * u32::from(level);
        let raw = mem.read_u64(PhysAddr::new(
            table.as_u64() + ((iova >> shift) & 0x1ff) * 8,
        ));
        let size = 1u64 << shift;
        let ps = level > 0 && bit(raw, 7);
        if first_level {
            // P bit 0, R/W bit 1, U/S bit 2, PS bit 7, XD bit 63.
            if !bit(raw, 0) {
                return Err(TranslationFault::NotPresent { level });
            }
            if bit(raw, 63) && !ctx.no_execute_enable {
                return Err(TranslationFault::Reserved { level });
            }
            write &= bit(raw, 1);
            user &= bit(raw, 2);
            exec &= !bit(raw, 63);
        } else {
            // No present bit: R bit 0, W bit 1, X bit 2; PS bit 7; SNP bit
            // 11 in leaves.
            if raw & 0b11 == 0 {
                return Err(TranslationFault::NotPresent { level });
            }
            read &= bit(raw, 0);
            write &= bit(raw, 1);
            exec &= bit(raw, 2);
        }
        if ps && level > 2 {
            return Err(TranslationFault::Reserved { level });
        }
        let addr = raw & ADDR;
        if cfg.haw < 52 && addr >> cfg.haw != 0 {
            return Err(TranslationFault::Reserved { level });
        }
        if level == 0 || ps {
            // Requests without PASID privilege are user requests: a
            // first-level page must be user-accessible all the way down.
            if first_level && !user {
                read = false;
                write = false;
            }
            let base = addr & !(size - 1);
            return Ok(PageWalk {
                phys: PhysAddr::new(base + (iova & (size - 1))),
                page_size: size,
                perms: MapPerms::new(read, write, exec),
                snoop: !first_level && bit(raw, 11),
                tables,
            });
        }
        table = PhysAddr::new(addr);
        level -= 1;
    }
}

/// Checks a walk's rights against the request.
pub fn check_access(walk: &PageWalk, write: bool) -> Result<(), TranslationFault> {
    if write && !walk.perms.write {
        Err(TranslationFault::WriteDenied)
    } else if !write && !walk.perms.read {
        Err(TranslationFault::ReadDenied)
    } else {
        Ok(())
    }
}

/// Translates `req` from scratch, with no caches: what the hardware does
/// once every cache has been invalidated.
pub fn translate<M: DmaMemory + ?Sized>(
    mem: &M,
    rtaddr: u64,
    req: &DmaRequest,
    cfg: &WalkerConfig,
) -> Result<Translated, TranslationFault> {
    let context = resolve(mem, rtaddr, req, cfg)?;
    let walk = walk_tables(mem, &context, req.iova, cfg, None)?;
    check_access(&walk, req.write)?;
    Ok(Translated { context, walk })
}

#[cfg(test)]
mod tests {
    use sluice_hal::model::ModelMemory;

    use super::*;
    use crate::vtd::structs::{
        ContextEntry, PasidDirEntry, PasidEntry, RootEntry, ScalableContextEntry, TranslationType,
    };

    const CFG: WalkerConfig = WalkerConfig {
        mgaw: 48,
        sagaw: 0b0100,
        haw: 46,
    };

    fn put(mem: &ModelMemory, addr: PhysAddr, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            mem.write_u64(PhysAddr::new(addr.as_u64() + 8 * i as u64), *w);
        }
    }

    #[test]
    fn legacy_context_programming_errors_are_faults_with_spec_reasons() {
        let mem = ModelMemory::new();
        let root = mem.alloc_page().expect("page");
        let ctx = mem.alloc_page().expect("page");
        let table = mem.alloc_page().expect("page");
        put(&mem, root, &RootEntry::legacy(ctx).words());
        let req = DmaRequest::read(0x0008, 0x1000);
        // AW 1 (3-level) is not offered by SAGAW 0b0100 (4-level only).
        put(
            &mem,
            PhysAddr::new(ctx.as_u64() + 8 * 16),
            &ContextEntry::new(table, 1, 5, TranslationType::UntranslatedOnly).words(),
        );
        let fault = translate(&mem, root.as_u64(), &req, &CFG).map(|t| t.walk.phys);
        assert_eq!(fault, Err(TranslationFault::ContextInvalid));
        assert_eq!(
            TranslationFault::ContextInvalid.reason_code(false, false),
            0x03
        );
        // TT = 11b is reserved.
        put(
            &mem,
            PhysAddr::new(ctx.as_u64() + 8 * 16),
            &[table.as_u64() | 0b1101, 2 | (5 << 8)],
        );
        assert_eq!(
            resolve(&mem, root.as_u64(), &req, &CFG).map(|c| c.did),
            Err(TranslationFault::ContextInvalid)
        );
        // A valid 4-level entry with an empty table: the read lacks
        // permission at the top level (legacy reason 6, write 5).
        put(
            &mem,
            PhysAddr::new(ctx.as_u64() + 8 * 16),
            &ContextEntry::new(table, 2, 5, TranslationType::UntranslatedOnly).words(),
        );
        let err = translate(&mem, root.as_u64(), &req, &CFG).map(|t| t.walk.phys);
        assert_eq!(err, Err(TranslationFault::NotPresent { level: 3 }));
        assert_eq!(
            TranslationFault::NotPresent { level: 3 }.reason_code(false, false),
            0x06
        );
        assert_eq!(
            TranslationFault::NotPresent { level: 3 }.reason_code(false, true),
            0x05
        );
        // Beyond MGAW.
        let far = DmaRequest::read(0x0008, 1 << 48);
        assert_eq!(
            translate(&mem, root.as_u64(), &far, &CFG).map(|t| t.walk.phys),
            Err(TranslationFault::AddressBeyondWidth)
        );
        // PASID-tagged requests have no meaning in legacy mode.
        assert_eq!(
            resolve(&mem, root.as_u64(), &req.with_pasid(1), &CFG).map(|c| c.did),
            Err(TranslationFault::TranslationTypeBlocked)
        );
    }

    #[test]
    fn scalable_pasid_structures_are_checked_in_order() {
        let mem = ModelMemory::new();
        let root = mem.alloc_page().expect("page");
        let ctx = mem.alloc_page().expect("page");
        let dir = mem.alloc_page().expect("page");
        let ptable = mem.alloc_page().expect("page");
        let fl_root = mem.alloc_page().expect("page");
        let rtaddr = root.as_u64() | (1 << 10);
        put(&mem, root, &RootEntry::scalable(Some(ctx), None).words());
        let sid = 0x0010u16; // devfn 16: lower half
        let entry_addr = PhysAddr::new(ctx.as_u64() + 16 * 32);
        // PASIDE clear: PASID-tagged requests fault.
        put(
            &mem,
            entry_addr,
            &ScalableContextEntry::new(dir, 0, 0).words(),
        );
        let tagged = DmaRequest::read(sid, 0x1000).with_pasid(70);
        assert_eq!(
            resolve(&mem, rtaddr, &tagged, &CFG).map(|c| c.did),
            Err(TranslationFault::PasidNotEnabled)
        );
        // PDTS 0: 128 directory entries → PASIDs below 8192.
        put(
            &mem,
            entry_addr,
            &ScalableContextEntry::new(dir, 0, 0)
                .with_pasid_enable()
                .words(),
        );
        let beyond = DmaRequest::read(sid, 0).with_pasid(8192);
        assert_eq!(
            resolve(&mem, rtaddr, &beyond, &CFG).map(|c| c.did),
            Err(TranslationFault::PasidBeyondDirectory)
        );
        assert_eq!(
            resolve(&mem, rtaddr, &tagged, &CFG).map(|c| c.did),
            Err(TranslationFault::PasidDirNotPresent)
        );
        put(
            &mem,
            PhysAddr::new(dir.as_u64() + 8),
            &[PasidDirEntry::new(ptable).raw()],
        );
        assert_eq!(
            resolve(&mem, rtaddr, &tagged, &CFG).map(|c| c.did),
            Err(TranslationFault::PasidEntryNotPresent)
        );
        assert_eq!(
            TranslationFault::PasidEntryNotPresent.reason_code(true, false),
            0x59
        );
        // PASID 70 = directory 1, entry 6; PGTT nested is not modelled.
        let pe = PhysAddr::new(ptable.as_u64() + 6 * 64);
        put(&mem, pe, &[1 | (0b011 << 6), 9, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            resolve(&mem, rtaddr, &tagged, &CFG).map(|c| c.did),
            Err(TranslationFault::PasidEntryInvalid)
        );
        put(&mem, pe, &PasidEntry::first_level(fl_root, 4, 9).words());
        let c = resolve(&mem, rtaddr, &tagged, &CFG).expect("resolved");
        assert_eq!(
            (c.did, c.pasid, c.kind),
            (9, Some(70), TableKind::FirstLevel { levels: 4 })
        );
        // First-level input must be canonical lower half.
        assert_eq!(
            walk_tables(&mem, &c, 1 << 47, &CFG, None).map(|w| w.phys),
            Err(TranslationFault::NonCanonical)
        );
        assert_eq!(
            walk_tables(&mem, &c, 0x1000, &CFG, None).map(|w| w.phys),
            Err(TranslationFault::NotPresent { level: 3 })
        );
        // XD in a first-level entry is reserved unless the PASID entry
        // sets NXE.
        let next = mem.alloc_page().expect("page");
        put(&mem, fl_root, &[next.as_u64() | 0b111 | (1 << 63)]);
        assert_eq!(
            walk_tables(&mem, &c, 0x1000, &CFG, None).map(|w| w.phys),
            Err(TranslationFault::NotPresent { level: 2 }),
            "NXE set: XD is a permission"
        );
        let mut words = PasidEntry::first_level(fl_root, 4, 9).words();
        words[2] &= !PasidEntry::NXE;
        put(&mem, pe, &words);
        let c = resolve(&mem, rtaddr, &tagged, &CFG).expect("resolved");
        assert_eq!(
            walk_tables(&mem, &c, 0x1000, &CFG, None).map(|w| w.phys),
            Err(TranslationFault::Reserved { level: 3 })
        );
    }
}
