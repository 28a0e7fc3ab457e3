//! R-KV decode-time eviction: query rings and the eviction step over a cache handle.

use super::args::{
    dtype_of, free_handle, handle, handle_mut, input_struct, optional_input, out_handle, out_value, output,
};
use super::cache::{Cache, CacheInner, HeadwiseCache, Kv, with_cache};
use super::errors::boundary;
use super::store::{Backend, CStore, HeadwiseStore, KeepCurrentContext, borrow_in};
use crate::dtype::{DType, KvElem};
#[cfg(feature = "emulator")]
use crate::emu::EmuStore;
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::GpuStore;
use crate::redundancy::{self, QueryRing, RkvOptions, RkvTrigger};
use crate::store::Store;
use half::{bf16, f16};
use std::ffi::{c_int, c_void};

/// A ring of one dtype in store `S`.
enum Ring<S: Store> {
    F16(QueryRing<S, f16>),
    Bf16(QueryRing<S, bf16>),
}

enum RingInner {
    #[cfg(feature = "cuda")]
    Gpu(Ring<GpuStore>),
    #[cfg(feature = "emulator")]
    Emulator(Ring<EmuStore>),
}

impl RingInner {
    fn is_gpu(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            RingInner::Gpu(_) => true,
            #[cfg(feature = "emulator")]
            RingInner::Emulator(_) => false,
        }
    }
}

fn new_ring<S: Store>(
    store: &S,
    dtype: DType,
    heads: usize,
    alpha: usize,
    head_dim: usize,
) -> Result<Ring<S>> {
    Ok(match dtype {
        DType::F16 => Ring::F16(QueryRing::new(store, heads, alpha, head_dim)?),
        DType::BF16 => Ring::Bf16(QueryRing::new(store, heads, alpha, head_dim)?),
    })
}

fn push_ring<S: CStore>(ring: &mut Ring<S>, q: *const c_void) -> Result<()> {
    match ring {
        Ring::F16(r) => push_typed(r, q),
        Ring::Bf16(r) => push_typed(r, q),
    }
}

/// A layer's rolling buffer of the last `alpha` queries of every query head, in device memory
/// headwise allocates in the store (R-KV scores importance with it). Create with `headwise_query_ring_create`,
/// push every decode step, free with `headwise_query_ring_free`.
pub struct HeadwiseQueryRing {
    inner: RingInner,
}

/// An empty query ring for `heads` query heads (`num_segments * group_size` of the cache it will
/// score) of `dtype` and `head_dim`, keeping `alpha` (1..=16) queries per head; its
/// `heads * alpha * head_dim` elements are allocated in the store (on a GPU, on its stream).
///
/// # Safety
/// `store` NULL or live; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_query_ring_create(
    store: *const HeadwiseStore,
    dtype: c_int,
    heads: usize,
    alpha: usize,
    head_dim: usize,
    out: *mut *mut HeadwiseQueryRing,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let store = unsafe { handle(store, "store") }?;
        let dtype = dtype_of(dtype)?;
        let inner = match &store.backend {
            #[cfg(feature = "cuda")]
            Backend::Gpu(s) => {
                let _keep = KeepCurrentContext::new();
                RingInner::Gpu(new_ring(s, dtype, heads, alpha, head_dim)?)
            }
            #[cfg(feature = "emulator")]
            Backend::Emulator(s) => RingInner::Emulator(new_ring(s, dtype, heads, alpha, head_dim)?),
        };
        *out = Box::into_raw(Box::new(HeadwiseQueryRing { inner }));
        Ok(())
    })
}

/// Pushes one decode step's queries, `q`: `[heads][head_dim]` in the ring's dtype, 16-byte
/// aligned memory of the store (the decode attention's `q`). Asynchronous on a GPU store (on its
/// stream).
///
/// # Safety
/// `ring` NULL or live; `q` NULL or a device pointer holding `heads * head_dim` elements,
/// written before this call in the stream's order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_query_ring_push(ring: *mut HeadwiseQueryRing, q: *const c_void) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on the handle.
        let ring = unsafe { handle_mut(ring, "ring") }?;
        match &mut ring.inner {
            #[cfg(feature = "cuda")]
            RingInner::Gpu(r) => {
                let _keep = KeepCurrentContext::new();
                push_ring(r, q)
            }
            #[cfg(feature = "emulator")]
            RingInner::Emulator(r) => push_ring(r, q),
        }
    })
}

fn push_typed<S: CStore, T: KvElem>(r: &mut QueryRing<S, T>, q: *const c_void) -> Result<()> {
    // The ring holds alpha queries of heads * head_dim elements.
    let n = S::len(r.buf()) / r.alpha();
    // SAFETY: headwise_query_ring_push's contract on q.
    let q = unsafe { S::borrow::<T>(q, n, "q") }?;
    r.push(&q)
}

/// Frees a query ring (its memory is released in stream order). NULL is ignored.
///
/// # Safety
/// `ring` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_query_ring_free(ring: *mut HeadwiseQueryRing) -> c_int {
    boundary(|| {
        if !ring.is_null() {
            // SAFETY: the caller's promise (a live handle).
            let gpu = unsafe { &(*ring).inner }.is_gpu();
            let _keep = gpu.then(KeepCurrentContext::new);
            // SAFETY: the caller's promise.
            unsafe { free_handle(ring) };
        }
        Ok(())
    })
}

/// Options of an R-KV eviction step. Start from `headwise_rkv_options_default`. Counts are
/// tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeadwiseRkvOptions {
    /// Tokens a compacted segment keeps, window included (must exceed `alpha`).
    pub budget: u32,
    /// Slack before the automatic trigger: a Full segment is compacted once `len >= budget +
    /// buffer` (default 128).
    pub buffer: u32,
    /// Recent queries per head scoring importance, and newest tokens always kept (1..=16,
    /// default 8; must equal the ring's alpha).
    pub alpha: u32,
    /// Max-pool width of the importance, odd (default 7).
    pub kernel: u32,
    /// Weight of importance against redundancy, in [0, 1] (default 0.07).
    pub lambda: f64,
    /// Nonzero reproduces the authors' zeroing quirk of the similarity matrix (default 0).
    pub fidelity_quirk: i32,
}

/// Writes R-KV's defaults with the given `budget` (buffer 128, alpha 8, kernel 7, lambda 0.07,
/// quirk off) to `*out`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_rkv_options_default(budget: u32, out: *mut HeadwiseRkvOptions) -> c_int {
    boundary(|| {
        let d = RkvOptions::new(budget as usize);
        // SAFETY: the caller's promise on `out`.
        *unsafe { out_value(out, "out") }? = HeadwiseRkvOptions {
            budget,
            buffer: d.buffer as u32,
            alpha: d.alpha as u32,
            kernel: d.kernel as u32,
            lambda: d.lambda,
            fidelity_quirk: i32::from(d.fidelity_quirk),
        };
        Ok(())
    })
}

/// One R-KV step over the layer: scores and compacts, in place, every Full segment that holds
/// more than `budget` tokens and is selected, by the automatic trigger (`forced` NULL: `len >=
/// budget + buffer`) or by `forced[s] != 0` (`forced_len` = num_segments; forcing a Streaming
/// segment is an error). `ring` holds the layer's recent queries (`num_segments * group_size`
/// heads, same dtype, head_dim and alpha). A compacted segment's `len` becomes `budget`. If
/// `compacted` is not NULL, `compacted[s]` (`compacted_len` = num_segments) is set to 1 for
/// every segment compacted, else 0. Scratch memory is kept in the cache and grows on demand.
///
/// Asynchronous: returns once the kernels are enqueued on the GPU handle's stream (the new
/// lengths are known on the host without waiting).
///
/// # Safety
/// `cache`, `ring`, `opts` NULL or valid; `forced` NULL or `forced_len` readable bytes;
/// `compacted` NULL or `compacted_len` writable bytes.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_cache_evict(
    cache: *mut HeadwiseCache,
    ring: *const HeadwiseQueryRing,
    group_size: usize,
    opts: *const HeadwiseRkvOptions,
    forced: *const u8,
    forced_len: usize,
    compacted: *mut u8,
    compacted_len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer and length.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let ring = unsafe { handle(ring, "ring") }?;
        let o = unsafe { input_struct(opts, "opts") }?;
        let opts = RkvOptions {
            budget: o.budget as usize,
            buffer: o.buffer as usize,
            alpha: o.alpha as usize,
            kernel: o.kernel as usize,
            lambda: o.lambda,
            fidelity_quirk: o.fidelity_quirk != 0,
        };
        let forced: Option<Vec<bool>> = unsafe { optional_input(forced, forced_len, "forced") }?
            .map(|f| f.iter().map(|&x| x != 0).collect());
        let trigger = forced.as_deref().map_or(RkvTrigger::Threshold, RkvTrigger::Forced);
        let n = with_cache!(&cache.inner, c, _ws => c.layout().segments().len());
        let compacted = unsafe { compacted_flags(compacted, compacted_len, n) }?;
        // With one backend built, the mismatch arm cannot be reached.
        #[allow(unreachable_patterns)]
        let done = match (&mut cache.inner, &ring.inner) {
            #[cfg(feature = "cuda")]
            (CacheInner::Gpu(c), RingInner::Gpu(r)) => {
                let _keep = KeepCurrentContext::new();
                evict_typed(c, r, group_size, &opts, trigger)?
            }
            #[cfg(feature = "emulator")]
            (CacheInner::Emulator(c), RingInner::Emulator(r)) => {
                evict_typed(c, r, group_size, &opts, trigger)?
            }
            _ => return Err(Error::invalid("ring", "made from another kind of store than the cache's")),
        };
        if let Some(out) = compacted {
            for (o, d) in out.iter_mut().zip(done) {
                *o = u8::from(d);
            }
        }
        Ok(())
    })
}

fn evict_typed<S: CStore>(
    cache: &mut Cache<S>,
    ring: &Ring<S>,
    group_size: usize,
    opts: &RkvOptions,
    trigger: RkvTrigger<'_>,
) -> Result<Vec<bool>> {
    let ws = &mut cache.ws.rkv;
    match (&mut cache.kv, ring) {
        (Kv::F16(c), Ring::F16(r)) => redundancy::evict(c, r, group_size, opts, trigger, ws),
        (Kv::Bf16(c), Ring::Bf16(r)) => redundancy::evict(c, r, group_size, opts, trigger, ws),
        _ => Err(Error::invalid("ring", "its dtype differs from the cache's")),
    }
}

/// H2O eviction by accumulated attention mass (`mass[num_mass]`, `total_rows` f32 of store
/// memory, as `headwise_cache_attention_with_mass` writes it): every Full segment longer than
/// `budget` keeps its `recent` newest tokens plus the `budget - recent` older ones of the highest
/// mass (NaN lowest, ties to the lower position), compacted in place in position order with
/// their K, V and mass entries; the freed rows' mass is zeroed, len becomes `budget`. Streaming
/// segments are not touched. `1 <= budget <= INT32_MAX`, `recent <= budget`. `compacted` is NULL
/// or `num_segments` bytes, set to 1 where a segment was compacted. Synchronous (the host reads
/// the new lengths).
///
/// # Safety
/// `cache` NULL or live; `mass` NULL or `num_mass` floats of store memory; `compacted` NULL or
/// `compacted_len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_cache_evict_by_mass(
    cache: *mut HeadwiseCache,
    mass: *mut f32,
    num_mass: usize,
    budget: u32,
    recent: u32,
    compacted: *mut u8,
    compacted_len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY (this block): the caller's promise on every pointer and length.
        let cache = unsafe { handle_mut(cache, "cache") }?;
        let opts = crate::heavy_hitters::H2oOptions { budget: budget as usize, recent: recent as usize };
        let n = with_cache!(&cache.inner, c, _ws => c.layout().segments().len());
        let compacted = unsafe { compacted_flags(compacted, compacted_len, n) }?;
        let done = with_cache!(&mut cache.inner, c, ws => {
            let mut m = unsafe { borrow_in::<_, f32>(c.store(), mass.cast_const().cast(), num_mass, "mass") }?;
            crate::heavy_hitters::evict_by_mass(c, &mut m, &opts, &mut ws.h2o)
        })?;
        if let Some(out) = compacted {
            for (o, d) in out.iter_mut().zip(done) {
                *o = u8::from(d);
            }
        }
        Ok(())
    })
}

/// The optional `compacted[compacted_len]` output of both evictions: NULL, or exactly one flag
/// per segment (`n`).
///
/// # Safety
/// `compacted` NULL or `compacted_len` writable bytes.
unsafe fn compacted_flags<'a>(
    compacted: *mut u8,
    compacted_len: usize,
    n: usize,
) -> Result<Option<&'a mut [u8]>> {
    if compacted.is_null() {
        return Ok(None);
    }
    if compacted_len != n {
        return Err(Error::invalid("compacted_len", format!("{compacted_len}, expected num_segments {n}")));
    }
    // SAFETY: the caller's promise.
    Ok(Some(unsafe { output(compacted, compacted_len, "compacted") }?))
}
