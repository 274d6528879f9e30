//! An independent SMMUv3 translation walker, for tests and the register
//! model.
//!
//! It follows a transaction the way an SMMU does (Arm IHI 0070, 3.3
//! "Data structures and translation procedure"): stream table (linear or
//! 2-level) → STE → CD table (linear or 2-level) → CD → stage-1 tables →
//! stage-2 tables (with nested stage-1 walks translated by stage 2) →
//! physical address, or a fault named by the event it records (7.3). It
//! decodes raw memory words itself and shares no code with the driver that
//! writes these structures ([`super::structs`]) or with the page-table
//! engine, so a test that checks the driver's tables with it checks them
//! against a second reading of the spec.
//!
//! Only the 4 KiB granule, VMSAv8-64 tables and little-endian structures
//! are walked; anything else is reported as ILLEGAL (C_BAD_STE /
//! C_BAD_CD).

use alloc::vec::Vec;

use sluice_hal::{DmaMemory, PhysAddr};

use super::caps::SmmuCapabilities;
use super::events::{EventKind, FaultClass};

fn bit(raw: u64, n: u32) -> bool {
    raw & (1u64 << n) != 0
}

fn bits(raw: u64, hi: u32, lo: u32) -> u64 {
    (raw >> lo) & (u64::MAX >> (63 - (hi - lo)))
}

fn oas_bits(encoding: u64) -> u32 {
    [32, 36, 40, 42, 44, 48, 52, 56][(encoding & 7) as usize]
}

/// An external abort on a read by the SMMU (reported as F_STE_FETCH,
/// F_CD_FETCH or F_WALK_EABT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalAbort;

/// Where the walker reads structures from.
pub trait Fetch {
    fn read(&self, addr: u64) -> Result<u64, ExternalAbort>;
}

/// Plain memory: every read succeeds.
pub struct MemFetch<'m>(pub &'m dyn DmaMemory);

impl Fetch for MemFetch<'_> {
    fn read(&self, addr: u64) -> Result<u64, ExternalAbort> {
        Ok(self.0.read_u64(PhysAddr::new(addr)))
    }
}

/// What the walker needs to know about the SMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkerConfig {
    pub stage1: bool,
    pub stage2: bool,
    pub oas_bits: u32,
    pub ssid_bits: u8,
    pub cd2l: bool,
    pub asid16: bool,
    pub vmid16: bool,
    /// IDR0.STALL_MODEL: STE.S1STALLD is ILLEGAL unless it is 0.
    pub stall_model: u8,
}

impl WalkerConfig {
    pub fn from_caps(c: &SmmuCapabilities) -> Self {
        Self {
            stage1: c.stage1,
            stage2: c.stage2,
            oas_bits: c.oas_bits,
            ssid_bits: c.ssid_bits,
            cd2l: c.cd2l,
            asid16: c.asid16,
            vmid16: c.vmid16,
            stall_model: c.stall_model,
        }
    }
}

/// SMMU_STRTAB_BASE and SMMU_STRTAB_BASE_CFG as programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTable {
    pub base: u64,
    pub cfg: u32,
}

/// One client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub sid: u32,
    /// The SubstreamID (PCIe PASID), if the transaction carries one.
    pub ssid: Option<u32>,
    pub iova: u64,
    pub write: bool,
    /// PnU: privileged (PCIe requests without a privileged PASID prefix
    /// are unprivileged).
    pub privileged: bool,
}

impl Request {
    pub const fn read(sid: u32, iova: u64) -> Self {
        Self {
            sid,
            ssid: None,
            iova,
            write: false,
            privileged: false,
        }
    }
    pub const fn write(sid: u32, iova: u64) -> Self {
        Self {
            sid,
            ssid: None,
            iova,
            write: true,
            privileged: false,
        }
    }
    pub const fn with_ssid(self, ssid: u32) -> Self {
        Self {
            ssid: Some(ssid),
            ..self
        }
    }
}

/// The structures a walk read, for configuration caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trace {
    /// Address and index of the level-1 stream table descriptor.
    pub l1std: Option<(u64, u32)>,
    pub ste: Option<u64>,
    /// Address and L1 index of the level-1 CD descriptor.
    pub l1cd: Option<(u64, u32)>,
    /// Address and index (SubstreamID, or 0 for the default substream)
    /// of the CD.
    pub cd: Option<(u64, u32)>,
}

/// A fault the SMMU reports with an event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: EventKind,
    pub stage2: bool,
    pub class: FaultClass,
    /// For stage-2 faults: the IPA that faulted.
    pub ipa: Option<u64>,
    /// For fetch aborts: the address read.
    pub fetch_addr: Option<u64>,
    /// Whether an event is recorded (CD.R / STE.S2R for translation
    /// faults; always for configuration errors).
    pub record: bool,
}

impl Fault {
    const fn config(kind: EventKind) -> Self {
        Self {
            kind,
            stage2: false,
            class: FaultClass::Input,
            ipa: None,
            fetch_addr: None,
            record: true,
        }
    }
    const fn fetch(kind: EventKind, addr: u64) -> Self {
        Self {
            kind,
            stage2: false,
            class: FaultClass::Input,
            ipa: None,
            fetch_addr: Some(addr),
            record: true,
        }
    }
}

/// Why a transaction did not translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// Aborted without an event (STE.Config = abort).
    Abort,
    Fault(Fault),
}

impl WalkError {
    /// The event the fault records, if any.
    pub fn event(&self) -> Option<EventKind> {
        match self {
            WalkError::Abort => None,
            WalkError::Fault(f) => Some(f.kind),
        }
    }
}

fn cfg_err(kind: EventKind) -> WalkError {
    WalkError::Fault(Fault::config(kind))
}

/// The stage-2 part of a decoded STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage2Config {
    pub vmid: u16,
    pub input_bits: u32,
    /// Table levels walked (2-4).
    pub levels: u8,
    pub root: u64,
    pub output_bits: u32,
    pub affd: bool,
    pub record: bool,
}

/// The stage-1 part of a decoded STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage1Pointer {
    pub context_ptr: u64,
    pub cd_max: u8,
    pub format: u8,
    pub dss: u8,
}

/// A decoded STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// Config: 0b100 bypass, 0b101 stage 1, 0b110 stage 2, 0b111 nested.
    pub config: u8,
    pub s1: Option<Stage1Pointer>,
    pub s2: Option<Stage2Config>,
    pub shcfg: u8,
    /// STE.S2VMID as written: it tags stage-1 TLB entries too when the
    /// SMMU implements stage 2.
    pub vmid_field: u16,
}

/// A decoded CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub asid: u16,
    pub input_bits: u32,
    pub levels: u8,
    pub ttb0: u64,
    pub output_bits: u32,
    pub affd: bool,
    pub record: bool,
}

/// A leaf found by a table walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Output address of the start of the leaf.
    pub base: u64,
    pub size: u64,
    pub read: bool,
    pub write: bool,
    /// Unprivileged access allowed (stage 1 `AP[1]`; always for stage 2).
    pub user: bool,
    /// Memory attributes as the descriptor holds them: stage 1 AttrIndx
    /// (bits 4:2, an index into the CD's MAIR), stage 2 MemAttr (bits 5:2).
    pub memory_attr: u8,
    /// Tables visited, (level, address), root first (levels counted from
    /// the leaf up: 0 holds 4 KiB pages).
    pub tables: Vec<(u8, u64)>,
}

impl Leaf {
    pub fn output(&self, input: u64) -> u64 {
        self.base + (input & (self.size - 1))
    }
    /// Whether the leaf allows the access.
    pub fn allows(&self, write: bool, privileged: bool) -> bool {
        (privileged || self.user) && if write { self.write } else { self.read }
    }
}

/// A successful translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    pub phys: u64,
    pub stream: StreamConfig,
    pub context: Option<Context>,
    /// The stage-1 leaf (input: VA, output: IPA or PA).
    pub s1: Option<Leaf>,
    /// The stage-2 leaf (input: IPA).
    pub s2: Option<Leaf>,
    pub trace: Trace,
}

// ---- stream table (3.3.2, 5.1, 6.3.24-25) ----------------------------------

/// Finds `sid`'s STE. C_BAD_STREAMID for StreamIDs beyond LOG2SIZE or
/// behind an absent level-2 table (7.3.3).
pub fn locate_ste(
    f: &dyn Fetch,
    st: &StreamTable,
    sid: u32,
    trace: &mut Trace,
) -> Result<u64, WalkError> {
    let log2size = st.cfg & 0x3f;
    let split = (st.cfg >> 6) & 0x1f;
    let fmt = (st.cfg >> 16) & 0b11;
    if log2size < 32 && u64::from(sid) >> log2size != 0 {
        return Err(cfg_err(EventKind::BadStreamId));
    }
    let base = st.base & 0x000f_ffff_ffff_ffc0;
    if fmt == 0b00 {
        return Ok(base + u64::from(sid) * 64);
    }
    if fmt != 0b01 || !matches!(split, 6 | 8 | 10) {
        // Reserved formats and SPLIT values: nothing is reachable.
        return Err(cfg_err(EventKind::BadStreamId));
    }
    let l1_index = if split >= 32 { 0 } else { sid >> split };
    let l1_addr = base + u64::from(l1_index) * 8;
    trace.l1std = Some((l1_addr, l1_index));
    let l1 = f
        .read(l1_addr)
        .map_err(|ExternalAbort| WalkError::Fault(Fault::fetch(EventKind::SteFetch, l1_addr)))?;
    let span = bits(l1, 4, 0) as u32;
    if span == 0 || span > split + 1 {
        return Err(cfg_err(EventKind::BadStreamId));
    }
    let low = u64::from(sid) & ((1u64 << split) - 1);
    if low >> (span - 1) != 0 {
        return Err(cfg_err(EventKind::BadStreamId));
    }
    let l2 = l1 & 0x000f_ffff_ffff_ffc0 & !((1u64 << (span - 1 + 6)) - 1);
    Ok(l2 + low * 64)
}

/// Reads the eight words of a structure.
fn read_words(f: &dyn Fetch, addr: u64, kind: EventKind) -> Result<[u64; 8], WalkError> {
    let mut w = [0u64; 8];
    for (i, word) in w.iter_mut().enumerate() {
        let a = addr + 8 * i as u64;
        *word = f
            .read(a)
            .map_err(|ExternalAbort| WalkError::Fault(Fault::fetch(kind, a)))?;
    }
    Ok(w)
}

/// Decodes an STE (5.2). V = 0 and ILLEGAL combinations are C_BAD_STE;
/// Config = abort is a silent abort.
pub fn decode_ste(cfg: &WalkerConfig, w: &[u64; 8]) -> Result<StreamConfig, WalkError> {
    if !bit(w[0], 0) {
        return Err(cfg_err(EventKind::BadSte));
    }
    let config = bits(w[0], 3, 1) as u8;
    if config & 0b100 == 0 {
        return Err(WalkError::Abort);
    }
    let s1_on = config & 0b001 != 0;
    let s2_on = config & 0b010 != 0;
    if (s1_on && !cfg.stage1) || (s2_on && !cfg.stage2) {
        return Err(cfg_err(EventKind::BadSte));
    }
    let s1 = if s1_on {
        let cd_max = bits(w[0], 63, 59) as u8;
        let format = bits(w[0], 5, 4) as u8;
        let dss = bits(w[1], 1, 0) as u8;
        let substreams = cfg.ssid_bits > 0 && cd_max > 0;
        if cfg.ssid_bits > 0 && cd_max > cfg.ssid_bits {
            return Err(cfg_err(EventKind::BadSte));
        }
        if substreams && format != 0 && !cfg.cd2l {
            return Err(cfg_err(EventKind::BadSte));
        }
        if bit(w[1], 27) && cfg.stall_model != 0 {
            // S1STALLD set while the stall model is not configurable.
            return Err(cfg_err(EventKind::BadSte));
        }
        let strw = bits(w[1], 31, 30);
        if strw & 1 != 0 {
            return Err(cfg_err(EventKind::BadSte));
        }
        Some(Stage1Pointer {
            context_ptr: w[0] & 0x000f_ffff_ffff_ffc0,
            cd_max: if cfg.ssid_bits == 0 { 0 } else { cd_max },
            format: if substreams { format } else { 0 },
            dss,
        })
    } else {
        None
    };
    let s2 = if s2_on {
        let vmid = bits(w[2], 15, 0) as u16;
        let t0sz = bits(w[2], 37, 32) as u32;
        let sl0 = bits(w[2], 39, 38);
        let tg = bits(w[2], 47, 46);
        let ps = bits(w[2], 50, 48);
        let aa64 = bit(w[2], 51);
        let endi = bit(w[2], 52);
        if !cfg.vmid16 && vmid >> 8 != 0 {
            return Err(cfg_err(EventKind::BadSte));
        }
        if tg != 0b00 || !aa64 || endi {
            // 16K/64K granules, AArch32 tables and big-endian tables are
            // not modelled.
            return Err(cfg_err(EventKind::BadSte));
        }
        if bit(w[2], 57) {
            // S2S: stalls are not modelled.
            return Err(cfg_err(EventKind::BadSte));
        }
        let input_bits = 64u32.saturating_sub(t0sz);
        // 4 KiB granule: SL0 0 → Arm level 2, 1 → level 1, 2 → level 0.
        let levels: u8 = match sl0 {
            0 => 2,
            1 => 3,
            2 => 4,
            _ => return Err(cfg_err(EventKind::BadSte)),
        };
        // The initial table resolves input_bits - (12 + 9 * (levels - 1))
        // bits: one table (≤ 9) or up to 16 concatenated tables (≤ 13).
        let root_bits = input_bits as i64 - (12 + 9 * (i64::from(levels) - 1));
        if !(1..=13).contains(&root_bits) || input_bits > 48 {
            return Err(cfg_err(EventKind::BadSte));
        }
        let output_bits = oas_bits(ps).min(cfg.oas_bits).min(48);
        let root = w[3] & 0x000f_ffff_ffff_fff0;
        if root >> output_bits != 0 {
            return Err(cfg_err(EventKind::BadSte));
        }
        Some(Stage2Config {
            vmid,
            input_bits,
            levels,
            root,
            output_bits,
            affd: bit(w[2], 53),
            record: bit(w[2], 58),
        })
    } else {
        None
    };
    Ok(StreamConfig {
        config,
        s1,
        s2,
        shcfg: bits(w[1], 45, 44) as u8,
        vmid_field: bits(w[2], 15, 0) as u16,
    })
}

/// Resolves `sid`'s STE.
pub fn resolve_stream(
    f: &dyn Fetch,
    cfg: &WalkerConfig,
    st: &StreamTable,
    sid: u32,
    trace: &mut Trace,
) -> Result<StreamConfig, WalkError> {
    let addr = locate_ste(f, st, sid, trace)?;
    trace.ste = Some(addr);
    let words = read_words(f, addr, EventKind::SteFetch)?;
    decode_ste(cfg, &words)
}

// ---- context descriptors (3.3.3, 5.3, 5.4) ------------------------------------

/// Reads a word of the CD table: a PA, or with stage 2 an IPA translated
/// first (faults there are stage-2 faults of CLASS CD).
fn read_cd_word(
    f: &dyn Fetch,
    s2: Option<&Stage2Config>,
    addr: u64,
    iova: u64,
) -> Result<u64, WalkError> {
    let pa = match s2 {
        Some(s2) => {
            let leaf = walk_stage2(f, s2, addr, iova, FaultClass::Cd, None)?;
            if !leaf.read {
                return Err(stage2_fault(
                    EventKind::Permission,
                    s2,
                    addr,
                    FaultClass::Cd,
                ));
            }
            leaf.output(addr)
        }
        None => addr,
    };
    f.read(pa)
        .map_err(|ExternalAbort| WalkError::Fault(Fault::fetch(EventKind::CdFetch, pa)))
}

/// Finds the CD for `ssid` (or for traffic without one) and decodes it.
/// `Ok(None)`: stage 1 is bypassed (S1DSS = bypass).
pub fn resolve_context(
    f: &dyn Fetch,
    cfg: &WalkerConfig,
    stream: &StreamConfig,
    ssid: Option<u32>,
    iova: u64,
    trace: &mut Trace,
) -> Result<Option<Context>, WalkError> {
    let Some(s1) = stream.s1 else {
        if ssid.is_some() {
            // Substreams need stage 1 (5.2, S1Fmt).
            return Err(cfg_err(EventKind::BadSubstreamId));
        }
        return Ok(None);
    };
    let index = match ssid {
        Some(_) if s1.cd_max == 0 => return Err(cfg_err(EventKind::BadSubstreamId)),
        Some(s) if u64::from(s) >> s1.cd_max != 0 => {
            return Err(cfg_err(EventKind::BadSubstreamId));
        }
        Some(0) if s1.dss == 0b10 => return Err(cfg_err(EventKind::StreamDisabled)),
        Some(s) => s,
        None if s1.cd_max == 0 => 0,
        None => match s1.dss {
            0b01 => return Ok(None),
            0b10 => 0,
            _ => return Err(cfg_err(EventKind::StreamDisabled)),
        },
    };
    let s2 = stream.s2.as_ref();
    let cd_addr = match s1.format {
        0b01 | 0b10 => {
            let leaf_bits = if s1.format == 0b01 { 6 } else { 10 };
            let l1_index = if u32::from(s1.cd_max) <= leaf_bits {
                0
            } else {
                index >> leaf_bits
            };
            let l1_addr = s1.context_ptr + u64::from(l1_index) * 8;
            trace.l1cd = Some((l1_addr, l1_index));
            let l1 = read_cd_word(f, s2, l1_addr, iova)?;
            if !bit(l1, 0) {
                return Err(cfg_err(EventKind::BadSubstreamId));
            }
            let l2 = l1 & 0x000f_ffff_ffff_f000;
            l2 + u64::from(index & ((1 << leaf_bits) - 1)) * 64
        }
        _ => s1.context_ptr + u64::from(index) * 64,
    };
    trace.cd = Some((cd_addr, index));
    let mut w = [0u64; 8];
    for (i, word) in w.iter_mut().enumerate() {
        *word = read_cd_word(f, s2, cd_addr + 8 * i as u64, iova)?;
    }
    decode_cd(cfg, &w, s2.map(|s| s.input_bits)).map(Some)
}

/// Decodes a CD (5.4). V = 0 and ILLEGAL settings are C_BAD_CD.
/// `ipa_bits`: with stage 2, the stage-1 output is an IPA of this width.
pub fn decode_cd(
    cfg: &WalkerConfig,
    w: &[u64; 8],
    ipa_bits: Option<u32>,
) -> Result<Context, WalkError> {
    if !bit(w[0], 31) {
        return Err(cfg_err(EventKind::BadCd));
    }
    let t0sz = bits(w[0], 5, 0) as u32;
    let tg0 = bits(w[0], 7, 6);
    let epd0 = bit(w[0], 14);
    let endi = bit(w[0], 15);
    let aa64 = bit(w[0], 41);
    let (ha, hd) = (bit(w[0], 43), bit(w[0], 42));
    let stall = bit(w[0], 44);
    let asid = bits(w[0], 63, 48) as u16;
    if !aa64 || endi || tg0 != 0b00 || ha || hd || stall || epd0 {
        // AArch32, big-endian, 16K/64K granules, HTTU and stalls are not
        // modelled; a CD with TTB0 walks disabled translates nothing.
        return Err(cfg_err(EventKind::BadCd));
    }
    if !(16..=39).contains(&t0sz) {
        return Err(cfg_err(EventKind::BadCd));
    }
    if !cfg.asid16 && asid >> 8 != 0 {
        return Err(cfg_err(EventKind::BadCd));
    }
    let input_bits = 64 - t0sz;
    let levels = match input_bits {
        25..=30 => 2,
        31..=39 => 3,
        _ => 4,
    };
    let mut output_bits = oas_bits(bits(w[0], 34, 32)).min(cfg.oas_bits).min(48);
    if let Some(ipa) = ipa_bits {
        output_bits = output_bits.min(ipa);
    }
    let ttb0 = w[1] & 0x000f_ffff_ffff_fff0;
    if ttb0 >> output_bits != 0 {
        return Err(cfg_err(EventKind::BadCd));
    }
    Ok(Context {
        asid,
        input_bits,
        levels,
        ttb0,
        output_bits,
        affd: bit(w[0], 35),
        record: bit(w[0], 45),
    })
}

// ---- translation tables (VMSAv8-64, 4 KiB granule) ---------------------------

fn stage1_fault(kind: EventKind, ctx: &Context) -> WalkError {
    WalkError::Fault(Fault {
        kind,
        stage2: false,
        class: FaultClass::Input,
        ipa: None,
        fetch_addr: None,
        record: ctx.record,
    })
}

fn stage2_fault(kind: EventKind, s2: &Stage2Config, ipa: u64, class: FaultClass) -> WalkError {
    WalkError::Fault(Fault {
        kind,
        stage2: true,
        class,
        ipa: Some(ipa),
        fetch_addr: None,
        record: s2.record,
    })
}

/// Walks the stage-1 table of `ctx` for `va`. With `s2`, every table
/// address is an IPA translated by stage 2 (faults there are stage-2
/// faults of CLASS TTD); the leaf's output is an IPA the caller translates.
/// `start`: a (level, table PA) a walk cache remembered.
pub fn walk_stage1(
    f: &dyn Fetch,
    ctx: &Context,
    s2: Option<&Stage2Config>,
    va: u64,
    start: Option<(u8, u64)>,
) -> Result<Leaf, WalkError> {
    if va >> ctx.input_bits != 0 {
        // Beyond TTB0's region (no TTB1: EPD1): a translation fault.
        return Err(stage1_fault(EventKind::Translation, ctx));
    }
    let (mut level, mut table_pa) = match start {
        Some(s) => s,
        None => {
            let root = ctx.ttb0 & !0xfff;
            let pa = match s2 {
                Some(s2) => table_through_stage2(f, s2, root, va)?,
                None => root,
            };
            (ctx.levels - 1, pa)
        }
    };
    let mut write = true;
    let mut user = true;
    let mut tables = Vec::new();
    loop {
        tables.push((level, table_pa));
        let shift = 12 + 9 * u32::from(level);
        let index = (va >> shift) & 0x1ff;
        let addr = table_pa + index * 8;
        let raw = f.read(addr).map_err(|ExternalAbort| {
            WalkError::Fault(Fault {
                kind: EventKind::WalkEabt,
                stage2: false,
                class: FaultClass::TableWalk,
                ipa: None,
                fetch_addr: Some(addr),
                record: true,
            })
        })?;
        if !bit(raw, 0) {
            return Err(stage1_fault(EventKind::Translation, ctx));
        }
        let table_or_page = bit(raw, 1);
        if !table_or_page && (level == 0 || level == 3) {
            // Reserved at Arm level 3, no level-0 blocks with 4 KiB.
            return Err(stage1_fault(EventKind::Translation, ctx));
        }
        let out = raw & 0x0000_ffff_ffff_f000;
        if bits(raw, 51, 48) != 0 || out >> ctx.output_bits != 0 {
            return Err(stage1_fault(EventKind::AddrSize, ctx));
        }
        if level > 0 && table_or_page {
            // APTable[1] (62) removes write, APTable[0] (61) removes EL0.
            write &= !bit(raw, 62);
            user &= !bit(raw, 61);
            table_pa = match s2 {
                Some(s2) => table_through_stage2(f, s2, out, va)?,
                None => out,
            };
            level -= 1;
            continue;
        }
        if !ctx.affd && !bit(raw, 10) {
            return Err(stage1_fault(EventKind::Access, ctx));
        }
        // AP[2] (7): read-only; AP[1] (6): EL0 access.
        write &= !bit(raw, 7);
        user &= bit(raw, 6);
        let size = 1u64 << shift;
        return Ok(Leaf {
            base: out & !(size - 1),
            size,
            read: true,
            write,
            user,
            memory_attr: bits(raw, 4, 2) as u8,
            tables,
        });
    }
}

fn table_through_stage2(
    f: &dyn Fetch,
    s2: &Stage2Config,
    ipa: u64,
    va: u64,
) -> Result<u64, WalkError> {
    let leaf = walk_stage2(f, s2, ipa, va, FaultClass::TableWalk, None)?;
    if !leaf.read {
        return Err(stage2_fault(
            EventKind::Permission,
            s2,
            ipa,
            FaultClass::TableWalk,
        ));
    }
    Ok(leaf.output(ipa))
}

/// Walks the stage-2 table of `s2` for `ipa`; faults carry `class` and
/// the IPA. `start`: a (level, table PA) a walk cache remembered.
pub fn walk_stage2(
    f: &dyn Fetch,
    s2: &Stage2Config,
    ipa: u64,
    _input_addr: u64,
    class: FaultClass,
    start: Option<(u8, u64)>,
) -> Result<Leaf, WalkError> {
    if ipa >> s2.input_bits != 0 {
        return Err(stage2_fault(EventKind::Translation, s2, ipa, class));
    }
    let (mut level, mut table) = start.unwrap_or((s2.levels - 1, s2.root & !0xfff));
    let mut tables = Vec::new();
    let mut first = start.is_none();
    loop {
        tables.push((level, table));
        let shift = 12 + 9 * u32::from(level);
        // Concatenated initial tables: the root index may exceed 9 bits.
        let index = if first {
            ipa >> shift
        } else {
            (ipa >> shift) & 0x1ff
        };
        first = false;
        let addr = table + index * 8;
        let raw = f.read(addr).map_err(|ExternalAbort| {
            WalkError::Fault(Fault {
                kind: EventKind::WalkEabt,
                stage2: true,
                class,
                ipa: Some(ipa),
                fetch_addr: Some(addr),
                record: true,
            })
        })?;
        if !bit(raw, 0) {
            return Err(stage2_fault(EventKind::Translation, s2, ipa, class));
        }
        let table_or_page = bit(raw, 1);
        if !table_or_page && (level == 0 || level == 3) {
            return Err(stage2_fault(EventKind::Translation, s2, ipa, class));
        }
        let out = raw & 0x0000_ffff_ffff_f000;
        if bits(raw, 51, 48) != 0 || out >> s2.output_bits != 0 {
            return Err(stage2_fault(EventKind::AddrSize, s2, ipa, class));
        }
        if level > 0 && table_or_page {
            table = out;
            level -= 1;
            continue;
        }
        if !s2.affd && !bit(raw, 10) {
            return Err(stage2_fault(EventKind::Access, s2, ipa, class));
        }
        let size = 1u64 << shift;
        // S2AP[0] (6) read, S2AP[1] (7) write.
        return Ok(Leaf {
            base: out & !(size - 1),
            size,
            read: bit(raw, 6),
            write: bit(raw, 7),
            user: true,
            memory_attr: bits(raw, 5, 2) as u8,
            tables,
        });
    }
}

/// Translates `req` from scratch, with no caches: what the SMMU does once
/// every cache has been invalidated.
pub fn translate(
    f: &dyn Fetch,
    cfg: &WalkerConfig,
    st: &StreamTable,
    req: &Request,
) -> Result<Translation, WalkError> {
    let mut trace = Trace::default();
    let stream = resolve_stream(f, cfg, st, req.sid, &mut trace)?;
    let context = resolve_context(f, cfg, &stream, req.ssid, req.iova, &mut trace)?;
    let (phys, s1, s2) = finish(f, &stream, context, req, None, None)?;
    Ok(Translation {
        phys,
        stream,
        context,
        s1,
        s2,
        trace,
    })
}

/// The table walks of a resolved stream and context, with walk-cache
/// starting points; permissions are checked.
#[allow(clippy::type_complexity)]
pub fn finish(
    f: &dyn Fetch,
    stream: &StreamConfig,
    context: Option<Context>,
    req: &Request,
    s1_start: Option<(u8, u64)>,
    s2_start: Option<(u8, u64)>,
) -> Result<(u64, Option<Leaf>, Option<Leaf>), WalkError> {
    if stream.config == 0b100 {
        return Ok((req.iova, None, None));
    }
    let s2 = stream.s2.as_ref();
    let (ipa, s1_leaf) = match &context {
        Some(ctx) => {
            let leaf = walk_stage1(f, ctx, s2, req.iova, s1_start)?;
            if !leaf.allows(req.write, req.privileged) {
                return Err(stage1_fault(EventKind::Permission, ctx));
            }
            (leaf.output(req.iova), Some(leaf))
        }
        None => (req.iova, None),
    };
    let Some(s2) = s2 else {
        return Ok((ipa, s1_leaf, None));
    };
    let leaf = walk_stage2(f, s2, ipa, req.iova, FaultClass::Input, s2_start)?;
    if !leaf.allows(req.write, req.privileged) {
        return Err(stage2_fault(
            EventKind::Permission,
            s2,
            ipa,
            FaultClass::Input,
        ));
    }
    Ok((leaf.output(ipa), s1_leaf, Some(leaf)))
}

#[cfg(test)]
mod tests {
    use sluice_hal::model::ModelMemory;

    use super::*;

    const CFG: WalkerConfig = WalkerConfig {
        stage1: true,
        stage2: true,
        oas_bits: 48,
        ssid_bits: 8,
        cd2l: true,
        asid16: true,
        vmid16: true,
        stall_model: 1,
    };

    fn put(mem: &ModelMemory, addr: u64, words: &[u64]) {
        for (i, &w) in words.iter().enumerate() {
            mem.write_u64(PhysAddr::new(addr + 8 * i as u64), w);
        }
    }

    #[test]
    fn stream_table_lookups_fail_with_bad_streamid() {
        let mem = ModelMemory::new();
        let f = MemFetch(&mem);
        let mut t = Trace::default();
        let linear = StreamTable {
            base: 0x10_0000,
            cfg: 4,
        };
        assert_eq!(locate_ste(&f, &linear, 15, &mut t), Ok(0x10_0000 + 15 * 64));
        assert_eq!(
            locate_ste(&f, &linear, 16, &mut t),
            Err(cfg_err(EventKind::BadStreamId))
        );
        // 2-level, SPLIT 6, 8 SID bits: L1 entry 1 has a 16-STE table.
        let two = StreamTable {
            base: 0x20_0000,
            cfg: 8 | (6 << 6) | (1 << 16),
        };
        put(&mem, 0x20_0008, &[0x30_0000 | 5]);
        assert_eq!(locate_ste(&f, &two, 64 + 3, &mut t), Ok(0x30_0000 + 3 * 64));
        assert_eq!(t.l1std, Some((0x20_0008, 1)));
        assert_eq!(
            locate_ste(&f, &two, 64 + 16, &mut t),
            Err(cfg_err(EventKind::BadStreamId)),
            "beyond the span"
        );
        assert_eq!(
            locate_ste(&f, &two, 3, &mut t),
            Err(cfg_err(EventKind::BadStreamId)),
            "span 0"
        );
    }

    #[test]
    fn ste_decoding_rejects_illegal_configurations() {
        let s1_only = WalkerConfig {
            stage2: false,
            ..CFG
        };
        assert_eq!(
            decode_ste(&CFG, &[0; 8]),
            Err(cfg_err(EventKind::BadSte)),
            "V = 0"
        );
        assert_eq!(
            decode_ste(&CFG, &[1, 0, 0, 0, 0, 0, 0, 0]),
            Err(WalkError::Abort)
        );
        let s2 = [
            1 | (0b110 << 1),
            0,
            7 | (24 << 32) | (2 << 38) | (5 << 48) | (1 << 51) | (1 << 58),
            0x50_0000,
            0,
            0,
            0,
            0,
        ];
        let decoded = decode_ste(&CFG, &s2).unwrap();
        let s2c = decoded.s2.unwrap();
        assert_eq!((s2c.vmid, s2c.input_bits, s2c.levels), (7, 40, 4));
        assert_eq!(
            (s2c.root, s2c.output_bits, s2c.record),
            (0x50_0000, 48, true)
        );
        assert_eq!(
            decode_ste(&s1_only, &s2),
            Err(cfg_err(EventKind::BadSte)),
            "stage 2 on a stage-1-only SMMU"
        );
        let mut bad_sl0 = s2;
        bad_sl0[2] = (bad_sl0[2] & !(0b11 << 38)) | (1 << 38); // 3 levels for 40 bits
        assert_eq!(
            decode_ste(&CFG, &bad_sl0).unwrap().s2.unwrap().levels,
            3,
            "40 bits with 3 levels: two concatenated tables"
        );
        bad_sl0[2] = (bad_sl0[2] & !(0b11 << 38)) | (3 << 38);
        assert_eq!(decode_ste(&CFG, &bad_sl0), Err(cfg_err(EventKind::BadSte)));
    }

    #[test]
    fn substream_selection_follows_s1dss() {
        let mem = ModelMemory::new();
        let f = MemFetch(&mem);
        let mut t = Trace::default();
        let stream = StreamConfig {
            config: 0b101,
            s1: Some(Stage1Pointer {
                context_ptr: 0x40_0000,
                cd_max: 4,
                format: 0,
                dss: 0b10,
            }),
            s2: None,
            shcfg: 1,
            vmid_field: 0,
        };
        // CD 0 and CD 3 valid; CD 2 invalid.
        let cd = |asid: u64| {
            [
                (16 | (1 << 31) | (5 << 32) | (1 << 41) | (1 << 45)) | (asid << 48),
                0x60_0000,
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        };
        put(&mem, 0x40_0000, &cd(1));
        put(&mem, 0x40_0000 + 3 * 64, &cd(3));
        let ctx = resolve_context(&f, &CFG, &stream, None, 0, &mut t)
            .unwrap()
            .unwrap();
        assert_eq!(ctx.asid, 1);
        assert_eq!((ctx.input_bits, ctx.levels), (48, 4));
        assert_eq!(
            resolve_context(&f, &CFG, &stream, Some(3), 0, &mut t)
                .unwrap()
                .unwrap()
                .asid,
            3
        );
        assert_eq!(
            resolve_context(&f, &CFG, &stream, Some(2), 0, &mut t),
            Err(cfg_err(EventKind::BadCd))
        );
        assert_eq!(
            resolve_context(&f, &CFG, &stream, Some(0), 0, &mut t),
            Err(cfg_err(EventKind::StreamDisabled)),
            "substream 0 is taken by the default substream"
        );
        assert_eq!(
            resolve_context(&f, &CFG, &stream, Some(16), 0, &mut t),
            Err(cfg_err(EventKind::BadSubstreamId))
        );
        let terminate = StreamConfig {
            s1: Some(Stage1Pointer {
                dss: 0b00,
                ..stream.s1.unwrap()
            }),
            ..stream
        };
        assert_eq!(
            resolve_context(&f, &CFG, &terminate, None, 0, &mut t),
            Err(cfg_err(EventKind::StreamDisabled))
        );
    }

    #[test]
    fn stage1_walk_checks_access_flag_permissions_and_output_size() {
        let mem = ModelMemory::new();
        let f = MemFetch(&mem);
        let ctx = Context {
            asid: 1,
            input_bits: 39,
            levels: 3,
            ttb0: 0x70_0000,
            output_bits: 40,
            affd: false,
            record: true,
        };
        // L1[0] → L2 table, L2[0] → L3 table, L3[1] page RW+EL0, L3[2] RO
        // without EL0, L3[3] no AF, L2[1] 2 MiB block beyond 40 bits.
        put(&mem, 0x70_0000, &[0x71_0003]);
        put(&mem, 0x71_0000, &[0x72_0003, (1 << 40) | 0x401]);
        put(
            &mem,
            0x72_0008,
            &[0x9000_0403 | (1 << 6), 0x9100_0403 | (1 << 7), 0x9200_0003],
        );
        let leaf = walk_stage1(&f, &ctx, None, 0x1234, None).unwrap();
        assert_eq!(
            (leaf.base, leaf.size, leaf.write, leaf.user),
            (0x9000_0000, 4096, true, true)
        );
        assert_eq!(leaf.tables.len(), 3);
        let ro = walk_stage1(&f, &ctx, None, 0x2000, None).unwrap();
        assert!(!ro.write && !ro.user && !ro.allows(false, false) && ro.allows(false, true));
        assert_eq!(
            walk_stage1(&f, &ctx, None, 0x3000, None),
            Err(stage1_fault(EventKind::Access, &ctx))
        );
        assert_eq!(
            walk_stage1(&f, &ctx, None, 0x20_0000, None),
            Err(stage1_fault(EventKind::AddrSize, &ctx))
        );
        assert_eq!(
            walk_stage1(&f, &ctx, None, 0x4000, None),
            Err(stage1_fault(EventKind::Translation, &ctx))
        );
        assert_eq!(
            walk_stage1(&f, &ctx, None, 1 << 39, None),
            Err(stage1_fault(EventKind::Translation, &ctx)),
            "beyond T0SZ"
        );
    }
}
