//! The scenario table: every QEMU boot the harness runs, declared in one place.
//!
//! A new scenario is one entry in [`SCENARIOS`]; fields it does not mention
//! come from [`Scenario::DEFAULT`].

use std::time::Duration;

use crate::arch::Arch;

/// What a scenario is expected to end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// A `SLUICE-TEST <name> PASS` line and Sluice exit code 0.
    Pass,
    /// A failure whose reason (result line and exit status, as the harness
    /// words it) contains `reason_contains`. Used to prove the harness can fail.
    Fail { reason_contains: &'static str },
}

/// One QEMU boot of Sluice with a given command line, board options and expectation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Unique name; the log is `target/qemu-tests/<arch>-<name>.log`.
    pub name: &'static str,
    /// Architectures the scenario runs on (once per architecture).
    pub arches: &'static [Arch],
    /// Extra QEMU arguments, placed after the IOMMU, e.g. `&["-device", "edu"]`.
    pub qemu_args: &'static [&'static str],
    /// Properties of the x86 `intel-iommu` device, e.g. `"aw-bits=48,caching-mode=on"`;
    /// empty for QEMU's defaults. Not applicable on aarch64 (QEMU 7.2's
    /// `virt,iommu=smmuv3` has no properties), where it must stay empty.
    pub intel_iommu: &'static str,
    /// The Sluice command line written to `\EFI\sluice\cmdline.txt`.
    pub cmdline: &'static str,
    /// Number of vCPUs (`-smp`).
    pub smp: u32,
    /// Guest memory (`-m`), in QEMU's syntax.
    pub mem: &'static str,
    /// Wall-clock limit for the whole boot; QEMU is killed when it is reached.
    pub time_limit: Duration,
    /// The outcome the harness must observe for the scenario to count as passed.
    pub expected: Expected,
}

/// Both architectures.
pub const BOTH: &[Arch] = &Arch::ALL;

impl Scenario {
    /// The values a table entry gets for the fields it leaves out.
    pub const DEFAULT: Scenario = Scenario {
        name: "",
        arches: BOTH,
        qemu_args: &[],
        intel_iommu: "",
        cmdline: "",
        smp: 1,
        mem: "1G",
        // Firmware takes 4-6 s to reach Sluice under TCG; the rest is slack
        // for a loaded two-core machine.
        time_limit: Duration::from_secs(120),
        expected: Expected::Pass,
    };

    /// The test name Sluice reports in `SLUICE-TEST <name> ...`: the value of
    /// the `test=` word of the command line, or the scenario name without one.
    pub fn test_name(&self) -> &'static str {
        self.cmdline
            .split_ascii_whitespace()
            .find_map(|word| word.strip_prefix("test="))
            .unwrap_or(self.name)
    }

    /// `<arch>-<name>`, the scenario's id in logs, ESP directories and the summary.
    pub fn id(&self, arch: Arch) -> String {
        format!("{}-{}", arch.name(), self.name)
    }

    /// Whether the scenario runs on `arch`.
    pub fn runs_on(&self, arch: Arch) -> bool {
        self.arches.contains(&arch)
    }
}

/// Every QEMU scenario. `cargo xtask test` runs each on each of its architectures.
pub const SCENARIOS: &[Scenario] = &[
    // Sluice boots, brings up its console and reports success.
    Scenario {
        name: "boot",
        cmdline: "test=boot",
        ..Scenario::DEFAULT
    },
    // The harness self-test: Sluice takes a deliberate CPU exception, and the
    // harness must report it as a failure naming the exception.
    Scenario {
        name: "fault",
        cmdline: "test=fault",
        expected: Expected::Fail {
            reason_contains: "cpu exception",
        },
        ..Scenario::DEFAULT
    },
    // The panic path: Sluice panics on purpose, prints the location and
    // message, and exits with the panic status; the harness must fail it.
    Scenario {
        name: "panic",
        cmdline: "test=panic",
        expected: Expected::Fail {
            reason_contains: "panic: deliberate panic",
        },
        ..Scenario::DEFAULT
    },
    // PCI Express enumeration through ECAM finds the board's devices, edu among them.
    Scenario {
        name: "pci",
        cmdline: "test=pci",
        qemu_args: EDU,
        ..Scenario::DEFAULT
    },
    // edu DMA without translation moves bytes both ways: the baseline for
    // the IOMMU scenarios.
    Scenario {
        name: "edu-dma",
        cmdline: "test=edu-dma",
        qemu_args: EDU,
        ..Scenario::DEFAULT
    },
    // AMD SVM under TCG: VMRUN runs 64-bit guest code and its VMMCALL,
    // CPUID and HLT exits are handled (x86_64 only: TCG has no VMX, and
    // aarch64 guests are another backend).
    Scenario {
        name: "svm",
        arches: &[Arch::X86_64],
        cmdline: "test=svm",
        ..Scenario::DEFAULT
    },
    // Device-to-IOMMU association on a real topology: edu on the root
    // complex, behind a PCIe root port, and two behind a PCIe-to-PCI bridge
    // (one DMA alias, one group); every edu covered by the board's IOMMU.
    Scenario {
        name: "topology",
        cmdline: "test=topology",
        qemu_args: TOPOLOGY,
        ..Scenario::DEFAULT
    },
    // VT-d isolation proven with edu DMA: blocked by default, translated
    // when attached, faults for read-only, unmapped, unmapped-after-use and
    // detached. Run across QEMU's VT-d matrix (QEMU 7.2 always offers
    // queued invalidation, so the register-based path is host-tested only).
    Scenario {
        name: "vtd-dma-legacy",
        arches: &[Arch::X86_64],
        cmdline: "test=vtd-dma",
        qemu_args: &["-device", "edu"],
        ..Scenario::DEFAULT
    },
    Scenario {
        name: "vtd-dma-scalable",
        arches: &[Arch::X86_64],
        intel_iommu: "x-scalable-mode=on",
        cmdline: "test=vtd-dma",
        qemu_args: &["-device", "edu"],
        ..Scenario::DEFAULT
    },
    Scenario {
        name: "vtd-dma-aw48-caching-mode",
        arches: &[Arch::X86_64],
        intel_iommu: "aw-bits=48,caching-mode=on",
        cmdline: "test=vtd-dma",
        qemu_args: &["-device", "edu"],
        ..Scenario::DEFAULT
    },
    Scenario {
        name: "vtd-dma-scalable-snoop-control",
        arches: &[Arch::X86_64],
        intel_iommu: "x-scalable-mode=on,snoop-control=on,aw-bits=48",
        cmdline: "test=vtd-dma",
        qemu_args: &["-device", "edu"],
        ..Scenario::DEFAULT
    },
    // Boot-time ownership of every DRHD: capabilities logged, and every
    // edu (on the root complex, behind a root port, behind a PCIe-to-PCI
    // bridge) blocked, faulting with its own source ID or its alias.
    Scenario {
        name: "vtd-ownership",
        arches: &[Arch::X86_64],
        cmdline: "test=vtd-ownership",
        qemu_args: TOPOLOGY,
        ..Scenario::DEFAULT
    },
    // The same with interrupt remapping explicitly on (TCG needs no
    // split irqchip) in scalable mode, and explicitly off, where it must
    // be reported off.
    Scenario {
        name: "vtd-ownership-scalable-intremap",
        arches: &[Arch::X86_64],
        intel_iommu: "intremap=on,x-scalable-mode=on",
        cmdline: "test=vtd-ownership",
        qemu_args: TOPOLOGY,
        ..Scenario::DEFAULT
    },
    Scenario {
        name: "vtd-ownership-intremap-off",
        arches: &[Arch::X86_64],
        intel_iommu: "intremap=off",
        cmdline: "test=vtd-ownership",
        qemu_args: &["-device", "edu"],
        ..Scenario::DEFAULT
    },
    // SMMUv3 isolation proven with edu DMA (aarch64): blocked by default,
    // translated when attached, faults for read-only, unmapped,
    // unmapped-after-use and detached. edu's DMA mask is raised so the
    // 48-bit IOVAs reach the SMMU unmasked.
    Scenario {
        name: "smmu-dma",
        arches: &[Arch::Aarch64],
        cmdline: "test=smmu-dma",
        qemu_args: EDU,
        ..Scenario::DEFAULT
    },
    // GIC ITS ownership (aarch64): two edus' MSIs go through the SMMU to
    // the ITS doorbell; only the (DeviceID, EventID) Sluice mapped raise
    // an LPI, each its own, and a stray MSI IOVA is an SMMU fault.
    Scenario {
        name: "its-msi",
        arches: &[Arch::Aarch64],
        cmdline: "test=its-msi",
        qemu_args: WIDE_EDUS,
        ..Scenario::DEFAULT
    },
    // Boot-time ownership of every SMMUv3 (aarch64): the edu on bus 0 is
    // blocked with its own StreamID; edus on buses the IORT sends past the
    // SMMU are reported uncovered.
    Scenario {
        name: "smmu-ownership",
        arches: &[Arch::Aarch64],
        cmdline: "test=smmu-ownership",
        qemu_args: TOPOLOGY,
        ..Scenario::DEFAULT
    },
    // Every CPU the MADT lists starts (x86_64: INIT/STARTUP IPIs and the
    // real-mode trampoline; aarch64: PSCI CPU_ON), reports its identity,
    // counts under a shared spin lock, enables SVM on x86_64 and runs jobs
    // the boot CPU hands it.
    Scenario {
        name: "smp",
        cmdline: "test=smp",
        smp: 2,
        ..Scenario::DEFAULT
    },
    // Two guests under SVM, victim and attacker (see GUESTS_X86), on the
    // legacy and the scalable-mode VT-d tables.
    GUESTS_X86,
    Scenario {
        name: "guests-scalable",
        intel_iommu: "intremap=on,x-scalable-mode=on",
        ..GUESTS_X86
    },
    // One guest making hostile hypercalls: every one fails with its errno
    // and the guest (and Sluice) keep running.
    Scenario {
        name: "guests-hostile",
        arches: &[Arch::X86_64],
        intel_iommu: "intremap=on",
        cmdline: "test=guests vm=hostile:mem=16M:image=test-guest:dev=00:01.0:args=hostile",
        qemu_args: &["-device", "edu"],
        ..Scenario::DEFAULT
    },
    // aarch64: the test guest at EL1 under Sluice's EL2 (stage-2
    // translation, the world switch, exits decoded from ESR_EL2), making
    // hostile hypercalls through HVC: every one fails with its errno and
    // the guest (and Sluice) keep running. No device: the SMMU side is the
    // dma scenario's.
    Scenario {
        name: "el2-guests-hostile",
        arches: &[Arch::Aarch64],
        cmdline: "test=guests vm=hostile:mem=16M:image=test-guest:args=hostile",
        ..Scenario::DEFAULT
    },
    // aarch64: the same two guests at EL1 behind the SMMUv3 (see
    // GUESTS_AARCH64).
    GUESTS_AARCH64,
];

/// Guests under SVM with nested paging, each owning an edu: `victim` runs
/// the test guest's `dma` scenario (map, bind, attach, DMA both ways,
/// faults into its queue, unmap, replace, detach, unbind) and leaves a
/// buffer mapped; `attacker`, on the second CPU, aims its own edu at that
/// buffer's IOVA and GPA. Sluice checks every guest step and, from the
/// host, that the victim's buffer is intact. Interrupt remapping is on:
/// without it binding is refused (MSIs not isolated). The x86_64 demo
/// boots this board (see [`guests_scenario`]).
pub const GUESTS_X86: Scenario = Scenario {
    name: "guests-legacy",
    arches: &[Arch::X86_64],
    intel_iommu: "intremap=on",
    cmdline: GUESTS,
    qemu_args: EDUS,
    smp: 2,
    ..Scenario::DEFAULT
};

/// aarch64: the two-VM guests scenario at EL1 under Sluice's EL2, each VM
/// on its own CPU with its edu behind the SMMUv3: `victim` runs the whole
/// dma life cycle, `attacker` aims its edu at the victim's IOVA and GPA;
/// Sluice checks every step and the victim's buffer from the host. MSIs are
/// isolated by the GIC ITS Sluice owns, so the VMs bind without
/// allow_unsafe_interrupts. The aarch64 demo boots this board (see
/// [`guests_scenario`]).
pub const GUESTS_AARCH64: Scenario = Scenario {
    name: "el2-guests",
    arches: &[Arch::Aarch64],
    cmdline: GUESTS,
    qemu_args: WIDE_EDUS,
    smp: 2,
    ..Scenario::DEFAULT
};

/// The two-VM guests scenario of `arch`: its board (devices, CPUs, IOMMU
/// properties) and its `vm=` words without `test=` make the demo
/// (`crate::qemu::BootRequest::demo`).
pub const fn guests_scenario(arch: Arch) -> &'static Scenario {
    match arch {
        Arch::X86_64 => &GUESTS_X86,
        Arch::Aarch64 => &GUESTS_AARCH64,
    }
}

/// One edu per VM of [`GUESTS`], with edu's default 28-bit DMA mask: on
/// x86_64 the guests' RAM and IOVAs sit below 256 MiB.
pub const EDUS: &[&str] = &["-device", "edu", "-device", "edu"];

/// Two edus whose DMA mask reaches virt's RAM above 1 GiB: the attacker of
/// the aarch64 guests scenario aims at GPAs there.
pub const WIDE_EDUS: &[&str] = &[
    "-device",
    "edu,dma_mask=0xffffffffffffffff",
    "-device",
    "edu,dma_mask=0xffffffffffffffff",
];

/// The two VMs of the guests scenarios and the demo, as one literal so
/// that [`GUEST_VMS`] and [`GUESTS`] cannot drift apart (`concat!` takes
/// literals, not constants). `victim` owns the first edu (00:01.0) and runs
/// the test guest's `dma` scenario; `attacker` owns the second (00:02.0).
macro_rules! guest_vms {
    () => {
        "vm=victim:mem=16M:image=test-guest:dev=00:01.0:args=dma \
         vm=attacker:mem=16M:image=test-guest:dev=00:02.0:args=attacker"
    };
}

/// The `vm=` words of the two-VM guests scenarios, without `test=`: with
/// no `test=` word Sluice runs them as its demo.
pub const GUEST_VMS: &str = guest_vms!();

/// The two-VM command line of the guest scenarios.
pub const GUESTS: &str = concat!("test=guests ", guest_vms!());

/// The topology scenario's devices: edu on the root complex, behind a PCIe
/// root port, and two behind a PCIe-to-PCI bridge.
pub const TOPOLOGY: &[&str] = &[
    "-device",
    "edu",
    "-device",
    "pcie-root-port,id=rp1,chassis=1,slot=1",
    "-device",
    "edu,bus=rp1",
    "-device",
    "pcie-pci-bridge,id=br1,bus=pcie.0",
    "-device",
    "edu,bus=br1,addr=1",
    "-device",
    "edu,bus=br1,addr=2",
];

/// One `edu` DMA device with its DMA mask raised from 28 to 64 bits: virt's
/// RAM starts at 1 GiB, beyond what the default mask reaches.
pub const EDU: &[&str] = &["-device", "edu,dma_mask=0xffffffffffffffff"];

/// The scenario called `name`, if the table has one.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|scenario| scenario.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_is_well_formed() {
        let mut names = HashSet::new();
        for scenario in SCENARIOS {
            assert!(names.insert(scenario.name), "duplicate {}", scenario.name);
            assert!(!scenario.name.is_empty());
            assert!(
                scenario
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{}: names become file names",
                scenario.name
            );
            assert!(!scenario.arches.is_empty(), "{}", scenario.name);
            assert!(scenario.cmdline.is_ascii(), "{}", scenario.name);
            assert!(scenario.smp >= 1, "{}", scenario.name);
            assert!(!scenario.time_limit.is_zero(), "{}", scenario.name);
            assert!(
                scenario.intel_iommu.is_empty() || scenario.arches == [Arch::X86_64],
                "{}: intel-iommu properties only apply to an x86_64-only scenario",
                scenario.name
            );
        }
    }

    #[test]
    fn first_scenarios_are_present() {
        let boot = find("boot").expect("boot scenario");
        assert_eq!(boot.test_name(), "boot");
        assert_eq!(boot.expected, Expected::Pass);
        assert_eq!(boot.arches, BOTH);
        let fault = find("fault").expect("fault scenario");
        assert_eq!(fault.test_name(), "fault");
        assert_eq!(
            fault.expected,
            Expected::Fail {
                reason_contains: "cpu exception"
            }
        );
        assert!(find("no-such-scenario").is_none());
    }

    #[test]
    fn guests_scenarios_share_their_vms_with_the_demo() {
        assert_eq!(GUESTS, format!("test=guests {GUEST_VMS}"));
        assert!(
            !GUEST_VMS
                .split_ascii_whitespace()
                .any(|w| w.starts_with("test=")),
            "{GUEST_VMS}"
        );
        assert_eq!(GUEST_VMS.split_ascii_whitespace().count(), 2);
        for arch in Arch::ALL {
            let guests = guests_scenario(arch);
            assert_eq!(guests.arches, [arch], "{}", guests.name);
            assert_eq!(find(guests.name), Some(guests), "in the table");
            assert_eq!(guests.cmdline, GUESTS);
            assert_eq!(guests.test_name(), "guests");
            assert_eq!(guests.smp, 2, "one CPU per VM");
            let edus = guests
                .qemu_args
                .iter()
                .filter(|arg| arg.starts_with("edu"))
                .count();
            assert_eq!(edus, 2, "one edu per VM on {arch}");
        }
        assert_eq!(guests_scenario(Arch::X86_64).name, "guests-legacy");
        assert_eq!(guests_scenario(Arch::Aarch64).name, "el2-guests");
        // scalable mode differs from guests-legacy only in its VT-d tables.
        let scalable = find("guests-scalable").unwrap();
        assert_eq!(
            *scalable,
            Scenario {
                name: "guests-scalable",
                intel_iommu: "intremap=on,x-scalable-mode=on",
                ..GUESTS_X86
            }
        );
        assert_eq!(scalable.qemu_args, ["-device", "edu", "-device", "edu"]);
    }

    #[test]
    fn test_name_comes_from_the_command_line() {
        let scenario = Scenario {
            name: "boot-48bit",
            cmdline: "loglevel=debug test=boot",
            ..Scenario::DEFAULT
        };
        assert_eq!(scenario.test_name(), "boot");
        assert_eq!(scenario.id(Arch::Aarch64), "aarch64-boot-48bit");
        let unnamed = Scenario {
            name: "demo",
            ..Scenario::DEFAULT
        };
        assert_eq!(unnamed.test_name(), "demo");
    }
}
