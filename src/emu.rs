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
/// cudaMalloc allocation, zero-initialised; or, from [`EmuBuf::borrowed`], a caller's memory
/// (the C ABI's emulator handle), as `GpuBuf::borrowed` wraps an engine's device memory.
pub struct EmuBuf<T: Elem> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes between the allocation's start and `ptr` (see [`EmuBuf::zeros`]); `None` when the
    /// memory is borrowed and not ours to free.
    pad: Option<usize>,
}

// SAFETY: EmuBuf owns its allocation exclusively, like Vec<T> (a borrowed one by the contract of
// `borrowed`); T is plain data.
unsafe impl<T: Elem> Send for EmuBuf<T> {}
// SAFETY: shared references only give out &[T].
unsafe impl<T: Elem> Sync for EmuBuf<T> {}

impl<T: Elem> EmuBuf<T> {
    /// The allocation behind `len` elements: `ALIGN` bytes more than they need, at the system
    /// allocator's natural alignment. Asking the allocator for 256-byte alignment instead would
    /// make `alloc_zeroed` memset the whole buffer (aligned allocation has no calloc); at
    /// natural alignment it is calloc, which for large buffers maps fresh zero pages lazily, as
    /// a GPU allocation costs nothing until used. tests/index_width.rs relies on this to place
    /// segments at the far end of a 17 GB cache while touching only the rows it uses.
    fn layout(len: usize) -> Result<Layout> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .and_then(|b| b.checked_add(ALIGN))
            .ok_or_else(|| Error::invalid("len", format!("{len} elements overflow usize bytes")))?;
        Layout::from_size_align(bytes, 16).map_err(|e| Error::invalid("len", e.to_string()))
    }

    /// `len` zeros, 256-byte aligned.
    pub fn zeros(len: usize) -> Result<EmuBuf<T>> {
        let layout = Self::layout(len)?;
        // SAFETY: layout has nonzero size (at least ALIGN bytes).
        let raw = unsafe { alloc_zeroed(layout) };
        if raw.is_null() {
            return Err(Error::invalid("len", format!("cannot allocate {len} elements")));
        }
        let pad = raw.align_offset(ALIGN);
        // SAFETY: pad < ALIGN, and the allocation has ALIGN spare bytes, so ptr and its len
        // elements lie inside it; all-zero bytes are a valid T (ValidAsZeroBits).
        let ptr = NonNull::new(unsafe { raw.add(pad) } as *mut T).expect("inside a non-null allocation");
        Ok(EmuBuf { ptr, len, pad: Some(pad) })
    }

    /// `len` elements of the caller's memory at `ptr`, never freed by headwise. A NULL `ptr` is
    /// accepted for `len == 0` only (the buffer is then empty). Kernels check the 16-byte
    /// alignment they need when they take the buffer's address, as on the GPU.
    ///
    /// # Safety
    /// A non-NULL `ptr` must be valid for reads and writes of `len` initialised elements, not
    /// accessed through anything else while the result is in use, and outlive it.
    pub unsafe fn borrowed(ptr: *mut T, len: usize) -> Result<EmuBuf<T>> {
        match NonNull::new(ptr) {
            Some(ptr) => Ok(EmuBuf { ptr, len, pad: None }),
            // An aligned, never dereferenced address, so an empty buffer passes the kernels'
            // alignment checks as a NULL device pointer does on the GPU.
            None if len == 0 => Ok(EmuBuf {
                ptr: NonNull::new(std::ptr::without_provenance_mut(ALIGN)).expect("nonzero"),
                len: 0,
                pad: None,
            }),
            None => Err(Error::invalid("ptr", format!("NULL where {len} elements are needed"))),
        }
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
        if let Some(pad) = self.pad {
            // SAFETY: allocated in zeros() at ptr - pad with the same layout (which succeeded
            // then).
            unsafe { dealloc((self.ptr.as_ptr() as *mut u8).sub(pad), Self::layout(self.len).unwrap()) }
        }
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

/// One emulator launch's memory traffic (see `cuda/simt/traffic.h` for the model): global
/// bytes requested through the counted helpers, the 32-byte sectors the warp-wide accesses
/// touch, and shared-memory wavefronts against the conflict-free ideal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchTraffic {
    /// Kernel name (`hw_...`).
    pub kernel: String,
    /// Global bytes read.
    pub read_bytes: u64,
    /// Global bytes written.
    pub write_bytes: u64,
    /// Warp-wide global accesses (reads and writes).
    pub requests: u64,
    /// Distinct 32-byte sectors summed over the warp-wide global accesses.
    pub sectors: u64,
    /// Shared-memory bytes accessed (loads and stores).
    pub smem_bytes: u64,
    /// Warp-wide shared-memory accesses.
    pub smem_requests: u64,
    /// Shared-memory wavefronts (bank-conflict replays included).
    pub smem_wavefronts: u64,
    /// Wavefronts the same accesses would take without bank conflicts.
    pub smem_ideal_wavefronts: u64,
    /// Global bytes read inside the watched ranges ([`EmuStore::traffic_watch`]).
    pub watched_read_bytes: u64,
    /// Distinct watched bytes read at least once.
    pub watched_unique_bytes: u64,
    /// Warp-wide reads whose first lane falls in a watched range.
    pub watched_requests: u64,
    /// Sectors of those reads.
    pub watched_sectors: u64,
}

impl LaunchTraffic {
    /// Bytes requested / (sectors * 32): 1.0 when every touched sector is fully used.
    pub fn sector_efficiency(&self) -> f64 {
        ratio(self.read_bytes + self.write_bytes, self.sectors * 32)
    }
    /// Sector efficiency of the watched reads alone.
    pub fn watched_sector_efficiency(&self) -> f64 {
        ratio(self.watched_read_bytes, self.watched_sectors * 32)
    }
    /// Shared-memory wavefronts / ideal wavefronts: 1.0 without bank conflicts.
    pub fn smem_conflict(&self) -> f64 {
        if self.smem_ideal_wavefronts == 0 {
            1.0
        } else {
            ratio(self.smem_wavefronts, self.smem_ideal_wavefronts)
        }
    }
    /// The sum of several launches' counts (kernel: the first one's).
    pub fn sum(records: &[LaunchTraffic]) -> LaunchTraffic {
        let mut t = LaunchTraffic {
            kernel: records.first().map_or(String::new(), |r| r.kernel.clone()),
            ..Default::default()
        };
        for r in records {
            t.read_bytes += r.read_bytes;
            t.write_bytes += r.write_bytes;
            t.requests += r.requests;
            t.sectors += r.sectors;
            t.smem_bytes += r.smem_bytes;
            t.smem_requests += r.smem_requests;
            t.smem_wavefronts += r.smem_wavefronts;
            t.smem_ideal_wavefronts += r.smem_ideal_wavefronts;
            t.watched_read_bytes += r.watched_read_bytes;
            t.watched_unique_bytes += r.watched_unique_bytes;
            t.watched_requests += r.watched_requests;
            t.watched_sectors += r.watched_sectors;
        }
        t
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// `HwTrafficRecord` in `cuda/simt/traffic.h`.
#[repr(C)]
#[derive(Clone, Copy)]
struct HwTrafficRecord {
    kernel: *const core::ffi::c_char,
    v: [u64; 12],
}

unsafe extern "C" {
    fn hw_emu_traffic_enable(on: i32);
    fn hw_emu_traffic_take(out: *mut HwTrafficRecord, cap: usize) -> usize;
    fn hw_emu_traffic_watch(addr: *const core::ffi::c_void, len: u64);
    fn hw_emu_traffic_unwatch_all();
}

/// Memory-traffic counting (off by default; `HEADWISE_EMU_TRAFFIC=1` turns it on for every
/// thread that has not chosen). State is per OS thread: the launches this thread makes.
impl EmuStore {
    /// Counts (`Some(true)`) or does not count (`Some(false)`) this thread's launches; `None`
    /// follows `HEADWISE_EMU_TRAFFIC` again.
    pub fn traffic_enable(&self, on: Option<bool>) {
        // SAFETY: sets a thread-local flag.
        unsafe { hw_emu_traffic_enable(on.map_or(-1, i32::from)) }
    }

    /// The counts of this thread's counted launches since the last call, oldest first.
    pub fn take_traffic(&self) -> Vec<LaunchTraffic> {
        // SAFETY: cap 0 only returns the count.
        let n = unsafe { hw_emu_traffic_take(std::ptr::null_mut(), 0) };
        let mut raw = vec![HwTrafficRecord { kernel: std::ptr::null(), v: [0; 12] }; n];
        // SAFETY: raw holds n records; the thread's record list cannot grow in between.
        unsafe { hw_emu_traffic_take(raw.as_mut_ptr(), n) };
        raw.iter()
            .take(n)
            .map(|r| {
                let kernel = if r.kernel.is_null() {
                    String::new()
                } else {
                    // SAFETY: the emulator's kernel names are NUL-terminated string literals.
                    unsafe { CStr::from_ptr(r.kernel) }.to_string_lossy().into_owned()
                };
                let v = r.v;
                LaunchTraffic {
                    kernel,
                    read_bytes: v[0],
                    write_bytes: v[1],
                    requests: v[2],
                    sectors: v[3],
                    smem_bytes: v[4],
                    smem_requests: v[5],
                    smem_wavefronts: v[6],
                    smem_ideal_wavefronts: v[7],
                    watched_read_bytes: v[8],
                    watched_unique_bytes: v[9],
                    watched_requests: v[10],
                    watched_sectors: v[11],
                }
            })
            .collect()
    }

    /// Also sums this thread's counted reads that fall in `buf` (the `watched_*` fields).
    pub fn traffic_watch<T: Elem>(&self, buf: &EmuBuf<T>) {
        // SAFETY: records an address range; nothing is dereferenced.
        unsafe { hw_emu_traffic_watch(buf.ptr.as_ptr().cast(), (buf.len * size_of::<T>()) as u64) }
    }

    /// Forgets every watched range of this thread.
    pub fn traffic_unwatch_all(&self) {
        // SAFETY: clears a thread-local list.
        unsafe { hw_emu_traffic_unwatch_all() }
    }
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
