//! Prefill compression on the GPU, one Llama-3-8B layer (8 KV heads, G = 4, head_dim 128,
//! bf16, window 32, max-pool 7, batch 1): prompts of 8k/32k/128k tokens, budgets 64 to 2048,
//! each policy: SnapKV (uniform), PyramidKV (layer 0 of 32, the largest budget, from
//! `policy::budget::pyramid`), HeadKV (layer 0's per-KV-head budgets from the HeadKV-R2 score
//! file of Llama-3-8B-Instruct when ../shared/data is present, otherwise from synthetic scores)
//! and AdaKV (allocated on the device, floor alpha 0.2). Each launch is `compress_into` a
//! preallocated destination, so the time is the kernels (and, for AdaKV, the read-back of its
//! counts), not allocation.
//!
//! Printed beside criterion's time: the floor, the bytes no implementation can avoid (K read
//! twice: softmax statistics, then scores; the kept K and V rows read once and written once)
//! over the measured device copy bandwidth, and measured / floor. Without a GPU it says so and
//! measures nothing.

mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use headwise::policy::budget::{HeadKvOptions, headkv, pyramid};
use headwise::policy::head_scores::HeadScores;
use headwise::select::{Budgets, Prompt, SelectOptions, SelectWorkspace, compress_into};
use headwise::{GpuBuf, LayerCache, LayoutBuilder};
use std::path::Path;
use std::time::Instant;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const HEAD_DIM: usize = 128;
const WINDOW: u32 = 32;
const LAYERS: usize = 32;
const ELEM: usize = 2; // bf16

/// Per-KV-head HeadKV importance for all layers, `[layer][kv_head]`, and where it came from.
fn headkv_importance() -> (Vec<f32>, &'static str) {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/head-scores/headkv/Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json");
    match HeadScores::load(&file).and_then(|s| s.to_kv_heads(KV_HEADS)) {
        Ok(s) if s.layers() == LAYERS => (s.as_slice().to_vec(), "HeadKV-R2 file, Llama-3-8B-Instruct"),
        _ => {
            // Uneven but fixed: a few heads far more important than the rest, as in the real files.
            let imp =
                (0..LAYERS * KV_HEADS).map(|i| (0.05 + ((i * 7919) % 97) as f32 / 97.0).powi(3)).collect();
            (imp, "synthetic (score file not found)")
        }
    }
}

fn bench(c: &mut Criterion) {
    let gpu = support::gpu_or_not_run("select");
    if support::emu_traffic_wanted(gpu.is_some()) {
        emu_traffic();
    }
    let Some(store) = gpu else { return };
    let bw = support::copy_bandwidth(&store);
    eprintln!("device copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
    let (importance, source) = headkv_importance();
    eprintln!("HeadKV scores: {source}");
    let mut group = c.benchmark_group("select");
    let opts = SelectOptions { window: WINDOW as usize, pool_kernel: 7, ..SelectOptions::default() };
    let mut ws = SelectWorkspace::new();
    for q in [8192usize, 32768, 131072] {
        let elems = KV_HEADS * q * HEAD_DIM;
        let k = GpuBuf::owned(support::filled::<bf16>(&store, elems));
        let v = GpuBuf::owned(support::filled::<bf16>(&store, elems));
        let queries =
            GpuBuf::owned(support::filled::<bf16>(&store, KV_HEADS * GROUP * WINDOW as usize * HEAD_DIM));
        let prompt = Prompt {
            k: &k,
            v: &v,
            queries: &queries,
            batch: 1,
            kv_heads: KV_HEADS,
            group_size: GROUP,
            q_len: q,
            head_dim: HEAD_DIM,
            packing: Default::default(),
        };
        for budget in support::sizes(&[64u32, 256, 1024, 2048], &[1024]) {
            let pyramid_l0 = pyramid(budget, WINDOW, LAYERS, q as u32, 20).unwrap()[0];
            let headkv_l0 = headkv(&importance, budget, WINDOW, &HeadKvOptions::default()).unwrap();
            let (snapkv, pyramidkv) = ([budget; KV_HEADS], [pyramid_l0; KV_HEADS]);
            let policies = [
                ("snapkv", Budgets::PerRow(&snapkv)),
                ("pyramidkv_l0", Budgets::PerRow(&pyramidkv)),
                ("headkv_l0", Budgets::PerRow(&headkv_l0[..KV_HEADS])),
                ("adakv", Budgets::AdaKv { base: budget, floor_alpha: 0.2 }),
            ];
            for (policy, budgets) in policies {
                // Room for the most a row can keep: its budget, or under AdaKV the whole layer's
                // prefix budget (every global top score in one row) plus the window.
                let most = match budgets {
                    Budgets::PerRow(b) => b.iter().copied().max().unwrap(),
                    Budgets::AdaKv { base, .. } => KV_HEADS as u32 * (base - WINDOW) + WINDOW,
                    // Not benchmarked here: up to the whole prompt.
                    Budgets::Threshold(_) => q as u32,
                };
                let mut lb = LayoutBuilder::new(1, KV_HEADS).headroom(most.min(q as u32));
                for h in 0..KV_HEADS {
                    lb = lb.full(0, h, 0);
                }
                let mut dest = LayerCache::<_, bf16>::new(&store, lb.build().unwrap(), HEAD_DIM).unwrap();
                compress_into(&mut dest, &prompt, budgets, &opts, &mut ws).unwrap();
                let kept = dest.layout().rows_in_use() as usize;
                let bytes = 2 * elems * ELEM + 2 * 2 * kept * HEAD_DIM * ELEM;
                let floor = bytes as f64 / bw;
                let name = format!("{policy}_q{}k_b{budget}", q / 1024);
                let mut per_launch = Vec::new();
                group.bench_function(&name, |bch| {
                    bch.iter_custom(|iters| {
                        store.synchronize().unwrap();
                        let t = Instant::now();
                        for _ in 0..iters {
                            compress_into(&mut dest, &prompt, budgets, &opts, &mut ws).unwrap();
                        }
                        store.synchronize().unwrap();
                        let d = t.elapsed();
                        per_launch.push(d.as_secs_f64() / iters as f64);
                        d
                    })
                });
                let measured = support::median(&mut per_launch);
                eprintln!(
                    "{name}: {kept} rows kept, {:.1} MB floor = {:.1} us, measured {:.1} us (median sample), {:.2}x the floor",
                    bytes as f64 / 1e6,
                    floor * 1e6,
                    measured * 1e6,
                    measured / floor,
                );
                support::floor_line(
                    "select",
                    &name,
                    measured,
                    floor,
                    "bytes/copy_bw",
                    &format!(
                        "policy={policy} q={q} budget={budget} kept={kept} batch=1 kv_heads={KV_HEADS} \
                         group={GROUP} head_dim={HEAD_DIM} window={WINDOW} bytes={bytes}"
                    ),
                );
            }
        }
    }
    group.finish();
}

/// Emulator-mode memory traffic of one compression at a 1k-token prompt, budget 128, SnapKV
/// and AdaKV, against the GPU line's floor (K read twice, kept K/V rows read and written once).
fn emu_traffic() {
    use headwise::{EmuStore, Store};
    let store = EmuStore;
    let q = 1024usize;
    let elems = KV_HEADS * q * HEAD_DIM;
    let pattern =
        |n: usize| (0..n).map(|i| bf16::from_f32(((i * 7919) % 61) as f32 / 61.0 - 0.5)).collect::<Vec<_>>();
    let k = store.upload(&pattern(elems)).unwrap();
    let v = store.upload(&pattern(elems)).unwrap();
    let queries = store.upload(&pattern(KV_HEADS * GROUP * WINDOW as usize * HEAD_DIM)).unwrap();
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &queries,
        batch: 1,
        kv_heads: KV_HEADS,
        group_size: GROUP,
        q_len: q,
        head_dim: HEAD_DIM,
        packing: Default::default(),
    };
    let opts = SelectOptions { window: WINDOW as usize, pool_kernel: 7, ..SelectOptions::default() };
    let budget = 128u32;
    let snapkv = [budget; KV_HEADS];
    for (policy, budgets) in
        [("snapkv", Budgets::PerRow(&snapkv)), ("adakv", Budgets::AdaKv { base: budget, floor_alpha: 0.2 })]
    {
        let mut lb = LayoutBuilder::new(1, KV_HEADS).headroom(KV_HEADS as u32 * (budget - WINDOW) + WINDOW);
        for h in 0..KV_HEADS {
            lb = lb.full(0, h, 0);
        }
        let mut dest = LayerCache::<_, bf16>::new(&store, lb.build().unwrap(), HEAD_DIM).unwrap();
        let mut ws = SelectWorkspace::new();
        let t = support::emu_traffic(|_| compress_into(&mut dest, &prompt, budgets, &opts, &mut ws).unwrap());
        let kept = dest.layout().rows_in_use() as usize;
        let floor = (2 * elems * ELEM + 2 * 2 * kept * HEAD_DIM * ELEM) as u64;
        support::print_emu_traffic(
            "select",
            &format!("{policy}_q1k_b{budget}_kv{KV_HEADS}_g{GROUP}_d{HEAD_DIM}_bf16"),
            floor,
            &t,
        );
    }
}

criterion_group! {
    name = benches;
    config = support::config(300, 1000, 10);
    targets = bench
}
criterion_main!(benches);
