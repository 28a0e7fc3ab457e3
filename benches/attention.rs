//! Decode attention on the GPU, Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128,
//! bf16): all-full caches at 4k/32k/128k tokens and RLKV mixes at sparsity 0.2/0.4/0.6/0.8
//! (per layer, that fraction of the 8 KV heads keeps 16 sink + 64 recent tokens), batch 1 to 64.
//! Prints the bytes a launch must read and, from criterion's median, the fraction of the
//! measured device copy bandwidth. Without a GPU it says so and measures nothing.

mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use headwise::policy::heads::StreamingSize;
use headwise::{AttentionOptions, AttentionWorkspace, GpuBuf, LayerCache, LayoutBuilder, Store};
use std::time::Instant;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const HEAD_DIM: usize = 128;

fn bench(c: &mut Criterion) {
    let gpu = support::gpu_or_not_run("attention");
    if support::emu_traffic_wanted(gpu.is_some()) {
        emu_traffic();
    }
    let Some(store) = gpu else { return };
    let bw = support::copy_bandwidth(&store);
    eprintln!("device copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
    let mut group = c.benchmark_group("attention");
    let mut cases: Vec<(String, usize, u32, usize)> = Vec::new(); // name, batch, context, streaming heads
    let full: &[(u32, &[usize])] = &[(4096, &[1, 8, 64]), (32768, &[1, 8, 16]), (131072, &[1, 4])];
    let quick: &[(u32, &[usize])] = &[(4096, &[1]), (32768, &[1, 8]), (131072, &[1])];
    for (ctx, batches) in support::sizes(full, quick) {
        for &b in batches {
            cases.push((format!("full_ctx{}k_b{b}", ctx / 1024), b, ctx, 0));
        }
    }
    for s in support::sizes(&[0.2, 0.4, 0.6, 0.8], &[0.4, 0.8]) {
        let streaming = (s * KV_HEADS as f64).round() as usize;
        for b in support::sizes(&[1usize, 16, 64], &[16]) {
            cases.push((format!("rlkv_s{s}_ctx32k_b{b}"), b, 32768, streaming));
        }
    }
    for (name, batch, ctx, streaming) in cases {
        let size = StreamingSize::RLKV;
        let mut lb = LayoutBuilder::new(batch, KV_HEADS);
        for b in 0..batch {
            for h in 0..KV_HEADS {
                lb = if h < streaming {
                    lb.streaming(b, h, size.sink, size.window)
                } else {
                    lb.full(b, h, ctx)
                };
            }
        }
        let mut layout = lb.build().unwrap();
        // Fill the streaming rings (attention reads sink + window rows).
        let segs: Vec<_> =
            layout.segments().iter().map(|s| headwise::Segment { len: s.capacity, ..*s }).collect();
        layout = headwise::LayerLayout::new(batch, KV_HEADS, layout.total_rows() as u64, segs).unwrap();
        let elems = layout.total_rows() * HEAD_DIM;
        let k = GpuBuf::owned(support::filled::<bf16>(&store, elems));
        let v = GpuBuf::owned(support::filled::<bf16>(&store, elems));
        let cache = LayerCache::<_, bf16>::from_parts(&store, layout.clone(), HEAD_DIM, k, v).unwrap();
        let heads = batch * KV_HEADS * GROUP;
        let q = GpuBuf::owned(support::filled::<bf16>(&store, heads * HEAD_DIM));
        let mut out = store.zeros::<bf16>(heads * HEAD_DIM).unwrap();
        let mut ws = AttentionWorkspace::new();
        let opts = AttentionOptions::default();
        let bytes = 2 * layout.rows_in_use() as usize * HEAD_DIM * 2 + 2 * heads * HEAD_DIM * 2;
        let mut samples = Vec::new();
        group.bench_function(&name, |bch| {
            bch.iter_custom(|iters| {
                store.synchronize().unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    cache.attention(&q, GROUP, &mut out, None, &mut ws, &opts).unwrap();
                }
                store.synchronize().unwrap();
                let d = t.elapsed();
                samples.push(d.as_secs_f64() / iters as f64);
                d
            })
        });
        let median = support::median(&mut samples);
        eprintln!(
            "{name}: {:.1} MB read, median sample {:.1} us/launch, {:.0}% of copy bandwidth (floor {:.1} us), plan {:?}",
            bytes as f64 / 1e6,
            median * 1e6,
            100.0 * (bytes as f64 / median) / bw,
            bytes as f64 / bw * 1e6,
            headwise::attention::plan(&layout, store.sm_count()),
        );
        support::floor_line(
            "attention",
            &name,
            median,
            bytes as f64 / bw,
            "bytes/copy_bw",
            &format!(
                "batch={batch} ctx={ctx} streaming_heads={streaming} sink={} window={} kv_heads={KV_HEADS} \
                 group={GROUP} head_dim={HEAD_DIM} bytes={bytes}",
                StreamingSize::RLKV.sink,
                StreamingSize::RLKV.window
            ),
        );
    }
    group.finish();
}

/// Emulator-mode memory traffic at small shapes (same model dims, 1k-token contexts): bytes
/// against the GPU line's floor (K and V rows in use read once, queries read, output written).
fn emu_traffic() {
    use headwise::EmuStore;
    for (name, streaming) in [("full_ctx1k_b1", 0usize), ("rlkv_s0.5_ctx1k_b1", KV_HEADS / 2)] {
        let size = StreamingSize::RLKV;
        let mut lb = LayoutBuilder::new(1, KV_HEADS);
        for h in 0..KV_HEADS {
            lb = if h < streaming { lb.streaming(0, h, size.sink, size.window) } else { lb.full(0, h, 1024) };
        }
        let layout = lb.build().unwrap();
        let segs: Vec<_> =
            layout.segments().iter().map(|s| headwise::Segment { len: s.capacity, ..*s }).collect();
        let layout = headwise::LayerLayout::new(1, KV_HEADS, layout.total_rows() as u64, segs).unwrap();
        let heads = KV_HEADS * GROUP;
        let floor = 2 * layout.rows_in_use() * HEAD_DIM as u64 * 2 + 2 * (heads * HEAD_DIM * 2) as u64;
        let store = EmuStore;
        let elems = layout.total_rows() * HEAD_DIM;
        let k = store.upload(&vec![bf16::from_f32(0.5); elems]).unwrap();
        let v = store.upload(&vec![bf16::from_f32(0.25); elems]).unwrap();
        let cache = LayerCache::<_, bf16>::from_parts(&store, layout, HEAD_DIM, k, v).unwrap();
        let q = store.upload(&vec![bf16::from_f32(0.1); heads * HEAD_DIM]).unwrap();
        let mut out = store.zeros::<bf16>(heads * HEAD_DIM).unwrap();
        let t = support::emu_traffic(|_| {
            cache
                .attention(
                    &q,
                    GROUP,
                    &mut out,
                    None,
                    &mut AttentionWorkspace::new(),
                    &AttentionOptions::default(),
                )
                .unwrap()
        });
        support::print_emu_traffic(
            "attention",
            &format!("{name}_kv{KV_HEADS}_g{GROUP}_d{HEAD_DIM}_bf16"),
            floor,
            &t,
        );
    }
}

criterion_group! {
    name = benches;
    config = support::config(1000, 2000, 20);
    targets = bench
}
criterion_main!(benches);
