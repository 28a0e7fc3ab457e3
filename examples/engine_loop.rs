//! Engine integration: a multi-layer decode loop over K/V memory the engine owns, on the
//! engine's stream. Per layer, the prompt is compressed straight into the engine's buffers
//! (`select::compress_into`); then every decode step runs, per layer, append -> query-ring push
//! -> R-KV eviction when a segment reaches `budget + buffer` -> decode attention. Every fourth
//! step is a speculative one instead: `DRAFTS` draft tokens appended in one call
//! (`append_tokens`), verified by one causal chunk attention (`attention_chunk`), the rejected
//! ones dropped again (`rollback`), the accepted ones' queries pushed into the R-KV ring.
//!
//! The contract with the engine (GPU):
//! - `GpuStore::from_stream(engine_stream)`: headwise launches on the engine's cudarc stream in
//!   its context, so its work is ordered with the engine's kernels; it never synchronizes except
//!   where a call returns data to the host (AdaKV budgets, downloads). (C/C++ engines:
//!   `from_engine_stream(ordinal, CUstream)`.)
//! - Per-call buffers the engine holds as cudarc slices (queries, outputs) go in place through
//!   `store.view(..)`/`view_mut(..)`; the long-lived K/V arena, which the caches keep, through
//!   `GpuBuf::borrowed(ptr, len)`: engine memory, never freed by headwise. The engine keeps it
//!   alive and unaliased by other writers while a headwise call that uses it is in flight on the
//!   stream, and 16-byte aligned (checked).
//! - The engine owns the row arena of each layer and describes it with a `LayerLayout`; headwise
//!   keeps the host layout and the device table in step (lens after compression, appends and
//!   evictions) and never reallocates engine memory (only `regrow` would, and this loop never
//!   needs it: R-KV keeps every Full segment within `budget + buffer` rows).
//! - Scratch memory (`SelectWorkspace`, `RkvWorkspace`, `AttentionWorkspace`) is headwise's,
//!   allocated once and reused by every step.
//!
//! Without a GPU the same loop runs on the emulator store, with owned buffers standing in for
//! the engine's (and smaller sizes); it says which.

use half::bf16;
use headwise::redundancy::{QueryRing, RkvOptions, RkvTrigger, RkvWorkspace, evict};
use headwise::select::{Budgets, Packing, Prompt, SelectOptions, SelectWorkspace, compress_into};
use headwise::{
    AttentionOptions, AttentionWorkspace, EmuStore, GpuBuf, GpuStore, LayerCache, LayerLayout, Segment, Store,
};

const HEAD_DIM: usize = 128;
const GROUP: usize = 4;
/// Draft tokens per speculative step.
const DRAFTS: usize = 4;

struct Shape {
    layers: usize,
    batch: usize,
    kv_heads: usize,
    prompt: usize,
    budget: usize,
    buffer: usize,
    steps: usize,
}

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                bf16::from_f32((self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    }
}

/// The decode loop; `engine_alloc(elems)` hands out engine-owned K/V memory.
fn decode_loop<S: Store>(
    store: &S,
    shape: &Shape,
    engine_alloc: &dyn Fn(usize) -> headwise::Result<S::Buf<bf16>>,
) -> headwise::Result<()> {
    let segs = shape.batch * shape.kv_heads;
    let heads = segs * GROUP;
    let window = 32;
    let rkv = RkvOptions { buffer: shape.buffer, ..RkvOptions::new(shape.budget) };
    let mut rng = Rng(42);
    let mut caches = Vec::new();
    let mut rings = Vec::new();
    let mut select_ws = SelectWorkspace::new();
    for layer in 0..shape.layers {
        // The engine's arena for this layer: every segment gets budget + buffer rows.
        let cap = (shape.budget + shape.buffer) as u32;
        let layout = LayerLayout::new(
            shape.batch,
            shape.kv_heads,
            u64::from(cap) * segs as u64,
            (0..segs as u32).map(|s| Segment::full(s * cap, cap, 0)).collect(),
        )?;
        let rows = layout.total_rows() * HEAD_DIM;
        let mut cache =
            LayerCache::from_parts(store, layout, HEAD_DIM, engine_alloc(rows)?, engine_alloc(rows)?)?;
        // Prefill: the model produced the prompt's K/V and last-window queries for this layer.
        let (k, v) = (
            store.upload(&rng.vec(segs * shape.prompt * HEAD_DIM))?,
            store.upload(&rng.vec(segs * shape.prompt * HEAD_DIM))?,
        );
        let window_q = rng.vec(heads * window * HEAD_DIM);
        let queries = store.upload(&window_q)?;
        let prompt = Prompt {
            k: &k,
            v: &v,
            queries: &queries,
            batch: shape.batch,
            kv_heads: shape.kv_heads,
            group_size: GROUP,
            q_len: shape.prompt,
            head_dim: HEAD_DIM,
            packing: Packing::HeadMajor,
        };
        let budgets = vec![shape.budget as u32; segs];
        let opts = SelectOptions { window, ..SelectOptions::default() };
        compress_into(&mut cache, &prompt, Budgets::PerRow(&budgets), &opts, &mut select_ws)?;
        // R-KV's query ring starts with the prompt's last alpha queries of every head.
        let mut ring = QueryRing::new(store, heads, rkv.alpha, HEAD_DIM)?;
        for i in window - rkv.alpha..window {
            let q: Vec<bf16> = (0..heads)
                .flat_map(|h| window_q[(h * window + i) * HEAD_DIM..][..HEAD_DIM].to_vec())
                .collect();
            ring.push(&store.upload(&q)?)?;
        }
        println!(
            "layer {layer}: prompt {} -> {} tokens per KV head",
            shape.prompt,
            cache.layout().segments()[0].len
        );
        caches.push(cache);
        rings.push(ring);
    }

    let mut rkv_ws: Vec<RkvWorkspace<S>> = (0..shape.layers).map(|_| RkvWorkspace::new()).collect();
    let mut attn_ws: Vec<AttentionWorkspace<S>> =
        (0..shape.layers).map(|_| AttentionWorkspace::new()).collect();
    let mut out = store.zeros::<bf16>(heads * HEAD_DIM)?;
    let mut chunk_out = store.zeros::<bf16>(DRAFTS * heads * HEAD_DIM)?;
    for step in 0..shape.steps {
        // A speculative step needs DRAFTS free rows in every Full segment (R-KV keeps them
        // below budget + buffer; right before an eviction there may be fewer).
        if step % 4 == 3 && caches.iter().all(|c| c.layout().check_room(DRAFTS).is_ok()) {
            // The draft model proposed DRAFTS tokens; the target model accepts a prefix of them.
            let accepted = 1 + (step / 4) % DRAFTS;
            for l in 0..shape.layers {
                // K/V and queries of the drafts, token-major: [batch][DRAFTS][kv_heads | heads][d].
                let (k_new, v_new) = (
                    store.upload(&rng.vec(DRAFTS * segs * HEAD_DIM))?,
                    store.upload(&rng.vec(DRAFTS * segs * HEAD_DIM))?,
                );
                let q_host = rng.vec(DRAFTS * heads * HEAD_DIM);
                caches[l].append_tokens(&k_new, &v_new, DRAFTS)?;
                let q = store.upload(&q_host)?;
                let opts = AttentionOptions::default();
                caches[l].attention_chunk(&q, DRAFTS, GROUP, &mut chunk_out, None, &mut attn_ws[l], &opts)?;
                caches[l].rollback(&vec![(DRAFTS - accepted) as u32; shape.batch])?;
                // The accepted tokens' queries join R-KV's ring, one token at a time.
                let per_seq = heads / shape.batch * HEAD_DIM;
                for t in 0..accepted {
                    let q_t: Vec<bf16> = (0..shape.batch)
                        .flat_map(|b| q_host[(b * DRAFTS + t) * per_seq..][..per_seq].to_vec())
                        .collect();
                    rings[l].push(&store.upload(&q_t)?)?;
                }
            }
            println!(
                "step {step}: speculative, {DRAFTS} drafts in one chunk attention, {accepted} accepted: len {} per KV head",
                caches[0].layout().segments()[0].len
            );
            continue;
        }
        let mut evicted = 0;
        for l in 0..shape.layers {
            // In a real engine these come from this layer's projections of the current token.
            let (k_new, v_new) =
                (store.upload(&rng.vec(segs * HEAD_DIM))?, store.upload(&rng.vec(segs * HEAD_DIM))?);
            let q = store.upload(&rng.vec(heads * HEAD_DIM))?;
            caches[l].append(&k_new, &v_new)?;
            rings[l].push(&q)?;
            let done = evict(&mut caches[l], &rings[l], GROUP, &rkv, RkvTrigger::Threshold, &mut rkv_ws[l])?;
            evicted += done.iter().filter(|&&d| d).count();
            caches[l].attention(&q, GROUP, &mut out, None, &mut attn_ws[l], &AttentionOptions::default())?;
        }
        println!(
            "step {step}: len {} per KV head{}",
            caches[0].layout().segments()[0].len,
            if evicted > 0 {
                format!(", R-KV evicted {evicted} segments back to {}", shape.budget)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn main() -> headwise::Result<()> {
    match GpuStore::new(0) {
        Ok(_) => {
            println!("device: GPU (CUDA device 0); K/V in engine-owned memory on the engine's stream");
            // Stand-in for the engine: its own stream and allocations, handed over as raw pointers.
            let ctx = cudarc::driver::CudaContext::new(0)?;
            let engine_stream = ctx.new_stream()?;
            // headwise enqueues on the engine's stream, in its context.
            let store = GpuStore::from_stream(engine_stream.clone())?;
            let arena = std::cell::RefCell::new(Vec::new());
            let alloc = |n: usize| -> headwise::Result<GpuBuf<bf16>> {
                let slice = engine_stream.alloc_zeros::<bf16>(n)?;
                let buf = {
                    use cudarc::driver::DevicePtr;
                    let (ptr, _guard) = slice.device_ptr(&engine_stream);
                    // SAFETY: `slice` is a live allocation of n bf16 on this context; it is kept
                    // in `arena` (the engine's ownership) until after the loop has finished.
                    unsafe { GpuBuf::borrowed(ptr as usize as *mut std::ffi::c_void, n) }
                };
                arena.borrow_mut().push(slice);
                Ok(buf)
            };
            let shape = Shape {
                layers: 4,
                batch: 4,
                kv_heads: 8,
                prompt: 8192,
                budget: 1024,
                buffer: 128,
                steps: 160,
            };
            decode_loop(&store, &shape, &alloc)?;
            store.synchronize()
        }
        Err(why) => {
            println!("device: CPU SIMT emulator ({why}); owned buffers stand in for engine memory");
            let shape =
                Shape { layers: 2, batch: 1, kv_heads: 2, prompt: 256, budget: 64, buffer: 16, steps: 20 };
            decode_loop(&EmuStore, &shape, &|n| EmuStore.zeros(n))
        }
    }
}
