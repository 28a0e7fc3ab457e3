//! Self-tests of the CPU SIMT emulator (`cuda/simt/`), run by `tests/simt.rs`.
//!
//! Safe wrappers over the C driver in `cuda/simt/selftest_driver.cpp`, which launches the kernels
//! of `cuda/simt/selftest.cu` through the emulator and checks their results exactly. Hidden from
//! the documentation: they test the emulator, not the crate's API. [`with_schedule`] is also
//! how a test pins the thread order of its own emulator launches.

use std::ffi::{CStr, CString, c_char};

/// Large enough for any emulator report (`HwEmuError` holds 1024 bytes).
const MESSAGE_LEN: usize = 1024;

unsafe extern "C" {
    fn hw_simt_selftest(name: *const c_char, message: *mut c_char, message_len: usize) -> i32;
    fn hw_simt_selftest_race(wrong: *mut i32, message: *mut c_char, message_len: usize) -> i32;
    fn hw_simt_selftest_shared_overrun(message: *mut c_char, message_len: usize) -> i32;
    fn hw_simt_set_thread_schedule(spec: *const c_char, message: *mut c_char, message_len: usize) -> i32;
    fn hw_simt_built_with_asan() -> i32;
    fn hw_simt_set_thread_adversarial(spec: *const c_char, message: *mut c_char, message_len: usize) -> i32;
    fn hw_simt_selftest_adversarial(
        mode: *const c_char,
        on: i32,
        message: *mut c_char,
        message_len: usize,
    ) -> i32;
}

/// The adversarial modes (`cuda/simt/adversarial.h`, `HEADWISE_EMU_ADVERSARIAL`), each with a
/// planted bug in `cuda/simt/adversarial_selftest.cu` that only the mode exposes.
pub const ADVERSARIAL_MODES: &[&str] = &["wmma", "masks", "its", "poison", "smem_optin"];

/// Runs the planted bug of adversarial mode `mode` with that mode alone on (`on`) or every mode
/// off, whatever the environment says, under the calling thread's schedule: `Ok` when the
/// kernel's results came out right, `Err` with the emulator's report or the first wrong result.
pub fn adversarial(mode: &str, on: bool) -> Result<(), String> {
    let mode_c = c_string(mode)?;
    // SAFETY: mode_c is NUL-terminated; the buffer pointer and length come from `call`.
    let (status, message) =
        call(|buf, len| unsafe { hw_simt_selftest_adversarial(mode_c.as_ptr(), i32::from(on), buf, len) });
    match status {
        0 => Ok(()),
        1 => Err(message),
        _ => panic!("adversarial self-test {mode}: {message}"),
    }
}

/// Self-tests whose kernels are correct: every result must come out exact.
pub const POSITIVE: &[&str] = &[
    "shuffles",
    "votes",
    "disjoint_masks",
    "block_reductions",
    "big_block",
    "atomics",
    "dynamic_shared",
    "static_shared",
    "wmma_f16",
    "wmma_bf16",
    "vector_types",
    "conversions",
    "launch_errors",
    "recovery",
];

/// Self-tests whose kernels carry a planted bug that the emulator must report.
pub const PLANTED: &[&str] = &[
    "planted_early_return",
    "planted_divergent_barrier",
    "planted_lane_exited",
    "planted_lane_elsewhere",
    "planted_mask_without_self",
    "planted_mismatched_collectives",
    "planted_cyclic_wait",
    "planted_deadlock",
    "planted_wmma_misaligned",
];

/// Calls a driver function that may fill a message buffer; returns its status and the message.
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> (i32, String) {
    let mut buffer = [0 as c_char; MESSAGE_LEN];
    let status = f(buffer.as_mut_ptr(), buffer.len());
    // SAFETY: the driver always leaves a NUL-terminated string in the buffer (or leaves the
    // zero-filled buffer untouched).
    let message = unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned();
    (status, message)
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// Runs the self-test `name` (one of [`POSITIVE`] or [`PLANTED`]) under the calling thread's
/// schedule. Positive tests give `Ok`, or `Err` with the first wrong result. Planted-bug tests
/// give `Err` with the emulator's report (the expected outcome), or `Ok` if the bug went unseen.
pub fn run(name: &str) -> Result<(), String> {
    let name = c_string(name)?;
    // SAFETY: name is NUL-terminated; the buffer pointer and length come from `call`.
    let (status, message) = call(|buf, len| unsafe { hw_simt_selftest(name.as_ptr(), buf, len) });
    if status == 0 { Ok(()) } else { Err(message) }
}

/// Runs the kernel with a missing barrier once under the calling thread's schedule and returns
/// how many of its 256 threads read a stale value: 0 in forward order, most otherwise.
pub fn race_wrong_values() -> Result<usize, String> {
    let mut wrong = 0i32;
    // SAFETY: `wrong` outlives the call; the buffer pointer and length come from `call`.
    let (status, message) = call(|buf, len| unsafe { hw_simt_selftest_race(&raw mut wrong, buf, len) });
    if status != 0 {
        return Err(message);
    }
    usize::try_from(wrong).map_err(|_| format!("negative count {wrong}"))
}

/// Whether the emulator library was compiled with AddressSanitizer (`HEADWISE_EMU_SANITIZE=1`).
pub fn built_with_asan() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { hw_simt_built_with_asan() != 0 }
}

/// Writes one element past a `__shared__` array (selftest.cu, `@planted:shared-overrun`). In a
/// sanitized build AddressSanitizer kills the process with a report naming that line; otherwise
/// the write would silently corrupt memory, so it is refused with `Err`.
pub fn shared_overrun() -> Result<(), String> {
    // SAFETY: the buffer pointer and length come from `call`.
    let (status, message) = call(|buf, len| unsafe { hw_simt_selftest_shared_overrun(buf, len) });
    if status == 0 { Ok(()) } else { Err(message) }
}

/// Sets the schedule of emulator launches made from the calling thread, overriding
/// `HEADWISE_EMU_SCHEDULE` (same syntax: `forward`, `reverse`, `random`, `random:<seed>`);
/// `None` goes back to the environment variable. Per thread, so that concurrent tests do not
/// interfere.
pub fn set_thread_schedule(spec: Option<&str>) -> Result<(), String> {
    set_thread_override(hw_simt_set_thread_schedule, spec)
}

/// Runs `f` with the calling thread's emulator launches in the order `spec`, then restores the
/// environment's order (also when `f` panics).
pub fn with_schedule<R>(spec: &str, f: impl FnOnce() -> R) -> Result<R, String> {
    with_override(set_thread_schedule, spec, f)
}

/// Sets the adversarial modes of emulator launches made from the calling thread, overriding
/// `HEADWISE_EMU_ADVERSARIAL` (same syntax: `all`, `none`, or a comma list of
/// [`ADVERSARIAL_MODES`]); `None` goes back to the environment variable.
pub fn set_thread_adversarial(spec: Option<&str>) -> Result<(), String> {
    set_thread_override(hw_simt_set_thread_adversarial, spec)
}

/// Runs `f` with the calling thread's emulator launches under the adversarial modes `spec`,
/// then restores the environment's (also when `f` panics). Tests of the emulator's lenient
/// default behaviour pin `"none"` with it.
pub fn with_adversarial<R>(spec: &str, f: impl FnOnce() -> R) -> Result<R, String> {
    with_override(set_thread_adversarial, spec, f)
}

/// The emulator's per-thread overrides of an environment variable share one C signature:
/// (spec or null, message buffer, its length) -> 0, or 1 with the message.
type SetThreadOverride = unsafe extern "C" fn(*const c_char, *mut c_char, usize) -> i32;

fn set_thread_override(set: SetThreadOverride, spec: Option<&str>) -> Result<(), String> {
    let spec = spec.map(c_string).transpose()?;
    let ptr = spec.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: ptr is null or NUL-terminated; the buffer pointer and length come from `call`.
    let (status, message) = call(|buf, len| unsafe { set(ptr, buf, len) });
    if status == 0 { Ok(()) } else { Err(message) }
}

/// Runs `f` under the override `spec`, clearing it afterwards (also when `f` panics).
fn with_override<R>(
    set: fn(Option<&str>) -> Result<(), String>,
    spec: &str,
    f: impl FnOnce() -> R,
) -> Result<R, String> {
    struct Restore(fn(Option<&str>) -> Result<(), String>);
    impl Drop for Restore {
        fn drop(&mut self) {
            // Clearing the override cannot fail.
            let _ = (self.0)(None);
        }
    }
    set(Some(spec))?;
    let _restore = Restore(set);
    Ok(f())
}
