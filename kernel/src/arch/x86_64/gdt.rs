//! Sluice's own GDT with a TSS on every CPU, so fatal exceptions (double
//! fault, NMI, machine check) run on a known-good stack (IST1) even if the
//! current stack overflowed. Each CPU's GDT also carries its CPU index.

use core::arch::asm;
use core::mem::size_of;

pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// 64-bit TSS (Intel SDM vol. 3, 8.7 "Task management in 64-bit mode").
#[repr(C, packed)]
pub struct TaskStateSegment {
    reserved0: u32,
    pub rsp: [u64; 3],
    reserved1: u64,
    pub ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    pub iomap_base: u16,
}
const _: () = assert!(size_of::<TaskStateSegment>() == 104);

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

static mut IST1_STACK: Stack = Stack([0; IST_STACK_SIZE]);

impl TaskStateSegment {
    const fn new() -> Self {
        Self {
            reserved0: 0,
            rsp: [0; 3],
            reserved1: 0,
            ist: [0; 7],
            reserved2: 0,
            reserved3: 0,
            iomap_base: size_of::<TaskStateSegment>() as u16,
        }
    }
}

/// Slot 5 of every Sluice GDT: a not-present descriptor (P, bit 47, clear),
/// whose other bits are free for software (SDM vol. 3A §3.4.5), holding
/// this marker in bits 63:48 and the CPU index in bits 31:0. `SGDT` then
/// tells any CPU who it is without an MSR or a lookup.
const CPU_MARKER: u64 = 0x511c << 48;
const CPU_SLOT: usize = 5;

/// One CPU's GDT and TSS: null, code (L=1, P=1, S=1, type=exec/read), data
/// (P=1, S=1, type=rw), the two-slot TSS descriptor filled in at load
/// time, and the CPU marker.
#[repr(C, align(16))]
pub struct CpuTables {
    gdt: [u64; 6],
    tss: TaskStateSegment,
}
const _: () = assert!(size_of::<CpuTables>() <= 4096);

impl CpuTables {
    pub const fn new() -> Self {
        Self {
            gdt: [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0, 0, 0],
            tss: TaskStateSegment::new(),
        }
    }
}

impl Default for CpuTables {
    fn default() -> Self {
        Self::new()
    }
}

static mut BSP_TABLES: CpuTables = CpuTables::new();

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads the boot CPU's GDT and TSS and reloads every segment register.
pub fn init() {
    // SAFETY: called once on the boot CPU before anything else uses these
    // statics; afterwards the boot CPU owns them.
    unsafe {
        let stack_top = (&raw const IST1_STACK) as u64 + IST_STACK_SIZE as u64;
        load(&raw mut BSP_TABLES, stack_top, 0);
    }
}

/// Writes fresh tables for CPU `cpu_index` with IST1 at `ist1_top` into
/// `tables`, loads them and reloads every segment register.
///
/// # Safety
/// `tables` must be valid for writes, belong to the calling CPU alone and
/// live for the rest of Sluice's life; `ist1_top` must be the top of a
/// 16-byte aligned stack reserved for this CPU's fatal exceptions.
pub unsafe fn load(tables: *mut CpuTables, ist1_top: u64, cpu_index: u32) {
    // SAFETY: the caller's contract: the tables are ours and live forever.
    unsafe {
        tables.write(CpuTables::new());
        let tables = &mut *tables;
        tables.tss.ist[0] = ist1_top;
        let tss = (&raw const tables.tss) as u64;
        let limit = (size_of::<TaskStateSegment>() - 1) as u64;
        // Available 64-bit TSS (type 9), present.
        let low = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        tables.gdt[3] = low;
        tables.gdt[4] = tss >> 32;
        tables.gdt[CPU_SLOT] = CPU_MARKER | u64::from(cpu_index);
        let pointer = DescriptorPointer {
            limit: (size_of::<[u64; 6]>() - 1) as u16,
            base: tables.gdt.as_ptr() as u64,
        };
        asm!(
            "lgdt [{ptr}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "mov fs, {data:x}",
            "mov gs, {data:x}",
            "ltr {tss:x}",
            ptr = in(reg) &pointer,
            code = const KERNEL_CODE as u64,
            tmp = out(reg) _,
            data = in(reg) KERNEL_DATA as u64,
            tss = in(reg) TSS_SELECTOR as u64,
        );
    }
}

/// The index of the running CPU, from the marker in its GDT; `None` before
/// Sluice loaded its own GDT on this CPU.
pub fn current_cpu_index() -> Option<u32> {
    let mut pointer = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: SGDT only stores the GDTR into `pointer`.
    unsafe { asm!("sgdt [{}]", in(reg) &raw mut pointer, options(nostack, preserves_flags)) };
    let (limit, base) = (pointer.limit, pointer.base);
    if usize::from(limit) < (CPU_SLOT + 1) * 8 - 1 {
        return None;
    }
    // SAFETY: the slot lies inside the GDT the CPU is using (checked against
    // its limit), which is mapped memory.
    let slot = unsafe { core::ptr::read_volatile((base as *const u64).add(CPU_SLOT)) };
    (slot & !0xffff_ffff == CPU_MARKER).then_some(slot as u32)
}
