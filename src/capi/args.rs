//! Checked views of caller memory and the argument codes several handles share (dtype). Each
//! view checks what can be checked (NULL, alignment, size overflow) and leaves the rest to the
//! caller's promise, which every `# Safety` section states.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::ffi::{c_char, c_int};
use std::ptr::null_mut;

/// Element type `__half` (IEEE binary16).
pub const HEADWISE_DTYPE_F16: c_int = 0;
/// Element type `__nv_bfloat16`.
pub const HEADWISE_DTYPE_BF16: c_int = 1;

/// `len` elements at `ptr`; NULL is accepted only for `len == 0`.
///
/// # Safety
/// A non-NULL `ptr` must be valid for reads of `len` elements for `'a`.
pub(super) unsafe fn input<'a, T>(ptr: *const T, len: usize, field: &str) -> Result<&'a [T]> {
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
pub(super) unsafe fn optional_input<'a, T>(
    ptr: *const T,
    len: usize,
    field: &str,
) -> Result<Option<&'a [T]>> {
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
pub(super) unsafe fn optional_output<'a, T>(
    ptr: *mut T,
    len: usize,
    field: &str,
) -> Result<Option<&'a mut [T]>> {
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
pub(super) unsafe fn output<'a, T>(ptr: *mut T, len: usize, field: &str) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_ptr(ptr, len, field)?;
    // SAFETY: non-NULL, aligned, size fits isize (checked), and valid per the caller.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

pub(super) fn check_ptr<T>(ptr: *const T, len: usize, field: &str) -> Result<()> {
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
pub(super) unsafe fn out_value<'a, T>(ptr: *mut T, field: &str) -> Result<&'a mut T> {
    check_ptr(ptr, 1, field)?;
    // SAFETY: non-NULL and aligned (checked), writable per the caller.
    Ok(unsafe { &mut *ptr })
}

/// Writes `value` through a nullable out-pointer (NULL: the caller does not want it).
///
/// # Safety
/// As [`out_value`] when `ptr` is not NULL.
pub(super) unsafe fn write_optional<T>(ptr: *mut T, field: &str, value: T) -> Result<()> {
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
pub(super) unsafe fn out_handle<'a, T>(ptr: *mut *mut T) -> Result<&'a mut *mut T> {
    // SAFETY: forwarded.
    let slot = unsafe { out_value(ptr, "out") }?;
    *slot = null_mut();
    Ok(slot)
}

/// A struct the caller passed by pointer.
///
/// # Safety
/// A non-NULL `ptr` must be valid for reads of one `T` for `'a`.
pub(super) unsafe fn input_struct<'a, T>(ptr: *const T, field: &str) -> Result<&'a T> {
    check_ptr(ptr, 1, field)?;
    // SAFETY: non-NULL and aligned (checked), readable per the caller.
    Ok(unsafe { &*ptr })
}

/// A handle the caller passed in.
///
/// # Safety
/// A non-NULL `ptr` must be a live handle of this type, not used by another thread meanwhile.
pub(super) unsafe fn handle<'a, T>(ptr: *const T, field: &str) -> Result<&'a T> {
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
pub(super) unsafe fn handle_mut<'a, T>(ptr: *mut T, field: &str) -> Result<&'a mut T> {
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
pub(super) unsafe fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: made by Box::into_raw in this module, released once per the caller.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// `len` bytes of UTF-8 text at `ptr` (no NUL terminator needed).
///
/// # Safety
/// As [`input`].
pub(super) unsafe fn utf8<'a>(ptr: *const c_char, len: usize, field: &str) -> Result<&'a str> {
    // SAFETY: forwarded; c_char and u8 have the same layout.
    let bytes = unsafe { input(ptr.cast::<u8>(), len, field) }?;
    std::str::from_utf8(bytes).map_err(|e| Error::invalid(field, format!("not UTF-8: {e}")))
}

pub(super) fn dtype_of(code: c_int) -> Result<DType> {
    match code {
        HEADWISE_DTYPE_F16 => Ok(DType::F16),
        HEADWISE_DTYPE_BF16 => Ok(DType::BF16),
        _ => Err(Error::invalid("dtype", format!("{code} is neither HEADWISE_DTYPE_F16 nor _BF16"))),
    }
}

pub(super) fn product(field: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| Error::invalid(field, format!("the element count {factors:?} overflows size_t")))
}
