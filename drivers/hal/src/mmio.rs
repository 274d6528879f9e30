//! Register blocks: typed offsets with access rights.
//!
//! A driver declares each register once, e.g.
//! `const GSTS: Reg32<ReadOnly> = Reg32::new(0x1c);`, and the type system
//! stops it from writing a read-only register.

use core::marker::PhantomData;

/// Raw access to one device's register window.
pub trait Mmio {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    fn read64(&self, offset: usize) -> u64;
    fn write64(&self, offset: usize, value: u64);
}

pub trait Readable {}
pub trait Writable {}

#[derive(Debug, Clone, Copy)]
pub struct ReadOnly;
#[derive(Debug, Clone, Copy)]
pub struct WriteOnly;
#[derive(Debug, Clone, Copy)]
pub struct ReadWrite;

impl Readable for ReadOnly {}
impl Readable for ReadWrite {}
impl Writable for WriteOnly {}
impl Writable for ReadWrite {}

macro_rules! register {
    ($name:ident, $ty:ty, $read:ident, $write:ident) => {
        /// A register at a fixed offset in a block, with its access right.
        #[derive(Debug)]
        pub struct $name<A> {
            offset: usize,
            _access: PhantomData<A>,
        }

        impl<A> Clone for $name<A> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<A> Copy for $name<A> {}

        impl<A> $name<A> {
            pub const fn new(offset: usize) -> Self {
                Self {
                    offset,
                    _access: PhantomData,
                }
            }
            pub const fn offset(self) -> usize {
                self.offset
            }
            /// The same register `stride * index` bytes further on (register
            /// arrays such as fault-recording registers).
            pub const fn at(self, index: usize, stride: usize) -> Self {
                Self::new(self.offset + index * stride)
            }
        }

        impl<A: Readable> $name<A> {
            pub fn read(self, mmio: &(impl Mmio + ?Sized)) -> $ty {
                mmio.$read(self.offset)
            }
        }

        impl<A: Writable> $name<A> {
            pub fn write(self, mmio: &(impl Mmio + ?Sized), value: $ty) {
                mmio.$write(self.offset, value)
            }
        }
    };
}

register!(Reg32, u32, read32, write32);
register!(Reg64, u64, read64, write64);
