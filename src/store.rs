//! Where a layer's buffers live and how kernels are launched on them.
//!
//! Every operation is written once, generic over [`Store`]: validate on the host, fill a params
//! struct from `cuda/params.h` with buffer addresses, launch by kernel name. Two stores exist:
//! `EmuStore` (feature `emulator`: host memory, kernels run by the CPU SIMT emulator) and
//! `GpuStore` (feature `cuda`: CUDA device memory, kernels from the embedded fatbins). Both run
//! the same `.cu` source.

use crate::error::Result;
use crate::params::HwLaunch;

/// Plain data a store can hold: the cache dtypes and the int32 metadata. With the `cuda`
/// feature also what cudarc needs to allocate and copy it (every plain-data type qualifies).
#[cfg(feature = "cuda")]
pub trait Elem:
    bytemuck::Pod + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Send + Sync + 'static
{
}
#[cfg(feature = "cuda")]
impl<T: bytemuck::Pod + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Send + Sync + 'static>
    Elem for T
{
}
/// Plain data a store can hold: the cache dtypes and the int32 metadata.
#[cfg(not(feature = "cuda"))]
pub trait Elem: bytemuck::Pod + Send + Sync + 'static {}
#[cfg(not(feature = "cuda"))]
impl<T: bytemuck::Pod + Send + Sync + 'static> Elem for T {}

/// A launch-parameter struct from `cuda/params.h` (with the `cuda` feature also cudarc's
/// `DeviceRepr`, so it is passed to the kernel by value).
///
/// # Safety
/// Implement only for `#[repr(C)]` plain-data structs generated from `cuda/params.h`, whose
/// kernel signature takes exactly that struct by value.
#[cfg(feature = "cuda")]
pub unsafe trait KernelParams: cudarc::driver::DeviceRepr + Copy {}
/// A launch-parameter struct from `cuda/params.h`.
///
/// # Safety
/// Implement only for `#[repr(C)]` plain-data structs generated from `cuda/params.h`, whose
/// kernel signature takes exactly that struct by value.
#[cfg(not(feature = "cuda"))]
pub unsafe trait KernelParams: Copy {}

/// A place that holds buffers and runs kernels over them.
pub trait Store: Clone {
    /// A buffer of `T` in this store.
    type Buf<T: Elem>;
    /// Keeps buffers pinned for a launch (cudarc's stream-ordering guards on the GPU).
    #[doc(hidden)]
    type Pins<'a>: Default
    where
        Self: 'a;

    /// A buffer holding a copy of `data`.
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Self::Buf<T>>;
    /// A buffer of `n` zeros.
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    /// Copies a buffer back to the host (waits for queued work on it).
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    /// Overwrites the whole buffer with `data` (lengths must match).
    fn overwrite<T: Elem>(&self, buf: &mut Self::Buf<T>, data: &[T]) -> Result<()>;
    /// Elements in a buffer.
    fn len<T: Elem>(buf: &Self::Buf<T>) -> usize;
    /// Streaming multiprocessors the kernels spread over (sizes flash-decoding splits). The
    /// emulator reports an H100 SXM's 132 so its plans match the GPU's.
    fn sm_count(&self) -> usize;

    /// Errors (naming `field`) unless this store's kernels can address `buf`: on the GPU, a
    /// buffer allocated in another device's context would fault in a launch here.
    #[doc(hidden)]
    fn check_buf<T: Elem>(&self, field: &str, buf: &Self::Buf<T>) -> Result<()>;
    /// Address of a buffer for a kernel that only reads it; checks it with
    /// [`Store::check_buf`] first.
    #[doc(hidden)]
    fn addr<'a, T: Elem>(
        &'a self,
        field: &str,
        buf: &'a Self::Buf<T>,
        pins: &mut Self::Pins<'a>,
    ) -> Result<u64>;
    /// Address of a buffer for a kernel that writes it; checks it with [`Store::check_buf`]
    /// first.
    #[doc(hidden)]
    fn addr_mut<'a, T: Elem>(
        &'a self,
        field: &str,
        buf: &'a mut Self::Buf<T>,
        pins: &mut Self::Pins<'a>,
    ) -> Result<u64>;
    /// Launches kernel `name` over `params`.
    ///
    /// # Safety
    /// Every address in `params` must come from `addr`/`addr_mut` of this store (pinned in the
    /// same `Pins`, kept alive until this returns), and the caller must have validated every
    /// index the kernel will form from `params` against those buffers' lengths.
    #[doc(hidden)]
    unsafe fn launch<P: KernelParams>(&self, name: &'static str, cfg: &HwLaunch, params: &P) -> Result<()>;
}

/// Checks that a buffer address meets the kernels' 16-byte vector alignment.
pub(crate) fn check_aligned(field: &str, addr: u64) -> Result<()> {
    if addr.is_multiple_of(16) {
        Ok(())
    } else {
        Err(crate::Error::invalid(field, format!("address {addr:#x} is not 16-byte aligned")))
    }
}

/// Makes `buf` hold at least `n` elements (at least 1), reallocating (zeroed) only when it is
/// missing or too small: scratch buffers that a decode loop reuses across calls.
pub(crate) fn ensure<S: Store, E: Elem>(store: &S, buf: &mut Option<S::Buf<E>>, n: usize) -> Result<()> {
    if buf.as_ref().is_none_or(|b| S::len(b) < n.max(1)) {
        *buf = Some(store.zeros(n.max(1))?);
    }
    Ok(())
}
