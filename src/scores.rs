//! Query-agnostic prompt scores computed on the store, for
//! [`select::compress_into_scored`](crate::select::compress_into_scored): kernels in
//! `cuda/scores.cu`. Each writes the `[batch * kv_heads][q_len - window]` f32 buffer that the
//! selection primitive consumes (per KV head rows).

use crate::dtype::KvElem;
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::params::{HwLaunch, HwScoreParams};
use crate::prompt::{Geometry, Prompt};
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
    /// The prompt's offsets on the store (packed prompts only).
    cu_seqlens: Option<S::Buf<i32>>,
}

impl<S: Store> Default for ScoreWorkspace<S> {
    fn default() -> Self {
        ScoreWorkspace { logits: None, cu_seqlens: None }
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
/// score `+inf`. Writes `scores`: `[batch * kv_heads][q_len - window]` f32 (with a packed
/// prompt, [`Packing::Varlen`](crate::prompt::Packing), each row has its sequence's `q_b -
/// window`, rows back to back), ready for
/// [`select::compress_into_scored`](crate::select::compress_into_scored) (use `pool_kernel: 1`:
/// kvpress does not pool). `prompt.queries` is not read.
///
/// ```
/// # fn main() -> headwise::Result<()> {
/// use headwise::scores::{self, ExpectedAttention, ScoreWorkspace};
/// use headwise::select::{Packing, Prompt};
/// use headwise::{EmuStore, Store};
/// use half::bf16;
/// let store = EmuStore;
/// let (q_len, d, window) = (8, 64, 2);
/// let k = store.upload(&vec![bf16::ONE; q_len * d])?;
/// let none = store.zeros::<bf16>(0)?;
/// let prompt = Prompt { k: &k, v: &k, queries: &none, batch: 1, kv_heads: 1, group_size: 1, q_len, head_dim: d, packing: Packing::HeadMajor };
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
    // Logits: one row per query head.
    let geo = Geometry::new(p, window, p.group_size)?;
    if opts.sink >= p.q_len {
        return Err(Error::invalid("sink", format!("{} leaves no key below q_len {}", opts.sink, p.q_len)));
    }
    if geo.min_len() <= opts.sink {
        return Err(Error::invalid(
            "sink",
            format!("{} leaves no key in the shortest sequence, of {} tokens", opts.sink, geo.min_len()),
        ));
    }
    if !opts.epsilon.is_finite() {
        return Err(Error::invalid("epsilon", format!("{} is not finite", opts.epsilon)));
    }
    let d = p.head_dim;
    let segments = geo.segments();
    let heads = segments * p.group_size;
    // Geometry bounded the logits' entries by int32 rows.
    let logits = geo.all_entries(p.group_size);
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
        let want = heads
            .checked_mul(d * d)
            .ok_or_else(|| Error::invalid("cov", "batch * kv_heads * group_size * head_dim^2 overflows"))?;
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
    let n = geo.prefix_entries(1);
    if S::len(scores) != n {
        return Err(Error::invalid(
            "scores",
            format!(
                "{} elements, expected {n}: one per prefix token (q_len - window) of each of the {segments} rows",
                S::len(scores),
            ),
        ));
    }
    ensure(store, &mut ws.logits, logits)?;
    geo.upload(store, &mut ws.cu_seqlens)?;
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
        prompt: geo.params(std::ptr::null()),
        num_segments: segments as i32,
        head_dim: d as i32,
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
    if let Some(cu) = &ws.cu_seqlens {
        params.prompt = geo.params(store.addr("cu_seqlens", cu, &mut pins)? as *const i32);
    }
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
    // SAFETY: addresses from this store, pinned until the end of the function; k/v hold every
    // sequence's rows (Geometry checked the lengths against cu_seqlens or batch * q_len),
    // mean/cov/logits/scores the sizes checked above; the kernels index only below those
    // (segment < num_segments, token < its sequence's length, G <= 16 heads per segment).
    unsafe { store.launch(logits_k, &cfg, &params)? };
    // SAFETY: as above.
    unsafe { store.launch(finish_k, &launch_1d(segments, FINISH_THREADS, 0), &params)? };
    drop(pins);
    Ok(())
}
