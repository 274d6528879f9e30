//! A whole VM on the host: built from a validated configuration (RAM,
//! passthrough bus, nested table, boot protocol), declared to the iommufd
//! object model over the mock IOMMU, and run by the run loop over a vCPU
//! backend that plays a script of exits. Checks what the run loop keeps in
//! step: bus mastering with DEVICE_BIND, fault collection before
//! hypercalls, the WBINVD policy, exit statistics and how a run ends.

use std::cell::RefCell;
use std::rc::Rc;

use sluice_abi::{self as abi, AbiStruct, cmd};
use sluice_hal::PhysAddr;
use sluice_hal::model::ModelMemory;
use sluice_hypervisor::iommufd::{
    DeviceId, FaultReason, GuestMemory, IommuCaps, Iommufd, MsiWindow, VmConfig, VmId,
    X86_MSI_WINDOW,
};
use sluice_hypervisor::testing::MockIommu;
use sluice_hypervisor::vcpu::{
    AccessSize, EntryState, Event, Exit, GuestRegisters, InstructionLength, IoDirection, PortIo,
    TranslationState, VcpuBackend, VcpuError, VcpuExit, gpr,
};
use sluice_hypervisor::vm::config::{AssignedPci, ValidVm, VmConfig as VmDescription};
use sluice_hypervisor::vm::exits::{CpuidSource, StopReason};
use sluice_hypervisor::vm::instance::{
    BuildError, BuildInputs, DeviceFacts, RunEnd, RunHost, VmIommuState, build_x86, device_id,
    register_with_iommufd, run_vcpu,
};
use sluice_hypervisor::vm::memory::{GuestRam, ModelFrames};
use sluice_hypervisor::vm::nested::{MappingKind, NestedPageTable};
use sluice_iommu::pagetable::PageTableError;
use sluice_pci::caps::PortType;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{Bdf, PciAddress, Segment, Topology, enumerate};

const EDU: PciAddress = PciAddress::new(0, 0, 3, 0);
const GUEST_EDU: Bdf = Bdf::new(0, 1, 0);
const VM: VmId = VmId(1);
/// Where the scripted guest keeps its hypercall arguments.
const ARG_GPA: u64 = 0x30_0000;

fn host() -> (ModelConfigSpace, Topology) {
    let cfg = ModelConfigSpace::new();
    cfg.add(
        EDU,
        FunctionBuilder::endpoint(0x1234, 0x11e8, 0x00_ff_00)
            .bar_mem32(0, 0xfea0_0000, 0x10_0000, false)
            .pcie(PortType::Endpoint, false),
    );
    let topo = enumerate(&cfg, Segment(0), &[0], 0..=0);
    (cfg, topo)
}

/// A minimal ELF: code at 1 MiB.
fn image() -> Vec<u8> {
    let code = [0xf4u8]; // hlt
    let phoff = 64u64;
    let data = phoff + 56;
    let mut out = vec![0u8; data as usize];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2;
    out[5] = 1;
    out[6] = 1;
    out[16..18].copy_from_slice(&2u16.to_le_bytes());
    out[18..20].copy_from_slice(&62u16.to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    out[32..40].copy_from_slice(&phoff.to_le_bytes());
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[54..56].copy_from_slice(&56u16.to_le_bytes());
    out[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    out[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    out[ph + 8..ph + 16].copy_from_slice(&data.to_le_bytes());
    out[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    out[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    out[ph + 32..ph + 40].copy_from_slice(&1u64.to_le_bytes());
    out[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes());
    out.extend_from_slice(&code);
    out
}

/// (GPA, host address, length, kind) of each mapping made.
type Mappings = Rc<RefCell<Vec<(u64, u64, u64, MappingKind)>>>;

/// A nested table that records what was mapped.
#[derive(Default)]
struct RecordingTable {
    maps: Mappings,
    fail_at: Option<u64>,
    released: Rc<RefCell<bool>>,
}

impl NestedPageTable for RecordingTable {
    fn map_range(
        &mut self,
        gpa: u64,
        host: PhysAddr,
        len: u64,
        kind: MappingKind,
    ) -> Result<(), PageTableError> {
        if self.fail_at == Some(gpa) {
            return Err(PageTableError::OutOfMemory);
        }
        self.maps.borrow_mut().push((gpa, host.as_u64(), len, kind));
        Ok(())
    }
    fn root_address(&self) -> PhysAddr {
        PhysAddr::new(0x7000_0000)
    }
    fn release(self: Box<Self>) {
        *self.released.borrow_mut() = true;
    }
}

/// Plays one scripted exit per `run`; `set_registers` is seen by the next
/// step, so a step can place hypercall registers.
struct Script {
    steps: Vec<Step>,
    regs: GuestRegisters,
}

#[derive(Clone, Copy)]
enum Step {
    Hypercall {
        command: u64,
    },
    /// `OUT 0xe9, AL`.
    Console(u8),
    Wbinvd,
    Hlt {
        interrupts: bool,
    },
    Cpuid,
    Fail,
}

impl VcpuBackend for Script {
    type Vcpu = ();
    fn create_vcpu(&mut self, entry: &EntryState) -> Result<(), VcpuError> {
        self.regs = entry.registers;
        Ok(())
    }
    fn run(&mut self, _: &mut ()) -> Result<Exit, VcpuError> {
        if self.steps.is_empty() {
            return Ok(Exit {
                reason: VcpuExit::Cpuid {
                    leaf: 0,
                    subleaf: 0,
                },
                rip: self.regs.rip,
                length: InstructionLength::Known(2),
            });
        }
        let step = self.steps.remove(0);
        let (reason, length) = match step {
            Step::Hypercall { command } => {
                self.regs.gprs[gpr::RAX] = command;
                self.regs.gprs[gpr::RBX] = ARG_GPA;
                (
                    VcpuExit::Hypercall {
                        command,
                        argument: ARG_GPA,
                    },
                    3,
                )
            }
            Step::Wbinvd => (VcpuExit::Wbinvd, 2),
            Step::Console(byte) => (
                VcpuExit::PortIo(PortIo {
                    port: 0xe9,
                    size: AccessSize::Byte,
                    direction: IoDirection::Out,
                    string: false,
                    rep: false,
                    value: u32::from(byte),
                }),
                2,
            ),
            Step::Hlt { interrupts } => {
                self.regs.rflags = if interrupts { 0x202 } else { 0x2 };
                (VcpuExit::Hlt, 1)
            }
            Step::Cpuid => (
                VcpuExit::Cpuid {
                    leaf: 0,
                    subleaf: 0,
                },
                2,
            ),
            Step::Fail => return Err(VcpuError::InvalidGuestState("scripted failure")),
        };
        Ok(Exit {
            reason,
            rip: self.regs.rip,
            length: InstructionLength::Known(length),
        })
    }
    fn registers(&self, _: &()) -> GuestRegisters {
        self.regs
    }
    fn set_registers(&mut self, _: &mut (), r: &GuestRegisters) {
        self.regs = *r;
    }
    fn translation_state(&self, _: &()) -> TranslationState {
        TranslationState {
            cr0: 0x8000_0031,
            cr3: 0x4000,
            cr4: 0x20,
            efer: 0x500,
            cs_long: true,
            cs_default_big: false,
        }
    }
    fn advance_rip(&mut self, _: &mut (), length: u8) -> Result<(), VcpuError> {
        self.regs.rip += u64::from(length);
        Ok(())
    }
    fn inject_event(&mut self, _: &mut (), _: Event) -> Result<(), VcpuError> {
        Ok(())
    }
    fn set_nested_root(&mut self, _: &mut (), _: PhysAddr) -> Result<(), VcpuError> {
        Ok(())
    }
}

struct Host {
    flushes: u32,
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
    fn flush_caches(&mut self) {
        self.flushes += 1;
    }
    fn console_line(&mut self, vm: &str, line: &str) {
        self.lines.push(format!("{vm}: {line}"));
    }
}

fn valid_vm() -> ValidVm {
    let config = VmDescription::parse("guest0:mem=16M:image=test-guest:dev=00:03.0").unwrap();
    ValidVm {
        config,
        devices: vec![AssignedPci {
            host: EDU,
            guest: GUEST_EDU,
            group: 5,
        }],
    }
}

fn caps() -> IommuCaps {
    IommuCaps {
        unit: 0,
        snoop_control: false,
        interrupt_remapping: true,
        scalable_mode: false,
        max_pasid_log2: 0,
        page_sizes: 1 << 12,
        input_address_bits: 39,
    }
}

struct World {
    cfg: &'static ModelConfigSpace,
    topo: Vec<Topology>,
    iommufd: Iommufd<MockIommu>,
}

fn world() -> World {
    let (cfg, topo) = host();
    let cfg: &'static ModelConfigSpace = Box::leak(Box::new(cfg));
    let mut mock = MockIommu::new(Rc::new(ModelMemory::new()));
    mock.add_device(device_id(EDU), caps(), false);
    let iommufd = Iommufd::new(mock, Some(MsiWindow::Bypass(X86_MSI_WINDOW)));
    World {
        cfg,
        topo: vec![topo],
        iommufd,
    }
}

type Instance = sluice_hypervisor::vm::instance::VmInstance<
    'static,
    &'static ModelFrames,
    &'static ModelConfigSpace,
>;

fn build(
    w: &World,
    frames: &'static ModelFrames,
    table: RecordingTable,
) -> Result<Instance, BuildError> {
    let vm: &'static ValidVm = Box::leak(Box::new(valid_vm()));
    let image: &'static [u8] = Box::leak(image().into_boxed_slice());
    let topo: &'static [Topology] = Box::leak(w.topo.clone().into_boxed_slice());
    build_x86(
        BuildInputs {
            id: VM,
            vm,
            image,
            host_config: w.cfg,
            topologies: topo,
            one_gib_pages: false,
        },
        frames,
        Box::new(table),
    )
}

fn frames() -> &'static ModelFrames {
    Box::leak(Box::new(ModelFrames::new()))
}

fn put<T: AbiStruct>(ram: &GuestRam<&'static ModelFrames>, arg: &T) {
    let mut bytes = vec![0u8; T::SIZE];
    arg.encode(&mut bytes);
    bytes[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
    ram.write(ARG_GPA, &bytes).unwrap();
}

fn get<T: AbiStruct>(ram: &GuestRam<&'static ModelFrames>) -> T {
    let mut bytes = vec![0u8; T::SIZE];
    ram.read(ARG_GPA, &mut bytes).unwrap();
    T::decode(&bytes)
}

fn bind_arg() -> abi::DeviceBind {
    abi::DeviceBind {
        size: 0,
        flags: 0,
        guest_bdf: abi::bdf(0, 0, 1, 0),
        out_dev_id: 0,
        out_group_id: 0,
        num_group_devices: 4,
        group_devices: ARG_GPA + 0x800,
    }
}

#[test]
fn builds_ram_bars_and_boot_state() {
    let w = world();
    let frames = frames();
    let table = RecordingTable::default();
    let maps = table.maps.clone();
    let vm = build(&w, frames, table).unwrap();
    assert_eq!(vm.name, "guest0");
    assert_eq!(vm.ram.size(), 16 << 20);
    // RAM mapped as RAM, the edu BAR as MMIO in the BAR window, nothing in
    // the ECAM or MSI windows.
    let maps = maps.borrow();
    let ram: u64 = maps
        .iter()
        .filter(|m| m.3 == MappingKind::Ram)
        .map(|m| m.2)
        .sum();
    assert_eq!(ram, 16 << 20);
    let bars: Vec<_> = maps.iter().filter(|m| m.3 == MappingKind::Mmio).collect();
    assert_eq!(bars.len(), 1);
    assert_eq!((bars[0].1, bars[0].2), (0xfea0_0000, 0x10_0000));
    assert!((0xc000_0000..0xe000_0000).contains(&bars[0].0));
    assert!(
        maps.iter()
            .all(|m| m.0 + m.2 <= 0xe000_0000 || m.0 >= 0xfef0_0000)
    );
    // The boot protocol ran: entry at the ELF entry, start info in RAM.
    assert_eq!(vm.entry.registers.rip, 0x10_0000);
    let mut magic = [0u8; 8];
    vm.ram.read(0x2000, &mut magic).unwrap();
    assert_eq!(&magic, b"SLUICEBI");
    // The guest sees edu at its guest BDF, with bus mastering refused.
    assert!(!vm.pci.device(GUEST_EDU).unwrap().bus_master_allowed());
}

#[test]
fn a_failed_build_releases_every_frame() {
    let w = world();
    let frames = frames();
    let table = RecordingTable {
        fail_at: Some(0xc000_0000),
        ..Default::default()
    };
    let released = table.released.clone();
    // The BAR is placed at the window base; its mapping fails.
    let err = build(&w, frames, table).err().unwrap();
    assert!(matches!(err, BuildError::Nested(_)), "{err:?}");
    assert_eq!(frames.live_frames(), 0);
    assert!(*released.borrow(), "the nested table was released");

    // A VM that was built gives every frame back when destroyed.
    let frames = self::frames();
    let vm = build(&w, frames, RecordingTable::default()).unwrap();
    assert!(frames.live_frames() >= 4096);
    vm.destroy();
    assert_eq!(frames.live_frames(), 0);
}

#[test]
fn registration_declares_devices_blocked_until_bound() {
    let mut w = world();
    let vm = build(&w, frames(), RecordingTable::default()).unwrap();
    let topo = w.topo.clone();
    register_with_iommufd(&mut w.iommufd, &vm, VmConfig::default(), &topo, &|_| {
        DeviceFacts::default()
    })
    .unwrap();
    let list = w.iommufd.device_list(VM).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].guest_bdf, abi::bdf(0, 0, 1, 0));
    assert_eq!(list[0].group, 5);
    assert!(!w.iommufd.device_bound(VM, abi::bdf(0, 0, 1, 0)));
    // Registering twice is refused and leaves the first registration.
    assert!(
        register_with_iommufd(&mut w.iommufd, &vm, VmConfig::default(), &topo, &|_| {
            DeviceFacts::default()
        })
        .is_err()
    );
    assert_eq!(w.iommufd.device_list(VM).unwrap().len(), 1);
}

fn registered() -> (World, Instance) {
    let mut w = world();
    let vm = build(&w, frames(), RecordingTable::default()).unwrap();
    let topo = w.topo.clone();
    register_with_iommufd(&mut w.iommufd, &vm, VmConfig::default(), &topo, &|_| {
        DeviceFacts::default()
    })
    .unwrap();
    (w, vm)
}

#[test]
fn bus_mastering_follows_bind_and_unbind() {
    let (mut w, mut vm) = registered();
    put(&vm.ram, &bind_arg());
    let mut script = Script {
        steps: vec![Step::Hypercall {
            command: cmd::DEVICE_BIND,
        }],
        regs: GuestRegisters::default(),
    };
    script.create_vcpu(&vm.entry).unwrap();
    let mut host = Host {
        flushes: 0,
        lines: Vec::new(),
    };
    // One exit allowed: the bind runs, then the budget ends the run.
    let end = run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 1);
    assert_eq!(end, RunEnd::ExitLimit);
    assert_eq!(script.regs.gprs[gpr::RAX], 0, "bind succeeded");
    let bound: abi::DeviceBind = get(&vm.ram);
    assert_ne!(bound.out_dev_id, 0);
    assert!(vm.pci.device(GUEST_EDU).unwrap().bus_master_allowed());

    put(
        &vm.ram,
        &abi::DeviceUnbind {
            size: 0,
            dev_id: bound.out_dev_id,
        },
    );
    script.steps = vec![
        Step::Hypercall {
            command: cmd::DEVICE_UNBIND,
        },
        Step::Hlt { interrupts: false },
    ];
    let end = run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 10);
    assert_eq!(end, RunEnd::Finished);
    assert!(!vm.pci.device(GUEST_EDU).unwrap().bus_master_allowed());
    assert_eq!(vm.stats.calls(cmd::DEVICE_BIND), 1);
    assert_eq!(vm.stats.calls(cmd::DEVICE_UNBIND), 1);
    assert_eq!(vm.stats.hypercalls, 2);
    assert_eq!(vm.stats.hlt, 1);
    assert_eq!(vm.stats.total, 3);
}

#[test]
fn faults_reach_the_queue_before_the_guest_reads_it() {
    let (mut w, mut vm) = registered();
    // Bind, attach to an IOAS through a HWPT with a fault queue, all on the
    // host side of the same object model the guest uses.
    let ioas = w.iommufd.ioas_alloc(VM).unwrap();
    let fault = w.iommufd.fault_queue_alloc(VM).unwrap();
    put(&vm.ram, &bind_arg());
    let mut script = Script {
        steps: vec![Step::Hypercall {
            command: cmd::DEVICE_BIND,
        }],
        regs: GuestRegisters::default(),
    };
    script.create_vcpu(&vm.entry).unwrap();
    let mut host = Host {
        flushes: 0,
        lines: Vec::new(),
    };
    run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 1);
    let dev_id = get::<abi::DeviceBind>(&vm.ram).out_dev_id;
    let hwpt = w
        .iommufd
        .hwpt_alloc(VM, dev_id, ioas, false, Some(fault))
        .unwrap();
    w.iommufd.device_attach(VM, dev_id, None, hwpt).unwrap();

    // The device DMAs to an unmapped IOVA; the mock records the fault.
    assert_eq!(
        w.iommufd
            .backend_mut()
            .dma(device_id(EDU), None, 0x1234_5000, true),
        Err(FaultReason::NotPresent)
    );
    // The guest reads its fault queue: the run loop collected the fault
    // first.
    put(
        &vm.ram,
        &abi::FaultRead {
            size: 0,
            fault_id: fault,
            num_records: 4,
            records: ARG_GPA + 0x1000,
            out_overflow: 0,
            reserved: 0,
        },
    );
    script.steps = vec![Step::Hypercall {
        command: cmd::FAULT_READ,
    }];
    run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 1);
    let read: abi::FaultRead = get(&vm.ram);
    assert_eq!(script.regs.gprs[gpr::RAX], 0);
    assert_eq!(read.num_records, 1);
    let mut rec = vec![0u8; abi::FaultRecord::SIZE];
    vm.ram.read(ARG_GPA + 0x1000, &mut rec).unwrap();
    let rec = abi::FaultRecord::decode(&rec);
    assert_eq!(rec.iova, 0x1234_5000);
    assert_eq!(rec.dev_id, dev_id);
}

#[test]
fn wbinvd_follows_the_policy_and_runs_end_cleanly() {
    let (mut w, mut vm) = registered();
    let mut host = Host {
        flushes: 0,
        lines: Vec::new(),
    };
    // No device attached: guest WBINVD is a no-op.
    let mut script = Script {
        steps: vec![Step::Wbinvd, Step::Cpuid, Step::Hlt { interrupts: false }],
        regs: GuestRegisters::default(),
    };
    script.create_vcpu(&vm.entry).unwrap();
    assert_eq!(
        run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 10),
        RunEnd::Finished
    );
    assert_eq!(host.flushes, 0);

    // Attached to a non-enforcing HWPT (the IOMMU has no snoop control) and
    // able to issue no-snoop requests (PCIe): WBINVD flushes.
    put(&vm.ram, &bind_arg());
    script.steps = vec![Step::Hypercall {
        command: cmd::DEVICE_BIND,
    }];
    run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 1);
    let dev_id = get::<abi::DeviceBind>(&vm.ram).out_dev_id;
    let ioas = w.iommufd.ioas_alloc(VM).unwrap();
    w.iommufd.device_attach(VM, dev_id, None, ioas).unwrap();
    assert!(w.iommufd.wbinvd_flushes(VM));
    script.steps = vec![Step::Wbinvd, Step::Hlt { interrupts: false }];
    run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 10);
    assert_eq!(host.flushes, 1);
    assert_eq!(vm.stats.wbinvd, 2);

    // HLT with interrupts enabled cannot be woken: the VM stops.
    script.steps = vec![Step::Hlt { interrupts: true }];
    assert!(matches!(
        run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 10),
        RunEnd::Stopped(StopReason::Backend(_))
    ));
    // A backend failure stops the VM with the reason.
    script.steps = vec![Step::Fail];
    assert!(matches!(
        run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 10),
        RunEnd::Stopped(StopReason::Backend(VcpuError::InvalidGuestState(_)))
    ));
    // A guest that never finishes is stopped by the exit budget.
    script.steps = Vec::new();
    assert_eq!(
        run_vcpu(&mut vm, &mut script, &mut (), &mut w.iommufd, &mut host, 50),
        RunEnd::ExitLimit
    );
}

#[test]
fn device_ids_pack_segment_and_requester_id() {
    assert_eq!(device_id(PciAddress::new(0, 0, 3, 0)), DeviceId(0x18));
    assert_eq!(
        device_id(PciAddress::new(2, 0x80, 1, 2)),
        DeviceId(0x2_8000 | 0xa)
    );
}

#[test]
fn console_lines_reach_the_host_as_they_complete() {
    let (mut w, mut vm) = registered();
    let mut host = Host {
        flushes: 0,
        lines: Vec::new(),
    };
    let mut script = Script {
        steps: b"GUEST-READY\nab"
            .iter()
            .map(|&b| Step::Console(b))
            .chain([Step::Hlt { interrupts: false }])
            .collect(),
        regs: GuestRegisters::default(),
    };
    script.create_vcpu(&vm.entry).unwrap();
    assert_eq!(
        run_vcpu(
            &mut vm,
            &mut script,
            &mut (),
            &mut w.iommufd,
            &mut host,
            100
        ),
        RunEnd::Finished
    );
    // The unterminated "ab" is not a line yet.
    assert_eq!(host.lines, ["guest0: GUEST-READY"]);
    assert_eq!(vm.console_lines, ["GUEST-READY"]);
    assert_eq!(vm.stats.port_io, 14);
}
