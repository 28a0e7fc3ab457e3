//! Query-agnostic prompt scores computed on the store, for
//! [`select::compress_into_scored`](crate::select::compress_into_scored): kernels in
//! `cuda/scores.cu`. Each writes the `[batch * kv_heads][q_len - window]` f32 buffer that the
//! selection primitive consumes (per KV head rows).

use crate::dtype::KvElem;
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::params::{HwLaunch, HwScoreParams};
use crate::select::{MAX_GROUP, Prompt};
use crate::store::{KernelParams, Store, check_aligned, ensure};

// SAFETY: generated from cuda/params.h (repr(C) plain data); the kernels in cuda/scores.cu take
// exactly this struct by value.
unsafe impl KernelParams for HwScoreParams {}
#[cfg(feature = "cuda")]
// SAFETY: repr(C) plain data, passed by value as a kernel argument.
unsafe impl cudarc::driver::DeviceRepr for HwScoreParams {}

const LOGIT_THREADS: u32 = 128;
const LOGIT_WARPS: usize = 4;
const FINISH_THREADS: u32 = 256;

/// Options of [`expected_attention`], kvpress's `ExpectedAttentionPress` defaults.
#[derive(Clone, Copy, Debug)]
pub struct ExpectedAttention {
    /// Tokens at the start of each sequence left out of the softmax and always kept (`n_sink`,
    /// default 4); below `q_len`.
    pub sink: usize,
    /// Multiply by `||v||` after adding `epsilon` (`use_vnorm`, default true).
    pub use_vnorm: bool,
    /// Added to the averaged attention before the value-norm rescaling (default 0.02, the value
    /// kvpress's evaluation uses).
    pub epsilon: f32,
}

impl Default for ExpectedAttention {
    fn default() -> Self {
        ExpectedAttention { sink: 4, use_vnorm: true, epsilon: 0.02 }
    }
}

/// Scratch of [`expected_attention`]: the per-query-head logits, grown on demand.
pub struct ScoreWorkspace<S: Store> {
    logits: Option<S::Buf<f32>>,
}

impl<S: Store> Default for ScoreWorkspace<S> {
    fn default() -> Self {
        ScoreWorkspace { logits: None }
    }
}

impl<S: Store> ScoreWorkspace<S> {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Expected Attention (kvpress `ExpectedAttentionPress`, Devoto et al. 2025): the attention
/// future queries are expected to pay each prompt key, from the query distribution's mean `mean`
/// (`[batch * kv_heads][group_size][head_dim]` f32, the already RoPE-averaged statistics kvpress
/// computes) and covariance `cov` (`[batch * kv_heads][group_size][head_dim][head_dim]` f32, or
/// `None` for `use_covariance = false`). Per query head, `mu . k / sqrt(d) + k^T cov k / (2 d)`
/// over the non-sink keys, softmax, mean over the group, then `(a + epsilon) * ||v||`; sinks
/// score `+inf`. Writes `scores`: `[batch * kv_heads][q_len - window]` f32, ready for
/// [`select::compress_into_scored`](crate::select::compress_into_scored) (use `pool_kernel: 1`:
/// kvpress does not pool). `prompt.queries` is not read.
///
/// ```
/// # fn main() -> headwise::Result<()> {
/// use headwise::scores::{self, ExpectedAttention, ScoreWorkspace};
/// use headwise::select::Prompt;
/// use headwise::{EmuStore, Store};
/// use half::bf16;
/// let store = EmuStore;
/// let (q_len, d, window) = (8, 64, 2);
/// let k = store.upload(&vec![bf16::ONE; q_len * d])?;
/// let none = store.zeros::<bf16>(0)?;
/// let prompt = Prompt { k: &k, v: &k, queries: &none, batch: 1, kv_heads: 1, group_size: 1, q_len, head_dim: d };
/// let mean = store.upload(&vec![0.1f32; d])?;
/// let mut out = store.zeros::<f32>(q_len - window)?;
/// let opts = ExpectedAttention { sink: 1, ..ExpectedAttention::default() };
/// scores::expected_attention(&store, &prompt, &mean, None, window, &opts, &mut out, &mut ScoreWorkspace::new())?;
/// let s = store.download(&out)?;
/// assert!(s[0].is_infinite() && s[1..].iter().all(|&x| x == s[1]));
/// # Ok(())
/// # }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn expected_attention<S: Store, T: KvElem>(
    store: &S,
    prompt: &Prompt<'_, S, T>,
    mean: &S::Buf<f32>,
    cov: Option<&S::Buf<f32>>,
    window: usize,
    opts: &ExpectedAttention,
    scores: &mut S::Buf<f32>,
    ws: &mut ScoreWorkspace<S>,
) -> Result<()> {
    let p = prompt;
    crate::dtype::check_head_dim(p.head_dim)?;
    if p.batch == 0 || p.kv_heads == 0 {
        return Err(Error::invalid("batch", "batch and kv_heads must be at least 1"));
    }
    if p.group_size == 0 || p.group_size > MAX_GROUP {
        return Err(Error::invalid("group_size", format!("{} is outside 1..={MAX_GROUP}", p.group_size)));
    }
    if window == 0 || window > p.q_len {
        return Err(Error::invalid("window", format!("{window} is outside 1..=q_len {}", p.q_len)));
    }
    if opts.sink >= p.q_len {
        return Err(Error::invalid("sink", format!("{} leaves no key below q_len {}", opts.sink, p.q_len)));
    }
    if !opts.epsilon.is_finite() {
        return Err(Error::invalid("epsilon", format!("{} is not finite", opts.epsilon)));
    }
    let d = p.head_dim;
    let too_big = || {
        Error::invalid(
            "batch",
            format!("batch * kv_heads * group_size * q_len * head_dim^2 exceeds {}", crate::layout::MAX_ROWS),
        )
    };
    let segments = p.batch.checked_mul(p.kv_heads).ok_or_else(too_big)?;
    let heads = segments.checked_mul(p.group_size).ok_or_else(too_big)?;
    let logits =
        heads.checked_mul(p.q_len).filter(|&x| x as u64 <= crate::layout::MAX_ROWS).ok_or_else(too_big)?;
    let kv = segments.checked_mul(p.q_len).and_then(|x| x.checked_mul(d)).ok_or_else(too_big)?;
    for (field, len) in [("k", S::len(p.k)), ("v", S::len(p.v))] {
        if len != kv {
            return Err(Error::invalid(
                field,
                format!("{len} elements, expected batch * kv_heads * q_len * head_dim = {kv}"),
            ));
        }
    }
    if S::len(mean) != heads * d {
        return Err(Error::invalid(
            "mean",
            format!(
                "{} elements, expected batch * kv_heads * group_size * head_dim = {}",
                S::len(mean),
                heads * d
            ),
        ));
    }
    if let Some(c) = cov {
        let want = heads.checked_mul(d * d).ok_or_else(too_big)?;
        if S::len(c) != want {
            return Err(Error::invalid(
                "cov",
                format!(
                    "{} elements, expected batch * kv_heads * group_size * head_dim^2 = {want}",
                    S::len(c)
                ),
            ));
        }
    }
    let n = p.q_len - window;
    if S::len(scores) != segments * n {
        return Err(Error::invalid(
            "scores",
            format!(
                "{} elements, expected batch * kv_heads * (q_len - window) = {}",
                S::len(scores),
                segments * n
            ),
        ));
    }
    ensure(store, &mut ws.logits, logits)?;
    let dt = T::DTYPE.name();
    let logits_k = lookup(&format!("hw_scores_ea_logits_{dt}_d{d}"), "head_dim")?;
    let finish_k = lookup(&format!("hw_scores_ea_finish_{dt}_d{d}"), "head_dim")?;
    let null = std::ptr::null_mut::<f32>();
    let mut params = HwScoreParams {
        k: std::ptr::null(),
        v: std::ptr::null(),
        mean: null,
        cov: null,
        logits: null,
        scores: null,
        num_segments: segments as i32,
        group_size: p.group_size as i32,
        head_dim: d as i32,
        q_len: p.q_len as i32,
        window: window as i32,
        sink: opts.sink as i32,
        epsilon: opts.epsilon,
        use_vnorm: i32::from(opts.use_vnorm),
    };
    let mut pins = S::Pins::default();
    params.k = store.addr("k", p.k, &mut pins)? as *const _;
    params.v = store.addr("v", p.v, &mut pins)? as *const _;
    params.mean = store.addr("mean", mean, &mut pins)? as *const f32;
    if let Some(c) = cov {
        params.cov = store.addr("cov", c, &mut pins)? as *const f32;
    }
    params.logits = store.addr_mut("logits", ws.logits.as_mut().expect("ensured"), &mut pins)? as *mut f32;
    params.scores = store.addr_mut("scores", scores, &mut pins)? as *mut f32;
    check_aligned("k", params.k as u64)?;
    check_aligned("v", params.v as u64)?;
    let y = p.q_len.div_ceil(LOGIT_WARPS);
    if y > 65535 {
        return Err(Error::invalid(
            "q_len",
            format!("{} tokens exceed the {} a launch covers", p.q_len, 65535 * LOGIT_WARPS),
        ));
    }
    let cfg = HwLaunch { grid_y: y as u32, ..launch_1d(segments, LOGIT_THREADS, 0) };
    // SAFETY: addresses from this store, pinned until the end of the function; k/v hold
    // segments * q_len rows, mean/cov/logits/scores the sizes checked above; the kernels index
    // only below those (segment < num_segments, token < q_len, head < segments * G <= 16 each).
    unsafe { store.launch(logits_k, &cfg, &params)? };
    // SAFETY: as above.
    unsafe { store.launch(finish_k, &launch_1d(segments, FINISH_THREADS, 0), &params)? };
    drop(pins);
    Ok(())
}
