//! Store handles: where a cache's memory lives and its kernels run, a CUDA device with the
//! engine's stream or the CPU SIMT emulator over host memory; and what every operation over
//! them shares: keeping the caller's CUDA context current, wrapping caller memory as buffers.

use super::args::{free_handle, handle, out_handle, out_value};
use super::errors::boundary;
#[cfg(feature = "emulator")]
use crate::emu::{EmuBuf, EmuStore};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{GpuBuf, GpuStore};
use crate::store::{Elem, Store};
#[cfg(feature = "cuda")]
use cudarc::driver::sys::CUcontext;
use std::ffi::{c_int, c_void};
#[cfg(feature = "cuda")]
use std::ptr::null_mut;

/// Restores the calling thread's current CUDA context when dropped. cudarc makes the device's
/// primary context current before its driver calls; an engine that drives several devices from
/// one thread (runtime API: `cudaSetDevice`) would otherwise find its next runtime call on the
/// wrong device.
#[cfg(feature = "cuda")]
pub(super) struct KeepCurrentContext(CUcontext);
/// Without the `cuda` feature there is no context to keep.
#[cfg(not(feature = "cuda"))]
pub(super) struct KeepCurrentContext;
#[cfg(not(feature = "cuda"))]
impl KeepCurrentContext {
    pub(super) fn new() -> KeepCurrentContext {
        KeepCurrentContext
    }
}

/// The calling thread's current context; NULL when there is none, and before cuInit (when the
/// query fails), so a thread that had no context gets none back.
#[cfg(feature = "cuda")]
pub(super) fn current_context() -> CUcontext {
    cudarc::driver::result::ctx::get_current().ok().flatten().unwrap_or(null_mut())
}

#[cfg(feature = "cuda")]
impl KeepCurrentContext {
    /// Only call once libcuda is known to be loadable (a GPU handle exists, or
    /// `is_culib_present` said so): cudarc panics when it cannot load the library.
    pub(super) fn new() -> KeepCurrentContext {
        KeepCurrentContext(current_context())
    }
}

#[cfg(feature = "cuda")]
impl Drop for KeepCurrentContext {
    fn drop(&mut self) {
        if current_context() != self.0 {
            // SAFETY: self.0 was current on this thread when the call began (or is NULL, which
            // unbinds); the engine owns that context and keeps it alive across its own call.
            let _ = unsafe { cudarc::driver::result::ctx::set_current(self.0) };
        }
    }
}

/// Where caches and query rings made from this handle keep their memory and run their kernels:
/// a CUDA device and the engine's stream (`headwise_gpu_create`), or the CPU SIMT emulator over
/// host memory (`headwise_emulator_create`), which runs the same kernels on a machine without a
/// GPU. Every other function is the same for both. Free with `headwise_store_free`.
pub struct HeadwiseStore {
    pub(super) backend: Backend,
}

pub(super) enum Backend {
    #[cfg(feature = "cuda")]
    Gpu(GpuStore),
    #[cfg(feature = "emulator")]
    Emulator(EmuStore),
}

impl Backend {
    pub(super) fn is_gpu(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Gpu(_) => true,
            #[cfg(feature = "emulator")]
            Backend::Emulator(_) => false,
        }
    }
}

/// What the C ABI needs of a store beyond [`Store`]: wrapping caller memory, and whether calls
/// must keep the caller's CUDA context.
pub(super) trait CStore: Store {
    /// `len` elements of caller memory at `ptr` (NULL only when `len` is 0), never freed.
    ///
    /// # Safety
    /// `ptr` must be memory of this store (a device address of its context; host memory for
    /// the emulator) valid for `len` elements of `T` while the result and any work enqueued
    /// over it are in use, and ordered with the store's stream.
    unsafe fn borrow<T: Elem>(ptr: *const c_void, len: usize, field: &str) -> Result<Self::Buf<T>>;
}

/// Errors unless `len` elements of `T` at `ptr` can be memory at all.
fn check_extent<T>(ptr: *const c_void, len: usize, field: &str) -> Result<()> {
    if ptr.is_null() && len > 0 {
        return Err(Error::invalid(field, format!("NULL pointer where {len} elements are needed")));
    }
    if len.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(Error::invalid(field, format!("{len} elements overflow the address space")));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
impl CStore for GpuStore {
    unsafe fn borrow<T: Elem>(ptr: *const c_void, len: usize, field: &str) -> Result<GpuBuf<T>> {
        check_extent::<T>(ptr, len, field)?;
        // SAFETY: forwarded from the caller.
        Ok(unsafe { GpuBuf::borrowed(ptr.cast_mut(), len) })
    }
}

#[cfg(feature = "emulator")]
impl CStore for EmuStore {
    unsafe fn borrow<T: Elem>(ptr: *const c_void, len: usize, field: &str) -> Result<EmuBuf<T>> {
        check_extent::<T>(ptr, len, field)?;
        if len > 0 && !ptr.cast::<T>().is_aligned() {
            return Err(Error::invalid(field, format!("{ptr:p} is not aligned for its elements")));
        }
        // SAFETY: forwarded from the caller (host memory, valid and unaliased while in use).
        unsafe { EmuBuf::borrowed(ptr.cast_mut().cast(), len) }
    }
}

/// Whether this library carries GPU kernels (built with nvcc): writes 1 or 0 to `*out`. Without
/// them `headwise_gpu_create` returns `HEADWISE_ERROR_NO_KERNELS`; the emulator needs none.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_gpu_kernels_built(out: *mut i32) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        #[cfg(feature = "cuda")]
        let built = crate::kernels::FATBINS.iter().all(Option::is_some);
        #[cfg(not(feature = "cuda"))]
        let built = false;
        *unsafe { out_value(out, "out") }? = i32::from(built);
        Ok(())
    })
}

/// A store on CUDA device `device` (its primary context, the one the CUDA runtime uses) for
/// kernels enqueued on `stream`, a `CUstream`/`cudaStream_t` of that context that the engine
/// owns (NULL is the legacy default stream). Caches over it take device pointers. GPU kernel
/// modules load once per handle, on first use.
///
/// Errors: `HEADWISE_ERROR_FEATURE_OFF` (built without the `cuda` feature),
/// `HEADWISE_ERROR_NO_KERNELS` (built without nvcc), `HEADWISE_ERROR_NO_GPU` (no driver,
/// no such device), `HEADWISE_ERROR_INVALID_ARGUMENT` (negative device, a stream of another
/// context), `HEADWISE_ERROR_DRIVER`.
///
/// Lifetime: the stream must outlive the handle and every cache and ring made from it
/// (headwise frees its own small allocations on that stream when they are freed).
///
/// # Safety
/// `stream` must be NULL or a live stream handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_gpu_create(
    device: c_int,
    stream: *mut c_void,
    out: *mut *mut HeadwiseStore,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { out_handle(out) }?;
        let ordinal =
            usize::try_from(device).map_err(|_| Error::invalid("device", format!("{device} is negative")))?;
        #[cfg(feature = "cuda")]
        {
            // SAFETY: forwarded.
            *out = unsafe { gpu_store(ordinal, stream) }?;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ordinal, stream, out);
            Err(Error::FeatureOff { feature: "cuda" })
        }
    })
}

/// The body of `headwise_gpu_create` once `out` is checked.
///
/// # Safety
/// As `headwise_gpu_create` for `stream`.
#[cfg(feature = "cuda")]
unsafe fn gpu_store(ordinal: usize, stream: *mut c_void) -> Result<*mut HeadwiseStore> {
    // SAFETY: only probes whether the driver library loads.
    let _keep = unsafe { cudarc::driver::sys::is_culib_present() }.then(KeepCurrentContext::new);
    // SAFETY: the caller vouches for the stream; its context is checked below before any
    // kernel is enqueued on it.
    let store = unsafe { GpuStore::from_engine_stream(ordinal, stream.cast()) }?;
    // The NULL, legacy (1) and per-thread (2) handles name the current context's default
    // streams, which from_engine_stream just made the primary context: nothing to check.
    if stream.addr() > 2 {
        let mut ctx: CUcontext = null_mut();
        // SAFETY: a stream handle the caller vouches for; ctx is a valid out-pointer.
        unsafe { cudarc::driver::sys::cuStreamGetCtx(stream.cast(), &mut ctx) }.result()?;
        if ctx != store.context().cu_ctx() {
            return Err(Error::invalid(
                "stream",
                format!("belongs to another CUDA context than device {ordinal}'s primary context"),
            ));
        }
    }
    Ok(Box::into_raw(Box::new(HeadwiseStore { backend: Backend::Gpu(store) })))
}

/// A store on the CPU SIMT emulator: caches and rings over it take host memory (16-byte
/// aligned, as device memory would be) and every operation runs the same CUDA kernels on the
/// CPU, synchronously (a call returns when its kernels have run), with kernel bugs the emulator
/// detects reported as `HEADWISE_ERROR_EMULATOR`. For machines without a GPU: tests, CI, and
/// checking an integration before it meets a device. One kernel runs at a time per process.
/// `HEADWISE_ERROR_FEATURE_OFF` when built without the `emulator` feature.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_emulator_create(out: *mut *mut HeadwiseStore) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { out_handle(out) }?;
        #[cfg(feature = "emulator")]
        {
            *out = Box::into_raw(Box::new(HeadwiseStore { backend: Backend::Emulator(EmuStore) }));
            Ok(())
        }
        #[cfg(not(feature = "emulator"))]
        {
            let _ = out;
            Err(Error::FeatureOff { feature: "emulator" })
        }
    })
}

/// Waits until everything enqueued on the store has finished: `cuStreamSynchronize` of the GPU
/// handle's stream; nothing for the emulator, whose calls are synchronous.
///
/// # Safety
/// `store` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_store_synchronize(store: *const HeadwiseStore) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let store = unsafe { handle(store, "store") }?;
        match &store.backend {
            #[cfg(feature = "cuda")]
            Backend::Gpu(gpu) => {
                let _keep = KeepCurrentContext::new();
                gpu.synchronize()
            }
            #[cfg(feature = "emulator")]
            Backend::Emulator(_) => Ok(()),
        }
    })
}

/// Frees a store handle (caches and rings made from it stay valid: they share the device). NULL
/// is ignored.
///
/// # Safety
/// `store` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_store_free(store: *mut HeadwiseStore) -> c_int {
    boundary(|| {
        if !store.is_null() {
            // SAFETY: the caller's promise (a live handle).
            let _keep = unsafe { &(*store).backend }.is_gpu().then(KeepCurrentContext::new);
            // SAFETY: the caller's promise.
            unsafe { free_handle(store) };
        }
        Ok(())
    })
}

/// [`CStore::borrow`] with the store named by a value, for code generic through a macro
/// (`with_cache!`) where the store's type has no name.
///
/// # Safety
/// As [`CStore::borrow`].
pub(super) unsafe fn borrow_in<S: CStore, T: Elem>(
    _: &S,
    ptr: *const c_void,
    len: usize,
    field: &str,
) -> Result<S::Buf<T>> {
    // SAFETY: forwarded.
    unsafe { S::borrow(ptr, len, field) }
}
