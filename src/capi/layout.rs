//! Layout handles: a validated segment table of one layer, in host memory.

use super::args::{
    free_handle, handle, input, optional_input, optional_output, out_handle, out_value, output,
};
use super::errors::boundary;
use crate::error::Error;
use crate::layout::{LayerLayout, LayoutBuilder, MAX_ROWS, Segment, SegmentMode};
use std::ffi::c_int;

/// Segment mode: tokens in position order, appending to a full segment fails. The same value
/// the device table's mode array holds.
pub const HEADWISE_MODE_FULL: i32 = 0;
/// Segment mode: `sink` first tokens plus a ring of the `window` newest (never full).
pub const HEADWISE_MODE_STREAMING: i32 = 1;
/// Arrays in a device table (offset, capacity, len, sink, ring_head, mode), each
/// `num_segments` int32 entries.
pub const HEADWISE_DEVICE_TABLE_FIELDS: usize = 6;

// The device table's mode values come from cuda/params.h; the C names must not drift from them.
const _: () = assert!(HEADWISE_MODE_FULL as u32 == crate::params::HW_MODE_FULL);
const _: () = assert!(HEADWISE_MODE_STREAMING as u32 == crate::params::HW_MODE_STREAMING);
const _: () = assert!(HEADWISE_DEVICE_TABLE_FIELDS == crate::layout::DeviceTable::FIELDS);

/// A validated segment table of one layer (host memory only). Create with
/// `headwise_layout_create` or `headwise_layout_pack`, free with `headwise_layout_free`.
pub struct HeadwiseLayout {
    pub(super) layout: LayerLayout,
}

pub(super) fn new_layout(out: &mut *mut HeadwiseLayout, layout: LayerLayout) {
    *out = Box::into_raw(Box::new(HeadwiseLayout { layout }));
}

/// Validates a segment table given as parallel arrays and returns it as a layout handle.
///
/// Segment `s = b * kv_heads + h` belongs to sequence `b`, KV head `h`; `num_segments` must be
/// `batch * kv_heads`. All counts are rows of the layer's K (and V) buffer, which holds
/// `total_rows` rows of `head_dim` elements. Per segment: `offset` (first row), `capacity` (rows
/// reserved), `len` (rows in use), `ring_head` (Streaming only: ring slot of the oldest windowed
/// token, 0 until the ring first fills and while it is empty; the array may be NULL for all
/// zeros), `mode`
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
