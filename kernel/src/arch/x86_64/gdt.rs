//! Sluice's own GDT with a TSS, so fatal exceptions (double fault, NMI,
//! machine check) run on a known-good stack (IST1) even if the current stack
//! overflowed.

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

static mut TSS: TaskStateSegment = TaskStateSegment {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: size_of::<TaskStateSegment>() as u16,
};

// null, code (L=1, P=1, S=1, type=exec/read), data (P=1, S=1, type=rw),
// and the two-slot TSS descriptor filled in at run time.
static mut GDT: [u64; 5] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0, 0];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads the GDT and TSS and reloads every segment register.
pub fn init() {
    // SAFETY: called once on the boot CPU before anything else uses these
    // statics; afterwards the CPU owns them.
    unsafe {
        let stack_top = (&raw const IST1_STACK) as u64 + IST_STACK_SIZE as u64;
        let tss_ptr = &raw mut TSS;
        (*tss_ptr).ist[0] = stack_top;
        let tss = (&raw const TSS) as u64;
        let limit = (size_of::<TaskStateSegment>() - 1) as u64;
        // Available 64-bit TSS (type 9), present.
        let low = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        let gdt_ptr = &raw mut GDT;
        let gdt = &mut *gdt_ptr;
        gdt[3] = low;
        gdt[4] = tss >> 32;
        let pointer = DescriptorPointer {
            limit: (size_of::<[u64; 5]>() - 1) as u16,
            base: gdt.as_ptr() as u64,
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
