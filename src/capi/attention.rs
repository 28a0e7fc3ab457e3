//! Decode attention, and attention of a chunk of several queries per sequence, over a cache
//! handle.

use super::args::{handle_mut, product};
use super::cache::{HeadwiseCache, with_cache};
use super::errors::boundary;
use super::store::borrow_in;
use crate::attention::AttentionOptions;
use std::ffi::{c_int, c_void};

/// Decode attention for the layer: for every segment `s` (sequence `b`, KV head `h`), the
/// `group_size` query heads `s * group_size + g` attend over the segment's tokens (Full: its
/// `len` rows; Streaming: sinks + ring). `q` and `out` are `[num_segments * group_size]
/// [head_dim]` (the model's `[batch][heads][head_dim]`) in the cache's dtype, 16-byte aligned;
/// `lse` is NULL or `[num_segments * group_size]` floats (natural-log log-sum-exp, `-inf` for an
/// empty segment, whose output is zeros). `group_size` is 1..=16. `scale` 0 means
/// `1 / sqrt(head_dim)`; `chunk_tokens` 0 lets headwise choose the flash-decoding split (else
/// tokens per chunk). Split scratch memory is kept in the cache and grows on demand (allocated
/// on the stream).
///
/// Asynchronous on a GPU store: returns once the kernels are enqueued on its stream; read `out`
/// and `lse` after synchronizing with it (`headwise_store_synchronize`).
///
/// # Safety
/// `cache` must be NULL or live; `q`, `out`, `lse` NULL or device pointers of the sizes above;
/// `q` written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_attention(
    cache: *mut HeadwiseCache,
    q: *const c_void,
    group_size: usize,
    out: *mut c_void,
    lse: *mut f32,
    scale: f32,
    chunk_tokens: u32,
) -> c_int {
    // SAFETY: the caller's promise on every pointer.
    boundary(|| unsafe { attend(cache, q, 1, group_size, out, lse, &options(scale, chunk_tokens), None) })
}

/// Attention of a chunk of `q_len` new queries per sequence (1..=64): chunked prefill, a
/// follow-up turn, or the verification of speculative draft tokens. The chunk's K/V must be the
/// newest `q_len` tokens of every segment already (`headwise_cache_append_tokens`); drop
/// rejected drafts afterwards with `headwise_cache_rollback`. Causal: chunk query `i` sees the
/// segment's tokens `0 ..= len - q_len + i`. `q` and `out` are token-major,
/// `[batch][q_len][heads][head_dim]` (`heads = kv_heads * group_size`); `lse` NULL or
/// `[batch][q_len][heads]` floats. Otherwise as `headwise_cache_attention`, which is `q_len = 1`.
///
/// Errors before anything is enqueued: those of `headwise_cache_attention`, `q_len` outside
/// 1..=64, and for `q_len > 1` a segment holding fewer than `q_len` tokens or a Streaming
/// segment whose window is below `q_len`.
///
/// # Safety
/// As `headwise_cache_attention`, with the sizes above.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_cache_attention_chunk(
    cache: *mut HeadwiseCache,
    q: *const c_void,
    q_len: usize,
    group_size: usize,
    out: *mut c_void,
    lse: *mut f32,
    scale: f32,
    chunk_tokens: u32,
) -> c_int {
    // SAFETY: the caller's promise on every pointer.
    boundary(|| unsafe { attend(cache, q, q_len, group_size, out, lse, &options(scale, chunk_tokens), None) })
}

/// [`headwise_cache_attention`], adding to `mass[num_mass]` (`total_rows` f32, store memory,
/// one entry per cache row, as the K/V rows) each kept token's attention probability summed over
/// its group's query heads: H2O's accumulated attention mass, for
/// `headwise_cache_evict_by_mass`. Start `mass` from zeros; entries of rows no token occupies are
/// not touched; a Streaming segment's entries follow its ring slots. Other compactions
/// (`headwise_cache_evict`, relayout) do not move `mass`: reset it after them. The mass costs one
/// more read of K (not V) after the attention.
///
/// # Safety
/// As `headwise_cache_attention`, and `mass` NULL or `num_mass` floats of store memory.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_cache_attention_with_mass(
    cache: *mut HeadwiseCache,
    q: *const c_void,
    group_size: usize,
    out: *mut c_void,
    lse: *mut f32,
    scale: f32,
    chunk_tokens: u32,
    mass: *mut f32,
    num_mass: usize,
) -> c_int {
    let opts = options(scale, chunk_tokens);
    // SAFETY: the caller's promise on every pointer.
    boundary(|| unsafe { attend(cache, q, 1, group_size, out, lse, &opts, Some((mass, num_mass))) })
}

/// The C convention for the options: 0 means "headwise chooses" for both.
fn options(scale: f32, chunk_tokens: u32) -> AttentionOptions {
    AttentionOptions {
        scale: (scale != 0.0).then_some(scale),
        chunk_tokens: (chunk_tokens != 0).then_some(chunk_tokens),
    }
}

/// The body of the attention entry points.
///
/// # Safety
/// `headwise_cache_attention_with_mass`'s contract (`headwise_cache_attention_chunk`'s sizes).
#[allow(clippy::too_many_arguments)]
unsafe fn attend(
    cache: *mut HeadwiseCache,
    q: *const c_void,
    q_len: usize,
    group_size: usize,
    out: *mut c_void,
    lse: *mut f32,
    opts: &AttentionOptions,
    mass: Option<(*mut f32, usize)>,
) -> crate::error::Result<()> {
    // SAFETY: the caller's promise on the handle.
    let cache = unsafe { handle_mut(cache, "cache") }?;
    with_cache!(&mut cache.inner, c, ws => {
        let heads = product("num_segments * group_size * q_len", &[c.layout().segments().len(), group_size, q_len])?;
        let n = product("heads * head_dim", &[heads, c.head_dim()])?;
        // SAFETY: the caller's promise on q/out/lse (sizes above).
        let (q, mut out) = unsafe { (borrow_in(c.store(), q, n, "q")?, borrow_in(c.store(), out, n, "out")?) };
        let mut lse = if lse.is_null() {
            None
        } else {
            // SAFETY: as above.
            Some(unsafe { borrow_in::<_, f32>(c.store(), lse.cast_const().cast(), heads, "lse") }?)
        };
        match mass {
            None => c.attention_chunk(&q, q_len, group_size, &mut out, lse.as_mut(), &mut ws.attention, opts),
            Some((ptr, len)) => {
                // SAFETY: the caller's promise on mass.
                let mut mass = unsafe { borrow_in::<_, f32>(c.store(), ptr.cast_const().cast(), len, "mass") }?;
                c.attention_with_mass(&q, group_size, &mut out, lse.as_mut(), &mut ws.attention, opts, &mut mass)
            }
        }
    })
}
