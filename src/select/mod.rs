//! Prefill compression (SPEC section 3): SnapKV-family scoring, per-segment top-k and gather of
//! the kept rows into a compressed [`LayerCache`]; kernels in `cuda/select.cu`.
//!
//! # Inputs ([`Prompt`])
//! For one layer of a batch of `batch` sequences, the prompt's keys (already RoPE-rotated),
//! values and the queries of the last `window` tokens of every query head (query head `h * G +
//! g` belongs to KV head `h`), in one of two forms ([`Packing`]):
//! - head-major, every sequence `q` tokens: `k`, `v` `[batch][kv_heads][q][head_dim]`, `queries`
//!   `[batch][kv_heads * G][window][head_dim]`;
//! - token-major packed with `cu_seqlens` (flash-attn varlen, FlashInfer ragged), each sequence
//!   its own length `q_b`: `k`, `v` `[total][kv_heads][head_dim]`, `queries` the engine's
//!   `[total][kv_heads * G][head_dim]`. Everything below then holds per sequence with its `q_b`,
//!   in one launch per pass.
//!
//! # What is computed
//! For each (sequence, KV head): window query `i` (position `n + i`, `n = q - window`) against
//! all keys, scaled by `1 / sqrt(head_dim)` (or [`SelectOptions::scale`]), causal only inside the
//! window; f32 softmax over the whole row; the score of prefix token `j < n` is the mean over
//! the window queries, reduced over the group ([`GqaReduce`]) or kept per query head
//! ([`Granularity::QueryHead`]), then pooled ([`Pool`], odd kernel, stride 1, padding k/2).
//! Each score row keeps its `budget - window` best prefix tokens (ties: the lower position wins;
//! NaN scores rank below every number) plus the `window` window tokens, in position order; a
//! budget of at least `q` keeps all `q`. The kept K/V rows are copied into a `Full` segment per
//! row. Budgets count tokens and include the window.
//!
//! The prompt's K is read twice (softmax statistics, then scores); only per-token scores are
//! written between the stages. Selection is deterministic, run after run.
//!
//! # Output layout
//! [`Granularity::KvHead`] (default): one segment per (sequence, KV head), `kv_heads` segments
//! per sequence. [`Granularity::QueryHead`]: one per (sequence, query head), `kv_heads * G` per
//! sequence (the papers' G-times storage; attend with group size 1). Segment `r` holds
//! `min(budget_r, q)` rows and capacity `min(budget_r, q) + headroom`.
//!
//! # Non-finite inputs
//! Not filtered; IEEE arithmetic as in the f64 reference. A NaN in a key makes the softmax sums
//! of every query row that sees it NaN, so all scores of the heads that read it are NaN before
//! pooling. Max-pooling and the group max skip NaN operands (`fmaxf`), so such a head reads
//! `-inf` after max-pooling and NaN after avg-pooling; either way it ranks lowest and the row
//! keeps its lowest positions plus the window. A NaN query poisons its query head's scores; the
//! group mean passes that on to the KV head, the group max drops that query head.

use crate::cache::LayerCache;
use crate::dtype::KvElem;
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::layout::{DeviceTable, LayerLayout, MAX_ROWS, Segment, SegmentMode};
use crate::params::{
    HW_GQA_MAX, HW_GQA_MEAN, HW_POOL_AVG, HW_POOL_MAX, HwLaunch, HwSegmentTable, HwSelectParams,
};
use crate::prompt::Geometry;
pub use crate::prompt::{MAX_GROUP, Packing, Prompt};
use crate::store::{KernelParams, Store, check_aligned, ensure};

mod launch;
use launch::{gather, score_and_select};

// SAFETY: generated from cuda/params.h (repr(C) plain data); every kernel in cuda/select.cu
// takes exactly this struct by value.
unsafe impl KernelParams for HwSelectParams {}
// SAFETY: repr(C) plain data, passed by value as a kernel argument.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwSelectParams {}

const TILE_THREADS: u32 = 128;
const TOP_THREADS: u32 = 256;
const ELEMENTWISE_THREADS: u32 = 256;
const GATHER_ROWS_PER_BLOCK: usize = 64;
/// Blocks per SM the scoring passes aim for when they split the prompt into chunks.
const BLOCKS_PER_SM: usize = 4;

/// Pooling of prefix scores along tokens (SPEC section 3, step 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pool {
    /// `max_pool1d`, stride 1, padding `k/2` (padding never wins: it is -inf).
    #[default]
    Max,
    /// `avg_pool1d`, stride 1, padding `k/2`, zero padding counted (edge scores divided by `k`).
    Avg,
}

/// How the `G` query heads of a group are combined into one KV head's score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GqaReduce {
    /// Mean over the group (the default, as AdaKV's GQA mode and kvpress).
    #[default]
    Mean,
    /// Max over the group.
    Max,
}

/// Which heads select tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Granularity {
    /// One selection per KV head, scores reduced over its group (real memory savings).
    #[default]
    KvHead,
    /// One selection per query head, each with its own K/V copy (`G`x storage): reproduces the
    /// SnapKV/PyramidKV/HeadKV papers for fidelity comparisons.
    QueryHead,
}

/// How prefix tokens are scored before pooling and the per-row top-k.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Score {
    /// SnapKV: attention of the last `window` queries (the default; PyramidKV, HeadKV and AdaKV
    /// budgets all score this way).
    #[default]
    SnapKv,
    /// KNorm (kvpress's `KnormPress`): `-||k||` per token, query-agnostic (`Prompt::queries` may
    /// be empty); kvpress pools nothing, so pair it with `pool_kernel: 1` for its definition.
    KeyNorm,
}

/// Options of [`compress`] (defaults: SnapKV's `window = 32`, max-pool `kernel = 7`, mean over
/// the group, per KV head, no headroom).
#[derive(Clone, Copy, Debug)]
pub struct SelectOptions {
    /// Observation window `W`: the last `W` prompt tokens, always kept, whose queries score the
    /// prefix. `1 <= W <= q`.
    pub window: usize,
    /// Pooling kernel size, odd (1 = no pooling).
    pub pool_kernel: usize,
    /// Pooling kind.
    pub pool: Pool,
    /// Group reduction ([`Granularity::KvHead`] only).
    pub gqa: GqaReduce,
    /// Per KV head or per query head.
    pub granularity: Granularity,
    /// Softmax scale; `None` is `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// How the prefix is scored ([`compress_into_scored`] takes the scores instead).
    pub score: Score,
    /// Attention sinks: the first `sink` tokens of each sequence are always kept, ahead of every
    /// score (StreamingLLM's sinks; kvpress protects them too). Per-row budgets must then be at
    /// least `window + sink`; AdaKV gives every row at least them. At most `q_len`; a sequence
    /// shorter than `window + sink` keeps the sinks its prefix has. Default 0.
    pub sink: usize,
    /// Extra rows reserved per segment of the compressed cache for decoding ([`compress`] only).
    pub headroom: u32,
    /// Forces the prompt chunk (tokens per block) of the scoring passes instead of the planner's
    /// choice; a performance knob that does not change the result beyond f32 rounding.
    pub chunk_tokens: Option<u32>,
}

impl Default for SelectOptions {
    fn default() -> Self {
        SelectOptions {
            window: 32,
            pool_kernel: 7,
            pool: Pool::Max,
            gqa: GqaReduce::Mean,
            granularity: Granularity::KvHead,
            scale: None,
            score: Score::SnapKv,
            sink: 0,
            headroom: 0,
            chunk_tokens: None,
        }
    }
}

/// Per-row budgets, in tokens including the window.
#[derive(Clone, Copy, Debug)]
pub enum Budgets<'a> {
    /// One budget per score row (`[batch][kv_heads]`, or `[batch][kv_heads * G]` per query head):
    /// SnapKV (all equal), PyramidKV (per layer), HeadKV (per head), see [`crate::policy::budget`].
    /// Each must be at least the window.
    PerRow(&'a [u32]),
    /// AdaKV, allocated on the device after scoring: per sequence, the top `rows * (base -
    /// window)` pooled scores across its rows are counted per row (`c_h`), and row `h` keeps
    /// `round_half_even(c_h * (1 - floor_alpha) + floor(floor_alpha * (base - window)))` prefix
    /// tokens (f32, as the authors' torch code), at most all of them, plus the window.
    AdaKv {
        /// Average budget per row, window included (`>= window`).
        base: u32,
        /// Share of the prefix budget every row gets regardless of scores (authors: 0.2), in [0, 1].
        floor_alpha: f32,
    },
    /// Threshold keep, counted on the device after scoring: each row keeps the prefix tokens
    /// whose pooled score is at least `threshold` (NaN never, sinks always), plus the window; the
    /// count varies per row (kvpress's threshold presses, e.g. KVzap's). Not NaN.
    ///
    /// ```
    /// # fn main() -> headwise::Result<()> {
    /// use headwise::select::{self, Budgets, Packing, Prompt, SelectOptions, SelectWorkspace};
    /// use headwise::{EmuStore, LayerCache, LayoutBuilder, Store};
    /// use half::bf16;
    /// let (q_len, d) = (8, 64);
    /// let k = EmuStore.upload(&vec![bf16::ONE; q_len * d])?;
    /// let none = EmuStore.zeros::<bf16>(0)?;
    /// let prompt = Prompt {
    ///     k: &k, v: &k, queries: &none, batch: 1, kv_heads: 1, group_size: 1, q_len,
    ///     head_dim: d, packing: Packing::HeadMajor,
    /// };
    /// // Six prefix tokens scored by the caller; token 0 is a sink.
    /// let scores = EmuStore.upload(&[0.0f32, 0.9, 0.2, 0.5, f32::NAN, 0.5])?;
    /// let opts = SelectOptions { window: 2, pool_kernel: 1, sink: 1, ..SelectOptions::default() };
    /// let layout = LayoutBuilder::new(1, 1).headroom(q_len as u32).full(0, 0, 0).build()?;
    /// let mut cache = LayerCache::new(&EmuStore, layout, d)?;
    /// let mut ws = SelectWorkspace::new();
    /// select::compress_into_scored(&mut cache, &prompt, &scores, Budgets::Threshold(0.5), &opts, &mut ws)?;
    /// assert_eq!(ws.kept(&EmuStore)?, vec![vec![0, 1, 3, 5, 6, 7]]);
    /// # Ok(())
    /// # }
    /// ```
    Threshold(f32),
}

/// Scratch memory of [`compress`], reused across calls and grown on demand. After a call it
/// still holds that call's scores and selections, which [`SelectWorkspace::scores`] and
/// [`SelectWorkspace::kept`] read back (for tests and diagnostics).
pub struct SelectWorkspace<S: Store> {
    stats: Option<S::Buf<f32>>,
    final_stats: Option<S::Buf<f32>>,
    scores: Option<S::Buf<f32>>,
    keys: Option<S::Buf<u32>>,
    budgets: Option<S::Buf<i32>>,
    kept: Option<S::Buf<i32>>,
    /// The prompt's offsets on the store (packed prompts only).
    cu_seqlens: Option<S::Buf<i32>>,
    /// Score rows, their spans and lengths of the last call.
    last: Option<LastCall>,
}

/// What the readbacks of [`SelectWorkspace`] need of the last call: per score row, where its
/// kept positions start and how many tokens it has.
struct LastCall {
    all: Vec<usize>,
    lens: Vec<usize>,
    window: usize,
}

impl<S: Store> Default for SelectWorkspace<S> {
    fn default() -> Self {
        SelectWorkspace {
            stats: None,
            final_stats: None,
            scores: None,
            keys: None,
            budgets: None,
            kept: None,
            cu_seqlens: None,
            last: None,
        }
    }
}

impl<S: Store> SelectWorkspace<S> {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    fn last(&self) -> Result<&LastCall> {
        self.last
            .as_ref()
            .ok_or_else(|| Error::invalid("workspace", "no compression has run in this workspace"))
    }

    /// The pooled f32 scores of the last call, `[rows][q - window]` (rows back to back, each of
    /// its sequence's `q_b - window` with a packed prompt; a NaN key reads as NaN, or `-inf`
    /// where max-pooling skipped it; see the module docs).
    pub fn scores(&self, store: &S) -> Result<Vec<f32>> {
        let last = self.last()?;
        let n: usize = last.lens.iter().map(|l| l - last.window).sum();
        let keys = store.download(self.keys.as_ref().expect("allocated by the last call"))?;
        Ok(keys[..n].iter().map(|&k| key_to_score(k)).collect())
    }

    /// The kept positions of the last call, per row, ascending (positions within the row's
    /// sequence).
    pub fn kept(&self, store: &S) -> Result<Vec<Vec<u32>>> {
        let last = self.last()?;
        let budgets = store.download(self.budgets.as_ref().expect("allocated by the last call"))?;
        let kept = store.download(self.kept.as_ref().expect("allocated by the last call"))?;
        Ok((0..last.lens.len())
            .map(|r| {
                let count = (budgets[r] as usize).min(last.lens[r]);
                kept[last.all[r]..last.all[r] + count].iter().map(|&p| p as u32).collect()
            })
            .collect())
    }
}

/// The kernels' order-preserving key of a score (`order_key` in cuda/topk.cuh): NaN lowest, -0
/// as +0.
pub(crate) fn order_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let b = if x == 0.0 { 0 } else { x.to_bits() };
    if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }
}

/// Inverse of the kernels' order-preserving key (`order_key` in cuda/topk.cuh; -0 reads as +0).
pub(crate) fn key_to_score(key: u32) -> f32 {
    if key == 0 {
        f32::NAN
    } else if key & 0x8000_0000 != 0 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    }
}

/// Validated shapes of one call.
struct Shape {
    geo: Geometry,
    segments: usize,
    rows: usize,
    rows_per_sequence: usize,
    /// Score rows per segment (1, or G per query head).
    per_seg: usize,
    group: usize,
    /// The longest sequence.
    q: usize,
    window: usize,
    sink: usize,
    head_dim: usize,
}

impl Shape {
    /// Tokens of score row `r`'s sequence.
    fn row_len(&self, r: usize) -> usize {
        self.geo.row_len(r, self.per_seg)
    }
}

/// `needs_queries`: whether the scores come from the window queries (SnapKV), else
/// `p.queries` is not read and may be empty.
fn check_prompt<S: Store, T: KvElem>(
    p: &Prompt<'_, S, T>,
    opts: &SelectOptions,
    needs_queries: bool,
) -> Result<Shape> {
    let per_seg = match opts.granularity {
        Granularity::KvHead => 1,
        Granularity::QueryHead => p.group_size,
    };
    let geo = Geometry::new(p, opts.window, per_seg)?;
    if opts.pool_kernel.is_multiple_of(2) {
        return Err(Error::invalid("pool_kernel", format!("{} must be odd", opts.pool_kernel)));
    }
    if opts.pool_kernel > p.q_len {
        // Wider than the prompt changes nothing but can overflow the kernels' int32 radius.
        return Err(Error::invalid("pool_kernel", format!("{} exceeds q_len {}", opts.pool_kernel, p.q_len)));
    }
    if opts.sink > p.q_len {
        return Err(Error::invalid("sink", format!("{} exceeds q_len {}", opts.sink, p.q_len)));
    }
    // Geometry bounded the rows and their entries by int32 rows: every score, key and kept
    // entry index stays below it.
    let segments = geo.segments();
    let (qn, what) = geo.queries_len();
    if needs_queries && S::len(p.queries) != qn {
        return Err(Error::invalid(
            "queries",
            format!("{} elements, expected {what} = {qn}", S::len(p.queries)),
        ));
    }
    Ok(Shape {
        segments,
        rows: segments * per_seg,
        rows_per_sequence: p.kv_heads * per_seg,
        per_seg,
        group: p.group_size,
        q: p.q_len,
        window: opts.window,
        sink: opts.sink,
        head_dim: p.head_dim,
        geo,
    })
}

/// The budgets the host knows before launch (`None` for AdaKV), validated.
fn check_budgets(shape: &Shape, budgets: &Budgets<'_>) -> Result<Option<Vec<u32>>> {
    match *budgets {
        Budgets::PerRow(b) => {
            if b.len() != shape.rows {
                return Err(Error::invalid(
                    "budgets",
                    format!("{} budgets for {} score rows", b.len(), shape.rows),
                ));
            }
            let least = shape.window + shape.sink;
            for (i, &x) in b.iter().enumerate() {
                if (x as usize) < least {
                    return Err(Error::invalid(
                        format!("budgets[{i}]"),
                        format!(
                            "{x} is below window {} + sink {} (budgets include both)",
                            shape.window, shape.sink
                        ),
                    ));
                }
            }
            Ok(Some(b.to_vec()))
        }
        Budgets::AdaKv { base, floor_alpha } => {
            if (base as usize) < shape.window {
                return Err(Error::invalid(
                    "budgets.base",
                    format!("{base} is below the window {} (budgets include the window)", shape.window),
                ));
            }
            if !(0.0..=1.0).contains(&floor_alpha) {
                return Err(Error::invalid(
                    "budgets.floor_alpha",
                    format!("{floor_alpha} is outside [0, 1]"),
                ));
            }
            let bp = base as u64 - shape.window as u64;
            if (shape.rows_per_sequence as u64).saturating_mul(bp) > MAX_ROWS {
                return Err(Error::invalid(
                    "budgets.base",
                    format!("rows * (base - window) exceeds {MAX_ROWS}"),
                ));
            }
            Ok(None)
        }
        Budgets::Threshold(t) => {
            if t.is_nan() {
                return Err(Error::invalid("budgets.threshold", "is NaN"));
            }
            Ok(None)
        }
    }
}

/// The scoring passes' chunk: enough blocks to fill `sm_count` SMs, whole tiles.
fn plan_chunk(shape: &Shape, sm_count: usize, forced: Option<u32>) -> Result<usize> {
    if let Some(c) = forced {
        if c == 0 {
            return Err(Error::invalid("chunk_tokens", "must be at least 1"));
        }
        if shape.q.div_ceil(c as usize) > 65535 {
            return Err(Error::invalid("chunk_tokens", format!("{c} gives more than 65535 chunks")));
        }
        return Ok(c as usize);
    }
    let tile = 8192 / shape.head_dim;
    let tiles = shape.q.div_ceil(tile);
    let want = (sm_count.max(1) * BLOCKS_PER_SM).div_ceil(shape.segments).clamp(1, tiles);
    Ok(tiles.div_ceil(want) * tile)
}

/// Compresses one layer's prompt into a new cache of `Full` segments (see the [module
/// docs](self)). Errors before any launch: shapes and buffer lengths, `window` outside
/// `1..=q`, an even `pool_kernel`, budgets below the window or of the wrong count, AdaKV
/// `floor_alpha` outside [0, 1], a zero or non-finite scale, misaligned buffers, a `headroom`
/// that makes the compressed layer exceed [`MAX_ROWS`] (with AdaKV, whose counts are known
/// only after scoring, a headroom that fits the least it keeps fails after the launches).
pub fn compress<S: Store, T: KvElem>(
    store: &S,
    prompt: &Prompt<'_, S, T>,
    budgets: Budgets<'_>,
    opts: &SelectOptions,
    ws: &mut SelectWorkspace<S>,
) -> Result<LayerCache<S, T>> {
    let shape = check_prompt(prompt, opts, opts.score == Score::SnapKv)?;
    let known = check_budgets(&shape, &budgets)?;
    // The compressed layer must fit int32 rows. Checked before any launch with the counts
    // per-row budgets give, and with AdaKV against the least it keeps (the window per row);
    // AdaKV counts above that are checked again below, after scoring.
    match &known {
        Some(b) => check_packed(
            b.iter().enumerate().map(|(r, &x)| (x as usize).min(shape.row_len(r)) as u64),
            opts.headroom,
        )?,
        None => check_packed(
            (0..shape.rows).map(|r| (shape.window + shape.sink.min(shape.row_len(r) - shape.window)) as u64),
            opts.headroom,
        )?,
    }
    let kept = score_and_select(store, prompt, None, &shape, &budgets, known.as_deref(), opts, ws)?;
    let mut segments = Vec::with_capacity(shape.rows);
    let mut offset: u64 = 0;
    for &count in &kept {
        let capacity = u64::from(count) + u64::from(opts.headroom);
        if offset + capacity > MAX_ROWS {
            return Err(Error::invalid("headroom", format!("the compressed layer exceeds {MAX_ROWS} rows")));
        }
        segments.push(Segment::full(offset as u32, capacity as u32, count));
        offset += capacity;
    }
    let layout = LayerLayout::new(prompt.batch, shape.rows_per_sequence, offset, segments)?;
    let mut cache = LayerCache::new(store, layout, shape.head_dim)?;
    gather(prompt, &shape, opts, ws, &mut cache)?;
    verify("select::compress", prompt, &shape, ws, &cache)?;
    Ok(cache)
}

/// Errors if `counts` rows, each with `headroom` more, exceed [`MAX_ROWS`] in all.
fn check_packed(counts: impl Iterator<Item = u64>, headroom: u32) -> Result<()> {
    let mut total = 0u64;
    for c in counts {
        total += c + u64::from(headroom);
        if total > MAX_ROWS {
            return Err(Error::invalid("headroom", format!("the compressed layer exceeds {MAX_ROWS} rows")));
        }
    }
    Ok(())
}

/// [`compress`] into an existing cache (e.g. engine memory wrapped with
/// [`LayerCache::from_parts`]) whose layout has one `Full` segment per score row, each with
/// capacity for its kept tokens (`min(budget, q)`); their `len` is set to that count, other
/// layout fields are kept. With AdaKV the counts are known only after scoring: a segment too
/// small for its count is an error before the gather.
pub fn compress_into<S: Store, T: KvElem>(
    dest: &mut LayerCache<S, T>,
    prompt: &Prompt<'_, S, T>,
    budgets: Budgets<'_>,
    opts: &SelectOptions,
    ws: &mut SelectWorkspace<S>,
) -> Result<()> {
    compress_into_from(dest, prompt, None, budgets, opts, ws)
}

/// The compression primitive every score plugs into: per-row scores in, per-row top-k (or
/// AdaKV's allocation) with the window always kept, gather into `dest`, as [`compress_into`]
/// but with the scores given instead of computed (`opts.score` is not used; `prompt.queries`
/// is not read and may be empty). `scores` is `[rows][q_len - window]` f32 on the store, one
/// per prefix token of each score row (`batch * kv_heads` rows, `* group_size` with
/// [`Granularity::QueryHead`]), higher keeps; they are pooled as `opts` says (`pool_kernel: 1`
/// for none), NaN ranks below every number and ties go to the lower position, as for the
/// computed scores. Any query-agnostic press (KeyDiff, TOVA, a learned score) is a kernel that
/// writes this buffer.
///
/// ```
/// # fn main() -> headwise::Result<()> {
/// use headwise::select::{self, Budgets, Packing, Prompt, SelectOptions, SelectWorkspace};
/// use headwise::{EmuStore, LayerCache, LayoutBuilder, Store};
/// use half::bf16;
/// let store = EmuStore;
/// let (q_len, d, window) = (6, 64, 2);
/// let k = store.upload(&vec![bf16::ONE; q_len * d])?;
/// let none = store.zeros::<bf16>(0)?;
/// let prompt = Prompt { k: &k, v: &k, queries: &none, batch: 1, kv_heads: 1, group_size: 1, q_len, head_dim: d, packing: Packing::HeadMajor };
/// // Four prefix tokens; keep the best two of them plus the window.
/// let scores = store.upload(&[0.1f32, 0.9, 0.3, 0.8])?;
/// let opts = SelectOptions { window, pool_kernel: 1, ..SelectOptions::default() };
/// let layout = LayoutBuilder::new(1, 1).headroom(4).full(0, 0, 0).build()?;
/// let mut cache = LayerCache::new(&store, layout, d)?;
/// let mut ws = SelectWorkspace::new();
/// select::compress_into_scored(&mut cache, &prompt, &scores, Budgets::PerRow(&[4]), &opts, &mut ws)?;
/// assert_eq!(ws.kept(&store)?, vec![vec![1, 3, 4, 5]]);
/// # Ok(())
/// # }
/// ```
pub fn compress_into_scored<S: Store, T: KvElem>(
    dest: &mut LayerCache<S, T>,
    prompt: &Prompt<'_, S, T>,
    scores: &S::Buf<f32>,
    budgets: Budgets<'_>,
    opts: &SelectOptions,
    ws: &mut SelectWorkspace<S>,
) -> Result<()> {
    compress_into_from(dest, prompt, Some(scores), budgets, opts, ws)
}

fn compress_into_from<S: Store, T: KvElem>(
    dest: &mut LayerCache<S, T>,
    prompt: &Prompt<'_, S, T>,
    given: Option<&S::Buf<f32>>,
    budgets: Budgets<'_>,
    opts: &SelectOptions,
    ws: &mut SelectWorkspace<S>,
) -> Result<()> {
    let shape = check_prompt(prompt, opts, given.is_none() && opts.score == Score::SnapKv)?;
    if dest.head_dim() != shape.head_dim {
        return Err(Error::invalid(
            "dest.head_dim",
            format!("{} differs from the prompt's {}", dest.head_dim(), shape.head_dim),
        ));
    }
    let l = dest.layout();
    if l.batch() != prompt.batch || l.kv_heads() != shape.rows_per_sequence {
        return Err(Error::invalid(
            "dest.layout",
            format!(
                "{} x {} segments, expected batch {} x {} score rows per sequence",
                l.batch(),
                l.kv_heads(),
                prompt.batch,
                shape.rows_per_sequence
            ),
        ));
    }
    // The mode, not `Segment::is_full` (which asks whether a Full segment has no free row).
    if let Some(i) = l.segments().iter().position(|s| s.mode != SegmentMode::Full) {
        return Err(Error::invalid(format!("dest.segments[{i}].mode"), "must be Full"));
    }
    let known = check_budgets(&shape, &budgets)?;
    if let Some(b) = &known {
        check_capacity(l, b.iter().enumerate().map(|(r, &x)| (x as usize).min(shape.row_len(r)) as u32))?;
    }
    let store = dest.store().clone();
    let kept = score_and_select(&store, prompt, given, &shape, &budgets, known.as_deref(), opts, ws)?;
    check_capacity(dest.layout(), kept.iter().copied())?;
    let segments =
        dest.layout().segments().iter().zip(&kept).map(|(s, &len)| Segment { len, ..*s }).collect();
    let layout =
        LayerLayout::new(prompt.batch, shape.rows_per_sequence, dest.layout().total_rows() as u64, segments)?;
    dest.set_layout(layout)?;
    gather(prompt, &shape, opts, ws, dest)?;
    verify("select::compress_into", prompt, &shape, ws, dest)
}

/// The invariant checks ([`crate::invariants`], when enabled): every row's selection (window
/// present, ascending, `min(budget, q)` positions) and every gathered row byte-identical to its
/// prompt row.
fn verify<S: Store, T: KvElem>(
    operation: &'static str,
    prompt: &Prompt<'_, S, T>,
    shape: &Shape,
    ws: &SelectWorkspace<S>,
    dest: &LayerCache<S, T>,
) -> Result<()> {
    if !crate::invariants::enabled() {
        return Ok(());
    }
    let store = dest.store();
    let kept = ws.kept(store)?;
    let budgets = store.download(ws.budgets.as_ref().expect("set by score_and_select"))?;
    let (pk, pv) = (store.download(prompt.k)?, store.download(prompt.v)?);
    let (ck, cv) = (store.download(dest.k())?, store.download(dest.v())?);
    let per_src = shape.rows / shape.segments;
    for (r, (positions, seg)) in kept.iter().zip(dest.layout().segments()).enumerate() {
        let what = format!("row {r}");
        crate::invariants::check_selection(
            operation,
            &what,
            positions,
            shape.row_len(r),
            shape.window,
            budgets[r] as usize,
        )?;
        if seg.len as usize != positions.len() {
            return Err(Error::Invariant {
                operation,
                detail: format!("{what}: segment len {} but {} positions kept", seg.len, positions.len()),
            });
        }
        let src = r / per_src;
        let pairs: Vec<(usize, usize)> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (shape.geo.key_row(src, p as usize), seg.row(i as u32) as usize))
            .collect();
        crate::invariants::check_rows(operation, &format!("{what} K"), &pk, &ck, &pairs, shape.head_dim)?;
        crate::invariants::check_rows(operation, &format!("{what} V"), &pv, &cv, &pairs, shape.head_dim)?;
    }
    Ok(())
}

fn check_capacity(layout: &LayerLayout, counts: impl Iterator<Item = u32>) -> Result<()> {
    for (i, (s, c)) in layout.segments().iter().zip(counts).enumerate() {
        if c > s.capacity {
            return Err(Error::invalid(
                format!("dest.segments[{i}].capacity"),
                format!("{} is below the {c} tokens the row keeps", s.capacity),
            ));
        }
    }
    Ok(())
}
