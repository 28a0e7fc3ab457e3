//! Cache handles: one layer's ragged K/V cache over caller memory, with the scratch memory its
//! operations reuse; creation, append and relayout.

use super::args::{dtype_of, free_handle, handle, handle_mut, input, out_handle, product};
use super::errors::boundary;
use super::layout::{HeadwiseLayout, new_layout};
use super::store::{Backend, CStore, HeadwiseStore, borrow_in};
use crate::attention::AttentionWorkspace;
use crate::cache::LayerCache;
use crate::dtype::{DType, KvElem, check_head_dim};
#[cfg(feature = "emulator")]
use crate::emu::EmuStore;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpu::GpuStore;
use crate::layout::LayerLayout;
use crate::redundancy::RkvWorkspace;
use crate::select::SelectWorkspace;
use crate::store::Store;
use half::{bf16, f16};
use std::ffi::{c_int, c_void};

/// A cache of one dtype in store `S`.
pub(super) enum Kv<S: Store> {
    F16(LayerCache<S, f16>),
    Bf16(LayerCache<S, bf16>),
}

/// The scratch memory the operations over one cache reuse across calls.
pub(super) struct Workspaces<S: Store> {
    pub(super) attention: AttentionWorkspace<S>,
    pub(super) select: SelectWorkspace<S>,
    pub(super) rkv: RkvWorkspace<S>,
    pub(super) scores: crate::scores::ScoreWorkspace<S>,
    pub(super) h2o: crate::heavy_hitters::H2oWorkspace<S>,
}

pub(super) struct Cache<S: Store> {
    pub(super) kv: Kv<S>,
    pub(super) ws: Workspaces<S>,
}

// One variant per handle, behind the handle's Box: the GPU variant's size costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum CacheInner {
    #[cfg(feature = "cuda")]
    Gpu(Cache<GpuStore>),
    #[cfg(feature = "emulator")]
    Emulator(Cache<EmuStore>),
}

impl CacheInner {
    fn is_gpu(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            CacheInner::Gpu(_) => true,
            #[cfg(feature = "emulator")]
            CacheInner::Emulator(_) => false,
        }
    }
}

/// One layer's ragged K/V cache in the caller's memory (device memory on a GPU store, host
/// memory on the emulator): the caller's K and V buffers, the host layout, headwise's copy of
/// the segment table in the store, and the scratch memory the operations reuse. Create with
/// `headwise_cache_create`, free with `headwise_cache_free`.
pub struct HeadwiseCache {
    pub(super) inner: CacheInner,
}

/// Runs `$body` with `$c` bound to the handle's typed `LayerCache<S, T>` and `$ws` to its
/// `Workspaces<S>`, for each store and dtype; on the GPU with the caller's CUDA context kept.
macro_rules! with_cache {
    ($inner:expr, $c:ident, $ws:ident => $body:expr) => {{
        use $crate::capi::cache::{Cache, CacheInner, Kv};
        match $inner {
            #[cfg(feature = "cuda")]
            CacheInner::Gpu(Cache { kv, ws: $ws }) => {
                let _keep = $crate::capi::store::KeepCurrentContext::new();
                match kv {
                    Kv::F16($c) => $body,
                    Kv::Bf16($c) => $body,
                }
            }
            #[cfg(feature = "emulator")]
            CacheInner::Emulator(Cache { kv, ws: $ws }) => match kv {
                Kv::F16($c) => $body,
                Kv::Bf16($c) => $body,
            },
        }
    }};
}
pub(super) use with_cache;

fn wrap_cache<S: CStore, T: KvElem>(
    store: &S,
    layout: &LayerLayout,
    head_dim: usize,
    k: *mut c_void,
    v: *mut c_void,
) -> Result<LayerCache<S, T>> {
    let elems = product("total_rows * head_dim", &[layout.total_rows(), head_dim])?;
    // SAFETY: headwise_cache_create's contract: k and v hold total_rows * head_dim elements
    // of this dtype in the store's memory for the cache's lifetime.
    let (k, v) = unsafe { (S::borrow::<T>(k, elems, "k")?, S::borrow::<T>(v, elems, "v")?) };
    LayerCache::from_parts(store, layout.clone(), head_dim, k, v)
}

fn new_cache<S: CStore>(
    store: &S,
    layout: &LayerLayout,
    dtype: DType,
    head_dim: usize,
    k: *mut c_void,
    v: *mut c_void,
) -> Result<Cache<S>> {
    let kv = match dtype {
        DType::F16 => Kv::F16(wrap_cache(store, layout, head_dim, k, v)?),
        DType::BF16 => Kv::Bf16(wrap_cache(store, layout, head_dim, k, v)?),
    };
    let ws = Workspaces {
        attention: AttentionWorkspace::new(),
        select: SelectWorkspace::new(),
        rkv: RkvWorkspace::new(),
        scores: crate::scores::ScoreWorkspace::new(),
        h2o: crate::heavy_hitters::H2oWorkspace::new(),
    };
    Ok(Cache { kv, ws })
}

/// A cache over the caller's K and V buffers of one layer, each `[total_rows][head_dim]`
/// elements of `dtype` (`HEADWISE_DTYPE_F16`/`_BF16`), row-major, 16-byte aligned, laid out as
/// `layout` says (copied: later changes go through the cache; read them back with
/// `headwise_cache_layout`), in the store's memory (device pointers on a GPU store, host
/// pointers on the emulator). `head_dim` is 64, 128 or 256. headwise uploads its own copy of
/// the segment table to the store (on a GPU, on its stream) and never frees `k` or `v`.
///
/// Lifetime: `k` and `v` must stay allocated until `headwise_cache_free` and until the work
/// enqueued over them has finished.
///
/// # Safety
/// `store` and `layout` must be NULL or live; `k` and `v` NULL or memory of the store (see
/// above) holding `total_rows * head_dim` elements each, used by nothing else while the cache
/// works on it; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_create(
    store: *const HeadwiseStore,
    layout: *const HeadwiseLayout,
    dtype: c_int,
    head_dim: usize,
    k: *mut c_void,
    v: *mut c_void,
    out: *mut *mut HeadwiseCache,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer.
        let out = unsafe { out_handle(out) }?;
        let store = unsafe { handle(store, "store") }?;
        let layout = &unsafe { handle(layout, "layout") }?.layout;
        let dtype = dtype_of(dtype)?;
        check_head_dim(head_dim)?;
        let inner = match &store.backend {
            #[cfg(feature = "cuda")]
            Backend::Gpu(s) => {
                let _keep = super::store::KeepCurrentContext::new();
                CacheInner::Gpu(new_cache(s, layout, dtype, head_dim, k, v)?)
            }
            #[cfg(feature = "emulator")]
            Backend::Emulator(s) => CacheInner::Emulator(new_cache(s, layout, dtype, head_dim, k, v)?),
        };
        *out = Box::into_raw(Box::new(HeadwiseCache { inner }));
        Ok(())
    })
}

/// Frees a cache: headwise's segment table and scratch memory are released (on a GPU, in
/// stream order on the store's stream); the caller's K/V memory is untouched. NULL is ignored.
///
/// # Safety
/// `cache` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_free(cache: *mut HeadwiseCache) -> c_int {
    boundary(|| {
        if !cache.is_null() {
            // SAFETY: the caller's promise (a live handle).
            let gpu = unsafe { &(*cache).inner }.is_gpu();
            let _keep = gpu.then(super::store::KeepCurrentContext::new);
            // SAFETY: the caller's promise.
            unsafe { free_handle(cache) };
        }
        Ok(())
    })
}

/// A copy of the cache's current layout (lengths and ring state after every operation so far),
/// as a new layout handle to free.
///
/// # Safety
/// `cache` must be NULL or live; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_layout(
    cache: *const HeadwiseCache,
    out: *mut *mut HeadwiseLayout,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let cache = unsafe { handle(cache, "cache") }?;
        new_layout(out, with_cache!(&cache.inner, c, _ws => c.layout().clone()));
        Ok(())
    })
}

/// Appends one decode step's token to every segment: `k_new` and `v_new` are
/// `[num_segments][head_dim]` (the model's `[batch][kv_heads][head_dim]`), the cache's dtype,
/// 16-byte aligned device memory. Full segments write row `len`; Streaming segments fill their
/// sinks, then overwrite their ring's oldest row.
///
/// Errors before anything is enqueued: `HEADWISE_ERROR_SEGMENT_FULL` (a Full segment has no free
/// row: compress it, or `headwise_cache_relayout_into` a regrown layout), invalid arguments.
/// Asynchronous: returns once the kernel is enqueued on the GPU handle's stream; `k_new`/`v_new`
/// must stay valid until it has run.
///
/// # Safety
/// `cache` must be NULL or live; `k_new`/`v_new` NULL or device pointers holding
/// `num_segments * head_dim` elements, written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_append(
    cache: *mut HeadwiseCache,
    k_new: *const c_void,
    v_new: *const c_void,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        with_cache!(&mut cache.inner, c, _ws => {
            let n = product("num_segments * head_dim", &[c.layout().segments().len(), c.head_dim()])?;
            // SAFETY: the caller's promise on k_new/v_new (n elements each).
            let (k, v) = unsafe { (borrow_in(c.store(), k_new, n, "k_new")?, borrow_in(c.store(), v_new, n, "v_new")?) };
            c.append(&k, &v)
        })
    })
}

/// Appends `tokens` tokens (1..=INT32_MAX) to every segment in one launch, oldest first, as
/// `tokens` calls of `headwise_cache_append` would: a prefill chunk, a follow-up turn, or
/// speculative draft tokens before `headwise_cache_attention_chunk`. `k_new`/`v_new` are
/// token-major, `[batch][tokens][kv_heads][head_dim]`. A Streaming segment given more tokens
/// than its window keeps the newest `window` of them.
///
/// Errors before anything is enqueued: `HEADWISE_ERROR_SEGMENT_FULL` (a Full segment has fewer
/// than `tokens` free rows), invalid arguments.
///
/// # Safety
/// As `headwise_cache_append`, with `num_segments * tokens * head_dim` elements each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_append_tokens(
    cache: *mut HeadwiseCache,
    k_new: *const c_void,
    v_new: *const c_void,
    tokens: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        with_cache!(&mut cache.inner, c, _ws => {
            let n = product("num_segments * tokens * head_dim", &[c.layout().segments().len(), tokens, c.head_dim()])?;
            // SAFETY: the caller's promise on k_new/v_new (n elements each).
            let (k, v) = unsafe { (borrow_in(c.store(), k_new, n, "k_new")?, borrow_in(c.store(), v_new, n, "v_new")?) };
            c.append_tokens(&k, &v, tokens)
        })
    })
}

/// Drops the newest `tokens[b]` tokens of every segment of sequence `b`: the rejection of
/// speculative draft tokens. `tokens` is a host array of `num_tokens == batch` counts. No row
/// moves; a Full segment is restored exactly, a Streaming segment whose ring had wrapped keeps
/// fewer windowed tokens (the drafts overwrote its oldest ones) until later appends refill it.
///
/// Errors before anything changes: a wrong `num_tokens`, a count above the length of one of its
/// sequence's segments (named `tokens[b]`).
///
/// # Safety
/// `cache` NULL or live; `tokens` NULL or `num_tokens` readable `uint32_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_rollback(
    cache: *mut HeadwiseCache,
    tokens: *const u32,
    num_tokens: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let tokens = unsafe { input(tokens, num_tokens, "tokens") }?;
        with_cache!(&mut cache.inner, c, _ws => c.rollback(tokens))
    })
}

/// Copies every segment's rows into new engine buffers `k_dst`/`v_dst` laid out as `target`
/// (the same segments, mode, len and ring state at other offsets with at least their length in
/// capacity, e.g. from `headwise_layout_regrown`), each `target.total_rows * head_dim` elements.
/// The cache itself is unchanged: afterwards create a new cache over the new buffers with
/// `target`, free this one, and free the old buffers once the copy has run (stream order).
///
/// # Safety
/// `cache` and `target` NULL or live; `k_dst`/`v_dst` NULL or device pointers holding
/// `target.total_rows * head_dim` elements, not overlapping the cache's buffers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_relayout_into(
    cache: *const HeadwiseCache,
    target: *const HeadwiseLayout,
    k_dst: *mut c_void,
    v_dst: *mut c_void,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let cache = unsafe { handle(cache, "cache") }?;
        let target = &unsafe { handle(target, "target") }?.layout;
        with_cache!(&cache.inner, c, _ws => {
            let n = product("target.total_rows * head_dim", &[target.total_rows(), c.head_dim()])?;
            // SAFETY: the caller's promise on k_dst/v_dst.
            let (mut k, mut v) = unsafe { (borrow_in(c.store(), k_dst, n, "k_dst")?, borrow_in(c.store(), v_dst, n, "v_dst")?) };
            c.relayout_into(target, &mut k, &mut v)
        })
    })
}
