//! The R-KV CPU reference (SPEC section 4, the oracle for `cuda/redundancy.cu`): hand-checked
//! cases (expected numbers derived by hand or with an independent numpy transcription of the
//! formulas), planted duplicates, the trigger, the query ring, and property tests of the
//! invariants.

use half::{bf16, f16};
use headwise::KvElem;
use headwise::reference::rkv::{
    QueryRing, RkvOptions, RkvTrigger, rkv_importance, rkv_redundancy, rkv_scores, rkv_select, rkv_step,
};
use headwise::{LayerLayout, Segment};
use proptest::prelude::*;

fn h(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

fn close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "[{j}]: {g} vs {w} (all: {got:?})");
    }
}

/// Keys of dimension `d`, key `p` the unit vector `e_dirs[p]`.
fn unit_keys(d: usize, dirs: &[usize]) -> Vec<f16> {
    let mut k = vec![f16::ZERO; dirs.len() * d];
    for (p, &i) in dirs.iter().enumerate() {
        k[p * d + i] = f16::ONE;
    }
    k
}

/// Deterministic small values, exact in f16 and bf16 (multiples of 1/4 in [-2, 2)).
fn pseudo<T: KvElem>(n: usize, seed: u64) -> Vec<T> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            T::from_f32(((x >> 33) % 16) as f32 / 4.0 - 2.0)
        })
        .collect()
}

// Shared by the numpy-checked cases: 8 keys (D = 2), the last alpha = 2 are the window; G = 2
// query heads with 2 queries each.
const K8: [f32; 16] = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5, 0.5, -2.0, -1.0, -1.0, 0.5, 0.5, 2.0, -1.0];
const Q2X2: [f32; 8] = [1.0, 0.0, 0.0, 2.0, 0.0, 1.0, -1.0, -1.0];

#[test]
fn importance_matches_numpy() {
    // numpy: logits = einsum('gtd,jd->gtj', q, k[:6]) / sqrt(2); m = logits.max(0);
    // p = softmax(m, axis=1); a = p.mean(0); A = max over [j-1, j+1].
    let (k, q) = (h(&K8), h(&Q2X2));
    let a = rkv_importance(&k, &q, 2, 2, 2, 1);
    let want_a = [
        0.1349729089779312,
        0.22023873808426514,
        0.22023873808426514,
        0.13109095351880307,
        0.15464910942944282,
        0.13880955190529268,
    ];
    close(&a, &want_a, 1e-14);
    assert!((a.iter().sum::<f64>() - 1.0).abs() < 1e-14, "unpooled importance is a distribution");
    let pooled = rkv_importance(&k, &q, 2, 2, 2, 3);
    let (p1, p4) = (want_a[1], want_a[4]);
    close(&pooled, &[p1, p1, p1, p1, p4, p4], 1e-14);
}

#[test]
fn one_query_importance_is_the_softmax_over_candidates_only() {
    // D = 1 (scale 1), one head, one query 1.0, alpha = 1: the window key's huge logit (9) must
    // not enter the softmax, so the 4 candidates get exactly softmax([0, 1, 2, 0.5]).
    let k = h(&[0.0, 1.0, 2.0, 0.5, 9.0]);
    let a = rkv_importance(&k, &h(&[1.0]), 1, 1, 1, 1);
    let z: f64 = [0.0f64, 1.0, 2.0, 0.5].iter().map(|x| x.exp()).sum();
    close(&a, &[0.0f64, 1.0, 2.0, 0.5].map(|x| x.exp() / z), 1e-15);
}

#[test]
fn group_is_reduced_by_max_on_raw_logits() {
    // Heads q = +1 and q = -1 on keys [1, 2, -3] (D = 1, window key 0): raw-logit max is
    // [1, 2, 3], so A = softmax([1, 2, 3]). Max of the two heads' softmaxes would differ.
    let k = h(&[1.0, 2.0, -3.0, 0.0]);
    let a = rkv_importance(&k, &h(&[1.0, -1.0]), 2, 1, 1, 1);
    let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
    let want = [1.0f64, 2.0, 3.0].map(|x| x.exp() / z);
    close(&a, &want, 1e-15);
    let z0: f64 = [1.0f64, 2.0, -3.0].iter().map(|x| x.exp()).sum();
    assert!((a[0] - 1f64.exp() / z0).abs() > 0.1, "would pass with max of probabilities too");
}

#[test]
fn redundancy_matches_numpy_with_and_without_the_quirk() {
    // k0 = (1,0), k1 = 2 k0, k2 = (0,1), k3 = (1,1), k4 = (-1,0.25). Rows 0 and 1 forgive their
    // most recent similar token 3 (not each other), row 2 forgives 3, row 3 forgives 2; row 4
    // has no similar token (cos with k0 is -0.97): only the quirk zeroes S[4][0].
    let k = h(&[1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.25]);
    let off = [
        0.23591390169417906,
        0.23591390163212528,
        0.21370171435988014,
        0.18367628933855554,
        0.1307941929752601,
    ];
    close(&rkv_redundancy(&k, 2, false), &off, 1e-12);
    let on = [
        0.27265670403767717,
        0.22456944990479746,
        0.20342538572544783,
        0.1748438009457978,
        0.12450465938627983,
    ];
    close(&rkv_redundancy(&k, 2, true), &on, 1e-12);
}

#[test]
fn scores_match_numpy() {
    // lambda * A (pooled, kernel 3) - (1 - lambda) * R[..6], R over all 8 keys.
    let opts = RkvOptions { kernel: 3, alpha: 2, ..RkvOptions::new(4) };
    let s = rkv_scores(&h(&K8), &h(&Q2X2), 2, 2, &opts);
    close(
        &s,
        &[
            -0.13356830206042575,
            -0.11261282054719216,
            -0.11524415321789347,
            -0.0824260126970559,
            -0.08710101439798082,
            -0.0812562142135306,
        ],
        1e-12,
    );
    // numpy's stable argsort of -s: 5 3 4 1 2 0; keep the best 2 plus the window.
    assert_eq!(rkv_select(&s, 2, 4), vec![3, 5, 6, 7]);
}

#[test]
fn planted_duplicates_keep_only_the_most_recent_copy() {
    // 24 keys, D = 32: every key a distinct unit vector (similarity 0 to the others) except four
    // exact copies of e31 at positions 2, 9, 15, 18. Zero queries make the importance uniform,
    // so redundancy alone decides. Each copy's row forgives its most recent similar token:
    // rows 2, 9, 15 forgive 18, row 18 forgives 15. Column j sums the copies that did not
    // forgive it: 2 <- {9, 15, 18} = 3, 9 <- {2, 15, 18} = 3, 15 <- {2, 9} = 2, 18 <- {} = 0.
    // So the newest copy looks exactly like a unique key and the older copies are redundant.
    let copies = [2usize, 9, 15, 18];
    let dirs: Vec<usize> = (0..24).map(|p| if copies.contains(&p) { 31 } else { p }).collect();
    let k = unit_keys(32, &dirs);
    let r = rkv_redundancy(&k, 32, false);
    assert_eq!(r[2], r[9]);
    assert!(r[9] > r[15] && r[15] > r[18], "{r:?}");
    assert!((r[18] - r[0]).abs() < 1e-15, "the newest copy scores as a unique key");
    let q = vec![f16::ZERO; 8 * 32];
    for quirk in [false, true] {
        // Tight budget: 20 candidates, keep 17, i.e. evict exactly the three older copies.
        let opts = RkvOptions { alpha: 4, fidelity_quirk: quirk, ..RkvOptions::new(21) };
        let s = rkv_scores(&k, &q, 1, 32, &opts);
        let kept = rkv_select(&s, 4, 21);
        let want: Vec<usize> = (0..24).filter(|p| ![2, 9, 15].contains(p)).collect();
        assert_eq!(kept, want, "quirk {quirk}");
    }
}

#[test]
fn fidelity_quirk_flips_the_fate_of_token_0() {
    // D = 8: k0 = e0, k_i = 7 e0 + 24 e_i (|k_i| = 25). cos(k0, k_i) = 0.28, cos(k_i, k_j) =
    // 0.0784: no pair exceeds 0.5, so no row forgives anything. Without the quirk column 0 sums
    // 7 * 0.28 (most redundant); with it every row zeroes S[i][0], so column 0 sums to 0 (least
    // redundant) while columns j >= 1 keep 0.28 + 6 * 0.0784. Zero queries: uniform importance.
    let mut k = vec![f16::ZERO; 64];
    k[0] = f16::ONE;
    for i in 1..8 {
        k[i * 8] = f16::from_f32(7.0);
        k[i * 8 + i] = f16::from_f32(24.0);
    }
    let softmax = |c: &[f64]| -> Vec<f64> {
        let z: f64 = c.iter().map(|x| x.exp()).sum();
        c.iter().map(|x| x.exp() / z).collect()
    };
    let other = (0.28 + 6.0 * 0.0784) / 8.0;
    let mut c = vec![other; 8];
    c[0] = 7.0 * 0.28 / 8.0;
    close(&rkv_redundancy(&k, 8, false), &softmax(&c), 1e-9);
    c[0] = 0.0;
    close(&rkv_redundancy(&k, 8, true), &softmax(&c), 1e-9);

    // alpha = 2, budget 7: one of the 6 candidates goes. Off: token 0. On: the candidates 1..5
    // tie, so the highest position among them (5) goes.
    let q = vec![f16::ZERO; 2 * 8];
    let pick = |quirk| {
        let opts = RkvOptions { alpha: 2, fidelity_quirk: quirk, ..RkvOptions::new(7) };
        rkv_select(&rkv_scores(&k, &q, 1, 8, &opts), 2, 7)
    };
    assert_eq!(pick(false), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(pick(true), vec![0, 1, 2, 3, 4, 6, 7]);
}

#[test]
fn select_ranks_nan_below_negative_infinity() {
    let nan = f64::NAN;
    // Two candidate slots: 1.0 first, then -inf (position 1) beats NaN (position 0) even though
    // NaN has the lower position.
    assert_eq!(rkv_select(&[nan, f64::NEG_INFINITY, 1.0, nan], 1, 3), vec![1, 2, 4]);
    // A NaN is kept only when nothing better is left.
    assert_eq!(rkv_select(&[nan, f64::NEG_INFINITY, nan], 1, 3), vec![0, 1, 3]);
    // -0.0 and 0.0 are equal scores: the tie goes to the lower position.
    assert_eq!(rkv_select(&[-0.0, 0.0], 0, 1), vec![0]);
}

#[test]
fn select_ties_budget_and_window() {
    // Ties: lower position wins.
    assert_eq!(rkv_select(&[1.0, 2.0, 2.0, 1.0, 2.0], 2, 4), vec![1, 2, 5, 6]);
    // len <= budget keeps everything, including len == budget exactly.
    assert_eq!(rkv_select(&[3.0, 1.0], 2, 4), vec![0, 1, 2, 3]);
    assert_eq!(rkv_select(&[3.0, 1.0], 2, 9), vec![0, 1, 2, 3]);
    // budget == window keeps only the window.
    assert_eq!(rkv_select(&[3.0, 1.0], 2, 2), vec![2, 3]);
}

#[test]
fn query_ring_wraps_and_reads_oldest_first() {
    // heads = 2, alpha = 3, D = 2; push p gives head 0 (p, 10p), head 1 (-p, -10p).
    let mut ring = QueryRing::<f16>::new(2, 3, 2).unwrap();
    let push = |ring: &mut QueryRing<f16>, p: f32| ring.push(&h(&[p, 10.0 * p, -p, -10.0 * p])).unwrap();
    push(&mut ring, 1.0);
    push(&mut ring, 2.0);
    // Before alpha pushes only the pushed queries exist.
    assert_eq!((ring.count(), ring.next_slot()), (2, 2));
    assert_eq!(ring.queries(0), h(&[1.0, 10.0, 2.0, 20.0]));
    for p in 3..=5 {
        push(&mut ring, p as f32);
    }
    assert_eq!((ring.count(), ring.next_slot()), (3, 2));
    assert_eq!(ring.queries(0), h(&[3.0, 30.0, 4.0, 40.0, 5.0, 50.0]));
    assert_eq!(ring.queries(1), h(&[-3.0, -30.0, -4.0, -40.0, -5.0, -50.0]));
    // Device layout [head][slot][D]: push p went to slot (p - 1) % 3.
    assert_eq!(
        ring.data(),
        &h(&[4.0, 40.0, 5.0, 50.0, 3.0, 30.0, -4.0, -40.0, -5.0, -50.0, -3.0, -30.0])[..]
    );
    assert_eq!(ring.group(0, 2), [ring.queries(0), ring.queries(1)].concat());
    assert!(ring.push(&h(&[1.0, 2.0])).is_err());
    assert!(QueryRing::<f16>::new(2, 0, 2).is_err());
}

/// Layer for the step tests: 2 sequences x 2 KV heads, G = 2, D = 4, budget 6, buffer 4,
/// alpha 2 (trigger at len >= 10).
/// s0: Full len 10 (triggers), s1: Full len 9 (one short), s2: Streaming 2 + 8, full and
/// wrapped (long, but never compacted), s3: Full len 12.
fn step_layer() -> (LayerLayout, Vec<f16>, Vec<f16>, QueryRing<f16>, RkvOptions) {
    let segs = vec![
        Segment::full(0, 12, 10),
        Segment::full(12, 10, 9),
        Segment { len: 10, ring_head: 3, ..Segment::streaming(22, 2, 8) },
        Segment::full(32, 14, 12),
    ];
    let layout = LayerLayout::new(2, 2, 46, segs).unwrap();
    let (k, v) = (pseudo::<f16>(46 * 4, 1), pseudo::<f16>(46 * 4, 2));
    let mut ring = QueryRing::new(8, 2, 4).unwrap();
    for step in 0..3 {
        ring.push(&pseudo::<f16>(8 * 4, 10 + step)).unwrap();
    }
    let opts = RkvOptions { buffer: 4, alpha: 2, ..RkvOptions::new(6) };
    (layout, k, v, ring, opts)
}

fn rows(buf: &[f16], from: usize, to: usize) -> &[f16] {
    &buf[from * 4..to * 4]
}

#[test]
fn step_compacts_triggered_segments_and_leaves_the_rest() {
    let (mut layout, mut k, mut v, ring, opts) = step_layer();
    let (before, k0, v0) = (layout.clone(), k.clone(), v.clone());
    let out = rkv_step(&mut layout, &mut k, &mut v, &ring, 2, &opts, RkvTrigger::Threshold).unwrap();
    assert!(out[1].is_none() && out[2].is_none(), "below the trigger / streaming: {out:?}");
    for s in [1, 2] {
        assert_eq!(layout.segments()[s], before.segments()[s]);
        let seg = before.segments()[s];
        let (a, b) = (seg.offset as usize, (seg.offset + seg.capacity) as usize);
        assert_eq!(rows(&k, a, b), rows(&k0, a, b));
        assert_eq!(rows(&v, a, b), rows(&v0, a, b));
    }
    for s in [0, 3] {
        let seg = before.segments()[s];
        let (off, len) = (seg.offset as usize, seg.len as usize);
        let kept = out[s].as_ref().unwrap();
        let want =
            rkv_select(&rkv_scores(rows(&k0, off, off + len), &ring.group(2 * s, 2), 2, 4, &opts), 2, 6);
        assert_eq!(kept, &want);
        assert_eq!(kept.len(), 6);
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "position order");
        assert_eq!(&kept[4..], &[len - 2, len - 1], "window kept");
        assert_eq!(layout.segments()[s], Segment { len: 6, ..seg });
        for (i, &p) in kept.iter().enumerate() {
            assert_eq!(rows(&k, off + i, off + i + 1), rows(&k0, off + p, off + p + 1));
            assert_eq!(rows(&v, off + i, off + i + 1), rows(&v0, off + p, off + p + 1));
        }
    }
}

#[test]
fn forced_step_and_its_errors() {
    let (layout, k, v, ring, opts) = step_layer();
    // s1 is below the automatic trigger but forced: compacted to the budget.
    let (mut l, mut kk, mut vv) = (layout.clone(), k.clone(), v.clone());
    let out =
        rkv_step(&mut l, &mut kk, &mut vv, &ring, 2, &opts, RkvTrigger::Forced(&[false, true, false, false]))
            .unwrap();
    assert_eq!(out[1].as_ref().map(Vec::len), Some(6));
    assert!(out[0].is_none() && out[3].is_none(), "forcing replaces the length rule");
    assert_eq!(l.segments()[1].len, 6);
    assert_eq!(l.segments()[0], layout.segments()[0]);

    // A forced segment within the budget keeps everything and changes nothing.
    let small = LayerLayout::new(1, 1, 8, vec![Segment::full(0, 8, 5)]).unwrap();
    let (mut l, mut kk, mut vv) = (small.clone(), k[..32].to_vec(), v[..32].to_vec());
    let ring1 = QueryRing::<f16>::new(2, 2, 4).unwrap();
    let out = rkv_step(&mut l, &mut kk, &mut vv, &ring1, 2, &opts, RkvTrigger::Forced(&[true])).unwrap();
    assert_eq!(out, vec![Some(vec![0, 1, 2, 3, 4])]);
    assert_eq!((l, &kk[..], &vv[..]), (small, &k[..32], &v[..32]));

    // Errors leave everything untouched.
    let err = |trigger, ring: &QueryRing<f16>, group, opts: &RkvOptions| {
        let (mut l, mut kk, mut vv) = (layout.clone(), k.clone(), v.clone());
        let e = rkv_step(&mut l, &mut kk, &mut vv, ring, group, opts, trigger).unwrap_err();
        assert_eq!((&l, &kk, &vv), (&layout, &k, &v));
        e.to_string()
    };
    let e = err(RkvTrigger::Forced(&[false, false, true, false]), &ring, 2, &opts);
    assert!(e.contains("trigger[2]") && e.contains("Streaming"), "{e}");
    assert!(err(RkvTrigger::Forced(&[true]), &ring, 2, &opts).contains("trigger"));
    assert!(err(RkvTrigger::Threshold, &ring, 1, &opts).contains("ring"), "group size vs ring heads");
    let empty = QueryRing::<f16>::new(8, 2, 4).unwrap();
    assert!(err(RkvTrigger::Threshold, &empty, 2, &opts).contains("no query"));
    let bad_alpha = QueryRing::<f16>::new(8, 3, 4).unwrap();
    assert!(err(RkvTrigger::Threshold, &bad_alpha, 2, &opts).contains("alpha"));
    for (bad, field) in [
        (RkvOptions { budget: 2, ..opts }, "budget"),
        (RkvOptions { kernel: 4, ..opts }, "kernel"),
        (RkvOptions { lambda: 1.5, ..opts }, "lambda"),
        (RkvOptions { lambda: f64::NAN, ..opts }, "lambda"),
        (RkvOptions { alpha: 0, ..opts }, "alpha"),
    ] {
        assert!(err(RkvTrigger::Threshold, &ring, 2, &bad).contains(field), "{field}");
    }
}

#[test]
fn step_scores_with_only_the_queries_pushed_so_far() {
    // alpha = 4 but two pushes: the importance uses exactly those two queries (G = 1).
    let layout = LayerLayout::new(1, 1, 16, vec![Segment::full(0, 16, 16)]).unwrap();
    let (k, v) = (pseudo::<bf16>(64, 3), pseudo::<bf16>(64, 4));
    let opts = RkvOptions { buffer: 0, alpha: 4, ..RkvOptions::new(8) };
    let q = pseudo::<bf16>(8, 5);
    let mut ring = QueryRing::new(1, 4, 4).unwrap();
    ring.push(&q[..4]).unwrap();
    ring.push(&q[4..]).unwrap();
    let (mut l, mut kk, mut vv) = (layout.clone(), k.clone(), v.clone());
    let out = rkv_step(&mut l, &mut kk, &mut vv, &ring, 1, &opts, RkvTrigger::Threshold).unwrap();
    let want = rkv_select(&rkv_scores(&k, &q, 1, 4, &opts), 4, 8);
    assert_eq!(out[0].as_ref(), Some(&want));
}

// ---- properties ----

fn score() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => (-3i32..3).prop_map(f64::from),
        1 => Just(f64::NAN),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(f64::INFINITY),
    ]
}

/// Independent restatement of the order: NaN lowest, then by value.
fn above(a: f64, b: f64) -> bool {
    !a.is_nan() && (b.is_nan() || a > b)
}

proptest! {
    #[test]
    fn select_invariants(scores in prop::collection::vec(score(), 0..30), window in 0usize..5, extra in 0usize..35) {
        let budget = window + extra;
        let n = scores.len();
        let kept = rkv_select(&scores, window, budget);
        prop_assert_eq!(kept.len(), budget.min(n + window));
        prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
        prop_assert!((n..n + window).all(|p| kept.contains(&p)));
        for a in kept.iter().copied().filter(|&p| p < n) {
            for b in (0..n).filter(|p| !kept.contains(p)) {
                let tie = !above(scores[a], scores[b]) && !above(scores[b], scores[a]);
                prop_assert!(above(scores[a], scores[b]) || (tie && a < b), "kept {} evicted {}", a, b);
            }
        }
    }

    #[test]
    fn redundancy_is_a_distribution_and_the_quirk_touches_only_column_0(
        len in 1usize..16, d in 1usize..6, seed in any::<u64>(), zero_first in any::<bool>(),
    ) {
        let mut k = pseudo::<f16>(len * d, seed);
        if zero_first {
            k[..d].fill(f16::ZERO);
        }
        let off = rkv_redundancy(&k, d, false);
        let on = rkv_redundancy(&k, d, true);
        for r in [&off, &on] {
            prop_assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            prop_assert!(r.iter().all(|&x| x > 0.0));
        }
        // The quirk only ever zeroes entries of column 0, so columns j >= 1 keep their means and
        // their softmax ratios; with a zero key 0 (similarity 0 to all) it changes nothing.
        for j in 2..len {
            prop_assert!((off[j] / off[1] - on[j] / on[1]).abs() < 1e-12);
        }
        if zero_first {
            prop_assert_eq!(off, on);
        }
    }

    #[test]
    fn importance_is_pooled_softmax_mass(
        len in 2usize..20, alpha in 1usize..4, g in 1usize..4, nq in 1usize..4, d in 1usize..5,
        kernel in prop::sample::select(vec![1usize, 3, 5, 7]), seed in any::<u64>(),
    ) {
        prop_assume!(len > alpha);
        let k = pseudo::<bf16>(len * d, seed);
        let q = pseudo::<bf16>(g * nq * d, seed ^ 1);
        let raw = rkv_importance(&k, &q, g, d, alpha, 1);
        prop_assert_eq!(raw.len(), len - alpha);
        prop_assert!((raw.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let pooled = rkv_importance(&k, &q, g, d, alpha, kernel);
        for (j, &p) in pooled.iter().enumerate() {
            let win = &raw[j.saturating_sub(kernel / 2)..=(j + kernel / 2).min(raw.len() - 1)];
            prop_assert!(win.contains(&p) && win.iter().all(|&x| x <= p));
        }
        // Repeating the group's heads changes no max.
        let doubled = [q.clone(), q.clone()].concat();
        prop_assert_eq!(rkv_importance(&k, &doubled, 2 * g, d, alpha, kernel), pooled);
    }

    #[test]
    fn step_invariants_f16(seed in any::<u64>(), shape in step_shape()) {
        check_step::<f16>(seed, shape)?;
    }

    #[test]
    fn step_invariants_bf16(seed in any::<u64>(), shape in step_shape()) {
        check_step::<bf16>(seed, shape)?;
    }
}

/// (batch, kv_heads, G, D, alpha, budget, buffer, per-segment (len or None = Streaming), pushes)
type Shape = (usize, usize, usize, usize, usize, usize, usize, Vec<Option<usize>>, usize);

fn step_shape() -> impl Strategy<Value = Shape> {
    (1usize..3, 1usize..3, 1usize..3, 1usize..5, 1usize..4, 0usize..8, 0usize..6, 1usize..6).prop_flat_map(
        |(b, hk, g, d, alpha, extra, buffer, pushes)| {
            let budget = alpha + 1 + extra;
            let seg = prop_oneof![1 => Just(None), 4 => (0usize..budget + buffer + 6).prop_map(Some)];
            prop::collection::vec(seg, b * hk)
                .prop_map(move |lens| (b, hk, g, d, alpha, budget, buffer, lens, pushes))
        },
    )
}

fn check_step<T: KvElem + PartialEq>(seed: u64, shape: Shape) -> Result<(), TestCaseError> {
    let (b, hk, g, d, alpha, budget, buffer, lens, pushes) = shape;
    let mut segs = Vec::new();
    let mut offset = 0u32;
    for spec in &lens {
        let seg = match *spec {
            Some(len) => Segment::full(offset, len as u32 + 2, len as u32),
            // A full streaming ring, as long as any Full segment that triggers.
            None => Segment { len: 9, ring_head: 1, ..Segment::streaming(offset, 1, 8) },
        };
        offset += seg.capacity;
        segs.push(seg);
    }
    let before = LayerLayout::new(b, hk, u64::from(offset), segs).unwrap();
    let (k0, v0) = (pseudo::<T>(offset as usize * d, seed), pseudo::<T>(offset as usize * d, !seed));
    let mut ring = QueryRing::new(b * hk * g, alpha, d).unwrap();
    for p in 0..pushes {
        ring.push(&pseudo::<T>(b * hk * g * d, seed.wrapping_add(p as u64 + 7))).unwrap();
    }
    let opts = RkvOptions { budget, buffer, alpha, ..RkvOptions::new(budget) };
    let (mut layout, mut k, mut v) = (before.clone(), k0.clone(), v0.clone());
    let out = rkv_step(&mut layout, &mut k, &mut v, &ring, g, &opts, RkvTrigger::Threshold).unwrap();
    let mut touched = vec![false; offset as usize];
    for (s, (seg, after)) in before.segments().iter().zip(layout.segments()).enumerate() {
        let (off, len) = (seg.offset as usize, seg.len as usize);
        let fires = lens[s].is_some() && len >= budget + buffer;
        prop_assert_eq!(out[s].is_some(), fires, "segment {}", s);
        let Some(kept) = &out[s] else {
            prop_assert_eq!(after, seg);
            continue;
        };
        prop_assert_eq!(kept.len(), budget.min(len));
        prop_assert_eq!(after.len as usize, kept.len());
        prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
        prop_assert!((len - alpha..len).all(|p| kept.contains(&p)), "window");
        let scores = rkv_scores(&k0[off * d..(off + len) * d], &ring.group(s * g, g), g, d, &opts);
        prop_assert_eq!(kept, &rkv_select(&scores, alpha, budget));
        for (i, &p) in kept.iter().enumerate() {
            prop_assert!(k[(off + i) * d..(off + i + 1) * d] == k0[(off + p) * d..(off + p + 1) * d]);
            prop_assert!(v[(off + i) * d..(off + i + 1) * d] == v0[(off + p) * d..(off + p + 1) * d]);
        }
        touched[off..off + len].fill(true);
    }
    for row in (0..offset as usize).filter(|&r| !touched[r]) {
        prop_assert!(k[row * d..(row + 1) * d] == k0[row * d..(row + 1) * d], "row {} changed", row);
        prop_assert!(v[row * d..(row + 1) * d] == v0[row * d..(row + 1) * d], "row {} changed", row);
    }
    Ok(())
}
