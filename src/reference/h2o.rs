//! H2O heavy hitters in plain Rust: the accumulated attention mass of one decode step and the
//! eviction by it ([`crate::heavy_hitters`], [`crate::LayerCache::attention_with_mass`]).

use crate::error::{Error, Result};
use crate::heavy_hitters::H2oOptions;
use crate::layout::LayerLayout;

/// Adds one decode step's attention mass, in f64, to `mass` (`[total_rows]`, indexed by cache
/// row): for every segment `s` and every token row `r` of it, the softmax probability
/// (scale `scale`) that each query head `s * G + g`, `g < group_size`, gives the token, summed
/// over the group. `k` is `[total_rows][head_dim]`, `q` `[num_segments * G][head_dim]`.
pub fn attention_mass<T: crate::KvElem>(
    layout: &LayerLayout,
    head_dim: usize,
    k: &[T],
    q: &[T],
    group_size: usize,
    scale: f64,
    mass: &mut [f64],
) {
    let f = |x: T| f64::from(x.to_f32());
    for s in 0..layout.segments().len() {
        let rows = super::token_rows(layout, s);
        if rows.is_empty() {
            continue;
        }
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
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|&l| (l - m).exp()).sum();
            for (&r, &l) in rows.iter().zip(&logits) {
                mass[r as usize] += (l - m).exp() / total;
            }
        }
    }
}

/// The positions a segment of `mass.len()` tokens keeps (`mass` per logical token, oldest
/// first): the `recent` newest, and the `budget - recent` older ones with the most mass (NaN
/// lowest, ties to the lower position), ascending. A segment of at most `budget` tokens keeps
/// all of them.
pub fn h2o_keep(mass: &[f64], budget: usize, recent: usize) -> Vec<usize> {
    let len = mass.len();
    if len <= budget {
        return (0..len).collect();
    }
    super::select_positions(&mass[..len - recent], recent, budget)
}

/// [`crate::heavy_hitters::evict_by_mass`] on host copies: `k`, `v` `[total_rows][head_dim]`,
/// `mass` `[total_rows]`. Every `Full` segment holding more than `budget` tokens keeps
/// [`h2o_keep`]'s positions (by its own tokens' mass), compacted in place in position order (K,
/// V and mass rows), the mass of the freed rows zeroed, `len = budget`. Returns, per segment,
/// the kept positions of the compacted ones.
pub fn h2o_evict<T: Copy>(
    layout: &mut LayerLayout,
    head_dim: usize,
    k: &mut [T],
    v: &mut [T],
    mass: &mut [f32],
    opts: &H2oOptions,
) -> Result<Vec<Option<Vec<usize>>>> {
    opts.validate()?;
    let rows = layout.total_rows();
    if k.len() != rows * head_dim || v.len() != k.len() || mass.len() != rows {
        return Err(Error::invalid("k/v/mass", "must hold total_rows rows"));
    }
    let targets = opts.targets(layout.segments());
    let mut segs = layout.segments().to_vec();
    let mut out = Vec::new();
    for (seg, &target) in segs.iter_mut().zip(&targets) {
        if !target {
            out.push(None);
            continue;
        }
        let off = seg.offset as usize;
        let len = seg.len as usize;
        let m: Vec<f64> = (0..len).map(|i| f64::from(mass[off + i])).collect();
        let kept = h2o_keep(&m, opts.budget, opts.recent);
        for (i, &p) in kept.iter().enumerate() {
            let (to, from) = ((off + i) * head_dim, (off + p) * head_dim);
            k.copy_within(from..from + head_dim, to);
            v.copy_within(from..from + head_dim, to);
            mass[off + i] = mass[off + p];
        }
        mass[off + opts.budget..off + len].fill(0.0);
        seg.len = opts.budget as u32;
        out.push(Some(kept));
    }
    *layout = LayerLayout::new(layout.batch(), layout.kv_heads(), rows as u64, segs)?;
    Ok(out)
}
