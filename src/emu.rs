//! The emulator store: buffers in host memory, kernels run by the CPU SIMT emulator
//! (`cuda/simt/`), compiled from the same `.cu` files as the GPU fatbins. This is how every
//! kernel is exercised on machines without a GPU.
//!
//! The emulator runs one fiber per CUDA thread and reports kernel bugs (divergent barriers,
//! deadlocks, bad shuffle masks) as [`Error::Emulator`]. `HEADWISE_EMU_SCHEDULE=forward|reverse|
//! random[:seed]` picks the order threads run in, to shake out races.

use crate::error::{Error, Result};
use crate::params::{HwEmuError, HwLaunch};
use crate::store::{Elem, KernelParams, Store};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ffi::CStr;
use std::ptr::NonNull;

unsafe extern "C" {
    /// The emulator's MAX_DYNAMIC_SHARED_SIZE_BYTES opt-in (`cuda/simt/adversarial.h`).
    fn hw_simt_func_set_max_dynamic_shared(name: *const core::ffi::c_char, len: usize, bytes: u32);
}

/// Signature of every emulator entry point (`hw_emu_<kernel>`).
pub(crate) type EmuEntry =
    unsafe extern "C" fn(*const core::ffi::c_void, *const HwLaunch, *mut HwEmuError) -> i32;

/// Alignment of emulator buffers: matches what cudaMalloc guarantees for what the kernels need.
const ALIGN: usize = 256;

/// A host buffer standing in for device memory: `len` elements, 256-byte aligned like a
/// cudaMalloc allocation, zero-initialised.
pub struct EmuBuf<T: Elem> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: EmuBuf owns its allocation exclusively, like Vec<T>; T is plain data.
unsafe impl<T: Elem> Send for EmuBuf<T> {}
// SAFETY: shared references only give out &[T].
unsafe impl<T: Elem> Sync for EmuBuf<T> {}

impl<T: Elem> EmuBuf<T> {
    fn layout(len: usize) -> Result<Layout> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| Error::invalid("len", format!("{len} elements overflow usize bytes")))?;
        Layout::from_size_align(bytes.max(1), ALIGN).map_err(|e| Error::invalid("len", e.to_string()))
    }

    /// `len` zeros.
    pub fn zeros(len: usize) -> Result<EmuBuf<T>> {
        let layout = Self::layout(len)?;
        // SAFETY: layout has nonzero size; all-zero bytes are a valid T (ValidAsZeroBits).
        let raw = unsafe { alloc_zeroed(layout) } as *mut T;
        let ptr = NonNull::new(raw)
            .ok_or_else(|| Error::invalid("len", format!("cannot allocate {len} elements")))?;
        Ok(EmuBuf { ptr, len })
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[T]) -> Result<EmuBuf<T>> {
        let mut b = Self::zeros(data.len())?;
        b.as_mut_slice().copy_from_slice(data);
        Ok(b)
    }

    /// The contents.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: ptr is valid for len initialised elements while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Elem> Drop for EmuBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in zeros() with the same layout (which succeeded then).
        unsafe { dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len).unwrap()) }
    }
}

impl<T: Elem + std::fmt::Debug> std::fmt::Debug for EmuBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuBuf").field("len", &self.len).finish()
    }
}

/// The emulator store. Zero-sized: the emulator has no state a caller must hold.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuStore;

impl Store for EmuStore {
    type Buf<T: Elem> = EmuBuf<T>;
    type Pins<'a> = ();

    fn upload<T: Elem>(&self, data: &[T]) -> Result<EmuBuf<T>> {
        EmuBuf::from_slice(data)
    }
    fn zeros<T: Elem>(&self, n: usize) -> Result<EmuBuf<T>> {
        EmuBuf::zeros(n)
    }
    fn download<T: Elem>(&self, buf: &EmuBuf<T>) -> Result<Vec<T>> {
        Ok(buf.as_slice().to_vec())
    }
    fn overwrite<T: Elem>(&self, buf: &mut EmuBuf<T>, data: &[T]) -> Result<()> {
        if buf.len != data.len() {
            return Err(Error::invalid(
                "data",
                format!("{} elements for a buffer of {}", data.len(), buf.len),
            ));
        }
        buf.as_mut_slice().copy_from_slice(data);
        Ok(())
    }
    fn len<T: Elem>(buf: &EmuBuf<T>) -> usize {
        buf.len
    }
    fn sm_count(&self) -> usize {
        132
    }
    fn check_buf<T: Elem>(&self, _: &str, _: &EmuBuf<T>) -> Result<()> {
        // Host memory is one address space: every EmuBuf is valid for every EmuStore.
        Ok(())
    }
    fn addr<'a, T: Elem>(&'a self, _: &str, buf: &'a EmuBuf<T>, _: &mut ()) -> Result<u64> {
        Ok(buf.ptr.as_ptr() as u64)
    }
    fn addr_mut<'a, T: Elem>(&'a self, _: &str, buf: &'a mut EmuBuf<T>, _: &mut ()) -> Result<u64> {
        Ok(buf.ptr.as_ptr() as u64)
    }
    unsafe fn launch<P: KernelParams>(&self, name: &'static str, cfg: &HwLaunch, params: &P) -> Result<()> {
        let entry = crate::kernels::emu_entry(name).ok_or_else(|| Error::Emulator {
            kernel: name,
            message: "no such kernel in the emulator library".into(),
        })?;
        // SAFETY: run_entry's contract is this function's contract.
        unsafe { run_entry(name, entry, cfg, (params as *const P).cast()) }
    }
}

/// Runs an emulator entry point and turns its report into an [`Error`].
///
/// # Safety
/// `params` must point to the params struct the kernel expects, whose addresses are valid for
/// every access the kernel makes under `cfg`.
pub(crate) unsafe fn run_entry(
    name: &'static str,
    entry: EmuEntry,
    cfg: &HwLaunch,
    params: *const core::ffi::c_void,
) -> Result<()> {
    if cfg.dyn_smem_bytes > 48 * 1024 {
        // What the CUDA launcher does with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        // (src/gpu.rs); HEADWISE_EMU_ADVERSARIAL=smem_optin refuses the launch without it.
        // SAFETY: name is valid for name.len() bytes; the emulator copies it.
        unsafe { hw_simt_func_set_max_dynamic_shared(name.as_ptr().cast(), name.len(), cfg.dyn_smem_bytes) };
    }
    let mut err = HwEmuError { message: [0; crate::params::HW_EMU_ERROR_LEN as usize] };
    // SAFETY: forwarded from the caller; err outlives the call and is NUL-initialised.
    let rc = unsafe { entry(params, cfg, &mut err) };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the emulator NUL-terminates within the buffer; a zeroed buffer is also valid.
    let bytes: &[u8] = bytemuck::cast_slice(&err.message[..]);
    let message = CStr::from_bytes_until_nul(bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    Err(Error::Emulator { kernel: name, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `HwSimtTestParams` (cuda/simt/selftest.h), as far as the kernel below reads it.
    #[repr(C)]
    struct TestParams {
        out: *mut i32,
        rest: [usize; 6],
    }

    /// 64 KiB of dynamic shared memory passes the smem_optin mode only because run_entry opts
    /// the kernel in first, as GpuStore::launch sets the CUDA attribute.
    #[test]
    fn big_dynamic_shared_memory_is_opted_in() {
        let name = "hw_simt_test_smem_optin";
        let entry = crate::kernels::emu_entry(name).expect("self-test kernel in the table");
        let mut out = vec![-1i32; 32];
        let params = TestParams { out: out.as_mut_ptr(), rest: [0; 6] };
        let cfg = HwLaunch { dyn_smem_bytes: 64 * 1024, ..crate::kernels::launch_1d(1, 32, 0) };
        crate::simt_selftest::with_adversarial("smem_optin", || {
            // SAFETY: the kernel writes out[0..32) only; params outlives the launch.
            unsafe { run_entry(name, entry, &cfg, (&raw const params).cast()) }
        })
        .unwrap()
        .unwrap();
        assert_eq!(out, (0..32).collect::<Vec<i32>>());
    }
}
