//! R-KV decode-time redundancy eviction (SPEC section 4): the CPU reference, in f64.
//!
//! This module is the specification in code for `cuda/redundancy.cu`: every number the kernel
//! computes is defined here, in the order the formulas below state it. A step, per `Full`
//! segment (one KV head of one sequence) holding `len` tokens, with `alpha` the window:
//!
//! * The **window** is the last `alpha` tokens of the segment (positions `n .. len`, `n = len -
//!   alpha`). They are always kept and are never candidates; the `n` older tokens are.
//! * **Importance** `A` ([`rkv_importance`]): the last `nq <= alpha` queries of each of the
//!   group's `G` query heads ([`QueryRing`]) against the `n` candidate keys; logits
//!   `q.k / sqrt(D)`, reduced over the group by max on the raw logits, softmax over the `n`
//!   candidate columns, mean over the `nq` queries, max-pooled over positions with an odd
//!   `kernel`.
//! * **Redundancy** `R` ([`rkv_redundancy`]): cosine similarities of **all** `len` keys
//!   (window included), the diagonal and each row's most recent similar token forgiven, column
//!   mean, softmax over all `len` columns.
//! * **Score** ([`rkv_scores`]) of candidate `j`: `lambda * A_j - (1 - lambda) * R_j`.
//! * **Selection** ([`rkv_select`]): the `budget - alpha` best candidates (ties: lower position;
//!   NaN last) plus the window, in position order.
//! * **Compaction** ([`rkv_step`]): the kept rows move down in place, in position order.
//!
//! # Source
//!
//! Semantics read from the authors' repository `Zefan-Cai/R-KV`: `rkv/utils.py`
//! (`compute_attention_scores`, `cal_similarity`) and `rkv/compression/r1_kv.py`
//! (`R1KV._compute_scores`, `R1KV.update_kv`, `R1KV.should_compact`); the query cache of the
//! HuggingFace integration (`HuggingFace/rkv/modeling*.py`, `LlamaAttention_forward`). Where
//! SPEC section 4 and that code differ, the SPEC wins; each difference is listed here:
//!
//! 1. **Position order.** The authors concatenate the kept candidates in `topk` (score) order
//!    before the window, so after the first eviction a cache index is no longer a position, and
//!    both "most recent" and the pooling neighbourhood of the next eviction refer to that
//!    shuffled order. Here (SPEC) kept tokens are stored in position order, so indices are
//!    always positions.
//! 2. **Fidelity quirk.** In `cal_similarity` a row `i` with no similar token still zeroes
//!    `S[i][0]` (`torch.where(mask, arange, 0)` then `max` yields index 0). Off by default, reproduced
//!    with [`RkvOptions::fidelity_quirk`].
//! 3. **Precision.** The authors cast the mean attention back to the model dtype (f16/bf16)
//!    before pooling and compute the similarities and the final score in that dtype; this reference is f64 throughout, the
//!    kernel f32 (SPEC section 7).
//! 4. **Ties and NaN.** `torch.topk` breaks ties in no fixed order and ranks NaN first; here
//!    ties go to the lower position and NaN ranks last ([`rkv_select`]).
//! 5. **Trigger.** `should_compact` fires when `len >= budget + buffer` *and* the decoded-token
//!    count crosses a multiple of `buffer` *and* the query cache is full. The SPEC keeps only the
//!    length rule (plus caller-forced steps); after an eviction `len == budget`, so in steady
//!    state both fire every `buffer` appends.
//! 6. **Short query history.** The authors seed the query cache with the prompt's last `alpha`
//!    queries, so it is always full; here the importance uses however many queries were pushed
//!    (at least one).
//!
//! Not a difference: the redundancy covers **all** `len` keys, window included, in the SPEC and
//! in the code alike (`_compute_scores` passes the whole key cache to `cal_similarity` and drops
//! the window's entries only afterwards, so they stay in the softmax's denominator).
//!
//! `retain_ratio` in the authors' code only matters for the `*_percent` retain directions; the
//! default direction (`"last"`, the only one here) ignores it.

use crate::KvElem;
use crate::error::{Error, Result};
use crate::layout::LayerLayout;
pub use crate::redundancy::{RkvOptions, RkvTrigger};

/// Cosine similarity a key pair must strictly exceed to count as redundant (`cal_similarity`'s
/// `threshold`).
pub const SIMILARITY_THRESHOLD: f64 = 0.5;

/// Added to each key's L2 norm before normalizing (`k / (||k|| + 1e-8)`), so a zero key has
/// similarity 0 to everything instead of NaN.
pub const NORM_EPS: f64 = 1e-8;

fn f<T: KvElem>(x: T) -> f64 {
    f64::from(x.to_f32())
}

/// Importance `A` of the `n = len - alpha` candidate tokens of one KV head, in f64.
///
/// `k`: the segment's keys in position order, `[len][head_dim]`; `queries`: the most recent
/// `nq` queries of each of the group's `G = group_size` query heads, `[G][nq][head_dim]`, with
/// `1 <= nq <= alpha` (the query order does not matter mathematically). With
/// `scale = 1 / sqrt(head_dim)`, for query `t` and candidate `j < n`:
///
/// * `m[t][j] = max over g of scale * (q[g][t] . k[j])`: the group is reduced on the **raw
///   logits**, before any softmax (the max ignores a NaN operand when the other is a number, as
///   `fmax` does);
/// * `p[t][j] = exp(m[t][j]) / sum over j' < n of exp(m[t][j'])`: the window columns take no
///   part, so no causal mask is needed;
/// * `a[j] = (1 / nq) * sum over t of p[t][j]`;
/// * `A[j] = max of a[j'] over |j' - j| <= kernel / 2, 0 <= j' < n` (`max_pool1d`, stride 1,
///   padding `kernel / 2` that never wins).
///
/// Returns `n` values (empty when `len <= alpha`); with `kernel` 1 they sum to 1.
///
/// # Panics
/// When the shapes disagree (`k` or `queries` not a whole number of rows, no query), or
/// `kernel` is even.
pub fn rkv_importance<T: KvElem>(
    k: &[T],
    queries: &[T],
    group_size: usize,
    head_dim: usize,
    alpha: usize,
    kernel: usize,
) -> Vec<f64> {
    assert!(head_dim > 0 && k.len().is_multiple_of(head_dim), "k must be [len][head_dim]");
    assert!(
        group_size > 0 && queries.len().is_multiple_of(group_size * head_dim),
        "queries must be [G][nq][D]"
    );
    assert!(!kernel.is_multiple_of(2), "kernel must be odd");
    let len = k.len() / head_dim;
    let nq = queries.len() / (group_size * head_dim);
    assert!(nq > 0, "at least one query is needed to score importance");
    let n = len.saturating_sub(alpha);
    if n == 0 {
        return Vec::new();
    }
    let scale = 1.0 / (head_dim as f64).sqrt();
    let row = |buf: &[T], i: usize| -> Vec<f64> {
        buf[i * head_dim..(i + 1) * head_dim].iter().map(|&x| f(x)).collect()
    };
    let keys: Vec<Vec<f64>> = (0..n).map(|j| row(k, j)).collect();
    let qs: Vec<Vec<f64>> = (0..group_size * nq).map(|i| row(queries, i)).collect();
    let mut a = vec![0.0f64; n];
    for t in 0..nq {
        let m: Vec<f64> = keys
            .iter()
            .map(|kj| {
                (0..group_size)
                    .map(|g| scale * qs[g * nq + t].iter().zip(kj).map(|(x, y)| x * y).sum::<f64>())
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        // Subtracting the row max changes nothing mathematically; it keeps exp() finite.
        let top = m.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = m.iter().map(|&x| (x - top).exp()).sum();
        for (aj, &mj) in a.iter_mut().zip(&m) {
            *aj += (mj - top).exp() / total / nq as f64;
        }
    }
    let r = kernel / 2;
    (0..n)
        .map(|j| {
            a[j.saturating_sub(r)..=(j + r).min(n - 1)].iter().copied().fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// Redundancy `R` of all `len` tokens of one KV head, in f64 (`cal_similarity`).
///
/// `k`: the segment's keys in position order, `[len][head_dim]`. All `len` keys take part,
/// the window's included, as rows and as columns:
///
/// 1. `k_hat[i] = k[i] / (||k[i]||_2 + NORM_EPS)`;
/// 2. `S[i][j] = k_hat[i] . k_hat[j]`, and `S[i][i] = 0`;
/// 3. for each row `i`, the most recent similar token `J_i = max { j : S[i][j] > 0.5 }` (any
///    `j`, before or after `i`) is forgiven: `S[i][J_i] = 0`. A row with no such `j` is left
///    alone, unless `fidelity_quirk`, in which case `S[i][0] = 0` (the authors' code);
/// 4. `c[j] = (1 / len) * sum over all rows i of S[i][j]` (the zeroed entries count, so the
///    divisor is always `len`);
/// 5. `R[j] = exp(c[j]) / sum over all j' < len of exp(c[j'])`.
///
/// Returns `len` values summing to 1; a caller scoring candidates uses the first `len - alpha`
/// (the window's values only enter the softmax's denominator).
///
/// Why step 3 makes the most recent copy survive: with copies `a < b < c` of one key (and
/// nothing else similar), rows `a` and `b` forgive `c` and row `c` forgives `b`, so column `c`
/// sums to 0, column `b` to 1 and column `a` to 2: older copies are more redundant.
///
/// # Panics
/// When `k` is not a whole number of rows.
pub fn rkv_redundancy<T: KvElem>(k: &[T], head_dim: usize, fidelity_quirk: bool) -> Vec<f64> {
    assert!(head_dim > 0 && k.len().is_multiple_of(head_dim), "k must be [len][head_dim]");
    let len = k.len() / head_dim;
    if len == 0 {
        return Vec::new();
    }
    let k_hat: Vec<Vec<f64>> = (0..len)
        .map(|i| {
            let v: Vec<f64> = k[i * head_dim..(i + 1) * head_dim].iter().map(|&x| f(x)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / (norm + NORM_EPS)).collect()
        })
        .collect();
    let mut col_sum = vec![0.0f64; len];
    for i in 0..len {
        let mut s: Vec<f64> = (0..len)
            .map(|j| if i == j { 0.0 } else { k_hat[i].iter().zip(&k_hat[j]).map(|(x, y)| x * y).sum() })
            .collect();
        match (0..len).rev().find(|&j| s[j] > SIMILARITY_THRESHOLD) {
            Some(j) => s[j] = 0.0,
            None if fidelity_quirk => s[0] = 0.0,
            None => {}
        }
        for (c, x) in col_sum.iter_mut().zip(&s) {
            *c += x;
        }
    }
    let c: Vec<f64> = col_sum.iter().map(|x| x / len as f64).collect();
    let top = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = c.iter().map(|&x| (x - top).exp()).sum();
    c.iter().map(|&x| (x - top).exp() / total).collect()
}

/// The R-KV score of the `n = len - alpha` candidate tokens of one KV head:
/// `lambda * A[j] - (1 - lambda) * R[j]`, with `A` from [`rkv_importance`] and `R` from
/// [`rkv_redundancy`] (both documented there). Higher is better (kept first).
///
/// `k`: `[len][head_dim]` in position order; `queries`: `[group_size][nq][head_dim]`,
/// `1 <= nq <= opts.alpha`. Uses `opts.alpha`, `kernel`, `lambda`, `fidelity_quirk`.
///
/// # Panics
/// As [`rkv_importance`].
pub fn rkv_scores<T: KvElem>(
    k: &[T],
    queries: &[T],
    group_size: usize,
    head_dim: usize,
    opts: &RkvOptions,
) -> Vec<f64> {
    let a = rkv_importance(k, queries, group_size, head_dim, opts.alpha, opts.kernel);
    let r = rkv_redundancy(k, head_dim, opts.fidelity_quirk);
    a.iter().zip(&r).map(|(a, r)| opts.lambda * a - (1.0 - opts.lambda) * r).collect()
}

/// The positions a segment keeps, in increasing order.
///
/// `scores`: the `n` candidates' scores ([`rkv_scores`]), for positions `0 .. n`; the window is
/// positions `n .. n + window`. When `n + window <= budget` every position is kept. Otherwise
/// the `budget - window` best candidates are kept (higher score first; equal scores: the lower
/// position first; NaN ranks strictly below every number, `-inf` included), then all `window`
/// window positions: exactly `budget` positions.
///
/// The same rule as the prefill selection, [`super::select_positions`].
///
/// # Panics
/// When `budget < window` (the window alone would exceed the budget).
pub fn rkv_select(scores: &[f64], window: usize, budget: usize) -> Vec<usize> {
    assert!(budget >= window, "budget {budget} below window {window}");
    super::select_positions(scores, window, budget)
}

/// A layer's rolling buffer of the last `alpha` queries of every query head (host twin of the
/// device buffer the decode loop updates each step).
///
/// # Device layout
///
/// One buffer of `heads * alpha * head_dim` elements of the KV dtype: query head `h`, slot `s`,
/// element `d` at index `(h * alpha + s) * head_dim + d` ([`QueryRing::data`]). Query head
/// `h = segment * G + g` for member `g` of segment `segment`'s group, the order of the decode
/// attention's `q`. Two integers describe the state, shared by all heads because every decode
/// step pushes one query for every head: `next` (the slot the next push writes, `0 .. alpha`)
/// and `count` (`min(pushes, alpha)`). The host tracks them, as it tracks the layout, and passes
/// them to kernels by value, so no kernel reads state another block is updating.
///
/// A push writes `q[h]` to slot `next` of every head `h`, then `next = (next + 1) % alpha` and
/// `count = min(count + 1, alpha)`. The `count` valid queries of a head, oldest first, sit in
/// slots `(next + alpha - count + t) % alpha`, `t = 0 .. count`. Before `alpha` pushes only the
/// `count` pushed queries exist and scoring uses just those (the reference and the kernel
/// agree on this); slots never written hold zeros and are never read.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryRing<T> {
    heads: usize,
    alpha: usize,
    head_dim: usize,
    next: usize,
    count: usize,
    data: Vec<T>,
}

impl<T: KvElem> QueryRing<T> {
    /// An empty ring for `heads` query heads (all sequences of the layer, `batch * kv_heads *
    /// G`), `alpha` queries per head, `head_dim` elements per query. Errors name a zero size.
    pub fn new(heads: usize, alpha: usize, head_dim: usize) -> Result<QueryRing<T>> {
        for (field, v) in [("heads", heads), ("alpha", alpha), ("head_dim", head_dim)] {
            if v == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        let size = heads
            .checked_mul(alpha)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(|| Error::invalid("heads * alpha * head_dim", "overflows"))?;
        Ok(QueryRing { heads, alpha, head_dim, next: 0, count: 0, data: vec![T::default(); size] })
    }

    /// Query heads.
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Queries kept per head (the ring size).
    pub fn alpha(&self) -> usize {
        self.alpha
    }
    /// Elements per query.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// The slot the next push writes, `0 .. alpha`.
    pub fn next_slot(&self) -> usize {
        self.next
    }
    /// Valid queries per head: `min(pushes, alpha)`.
    pub fn count(&self) -> usize {
        self.count
    }
    /// The raw buffer in the device layout, `[heads][alpha][head_dim]` by slot (not by age).
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// Pushes one decode step's queries, `q`: `[heads][head_dim]`, overwriting each head's
    /// oldest query once the ring is full. Errors when `q` has the wrong length.
    pub fn push(&mut self, q: &[T]) -> Result<()> {
        if q.len() != self.heads * self.head_dim {
            return Err(Error::invalid(
                "q",
                format!("{} elements, expected heads * head_dim = {}", q.len(), self.heads * self.head_dim),
            ));
        }
        let d = self.head_dim;
        for h in 0..self.heads {
            let at = (h * self.alpha + self.next) * d;
            self.data[at..at + d].copy_from_slice(&q[h * d..(h + 1) * d]);
        }
        self.next = (self.next + 1) % self.alpha;
        self.count = (self.count + 1).min(self.alpha);
        Ok(())
    }

    /// The valid queries of query head `head`, oldest first: `[count][head_dim]`.
    ///
    /// # Panics
    /// When `head >= heads`.
    pub fn queries(&self, head: usize) -> Vec<T> {
        assert!(head < self.heads, "head {head} out of {}", self.heads);
        let d = self.head_dim;
        (0..self.count)
            .flat_map(|t| {
                let slot = (self.next + self.alpha - self.count + t) % self.alpha;
                let at = (head * self.alpha + slot) * d;
                self.data[at..at + d].iter().copied()
            })
            .collect()
    }

    /// The valid queries of heads `first .. first + group_size`, oldest first per head:
    /// `[group_size][count][head_dim]`, the `queries` argument of [`rkv_scores`] for segment
    /// `first / group_size`.
    ///
    /// # Panics
    /// When the heads run past `heads`.
    pub fn group(&self, first: usize, group_size: usize) -> Vec<T> {
        (first..first + group_size).flat_map(|h| self.queries(h)).collect()
    }
}

/// One R-KV step for one layer, on host copies: scores, selects and compacts in place every
/// triggered `Full` segment; `Streaming` segments are never compacted.
///
/// `layout`: the layer's segments (`Full` rows in position order); `k`, `v`:
/// `[total_rows][head_dim]` with `head_dim = ring.head_dim()`; `ring`: the layer's query ring,
/// `num_segments * group_size` heads, `alpha == opts.alpha`; segment `s` scores with query heads
/// `s * group_size .. (s + 1) * group_size`.
///
/// For a triggered segment of `len > budget` tokens, `kept = rkv_select(rkv_scores(keys,
/// ring.group(s * G, G), ..), alpha, budget)`; row `offset + i` of K and V then holds what row
/// `offset + kept[i]` held, for `i` in `0 .. budget`, and `len` becomes `budget`. Rows
/// `offset + budget .. offset + old len` keep stale contents (unspecified; nothing reads them).
/// Copying ascending in `i` is safe in place because `kept[i] >= i`; a parallel kernel must
/// not assume that: row `i` may be the source of a lower destination, so it must read every
/// kept row before writing any (or copy in order).
///
/// Returns, per segment, `None` if it was not triggered, else the kept positions (all `0 ..
/// len` when `len <= budget`, with nothing changed). Every error is reported before anything is
/// modified: invalid options, buffer or ring sizes that disagree with the layout, a forced mask
/// of the wrong length or naming a `Streaming` segment, or a segment that needs scoring while
/// the ring holds no query yet.
pub fn rkv_step<T: KvElem>(
    layout: &mut LayerLayout,
    k: &mut [T],
    v: &mut [T],
    ring: &QueryRing<T>,
    group_size: usize,
    opts: &RkvOptions,
    trigger: RkvTrigger<'_>,
) -> Result<Vec<Option<Vec<usize>>>> {
    opts.validate()?;
    let d = ring.head_dim();
    let segs = layout.segments().to_vec();
    if k.len() != layout.total_rows() * d || v.len() != k.len() {
        return Err(Error::invalid("k/v", "must hold total_rows * head_dim elements"));
    }
    if group_size == 0 || ring.heads() != segs.len() * group_size {
        return Err(Error::invalid(
            "ring",
            format!(
                "{} heads, expected num_segments * group_size = {} * {group_size}",
                ring.heads(),
                segs.len()
            ),
        ));
    }
    if ring.alpha() != opts.alpha {
        return Err(Error::invalid("ring", format!("alpha {} != opts.alpha {}", ring.alpha(), opts.alpha)));
    }
    let triggered = trigger.select(&segs, opts)?;
    let needs_scoring = |i: usize| triggered[i] && segs[i].len as usize > opts.budget;
    if ring.count() == 0
        && let Some(i) = (0..segs.len()).find(|&i| needs_scoring(i))
    {
        return Err(Error::invalid(
            "ring",
            format!("segment {i} must be scored but no query has been pushed yet"),
        ));
    }

    let mut out = vec![None; segs.len()];
    let mut new_segs = segs.clone();
    for (i, seg) in segs.iter().enumerate() {
        if !triggered[i] {
            continue;
        }
        let len = seg.len as usize;
        if !needs_scoring(i) {
            out[i] = Some((0..len).collect());
            continue;
        }
        let base = seg.offset as usize * d;
        let scores = rkv_scores(
            &k[base..base + len * d],
            &ring.group(i * group_size, group_size),
            group_size,
            d,
            opts,
        );
        let kept = rkv_select(&scores, opts.alpha, opts.budget);
        for (dst, &src) in kept.iter().enumerate() {
            let from = base + src * d..base + (src + 1) * d;
            k.copy_within(from.clone(), base + dst * d);
            v.copy_within(from, base + dst * d);
        }
        new_segs[i].len = kept.len() as u32;
        out[i] = Some(kept);
    }
    *layout = LayerLayout::new(layout.batch(), layout.kv_heads(), layout.total_rows() as u64, new_segs)?;
    Ok(out)
}
