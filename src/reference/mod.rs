//! Plain CPU reference implementations: the oracle the emulator and GPU results are checked
//! against. Written for obviousness, not speed.

use crate::error::{Error, Result};
use crate::layout::LayerLayout;

pub mod h2o;
pub mod rkv;

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
    layout.advance_all(1);
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
    attention_chunk(layout, head_dim, k, v, q, 1, group_size, scale)
}

/// [`crate::LayerCache::attention_chunk`] in f64: `q_len` queries per sequence, token-major
/// (`q` is `[batch][q_len][heads][head_dim]`), chunk query `i` of segment `s` seeing the
/// segment's logical tokens `0 ..= len - q_len + i`. Returns `out` and `lse` in the same
/// row order (`[batch][q_len][heads]`). Every segment must hold at least `q_len` tokens, except
/// that with `q_len = 1` an empty segment gives zeros and `-inf`.
#[allow(clippy::too_many_arguments)]
pub fn attention_chunk<T: crate::KvElem>(
    layout: &LayerLayout,
    head_dim: usize,
    k: &[T],
    v: &[T],
    q: &[T],
    q_len: usize,
    group_size: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = layout.segments().len();
    let kv_heads = layout.kv_heads();
    let heads = kv_heads * group_size;
    let mut out = vec![0.0; n * group_size * q_len * head_dim];
    let mut lse = vec![f64::NEG_INFINITY; n * group_size * q_len];
    let f = |x: T| f64::from(x.to_f32());
    for s in 0..n {
        let rows = token_rows(layout, s);
        let (b, h) = (s / kv_heads, s % kv_heads);
        for i in 0..q_len {
            // The tokens chunk query i sees: all but the q_len - 1 - i chunk tokens after it.
            let visible = &rows[..(rows.len() + i + 1).saturating_sub(q_len)];
            for g in 0..group_size {
                let qh = (b * q_len + i) * heads + h * group_size + g;
                let qv = &q[qh * head_dim..(qh + 1) * head_dim];
                let logits: Vec<f64> = visible
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
                for (&r, &wi) in visible.iter().zip(&w) {
                    let vr = &v[r as usize * head_dim..(r as usize + 1) * head_dim];
                    for (oj, &vj) in o.iter_mut().zip(vr) {
                        *oj += wi / total * f(vj);
                    }
                }
            }
        }
    }
    (out, lse)
}

pub use crate::select::{GqaReduce, Pool};

/// SnapKV-family prefix scores for one KV head, in f64 (SPEC section 3, steps 1-5).
///
/// `k`: the prompt's `q` keys, `[q][head_dim]`; `queries`: the last `window` queries of each of
/// the group's `G` query heads, `[G][window][head_dim]`. Window query `i` (position
/// `q - window + i`) sees every prefix key and window keys `0..=i`; softmax over the whole row;
/// the score of prefix token `j < q - window` is the mean over the window queries, reduced over
/// the group by `gqa`, then pooled with an odd `kernel`. Returns `q - window` scores.
pub fn snapkv_scores<T: crate::KvElem>(
    k: &[T],
    queries: &[T],
    head_dim: usize,
    window: usize,
    kernel: usize,
    pool: Pool,
    gqa: GqaReduce,
) -> Vec<f64> {
    let q = k.len() / head_dim;
    let g = queries.len() / (window * head_dim);
    let n = q - window;
    let f = |x: T| f64::from(x.to_f32());
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut per_head = vec![vec![0.0f64; n]; g];
    for (h, acc) in per_head.iter_mut().enumerate() {
        for i in 0..window {
            let qv = &queries[(h * window + i) * head_dim..(h * window + i + 1) * head_dim];
            let visible = n + i + 1;
            let logits: Vec<f64> = (0..visible)
                .map(|t| {
                    scale
                        * qv.iter()
                            .zip(&k[t * head_dim..(t + 1) * head_dim])
                            .map(|(&a, &b)| f(a) * f(b))
                            .sum::<f64>()
                })
                .collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|&l| (l - m).exp()).sum();
            for (j, a) in acc.iter_mut().enumerate() {
                *a += (logits[j] - m).exp() / total / window as f64;
            }
        }
    }
    let reduced: Vec<f64> = (0..n)
        .map(|j| match gqa {
            GqaReduce::Mean => per_head.iter().map(|s| s[j]).sum::<f64>() / g as f64,
            GqaReduce::Max => per_head.iter().map(|s| s[j]).fold(f64::NEG_INFINITY, f64::max),
        })
        .collect();
    pool_scores(&reduced, kernel, pool)
}

/// Pooling along tokens (SPEC section 3): stride 1, padding `kernel / 2`; max ignores the
/// padding (and NaN, as the kernels' `fmaxf` does), avg counts the zero padding.
pub fn pool_scores(scores: &[f64], kernel: usize, pool: Pool) -> Vec<f64> {
    let n = scores.len();
    let r = kernel / 2;
    (0..n)
        .map(|j| {
            let lo = j.saturating_sub(r);
            let hi = (j + r).min(n - 1);
            let vals = scores[lo..=hi].iter().copied();
            match pool {
                Pool::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                Pool::Avg => vals.sum::<f64>() / kernel as f64,
            }
        })
        .collect()
}

/// KNorm's scores (kvpress `KnormPress`) of one segment's prompt keys `k` (`[q][head_dim]`):
/// `-||k_j||` for each prefix token `j < q - window`, unpooled.
pub fn knorm_scores<T: crate::KvElem>(k: &[T], head_dim: usize, window: usize) -> Vec<f64> {
    let n = k.len() / head_dim - window;
    (0..n)
        .map(|j| {
            -k[j * head_dim..(j + 1) * head_dim]
                .iter()
                .map(|&x| f64::from(x.to_f32()).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// The positions a segment keeps (SPEC section 3, step 6): the `budget - window` best-scored
/// prefix tokens (ties: the lower position wins) and the `window` window tokens, in position
/// order. A budget of at least `q = scores.len() + window` keeps all `q`. NaN scores rank below
/// every number, `-inf` included (a NaN token is kept only when the budget leaves no better
/// choice), and `-0.0` ties with `0.0`: the order of the kernels' keys (`order_key` in
/// cuda/topk.cuh).
pub fn select_positions(scores: &[f64], window: usize, budget: usize) -> Vec<usize> {
    let n = scores.len();
    if budget >= n + window {
        return (0..n + window).collect();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| rank_cmp(scores[b], scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order[..budget.saturating_sub(window).min(n)].to_vec();
    kept.sort_unstable();
    kept.extend(n..n + window);
    kept
}

/// Sink protection (`SelectOptions::sink`): the first `sink` prefix tokens score `+inf`, so they
/// rank above every score and win ties at `+inf` by their lower positions.
pub fn protect_sinks(scores: &mut [f64], sink: usize) {
    let n = scores.len().min(sink);
    scores[..n].fill(f64::INFINITY);
}

/// Threshold keep (`Budgets::Threshold`): the budget, window included, that keeps the prefix
/// tokens scoring at least `threshold` (NaN never does); [`select_positions`] with it keeps
/// exactly those.
pub fn threshold_budget(scores: &[f64], window: usize, threshold: f64) -> usize {
    window + scores.iter().filter(|&&x| x >= threshold).count()
}

/// Score order of the selections: NaN below everything (`-inf` included), numbers by value
/// (`-0.0 == 0.0`, a tie). The kernels' keys (`order_key` in cuda/topk.cuh) order the same way.
pub(crate) fn rank_cmp(a: f64, b: f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        (false, false) => a.partial_cmp(&b).expect("neither is NaN"),
    }
}

/// AdaKV's budgets for one sequence (SPEC section 3): `scores[h]` are row `h`'s pooled prefix
/// scores (all rows the same length `n`). The top `rows * (base - window)` scores across the
/// rows (ties: lower row, then lower position; NaN lowest) are counted per row (`c_h`); row `h`
/// keeps `round_half_even(c_h * (1 - alpha) + floor(alpha * (base - window)))` prefix tokens,
/// computed in f32 as the authors' torch code, capped at `n`. Returns budgets including the
/// window, as [`crate::select::compress`] keeps them.
pub fn adakv_budgets(scores: &[Vec<f64>], window: usize, base: usize, floor_alpha: f32) -> Vec<usize> {
    let n = scores.first().map_or(0, Vec::len);
    let bp = base - window;
    let total = (scores.len() * bp).min(scores.len() * n);
    let mut all: Vec<(usize, usize)> = (0..scores.len()).flat_map(|h| (0..n).map(move |j| (h, j))).collect();
    all.sort_by(|&(ha, ja), &(hb, jb)| {
        rank_cmp(scores[hb][jb], scores[ha][ja]).then((ha, ja).cmp(&(hb, jb)))
    });
    let mut counts = vec![0usize; scores.len()];
    for &(h, _) in &all[..total] {
        counts[h] += 1;
    }
    let keep = (1.0 - f64::from(floor_alpha)) as f32;
    let floor = (f64::from(floor_alpha) * bp as f64).floor() as f32;
    counts
        .iter()
        .map(|&c| {
            let x = (c as f32 * keep + floor).round_ties_even();
            (x.max(0.0) as usize).min(n) + window
        })
        .collect()
}

/// Expected Attention scores (kvpress `ExpectedAttentionPress`) of one segment: `k`, `v` its
/// prompt rows (`[q][head_dim]`), `mean` `[G][head_dim]` and `cov` `[G][head_dim][head_dim]`
/// (or empty: no covariance term) of its group's query heads. Per head: `mu . k / sqrt(d) +
/// k^T cov k / (2 d)` over keys `sink..q`, softmax over them, mean over the group, `(a + eps) *
/// ||v||` when `use_vnorm`; the `sink` first tokens score `+inf`. Returns the `q - window`
/// prefix scores, in f64.
#[allow(clippy::too_many_arguments)]
pub fn expected_attention_scores<T: crate::KvElem>(
    k: &[T],
    v: &[T],
    mean: &[f32],
    cov: &[f32],
    head_dim: usize,
    window: usize,
    sink: usize,
    epsilon: f32,
    use_vnorm: bool,
) -> Vec<f64> {
    let d = head_dim;
    let q = k.len() / d;
    let g = mean.len() / d;
    let f = |x: T| f64::from(x.to_f32());
    let mut avg = vec![0.0f64; q];
    for h in 0..g {
        let mu = &mean[h * d..(h + 1) * d];
        let logit = |t: usize| -> f64 {
            let kt: Vec<f64> = k[t * d..(t + 1) * d].iter().map(|&x| f(x)).collect();
            let dot: f64 = mu.iter().zip(&kt).map(|(&m, &x)| f64::from(m) * x).sum();
            let quad: f64 = if cov.is_empty() {
                0.0
            } else {
                let c = &cov[h * d * d..(h + 1) * d * d];
                (0..d).map(|i| kt[i] * (0..d).map(|j| f64::from(c[i * d + j]) * kt[j]).sum::<f64>()).sum()
            };
            dot / (d as f64).sqrt() + quad / (2.0 * d as f64)
        };
        let l: Vec<f64> = (0..q).map(|t| if t < sink { f64::NEG_INFINITY } else { logit(t) }).collect();
        let m = l[sink..].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = l[sink..].iter().map(|&x| (x - m).exp()).sum();
        for t in sink..q {
            avg[t] += (l[t] - m).exp() / total / g as f64;
        }
    }
    (0..q - window)
        .map(|t| {
            if t < sink {
                return f64::INFINITY;
            }
            if use_vnorm {
                let vn = v[t * d..(t + 1) * d].iter().map(|&x| f(x).powi(2)).sum::<f64>().sqrt();
                (avg[t] + f64::from(epsilon)) * vn
            } else {
                avg[t]
            }
        })
        .collect()
}
