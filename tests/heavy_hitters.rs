//! H2O heavy hitters through the emulator against the reference (see common::h2o::h2o_scenario
//! for what is checked): mass accumulated by decode attention, the eviction by it.
#![cfg(feature = "emulator")]

mod common;

use common::h2o::{H2oCase, H2oSeg, h2o_scenario};
use half::{bf16, f16};
use headwise::heavy_hitters::{H2oOptions, H2oWorkspace, evict_by_mass};
use headwise::reference::h2o;
use headwise::{AttentionOptions, AttentionWorkspace, EmuStore, KvElem, LayerCache, LayoutBuilder, Store};
use proptest::prelude::*;

fn mixed(group: usize, head_dim: usize, chunk_tokens: Option<u32>, seed: u64) -> H2oCase {
    H2oCase {
        batch: 2,
        kv_heads: 2,
        group,
        head_dim,
        segs: vec![
            H2oSeg::Full { len: 150 },
            H2oSeg::Streaming { sink: 2, window: 7, fill: 9, ring_head: 3 },
            H2oSeg::Full { len: 9 },
            H2oSeg::Full { len: 40 },
        ],
        steps: (3, 2),
        opts: H2oOptions { budget: 24, recent: 8 },
        chunk_tokens,
        with_lse: seed.is_multiple_of(2),
        seed,
    }
}

fn every_shape<T: KvElem>() {
    for d in [64, 128, 256] {
        for g in [1, 4, 8] {
            // Split forced on (16-token chunks) and off (one chunk, whatever the length).
            for chunk in [Some(16), Some(1 << 30)] {
                let out = h2o_scenario::<_, T>(&EmuStore, &mixed(g, d, chunk, (d * 10 + g) as u64));
                eprintln!("d {d} g {g} chunk {chunk:?}: max rel err {:.2e}", out.max_rel_err);
                assert!(out.kept[0][0].is_some() && out.kept[0][1].is_none() && out.kept[0][2].is_none());
            }
        }
    }
}

#[test]
fn every_head_dim_group_and_split_f16() {
    every_shape::<f16>();
}

#[test]
fn every_head_dim_group_and_split_bf16() {
    every_shape::<bf16>();
}

fn seg_strategy() -> impl Strategy<Value = H2oSeg> {
    prop_oneof![
        3 => prop_oneof![Just(0u32), Just(1), 0u32..220].prop_map(|len| H2oSeg::Full { len }),
        1 => (0u32..4, 1u32..20, 0u32..30, 0u32..20)
            .prop_map(|(sink, window, fill, ring_head)| H2oSeg::Streaming { sink, window, fill, ring_head }),
    ]
}

fn case_strategy() -> impl Strategy<Value = H2oCase> {
    (
        (1usize..3, 1usize..3),
        prop::sample::select(vec![1usize, 2, 3, 4, 5, 8, 16]),
        prop::sample::select(vec![64usize, 128, 256]),
        (0usize..5, 0usize..4),
        (1usize..60, any::<u32>()),
        prop::option::of(1u32..48),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(
            |((batch, kv_heads), group, head_dim, steps, (budget, r), chunk_tokens, with_lse, seed)| {
                let n = batch * kv_heads;
                proptest::collection::vec(seg_strategy(), n).prop_map(move |segs| H2oCase {
                    batch,
                    kv_heads,
                    group,
                    head_dim,
                    segs,
                    steps,
                    // recent from 0 to budget inclusive (both edges reachable).
                    opts: H2oOptions { budget, recent: r as usize % (budget + 1) },
                    chunk_tokens,
                    with_lse,
                    seed,
                })
            },
        )
}

fn cases() -> u32 {
    if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 64 } else { 10 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn emulator_matches_reference_f16(case in case_strategy()) {
        h2o_scenario::<_, f16>(&EmuStore, &case);
    }

    #[test]
    fn emulator_matches_reference_bf16(case in case_strategy()) {
        h2o_scenario::<_, bf16>(&EmuStore, &case);
    }
}

/// Planted mass: exact ties (the lower position wins), NaN (below everything, -inf included),
/// -0 tying with +0, and budget == recent (no heavy hitter at all) and recent == 0.
#[test]
fn ties_nan_and_edges_of_the_selection() {
    let nan = f32::NAN;
    let m: Vec<f32> =
        vec![1.0, nan, 5.0, 5.0, -0.0, 0.0, f32::NEG_INFINITY, 5.0, 2.0, nan, 7.0, 1.0, 0.5, 0.25];
    let len = m.len() as u32;
    for (budget, recent, want) in [
        (6usize, 2usize, vec![2u32, 3, 7, 10, 12, 13]),
        (7, 2, vec![2, 3, 7, 8, 10, 12, 13]),
        (4, 4, vec![10, 11, 12, 13]),
        (3, 0, vec![2, 3, 10]),
        // Every number kept, then -0 (position 4) before +0 and -inf, then NaN last.
        (10, 0, vec![0, 2, 3, 4, 7, 8, 10, 11, 12, 13]),
        (13, 0, vec![0, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 1]),
        (14, 3, (0..14).collect()),
    ] {
        let mut want = want;
        want.sort_unstable();
        let layout = LayoutBuilder::new(1, 1).full(0, 0, len).build().unwrap();
        let d = 64;
        let k: Vec<f16> = common::values(3, len as usize * d, 1.0);
        let v: Vec<f16> = common::values(4, len as usize * d, 1.0);
        let mut cache = LayerCache::from_parts(
            &EmuStore,
            layout.clone(),
            d,
            EmuStore.upload(&k).unwrap(),
            EmuStore.upload(&v).unwrap(),
        )
        .unwrap();
        let mut mass = EmuStore.upload(&m).unwrap();
        let mut ws = H2oWorkspace::new();
        let opts = H2oOptions { budget, recent };
        let done = evict_by_mass(&mut cache, &mut mass, &opts, &mut ws).unwrap();
        let m64: Vec<f64> = m.iter().map(|&x| f64::from(x)).collect();
        let reference: Vec<u32> = h2o::h2o_keep(&m64, budget, recent).iter().map(|&p| p as u32).collect();
        assert_eq!(reference, want, "budget {budget} recent {recent}: reference");
        if budget >= len as usize {
            assert_eq!(done, vec![false]);
            continue;
        }
        assert_eq!(done, vec![true]);
        assert_eq!(ws.kept(&EmuStore).unwrap(), vec![(0, want.clone())], "budget {budget} recent {recent}");
        let got = EmuStore.download(&mass).unwrap();
        for (i, &p) in want.iter().enumerate() {
            assert_eq!(got[i].to_bits(), m[p as usize].to_bits(), "mass entry {i} (token {p})");
        }
        assert!(got[budget..].iter().all(|&x| x.to_bits() == 0), "freed mass not zeroed: {got:?}");
    }
}

/// A NaN in one key of segment 0 gives a NaN logit, so that group's LSE and the mass of every
/// token of segment 0 are NaN; segment 1 is unaffected. The eviction then keeps segment 0's
/// oldest tokens (all NaN tie: lower positions) plus the recent ones.
#[test]
fn a_nan_key_makes_only_its_segments_mass_nan() {
    let (d, g, len) = (128usize, 4usize, 30u32);
    let layout = LayoutBuilder::new(1, 2).full(0, 0, len).full(0, 1, len).headroom(2).build().unwrap();
    let rows = layout.total_rows();
    let mut k: Vec<bf16> = common::values(5, rows * d, 1.0);
    k[layout.segments()[0].row(7) as usize * d + 3] = bf16::NAN;
    let v: Vec<bf16> = common::values(6, rows * d, 1.0);
    let mut cache = LayerCache::from_parts(
        &EmuStore,
        layout.clone(),
        d,
        EmuStore.upload(&k).unwrap(),
        EmuStore.upload(&v).unwrap(),
    )
    .unwrap();
    let q = EmuStore.upload(&common::values::<bf16>(7, 2 * g * d, 1.0)).unwrap();
    let mut out = EmuStore.zeros::<bf16>(2 * g * d).unwrap();
    let mut mass = EmuStore.zeros::<f32>(rows).unwrap();
    let mut ws = AttentionWorkspace::new();
    cache
        .attention_with_mass(&q, g, &mut out, None, &mut ws, &AttentionOptions::default(), &mut mass)
        .unwrap();
    let m = EmuStore.download(&mass).unwrap();
    let (s0, s1) = (layout.segments()[0], layout.segments()[1]);
    assert!((0..len).all(|i| m[s0.row(i) as usize].is_nan()), "segment 0 mass should be NaN");
    let total: f32 = (0..len).map(|i| m[s1.row(i) as usize]).sum();
    assert!((total - g as f32).abs() < 1e-4, "segment 1: the group's probabilities sum to G, got {total}");
    let mut hws = H2oWorkspace::new();
    let done = evict_by_mass(&mut cache, &mut mass, &H2oOptions { budget: 10, recent: 4 }, &mut hws).unwrap();
    assert_eq!(done, vec![true, true]);
    let kept = hws.kept(&EmuStore).unwrap();
    assert_eq!(kept[0], (0, (0..6).chain(26..30).collect()));
}

/// Segments long enough for the planner to split them on its own (no forced chunk), as the GPU
/// test runs them, with a wrapped ring.
#[test]
fn planner_split_long_segments() {
    let case = H2oCase {
        batch: 2,
        kv_heads: 2,
        group: 8,
        head_dim: 128,
        segs: vec![
            H2oSeg::Full { len: 2000 },
            H2oSeg::Streaming { sink: 4, window: 64, fill: 68, ring_head: 17 },
            H2oSeg::Full { len: 700 },
            H2oSeg::Full { len: 1500 },
        ],
        steps: (3, 2),
        opts: H2oOptions { budget: 1024, recent: 64 },
        chunk_tokens: None,
        with_lse: false,
        seed: 9,
    };
    let layout = common::h2o::h2o_layout(&case);
    assert!(headwise::attention::plan(&layout, EmuStore.sm_count()).max_splits > 1, "must be split");
    let out = h2o_scenario::<_, bf16>(&EmuStore, &case);
    assert_eq!(out.kept[0].iter().map(Option::is_some).collect::<Vec<_>>(), vec![true, false, false, true]);
}
