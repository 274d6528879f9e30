//! The built-in QEMU scenarios (`test=<name>` on the command line) and the
//! default demo. Each scenario checks real behaviour and ends with
//! `SLUICE-TEST <name> PASS` or `SLUICE-TEST <name> FAIL <reason>`.

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::info;
use sluice_kernel::fatal::{self, ExitCode};
use sluice_kernel::platform::Platform;
use sluice_kernel::{clock, println};

type Outcome = Result<(), String>;

struct Scenario {
    name: &'static str,
    what: &'static str,
    run: fn(&'static Platform) -> Outcome,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot",
        what: "memory map, frame allocator, paging, clock and ACPI tables are in order",
        run: boot,
    },
    Scenario {
        name: "fault",
        what: "a deliberate CPU exception is reported with its reason",
        run: fault,
    },
    Scenario {
        name: "panic",
        what: "a deliberate panic is reported with its location and message",
        run: deliberate_panic,
    },
    Scenario {
        name: "pci",
        what: "PCI Express enumeration through ECAM finds the board's devices, edu among them",
        run: pci,
    },
    Scenario {
        name: "topology",
        what: "every edu is covered by an IOMMU; edus behind a PCIe-to-PCI bridge share its alias and one group",
        run: topology,
    },
    Scenario {
        name: "edu-dma",
        what: "edu DMA without translation moves bytes both ways (baseline for the IOMMU scenarios)",
        run: edu_dma,
    },
    #[cfg(target_arch = "x86_64")]
    Scenario {
        name: "svm",
        what: "VMRUN runs 64-bit guest code and its VMMCALL, CPUID and HLT exits are handled",
        run: crate::svm_smoke::run,
    },
    #[cfg(target_arch = "x86_64")]
    Scenario {
        name: "vtd-dma",
        what: "edu DMA through VT-d: blocked by default, translated when attached, faults when unmapped, unmapped-after-use or detached",
        run: crate::vtd_dma::run,
    },
    #[cfg(target_arch = "x86_64")]
    Scenario {
        name: "vtd-ownership",
        what: "every DRHD taken over at once: capabilities logged, every edu's DMA blocked with its own source ID",
        run: crate::iommu_owner::scenario,
    },
    #[cfg(target_arch = "x86_64")]
    Scenario {
        name: "guests",
        what: "the vm= guests run under SVM with nested paging and drive their edu DMA through the iommufd hypercalls and VT-d; every step they report and the host-side isolation checks must pass",
        run: crate::vmm::scenario::run,
    },
    #[cfg(target_arch = "aarch64")]
    Scenario {
        name: "guests",
        what: "the vm= guests run at EL1 under Sluice's EL2 with stage-2 translation and drive the iommufd hypercalls over the owned SMMUs; every step they report and the host-side isolation checks must pass",
        run: crate::vmm_arm::scenario::run,
    },
    #[cfg(target_arch = "aarch64")]
    Scenario {
        name: "smmu-dma",
        what: "edu DMA through the SMMUv3: blocked by default, translated when attached, faults when read-only, unmapped, unmapped-after-use or detached",
        run: crate::smmu_dma::run,
    },
    #[cfg(target_arch = "aarch64")]
    Scenario {
        name: "its-msi",
        what: "every GIC ITS taken over; edu MSIs go through the SMMU to the ITS doorbell and raise exactly the LPIs Sluice mapped for their DeviceID",
        run: crate::its_msi::run,
    },
    #[cfg(target_arch = "aarch64")]
    Scenario {
        name: "smmu-ownership",
        what: "every SMMUv3 of the IORT taken over at once: every edu behind one blocked with its own StreamID, edus behind none reported uncovered",
        run: crate::smmu_owner::scenario,
    },
    Scenario {
        name: "smp",
        what: "every CPU the MADT lists starts, reports its identity, counts under a shared spin lock and runs jobs (x86_64: with SVM enabled on it)",
        run: crate::smp_scenario::run,
    },
    Scenario {
        name: "acpi-dump",
        what: "print the IOMMU-related ACPI tables as hex, for host-test fixtures",
        run: acpi_dump,
    },
];

pub fn run(platform: Platform) -> ! {
    // Sluice never gives the platform back: IOMMU units and guests borrow
    // its frame allocator for good.
    let platform: &'static Platform = alloc::boxed::Box::leak(alloc::boxed::Box::new(platform));
    let Some(requested) = platform.command_line.test.clone() else {
        let passed = demo(platform);
        fatal::exit(if passed {
            ExitCode::Success
        } else {
            ExitCode::TestFailed
        });
    };
    let Some(scenario) = SCENARIOS.iter().find(|s| s.name == requested) else {
        let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        println!(
            "SLUICE-TEST {requested} FAIL unknown scenario (known: {})",
            known.join(", ")
        );
        fatal::exit(ExitCode::TestFailed);
    };
    fatal::set_current_test(Some(scenario.name));
    info!("scenario {}: {}", scenario.name, scenario.what);
    match (scenario.run)(platform) {
        Ok(()) => {
            println!("SLUICE-TEST {} PASS", scenario.name);
            fatal::exit(ExitCode::Success)
        }
        Err(why) => {
            println!("SLUICE-TEST {} FAIL {why}", scenario.name);
            fatal::exit(ExitCode::TestFailed)
        }
    }
}

fn list_acpi_tables(platform: &Platform) -> usize {
    let Some(acpi) = &platform.acpi else {
        info!("acpi: firmware published no usable RSDP");
        return 0;
    };
    let tables = acpi.summaries();
    for t in &tables {
        info!(
            "acpi: {} rev {} {:>6} bytes oem {}",
            t.signature_str(),
            t.revision,
            t.length,
            t.oem_str()
        );
    }
    tables.len()
}

fn check(condition: bool, failure: impl FnOnce() -> String) -> Outcome {
    if condition { Ok(()) } else { Err(failure()) }
}

fn boot(platform: &Platform) -> Outcome {
    let usable: u64 = platform
        .memory_map
        .iter()
        .filter(|r| r.kind == sluice_kernel::boot_info::RegionKind::Usable)
        .map(|r| r.pages)
        .sum();
    check(usable > 0, || {
        String::from("the memory map has no usable RAM")
    })?;

    let frame = platform
        .frames
        .lock()
        .allocate(1, 4096)
        .map_err(|e| format!("frame allocator: {e}"))?;
    // SAFETY: the frame was just allocated to us and is identity-mapped.
    unsafe { core::ptr::write_volatile(frame as *mut u64, 0x5151_1ce0) };
    // SAFETY: as above.
    let readback = unsafe { core::ptr::read_volatile(frame as *const u64) };
    platform
        .frames
        .lock()
        .free(frame, 1)
        .map_err(|e| format!("frame allocator: {e}"))?;
    check(readback == 0x5151_1ce0, || {
        format!("frame {frame:#x} did not hold a written value")
    })?;

    check(platform.identity_mapped_bytes > 0, || {
        String::from("Sluice's own page tables are not active")
    })?;

    let before = clock::now_ns().ok_or("the clock is not running")?;
    clock::delay_ns(2_000_000);
    let after = clock::now_ns().ok_or("the clock stopped")?;
    check(after - before >= 2_000_000, || {
        format!("a 2 ms delay took {} ns", after - before)
    })?;

    let heap_probe: Vec<u64> = (0..4096).collect();
    check(heap_probe.iter().sum::<u64>() == 4095 * 4096 / 2, || {
        String::from("heap data corrupted")
    })?;

    let tables = list_acpi_tables(platform);
    check(tables > 0, || String::from("no ACPI tables found"))?;
    let (used, free) = sluice_kernel::memory::heap::usage();
    info!("heap: {} KiB used, {} KiB free", used / 1024, free / 1024);
    Ok(())
}

fn pci(platform: &Platform) -> Outcome {
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    // The per-device boot lines come from the IOMMU association; without
    // IOMMU tables there are none, and enumeration is still checked.
    if let Err(why) = crate::pci::associate(acpi, &pci) {
        log::warn!("pci: {why}");
    }
    let count = pci.functions().count();
    check(count > 0, || {
        String::from("enumeration found no PCI functions")
    })?;
    let edus = pci.functions().filter(|f| crate::edu::is_edu(f)).count();
    check(edus > 0, || {
        format!("no edu device among the {count} functions found")
    })?;
    info!("pci: {count} functions, {edus} edu devices");
    Ok(())
}

fn topology(platform: &Platform) -> Outcome {
    use sluice_pci::caps::PortType;
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let map = crate::pci::associate(acpi, &pci)?;
    let edus: Vec<&sluice_pci::Function> =
        pci.functions().filter(|f| crate::edu::is_edu(f)).collect();
    check(edus.len() >= 2, || {
        format!(
            "the topology scenario needs several edu devices, found {}",
            edus.len()
        )
    })?;
    let mut behind_pci_bridge = Vec::new();
    for f in &edus {
        let d = map
            .device(f.addr)
            .ok_or_else(|| format!("{} has no association entry", f.addr))?;
        let unit = d
            .unit
            .ok_or_else(|| format!("{} is not covered by any IOMMU unit", f.addr))?;
        check(d.assignable, || {
            format!("{} is covered by {unit} but not assignable", f.addr)
        })?;
        // Find the nearest upstream bridge: PCIe-to-PCI bridges rewrite IDs.
        let topology = pci
            .segments
            .iter()
            .find(|t| t.segment == f.addr.segment)
            .ok_or("segment vanished")?;
        let upstream = f.upstream.and_then(|i| topology.functions.get(i));
        match upstream.and_then(|b| b.port_type()) {
            Some(PortType::PcieToPciBridge) => {
                let bridge = upstream.ok_or("bridge vanished")?;
                let alias = d.alias.ok_or_else(|| {
                    format!(
                        "{} sits behind a PCIe-to-PCI bridge but has no DMA alias",
                        f.addr
                    )
                })?;
                let secondary = bridge
                    .bridge
                    .map(|b| b.secondary)
                    .ok_or("bridge without bus numbers")?;
                check(
                    alias.requester_id.bus() == secondary && alias.requester_id.devfn() == 0,
                    || {
                        format!(
                            "{} alias {} is not the bridge's secondary bus {secondary:02x} with devfn 0",
                            f.addr, alias.requester_id
                        )
                    },
                )?;
                behind_pci_bridge.push((f.addr, d.group, alias.requester_id));
            }
            _ => check(d.alias.is_none(), || {
                format!("{} has an unexpected alias", f.addr)
            })?,
        }
        info!(
            "topology: edu {} -> {unit}, group {}, requester id {}",
            f.addr, d.group, d.requester_id
        );
    }
    if let Some((_, group, alias)) = behind_pci_bridge.first().copied() {
        check(behind_pci_bridge.len() >= 2, || {
            String::from("only one edu behind the PCIe-to-PCI bridge")
        })?;
        for (addr, g, a) in &behind_pci_bridge {
            check(*g == group && *a == alias, || {
                format!(
                    "{addr} is in group {g} alias {a}, its neighbour in group {group} alias {alias}"
                )
            })?;
        }
        let others_in_group = edus
            .iter()
            .filter(|f| !behind_pci_bridge.iter().any(|(a, _, _)| *a == f.addr))
            .filter(|f| map.device(f.addr).is_some_and(|d| d.group == group))
            .count();
        check(others_in_group == 0, || {
            String::from("a device not behind the bridge shares the bridge's group")
        })?;
    }
    Ok(())
}

/// Finds the first edu device, enables it and checks its registers.
pub fn first_edu(
    pci: &crate::pci::Pci,
) -> Result<(crate::edu::Edu, sluice_pci::PciAddress), String> {
    let function = pci
        .functions()
        .find(|f| crate::edu::is_edu(f))
        .ok_or("no edu device on this board")?;
    Ok((open_edu(pci, function)?, function.addr))
}

/// Every edu of the board, in enumeration order, memory and bus mastering
/// on.
#[cfg_attr(
    not(target_arch = "aarch64"),
    expect(
        dead_code,
        reason = "only the aarch64 ITS scenario drives two edus from the host"
    )
)]
pub fn all_edus(
    pci: &crate::pci::Pci,
) -> Result<Vec<(crate::edu::Edu, sluice_pci::PciAddress)>, String> {
    pci.functions()
        .filter(|f| crate::edu::is_edu(f))
        .map(|f| Ok((open_edu(pci, f)?, f.addr)))
        .collect()
}

fn open_edu(
    pci: &crate::pci::Pci,
    function: &sluice_pci::Function,
) -> Result<crate::edu::Edu, String> {
    let bar0 = function
        .bars
        .iter()
        .find(|b| b.index == 0 && b.address != 0)
        .ok_or_else(|| format!("edu {} has no assigned BAR 0", function.addr))?;
    pci.enable_memory_and_bus_master(function.addr)?;
    // SAFETY: BAR 0 of an edu function is its register block.
    unsafe { crate::edu::Edu::new(bar0.address, bar0.size) }
}

fn edu_dma(platform: &Platform) -> Outcome {
    use crate::edu::Direction;
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let pci = crate::pci::discover(acpi)?;
    let (edu, addr) = first_edu(&pci)?;
    // Without translation the device sees physical addresses; edu masks
    // them to 28 bits by default, so the buffer sits below 256 MiB unless
    // the board raised edu's dma_mask (aarch64 RAM starts at 1 GiB).
    let limit = if cfg!(target_arch = "x86_64") {
        1 << 28
    } else {
        u64::MAX
    };
    let page = platform
        .frames
        .lock()
        .allocate_below(2, 4096, limit)
        .map_err(|e| format!("no DMA buffer: {e}"))?;
    let source = page as *mut u8;
    let target = (page + 4096) as *mut u8;
    // SAFETY: both pages were just allocated to this scenario and are
    // identity-mapped; the device only touches them during `dma`.
    unsafe {
        for i in 0..1024 {
            source.add(i).write_volatile((i * 7 + 3) as u8);
            target.add(i).write_volatile(0);
        }
    }
    edu.dma(Direction::ToDevice, page, 0, 1024)?;
    edu.dma(Direction::ToRam, page + 4096, 0, 1024)?;
    for i in 0..1024 {
        // SAFETY: as above.
        let (want, got) = unsafe { (source.add(i).read_volatile(), target.add(i).read_volatile()) };
        check(want == got, || {
            format!("byte {i} after the round trip: wrote {want:#x}, read {got:#x}")
        })?;
    }
    info!("edu {addr}: 1024 bytes went RAM → device → RAM at physical {page:#x} unchanged");
    platform
        .frames
        .lock()
        .free(page, 2)
        .map_err(|e| format!("{e}"))?;
    Ok(())
}

/// Prints `ACPI-DUMP <signature> <hex>` for each table the IOMMU and PCI
/// code parses; `qemu-tests/dump-acpi.sh` turns these into fixture files.
fn acpi_dump(platform: &Platform) -> Outcome {
    use sluice_kernel::acpi_tables::{RawDmar, RawIort, RawMadt, RawMcfg, RawSpcr};
    let acpi = platform.acpi.as_ref().ok_or("no ACPI tables")?;
    let tables = [
        ("DMAR", acpi.raw::<RawDmar>()),
        ("IORT", acpi.raw::<RawIort>()),
        ("MCFG", acpi.raw::<RawMcfg>()),
        ("APIC", acpi.raw::<RawMadt>()),
        ("SPCR", acpi.raw::<RawSpcr>()),
    ];
    let mut dumped = 0;
    for (signature, bytes) in tables {
        let Some(bytes) = bytes else { continue };
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            use core::fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        println!("ACPI-DUMP {signature} {hex}");
        dumped += 1;
    }
    check(dumped > 0, || {
        String::from("none of DMAR, IORT, MCFG, APIC, SPCR was found")
    })
}

fn deliberate_panic(_platform: &Platform) -> Outcome {
    info!("panic: panicking on purpose; the panic handler must report it");
    panic!("deliberate panic from the panic scenario")
}

fn fault(_platform: &Platform) -> Outcome {
    info!(
        "fault: reading an address outside Sluice's identity map; the exception handler must report it"
    );
    sluice_kernel::arch::trigger_fault()
}

/// The default boot: the VMs of the command line, else the
/// platform bring-up summary. Returns whether everything worked.
fn demo(platform: &'static Platform) -> bool {
    if !platform.command_line.vms.is_empty() {
        #[cfg(target_arch = "x86_64")]
        return crate::vmm::scenario::demo(platform);
        #[cfg(target_arch = "aarch64")]
        return crate::vmm_arm::scenario::demo(platform);
    }
    println!("Sluice demo: platform bring-up");
    let tables = list_acpi_tables(platform);
    #[cfg(target_arch = "x86_64")]
    let _iommus = demo_iommus(platform);
    #[cfg(target_arch = "aarch64")]
    let _smmus = demo_smmus(platform);
    println!(
        "  {} ACPI tables, {} MiB of RAM free for guests and IOMMU structures, clock at {} MHz",
        tables,
        platform.frames.lock().free_frames() / 256,
        clock::frequency() / 1_000_000
    );
    println!("  No vm= words on the command line: no guests to run (see docs/boot-protocol.md).");
    println!("Sluice demo done.");
    true
}

/// The normal boot path's IOMMU step: every VT-d unit taken over, every
/// device blocked until assigned. `None` (logged) when there is nothing to
/// own or PCI could not be read.
#[cfg(target_arch = "x86_64")]
fn demo_iommus(platform: &'static Platform) -> Option<crate::iommu_owner::OwnedIommus> {
    let acpi = platform.acpi.as_ref()?;
    let owned = crate::pci::discover(acpi)
        .and_then(|pci| crate::pci::associate(acpi, &pci))
        .and_then(|map| crate::iommu_owner::take_ownership(platform, &map));
    match owned {
        Ok(owned) => {
            println!(
                "  {} VT-d unit(s) owned, {} devices blocked ({} with RMRRs), {} not isolated",
                owned.units.len(),
                owned.device_unit.len(),
                owned.rmrr_devices.len(),
                owned.uncovered.len()
            );
            Some(owned)
        }
        Err(why) => {
            log::error!("iommu: {why}");
            None
        }
    }
}

/// The aarch64 counterpart of `demo_iommus`: every SMMUv3 of the IORT
/// taken over, every stream aborting until assigned. `None` (logged) when
/// there is nothing to own or PCI could not be read.
#[cfg(target_arch = "aarch64")]
fn demo_smmus(platform: &'static Platform) -> Option<crate::smmu_owner::OwnedSmmus> {
    let acpi = platform.acpi.as_ref()?;
    let owned = crate::pci::discover(acpi)
        .and_then(|pci| crate::pci::associate(acpi, &pci))
        .and_then(|map| crate::smmu_owner::take_ownership(platform, &map));
    match owned {
        Ok(owned) => {
            println!(
                "  {} SMMU(s) owned, {} devices blocked ({} with RMRs), {} not isolated",
                owned.units.len(),
                owned.device_unit.len(),
                owned
                    .device_unit
                    .keys()
                    .filter(|&&a| owned.is_rmr_device(a))
                    .count(),
                owned.uncovered.len()
            );
            Some(owned)
        }
        Err(why) => {
            log::error!("iommu: {why}");
            None
        }
    }
}
