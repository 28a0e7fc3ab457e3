//! "Nothing lost" checks after every compaction, as a debug mode users can switch on.
//!
//! When enabled, [`crate::select::compress`], [`crate::select::compress_into`],
//! [`crate::redundancy::evict`], [`crate::heavy_hitters::evict_by_mass`] and
//! [`crate::LayerCache::regrow`] verify their result on the
//! host after the launch and return [`Error::Invariant`] if a guarantee is broken:
//! - a selection is ascending, holds every window token, and has exactly `min(budget, len)`
//!   positions ([`check_selection`]);
//! - every kept row is byte-identical to the row it came from ([`check_rows`]);
//! - regrow keeps every segment's tokens (Streaming sinks and ring included) byte for byte.
//!
//! The checks download the buffers involved (and, for R-KV, snapshot the segments before the
//! in-place compaction), so they cost a device synchronization and O(rows) host work per call:
//! a debug mode, off by default. Turn it on with [`set_enabled`] or the environment variable
//! `HEADWISE_CHECK_INVARIANTS=1` (read once, at the first call).

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not decided yet (read the environment), 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Switches the checks on or off for the whole process (overrides the environment variable).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether the checks run.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("HEADWISE_CHECK_INVARIANTS").is_ok_and(|v| v == "1");
            set_enabled(on);
            on
        }
        s => s == 2,
    }
}

/// Checks one selection: `kept` ascending, `min(budget, len)` positions, all below `len`, and
/// the `window` newest positions (`len - window .. len`) present. `what` names the row in
/// the error.
pub fn check_selection(
    operation: &'static str,
    what: &str,
    kept: &[u32],
    len: usize,
    window: usize,
    budget: usize,
) -> Result<()> {
    let fail = |detail: String| Err(Error::Invariant { operation, detail: format!("{what}: {detail}") });
    if kept.len() != budget.min(len) {
        return fail(format!("{} positions kept, expected min(budget {budget}, len {len})", kept.len()));
    }
    if let Some(w) = kept.windows(2).find(|w| w[0] >= w[1]) {
        return fail(format!("positions not strictly ascending ({} then {})", w[0], w[1]));
    }
    if let Some(&p) = kept.last()
        && p as usize >= len
    {
        return fail(format!("position {p} is past len {len}"));
    }
    // Ascending and in range: the window is present iff the last `window` entries are it.
    let w = window.min(kept.len());
    if kept[kept.len() - w..].iter().zip(len - w..len).any(|(&k, t)| k as usize != t) {
        return fail(format!("a window token of {}..{len} is missing", len - w));
    }
    Ok(())
}

/// Checks that, for every pair `(from, to)`, row `to` of `dst` equals row `from` of `src`, rows
/// of `row_len` elements compared bit for bit.
pub fn check_rows<T: bytemuck::Pod>(
    operation: &'static str,
    what: &str,
    src: &[T],
    dst: &[T],
    pairs: &[(usize, usize)],
    row_len: usize,
) -> Result<()> {
    for &(f, t) in pairs {
        let (a, b) = (&src[f * row_len..(f + 1) * row_len], &dst[t * row_len..(t + 1) * row_len]);
        if bytemuck::cast_slice::<T, u8>(a) != bytemuck::cast_slice::<T, u8>(b) {
            return Err(Error::Invariant {
                operation,
                detail: format!("{what}: row {t} differs from its source row {f}"),
            });
        }
    }
    Ok(())
}
