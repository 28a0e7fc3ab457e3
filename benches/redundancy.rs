//! R-KV eviction on the GPU (SPEC section 4), reasoning-model shapes at head_dim 128, bf16:
//! Llama-3.1-8B-R1 (32 query / 8 KV heads) and Qwen-2.5-7B-R1 (28 query / 4 KV heads), batch 1
//! and 8, budgets 512 to 4096, every segment at len = budget + 128 (the trigger point).
//! Prints the matrix work of a step (the similarity S = K K^T of every segment plus the two
//! importance passes) and the rate achieved, against the dense bf16 tensor-core peak of the
//! device's datasheet (H100/H200 SXM: 989 TFLOP/s); a measured GEMM rate is not available here
//! (no cuBLAS dependency). Without a GPU it says so and measures nothing.

mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use headwise::redundancy::{QueryRing, RkvOptions, RkvTrigger, RkvWorkspace, evict};
use headwise::{GpuBuf, LayerCache, LayoutBuilder};
use std::time::{Duration, Instant};

const HEAD_DIM: usize = 128;
const DATASHEET_BF16_TFLOPS: f64 = 989.0;

fn bench(c: &mut Criterion) {
    let gpu = support::gpu_or_not_run("redundancy");
    if support::emu_traffic_wanted(gpu.is_some()) {
        emu_traffic();
    }
    let Some(store) = gpu else { return };
    let bw = support::copy_bandwidth(&store);
    eprintln!("device copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
    let mut group = c.benchmark_group("redundancy");
    for (model, kv_heads, g) in [("llama8b_r1", 8usize, 4usize), ("qwen7b_r1", 4, 7)] {
        for batch in support::sizes(&[1usize, 8], &[1]) {
            for budget in support::sizes(&[512usize, 1024, 2048, 4096], &[512, 2048]) {
                let opts = RkvOptions::new(budget);
                let len = budget + opts.buffer;
                let mut lb = LayoutBuilder::new(batch, kv_heads);
                for b in 0..batch {
                    for h in 0..kv_heads {
                        lb = lb.full(b, h, len as u32);
                    }
                }
                let layout = lb.build().unwrap();
                let elems = layout.total_rows() * HEAD_DIM;
                let mut cache = Some(
                    LayerCache::<_, bf16>::from_parts(
                        &store,
                        layout.clone(),
                        HEAD_DIM,
                        GpuBuf::owned(support::filled::<bf16>(&store, elems)),
                        GpuBuf::owned(support::filled::<bf16>(&store, elems)),
                    )
                    .unwrap(),
                );
                let heads = batch * kv_heads * g;
                let mut ring = QueryRing::<_, bf16>::new(&store, heads, opts.alpha, HEAD_DIM).unwrap();
                let q = GpuBuf::owned(support::filled::<bf16>(&store, heads * HEAD_DIM));
                for _ in 0..opts.alpha {
                    ring.push(&q).unwrap();
                }
                let mut ws = RkvWorkspace::new();
                let segs = batch * kv_heads;
                let n = len - opts.alpha;
                let flops = segs as f64
                    * (2.0 * (len * len * HEAD_DIM) as f64
                        + 2.0 * 2.0 * (g * opts.alpha * n * HEAD_DIM) as f64);
                let name = format!("{model}_b{batch}_budget{budget}");
                let mut samples = Vec::new();
                group.bench_function(&name, |bch| {
                    bch.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            // Every step starts from the full segments again (evict compacts them).
                            let (_, k, v) = cache.take().unwrap().into_parts();
                            let mut fresh =
                                LayerCache::from_parts(&store, layout.clone(), HEAD_DIM, k, v).unwrap();
                            store.synchronize().unwrap();
                            let t = Instant::now();
                            evict(&mut fresh, &ring, g, &opts, RkvTrigger::Threshold, &mut ws).unwrap();
                            store.synchronize().unwrap();
                            total += t.elapsed();
                            cache = Some(fresh);
                        }
                        samples.push(total.as_secs_f64() / iters as f64);
                        total
                    })
                });
                let per_step = support::median(&mut samples);
                let tflops = flops / per_step / 1e12;
                // Bytes: K read once, the kept K/V rows read and written by the compaction.
                let bytes = segs * len * HEAD_DIM * 2 + 2 * 2 * segs * budget * HEAD_DIM * 2;
                let compute_floor = flops / (DATASHEET_BF16_TFLOPS * 1e12);
                let memory_floor = bytes as f64 / bw;
                let basis =
                    if compute_floor >= memory_floor { "flops/datasheet_bf16" } else { "bytes/copy_bw" };
                support::floor_line(
                    "redundancy",
                    &name,
                    per_step,
                    compute_floor.max(memory_floor),
                    basis,
                    &format!(
                        "model={model} batch={batch} budget={budget} len={len} kv_heads={kv_heads} group={g} \
                         head_dim={HEAD_DIM} alpha={} flops={flops:.0} bytes={bytes}",
                        opts.alpha
                    ),
                );
                eprintln!(
                    "{name}: {:.2} GFLOP per step, median sample {:.1} us, {tflops:.1} TFLOP/s = {:.1}% of the \
                     {DATASHEET_BF16_TFLOPS} TFLOP/s datasheet peak",
                    flops / 1e9,
                    per_step * 1e6,
                    100.0 * tflops / DATASHEET_BF16_TFLOPS
                );
            }
        }
    }
    group.finish();
}

/// Emulator-mode memory traffic of one R-KV step, Llama-3.1-8B-R1 heads at batch 1, budget 128
/// (len = budget + buffer). The GPU line reports FLOPs, not bytes; the byte floor here is K read
/// once plus the kept K/V rows read and written once per segment (the compaction).
fn emu_traffic() {
    use headwise::{EmuStore, Store};
    let store = EmuStore;
    let (kv_heads, g, budget) = (8usize, 4usize, 128usize);
    let opts = RkvOptions::new(budget);
    let len = budget + opts.buffer;
    let mut lb = LayoutBuilder::new(1, kv_heads);
    for h in 0..kv_heads {
        lb = lb.full(0, h, len as u32);
    }
    let layout = lb.build().unwrap();
    let elems = layout.total_rows() * HEAD_DIM;
    let pattern =
        |n: usize| (0..n).map(|i| bf16::from_f32(((i * 7919) % 61) as f32 / 61.0 - 0.5)).collect::<Vec<_>>();
    let k = store.upload(&pattern(elems)).unwrap();
    let v = store.upload(&pattern(elems)).unwrap();
    let mut cache = LayerCache::<_, bf16>::from_parts(&store, layout, HEAD_DIM, k, v).unwrap();
    let heads = kv_heads * g;
    let mut ring = QueryRing::<_, bf16>::new(&store, heads, opts.alpha, HEAD_DIM).unwrap();
    let q = store.upload(&pattern(heads * HEAD_DIM)).unwrap();
    let push = support::emu_traffic(|_| ring.push(&q).unwrap());
    support::print_emu_traffic(
        "redundancy",
        &format!("query_push_heads{heads}_d{HEAD_DIM}_bf16"),
        2 * (heads * HEAD_DIM * 2) as u64,
        &push,
    );
    for _ in 1..opts.alpha {
        ring.push(&q).unwrap();
    }
    let mut ws = RkvWorkspace::new();
    let t = support::emu_traffic(|_| {
        evict(&mut cache, &ring, g, &opts, RkvTrigger::Threshold, &mut ws).unwrap();
    });
    let floor = (kv_heads * (len * HEAD_DIM * 2 + 2 * 2 * budget * HEAD_DIM * 2)) as u64;
    support::print_emu_traffic(
        "redundancy",
        &format!("llama8b_r1_b1_budget{budget}_len{len}_d{HEAD_DIM}_bf16"),
        floor,
        &t,
    );
}

criterion_group! {
    name = benches;
    config = support::config(1000, 2000, 10);
    targets = bench
}
criterion_main!(benches);
