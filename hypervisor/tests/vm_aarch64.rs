//! An aarch64 VM on the host: the aarch64 direct boot (ELF checks, start
//! info, entry state), `build_aarch64` over a real Arm stage-2 table
//! (checked with the engine's independent walker), and the run loop over
//! the EL2 backend with a scripted world switch playing a guest that
//! prints, makes hypercalls, reads its device through ECAM and halts.

use std::rc::Rc;

use sluice_abi::{self as abi, AbiStruct, cmd};
use sluice_hal::model::ModelMemory;
use sluice_hypervisor::iommufd::{GuestMemory, IommuCaps, Iommufd, VmConfig, VmId};
use sluice_hypervisor::testing::MockIommu;
use sluice_hypervisor::vcpu::el2::{
    El2Backend, El2Features, El2Hardware, ExceptionKind, ExitSyndrome, GuestContext, GuestControl,
    sysregs,
};
use sluice_hypervisor::vcpu::{VcpuBackend, VcpuError, pstate};
use sluice_hypervisor::vm::boot::{
    self, BootError, ElfError, Machine, StartInfoDevice, aarch64_layout, console_kind, region_kind,
};
use sluice_hypervisor::vm::config::{AssignedPci, ValidVm, VmConfig as VmDescription};
use sluice_hypervisor::vm::exits::CpuidSource;
use sluice_hypervisor::vm::instance::{
    BuildError, BuildInputs, DeviceFacts, RunEnd, RunHost, build_aarch64, device_id,
    register_with_iommufd, run_vcpu,
};
use sluice_hypervisor::vm::memory::{GuestRam, ModelFrames};
use sluice_iommu::pagetable::walk::walk;
use sluice_iommu::pagetable::{IoPageTable, PageSize, PageTableFormat, TableConfig};
use sluice_pci::caps::PortType;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{PciAddress, Segment, Topology, enumerate};

const RAM: u64 = aarch64_layout::RAM_BASE;
const CODE: u64 = RAM + 0x20_0000;
const EDU: PciAddress = PciAddress::new(0, 0, 3, 0);
const VM: VmId = VmId(3);
/// `WFI`.
const WFI: [u8; 4] = 0xd503_207fu32.to_le_bytes();

/// A static aarch64 executable: one R+X segment at `gpa` holding `code`,
/// entry at its start.
fn image(machine: u16, gpa: u64, code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let data = phoff + 56;
    let mut out = vec![0u8; data as usize];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2;
    out[5] = 1;
    out[6] = 1;
    out[16..18].copy_from_slice(&2u16.to_le_bytes());
    out[18..20].copy_from_slice(&machine.to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&gpa.to_le_bytes());
    out[32..40].copy_from_slice(&phoff.to_le_bytes());
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[54..56].copy_from_slice(&56u16.to_le_bytes());
    out[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    out[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    out[ph + 8..ph + 16].copy_from_slice(&data.to_le_bytes());
    out[ph + 16..ph + 24].copy_from_slice(&gpa.to_le_bytes());
    out[ph + 24..ph + 32].copy_from_slice(&gpa.to_le_bytes());
    out[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    out[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes());
    out.extend_from_slice(code);
    out
}

fn arm_image() -> Vec<u8> {
    image(183, CODE, &WFI)
}

fn frames() -> &'static ModelFrames {
    Box::leak(Box::new(ModelFrames::new()))
}

#[test]
fn direct_boot_start_info_and_entry_state() {
    let ram = GuestRam::new(frames(), &aarch64_layout::ram_regions(16 << 20)).unwrap();
    let edu = StartInfoDevice {
        guest_bdf: abi::bdf(0, 0, 1, 0),
        vendor_id: 0x1234,
        device_id: 0x11e8,
        class_code: 0x00_ff_00,
        iommu_group: 4,
    };
    let booted = boot::boot_aarch64(&ram, ram.regions(), &arm_image(), &[edu], "hostile").unwrap();
    let e = booted.entry_state;
    assert_eq!(e.registers.pc, CODE);
    assert_eq!(e.registers.x[0], RAM + 0x2000, "X0 = start info");
    assert!(e.registers.x[1..].iter().all(|&x| x == 0));
    // EL1h, D/A/I/F masked; MMU off; FP usable; stack at the top of the
    // boot area.
    assert_eq!(e.registers.pstate, 0x3c5);
    assert_eq!(e.sp_el1, RAM + 0x10_0000);
    assert_eq!(e.sctlr_el1 & 1, 0, "MMU off");
    assert_eq!(e.sctlr_el1, sysregs::SCTLR_EL1_MMU_OFF);
    assert_eq!((e.cpacr_el1 >> 20) & 3, 3);

    let mut block = vec![0u8; booted.start_info.encode().len()];
    ram.read(aarch64_layout::START_INFO_GPA, &mut block)
        .unwrap();
    assert_eq!(block, booted.start_info.encode());
    assert_eq!(&block[..8], b"SLUICEBI");
    let info = &booted.start_info;
    assert_eq!(info.console_kind, console_kind::MMIO);
    assert_eq!(info.console_address, 0x0900_0000);
    assert_eq!(info.ecam_base, 0x3f00_0000);
    assert_eq!(info.args, "hostile");
    let kinds: Vec<(u64, u64, u32)> = info
        .memory_map
        .iter()
        .map(|r| (r.base, r.length, r.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            (0x1000_0000, 0x2000_0000, region_kind::PCI_MMIO),
            (0x3f00_0000, 0x10_0000, region_kind::ECAM),
            (RAM, 0x10_0000, region_kind::BOOT),
            (RAM + 0x10_0000, 0x10_0000, region_kind::RAM),
            (CODE, 0x1000, region_kind::IMAGE),
            (CODE + 0x1000, (16 << 20) - 0x20_1000, region_kind::RAM),
        ]
    );
    let mut code = [0u8; 4];
    ram.read(CODE, &mut code).unwrap();
    assert_eq!(code, WFI);
    ram.release();
}

#[test]
fn direct_boot_refusals() {
    let ram = GuestRam::new(frames(), &aarch64_layout::ram_regions(8 << 20)).unwrap();
    let boot = |img: &[u8]| boot::boot_aarch64(&ram, ram.regions(), img, &[], "");
    // An x86 image.
    assert_eq!(
        boot(&image(62, CODE, &WFI)),
        Err(BootError::Elf(ElfError::WrongMachine {
            found: 62,
            expected: 183
        }))
    );
    // In the boot area (the first MiB of RAM), below RAM, past RAM.
    assert_eq!(
        boot(&image(183, RAM + 0x8_0000, &WFI)),
        Err(BootError::Elf(ElfError::InBootArea {
            segment: 0,
            gpa: RAM + 0x8_0000
        }))
    );
    assert!(matches!(
        boot(&image(183, 0x10_0000, &WFI)),
        Err(BootError::Elf(ElfError::OutsideRam { .. }))
    ));
    assert!(matches!(
        boot(&image(183, RAM + (8 << 20), &WFI)),
        Err(BootError::Elf(ElfError::OutsideRam { .. }))
    ));
    assert_eq!(
        boot::boot_aarch64(&ram, ram.regions(), &arm_image(), &[], "bad args!"),
        Err(BootError::BadArgs)
    );
    // Nothing was written by a refused boot.
    let mut start = [0u8; 8];
    ram.read(aarch64_layout::START_INFO_GPA, &mut start)
        .unwrap();
    assert_eq!(start, [0; 8]);
    // RAM that does not hold the boot area, or that leaves the 39-bit
    // guest-physical space.
    assert!(matches!(
        boot::boot_aarch64(&ram, &[(RAM + 0x20_0000, 0x60_0000)], &arm_image(), &[], ""),
        Err(BootError::Memory(_))
    ));
    assert_eq!(
        boot::boot_aarch64(&ram, &[(RAM, 1 << 39)], &arm_image(), &[], ""),
        Err(BootError::RamBeyondAddressSpace {
            end: RAM + (1 << 39)
        })
    );
    // The x86 protocol keeps its own boot area.
    assert_eq!(Machine::X86_64.boot_area(), (0, 0x10_0000));
    assert_eq!(Machine::Aarch64.boot_area(), (RAM, RAM + 0x10_0000));
    ram.release();
}

fn host() -> (&'static ModelConfigSpace, Vec<Topology>) {
    let cfg = ModelConfigSpace::new();
    cfg.add(
        EDU,
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00_ff_00)
            .bar_mem32(0, 0x1000_0000, 0x10_0000, false)
            .pcie(PortType::Endpoint, false),
    );
    let cfg: &'static ModelConfigSpace = Box::leak(Box::new(cfg));
    let topo = enumerate(cfg, Segment(0), &[0], 0..=0);
    (cfg, vec![topo])
}

fn valid_vm(memory: &str) -> &'static ValidVm {
    let config = VmDescription::parse(&format!(
        "arm0:mem={memory}:image=test-guest:dev=00:03.0:args=hostile"
    ))
    .unwrap();
    Box::leak(Box::new(ValidVm {
        config,
        devices: vec![AssignedPci {
            host: EDU,
            guest: sluice_pci::Bdf::new(0, 1, 0),
            group: 4,
        }],
    }))
}

type Instance = sluice_hypervisor::vm::instance::VmInstance<
    'static,
    &'static ModelFrames,
    &'static ModelConfigSpace,
>;

struct Built {
    vm: Instance,
    tables: &'static ModelMemory,
    topo: Vec<Topology>,
    frames: &'static ModelFrames,
}

fn build(code: &[u8], memory: &str) -> Result<Built, BuildError> {
    let (cfg, topo) = host();
    let frames = frames();
    let tables: &'static ModelMemory = Box::leak(Box::new(ModelMemory::new()));
    let format = El2Features::from_id_registers(5, 0)
        .stage2_format()
        .unwrap();
    let s2 = IoPageTable::new(tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
    let image: &'static [u8] = Box::leak(image(183, CODE, code).into_boxed_slice());
    let topologies: &'static [Topology] = Box::leak(topo.clone().into_boxed_slice());
    let vm = build_aarch64(
        BuildInputs {
            id: VM,
            vm: valid_vm(memory),
            image,
            host_config: cfg,
            topologies,
            one_gib_pages: false,
        },
        frames,
        Box::new(s2),
    )?;
    Ok(Built {
        vm,
        tables,
        topo,
        frames,
    })
}

#[test]
fn build_maps_ram_and_bars_in_stage_2_and_traps_the_rest() {
    let b = build(&WFI, "16M").unwrap();
    let vm = &b.vm;
    assert_eq!(vm.machine, Machine::Aarch64);
    assert_eq!(vm.ram.regions(), [(RAM, 16 << 20)]);
    let entry = vm.aarch64_entry.unwrap();
    assert_eq!(entry.registers.pc, CODE);
    assert_eq!(vm.ecam_window().base, aarch64_layout::ECAM_BASE);

    let format = El2Features::from_id_registers(5, 0)
        .stage2_format()
        .unwrap();
    let params = format.walk_params();
    let root = vm.nested.root_address();
    for gpa in [RAM, CODE, RAM + (16 << 20) - 1] {
        let w = walk(b.tables, &params, root, gpa).unwrap();
        let (host, _) = vm.ram.ram_to_host(gpa).unwrap();
        assert_eq!(w.phys, host, "{gpa:#x}");
        assert_eq!((w.leaf >> 2) & 0xf, 0b1111, "RAM is normal write-back");
    }
    // The edu BAR, placed in the aarch64 BAR window, as Device-nGnRE.
    let bar = vm.pci.bar_mappings()[0];
    assert!((0x1000_0000..0x3000_0000).contains(&bar.guest), "{bar:?}");
    let w = walk(b.tables, &params, root, bar.guest + 0x10).unwrap();
    assert_eq!(w.phys.as_u64(), 0x1000_0010);
    assert_eq!((w.leaf >> 2) & 0xf, 0b0001);
    assert!(!w.perms.exec);
    // Console, ECAM, below and above RAM: unmapped, so they trap.
    for gpa in [
        aarch64_layout::CONSOLE_GPA,
        aarch64_layout::ECAM_BASE,
        aarch64_layout::ECAM_BASE + 0x8000,
        RAM - 0x1000,
        RAM + (16 << 20),
    ] {
        assert!(walk(b.tables, &params, root, gpa).is_err(), "{gpa:#x}");
    }
    // The console register and ECAM are not guest memory for hypercalls.
    assert!(
        vm.ram
            .read(aarch64_layout::CONSOLE_GPA, &mut [0u8; 1])
            .is_err()
    );
    // An x86 backend cannot run it.
    struct NoWorldSwitch;
    impl El2Hardware for NoWorldSwitch {
        fn enter(&mut self, _: &mut GuestContext, _: &GuestControl) -> ExitSyndrome {
            unreachable!()
        }
    }
    let mut backend = El2Backend::new(NoWorldSwitch, El2Features::from_id_registers(5, 0)).unwrap();
    let vcpu = vm.create_vcpu(&mut backend).unwrap();
    assert_eq!(vcpu.context().registers.pc, CODE);
    assert!(matches!(
        backend.create_vcpu(&vm.entry),
        Err(VcpuError::Unsupported(_))
    ));
}

#[test]
fn failed_builds_release_everything() {
    // A segment in the boot area: the boot step fails after RAM and the
    // stage-2 table were set up.
    let (cfg, topo) = host();
    let frames = frames();
    let tables: &'static ModelMemory = Box::leak(Box::new(ModelMemory::new()));
    let format = El2Features::from_id_registers(5, 0)
        .stage2_format()
        .unwrap();
    let s2 = IoPageTable::new(tables, format, TableConfig::new(PageSize::Size2M, true)).unwrap();
    let image: &'static [u8] = Box::leak(image(183, RAM, &WFI).into_boxed_slice());
    let topologies: &'static [Topology] = Box::leak(topo.into_boxed_slice());
    let err = build_aarch64(
        BuildInputs {
            id: VM,
            vm: valid_vm("8M"),
            image,
            host_config: cfg,
            topologies,
            one_gib_pages: false,
        },
        frames,
        Box::new(s2),
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            err,
            BuildError::Boot(BootError::Elf(ElfError::InBootArea { .. }))
        ),
        "{err:?}"
    );
    assert_eq!(frames.live_frames(), 0);
    assert_eq!(tables.live_pages(), 0, "the stage-2 table was released");

    // More RAM than the 39-bit guest-physical space holds: refused before
    // anything is allocated.
    let err = build(&WFI, "512G").err().unwrap();
    assert_eq!(
        err,
        BuildError::Boot(BootError::RamBeyondAddressSpace {
            end: RAM + (512 << 30)
        })
    );

    let b = build(&WFI, "8M").unwrap();
    assert!(b.frames.live_frames() >= 2048);
    b.vm.destroy();
    assert_eq!(b.frames.live_frames(), 0);
    assert_eq!(b.tables.live_pages(), 0);
}

/// Where the scripted guest keeps its hypercall argument.
const ARG_GPA: u64 = RAM + 0x30_0000;

/// What the scripted guest does, one exception per entry.
#[derive(Clone, Copy, Debug)]
enum GuestStep {
    /// `STRB W1, [console]` with `byte` in W1.
    Print(u8),
    /// `HVC #0` with X0 = the Sluice function ID of `command`, X1 = ARG_GPA.
    Hypercall(u64),
    /// `LDR W2, [ECAM + offset]`.
    ReadEcam(u64),
    /// `LDP X2, X3, [ECAM]`: no instruction syndrome.
    PairLoad,
    /// `WFI` with `PSTATE.I` as given.
    Wfi { irqs_masked: bool },
    /// With its vectors at [`VBAR`]: `MRS X3, ACTLR_EL1`, which EL2 traps
    /// (`HCR_EL2.TACR`).
    ReadActlr,
    /// Its UNDEF handler steps over the instruction (`ELR_EL1` + 4) and
    /// returns (`ERET` to `SPSR_EL1`), then the next instruction is `WFI`
    /// with IRQs masked.
    UndefHandledThenWfi,
}

/// The scripted guest's EL1 vector table.
const VBAR: u64 = RAM + 0x28_0000;

/// Plays the guest: each entry checks the PC is where the previous exit
/// left it, applies the step to the registers and reports its syndrome.
struct ScriptedGuest {
    steps: Vec<GuestStep>,
    seen: Vec<(GuestContext, GuestControl)>,
}

const IL: u64 = 1 << 25;

impl El2Hardware for ScriptedGuest {
    fn enter(&mut self, c: &mut GuestContext, control: &GuestControl) -> ExitSyndrome {
        self.seen.push((*c, *control));
        let step = self.steps.remove(0);
        let r = &mut c.registers;
        let data_abort = |gpa: u64, iss: u64| ExitSyndrome {
            kind: ExceptionKind::Synchronous,
            esr: (0x24 << 26) | IL | iss | 0b000111,
            far: gpa,
            hpfar: (gpa >> 12) << 4,
        };
        match step {
            GuestStep::Print(byte) => {
                r.x[1] = u64::from(byte);
                // ISV, SAS byte, SRT 1, WnR.
                data_abort(
                    aarch64_layout::CONSOLE_GPA,
                    (1 << 24) | (1 << 16) | (1 << 6),
                )
            }
            GuestStep::Hypercall(command) => {
                r.x[0] = abi::regs::AARCH64_FUNCTION_BASE | command;
                r.x[1] = ARG_GPA;
                r.pc += 4; // HVC returns after itself.
                ExitSyndrome {
                    kind: ExceptionKind::Synchronous,
                    esr: (0x16 << 26) | IL,
                    far: 0,
                    hpfar: 0,
                }
            }
            GuestStep::ReadEcam(offset) => {
                // ISV, SAS word, SRT 2.
                data_abort(
                    aarch64_layout::ECAM_BASE + offset,
                    (1 << 24) | (2 << 22) | (2 << 16),
                )
            }
            GuestStep::PairLoad => data_abort(aarch64_layout::ECAM_BASE, 0),
            GuestStep::ReadActlr => {
                c.el1.vbar_el1 = VBAR;
                ExitSyndrome {
                    kind: ExceptionKind::Synchronous,
                    // EC 0x18; Op0 3, Op2 1, CRn 1, Rt 3, read.
                    esr: (0x18 << 26) | IL | (3 << 20) | (1 << 17) | (1 << 10) | (3 << 5) | 1,
                    far: 0,
                    hpfar: 0,
                }
            }
            GuestStep::UndefHandledThenWfi => {
                r.pc = c.el1.elr_el1 + 4;
                r.pstate = c.el1.spsr_el1 | pstate::I;
                ExitSyndrome {
                    kind: ExceptionKind::Synchronous,
                    esr: (0x01 << 26) | IL,
                    far: 0,
                    hpfar: 0,
                }
            }
            GuestStep::Wfi { irqs_masked } => {
                if irqs_masked {
                    r.pstate |= pstate::I;
                } else {
                    r.pstate &= !pstate::I;
                }
                ExitSyndrome {
                    kind: ExceptionKind::Synchronous,
                    esr: (0x01 << 26) | IL,
                    far: 0,
                    hpfar: 0,
                }
            }
        }
    }
}

struct Host {
    lines: Vec<String>,
}

impl CpuidSource for Host {
    fn host_cpuid(&self, _: u32, _: u32) -> [u32; 4] {
        [0; 4]
    }
}

impl RunHost for Host {
    fn cpuid(&self) -> &dyn CpuidSource {
        self
    }
    fn flush_caches(&mut self) {}
    fn console_line(&mut self, vm: &str, line: &str) {
        self.lines.push(format!("{vm}: {line}"));
    }
}

fn iommufd(b: &Built) -> Iommufd<MockIommu> {
    let mut mock = MockIommu::new(Rc::new(ModelMemory::new()));
    mock.add_device(
        device_id(EDU),
        IommuCaps {
            unit: 0,
            snoop_control: true,
            interrupt_remapping: true,
            scalable_mode: false,
            max_pasid_log2: 0,
            page_sizes: 1 << 12,
            input_address_bits: 48,
        },
        false,
    );
    let mut iommufd = Iommufd::new(mock, None);
    register_with_iommufd(&mut iommufd, &b.vm, VmConfig::default(), &b.topo, &|_| {
        DeviceFacts::default()
    })
    .unwrap();
    iommufd
}

fn run(b: &mut Built, steps: Vec<GuestStep>) -> (RunEnd, El2Backend<ScriptedGuest>, Vec<String>) {
    let mut iommufd = iommufd(b);
    let mut backend = El2Backend::new(
        ScriptedGuest {
            steps,
            seen: Vec::new(),
        },
        El2Features::from_id_registers(5, 0),
    )
    .unwrap();
    let mut vcpu = b.vm.create_vcpu(&mut backend).unwrap();
    backend
        .set_nested_root(&mut vcpu, b.vm.nested.root_address())
        .unwrap();
    let mut host = Host { lines: Vec::new() };
    let end = run_vcpu(
        &mut b.vm,
        &mut backend,
        &mut vcpu,
        &mut iommufd,
        &mut host,
        100,
    );
    (end, backend, host.lines)
}

#[test]
fn a_guest_prints_calls_reads_its_device_and_finishes() {
    let mut b = build(&WFI, "16M").unwrap();
    let mut arg = vec![0u8; abi::IoasAlloc::SIZE];
    abi::IoasAlloc {
        size: abi::IoasAlloc::SIZE as u32,
        flags: 0,
        out_ioas_id: 0,
    }
    .encode(&mut arg);
    b.vm.ram.write(ARG_GPA, &arg).unwrap();
    let mut steps: Vec<GuestStep> = b"hi\n".iter().map(|&c| GuestStep::Print(c)).collect();
    steps.push(GuestStep::Hypercall(cmd::IOAS_ALLOC));
    steps.push(GuestStep::ReadEcam(0x8000)); // guest 00:01.0 vendor/device
    steps.push(GuestStep::Wfi { irqs_masked: true });
    let (end, backend, lines) = run(&mut b, steps);
    assert_eq!(end, RunEnd::Finished);
    assert_eq!(lines, ["arm0: hi"]);
    assert_eq!(b.vm.console_lines, ["hi"]);

    let seen = &backend.hardware().seen;
    assert_eq!(seen.len(), 6);
    // Every exit resumed after its instruction: 3 stores, the HVC, the load.
    for (i, (context, _)) in seen.iter().enumerate() {
        assert_eq!(context.registers.pc, CODE + 4 * i as u64, "entry {i}");
    }
    assert!(seen[0].1.flush_tlb && !seen[1].1.flush_tlb);
    assert_eq!(
        seen[0].1.vttbr_el2 & 0xffff_ffff_ffff,
        b.vm.nested.root_address().as_u64()
    );
    // The hypercall's result in X0 (0), its output in guest memory.
    let after_call = &seen[4].0.registers;
    assert_eq!(after_call.x[0], 0);
    assert_eq!(after_call.x[1], ARG_GPA);
    b.vm.ram.read(ARG_GPA, &mut arg).unwrap();
    assert_ne!(abi::IoasAlloc::decode(&arg).out_ioas_id, 0);
    // The ECAM load put edu's IDs into W2.
    assert_eq!(seen[5].0.registers.x[2], 0x11e8_1234);
    let stats = &b.vm.stats;
    assert_eq!(
        (
            stats.total,
            stats.hypercalls,
            stats.nested_page_faults,
            stats.hlt
        ),
        (6, 1, 4, 1)
    );
    assert_eq!(stats.calls(cmd::IOAS_ALLOC), 1);
}

#[test]
fn a_trapped_register_read_is_undefined_and_the_guest_goes_on() {
    let mut b = build(&WFI, "16M").unwrap();
    let steps = vec![
        GuestStep::Print(b'u'),
        GuestStep::ReadActlr,
        GuestStep::UndefHandledThenWfi,
    ];
    let (end, backend, _) = run(&mut b, steps);
    assert_eq!(end, RunEnd::Finished);
    let seen = &backend.hardware().seen;
    assert_eq!(seen.len(), 3);
    // The MRS is at CODE + 4 (after the store); the entry after it is the
    // guest's synchronous vector for EL1h, with the exception recorded in
    // its EL1 registers.
    let (trapped, _) = &seen[2];
    assert_eq!(trapped.registers.pc, VBAR + 0x200);
    assert_eq!(trapped.el1.elr_el1, CODE + 4);
    assert_eq!(trapped.el1.esr_el1, 0x0200_0000, "EC 0, IL 1");
    assert_eq!(trapped.el1.spsr_el1, 0x3c5, "the entry PSTATE (EL1h, DAIF)");
    assert_eq!(trapped.registers.pstate, 0x3c5);
    assert_eq!(
        trapped.registers.x[3], seen[1].0.registers.x[3],
        "the MRS wrote nothing"
    );
    assert_eq!(b.vm.console_lines, Vec::<String>::new());
    assert_eq!((b.vm.stats.total, b.vm.stats.hlt), (3, 1));
}

#[test]
fn runs_that_cannot_go_on_stop() {
    // A pair load from ECAM has no syndrome: stopped at the access.
    let mut b = build(&WFI, "8M").unwrap();
    let (end, backend, _) = run(&mut b, vec![GuestStep::Print(b'x'), GuestStep::PairLoad]);
    match end {
        RunEnd::Stopped(reason) => {
            let text = reason.to_string();
            assert!(
                text.contains("0x3f000000") && text.contains("LDR/STR"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(backend.hardware().seen.len(), 2);
    // WFI with IRQs unmasked: nothing could wake the vCPU.
    let mut b = build(&WFI, "8M").unwrap();
    let (end, _, _) = run(&mut b, vec![GuestStep::Wfi { irqs_masked: false }]);
    assert_eq!(
        end,
        RunEnd::Stopped(sluice_hypervisor::vm::exits::StopReason::Backend(
            VcpuError::Unsupported(
                "HLT with interrupts enabled (Sluice delivers no virtual interrupts yet)"
            )
        ))
    );
}
