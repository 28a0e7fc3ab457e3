//! Status codes, the calling thread's last error, and the boundary every exported function
//! runs its body through (`catch_unwind`, `Error` to code).

use crate::error::{Error, Result};
use std::cell::RefCell;
use std::ffi::{c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

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
/// The CPU SIMT emulator (a store from `headwise_emulator_create`) reported a kernel bug: a
/// barrier not reached by the whole block, a deadlocked shuffle, an out-of-range access it
/// caught. A bug in headwise; the message names the kernel, block, thread and source line.
pub const HEADWISE_ERROR_EMULATOR: c_int = 6;
/// A bug in headwise was caught at the boundary (a Rust panic). The handles the call touched
/// may be inconsistent: free them.
pub const HEADWISE_ERROR_PANIC: c_int = 7;
/// A compaction broke one of its guarantees, found by the opt-in invariant checks
/// (`HEADWISE_CHECK_INVARIANTS=1`): a bug in headwise; the cache's contents are suspect.
pub const HEADWISE_ERROR_INVARIANT: c_int = 8;
/// The library was built without the Cargo feature this call needs: `cuda` for
/// `headwise_gpu_create`, `emulator` for `headwise_emulator_create` (the message names it).
pub const HEADWISE_ERROR_FEATURE_OFF: c_int = 9;

thread_local! {
    static LAST_ERROR: RefCell<(c_int, String)> = const { RefCell::new((HEADWISE_OK, String::new())) };
}

pub(super) fn status_of(e: &Error) -> c_int {
    // Exhaustive on purpose: a new Error variant must get its own code here.
    match e {
        Error::Invalid { .. } => HEADWISE_ERROR_INVALID_ARGUMENT,
        Error::SegmentFull { .. } => HEADWISE_ERROR_SEGMENT_FULL,
        Error::NoGpu(_) => HEADWISE_ERROR_NO_GPU,
        Error::NoKernels => HEADWISE_ERROR_NO_KERNELS,
        #[cfg(feature = "cuda")]
        Error::Driver(_) => HEADWISE_ERROR_DRIVER,
        Error::FeatureOff { .. } => HEADWISE_ERROR_FEATURE_OFF,
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
pub(super) fn boundary(body: impl FnOnce() -> Result<()>) -> c_int {
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
        HEADWISE_ERROR_FEATURE_OFF => c"HEADWISE_ERROR_FEATURE_OFF",
        _ => c"HEADWISE_UNKNOWN",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::null_mut;

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
            #[cfg(feature = "cuda")]
            Error::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_UNKNOWN)),
            Error::Emulator { kernel: "k", message: "m".into() },
            Error::Invariant { operation: "o", detail: "d".into() },
            Error::FeatureOff { feature: "cuda" },
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
