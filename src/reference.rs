//! Plain CPU reference implementations: the oracle the emulator and GPU results are checked
//! against. Written for obviousness, not speed.

use crate::error::{Error, Result};
use crate::layout::LayerLayout;

/// Appends one token per segment to host copies of the K/V buffers, exactly as
/// [`crate::LayerCache::append`] specifies: `k`/`v` are `[total_rows][head_dim]`,
/// `k_new`/`v_new` are `[num_segments][head_dim]`. Updates `layout`.
pub fn append<T: Copy>(
    layout: &mut LayerLayout,
    head_dim: usize,
    k: &mut [T],
    v: &mut [T],
    k_new: &[T],
    v_new: &[T],
) -> Result<()> {
    let n = layout.segments().len();
    if k.len() != layout.total_rows() * head_dim || v.len() != k.len() {
        return Err(Error::invalid("k/v", "must hold total_rows * head_dim elements"));
    }
    if k_new.len() != n * head_dim || v_new.len() != k_new.len() {
        return Err(Error::invalid("k_new/v_new", "must hold num_segments * head_dim elements"));
    }
    layout.check_appendable()?;
    for (s, seg) in layout.segments().iter().enumerate() {
        let row = seg.append_row().expect("checked appendable") as usize;
        let (dst, src) = (row * head_dim..(row + 1) * head_dim, s * head_dim..(s + 1) * head_dim);
        k[dst.clone()].copy_from_slice(&k_new[src.clone()]);
        v[dst].copy_from_slice(&v_new[src]);
    }
    layout.advance_all();
    Ok(())
}

/// The rows of one segment's tokens, oldest first.
pub fn token_rows(layout: &LayerLayout, segment: usize) -> Vec<u64> {
    let s = &layout.segments()[segment];
    (0..s.len).map(|i| s.row(i)).collect()
}
