//! The I/O and MSR permission maps (AMD APM vol. 2, 15.10.1 and 15.11).
//!
//! A set bit intercepts. Both maps start with everything intercepted and
//! open only what Sluice lets a guest touch directly.

use super::super::{AccessSize, MsrAccess};

/// IOPM size: 12 KiB, three contiguous 4 KiB pages.
pub const IOPM_SIZE: usize = 12 * 1024;
/// MSRPM size: 8 KiB, two contiguous 4 KiB pages.
pub const MSRPM_SIZE: usize = 8 * 1024;

/// The I/O permission map: bit `n` intercepts port `n`. An access of N
/// bytes at port P checks the bits of P..P+N-1, so the map runs past port
/// 0xFFFF into its third page for accesses that wrap (APM vol. 2, 15.10.1).
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct IoPermissionMap {
    bits: [u8; IOPM_SIZE],
}

const _: () = assert!(core::mem::size_of::<IoPermissionMap>() == IOPM_SIZE);

impl IoPermissionMap {
    /// Every port intercepted.
    pub const fn intercept_all() -> Self {
        Self {
            bits: [0xff; IOPM_SIZE],
        }
    }

    fn set(&mut self, bit: usize, intercept: bool) {
        let byte = &mut self.bits[bit / 8];
        if intercept {
            *byte |= 1 << (bit % 8);
        } else {
            *byte &= !(1 << (bit % 8));
        }
    }

    fn get(&self, bit: usize) -> bool {
        self.bits[bit / 8] & (1 << (bit % 8)) != 0
    }

    /// Lets the guest access ports `first..first + count` directly (a
    /// passed-through device's I/O BAR). Ports beyond 0xFFFF are ignored.
    pub fn allow(&mut self, first: u16, count: u32) {
        let end = (u32::from(first) + count).min(0x1_0000);
        for port in u32::from(first)..end {
            self.set(port as usize, false);
        }
    }

    /// Intercepts ports `first..first + count` again.
    pub fn intercept(&mut self, first: u16, count: u32) {
        let end = (u32::from(first) + count).min(0x1_0000);
        for port in u32::from(first)..end {
            self.set(port as usize, true);
        }
    }

    /// Whether an access of `size` at `port` exits, as the processor
    /// decides it.
    pub fn intercepts(&self, port: u16, size: AccessSize) -> bool {
        (0..usize::from(size.bytes())).any(|i| self.get(usize::from(port) + i))
    }

    pub fn as_bytes(&self) -> &[u8; IOPM_SIZE] {
        &self.bits
    }
}

/// MSR ranges the MSRPM covers, with the byte offset of each range's
/// vectors (APM vol. 2, table 15-5). Every MSR outside them is always
/// intercepted.
const MSR_RANGES: [(u32, usize); 3] = [
    (0x0000_0000, 0x0000),
    (0xc000_0000, 0x0800),
    (0xc001_0000, 0x1000),
];
const MSRS_PER_RANGE: u32 = 0x2000;

/// An MSR the MSRPM cannot describe: accesses to it always exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrOutOfRange(pub u32);

/// MSRs whose guest values live in the VMCB state-save area, loaded and
/// saved by VMRUN / VMLOAD / VMSAVE, so that the guest may access them
/// directly: FS.base, GS.base, KernelGSbase, STAR, LSTAR, CSTAR, SFMASK,
/// SYSENTER_CS/ESP/EIP.
pub const VMCB_BACKED_MSRS: [u32; 10] = [
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0x174,
    0x175,
    0x176,
];

/// The MSR permission map: two bits per MSR, the even one intercepts
/// `RDMSR`, the odd one `WRMSR`.
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct MsrPermissionMap {
    bits: [u8; MSRPM_SIZE],
}

const _: () = assert!(core::mem::size_of::<MsrPermissionMap>() == MSRPM_SIZE);

impl MsrPermissionMap {
    pub const fn intercept_all() -> Self {
        Self {
            bits: [0xff; MSRPM_SIZE],
        }
    }

    /// Everything intercepted except [`VMCB_BACKED_MSRS`].
    pub fn sluice_default() -> Self {
        let mut map = Self::intercept_all();
        for msr in VMCB_BACKED_MSRS {
            // Every entry is inside the covered ranges.
            let _ = map.set(msr, MsrAccess::Read, false);
            let _ = map.set(msr, MsrAccess::Write, false);
        }
        map
    }

    /// Bit number of (`msr`, `access`) in the map.
    fn bit(msr: u32, access: MsrAccess) -> Option<usize> {
        MSR_RANGES.iter().find_map(|&(base, offset)| {
            let index = msr.checked_sub(base).filter(|&i| i < MSRS_PER_RANGE)?;
            let write = usize::from(access == MsrAccess::Write);
            Some(offset * 8 + index as usize * 2 + write)
        })
    }

    /// Sets whether (`msr`, `access`) exits.
    pub fn set(
        &mut self,
        msr: u32,
        access: MsrAccess,
        intercept: bool,
    ) -> Result<(), MsrOutOfRange> {
        let bit = Self::bit(msr, access).ok_or(MsrOutOfRange(msr))?;
        let byte = &mut self.bits[bit / 8];
        if intercept {
            *byte |= 1 << (bit % 8);
        } else {
            *byte &= !(1 << (bit % 8));
        }
        Ok(())
    }

    /// Whether (`msr`, `access`) exits, as the processor decides it.
    pub fn intercepts(&self, msr: u32, access: MsrAccess) -> bool {
        match Self::bit(msr, access) {
            Some(bit) => self.bits[bit / 8] & (1 << (bit % 8)) != 0,
            None => true,
        }
    }

    pub fn as_bytes(&self) -> &[u8; MSRPM_SIZE] {
        &self.bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;

    #[test]
    fn iopm_bits_and_wrapping_accesses() {
        let mut m = Box::new(IoPermissionMap::intercept_all());
        assert!(m.intercepts(0x3f8, AccessSize::Byte));
        m.allow(0xc000, 0x20);
        // Port 0xc000 is bit 0 of byte 0x1800.
        assert_eq!(m.as_bytes()[0x1800], 0);
        assert_eq!(m.as_bytes()[0x1803], 0);
        assert_eq!(m.as_bytes()[0x1804], 0xff);
        assert!(!m.intercepts(0xc000, AccessSize::Dword));
        assert!(!m.intercepts(0xc01c, AccessSize::Dword));
        // A dword at 0xc01e reaches 0xc020/0xc021, which are intercepted.
        assert!(m.intercepts(0xc01e, AccessSize::Dword));
        m.intercept(0xc010, 1);
        assert!(m.intercepts(0xc00e, AccessSize::Dword));
        // The top ports: a word at 0xffff also checks bit 0x10000 in the
        // third page, which stays set.
        m.allow(0xfff0, 0x100);
        assert!(!m.intercepts(0xfffe, AccessSize::Word));
        assert!(m.intercepts(0xffff, AccessSize::Word));
        assert_eq!(m.as_bytes()[0x2000], 0xff);
    }

    #[test]
    fn msrpm_ranges_and_bits() {
        let mut m = Box::new(MsrPermissionMap::intercept_all());
        m.set(0x10, MsrAccess::Read, false).unwrap();
        // MSR 0x10: bits 32 (read) and 33 (write) → byte 4, bit 0.
        assert_eq!(m.as_bytes()[4], 0xfe);
        assert!(!m.intercepts(0x10, MsrAccess::Read));
        assert!(m.intercepts(0x10, MsrAccess::Write));
        m.set(0xc000_0080, MsrAccess::Write, false).unwrap();
        // EFER: 0x800 + 0x80 * 2 / 8 = byte 0x820, write bit = bit 1.
        assert_eq!(m.as_bytes()[0x820], 0xfd);
        m.set(0xc001_1fff, MsrAccess::Write, false).unwrap();
        assert_eq!(m.as_bytes()[0x17ff], 0x7f);
        // Outside the three ranges: not settable, always intercepted.
        assert_eq!(
            m.set(0x2000, MsrAccess::Read, false),
            Err(MsrOutOfRange(0x2000))
        );
        assert_eq!(
            m.set(0xc000_2000, MsrAccess::Read, false),
            Err(MsrOutOfRange(0xc000_2000))
        );
        assert_eq!(
            m.set(0x4000_0000, MsrAccess::Read, false),
            Err(MsrOutOfRange(0x4000_0000))
        );
        assert!(m.intercepts(0x4000_0000, MsrAccess::Read));
        // The reserved fourth quarter is never touched.
        assert!(m.as_bytes()[0x1800..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn default_msr_policy() {
        let m = Box::new(MsrPermissionMap::sluice_default());
        for msr in VMCB_BACKED_MSRS {
            assert!(!m.intercepts(msr, MsrAccess::Read), "{msr:#x}");
            assert!(!m.intercepts(msr, MsrAccess::Write), "{msr:#x}");
        }
        // EFER, APIC base, TSC and PAT stay with the hypervisor.
        for msr in [0xc000_0080, 0x1b, 0x10, 0x277] {
            assert!(m.intercepts(msr, MsrAccess::Read), "{msr:#x}");
            assert!(m.intercepts(msr, MsrAccess::Write), "{msr:#x}");
        }
    }
}
