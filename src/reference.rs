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

/// Decode attention in f64 over the same logical tokens as [`crate::LayerCache::attention`]:
/// returns (`out` as f64, natural-log `lse`), each `[num_segments * group_size]` heads
/// (`out` with `head_dim` values per head). An empty segment gives zeros and `-inf`.
pub fn attention<T: crate::KvElem>(
    layout: &LayerLayout,
    head_dim: usize,
    k: &[T],
    v: &[T],
    q: &[T],
    group_size: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = layout.segments().len();
    let mut out = vec![0.0; n * group_size * head_dim];
    let mut lse = vec![f64::NEG_INFINITY; n * group_size];
    let f = |x: T| f64::from(x.to_f32());
    for s in 0..n {
        let rows = token_rows(layout, s);
        for g in 0..group_size {
            let qh = s * group_size + g;
            let qv = &q[qh * head_dim..(qh + 1) * head_dim];
            let logits: Vec<f64> = rows
                .iter()
                .map(|&r| {
                    let kr = &k[r as usize * head_dim..(r as usize + 1) * head_dim];
                    scale * qv.iter().zip(kr).map(|(&a, &b)| f(a) * f(b)).sum::<f64>()
                })
                .collect();
            if logits.is_empty() {
                continue;
            }
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
            let total: f64 = w.iter().sum();
            lse[qh] = m + total.ln();
            let o = &mut out[qh * head_dim..(qh + 1) * head_dim];
            for (&r, &wi) in rows.iter().zip(&w) {
                let vr = &v[r as usize * head_dim..(r as usize + 1) * head_dim];
                for (oj, &vj) in o.iter_mut().zip(vr) {
                    *oj += wi / total * f(vj);
                }
            }
        }
    }
    (out, lse)
}
