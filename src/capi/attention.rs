//! Decode attention over a cache handle.

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
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let opts = AttentionOptions {
            scale: (scale != 0.0).then_some(scale),
            chunk_tokens: (chunk_tokens != 0).then_some(chunk_tokens),
        };
        with_cache!(&mut cache.inner, c, ws => {
            let heads = product("num_segments * group_size", &[c.layout().segments().len(), group_size])?;
            let n = product("heads * head_dim", &[heads, c.head_dim()])?;
            // SAFETY: the caller's promise on q/out/lse (sizes above).
            let (q, mut out) = unsafe { (borrow_in(c.store(), q, n, "q")?, borrow_in(c.store(), out, n, "out")?) };
            let mut lse = if lse.is_null() {
                None
            } else {
                // SAFETY: as above.
                Some(unsafe { borrow_in::<_, f32>(c.store(), lse.cast_const().cast(), heads, "lse") }?)
            };
            c.attention(&q, group_size, &mut out, lse.as_mut(), &mut ws.attention, &opts)
        })
    })
}
