//! R-KV eviction through the emulator against the f64 reference (see common::rkv_scenario for
//! what is checked), including the WMMA similarity and importance paths.
#![cfg(feature = "emulator")]

mod common;

use common::{RkvCase, rkv_scenario};
use half::{bf16, f16};
use headwise::redundancy::RkvOptions;
use headwise::{EmuStore, KvElem};
use proptest::prelude::*;

fn cases() -> u32 {
    if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 48 } else { 6 }
}

fn opts(budget: usize, buffer: usize, alpha: usize, kernel: usize) -> RkvOptions {
    RkvOptions { buffer, alpha, kernel, ..RkvOptions::new(budget) }
}

fn case_strategy() -> impl Strategy<Value = RkvCase> {
    (
        1usize..3,
        1usize..3,
        prop::sample::select(vec![1usize, 2, 4, 7]),
        prop::sample::select(vec![64usize, 128, 256]),
        1usize..10,
        prop::sample::select(vec![1usize, 3, 7]),
        any::<bool>(),
        1usize..12,
        any::<u64>(),
    )
        .prop_flat_map(|(batch, kv_heads, group, head_dim, alpha, kernel, quirk, pushes, seed)| {
            let n = batch * kv_heads;
            (
                Just((batch, kv_heads, group, head_dim, alpha, kernel, quirk, pushes, seed)),
                alpha + 1..alpha + 40,
                proptest::collection::vec(
                    prop_oneof![4 => (1u32..150).prop_map(Ok), 1 => (0u32..4, 1u32..8).prop_map(Err)],
                    n,
                ),
            )
        })
        .prop_map(
            |((batch, kv_heads, group, head_dim, alpha, kernel, quirk, pushes, seed), budget, segs)| {
                RkvCase {
                    batch,
                    kv_heads,
                    group,
                    head_dim,
                    segs,
                    opts: RkvOptions { fidelity_quirk: quirk, ..opts(budget, 16, alpha, kernel) },
                    pushes,
                    forced: None,
                    duplicates: vec![],
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn emulator_matches_reference_f16(case in case_strategy()) {
        rkv_scenario::<_, f16>(&EmuStore, &case);
    }

    #[test]
    fn emulator_matches_reference_bf16(case in case_strategy()) {
        rkv_scenario::<_, bf16>(&EmuStore, &case);
    }
}

fn every_head_dim<T: KvElem>() {
    for d in [64, 128, 256] {
        for (group, alpha, pushes) in [(1, 8, 20), (4, 8, 3), (8, 16, 16), (16, 16, 5)] {
            let case = RkvCase {
                batch: 1,
                kv_heads: 2,
                group,
                head_dim: d,
                segs: vec![Ok(200), Ok(150)],
                opts: opts(64, 128, alpha, 7),
                pushes,
                forced: None,
                duplicates: vec![],
                seed: d as u64 + group as u64,
            };
            let out = rkv_scenario::<_, T>(&EmuStore, &case);
            // 200 >= 64 + 128 triggers, 150 does not.
            assert!(out.kept[0].is_some() && out.kept[1].is_none());
        }
    }
}

#[test]
fn every_head_dim_group_and_dtype() {
    every_head_dim::<f16>();
    every_head_dim::<bf16>();
}

/// Four copies of one key at positions 10 < 40 < 70 < 100 of a 140-token segment: rows of the
/// older copies forgive only the newest similar copy, so older copies collect more similarity
/// (higher redundancy, lower score). With lambda = 0 (redundancy only) and a budget that cannot
/// keep every token, the newest copy is kept and the older ones are evicted.
#[test]
fn planted_duplicates_keep_only_the_most_recent_copy() {
    for d in [64, 128] {
        let case = RkvCase {
            batch: 1,
            kv_heads: 1,
            group: 2,
            head_dim: d,
            segs: vec![Ok(140)],
            opts: RkvOptions { lambda: 0.0, ..opts(100, 128, 8, 7) },
            pushes: 8,
            forced: Some(vec![true]),
            duplicates: vec![(0, 10, vec![40, 70, 100])],
            seed: 3,
        };
        let out = rkv_scenario::<_, f16>(&EmuStore, &case);
        let kept = out.kept[0].as_ref().unwrap();
        assert!(kept.contains(&100), "newest copy evicted: {kept:?}");
        for old in [10, 40, 70] {
            assert!(!kept.contains(&old), "older copy {old} kept: {kept:?}");
        }
    }
}

#[test]
fn forced_segments_and_short_ones() {
    // Forced: the first (Full, above budget) is compacted although below the trigger; the second
    // is forced but holds no more than the budget (untouched); the third is not forced.
    let case = RkvCase {
        batch: 1,
        kv_heads: 3,
        group: 2,
        head_dim: 64,
        segs: vec![Ok(60), Ok(30), Ok(90)],
        opts: opts(30, 128, 4, 3),
        pushes: 2,
        forced: Some(vec![true, true, false]),
        duplicates: vec![],
        seed: 11,
    };
    let out = rkv_scenario::<_, bf16>(&EmuStore, &case);
    assert!(out.kept[0].is_some() && out.kept[1].is_none() && out.kept[2].is_none());
}

/// A NaN in one key (SPEC section 7 / issue 8): its similarity row and column are NaN, so every
/// column mean of that segment, hence its redundancy softmax and every score, is NaN; NaN
/// ranks lowest, so the segment keeps its oldest candidates plus the window. The other segment
/// of the layer is compacted exactly as in a run without the NaN.
#[test]
fn a_nan_key_poisons_only_its_segment() {
    use headwise::redundancy::{QueryRing, RkvTrigger, RkvWorkspace, evict};
    use headwise::{LayerCache, LayerLayout, Segment, Store};
    let (d, g, len, budget, alpha) = (64usize, 2usize, 90u32, 40usize, 8usize);
    let layout = LayerLayout::new(
        1,
        2,
        2 * u64::from(len),
        vec![Segment::full(0, len, len), Segment::full(len, len, len)],
    )
    .unwrap();
    let clean: Vec<f16> = common::values(21, 2 * len as usize * d, 1.0);
    let v: Vec<f16> = common::values(22, 2 * len as usize * d, 1.0);
    let mut poisoned = clean.clone();
    poisoned[30 * d + 5] = f16::NAN; // segment 0, token 30
    let opts = RkvOptions { alpha, ..RkvOptions::new(budget) };
    let run = |k: &[f16]| {
        let mut cache = LayerCache::from_parts(
            &EmuStore,
            layout.clone(),
            d,
            EmuStore.upload(k).unwrap(),
            EmuStore.upload(&v).unwrap(),
        )
        .unwrap();
        let mut ring = QueryRing::new(&EmuStore, 2 * g, alpha, d).unwrap();
        for step in 0..3 {
            ring.push(&EmuStore.upload(&common::values::<f16>(100 + step, 2 * g * d, 1.0)).unwrap()).unwrap();
        }
        let mut ws = RkvWorkspace::new();
        let done = evict(&mut cache, &ring, g, &opts, RkvTrigger::Forced(&[true, true]), &mut ws).unwrap();
        assert_eq!(done, vec![true, true]);
        let scores = ws.scores(&EmuStore).unwrap();
        (ws.kept(&EmuStore).unwrap(), scores, EmuStore.download(cache.k()).unwrap())
    };
    let (kept_clean, _, k_clean) = run(&clean);
    let (kept_nan, scores_nan, k_nan) = run(&poisoned);
    assert!(scores_nan[0].1.iter().all(|x| x.is_nan()), "segment 0 scores should all be NaN");
    assert!(scores_nan[1].1.iter().all(|x| x.is_finite()), "segment 1 scores should stay finite");
    let n = len as usize - alpha;
    let want: Vec<u32> = (0..(budget - alpha) as u32).chain(n as u32..len).collect();
    assert_eq!(kept_nan[0].1, want);
    assert_eq!(kept_nan[1], kept_clean[1]);
    let seg1 = len as usize * d..(len as usize + budget) * d;
    assert_eq!(
        k_nan[seg1.clone()].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        k_clean[seg1].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}
