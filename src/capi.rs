//! The C ABI (feature `capi`): `extern "C"` functions over raw pointers and a CUDA stream, for
//! engines written in C or C++. The header `include/headwise.h` is generated from this file by
//! cbindgen (`tests/cbindgen_fresh.rs` keeps it current); the README section "Linking from an
//! engine (C ABI)" is the user's guide. The rules every function follows:
//!
//! - **Status codes.** Every function returns an `int`: [`HEADWISE_OK`] (0) or one code per
//!   [`Error`] variant, plus [`HEADWISE_ERROR_PANIC`] for a bug caught at the boundary. No panic
//!   unwinds into C: every body runs under `catch_unwind` (so the library must be built with
//!   `panic = "unwind"`, Cargo's default).
//! - **Last error.** Every function except the three getters (`headwise_last_error_code`,
//!   `headwise_last_error_message`, `headwise_status_name`) replaces the calling thread's last
//!   error: empty after success, the `Error`'s message after a failure.
//! - **Arguments.** NULL pointers, misaligned pointers, unknown enum values, sizes that disagree
//!   with a handle's shape and arithmetic overflow are reported as
//!   [`HEADWISE_ERROR_INVALID_ARGUMENT`], never undefined behaviour. What cannot be checked
//!   (that a non-NULL pointer really points to enough live memory, that a handle is live) is the
//!   caller's promise, as in any C library.
//! - **Handles** are opaque, created by `*_create`/`*_parse` functions and released by the
//!   matching `*_free` (NULL is accepted and ignored). A failed creation stores NULL in `*out`.
//!   Handles are not synchronized: one thread at a time per handle, and per GPU handle together
//!   with the caches and rings made from it.
//! - **GPU calls** enqueue on the engine's stream given to `headwise_gpu_create` and return
//!   without waiting (see the function docs for the exceptions); they leave the calling thread's
//!   current CUDA context as they found it.

use crate::attention::{AttentionOptions, AttentionWorkspace};
use crate::cache::LayerCache;
use crate::dtype::{DType, KvElem, check_head_dim};
use crate::error::{Error, Result};
use crate::gpu::{GpuBuf, GpuStore};
use crate::layout::{LayerLayout, LayoutBuilder, MAX_ROWS, Segment, SegmentMode};
use crate::policy::budget::{self, HeadKvOptions, HeadKvVariant};
use crate::policy::head_scores::HeadScores;
use crate::policy::heads::{HeadGates, duo_attention_config};
use crate::redundancy::{self, QueryRing, RkvOptions, RkvTrigger, RkvWorkspace};
use crate::select::{self, Budgets, GqaReduce, Granularity, Pool, Prompt, SelectOptions, SelectWorkspace};
use crate::store::{Elem, Store};
use cudarc::driver::sys::CUcontext;
use half::{bf16, f16};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::null_mut;

/// Success.
pub const HEADWISE_OK: c_int = 0;
/// An argument is NULL, misaligned, out of range or inconsistent (the message names it). Nothing
/// was launched.
pub const HEADWISE_ERROR_INVALID_ARGUMENT: c_int = 1;
/// A `Full` segment has no free row: compress it, or relayout into larger buffers. Nothing was
/// launched.
pub const HEADWISE_ERROR_SEGMENT_FULL: c_int = 2;
/// No usable CUDA driver or device (or the device ordinal does not exist).
pub const HEADWISE_ERROR_NO_GPU: c_int = 3;
/// The library was built without nvcc, so it carries no GPU kernels.
pub const HEADWISE_ERROR_NO_KERNELS: c_int = 4;
/// The CUDA driver reported an error; work already enqueued may have run.
pub const HEADWISE_ERROR_DRIVER: c_int = 5;
/// The CPU SIMT emulator reported a kernel bug (not reachable through this ABI today; reserved
/// so the codes stay stable).
pub const HEADWISE_ERROR_EMULATOR: c_int = 6;
/// A bug in headwise was caught at the boundary (a Rust panic). The handles the call touched
/// may be inconsistent: free them.
pub const HEADWISE_ERROR_PANIC: c_int = 7;
/// A compaction broke one of its guarantees, found by the opt-in invariant checks
/// (`HEADWISE_CHECK_INVARIANTS=1`): a bug in headwise; the cache's contents are suspect.
pub const HEADWISE_ERROR_INVARIANT: c_int = 8;

/// Element type `__half` (IEEE binary16).
pub const HEADWISE_DTYPE_F16: c_int = 0;
/// Element type `__nv_bfloat16`.
pub const HEADWISE_DTYPE_BF16: c_int = 1;

/// Segment mode: tokens in position order, appending to a full segment fails. The same value
/// the device table's mode array holds.
pub const HEADWISE_MODE_FULL: i32 = 0;
/// Segment mode: `sink` first tokens plus a ring of the `window` newest (never full).
pub const HEADWISE_MODE_STREAMING: i32 = 1;
/// Arrays in a device table (offset, capacity, len, sink, ring_head, mode), each
/// `num_segments` int32 entries.
pub const HEADWISE_DEVICE_TABLE_FIELDS: usize = 6;

/// Prefill pooling: max-pool (SnapKV's default).
pub const HEADWISE_POOL_MAX: c_int = 0;
/// Prefill pooling: average-pool, zero padding counted.
pub const HEADWISE_POOL_AVG: c_int = 1;
/// GQA reduction over a group's query heads: mean.
pub const HEADWISE_GQA_MEAN: c_int = 0;
/// GQA reduction over a group's query heads: max.
pub const HEADWISE_GQA_MAX: c_int = 1;
/// One selection per KV head (real memory savings).
pub const HEADWISE_GRANULARITY_KV_HEAD: c_int = 0;
/// One selection per query head, each with its own K/V copy (the papers' G-fold storage).
pub const HEADWISE_GRANULARITY_QUERY_HEAD: c_int = 1;
/// HeadKV allocation as in the HeadKV repository (`B = base - window`, `temp` applied).
pub const HEADWISE_HEADKV_REPO: c_int = 0;
/// HeadKV allocation as in the KVCache-Factory port (`B = base`, no `temp`).
pub const HEADWISE_HEADKV_KVCACHE_FACTORY: c_int = 1;
/// PyramidKV's default `beta`.
pub const HEADWISE_PYRAMID_BETA_DEFAULT: u32 = 20;
/// HeadKV's default `beta`.
pub const HEADWISE_HEADKV_BETA_DEFAULT: f32 = 1.5;
/// HeadKV's default `temp`.
pub const HEADWISE_HEADKV_TEMP_DEFAULT: f32 = 1.0;
/// RLKV's streaming heads: sink tokens.
pub const HEADWISE_RLKV_SINK: u32 = 16;
/// RLKV's streaming heads: recent-token window.
pub const HEADWISE_RLKV_WINDOW: u32 = 64;

// The device table's mode values come from cuda/params.h; the C names must not drift from them.
const _: () = assert!(HEADWISE_MODE_FULL as u32 == crate::params::HW_MODE_FULL);
const _: () = assert!(HEADWISE_MODE_STREAMING as u32 == crate::params::HW_MODE_STREAMING);
const _: () = assert!(HEADWISE_DEVICE_TABLE_FIELDS == crate::layout::DeviceTable::FIELDS);

// ---------------------------------------------------------------------------------------------
// Status, last error, the boundary

thread_local! {
    static LAST_ERROR: RefCell<(c_int, String)> = const { RefCell::new((HEADWISE_OK, String::new())) };
}

fn status_of(e: &Error) -> c_int {
    // Exhaustive on purpose: a new Error variant must get its own code here.
    match e {
        Error::Invalid { .. } => HEADWISE_ERROR_INVALID_ARGUMENT,
        Error::SegmentFull { .. } => HEADWISE_ERROR_SEGMENT_FULL,
        Error::NoGpu(_) => HEADWISE_ERROR_NO_GPU,
        Error::NoKernels => HEADWISE_ERROR_NO_KERNELS,
        Error::Driver(_) => HEADWISE_ERROR_DRIVER,
        Error::Emulator { .. } => HEADWISE_ERROR_EMULATOR,
        Error::Invariant { .. } => HEADWISE_ERROR_INVARIANT,
    }
}

fn set_last_error(code: c_int, message: String) {
    // try_with: during thread teardown the slot may be gone; losing the message then is fine.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = (code, message));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into());
    format!("internal error (a headwise bug, please report it): {what}")
}

/// The boundary every exported function goes through: runs `body`, records the thread's last
/// error and turns the outcome, or a panic, into a status code.
fn boundary(body: impl FnOnce() -> Result<()>) -> c_int {
    let (code, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (HEADWISE_OK, String::new()),
        Ok(Err(e)) => (status_of(&e), e.to_string()),
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            // A payload whose destructor panics would unwind out of here; forget it instead.
            std::mem::forget(payload);
            (HEADWISE_ERROR_PANIC, message)
        }
    };
    set_last_error(code, message);
    code
}

/// The status code of the calling thread's most recent failed call, or `HEADWISE_OK` (0) when
/// its most recent call succeeded. Does not change the last error.
#[unsafe(no_mangle)]
pub extern "C" fn headwise_last_error_code() -> c_int {
    catch_unwind(|| LAST_ERROR.try_with(|slot| slot.borrow().0).unwrap_or(HEADWISE_OK))
        .unwrap_or(HEADWISE_ERROR_PANIC)
}

/// Copies the calling thread's last error message (UTF-8, empty after a successful call) into
/// `buf` and returns its full length in bytes, without the terminating NUL, like `snprintf`:
/// at most `len - 1` bytes are written (cut at a character boundary), always NUL-terminated
/// when `len > 0`. A return value `>= len` means the message was truncated; call again with a
/// buffer of `return + 1` bytes. `buf` may be NULL when `len` is 0 (to ask for the length).
/// Does not change the last error.
///
/// # Safety
/// `buf` must be NULL or point to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_last_error_message(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        LAST_ERROR
            .try_with(|slot| {
                let slot = slot.borrow();
                let message = slot.1.as_str();
                if len > 0 && !buf.is_null() {
                    let mut n = message.len().min(len - 1);
                    while !message.is_char_boundary(n) {
                        n -= 1;
                    }
                    // SAFETY: the caller promised `len` writable bytes at `buf`; n < len bytes
                    // plus the NUL fit, and a String never overlaps caller memory.
                    unsafe {
                        std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
                        *buf.add(n) = 0;
                    }
                }
                message.len()
            })
            .unwrap_or(0)
    }))
    .unwrap_or(0)
}

/// The name of a status code (`"HEADWISE_ERROR_SEGMENT_FULL"`, ...), or `"HEADWISE_UNKNOWN"`.
/// The string is static: never free it. Does not change the last error.
#[unsafe(no_mangle)]
pub extern "C" fn headwise_status_name(code: c_int) -> *const c_char {
    let name: &'static std::ffi::CStr = match code {
        HEADWISE_OK => c"HEADWISE_OK",
        HEADWISE_ERROR_INVALID_ARGUMENT => c"HEADWISE_ERROR_INVALID_ARGUMENT",
        HEADWISE_ERROR_SEGMENT_FULL => c"HEADWISE_ERROR_SEGMENT_FULL",
        HEADWISE_ERROR_NO_GPU => c"HEADWISE_ERROR_NO_GPU",
        HEADWISE_ERROR_NO_KERNELS => c"HEADWISE_ERROR_NO_KERNELS",
        HEADWISE_ERROR_DRIVER => c"HEADWISE_ERROR_DRIVER",
        HEADWISE_ERROR_EMULATOR => c"HEADWISE_ERROR_EMULATOR",
        HEADWISE_ERROR_PANIC => c"HEADWISE_ERROR_PANIC",
        HEADWISE_ERROR_INVARIANT => c"HEADWISE_ERROR_INVARIANT",
        _ => c"HEADWISE_UNKNOWN",
    };
    name.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// Checked views of caller memory. Each checks what can be checked (NULL, alignment, size
// overflow) and leaves the rest to the caller's promise, which every `# Safety` section states.

/// `len` elements at `ptr`; NULL is accepted only for `len == 0`.
///
/// # Safety
/// A non-NULL `ptr` must be valid for reads of `len` elements for `'a`.
unsafe fn input<'a, T>(ptr: *const T, len: usize, field: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_ptr(ptr, len, field)?;
    // SAFETY: non-NULL, aligned, size fits isize (checked), and valid per the caller.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A nullable input array: `None` for NULL.
///
/// # Safety
/// As [`input`].
unsafe fn optional_input<'a, T>(ptr: *const T, len: usize, field: &str) -> Result<Option<&'a [T]>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded.
        unsafe { input(ptr, len, field) }.map(Some)
    }
}

/// A nullable output array: `None` for NULL (the twin of [`optional_input`]).
///
/// # Safety
/// As [`output`] when `ptr` is not NULL.
unsafe fn optional_output<'a, T>(ptr: *mut T, len: usize, field: &str) -> Result<Option<&'a mut [T]>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded.
        unsafe { output(ptr, len, field) }.map(Some)
    }
}

/// `len` writable elements at `ptr`; NULL is accepted only for `len == 0`.
///
/// # Safety
/// A non-NULL `ptr` must be valid for writes of `len` elements for `'a`, not aliased.
unsafe fn output<'a, T>(ptr: *mut T, len: usize, field: &str) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_ptr(ptr, len, field)?;
    // SAFETY: non-NULL, aligned, size fits isize (checked), and valid per the caller.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

fn check_ptr<T>(ptr: *const T, len: usize, field: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::invalid(field, format!("NULL where {len} elements are needed")));
    }
    if !ptr.is_aligned() {
        return Err(Error::invalid(
            field,
            format!("address {ptr:p} is not aligned to {} bytes", align_of::<T>()),
        ));
    }
    if len.checked_mul(size_of::<T>()).is_none_or(|bytes| bytes > isize::MAX as usize) {
        return Err(Error::invalid(field, format!("{len} elements overflow the address space")));
    }
    Ok(())
}

/// One writable value (an out-parameter).
///
/// # Safety
/// A non-NULL `ptr` must be valid for writes of one `T` for `'a`.
unsafe fn out_value<'a, T>(ptr: *mut T, field: &str) -> Result<&'a mut T> {
    check_ptr(ptr, 1, field)?;
    // SAFETY: non-NULL and aligned (checked), writable per the caller.
    Ok(unsafe { &mut *ptr })
}

/// Writes `value` through a nullable out-pointer (NULL: the caller does not want it).
///
/// # Safety
/// As [`out_value`] when `ptr` is not NULL.
unsafe fn write_optional<T>(ptr: *mut T, field: &str, value: T) -> Result<()> {
    if !ptr.is_null() {
        // SAFETY: forwarded.
        *unsafe { out_value(ptr, field) }? = value;
    }
    Ok(())
}

/// An out-parameter for a new handle, set to NULL right away so a failure leaves NULL there.
///
/// # Safety
/// As [`out_value`].
unsafe fn out_handle<'a, T>(ptr: *mut *mut T) -> Result<&'a mut *mut T> {
    // SAFETY: forwarded.
    let slot = unsafe { out_value(ptr, "out") }?;
    *slot = null_mut();
    Ok(slot)
}

/// A struct the caller passed by pointer.
///
/// # Safety
/// A non-NULL `ptr` must be valid for reads of one `T` for `'a`.
unsafe fn input_struct<'a, T>(ptr: *const T, field: &str) -> Result<&'a T> {
    check_ptr(ptr, 1, field)?;
    // SAFETY: non-NULL and aligned (checked), readable per the caller.
    Ok(unsafe { &*ptr })
}

/// A handle the caller passed in.
///
/// # Safety
/// A non-NULL `ptr` must be a live handle of this type, not used by another thread meanwhile.
unsafe fn handle<'a, T>(ptr: *const T, field: &str) -> Result<&'a T> {
    if ptr.is_null() {
        return Err(Error::invalid(field, "NULL handle"));
    }
    // SAFETY: a live handle per the caller (created by Box::into_raw below, so aligned).
    Ok(unsafe { &*ptr })
}

/// A handle the caller passed in, mutably.
///
/// # Safety
/// As [`handle`], and no other reference to it exists during the call.
unsafe fn handle_mut<'a, T>(ptr: *mut T, field: &str) -> Result<&'a mut T> {
    if ptr.is_null() {
        return Err(Error::invalid(field, "NULL handle"));
    }
    // SAFETY: as in `handle`; exclusive per the caller.
    Ok(unsafe { &mut *ptr })
}

/// Releases a handle made by [`Box::into_raw`]; NULL is ignored.
///
/// # Safety
/// `ptr` must be NULL or a live handle of this type that is not used afterwards.
unsafe fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: made by Box::into_raw in this module, released once per the caller.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// `len` bytes of UTF-8 text at `ptr` (no NUL terminator needed).
///
/// # Safety
/// As [`input`].
unsafe fn utf8<'a>(ptr: *const c_char, len: usize, field: &str) -> Result<&'a str> {
    // SAFETY: forwarded; c_char and u8 have the same layout.
    let bytes = unsafe { input(ptr.cast::<u8>(), len, field) }?;
    std::str::from_utf8(bytes).map_err(|e| Error::invalid(field, format!("not UTF-8: {e}")))
}

fn dtype_of(code: c_int) -> Result<DType> {
    match code {
        HEADWISE_DTYPE_F16 => Ok(DType::F16),
        HEADWISE_DTYPE_BF16 => Ok(DType::BF16),
        _ => Err(Error::invalid("dtype", format!("{code} is neither HEADWISE_DTYPE_F16 nor _BF16"))),
    }
}

fn product(field: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| Error::invalid(field, format!("the element count {factors:?} overflows size_t")))
}

// ---------------------------------------------------------------------------------------------
// Layouts

/// A validated segment table of one layer (host memory only). Create with
/// `headwise_layout_create` or `headwise_layout_pack`, free with `headwise_layout_free`.
pub struct HeadwiseLayout {
    layout: LayerLayout,
}

fn new_layout(out: &mut *mut HeadwiseLayout, layout: LayerLayout) {
    *out = Box::into_raw(Box::new(HeadwiseLayout { layout }));
}

/// Validates a segment table given as parallel arrays and returns it as a layout handle.
///
/// Segment `s = b * kv_heads + h` belongs to sequence `b`, KV head `h`; `num_segments` must be
/// `batch * kv_heads`. All counts are rows of the layer's K (and V) buffer, which holds
/// `total_rows` rows of `head_dim` elements. Per segment: `offset` (first row), `capacity` (rows
/// reserved), `len` (rows in use), `ring_head` (Streaming only: ring slot of the oldest windowed
/// token once the ring is full, else 0; the array may be NULL for all zeros), `mode`
/// (`HEADWISE_MODE_FULL` or `HEADWISE_MODE_STREAMING`), `sink` and `window` (Streaming only,
/// `capacity == sink + window`; ignored for Full segments; both arrays may be NULL when no
/// segment is Streaming).
///
/// Errors (`HEADWISE_ERROR_INVALID_ARGUMENT`, the message names the first bad field): NULL
/// arrays, an unknown mode, a wrong segment count, `total_rows` above `INT32_MAX`, a segment past
/// the buffer end, overlapping segments, `len > capacity`, a Streaming segment with `window == 0`
/// or `capacity != sink + window`, a bad `ring_head`.
///
/// # Safety
/// Each non-NULL array must hold `num_segments` readable elements; `out` must be NULL or
/// writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_layout_create(
    batch: usize,
    kv_heads: usize,
    total_rows: u64,
    num_segments: usize,
    offset: *const u32,
    capacity: *const u32,
    len: *const u32,
    ring_head: *const u32,
    mode: *const i32,
    sink: *const u32,
    window: *const u32,
    out: *mut *mut HeadwiseLayout,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on `out` and on every array's length.
        let out = unsafe { out_handle(out) }?;
        if num_segments as u64 > MAX_ROWS {
            return Err(Error::invalid("num_segments", format!("{num_segments} exceeds {MAX_ROWS}")));
        }
        let offset = unsafe { input(offset, num_segments, "offset") }?;
        let capacity = unsafe { input(capacity, num_segments, "capacity") }?;
        let len = unsafe { input(len, num_segments, "len") }?;
        let mode = unsafe { input(mode, num_segments, "mode") }?;
        let ring_head = unsafe { optional_input(ring_head, num_segments, "ring_head") }?;
        let sink = unsafe { optional_input(sink, num_segments, "sink") }?;
        let window = unsafe { optional_input(window, num_segments, "window") }?;
        let mut segments = Vec::with_capacity(num_segments);
        for i in 0..num_segments {
            let mode = match mode[i] {
                HEADWISE_MODE_FULL => SegmentMode::Full,
                HEADWISE_MODE_STREAMING => match (sink, window) {
                    (Some(s), Some(w)) => SegmentMode::Streaming { sink: s[i], window: w[i] },
                    _ => {
                        return Err(Error::invalid(
                            if sink.is_none() { "sink" } else { "window" },
                            format!("NULL, but segment {i} is Streaming"),
                        ));
                    }
                },
                m => {
                    return Err(Error::invalid(
                        format!("mode[{i}]"),
                        format!("{m} is neither HEADWISE_MODE_FULL nor HEADWISE_MODE_STREAMING"),
                    ));
                }
            };
            segments.push(Segment {
                offset: offset[i],
                capacity: capacity[i],
                len: len[i],
                ring_head: ring_head.map_or(0, |r| r[i]),
                mode,
            });
        }
        new_layout(out, LayerLayout::new(batch, kv_heads, total_rows, segments)?);
        Ok(())
    })
}

/// Builds a packed layout: segments back to back in segment order (`s = b * kv_heads + h`).
/// `mode[s]` (NULL: all Full) picks the mode; a Full segment holds `len[s]` tokens (NULL: all 0)
/// and `len[s] + headroom` rows; a Streaming segment is empty (`len[s]` must be 0) with
/// `sink[s] + window[s]` rows (`sink`/`window` may be NULL when no segment is Streaming).
/// The result's `total_rows` is the sum of the capacities; K and V buffers of
/// `total_rows * head_dim` elements hold it.
///
/// # Safety
/// Each non-NULL array must hold `batch * kv_heads` readable elements; `out` must be NULL or
/// writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_layout_pack(
    batch: usize,
    kv_heads: usize,
    headroom: u32,
    mode: *const i32,
    len: *const u32,
    sink: *const u32,
    window: *const u32,
    out: *mut *mut HeadwiseLayout,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on `out` and on every array's length.
        let out = unsafe { out_handle(out) }?;
        let n = batch
            .checked_mul(kv_heads)
            .filter(|&n| n <= crate::layout::MAX_BUILDER_SEGMENTS)
            .ok_or_else(|| {
                Error::invalid(
                    "batch * kv_heads",
                    format!("exceeds {} segments", crate::layout::MAX_BUILDER_SEGMENTS),
                )
            })?;
        let mode = unsafe { optional_input(mode, n, "mode") }?;
        let len = unsafe { optional_input(len, n, "len") }?;
        let sink = unsafe { optional_input(sink, n, "sink") }?;
        let window = unsafe { optional_input(window, n, "window") }?;
        let mut builder = LayoutBuilder::new(batch, kv_heads).headroom(headroom);
        for s in 0..n {
            let (b, h) = (s / kv_heads, s % kv_heads);
            let len = len.map_or(0, |l| l[s]);
            builder = match mode.map_or(HEADWISE_MODE_FULL, |m| m[s]) {
                HEADWISE_MODE_FULL => builder.full(b, h, len),
                HEADWISE_MODE_STREAMING => {
                    if len != 0 {
                        return Err(Error::invalid(
                            format!("len[{s}]"),
                            format!("{len}: Streaming segments start empty (append fills them)"),
                        ));
                    }
                    let (Some(sink), Some(window)) = (sink, window) else {
                        return Err(Error::invalid(
                            if sink.is_none() { "sink" } else { "window" },
                            format!("NULL, but segment {s} is Streaming"),
                        ));
                    };
                    builder.streaming(b, h, sink[s], window[s])
                }
                m => {
                    return Err(Error::invalid(
                        format!("mode[{s}]"),
                        format!("{m} is neither HEADWISE_MODE_FULL nor HEADWISE_MODE_STREAMING"),
                    ));
                }
            };
        }
        new_layout(out, builder.build()?);
        Ok(())
    })
}

/// A copy of `layout` (free both).
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_clone(
    layout: *const HeadwiseLayout,
    out: *mut *mut HeadwiseLayout,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let layout = unsafe { handle(layout, "layout") }?;
        new_layout(out, layout.layout.clone());
        Ok(())
    })
}

/// Frees a layout. NULL is ignored.
///
/// # Safety
/// `layout` must be NULL or a live layout, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_free(layout: *mut HeadwiseLayout) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise.
        unsafe { free_handle(layout) };
        Ok(())
    })
}

/// Reads one `usize`-like property of a layout into `*out`.
///
/// # Safety
/// As the exported getters: `layout` NULL or live, `out` NULL or writable.
unsafe fn layout_get<V>(
    layout: *const HeadwiseLayout,
    out: *mut V,
    get: impl FnOnce(&LayerLayout) -> V,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_value(out, "out") }?;
        let layout = unsafe { handle(layout, "layout") }?;
        *out = get(&layout.layout);
        Ok(())
    })
}

/// Sequences in the layout.
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_batch(layout: *const HeadwiseLayout, out: *mut usize) -> c_int {
    // SAFETY: forwarded.
    unsafe { layout_get(layout, out, LayerLayout::batch) }
}

/// KV heads per sequence.
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_kv_heads(layout: *const HeadwiseLayout, out: *mut usize) -> c_int {
    // SAFETY: forwarded.
    unsafe { layout_get(layout, out, LayerLayout::kv_heads) }
}

/// Segments (`batch * kv_heads`).
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_num_segments(
    layout: *const HeadwiseLayout,
    out: *mut usize,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { layout_get(layout, out, |l| l.segments().len()) }
}

/// Rows in each of the K and V buffers (a buffer holds `total_rows * head_dim` elements).
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_total_rows(layout: *const HeadwiseLayout, out: *mut u64) -> c_int {
    // SAFETY: forwarded.
    unsafe { layout_get(layout, out, |l| l.total_rows() as u64) }
}

/// Rows in use over all segments (the sum of `len`).
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_rows_in_use(layout: *const HeadwiseLayout, out: *mut u64) -> c_int {
    // SAFETY: forwarded.
    unsafe { layout_get(layout, out, LayerLayout::rows_in_use) }
}

/// Copies the segment table into parallel arrays of `num_segments` entries each (the same
/// fields as `headwise_layout_create`; `sink` and `window` are 0 for Full segments). Any array
/// may be NULL to skip it. `num_segments` must equal the layout's count.
///
/// # Safety
/// `layout` must be NULL or a live layout; each non-NULL array must hold `num_segments`
/// writable elements.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_layout_segments(
    layout: *const HeadwiseLayout,
    num_segments: usize,
    offset: *mut u32,
    capacity: *mut u32,
    len: *mut u32,
    ring_head: *mut u32,
    mode: *mut i32,
    sink: *mut u32,
    window: *mut u32,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on the handle and on every array's length.
        let layout = unsafe { handle(layout, "layout") }?;
        let segs = layout.layout.segments();
        if num_segments != segs.len() {
            return Err(Error::invalid(
                "num_segments",
                format!("{num_segments}, the layout has {}", segs.len()),
            ));
        }
        let n = segs.len();
        // SAFETY: each array is NULL or `num_segments` writable elements, per the caller.
        let opt = |p: *mut u32, f: &str| unsafe { optional_output(p, n, f) };
        let (mut o, mut c, mut l, mut r) = (
            opt(offset, "offset")?,
            opt(capacity, "capacity")?,
            opt(len, "len")?,
            opt(ring_head, "ring_head")?,
        );
        let (mut sk, mut w) = (opt(sink, "sink")?, opt(window, "window")?);
        // SAFETY: as above.
        let mut m = unsafe { optional_output(mode, n, "mode") }?;
        for (i, s) in segs.iter().enumerate() {
            let (mode_code, sink_i, window_i) = match s.mode {
                SegmentMode::Full => (HEADWISE_MODE_FULL, 0, 0),
                SegmentMode::Streaming { sink, window } => (HEADWISE_MODE_STREAMING, sink, window),
            };
            let fields = [
                (&mut o, s.offset),
                (&mut c, s.capacity),
                (&mut l, s.len),
                (&mut r, s.ring_head),
                (&mut sk, sink_i),
                (&mut w, window_i),
            ];
            for (dst, value) in fields {
                if let Some(dst) = dst.as_deref_mut() {
                    dst[i] = value;
                }
            }
            if let Some(m) = m.as_deref_mut() {
                m[i] = mode_code;
            }
        }
        Ok(())
    })
}

/// Number of int32 entries in the layout's device table: `HEADWISE_DEVICE_TABLE_FIELDS *
/// num_segments`.
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_device_table_len(
    layout: *const HeadwiseLayout,
    out: *mut usize,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { layout_get(layout, out, |l| HEADWISE_DEVICE_TABLE_FIELDS * l.segments().len()) }
}

/// Writes the layout's device table, the int32 mirror the kernels read (`HwSegmentTable` in
/// `cuda/params.h`): six arrays of `num_segments` entries back to back, offset, capacity, len,
/// sink (0 for Full), ring_head, mode. `len` must equal `headwise_layout_device_table_len`. For
/// engines that address the ragged cache from their own kernels: upload it to device memory
/// (e.g. `cudaMemcpyAsync`) after every call that changes the layout. headwise keeps its own
/// device copy inside each cache handle; this one is never read by headwise.
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or `len` writable int32s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_device_table(
    layout: *const HeadwiseLayout,
    out: *mut i32,
    len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle and on `out`'s length.
        let layout = unsafe { handle(layout, "layout") }?;
        let table = layout.layout.device_table();
        if len != table.len() {
            return Err(Error::invalid(
                "len",
                format!("{len}, the device table has {} int32 entries", table.len()),
            ));
        }
        unsafe { output(out, len, "out") }?.copy_from_slice(&table);
        Ok(())
    })
}

/// `HEADWISE_OK` if one append fits every segment, else `HEADWISE_ERROR_SEGMENT_FULL` naming
/// the first Full segment that has no free row.
///
/// # Safety
/// `layout` must be NULL or a live layout.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_check_appendable(layout: *const HeadwiseLayout) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        unsafe { handle(layout, "layout") }?.layout.check_appendable()
    })
}

/// A packed copy of `layout` in which every Full segment has `len + headroom` rows (Streaming
/// segments keep their size; mode, len and ring state are kept): the target of
/// `headwise_cache_relayout_into` when a Full segment runs out of rows.
///
/// # Safety
/// `layout` must be NULL or a live layout; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_layout_regrown(
    layout: *const HeadwiseLayout,
    headroom: u32,
    out: *mut *mut HeadwiseLayout,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let layout = unsafe { handle(layout, "layout") }?;
        new_layout(out, layout.layout.regrown(headroom)?);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Policies

/// SnapKV: every head keeps `capacity` tokens (window included). Writes `capacity` to `*out`
/// after checking `capacity > window`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_budget_uniform(capacity: u32, window: u32, out: *mut u32) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { out_value(out, "out") }?;
        *out = budget::uniform(capacity, window)?;
        Ok(())
    })
}

/// PyramidKV per-layer budgets (tokens, window included) for a prompt of `prompt_len` tokens,
/// with the authors' integer arithmetic (`beta`: `HEADWISE_PYRAMID_BETA_DEFAULT` = 20). Writes
/// `layers` budgets to `out`; `out_len` must equal `layers`. Example: capacity 128, window 8,
/// 32 layers and a long prompt give 242, 235, ..., 25 (4016 prefix tokens in all).
///
/// # Safety
/// `out` must be NULL or hold `out_len` writable elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_budget_pyramid(
    capacity: u32,
    window: u32,
    layers: usize,
    prompt_len: u32,
    beta: u32,
    out: *mut u32,
    out_len: usize,
) -> c_int {
    boundary(|| {
        if out_len != layers {
            return Err(Error::invalid("out_len", format!("{out_len}, expected layers = {layers}")));
        }
        // SAFETY: the caller's promise on `out`'s length.
        let out = unsafe { output(out, out_len, "out") }?;
        out.copy_from_slice(&budget::pyramid(capacity, window, layers, prompt_len, beta)?);
        Ok(())
    })
}

/// HeadKV / HeadKV-R2 per-head budgets (tokens, window included) from `importance[num_heads]`
/// (one score per head over all layers, `[layer][head]`, e.g. from
/// `headwise_head_scores_importance`). `beta` (default 1.5) and `temp` (default 1.0) as in
/// HeadKV; `variant` is `HEADWISE_HEADKV_REPO` or `HEADWISE_HEADKV_KVCACHE_FACTORY`. Writes
/// `num_heads` budgets; `out_len` must equal `num_heads`.
///
/// # Safety
/// `importance` must be NULL or hold `num_heads` readable floats; `out` NULL or `out_len`
/// writable elements.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_budget_headkv(
    importance: *const f32,
    num_heads: usize,
    base_capacity: u32,
    window: u32,
    beta: f32,
    temp: f32,
    variant: c_int,
    out: *mut u32,
    out_len: usize,
) -> c_int {
    boundary(|| {
        let variant = match variant {
            HEADWISE_HEADKV_REPO => HeadKvVariant::HeadKvRepo,
            HEADWISE_HEADKV_KVCACHE_FACTORY => HeadKvVariant::KvCacheFactory,
            v => return Err(Error::invalid("variant", format!("{v} is not a HEADWISE_HEADKV_* value"))),
        };
        if out_len != num_heads {
            return Err(Error::invalid("out_len", format!("{out_len}, expected num_heads = {num_heads}")));
        }
        // SAFETY: the caller's promise on both arrays' lengths.
        let importance = unsafe { input(importance, num_heads, "importance") }?;
        let out = unsafe { output(out, out_len, "out") }?;
        let opts = HeadKvOptions { beta, temp, variant };
        out.copy_from_slice(&budget::headkv(importance, base_capacity, window, &opts)?);
        Ok(())
    })
}

/// DuoAttention / RLKV head gates: one value per (layer, KV head), parsed from a gate TSV
/// (`full_attention_heads.tsv`, `adapter_weights.tsv`). Free with `headwise_head_gates_free`.
pub struct HeadwiseHeadGates {
    gates: HeadGates,
}

/// Parses a gate TSV: `text_len` bytes of UTF-8 at `text` (no NUL needed), one row per layer,
/// one tab- or space-separated float per KV head, clipped to [0, 1]. Errors name the line and
/// column of a bad value, a row of another width, or an empty file.
///
/// # Safety
/// `text` must be NULL or hold `text_len` readable bytes; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_parse(
    text: *const c_char,
    text_len: usize,
    out: *mut *mut HeadwiseHeadGates,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let gates = HeadGates::parse_tsv(unsafe { utf8(text, text_len, "text") }?)?;
        *out = Box::into_raw(Box::new(HeadwiseHeadGates { gates }));
        Ok(())
    })
}

/// Layers (rows) and KV heads (columns) of a gate table; either out-pointer may be NULL.
///
/// # Safety
/// `gates` must be NULL or live; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_shape(
    gates: *const HeadwiseHeadGates,
    layers: *mut usize,
    kv_heads: *mut usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let g = unsafe { handle(gates, "gates") }?;
        unsafe { write_optional(layers, "layers", g.gates.layers()) }?;
        unsafe { write_optional(kv_heads, "kv_heads", g.gates.kv_heads()) }
    })
}

/// The clipped gates, `[layer][kv_head]`; `len` must be `layers * kv_heads`.
///
/// # Safety
/// `gates` must be NULL or live; `out` NULL or `len` writable doubles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_values(
    gates: *const HeadwiseHeadGates,
    out: *mut f64,
    len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let g = &unsafe { handle(gates, "gates") }?.gates;
        let out = unsafe { output(out, checked_grid_len(len, g.layers(), g.kv_heads())?, "out") }?;
        for (i, v) in out.iter_mut().enumerate() {
            *v = g.gate(i / g.kv_heads(), i % g.kv_heads());
        }
        Ok(())
    })
}

fn checked_grid_len(len: usize, layers: usize, heads: usize) -> Result<usize> {
    if Some(len) != layers.checked_mul(heads) {
        return Err(Error::invalid("len", format!("{len}, expected layers {layers} * heads {heads}")));
    }
    Ok(len)
}

/// Chooses the full heads as DuoAttention/RLKV do: the `sparsity` fraction (in [0, 1]) of heads
/// with the lowest gates become streaming (numpy's quantile rule, ties broken by index). Writes
/// `mask[layer * kv_heads + kv_head]` = 1 for a full head, 0 for a streaming one; `mask_len`
/// must be `layers * kv_heads`. Build each layer's layout with `headwise_layout_pack` (mode
/// Full where the mask is 1, Streaming with e.g. `HEADWISE_RLKV_SINK`/`_WINDOW` elsewhere).
///
/// # Safety
/// `gates` must be NULL or live; `mask` NULL or `mask_len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_select_full(
    gates: *const HeadwiseHeadGates,
    sparsity: f64,
    mask: *mut u8,
    mask_len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let g = &unsafe { handle(gates, "gates") }?.gates;
        let len = checked_grid_len(mask_len, g.layers(), g.kv_heads()).map_err(|_| {
            Error::invalid("mask_len", format!("{mask_len}, expected {} * {}", g.layers(), g.kv_heads()))
        })?;
        let mask = unsafe { output(mask, len, "mask") }?;
        let full = g.select_full(sparsity)?;
        for (i, m) in mask.iter_mut().enumerate() {
            *m = u8::from(full.is_full(i / g.kv_heads(), i % g.kv_heads()));
        }
        Ok(())
    })
}

/// Frees a gate table. NULL is ignored.
///
/// # Safety
/// `gates` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_free(gates: *mut HeadwiseHeadGates) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise.
        unsafe { free_handle(gates) };
        Ok(())
    })
}

/// Reads a DuoAttention `config.json` (`text_len` bytes of UTF-8): the streaming heads' sink and
/// window in tokens (`deploy_sink_size`/`deploy_recent_size` when set, else `sink_size`/
/// `recent_size`).
///
/// # Safety
/// `text` must be NULL or hold `text_len` readable bytes; `sink` and `window` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_duo_attention_config(
    text: *const c_char,
    text_len: usize,
    sink: *mut u32,
    window: *mut u32,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let sink = unsafe { out_value(sink, "sink") }?;
        let window = unsafe { out_value(window, "window") }?;
        let size = duo_attention_config(unsafe { utf8(text, text_len, "text") }?)?;
        (*sink, *window) = (size.sink, size.window);
        Ok(())
    })
}

/// HeadKV head scores: one importance per (layer, head), parsed from a HeadKV score file.
/// Free with `headwise_head_scores_free`.
pub struct HeadwiseHeadScores {
    scores: HeadScores,
}

/// Parses a HeadKV score file (`text_len` bytes of UTF-8 JSON): an object with keys
/// `"layer-head"`, each a non-empty list of per-sample scores; a head's importance is the mean.
/// The keys must cover a full layers x heads grid. The authors' files name query heads.
///
/// # Safety
/// `text` must be NULL or hold `text_len` readable bytes; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_parse(
    text: *const c_char,
    text_len: usize,
    out: *mut *mut HeadwiseHeadScores,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let scores = HeadScores::parse_json(unsafe { utf8(text, text_len, "text") }?)?;
        *out = Box::into_raw(Box::new(HeadwiseHeadScores { scores }));
        Ok(())
    })
}

/// Layers and heads per layer of a score table; either out-pointer may be NULL.
///
/// # Safety
/// `scores` must be NULL or live; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_shape(
    scores: *const HeadwiseHeadScores,
    layers: *mut usize,
    heads: *mut usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let s = &unsafe { handle(scores, "scores") }?.scores;
        unsafe { write_optional(layers, "layers", s.layers()) }?;
        unsafe { write_optional(heads, "heads", s.heads()) }
    })
}

/// The importances, `[layer][head]`; `len` must be `layers * heads`. This is the input of
/// `headwise_budget_headkv`.
///
/// # Safety
/// `scores` must be NULL or live; `out` NULL or `len` writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_importance(
    scores: *const HeadwiseHeadScores,
    out: *mut f32,
    len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let s = &unsafe { handle(scores, "scores") }?.scores;
        let out = unsafe { output(out, checked_grid_len(len, s.layers(), s.heads())?, "out") }?;
        out.copy_from_slice(s.as_slice());
        Ok(())
    })
}

/// A new score table with `kv_heads` heads per layer: each KV head's importance is the mean over
/// its group of `heads / kv_heads` consecutive query heads (`kv_heads` must divide `heads`).
///
/// # Safety
/// `scores` must be NULL or live; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_to_kv_heads(
    scores: *const HeadwiseHeadScores,
    kv_heads: usize,
    out: *mut *mut HeadwiseHeadScores,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let s = &unsafe { handle(scores, "scores") }?.scores;
        *out = Box::into_raw(Box::new(HeadwiseHeadScores { scores: s.to_kv_heads(kv_heads)? }));
        Ok(())
    })
}

/// Frees a score table. NULL is ignored.
///
/// # Safety
/// `scores` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_free(scores: *mut HeadwiseHeadScores) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise.
        unsafe { free_handle(scores) };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// GPU: a device + the engine's stream, caches over engine memory, query rings

/// Restores the calling thread's current CUDA context when dropped. cudarc makes the device's
/// primary context current before its driver calls; an engine that drives several devices from
/// one thread (runtime API: `cudaSetDevice`) would otherwise find its next runtime call on the
/// wrong device.
struct KeepCurrentContext(CUcontext);

/// The calling thread's current context; NULL when there is none, and before cuInit (when the
/// query fails), so a thread that had no context gets none back.
fn current_context() -> CUcontext {
    cudarc::driver::result::ctx::get_current().ok().flatten().unwrap_or(null_mut())
}

impl KeepCurrentContext {
    /// Only call once libcuda is known to be loadable (a GPU handle exists, or
    /// `is_culib_present` said so): cudarc panics when it cannot load the library.
    fn new() -> KeepCurrentContext {
        KeepCurrentContext(current_context())
    }
}

impl Drop for KeepCurrentContext {
    fn drop(&mut self) {
        if current_context() != self.0 {
            // SAFETY: self.0 was current on this thread when the call began (or is NULL, which
            // unbinds); the engine owns that context and keeps it alive across its own call.
            let _ = unsafe { cudarc::driver::result::ctx::set_current(self.0) };
        }
    }
}

/// A CUDA device and the engine's stream every kernel of its caches and rings is enqueued on.
/// Create with `headwise_gpu_create`, free with `headwise_gpu_free`.
pub struct HeadwiseGpu {
    store: GpuStore,
}

/// Whether this library carries GPU kernels (built with nvcc): writes 1 or 0 to `*out`. Without
/// them `headwise_gpu_create` returns `HEADWISE_ERROR_NO_KERNELS`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_gpu_kernels_built(out: *mut i32) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        *unsafe { out_value(out, "out") }? = i32::from(crate::kernels::FATBINS.iter().all(Option::is_some));
        Ok(())
    })
}

/// Opens CUDA device `device` (its primary context, the one the CUDA runtime uses) for kernels
/// enqueued on `stream`, a `CUstream`/`cudaStream_t` of that context that the engine owns (NULL
/// is the legacy default stream). GPU kernel modules load once per handle, on first use.
///
/// Errors: `HEADWISE_ERROR_NO_KERNELS` (built without nvcc), `HEADWISE_ERROR_NO_GPU` (no driver,
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
    out: *mut *mut HeadwiseGpu,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { out_handle(out) }?;
        let ordinal =
            usize::try_from(device).map_err(|_| Error::invalid("device", format!("{device} is negative")))?;
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
        *out = Box::into_raw(Box::new(HeadwiseGpu { store }));
        Ok(())
    })
}

/// Waits until everything enqueued on the handle's stream has finished (`cuStreamSynchronize`).
///
/// # Safety
/// `gpu` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_gpu_synchronize(gpu: *const HeadwiseGpu) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let gpu = unsafe { handle(gpu, "gpu") }?;
        let _keep = KeepCurrentContext::new();
        gpu.store.synchronize()
    })
}

/// Frees a GPU handle (caches and rings made from it stay valid: they share the device). NULL
/// is ignored.
///
/// # Safety
/// `gpu` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_gpu_free(gpu: *mut HeadwiseGpu) -> c_int {
    boundary(|| {
        if !gpu.is_null() {
            let _keep = KeepCurrentContext::new();
            // SAFETY: the caller's promise.
            unsafe { free_handle(gpu) };
        }
        Ok(())
    })
}

/// Wraps `len` elements of engine device memory at `ptr` (NULL only when `len` is 0).
///
/// # Safety
/// `ptr` must be a device address of the store's context valid for `len` elements of `T` while
/// the result (and any work enqueued over it) is in use, and ordered with the engine's stream.
unsafe fn device_buf<T: Elem>(ptr: *const c_void, len: usize, field: &str) -> Result<GpuBuf<T>> {
    if ptr.is_null() && len > 0 {
        return Err(Error::invalid(field, format!("NULL device pointer where {len} elements are needed")));
    }
    if len.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(Error::invalid(field, format!("{len} elements overflow the address space")));
    }
    // SAFETY: forwarded from the caller.
    Ok(unsafe { GpuBuf::borrowed(ptr.addr() as u64, len) })
}

enum CacheInner {
    F16(LayerCache<GpuStore, f16>),
    Bf16(LayerCache<GpuStore, bf16>),
}

/// One layer's ragged K/V cache in engine device memory: the engine's K and V buffers, the host
/// layout, headwise's device copy of the segment table, and the scratch memory the operations
/// reuse. Create with `headwise_cache_create`, free with `headwise_cache_free`.
pub struct HeadwiseCache {
    inner: CacheInner,
    attention: AttentionWorkspace<GpuStore>,
    select: SelectWorkspace<GpuStore>,
    rkv: RkvWorkspace<GpuStore>,
}

/// Runs `$body` with `$c` bound to the typed `LayerCache` of a cache handle.
macro_rules! with_cache {
    ($cache:expr, $c:ident => $body:expr) => {
        match $cache {
            CacheInner::F16($c) => $body,
            CacheInner::Bf16($c) => $body,
        }
    };
}

fn wrap_cache<T: KvElem>(
    store: &GpuStore,
    layout: &LayerLayout,
    head_dim: usize,
    k: *mut c_void,
    v: *mut c_void,
) -> Result<LayerCache<GpuStore, T>> {
    let elems = product("total_rows * head_dim", &[layout.total_rows(), head_dim])?;
    // SAFETY: headwise_cache_create's contract: k and v hold total_rows * head_dim elements
    // of this dtype in the store's context for the cache's lifetime.
    let (k, v) = unsafe { (device_buf::<T>(k, elems, "k")?, device_buf::<T>(v, elems, "v")?) };
    LayerCache::from_parts(store, layout.clone(), head_dim, k, v)
}

/// A cache over the engine's K and V buffers of one layer, each `[total_rows][head_dim]`
/// elements of `dtype` (`HEADWISE_DTYPE_F16`/`_BF16`), row-major, 16-byte aligned, laid out as
/// `layout` says (copied: later changes go through the cache; read them back with
/// `headwise_cache_layout`). `head_dim` is 64, 128 or 256. headwise uploads its own device copy
/// of the segment table on the GPU handle's stream and never frees `k` or `v`.
///
/// Lifetime: `k` and `v` must stay allocated until `headwise_cache_free` and until the work
/// enqueued over them has finished.
///
/// # Safety
/// `gpu` and `layout` must be NULL or live; `k` and `v` NULL or device pointers of the GPU
/// handle's device holding `total_rows * head_dim` elements each; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_create(
    gpu: *const HeadwiseGpu,
    layout: *const HeadwiseLayout,
    dtype: c_int,
    head_dim: usize,
    k: *mut c_void,
    v: *mut c_void,
    out: *mut *mut HeadwiseCache,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer.
        let out = unsafe { out_handle(out) }?;
        let gpu = unsafe { handle(gpu, "gpu") }?;
        let layout = &unsafe { handle(layout, "layout") }?.layout;
        let dtype = dtype_of(dtype)?;
        check_head_dim(head_dim)?;
        let _keep = KeepCurrentContext::new();
        let inner = match dtype {
            DType::F16 => CacheInner::F16(wrap_cache(&gpu.store, layout, head_dim, k, v)?),
            DType::BF16 => CacheInner::Bf16(wrap_cache(&gpu.store, layout, head_dim, k, v)?),
        };
        *out = Box::into_raw(Box::new(HeadwiseCache {
            inner,
            attention: AttentionWorkspace::new(),
            select: SelectWorkspace::new(),
            rkv: RkvWorkspace::new(),
        }));
        Ok(())
    })
}

/// Frees a cache: headwise's segment table and scratch memory are released in stream order on
/// the GPU handle's stream; the engine's K/V memory is untouched. NULL is ignored.
///
/// # Safety
/// `cache` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_free(cache: *mut HeadwiseCache) -> c_int {
    boundary(|| {
        if !cache.is_null() {
            let _keep = KeepCurrentContext::new();
            // SAFETY: the caller's promise.
            unsafe { free_handle(cache) };
        }
        Ok(())
    })
}

/// A copy of the cache's current layout (lengths and ring state after every operation so far),
/// as a new layout handle to free.
///
/// # Safety
/// `cache` must be NULL or live; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_layout(
    cache: *const HeadwiseCache,
    out: *mut *mut HeadwiseLayout,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let cache = unsafe { handle(cache, "cache") }?;
        new_layout(out, with_cache!(&cache.inner, c => c.layout().clone()));
        Ok(())
    })
}

/// Appends one decode step's token to every segment: `k_new` and `v_new` are
/// `[num_segments][head_dim]` (the model's `[batch][kv_heads][head_dim]`), the cache's dtype,
/// 16-byte aligned device memory. Full segments write row `len`; Streaming segments fill their
/// sinks, then overwrite their ring's oldest row.
///
/// Errors before anything is enqueued: `HEADWISE_ERROR_SEGMENT_FULL` (a Full segment has no free
/// row: compress it, or `headwise_cache_relayout_into` a regrown layout), invalid arguments.
/// Asynchronous: returns once the kernel is enqueued on the GPU handle's stream; `k_new`/`v_new`
/// must stay valid until it has run.
///
/// # Safety
/// `cache` must be NULL or live; `k_new`/`v_new` NULL or device pointers holding
/// `num_segments * head_dim` elements, written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_append(
    cache: *mut HeadwiseCache,
    k_new: *const c_void,
    v_new: *const c_void,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let _keep = KeepCurrentContext::new();
        with_cache!(&mut cache.inner, c => {
            let n = product("num_segments * head_dim", &[c.layout().segments().len(), c.head_dim()])?;
            // SAFETY: the caller's promise on k_new/v_new (n elements each).
            let (k, v) = unsafe { (device_buf(k_new, n, "k_new")?, device_buf(v_new, n, "v_new")?) };
            c.append(&k, &v)
        })
    })
}

/// Decode attention for the layer: for every segment `s` (sequence `b`, KV head `h`), the
/// `group_size` query heads `s * group_size + g` attend over the segment's tokens (Full: its
/// `len` rows; Streaming: sinks + ring). `q` and `out` are `[num_segments * group_size]
/// [head_dim]` (the model's `[batch][heads][head_dim]`) in the cache's dtype, 16-byte aligned;
/// `lse` is NULL or `[num_segments * group_size]` floats (natural-log log-sum-exp, `-inf` for an
/// empty segment, whose output is zeros). `group_size` is 1..=16. `scale` 0 means
/// `1 / sqrt(head_dim)`; `chunk_tokens` 0 lets headwise choose the flash-decoding split (else
/// tokens per chunk). Split scratch memory is kept in the cache and grows on demand (allocated
/// on the stream).
///
/// Asynchronous: returns once the kernels are enqueued on the GPU handle's stream; read `out`
/// and `lse` after synchronizing with it.
///
/// # Safety
/// `cache` must be NULL or live; `q`, `out`, `lse` NULL or device pointers of the sizes above;
/// `q` written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_attention(
    cache: *mut HeadwiseCache,
    q: *const c_void,
    group_size: usize,
    out: *mut c_void,
    lse: *mut f32,
    scale: f32,
    chunk_tokens: u32,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let _keep = KeepCurrentContext::new();
        let opts = AttentionOptions {
            scale: (scale != 0.0).then_some(scale),
            chunk_tokens: (chunk_tokens != 0).then_some(chunk_tokens),
        };
        let ws = &mut cache.attention;
        with_cache!(&cache.inner, c => {
            let heads = product("num_segments * group_size", &[c.layout().segments().len(), group_size])?;
            let n = product("heads * head_dim", &[heads, c.head_dim()])?;
            // SAFETY: the caller's promise on q/out/lse (sizes above).
            let (q, mut out) = unsafe { (device_buf(q, n, "q")?, device_buf(out, n, "out")?) };
            let mut lse = if lse.is_null() { None } else { Some(unsafe { device_buf::<f32>(lse.cast_const().cast(), heads, "lse") }?) };
            c.attention(&q, group_size, &mut out, lse.as_mut(), ws, &opts)
        })
    })
}

/// Options of a prefill compression (`headwise_cache_compress_into*`). Start from
/// `headwise_select_options_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwiseSelectOptions {
    /// Observation window in tokens: the last `window` prompt tokens, always kept, whose queries
    /// score the prefix (1..=q_len; default 32).
    pub window: u32,
    /// Pooling kernel size, odd (default 7; 1 = no pooling).
    pub pool_kernel: u32,
    /// `HEADWISE_POOL_MAX` (default) or `HEADWISE_POOL_AVG`.
    pub pool: c_int,
    /// `HEADWISE_GQA_MEAN` (default) or `HEADWISE_GQA_MAX`.
    pub gqa: c_int,
    /// `HEADWISE_GRANULARITY_KV_HEAD` (default) or `HEADWISE_GRANULARITY_QUERY_HEAD`.
    pub granularity: c_int,
    /// Softmax scale; 0 means `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Tokens per block of the scoring passes; 0 lets headwise choose (a performance knob).
    pub chunk_tokens: u32,
}

impl HeadwiseSelectOptions {
    fn to_rust(self) -> Result<SelectOptions> {
        Ok(SelectOptions {
            window: self.window as usize,
            pool_kernel: self.pool_kernel as usize,
            pool: match self.pool {
                HEADWISE_POOL_MAX => Pool::Max,
                HEADWISE_POOL_AVG => Pool::Avg,
                p => return Err(Error::invalid("opts.pool", format!("{p} is not a HEADWISE_POOL_* value"))),
            },
            gqa: match self.gqa {
                HEADWISE_GQA_MEAN => GqaReduce::Mean,
                HEADWISE_GQA_MAX => GqaReduce::Max,
                g => return Err(Error::invalid("opts.gqa", format!("{g} is not a HEADWISE_GQA_* value"))),
            },
            granularity: match self.granularity {
                HEADWISE_GRANULARITY_KV_HEAD => Granularity::KvHead,
                HEADWISE_GRANULARITY_QUERY_HEAD => Granularity::QueryHead,
                g => {
                    return Err(Error::invalid(
                        "opts.granularity",
                        format!("{g} is not a HEADWISE_GRANULARITY_* value"),
                    ));
                }
            },
            scale: (self.scale != 0.0).then_some(self.scale),
            headroom: 0,
            chunk_tokens: (self.chunk_tokens != 0).then_some(self.chunk_tokens),
        })
    }
}

/// Writes SnapKV's defaults (window 32, max-pool 7, group mean, per KV head, default scale,
/// automatic chunk) to `*out`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_select_options_default(out: *mut HeadwiseSelectOptions) -> c_int {
    boundary(|| {
        let d = SelectOptions::default();
        // SAFETY: the caller's promise on `out`.
        *unsafe { out_value(out, "out") }? = HeadwiseSelectOptions {
            window: d.window as u32,
            pool_kernel: d.pool_kernel as u32,
            pool: HEADWISE_POOL_MAX,
            gqa: HEADWISE_GQA_MEAN,
            granularity: HEADWISE_GRANULARITY_KV_HEAD,
            scale: 0.0,
            chunk_tokens: 0,
        };
        Ok(())
    })
}

/// One layer's prompt in engine device memory, for prefill compression. Elements are the
/// cache's dtype; buffers 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwisePrompt {
    /// Keys after RoPE, `[batch][kv_heads][q_len][head_dim]`.
    pub k: *const c_void,
    /// Values, same shape as `k`.
    pub v: *const c_void,
    /// The last `window` queries of every query head, `[batch][kv_heads * group_size][window]
    /// [head_dim]` (query head `h * group_size + g` belongs to KV head `h`).
    pub queries: *const c_void,
    /// Sequences.
    pub batch: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Query heads per KV head (1..=16).
    pub group_size: usize,
    /// Prompt tokens per sequence.
    pub q_len: usize,
}

fn compress_typed<T: KvElem>(
    c: &mut LayerCache<GpuStore, T>,
    ws: &mut SelectWorkspace<GpuStore>,
    p: &HeadwisePrompt,
    opts: &SelectOptions,
    budgets: Budgets<'_>,
) -> Result<()> {
    let d = c.head_dim();
    let kv = product("batch * kv_heads * q_len * head_dim", &[p.batch, p.kv_heads, p.q_len, d])?;
    let qn = product(
        "batch * kv_heads * group_size * window * head_dim",
        &[p.batch, p.kv_heads, p.group_size, opts.window, d],
    )?;
    // SAFETY: the caller's promise on the prompt's buffers (HeadwisePrompt's shapes).
    let (k, v, queries) = unsafe {
        (
            device_buf::<T>(p.k, kv, "prompt.k")?,
            device_buf::<T>(p.v, kv, "prompt.v")?,
            device_buf::<T>(p.queries, qn, "prompt.queries")?,
        )
    };
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &queries,
        batch: p.batch,
        kv_heads: p.kv_heads,
        group_size: p.group_size,
        q_len: p.q_len,
        head_dim: d,
    };
    select::compress_into(c, &prompt, budgets, opts, ws)
}

/// Shared body of the two compression entry points: `adakv` is `(base, floor_alpha)`, else the
/// budgets are `budgets[num_budgets]`.
///
/// # Safety
/// As `headwise_cache_compress_into`.
unsafe fn compress(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    budgets: *const u32,
    num_budgets: usize,
    adakv: Option<(u32, f32)>,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer and length.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let prompt = unsafe { input_struct(prompt, "prompt") }?;
        let opts = if opts.is_null() {
            SelectOptions::default()
        } else {
            unsafe { input_struct(opts, "opts") }?.to_rust()?
        };
        let budgets = match adakv {
            Some((base, floor_alpha)) => Budgets::AdaKv { base, floor_alpha },
            None => Budgets::PerRow(unsafe { input(budgets, num_budgets, "budgets") }?),
        };
        let _keep = KeepCurrentContext::new();
        let ws = &mut cache.select;
        with_cache!(&mut cache.inner, c => compress_typed(c, ws, prompt, &opts, budgets))
    })
}

/// Prefill compression of one layer (SnapKV scoring, per-row top-k, gather) into the cache,
/// whose layout must have one Full segment per score row (`batch * kv_heads` rows, or `batch *
/// kv_heads * group_size` with `HEADWISE_GRANULARITY_QUERY_HEAD`) with capacity for
/// `min(budget, q_len)` rows; each segment's `len` becomes that count. `budgets[num_budgets]`
/// holds one budget per row in tokens, window included (uniform, PyramidKV or HeadKV, from the
/// `headwise_budget_*` functions); each at least the window. `opts` NULL means
/// `headwise_select_options_default`.
///
/// Asynchronous: returns once every kernel is enqueued on the GPU handle's stream; the prompt
/// buffers must stay valid until they have run.
///
/// # Safety
/// `cache`, `prompt`, `opts` NULL or valid; the prompt's device pointers hold the sizes
/// `HeadwisePrompt` states, written before this call in the stream's order; `budgets` NULL or
/// `num_budgets` readable elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_compress_into(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    budgets: *const u32,
    num_budgets: usize,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { compress(cache, prompt, opts, budgets, num_budgets, None) }
}

/// As `headwise_cache_compress_into` with AdaKV budgets allocated on the device after scoring:
/// per sequence, `base` tokens per row on average (window included), of which the share
/// `floor_alpha` (in [0, 1]; the authors use 0.2) is every row's floor and the rest follows the
/// scores. Segment capacities must hold each row's count (at most `q_len`), or the call fails
/// before the gather.
///
/// Synchronous with the stream: the per-row counts come back to the host, so this waits for
/// the scoring kernels to finish before enqueueing the gather.
///
/// # Safety
/// As `headwise_cache_compress_into`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_compress_into_adakv(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    base: u32,
    floor_alpha: f32,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { compress(cache, prompt, opts, std::ptr::null(), 0, Some((base, floor_alpha))) }
}

/// Copies every segment's rows into new engine buffers `k_dst`/`v_dst` laid out as `target`
/// (the same segments, mode, len and ring state at other offsets with at least their length in
/// capacity, e.g. from `headwise_layout_regrown`), each `target.total_rows * head_dim` elements.
/// The cache itself is unchanged: afterwards create a new cache over the new buffers with
/// `target`, free this one, and free the old buffers once the copy has run (stream order).
///
/// # Safety
/// `cache` and `target` NULL or live; `k_dst`/`v_dst` NULL or device pointers holding
/// `target.total_rows * head_dim` elements, not overlapping the cache's buffers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_relayout_into(
    cache: *const HeadwiseCache,
    target: *const HeadwiseLayout,
    k_dst: *mut c_void,
    v_dst: *mut c_void,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let cache = unsafe { handle(cache, "cache") }?;
        let target = &unsafe { handle(target, "target") }?.layout;
        let _keep = KeepCurrentContext::new();
        with_cache!(&cache.inner, c => {
            let n = product("target.total_rows * head_dim", &[target.total_rows(), c.head_dim()])?;
            // SAFETY: the caller's promise on k_dst/v_dst.
            let (mut k, mut v) = unsafe { (device_buf(k_dst, n, "k_dst")?, device_buf(v_dst, n, "v_dst")?) };
            c.relayout_into(target, &mut k, &mut v)
        })
    })
}

enum RingInner {
    F16(QueryRing<GpuStore, f16>),
    Bf16(QueryRing<GpuStore, bf16>),
}

/// A layer's rolling buffer of the last `alpha` queries of every query head, in device memory
/// headwise owns (R-KV scores importance with it). Create with `headwise_query_ring_create`,
/// push every decode step, free with `headwise_query_ring_free`.
pub struct HeadwiseQueryRing {
    inner: RingInner,
}

/// An empty query ring for `heads` query heads (`num_segments * group_size` of the cache it will
/// score) of `dtype` and `head_dim`, keeping `alpha` (1..=16) queries per head; its
/// `heads * alpha * head_dim` elements are allocated on the GPU handle's stream.
///
/// # Safety
/// `gpu` NULL or live; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_query_ring_create(
    gpu: *const HeadwiseGpu,
    dtype: c_int,
    heads: usize,
    alpha: usize,
    head_dim: usize,
    out: *mut *mut HeadwiseQueryRing,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let gpu = unsafe { handle(gpu, "gpu") }?;
        let dtype = dtype_of(dtype)?;
        let _keep = KeepCurrentContext::new();
        let inner = match dtype {
            DType::F16 => RingInner::F16(QueryRing::new(&gpu.store, heads, alpha, head_dim)?),
            DType::BF16 => RingInner::Bf16(QueryRing::new(&gpu.store, heads, alpha, head_dim)?),
        };
        *out = Box::into_raw(Box::new(HeadwiseQueryRing { inner }));
        Ok(())
    })
}

/// Pushes one decode step's queries, `q`: `[heads][head_dim]` in the ring's dtype, 16-byte
/// aligned device memory (the decode attention's `q`). Asynchronous, on the GPU handle's stream.
///
/// # Safety
/// `ring` NULL or live; `q` NULL or a device pointer holding `heads * head_dim` elements,
/// written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_query_ring_push(ring: *mut HeadwiseQueryRing, q: *const c_void) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let ring = unsafe { handle_mut(ring, "ring") }?;
        let _keep = KeepCurrentContext::new();
        match &mut ring.inner {
            RingInner::F16(r) => push_typed(r, q),
            RingInner::Bf16(r) => push_typed(r, q),
        }
    })
}

fn push_typed<T: KvElem>(r: &mut QueryRing<GpuStore, T>, q: *const c_void) -> Result<()> {
    // The ring holds alpha queries of heads * head_dim elements.
    let n = <GpuStore as Store>::len(r.buf()) / r.alpha();
    // SAFETY: headwise_query_ring_push's contract on q.
    let q = unsafe { device_buf(q, n, "q") }?;
    r.push(&q)
}

/// Frees a query ring (its memory is released in stream order). NULL is ignored.
///
/// # Safety
/// `ring` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_query_ring_free(ring: *mut HeadwiseQueryRing) -> c_int {
    boundary(|| {
        if !ring.is_null() {
            let _keep = KeepCurrentContext::new();
            // SAFETY: the caller's promise.
            unsafe { free_handle(ring) };
        }
        Ok(())
    })
}

/// Options of an R-KV eviction step. Start from `headwise_rkv_options_default`. Counts are
/// tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwiseRkvOptions {
    /// Tokens a compacted segment keeps, window included (must exceed `alpha`).
    pub budget: u32,
    /// Slack before the automatic trigger: a Full segment is compacted once `len >= budget +
    /// buffer` (default 128).
    pub buffer: u32,
    /// Recent queries per head scoring importance, and newest tokens always kept (1..=16,
    /// default 8; must equal the ring's alpha).
    pub alpha: u32,
    /// Max-pool width of the importance, odd (default 7).
    pub kernel: u32,
    /// Weight of importance against redundancy, in [0, 1] (default 0.07).
    pub lambda: f64,
    /// Nonzero reproduces the authors' zeroing quirk of the similarity matrix (default 0).
    pub fidelity_quirk: i32,
}

/// Writes R-KV's defaults with the given `budget` (buffer 128, alpha 8, kernel 7, lambda 0.07,
/// quirk off) to `*out`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_rkv_options_default(budget: u32, out: *mut HeadwiseRkvOptions) -> c_int {
    boundary(|| {
        let d = RkvOptions::new(budget as usize);
        // SAFETY: the caller's promise on `out`.
        *unsafe { out_value(out, "out") }? = HeadwiseRkvOptions {
            budget,
            buffer: d.buffer as u32,
            alpha: d.alpha as u32,
            kernel: d.kernel as u32,
            lambda: d.lambda,
            fidelity_quirk: i32::from(d.fidelity_quirk),
        };
        Ok(())
    })
}

/// One R-KV step over the layer: scores and compacts, in place, every Full segment that holds
/// more than `budget` tokens and is selected, by the automatic trigger (`forced` NULL: `len >=
/// budget + buffer`) or by `forced[s] != 0` (`forced_len` = num_segments; forcing a Streaming
/// segment is an error). `ring` holds the layer's recent queries (`num_segments * group_size`
/// heads, same dtype, head_dim and alpha). A compacted segment's `len` becomes `budget`. If
/// `compacted` is not NULL, `compacted[s]` (`compacted_len` = num_segments) is set to 1 for
/// every segment compacted, else 0. Scratch memory is kept in the cache and grows on demand.
///
/// Asynchronous: returns once the kernels are enqueued on the GPU handle's stream (the new
/// lengths are known on the host without waiting).
///
/// # Safety
/// `cache`, `ring`, `opts` NULL or valid; `forced` NULL or `forced_len` readable bytes;
/// `compacted` NULL or `compacted_len` writable bytes.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_cache_evict(
    cache: *mut HeadwiseCache,
    ring: *const HeadwiseQueryRing,
    group_size: usize,
    opts: *const HeadwiseRkvOptions,
    forced: *const u8,
    forced_len: usize,
    compacted: *mut u8,
    compacted_len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer and length.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let ring = unsafe { handle(ring, "ring") }?;
        let o = unsafe { input_struct(opts, "opts") }?;
        let opts = RkvOptions {
            budget: o.budget as usize,
            buffer: o.buffer as usize,
            alpha: o.alpha as usize,
            kernel: o.kernel as usize,
            lambda: o.lambda,
            fidelity_quirk: o.fidelity_quirk != 0,
        };
        let forced: Option<Vec<bool>> = unsafe { optional_input(forced, forced_len, "forced") }?
            .map(|f| f.iter().map(|&x| x != 0).collect());
        let trigger = forced.as_deref().map_or(RkvTrigger::Threshold, RkvTrigger::Forced);
        let n = with_cache!(&cache.inner, c => c.layout().segments().len());
        let compacted = if compacted.is_null() {
            None
        } else {
            if compacted_len != n {
                return Err(Error::invalid(
                    "compacted_len",
                    format!("{compacted_len}, expected num_segments {n}"),
                ));
            }
            Some(unsafe { output(compacted, compacted_len, "compacted") }?)
        };
        let _keep = KeepCurrentContext::new();
        let ws = &mut cache.rkv;
        let done = match (&mut cache.inner, &ring.inner) {
            (CacheInner::F16(c), RingInner::F16(r)) => {
                redundancy::evict(c, r, group_size, &opts, trigger, ws)?
            }
            (CacheInner::Bf16(c), RingInner::Bf16(r)) => {
                redundancy::evict(c, r, group_size, &opts, trigger, ws)?
            }
            _ => return Err(Error::invalid("ring", "its dtype differs from the cache's")),
        };
        if let Some(out) = compacted {
            for (o, d) in out.iter_mut().zip(done) {
                *o = u8::from(d);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> String {
        let n = unsafe { headwise_last_error_message(null_mut(), 0) };
        let mut buf = vec![0u8; n + 1];
        unsafe { headwise_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_panic_becomes_the_panic_code_with_a_message() {
        let code = boundary(|| panic!("planted"));
        assert_eq!(code, HEADWISE_ERROR_PANIC);
        assert_eq!(headwise_last_error_code(), HEADWISE_ERROR_PANIC);
        assert!(message().contains("planted"), "{}", message());
        assert_eq!(boundary(|| Ok(())), HEADWISE_OK);
        assert_eq!(message(), "");
    }

    #[test]
    fn every_error_variant_has_its_own_code() {
        let errors = [
            Error::invalid("x", "y"),
            Error::SegmentFull { segment: 0, capacity: 1 },
            Error::NoGpu("none".into()),
            Error::NoKernels,
            Error::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_UNKNOWN)),
            Error::Emulator { kernel: "k", message: "m".into() },
        ];
        let mut codes: Vec<c_int> = errors.iter().map(status_of).collect();
        codes.push(HEADWISE_ERROR_PANIC);
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
        assert!(!codes.contains(&HEADWISE_OK));
    }

    #[test]
    fn truncated_messages_stay_utf8_and_nul_terminated() {
        boundary(|| Err(Error::invalid("é", "ééé")));
        let full = message();
        let mut buf = [0x7fu8; 5];
        let n = unsafe { headwise_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, full.len());
        let end = buf.iter().position(|&b| b == 0).unwrap();
        assert!(end <= 4);
        assert!(std::str::from_utf8(&buf[..end]).is_ok());
    }
}
