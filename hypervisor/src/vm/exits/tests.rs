//! The exit handler over a minimal backend (registers, RIP, one pending
//! event), guest RAM, the config-space model and a recording dispatcher.

use alloc::string::String;
use alloc::vec::Vec;

use sluice_hal::PhysAddr;
use sluice_pci::model::{FunctionBuilder, ModelConfigSpace};
use sluice_pci::{Bdf, PciAddress, Segment, enumerate};

use super::*;
use crate::vcpu::decode::CodeMode;
use crate::vcpu::{EntryState, GuestRegisters, InstructionBytes, PortIo, TranslationState, cr};
use crate::vm::boot;
use crate::vm::memory::{GuestRam, ModelFrames, layout};

/// A backend with no hardware: what the handler changes is visible.
struct Fake {
    translation: TranslationState,
}

#[derive(Default)]
struct FakeVcpu {
    regs: GuestRegisters,
    event: Option<Event>,
}

impl VcpuBackend for Fake {
    type Vcpu = FakeVcpu;
    fn create_vcpu(&mut self, entry: &EntryState) -> Result<FakeVcpu, VcpuError> {
        Ok(FakeVcpu {
            regs: entry.registers,
            event: None,
        })
    }
    fn run(&mut self, _: &mut FakeVcpu) -> Result<Exit, VcpuError> {
        Err(VcpuError::Unsupported("no hardware in this test"))
    }
    fn registers(&self, v: &FakeVcpu) -> GuestRegisters {
        v.regs
    }
    fn set_registers(&mut self, v: &mut FakeVcpu, r: &GuestRegisters) {
        v.regs = *r;
    }
    fn translation_state(&self, _: &FakeVcpu) -> TranslationState {
        self.translation
    }
    fn advance_rip(&mut self, v: &mut FakeVcpu, length: u8) -> Result<(), VcpuError> {
        if !(1..=15).contains(&length) {
            return Err(VcpuError::BadInstructionLength(u64::from(length)));
        }
        v.regs.rip += u64::from(length);
        Ok(())
    }
    fn inject_event(&mut self, v: &mut FakeVcpu, e: Event) -> Result<(), VcpuError> {
        e.validate()?;
        if v.event.is_some() {
            return Err(VcpuError::EventPending);
        }
        v.event = Some(e);
        Ok(())
    }
    fn set_nested_root(&mut self, _: &mut FakeVcpu, _: PhysAddr) -> Result<(), VcpuError> {
        Ok(())
    }
}

struct Recorder(Vec<(u64, u64)>);

impl HypercallDispatcher for Recorder {
    fn dispatch(&mut self, _: VmId, _: &dyn GuestMemory, command: u64, argument: u64) -> i64 {
        self.0.push((command, argument));
        -22
    }
}

struct Host;

impl CpuidSource for Host {
    fn host_cpuid(&self, leaf: u32, _: u32) -> [u32; 4] {
        match leaf {
            // VMX, MONITOR, OSXSAVE set on the host.
            1 => [
                0x906ea,
                0x0010_0800,
                (1 << 5) | (1 << 3) | (1 << 27) | 1,
                0xbfeb_fbff,
            ],
            0x8000_0001 => [0, 0, (1 << 2) | 1, 0x2c10_0800],
            _ => [leaf, 0x11, 0x22, 0x33],
        }
    }
}

const CODE: u64 = 0x10_0000;
const NIC: PciAddress = PciAddress::new(0, 0, 3, 0);

struct World {
    ram: GuestRam<&'static ModelFrames>,
    cfg: &'static ModelConfigSpace,
    backend: Fake,
    vcpu: FakeVcpu,
    dispatcher: Recorder,
    console: Console,
    wbinvd_flushes: bool,
}

impl World {
    /// 4 MiB of RAM with `code` at 1 MiB, identity tables built by the
    /// boot code, paging on (64-bit mode).
    fn new(code: &[u8]) -> Self {
        let frames: &'static ModelFrames =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(ModelFrames::new()));
        let mut ram = GuestRam::new(frames, &[(0, 4 << 20)]).unwrap();
        ram.add_mmio(layout::ECAM_BASE, layout::ECAM_SIZE).unwrap();
        ram.write(CODE, code).unwrap();
        let cr3 = boot::build_identity_tables(&ram, ram.regions(), false).unwrap();
        let state = boot::x86_entry_state(CODE, cr3);
        let cfg: &'static ModelConfigSpace =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(ModelConfigSpace::new()));
        cfg.add(NIC, FunctionBuilder::endpoint(0x8086, 0x10d3, 0x02_00_00));
        let mut backend = Fake {
            translation: TranslationState {
                cr0: state.cr0,
                cr3,
                cr4: state.cr4,
                efer: state.efer,
                cs_long: true,
                cs_default_big: false,
            },
        };
        let vcpu = backend.create_vcpu(&state).unwrap();
        Self {
            ram,
            cfg,
            backend,
            vcpu,
            dispatcher: Recorder(Vec::new()),
            console: Console::new(),
            wbinvd_flushes: false,
        }
    }

    fn handle(&mut self, reason: VcpuExit, length: InstructionLength) -> (ExitAction, Vec<String>) {
        let topo = enumerate(self.cfg, Segment(0), &[0], 0..=0);
        let nic = topo.get(NIC).unwrap();
        let mut pci = GuestPciBus::new(
            self.cfg,
            &[(nic, Bdf::new(0, 1, 0))],
            layout::BAR_WINDOW_BASE,
            layout::BAR_WINDOW_SIZE,
        )
        .unwrap();
        let mut env = ExitEnv {
            vm: VmId(1),
            vm_name: "net0",
            memory: &self.ram,
            dispatcher: &mut self.dispatcher,
            pci: &mut pci,
            ecam: EcamWindow {
                base: layout::ECAM_BASE,
                buses: 1,
            },
            console: &mut self.console,
            cpuid: &Host,
            wbinvd_flushes: self.wbinvd_flushes,
            console_lines: Vec::new(),
        };
        let exit = Exit {
            reason,
            rip: self.vcpu.regs.rip,
            length,
        };
        let action = handle_exit(&mut self.backend, &mut self.vcpu, &exit, &mut env);
        let lines = core::mem::take(&mut env.console_lines);
        (action, lines)
    }

    fn rip(&self) -> u64 {
        self.vcpu.regs.rip
    }
}

const UNKNOWN: InstructionLength = InstructionLength::Unknown;

#[test]
fn hypercall_with_decoded_length() {
    let mut w = World::new(&[0x0f, 0x01, 0xd9]);
    w.vcpu.regs.gprs[gpr::RAX] = 0x85;
    w.vcpu.regs.gprs[gpr::RBX] = 0x2000;
    let (a, _) = w.handle(
        VcpuExit::Hypercall {
            command: 0x85,
            argument: 0x2000,
        },
        UNKNOWN,
    );
    assert_eq!(a, ExitAction::Resume);
    assert_eq!(w.dispatcher.0, [(0x85, 0x2000)]);
    assert_eq!(w.vcpu.regs.gprs[gpr::RAX], (-22i64) as u64);
    assert_eq!(w.rip(), CODE + 3);
}

#[test]
fn a_wrong_instruction_stops_the_vm_and_keeps_rip() {
    // The exit says hypercall but HLT is at RIP.
    let mut w = World::new(&[0xf4]);
    let (a, _) = w.handle(
        VcpuExit::Hypercall {
            command: 0,
            argument: 0,
        },
        UNKNOWN,
    );
    assert_eq!(
        a,
        ExitAction::Stop(StopReason::InstructionMismatch { rip: CODE })
    );
    assert_eq!(w.rip(), CODE);
    assert!(w.dispatcher.0.is_empty());
    // Garbage at RIP.
    let mut w = World::new(&[0x0f, 0xff]);
    let (a, _) = w.handle(VcpuExit::Hlt, UNKNOWN);
    assert!(matches!(
        a,
        ExitAction::Stop(StopReason::Decode { rip: CODE, .. })
    ));
    assert_eq!(w.rip(), CODE);
    // A known length needs no decoding.
    let mut w = World::new(&[0xff; 4]);
    let (a, _) = w.handle(
        VcpuExit::Hypercall {
            command: 0,
            argument: 0,
        },
        InstructionLength::Known(3),
    );
    assert_eq!(a, ExitAction::Resume);
    assert_eq!(w.rip(), CODE + 3);
}

fn out(port: u16, value: u32) -> VcpuExit {
    VcpuExit::PortIo(PortIo {
        port,
        size: AccessSize::Byte,
        direction: IoDirection::Out,
        string: false,
        rep: false,
        value,
    })
}

#[test]
fn console_lines() {
    let mut w = World::new(&[0xee]);
    let mut lines = Vec::new();
    for b in b"hi\x1b[2J\n" {
        w.vcpu.regs.rip = CODE;
        let (a, l) = w.handle(out(0xe9, u32::from(*b)), InstructionLength::Known(1));
        assert_eq!(a, ExitAction::Resume);
        lines.extend(l);
    }
    assert_eq!(lines, ["hi?[2J"]);
    // Long output is flushed in pieces.
    let mut c = Console::new();
    let flushed: Vec<String> = (0..CONSOLE_LINE_MAX + 5)
        .filter_map(|_| c.push(b'x'))
        .collect();
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0].len(), CONSOLE_LINE_MAX);
}

#[test]
fn port_input_reads_all_ones_and_string_io_stops() {
    // in al, 0x60
    let mut w = World::new(&[0xe4, 0x60]);
    w.vcpu.regs.gprs[0] = 0x1234_5678;
    let input = VcpuExit::PortIo(PortIo {
        port: 0x60,
        size: AccessSize::Byte,
        direction: IoDirection::In,
        string: false,
        rep: false,
        value: 0,
    });
    assert_eq!(w.handle(input, UNKNOWN).0, ExitAction::Resume);
    assert_eq!(w.vcpu.regs.gprs[0], 0x1234_56ff);
    assert_eq!(w.rip(), CODE + 2);
    let string = VcpuExit::PortIo(PortIo {
        port: 0x1f0,
        size: AccessSize::Word,
        direction: IoDirection::In,
        string: true,
        rep: true,
        value: 0,
    });
    assert_eq!(
        w.handle(string, UNKNOWN).0,
        ExitAction::Stop(StopReason::StringPortIo {
            rip: CODE + 2,
            port: 0x1f0
        })
    );
}

#[test]
fn ecam_access_through_the_guest_page_tables() {
    // mov eax, [rdi]: vendor/device of guest 00:01.0.
    let mut w = World::new(&[0x8b, 0x07]);
    let gpa = layout::ECAM_BASE + 0x8000;
    w.vcpu.regs.gprs[gpr::RDI] = gpa;
    let npf = |access| VcpuExit::NestedPageFault {
        gpa,
        access,
        present: false,
        instruction: InstructionBytes::default(),
    };
    assert_eq!(
        w.handle(npf(AccessKind::Read), UNKNOWN).0,
        ExitAction::Resume
    );
    assert_eq!(w.vcpu.regs.gprs[0], 0x10d3_8086);
    assert_eq!(w.rip(), CODE + 2);
    // Hardware-provided bytes (decode assists) are used as well.
    let mut w = World::new(&[0x90, 0x90]);
    let exit = VcpuExit::NestedPageFault {
        gpa,
        access: AccessKind::Read,
        present: false,
        instruction: InstructionBytes::new(&[0x8b, 0x07]),
    };
    assert_eq!(w.handle(exit, UNKNOWN).0, ExitAction::Resume);
    assert_eq!(w.vcpu.regs.gprs[0], 0x10d3_8086);
    // Outside the ECAM window: not emulated.
    let mut w = World::new(&[0x8b, 0x07]);
    let exit = VcpuExit::NestedPageFault {
        gpa: 0xfee0_0000,
        access: AccessKind::Write,
        present: false,
        instruction: InstructionBytes::default(),
    };
    assert_eq!(
        w.handle(exit, UNKNOWN).0,
        ExitAction::Stop(StopReason::UnhandledMemoryAccess {
            rip: CODE,
            gpa: 0xfee0_0000,
            access: AccessKind::Write
        })
    );
}

#[test]
fn cpuid_hides_virtualization_and_names_sluice() {
    let mut w = World::new(&[0x0f, 0xa2]);
    w.vcpu.regs.gprs[gpr::RAX] = 1;
    let (a, _) = w.handle(
        VcpuExit::Cpuid {
            leaf: 1,
            subleaf: 0,
        },
        UNKNOWN,
    );
    assert_eq!(a, ExitAction::Resume);
    let ecx = w.vcpu.regs.gprs[gpr::RCX] as u32;
    assert_eq!(ecx & (1 << 5), 0, "no VMX");
    assert_eq!(ecx & (1 << 3), 0, "no MONITOR");
    assert_eq!(
        ecx & (1 << 27),
        0,
        "OSXSAVE follows the guest's CR4, which has it clear"
    );
    assert_ne!(ecx & (1 << 31), 0, "hypervisor present");
    assert_eq!(w.rip(), CODE + 2);
    assert_eq!(guest_cpuid(0x8000_0001, 0, 0, &Host)[2], 1, "no SVM");
    assert_eq!(guest_cpuid(1, 0, 1 << 18, &Host)[2] & (1 << 27), 1 << 27);
    let [max, b, c, d] = guest_cpuid(0x4000_0000, 0, 0, &Host);
    assert_eq!(max, HYPERVISOR_MAX_LEAF);
    let mut sig = Vec::new();
    for r in [b, c, d] {
        sig.extend_from_slice(&r.to_le_bytes());
    }
    assert_eq!(sig, b"SluiceSluice");
    assert_eq!(
        guest_cpuid(0x4000_0001, 0, 0, &Host)[0],
        boot::HYPERCALL_ABI_VERSION
    );
    assert_eq!(guest_cpuid(0x4000_0010, 0, 0, &Host), [0; 4]);
    assert_eq!(guest_cpuid(7, 0, 0, &Host), [7, 0x11, 0x22, 0x33]);
}

#[test]
fn msrs_get_a_general_protection_fault() {
    let mut w = World::new(&[0x0f, 0x32]);
    let (a, _) = w.handle(
        VcpuExit::Msr {
            access: crate::vcpu::MsrAccess::Read,
            index: 0x1234,
            value: 0,
        },
        UNKNOWN,
    );
    assert_eq!(a, ExitAction::Resume);
    assert_eq!(
        w.vcpu.event,
        Some(Event::Exception {
            vector: 13,
            error_code: Some(0)
        })
    );
    assert_eq!(w.rip(), CODE, "a faulting instruction is not skipped");
}

#[test]
fn aarch64_exits_on_an_x86_backend_stop_the_vm() {
    // The x86 backend refuses aarch64 exceptions: never a silent resume.
    let mut w = World::new(&[0x90]);
    for exit in [
        VcpuExit::UndefinedInstruction,
        VcpuExit::SecureMonitorCall {
            function: 0,
            immediate: 0,
        },
    ] {
        assert!(matches!(
            w.handle(exit, UNKNOWN).0,
            ExitAction::Stop(StopReason::Backend(VcpuError::Unsupported(_)))
        ));
    }
    assert_eq!(w.vcpu.event, None);
    assert_eq!(w.rip(), CODE);
}

#[test]
fn hlt_wbinvd_and_the_rest() {
    let mut w = World::new(&[0xf4]);
    assert_eq!(w.handle(VcpuExit::Hlt, UNKNOWN).0, ExitAction::Halt);
    assert_eq!(w.rip(), CODE + 1);

    let mut w = World::new(&[0x0f, 0x09]);
    assert_eq!(
        w.handle(VcpuExit::Wbinvd, UNKNOWN).0,
        ExitAction::Resume,
        "NOOP policy"
    );
    let mut w = World::new(&[0x0f, 0x08]);
    w.wbinvd_flushes = true;
    assert_eq!(
        w.handle(VcpuExit::Invd, UNKNOWN).0,
        ExitAction::FlushCaches,
        "INVD flushes too"
    );
    assert_eq!(w.rip(), CODE + 2);

    let mut w = World::new(&[0x90]);
    assert_eq!(
        w.handle(VcpuExit::Shutdown, UNKNOWN).0,
        ExitAction::Stop(StopReason::TripleFault)
    );
    assert_eq!(
        w.handle(VcpuExit::ExternalInterrupt, UNKNOWN).0,
        ExitAction::Resume
    );
    assert_eq!(
        w.handle(VcpuExit::Unknown { code: 0x8d }, UNKNOWN).0,
        ExitAction::Stop(StopReason::Unhandled {
            rip: CODE,
            exit: VcpuExit::Unknown { code: 0x8d }
        })
    );
    assert_eq!(
        w.handle(
            VcpuExit::Exception {
                vector: 18,
                error_code: None
            },
            UNKNOWN
        )
        .0,
        ExitAction::Stop(StopReason::Exception {
            rip: CODE,
            vector: 18
        })
    );
    assert_eq!(w.rip(), CODE);
}

#[test]
fn real_mode_and_paging_off_fetch_by_physical_address() {
    let mut w = World::new(&[0x0f, 0xa2]);
    w.backend.translation = TranslationState {
        cr0: cr::CR0_PE,
        cs_default_big: true,
        ..TranslationState::default()
    };
    assert_eq!(w.backend.translation.code_mode(), CodeMode::Protected32);
    assert_eq!(
        w.handle(
            VcpuExit::Cpuid {
                leaf: 0,
                subleaf: 0
            },
            UNKNOWN
        )
        .0,
        ExitAction::Resume
    );
    assert_eq!(w.rip(), CODE + 2);
    assert_eq!(TranslationState::default().code_mode(), CodeMode::Real16);
}

/// The aarch64 paths, over the real EL2 backend (its world switch is never
/// called: exits are handed to the handler directly).
mod aarch64 {
    use super::*;
    use crate::vcpu::el2::{
        El2Backend, El2Features, El2Hardware, El2Vcpu, ExitSyndrome, GuestContext, GuestControl,
    };
    use crate::vcpu::{
        Aarch64EntryState, Aarch64Exception, Aarch64Registers, DecodedAccess, MsrAccess,
        SystemRegisterAccess, SystemRegisterEncoding, pstate,
    };
    use crate::vm::boot::aarch64_layout;

    struct NoWorldSwitch;
    impl El2Hardware for NoWorldSwitch {
        fn enter(&mut self, _: &mut GuestContext, _: &GuestControl) -> ExitSyndrome {
            unreachable!("exits are handed to the handler directly")
        }
    }

    const PC: u64 = 0x4020_0000;
    const FOUR: InstructionLength = InstructionLength::Known(4);

    struct ArmWorld {
        ram: GuestRam<&'static ModelFrames>,
        pci: GuestPciBus<&'static ModelConfigSpace>,
        backend: El2Backend<NoWorldSwitch>,
        vcpu: El2Vcpu,
        dispatcher: Recorder,
        console: Console,
    }

    impl ArmWorld {
        fn new() -> Self {
            let frames: &'static ModelFrames =
                alloc::boxed::Box::leak(alloc::boxed::Box::new(ModelFrames::new()));
            let ram = GuestRam::new(frames, &[(aarch64_layout::RAM_BASE, 4 << 20)]).unwrap();
            let cfg: &'static ModelConfigSpace =
                alloc::boxed::Box::leak(alloc::boxed::Box::new(ModelConfigSpace::new()));
            cfg.add(NIC, FunctionBuilder::endpoint(0x8086, 0x10d3, 0x02_00_00));
            let topo = enumerate(cfg, Segment(0), &[0], 0..=0);
            let nic = topo.get(NIC).unwrap();
            let pci = GuestPciBus::new(
                cfg,
                &[(nic, Bdf::new(0, 1, 0))],
                aarch64_layout::BAR_WINDOW_BASE,
                aarch64_layout::BAR_WINDOW_SIZE,
            )
            .unwrap();
            let mut backend =
                El2Backend::new(NoWorldSwitch, El2Features::from_id_registers(5, 0)).unwrap();
            let mut registers = Aarch64Registers {
                pc: PC,
                pstate: pstate::MODE_EL1H | pstate::I | pstate::F | pstate::A | pstate::D,
                ..Aarch64Registers::default()
            };
            for (i, x) in registers.x.iter_mut().enumerate() {
                *x = 0x1000 + i as u64;
            }
            let vcpu = backend
                .create_aarch64_vcpu(&Aarch64EntryState {
                    registers,
                    sp_el1: 0,
                    sctlr_el1: 0,
                    cpacr_el1: 0,
                })
                .unwrap();
            Self {
                ram,
                pci,
                backend,
                vcpu,
                dispatcher: Recorder(Vec::new()),
                console: Console::new(),
            }
        }

        fn handle(
            &mut self,
            reason: VcpuExit,
            length: InstructionLength,
        ) -> (ExitAction, Vec<String>) {
            let rip = self.x().pc;
            let mut env = ExitEnv {
                vm: VmId(2),
                vm_name: "arm0",
                memory: &self.ram,
                dispatcher: &mut self.dispatcher,
                pci: &mut self.pci,
                ecam: EcamWindow {
                    base: aarch64_layout::ECAM_BASE,
                    buses: 1,
                },
                console: &mut self.console,
                cpuid: &Host,
                wbinvd_flushes: false,
                console_lines: Vec::new(),
            };
            let exit = Exit {
                reason,
                rip,
                length,
            };
            let action = handle_exit(&mut self.backend, &mut self.vcpu, &exit, &mut env);
            let lines = core::mem::take(&mut env.console_lines);
            (action, lines)
        }

        fn x(&self) -> Aarch64Registers {
            self.backend.aarch64_registers(&self.vcpu).unwrap()
        }

        fn set_x(&mut self, index: usize, value: u64) {
            let mut r = self.x();
            r.x[index] = value;
            self.backend
                .set_aarch64_registers(&mut self.vcpu, &r)
                .unwrap();
        }
    }

    fn mmio(gpa: u64, size: AccessSize, kind: AccessKind, register: u8) -> VcpuExit {
        VcpuExit::DecodedMmio {
            gpa,
            access: DecodedAccess {
                size,
                kind,
                register,
                sign_extend: false,
                register_64: false,
            },
        }
    }

    #[test]
    fn hypercall_uses_x0_x1_and_answers_in_x0() {
        let mut w = ArmWorld::new();
        w.set_x(0, sluice_abi::regs::AARCH64_FUNCTION_BASE | 0x85);
        w.set_x(1, 0x4000_3000);
        let before = w.x();
        let (a, _) = w.handle(
            VcpuExit::Hypercall {
                command: 0x85,
                argument: 0x4000_3000,
            },
            FOUR,
        );
        assert_eq!(a, ExitAction::Resume);
        assert_eq!(w.dispatcher.0, [(0x85, 0x4000_3000)]);
        let after = w.x();
        assert_eq!(after.x[0], (-22i64) as u64);
        assert_eq!(after.x[1..], before.x[1..], "only X0 changes");
        assert_eq!(after.pc, PC + 4);
        // A PSCI call (through HVC or a trapped SMC) is not Sluice's: SMCCC
        // NOT_SUPPORTED, the dispatcher never sees it.
        w.set_x(0, 0x8400_0000);
        let (a, _) = w.handle(
            VcpuExit::Hypercall {
                command: 0x8400_0000,
                argument: 0,
            },
            FOUR,
        );
        assert_eq!(a, ExitAction::Resume);
        assert_eq!(w.x().x[0], u64::MAX);
        assert_eq!(w.dispatcher.0.len(), 1);
        assert_eq!(w.x().pc, PC + 8);
    }

    #[test]
    fn console_register_prints_low_bytes() {
        let mut w = ArmWorld::new();
        let mut lines = Vec::new();
        for (i, b) in b"arm\n".iter().enumerate() {
            // STRB W7 (upper bits ignored), any register.
            w.set_x(7, 0xffff_ff00 | u64::from(*b));
            let (a, l) = w.handle(
                mmio(
                    aarch64_layout::CONSOLE_GPA,
                    AccessSize::Byte,
                    AccessKind::Write,
                    7,
                ),
                FOUR,
            );
            assert_eq!(a, ExitAction::Resume);
            assert_eq!(w.x().pc, PC + 4 * (i as u64 + 1));
            lines.extend(l);
        }
        assert_eq!(lines, ["arm"]);
        // A load reads 0; a store from XZR prints NUL as `?`.
        let (a, _) = w.handle(
            mmio(
                aarch64_layout::CONSOLE_GPA,
                AccessSize::Dword,
                AccessKind::Read,
                9,
            ),
            FOUR,
        );
        assert_eq!(a, ExitAction::Resume);
        assert_eq!(w.x().x[9], 0);
        w.handle(
            mmio(
                aarch64_layout::CONSOLE_GPA,
                AccessSize::Byte,
                AccessKind::Write,
                31,
            ),
            FOUR,
        );
        w.set_x(2, u64::from(b'\n'));
        let (_, l) = w.handle(
            mmio(
                aarch64_layout::CONSOLE_GPA,
                AccessSize::Byte,
                AccessKind::Write,
                2,
            ),
            FOUR,
        );
        assert_eq!(l, ["?"]);
    }

    #[test]
    fn ecam_from_the_syndrome() {
        let mut w = ArmWorld::new();
        let dev1 = aarch64_layout::ECAM_BASE + 0x8000;
        // LDR W3, [vendor/device of guest 00:01.0].
        let (a, _) = w.handle(mmio(dev1, AccessSize::Dword, AccessKind::Read, 3), FOUR);
        assert_eq!(a, ExitAction::Resume);
        assert_eq!(w.x().x[3], 0x10d3_8086);
        assert_eq!(w.x().pc, PC + 4);
        // LDRSH X4, [device ID]: sign-extended into the X register.
        let signed = VcpuExit::DecodedMmio {
            gpa: dev1 + 2,
            access: DecodedAccess {
                size: AccessSize::Word,
                kind: AccessKind::Read,
                register: 4,
                sign_extend: true,
                register_64: true,
            },
        };
        w.handle(signed, FOUR);
        assert_eq!(w.x().x[4], 0x10d3);
        // Unowned functions and 8-byte accesses read all ones.
        w.handle(
            mmio(dev1 + 0x8000, AccessSize::Dword, AccessKind::Read, 5),
            FOUR,
        );
        assert_eq!(w.x().x[5], 0xffff_ffff);
        let wide = VcpuExit::DecodedMmio {
            gpa: dev1,
            access: DecodedAccess {
                size: AccessSize::Qword,
                kind: AccessKind::Read,
                register: 6,
                sign_extend: false,
                register_64: true,
            },
        };
        w.handle(wide, FOUR);
        assert_eq!(w.x().x[6], u64::MAX);
        // STRH W8 to COMMAND: memory space on; bus mastering stays off
        // (not bound).
        w.set_x(8, 0x0006);
        w.handle(mmio(dev1 + 4, AccessSize::Word, AccessKind::Write, 8), FOUR);
        assert_eq!(
            w.pci.device(Bdf::new(0, 1, 0)).unwrap().guest_command(),
            0x0002
        );
        // A store from XZR writes zero.
        w.handle(
            mmio(dev1 + 4, AccessSize::Word, AccessKind::Write, 31),
            FOUR,
        );
        assert_eq!(w.pci.device(Bdf::new(0, 1, 0)).unwrap().guest_command(), 0);
        // A load into XZR is discarded.
        let before = w.x();
        let (a, _) = w.handle(mmio(dev1, AccessSize::Dword, AccessKind::Read, 31), FOUR);
        assert_eq!(a, ExitAction::Resume);
        assert_eq!(w.x().x, before.x);
    }

    #[test]
    fn what_cannot_be_emulated_stops_the_vm() {
        let mut w = ArmWorld::new();
        let stop = w
            .handle(
                VcpuExit::UndecodableMmio {
                    gpa: aarch64_layout::ECAM_BASE,
                    access: AccessKind::Read,
                },
                FOUR,
            )
            .0;
        assert_eq!(
            stop,
            ExitAction::Stop(StopReason::UndecodableAccess {
                rip: PC,
                gpa: aarch64_layout::ECAM_BASE,
                access: AccessKind::Read
            })
        );
        assert!(stop_text(&stop).contains("single LDR/STR"));
        assert_eq!(w.x().pc, PC, "never resumed past the access");
        // Outside the console and the ECAM window.
        assert_eq!(
            w.handle(
                mmio(0x0800_0000, AccessSize::Dword, AccessKind::Write, 1),
                FOUR
            )
            .0,
            ExitAction::Stop(StopReason::UnhandledMemoryAccess {
                rip: PC,
                gpa: 0x0800_0000,
                access: AccessKind::Write
            })
        );
        // An instruction fetch from the ECAM window: never emulated (and no
        // x86 decoding of aarch64 code).
        assert_eq!(
            w.handle(
                VcpuExit::NestedPageFault {
                    gpa: aarch64_layout::ECAM_BASE,
                    access: AccessKind::Execute,
                    present: false,
                    instruction: InstructionBytes::default()
                },
                InstructionLength::Unknown
            )
            .0,
            ExitAction::Stop(StopReason::UnhandledMemoryAccess {
                rip: PC,
                gpa: aarch64_layout::ECAM_BASE,
                access: AccessKind::Execute
            })
        );
        assert_eq!(
            w.handle(
                mmio(
                    aarch64_layout::ECAM_BASE,
                    AccessSize::Dword,
                    AccessKind::Read,
                    1
                ),
                InstructionLength::Unknown
            )
            .0,
            ExitAction::Stop(StopReason::UnknownLength { rip: PC })
        );
        // MSR traps would need an exception injected: refused.
        assert!(matches!(
            w.handle(
                VcpuExit::Msr {
                    access: crate::vcpu::MsrAccess::Read,
                    index: 0x10,
                    value: 0
                },
                FOUR
            )
            .0,
            ExitAction::Stop(StopReason::Backend(VcpuError::Unsupported(_)))
        ));
        assert_eq!(w.x().pc, PC);
    }

    fn sysreg(encoding: SystemRegisterEncoding, register: u8, access: MsrAccess) -> VcpuExit {
        VcpuExit::SystemRegister(SystemRegisterAccess {
            encoding,
            register,
            access,
        })
    }

    #[test]
    fn trapped_accesses_sluice_does_not_emulate_are_undefined() {
        for exit in [
            sysreg(SystemRegisterEncoding::ACTLR_EL1, 3, MsrAccess::Read),
            sysreg(SystemRegisterEncoding::CNTP_CTL_EL0, 31, MsrAccess::Write),
            sysreg(
                SystemRegisterEncoding::new(3, 0, 15, 2, 0),
                0,
                MsrAccess::Read,
            ),
            VcpuExit::SecureMonitorCall {
                function: 0xc200_0000,
                immediate: 0,
            },
            VcpuExit::UndefinedInstruction,
        ] {
            let mut w = ArmWorld::new();
            let before = w.x();
            let (a, _) = w.handle(exit, FOUR);
            assert_eq!(a, ExitAction::Resume, "{exit:?}");
            assert_eq!(
                w.vcpu.pending_exception(),
                Some(Aarch64Exception::Undefined),
                "{exit:?}"
            );
            // Nothing skipped or written: the guest takes the exception at
            // the instruction at its next entry.
            assert_eq!(w.x(), before, "{exit:?}");
            assert!(w.dispatcher.0.is_empty());
            // A second one before that entry cannot be queued: the VM
            // stops rather than lose one.
            assert_eq!(
                w.handle(exit, FOUR).0,
                ExitAction::Stop(StopReason::Backend(VcpuError::EventPending))
            );
        }
    }

    #[test]
    fn set_way_maintenance_stops_the_vm() {
        let mut w = ArmWorld::new();
        let dc = SystemRegisterAccess {
            encoding: SystemRegisterEncoding::DC_CISW,
            register: 4,
            access: MsrAccess::Write,
        };
        let stop = w.handle(VcpuExit::SystemRegister(dc), FOUR).0;
        assert_eq!(
            stop,
            ExitAction::Stop(StopReason::SetWayMaintenance {
                rip: PC,
                access: dc
            })
        );
        let text = stop_text(&stop);
        assert!(
            text.contains("SYS S1_0_C7_C14_2 (DC CISW), X4") && text.contains("HCR_EL2.TSW"),
            "{text}"
        );
        assert_eq!(w.vcpu.pending_exception(), None);
        assert_eq!(w.x().pc, PC);
    }

    #[test]
    fn wfi_halts_wfe_resumes() {
        let mut w = ArmWorld::new();
        assert_eq!(w.handle(VcpuExit::Hlt, FOUR).0, ExitAction::Halt);
        assert_eq!(w.x().pc, PC + 4);
        assert_eq!(w.handle(VcpuExit::Yield, FOUR).0, ExitAction::Resume);
        assert_eq!(w.x().pc, PC + 8);
        assert!(!w.x().irqs_unmasked());
    }

    fn stop_text(action: &ExitAction) -> String {
        match action {
            ExitAction::Stop(reason) => alloc::format!("{reason}"),
            other => alloc::format!("{other:?}"),
        }
    }
}
