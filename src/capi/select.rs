//! Prefill compression (SnapKV scoring, per-row top-k, gather) into a cache handle.

use super::args::{handle_mut, input, input_struct, out_value, product};
use super::cache::{HeadwiseCache, with_cache};
use super::errors::boundary;
use super::store::CStore;
use crate::cache::LayerCache;
use crate::dtype::KvElem;
use crate::error::{Error, Result};
use crate::select::{
    self, Budgets, GqaReduce, Granularity, Packing, Pool, Prompt, Score, SelectOptions, SelectWorkspace,
};
use crate::store::check_aligned;
use std::ffi::{c_int, c_void};

/// Prefill pooling: max-pool (SnapKV's default).
pub const HEADWISE_POOL_MAX: c_int = 0;
/// Prefill pooling: average-pool, zero padding counted.
pub const HEADWISE_POOL_AVG: c_int = 1;
/// GQA reduction over a group's query heads: mean.
pub const HEADWISE_GQA_MEAN: c_int = 0;
/// GQA reduction over a group's query heads: max.
pub const HEADWISE_GQA_MAX: c_int = 1;
/// One selection per KV head (real memory savings).
pub const HEADWISE_GRANULARITY_KV_HEAD: c_int = 0;
/// One selection per query head, each with its own K/V copy (the papers' G-fold storage).
pub const HEADWISE_GRANULARITY_QUERY_HEAD: c_int = 1;
/// Prefix scores: SnapKV's window attention (the default).
pub const HEADWISE_SCORE_SNAPKV: c_int = 0;
/// Prefix scores: KNorm, `-||k||` per token (query-agnostic: the prompt's `queries` may be NULL).
pub const HEADWISE_SCORE_KNORM: c_int = 1;

/// Options of a prefill compression (`headwise_cache_compress_into*`). Start from
/// `headwise_select_options_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwiseSelectOptions {
    /// Observation window in tokens: the last `window` prompt tokens, always kept, whose queries
    /// score the prefix (1..=q_len; default 32).
    pub window: u32,
    /// Pooling kernel size, odd (default 7; 1 = no pooling).
    pub pool_kernel: u32,
    /// `HEADWISE_POOL_MAX` (default) or `HEADWISE_POOL_AVG`.
    pub pool: c_int,
    /// `HEADWISE_GQA_MEAN` (default) or `HEADWISE_GQA_MAX`.
    pub gqa: c_int,
    /// `HEADWISE_GRANULARITY_KV_HEAD` (default) or `HEADWISE_GRANULARITY_QUERY_HEAD`.
    pub granularity: c_int,
    /// Softmax scale; 0 means `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Tokens per block of the scoring passes; 0 lets headwise choose (a performance knob).
    pub chunk_tokens: u32,
    /// `HEADWISE_SCORE_SNAPKV` (default) or `HEADWISE_SCORE_KNORM`; not used by
    /// `headwise_cache_compress_into_scored`, whose scores are given.
    pub score: c_int,
    /// Attention sinks: the first `sink` tokens of each sequence always kept, ahead of every
    /// score (default 0; budgets must be at least `window + sink`; at most `q_len`).
    pub sink: u32,
}

impl HeadwiseSelectOptions {
    fn to_rust(self) -> Result<SelectOptions> {
        Ok(SelectOptions {
            window: self.window as usize,
            pool_kernel: self.pool_kernel as usize,
            pool: match self.pool {
                HEADWISE_POOL_MAX => Pool::Max,
                HEADWISE_POOL_AVG => Pool::Avg,
                p => return Err(Error::invalid("opts.pool", format!("{p} is not a HEADWISE_POOL_* value"))),
            },
            gqa: match self.gqa {
                HEADWISE_GQA_MEAN => GqaReduce::Mean,
                HEADWISE_GQA_MAX => GqaReduce::Max,
                g => return Err(Error::invalid("opts.gqa", format!("{g} is not a HEADWISE_GQA_* value"))),
            },
            granularity: match self.granularity {
                HEADWISE_GRANULARITY_KV_HEAD => Granularity::KvHead,
                HEADWISE_GRANULARITY_QUERY_HEAD => Granularity::QueryHead,
                g => {
                    return Err(Error::invalid(
                        "opts.granularity",
                        format!("{g} is not a HEADWISE_GRANULARITY_* value"),
                    ));
                }
            },
            scale: (self.scale != 0.0).then_some(self.scale),
            score: match self.score {
                HEADWISE_SCORE_SNAPKV => Score::SnapKv,
                HEADWISE_SCORE_KNORM => Score::KeyNorm,
                s => {
                    return Err(Error::invalid("opts.score", format!("{s} is not a HEADWISE_SCORE_* value")));
                }
            },
            sink: self.sink as usize,
            headroom: 0,
            chunk_tokens: (self.chunk_tokens != 0).then_some(self.chunk_tokens),
        })
    }
}

/// Writes SnapKV's defaults (window 32, max-pool 7, group mean, per KV head, default scale,
/// automatic chunk) to `*out`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_select_options_default(out: *mut HeadwiseSelectOptions) -> c_int {
    boundary(|| {
        let d = SelectOptions::default();
        // SAFETY: the caller's promise on `out`.
        *unsafe { out_value(out, "out") }? = HeadwiseSelectOptions {
            window: d.window as u32,
            pool_kernel: d.pool_kernel as u32,
            pool: HEADWISE_POOL_MAX,
            gqa: HEADWISE_GQA_MEAN,
            granularity: HEADWISE_GRANULARITY_KV_HEAD,
            scale: 0.0,
            chunk_tokens: 0,
            score: HEADWISE_SCORE_SNAPKV,
            sink: 0,
        };
        Ok(())
    })
}

/// One layer's prompt in the store's memory (device memory on a GPU, host memory on the
/// emulator), for prefill compression. Elements are the
/// cache's dtype; buffers 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwisePrompt {
    /// Keys after RoPE, `[batch][kv_heads][q_len][head_dim]` (packed: `[total][kv_heads]
    /// [head_dim]`).
    pub k: *const c_void,
    /// Values, same shape as `k`.
    pub v: *const c_void,
    /// The last `window` queries of every query head, `[batch][kv_heads * group_size][window]
    /// [head_dim]` (query head `h * group_size + g` belongs to KV head `h`); packed: every
    /// token's, `[total][kv_heads * group_size][head_dim]`.
    pub queries: *const c_void,
    /// Sequences.
    pub batch: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Query heads per KV head (1..=16).
    pub group_size: usize,
    /// Prompt tokens per sequence (packed: the longest sequence's).
    pub q_len: usize,
    /// NULL: head-major, every sequence `q_len` tokens. Else the packed (token-major, flash-attn
    /// varlen) form: host memory, `batch + 1` offsets, sequence `b` is tokens `cu_seqlens[b] ..
    /// cu_seqlens[b + 1]`, the first 0, each length at least the window, `total` the last.
    pub cu_seqlens: *const u32,
}

/// The prompt's form with the element counts its buffers must hold: k/v, and the queries
/// when `queries_window` is `Some(window)` (`window` of them per query head head-major, every
/// token's packed), else 0 (they are not read).
///
/// # Safety
/// `p.cu_seqlens` NULL or `batch + 1` readable entries.
unsafe fn prompt_form(
    p: &HeadwisePrompt,
    d: usize,
    queries_window: Option<usize>,
) -> Result<(Packing<'_>, usize, usize)> {
    if p.cu_seqlens.is_null() {
        let kv = product("batch * kv_heads * q_len * head_dim", &[p.batch, p.kv_heads, p.q_len, d])?;
        let qn = match queries_window {
            Some(window) => product(
                "batch * kv_heads * group_size * window * head_dim",
                &[p.batch, p.kv_heads, p.group_size, window, d],
            )?,
            None => 0,
        };
        return Ok((Packing::HeadMajor, kv, qn));
    }
    let entries = p.batch.checked_add(1).ok_or_else(|| Error::invalid("batch", "overflows"))?;
    // SAFETY: the caller's promise on cu_seqlens.
    let cu = unsafe { input(p.cu_seqlens, entries, "prompt.cu_seqlens") }?;
    let total = cu[p.batch] as usize;
    let kv = product("total tokens * kv_heads * head_dim", &[total, p.kv_heads, d])?;
    let qn = match queries_window {
        Some(_) => {
            product("total tokens * kv_heads * group_size * head_dim", &[total, p.kv_heads, p.group_size, d])?
        }
        None => 0,
    };
    Ok((Packing::Varlen { cu_seqlens: cu }, kv, qn))
}

fn compress_typed<S: CStore, T: KvElem>(
    c: &mut LayerCache<S, T>,
    ws: &mut SelectWorkspace<S>,
    p: &HeadwisePrompt,
    opts: &SelectOptions,
    budgets: Budgets<'_>,
    given: Option<(*const f32, usize)>,
) -> Result<()> {
    let d = c.head_dim();
    // Only SnapKV reads the queries; the other scores take none (NULL is fine).
    let reads_queries = given.is_none() && opts.score == Score::SnapKv;
    // SAFETY: HeadwisePrompt's contract on cu_seqlens.
    let (packing, kv, qn) = unsafe { prompt_form(p, d, reads_queries.then_some(opts.window)) }?;
    // The kernels' 16-byte check, made here so the error names the C field (`prompt.k`), not
    // the Rust one (`k`).
    for (field, ptr) in [("prompt.k", p.k), ("prompt.v", p.v), ("prompt.queries", p.queries)] {
        check_aligned(field, ptr.addr() as u64)?;
    }
    // SAFETY: the caller's promise on the prompt's buffers (HeadwisePrompt's shapes).
    let (k, v, queries) = unsafe {
        (
            S::borrow::<T>(p.k, kv, "prompt.k")?,
            S::borrow::<T>(p.v, kv, "prompt.v")?,
            S::borrow::<T>(p.queries, qn, "prompt.queries")?,
        )
    };
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &queries,
        batch: p.batch,
        kv_heads: p.kv_heads,
        group_size: p.group_size,
        q_len: p.q_len,
        head_dim: d,
        packing,
    };
    match given {
        None => select::compress_into(c, &prompt, budgets, opts, ws),
        Some((ptr, len)) => {
            // SAFETY: headwise_cache_compress_into_scored's contract: len f32 of store memory.
            let scores = unsafe { S::borrow::<f32>(ptr.cast(), len, "scores") }?;
            select::compress_into_scored(c, &prompt, &scores, budgets, opts, ws)
        }
    }
}

/// Shared body of the two compression entry points: `adakv` is `(base, floor_alpha)`, else the
/// budgets are `budgets[num_budgets]`.
///
/// # Safety
/// As `headwise_cache_compress_into`.
/// Budgets the device counts after scoring.
enum DeviceBudgets {
    AdaKv(u32, f32),
    Threshold(f32),
}

unsafe fn compress(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    budgets: *const u32,
    num_budgets: usize,
    device_budgets: Option<DeviceBudgets>,
    given: Option<(*const f32, usize)>,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer and length.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let prompt = unsafe { input_struct(prompt, "prompt") }?;
        let opts = if opts.is_null() {
            SelectOptions::default()
        } else {
            unsafe { input_struct(opts, "opts") }?.to_rust()?
        };
        let budgets = match device_budgets {
            Some(DeviceBudgets::AdaKv(base, floor_alpha)) => Budgets::AdaKv { base, floor_alpha },
            Some(DeviceBudgets::Threshold(t)) => Budgets::Threshold(t),
            None => Budgets::PerRow(unsafe { input(budgets, num_budgets, "budgets") }?),
        };
        with_cache!(&mut cache.inner, c, ws => compress_typed(c, &mut ws.select, prompt, &opts, budgets, given))
    })
}

/// Prefill compression of one layer (SnapKV scoring, per-row top-k, gather) into the cache,
/// whose layout must have one Full segment per score row (`batch * kv_heads` rows, or `batch *
/// kv_heads * group_size` with `HEADWISE_GRANULARITY_QUERY_HEAD`) with capacity for
/// `min(budget, q_len)` rows; each segment's `len` becomes that count. `budgets[num_budgets]`
/// holds one budget per row in tokens, window included (uniform, PyramidKV or HeadKV, from the
/// `headwise_budget_*` functions); each at least the window. `opts` NULL means
/// `headwise_select_options_default`.
///
/// Asynchronous on a GPU store: returns once every kernel is enqueued on its stream; the prompt
/// buffers must stay valid until they have run.
///
/// # Safety
/// `cache`, `prompt`, `opts` NULL or valid; the prompt's pointers hold the sizes
/// `HeadwisePrompt` states, written before this call in the stream's order; `budgets` NULL or
/// `num_budgets` readable elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_compress_into(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    budgets: *const u32,
    num_budgets: usize,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { compress(cache, prompt, opts, budgets, num_budgets, None, None) }
}

/// As `headwise_cache_compress_into` with AdaKV budgets allocated on the device after scoring:
/// per sequence, `base` tokens per row on average (window included), of which the share
/// `floor_alpha` (in [0, 1]; the authors use 0.2) is every row's floor and the rest follows the
/// scores. Segment capacities must hold each row's count (at most `q_len`), or the call fails
/// before the gather.
///
/// Synchronous with the stream: the per-row counts come back to the host, so this waits for
/// the scoring kernels to finish before enqueueing the gather.
///
/// # Safety
/// As `headwise_cache_compress_into`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_compress_into_adakv(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    base: u32,
    floor_alpha: f32,
) -> c_int {
    // SAFETY: forwarded.
    unsafe {
        compress(
            cache,
            prompt,
            opts,
            std::ptr::null(),
            0,
            Some(DeviceBudgets::AdaKv(base, floor_alpha)),
            None,
        )
    }
}

/// As `headwise_cache_compress_into` with threshold keep counted on the device after scoring:
/// each row keeps the prefix tokens whose pooled score is at least `threshold` (not NaN; NaN
/// scores never pass, sinks always do) plus the window. Segment capacities must hold each row's
/// count (at most its sequence's length), or the call fails before the gather.
///
/// Synchronous with the stream, as `headwise_cache_compress_into_adakv`.
///
/// # Safety
/// As `headwise_cache_compress_into`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_compress_into_threshold(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    threshold: f32,
) -> c_int {
    // SAFETY: forwarded.
    unsafe {
        compress(cache, prompt, opts, std::ptr::null(), 0, Some(DeviceBudgets::Threshold(threshold)), None)
    }
}

/// As `headwise_cache_compress_into` with the prefix scores given instead of computed: the
/// primitive any score plugs into (a press of the engine's own, KeyDiff, TOVA, a learned one).
/// `scores[num_scores]` is `[rows][q_len - window]` f32 in the store's memory (device memory on
/// a GPU), one per prefix token of each score row, higher keeps; pooled as `opts` says
/// (`pool_kernel` 1 for none), NaN below every number, ties to the lower position; the window
/// is always kept. `opts->score` is not used and the prompt's `queries` may be NULL.
///
/// # Safety
/// As `headwise_cache_compress_into`; `scores` NULL or `num_scores` floats of store memory,
/// written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_compress_into_scored(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    opts: *const HeadwiseSelectOptions,
    scores: *const f32,
    num_scores: usize,
    budgets: *const u32,
    num_budgets: usize,
) -> c_int {
    // SAFETY: forwarded.
    unsafe { compress(cache, prompt, opts, budgets, num_budgets, None, Some((scores, num_scores))) }
}

/// Options of `headwise_cache_expected_attention_scores` (kvpress `ExpectedAttentionPress`).
/// Start from `headwise_expected_attention_options_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwiseExpectedAttentionOptions {
    /// Tokens at the start of each sequence left out of the softmax and always kept (default 4;
    /// below `q_len`).
    pub sink: u32,
    /// Nonzero: multiply by `||v||` after adding `epsilon` (default 1).
    pub use_vnorm: i32,
    /// Added before the value-norm rescaling (default 0.02).
    pub epsilon: f32,
}

/// Writes kvpress's defaults (sink 4, value norm on, epsilon 0.02) to `*out`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_expected_attention_options_default(
    out: *mut HeadwiseExpectedAttentionOptions,
) -> c_int {
    boundary(|| {
        let d = crate::scores::ExpectedAttention::default();
        // SAFETY: the caller's promise on `out`.
        *unsafe { out_value(out, "out") }? = HeadwiseExpectedAttentionOptions {
            sink: d.sink as u32,
            use_vnorm: i32::from(d.use_vnorm),
            epsilon: d.epsilon,
        };
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn expected_attention_typed<S: CStore, T: KvElem>(
    c: &LayerCache<S, T>,
    ws: &mut crate::scores::ScoreWorkspace<S>,
    p: &HeadwisePrompt,
    mean: (*const f32, usize),
    cov: Option<(*const f32, usize)>,
    window: usize,
    opts: &crate::scores::ExpectedAttention,
    scores: (*mut f32, usize),
) -> Result<()> {
    let d = c.head_dim();
    // SAFETY: HeadwisePrompt's contract on cu_seqlens.
    let (packing, kv, _) = unsafe { prompt_form(p, d, None) }?;
    for (field, ptr) in [("prompt.k", p.k), ("prompt.v", p.v)] {
        check_aligned(field, ptr.addr() as u64)?;
    }
    // SAFETY (this block): headwise_cache_expected_attention_scores's contract on every
    // pointer and length (store memory of the stated sizes).
    let (k, v, none, mean, cov, mut out) = unsafe {
        (
            S::borrow::<T>(p.k, kv, "prompt.k")?,
            S::borrow::<T>(p.v, kv, "prompt.v")?,
            S::borrow::<T>(std::ptr::null(), 0, "prompt.queries")?,
            S::borrow::<f32>(mean.0.cast(), mean.1, "mean")?,
            match cov {
                Some((ptr, len)) => Some(S::borrow::<f32>(ptr.cast(), len, "cov")?),
                None => None,
            },
            S::borrow::<f32>(scores.0.cast_const().cast(), scores.1, "scores")?,
        )
    };
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &none,
        batch: p.batch,
        kv_heads: p.kv_heads,
        group_size: p.group_size,
        q_len: p.q_len,
        head_dim: d,
        packing,
    };
    crate::scores::expected_attention(c.store(), &prompt, &mean, cov.as_ref(), window, opts, &mut out, ws)
}

/// Expected Attention scores (kvpress `ExpectedAttentionPress`) of a prompt of this cache's
/// dtype and head_dim, into `scores[num_scores]` (`[batch * kv_heads][q_len - window]` f32, store
/// memory), ready for `headwise_cache_compress_into_scored` (with `pool_kernel` 1, as kvpress).
/// `mean[num_mean]` is `[batch * kv_heads][group_size][head_dim]` f32, the expected query of
/// each query head (kvpress's RoPE-averaged statistics); `cov[num_cov]` the covariance,
/// `[batch * kv_heads][group_size][head_dim][head_dim]` f32, or NULL for none. The prompt's
/// `queries` are not read. `opts` NULL means the defaults. Uses the cache's scratch memory; the
/// cache's contents are not touched.
///
/// # Safety
/// `cache`, `prompt`, `opts` NULL or valid; the prompt's `k`/`v`, `mean`, `cov` and `scores`
/// NULL or store memory of the sizes stated, inputs written before this call in the stream's
/// order.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_cache_expected_attention_scores(
    cache: *mut HeadwiseCache,
    prompt: *const HeadwisePrompt,
    mean: *const f32,
    num_mean: usize,
    cov: *const f32,
    num_cov: usize,
    window: u32,
    opts: *const HeadwiseExpectedAttentionOptions,
    scores: *mut f32,
    num_scores: usize,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let prompt = unsafe { input_struct(prompt, "prompt") }?;
        let opts = if opts.is_null() {
            crate::scores::ExpectedAttention::default()
        } else {
            let o = unsafe { input_struct(opts, "opts") }?;
            crate::scores::ExpectedAttention {
                sink: o.sink as usize,
                use_vnorm: o.use_vnorm != 0,
                epsilon: o.epsilon,
            }
        };
        let cov = (!cov.is_null()).then_some((cov, num_cov));
        with_cache!(&mut cache.inner, c, ws => expected_attention_typed(
            c,
            &mut ws.scores,
            prompt,
            (mean, num_mean),
            cov,
            window as usize,
            &opts,
            (scores, num_scores),
        ))
    })
}
