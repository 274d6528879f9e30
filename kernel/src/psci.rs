//! The Power State Coordination Interface as far as starting and stopping
//! CPUs needs it (Arm DEN0022 "Arm Power State Coordination Interface",
//! issue D): function IDs, return codes, and the choice of conduit.
//!
//! The calls themselves are in `arch::aarch64::smp`; this part is pure and
//! tested on the host.

use core::fmt;

/// Function IDs (DEN0022 §5.1, table 5): SMC32 for calls without 64-bit
/// arguments, SMC64 for those that take addresses.
pub mod function {
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    pub const CPU_ON_64: u32 = 0xc400_0003;
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
}

/// A PSCI error return (DEN0022 §5.2.2, table 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciError {
    NotSupported,
    InvalidParameters,
    Denied,
    AlreadyOn,
    OnPending,
    InternalFailure,
    NotPresent,
    Disabled,
    InvalidAddress,
    /// A negative value the specification does not define.
    Unknown(i32),
}

impl PsciError {
    /// Decodes a call's return value (an int32 in w0): non-negative values
    /// are results, negative ones errors.
    pub fn check(x0: u64) -> Result<u32, PsciError> {
        let value = x0 as u32 as i32;
        if value >= 0 {
            return Ok(value as u32);
        }
        Err(match value {
            -1 => Self::NotSupported,
            -2 => Self::InvalidParameters,
            -3 => Self::Denied,
            -4 => Self::AlreadyOn,
            -5 => Self::OnPending,
            -6 => Self::InternalFailure,
            -7 => Self::NotPresent,
            -8 => Self::Disabled,
            -9 => Self::InvalidAddress,
            other => Self::Unknown(other),
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::NotSupported => "NOT_SUPPORTED",
            Self::InvalidParameters => "INVALID_PARAMETERS",
            Self::Denied => "DENIED",
            Self::AlreadyOn => "ALREADY_ON",
            Self::OnPending => "ON_PENDING",
            Self::InternalFailure => "INTERNAL_FAILURE",
            Self::NotPresent => "NOT_PRESENT",
            Self::Disabled => "DISABLED",
            Self::InvalidAddress => "INVALID_ADDRESS",
            Self::Unknown(_) => "an undefined error",
        }
    }
}

impl fmt::Display for PsciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(v) => write!(f, "undefined PSCI error {v}"),
            other => f.write_str(other.name()),
        }
    }
}

/// How PSCI calls reach the firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conduit {
    Smc,
    Hvc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConduitError {
    /// The FADT's ARM boot flags do not say PSCI_COMPLIANT.
    NotCompliant,
    /// The FADT says HVC, but Sluice runs at EL2: an HVC would trap to
    /// Sluice itself, not to a PSCI implementation.
    HvcFromEl2,
}

impl fmt::Display for ConduitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotCompliant => {
                "firmware does not implement PSCI (FADT ARM boot flags lack PSCI_COMPLIANT)"
            }
            Self::HvcFromEl2 => {
                "the FADT says PSCI is reached by HVC, but Sluice runs at EL2 where HVC would call itself"
            }
        })
    }
}

/// The conduit the FADT's ARM boot architecture flags name (ACPI 6.5
/// §5.2.9.4, table 5.12: bit 0 PSCI_COMPLIANT, bit 1 PSCI_USE_HVC), checked
/// against the exception level Sluice runs at.
pub fn conduit(
    psci_compliant: bool,
    use_hvc: bool,
    current_el: u64,
) -> Result<Conduit, ConduitError> {
    match (psci_compliant, use_hvc) {
        (false, _) => Err(ConduitError::NotCompliant),
        (true, true) if current_el >= 2 => Err(ConduitError::HvcFromEl2),
        (true, true) => Ok(Conduit::Hvc),
        (true, false) => Ok(Conduit::Smc),
    }
}

/// PSCI_VERSION's result: major in bits [31:16], minor in [15:0].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    pub const fn from_raw(raw: u32) -> Self {
        Self {
            major: (raw >> 16) as u16,
            minor: raw as u16,
        }
    }

    /// CPU_ON with the standard function IDs exists from PSCI 0.2 on.
    pub fn has_standard_cpu_on(self) -> bool {
        self >= Self { major: 0, minor: 2 }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// AFFINITY_INFO's result for one CPU (DEN0022 §5.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityState {
    On,
    Off,
    OnPending,
    Unknown(u32),
}

impl AffinityState {
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::On,
            1 => Self::Off,
            2 => Self::OnPending,
            other => Self::Unknown(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_codes_decode_by_name() {
        assert_eq!(PsciError::check(0), Ok(0));
        assert_eq!(PsciError::check(0x1_0002), Ok(0x1_0002));
        // The int32 lives in w0; the upper half of x0 is not part of it.
        assert_eq!(PsciError::check(0xdead_0000_0000_0001), Ok(1));
        let cases = [
            (-1i64, PsciError::NotSupported, "NOT_SUPPORTED"),
            (-2, PsciError::InvalidParameters, "INVALID_PARAMETERS"),
            (-3, PsciError::Denied, "DENIED"),
            (-4, PsciError::AlreadyOn, "ALREADY_ON"),
            (-5, PsciError::OnPending, "ON_PENDING"),
            (-6, PsciError::InternalFailure, "INTERNAL_FAILURE"),
            (-7, PsciError::NotPresent, "NOT_PRESENT"),
            (-8, PsciError::Disabled, "DISABLED"),
            (-9, PsciError::InvalidAddress, "INVALID_ADDRESS"),
        ];
        for (raw, error, name) in cases {
            assert_eq!(PsciError::check(raw as u64), Err(error));
            assert_eq!(error.name(), name);
            // A 32-bit negative value without sign extension is the same error.
            assert_eq!(PsciError::check(u64::from(raw as i32 as u32)), Err(error));
        }
        assert_eq!(
            PsciError::check(-42i64 as u64),
            Err(PsciError::Unknown(-42))
        );
        assert_eq!(
            PsciError::Unknown(-42).to_string(),
            "undefined PSCI error -42"
        );
    }

    #[test]
    fn conduit_follows_the_fadt_and_the_exception_level() {
        assert_eq!(conduit(true, false, 2), Ok(Conduit::Smc));
        assert_eq!(conduit(true, true, 1), Ok(Conduit::Hvc));
        assert_eq!(conduit(true, true, 2), Err(ConduitError::HvcFromEl2));
        assert_eq!(conduit(false, false, 2), Err(ConduitError::NotCompliant));
        assert_eq!(conduit(false, true, 1), Err(ConduitError::NotCompliant));
    }

    #[test]
    fn versions_and_affinity_states() {
        let v = Version::from_raw(0x0001_0001);
        assert_eq!((v.major, v.minor), (1, 1));
        assert_eq!(v.to_string(), "1.1");
        assert!(v.has_standard_cpu_on());
        assert!(Version::from_raw(0x0000_0002).has_standard_cpu_on());
        assert!(!Version::from_raw(0x0000_0001).has_standard_cpu_on());
        assert_eq!(AffinityState::from_raw(0), AffinityState::On);
        assert_eq!(AffinityState::from_raw(1), AffinityState::Off);
        assert_eq!(AffinityState::from_raw(2), AffinityState::OnPending);
        assert_eq!(AffinityState::from_raw(7), AffinityState::Unknown(7));
    }
}
