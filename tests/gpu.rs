//! GPU tests. Opening a store must never panic, GPU or not (checked in every run). The kernel
//! tests need `--features gpu-tests` and a GPU; with the feature on and no GPU they fail, so a
//! GPU run cannot pass by skipping.
//!
//! `HEADWISE_GPU_QUICK=1` keeps every kernel, dtype and head_dim but cuts the shapes: fewer
//! group sizes, 8 proptest cases instead of 64, 32k-token long rows instead of 128k+ (the GPU
//! pass, scripts/gpu_pass.py, runs this first and the full set when time remains).
#![cfg(feature = "cuda")]

mod common;

use headwise::{Error, GpuStore};

#[test]
fn opening_a_gpu_store_returns_an_error_not_a_panic() {
    let opened = std::panic::catch_unwind(|| GpuStore::new(0).map(|_| ()));
    match opened.expect("GpuStore::new panicked") {
        Ok(()) => eprintln!("gpu: a GPU is present"),
        Err(e @ (Error::NoGpu(_) | Error::NoKernels)) => eprintln!("gpu: no GPU here ({e})"),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    let far = std::panic::catch_unwind(|| GpuStore::new(1 << 20).map(|_| ()));
    assert!(matches!(far.expect("GpuStore::new panicked"), Err(Error::NoGpu(_) | Error::NoKernels)));
}

#[cfg(feature = "gpu-tests")]
mod on_gpu {
    use super::common::select::{
        attention_after_compress, case_strategy, chunk_splits, compress_into_scenario, long_rows,
        nan_scenario, score_rows, tied_runs,
    };
    use super::common::{
        AttnSeg, SegSpec, append_scenario, attention_scenario, attn_layout, attn_seg, build_layout, seg_spec,
    };
    use super::common::{CaseBudgets, SelectCase, SelectData, select_scenario};
    use half::{bf16, f16};
    use headwise::AttentionOptions;
    use headwise::select::{GqaReduce, Granularity, Pool, SelectOptions};
    use headwise::{GpuStore, KvElem, Store};
    use proptest::prelude::*;

    /// `HEADWISE_GPU_QUICK` set to anything but `0`.
    fn quick() -> bool {
        std::env::var("HEADWISE_GPU_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
    }

    /// `full`, or `reduced` under [`quick`].
    fn pick<T: Clone>(full: &[T], reduced: &[T]) -> Vec<T> {
        if quick() { reduced.to_vec() } else { full.to_vec() }
    }

    /// Proptest cases per property: 64, or 8 under [`quick`].
    fn cases() -> ProptestConfig {
        ProptestConfig::with_cases(if quick() { 8 } else { 64 })
    }

    fn store() -> GpuStore {
        GpuStore::new(0).unwrap_or_else(|e| panic!("gpu-tests enabled but no usable GPU: {e}"))
    }

    #[test]
    fn append_matches_reference_on_gpu() {
        let store = store();
        for head_dim in [64, 128, 256] {
            let specs = [
                SegSpec::Streaming { sink: 2, window: 3 },
                SegSpec::Full { len: 1, headroom: 2 },
                SegSpec::Streaming { sink: 0, window: 1 },
                SegSpec::Full { len: 0, headroom: 0 },
                SegSpec::Streaming { sink: 4, window: 7 },
            ];
            let layout = build_layout(1, 5, &specs, &[0, 3, 0, 1, 2]);
            append_scenario::<_, f16>(&store, layout.clone(), head_dim, 40, 3, head_dim as u64);
            append_scenario::<_, bf16>(&store, layout, head_dim, 40, 3, 1 + head_dim as u64);
        }
    }

    proptest! {
        #![proptest_config(cases())]
        #[test]
        fn append_random_layouts_on_gpu(
            (batch, kv_heads, specs, gaps) in (1usize..9, 1usize..9).prop_flat_map(|(b, h)| {
                (Just(b), Just(h), proptest::collection::vec(seg_spec(), b * h), proptest::collection::vec(0u32..3, b * h))
            }),
            head_dim in prop::sample::select(vec![64usize, 128, 256]),
            steps in 0usize..24,
            seed in any::<u64>(),
        ) {
            let layout = build_layout(batch, kv_heads, &specs, &gaps);
            append_scenario::<_, bf16>(&store(), layout, head_dim, steps, 2, seed);
        }
    }

    #[test]
    fn cudarc_buffers_and_stream_in_place() {
        // The engine's stream and cudarc buffers: views of whole slices and of sub-slices
        // (CudaView) give the same results as headwise-owned uploads, on the engine's stream.
        let owned = store();
        let store = headwise::GpuStore::from_stream(owned.stream().clone()).unwrap();
        assert!(std::sync::Arc::ptr_eq(store.stream(), owned.stream()));
        let layout = headwise::LayoutBuilder::new(2, 4)
            .headroom(16)
            .full(0, 0, 3)
            .streaming(1, 2, 2, 4)
            .build()
            .unwrap();
        let (g, d) = (4usize, 128usize);
        let heads = layout.segments().len() * g;
        let q_host: Vec<bf16> =
            (0..heads * d).map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 50.0)).collect();
        let kv_host: Vec<bf16> =
            (0..8 * d).map(|i| bf16::from_f32(((i * 13 % 97) as f32 - 48.0) / 48.0)).collect();
        let run =
            |q: &headwise::GpuBuf<bf16>, k: &headwise::GpuBuf<bf16>, out: &mut headwise::GpuBuf<bf16>| {
                let mut cache = headwise::LayerCache::<_, bf16>::new(&store, layout.clone(), d).unwrap();
                cache.append(k, k).unwrap();
                let mut ws = headwise::AttentionWorkspace::new();
                cache.attention(q, g, out, None, &mut ws, &headwise::AttentionOptions::default()).unwrap();
            };
        let mut want = store.zeros::<bf16>(heads * d).unwrap();
        run(&store.upload(&q_host).unwrap(), &store.upload(&kv_host).unwrap(), &mut want);
        // The engine's buffers: q inside a larger allocation (a CudaView), k and out whole.
        let mut padded = vec![bf16::ZERO; d];
        padded.extend_from_slice(&q_host);
        let q_big = store.stream().clone_htod(&padded).unwrap();
        let k_slice = store.stream().clone_htod(&kv_host).unwrap();
        let mut out_slice = store.stream().alloc_zeros::<bf16>(heads * d).unwrap();
        {
            let q_view = q_big.slice(d..);
            let (q, k) = (store.view("q", &q_view).unwrap(), store.view("k", &k_slice).unwrap());
            let mut out = store.view_mut("out", &mut out_slice).unwrap();
            run(&q, &k, &mut out);
        }
        let got = store.stream().clone_dtoh(&out_slice).unwrap();
        assert_eq!(got, store.download(&want).unwrap());
    }

    #[test]
    fn engine_memory_entry_point() {
        // Memory the "engine" owns, wrapped without transferring ownership.
        let store = store();
        let layout = headwise::LayoutBuilder::new(2, 4).headroom(8).build().unwrap();
        let elems = layout.total_rows() * 128;
        let k = store.stream().alloc_zeros::<bf16>(elems).unwrap();
        let v = store.stream().alloc_zeros::<bf16>(elems).unwrap();
        let (kp, vp) = (k.leak(), v.leak());
        // SAFETY: kp/vp are live allocations of `elems` bf16 on this store's context and stream.
        let (kb, vb) = unsafe {
            (
                headwise::GpuBuf::borrowed(kp as usize as _, elems),
                headwise::GpuBuf::borrowed(vp as usize as _, elems),
            )
        };
        let mut cache = headwise::LayerCache::<_, bf16>::from_parts(&store, layout, 128, kb, vb).unwrap();
        let new: Vec<bf16> = (0..8 * 128).map(|i| bf16::from_f32(i as f32)).collect();
        let dn = store.upload(&new).unwrap();
        cache.append(&dn, &dn).unwrap();
        let got = store.download(cache.k()).unwrap();
        for s in 0..8 {
            let row = cache.layout().segments()[s].offset as usize;
            assert_eq!(&got[row * 128..(row + 1) * 128], &new[s * 128..(s + 1) * 128]);
        }
        // Misaligned engine pointers are refused before any launch.
        let bad = unsafe { headwise::GpuBuf::<bf16>::borrowed((kp + 2) as usize as _, elems) };
        let again = unsafe { headwise::GpuBuf::<bf16>::borrowed(vp as usize as _, elems) };
        let layout = headwise::LayoutBuilder::new(2, 4).headroom(8).build().unwrap();
        assert!(headwise::LayerCache::<_, bf16>::from_parts(&store, layout, 128, bad, again).is_err());
        // SAFETY: give the leaked allocations back to cudarc so they are freed.
        drop(unsafe {
            (
                store.stream().upgrade_device_ptr::<bf16>(kp, elems),
                store.stream().upgrade_device_ptr::<bf16>(vp, elems),
            )
        });
    }

    #[test]
    fn attention_matches_reference_on_gpu() {
        let store = store();
        let segs = [
            AttnSeg::Full { len: 0 },
            AttnSeg::Full { len: 1 },
            AttnSeg::Streaming { sink: 3, window: 9, fill: 12, ring_head: 5 },
            AttnSeg::Full { len: 5000 },
            AttnSeg::Streaming { sink: 16, window: 64, fill: 30, ring_head: 0 },
            AttnSeg::Full { len: 300 },
        ];
        let layout = attn_layout(2, 3, &segs);
        for head_dim in [64, 128, 256] {
            for group in pick(&[1, 2, 3, 4, 5, 7, 8, 16], &[1, 3, 8, 16]) {
                let seed = (head_dim * 100 + group) as u64;
                for opts in [
                    AttentionOptions::default(),
                    AttentionOptions { chunk_tokens: Some(37), scale: Some(0.05) },
                ] {
                    attention_scenario::<_, f16>(&store, layout.clone(), head_dim, group, opts, true, seed);
                    attention_scenario::<_, bf16>(
                        &store,
                        layout.clone(),
                        head_dim,
                        group,
                        opts,
                        false,
                        seed + 1,
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(cases())]
        #[test]
        fn attention_random_layouts_on_gpu(
            (batch, kv_heads, segs) in (1usize..5, 1usize..9).prop_flat_map(|(b, h)| {
                (Just(b), Just(h), proptest::collection::vec(attn_seg(3000), b * h))
            }),
            head_dim in prop::sample::select(vec![64usize, 128, 256]),
            group in 1usize..17,
            chunk in prop::option::of(1u32..600),
            seed in any::<u64>(),
        ) {
            let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
            attention_scenario::<_, bf16>(&store(), attn_layout(batch, kv_heads, &segs), head_dim, group, opts, true, seed);
        }
    }

    /// Prefill compression: every policy (uniform, per-row, AdaKV), granularity, dtype and
    /// head_dim on Llama-like groups, prompts long enough for the planner to split.
    fn select_every_policy<T: KvElem>(store: &GpuStore, head_dim: usize) {
        for (group, granularity) in pick(
            &[(4, Granularity::KvHead), (2, Granularity::QueryHead), (8, Granularity::KvHead)],
            &[(4, Granularity::KvHead), (2, Granularity::QueryHead)],
        ) {
            let mut c = SelectCase {
                batch: 2,
                kv_heads: 2,
                group,
                q: 3000,
                head_dim,
                opts: SelectOptions { window: 32, granularity, ..SelectOptions::default() },
                budgets: CaseBudgets::PerRow(vec![]),
                seed: head_dim as u64 + group as u64,
            };
            let rows = score_rows(&c);
            c.budgets = CaseBudgets::PerRow(vec![256; rows]);
            select_scenario::<_, T>(store, &c);
            c.budgets = CaseBudgets::PerRow((0..rows as u32).map(|i| 32 + 397 * i).collect());
            select_scenario::<_, T>(store, &c);
            c.budgets = CaseBudgets::AdaKv { base: 300, floor_alpha: 0.2 };
            select_scenario::<_, T>(store, &c);
        }
    }

    #[test]
    fn select_every_policy_dtype_and_head_dim_on_gpu() {
        let store = store();
        for d in [64, 128, 256] {
            select_every_policy::<f16>(&store, d);
            select_every_policy::<bf16>(&store, d);
        }
    }

    proptest! {
        #![proptest_config(cases())]
        #[test]
        fn select_random_cases_on_gpu(case in case_strategy(3000)) {
            select_scenario::<_, bf16>(&store(), &case);
        }
    }

    /// 128k-token rows (the target), random and all-tied.
    #[test]
    fn select_long_rows_on_gpu() {
        let (a, b) = if quick() { (32_768, 33_000) } else { (131_072, 140_000) };
        long_rows::<_, bf16>(&store(), a, 32, 1);
        long_rows::<_, f16>(&store(), b, 7, 2);
    }

    #[test]
    fn select_exact_ties_on_gpu() {
        let store = store();
        for (d, g, pool) in
            [(64, 1, Pool::Max), (128, 4, Pool::Max), (256, 2, Pool::Avg), (128, 8, Pool::Avg)]
        {
            tied_runs::<_, f16>(&store, d, g, pool, 21);
            tied_runs::<_, bf16>(&store, d, g, pool, 22);
        }
    }

    #[test]
    fn select_nan_on_gpu() {
        let store = store();
        let (q, w, d) = (120, 8, 64);
        for granularity in [Granularity::KvHead, Granularity::QueryHead] {
            for (pool, gqa) in
                [(Pool::Max, GqaReduce::Mean), (Pool::Avg, GqaReduce::Mean), (Pool::Avg, GqaReduce::Max)]
            {
                let c = SelectCase {
                    batch: 1,
                    kv_heads: 3,
                    group: 2,
                    q,
                    head_dim: d,
                    opts: SelectOptions { window: w, pool, gqa, granularity, ..SelectOptions::default() },
                    budgets: CaseBudgets::PerRow(vec![]),
                    seed: 31,
                };
                let rows = score_rows(&c) as u32;
                let c =
                    SelectCase { budgets: CaseBudgets::PerRow((0..rows).map(|r| 8 + 9 * r).collect()), ..c };
                let hit: Vec<usize> =
                    if granularity == Granularity::QueryHead { vec![2, 3] } else { vec![1] };
                for token in [40, 0, q - w, q - 1] {
                    let poison = |data: &mut SelectData<bf16>| data.k[(q + token) * d + 5] = bf16::NAN;
                    nan_scenario::<_, bf16>(&store, &c, poison, &hit);
                }
            }
        }
    }

    #[test]
    fn select_forced_chunks_on_gpu() {
        let store = store();
        chunk_splits::<_, f16>(&store, 64, &[1, 7, 33, 199, 200], &[1, 7, 1000], 41);
        chunk_splits::<_, bf16>(&store, 128, &[1, 63, 64, 65], &[1, 65], 43);
        chunk_splits::<_, bf16>(&store, 256, &[1, 31, 33], &[1, 33], 42);
    }

    #[test]
    fn select_compress_into_on_gpu() {
        let store = store();
        compress_into_scenario::<_, f16>(&store, Granularity::KvHead, 51);
        compress_into_scenario::<_, bf16>(&store, Granularity::QueryHead, 52);
    }

    #[test]
    fn packed_prompts_on_gpu() {
        // Packed (cu_seqlens) prompts of mixed lengths vs each sequence alone, head-major.
        let store = store();
        for d in [64, 128, 256] {
            super::common::packed::packed_prompts_match_head_major::<_, f16>(&store, d, 4, 61 + d as u64);
            super::common::packed::packed_prompts_match_head_major::<_, bf16>(&store, d, 8, 67 + d as u64);
        }
    }

    /// Chunk attention (q_len > 1, causal, query tiles over grid z) against the f64 reference
    /// on every head_dim x dtype, G 1/2/4/8/16 (both tile sizes), unsplit and split; then multi-token append and
    /// rollback against the model, as tests/attention_chunk.rs does on the emulator.
    #[test]
    fn attention_chunk_on_gpu() {
        use super::common::chunk::{Model, check_against_model, chunk_layout, chunk_rows, chunk_scenario};
        let store = store();
        for d in [64, 128, 256] {
            for (g, q_len) in [(1, 64), (2, 4), (4, 7), (8, 16), (16, 3)] {
                let layout = chunk_layout(q_len as u32);
                for chunk in [None, Some(37)] {
                    let opts = headwise::AttentionOptions { chunk_tokens: chunk, scale: None };
                    chunk_scenario::<_, f16>(&store, &layout, d, g, q_len, opts, true, (d + g) as u64);
                    chunk_scenario::<_, bf16>(&store, &layout, d, g, q_len, opts, true, (d + g + 1) as u64);
                }
            }
        }
        let segs =
            vec![headwise::layout::Segment::full(0, 40, 0), headwise::layout::Segment::streaming(40, 2, 6)];
        let layout = headwise::layout::LayerLayout::new(1, 2, 48, segs).unwrap();
        let mut models: Vec<Model> =
            layout.segments().iter().map(|s| Model { mode: s.mode, tokens: vec![] }).collect();
        let mut cache = headwise::LayerCache::<_, bf16>::new(&store, layout, 128).unwrap();
        let mut next = 1;
        for (tokens, reject) in [(5usize, 2u32), (9, 0), (4, 3), (1, 1), (6, 5)] {
            let (k, v, ids) = chunk_rows::<bf16>(cache.layout(), 128, tokens, &mut next);
            cache.append_tokens(&store.upload(&k).unwrap(), &store.upload(&v).unwrap(), tokens).unwrap();
            for (m, ids) in models.iter_mut().zip(ids) {
                ids.into_iter().for_each(|id| m.push(id));
            }
            cache.rollback(&[reject]).unwrap();
            for m in &mut models {
                let keep = m.tokens.len() - reject as usize;
                m.tokens.truncate(keep);
            }
            check_against_model(&cache, &models, &format!("append {tokens}, reject {reject}"));
        }
    }

    #[test]
    fn select_then_attention_on_gpu() {
        let store = store();
        for d in [64, 128, 256] {
            for granularity in [Granularity::KvHead, Granularity::QueryHead] {
                attention_after_compress::<_, f16>(&store, granularity, d, 61 + d as u64);
                attention_after_compress::<_, bf16>(&store, granularity, d, 62 + d as u64);
            }
        }
    }

    /// R-KV on the GPU: the same checks as tests/redundancy.rs (reference scores, exact
    /// selection over the device's scores, byte-identical compaction), at decode-like sizes, plus
    /// the planted-duplicates property.
    #[test]
    fn rkv_matches_reference_on_gpu() {
        use super::common::{RkvCase, rkv_scenario};
        use headwise::redundancy::RkvOptions;
        let store = store();
        for head_dim in [64, 128, 256] {
            for (group, alpha) in pick(&[(1, 8), (4, 8), (7, 16)], &[(4, 8), (7, 16)]) {
                let case = RkvCase {
                    batch: 2,
                    kv_heads: 2,
                    group,
                    head_dim,
                    segs: vec![Ok(1200), Ok(700), Err((4, 64)), Ok(1100)],
                    opts: RkvOptions { alpha, ..RkvOptions::new(1000) },
                    pushes: 11,
                    forced: None,
                    duplicates: vec![(0, 5, vec![300, 900])],
                    seed: head_dim as u64 * 31 + group as u64,
                };
                rkv_scenario::<_, bf16>(&store, &case);
                rkv_scenario::<_, f16>(&store, &case);
            }
        }
    }

    /// H2O on the GPU: the same checks as tests/heavy_hitters.rs (mass over decode steps vs the
    /// reference, output bit-identical to plain attention, token-exact eviction, byte-identical
    /// compaction), with segments long enough for the planner to split them (`None`) and with
    /// the split forced off.
    #[test]
    fn h2o_matches_reference_on_gpu() {
        use super::common::h2o::{H2oCase, H2oSeg, h2o_scenario};
        use headwise::heavy_hitters::H2oOptions;
        let store = store();
        for head_dim in [64, 128, 256] {
            for group in pick(&[1, 4, 8], &[4, 8]) {
                for chunk_tokens in pick(&[None, Some(1 << 30)], &[None]) {
                    let case = H2oCase {
                        batch: 2,
                        kv_heads: 2,
                        group,
                        head_dim,
                        segs: vec![
                            H2oSeg::Full { len: 2000 },
                            H2oSeg::Streaming { sink: 4, window: 64, fill: 68, ring_head: 17 },
                            H2oSeg::Full { len: 700 },
                            H2oSeg::Full { len: 1500 },
                        ],
                        steps: (5, 3),
                        opts: H2oOptions { budget: 1024, recent: 64 },
                        chunk_tokens,
                        with_lse: group != 4,
                        seed: head_dim as u64 * 7 + group as u64,
                    };
                    h2o_scenario::<_, bf16>(&store, &case);
                    h2o_scenario::<_, f16>(&store, &case);
                }
            }
        }
    }
}
