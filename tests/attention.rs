//! Decode attention through the emulator against the f64 reference (see
//! common::attention_scenario for what is checked).
#![cfg(feature = "emulator")]

mod common;

use common::{AttnSeg, attention_scenario, attn_layout, attn_seg};
use half::{bf16, f16};
use headwise::attention::{AttentionPlan, MIN_CHUNK, plan};
use headwise::layout::{LayerLayout, Segment};
use headwise::{
    AttentionOptions, AttentionWorkspace, EmuStore, Error, KvElem, LayerCache, LayoutBuilder, Store,
};
use proptest::prelude::*;

fn cases() -> u32 {
    if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 96 } else { 12 }
}

fn layout_strategy(max_len: u32) -> impl Strategy<Value = (usize, usize, Vec<AttnSeg>)> {
    (1usize..3, 1usize..4)
        .prop_flat_map(move |(b, h)| (Just(b), Just(h), proptest::collection::vec(attn_seg(max_len), b * h)))
}

fn opts_strategy() -> impl Strategy<Value = AttentionOptions> {
    (prop::option::of(1u32..48), prop::option::of(0.02f32..0.3))
        .prop_map(|(chunk_tokens, scale)| AttentionOptions { scale, chunk_tokens })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn emulator_matches_reference_f16(
        (batch, kv_heads, segs) in layout_strategy(200),
        head_dim in prop::sample::select(vec![64usize, 128, 256]),
        group in prop::sample::select(vec![1usize, 2, 4, 5, 7, 8, 16]),
        opts in opts_strategy(),
        with_lse in any::<bool>(),
        seed in any::<u64>(),
    ) {
        attention_scenario::<_, f16>(&EmuStore, attn_layout(batch, kv_heads, &segs), head_dim, group, opts, with_lse, seed);
    }

    #[test]
    fn emulator_matches_reference_bf16(
        (batch, kv_heads, segs) in layout_strategy(200),
        head_dim in prop::sample::select(vec![64usize, 128, 256]),
        group in prop::sample::select(vec![1usize, 2, 3, 4, 5, 7, 8, 12, 16]),
        opts in opts_strategy(),
        with_lse in any::<bool>(),
        seed in any::<u64>(),
    ) {
        attention_scenario::<_, bf16>(&EmuStore, attn_layout(batch, kv_heads, &segs), head_dim, group, opts, with_lse, seed);
    }
}

/// Every head_dim x dtype x the group sizes, on one mixed layout that has an empty
/// segment, a one-token one, a wrapped ring and a segment split by the planner.
#[test]
fn every_head_dim_dtype_and_group() {
    let segs = [
        AttnSeg::Full { len: 0 },
        AttnSeg::Full { len: 1 },
        AttnSeg::Streaming { sink: 3, window: 9, fill: 12, ring_head: 5 },
        AttnSeg::Full { len: 700 },
    ];
    let layout = attn_layout(2, 2, &segs);
    assert!(plan(&layout, 132).max_splits > 1, "the 700-token segment must be split");
    for head_dim in [64, 128, 256] {
        for group in [1, 2, 4, 5, 7, 8, 12, 16] {
            let seed = (head_dim * 100 + group) as u64;
            attention_scenario::<_, f16>(
                &EmuStore,
                layout.clone(),
                head_dim,
                group,
                AttentionOptions::default(),
                true,
                seed,
            );
            attention_scenario::<_, bf16>(
                &EmuStore,
                layout.clone(),
                head_dim,
                group,
                AttentionOptions::default(),
                true,
                seed,
            );
        }
    }
}

#[test]
fn split_boundaries() {
    // len exactly a multiple of the chunk, one more, one less; chunk of 1 token.
    for (len, chunk) in [(64, 16), (65, 16), (63, 16), (5, 1), (16, 16), (17, 16)] {
        let layout = attn_layout(1, 1, &[AttnSeg::Full { len }]);
        let opts = AttentionOptions { chunk_tokens: Some(chunk), scale: None };
        attention_scenario::<_, bf16>(&EmuStore, layout, 128, 4, opts, true, u64::from(len * chunk));
    }
}

#[test]
fn planner_follows_flashinfer_rule() {
    let one = |len| LayerLayout::new(1, 1, u64::from(len), vec![Segment::full(0, len, len)]).unwrap();
    assert_eq!(plan(&one(100), 132), AttentionPlan { chunk_tokens: 100, max_splits: 1 }, "short: no split");
    let p = plan(&one(128 * 1024), 132);
    assert!(p.chunk_tokens >= MIN_CHUNK && p.max_splits > 1 && p.max_splits as usize <= 132 * 4, "{p:?}");
    // Enough segments to fill the GPU: no split, however long.
    let mut b = LayoutBuilder::new(66, 8);
    for s in 0..66 {
        for h in 0..8 {
            b = b.full(s, h, 4096);
        }
    }
    assert_eq!(plan(&b.build().unwrap(), 132).max_splits, 1);
}

#[test]
fn bad_inputs_are_errors_before_launch() {
    let layout = LayoutBuilder::new(1, 2).full(0, 0, 3).full(0, 1, 0).headroom(1).build().unwrap();
    let cache = LayerCache::<_, f16>::new(&EmuStore, layout, 64).unwrap();
    let q = EmuStore.zeros::<f16>(2 * 4 * 64).unwrap();
    let mut out = EmuStore.zeros::<f16>(2 * 4 * 64).unwrap();
    let mut ws = AttentionWorkspace::new();
    let o = AttentionOptions::default();
    let field = |e: Error| match e {
        Error::Invalid { field, .. } => field,
        e => panic!("{e}"),
    };
    for g in [0, 17] {
        assert_eq!(field(cache.attention(&q, g, &mut out, None, &mut ws, &o).unwrap_err()), "group_size");
    }
    assert_eq!(field(cache.attention(&q, 2, &mut out, None, &mut ws, &o).unwrap_err()), "q");
    let mut short = EmuStore.zeros::<f16>(2 * 4 * 64 - 1).unwrap();
    assert_eq!(field(cache.attention(&q, 4, &mut short, None, &mut ws, &o).unwrap_err()), "out");
    let mut lse = EmuStore.zeros::<f32>(7).unwrap();
    assert_eq!(field(cache.attention(&q, 4, &mut out, Some(&mut lse), &mut ws, &o).unwrap_err()), "lse");
    for scale in [f32::NAN, f32::INFINITY, 0.0] {
        let o = AttentionOptions { scale: Some(scale), chunk_tokens: None };
        assert_eq!(field(cache.attention(&q, 4, &mut out, None, &mut ws, &o).unwrap_err()), "scale");
    }
    for chunk in [0, i32::MAX as u32 + 1, u32::MAX] {
        let o = AttentionOptions { scale: None, chunk_tokens: Some(chunk) };
        assert_eq!(field(cache.attention(&q, 4, &mut out, None, &mut ws, &o).unwrap_err()), "chunk_tokens");
    }
    // The largest chunk is fine (one split).
    let o = AttentionOptions { scale: None, chunk_tokens: Some(i32::MAX as u32) };
    cache.attention(&q, 4, &mut out, None, &mut ws, &o).unwrap();
}

/// Runs attention over host K/V/q through the emulator (LSE requested) and returns the output
/// and the LSE as host vectors.
fn emulate<T: KvElem>(
    layout: &LayerLayout,
    d: usize,
    (k, v, q): (&[T], &[T], &[T]),
    group: usize,
    chunk_tokens: Option<u32>,
) -> (Vec<T>, Vec<f32>) {
    let heads = layout.segments().len() * group;
    let cache = LayerCache::<_, T>::from_parts(
        &EmuStore,
        layout.clone(),
        d,
        EmuStore.upload(k).unwrap(),
        EmuStore.upload(v).unwrap(),
    )
    .unwrap();
    let mut out = EmuStore.zeros::<T>(heads * d).unwrap();
    let mut lse = EmuStore.zeros::<f32>(heads).unwrap();
    let opts = AttentionOptions { chunk_tokens, scale: None };
    let q = EmuStore.upload(q).unwrap();
    cache.attention(&q, group, &mut out, Some(&mut lse), &mut AttentionWorkspace::new(), &opts).unwrap();
    (out.as_slice().to_vec(), lse.as_slice().to_vec())
}

/// Relative L2 distance of a head's output from the reference.
fn rel_l2<T: KvElem>(got: &[T], want: &[f64]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(a, b)| (f64::from(a.to_f32()) - b).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| b * b).sum();
    (err / norm.max(1e-30)).sqrt()
}

/// A NaN in one segment's K (or V) row makes exactly the query heads of that group NaN, whether
/// the segment is split or not; every other head matches the reference.
#[test]
fn nan_poisons_only_the_heads_that_read_it() {
    let d = 64;
    let group = 2;
    let layout = common::attn_layout(
        1,
        3,
        &[AttnSeg::Full { len: 40 }, AttnSeg::Full { len: 40 }, AttnSeg::Full { len: 5 }],
    );
    for (chunk, poison_v) in [(None, false), (Some(7), false), (None, true), (Some(7), true)] {
        let rows = layout.total_rows();
        let mut k = common::values::<f16>(1, rows * d, 1.0);
        let mut v = common::values::<f16>(2, rows * d, 1.0);
        let q = common::values::<f16>(3, 3 * group * d, 1.0);
        let bad_row = layout.segments()[1].row(17) as usize;
        let target = if poison_v { &mut v } else { &mut k };
        target[bad_row * d + 5] = f16::NAN;
        let (out, lse) = emulate(&layout, d, (&k, &v, &q), group, chunk);
        let (want, _) = headwise::reference::attention(&layout, d, &k, &v, &q, group, 0.125);
        for h in 0..3 * group {
            let o = &out[h * d..(h + 1) * d];
            if h / group == 1 {
                assert!(
                    o.iter().any(|x| x.is_nan()),
                    "chunk {chunk:?}: head {h} read the NaN row but is finite"
                );
                if !poison_v {
                    assert!(lse[h].is_nan(), "a NaN logit must show in the LSE");
                }
            } else {
                assert!(o.iter().all(|x| x.is_finite()), "chunk {chunk:?}: head {h} never read the NaN row");
                let want = &want[h * d..(h + 1) * d];
                let err: f64 = o.iter().zip(want).map(|(a, b)| (f64::from(a.to_f32()) - b).powi(2)).sum();
                assert!(err.sqrt() < 1e-2);
            }
        }
    }
}

/// A NaN logit reaches the LSE even when it is alone in its chunk or its segment (fmaxf drops
/// NaN, so the max alone cannot carry it).
#[test]
fn a_lone_nan_logit_shows_in_the_lse() {
    let d = 64;
    for (len, chunk, nan_at) in [(1u32, None, 0u32), (5, Some(1), 2), (41, Some(40), 40), (41, Some(40), 3)] {
        let layout = common::attn_layout(1, 1, &[AttnSeg::Full { len }]);
        let mut k = common::values::<bf16>(5, layout.total_rows() * d, 1.0);
        let v = common::values::<bf16>(6, layout.total_rows() * d, 1.0);
        let q = common::values::<bf16>(7, d, 1.0);
        k[layout.segments()[0].row(nan_at) as usize * d] = bf16::NAN;
        let (out, lse) = emulate(&layout, d, (&k, &v, &q), 1, chunk);
        assert!(lse[0].is_nan(), "len {len} chunk {chunk:?}: LSE {}", lse[0]);
        assert!(out.iter().all(|x| x.is_nan()), "len {len} chunk {chunk:?}");
    }
}

/// A logit that overflows to -inf in f32 contributes nothing, wherever it falls; it must not
/// turn the head NaN (exp2(-inf - -inf)).
#[test]
fn a_minus_inf_logit_contributes_nothing() {
    let d = 64;
    for (len, row, chunk) in [(2u32, 0u32, None), (2, 1, None), (9, 4, Some(4)), (9, 0, Some(1))] {
        let layout = common::attn_layout(1, 1, &[AttnSeg::Full { len }]);
        let mut k = common::values::<bf16>(8, layout.total_rows() * d, 0.001);
        let v = common::values::<bf16>(9, layout.total_rows() * d, 1.0);
        let q = vec![bf16::from_f32(1e20); d];
        let r = layout.segments()[0].row(row) as usize;
        k[r * d..(r + 1) * d].fill(bf16::from_f32(-1e20)); // q.k = -6.4e41: -inf in f32
        let (out, _) = emulate(&layout, d, (&k, &v, &q), 1, chunk);
        let (want, _) = headwise::reference::attention(&layout, d, &k, &v, &q, 1, 0.125);
        assert!(rel_l2(&out, &want) <= 1e-2, "len {len} row {row} chunk {chunk:?}: {:?}", &out[..4]);
    }
}

#[test]
fn a_scale_that_overflows_in_base_2_is_refused() {
    let layout = LayoutBuilder::new(1, 1).full(0, 0, 2).build().unwrap();
    let cache = LayerCache::<_, f16>::new(&EmuStore, layout, 64).unwrap();
    let q = EmuStore.zeros::<f16>(64).unwrap();
    let mut out = EmuStore.zeros::<f16>(64).unwrap();
    for scale in [3.0e38f32, -3.0e38] {
        let o = AttentionOptions { scale: Some(scale), chunk_tokens: None };
        let e = cache.attention(&q, 1, &mut out, None, &mut AttentionWorkspace::new(), &o).unwrap_err();
        assert!(matches!(e, Error::Invalid { ref field, .. } if field == "scale"), "{e}");
    }
}
