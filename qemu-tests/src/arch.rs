//! The two architectures Sluice boots on, and what each needs from the host.

use std::fmt;
use std::str::FromStr;

/// A CPU architecture Sluice is built for and booted on under QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// q35 with an emulated Intel VT-d (`intel-iommu`), firmware OVMF.
    X86_64,
    /// virt with an emulated SMMUv3, firmware AAVMF.
    Aarch64,
}

impl Arch {
    /// Both architectures, in the order the harness runs them.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The name used on the command line, in log names and ESP directories.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The rustc target the UEFI application is built for.
    pub const fn uefi_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-uefi",
            Arch::Aarch64 => "aarch64-unknown-uefi",
        }
    }

    /// The removable-media boot file name the firmware looks for (UEFI spec 2.10, 3.5.1.1).
    pub const fn boot_file_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "BOOTX64.EFI",
            Arch::Aarch64 => "BOOTAA64.EFI",
        }
    }

    /// The QEMU system emulator for this architecture.
    pub const fn qemu_program(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// The Debian package that ships [`Arch::qemu_program`].
    pub const fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "x86-64" | "x64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(format!(
                "unknown architecture `{other}`: expected `x86_64` or `aarch64`"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>(), Ok(arch));
        }
        assert_eq!("arm64".parse::<Arch>(), Ok(Arch::Aarch64));
        assert!("riscv64".parse::<Arch>().unwrap_err().contains("riscv64"));
    }
}
